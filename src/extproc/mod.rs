//! The Envoy ext_proc gRPC service.
//!
//! One gRPC stream per HTTP request. Each stream is a small state machine polled in place: no
//! task, no channel, no lock. Every message is answered synchronously from the current snapshot.

pub mod budget;
mod budget_refusal;
pub mod mutation;
pub mod observe;
mod phases;
mod request;
mod response;
pub mod server;
mod sign;
pub mod tunnel;
mod usage_chunk;
mod wait;

pub use sign::PendingSign;
use sign::{sign_body, signing_failed, SIGNING_FAILED, SIGN_INLINE_MAX_BYTES};

pub use request::on_request_headers;
use wait::Waiting;
pub use wait::{Resume, Wait};

pub use crate::vocab::{ROLE_METADATA, ROLE_OBSERVE, ROLE_TUNNEL};

use futures_util::future::BoxFuture;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, ProcessingRequest, ProcessingResponse,
};
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use std::time::Instant;

use crate::auth::Peer;
use crate::config::{Snapshot, SnapshotStore};
use crate::inject::sigv4;
use crate::telemetry::span::Transaction;
use crate::telemetry::{Metrics, Phase as TelemetryPhase, Sink};

/// An answer computed off the stream, with the budget decision it made, if any.
type OffStream = BoxFuture<'static, (ProcessingResponse, Option<(crate::budget::Admit, bool)>)>;

/// State shared by every stream.
pub struct Shared {
    pub store: SnapshotStore,
    pub metrics: Arc<Metrics>,
    /// Where finished spans go (nowhere when tracing is off).
    pub sink: Sink,
    /// Which tunnel destinations are reachable besides public addresses.
    pub tunnel: tunnel::TunnelGuard,
    /// Token budget counters (in this process, or the gateway's Redis).
    pub budgets: Arc<crate::budget::Engine>,
    /// Transactions waiting for their response body on an observing stream.
    pub handoffs: observe::Handoffs,
    /// The streams alive, deciding and observing.
    pub streams: server::LiveStreams,
}

impl Shared {
    /// Shared state with tracing off.
    pub fn new(store: SnapshotStore, metrics: Arc<Metrics>) -> Self {
        let sink = Sink::new(metrics.clone(), None);
        let budgets = Arc::new(crate::budget::Engine::new(metrics.budgets.clone()));
        Shared {
            store,
            metrics,
            sink,
            tunnel: Default::default(),
            budgets,
            handoffs: Default::default(),
            streams: Default::default(),
        }
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
    type ProcessStream = AnyStream;

    async fn process(
        &self,
        request: tonic::Request<Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, Status> {
        // Envoy's tunnel-guard and observing filters name themselves in the stream's metadata
        // (gRPC metadata comes from Envoy's configuration, never from the agent's request).
        let meta = request.metadata();
        let role = |r: &str| meta.get(ROLE_METADATA).is_some_and(|v| v.as_bytes() == r.as_bytes());
        let (tunnel, observing) = (role(ROLE_TUNNEL), role(ROLE_OBSERVE));
        let observed = meta.get(observe::OBSERVED_METADATA).is_some();
        self.shared.streams.enter();
        if observing {
            return Ok(tonic::Response::new(AnyStream::Observe(observe::ObserveStream::new(
                request.into_inner(),
                self.shared.clone(),
            ))));
        }
        Ok(tonic::Response::new(AnyStream::Decide(ProcessStream {
            inner: request.into_inner(),
            tunnel,
            observed,
            phase: Phase::AwaitRequestHeaders,
            shared: self.shared.clone(),
            tx: None,
            sign: None,
            waiting: None,
            pending: None,
            scrub: None,
            budget: None,
            fixed: None,
            places: Default::default(),
        })))
    }
}

/// A deciding stream (the request waits for its answers) or an observing one (never answered).
// One per stream, moved once into tonic: boxing the larger variant would allocate per request.
#[allow(clippy::large_enum_variant)]
pub enum AnyStream {
    Decide(ProcessStream),
    Observe(observe::ObserveStream),
}

impl Stream for AnyStream {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            AnyStream::Decide(s) => Pin::new(s).poll_next(cx),
            AnyStream::Observe(s) => Pin::new(s).poll_next(cx),
        }
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
    /// The credential minted for this request (a GCP access token): scrubbed from the span's
    /// captured bodies like the snapshot's secrets.
    minted: Option<Box<[u8]>>,
}

impl Traced {
    /// Exports the span; its usage comes from `budget` when the budget read it for both.
    fn finish(mut self, sink: &Sink, budget: Option<&mut budget::Budgeted>) {
        if self.tx.borrows_usage() {
            if let Some(info) = budget.and_then(|b| b.usage()) {
                self.tx.lend_usage(info);
            }
        }
        let mut secrets = self.snapshot.secret_values();
        secrets.extend(self.minted.as_deref());
        self.tx.finish(sink, &secrets);
    }
}

/// The agent's gateway token: the header it came in, and its value.
type AgentToken<'a> = (&'a str, &'a [u8]);

/// The response stream of one HTTP request.
pub struct ProcessStream {
    inner: Streaming<ProcessingRequest>,
    /// A stream of the tunnel guard (CONNECT to an unrouted host), not of a provider request.
    tunnel: bool,
    /// The observing filter runs on this request's route: response bodies are read there.
    observed: bool,
    phase: Phase,
    shared: Arc<Shared>,
    tx: Option<Traced>,
    sign: Option<Box<PendingSign>>,
    waiting: Option<Box<Waiting>>,
    /// An answer being computed off the stream (a large body signed on the blocking pool, a
    /// tunnel target resolved, a budget reserved in Redis), when its message arrived, and its
    /// phase; with the budget decision, if it made one.
    pending: Option<(OffStream, Instant, TelemetryPhase)>,
    /// A request that got a real credential: its response headers are scrubbed of live secret
    /// values before the agent (or a span) sees them.
    scrub: Option<response::Scrub>,
    /// A request on a route with token budgets: its reservation, settled when the response ends.
    budget: Option<Box<budget::Budgeted>>,
    /// The route fixed the phases (the body-streaming deciding filter): what Envoy sends.
    fixed: Option<phases::Fixed>,
    /// A passed-through request's places among the gateway budgets' requests in flight, given
    /// back when the stream ends (on fixed phases, when the response does).
    places: crate::budget::Places,
}

/// A request that got a real credential.
pub struct Injected {
    /// The credential minted for this request (a GCP token), scrubbed like the live secrets.
    pub minted: Option<Box<[u8]>>,
    pub scrub_bodies: bool,
    /// The route's binding: what the request's trailers are stripped of.
    pub binding: Arc<crate::config::snapshot::Binding>,
}

impl ProcessStream {
    fn finish_span(&mut self) {
        if let Some(t) = self.tx.take() {
            t.finish(&self.shared.sink, self.budget.as_deref_mut());
        }
    }

    /// The transaction is complete: its span ends now, but is encoded and handed to the
    /// exporter only when the stream closes (Envoy closes it once it has the last answer, or the
    /// stream is dropped), so the last answer, the one the agent waits for, goes out first.
    fn end_span(&mut self) {
        if let Some(t) = &mut self.tx {
            t.tx.mark_ended();
        }
    }

    /// An answer keyswap made itself (an immediate response: a body it could not sign, a body
    /// the route's phases cannot deliver whole) ends the transaction: the span records its status,
    /// and its reason when no step named one.
    fn answered_itself(&mut self, resp: &ProcessingResponse) -> bool {
        use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
        let Some(Response::ImmediateResponse(i)) = &resp.response else { return false };
        // Not forwarded: what its budgets reserved goes back (dropped unsettled, as a refusal).
        if let Some(b) = &mut self.budget {
            b.release();
        }
        if let Some(t) = &mut self.tx {
            let error = match i.details.as_str() {
                SIGNING_FAILED => "signing_failed",
                phases::PHASES_MISMATCH => "phases_mismatch",
                phases::BODY_TOO_LARGE => "request_too_large",
                phases::BODY_REQUIRED => "body_required",
                _ => "keyswap_answered",
            };
            t.tx.refused(error, i.status.as_ref().map_or(500, |s| s.code as u16));
        }
        true
    }
}

impl Drop for ProcessStream {
    /// A stream can end anywhere (client gone, upstream reset): its span still ends.
    fn drop(&mut self) {
        self.finish_span();
        self.shared.streams.leave();
    }
}

impl Stream for ProcessStream {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.phase == Phase::Done {
            return Poll::Ready(None);
        }
        if self.waiting.is_some() {
            return self.as_mut().poll_waiting(cx);
        }
        if self.pending.is_some() {
            return self.poll_pending(cx).map(|resp| Some(Ok(resp)));
        }
        let msg = match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                self.finish_span();
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(status))) if status.code() == tonic::Code::Internal => {
                // A message the codec could not decode: a protocol error, answered with an error
                // status (never a crash, never a silent OK).
                Metrics::inc(&self.shared.metrics.protocol_errors);
                tracing::warn!(error = status.message(), "undecodable ext_proc message; stream ended");
                self.phase = Phase::Done;
                self.finish_span();
                return Poll::Ready(Some(Err(Status::invalid_argument("undecodable ext_proc message"))));
            }
            Poll::Ready(Some(Err(status))) => {
                // Envoy went away (reset, cancelled): end quietly.
                tracing::debug!(code = ?status.code(), "ext_proc stream ended by the client");
                self.phase = Phase::Done;
                self.finish_span();
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Ok(msg))) => msg,
        };
        let started = Instant::now();
        let this = &mut *self;
        match this.handle(msg, started) {
            Ok(Handled::Answer(resp, phase, end)) => {
                this.shared.metrics.observe(phase, started.elapsed());
                if this.answered_itself(&resp) || end {
                    this.end_span();
                }
                Poll::Ready(Some(Ok(resp)))
            }
            // Tell Envoy to wait for the token fetch; the answer follows when it completes.
            Ok(Handled::Wait) => Poll::Ready(Some(Ok(mutation::extend_timeout(TOKEN_WAIT)))),
            // Answered off the stream: poll the future right away (it registers the waker).
            Ok(Handled::Pending) => self.poll_next(cx),
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

impl ProcessStream {
    /// The answer being computed off the stream, once ready; a budget refusal ends the stream.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<ProcessingResponse> {
        let Some((fut, started, phase)) = self.pending.as_mut() else { return Poll::Pending };
        let Poll::Ready((resp, admit)) = fut.as_mut().poll(cx) else { return Poll::Pending };
        let (started, phase) = (*started, *phase);
        self.pending = None;
        self.shared.metrics.observe(phase, started.elapsed());
        if let Some((admit, asked_for_usage)) = admit {
            if self.record(admit, asked_for_usage).is_some() {
                self.phase = Phase::Done;
                self.end_span();
            }
        }
        if self.answered_itself(&resp) {
            self.end_span();
        }
        Poll::Ready(resp)
    }
}

/// How long Envoy is asked to wait for request headers that wait for a GCP token: the fetch
/// timeout plus slack, within the filter's `max_message_timeout` (10 s in generated configs).
const TOKEN_WAIT: std::time::Duration = std::time::Duration::from_secs(8);

// Returned by value once per message; boxing the answer would allocate on the hot path.
#[allow(clippy::large_enum_variant)]
enum Handled {
    /// The answer, the phase it belonged to, and whether the transaction is complete.
    Answer(ProcessingResponse, TelemetryPhase, bool),
    /// The request headers wait for a token: [`ProcessStream::waiting`] holds them.
    Wait,
    /// The answer is being computed: [`ProcessStream::pending`] holds it.
    Pending,
}

/// What the request-headers phase decided.
pub struct Outcome {
    pub resp: ProcessingResponse,
    pub tx: Option<Box<Transaction>>,
    pub sign: Option<Box<PendingSign>>,
    /// `Some` when a real credential was written: then the response is scrubbed.
    pub injected: Option<Injected>,
    /// The route has token budgets: reserved before the request goes on.
    pub budget: Option<Box<budget::Budgeted>>,
    /// A request no route matches, passed through: its places in the gateway's budgets.
    pub places: crate::budget::Places,
}

#[allow(clippy::large_enum_variant)]
pub enum Step {
    Answer(Outcome),
    /// A GCP route with no usable token cached, or a JWT naming a key not held yet: fetch (or
    /// join the fetch) and decide again.
    Wait(Wait),
}

impl ProcessStream {
    /// Keeps the transaction and signing state of `outcome`; returns the answer and whether the
    /// transaction already ended (a denial).
    fn accept(&mut self, outcome: Outcome, snapshot: Arc<Snapshot>) -> (ProcessingResponse, bool) {
        let done = outcome.tx.as_ref().is_some_and(|t| t.is_denial());
        let mut minted = None;
        if let Some(i) = outcome.injected {
            let body = i.scrub_bodies.then(crate::scrub::Streaming::default);
            minted = outcome.tx.as_ref().and(i.minted.clone());
            self.scrub =
                Some(response::Scrub { snapshot: snapshot.clone(), minted: i.minted, body, binding: i.binding });
        }
        self.tx = outcome.tx.map(|tx| Traced { tx, snapshot, minted });
        self.sign = outcome.sign;
        self.budget = outcome.budget;
        self.places = outcome.places;
        (outcome.resp, done)
    }

    /// After the request-headers decision: a budgeted request without a body (or whose budgets
    /// limit only requests) reserves now; one with a body reserves when the body arrives.
    fn after_headers(&mut self, resp: ProcessingResponse, end: bool, has_body: bool, started: Instant) -> Handled {
        if let Some(refused) = self.fixed_request(&resp, has_body && !end) {
            return refused;
        }
        let reserve_now = self.budget.as_ref().is_some_and(|b| !has_body || !b.reads_bodies());
        if end || !reserve_now {
            return Handled::Answer(resp, TelemetryPhase::RequestHeaders, end);
        }
        self.admit(budget::Continue::Ready(resp), Vec::new(), TelemetryPhase::RequestHeaders, started)
    }

    /// Answers one message.
    fn handle(&mut self, mut msg: ProcessingRequest, started: Instant) -> Result<Handled, Status> {
        let Some(request) = msg.request.take() else {
            return Err(Status::invalid_argument("ProcessingRequest carries no request phase"));
        };
        match (request, self.phase) {
            (Request::RequestHeaders(h), Phase::AwaitRequestHeaders) => {
                self.phase = Phase::AfterRequestHeaders;
                self.fixed = phases::Fixed::of(&msg);
                let headers = h.headers.map(|m| m.headers).unwrap_or_default();
                if self.tunnel {
                    Ok(self.on_tunnel_headers(&headers, Peer::from_attributes(&msg.attributes), started))
                } else {
                    Ok(self.on_request_headers(headers, !h.end_of_stream, &msg.attributes, started))
                }
            }
            (Request::RequestHeaders(_), _) => {
                Err(Status::failed_precondition("request_headers received twice on one stream"))
            }
            (other, Phase::AwaitRequestHeaders) => {
                Err(Status::failed_precondition(format!("{} received before request_headers", phases::name(&other))))
            }
            (Request::RequestBody(b), _) => self.on_request_body(b.body, b.end_of_stream, started),
            (Request::ResponseHeaders(h), _) => {
                let headers = h.headers.map(|m| m.headers).unwrap_or_default();
                Ok(self.on_response_headers(&headers, h.end_of_stream))
            }
            (Request::ResponseBody(b), _) => Ok(self.on_response_body(&b.body, b.end_of_stream)),
            (Request::RequestTrailers(t), _) => Ok(self
                .trailers_before_body()
                .unwrap_or_else(|| self.on_request_trailers(t.trailers.as_ref().map_or(&[][..], |m| &m.headers)))),
            (Request::ResponseTrailers(t), _) => {
                Ok(self.on_response_trailers(t.trailers.as_ref().map_or(&[][..], |m| &m.headers)))
            }
        }
    }

    /// A CONNECT on the proxy listener: the tunnel guard resolves and checks the target off the
    /// stream.
    fn on_tunnel_headers(&mut self, headers: &[HeaderValue], peer: Peer, started: Instant) -> Handled {
        let decided = tunnel::decide_headers(self.shared.clone(), headers, peer);
        let fut = async move { (decided.await, None) };
        self.pending = Some((Box::pin(fut), started, TelemetryPhase::RequestHeaders));
        Handled::Pending
    }

    /// A provider request's headers: decided now, or parked while a token or key set is fetched.
    fn on_request_headers(
        &mut self,
        headers: Vec<HeaderValue>,
        has_body: bool,
        attributes: &std::collections::HashMap<String, envoy_types::pb::google::protobuf::Struct>,
        started: Instant,
    ) -> Handled {
        let snapshot = self.shared.store.load_full();
        let peer = Peer::from_attributes(attributes);
        match on_request_headers(&snapshot, &self.shared, &headers, has_body, Resume::First, &peer) {
            Step::Answer(outcome) => {
                let (resp, end) = self.accept(outcome, snapshot);
                self.after_headers(resp, end, has_body, started)
            }
            Step::Wait(w) => {
                self.waiting = Some(Box::new(Waiting::new(w, snapshot, headers, has_body, peer, started)));
                Handled::Wait
            }
        }
    }

    /// A request body chunk: captured for the span; for SigV4, the whole body, signed.
    fn on_request_body(&mut self, mut body: Vec<u8>, end: bool, started: Instant) -> Result<Handled, Status> {
        if self.skips_request_body() {
            return Ok(Handled::Answer(mutation::request_body(), TelemetryPhase::RequestBody, false));
        }
        if let Some(t) = &mut self.tx {
            t.tx.on_request_body(&body);
        }
        let budgeted = self.budget.as_ref().is_some_and(|b| b.waits_for_body());
        if (self.sign.is_some() || budgeted) && !end {
            return Ok(self.partial_body_refused());
        }
        let cont = match self.sign.take() {
            None => budget::Continue::Ready(mutation::request_body()),
            Some(sign) if body.len() > SIGN_INLINE_MAX_BYTES => {
                // Hashing megabytes would hold up every other stream on this worker.
                let shared = self.shared.clone();
                // The budget reads the body too (rare: SigV4 bodies this large on a budgeted route).
                let signed = if budgeted { body.clone() } else { std::mem::take(&mut body) };
                let task = tokio::task::spawn_blocking({
                    let shared = shared.clone();
                    move || sign_body(&shared, &sign, &signed)
                });
                budget::Continue::Later(Box::pin(async move {
                    task.await.unwrap_or_else(|e| {
                        signing_failed(&shared, &sigv4::SignError::Failed(format!("signing task failed: {e}")))
                    })
                }))
            }
            Some(sign) => budget::Continue::Ready(sign_body(&self.shared, &sign, &body)),
        };
        Ok(self.admit(cont, body, TelemetryPhase::RequestBody, started))
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

/// The bytes of header `name`'s first copy (names compared in any case).
fn header<'a>(headers: &'a [HeaderValue], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|h| h.key.eq_ignore_ascii_case(name)).map(header_bytes)
}

/// Header `name` as text: `Some("")` when it is there but not UTF-8, `None` when it is absent.
fn present<'a>(headers: &'a [HeaderValue], name: &str) -> Option<&'a str> {
    header(headers, name).map(|v| std::str::from_utf8(v).unwrap_or(""))
}

/// What a log line shows of an agent-sent string (authority, path, method): at most
/// [`LOGGED_BYTES`], so that requests refused at no cost to the agent cannot make each log line
/// 60 KB.
pub(crate) fn clip(s: &str) -> &str {
    if s.len() <= LOGGED_BYTES {
        return s;
    }
    let mut end = LOGGED_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

const LOGGED_BYTES: usize = 256;

/// Header `name` as text, when it is there and UTF-8.
fn find<'a>(headers: &'a [HeaderValue], name: &str) -> Option<&'a str> {
    header(headers, name).and_then(|v| std::str::from_utf8(v).ok())
}
