//! What a `jwt` validator remembers between requests: the tokens it verified, and the time its
//! failed signature checks took.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::vocab::Identity;

/// Verified tokens → (identity, `exp` + leeway in Unix seconds, JWKS generation). Bounded: full
/// means cleared. Locked only on JWT requests (one uncontended lock per request). With the rate
/// of the validator's failed signature checks.
#[derive(Default)]
pub struct VerifiedCache(pub(super) Mutex<HashMap<Box<[u8]>, Verified>>, pub(super) FailedChecks);

/// The share of the worker's time a validator's failed signature checks may take (one in
/// `FAILED_CHECK_SHARE`), in bursts of [`FAILED_CHECK_BURST_US`] of that accounting; past it,
/// tokens not verified before are refused unchecked until the time is paid off.
pub const FAILED_CHECK_SHARE: u64 = 5;
pub const FAILED_CHECK_BURST_US: u64 = 1_000_000;

/// The time a validator's failed signature checks took (GCRA over microseconds: one atomic, no
/// lock). A forged token of the right issuer, audience and `kid` costs one signature check (~240
/// µs for ES256 on keyswap's one worker, which every agent's requests share): a flood of them
/// would take the worker from everyone. Bounded, failed checks take at most a fifth of it (~830
/// ES256 checks a second; HS256 checks, microseconds each, are not held back in practice); tokens
/// verified before (the cache) are admitted throughout.
#[derive(Default)]
pub struct FailedChecks {
    /// When the failures so far are paid off, in microseconds of [`mono_us`].
    pub(super) paid_off_us: AtomicU64,
    /// When the last warning was logged.
    warned: crate::vocab::Seldom,
}

/// Microseconds since the first call: a monotonic clock as one number.
pub(super) fn mono_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

impl FailedChecks {
    pub(super) fn exhausted(&self, now: u64) -> bool {
        self.paid_off_us.load(Ordering::Relaxed) > now + FAILED_CHECK_BURST_US
    }

    /// A failed check that took `cost_us`, at `now`.
    pub(super) fn record(&self, now: u64, cost_us: u64) {
        let add = cost_us.max(1).saturating_mul(FAILED_CHECK_SHARE);
        let _ = self.paid_off_us.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some(p.max(now) + add));
    }

    /// Whether to log that checks are being skipped: once every 10 s at most.
    pub(super) fn warn_now(&self, now: u64) -> bool {
        self.warned.now(now / 1_000_000, 10)
    }
}

/// (identity, valid until in Unix seconds, JWKS generation it was verified under).
pub(super) type Verified = (Identity, u64, u64);

/// Verified tokens kept per validator.
pub const MAX_CACHED_TOKENS: usize = 10_000;

/// Room in a full cache, down to nine tenths of it: the entries no longer good (expired, or of
/// an older key set), then those of the agents holding the most. An agent that mints tokens at
/// will (client credentials) and fills the cache with its own loses its own entries, not every
/// agent's: clearing the whole cache had every other agent's token checked again (an ES256 check
/// each) every 10,000 of the flooder's tokens. O(n), once per tenth of the cache at most.
pub(super) fn make_room(cache: &mut HashMap<Box<[u8]>, Verified>, generation: u64) {
    let now = unix_now();
    cache.retain(|_, (_, until, g)| *g == generation && now <= *until);
    let target = MAX_CACHED_TOKENS * 9 / 10;
    if cache.len() <= target {
        return;
    }
    let who = |id: &Identity| (id.agent.clone(), id.tenant.clone());
    let mut held: HashMap<(Arc<str>, Option<Arc<str>>), usize> = HashMap::new();
    for (id, _, _) in cache.values() {
        *held.entry(who(id)).or_default() += 1;
    }
    let mut most: Vec<_> = held.into_iter().collect();
    most.sort_unstable_by_key(|m| std::cmp::Reverse(m.1));
    let mut excess = cache.len() - target;
    let mut evicted = std::collections::HashSet::new();
    for (agent, n) in most {
        if excess == 0 {
            break;
        }
        excess = excess.saturating_sub(n);
        evicted.insert(agent);
    }
    cache.retain(|_, (id, _, _)| !evicted.contains(&who(id)));
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
