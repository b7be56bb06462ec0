//! A peer sidecar's tunnels-only mesh connection (ALPN `stepmesh/tunnel`,
//! a `tcp` port's), served on h2 directly: each CONNECT stream goes to
//! the sidecar's [`TunnelHandler`](super::tunnel::TunnelHandler), which
//! reads and writes it from the stream's own task (`super::h2_stream`);
//! any other request is refused. The same settings, header deadline and
//! drain as the connections hyper serves.

use std::future::Future;

use bytes::Bytes;
use http::{Response, StatusCode};

use super::tunnel::Tunnels;
use super::{h2_settings, HttpLayer};
use crate::net::Outcome;

/// Serves the connection until it closes, or gracefully once `drain`
/// resolves (GOAWAY; open tunnels go on to their end).
pub(crate) async fn serve<I>(
    layer: &HttpLayer,
    tunnels: &Tunnels,
    io: I,
    drain: impl Future<Output = ()> + Send,
) -> Outcome
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::pin!(drain);
    // As `super::serve_until`: a connection that starts once the drain has
    // begun is closed unserved.
    if futures_util::FutureExt::now_or_never(drain.as_mut()).is_some() {
        return Outcome::default();
    }
    let io = super::h2_header_deadline(layer, "inbound", io);
    let header_list = u32::try_from(layer.limits.head.bytes).unwrap_or(u32::MAX);
    let handshake = h2_settings::tunnel_server(header_list).handshake::<_, Bytes>(io);
    let mut conn = match handshake.await {
        Ok(conn) => conn,
        Err(e) => return super::served_failure(Box::new(e)),
    };
    let mut draining = false;
    loop {
        let accepted = tokio::select! {
            accepted = conn.accept() => accepted,
            () = drain.as_mut(), if !draining => {
                conn.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        match accepted {
            None => return Outcome::default(),
            Some(Err(e)) => return super::served_failure(Box::new(e)),
            Some(Ok((req, respond))) if req.method() == http::Method::CONNECT => {
                tunnels.0.open_stream(req, respond);
            }
            Some(Ok((_, mut respond))) => {
                layer.metrics.refusal("inbound", "not_http");
                let mut misdirected = Response::new(());
                *misdirected.status_mut() = StatusCode::MISDIRECTED_REQUEST;
                // The stream may be gone already: nothing then to answer.
                let _ = respond.send_response(misdirected, true);
            }
        }
    }
}
