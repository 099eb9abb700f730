//! Telemetry: per-transaction spans exported over OTLP off the request path, body capture with
//! secrets scrubbed, and the counters behind `/metrics`.

pub mod admin;
pub mod capture;
pub mod content;
pub mod export;
pub mod genai;
pub mod otlp;
pub mod otlp_metrics;
mod queue;
pub mod sample;
mod settings;
pub mod span;
pub mod trace_context;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::prom;
use std::time::Duration;

/// Distinct (provider, model) pairs kept in token metrics; further models count as "other".
pub const MAX_MODELS: usize = 256;

/// The most bytes of finished spans that wait for the exporter: spans with captured bodies run to
/// hundreds of KB, so a queue of 4,096 of them behind a dead collector would hold gigabytes.
pub const MAX_QUEUED_SPAN_BYTES: u64 = 64 << 20;

/// Upper bounds of the phase-latency histogram buckets, in microseconds.
const BUCKETS_US: [u64; 11] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    Trailers,
}

const PHASES: [(Phase, &str); 5] = [
    (Phase::RequestHeaders, "request_headers"),
    (Phase::RequestBody, "request_body"),
    (Phase::ResponseHeaders, "response_headers"),
    (Phase::ResponseBody, "response_body"),
    (Phase::Trailers, "trailers"),
];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// Counters the request path bumps without locks.
#[derive(Debug, Default)]
pub struct Metrics {
    /// ext_proc streams that reached the request-headers phase.
    pub requests: AtomicU64,
    pub injections: AtomicU64,
    /// 403: no route on a deny-all gateway.
    pub denied_no_route: AtomicU64,
    /// 503: matched route, credential missing.
    pub denied_credential_unavailable: AtomicU64,
    /// 401: `spec.agentAuth` admitted no validator for the caller.
    pub denied_unauthenticated: AtomicU64,
    /// 403: the caller's tenant has no key on a `fallback: Deny` policy.
    pub denied_tenant_not_mapped: AtomicU64,
    /// 413: a body too large to sign (SigV4).
    pub denied_too_large: AtomicU64,
    /// 415: a compressed body on a route whose token budgets read it.
    pub denied_encoded_body: AtomicU64,
    /// 400: an authority that is not a plain `host[:port]`.
    pub denied_malformed_authority: AtomicU64,
    /// 400: a path with dot-segments, backslashes, double encoding or control characters.
    pub denied_malformed_path: AtomicU64,
    /// 405: a method no provider uses (TRACE, …).
    pub denied_method: AtomicU64,
    /// Requests passed through untouched (allow-all or allow-list).
    pub passed_through: AtomicU64,
    /// CONNECT tunnels to unrouted hosts the tunnel guard let through (pinned to a public address).
    pub tunnels_allowed: AtomicU64,
    /// CONNECT tunnels the tunnel guard refused (private destination, not allowed, malformed).
    pub tunnels_refused: AtomicU64,
    /// Requests where the agent sent a credential of its own (stripped either way).
    pub smuggle_attempts: AtomicU64,
    /// Responses whose headers carried a live secret value (scrubbed before the agent saw them).
    pub secrets_scrubbed_from_responses: AtomicU64,
    /// Streams ended with an error status because a message broke the protocol.
    pub protocol_errors: AtomicU64,
    /// Invalid objects (or documents) left out of the configuration in effect (a gauge).
    pub config_rejected: AtomicU64,
    pub spans_exported: AtomicU64,
    /// Spans dropped because the export queue was full (collector slow or down).
    pub spans_dropped: AtomicU64,
    /// Bytes of the spans waiting in the export queue (bounded by [`MAX_QUEUED_SPAN_BYTES`]).
    pub span_queue_bytes: AtomicU64,
    /// Spans lost because the collector refused them or did not answer in time.
    pub spans_export_failed: AtomicU64,
    /// OTLP metrics pushes that failed (`OTEL_METRICS_EXPORTER=otlp`).
    pub metric_exports_failed: AtomicU64,
    /// Response bodies read on the observing stream: to the end, cut off, and never arrived (the
    /// transaction was handed off but no observing stream claimed it).
    pub observed_ended: AtomicU64,
    pub observed_cut_off: AtomicU64,
    pub observed_never_arrived: AtomicU64,
    phases: [Histogram; 5],
    /// keyswap as Envoy's control plane (zero when Envoy does not use its ADS).
    pub xds: Arc<XdsStats>,
    /// Per-budget admissions and tokens (`TokenBudget`).
    pub budgets: Arc<crate::budget::Registry>,
    /// The GenAI conventions' client histograms (tokens, duration, time to first chunk), touched
    /// once per finished LLM call. The tenant label is "" without `spec.agentAuth`, else bounded
    /// (`metricsTenants` or "other").
    pub genai: genai::GenAiMetrics,
}

/// The ADS server and the leaf it serves.
#[derive(Debug, Default)]
pub struct XdsStats {
    /// Envoy streams open now.
    pub streams: AtomicU64,
    /// Responses sent.
    pub pushes: AtomicU64,
    /// Responses Envoy refused (NACK): it keeps its last good resources of that type.
    pub rejected: AtomicU64,
    /// Leaves minted.
    pub leaf_mints: AtomicU64,
    /// When the leaf being served expires (Unix seconds; 0 before the first).
    pub leaf_not_after: AtomicU64,
}

impl Metrics {
    /// `span` left the export queue (the exporter took it): its bytes no longer count against
    /// [`MAX_QUEUED_SPAN_BYTES`].
    pub fn left_queue(&self, span: &[u8]) {
        let len = span.len() as u64;
        let _ =
            self.span_queue_bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(len)));
    }

    /// The denial counter of a refused request target.
    pub fn refused(&self, r: crate::target::Refused) -> &AtomicU64 {
        match r {
            crate::target::Refused::MalformedAuthority => &self.denied_malformed_authority,
            crate::target::Refused::MalformedPath => &self.denied_malformed_path,
            crate::target::Refused::MethodNotAllowed => &self.denied_method,
        }
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn observe(&self, phase: Phase, took: Duration) {
        let i = PHASES.iter().position(|(p, _)| *p == phase).unwrap_or(0);
        let h = &self.phases[i];
        let us = took.as_micros() as u64;
        if let Some(b) = BUCKETS_US.iter().position(|&b| us <= b) {
            h.buckets[b].fetch_add(1, Ordering::Relaxed);
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Token totals recorded for `provider` and `model` (input, output).
    pub fn tokens(&self, provider: &str, model: &str) -> Option<(u64, u64)> {
        self.genai.tokens(provider, model)
    }

    /// Prometheus text exposition.
    pub fn render(&self, ready: bool) -> String {
        self.render_with(ready, |_| {})
    }

    /// [`Metrics::render`], with a configuration source's own families (`extra`, written first).
    pub fn render_with(&self, ready: bool, extra: impl FnOnce(&mut dyn prom::Families)) -> String {
        let mut page = prom::Page::new();
        self.write(&mut page, ready, extra);
        page.finish()
    }

    /// Every family of the registry, into `p` (the `/metrics` page, or an OTLP export).
    pub fn write(&self, p: &mut dyn prom::Families, ready: bool, extra: impl FnOnce(&mut dyn prom::Families)) {
        // The source's families first: they may update gauges written below.
        extra(&mut *p);
        self.write_counters(p);
        p.single(
            "keyswap_config_rejected_objects",
            "Invalid objects left out of the configuration in effect (their dependents fail closed).",
            prom::Kind::Gauge,
            Self::get(&self.config_rejected) as f64,
        );
        self.render_phases(p);
        self.render_xds(p);
        self.budgets.render(p);
        self.genai.render(p);
        crate::auth::render_metrics(p);
        p.single("keyswap_ready", "Whether a configuration is loaded.", prom::Kind::Gauge, f64::from(u8::from(ready)));
    }

    /// The request path's counters.
    fn write_counters(&self, p: &mut dyn prom::Families) {
        use prom::Kind::Counter;
        let counter = |p: &mut dyn prom::Families, name: &str, help: &str, samples: &[(&[(&str, &str)], u64)]| {
            p.family(name, help, Counter);
            for (labels, v) in samples {
                p.sample(name, labels, *v as f64);
            }
        };
        let g = Self::get;
        counter(p, "keyswap_requests_total", "Requests keyswap was asked about.", &[(&[], g(&self.requests))]);
        counter(p, "keyswap_injections_total", "Requests that got the real credential.", &[(&[], g(&self.injections))]);
        let denial = |r: &'static str| -> [(&'static str, &'static str); 1] { [("reason", r)] };
        counter(
            p,
            "keyswap_denials_total",
            "Requests answered by keyswap without reaching the provider.",
            &[
                (&denial("no_route"), g(&self.denied_no_route)),
                (&denial("credential_unavailable"), g(&self.denied_credential_unavailable)),
                (&denial("body_too_large"), g(&self.denied_too_large)),
                (&denial("body_encoded"), g(&self.denied_encoded_body)),
                (&denial("agent_unauthenticated"), g(&self.denied_unauthenticated)),
                (&denial("tenant_not_mapped"), g(&self.denied_tenant_not_mapped)),
                (&denial("malformed_authority"), g(&self.denied_malformed_authority)),
                (&denial("malformed_path"), g(&self.denied_malformed_path)),
                (&denial("method_not_allowed"), g(&self.denied_method)),
            ],
        );
        counter(
            p,
            "keyswap_passthrough_total",
            "Unrouted requests passed untouched (allow-all or allow list).",
            &[(&[], g(&self.passed_through))],
        );
        counter(
            p,
            "keyswap_tunnels_total",
            "CONNECT tunnels to unrouted hosts, by the tunnel guard's decision.",
            &[
                (&[("result", "allowed")], g(&self.tunnels_allowed)),
                (&[("result", "refused")], g(&self.tunnels_refused)),
            ],
        );
        counter(
            p,
            "keyswap_smuggle_attempts_total",
            "Requests carrying an agent-supplied credential (stripped).",
            &[(&[], g(&self.smuggle_attempts))],
        );
        counter(
            p,
            "keyswap_response_secrets_scrubbed_total",
            "Responses whose headers, body or trailers echoed a live secret value (scrubbed before the agent saw them).",
            &[(&[], g(&self.secrets_scrubbed_from_responses))],
        );
        counter(
            p,
            "keyswap_protocol_errors_total",
            "ext_proc streams ended because a message broke the protocol.",
            &[(&[], g(&self.protocol_errors))],
        );
        counter(
            p,
            "keyswap_spans_exported_total",
            "Spans accepted by the OTLP collector.",
            &[(&[], g(&self.spans_exported))],
        );
        counter(
            p,
            "keyswap_spans_dropped_total",
            "Spans lost: export queue full, or the collector failed or timed out.",
            &[
                (&[("reason", "queue_full")], g(&self.spans_dropped)),
                (&[("reason", "export_failed")], g(&self.spans_export_failed)),
            ],
        );
        counter(
            p,
            "keyswap_metric_exports_failed_total",
            "OTLP metrics pushes the collector refused or did not answer (OTEL_METRICS_EXPORTER=otlp).",
            &[(&[], g(&self.metric_exports_failed))],
        );
        counter(
            p,
            "keyswap_observed_responses_total",
            "Response bodies read off the request path by the observing filter, by how they ended (never_arrived: none came within 610 s).",
            &[
                (&[("outcome", "ended")], g(&self.observed_ended)),
                (&[("outcome", "cut_off")], g(&self.observed_cut_off)),
                (&[("outcome", "never_arrived")], g(&self.observed_never_arrived)),
            ],
        );
    }

    /// The control plane's counters and gauges.
    fn render_xds(&self, p: &mut dyn prom::Families) {
        use prom::Kind::{Counter, Gauge};
        let x = &self.xds;
        let g = |a: &AtomicU64| Self::get(a) as f64;
        p.single("keyswap_envoy_ads_streams", "Envoy ADS streams open now.", Gauge, g(&x.streams));
        p.single("keyswap_envoy_ads_pushes_total", "Resource updates sent to Envoy over ADS.", Counter, g(&x.pushes));
        p.single(
            "keyswap_envoy_ads_rejected_total",
            "Updates Envoy rejected (it keeps its last good resources; see keyswap's log).",
            Counter,
            g(&x.rejected),
        );
        p.single("keyswap_leaf_mints_total", "Leaf certificates minted for Envoy.", Counter, g(&x.leaf_mints));
        p.single(
            "keyswap_leaf_not_after_seconds",
            "When the leaf Envoy serves expires (Unix time; 0: none yet).",
            Gauge,
            g(&x.leaf_not_after),
        );
    }

    /// The phase-latency histogram.
    fn render_phases(&self, p: &mut dyn prom::Families) {
        const NAME: &str = "keyswap_extproc_phase_duration_seconds";
        p.family(NAME, "Time keyswap spent answering one ext_proc message.", prom::Kind::Histogram);
        let bounds: Vec<f64> = BUCKETS_US.iter().map(|us| *us as f64 / 1e6).collect();
        for ((_, name), h) in PHASES.iter().zip(&self.phases) {
            let mut counts: Vec<u64> = h.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
            let total = h.count.load(Ordering::Relaxed);
            counts.push(total.saturating_sub(counts.iter().sum()));
            let sum = h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
            p.histogram(NAME, &[("phase", name)], &bounds, &counts, sum);
        }
    }
}

/// Where finished spans go: a bounded queue to the exporter task, or nowhere when tracing is off.
pub struct Sink {
    pub metrics: Arc<Metrics>,
    tx: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    sampler: sample::Sampler,
}

impl Sink {
    /// Spans go to `tx` (none: tracing off), sampled by the default sampler
    /// (`parentbased_always_on`).
    pub fn new(metrics: Arc<Metrics>, tx: Option<tokio::sync::mpsc::Sender<Vec<u8>>>) -> Self {
        Sink { metrics, tx, sampler: sample::Sampler::default() }
    }

    /// The same sink with `sampler` (`OTEL_TRACES_SAMPLER`).
    pub fn with_sampler(self, sampler: sample::Sampler) -> Self {
        Sink { sampler, ..self }
    }

    /// Whether the transaction whose agent sent `traceparent` (if any) gets a span: `Some` with
    /// the trace id its span takes when it starts a trace (no valid parent) — the id the sampler
    /// decided on, so that a ratio sampler's rule holds for the exported id (downstream samplers
    /// with the same ratio decide alike).
    pub fn sampled(&self, traceparent: Option<&str>) -> Option<span::TraceId> {
        self.tx.as_ref()?;
        let parent = traceparent.and_then(span::parse_traceparent).map(|(t, _, flags)| (t, flags));
        let root = span::random_trace_id();
        self.sampler.sampled(parent, || root).then_some(root)
    }

    /// Whether spans are recorded at all.
    pub fn tracing(&self) -> bool {
        self.tx.is_some()
    }

    /// Never waits: a full queue (by count, or by [`MAX_QUEUED_SPAN_BYTES`]) drops the span and
    /// counts it. `span` is an encoded OTLP `Span`.
    pub fn send(&self, span: Vec<u8>) {
        if let Some(tx) = &self.tx {
            let (bytes, len) = (&self.metrics.span_queue_bytes, span.len() as u64);
            let queued = bytes.fetch_add(len, Ordering::Relaxed);
            if queued + len > MAX_QUEUED_SPAN_BYTES || tx.try_send(span).is_err() {
                bytes.fetch_sub(len, Ordering::Relaxed);
                Metrics::inc(&self.metrics.spans_dropped);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spans with captured bodies behind a collector that is down: the queue holds at most
    /// [`MAX_QUEUED_SPAN_BYTES`], not its 4,096 spans of any size; what the exporter takes frees
    /// room again.
    #[test]
    fn the_span_queue_is_bounded_by_bytes_as_well_as_by_count() {
        let metrics: Arc<Metrics> = Arc::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
        let sink = Sink::new(metrics.clone(), Some(tx));
        let span = vec![7u8; 1 << 20];
        let fit = (MAX_QUEUED_SPAN_BYTES >> 20) as usize;
        for _ in 0..fit + 10 {
            sink.send(span.clone());
        }
        assert_eq!(Metrics::get(&metrics.spans_dropped), 10);
        assert_eq!(Metrics::get(&metrics.span_queue_bytes), MAX_QUEUED_SPAN_BYTES);
        let taken = rx.try_recv().unwrap();
        metrics.left_queue(&taken);
        sink.send(span);
        assert_eq!(Metrics::get(&metrics.spans_dropped), 10, "room again once the exporter took one");
    }
}
