//! Identity source 1: the stepmesh CA. The key is made in memory by the CA
//! client, the token file is re-read before every request (kubelet rotates
//! it), renewal happens at half the SVID's remaining life with jitter, and a
//! failure is retried with exponential backoff while the current SVID keeps
//! serving. At start, a missing bundle or token file is waited for
//! (`--wait-for-files`) and a bundle the client cannot use stops the sidecar.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use stepmesh_ca::client::{CaClient, Credential, IssuedSvid};
use stepmesh_ca::spiffe_id::TrustDomain;

use super::store::{CertStore, Svid};
use super::StartWait;
use crate::metrics::IdentityMetrics;

/// First retry delay after a failure; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Renew no sooner than this after an issuance (a CA answering with a
/// nearly expired SVID must not make us spin).
const MIN_RENEW: Duration = Duration::from_millis(500);

/// Why one issuance attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum CaSourceError {
    /// The CA bundle or token file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// Which file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The token file is empty.
    #[error("token file {0} is empty")]
    EmptyToken(PathBuf),
    /// The CA refused or could not be reached.
    #[error(transparent)]
    Ca(#[from] stepmesh_ca::client::ClientError),
    /// The SVID was refused locally.
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
}

/// `--ca ADDR --ca-bundle F --token-file F --trust-domain TD [--svid-ttl D]`.
#[derive(Debug, Clone)]
pub struct CaSource {
    /// CA address, host:port.
    pub addr: String,
    /// PEM roots the CA's TLS certificate chains to.
    pub ca_bundle: PathBuf,
    /// The credential (projected ServiceAccount token or join token).
    pub token_file: PathBuf,
    /// Our trust domain; SVIDs of any other are refused.
    pub trust_domain: TrustDomain,
    /// Lifetime to ask for (None: the CA's default).
    pub ttl: Option<Duration>,
    /// At start, how long a missing bundle or token file is waited for.
    pub wait: Duration,
}

/// How often a missing file is looked for at start.
const START_POLL: Duration = Duration::from_millis(500);

impl CaSource {
    /// Obtains the SVID and renews it, forever. Returns only if the start
    /// cannot work (see [`Self::client`]).
    pub async fn run(
        self,
        store: Arc<CertStore>,
        metrics: IdentityMetrics,
    ) -> anyhow::Result<Infallible> {
        let client = self
            .client(&store)
            .await?
            .count_failovers(metrics.ca_failovers());
        let renew_now = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(watch_bundle(
            client.clone(),
            store.clone(),
            renew_now.clone(),
        ));
        let mut backoff = MIN_BACKOFF;
        loop {
            let attempt = self.attempt(&client, &store).await;
            let wait = match attempt {
                Ok(not_after) => {
                    metrics.renewal("ca", true);
                    metrics.set_expiry(super::unix_secs(not_after));
                    backoff = MIN_BACKOFF;
                    renew_in(SystemTime::now(), not_after)
                }
                Err(e) => {
                    metrics.renewal("ca", false);
                    let wait = jitter(backoff, 0.2);
                    tracing::warn!(error = %e, retry_in = ?wait, serving = store.is_loaded(), "SVID renewal failed; keeping the current SVID");
                    store.set_trouble(format!(
                        "the last request to the CA {} failed: {e}",
                        self.addr
                    ));
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                // `stepmesh ca rotate`: renew now, keeping connections
                // (the new SVID serves the next handshakes).
                () = renew_now.notified() => tracing::info!("the CA asked for a re-issue: renewing now"),
            }
        }
    }

    /// The CA client, once `--ca-bundle` and `--token-file` exist (each
    /// waited for up to `--wait-for-files`). A file that cannot be read, or
    /// a bundle with no usable certificate, is a configuration error naming
    /// the file. The client connects lazily: the CA is not dialled here.
    async fn client(&self, store: &CertStore) -> anyhow::Result<CaClient> {
        let mut wait = StartWait::new(self.wait, START_POLL);
        loop {
            let pem = match tokio::fs::read_to_string(&self.ca_bundle).await {
                Ok(pem) => pem,
                Err(e) if super::is_missing(&e) => {
                    wait.missing("--ca-bundle", &self.ca_bundle, store).await?;
                    continue;
                }
                Err(e) => return Err(file_error("--ca-bundle", &self.ca_bundle, e)),
            };
            // Read, not stat: a token we may not read is as wrong as a bundle.
            match tokio::fs::read(&self.token_file).await {
                Ok(_) => {}
                Err(e) if super::is_missing(&e) => {
                    wait.missing("--token-file", &self.token_file, store)
                        .await?;
                    continue;
                }
                Err(e) => return Err(file_error("--token-file", &self.token_file, e)),
            }
            let client = CaClient::connect(&self.addr, &pem).map_err(|e| {
                crate::exit::config(anyhow::anyhow!(
                    "--ca {} with --ca-bundle {}: {e}",
                    self.addr,
                    self.ca_bundle.display()
                ))
            })?;
            return Ok(client.expect_trust_domain(self.trust_domain.clone()));
        }
    }

    async fn attempt(
        &self,
        client: &CaClient,
        store: &Arc<CertStore>,
    ) -> Result<SystemTime, CaSourceError> {
        let token = read(&self.token_file).await?;
        let token = token.trim();
        if token.is_empty() {
            return Err(CaSourceError::EmptyToken(self.token_file.clone()));
        }
        let issued = client
            .issue(&Credential::Token(token.to_owned()), self.ttl)
            .await?;
        let IssuedSvid {
            id,
            chain,
            key,
            bundle,
            not_after,
            serial,
        } = issued;
        store.publish(Svid { chain, key, bundle })?;
        tracing::info!(%id, %serial, not_after = %crate::accesslog::rfc3339(not_after), "SVID issued by the CA");
        Ok(not_after)
    }
}

/// Follows the CA's trust bundle stream (roots can rotate long before our
/// next renewal), reconnecting with backoff, forever.
async fn watch_bundle(
    client: CaClient,
    store: Arc<CertStore>,
    renew_now: Arc<tokio::sync::Notify>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match client.watch_trust_bundle().await {
            Ok(mut watch) => {
                backoff = MIN_BACKOFF;
                while let Some(update) = watch.next().await {
                    match update {
                        Ok(update) => {
                            store.update_revocations(update.revoked);
                            if rotation_due(&store, &update.rotations) {
                                renew_now.notify_one();
                            }
                            if !update.jwks_json.is_empty() {
                                store.update_jwks(update.jwks_json);
                            }
                            if let Err(e) = store.update_bundle(update.bundle) {
                                tracing::warn!(error = %e, "trust bundle from the CA refused");
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "trust bundle stream ended");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "trust bundle stream unavailable"),
        }
        tokio::time::sleep(jitter(backoff, 0.2)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Whether a rotation the CA streams covers our SVID: for our ID (or all),
/// and asked after our SVID was issued (both times on the CA's clock: the
/// CA backdates notBefore by `signer::BACKDATE`).
fn rotation_due(store: &CertStore, rotations: &[stepmesh_ca::proto::v1::Rotation]) -> bool {
    if rotations.is_empty() {
        return false;
    }
    let (Some(info), Some(key)) = (store.info(), store.certified_key()) else {
        return false;
    };
    let Some(leaf) = key.cert.first() else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return false;
    };
    let backdate = i64::try_from(stepmesh_ca::signer::BACKDATE.as_secs()).unwrap_or(0);
    let issued_at = cert.validity().not_before.timestamp() + backdate;
    rotations
        .iter()
        .any(|r| (r.id.is_empty() || r.id == info.id.as_str()) && issued_at < r.issued_before)
}

async fn read(path: &PathBuf) -> Result<String, CaSourceError> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|source| CaSourceError::Read {
            path: path.clone(),
            source,
        })
}

/// A file given with `flag` cannot be read: a configuration error.
fn file_error(flag: &str, path: &std::path::Path, err: std::io::Error) -> anyhow::Error {
    crate::exit::config(anyhow::anyhow!("{flag} {}: {err}", path.display()))
}

/// When to renew: half the remaining lifetime, ±10 % so a fleet started
/// together does not renew together.
pub fn renew_in(now: SystemTime, not_after: SystemTime) -> Duration {
    let remaining = not_after.duration_since(now).unwrap_or_default();
    jitter(remaining / 2, 0.1).max(MIN_RENEW)
}

/// `d` scaled by a random factor in `[1 - spread, 1 + spread]`.
fn jitter(d: Duration, spread: f64) -> Duration {
    d.mul_f64(1.0 - spread + 2.0 * spread * fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_near_half_life() {
        let now = SystemTime::now();
        for _ in 0..100 {
            let d = renew_in(now, now + Duration::from_secs(3600));
            assert!(
                d >= Duration::from_secs(1620) && d <= Duration::from_secs(1980),
                "{d:?}"
            );
        }
        assert_eq!(renew_in(now, now - Duration::from_secs(1)), MIN_RENEW);
    }
}
