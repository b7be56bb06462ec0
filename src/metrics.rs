//! Prometheus metrics of the sidecar. One `Registry` per process: each
//! component builds its metrics struct from `&mut Registry` at start, then the
//! registry is frozen behind an `Arc` for `/metrics`. Label sets are resolved
//! once per connection; the data path only bumps atomics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::net::forward::ByteCounters;

/// Which way a connection goes through the sidecar.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Peer sidecar → us → local app (mTLS terminated here).
    Inbound,
    /// Local app → us → peer (mTLS originated here, or passthrough).
    Outbound,
}

impl Direction {
    /// The label value, also used in the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    direction: &'static str,
    peer: String,
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    direction: &'static str,
    flow: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// Connection-level metrics of the listeners.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    connections: Family<ConnectionLabels, Counter>,
    open: Family<DirectionLabel, Gauge>,
    rejected: Family<ReasonLabels, Counter>,
    handshake_failures: Family<ReasonLabels, Counter>,
    errors: Family<ReasonLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    handshakes: Family<KindLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    direction: &'static str,
    kind: &'static str,
}

impl ProxyMetrics {
    /// Registers the listener metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            connections: Family::default(),
            open: Family::default(),
            rejected: Family::default(),
            handshake_failures: Family::default(),
            errors: Family::default(),
            bytes: Family::default(),
            handshakes: Family::default(),
        };
        registry.register(
            "stepmesh_connections",
            "Connections authorized or refused, by peer SPIFFE ID and decision",
            m.connections.clone(),
        );
        registry.register(
            "stepmesh_connections_open",
            "Connections open now",
            m.open.clone(),
        );
        registry.register(
            "stepmesh_connections_rejected",
            "Connections closed at accept (limit, draining)",
            m.rejected.clone(),
        );
        registry.register(
            "stepmesh_tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "stepmesh_connection_errors",
            "Connections that ended in an error (dial, idle timeout, I/O)",
            m.errors.clone(),
        );
        registry.register(
            "stepmesh_tls_handshakes",
            "TLS handshakes completed, full or resumed",
            m.handshakes.clone(),
        );
        registry.register(
            "stepmesh_tcp_bytes",
            "Bytes forwarded, client_to_server and server_to_client",
            m.bytes.clone(),
        );
        m
    }

    /// Counts one authorization outcome (`allow`, `deny`, `would_deny`, ...).
    pub fn connection(&self, direction: Direction, peer: &str, decision: &'static str) {
        self.connections
            .get_or_create(&ConnectionLabels {
                direction: direction.as_str(),
                peer: peer.to_owned(),
                decision,
            })
            .inc();
    }

    /// Counts a failed handshake under a stable reason label.
    pub fn handshake_failure(&self, direction: Direction, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                direction: direction.as_str(),
                reason,
            })
            .inc();
    }

    /// Counts a completed handshake: `resumed` or `full`.
    pub fn handshake(&self, direction: Direction, resumed: bool) {
        let kind = if resumed { "resumed" } else { "full" };
        self.handshakes
            .get_or_create(&KindLabels {
                direction: direction.as_str(),
                kind,
            })
            .inc();
    }

    /// Counts a connection refused before any work (`limit`, `draining`).
    pub fn rejected(&self, direction: Direction, reason: &'static str) {
        self.rejected
            .get_or_create(&ReasonLabels {
                direction: direction.as_str(),
                reason,
            })
            .inc();
    }

    /// Counts a connection that ended badly after being accepted.
    pub fn error(&self, direction: Direction, reason: &'static str) {
        self.errors
            .get_or_create(&ReasonLabels {
                direction: direction.as_str(),
                reason,
            })
            .inc();
    }

    /// The byte counters a forwarding loop bumps (resolved once per connection).
    pub fn byte_counters(&self, direction: Direction) -> ByteCounters {
        let get = |flow| {
            self.bytes.get_or_create_owned(&BytesLabels {
                direction: direction.as_str(),
                flow,
            })
        };
        ByteCounters {
            forward: get("client_to_server"),
            backward: get("server_to_client"),
        }
    }

    /// Marks a connection open until the guard drops.
    pub fn open_guard(&self, direction: Direction) -> OpenGuard {
        let gauge = self.open.get_or_create_owned(&DirectionLabel {
            direction: direction.as_str(),
        });
        gauge.inc();
        OpenGuard(gauge)
    }
}

/// Decrements the open-connections gauge on drop.
#[derive(Debug)]
pub struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    source: &'static str,
    outcome: &'static str,
}

/// Metrics of the identity agent (SVID rotation).
#[derive(Debug, Clone)]
pub struct IdentityMetrics {
    expiry: Gauge,
    renewals: Family<OutcomeLabels, Counter>,
    ca_failovers: Counter,
}

impl IdentityMetrics {
    /// Registers the identity metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            expiry: Gauge::default(),
            renewals: Family::default(),
            ca_failovers: Counter::default(),
        };
        registry.register(
            "stepmesh_svid_expiry_timestamp_seconds",
            "Not-after of the SVID in use, Unix seconds",
            m.expiry.clone(),
        );
        registry.register(
            "stepmesh_svid_renewals",
            "SVID renewals (CA) or reloads (files), by outcome",
            m.renewals.clone(),
        );
        registry.register(
            "stepmesh_ca_replica_failovers",
            "Calls to the CA that a replica could not answer and that went on to the next replica",
            m.ca_failovers.clone(),
        );
        m
    }

    /// The failover counter, for the CA client to count in.
    pub fn ca_failovers(&self) -> Counter {
        self.ca_failovers.clone()
    }

    /// Records the not-after of the SVID now in use.
    pub fn set_expiry(&self, unix_secs: i64) {
        self.expiry.set(unix_secs);
    }

    /// Counts a renewal or reload attempt: `source` is `ca` or `files`.
    pub fn renewal(&self, source: &'static str, ok: bool) {
        let outcome = if ok { "success" } else { "failure" };
        self.renewals
            .get_or_create(&OutcomeLabels { source, outcome })
            .inc();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_labels() {
        let mut registry = Registry::default();
        let proxy = ProxyMetrics::new(&mut registry);
        let identity = IdentityMetrics::new(&mut registry);
        proxy.handshake_failure(Direction::Inbound, "expired");
        proxy.connection(Direction::Inbound, "spiffe://td/ns/a/sa/b", "deny");
        proxy.byte_counters(Direction::Outbound).forward.inc_by(42);
        identity.renewal("ca", false);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(
            r#"stepmesh_tls_handshake_failures_total{direction="inbound",reason="expired"} 1"#
        ));
        assert!(text.contains(r#"peer="spiffe://td/ns/a/sa/b",decision="deny"} 1"#));
        assert!(text.contains(
            r#"stepmesh_tcp_bytes_total{direction="outbound",flow="client_to_server"} 42"#
        ));
        assert!(text.contains(r#"stepmesh_svid_renewals_total{source="ca",outcome="failure"} 1"#));
    }
}
