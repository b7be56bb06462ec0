//! The HTTP layer of the sidecar: HTTP/1.1 and HTTP/2 (gRPC included)
//! proxying with per-request route and step-up decisions on the inbound
//! side, and pooled HTTP/2 mTLS connections between sidecars on the outbound
//! side. Bodies and trailers stream through; nothing is buffered whole.

pub mod detect;
pub(crate) mod h1;
pub(crate) mod h2_deadline;
pub(crate) mod h2_frames;
mod h2_settings;
pub mod h2_stream;
pub mod headers;
pub(crate) mod holding;
mod idle_pool;
pub use h1::message::HeadLimits;
pub mod inbound;
mod mesh;
mod metrics;
pub mod outbound;
mod record;
pub mod tunnel;
pub(crate) mod tunnels_only;
mod woken;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

pub use mesh::MeshConnectors;
pub use metrics::HttpMetrics;
pub use record::{RequestLog, RequestRecord};

use crate::policy::{PolicyWatch, SpiffeId};
use crate::stepup::StepUp;

/// The ALPN id of sidecar-to-sidecar HTTP/2 (never offered by apps): HTTP
/// requests only, what sidecars without tunnels speak.
pub const MESH_ALPN: &[u8] = b"stepmesh/h2";

/// The ALPN id of sidecar-to-sidecar HTTP/2 that carries HTTP requests and
/// CONNECT tunnels (opaque TCP): what `http` and `auto` ports negotiate
/// with a peer that offers it.
pub const MESH_TUNNEL_ALPN: &[u8] = b"stepmesh/h2+tunnel";

/// The ALPN id of sidecar-to-sidecar HTTP/2 that carries CONNECT tunnels
/// only: what a `tcp` port negotiates, so that no HTTP request is ever
/// served on it.
pub const TUNNEL_ALPN: &[u8] = b"stepmesh/tunnel";

/// What a sidecar-to-sidecar connection carries, told by its ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshKind {
    /// HTTP requests (the app's HTTP/1 or HTTP/2, `stepmesh-orig-proto`).
    pub http: bool,
    /// CONNECT tunnels: one stream per opaque app connection.
    pub tunnels: bool,
}

impl MeshKind {
    /// The kind of a connection that negotiated `alpn`; `None` when it is
    /// not a sidecar-to-sidecar connection.
    pub fn of(alpn: Option<&[u8]>) -> Option<MeshKind> {
        let (http, tunnels) = match alpn? {
            a if a == MESH_ALPN => (true, false),
            a if a == MESH_TUNNEL_ALPN => (true, true),
            a if a == TUNNEL_ALPN => (false, true),
            _ => return None,
        };
        Some(MeshKind { http, tunnels })
    }
}

/// Errors of a served or proxied connection.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response bodies: the upstream's, streamed, or one we make (401, 502, ...).
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// What every HTTP connection handler shares.
pub struct HttpLayer {
    /// The live policy.
    pub policy: PolicyWatch,
    /// Step-up providers (JWKS caches, token caches).
    pub stepup: Arc<StepUp>,
    /// Request metrics.
    pub metrics: HttpMetrics,
    /// Per-request access-log sink.
    pub log: RequestLog,
    app: inbound::AppClients,
    mesh: mesh::MeshPool,
    /// Idle HTTP/1 connections to peer sidecars.
    pub(crate) peers: outbound::PeerPool,
    /// Idle tunnels to peer sidecars that relay HTTP/1, shared by every
    /// app connection to the same destination between its requests.
    pub(crate) tunnels: tunnel::TunnelPool,
    /// Idle HTTP/1 connections to the apps, shared by every client
    /// connection between its requests.
    app_conns: inbound::AppConnPool,
    drain: Arc<DrainSignal>,
    /// HTTP/1 connections idle this long are closed.
    idle_timeout: std::time::Duration,
    /// Deadline for dialling the app.
    connect_timeout: std::time::Duration,
    /// What one client may hold of the proxy.
    pub(crate) limits: HttpLimits,
    /// The process's `--max-connections`: an HTTP/2 stream relayed to an
    /// HTTP/1 app takes an app connection of its own while it lasts.
    /// (Unlimited until [`HttpLayer::with_connection_limits`].)
    pub(crate) connections: Arc<crate::net::caps::ConnectionBudget>,
    /// `--max-connections-per-peer`: such a stream counts against its
    /// peer's cap too, so one peer takes no more of the process limit than
    /// its cap (when the cap is below the limit: a low descriptor limit can
    /// lower `--max-connections` under it).
    pub(crate) peer_cap: Arc<crate::net::caps::PerKeyCap<Arc<SpiffeId>>>,
}

/// What one HTTP/1 client may hold of the proxy, so that slow or greedy
/// clients cannot pin connections (slowloris) or memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// A request head must be complete this long after its first byte
    /// (`--header-timeout`): else 408 and the connection closes. HTTP/2:
    /// the preface and first frame, a header block, any frame (see
    /// [`h2_deadline`]), else the connection closes.
    pub header_timeout: std::time::Duration,
    /// A request body may pause this long between bytes
    /// (`--body-idle-timeout`): else 408 and the connection closes.
    pub body_idle_timeout: std::time::Duration,
    /// Request head size and field count (431 over either).
    pub head: HeadLimits,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: std::time::Duration::from_secs(10),
            body_idle_timeout: std::time::Duration::from_secs(60),
            head: HeadLimits::default(),
        }
    }
}

impl std::fmt::Debug for HttpLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpLayer").finish_non_exhaustive()
    }
}

impl HttpLayer {
    /// Builds the layer; connection pools start empty.
    pub fn new(
        policy: PolicyWatch,
        stepup: Arc<StepUp>,
        metrics: HttpMetrics,
        log: RequestLog,
    ) -> HttpLayer {
        HttpLayer {
            policy,
            stepup,
            metrics,
            log,
            app: inbound::AppClients::new(),
            mesh: mesh::MeshPool::default(),
            peers: outbound::PeerPool::new(outbound::POOL_IDLE, outbound::POOL_PER_DESTINATION),
            tunnels: tunnel::TunnelPool::new(tunnel::POOL_IDLE, tunnel::POOL_PER_DESTINATION),
            app_conns: inbound::AppConnPool::new(inbound::APP_POOL_IDLE, inbound::APP_POOL_PER_APP),
            drain: Arc::default(),
            idle_timeout: std::time::Duration::from_secs(3600),
            connect_timeout: inbound::APP_CONNECT_TIMEOUT,
            limits: HttpLimits::default(),
            connections: crate::net::caps::ConnectionBudget::new(usize::MAX),
            peer_cap: crate::net::caps::PerKeyCap::new(0),
        }
    }

    /// The per-client limits instead of [`HttpLimits::default`].
    pub fn with_limits(mut self, limits: HttpLimits) -> HttpLayer {
        self.limits = limits;
        self
    }

    /// The proxy's idle and connect timeouts (`--idle-timeout`,
    /// `--connect-timeout`) instead of the defaults (1 h, 10 s).
    pub fn with_timeouts(
        mut self,
        idle: std::time::Duration,
        connect: std::time::Duration,
    ) -> HttpLayer {
        self.idle_timeout = idle;
        self.connect_timeout = connect;
        self
    }

    /// Checks and counts the handshakes of the pooled mesh connections as
    /// the sidecar's own dials (`store` re-checks resumed sessions,
    /// `metrics` counts handshakes and failures).
    pub fn with_mesh_sidecar(
        mut self,
        store: Arc<crate::identity::store::CertStore>,
        metrics: crate::metrics::ProxyMetrics,
    ) -> HttpLayer {
        self.mesh.sidecar = Some(mesh::MeshSidecar { store, metrics });
        self
    }

    /// How often pooled mesh connections with streams open ping their peer
    /// (`--mesh-keepalive`; answers are waited for a third of it, at most
    /// 10 s) instead of every 30 s.
    pub fn with_mesh_keepalive(mut self, interval: std::time::Duration) -> HttpLayer {
        self.mesh.keep_alive = mesh::KeepAlive::every(interval);
        self
    }

    /// Counts each app connection an HTTP/2 stream takes against the
    /// process's connection limit and its peer's cap (else 256 streams per
    /// connection, each with its app connection, were outside
    /// `--max-connections`, and one peer's could take all of it).
    pub fn with_connection_limits(
        mut self,
        budget: Arc<crate::net::caps::ConnectionBudget>,
        peer_cap: Arc<crate::net::caps::PerKeyCap<Arc<SpiffeId>>>,
    ) -> HttpLayer {
        self.connections = budget;
        self.peer_cap = peer_cap;
        self
    }

    /// How long a pooled mesh connection stays unused before it is closed
    /// (`--mesh-pool-idle`) instead of 5 minutes.
    pub fn with_mesh_pool_idle(mut self, idle: std::time::Duration) -> HttpLayer {
        self.mesh.idle = idle;
        self
    }

    /// Closes idle pooled HTTP/1 connections (to apps, tunnels and
    /// connections to peers) once they have waited their pool's idle time,
    /// and lets go of unused pooled mesh connections and forgotten
    /// destinations (`MeshPool::sweep`), for as long as the layer lives:
    /// the sidecar spawns it.
    pub async fn sweep_idle(layer: std::sync::Weak<HttpLayer>) {
        let period = match layer.upgrade() {
            Some(l) => l
                .app_conns
                .max_idle()
                .min(l.peers.max_idle())
                .min(l.tunnels.max_idle())
                // A short mesh idle time is met within about itself (a
                // zero period would not tick).
                .min(l.mesh.idle.max(std::time::Duration::from_secs(1))),
            None => return,
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(layer) = layer.upgrade() else { return };
            layer.app_conns.sweep();
            layer.peers.sweep();
            layer.tunnels.sweep();
            layer.mesh.sweep();
        }
    }

    /// Ends the pooled mesh connections whose peer the identity store now
    /// refuses (see `MeshPool::recheck`).
    pub fn recheck_mesh_peers(&self) {
        self.mesh.recheck();
    }

    /// Starts a graceful drain of every HTTP connection: in-flight requests
    /// finish, then connections close (the process is shutting down).
    pub fn start_drain(&self) {
        self.drain.begin();
    }

    /// Whether the drain has begun (one load, for per-request checks).
    pub(crate) fn is_draining(&self) -> bool {
        self.drain.begun.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resolves once [`HttpLayer::start_drain`] has been called. Every
    /// idle HTTP/1 connection holds one, boxed: 80 bytes (a `watch`
    /// receiver's wait took 144, a 160-byte allocation).
    pub fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        DrainSignal::wait(self.drain.clone())
    }
}

/// The drain's beginning, as a flag (read per request) and a wake-up for
/// the connections waiting on it.
#[derive(Default)]
struct DrainSignal {
    begun: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl DrainSignal {
    fn begin(&self) {
        self.begun.store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Resolves once [`DrainSignal::begin`] has been called. A plain `fn`:
    /// an `async fn` would store its argument twice (rust-lang/rust#62958).
    #[allow(clippy::manual_async_fn)] // Deliberate: see above.
    fn wait(signal: Arc<DrainSignal>) -> impl std::future::Future<Output = ()> + Send + 'static {
        async move {
            // Made before the flag is read: `notify_waiters` wakes every
            // `Notified` made before it, polled or not.
            let notified = signal.notify.notified();
            if !signal.begun.load(std::sync::atomic::Ordering::Acquire) {
                notified.await;
            }
        }
    }
}

/// The HTTP server settings both directions use: HTTP/2 windows (see
/// [`h2_settings`]; a peer sidecar's `mesh` connection carries many apps'
/// streams) and the head size limit as HTTP/2's header list limit.
pub(crate) fn server_builder(
    limits: &HttpLimits,
    mesh: bool,
) -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // h2's default for an app's connection; a peer sidecar's carries many.
    let resets = if mesh { h2_settings::MESH_RESETS } else { 20 };
    builder
        .http2()
        .initial_stream_window_size(h2_settings::STREAM_WINDOW)
        .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
        .max_concurrent_streams(h2_settings::MAX_STREAMS)
        .max_pending_accept_reset_streams(resets)
        .max_header_list_size(u32::try_from(limits.head.bytes).unwrap_or(u32::MAX))
        .timer(hyper_util::rt::TokioTimer::new());
    builder
}

/// A served HTTP/2 connection's IO under the header deadline
/// (`--header-timeout`, see [`h2_deadline`]), counted in `direction`.
pub(crate) fn h2_header_deadline<I>(
    layer: &HttpLayer,
    direction: &'static str,
    io: I,
) -> h2_deadline::HeaderDeadline<I> {
    let refusals = layer.metrics.h2_header_timeouts(direction);
    h2_deadline::HeaderDeadline::new(io, layer.limits.header_timeout, refusals, direction)
}

/// How a served connection that failed with `e` ended, as the access log
/// and `stepmesh_connection_errors_total` say it: `h2_header_timeout` when
/// the HTTP/2 header deadline closed it, else `http`.
pub(crate) fn served_failure(e: BoxError) -> crate::net::Outcome {
    if h2_deadline::closed(&*e) {
        return crate::net::Outcome::failed(h2_deadline::REASON, h2_deadline::BREACH);
    }
    crate::net::Outcome::failed("http", e)
}

/// Runs one server connection; when `drain` resolves, shuts it down
/// gracefully (in-flight requests finish, no new ones are taken).
pub(crate) async fn serve_until<I, S>(
    builder: &hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    io: I,
    svc: S,
    drain: impl std::future::Future<Output = ()> + Send,
) -> Result<(), BoxError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<ProxyBody>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    tokio::pin!(drain);
    // A connection that starts once the drain has begun is closed unserved.
    // Served, HTTP/2's graceful shutdown would first send GOAWAY with the
    // largest stream ID (RFC 9113 §6.8: streams in flight may still be
    // processed), so the requests that came with the client's preface
    // would be answered: a client that reconnects after each GOAWAY kept
    // being served through a drain, for as long as it raced the GOAWAY.
    if futures_util::FutureExt::now_or_never(drain.as_mut()).is_some() {
        return Ok(());
    }
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        done = conn.as_mut() => return done,
        () = drain.as_mut() => conn.as_mut().graceful_shutdown(),
    }
    conn.await
}

/// What the proxy does with a request once decided.
pub(crate) enum Verdict {
    /// Relay it upstream (labels for the request metric and log line).
    Forward {
        /// `allow` or `would_deny`.
        decision: &'static str,
        /// The reason label.
        reason: &'static str,
    },
    /// Answer it here.
    Answer(Local),
}

/// A response the proxy makes itself: a denial, a challenge, an error.
pub(crate) struct Local {
    pub status: http::StatusCode,
    pub decision: &'static str,
    pub reason: &'static str,
    pub text: &'static str,
    /// `WWW-Authenticate` of a step-up challenge.
    pub challenge: Option<http::HeaderValue>,
}

impl Local {
    /// An answer for a request the policy refused or challenged.
    pub(crate) fn deny(
        status: http::StatusCode,
        reason: &'static str,
        text: &'static str,
    ) -> Local {
        Local {
            status,
            decision: "deny",
            reason,
            text,
            challenge: None,
        }
    }

    /// An answer for a request that could not be relayed.
    pub(crate) fn error(
        status: http::StatusCode,
        reason: &'static str,
        text: &'static str,
    ) -> Local {
        Local {
            decision: "error",
            ..Local::deny(status, reason, text)
        }
    }

    /// As a hyper response, counted and logged through `x`.
    pub(crate) fn respond(self, x: record::Exchange) -> http::Response<ProxyBody> {
        let body = Full::new(Bytes::from_static(self.text.as_bytes()))
            .map_err(|n| match n {})
            .boxed();
        let body = x.respond(self.status, self.decision, self.reason, body);
        let mut resp = http::Response::new(body);
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(TEXT_PLAIN),
        );
        if let Some(challenge) = self.challenge {
            resp.headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, challenge);
        }
        resp
    }

    /// As HTTP/1.1 bytes, head and body.
    pub(crate) fn write_h1(&self, close: bool, out: &mut Vec<u8>) {
        use http::header;
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = self.status;
        let headers = &mut parts.headers;
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static(TEXT_PLAIN),
        );
        headers.insert(
            header::CONTENT_LENGTH,
            http::HeaderValue::from(self.text.len()),
        );
        if let Some(challenge) = &self.challenge {
            headers.insert(header::WWW_AUTHENTICATE, challenge.clone());
        }
        if close {
            headers.insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        h1::message::write_response(&parts, out);
        out.extend_from_slice(self.text.as_bytes());
    }
}

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::FutureExt as _;

    use super::DrainSignal;

    /// A wait made before the drain begins resolves once it does; one made
    /// after resolves at once; and each is small (every idle HTTP/1
    /// connection holds one, boxed).
    #[test]
    fn the_drains_wait_is_woken_and_small() {
        let signal = Arc::new(DrainSignal::default());
        let mut before = Box::pin(DrainSignal::wait(signal.clone()));
        assert!(before.as_mut().now_or_never().is_none(), "not begun yet");
        signal.begin();
        assert!(before.now_or_never().is_some(), "woken by the drain");
        let after = DrainSignal::wait(signal.clone());
        let size = std::mem::size_of_val(&after);
        assert!(after.now_or_never().is_some(), "begun before the wait");
        eprintln!("drain wait: {size} B");
        assert!(size <= 80, "drain wait: {size} B");
    }
}
