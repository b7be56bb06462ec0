//! Inbound HTTP: one hyper server per authenticated connection (HTTP/1.1
//! and HTTP/2 detected by hyper; HTTP/2 only from a peer sidecar), the
//! route and step-up decision per request, then the request streamed to the
//! app over a pooled connection in the protocol the client spoke.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use super::headers::{
    absolute, path_is_canonical, replace_xfcc, strip_hop_by_hop, xfcc_value, ORIG_PROTO, STEPUP_SUB,
};
use super::record::{CountIn, Exchange};
use super::{local_body, respond, serve_until, HttpLayer, ProxyBody};
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
    h1: Client<HttpConnector, CountIn<Incoming>>,
    h2: Client<HttpConnector, CountIn<Incoming>>,
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
    // What every request of the connection shares is made once, here.
    let conn = Arc::new(Served::new(conn));
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

/// A served connection and what its requests share, made once: the
/// `x-forwarded-client-cert` value and the app's authority.
struct Served {
    conn: Arc<InboundConn>,
    xfcc: Option<HeaderValue>,
    /// `None`: the app address is not a valid authority (each request 502).
    app: Option<Authority>,
}

impl Served {
    fn new(conn: Arc<InboundConn>) -> Served {
        Served {
            xfcc: xfcc_value(conn.own.as_deref(), conn.peer.as_str()),
            app: Authority::try_from(&*conn.app).ok(),
            conn,
        }
    }
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

async fn handle(layer: &HttpLayer, served: &Served, req: Request<Incoming>) -> Response<ProxyBody> {
    let conn = &*served.conn;
    let mut x = Exchange::new("inbound", conn.port, &layer.log, &layer.metrics);
    let policy = layer.policy.current();
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
    if x.logging() {
        x.record.peer_id = Some(conn.peer.as_str().to_owned());
        x.record.method = req.method().as_str().to_owned();
        x.record.path = req.uri().path().to_owned();
        x.record.version = version_label(orig);
    }
    let has_routes = policy.port(conn.port).is_some_and(|p| !p.routes.is_empty());
    if has_routes && !path_is_canonical(req.uri().path()) {
        let body = local_body("request path is not in canonical form\n");
        return respond(
            x,
            StatusCode::BAD_REQUEST,
            "deny",
            "non_canonical_path",
            body,
        );
    }
    let info = RequestInfo {
        peer: Peer {
            id: &conn.peer,
            x5t_s256: &conn.x5t,
        },
        port: conn.port,
        method: req.method(),
        path: req.uri().path(),
        headers: req.headers(),
    };
    let d = stepup::decide(&policy, &layer.stepup, info, stepup::gate::unix_now()).await;
    drop(policy);
    x.record.route = d.route.as_deref().map(str::to_owned);
    if x.logging() {
        x.record.rule = Some(d.rule.to_string());
    }
    match &d.outcome {
        Outcome::Forbidden => {
            let body = local_body("forbidden: this workload may not call this route\n");
            return respond(x, StatusCode::FORBIDDEN, "deny", d.reason, body);
        }
        Outcome::Challenge(challenge) => {
            let body = local_body("step-up authentication required\n");
            let mut resp = respond(x, StatusCode::UNAUTHORIZED, "deny", d.reason, body);
            resp.headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, challenge.clone());
            return resp;
        }
        Outcome::Allow => {}
    }
    if x.logging() {
        x.record.stepup_sub.clone_from(&d.subject);
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
    replace_xfcc(&mut parts.headers, served.xfcc.clone());
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
    parts.uri = match served.app.clone().and_then(|app| absolute(app, &parts.uri)) {
        Some(uri) => uri,
        None => {
            return respond(
                x,
                StatusCode::BAD_GATEWAY,
                "error",
                "bad_target",
                local_body("bad app address\n"),
            )
        }
    };
    parts.version = if to_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let upstream = Request::from_parts(parts, x.count_request(body));
    let answer = if to_h2 {
        layer.app.h2.request(upstream).await
    } else {
        layer.app.h1.request(upstream).await
    };
    match answer {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let body = x.respond(parts.status, decision, d.reason, body.boxed());
            Response::from_parts(parts, body)
        }
        Err(e) => {
            tracing::warn!(app = %conn.app, error = %e, "inbound: app request failed");
            respond(
                x,
                StatusCode::BAD_GATEWAY,
                "error",
                "app_unavailable",
                local_body("the app did not answer\n"),
            )
        }
    }
}
