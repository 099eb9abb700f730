//! What the request path records in metrics allocates nothing: counters, the phase histogram,
//! agent admissions by tenant, per-budget counters, and the GenAI histograms for a label set seen
//! before. Counted by a global allocator in this test binary, for the recording thread only: the
//! test harness's own threads allocate now and then (a CI run saw 4 allocations that were not the
//! code's). The time each takes is in `benches/micro.rs` (`metrics/*`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyswap::auth::{Admission, TenantCounters};
use keyswap::telemetry::genai::Observation;
use keyswap::telemetry::{Metrics, Phase};
use keyswap::vocab::Identity;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // Const-initialised and without a destructor, so the allocator may read it.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTING.with(Cell::get) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
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
        tokens: Some((12, 700)),
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
    let allocated = ALLOCATIONS.load(Ordering::Relaxed);
    assert_eq!(allocated, 0, "{allocated} allocations recording 10,000 requests' metrics");
    // And it was all recorded.
    assert_eq!(Metrics::get(&m.requests), 10_000);
    assert_eq!(m.genai.tokens("anthropic", "claude-sonnet-4-5"), Some((12 * 10_001, 700 * 10_001)));
    assert!(m
        .render(true)
        .contains("keyswap_budget_tokens_total{budget=\"default/daily\",kind=\"reserved\"} 40960000"));
}
