//! Step-up metrics: JWKS fetches by provider, trigger and result, keys held,
//! challenges by reason, token cache hits.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FetchLabels {
    pub provider: String,
    /// `start`, `schedule`, `unknown_kid`.
    pub trigger: &'static str,
    /// `ok`, `error` (unreachable / status), `empty`, `malformed`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProviderLabel {
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CacheLabel {
    pub result: &'static str,
}

/// The step-up metric families (cheap to clone: `Arc`s inside).
#[derive(Clone, Debug, Default)]
pub struct StepUpMetrics {
    pub(crate) fetches: Family<FetchLabels, Counter>,
    pub(crate) keys: Family<ProviderLabel, Gauge>,
    pub(crate) challenges: Family<ReasonLabel, Counter>,
    pub(crate) cache: Family<CacheLabel, Counter>,
}

impl StepUpMetrics {
    /// Registers the families under `stepmesh_stepup_*`.
    pub fn register(registry: &mut Registry) -> StepUpMetrics {
        let m = StepUpMetrics::default();
        registry.register(
            "stepmesh_stepup_jwks_fetches",
            "JWKS fetches by provider, trigger (start, schedule, unknown_kid) and result (ok, error, empty, malformed)",
            m.fetches.clone(),
        );
        registry.register(
            "stepmesh_stepup_jwks_keys",
            "Usable keys held per provider",
            m.keys.clone(),
        );
        registry.register(
            "stepmesh_stepup_challenges",
            "Step-up refusals (401/403) by reason",
            m.challenges.clone(),
        );
        registry.register(
            "stepmesh_stepup_token_cache",
            "Verified-token cache lookups by result (hit, miss)",
            m.cache.clone(),
        );
        m
    }

    /// Counts one refusal.
    pub fn challenge(&self, reason: &'static str) {
        self.challenges.get_or_create(&ReasonLabel { reason }).inc();
    }
}
