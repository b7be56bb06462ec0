//! The header deadline of served HTTP/2 connections, below hyper: from the
//! first byte of the connection preface to the end of the client's first
//! frame, from the first byte of a HEADERS frame to the end of the frame
//! with END_HEADERS, and from the first byte of any other frame to its
//! last, at most `--header-timeout` each; past it the connection is closed
//! and counted (`stepmesh_http_refusals_total{reason="h2_header_timeout"}`).
//! hyper and h2 have no such deadline: every byte counts as activity, so a
//! client trickling one HEADERS frame (or CONTINUATION frames) held its
//! connection and a stream slot for as long as it kept trickling.
//!
//! Per read: the new bytes go through a [`FrameTracker`] (no allocation, no
//! lock), and the clock is read only while a span is open. The one timer
//! is made on the first read that leaves a span open and waits for more
//! bytes, then reused; it is moved only when it fires early, so a
//! connection streaming large frames costs at most one timer reset per
//! deadline period.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::h2_frames::{FrameTracker, Open};

/// A served HTTP/2 connection's IO with the header deadline on its reads.
pub(crate) struct HeaderDeadline<I> {
    io: I,
    frames: FrameTracker,
    /// Set while a span is open: when it must be complete.
    deadline: Option<Instant>,
    /// Made when first needed; may be set earlier than `deadline`.
    timer: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    /// Counts a breach (`direction`, `h2_header_timeout`).
    refusals: Counter,
    direction: &'static str,
    /// The deadline passed: every read and write fails from then on.
    breached: bool,
}

/// The refusal reason a breach is counted under.
pub(crate) const REASON: &str = "h2_header_timeout";

impl<I> HeaderDeadline<I> {
    /// `io` with spans timed to `timeout`; a breach counts in `refusals`
    /// and is logged with `direction`.
    pub(crate) fn new(
        io: I,
        timeout: Duration,
        refusals: Counter,
        direction: &'static str,
    ) -> HeaderDeadline<I> {
        HeaderDeadline {
            io,
            frames: FrameTracker::default(),
            deadline: None,
            timer: None,
            timeout,
            refusals,
            direction,
            breached: false,
        }
    }

    /// Takes `fresh` bytes read; an error once the open span's deadline
    /// has passed before they came.
    fn track(&mut self, fresh: &[u8]) -> io::Result<()> {
        let was_open = self.deadline;
        let fed = self.frames.feed(fresh);
        if was_open.is_none() && fed.open.is_none() {
            return Ok(());
        }
        let now = Instant::now();
        if was_open.is_some_and(|at| now >= at) {
            return Err(self.breach());
        }
        self.deadline = match fed.open {
            Some(_) if fed.started => Some(now + self.timeout),
            Some(_) => was_open,
            None => None,
        };
        Ok(())
    }

    /// Ready once the open span's deadline has passed (the task is woken
    /// then); pending while no span is open.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(at) = self.deadline else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Deadlines only move later: a timer that fired before the
            // current one is moved to it.
            if timer.deadline() >= at {
                return Poll::Ready(());
            }
            timer.as_mut().reset(at);
        }
    }

    /// Counts and logs the breach; the error every poll returns from now.
    fn breach(&mut self) -> io::Error {
        if !self.breached {
            self.breached = true;
            self.refusals.inc();
            let open = self.frames.open().map_or("frame", Open::as_str);
            tracing::info!(
                direction = self.direction,
                open,
                timeout = ?self.timeout,
                "HTTP/2 client did not complete its {open} within the header timeout: closing the connection"
            );
        }
        breach_error()
    }
}

/// What every poll returns once the deadline has passed.
pub(crate) const BREACH: &str =
    "HTTP/2 frame or header block not complete within the header timeout";

fn breach_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, BREACH)
}

/// Whether the header deadline ended the connection that failed with `e`:
/// hyper's error holds h2's, which holds a copy of the wrapper's IO error
/// (h2 keeps its kind and text only, hence the text compared).
pub(crate) fn closed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        let io = e
            .downcast_ref::<io::Error>()
            .or_else(|| e.downcast_ref::<h2::Error>().and_then(h2::Error::get_io));
        if io.is_some_and(|io| io.kind() == io::ErrorKind::TimedOut && io.to_string() == BREACH) {
            return true;
        }
        next = e.source();
    }
    false
}

impl<I: AsyncRead + Unpin> AsyncRead for HeaderDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.breached {
            return Poll::Ready(Err(breach_error()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => Poll::Ready(this.track(&buf.filled()[before..])),
            Poll::Pending if this.poll_deadline(cx).is_ready() => Poll::Ready(Err(this.breach())),
            other => other,
        }
    }
}

impl<I: AsyncWrite + Unpin> HeaderDeadline<I> {
    /// A write that waits: the deadline still applies (a client that stops
    /// reading must not stop it, h2 reads nothing while its writes wait).
    fn waiting<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.breached {
            return Poll::Ready(Err(breach_error()));
        }
        match polled {
            Poll::Pending if self.poll_deadline(cx).is_ready() => Poll::Ready(Err(self.breach())),
            other => other,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for HeaderDeadline<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.waiting(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.waiting(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.waiting(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
