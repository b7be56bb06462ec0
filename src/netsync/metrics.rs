//! The controller's metrics, on its admin port.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The controller's metrics.
#[derive(Debug, Clone, Default)]
pub(super) struct Metrics {
    pub(super) applied: Counter,
    pub(super) pruned: Counter,
    pub(super) drift: Counter,
    pub(super) errors: Counter,
    pub(super) refused: Counter,
    pub(super) leader: Gauge,
    pub(super) blocked: Gauge,
    pub(super) last_sync: Gauge,
}

impl Metrics {
    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "stepmesh_netpol_applied",
            "NetworkPolicies applied (created or changed)",
            self.applied.clone(),
        );
        r.register(
            "stepmesh_netpol_pruned",
            "owned NetworkPolicies deleted: no longer computed",
            self.pruned.clone(),
        );
        r.register(
            "stepmesh_netpol_drift_repaired",
            "owned NetworkPolicies put back after an edit or a delete",
            self.drift.clone(),
        );
        r.register(
            "stepmesh_netpol_policy_errors",
            "policy ConfigMaps refused in a sync",
            self.errors.clone(),
        );
        r.register(
            "stepmesh_netpol_objects_refused",
            "NetworkPolicy applies or deletes the API server refused (reported on the policy ConfigMap)",
            self.refused.clone(),
        );
        r.register(
            "stepmesh_netpol_blocked_configmaps",
            "broken policy ConfigMaps with no valid version seen by this process: their NetworkPolicies stay as they are and other workloads' egress towards their namespaces is kept",
            self.blocked.clone(),
        );
        r.register(
            "stepmesh_netpol_leader",
            "1 while this replica holds the Lease",
            self.leader.clone(),
        );
        r.register(
            "stepmesh_netpol_last_sync_timestamp_seconds",
            "end of the last sync that applied and pruned everything (unix time)",
            self.last_sync.clone(),
        );
    }
}
