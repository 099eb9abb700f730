//! OpenAI (and Azure OpenAI): chat completions and the Responses API, JSON or SSE.

use super::{set_model, uint, ResponseInfo, Usage};
use serde_json::Value;

/// One server-sent event. Responses API events carry the response object under `response`; chat
/// chunks are flat.
pub(super) fn apply_event(value: &Value, info: &mut ResponseInfo) {
    match value.get("response") {
        Some(response) if response.is_object() => apply_body(response, info),
        _ => apply_body(value, info),
    }
}

/// A chat completion (or chunk), or a Responses API response object: `model` and `usage`, the
/// latter in either API's naming. Azure's first stream chunk has `"model": ""`, which is skipped.
pub(super) fn apply_body(value: &Value, info: &mut ResponseInfo) {
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

#[cfg(test)]
#[path = "openai_tests.rs"]
mod tests;
