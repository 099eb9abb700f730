//! The Envoy ext_proc gRPC service.
//!
//! One gRPC stream per HTTP request. Each stream is a small state machine polled in place: no
//! task, no channel, no lock. Every message is answered synchronously from the current snapshot.

pub mod mutation;
pub mod server;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, ProcessingRequest, ProcessingResponse,
};
use serde_json::json;
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use std::time::Instant;

use crate::config::snapshot::{normalize_host, Binding};
use crate::config::{Decision, Snapshot, SnapshotStore};
use crate::inject;
use crate::telemetry::span::{Start, Transaction};
use crate::telemetry::{Metrics, Phase as TelemetryPhase, Sink};

/// State shared by every stream.
pub struct Shared {
    pub store: SnapshotStore,
    pub metrics: Arc<Metrics>,
    /// Where finished spans go (nowhere when tracing is off).
    pub sink: Sink,
}

impl Shared {
    /// Shared state with tracing off.
    pub fn new(store: SnapshotStore, metrics: Arc<Metrics>) -> Self {
        let sink = Sink::new(metrics.clone(), None);
        Shared { store, metrics, sink }
    }
}

#[derive(Clone)]
pub struct ExtProc {
    shared: Arc<Shared>,
}

impl ExtProc {
    pub fn new(shared: Arc<Shared>) -> Self {
        ExtProc { shared }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProc {
    type ProcessStream = ProcessStream;

    async fn process(
        &self,
        request: tonic::Request<Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, Status> {
        Ok(tonic::Response::new(ProcessStream {
            inner: request.into_inner(),
            phase: Phase::AwaitRequestHeaders,
            shared: self.shared.clone(),
            tx: None,
        }))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    AwaitRequestHeaders,
    AfterRequestHeaders,
    Done,
}

/// A transaction being traced, with the snapshot it started on (for scrubbing its secrets).
struct Traced {
    tx: Box<Transaction>,
    snapshot: Arc<Snapshot>,
}

/// The response stream of one HTTP request.
pub struct ProcessStream {
    inner: Streaming<ProcessingRequest>,
    phase: Phase,
    shared: Arc<Shared>,
    tx: Option<Traced>,
}

impl ProcessStream {
    fn finish_span(&mut self) {
        if let Some(t) = self.tx.take() {
            t.tx.finish(&self.shared.sink, &t.snapshot.secret_values());
        }
    }
}

impl Drop for ProcessStream {
    /// A stream can end anywhere (client gone, upstream reset): its span still ends.
    fn drop(&mut self) {
        self.finish_span();
    }
}

impl Stream for ProcessStream {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.phase == Phase::Done {
            return Poll::Ready(None);
        }
        let msg = match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                self.finish_span();
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(status))) => {
                // Envoy went away or sent garbage the codec refused: end quietly.
                tracing::debug!(code = ?status.code(), "ext_proc stream ended by the client");
                self.phase = Phase::Done;
                self.finish_span();
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Ok(msg))) => msg,
        };
        let started = Instant::now();
        let this = &mut *self;
        match handle(&this.shared, &mut this.phase, &mut this.tx, msg) {
            Ok((resp, phase, end)) => {
                this.shared.metrics.observe(phase, started.elapsed());
                if end {
                    this.finish_span();
                }
                Poll::Ready(Some(Ok(resp)))
            }
            Err(status) => {
                Metrics::inc(&this.shared.metrics.protocol_errors);
                tracing::warn!(error = status.message(), "ext_proc protocol error; stream ended");
                this.phase = Phase::Done;
                this.finish_span();
                Poll::Ready(Some(Err(status)))
            }
        }
    }
}

/// Answers one message. Returns the answer, the phase it belonged to, and whether the
/// transaction is complete (its span can end).
fn handle(
    shared: &Shared,
    phase: &mut Phase,
    traced: &mut Option<Traced>,
    msg: ProcessingRequest,
) -> Result<(ProcessingResponse, TelemetryPhase, bool), Status> {
    let Some(request) = msg.request else {
        return Err(Status::invalid_argument("ProcessingRequest carries no request phase"));
    };
    match (request, *phase) {
        (Request::RequestHeaders(h), Phase::AwaitRequestHeaders) => {
            *phase = Phase::AfterRequestHeaders;
            let has_body = !h.end_of_stream;
            let headers = h.headers.map(|m| m.headers).unwrap_or_default();
            let snapshot = shared.store.load_full();
            let (resp, tx) = on_request_headers(&snapshot, shared, &headers, has_body);
            let done = tx.as_ref().is_some_and(|t| t.is_denial());
            *traced = tx.map(|tx| Traced { tx, snapshot });
            Ok((resp, TelemetryPhase::RequestHeaders, done))
        }
        (Request::RequestHeaders(_), _) => {
            Err(Status::failed_precondition("request_headers received twice on one stream"))
        }
        (other, Phase::AwaitRequestHeaders) => {
            Err(Status::failed_precondition(format!("{} received before request_headers", phase_name(&other))))
        }
        (Request::RequestBody(b), _) => {
            if let Some(t) = traced {
                t.tx.on_request_body(&b.body);
            }
            Ok((mutation::request_body(), TelemetryPhase::RequestBody, false))
        }
        (Request::ResponseHeaders(h), _) => {
            let mut mode = None;
            let end = h.end_of_stream;
            if let Some(t) = traced {
                let headers = h.headers.map(|m| m.headers).unwrap_or_default();
                let pairs: Vec<(&str, &[u8])> = headers.iter().map(|h| (h.key.as_str(), header_bytes(h))).collect();
                t.tx.on_response_headers(&pairs);
                if !end && t.tx.wants_response_body() {
                    mode = Some(mutation::mode(false, true));
                }
            }
            Ok((mutation::response_headers(mode), TelemetryPhase::ResponseHeaders, end))
        }
        (Request::ResponseBody(b), _) => {
            if let Some(t) = traced {
                t.tx.on_response_body(&b.body);
            }
            Ok((mutation::response_body(), TelemetryPhase::ResponseBody, b.end_of_stream))
        }
        (Request::RequestTrailers(_), _) => Ok((mutation::request_trailers(), TelemetryPhase::Trailers, false)),
        (Request::ResponseTrailers(_), _) => Ok((mutation::response_trailers(), TelemetryPhase::Trailers, true)),
    }
}

fn phase_name(r: &Request) -> &'static str {
    match r {
        Request::RequestHeaders(_) => "request_headers",
        Request::ResponseHeaders(_) => "response_headers",
        Request::RequestBody(_) => "request_body",
        Request::ResponseBody(_) => "response_body",
        Request::RequestTrailers(_) => "request_trailers",
        Request::ResponseTrailers(_) => "response_trailers",
    }
}

/// A header's bytes: Envoy sends `raw_value`; older senders use `value`.
fn header_bytes(h: &HeaderValue) -> &[u8] {
    if h.raw_value.is_empty() {
        h.value.as_bytes()
    } else {
        &h.raw_value
    }
}

fn find<'a>(headers: &'a [HeaderValue], name: &str) -> Option<&'a str> {
    headers.iter().find(|h| h.key.eq_ignore_ascii_case(name)).and_then(|h| std::str::from_utf8(header_bytes(h)).ok())
}

/// The request-headers decision, answered from `snapshot`; with tracing on, the transaction.
pub fn on_request_headers(
    snapshot: &Snapshot,
    shared: &Shared,
    headers: &[HeaderValue],
    has_body: bool,
) -> (ProcessingResponse, Option<Box<Transaction>>) {
    let metrics = &shared.metrics;
    Metrics::inc(&metrics.requests);
    let authority = find(headers, ":authority").or_else(|| find(headers, "host")).unwrap_or("");
    let path = find(headers, ":path").unwrap_or("/");
    let path_only = path.split_once('?').map_or(path, |(p, _)| p);
    let tracing_on = shared.sink.tracing();
    let pairs = || headers.iter().map(|h| (h.key.as_str(), header_bytes(h))).collect::<Vec<_>>();
    let start = |provider: Option<&'static crate::provider::Provider>,
                 route: &str,
                 policy: Option<&str>,
                 binding: Option<&Binding>,
                 injected: bool,
                 smuggled: bool,
                 error: Option<&'static str>| {
        let mut buf = [0u8; 256];
        let host = normalize_host(authority, &mut buf).to_owned();
        let redacted =
            binding.map_or(std::borrow::Cow::Borrowed(path), |b| inject::query::redact(path, &b.strip_query));
        let path_model = provider.and_then(|p| p.model_from_path(path));
        let s = Start {
            provider,
            route,
            policy,
            method: find(headers, ":method").unwrap_or("GET"),
            scheme: find(headers, ":scheme").unwrap_or("https"),
            authority,
            host: &host,
            redacted_path: &redacted,
            request_model: path_model.as_deref(),
            injected,
            smuggled,
            redact_also: binding.and_then(|b| b.strip_headers.last().map(|h| &**h)),
            error,
        };
        Transaction::start(&s, &pairs(), &snapshot.capture)
    };
    match snapshot.decide(authority, path) {
        Decision::Inject { entry, credential } => {
            let binding = &entry.binding;
            let plan =
                inject::plan(binding, credential, headers.iter().map(|h| (h.key.as_str(), header_bytes(h))), path);
            let policy = binding.policy.as_deref().unwrap_or("-");
            if !plan.smuggled.is_empty() {
                Metrics::inc(&metrics.smuggle_attempts);
                tracing::warn!(
                    route = %entry.route, policy, credentials = ?plan.smuggled,
                    "agent sent credentials of its own; stripped before injecting"
                );
            }
            Metrics::inc(&metrics.injections);
            tracing::debug!(route = %entry.route, policy, provider = entry.provider.name, path = path_only, "credential injected");
            if !tracing_on {
                return (mutation::request_headers(Some(mutation::header_mutation(&plan, &[])), None), None);
            }
            let smuggled = !plan.smuggled.is_empty();
            let (tx, traceparent) = start(
                Some(entry.provider),
                &entry.route,
                binding.policy.as_deref(),
                Some(binding),
                true,
                smuggled,
                None,
            );
            let m = mutation::header_mutation(&plan, &[("traceparent", traceparent.as_bytes())]);
            let mode = mutation::mode(has_body && tx.wants_request_body(), false);
            (mutation::request_headers(Some(m), Some(mode)), Some(Box::new(tx)))
        }
        Decision::FailClosed { entry, reason } => {
            Metrics::inc(&metrics.denied_credential_unavailable);
            let policy = entry.binding.policy.as_deref();
            tracing::warn!(
                route = %entry.route, policy = policy.unwrap_or("-"), reason = %reason,
                "credential unavailable; answering 503 (fail closed)"
            );
            let body = json!({"error": {
                "type": "credential_unavailable",
                "message": "keyswap could not resolve the credential for this route; the request was not forwarded",
                "route": &*entry.route,
                "policy": policy,
                "reason": reason.reason(),
            }});
            let tx = tracing_on.then(|| {
                Box::new(
                    start(
                        Some(entry.provider),
                        &entry.route,
                        policy,
                        Some(&entry.binding),
                        false,
                        false,
                        Some("credential_unavailable"),
                    )
                    .0,
                )
            });
            (mutation::immediate(503, &body, "keyswap_credential_unavailable"), tx)
        }
        Decision::Deny => {
            Metrics::inc(&metrics.denied_no_route);
            tracing::info!(gateway = %snapshot.gateway, authority, path = path_only, "no route matches on a deny-all gateway; answering 403");
            let body = json!({"error": {
                "type": "egress_denied",
                "message": "no AIProviderRoute matches this request and the gateway denies by default",
                "gateway": snapshot.gateway.to_string(),
                "host": authority,
            }});
            let tx = tracing_on.then(|| Box::new(start(None, "-", None, None, false, false, Some("no_route")).0));
            (mutation::immediate(403, &body, "keyswap_no_route"), tx)
        }
        Decision::PassThrough { allowed_by } => {
            Metrics::inc(&metrics.passed_through);
            tracing::debug!(authority, path = path_only, allowed_by, "no route; passed through untouched");
            (mutation::request_headers(None, None), None)
        }
    }
}
