//! The JSON access log: one line per connection on stdout, through its own
//! writer thread (not tracing's stderr), so operators can ship it apart from
//! diagnostics and a slow stdout never blocks a runtime thread. The writer
//! takes lines in batches (see [`BATCH_PAUSE`]): a line costs a runtime
//! thread its JSON and a queue slot, not a wake-up and a `write`.

use std::io::{BufWriter, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Serialize;

pub mod json;

/// Lines waiting for the writer; beyond this, lines are dropped and counted.
const QUEUE: usize = 2048;

/// How long the writer rests after writing a batch before it takes the
/// next. Under load the queue fills meanwhile, so the writer is seldom
/// parked when a runtime thread queues a line (no wake-up, a futex call
/// and a context switch, per line) and one `write` carries many lines.
/// Short, because the queue must hold every line that comes during the
/// pause: 1 ms drops lines only above 2,000,000 lines/s (a burst of
/// connection ends, 2,048 within one pause), where 5 ms dropped them above
/// 400,000; and a line reaches stdout at most 1 ms later than it would
/// have. Still at most 1,000 wake-ups and `write`s a second, however many
/// lines.
const BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// Bytes of lines gathered before a `write` (stdout's own buffer writes
/// each line on its newline).
const BATCH_BYTES: usize = 32 * 1024;

/// A line's usual length: serialized into a buffer this large, it is not
/// grown (copied) as it is written.
const LINE_BYTES: usize = 512;

/// One connection's record.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionRecord<'a> {
    /// RFC 3339 UTC time the connection ended.
    pub ts: String,
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
    tx: Option<SyncSender<Msg>>,
    dropped: Counter,
}

/// What the writer thread receives.
#[derive(Debug)]
enum Msg {
    /// One line of JSON, newline included.
    Line(Vec<u8>),
    /// Everything queued before is written: acknowledge.
    Flush(SyncSender<()>),
}

impl AccessLog {
    /// Starts the writer thread on stdout; registers the dropped-lines counter.
    pub fn stdout(registry: &mut Registry) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<Msg>(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_batches(&rx, std::io::stdout()))?;
        let dropped = Counter::default();
        registry.register(
            "stepmesh_access_log_dropped",
            "Access-log lines dropped because stdout could not keep up",
            dropped.clone(),
        );
        Ok(Self {
            tx: Some(tx),
            dropped,
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
        if self.tx.is_none() {
            return;
        }
        let mut line = Vec::with_capacity(LINE_BYTES);
        if serde_json::to_writer(&mut line, record).is_ok() {
            self.queue(line);
        }
    }

    /// Queues the line `write` puts into an empty buffer (one JSON value,
    /// see [`json::Object`]): the lines written on every HTTP request.
    pub fn log_line(&self, write: impl FnOnce(&mut Vec<u8>)) {
        if self.tx.is_none() {
            return;
        }
        let mut line = Vec::with_capacity(LINE_BYTES);
        write(&mut line);
        self.queue(line);
    }

    fn queue(&self, mut line: Vec<u8>) {
        let Some(tx) = &self.tx else { return };
        line.push(b'\n');
        if let Err(TrySendError::Full(_)) = tx.try_send(Msg::Line(line)) {
            self.dropped.inc();
        }
    }

    /// Blocks until every line queued so far is written, or `timeout`
    /// passes (at exit; call it off the runtime threads).
    pub fn flush(&self, timeout: std::time::Duration) {
        let Some(tx) = &self.tx else { return };
        let (ack, done) = sync_channel(1);
        if tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(timeout);
        }
    }

    /// Lines dropped because stdout could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

/// The writer thread: writes what is queued to `out` in batches, resting
/// [`BATCH_PAUSE`] after each, until every sender is gone.
fn write_batches(rx: &Receiver<Msg>, out: impl Write) {
    let mut out = BufWriter::with_capacity(BATCH_BYTES, out);
    let mut acks = Vec::new();
    while let Ok(msg) = rx.recv() {
        for msg in std::iter::once(msg).chain(rx.try_iter()) {
            match msg {
                Msg::Line(line) => {
                    let _ = out.write_all(&line);
                }
                Msg::Flush(ack) => acks.push(ack),
            }
        }
        let _ = out.flush();
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        std::thread::sleep(BATCH_PAUSE);
    }
}

/// Now as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// A time as RFC 3339 UTC with milliseconds (civil-from-days, H. Hinnant).
pub fn rfc3339(at: std::time::SystemTime) -> String {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let millis = since.subsec_millis();
    // Digits by hand, not `format!`: every HTTP request's log line has one,
    // and the formatting machinery cost nearly as much as serializing the
    // rest of the line (a profile under load: 3 % and 4 % of the CPU).
    let year = match u64::try_from(year) {
        Ok(year) if year <= 9999 => year,
        _ => {
            return format!(
                "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z"
            )
        }
    };
    let mut out = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut out[0..4], year);
    put_digits(&mut out[5..7], month as u64);
    put_digits(&mut out[8..10], day as u64);
    put_digits(&mut out[11..13], hour);
    put_digits(&mut out[14..16], minute);
    put_digits(&mut out[17..19], second);
    put_digits(&mut out[20..23], u64::from(millis));
    // ASCII digits and separators only: always valid (and checked a word
    // at a time, not through the lossy decoder's chunks).
    String::from_utf8(out.to_vec()).unwrap_or_default()
}

/// Writes `n` as decimal digits filling `to` (zero-padded; `n` fits).
fn put_digits(to: &mut [u8], mut n: u64) {
    for d in to.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn record_is_one_json_line() {
        let record = ConnectionRecord {
            ts: now_rfc3339(),
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
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_709_251_199_123);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.123Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(253_402_300_799_999);
        assert_eq!(rfc3339(t), "9999-12-31T23:59:59.999Z");
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_800);
        assert_eq!(rfc3339(t), "10000-01-01T00:00:00.000Z");
    }

    /// A writer whose bytes the test reads.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

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
        let (tx, rx) = sync_channel::<Msg>(QUEUE);
        let out = Shared::default();
        let writer = {
            let out = out.clone();
            std::thread::spawn(move || write_batches(&rx, out))
        };
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
        drop(log);
        writer.join().unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2000);
        assert!(lines
            .iter()
            .enumerate()
            .all(|(n, l)| *l == format!(r#"{{"n":{n}}}"#)));
    }
}
