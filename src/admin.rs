//! The sidecar's admin routes on the one admin server
//! ([`stepmesh_ca::admin::Admin`], shared with the CA): `/healthz`,
//! `/ready`, `/metrics`, plus `/config` and kubelet's rewritten app probes
//! on `/app-health/...` (run by [`crate::appprobe`]). Off the data path.

use std::sync::Arc;

use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use prometheus_client::registry::Registry;
use stepmesh_ca::admin::{text, Admin, ReadyCheck};

use crate::appprobe::PATH_PREFIX;

/// What the sidecar's admin endpoints read; built once the registry is
/// complete.
pub struct AdminState {
    /// The process's frozen metrics registry.
    pub registry: Arc<Registry>,
    /// Why the sidecar is not ready (`None`: ready).
    pub ready: ReadyCheck,
    /// The running configuration, for `/config`.
    pub config: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// The app probes behind `/app-health/`.
    pub probes: crate::appprobe::Prober,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// The sidecar's admin server over `state`.
pub fn sidecar(state: AdminState) -> Admin {
    let AdminState {
        registry,
        ready,
        config,
        probes,
    } = state;
    let probes = Arc::new(probes);
    Admin::new(registry, ready)
        .route(
            "/config",
            Arc::new(move |_| {
                let body = serde_json::to_string_pretty(&config()).unwrap_or_default();
                let mut resp = text(StatusCode::OK, body + "\n");
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                resp
            }),
        )
        .prefix(
            PATH_PREFIX,
            Arc::new(move |parts: http::request::Parts| {
                let probes = probes.clone();
                Box::pin(async move {
                    let ua = parts.headers.get(http::header::USER_AGENT);
                    let answer = probes.answer(parts.uri.path(), ua).await;
                    let resp: Response<Bytes> = text(answer.status, answer.detail + "\n");
                    resp
                })
            }),
        )
}
