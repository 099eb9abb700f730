//! The GenAI semantic conventions' client metrics, as Prometheus histograms with the
//! conventions' bucket boundaries: `gen_ai.client.token.usage`, `gen_ai.client.operation.duration`
//! and, for streams, `gen_ai.client.operation.time_to_first_chunk`.
//!
//! One entry per (provider, operation, model, tenant label, error type), at most
//! [`super::MAX_MODELS`] models (then `other`) and at most [`MAX_SERIES`] entries: past that, a
//! new label set is counted in one overflow entry, `otel_metric_overflow="true"` (the OpenTelemetry
//! metrics SDK's cardinality limit), so that a scrape and an OTLP push stay small whatever labels
//! the traffic brings (an OTLP/gRPC collector takes 4 MiB per message by default). The model comes from the agent's request, so a name becomes a label only when
//! the provider answered it with success (an agent naming 256 models that do not exist would
//! otherwise take every slot, each 404 free of charge) and only when it looks like a model name
//! (at most [`MAX_MODEL_LABEL`] bytes of `A-Z a-z 0-9 . _ - : / @`); anything else is `other`.
//! Recording looks the entry up without allocating (a short linear scan under a
//! lock taken once per finished transaction, never per ext_proc message); only a new label set
//! allocates. A lock-free version (an `ArcSwap`ed list, atomic buckets and sums) measured slower
//! with the default single worker (micro `metrics/genai_call_known_labels` 130–138 ns against 100):
//! six atomic adds and the swap's own bookkeeping cost more than an uncontended lock's two.

use std::sync::Mutex;

/// `gen_ai.client.token.usage` boundaries.
pub const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];
/// `gen_ai.client.operation.duration` and time-to-first-chunk boundaries, in seconds.
pub const SECONDS_BUCKETS: [f64; 14] =
    [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];

#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Per bucket (not cumulative), then +Inf.
    counts: [u64; 15],
    sum: f64,
}

impl Histogram {
    fn record(&mut self, bounds: &[f64; 14], v: f64) {
        let i = bounds.iter().position(|b| v <= *b).unwrap_or(14);
        self.counts[i] += 1;
        self.sum += v;
    }

    fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

#[derive(Debug)]
struct Entry {
    /// The overflow entry: its labels say nothing but that.
    overflow: bool,
    provider: &'static str,
    operation: &'static str,
    model: Box<str>,
    tenant: Box<str>,
    error: u16,
    input: Histogram,
    output: Histogram,
    duration: Histogram,
    first_chunk: Histogram,
}

/// The longest model name kept as a label (longer ones are `other`).
pub const MAX_MODEL_LABEL: usize = 128;

/// Whether `model` may be a label value: short, and of the characters model names use.
fn label_worthy(model: &str) -> bool {
    model.len() <= MAX_MODEL_LABEL
        && model.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/' | b'@'))
}

/// The statuses `error.type` names; any other failure is [`OTHER_ERROR`] (`_OTHER`): the label
/// stays low-cardinality whatever status codes an upstream invents.
const ERROR_STATUSES: [u16; 14] = [400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504, 529];
const OTHER_ERROR: u16 = 1;

/// The `error` of an [`Observation`] for an answer with `status`.
pub fn error_type(status: Option<i64>) -> u16 {
    match status {
        Some(c) if c >= 400 => ERROR_STATUSES.into_iter().find(|s| i64::from(*s) == c).unwrap_or(OTHER_ERROR),
        _ => 0,
    }
}

/// What one finished transaction adds.
pub struct Observation<'a> {
    pub provider: &'static str,
    pub operation: &'static str,
    pub model: &'a str,
    /// The provider answered with success: `model` may become a new label.
    pub answered: bool,
    /// The upstream's status when it failed ([`error_type`]; `0`: none): the conventions'
    /// `error.type` on the duration histogram, so that failures are not averaged with successes.
    pub error: u16,
    /// The bounded tenant label (`""`: none).
    pub tenant: &'a str,
    /// Input and output tokens, each when the provider reported it (embeddings report input only).
    pub tokens: (Option<u64>, Option<u64>),
    pub duration_s: f64,
    /// Streams only.
    pub first_chunk_s: Option<f64>,
}

/// Label sets kept apart, at most; the rest share the overflow entry. About 1.6 KB each in an OTLP
/// push (four histograms), so a push stays well under a collector's 4 MiB.
pub const MAX_SERIES: usize = 1024;

#[derive(Debug, Default)]
pub struct GenAiMetrics {
    entries: Mutex<Series>,
}

#[derive(Debug, Default)]
struct Series {
    entries: Vec<Entry>,
    /// Distinct models among the entries' labels (`other` not counted).
    models: usize,
}

impl Entry {
    fn new(overflow: bool, o: &Observation<'_>, model: &str) -> Entry {
        Entry {
            overflow,
            provider: o.provider,
            operation: o.operation,
            model: model.into(),
            tenant: o.tenant.into(),
            error: o.error,
            input: Histogram::default(),
            output: Histogram::default(),
            duration: Histogram::default(),
            first_chunk: Histogram::default(),
        }
    }
}

impl Series {
    /// The entry `o` counts in, made if it may be.
    fn index(&mut self, o: &Observation<'_>) -> usize {
        let find = |entries: &[Entry], model: &str| {
            entries.iter().position(|e| {
                !e.overflow
                    && e.provider == o.provider
                    && e.operation == o.operation
                    && &*e.model == model
                    && &*e.tenant == o.tenant
                    && e.error == o.error
            })
        };
        if let Some(i) = find(&self.entries, o.model) {
            return i;
        }
        // A model already a label stays one (its failures under its name); a new one only when
        // the provider answered it.
        let known = self.entries.iter().any(|e| !e.overflow && &*e.model == o.model);
        let new = !known && o.answered && label_worthy(o.model) && self.models < super::MAX_MODELS;
        let model = if known || new { o.model } else { "other" };
        if let Some(i) = find(&self.entries, model) {
            return i;
        }
        if self.entries.len() < MAX_SERIES {
            self.models += usize::from(new);
            self.entries.push(Entry::new(false, o, model));
            return self.entries.len() - 1;
        }
        match self.entries.iter().position(|e| e.overflow) {
            Some(i) => i,
            None => {
                self.entries.push(Entry::new(true, o, "other"));
                self.entries.len() - 1
            }
        }
    }
}

impl GenAiMetrics {
    pub fn record(&self, o: &Observation<'_>) {
        let mut series = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let i = series.index(o);
        let e = &mut series.entries[i];
        if let Some(input) = o.tokens.0 {
            e.input.record(&TOKEN_BUCKETS, input as f64);
        }
        if let Some(output) = o.tokens.1 {
            e.output.record(&TOKEN_BUCKETS, output as f64);
        }
        e.duration.record(&SECONDS_BUCKETS, o.duration_s);
        if let Some(t) = o.first_chunk_s {
            e.first_chunk.record(&SECONDS_BUCKETS, t);
        }
    }

    /// The three histograms. The tenant label (`tenant`, as on keyswap's other families) only
    /// when `spec.agentAuth` names tenants.
    pub fn render(&self, p: &mut dyn crate::prom::Families) {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
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
            for e in entries.entries.iter() {
                let hists = pick(e);
                // Duration families have one histogram per entry (listed twice to share the shape).
                let hists: &[(Option<&str>, &Histogram)] = if hists[0].0.is_none() { &hists[..1] } else { &hists };
                for (token_type, h) in hists {
                    if h.count() == 0 {
                        continue;
                    }
                    if e.overflow {
                        let labels: &[(&str, &str)] = match token_type {
                            Some(t) => &[("otel_metric_overflow", "true"), ("gen_ai_token_type", t)],
                            None => &[("otel_metric_overflow", "true")],
                        };
                        p.histogram(name, labels, bounds, &h.counts, h.sum);
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
                    let code = match e.error {
                        0 => None,
                        OTHER_ERROR => Some("_OTHER".to_owned()),
                        c => Some(c.to_string()),
                    };
                    if let Some(code) = &code {
                        labels.push(("error_type", code));
                    }
                    p.histogram(name, &labels, bounds, &h.counts, h.sum);
                }
            }
        }
    }

    /// Token totals recorded for `provider` and `model` (input, output), for tests.
    pub fn tokens(&self, provider: &str, model: &str) -> Option<(u64, u64)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .entries
            .iter()
            .filter(|e| !e.overflow && e.provider == provider && &*e.model == model)
            .map(|e| (e.input.sum as u64, e.output.sum as u64))
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
                answered: true,
                error: 0,
                tenant: "",
                tokens: (tokens.map(|t| t.0), tokens.map(|t| t.1)),
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
        assert!(m.entries.lock().unwrap().entries.len() <= super::super::MAX_MODELS + 1);
    }

    /// The attack: a `custom` upstream that answers any model name, given 256 names, each failing
    /// in every way on every operation: some 15,000 label sets, an OTLP push of megabytes that a
    /// collector refuses whole (every family lost with it) and a /metrics page of tens of MB built
    /// under the lock the request path takes. Past [`MAX_SERIES`] they share one overflow series,
    /// and nothing is lost from the totals.
    #[test]
    fn an_agent_cannot_grow_the_genai_series_past_their_cap() {
        use prost::Message as _;
        let m = GenAiMetrics::default();
        let operations = ["chat", "embeddings", "generate_content", "text_completion"];
        let mut recorded = 0;
        for i in 0..super::super::MAX_MODELS {
            let model = format!("m{i}");
            for operation in operations {
                for error in std::iter::once(0).chain(ERROR_STATUSES).chain([OTHER_ERROR]) {
                    m.record(&Observation {
                        provider: "custom",
                        operation,
                        model: &model,
                        answered: true,
                        error,
                        tenant: "",
                        tokens: (Some(1), Some(1)),
                        duration_s: 0.1,
                        first_chunk_s: Some(0.01),
                    });
                    recorded += 1;
                }
            }
        }
        let (n, counted) = {
            let s = m.entries.lock().unwrap();
            (s.entries.len(), s.entries.iter().map(|e| e.duration.count()).sum::<u64>())
        };
        assert!(n <= MAX_SERIES + 1, "{n} label sets");
        assert_eq!(counted, recorded, "observations lost");
        let mut page = crate::prom::Page::new();
        m.render(&mut page);
        let out = page.finish();
        assert_eq!(crate::prom::lint(&out), Vec::<String>::new());
        let overflow = "gen_ai_client_operation_duration_seconds_count{otel_metric_overflow=\"true\"}";
        assert!(out.lines().any(|l| l.starts_with(overflow)), "no overflow series");
        assert!(out.len() < 16 << 20, "a /metrics page of {} bytes", out.len());
        let mut c =
            super::super::otlp_metrics::Collect::new(std::time::SystemTime::UNIX_EPOCH, std::time::SystemTime::now());
        m.render(&mut c);
        let push = c.request("keyswap", &[]).encode_to_vec().len();
        assert!(push < 2 << 20, "an OTLP push of {push} bytes");
    }

    /// The attack: models that do not exist (each a free 404), or names of 60 KB, to take the
    /// label slots or grow every scrape.
    #[test]
    fn models_the_provider_refused_or_that_are_no_model_name_never_become_labels() {
        let m = GenAiMetrics::default();
        let obs = |model: &'static str, answered: bool| Observation {
            provider: "openai",
            operation: "chat",
            model,
            answered,
            error: 0,
            tenant: "",
            tokens: (Some(1), Some(1)),
            duration_s: 0.1,
            first_chunk_s: None,
        };
        m.record(&obs("gpt-4o", true));
        // A known model's failures still count under its name.
        m.record(&obs("gpt-4o", false));
        for _ in 0..3 {
            m.record(&obs("no-such-model", false));
        }
        let huge: &'static str = "m".repeat(MAX_MODEL_LABEL + 1).leak();
        m.record(&obs(huge, true));
        m.record(&obs("gpt\"} 1\nevil", true));
        m.record(&obs("models/gemini-2.0-flash-001", true));
        let labels: Vec<String> = m.entries.lock().unwrap().entries.iter().map(|e| e.model.to_string()).collect();
        assert_eq!(labels, ["gpt-4o", "other", "models/gemini-2.0-flash-001"]);
        assert_eq!(m.entries.lock().unwrap().entries[0].duration.count(), 2);
        assert_eq!(m.entries.lock().unwrap().entries[1].duration.count(), 5);
    }

    /// Failed calls were averaged into the duration histogram with successes (no `error.type`),
    /// and an embeddings call, which reports input tokens only, recorded no tokens at all.
    #[test]
    fn failures_carry_their_error_type_and_embeddings_count_their_input_tokens() {
        let m = GenAiMetrics::default();
        let obs = |operation: &'static str, error: u16, tokens: (Option<u64>, Option<u64>)| Observation {
            provider: "openai",
            operation,
            model: "gpt-4o",
            answered: error == 0,
            error,
            tenant: "",
            tokens,
            duration_s: 0.1,
            first_chunk_s: None,
        };
        m.record(&obs("chat", 0, (Some(5), Some(7))));
        m.record(&obs("chat", 429, (None, None)));
        // A status an upstream invents is `_OTHER`, never a label value of its own.
        assert_eq!((error_type(Some(429)), error_type(Some(599)), error_type(Some(200))), (429, OTHER_ERROR, 0));
        m.record(&obs("chat", error_type(Some(777)), (None, None)));
        m.record(&obs("embeddings", 0, (Some(8), None)));
        let mut page = crate::prom::Page::new();
        m.render(&mut page);
        let out = page.finish();
        assert_eq!(crate::prom::lint(&out), Vec::<String>::new());
        let labels = |op: &str| {
            format!("gen_ai_operation_name=\"{op}\",gen_ai_provider_name=\"openai\",gen_ai_request_model=\"gpt-4o\"")
        };
        for line in [
            format!("gen_ai_client_operation_duration_seconds_count{{{}}} 1", labels("chat")),
            format!("gen_ai_client_operation_duration_seconds_count{{{},error_type=\"429\"}} 1", labels("chat")),
            format!("gen_ai_client_operation_duration_seconds_count{{{},error_type=\"_OTHER\"}} 1", labels("chat")),
            format!("gen_ai_client_token_usage_sum{{{},gen_ai_token_type=\"input\"}} 8", labels("embeddings")),
        ] {
            assert!(out.lines().any(|l| l == line), "missing `{line}` in\n{out}");
        }
        assert!(!out.contains(&format!("{},gen_ai_token_type=\"output\"", labels("embeddings"))), "{out}");
    }
}
