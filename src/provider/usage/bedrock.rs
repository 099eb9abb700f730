//! Amazon Bedrock, JSON: Converse, and InvokeModel of Anthropic's models.

use super::answer::{Answer, Field};
use super::{ResponseInfo, Usage};

/// A Converse response (`usage` in camelCase), or an InvokeModel response of an Anthropic model
/// (the model's own body: `usage` in snake_case); no model (it is in the request path).
pub(super) fn apply_body(a: &Answer<'_>, info: &mut ResponseInfo) {
    let Some(usage) = &a.usage else {
        return;
    };
    if super::openai::is_chat_usage(usage) {
        info.usage = super::openai::usage_of_chat(usage);
        return;
    }
    let either = |camel, snake| usage.get(camel).or_else(|| usage.get(snake));
    info.usage = Usage {
        input_tokens: either(Field::InputTokensCamel, Field::InputTokens),
        output_tokens: either(Field::OutputTokensCamel, Field::OutputTokens),
        cache_read_tokens: either(Field::CacheReadInputTokensCamel, Field::CacheReadInputTokens),
        cache_creation_tokens: either(Field::CacheWriteInputTokensCamel, Field::CacheCreationInputTokens),
    };
}

#[cfg(test)]
#[path = "bedrock_tests.rs"]
mod tests;
