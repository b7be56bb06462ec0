//! One step-up provider at run time: its keys (swapped whole, last good kept),
//! the scheduled refresh, the rate-limited refetch on an unknown `kid`, and
//! its verified-token cache.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::cache::TokenCache;
use super::fetch::Fetcher;
use super::jwks::{JwksError, KeySet};
use super::metrics::{CacheLabel, FetchLabels, ProviderLabel, StepUpMetrics};
use super::verify::{self, TokenError, VerifiedToken};
use crate::policy::ProviderConfig;

/// A provider's keys and caches.
pub struct Provider {
    config: Arc<ProviderConfig>,
    keys: ArcSwap<KeySet>,
    /// Err: the fetcher could not be built (bad CA file); every fetch fails.
    fetcher: Result<Fetcher, String>,
    /// When the last fetch started; held across a fetch so concurrent
    /// unknown-kid refetches collapse into one.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    cache: TokenCache,
    metrics: StepUpMetrics,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.config.name)
            .field("keys", &*self.keys.load())
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// Builds the provider, fetches its keys once (a failure is logged and
    /// retried on schedule) and starts the scheduled refresh, which ends when
    /// the provider is dropped.
    pub async fn start(config: Arc<ProviderConfig>, metrics: StepUpMetrics) -> Arc<Provider> {
        let fetcher = Fetcher::new(&config.jwks).await.map_err(|e| e.to_string());
        let provider = Arc::new(Provider {
            keys: ArcSwap::from_pointee(KeySet::default()),
            fetcher,
            last_fetch: tokio::sync::Mutex::new(None),
            cache: TokenCache::new(),
            metrics,
            config,
        });
        {
            let mut last = provider.last_fetch.lock().await;
            provider.fetch("start", &mut last).await;
        }
        tokio::spawn(refresh_loop(Arc::downgrade(&provider)));
        provider
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &Arc<ProviderConfig> {
        &self.config
    }

    /// Number of usable keys now held.
    pub fn key_count(&self) -> usize {
        self.keys.load().len()
    }

    /// Verifies `token` (cached until `exp`); an unknown `kid` triggers one
    /// refetch, at most once per `minRefreshInterval` across all requests.
    pub async fn verify(&self, token: &str, now: u64) -> Result<Arc<VerifiedToken>, TokenError> {
        let leeway = self.config.token.leeway.as_secs();
        if let Some(hit) = self.cache.get(token, now, leeway) {
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
        let keys = self.keys.load_full();
        let verified = match verify::verify(token, &peeked, &self.config.token, &keys, now) {
            // Boxed, as `StepUp::provider`'s start: the fetch is rare and large.
            Err(TokenError::UnknownKid | TokenError::NoKeys)
                if Box::pin(self.refetch(&keys)).await =>
            {
                verify::verify(token, &peeked, &self.config.token, &self.keys.load(), now)?
            }
            other => other?,
        };
        let verified = Arc::new(verified);
        self.cache.insert(token, verified.clone(), now, leeway);
        Ok(verified)
    }

    /// Refetch for an unknown kid. True when the keys differ from `seen`
    /// afterwards (fetched by us, or by a concurrent request meanwhile).
    async fn refetch(&self, seen: &Arc<KeySet>) -> bool {
        let mut last = self.last_fetch.lock().await;
        if !Arc::ptr_eq(seen, &self.keys.load()) {
            return true;
        }
        if last.is_some_and(|t| t.elapsed() < self.config.min_refresh_interval) {
            return false;
        }
        self.fetch("unknown_kid", &mut last).await;
        !Arc::ptr_eq(seen, &self.keys.load())
    }

    /// One fetch; good keys replace the old ones, anything else is counted
    /// and logged and changes nothing.
    async fn fetch(&self, trigger: &'static str, last: &mut Option<Instant>) -> bool {
        *last = Some(Instant::now());
        let fetched = match &self.fetcher {
            Ok(f) => f.fetch().await.map_err(|e| e.to_string()),
            Err(setup) => Err(setup.clone()),
        };
        let result = match fetched {
            Err(err) => {
                tracing::warn!(provider = %self.config.name, error = %err, "JWKS fetch failed; keeping the last good keys");
                "error"
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
                    self.keys.store(Arc::new(set));
                    "ok"
                }
                Err(err) => {
                    tracing::warn!(provider = %self.config.name, error = %err, "JWKS refused; keeping the last good keys");
                    match err {
                        JwksError::Empty => "empty",
                        JwksError::Malformed(_) => "malformed",
                    }
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
        result == "ok"
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
        let mut last = p.last_fetch.lock().await;
        ok = p.fetch("schedule", &mut last).await;
    }
}
