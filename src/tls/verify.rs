//! SPIFFE certificate verifiers for rustls, on top of
//! `stepmesh_ca::svid::verify`. A refusal keeps its reason inside the rustls
//! error (see [`super::failure`]) so handshake failures are counted by reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName, OtherError};
use stepmesh_ca::spiffe_id::{SpiffeId, SpiffeIdPattern};

use crate::identity::store::CertStore;

/// The handshake-signature methods of every verifier: the one definition,
/// in `stepmesh_ca::tls` (the CA's verifier uses it too).
pub(crate) use stepmesh_ca::handshake_signatures;

/// Which server identity an outbound connection accepts.
#[derive(Debug, Clone)]
pub enum Expected {
    /// An exact ID, or any ID under a `/*` prefix (`--outbound ...@ID`).
    Pattern(SpiffeIdPattern),
    /// Any valid SVID of our trust domain (transparent mode, where the
    /// destination's identity is not configured).
    AnyInTrustDomain,
}

/// The peer presented a valid SVID, but not the identity we dialled for.
#[derive(Debug, thiserror::Error)]
#[error("peer is {got}, expected {expected}")]
pub struct WrongPeer {
    /// What the listener requires.
    pub expected: String,
    /// What the peer is.
    pub got: SpiffeId,
}

fn refuse(err: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// The peer's certificate (by serial) or identity is on the CA's
/// revocation list.
#[derive(Debug, thiserror::Error)]
#[error("{0} is revoked")]
pub struct Revoked(pub String);

/// Refuses a leaf the revocation list names; free while the list is empty.
pub(crate) fn check_revoked(store: &CertStore, leaf: &CertificateDer<'_>) -> Result<(), Revoked> {
    let revoked = store.revoked();
    if revoked.is_empty() {
        return Ok(());
    }
    let Some((id, serial)) = crate::identity::id_and_serial_of(leaf) else {
        return Err(Revoked("an unreadable certificate".into()));
    };
    if revoked.refuses(id.as_str(), &serial) {
        return Err(Revoked(format!("{id} (serial {serial})")));
    }
    Ok(())
}

/// No bundle loaded yet: nothing can be verified.
#[derive(Debug, thiserror::Error)]
#[error("no trust bundle loaded yet")]
pub struct NoBundle;

/// Chains verified lately, so a peer reconnecting with the same SVID costs
/// one hash instead of a chain verification (two ECDSA verifications). An
/// entry is valid for [`CACHE_TTL`] at most, never past the leaf's
/// not-after, and only while the bundle's roots are unchanged. Locked once
/// per full handshake, never on the data path.
#[derive(Debug, Default)]
pub struct VerifyCache {
    entries: Mutex<HashMap<[u8; 32], Cached>>,
}

#[derive(Debug, Clone)]
struct Cached {
    id: SpiffeId,
    until: SystemTime,
    generation: u64,
}

/// How long a verified chain is trusted without verifying it again.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// Entries kept at most (the cache is cleared when it fills).
const CACHE_MAX: usize = 4096;

impl VerifyCache {
    /// Verifies `end_entity` + `intermediates` against the store's bundle,
    /// or finds it verified lately. Returns the peer's ID.
    fn verify(
        &self,
        store: &CertStore,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, rustls::Error> {
        let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for cert in std::iter::once(end_entity).chain(intermediates) {
            digest.update(&(cert.len() as u64).to_be_bytes());
            digest.update(cert);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.finish().as_ref());
        let generation = store.roots_generation();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        if let Some(hit) = self.lock().get(&key) {
            if hit.generation == generation && at < hit.until {
                return Ok(hit.id.clone());
            }
        }
        let bundle = store.bundle().ok_or_else(|| refuse(NoBundle))?;
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let verified = stepmesh_ca::svid::verify(&chain, &bundle, now).map_err(refuse)?;
        let entry = Cached {
            id: verified.id.clone(),
            until: verified.not_after.min(at + CACHE_TTL),
            generation,
        };
        let mut entries = self.lock();
        if entries.len() >= CACHE_MAX {
            entries.clear();
        }
        entries.insert(key, entry);
        Ok(verified.id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Cached>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single insert/get), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Server side: a client certificate is mandatory and must be an SVID of our
/// trust domain (any workload; authorization comes after, from the policy).
#[derive(Debug)]
pub struct SvidClientVerifier {
    store: Arc<CertStore>,
    provider: Arc<CryptoProvider>,
    cache: VerifyCache,
}

impl SvidClientVerifier {
    /// Verifies against the store's current bundle.
    pub fn new(store: Arc<CertStore>, provider: Arc<CryptoProvider>) -> Self {
        Self {
            store,
            provider,
            cache: VerifyCache::default(),
        }
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.cache
            .verify(&self.store, end_entity, intermediates, now)?;
        check_revoked(&self.store, end_entity).map_err(refuse)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Client side: the server must present an SVID of our trust domain that
/// matches [`Expected`]. The DNS/IP server name is not used: SPIFFE
/// authenticates by ID.
#[derive(Debug)]
pub struct SvidServerVerifier {
    store: Arc<CertStore>,
    provider: Arc<CryptoProvider>,
    expected: Expected,
    cache: VerifyCache,
}

impl SvidServerVerifier {
    /// Verifies against the store's current bundle and `expected`.
    pub fn new(store: Arc<CertStore>, provider: Arc<CryptoProvider>, expected: Expected) -> Self {
        Self {
            store,
            provider,
            expected,
            cache: VerifyCache::default(),
        }
    }
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self
            .cache
            .verify(&self.store, end_entity, intermediates, now)?;
        check_revoked(&self.store, end_entity).map_err(refuse)?;
        if let Expected::Pattern(pattern) = &self.expected {
            if !pattern.matches(&id) {
                return Err(refuse(WrongPeer {
                    expected: pattern.to_string(),
                    got: id,
                }));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}
