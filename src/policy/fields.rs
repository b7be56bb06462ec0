//! How an app reads a request's field names and query keys: the spellings
//! it files under one key, and the fields and parameters through which it
//! takes the request's method from the client (method overrides). The
//! sidecar drops the fields it sets in every such spelling, and reads a
//! method override in every spelling an app would.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, Method, Uri};

use super::target::hex_pair;

/// Fields through which app frameworks take a request's method from its
/// client instead of the request line: `X-HTTP-Method-Override` (Express's
/// `method-override`, Symfony, gorilla/handlers, Google's APIs),
/// `X-HTTP-Method` (OData, ASP.NET), `X-Method-Override`.
pub const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Every method an app may read a request as: its own first, then each one
/// a method override names. Overrides are fields (each name spelled with
/// `-`, `_` or another byte: [`reads_as`]) and `_method` query parameters
/// (Express's `methodOverride('_method')` and gorilla/handlers read the
/// query; PHP's spellings too: `is_method_key`), each
/// comma-separated element of each, trimmed as the app's own trim would:
/// ASCII whitespace, and the Latin-1 NBSP and NEL that Node and WSGI decode
/// header bytes 0xA0 and 0x85 into (JavaScript's and Python's trim take
/// them). An element that is then no method token is no method to any app,
/// and skipped. No allocation unless an override came.
pub fn method_readings<'m>(
    method: &'m Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Cow<'m, [Method]> {
    let is_override = |name: &HeaderName| {
        METHOD_OVERRIDES
            .iter()
            .any(|o| reads_as(name.as_str().as_bytes(), o))
    };
    let query = uri.query().unwrap_or("");
    let params = || {
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .filter(|(key, _)| is_method_key(&query_decode(key)))
            .map(|(_, value)| query_decode(value))
    };
    let fields = headers.keys().any(is_override);
    if !fields && params().next().is_none() {
        return Cow::Borrowed(std::slice::from_ref(method));
    }
    let mut methods = vec![method.clone()];
    let named = headers
        .iter()
        .filter(|(name, _)| is_override(name))
        .map(|(_, v)| Cow::Borrowed(v.as_bytes()))
        .chain(params())
        .collect::<Vec<_>>();
    let elements = named
        .iter()
        .flat_map(|v| v.split(|&b| b == b','))
        .filter_map(|m| Method::from_bytes(trim_as_apps_do(m)).ok());
    for m in elements {
        if !methods.contains(&m) {
            methods.push(m);
        }
    }
    Cow::Owned(methods)
}

/// Whether a decoded query key reads as `_method`: as sent (Express,
/// gorilla/handlers), or as PHP files it, which Laravel and Symfony read:
/// cut at its first NUL (PHP takes the name as a C string), leading blanks
/// dropped, `.` and ` ` read as `_` (`?.method=DELETE` and
/// `?_method%00x=DELETE` are both `$_GET['_method']`: found by review).
fn is_method_key(key: &[u8]) -> bool {
    let key = &key[..key.iter().position(|&b| b == 0).unwrap_or(key.len())];
    let start = key.iter().position(|&b| b != b' ').unwrap_or(key.len());
    let php = |b: u8| if matches!(b, b'.' | b' ') { b'_' } else { b };
    key[start..].len() == 7
        && key[start..]
            .iter()
            .zip(b"_method")
            .all(|(&a, &b)| php(a) == b)
}

/// `bytes` without the leading and trailing bytes an app's trim removes
/// from a header value it decoded as Latin-1: ASCII whitespace, 0x85 (NEL)
/// and 0xA0 (NBSP).
fn trim_as_apps_do(bytes: &[u8]) -> &[u8] {
    let blank = |b: &u8| b.is_ascii_whitespace() || *b == 0x0b || *b == 0x85 || *b == 0xa0;
    let start = bytes.iter().position(|b| !blank(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !blank(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// A query key or value as Node's `querystring` and Go's `ParseQuery` read
/// it: `+` is a space, `%XX` a byte (a malformed escape stays as it is).
fn query_decode(part: &str) -> Cow<'_, [u8]> {
    let bytes = part.as_bytes();
    if !bytes.iter().any(|&b| b == b'%' || b == b'+') {
        return Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex_pair(bytes.get(i + 1..i + 3))) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

/// Whether a field named `name` reads as `ours` to an app: ASCII case
/// aside, and any other byte than a letter or digit read as `-`. CGI-style
/// servers file such spellings under one key (`X_Stepup_Sub` and
/// `x-stepup-sub` are both `HTTP_X_STEPUP_SUB` to gunicorn before 22, PHP,
/// WSGI and CGI; lighttpd's CGI and FastCGI turn every byte but a letter
/// or digit into `_`, so `X.Stepup.Sub` is that key too: found by review),
/// so a field the sidecar sets must go in every spelling, or the caller's
/// copy reaches the app beside (and before) the sidecar's; and a field
/// whose meaning the sidecar reads (a method override) must be found in
/// each.
#[inline]
pub fn reads_as(name: &[u8], ours: &str) -> bool {
    // Every field of every request is asked against each name the inbound
    // side sets: the lengths first, then the common spelling (compared in
    // chunks), the byte-by-byte fold only for a name spelled otherwise
    // (which made it 500 instructions a request, callgrind).
    name.len() == ours.len()
        && (name.eq_ignore_ascii_case(ours.as_bytes())
            || (spelled_otherwise(name) && folds_to(name, ours.as_bytes())))
}

/// Whether `name` has a byte but a letter, a digit or `-`: one that some
/// server files as `_`, as it files `-`.
#[inline]
pub fn spelled_otherwise(name: &[u8]) -> bool {
    name.iter()
        .any(|&b| !b.is_ascii_alphanumeric() && b != b'-')
}

/// `name` and `ours` equal with ASCII case ignored and every byte but a
/// letter or digit read as `-`.
fn folds_to(name: &[u8], ours: &[u8]) -> bool {
    let fold = |b: u8| {
        if b.is_ascii_alphanumeric() {
            b.to_ascii_lowercase()
        } else {
            b'-'
        }
    };
    name.iter().zip(ours).all(|(&a, &b)| fold(a) == fold(b))
}
