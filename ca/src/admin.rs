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
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections served at once. Past it, a new one is closed as soon as it
/// is accepted: the port is reachable from the whole cluster (the kubelet's
/// probes come to it), and each connection held a task and a buffer for as
/// long as its client liked. The kubelet and a scraper need a handful.
pub const MAX_CONNECTIONS: usize = 256;

/// A request head (or the next one on a kept-alive connection) must be
/// whole within this: a client that connects and sends nothing holds its
/// connection no longer (hyper's own default, 30 s, needs a timer, which
/// this server had not given it: no deadline at all).
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
    max_connections: usize,
    header_timeout: std::time::Duration,
}

impl Admin {
    /// `/healthz`, `/ready` (from `ready`) and `/metrics` (from `registry`).
    pub fn new(registry: Arc<Registry>, ready: ReadyCheck) -> Self {
        Self {
            registry,
            ready,
            routes: HashMap::new(),
            prefix: None,
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
        }
    }

    /// Other limits than [`MAX_CONNECTIONS`] and [`HEADER_TIMEOUT`].
    pub fn limits(mut self, max_connections: usize, header_timeout: std::time::Duration) -> Self {
        self.max_connections = max_connections;
        self.header_timeout = header_timeout;
        self
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

    /// Serves until `shutdown` resolves; each connection in its own task,
    /// at most [`MAX_CONNECTIONS`] at once, each request head within
    /// [`HEADER_TIMEOUT`] (unless [`Admin::limits`] says otherwise).
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send) {
        let (max_connections, header_timeout) = (self.max_connections, self.header_timeout);
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(max_connections));
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
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!("admin: {max_connections} connections open, closing a new one");
                drop(stream);
                continue;
            };
            let this = this.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(req).await.map(Full::new)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Reads until the server closes (or 5 s): what it sent.
    async fn until_closed(s: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn silent_connections_are_capped_and_closed_at_the_header_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = Admin::new(Arc::new(Registry::default()), Readiness::default().check())
            .limits(2, Duration::from_millis(300));
        tokio::spawn(admin.serve(listener, std::future::pending()));
        // Two silent clients take both places; a third is closed at once.
        let mut silent = [
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        assert_eq!(until_closed(&mut third).await, "");
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        // The silent ones end at the header deadline, and a client is served.
        for s in &mut silent {
            until_closed(s).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(200));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut probe = TcpStream::connect(addr).await.unwrap();
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = until_closed(&mut probe).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    }
}
