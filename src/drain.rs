//! Graceful shutdown: a signal stops the listeners, in-flight connections get
//! until a deadline to finish, then the process exits anyway.
//!
//! Every listener and every connection holds a [`DrainWatch`]; the drain is
//! over when the last one is dropped (each holds a clone of one channel
//! sender, so "all dropped" is the channel closing: no counter to race).

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Starts a drain and waits for it (held by the process's main task).
#[derive(Debug)]
pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
}

/// Held by a listener or a connection: says when to stop, and keeps the
/// drain waiting while it lives.
#[derive(Debug, Clone)]
pub struct DrainWatch {
    signal: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

/// A new trigger and its first watch.
pub fn channel() -> (DrainTrigger, DrainWatch) {
    let (signal, signal_rx) = watch::channel(false);
    let (alive, done) = mpsc::channel(1);
    (
        DrainTrigger { signal, done },
        DrainWatch {
            signal: signal_rx,
            _alive: alive,
        },
    )
}

impl DrainTrigger {
    /// Tells every watch to stop, then waits until all watches are dropped or
    /// `deadline` passes. Returns whether everything finished in time.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        let _ = self.signal.send(true);
        tokio::time::timeout(deadline, self.done.recv())
            .await
            .is_ok()
    }
}

impl DrainWatch {
    /// Resolves once a drain has started (listeners select on it to stop accepting).
    pub async fn signaled(&mut self) {
        // An error means the trigger is gone: treat like a drain.
        let _ = self.signal.wait_for(|draining| *draining).await;
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

/// SIGTERM and SIGINT, listened to from creation on (so a signal arriving
/// between two waits is not lost).
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts listening (needs a runtime).
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT, by name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_in_flight_then_gives_up_at_deadline() {
        let (trigger, watch) = channel();
        let mut listener = watch.clone();
        let conn = watch.clone();
        drop(watch);
        let stopped = tokio::spawn(async move {
            listener.signaled().await;
        });
        let finished = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(conn);
        });
        assert!(trigger.drain(Duration::from_secs(10)).await);
        stopped.await.unwrap();
        finished.await.unwrap();

        let (trigger, watch) = channel();
        let _stuck = watch;
        assert!(!trigger.drain(Duration::from_millis(50)).await);
    }
}
