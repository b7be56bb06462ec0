//! What a Kubernetes API request is, read the way the API server reads it:
//! a port of `k8s.io/apiserver`'s `RequestInfoFactory.NewRequestInfo`
//! (verb, API group and version, namespace, resource, subresource, name),
//! so that a gateway rule on `pods/exec` or `delete secrets` matches exactly
//! the requests RBAC would check as such. The verb comes from the path and
//! the query (`watch`, `fieldSelector=metadata.name=`), never from a guess:
//! a WebSocket `exec` is a `GET` and is still `pods/exec`. `watch` is read
//! as the API server's parameter codec reads booleans (only `0` and
//! `false` are false: `watch=f` is a watch), and a name from the field
//! selector is dropped when `limit` or `timeoutSeconds` would fail to
//! decode, as the server does. `tests/gateway_classify.rs` checks all this
//! against a real kube-apiserver's audit log.
//!
//! Where the API server's reading depends on something ambiguous — an
//! escape in the path, a query parameter it would fail to decode, a
//! repeated parameter it reads one way and an app another — the request is
//! refused instead ([`ClassifyError`]): the gateway forwards only what it
//! classified. Hand-written: no crate ports RequestInfo.

use std::borrow::Cow;
use std::fmt;

use http::Method;

use crate::policy::target::{CaseMatch, FormatMatch, ParamsMatch, PathOptions, Readings, Refusal};

/// One request as the API server's authorizer sees it (`RequestInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInfo {
    /// `/api/v1/pods`-style (true) or `/healthz`, `/apis` discovery (false).
    pub is_resource_request: bool,
    /// The path, percent-decoded, without a trailing slash.
    pub path: String,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`, `proxy`; for a non-resource request the
    /// lower-cased method.
    pub verb: String,
    /// `api` or `apis` (empty for a non-resource request).
    pub api_prefix: String,
    /// Empty for the core group.
    pub api_group: String,
    /// `v1`, `v1beta1`...
    pub api_version: String,
    /// Empty when cluster-scoped.
    pub namespace: String,
    /// `pods`, `secrets`...
    pub resource: String,
    /// `exec`, `status`, `log`...
    pub subresource: String,
    /// Empty on collections.
    pub name: String,
}

impl RequestInfo {
    /// `resource/subresource`, or `resource`: the form RBAC rules and ours
    /// name them in.
    pub fn resource_path(&self) -> Cow<'_, str> {
        if self.subresource.is_empty() {
            Cow::Borrowed(&self.resource)
        } else {
            Cow::Owned(format!("{}/{}", self.resource, self.subresource))
        }
    }

    /// A request admission sees as `CONNECT`: a streaming subresource of
    /// pods, services or nodes (exec, attach, port-forward, proxy) or the
    /// `proxy` verb. Whatever its HTTP method, it opens a tunnel.
    pub fn is_connect(&self) -> bool {
        self.is_resource_request
            && (self.verb == "proxy"
                || matches!(
                    self.subresource.as_str(),
                    "exec" | "attach" | "portforward" | "proxy"
                ))
    }
}

/// Why a request cannot be classified; the gateway answers 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassifyError {
    /// The path is in a form servers read differently (`policy::target`).
    Target(Refusal),
    /// `/api/v1/watch` or `/api/v1/proxy` with nothing after it.
    NoResource,
    /// A query parameter the API server would fail to decode, one given
    /// twice (which reading wins depends on the server), a non-ASCII
    /// `watch`, a `labelSelector` beside a `metadata.name` field selector
    /// (whether the name stands depends on the label selector parsing), or
    /// more than 1,000 parameters (Go reads none past 10,000).
    Query(&'static str),
}

impl fmt::Display for ClassifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClassifyError::Target(r) => write!(f, "{r}"),
            ClassifyError::NoResource => {
                f.write_str("the request path names a verb but no resource")
            }
            ClassifyError::Query(what) => write!(f, "the query parameter {what}"),
        }
    }
}

impl std::error::Error for ClassifyError {}

impl ClassifyError {
    /// A stable metric and log label.
    pub fn reason(&self) -> &'static str {
        match self {
            ClassifyError::Target(r) => r.reason(),
            ClassifyError::NoResource => "no_resource",
            ClassifyError::Query(_) => "bad_query",
        }
    }
}

/// The API server reads paths exactly: case, `;` and `.` are ordinary
/// (a pod may be named `web.1`).
const KUBERNETES_PATHS: PathOptions = PathOptions {
    case: CaseMatch::Sensitive,
    params: ParamsMatch::Kept,
    format: FormatMatch::Kept,
};

/// Classifies `method path?query` as the API server would.
pub fn classify(
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Result<RequestInfo, ClassifyError> {
    let readings = Readings::of(path, KUBERNETES_PATHS).map_err(ClassifyError::Target)?;
    // Case and parameters kept: at most two readings, as sent and decoded;
    // the API server routes on the decoded one (Go's `URL.Path`).
    let decoded = readings
        .iter()
        .last()
        .map_or(Cow::Borrowed(path), |r| r.path.clone());
    let mut info = RequestInfo {
        path: decoded.clone().into_owned(),
        verb: method.as_str().to_ascii_lowercase(),
        ..RequestInfo::default()
    };
    let parts: Vec<&str> = decoded
        .trim_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    if parts.len() < 3 || !matches!(parts[0], "api" | "apis") {
        return Ok(info);
    }
    let mut rest = &parts[1..];
    if parts[0] == "apis" {
        if rest.len() < 3 {
            return Ok(info); // `/apis/group/version`: discovery
        }
        info.api_group = rest[0].to_owned();
        rest = &rest[1..];
    }
    info.api_prefix = parts[0].to_owned();
    info.is_resource_request = true;
    info.api_version = rest[0].to_owned();
    rest = &rest[1..];

    if matches!(rest[0], "watch" | "proxy") {
        if rest.len() < 2 {
            return Err(ClassifyError::NoResource);
        }
        info.verb = rest[0].to_owned();
        rest = &rest[1..];
    } else {
        info.verb = match *method {
            Method::POST => "create",
            Method::GET | Method::HEAD => "get",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "",
        }
        .to_owned();
    }

    if rest[0] == "namespaces" {
        if let Some(ns) = rest.get(1) {
            info.namespace = (*ns).to_owned();
            // `/namespaces/x/status` and `/finalize` are the namespace's own
            // subresources; anything else there is a namespaced resource.
            if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
                rest = &rest[2..];
            }
        }
    }
    // resource / name / subresource / (anything further is not interpreted)
    if let Some(resource) = rest.first() {
        info.resource = (*resource).to_owned();
    }
    if let Some(name) = rest.get(1) {
        info.name = (*name).to_owned();
    }
    if info.verb != "proxy" {
        if let Some(sub) = rest.get(2) {
            info.subresource = (*sub).to_owned();
        }
    }

    if info.name.is_empty() && info.verb == "get" {
        let list = ListQuery::parse(query.unwrap_or(""))?;
        info.verb = if list.watch { "watch" } else { "list" }.to_owned();
        // When the list options fail to decode, the API server keeps the
        // watch but drops the name (`RequestInfoFactory`'s fallback).
        if let Some(name) = list
            .name
            .filter(|n| valid_path_segment_name(n) && !list.undecodable)
        {
            if list.label_selector {
                // We cannot tell whether the server parses the label
                // selector, so whether the name stands: refuse.
                return Err(ClassifyError::Query(
                    "labelSelector beside a fieldSelector on metadata.name",
                ));
            }
            info.name = name;
        }
    }
    if info.name.is_empty() && info.verb == "delete" {
        info.verb = "deletecollection".to_owned();
    }
    Ok(info)
}

/// The list options that change a request's classification.
#[derive(Debug, Default)]
struct ListQuery {
    watch: bool,
    /// `fieldSelector` requiring `metadata.name` to equal this.
    name: Option<String>,
    /// `limit` or `timeoutSeconds` is not an integer: the server's decoding
    /// of the list options fails.
    undecodable: bool,
    /// A non-empty `labelSelector` (whose parse could fail the decoding).
    label_selector: bool,
}

/// Go's `url.ParseQuery` (Go 1.24 and later) reads no parameter at all
/// from a query of more than 10,000; we refuse long before.
const MAX_QUERY_PARAMS: usize = 1000;

impl ListQuery {
    /// Parses the query as Go's `url.ParseQuery` and the API server's
    /// parameter codec would, refusing what it would fail on and repeats.
    fn parse(query: &str) -> Result<ListQuery, ClassifyError> {
        let mut out = ListQuery::default();
        let (mut seen_watch, mut seen_selector) = (false, false);
        let (mut seen_limit, mut seen_timeout) = (false, false);
        if query.split('&').count() > MAX_QUERY_PARAMS {
            return Err(ClassifyError::Query("count is over 1000"));
        }
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = query_decode(key)?;
            match key.as_ref() {
                "watch" => {
                    if std::mem::replace(&mut seen_watch, true) {
                        return Err(ClassifyError::Query("watch is repeated"));
                    }
                    out.watch = codec_bool(&query_decode(value)?)?;
                }
                "fieldSelector" => {
                    if std::mem::replace(&mut seen_selector, true) {
                        return Err(ClassifyError::Query("fieldSelector is repeated"));
                    }
                    out.name = exact_name(&query_decode(value)?)?;
                }
                // The codec reads the first value of each.
                "limit" if !std::mem::replace(&mut seen_limit, true) => {
                    out.undecodable |= query_decode(value)?.parse::<i64>().is_err();
                }
                "timeoutSeconds" if !std::mem::replace(&mut seen_timeout, true) => {
                    out.undecodable |= query_decode(value)?.parse::<i64>().is_err();
                }
                "labelSelector" => out.label_selector |= !value.is_empty(),
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Go's `url.QueryUnescape`: `+` is a space; a malformed escape or a `;`
/// (which Go refuses in queries since 1.17) is an error.
fn query_decode(s: &str) -> Result<Cow<'_, str>, ClassifyError> {
    if s.contains(';') {
        return Err(ClassifyError::Query("contains ';'"));
    }
    let bytes = s.as_bytes();
    for (i, _) in s.match_indices('%') {
        let hex = bytes.get(i + 1..i + 3);
        if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
            return Err(ClassifyError::Query("has a malformed percent-escape"));
        }
    }
    let spaced: Cow<'_, str> = if s.contains('+') {
        Cow::Owned(s.replace('+', " "))
    } else {
        Cow::Borrowed(s)
    };
    let decoded = percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map_err(|_| ClassifyError::Query("is not UTF-8"))?;
    Ok(Cow::Owned(decoded.into_owned()))
}

/// The API server's parameter codec (`Convert_Slice_string_To_bool`), not
/// `strconv.ParseBool`: only `0` and `false` in any case are false; every
/// other value, `f`, `no` and the empty string included, is true. Non-ASCII
/// is refused: the codec compares with Unicode folding (`ſ` is an `s`),
/// its fallback with ASCII lower-casing.
fn codec_bool(s: &str) -> Result<bool, ClassifyError> {
    if !s.is_ascii() {
        return Err(ClassifyError::Query("watch is not ASCII"));
    }
    Ok(!(s == "0" || s.eq_ignore_ascii_case("false")))
}

/// `fields.ParseSelector(s).RequiresExactMatch("metadata.name")`: terms
/// split on unescaped `,`, each `k=v`, `k==v` or `k!=v`, `\` escaping.
fn exact_name(selector: &str) -> Result<Option<String>, ClassifyError> {
    let mut found = None;
    for term in split_unescaped(selector, ',') {
        let term = term.trim();
        if term.is_empty() {
            continue;
        }
        let (key, op, value) = split_term(term).ok_or(ClassifyError::Query(
            "fieldSelector has a term without an operator",
        ))?;
        let value = unescape_selector_value(value)
            .ok_or(ClassifyError::Query("fieldSelector has an invalid escape"))?;
        if found.is_none() && key.trim() == "metadata.name" && op != "!=" {
            found = Some(value);
        }
    }
    Ok(found)
}

fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            c if c == sep => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// `k!=v`, `k==v`, `k=v`, in the order Go's selector parser tries them.
fn split_term(term: &str) -> Option<(&str, &'static str, &str)> {
    for op in ["!=", "==", "="] {
        if let Some(i) = find_unescaped(term, op) {
            return Some((&term[..i], op, &term[i + op.len()..]));
        }
    }
    None
}

fn find_unescaped(s: &str, needle: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if s[i..].starts_with(needle) {
            return Some(i);
        }
    }
    None
}

/// Go's `fields.UnescapeValue`: `\\`, `\,` and `\=` only.
fn unescape_selector_value(v: &str) -> Option<String> {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                _ => return None,
            },
            ',' | '=' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// `path.IsValidPathSegmentName`: not `.`/`..`, no `/` or `%`.
fn valid_path_segment_name(name: &str) -> bool {
    name != "." && name != ".." && !name.contains(['/', '%'])
}

/// [`classify`] for a parsed request target.
pub fn classify_uri(method: &Method, uri: &http::Uri) -> Result<RequestInfo, ClassifyError> {
    classify(method, uri.path(), uri.query())
}

#[cfg(test)]
#[path = "classify_tests.rs"]
mod tests;
