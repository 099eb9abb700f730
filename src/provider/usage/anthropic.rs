//! Anthropic messages, JSON or SSE.

use super::{set_model, uint, ResponseInfo, Usage};
use serde_json::Value;

/// One server-sent event, known by its data's `type` or, failing that, its `event:` name: the
/// model and first counts come in `message_start`, later counts in `message_delta`; no other event
/// carries either.
pub(super) fn apply_event(event: &[u8], value: &Value, info: &mut ResponseInfo) {
    let kind = value.get("type").and_then(Value::as_str).or_else(|| std::str::from_utf8(event).ok());
    match kind {
        Some("message_start") => {
            if let Some(message) = value.get("message") {
                apply_body(message, info);
            }
        }
        Some("message_delta") => {
            if let Some(usage) = value.get("usage") {
                apply_usage(usage, &mut info.usage);
            }
        }
        _ => {}
    }
}

/// A message (the JSON body, or `message_start`'s `message`).
pub(super) fn apply_body(message: &Value, info: &mut ResponseInfo) {
    set_model(info, message.get("model"));
    if let Some(usage) = message.get("usage") {
        apply_usage(usage, &mut info.usage);
    }
}

/// Anthropic counts are cumulative: each one present replaces the one before.
fn apply_usage(usage: &Value, into: &mut Usage) {
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

#[cfg(test)]
#[path = "anthropic_tests.rs"]
mod tests;
