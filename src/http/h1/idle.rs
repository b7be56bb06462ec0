//! The connection's one timer: an idle period checked coarsely, and a hard
//! deadline (a request head's) on the same timer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// An idle deadline checked coarsely (between one and two periods), so
/// each read only sets a flag instead of rearming a timer.
pub(super) struct Idle {
    sleep: Pin<Box<Sleep>>,
    period: Duration,
    active: bool,
    /// A hard deadline besides the idle period (a request head's), on the
    /// same timer: no second timer in every connection's task.
    deadline: Option<Instant>,
}

impl Idle {
    pub(super) fn new(period: Duration) -> Idle {
        Idle {
            sleep: Box::pin(tokio::time::sleep(period)),
            period,
            active: false,
            deadline: None,
        }
    }

    /// Sets or clears the hard deadline ([`Idle::guard`] gives up at it).
    pub(super) fn set_deadline(&mut self, at: Option<Instant>) {
        self.deadline = at;
        if let Some(at) = at {
            if at < self.sleep.deadline() {
                self.sleep.as_mut().reset(at);
            }
        }
    }

    /// Whether a hard deadline is set.
    pub(super) fn has_deadline(&self) -> bool {
        self.deadline.is_some()
    }

    /// Whether the hard deadline has passed.
    pub(super) fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|at| Instant::now() >= at)
    }

    /// A new period from now (a request body's deadline, then back).
    pub(super) fn set_period(&mut self, period: Duration) {
        if period != self.period {
            self.period = period;
            self.active = false;
            self.sleep.as_mut().reset(Instant::now() + period);
        }
    }

    /// Runs `f`, or gives up once nothing has completed for the period or
    /// the deadline has passed.
    ///
    /// A future of its own, not an `async fn`: that would store `f` twice
    /// (as its argument and pinned), and an idle connection's task holds
    /// this wait.
    pub(super) fn guard<F: Future>(&mut self, f: F) -> Guard<'_, F> {
        Guard { idle: self, f }
    }
}

pin_project_lite::pin_project! {
    /// [`Idle::guard`]'s future: `f`'s output, or `None` at the idle
    /// period or the deadline.
    pub(super) struct Guard<'a, F> {
        idle: &'a mut Idle,
        #[pin]
        f: F,
    }
}

impl<F: Future> Future for Guard<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        let this = self.project();
        if let Poll::Ready(out) = this.f.poll(cx) {
            this.idle.active = true;
            return Poll::Ready(Some(out));
        }
        let idle = this.idle;
        // Until the timer is pending again (registered for its new time).
        while idle.sleep.as_mut().poll(cx).is_ready() {
            if idle.past_deadline() || !std::mem::take(&mut idle.active) {
                return Poll::Ready(None);
            }
            let next = Instant::now() + idle.period;
            let at = idle.deadline.map_or(next, |d| d.min(next));
            idle.sleep.as_mut().reset(at);
        }
        Poll::Pending
    }
}
