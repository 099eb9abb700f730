use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn budget(limits: [Option<u64>; 4]) -> Arc<Budget> {
    Arc::new(Budget {
        name: "default/team".into(),
        key: KeyBy::Tenant,
        window: BudgetWindow::Day,
        limits,
        weights: vec![("gpt-4o*".into(), 2.0)],
        default_output_tokens: 4096,
        bytes_per_input_token: 1,
        fail_closed: false,
        invalid: None,
    })
}

fn claim(b: &Arc<Budget>, key: &str, reserved: Amounts, now: SystemTime) -> Claim {
    let (window_start, window_end) = window_bounds(b.window, now);
    Claim { budget: b.clone(), key: key.into(), window_start, window_end, reserved }
}

#[test]
fn windows_are_fixed_and_aligned_to_utc() {
    // 2026-12-02T01:29:01Z
    let now = at(1_796_174_941);
    assert_eq!(window_bounds(BudgetWindow::Minute, now), (1_796_174_940, 1_796_175_000));
    assert_eq!(window_bounds(BudgetWindow::Hour, now), (1_796_173_200, 1_796_176_800));
    assert_eq!(window_bounds(BudgetWindow::Day, now), (1_796_169_600, 1_796_256_000));
    // December 2026 → January 2027.
    assert_eq!(window_bounds(BudgetWindow::Month, now), (1_796_083_200, 1_798_761_600));
    // February of a leap year: 29 days.
    let (s, e) = window_bounds(BudgetWindow::Month, at(1_709_251_200 - 1)); // 2024-02-29T23:59:59Z
    assert_eq!(e - s, 29 * 86_400);
}

#[test]
fn demand_reads_every_providers_output_limit_and_bounds_input_by_bytes() {
    let d = Demand::from_body(br#"{"model":"gpt-4o","max_tokens":100,"messages":[]}"#, None);
    assert_eq!((d.model.as_deref(), d.max_output_tokens, d.body_bytes), (Some("gpt-4o"), Some(100), 49));
    assert_eq!(Demand::from_body(br#"{"max_completion_tokens":7}"#, None).max_output_tokens, Some(7));
    assert_eq!(Demand::from_body(br#"{"max_output_tokens":8}"#, None).max_output_tokens, Some(8));
    assert_eq!(Demand::from_body(br#"{"generationConfig":{"maxOutputTokens":9}}"#, None).max_output_tokens, Some(9));
    assert_eq!(Demand::from_body(br#"{"inferenceConfig":{"maxTokens":10}}"#, None).max_output_tokens, Some(10));
    // Two names for the limit: the larger counts (the provider may honour either).
    assert_eq!(Demand::from_body(br#"{"max_tokens":5,"max_completion_tokens":50}"#, None).max_output_tokens, Some(50));
    let d = Demand::from_body(b"not json", Some("gemini-2.0-flash"));
    assert_eq!((d.model.as_deref(), d.max_output_tokens, d.body_bytes), (Some("gemini-2.0-flash"), None, 8));
    // No body, nothing generated.
    assert_eq!(Demand::from_body(b"", None).max_output_tokens, Some(0));
    // The model the path names wins over one the body claims (a cheaper weight).
    assert_eq!(Demand::from_body(br#"{"model":"cheap"}"#, Some("gemini-ultra")).model.as_deref(), Some("gemini-ultra"));
    // A limit of the wrong type is no limit: the budget's default applies.
    assert_eq!(Demand::from_body(br#"{"max_tokens":"100"}"#, None).max_output_tokens, None);
}

#[test]
fn reservations_are_weighted_by_model_and_default_when_the_request_sets_no_limit() {
    let b = budget([None, None, None, Some(1000)]);
    let d = Demand { model: Some("gpt-4o-mini".into()), max_output_tokens: Some(100), body_bytes: 30 };
    assert_eq!(b.reserve_amounts(&d), [1, 60, 200, 260]);
    let d = Demand { model: Some("claude".into()), max_output_tokens: None, body_bytes: 30 };
    assert_eq!(b.reserve_amounts(&d), [1, 30, 4096, 4126]);
    // A budget of requests only reserves (and reads) no tokens.
    let requests_only = Budget { limits: [Some(10), None, None, None], ..(*b).clone() };
    assert!(!requests_only.counts_tokens());
    assert_eq!(requests_only.reserve_amounts(&d), [1, 0, 0, 0]);
}

#[test]
fn a_reservation_that_does_not_fit_takes_nothing_from_any_budget() {
    let engine = Arc::new(Engine::new(Default::default()));
    let now = at(1_796_174_941);
    let roomy =
        Arc::new(Budget { name: "default/roomy".into(), ..(*budget([None, None, None, Some(10_000)])).clone() });
    let tight = budget([Some(5), None, None, Some(100)]);
    let claims = |n: i64| vec![claim(&roomy, "t", [1, n, 0, n], now), claim(&tight, "t", [1, n, 0, n], now)];
    let Reserve::Now(Admit::Held(h, remaining)) = engine.reserve(None, claims(60), None, now) else {
        panic!("admitted")
    };
    assert_eq!(remaining, Some(40));
    let Reserve::Now(Admit::Limited(l)) = engine.reserve(None, claims(60), None, now) else { panic!("limited") };
    assert_eq!((&*l.budget, l.dimension, l.limit, l.used, l.requested), ("default/team", "total_tokens", 100, 60, 60));
    assert_eq!(l.retry_after, 1_796_256_000 - 1_796_174_941);
    let start = window_bounds(BudgetWindow::Day, now).0;
    // The refused request left both budgets as they were.
    assert_eq!(engine.local.used("default/roomy", "t", start), Some([1, 60, 0, 60]));
    assert_eq!(engine.local.used("default/team", "t", start), Some([1, 60, 0, 60]));
    // Settling gives back what was not used.
    h.settle(Observed::Ended { success: true, input: Some(10), output: Some(0) });
    assert_eq!(engine.local.used("default/team", "t", start), Some([1, 10, 0, 10]));
    assert!(matches!(engine.reserve(None, claims(60), None, now), Reserve::Now(Admit::Held(..))));
}

#[test]
fn concurrent_reservations_never_exceed_the_limit() {
    let engine = Arc::new(Engine::new(Default::default()));
    let now = at(1_796_174_941);
    let b = budget([None, None, None, Some(1000)]);
    let admitted = std::sync::atomic::AtomicI64::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..100 {
                    if let Reserve::Now(Admit::Held(h, _)) =
                        engine.reserve(None, vec![claim(&b, "k", [1, 0, 7, 7], now)], None, now)
                    {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        std::mem::forget(h);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 1000 / 7);
    let start = window_bounds(BudgetWindow::Day, now).0;
    assert_eq!(engine.local.used("default/team", "k", start).unwrap()[3], (1000 / 7) * 7);
}

#[test]
fn keys_of_callers_without_one_share_a_counter() {
    let id = Identity {
        agent: "bot-1".into(),
        tenant: None,
        validator: "apiKeys".into(),
        role: None,
        labels: vec![("team".into(), "red".into())],
    };
    assert_eq!(KeyBy::Tenant.value(Some(&id), "default/r"), "-");
    assert_eq!(KeyBy::Agent.value(Some(&id), "default/r"), "bot-1");
    assert_eq!(KeyBy::Label("team".into()).value(Some(&id), "default/r"), "red");
    assert_eq!(KeyBy::Label("cost-center".into()).value(Some(&id), "default/r"), "-");
    assert_eq!(KeyBy::Route.value(None, "default/r"), "default/r");
    assert_eq!(KeyBy::Gateway.value(None, "default/r"), "*");
}

#[test]
fn settlement_counts_what_was_reported_and_keeps_the_reservation_only_when_nothing_was() {
    let engine = Arc::new(Engine::new(Default::default()));
    let now = at(1_796_174_941);
    let b = budget([None, None, None, None]);
    let start = window_bounds(BudgetWindow::Day, now).0;
    let settle = |key: &str, observed: Observed| {
        let Reserve::Now(Admit::Held(h, _)) =
            engine.reserve(None, vec![claim(&b, key, [1, 30, 4096, 4126], now)], None, now)
        else {
            panic!("admitted")
        };
        h.settle(observed);
        engine.local.used("default/team", key, start).unwrap()
    };
    // Embeddings: input reported, no output: the output reservation is released.
    assert_eq!(settle("embed", Observed::Ended { success: true, input: Some(10), output: None }), [1, 10, 0, 10]);
    // No usage at all on a success: the reservation stands.
    assert_eq!(settle("silent", Observed::Ended { success: true, input: None, output: None }), [1, 30, 4096, 4126]);
    // An error without usage generated nothing.
    assert_eq!(settle("error", Observed::Ended { success: false, input: None, output: None }), [1, 0, 0, 0]);
    // Cut off after 200 bytes: the input stands, output up to the bytes seen.
    assert_eq!(settle("cut", Observed::Aborted { input: None, output: None, response_bytes: 200 }), [1, 30, 200, 230]);
    // Dropped unsettled (never forwarded): everything released, the request too.
    let Reserve::Now(Admit::Held(h, _)) =
        engine.reserve(None, vec![claim(&b, "dropped", [1, 30, 4096, 4126], now)], None, now)
    else {
        panic!("admitted")
    };
    drop(h);
    assert_eq!(engine.local.used("default/team", "dropped", start), Some([0, 0, 0, 0]));
}
