//! The one outbound HTTPS client of stepmesh: the CA's Kubernetes verifiers
//! (TokenReview, the ServiceAccount issuer's JWKS) and the sidecar's step-up
//! JWKS fetches, `stepmesh login`'s OIDC calls). Trusts the roots it is
//! given, sends an optional bearer token, bounds time (10 s) and body size
//! (1 MiB).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The in-cluster CA file Kubernetes mounts into every pod.
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The in-cluster ServiceAccount token Kubernetes mounts into every pod.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// How long one request may take, connect included.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body accepted (a JWKS or TokenReview is a few KiB).
const MAX_BODY: usize = 1 << 20;

/// Why an HTTPS client could not be built or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The CA file is missing or holds no certificate.
    #[error("CA file {path}: {reason}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The TLS client could not be set up.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The URL is not usable.
    #[error("bad URL {0:?}")]
    Url(String),
    /// The request failed or timed out.
    #[error("{0}")]
    Request(String),
    /// The answer's body is larger than the client reads.
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
}

/// A response: status, headers and body (redirects are not followed).
pub struct Response {
    /// HTTP status.
    pub status: http::StatusCode,
    /// Headers (a redirect's `Location`, for one).
    pub headers: http::HeaderMap,
    /// Body bytes (at most 1 MiB).
    pub body: Bytes,
}

/// An HTTPS client trusting a fixed set of roots.
#[derive(Clone)]
pub struct HttpsClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpsClient")
    }
}

impl HttpsClient {
    /// A client trusting only the roots in `ca_file` (the Kubernetes API
    /// server's CA).
    pub fn new(ca_file: &Path) -> Result<Self, HttpError> {
        let mut roots = rustls::RootCertStore::empty();
        add_pem_roots(&mut roots, ca_file)?;
        Self::with_roots(roots)
    }

    /// A client trusting `roots` (TLS 1.2 or 1.3, as API servers and
    /// identity providers may still offer 1.2; HTTP/1.1 or HTTP/2).
    pub fn with_roots(roots: rustls::RootCertStore) -> Result<Self, HttpError> {
        let config = client_config(roots)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Sends a request; `body` makes it a POST of JSON, else a GET.
    pub async fn send(
        &self,
        url: &str,
        bearer: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Response, HttpError> {
        let method = if body.is_some() {
            http::Method::POST
        } else {
            http::Method::GET
        };
        let body = body.map(|b| ("application/json", b));
        self.request(method, url, bearer, body).await
    }

    /// POSTs `fields` as `application/x-www-form-urlencoded` (OAuth 2.0
    /// token and device authorization endpoints, RFC 6749 / RFC 8628).
    pub async fn post_form(
        &self,
        url: &str,
        fields: &[(&str, &str)],
    ) -> Result<Response, HttpError> {
        let body = form_encode(fields).into_bytes();
        let form = Some(("application/x-www-form-urlencoded", body));
        self.request(http::Method::POST, url, None, form).await
    }

    /// Sends `method` with an optional `(content type, body)`: the calls of
    /// a Kubernetes controller (server-side apply is a PATCH of
    /// `application/apply-patch+yaml`, a Lease update a PUT, a prune a DELETE).
    pub async fn request(
        &self,
        method: http::Method,
        url: &str,
        bearer: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Response, HttpError> {
        let accept = "application/json, application/jwk-set+json";
        self.request_accepting(method, url, bearer, body, accept)
            .await
    }

    /// As [`HttpsClient::request`], asking for `accept` (a Kubernetes
    /// metadata-only list, for one).
    pub async fn request_accepting(
        &self,
        method: http::Method,
        url: &str,
        bearer: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
        accept: &str,
    ) -> Result<Response, HttpError> {
        let uri: http::Uri = url.parse().map_err(|_| HttpError::Url(url.to_owned()))?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::ACCEPT, accept);
        if let Some(token) = bearer {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = match body {
            Some((content_type, body)) => req
                .header(http::header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(body))),
            None => req.body(Full::new(Bytes::new())),
        }
        .map_err(|e| HttpError::Request(e.to_string()))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Request(error_chain(&e)))?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        HttpError::TooLarge(MAX_BODY)
                    } else {
                        HttpError::Request(format!("reading the body: {e}"))
                    }
                })?
                .to_bytes();
            Ok(Response {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .map_err(|_| HttpError::Request(format!("no answer within {TIMEOUT:?}")))?
    }
}

/// The TLS client settings of every outbound HTTPS call (this client, the
/// Kubernetes gateway's upstream): aws-lc-rs, rustls' safe defaults, `roots`.
pub fn client_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, HttpError> {
    if roots.is_empty() {
        return Err(HttpError::Tls("no trusted roots".into()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Adds the certificates of the PEM file `path` to `roots`; a file with
/// none is an error naming the file.
pub fn add_pem_roots(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), HttpError> {
    let ca_err = |reason: String| HttpError::Ca {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
    let certs = crate::pem::decode_certs(&pem).map_err(ca_err)?;
    if certs.is_empty() {
        return Err(ca_err("no certificate".into()));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
    }
    Ok(())
}

/// `application/x-www-form-urlencoded`: every byte but the unreserved ones
/// (RFC 3986 §2.3) percent-encoded, so a value never needs the `+` rule.
pub fn form_encode(fields: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (name, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        percent_encode_into(&mut out, name);
        out.push('=');
        percent_encode_into(&mut out, value);
    }
    out
}

/// Decodes `application/x-www-form-urlencoded` text (a body or a query
/// string): `+` is a space, `%XX` a byte, the result UTF-8; fields in order.
pub fn form_decode(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(name)?, percent_decode(value)?))
        })
        .collect()
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bad = || format!("bad percent-encoding in {text:?}");
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next().ok_or_else(bad)?, bytes.next().ok_or_else(bad)?];
                let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

fn percent_encode_into(out: &mut String, text: &str) {
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 15)]));
        }
    }
}

/// An error and its sources on one line ("connection refused" is deep inside).
/// An error and its sources, `: `-joined (hyper hides the cause in them).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn form_fields_are_percent_encoded() {
        let body = super::form_encode(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("acr_values", "a b&c=d+é"),
        ]);
        assert_eq!(
            body,
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code\
             &acr_values=a%20b%26c%3Dd%2B%C3%A9"
        );
        let back = super::form_decode(&body).unwrap();
        assert_eq!(back[1], ("acr_values".into(), "a b&c=d+é".into()));
        let fields = super::form_decode("a+b=%20c&d").unwrap();
        assert_eq!(
            fields,
            vec![("a b".into(), " c".into()), ("d".into(), String::new())]
        );
        for bad in ["%G1", "a=%4", "a=%FF"] {
            assert!(super::form_decode(bad).is_err(), "{bad}");
        }
    }
}
