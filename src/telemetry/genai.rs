//! The GenAI semantic conventions' client metrics, as Prometheus histograms with the
//! conventions' bucket boundaries: `gen_ai.client.token.usage`, `gen_ai.client.operation.duration`
//! and, for streams, `gen_ai.client.operation.time_to_first_chunk`.
//!
//! One entry per (provider, operation, model, tenant label), at most [`super::MAX_MODELS`] models
//! (then `other`). Recording takes no lock and allocates nothing: the entries are an `ArcSwap`ed
//! list scanned linearly, their histograms atomic counters; only a new label set copies the list.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// `gen_ai.client.token.usage` boundaries.
pub const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];
/// `gen_ai.client.operation.duration` and time-to-first-chunk boundaries, in seconds.
pub const SECONDS_BUCKETS: [f64; 14] =
    [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];

#[derive(Debug, Default)]
struct Histogram {
    /// Per bucket (not cumulative), then +Inf.
    counts: [AtomicU64; 15],
    /// The sum's `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    fn record(&self, bounds: &[f64; 14], v: f64) {
        let i = bounds.iter().position(|b| v <= *b).unwrap_or(14);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + v).to_bits()));
    }

    fn counts(&self) -> [u64; 15] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }

    fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }
}

#[derive(Debug)]
struct Entry {
    provider: &'static str,
    operation: &'static str,
    model: Box<str>,
    tenant: Box<str>,
    input: Histogram,
    output: Histogram,
    duration: Histogram,
    first_chunk: Histogram,
}

impl Entry {
    fn is(&self, o: &Observation<'_>, model: &str) -> bool {
        self.provider == o.provider
            && self.operation == o.operation
            && *self.model == *model
            && *self.tenant == *o.tenant
    }
}

/// What one finished transaction adds.
pub struct Observation<'a> {
    pub provider: &'static str,
    pub operation: &'static str,
    pub model: &'a str,
    /// The bounded tenant label (`""`: none).
    pub tenant: &'a str,
    pub tokens: Option<(u64, u64)>,
    pub duration_s: f64,
    /// Streams only.
    pub first_chunk_s: Option<f64>,
}

#[derive(Debug, Default)]
pub struct GenAiMetrics {
    entries: ArcSwap<Vec<Arc<Entry>>>,
}

impl GenAiMetrics {
    pub fn record(&self, o: &Observation<'_>) {
        let entries = self.entries.load();
        let found = entries.iter().find(|e| e.is(o, o.model));
        let made;
        let e = match found {
            Some(e) => e,
            None => {
                made = self.entry(o);
                &made
            }
        };
        if let Some((input, output)) = o.tokens {
            e.input.record(&TOKEN_BUCKETS, input as f64);
            e.output.record(&TOKEN_BUCKETS, output as f64);
        }
        e.duration.record(&SECONDS_BUCKETS, o.duration_s);
        if let Some(t) = o.first_chunk_s {
            e.first_chunk.record(&SECONDS_BUCKETS, t);
        }
    }

    /// The entry of `o`'s labels, added when new (its model `other` once [`super::MAX_MODELS`]
    /// are listed).
    fn entry(&self, o: &Observation<'_>) -> Arc<Entry> {
        let mut made = None;
        self.entries.rcu(|entries| {
            let models = entries.iter().map(|e| &*e.model).collect::<std::collections::BTreeSet<_>>();
            let model = if models.len() >= super::MAX_MODELS && !models.contains(o.model) { "other" } else { o.model };
            if let Some(e) = entries.iter().find(|e| e.is(o, model)) {
                made = Some(e.clone());
                return Arc::clone(entries);
            }
            let e = Arc::new(Entry {
                provider: o.provider,
                operation: o.operation,
                model: model.into(),
                tenant: o.tenant.into(),
                input: Histogram::default(),
                output: Histogram::default(),
                duration: Histogram::default(),
                first_chunk: Histogram::default(),
            });
            made = Some(e.clone());
            let mut more = Vec::clone(entries);
            more.push(e);
            Arc::new(more)
        });
        made.expect("rcu ran")
    }

    /// The three histograms. The tenant label (`tenant`, as on keyswap's other families) only
    /// when `spec.agentAuth` names tenants.
    pub fn render(&self, p: &mut dyn crate::prom::Families) {
        let entries = self.entries.load();
        type Pick = fn(&Entry) -> [(Option<&'static str>, &Histogram); 2];
        let families: [(&str, &str, &[f64; 14], Pick); 3] = [
            (
                "gen_ai_client_token_usage",
                "Input and output tokens per operation, as the provider reported them.",
                &TOKEN_BUCKETS,
                |e| [(Some("input"), &e.input), (Some("output"), &e.output)],
            ),
            (
                "gen_ai_client_operation_duration_seconds",
                "Time from the request to the end of the response, through keyswap.",
                &SECONDS_BUCKETS,
                |e| [(None, &e.duration), (None, &e.duration)],
            ),
            (
                "gen_ai_client_operation_time_to_first_chunk_seconds",
                "Streams: time from the request to the first response chunk.",
                &SECONDS_BUCKETS,
                |e| [(None, &e.first_chunk), (None, &e.first_chunk)],
            ),
        ];
        for (name, help, bounds, pick) in families {
            p.family(name, help, crate::prom::Kind::Histogram);
            for e in entries.iter() {
                let hists = pick(e);
                // Duration families have one histogram per entry (listed twice to share the shape).
                let hists: &[(Option<&str>, &Histogram)] = if hists[0].0.is_none() { &hists[..1] } else { &hists };
                for (token_type, h) in hists {
                    let counts = h.counts();
                    if counts.iter().sum::<u64>() == 0 {
                        continue;
                    }
                    let mut labels = vec![
                        ("gen_ai_operation_name", e.operation),
                        ("gen_ai_provider_name", e.provider),
                        ("gen_ai_request_model", &*e.model),
                    ];
                    if !e.tenant.is_empty() {
                        labels.push(("tenant", &*e.tenant));
                    }
                    if let Some(t) = token_type {
                        labels.push(("gen_ai_token_type", t));
                    }
                    p.histogram(name, &labels, bounds, &counts, h.sum());
                }
            }
        }
    }

    /// Token totals recorded for `provider` and `model` (input, output), for tests.
    pub fn tokens(&self, provider: &str, model: &str) -> Option<(u64, u64)> {
        let entries = self.entries.load();
        entries
            .iter()
            .filter(|e| e.provider == provider && &*e.model == model)
            .map(|e| (e.input.sum() as u64, e.output.sum() as u64))
            .reduce(|a, b| (a.0 + b.0, a.1 + b.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_use_the_conventions_buckets_and_bound_the_models() {
        let m = GenAiMetrics::default();
        fn obs(model: &str, tokens: Option<(u64, u64)>, first: Option<f64>) -> Observation<'_> {
            Observation {
                provider: "anthropic",
                operation: "chat",
                model,
                tenant: "",
                tokens,
                duration_s: 0.3,
                first_chunk_s: first,
            }
        }
        m.record(&obs("claude", Some((12, 700)), None));
        m.record(&obs("claude", Some((3, 5)), Some(0.05)));
        let mut page = crate::prom::Page::new();
        m.render(&mut page);
        let out = page.finish();
        assert_eq!(crate::prom::lint(&out), Vec::<String>::new());
        let labels =
            "gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"anthropic\",gen_ai_request_model=\"claude\"";
        for line in [
            format!("gen_ai_client_token_usage_bucket{{{labels},gen_ai_token_type=\"output\",le=\"16\"}} 1"),
            format!("gen_ai_client_token_usage_bucket{{{labels},gen_ai_token_type=\"output\",le=\"1024\"}} 2"),
            format!("gen_ai_client_token_usage_sum{{{labels},gen_ai_token_type=\"input\"}} 15"),
            format!("gen_ai_client_operation_duration_seconds_bucket{{{labels},le=\"0.32\"}} 2"),
            format!("gen_ai_client_operation_duration_seconds_count{{{labels}}} 2"),
            format!("gen_ai_client_operation_time_to_first_chunk_seconds_count{{{labels}}} 1"),
        ] {
            assert!(out.lines().any(|l| l == line), "missing `{line}` in\n{out}");
        }
        for i in 0..super::super::MAX_MODELS + 10 {
            m.record(&obs(&format!("m{i}"), Some((1, 1)), None));
        }
        assert!(m.tokens("anthropic", "other").is_some());
        assert!(m.entries.load().len() <= super::super::MAX_MODELS + 1);
    }

    #[test]
    fn concurrent_first_records_of_the_same_labels_make_one_entry_and_lose_no_count() {
        let m = GenAiMetrics::default();
        let threads = 8;
        let per = 2_000u64;
        std::thread::scope(|scope| {
            for t in 0..threads {
                let m = &m;
                scope.spawn(move || {
                    for i in 0..per {
                        // Every thread races to add the same new label sets first.
                        let model = format!("model-{}", i % 5);
                        let tenant = if (i + t) % 2 == 0 { "acme" } else { "" };
                        m.record(&Observation {
                            provider: "openai",
                            operation: "chat",
                            model: &model,
                            tenant,
                            tokens: Some((1, 2)),
                            duration_s: 0.5,
                            first_chunk_s: None,
                        });
                    }
                });
            }
        });
        let entries = m.entries.load();
        assert_eq!(entries.len(), 10, "one entry per label set: {entries:?}");
        // A thread that lost the race to add its labels finds the winner's entry when it adds.
        let o = Observation {
            provider: "openai",
            operation: "chat",
            model: "model-0",
            tenant: "acme",
            tokens: None,
            duration_s: 0.0,
            first_chunk_s: None,
        };
        assert!(Arc::ptr_eq(&m.entry(&o), entries.iter().find(|e| e.is(&o, "model-0")).unwrap()));
        assert_eq!(m.entries.load().len(), 10);
        let total: u64 = entries.iter().map(|e| e.duration.counts().iter().sum::<u64>()).sum();
        assert_eq!(total, threads * per);
        let (input, output) = (0..5)
            .map(|i| m.tokens("openai", &format!("model-{i}")).unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        assert_eq!((input, output), (threads * per, 2 * threads * per), "sums lose nothing under contention");
    }
}
