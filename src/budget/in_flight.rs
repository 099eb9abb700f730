//! `limits.concurrentRequests`: the requests of one budget key in flight at once.
//!
//! Counted in this replica's memory whatever the budget's store: what requests in flight hold
//! is the replica's own (Envoy's buffers, its connections), and a count shared in Redis would
//! stay taken by a replica that died with requests open. A request takes its place when its
//! headers are decided, before Envoy reads its body, so an agent past its limit gets 429 before
//! it can make Envoy buffer anything; the place is given back when the request's stream ends.
//!
//! The map is read without a lock (an `ArcSwap`, copied only when a key first appears); idle
//! places are swept out then. A place taken in an entry a sweep just removed is given back and
//! taken again in the entry that replaced it, so two entries never split one key's count.

use std::collections::HashMap;
use std::hash::{BuildHasher as _, BuildHasherDefault, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::local::Prehashed;
use super::{Budget, Limited};

/// The dimension a refusal names.
pub const DIMENSION: &str = "concurrent_requests";

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
    pub fn enter(&self, budgets: &[Arc<Budget>], keys: &[Arc<str>]) -> Result<Places, Limited> {
        let mut places = Places::default();
        for (b, key) in budgets.iter().zip(keys) {
            let Some(limit) = b.concurrent else { continue };
            let hash = self.hasher.hash_one((&*b.name, &**key));
            loop {
                let slot = self.slot(hash, &b.name, key);
                match slot.n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)) {
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
                    Ok(_) if self.is_current(hash, &slot) => {
                        places.0.push(slot);
                        break;
                    }
                    // Swept out meanwhile: give it back, and take a place in its successor.
                    Ok(_) => {
                        slot.n.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            }
        }
        Ok(places)
    }

    /// How many requests of `budget`'s `key` are in flight (tests, `explain`).
    pub fn count(&self, budget: &str, key: &str) -> u64 {
        let slot = self.hasher.hash_one((budget, key));
        let map = self.slots.load();
        map.get(&slot)
            .and_then(|v| v.iter().find(|s| &*s.budget == budget && &*s.key == key))
            .map_or(0, |s| s.n.load(Ordering::Acquire))
    }

    fn is_current(&self, hash: u64, slot: &Arc<Slot>) -> bool {
        self.slots.load().get(&hash).is_some_and(|v| v.iter().any(|s| Arc::ptr_eq(s, slot)))
    }

    /// The slot of (`budget`, `key`) (whose hash is `hash`), made on first use; idle slots no request holds are swept
    /// out when the map is copied.
    fn slot(&self, hash: u64, budget: &Arc<str>, key: &Arc<str>) -> Arc<Slot> {
        let is = |s: &Slot| s.budget == *budget && s.key == *key;
        if let Some(found) = self.slots.load().get(&hash).and_then(|v| v.iter().find(|s| is(s))) {
            return found.clone();
        }
        let mut made = None;
        self.slots.rcu(|map| {
            let idle = |s: &Arc<Slot>| s.n.load(Ordering::Acquire) == 0 && Arc::strong_count(s) == 1;
            let mut map: Slots = map
                .iter()
                .map(|(k, v)| (*k, v.iter().filter(|s| is(s) || !idle(s)).cloned().collect::<Vec<_>>()))
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
