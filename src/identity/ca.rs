//! Identity source 1: the stepmesh CA. The key is made in memory by the CA
//! client, the token file is re-read before every request (kubelet rotates
//! it), renewal happens at half the SVID's remaining life with jitter, and a
//! failure is retried with exponential backoff while the current SVID keeps
//! serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use stepmesh_ca::client::{CaClient, Credential, IssuedSvid};
use stepmesh_ca::spiffe_id::TrustDomain;

use super::store::{CertStore, Svid};
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
}

impl CaSource {
    /// Obtains the SVID and renews it, forever.
    pub async fn run(self, store: Arc<CertStore>, metrics: IdentityMetrics) {
        let mut client: Option<CaClient> = None;
        let mut backoff = MIN_BACKOFF;
        loop {
            let attempt = self.attempt(&mut client, &store).await;
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
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(
        &self,
        client: &mut Option<CaClient>,
        store: &Arc<CertStore>,
    ) -> Result<SystemTime, CaSourceError> {
        let client = match client {
            Some(client) => client,
            None => {
                let pem = read(&self.ca_bundle).await?;
                let new = CaClient::connect(&self.addr, &pem)?
                    .expect_trust_domain(self.trust_domain.clone());
                tokio::spawn(watch_bundle(new.clone(), store.clone()));
                client.insert(new)
            }
        };
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
async fn watch_bundle(client: CaClient, store: Arc<CertStore>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match client.watch_trust_bundle().await {
            Ok(mut watch) => {
                backoff = MIN_BACKOFF;
                while let Some(update) = watch.next().await {
                    match update {
                        Ok(update) => {
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

async fn read(path: &PathBuf) -> Result<String, CaSourceError> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|source| CaSourceError::Read {
            path: path.clone(),
            source,
        })
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
