//! The one place the sidecar's current SVID lives. Sources publish into it;
//! TLS resolvers and verifiers read from it per handshake (lock-free loads),
//! so a rotation swaps the certificate without touching live connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::CertifiedKey;
use stepmesh_ca::revocation::RevokedSet;
use stepmesh_ca::spiffe_id::{SpiffeId, TrustDomain};
use stepmesh_ca::svid::TrustBundle;

/// An SVID as a source hands it over: chain (leaf first), key, bundle.
pub struct Svid {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (never logged: no `Debug`).
    pub key: PrivateKeyDer<'static>,
    /// Roots of our trust domain, for verifying peers.
    pub bundle: TrustBundle,
}

/// What `/config`, metrics and logs may show about the SVID in use.
#[derive(Debug, Clone)]
pub struct SvidInfo {
    /// Our SPIFFE ID.
    pub id: SpiffeId,
    /// Leaf not-after.
    pub not_after: SystemTime,
    /// Leaf serial (hex).
    pub serial: String,
}

/// Why an SVID was refused (the store keeps the previous one).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The SVID does not verify against its own bundle.
    #[error("SVID does not verify against the bundle: {0}")]
    Invalid(#[from] stepmesh_ca::svid::SvidError),
    /// The key does not load or does not match the leaf.
    #[error("private key: {0}")]
    Key(#[from] rustls::Error),
    /// The SVID is of another trust domain than the one we serve.
    #[error("SVID trust domain {got} is not {want}")]
    TrustDomain {
        /// Expected trust domain.
        want: TrustDomain,
        /// The new SVID's trust domain.
        got: TrustDomain,
    },
}

#[derive(Debug)]
struct Current {
    certified: Arc<CertifiedKey>,
    /// The key as PKCS#8 DER, for the Workload API (`None`: the source gave
    /// another encoding).
    pkcs8: Option<Arc<Pkcs8Key>>,
    bundle: Arc<TrustBundle>,
    info: SvidInfo,
}

/// The SVID's private key as unencrypted PKCS#8 DER: what the SPIFFE
/// Workload API hands to the app (see docs/WORKLOAD-API.md). No `Debug`
/// of the bytes: a key is never logged.
pub struct Pkcs8Key(Vec<u8>);

impl Pkcs8Key {
    /// The DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Pkcs8Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pkcs8Key(<redacted>)")
    }
}

/// Everything the SPIFFE Workload API serves about the current SVID.
#[derive(Debug, Clone)]
pub struct WorkloadSvid {
    /// ID, not-after, serial.
    pub info: SvidInfo,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key as PKCS#8 (`None`: not PKCS#8, cannot be served).
    pub pkcs8: Option<Arc<Pkcs8Key>>,
    /// Roots of our trust domain.
    pub bundle: Arc<TrustBundle>,
}

/// Current SVID, key and bundle; empty until the first SVID (handshakes fail
/// and `/ready` says no until then).
#[derive(Debug)]
pub struct CertStore {
    provider: Arc<CryptoProvider>,
    trust_domain: ArcSwapOption<TrustDomain>,
    current: ArcSwapOption<Current>,
    /// Why the source has no (new) SVID for us, for `/ready`.
    trouble: ArcSwapOption<String>,
    generation: tokio::sync::watch::Sender<u64>,
    /// Unix seconds of the last change of the bundle's roots (0: never).
    roots_changed_at: AtomicU64,
    /// Bumped on every change of the bundle's roots.
    roots_generation: AtomicU64,
    /// Serials and IDs to refuse (streamed by the CA with the bundle).
    revoked: arc_swap::ArcSwap<RevokedSet>,
    /// The JWK set verifying the trust domain's JWT-SVIDs (the CA's).
    jwks: ArcSwapOption<String>,
}

impl CertStore {
    /// An empty store. `trust_domain`, when known up front (`--ca` mode),
    /// pins what every SVID must belong to; otherwise the first SVID pins it.
    pub fn new(provider: Arc<CryptoProvider>, trust_domain: Option<TrustDomain>) -> Self {
        Self {
            provider,
            trust_domain: ArcSwapOption::new(trust_domain.map(Arc::new)),
            current: ArcSwapOption::empty(),
            trouble: ArcSwapOption::empty(),
            generation: tokio::sync::watch::Sender::new(0),
            roots_changed_at: AtomicU64::new(0),
            roots_generation: AtomicU64::new(0),
            revoked: arc_swap::ArcSwap::from_pointee(RevokedSet::default()),
            jwks: ArcSwapOption::empty(),
        }
    }

    /// Checks and installs a new SVID. On error nothing changes.
    pub fn publish(&self, svid: Svid) -> Result<SvidInfo, StoreError> {
        let verified = stepmesh_ca::svid::verify(&svid.chain, &svid.bundle, UnixTime::now())?;
        let td = verified.id.trust_domain().clone();
        if let Some(want) = self.trust_domain.load_full() {
            if *want != td {
                return Err(StoreError::TrustDomain {
                    want: (*want).clone(),
                    got: td,
                });
            }
        } else {
            self.trust_domain.store(Some(Arc::new(td)));
        }
        let pkcs8 = match &svid.key {
            PrivateKeyDer::Pkcs8(der) => Some(Arc::new(Pkcs8Key(der.secret_pkcs8_der().to_vec()))),
            _ => None,
        };
        let certified = CertifiedKey::from_der(svid.chain, svid.key, &self.provider)?;
        let info = SvidInfo {
            id: verified.id,
            not_after: verified.not_after,
            serial: verified.serial,
        };
        if let Some(old) = self.current.load().as_ref() {
            if old.bundle.roots() != svid.bundle.roots() {
                let now = super::unix_secs(SystemTime::now()).max(1) as u64;
                self.roots_changed_at.store(now, Ordering::Release);
                self.roots_generation.fetch_add(1, Ordering::AcqRel);
                tracing::info!(
                    roots = svid.bundle.roots().len(),
                    "trust bundle roots changed"
                );
            }
        }
        self.current.store(Some(Arc::new(Current {
            certified: Arc::new(certified),
            pkcs8,
            bundle: Arc::new(svid.bundle),
            info: info.clone(),
        })));
        self.trouble.store(None);
        self.generation.send_modify(|g| *g += 1);
        Ok(info)
    }

    /// Installs a new trust bundle (the CA's `WatchTrustBundle` stream)
    /// under the current SVID. Refused (nothing changes) before the first
    /// SVID or for another trust domain.
    pub fn update_bundle(&self, bundle: TrustBundle) -> Result<(), StoreError> {
        let Some(current) = self.current.load_full() else {
            return Ok(());
        };
        if bundle.trust_domain() != current.bundle.trust_domain() {
            return Err(StoreError::TrustDomain {
                want: current.bundle.trust_domain().clone(),
                got: bundle.trust_domain().clone(),
            });
        }
        if bundle.roots() == current.bundle.roots() {
            return Ok(());
        }
        let chain = &current.certified.cert;
        if let Err(e) = stepmesh_ca::svid::verify(chain, &bundle, UnixTime::now()) {
            // Peers verify us with their own bundles; keep serving, but say so.
            tracing::warn!(error = %e, "our SVID does not chain to the new trust bundle");
        }
        let now = super::unix_secs(SystemTime::now()).max(1) as u64;
        self.roots_changed_at.store(now, Ordering::Release);
        self.roots_generation.fetch_add(1, Ordering::AcqRel);
        tracing::info!(roots = bundle.roots().len(), "trust bundle updated");
        self.current.store(Some(Arc::new(Current {
            certified: current.certified.clone(),
            pkcs8: current.pkcs8.clone(),
            bundle: Arc::new(bundle),
            info: current.info.clone(),
        })));
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Installs the JWK set of the trust domain's JWT-SVIDs (the CA's bundle
    /// stream); a change wakes the Workload API's streams.
    pub fn update_jwks(&self, jwks_json: String) {
        if self.jwks.load().as_deref().map(String::as_str) == Some(jwks_json.as_str()) {
            return;
        }
        self.jwks.store(Some(Arc::new(jwks_json)));
        if self.is_loaded() {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// The JWK set of the trust domain's JWT-SVIDs, once the CA sent one.
    pub fn jwks(&self) -> Option<Arc<String>> {
        self.jwks.load_full()
    }

    /// The key and chain to present, if any yet.
    pub fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|c| c.certified.clone())
    }

    /// The bundle peers are verified against, if any yet.
    pub fn bundle(&self) -> Option<Arc<TrustBundle>> {
        self.current.load().as_ref().map(|c| c.bundle.clone())
    }

    /// About the SVID in use, if any yet.
    pub fn info(&self) -> Option<SvidInfo> {
        self.current.load().as_ref().map(|c| c.info.clone())
    }

    /// Our trust domain, once known.
    pub fn trust_domain(&self) -> Option<TrustDomain> {
        self.trust_domain.load_full().map(|td| (*td).clone())
    }

    /// The current SVID with its key and bundle, for the Workload API.
    pub fn workload_svid(&self) -> Option<WorkloadSvid> {
        self.current.load().as_ref().map(|c| WorkloadSvid {
            info: c.info.clone(),
            chain: c.certified.cert.clone(),
            pkcs8: c.pkcs8.clone(),
            bundle: c.bundle.clone(),
        })
    }

    /// Changes on every new SVID, trust bundle or JWK set (0: no SVID yet):
    /// what the Workload API's streams wait on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Resolves once the first SVID is loaded.
    pub async fn wait_loaded(&self) {
        let mut rx = self.generation.subscribe();
        // The sender lives in `self`, so the channel cannot close meanwhile.
        let _ = rx.wait_for(|generation| *generation > 0).await;
    }

    /// The serials and IDs refused now (one load per handshake).
    pub fn revoked(&self) -> arc_swap::Guard<Arc<RevokedSet>> {
        self.revoked.load()
    }

    /// Installs the CA's revocation list; a changed one makes established
    /// connections re-check themselves.
    pub fn update_revocations(&self, revoked: RevokedSet) {
        if **self.revoked.load() == revoked {
            return;
        }
        tracing::info!(empty = revoked.is_empty(), "revocation list updated");
        self.revoked.store(Arc::new(revoked));
        self.generation.send_modify(|g| *g += 1);
    }

    /// The number of changes so far (new SVID, bundle, revocation list):
    /// what caches tied to our identity key on.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Changes after every new SVID, trust bundle or revocation list: established
    /// connections re-check their peer against the new roots on it.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Whether the bundle's roots changed within `window` of now (resumed
    /// sessions older than the change must be verified again in full).
    pub fn roots_changed_within(&self, window: Duration) -> bool {
        let at = self.roots_changed_at.load(Ordering::Acquire);
        at != 0 && (super::unix_secs(SystemTime::now()) as u64) < at + window.as_secs()
    }

    /// Changes whenever the bundle's roots change (keys verification caches).
    pub fn roots_generation(&self) -> u64 {
        self.roots_generation.load(Ordering::Acquire)
    }

    /// Records why the source cannot give us an SVID (waiting for a file,
    /// the CA refusing); shown by `/ready`, cleared by the next
    /// [`publish`](Self::publish).
    pub fn set_trouble(&self, why: String) {
        self.trouble.store(Some(Arc::new(why)));
    }

    /// Why the source has not given us an SVID since its last one, if known.
    pub fn trouble(&self) -> Option<Arc<String>> {
        self.trouble.load_full()
    }

    /// Whether an SVID is loaded.
    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }
}
