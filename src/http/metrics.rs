//! HTTP metrics: requests by direction, port, route, decision and status,
//! and their latency to response headers.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
    port: u16,
    route: String,
    decision: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

fn latency() -> Histogram {
    // 100 µs .. ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The HTTP layer's metric families.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<DirectionLabel, Histogram, fn() -> Histogram>,
    /// The two series of `latency`, looked up once (no label lookup per
    /// request); they share their state with the family's.
    inbound: Histogram,
    outbound: Histogram,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        let latency: Family<DirectionLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency);
        let series = |direction| latency.get_or_create(&DirectionLabel { direction }).clone();
        HttpMetrics {
            requests: Family::default(),
            inbound: series("inbound"),
            outbound: series("outbound"),
            latency,
        }
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
            "stepmesh_http_request_duration_seconds",
            "Time to response headers, by direction",
            m.latency.clone(),
        );
        m
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
        self.requests
            .get_or_create(&RequestLabels {
                direction,
                port,
                route: route.to_owned(),
                decision,
                status,
            })
            .inc();
        match direction {
            "inbound" => self.inbound.observe(secs),
            "outbound" => self.outbound.observe(secs),
            _ => self
                .latency
                .get_or_create(&DirectionLabel { direction })
                .observe(secs),
        }
    }
}
