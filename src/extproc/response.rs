//! The response path of an injected request: headers and body chunks scrubbed of every live
//! secret before the agent (or a span) sees them, and recorded on the span.

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ext_proc::v3::HeaderMutation;
use secrecy::ExposeSecret as _;
use std::sync::Arc;

use super::{header_bytes, mutation, Handled, ProcessStream};
use crate::config::Snapshot;
use crate::telemetry::{Metrics, Phase as TelemetryPhase};

/// What a response may not carry back: every live secret of the snapshot the request was
/// decided on, and the credential minted for it (a GCP access token).
pub(super) struct Scrub {
    pub(super) snapshot: Arc<Snapshot>,
    pub(super) minted: Option<Box<[u8]>>,
    /// The route scrubs response bodies too (`spec.scrubResponseBodies`).
    pub(super) body: Option<crate::scrub::Streaming>,
    /// The route's binding: what the request's trailers are stripped of.
    pub(super) binding: Arc<crate::config::snapshot::Binding>,
}

/// The response headers an agent's client acts on after an error: when to retry (OpenAI's and
/// Anthropic's SDKs read `retry-after-ms` and `retry-after`), the rate limits, and the id a
/// provider's support asks for.
fn acted_on(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    matches!(
        n.as_str(),
        "retry-after" | "retry-after-ms" | "request-id" | "x-request-id" | "x-amzn-requestid" | "apim-request-id"
    ) || n.starts_with("x-ratelimit-")
        || n.starts_with("anthropic-ratelimit-")
}

/// Header names and values, owned (scrubbed copies).
type OwnedHeaders = Vec<(String, Vec<u8>)>;

impl Scrub {
    fn secrets(&self) -> impl Iterator<Item = &[u8]> {
        self.snapshot.live_secrets.iter().map(|s| s.expose_secret()).chain(self.minted.as_deref())
    }

    /// The chunk to send on in place of `chunk`, and whether a secret was found in it; `None`
    /// when bodies are not scrubbed or the chunk goes on unchanged.
    fn response_body(&mut self, chunk: &[u8], end: bool) -> Option<(Vec<u8>, bool)> {
        let Scrub { snapshot, minted, body, .. } = self;
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
        let mut changed: Vec<String> = Vec::new();
        let mut scrubbed: Vec<(String, Vec<u8>)> = Vec::with_capacity(headers.len());
        for h in headers {
            let mut v = header_bytes(h).to_vec();
            if !h.key.starts_with(':') && leaks(&v) {
                crate::scrub::scrub(&mut v, &secrets, false);
                if !changed.iter().any(|k| k.eq_ignore_ascii_case(&h.key)) {
                    changed.push(h.key.to_ascii_lowercase());
                }
            }
            scrubbed.push((h.key.clone(), v));
        }
        // Every value of a changed name, in order, each its own header again (the first replaces
        // them all, the rest are added): values joined with `, ` were one cookie to a client.
        let pairs: Vec<(&str, &[u8])> = scrubbed
            .iter()
            .filter(|(k, _)| changed.iter().any(|c| c.eq_ignore_ascii_case(k)))
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let m = mutation::set_headers(&pairs);
        Some((scrubbed, m))
    }
}

impl ProcessStream {
    /// The upstream's response headers: scrubbed of live secrets, recorded on the span, and the
    /// body asked for when the span, the budget or the scrubber needs it. A body only telemetry
    /// and the budget read goes to the observing filter when it runs on the route (nothing
    /// waits for it); one the scrubber rewrites, or any without the observing filter, comes here.
    pub(super) fn on_response_headers(&mut self, headers: &[HeaderValue], end: bool) -> Handled {
        let mut wants_body = false;
        let find = |n: &str| super::header(headers, n);
        let status: Option<u16> = find(":status").and_then(|s| std::str::from_utf8(s).ok()?.parse().ok());
        // An error's body is scrubbed on every injected route, whatever the route says of
        // answers: errors quote what they were sent (AWS's signature mismatch, the canonical
        // request with the session token's value in it; a gateway's 401 in front of a provider).
        if let Some(s) = self.scrub.as_mut().filter(|s| s.body.is_none() && !end) {
            if status.is_none_or(|c| c >= 400) {
                s.body = Some(crate::scrub::Streaming::default());
            }
        }
        let scrubbed = self.scrub.as_ref().and_then(|s| s.response_headers(headers));
        if scrubbed.is_some() {
            Metrics::inc(&self.shared.metrics.secrets_scrubbed_from_responses);
            tracing::warn!("the upstream's response headers carried a live secret value; scrubbed");
            // An upstream that quotes the key in a header (a redirect's `Location`, a debugging
            // proxy) may quote it in the body too (the "moved" page): that body is scrubbed.
            if let Some(s) = self.scrub.as_mut().filter(|s| s.body.is_none() && !end) {
                s.body = Some(crate::scrub::Streaming::default());
            }
        }
        // A body to scrub that the upstream compressed though keyswap asked for it uncompressed:
        // its bytes cannot be searched, so it is not forwarded.
        // (Looked for only in a response whose body is scrubbed: most are not.)
        let scrubs_body = !end && self.scrub.as_ref().is_some_and(|s| s.body.is_some());
        let encoded = || {
            let e = find("content-encoding").map(<[u8]>::trim_ascii);
            e.is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case(b"identity"))
        };
        if scrubs_body && encoded() {
            return self.unreadable_body(status, headers);
        }
        if self.budget.is_some() {
            let content_type = find("content-type").and_then(|c| std::str::from_utf8(c).ok()).unwrap_or("");
            let counted = |n: &str| find(n).and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok());
            wants_body |= self.budget_response_headers(status, content_type, counted, end);
        }
        if let Some(t) = &mut self.tx {
            let pairs: Vec<(&str, &[u8])> = match &scrubbed {
                Some((s, _)) => s.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect(),
                None => headers.iter().map(|h| (h.key.as_str(), header_bytes(h))).collect(),
            };
            t.tx.on_response_headers(&pairs);
            wants_body |= !end && t.tx.wants_response_body();
            // One reader of usage per response: the budget's, lent to the span when it ends.
            if self.budget.as_ref().is_some_and(|b| b.parses_usage()) {
                t.tx.usage_read_elsewhere();
            }
        }
        let mut m = scrubbed.map(|(_, m)| m);
        let rewrites_body =
            !end && (self.scrub.as_ref().is_some_and(|s| s.body.is_some()) || self.strips_usage_chunk());
        if rewrites_body {
            // Scrubbing (or the usage chunk kept back) changes the body's length: the agent gets
            // it chunked.
            m.get_or_insert_with(HeaderMutation::default).remove_headers.push("content-length".into());
        }
        let mut handoff = None;
        // A request holding places among its key's requests in flight ends on this stream: a
        // stream handed to the observing filter could be given up before that filter starts.
        let holds = self.budget.as_ref().is_some_and(|b| b.holds_places());
        let mut read_here = rewrites_body || (wants_body && (!self.observed || holds));
        if wants_body && !read_here {
            match self.shared.handoffs.park(self.tx.take(), self.budget.take()) {
                Ok(id) => handoff = Some(super::observe::metadata(id)),
                // Too many wait for their observing streams already: read this body here.
                Err((tx, budget)) => (self.tx, self.budget, read_here) = (tx, budget, true),
            }
        }
        let mode = read_here.then(|| mutation::mode(mutation::RequestBody::None, true));
        self.fixed_response(mode.is_some());
        let mut resp = mutation::response_headers(m, mode);
        resp.dynamic_metadata = handoff;
        Handled::Answer(resp, TelemetryPhase::ResponseHeaders, end)
    }

    /// A body to scrub that arrives compressed: not forwarded. An error keeps its status and the
    /// headers the agent's client acts on (`retry-after`, rate limits, the request id), scrubbed
    /// like any header, so an SDK still backs off from a 429 instead of retrying a 502 at once;
    /// any other answer becomes 502.
    fn unreadable_body(&mut self, status: Option<u16>, headers: &[HeaderValue]) -> Handled {
        // The upstream answered (and spent): its budgets keep what they reserved, never
        // released as for a request keyswap refused before forwarding.
        if let Some(b) = &mut self.budget {
            b.settle_unseen();
        }
        let error = status.filter(|c| (400..600).contains(c));
        let code = error.unwrap_or(502);
        tracing::warn!(
            status,
            answered = code,
            "the upstream compressed a response body keyswap scrubs (it asked for it uncompressed); body not forwarded"
        );
        let mut kept: Vec<(&str, Vec<u8>)> = Vec::new();
        if let (Some(_), Some(scrub)) = (error, &self.scrub) {
            let secrets: Vec<&[u8]> = scrub.secrets().collect();
            for h in headers.iter().filter(|h| acted_on(&h.key)) {
                let mut v = header_bytes(h).to_vec();
                crate::scrub::scrub(&mut v, &secrets, false);
                kept.push((h.key.as_str(), v));
            }
        }
        let kept: Vec<(&str, &[u8])> = kept.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        let body = serde_json::json!({"error": {"type": "upstream_response_unreadable", "message": format!(
            "the upstream answered {} with a compressed body that keyswap must scrub of secrets before the agent sees it; body not forwarded",
            status.unwrap_or(0))}});
        let resp = mutation::immediate_with(code, &body, "keyswap_compressed_response", &kept);
        Handled::Answer(resp, TelemetryPhase::ResponseHeaders, true)
    }

    /// The upstream's response trailers (HTTP/2, or chunked HTTP/1.1 where Envoy keeps them):
    /// scrubbed of live secrets as the headers are. They end the transaction, and the body: its
    /// last chunk did not say so, so a budget settles here (bytes a scrubber or the usage-chunk
    /// filter held back cannot follow: a trailers answer carries no body).
    /// The request's trailers (HTTP/2): an injected request's are stripped of every name its
    /// headers were ([`crate::inject::strip_trailers`]); Envoy forwards them upstream.
    pub(super) fn on_request_trailers(&mut self, trailers: &[HeaderValue]) -> Handled {
        let mut remove = Vec::new();
        if let Some(s) = &self.scrub {
            let (names, smuggled) =
                crate::inject::strip_trailers(&s.binding.strip, trailers.iter().map(|h| (&*h.key, header_bytes(h))));
            if !smuggled.is_empty() {
                Metrics::inc(&self.shared.metrics.smuggle_attempts);
                tracing::warn!(credentials = ?smuggled, "agent sent credentials of its own in request trailers; stripped");
            }
            remove = names.into_iter().map(str::to_owned).collect();
        }
        Handled::Answer(mutation::request_trailers(remove), TelemetryPhase::Trailers, false)
    }

    pub(super) fn on_response_trailers(&mut self, trailers: &[HeaderValue]) -> Handled {
        self.budget_response_body(&[], true);
        let scrubbed = self.scrub.as_ref().and_then(|s| s.response_headers(trailers)).map(|(_, m)| {
            Metrics::inc(&self.shared.metrics.secrets_scrubbed_from_responses);
            tracing::warn!("the upstream's response trailers carried a live secret value; scrubbed");
            m
        });
        Handled::Answer(mutation::response_trailers(scrubbed), TelemetryPhase::Trailers, true)
    }

    /// A response body chunk: recorded on the span, and scrubbed when the route says so.
    pub(super) fn on_response_body(&mut self, body: &[u8], end: bool) -> Handled {
        if self.skips_response_body() {
            return Handled::Answer(mutation::response_body(), TelemetryPhase::ResponseBody, end);
        }
        if let Some(t) = &mut self.tx {
            t.tx.on_response_body(body);
        }
        self.budget_response_body(body, end);
        let replaced = self.scrub.as_mut().and_then(|s| s.response_body(body, end));
        let mut replaced = replaced.map(|(body, found)| {
            if found {
                Metrics::inc(&self.shared.metrics.secrets_scrubbed_from_responses);
                tracing::warn!("the upstream's response body carried a live secret value; scrubbed");
            }
            body
        });
        let scrubbed = replaced.as_deref().unwrap_or(body);
        if let Some(without) = self.without_usage_chunk(scrubbed, end) {
            replaced = Some(without);
        }
        let resp = replaced.map_or_else(mutation::response_body, mutation::response_body_with);
        Handled::Answer(resp, TelemetryPhase::ResponseBody, end)
    }
}
