//! Connections open at once per key: per peer identity on inbound listeners,
//! per source address on the app-facing ones, so that one workload (or one
//! local client) cannot use up the process-wide `--max-connections`; and
//! that limit itself ([`ConnectionBudget`]).
//!
//! A mutex-guarded map, taken once when a connection opens and once when it
//! closes — never per byte or per request. A map of our own rather than a
//! concurrent-map crate: two short critical sections per connection do not
//! justify the dependency (measured: connection setup is dominated by the
//! TLS handshake, tens of microseconds against a lock of tens of nanoseconds).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A refusal is logged at most this often per key.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// How many connections each key holds.
#[derive(Debug)]
pub struct PerKeyCap<K> {
    limit: usize,
    open: Mutex<HashMap<K, Entry>>,
}

#[derive(Debug, Default)]
struct Entry {
    open: usize,
    warned: Option<Instant>,
}

/// One connection's place under its key's cap; given back on drop.
#[derive(Debug)]
pub struct Slot<K: Eq + Hash> {
    cap: Arc<PerKeyCap<K>>,
    key: K,
}

/// The key already holds `limit` connections.
#[derive(Debug, PartialEq, Eq)]
pub struct CapReached {
    /// The cap.
    pub limit: usize,
    /// Whether this refusal should be logged (the first one each second).
    pub log: bool,
}

impl<K: Eq + Hash + Clone> PerKeyCap<K> {
    /// A cap of `limit` connections per key (0: no cap).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(PerKeyCap {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn map(&self) -> MutexGuard<'_, HashMap<K, Entry>> {
        // A panic while holding this lock leaves only counters behind:
        // still consistent enough to go on with.
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for one more connection of `key`, or why not.
    pub fn acquire(self: &Arc<Self>, key: &K) -> Result<Option<Slot<K>>, CapReached> {
        if self.limit == 0 {
            return Ok(None);
        }
        let mut map = self.map();
        let entry = map.entry(key.clone()).or_default();
        if entry.open >= self.limit {
            let now = Instant::now();
            let log = entry
                .warned
                .is_none_or(|at| now.duration_since(at) >= WARN_EVERY);
            if log {
                entry.warned = Some(now);
            }
            return Err(CapReached {
                limit: self.limit,
                log,
            });
        }
        entry.open += 1;
        Ok(Some(Slot {
            cap: self.clone(),
            key: key.clone(),
        }))
    }

    /// Connections `key` holds now.
    pub fn open(&self, key: &K) -> usize {
        self.map().get(key).map_or(0, |e| e.open)
    }
}

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut map = self
            .cap
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&self.key) {
            entry.open = entry.open.saturating_sub(1);
            if entry.open == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// The process-wide connection limit (`--max-connections`): accepted
/// sockets and the app connections a peer's tunnels open draw on it, so
/// that a few mesh connections carrying a thousand tunnels each cannot
/// take the descriptors the limit was sized to leave.
///
/// A counter of our own rather than tokio's `Semaphore`: its owned permit
/// is an `Arc` and a count (16 bytes), held by every open connection and
/// tunnel; [`Spent`] is the `Arc` alone (a tunnel's decision box stays in
/// its 192-byte class). Nothing waits on it: over the limit is refused.
#[derive(Debug)]
pub struct ConnectionBudget {
    left: AtomicUsize,
}

/// One connection's place under the [`ConnectionBudget`]; given back on
/// drop.
#[derive(Debug)]
pub struct Spent(Arc<ConnectionBudget>);

impl ConnectionBudget {
    /// A budget of `limit` connections at once.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(ConnectionBudget {
            left: AtomicUsize::new(limit),
        })
    }

    /// A place for one more connection, or `None` at the limit.
    pub fn try_spend(self: &Arc<Self>) -> Option<Spent> {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()
            .map(|_| Spent(self.clone()))
    }

    /// Places left now (a reading, which the next spend may change).
    pub fn left(&self) -> usize {
        self.left.load(Ordering::Acquire)
    }
}

impl Drop for Spent {
    fn drop(&mut self) {
        self.0.left.fetch_add(1, Ordering::AcqRel);
    }
}

/// One app connection's places under its key's cap and under the process's
/// [`ConnectionBudget`], given back on drop: what a tunnel and an HTTP/2
/// stream relayed to an HTTP/1 app each hold while their app connection
/// lasts.
#[derive(Debug)]
pub struct Places<K: Eq + Hash> {
    _slot: Option<Slot<K>>,
    _spent: Spent,
}

/// Which limit refused a connection its [`Places`].
#[derive(Debug, PartialEq, Eq)]
pub enum LimitReached {
    /// The key's cap (`--max-connections-per-peer`).
    Key(CapReached),
    /// The process's limit (`--max-connections`).
    Process,
}

impl<K: Eq + Hash + Clone> Places<K> {
    /// Both places, or which limit is reached: the key's first, so that a
    /// key over its cap takes no place under the process's limit from the
    /// others, even for a moment.
    pub fn take(
        cap: &Arc<PerKeyCap<K>>,
        budget: &Arc<ConnectionBudget>,
        key: &K,
    ) -> Result<Self, LimitReached> {
        let slot = cap.acquire(key).map_err(LimitReached::Key)?;
        let spent = budget.try_spend().ok_or(LimitReached::Process)?;
        Ok(Places {
            _slot: slot,
            _spent: spent,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn each_key_has_its_own_cap_and_slots_come_back() {
        let cap = PerKeyCap::new(2);
        let a1 = cap.acquire(&"a").unwrap();
        let _a2 = cap.acquire(&"a").unwrap();
        let refused = cap.acquire(&"a").unwrap_err();
        assert_eq!(
            refused,
            CapReached {
                limit: 2,
                log: true
            }
        );
        // Logged once a second, not once per refusal.
        assert!(!cap.acquire(&"a").unwrap_err().log);
        assert!(
            cap.acquire(&"b").unwrap().is_some(),
            "another key is not affected"
        );
        drop(a1);
        assert_eq!(cap.open(&"a"), 1);
        assert!(cap.acquire(&"a").is_ok());
    }

    #[test]
    fn zero_means_no_cap_and_keys_are_forgotten() {
        let cap = PerKeyCap::new(0);
        assert!(cap.acquire(&1).unwrap().is_none());
        let cap = PerKeyCap::new(1);
        drop(cap.acquire(&1).unwrap());
        assert!(
            cap.map().is_empty(),
            "a key with no connection holds no memory"
        );
    }

    #[test]
    fn the_budget_refuses_past_its_limit_and_takes_back_what_ends() {
        let budget = ConnectionBudget::new(2);
        let a = budget.try_spend();
        let b = budget.try_spend();
        assert!(a.is_some() && b.is_some());
        assert!(budget.try_spend().is_none(), "a third at a limit of two");
        drop(a);
        assert!(budget.try_spend().is_some(), "a place again once one ends");
    }

    #[test]
    fn places_are_taken_under_the_key_first_and_given_back_together() {
        let (cap, budget) = (PerKeyCap::new(1), ConnectionBudget::new(2));
        let held = Places::take(&cap, &budget, &"a").unwrap();
        let over = Places::take(&cap, &budget, &"a").unwrap_err();
        assert!(matches!(
            over,
            LimitReached::Key(CapReached { limit: 1, .. })
        ));
        assert_eq!(budget.left(), 1, "a key over its cap spends nothing");
        let other = Places::take(&cap, &budget, &"b").unwrap();
        assert_eq!(
            Places::take(&cap, &budget, &"c").unwrap_err(),
            LimitReached::Process
        );
        assert_eq!(cap.open(&"c"), 0, "refused by the process: no slot kept");
        drop((held, other));
        assert_eq!((budget.left(), cap.open(&"a")), (2, 0));
    }
}
