//! Google Gemini `generateContent` / `streamGenerateContent` (JSON, JSON array, or `alt=sse`).

use super::{set_model, uint, ResponseInfo, Usage};
use serde_json::Value;

/// A `GenerateContentResponse`, or the JSON array `streamGenerateContent` returns without
/// `alt=sse`: the last element with `usageMetadata` (resp. `modelVersion`) wins. Each event of an
/// `alt=sse` stream is one such response.
pub(super) fn apply_body(value: &Value, info: &mut ResponseInfo) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| apply_response(item, info)),
        _ => apply_response(value, info),
    }
}

fn apply_response(value: &Value, info: &mut ResponseInfo) {
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

#[cfg(test)]
#[path = "google_tests.rs"]
mod tests;
