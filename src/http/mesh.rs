//! The pool of multiplexed HTTP/2 mTLS connections to peer sidecars: per
//! (expected identity, destination) one for HTTP requests (ALPN
//! `stepmesh/h2`, through hyper) and one for tunnels (`stepmesh/tunnel`,
//! on h2 directly; see [`Lane`]), each dialled once however many callers
//! race for it, replaced when it goes away; and the sending of one request
//! over it (`mesh/request.rs`),
//! retried once when the peer provably did not process it (RFC 9113 §8.7:
//! `REFUSED_STREAM`, or a stream above a `GOAWAY`'s last stream ID).
//! docs/HTTP.md, "Between sidecars", says why the windows are what they
//! are.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::outbound::{MeshError, OutboundConn};
use super::{h2_settings, MeshKind, MESH_ALPN, MESH_TUNNEL_ALPN, TUNNEL_ALPN};

mod conn_tunnels;
mod h2_client;
mod recheck;
mod request;
mod sweep;

use self::conn_tunnels::PeerProof;
pub(crate) use self::conn_tunnels::{Closing, ConnTunnels, PeerGone, TunnelCount};
use self::recheck::proof_of;

pub(crate) use self::request::{
    going_away, never_processed, not_processed, peer_going_away, send, MeshBody, Outgoing,
    SendError,
};

/// A pooled connection to a peer sidecar and whom it reached.
#[derive(Clone)]
pub(crate) struct Pooled {
    send: Sender,
    /// The peer's SPIFFE ID (from its certificate).
    pub(crate) peer: Option<Arc<str>>,
    /// What the peer accepts on it (by ALPN): HTTP requests, tunnels.
    pub(crate) kind: MeshKind,
    /// What its tunnels share: how many are open now (see
    /// [`TUNNEL_LIMIT`]), whom they reach.
    pub(crate) tunnels: Arc<ConnTunnels>,
    /// Tells this connection from its replacement.
    pub(crate) id: u64,
}

/// Tunnels one mesh connection (HTTP and tunnels) carries at most; past
/// it another connection to the destination is dialled for tunnels.
/// Below the peer's stream limit by [`STREAM_HEADROOM`], so that HTTP
/// requests on the same connection always find a stream, and so that a
/// long-lived tunnel never waits for a stream (h2 would queue it until
/// another stream ends). Also a tunnels-only connection's limit until the
/// peer's `SETTINGS` say its own: every stepmesh sidecar takes 256
/// streams on either.
pub(crate) const TUNNEL_LIMIT: usize = h2_settings::MAX_STREAMS as usize - STREAM_HEADROOM;

/// Streams kept below a peer's limit: for HTTP requests on a mesh
/// connection, and for streams h2 still counts while they close (their
/// tunnel is gone, the peer's end of the stream not yet in).
const STREAM_HEADROOM: usize = 16;

/// How long a destination that negotiated no mesh ALPN (a sidecar without
/// tunnels on a `tcp` port, or not a stepmesh sidecar) is not asked again:
/// each of its app connections would otherwise pay a wasted handshake.
const NO_MESH_FOR: Duration = Duration::from_secs(30);

/// Which of a destination's pooled connections: tunnels ride a connection
/// of their own, served on h2 directly at both ends, so that a tunnel's
/// bytes take no hop through hyper's bridge task; HTTP requests ride the
/// mesh connection (through hyper). A peer sidecar that takes no
/// tunnels-only connection on the port (one older than this split, on an
/// `http` or `auto` port) refuses that handshake; its tunnels then ride
/// the mesh connection, as they did before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lane {
    Mesh,
    Tunnels,
}

/// A slot's key: the pool key (expected identity and destination) and
/// the lane.
type SlotKey = (Arc<str>, Lane);

/// The TLS settings of a destination's two pooled connections: the same
/// identity, verifier and session cache, offering different ALPN ids.
#[derive(Clone)]
pub struct MeshConnectors {
    /// The mesh connection's: with tunnels and HTTP first (an `http` or
    /// `auto` port), then tunnels only (a `tcp` port), then HTTP only (a
    /// sidecar without tunnels).
    pub mesh: tokio_rustls::TlsConnector,
    /// The tunnels' own connection's: `stepmesh/tunnel` alone.
    pub tunnels: tokio_rustls::TlsConnector,
}

impl MeshConnectors {
    /// Both connectors from the sidecar's client `config` (its SVID and
    /// the expected identity's verifier); `tunnel: false` (`--no-tunnel`)
    /// offers HTTP only on the mesh connection.
    pub fn new(config: &rustls::ClientConfig, tunnel: bool) -> MeshConnectors {
        let with = |alpn: Vec<&[u8]>| {
            let mut config = config.clone();
            config.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        };
        let mesh = if tunnel {
            vec![MESH_TUNNEL_ALPN, TUNNEL_ALPN, MESH_ALPN]
        } else {
            vec![MESH_ALPN]
        };
        MeshConnectors {
            mesh: with(mesh),
            tunnels: with(vec![TUNNEL_ALPN]),
        }
    }
}

/// How streams are opened on a pooled connection.
#[derive(Clone)]
pub(crate) enum Sender {
    /// Through hyper: a connection that carries HTTP requests (and
    /// tunnels, if it negotiated them).
    Hyper(SendRequest<MeshBody>),
    /// On h2 directly: a tunnels-only connection (`h2_client`).
    Tunnels(h2::client::SendRequest<bytes::Bytes>),
}

impl Pooled {
    fn usable(&self) -> bool {
        !self.is_closed()
    }

    /// Whether the connection has ended (it takes no new stream).
    pub(crate) fn is_closed(&self) -> bool {
        match &self.send {
            Sender::Hyper(send) => send.is_closed(),
            // Set as the connection's task ends.
            Sender::Tunnels(_) => self.tunnels.closed.load(Ordering::Acquire),
        }
    }

    /// Tunnels this connection carries at most: [`TUNNEL_LIMIT`] on a mesh
    /// connection; on a tunnels-only one, once the peer's `SETTINGS` are
    /// in, its stream limit (ours: [`h2_settings::TUNNEL_STREAMS`]) less
    /// [`STREAM_HEADROOM`] (half of it, when it is below twice that: a
    /// peer that takes few streams still takes tunnels on each connection,
    /// not one connection per app connection). Until then h2 knows no
    /// limit (`usize::MAX`), and the peer may be an older sidecar, which
    /// takes 256.
    fn tunnel_limit(&self) -> usize {
        match &self.send {
            Sender::Hyper(_) => TUNNEL_LIMIT,
            Sender::Tunnels(send) => match send.current_max_send_streams() {
                usize::MAX => TUNNEL_LIMIT,
                peer => {
                    let peer = peer.min(h2_settings::TUNNEL_STREAMS as usize);
                    peer - STREAM_HEADROOM.min(peer / 2)
                }
            },
        }
    }

    /// The connection's HTTP/2 client (a clone: the handle is shared).
    pub(crate) fn sender(&self) -> Sender {
        self.send.clone()
    }
}

/// HTTP/2 connections to peer sidecars, one per (identity, destination)
/// and [`Lane`], with extra ones for tunnels past a connection's limit
/// ([`TUNNEL_LIMIT`], more on a tunnels-only connection).
pub(crate) struct MeshPool {
    slots: Mutex<HashMap<SlotKey, Arc<Slot>>>,
    /// Connections made (ids; tests and logs tell connections apart).
    made: AtomicU64,
    /// The sidecar's identity store and metrics, when it has them.
    pub(crate) sidecar: Option<MeshSidecar>,
    /// How the pooled connections check that their peer is there.
    pub(crate) keep_alive: KeepAlive,
    /// How long a destination's connection stays pooled unused (see
    /// [`MeshPool::sweep`]).
    pub(crate) idle: Duration,
}

/// How long an unused pooled connection stays (`--mesh-pool-idle`'s
/// default): long enough that a caller every few minutes keeps its
/// connection warm, short enough that the peers of a day of pod churn do
/// not all stay connected.
pub(crate) const POOL_IDLE: Duration = Duration::from_secs(300);

impl Default for MeshPool {
    fn default() -> Self {
        MeshPool {
            slots: Mutex::default(),
            made: AtomicU64::default(),
            sidecar: None,
            keep_alive: KeepAlive::default(),
            idle: POOL_IDLE,
        }
    }
}

/// A pooled connection with streams open pings its peer every `interval`
/// and is closed (its streams with it) when an answer takes longer than
/// `timeout`: a peer whose host vanished ends its app connections then,
/// not at the idle timeout (an hour). An idle connection is not pinged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeepAlive {
    /// Between pings (`--mesh-keepalive`).
    pub(crate) interval: Duration,
    /// How long a ping's answer is waited for.
    pub(crate) timeout: Duration,
}

impl KeepAlive {
    /// Every `interval`, each answer within a third of it (at most 10 s).
    pub(crate) fn every(interval: Duration) -> Self {
        KeepAlive {
            interval,
            timeout: (interval / 3).min(Duration::from_secs(10)),
        }
    }
}

impl Default for KeepAlive {
    /// Every 30 s, answers within 10 s (`--mesh-keepalive`'s default).
    fn default() -> Self {
        KeepAlive::every(Duration::from_secs(30))
    }
}

/// What a mesh dial checks and counts as the L4 path's dial does: a
/// resumed session re-checked against the store (`tls::check_resumed`),
/// handshakes and their failures in the proxy's metrics.
pub(crate) struct MeshSidecar {
    pub(crate) store: Arc<crate::identity::store::CertStore>,
    pub(crate) metrics: crate::metrics::ProxyMetrics,
}

/// One destination's connection of one [`Lane`], and the one dial in
/// progress.
#[derive(Default)]
struct Slot {
    ready: Mutex<Option<Pooled>>,
    /// Held while dialling, so racing callers wait for that one dial.
    dial: tokio::sync::Mutex<LastDial>,
    /// Dials finished (read before waiting for `dial`).
    dials: AtomicU64,
    /// Until when the destination is known to negotiate no mesh ALPN (or
    /// none for this lane), and which error says so meanwhile.
    no_mesh: Mutex<Option<(tokio::time::Instant, MeshError)>>,
    /// More connections to the destination, dialled for tunnels when the
    /// pooled one is full (HTTP requests keep to `ready`).
    more: Mutex<Vec<Pooled>>,
    /// Since when the sweep has found `ready` unused (see
    /// [`MeshPool::sweep`]).
    unused_since: Mutex<Option<tokio::time::Instant>>,
}

/// The outcome of the latest dial, for the callers that waited on it.
#[derive(Default)]
struct LastDial {
    failed: Option<(u64, MeshError)>,
}

impl Slot {
    fn ready(&self, avoid: Option<u64>) -> Option<Pooled> {
        let ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        let p = ready
            .as_ref()
            .filter(|p| p.usable() && Some(p.id) != avoid)?;
        p.tunnels.mark_used();
        Some(p.clone())
    }
}

impl Slot {
    /// One of the extra connections with room for a tunnel (counted on it);
    /// closed ones are forgotten on the way.
    fn more_with_room(&self) -> Option<Pooled> {
        let mut more = self.more.lock().unwrap_or_else(|p| p.into_inner());
        more.retain(Pooled::usable);
        more.iter().find(|p| p.take_tunnel()).cloned()
    }

    /// The error of a recent dial that found no ALPN of this lane, while
    /// it is remembered ([`NO_MESH_FOR`]).
    fn known_not_mesh(&self) -> Option<MeshError> {
        let no_mesh = self.no_mesh.lock().unwrap_or_else(|p| p.into_inner());
        no_mesh
            .as_ref()
            .filter(|(until, _)| tokio::time::Instant::now() < *until)
            .map(|(_, e)| e.clone())
    }
}

impl MeshPool {
    fn slot(&self, key: &Arc<str>, lane: Lane) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry((key.clone(), lane)).or_default().clone()
    }

    /// A live mesh connection to `conn.dst` (not the connection `avoid`),
    /// made if there is none. Callers that race here wait for one dial and
    /// share its connection, or its error.
    pub(crate) async fn get(
        &self,
        conn: &OutboundConn,
        avoid: Option<u64>,
    ) -> Result<Pooled, MeshError> {
        self.get_on(conn, Lane::Mesh, avoid).await
    }

    /// As [`MeshPool::get`], on `lane`.
    async fn get_on(
        &self,
        conn: &OutboundConn,
        lane: Lane,
        avoid: Option<u64>,
    ) -> Result<Pooled, MeshError> {
        let slot = self.slot(&conn.key, lane);
        if let Some(p) = slot.ready(avoid) {
            return Ok(p);
        }
        if let Some(e) = slot.known_not_mesh() {
            return Err(e);
        }
        let seen = slot.dials.load(Ordering::Acquire);
        let mut last = slot.dial.lock().await;
        if let Some(p) = slot.ready(avoid) {
            return Ok(p);
        }
        // A dial that ended while this caller waited failed: its error is
        // this caller's too (no dial storm against an unreachable peer).
        if let Some((n, e)) = &last.failed {
            if *n > seen {
                return Err(e.clone());
            }
        }
        // Boxed: the dial (TCP, TLS, h2 handshakes) is large and rare; inline
        // it sized every tunnel's opening, copied whole into its box per
        // new app connection.
        let dialled = Box::pin(self.dial(conn, lane)).await;
        let n = slot.dials.fetch_add(1, Ordering::AcqRel) + 1;
        match dialled {
            Ok(pooled) => {
                last.failed = None;
                // Set once: a connection is dialled as one slot's first.
                let _ = pooled.tunnels.first.set((Arc::downgrade(&slot), pooled.id));
                *slot.ready.lock().unwrap_or_else(|p| p.into_inner()) = Some(pooled.clone());
                Ok(pooled)
            }
            Err(e) => {
                if matches!(e, MeshError::NoMeshAlpn(_) | MeshError::NoTunnelsOnly(_)) {
                    let until = tokio::time::Instant::now() + NO_MESH_FOR;
                    *slot.no_mesh.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((until, e.clone()));
                }
                last.failed = Some((n, e.clone()));
                Err(e)
            }
        }
    }

    /// A live connection to `conn.dst` with room for one more tunnel, and
    /// the tunnel counted on it: the tunnels' own connection (see
    /// [`Lane`]), or the mesh connection when the peer takes no
    /// tunnels-only connection here or the mesh connection is one (a `tcp`
    /// port's). A connection without tunnels (the peer's ALPN) is returned
    /// with nothing counted: the caller checks its kind.
    pub(crate) async fn get_for_tunnel(
        &self,
        conn: &OutboundConn,
    ) -> Result<(Pooled, Option<TunnelCount>), MeshError> {
        // Read, not taken: the mesh connection is not used by the asking.
        let mesh_takes_them = self
            .slot(&conn.key, Lane::Mesh)
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|p| p.usable() && !p.kind.http);
        if !mesh_takes_them {
            match self.tunnel_on(conn, Lane::Tunnels).await {
                Err(MeshError::NoTunnelsOnly(_)) => {}
                got => return got,
            }
        }
        self.tunnel_on(conn, Lane::Mesh).await
    }

    /// As [`MeshPool::get_for_tunnel`], on `lane`: its pooled connection,
    /// else one of its extra connections, else a new extra one (one dial
    /// at a time per destination and lane).
    async fn tunnel_on(
        &self,
        conn: &OutboundConn,
        lane: Lane,
    ) -> Result<(Pooled, Option<TunnelCount>), MeshError> {
        let first = self.get_on(conn, lane, None).await?;
        if !first.kind.tunnels {
            return Ok((first, None));
        }
        if first.take_tunnel() {
            let count = first.counted(None);
            return Ok((first, Some(count)));
        }
        let slot = self.slot(&conn.key, lane);
        let extra = |p: Pooled| {
            let count = p.counted(Some(Arc::downgrade(&slot)));
            (p, Some(count))
        };
        if let Some(p) = slot.more_with_room() {
            return Ok(extra(p));
        }
        let _one_dial = slot.dial.lock().await;
        if let Some(p) = slot.more_with_room() {
            return Ok(extra(p));
        }
        let pooled = Box::pin(self.dial(conn, lane)).await?;
        if !pooled.kind.tunnels || !pooled.take_tunnel() {
            return Ok((pooled, None));
        }
        slot.more
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pooled.clone());
        Ok(extra(pooled))
    }

    /// Watches the destination's first connection that carries tunnels:
    /// the tunnels' own, else the mesh connection (others only carry
    /// tunnels past its limit, and close when idle). It is gone once the
    /// pool retires it (the peer's GOAWAY) or it ends. `None` when there
    /// is none.
    pub(crate) fn first_ended(&self, key: &Arc<str>) -> Option<PeerGone> {
        [Lane::Tunnels, Lane::Mesh].into_iter().find_map(|lane| {
            let slot = self.slot(key, lane);
            let ready = slot.ready.lock().unwrap_or_else(|p| p.into_inner());
            ready.as_ref().map(|p| PeerGone::following(&p.tunnels))
        })
    }

    /// Forgets connection `id` (it is going away), so the next caller
    /// dials a new one: one of the destination's first connections or one
    /// of its extra ones (its open tunnels go on).
    pub(crate) fn retire(&self, key: &Arc<str>, id: u64) {
        for lane in [Lane::Mesh, Lane::Tunnels] {
            let slot = self.slot(key, lane);
            let mut ready = slot.ready.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = ready.take_if(|p| p.id == id) {
                p.tunnels.retire();
            }
            drop(ready);
            let mut more = slot.more.lock().unwrap_or_else(|p| p.into_inner());
            more.retain(|p| p.id != id);
        }
    }

    fn handshake_failed(&self, reason: &'static str) {
        if let Some(sidecar) = &self.sidecar {
            sidecar
                .metrics
                .handshake_failure(crate::metrics::Direction::Outbound, reason);
        }
    }

    async fn dial(&self, conn: &OutboundConn, lane: Lane) -> Result<Pooled, MeshError> {
        let dst = conn.dst.clone();
        let connector = match lane {
            Lane::Mesh => &conn.connector.mesh,
            Lane::Tunnels => &conn.connector.tunnels,
        };
        let tcp = tokio::time::timeout(conn.connect_timeout, TcpStream::connect(&*dst))
            .await
            .map_err(|_| MeshError::Connect(dst.clone(), "timed out".into()))?
            .map_err(|e| MeshError::Connect(dst.clone(), e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let handshake = tokio::time::timeout(
            conn.handshake_timeout,
            connector.connect(conn.server_name.clone(), tcp),
        )
        .await;
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            // A peer that takes no tunnels-only connection here (see
            // `Lane`): not a failure, the mesh connection is asked next.
            Ok(Err(e)) if lane == Lane::Tunnels && crate::tls::failure::no_common_alpn(&e) => {
                tracing::debug!(%dst, "peer takes no tunnels-only connection here: tunnels ride the mesh connection");
                return Err(MeshError::NoTunnelsOnly(dst));
            }
            Ok(Err(e)) => {
                self.handshake_failed(crate::tls::failure::reason(&e));
                return Err(MeshError::Tls(dst, e.to_string()));
            }
            Err(_) => {
                self.handshake_failed("timeout");
                return Err(MeshError::Tls(dst, "handshake timed out".into()));
            }
        };
        let session = tls.get_ref().1;
        if let Some(sidecar) = &self.sidecar {
            let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            sidecar
                .metrics
                .handshake(crate::metrics::Direction::Outbound, resumed);
            if let Err(reason) = crate::tls::check_resumed(session, &sidecar.store) {
                self.handshake_failed(reason);
                return Err(MeshError::Tls(
                    dst,
                    "resumed session no longer valid".into(),
                ));
            }
        }
        let Some(kind) = MeshKind::of(session.alpn_protocol()) else {
            return Err(MeshError::NoMeshAlpn(dst));
        };
        let peer = session
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| crate::tls::spiffe_id_of(leaf))
            .map(|id| Arc::from(id.as_str()));
        let proof = self.sidecar.as_ref().map(|s| proof_of(session, &s.store));
        let tunnels = ConnTunnels::new(peer.clone(), proof.unwrap_or_default());
        // The connection's task holds `ending`: it ends with the connection.
        let ending = Closing(tunnels.clone());
        let send = if kind.http {
            Self::hyper_handshake(tls, &dst, self.keep_alive, ending).await?
        } else {
            let send =
                h2_client::handshake(tls, &dst, tunnels.clone(), self.keep_alive, ending).await?;
            Sender::Tunnels(send)
        };
        let id = self.made.fetch_add(1, Ordering::Relaxed);
        Ok(Pooled {
            send,
            peer,
            kind,
            tunnels,
            id,
        })
    }

    /// HTTP/2 through hyper on a connection that carries HTTP requests,
    /// and the task that drives it, which drops `ending` once the
    /// connection has ended.
    async fn hyper_handshake(
        tls: tokio_rustls::client::TlsStream<TcpStream>,
        dst: &Arc<str>,
        keep_alive: KeepAlive,
        ending: Closing,
    ) -> Result<Sender, MeshError> {
        // Fixed, large windows, no adaptive window: see h2_settings.
        let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(h2_settings::STREAM_WINDOW)
            .initial_connection_window_size(h2_settings::CONNECTION_WINDOW)
            .max_concurrent_reset_streams(h2_settings::MESH_RESETS)
            .keep_alive_interval(keep_alive.interval)
            .keep_alive_timeout(keep_alive.timeout)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| MeshError::H2(dst.clone(), e.to_string()))?;
        let tunnels = ending.0.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "mesh HTTP/2 connection ended");
            }
            drop(ending);
        });
        tunnels.driven_by(&task);
        Ok(Sender::Hyper(send))
    }
}
