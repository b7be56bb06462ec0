//! Serves the store's current certificate on both sides of a handshake: one
//! lock-free load per handshake, so rotation never rebuilds a config.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::identity::store::CertStore;

/// Resolver backed by the [`CertStore`] (empty store: no certificate, the
/// handshake fails, which is right before the first SVID).
#[derive(Debug)]
pub struct SvidResolver {
    store: Arc<CertStore>,
}

impl SvidResolver {
    /// A resolver reading `store`.
    pub fn new(store: Arc<CertStore>) -> Self {
        Self { store }
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.certified_key()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.certified_key()
    }

    fn has_certs(&self) -> bool {
        self.store.is_loaded()
    }
}
