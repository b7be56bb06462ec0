//! How a byte copy ([`super::forward::forward`]) learns that an idle
//! period has passed: its own timer, or a count of periods kept once for
//! the whole process.
//!
//! A timer is 112 bytes in every connection's task, most of what an idle
//! inbound connection's task holds beside its streams. The inbound relay
//! already waits on a process-wide `Notify` (live re-authorization, in
//! `proxy::reauth`); woken at each period too, that wait stands in for the
//! timer, and the copy keeps a reference and a number (16 bytes).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The idle periods a copy counts: it ends as idle when a whole period
/// passed without a byte moving.
pub trait IdleClock {
    /// Whether the copy starts as if a byte had just moved: a shared
    /// period may end right after the copy starts, so that one does not
    /// count. Either way the copy ends between one and two periods after
    /// its last byte.
    const STARTS_ACTIVE: bool;

    /// The period, for the error that ends an idle copy.
    fn period(&self) -> Duration;

    /// `Ready` once for each period that ended since the last `Ready`.
    fn poll_period(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()>;
}

pin_project_lite::pin_project! {
    /// A copy's own timer, restarted at each period's end.
    pub struct OwnTimer {
        #[pin]
        sleep: Sleep,
        period: Duration,
    }
}

impl OwnTimer {
    /// Periods of `period` from now.
    pub fn new(period: Duration) -> Self {
        Self {
            sleep: tokio::time::sleep(period),
            period,
        }
    }
}

impl IdleClock for OwnTimer {
    const STARTS_ACTIVE: bool = false;

    fn period(&self) -> Duration {
        self.period
    }

    fn poll_period(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut me = self.project();
        if me.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        me.sleep.reset(Instant::now() + *me.period);
        Poll::Ready(())
    }
}

/// The periods of the whole process: a number its owner bumps once a
/// period ([`IdleTicks::tick`]), waking its copies by a means of its own.
#[derive(Debug)]
pub struct IdleTicks {
    ended: AtomicU32,
    period: Duration,
}

impl IdleTicks {
    /// Periods of `period`, none ended yet.
    pub fn new(period: Duration) -> Self {
        Self {
            ended: AtomicU32::new(0),
            period,
        }
    }

    /// The period its owner ticks at.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// One more period ended. The caller then wakes every copy counting
    /// these periods: [`SharedPeriods`] registers no waker of its own.
    pub fn tick(&self) {
        self.ended.fetch_add(1, Ordering::AcqRel);
    }

    /// A copy's view of the periods from now. Only for a copy whose task
    /// is woken at each [`IdleTicks::tick`] (it waits on what the owner
    /// wakes); in another it would notice a period only at its next byte.
    pub fn periods(&self) -> SharedPeriods<'_> {
        SharedPeriods {
            ticks: self,
            seen: self.ended.load(Ordering::Acquire),
        }
    }
}

/// A copy's count of the process's periods (see [`IdleTicks::periods`]).
#[derive(Debug)]
pub struct SharedPeriods<'a> {
    ticks: &'a IdleTicks,
    seen: u32,
}

impl IdleClock for SharedPeriods<'_> {
    const STARTS_ACTIVE: bool = true;

    fn period(&self) -> Duration {
        self.ticks.period
    }

    fn poll_period(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if self.ticks.ended.load(Ordering::Acquire) == self.seen {
            return Poll::Pending;
        }
        self.seen = self.seen.wrapping_add(1);
        Poll::Ready(())
    }
}
