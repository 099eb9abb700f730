//! Model and token usage read out of provider response bodies, incrementally.
//!
//! Envoy hands ext_proc a response body chunk by chunk, split anywhere: inside a UTF-8 character,
//! an SSE line or a JSON value. [`UsageParser`] is fed those chunks as they pass and reports what the
//! provider said about the call: the model that answered and the tokens it counted.
//!
//! Two body shapes are read:
//! - a buffered JSON document (`application/json` and anything else that is not an event stream),
//!   kept whole up to [`MAX_JSON_BYTES`] and parsed once, when [`UsageParser::finish`] is called;
//! - a server-sent event stream (`text/event-stream`), parsed line by line as it arrives, keeping at
//!   most one event's data ([`MAX_EVENT_BYTES`]).
//!
//! Memory is bounded either way, and malformed input of any kind yields `None` fields, never a panic.

use serde::Deserialize;
use serde_json::Value;
use std::fmt;

/// The most a buffered JSON response body may weigh. Past it the parser drops what it had, stops
/// buffering, and reports no usage for the response.
pub const MAX_JSON_BYTES: usize = 4 * 1024 * 1024;

/// The most one server-sent event may carry (its `event:` name plus its `data:` lines, joined).
/// A bigger event is skipped up to the blank line that ends it; the events after it still count.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// After an event bigger than this, the SSE data buffer is shrunk back to it, so one large event
/// does not pin its memory for the rest of the stream.
const SSE_KEEP_CAPACITY: usize = 64 * 1024;

/// The wire format a provider reports model and usage in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenAI (and Azure OpenAI): chat completions and the Responses API, JSON or SSE.
    OpenAi,
    /// Anthropic messages, JSON or SSE.
    Anthropic,
    /// Google Gemini `generateContent` / `streamGenerateContent` (JSON, JSON array, or `alt=sse`).
    Google,
    /// Amazon Bedrock Converse, JSON.
    Bedrock,
}

/// The response format of a provider named in the registry. azure-openai and openai share
/// [`Format::OpenAi`]; `custom` (and any unknown name) is `None`: its bodies are not read.
pub fn format_for(provider: &str) -> Option<Format> {
    match provider {
        "openai" | "azure-openai" => Some(Format::OpenAi),
        "anthropic" => Some(Format::Anthropic),
        "google" => Some(Format::Google),
        "bedrock" => Some(Format::Bedrock),
        _ => None,
    }
}

/// Token counts a provider reported for one call. A field the provider did not report is `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, as the provider counts them (OpenAI and Google include cached tokens here;
    /// Anthropic and Bedrock count cached tokens only in the cache fields).
    pub input_tokens: Option<u64>,
    /// Generated tokens (for Google, candidates plus thoughts).
    pub output_tokens: Option<u64>,
    /// Prompt tokens served from the provider's cache.
    pub cache_read_tokens: Option<u64>,
    /// Prompt tokens written to the provider's cache (Anthropic, Bedrock).
    pub cache_creation_tokens: Option<u64>,
}

/// What a response body said about the call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseInfo {
    /// The model that answered, as the provider names it (`None` for Bedrock: its body has none).
    pub model: Option<String>,
    /// The token counts the response reported.
    pub usage: Usage,
}

/// The `model` field of a JSON request body (openai, anthropic, azure with the model in the body).
/// `None` when the body is not a JSON object, has no `model`, or its `model` is not a non-empty
/// string. Never panics; other fields are skipped without being materialised.
pub fn request_model(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ModelOnly {
        #[serde(default)]
        model: Option<String>,
    }
    // A derived struct also deserializes from a JSON array (by position): only objects name fields.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let parsed: ModelOnly = serde_json::from_slice(body).ok()?;
    parsed.model.filter(|m| !m.is_empty())
}

/// Reads model and usage out of one response body, fed chunk by chunk.
pub struct UsageParser {
    format: Format,
    info: ResponseInfo,
    body: Body,
}

enum Body {
    Json(JsonBody),
    Sse(SseReader),
}

impl UsageParser {
    /// `content_type` is the response's `content-type` header: `text/event-stream` (parameters
    /// allowed, any case) selects SSE, anything else a buffered JSON body. Bedrock is always read as
    /// JSON.
    pub fn new(format: Format, content_type: &str) -> Self {
        let body = if format != Format::Bedrock && is_event_stream(content_type) {
            Body::Sse(SseReader::new())
        } else {
            Body::Json(JsonBody::default())
        };
        Self { format, info: ResponseInfo::default(), body }
    }

    /// Takes the next chunk of the body, as it came off the wire.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.body {
            Body::Json(json) => json.feed(chunk),
            Body::Sse(sse) => {
                let format = self.format;
                let info = &mut self.info;
                sse.feed(chunk, |event, data| apply_event(format, event, data, info));
            }
        }
    }

    /// Everything learned so far. Meant for after the last chunk, but may be called mid-stream
    /// (and more than once): an event stream reports the events completed so far, a JSON body what
    /// parses of it (nothing until it is complete).
    pub fn finish(&mut self) -> ResponseInfo {
        if let Body::Json(json) = &mut self.body {
            if json.dirty {
                json.dirty = false;
                self.info = ResponseInfo::default();
                if !json.overflowed {
                    if let Ok(value) = serde_json::from_slice::<Value>(&json.buf) {
                        apply_body(self.format, &value, &mut self.info);
                    }
                }
            }
        }
        self.info.clone()
    }

    /// Bytes held for parsing: the JSON body so far, or the current event's name and data.
    #[cfg(test)]
    fn buffered_len(&self) -> usize {
        match &self.body {
            Body::Json(json) => json.buf.len(),
            Body::Sse(sse) => sse.data.len() + sse.event.len(),
        }
    }

    /// Memory reserved for those bytes.
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        match &self.body {
            Body::Json(json) => json.buf.capacity(),
            Body::Sse(sse) => sse.data.capacity() + sse.event.capacity(),
        }
    }
}

impl fmt::Debug for UsageParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mode, buffered) = match &self.body {
            Body::Json(json) => ("json", json.buf.len()),
            Body::Sse(sse) => ("sse", sse.data.len() + sse.event.len()),
        };
        f.debug_struct("UsageParser")
            .field("format", &self.format)
            .field("mode", &mode)
            .field("buffered", &buffered)
            .field("info", &self.info)
            .finish()
    }
}

fn is_event_stream(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("");
    essence.trim().eq_ignore_ascii_case("text/event-stream")
}

/// Appends `bytes` unless that would take `buf` past `limit` bytes; grows the allocation
/// geometrically but never past `limit`. Returns whether the bytes were appended.
fn push_bounded(buf: &mut Vec<u8>, bytes: &[u8], limit: usize) -> bool {
    let needed = buf.len() + bytes.len();
    if needed > limit {
        return false;
    }
    if needed > buf.capacity() {
        let target = needed.max(buf.capacity().saturating_mul(2)).min(limit);
        buf.reserve_exact(target - buf.len());
    }
    buf.extend_from_slice(bytes);
    true
}

// ---------------------------------------------------------------------------------------------
// Buffered JSON.

#[derive(Default)]
struct JsonBody {
    buf: Vec<u8>,
    /// The body outgrew [`MAX_JSON_BYTES`]: the buffer was dropped and nothing more is kept.
    overflowed: bool,
    /// Bytes arrived (or the buffer overflowed) since `finish` last parsed.
    dirty: bool,
}

impl JsonBody {
    fn feed(&mut self, chunk: &[u8]) {
        if self.overflowed || chunk.is_empty() {
            return;
        }
        self.dirty = true;
        if !push_bounded(&mut self.buf, chunk, MAX_JSON_BYTES) {
            self.overflowed = true;
            self.buf = Vec::new();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server-sent events, per the WHATWG HTML "event stream interpretation": lines end in \n, \r\n or
// \r; `field: value` with one optional space after the colon; a line starting with `:` is a
// comment; a line without a colon is a field with an empty value; a blank line dispatches the
// event; `data` lines are joined with \n. Only `data` and `event` matter here.

/// The SSE fields this parser keeps; every other field (and comments) is read past.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Data,
    Event,
    Ignored,
}

#[derive(Clone, Copy)]
enum Line {
    /// Reading the field name, from the start of the line.
    Name,
    /// Just past the colon: one space is dropped here.
    ValueStart(Field),
    /// Reading the value.
    Value(Field),
}

/// Longest field name that can matter (`event`).
const NAME_CAP: usize = 5;

struct SseReader {
    line: Line,
    /// The current line's field name, as far as it fits; `name_len` counts all of it.
    name: [u8; NAME_CAP],
    name_len: usize,
    /// Nothing but the terminator on this line so far.
    line_empty: bool,
    /// The last byte seen ended a line with \r: a \n right after it belongs to the same terminator.
    pending_cr: bool,
    /// Bytes of a leading UTF-8 byte order mark seen; 3 once the start of the stream is past.
    bom_seen: u8,
    /// The current event outgrew [`MAX_EVENT_BYTES`]: everything up to the next blank line is
    /// dropped.
    skipping: bool,
    /// The current event's data lines, each followed by \n.
    data: Vec<u8>,
    /// The current event's `event:` field.
    event: Vec<u8>,
}

impl SseReader {
    fn new() -> Self {
        Self {
            line: Line::Name,
            name: [0; NAME_CAP],
            name_len: 0,
            line_empty: true,
            pending_cr: false,
            bom_seen: 0,
            skipping: false,
            data: Vec::new(),
            event: Vec::new(),
        }
    }

    /// Reads `input`, calling `on_event(event_name, data)` for every complete event.
    fn feed(&mut self, input: &[u8], mut on_event: impl FnMut(&[u8], &[u8])) {
        let mut input = self.skip_bom(input);
        while let Some(&first) = input.first() {
            if self.pending_cr {
                self.pending_cr = false;
                if first == b'\n' {
                    input = &input[1..];
                    continue;
                }
            }
            match self.line {
                Line::Name => {
                    let end = input.iter().position(|&b| matches!(b, b':' | b'\n' | b'\r')).unwrap_or(input.len());
                    self.push_name(&input[..end]);
                    input = &input[end..];
                    match input.first() {
                        None => {}
                        Some(b':') => {
                            input = &input[1..];
                            self.line_empty = false;
                            let field = self.field();
                            if field == Field::Event {
                                self.event.clear();
                            }
                            self.line = Line::ValueStart(field);
                        }
                        Some(&terminator) => {
                            input = &input[1..];
                            self.end_line(terminator, &mut on_event);
                        }
                    }
                }
                Line::ValueStart(field) => {
                    if first == b' ' {
                        input = &input[1..];
                    }
                    self.line = Line::Value(field);
                }
                Line::Value(field) => {
                    let end = input.iter().position(|&b| b == b'\n' || b == b'\r').unwrap_or(input.len());
                    self.push_value(field, &input[..end]);
                    input = &input[end..];
                    if let Some(&terminator) = input.first() {
                        input = &input[1..];
                        self.end_line(terminator, &mut on_event);
                    }
                }
            }
        }
    }

    /// Drops one leading UTF-8 byte order mark, however it is split.
    fn skip_bom<'a>(&mut self, mut input: &'a [u8]) -> &'a [u8] {
        const BOM: &[u8; 3] = b"\xEF\xBB\xBF";
        while let (Some(&expected), Some(&b)) = (BOM.get(usize::from(self.bom_seen)), input.first()) {
            if b != expected {
                // Not a BOM after all. A partial match only ever eats bytes that were not a field
                // name anyway (0xEF 0xBB are not ASCII).
                self.bom_seen = 3;
                break;
            }
            self.bom_seen += 1;
            input = &input[1..];
        }
        input
    }

    fn push_name(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.line_empty = false;
        let end = self.name_len + bytes.len();
        if end <= NAME_CAP {
            self.name[self.name_len..end].copy_from_slice(bytes);
        }
        self.name_len = self.name_len.saturating_add(bytes.len());
    }

    fn field(&self) -> Field {
        if self.skipping || self.name_len > NAME_CAP {
            return Field::Ignored;
        }
        match &self.name[..self.name_len] {
            b"data" => Field::Data,
            b"event" => Field::Event,
            _ => Field::Ignored,
        }
    }

    fn push_value(&mut self, field: Field, bytes: &[u8]) {
        let fits = match field {
            Field::Data => push_bounded(&mut self.data, bytes, MAX_EVENT_BYTES - self.event.len()),
            Field::Event => push_bounded(&mut self.event, bytes, MAX_EVENT_BYTES - self.data.len()),
            Field::Ignored => true,
        };
        if !fits {
            self.overflow();
        }
    }

    /// The current event is too big: drop it, and ignore its fields up to the blank line.
    fn overflow(&mut self) {
        self.skipping = true;
        self.clear_event();
        if let Line::ValueStart(_) | Line::Value(_) = self.line {
            self.line = Line::Value(Field::Ignored);
        }
    }

    fn end_line(&mut self, terminator: u8, on_event: &mut impl FnMut(&[u8], &[u8])) {
        self.pending_cr = terminator == b'\r';
        match self.line {
            Line::Name if self.line_empty => self.dispatch(on_event),
            // A field name alone is that field with an empty value.
            Line::Name => match self.field() {
                Field::Data => self.push_value(Field::Data, b"\n"),
                Field::Event => self.event.clear(),
                Field::Ignored => {}
            },
            Line::ValueStart(field) | Line::Value(field) => {
                if field == Field::Data {
                    self.push_value(Field::Data, b"\n");
                }
            }
        }
        self.line = Line::Name;
        self.name_len = 0;
        self.line_empty = true;
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(&[u8], &[u8])) {
        if self.skipping {
            self.skipping = false;
        } else if !self.data.is_empty() {
            if self.data.last() == Some(&b'\n') {
                self.data.pop();
            }
            on_event(&self.event, &self.data);
        }
        self.clear_event();
    }

    fn clear_event(&mut self) {
        self.data.clear();
        self.event.clear();
        if self.data.capacity() > SSE_KEEP_CAPACITY {
            self.data.shrink_to(SSE_KEEP_CAPACITY);
        }
        if self.event.capacity() > SSE_KEEP_CAPACITY {
            self.event.shrink_to(SSE_KEEP_CAPACITY);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What each provider reports.

/// One server-sent event's data (`[DONE]` and events that cannot carry model or usage are skipped
/// without parsing).
fn apply_event(format: Format, event: &[u8], data: &[u8], info: &mut ResponseInfo) {
    if data == b"[DONE]" || !worth_parsing(format, event, data, info) {
        return;
    }
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    match format {
        // Responses API events carry the response object under `response`; chat chunks are flat.
        Format::OpenAi => match value.get("response") {
            Some(response) if response.is_object() => openai(response, info),
            _ => openai(&value, info),
        },
        Format::Anthropic => {
            let kind = value.get("type").and_then(Value::as_str).or_else(|| std::str::from_utf8(event).ok());
            match kind {
                Some("message_start") => {
                    if let Some(message) = value.get("message") {
                        anthropic(message, info);
                    }
                }
                Some("message_delta") => {
                    if let Some(usage) = value.get("usage") {
                        anthropic_usage(usage, &mut info.usage);
                    }
                }
                _ => {}
            }
        }
        Format::Google => google(&value, info),
        Format::Bedrock => bedrock(&value, info),
    }
}

/// A cheap look at an event before paying for a JSON parse: the event name, when the provider
/// sends one, and once the model is known, whether the data mentions usage at all. Only events
/// that cannot matter are skipped; unknown names are parsed.
fn worth_parsing(format: Format, event: &[u8], data: &[u8], info: &ResponseInfo) -> bool {
    match format {
        Format::Anthropic => !matches!(
            event,
            b"ping" | b"content_block_start" | b"content_block_delta" | b"content_block_stop" | b"message_stop"
        ),
        Format::OpenAi if event.starts_with(b"response.") => matches!(
            event,
            b"response.created"
                | b"response.queued"
                | b"response.in_progress"
                | b"response.completed"
                | b"response.incomplete"
                | b"response.failed"
        ),
        // Chat chunks carry `"usage":null` until the last one (with stream_options.include_usage).
        Format::OpenAi => info.model.is_none() || has_object(data, b"\"usage\""),
        Format::Google => info.model.is_none() || has_object(data, b"\"usageMetadata\""),
        Format::Bedrock => true,
    }
}

/// Whether `key` (quoted) occurs in `data` followed by `:` and an object, e.g. `"usage": {`.
/// A byte scan for the closing quote's neighbours, no allocation.
fn has_object(data: &[u8], key: &[u8]) -> bool {
    let mut from = 0;
    while let Some(at) = find(&data[from..], key) {
        let rest = &data[from + at + key.len()..];
        let mut after = rest.iter().skip_while(|b| b.is_ascii_whitespace());
        if after.next() == Some(&b':') && after.find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            return true;
        }
        from += at + 1;
    }
    false
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut i = 0;
    while let Some(p) = haystack[i..].iter().position(|&b| b == first) {
        let at = i + p;
        if haystack[at + 1..].starts_with(rest) {
            return Some(at);
        }
        i = at + 1;
    }
    None
}

/// A complete buffered body.
fn apply_body(format: Format, value: &Value, info: &mut ResponseInfo) {
    match format {
        Format::OpenAi => openai(value, info),
        Format::Anthropic => anthropic(value, info),
        Format::Google => google(value, info),
        Format::Bedrock => bedrock(value, info),
    }
}

fn uint(value: &Value, key: &str) -> Option<u64> {
    value.get(key)?.as_u64()
}

fn set_model(info: &mut ResponseInfo, model: Option<&Value>) {
    if let Some(model) = model.and_then(Value::as_str).filter(|m| !m.is_empty()) {
        if info.model.as_deref() != Some(model) {
            info.model = Some(model.to_owned());
        }
    }
}

/// A chat completion (or chunk), or a Responses API response object: `model` and `usage`, the
/// latter in either API's naming. Azure's first stream chunk has `"model": ""`, which is skipped.
fn openai(value: &Value, info: &mut ResponseInfo) {
    set_model(info, value.get("model"));
    let Some(usage) = value.get("usage").filter(|u| u.is_object()) else {
        return;
    };
    let cached = |details: &str| usage.get(details).and_then(|d| uint(d, "cached_tokens"));
    info.usage = Usage {
        input_tokens: uint(usage, "prompt_tokens").or_else(|| uint(usage, "input_tokens")),
        output_tokens: uint(usage, "completion_tokens").or_else(|| uint(usage, "output_tokens")),
        cache_read_tokens: cached("prompt_tokens_details").or_else(|| cached("input_tokens_details")),
        cache_creation_tokens: None,
    };
}

/// A message (the JSON body, or `message_start`'s `message`).
fn anthropic(message: &Value, info: &mut ResponseInfo) {
    set_model(info, message.get("model"));
    if let Some(usage) = message.get("usage") {
        anthropic_usage(usage, &mut info.usage);
    }
}

/// Anthropic counts are cumulative: each one present replaces the one before.
fn anthropic_usage(usage: &Value, into: &mut Usage) {
    let fields = [
        ("input_tokens", &mut into.input_tokens),
        ("output_tokens", &mut into.output_tokens),
        ("cache_read_input_tokens", &mut into.cache_read_tokens),
        ("cache_creation_input_tokens", &mut into.cache_creation_tokens),
    ];
    for (key, slot) in fields {
        if let Some(n) = uint(usage, key) {
            *slot = Some(n);
        }
    }
}

/// A `GenerateContentResponse`, or the JSON array `streamGenerateContent` returns without
/// `alt=sse`: the last element with `usageMetadata` (resp. `modelVersion`) wins.
fn google(value: &Value, info: &mut ResponseInfo) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| google_response(item, info)),
        _ => google_response(value, info),
    }
}

fn google_response(value: &Value, info: &mut ResponseInfo) {
    set_model(info, value.get("modelVersion"));
    let Some(usage) = value.get("usageMetadata").filter(|u| u.is_object()) else {
        return;
    };
    let candidates = uint(usage, "candidatesTokenCount");
    let thoughts = uint(usage, "thoughtsTokenCount");
    let output = match (candidates, thoughts) {
        (None, None) => None,
        (c, t) => Some(c.unwrap_or(0).saturating_add(t.unwrap_or(0))),
    };
    info.usage = Usage {
        input_tokens: uint(usage, "promptTokenCount"),
        output_tokens: output,
        cache_read_tokens: uint(usage, "cachedContentTokenCount"),
        cache_creation_tokens: None,
    };
}

/// A Converse response: `usage` in camelCase, no model (it is in the request path).
fn bedrock(value: &Value, info: &mut ResponseInfo) {
    let Some(usage) = value.get("usage").filter(|u| u.is_object()) else {
        return;
    };
    info.usage = Usage {
        input_tokens: uint(usage, "inputTokens"),
        output_tokens: uint(usage, "outputTokens"),
        cache_read_tokens: uint(usage, "cacheReadInputTokens"),
        cache_creation_tokens: uint(usage, "cacheWriteInputTokens"),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = "application/json";
    const SSE: &str = "text/event-stream; charset=utf-8";

    // ---- Fixtures: response shapes as the providers document them. Non-ASCII text is there so
    // ---- that split points land inside UTF-8 characters.

    /// OpenAI chat completion, with cached prompt tokens.
    const OPENAI_CHAT_JSON: &str = r#"{
  "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
  "object": "chat.completion",
  "created": 1741570283,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "The image shows a wooden boardwalk — café-au-lait grass 🌿.",
        "refusal": null,
        "annotations": []
      },
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 1117,
    "completion_tokens": 46,
    "total_tokens": 1163,
    "prompt_tokens_details": {
      "cached_tokens": 1024,
      "audio_tokens": 0
    },
    "completion_tokens_details": {
      "reasoning_tokens": 0,
      "audio_tokens": 0,
      "accepted_prediction_tokens": 0,
      "rejected_prediction_tokens": 0
    }
  },
  "service_tier": "default",
  "system_fingerprint": "fp_fc9f1d7035"
}"#;

    /// OpenAI chat completions stream with `stream_options.include_usage`: usage in a last chunk
    /// with `choices: []`, then `[DONE]`.
    const OPENAI_CHAT_SSE: &str = r#"data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{"content":"Grüß dich 👋"},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_44709d6fcb","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

data: [DONE]

"#;

    /// The same stream without `include_usage`: the model, no usage.
    const OPENAI_CHAT_SSE_NO_USAGE: &str = r#"data: {"id":"chatcmpl-124","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-124","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}

data: [DONE]

"#;

    /// Azure OpenAI stream: a first chunk with `"model": ""` and prompt filter results.
    const AZURE_CHAT_SSE: &str = r#"data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}]}

data: {"choices":[{"content_filter_results":{},"delta":{"content":"","refusal":null,"role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":1733858345,"id":"chatcmpl-AdFJpXSumTG4Pk9CuGnt8HB7MA8hr","model":"gpt-4o-2024-08-06","object":"chat.completion.chunk","system_fingerprint":"fp_04751d0b65","usage":null}

data: {"choices":[{"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}},"delta":{"content":"Bonjour"},"finish_reason":null,"index":0,"logprobs":null}],"created":1733858345,"id":"chatcmpl-AdFJpXSumTG4Pk9CuGnt8HB7MA8hr","model":"gpt-4o-2024-08-06","object":"chat.completion.chunk","system_fingerprint":"fp_04751d0b65","usage":null}

data: {"choices":[],"created":1733858345,"id":"chatcmpl-AdFJpXSumTG4Pk9CuGnt8HB7MA8hr","model":"gpt-4o-2024-08-06","object":"chat.completion.chunk","system_fingerprint":"fp_04751d0b65","usage":{"completion_tokens":8,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0},"prompt_tokens":12,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":0},"total_tokens":20}}

data: [DONE]

"#;

    /// OpenAI Responses API response object.
    const OPENAI_RESPONSES_JSON: &str = r#"{
  "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
  "object": "response",
  "created_at": 1741476542,
  "status": "completed",
  "error": null,
  "incomplete_details": null,
  "instructions": null,
  "max_output_tokens": null,
  "model": "gpt-4.1-2025-04-14",
  "output": [
    {
      "type": "message",
      "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b",
      "status": "completed",
      "role": "assistant",
      "content": [
        {
          "type": "output_text",
          "text": "In a peaceful grove beneath a silver moon, a unicorn named Lumina… ✨",
          "annotations": []
        }
      ]
    }
  ],
  "parallel_tool_calls": true,
  "previous_response_id": null,
  "reasoning": {"effort": null, "summary": null},
  "store": true,
  "temperature": 1.0,
  "text": {"format": {"type": "text"}},
  "tool_choice": "auto",
  "tools": [],
  "top_p": 1.0,
  "truncation": "disabled",
  "usage": {
    "input_tokens": 2036,
    "input_tokens_details": {"cached_tokens": 1920},
    "output_tokens": 87,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 2123
  },
  "user": null,
  "metadata": {}
}"#;

    /// OpenAI Responses API stream: named events; usage only in `response.completed`.
    const OPENAI_RESPONSES_SSE: &str = r#"event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":null,"user":null,"metadata":{}}}

event: response.in_progress
data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":null,"user":null,"metadata":{}}}

event: response.output_item.added
data: {"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message","status":"in_progress","role":"assistant","content":[]}}

event: response.content_part.added
data: {"type":"response.content_part.added","sequence_number":3,"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"part":{"type":"output_text","text":"","annotations":[]}}

event: response.output_text.delta
data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"delta":"Hi there 🙂"}

event: response.output_text.done
data: {"type":"response.output_text.done","sequence_number":5,"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"text":"Hi there 🙂"}

event: response.content_part.done
data: {"type":"response.content_part.done","sequence_number":6,"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"part":{"type":"output_text","text":"Hi there 🙂","annotations":[]}}

event: response.output_item.done
data: {"type":"response.output_item.done","sequence_number":7,"output_index":0,"item":{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there 🙂","annotations":[]}]}}

event: response.completed
data: {"type":"response.completed","sequence_number":8,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"completed","error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there 🙂","annotations":[]}]}],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48},"user":null,"metadata":{}}}

"#;

    /// A Responses API stream cut short by `max_output_tokens`: it ends in `response.incomplete`.
    const OPENAI_RESPONSES_SSE_INCOMPLETE: &str = r#"event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","model":"o4-mini-2025-04-16","output":[],"usage":null}}

event: response.output_text.delta
data: {"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":1,"content_index":0,"delta":"Once"}

event: response.incomplete
data: {"type":"response.incomplete","sequence_number":2,"response":{"id":"resp_1","object":"response","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"model":"o4-mini-2025-04-16","output":[],"usage":{"input_tokens":1500,"input_tokens_details":{"cached_tokens":1024},"output_tokens":64,"output_tokens_details":{"reasoning_tokens":60},"total_tokens":1564}}}

"#;

    /// Anthropic message with prompt caching.
    const ANTHROPIC_JSON: &str = r#"{
  "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
  "type": "message",
  "role": "assistant",
  "model": "claude-sonnet-4-5-20250929",
  "content": [{"type": "text", "text": "Bonjour ! Ça va ? 🙂"}],
  "stop_reason": "end_turn",
  "stop_sequence": null,
  "usage": {
    "input_tokens": 21,
    "cache_creation_input_tokens": 188,
    "cache_read_input_tokens": 1862,
    "cache_creation": {"ephemeral_5m_input_tokens": 188, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 393,
    "service_tier": "standard"
  }
}"#;

    /// Anthropic message stream: model and input/cache usage in `message_start`, the final output
    /// count in `message_delta`.
    const ANTHROPIC_SSE: &str = r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":312,"cache_read_input_tokens":2048,"cache_creation":{"ephemeral_5m_input_tokens":312,"ephemeral_1h_input_tokens":0},"output_tokens":2,"service_tier":"standard"}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Voilà — "}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"c'est fait ✅"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"#;

    /// Gemini `generateContent` with context caching and thinking.
    const GOOGLE_JSON: &str = r#"{
  "candidates": [
    {
      "content": {
        "parts": [{"text": "AI learns patterns from data — «comme ça» 🤖."}],
        "role": "model"
      },
      "finishReason": "STOP",
      "index": 0
    }
  ],
  "usageMetadata": {
    "promptTokenCount": 2153,
    "candidatesTokenCount": 12,
    "totalTokenCount": 3192,
    "cachedContentTokenCount": 2048,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 2153}],
    "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 2048}],
    "thoughtsTokenCount": 1027
  },
  "modelVersion": "gemini-2.5-flash",
  "responseId": "mAitaLmkHPPlz7IPvtfUqQ4"
}"#;

    /// Gemini `streamGenerateContent?alt=sse` (CRLF line endings, as Google sends them).
    const GOOGLE_SSE_LF: &str = r#"data: {"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 10,"totalTokenCount": 10,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 10}]},"modelVersion": "gemini-2.0-flash","responseId": "x2mtaNyvNsqBz7IPxJ2U8Qo"}

data: {"candidates": [{"content": {"parts": [{"text": " sky is blue — ☀"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 10,"totalTokenCount": 10,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 10}]},"modelVersion": "gemini-2.0-flash","responseId": "x2mtaNyvNsqBz7IPxJ2U8Qo"}

data: {"candidates": [{"content": {"parts": [{"text": "."}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 10,"candidatesTokenCount": 7,"totalTokenCount": 17,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 10}],"candidatesTokensDetails": [{"modality": "TEXT","tokenCount": 7}]},"modelVersion": "gemini-2.0-flash","responseId": "x2mtaNyvNsqBz7IPxJ2U8Qo"}

"#;

    /// Gemini `streamGenerateContent` without `alt=sse`: one JSON array, `application/json`.
    const GOOGLE_JSON_ARRAY: &str = "[{\n  \"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Ünïcödé\"}],\"role\": \"model\"},\"index\": 0}],\n  \"usageMetadata\": {\"promptTokenCount\": 6,\"totalTokenCount\": 6},\n  \"modelVersion\": \"gemini-2.5-pro\"\n}\n,\r\n{\n  \"candidates\": [{\"content\": {\"parts\": [{\"text\": \" done\"}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\n  \"usageMetadata\": {\"promptTokenCount\": 6,\"candidatesTokenCount\": 20,\"totalTokenCount\": 566,\"thoughtsTokenCount\": 540},\n  \"modelVersion\": \"gemini-2.5-pro\"\n}\n,\r\n{\n  \"candidates\": [{\"content\": {\"parts\": [{\"text\": \"\"}],\"role\": \"model\"},\"index\": 0}]\n}\n]";

    /// Bedrock Converse response with prompt caching.
    const BEDROCK_JSON: &str = r#"{"metrics":{"latencyMs":1213},"output":{"message":{"content":[{"text":"Bonjour à tous 👋"}],"role":"assistant"}},"stopReason":"end_turn","usage":{"cacheReadInputTokens":1800,"cacheWriteInputTokens":212,"inputTokens":14,"outputTokens":33,"totalTokens":2059}}"#;

    /// Anthropic events whose data has no `type`: the `event:` name says what they are.
    const ANTHROPIC_SSE_UNTYPED: &str = "event: message_start\ndata: {\"message\":{\"model\":\"claude-3-5-haiku-20241022\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"usage\":{\"output_tokens\":7}}\n\n";

    /// SSE framing corners: a BOM, comments, ignored fields, one JSON value over several `data`
    /// lines (with and without the optional space, and a bare `data` line), `[DONE]`.
    const SSE_FRAMING: &str = concat!(
        "\u{feff}data:{\"model\":\n",
        ": keep-alive comment\n",
        "id: 42\n",
        "retry: 1000\n",
        "data:  \"gpt-4o\",\n",
        "data\n",
        "data: \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 5}}\n",
        "\n",
        ": another comment\n",
        "\n",
        "data: [DONE]\n",
        "\n",
    );

    fn google_sse() -> String {
        GOOGLE_SSE_LF.replace('\n', "\r\n")
    }

    /// Every fixture, with the format and content type it is read with.
    fn fixtures() -> Vec<(Format, &'static str, String)> {
        vec![
            (Format::OpenAi, JSON, OPENAI_CHAT_JSON.into()),
            (Format::OpenAi, SSE, OPENAI_CHAT_SSE.into()),
            (Format::OpenAi, SSE, OPENAI_CHAT_SSE_NO_USAGE.into()),
            (Format::OpenAi, SSE, AZURE_CHAT_SSE.into()),
            (Format::OpenAi, JSON, OPENAI_RESPONSES_JSON.into()),
            (Format::OpenAi, SSE, OPENAI_RESPONSES_SSE.into()),
            (Format::OpenAi, SSE, OPENAI_RESPONSES_SSE_INCOMPLETE.into()),
            (Format::Anthropic, JSON, ANTHROPIC_JSON.into()),
            (Format::Anthropic, SSE, ANTHROPIC_SSE.into()),
            (Format::Anthropic, SSE, ANTHROPIC_SSE.replace('\n', "\r\n")),
            (Format::Anthropic, SSE, ANTHROPIC_SSE.replace('\n', "\r")),
            (Format::Google, JSON, GOOGLE_JSON.into()),
            (Format::Google, SSE, google_sse()),
            (Format::Google, JSON, GOOGLE_JSON_ARRAY.into()),
            (Format::Bedrock, JSON, BEDROCK_JSON.into()),
            (Format::Anthropic, SSE, ANTHROPIC_SSE_UNTYPED.into()),
            (Format::Anthropic, SSE, ANTHROPIC_SSE_UNTYPED.replace('\n', "\r\n")),
            (Format::Anthropic, SSE, ANTHROPIC_SSE_UNTYPED.replace('\n', "\r")),
            (Format::OpenAi, SSE, SSE_FRAMING.into()),
            (Format::OpenAi, SSE, SSE_FRAMING.replace('\n', "\r\n")),
            (Format::OpenAi, SSE, SSE_FRAMING.replace('\n', "\r")),
        ]
    }

    fn parse_chunks<'a>(
        format: Format,
        content_type: &str,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> ResponseInfo {
        let mut parser = UsageParser::new(format, content_type);
        for chunk in chunks {
            parser.feed(chunk);
        }
        parser.finish()
    }

    fn parse(format: Format, content_type: &str, body: &str) -> ResponseInfo {
        parse_chunks(format, content_type, [body.as_bytes()])
    }

    fn usage(input: Option<u64>, output: Option<u64>, cache_read: Option<u64>, cache_creation: Option<u64>) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cache_read_tokens: cache_read,
            cache_creation_tokens: cache_creation,
        }
    }

    fn info(model: Option<&str>, usage: Usage) -> ResponseInfo {
        ResponseInfo { model: model.map(str::to_owned), usage }
    }

    // ---- Format selection.

    #[test]
    fn providers_map_to_their_formats_and_custom_has_none() {
        assert_eq!(format_for("openai"), Some(Format::OpenAi));
        assert_eq!(format_for("azure-openai"), Some(Format::OpenAi));
        assert_eq!(format_for("anthropic"), Some(Format::Anthropic));
        assert_eq!(format_for("google"), Some(Format::Google));
        assert_eq!(format_for("bedrock"), Some(Format::Bedrock));
        assert_eq!(format_for("custom"), None);
        assert_eq!(format_for("OpenAI"), None);
        for name in crate::provider::names() {
            assert_eq!(format_for(name).is_none(), name == "custom", "{name}");
        }
    }

    #[test]
    fn event_stream_content_type_is_matched_with_parameters_in_any_case() {
        for ct in
            ["text/event-stream", "Text/Event-Stream", "text/event-stream; charset=utf-8", " TEXT/EVENT-STREAM ;x=y"]
        {
            assert!(is_event_stream(ct), "{ct}");
        }
        for ct in ["", "application/json", "text/event-streams", "text/plain; text/event-stream"] {
            assert!(!is_event_stream(ct), "{ct}");
        }
        // The same SSE body read as JSON yields nothing; read as SSE, everything.
        assert_eq!(parse(Format::OpenAi, "application/json", OPENAI_CHAT_SSE), ResponseInfo::default());
        assert!(parse(Format::OpenAi, "TEXT/EVENT-STREAM", OPENAI_CHAT_SSE).usage.input_tokens.is_some());
    }

    // ---- OpenAI.

    #[test]
    fn openai_chat_json_reports_model_tokens_and_cached_tokens() {
        assert_eq!(
            parse(Format::OpenAi, JSON, OPENAI_CHAT_JSON),
            info(Some("gpt-4o-2024-08-06"), usage(Some(1117), Some(46), Some(1024), None))
        );
    }

    #[test]
    fn openai_chat_sse_takes_usage_from_the_final_empty_choices_chunk() {
        assert_eq!(
            parse(Format::OpenAi, SSE, OPENAI_CHAT_SSE),
            info(Some("gpt-4o-mini-2024-07-18"), usage(Some(9), Some(4), Some(0), None))
        );
    }

    #[test]
    fn openai_chat_sse_without_include_usage_reports_only_the_model() {
        assert_eq!(
            parse(Format::OpenAi, SSE, OPENAI_CHAT_SSE_NO_USAGE),
            info(Some("gpt-4o-mini-2024-07-18"), Usage::default())
        );
    }

    #[test]
    fn azure_chat_sse_skips_the_empty_model_of_the_prompt_filter_chunk() {
        assert_eq!(
            parse(Format::OpenAi, SSE, AZURE_CHAT_SSE),
            info(Some("gpt-4o-2024-08-06"), usage(Some(12), Some(8), Some(0), None))
        );
    }

    #[test]
    fn openai_responses_json_reports_input_output_and_cached_tokens() {
        assert_eq!(
            parse(Format::OpenAi, JSON, OPENAI_RESPONSES_JSON),
            info(Some("gpt-4.1-2025-04-14"), usage(Some(2036), Some(87), Some(1920), None))
        );
    }

    #[test]
    fn openai_responses_sse_takes_usage_from_response_completed() {
        assert_eq!(
            parse(Format::OpenAi, SSE, OPENAI_RESPONSES_SSE),
            info(Some("gpt-4.1-2025-04-14"), usage(Some(37), Some(11), Some(0), None))
        );
    }

    #[test]
    fn openai_responses_sse_takes_usage_from_response_incomplete_and_failed() {
        assert_eq!(
            parse(Format::OpenAi, SSE, OPENAI_RESPONSES_SSE_INCOMPLETE),
            info(Some("o4-mini-2025-04-16"), usage(Some(1500), Some(64), Some(1024), None))
        );
        let failed = "event: response.failed\ndata: {\"type\":\"response.failed\",\"sequence_number\":3,\"response\":{\"id\":\"resp_2\",\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"x\"},\"model\":\"gpt-4.1\",\"usage\":{\"input_tokens\":5,\"output_tokens\":0}}}\n\n";
        assert_eq!(parse(Format::OpenAi, SSE, failed), info(Some("gpt-4.1"), usage(Some(5), Some(0), None, None)));
    }

    #[test]
    fn openai_responses_sse_without_event_lines_still_reads_response_completed() {
        let stripped: String =
            OPENAI_RESPONSES_SSE.lines().filter(|l| !l.starts_with("event:")).map(|l| format!("{l}\n")).collect();
        assert_eq!(parse(Format::OpenAi, SSE, &stripped), parse(Format::OpenAi, SSE, OPENAI_RESPONSES_SSE));
    }

    // ---- Anthropic.

    #[test]
    fn anthropic_json_reports_model_tokens_and_both_cache_counts() {
        assert_eq!(
            parse(Format::Anthropic, JSON, ANTHROPIC_JSON),
            info(Some("claude-sonnet-4-5-20250929"), usage(Some(21), Some(393), Some(1862), Some(188)))
        );
    }

    #[test]
    fn anthropic_sse_combines_message_start_with_the_message_delta_output_count() {
        assert_eq!(
            parse(Format::Anthropic, SSE, ANTHROPIC_SSE),
            info(Some("claude-sonnet-4-5-20250929"), usage(Some(472), Some(89), Some(2048), Some(312)))
        );
    }

    #[test]
    fn anthropic_message_delta_counts_are_cumulative_so_the_last_wins_including_input_and_cache() {
        let body = concat!(
            "event: message_start\n",
            r#"data: {"type":"message_start","message":{"model":"claude-opus-4-1-20250805","usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
            "\n\nevent: message_delta\n",
            r#"data: {"type":"message_delta","delta":{"stop_reason":"pause_turn"},"usage":{"output_tokens":30}}"#,
            "\n\nevent: message_delta\n",
            r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":4210,"cache_creation_input_tokens":null,"cache_read_input_tokens":900,"output_tokens":75,"server_tool_use":{"web_search_requests":1}}}"#,
            "\n\n",
        );
        assert_eq!(
            parse(Format::Anthropic, SSE, body),
            info(Some("claude-opus-4-1-20250805"), usage(Some(4210), Some(75), Some(900), Some(0)))
        );
    }

    #[test]
    fn anthropic_event_name_is_used_when_the_data_has_no_type() {
        assert_eq!(
            parse(Format::Anthropic, SSE, ANTHROPIC_SSE_UNTYPED),
            info(Some("claude-3-5-haiku-20241022"), usage(Some(3), Some(7), None, None))
        );
    }

    #[test]
    fn finish_mid_stream_reports_what_the_events_so_far_said() {
        let cut = ANTHROPIC_SSE.find("event: content_block_start").unwrap();
        let mut parser = UsageParser::new(Format::Anthropic, SSE);
        parser.feed(&ANTHROPIC_SSE.as_bytes()[..cut]);
        assert_eq!(
            parser.finish(),
            info(Some("claude-sonnet-4-5-20250929"), usage(Some(472), Some(2), Some(2048), Some(312)))
        );
        parser.feed(&ANTHROPIC_SSE.as_bytes()[cut..]);
        assert_eq!(parser.finish(), parse(Format::Anthropic, SSE, ANTHROPIC_SSE));

        // A JSON body reports nothing until it is complete, then everything.
        let mut parser = UsageParser::new(Format::Anthropic, JSON);
        parser.feed(&ANTHROPIC_JSON.as_bytes()[..100]);
        assert_eq!(parser.finish(), ResponseInfo::default());
        parser.feed(&ANTHROPIC_JSON.as_bytes()[100..]);
        assert_eq!(parser.finish(), parse(Format::Anthropic, JSON, ANTHROPIC_JSON));
        assert_eq!(parser.finish(), parse(Format::Anthropic, JSON, ANTHROPIC_JSON));
    }

    // ---- Google.

    #[test]
    fn google_json_adds_thoughts_to_output_and_reports_cached_content() {
        assert_eq!(
            parse(Format::Google, JSON, GOOGLE_JSON),
            info(Some("gemini-2.5-flash"), usage(Some(2153), Some(12 + 1027), Some(2048), None))
        );
    }

    #[test]
    fn google_sse_takes_the_last_usage_metadata() {
        assert_eq!(
            parse(Format::Google, SSE, &google_sse()),
            info(Some("gemini-2.0-flash"), usage(Some(10), Some(7), None, None))
        );
    }

    #[test]
    fn google_stream_as_a_json_array_takes_the_last_element_with_usage_metadata() {
        assert_eq!(
            parse(Format::Google, JSON, GOOGLE_JSON_ARRAY),
            info(Some("gemini-2.5-pro"), usage(Some(6), Some(20 + 540), None, None))
        );
    }

    #[test]
    fn google_output_is_thoughts_alone_when_candidates_are_not_counted() {
        let body = r#"{"usageMetadata":{"promptTokenCount":4,"totalTokenCount":1004,"thoughtsTokenCount":1000},"modelVersion":"gemini-2.5-pro"}"#;
        assert_eq!(
            parse(Format::Google, JSON, body),
            info(Some("gemini-2.5-pro"), usage(Some(4), Some(1000), None, None))
        );
    }

    // ---- Bedrock.

    #[test]
    fn bedrock_converse_json_reports_tokens_and_cache_write_as_creation_without_model() {
        assert_eq!(
            parse(Format::Bedrock, JSON, BEDROCK_JSON),
            info(None, usage(Some(14), Some(33), Some(1800), Some(212)))
        );
    }

    #[test]
    fn bedrock_is_read_as_json_even_when_labelled_event_stream() {
        assert_eq!(parse(Format::Bedrock, SSE, BEDROCK_JSON), parse(Format::Bedrock, JSON, BEDROCK_JSON));
    }

    // ---- Chunking.

    #[test]
    fn every_body_gives_the_same_result_whatever_the_chunk_boundaries() {
        for (format, content_type, body) in fixtures() {
            let body = body.as_bytes();
            let whole = parse_chunks(format, content_type, [body]);
            assert_ne!(whole, ResponseInfo::default(), "{format:?} fixture parses to something");
            for split in 0..=body.len() {
                let (a, b) = body.split_at(split);
                assert_eq!(parse_chunks(format, content_type, [a, b]), whole, "{format:?} split at {split}");
            }
            assert_eq!(parse_chunks(format, content_type, body.chunks(1)), whole, "{format:?} byte by byte");
            for size in [2, 3, 7, 64] {
                assert_eq!(parse_chunks(format, content_type, body.chunks(size)), whole, "{format:?} chunks of {size}");
            }
            // Empty chunks and mid-stream `finish` calls change nothing.
            let mut parser = UsageParser::new(format, content_type);
            for chunk in body.chunks(5) {
                parser.feed(b"");
                parser.feed(chunk);
                let _ = parser.finish();
            }
            assert_eq!(parser.finish(), whole, "{format:?} with finish between chunks");
        }
    }

    // ---- SSE framing.

    #[test]
    fn sse_line_endings_crlf_cr_and_lf_are_equivalent() {
        let lf = parse(Format::Anthropic, SSE, ANTHROPIC_SSE);
        assert_eq!(parse(Format::Anthropic, SSE, &ANTHROPIC_SSE.replace('\n', "\r\n")), lf);
        assert_eq!(parse(Format::Anthropic, SSE, &ANTHROPIC_SSE.replace('\n', "\r")), lf);
        assert_eq!(parse(Format::Google, SSE, &google_sse()), parse(Format::Google, SSE, GOOGLE_SSE_LF));
        // With the event name and multi-line data depending on the framing, a CRLF read as two
        // line ends would lose them.
        for body in [ANTHROPIC_SSE_UNTYPED, SSE_FRAMING] {
            let format = if body == SSE_FRAMING { Format::OpenAi } else { Format::Anthropic };
            let lf = parse(format, SSE, body);
            assert_ne!(lf, ResponseInfo::default());
            assert_eq!(parse(format, SSE, &body.replace('\n', "\r\n")), lf);
            assert_eq!(parse(format, SSE, &body.replace('\n', "\r")), lf);
        }
        // Mixed endings, a CRLF split across chunks included.
        let mixed = "data: {\"model\":\"m\"}\r\n\rdata: {\"model\":\"m\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r";
        let mixed = format!("{mixed}\n\n");
        assert_eq!(parse(Format::OpenAi, SSE, &mixed), info(Some("m"), usage(Some(1), Some(2), None, None)));
    }

    #[test]
    fn sse_data_lines_join_with_newline_and_comments_ids_and_one_space_are_handled() {
        let body = SSE_FRAMING;
        assert_eq!(parse(Format::OpenAi, SSE, body), info(Some("gpt-4o"), usage(Some(3), Some(5), None, None)));
    }

    #[test]
    fn sse_event_without_its_terminating_blank_line_is_not_dispatched() {
        let body = "data: {\"model\":\"gpt-4o\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n";
        assert_eq!(parse(Format::OpenAi, SSE, body), ResponseInfo::default());
    }

    #[test]
    fn oversized_sse_event_is_skipped_and_the_next_event_still_counts() {
        // One huge line, then many lines: both overflow; a usage chunk follows each.
        let usage_event =
            "data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":9}}\n\n";
        let huge_line = format!("data: {{\"model\":\"evil\",\"pad\":\"{}\"}}\n\n", "x".repeat(MAX_EVENT_BYTES));
        let many_lines = format!(
            "event: message\n{}\n",
            "data: {\"model\":\"evil\",\"usage\":{\"prompt_tokens\":1}}\n".repeat(MAX_EVENT_BYTES / 40)
        );
        for oversized in [huge_line, many_lines] {
            let body = format!("{oversized}{usage_event}");
            let mut parser = UsageParser::new(Format::OpenAi, SSE);
            for chunk in body.as_bytes().chunks(64 * 1024 + 3) {
                parser.feed(chunk);
                assert!(parser.buffered_len() <= MAX_EVENT_BYTES);
                assert!(parser.buffered_capacity() <= MAX_EVENT_BYTES + SSE_KEEP_CAPACITY);
            }
            assert_eq!(parser.finish(), info(Some("gpt-4o"), usage(Some(7), Some(9), None, None)));
        }
    }

    #[test]
    fn sse_event_just_under_the_cap_is_read() {
        let head = "{\"model\":\"gpt-4o\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2},\"pad\":\"";
        let tail = "\"}";
        // The data buffer holds the value plus its line feed.
        let pad = "y".repeat(MAX_EVENT_BYTES - 1 - head.len() - tail.len());
        let body = format!("data: {head}{pad}{tail}\n\n");
        assert_eq!(parse(Format::OpenAi, SSE, &body), info(Some("gpt-4o"), usage(Some(1), Some(2), None, None)));
        let over = format!("data: {head}{pad}y{tail}\n\n");
        assert_eq!(parse(Format::OpenAi, SSE, &over), ResponseInfo::default());
    }

    // ---- JSON bounds.

    #[test]
    fn json_over_the_cap_stays_bounded_and_reports_nothing() {
        let body = format!(
            "{{\"model\":\"gpt-4o\",\"pad\":\"{}\",\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2}}}}",
            "z".repeat(MAX_JSON_BYTES)
        );
        let mut parser = UsageParser::new(Format::OpenAi, JSON);
        for chunk in body.as_bytes().chunks(100 * 1024 + 1) {
            parser.feed(chunk);
            assert!(parser.buffered_len() <= MAX_JSON_BYTES);
            assert!(parser.buffered_capacity() <= MAX_JSON_BYTES);
            let _ = parser.finish();
        }
        assert_eq!(parser.buffered_len(), 0, "the buffer is released once over the cap");
        assert_eq!(parser.finish(), ResponseInfo::default());
    }

    #[test]
    fn json_exactly_at_the_cap_is_read() {
        let head = "{\"model\":\"gpt-4o\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2},\"pad\":\"";
        let tail = "\"}";
        let body = format!("{head}{}{tail}", "w".repeat(MAX_JSON_BYTES - head.len() - tail.len()));
        assert_eq!(body.len(), MAX_JSON_BYTES);
        let mut parser = UsageParser::new(Format::OpenAi, JSON);
        for chunk in body.as_bytes().chunks(64 * 1024) {
            parser.feed(chunk);
        }
        assert!(parser.buffered_capacity() <= MAX_JSON_BYTES);
        assert_eq!(parser.finish(), info(Some("gpt-4o"), usage(Some(1), Some(2), None, None)));
    }

    // ---- Garbage.

    /// Deterministic pseudo-random bytes.
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (seed >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn garbage_yields_nothing_and_never_panics() {
        let mut bodies: Vec<Vec<u8>> = vec![
            Vec::new(),
            noise(64 * 1024, 1),
            noise(4096, 2).into_iter().map(|b| if b % 7 == 0 { b'\n' } else { b }).collect(),
            b"\xff\xfe\x00data: \xc3\x28\n\n".to_vec(),
            "[".repeat(100_000).into_bytes(),
            format!("data: {}\n\n", "{\"a\":".repeat(10_000)).into_bytes(),
            b"\r\r\r\n\n\n::::\n\n".to_vec(),
            b"data: {\"model\":\"gpt-4o\",\"usage\":{\"prompt_tokens\":1\n\n".to_vec(),
            b"null".to_vec(),
            b"\"usage\"".to_vec(),
            b"[1, \"two\", null, {}]".to_vec(),
            b"data: null\n\ndata: 17\n\ndata: []\n\n".to_vec(),
            br#"{"model":5,"modelVersion":[],"usage":"lots","usageMetadata":7}"#.to_vec(),
            br#"{"usage":{"prompt_tokens":-1,"completion_tokens":1.5,"input_tokens":"3","prompt_tokens_details":4,"inputTokens":null,"cache_read_input_tokens":1e99}}"#.to_vec(),
            br#"{"usageMetadata":{"promptTokenCount":-4,"candidatesTokenCount":"x","thoughtsTokenCount":false}}"#.to_vec(),
            b"data: {\"type\":\"message_start\",\"message\":null}\n\ndata: {\"type\":\"message_delta\",\"usage\":[1,2]}\n\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":\"no\"}}\n\n".to_vec(),
            b"event: message_delta\ndata: {\"type\":5,\"usage\":{\"output_tokens\":-2}}\n\n".to_vec(),
        ];
        let sse_variants: Vec<Vec<u8>> =
            bodies.iter().filter(|b| !b.starts_with(b"data")).map(|b| [b"data: ", &b[..], b"\n\n"].concat()).collect();
        bodies.extend(sse_variants);
        for format in [Format::OpenAi, Format::Anthropic, Format::Google, Format::Bedrock] {
            for content_type in [JSON, SSE] {
                for body in &bodies {
                    let whole = parse_chunks(format, content_type, [&body[..]]);
                    assert_eq!(
                        whole,
                        ResponseInfo::default(),
                        "{format:?} {content_type} {:?}",
                        String::from_utf8_lossy(&body[..body.len().min(80)])
                    );
                    assert_eq!(parse_chunks(format, content_type, body.chunks(3)), whole);
                }
            }
        }
    }

    #[test]
    fn wrongly_typed_fields_are_none_while_their_neighbours_still_count() {
        let body =
            r#"{"model":"gpt-4o","usage":{"prompt_tokens":"12","completion_tokens":34,"prompt_tokens_details":null}}"#;
        assert_eq!(parse(Format::OpenAi, JSON, body), info(Some("gpt-4o"), usage(None, Some(34), None, None)));
    }

    // ---- Request bodies.

    #[test]
    fn request_model_reads_the_model_field_of_a_json_object() {
        assert_eq!(
            request_model(
                r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Grüß dich 👋"}],"stream":true}"#.as_bytes()
            ),
            Some("gpt-4o".into())
        );
        assert_eq!(
            request_model(b" \n{\"max_tokens\":1024,\"messages\":[],\"model\":\"claude-sonnet-4-5\"}"),
            Some("claude-sonnet-4-5".into())
        );
        assert_eq!(request_model(br#"{"model":"gpt\u002d4o"}"#), Some("gpt-4o".into()));
        let big = format!("{{\"messages\":[{{\"content\":\"{}\"}}],\"model\":\"o3\"}}", "a".repeat(1 << 20));
        assert_eq!(request_model(big.as_bytes()), Some("o3".into()));
    }

    #[test]
    fn request_model_is_none_for_absent_mistyped_or_non_json_bodies() {
        for body in [
            &b""[..],
            b"   ",
            b"{}",
            b"{\"messages\":[]}",
            b"{\"model\":\"\"}",
            b"{\"model\":null}",
            b"{\"model\":42}",
            b"{\"model\":{\"name\":\"gpt-4o\"}}",
            b"[\"gpt-4o\"]",
            b"\"gpt-4o\"",
            b"{\"model\":\"gpt-4o\"",
            b"{\"model\":\"gpt-4o\"} trailing",
            b"{\"model\":\"a\",\"model\":\"b\"}",
            b"\xff\xfe{\"model\":\"x\"}",
            b"{\"model\":\"\xc3\x28\"}",
            b"model=gpt-4o&stream=true",
        ] {
            assert_eq!(request_model(body), None, "{:?}", String::from_utf8_lossy(body));
        }
        assert_eq!(request_model("[".repeat(100_000).as_bytes()), None);
        assert_eq!(request_model(&noise(10_000, 3)), None);
    }

    #[test]
    fn usage_object_prefilter() {
        assert!(!super::has_object(br#"{"choices":[],"usage":null}"#, br#""usage""#));
        assert!(super::has_object(br#"{"usage" : {"prompt_tokens":1}}"#, br#""usage""#));
        assert!(super::has_object(br#"{"x":"usage","usage":{"a":1}}"#, br#""usage""#));
        assert!(!super::has_object(br#"{"text":""usage" is a word"}"#, br#""usage""#));
        assert!(!super::has_object(br#"{"usage""#, br#""usage""#));
    }
}
