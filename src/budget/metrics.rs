//! Per-budget counters for `/metrics`: labels are budget names only, bounded by configuration.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

/// Per-budget counts for `/metrics` (labels: budget names only, bounded by configuration).
#[derive(Debug, Default)]
pub struct BudgetMetrics {
    pub admitted: AtomicU64,
    pub limited: AtomicU64,
    pub store_unavailable_admitted: AtomicU64,
    pub store_unavailable_refused: AtomicU64,
    pub invalid: AtomicU64,
    pub unmetered: AtomicU64,
    pub unreadable: AtomicU64,
    pub reserved_tokens: AtomicU64,
    pub settled_tokens: AtomicU64,
}

/// A budget's metrics, found in the [`Registry`] on first use and kept: the request path then
/// hashes no name and loads no map. A clone starts empty (its copy may be renamed).
#[derive(Default)]
pub struct Cached(OnceLock<Arc<BudgetMetrics>>);

impl Clone for Cached {
    fn clone(&self) -> Cached {
        Cached::default()
    }
}

impl std::fmt::Debug for Cached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "Cached" } else { "Cached(empty)" })
    }
}

/// Per-budget metrics, by budget name (bounded by configuration), and the requests in flight
/// of the engine counting into it.
#[derive(Default)]
pub struct Registry(ArcSwap<HashMap<Arc<str>, Arc<BudgetMetrics>>>, OnceLock<Arc<super::in_flight::InFlight>>);

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("budgets", &self.0.load().len()).finish()
    }
}

impl Registry {
    /// Shows `in_flight`'s requests per budget as a gauge (the first engine's: one per process).
    pub fn show_in_flight(&self, in_flight: &Arc<super::in_flight::InFlight>) {
        let _ = self.1.set(in_flight.clone());
    }

    /// The metrics of `budget`, made on first use.
    pub fn of(&self, budget: &Arc<str>) -> Arc<BudgetMetrics> {
        if let Some(m) = self.0.load().get(budget) {
            return m.clone();
        }
        let mut made = None;
        self.0.rcu(|map| {
            let mut map = HashMap::clone(map);
            made = Some(map.entry(budget.clone()).or_default().clone());
            map
        });
        made.expect("rcu ran")
    }

    /// The metrics of `budget`, through its cache: one registry per process, so the first
    /// registry asked is the one kept.
    pub fn of_budget<'a>(&self, budget: &'a super::Budget) -> &'a BudgetMetrics {
        budget.metrics.0.get_or_init(|| self.of(&budget.name))
    }

    /// `f` on the metrics of `budget` (made on first use), borrowed: no reference count is
    /// touched on the request path (every request of a budget would contend for it).
    pub fn with<R>(&self, budget: &Arc<str>, f: impl FnOnce(&BudgetMetrics) -> R) -> R {
        if let Some(m) = self.0.load().get(budget) {
            return f(m);
        }
        f(&self.of(budget))
    }

    /// One family per measure, one sample per budget.
    pub fn render(&self, p: &mut dyn crate::prom::Families) {
        use crate::prom::Kind::Counter;
        self.render_in_flight(p);
        let map = self.0.load();
        if map.is_empty() {
            return;
        }
        let mut all: Vec<_> = map.iter().collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        const DECISIONS: &str = "keyswap_budget_decisions_total";
        p.family(DECISIONS, "Budgeted requests by decision.", Counter);
        for (name, m) in &all {
            for (decision, v) in [
                ("admitted", g(&m.admitted)),
                ("limited", g(&m.limited)),
                ("store_unavailable_admitted", g(&m.store_unavailable_admitted)),
                ("store_unavailable_refused", g(&m.store_unavailable_refused)),
                ("invalid", g(&m.invalid)),
                ("unmetered", g(&m.unmetered)),
                ("unreadable", g(&m.unreadable)),
            ] {
                p.sample(DECISIONS, &[("budget", name), ("decision", decision)], v);
            }
        }
        const TOKENS: &str = "keyswap_budget_tokens_total";
        p.family(TOKENS, "Weighted tokens reserved before forwarding and settled after the response.", Counter);
        for (name, m) in &all {
            for (kind, v) in [("reserved", g(&m.reserved_tokens)), ("settled", g(&m.settled_tokens))] {
                p.sample(TOKENS, &[("budget", name), ("kind", kind)], v);
            }
        }
    }

    fn render_in_flight(&self, p: &mut dyn crate::prom::Families) {
        let Some(in_flight) = self.1.get() else { return };
        let per_budget = in_flight.per_budget();
        if per_budget.is_empty() {
            return;
        }
        const IN_FLIGHT: &str = "keyswap_budget_requests_in_flight";
        p.family(
            IN_FLIGHT,
            "Requests holding a place under a budget's limits.concurrentRequests, summed over its keys.",
            crate::prom::Kind::Gauge,
        );
        for (name, n) in &per_budget {
            p.sample(IN_FLIGHT, &[("budget", name)], *n as f64);
        }
    }
}
