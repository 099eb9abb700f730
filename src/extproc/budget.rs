//! Token budgets on the ext_proc stream: reserve before the request is forwarded, settle when
//! the response ends (or is cut off).
//!
//! A budgeted request with a body has it buffered (request_body_mode BUFFERED): Envoy holds the
//! headers until keyswap answers the body, so a refusal there still reaches nothing upstream.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use futures_util::future::BoxFuture;

pub(super) use super::budget_refusal::limited;
use super::budget_refusal::refusal;
use super::usage_chunk::UsageChunkFilter;
use super::{mutation, Handled, ProcessStream};
use crate::budget::{Admit, Answered, Budget, Claim, Demand, Held, Limited, Observed, Places, Reserve, StreamUsage};
use crate::config::snapshot::MatchEntry;
use crate::config::Snapshot;
use crate::provider::usage::{Format, UsageParser};
use crate::target::CanonicalPath;
use crate::telemetry::Phase as TelemetryPhase;
use crate::vocab::Identity;

/// A request on a route with budgets: who it is counted as, and its reservation once made.
pub struct Budgeted {
    plan: Plan,
    format: Option<Format>,
    held: Option<Held>,
    /// What the response's status says (once response headers arrived).
    answered: Option<Answered>,
    parser: Option<UsageParser>,
    response_bytes: u64,
    /// Some budget limits tokens: the request body is read to reserve, the response body to
    /// settle. Budgets of requests only need neither.
    reads_bodies: bool,
    /// keyswap asked the stream for its usage where the agent did not: the usage chunk is read
    /// here and kept from the agent (`Some` once the response is a stream of events).
    asked_for_usage: bool,
    usage_chunk: Option<UsageChunkFilter>,
    /// Its places in budgets that limit requests in flight, until the stream ends.
    places: Places,
    /// The counts Bedrock's InvokeModel reports in response headers (input, output): what the
    /// call is settled by when its body (the model's own format) reports none keyswap reads.
    counted: (Option<u64>, Option<u64>),
}

/// The response headers in which Bedrock's InvokeModel reports what a call used, whatever the
/// model's own body says.
pub(super) const BEDROCK_COUNTS: [&str; 2] = ["x-amzn-bedrock-input-token-count", "x-amzn-bedrock-output-token-count"];

/// What admitting a budgeted request takes besides its body: cloned into the task that reads a
/// large body off the worker.
#[derive(Clone)]
struct Plan {
    snapshot: Arc<Snapshot>,
    budgets: Arc<[Arc<Budget>]>,
    /// The counter key of each budget, in order.
    keys: Vec<Arc<str>>,
    /// The model named in the path (Gemini, Bedrock): the provider ignores the body's.
    path_model: Option<String>,
    /// The request creates something that spends tokens out of keyswap's sight (the provider
    /// registry's glob it matches).
    unmetered: Option<&'static str>,
    /// A Chat Completions (or legacy Completions) endpoint: its streams report usage only when
    /// the body asks (`stream_options.include_usage`).
    completions: bool,
    /// … and one that accepts being asked (not Azure before api-version 2024-09-01).
    can_ask: bool,
}

/// Request bodies larger than this are read for their demand on the blocking pool: a 9 MiB body
/// takes milliseconds to parse, which on the worker would hold up every other agent's messages.
const PARSE_INLINE_MAX_BYTES: usize = 256 * 1024;

/// The answer that lets a request go on: ready, or being computed (a large body signed).
// Built once per message and moved straight into the answer: boxing it would allocate.
#[allow(clippy::large_enum_variant)]
pub enum Continue {
    Ready(ProcessingResponse),
    Later(BoxFuture<'static, ProcessingResponse>),
}

impl Budgeted {
    /// `None` when no budget applies to `entry`.
    pub fn new(
        snapshot: &Arc<Snapshot>,
        entry: &MatchEntry,
        identity: Option<&Identity>,
        creates: bool,
        path: &str,
        headers: &[envoy_types::pb::envoy::config::core::v3::HeaderValue],
    ) -> Option<Box<Budgeted>> {
        if entry.budgets.is_empty() {
            return None;
        }
        let keys = crate::budget::keys(&entry.budgets, identity, &entry.route);
        let canonical = crate::target::CanonicalPath::of(path);
        let format = crate::provider::usage::format_for(entry.provider.name, &canonical);
        let plan = Plan {
            budgets: entry.budgets.clone(),
            keys,
            path_model: entry.provider.model_from_path(path).map(|m| m.into_owned()),
            // (Only a request that creates spends tokens: a `GET …:download?alt=media` reads a file.)
            unmetered: entry.provider.unmetered(creates, &canonical).or_else(|| {
                let header = |n: &str| super::header(headers, n);
                entry.provider.hides_usage.filter(|_| creates).and_then(|hides| hides(path, &header))
            }),
            // (A `custom` upstream's streams that report no usage are charged by their events:
            // refusing them would refuse every stream of a vendor that reports unasked.)
            completions: format == Some(Format::OpenAi)
                && is_completions(&canonical)
                && entry.provider.name != "custom",
            can_ask: accepts_stream_options(entry.provider.name, &canonical, path),
            snapshot: snapshot.clone(),
        };
        Some(Box::new(Budgeted {
            plan,
            format,
            held: None,
            answered: None,
            parser: None,
            response_bytes: 0,
            reads_bodies: entry.budgets.iter().any(|b| b.counts_tokens()),
            asked_for_usage: false,
            usage_chunk: None,
            places: Places::default(),
            counted: (None, None),
        }))
    }

    /// Takes the request's places in its budgets that limit requests in flight, held until its
    /// stream ends; the key at its limit, when one is.
    pub fn enter(&mut self, engine: &crate::budget::Engine) -> Result<(), Limited> {
        self.places = engine.enter(&self.plan.budgets, &self.plan.keys)?;
        Ok(())
    }

    /// [`Budgeted::enter`], keeping `held` instead where it holds this request's places (taken
    /// before it waited for a token, under the same snapshot and key).
    pub fn enter_holding(&mut self, engine: &crate::budget::Engine, held: Places) -> Result<(), Limited> {
        if !held.is_empty() && held.is_for(&self.plan.budgets, &self.plan.keys) {
            self.places = held;
            return Ok(());
        }
        drop(held);
        self.enter(engine)
    }

    /// The places taken by [`Budgeted::enter`], for a request that waits before it is decided.
    pub fn take_places(&mut self) -> Places {
        std::mem::take(&mut self.places)
    }

    /// Whether the request holds places among its keys' requests in flight (until it ends).
    pub fn holds_places(&self) -> bool {
        !self.places.is_empty()
    }

    /// Whether the request and response bodies are read (some budget limits tokens).
    pub fn reads_bodies(&self) -> bool {
        self.reads_bodies
    }

    /// Whether the reservation waits for the request body (read whole, in one message).
    pub fn waits_for_body(&self) -> bool {
        self.reads_bodies && self.held.is_none()
    }
}

impl Plan {
    /// Admits a request whose body (`body`) reads as `demand`: refused before anything is
    /// reserved (`Err`, counted), or its reservation, now or being made, with the answer that lets
    /// it go on once admitted (its body asking for usage where it did not: then `true`).
    fn admission(
        &self,
        engine: &Arc<crate::budget::Engine>,
        demand: &Demand,
        body: &[u8],
        cont: Continue,
        now: SystemTime,
    ) -> Result<(Reserve, Continue, bool), Admit> {
        // The body can be written to only where the answer changes nothing else: a body SigV4
        // signs (an OpenAI-compatible API behind AWS) is forwarded as the agent wrote it.
        let writable = matches!(&cont, Continue::Ready(r) if *r == mutation::request_body());
        if let Some(refused) = self.cannot_meter(demand, body, writable) {
            return Err(engine.count(refused));
        }
        let (cont, asked) = match self.asking_for_usage(demand, body) {
            Some(asked) if writable => (Continue::Ready(mutation::request_body_replaced(asked)), true),
            _ => (cont, false),
        };
        let claims = self.claims(demand, now);
        tracing::debug!(keys = ?self.keys, reserve = ?claims.iter().map(|c| c.reserved[3]).collect::<Vec<_>>(), "reserving token budgets");
        Ok((engine.reserve(self.snapshot.budget_store.as_ref(), claims, now), cont, asked))
    }

    /// The refusal of a request a budget of the route cannot meter: a body it cannot read to its
    /// end (every budget on tokens refuses it), or one that would spend tokens a budget cannot
    /// count and refuses: a registry endpoint ([`crate::provider::Provider::unmetered`]), a
    /// background run, or a stream that will report no usage and sets no output limit (keyswap
    /// asks for the usage only in a body it may write: `writable`).
    fn cannot_meter(&self, demand: &Demand, body: &[u8], writable: bool) -> Option<Admit> {
        if demand.unreadable_body {
            let budget = self.budgets.iter().find(|b| b.counts_tokens())?;
            return Some(Admit::Unreadable { budget: budget.name.clone() });
        }
        // A stream that will report no usage is settled at its reservation: unmetered when that
        // reservation does not bound its output (no readable output limit, the default reserved).
        let reports = match demand.stream_usage {
            StreamUsage::Asked => true,
            StreamUsage::NotAsked => false,
            // Asked by keyswap, where the endpoint takes it and the body can be written to.
            StreamUsage::Unset => self.can_ask && writable && opening_brace(body).is_some(),
        };
        let bounded = demand.max_output_tokens.is_some() && !demand.unreadable_limit;
        let unasked = self.completions && demand.stream && !reports && !bounded;
        let what = (self.unmetered).or(demand.background.then_some("background: true")).or(unasked
            .then_some("a stream that will report no usage (stream_options.include_usage) and sets no max_tokens"))?;
        let budget = self.budgets.iter().find(|b| b.refuses_unmetered())?;
        Some(Admit::Unmetered { budget: budget.name.clone(), what })
    }

    /// The body to forward in place of `body`: a stream that does not ask for its usage, asked
    /// (`"stream_options":{"include_usage":true}` added), so that it is settled by what it used
    /// rather than by its reservation. `None`: forwarded as it is.
    fn asking_for_usage(&self, demand: &Demand, body: &[u8]) -> Option<Vec<u8>> {
        if !(self.completions && self.can_ask && demand.stream && demand.stream_usage == StreamUsage::Unset) {
            return None;
        }
        let open = opening_brace(body)?;
        let rest = &body[open + 1..];
        let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
        let member: &[u8] = if empty {
            br#""stream_options":{"include_usage":true}"#
        } else {
            br#""stream_options":{"include_usage":true},"#
        };
        Some([&body[..=open], member, rest].concat())
    }

    fn claims(&self, demand: &Demand, now: SystemTime) -> Vec<Claim> {
        self.budgets.iter().zip(&self.keys).map(|(b, key)| b.claim(key.clone(), demand, now)).collect()
    }
}

impl Budgeted {
    /// Settles the reservation (once) for a response that went on unseen: as cut off after an
    /// unknown number of bytes, so what was reserved stays counted unless usage was read.
    pub(super) fn settle_unseen(&mut self) {
        self.response_bytes = u64::MAX;
        self.settle(false);
    }

    /// Settles the reservation (once): the response ended, or was cut off.
    fn settle(&mut self, ended: bool) {
        let Some(mut held) = self.held.take() else { return };
        if held.claims().iter().any(|c| !c.budget.weights.is_empty()) {
            if let Some(model) = self.parser.as_mut().and_then(UsageParser::model) {
                held.weigh_as(model);
            }
        }
        let (mut usage, provisional, events) = self.parser.as_mut().map(UsageParser::usage).unwrap_or_default();
        if usage.input_tokens.is_none() && usage.output_tokens.is_none() {
            (usage.input_tokens, usage.output_tokens) = self.counted;
        }
        // Anthropic and Bedrock count cached prompt tokens apart from input_tokens.
        let cached = match self.format {
            Some(Format::Anthropic | Format::Bedrock) => {
                usage.cache_read_tokens.unwrap_or(0) + usage.cache_creation_tokens.unwrap_or(0)
            }
            _ => 0,
        };
        let input = usage.input_tokens.map(|i| i + cached);
        let output = usage.output_tokens;
        // A stream that ended without its final count (an error event after the content, a
        // provider that closed early) said no more than one cut off does.
        let observed = if ended && !provisional {
            Observed::Ended { answered: self.answered.unwrap_or(Answered::Error), input, output, events }
        } else {
            Observed::Aborted { input, output, response_bytes: self.response_bytes, events }
        };
        held.settle(observed);
    }
}

impl Drop for Budgeted {
    /// A stream that ends before its response did: settled as cut off.
    fn drop(&mut self) {
        self.settle(false);
    }
}

impl ProcessStream {
    /// Passes `cont` through the request's budgets, reserving what `body` may cost: the answer
    /// now, or after the store answers. Without budgets (or already reserved), `cont` as is.
    pub(super) fn admit(&mut self, cont: Continue, body: Vec<u8>, phase: TelemetryPhase, started: Instant) -> Handled {
        let Some(b) = self.budget.as_ref().filter(|b| b.held.is_none()) else {
            return self.go_on(cont, phase, started);
        };
        let (now, engine) = (SystemTime::now(), &self.shared.budgets);
        if body.len() > PARSE_INLINE_MAX_BYTES {
            let (plan, engine) = (b.plan.clone(), engine.clone());
            let fut = async move {
                let path_model = plan.path_model.clone();
                let read = tokio::task::spawn_blocking(move || (Demand::from_body(&body, path_model.as_deref()), body));
                // The reader never panics; if it did, the body counts as one it could not read.
                let unread = || (Demand { unreadable_body: true, unreadable_limit: true, ..Demand::default() }, vec![]);
                let (demand, body) = read.await.unwrap_or_else(|_| unread());
                // The window is the one the reservation happens in, not the one the body arrived in.
                match plan.admission(&engine, &demand, &body, cont, SystemTime::now()) {
                    Err(admit) => {
                        (refusal(&admit).expect("a request no budget can meter is refused"), Some((admit, false)))
                    }
                    Ok((Reserve::Now(admit), cont, asked)) => admitted(admit, cont, asked).await,
                    Ok((Reserve::Later(fut), cont, asked)) => admitted(fut.await, cont, asked).await,
                }
            };
            self.pending = Some((Box::pin(fut), started, phase));
            return Handled::Pending;
        }
        let demand = Demand::from_body(&body, b.plan.path_model.as_deref());
        match b.plan.admission(engine, &demand, &body, cont, now) {
            Err(admit) => {
                let refusal = self.record(admit, false).expect("a request no budget can meter is refused");
                Handled::Answer(refusal, phase, true)
            }
            Ok((Reserve::Now(admit), cont, asked)) => match self.record(admit, asked) {
                Some(refusal) => Handled::Answer(refusal, phase, true),
                None => self.go_on(cont, phase, started),
            },
            Ok((Reserve::Later(fut), cont, asked)) => {
                self.pending = Some((Box::pin(async move { admitted(fut.await, cont, asked).await }), started, phase));
                Handled::Pending
            }
        }
    }

    fn go_on(&mut self, cont: Continue, phase: TelemetryPhase, started: Instant) -> Handled {
        match cont {
            Continue::Ready(r) => Handled::Answer(r, phase, false),
            Continue::Later(f) => {
                self.pending = Some((Box::pin(async move { (f.await, None) }), started, phase));
                Handled::Pending
            }
        }
    }

    /// Keeps what `admit` reserved and notes the decision on the span; the refusal, if it is one.
    /// `asked_for_usage`: the request goes on asking for the usage its agent did not.
    pub(super) fn record(&mut self, admit: Admit, asked_for_usage: bool) -> Option<ProcessingResponse> {
        if let Some(b) = &mut self.budget {
            b.asked_for_usage = asked_for_usage;
        }
        let answer = refusal(&admit);
        let tx = self.tx.as_mut().map(|t| &mut t.tx);
        match admit {
            Admit::Held(held, remaining) => {
                if let Some(tx) = tx {
                    tx.on_budget("admitted", None, remaining, None);
                }
                if let Some(b) = &mut self.budget {
                    b.held = Some(held);
                }
            }
            Admit::AdmittedUncounted(held) => {
                if let Some(tx) = tx {
                    tx.on_budget("admitted_uncounted", None, None, None);
                }
                if let Some(b) = &mut self.budget {
                    b.held = Some(held);
                }
            }
            Admit::Limited(l) => {
                tracing::debug!(budget = %l.budget, limit = l.dimension, used = l.used, requested = l.requested, "budget exhausted; answering 429");
                if let Some(tx) = tx {
                    tx.on_budget(
                        "limited",
                        Some(&l.budget),
                        (l.dimension != "requests").then(|| l.limit as i64 - l.used),
                        Some(("budget_exhausted", 429)),
                    );
                }
            }
            Admit::Invalid { budget, why } => {
                tracing::debug!(%budget, %why, "a token budget of this route is invalid; answering 503 (fail closed)");
                if let Some(tx) = tx {
                    tx.on_budget("invalid", Some(&budget), None, Some(("budget_invalid", 503)));
                }
            }
            Admit::Unmetered { budget, what } => {
                tracing::debug!(%budget, request = what, "the request would spend tokens its token budget cannot count; answering 403");
                if let Some(tx) = tx {
                    tx.on_budget("unmetered", Some(&budget), None, Some(("budget_unmetered_request", 403)));
                }
            }
            Admit::Unreadable { budget } => {
                tracing::debug!(%budget, "the request body is JSON keyswap cannot read to its end; answering 400");
                if let Some(tx) = tx {
                    tx.on_budget("unreadable", Some(&budget), None, Some(("budget_unreadable_request", 400)));
                }
            }
            Admit::Unavailable { error, budgets } => {
                // The store logs the outage once (at ERROR); each refusal is counted in metrics.
                tracing::debug!(%error, ?budgets, "budget store unavailable and a budget fails closed; answering 503");
                if let Some(tx) = tx {
                    tx.on_budget(
                        "store_unavailable",
                        budgets.first().map(|b| &**b),
                        None,
                        Some(("budget_store_unavailable", 503)),
                    );
                }
            }
        }
        answer
    }

    /// The response headers of a budgeted request: its status, and its body read for usage.
    /// `true` when the response body is wanted.
    /// `counted`: the response's [`BEDROCK_COUNTS`] headers, read on Bedrock routes.
    pub(super) fn budget_response_headers(
        &mut self,
        status: Option<u16>,
        content_type: &str,
        counted: impl Fn(&str) -> Option<u64>,
        end: bool,
    ) -> bool {
        let Some(b) = self.budget.as_mut().filter(|b| b.held.is_some()) else { return false };
        b.answered = Some(Answered::of_status(status));
        if b.format == Some(Format::Bedrock) {
            b.counted = (counted(BEDROCK_COUNTS[0]), counted(BEDROCK_COUNTS[1]));
        }
        if end || !b.reads_bodies {
            b.settle(true);
            // Places are held until the response ends: its body comes here, unread, so that the
            // stream lasts as long as the response (Envoy closes a stream it expects no more
            // messages on, and the places with it).
            return !end && !b.places.is_empty();
        }
        b.parser = b.format.map(|f| UsageParser::new(f, content_type));
        if b.asked_for_usage && content_type.starts_with("text/event-stream") {
            b.usage_chunk = Some(UsageChunkFilter::default());
        }
        true
    }

    /// Whether the response body goes to the agent changed: without the usage chunk keyswap
    /// asked for (read on the deciding filter, never handed to the observing one).
    pub(super) fn strips_usage_chunk(&self) -> bool {
        self.budget.as_ref().is_some_and(|b| b.usage_chunk.is_some())
    }

    /// `chunk` (already read by the budget) as the agent gets it: `None`, unchanged.
    pub(super) fn without_usage_chunk(&mut self, chunk: &[u8], end: bool) -> Option<Vec<u8>> {
        self.budget.as_mut()?.usage_chunk.as_mut()?.filter(chunk, end)
    }

    /// A response body chunk of a budgeted request.
    pub(super) fn budget_response_body(&mut self, chunk: &[u8], end: bool) {
        if let Some(b) = self.budget.as_mut() {
            b.response_body(chunk, end);
        }
    }
}

impl Budgeted {
    /// Gives back everything reserved: keyswap answered the request itself, nothing was forwarded.
    pub(super) fn release(&mut self) {
        self.held = None;
    }

    /// Whether this budget reads the response's usage (a span on the same response then
    /// borrows it rather than parsing the body again).
    pub(super) fn parses_usage(&self) -> bool {
        self.parser.is_some()
    }

    /// The usage read from the response so far (all of it once the body ended).
    pub(super) fn usage(&mut self) -> Option<crate::provider::usage::ResponseInfo> {
        self.parser.as_mut().map(|p| p.finish())
    }

    /// A response body chunk: read for usage; settled when it is the last.
    pub(super) fn response_body(&mut self, chunk: &[u8], end: bool) {
        if self.held.is_none() {
            return;
        }
        self.response_bytes += chunk.len() as u64;
        match &mut self.parser {
            Some(p) if end => p.feed_last(chunk),
            Some(p) => p.feed(chunk),
            None => {}
        }
        if end {
            self.settle(true);
        }
    }
}

/// Whether `path` is a Chat Completions (or legacy Completions) endpoint.
fn is_completions(path: &CanonicalPath<'_>) -> bool {
    path.ends_with("/completions")
}

/// Whether the provider takes `stream_options` on `path`: OpenAI, Anthropic's OpenAI-compatible
/// endpoint; Azure OpenAI's v1 API, or an `api-version` of 2024-09-01 or later (earlier ones answer
/// 400 to it, so their streams are not asked, and one that sets no output limit is unmetered). The
/// compatible endpoints of Google and Bedrock are not asked: they do not say they take it.
fn accepts_stream_options(provider: &str, route: &CanonicalPath<'_>, path: &str) -> bool {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    let version = || query.split('&').find_map(|p| p.strip_prefix("api-version="));
    let dated = || version().is_some_and(|v| v.get(..10).is_some_and(|date| date >= "2024-09-01"));
    match provider {
        "openai" | "anthropic" => true,
        "azure-openai" => route.starts_with("/openai/v1/") || dated(),
        _ => false,
    }
}

/// Where a JSON object body opens, when keyswap can write a member into it: plain UTF-8 text (no
/// byte-order mark, not UTF-16/32, which have a zero among their first bytes).
fn opening_brace(body: &[u8]) -> Option<usize> {
    if body.starts_with(&[0xEF, 0xBB, 0xBF]) || body.iter().take(4).any(|&b| b == 0) {
        return None;
    }
    body.iter().position(|b| !b.is_ascii_whitespace()).filter(|&i| body[i] == b'{')
}

/// The answer for a request the store decided on: its refusal, or `cont`'s answer.
async fn admitted(admit: Admit, cont: Continue, asked: bool) -> (ProcessingResponse, Option<(Admit, bool)>) {
    match refusal(&admit) {
        Some(r) => (r, Some((admit, asked))),
        None => match cont {
            Continue::Ready(r) => (r, Some((admit, asked))),
            Continue::Later(f) => (f.await, Some((admit, asked))),
        },
    }
}

#[cfg(test)]
mod tests {
    use crate::target::CanonicalPath;

    /// Azure OpenAI answers 400 to `stream_options` before api-version 2024-09-01-preview: a
    /// legitimate client pinned to an older version must not be broken by the usage keyswap asks.
    #[test]
    fn only_endpoints_that_accept_stream_options_are_asked_for_usage() {
        let asks = |provider: &str, path: &str| {
            let canonical = CanonicalPath::of(path);
            super::is_completions(&canonical) && super::accepts_stream_options(provider, &canonical, path)
        };
        assert!(asks("openai", "/v1/chat/completions"));
        assert!(asks("openai", "/v1/completions"));
        assert!(!asks("openai", "/v1/responses"));
        assert!(!asks("openai", "/v1/embeddings"));
        let deployment = "/openai/deployments/gpt-4o/chat/completions";
        assert!(asks("azure-openai", &format!("{deployment}?api-version=2024-10-21")));
        assert!(asks("azure-openai", &format!("{deployment}?x=1&api-version=2024-09-01-preview")));
        assert!(asks("azure-openai", &format!("{deployment}?api-version=2025-04-01-preview")));
        assert!(!asks("azure-openai", &format!("{deployment}?api-version=2024-06-01")));
        assert!(!asks("azure-openai", &format!("{deployment}?api-version=2024-02-15-preview")));
        assert!(!asks("azure-openai", &format!("{deployment}?api-version=latest")));
        assert!(!asks("azure-openai", deployment));
        assert!(asks("azure-openai", "/openai/v1/chat/completions"));
        // Read in the canonical form, as the provider's router reads it.
        assert!(asks("azure-openai", "/OpenAI/v1//chat/completions/"));
        // Other providers' OpenAI-compatible endpoints: theirs to accept, never added.
        assert!(!asks("google", "/v1beta/openai/chat/completions"));
        assert!(!asks("bedrock", "/openai/v1/chat/completions"));
        assert!(asks("anthropic", "/v1/chat/completions"), "its compatibility page lists stream_options");
    }
}
