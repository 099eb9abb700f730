//! Google Gemini `generateContent` / `streamGenerateContent` (JSON, JSON array, or `alt=sse`),
//! and the Interactions API (`/v1beta/interactions`: an interaction, JSON or SSE events that
//! carry it under `interaction`).

use super::answer::{Answer, Field, Parsed};
use super::{set_model, ResponseInfo, Usage};

/// A `GenerateContentResponse`, or the JSON array `streamGenerateContent` returns without
/// `alt=sse`: the last element with `usageMetadata` (resp. `modelVersion`) wins. Each event of an
/// `alt=sse` stream is one such response.
pub(super) fn apply_body(parsed: &Parsed<'_>, info: &mut ResponseInfo) {
    match parsed {
        Parsed::Many(items) => items.iter().for_each(|item| apply_response(item, info)),
        Parsed::One(a) => apply_response(a, info),
    }
}

fn apply_response(a: &Answer<'_>, info: &mut ResponseInfo) {
    if let Some(interaction) = &a.interaction {
        return apply_response(interaction, info);
    }
    // An interaction names its model `model`; a GenerateContentResponse `modelVersion`.
    set_model(info, a.model_version.as_deref().or(a.model.as_deref()));
    // Input is the prompt plus what Gemini's own tools (URL context, search) fetched into it;
    // output is the candidates plus the thoughts.
    let (usage, [prompt, tools, candidates, thoughts, cached]) = match (&a.usage_metadata, &a.usage) {
        (Some(u), _) => (u, GENERATE_CONTENT),
        (None, Some(u)) if super::openai::is_chat_usage(u) => {
            info.usage = super::openai::usage_of(u);
            return;
        }
        (None, Some(u)) => (u, INTERACTIONS),
        (None, None) => return,
    };
    let sum = |a: Field, b: Field| match (usage.get(a), usage.get(b)) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    };
    info.usage = Usage {
        input_tokens: sum(prompt, tools),
        output_tokens: sum(candidates, thoughts),
        cache_read_tokens: usage.get(cached),
        cache_creation_tokens: None,
    };
}

/// The counts of a usage object, by API: prompt, tools' prompt, candidates, thoughts, cached.
const GENERATE_CONTENT: [Field; 5] = [
    Field::PromptTokenCount,
    Field::ToolUsePromptTokenCount,
    Field::CandidatesTokenCount,
    Field::ThoughtsTokenCount,
    Field::CachedContentTokenCount,
];
const INTERACTIONS: [Field; 5] = [
    Field::TotalInputTokens,
    Field::TotalToolUseTokens,
    Field::TotalOutputTokens,
    Field::TotalThoughtTokens,
    Field::TotalCachedTokens,
];

#[cfg(test)]
#[path = "google_tests.rs"]
mod tests;
