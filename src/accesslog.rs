//! The JSON access log: one line per connection on stdout, through its own
//! writer thread (not tracing's stderr), so operators can ship it apart from
//! diagnostics and a slow stdout never blocks a runtime thread. The writer
//! takes lines in batches (see [`BATCH_PAUSE`]): a line costs a runtime
//! thread its JSON, written in place at the end of the batch being filled
//! ([`queue`]), not an allocation, a wake-up and a `write`.

use std::io::Write;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Serialize;

pub mod json;
mod queue;
mod time;

pub use time::{rfc3339, Timestamp};

/// How long the writer rests after writing a batch before it takes the
/// next. Under load lines gather meanwhile, so the writer is seldom
/// parked when a runtime thread queues a line (no wake-up, a futex call
/// and a context switch, per line) and one `write` carries many lines: a
/// `write` to a file costs ext4 its inode update and journal work
/// whatever its length: writing 47,000 lines a second of 370 bytes, a C
/// writer resting 1 ms used 11.7 % of a core, one resting 10 ms 3.6 % (to
/// a pipe, as a container runtime reads stdout: 3.0 % and 1.0 %), and this
/// writer's share of the sidecar's CPU under the bench's HTTP saturation
/// went from 8.6 % to 4.6 % (docs/BENCHMARKS.md). A line reaches stdout at
/// most 10 ms later than it would have, well under Envoy's 1 s access-log
/// flush. A burst is not dropped for the rest: half a queue of lines ends
/// it at once ([`queue::PENDING_MAX`]).
const BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// One connection's record.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionRecord<'a> {
    /// RFC 3339 UTC time the connection ended.
    pub ts: Timestamp,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The peer's SPIFFE ID (inbound: the client; outbound: the server), if known.
    pub peer_id: Option<&'a str>,
    /// The client's socket address.
    pub src: String,
    /// Where the bytes went (app or peer address).
    pub dst: &'a str,
    /// The policy port.
    pub port: u16,
    /// `allow`, `deny`, `would_deny` (audit mode), `error`.
    pub decision: &'static str,
    /// Why: the policy's reason, or the failure.
    pub reason: &'a str,
    /// The policy rule that decided, if any.
    pub rule: Option<&'a str>,
    /// Bytes from the client to the server.
    pub bytes_in: u64,
    /// Bytes from the server back to the client.
    pub bytes_out: u64,
    /// Connection lifetime in milliseconds.
    pub duration_ms: u64,
    /// The error that ended the connection, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A cheap handle to the writer thread (clone per listener).
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Option<queue::Sender>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer thread on stdout; registers the dropped-lines counter.
    pub fn stdout(registry: &mut Registry) -> std::io::Result<Self> {
        let log = AccessLog::writing_to(std::io::stdout())?;
        registry.register(
            "stepmesh_access_log_dropped",
            "Access-log lines dropped because stdout could not keep up",
            log.dropped.clone(),
        );
        Ok(log)
    }

    /// Starts the writer thread on `out`; it ends once every handle is
    /// dropped and its lines are written.
    fn writing_to(out: impl Write + Send + 'static) -> std::io::Result<AccessLog> {
        let (tx, writer) = queue::queue(out, BATCH_PAUSE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(writer)?;
        Ok(AccessLog {
            tx: Some(tx),
            dropped: Counter::default(),
        })
    }

    /// An access log that writes nothing (`--no-access-log`).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: Counter::default(),
        }
    }

    /// Queues one line; never blocks (a full queue drops and counts the line).
    pub fn log(&self, record: &ConnectionRecord<'_>) {
        self.log_json(record);
    }

    /// Queues any record as one JSON line (connection and audit lines).
    pub fn log_json<T: Serialize + ?Sized>(&self, record: &T) {
        self.queue(|lines| serde_json::to_writer(lines, record));
    }

    /// Queues the line `write` appends (one JSON value, see
    /// [`json::Object`]): the lines written on every HTTP request.
    pub fn log_line(&self, write: impl FnOnce(&mut Vec<u8>)) {
        self.queue(|lines| {
            write(lines);
            Ok::<(), std::convert::Infallible>(())
        });
    }

    fn queue<E>(&self, write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) {
        let Some(tx) = &self.tx else { return };
        if !tx.line(write) {
            self.dropped.inc();
        }
    }

    /// Blocks until every line queued so far is written, or `timeout`
    /// passes (at exit; call it off the runtime threads).
    pub fn flush(&self, timeout: std::time::Duration) {
        if let Some(tx) = &self.tx {
            tx.flush(timeout);
        }
    }

    /// Lines dropped because stdout could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn record_is_one_json_line() {
        let record = ConnectionRecord {
            ts: Timestamp::now(),
            direction: "inbound",
            peer_id: Some("spiffe://td/ns/a/sa/b"),
            src: "127.0.0.1:1".into(),
            dst: "127.0.0.1:2",
            port: 8443,
            decision: "deny",
            reason: "not in allow list",
            rule: Some("ports[0]"),
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 1,
            error: None,
        };
        let line = serde_json::to_string(&record).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["peer_id"], "spiffe://td/ns/a/sa/b");
        assert_eq!(v["rule"], "ports[0]");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        assert!(!line.contains('\n'));
    }

    /// A writer whose bytes the test reads.
    #[derive(Clone, Default)]
    pub(super) struct Shared(pub(super) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn batched_lines_are_all_written_in_order_by_a_flush() {
        let out = Shared::default();
        let (tx, writer) = queue::queue(out.clone(), BATCH_PAUSE);
        let writer = std::thread::spawn(writer);
        let log = AccessLog {
            tx: Some(tx),
            dropped: Counter::default(),
        };
        // Fewer lines than the queue holds after each flush: none dropped.
        for n in 0..2000 {
            log.log_json(&serde_json::json!({ "n": n }));
            if n == 1000 {
                // A flush waits for what was queued before it.
                log.flush(std::time::Duration::from_secs(10));
                let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
                assert_eq!(text.lines().count(), 1001);
            }
        }
        assert_eq!(log.dropped(), 0);
        let clone = log.clone();
        drop(log);
        clone.log_line(|line| line.extend_from_slice(br#"{"n":2000}"#));
        drop(clone);
        writer.join().unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2001, "the writer ends with the last handle");
        assert!(lines
            .iter()
            .enumerate()
            .all(|(n, l)| *l == format!(r#"{{"n":{n}}}"#)));
    }
}
