//! Model and token usage read out of provider response bodies, incrementally.
//!
//! Envoy hands ext_proc a response body chunk by chunk, split anywhere: inside a UTF-8 character,
//! an SSE line or a JSON value. [`UsageParser`] is fed those chunks as they pass and reports what the
//! provider said about the call: the model that answered and the tokens it counted.
//!
//! Two body shapes are read:
//! - a buffered JSON document (`application/json` and anything else that is not an event stream),
//!   kept whole up to [`MAX_JSON_BYTES`] and parsed once, when [`UsageParser::finish`] is called
//!   (past that, its last [`TAIL_BYTES`] are kept and its usage read from them);
//! - a server-sent event stream (`text/event-stream`), parsed line by line as it arrives, keeping at
//!   most one event's data ([`MAX_EVENT_BYTES`]).
//!
//! Memory is bounded either way, and malformed input of any kind yields `None` fields, never a panic.

use serde::Deserialize;
use std::fmt;

mod answer;
mod anthropic;
mod bedrock;
mod eventstream;
mod google;
mod openai;
mod pick;
mod sse;

pub use pick::parse_picked;

use answer::Parsed;
use sse::SseReader;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;

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

/// The response format of a request to `path` of a provider named in the registry. azure-openai
/// and openai share [`Format::OpenAi`], and so do the OpenAI-compatible endpoints the others
/// serve beside their own API (Gemini's `/v1beta/openai/…`, Vertex AI's `…/endpoints/…/chat/…`,
/// Bedrock's `/openai/v1/…`, Anthropic's `/v1/chat/completions`): read in their own format, their
/// usage went unread and every call was charged its reservation. A `custom` upstream (vLLM,
/// LiteLLM, Mistral, Groq, OpenRouter …) is read on the paths of the APIs it copies: Chat
/// Completions, Completions, Embeddings and Responses in OpenAI's format, Messages in
/// Anthropic's; its other paths (and any unknown provider name) are `None`: not read.
pub fn format_for(provider: &str, route: &crate::target::CanonicalPath<'_>) -> Option<Format> {
    if provider == "custom" {
        let on = |suffix: &str| route.starts_with('/') && route.ends_with(suffix);
        return if ["/chat/completions", "/completions", "/embeddings", "/responses"].iter().any(|s| on(s)) {
            Some(Format::OpenAi)
        } else if on("/messages") {
            Some(Format::Anthropic)
        } else {
            None
        };
    }
    let openai_compatible = match provider {
        // Vertex AI: `…/endpoints/openapi/…`, and a model deployed to an endpoint of its own
        // (`…/endpoints/ID/chat/completions`; its native calls are `…/endpoints/ID:predict`).
        "google" => route.contains("/openai/") || (route.contains("/endpoints/") && !route.contains(':')),
        "bedrock" => route.starts_with("/openai/"),
        "anthropic" => route.starts_with("/v1/chat/completions"),
        _ => false,
    };
    if openai_compatible {
        return Some(Format::OpenAi);
    }
    // Claude on Vertex AI (`…/publishers/anthropic/models/M:rawPredict`, `:streamRawPredict`)
    // answers in Anthropic's Messages format: read as Gemini, its usage went unread.
    if provider == "google" && route.contains("/publishers/anthropic/") {
        return Some(Format::Anthropic);
    }
    match provider {
        "openai" | "azure-openai" => Some(Format::OpenAi),
        "anthropic" => Some(Format::Anthropic),
        "google" => Some(Format::Google),
        "bedrock" => Some(Format::Bedrock),
        _ => None,
    }
}

/// Token counts a provider reported for one call. A field the provider did not report is `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    /// The counts so far are ones the stream reports again before it ends: Anthropic's
    /// `message_start` says 1 or 2 output tokens, and only `message_delta` (or Bedrock's
    /// invocation metrics) says what the call used. A stream that ends still provisional did not
    /// say what it used.
    pub provisional: bool,
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

/// Calls `on_event(event name, data)` for every complete event of a server-sent event stream
/// (the same reader [`UsageParser`] uses; the events a stream cut short did not finish are left out).
pub fn for_each_event(body: &[u8], mut on_event: impl FnMut(&[u8], &[u8])) {
    SseReader::new().feed(body, |event, data, truncated| {
        if !truncated {
            on_event(event, data)
        }
    });
}

/// Calls `on_frame(event type, payload)` for every whole frame of a captured Bedrock event stream
/// (`application/vnd.amazon.eventstream`; a `chunk`'s payload is the model's event it carries);
/// `false` when the body is no event stream.
pub fn for_each_aws_frame(body: &[u8], on_frame: impl FnMut(&str, &[u8])) -> bool {
    eventstream::for_each_frame(body, on_frame)
}

/// One Bedrock event-stream frame, as the AWS SDK writes it (tests).
#[cfg(test)]
pub fn test_frame(event: &str, payload: &[u8]) -> Vec<u8> {
    eventstream::tests::frame(event, payload)
}

/// Reads model and usage out of one response body, fed chunk by chunk.
pub struct UsageParser {
    format: Format,
    info: ResponseInfo,
    body: Body,
    /// Events of a stream read so far (SSE events, or AWS event stream frames): a model streams
    /// about a token or more per event, so this bounds from below what a stream cut off before
    /// its usage generated.
    events: u64,
}

enum Body {
    Json(JsonBody),
    Sse(SseReader),
    /// Bedrock's streams (AWS event stream frames).
    Aws(eventstream::EventStream),
}

impl UsageParser {
    /// `content_type` is the response's `content-type` header: `text/event-stream` (parameters
    /// allowed, any case) selects SSE, Bedrock's `application/vnd.amazon.eventstream` its binary
    /// frames, anything else a buffered JSON body.
    pub fn new(format: Format, content_type: &str) -> Self {
        let body = if format == Format::Bedrock && is_aws_event_stream(content_type) {
            Body::Aws(eventstream::EventStream::default())
        } else if format != Format::Bedrock && is_event_stream(content_type) {
            Body::Sse(SseReader::new())
        } else {
            Body::Json(JsonBody::default())
        };
        Self { format, info: ResponseInfo::default(), body, events: 0 }
    }

    /// Takes the next chunk of the body, as it came off the wire.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.body {
            Body::Json(json) => json.feed(chunk),
            Body::Sse(sse) => {
                let format = self.format;
                let info = &mut self.info;
                let events = &mut self.events;
                sse.feed(chunk, |event, data, truncated| {
                    *events += 1;
                    match truncated {
                        false => apply_event(format, event, data, info),
                        true => apply_tail(format, event, data, info),
                    }
                });
            }
            Body::Aws(frames) => self.events += frames.feed(chunk, &mut self.info),
        }
    }

    /// Takes the last chunk of the body. A JSON body that is all in this chunk (a short answer,
    /// in one message) is parsed where it lies instead of being copied first.
    pub fn feed_last(&mut self, chunk: &[u8]) {
        match &mut self.body {
            Body::Json(json) if !json.dirty && !json.closed && json.buf.is_empty() && chunk.len() <= MAX_JSON_BYTES => {
                self.info = read_whole(self.format, chunk);
                // Read for good: anything fed after the last chunk would be read without it.
                json.closed = true;
            }
            _ => self.feed(chunk),
        }
    }

    /// Everything learned so far. Meant for after the last chunk, but may be called mid-stream
    /// (and more than once): an event stream reports the events completed so far, a JSON body what
    /// parses of it (nothing until it is complete).
    pub fn finish(&mut self) -> ResponseInfo {
        self.read().clone()
    }

    /// The token counts of [`UsageParser::finish`], without copying the model's name, whether
    /// they are provisional ([`ResponseInfo::provisional`]), and the events read so far.
    pub fn usage(&mut self) -> (Usage, bool, u64) {
        let events = self.events;
        let info = self.read();
        (info.usage, info.provisional, events)
    }

    /// The model the response names so far, without copying the rest.
    pub fn model(&mut self) -> Option<&str> {
        self.read().model.as_deref()
    }

    fn read(&mut self) -> &ResponseInfo {
        if let Body::Json(json) = &mut self.body {
            if json.dirty {
                json.dirty = false;
                self.info = match json.overflowed {
                    true => usage_from_tail(self.format, &json.buf),
                    false => read_whole(self.format, &json.buf),
                };
            }
        }
        &self.info
    }

    /// Bytes held for parsing: the JSON body so far, or the current event's name and data.
    #[cfg(test)]
    fn buffered_len(&self) -> usize {
        match &self.body {
            Body::Json(json) => json.buf.len(),
            Body::Sse(sse) => sse.buffered_len(),
            Body::Aws(frames) => frames.buffered_len(),
        }
    }

    /// Memory reserved for those bytes.
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        match &self.body {
            Body::Json(json) => json.buf.capacity(),
            Body::Sse(sse) => sse.buffered_capacity(),
            Body::Aws(frames) => frames.buffered_capacity(),
        }
    }
}

impl fmt::Debug for UsageParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mode, buffered) = match &self.body {
            Body::Json(json) => ("json", json.buf.len()),
            Body::Sse(sse) => ("sse", sse.buffered_len()),
            Body::Aws(frames) => ("aws_event_stream", frames.buffered_len()),
        };
        f.debug_struct("UsageParser")
            .field("format", &self.format)
            .field("mode", &mode)
            .field("buffered", &buffered)
            .field("info", &self.info)
            .finish()
    }
}

/// Whether `content_type` is Bedrock's binary event stream.
pub fn is_aws_event_stream(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/vnd.amazon.eventstream")
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
    /// Nothing more is kept whole: the body outgrew [`MAX_JSON_BYTES`] (only its last
    /// [`TAIL_BYTES`] are, in `buf`), or it was read whole from its last chunk
    /// ([`UsageParser::feed_last`]).
    closed: bool,
    /// The body outgrew [`MAX_JSON_BYTES`]: `buf` holds its tail.
    overflowed: bool,
    /// Bytes arrived (or the buffer overflowed) since `finish` last parsed.
    dirty: bool,
}

/// What is kept of a JSON body past [`MAX_JSON_BYTES`]: its end, where every provider writes its
/// usage (after the content). An answer made large on purpose (logprobs of every token, many
/// choices) still reports what it used.
pub(super) const TAIL_BYTES: usize = 64 * 1024;

impl JsonBody {
    fn feed(&mut self, chunk: &[u8]) {
        if (self.closed && !self.overflowed) || chunk.is_empty() {
            return;
        }
        self.dirty = true;
        if !self.overflowed && push_bounded(&mut self.buf, chunk, MAX_JSON_BYTES) {
            return;
        }
        if !self.overflowed {
            (self.closed, self.overflowed) = (true, true);
            let from = self.buf.len().saturating_sub(TAIL_BYTES);
            self.buf.drain(..from);
            self.buf.shrink_to(2 * TAIL_BYTES);
        }
        let chunk = &chunk[chunk.len().saturating_sub(TAIL_BYTES)..];
        let drop = (self.buf.len() + chunk.len()).saturating_sub(TAIL_BYTES);
        self.buf.drain(..drop);
        self.buf.extend_from_slice(chunk);
    }
}

/// The usage of a JSON answer read from its tail: the last `"usage"` member (Gemini's
/// `"usageMetadata"`, or an interaction's `"usage"`) whose value is whole there. Outside strings a
/// member name's quotes are bare, so text the model wrote cannot pose as one.
fn usage_from_tail(format: Format, tail: &[u8]) -> ResponseInfo {
    if format == Format::Google {
        let info = usage_of_member(format, tail, b"\"usageMetadata\"");
        if info.usage != Usage::default() {
            return info;
        }
    }
    usage_of_member(format, tail, b"\"usage\"")
}

/// [`usage_from_tail`] for the member `key` (quoted).
fn usage_of_member(format: Format, tail: &[u8], key: &[u8]) -> ResponseInfo {
    fn skip_space(s: &[u8]) -> Option<&[u8]> {
        s.iter().position(|b| !b.is_ascii_whitespace()).map(|i| &s[i..])
    }
    let mut before = tail.len();
    // The last member of that name whose value is a whole object: a string value (`"usage"`
    // itself, an echoed `"metadata":{"usage":"…"}`) or an object cut short is passed over.
    let (value, end) = loop {
        let Some(at) = tail[..before].windows(key.len()).rposition(|w| w == key) else {
            return ResponseInfo::default();
        };
        before = at;
        let value = skip_space(&tail[at + key.len()..]).and_then(|r| r.strip_prefix(b":")).and_then(skip_space);
        let Some(value) = value.filter(|v| v.starts_with(b"{")) else { continue };
        let mut values = serde_json::Deserializer::from_slice(value).into_iter::<serde::de::IgnoredAny>();
        if let Some(Ok(_)) = values.next() {
            break (value, values.byte_offset());
        }
    };
    let mut whole = Vec::with_capacity(key.len() + end + 3);
    whole.push(b'{');
    whole.extend_from_slice(key);
    whole.push(b':');
    whole.extend_from_slice(&value[..end]);
    whole.push(b'}');
    read_whole(format, &whole)
}

// ---------------------------------------------------------------------------------------------
// What each provider reports: the dispatch to its module, and what they share.

/// One server-sent event's data (`[DONE]` and events that cannot carry model or usage are skipped
/// without parsing).
/// An event too large to keep whole (a Responses API `response.completed` carrying every
/// token's log probabilities, an image's base64): its usage, read from its end, where providers
/// write it, over what the events before said. Dropped whole, its usage went unread and the
/// call kept its reservation however much it used. Only an event that carries the final usage
/// is read so: the others can echo what the agent sent (`response.created` echoes its
/// `instructions` and `tools`, and `"usage":null`), and a usage-shaped object planted there would
/// be taken for the provider's count.
fn apply_tail(format: Format, event: &[u8], tail: &[u8], info: &mut ResponseInfo) {
    let final_usage = match event {
        // Chat Completions chunks and Gemini's are unnamed; their usage ends the chunk.
        b"" | b"message" => true,
        b"response.completed" | b"response.incomplete" | b"response.failed" => format == Format::OpenAi,
        b"message_delta" => format == Format::Anthropic,
        _ => false,
    };
    if !final_usage {
        return;
    }
    let found = usage_from_tail(format, tail);
    let (u, f) = (&mut info.usage, found.usage);
    u.input_tokens = f.input_tokens.or(u.input_tokens);
    u.output_tokens = f.output_tokens.or(u.output_tokens);
    u.cache_read_tokens = f.cache_read_tokens.or(u.cache_read_tokens);
    u.cache_creation_tokens = f.cache_creation_tokens.or(u.cache_creation_tokens);
    if info.model.is_none() {
        info.model = found.model;
    }
}

fn apply_event(format: Format, event: &[u8], data: &[u8], info: &mut ResponseInfo) {
    if data == b"[DONE]" || !worth_parsing(format, event, data, info) {
        return;
    }
    let Some(parsed) = answer::parse(data) else {
        return;
    };
    match (format, &parsed) {
        (Format::OpenAi, Parsed::One(a)) => openai::apply_event(a, info),
        (Format::Anthropic, Parsed::One(a)) => anthropic::apply_event(event, a, info),
        (Format::Google, _) => google::apply_body(&parsed, info),
        (Format::Bedrock, Parsed::One(a)) => bedrock::apply_body(a, info),
        // Only Gemini answers with an array of answers.
        (_, Parsed::Many(_)) => {}
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
        // An Interactions event carries `usage` (in its `interaction`); an OpenAI-compatible chunk too.
        Format::Google => {
            info.model.is_none() || has_object(data, b"\"usageMetadata\"") || has_object(data, b"\"usage\"")
        }
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

/// What a whole JSON body says (nothing when it is not JSON).
fn read_whole(format: Format, body: &[u8]) -> ResponseInfo {
    let mut info = ResponseInfo::default();
    if let Some(parsed) = answer::parse(body) {
        apply_body(format, &parsed, &mut info);
    }
    info
}

fn apply_body(format: Format, parsed: &Parsed<'_>, info: &mut ResponseInfo) {
    match (format, parsed) {
        (Format::OpenAi, Parsed::One(a)) => openai::apply_body(a, info),
        (Format::Anthropic, Parsed::One(a)) => anthropic::apply_body(a, info),
        (Format::Google, _) => google::apply_body(parsed, info),
        (Format::Bedrock, Parsed::One(a)) => bedrock::apply_body(a, info),
        (_, Parsed::Many(_)) => {}
    }
}

fn set_model(info: &mut ResponseInfo, model: Option<&str>) {
    if let Some(model) = model.filter(|m| !m.is_empty()) {
        if info.model.as_deref() != Some(model) {
            info.model = Some(model.to_owned());
        }
    }
}
