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
    /// `Upgrade` (with `Connection: upgrade`): the protocol asked for.
    pub upgrade: Option<HeaderValue>,
    /// The request target's bytes within the head.
    pub target: std::ops::Range<usize>,
    /// No hop-by-hop field and CRLF line ends: the head can be relayed as
    /// it came. Then, unless parsed in full, `parts` holds only the method
    /// and version (no URI, no headers: nothing was allocated for them).
    pub clean: bool,
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
/// incomplete, else the head and its length in bytes. With `full` false a
/// clean head is only scanned (see [`RequestHead::clean`]).
pub fn parse_request(
    buf: &[u8],
    full: bool,
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
    let fields = &*req.headers;
    let framing = request_framing(version, fields)?;
    if version == Version::HTTP_11 && !has_field(fields, "host") {
        return Err(HeadError::NoHost);
    }
    let keep_alive = keep_alive(version, fields);
    let expect_continue = version == Version::HTTP_11
        && values(fields, "expect").any(|v| v.eq_ignore_ascii_case(b"100-continue"));
    let upgrade = if version == Version::HTTP_11 && has_token(fields, "upgrade") {
        values(fields, "upgrade")
            .next()
            .and_then(|v| HeaderValue::from_bytes(v).ok())
    } else {
        None
    };
    let clean = is_clean(&buf[..len], fields);
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.version = version;
    if full || !clean {
        parts.uri = crate::policy::target::parse(target)
            .map_err(|refusal| HeadError::Malformed(refusal.to_string()))?;
        parts.headers = header_map(fields)?;
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
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
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
    let fields = &*resp.headers;
    let (framing, drop_length) = response_framing(method, status, fields)?;
    let keep_alive = keep_alive(version, fields) && framing != Framing::UntilClose;
    let clean = !drop_length && is_clean(&buf[..len], fields);
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    if !clean {
        parts.headers = header_map(fields)?;
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

/// Request or response header fields as the relay sees them.
type Fields<'a> = [httparse::Header<'a>];

/// The fields hop-by-hop stripping would touch (RFC 9110 §7.6.1;
/// `Transfer-Encoding` is relayed with its body, so it does not count).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "upgrade",
];

fn is_clean(head: &[u8], fields: &Fields<'_>) -> bool {
    head.ends_with(b"\r\n\r\n")
        && !fields
            .iter()
            .any(|f| HOP_BY_HOP.iter().any(|h| f.name.eq_ignore_ascii_case(h)))
}

/// The values of every `name` field.
fn values<'a>(fields: &'a Fields<'a>, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    fields
        .iter()
        .filter(move |f| f.name.eq_ignore_ascii_case(name))
        .map(|f| f.value)
}

fn has_field(fields: &Fields<'_>, name: &str) -> bool {
    fields.iter().any(|f| f.name.eq_ignore_ascii_case(name))
}

fn version_of(minor: u8) -> Version {
    if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    }
}

fn header_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, HeadError> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError::Malformed(format!("invalid header name {:?}", field.name)))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| HeadError::Malformed(format!("invalid value of header {name}")))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Whether the comma-separated `Connection` values hold `token`.
fn has_token(fields: &Fields<'_>, token: &str) -> bool {
    list(fields, "connection").any(|t| t.eq_ignore_ascii_case(token))
}

/// The comma-separated elements of every `name` field, trimmed.
fn list<'a>(fields: &'a Fields<'a>, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    values(fields, name)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn keep_alive(version: Version, fields: &Fields<'_>) -> bool {
    if has_token(fields, "close") {
        return false;
    }
    version == Version::HTTP_11 || has_token(fields, "keep-alive")
}

/// `Some(true)`: codings present and the last is `chunked` (only once);
/// `Some(false)`: codings present otherwise; `None`: no codings.
fn chunked_last(fields: &Fields<'_>) -> Option<bool> {
    let mut codings = list(fields, "transfer-encoding").peekable();
    codings.peek()?;
    let mut chunked_seen = false;
    let mut last_is_chunked = false;
    for coding in codings {
        last_is_chunked = coding.eq_ignore_ascii_case("chunked");
        if last_is_chunked && std::mem::replace(&mut chunked_seen, true) {
            return Some(false);
        }
    }
    Some(last_is_chunked)
}

/// The `Content-Length`: every copy and list element must be the same
/// decimal number.
fn content_length(fields: &Fields<'_>) -> Result<Option<u64>, HeadError> {
    let mut found = None;
    for value in values(fields, "content-length") {
        let text = std::str::from_utf8(value).map_err(|_| HeadError::ContentLength)?;
        for element in text.split(',') {
            let element = element.trim();
            if element.is_empty() || !element.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::ContentLength);
            }
            let n: u64 = element.parse().map_err(|_| HeadError::ContentLength)?;
            if found.is_some_and(|f| f != n) {
                return Err(HeadError::ContentLength);
            }
            found = Some(n);
        }
    }
    if has_field(fields, "content-length") && found.is_none() {
        return Err(HeadError::ContentLength);
    }
    Ok(found)
}

fn request_framing(version: Version, fields: &Fields<'_>) -> Result<Framing, HeadError> {
    match chunked_last(fields) {
        Some(_) if version == Version::HTTP_10 => Err(HeadError::TransferEncoding),
        Some(_) if has_field(fields, "content-length") => Err(HeadError::TransferAndLength),
        Some(true) => Ok(Framing::Chunked),
        Some(false) => Err(HeadError::TransferEncoding),
        None => Ok(match content_length(fields)? {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        }),
    }
}

/// RFC 9112 §6.3, for a response; `true` beside the framing when a
/// `Content-Length` sits beside `Transfer-Encoding` and must go (the coding
/// wins).
fn response_framing(
    method: &Method,
    status: StatusCode,
    fields: &Fields<'_>,
) -> Result<(Framing, bool), HeadError> {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, false));
    }
    match chunked_last(fields) {
        Some(chunked) => {
            let framing = if chunked {
                Framing::Chunked
            } else {
                Framing::UntilClose
            };
            Ok((framing, has_field(fields, "content-length")))
        }
        None => Ok((
            match content_length(fields)? {
                None => Framing::UntilClose,
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
            },
            false,
        )),
    }
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
mod tests {
    use super::*;

    fn req(text: &str) -> Result<Option<(RequestHead, usize)>, HeadError> {
        parse_request(text.as_bytes(), true, HeadLimits::default())
    }

    fn framing(text: &str) -> Result<Framing, HeadError> {
        req(text).map(|r| r.expect("complete").0.framing)
    }

    #[test]
    fn head_limits_are_the_configured_ones() {
        let limits = HeadLimits {
            bytes: 64,
            fields: 3,
        };
        let parse = |t: &str| parse_request(t.as_bytes(), true, limits);
        assert!(parse("GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n").is_ok());
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n").err(),
            Some(HeadError::TooLarge)
        );
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "x".repeat(64));
        assert_eq!(parse(&long).err(), Some(HeadError::TooLarge));
        // Still incomplete and already over: refused without waiting.
        assert_eq!(parse(&long[..70]).err(), Some(HeadError::TooLarge));
        // The ceiling holds whatever is configured.
        let many: String = (0..300).map(|i| format!("x{i}: 1\r\n")).collect();
        let wide = HeadLimits {
            bytes: usize::MAX,
            fields: usize::MAX,
        };
        let text = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        assert_eq!(
            parse_request(text.as_bytes(), true, wide).err(),
            Some(HeadError::TooLarge)
        );
    }

    #[test]
    fn a_plain_get_parses_and_writes_back() {
        let text = "GET /a?b=c HTTP/1.1\r\nHost: api\r\nX-Thing: 1\r\n\r\nrest";
        let (head, len) = req(text).unwrap().unwrap();
        assert_eq!(len, text.len() - 4);
        assert_eq!(head.parts.method, Method::GET);
        assert_eq!(head.parts.uri.path(), "/a");
        assert_eq!(head.framing, Framing::Empty);
        assert!(head.keep_alive);
        assert!(!head.expect_continue);
        let mut out = Vec::new();
        write_request(&head.parts, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a?b=c HTTP/1.1\r\nhost: api\r\nx-thing: 1\r\n\r\n"
        );
    }

    /// Fuzz finding (fuzz/ target h1_head): an absolute-form target with an
    /// empty path and a query was written upstream as `GET ?b HTTP/1.0`, a
    /// request line no server accepts.
    #[test]
    fn absolute_form_with_an_empty_path_is_written_with_a_slash() {
        let text = "GET http://a?b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
        let (head, _) = req(text).unwrap().unwrap();
        let mut out = Vec::new();
        write_request(&head.parts, &mut out);
        assert!(out.starts_with(b"GET /?b HTTP/1.0\r\n"), "{out:?}");
        assert!(req(std::str::from_utf8(&out).unwrap()).unwrap().is_some());
        for (target, written) in [("http://a", "/"), ("http://a/p?q", "/p?q"), ("*", "*")] {
            let text = format!("OPTIONS {target} HTTP/1.0\r\n\r\n");
            let (head, _) = req(&text).unwrap().unwrap();
            let mut out = Vec::new();
            write_request(&head.parts, &mut out);
            let want = format!("OPTIONS {written} HTTP/1.0\r\n");
            assert!(out.starts_with(want.as_bytes()), "{target}: {out:?}");
        }
    }

    #[test]
    fn incomplete_heads_wait_and_oversized_ones_are_refused() {
        assert!(req("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(req(&huge).unwrap_err(), HeadError::TooLarge);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: 1\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(req(&text).unwrap_err(), HeadError::TooLarge);
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let both =
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(framing(both).unwrap_err(), HeadError::TransferAndLength);
        let not_last = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";
        assert_eq!(framing(not_last).unwrap_err(), HeadError::TransferEncoding);
        let twice = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(framing(twice).unwrap_err(), HeadError::TransferEncoding);
        let two_lengths =
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert_eq!(framing(two_lengths).unwrap_err(), HeadError::ContentLength);
        let signed = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n";
        assert_eq!(framing(signed).unwrap_err(), HeadError::ContentLength);
        let http10 = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(framing(http10).unwrap_err(), HeadError::TransferEncoding);
        let folded = "GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n";
        assert!(matches!(req(folded), Err(HeadError::Malformed(_))));
        assert_eq!(
            req("GET / HTTP/1.1\r\n\r\n").unwrap_err(),
            HeadError::NoHost
        );
    }

    #[test]
    fn request_framing_follows_rfc_9112() {
        let same = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n";
        assert_eq!(framing(same).unwrap(), Framing::Length(5));
        let chunked = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n";
        assert_eq!(framing(chunked).unwrap(), Framing::Chunked);
        let zero = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(framing(zero).unwrap(), Framing::Empty);
    }

    #[test]
    fn connection_semantics() {
        let (h, _) = req("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive, "HTTP/1.0 closes by default");
        let (h, _) = req("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let (h, _) = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let text = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nExpect: 100-Continue\r\n\r\n";
        let (h, _) = req(text).unwrap().unwrap();
        assert_eq!(h.upgrade.unwrap(), "websocket");
        assert!(h.expect_continue);
        let no_token = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n";
        assert!(req(no_token).unwrap().unwrap().0.upgrade.is_none());
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let get = Method::GET;
        let parse = |text: &str, m: &Method| parse_response(text.as_bytes(), m).unwrap().unwrap().0;
        let r = parse("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", &get);
        assert_eq!((r.framing, r.keep_alive), (Framing::Length(2), true));
        let r = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(r.framing, Framing::Empty);
        let r = parse("HTTP/1.1 204 No Content\r\n\r\n", &get);
        assert_eq!(r.framing, Framing::Empty);
        let r = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            &get,
        );
        assert_eq!(r.framing, Framing::Chunked);
        assert!(!r.parts.headers.contains_key(header::CONTENT_LENGTH));
        let r = parse("HTTP/1.1 200 OK\r\n\r\n", &get);
        assert_eq!((r.framing, r.keep_alive), (Framing::UntilClose, false));
        let r = parse("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", &get);
        assert!(!r.keep_alive);
        let bad = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", &get);
        assert_eq!(bad.unwrap_err(), HeadError::ContentLength);
        let mut out = Vec::new();
        let r = parse(
            "HTTP/1.1 404 Nope\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
            &get,
        );
        assert!(!r.clean, "a hop-by-hop field must be stripped");
        write_response(&r.parts, &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nkeep-alive: timeout=5\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn clean_heads_are_only_scanned() {
        let text = "GET /a?b HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (head, _) = parse_request(text.as_bytes(), false, HeadLimits::default())
            .unwrap()
            .unwrap();
        assert!(head.clean);
        assert!(
            head.parts.headers.is_empty(),
            "nothing allocated for a clean head"
        );
        assert_eq!(&text[head.target.clone()], "/a?b");
        assert_eq!(head.framing, Framing::Chunked);
        let (full, _) = parse_request(text.as_bytes(), true, HeadLimits::default())
            .unwrap()
            .unwrap();
        assert_eq!(full.parts.headers.len(), 2);
        assert_eq!(full.parts.uri.path(), "/a");
        for dirty in [
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\n\n",
        ] {
            let (head, _) = parse_request(dirty.as_bytes(), false, HeadLimits::default())
                .unwrap()
                .unwrap();
            assert!(!head.clean, "{dirty:?}");
            assert!(!head.parts.headers.is_empty(), "{dirty:?}: parsed in full");
        }
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (r, len) = parse_response(resp, &Method::GET).unwrap().unwrap();
        assert!(r.clean && r.parts.headers.is_empty());
        assert_eq!(len, resp.len() - 2);
    }
}
