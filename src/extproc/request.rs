//! The request-headers decision: who is calling, which route, and what Envoy is told to do.
//!
//! [`on_request_headers`] reads one request's headers against one snapshot and answers with the
//! header mutation (the agent's credentials stripped, the real one written), or with keyswap's
//! own refusal (401, 403, 405, 413, 503). Each outcome is one method of [`Incoming`], so the
//! path a request takes reads top to bottom in `on_request_headers`.

use std::borrow::Cow;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use secrecy::ExposeSecret as _;
use serde_json::json;

use super::{
    clip, find, header_bytes, mutation, present, AgentToken, Injected, Outcome, PendingSign, Resume, Shared, Step, Wait,
};
use crate::auth::{Admission, Identity, Peer, Rejection};
use crate::budget::Places;
use crate::config::snapshot::MatchEntry;
use crate::config::{Credential, Decision, Snapshot};
use crate::inject::gcp::{Token, TokenSource};
use crate::inject::sigv4::{self, Signer};
use crate::inject::{self, Plan};
use crate::target::Refused;
use crate::telemetry::span::{Start, Transaction};
use crate::telemetry::Metrics;

/// The request-headers decision, answered from `snapshot`; with tracing on, the transaction.
/// `resume` says whether this is the first pass or a retry after a wait (a GCP token fetch, with
/// its outcome, or a JWKS refetch); `peer` is the downstream connection as Envoy reports it.
pub fn on_request_headers(
    snapshot: &Arc<Snapshot>,
    shared: &Shared,
    headers: &[HeaderValue],
    has_body: bool,
    resume: Resume<'_>,
    peer: &Peer,
) -> Step {
    if matches!(resume, Resume::First) {
        Metrics::inc(&shared.metrics.requests);
    }
    // After a JWKS refetch, a key still unknown to that source is refused, never waited for
    // again (another source, one the chain reached only now, may still be fetched once).
    let refetched = match &resume {
        Resume::Keys(jwks) => Some(jwks.clone()),
        _ => None,
    };
    let after_token = matches!(resume, Resume::Token(..));
    let (fetched, held) = match resume {
        Resume::Token(t, held) => (t, held),
        Resume::First | Resume::Keys(_) => (None, Places::default()),
    };
    let mut req = Incoming::new(snapshot, shared, headers, has_body);
    req.held = std::cell::Cell::new(held);
    // Agent admission (spec.agentAuth) comes first: no decision for a caller it refuses.
    if let Some(chain) = &snapshot.agent_auth {
        let presented = crate::auth::agent_token(req.pairs_iter());
        let header = |n: &str| {
            let copies = headers.iter().filter(|h| h.key.eq_ignore_ascii_case(n));
            crate::auth::single_value(copies.map(super::header_bytes))
        };
        let admission = chain.admit(presented.map(|(_, t)| t), peer, header, std::time::SystemTime::now());
        if !after_token {
            chain.counters.count(&admission);
        }
        match admission {
            Admission::Admitted(id) => (req.identity, req.agent_token) = (Some(id), presented),
            Admission::Anonymous => {}
            Admission::Rejected(r) => return req.unauthenticated(&r),
            Admission::NeedKeys(jwks) if refetched.as_ref().is_some_and(|r| std::sync::Arc::ptr_eq(r, &jwks)) => {
                return req.unauthenticated(&crate::auth::Rejection::InvalidToken)
            }
            Admission::NeedKeys(jwks) => return Step::Wait(Wait::Keys(jwks)),
        }
    }
    let in_query = crate::inject::query::method_overrides(req.path);
    let overrides = headers.iter().filter(|h| crate::target::is_method_override(&h.key)).map(super::header_bytes);
    let overrides = overrides.chain(in_query.iter().map(Vec::as_slice));
    let decision = match crate::target::check_methods(req.method, overrides) {
        Err(r) => Decision::Refused(r),
        Ok(creates) => {
            req.creates = creates;
            snapshot.decide(req.authority, req.path, req.tenant())
        }
    };
    // A path another header overrides is refused where a key would go with it.
    let overridden = || headers.iter().any(|h| crate::target::is_path_override(&h.key));
    let decision = match decision {
        Decision::Inject { .. } if overridden() => Decision::Refused(crate::target::Refused::MalformedPath),
        d => d,
    };
    match decision {
        Decision::Refused(r) => req.refused(r),
        Decision::Inject { entry, credential } => req.inject(entry, credential, fetched),
        Decision::FailClosed { entry, reason } => req.fail_closed(entry, reason.reason(), &reason.to_string()),
        Decision::TenantNotMapped { entry } => req.tenant_not_mapped(entry),
        Decision::Deny => req.no_route(),
        Decision::PassThrough { allowed_by } => req.pass_through(allowed_by),
    }
}

/// One request's headers as the decision reads them, borrowed from the message and snapshot.
struct Incoming<'a> {
    snapshot: &'a Arc<Snapshot>,
    shared: &'a Shared,
    headers: &'a [HeaderValue],
    has_body: bool,
    authority: &'a str,
    path: &'a str,
    /// `path` without its query (for logs).
    path_only: &'a str,
    method: &'a str,
    /// The request creates something upstream, by its method or a method override
    /// ([`crate::target::check_methods`]).
    creates: bool,
    /// Who the gateway's agentAuth admitted (`None`: no agentAuth, or anonymous).
    identity: Option<Cow<'a, Identity>>,
    /// The agent's gateway token: stripped like any credential, but not counted as smuggling.
    agent_token: Option<AgentToken<'a>>,
    /// Identity headers from a trusted hop: they never leave the gateway, trusted or not.
    edge_headers: &'a [Box<str>],
    /// The places the request held while it waited for a token: kept by the decision.
    held: std::cell::Cell<Places>,
}

/// Which route a span describes (`None` fields: a request refused before any route).
type SpanRoute<'a> = Option<&'a MatchEntry>;

impl<'a> Incoming<'a> {
    fn new(snapshot: &'a Arc<Snapshot>, shared: &'a Shared, headers: &'a [HeaderValue], has_body: bool) -> Self {
        // What is missing or not UTF-8 reads as empty, which every check refuses: never as a
        // default that passes them (`/`, `GET`), nor as the next header (`host` for a bad
        // `:authority`), while Envoy forwards the bytes as they are.
        let path = present(headers, ":path").unwrap_or("");
        Incoming {
            snapshot,
            shared,
            headers,
            has_body,
            authority: present(headers, ":authority").or_else(|| present(headers, "host")).unwrap_or(""),
            path,
            path_only: path.split_once('?').map_or(path, |(p, _)| p),
            method: present(headers, ":method").unwrap_or(""),
            creates: false,
            identity: None,
            agent_token: None,
            edge_headers: snapshot.agent_auth.as_ref().map_or(&[], |c| &c.edge_headers),
            held: Default::default(),
        }
    }

    /// Whether this request gets a span (tracing is on and the sampler says so), and the trace
    /// id the sampler decided on.
    fn sampled(&self) -> Option<crate::telemetry::span::TraceId> {
        self.shared.sink.sampled(find(self.headers, "traceparent"))
    }

    fn pairs_iter(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + Clone {
        self.headers.iter().map(|h| (h.key.as_str(), header_bytes(h)))
    }

    fn tenant(&self) -> Option<&str> {
        self.identity.as_deref().and_then(|i| i.tenant.as_deref())
    }

    /// Edge identity headers the agent's request carries (removed from what goes upstream).
    fn present_edge_headers(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.edge_headers.iter().map(|h| &**h).filter(|h| find(self.headers, h).is_some())
    }

    /// Starts the span of this request on `route`; returns it with the `traceparent` to send on.
    fn span(
        &self,
        root_trace_id: crate::telemetry::span::TraceId,
        route: SpanRoute<'_>,
        injected: bool,
        smuggled: bool,
        error: Option<&'static str>,
    ) -> (Transaction, String) {
        let mut buf = [0u8; 256];
        let host = crate::target::host(self.authority, &mut buf).unwrap_or(self.authority).to_owned();
        let binding = route.map(|e| &*e.binding);
        let provider = route.map(|e| e.provider);
        // A request that matched no route: the parameters every route strips.
        static EVERY_ROUTE: std::sync::LazyLock<Box<[Box<str>]>> = std::sync::LazyLock::new(|| {
            crate::provider::CREDENTIAL_QUERY_PARAMS.iter().map(|q| Box::from(*q)).collect()
        });
        let redacted = inject::query::redact(self.path, binding.map_or(&EVERY_ROUTE[..], |b| &b.strip.query));
        let path_model = provider.and_then(|p| p.model_from_path(self.path));
        let identity = self.identity.as_deref();
        let s = Start {
            provider,
            route: route.map(|e| &*e.route),
            policy: binding.and_then(|b| b.policy.as_deref()),
            method: self.method,
            scheme: find(self.headers, ":scheme").unwrap_or("https"),
            authority: self.authority,
            host: &host,
            redacted_path: &redacted,
            request_model: path_model.as_deref(),
            injected,
            smuggled,
            redact_also: binding.and_then(|b| b.strip.headers.last().map(|h| &**h)),
            error,
            identity,
            tenant_label: self.snapshot.agent_auth.as_ref().zip(identity).map(|(c, id)| c.counters.label(id)),
            root_trace_id,
        };
        let pairs: Vec<(&str, &[u8])> = self.pairs_iter().collect();
        Transaction::start(&s, &pairs, &self.snapshot.capture)
    }

    /// keyswap's own answer (`status`, a JSON error `body`), with the span of a request it
    /// answered itself when tracing is on.
    fn deny(
        &self,
        route: SpanRoute<'_>,
        error: &'static str,
        status: u16,
        body: &serde_json::Value,
        details: &str,
    ) -> Step {
        let tx = self.sampled().map(|id| {
            let mut tx = Box::new(self.span(id, route, false, false, Some(error)).0);
            tx.answered(status);
            tx
        });
        answer(mutation::immediate(status, body, details), tx, None)
    }

    fn unauthenticated(&self, r: &Rejection) -> Step {
        Metrics::inc(&self.shared.metrics.denied_unauthenticated);
        let (authority, path) = (clip(self.authority), clip(self.path_only));
        let status = r.status();
        tracing::info!(authority, path, reason = r.reason(), status, "agent not admitted");
        let kind = if status == 401 { "agent_unauthenticated" } else { "agent_forbidden" };
        let body = json!({"error": {
            "type": kind,
            "reason": r.reason(),
            "message": r.message(),
            "gateway": self.snapshot.gateway.to_string(),
        }});
        self.deny(None, r.reason(), status, &body, "keyswap_agent_unauthenticated")
    }

    fn refused(&self, r: Refused) -> Step {
        Metrics::inc(self.shared.metrics.refused(r));
        let (authority, path, method) = (clip(self.authority), clip(self.path_only), clip(self.method));
        tracing::warn!(?authority, ?path, ?method, reason = r.reason(), "request target refused");
        let body = json!({"error": {"type": "request_refused", "reason": r.reason(), "message": r.message()}});
        self.deny(None, r.reason(), r.status(), &body, "keyswap_request_refused")
    }

    fn fail_closed(&self, entry: &MatchEntry, reason: &str, detail: &str) -> Step {
        Metrics::inc(&self.shared.metrics.denied_credential_unavailable);
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
        self.deny(Some(entry), "credential_unavailable", 503, &body, "keyswap_credential_unavailable")
    }

    /// A body SigV4 would have to sign whole, larger than keyswap signs: 413 before anything is
    /// buffered or sent.
    fn too_large(&self, entry: &MatchEntry, len: usize) -> Step {
        Metrics::inc(&self.shared.metrics.denied_too_large);
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
        self.deny(Some(entry), "request_too_large", 413, &body, "keyswap_body_too_large")
    }

    /// A compressed body on a route whose token budgets read it: its size bounds nothing and its
    /// output limit cannot be read, so it is refused (415) rather than reserved for too little.
    fn encoded_body(&self, entry: &MatchEntry, encoding: &str) -> Step {
        Metrics::inc(&self.shared.metrics.denied_encoded_body);
        tracing::warn!(route = %entry.route, content_encoding = ?encoding, "compressed request body on a route with token budgets; answering 415");
        let body = json!({"error": {
            "type": "request_body_encoded",
            "message": "this route's token budgets read the request body to reserve what it may cost; send it without content-encoding",
            "route": &*entry.route,
        }});
        self.deny(Some(entry), "request_body_encoded", 415, &body, "keyswap_body_encoded")
    }

    /// 429: the caller's key has as many requests in flight as a budget allows. Answered at the
    /// headers, before Envoy reads (and buffers) the body.
    fn in_flight_limited(&self, entry: SpanRoute<'_>, l: &crate::budget::Limited) -> Step {
        let route = entry.map_or("-", |e| &*e.route);
        tracing::debug!(route, budget = %l.budget, limit = l.limit, "requests in flight at the budget's concurrentRequests; answering 429");
        let tx = self.sampled().map(|id| {
            let mut tx = Box::new(self.span(id, entry, false, false, Some("budget_exhausted")).0);
            tx.on_budget("limited", Some(&l.budget), None, Some(("budget_exhausted", 429)));
            tx.answered(429);
            tx
        });
        answer(super::budget::limited(l), tx, None)
    }

    fn tenant_not_mapped(&self, entry: &MatchEntry) -> Step {
        Metrics::inc(&self.shared.metrics.denied_tenant_not_mapped);
        let policy = entry.binding.policy.as_deref();
        let tenant = self.tenant();
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
        self.deny(Some(entry), "tenant_not_mapped", 403, &body, "keyswap_tenant_not_mapped")
    }

    fn no_route(&self) -> Step {
        Metrics::inc(&self.shared.metrics.denied_no_route);
        let (gateway, authority, path) = (&self.snapshot.gateway, clip(self.authority), clip(self.path_only));
        tracing::info!(%gateway, authority, path, "no route matches on a deny-all gateway; answering 403");
        let body = json!({"error": {
            "type": "egress_denied",
            "message": "no AIProviderRoute matches this request and the gateway denies by default",
            "gateway": gateway.to_string(),
            "host": authority,
        }});
        self.deny(None, "no_route", 403, &body, "keyswap_no_route")
    }

    fn pass_through(&self, allowed_by: &str) -> Step {
        Metrics::inc(&self.shared.metrics.passed_through);
        tracing::debug!(
            authority = self.authority,
            path = self.path_only,
            allowed_by,
            "no route; passed through untouched"
        );
        // The agent's gateway token and edge identity headers never leave the gateway, even to
        // an allowed host.
        let mut remove: Vec<&str> = self.agent_token.map(|(name, _)| name).into_iter().collect();
        remove.extend(self.present_edge_headers());
        let m = (!remove.is_empty()).then(|| mutation::header_mutation(&Plan { remove, ..Default::default() }, &[]));
        // The gateway's budgets bound these requests in flight too: on a host whose phases are
        // fixed, Envoy buffers their bodies as it does a budgeted route's.
        let places = match self.unrouted_places() {
            Ok(p) => p,
            Err(l) => return self.in_flight_limited(None, &l),
        };
        let resp = mutation::request_headers(m, None);
        Step::Answer(Outcome { resp, tx: None, sign: None, injected: None, budget: None, places })
    }

    /// The places of a request no route matches, in the gateway's budgets that limit requests in
    /// flight (`-` stands for the route in their keys).
    fn unrouted_places(&self) -> Result<Places, crate::budget::Limited> {
        let budgets = &self.snapshot.gateway_budgets;
        if !budgets.iter().any(|b| b.concurrent.is_some()) {
            return Ok(Places::default());
        }
        let keys = crate::budget::keys(budgets, self.identity.as_deref(), "-");
        self.shared.budgets.enter(budgets, &keys)
    }

    /// A matched route with a credential: strip, write, and (SigV4) sign.
    fn inject(&self, entry: &MatchEntry, credential: &Credential, fetched: Option<Result<&Token, &str>>) -> Step {
        // Provider authentication: a token to fetch. Holds the cached token alive while the plan
        // borrows its bytes.
        let cached: Option<Arc<Token>>;
        let token = match credential {
            Credential::GcpToken(source) => match fetched {
                Some(Ok(t)) => Some(t.header.expose_secret()),
                Some(Err(e)) => return self.fail_closed(entry, "TokenUnavailable", e),
                None => {
                    cached = source.cached();
                    match &cached {
                        Some(t) => Some(t.header.expose_secret()),
                        None => return self.park_for_token(entry, source),
                    }
                }
            },
            _ => None,
        };
        let signer = match credential {
            Credential::AwsV4(s) => Some(s),
            _ => None,
        };
        if signer.is_some() && self.has_body {
            let len = find(self.headers, "content-length").and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(len) = len.filter(|l| *l > sigv4::MAX_BODY_BYTES) {
                return self.too_large(entry, len);
            }
        }
        let agent_token = self.agent_token.map(|(_, t)| t);
        let mut plan = inject::plan(&entry.binding.strip, credential, token, self.pairs_iter(), self.path, agent_token);
        plan.remove.extend(self.present_edge_headers());
        let metrics = &self.shared.metrics;
        let policy = entry.binding.policy.as_deref().unwrap_or("-");
        if !plan.smuggled.is_empty() {
            Metrics::inc(&metrics.smuggle_attempts);
            tracing::warn!(
                route = %entry.route, policy, credentials = ?plan.smuggled,
                "agent sent credentials of its own; stripped before injecting"
            );
        }
        Metrics::inc(&metrics.injections);
        tracing::debug!(route = %entry.route, policy, provider = entry.provider.name, path = self.path_only, "credential injected");
        // SigV4: sign now when there is no body, else once Envoy has buffered it.
        let mut signed = Vec::new();
        let mut sign = None;
        if let Some(signer) = signer {
            let pending = self.pending_sign(signer, &plan);
            if self.has_body {
                sign = Some(Box::new(pending));
            } else {
                match pending.sign(b"") {
                    Ok(h) => signed = h,
                    Err(e) => {
                        let body = super::sign::signing_failed_body(self.shared, &e);
                        return self.deny(Some(entry), "signing_failed", 503, &body, super::sign::SIGNING_FAILED);
                    }
                }
            }
        }
        let minted = token.map(|t| Box::from(t.strip_prefix(b"Bearer ").unwrap_or(t)));
        let injected = Injected { minted, scrub_bodies: entry.scrub_response_bodies, binding: entry.binding.clone() };
        self.injected(entry, &plan, &signed, sign, injected)
    }

    /// The route's token budgets for this request, if it has any.
    fn budgeted(&self, entry: &MatchEntry) -> Option<Box<super::budget::Budgeted>> {
        let identity = self.identity.as_deref();
        super::budget::Budgeted::new(self.snapshot, entry, identity, self.creates, self.path, self.headers)
    }

    /// No usable token cached: the request waits for the fetch, holding its places among its
    /// budget keys' requests in flight, or is refused now when a key is at its limit.
    fn park_for_token(&self, entry: &MatchEntry, source: &Arc<TokenSource>) -> Step {
        let mut places = Places::default();
        if let Some(mut b) = self.budgeted(entry) {
            if let Some(refused) = self.encoded_body_refused(entry, &b) {
                return refused;
            }
            if let Err(l) = b.enter_holding(&self.shared.budgets, self.held.take()) {
                return self.in_flight_limited(Some(entry), &l);
            }
            places = b.take_places();
        }
        Step::Wait(Wait::Token(source.clone(), places))
    }

    /// What SigV4 signs: the request as it will leave, with the allowlisted headers the agent sent.
    fn pending_sign(&self, signer: &Arc<Signer>, plan: &Plan<'_>) -> PendingSign {
        PendingSign {
            signer: signer.clone(),
            method: self.method.to_owned(),
            host: sigv4::upstream_host(self.authority).to_ascii_lowercase(),
            path: plan.path.clone().unwrap_or_else(|| self.path.to_owned()),
            headers: sigv4::SIGNED_HEADERS
                .iter()
                .filter_map(|n| find(self.headers, n).map(|v| (*n, v.to_owned())))
                .collect(),
        }
    }

    /// A compressed body on a route whose token budgets read it: 415 (keyswap cannot reserve
    /// by it), decided before the request takes a place.
    fn encoded_body_refused(&self, entry: &MatchEntry, budget: &super::budget::Budgeted) -> Option<Step> {
        if !self.has_body || !budget.reads_bodies() {
            return None;
        }
        let mut encoding = self.headers.iter().filter(|h| h.key.eq_ignore_ascii_case("content-encoding"));
        let e = encoding
            .find_map(|h| Some(super::header_bytes(h)).filter(|v| !v.trim_ascii().eq_ignore_ascii_case(b"identity")))?;
        Some(self.encoded_body(entry, &String::from_utf8_lossy(&e[..e.len().min(64)])))
    }

    /// The answer for an injected request: the header mutation, the body mode (buffer for
    /// signing, stream for capture), and the span with its `traceparent` when tracing is on.
    fn injected(
        &self,
        entry: &MatchEntry,
        plan: &Plan<'_>,
        signed: &[(&'static str, String)],
        sign: Option<Box<PendingSign>>,
        injected: Injected,
    ) -> Step {
        let mut budget = self.budgeted(entry);
        if let Some(b) = budget.as_mut() {
            if let Some(refused) = self.encoded_body_refused(entry, b) {
                return refused;
            }
            if let Err(l) = b.enter_holding(&self.shared.budgets, self.held.take()) {
                return self.in_flight_limited(Some(entry), &l);
            }
        }
        // SigV4 signs the whole body; budgets reserve by it (Envoy holds the headers meanwhile).
        let whole = sign.is_some() || (budget.as_ref().is_some_and(|b| b.reads_bodies()) && self.has_body);
        let body_mode = if whole { mutation::RequestBody::Whole } else { mutation::RequestBody::None };
        let mut extra: Vec<(&str, &[u8])> = signed.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        let (tx, traceparent) = if let Some(id) = self.sampled() {
            let (tx, traceparent) = self.span(id, Some(entry), true, !plan.smuggled.is_empty(), None);
            (Some(Box::new(tx)), traceparent)
        } else {
            (None, String::new())
        };
        if tx.is_some() {
            extra.push(("traceparent", traceparent.as_bytes()));
        }
        // keyswap may read this response's body (usage, capture, scrubbing; an error's body on
        // every route): it asks for it uncompressed, or an agent asking for gzip would hide its
        // usage from spans and budgets (and an echoed secret from the scrubber).
        extra.push(("accept-encoding", b"identity"));
        let body_mode = match body_mode {
            mutation::RequestBody::None if self.has_body && tx.as_ref().is_some_and(|t| t.wants_request_body()) => {
                mutation::RequestBody::Capture
            }
            other => other,
        };
        let m = mutation::header_mutation(plan, &extra);
        // The response headers come back to keyswap to be scrubbed of secrets (the mode).
        let resp = mutation::request_headers(Some(m), Some(mutation::mode(body_mode, false)));
        Step::Answer(Outcome { resp, tx, sign, injected: Some(injected), budget, places: Places::default() })
    }
}

fn answer(resp: ProcessingResponse, tx: Option<Box<Transaction>>, sign: Option<Box<PendingSign>>) -> Step {
    Step::Answer(Outcome { resp, tx, sign, injected: None, budget: None, places: Places::default() })
}
