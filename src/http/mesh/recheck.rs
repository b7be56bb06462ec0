//! A pooled connection's peer checked again when the identity store
//! changes: what the handshake proved of it (its serial, its root key),
//! and the pooled connections ended once the store refuses their peer.

use std::sync::Arc;

use super::{MeshPool, PeerProof, Pooled, Slot};

/// What a revocation or a bundle change will check the peer of a new
/// connection by (as the inbound side's live re-authorization does).
pub(super) fn proof_of(
    session: &rustls::ClientConnection,
    store: &crate::identity::store::CertStore,
) -> PeerProof {
    let chain = session.peer_certificates();
    let serial = chain
        .and_then(|c| c.first())
        .and_then(crate::identity::id_and_serial_of)
        .map_or(0, |(_, serial)| {
            stepmesh_ca::revocation::serial_key(&serial)
        });
    let anchor = chain
        .zip(store.bundle())
        .and_then(|(chain, bundle)| bundle.anchor_of(chain));
    PeerProof { serial, anchor }
}

impl MeshPool {
    /// Ends every pooled connection whose peer the identity store now
    /// refuses (its serial or ID revoked, its root gone from the bundle),
    /// with its streams: a revocation reaches the connections already made
    /// to the peer, not only the next handshake. Called on every change of
    /// the store (`proxy::reauth::follow`); the next caller dials, and the
    /// handshake decides.
    pub(crate) fn recheck(&self) {
        let Some(sidecar) = &self.sidecar else {
            return;
        };
        let revoked = sidecar.store.revoked();
        let bundle = sidecar.store.bundle();
        let refused = |p: &Pooled| p.tunnels.refused(&revoked, bundle.as_deref());
        let slots: Vec<Arc<Slot>> = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.values().cloned().collect()
        };
        for slot in slots {
            let mut ready = slot.ready.lock().unwrap_or_else(|p| p.into_inner());
            let gone = ready.take_if(|p| refused(p));
            drop(ready);
            let mut more = slot.more.lock().unwrap_or_else(|p| p.into_inner());
            let (kept, refused): (Vec<Pooled>, Vec<Pooled>) = std::mem::take(&mut *more)
                .into_iter()
                .partition(|p| !refused(p));
            *more = kept;
            drop(more);
            for p in gone.into_iter().chain(refused) {
                tracing::info!(
                    peer = p.peer.as_deref().unwrap_or("?"),
                    "mesh connection's peer refused by the identity store: closing it"
                );
                p.tunnels.revoke();
            }
        }
    }
}
