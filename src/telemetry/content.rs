//! The content attributes trace viewers show: the prompt and the completion as text, read from
//! the captured (already scrubbed, capped) bodies when the span ends. Streamed responses are
//! reassembled from their events. Only with body capture on: capture is the opt-in the GenAI
//! semantic conventions ask content recording to be.
//!
//! - OpenInference (Arize Phoenix): `input.value`, `input.mime_type`, `output.value`,
//!   `output.mime_type`.
//! - GenAI semantic conventions: `gen_ai.input.messages`, `gen_ai.output.messages` (JSON text:
//!   `[{"role": …, "parts": [{"type": "text", "content": …}]}]`).

use serde_json::{json, Value};

use super::otlp::{self, span as field};
use crate::provider::usage::{parse_picked, Format};

/// What viewers show as the prompt (`request`) or the completion, from a captured body already
/// scrubbed of `secrets` as bytes: OpenInference's `input.value` / `output.value` and the GenAI
/// conventions' messages. What is decoded from JSON is scrubbed again: a secret an upstream wrote
/// with JSON escapes (`\/`, `\u002d`) is no secret to the byte scrubber, and whole once decoded.
/// `sse`: the response is a stream of server-sent events.
pub(super) fn attributes(
    buf: &mut Vec<u8>,
    format: Option<Format>,
    sse: bool,
    request: bool,
    body: &[u8],
    secrets: &[&[u8]],
) {
    let mut attr = |key: &str, value: otlp::Value<'_>| otlp::attribute(buf, field::ATTRIBUTES, &[key], value);
    // Each attribute stays near the captured body's size: bytes that are not UTF-8 would triple
    // as replacement characters, and the messages list is JSON around the texts.
    let lossy = String::from_utf8_lossy(body);
    let cut = (0..=body.len().min(lossy.len())).rev().find(|&i| lossy.is_char_boundary(i)).unwrap_or(0);
    let raw = &lossy[..cut];
    if request {
        attr("input.value", otlp::Value::Str(raw));
        attr("input.mime_type", otlp::Value::Str(mime(body)));
        if let Some(m) = format.and_then(|f| input_messages(f, body, 2 * body.len() + 1024)) {
            attr("gen_ai.input.messages", otlp::Value::Str(&scrubbed(m, secrets)));
        }
        return;
    }
    match format.and_then(|f| output_text(f, sse, body)).map(|t| scrubbed(t, secrets)) {
        Some(text) => {
            attr("output.value", otlp::Value::Str(&text));
            attr("output.mime_type", otlp::Value::Str("text/plain"));
            attr("gen_ai.output.messages", otlp::Value::Str(&output_messages(&text)));
        }
        None if is_text(body) => {
            attr("output.value", otlp::Value::Str(raw));
            attr("output.mime_type", otlp::Value::Str(mime(body)));
        }
        None => {}
    }
}

/// `text` with every secret in it replaced (as [`crate::scrub::scrub`] replaces them in bytes).
fn scrubbed(text: String, secrets: &[&[u8]]) -> String {
    if !secrets.iter().any(|s| crate::scrub::contains(text.as_bytes(), s)) {
        return text;
    }
    let mut bytes = text.into_bytes();
    crate::scrub::scrub(&mut bytes, secrets, false);
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The members of an answer or event the completion's text is read from (the rest is skipped
/// unbuilt: ids, usage, logprobs, safety ratings).
const OUTPUT_KEYS: &[&str] = &["choices", "output", "outputs", "content", "candidates", "type", "delta"];
/// The members of a request the messages are read from (tools, schemas and settings skipped).
const INPUT_KEYS: &[&str] = &["system", "systemInstruction", "system_instruction", "contents", "messages", "input"];

/// The completion's text: from a JSON body, or from the events of a stream. `None` when the body
/// holds no text this reader knows (a tool call only, another API, a body cut by the capture
/// limit before any text).
pub fn output_text(format: Format, sse: bool, body: &[u8]) -> Option<String> {
    let mut text = String::new();
    if sse {
        crate::provider::usage::for_each_event(body, |event, data| {
            let Some(v) = parse_picked(data, OUTPUT_KEYS, &[]) else { return };
            delta_text(format, std::str::from_utf8(event).unwrap_or(""), &v, &mut text);
        });
    } else if format == Format::Bedrock && bedrock_stream_text(body, &mut text) {
        // A Bedrock stream, read frame by frame.
    } else {
        let v = parse_picked(body, OUTPUT_KEYS, &[])?;
        body_text(format, &v, &mut text);
    }
    (!text.is_empty()).then_some(text)
}

/// The text of a Bedrock stream (binary frames): `converse-stream`'s deltas, or the model's own
/// streamed events (`invoke-with-response-stream`; Anthropic's). `false`: no event stream.
fn bedrock_stream_text(body: &[u8], text: &mut String) -> bool {
    crate::provider::usage::for_each_aws_frame(body, |kind, payload| {
        let Some(v) = parse_picked(payload, OUTPUT_KEYS, &[]) else { return };
        match kind {
            "contentBlockDelta" => push(text, &v["delta"]["text"]),
            _ => delta_text(Format::Anthropic, "", &v, text),
        }
    })
}

fn push(out: &mut String, v: &Value) {
    if let Some(s) = v.as_str() {
        out.push_str(s);
    }
}

/// The text one streamed event adds.
fn delta_text(format: Format, event: &str, v: &Value, out: &mut String) {
    match format {
        Format::OpenAi if event == "response.output_text.delta" || v["type"] == "response.output_text.delta" => {
            push(out, &v["delta"])
        }
        Format::OpenAi => push(out, &v["choices"][0]["delta"]["content"]),
        Format::Anthropic if v["type"] == "content_block_delta" => push(out, &v["delta"]["text"]),
        Format::Anthropic => {}
        Format::Google => gemini_parts(v, out),
        Format::Bedrock => body_text(format, v, out),
    }
}

/// The text of a whole JSON response.
fn body_text(format: Format, v: &Value, out: &mut String) {
    match format {
        Format::OpenAi => {
            push(out, &v["choices"][0]["message"]["content"]);
            for item in v["output"].as_array().into_iter().flatten() {
                for c in item["content"].as_array().into_iter().flatten() {
                    push(out, &c["text"]);
                }
            }
        }
        Format::Anthropic => {
            for c in v["content"].as_array().into_iter().flatten() {
                push(out, &c["text"]);
            }
        }
        Format::Google => match v.as_array() {
            // streamGenerateContent without alt=sse: a JSON array of chunks.
            Some(chunks) => chunks.iter().for_each(|c| gemini_parts(c, out)),
            None => gemini_parts(v, out),
        },
        Format::Bedrock => {
            for c in v["output"]["message"]["content"].as_array().into_iter().flatten() {
                push(out, &c["text"]);
            }
        }
    }
}

/// Gemini's text: a `GenerateContentResponse`'s first candidate, an interaction's `outputs`, or
/// the `delta` of an Interactions API stream event (`step.delta`, `content.delta`).
fn gemini_parts(v: &Value, out: &mut String) {
    for p in v["candidates"][0]["content"]["parts"].as_array().into_iter().flatten() {
        push(out, &p["text"]);
    }
    for o in v["outputs"].as_array().into_iter().flatten().filter(|o| o["type"] == "text") {
        push(out, &o["text"]);
    }
    if v["delta"]["type"] == "text" {
        push(out, &v["delta"]["text"]);
    }
}

/// Whether a captured body is text (UTF-8, maybe cut inside its last character by the capture
/// limit): a binary body no reader here knows (an event stream) is shown by its base64 body event
/// alone, not as replacement characters.
pub fn is_text(body: &[u8]) -> bool {
    std::str::from_utf8(body).map_or_else(|e| e.error_len().is_none(), |_| true)
}

/// The `*.mime_type` of a body shown as it is.
pub fn mime(body: &[u8]) -> &'static str {
    if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
        "application/json"
    } else {
        "text/plain"
    }
}

/// `gen_ai.input.messages`: the request's messages (and system prompt) as the convention's
/// role-and-parts list, text parts only, at most `cap` bytes (the messages that fit, in order:
/// an agent's thousands of empty messages would otherwise grow nine-fold). `None` when the body
/// is not one this reader knows.
pub fn input_messages(format: Format, body: &[u8], cap: usize) -> Option<String> {
    let v = parse_picked(body, INPUT_KEYS, &[])?;
    let mut out = Listed { text: String::from("["), cap, full: false };
    let text_parts = |content: &Value| -> Vec<Value> {
        match content {
            Value::String(s) => vec![json!({"type": "text", "content": s})],
            Value::Array(items) => items
                .iter()
                .filter_map(|i| i["text"].as_str().or_else(|| i.as_str()))
                .map(|t| json!({"type": "text", "content": t}))
                .collect(),
            _ => Vec::new(),
        }
    };
    // Anthropic's and Gemini's system prompt live beside the messages.
    for system in [&v["system"], &v["systemInstruction"]["parts"], &v["system_instruction"]] {
        let parts = text_parts(system);
        if !parts.is_empty() {
            out.push(json!({"role": "system", "parts": parts}));
        }
    }
    // Gemini's Interactions API has `input` (text, content blocks or turns) where
    // generateContent has `contents`.
    let messages = match format {
        Format::Google if v["contents"].is_array() => &v["contents"],
        _ if v["messages"].is_array() => &v["messages"],
        _ => &v["input"],
    };
    match messages {
        Value::String(s) => out.push(json!({"role": "user", "parts": [{"type": "text", "content": s}]})),
        Value::Array(items) => {
            for m in items {
                if out.full {
                    break;
                }
                let role = m["role"].as_str().unwrap_or("user");
                let role = if role == "model" { "assistant" } else { role };
                let parts = match format {
                    Format::Google if m["parts"].is_array() => text_parts(&m["parts"]),
                    // A content block of its own (Interactions `input: [{"type": "text", …}]`).
                    _ if m["text"].is_string() => text_parts(&Value::Array(vec![m.clone()])),
                    _ => text_parts(&m["content"]),
                };
                out.push(json!({"role": role, "parts": parts}));
            }
        }
        _ => {}
    }
    (out.text.len() > 1).then(|| out.text + "]")
}

/// A JSON array written one element at a time, up to a size.
struct Listed {
    text: String,
    cap: usize,
    full: bool,
}

impl Listed {
    /// Appends `v` when it fits (with the closing bracket) and nothing was left out before it.
    fn push(&mut self, v: Value) {
        let mark = self.text.len();
        if self.full {
            return;
        }
        if mark > 1 {
            self.text.push(',');
        }
        self.text.push_str(&v.to_string());
        if self.text.len() + 1 > self.cap {
            self.text.truncate(mark);
            self.full = true;
        }
    }
}

/// `gen_ai.output.messages` for the completion `text`.
pub fn output_messages(text: &str) -> String {
    // Written out rather than built as a `Value` and serialized (a map per level); the text is
    // escaped by serde_json. Same bytes as `json!(…).to_string()` (members in sorted order).
    let mut out = String::with_capacity(text.len() + 72);
    out.push_str(r#"[{"parts":[{"content":"#);
    out.push_str(&serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into()));
    out.push_str(r#","type":"text"}],"role":"assistant"}]"#);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_completions_are_reassembled_for_each_provider() {
        let openai = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(output_text(Format::OpenAi, true, openai.as_bytes()).as_deref(), Some("Hello"));
        let anthropic = "event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi \"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"there\"}}\n\n";
        assert_eq!(output_text(Format::Anthropic, true, anthropic.as_bytes()).as_deref(), Some("Hi there"));
        let gemini = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"A\"}]}}]}\r\n\r\ndata: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"B\"}]}}]}\n\n";
        assert_eq!(output_text(Format::Google, true, gemini.as_bytes()).as_deref(), Some("AB"));
        let responses =
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"ok\"}\n\n";
        assert_eq!(output_text(Format::OpenAi, true, responses.as_bytes()).as_deref(), Some("ok"));
        // Cut inside a character by the capture limit: the text before it.
        let mut cut = openai.as_bytes()[..70].to_vec();
        cut.extend_from_slice(&[0xe2, 0x82]);
        assert!(output_text(Format::OpenAi, true, &cut).is_none_or(|t| t.is_char_boundary(t.len())));
    }

    /// Gemini's Interactions API (the one Google recommends since June 2026): the viewer showed no
    /// prompt and no completion for it.
    #[test]
    fn gemini_interactions_show_their_prompt_and_completion() {
        let json = br#"{"id":"v1_x","model":"gemini-2.5-pro","outputs":[{"type":"thought","summary":"..."},{"type":"text","text":"Paris."}]}"#;
        assert_eq!(output_text(Format::Google, false, json).as_deref(), Some("Paris."));
        let sse = "event: interaction.created\ndata: {\"interaction\":{\"id\":\"v1_x\"},\"event_type\":\"interaction.created\"}\n\nevent: step.delta\ndata: {\"event_type\":\"step.delta\",\"index\":0,\"delta\":{\"type\":\"text\",\"text\":\"Par\"}}\n\nevent: content.delta\ndata: {\"event_type\":\"content.delta\",\"index\":0,\"delta\":{\"type\":\"text\",\"text\":\"is.\"}}\n\n";
        assert_eq!(output_text(Format::Google, true, sse.as_bytes()).as_deref(), Some("Paris."));
        let messages = |body: &str| input_messages(Format::Google, body.as_bytes(), 4096).unwrap_or_default();
        let text = messages(r#"{"model":"m","system_instruction":"Be brief.","input":"Capital of France?"}"#);
        assert!(
            text.contains(r#""content":"Be brief.""#) && text.contains(r#""content":"Capital of France?""#),
            "{text}"
        );
        let blocks = messages(r#"{"input":[{"type":"text","text":"Capital of France?"}]}"#);
        assert!(blocks.contains(r#""content":"Capital of France?""#), "{blocks}");
        let turns = messages(
            r#"{"input":[{"role":"user","content":[{"type":"text","text":"Hi"}]},{"role":"model","content":"Hello"}]}"#,
        );
        assert!(turns.contains(r#""content":"Hi""#) && turns.contains(r#""role":"assistant""#), "{turns}");
    }

    #[test]
    fn json_completions_and_request_messages_read_as_text() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"Paris."}}]}"#;
        assert_eq!(output_text(Format::OpenAi, false, body).as_deref(), Some("Paris."));
        let body = br#"{"content":[{"type":"text","text":"Bonjour"}]}"#;
        assert_eq!(output_text(Format::Anthropic, false, body).as_deref(), Some("Bonjour"));
        let body = br#"{"output":{"message":{"content":[{"text":"hola"}]}}}"#;
        assert_eq!(output_text(Format::Bedrock, false, body).as_deref(), Some("hola"));
        assert_eq!(output_text(Format::OpenAi, false, b"not json"), None);
        // Bedrock streams are binary frames: their text, never the frames as characters.
        use crate::provider::usage::test_frame as frame;
        let delta = |t: &str| {
            frame("contentBlockDelta", json!({"contentBlockIndex": 0, "delta": {"text": t}}).to_string().as_bytes())
        };
        let converse = [
            frame("messageStart", br#"{"role":"assistant"}"#),
            delta("Bon"),
            delta("jour"),
            frame("metadata", br#"{"usage":{"inputTokens":3,"outputTokens":2}}"#),
        ]
        .concat();
        assert_eq!(output_text(Format::Bedrock, false, &converse).as_deref(), Some("Bonjour"));
        let chunk = |e: Value| {
            use base64::Engine as _;
            frame(
                "chunk",
                json!({"bytes": base64::engine::general_purpose::STANDARD.encode(e.to_string())})
                    .to_string()
                    .as_bytes(),
            )
        };
        let invoke = [
            chunk(json!({"type": "message_start", "message": {}})),
            chunk(json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hola"}})),
        ]
        .concat();
        assert_eq!(output_text(Format::Bedrock, false, &invoke).as_deref(), Some("Hola"));
        // Cut by the capture limit inside a frame: the whole frames before it.
        assert_eq!(output_text(Format::Bedrock, false, &converse[..converse.len() - 10]).as_deref(), Some("Bonjour"));
        assert!(!is_text(&converse) && is_text("é".as_bytes()) && is_text(&"é".as_bytes()[..1]));
    }

    /// The attack: an upstream echoes the key inside a JSON string with escapes (`\/`, `\u002d`),
    /// which the byte scrubber does not see; decoded into `output.value` it would be whole.
    #[test]
    fn a_secret_written_with_json_escapes_is_scrubbed_from_the_decoded_text() {
        let secret: &[u8] = b"sk-live/abc-123";
        let body = br#"{"choices":[{"message":{"content":"your key: sk-live\/abc-123."}}]}"#;
        assert!(!crate::scrub::contains(body, secret), "the escapes hide it from the byte scrubber");
        let mut buf = Vec::new();
        attributes(&mut buf, Some(Format::OpenAi), false, false, body, &[secret]);
        let encoded = String::from_utf8_lossy(&buf);
        assert!(!encoded.contains("sk-live/abc-123"), "{encoded}");
        assert!(encoded.contains("your key: [redacted]."), "{encoded}");
        let request = br#"{"messages":[{"role":"user","content":"sk-live\/abc-123"}]}"#;
        let mut buf = Vec::new();
        attributes(&mut buf, Some(Format::OpenAi), false, true, request, &[secret]);
        assert!(!String::from_utf8_lossy(&buf).contains("sk-live/abc-123"));

        let req = br#"{"model":"claude","system":"Be brief.","messages":[{"role":"user","content":[{"type":"text","text":"Capital of France?"}]}]}"#;
        let m: Value = serde_json::from_str(&input_messages(Format::Anthropic, req, 4096).unwrap()).unwrap();
        assert_eq!(m[0], json!({"role": "system", "parts": [{"type": "text", "content": "Be brief."}]}));
        assert_eq!(m[1], json!({"role": "user", "parts": [{"type": "text", "content": "Capital of France?"}]}));
        let req =
            br#"{"contents":[{"role":"user","parts":[{"text":"hi"}]},{"role":"model","parts":[{"text":"hello"}]}]}"#;
        let m: Value = serde_json::from_str(&input_messages(Format::Google, req, 4096).unwrap()).unwrap();
        assert_eq!(m[1]["role"], "assistant");
        for text in ["Paris.", "quote \" back\\slash\nnewline \u{1} é"] {
            let expected = json!([{"role": "assistant", "parts": [{"type": "text", "content": text}]}]).to_string();
            assert_eq!(output_messages(text), expected);
        }
        let m: Value = serde_json::from_str(&output_messages("Paris.")).unwrap();
        assert_eq!(m[0]["parts"][0]["content"], "Paris.");
    }
}
