//! Request-target canonicalisation: the one reading of a request's target
//! and `Host` that the sidecar, `stepmesh policy explain` and every other
//! route matcher use, so that no tool and no data-plane path can disagree.
//!
//! The threat is the app behind us reading a path differently from the
//! matcher (Envoy and Istio shipped CVEs of this class). Two defences:
//!
//! - **Refused** (400): forms that common servers read in incompatible
//!   ways and that no well-behaved client sends — dot segments (plain,
//!   percent-encoded, or hidden behind `;` parameters like `..;`), empty
//!   segments (`//`), backslashes, encoded `/`, `\`, `;`, `%` or control
//!   bytes (`%00`), malformed escapes, escapes that do not decode to UTF-8
//!   (overlong forms included), raw bytes outside visible ASCII, fragments,
//!   asterisk- and authority-form targets (`OPTIONS *`, `CONNECT`), user
//!   info, and a `Host` that disagrees with the target's authority (HTTP/1
//!   absolute-form, HTTP/2 `:authority`) or appears twice.
//! - **Read every way the app might** ([`Readings`]): as sent and
//!   percent-decoded; with `;` parameters kept and stripped (Tomcat, Jetty,
//!   Spring strip them); case kept and folded (ASP.NET, IIS, Express fold);
//!   the last segment with and without a format suffix (Rails routes
//!   `/refunds.json` as `/refunds`, Spring's suffix patterns too).
//!   One trailing slash never matters. The route of the request is the route
//!   those readings agree on; a reading that matches a route beats one that
//!   matches none (a route only ever adds requirements); two readings that
//!   match different routes are refused as ambiguous. A port's
//!   [`PathOptions`] narrows the readings when the operator knows how the app
//!   reads paths.
//!
//! Hand-written: no crate implements this policy (URL crates normalise
//! towards one reading; the point here is to consider several).

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, Method, Uri};
use serde::Deserialize;

/// How the app behind a port treats letter case in paths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseMatch {
    /// Unknown: a request must meet its route's requirement read either way.
    #[default]
    Any,
    /// The app compares paths exactly (Spring, Go, Rails).
    Sensitive,
    /// The app folds case (ASP.NET, IIS, Express by default).
    Insensitive,
}

/// How the app behind a port treats `;` path parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamsMatch {
    /// Unknown: a request must meet its route's requirement read either way.
    #[default]
    Any,
    /// `;` is an ordinary path character to the app.
    Kept,
    /// The app strips `;...` from each segment before routing (Tomcat, Jetty).
    Stripped,
}

/// How the app behind a port treats a format suffix on the last segment
/// (`/refunds.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatMatch {
    /// Unknown: a request must meet its route's requirement read either way.
    #[default]
    Any,
    /// `.` is an ordinary path character to the app.
    Kept,
    /// The app routes `/x.json` as `/x` (Rails' `(.:format)`, Spring's
    /// suffix patterns): the suffix, from the segment's first `.`, goes.
    Stripped,
}

/// A port's `pathMatch`: how its app reads paths. The default assumes
/// nothing and is safe for every common framework.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathOptions {
    /// Letter case.
    #[serde(default)]
    pub case: CaseMatch,
    /// `;` parameters.
    #[serde(default)]
    pub params: ParamsMatch,
    /// A format suffix on the last segment.
    #[serde(default)]
    pub format: FormatMatch,
}

/// Why a request target was refused (400), before any route was matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a request target `http::Uri` can represent.
    Unparsable,
    /// Not a path: asterisk-form (`OPTIONS *`) or authority-form (`CONNECT`).
    NotAPath,
    /// A `#` fragment, which clients never send.
    Fragment,
    /// A raw byte outside visible ASCII.
    RawByte,
    /// A `\`, which IIS and others read as `/`.
    Backslash,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F`, `%5C`, `%3B` or `%25`: an escape apps decode into structure.
    EncodedDelimiter,
    /// `%00` or another encoded control byte.
    EncodedControl,
    /// Escapes that decode to invalid (including overlong) UTF-8.
    InvalidUtf8,
    /// A `.` or `..` segment, in any spelling.
    DotSegment,
    /// An empty segment (`//`).
    EmptySegment,
    /// `user@` in an absolute-form target.
    UserInfo,
    /// More than one `Host` field.
    DuplicateHost,
    /// `Host` differs from the target's authority (`:authority` in HTTP/2).
    HostMismatch,
    /// Readings of the path match different routes (named).
    Ambiguous(String, String),
    /// A method-override field names a method whose route (named) is not
    /// the request's own method's.
    MethodOverride(String, String),
}

impl Refusal {
    /// A stable metric and log label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unparsable => "target_unparsable",
            Refusal::NotAPath => "target_not_a_path",
            Refusal::Fragment => "target_fragment",
            Refusal::RawByte => "target_raw_byte",
            Refusal::Backslash => "path_backslash",
            Refusal::BadEscape => "path_bad_escape",
            Refusal::EncodedDelimiter => "path_encoded_delimiter",
            Refusal::EncodedControl => "path_encoded_control",
            Refusal::InvalidUtf8 => "path_invalid_utf8",
            Refusal::DotSegment => "path_dot_segment",
            Refusal::EmptySegment => "path_empty_segment",
            Refusal::UserInfo => "target_userinfo",
            Refusal::DuplicateHost => "duplicate_host",
            Refusal::HostMismatch => "host_mismatch",
            Refusal::Ambiguous(..) => "path_ambiguous",
            Refusal::MethodOverride(..) => "method_override_ambiguous",
        }
    }
}

impl Refusal {
    /// One line for the 400's body: what is wrong, without echoing input.
    pub fn message(&self) -> &'static str {
        match self {
            Refusal::Unparsable => "the request target is not a valid URI\n",
            Refusal::NotAPath => "the request target is not a path (asterisk- or authority-form)\n",
            Refusal::Fragment => "the request target carries a fragment\n",
            Refusal::RawByte => "the request path has a byte outside visible ASCII\n",
            Refusal::Backslash => "the request path has a backslash\n",
            Refusal::BadEscape => "the request path has a malformed percent-escape\n",
            Refusal::EncodedDelimiter => "the request path encodes '/', '\\', ';' or '%'\n",
            Refusal::EncodedControl => "the request path encodes a control byte\n",
            Refusal::InvalidUtf8 => "the request path's escapes are not UTF-8\n",
            Refusal::DotSegment => "the request path has a '.' or '..' segment\n",
            Refusal::EmptySegment => "the request path has an empty segment ('//')\n",
            Refusal::UserInfo => "the request target carries user info\n",
            Refusal::DuplicateHost => "the request has more than one Host\n",
            Refusal::HostMismatch => "Host differs from the request target's authority\n",
            Refusal::Ambiguous(..) => {
                "the request path matches different routes depending on how the app reads it\n"
            }
            Refusal::MethodOverride(..) => {
                "a method-override field names a method that takes another route than the request's method\n"
            }
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Ambiguous(a, b) => write!(
                f,
                "the request path reads as route {a:?} or as route {b:?}, depending on how the app normalises it"
            ),
            Refusal::MethodOverride(a, b) => write!(
                f,
                "the request takes route {a:?} or route {b:?} depending on whether the app reads its method-override field"
            ),
            other => f.write_str(other.message().trim_end()),
        }
    }
}

impl std::error::Error for Refusal {}

pub use super::fields::{method_readings, reads_as, spelled_otherwise, METHOD_OVERRIDES};

/// Checks what every route matcher needs of a request besides its path: a
/// target that is a path, and one `Host` that agrees with the target's
/// authority. Returns the path (query excluded).
pub fn request_path<'u>(
    method: &Method,
    uri: &'u Uri,
    headers: &HeaderMap,
) -> Result<&'u str, Refusal> {
    if method == Method::CONNECT {
        return Err(Refusal::NotAPath);
    }
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::DuplicateHost);
    }
    if let Some(authority) = uri.authority() {
        if authority.as_str().contains('@') {
            return Err(Refusal::UserInfo);
        }
        if host.is_some_and(|h| {
            !h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        }) {
            return Err(Refusal::HostMismatch);
        }
    }
    Ok(uri.path())
}

/// Parses a request target as it arrived (HTTP/1 request line, `policy
/// explain --path`). A `#` is refused rather than dropped: `http::Uri`
/// would drop the fragment, and an app given the raw target may not.
pub fn parse(raw: &str) -> Result<Uri, Refusal> {
    if raw.contains('#') {
        return Err(Refusal::Fragment);
    }
    raw.parse().map_err(|_| Refusal::Unparsable)
}

/// At most 2 (raw, decoded) × 2 (params kept, stripped) × 2 (case kept,
/// folded) readings.
const MAX_READINGS: usize = 16;

/// The ways an app may read one checked path, each trimmed of one trailing
/// slash. A path in the common form (lower case, no escapes, no `;`) has one
/// reading and costs no allocation.
#[derive(Debug)]
pub struct Readings<'a> {
    items: [Option<Reading<'a>>; MAX_READINGS],
}

/// One reading: the path as the app may see it, and whether it was folded
/// (then it is compared with routes' folded patterns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading<'a> {
    /// The path, without a trailing slash (unless it is `/`).
    pub path: Cow<'a, str>,
    /// Letter case folded to lower case.
    pub folded: bool,
}

impl<'a> Readings<'a> {
    /// Checks `path` (origin-form, query excluded) and lists its readings
    /// under `options`.
    pub fn of(path: &'a str, options: PathOptions) -> Result<Self, Refusal> {
        if !path.starts_with('/') {
            return Err(Refusal::NotAPath);
        }
        let has_escape = scan(path)?;
        let decoded = if has_escape {
            Some(decode(path)?)
        } else {
            None
        };
        let mut out = Readings {
            items: Default::default(),
        };
        let mut bases: [Option<Cow<'a, str>>; 2] = [Some(Cow::Borrowed(path)), None];
        if let Some(d) = decoded {
            bases[1] = Some(Cow::Owned(d));
        }
        for base in bases.into_iter().flatten() {
            let stripped = (options.params != ParamsMatch::Kept && base.contains(';'))
                .then(|| Cow::Owned(strip_params(&base)));
            let keep = options.params != ParamsMatch::Stripped || stripped.is_none();
            let kept = keep.then_some(base);
            for form in [kept, stripped].into_iter().flatten() {
                check_segments(&form)?;
                let form = trim_trailing_slash(form);
                let without_format = (options.format != FormatMatch::Kept)
                    .then(|| strip_format(&form))
                    .flatten();
                let keep = options.format != FormatMatch::Stripped || without_format.is_none();
                for form in [keep.then_some(form), without_format].into_iter().flatten() {
                    out.push_case_readings(form, options.case);
                }
            }
        }
        Ok(out)
    }

    /// `form` as the app reads it under `case`: as it is, folded, or both.
    fn push_case_readings(&mut self, form: Cow<'a, str>, case: CaseMatch) {
        let needs_fold = form.bytes().any(|b| b.is_ascii_uppercase() || b >= 0x80);
        if case != CaseMatch::Insensitive {
            self.push(Reading {
                path: form.clone(),
                folded: false,
            });
        }
        if case != CaseMatch::Sensitive {
            let path = if needs_fold {
                Cow::Owned(fold(&form))
            } else {
                form
            };
            self.push(Reading { path, folded: true });
        }
    }

    fn push(&mut self, reading: Reading<'a>) {
        for slot in &mut self.items {
            match slot {
                Some(r) if *r == reading => return,
                Some(_) => {}
                None => {
                    *slot = Some(reading);
                    return;
                }
            }
        }
    }

    /// Every reading, each once.
    pub fn iter(&self) -> impl Iterator<Item = &Reading<'a>> {
        self.items.iter().flatten()
    }
}

/// Letter case folded the way route patterns are folded at load: to lower
/// case, then each letter whose upper case is ASCII (`ſ` is `S`, `ı` is
/// `I`, `ß` is `SS`, `ﬁ` is `FI`) to those ASCII letters, and `İ` to `i`.
/// An app that compares without case through upper case, one character
/// at a time (Java's `equalsIgnoreCase`, .NET's `OrdinalIgnoreCase`; Go's
/// `EqualFold` for `ſ`) or whole (Java's `toUpperCase`, Python's
/// `casefold`), reads `/refundſ` as `/refunds`, which lower case alone
/// leaves apart (found by review). Its own fixed point: a folded path
/// folds to itself (`ẞ` lower-cases to `ß`, which goes on to `ss`).
pub fn fold(s: &str) -> String {
    if s.is_ascii() {
        return s.to_ascii_lowercase();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\u{130}' {
            out.push('i');
            continue;
        }
        for lower in c.to_lowercase() {
            let upper = lower.to_uppercase();
            if !lower.is_ascii() && upper.clone().all(|u| u.is_ascii()) {
                out.extend(upper.map(|u| u.to_ascii_lowercase()));
            } else {
                out.push(lower);
            }
        }
    }
    out
}

/// Raw bytes: visible ASCII, no backslash or fragment, well-formed escapes
/// that do not encode delimiters or control bytes. Returns whether any
/// escape is present.
fn scan(path: &str) -> Result<bool, Refusal> {
    let bytes = path.as_bytes();
    let mut escapes = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(Refusal::Backslash),
            b'#' => return Err(Refusal::Fragment),
            b'%' => {
                let b = hex_pair(bytes.get(i + 1..i + 3)).ok_or(Refusal::BadEscape)?;
                if matches!(b, b'/' | b'\\' | b';' | b'%') {
                    return Err(Refusal::EncodedDelimiter);
                }
                if b < 0x20 || b == 0x7f {
                    return Err(Refusal::EncodedControl);
                }
                escapes = true;
                i += 3;
                continue;
            }
            0x21..=0x7e => {}
            _ => return Err(Refusal::RawByte),
        }
        i += 1;
    }
    Ok(escapes)
}

/// The byte a `%XX` escape's two hex digits (`pair`) stand for.
pub(super) fn hex_pair(pair: Option<&[u8]>) -> Option<u8> {
    let pair = pair?;
    let digit = |c: u8| (c as char).to_digit(16);
    Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
}

/// Percent-decodes a path that [`scan`] accepted.
fn decode(path: &str) -> Result<String, Refusal> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(hex_pair(bytes.get(i + 1..i + 3)).ok_or(Refusal::BadEscape)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Refusal::InvalidUtf8)
}

/// Each segment cut at its first `;`, as Tomcat reads `/a;x/b;y` (`/a/b`).
fn strip_params(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment.split_once(';').map_or(segment, |(s, _)| s));
    }
    out
}

/// No `.`/`..` segment; no empty segment but a trailing one (`/a/`).
fn check_segments(path: &str) -> Result<(), Refusal> {
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(s) = segments.next() {
        match s {
            "." | ".." => return Err(Refusal::DotSegment),
            "" if segments.peek().is_some() => return Err(Refusal::EmptySegment),
            _ => {}
        }
    }
    Ok(())
}

/// `path` without the format suffix of its last segment, from its first
/// `.` or `%2e` (read again, nothing more goes; decoded, the raw reading
/// stays among the readings); `None` without one, or when it starts the
/// segment (a dot-file is a name, not a format).
fn strip_format<'a>(path: &Cow<'a, str>) -> Option<Cow<'a, str>> {
    let start = path.rfind('/')? + 1;
    let segment = path[start..].as_bytes();
    let encoded = segment
        .windows(3)
        .position(|w| w[0] == b'%' && w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'e'));
    let dot = match (segment.iter().position(|&b| b == b'.'), encoded) {
        (Some(plain), Some(encoded)) => plain.min(encoded),
        (plain, encoded) => plain.or(encoded)?,
    };
    (dot > 0).then_some(())?;
    Some(match path {
        Cow::Borrowed(p) => Cow::Borrowed(&p[..start + dot]),
        Cow::Owned(p) => Cow::Owned(p[..start + dot].to_owned()),
    })
}

fn trim_trailing_slash(path: Cow<'_, str>) -> Cow<'_, str> {
    if path.len() > 1 && path.ends_with('/') {
        match path {
            Cow::Borrowed(p) => Cow::Borrowed(&p[..p.len() - 1]),
            Cow::Owned(mut p) => {
                p.pop();
                Cow::Owned(p)
            }
        }
    } else {
        path
    }
}

#[cfg(test)]
#[path = "target_tests.rs"]
mod tests;
