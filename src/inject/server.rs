//! `stepmesh inject serve`: the HTTPS admission webhook on `/inject`, plus
//! `/healthz` and `/ready`. Every bad request gets a 4xx naming the problem;
//! nothing a caller sends stops the server.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::config::InjectorConfig;
use super::metrics::{render, InjectorMetrics};
use super::review::{review, Outcome};

/// Deadline for a client's TLS handshake and request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 1024;

/// What every request handler shares.
#[derive(Debug)]
struct State {
    config: InjectorConfig,
    max_body: usize,
    metrics: InjectorMetrics,
    registry: prometheus_client::registry::Registry,
}

/// A bound, not yet running webhook server.
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
}

impl Server {
    /// Binds `addr`; bodies over `max_body` bytes are refused with 413.
    pub async fn bind(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        config: InjectorConfig,
        max_body: usize,
    ) -> std::io::Result<Self> {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = InjectorMetrics::new(&mut registry);
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            state: Arc::new(State {
                config,
                max_body,
                metrics,
                registry,
            }),
        })
    }

    /// The bound address (the port when `:0` was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes; then stops accepting.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => return,
                permit = limit.clone().acquire_owned() => permit,
            };
            // The semaphore is never closed.
            let Ok(permit) = permit else { return };
            let accepted = tokio::select! {
                () = &mut shutdown => return,
                accepted = self.listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = self.acceptor.clone();
            let state = self.state.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(err)) => return tracing::debug!(%peer, %err, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                };
                let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT);
                if let Err(err) = builder.serve_connection(TokioIo::new(tls), service).await {
                    tracing::debug!(%peer, %err, "connection ended with an error");
                }
            });
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz" | "/ready") => text(StatusCode::OK, "ok".into()),
        (&Method::GET, "/metrics") => text(StatusCode::OK, render(&state.registry)),
        (&Method::POST, "/inject") => {
            let response = inject(req, &state).await;
            if response.status() != StatusCode::OK {
                state.metrics.count("bad_request");
            }
            response
        }
        (_, "/inject") => {
            let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            r
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "no such path; the webhook is at /inject",
        ),
    })
}

async fn inject(req: Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("application/json") {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("content type {content_type:?}: expected application/json"),
        );
    }
    let too_big = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {} bytes", state.max_body),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.max_body as u64) {
        return too_big();
    }
    let body = match Limited::new(req.into_body(), state.max_body)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => return too_big(),
        Err(err) => return error(StatusCode::BAD_REQUEST, &format!("reading the body: {err}")),
    };
    match review(&body, &state.config) {
        Ok((answer, outcome)) => {
            let uid = answer
                .pointer("/response/uid")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            match &outcome {
                Outcome::Injected => tracing::info!(uid, "injected"),
                Outcome::Unchanged(why) => tracing::debug!(uid, why, "not injected"),
                Outcome::Denied(why) => tracing::warn!(uid, why, "denied"),
            }
            state.metrics.count(match outcome {
                Outcome::Injected => "injected",
                Outcome::Unchanged(_) => "unchanged",
                Outcome::Denied(_) => "denied",
            });
            json(StatusCode::OK, answer.to_string())
        }
        Err(err) => {
            tracing::warn!(%err, "bad admission request");
            error(StatusCode::BAD_REQUEST, &err.to_string())
        }
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": message }).to_string())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
