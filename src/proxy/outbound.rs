//! Outbound: accept plaintext from the local app, decide what the
//! destination gets (mTLS, passthrough, deny), then hand over to the
//! protocol layer, which dials.
//!
//! **Seam for the HTTP layer:** [`serve`] runs after accept and
//! classification, before any dial; the HTTP layer can take over there
//! (HTTP/1 relayed over [`connect_peer`]'s connection, or pooled HTTP/2
//! between sidecars) and fall back to [`forward_tcp`].

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::conn::{close_gracefully, ConnLog, OutboundContext, Outcome, Shared};
use super::listener::ConnGuard;
use super::seam::Served;
use crate::http::tunnel::Tunnel;
use crate::http::MeshConnectors;
use crate::metrics::Direction;
use crate::net::dial;
use crate::net::forward::{forward, ForwardError, Forwarded};
use crate::net::idle::OwnTimer;
use crate::policy::{Mode, OutboundAction, SpiffeId};
use crate::tls::{failure, spiffe_id_of};
use futures_util::future::Either;

/// Where an outbound listener's connections go.
#[derive(Debug, Clone)]
pub enum OutboundTarget {
    /// `--outbound LISTEN=PEER@ID`: always mTLS to PEER, which must be ID.
    Peer {
        /// The peer sidecar, host:port.
        peer: Arc<str>,
        /// The ID pattern as configured.
        expected: Arc<str>,
    },
    /// `--transparent`: the original destination, classified by the policy's
    /// outbound rules; an mTLS destination must present an SVID of our trust
    /// domain (any workload: the destination's identity is not configured).
    OriginalDst,
}

/// What a connection's destination gets, decided before any dial.
struct Route {
    dst: Arc<str>,
    port: u16,
    action: OutboundAction,
    rule: Option<Arc<str>>,
    expected: Arc<str>,
    would_deny: bool,
}

/// One outbound listener's handler.
pub struct Outbound {
    shared: Arc<Shared>,
    connector: TlsConnector,
    /// The same TLS identity and verifier, offering the mesh ALPNs for the
    /// pooled sidecar-to-sidecar HTTP/2 connections (HTTP, tunnels).
    mesh: MeshConnectors,
    target: OutboundTarget,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// A handler originating TLS with `config` (its verifier holds the
    /// expected identity, its session cache the resumable sessions).
    pub fn new(
        shared: Arc<Shared>,
        config: Arc<rustls::ClientConfig>,
        target: OutboundTarget,
    ) -> Self {
        let mesh = MeshConnectors::new(&config, shared.tunnel);
        Self {
            shared,
            connector: TlsConnector::from(config),
            mesh,
            target,
        }
    }

    /// Where this connection goes and how, or `None` when a transparent
    /// connection has no original destination (counted and logged).
    fn classify(&self, app: &TcpStream, client: SocketAddr) -> Option<Route> {
        let shared = &self.shared;
        match &self.target {
            OutboundTarget::Peer { peer, expected } => Some(Route {
                dst: peer.clone(),
                port: peer
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse().ok())
                    .unwrap_or(0),
                action: OutboundAction::Mtls,
                rule: None,
                expected: expected.clone(),
                would_deny: false,
            }),
            OutboundTarget::OriginalDst => {
                let dst = match super::transparent::original_dst(app) {
                    Ok(dst) => dst,
                    Err(e) => {
                        shared.metrics.error(Direction::Outbound, "original_dst");
                        tracing::warn!(%client, error = %e, "outbound: no original destination");
                        return None;
                    }
                };
                let policy = shared.policy.current();
                let (mut action, rule) = policy.outbound(dst);
                // Audit mode: what enforce would refuse leaves unmeshed.
                let would_deny = action == OutboundAction::Deny && policy.mode() == Mode::Audit;
                if would_deny {
                    action = OutboundAction::Passthrough;
                }
                let expected = shared
                    .store
                    .trust_domain()
                    .map(|td| format!("spiffe://{}/*", td.as_str()))
                    .unwrap_or_default();
                Some(Route {
                    dst: dst.to_string().into(),
                    port: dst.port(),
                    action,
                    rule: Some(rule),
                    expected: expected.into(),
                    would_deny,
                })
            }
        }
    }

    /// Handles one accepted connection to its end (`guard` held to it),
    /// or hands it, its tunnel open, to a task of its own (see
    /// `seam::Served`).
    ///
    /// The connection is admitted (caps, classification, the policy's
    /// decision) before its future is made, so that the future keeps what
    /// the decision made and not also its inputs: every outbound
    /// connection's task holds this future, an idle HTTP/1 one for good.
    /// A plain `fn` around an `async` block: an `async fn` stores its
    /// arguments twice (rust-lang/rust#62958).
    pub fn handle(
        self: Arc<Self>,
        app: TcpStream,
        client: SocketAddr,
        guard: ConnGuard,
    ) -> impl std::future::Future<Output = ()> + Send {
        let Some(admitted) = self.admit(&app, client) else {
            return Either::Left(std::future::ready(()));
        };
        Either::Right(async move {
            let served = serve(
                &self.shared,
                &self.connector,
                &self.mesh,
                &admitted.ctx,
                app,
            )
            .await;
            let finish = Finish {
                client: admitted.ctx.client,
                dst: admitted.ctx.dst,
                port: admitted.ctx.port,
                started: admitted.started,
                rule: admitted.rule,
                would_deny: admitted.would_deny,
                action: admitted.ctx.action,
            };
            match served {
                Served::Done(outcome) => finish.write(&self.shared, &outcome),
                Served::Tunnel(app, tunnel) => {
                    let held = Held {
                        _open: admitted.open,
                        _slot: admitted.slot,
                        _guard: guard,
                    };
                    tokio::spawn(carry(self, app, tunnel, finish, held));
                }
            }
        })
    }

    /// Admits one accepted connection: under the per-source cap, with a
    /// destination, not denied by the policy (each refusal counted and
    /// logged here); `None` when it is closed unserved.
    fn admit(&self, app: &TcpStream, client: SocketAddr) -> Option<Admitted> {
        let shared = &self.shared;
        let started = Instant::now();
        let open = shared.metrics.open_guard(Direction::Outbound);
        let slot = match shared.source_cap.acquire(&client.ip()) {
            Ok(slot) => slot,
            Err(reached) => {
                shared.metrics.rejected(Direction::Outbound, "source_limit");
                if reached.log {
                    tracing::warn!(%client, limit = reached.limit, "outbound: per-source connection cap reached; refusing (--max-connections-per-source)");
                }
                return None;
            }
        };
        let Route {
            dst,
            port,
            action,
            rule,
            expected,
            would_deny,
        } = self.classify(app, client)?;
        if action == OutboundAction::Deny {
            shared.metrics.connection(Direction::Outbound, "", "deny");
            tracing::info!(%client, %dst, rule = rule.as_deref(), "outbound denied by policy");
            let outcome = Outcome::default();
            conn_log(client, &dst, port, started).write(
                &shared.access_log,
                None,
                "deny",
                "outbound_deny",
                rule.as_deref(),
                &outcome,
            );
            return None;
        }
        if would_deny {
            shared
                .metrics
                .connection(Direction::Outbound, "", "would_deny");
        }
        let opaque =
            shared.opaque_ports.contains(&port) || shared.policy.current().opaque_port(port);
        let ctx = OutboundContext {
            client,
            dst,
            port,
            action,
            opaque,
            expected,
        };
        Some(Admitted {
            ctx,
            started,
            rule,
            would_deny,
            open,
            slot,
        })
    }
}

/// An admitted outbound connection: where it goes, what its log line will
/// say of the decision, and what it holds while open.
struct Admitted {
    ctx: OutboundContext,
    started: Instant,
    rule: Option<Arc<str>>,
    would_deny: bool,
    open: crate::metrics::OpenGuard,
    slot: Option<crate::net::caps::Slot<std::net::IpAddr>>,
}

/// What an outbound connection holds to its end besides its sockets: its
/// count in `stepmesh_connections_open`, its place under the per-source
/// cap and under the listener's limit (with the drain's watch).
struct Held {
    _open: crate::metrics::OpenGuard,
    _slot: Option<crate::net::caps::Slot<std::net::IpAddr>>,
    _guard: ConnGuard,
}

/// The access-log line and metrics of an outbound connection once served.
struct Finish {
    client: SocketAddr,
    dst: Arc<str>,
    port: u16,
    started: Instant,
    rule: Option<Arc<str>>,
    would_deny: bool,
    action: OutboundAction,
}

impl Finish {
    fn write(self, shared: &Shared, outcome: &Outcome) {
        let (decision, reason) = match (&outcome.error, self.action) {
            (None, _) if outcome.refused => {
                shared.metrics.rejected(Direction::Outbound, "peer_refused");
                ("refused", "peer_refused")
            }
            (Some((reason, _)), _) => {
                shared.metrics.error(Direction::Outbound, reason);
                ("error", *reason)
            }
            (None, _) if self.would_deny => ("would_deny", "outbound_deny"),
            (None, OutboundAction::Passthrough) => ("allow", "passthrough"),
            (None, _) => ("allow", "mtls"),
        };
        conn_log(self.client, &self.dst, self.port, self.started).write(
            &shared.access_log,
            outcome.peer_id.as_ref(),
            decision,
            reason,
            self.rule.as_deref(),
            outcome,
        );
    }
}

/// An opaque app connection's task once its tunnel is open: the copy loop
/// to the end, then the connection's log line. Its own task, so that an
/// idle opaque connection holds this state alone (see `seam::Served`); a
/// plain `fn` around an `async move` block, so that its arguments are
/// stored once (rust-lang/rust#62958).
#[allow(clippy::manual_async_fn)] // on purpose: the arguments are stored once
fn carry(
    handler: Arc<Outbound>,
    mut app: TcpStream,
    mut tunnel: Tunnel,
    finish: Finish,
    held: Held,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let outcome = super::tunnel::forward_app(&handler.shared, &mut app, &mut tunnel).await;
        finish.write(&handler.shared, &outcome);
        drop(held);
    }
}

/// The access-log fields known before the protocol phase, gathered where
/// the line is written: a `ConnLog` kept across the connection would copy
/// them into every idle connection's task.
fn conn_log(client: SocketAddr, dst: &str, port: u16, started: Instant) -> ConnLog<'_> {
    ConnLog {
        direction: Direction::Outbound,
        client,
        dst,
        port,
        started,
    }
}

/// **The outbound protocol seam**: a classified connection from the app,
/// not yet dialled. The HTTP layer may take over mTLS destinations here.
/// (A plain `fn` returning the seam's future: one task level less, see
/// `inbound::serve`.)
pub fn serve<'a>(
    shared: &'a Shared,
    connector: &'a TlsConnector,
    mesh: &'a MeshConnectors,
    ctx: &'a OutboundContext,
    app: TcpStream,
) -> impl std::future::Future<Output = Served> + Send + 'a {
    super::seam::outbound(shared, connector, mesh, ctx, app)
}

/// Opaque TCP: dial the destination (mTLS or plain) and copy both ways.
pub async fn forward_tcp(
    shared: &Shared,
    connector: &TlsConnector,
    ctx: &OutboundContext,
    mut app: TcpStream,
) -> Outcome {
    let counters = shared.metrics.byte_counters(Direction::Outbound);
    if ctx.action == OutboundAction::Passthrough {
        let mut tcp = match dial_destination(shared, ctx).await {
            Ok(tcp) => tcp,
            Err(outcome) => return outcome,
        };
        return Outcome::forwarded(
            forward(
                &mut app,
                &mut tcp,
                OwnTimer::new(shared.timeouts.idle),
                &counters,
            )
            .await,
        );
    }
    // Boxed: the dial and handshake states are large and live only while
    // connecting; inline they would size every idle connection's task.
    let (mut tls, peer_id) = match Box::pin(connect_peer(shared, connector, ctx)).await {
        Ok(connected) => connected,
        Err(outcome) => return outcome,
    };
    let done = forward(
        &mut app,
        &mut tls,
        OwnTimer::new(shared.timeouts.idle),
        &counters,
    )
    .await;
    if matches!(done.error, Some(ForwardError::Idle(_))) {
        close_gracefully(&mut tls).await;
    }
    let refused = peer_refused(&done);
    let mut outcome = Outcome::forwarded(done);
    if refused {
        // What failed afterwards (our writes to the closed peer) is moot.
        outcome.error = None;
        outcome.refused = true;
    }
    outcome.peer_id = peer_id;
    outcome
}

async fn dial_destination(shared: &Shared, ctx: &OutboundContext) -> Result<TcpStream, Outcome> {
    dial(&ctx.dst, shared.timeouts.connect).await.map_err(|e| {
        tracing::warn!(dst = %ctx.dst, error = %e, "outbound: destination unreachable");
        Outcome::failed("peer_connect", e)
    })
}

/// An mTLS connection to the destination's sidecar, its identity checked
/// (the verifier in `connector`, and again for a resumed session), counted
/// in the handshake metrics; the failure as the connection's outcome.
pub async fn connect_peer(
    shared: &Shared,
    connector: &TlsConnector,
    ctx: &OutboundContext,
) -> Result<(TlsStream<TcpStream>, Option<SpiffeId>), Outcome> {
    let tcp = dial_destination(shared, ctx).await?;
    let name = server_name(&ctx.dst);
    // Boxed: the handshake state (the client connection mid-handshake plus
    // its deadline) is the task's largest; on the heap only while it runs,
    // it no longer sizes every idle connection's task (-0.8 KiB).
    let handshake = Box::pin(tokio::time::timeout(
        shared.timeouts.handshake,
        connector.connect(name, tcp),
    ))
    .await;
    let mut tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = failure::reason(&e);
            shared
                .metrics
                .handshake_failure(Direction::Outbound, reason);
            tracing::warn!(dst = %ctx.dst, expected = %ctx.expected, reason, error = %e, "outbound handshake failed");
            return Err(Outcome::failed(reason, e));
        }
        Err(_) => {
            shared
                .metrics
                .handshake_failure(Direction::Outbound, "timeout");
            return Err(Outcome::failed("timeout", "handshake timed out"));
        }
    };
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    shared.metrics.handshake(Direction::Outbound, resumed);
    if let Err(reason) = crate::tls::check_resumed(tls.get_ref().1, &shared.store) {
        shared
            .metrics
            .handshake_failure(Direction::Outbound, reason);
        close_gracefully(&mut tls).await;
        return Err(Outcome::failed(reason, "resumed session no longer valid"));
    }
    let peer_id = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(spiffe_id_of);
    if let Some(peer) = &peer_id {
        shared
            .metrics
            .connection(Direction::Outbound, peer.as_str(), "allow");
    }
    Ok((tls, peer_id))
}

/// The peer sidecar ended the connection on purpose (TLS close_notify: a
/// TLS stream reports EOF only then) without sending a byte: what its
/// policy deny does (its access log names the rule). Our writes failing
/// after that are a consequence, not the cause. A peer app that closes
/// without ever answering looks the same from here.
pub(super) fn peer_refused(done: &Forwarded) -> bool {
    let after = match &done.error {
        None => true,
        Some(ForwardError::Io { side, .. }) => *side == "write server",
        Some(ForwardError::Idle(_)) => false,
    };
    done.b_closed && done.b_to_a == 0 && after
}

/// The TLS server name for a `host:port` destination: an IP (no SNI sent)
/// or a DNS name. It keys the session cache; identity is checked by SPIFFE
/// ID, not by this name.
pub fn server_name(dst: &str) -> ServerName<'static> {
    let host = dst.rsplit_once(':').map_or(dst, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ServerName::IpAddress(ip.into());
    }
    ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()))
}

#[cfg(test)]
mod tests {
    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, E, F: std::future::Future>(
        _: impl FnOnce(A, B, C, D, E) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle opaque connection through a tunnel holds this task alone.
    /// Its allocation is the future and about 104 bytes, rounded up to
    /// 128: up to 664 bytes, a 768-byte task (release: 648 bytes; debug:
    /// 656). Before, the connection's first task (640 bytes) held the
    /// boxed tunnel path (640 more).
    #[test]
    fn a_tunnelled_connections_task_stays_small() {
        let task = future_size(super::carry);
        eprintln!("tunnelled connection task future: {task} B");
        assert!(task <= 664, "tunnelled connection task future: {task} B");
    }
}
