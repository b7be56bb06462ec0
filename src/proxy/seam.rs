//! The protocol seams: once a connection is authenticated (inbound) or
//! classified (outbound), this decides its protocol handler — the HTTP
//! layer (`crate::http`) or opaque TCP (`crate::net::forward`). The sidecar
//! sits above both; neither imports the sidecar.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::uri::Authority;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::closing::{drained_or_closing, revocable};
use super::conn::{close_gracefully, InboundContext, OutboundContext, Outcome, Shared};
use super::tunnel::Opened;
use crate::http::detect::{self, Detected, Prefixed};
use crate::http::inbound::InboundConn;
use crate::http::outbound::{MeshError, OutboundConn, TunnelDest};
use crate::http::tunnel::{Tunnel, Tunnels};
use crate::http::{MeshConnectors, MeshKind, MESH_ALPN, MESH_TUNNEL_ALPN, TUNNEL_ALPN};
use crate::net::close_signal::CloseSignal;
use crate::net::linger::Lingering;
use crate::policy::{OutboundAction, Protocol};

/// How long the outbound side waits for the app's first bytes before
/// treating the connection as opaque (server-speaks-first protocols).
pub const OUTBOUND_DETECT: Duration = Duration::from_millis(500);
/// How long an `auto` inbound port waits for the first bytes.
pub const INBOUND_DETECT: Duration = Duration::from_secs(10);

/// The ALPN ids `http` and `auto` ports accept: ours first (with tunnels
/// unless `--no-tunnel`), then the app protocols. The server's order
/// decides (rustls): a peer offering the mesh ALPNs gets HTTP with
/// tunnels; the tunnels-only id is taken only from a peer offering it
/// alone, for its tunnels' own connection (`http::MeshConnectors`).
pub fn server_alpn(tunnel: bool) -> Vec<Vec<u8>> {
    let mut alpn = Vec::with_capacity(5);
    if tunnel {
        alpn.extend([MESH_TUNNEL_ALPN.to_vec(), TUNNEL_ALPN.to_vec()]);
    }
    alpn.extend([MESH_ALPN.to_vec(), b"h2".to_vec(), b"http/1.1".to_vec()]);
    alpn
}

/// The ALPN ids `tcp` ports accept: tunnels only, or none.
pub fn tcp_alpn(tunnel: bool) -> Vec<Vec<u8>> {
    if tunnel {
        vec![TUNNEL_ALPN.to_vec()]
    } else {
        Vec::new()
    }
}

/// Whether a connection the L4 decision denied still gets served, so each
/// request can be answered 403 (SPEC.md: HTTP routes answer 403): a peer
/// sidecar's mesh connection (its tunnels are decided one by one), an
/// `http` port, or an `auto` port (denied and not HTTP, it is closed after
/// detection).
pub fn serves_denied(mesh: Option<MeshKind>, protocol: Protocol) -> bool {
    mesh.is_some() || matches!(protocol, Protocol::Http | Protocol::Auto)
}

/// The inbound seam: HTTP for peer sidecars, `http` ports and HTTP-looking
/// `auto` connections; opaque TCP otherwise (and only if allowed). `io` is
/// the TLS connection, or a tunnel (a CONNECT stream on a peer's mesh
/// connection), which gets the same treatment by its port.
pub async fn inbound<I>(shared: &Arc<Shared>, ctx: &InboundContext, io: I) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The HTTP paths are boxed: an opaque TCP connection's task must stay
    // as small as the L4 path alone (idle connections are counted in KiB).
    if let Some(kind) = ctx.mesh {
        return Box::pin(serve_mesh(shared, ctx, io, kind)).await;
    }
    if ctx.protocol == Protocol::Http {
        return Box::pin(serve_inbound_http(shared, ctx, io, None)).await;
    }
    if ctx.protocol == Protocol::Tcp {
        if allowed(shared, ctx) {
            return super::inbound::forward_tcp(shared, ctx, io).await;
        }
        let mut io = io;
        close_gracefully(&mut io).await;
        return Outcome::default();
    }
    Box::pin(inbound_auto(shared, ctx, io)).await
}

/// A peer sidecar's mesh connection: its HTTP requests, and its tunnels
/// when it negotiated them.
async fn serve_mesh<I>(shared: &Arc<Shared>, ctx: &InboundContext, io: I, kind: MeshKind) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Ours is the side that ends a mesh connection on a drain or a
    // revocation, as soon as its last stream does: lingering, the tail of
    // that stream is not lost to a reset (`net::linger`).
    let io = Lingering::new(io);
    let tunnels = kind
        .tunnels
        .then(|| super::tunnel::inbound(shared.clone(), ctx.clone()));
    if let (false, Some(tunnels)) = (kind.http, &tunnels) {
        // Tunnels only (a `tcp` port): on h2 directly, no HTTP served.
        let closing = CloseSignal::default();
        let stop = drained_or_closing(shared, &closing);
        let serve = crate::http::tunnels_only::serve(&shared.http, tunnels, io, stop);
        return revocable(shared, ctx, &closing, serve).await;
    }
    serve_inbound_http(shared, ctx, io, Some((kind, tunnels))).await
}

fn allowed(shared: &Shared, ctx: &InboundContext) -> bool {
    shared
        .policy
        .current()
        .authorize(&ctx.peer_id, ctx.port)
        .allow
}

/// An `auto` port: HTTP if the first bytes say so, else opaque TCP.
async fn inbound_auto<I>(shared: &Shared, ctx: &InboundContext, tls: I) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut tls = tls;
    let sniffed = tokio::time::timeout(INBOUND_DETECT, detect::sniff(&mut tls)).await;
    let (detected, prefix) = match sniffed {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return Outcome::failed("io", e),
        Err(_) => (Detected::Opaque, bytes::Bytes::new()),
    };
    if detected.is_http() {
        let conn = inbound_conn(shared, ctx, false);
        let watched = Arc::clone(&conn);
        let stop = drained_or_closing(shared, &watched.closing);
        let serve = crate::http::inbound::serve_detected(
            shared.http.clone(),
            conn,
            tls,
            detected,
            prefix,
            stop,
        );
        return revocable(shared, ctx, &watched.closing, serve).await;
    }
    let io = Prefixed::new(prefix, tls);
    // A port with routes is HTTP by the operator's word: opaque bytes must
    // not slip past the route decisions to the app.
    let has_routes = shared
        .policy
        .current()
        .port(ctx.port)
        .is_some_and(|p| !p.routes.is_empty());
    let mut io = io;
    // Read before the decision: a change after it is re-checked.
    let generation = shared.reauth.generation();
    // Deliberate closes say so with close_notify, so the peer sidecar logs a
    // refusal rather than an I/O error.
    if has_routes || !allowed(shared, ctx) {
        close_gracefully(&mut io).await;
        return Outcome::default();
    }
    // Opaque bytes on an `auto` port: as a `tcp` port's, under this
    // decision. The handshake's may have been a deny (an HTTP connection
    // is served denied, each request answered 403) that a reload lifted
    // while the first bytes were awaited: its grant would not re-check the
    // policy, and a later deny would leave the connection open.
    let ctx = InboundContext {
        grant: ctx.grant.for_stream(generation, true),
        ..ctx.clone()
    };
    super::inbound::forward_tcp(shared, &ctx, io).await
}

async fn serve_inbound_http<I>(
    shared: &Shared,
    ctx: &InboundContext,
    io: I,
    mesh: Option<(MeshKind, Option<Tunnels>)>,
) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = inbound_conn(shared, ctx, mesh.is_some());
    if let Some((kind, tunnels)) = mesh {
        // Made here, so the connection's Arc is not shared yet.
        if let Some(conn) = Arc::get_mut(&mut conn) {
            conn.tunnels_only = !kind.http;
            conn.tunnels = tunnels;
        }
    }
    let watched = Arc::clone(&conn);
    let stop = drained_or_closing(shared, &watched.closing);
    let serve = crate::http::inbound::serve_outcome(shared.http.clone(), conn, io, stop);
    revocable(shared, ctx, &watched.closing, serve).await
}

/// The HTTP layer's view of an inbound connection. Our own ID is read
/// here, once per HTTP connection, rather than kept in every connection's
/// context: an opaque TCP connection (or tunnel) never needs it.
fn inbound_conn(shared: &Shared, ctx: &InboundContext, mesh: bool) -> Arc<InboundConn> {
    Arc::new(InboundConn {
        peer: ctx.peer_id.clone(),
        x5t: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(*ctx.peer_cert_sha256),
        own: shared.store.info().map(|info| info.id.to_string()),
        port: ctx.port,
        app: ctx.app.clone(),
        client: ctx.client,
        mesh,
        tunnels_only: false,
        tunnels: None,
        closing: Default::default(),
    })
}

/// What the outbound seam came to: the connection served to its end, or
/// an opaque app connection with its tunnel open, whose copy loop the
/// caller runs in a task of its own. That task holds only the copy loop's
/// state (a 768-byte allocation), where the connection's first task would
/// hold every path's (its own 640 bytes and the tunnel path's 640 more,
/// paid by every idle opaque connection).
pub enum Served {
    /// Served to the end.
    Done(Outcome),
    /// The app connection and its open tunnel.
    Tunnel(TcpStream, Tunnel),
}

/// The outbound seam: an mTLS destination's HTTP/1 is relayed request by
/// request through a tunnel (or an mTLS connection of its own to a peer
/// without tunnels), HTTP/2 rides the pooled `stepmesh/h2` connection;
/// anything else (or HTTP/2 to a peer that is not a stepmesh sidecar) is
/// opaque TCP: through a tunnel (handed back to be carried, see [`Served`])
/// or over a connection of its own.
///
/// A plain `fn` around an `async` block, as [`outbound_h1`]: an `async fn`
/// stores its arguments twice, and every connection's task holds this
/// while it is served (an idle HTTP/1 one for good): 64 bytes less take
/// the task's allocation from 640 bytes to 512.
#[allow(clippy::manual_async_fn)] // Deliberate: see above.
pub fn outbound<'a>(
    shared: &'a Shared,
    connector: &'a TlsConnector,
    mesh: &'a MeshConnectors,
    ctx: &'a OutboundContext,
    app: TcpStream,
) -> impl Future<Output = Served> + Send + 'a {
    async move {
        let mut app = app;
        // An opaque port is not even peeked at: no detection delay, and
        // what looks like HTTP is carried as bytes like everything else.
        if ctx.action == OutboundAction::Mtls && !ctx.opaque {
            // Boxed, as every path below: this task's size is the largest
            // of its states, and an idle connection of any kind holds it.
            match Box::pin(detect::peek(&app, OUTBOUND_DETECT)).await {
                Detected::Http1 => {
                    let served = Box::pin(outbound_h1(shared, connector, mesh, ctx, app)).await;
                    return Served::Done(served);
                }
                Detected::Http2 => match Box::pin(outbound_http(shared, mesh, ctx, app)).await {
                    Ok(outcome) => return Served::Done(outcome),
                    Err(back) => app = back,
                },
                Detected::Opaque | Detected::NeedMore => {}
            }
        }
        if ctx.action == OutboundAction::Mtls && shared.tunnel {
            match super::tunnel::open_for(shared, mesh, ctx, &mut app).await {
                Opened::Tunnel(tunnel) => return Served::Tunnel(app, tunnel),
                Opened::Done(outcome) => return Served::Done(outcome),
                Opened::Unsupported => {}
            }
        }
        // Boxed: an mTLS connection of its own (a peer without tunnels,
        // `--no-tunnel`) holds its TLS state inline; on the tunnel path it
        // would size every idle connection's task all the same.
        Served::Done(Box::pin(super::outbound::forward_tcp(shared, connector, ctx, app)).await)
    }
}

/// Where pooled peer connections are kept: the expected identity and the
/// destination (both pools).
fn pool_key(ctx: &OutboundContext) -> Arc<str> {
    format!("{}@{}", ctx.expected, ctx.dst).into()
}

/// HTTP/1 relayed to the peer as the L4 path would carry it: through
/// tunnels on the pooled mesh connection, or, to a peer without tunnels,
/// over an mTLS connection of its own. A tunnel whose far end relays
/// HTTP/1 is shared between requests with the destination's other app
/// connections (`http::outbound::relay_h1_pooled`); any other ends with
/// the app connection.
///
/// A plain `fn` around an `async` block, as `h1::relay`: an idle app
/// connection's task holds this state, so each value is stored once
/// (an `async fn` stores its arguments twice) and nothing that is moved
/// on stays in scope.
#[allow(clippy::manual_async_fn)] // Deliberate: see above.
fn outbound_h1<'a>(
    shared: &'a Shared,
    connector: &'a TlsConnector,
    mesh: &'a MeshConnectors,
    ctx: &'a OutboundContext,
    mut app: TcpStream,
) -> impl Future<Output = Outcome> + Send + 'a {
    async move {
        if !shared.tunnel || ctx.dst.parse::<Authority>().is_err() {
            // Boxed: an mTLS connection of its own holds its TLS state
            // inline; in this future it would size every tunnelled
            // connection's too.
            return Box::pin(h1_over_own_connection(shared, connector, ctx, app)).await;
        }
        // The mesh connection's settings are made when a tunnel is opened,
        // not kept: an idle app connection holds `dest`.
        let conn = || mesh_conn(shared, mesh, ctx);
        let dest = TunnelDest {
            key: pool_key(ctx),
            port: ctx.port,
            conn: &conn,
        };
        let mut upstream = match first_tunnel(shared, &dest, ctx, &mut app).await {
            Opened::Tunnel(tunnel) => Some(tunnel),
            Opened::Done(outcome) => return outcome,
            Opened::Unsupported => None,
        };
        // Awaited outside the match: the value matched on would otherwise
        // keep a place in this future beside the relay's wait.
        let Some(first) = &upstream else {
            return Box::pin(h1_over_own_connection(shared, connector, ctx, app)).await;
        };
        super::tunnel::count_allowed(shared, first);
        let relays_http = first.relays_http;
        // The peer's ID as the tunnel holds it (shared, not copied), parsed
        // for the access log when the connection ends.
        let peer = first.peer().cloned();
        let done = if relays_http {
            let (http, idle) = (&shared.http, shared.timeouts.idle);
            let peer = peer.as_deref();
            crate::http::outbound::relay_h1_pooled(http, &dest, peer, &mut app, &mut upstream, idle)
                .await
        } else {
            // Boxed: a `tcp` or `auto` port's tunnel, one app connection's.
            Box::pin(relay_h1(
                shared,
                ctx,
                &mut app,
                &mut upstream,
                peer.as_deref(),
            ))
            .await
        };
        // One await for the whole ending: what it holds shares its place
        // with the relay's wait.
        end_h1(shared, &dest.key, &mut app, upstream).await;
        h1_outcome(done, super::tunnel::peer_id(peer.as_deref()))
    }
}

/// Ends an HTTP/1 app connection relayed through tunnels: the app first
/// (it may be waiting for the close to end its response), then the tunnel
/// it holds, if any.
async fn end_h1(
    shared: &Shared,
    key: &Arc<str>,
    app: &mut TcpStream,
    upstream: Option<Box<Tunnel>>,
) {
    close_gracefully(app).await;
    match upstream {
        // Never used (the app closed before a request): for the next.
        Some(tunnel) if tunnel.relays_http => shared.http.tunnels.put(key.clone(), tunnel, ()),
        // Still usable: ended by the app, so the stream ends at both ends.
        Some(mut tunnel) => crate::net::close_both_ways(&mut tunnel).await,
        None => {}
    }
}

/// HTTP/1 to a peer without tunnels: over an mTLS connection of its own,
/// an idle one an earlier app connection left (`PeerPool`) if any, left
/// there in turn when the app closes.
async fn h1_over_own_connection(
    shared: &Shared,
    connector: &TlsConnector,
    ctx: &OutboundContext,
    mut app: TcpStream,
) -> Outcome {
    let key = pool_key(ctx);
    let pooled = shared.http.peers.take(&key);
    let (tls, peer_id) = match pooled {
        Some(parked) => parked,
        None => match super::outbound::connect_peer(shared, connector, ctx).await {
            Ok(connected) => connected,
            Err(outcome) => return outcome,
        },
    };
    let mut upstream = Some(tls);
    let peer = peer_id.as_ref().map(crate::policy::SpiffeId::as_str);
    let done = relay_h1(shared, ctx, &mut app, &mut upstream, peer).await;
    if let Some(tls) = upstream {
        shared.http.peers.put(key, tls, peer_id.clone());
    }
    close_gracefully(&mut app).await;
    h1_outcome(done, peer_id)
}

/// The app's HTTP/1 relayed over `upstream` to the peer that reached
/// `peer` (its SPIFFE ID), with this sidecar's idle timeout.
async fn relay_h1<U>(
    shared: &Shared,
    ctx: &OutboundContext,
    app: &mut TcpStream,
    upstream: &mut Option<U>,
    peer: Option<&str>,
) -> crate::http::h1::Relayed
where
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let idle = shared.timeouts.idle;
    crate::http::outbound::relay_h1(&shared.http, ctx.port, peer, app, upstream, idle).await
}

/// The tunnel an HTTP/1 app connection starts with: an idle one another
/// app connection to the destination left, or a new one. Boxed, as the
/// pool keeps them: an idle app connection holds a place for one (8
/// bytes, not 72: its state's allocation is then 896 bytes, not 1,024).
async fn first_tunnel(
    shared: &Shared,
    dest: &TunnelDest<'_>,
    ctx: &OutboundContext,
    app: &mut TcpStream,
) -> Opened<Box<Tunnel>> {
    if let Some((tunnel, ())) = shared.http.tunnels.take(&dest.key) {
        return Opened::Tunnel(tunnel);
    }
    // The caller checked that it parses.
    let Ok(authority) = ctx.dst.parse::<Authority>() else {
        return Opened::Unsupported;
    };
    // Boxed: see `open_on`.
    Box::pin(super::tunnel::open_on(
        shared,
        &(dest.conn)(),
        authority,
        ctx,
        app,
    ))
    .await
    .boxed()
}

/// The access-log outcome of an HTTP/1 relay: a peer that closed before
/// the first request refused the connection (as it closes a denied L4
/// one).
fn h1_outcome(done: crate::http::h1::Relayed, peer_id: Option<crate::policy::SpiffeId>) -> Outcome {
    let refused = done.upstream_closed_first && done.requests == 0;
    Outcome {
        bytes_in: done.bytes_in,
        bytes_out: done.bytes_out,
        error: if refused {
            None
        } else {
            done.error.map(|e| *e)
        },
        refused,
        peer_id,
    }
}

/// The pooled mesh connection to `ctx`'s destination, as the HTTP layer
/// takes it (HTTP/2 requests and tunnels share it).
pub(super) fn mesh_conn(
    shared: &Shared,
    mesh: &MeshConnectors,
    ctx: &OutboundContext,
) -> OutboundConn {
    OutboundConn {
        key: pool_key(ctx),
        dst: ctx.dst.clone(),
        port: ctx.port,
        connector: mesh.clone(),
        server_name: super::outbound::server_name(&ctx.dst),
        connect_timeout: shared.timeouts.connect,
        handshake_timeout: shared.timeouts.handshake,
        client: ctx.client,
    }
}

/// HTTP over the mesh pool; `Err(app)` hands the connection back for opaque
/// TCP when the peer is not a stepmesh sidecar.
async fn outbound_http(
    shared: &Shared,
    mesh: &MeshConnectors,
    ctx: &OutboundContext,
    app: TcpStream,
) -> Result<Outcome, TcpStream> {
    let conn = Arc::new(mesh_conn(shared, mesh, ctx));
    match crate::http::outbound::connect(&shared.http, &conn).await {
        Ok(peer) => {
            let peer_id = peer.and_then(|p| crate::policy::SpiffeId::parse(&p).ok());
            let mut outcome = match crate::http::outbound::serve(
                shared.http.clone(),
                conn,
                app,
                shared.http.drained(),
            )
            .await
            {
                Ok(()) => Outcome::default(),
                Err(e) => crate::http::served_failure(e),
            };
            outcome.peer_id = peer_id;
            Ok(outcome)
        }
        Err(MeshError::NoMeshAlpn(dst)) => {
            tracing::debug!(%dst, "peer does not speak stepmesh/h2: opaque TCP");
            Err(app)
        }
        Err(e) => {
            tracing::warn!(dst = %ctx.dst, error = %e, "outbound: no mesh connection");
            Ok(Outcome::failed("peer_connect", e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, E, F: Future>(_: impl FnOnce(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An HTTP/1 app connection's state while it waits between requests,
    /// boxed beside its task: the relay's buffers, timer and request in
    /// flight are boxed again and gone while it waits, so this is what
    /// 10,000 idle keep-alive connections hold. (Release build, from
    /// `-Zprint-type-sizes`: 2,192 bytes with the relay's state and the
    /// `async fn` argument copies inline, 1,376 without; 968 since the
    /// idle timer's wait holds its read once, the mesh connection's
    /// settings are made only to open a tunnel and no value the ending
    /// needs keeps a place beside the wait: a 1 KiB allocation, not 1.5;
    /// 896 since the tunnel it may hold is boxed, as the pool keeps it;
    /// 760 since the followed mesh connection's end is waited for on a
    /// `Notify` (168 bytes on a `watch`) and the relay's error is boxed: a
    /// 768-byte allocation. Debug 768.)
    #[test]
    fn an_outbound_http1_connection_stays_small() {
        let size = future_size(outbound_h1);
        eprintln!("outbound HTTP/1 connection future: {size} B");
        let limit = if cfg!(debug_assertions) { 776 } else { 768 };
        assert!(size <= limit, "outbound HTTP/1 connection future: {size} B");
    }
}
