//! OpenAI (and Azure OpenAI): chat completions and the Responses API, JSON or SSE.

use super::answer::{Answer, Field};
use super::{set_model, ResponseInfo, Usage};

/// One server-sent event. Responses API events carry the response object under `response`; chat
/// chunks are flat.
pub(super) fn apply_event(a: &Answer<'_>, info: &mut ResponseInfo) {
    apply_body(a.response.as_deref().unwrap_or(a), info);
}

/// A chat completion (or chunk), or a Responses API response object: `model` and `usage`, the
/// latter in either API's naming. Azure's first stream chunk has `"model": ""`, which is skipped.
pub(super) fn apply_body(a: &Answer<'_>, info: &mut ResponseInfo) {
    set_model(info, a.model.as_deref());
    let Some(usage) = &a.usage else {
        return;
    };
    let either = |chat: Field, responses: Field| usage.get(chat).or_else(|| usage.get(responses));
    info.usage = Usage {
        input_tokens: either(Field::PromptTokens, Field::InputTokens),
        output_tokens: either(Field::CompletionTokens, Field::OutputTokens),
        cache_read_tokens: either(Field::PromptCached, Field::InputCached),
        cache_creation_tokens: None,
    };
}

#[cfg(test)]
#[path = "openai_tests.rs"]
mod tests;
