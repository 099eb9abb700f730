//! Amazon Bedrock Converse, JSON.

use super::answer::{Answer, Field};
use super::{ResponseInfo, Usage};

/// A Converse response: `usage` in camelCase, no model (it is in the request path).
pub(super) fn apply_body(a: &Answer<'_>, info: &mut ResponseInfo) {
    let Some(usage) = &a.usage else {
        return;
    };
    info.usage = Usage {
        input_tokens: usage.get(Field::InputTokensCamel),
        output_tokens: usage.get(Field::OutputTokensCamel),
        cache_read_tokens: usage.get(Field::CacheReadInputTokensCamel),
        cache_creation_tokens: usage.get(Field::CacheWriteInputTokensCamel),
    };
}

#[cfg(test)]
#[path = "bedrock_tests.rs"]
mod tests;
