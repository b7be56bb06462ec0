//! The CA's Prometheus metrics (prefix `stepmesh_ca_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of one signing decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignLabels {
    /// `issued`, `unauthenticated`, `denied`, `invalid`, `rate_limited`, `unavailable`, `error`.
    pub outcome: &'static str,
    /// The verifier that decided (`join-token`, `k8s-jwks`, ...).
    pub verifier: &'static str,
    /// A stable reason label (`ok` when issued).
    pub reason: &'static str,
}

/// Labels of one revocation admin call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevocationLabels {
    /// `revoke`, `unrevoke`, `rotate`.
    pub call: &'static str,
    /// `ok`, `refused`.
    pub outcome: &'static str,
}

/// Labels of one shared-state event (`--shared-state`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SharedStateLabels {
    /// `applied` (a change another replica made), `written`, `conflict`
    /// (a write lost to another replica, retried), `malformed`, `unavailable`.
    pub event: &'static str,
}

/// Everything the CA counts.
#[derive(Clone)]
pub struct CaMetrics {
    /// Signing decisions.
    pub sign: Family<SignLabels, Counter>,
    /// Time to handle one Sign call, authentication included.
    pub sign_duration: Histogram,
    /// The trust bundle's sequence number (increases on each change).
    pub bundle_sequence: Gauge,
    /// When the issuing certificate expires, Unix seconds.
    pub issuer_expiry: Gauge,
    /// Revoke and unrevoke calls.
    pub revocations: Family<RevocationLabels, Counter>,
    /// Shared-state reads, writes and their failures.
    pub shared: Family<SharedStateLabels, Counter>,
}

impl CaMetrics {
    /// Registers the metrics in `registry` under `stepmesh_ca_`.
    pub fn new(registry: &mut Registry) -> Self {
        let this = Self {
            sign: Family::default(),
            sign_duration: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            bundle_sequence: Gauge::default(),
            issuer_expiry: Gauge::default(),
            revocations: Family::default(),
            shared: Family::default(),
        };
        let reg = registry.sub_registry_with_prefix("stepmesh_ca");
        reg.register("sign", "Signing decisions by outcome", this.sign.clone());
        reg.register(
            "sign_duration_seconds",
            "Time to handle one Sign call",
            this.sign_duration.clone(),
        );
        reg.register(
            "trust_bundle_sequence",
            "Sequence number of the served trust bundle",
            this.bundle_sequence.clone(),
        );
        reg.register(
            "issuer_expiry_timestamp_seconds",
            "notAfter of the issuing certificate",
            this.issuer_expiry.clone(),
        );
        reg.register(
            "revocation_calls",
            "Revoke, unrevoke and rotate calls by outcome",
            this.revocations.clone(),
        );
        reg.register(
            "shared_state_events",
            "Shared-state (--shared-state) events: applied, written, conflict, malformed, unavailable",
            this.shared.clone(),
        );
        this
    }

    /// Counts one shared-state event.
    pub fn shared_state(&self, event: &'static str) {
        self.shared
            .get_or_create(&SharedStateLabels { event })
            .inc();
    }

    /// Counts one revoke, unrevoke or rotate call.
    pub fn revocation(&self, call: &'static str, outcome: &'static str) {
        self.revocations
            .get_or_create(&RevocationLabels { call, outcome })
            .inc();
    }
}
