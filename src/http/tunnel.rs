//! Opaque TCP between sidecars as HTTP/2 CONNECT tunnels (as ztunnel's
//! HBONE): one stream per app connection on the pooled mesh connection to
//! the peer, so the peer's cost does not grow by an mTLS connection per
//! app connection. The outbound half opens a stream ([`open`]); the
//! inbound half hands each CONNECT request to the sidecar ([`Tunnels`]),
//! which decides it as it decides an L4 connection. docs/PROXY.md,
//! "Tunnels between sidecars".

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

use super::mesh::{self, Outgoing, SendError, TUNNEL_LIMIT};
use super::outbound::{MeshError, OutboundConn};
use super::{HttpLayer, ProxyBody};

/// The sidecar's handler of the CONNECT requests a peer sidecar sends on a
/// mesh connection that negotiated tunnels: it decides the stream, answers
/// (`200` and then serves the upgraded stream, or a refusal) and keeps
/// the HTTP layer ignorant of the sidecar.
#[derive(Clone)]
pub struct Tunnels(pub Arc<dyn Fn(Request<Incoming>) -> Answer + Send + Sync>);

/// The answer to one CONNECT request.
pub type Answer = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>;

impl std::fmt::Debug for Tunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tunnels")
    }
}

/// A bodiless answer to a CONNECT request: `200` opens the tunnel, `403`
/// is a policy refusal, anything else a failure.
pub fn answer(status: StatusCode) -> Response<ProxyBody> {
    let mut resp = Response::new(Empty::<Bytes>::new().map_err(|n| match n {}).boxed());
    *resp.status_mut() = status;
    resp
}

/// An open tunnel to the peer's app, as bytes both ways.
pub struct Tunnel {
    /// The stream: EOF is the peer's END_STREAM, shutdown sends ours.
    pub io: TokioIo<Upgraded>,
    /// The peer's SPIFFE ID (from the pooled connection's certificate).
    pub peer: Option<Arc<str>>,
    _open: OpenGuard,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Counts a tunnel on its pooled connection while it is open.
struct OpenGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
/// peer decides the stream by) on the pooled mesh connection to
/// `conn.dst`, dialled if there is none. A stream the peer did not process
/// (refused, above a GOAWAY) is sent once more, as HTTP requests are.
pub async fn open(
    layer: &HttpLayer,
    conn: &OutboundConn,
    authority: Authority,
) -> Result<Tunnel, TunnelError> {
    let pooled = match layer.mesh.get(conn, None).await {
        Ok(pooled) => pooled,
        Err(MeshError::NoMeshAlpn(_)) => return Err(TunnelError::Unsupported),
        Err(e) => return Err(TunnelError::Unavailable(e)),
    };
    if !pooled.kind.tunnels {
        return Err(TunnelError::Unsupported);
    }
    // Counted before the stream is opened: racing callers cannot overshoot.
    if pooled.tunnels.fetch_add(1, Ordering::AcqRel) >= TUNNEL_LIMIT {
        pooled.tunnels.fetch_sub(1, Ordering::AcqRel);
        return Err(TunnelError::Unsupported);
    }
    let mut counted = OpenGuard(pooled.tunnels.clone());
    let mut peer = pooled.peer.clone();
    let mut out = Outgoing::connect(authority);
    let mut on_peer = |p: &mesh::Pooled| {
        peer.clone_from(&p.peer);
        if !Arc::ptr_eq(&counted.0, &p.tunnels) {
            // A retry on a new connection: count the tunnel there.
            p.tunnels.fetch_add(1, Ordering::AcqRel);
            counted = OpenGuard(p.tunnels.clone());
        }
    };
    let resp = match mesh::send(&layer.mesh, conn, &mut out, &mut on_peer).await {
        Ok(resp) => resp,
        Err(SendError::Unavailable(e)) => return Err(TunnelError::Unavailable(e)),
        Err(SendError::Failed(e)) => return Err(TunnelError::Failed(e.to_string())),
    };
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::FORBIDDEN => return Err(TunnelError::Refused(StatusCode::FORBIDDEN)),
        status => return Err(TunnelError::Failed(format!("the peer answered {status}"))),
    }
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|e| TunnelError::Failed(e.to_string()))?;
    Ok(Tunnel {
        io: TokioIo::new(upgraded),
        peer,
        _open: counted,
    })
}
