//! Verified tokens kept until they expire, so a repeated token costs a hash
//! lookup instead of a signature check, for as long as the key set that
//! verified them is the provider's (a key pulled from the JWKS, or a
//! rotated CA key, ends its tokens at once). Sharded to keep lock holds
//! tiny and uncontended; bounded so a flood of distinct valid tokens cannot
//! grow it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use super::jwks::KeySet;
use super::verify::VerifiedToken;

/// A verification and the key set it was made under (weak: an old set's
/// keys are freed when it is replaced, its address stays unique while
/// entries point at it, so a new set never passes for it).
type Entry = (Arc<VerifiedToken>, Weak<KeySet>);

const SHARDS: usize = 16;
/// Per shard; 16 × 4096 tokens at most.
const SHARD_CAP: usize = 4096;

/// Token string → verified claims, for one provider.
pub(crate) struct TokenCache {
    shards: [Mutex<HashMap<Box<str>, Entry>>; SHARDS],
}

impl TokenCache {
    pub(crate) fn new() -> TokenCache {
        TokenCache {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    /// The signature's last byte is uniformly random: a free shard index.
    fn shard(&self, token: &str) -> &Mutex<HashMap<Box<str>, Entry>> {
        let b = token.as_bytes().last().copied().unwrap_or(0);
        &self.shards[usize::from(b) % SHARDS]
    }

    /// The cached verification, if made under `keys` and still within
    /// `exp` (+ leeway).
    pub(crate) fn get(
        &self,
        token: &str,
        keys: &Arc<KeySet>,
        now: u64,
        leeway: u64,
    ) -> Option<Arc<VerifiedToken>> {
        let map = self.shard(token).lock().unwrap_or_else(|p| p.into_inner());
        let (hit, under) = map.get(token)?;
        let current = std::ptr::eq(under.as_ptr(), Arc::as_ptr(keys));
        (current && now < hit.exp.saturating_add(leeway)).then(|| hit.clone())
    }

    /// Remembers a verification; evicts expired entries, or everything in
    /// the shard, when it is full.
    pub(crate) fn insert(
        &self,
        token: &str,
        verified: Arc<VerifiedToken>,
        keys: &Arc<KeySet>,
        now: u64,
        leeway: u64,
    ) {
        let mut map = self.shard(token).lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= SHARD_CAP {
            map.retain(|_, (v, under)| {
                now < v.exp.saturating_add(leeway) && under.strong_count() > 0
            });
            if map.len() >= SHARD_CAP {
                map.clear();
            }
        }
        map.insert(token.into(), (verified, Arc::downgrade(keys)));
    }

    /// Number of cached tokens (tests, metrics).
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}
