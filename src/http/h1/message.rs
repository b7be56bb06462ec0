//! HTTP/1.x message heads: parsed from the wire into `http` types (so route
//! and step-up decisions see the same request whichever engine carried
//! it), how each body is delimited (RFC 9112 §6), and written back out.
//!
//! Parsing is strict where a lenient parser would let two hops disagree on
//! where a message ends (request smuggling): `Transfer-Encoding` with
//! `Content-Length`, a coding list not ending in `chunked`, conflicting
//! lengths, obsolete line folding (httparse refuses it) are all refused.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, response, Method, StatusCode, Version};

use super::fields::{has_field, has_token, values, Fields, EXPECT, HOST, UPGRADE};
use super::framing::{one_length, request_framing, response_framing};
use crate::policy::target::reads_as;

/// The most header fields a head may carry by default (hyper's and
/// Envoy's default is 100 too).
pub const MAX_HEADERS: usize = 100;
/// The largest head accepted, request line or status line included (and
/// the ceiling of a request's configurable limit: the read buffer's).
pub const MAX_HEAD: usize = 64 * 1024;
/// The ceiling of a request's configurable field count.
pub const MAX_HEADERS_CEILING: usize = 256;

/// How large a request head may be (`--max-request-header-bytes`,
/// `--max-request-headers`); over either: 431.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Bytes, request line included; at most [`MAX_HEAD`].
    pub bytes: usize,
    /// Fields; at most [`MAX_HEADERS_CEILING`].
    pub fields: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        HeadLimits {
            bytes: MAX_HEAD,
            fields: MAX_HEADERS,
        }
    }
}

/// Why a head was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    /// Not an HTTP/1.x message head.
    #[error("malformed message head: {0}")]
    Malformed(String),
    /// Over [`MAX_HEAD`] bytes or [`MAX_HEADERS`] fields.
    #[error("message head over {MAX_HEAD} bytes or {MAX_HEADERS} fields")]
    TooLarge,
    /// `Content-Length` not a number, or two different ones.
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    /// A request with both `Transfer-Encoding` and `Content-Length`.
    #[error("Transfer-Encoding together with Content-Length")]
    TransferAndLength,
    /// A request whose codings do not end in `chunked`, or an HTTP/1.0
    /// request with any (its length cannot be known).
    #[error("Transfer-Encoding must end in chunked")]
    TransferEncoding,
    /// A request with a transfer coding besides `chunked` (`gzip,
    /// chunked`): the relay would pass on `chunked` alone and the app
    /// would read the coded bytes as the body (RFC 9112 §6.1: 501).
    #[error("transfer coding other than chunked")]
    UnsupportedCoding,
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2).
    #[error("HTTP/1.1 request without Host")]
    NoHost,
}

/// How a message body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`, ended by the last chunk and trailers.
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// How much of a clean request head is parsed (one that is not clean is
/// always parsed in full: it is rewritten from its parts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Method and version: the head is relayed as it came (outbound).
    Scan,
    /// And the target, checked (`policy::target`): the head's fields are
    /// spliced ([`splice_request`]), not collected (inbound, on a port
    /// whose policy has no routes: no field is read to decide). Given the
    /// names of the fields the splice drops (the ones the side sets).
    Target(&'static [&'static str]),
    /// And every field, in `parts.headers`.
    Full,
}

/// A parsed request head and what the proxy needs to know about it beyond
/// the `http` parts (read before hop-by-hop headers are stripped).
#[derive(Debug)]
pub struct RequestHead {
    /// Method, target, version, headers.
    pub parts: request::Parts,
    /// How its body is delimited.
    pub framing: Framing,
    /// Whether the client keeps the connection open after the response.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a 100 before the body.
    pub expect_continue: bool,
    /// `Upgrade` (with `Connection: upgrade`): the protocol asked for, unless
    /// it is HTTP itself (`h2c`), which is not passed on.
    pub upgrade: Option<HeaderValue>,
    /// The request target's bytes within the head.
    pub target: std::ops::Range<usize>,
    /// No hop-by-hop field and CRLF line ends: the head can be relayed as
    /// it came. Then, unless parsed in full, `parts` holds only the method
    /// and version (and the URI, with [`Detail::Target`]): nothing was
    /// allocated for the rest.
    pub clean: bool,
    /// Whether `parts.headers` holds the head's fields (not clean, or
    /// [`Detail::Full`]): the head is then written from its parts.
    pub fields: bool,
    /// Read with [`Detail::Target`]: how the head is spliced.
    pub splice: Option<Splice>,
}

/// How a clean head read with [`Detail::Target`] is spliced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Splice {
    /// The names of the fields it drops (the ones the side sets).
    pub drops: &'static [&'static str],
    /// Whether a field so named, or `Transfer-Encoding`, came with it.
    pub present: bool,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status, version, headers.
    pub parts: response::Parts,
    /// How its body is delimited (given the request's method).
    pub framing: Framing,
    /// Whether the server keeps the connection open after the response.
    pub keep_alive: bool,
    /// As [`RequestHead::clean`]; `parts.headers` is empty when clean.
    pub clean: bool,
}

/// Parses a request head at the start of `buf`: `Ok(None)` while it is
/// incomplete, else the head and its length in bytes; a clean head in as
/// much `detail` as asked (see [`RequestHead::clean`]).
pub fn parse_request(
    buf: &[u8],
    detail: Detail,
    limits: HeadLimits,
) -> Result<Option<(RequestHead, usize)>, HeadError> {
    // Uninitialised slots: no per-parse memset of the whole table.
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS_CEILING];
    let max_fields = limits.fields.min(MAX_HEADERS_CEILING);
    let max_bytes = limits.bytes.min(MAX_HEAD);
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut fields[..max_fields]) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max_bytes => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    if len > max_bytes {
        return Err(HeadError::TooLarge);
    }
    // httparse fills every field of a complete request.
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed("incomplete request line".into()));
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method".into()))?;
    let version = version_of(minor);
    let fields = &Fields::new(req.headers);
    let framing = request_framing(version, fields)?;
    if version == Version::HTTP_11 && !has_field(fields, HOST) {
        return Err(HeadError::NoHost);
    }
    let keep_alive = keep_alive(version, fields);
    let expect_continue = version == Version::HTTP_11
        && values(fields, EXPECT).any(|v| v.eq_ignore_ascii_case(b"100-continue"));
    // An upgrade to HTTP itself is not passed on: after a `101` the
    // connection is opaque, and an app that takes `h2c` (hypercorn does, on
    // `Upgrade` alone) then serves HTTP/2 requests no policy sees. It goes
    // with the hop-by-hop fields and the request as plain HTTP/1.1 (a
    // server may always decline an upgrade). Other protocols (WebSocket,
    // SPDY for `kubectl exec`, Docker's `tcp`) are passed on.
    let upgrade = if version == Version::HTTP_11 && has_token(fields, "upgrade") {
        let first = values(fields, UPGRADE).next();
        first
            .filter(|v| !upgrades_to_http(v))
            .and_then(|v| HeaderValue::from_bytes(v).ok())
    } else {
        None
    };
    // A length given as a list or in copies (all equal, or refused above)
    // is relayed as one number: RFC 9110 §8.6 forbids passing it on.
    let clean = is_clean(&buf[..len], fields) && one_length(fields);
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.version = version;
    let collected = !clean || detail == Detail::Full;
    if collected || matches!(detail, Detail::Target(_)) {
        parts.uri = crate::policy::target::parse(target)
            .map_err(|refusal| HeadError::Malformed(refusal.to_string()))?;
    }
    let mut splice = None;
    if collected {
        parts.headers = header_map(fields.list)?;
    } else if let Detail::Target(drops) = detail {
        // What `header_map` would refuse is refused here too: a spliced
        // head passes on no field the full parse would not.
        if let Some(bad) = fields.list.iter().find(|f| !valid_value(f.value)) {
            return Err(HeadError::Malformed(format!(
                "invalid value of header {}",
                bad.name.to_ascii_lowercase()
            )));
        }
        let present = fields
            .list
            .iter()
            .any(|f| dropped(drops, f.name.as_bytes()));
        splice = Some(Splice { drops, present });
    }
    // The target is a slice of `buf`.
    let start = target.as_ptr() as usize - buf.as_ptr() as usize;
    Ok(Some((
        RequestHead {
            parts,
            framing,
            keep_alive,
            expect_continue,
            upgrade,
            target: start..start + target.len(),
            clean,
            fields: collected,
            splice,
        },
        len,
    )))
}

/// Parses a response head at the start of `buf` (the answer to a `method`
/// request): `Ok(None)` while incomplete. Headers are only collected when
/// the head is not clean (it must then be rewritten).
pub fn parse_response(
    buf: &[u8],
    method: &Method,
) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    // Uninitialised slots, as for requests: no 3 KiB table zeroed per
    // response.
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut resp, buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    let (Some(code), Some(minor)) = (resp.code, resp.version) else {
        return Err(HeadError::Malformed("incomplete status line".into()));
    };
    let status = StatusCode::from_u16(code)
        .map_err(|_| HeadError::Malformed(format!("invalid status {code}")))?;
    let version = version_of(minor);
    let fields = &Fields::new(resp.headers);
    let (framing, drop_length) = response_framing(method, status, fields)?;
    let keep_alive = keep_alive(version, fields) && framing != Framing::UntilClose;
    let clean = !drop_length && is_clean(&buf[..len], fields);
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    if !clean {
        parts.headers = header_map(fields.list)?;
        if drop_length {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
    }
    Ok(Some((
        ResponseHead {
            parts,
            framing,
            keep_alive,
            clean,
        },
        len,
    )))
}

/// CRLF line ends and no hop-by-hop field: the head can go on as it came.
/// Every line's end is checked, not only the last's: a bare LF ends a line
/// for httparse (as for Go and nginx) but not for gunicorn before 22, which
/// would read the next field as part of this one's value (a
/// `Content-Length` hidden that way makes the body a second request). Such
/// a head is rewritten from what we parsed, with CRLFs. Each line but the
/// last ends just before a field's name: one comparison per field.
fn is_clean(head: &[u8], fields: &Fields<'_>) -> bool {
    let crlf_before = |name: &str| {
        let at = (name.as_ptr() as usize).wrapping_sub(head.as_ptr() as usize);
        at.checked_sub(2).and_then(|from| head.get(from..at)) == Some(b"\r\n")
    };
    head.ends_with(b"\r\n\r\n")
        && fields.list.iter().all(|f| crlf_before(f.name))
        && !fields.has_hop_by_hop()
}

/// Whether an `Upgrade` value names HTTP among its protocols (`h2c`, `h2`,
/// `HTTP/2.0`, any `HTTP/...`), each element trimmed and compared without
/// case.
fn upgrades_to_http(value: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|p| {
        let p = p.trim_ascii();
        p.eq_ignore_ascii_case(b"h2c")
            || p.eq_ignore_ascii_case(b"h2")
            || p.get(..5).is_some_and(|h| h.eq_ignore_ascii_case(b"http/"))
    })
}

fn version_of(minor: u8) -> Version {
    if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    }
}

/// Fields a relayed head may gain: XFCC and the step-up subject inbound,
/// `Connection` and `Transfer-Encoding` when framing is restored. Room for
/// them is made at once: a map grown by its first insert rehashed every
/// field (a callgrind profile: 1,100 instructions of the inbound's 31,000
/// per request).
const ADDED_FIELDS: usize = 4;

fn header_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, HeadError> {
    let mut headers = HeaderMap::with_capacity(fields.len() + ADDED_FIELDS);
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError::Malformed(format!("invalid header name {:?}", field.name)))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| HeadError::Malformed(format!("invalid value of header {name}")))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// A field value `HeaderValue::from_bytes` takes: visible ASCII, space,
/// tab, obs-text; no other control byte.
fn valid_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

/// Whether a field `name` reads as one `drops` names (any byte but a letter or digit for a `-`
/// too: [`reads_as`]) or is `Transfer-Encoding` (hop-by-hop: the relay
/// restores the framing; an empty one, no coding, would otherwise pass).
fn dropped(drops: &[&str], name: &[u8]) -> bool {
    drops.iter().any(|d| reads_as(name, d))
        || name.eq_ignore_ascii_case(header::TRANSFER_ENCODING.as_str().as_bytes())
}

/// Rewrites a clean request head, `out` as it came, for the next hop
/// without collecting its fields (`parsed`: read with [`Detail::Target`],
/// `parts.headers` holding the fields to add since): every field its
/// [`Splice::drops`] name or among those added (in any case, any byte but a letter or digit for `-`) goes,
/// and `Transfer-Encoding`; the added ones are appended. The same fields
/// as the head parsed in full, so changed, and written by
/// [`write_request`], in the order they came. A clean head's lines end in
/// CRLF and none is folded (httparse refuses that), so each field is one
/// line. A head read otherwise is left as it is.
pub fn splice_request(out: &mut Vec<u8>, parsed: &RequestHead) {
    let Some(Splice { drops, present }) = parsed.splice else {
        return;
    };
    // Empty lines before the request line (RFC 9112 §2.2: CRLF or LF,
    // which the parse skipped) are not passed on, as a rewritten head has
    // none. (Taken for the request line below, they lost the head's every
    // line: found by the fuzz smoke in CI.)
    let empty_lines = out
        .iter()
        .take_while(|&&b| matches!(b, b'\r' | b'\n'))
        .count();
    out.drain(..empty_lines);
    let added = &parsed.parts.headers;
    let goes =
        |name: &[u8]| dropped(drops, name) || added.keys().any(|k| reads_as(name, k.as_str()));
    // Known from the parse: no field to take out, unless one is added that
    // `drops` does not name (none is, from the inbound side).
    let keeps_all = !present && added.keys().all(|k| dropped(drops, k.as_str().as_bytes()));
    if keeps_all {
        // The common case: the head stays where it is.
        out.truncate(out.len() - 2);
    } else {
        let came = std::mem::take(out);
        out.reserve(came.len() + ADDED_FIELDS * 64);
        let request_line = came
            .split_inclusive(|&b| b == b'\n')
            .next()
            .unwrap_or_default();
        out.extend_from_slice(request_line);
        for (name, line) in field_lines(&came) {
            if !goes(name) {
                out.extend_from_slice(line);
            }
        }
    }
    write_fields(added, out);
}

/// The field lines of a clean head: each one's name and the whole line,
/// its CRLF included (the request line skipped, the empty line ends them).
fn field_lines(head: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    head.split_inclusive(|&b| b == b'\n')
        .skip(1)
        .take_while(|line| line.len() > 2)
        .map(|line| {
            let colon = line.iter().position(|&b| b == b':').unwrap_or(0);
            (&line[..colon], line)
        })
}

fn keep_alive(version: Version, fields: &Fields<'_>) -> bool {
    if has_token(fields, "close") {
        return false;
    }
    version == Version::HTTP_11 || has_token(fields, "keep-alive")
}

/// Appends a request head to `out`: origin-form target, the headers as
/// they are in `parts` (names lower-case).
pub fn write_request(parts: &request::Parts, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    // An absolute-form target may have an empty path with a query
    // (`http://a?b`); its origin form is `/?b` (RFC 9112 §3.2.1), which
    // `PathAndQuery::path` gives by answering "/" for an empty path.
    match parts.uri.path_and_query() {
        Some(pq) => {
            out.extend_from_slice(pq.path().as_bytes());
            if let Some(query) = pq.query() {
                out.push(b'?');
                out.extend_from_slice(query.as_bytes());
            }
        }
        None => out.push(b'/'),
    }
    out.extend_from_slice(version_str(parts.version));
    out.extend_from_slice(b"\r\n");
    write_fields(&parts.headers, out);
}

/// Appends a response head to `out`.
pub fn write_response(parts: &response::Parts, out: &mut Vec<u8>) {
    let version = if parts.version == Version::HTTP_10 {
        &b"HTTP/1.0 "[..]
    } else {
        &b"HTTP/1.1 "[..]
    };
    out.extend_from_slice(version);
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    write_fields(&parts.headers, out);
}

fn version_str(version: Version) -> &'static [u8] {
    if version == Version::HTTP_10 {
        b" HTTP/1.0"
    } else {
        b" HTTP/1.1"
    }
}

fn write_fields(headers: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
