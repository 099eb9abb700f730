//! One span per transaction, encoded as OTLP protobuf while the ext_proc stream runs and handed
//! to the exporter task when it ends. The request path appends to one buffer and `try_send`s.

use std::borrow::Cow;
use std::time::SystemTime;

use super::capture::{Capture, CapturePolicy};
use super::otlp::{self, event, span as field, Value};
use super::Sink;
use crate::provider::usage::{format_for, Format, ResponseInfo, UsageParser};
use crate::provider::{is_redacted, Provider};

/// What the request-headers phase knows about a transaction.
pub struct Start<'a> {
    pub provider: Option<&'static Provider>,
    /// `None`: refused before any route matched (no `keyswap.route` attribute).
    pub route: Option<&'a str>,
    pub policy: Option<&'a str>,
    pub method: &'a str,
    /// Empty for a CONNECT: no `url.full`.
    pub scheme: &'a str,
    pub authority: &'a str,
    pub host: &'a str,
    /// `:path` with credential parameters already redacted.
    pub redacted_path: &'a str,
    pub request_model: Option<&'a str>,
    pub injected: bool,
    pub smuggled: bool,
    /// Extra lowercase header names to redact (the policy's own header).
    pub redact_also: Option<&'a str>,
    /// Set for denials: the span ends at once with this `error.type`.
    pub error: Option<&'static str>,
    /// Who called, when `spec.agentAuth` admitted them.
    pub identity: Option<&'a crate::auth::Identity>,
    /// The caller's tenant as metrics label it (bounded: `metricsTenants` or "other").
    pub tenant_label: Option<std::sync::Arc<str>>,
    /// The trace id when the span starts a trace (no valid `traceparent`): the one the sampler
    /// decided on ([`super::Sink::sampled`]).
    pub root_trace_id: TraceId,
}

use super::trace_context::{nonzero_random, traceparent, valid_tracestate};
pub use super::trace_context::{parse_traceparent, random_trace_id, SpanId, TraceId};

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// A transaction in flight.
pub struct Transaction {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    flags: u8,
    tracestate: Option<String>,
    start: u64,
    /// The GenAI operation of the path (`None`: not a GenAI call; no `gen_ai_*` metrics).
    operation: Option<&'static str>,
    request_model: Option<String>,
    method: String,
    host: String,
    provider: &'static str,
    format: Option<Format>,
    /// The span's encoded attributes and events so far (OTLP `Span` fields 9 and 11).
    encoded: Vec<u8>,
    error: Option<&'static str>,
    status_code: Option<i64>,
    capture: std::sync::Arc<CapturePolicy>,
    req_body: Option<Capture>,
    resp_body: Option<Capture>,
    req_model_buf: Option<Capture>,
    parser: Option<UsageParser>,
    /// The response's usage is read by another reader of the same body (a token budget's) and
    /// handed over at [`Transaction::finish`], instead of being parsed twice.
    usage: Option<Borrowed>,
    /// The response is a server-sent event stream (its text is reassembled from the events).
    resp_sse: bool,
    /// The response is streamed: server-sent events, or Bedrock's event stream.
    resp_stream: bool,
    /// When the first chunk of a streamed response arrived (Unix nanoseconds).
    first_chunk: Option<u64>,
    redact_also: Option<String>,
    tenant_label: Option<std::sync::Arc<str>>,
    /// When the transaction ended (Unix nanoseconds), if [`Transaction::mark_ended`] was called
    /// before [`Transaction::finish`].
    ended: Option<u64>,
}

/// A span's usage read by another reader: not yet handed over, or handed over.
enum Borrowed {
    Awaited,
    Got(ResponseInfo),
}

/// An event named `name` with one `{prefix}{header}` string-array attribute per header name
/// (repeated headers share one array); credential headers are `[redacted]`. The agent chooses
/// the names and values: at most [`MAX_HEADER_NAMES`] names (then `keyswap.headers_omitted`
/// counts the rest) and [`MAX_HEADER_VALUE`] bytes of each value are recorded, so that 100
/// headers of 60 KB cannot make each span megabytes (a backend's field limits, the span queue).
fn header_event(buf: &mut Vec<u8>, name: &str, prefix: &str, headers: &[(&str, &[u8])], redact_also: Option<&str>) {
    // Names whose sketches differ are different names: only those sharing a bit with another
    // are compared with the rest (repeated headers are rare; comparing every pair was a quarter
    // of a span's start).
    let (mut seen, mut shared) = (0u64, 0u64);
    for (k, _) in headers {
        let bit = name_sketch(k);
        shared |= seen & bit;
        seen |= bit;
    }
    otlp::message(buf, field::EVENTS, |e| {
        otlp::fixed64(e, event::TIME, unix_nanos(SystemTime::now()));
        otlp::string(e, event::NAME, name);
        let (mut written, mut omitted) = (0usize, 0i64);
        for (i, (k, _)) in headers.iter().enumerate() {
            let maybe_repeated = shared & name_sketch(k) != 0;
            if k.starts_with(':') || maybe_repeated && headers[..i].iter().any(|(p, _)| p.eq_ignore_ascii_case(k)) {
                continue;
            }
            if written == MAX_HEADER_NAMES {
                omitted += 1;
                continue;
            }
            written += 1;
            // Envoy sends lowercase names; other senders may not.
            let key: Cow<'_, str> = if k.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(k.to_ascii_lowercase())
            } else {
                Cow::Borrowed(k)
            };
            let redacted = is_redacted(&key) || redact_also == Some(&*key);
            let text = |v| header_text(v, redacted);
            let key = [prefix, &*key];
            let rest = &headers[i + 1..];
            if maybe_repeated && rest.iter().any(|(p, _)| p.eq_ignore_ascii_case(k)) {
                let values = headers[i..].iter().filter(|(p, _)| p.eq_ignore_ascii_case(k)).map(|(_, v)| text(v));
                otlp::string_array_attribute(e, event::ATTRIBUTES, &key, values);
            } else {
                otlp::string_array_attribute(e, event::ATTRIBUTES, &key, std::iter::once(text(headers[i].1)));
            }
        }
        if omitted > 0 {
            otlp::attribute(e, event::ATTRIBUTES, &["keyswap.headers_omitted"], otlp::Value::Int(omitted));
        }
    });
}

/// At most this many header names are recorded per headers event.
const MAX_HEADER_NAMES: usize = 64;
/// At most this many bytes of a header value are recorded (cut at a character boundary).
const MAX_HEADER_VALUE: usize = 1024;

/// One of 64 bits for a header name, from its length and its first and last bytes (ASCII case
/// ignored, as header names compare): equal names get the same bit.
fn name_sketch(name: &str) -> u64 {
    let b = name.as_bytes();
    let end = |c: Option<&u8>| u32::from(c.map_or(0, u8::to_ascii_lowercase));
    let h = (b.len() as u32).wrapping_mul(0x9E37_79B9) ^ end(b.first()).wrapping_mul(31) ^ end(b.last());
    1 << (h.wrapping_mul(0x85EB_CA6B) >> 26)
}

/// Header `name` (any case) as text, when it is there and UTF-8.
fn text_header<'a>(headers: &[(&str, &'a [u8])], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).and_then(|(_, v)| std::str::from_utf8(v).ok())
}

fn header_text(v: &[u8], redacted: bool) -> Cow<'_, str> {
    let v = &v[..v.len().min(MAX_HEADER_VALUE)];
    match (redacted, std::str::from_utf8(v)) {
        (true, _) => Cow::Borrowed("[redacted]"),
        (false, Ok(s)) => Cow::Borrowed(s),
        (false, Err(_)) => String::from_utf8_lossy(v),
    }
}

const REQUEST_PREFIX: &str = "http.request.header.";
const RESPONSE_PREFIX: &str = "http.response.header.";

/// W3C trace flags: sampled, and (Trace Context level 2) a random trace id.
const FLAG_SAMPLED: u8 = 0x01;
const FLAG_RANDOM: u8 = 0x02;

impl Transaction {
    /// What the transaction holds on the heap, about: its encoded span and captured bodies.
    pub fn heap_bytes(&self) -> usize {
        let captures = [&self.req_body, &self.resp_body, &self.req_model_buf];
        let strings = self.method.len() + self.host.len() + self.request_model.as_ref().map_or(0, String::len);
        std::mem::size_of::<Transaction>()
            + self.encoded.capacity()
            + captures.iter().filter_map(|c| c.as_ref()).map(Capture::heap_bytes).sum::<usize>()
            + strings
    }

    /// Starts a transaction. Returns it and the `traceparent` to forward upstream.
    pub fn start(
        s: &Start<'_>,
        headers: &[(&str, &[u8])],
        capture: &std::sync::Arc<CapturePolicy>,
    ) -> (Transaction, String) {
        let find = |n: &str| text_header(headers, n);
        // A transaction exists only when sampled: the sampled flag is set whatever the agent sent
        // (`always_on` traces a parent that said no), the random-trace-id flag kept, and the bits
        // W3C reserves zeroed rather than passed upstream and into the span.
        let (trace_id, parent, flags) = match find("traceparent").and_then(parse_traceparent) {
            Some((t, p, f)) => (t, Some(p), (f & FLAG_RANDOM) | FLAG_SAMPLED),
            None => (s.root_trace_id, None, FLAG_SAMPLED),
        };
        let span_id = nonzero_random().to_be_bytes();
        let tracestate = find("tracestate").filter(|v| parent.is_some() && valid_tracestate(v)).map(str::to_owned);
        let traceparent = traceparent(&trace_id, &span_id, flags);
        // A GenAI operation only where the path is one (`GET /v1/models` or a file upload is none).
        let operation = s.provider.and_then(|p| p.operation(s.redacted_path));
        let mut encoded = Vec::with_capacity(2048);
        let mut attr = |key: &str, value: Value<'_>| otlp::attribute(&mut encoded, field::ATTRIBUTES, &[key], value);
        if let Some(p) = s.provider {
            attr("gen_ai.provider.name", Value::Str(p.otel_name));
            attr("gen_ai.system", Value::Str(p.otel_name));
        }
        if let Some(op) = operation {
            attr("gen_ai.operation.name", Value::Str(op));
        }
        attr("http.request.method", Value::Str(s.method));
        // A CONNECT has no URL (`scheme` empty): its target is the server address.
        if !s.scheme.is_empty() {
            attr("url.full", Value::Concat(&[s.scheme, "://", s.authority, s.redacted_path]));
        }
        attr("server.address", Value::Str(s.host));
        if let Some(r) = s.route {
            attr("keyswap.route", Value::Str(r));
        }
        attr("keyswap.credential.injected", Value::Bool(s.injected));
        attr("keyswap.smuggle.detected", Value::Bool(s.smuggled));
        if let Some(p) = s.policy {
            attr("keyswap.policy", Value::Str(p));
        }
        if let Some(id) = s.identity {
            attr("enduser.id", Value::Str(&id.agent));
            attr("keyswap.agent", Value::Str(&id.agent));
            if let Some(t) = &id.tenant {
                attr("keyswap.tenant", Value::Str(t));
            }
            attr("keyswap.auth.validator", Value::Str(&id.validator));
            if let Some(r) = &id.role {
                attr("keyswap.role", Value::Str(r));
            }
            for (k, v) in &id.labels {
                otlp::attribute(&mut encoded, field::ATTRIBUTES, &["keyswap.agent.label.", k], Value::Str(v));
            }
        }
        header_event(&mut encoded, "http.request.headers", REQUEST_PREFIX, headers, s.redact_also);
        let content_type = find("content-type").unwrap_or("");
        // A request keyswap answers itself never has its body read: no body event claims one.
        let req_body = (s.error.is_none() && capture.wants(content_type)).then(|| Capture::new(capture.max_bytes));
        let format = s
            .provider
            .and_then(|p| format_for(p.name, &crate::target::CanonicalPath::of(s.redacted_path)))
            .filter(|_| capture.read_bodies);
        // openai/anthropic put the model in the JSON body: keep enough of it to read the model.
        let req_model_buf =
            (s.error.is_none() && s.request_model.is_none() && format.is_some()).then(|| Capture::new(64 * 1024));
        let tx = Transaction {
            trace_id,
            span_id,
            parent,
            flags,
            tracestate,
            start: unix_nanos(SystemTime::now()),
            operation,
            request_model: s.request_model.map(str::to_owned),
            method: s.method.to_owned(),
            host: s.host.to_owned(),
            provider: s.provider.map_or("-", |p| p.otel_name),
            format,
            encoded,
            error: s.error,
            status_code: None,
            capture: capture.clone(),
            req_body,
            resp_body: None,
            req_model_buf,
            parser: None,
            usage: None,
            resp_sse: false,
            resp_stream: false,
            first_chunk: None,
            redact_also: s.redact_also.map(str::to_owned),
            tenant_label: s.tenant_label.clone(),
            ended: None,
        };
        (tx, traceparent)
    }

    /// The budget decision on this request (`admitted`, `limited`, `store_unavailable`,
    /// `admitted_uncounted`, `invalid`, `unmetered`), the budget that decided a refusal, and the
    /// fewest tokens any of its budgets has left. A refusal ends the transaction as keyswap's own
    /// 429/403/503.
    pub fn on_budget(
        &mut self,
        decision: &str,
        budget: Option<&str>,
        remaining: Option<i64>,
        refused: Option<(&'static str, i64)>,
    ) {
        let buf = &mut self.encoded;
        otlp::attribute(buf, field::ATTRIBUTES, &["keyswap.budget.decision"], Value::Str(decision));
        if let Some(b) = budget {
            otlp::attribute(buf, field::ATTRIBUTES, &["keyswap.budget.name"], Value::Str(b));
        }
        if let Some(r) = remaining {
            otlp::attribute(buf, field::ATTRIBUTES, &["keyswap.budget.remaining_tokens"], Value::Int(r));
        }
        if let Some((error, status)) = refused {
            self.refused(error, status as u16);
        }
    }

    /// keyswap refused the request itself with `status`, for `error` (the `error.type`); a
    /// reason already named stays.
    pub fn refused(&mut self, error: &'static str, status: u16) {
        self.error.get_or_insert(error);
        self.status_code.get_or_insert(i64::from(status));
    }

    /// keyswap answered the request itself with `status` (401, 403, 405, 413, 429, 503).
    pub fn answered(&mut self, status: u16) {
        self.status_code = Some(i64::from(status));
    }

    /// Whether keyswap answered the request itself (the span ends at once).
    pub fn is_denial(&self) -> bool {
        self.error.is_some()
    }

    /// Whether the request body is worth asking Envoy for.
    pub fn wants_request_body(&self) -> bool {
        self.error.is_none() && (self.req_body.is_some() || self.req_model_buf.is_some())
    }

    pub fn on_request_body(&mut self, chunk: &[u8]) {
        if let Some(c) = &mut self.req_body {
            c.push(chunk);
        }
        if let Some(c) = &mut self.req_model_buf {
            c.push(chunk);
        }
    }

    pub fn on_response_headers(&mut self, headers: &[(&str, &[u8])]) {
        let find = |n: &str| text_header(headers, n);
        self.status_code = find(":status").and_then(|s| s.parse().ok());
        let content_type = find("content-type").unwrap_or("");
        header_event(&mut self.encoded, "http.response.headers", RESPONSE_PREFIX, headers, self.redact_also.as_deref());
        self.resp_sse = content_type.trim_start().to_ascii_lowercase().starts_with("text/event-stream");
        self.resp_stream = self.resp_sse || crate::provider::usage::is_aws_event_stream(content_type);
        if self.capture.wants(content_type) {
            self.resp_body = Some(Capture::new(self.capture.max_bytes));
        }
        if let Some(f) = self.format {
            self.parser = Some(UsageParser::new(f, content_type));
        }
    }

    /// Another reader parses this response's usage (a token budget, fed the same chunks): this
    /// span stops parsing its own and takes the result by [`Transaction::lend_usage`] before
    /// [`Transaction::finish`]. Does nothing when the span reads no usage (header-only spans).
    pub fn usage_read_elsewhere(&mut self) {
        if self.parser.take().is_some() {
            self.usage = Some(Borrowed::Awaited);
        }
    }

    /// Whether the span waits for another reader's usage ([`Transaction::usage_read_elsewhere`]).
    pub fn borrows_usage(&self) -> bool {
        matches!(self.usage, Some(Borrowed::Awaited))
    }

    /// What the other reader found (see [`Transaction::usage_read_elsewhere`]).
    pub fn lend_usage(&mut self, info: ResponseInfo) {
        if self.usage.is_some() {
            self.usage = Some(Borrowed::Got(info));
        }
    }

    /// Whether the response body is worth asking Envoy for (after response headers).
    pub fn wants_response_body(&self) -> bool {
        self.resp_body.is_some() || self.parser.is_some()
    }

    pub fn on_response_body(&mut self, chunk: &[u8]) {
        if self.resp_stream && self.first_chunk.is_none() && !chunk.is_empty() {
            self.first_chunk = Some(unix_nanos(SystemTime::now()));
        }
        if let Some(c) = &mut self.resp_body {
            c.push(chunk);
        }
        if let Some(p) = &mut self.parser {
            p.feed(chunk);
        }
    }

    /// Takes the span's end time now (the first call counts); [`Transaction::finish`] may then
    /// run later, once the last answer has gone out, without moving the end.
    pub fn mark_ended(&mut self) {
        self.ended.get_or_insert_with(|| unix_nanos(SystemTime::now()));
    }

    /// Ends the span (at the time [`Transaction::mark_ended`] took, or now) and hands it to the
    /// exporter; records usage metrics.
    /// What the response said (model, usage): the budget's reading when it lent one, else this
    /// span's. The model the upstream names is its text like any other: one that carries a live
    /// secret (an upstream echoing the key where the model goes) is dropped, never a span
    /// attribute or a metric label on the unauthenticated `/metrics`.
    fn response_info(&mut self, secrets: &[&[u8]]) -> ResponseInfo {
        let mut info: ResponseInfo = match self.usage.take() {
            Some(Borrowed::Got(info)) => info,
            _ => self.parser.as_mut().map(|p| p.finish()).unwrap_or_default(),
        };
        if info.model.as_deref().is_some_and(|m| secrets.iter().any(|s| crate::scrub::contains(m.as_bytes(), s))) {
            info.model = None;
        }
        info
    }

    pub fn finish(mut self, sink: &Sink, secrets: &[&[u8]]) {
        let end = self.ended.unwrap_or_else(|| unix_nanos(SystemTime::now()));
        if self.request_model.is_none() {
            if let Some(buf) = self.req_model_buf.take() {
                self.request_model = crate::provider::usage::request_model(&buf.into_bytes());
            }
        }
        let info = self.response_info(secrets);
        let mut out = std::mem::take(&mut self.encoded);
        let buf = &mut out;
        let mut attr = |key: &str, value: Value<'_>| otlp::attribute(buf, field::ATTRIBUTES, &[key], value);
        if let Some(m) = &self.request_model {
            attr("gen_ai.request.model", Value::Str(m));
        }
        if let Some(m) = &info.model {
            attr("gen_ai.response.model", Value::Str(m));
        }
        let u = &info.usage;
        for (key, v) in [
            ("gen_ai.usage.input_tokens", u.input_tokens),
            ("gen_ai.usage.output_tokens", u.output_tokens),
            ("gen_ai.usage.cache_read.input_tokens", u.cache_read_tokens),
            ("gen_ai.usage.cache_creation.input_tokens", u.cache_creation_tokens),
        ] {
            if let Some(v) = v {
                // A provider's count beyond i64 is nonsense, not a negative number.
                attr(key, Value::Int(i64::try_from(v).unwrap_or(i64::MAX)));
            }
        }
        if let Some(code) = self.status_code {
            attr("http.response.status_code", Value::Int(code));
        }
        let error = self.error.map(Cow::Borrowed).or_else(|| match self.status_code {
            Some(c) if c >= 400 => Some(Cow::Owned(c.to_string())),
            _ => None,
        });
        if let Some(e) = &error {
            attr("error.type", Value::Str(e));
        }
        for (name, capture) in
            [("http.request.body", self.req_body.take()), ("http.response.body", self.resp_body.take())]
        {
            if let Some(c) = capture {
                let done = c.finish(secrets);
                otlp::message(buf, field::EVENTS, |e| {
                    otlp::fixed64(e, event::TIME, end);
                    otlp::string(e, event::NAME, name);
                    otlp::attribute(e, event::ATTRIBUTES, &["body.base64"], Value::Str(&done.base64));
                    otlp::attribute(
                        e,
                        event::ATTRIBUTES,
                        &["body.original_length"],
                        Value::Int(done.original_length as i64),
                    );
                    otlp::attribute(e, event::ATTRIBUTES, &["body.truncated"], Value::Bool(done.truncated));
                });
                let request = name == "http.request.body";
                super::content::attributes(buf, self.format, self.resp_sse, request, &done.bytes, secrets);
            }
        }
        match (&self.request_model, self.operation) {
            (Some(m), Some(op)) => otlp::string_parts(buf, field::NAME, &[op, " ", m]),
            _ => otlp::string_parts(buf, field::NAME, &[&self.method, " ", &self.host]),
        }
        if let (None, Some(operation)) = (self.error, self.operation.filter(|_| self.provider != "-")) {
            let seconds = |at: u64| at.saturating_sub(self.start) as f64 / 1e9;
            sink.metrics.genai.record(&super::genai::Observation {
                provider: self.provider,
                operation,
                model: self.request_model.as_deref().or(info.model.as_deref()).unwrap_or("unknown"),
                answered: matches!(self.status_code, Some(200..=299)),
                error: super::genai::error_type(self.status_code),
                tenant: self.tenant_label.as_deref().unwrap_or(""),
                tokens: (u.input_tokens, u.output_tokens),
                duration_s: seconds(end),
                first_chunk_s: self.first_chunk.map(seconds),
            });
        }
        otlp::bytes(buf, field::TRACE_ID, &self.trace_id);
        otlp::bytes(buf, field::SPAN_ID, &self.span_id);
        if let Some(ts) = &self.tracestate {
            otlp::string(buf, field::TRACE_STATE, ts);
        }
        let mut flags = u32::from(self.flags) | field::FLAGS_HAS_IS_REMOTE;
        if let Some(p) = &self.parent {
            otlp::bytes(buf, field::PARENT_SPAN_ID, p);
            flags |= field::FLAGS_IS_REMOTE;
        }
        otlp::fixed32(buf, field::FLAGS, flags);
        otlp::varint(buf, field::KIND, field::KIND_CLIENT);
        otlp::fixed64(buf, field::START, self.start);
        otlp::fixed64(buf, field::END, end);
        if let Some(e) = &error {
            otlp::error_status(buf, e);
        }
        sink.send(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::trace_context::push_hex;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message as _;

    fn start_with(capture: CapturePolicy, headers: &[(&str, &[u8])]) -> (Transaction, String) {
        start_at("/v1/messages", capture, headers)
    }

    fn start_at(path: &str, capture: CapturePolicy, headers: &[(&str, &[u8])]) -> (Transaction, String) {
        let s = Start {
            provider: crate::provider::lookup("anthropic"),
            route: Some("default/anthropic"),
            policy: Some("default/key"),
            method: "POST",
            scheme: "https",
            authority: "api.anthropic.com",
            host: "api.anthropic.com",
            redacted_path: path,
            request_model: None,
            injected: true,
            smuggled: false,
            redact_also: None,
            error: None,
            identity: None,
            tenant_label: None,
            root_trace_id: random_trace_id(),
        };
        Transaction::start(&s, headers, &std::sync::Arc::new(capture))
    }

    fn start(capture: CapturePolicy) -> Transaction {
        start_with(capture, &[("content-type", b"application/json"), ("X-Api-Key", b"sk-secret")]).0
    }

    /// Finishes `tx` through a sink and decodes what the exporter would receive.
    fn finish(tx: Transaction) -> Span {
        let (send, mut recv) = tokio::sync::mpsc::channel(1);
        let sink = Sink::new(Default::default(), Some(send));
        tx.finish(&sink, &[]);
        Span::decode(&recv.try_recv().unwrap()[..]).unwrap()
    }

    /// What bounds parked transactions (the observing filter's hand-off) counts what a span
    /// holds: its captured bodies with the rest.
    #[test]
    fn a_transaction_counts_the_bodies_it_holds() {
        let mut tx = start(CapturePolicy { max_bytes: 64 << 10, ..CapturePolicy::default() });
        let bare = tx.heap_bytes();
        tx.on_request_body(&vec![b'a'; 64 << 10]);
        tx.on_response_headers(&[(":status", b"200"), ("content-type", b"application/json")]);
        tx.on_response_body(&vec![b'b'; 64 << 10]);
        assert!(tx.heap_bytes() >= bare + (128 << 10), "{} from {bare}", tx.heap_bytes());
    }

    /// `gen_ai.client.operation.time_to_first_chunk` is for every stream: server-sent events and
    /// Bedrock's event stream alike; a JSON answer is no stream.
    #[test]
    fn a_streamed_response_of_either_kind_records_its_first_chunk() {
        for (content_type, stream) in [
            (&b"text/event-stream; charset=utf-8"[..], true),
            (b"application/vnd.amazon.eventstream", true),
            (b"application/json", false),
        ] {
            let mut tx = start(CapturePolicy::default());
            tx.on_response_headers(&[(":status", b"200"), ("content-type", content_type)]);
            tx.on_response_body(b"\0\0\0\x10");
            assert_eq!(tx.first_chunk.is_some(), stream, "{}", String::from_utf8_lossy(content_type));
        }
    }

    #[test]
    fn read_bodies_false_asks_envoy_for_no_body() {
        let mut tx = start(CapturePolicy::default());
        assert!(tx.wants_request_body(), "capture and the model in the JSON body");
        tx.on_response_headers(&[(":status", b"200"), ("content-type", b"application/json")]);
        assert!(tx.wants_response_body());

        let mut tx = start(CapturePolicy { read_bodies: false, ..CapturePolicy::default() });
        assert!(!tx.wants_request_body());
        tx.on_response_headers(&[(":status", b"200"), ("content-type", b"application/json")]);
        assert!(!tx.wants_response_body());
    }

    #[test]
    fn usage_beyond_i64_saturates_instead_of_wrapping_negative() {
        let mut tx = start(CapturePolicy::default());
        tx.on_response_headers(&[(":status", b"200"), ("content-type", b"application/json")]);
        tx.on_response_body(
            br#"{"model":"m","usage":{"input_tokens":18446744073709551615,"output_tokens":9223372036854775808}}"#,
        );
        let (send, mut recv) = tokio::sync::mpsc::channel(1);
        let metrics = std::sync::Arc::new(crate::telemetry::Metrics::default());
        let sink = Sink::new(metrics.clone(), Some(send));
        tx.finish(&sink, &[]);
        // Twice: the token counter saturates too.
        let mut tx = start(CapturePolicy::default());
        tx.on_response_headers(&[(":status", b"200"), ("content-type", b"application/json")]);
        tx.on_response_body(br#"{"model":"m","usage":{"input_tokens":18446744073709551615,"output_tokens":1}}"#);
        let (send2, _recv2) = tokio::sync::mpsc::channel(1);
        tx.finish(&Sink::new(metrics.clone(), Some(send2)), &[]);
        let span = Span::decode(&recv.try_recv().unwrap()[..]).unwrap();
        let int = |k: &str| match span.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.clone()?.value) {
            Some(Any::IntValue(v)) => v,
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(int("gen_ai.usage.input_tokens"), i64::MAX);
        assert_eq!(int("gen_ai.usage.output_tokens"), i64::MAX);
        // Histogram sums are floats: the totals stay at the top of the range, never wrap.
        let (input, output) = metrics.tokens("anthropic", "m").unwrap();
        assert_eq!(input, u64::MAX);
        assert!(output >= i64::MAX as u64, "{output}");
    }

    /// `GET /v1/models` or a file upload is no GenAI call: it was recorded as `chat` (model
    /// `unknown`) in `gen_ai_client_operation_duration`, and named `chat` on its span. The
    /// provider is named as the conventions spell it.
    #[test]
    fn a_call_that_is_no_genai_operation_is_no_chat_in_spans_or_metrics() {
        let (mut tx, _) = start_at("/v1/models", CapturePolicy::default(), &[]);
        tx.on_response_headers(&[(":status", b"200"), ("content-type", b"application/json")]);
        let (send, mut recv) = tokio::sync::mpsc::channel(1);
        let metrics = std::sync::Arc::new(crate::telemetry::Metrics::default());
        tx.finish(&Sink::new(metrics.clone(), Some(send)), &[]);
        let span = Span::decode(&recv.try_recv().unwrap()[..]).unwrap();
        let attr = |k: &str| span.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.clone()?.value);
        assert_eq!(attr("gen_ai.operation.name"), None);
        assert_eq!(attr("gen_ai.provider.name"), Some(Any::StringValue("anthropic".into())));
        assert_eq!(span.name, "POST api.anthropic.com");
        let mut page = crate::prom::Page::new();
        metrics.genai.render(&mut page);
        assert!(!page.finish().contains("gen_ai_client_operation_duration_seconds_count"));
    }

    /// The attack: the agent names no model and the upstream answers with the key where the
    /// model goes. The response's model was the one text from a response keyswap did not scrub,
    /// and it became a span attribute and a label on `/metrics`.
    #[test]
    fn an_upstream_echoing_the_key_as_the_model_puts_it_in_no_span_or_metric() {
        const KEY: &[u8] = b"sk-ant-REAL-echoed-0001";
        let mut tx = start(CapturePolicy::default());
        tx.on_response_headers(&[(":status", b"200"), ("content-type", b"application/json")]);
        tx.on_response_body(br#"{"model":"sk-ant-REAL-echoed-0001","usage":{"input_tokens":3,"output_tokens":4}}"#);
        let (send, mut recv) = tokio::sync::mpsc::channel(1);
        let metrics = std::sync::Arc::new(crate::telemetry::Metrics::default());
        tx.finish(&Sink::new(metrics.clone(), Some(send)), &[KEY]);
        let encoded = recv.try_recv().unwrap();
        assert!(!encoded.windows(KEY.len()).any(|w| w == KEY), "the key is in the span");
        let span = Span::decode(&encoded[..]).unwrap();
        assert!(!span.attributes.iter().any(|a| a.key == "gen_ai.response.model"));
        assert!(metrics.tokens("anthropic", "sk-ant-REAL-echoed-0001").is_none());
        assert_eq!(metrics.tokens("anthropic", "unknown"), Some((3, 4)), "the call is still counted");
    }

    /// The attack: a request body that grows when a viewer's attributes are made from it:
    /// thousands of empty messages (`{}` becomes a 27-byte message each), or bytes that are not
    /// UTF-8 (each a 3-byte replacement character). Every content attribute stays near the
    /// capture limit, and the span with it.
    #[test]
    fn an_agents_body_cannot_grow_the_content_attributes_past_the_capture_limit() {
        const LIMIT: usize = 16 * 1024;
        let capture = || CapturePolicy { max_bytes: LIMIT, ..CapturePolicy::default() };
        let mut empties = String::from(r#"{"messages":["#);
        while empties.len() < LIMIT - 8 {
            empties.push_str("{},");
        }
        empties.push_str("{}]}");
        for body in [empties.into_bytes(), vec![0xff; LIMIT]] {
            let mut tx = start(capture());
            tx.on_request_body(&body);
            tx.on_response_headers(&[(":status", b"200"), ("content-type", b"application/json")]);
            tx.on_response_body(br#"{"content":[{"type":"text","text":"ok"}]}"#);
            let span = finish(tx);
            for a in &span.attributes {
                if let Some(Any::StringValue(v)) = a.value.as_ref().and_then(|v| v.value.as_ref()) {
                    assert!(v.len() <= 2 * LIMIT + 1024, "{}: {} bytes", a.key, v.len());
                }
            }
            let messages = span.attributes.iter().find(|a| a.key == "gen_ai.input.messages");
            if let Some(Any::StringValue(m)) = messages.and_then(|a| a.value.as_ref()?.value.as_ref()) {
                let list: serde_json::Value = serde_json::from_str(m).expect("still a JSON list");
                assert!(!list.as_array().unwrap().is_empty());
            }
            assert!(span.encoded_len() < 6 * LIMIT, "{} bytes", span.encoded_len());
        }
    }

    /// The strings of a string-array attribute.
    fn string_array(a: &opentelemetry_proto::tonic::common::v1::KeyValue) -> Vec<String> {
        match a.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Any::ArrayValue(list)) => list
                .values
                .iter()
                .map(|v| match &v.value {
                    Some(Any::StringValue(s)) => s.clone(),
                    other => panic!("{other:?}"),
                })
                .collect(),
            other => panic!("{}: {other:?}", a.key),
        }
    }

    #[test]
    fn header_events_use_lowercase_names_group_repeats_and_redact_credentials() {
        let headers: [(&str, &[u8]); 5] = [
            (":path", b"/v1/messages"),
            ("content-type", b"application/json"),
            ("X-Api-Key", b"sk-secret"),
            ("accept", b"a"),
            ("Accept", b"b\xff"),
        ];
        let (mut tx, _) = start_with(CapturePolicy::default(), &headers);
        tx.on_response_headers(&[(":status", b"429"), ("retry-after", b"3")]);
        let span = finish(tx);
        let ev = |n: &str| span.events.iter().find(|e| e.name == n).unwrap();
        let get = |e: &str, k: &str| {
            string_array(ev(e).attributes.iter().find(|a| a.key == k).unwrap_or_else(|| panic!("{k}")))
        };
        let req = "http.request.headers";
        assert_eq!(get(req, "http.request.header.x-api-key"), ["[redacted]"]);
        assert_eq!(get(req, "http.request.header.content-type"), ["application/json"]);
        assert_eq!(get(req, "http.request.header.accept"), ["a", "b\u{fffd}"]);
        assert_eq!(ev(req).attributes.len(), 3, "no pseudo-headers, repeats grouped");
        assert_eq!(get("http.response.headers", "http.response.header.retry-after"), ["3"]);
        let st = span.status.as_ref().unwrap();
        assert_eq!((st.code, st.message.as_str()), (2, "429"));
        assert!(!span.encode_to_vec().windows(9).any(|w| w == b"sk-secret"));
    }

    /// The sketch only skips comparisons: with many names (sketch bits shared by different
    /// names) and repeats in any case anywhere, every name is one attribute holding all its values.
    #[test]
    fn repeated_headers_are_grouped_whatever_names_share_a_sketch_bit() {
        // 50 names and 3 more repeated: within the names recorded per event.
        let mut names: Vec<String> = (0..50).map(|i| format!("x-h{}-{}", "a".repeat(i % 7), i)).collect();
        names.extend(["accept", "Accept", "ACCEPT", "x-h-3", "X-H-3", "via", "VIA"].map(str::to_owned));
        let headers: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), n.as_bytes())).collect();
        let (tx, _) = start_with(CapturePolicy::default(), &headers);
        let span = finish(tx);
        let ev = span.events.iter().find(|e| e.name == "http.request.headers").unwrap();
        let mut want: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for n in &names {
            want.entry(format!("http.request.header.{}", n.to_ascii_lowercase())).or_default().push(n.clone());
        }
        let got: std::collections::BTreeMap<String, Vec<String>> =
            ev.attributes.iter().map(|a| (a.key.clone(), string_array(a))).collect();
        assert_eq!(ev.attributes.len(), want.len(), "one attribute per name");
        assert_eq!(got, want);
    }

    /// The attack: 100 headers of 5 KB each, names of the agent's choosing, on every request:
    /// each span grew by 500 KB and a backend's field list by 100 names per request.
    #[test]
    fn an_agents_header_flood_is_recorded_capped_and_counted() {
        let names: Vec<String> = (0..100).map(|i| format!("x-flood-{i}")).collect();
        let value = "v".repeat(5_000);
        let headers: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), value.as_bytes())).collect();
        let (tx, _) = start_with(CapturePolicy::default(), &headers);
        let span = finish(tx);
        let ev = span.events.iter().find(|e| e.name == "http.request.headers").unwrap();
        let headers: Vec<_> = ev.attributes.iter().filter(|a| a.key.starts_with("http.request.header.")).collect();
        assert_eq!(headers.len(), MAX_HEADER_NAMES);
        assert!(headers.iter().all(|a| string_array(a)[0].len() == MAX_HEADER_VALUE));
        let omitted = ev.attributes.iter().find(|a| a.key == "keyswap.headers_omitted").expect("the rest counted");
        assert_eq!(omitted.value.as_ref().and_then(|v| v.value.as_ref()), Some(&Any::IntValue(36)));
        assert!(span.encode_to_vec().len() < 100_000, "{} bytes", span.encode_to_vec().len());
    }

    #[test]
    fn spans_continue_the_agents_trace_or_start_one() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let (tx, forwarded) = start_with(
            CapturePolicy { read_bodies: false, ..CapturePolicy::default() },
            &[("traceparent", parent.as_bytes()), ("tracestate", b"vendor=x")],
        );
        let span = finish(tx);
        assert_eq!(
            span.trace_id,
            [0x0a, 0xf7, 0x65, 0x19, 0x16, 0xcd, 0x43, 0xdd, 0x84, 0x48, 0xeb, 0x21, 0x1c, 0x80, 0x31, 0x9c]
        );
        assert_eq!(span.parent_span_id, [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]);
        assert_eq!(span.trace_state, "vendor=x");
        assert_eq!(span.flags, 0x301, "sampled, parent remote");
        assert_eq!(span.kind, 3);
        assert_eq!(span.name, "POST api.anthropic.com");
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano && span.start_time_unix_nano > 0);
        let mut expect = String::from("00-0af7651916cd43dd8448eb211c80319c-");
        push_hex(&mut expect, &span.span_id);
        expect.push_str("-01");
        assert_eq!(forwarded, expect);

        // The attack: reserved flag bits (or "not sampled" on a span `always_on` records) passed
        // upstream and into the span as the agent wrote them.
        for (sent, kept) in [("ff", 0x03), ("00", 0x01), ("fc", 0x01)] {
            let parent = format!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{sent}");
            let (tx, forwarded) = start_with(CapturePolicy::default(), &[("traceparent", parent.as_bytes())]);
            assert!(forwarded.ends_with(&format!("-{kept:02x}")), "{sent}: {forwarded}");
            assert_eq!(finish(tx).flags, 0x300 | kept, "{sent}");
        }

        for bad in [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        let (a, _) = start(CapturePolicy::default()).trace_parts();
        let (b, _) = start(CapturePolicy::default()).trace_parts();
        assert_ne!(a, b, "fresh traces get fresh ids");
        assert!(!valid_tracestate("a=1,\u{7f}"));
    }

    impl Transaction {
        fn trace_parts(&self) -> (TraceId, SpanId) {
            (self.trace_id, self.span_id)
        }
    }
}
