//! One request on a hyper-served inbound connection (HTTP/2, or HTTP/1
//! from a peer sidecar's HTTP/2): decided, then sent over the pooled app
//! client; an HTTP/1 app's connection counted against the process's
//! connection limit and its peer's cap while the answer lasts.

use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use std::sync::Arc;

use super::{admit, app_unavailable, InboundConn, Served, ORIG_PROTO};
use crate::http::headers::{absolute, strip_hop_by_hop};
use crate::http::holding::Holding;
use crate::http::{HttpLayer, Local, ProxyBody, Verdict};
use crate::net::caps::{LimitReached, Places};
use crate::policy::SpiffeId;

/// One request on a hyper-served connection (HTTP/2, or HTTP/1 from a peer
/// sidecar's HTTP/2): decided, then sent over the pooled app client.
pub(super) async fn handle(
    layer: &HttpLayer,
    served: &Served,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let conn = &*served.conn;
    if req.method() == http::Method::CONNECT {
        if let Some(tunnels) = &conn.tunnels {
            return tunnels.0.open_upgraded(req);
        }
    }
    let mut x = served.exchange(layer);
    if conn.tunnels_only {
        let local = Local::error(
            StatusCode::MISDIRECTED_REQUEST,
            "not_http",
            "this port is not HTTP: tunnels only\n",
        );
        return local.respond(x);
    }
    // From a peer sidecar, the app's protocol rides in a header.
    let orig = if conn.mesh {
        match req.headers().get(ORIG_PROTO).map(HeaderValue::as_bytes) {
            Some(b"HTTP/2") => Version::HTTP_2,
            Some(b"HTTP/1.0") => Version::HTTP_10,
            _ => Version::HTTP_11,
        }
    } else {
        req.version()
    };
    let (mut parts, body) = req.into_parts();
    let (decision, reason) = match admit(
        layer,
        layer.policy.current(),
        served,
        &mut x,
        &mut parts,
        orig,
    )
    .await
    {
        Verdict::Answer(local) => return local.respond(x),
        Verdict::Forward { decision, reason } => (decision, reason),
    };
    let to_h2 = orig == Version::HTTP_2;
    if !to_h2 && !parts.headers.contains_key(http::header::HOST) {
        if let Some(authority) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(http::header::HOST, authority);
        }
    }
    parts.uri = match served.app.clone().and_then(|app| absolute(app, &parts.uri)) {
        Some(uri) => uri,
        None => {
            let local = Local::error(StatusCode::BAD_GATEWAY, "bad_target", "bad app address\n");
            return local.respond(x);
        }
    };
    parts.version = if to_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    // An HTTP/1 app takes a connection per stream in flight: counted
    // against `--max-connections` and the peer's cap until its answer ends.
    let places = if to_h2 {
        None
    } else {
        match take_places(layer, conn) {
            Ok(places) => Some(places),
            Err(local) => return local.respond(x),
        }
    };
    let upstream = Request::from_parts(parts, x.count_request(body));
    let answer = if to_h2 {
        layer.app.h2.request(upstream).await
    } else {
        layer.app.h1.request(upstream).await
    };
    match answer {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            // Its places are given back when the answer ends.
            let body = match places {
                Some(places) => Holding::new(body, places).boxed(),
                None => body.boxed(),
            };
            let body = x.respond(parts.status, decision, reason, body);
            Response::from_parts(parts, body)
        }
        Err(e) => {
            tracing::warn!(app = %conn.app, error = %e, "inbound: app request failed");
            app_unavailable().respond(x)
        }
    }
}

/// An HTTP/1 app connection's places under its peer's cap and the
/// process's connection limit (as a tunnel's: docs/PROXY.md), or the `503`
/// that says which limit is reached.
fn take_places(layer: &HttpLayer, conn: &InboundConn) -> Result<Places<Arc<SpiffeId>>, Local> {
    let refused = |reason: &'static str, body: &'static str| {
        layer.metrics.refusal("inbound", reason);
        Local::error(StatusCode::SERVICE_UNAVAILABLE, reason, body)
    };
    Places::take(&layer.peer_cap, &layer.connections, &conn.peer).map_err(|limit| match limit {
        LimitReached::Key(reached) => {
            if reached.log {
                tracing::warn!(client = %conn.client, peer = %conn.peer, limit = reached.limit, "inbound: per-peer connection cap reached; refusing a request to an HTTP/1 app (--max-connections-per-peer)");
            }
            refused("peer_limit", "the peer is at its connection limit\n")
        }
        LimitReached::Process => refused(
            "connection_limit",
            "the sidecar is at its connection limit\n",
        ),
    })
}
