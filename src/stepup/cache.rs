//! Verified tokens kept until they expire, so a repeated token costs a hash
//! lookup instead of a signature check. Sharded to keep lock holds tiny and
//! uncontended; bounded so a flood of distinct valid tokens cannot grow it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::verify::VerifiedToken;

const SHARDS: usize = 16;
/// Per shard; 16 × 4096 tokens at most.
const SHARD_CAP: usize = 4096;

/// Token string → verified claims, for one provider.
pub(crate) struct TokenCache {
    shards: [Mutex<HashMap<Box<str>, Arc<VerifiedToken>>>; SHARDS],
}

impl TokenCache {
    pub(crate) fn new() -> TokenCache {
        TokenCache {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    /// The signature's last byte is uniformly random: a free shard index.
    fn shard(&self, token: &str) -> &Mutex<HashMap<Box<str>, Arc<VerifiedToken>>> {
        let b = token.as_bytes().last().copied().unwrap_or(0);
        &self.shards[usize::from(b) % SHARDS]
    }

    /// The cached verification, if still within `exp` (+ leeway).
    pub(crate) fn get(&self, token: &str, now: u64, leeway: u64) -> Option<Arc<VerifiedToken>> {
        let map = self.shard(token).lock().unwrap_or_else(|p| p.into_inner());
        let hit = map.get(token)?;
        (now < hit.exp.saturating_add(leeway)).then(|| hit.clone())
    }

    /// Remembers a verification; evicts expired entries, or everything in
    /// the shard, when it is full.
    pub(crate) fn insert(&self, token: &str, verified: Arc<VerifiedToken>, now: u64, leeway: u64) {
        let mut map = self.shard(token).lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= SHARD_CAP {
            map.retain(|_, v| now < v.exp.saturating_add(leeway));
            if map.len() >= SHARD_CAP {
                map.clear();
            }
        }
        map.insert(token.into(), verified);
    }

    /// Number of cached tokens (tests, metrics).
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}
