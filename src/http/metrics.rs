//! HTTP metrics: requests by direction, port, route, decision and status,
//! and their latency to response headers.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::RequestRecord;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
    port: u16,
    route: String,
    decision: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

fn latency() -> Histogram {
    // 100 µs .. ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The request series a connection counted last (see
/// [`HttpMetrics::request_cached`]).
#[derive(Debug, Default)]
pub(crate) struct LastSeries {
    key: Option<(String, &'static str, u16)>,
    direction: &'static str,
    port: u16,
    counter: Counter,
}

/// The HTTP layer's metric families. One `Arc` around them all: every
/// request's record holds a handle, and a clone is then one atomic add,
/// not one per family and series.
#[derive(Clone, Debug)]
pub struct HttpMetrics(Arc<Families>);

/// What [`HttpMetrics`] shares.
#[derive(Debug)]
pub struct Families {
    requests: Family<RequestLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    latency: Family<DirectionLabel, Histogram, fn() -> Histogram>,
    /// The two series of `latency`, looked up once (no label lookup per
    /// request); they share their state with the family's.
    inbound: Histogram,
    outbound: Histogram,
    /// The HTTP/2 header deadline's refusals by direction, looked up once:
    /// each served HTTP/2 connection holds one.
    h2_inbound: Counter,
    h2_outbound: Counter,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        let latency: Family<DirectionLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency);
        let series = |direction| latency.get_or_create(&DirectionLabel { direction }).clone();
        let refusals: Family<RefusalLabels, Counter> = Family::default();
        let h2 = |direction| {
            let reason = super::h2_deadline::REASON;
            refusals
                .get_or_create(&RefusalLabels { direction, reason })
                .clone()
        };
        HttpMetrics(Arc::new(Families {
            requests: Family::default(),
            h2_inbound: h2("inbound"),
            h2_outbound: h2("outbound"),
            refusals,
            inbound: series("inbound"),
            outbound: series("outbound"),
            latency,
        }))
    }
}

impl std::ops::Deref for HttpMetrics {
    type Target = Families;

    fn deref(&self) -> &Families {
        &self.0
    }
}

impl HttpMetrics {
    /// Registers `stepmesh_http_requests_total` and
    /// `stepmesh_http_request_duration_seconds`.
    pub fn register(registry: &mut Registry) -> HttpMetrics {
        let m = HttpMetrics::default();
        registry.register(
            "stepmesh_http_requests",
            "HTTP requests by direction, port, route, decision (allow, deny, would_deny, error) and status",
            m.requests.clone(),
        );
        registry.register(
            "stepmesh_http_refusals",
            "Requests and connections refused before the app by the proxy's own checks, by direction and reason (request-target checks, header and body deadlines)",
            m.refusals.clone(),
        );
        registry.register(
            "stepmesh_http_request_duration_seconds",
            "Time to response headers, by direction",
            m.latency.clone(),
        );
        m
    }

    /// Counts one request in the series `last` holds, looking the series up
    /// only when it differs from the connection's previous request (most
    /// requests of a connection share one: one atomic add, no lookup).
    pub(crate) fn request_cached(&self, last: &mut LastSeries, r: &RequestRecord, secs: f64) {
        let (direction, port, decision, status) = (r.direction, r.port, r.decision, r.status);
        let route = r.route.as_deref().unwrap_or("");
        let hit = last
            .key
            .as_ref()
            .is_some_and(|(r, d, s)| r == route && *d == decision && *s == status)
            && last.direction == direction
            && last.port == port;
        if !hit {
            last.counter = self.series(direction, port, route, decision, status);
            last.key = Some((route.to_owned(), decision, status));
            last.direction = direction;
            last.port = port;
        }
        last.counter.inc();
        self.observe(direction, secs);
    }

    fn observe(&self, direction: &'static str, secs: f64) {
        match direction {
            "inbound" => self.inbound.observe(secs),
            "outbound" => self.outbound.observe(secs),
            _ => self
                .latency
                .get_or_create(&DirectionLabel { direction })
                .observe(secs),
        }
    }

    /// Counts one refusal by the proxy's own checks (not by policy).
    pub fn refusal(&self, direction: &'static str, reason: &'static str) {
        self.refusals
            .get_or_create(&RefusalLabels { direction, reason })
            .inc();
    }

    /// The counter of HTTP/2 header deadline refusals in `direction`.
    pub(crate) fn h2_header_timeouts(&self, direction: &'static str) -> Counter {
        match direction {
            "inbound" => self.h2_inbound.clone(),
            "outbound" => self.h2_outbound.clone(),
            _ => self
                .refusals
                .get_or_create(&RefusalLabels {
                    direction,
                    reason: super::h2_deadline::REASON,
                })
                .clone(),
        }
    }

    /// Counts one finished request.
    pub fn request(
        &self,
        direction: &'static str,
        port: u16,
        route: &str,
        decision: &'static str,
        status: u16,
        secs: f64,
    ) {
        self.series(direction, port, route, decision, status).inc();
        self.observe(direction, secs);
    }

    /// The request counter of one label set (made on first use).
    fn series(
        &self,
        direction: &'static str,
        port: u16,
        route: &str,
        decision: &'static str,
        status: u16,
    ) -> Counter {
        self.requests
            .get_or_create(&RequestLabels {
                direction,
                port,
                route: route.to_owned(),
                decision,
                status,
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(route: Option<&str>, decision: &'static str, status: u16) -> RequestRecord {
        RequestRecord {
            direction: "inbound",
            port: 80,
            route: route.map(Arc::from),
            decision,
            status,
            ..RequestRecord::default()
        }
    }

    fn exposition(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn a_cached_series_counts_like_a_looked_up_one() {
        let mut registry = Registry::default();
        let m = HttpMetrics::register(&mut registry);
        let mut last = LastSeries::default();
        for _ in 0..3 {
            m.request_cached(&mut last, &record(None, "allow", 200), 0.001);
        }
        let denied = record(Some("refunds"), "deny", 401);
        m.request_cached(&mut last, &denied, 0.001);
        m.request_cached(&mut last, &record(None, "allow", 200), 0.001);
        m.request("inbound", 80, "", "allow", 200, 0.001);
        let text = exposition(&registry);
        let line = |route: &str, decision: &str, status: u16| {
            let wanted = format!(
                "stepmesh_http_requests_total{{direction=\"inbound\",port=\"80\",route=\"{route}\",decision=\"{decision}\",status=\"{status}\"}} "
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&wanted))
                .unwrap_or_else(|| panic!("no {wanted} in\n{text}"))
                .to_owned()
        };
        assert_eq!(line("", "allow", 200), "5");
        assert_eq!(line("refunds", "deny", 401), "1");
        assert!(
            text.contains("stepmesh_http_request_duration_seconds_count{direction=\"inbound\"} 6"),
            "{text}"
        );
    }
}
