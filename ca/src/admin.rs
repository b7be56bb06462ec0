//! A tiny HTTP/1.1 admin server: `/healthz`, `/ready`, `/metrics`
//! (Prometheus text) and any extra routes the caller adds. Shared by the CA
//! and the sidecar; it stays off the data path.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// An extra route: gets the request head, returns a whole response.
pub type Handler = Arc<dyn Fn(&http::request::Parts) -> Response<Bytes> + Send + Sync>;

/// Whether the process is ready to serve; `/ready` answers 200 once set.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks ready (or not).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the admin server serves.
pub struct Admin {
    registry: Arc<Registry>,
    ready: Readiness,
    routes: HashMap<String, Handler>,
}

impl Admin {
    /// `/metrics` renders `registry`; `/ready` follows `ready`.
    pub fn new(registry: Arc<Registry>, ready: Readiness) -> Self {
        Self {
            registry,
            ready,
            routes: HashMap::new(),
        }
    }

    /// Adds a GET route (for example the sidecar's `/config`).
    pub fn route(mut self, path: &str, handler: Handler) -> Self {
        self.routes.insert(path.to_owned(), handler);
        self
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send) {
        let this = Arc::new(self);
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin: accept failed");
                        continue;
                    }
                },
            };
            let this = this.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(req)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http1_only()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    fn handle(&self, req: http::Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, _body) = req.into_parts();
        if parts.method != Method::GET && parts.method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match parts.uri.path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/ready" if self.ready.get() => text(StatusCode::OK, "ready\n"),
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/metrics" => {
                let mut out = String::new();
                if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
                    return text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "metrics encoding failed\n",
                    );
                }
                let mut resp = Response::new(Full::new(Bytes::from(out)));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                resp
            }
            path => match self.routes.get(path) {
                Some(handler) => handler(&parts).map(Full::new),
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            },
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}
