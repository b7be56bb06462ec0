//! Getting a JWKS document: re-reading a file, or GET over HTTPS with the
//! system roots plus an optional CA file. Bounded in size and time.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;

use crate::policy::JwksSource;

/// A JWKS larger than this is refused (real ones are a few KiB).
const MAX_JWKS: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a fetch failed (the old keys stay).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// File read failed.
    #[error("reading {path}: {source}")]
    File {
        /// The JWKS file.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// TLS roots could not be set up.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// Connecting, sending or reading failed.
    #[error("GET {url}: {message}")]
    Http {
        /// The JWKS URL.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// Fetches one provider's JWKS document.
pub(crate) enum Fetcher {
    File(PathBuf),
    Https(Box<Https>),
}

/// A JWKS URL and the TLS client that fetches it.
pub(crate) struct Https {
    url: String,
    uri: http::Uri,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl Fetcher {
    /// Builds the fetcher; for URLs, a TLS client trusting the system roots
    /// and `ca_file` (read off the runtime threads).
    pub(crate) async fn new(source: &JwksSource) -> Result<Fetcher, FetchError> {
        let (url, ca_file) = match source {
            JwksSource::File(path) => return Ok(Fetcher::File(path.clone())),
            JwksSource::Url { url, ca_file } => (url.clone(), ca_file.clone()),
        };
        let uri: http::Uri = url.parse().map_err(|e| FetchError::Http {
            url: url.clone(),
            message: format!("{e}"),
        })?;
        let roots = tokio::task::spawn_blocking(move || roots(ca_file))
            .await
            .map_err(|e| FetchError::Tls(e.to_string()))??;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| FetchError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Fetcher::Https(Box::new(Https { url, uri, client })))
    }

    /// The document's bytes.
    pub(crate) async fn fetch(&self) -> Result<Bytes, FetchError> {
        match self {
            Fetcher::File(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|source| FetchError::File {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Bytes::from(bytes))
            }
            Fetcher::Https(https) => {
                let Https { url, uri, client } = &**https;
                let err = |message: String| FetchError::Http {
                    url: url.clone(),
                    message,
                };
                let req = http::Request::get(uri.clone())
                    .header(
                        http::header::ACCEPT,
                        "application/json, application/jwk-set+json",
                    )
                    .body(Empty::new())
                    .map_err(|e| err(e.to_string()))?;
                let get = async {
                    let resp = client
                        .request(req)
                        .await
                        .map_err(|e| err(format!("{e:#}")))?;
                    if resp.status() != http::StatusCode::OK {
                        return Err(err(format!("status {}", resp.status())));
                    }
                    let body = Limited::new(resp.into_body(), MAX_JWKS)
                        .collect()
                        .await
                        .map_err(|e| err(format!("reading body: {e}")))?;
                    Ok(body.to_bytes())
                };
                tokio::time::timeout(FETCH_TIMEOUT, get)
                    .await
                    .map_err(|_| err(format!("no answer within {FETCH_TIMEOUT:?}")))?
            }
        }
    }
}

/// The system's roots, loaded once per process.
fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        if !found.errors.is_empty() {
            tracing::debug!(errors = ?found.errors, "some system roots could not be loaded");
        }
        found.certs
    })
}

fn roots(ca_file: Option<PathBuf>) -> Result<rustls::RootCertStore, FetchError> {
    let mut store = rustls::RootCertStore::empty();
    let _ = store.add_parsable_certificates(native_roots().iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(&path).map_err(|source| FetchError::File {
            path: path.clone(),
            source,
        })?;
        let certs = stepmesh_ca::pem::decode_certs(&pem)
            .map_err(|e| FetchError::Tls(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(FetchError::Tls(format!(
                "{}: no certificates",
                path.display()
            )));
        }
        for cert in certs {
            store
                .add(cert)
                .map_err(|e| FetchError::Tls(format!("{}: {e}", path.display())))?;
        }
    }
    Ok(store)
}
