//! The Envoy ext_proc gRPC service.
//!
//! One gRPC stream per HTTP request. Each stream is a small state machine polled in place: no
//! task, no channel, no lock. Every message is answered synchronously from the current snapshot.

pub mod mutation;
pub mod server;
pub mod tunnel;

pub use crate::vocab::{ROLE_METADATA, ROLE_TUNNEL};

use std::future::Future as _;

use futures_util::future::BoxFuture;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, HeaderMutation, ProcessingRequest, ProcessingResponse,
};
use serde_json::json;
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use std::time::Instant;

use crate::auth::{Admission, Identity, Peer};
use crate::config::snapshot::Binding;
use crate::config::{Credential, Decision, Snapshot, SnapshotStore};
use crate::inject;
use crate::inject::gcp::{Token, TokenSource};
use crate::inject::sigv4::{self, Signer};
use crate::telemetry::span::{Start, Transaction};
use crate::telemetry::{Metrics, Phase as TelemetryPhase, Sink};
use secrecy::ExposeSecret as _;
use std::borrow::Cow;

/// State shared by every stream.
pub struct Shared {
    pub store: SnapshotStore,
    pub metrics: Arc<Metrics>,
    /// Where finished spans go (nowhere when tracing is off).
    pub sink: Sink,
    /// Which tunnel destinations are reachable besides public addresses.
    pub tunnel: tunnel::TunnelGuard,
}

impl Shared {
    /// Shared state with tracing off.
    pub fn new(store: SnapshotStore, metrics: Arc<Metrics>) -> Self {
        let sink = Sink::new(metrics.clone(), None);
        Shared { store, metrics, sink, tunnel: Default::default() }
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
        // Envoy's tunnel-guard filter names itself in the stream's metadata.
        let tunnel = request.metadata().get(ROLE_METADATA).is_some_and(|v| v.as_bytes() == ROLE_TUNNEL.as_bytes());
        Ok(tonic::Response::new(ProcessStream {
            inner: request.into_inner(),
            tunnel,
            phase: Phase::AwaitRequestHeaders,
            shared: self.shared.clone(),
            tx: None,
            sign: None,
            waiting: None,
            pending: None,
            scrub: None,
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

/// A SigV4 request whose body Envoy is buffering: signed when the body arrives.
pub struct PendingSign {
    signer: Arc<Signer>,
    method: String,
    host: String,
    path: String,
    /// The allowlisted headers the agent sent ([`sigv4::SIGNED_HEADERS`]).
    headers: Vec<(&'static str, String)>,
}

/// Request headers waiting for a GCP access token (the first request, or after expiry) or for
/// a JWKS refetch (a JWT naming a key not held yet).
struct Waiting {
    wait: WaitFor,
    snapshot: Arc<Snapshot>,
    headers: Vec<HeaderValue>,
    has_body: bool,
    peer: Peer,
    started: Instant,
}

enum WaitFor {
    Token(crate::inject::gcp::TokenFuture),
    Keys(futures_util::future::Shared<futures_util::future::BoxFuture<'static, ()>>),
}

impl WaitFor {
    fn of(step_wait: Wait) -> WaitFor {
        match step_wait {
            Wait::Token(source) => WaitFor::Token(Box::pin(async move { source.token().await })),
            Wait::Keys(jwks) => WaitFor::Keys(jwks.refresh()),
        }
    }
}

/// How a request-headers decision is being made: the first time, or again after a wait.
#[derive(Clone, Copy)]
pub enum Resume<'a> {
    First,
    /// After a GCP token fetch, with its outcome.
    Token(Result<&'a Token, &'a str>),
    /// After a JWKS refetch.
    Keys,
}

/// The agent's gateway token: the header it came in, and its value.
type AgentToken<'a> = (&'a str, &'a [u8]);

/// What the request headers wait for.
pub enum Wait {
    Token(Arc<TokenSource>),
    Keys(Arc<crate::auth::jwt::Jwks>),
}

/// The response stream of one HTTP request.
pub struct ProcessStream {
    inner: Streaming<ProcessingRequest>,
    /// A stream of the tunnel guard (CONNECT to an unrouted host), not of a provider request.
    tunnel: bool,
    phase: Phase,
    shared: Arc<Shared>,
    tx: Option<Traced>,
    sign: Option<Box<PendingSign>>,
    waiting: Option<Box<Waiting>>,
    /// An answer being computed off the stream (a large body signed on the blocking pool, a
    /// tunnel target resolved), when its message arrived, and its phase.
    pending: Option<(BoxFuture<'static, ProcessingResponse>, Instant, TelemetryPhase)>,
    /// A request that got a real credential: its response headers are scrubbed of live secret
    /// values before the agent (or a span) sees them.
    scrub: Option<Scrub>,
}

/// What a response may not carry back: every live secret of the snapshot the request was
/// decided on, and the credential minted for it (a GCP access token).
struct Scrub {
    snapshot: Arc<Snapshot>,
    minted: Option<Box<[u8]>>,
    /// The route scrubs response bodies too (`spec.scrubResponseBodies`).
    body: Option<crate::scrub::Streaming>,
}

/// Header names and values, owned (scrubbed copies).
type OwnedHeaders = Vec<(String, Vec<u8>)>;

/// A request that got a real credential.
pub struct Injected {
    /// The credential minted for this request (a GCP token), scrubbed like the live secrets.
    pub minted: Option<Box<[u8]>>,
    pub scrub_bodies: bool,
}

impl Scrub {
    fn secrets(&self) -> impl Iterator<Item = &[u8]> {
        self.snapshot.live_secrets.iter().map(|s| s.expose_secret()).chain(self.minted.as_deref())
    }

    /// The chunk to send on in place of `chunk`, and whether a secret was found in it; `None`
    /// when bodies are not scrubbed or the chunk goes on unchanged.
    fn response_body(&mut self, chunk: &[u8], end: bool) -> Option<(Vec<u8>, bool)> {
        let Scrub { snapshot, minted, body } = self;
        let body = body.as_mut()?;
        let secrets: Vec<&[u8]> =
            snapshot.live_secrets.iter().map(|x| x.expose_secret()).chain(minted.as_deref()).collect();
        let before = body.scrubbed;
        let out = body.chunk(chunk, end, &secrets)?;
        Some((out, body.scrubbed > before))
    }

    /// The response headers with every secret value replaced, and the mutation that does the
    /// same in Envoy; `None` when no header carries one (the common case: no allocation).
    fn response_headers(&self, headers: &[HeaderValue]) -> Option<(OwnedHeaders, HeaderMutation)> {
        let leaks = |v: &[u8]| self.secrets().any(|s| crate::scrub::contains(v, s));
        if !headers.iter().any(|h| !h.key.starts_with(':') && leaks(header_bytes(h))) {
            return None;
        }
        let secrets: Vec<&[u8]> = self.secrets().collect();
        let mut scrubbed: Vec<(String, Vec<u8>)> = Vec::with_capacity(headers.len());
        let mut changed: Vec<(String, Vec<u8>)> = Vec::new();
        for h in headers {
            let mut v = header_bytes(h).to_vec();
            if !h.key.starts_with(':') && leaks(&v) {
                crate::scrub::scrub(&mut v, &secrets, false);
                // Repeated headers of one name become one value (OVERWRITE replaces them all).
                match changed.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(&h.key)) {
                    Some((_, joined)) => {
                        joined.extend_from_slice(b", ");
                        joined.extend_from_slice(&v);
                    }
                    None => changed.push((h.key.to_ascii_lowercase(), v.clone())),
                }
            }
            scrubbed.push((h.key.clone(), v));
        }
        // Values of a changed name that were clean still belong to the one rewritten value.
        for (name, joined) in changed.iter_mut() {
            let clean = headers.iter().filter(|h| h.key.eq_ignore_ascii_case(name) && !leaks(header_bytes(h)));
            for h in clean {
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(header_bytes(h));
            }
        }
        let pairs: Vec<(&str, &[u8])> = changed.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        Some((scrubbed, mutation::set_headers(&pairs)))
    }
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
        if let Some(w) = self.waiting.as_mut() {
            let token = match &mut w.wait {
                WaitFor::Token(f) => {
                    let Poll::Ready(token) = f.as_mut().poll(cx) else { return Poll::Pending };
                    Some(token)
                }
                WaitFor::Keys(f) => {
                    let Poll::Ready(()) = Pin::new(f).poll(cx) else { return Poll::Pending };
                    None
                }
            };
            let w = self.waiting.take().expect("waiting");
            let this = &mut *self;
            let resume = match &token {
                Some(t) => Resume::Token(t.as_ref().map(|t| &**t).map_err(|e| &**e)),
                None => Resume::Keys,
            };
            let outcome = match on_request_headers(&w.snapshot, &this.shared, &w.headers, w.has_body, resume, &w.peer) {
                Step::Answer(outcome) => outcome,
                // A JWKS refetch, then a token fetch: wait again.
                Step::Wait(next) => {
                    this.waiting = Some(Box::new(Waiting { wait: WaitFor::of(next), ..*w }));
                    return self.poll_next(cx);
                }
            };
            this.shared.metrics.observe(TelemetryPhase::RequestHeaders, w.started.elapsed());
            let (resp, end) = this.accept(outcome, w.snapshot);
            if end {
                this.finish_span();
            }
            return Poll::Ready(Some(Ok(resp)));
        }
        if let Some((fut, started, phase)) = self.pending.as_mut() {
            let Poll::Ready(resp) = fut.as_mut().poll(cx) else { return Poll::Pending };
            let (started, phase) = (*started, *phase);
            self.pending = None;
            self.shared.metrics.observe(phase, started.elapsed());
            return Poll::Ready(Some(Ok(resp)));
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
                if end {
                    this.finish_span();
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

/// Bodies up to this size are signed in place; larger ones on the blocking pool (SHA-256 runs at
/// roughly 500 MiB/s here: 256 KiB is half a millisecond).
const SIGN_INLINE_MAX_BYTES: usize = 256 * 1024;

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
        if let Some(i) = outcome.injected {
            let body = i.scrub_bodies.then(crate::scrub::Streaming::default);
            self.scrub = Some(Scrub { snapshot: snapshot.clone(), minted: i.minted, body });
        }
        self.tx = outcome.tx.map(|tx| Traced { tx, snapshot });
        self.sign = outcome.sign;
        (outcome.resp, done)
    }

    /// Answers one message.
    fn handle(&mut self, mut msg: ProcessingRequest, started: Instant) -> Result<Handled, Status> {
        let Some(request) = msg.request.take() else {
            return Err(Status::invalid_argument("ProcessingRequest carries no request phase"));
        };
        let shared = &*self.shared;
        match (request, self.phase) {
            (Request::RequestHeaders(h), Phase::AwaitRequestHeaders) if self.tunnel => {
                self.phase = Phase::AfterRequestHeaders;
                let headers = h.headers.map(|m| m.headers).unwrap_or_default();
                let authority = find(&headers, ":authority").unwrap_or("").to_owned();
                let (guard, snapshot, shared) = (shared.tunnel.clone(), shared.store.load_full(), self.shared.clone());
                let fut = async move {
                    let decision = tunnel::decide(authority.clone(), snapshot, guard).await;
                    tunnel::answer(&shared, &authority, decision)
                };
                self.pending = Some((Box::pin(fut), started, TelemetryPhase::RequestHeaders));
                Ok(Handled::Pending)
            }
            (Request::RequestHeaders(h), Phase::AwaitRequestHeaders) => {
                self.phase = Phase::AfterRequestHeaders;
                let has_body = !h.end_of_stream;
                let headers = h.headers.map(|m| m.headers).unwrap_or_default();
                let snapshot = shared.store.load_full();
                let peer = peer(&msg.attributes);
                match on_request_headers(&snapshot, shared, &headers, has_body, Resume::First, &peer) {
                    Step::Answer(outcome) => {
                        let (resp, end) = self.accept(outcome, snapshot);
                        Ok(Handled::Answer(resp, TelemetryPhase::RequestHeaders, end))
                    }
                    Step::Wait(w) => {
                        let wait = WaitFor::of(w);
                        self.waiting = Some(Box::new(Waiting { wait, snapshot, headers, has_body, peer, started }));
                        Ok(Handled::Wait)
                    }
                }
            }
            (Request::RequestHeaders(_), _) => {
                Err(Status::failed_precondition("request_headers received twice on one stream"))
            }
            (other, Phase::AwaitRequestHeaders) => {
                Err(Status::failed_precondition(format!("{} received before request_headers", phase_name(&other))))
            }
            (Request::RequestBody(b), _) => {
                if let Some(t) = &mut self.tx {
                    t.tx.on_request_body(&b.body);
                }
                let Some(sign) = self.sign.take() else {
                    return Ok(Handled::Answer(mutation::request_body(), TelemetryPhase::RequestBody, false));
                };
                if !b.end_of_stream {
                    // BUFFERED sends the whole body at once; anything else cannot be signed.
                    return Err(Status::failed_precondition(
                        "SigV4 needs the whole request body in one message (request_body_mode BUFFERED)",
                    ));
                }
                if b.body.len() > SIGN_INLINE_MAX_BYTES {
                    // Hashing megabytes would hold up every other stream on this worker.
                    let shared = self.shared.clone();
                    let body = b.body;
                    let task = tokio::task::spawn_blocking({
                        let shared = shared.clone();
                        move || sign_body(&shared, &sign, &body)
                    });
                    let fut = async move {
                        task.await.unwrap_or_else(|e| signing_failed(&shared, &format!("signing task failed: {e}")))
                    };
                    self.pending = Some((Box::pin(fut), started, TelemetryPhase::RequestBody));
                    return Ok(Handled::Pending);
                }
                let resp = sign_body(shared, &sign, &b.body);
                Ok(Handled::Answer(resp, TelemetryPhase::RequestBody, false))
            }
            (Request::ResponseHeaders(h), _) => {
                let mut mode = None;
                let end = h.end_of_stream;
                let headers = h.headers.map(|m| m.headers).unwrap_or_default();
                let scrubbed = self.scrub.as_ref().and_then(|s| s.response_headers(&headers));
                if scrubbed.is_some() {
                    Metrics::inc(&shared.metrics.secrets_scrubbed_from_responses);
                    tracing::warn!("the upstream's response headers carried a live secret value; scrubbed");
                }
                if let Some(t) = &mut self.tx {
                    let pairs: Vec<(&str, &[u8])> = match &scrubbed {
                        Some((s, _)) => s.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect(),
                        None => headers.iter().map(|h| (h.key.as_str(), header_bytes(h))).collect(),
                    };
                    t.tx.on_response_headers(&pairs);
                    if !end && t.tx.wants_response_body() {
                        mode = Some(mutation::mode(mutation::RequestBody::None, true));
                    }
                }
                let mut m = scrubbed.map(|(_, m)| m);
                if !end && self.scrub.as_ref().is_some_and(|s| s.body.is_some()) {
                    // Scrubbing changes the body's length: the agent gets it chunked.
                    m.get_or_insert_with(HeaderMutation::default).remove_headers.push("content-length".into());
                    mode = Some(mutation::mode(mutation::RequestBody::None, true));
                }
                let resp = mutation::response_headers(m, mode);
                Ok(Handled::Answer(resp, TelemetryPhase::ResponseHeaders, end))
            }
            (Request::ResponseBody(b), _) => {
                if let Some(t) = &mut self.tx {
                    t.tx.on_response_body(&b.body);
                }
                let replaced = self.scrub.as_mut().and_then(|s| s.response_body(&b.body, b.end_of_stream));
                let resp = match replaced {
                    Some((body, found)) => {
                        if found {
                            Metrics::inc(&shared.metrics.secrets_scrubbed_from_responses);
                            tracing::warn!("the upstream's response body carried a live secret value; scrubbed");
                        }
                        mutation::response_body_with(body)
                    }
                    None => mutation::response_body(),
                };
                Ok(Handled::Answer(resp, TelemetryPhase::ResponseBody, b.end_of_stream))
            }
            (Request::RequestTrailers(_), _) => {
                Ok(Handled::Answer(mutation::request_trailers(), TelemetryPhase::Trailers, false))
            }
            (Request::ResponseTrailers(_), _) => {
                Ok(Handled::Answer(mutation::response_trailers(), TelemetryPhase::Trailers, true))
            }
        }
    }
}

impl PendingSign {
    /// The signature headers for this request with `body`.
    fn sign(&self, body: &[u8]) -> Result<Vec<(&'static str, String)>, String> {
        let headers: Vec<(&str, &str)> = self.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let req = sigv4::Request { method: &self.method, host: &self.host, path: &self.path, headers: &headers, body };
        self.signer.sign(&req, std::time::SystemTime::now())
    }
}

/// Signs a buffered request body; the signature headers go out with it.
fn sign_body(shared: &Shared, sign: &PendingSign, body: &[u8]) -> ProcessingResponse {
    match sign.sign(body) {
        Ok(signed) => {
            let pairs: Vec<(&str, &[u8])> = signed.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
            mutation::request_body_with(mutation::set_headers(&pairs))
        }
        Err(e) => signing_failed(shared, &e),
    }
}

fn signing_failed(shared: &Shared, error: &str) -> ProcessingResponse {
    Metrics::inc(&shared.metrics.denied_credential_unavailable);
    tracing::warn!(error, "SigV4 signing failed; answering 503 (fail closed)");
    let body = json!({"error": {
        "type": "credential_unavailable",
        "message": "keyswap could not sign this request; it was not forwarded",
        "reason": "SigningFailed",
    }});
    mutation::immediate(503, &body, "keyswap_signing_failed")
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

/// The downstream connection as Envoy reports it in `request_attributes` (`source.address`,
/// `connection.mtls`); absent attributes mean "not trusted".
fn peer(attributes: &std::collections::HashMap<String, envoy_types::pb::google::protobuf::Struct>) -> Peer {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(fields) = attributes.get("envoy.filters.http.ext_proc").map(|s| &s.fields) else {
        return Peer::default();
    };
    let mtls = matches!(fields.get("connection.mtls").and_then(|v| v.kind.as_ref()), Some(Kind::BoolValue(true)));
    let source = match fields.get("source.address").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(a)) => {
            a.parse::<std::net::SocketAddr>().map(|s| s.ip()).ok().or_else(|| a.parse::<std::net::IpAddr>().ok())
        }
        _ => None,
    };
    Peer { mtls, source }
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
/// `resume` says whether this is the first pass or a retry after a wait (a GCP token fetch, with
/// its outcome, or a JWKS refetch); `peer` is the downstream connection as Envoy reports it.
pub fn on_request_headers(
    snapshot: &Snapshot,
    shared: &Shared,
    headers: &[HeaderValue],
    has_body: bool,
    resume: Resume<'_>,
    peer: &Peer,
) -> Step {
    let metrics = &shared.metrics;
    let fetched = match resume {
        Resume::Token(t) => Some(t),
        Resume::First | Resume::Keys => None,
    };
    if matches!(resume, Resume::First) {
        Metrics::inc(&metrics.requests);
    }
    let authority = find(headers, ":authority").or_else(|| find(headers, "host")).unwrap_or("");
    let path = find(headers, ":path").unwrap_or("/");
    let path_only = path.split_once('?').map_or(path, |(p, _)| p);
    let tracing_on = shared.sink.tracing();
    let pairs = || headers.iter().map(|h| (h.key.as_str(), header_bytes(h))).collect::<Vec<_>>();
    // Agent admission (spec.agentAuth) comes first: no decision for a caller it refuses.
    let mut rejected = None;
    let (identity, agent_token): (Option<Cow<'_, Identity>>, Option<AgentToken<'_>>) = match &snapshot.agent_auth {
        None => (None, None),
        Some(chain) => {
            let presented = crate::auth::agent_token(headers.iter().map(|h| (h.key.as_str(), header_bytes(h))));
            let header = |n: &str| find(headers, n);
            let admission = chain.admit(presented.map(|(_, t)| t), peer, header, std::time::SystemTime::now());
            if fetched.is_none() {
                chain.counters.count(&admission);
            }
            match admission {
                Admission::Admitted(id) => (Some(id), presented),
                Admission::Anonymous => (None, None),
                Admission::Rejected(r) => {
                    rejected = Some(r);
                    (None, None)
                }
                Admission::NeedKeys(jwks) => return Step::Wait(Wait::Keys(jwks)),
            }
        }
    };
    let identity = identity.as_deref();
    // Identity headers from a trusted hop never leave the gateway, trusted or not.
    let edge_headers: &[Box<str>] = snapshot.agent_auth.as_ref().map_or(&[], |c| &c.edge_headers);
    let start = |provider: Option<&'static crate::provider::Provider>,
                 route: &str,
                 policy: Option<&str>,
                 binding: Option<&Binding>,
                 injected: bool,
                 smuggled: bool,
                 error: Option<&'static str>| {
        let mut buf = [0u8; 256];
        let host = crate::target::host(authority, &mut buf).unwrap_or(authority).to_owned();
        let redacted =
            binding.map_or(std::borrow::Cow::Borrowed(path), |b| inject::query::redact(path, &b.strip.query));
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
            redact_also: binding.and_then(|b| b.strip.headers.last().map(|h| &**h)),
            error,
            identity,
            tenant_label: snapshot.agent_auth.as_ref().zip(identity).map(|(c, id)| c.counters.label(id)),
        };
        Transaction::start(&s, &pairs(), &snapshot.capture)
    };
    let answer = |resp, tx, sign| Step::Answer(Outcome { resp, tx, sign, injected: None });
    // The span of a request keyswap answers itself: on a matched route, or before any route.
    let denied_span = |entry: Option<&crate::config::snapshot::MatchEntry>, error: &'static str| {
        tracing_on.then(|| {
            let (tx, _) = match entry {
                Some(e) => start(
                    Some(e.provider),
                    &e.route,
                    e.binding.policy.as_deref(),
                    Some(&e.binding),
                    false,
                    false,
                    Some(error),
                ),
                None => start(None, "-", None, None, false, false, Some(error)),
            };
            Box::new(tx)
        })
    };
    let fail_closed = |entry: &crate::config::snapshot::MatchEntry, reason: &str, detail: &str| {
        Metrics::inc(&metrics.denied_credential_unavailable);
        let policy = entry.binding.policy.as_deref();
        tracing::warn!(
            route = %entry.route, policy = policy.unwrap_or("-"), reason, detail,
            "credential unavailable; answering 503 (fail closed)"
        );
        let body = json!({"error": {
            "type": "credential_unavailable",
            "message": "keyswap could not resolve the credential for this route; the request was not forwarded",
            "route": &*entry.route,
            "policy": policy,
            "reason": reason,
        }});
        let tx = denied_span(Some(entry), "credential_unavailable");
        answer(mutation::immediate(503, &body, "keyswap_credential_unavailable"), tx, None)
    };
    if let Some(r) = rejected {
        Metrics::inc(&metrics.denied_unauthenticated);
        tracing::info!(authority, path = path_only, reason = r.reason(), "agent not admitted; answering 401");
        let body = json!({"error": {
            "type": "agent_unauthenticated",
            "reason": r.reason(),
            "message": r.message(),
            "gateway": snapshot.gateway.to_string(),
        }});
        let tx = denied_span(None, r.reason());
        return answer(mutation::immediate(401, &body, "keyswap_agent_unauthenticated"), tx, None);
    }
    let tenant = identity.and_then(|i| i.tenant.as_deref());
    let method = find(headers, ":method").unwrap_or("GET");
    let decision = match crate::target::check_method(method) {
        Err(r) => Decision::Refused(r),
        Ok(()) => snapshot.decide(authority, path, tenant),
    };
    match decision {
        Decision::Refused(r) => {
            Metrics::inc(metrics.refused(r));
            tracing::warn!(?authority, path = ?path_only, method = ?method, reason = r.reason(), "request target refused");
            let body = json!({"error": {"type": "request_refused", "reason": r.reason(), "message": r.message()}});
            let tx = denied_span(None, r.reason());
            answer(mutation::immediate(r.status(), &body, "keyswap_request_refused"), tx, None)
        }
        Decision::Inject { entry, credential } => {
            let binding = &entry.binding;
            // Provider authentication: a token to fetch, or a body too large to sign.
            // Holds the cached token alive while the plan borrows its bytes.
            let cached: Option<Arc<Token>>;
            let token = match credential {
                Credential::GcpToken(source) => match fetched {
                    Some(Ok(t)) => Some(t.header.expose_secret()),
                    Some(Err(e)) => return fail_closed(entry, "TokenUnavailable", e),
                    None => {
                        cached = source.cached();
                        match &cached {
                            Some(t) => Some(t.header.expose_secret()),
                            None => return Step::Wait(Wait::Token(source.clone())),
                        }
                    }
                },
                _ => None,
            };
            let sigv4_signer = match credential {
                Credential::AwsV4(s) => Some(s),
                _ => None,
            };
            if sigv4_signer.is_some() && has_body {
                let len = find(headers, "content-length").and_then(|v| v.trim().parse::<usize>().ok());
                if len.is_some_and(|l| l > sigv4::MAX_BODY_BYTES) {
                    return answer(too_large(metrics, entry, len.unwrap_or(0)), None, None);
                }
            }
            let mut plan = inject::plan(
                &binding.strip,
                credential,
                token,
                headers.iter().map(|h| (h.key.as_str(), header_bytes(h))),
                path,
                agent_token.map(|(_, t)| t),
            );
            plan.remove.extend(edge_headers.iter().map(|h| &**h).filter(|h| find(headers, h).is_some()));
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
            // SigV4: sign now when there is no body, else once Envoy has buffered it.
            let mut signed = Vec::new();
            let mut sign = None;
            if let Some(signer) = sigv4_signer {
                let pending = PendingSign {
                    signer: signer.clone(),
                    method: find(headers, ":method").unwrap_or("GET").to_owned(),
                    host: sigv4::upstream_host(authority).to_ascii_lowercase(),
                    path: plan.path.clone().unwrap_or_else(|| path.to_owned()),
                    headers: sigv4::SIGNED_HEADERS
                        .iter()
                        .filter_map(|n| find(headers, n).map(|v| (*n, v.to_owned())))
                        .collect(),
                };
                if has_body {
                    sign = Some(Box::new(pending));
                } else {
                    match pending.sign(b"") {
                        Ok(h) => signed = h,
                        Err(e) => return answer(signing_failed(shared, &e), None, None),
                    }
                }
            }
            let body_mode = if sign.is_some() { mutation::RequestBody::Whole } else { mutation::RequestBody::None };
            let mut extra: Vec<(&str, &[u8])> = signed.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
            // The response headers come back to keyswap to be scrubbed of secrets (mode below).
            let minted = token.map(|t| Box::from(t.strip_prefix(b"Bearer ").unwrap_or(t)));
            let scrub_bodies = entry.scrub_response_bodies;
            let injected = |resp, tx, sign| {
                let injected = Some(Injected { minted: minted.clone(), scrub_bodies });
                Step::Answer(Outcome { resp, tx, sign, injected })
            };
            if !tracing_on {
                let m = mutation::header_mutation(&plan, &extra);
                return injected(
                    mutation::request_headers(Some(m), Some(mutation::mode(body_mode, false))),
                    None,
                    sign,
                );
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
            extra.push(("traceparent", traceparent.as_bytes()));
            let m = mutation::header_mutation(&plan, &extra);
            let body_mode = match body_mode {
                mutation::RequestBody::None if has_body && tx.wants_request_body() => mutation::RequestBody::Capture,
                other => other,
            };
            let mode = mutation::mode(body_mode, false);
            injected(mutation::request_headers(Some(m), Some(mode)), Some(Box::new(tx)), sign)
        }
        Decision::FailClosed { entry, reason } => {
            let detail = reason.to_string();
            fail_closed(entry, reason.reason(), &detail)
        }
        Decision::TenantNotMapped { entry } => {
            Metrics::inc(&metrics.denied_tenant_not_mapped);
            let policy = entry.binding.policy.as_deref();
            tracing::warn!(
                route = %entry.route, policy = policy.unwrap_or("-"), tenant = tenant.unwrap_or("(anonymous)"),
                "no credential for this tenant and the policy's fallback is Deny; answering 403"
            );
            let body = json!({"error": {
                "type": "tenant_credential_unavailable",
                "reason": "tenant_not_mapped",
                "message": "the policy has no key for the caller's tenant and does not fall back to a default",
                "route": &*entry.route,
                "policy": policy,
                "tenant": tenant,
            }});
            let tx = denied_span(Some(entry), "tenant_not_mapped");
            answer(mutation::immediate(403, &body, "keyswap_tenant_not_mapped"), tx, None)
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
            let tx = denied_span(None, "no_route");
            answer(mutation::immediate(403, &body, "keyswap_no_route"), tx, None)
        }
        Decision::PassThrough { allowed_by } => {
            Metrics::inc(&metrics.passed_through);
            tracing::debug!(authority, path = path_only, allowed_by, "no route; passed through untouched");
            // The agent's gateway token and edge identity headers never leave the gateway, even to
            // an allowed host.
            let mut remove: Vec<&str> = agent_token.map(|(name, _)| name).into_iter().collect();
            remove.extend(edge_headers.iter().map(|h| &**h).filter(|h| find(headers, h).is_some()));
            let m = (!remove.is_empty()).then(|| {
                let plan = inject::Plan { remove, ..Default::default() };
                mutation::header_mutation(&plan, &[])
            });
            answer(mutation::request_headers(m, None), None, None)
        }
    }
}

fn too_large(metrics: &Metrics, entry: &crate::config::snapshot::MatchEntry, len: usize) -> ProcessingResponse {
    Metrics::inc(&metrics.denied_too_large);
    tracing::warn!(
        route = %entry.route, content_length = len, limit = sigv4::MAX_BODY_BYTES,
        "request body too large to sign; answering 413"
    );
    let body = json!({"error": {
        "type": "request_too_large",
        "message": format!(
            "SigV4 signing needs the whole request body; keyswap signs bodies up to {} bytes and this one is {len}",
            sigv4::MAX_BODY_BYTES
        ),
        "route": &*entry.route,
        "limit": sigv4::MAX_BODY_BYTES,
    }});
    mutation::immediate(413, &body, "keyswap_body_too_large")
}
