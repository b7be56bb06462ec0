//! What one pooled mesh connection's tunnels share: how many are open,
//! whom they reach, whether the connection was retired or has ended, and
//! the wake-up of the app connections that follow it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use super::Slot;

/// Watches one mesh connection's end (see [`MeshPool::first_ended`]),
/// and while it does the pool keeps the connection however long it idles
/// (see `MeshPool::sweep`): the app connection that follows it learns of
/// the peer's end, not of the pool's housekeeping.
pub(crate) struct PeerGone(Arc<ConnTunnels>);

impl PeerGone {
    /// Follows the connection of `tunnels`.
    pub(super) fn following(tunnels: &Arc<ConnTunnels>) -> PeerGone {
        tunnels.followers.fetch_add(1, Ordering::AcqRel);
        PeerGone(tunnels.clone())
    }

    /// Whether the connection has ended or takes no new stream (the pool
    /// retired it: the peer said GOAWAY).
    pub(crate) fn is_gone(&self) -> bool {
        self.0.retired.load(Ordering::Acquire) || self.0.closed.load(Ordering::Acquire)
    }

    /// Resolves once [`PeerGone::is_gone`]. Every idle HTTP/1 app
    /// connection holds this wait: on a `Notify`, 80 bytes (a `watch`
    /// receiver's took 152).
    pub(crate) async fn wait(&self) {
        // Made before the flags are read: `notify_waiters` wakes every
        // `Notified` made before it, polled or not.
        let notified = self.0.gone.notified();
        if !self.is_gone() {
            notified.await;
        }
    }
}

impl Drop for PeerGone {
    fn drop(&mut self) {
        self.0.followers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the tunnels of one pooled connection share, so that each tunnel
/// holds one pointer to it (every idle opaque connection holds its tunnel),
/// and whether the connection is still there.
pub(crate) struct ConnTunnels {
    /// Tunnels open on the connection now.
    pub(super) open: AtomicUsize,
    /// App connections following the connection ([`PeerGone`]).
    pub(super) followers: AtomicUsize,
    /// Taken from the pool since the last sweep looked (see
    /// `MeshPool::sweep`).
    pub(super) used: AtomicBool,
    /// The peer's SPIFFE ID (from the connection's certificate).
    pub(super) peer: Option<Arc<str>>,
    /// The destination's slot and the connection's id, when this is one of
    /// the destination's extra connections (see [`TunnelCount`]).
    pub(super) extra: std::sync::OnceLock<(Weak<Slot>, u64)>,
    /// The destination's slot and the connection's id, when this is the
    /// destination's pooled (first) connection: let go after a burst (see
    /// [`RECYCLE_PEAK`]).
    pub(super) first: std::sync::OnceLock<(Weak<Slot>, u64)>,
    /// Most tunnels open at once on the connection so far.
    pub(super) peak: AtomicUsize,
    /// Set while the pool lets the connection go after a burst: a tunnel
    /// counted on it meanwhile is taken back and rides another, so that
    /// every tunnel rides a connection the pool knows (revocation
    /// rechecks and retires only those).
    pub(super) let_go: AtomicBool,
    /// Set once the connection has ended (see [`Closing`]).
    pub(super) closed: AtomicBool,
    /// Set when the pool retires the connection ([`MeshPool::retire`]).
    pub(super) retired: AtomicBool,
    /// Wakes the app connections that follow the connection
    /// ([`PeerGone`]) when it is retired or ends.
    pub(super) gone: tokio::sync::Notify,
    /// What the peer's certificate is checked again by when the revocation
    /// list or the trust bundle changes ([`MeshPool::recheck`]).
    pub(super) proof: PeerProof,
    /// The connection's task: aborted, its streams with it, when the
    /// peer is refused ([`ConnTunnels::revoke`]).
    pub(super) task: std::sync::OnceLock<tokio::task::AbortHandle>,
}

/// A peer's certificate as a revocation or a bundle change reads it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PeerProof {
    /// The leaf's serial, as `revocation::serial_key`.
    pub(super) serial: u64,
    /// The root key its chain ended at; `None` (the bundle changed during
    /// the handshake): refused at the next change, as inbound.
    pub(super) anchor: Option<stepmesh_ca::svid::AnchorKey>,
}

impl ConnTunnels {
    /// A new connection's, reaching `peer`: no tunnel yet, open.
    pub(super) fn new(peer: Option<Arc<str>>, proof: PeerProof) -> Arc<Self> {
        Arc::new(ConnTunnels {
            open: AtomicUsize::new(0),
            followers: AtomicUsize::new(0),
            used: AtomicBool::new(true),
            proof,
            task: std::sync::OnceLock::new(),
            peer,
            extra: std::sync::OnceLock::new(),
            first: std::sync::OnceLock::new(),
            peak: AtomicUsize::new(0),
            let_go: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            gone: tokio::sync::Notify::new(),
        })
    }

    /// Tunnels open on the connection now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Notes that `open` tunnels are open now (for [`RECYCLE_PEAK`]): a
    /// load, and a store only past the highest so far.
    pub(super) fn note_open(&self, open: usize) {
        if open > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(open, Ordering::Relaxed);
        }
    }

    /// Notes a use for the pool's sweep: a load, and a store only when
    /// the sweep has cleared the flag since (no cache line bounced per
    /// request between the cores).
    pub(super) fn mark_used(&self) {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }

    /// Whether anything holds or took the connection since the last call:
    /// a tunnel open, an app connection following it, a caller that took
    /// it from the pool. Clears the last.
    pub(super) fn in_use(&self) -> bool {
        let used = self.used.swap(false, Ordering::Relaxed);
        used || self.open() > 0 || self.followers.load(Ordering::Acquire) > 0
    }

    pub(super) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.gone.notify_waiters();
    }

    /// Whether the store, as it is now, refuses the peer: its serial or ID
    /// revoked, or its root gone from the bundle.
    pub(super) fn refused(
        &self,
        revoked: &stepmesh_ca::revocation::RevokedSet,
        bundle: Option<&stepmesh_ca::svid::TrustBundle>,
    ) -> bool {
        let id = self.peer.as_deref().unwrap_or_default();
        revoked.refuses_key(id, self.proof.serial)
            || !self
                .proof
                .anchor
                .is_some_and(|a| bundle.is_some_and(|b| b.trusts(a)))
    }

    /// Retires the connection and ends it now, with every stream on it
    /// (its peer was refused).
    pub(super) fn revoke(&self) {
        self.retire();
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }

    /// Notes the connection's task, for [`ConnTunnels::revoke`].
    pub(super) fn driven_by(&self, task: &tokio::task::JoinHandle<()>) {
        let _ = self.task.set(task.abort_handle());
    }
}

impl super::Pooled {
    /// Counts one more tunnel on this connection, if it has room.
    pub(super) fn take_tunnel(&self) -> bool {
        let open = &self.tunnels.open;
        // SeqCst: see `ConnTunnels::let_go`.
        let before = open.fetch_add(1, Ordering::SeqCst);
        if before < self.tunnel_limit() && !self.tunnels.let_go.load(Ordering::SeqCst) {
            self.tunnels.note_open(before + 1);
            return true;
        }
        open.fetch_sub(1, Ordering::AcqRel);
        false
    }

    /// The guard of a tunnel `take_tunnel` counted on this connection;
    /// `slot`: the destination's, when this is one of its extra connections.
    pub(super) fn counted(&self, slot: Option<Weak<Slot>>) -> TunnelCount {
        if let Some(slot) = slot {
            // The same for every tunnel of the connection: set once.
            let _ = self.tunnels.extra.set((slot, self.id));
        }
        TunnelCount(self.tunnels.clone())
    }
}

/// Held by a pooled connection's task: its drop (the task's end, even by
/// a panic) marks the connection closed and wakes its followers.
pub(crate) struct Closing(pub(super) Arc<ConnTunnels>);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.gone.notify_waiters();
    }
}

/// Tunnels open at once past which the destination's first connection is
/// let go when its last tunnel ends and no app connection follows it. h2
/// keeps a slot for every stream of a connection's busiest moment (its
/// stream store, and the frame buffers beside it) for as long as the
/// connection lives, on both sides: after 10,000 opaque connections to one
/// peer, 0.6 to 0.8 MiB each side stayed until the pool's idle time let the
/// connection go (docs/BENCHMARKS.md). Below this, the next tunnel would
/// pay a handshake to give back less than it costs.
pub(super) const RECYCLE_PEAK: usize = 256;

/// One tunnel counted on a pooled connection while it is open. The last
/// tunnel of an extra connection (one dialled past its tunnel limit) takes
/// that connection out of the pool, so that it closes once idle instead
/// of staying open for good after a burst; the destination's first
/// connection stays pooled, unless it carried more than [`RECYCLE_PEAK`]
/// tunnels at once.
pub(crate) struct TunnelCount(pub(super) Arc<ConnTunnels>);

impl TunnelCount {
    /// The peer the tunnel reaches (the pooled connection's).
    pub(crate) fn peer(&self) -> Option<&Arc<str>> {
        self.0.peer.as_ref()
    }
}

impl Drop for TunnelCount {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if let Some((slot, id)) = self.0.first.get() {
            if self.0.peak.load(Ordering::Relaxed) <= RECYCLE_PEAK {
                return;
            }
            let Some(slot) = slot.upgrade() else {
                return;
            };
            let mut ready = slot.ready.lock().unwrap_or_else(|p| p.into_inner());
            // Followers are read under the lock, where alone they are added
            // (see `MeshPool::first_ended`).
            if ready.as_ref().is_none_or(|p| p.id != *id)
                || self.0.followers.load(Ordering::Acquire) > 0
            {
                return;
            }
            // With `Pooled::take_tunnel`, each side stores, then loads what
            // the other stores (SeqCst): either this sees its tunnel and
            // keeps the connection, or it sees `let_go` and takes its
            // tunnel elsewhere.
            self.0.let_go.store(true, Ordering::SeqCst);
            if self.0.open.load(Ordering::SeqCst) > 0 {
                self.0.let_go.store(false, Ordering::SeqCst);
                return;
            }
            tracing::debug!(
                peak = self.0.peak.load(Ordering::Relaxed),
                "pooled mesh connection drained after a burst: letting it go"
            );
            *ready = None;
            return;
        }
        let Some((slot, id)) = self.0.extra.get() else {
            return;
        };
        let Some(slot) = slot.upgrade() else {
            return;
        };
        let mut more = slot.more.lock().unwrap_or_else(|p| p.into_inner());
        // Re-read under the lock: `more_with_room` counts new tunnels under it.
        more.retain(|p| p.id != *id || p.tunnels.open() > 0);
    }
}
