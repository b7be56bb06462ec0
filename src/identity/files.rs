//! Identity source 2: SVID, key and bundle from files written by an outside
//! issuer (SPIRE helper, cert-manager csi-driver-spiffe). Polled (which also
//! sees Kubernetes' symlink swaps); a change is loaded whole or not at all.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use stepmesh_ca::svid::TrustBundle;

use super::store::{CertStore, StoreError, Svid};
use crate::metrics::IdentityMetrics;

/// Why a set of files was not loaded (the previous SVID stays in use).
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// Which file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not the PEM it should be.
    #[error("{path}: {what}")]
    Pem {
        /// Which file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The bundle does not parse.
    #[error("bundle {path}: {source}")]
    Bundle {
        /// Which file.
        path: PathBuf,
        /// The parse error.
        source: stepmesh_ca::svid::BundleError,
    },
    /// The material is inconsistent or invalid.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `--cert F --key F --bundle F`.
#[derive(Debug, Clone)]
pub struct FileSource {
    /// SVID chain PEM, leaf first.
    pub cert: PathBuf,
    /// Private key PEM.
    pub key: PathBuf,
    /// Trust bundle PEM.
    pub bundle: PathBuf,
    /// Poll interval.
    pub poll: Duration,
}

impl FileSource {
    /// Loads the files now and whenever their contents change, forever.
    pub async fn run(self, store: Arc<CertStore>, metrics: IdentityMetrics) {
        let mut seen = Seen::Nothing;
        loop {
            match self.read().await {
                Ok(files) => {
                    let fingerprint = fingerprint(&files);
                    if seen != Seen::Content(fingerprint) {
                        seen = Seen::Content(fingerprint);
                        match self.load(files).and_then(|svid| Ok(store.publish(svid)?)) {
                            Ok(info) => {
                                metrics.renewal("files", true);
                                metrics.set_expiry(super::unix_secs(info.not_after));
                                tracing::info!(id = %info.id, serial = %info.serial, "SVID loaded from files");
                            }
                            Err(e) => {
                                metrics.renewal("files", false);
                                tracing::warn!(error = %e, "SVID files refused; keeping the current SVID");
                            }
                        }
                    }
                }
                Err(e) => {
                    // Counted once per outage, not once per poll.
                    if seen != Seen::Unreadable {
                        seen = Seen::Unreadable;
                        metrics.renewal("files", false);
                        tracing::warn!(error = %e, "SVID files unreadable; keeping the current SVID");
                    }
                }
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    async fn read(&self) -> Result<[Vec<u8>; 3], FilesError> {
        let read = |path: PathBuf| async move {
            tokio::fs::read(&path)
                .await
                .map_err(|source| FilesError::Read { path, source })
        };
        Ok([
            read(self.cert.clone()).await?,
            read(self.key.clone()).await?,
            read(self.bundle.clone()).await?,
        ])
    }

    fn load(&self, [cert, key, bundle]: [Vec<u8>; 3]) -> Result<Svid, FilesError> {
        let pem_err = |path: &PathBuf, what: String| FilesError::Pem {
            path: path.clone(),
            what,
        };
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| pem_err(&self.cert, e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| pem_err(&self.cert, "no CERTIFICATE block".into()))?;
        let id = crate::tls::spiffe_id_of(leaf)
            .ok_or_else(|| pem_err(&self.cert, "leaf has no SPIFFE ID URI SAN".into()))?;
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key.as_slice())
            .map_err(|e| pem_err(&self.key, e.to_string()))?
            .ok_or_else(|| pem_err(&self.key, "no PRIVATE KEY block".into()))?;
        let bundle_pem =
            String::from_utf8(bundle).map_err(|_| pem_err(&self.bundle, "not UTF-8 PEM".into()))?;
        let bundle =
            TrustBundle::from_pem(id.trust_domain().clone(), &bundle_pem).map_err(|source| {
                FilesError::Bundle {
                    path: self.bundle.clone(),
                    source,
                }
            })?;
        Ok(Svid { chain, key, bundle })
    }
}

/// What the last poll found, so each change is handled (and counted) once.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Nothing polled yet.
    Nothing,
    /// A file could not be read.
    Unreadable,
    /// These contents (SHA-256 over the three files).
    Content([u8; 32]),
}

fn fingerprint(files: &[Vec<u8>; 3]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for file in files {
        ctx.update(&(file.len() as u64).to_be_bytes());
        ctx.update(file);
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}
