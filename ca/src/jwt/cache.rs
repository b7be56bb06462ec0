//! An issuer's keys at run time, the one JWKS cache: the current key set
//! (swapped whole; a failed, empty or broken fetch never replaces it), and
//! fetches that never overlap — a scheduled refresh and the refetch a token
//! with an unknown `kid` triggers, which runs at most once per
//! `min_interval` however many requests ask for it at once (a flood of
//! made-up `kid`s cannot hammer the issuer). How keys are fetched (a file,
//! HTTPS with which roots and token) is the caller's.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::keys::KeySet;

/// The keys of one issuer and the guard of its fetches.
pub struct KeyCache {
    keys: ArcSwap<KeySet>,
    /// When the last fetch started; held across a fetch so concurrent
    /// unknown-kid refetches collapse into one.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    min_interval: Duration,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("keys", &*self.keys.load())
            .finish_non_exhaustive()
    }
}

impl KeyCache {
    /// An empty cache whose unknown-kid refetches are at least
    /// `min_interval` apart.
    pub fn new(min_interval: Duration) -> Self {
        Self {
            keys: ArcSwap::from_pointee(KeySet::default()),
            last_fetch: tokio::sync::Mutex::new(None),
            min_interval,
        }
    }

    /// The keys in use now.
    pub fn current(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    /// Fetches now (after any fetch in progress): a start or a schedule.
    /// `fetch` returns the new set, or `None` to keep the current one.
    /// True when keys were stored.
    /// Does not count against the unknown-kid refetch interval: a key
    /// rotated in just after a scheduled fetch is still picked up at once.
    pub async fn fetch<F: Future<Output = Option<KeySet>>>(&self, fetch: F) -> bool {
        let _fetching = self.last_fetch.lock().await;
        self.store(fetch.await)
    }

    /// The refetch for a token whose `kid` the set `seen` did not hold:
    /// true when the keys differ from `seen` afterwards (fetched here, or
    /// by a concurrent request meanwhile); false when a fetch ran within
    /// `min_interval` and nothing changed since.
    pub async fn refetch<F, Fut>(&self, seen: &Arc<KeySet>, fetch: F) -> bool
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Option<KeySet>>,
    {
        let mut last = self.last_fetch.lock().await;
        if !Arc::ptr_eq(seen, &self.keys.load()) {
            return true;
        }
        if last.is_some_and(|t| t.elapsed() < self.min_interval) {
            return false;
        }
        *last = Some(Instant::now());
        self.store(fetch().await);
        !Arc::ptr_eq(seen, &self.keys.load())
    }

    /// Stores a fetched set unless it is missing or empty.
    fn store(&self, fetched: Option<KeySet>) -> bool {
        match fetched {
            Some(set) if !set.is_empty() => {
                self.keys.store(Arc::new(set));
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn set() -> KeySet {
        // A P-256 public key (any valid one will do).
        let jwk = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"a",
            "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
        KeySet::parse(jwk.as_bytes()).unwrap()
    }

    #[tokio::test]
    async fn refetches_are_rate_limited_and_collapse() {
        let cache = Arc::new(KeyCache::new(Duration::from_secs(60)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let seen = cache.current();
        // Ten concurrent requests for an unknown kid: one fetch.
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (cache, fetches, seen) = (cache.clone(), fetches.clone(), seen.clone());
                tokio::spawn(async move {
                    cache
                        .refetch(&seen, || async {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Some(set())
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap(), "every request sees the new keys");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // Within the interval, with nothing new: no fetch.
        let now = cache.current();
        assert!(!cache.refetch(&now, || async { unreachable!() }).await);
        // A scheduled fetch does not use up the interval's refetch.
        let fresh = KeyCache::new(Duration::from_secs(60));
        assert!(fresh.fetch(async { Some(set()) }).await);
        let seen = fresh.current();
        assert!(fresh.refetch(&seen, || async { Some(set()) }).await);
    }

    #[tokio::test]
    async fn a_failed_or_empty_fetch_keeps_the_keys() {
        let cache = KeyCache::new(Duration::ZERO);
        assert!(cache.fetch(async { Some(set()) }).await);
        assert_eq!(cache.current().len(), 1);
        assert!(!cache.fetch(async { None }).await);
        assert!(!cache.fetch(async { Some(KeySet::default()) }).await);
        assert_eq!(cache.current().len(), 1);
    }
}
