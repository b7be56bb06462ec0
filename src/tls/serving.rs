//! A serving certificate for our HTTPS endpoints (the injector webhook, the
//! Kubernetes gateway): loaded from PEM files, TLS 1.3 only,
//! and swapped atomically when the files change (polled, so a Secret volume's
//! symlink swap is seen too). A bad new pair is refused and the old one kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// Why a certificate pair could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        cause: std::io::Error,
    },
    /// A file holds no usable PEM of the expected kind.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the pair (unsupported key, or key and cert differ).
    #[error("certificate and key: {0}")]
    Rustls(rustls::Error),
}

/// Resolves every handshake to the current certificate.
#[derive(Debug)]
pub struct ReloadingCert {
    current: ArcSwap<CertifiedKey>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl ReloadingCert {
    /// Loads the pair now; fails when it is unusable.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let (cert_pem, key_pem) = (read(cert_path)?, read(key_path)?);
        let key = certified_key(cert_path, &cert_pem, key_path, &key_pem)?;
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(key),
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
        }))
    }

    /// Polls the files every `interval` and swaps in a changed, valid pair.
    /// Runs until the runtime stops.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut last = (
            tokio::fs::read(&self.cert_path).await.ok(),
            tokio::fs::read(&self.key_path).await.ok(),
        );
        loop {
            tokio::time::sleep(interval).await;
            let now = (
                tokio::fs::read(&self.cert_path).await.ok(),
                tokio::fs::read(&self.key_path).await.ok(),
            );
            if now == last {
                continue;
            }
            if let (Some(cert), Some(key)) = (&now.0, &now.1) {
                match certified_key(&self.cert_path, cert, &self.key_path, key) {
                    Ok(pair) => {
                        self.current.store(Arc::new(pair));
                        tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded");
                    }
                    // A half-written pair (cert updated, key not yet) lands
                    // here; the next poll sees the finished pair.
                    Err(err) => {
                        tracing::warn!(%err, "new serving certificate refused; keeping the old one")
                    }
                }
            }
            last = now;
        }
    }

    /// DER of the leaf being served (tests compare it across reloads).
    pub fn leaf(&self) -> Vec<u8> {
        self.current
            .load()
            .cert
            .first()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A TLS 1.3-only server config offering `h2` and `http/1.1`.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|cause| TlsError::Read {
        path: path.to_owned(),
        cause,
    })
}

fn certified_key(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let certs = stepmesh_ca::pem::decode_certs(cert_pem).map_err(|what| TlsError::Pem {
        path: cert_path.to_owned(),
        what,
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: cert_path.to_owned(),
            what: "no CERTIFICATE block".into(),
        });
    }
    let key = stepmesh_ca::pem::decode_private_key(key_pem).map_err(|what| TlsError::Pem {
        path: key_path.to_owned(),
        what,
    })?;
    // from_der also checks that the key belongs to the leaf.
    CertifiedKey::from_der(certs, key, &provider()).map_err(TlsError::Rustls)
}
