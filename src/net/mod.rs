//! The bottom of the data plane, below every protocol: the opaque byte
//! loop, dialling, per-key connection caps, how a connection's protocol
//! phase ended, and a deliberate close. Imports nothing of the crate's: the
//! sidecar (`proxy`) and the protocol handlers (`http`) build on it.

pub mod caps;
pub mod close_signal;
pub mod fdlimit;
pub mod forward;
pub mod idle;
pub mod linger;

use std::net::SocketAddr;
use std::time::Duration;

use stepmesh_ca::spiffe_id::SpiffeId;
use tokio::net::{TcpListener, TcpStream};

use self::forward::Forwarded;

/// The next connection `listener` accepts: the one accept step of every
/// server (the sidecar's listeners, the webhook, the gateway). An error
/// (EMFILE and friends) is logged and waited out for `pause` rather than
/// spun on.
pub async fn accept(listener: &TcpListener, pause: Duration) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Dials `addr` (host:port) with a deadline and TCP_NODELAY: the one dialer
/// both directions use (the app inbound, the peer outbound).
pub async fn dial(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// How a connection's protocol phase ended.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Bytes from the client to the server.
    pub bytes_in: u64,
    /// Bytes from the server back to the client.
    pub bytes_out: u64,
    /// Outbound: the verified peer identity.
    pub peer_id: Option<SpiffeId>,
    /// Why it failed (stable label, detail), if it did.
    pub error: Option<(&'static str, String)>,
    /// Outbound: the peer sidecar closed the connection deliberately (TLS
    /// close_notify) without sending a byte: its policy refused us.
    pub refused: bool,
}

impl Outcome {
    /// A failure before any byte moved.
    pub fn failed(reason: &'static str, detail: impl ToString) -> Self {
        Self {
            error: Some((reason, detail.to_string())),
            ..Self::default()
        }
    }

    /// From a finished forwarding loop (`a` = the client side).
    pub fn forwarded(done: Forwarded) -> Self {
        Self {
            bytes_in: done.a_to_b,
            bytes_out: done.b_to_a,
            peer_id: None,
            error: done.error.map(|e| (e.reason(), e.to_string())),
            refused: false,
        }
    }
}

/// How long a deliberate close may wait for the peer to take our TLS
/// `close_notify`: a peer that reads nothing cannot hold the connection.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Ends a connection we close on purpose (policy deny, app unreachable,
/// idle) with TLS `close_notify` and a FIN rather than a bare close, so the
/// peer sees a deliberate end, not a broken connection. Errors are moot:
/// the connection is going away either way.
pub async fn close_gracefully<S>(stream: &mut S)
where
    S: tokio::io::AsyncWrite + Unpin + ?Sized,
{
    use tokio::io::AsyncWriteExt;
    if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, stream.shutdown()).await {
        tracing::debug!(error = %e, "closing");
    }
}

/// Ends a stream both ways: ours (for a tunnel, END_STREAM), then the
/// peer's awaited, up to the same deadline, discarding anything it still
/// sends. For a tunnel whose app connection ended while the peer's side
/// may still be open (an HTTP/1 relay stops at the app's `Connection:
/// close`, which is not passed on): dropped half-open, the stream is reset,
/// and at thousands of such resets a second the benchmark saw h2 tear the
/// shared mesh connection down ("locally-reset streams reached limit
/// (1024)", then GOAWAY) with the requests of other app connections on it.
pub async fn close_both_ways<S>(stream: &mut S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    use tokio::io::AsyncReadExt;
    close_gracefully(stream).await;
    let drained = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let mut discard = [0u8; 64];
        while matches!(stream.read(&mut discard).await, Ok(n) if n > 0) {}
    });
    if drained.await.is_err() {
        tracing::debug!("the peer did not end its side of the stream in time");
    }
}

/// Makes the coming close of `stream` a reset (`SO_LINGER` 0): what the
/// other side of a forwarded connection gets when this side's peer failed
/// (a reset connection or HTTP/2 stream), so the failure is not mistaken
/// for an orderly end. Best effort: the connection is going away anyway.
pub fn reset_on_close(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "setting SO_LINGER 0");
    }
}
