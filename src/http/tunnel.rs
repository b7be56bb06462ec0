//! Opaque TCP between sidecars as HTTP/2 CONNECT tunnels (as ztunnel's
//! HBONE): one stream per app connection on the pooled mesh connection to
//! the peer, so the peer's cost does not grow by an mTLS connection per
//! app connection. The outbound half opens a stream ([`open`]); the
//! inbound half hands each CONNECT request to the sidecar ([`Tunnels`]),
//! which decides it as it decides an L4 connection. docs/PROXY.md,
//! "Tunnels between sidecars".

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::headers::TUNNEL_RELAYS;
use super::idle_pool::IdlePool;

use super::h2_stream::StreamIo;
use super::mesh::{self, Outgoing, Sender, TunnelCount};
use super::outbound::{MeshError, OutboundConn};
use super::{HttpLayer, ProxyBody};

/// The sidecar's handler of the CONNECT streams a peer sidecar opens on
/// a mesh connection that negotiated tunnels: it decides each stream,
/// answers (`200` and then serves the stream, or a refusal) and keeps the
/// HTTP layer ignorant of the sidecar.
#[derive(Clone)]
pub struct Tunnels(pub Arc<dyn TunnelHandler>);

/// What the sidecar does with one CONNECT stream, on either kind of mesh
/// connection.
pub trait TunnelHandler: Send + Sync {
    /// A CONNECT request on a connection hyper serves (one that carries
    /// HTTP requests too): the answer, the stream served once hyper hands
    /// it over.
    fn open_upgraded(&self, req: Request<Incoming>) -> Response<ProxyBody>;

    /// A CONNECT stream on a tunnels-only connection, served on h2
    /// directly: answered through `respond`, then served.
    fn open_stream(&self, req: Request<RecvStream>, respond: SendResponse<Bytes>);
}

impl std::fmt::Debug for Tunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tunnels")
    }
}

/// A bodiless answer to a CONNECT request: `200` opens the tunnel (with
/// `relays`, one whose HTTP/1 this side relays request by request: the
/// peer may then share it between its app connections, [`TUNNEL_RELAYS`]),
/// `403` is a policy refusal, anything else a failure.
pub fn head(status: StatusCode, relays: bool) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    if relays {
        resp.headers_mut()
            .insert(TUNNEL_RELAYS, HeaderValue::from_static("http/1.1"));
    }
    resp
}

/// [`head`] as hyper sends it.
pub fn answer(head: Response<()>) -> Response<ProxyBody> {
    head.map(|()| Empty::<Bytes>::new().map_err(|n| match n {}).boxed())
}

/// An open tunnel to the peer's app, as bytes both ways.
pub struct Tunnel {
    /// The stream: EOF is the peer's END_STREAM, shutdown sends ours.
    pub io: TunnelIo,
    /// The peer relays this stream's HTTP/1 request by request: between
    /// requests it can serve any app connection to the same destination
    /// ([`TunnelPool`]). Otherwise it is one app connection's (an opaque
    /// port's app connection at the far end).
    pub relays_http: bool,
    /// Counts it on its connection while open; whom it reaches.
    open: TunnelCount,
}

/// Idle tunnels that relay HTTP/1, per pool key (expected identity and
/// destination), taken by the next request of any app connection there: an
/// idle keep-alive app connection then holds no stream, and the peer
/// nothing for it (as nginx and HAProxy hold no upstream connection for an
/// idle client).
pub(crate) type TunnelPool = IdlePool<Box<Tunnel>>;

/// How long an idle tunnel waits in the pool: a new one costs one round
/// trip on the pooled mesh connection, so little is kept for long.
pub(crate) const POOL_IDLE: Duration = Duration::from_secs(10);
/// The most idle tunnels kept per destination.
pub(crate) const POOL_PER_DESTINATION: usize = 128;

/// A tunnel's stream: hyper's upgrade on a connection that carries HTTP
/// requests too, or the h2 stream itself on a tunnels-only one.
pub enum TunnelIo {
    /// Handed over by hyper.
    Upgraded(TokioIo<Upgraded>),
    /// Read and written on h2 directly.
    Stream(StreamIo),
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            TunnelIo::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
            TunnelIo::Stream(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            TunnelIo::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
            TunnelIo::Stream(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            TunnelIo::Upgraded(io) => Pin::new(io).poll_flush(cx),
            TunnelIo::Stream(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            TunnelIo::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
            TunnelIo::Stream(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

impl Tunnel {
    /// The peer's SPIFFE ID (from the pooled connection's certificate).
    pub fn peer(&self) -> Option<&Arc<str>> {
        self.open.peer()
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("peer", &self.peer())
            .field("relays_http", &self.relays_http)
            .finish_non_exhaustive()
    }
}

/// Why no tunnel was opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The peer does not take tunnels here (a sidecar without them, a
    /// destination that is not a sidecar, or the pooled connection is
    /// full): the caller takes the L4 path, an mTLS connection of its own.
    #[error("no tunnel to this peer")]
    Unsupported,
    /// The peer's policy refused the stream (`403`).
    #[error("the peer refused the tunnel ({0})")]
    Refused(StatusCode),
    /// No mesh connection could be made.
    #[error(transparent)]
    Unavailable(MeshError),
    /// The stream failed or was answered with an error.
    #[error("tunnel: {0}")]
    Failed(String),
}

/// Opens a tunnel to `authority` (the original destination, whose port the
/// peer decides the stream by) on a pooled mesh connection to `conn.dst`
/// with room for it (dialled if there is none). A stream the peer did not
/// process (the connection closed first, the stream refused, above a
/// GOAWAY) is sent once more, as HTTP requests are.
pub async fn open(
    layer: &HttpLayer,
    conn: &OutboundConn,
    authority: Authority,
) -> Result<Tunnel, TunnelError> {
    let mut retried = false;
    loop {
        let (pooled, counted) = match layer.mesh.get_for_tunnel(conn).await {
            Ok(got) => got,
            Err(MeshError::NoMeshAlpn(_)) => return Err(TunnelError::Unsupported),
            Err(e) => return Err(TunnelError::Unavailable(e)),
        };
        // Counted on the connection by `get_for_tunnel` (uncounted when
        // this ends); nothing counted: the peer takes no tunnels.
        let Some(counted) = counted else {
            return Err(TunnelError::Unsupported);
        };
        let failed = match connect_on(pooled.sender(), &authority).await {
            Ok(answered) => return opened(answered, counted).await,
            Err(failed) => failed,
        };
        if pooled.is_closed() || failed.going_away {
            // The connection is going away: the next attempt takes another.
            layer.mesh.retire(&conn.key, pooled.id);
        }
        // Never sent twice what the peer may have processed.
        if retried || !failed.unsent {
            return Err(TunnelError::Failed(failed.error));
        }
        tracing::debug!(dst = %conn.dst, error = %failed.error, "tunnel not opened by the peer: once more");
        retried = true;
    }
}

/// The answer to a CONNECT request, on either kind of connection.
enum Answered {
    Hyper(Response<Incoming>),
    Stream(Response<RecvStream>, SendStream<Bytes>),
}

/// Why a CONNECT request got no answer.
struct NotOpened {
    error: String,
    /// The peer never processed it: it may be sent again.
    unsent: bool,
    /// The connection is going away (the peer's GOAWAY).
    going_away: bool,
}

/// Sends the CONNECT request on the connection `send` and waits for the
/// answer's head.
async fn connect_on(send: Sender, authority: &Authority) -> Result<Answered, NotOpened> {
    match send {
        Sender::Hyper(mut send) => {
            let hyper_failed = |e: hyper::Error, unsent: bool| NotOpened {
                unsent: unsent || mesh::never_processed(&e),
                going_away: mesh::peer_going_away(&e),
                error: e.to_string(),
            };
            send.ready().await.map_err(|e| hyper_failed(e, true))?;
            let req = Outgoing::connect(authority.clone()).first();
            let resp = send.try_send_request(req).await.map_err(|mut e| {
                let unsent = e.take_message().is_some();
                hyper_failed(e.into_error(), unsent)
            })?;
            Ok(Answered::Hyper(resp))
        }
        Sender::Tunnels(send) => {
            let h2_failed = |e: h2::Error, unsent: bool| NotOpened {
                unsent: unsent || mesh::not_processed(&e),
                going_away: mesh::going_away(&e),
                error: e.to_string(),
            };
            let mut send = send.ready().await.map_err(|e| h2_failed(e, true))?;
            let mut req = Request::new(());
            *req.method_mut() = http::Method::CONNECT;
            *req.uri_mut() = http::Uri::from(authority.clone());
            let (resp, stream) = send
                .send_request(req, false)
                .map_err(|e| h2_failed(e, true))?;
            let resp = resp.await.map_err(|e| h2_failed(e, false))?;
            Ok(Answered::Stream(resp, stream))
        }
    }
}

/// The tunnel a `200` opened, or why the answer refused it.
async fn opened(answered: Answered, counted: TunnelCount) -> Result<Tunnel, TunnelError> {
    let (status, headers) = match &answered {
        Answered::Hyper(resp) => (resp.status(), resp.headers()),
        Answered::Stream(resp, _) => (resp.status(), resp.headers()),
    };
    match status {
        StatusCode::OK => {}
        StatusCode::FORBIDDEN => return Err(TunnelError::Refused(StatusCode::FORBIDDEN)),
        status => return Err(TunnelError::Failed(format!("the peer answered {status}"))),
    }
    let relays_http = headers
        .get(TUNNEL_RELAYS)
        .is_some_and(|v| v.as_bytes() == b"http/1.1");
    let io = match answered {
        Answered::Hyper(resp) => {
            let upgraded = hyper::upgrade::on(resp)
                .await
                .map_err(|e| TunnelError::Failed(e.to_string()))?;
            TunnelIo::Upgraded(TokioIo::new(upgraded))
        }
        Answered::Stream(resp, send) => TunnelIo::Stream(StreamIo::new(send, resp.into_body())),
    };
    Ok(Tunnel {
        io,
        relays_http,
        open: counted,
    })
}
