//! What the request path records in metrics allocates nothing: counters, the phase histogram,
//! agent admissions by tenant, per-budget counters, and the GenAI histograms for a label set seen
//! before; and comparing a query's parameter names with the credential names. Counted by a global
//! allocator in this test binary, for the counting thread only: the test harness's own threads
//! allocate now and then (a CI run saw 4 allocations that were not the code's). The time each
//! takes is in `benches/micro.rs` (`metrics/*`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use keyswap::auth::{Admission, TenantCounters};
use keyswap::telemetry::genai::Observation;
use keyswap::telemetry::{Metrics, Phase};
use keyswap::vocab::Identity;

thread_local! {
    // Const-initialised and without a destructor, so the allocator may read them. Per thread:
    // tests that run at once in one process (`cargo test`) count only their own.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    if COUNTING.with(Cell::get) {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
    }
}

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn recording_metrics_on_the_request_path_allocates_nothing() {
    let m = Metrics::default();
    let tenants = TenantCounters::new(&["team-a".to_owned()]);
    let identity = Identity {
        agent: "agent-1".into(),
        tenant: Some("team-a".into()),
        validator: "apiKeys".into(),
        role: None,
        labels: Vec::new(),
    };
    let budget = m.budgets.of(&Arc::from("default/daily"));
    let call = Observation {
        provider: "anthropic",
        operation: "chat",
        model: "claude-sonnet-4-5",
        answered: true,
        tenant: "team-a",
        error: 0,
        tokens: (Some(12), Some(700)),
        duration_s: 0.4,
        first_chunk_s: Some(0.05),
    };
    // The first call of a label set makes its entry (that allocates, once per label set).
    m.genai.record(&call);
    let admitted = Admission::Admitted(Cow::Borrowed(&identity));

    COUNTING.with(|c| c.set(true));
    for i in 0..10_000u64 {
        Metrics::inc(&m.requests);
        Metrics::inc(&m.injections);
        Metrics::add(&m.spans_exported, 1);
        m.observe(Phase::RequestHeaders, Duration::from_micros(20 + i % 100));
        m.observe(Phase::ResponseBody, Duration::from_micros(i));
        tenants.count(&admitted);
        Metrics::inc(&budget.admitted);
        Metrics::add(&budget.reserved_tokens, 4096);
        m.genai.record(&call);
    }
    COUNTING.with(|c| c.set(false));
    let allocated = ALLOCATIONS.with(Cell::get);
    assert_eq!(allocated, 0, "{allocated} allocations recording 10,000 requests' metrics");
    // And it was all recorded.
    assert_eq!(Metrics::get(&m.requests), 10_000);
    assert_eq!(m.genai.tokens("anthropic", "claude-sonnet-4-5"), Some((12 * 10_001, 700 * 10_001)));
    assert!(m
        .render(true)
        .contains("keyswap_budget_tokens_total{budget=\"default/daily\",kind=\"reserved\"} 40960000"));
}

#[test]
fn comparing_query_parameter_names_against_credential_names_allocates_nothing() {
    // Every parameter of a request with a query is compared with every credential name.
    let names = ["api_key", "KEY", "%6Bey", "key%00", "apiKey", "x+y", "%E2%82%AC", "%ff", "model", "key[]"];
    COUNTING.with(|c| c.set(true));
    let mut hits = 0;
    for _ in 0..1_000 {
        for n in names {
            hits += usize::from(keyswap::inject::query::names_param(n, "api-key"));
            hits += usize::from(keyswap::inject::query::names_param(n, "key"));
        }
    }
    COUNTING.with(|c| c.set(false));
    let allocated = ALLOCATIONS.with(Cell::get);
    assert_eq!(allocated, 0, "{allocated} allocations comparing 20,000 parameter names");
    // api_key and apiKey name api-key; KEY, %6Bey, key%00 and key[] name key.
    assert_eq!(hits, 6_000);
}
