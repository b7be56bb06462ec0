//! One step-up provider at run time: its keys (the one JWKS cache,
//! `stepmesh_ca::jwt::KeyCache`: swapped whole, last good kept, one
//! rate-limited refetch on an unknown `kid`), the scheduled refresh, and its
//! verified-token cache. A mesh provider (`jwks: {mesh: true}`) reads the
//! CA's JWT-SVID key set from the CertStore: re-parsed when the CA streams
//! a new one, never fetched on a schedule.

use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use stepmesh_ca::jwt::KeyCache;

use super::cache::TokenCache;
use super::fetch::Fetcher;
use super::jwks::{JwksError, KeySet};
use super::metrics::{CacheLabel, FetchLabels, ProviderLabel, StepUpMetrics};
use super::verify::{self, TokenError, VerifiedToken};
use super::MeshJwks;
use crate::policy::{JwksSource, ProviderConfig};

/// A provider's keys and caches.
pub struct Provider {
    config: Arc<ProviderConfig>,
    keys: KeyCache,
    /// Err: the fetcher could not be built (bad CA file); every fetch fails.
    fetcher: Result<Fetcher, String>,
    cache: TokenCache,
    metrics: StepUpMetrics,
    /// Mesh providers: the key set the keys were last parsed from.
    mesh_seen: ArcSwapOption<String>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.config.name)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// Builds the provider, fetches its keys once (a failure is logged and
    /// retried on schedule) and starts the scheduled refresh, which ends when
    /// the provider is dropped.
    /// `mesh` is where a mesh provider's keys are (see [`MeshJwks`]).
    pub async fn start(
        config: Arc<ProviderConfig>,
        metrics: StepUpMetrics,
        mesh: Option<MeshJwks>,
    ) -> Arc<Provider> {
        let fetcher = Fetcher::new(&config.jwks, mesh.as_ref())
            .await
            .map_err(|e| e.to_string());
        let provider = Arc::new(Provider {
            keys: KeyCache::new(config.min_refresh_interval),
            fetcher,
            cache: TokenCache::new(),
            metrics,
            mesh_seen: ArcSwapOption::empty(),
            config,
        });
        if provider.config.jwks == JwksSource::Mesh {
            if provider.mesh_changed() {
                provider.keys.fetch(provider.fetch("start")).await;
            }
        } else {
            provider.keys.fetch(provider.fetch("start")).await;
            tokio::spawn(refresh_loop(Arc::downgrade(&provider)));
        }
        provider
    }

    /// Mesh providers: whether the CertStore holds a key set other than the
    /// one the keys were parsed from (one pointer comparison per request);
    /// if so, it is marked seen and the caller parses it.
    fn mesh_changed(&self) -> bool {
        let Ok(Fetcher::Mesh(Some(read))) = &self.fetcher else {
            return false;
        };
        let Some(current) = read() else { return false };
        if self
            .mesh_seen
            .load()
            .as_ref()
            .is_some_and(|seen| Arc::ptr_eq(seen, &current))
        {
            return false;
        }
        self.mesh_seen.store(Some(current));
        true
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &Arc<ProviderConfig> {
        &self.config
    }

    /// Number of usable keys now held.
    pub fn key_count(&self) -> usize {
        self.keys.current().len()
    }

    /// Verifies `token` (cached until `exp`, while the keys that verified
    /// it are the provider's); an unknown `kid` triggers one refetch, at
    /// most once per `minRefreshInterval` across all requests.
    pub async fn verify(&self, token: &str, now: u64) -> Result<Arc<VerifiedToken>, TokenError> {
        let leeway = self.config.token.leeway.as_secs();
        if self.mesh_changed() {
            // Boxed, as the refetch below: rare, and the fetch future is
            // large (it would size every request's future). A bad set is
            // logged and counted; the last good keys stay.
            Box::pin(self.keys.fetch(self.fetch("mesh_update"))).await;
        }
        let keys = self.keys.current();
        if let Some(hit) = self.cache.get(token, &keys, now, leeway) {
            self.metrics
                .cache
                .get_or_create(&CacheLabel { result: "hit" })
                .inc();
            return Ok(hit);
        }
        self.metrics
            .cache
            .get_or_create(&CacheLabel { result: "miss" })
            .inc();
        let peeked = verify::peek(token, &self.config.token)?;
        let (verified, keys) = match verify::verify(token, &peeked, &self.config.token, &keys, now)
        {
            // Boxed, as `StepUp::provider`'s start: the fetch is rare and large.
            Err(TokenError::UnknownKid | TokenError::NoKeys)
                if Box::pin(self.keys.refetch(&keys, || self.fetch("unknown_kid"))).await =>
            {
                let keys = self.keys.current();
                let verified = verify::verify(token, &peeked, &self.config.token, &keys, now)?;
                (verified, keys)
            }
            other => (other?, keys),
        };
        let verified = Arc::new(verified);
        self.cache
            .insert(token, verified.clone(), &keys, now, leeway);
        Ok(verified)
    }

    /// One fetch: the parsed key set to store, or `None` (counted and
    /// logged; the cache keeps the last good keys).
    async fn fetch(&self, trigger: &'static str) -> Option<KeySet> {
        let fetched = match &self.fetcher {
            Ok(f) => f.fetch().await.map_err(|e| e.to_string()),
            Err(setup) => Err(setup.clone()),
        };
        let (result, set) = match fetched {
            Err(err) => {
                tracing::warn!(provider = %self.config.name, error = %err, "JWKS fetch failed; keeping the last good keys");
                ("error", None)
            }
            Ok(bytes) => match KeySet::parse(&bytes) {
                Ok(set) => {
                    tracing::debug!(provider = %self.config.name, keys = set.len(), trigger, "JWKS fetched");
                    self.metrics
                        .keys
                        .get_or_create(&ProviderLabel {
                            provider: self.config.name.to_string(),
                        })
                        .set(i64::try_from(set.len()).unwrap_or(i64::MAX));
                    ("ok", Some(set))
                }
                Err(err) => {
                    tracing::warn!(provider = %self.config.name, error = %err, "JWKS refused; keeping the last good keys");
                    let result = match err {
                        JwksError::Empty => "empty",
                        JwksError::Malformed(_) => "malformed",
                    };
                    (result, None)
                }
            },
        };
        self.metrics
            .fetches
            .get_or_create(&FetchLabels {
                provider: self.config.name.to_string(),
                trigger,
                result,
            })
            .inc();
        set
    }

    /// Verified tokens held (tests).
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }
}

/// Refreshes every `refresh`, or sooner (every `minRefreshInterval`, at least
/// 1 s) while fetches fail; exits once the provider is gone.
async fn refresh_loop(provider: Weak<Provider>) {
    let mut ok = true;
    loop {
        let wait = match provider.upgrade() {
            Some(p) if ok => p.config.refresh,
            Some(p) => p.config.min_refresh_interval.max(Duration::from_secs(1)),
            None => return,
        };
        tokio::time::sleep(wait).await;
        let Some(p) = provider.upgrade() else { return };
        ok = p.keys.fetch(p.fetch("schedule")).await;
    }
}
