//! Accept loops: a shared connection limit, TCP_NODELAY, one task per
//! connection, and a stop on drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::drain::DrainWatch;
use crate::metrics::{Direction, ProxyMetrics};
use crate::net::caps::{ConnectionBudget, Spent};

/// Accepts until a drain starts; each connection runs `handle` in its own
/// task, handed its [`ConnGuard`]. Over the limit, a connection is closed
/// at once (and counted) rather than left in the backlog.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    direction: Direction,
    drain: DrainWatch,
    budget: Arc<ConnectionBudget>,
    metrics: ProxyMetrics,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, ConnGuard) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut stop = drain.clone();
    loop {
        let (stream, client) = tokio::select! {
            biased;
            () = stop.signaled() => break,
            accepted = crate::net::accept(&listener, Duration::from_millis(20)) => accepted,
        };
        // A dual-stack listener shows IPv4 clients as v4-mapped IPv6.
        let client = super::transparent::canonical(client);
        let Some(spent) = budget.try_spend() else {
            metrics.rejected(direction, "connection_limit");
            tracing::debug!(%client, "connection limit reached; closing");
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let guard = ConnGuard {
            _spent: spent,
            _watch: drain.clone(),
        };
        tokio::spawn(handle(stream, client, guard));
    }
    tracing::debug!(listener = ?listener.local_addr().ok(), "stopped accepting");
}

/// What a connection holds until it ends, in whichever task it ends: its
/// place under the listener's connection limit, and the drain's watch (a
/// drain waits for it). Passed to the connection's handler, which may hand
/// it on with the connection to a task of its own (an outbound tunnel's
/// copy loop, see `super::outbound`).
pub struct ConnGuard {
    _spent: Spent,
    _watch: DrainWatch,
}
