//! Rate limits on signing: a token bucket per key — per SPIFFE ID and
//! source address (a pod), so one misbehaving workload cannot make the CA
//! sign without end nor lock its service account's other pods out, and
//! per source address before authentication, so one client cannot turn
//! forged credentials into verifier work (TokenReviews) without end. An
//! identity used from N addresses signs N times as often: each address is
//! a pod, which whoever holds the identity's credential could create.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::spiffe_id::SpiffeId;

/// Above this many tracked identities, full buckets are dropped.
const PRUNE_ABOVE: usize = 10_000;

/// Requests allowed per key: `burst` at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// Sustained requests per second per key; 0 disables the limit.
    pub per_second: f64,
    /// How many requests may come at once.
    pub burst: u32,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets, by key (a SPIFFE ID unless said). The lock is held for a
/// few arithmetic operations only; the CA signs at most thousands per
/// second, far below contention.
pub struct RateLimiter<K = SpiffeId> {
    limit: RateLimit,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// A limiter enforcing `limit`.
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `id`; `Err(retry_after)` when none is left.
    pub fn check(&self, id: &K) -> Result<(), Duration> {
        if self.limit.per_second <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let burst = f64::from(self.limit.burst.max(1));
        let Ok(mut buckets) = self.buckets.lock() else {
            // A panic elsewhere poisoned the lock: fail open would be unsafe,
            // fail closed would stop the CA; deny this one request.
            return Err(Duration::from_secs(1));
        };
        if buckets.len() > PRUNE_ABOVE {
            let rate = self.limit.per_second;
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(id.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * self.limit.per_second;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.limit.per_second;
            // A rate so small that the wait overflows a Duration: forever.
            Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn burst_then_refused_per_identity() {
        let rl = RateLimiter::new(RateLimit {
            per_second: 0.001,
            burst: 3,
        });
        let a = SpiffeId::parse("spiffe://td/a").unwrap();
        let b = SpiffeId::parse("spiffe://td/b").unwrap();
        for _ in 0..3 {
            assert!(rl.check(&a).is_ok());
        }
        let wait = rl.check(&a).unwrap_err();
        assert!(wait > Duration::from_secs(100), "{wait:?}");
        assert!(rl.check(&b).is_ok(), "another identity has its own bucket");
    }

    #[test]
    fn source_addresses_have_buckets_of_their_own() {
        let rl = RateLimiter::<std::net::IpAddr>::new(RateLimit {
            per_second: 0.001,
            burst: 2,
        });
        let (a, b) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        assert!(rl.check(&a).is_ok() && rl.check(&a).is_ok());
        assert!(rl.check(&a).is_err(), "a third at a burst of two");
        assert!(rl.check(&b).is_ok(), "another source has its own bucket");
    }

    #[test]
    fn a_tiny_rate_waits_forever_without_panicking() {
        let rl = RateLimiter::new(RateLimit {
            per_second: 1e-30,
            burst: 1,
        });
        let a = SpiffeId::parse("spiffe://td/a").unwrap();
        assert!(rl.check(&a).is_ok());
        assert_eq!(rl.check(&a), Err(Duration::MAX));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let rl = RateLimiter::new(RateLimit {
            per_second: 0.0,
            burst: 1,
        });
        let a = SpiffeId::parse("spiffe://td/a").unwrap();
        for _ in 0..100 {
            assert!(rl.check(&a).is_ok());
        }
    }
}
