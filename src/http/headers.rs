//! Header and path hygiene of the proxy: hop-by-hop headers removed (RFC
//! 9110 §7.6.1), `x-forwarded-client-cert` replaced, the step-up headers
//! cleaned. (Request targets are checked by `policy::target`.)

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;

use crate::policy::target::{reads_as, spelled_otherwise};

/// `x-forwarded-client-cert` (Envoy's format: `By=<us>;URI=<peer>`).
pub const XFCC: HeaderName = HeaderName::from_static(names::XFCC);
/// The verified step-up subject passed to the app.
pub const STEPUP_SUB: HeaderName = HeaderName::from_static(names::STEPUP_SUB);
/// Between sidecars: the protocol the app spoke (`HTTP/1.1`, `HTTP/2`), as
/// Linkerd's `l5d-orig-proto`.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static(names::ORIG_PROTO);

/// The names of the fields above, as text (a `HeaderName` cannot sit in a
/// `static` slice).
pub mod names {
    /// [`XFCC`](super::XFCC)'s.
    pub const XFCC: &str = "x-forwarded-client-cert";
    /// [`STEPUP_SUB`](super::STEPUP_SUB)'s.
    pub const STEPUP_SUB: &str = "x-stepup-sub";
    /// [`ORIG_PROTO`](super::ORIG_PROTO)'s.
    pub const ORIG_PROTO: &str = "stepmesh-orig-proto";
}
/// Between sidecars, on a tunnel's `200`: `http/1.1` when the far end
/// relays the stream's HTTP/1 request by request (an `http` port), so the
/// stream can carry another app connection's next request once a response
/// has ended cleanly. Without it a tunnel is one app connection's alone.
pub const TUNNEL_RELAYS: HeaderName = HeaderName::from_static("stepmesh-relays");

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Fields a `Connection` header may name that stay all the same: they
/// frame or route the message, and whoever reads it after us reads them.
/// `Connection: Content-Length` had the length removed while the body was
/// still relayed by it: the app read the body as a second request that no
/// policy saw (request smuggling).
const NEVER_HOP_BY_HOP: [HeaderName; 2] = [header::CONTENT_LENGTH, header::HOST];

/// Removes hop-by-hop headers and those the `Connection` header names (but
/// `Content-Length` and `Host`). `TE: trailers` survives (gRPC needs it);
/// any other TE goes.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, no lookups.
    if !headers
        .keys()
        .any(|k| *k == header::TE || HOP_BY_HOP.contains(k))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !NEVER_HOP_BY_HOP.contains(n))
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    headers.remove(header::TE);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes every field whose name [`reads_as`] one of `ours` but is spelled
/// otherwise (an `_`, a `.` or another byte for a `-`: the `HeaderMap` holds names in
/// lower case, so the exact spellings are removed by name; these are what
/// a lookup misses).
pub fn remove_other_spellings(headers: &mut HeaderMap, ours: &[&str]) {
    // Most requests have none: lengths first, no allocation.
    let alike = |k: &HeaderName| {
        let name = k.as_str().as_bytes();
        ours.iter().any(|o| o.len() == name.len())
            && spelled_otherwise(name)
            && ours.iter().any(|o| reads_as(name, o))
    };
    if !headers.keys().any(alike) {
        return;
    }
    let found: Vec<HeaderName> = headers.keys().filter(|k| alike(k)).cloned().collect();
    for name in found {
        headers.remove(name);
    }
}

/// Sets `x-forwarded-client-cert: By=<own>;URI=<peer>`, replacing every copy
/// the caller sent (a caller must never choose what the app believes).
pub fn set_xfcc(headers: &mut HeaderMap, own: Option<&str>, peer: &str) {
    replace_xfcc(headers, xfcc_value(own, peer));
}

/// The `x-forwarded-client-cert` value for a connection (made once per
/// connection, not per request). SPIFFE IDs are URI-safe ASCII, so `None`
/// only for IDs that could not be parsed as such anyway.
pub fn xfcc_value(own: Option<&str>, peer: &str) -> Option<HeaderValue> {
    let value = match own {
        Some(own) => format!("By={own};URI={peer}"),
        None => format!("URI={peer}"),
    };
    HeaderValue::from_str(&value).ok()
}

/// Replaces every caller-sent `x-forwarded-client-cert` with `value`.
pub fn replace_xfcc(headers: &mut HeaderMap, value: Option<HeaderValue>) {
    // `insert` replaces every value the name had.
    match value {
        Some(v) => headers.insert(XFCC, v),
        None => headers.remove(XFCC),
    };
}

/// `http://<authority><path and query of uri>`, built from parts (no
/// formatting and re-parsing per request); `None` if it is not a valid URI.
pub fn absolute(authority: Authority, uri: &Uri) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-kept"], "1");
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("api"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "nothing hop-by-hop, nothing removed: {h:?}");
    }

    #[test]
    fn a_field_reads_as_ours_in_any_case_with_other_bytes_for_dashes() {
        for name in [
            "x-stepup-sub",
            "X_Stepup_Sub",
            "x_stepup-SUB",
            "X-STEPUP-SUB",
            "x.stepup.sub",
            "X~Stepup|Sub",
        ] {
            assert!(reads_as(name.as_bytes(), names::STEPUP_SUB), "{name}");
        }
        for name in [
            "x-stepup-su",
            "x-stepup-subs",
            "xxstepup-sub",
            "x-stepup_sud",
            "",
        ] {
            assert!(!reads_as(name.as_bytes(), names::STEPUP_SUB), "{name}");
        }
    }

    #[test]
    fn other_spellings_of_our_fields_go_and_nothing_else() {
        let mut h = HeaderMap::new();
        h.append("x_stepup_sub", HeaderValue::from_static("root"));
        h.append("x_forwarded_client_cert", HeaderValue::from_static("URI=x"));
        h.append("x-forwarded_client-cert", HeaderValue::from_static("URI=y"));
        h.append("x.stepup.sub", HeaderValue::from_static("root"));
        h.append("x_kept_field", HeaderValue::from_static("1"));
        h.append(STEPUP_SUB, HeaderValue::from_static("set by us"));
        remove_other_spellings(&mut h, &[names::XFCC, names::STEPUP_SUB]);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-stepup-sub", "x_kept_field"], "{h:?}");
    }

    #[test]
    fn xfcc_is_replaced() {
        let mut h = HeaderMap::new();
        h.append(
            XFCC,
            HeaderValue::from_static("URI=spiffe://evil/ns/a/sa/admin"),
        );
        h.append(XFCC, HeaderValue::from_static("By=x"));
        set_xfcc(
            &mut h,
            Some("spiffe://td/ns/b/sa/api"),
            "spiffe://td/ns/a/sa/web",
        );
        assert_eq!(h.get_all(XFCC).iter().count(), 1);
        assert_eq!(
            h[XFCC],
            "By=spiffe://td/ns/b/sa/api;URI=spiffe://td/ns/a/sa/web"
        );
    }
}
