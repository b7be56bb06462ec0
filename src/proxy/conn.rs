//! What every connection handler shares: the process-wide state, the
//! contexts handed to the protocol seams, and the access-log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use stepmesh_ca::spiffe_id::SpiffeId;
use tokio::time::Instant;

use crate::accesslog::{AccessLog, ConnectionRecord, Timestamp};
use crate::identity::store::CertStore;
use crate::metrics::{Direction, ProxyMetrics};
pub use crate::net::{close_gracefully, Outcome};
use crate::policy::{OutboundAction, PolicyWatch, Protocol};

/// Deadlines of one connection's phases.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TLS handshake.
    pub handshake: Duration,
    /// No byte either way.
    pub idle: Duration,
    /// Dialling the app or the peer.
    pub connect: Duration,
}

/// Process-wide state every connection handler reads.
#[derive(Debug)]
pub struct Shared {
    /// Our SVID and trust bundle.
    pub store: Arc<CertStore>,
    /// The live policy.
    pub policy: PolicyWatch,
    /// Connection metrics.
    pub metrics: ProxyMetrics,
    /// The JSON access log.
    pub access_log: AccessLog,
    /// Phase deadlines.
    pub timeouts: Timeouts,
    /// The HTTP layer (route and step-up decisions, pools).
    pub http: Arc<crate::http::HttpLayer>,
    /// Connections open at once, all listeners and inbound tunnels
    /// together (`--max-connections`).
    pub connections: Arc<crate::net::caps::ConnectionBudget>,
    /// Inbound connections open at once per peer identity.
    pub peer_cap: Arc<crate::net::caps::PerKeyCap<Arc<SpiffeId>>>,
    /// App-facing (outbound) connections open at once per source address.
    pub source_cap: Arc<crate::net::caps::PerKeyCap<std::net::IpAddr>>,
    /// `--opaque-ports`: destination ports kept opaque TCP.
    pub opaque_ports: Vec<u16>,
    /// Live re-authorization of established inbound connections.
    pub reauth: super::reauth::Reauth,
    /// Opaque TCP rides HTTP/2 CONNECT tunnels between sidecars (not
    /// `--no-tunnel`).
    pub tunnel: bool,
    /// The `--inbound` listeners' policy ports and apps, set once they are
    /// bound: a tunnel names the port it is for.
    pub inbound_apps: std::sync::OnceLock<std::collections::HashMap<u16, Arc<str>>>,
}

/// An authenticated, authorized inbound connection, as the protocol layer
/// (L4 forwarding now, HTTP later) receives it.
#[derive(Debug, Clone)]
pub struct InboundContext {
    /// The client workload's verified SPIFFE ID (shared: each tunnel on a
    /// peer's mesh connection holds the connection's).
    pub peer_id: Arc<SpiffeId>,
    /// SHA-256 of the client's leaf certificate (RFC 8705 `x5t#S256`
    /// binding). Shared, as `peer_id`: 24 bytes less in every tunnel's
    /// context, which took its box from 224 bytes to 192.
    pub peer_cert_sha256: Arc<[u8; 32]>,
    /// The policy port (listener port, or original destination port).
    pub port: u16,
    /// Where the app listens.
    pub app: Arc<str>,
    /// The client's socket address.
    pub client: SocketAddr,
    /// What a peer sidecar's connection carries, by the ALPN negotiated in
    /// the mTLS handshake (`None`: not a sidecar-to-sidecar connection).
    pub mesh: Option<crate::http::MeshKind>,
    /// How the policy says to treat this port.
    pub protocol: Protocol,
    /// Transparent mode: the app is the original destination (a tunnel's
    /// port then picks the port on the pod's own address).
    pub transparent: bool,
    /// What the connection re-checks itself with when the policy or the
    /// trust bundle changes.
    pub grant: super::reauth::Grant,
}

/// An accepted outbound connection from the local app, before dialling.
#[derive(Debug, Clone)]
pub struct OutboundContext {
    /// The app's socket address.
    pub client: SocketAddr,
    /// The peer (explicit) or original destination (transparent), host:port.
    pub dst: Arc<str>,
    /// Destination port (the policy port of outbound rules).
    pub port: u16,
    /// mTLS or passthrough (deny never reaches the seam).
    pub action: OutboundAction,
    /// An opaque port (`--opaque-ports`, `outbound.opaquePorts`): bytes
    /// forwarded as they are, never detected as HTTP.
    pub opaque: bool,
    /// The identity the peer must have, as configured (for logs).
    pub expected: Arc<str>,
}

/// The access-log fields known before the protocol phase.
#[derive(Debug)]
pub struct ConnLog<'a> {
    /// Inbound or outbound.
    pub direction: Direction,
    /// The client's address.
    pub client: SocketAddr,
    /// App or peer address.
    pub dst: &'a str,
    /// The policy port.
    pub port: u16,
    /// When the connection was accepted.
    pub started: Instant,
}

impl ConnLog<'_> {
    /// Writes the connection's line.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        log: &AccessLog,
        peer: Option<&SpiffeId>,
        decision: &'static str,
        reason: &str,
        rule: Option<&str>,
        outcome: &Outcome,
    ) {
        log.log(&ConnectionRecord {
            ts: Timestamp::now(),
            direction: self.direction.as_str(),
            peer_id: peer.map(SpiffeId::as_str),
            src: self.client.to_string(),
            dst: self.dst,
            port: self.port,
            decision,
            reason,
            rule,
            bytes_in: outcome.bytes_in,
            bytes_out: outcome.bytes_out,
            duration_ms: self.started.elapsed().as_millis() as u64,
            error: outcome.error.as_ref().map(|(_, detail)| detail.clone()),
        });
    }
}

/// The metric/log label of a decision.
pub fn decision_label(allow: bool, would_deny: bool) -> &'static str {
    match (allow, would_deny) {
        (false, _) => "deny",
        (true, true) => "would_deny",
        (true, false) => "allow",
    }
}
