//! `limits.concurrentRequests`: the requests of one budget key in flight at once.
//!
//! Counted in this replica's memory whatever the budget's store: what requests in flight hold
//! is the replica's own (Envoy's buffers, its connections), and a count shared in Redis would
//! stay taken by a replica that died with requests open. A request takes its place when its
//! headers are decided, before Envoy reads its body, so an agent past its limit gets 429 before
//! it can make Envoy buffer anything; the place is given back when the request's stream ends.
//!
//! The map is read without a lock (an `ArcSwap`, copied only when a key first appears); idle
//! slots are swept out then. A slot is retired before it leaves the map (its count swapped from
//! zero to [`RETIRED`]), so a request that found it in a map being replaced cannot take a place
//! in it: it takes one in the slot that replaces it, and one key's count is never split.

use std::collections::HashMap;
use std::hash::{BuildHasher as _, BuildHasherDefault, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::local::Prehashed;
use super::{Budget, Limited};

/// The dimension a refusal names.
pub const DIMENSION: &str = "concurrent_requests";

/// The count of a slot swept out of the map: no place is taken in it any more.
const RETIRED: u64 = u64::MAX;

/// One budget key's requests in flight.
#[derive(Debug)]
pub struct Slot {
    budget: Arc<str>,
    key: Arc<str>,
    n: AtomicU64,
}

/// The places one request holds, given back when dropped (its stream ended).
#[derive(Debug, Default)]
pub struct Places(Vec<Arc<Slot>>);

impl Places {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether these are the places [`InFlight::enter`] takes for `budgets` under `keys`.
    pub fn is_for(&self, budgets: &[Arc<Budget>], keys: &[Arc<str>]) -> bool {
        let mut wanted = budgets.iter().zip(keys).filter(|(b, _)| b.concurrent.is_some() && b.invalid.is_none());
        self.0.iter().all(|s| wanted.next().is_some_and(|(b, k)| s.budget == b.name && s.key == *k))
            && wanted.next().is_none()
    }
}

impl Drop for Places {
    fn drop(&mut self) {
        for s in &self.0 {
            s.n.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

type Slots = HashMap<u64, Vec<Arc<Slot>>, BuildHasherDefault<Prehashed>>;

/// Requests in flight per budget and key, in this process.
#[derive(Default)]
pub struct InFlight {
    slots: ArcSwap<Slots>,
    hasher: RandomState,
}

impl InFlight {
    /// Takes a place in every budget of `budgets` with a concurrency limit, under its key in
    /// `keys` (same order); all or nothing: the first budget whose key is at its limit refuses.
    /// Invalid budgets take none (their requests are refused by the reservation, 503).
    pub fn enter(&self, budgets: &[Arc<Budget>], keys: &[Arc<str>]) -> Result<Places, Limited> {
        let mut places = Places::default();
        for (b, key) in budgets.iter().zip(keys) {
            let Some(limit) = b.concurrent.filter(|_| b.invalid.is_none()) else { continue };
            let hash = self.hasher.hash_one((&*b.name, &**key));
            loop {
                let slot = self.slot(hash, &b.name, key);
                // Not `then_some(n + 1)`: on a retired slot (u64::MAX) the sum would overflow.
                match slot.n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    if n < limit {
                        Some(n + 1)
                    } else {
                        None
                    }
                }) {
                    Ok(_) => {
                        places.0.push(slot);
                        break;
                    }
                    // Retired by a sweep meanwhile: its successor holds the key's count.
                    Err(RETIRED) => continue,
                    // `places` is dropped: what the other budgets gave is given back.
                    Err(n) => {
                        return Err(Limited {
                            budget: b.name.clone(),
                            dimension: DIMENSION,
                            limit,
                            used: n as i64,
                            requested: 1,
                            retry_after: 1,
                        })
                    }
                }
            }
        }
        Ok(places)
    }

    /// Requests holding a place, per budget (summed over its keys), by name: what `/metrics`
    /// shows. Read at scrape time, so taking a place counts nothing more.
    pub fn per_budget(&self) -> std::collections::BTreeMap<Arc<str>, u64> {
        let mut out = std::collections::BTreeMap::new();
        for s in self.slots.load().values().flatten() {
            let n = s.n.load(Ordering::Acquire);
            *out.entry(s.budget.clone()).or_default() += if n == RETIRED { 0 } else { n };
        }
        out
    }

    /// How many requests of `budget`'s `key` are in flight (tests).
    pub fn count(&self, budget: &str, key: &str) -> u64 {
        let slot = self.hasher.hash_one((budget, key));
        let map = self.slots.load();
        map.get(&slot)
            .and_then(|v| {
                v.iter()
                    .map(|s| (s, s.n.load(Ordering::Acquire)))
                    .find(|(s, n)| &*s.budget == budget && &*s.key == key && *n != RETIRED)
            })
            .map_or(0, |(_, n)| n)
    }

    /// The live slot of (`budget`, `key`) (whose hash is `hash`), made on first use; idle slots
    /// are retired and swept out when the map is copied.
    fn slot(&self, hash: u64, budget: &Arc<str>, key: &Arc<str>) -> Arc<Slot> {
        let is = |s: &Slot| s.budget == *budget && s.key == *key && s.n.load(Ordering::Acquire) != RETIRED;
        if let Some(found) = self.slots.load().get(&hash).and_then(|v| v.iter().find(|s| is(s))) {
            return found.clone();
        }
        let mut made = None;
        self.slots.rcu(|map| {
            // Kept: a slot some request holds, or the one this call looks for. Retiring fails
            // for a slot a request took a place in since it was read.
            let keep = |s: &Arc<Slot>| {
                (s.budget == *budget && s.key == *key)
                    || s.n.compare_exchange(0, RETIRED, Ordering::AcqRel, Ordering::Acquire).is_err()
            };
            let mut map: Slots = map
                .iter()
                .map(|(k, v)| {
                    (
                        *k,
                        v.iter()
                            .filter(|s| s.n.load(Ordering::Acquire) != RETIRED && keep(s))
                            .cloned()
                            .collect::<Vec<_>>(),
                    )
                })
                .filter(|(_, v)| !v.is_empty())
                .collect();
            let list = map.entry(hash).or_default();
            let slot = match list.iter().find(|s| is(s)) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(Slot { budget: budget.clone(), key: key.clone(), n: AtomicU64::new(0) });
                    list.push(s.clone());
                    s
                }
            };
            made = Some(slot);
            map
        });
        made.expect("rcu ran")
    }
}
