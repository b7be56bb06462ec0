//! The identity provider's wire helpers: form bodies and queries
//! (`application/x-www-form-urlencoded`), JSON answers and OAuth errors.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::IdpError;

/// Largest request body read (a form of a few fields).
const MAX_FORM: usize = 64 * 1024;

/// A decoded `application/x-www-form-urlencoded` body.
pub(super) struct Form(Vec<(String, String)>);

impl Form {
    /// The value of field `name`.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The request's form body (at most 64 KiB).
pub(super) async fn read_form(req: Request<Incoming>) -> Result<Form, String> {
    let body = Limited::new(req.into_body(), MAX_FORM)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    let text = std::str::from_utf8(&body).map_err(|_| "the form is not UTF-8".to_owned())?;
    Form::parse(text)
}

impl Form {
    /// Parses a form body or a query string; a field sent twice is refused
    /// (RFC 6749 §3.1).
    pub(super) fn parse(text: &str) -> Result<Form, String> {
        let fields = stepmesh_ca::https::form_decode(text)?;
        for (i, (name, _)) in fields.iter().enumerate() {
            if fields[..i].iter().any(|(n, _)| n == name) {
                return Err(format!("{name} is sent more than once"));
            }
        }
        Ok(Form(fields))
    }
}

pub(super) fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: &str,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub(super) fn json_reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", &body.to_string())
}

/// RFC 6749 §5.1: token responses are not cached.
pub(super) fn no_store(mut resp: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub(super) fn oauth_error(
    status: StatusCode,
    error: &str,
    description: &str,
) -> Response<Full<Bytes>> {
    no_store(json_reply(
        status,
        &json!({"error": error, "error_description": description}),
    ))
}

pub(super) fn server_error(err: &IdpError) -> Response<Full<Bytes>> {
    oauth_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        &err.to_string(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    #[test]
    fn forms_parse_once_per_field() {
        let form = super::Form::parse("a=1&b=x%3Dy&c").unwrap();
        assert_eq!(
            (form.get("b"), form.get("c"), form.get("d")),
            (Some("x=y"), Some(""), None)
        );
        assert!(
            super::Form::parse("a=1&a=2").is_err(),
            "RFC 6749 §3.1: once"
        );
        assert!(super::Form::parse("a=%4").is_err());
    }
}
