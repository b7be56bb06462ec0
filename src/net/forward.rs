//! Opaque TCP forwarding: bytes copied exactly in both directions, half-close
//! kept, backpressure by construction, an idle deadline, no allocation per read.
//!
//! Reads land in one scratch buffer per worker thread and are written
//! straight through to the other side in the same poll, so an idle or chatty
//! connection holds no buffer of its own. Only when the writer cannot take
//! everything (backpressure) are the leftover bytes kept in the direction's
//! spill buffer — allocated on first need, its capacity kept for the life of
//! the connection — and that direction reads nothing more until the spill is
//! written out: a slow reader on one side stops reads on the other instead
//! of queueing. When one side sends EOF, the other side's write half is shut
//! down (for TLS: `close_notify`, then a TCP FIN) and the opposite direction
//! keeps flowing until it ends too.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::idle::IdleClock;

/// Bytes read at once: one maximal TLS record of plaintext, so a full read
/// becomes one record.
pub const BUF_SIZE: usize = 16 * 1024;
// A spill's offsets are 16-bit (`Spill`).
const _: () = assert!(BUF_SIZE <= u16::MAX as usize);

thread_local! {
    /// The read buffer of every connection polled on this thread. Borrowed
    /// only inside one synchronous poll step, never across an await.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; BUF_SIZE].into_boxed_slice());
}

/// Polls one read from `io` into this thread's scratch buffer and gives the
/// bytes read to `take` in the same poll, so a connection waiting for its
/// next bytes holds no buffer of its own (nothing stays in the scratch:
/// cancel-safe). `Ok` with an empty slice is EOF.
pub fn poll_read_scratch<R, T>(
    io: &mut R,
    cx: &mut Context<'_>,
    take: impl FnOnce(&[u8]) -> T,
) -> Poll<io::Result<T>>
where
    R: AsyncRead + Unpin + ?Sized,
{
    SCRATCH.with(|scratch| {
        // Borrowed only for this synchronous step (see SCRATCH).
        let mut scratch = scratch.borrow_mut();
        let mut buf = ReadBuf::new(&mut scratch[..]);
        ready!(Pin::new(io).poll_read(cx, &mut buf))?;
        Poll::Ready(Ok(take(buf.filled())))
    })
}

/// Why a forwarded connection ended before both sides closed cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No byte moved in either direction for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// A read or write failed; `side` says which stream and which operation.
    #[error("{side}: {source}")]
    Io {
        /// `read client`, `write server`, ...
        side: &'static str,
        /// The socket or TLS error.
        #[source]
        source: io::Error,
    },
}

impl ForwardError {
    /// A stable label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Idle(_) => "idle_timeout",
            Self::Io { .. } => "io_error",
        }
    }
}

/// Counters bumped as bytes are written (atomics: no lock on the data path).
#[derive(Debug, Clone, Default)]
pub struct ByteCounters {
    /// Bytes written from the accepting side to the dialled side.
    pub forward: Counter,
    /// Bytes written from the dialled side back to the accepting side.
    pub backward: Counter,
}

/// The outcome of one forwarded connection, for the access log.
#[derive(Debug)]
pub struct Forwarded {
    /// Bytes copied from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes copied from `b` to `a`.
    pub b_to_a: u64,
    /// `None` when both sides ended with EOF.
    pub error: Option<ForwardError>,
    /// `b` ended its direction with EOF (for TLS: its `close_notify`).
    pub b_closed: bool,
}

pin_project_lite::pin_project! {
    /// Runs `work` until `stop` resolves first: `Ok` with the work's
    /// output, or `Err` with the stop's. Written out rather than
    /// `tokio::select!`, whose polling closure, flags and branch
    /// randomization took 24 bytes more in every idle inbound connection's
    /// task (the relay's future: 456 → 432 bytes, `-Zprint-type-sizes`).
    /// `stop` is polled first, so what it waits on is registered before
    /// `work` reads what that wakes it for (the inbound relay's copy reads
    /// the idle periods `stop`'s wait is woken at); a work that finished in
    /// the same poll is still never reported as stopped.
    pub struct Until<W, S> {
        #[pin]
        work: W,
        #[pin]
        stop: S,
    }
}

impl<W, S> Until<W, S> {
    /// `work`, until `stop`.
    pub fn new(work: W, stop: S) -> Self {
        Self { work, stop }
    }
}

impl<W: Future, S: Future> Future for Until<W, S> {
    type Output = Result<W::Output, S::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = self.project();
        let stopped = me.stop.poll(cx);
        if let Poll::Ready(done) = me.work.poll(cx) {
            return Poll::Ready(Ok(done));
        }
        stopped.map(Err)
    }
}

/// Copies `a` ⇄ `b` until both directions saw EOF, an error, or a whole
/// period of `idle` without a byte. Idle detection is coarse on purpose (it
/// fires between one and two idle periods after the last byte) so the hot
/// path only sets a flag.
pub fn forward<'a, A, B, C>(
    a: &'a mut A,
    b: &'a mut B,
    idle: C,
    counters: &'a ByteCounters,
) -> impl Future<Output = Forwarded> + 'a
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    C: IdleClock + 'a,
{
    Forward {
        a,
        b,
        ab: Half::new(&["read client", "write server"]),
        ba: Half::new(&["read server", "write client"]),
        active: C::STARTS_ACTIVE,
        counters,
        idle,
    }
}

pin_project_lite::pin_project! {
    /// The copy's state, each part stored once: written out rather than an
    /// `async fn` around a `poll_fn`, which kept the arguments and the
    /// closure's references besides (every idle connection's task holds
    /// this).
    struct Forward<'a, A: ?Sized, B: ?Sized, C> {
        a: &'a mut A,
        b: &'a mut B,
        ab: Half,
        ba: Half,
        active: bool,
        counters: &'a ByteCounters,
        #[pin]
        idle: C,
    }
}

impl<A, B, C> Future for Forward<'_, A, B, C>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    C: IdleClock,
{
    type Output = Forwarded;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Forwarded> {
        let mut me = self.project();
        let result = 'step: {
            if !me.ab.done {
                let copied = me.ab.poll_copy(
                    cx,
                    &mut **me.a,
                    &mut **me.b,
                    me.active,
                    &me.counters.forward,
                );
                if let Poll::Ready(Err(e)) = copied {
                    break 'step Err(e);
                }
            }
            if !me.ba.done {
                let copied = me.ba.poll_copy(
                    cx,
                    &mut **me.b,
                    &mut **me.a,
                    me.active,
                    &me.counters.backward,
                );
                if let Poll::Ready(Err(e)) = copied {
                    break 'step Err(e);
                }
            }
            if me.ab.done && me.ba.done {
                break 'step Ok(());
            }
            while me.idle.as_mut().poll_period(cx).is_ready() {
                if !std::mem::take(me.active) {
                    break 'step Err(ForwardError::Idle(me.idle.period()));
                }
            }
            return Poll::Pending;
        };
        Poll::Ready(Forwarded {
            a_to_b: me.ab.total,
            b_to_a: me.ba.total,
            error: result.err(),
            b_closed: me.ba.read_done,
        })
    }
}

/// One direction of the copy. Every idle connection's task holds two.
struct Half {
    /// Bytes read but not yet accepted by the writer (backpressure only):
    /// allocated on first need and kept. One pointer in the task, where a
    /// `Vec` and its offset took 32 bytes.
    spill: Option<Box<Spill>>,
    total: u64,
    read_done: bool,
    need_flush: bool,
    done: bool,
    /// The read and the write side's names, for errors (one pointer:
    /// every idle connection's task holds two halves).
    sides: &'static [&'static str; 2],
}

/// What is left of one read: `bytes[pos..len]` (16-bit: within
/// [`BUF_SIZE`]).
struct Spill {
    bytes: [u8; BUF_SIZE],
    pos: u16,
    len: u16,
}

/// What one read-and-write-through step did.
enum Step {
    /// Nothing to read now.
    Pending,
    /// The reader is at EOF.
    Eof,
    /// `written` of the bytes read went out; the rest is in the spill.
    Moved { written: usize },
    /// Reading failed.
    ReadFailed(io::Error),
    /// Writing failed after `written` bytes went out.
    WriteFailed { written: usize, error: io::Error },
}

impl Half {
    fn new(sides: &'static [&'static str; 2]) -> Self {
        Self {
            spill: None,
            total: 0,
            read_done: false,
            need_flush: false,
            done: false,
            sides,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        active: &mut bool,
        counter: &Counter,
    ) -> Poll<Result<(), ForwardError>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        let write_side = self.sides[1];
        let write_err = |source| ForwardError::Io {
            side: write_side,
            source,
        };
        loop {
            // Leftovers first: nothing new is read until they are out.
            if let Some(spill) = self.spill.as_deref_mut() {
                while spill.pos < spill.len {
                    let left = &spill.bytes[usize::from(spill.pos)..usize::from(spill.len)];
                    let n =
                        ready!(Pin::new(&mut *writer).poll_write(cx, left)).map_err(write_err)?;
                    if n == 0 {
                        return Poll::Ready(Err(write_err(io::ErrorKind::WriteZero.into())));
                    }
                    // No truncation: at most what is left, within BUF_SIZE.
                    spill.pos += n.min(left.len()) as u16;
                    count(&mut self.total, &mut self.need_flush, n, counter, active);
                }
                spill.pos = 0;
                spill.len = 0;
            }
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(write_err)?;
                // Half-close: pass the EOF on. A peer that already went away
                // makes shutdown fail; the other direction decides the outcome.
                if let Err(e) = ready!(Pin::new(&mut *writer).poll_shutdown(cx)) {
                    tracing::debug!(side = write_side, error = %e, "shutdown after EOF");
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let step = self.step(cx, reader, writer);
            if let Step::Moved { written } | Step::WriteFailed { written, .. } = &step {
                count(
                    &mut self.total,
                    &mut self.need_flush,
                    *written,
                    counter,
                    active,
                );
            }
            match step {
                Step::Pending => {
                    // Nothing more to read now: push out what the writer
                    // buffered (a TLS stream holds records until flushed).
                    if self.need_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(write_err)?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Step::Eof => self.read_done = true,
                // Bytes were read, whether or not the writer took any.
                Step::Moved { .. } => *active = true,
                Step::ReadFailed(source) => {
                    return Poll::Ready(Err(ForwardError::Io {
                        side: self.sides[0],
                        source,
                    }))
                }
                Step::WriteFailed { error, .. } => return Poll::Ready(Err(write_err(error))),
            }
        }
    }

    /// Reads into this thread's scratch buffer and writes as much as the
    /// writer takes right away; the rest goes to the spill.
    fn step<R, W>(&mut self, cx: &mut Context<'_>, reader: &mut R, writer: &mut W) -> Step
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut rb = ReadBuf::new(&mut scratch[..]);
            let n = match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                Poll::Pending => return Step::Pending,
                Poll::Ready(Err(e)) => return Step::ReadFailed(e),
                Poll::Ready(Ok(())) => rb.filled().len(),
            };
            if n == 0 {
                return Step::Eof;
            }
            let mut written = 0;
            while written < n {
                match Pin::new(&mut *writer).poll_write(cx, &scratch[written..n]) {
                    Poll::Ready(Ok(0)) => {
                        let error = io::ErrorKind::WriteZero.into();
                        return Step::WriteFailed { written, error };
                    }
                    Poll::Ready(Ok(k)) => written += k,
                    Poll::Ready(Err(error)) => return Step::WriteFailed { written, error },
                    Poll::Pending => break,
                }
            }
            // Backpressure: keep the rest (the only copy; the spill is
            // empty here, and allocated at most once).
            if written < n {
                let spill = self.spill.get_or_insert_with(|| {
                    Box::new(Spill {
                        bytes: [0; BUF_SIZE],
                        pos: 0,
                        len: 0,
                    })
                });
                spill.bytes[..n - written].copy_from_slice(&scratch[written..n]);
                // No truncation: within BUF_SIZE, which fits.
                spill.len = (n - written) as u16;
            }
            Step::Moved { written }
        })
    }
}

/// `n` bytes written: counted, and the direction marked for a flush and
/// the copy as active (fields, not `&mut Half`: the spill is borrowed
/// beside them while its bytes go out).
fn count(total: &mut u64, need_flush: &mut bool, n: usize, counter: &Counter, active: &mut bool) {
    if n > 0 {
        *total += n as u64;
        counter.inc_by(n as u64);
        *need_flush = true;
        *active = true;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::net::idle::{IdleTicks, OwnTimer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_keeps_half_close() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let counters = ByteCounters::default();
        let task = tokio::spawn(async move {
            forward(
                &mut a,
                &mut b,
                OwnTimer::new(Duration::from_secs(30)),
                &counters,
            )
            .await
        });
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload, "server saw the exact bytes, then EOF");
        server.write_all(b"answer after EOF").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"answer after EOF");
        let done = task.await.unwrap();
        assert!(done.error.is_none(), "{:?}", done.error);
        assert!(done.b_closed);
        assert_eq!(done.a_to_b, payload.len() as u64);
        assert_eq!(done.b_to_a, 16);
    }

    #[tokio::test]
    async fn idle_connection_is_closed() {
        let (_client, mut a) = tokio::io::duplex(64);
        let (mut b, _server) = tokio::io::duplex(64);
        let done = forward(
            &mut a,
            &mut b,
            OwnTimer::new(Duration::from_millis(100)),
            &ByteCounters::default(),
        )
        .await;
        assert!(matches!(done.error, Some(ForwardError::Idle(_))));
        assert!(!done.b_closed);
    }

    /// `Until` polls its stop before its work (the inbound relay's wait is
    /// registered before the copy reads the periods it is woken at), and a
    /// work that finished in the same poll wins.
    #[test]
    fn until_polls_the_stop_first_and_a_finished_work_wins() {
        let order = std::cell::RefCell::new(Vec::new());
        let step = |name: &'static str, ready: bool| {
            let order = &order;
            std::future::poll_fn(move |_| {
                order.borrow_mut().push(name);
                if ready {
                    Poll::Ready(name)
                } else {
                    Poll::Pending
                }
            })
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let until = std::pin::pin!(Until::new(step("work", false), step("stop", false)));
        assert!(until.poll(&mut cx).is_pending());
        assert_eq!(*order.borrow(), ["stop", "work"]);
        let both = std::pin::pin!(Until::new(step("work", true), step("stop", true)));
        assert_eq!(both.poll(&mut cx), Poll::Ready(Ok("work")));
        let stopped = std::pin::pin!(Until::new(step("work", false), step("stop", true)));
        assert_eq!(stopped.poll(&mut cx), Poll::Ready(Err("stop")));
    }

    /// With the process's periods, a copy that just started lets the first
    /// period pass, a byte lets the next pass, and two without one end it.
    #[tokio::test]
    async fn shared_periods_end_a_copy_after_a_whole_period_without_a_byte() {
        let ticks = IdleTicks::new(Duration::from_secs(60));
        let (mut client, mut a) = tokio::io::duplex(64);
        let (mut b, mut server) = tokio::io::duplex(64);
        let counters = ByteCounters::default();
        let mut copy = std::pin::pin!(forward(&mut a, &mut b, ticks.periods(), &counters));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(copy.as_mut().poll(&mut cx).is_pending());
        ticks.tick();
        assert!(
            copy.as_mut().poll(&mut cx).is_pending(),
            "the period it started in"
        );
        client.write_all(b"x").await.unwrap();
        assert!(copy.as_mut().poll(&mut cx).is_pending());
        let mut byte = [0; 1];
        server.read_exact(&mut byte).await.unwrap();
        ticks.tick();
        assert!(
            copy.as_mut().poll(&mut cx).is_pending(),
            "a byte moved in that one"
        );
        ticks.tick();
        match copy.as_mut().poll(&mut cx) {
            Poll::Ready(done) => {
                assert!(
                    matches!(done.error, Some(ForwardError::Idle(p)) if p == Duration::from_secs(60))
                );
                assert_eq!(done.a_to_b, 1);
            }
            Poll::Pending => panic!("a whole period passed without a byte"),
        }
    }
}
