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

use crate::config::{Decision, Snapshot, SnapshotStore};
use crate::inject;
use crate::telemetry::Metrics;

/// State shared by every stream.
pub struct Shared {
    pub store: SnapshotStore,
    pub metrics: Arc<Metrics>,
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
        }))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    AwaitRequestHeaders,
    AfterRequestHeaders,
    Done,
}

/// The response stream of one HTTP request.
pub struct ProcessStream {
    inner: Streaming<ProcessingRequest>,
    phase: Phase,
    shared: Arc<Shared>,
}

impl Stream for ProcessStream {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.phase == Phase::Done {
            return Poll::Ready(None);
        }
        let msg = match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Err(status))) => {
                // Envoy went away or sent garbage the codec refused: end quietly.
                tracing::debug!(code = ?status.code(), "ext_proc stream ended by the client");
                self.phase = Phase::Done;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Ok(msg))) => msg,
        };
        let this = &mut *self;
        match handle(&this.shared, &mut this.phase, msg) {
            Ok(resp) => Poll::Ready(Some(Ok(resp))),
            Err(status) => {
                Metrics::inc(&this.shared.metrics.protocol_errors);
                tracing::warn!(error = status.message(), "ext_proc protocol error; stream ended");
                this.phase = Phase::Done;
                Poll::Ready(Some(Err(status)))
            }
        }
    }
}

fn handle(shared: &Shared, phase: &mut Phase, msg: ProcessingRequest) -> Result<ProcessingResponse, Status> {
    let Some(request) = msg.request else {
        return Err(Status::invalid_argument("ProcessingRequest carries no request phase"));
    };
    match (request, *phase) {
        (Request::RequestHeaders(h), Phase::AwaitRequestHeaders) => {
            *phase = Phase::AfterRequestHeaders;
            let headers = h.headers.map(|m| m.headers).unwrap_or_default();
            let snapshot = shared.store.load();
            Ok(on_request_headers(&snapshot, &shared.metrics, &headers))
        }
        (Request::RequestHeaders(_), _) => {
            Err(Status::failed_precondition("request_headers received twice on one stream"))
        }
        (other, Phase::AwaitRequestHeaders) => {
            Err(Status::failed_precondition(format!("{} received before request_headers", phase_name(&other))))
        }
        (Request::RequestBody(_), _) => Ok(mutation::request_body()),
        (Request::RequestTrailers(_), _) => Ok(mutation::request_trailers()),
        (Request::ResponseHeaders(_), _) => Ok(mutation::response_headers()),
        (Request::ResponseBody(_), _) => Ok(mutation::response_body()),
        (Request::ResponseTrailers(_), _) => Ok(mutation::response_trailers()),
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

/// The request-headers decision, answered from `snapshot`.
pub fn on_request_headers(snapshot: &Snapshot, metrics: &Metrics, headers: &[HeaderValue]) -> ProcessingResponse {
    Metrics::inc(&metrics.requests);
    let authority = find(headers, ":authority").or_else(|| find(headers, "host")).unwrap_or("");
    let path = find(headers, ":path").unwrap_or("/");
    let path_only = path.split_once('?').map_or(path, |(p, _)| p);
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
            mutation::request_headers(Some(mutation::header_mutation(&plan)))
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
            mutation::immediate(503, &body, "keyswap_credential_unavailable")
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
            mutation::immediate(403, &body, "keyswap_no_route")
        }
        Decision::PassThrough { allowed_by } => {
            Metrics::inc(&metrics.passed_through);
            tracing::debug!(authority, path = path_only, allowed_by, "no route; passed through untouched");
            mutation::request_headers(None)
        }
    }
}
