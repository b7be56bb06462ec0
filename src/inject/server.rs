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
use crate::http::h2_deadline::HeaderDeadline;
use crate::net::linger::Lingering;

/// Deadline for a client's TLS handshake and request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 1024;
/// How long a request waits for room for its body: the room runs out only
/// when someone holds bodies on purpose (32 MiB is thousands of reviews),
/// and the API server gives up after 5 s.
const ROOM_WAIT: Duration = Duration::from_secs(1);

/// Per-request limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body accepted (413 beyond).
    pub max_body: usize,
    /// Deadline for receiving the body (408 beyond), the wait (at most 1 s)
    /// for room under `bodies_in_flight` included (503 beyond): a slow
    /// sender cannot hold a connection slot.
    pub body_timeout: Duration,
    /// Bytes of request bodies held at once, all requests together.
    pub bodies_in_flight: usize,
}

/// What every request handler shares.
#[derive(Debug)]
struct State {
    config: InjectorConfig,
    limits: Limits,
    /// Room for request bodies, in KiB: each request reserves its declared
    /// length (or the largest body) before reading it. Unbounded, 32
    /// connections sending 4 MiB bodies slowly took the webhook past its
    /// 128 MiB limit, and a killed webhook refuses every pod (found by
    /// review).
    bodies: Arc<Semaphore>,
    /// All of that room, in KiB: what a body larger than it reserves.
    room_kib: u32,
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
    /// Binds `addr`.
    pub async fn bind(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        config: InjectorConfig,
        limits: Limits,
    ) -> std::io::Result<Self> {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = InjectorMetrics::new(&mut registry);
        let room_kib = u32::try_from(limits.bodies_in_flight.div_ceil(1024)).unwrap_or(u32::MAX);
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            state: Arc::new(State {
                config,
                limits,
                bodies: Arc::new(Semaphore::new(room_kib as usize)),
                room_kib,
                metrics,
                registry,
            }),
        })
    }

    /// The bound address (the port when `:0` was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then drains: stops accepting, lets
    /// every connection finish the request it is on (idle keep-alive
    /// connections close at once), and returns when all are done or after
    /// `drain` at most.
    pub async fn run(self, shutdown: impl Future<Output = ()>, drain: Duration) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                permit = limit.clone().acquire_owned() => permit,
            };
            // The semaphore is never closed.
            let Ok(permit) = permit else { break };
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = crate::net::accept(&self.listener, Duration::from_millis(50)) => accepted,
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, state) = (self.acceptor.clone(), self.state.clone());
            let stop = stop_rx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                serve_connection(acceptor, tcp, peer, state, stop).await;
            });
        }
        drop(self.listener);
        let _ = stop_tx.send(true);
        let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
        if tokio::time::timeout(drain, limit.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("drain timed out; closing the remaining connections");
        }
    }
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => return tracing::debug!(%peer, %err, "TLS handshake failed"),
        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
    };
    // hyper's HTTP/2 server has no header deadline: the sidecar's, below it.
    let timeouts = state.metrics.h2_header_timeouts();
    // Lingering: a shutdown ends connections on our side (`net::linger`).
    let tls = HeaderDeadline::new(Lingering::new(tls), HANDSHAKE_TIMEOUT, timeouts, "webhook");
    let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let stopped = async move {
        // The guard `wait_for` returns must not live across an await.
        let _ = stop.wait_for(|stopped| *stopped).await.map(|_| ());
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stopped => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%peer, %err, "connection ended with an error");
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
            &format!("body larger than {} bytes", state.limits.max_body),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.limits.max_body as u64) {
        return too_big();
    }
    let deadline = tokio::time::Instant::now() + state.limits.body_timeout;
    // What the body may take, in KiB, reserved before a byte is read (a
    // body larger than all of the room reserves all of it).
    let reserve = declared
        .unwrap_or(state.limits.max_body as u64)
        .div_ceil(1024)
        .max(1);
    let reserve = u32::try_from(reserve)
        .unwrap_or(u32::MAX)
        .min(state.room_kib);
    let room = state.bodies.clone().acquire_many_owned(reserve);
    let Ok(Ok(_room)) = tokio::time::timeout(ROOM_WAIT.min(state.limits.body_timeout), room).await
    else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy: request bodies in flight are at their limit; try again",
        );
    };
    let collect = Limited::new(req.into_body(), state.limits.max_body).collect();
    let Ok(collected) = tokio::time::timeout_at(deadline, collect).await else {
        return error(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        );
    };
    let body = match collected {
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
                Outcome::Debugged => {
                    tracing::info!(uid, "NET_RAW dropped from new ephemeral containers")
                }
                Outcome::Unchanged(why) => tracing::debug!(uid, why, "not injected"),
                Outcome::Denied(why) => tracing::warn!(uid, why, "denied"),
            }
            state.metrics.count(match outcome {
                Outcome::Injected => "injected",
                Outcome::Debugged => "debugged",
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
