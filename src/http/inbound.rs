//! Inbound HTTP: one hyper server per authenticated connection (HTTP/1.1
//! and HTTP/2 detected by hyper; HTTP/2 only from a peer sidecar), the
//! route and step-up decision per request, then the request streamed to the
//! app over a pooled connection in the protocol the client spoke.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use super::headers::{path_is_canonical, set_xfcc, strip_hop_by_hop, ORIG_PROTO, STEPUP_SUB};
use super::{local_response, serve_until, HttpLayer, ProxyBody, RequestRecord};
use crate::policy::SpiffeId;
use crate::stepup::{self, Outcome, Peer, RequestInfo};

/// An authenticated inbound connection, as the HTTP layer needs it.
#[derive(Debug, Clone)]
pub struct InboundConn {
    /// The client workload.
    pub peer: SpiffeId,
    /// base64url SHA-256 of its leaf certificate (for `bindToPeer: cnf`).
    pub x5t: String,
    /// Our own SPIFFE ID (`x-forwarded-client-cert: By=`).
    pub own: Option<String>,
    /// The policy port.
    pub port: u16,
    /// The app, host:port.
    pub app: Arc<str>,
    /// The client's address (logs).
    pub client: SocketAddr,
    /// A peer sidecar (ALPN `stepmesh/h2`): HTTP/2 only, and each request
    /// says in `stepmesh-orig-proto` which protocol the app spoke.
    pub mesh: bool,
}

/// Pooled plaintext clients to local apps, one per HTTP version.
pub(crate) struct AppClients {
    h1: Client<HttpConnector, Incoming>,
    h2: Client<HttpConnector, Incoming>,
}

impl AppClients {
    pub(crate) fn new() -> AppClients {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new());
        let h1 = builder.build(connector.clone());
        builder.http2_only(true).http2_adaptive_window(true);
        let h2 = builder.build(connector);
        AppClients { h1, h2 }
    }
}

/// Serves HTTP on an authenticated connection until it closes, or until
/// `drain` resolves: then in-flight requests finish and the connection
/// closes (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`).
pub async fn serve<I>(
    layer: Arc<HttpLayer>,
    conn: Arc<InboundConn>,
    io: I,
    drain: impl Future<Output = ()> + Send,
) -> Result<(), super::BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mesh = conn.mesh;
    let svc = service_fn(move |req| {
        let (layer, conn) = (layer.clone(), conn.clone());
        async move { Ok::<_, Infallible>(handle(&layer, &conn, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .adaptive_window(true)
        .timer(TokioTimer::new());
    if mesh {
        builder = builder.http2_only();
    }
    serve_until(&builder, io, svc, drain).await
}

fn version_label(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

async fn handle(
    layer: &HttpLayer,
    conn: &InboundConn,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let policy = layer.policy.current();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // From a peer sidecar, the app's protocol rides in a header.
    let orig = if conn.mesh {
        match req.headers().get(ORIG_PROTO).map(HeaderValue::as_bytes) {
            Some(b"HTTP/2") => Version::HTTP_2,
            Some(b"HTTP/1.0") => Version::HTTP_10,
            _ => Version::HTTP_11,
        }
    } else {
        req.version()
    };
    let log = |route: Option<&str>,
               decision,
               reason: &str,
               rule: Option<&str>,
               sub: Option<&str>,
               status: StatusCode| {
        let secs = started.elapsed().as_secs_f64();
        layer.metrics.request(
            "inbound",
            conn.port,
            route.unwrap_or(""),
            decision,
            status.as_u16(),
            secs,
        );
        layer.log.write(&RequestRecord {
            ts: super::record::now_ts(),
            kind: "http",
            direction: "inbound",
            peer_id: Some(conn.peer.as_str()),
            port: conn.port,
            method: method.as_str(),
            path: &path,
            version: version_label(orig),
            route,
            decision,
            reason,
            rule,
            stepup_sub: sub,
            status: status.as_u16(),
            duration_ms: secs * 1000.0,
        });
    };
    let has_routes = policy.port(conn.port).is_some_and(|p| !p.routes.is_empty());
    if has_routes && !path_is_canonical(&path) {
        log(
            None,
            "deny",
            "non_canonical_path",
            None,
            None,
            StatusCode::BAD_REQUEST,
        );
        return local_response(
            StatusCode::BAD_REQUEST,
            "request path is not in canonical form\n",
        );
    }
    let info = RequestInfo {
        peer: Peer {
            id: &conn.peer,
            x5t_s256: &conn.x5t,
        },
        port: conn.port,
        method: &method,
        path: &path,
        headers: req.headers(),
    };
    let d = stepup::decide(&policy, &layer.stepup, info, stepup::gate::unix_now()).await;
    drop(policy);
    let route = d.route.as_deref();
    match &d.outcome {
        Outcome::Forbidden => {
            log(
                route,
                "deny",
                d.reason,
                Some(&d.rule),
                None,
                StatusCode::FORBIDDEN,
            );
            return local_response(
                StatusCode::FORBIDDEN,
                "forbidden: this workload may not call this route\n",
            );
        }
        Outcome::Challenge(challenge) => {
            log(
                route,
                "deny",
                d.reason,
                Some(&d.rule),
                None,
                StatusCode::UNAUTHORIZED,
            );
            let mut resp = local_response(
                StatusCode::UNAUTHORIZED,
                "step-up authentication required\n",
            );
            resp.headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, challenge.clone());
            return resp;
        }
        Outcome::Allow => {}
    }
    let decision = if d.would_deny { "would_deny" } else { "allow" };
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(ORIG_PROTO);
    if let Some(h) = &d.strip {
        parts.headers.remove(h);
    }
    parts.headers.remove(STEPUP_SUB);
    if let Some(sub) = d
        .subject
        .as_deref()
        .and_then(|s| HeaderValue::from_str(s).ok())
    {
        parts.headers.insert(STEPUP_SUB, sub);
    }
    set_xfcc(&mut parts.headers, conn.own.as_deref(), conn.peer.as_str());
    let to_h2 = orig == Version::HTTP_2;
    if !to_h2 && !parts.headers.contains_key(http::header::HOST) {
        if let Some(authority) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(http::header::HOST, authority);
        }
    }
    let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = match format!("http://{}{pq}", conn.app).parse() {
        Ok(uri) => uri,
        Err(_) => {
            log(
                route,
                "error",
                "bad_target",
                Some(&d.rule),
                d.subject.as_deref(),
                StatusCode::BAD_GATEWAY,
            );
            return local_response(StatusCode::BAD_GATEWAY, "bad app address\n");
        }
    };
    parts.version = if to_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let upstream = Request::from_parts(parts, body);
    let answer = if to_h2 {
        layer.app.h2.request(upstream).await
    } else {
        layer.app.h1.request(upstream).await
    };
    match answer {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            log(
                route,
                decision,
                d.reason,
                Some(&d.rule),
                d.subject.as_deref(),
                parts.status,
            );
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            tracing::warn!(app = %conn.app, error = %e, "inbound: app request failed");
            log(
                route,
                "error",
                "app_unavailable",
                Some(&d.rule),
                d.subject.as_deref(),
                StatusCode::BAD_GATEWAY,
            );
            local_response(StatusCode::BAD_GATEWAY, "the app did not answer\n")
        }
    }
}
