//! Token budgets: admission before the provider, by reservation.
//!
//! A request on a route with [`Budget`]s reserves what it may cost before it is forwarded: one
//! request, its input tokens (bounded by its body's bytes, see [`Demand`]) and its output tokens
//! (its `max_tokens`, or the budget's default). The reservation is checked against every limit and
//! taken in one step; a request that does not fit is refused with 429 and never reaches the
//! provider. When the response ends, the reservation is settled to what the provider reported
//! ([`Held::settle`]); an error or aborted response releases what it did not use.
//!
//! Windows are fixed and aligned to UTC (a minute, hour, day or calendar month): one counter per
//! budget, key and window, which one Redis hash holds and `Retry-After` names the end of. A
//! sliding window would need one entry per request (or an approximation that blurs the bound
//! below); the price of fixed windows is that a key may spend its limit at the end of one window
//! and again at the start of the next.
//!
//! Worst-case overshoot: the sum over in-flight requests of what each used beyond its
//! reservation. With the defaults (input bounded by body bytes) and a `max_tokens` on every
//! request, that is zero; a request without one may overshoot by what it generates past
//! `reservation.defaultOutputTokens`, and one referring to input it does not carry (a stored
//! conversation, a file, a URL) by what that is worth past `reservation.referencedInputTokens`.
//! The body is read the way that counts most against the agent ([`Demand`]).
//!
//! Two stores behind [`Engine`]: in this process ([`local`], lock-free counters), or Redis
//! ([`redis`], shared by every replica; one round trip to reserve, one to settle).

mod demand;
mod held;
pub mod in_flight;
pub mod local;
mod metrics;
pub mod redis;

pub use demand::{Demand, StreamUsage};
use held::HeldIn;
pub use held::{Answered, Held, Observed};
pub use in_flight::Places;
pub use metrics::{BudgetMetrics, Cached, Registry};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;

use crate::api::{BudgetKey, BudgetWindow};
use crate::vocab::Identity;

/// Counter dimensions, in this order everywhere: requests, input, output, total tokens.
pub const DIMENSIONS: [&str; 4] = ["requests", "input_tokens", "output_tokens", "total_tokens"];

/// One amount per dimension.
pub type Amounts = [i64; 4];

/// A compiled `TokenBudget`.
#[derive(Clone, Debug)]
pub struct Budget {
    /// `namespace/name`.
    pub name: Arc<str>,
    pub key: KeyBy,
    pub window: BudgetWindow,
    /// Per dimension; `None`: not limited (still counted).
    pub limits: [Option<u64>; 4],
    /// `limits.concurrentRequests`: requests of one key in flight at once, on this replica.
    pub concurrent: Option<u64>,
    /// Model globs and their weight, first match wins.
    pub weights: Vec<(Box<str>, f64)>,
    pub default_output_tokens: u64,
    pub bytes_per_input_token: u64,
    /// Input tokens reserved per piece of input the body refers to ([`Demand::references`]).
    pub referenced_input_tokens: u64,
    /// The store cannot be reached: refuse (503) instead of admitting uncounted.
    pub fail_closed: bool,
    /// Refuse (403) requests that spend tokens out of keyswap's sight
    /// ([`crate::provider::Provider::unmetered`], a background response), when the budget
    /// limits tokens.
    pub refuse_unmetered: bool,
    /// The TokenBudget is invalid and left out of the configuration: its requests are refused
    /// (503) until it is fixed, rather than run without the limit. Why, for the answer.
    pub invalid: Option<Arc<str>>,
    /// Its metrics, once counted ([`Registry::of_budget`]).
    pub metrics: Cached,
}

/// Whose use a budget counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyBy {
    Tenant,
    Agent,
    Route,
    Gateway,
    Label(Box<str>),
}

impl KeyBy {
    pub fn of(key: BudgetKey, label: Option<&str>) -> KeyBy {
        match key {
            BudgetKey::Tenant => KeyBy::Tenant,
            BudgetKey::Agent => KeyBy::Agent,
            BudgetKey::Route => KeyBy::Route,
            BudgetKey::Gateway => KeyBy::Gateway,
            BudgetKey::Label => KeyBy::Label(label.unwrap_or_default().into()),
        }
    }

    /// The counter key of a request. Callers without one (anonymous callers of a tenant budget,
    /// an agent without the label) share the key `-`. A name that starts with `-` gets one more
    /// in front, so no identity (an agent named `-`) shares the anonymous callers' counter. An
    /// agent is counted as `validator/agent`: a JWT subject or an edge-trust header naming an
    /// API-key agent counts apart from it (validator names are unique and hold no `/`).
    pub fn value<'a>(&self, identity: Option<&'a Identity>, route: &'a str) -> std::borrow::Cow<'a, str> {
        if let (KeyBy::Agent, Some(i)) = (self, identity) {
            if !i.agent.is_empty() {
                let v = format!("{}/{}", i.validator, i.agent);
                return if v.starts_with('-') { format!("-{v}").into() } else { v.into() };
            }
        }
        let v = match self {
            KeyBy::Tenant => identity.and_then(|i| i.tenant.as_deref()),
            KeyBy::Agent => None,
            KeyBy::Route => Some(route),
            KeyBy::Gateway => Some("*"),
            KeyBy::Label(l) => identity.and_then(|i| i.labels.iter().find(|(k, _)| **k == **l)).map(|(_, v)| &**v),
        };
        match v.filter(|v| !v.is_empty()) {
            None => "-".into(),
            Some(v) if v.starts_with('-') => format!("-{v}").into(),
            Some(v) => v.into(),
        }
    }
}

/// The counter key of a request in each of `budgets`, in order ([`KeyBy::value`]).
pub fn keys(budgets: &[Arc<Budget>], identity: Option<&Identity>, route: &str) -> Vec<Arc<str>> {
    budgets.iter().map(|b| Arc::from(b.key.value(identity, route))).collect()
}

impl Budget {
    /// One line for `check` and `explain`: key, window, limits, reservation, fail mode.
    pub fn describe(&self) -> String {
        let names = ["requests", "inputTokens", "outputTokens", "totalTokens"];
        let mut limits: Vec<String> =
            names.iter().zip(self.limits).filter_map(|(n, l)| l.map(|l| format!("{n} {l}"))).collect();
        if let Some(n) = self.concurrent {
            limits.push(format!("concurrentRequests {n} at once (on each replica)"));
        }
        let key = match &self.key {
            KeyBy::Label(l) => format!("Label `{l}`"),
            k => format!("{k:?}"),
        };
        let weights = if self.weights.is_empty() {
            String::new()
        } else {
            let w: Vec<String> = self.weights.iter().map(|(g, w)| format!("{g} x{w}")).collect();
            format!(", weights {}", w.join(", "))
        };
        format!(
            "TokenBudget {}: per {key} per {:?} (UTC): {}{weights}; reserves max_tokens or {} output tokens, 1 input \
             token per {} body byte(s) and {} per referenced input; unmetered requests: {}; store unavailable: {}",
            self.name,
            self.window,
            limits.join(", "),
            self.default_output_tokens,
            self.bytes_per_input_token,
            self.referenced_input_tokens,
            if self.refuses_unmetered() { "Refuse (403)" } else { "Admit" },
            if self.fail_closed { "FailClosed (503)" } else { "FailOpen (admitted uncounted)" }
        )
    }

    /// The weight of `model`'s tokens (1 when no weight matches). A Bedrock model may be named
    /// through an inference profile (`us.anthropic.claude-…`, or its ARN): weighed as the
    /// heaviest of the name as written, the last part of an ARN, and that without its region
    /// prefix, so another name for the same model cannot dodge its weight.
    pub fn weight(&self, model: &str) -> f64 {
        let of = |m: &str| self.weights.iter().find(|(g, _)| crate::glob::matches(g, m, None)).map_or(1.0, |(_, w)| *w);
        if self.weights.is_empty() {
            return 1.0;
        }
        // An ARN names a model only as a Bedrock foundation model or a system inference profile
        // with its id; any other (an application inference profile, a provisioned, custom or
        // imported model, a prompt router, a managed prompt, a Marketplace endpoint, another
        // service's) names none, and the answer names none either: weighed as the heaviest
        // weight unless a glob names the ARN itself. (An ARN written unescaped in the path ends
        // at its resource type, without the id: it names none either.)
        let opaque = model.starts_with("arn:") && !names_a_model(model);
        // (A catch-all `*` names no ARN: only a glob written for ARNs does.)
        let named = |g: &str| g.starts_with("arn:") && crate::glob::matches(g, model, None);
        if opaque && !self.weights.iter().any(|(g, _)| named(g)) {
            return self.weights.iter().map(|(_, w)| *w).fold(1.0, f64::max);
        }
        let bare = model.rsplit('/').next().unwrap_or(model);
        let unprefixed = match bare.split_once('.') {
            Some((region, rest))
                if rest.contains('.')
                    && region.len() <= 7
                    && region.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') =>
            {
                rest
            }
            _ => bare,
        };
        of(model).max(of(bare)).max(of(unprefixed))
    }

    /// The weight of a request's tokens: its model's (1 when it names none); the heaviest of
    /// them when it names several, or of the whole table when it names more than are kept.
    pub fn weight_of(&self, demand: &Demand) -> f64 {
        if demand.models_overflow {
            return self.weights.iter().map(|(_, w)| *w).fold(1.0, f64::max);
        }
        demand.models.iter().map(|m| self.weight(m)).reduce(f64::max).unwrap_or(1.0)
    }

    /// This budget's claim on `demand` under counter `key`, in the window containing `now`.
    pub fn claim(self: &Arc<Self>, key: Arc<str>, demand: &Demand, now: SystemTime) -> Claim {
        let (window_start, window_end) = window_bounds(self.window, now);
        let weight = self.weight_of(demand);
        let reserved = self.reserve_amounts(demand);
        Claim { budget: self.clone(), key, window_start, window_end, reserved, weight }
    }

    /// Whether the budget limits tokens (else only requests: no body is read for it).
    pub fn counts_tokens(&self) -> bool {
        self.limits[1..].iter().any(Option::is_some)
    }

    /// Whether requests that spend tokens out of keyswap's sight are refused: the budget limits
    /// tokens and says `unmeteredRequests: Refuse` (the default).
    pub fn refuses_unmetered(&self) -> bool {
        self.refuse_unmetered && self.counts_tokens()
    }

    /// What `demand` reserves in this budget: one request and its weighted tokens (none when
    /// the budget limits only requests).
    pub fn reserve_amounts(&self, demand: &Demand) -> Amounts {
        if !self.counts_tokens() {
            return [1, 0, 0, 0];
        }
        let w = self.weight_of(demand);
        let carried = demand.body_bytes.div_ceil(self.bytes_per_input_token.max(1));
        let input = weighted(carried.saturating_add(demand.references.saturating_mul(self.referenced_input_tokens)), w);
        let output = weighted(demand.output_tokens(self.default_output_tokens), w);
        [1, input, output, input + output]
    }
}

/// The most one request reserves or settles in one dimension: 2^40, about 10^12 tokens, far
/// beyond any provider's output limit or context window. Counters of the dimensions a budget does
/// not limit still add up every request (and keep what calls without usage reserved); they
/// saturate at 2^62, in memory and in Redis, where an overflowing `HINCRBY` would fail the script
/// and read as the store being down.
pub const MAX_PER_REQUEST: i64 = 1 << 40;

/// Whether the ARN `arn` names a model: a Bedrock foundation model or a system inference profile
/// (`arn:PARTITION:bedrock:REGION:ACCOUNT:foundation-model/ID`, `…:inference-profile/ID`).
fn names_a_model(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [_, _, service, _, _, resource] = parts[..] else { return false };
    let id = resource.strip_prefix("foundation-model/").or_else(|| resource.strip_prefix("inference-profile/"));
    service == "bedrock" && id.is_some_and(|id| !id.is_empty())
}

fn weighted(tokens: u64, weight: f64) -> i64 {
    let v = (tokens as f64 * weight).ceil();
    if v >= MAX_PER_REQUEST as f64 {
        MAX_PER_REQUEST
    } else {
        v as i64
    }
}

/// The window containing `now`: its start and end, in Unix seconds (UTC).
pub fn window_bounds(window: BudgetWindow, now: SystemTime) -> (i64, i64) {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let fixed = |len: i64| {
        let start = secs - secs.rem_euclid(len);
        (start, start + len)
    };
    match window {
        BudgetWindow::Minute => fixed(60),
        BudgetWindow::Hour => fixed(3600),
        BudgetWindow::Day => fixed(86_400),
        BudgetWindow::Month => {
            let Ok(t) = time::OffsetDateTime::from_unix_timestamp(secs) else { return fixed(86_400) };
            let first = time::Date::from_calendar_date(t.year(), t.month(), 1).expect("day 1 exists");
            let next = match t.month() {
                time::Month::December => time::Date::from_calendar_date(t.year() + 1, time::Month::January, 1),
                m => time::Date::from_calendar_date(t.year(), m.next(), 1),
            }
            .expect("day 1 exists");
            let at = |d: time::Date| d.midnight().assume_utc().unix_timestamp();
            (at(first), at(next))
        }
    }
}

/// One budget's share of a request: which counter, and what was taken from it.
#[derive(Clone, Debug)]
pub struct Claim {
    pub budget: Arc<Budget>,
    /// The counter key (tenant, agent …), as given to the store.
    pub key: Arc<str>,
    pub window_start: i64,
    pub window_end: i64,
    pub reserved: Amounts,
    /// The weight of the request's tokens in this budget, decided when it was reserved.
    pub weight: f64,
}

/// A refusal: the first budget a request did not fit in.
#[derive(Debug)]
pub struct Limited {
    pub budget: Arc<str>,
    pub dimension: &'static str,
    pub limit: u64,
    pub used: i64,
    pub requested: i64,
    /// Seconds until the window ends.
    pub retry_after: u64,
}

/// The store could not answer.
#[derive(Debug)]
pub struct StoreDown {
    pub error: String,
}

/// The outcome of a reservation.
#[derive(Debug)]
pub enum Admit {
    /// Reserved: hold it until the response ends. `remaining`: the least any limit has left.
    Held(Held, Option<i64>),
    Limited(Limited),
    /// The store is down and a budget fails closed: refused (503).
    Unavailable {
        error: String,
        budgets: Vec<Arc<str>>,
    },
    /// The store is down and every budget fails open: admitted, counted nowhere.
    AdmittedUncounted(Held),
    /// A budget of the route is invalid: refused (503) until it is fixed.
    Invalid {
        budget: Arc<str>,
        why: Arc<str>,
    },
    /// The request would spend tokens the budget cannot count (`what`): refused (403).
    Unmetered {
        budget: Arc<str>,
        what: &'static str,
    },
    /// The body starts as a JSON object but cannot be read to its end (bytes that are not UTF-8,
    /// nesting deeper than serde_json reads and more lenient parsers accept, a body cut short): a
    /// limit after the point where reading stopped would go unseen, so a budget on tokens refuses
    /// it (400).
    Unreadable {
        budget: Arc<str>,
    },
}

/// Where budgets are counted: this process, or the gateway's Redis. Shared by every stream;
/// counters outlive configuration changes (a raised limit applies to what was already used).
pub struct Engine {
    local: local::Local,
    in_flight: Arc<in_flight::InFlight>,
    redis: ArcSwap<Option<Arc<redis::RedisStore>>>,
    metrics: Arc<Registry>,
    /// Settlements on their way to Redis (shutdown waits for them: [`Engine::settled`]).
    settling: crate::vocab::InFlight,
}

/// A settlement under way in the store, counted until it is dropped (answered, failed, or never
/// sent).
pub struct Settling(Arc<Engine>);

impl Settling {
    fn new(engine: &Arc<Engine>) -> Settling {
        engine.settling.enter();
        Settling(engine.clone())
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        self.0.settling.leave();
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// The outcome of [`Engine::reserve`]: now (in-process) or after one Redis round trip.
pub enum Reserve {
    Now(Admit),
    Later(BoxFuture<'static, Admit>),
}

impl Engine {
    /// Counts into `metrics` (the one `/metrics` renders).
    pub fn new(metrics: Arc<Registry>) -> Engine {
        let in_flight = Arc::new(in_flight::InFlight::default());
        metrics.show_in_flight(&in_flight);
        Engine {
            local: local::Local::default(),
            in_flight,
            redis: ArcSwap::from_pointee(None),
            metrics,
            settling: Default::default(),
        }
    }

    /// Waits (at shutdown) for the settlements on their way to Redis, each bounded by the
    /// store's timeout: whether they all finished. A reservation a replica could not settle
    /// before it exits would stay counted until its window ends.
    pub async fn settled(&self) -> bool {
        let pending = self.settling.count();
        if pending == 0 {
            return true;
        }
        tracing::debug!(pending, "waiting for budget settlements on their way to Redis");
        // A reservation whose script answers late is awaited up to LATE_ANSWER, then given back.
        self.settling.ended(tokio::time::Instant::now() + redis::LATE_ANSWER + redis::TIMEOUT).await
    }

    /// Takes the places of a request, under `keys`, in `budgets` that limit requests in flight
    /// ([`in_flight`]); a refusal is counted as limited.
    pub fn enter(&self, budgets: &[Arc<Budget>], keys: &[Arc<str>]) -> Result<Places, Limited> {
        self.in_flight.enter(budgets, keys).inspect_err(|l| self.inc(&l.budget, |m| &m.limited))
    }

    /// Adds one to `budget`'s `counter`.
    fn inc(&self, budget: &Arc<str>, counter: fn(&BudgetMetrics) -> &AtomicU64) {
        self.metrics.with(budget, |m| inc(counter(m)));
    }

    /// Reserves `claims` in the store the snapshot names (`store`: its `budgetStore`; `None`:
    /// this process).
    pub fn reserve(
        self: &Arc<Self>,
        store: Option<&Result<redis::RedisTarget, String>>,
        claims: Vec<Claim>,
        now: SystemTime,
    ) -> Reserve {
        if let Some(b) = claims.iter().map(|c| &c.budget).find(|b| b.invalid.is_some()) {
            let why = b.invalid.clone().unwrap_or_default();
            return Reserve::Now(self.count(Admit::Invalid { budget: b.name.clone(), why }));
        }
        let target = match store {
            None => {
                let admit = match self.local.reserve(&claims, now) {
                    Ok((counters, remaining)) => {
                        let on = HeldIn::Local(counters);
                        Admit::Held(Held { claims, on, engine: self.clone() }, remaining)
                    }
                    Err(l) => Admit::Limited(l),
                };
                return Reserve::Now(self.count(admit));
            }
            Some(Err(e)) => {
                let error = format!("the gateway's budgetStore is unusable: {e}");
                return Reserve::Now(self.count(self.unavailable(claims, error)));
            }
            Some(Ok(t)) => t,
        };
        let store = self.redis_for(target);
        let (engine, waited, kept) = (self.clone(), store.clone(), claims.clone());
        // A task of its own, not the stream's: the script is sent and will run even if no one
        // waits for it any more (the agent hung up, or the request stopped waiting after TIMEOUT
        // and followed its fail mode). Its answer is still awaited (up to LATE_ANSWER); a `Held`
        // no one takes is dropped in the task, giving the reservation back, where a future on the
        // stream would have been dropped mid-flight and left Redis holding it for the window.
        // Shutdown waits for the task as for a settlement.
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _under_way = Settling::new(&engine);
            let admit = match store.reserve(&claims, now).await {
                Ok(Ok(remaining)) => {
                    Admit::Held(Held { claims, on: HeldIn::Redis(store), engine: engine.clone() }, remaining)
                }
                Ok(Err(l)) => Admit::Limited(l),
                Err(e) => engine.unavailable(claims, e.error),
            };
            // Counted by whoever takes it (a request that stopped waiting was counted then); an
            // answer no one takes is dropped here, giving back what it reserved.
            let _ = tx.send(admit);
        });
        let engine = self.clone();
        Reserve::Later(Box::pin(async move {
            let error = match tokio::time::timeout(redis::TIMEOUT, rx).await {
                Ok(Ok(admit)) => return engine.count(admit),
                Ok(Err(_)) => "the budget reservation ended without an answer".to_owned(),
                Err(_) => waited.timed_out("reserving").error,
            };
            // No answer in time, or the task panicked: the budgets' fail mode decides.
            engine.count(engine.unavailable(kept, error))
        }))
    }

    /// The store could not answer: refused when any budget fails closed, else admitted uncounted.
    fn unavailable(self: &Arc<Self>, claims: Vec<Claim>, error: String) -> Admit {
        let budgets: Vec<Arc<str>> = claims.iter().map(|c| c.budget.name.clone()).collect();
        if claims.iter().any(|c| c.budget.fail_closed) {
            return Admit::Unavailable { error, budgets };
        }
        tracing::debug!(%error, budgets = ?budgets, "budget store unavailable; admitted uncounted (onStoreUnavailable: FailOpen)");
        Admit::AdmittedUncounted(Held { claims, on: HeldIn::Nothing, engine: self.clone() })
    }

    pub fn count(&self, admit: Admit) -> Admit {
        match &admit {
            Admit::Held(h, _) => {
                for c in &h.claims {
                    let m = self.metrics.of_budget(&c.budget);
                    inc(&m.admitted);
                    // Only what was taken: a refusal reserves nothing.
                    m.reserved_tokens.fetch_add(c.reserved[3] as u64, Ordering::Relaxed);
                }
            }
            Admit::Limited(l) => self.inc(&l.budget, |m| &m.limited),
            Admit::Unavailable { budgets, .. } => {
                for b in budgets {
                    self.inc(b, |m| &m.store_unavailable_refused);
                }
            }
            Admit::AdmittedUncounted(h) => {
                for c in &h.claims {
                    inc(&self.metrics.of_budget(&c.budget).store_unavailable_admitted);
                }
            }
            Admit::Invalid { budget, .. } => self.inc(budget, |m| &m.invalid),
            Admit::Unmetered { budget, .. } => self.inc(budget, |m| &m.unmetered),
            Admit::Unreadable { budget } => self.inc(budget, |m| &m.unreadable),
        }
        admit
    }

    /// The Redis client for `target`, made (without connecting) when its URL changes.
    fn redis_for(&self, target: &redis::RedisTarget) -> Arc<redis::RedisStore> {
        if let Some(s) = &**self.redis.load() {
            if s.fingerprint() == target.fingerprint() {
                return s.clone();
            }
        }
        let store = Arc::new(redis::RedisStore::new(target));
        self.redis.store(Arc::new(Some(store.clone())));
        store
    }
}

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests;
