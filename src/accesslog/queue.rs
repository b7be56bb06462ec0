//! The lines between the runtime threads and the writer thread: one buffer
//! under a mutex, which a runtime thread appends a line to in place and the
//! writer swaps for an empty one every batch.
//!
//! Not a channel of lines: a line allocated on a runtime thread and freed
//! on the writer's never came back to the runtime thread's allocator cache,
//! so every line cost a refill of that cache and the writer a flush of its
//! own (with the channel's send and receive, about 800 instructions per
//! HTTP request and side under callgrind; docs/BENCHMARKS.md). Written by
//! hand: a mutex, two condition variables and a swap, which no crate
//! offers as one.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Bytes of lines waiting for the writer: once this many wait, lines are
/// dropped (and counted by the caller) until the writer takes them. 2,048
/// lines of 512 bytes, what the queue of lines this replaced held. Half
/// of it cuts the writer's rest short ([`EARLY`]), so a burst has the
/// other half to fill while its first half is written.
pub const PENDING_MAX: usize = 1024 * 1024;

/// This many bytes of queued lines end the writer's rest at once.
const EARLY: usize = PENDING_MAX / 2;

/// The least a batch's buffer is cut back to: a buffer larger than twice
/// the batch it just carried is cut to that (but not below this), so a
/// steady load keeps its buffers (no regrowth, each a copy under the lock,
/// per batch) and a burst's are given back by the next quieter batches, or
/// down to this once no line comes. Twice (the buffer being written and the
/// one being filled); the writer's `BufWriter` of before kept as much, once.
const KEPT: usize = 32 * 1024;

/// The runtime threads' side of the queue; the writer ends when the last
/// clone is dropped and everything queued is written.
#[derive(Debug)]
pub struct Sender(Arc<Queue>);

#[derive(Debug, Default)]
struct Queue {
    pending: Mutex<Pending>,
    /// The writer waits here, for lines or resting after a batch: woken by
    /// the first line after an empty buffer (or, resting, by half a queue
    /// of lines), a flush asked, the last sender gone.
    to_writer: Condvar,
    /// Flushes wait here for the writer to finish a batch.
    written: Condvar,
}

#[derive(Debug, Default)]
struct Pending {
    /// Whole lines, each ending in a newline.
    lines: Vec<u8>,
    /// Flushes asked so far, and the number the writer had seen when it
    /// last finished a batch: a flush is done once `done` reaches its own.
    asked: u64,
    done: u64,
    /// What the writer waits for on `to_writer`, if it waits (lines, or
    /// the end of its rest): only then is it signalled (a signal is a
    /// system call, waiter or not).
    writer: Parked,
    senders: usize,
}

/// What the writer is parked for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Parked {
    /// Writing, or about to look at the queue: nothing to signal.
    #[default]
    No,
    /// The queue is empty: the first line wakes it.
    ForLines,
    /// Resting after a batch: [`EARLY`] bytes of lines wake it (not each
    /// line), as do a flush and the last sender leaving.
    Resting,
}

impl Pending {
    /// No line queued and no flush waiting.
    fn nothing_to_write(&self) -> bool {
        self.lines.is_empty() && self.asked == self.done
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while the lock was held (none of the writes under it can
        // panic) leaves whole lines behind and at worst a partial one.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new queue, and its writer's loop to run on a thread of its own: it
/// writes what is queued to `out` in batches, resting `pause` after each,
/// until the last [`Sender`] is gone.
pub fn queue(out: impl Write, pause: Duration) -> (Sender, impl FnOnce()) {
    let queue = Arc::new(Queue::default());
    queue.lock().senders = 1;
    let writer = {
        let queue = queue.clone();
        move || write_batches(&queue, out, pause)
    };
    (Sender(queue), writer)
}

impl Sender {
    /// Appends the line `write` writes, and its newline; `false` (nothing
    /// appended) when the queue is full or `write` failed. Never blocks
    /// beyond the lock, which the writer holds only to swap buffers and to
    /// start or end a wait.
    pub fn line<E>(&self, write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> bool {
        let mut p = self.0.lock();
        let start = p.lines.len();
        if start >= PENDING_MAX {
            return false;
        }
        if write(&mut p.lines).is_err() {
            p.lines.truncate(start);
            return false;
        }
        p.lines.push(b'\n');
        let wake = match p.writer {
            Parked::No => false,
            Parked::ForLines => start == 0,
            Parked::Resting => start < EARLY && p.lines.len() >= EARLY,
        };
        drop(p);
        if wake {
            self.0.to_writer.notify_one();
        }
        true
    }

    /// Waits until every line appended before the call is written, or
    /// `timeout` passes.
    pub fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut p = self.0.lock();
        p.asked += 1;
        let mine = p.asked;
        if p.writer != Parked::No {
            self.0.to_writer.notify_one();
        }
        while p.done < mine {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            p = self
                .0
                .written
                .wait_timeout(p, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Clone for Sender {
    fn clone(&self) -> Sender {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut p = self.0.lock();
        p.senders -= 1;
        let wake = p.senders == 0 && p.writer != Parked::No;
        drop(p);
        if wake {
            self.0.to_writer.notify_one();
        }
    }
}

fn write_batches(queue: &Queue, mut out: impl Write, pause: Duration) {
    let mut batch = Vec::new();
    loop {
        // The flushes asked before this batch, and whether any is waiting.
        let (asked, waited) = {
            let mut p = queue.lock();
            if p.nothing_to_write() && p.senders > 0 {
                // No load: a burst's buffers are given back, the work of
                // it outside the lock.
                let burst = (p.lines.capacity() > KEPT).then(|| std::mem::take(&mut p.lines));
                drop(p);
                drop(burst);
                batch.shrink_to(KEPT);
                p = queue.lock();
            }
            while p.nothing_to_write() && p.senders > 0 {
                p.writer = Parked::ForLines;
                p = queue
                    .to_writer
                    .wait(p)
                    .unwrap_or_else(PoisonError::into_inner);
                p.writer = Parked::No;
            }
            if p.nothing_to_write() {
                // The last sender is gone and everything is written.
                return;
            }
            std::mem::swap(&mut p.lines, &mut batch);
            (p.asked, p.asked != p.done)
        };
        // One `write` for the whole batch (it may take more on a pipe).
        let _ = out.write_all(&batch);
        let _ = out.flush();
        let carried = batch.len();
        batch.clear();
        batch.shrink_to(KEPT.max(2 * carried));
        let mut p = queue.lock();
        if waited {
            p.done = asked;
            queue.written.notify_all();
        }
        rest(queue, p, pause);
    }
}

/// Rests `pause` after a batch, so lines gather into the next one; cut
/// short by a flush asked, the last sender gone, or [`EARLY`] bytes of
/// lines (a burst must not fill the queue while the writer rests).
fn rest(queue: &Queue, mut p: MutexGuard<'_, Pending>, pause: Duration) {
    let until = Instant::now() + pause;
    while p.lines.len() < EARLY && p.asked == p.done && p.senders > 0 {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        p.writer = Parked::Resting;
        p = queue
            .to_writer
            .wait_timeout(p, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        p.writer = Parked::No;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// Queues `bytes` as a line.
    fn put(tx: &Sender, bytes: &[u8]) -> bool {
        tx.line(|l| {
            l.extend_from_slice(bytes);
            Ok::<_, ()>(())
        })
    }

    /// An output that holds every `write` until the test lets it go.
    struct Held {
        go: mpsc::Receiver<()>,
        out: mpsc::Sender<Vec<u8>>,
    }

    impl Write for Held {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.go.recv();
            let _ = self.out.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer stuck on its output: lines pile up to the limit, then the
    /// next is refused whole, and the ones kept all come out once it moves.
    #[test]
    fn a_stuck_writer_bounds_the_queue_and_loses_no_kept_line() {
        let (go, held) = mpsc::channel();
        let (sent, written) = mpsc::channel();
        let (tx, writer) = queue(
            Held {
                go: held,
                out: sent,
            },
            Duration::ZERO,
        );
        let writer = std::thread::spawn(writer);
        let line = [b'x'; 999];
        // The first line is taken by the writer, which then holds.
        assert!(put(&tx, &line));
        let mut kept = 1;
        while put(&tx, &line) {
            kept += 1;
            assert!(
                kept < 10 * PENDING_MAX / line.len(),
                "the queue has no bound"
            );
        }
        assert!(kept * 1000 >= PENDING_MAX, "refused early, after {kept}");
        assert!(!tx.line(|_| Ok::<_, ()>(())), "refused while full");
        drop(tx);
        let mut bytes = 0;
        while let Ok(()) = go.send(()) {
            match written.recv_timeout(Duration::from_secs(10)) {
                Ok(batch) => bytes += batch.len(),
                Err(_) => break,
            }
        }
        writer.join().unwrap();
        assert_eq!(bytes, kept * 1000, "every kept line, newline included");
    }

    /// A line whose writing fails leaves nothing behind, not half a line
    /// (no writer runs: the lines stay in the queue to be read).
    #[test]
    fn a_failed_line_leaves_nothing() {
        let (tx, _writer) = queue(Vec::new(), Duration::ZERO);
        assert!(put(&tx, b"one"));
        let failed = tx.line(|l| {
            l.extend_from_slice(b"{\"half");
            Err(())
        });
        assert!(!failed);
        assert!(put(&tx, b"two"));
        assert_eq!(tx.0.lock().lines, b"one\ntwo\n");
    }

    /// A writer resting after a batch (here for an hour) is woken by a
    /// flush, by half a queue of lines, and by the last sender leaving.
    #[test]
    fn a_resting_writer_wakes_for_a_flush_a_burst_and_the_end() {
        let out = super::super::tests::Shared::default();
        let (tx, writer) = queue(out.clone(), Duration::from_secs(3600));
        let (ended, end) = mpsc::channel();
        std::thread::spawn(move || {
            writer();
            let _ = ended.send(());
        });
        let written = || out.0.lock().unwrap().len();
        let soon = Duration::from_secs(10);
        let started = Instant::now();
        // The first line wakes a writer waiting for lines, no flush asked;
        // then it rests.
        while tx.0.lock().writer != Parked::ForLines {
            assert!(started.elapsed() < soon, "the writer never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(put(&tx, b"a"));
        while written() < 2 {
            assert!(started.elapsed() < soon, "the first line stayed queued");
            std::thread::sleep(Duration::from_millis(1));
        }
        // A line alone does not end the rest; a flush does.
        while tx.0.lock().writer != Parked::Resting {
            assert!(started.elapsed() < soon, "the writer never rested");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(put(&tx, b"b"));
        std::thread::sleep(Duration::from_millis(50));
        {
            let p = tx.0.lock();
            assert_eq!(p.writer, Parked::Resting, "a line ended the rest");
            assert_eq!(p.lines, b"b\n");
        }
        assert_eq!(written(), 2);
        tx.flush(soon);
        assert_eq!(written(), 4, "a flush cuts the rest short");
        assert!(started.elapsed() < soon);
        // Half a queue of lines, no flush: written while it rests.
        let line = [b'x'; 999];
        let mut queued = 4;
        while queued < 4 + EARLY {
            assert!(put(&tx, &line), "refused at {queued}");
            queued += line.len() + 1;
        }
        while written() < queued && started.elapsed() < soon {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(written(), queued, "a burst cuts the rest short");
        drop(tx);
        assert!(end.recv_timeout(soon).is_ok(), "the writer ends at once");
    }

    /// A burst's buffers are given back once no line comes.
    #[test]
    fn an_idle_writer_holds_no_burst_buffer() {
        let (tx, writer) = queue(std::io::sink(), Duration::from_millis(1));
        std::thread::spawn(writer);
        let line = [b'x'; 999];
        // Two bursts: each of the two buffers carries one.
        for _ in 0..2 {
            for _ in 0..EARLY / 1000 {
                assert!(put(&tx, &line));
            }
            tx.flush(Duration::from_secs(10));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let p = tx.0.lock();
            if p.writer == Parked::ForLines {
                assert!(p.lines.capacity() <= KEPT, "{}", p.lines.capacity());
                break;
            }
            drop(p);
            assert!(Instant::now() < deadline, "the writer never parked");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A flush on an idle writer wakes it and returns at once; one after
    /// lines returns once they are written.
    #[test]
    fn a_flush_waits_for_the_lines_before_it_only() {
        let out = super::super::tests::Shared::default();
        let (tx, writer) = queue(out.clone(), Duration::from_millis(50));
        let writer = std::thread::spawn(writer);
        std::thread::sleep(Duration::from_millis(20));
        let started = Instant::now();
        tx.flush(Duration::from_secs(10));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        for n in 0..3 {
            assert!(put(&tx, n.to_string().as_bytes()));
        }
        tx.flush(Duration::from_secs(10));
        assert_eq!(&*out.0.lock().unwrap(), b"0\n1\n2\n");
        drop(tx);
        writer.join().unwrap();
    }
}
