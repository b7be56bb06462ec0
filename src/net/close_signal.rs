//! A connection's "close now": set once by whoever decides it must end (a
//! revocation, watched beside the serving loop), read per request, and
//! awaited by the serving loop's stop future. A flag and a waker, no lock:
//! written by hand, as tokio's `Notify` would keep a waiter list per
//! connection for one event.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use futures_util::task::AtomicWaker;

/// Set at most once; see the module.
#[derive(Debug, Default)]
pub struct CloseSignal {
    set: AtomicBool,
    waker: AtomicWaker,
}

impl CloseSignal {
    /// Whether it was set.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Sets it and wakes its waiter.
    pub fn set(&self) {
        self.set.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Resolves once it is set (one waiter at a time).
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.is_set() {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // Set between the check and the registration: seen here.
            if self.is_set() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}
