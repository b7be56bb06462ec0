//! The injector's Prometheus metrics, served on `/metrics` of the webhook.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The label of a review counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `injected`, `unchanged`, `denied` or `bad_request`.
    pub outcome: &'static str,
}

/// Counters updated once per request (atomics; no lock on the request path).
#[derive(Debug, Clone, Default)]
pub struct InjectorMetrics {
    reviews: Family<OutcomeLabel, Counter>,
    h2_header_timeouts: Counter,
}

impl InjectorMetrics {
    /// Creates the metrics and registers them under `stepmesh_injector_`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "stepmesh_injector_reviews",
            "Admission requests answered, by outcome",
            metrics.reviews.clone(),
        );
        registry.register(
            "stepmesh_injector_h2_header_timeouts",
            "HTTP/2 connections closed because a frame or header block was not whole within 10 s of its first byte (slow clients)",
            metrics.h2_header_timeouts.clone(),
        );
        metrics
    }

    /// The counter of HTTP/2 connections the header deadline closed.
    pub fn h2_header_timeouts(&self) -> Counter {
        self.h2_header_timeouts.clone()
    }

    /// Counts one answered request.
    pub fn count(&self, outcome: &'static str) {
        self.reviews.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// The registry in Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
