//! The in-process budget store: one set of atomic counters per budget, key and window.
//!
//! The map of counters is read without a lock (64 shards, each an `ArcSwap` of a hash map, a
//! shard copied only when a key first appears in it in a window); each limit is checked and taken
//! with a compare-and-swap, and the dimensions already taken are given back when a later one does
//! not fit. At most [`MAX_COUNTERS`] counters are held: keys come from agents' identities.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use super::{Amounts, Claim, Limited, DIMENSIONS};

/// Where a counter no limit checks stops growing: 2^62 (Redis's reserve script saturates there too).
const CEILING: i64 = 1 << 62;

/// The counters of one budget, key and window.
#[derive(Debug)]
pub struct Counter {
    budget: Arc<str>,
    key: Arc<str>,
    window_start: i64,
    window_end: i64,
    used: [AtomicI64; 4],
}

impl Counter {
    /// Adds `delta` (negative: gives back).
    pub fn add(&self, delta: &Amounts) {
        for (u, d) in self.used.iter().zip(delta) {
            if *d != 0 {
                u.fetch_add(*d, Ordering::AcqRel);
            }
        }
    }

    /// What has been used so far.
    pub fn used(&self) -> Amounts {
        std::array::from_fn(|d| self.used[d].load(Ordering::Acquire))
    }

    fn is(&self, c: &Claim) -> bool {
        *self.budget == *c.budget.name && self.key == c.key && self.window_start == c.window_start
    }

    /// Takes `amounts` if every limit allows it; else gives back what it took and says which
    /// dimension did not fit, with what was used.
    fn take(&self, limits: &[Option<u64>; 4], amounts: &Amounts) -> Result<Amounts, (usize, i64)> {
        let mut after = [0i64; 4];
        for d in 0..4 {
            let a = amounts[d];
            let r = match limits[d] {
                // No limit checks it: it saturates rather than overflow (as in Redis).
                None => Ok(self.used[d]
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| Some(u.saturating_add(a).min(CEILING)))
                    .unwrap_or_else(|u| u)),
                Some(limit) => self.used[d].fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                    (u.saturating_add(a) <= limit as i64).then_some(u + a)
                }),
            };
            match r {
                Ok(before) => after[d] = before.saturating_add(a).min(CEILING),
                Err(used) => {
                    for (undo, amount) in amounts.iter().enumerate().take(d) {
                        self.used[undo].fetch_sub(*amount, Ordering::AcqRel);
                    }
                    return Err((d, used));
                }
            }
        }
        Ok(after)
    }
}

/// How long a window's counters outlive its end. A request whose claims were made just before a
/// window ended (its body read on the blocking pool meanwhile) still finds its window's counter,
/// instead of a fresh one at zero made after another request swept the ended window out.
const SWEEP_GRACE_S: i64 = 60;

/// The most counters held at once (a counter is about 200 bytes and its key). Per-agent and
/// per-tenant budgets count keys an identity provider names: one that signs any subject or
/// tenant an agent asks for could otherwise grow the map, and the copy each new key costs, for the
/// whole window. A request needing a counter past this is refused (429, limit `keys`); Redis
/// holds counters without this bound.
pub const MAX_COUNTERS: usize = 1 << 17;

/// Shards of the map: a new key copies one shard, not every counter.
const SHARDS: usize = 64;

/// Counters by a hash of (budget, key, window start), keyed at random per process (keys may be
/// chosen by agents), sharded by that hash; each shard's map takes the hash as it is instead of
/// hashing it again.
pub struct Local {
    shards: Box<[ArcSwap<Slots>]>,
    hasher: RandomState,
    /// [`MAX_COUNTERS`] (smaller in tests).
    max: usize,
    /// When the store being full was last logged.
    full_warned: crate::vocab::Seldom,
}

impl Default for Local {
    fn default() -> Local {
        Local::with_max(MAX_COUNTERS)
    }
}

type Slots = HashMap<u64, Vec<Arc<Counter>>, BuildHasherDefault<Prehashed>>;

/// The hasher of a map whose keys are hashes already.
#[derive(Default)]
pub(super) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl Local {
    /// A store holding at most `max` counters.
    pub(super) fn with_max(max: usize) -> Local {
        let shards = (0..SHARDS).map(|_| ArcSwap::default()).collect();
        Local { shards, hasher: RandomState::new(), max, full_warned: Default::default() }
    }

    /// Reserves every claim, all or nothing; returns the counters (for settling) and the least
    /// any limit has left.
    pub fn reserve(&self, claims: &[Claim], now: SystemTime) -> Result<(Vec<Arc<Counter>>, Option<i64>), Limited> {
        let mut taken: Vec<Arc<Counter>> = Vec::with_capacity(claims.len());
        let mut remaining: Option<i64> = None;
        for c in claims {
            let Some(counter) = self.counter(c, now) else {
                for (t, claim) in taken.iter().zip(claims) {
                    t.add(&claim.reserved.map(|a| -a));
                }
                let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
                if self.full_warned.now(now_s as u64, 10) {
                    tracing::warn!(budget = %c.budget.name, max = self.max, "the in-process budget store holds as many counters as it may; requests needing a new one are refused (use Redis for more keys; logged at most every 10 s)");
                }
                return Err(Limited {
                    budget: c.budget.name.clone(),
                    dimension: "keys",
                    limit: self.max as u64,
                    used: self.max as i64,
                    requested: 1,
                    retry_after: (c.window_end - now_s).max(1) as u64,
                });
            };
            match counter.take(&c.budget.limits, &c.reserved) {
                Ok(after) => {
                    // Tokens left (requests are not tokens).
                    for (limit, used) in c.budget.limits.iter().zip(after).skip(1) {
                        if let Some(limit) = limit {
                            let left = *limit as i64 - used;
                            remaining = Some(remaining.map_or(left, |r| r.min(left)));
                        }
                    }
                    taken.push(counter);
                }
                Err((d, used)) => {
                    for (t, claim) in taken.iter().zip(claims) {
                        t.add(&claim.reserved.map(|a| -a));
                    }
                    let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
                    return Err(Limited {
                        budget: c.budget.name.clone(),
                        dimension: DIMENSIONS[d],
                        limit: c.budget.limits[d].unwrap_or(0),
                        used,
                        requested: c.reserved[d],
                        retry_after: (c.window_end - now_s).max(1) as u64,
                    });
                }
            }
        }
        Ok((taken, remaining))
    }

    /// The counter of `c`'s budget, key and window, made on first use (sweeping out of its shard
    /// windows that ended more than [`SWEEP_GRACE_S`] ago); `None` when its shard holds its share
    /// of [`MAX_COUNTERS`] already.
    pub(super) fn counter(&self, c: &Claim, now: SystemTime) -> Option<Arc<Counter>> {
        let slot = self.hasher.hash_one((&*c.budget.name, &*c.key, c.window_start));
        let shard = &self.shards[(slot >> 58) as usize % SHARDS];
        if let Some(found) = shard.load().get(&slot).and_then(|v| v.iter().find(|k| k.is(c))) {
            return Some(found.clone());
        }
        let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let mut made = None;
        shard.rcu(|map| {
            let mut map: Slots = map
                .iter()
                .map(|(k, v)| {
                    (*k, v.iter().filter(|c| c.window_end > now_s - SWEEP_GRACE_S).cloned().collect::<Vec<_>>())
                })
                .filter(|(_, v)| !v.is_empty())
                .collect();
            let full = map.values().map(Vec::len).sum::<usize>() >= self.max / SHARDS;
            let list = map.entry(slot).or_default();
            let counter = match list.iter().find(|k| k.is(c)) {
                Some(k) => Some(k.clone()),
                None if full => None,
                None => {
                    let k = Arc::new(Counter {
                        budget: c.budget.name.clone(),
                        key: c.key.clone(),
                        window_start: c.window_start,
                        window_end: c.window_end,
                        used: Default::default(),
                    });
                    list.push(k.clone());
                    Some(k)
                }
            };
            map.retain(|_, v| !v.is_empty());
            made = counter;
            map
        });
        made
    }

    /// What the counter of (budget, key, window start) has used (tests, `explain`).
    pub fn used(&self, budget: &str, key: &str, window_start: i64) -> Option<Amounts> {
        self.shards.iter().find_map(|shard| {
            let map = shard.load();
            map.values()
                .flatten()
                .find(|c| &*c.budget == budget && &*c.key == key && c.window_start == window_start)
                .map(|c| c.used())
        })
    }
}
