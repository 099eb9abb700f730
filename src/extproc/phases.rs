//! Streams of the body-streaming deciding filter ([`crate::envoy::bodies_filter`]): the route
//! fixed the phases Envoy sends, and Envoy ignores `mode_override`. So a body keyswap did not
//! ask for can arrive (an unsampled request on a traced route, a request without a budget on a
//! host with one): it is answered with a plain continue, never read. And a request can need a
//! body the route does not send (Envoy still has an older route configuration than keyswap's
//! snapshot, for a moment after a budget or a SigV4 key is added): it is refused, never
//! forwarded unsigned or unreserved.

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use serde_json::json;

use super::{mutation, Handled, ProcessStream};
use crate::telemetry::{Metrics, Phase as TelemetryPhase};

/// The answer's `details` when a request needs a body the route's phases do not send.
pub(super) const PHASES_MISMATCH: &str = "keyswap_phases_mismatch";
/// … of a body that needs to arrive whole and came partial (larger than Envoy's buffer).
pub(super) const BODY_TOO_LARGE: &str = "keyswap_body_too_large";
/// … of request trailers where a whole body was awaited.
pub(super) const BODY_REQUIRED: &str = "keyswap_body_required";

/// The phases of a stream whose route fixed them, from its first message's `protocol_config`.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Fixed {
    /// Envoy sends the request body (BUFFERED_PARTIAL as generated: whole up to its buffer).
    sends_request_body: bool,
    /// What this request's decision reads (what it would have asked for with `mode_override`).
    reads_request_body: bool,
    reads_response_body: bool,
}

impl Fixed {
    /// `Some` when the stream's filter sends bodies without waiting for header answers.
    pub(super) fn of(msg: &ProcessingRequest) -> Option<Fixed> {
        let c = msg.protocol_config.as_ref()?;
        if !c.send_body_without_waiting_for_header_response {
            return None;
        }
        let sends = [BodySendMode::Buffered, BodySendMode::BufferedPartial].map(|m| m as i32);
        let sends_request_body = sends.contains(&c.request_body_mode);
        tracing::trace!(request_body_mode = c.request_body_mode, "a stream with the phases its route fixed");
        Some(Fixed { sends_request_body, ..Fixed::default() })
    }
}

/// The request body mode an answer asks for.
fn asked_request_body(resp: &ProcessingResponse) -> BodySendMode {
    resp.mode_override
        .as_ref()
        .and_then(|m| BodySendMode::try_from(m.request_body_mode).ok())
        .unwrap_or(BodySendMode::None)
}

impl ProcessStream {
    /// After the request-headers decision, on a stream with fixed phases: notes which request
    /// body it reads; refuses it when it needs the whole body (SigV4, a budget on tokens) and the
    /// route's phases do not send it.
    pub(super) fn fixed_request(&mut self, resp: &ProcessingResponse, has_body: bool) -> Option<Handled> {
        let fixed = self.fixed.as_mut()?;
        let asked = asked_request_body(resp);
        fixed.reads_request_body = asked != BodySendMode::None;
        if !(has_body && asked == BodySendMode::Buffered && !fixed.sends_request_body) {
            return None;
        }
        Metrics::inc(&self.shared.metrics.protocol_errors);
        tracing::error!(
            "a request needs its whole body (SigV4 or a token budget) and its route's ext_proc phases do not send it \
             (Envoy has not taken keyswap's latest route configuration yet?); refused with 503"
        );
        self.sign = None;
        self.budget = None;
        let body = json!({"error": {"type": "keyswap_unavailable", "reason": "phases_mismatch",
            "message": "the gateway's route configuration is being updated; retry"}});
        let resp = mutation::immediate_with(503, &body, PHASES_MISMATCH, &[("retry-after", b"1")]);
        Some(Handled::Answer(resp, TelemetryPhase::RequestHeaders, true))
    }

    /// A request body that needs to arrive whole (SigV4, a token budget) and came partial: larger
    /// than Envoy's buffer (fixed phases: BUFFERED_PARTIAL), or followed by trailers (either
    /// mode: Envoy sends a BUFFERED body without `end_of_stream` when trailers follow). Refused
    /// with 413, never signed or reserved by a part.
    pub(super) fn partial_body_refused(&mut self) -> Handled {
        Metrics::inc(&self.shared.metrics.denied_too_large);
        tracing::warn!(
            "a request body SigV4 or a token budget needs whole is larger than Envoy's buffer, or ends with trailers; answering 413"
        );
        self.sign = None;
        self.budget = None;
        let body = json!({"error": {"type": "request_too_large",
            "message": "SigV4 signing and token budgets need the whole request body; this one is larger than the gateway buffers (or ends with trailers)"}});
        let resp = mutation::immediate(413, &body, BODY_TOO_LARGE);
        Handled::Answer(resp, TelemetryPhase::RequestBody, true)
    }

    /// Request trailers while the request still waits for the whole body SigV4 or a token
    /// budget needs (Envoy sends no body message for a request of headers and trailers only):
    /// refused with 400, never forwarded unsigned or unreserved.
    pub(super) fn trailers_before_body(&mut self) -> Option<Handled> {
        if self.sign.is_none() && !self.budget.as_ref().is_some_and(|b| b.waits_for_body()) {
            return None;
        }
        tracing::debug!("request trailers before the body SigV4 or a token budget needs; answering 400");
        self.sign = None;
        self.budget = None;
        let body = json!({"error": {"type": "body_required",
            "message": "SigV4 signing and token budgets read the whole request body; a request that ends with trailers and no body is refused"}});
        let resp = mutation::immediate(400, &body, BODY_REQUIRED);
        Some(Handled::Answer(resp, TelemetryPhase::Trailers, true))
    }

    /// Whether a request body that arrived is one this request does not read.
    pub(super) fn skips_request_body(&self) -> bool {
        self.fixed.is_some_and(|f| !f.reads_request_body)
    }

    /// Notes whether the response headers' decision reads the body.
    pub(super) fn fixed_response(&mut self, reads: bool) {
        if let Some(f) = self.fixed.as_mut() {
            f.reads_response_body = reads;
        }
    }

    /// Whether a response body that arrived is one this request does not read.
    pub(super) fn skips_response_body(&self) -> bool {
        self.fixed.is_some_and(|f| !f.reads_response_body)
    }
}

/// The name of a message's phase, as errors say it.
pub(super) fn name(r: &envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request) -> &'static str {
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
    match r {
        Request::RequestHeaders(_) => "request_headers",
        Request::ResponseHeaders(_) => "response_headers",
        Request::RequestBody(_) => "request_body",
        Request::ResponseBody(_) => "response_body",
        Request::RequestTrailers(_) => "request_trailers",
        Request::ResponseTrailers(_) => "response_trailers",
    }
}
