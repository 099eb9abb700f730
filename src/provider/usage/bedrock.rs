//! Amazon Bedrock Converse, JSON.

use super::{uint, ResponseInfo, Usage};
use serde_json::Value;

/// A Converse response: `usage` in camelCase, no model (it is in the request path).
pub(super) fn apply_body(value: &Value, info: &mut ResponseInfo) {
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
#[path = "bedrock_tests.rs"]
mod tests;
