//! One span per transaction, recorded while the ext_proc stream runs and handed to the
//! exporter task when it ends. The request path only appends to vectors and `try_send`s.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{Array, InstrumentationScope, Key, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanLinks};

use super::capture::{Capture, CapturePolicy};
use super::{Metrics, Sink};
use crate::provider::usage::{Format, ResponseInfo, UsageParser};
use crate::provider::{is_redacted, Provider};

/// What the request-headers phase knows about a transaction.
pub struct Start<'a> {
    pub provider: Option<&'static Provider>,
    pub route: &'a str,
    pub policy: Option<&'a str>,
    pub method: &'a str,
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
}

/// An agent's `traceparent`, when valid (W3C Trace Context, version 00).
pub fn parse_traceparent(v: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let mut parts = v.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace, span, TraceFlags::new(flags)))
}

/// A transaction in flight.
pub struct Transaction {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    tracestate: TraceState,
    start: SystemTime,
    operation: &'static str,
    request_model: Option<String>,
    method: String,
    host: String,
    provider: &'static str,
    format: Option<Format>,
    attributes: Vec<KeyValue>,
    events: Vec<opentelemetry::trace::Event>,
    error: Option<&'static str>,
    status_code: Option<i64>,
    capture: std::sync::Arc<CapturePolicy>,
    req_body: Option<Capture>,
    resp_body: Option<Capture>,
    req_model_buf: Option<Capture>,
    parser: Option<UsageParser>,
    redact_also: Option<String>,
}

fn header_event(
    name: &'static str,
    prefix: &str,
    headers: &[(&str, &[u8])],
    redact_also: Option<&str>,
) -> opentelemetry::trace::Event {
    let request = prefix == REQUEST_PREFIX;
    let mut attrs: Vec<KeyValue> = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        if k.starts_with(':') {
            continue;
        }
        // Envoy sends lowercase names; other senders may not.
        let key: Cow<'_, str> = if k.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(k.to_ascii_lowercase())
        } else {
            Cow::Borrowed(k)
        };
        let value = if is_redacted(&key) || redact_also == Some(&*key) {
            StringValue::from("[redacted]")
        } else {
            StringValue::from(String::from_utf8_lossy(v).into_owned())
        };
        // Common names have static attribute keys: no allocation for the key.
        let attr: Key = match known_header_attr(&key, request) {
            Some(a) => Key::from_static_str(a),
            None => {
                let mut a = String::with_capacity(prefix.len() + key.len());
                a.push_str(prefix);
                a.push_str(&key);
                Key::from(a)
            }
        };
        match attrs.iter_mut().find(|a| a.key == attr) {
            Some(KeyValue { value: Value::Array(Array::String(list)), .. }) => list.push(value),
            _ => attrs.push(KeyValue::new(attr, Value::Array(Array::String(vec![value])))),
        }
    }
    opentelemetry::trace::Event::new(name, SystemTime::now(), attrs, 0)
}

const REQUEST_PREFIX: &str = "http.request.header.";

/// `http.request.header.<name>` / `http.response.header.<name>` for the headers most requests
/// and responses carry.
fn known_header_attr(name: &str, request: bool) -> Option<&'static str> {
    macro_rules! table {
        ($($h:literal),* $(,)?) => {
            match (name, request) {
                $(($h, true) => Some(concat!("http.request.header.", $h)),
                  ($h, false) => Some(concat!("http.response.header.", $h)),)*
                _ => None,
            }
        };
    }
    table!(
        "accept",
        "accept-encoding",
        "anthropic-version",
        "authorization",
        "cache-control",
        "connection",
        "content-length",
        "content-type",
        "date",
        "openai-organization",
        "request-id",
        "server",
        "traceparent",
        "tracestate",
        "transfer-encoding",
        "user-agent",
        "x-api-key",
        "x-envoy-upstream-service-time",
        "x-forwarded-proto",
        "x-request-id",
        "x-stainless-arch",
        "x-stainless-lang",
        "x-stainless-os",
        "x-stainless-package-version",
        "x-stainless-retry-count",
        "x-stainless-runtime",
        "x-stainless-runtime-version",
        "x-stainless-timeout",
    )
}

impl Transaction {
    /// Starts a transaction. Returns it and the `traceparent` to forward upstream.
    pub fn start(
        s: &Start<'_>,
        headers: &[(&str, &[u8])],
        capture: &std::sync::Arc<CapturePolicy>,
    ) -> (Transaction, String) {
        let find = |n: &str| {
            headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).and_then(|(_, v)| std::str::from_utf8(v).ok())
        };
        let ids = RandomIdGenerator::default();
        let parent = find("traceparent").and_then(parse_traceparent);
        let (trace_id, parent_span, flags) = match parent {
            Some((t, p, f)) => (t, Some(p), f),
            None => (ids.new_trace_id(), None, TraceFlags::SAMPLED),
        };
        let span_id = ids.new_span_id();
        let tracestate = find("tracestate").and_then(|v| v.parse::<TraceState>().ok()).unwrap_or_default();
        let traceparent = format!("00-{trace_id}-{span_id}-{:02x}", flags.to_u8());
        let operation = s.provider.and_then(|p| p.operation(s.redacted_path)).unwrap_or("chat");
        let mut attributes = Vec::with_capacity(24);
        if let Some(p) = s.provider {
            attributes.push(KeyValue::new("gen_ai.provider.name", p.name));
            attributes.push(KeyValue::new("gen_ai.system", p.name));
            attributes.push(KeyValue::new("gen_ai.operation.name", operation));
        }
        attributes.extend([
            KeyValue::new("http.request.method", s.method.to_owned()),
            KeyValue::new("url.full", format!("{}://{}{}", s.scheme, s.authority, s.redacted_path)),
            KeyValue::new("server.address", s.host.to_owned()),
            KeyValue::new("keyswap.route", s.route.to_owned()),
            KeyValue::new("keyswap.credential.injected", s.injected),
            KeyValue::new("keyswap.smuggle.detected", s.smuggled),
        ]);
        if let Some(p) = s.policy {
            attributes.push(KeyValue::new("keyswap.policy", p.to_owned()));
        }
        let events = vec![header_event("http.request.headers", REQUEST_PREFIX, headers, s.redact_also)];
        let content_type = find("content-type").unwrap_or("");
        let req_body = capture.wants(content_type).then(|| Capture::new(capture.max_bytes));
        let format =
            s.provider.and_then(|p| crate::provider::usage::format_for(p.name)).filter(|_| capture.read_bodies);
        // openai/anthropic put the model in the JSON body: keep enough of it to read the model.
        let req_model_buf = (s.request_model.is_none() && format.is_some()).then(|| Capture::new(64 * 1024));
        let tx = Transaction {
            trace_id,
            span_id,
            parent: parent_span,
            tracestate,
            start: SystemTime::now(),
            operation,
            request_model: s.request_model.map(str::to_owned),
            method: s.method.to_owned(),
            host: s.host.to_owned(),
            provider: s.provider.map_or("-", |p| p.name),
            format,
            attributes,
            events,
            error: s.error,
            status_code: None,
            capture: capture.clone(),
            req_body,
            resp_body: None,
            req_model_buf,
            parser: None,
            redact_also: s.redact_also.map(str::to_owned),
        };
        (tx, traceparent)
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
        let find = |n: &str| {
            headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).and_then(|(_, v)| std::str::from_utf8(v).ok())
        };
        self.status_code = find(":status").and_then(|s| s.parse().ok());
        let content_type = find("content-type").unwrap_or("").to_owned();
        self.events.push(header_event(
            "http.response.headers",
            "http.response.header.",
            headers,
            self.redact_also.as_deref(),
        ));
        if self.capture.wants(&content_type) {
            self.resp_body = Some(Capture::new(self.capture.max_bytes));
        }
        if let Some(f) = self.format {
            self.parser = Some(UsageParser::new(f, &content_type));
        }
    }

    /// Whether the response body is worth asking Envoy for (after response headers).
    pub fn wants_response_body(&self) -> bool {
        self.resp_body.is_some() || self.parser.is_some()
    }

    pub fn on_response_body(&mut self, chunk: &[u8]) {
        if let Some(c) = &mut self.resp_body {
            c.push(chunk);
        }
        if let Some(p) = &mut self.parser {
            p.feed(chunk);
        }
    }

    /// Ends the span and hands it to the exporter; records usage metrics.
    pub fn finish(mut self, sink: &Sink, secrets: &[&[u8]]) {
        let end = SystemTime::now();
        if self.request_model.is_none() {
            if let Some(buf) = self.req_model_buf.take() {
                self.request_model = crate::provider::usage::request_model(&buf.into_bytes());
            }
        }
        let info: ResponseInfo = self.parser.as_mut().map(|p| p.finish()).unwrap_or_default();
        let mut attrs = std::mem::take(&mut self.attributes);
        if let Some(m) = &self.request_model {
            attrs.push(KeyValue::new("gen_ai.request.model", m.clone()));
        }
        if let Some(m) = &info.model {
            attrs.push(KeyValue::new("gen_ai.response.model", m.clone()));
        }
        let u = &info.usage;
        for (key, v) in [
            ("gen_ai.usage.input_tokens", u.input_tokens),
            ("gen_ai.usage.output_tokens", u.output_tokens),
            ("gen_ai.usage.cache_read.input_tokens", u.cache_read_tokens),
            ("gen_ai.usage.cache_creation.input_tokens", u.cache_creation_tokens),
        ] {
            if let Some(v) = v {
                attrs.push(KeyValue::new(key, v as i64));
            }
        }
        if let Some(code) = self.status_code {
            attrs.push(KeyValue::new("http.response.status_code", code));
        }
        let error = self.error.map(Cow::Borrowed).or_else(|| match self.status_code {
            Some(c) if c >= 400 => Some(Cow::Owned(c.to_string())),
            _ => None,
        });
        if let Some(e) = &error {
            attrs.push(KeyValue::new("error.type", e.to_string()));
        }
        for (name, capture) in
            [("http.request.body", self.req_body.take()), ("http.response.body", self.resp_body.take())]
        {
            if let Some(c) = capture {
                let done = c.finish(secrets);
                self.events.push(opentelemetry::trace::Event::new(
                    name,
                    end,
                    vec![
                        KeyValue::new("body.base64", done.base64),
                        KeyValue::new("body.original_length", done.original_length as i64),
                        KeyValue::new("body.truncated", done.truncated),
                    ],
                    0,
                ));
            }
        }
        let name = match (&self.request_model, self.format) {
            (Some(m), _) => format!("{} {m}", self.operation),
            _ => format!("{} {}", self.method, self.host),
        };
        if let (Some(input), Some(output)) = (u.input_tokens, u.output_tokens) {
            let model = info.model.as_deref().or(self.request_model.as_deref()).unwrap_or("unknown");
            sink.metrics.record_tokens(self.provider, model, input, output);
        }
        let span = SpanData {
            span_context: SpanContext::new(self.trace_id, self.span_id, TraceFlags::SAMPLED, false, self.tracestate),
            parent_span_id: self.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: self.parent.is_some(),
            span_kind: SpanKind::Client,
            name: name.into(),
            start_time: self.start,
            end_time: end,
            attributes: attrs,
            dropped_attributes_count: 0,
            events: {
                let mut e = SpanEvents::default();
                e.events = self.events;
                e
            },
            links: SpanLinks::default(),
            status: match error {
                Some(e) => Status::error(e.into_owned()),
                None => Status::Unset,
            },
            instrumentation_scope: InstrumentationScope::builder("keyswap")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        };
        sink.send(span);
    }
}

/// The exporter side: a bounded queue drained by one task that batches and exports.
pub fn spawn_exporter<E>(exporter: E, metrics: Arc<Metrics>, capacity: usize) -> tokio::sync::mpsc::Sender<SpanData>
where
    E: opentelemetry_sdk::trace::SpanExporter + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<SpanData>(capacity);
    tokio::spawn(async move {
        // A batch never holds more than the queue: what waits for a hung collector stays bounded.
        let batch_max = capacity.min(512);
        let mut batch = Vec::with_capacity(batch_max);
        loop {
            if rx.recv_many(&mut batch, batch_max).await == 0 {
                return;
            }
            // Let a burst fill the batch a little before exporting.
            let deadline = tokio::time::sleep(std::time::Duration::from_millis(200));
            tokio::pin!(deadline);
            while batch.len() < batch_max {
                let room = batch_max - batch.len();
                tokio::select! {
                    n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                    _ = &mut deadline => break,
                }
            }
            let n = batch.len() as u64;
            let spans = std::mem::replace(&mut batch, Vec::with_capacity(batch_max));
            match tokio::time::timeout(std::time::Duration::from_secs(10), exporter.export(spans)).await {
                Ok(Ok(())) => Metrics::add(&metrics.spans_exported, n),
                Ok(Err(e)) => {
                    Metrics::add(&metrics.spans_export_failed, n);
                    tracing::warn!(error = %e, spans = n, "OTLP export failed; spans dropped");
                }
                Err(_) => {
                    Metrics::add(&metrics.spans_export_failed, n);
                    tracing::warn!(spans = n, "OTLP export timed out after 10 s; spans dropped");
                }
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(capture: CapturePolicy) -> Transaction {
        let s = Start {
            provider: crate::provider::lookup("anthropic"),
            route: "default/anthropic",
            policy: Some("default/key"),
            method: "POST",
            scheme: "https",
            authority: "api.anthropic.com",
            host: "api.anthropic.com",
            redacted_path: "/v1/messages",
            request_model: None,
            injected: true,
            smuggled: false,
            redact_also: None,
            error: None,
        };
        let headers: [(&str, &[u8]); 2] = [("content-type", b"application/json"), ("X-Api-Key", b"sk-secret")];
        Transaction::start(&s, &headers, &std::sync::Arc::new(capture)).0
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
    fn header_events_use_lowercase_names_and_redact_credentials() {
        let tx = start(CapturePolicy::default());
        let attrs = &tx.events[0].attributes;
        let get = |k: &str| attrs.iter().find(|a| a.key.as_str() == k).map(|a| a.value.to_string());
        assert_eq!(get("http.request.header.x-api-key").as_deref(), Some("[\"[redacted]\"]"));
        assert_eq!(get("http.request.header.content-type").as_deref(), Some("[\"application/json\"]"));
        assert_eq!(known_header_attr("content-type", false), Some("http.response.header.content-type"));
    }
}
