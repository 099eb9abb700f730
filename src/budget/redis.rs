//! The Redis budget store: counters every replica of a gateway shares.
//!
//! One hash per budget, key and window (`keyswap:budget:{<ns/name>}:<window start>:<key>`, fields
//! `r i o t`), expiring an hour after its window ends. A reservation is one Lua script (check every
//! limit of every budget, then take; all or nothing): one round trip on the request path. A
//! settlement is one pipeline of `HINCRBY`s in a `MULTI`/`EXEC` transaction, sent off the response path.
//!
//! Unreachable Redis answers each request within [`TIMEOUT`]; after a failure the store is not
//! tried again for [`BACKOFF`] (requests follow their budgets' fail mode at once meanwhile).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret as _, SecretString};

use super::{Amounts, Claim, Limited, StoreDown, DIMENSIONS};

/// How long one Redis call may take before the request follows its fail mode.
pub const TIMEOUT: Duration = Duration::from_millis(500);
/// How long a reservation's answer is still awaited after its request stopped waiting (timed out,
/// or the agent hung up), so that what the script took is given back rather than held for the
/// window.
pub const LATE_ANSWER: Duration = Duration::from_secs(5);
/// After a failure, how long requests skip Redis (and follow their fail mode at once).
pub const BACKOFF: Duration = Duration::from_secs(1);
/// Counters outlive their window by this much (late settlements still land).
const EXPIRE_AFTER_WINDOW_SECS: i64 = 3600;

/// A gateway's Redis, as its Secret says (`spec.budgetStore.redis`). The URL may carry a
/// password: never shown, only its fingerprint.
#[derive(Clone)]
pub struct RedisTarget {
    pub url: SecretString,
    pub ca: Option<Vec<u8>>,
    /// The Secret it came from (`namespace/name`).
    pub secret: Arc<str>,
    fingerprint: String,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget").field("secret", &self.secret).field("url", &self.fingerprint).finish()
    }
}

impl RedisTarget {
    /// Checks that `url` is a Redis URL keyswap can use (`redis://`, `rediss://`, `unix://`).
    pub fn new(url: &str, ca: Option<Vec<u8>>, secret: Arc<str>) -> Result<RedisTarget, String> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        if !matches!(scheme, "redis" | "rediss" | "unix" | "redis+unix") {
            return Err(format!("is not a Redis URL (redis://, rediss:// or unix://); scheme `{scheme}`"));
        }
        if let Err(e) = ::redis::Client::open(url) {
            // Only the kind: the parser's detail could quote the URL, and its password.
            return Err(format!("is not a valid Redis URL ({:?})", e.kind()));
        }
        let mut seed = url.as_bytes().to_vec();
        seed.extend_from_slice(ca.as_deref().unwrap_or_default());
        Ok(RedisTarget { url: url.into(), ca, secret, fingerprint: crate::vocab::fingerprint(&seed) })
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Where it connects, without credentials: `host:port` (for logs).
    pub fn endpoint(&self) -> String {
        let url = self.url.expose_secret();
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        host.split('/').next().unwrap_or("").to_owned()
    }
}

/// A connection (made lazily, kept and reconnected by redis-rs) to one [`RedisTarget`]; replaced
/// by a new one when Redis stops answering on it.
pub struct RedisStore {
    fingerprint: String,
    endpoint: String,
    client: Result<::redis::Client, String>,
    conn: arc_swap::ArcSwap<Result<ConnectionManager, String>>,
    /// Milliseconds since `epoch` until which Redis is not tried (after a failure).
    down_until: AtomicU64,
    epoch: Instant,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

const RESERVE: &str = r#"
local fields = {'r', 'i', 'o', 't'}
local seen = {}
for k = 1, #KEYS do
  local b = (k - 1) * 9
  local used = redis.call('HMGET', KEYS[k], 'r', 'i', 'o', 't')
  seen[k] = used
  for d = 1, 4 do
    local limit = tonumber(ARGV[b + 1 + d])
    local u = tonumber(used[d]) or 0
    if limit >= 0 and u + tonumber(ARGV[b + 5 + d]) > limit then
      return {0, k - 1, d - 1, u}
    end
  end
end
-- A dimension no limit checks saturates at 2^62 instead of overflowing HINCRBY (an error that
-- would read as the store being down).
local ceiling = 4611686018427387904
local remaining, limited = 0, 0
for k = 1, #KEYS do
  local b = (k - 1) * 9
  for d = 1, 4 do
    local after
    if (tonumber(seen[k][d]) or 0) + tonumber(ARGV[b + 5 + d]) >= ceiling then
      redis.call('HSET', KEYS[k], fields[d], '4611686018427387904')
      after = ceiling
    else
      after = redis.call('HINCRBY', KEYS[k], fields[d], ARGV[b + 5 + d])
    end
    local limit = tonumber(ARGV[b + 1 + d])
    if d > 1 and limit >= 0 and (limited == 0 or limit - after < remaining) then
      remaining, limited = limit - after, 1
    end
  end
  redis.call('EXPIREAT', KEYS[k], ARGV[b + 1])
end
return {1, remaining, limited}
"#;

/// A settlement: each claim's four deltas, applied only to a counter Redis still holds (one it
/// lost, by a restart without persistence, a failover or eviction, would be re-created at minus
/// what was reserved, with no expiry: that much more for the window, and a key that never goes),
/// and never below zero. A key with an expiry (its fifth argument, not 0) takes a call's excess
/// in a later window than it was reserved in: made if need be, and expiring as the reserve
/// script's keys do. One script: all of the settlement or none.
const SETTLE: &str = r#"
local fields = {'r', 'i', 'o', 't'}
for k = 1, #KEYS do
  local expire_at = tonumber(ARGV[(k - 1) * 5 + 5])
  if expire_at > 0 or redis.call('EXISTS', KEYS[k]) == 1 then
    for d = 1, 4 do
      local v = tonumber(ARGV[(k - 1) * 5 + d])
      if v ~= 0 and redis.call('HINCRBY', KEYS[k], fields[d], v) < 0 then
        redis.call('HSET', KEYS[k], fields[d], 0)
      end
    end
    if expire_at > 0 then
      redis.call('EXPIREAT', KEYS[k], expire_at)
    end
  end
end
return 1
"#;

/// The Redis key of a claim's counter. A key longer than 128 bytes, with control characters or
/// spelled like a digest (`sha256:` first) is replaced by its whole SHA-256, so no key an agent
/// chooses can name another key's counter (with the 48-bit display fingerprint, one it could
/// search for).
pub fn counter_key(c: &Claim) -> String {
    let (name, start) = (&c.budget.name, c.window_start);
    if c.key.len() > 128 || c.key.chars().any(char::is_control) || c.key.starts_with(DIGEST_PREFIX) {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(c.key.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("keyswap:budget:{{{name}}}:{start}:{DIGEST_PREFIX}{hex}")
    } else {
        format!("keyswap:budget:{{{name}}}:{start}:{}", c.key)
    }
}

/// What a counter key replaced by its digest starts with.
const DIGEST_PREFIX: &str = "sha256:";

impl RedisStore {
    /// A client for `target`; connects on first use.
    pub fn new(target: &RedisTarget) -> RedisStore {
        let endpoint = target.endpoint();
        let client = client(target);
        let conn = arc_swap::ArcSwap::from_pointee(connection(&client));
        tracing::info!(endpoint, "token budgets are counted in Redis");
        RedisStore {
            fingerprint: target.fingerprint.clone(),
            endpoint,
            client,
            conn,
            down_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn available(&self) -> Result<ConnectionManager, StoreDown> {
        let conn = self.conn.load();
        let conn = conn.as_ref().as_ref().map_err(|e| StoreDown { error: e.clone() })?;
        if (self.epoch.elapsed().as_millis() as u64) < self.down_until.load(Ordering::Relaxed) {
            return Err(StoreDown { error: format!("Redis at {} failed less than {BACKOFF:?} ago", self.endpoint) });
        }
        Ok(conn.clone())
    }

    /// `what` got no answer in time: the store counts as down for [`BACKOFF`], and its connection
    /// is replaced. A Redis that went silent (its node gone, a failover behind the same name, a
    /// partition) sends no reset: redis-rs would keep waiting on the same socket until the kernel
    /// gave up on it, a quarter of an hour, and every budget followed its fail mode meanwhile.
    pub fn timed_out(&self, what: &str) -> StoreDown {
        // Once per outage, not once per request that waited on it (a burst times out together).
        let was_up = self.down_until.load(Ordering::Relaxed) <= self.epoch.elapsed().as_millis() as u64;
        let down = self.failed(what, &::redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)));
        if was_up {
            self.conn.store(Arc::new(connection(&self.client)));
        }
        down
    }

    fn failed(&self, what: &str, e: &::redis::RedisError) -> StoreDown {
        let until = (self.epoch.elapsed() + BACKOFF).as_millis() as u64;
        let was_up = self.down_until.swap(until, Ordering::Relaxed) < self.epoch.elapsed().as_millis() as u64;
        let error = format!("Redis at {}: {what}: {}", self.endpoint, describe(e));
        if was_up {
            tracing::error!(%error, "budget store unavailable; budgets follow onStoreUnavailable for the next {BACKOFF:?}");
        }
        StoreDown { error }
    }

    /// Reserves every claim in one script run. `Ok(Ok(remaining))`, `Ok(Err(limited))`, or the
    /// store could not answer within [`LATE_ANSWER`] (the request waits [`TIMEOUT`] of it:
    /// [`super::Engine::reserve`]).
    pub async fn reserve(&self, claims: &[Claim], now: SystemTime) -> Result<Result<Option<i64>, Limited>, StoreDown> {
        let mut conn = self.available()?;
        // Its SHA-1 computed once, not per request.
        static SCRIPT: std::sync::LazyLock<::redis::Script> =
            std::sync::LazyLock::new(|| ::redis::Script::new(RESERVE));
        let mut inv = SCRIPT.prepare_invoke();
        for c in claims {
            inv.key(counter_key(c));
            inv.arg(c.window_end + EXPIRE_AFTER_WINDOW_SECS);
            for l in c.budget.limits {
                inv.arg(l.map_or(-1, |l| l.min(i64::MAX as u64) as i64));
            }
            for a in c.reserved {
                inv.arg(a);
            }
        }
        let reply: Vec<i64> = match tokio::time::timeout(LATE_ANSWER, inv.invoke_async(&mut conn)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(self.failed("reserving", &e)),
            Err(_) => return Err(self.timed_out("reserving")),
        };
        match reply.as_slice() {
            [1, remaining, limited] => Ok(Ok((*limited == 1).then_some(*remaining))),
            [0, k, d, used] => {
                let (c, d) = (&claims[(*k as usize).min(claims.len() - 1)], (*d as usize).min(3));
                let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
                Ok(Err(Limited {
                    budget: c.budget.name.clone(),
                    dimension: DIMENSIONS[d],
                    limit: c.budget.limits[d].unwrap_or(0),
                    used: *used,
                    requested: c.reserved[d],
                    retry_after: (c.window_end - now_s).max(1) as u64,
                }))
            }
            other => Err(StoreDown { error: format!("unexpected reply from the reserve script: {other:?}") }),
        }
    }

    /// Adds each delta to its claim's counter, off the response path; a claim marked `true` (a
    /// later window's, taking a call's excess) has its counter made if need be.
    /// `settling` is held until the store answers (shutdown waits for it).
    pub fn settle(self: Arc<Self>, settle: &[(&Claim, Amounts, bool)], settling: super::Settling) {
        if settle.iter().all(|(_, d, _)| d.iter().all(|v| *v == 0)) {
            return;
        }
        static SCRIPT: std::sync::LazyLock<::redis::Script> = std::sync::LazyLock::new(|| ::redis::Script::new(SETTLE));
        // One script run, still one round trip: all of the settlement or none, never one
        // budget's share of it (or one counter of a budget's four).
        let mut inv = SCRIPT.prepare_invoke();
        for (c, d, make) in settle {
            inv.key(counter_key(c));
            for v in d {
                inv.arg(*v);
            }
            inv.arg(if *make { c.window_end + EXPIRE_AFTER_WINDOW_SECS } else { 0 });
        }
        // The current connection, even while reservations back off: a settlement only gives back.
        let Ok(mut conn) = self.conn.load().as_ref().clone() else { return };
        // A stream dropped outside the runtime (at shutdown) cannot settle: its reservation stands.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let _settling = settling;
            let r: Result<Result<i64, _>, _> = tokio::time::timeout(TIMEOUT, inv.invoke_async(&mut conn)).await;
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(endpoint = %self.endpoint, error = %describe(&e), "settling a budget reservation failed; the reservation stands");
                }
                Err(_) => {
                    tracing::warn!(endpoint = %self.endpoint, "settling a budget reservation timed out; the reservation stands")
                }
            }
        });
    }
}

/// A connection manager for `client`: it connects on first use (a new one, a new socket).
fn connection(client: &Result<::redis::Client, String>) -> Result<ConnectionManager, String> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        // A reservation's answer is awaited past the request's TIMEOUT (see LATE_ANSWER).
        .set_response_timeout(Some(LATE_ANSWER))
        .set_number_of_retries(1);
    let client = client.as_ref().map_err(Clone::clone)?;
    ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(|e| describe(&e))
}

fn client(target: &RedisTarget) -> Result<::redis::Client, String> {
    let url = target.url.expose_secret();
    let made = match &target.ca {
        Some(ca) => ::redis::Client::build_with_tls(
            url,
            ::redis::TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) },
        ),
        None => ::redis::Client::open(url),
    };
    made.map_err(|e| describe(&e))
}

/// A Redis error without anything that could quote the URL (and its password).
fn describe(e: &::redis::RedisError) -> String {
    let kind = format!("{:?}", e.kind());
    match e.detail() {
        Some(d) if !d.contains("://") => format!("{kind}: {d}"),
        _ if e.is_timeout() => format!("{kind}: timed out"),
        _ if e.is_connection_refusal() => format!("{kind}: connection refused"),
        _ if e.is_io_error() => format!("{kind}: I/O error"),
        _ => kind,
    }
}
