//! The one admin server of every stepmesh process (the CA, the sidecar):
//! HTTP/1.1, `GET`/`HEAD` only, `/healthz`, `/ready` (with the reason when
//! not ready), `/metrics` (OpenMetrics text), plus the routes a process
//! adds: whole responses for exact paths, and one asynchronous handler for
//! a path prefix (the sidecar's kubelet probes). It stays off the data path.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// An extra route: gets the request head, returns a whole response.
pub type Handler = Arc<dyn Fn(&http::request::Parts) -> Response<Bytes> + Send + Sync>;

/// A handler for every path under a prefix, which may wait (an app probe).
pub type PrefixHandler =
    Arc<dyn Fn(http::request::Parts) -> BoxFuture<'static, Response<Bytes>> + Send + Sync>;

/// Why the process is not ready, or `None` when it is.
pub type ReadyCheck = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// A ready flag, for processes whose readiness is one switch (the CA).
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Sets the flag.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Reads the flag.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// The flag as a [`ReadyCheck`] ("starting" until set).
    pub fn check(&self) -> ReadyCheck {
        let flag = self.clone();
        Arc::new(move || (!flag.get()).then(|| "starting".to_owned()))
    }
}

/// An admin server, built with its routes, then served.
pub struct Admin {
    registry: Arc<Registry>,
    ready: ReadyCheck,
    routes: HashMap<String, Handler>,
    prefix: Option<(String, PrefixHandler)>,
}

impl Admin {
    /// `/healthz`, `/ready` (from `ready`) and `/metrics` (from `registry`).
    pub fn new(registry: Arc<Registry>, ready: ReadyCheck) -> Self {
        Self {
            registry,
            ready,
            routes: HashMap::new(),
            prefix: None,
        }
    }

    /// Adds an exact-path route.
    pub fn route(mut self, path: &str, handler: Handler) -> Self {
        self.routes.insert(path.to_owned(), handler);
        self
    }

    /// Sends every path starting with `prefix` to `handler`.
    pub fn prefix(mut self, prefix: &str, handler: PrefixHandler) -> Self {
        self.prefix = Some((prefix.to_owned(), handler));
        self
    }

    /// Serves until `shutdown` resolves; each connection in its own task.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send) {
        let this = Arc::new(self);
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin.
                        tracing::warn!(error = %e, "admin: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let this = this.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(req).await.map(Full::new)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "admin connection");
                }
            });
        }
    }

    async fn handle(&self, req: http::Request<Incoming>) -> Response<Bytes> {
        let (parts, _body) = req.into_parts();
        if parts.method != Method::GET && parts.method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match parts.uri.path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/ready" => match (self.ready)() {
                None => text(StatusCode::OK, "ready\n"),
                Some(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
            "/metrics" => {
                let mut out = String::new();
                if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
                    return text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "metrics encoding failed\n",
                    );
                }
                let mut resp = text(StatusCode::OK, out);
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                resp
            }
            path => {
                if let Some(handler) = self.routes.get(path) {
                    return handler(&parts);
                }
                match &self.prefix {
                    Some((prefix, handler)) if path.starts_with(prefix.as_str()) => {
                        handler(parts).await
                    }
                    _ => text(StatusCode::NOT_FOUND, "not found\n"),
                }
            }
        }
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Bytes> {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp
}
