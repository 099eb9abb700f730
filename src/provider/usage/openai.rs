//! OpenAI (and Azure OpenAI): chat completions and the Responses API, JSON or SSE.

use super::answer::{Answer, Counts, Field};
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
    if let Some(usage) = &a.usage {
        info.usage = usage_of(usage);
    }
}

/// A usage object in either OpenAI API's naming.
pub(super) fn usage_of(usage: &Counts) -> Usage {
    let either = |chat: Field, responses: Field| usage.get(chat).or_else(|| usage.get(responses));
    Usage {
        input_tokens: either(Field::PromptTokens, Field::InputTokens),
        output_tokens: either(Field::CompletionTokens, Field::OutputTokens),
        cache_read_tokens: either(Field::PromptCached, Field::InputCached),
        cache_creation_tokens: None,
    }
}

/// [`usage_of`] for a reader whose format counts cached tokens apart from the input (Anthropic,
/// Bedrock): Chat Completions' `prompt_tokens` already holds them, so they are not given again.
pub(super) fn usage_of_chat(usage: &Counts) -> Usage {
    Usage { cache_read_tokens: None, ..usage_of(usage) }
}

/// Whether a usage object is in Chat Completions' naming (`prompt_tokens`, `completion_tokens`),
/// which no other provider's own API uses: an answer of an OpenAI-compatible endpoint, read as
/// such by whichever provider's reader it reached.
pub(super) fn is_chat_usage(usage: &Counts) -> bool {
    usage.get(Field::PromptTokens).is_some() || usage.get(Field::CompletionTokens).is_some()
}

#[cfg(test)]
#[path = "openai_tests.rs"]
mod tests;
