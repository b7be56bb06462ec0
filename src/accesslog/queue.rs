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
/// lines of 512 bytes, what the queue of lines this replaced held.
pub const PENDING_MAX: usize = 1024 * 1024;

/// What a batch's buffer is cut back to after a burst made it larger: no
/// more than this is kept between bursts, twice (the buffer being written
/// and the one being filled); the writer's `BufWriter` this replaced kept
/// as much, once. At 20,000 lines a second of under 512 bytes, a batch
/// (1 ms of them) is under 10 KiB.
const KEPT: usize = 32 * 1024;

/// The runtime threads' side of the queue; the writer ends when the last
/// clone is dropped and everything queued is written.
#[derive(Debug)]
pub struct Sender(Arc<Queue>);

#[derive(Debug, Default)]
struct Queue {
    pending: Mutex<Pending>,
    /// The writer waits here: lines after an empty buffer, a flush asked,
    /// the last sender gone.
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
    /// Whether the writer is waiting on `to_writer`: only then is it
    /// signalled (a signal is a system call, waiter or not).
    writer_waiting: bool,
    senders: usize,
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
    /// beyond the lock, which is held only for appends and swaps.
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
        let wake = start == 0 && p.writer_waiting;
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
        if p.writer_waiting {
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
        let wake = p.senders == 0 && p.writer_waiting;
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
            while p.lines.is_empty() && p.asked == p.done && p.senders > 0 {
                p.writer_waiting = true;
                p = queue
                    .to_writer
                    .wait(p)
                    .unwrap_or_else(PoisonError::into_inner);
                p.writer_waiting = false;
            }
            if p.lines.is_empty() && p.asked == p.done {
                // The last sender is gone and everything is written.
                return;
            }
            std::mem::swap(&mut p.lines, &mut batch);
            (p.asked, p.asked != p.done)
        };
        // One `write` for the whole batch (it may take more on a pipe).
        let _ = out.write_all(&batch);
        let _ = out.flush();
        batch.clear();
        batch.shrink_to(KEPT);
        if waited {
            // Taken again only for a flush: the runtime threads' appends
            // contend for the lock with one swap per batch, no more.
            queue.lock().done = asked;
            queue.written.notify_all();
        }
        std::thread::sleep(pause);
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
