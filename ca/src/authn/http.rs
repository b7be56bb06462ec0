//! The small HTTPS client the Kubernetes verifiers share: trusts only the
//! given CA file, sends an optional bearer token, bounds time and body size.

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
    /// The URL is not usable.
    #[error("bad URL {0:?}")]
    Url(String),
    /// The request failed or timed out.
    #[error("{0}")]
    Request(String),
}

/// A response: status and body.
pub struct Response {
    /// HTTP status.
    pub status: http::StatusCode,
    /// Body bytes (at most 1 MiB).
    pub body: Bytes,
}

/// HTTPS client trusting one CA file.
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
    /// A client trusting the roots in `ca_file` (TLS 1.2 or 1.3, as API
    /// servers may still offer 1.2).
    pub fn new(ca_file: &Path) -> Result<Self, HttpError> {
        let ca_err = |reason: String| HttpError::Ca {
            path: ca_file.to_owned(),
            reason,
        };
        let pem = std::fs::read(ca_file).map_err(|e| ca_err(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in crate::pem::decode_certs(&pem).map_err(ca_err)? {
            roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(ca_err("no certificate".into()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ca_err(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
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
        let uri: http::Uri = url.parse().map_err(|_| HttpError::Url(url.to_owned()))?;
        let mut req = http::Request::builder()
            .uri(uri)
            .header(http::header::ACCEPT, "application/json");
        if let Some(token) = bearer {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = match body {
            Some(body) => req
                .method(http::Method::POST)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body))),
            None => req.method(http::Method::GET).body(Full::new(Bytes::new())),
        }
        .map_err(|e| HttpError::Request(e.to_string()))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Request(error_chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| HttpError::Request(format!("reading the body: {e}")))?
                .to_bytes();
            Ok(Response { status, body })
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .map_err(|_| HttpError::Request(format!("no answer within {TIMEOUT:?}")))?
    }
}

/// An error and its sources on one line ("connection refused" is deep inside).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
