//! A client connection to the gateway, from accept to close: its places
//! under the connection limits, the TLS handshake, HTTP/1 or HTTP/2, and
//! when it is closed for want of requests.
//!
//! Anyone who can reach the port may open a connection before any token is
//! checked, so each is bounded: a place under `--max-connections` and under
//! its source address's `--max-connections-per-source`, taken at accept; a
//! handshake within 10 s; a first request within 10 s of it (else hyper's
//! protocol detection waited for bytes with no timer, and an HTTP/2
//! connection with no stream was never closed); and no request in flight
//! for `--idle-timeout` closes it, as the API server's own idle timeout
//! would (Go's `IdleTimeout`, 90 s in kube-apiserver).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Either;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::server::Gateway;
use crate::drain::DrainWatch;
use crate::http::h2_deadline::HeaderDeadline;
use crate::http::holding::Holding;
use crate::net::caps::{ConnectionBudget, LimitReached, PerKeyCap, Places};
use crate::net::linger::Lingering;

/// Deadline for a client's TLS handshake, its first request and each
/// request's headers.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every accepted connection is held to.
pub(super) struct Limits {
    /// `--max-connections`.
    pub budget: Arc<ConnectionBudget>,
    /// `--max-connections-per-source`.
    pub per_source: Arc<PerKeyCap<IpAddr>>,
    /// `--idle-timeout`.
    pub idle: Duration,
    /// Connections closed at accept, by `reason`.
    pub refused: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Limits {
    /// The limits, and `stepmesh_gateway_connections_refused_total{reason}`
    /// registered.
    pub fn new(
        max_connections: usize,
        per_source: usize,
        idle: Duration,
        registry: &mut Registry,
    ) -> Self {
        let refused = Family::default();
        registry.register(
            "stepmesh_gateway_connections_refused",
            "Client connections closed at accept: connection_limit (--max-connections) or source_limit (--max-connections-per-source)",
            refused.clone(),
        );
        Limits {
            budget: ConnectionBudget::new(max_connections),
            per_source: PerKeyCap::new(per_source),
            idle,
            refused,
        }
    }

    /// The connection's places, or `None` (counted, and logged at most
    /// once a second per source) when a limit is reached.
    fn admit(&self, peer: SocketAddr) -> Option<Places<IpAddr>> {
        let refused = match Places::take(&self.per_source, &self.budget, &source(peer.ip())) {
            Ok(places) => return Some(places),
            Err(LimitReached::Key(reached)) => {
                if reached.log {
                    tracing::warn!(%peer, limit = reached.limit, "a source address is at its connection cap; closing its new connection (--max-connections-per-source)");
                }
                "source_limit"
            }
            Err(LimitReached::Process) => {
                tracing::debug!(%peer, "connection limit reached; closing a new connection (--max-connections)");
                "connection_limit"
            }
        };
        self.refused.get_or_create(&[("reason", refused)]).inc();
        None
    }
}

/// The source a connection counts under: its IPv4 address (an IPv4-mapped
/// IPv6 one read as such), or its IPv6 address's /64, the least a host is
/// given (one cap per address let a host with a /64 open 2^64 times the
/// cap: found by review).
fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from_bits(
            v6.to_bits() & !u128::from(u64::MAX),
        )),
        v4 => v4,
    }
}

/// A connection's places under the limits, shared with the sessions its
/// upgrades start (`kubectl exec`): an upgraded stream outlives the
/// connection's HTTP serving, and holds its descriptors until it ends.
pub(super) type ConnectionPlaces = Arc<Places<IpAddr>>;

/// Accepts connections until the drain starts, each served in a task of
/// its own.
pub(super) async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    gateway: Arc<Gateway>,
    limits: Arc<Limits>,
    mut watch: DrainWatch,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = watch.signaled() => return,
            accepted = crate::net::accept(&listener, Duration::from_millis(50)) => accepted,
        };
        let Some(places) = limits.admit(peer) else {
            continue;
        };
        let places = Arc::new(places);
        let _ = tcp.set_nodelay(true);
        let (acceptor, gateway, conn_watch) = (acceptor.clone(), gateway.clone(), watch.clone());
        let idle = limits.idle;
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => return tracing::debug!(%peer, %err, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            serve_connection(tls, peer.ip(), places, gateway, idle, conn_watch).await;
        });
    }
}

async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    client: IpAddr,
    places: ConnectionPlaces,
    gateway: Arc<Gateway>,
    idle: Duration,
    mut watch: DrainWatch,
) {
    let timeouts = gateway.metrics.h2_header_timeouts();
    let activity = Activity::new();
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |mut req: http::Request<_>| {
        let gateway = gateway.clone();
        let busy = requests.begin();
        req.extensions_mut().insert(places.clone());
        async move {
            let response = gateway.handle(req, client).await;
            // A forwarded answer is in flight until it has gone out whole
            // (a watch, a pod's log followed). Our own (a refusal, the
            // challenge) is not: a client that never takes it (an HTTP/2
            // window of 0) held its connection past every deadline, with
            // no token (found by review).
            let busy = matches!(response.body(), Either::Right(_)).then_some(busy);
            Ok::<_, std::convert::Infallible>(response.map(|body| Holding::new(body, busy)))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    // hyper's HTTP/2 server has no header deadline: the sidecar's, below it.
    // Lingering: a drain ends connections on our side (`net::linger`).
    let tls = HeaderDeadline::new(Lingering::new(tls), HANDSHAKE_TIMEOUT, timeouts, "gateway");
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let idled = activity.idled(HANDSHAKE_TIMEOUT.min(idle), idle);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = watch.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = idled => {
            tracing::debug!("closing an idle client connection");
            conn.as_mut().graceful_shutdown();
            // A client that does not read our GOAWAY does not keep it.
            tokio::time::timeout(HANDSHAKE_TIMEOUT, conn)
                .await
                .unwrap_or(Ok(()))
        }
    };
    if let Err(err) = result {
        tracing::debug!(%err, "gateway connection ended with an error");
    }
}

/// A connection's requests in flight, and when the last one ended: what
/// tells an idle connection.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `start` to the end of the last request; `u64::MAX`
    /// before the first.
    last_end_ms: AtomicU64,
    /// Told when the last request in flight ends.
    quiet: Notify,
}

/// One request in flight; its end is recorded on drop.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(u64::MAX),
            quiet: Notify::new(),
        })
    }

    /// A request begins.
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// When the connection goes idle, if nothing is in flight now: `first`
    /// after the start while no request came, `idle` after the last one.
    fn idle_at(&self, first: Duration, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(match self.last_end_ms.load(Ordering::Acquire) {
            u64::MAX => self.start + first,
            ms => self.start + Duration::from_millis(ms) + idle,
        })
    }

    /// Ready once the connection has been idle that long (checked at
    /// each deadline, and when the last request in flight ends: no timer
    /// is reset per request).
    async fn idled(&self, first: Duration, idle: Duration) {
        loop {
            let now = Instant::now();
            match self.idle_at(first, idle) {
                Some(at) if at <= now => return,
                Some(at) => tokio::time::sleep_until(at).await,
                // A permit left by an earlier end only costs one more look.
                None => self.quiet.notified().await,
            }
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.0.last_end_ms.store(ms, Ordering::Release);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.quiet.notify_one();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            source(ip("2001:db8:1:2::7"))
        );
        assert_ne!(source(ip("2001:db8:1:3::1")), source(ip("2001:db8:1:2::1")));
    }

    #[tokio::test]
    async fn a_connection_idles_after_its_first_wait_then_after_its_last_request() {
        let (first, idle) = (Duration::from_millis(50), Duration::from_millis(100));
        let activity = Activity::new();
        let start = Instant::now();
        activity.idled(first, idle).await;
        let waited = start.elapsed();
        assert!(
            waited >= first && waited < first * 20,
            "no request: {waited:?}"
        );

        let activity = Activity::new();
        let busy = activity.begin();
        let held = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(busy);
        });
        let start = Instant::now();
        activity.idled(first, idle).await;
        held.await.unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_secs(2),
            "a request in flight for 300 ms, then 100 ms idle: {waited:?}"
        );
    }
}
