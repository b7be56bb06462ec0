//! The access-log line of one HTTP request (JSON): decided when the
//! response headers go out, written when the response body ends (or the
//! client goes away), so it carries the bytes moved both ways and the whole
//! duration.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde::Serialize;

use super::metrics::LastSeries;
use super::{HttpMetrics, ProxyBody};

/// One request's record.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestRecord {
    /// RFC 3339 UTC time the response ended.
    pub ts: crate::accesslog::Timestamp,
    /// Always `http`: tells request lines from connection lines.
    pub kind: &'static str,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The client workload (inbound) or the peer sidecar (outbound).
    #[serde(serialize_with = "shared_str")]
    pub peer_id: Option<Arc<str>>,
    /// The policy port.
    pub port: u16,
    /// Method ([`method_label`]).
    pub method: Cow<'static, str>,
    /// Path (no query: queries may carry secrets).
    pub path: String,
    /// The HTTP version the client spoke.
    pub version: &'static str,
    /// The matched route.
    #[serde(serialize_with = "shared_str")]
    pub route: Option<Arc<str>>,
    /// `allow`, `deny`, `would_deny`, `error`.
    pub decision: &'static str,
    /// The reason label (see `stepup::GateDecision::reason`).
    pub reason: &'static str,
    /// The deciding rule.
    #[serde(serialize_with = "shared_str")]
    pub rule: Option<Arc<str>>,
    /// The verified step-up subject.
    pub stepup_sub: Option<String>,
    /// Response status.
    pub status: u16,
    /// Request body bytes forwarded.
    pub bytes_in: u64,
    /// Response body bytes sent back.
    pub bytes_out: u64,
    /// Milliseconds to the response headers.
    pub headers_ms: f64,
    /// Milliseconds to the end of the response.
    pub duration_ms: f64,
}

/// Serializes a shared string as the string it is (serde's own impl for
/// `Arc` is behind its `rc` feature: a feature turned on changes every
/// symbol's hash in the binary, and with them the start-up order list,
/// link/README.md).
fn shared_str<S: serde::Serializer>(value: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    value.as_deref().serialize(s)
}

/// The protocol a client spoke, as the record holds it.
pub(crate) fn version_label(v: http::Version) -> &'static str {
    use http::Version;
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// A method as the record holds it: the standard ones as literals, any
/// other copied. The record's text fields are shared or literal where they
/// can be (the peer, route and rule are the connection's and the policy's
/// own `Arc`s): each copy was an allocation per request.
pub(crate) fn method_label(method: &http::Method) -> Cow<'static, str> {
    use http::Method;
    let known = match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return Cow::Owned(method.as_str().to_owned()),
    };
    Cow::Borrowed(known)
}

impl RequestRecord {
    /// The record as one JSON object, the fields in their declared order
    /// (what `serde_json` writes from the derive, the two times to the
    /// microsecond): written by hand on every request (see
    /// [`crate::accesslog::json`] for why).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = crate::accesslog::json::Object::new(out);
        o.time("ts", &self.ts)
            .known("kind", self.kind)
            .known("direction", self.direction)
            .opt_str("peer_id", self.peer_id.as_deref())
            .u64("port", u64::from(self.port))
            .str("method", &self.method)
            .str("path", &self.path)
            .known("version", self.version)
            .opt_str("route", self.route.as_deref())
            .known("decision", self.decision)
            .known("reason", self.reason)
            .opt_str("rule", self.rule.as_deref())
            .opt_str("stepup_sub", self.stepup_sub.as_deref())
            .u64("status", u64::from(self.status))
            .u64("bytes_in", self.bytes_in)
            .u64("bytes_out", self.bytes_out)
            .millis("headers_ms", self.headers_ms)
            .millis("duration_ms", self.duration_ms);
        o.end();
    }
}

/// Where request records go (the process's access log, or nowhere).
#[derive(Clone)]
pub struct RequestLog(Option<Arc<Sink>>);

type Sink = dyn Fn(&RequestRecord) + Send + Sync;

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
    pub fn new(sink: impl Fn(&RequestRecord) + Send + Sync + 'static) -> RequestLog {
        RequestLog(Some(Arc::new(sink)))
    }

    /// No access log.
    pub fn disabled() -> RequestLog {
        RequestLog(None)
    }

    /// Whether records go anywhere (else the line is not even made).
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Writes one record.
    pub fn write(&self, record: &RequestRecord) {
        if let Some(sink) = &self.0 {
            sink(record);
        }
    }
}

/// A request in flight: its record so far, and what finishing it needs.
pub(crate) struct Exchange {
    pub record: RequestRecord,
    started: Instant,
    bytes_in: Option<Arc<AtomicU64>>,
    log: RequestLog,
    metrics: HttpMetrics,
}

impl Exchange {
    pub(crate) fn new(
        direction: &'static str,
        port: u16,
        log: &RequestLog,
        metrics: &HttpMetrics,
    ) -> Exchange {
        Exchange {
            record: RequestRecord {
                kind: "http",
                direction,
                port,
                ..RequestRecord::default()
            },
            started: Instant::now(),
            bytes_in: None,
            log: log.clone(),
            metrics: metrics.clone(),
        }
    }

    /// Whether the access-log line will be written: only then are the
    /// record's descriptive fields worth filling (the route is always
    /// filled: metrics use it).
    pub(crate) fn logging(&self) -> bool {
        self.log.enabled()
    }

    /// Wraps the request body so the bytes forwarded are counted.
    pub(crate) fn count_request<B>(&mut self, body: B) -> CountIn<B> {
        // Only the access-log line reports the count.
        let count = self.logging().then(|| Arc::new(AtomicU64::new(0)));
        self.bytes_in.clone_from(&count);
        CountIn { inner: body, count }
    }

    /// The response is decided: counts the request metric now.
    pub(crate) fn decided(
        &mut self,
        status: http::StatusCode,
        decision: &'static str,
        reason: &'static str,
    ) {
        let secs = self.decide(status, decision, reason);
        let r = &self.record;
        self.metrics.request(
            r.direction,
            r.port,
            r.route.as_deref().unwrap_or(""),
            decision,
            r.status,
            secs,
        );
    }

    /// As [`Exchange::decided`], for a connection that keeps its last
    /// series in `last`.
    pub(crate) fn decided_in(
        &mut self,
        last: &mut LastSeries,
        status: http::StatusCode,
        decision: &'static str,
        reason: &'static str,
    ) {
        let secs = self.decide(status, decision, reason);
        self.metrics.request_cached(last, &self.record, secs);
    }

    fn decide(
        &mut self,
        status: http::StatusCode,
        decision: &'static str,
        reason: &'static str,
    ) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        self.record.status = status.as_u16();
        self.record.decision = decision;
        self.record.reason = reason;
        self.record.headers_ms = secs * 1000.0;
        secs
    }

    /// The response is decided: counts the request metric now, and returns
    /// the body that writes the access-log line when it ends.
    pub(crate) fn respond(
        mut self,
        status: http::StatusCode,
        decision: &'static str,
        reason: &'static str,
        body: ProxyBody,
    ) -> ProxyBody {
        self.decided(status, decision, reason);
        if !self.logging() {
            // No line to write at the end: the body needs no wrapper.
            return body;
        }
        LogAtEnd {
            inner: body,
            out: 0,
            done: Some(self),
        }
        .boxed()
    }

    fn finish(mut self, bytes_out: u64) {
        let bytes_in = self
            .bytes_in
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Relaxed));
        self.ended(bytes_in, bytes_out);
    }

    /// The exchange is over: writes its access-log line (if logging).
    pub(crate) fn ended(&mut self, bytes_in: u64, bytes_out: u64) {
        if !self.log.enabled() {
            return;
        }
        self.record.bytes_in = bytes_in;
        self.record.bytes_out = bytes_out;
        self.record.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.record.ts = crate::accesslog::Timestamp::now();
        self.log.write(&self.record);
    }
}

pin_project_lite::pin_project! {
    /// A request body counting the bytes that pass.
    pub(crate) struct CountIn<B> {
        #[pin]
        inner: B,
        count: Option<Arc<AtomicU64>>,
    }
}

impl<B: Body<Data = Bytes>> Body for CountIn<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let (Some(n), Some(count)) = (data_len(&frame), this.count) {
            count.fetch_add(n, Ordering::Relaxed);
        }
        frame
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A response body that writes the exchange's log line when it ends or
    /// is dropped (the client went away).
    pub(crate) struct LogAtEnd<B> {
        #[pin]
        inner: B,
        out: u64,
        done: Option<Exchange>,
    }

    impl<B> PinnedDrop for LogAtEnd<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(x) = this.done.take() {
                x.finish(*this.out);
            }
        }
    }
}

/// The bytes of a polled data frame (none for trailers, errors, the end).
fn data_len<E>(frame: &Poll<Option<Result<Frame<Bytes>, E>>>) -> Option<u64> {
    match frame {
        Poll::Ready(Some(Ok(f))) => f.data_ref().map(|d| d.len() as u64),
        _ => None,
    }
}

impl<B: Body<Data = Bytes>> Body for LogAtEnd<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(_))) => *this.out += data_len(&frame).unwrap_or(0),
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(x) = this.done.take() {
                    x.finish(*this.out);
                }
            }
            Poll::Pending => {}
        }
        frame
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::RequestRecord;

    /// The hand-written line reads back as the derive's serde_json line
    /// does, field for field (the times to the microsecond).
    #[test]
    fn the_written_line_is_the_serde_line() {
        let record = RequestRecord {
            ts: crate::accesslog::Timestamp::now(),
            kind: "http",
            direction: "inbound",
            peer_id: Some("spiffe://example.org/ns/a/sa/\"quoted\"".into()),
            port: 8080,
            method: "GET".into(),
            path: "/a\\b\u{1}\ttab/é".into(),
            version: "HTTP/1.1",
            route: None,
            decision: "allow",
            reason: "policy_allow",
            rule: Some("inbound.ports[0].allow[0]".into()),
            stepup_sub: None,
            status: 200,
            bytes_in: 17,
            bytes_out: u64::MAX,
            headers_ms: 1.2344,
            duration_ms: 12.3456,
        };
        let mut line = Vec::new();
        record.write_json(&mut line);
        let written: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let mut serde = serde_json::to_value(&record).unwrap();
        serde["headers_ms"] = serde_json::json!(1.234);
        serde["duration_ms"] = serde_json::json!(12.346);
        assert_eq!(written, serde);
        // Same keys in the same order.
        let keys = |v: &[u8]| -> Vec<String> {
            let s = String::from_utf8(v.to_vec()).unwrap();
            s.split(",\"")
                .map(|kv| {
                    kv.trim_start_matches("{\"")
                        .split('"')
                        .next()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        };
        assert_eq!(keys(&line), keys(&serde_json::to_vec(&record).unwrap()));
    }
}
