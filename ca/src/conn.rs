//! Accepted TLS connections for tonic: handshakes run concurrently (a slow
//! client cannot stall the accept loop) and each connection carries its
//! peer address and client certificate chain into request extensions.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::service::ConnInfo;

/// A TLS handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections (handshaking or open) beyond this are closed at once, so a
/// flood cannot exhaust memory or file descriptors.
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections from one source address beyond this are closed at once, so
/// one pod cannot take every slot above (a sidecar holds one or two; a
/// node whose pods are masqueraded to its address, about 110 pods, fits).
pub const MAX_PER_SOURCE: usize = 256;

/// One accepted, handshaken connection.
pub struct CaConn {
    stream: TlsStream<TcpStream>,
    info: ConnInfo,
    // Both released when tonic drops the connection.
    _permit: OwnedSemaphorePermit,
    _source: SourceSlot,
}

/// What each source address holds open: connections (taken on the accept
/// loop, given back on close) or calls (`calls.rs`); never on the data
/// path.
pub(crate) type Sources = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One connection's (or call's) place in its source's count.
pub(crate) struct SourceSlot {
    sources: Sources,
    ip: IpAddr,
}

impl SourceSlot {
    /// A place for one more from `ip`, or `None` when it holds `cap`.
    pub(crate) fn take(sources: &Sources, ip: IpAddr, cap: usize) -> Option<SourceSlot> {
        let mut open = sources.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: sources.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl Connected for CaConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for CaConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CaConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts on `listener` until `stop` fires, yielding handshaken connections.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut stop: broadcast::Receiver<()>,
) -> ReceiverStream<io::Result<CaConn>> {
    let (tx, rx) = mpsc::channel(128);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let sources = Sources::default();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = stop.recv() => return,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "CA accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(source) =
                SourceSlot::take(&sources, remote.ip().to_canonical(), MAX_PER_SOURCE)
            else {
                tracing::warn!(%remote, "CA connection limit per source ({MAX_PER_SOURCE}) reached; closing");
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%remote, "CA connection limit ({MAX_CONNECTIONS}) reached; closing");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let peer_chain =
                            stream.get_ref().1.peer_certificates().map(|c| {
                                Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())
                            });
                        let info = ConnInfo {
                            remote: Some(remote),
                            peer_chain,
                        };
                        let conn = CaConn {
                            stream,
                            info,
                            _permit: permit,
                            _source: source,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "CA TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "CA TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
