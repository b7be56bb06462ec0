//! Getting a JWKS document: re-reading a file, or GET over HTTPS (the one
//! HTTPS client, `stepmesh_ca::https`) with the system roots plus an
//! optional CA file. Bounded in size (1 MiB) and time (10 s) by the client.
//! A `jwks: {mesh: true}` provider's keys are read from the sidecar's
//! CertStore instead (the JWK set the CA streams).

use std::path::PathBuf;
use std::sync::OnceLock;

use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use stepmesh_ca::https::{add_pem_roots, HttpsClient};

use super::MeshJwks;
use crate::policy::JwksSource;

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
    /// A mesh provider on a process that holds no JWT-SVID key set (no
    /// CA, or none sent yet).
    #[error("no JWT-SVID key set: {0}")]
    NoMeshKeys(&'static str),
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
    /// The mesh's key set, where this process has one (a sidecar).
    Mesh(Option<MeshJwks>),
}

/// A JWKS URL and the client that fetches it.
pub(crate) struct Https {
    url: String,
    client: HttpsClient,
}

impl Fetcher {
    /// Builds the fetcher; for URLs, a TLS client trusting the system roots
    /// and `ca_file` (read off the runtime threads).
    pub(crate) async fn new(
        source: &JwksSource,
        mesh: Option<&MeshJwks>,
    ) -> Result<Fetcher, FetchError> {
        let (url, ca_file) = match source {
            JwksSource::File(path) => return Ok(Fetcher::File(path.clone())),
            JwksSource::Mesh => return Ok(Fetcher::Mesh(mesh.cloned())),
            JwksSource::Url { url, ca_file } => (url.clone(), ca_file.clone()),
        };
        let roots = tokio::task::spawn_blocking(move || roots(ca_file))
            .await
            .map_err(|e| FetchError::Tls(e.to_string()))??;
        let client = HttpsClient::with_roots(roots).map_err(|e| FetchError::Tls(e.to_string()))?;
        Ok(Fetcher::Https(Box::new(Https { url, client })))
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
                let err = |message: String| FetchError::Http {
                    url: https.url.clone(),
                    message,
                };
                let resp = https
                    .client
                    .send(&https.url, None, None)
                    .await
                    .map_err(|e| err(e.to_string()))?;
                if resp.status != http::StatusCode::OK {
                    return Err(err(format!("status {}", resp.status)));
                }
                Ok(resp.body)
            }
            Fetcher::Mesh(None) => Err(FetchError::NoMeshKeys(
                "only a running sidecar knows the mesh's keys",
            )),
            Fetcher::Mesh(Some(read)) => match read() {
                Some(json) => Ok(Bytes::from(json.as_bytes().to_vec())),
                None => Err(FetchError::NoMeshKeys(
                    "the CA has sent none (or the identity comes from files)",
                )),
            },
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
        add_pem_roots(&mut store, &path).map_err(|e| FetchError::Tls(e.to_string()))?;
    }
    Ok(store)
}
