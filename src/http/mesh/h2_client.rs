//! The client end of a tunnels-only mesh connection (`stepmesh/tunnel`, a
//! `tcp` port's), on h2 directly: its streams are read and written from
//! the app connections' own tasks (`crate::http::h2_stream`), with no
//! bridge task per stream as hyper's upgrades have.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::super::h2_settings;
use crate::http::outbound::MeshError;

/// Starts HTTP/2 on `io` and the task that drives the connection, which
/// drops `ending` once the connection has ended. `tunnels`: the
/// connection's open tunnels (it is pinged only while it has some, as
/// `keep_alive` says).
pub(super) async fn handshake<T>(
    io: T,
    dst: &Arc<str>,
    tunnels: Arc<super::ConnTunnels>,
    keep_alive: super::KeepAlive,
    ending: super::Closing,
) -> Result<h2::client::SendRequest<Bytes>, MeshError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = h2_settings::tunnel_client()
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| MeshError::H2(dst.clone(), e.to_string()))?;
    let task = tokio::spawn({
        let tunnels = tunnels.clone();
        async move {
            if let Err(e) = drive(connection, &tunnels, keep_alive).await {
                tracing::debug!(error = %e, "mesh tunnels connection ended");
            }
            drop(ending);
        }
    });
    tunnels.driven_by(&task);
    Ok(send)
}

/// Runs the connection until it ends, pinging the peer every
/// `keep_alive.interval` while tunnels are open: a peer gone silent (a
/// host that vanished) ends it, and with it its tunnels, after
/// `keep_alive.timeout`.
async fn drive<T>(
    mut connection: h2::client::Connection<T, Bytes>,
    tunnels: &super::ConnTunnels,
    keep_alive: super::KeepAlive,
) -> Result<(), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Some(mut pings) = connection.ping_pong() else {
        // Only a second call returns none: this is the first.
        return connection.await;
    };
    let mut every = tokio::time::interval(keep_alive.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.reset();
    loop {
        tokio::select! {
            done = &mut connection => return done,
            _ = every.tick() => {}
        }
        if tunnels.open() == 0 {
            continue;
        }
        let pong = tokio::time::timeout(keep_alive.timeout, pings.ping(h2::Ping::opaque()));
        tokio::select! {
            done = &mut connection => return done,
            answered = pong => match answered {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    tracing::warn!(timeout = ?keep_alive.timeout, "mesh tunnels connection: no answer to a ping in time; closing it and its tunnels");
                    return Ok(());
                }
            },
        }
    }
}
