//! Step-up authentication on sensitive routes: JWKS providers (cached,
//! refreshed, last good keys kept), JWT verification (RFC 8725), route
//! requirements (acr, amr, claims, maxAge, binding to the peer) and the
//! RFC 6750 / RFC 9470 challenges. [`gate::decide`] is the whole decision.

mod cache;
pub mod challenge;
mod fetch;
pub mod gate;
/// JWKS key sets: the one parser, `stepmesh_ca::jwt::keys`.
pub use stepmesh_ca::jwt::keys as jwks;
mod metrics;
pub mod pending;
mod provider;
pub mod require;
pub mod testing;
/// Token verification: the one verifier, `stepmesh_ca::jwt::verify`.
pub use stepmesh_ca::jwt::verify;

use std::sync::Arc;

use arc_swap::ArcSwap;

/// Reads the mesh's JWT-SVID JWK set (the sidecar's CertStore: `None`
/// until the CA sent one): the keys of `jwks: {mesh: true}` providers.
/// A function, so step-up stays below identity.
pub type MeshJwks = Arc<dyn Fn() -> Option<Arc<String>> + Send + Sync>;

pub use fetch::FetchError;
pub use gate::{decide, GateDecision, Outcome, RequestInfo};
pub use metrics::StepUpMetrics;
pub use provider::Provider;
pub use require::{x5t_s256, Peer};
pub use stepmesh_ca::jwt::{TokenError, VerifiedToken};

use crate::policy::{Policy, ProviderConfig};

/// The providers in use, shared by every request. A provider lives as long
/// as some policy names it with the same configuration, so a policy reload
/// that leaves a provider unchanged keeps its keys and token cache.
pub struct StepUp {
    providers: ArcSwap<Vec<Arc<Provider>>>,
    create: tokio::sync::Mutex<()>,
    metrics: StepUpMetrics,
    mesh: Option<MeshJwks>,
}

impl std::fmt::Debug for StepUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepUp")
            .field("providers", &self.providers.load().len())
            .field("mesh_keys", &self.mesh.is_some())
            .finish_non_exhaustive()
    }
}

impl StepUp {
    /// An empty registry reporting to `metrics`.
    pub fn new(metrics: StepUpMetrics) -> StepUp {
        StepUp {
            providers: ArcSwap::from_pointee(Vec::new()),
            create: tokio::sync::Mutex::new(()),
            metrics,
            mesh: None,
        }
    }

    /// Gives `jwks: {mesh: true}` providers the mesh's key set (a sidecar's
    /// CertStore); without it they hold no keys and refuse (`no_keys`).
    pub fn with_mesh_jwks(mut self, read: MeshJwks) -> StepUp {
        self.mesh = Some(read);
        self
    }

    /// The metric families.
    pub fn metrics(&self) -> &StepUpMetrics {
        &self.metrics
    }

    /// The provider for `config`, started (first key fetch awaited) if new.
    pub async fn provider(&self, config: &Arc<ProviderConfig>) -> Arc<Provider> {
        if let Some(p) = self.find(config) {
            return p;
        }
        let _one_at_a_time = self.create.lock().await;
        if let Some(p) = self.find(config) {
            return p;
        }
        // Boxed: starting a provider fetches keys (an HTTPS client future of
        // several KiB); inline, it would size every request's future, and
        // with it every idle HTTP/1 connection's task.
        let provider = Box::pin(Provider::start(
            config.clone(),
            self.metrics.clone(),
            self.mesh.clone(),
        ))
        .await;
        let mut next: Vec<_> = self
            .providers
            .load()
            .iter()
            .filter(|p| p.config().name != config.name)
            .cloned()
            .collect();
        next.push(provider.clone());
        self.providers.store(Arc::new(next));
        provider
    }

    /// Starts every provider of `policy` ahead of the first request.
    pub async fn sync(&self, policy: &Policy) {
        for config in policy.providers() {
            self.provider(config).await;
        }
    }

    fn find(&self, config: &Arc<ProviderConfig>) -> Option<Arc<Provider>> {
        self.providers
            .load()
            .iter()
            .find(|p| Arc::ptr_eq(p.config(), config) || **p.config() == **config)
            .cloned()
    }
}

#[cfg(test)]
#[path = "keys_tests.rs"]
mod keys_tests;

#[cfg(test)]
#[path = "mesh_tests.rs"]
mod mesh_tests;
