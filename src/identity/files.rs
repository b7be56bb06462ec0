//! Identity source 2: SVID, key and bundle from files written by an outside
//! issuer (SPIRE helper, cert-manager csi-driver-spiffe). Polled (which also
//! sees Kubernetes' symlink swaps); a change is loaded whole or not at all.
//! At start, missing files are waited for (`--wait-for-files`) and files
//! that exist but cannot be used stop the sidecar.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use stepmesh_ca::svid::TrustBundle;

use super::store::{CertStore, StoreError, Svid};
use super::StartWait;
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
    /// At start, how long a missing file is waited for.
    pub wait: Duration,
}

impl FileSource {
    /// Loads the files now and whenever their contents change, forever.
    /// Returns only if the first load cannot work (see [`Self::first`]).
    pub async fn run(
        self,
        store: Arc<CertStore>,
        metrics: IdentityMetrics,
    ) -> anyhow::Result<Infallible> {
        let mut seen = Seen::Content(self.first(&store, &metrics).await?);
        loop {
            tokio::time::sleep(self.poll).await;
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
                                store.set_trouble(format!("SVID files refused: {e}"));
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
                        store.set_trouble(format!("SVID files unreadable: {e}"));
                    }
                }
            }
        }
    }

    /// The first load: a missing file is waited for; files that exist but
    /// cannot be read or are refused (not PEM, no SPIFFE ID, a key that is
    /// not the leaf's, a chain the bundle does not verify) are a
    /// configuration error naming the file — once the same contents were
    /// refused twice a poll apart, so a set caught half-written by a writer
    /// that replaces the files one by one is just read again. Returns the
    /// fingerprint of what was loaded.
    async fn first(
        &self,
        store: &CertStore,
        metrics: &IdentityMetrics,
    ) -> anyhow::Result<[u8; 32]> {
        let mut wait = StartWait::new(self.wait, self.poll);
        let mut refused = None;
        loop {
            let files = match self.read().await {
                Ok(files) => files,
                Err(FilesError::Read { path, source }) if super::is_missing(&source) => {
                    wait.missing(self.flag(&path), &path, store).await?;
                    continue;
                }
                Err(e) => return Err(crate::exit::config(e)),
            };
            let fingerprint = fingerprint(&files);
            match self.load(files).and_then(|svid| Ok(store.publish(svid)?)) {
                Ok(info) => {
                    metrics.renewal("files", true);
                    metrics.set_expiry(super::unix_secs(info.not_after));
                    tracing::info!(id = %info.id, serial = %info.serial, "SVID loaded from files");
                    return Ok(fingerprint);
                }
                Err(e) if refused == Some(fingerprint) => {
                    metrics.renewal("files", false);
                    return Err(crate::exit::config(self.name_files(e)));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "SVID files refused; reading them again in case they were being written");
                    store.set_trouble(format!("SVID files refused: {e}"));
                    refused = Some(fingerprint);
                }
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// The flag a path was given with.
    fn flag(&self, path: &Path) -> &'static str {
        if path == self.cert {
            "--cert"
        } else if path == self.key {
            "--key"
        } else {
            "--bundle"
        }
    }

    /// `err` with the files it is about (a [`StoreError`] names none).
    fn name_files(&self, err: FilesError) -> anyhow::Error {
        let (cert, key, bundle) = (
            self.cert.display(),
            self.key.display(),
            self.bundle.display(),
        );
        match err {
            FilesError::Store(e @ StoreError::Key(_)) => {
                anyhow::anyhow!("--key {key} with --cert {cert}: {e}")
            }
            FilesError::Store(e @ StoreError::Invalid(_)) => {
                anyhow::anyhow!("--cert {cert} with --bundle {bundle}: {e}")
            }
            FilesError::Store(e @ StoreError::TrustDomain { .. }) => {
                anyhow::anyhow!("--cert {cert}: {e}")
            }
            // These name their file already.
            e => e.into(),
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
        let chain: Vec<CertificateDer<'static>> =
            stepmesh_ca::pem::decode_certs(&cert).map_err(|e| pem_err(&self.cert, e))?;
        let leaf = chain
            .first()
            .ok_or_else(|| pem_err(&self.cert, "no CERTIFICATE block".into()))?;
        let id = super::spiffe_id_of(leaf)
            .ok_or_else(|| pem_err(&self.cert, "leaf has no SPIFFE ID URI SAN".into()))?;
        let key: PrivateKeyDer<'static> =
            stepmesh_ca::pem::decode_private_key(&key).map_err(|e| pem_err(&self.key, e))?;
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
