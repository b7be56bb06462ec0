//! Tunnels: opaque TCP between sidecars as HTTP/2 CONNECT streams on the
//! pooled mesh connection (`crate::http::tunnel`). Each stream is an app
//! connection and is treated as one: the inbound side decides it by the
//! mesh connection's peer and the stream's port, logs and counts it as an
//! L4 connection, re-authorizes it on changes, and serves it through the
//! same seam as a TLS connection. docs/PROXY.md, "Tunnels between sidecars".

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::conn::{close_gracefully, decision_label, ConnLog, InboundContext, OutboundContext};
use super::conn::{Outcome, Shared};
use crate::http::h2_stream::StreamIo;
use crate::http::outbound::OutboundConn;
use crate::http::tunnel::{answer, head, Tunnel, TunnelError, TunnelHandler, Tunnels};
use crate::http::MeshConnectors;
use crate::http::ProxyBody;
use crate::metrics::Direction;
use crate::net::caps::{LimitReached, Places};
use crate::net::forward::{forward, ForwardError};
use crate::net::idle::OwnTimer;
use crate::policy::Protocol;
use stepmesh_ca::spiffe_id::SpiffeId;

/// The handler of the tunnels on one peer's mesh connection (`conn`: its
/// authenticated context).
pub(super) fn inbound(shared: Arc<Shared>, conn: InboundContext) -> Tunnels {
    Tunnels(Arc::new(Handler { shared, conn }))
}

/// Decides and serves the CONNECT streams of one peer's mesh connection.
struct Handler {
    shared: Arc<Shared>,
    conn: InboundContext,
}

impl TunnelHandler for Handler {
    fn open_upgraded(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let port = req.uri().authority().and_then(|a| a.port_u16());
        let (decided, relays) = match admit(&self.shared, &self.conn, port) {
            Ok(admitted) => admitted,
            Err(status) => return answer(head(status, false)),
        };
        let upgrading = hyper::upgrade::on(&mut req);
        let shared = self.shared.clone();
        // The older peers' path (a mesh connection's tunnels, through
        // hyper): the upgrade is awaited here, around `serve`, so that the
        // h2 streams' tasks (every other tunnel) do not carry its wait.
        tokio::spawn(async move {
            match upgrading.await {
                Ok(io) => serve(shared, TokioIo::new(io), decided).await,
                Err(e) => ended(&shared, &decided, &Outcome::failed("io", e)),
            }
        });
        answer(head(StatusCode::OK, relays))
    }

    fn open_stream(&self, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
        let port = req.uri().authority().and_then(|a| a.port_u16());
        let (decided, relays) = match admit(&self.shared, &self.conn, port) {
            Ok(admitted) => admitted,
            Err(status) => {
                // The stream may be gone already: nothing then to answer.
                let _ = respond.send_response(head(status, false), true);
                return;
            }
        };
        match respond.send_response(head(StatusCode::OK, relays), false) {
            Ok(send) => {
                // Boxed: the task holds the stream in more than one place
                // (its argument, the seam's, the copy's), and 40 bytes more
                // in each would take its allocation past 640 bytes.
                let io = Box::new(StreamIo::new(send, req.into_body()));
                tokio::spawn(serve(self.shared.clone(), io, decided));
            }
            // The peer reset the stream before its answer: it ends here,
            // logged as a stream that failed.
            Err(e) => ended(&self.shared, &decided, &Outcome::failed("io", e)),
        }
    }
}

/// Decides one CONNECT stream to `port` as an L4 connection to that port:
/// its context, decision and whether its peer may share it (an `http`
/// port's HTTP/1 is relayed request by request), or the refusal's status.
/// The answer is sent before the app is dialled, as an L4 connection's
/// handshake completes before: an unreachable app ends the stream as it
/// ends a TLS connection.
fn admit(
    shared: &Arc<Shared>,
    conn: &InboundContext,
    port: Option<u16>,
) -> Result<(Box<Decided>, bool), StatusCode> {
    let started = Instant::now();
    let Some((port, app)) = port.and_then(|port| destination(shared, conn, port)) else {
        return Err(StatusCode::BAD_REQUEST);
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
        return Err(StatusCode::FORBIDDEN);
    }
    let ctx = InboundContext {
        port,
        app: app.clone(),
        mesh: None,
        protocol,
        grant: conn.grant.for_stream(generation, decision.allow),
        ..conn.clone()
    };
    // The mesh connection's peer may have been revoked, or its root
    // removed, since its handshake, or (an `http` or `auto` port's) the
    // policy may now deny the connection: it is closing then, and takes no
    // new stream meanwhile. Else a stream opened between the change and
    // the connection's GOAWAY would be served, denied, for as long as the
    // peer kept it, and the peer's app connections would never learn.
    // The connection's grant holds the same peer (root key, serial) as the
    // stream's, whose policy decision was made just above: checking it
    // checks both.
    if let Some(revoked) = conn.grant.check(shared, conn) {
        tracing::info!(client = %conn.client, peer = %conn.peer_id, port, rule = %revoked.rule, reason = revoked.reason, "inbound tunnel refused: its mesh connection is closing");
        log.write(
            &shared.access_log,
            Some(&conn.peer_id),
            "deny",
            revoked.reason,
            Some(&revoked.rule),
            &Outcome::default(),
        );
        return Err(StatusCode::FORBIDDEN);
    }
    // A tunnel is an app connection of the peer: it counts against the
    // per-peer cap as an L4 connection would, and against the process's
    // limit, as its app connection takes a descriptor as an accepted
    // socket does.
    let places = match Places::take(&shared.peer_cap, &shared.connections, &conn.peer_id) {
        Ok(places) => places,
        Err(LimitReached::Key(reached)) => {
            shared.metrics.rejected(Direction::Inbound, "peer_limit");
            if reached.log {
                tracing::warn!(client = %conn.client, peer = %conn.peer_id, limit = reached.limit, "inbound: per-peer connection cap reached; refusing a tunnel (--max-connections-per-peer)");
            }
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        }
        Err(LimitReached::Process) => {
            shared
                .metrics
                .rejected(Direction::Inbound, "connection_limit");
            tracing::debug!(client = %conn.client, peer = %conn.peer_id, "connection limit reached; refusing a tunnel (--max-connections)");
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let decided = Box::new(Decided {
        ctx,
        _open: shared.metrics.open_guard(Direction::Inbound),
        started,
        label,
        reason: decision.reason,
        rule: decision.rule,
        _places: places,
    });
    // An `http` port's stream is relayed request by request (and its app
    // connections pooled here): the peer may share it between its app
    // connections. Not an `auto` port's: its stream could be opaque.
    Ok((decided, protocol == Protocol::Http))
}

/// An admitted stream: its context, its decision (for its access-log
/// line), its count in `stepmesh_connections_open` and its places under the
/// peer's cap and the process's limit. Boxed, one allocation per stream beside its task: inline,
/// these 200-odd bytes would take the task's allocation from 768 bytes to
/// 1,024 (tokio's task cell rounds to 128, and jemalloc's classes).
struct Decided {
    ctx: InboundContext,
    started: Instant,
    label: &'static str,
    reason: &'static str,
    rule: Arc<str>,
    _open: crate::metrics::OpenGuard,
    /// Held to the end: the stream counts against the peer's cap and
    /// `--max-connections`.
    _places: Places<Arc<SpiffeId>>,
}

/// Serves an admitted stream (`io`: the h2 stream itself, or hyper's
/// upgrade of it), then logs it. Its task lives as long as the app
/// connection: a plain `fn` around an `async move` block, so that its
/// arguments are stored once (rust-lang/rust#62958).
#[allow(clippy::manual_async_fn)] // on purpose: the arguments are stored once
fn serve<I>(
    shared: Arc<Shared>,
    io: I,
    decided: Box<Decided>,
) -> impl std::future::Future<Output = ()> + Send
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let outcome = super::seam::inbound(&shared, &decided.ctx, io).await;
        ended(&shared, &decided, &outcome);
    }
}

/// An admitted stream's end: its error counted, its access-log line; its
/// count and its place under the peer's cap go as the caller drops
/// `decided`.
fn ended(shared: &Shared, decided: &Decided, outcome: &Outcome) {
    if let Some((reason, _)) = &outcome.error {
        shared.metrics.error(Direction::Inbound, reason);
    }
    let ctx = &decided.ctx;
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
        outcome,
    );
}

/// The policy port and app a stream is for. Its `:authority` carries the
/// original destination; only its port is taken from it. Transparent: the
/// pod's own address (the mesh connection's original destination) on that
/// port. Explicit listeners: the `--inbound` listener bound to that port,
/// else the one the mesh connection came to (the peer may know this one
/// by another port, behind a Service or NAT).
fn destination(shared: &Shared, conn: &InboundContext, port: u16) -> Option<(u16, Arc<str>)> {
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

/// What opening a tunnel for an app connection came to (`T`: the tunnel,
/// or where it is kept).
pub(super) enum Opened<T = Tunnel> {
    /// The tunnel, open.
    Tunnel(T),
    /// The peer takes no tunnel here (a sidecar without them, or the
    /// pooled connection is full): the caller takes an mTLS connection of
    /// its own.
    Unsupported,
    /// Refused by the peer or failed: the app connection is finished with
    /// this outcome (a refusal closed it gracefully).
    Done(Outcome),
}

impl Opened {
    /// The same, the tunnel boxed.
    pub(super) fn boxed(self) -> Opened<Box<Tunnel>> {
        match self {
            Opened::Tunnel(tunnel) => Opened::Tunnel(Box::new(tunnel)),
            Opened::Unsupported => Opened::Unsupported,
            Opened::Done(outcome) => Opened::Done(outcome),
        }
    }
}

/// Opens a tunnel for the app connection `app` on the pooled mesh
/// connection to `ctx`'s destination (dialled if there is none).
pub(super) async fn open_for(
    shared: &Shared,
    mesh: &MeshConnectors,
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
    if let Some(peer) = tunnel.peer() {
        shared
            .metrics
            .connection(Direction::Outbound, peer, "allow");
    }
}

/// A tunnel's peer ID (the mesh connection's shared string), parsed for
/// the access log once the connection ends.
pub(super) fn peer_id(peer: Option<&str>) -> Option<crate::policy::SpiffeId> {
    peer.and_then(|p| crate::policy::SpiffeId::parse(p).ok())
}

/// Carries an opaque app connection through its open tunnel to the end,
/// in the task the connection was handed to (`super::outbound`). A plain
/// `fn` around an `async move` block, its arguments stored once: this is
/// most of an idle opaque connection's task.
#[allow(clippy::manual_async_fn)] // on purpose: the arguments are stored once
pub(super) fn forward_app<'a>(
    shared: &'a Shared,
    app: &'a mut TcpStream,
    tunnel: &'a mut Tunnel,
) -> impl std::future::Future<Output = Outcome> + Send + 'a {
    async move {
        // The peer's ID stays the pooled connection's shared string while
        // the tunnel is open; it is parsed for the access log only once it
        // ends.
        count_allowed(shared, tunnel);
        let counters = shared.metrics.byte_counters(Direction::Outbound);
        let done = forward(
            app,
            &mut tunnel.io,
            OwnTimer::new(shared.timeouts.idle),
            &counters,
        )
        .await;
        match &done.error {
            // Boxed: rare, and inline its state would size every tunnel's
            // task.
            Some(ForwardError::Idle(_)) => Box::pin(close_gracefully(&mut tunnel.io)).await,
            // The peer's side failed (a reset stream, a lost connection).
            Some(ForwardError::Io { side, .. }) if side.ends_with("server") => {
                crate::net::reset_on_close(app);
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
        outcome.peer_id = peer_id(tunnel.peer().map(|p| &**p));
        outcome
    }
}

#[cfg(test)]
mod tests {
    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, F: std::future::Future>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An open tunnel's task at the inbound side is this future, paid by
    /// every open tunnel: its arguments stored once, the stream never
    /// beside the seam's future, the stream's context and decision boxed.
    /// The task's allocation is the future and about 104 bytes, rounded up
    /// to 128: the h2 stream's within 408 bytes, a 512-byte task (768,
    /// then 640 before; debug 512, then 368 with the copy's idle timer
    /// and the app's dial out of it). Hyper's upgrade (older peers) is
    /// awaited around it (debug 488).
    #[test]
    fn a_tunnel_streams_task_stays_small() {
        use super::StreamIo;
        type UpgradeIo = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;
        let upgraded = future_size(super::serve::<UpgradeIo>);
        let stream = future_size(super::serve::<Box<StreamIo>>);
        eprintln!("tunnel stream task future: upgraded {upgraded} B, h2 stream {stream} B");
        assert!(upgraded <= 536, "upgraded tunnel task future: {upgraded} B");
        assert!(stream <= 408, "h2 stream tunnel task future: {stream} B");
    }

    /// Beside its task, each tunnel holds its decision's box: within 192
    /// bytes, jemalloc's class below 224.
    #[test]
    fn a_tunnels_decision_fits_192_bytes() {
        let size = std::mem::size_of::<super::Decided>();
        assert!(size <= 192, "Decided: {size} B");
    }
}
