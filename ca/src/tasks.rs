//! The CA's background tasks: re-reading the bundle sources, the join-token
//! file and the JWKS; re-issuing the serving certificate.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{broadcast, watch};

use crate::authn::Authenticator;
use crate::metrics::CaMetrics;
use crate::server::{read_roots_blocking, write_bundle_blocking, CaConfig};
use crate::service::BundleState;
use crate::signer::Signer;
use crate::svid::TrustBundle;
use crate::tls::{self, ServingCert};

/// Re-reads the bundle sources, the join-token file and (every 5 minutes)
/// the JWKS; publishes a changed bundle to watchers and `bundle.pem`.
pub(crate) async fn poll_sources(
    config: Arc<CaConfig>,
    own_root: rustls_pki_types::CertificateDer<'static>,
    authn: Arc<Authenticator>,
    live: Arc<ArcSwap<TrustBundle>>,
    tx: watch::Sender<Arc<BundleState>>,
    metrics: CaMetrics,
    mut stop: broadcast::Receiver<()>,
) {
    const JWKS_REFRESH: Duration = Duration::from_secs(300);
    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_jwks = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tick.tick() => {}
        }
        match read_roots_blocking(&config, &own_root).await {
            Ok(roots) if roots.as_slice() != live.load().roots() => {
                match TrustBundle::new(config.trust_domain.clone(), roots) {
                    Ok(bundle) => {
                        let pem = bundle.to_pem();
                        if let Err(e) = write_bundle_blocking(&config, pem.clone()).await {
                            tracing::warn!(error = %e, "could not write bundle.pem");
                        }
                        live.store(Arc::new(bundle));
                        let sequence = tx.borrow().sequence + 1;
                        metrics
                            .bundle_sequence
                            .set(i64::try_from(sequence).unwrap_or(i64::MAX));
                        tx.send_replace(Arc::new(BundleState { pem, sequence }));
                        tracing::info!(sequence, "trust bundle changed; sent to watchers");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "new trust bundle refused; keeping the old one")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not read the trust bundle sources; keeping the old bundle")
            }
        }
        if authn.join_tokens().is_some() {
            match reload_join(authn.clone()).await {
                Ok(Some(n)) => tracing::info!(tokens = n, "join-token file reloaded"),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "join-token file refused; keeping the old tokens")
                }
            }
        }
        if let Some(jwks) = authn.jwks() {
            if last_jwks.elapsed() >= JWKS_REFRESH {
                last_jwks = tokio::time::Instant::now();
                if let Err(e) = jwks.refresh().await {
                    tracing::warn!(error = %e, "JWKS refresh failed; keeping the last keys");
                }
            }
        }
    }
}

async fn reload_join(authn: Arc<Authenticator>) -> Result<Option<usize>, String> {
    tokio::task::spawn_blocking(move || match authn.join_tokens() {
        Some(j) => j.reload_if_changed().map_err(|e| e.to_string()),
        None => Ok(None),
    })
    .await
    .map_err(|e| e.to_string())?
}

pub(crate) async fn refresh_serving_cert(
    serving: Arc<ServingCert>,
    signer: Arc<Signer>,
    mut stop: broadcast::Receiver<()>,
) {
    let mut tick = tokio::time::interval(tls::SERVING_CERT_REFRESH);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tick.tick() => {
                match serving.refresh(&signer) {
                    Ok(()) => tracing::info!("CA serving certificate re-issued"),
                    Err(e) => tracing::warn!(error = %e, "could not re-issue the serving certificate"),
                }
            }
        }
    }
}

/// Drops revocations (and issued serials) whose certificates expired, once
/// a minute.
pub(crate) async fn prune_revocations(
    revocations: Arc<crate::revocation::Revocations>,
    mut stop: broadcast::Receiver<()>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = revocations.prune().await {
            tracing::warn!(error = %e, "pruning expired revocations");
        }
    }
}

/// `--shared-state`: applies what other replicas stored, every
/// [`crate::shared_state::POLL`]; a failure (the API server out of reach, a
/// malformed object) keeps the last good state and is said once per cause.
pub(crate) async fn follow_shared_state(
    revocations: Arc<crate::revocation::Revocations>,
    metrics: CaMetrics,
    mut stop: broadcast::Receiver<()>,
) {
    let mut tick = tokio::time::interval(crate::shared_state::POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tick.tick() => {}
        }
        match revocations.refresh_shared().await {
            Ok(applied) => {
                if let Some(resource_version) = applied {
                    metrics.shared_state("applied");
                    let revocations = revocations.list().len();
                    tracing::info!(target: "stepmesh_ca::audit", decision = "shared_state", outcome = "applied", resource_version, revocations, "state applied from the shared object");
                }
                if failing.take().is_some() {
                    tracing::info!("shared state readable again");
                }
            }
            Err(e) => {
                let why = e.to_string();
                if !matches!(e, crate::shared_state::SharedError::Malformed { .. }) {
                    metrics.shared_state("unavailable");
                }
                if failing.as_deref() != Some(why.as_str()) {
                    tracing::error!(error = %why, "shared state not applied; serving the last good state (revokes are refused until it can be written)");
                    failing = Some(why);
                }
            }
        }
    }
}
