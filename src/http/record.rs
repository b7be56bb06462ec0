//! The access-log line of one HTTP request (JSON), and the sink it goes to.

use std::sync::Arc;

use serde::Serialize;

/// One request's record.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord<'a> {
    /// RFC 3339 UTC time the response headers were sent.
    pub ts: String,
    /// Always `http`: tells request lines from connection lines.
    pub kind: &'static str,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The client workload (inbound) or the peer sidecar (outbound).
    pub peer_id: Option<&'a str>,
    /// The policy port.
    pub port: u16,
    /// Method.
    pub method: &'a str,
    /// Path (no query: queries may carry secrets).
    pub path: &'a str,
    /// The HTTP version the client spoke.
    pub version: &'static str,
    /// The matched route.
    pub route: Option<&'a str>,
    /// `allow`, `deny`, `would_deny`, `error`.
    pub decision: &'static str,
    /// The reason label (see `stepup::GateDecision::reason`).
    pub reason: &'a str,
    /// The deciding rule.
    pub rule: Option<&'a str>,
    /// The verified step-up subject.
    pub stepup_sub: Option<&'a str>,
    /// Response status.
    pub status: u16,
    /// Milliseconds to response headers.
    pub duration_ms: f64,
}

/// Where request records go (the process's access log, or nowhere).
#[derive(Clone)]
pub struct RequestLog(Option<Arc<Sink>>);

type Sink = dyn Fn(&RequestRecord<'_>) + Send + Sync;

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "RequestLog(on)"
        } else {
            "RequestLog(off)"
        })
    }
}

impl RequestLog {
    /// Records go to `sink` (must not block: queue and return).
    pub fn new(sink: impl Fn(&RequestRecord<'_>) + Send + Sync + 'static) -> RequestLog {
        RequestLog(Some(Arc::new(sink)))
    }

    /// No access log.
    pub fn disabled() -> RequestLog {
        RequestLog(None)
    }

    /// Writes one record.
    pub fn write(&self, record: &RequestRecord<'_>) {
        if let Some(sink) = &self.0 {
            sink(record);
        }
    }
}

/// The record's timestamp.
pub(crate) fn now_ts() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}
