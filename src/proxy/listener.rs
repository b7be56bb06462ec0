//! Accept loops: a shared connection limit, TCP_NODELAY, one task per
//! connection, and a stop on drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::drain::DrainWatch;
use crate::metrics::{Direction, ProxyMetrics};

/// Accepts until a drain starts; each connection runs `handle` in its own
/// task holding a connection permit and a drain watch. Over the limit, a
/// connection is closed at once (and counted) rather than left in the backlog.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    direction: Direction,
    drain: DrainWatch,
    permits: Arc<Semaphore>,
    metrics: ProxyMetrics,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut stop = drain.clone();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.signaled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, client) = match accepted {
            // A dual-stack listener shows IPv4 clients as v4-mapped IPv6.
            Ok((stream, client)) => (stream, super::transparent::canonical(client)),
            Err(e) => {
                // EMFILE and friends: back off rather than spin on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.rejected(direction, "connection_limit");
            tracing::debug!(%client, "connection limit reached; closing");
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        tokio::spawn(Tracked {
            work: handle(stream, client),
            _permit: permit,
            _watch: drain.clone(),
        });
    }
    tracing::debug!(listener = ?listener.local_addr().ok(), "stopped accepting");
}

pin_project! {
    /// A connection's work holding its permit and drain watch until it ends.
    /// A struct rather than an `async` block around `work`: the block would
    /// store the (large) connection future twice, once as a captured value
    /// and once as the awaited one, doubling every task's memory.
    struct Tracked<F> {
        #[pin]
        work: F,
        _permit: OwnedSemaphorePermit,
        _watch: DrainWatch,
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.project().work.poll(cx)
    }
}
