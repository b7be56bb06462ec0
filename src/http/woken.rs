//! A future polled only after it asked to be: the drain and revocation
//! wait an inbound HTTP/1 relay checks at every request.
//!
//! The relay polls it about three times per request (its `select!`s poll
//! every branch, and it looks for a drain before each request). The wait
//! is two `Notified`s (the drain, the revocation), and each poll of a
//! waiting one takes its `Notify`'s lock to compare wakers: 835
//! instructions per request on the inbound side under callgrind
//! (`docs/BENCHMARKS.md`).
//! [`WokenOnly`] polls the wait with a waker of its own, which records that
//! it was woken before waking the task, and skips the poll otherwise.
//! Written by hand: no crate offers it (`FuturesUnordered` does the same
//! for each of its futures, as part of a collection).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

pin_project_lite::pin_project! {
    /// `inner`, polled on its first poll and then only after it woke its
    /// waker.
    pub(crate) struct WokenOnly<F> {
        #[pin]
        inner: F,
        wake: Arc<Forward>,
    }
}

/// The waker `inner` is polled with: notes the wake, then wakes the task.
struct Forward {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Forward {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WokenOnly<F> {
    /// Wraps `inner` (one allocation of 48 bytes, for the waker).
    pub(crate) fn new(inner: F) -> Self {
        WokenOnly {
            inner,
            wake: Arc::new(Forward {
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

impl<F: Future> Future for WokenOnly<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered first: a wake from here on reaches this task, so a
        // wake between the two lines is either seen below or wakes it.
        this.wake.task.register(cx.waker());
        if !this.wake.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.wake.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A future that counts its polls and is ready once `open`.
    struct Gate<'a> {
        polls: &'a AtomicUsize,
        open: &'a AtomicBool,
        waiting: &'a std::sync::Mutex<Option<Waker>>,
    }

    impl Future for Gate<'_> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waiting.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// A task waker that counts its wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_inner_future_is_polled_first_and_then_only_when_it_woke() {
        let (polls, open, waiting) = (
            AtomicUsize::new(0),
            AtomicBool::new(false),
            std::sync::Mutex::new(None),
        );
        let gate = Gate {
            polls: &polls,
            open: &open,
            waiting: &waiting,
        };
        let mut wrapped = std::pin::pin!(WokenOnly::new(gate));
        let task = Arc::new(Count::default());
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "the first poll goes through"
        );
        for _ in 0..5 {
            assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "not woken: not polled");
        open.store(true, Ordering::SeqCst);
        // Opened but not woken: still not polled (the inner future's own
        // contract is to wake when it can make progress).
        assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        waiting.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert!(wrapped.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_notify_from_another_thread_ends_the_wait() {
        let notify = Arc::new(tokio::sync::Notify::new());
        let waiting = {
            let notify = notify.clone();
            tokio::spawn(async move { WokenOnly::new(notify.notified()).await })
        };
        // Let the task register its wait, then notify from elsewhere.
        tokio::task::yield_now().await;
        let from = notify.clone();
        std::thread::spawn(move || from.notify_waiters())
            .join()
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
    }
}
