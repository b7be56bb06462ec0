//! Inbound: terminate mTLS, identify the peer by its SVID, authorize it by
//! the policy, then hand the connection to the port's protocol layer.
//!
//! **Seam for the HTTP layer:** [`serve`] is the one function that decides
//! what happens after authentication and L4 authorization. Today every
//! protocol takes the opaque TCP path; the HTTP layer replaces the
//! `Protocol::Http | Protocol::Auto` arm with its own server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::Either;
use futures_util::FutureExt as _;

use stepmesh_ca::spiffe_id::SpiffeId;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::conn::{close_gracefully, decision_label, ConnLog, InboundContext, Outcome, Shared};
use super::listener::ConnGuard;
use crate::metrics::Direction;
use crate::net::caps::Slot;
use crate::net::dial;
use crate::net::forward::{forward, ForwardError, Until};
use crate::policy::Protocol;
use crate::tls::{cert_sha256, failure};

/// Where an inbound listener's connections go.
#[derive(Debug, Clone)]
pub enum InboundTarget {
    /// `--inbound LISTEN=APP`: a fixed app; the policy port is LISTEN's port.
    App {
        /// The policy port.
        port: u16,
        /// The app's address.
        app: Arc<str>,
    },
    /// `--transparent`: the original destination (the pod's own IP:port).
    OriginalDst,
}

/// The client a handshake verified.
struct Peer {
    /// Shared: the connection's tunnels and its per-peer slot hold it too.
    id: Arc<SpiffeId>,
    cert_sha256: [u8; 32],
    /// The root key its chain ended at (live re-authorization).
    anchor: Option<stepmesh_ca::svid::AnchorKey>,
    /// Its leaf's serial, as `revocation::serial_key` (live re-authorization).
    serial: u64,
    alpn: Option<Vec<u8>>,
    /// Its place under the per-peer connection cap.
    _slot: Option<Slot<Arc<SpiffeId>>>,
}

/// The client a completed handshake proved, or why it does not count
/// (a resumed session no longer valid, no SPIFFE ID).
fn verified_peer(
    conn: &rustls::ServerConnection,
    store: &crate::identity::store::CertStore,
) -> Result<Peer, (&'static str, &'static str)> {
    crate::tls::check_resumed(conn, store)
        .map_err(|reason| (reason, "resumed session no longer valid"))?;
    // The verifier accepted a chain, so a leaf with a SPIFFE ID exists.
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(("no_client_cert", "no client certificate"))?;
    let (id, serial) = crate::identity::id_and_serial_of(leaf)
        .ok_or(("bad_san", "no SPIFFE ID in the client certificate"))?;
    let anchor = conn
        .peer_certificates()
        .zip(store.bundle())
        .and_then(|(chain, bundle)| bundle.anchor_of(chain));
    Ok(Peer {
        id: Arc::new(id),
        cert_sha256: cert_sha256(leaf),
        anchor,
        serial: stepmesh_ca::revocation::serial_key(&serial),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        _slot: None,
    })
}

/// One inbound listener's handler.
pub struct Inbound {
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    /// For `tcp` ports: no ALPN, so no peer's mesh HTTP/2.
    tcp_acceptor: TlsAcceptor,
    target: InboundTarget,
}

/// The TLS configs of inbound listeners: with the ALPN list (`http`,
/// `auto` ports) and without (`tcp` ports).
#[derive(Debug, Clone)]
pub struct InboundConfigs {
    /// ALPN `stepmesh/h2`, `h2`, `http/1.1`.
    pub http: Arc<rustls::ServerConfig>,
    /// No ALPN.
    pub tcp: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Inbound {
    /// A handler terminating TLS with `configs` (chosen by the port's
    /// protocol in the live policy, per connection).
    pub fn new(shared: Arc<Shared>, configs: &InboundConfigs, target: InboundTarget) -> Self {
        Self {
            shared,
            acceptor: TlsAcceptor::from(configs.http.clone()),
            tcp_acceptor: TlsAcceptor::from(configs.tcp.clone()),
            target,
        }
    }

    /// The TLS handshake (with its deadline) and the peer it verified; a
    /// failure is counted by reason and access-logged here.
    async fn authenticate(
        &self,
        tcp: TcpStream,
        log: &ConnLog<'_>,
    ) -> Option<(TlsStream<TcpStream>, Peer)> {
        let shared = &self.shared;
        let refuse = |reason: &'static str, detail: &dyn std::fmt::Display| {
            shared.metrics.handshake_failure(Direction::Inbound, reason);
            tracing::debug!(client = %log.client, reason, error = %detail, "inbound handshake failed");
            let outcome = Outcome::failed(reason, detail);
            log.write(
                &shared.access_log,
                None,
                "handshake_failed",
                reason,
                None,
                &outcome,
            );
            None
        };
        let acceptor = if shared.policy.current().port_protocol(log.port) == Protocol::Tcp {
            &self.tcp_acceptor
        } else {
            &self.acceptor
        };
        let handshake = tokio::time::timeout(shared.timeouts.handshake, acceptor.accept(tcp)).await;
        let mut tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return refuse(failure::reason(&e), &e),
            Err(_) => return refuse("timeout", &"handshake timed out"),
        };
        let (_, conn) = tls.get_ref();
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        shared.metrics.handshake(Direction::Inbound, resumed);
        let refused = match verified_peer(conn, &shared.store) {
            Ok(mut peer) => match shared.peer_cap.acquire(&peer.id) {
                Ok(slot) => {
                    peer._slot = slot;
                    return Some((tls, peer));
                }
                Err(reached) => {
                    shared.metrics.rejected(Direction::Inbound, "peer_limit");
                    if reached.log {
                        tracing::warn!(client = %log.client, peer = %peer.id, limit = reached.limit, "inbound: per-peer connection cap reached; refusing (--max-connections-per-peer)");
                    }
                    None
                }
            },
            Err(failed) => Some(failed),
        };
        close_gracefully(&mut tls).await;
        refused.and_then(|(reason, detail)| refuse(reason, &detail))
    }

    /// Handles one accepted connection to its end (`_guard` held to it).
    pub async fn handle(self: Arc<Self>, tcp: TcpStream, client: SocketAddr, _guard: ConnGuard) {
        let shared = &self.shared;
        let started = Instant::now();
        let _open = shared.metrics.open_guard(Direction::Inbound);
        let (port, app): (u16, Arc<str>) = match &self.target {
            InboundTarget::App { port, app } => (*port, app.clone()),
            InboundTarget::OriginalDst => match super::transparent::original_dst(&tcp) {
                Ok(dst) if super::transparent::is_own_address(&tcp, dst.ip()) => {
                    (dst.port(), dst.to_string().into())
                }
                Ok(dst) => {
                    shared
                        .metrics
                        .error(Direction::Inbound, "foreign_original_dst");
                    tracing::warn!(%client, %dst, "inbound: refused: the original destination is not an address of this pod (a neighbour routed it here)");
                    return;
                }
                Err(e) => {
                    shared.metrics.error(Direction::Inbound, "original_dst");
                    tracing::warn!(%client, error = %e, "inbound: no original destination");
                    return;
                }
            },
        };
        let log = ConnLog {
            direction: Direction::Inbound,
            client,
            dst: &app,
            port,
            started,
        };
        let Some((mut tls, peer)) = self.authenticate(tcp, &log).await else {
            return;
        };
        let Peer {
            id: peer_id,
            cert_sha256: peer_cert_sha256,
            anchor,
            serial,
            alpn,
            _slot,
        } = peer;

        // Read before the decision: a change after it is re-checked.
        let generation = shared.reauth.generation();
        let policy = shared.policy.current();
        let decision = policy.authorize(&peer_id, port);
        let label = decision_label(decision.allow, decision.would_deny);
        // A mesh connection that carries tunnels is counted through them
        // (each decided and counted as an L4 connection) and its requests.
        let kind = crate::http::MeshKind::of(alpn.as_deref());
        let tunnels_only = kind.is_some_and(|k| !k.http);
        if !kind.is_some_and(|k| k.tunnels) {
            shared
                .metrics
                .connection(Direction::Inbound, peer_id.as_str(), label);
        }
        // HTTP connections are served even when denied: each request gets 403.
        let protocol = policy.port_protocol(port);
        if !decision.allow && !super::seam::serves_denied(kind, protocol) {
            tracing::info!(%client, peer = %peer_id, port, rule = %decision.rule, reason = decision.reason, "inbound denied");
            log.write(
                &shared.access_log,
                Some(&peer_id),
                label,
                decision.reason,
                Some(&decision.rule),
                &Outcome::default(),
            );
            // close_notify: the client's sidecar sees a refusal, not an error.
            close_gracefully(&mut tls).await;
            return;
        }
        let grant = super::reauth::Reauth::grant(generation, anchor, serial, decision.allow);
        let ctx = InboundContext {
            peer_id,
            peer_cert_sha256: Arc::new(peer_cert_sha256),
            port,
            app: app.clone(),
            client,
            mesh: kind,
            protocol,
            transparent: matches!(self.target, InboundTarget::OriginalDst),
            // A `tcp` port's tunnels-only connection stays, quiet, for
            // the tunnels a policy allows (each is an app connection,
            // decided and closed on its own). An `http` or `auto` port's is
            // closed as its mesh connection would be: the outbound's idle
            // keep-alive app connections follow it, and so learn of it.
            grant: if tunnels_only && protocol == Protocol::Tcp {
                grant.for_tunnels_only()
            } else {
                grant
            },
        };
        drop(policy);
        let outcome = serve(shared, &ctx, tls).await;
        if let Some((reason, _)) = &outcome.error {
            shared.metrics.error(Direction::Inbound, reason);
        }
        log.write(
            &shared.access_log,
            Some(&ctx.peer_id),
            label,
            decision.reason,
            Some(&decision.rule),
            &outcome,
        );
    }
}

/// **The inbound protocol seam**: an authenticated, authorized connection
/// goes to its port's protocol layer. The HTTP layer takes over the
/// `Http`/`Auto` arm; everything else is opaque TCP.
///
/// A plain `fn` returning the seam's future, not an `async fn`: an `async
/// fn` stores a by-value argument twice (rust-lang/rust#62958), which for
/// the TLS stream is 1.2 KiB more in every connection's task.
pub fn serve<'a>(
    shared: &'a Arc<Shared>,
    ctx: &'a InboundContext,
    tls: TlsStream<TcpStream>,
) -> impl Future<Output = Outcome> + Send + 'a {
    super::seam::inbound(shared, ctx, tls)
}

/// Opaque TCP: dial the app and copy bytes both ways. `tls` is the peer's
/// TLS connection or a tunnel on it. When the peer's side fails (a reset
/// connection, a reset stream), the app's connection is reset too rather
/// than closed, so the app sees the failure as such. No `async` block of
/// its own: the dial's future and the copy's take turns in one place, and
/// the arguments go from the one to the other (an `async` block around
/// them kept them, and the dial's result, beside the copy's state in every
/// connection's task).
pub fn forward_tcp<'a, I>(
    shared: &'a Shared,
    ctx: &'a InboundContext,
    tls: I,
) -> impl Future<Output = Outcome> + Send + 'a
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'a,
{
    // The dial boxed: its deadline's timer and the connect's state, inline,
    // were the largest state of a task the connection holds for good.
    Box::pin(dial(&ctx.app, shared.timeouts.connect)).then(move |dialled| match dialled {
        Ok(app) => Either::Left(relay(shared, ctx, tls, app)),
        // Boxed, as every await after the copy loop's: rare, and inline
        // their states would be laid out beside the loop's.
        Err(e) => Either::Right(Box::pin(app_unreachable(ctx, tls, e))),
    })
}

/// Copies `tls` ⇄ `app` until either ends or a change denies the
/// connection. (A plain `fn` around an `async move` block, so that its
/// arguments are stored once: rust-lang/rust#62958.)
#[allow(clippy::manual_async_fn)] // on purpose: the streams are stored once
fn relay<'a, I>(
    shared: &'a Shared,
    ctx: &'a InboundContext,
    mut tls: I,
    mut app: TcpStream,
) -> impl Future<Output = Outcome> + Send + 'a
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'a,
{
    async move {
        let counters = shared.metrics.byte_counters(Direction::Inbound);
        // No timer of its own: the revocation wait beside it is woken at
        // each of the process's idle periods too.
        let copy = forward(&mut tls, &mut app, shared.reauth.idle_periods(), &counters);
        let done = Until::new(copy, ctx.grant.revoked(shared, ctx)).await;
        Box::pin(forwarded(done, &mut tls, &app)).await
    }
}

/// The app refused or did not answer the dial: the peer's side is closed
/// gracefully, as an app's own close would be.
async fn app_unreachable<I>(ctx: &InboundContext, mut tls: I, e: std::io::Error) -> Outcome
where
    I: tokio::io::AsyncWrite + Unpin,
{
    tracing::warn!(app = %ctx.app, error = %e, "inbound: app unreachable");
    close_gracefully(&mut tls).await;
    Outcome::failed("app_connect", e)
}

/// How an inbound copy loop ended, with what it takes: an idle connection
/// closed gracefully, the app's connection reset when the peer's side
/// failed, a connection a change denied closed (see [`revoked_close`]).
async fn forwarded<I>(
    done: Result<crate::net::forward::Forwarded, super::reauth::Revoked>,
    tls: &mut I,
    app: &TcpStream,
) -> Outcome
where
    I: tokio::io::AsyncWrite + Unpin,
{
    match done {
        Ok(done) => {
            match &done.error {
                Some(ForwardError::Idle(_)) => close_gracefully(tls).await,
                Some(ForwardError::Io { side, .. }) if side.ends_with("client") => {
                    crate::net::reset_on_close(app);
                }
                _ => {}
            }
            Outcome::forwarded(done)
        }
        Err(revoked) => revoked_close(tls, revoked).await,
    }
}

/// Ends a connection a change denied: `close_notify` to the peer (bytes
/// the app sent that it had not taken yet are dropped with the app
/// connection), and the outcome for the access log.
pub(super) async fn revoked_close<S>(tls: &mut S, revoked: super::reauth::Revoked) -> Outcome
where
    S: tokio::io::AsyncWrite + Unpin,
{
    close_gracefully(tls).await;
    Outcome::failed("revoked", revoked)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, F: Future>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// As [`future_size`], for a function of four arguments.
    fn future_size4<A, B, C, D, F: Future>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connection's task is this future: its size is paid per idle
    /// connection. An `async fn` layer taking the TLS stream by value stores
    /// it twice (rust-lang/rust#62958); this catches such a layer coming
    /// back (debug build: 6.1 KiB with one, 3.7 KiB without), and any of
    /// the outbound side's paths coming back inline: every idle app
    /// connection pays the largest (the handshake's 4.2 KiB inline, 3.5
    /// boxed; 480 bytes with protocol detection and the tunnel's copy loop
    /// boxed too, which took HTTP/1's idle connections from 5.0 to 3.0
    /// KiB each in the e2e bench; 608 with the connection's guard, 480
    /// with the outbound handler's arguments stored once, which took its
    /// task from a 768-byte allocation to a 640-byte one; 400 in a release
    /// build with the connection admitted before its future is made and
    /// `seam::outbound` storing its arguments once: a task is the future
    /// and about 104 bytes rounded up to 128, so within 408 bytes it is a
    /// 512-byte allocation, which an idle HTTP/1 app connection holds for
    /// good; debug layouts are larger, 432).
    #[test]
    fn the_connection_task_stays_small() {
        let inbound = future_size4(Inbound::handle);
        let outbound = future_size4(super::super::outbound::Outbound::handle);
        eprintln!("connection futures: inbound {inbound} B, outbound {outbound} B");
        assert!(inbound <= 4096, "inbound connection future: {inbound} B");
        let limit = if cfg!(debug_assertions) { 440 } else { 408 };
        assert!(
            outbound <= limit,
            "outbound connection future: {outbound} B"
        );
    }

    /// A tunnel's task at the inbound side holds this future for the
    /// tunnel's life: the seam over the stream, with the copy loop inline
    /// and the HTTP paths and every await after the copy loop boxed.
    /// (Debug build: 640 bytes; 848 before those awaits were boxed; 416
    /// with the copy counting the process's idle periods instead of a
    /// timer of its own, and the app's dial boxed.)
    #[test]
    fn a_tunnel_task_stays_small() {
        type Stream = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;
        let tunnel = future_size(super::super::seam::inbound::<Stream>);
        eprintln!("tunnel stream future: {tunnel} B");
        assert!(tunnel <= 448, "tunnel stream future: {tunnel} B");
    }
}
