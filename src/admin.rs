//! The sidecar's admin server: `/healthz`, `/ready`, `/metrics`, `/config`,
//! and kubelet's rewritten app probes on `/app-health/...` (run by
//! [`crate::appprobe`]). Plain HTTP/1.1 on a separate listener, off the
//! data path.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::appprobe::PATH_PREFIX;

/// What the admin endpoints read; built once the registry is complete.
pub struct AdminState {
    /// The process's frozen metrics registry.
    pub registry: Arc<Registry>,
    /// `/ready`: `None` once an SVID is loaded and every listener is up,
    /// else why not (the 503's body).
    pub ready: Box<dyn Fn() -> Option<String> + Send + Sync>,
    /// `/config`: the running configuration as JSON.
    pub config: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// `/app-health/...`: the app's original probes (`--app-probes`).
    pub probes: crate::appprobe::Prober,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// Serves admin requests until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept");
                // Out of descriptors and the like: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move {
                    let probe = req.uri().path().starts_with(PATH_PREFIX)
                        && (req.method() == Method::GET || req.method() == Method::HEAD);
                    if !probe {
                        return Ok::<_, Infallible>(respond(&state, &req));
                    }
                    // Not gated on /ready: the app's health is the app's, and
                    // a CA outage must not make kubelet restart the app.
                    let ua = req.headers().get(http::header::USER_AGENT);
                    let answer = state.probes.answer(req.uri().path(), ua).await;
                    Ok(text(answer.status, answer.detail + "\n"))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection");
            }
        });
    }
}

fn respond(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/ready" => match (state.ready)() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            let body = crate::metrics::encode(&state.registry);
            let mut resp = text(StatusCode::OK, body);
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        "/config" => {
            let body = serde_json::to_string_pretty(&(state.config)()).unwrap_or_default();
            let mut resp = text(StatusCode::OK, body + "\n");
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}
