//! The protocol seams: once a connection is authenticated (inbound) or
//! classified (outbound), this decides its protocol handler — the HTTP
//! layer (`crate::http`) or opaque TCP (`crate::net::forward`). The sidecar
//! sits above both; neither imports the sidecar.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsConnector;

use super::conn::{close_gracefully, InboundContext, OutboundContext, Outcome, Shared};
use crate::http::detect::{self, Detected, Prefixed};
use crate::http::inbound::InboundConn;
use crate::http::outbound::{MeshError, OutboundConn};
use crate::http::MESH_ALPN;
use crate::metrics::Direction;
use crate::policy::{OutboundAction, Protocol};

/// How long the outbound side waits for the app's first bytes before
/// treating the connection as opaque (server-speaks-first protocols).
pub const OUTBOUND_DETECT: Duration = Duration::from_millis(500);
/// How long an `auto` inbound port waits for the first bytes.
pub const INBOUND_DETECT: Duration = Duration::from_secs(10);

/// The ALPN ids inbound listeners accept: ours first, then the app protocols.
pub fn server_alpn() -> Vec<Vec<u8>> {
    vec![MESH_ALPN.to_vec(), b"h2".to_vec(), b"http/1.1".to_vec()]
}

/// Whether a connection the L4 decision denied still gets served, so each
/// request can be answered 403 (SPEC.md: HTTP routes answer 403): a peer
/// sidecar's HTTP connection, an `http` port, or an `auto` port (denied and
/// not HTTP, it is closed after detection).
pub fn serves_denied(alpn: Option<&[u8]>, protocol: Protocol) -> bool {
    alpn == Some(MESH_ALPN) || matches!(protocol, Protocol::Http | Protocol::Auto)
}

/// The inbound seam: HTTP for peer sidecars, `http` ports and HTTP-looking
/// `auto` connections; opaque TCP otherwise (and only if allowed).
pub async fn inbound(shared: &Shared, ctx: &InboundContext, tls: TlsStream<TcpStream>) -> Outcome {
    // The HTTP paths are boxed: an opaque TCP connection's task must stay
    // as small as the L4 path alone (idle connections are counted in KiB).
    let mesh = ctx.alpn.as_deref() == Some(MESH_ALPN);
    if mesh || ctx.protocol == Protocol::Http {
        return Box::pin(serve_inbound_http(shared, ctx, tls, mesh)).await;
    }
    if ctx.protocol == Protocol::Tcp {
        if allowed(shared, ctx) {
            return super::inbound::forward_tcp(shared, ctx, tls).await;
        }
        let mut tls = tls;
        close_gracefully(&mut tls).await;
        return Outcome::default();
    }
    Box::pin(inbound_auto(shared, ctx, tls)).await
}

fn allowed(shared: &Shared, ctx: &InboundContext) -> bool {
    shared
        .policy
        .current()
        .authorize(&ctx.peer_id, ctx.port)
        .allow
}

/// An `auto` port: HTTP if the first bytes say so, else opaque TCP.
async fn inbound_auto(shared: &Shared, ctx: &InboundContext, tls: TlsStream<TcpStream>) -> Outcome {
    let mut tls = tls;
    let sniffed = tokio::time::timeout(INBOUND_DETECT, detect::sniff(&mut tls)).await;
    let (detected, prefix) = match sniffed {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return Outcome::failed("io", e),
        Err(_) => (Detected::Opaque, bytes::Bytes::new()),
    };
    if detected.is_http() {
        let conn = inbound_conn(ctx, false);
        let mut revoked = None;
        let stop = drain_or_revoked(shared, ctx, &mut revoked);
        let outcome = crate::http::inbound::serve_detected(
            shared.http.clone(),
            conn,
            tls,
            detected,
            prefix,
            stop,
        )
        .await;
        return with_revoked(outcome, revoked);
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
    // Deliberate closes say so with close_notify, so the peer sidecar logs a
    // refusal rather than an I/O error.
    if has_routes || !allowed(shared, ctx) {
        close_gracefully(&mut io).await;
        return Outcome::default();
    }
    let mut app = match crate::net::dial(&ctx.app, shared.timeouts.connect).await {
        Ok(app) => app,
        Err(e) => {
            close_gracefully(&mut io).await;
            return Outcome::failed("app_connect", e);
        }
    };
    let counters = shared.metrics.byte_counters(Direction::Inbound);
    let done = {
        let copy = crate::net::forward::forward(&mut io, &mut app, shared.timeouts.idle, &counters);
        tokio::select! {
            done = copy => Ok(done),
            revoked = ctx.grant.revoked(shared, ctx) => Err(revoked),
        }
    };
    match done {
        Ok(done) => Outcome::forwarded(done),
        Err(revoked) => super::inbound::revoked_close(&mut io, revoked).await,
    }
}

/// What ends an inbound HTTP connection gracefully (in-flight requests
/// finish, no new ones are taken): the process draining, or a policy or
/// trust bundle change denying it (then `revoked` says why).
async fn drain_or_revoked(
    shared: &Shared,
    ctx: &InboundContext,
    revoked: &mut Option<super::reauth::Revoked>,
) {
    tokio::select! {
        () = shared.http.drained() => {}
        denied = ctx.grant.revoked(shared, ctx) => *revoked = Some(denied),
    }
}

/// The access-log outcome of an HTTP connection a change closed.
fn with_revoked(mut outcome: Outcome, revoked: Option<super::reauth::Revoked>) -> Outcome {
    if let Some(revoked) = revoked {
        if outcome.error.is_none() {
            outcome.error = Some(("revoked", revoked.to_string()));
        }
    }
    outcome
}

async fn serve_inbound_http<I>(shared: &Shared, ctx: &InboundContext, io: I, mesh: bool) -> Outcome
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = inbound_conn(ctx, mesh);
    let mut revoked = None;
    let stop = drain_or_revoked(shared, ctx, &mut revoked);
    let outcome = crate::http::inbound::serve_outcome(shared.http.clone(), conn, io, stop).await;
    with_revoked(outcome, revoked)
}

fn inbound_conn(ctx: &InboundContext, mesh: bool) -> Arc<InboundConn> {
    Arc::new(InboundConn {
        peer: ctx.peer_id.clone(),
        x5t: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ctx.peer_cert_sha256),
        own: ctx.own_id.as_ref().map(ToString::to_string),
        port: ctx.port,
        app: ctx.app.clone(),
        client: ctx.client,
        mesh,
    })
}

/// The outbound seam: an mTLS destination's HTTP/1 is relayed request by
/// request over an mTLS connection of its own, HTTP/2 rides the pooled
/// `stepmesh/h2` connection; anything else (or HTTP/2 to a peer that is not
/// a stepmesh sidecar) is opaque TCP.
pub async fn outbound(
    shared: &Shared,
    connector: &TlsConnector,
    mesh: &TlsConnector,
    ctx: &OutboundContext,
    app: TcpStream,
) -> Outcome {
    // An opaque port is not even peeked at: no detection delay, and what
    // looks like HTTP is carried as bytes like everything else.
    if ctx.action == OutboundAction::Mtls && !ctx.opaque {
        match detect::peek(&app, OUTBOUND_DETECT).await {
            // Boxed, so opaque TCP connections keep a small task (see inbound).
            Detected::Http1 => return Box::pin(outbound_h1(shared, connector, ctx, app)).await,
            Detected::Http2 => {
                return match Box::pin(outbound_http(shared, mesh, ctx, app)).await {
                    Ok(outcome) => outcome,
                    Err(app) => super::outbound::forward_tcp(shared, connector, ctx, app).await,
                }
            }
            Detected::Opaque | Detected::NeedMore => {}
        }
    }
    super::outbound::forward_tcp(shared, connector, ctx, app).await
}

/// Where pooled peer connections are kept: the expected identity and the
/// destination (both pools).
fn pool_key(ctx: &OutboundContext) -> Arc<str> {
    format!("{}@{}", ctx.expected, ctx.dst).into()
}

/// HTTP/1 relayed over an mTLS connection to the peer, one at a time per
/// app connection, as the L4 path would carry it; an idle one left by an
/// earlier app connection is taken first, and this one is left for the
/// next when the app closes.
async fn outbound_h1(
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
    let peer = peer_id.as_ref().map(crate::policy::SpiffeId::as_str);
    let idle = shared.timeouts.idle;
    let mut upstream = Some(tls);
    let done = crate::http::outbound::relay_h1(
        &shared.http,
        ctx.port,
        peer,
        &mut app,
        &mut upstream,
        idle,
    )
    .await;
    if let Some(tls) = upstream {
        shared.http.peers.put(key, tls, peer_id.clone());
    }
    close_gracefully(&mut app).await;
    let refused = done.upstream_closed_first && done.requests == 0;
    Outcome {
        bytes_in: done.bytes_in,
        bytes_out: done.bytes_out,
        error: if refused { None } else { done.error },
        refused,
        peer_id,
    }
}

/// HTTP over the mesh pool; `Err(app)` hands the connection back for opaque
/// TCP when the peer is not a stepmesh sidecar.
async fn outbound_http(
    shared: &Shared,
    mesh: &TlsConnector,
    ctx: &OutboundContext,
    app: TcpStream,
) -> Result<Outcome, TcpStream> {
    let conn = Arc::new(OutboundConn {
        key: pool_key(ctx),
        dst: ctx.dst.clone(),
        port: ctx.port,
        connector: mesh.clone(),
        server_name: super::outbound::server_name(&ctx.dst),
        connect_timeout: shared.timeouts.connect,
        handshake_timeout: shared.timeouts.handshake,
        client: ctx.client,
    });
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
                Err(e) => Outcome::failed("http", e),
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
