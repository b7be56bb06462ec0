//! Tunnels: opaque TCP between sidecars as HTTP/2 CONNECT streams on the
//! pooled mesh connection (`crate::http::tunnel`). Each stream is an app
//! connection and is treated as one: the inbound side decides it by the
//! mesh connection's peer and the stream's port, logs and counts it as an
//! L4 connection, re-authorizes it on changes, and serves it through the
//! same seam as a TLS connection. docs/PROXY.md, "Tunnels between sidecars".

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::Either;
use futures_util::FutureExt as _;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::conn::{close_gracefully, decision_label, ConnLog, InboundContext, OutboundContext};
use super::conn::{Outcome, Shared};
use crate::http::outbound::OutboundConn;
use crate::http::tunnel::{answer, answer_relaying, Answer, Tunnel, TunnelError, Tunnels};
use crate::metrics::Direction;
use crate::net::forward::{forward, ForwardError};
use crate::policy::Protocol;
use stepmesh_ca::spiffe_id::SpiffeId;

/// The handler of the tunnels on one peer's mesh connection (`conn`: its
/// authenticated context).
pub(super) fn inbound(shared: Arc<Shared>, conn: InboundContext) -> Tunnels {
    let conn = Arc::new(conn);
    Tunnels(Arc::new(move |req| -> Answer {
        let (shared, conn) = (shared.clone(), conn.clone());
        Box::pin(async move { open(shared, &conn, req) })
    }))
}

/// Decides one CONNECT stream as an L4 connection to its port, and starts
/// serving it if allowed. The answer is sent before the app is dialled, as
/// an L4 connection's handshake completes before: an unreachable app ends
/// the stream as it ends a TLS connection.
fn open(
    shared: Arc<Shared>,
    conn: &InboundContext,
    mut req: Request<Incoming>,
) -> http::Response<crate::http::ProxyBody> {
    let started = Instant::now();
    let Some((port, app)) = destination(&shared, conn, &req) else {
        return answer(StatusCode::BAD_REQUEST);
    };
    // Read before the decision: a change after it is re-checked.
    let generation = shared.reauth.generation();
    let policy = shared.policy.current();
    let decision = policy.authorize(&conn.peer_id, port);
    let protocol = policy.port_protocol(port);
    drop(policy);
    let label = decision_label(decision.allow, decision.would_deny);
    shared
        .metrics
        .connection(Direction::Inbound, conn.peer_id.as_str(), label);
    let log = ConnLog {
        direction: Direction::Inbound,
        client: conn.client,
        dst: &app,
        port,
        started,
    };
    if !decision.allow && !super::seam::serves_denied(None, protocol) {
        tracing::info!(client = %conn.client, peer = %conn.peer_id, port, rule = %decision.rule, reason = decision.reason, "inbound tunnel denied");
        log.write(
            &shared.access_log,
            Some(&conn.peer_id),
            label,
            decision.reason,
            Some(&decision.rule),
            &Outcome::default(),
        );
        return answer(StatusCode::FORBIDDEN);
    }
    let ctx = InboundContext {
        port,
        app: app.clone(),
        alpn: None,
        protocol,
        grant: conn.grant.for_stream(generation, decision.allow),
        ..conn.clone()
    };
    // The mesh connection's peer may have been revoked, or its root
    // removed, since its handshake: the connection is closing then, and
    // takes no new stream meanwhile.
    if let Some(revoked) = ctx.grant.check(&shared, &ctx) {
        tracing::info!(client = %conn.client, peer = %conn.peer_id, port, rule = %revoked.rule, reason = revoked.reason, "inbound tunnel refused: peer no longer trusted");
        log.write(
            &shared.access_log,
            Some(&conn.peer_id),
            "deny",
            revoked.reason,
            Some(&revoked.rule),
            &Outcome::default(),
        );
        return answer(StatusCode::FORBIDDEN);
    }
    // A tunnel is an app connection of the peer: it counts against the
    // per-peer cap as an L4 connection would.
    let slot = match shared.peer_cap.acquire(&conn.peer_id) {
        Ok(slot) => slot,
        Err(reached) => {
            shared.metrics.rejected(Direction::Inbound, "peer_limit");
            if reached.log {
                tracing::warn!(client = %conn.client, peer = %conn.peer_id, limit = reached.limit, "inbound: per-peer connection cap reached; refusing a tunnel (--max-connections-per-peer)");
            }
            return answer(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let decided = Box::new(Decided {
        started,
        label,
        reason: decision.reason,
        rule: decision.rule,
        _slot: slot,
    });
    tokio::spawn(serve(shared, ctx, upgrade, decided));
    // An `http` port's stream is relayed request by request (and its app
    // connections pooled here): the peer may share it between its app
    // connections. Not an `auto` port's: its stream could be opaque.
    if protocol == Protocol::Http {
        return answer_relaying();
    }
    answer(StatusCode::OK)
}

/// An admitted stream's decision, for its access-log line, and its place
/// under the peer's cap. Boxed in the stream's task: 80 bytes there would
/// take the task's allocation from 1,024 bytes to 1,280 (jemalloc's size
/// classes), paid by every open tunnel.
struct Decided {
    started: Instant,
    label: &'static str,
    reason: &'static str,
    rule: Arc<str>,
    /// Held to the end: the stream counts against the peer's cap.
    _slot: Option<crate::net::caps::Slot<Arc<SpiffeId>>>,
}

/// Serves an admitted stream once hyper hands it over, then logs it. Its
/// task lives as long as the app connection: a plain `fn` around an `async
/// move` block, so that its arguments are stored once (rust-lang/rust#62958).
#[allow(clippy::manual_async_fn)] // on purpose: the arguments are stored once
fn serve(
    shared: Arc<Shared>,
    ctx: InboundContext,
    upgrade: hyper::upgrade::OnUpgrade,
    decided: Box<Decided>,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let _open = shared.metrics.open_guard(Direction::Inbound);
        // `then`: the upgrade's result is moved into the seam's future,
        // never held beside it.
        let outcome = upgrade
            .then(|upgraded| match upgraded {
                Ok(upgraded) => Either::Left(super::seam::inbound(
                    &shared,
                    &ctx,
                    hyper_util::rt::TokioIo::new(upgraded),
                )),
                Err(e) => Either::Right(std::future::ready(Outcome::failed("io", e))),
            })
            .await;
        if let Some((reason, _)) = &outcome.error {
            shared.metrics.error(Direction::Inbound, reason);
        }
        let log = ConnLog {
            direction: Direction::Inbound,
            client: ctx.client,
            dst: &ctx.app,
            port: ctx.port,
            started: decided.started,
        };
        log.write(
            &shared.access_log,
            Some(&ctx.peer_id),
            decided.label,
            decided.reason,
            Some(&decided.rule),
            &outcome,
        );
        // The stream's place under the peer's cap goes with `decided`.
        drop(decided);
    }
}

/// The policy port and app a stream is for. Its `:authority` carries the
/// original destination; only its port is taken from it. Transparent: the
/// pod's own address (the mesh connection's original destination) on that
/// port. Explicit listeners: the `--inbound` listener bound to that port,
/// else the one the mesh connection came to (the peer may know this one
/// by another port, behind a Service or NAT).
fn destination(
    shared: &Shared,
    conn: &InboundContext,
    req: &Request<Incoming>,
) -> Option<(u16, Arc<str>)> {
    let port = req.uri().authority()?.port_u16()?;
    if conn.transparent {
        let mut addr: SocketAddr = conn.app.parse().ok()?;
        addr.set_port(port);
        return Some((port, addr.to_string().into()));
    }
    let listener = shared.inbound_apps.get().and_then(|apps| apps.get(&port));
    Some(match listener {
        Some(app) => (port, app.clone()),
        None => (conn.port, conn.app.clone()),
    })
}

/// What opening a tunnel for an app connection came to.
pub(super) enum Opened {
    /// The tunnel, open.
    Tunnel(Tunnel),
    /// The peer takes no tunnel here (a sidecar without them, or the
    /// pooled connection is full): the caller takes an mTLS connection of
    /// its own.
    Unsupported,
    /// Refused by the peer or failed: the app connection is finished with
    /// this outcome (a refusal closed it gracefully).
    Done(Outcome),
}

/// Opens a tunnel for the app connection `app` on the pooled mesh
/// connection to `ctx`'s destination (dialled if there is none).
pub(super) async fn open_for(
    shared: &Shared,
    mesh: &TlsConnector,
    ctx: &OutboundContext,
    app: &mut TcpStream,
) -> Opened {
    let Ok(authority) = ctx.dst.parse::<http::uri::Authority>() else {
        return Opened::Unsupported;
    };
    // Boxed: the mesh connection's description, the dial and the stream's
    // opening are large and live only while connecting (as the L4 path's
    // handshake); inline they would size every idle connection's task.
    Box::pin(async {
        let conn = super::seam::mesh_conn(shared, mesh, ctx);
        open_on(shared, &conn, authority, ctx, app).await
    })
    .await
}

/// As [`open_for`], on the mesh connection `conn` to `authority` (box
/// it: as [`open_for`] says).
pub(super) async fn open_on(
    shared: &Shared,
    conn: &OutboundConn,
    authority: http::uri::Authority,
    ctx: &OutboundContext,
    app: &mut TcpStream,
) -> Opened {
    let opened = crate::http::tunnel::open(&shared.http, conn, authority).await;
    match opened {
        Ok(tunnel) => Opened::Tunnel(tunnel),
        Err(TunnelError::Unsupported) => Opened::Unsupported,
        Err(TunnelError::Refused(_)) => {
            close_gracefully(app).await;
            Opened::Done(Outcome {
                refused: true,
                peer_id: None,
                ..Outcome::default()
            })
        }
        Err(e @ TunnelError::Unavailable(_)) => {
            tracing::warn!(dst = %ctx.dst, error = %e, "outbound: no mesh connection");
            Opened::Done(Outcome::failed("peer_connect", e))
        }
        Err(e @ TunnelError::Failed(_)) => {
            tracing::warn!(dst = %ctx.dst, error = %e, "outbound: tunnel failed");
            Opened::Done(Outcome::failed("peer_connect", e))
        }
    }
}

/// Counts a tunnel as an allowed outbound connection to its peer.
pub(super) fn count_allowed(shared: &Shared, tunnel: &Tunnel) {
    if let Some(peer) = tunnel.peer.as_deref() {
        shared
            .metrics
            .connection(Direction::Outbound, peer, "allow");
    }
}

/// The peer a tunnel reached, parsed (for the access log).
pub(super) fn peer_id(tunnel: &Tunnel) -> Option<crate::policy::SpiffeId> {
    tunnel
        .peer
        .as_deref()
        .and_then(|p| crate::policy::SpiffeId::parse(p).ok())
}

/// An opaque app connection through a tunnel on the pooled mesh
/// connection; `Err(app)` hands it back for the L4 path when the peer
/// takes no tunnel (a sidecar without them, or the connection is full).
pub(super) async fn outbound(
    shared: &Shared,
    mesh: &TlsConnector,
    ctx: &OutboundContext,
    mut app: TcpStream,
) -> Result<Outcome, TcpStream> {
    let mut tunnel = match open_for(shared, mesh, ctx, &mut app).await {
        Opened::Tunnel(tunnel) => tunnel,
        Opened::Unsupported => return Err(app),
        Opened::Done(outcome) => return Ok(outcome),
    };
    // The peer's ID stays the pooled connection's shared string while the
    // tunnel is open; it is parsed for the access log only once it ends.
    count_allowed(shared, &tunnel);
    let counters = shared.metrics.byte_counters(Direction::Outbound);
    let done = forward(&mut app, &mut tunnel.io, shared.timeouts.idle, &counters).await;
    match &done.error {
        Some(ForwardError::Idle(_)) => close_gracefully(&mut tunnel.io).await,
        // The peer's side failed (a reset stream, a lost connection).
        Some(ForwardError::Io { side, .. }) if side.ends_with("server") => {
            crate::net::reset_on_close(&app);
        }
        _ => {}
    }
    // The peer ended the stream without a byte: its seam refused the
    // connection after the `200` (an `auto` port's opaque bytes denied,
    // the app unreachable), as it closes a refused L4 connection.
    let refused = super::outbound::peer_refused(&done);
    let mut outcome = Outcome::forwarded(done);
    if refused {
        outcome.error = None;
        outcome.refused = true;
    }
    outcome.peer_id = peer_id(&tunnel);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, F: std::future::Future>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An open tunnel's task at the inbound side is this future, paid by
    /// every open tunnel: its arguments stored once and the upgrade's
    /// result never beside the seam's future (release: 888 bytes, a
    /// 1,024-byte task; 1,000 bytes and a 1,280-byte task before; debug:
    /// 904 bytes).
    #[test]
    fn a_tunnel_streams_task_stays_small() {
        let task = future_size(super::serve);
        eprintln!("tunnel stream task future: {task} B");
        assert!(task <= 1024, "tunnel stream task future: {task} B");
    }
}
