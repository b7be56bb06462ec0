//! The outbound session cache, emptied whenever our identity store changes
//! (a new SVID, bundle or revocation list). A resumed TLS 1.3 session
//! carries the client certificate of the handshake that made it: without
//! this, a sidecar that renewed its SVID (after its old serial was revoked,
//! say) would keep presenting the old one on every resumption, and a peer
//! that refuses that certificate would refuse it until the ticket expired.

use std::sync::{Arc, Mutex};

use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::pki_types::ServerName;
use rustls::NamedGroup;

use crate::identity::store::CertStore;

/// Sessions kept per client config (rustls' default size).
const SESSIONS: usize = 256;

/// A session cache tied to the store's generation.
#[derive(Debug)]
pub struct SvidSessions {
    store: Arc<CertStore>,
    current: Mutex<(u64, Arc<ClientSessionMemoryCache>)>,
}

impl SvidSessions {
    /// An empty cache following `store`.
    pub fn new(store: Arc<CertStore>) -> Self {
        let generation = store.generation();
        Self {
            store,
            current: Mutex::new((
                generation,
                Arc::new(ClientSessionMemoryCache::new(SESSIONS)),
            )),
        }
    }

    /// The cache of the store's current generation (a new, empty one after
    /// a change). Locked once per handshake step, never on the data path.
    fn cache(&self) -> Arc<ClientSessionMemoryCache> {
        let generation = self.store.generation();
        // A panic cannot leave the pair half-written: a poisoned lock is usable.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.0 != generation {
            *current = (
                generation,
                Arc::new(ClientSessionMemoryCache::new(SESSIONS)),
            );
        }
        current.1.clone()
    }
}

impl ClientSessionStore for SvidSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.cache().set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.cache().kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.cache().set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.cache().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.cache().remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.cache().insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.cache().take_tls13_ticket(server_name)
    }
}
