//! The pool's housekeeping: a destination's connection unused for the
//! pool's idle time is let go, and a destination with nothing left in the
//! pool is forgotten, so that a sidecar that has talked to many peers over
//! its life (pods come and go) holds what it uses, not all it ever used.

use std::sync::Arc;

use super::{MeshPool, Slot};

impl MeshPool {
    /// Lets go of each destination's connection that nothing has used for
    /// [`MeshPool::idle`] (no tunnel open, no app connection following it,
    /// no caller taking it from the pool) or that has ended, and forgets
    /// each destination left with no connection, no dial in progress and
    /// no remembered refusal. A connection let go closes once its last
    /// stream ends (h2 closes a client connection no handle refers to), so
    /// a request in flight still finishes on it. Called by the layer's
    /// sweep (every few seconds); holds the pool's lock while it runs,
    /// which is per destination a few uncontended locks.
    pub(crate) fn sweep(&self) {
        let now = tokio::time::Instant::now();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slot| {
            slot.let_go_unused(now, self.idle);
            // Counted under the pool's lock, where alone new holders come
            // from: one holder is the map itself.
            Arc::strong_count(slot) > 1 || slot.holds_anything(now)
        });
    }
}

impl Slot {
    /// Drops the pooled connection if it has ended or nothing has used it
    /// for `idle` as the sweeps see it: the sweep after a use clears its
    /// flag, the next starts the count, so it goes between `idle` and
    /// `idle` plus two sweep periods after its last use.
    fn let_go_unused(&self, now: tokio::time::Instant, idle: std::time::Duration) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        let mut since = self.unused_since.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = ready.as_ref() else {
            *since = None;
            return;
        };
        if p.tunnels.in_use() && p.usable() {
            *since = None;
            return;
        }
        let unused_since = *since.get_or_insert(now);
        if !p.usable() || now.duration_since(unused_since) >= idle {
            tracing::debug!(
                peer = p.peer.as_deref().unwrap_or("?"),
                "pooled mesh connection unused: letting it go"
            );
            *ready = None;
            *since = None;
        }
    }

    /// Whether the slot still holds a connection or a remembered refusal.
    fn holds_anything(&self, now: tokio::time::Instant) -> bool {
        let ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        let more = self.more.lock().unwrap_or_else(|p| p.into_inner());
        let no_mesh = self.no_mesh.lock().unwrap_or_else(|p| p.into_inner());
        ready.is_some()
            || !more.is_empty()
            || no_mesh.as_ref().is_some_and(|(until, _)| now < *until)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Lane, MeshError, MeshPool};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::time::Instant;

    fn pool_len(pool: &MeshPool) -> usize {
        pool.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Remembers `key` as negotiating no mesh ALPN until `until`.
    fn refuse(pool: &MeshPool, key: &Arc<str>, until: Instant) {
        let slot = pool.slot(key, Lane::Mesh);
        let mut no_mesh = slot.no_mesh.lock().unwrap_or_else(|p| p.into_inner());
        *no_mesh = Some((until, MeshError::NoMeshAlpn(key.clone())));
    }

    #[tokio::test]
    async fn a_destination_is_forgotten_once_nothing_holds_or_remembers_it() {
        let pool = MeshPool::default();
        let key = |k: &str| -> Arc<str> { k.into() };
        // A caller dialling (or waiting for a dial) holds its slot.
        let holder = pool.slot(&key("held"), Lane::Mesh);
        let now = Instant::now();
        refuse(&pool, &key("refused"), now + Duration::from_secs(30));
        refuse(&pool, &key("was refused"), now);
        // A lookup (`first_ended`) made a slot and left it empty.
        drop(pool.slot(&key("empty"), Lane::Tunnels));
        assert_eq!(pool_len(&pool), 4);

        pool.sweep();
        assert_eq!(
            pool_len(&pool),
            2,
            "the empty destination and the expired refusal are forgotten"
        );
        let slots = pool.slots.lock().unwrap_or_else(|p| p.into_inner());
        assert!(slots.contains_key(&(key("refused"), Lane::Mesh)));
        assert!(slots.contains_key(&(key("held"), Lane::Mesh)));
        drop(slots);

        drop(holder);
        pool.sweep();
        assert_eq!(pool_len(&pool), 1, "a slot no caller holds is forgotten");
    }
}
