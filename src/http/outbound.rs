//! Outbound HTTP. HTTP/1 from the local app is relayed request by request
//! ([`relay_h1`]) to the peer sidecar as the L4 path would carry it (a
//! tunnel on the pooled mesh connection, or an mTLS connection of its own
//! to a peer without tunnels), so the request costs what the L4 path costs
//! plus a head parse. HTTP/2 rides pooled, multiplexed mTLS
//! connections to the peer sidecar (ALPN `stepmesh/h2`, the app's protocol
//! in `stepmesh-orig-proto`): a new app connection costs no handshake once
//! the pool holds a connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::headers::{absolute, strip_hop_by_hop, ORIG_PROTO};
use super::idle_pool::IdlePool;
use super::mesh::{self, MeshConnectors, Outgoing, Pooled, SendError};
use super::record::Exchange;
use super::tunnel::{self, Tunnel};
use super::{h1, serve_until, BoxError, HttpLayer, Local, ProxyBody, Verdict};

/// Where an outbound HTTP connection's requests go.
#[derive(Clone)]
pub struct OutboundConn {
    /// Pool key: the listener's expected identity and the destination.
    pub key: Arc<str>,
    /// The peer sidecar, host:port.
    pub dst: Arc<str>,
    /// The policy port (logs, metrics).
    pub port: u16,
    /// TLS to the peer: SVID client certificate, verifier of the expected
    /// identity; the mesh ALPNs for HTTP, `stepmesh/tunnel` for tunnels.
    pub connector: MeshConnectors,
    /// TLS server name (session cache key; identity is checked by SPIFFE ID).
    pub server_name: ServerName<'static>,
    /// Dial deadline.
    pub connect_timeout: Duration,
    /// Handshake deadline.
    pub handshake_timeout: Duration,
    /// The app's address (logs).
    pub client: SocketAddr,
}

impl std::fmt::Debug for OutboundConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundConn")
            .field("dst", &self.dst)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Why a mesh connection could not be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MeshError {
    /// TCP connect failed or timed out.
    #[error("connecting to {0}: {1}")]
    Connect(Arc<str>, String),
    /// TLS handshake failed or timed out.
    #[error("TLS to {0}: {1}")]
    Tls(Arc<str>, String),
    /// The peer is not a stepmesh sidecar speaking `stepmesh/h2`.
    #[error("{0} does not speak stepmesh/h2")]
    NoMeshAlpn(Arc<str>),
    /// The peer sidecar refused a tunnels-only connection (`stepmesh/tunnel`
    /// offered alone) with the `no_application_protocol` alert: a sidecar
    /// from before tunnels had a connection of their own on `http` and
    /// `auto` ports; they ride its mesh connection.
    #[error("{0} takes no stepmesh/tunnel connection on this port")]
    NoTunnelsOnly(Arc<str>),
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 with {0}: {1}")]
    H2(Arc<str>, String),
}

/// Makes sure a mesh connection to `conn.dst` exists (so the caller can
/// fall back to opaque TCP when the peer is not a stepmesh sidecar), and
/// returns the peer's SPIFFE ID.
pub async fn connect(
    layer: &HttpLayer,
    conn: &OutboundConn,
) -> Result<Option<Arc<str>>, MeshError> {
    let pooled = layer.mesh.get(conn, None).await?;
    if !pooled.kind.http {
        // A `tcp` port: tunnels only, the app's HTTP/2 goes as bytes.
        return Err(MeshError::NoMeshAlpn(conn.dst.clone()));
    }
    Ok(pooled.peer)
}

/// Serves the app's HTTP connection until it closes, or gracefully once
/// `drain` resolves.
pub async fn serve<I>(
    layer: Arc<HttpLayer>,
    conn: Arc<OutboundConn>,
    io: I,
    drain: impl Future<Output = ()> + Send,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let builder = super::server_builder(&layer.limits, false);
    let io = super::h2_header_deadline(&layer, "outbound", io);
    let svc = service_fn(move |req| {
        let (layer, conn) = (layer.clone(), conn.clone());
        async move { Ok::<_, Infallible>(handle(&layer, &conn, req).await) }
    });
    serve_until(&builder, io, svc, drain).await
}

/// Relays the app's HTTP/1 requests (their first bytes still unread in
/// `app`) over `peer` to the destination's sidecar, which reached
/// `peer_id`: a tunnel on the pooled mesh connection, or an mTLS
/// connection of its own (a peer without tunnels). Afterwards `peer` holds
/// the upstream if it can serve another app connection (see [`PeerPool`]).
pub(crate) async fn relay_h1<U>(
    layer: &HttpLayer,
    port: u16,
    peer_id: Option<&str>,
    app: &mut TcpStream,
    peer: &mut Option<U>,
    idle: Duration,
) -> h1::Relayed
where
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let side = PeerSide {
        layer,
        port,
        peer_id,
        upstream: std::marker::PhantomData,
    };
    h1::relay(&side, app, bytes::Bytes::new(), peer, idle, layer.drained()).await
}

/// Where an app connection's HTTP/1 requests go through pooled tunnels:
/// the pool's key and the policy port, and how to reach the destination
/// when no tunnel there is idle. The connection's settings are made only
/// then ([`TunnelDest::conn`]): an idle keep-alive app connection holds
/// this, and so pays for 40 bytes instead of an [`OutboundConn`].
pub(crate) struct TunnelDest<'a> {
    /// The pool key (expected identity and destination).
    pub key: Arc<str>,
    /// The policy port (logs, metrics).
    pub port: u16,
    /// Makes the mesh connection's settings (for opening a tunnel).
    pub conn: &'a (dyn Fn() -> OutboundConn + Send + Sync),
}

/// Relays the app's HTTP/1 requests (their first bytes still unread in
/// `app`) through tunnels that relay HTTP/1 at the peer (an `http` port):
/// `first` carries the first request; after each response that leaves it
/// clean the tunnel goes back to the layer's [`TunnelPool`] for any app
/// connection to the destination, and the next request takes one from
/// there (or opens one on the pooled mesh connection to `dest`). An idle
/// keep-alive app connection so holds no stream, and the peer nothing for
/// it. Afterwards `first` holds a tunnel still good for another request,
/// if the relay ended holding one: the first, when no request came, or
/// one this connection kept because it does not relay HTTP/1 at the peer
/// (reached after a change of the peer's policy).
///
/// [`TunnelPool`]: super::tunnel::TunnelPool
///
/// A plain `fn`, as [`h1::relay`]: an idle app connection holds this.
pub(crate) fn relay_h1_pooled<'a>(
    layer: &'a HttpLayer,
    dest: &'a TunnelDest<'a>,
    peer_id: Option<&'a str>,
    app: &'a mut TcpStream,
    first: &'a mut Option<Box<Tunnel>>,
    idle: Duration,
) -> impl Future<Output = h1::Relayed> + Send + 'a {
    let side = PooledTunnels {
        peer: PeerSide {
            layer,
            port: dest.port,
            peer_id,
            upstream: std::marker::PhantomData,
        },
        dest,
        gone: layer.mesh.first_ended(&dest.key),
    };
    async move {
        let drain = layer.drained();
        h1::relay(&side, app, bytes::Bytes::new(), first, idle, drain).await
    }
}

/// The outbound end of the HTTP/1 relay over pooled tunnels: as
/// [`PeerSide`], but a request takes whichever tunnel to the destination
/// is idle, or opens one, and leaves it for the next.
///
/// The app connection follows the destination's mesh connection it
/// started on: once the peer closes that one (a revocation, a drain, a
/// restart) the app connection takes no further request and, idle, ends,
/// as it would had it held a tunnel of its own.
struct PooledTunnels<'a> {
    peer: PeerSide<'a, Box<Tunnel>>,
    dest: &'a TunnelDest<'a>,
    gone: Option<mesh::PeerGone>,
}

impl PooledTunnels<'_> {
    fn peer_gone(&self) -> bool {
        self.gone.as_ref().is_some_and(mesh::PeerGone::is_gone)
    }

    /// Fails once the connection this app connection follows has gone.
    fn still_followed(&self) -> std::io::Result<()> {
        if self.peer_gone() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the peer closed the mesh connection this app connection rode",
            ));
        }
        Ok(())
    }
}

impl h1::Side for PooledTunnels<'_> {
    type Upstream = Box<Tunnel>;
    const REDIAL: bool = true;
    const DIRECTION: &'static str = "outbound";
    const DECIDES: bool = false;

    fn detail(&self) -> h1::message::Detail {
        h1::message::Detail::Scan
    }

    fn layer(&self) -> &HttpLayer {
        self.peer.layer
    }

    fn exchange(&self) -> Exchange {
        self.peer.exchange()
    }

    fn admit<'a>(
        &'a self,
        x: &'a mut Exchange,
        head: &'a mut h1::RequestHead,
        raw: &'a [u8],
    ) -> impl Future<Output = Verdict> + Send + 'a {
        self.peer.admit(x, head, raw)
    }

    async fn dial(&self) -> std::io::Result<Box<Tunnel>> {
        self.still_followed()?;
        let conn = (self.dest.conn)();
        // The original destination, whose port the peer decides the
        // stream by (the seam checked that it parses).
        let authority = conn
            .dst
            .parse::<Authority>()
            .map_err(std::io::Error::other)?;
        // Boxed: a tunnel's opening is large and rare next to a request.
        let opened = Box::pin(tunnel::open(self.peer.layer, &conn, authority)).await;
        // The opening may have found the followed connection going away
        // and taken another: this app connection ends all the same.
        self.still_followed()?;
        opened.map(Box::new).map_err(|e| {
            tracing::warn!(dst = %conn.dst, error = %e, "outbound: no tunnel for the next request");
            std::io::Error::other(e)
        })
    }

    fn reuse(&self) -> Option<Box<Tunnel>> {
        if self.peer_gone() {
            return None;
        }
        self.peer
            .layer
            .tunnels
            .take(&self.dest.key)
            .map(|(t, ())| t)
    }

    async fn gone(&self) {
        match &self.gone {
            Some(gone) => gone.wait().await,
            None => std::future::pending().await,
        }
    }

    fn release(&self, up: Box<Tunnel>) -> Option<Box<Tunnel>> {
        if !up.relays_http {
            return Some(up);
        }
        self.peer.layer.tunnels.put(self.dest.key.clone(), up, ());
        None
    }

    fn draining(&self) -> bool {
        self.peer.draining()
    }

    fn unavailable(&self) -> Local {
        peer_request_failed()
    }
}

/// How long an idle peer connection waits in the pool for another app
/// connection (well under the peer's own idle timeout).
pub(crate) const POOL_IDLE: Duration = Duration::from_secs(30);
/// The most idle connections kept per destination.
pub(crate) const POOL_PER_DESTINATION: usize = 64;

/// Idle HTTP/1 connections to peer sidecars without tunnels, per (expected
/// identity, destination), with the identity each reached: an app
/// connection that ends leaves its peer connection here for the next one,
/// so short-lived app connections (`Connection: close`, HTTP clients
/// without keep-alive) do not cost a TLS handshake each. One lock per app
/// connection, never per request.
pub(crate) type PeerPool = IdlePool<PeerStream, Option<crate::policy::SpiffeId>>;

/// The outbound end of the HTTP/1 relay: requests counted and logged, and
/// sent to the one peer connection (the decisions are the far side's).
struct PeerSide<'a, U> {
    layer: &'a HttpLayer,
    port: u16,
    peer_id: Option<&'a str>,
    upstream: std::marker::PhantomData<fn() -> U>,
}

/// An mTLS connection to a peer sidecar.
pub(crate) type PeerStream = tokio_rustls::client::TlsStream<TcpStream>;

impl<U> h1::Side for PeerSide<'_, U>
where
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    type Upstream = U;
    const REDIAL: bool = false;
    const DIRECTION: &'static str = "outbound";

    fn layer(&self) -> &HttpLayer {
        self.layer
    }

    const DECIDES: bool = false;

    fn detail(&self) -> h1::message::Detail {
        h1::message::Detail::Scan
    }

    fn exchange(&self) -> Exchange {
        let mut x = Exchange::new("outbound", self.port, &self.layer.log, &self.layer.metrics);
        if x.logging() {
            x.record.peer_id = self.peer_id.map(Arc::from);
        }
        x
    }

    fn admit<'a>(
        &'a self,
        x: &'a mut Exchange,
        head: &'a mut h1::RequestHead,
        raw: &'a [u8],
    ) -> impl Future<Output = Verdict> + Send + 'a {
        if x.logging() {
            let target = raw.get(head.target.clone()).unwrap_or_default();
            let target = String::from_utf8_lossy(target);
            let path = target.split_once('?').map_or(&*target, |(path, _)| path);
            x.record.method = super::record::method_label(&head.parts.method);
            x.record.path = path.to_owned();
            x.record.version = orig_proto(head.parts.version);
        }
        if !head.clean {
            strip_hop_by_hop(&mut head.parts.headers);
        }
        std::future::ready(Verdict::Forward {
            decision: "allow",
            reason: "mesh",
        })
    }

    fn dial(&self) -> impl Future<Output = std::io::Result<U>> + Send {
        std::future::ready(Err(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "the peer sidecar closed the connection",
        )))
    }

    fn draining(&self) -> bool {
        self.layer.is_draining()
    }

    fn unavailable(&self) -> Local {
        peer_request_failed()
    }
}

/// The answer when a request to the peer sidecar fails (either engine).
fn peer_request_failed() -> Local {
    Local::error(
        StatusCode::BAD_GATEWAY,
        "peer_request_failed",
        "the request to the destination failed\n",
    )
}

fn orig_proto(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

async fn handle(
    layer: &HttpLayer,
    conn: &OutboundConn,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let mut x = Exchange::new("outbound", conn.port, &layer.log, &layer.metrics);
    let orig = req.version();
    if x.logging() {
        x.record.method = super::record::method_label(req.method());
        x.record.path = req.uri().path().to_owned();
        x.record.version = orig_proto(orig);
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // HTTP/2 wants the authority in the URI, not a Host header.
    let authority = match parts.uri.authority() {
        Some(a) => Ok(a.clone()),
        None => match parts.headers.get(http::header::HOST).map(|h| h.to_str()) {
            Some(Ok(host)) => Authority::try_from(host),
            _ => Authority::try_from(&*conn.dst),
        },
    };
    parts.headers.remove(http::header::HOST);
    parts.uri = match authority.ok().and_then(|a| absolute(a, &parts.uri)) {
        Some(uri) => uri,
        None => {
            let local = Local::error(
                StatusCode::BAD_REQUEST,
                "bad_request_target",
                "bad request target\n",
            );
            return local.respond(x);
        }
    };
    parts.version = Version::HTTP_2;
    parts
        .headers
        .insert(ORIG_PROTO, HeaderValue::from_static(orig_proto(orig)));
    let body = x.count_request(body);
    let mut out = match Outgoing::new(parts, body).await {
        Ok(out) => out,
        Err(e) => {
            tracing::debug!(error = %e, "outbound: the app's request body failed");
            let local = Local::error(
                StatusCode::BAD_REQUEST,
                "request_body_failed",
                "the request body could not be read\n",
            );
            return local.respond(x);
        }
    };
    let logging = x.logging();
    let mut peer_id = None;
    let mut on_peer = |p: &Pooled| {
        if logging && peer_id.is_none() {
            peer_id = p.peer.as_deref().map(Arc::from);
        }
    };
    let sent = mesh::send(&layer.mesh, conn, &mut out, &mut on_peer).await;
    if logging {
        x.record.peer_id = peer_id;
    }
    match sent {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let body = x.respond(parts.status, "allow", "mesh", body.boxed());
            Response::from_parts(parts, body)
        }
        Err(SendError::Unavailable(e)) => {
            tracing::warn!(dst = %conn.dst, error = %e, "outbound: no mesh connection");
            let local = Local::error(
                StatusCode::BAD_GATEWAY,
                "peer_unavailable",
                "the destination's sidecar is unreachable\n",
            );
            local.respond(x)
        }
        Err(SendError::Failed(e)) => {
            tracing::warn!(dst = %conn.dst, error = %e, "outbound: mesh request failed");
            peer_request_failed().respond(x)
        }
    }
}
