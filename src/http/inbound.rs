//! Inbound HTTP: the route and step-up decision per request on an
//! authenticated connection, then the request streamed to the app in the
//! protocol the client spoke. HTTP/1 is relayed on the connection's own
//! task to an app connection of its own ([`h1`]); HTTP/2 (a peer sidecar's
//! multiplexed connection included) is served by hyper and sent over a
//! pooled app client.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{request, HeaderValue, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::detect::{self, Detected, Prefixed};
use super::h1::message::{self, Detail};
use super::headers::{
    names, remove_other_spellings, replace_xfcc, strip_hop_by_hop, xfcc_value, ORIG_PROTO,
    STEPUP_SUB,
};
use super::record::{CountIn, Exchange};
use super::{h1, serve_until, HttpLayer, Local, Verdict};
use crate::net::Outcome;
use crate::policy::{Policy, SpiffeId};
use crate::stepup::{self, Outcome as GateOutcome, Peer, RequestInfo};

mod hyper_request;

/// An authenticated inbound connection, as the HTTP layer needs it.
#[derive(Debug)]
pub struct InboundConn {
    /// The client workload (the mesh connection's, shared by its tunnels).
    pub peer: Arc<SpiffeId>,
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
    /// A peer sidecar (ALPN `stepmesh/h2` and the tunnel ALPNs): HTTP/2
    /// only, and each request says in `stepmesh-orig-proto` which protocol
    /// the app spoke.
    pub mesh: bool,
    /// A peer sidecar's connection to a `tcp` port (ALPN `stepmesh/tunnel`):
    /// CONNECT tunnels only, every other request is refused (`421`).
    pub tunnels_only: bool,
    /// Who serves the CONNECT tunnels of a peer sidecar (`None`: a CONNECT
    /// is an ordinary request, refused as not a path).
    pub tunnels: Option<super::tunnel::Tunnels>,
    /// Set once a policy or trust change (a revoked peer, a removed root)
    /// denied the connection: it is closing, and a request that still
    /// arrives is answered `403` (an HTTP/2 client that never acknowledges
    /// the GOAWAY kept opening streams, each served).
    pub closing: crate::net::close_signal::CloseSignal,
}

/// Deadline for dialling the app, unless the proxy sets its own.
pub(crate) const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pooled plaintext clients to local apps, one per HTTP version (HTTP/2
/// requests; HTTP/1 connections each dial their own, see [`h1`]).
pub(crate) struct AppClients {
    h1: Client<HttpConnector, CountIn<Incoming>>,
    h2: Client<HttpConnector, CountIn<Incoming>>,
}

impl AppClients {
    pub(crate) fn new() -> AppClients {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(APP_CONNECT_TIMEOUT));
        let mut builder = Client::builder(TokioExecutor::new());
        // Idle HTTP/1 app connections as the relay's own pool keeps them
        // (under Node.js's 5 s keep-alive, at most 256 per app): hyper's
        // default kept any number for 90 s, outside every limit.
        builder
            .pool_idle_timeout(APP_POOL_IDLE)
            .pool_max_idle_per_host(APP_POOL_PER_APP)
            .pool_timer(TokioTimer::new());
        let h1 = builder.build(connector.clone());
        builder
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_only(true)
            .http2_initial_stream_window_size(super::h2_settings::STREAM_WINDOW)
            .http2_initial_connection_window_size(super::h2_settings::CONNECTION_WINDOW);
        let h2 = builder.build(connector);
        AppClients { h1, h2 }
    }
}

/// Serves HTTP on an authenticated connection until it closes, or until
/// `drain` resolves: then in-flight requests finish and the connection
/// closes (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close`). HTTP/1 or HTTP/2
/// is told from the first bytes (a peer sidecar's is HTTP/2).
pub async fn serve<I>(
    layer: Arc<HttpLayer>,
    conn: Arc<InboundConn>,
    io: I,
    drain: impl Future<Output = ()> + Send,
) -> Result<(), super::BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let outcome = serve_outcome(layer, conn, io, drain).await;
    match outcome.error {
        Some((_, detail)) => Err(detail.into()),
        None => Ok(()),
    }
}

/// As [`serve`], reporting bytes and failure as the data plane logs them.
pub(crate) async fn serve_outcome<I>(
    layer: Arc<HttpLayer>,
    conn: Arc<InboundConn>,
    io: I,
    drain: impl Future<Output = ()> + Send,
) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if conn.mesh {
        return serve_hyper(layer, conn, io, drain, true).await;
    }
    let mut io = io;
    // Detection reads the first request's first bytes: the header deadline
    // bounds it (the relay then counts from its own start).
    let deadline = layer.limits.header_timeout;
    let sniffed = tokio::time::timeout(deadline, detect::sniff(&mut io)).await;
    match sniffed {
        Ok(Ok((detected, prefix))) => {
            serve_detected(layer, conn, io, detected, prefix, drain).await
        }
        Ok(Err(e)) => Outcome::failed("io", e),
        Err(_) => {
            layer.metrics.refusal("inbound", "header_timeout");
            Outcome::failed("header_timeout", "no complete request start in time")
        }
    }
}

/// Serves a connection whose first bytes (`prefix`) detection has read:
/// HTTP/2 through hyper, anything else through the HTTP/1 relay (which
/// answers 400 to what is not HTTP).
pub(crate) async fn serve_detected<I>(
    layer: Arc<HttpLayer>,
    conn: Arc<InboundConn>,
    io: I,
    detected: Detected,
    prefix: bytes::Bytes,
    drain: impl Future<Output = ()> + Send,
) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if detected == Detected::Http2 {
        let io = Prefixed::new(prefix, io);
        // Boxed: hyper's connection state is larger than the HTTP/1
        // relay's, and every HTTP/1 connection's task would hold it.
        return Box::pin(serve_hyper(layer, conn, io, drain, false)).await;
    }
    let (idle, connect) = (layer.idle_timeout, layer.connect_timeout);
    let side = AppSide {
        served: Served::new(conn),
        layer,
        connect,
    };
    let mut io = io;
    // Polled at every request otherwise (`woken`). 56 bytes a relay: one
    // per tunnel a peer's outbound side keeps to this port, not one per
    // app connection (idle ones hand their tunnel back).
    let drain = super::woken::WokenOnly::new(drain);
    let done = h1::relay(&side, &mut io, prefix, &mut None, idle, drain).await;
    crate::net::close_gracefully(&mut io).await;
    Outcome {
        bytes_in: done.bytes_in,
        bytes_out: done.bytes_out,
        peer_id: None,
        error: done.error.map(|e| *e),
        refused: false,
    }
}

async fn serve_hyper<I>(
    layer: Arc<HttpLayer>,
    conn: Arc<InboundConn>,
    io: I,
    drain: impl Future<Output = ()> + Send,
    mesh: bool,
) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // What every request of the connection shares is made once, here.
    let served = Arc::new(Served::new(conn));
    let mut builder = super::server_builder(&layer.limits, mesh);
    let io = super::h2_header_deadline(&layer, "inbound", io);
    let svc = service_fn(move |req| {
        let (layer, served) = (layer.clone(), served.clone());
        async move { Ok::<_, Infallible>(hyper_request::handle(&layer, &served, req).await) }
    });
    if mesh {
        builder = builder.http2_only();
    }
    match serve_until(&builder, io, svc, drain).await {
        Ok(()) => Outcome::default(),
        Err(e) => super::served_failure(e),
    }
}

/// A served connection and what its requests share, made once: the
/// `x-forwarded-client-cert` value and the app's authority.
struct Served {
    conn: Arc<InboundConn>,
    /// The client's identity, as every request's log line names it.
    peer: Arc<str>,
    xfcc: Option<HeaderValue>,
    /// `None`: the app address is not a valid authority (each request 502).
    app: Option<Authority>,
}

impl Served {
    fn new(conn: Arc<InboundConn>) -> Served {
        Served {
            xfcc: xfcc_value(conn.own.as_deref(), conn.peer.as_str()),
            peer: Arc::from(conn.peer.as_str()),
            app: Authority::try_from(&*conn.app).ok(),
            conn,
        }
    }

    fn exchange(&self, layer: &HttpLayer) -> Exchange {
        Exchange::new("inbound", self.conn.port, &layer.log, &layer.metrics)
    }
}

/// How long an idle app connection waits for another client's request:
/// under the shortest keep-alive timeout common app servers use (Node.js
/// 5 s), so a parked connection is rarely one the app is closing.
pub(crate) const APP_POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(4);
/// The most idle connections kept per app address (nginx's `keepalive`
/// and Envoy's pools are of this order).
pub(crate) const APP_POOL_PER_APP: usize = 256;

/// Idle HTTP/1 connections to the app, per app address: a client
/// connection holds an app connection only while a request is in flight
/// and gives it back after each response, so idle client connections (and
/// tunnels) cost the app no connection and the sidecar no descriptor, and
/// a new client connection costs the app no accept, as behind nginx,
/// HAProxy or Envoy. One lock per request.
pub(crate) type AppConnPool = super::idle_pool::IdlePool<TcpStream>;

/// The fields whose caller-sent copies never reach the app, in any
/// spelling that reads as them (`policy::target::reads_as`): the ones the
/// inbound side sets itself, and the CGI path split. gunicorn takes a
/// caller's `SCRIPT_NAME` as the app's mount prefix and routes the rest of
/// the path (`/x/refunds/1` with `SCRIPT_NAME: /x` runs as `/refunds/1`, a
/// path the policy never read), and from 22 takes `PATH_INFO` as the path
/// from a trusted forwarder. A spliced head drops them, a collected one
/// has them removed in `admit`.
const DROPPED_HERE: [&str; 5] = [
    names::XFCC,
    names::STEPUP_SUB,
    names::ORIG_PROTO,
    "script-name",
    "path-info",
];

/// The inbound end of the HTTP/1 relay: requests decided here, relayed to
/// the app over pooled connections (see [`AppConnPool`]).
struct AppSide {
    layer: Arc<HttpLayer>,
    served: Served,
    connect: Duration,
}

impl h1::Side for AppSide {
    type Upstream = TcpStream;
    const REDIAL: bool = true;
    const DIRECTION: &'static str = "inbound";

    fn layer(&self) -> &HttpLayer {
        &self.layer
    }

    const DECIDES: bool = true;

    /// In full only where the port has routes: elsewhere no field is read
    /// to decide (the identity decided), and the head is spliced.
    fn detail(&self) -> Detail {
        if self.layer.policy.routes_requests(self.served.conn.port) {
            Detail::Full
        } else {
            Detail::Target(&DROPPED_HERE)
        }
    }

    fn exchange(&self) -> Exchange {
        self.served.exchange(&self.layer)
    }

    fn admit<'a>(
        &'a self,
        x: &'a mut Exchange,
        head: &'a mut h1::RequestHead,
        raw: &'a [u8],
    ) -> impl Future<Output = Verdict> + Send + 'a {
        let policy = self.layer.policy.current();
        if !head.fields && policy.routes_requests(self.served.conn.port) {
            // The policy gained routes on this port since the head was
            // read: its fields are collected now, to decide by them.
            match message::parse_request(raw, Detail::Full, self.layer.limits.head) {
                Ok(Some((full, _))) => *head = full,
                _ => {
                    return futures_util::future::Either::Left(std::future::ready(Verdict::Answer(
                        Local::error(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            "malformed request head\n",
                        ),
                    )))
                }
            }
        }
        let version = head.parts.version;
        futures_util::future::Either::Right(admit(
            &self.layer,
            policy,
            &self.served,
            x,
            &mut head.parts,
            version,
        ))
    }

    fn dial(&self) -> impl Future<Output = io::Result<TcpStream>> + Send {
        crate::net::dial(&self.served.conn.app, self.connect)
    }

    fn reuse(&self) -> Option<TcpStream> {
        self.layer
            .app_conns
            .take(&self.served.conn.app)
            .map(|(conn, ())| conn)
    }

    fn release(&self, up: TcpStream) -> Option<TcpStream> {
        self.layer
            .app_conns
            .put(self.served.conn.app.clone(), up, ());
        None
    }

    fn draining(&self) -> bool {
        self.layer.is_draining()
    }

    fn unavailable(&self) -> Local {
        app_unavailable()
    }
}

/// The answer when the app cannot be reached or fails (either engine).
fn app_unavailable() -> Local {
    Local::error(
        StatusCode::BAD_GATEWAY,
        "app_unavailable",
        "the app did not answer\n",
    )
}

/// The route and step-up decision for one request (the app spoke `orig`),
/// and its headers rewritten for the app: hop-by-hop and step-up headers
/// removed, `x-stepup-sub` and `x-forwarded-client-cert` set by us.
async fn admit(
    layer: &HttpLayer,
    policy: Arc<Policy>,
    served: &Served,
    x: &mut Exchange,
    parts: &mut request::Parts,
    orig: Version,
) -> Verdict {
    let conn = &*served.conn;
    if conn.closing.is_set() {
        return Verdict::Answer(Local::deny(
            StatusCode::FORBIDDEN,
            "connection_revoked",
            "forbidden: a policy or trust change denied this connection; it is closing\n",
        ));
    }
    if x.logging() {
        x.record.peer_id = Some(served.peer.clone());
        x.record.method = super::record::method_label(&parts.method);
        x.record.path = parts.uri.path().to_owned();
        x.record.version = super::record::version_label(orig);
    }
    let info = RequestInfo {
        peer: Peer {
            id: &conn.peer,
            x5t_s256: &conn.x5t,
        },
        port: conn.port,
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
    };
    let d = stepup::decide(&policy, &layer.stepup, info, stepup::gate::unix_now()).await;
    drop(policy);
    x.record.route.clone_from(&d.route);
    if x.logging() {
        x.record.rule = Some(d.rule.clone());
    }
    match &d.outcome {
        GateOutcome::BadRequest(refusal) => {
            layer.metrics.refusal("inbound", refusal.reason());
            return Verdict::Answer(Local::deny(
                StatusCode::BAD_REQUEST,
                refusal.reason(),
                refusal.message(),
            ));
        }
        GateOutcome::Forbidden => {
            return Verdict::Answer(Local::deny(
                StatusCode::FORBIDDEN,
                d.reason,
                "forbidden: this workload may not call this route\n",
            ));
        }
        GateOutcome::Challenge(challenge) => {
            let mut local = Local::deny(
                StatusCode::UNAUTHORIZED,
                d.reason,
                "step-up authentication required\n",
            );
            local.challenge = Some(challenge.clone());
            return Verdict::Answer(local);
        }
        GateOutcome::Allow => {}
    }
    if x.logging() {
        x.record.stepup_sub.clone_from(&d.subject);
    }
    let headers = &mut parts.headers;
    // Empty when an HTTP/1 head's fields were not collected (the relay
    // splices it): nothing to take out here.
    if !headers.is_empty() {
        strip_hop_by_hop(headers);
        if let Some(h) = &d.strip {
            headers.remove(h);
        }
        for name in DROPPED_HERE {
            headers.remove(name);
        }
        remove_other_spellings(headers, &DROPPED_HERE);
    }
    if let Some(sub) = d
        .subject
        .as_deref()
        .and_then(|s| HeaderValue::from_str(s).ok())
    {
        headers.insert(STEPUP_SUB, sub);
    }
    replace_xfcc(headers, served.xfcc.clone());
    Verdict::Forward {
        decision: if d.would_deny { "would_deny" } else { "allow" },
        reason: d.reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, PolicyWatch};
    use crate::stepup::{StepUp, StepUpMetrics};

    fn size_of_future<F: Future>(_: &F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every HTTP/1 connection's task holds this future for its whole life,
    /// idle or not: what a rare path awaits inline (a JWKS fetch, a dial)
    /// is paid per connection. 3.3 KiB in a debug build with the step-up
    /// key fetches boxed, 4.1 KiB with them inline; 2,312 bytes on
    /// 2026-12-05, when the largest state was hyper's HTTP/2 connection
    /// (a detected preface), awaited inline; 832 with that boxed.
    #[tokio::test]
    async fn an_http1_connection_task_stays_small() {
        let policy = Policy::allow_authenticated("mesh.test".parse().unwrap());
        let layer = Arc::new(HttpLayer::new(
            PolicyWatch::fixed(policy),
            Arc::new(StepUp::new(StepUpMetrics::default())),
            super::super::HttpMetrics::default(),
            super::super::RequestLog::disabled(),
        ));
        let conn = Arc::new(InboundConn {
            peer: Arc::new(SpiffeId::parse("spiffe://mesh.test/ns/a/sa/b").unwrap()),
            x5t: String::new(),
            own: None,
            port: 80,
            app: "127.0.0.1:1".into(),
            client: "127.0.0.1:2".parse().unwrap(),
            mesh: false,
            tunnels_only: false,
            tunnels: None,
            closing: Default::default(),
        });
        let (io, _peer) = tokio::io::duplex(64);
        let fut = serve_detected(
            layer,
            conn,
            io,
            Detected::Http1,
            bytes::Bytes::new(),
            std::future::pending(),
        );
        let size = size_of_future(&fut);
        eprintln!("inbound HTTP/1 connection future: {size} B");
        assert!(size <= 1536, "inbound HTTP/1 connection future: {size} B");
    }
}
