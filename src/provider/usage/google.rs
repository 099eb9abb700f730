//! Google Gemini `generateContent` / `streamGenerateContent` (JSON, JSON array, or `alt=sse`).

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
    set_model(info, a.model_version.as_deref());
    let Some(usage) = &a.usage_metadata else {
        return;
    };
    // Input is the prompt plus what Gemini's own tools (URL context, search) fetched into it;
    // output is the candidates plus the thoughts.
    let sum = |a: Field, b: Field| match (usage.get(a), usage.get(b)) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    };
    let output = sum(Field::CandidatesTokenCount, Field::ThoughtsTokenCount);
    info.usage = Usage {
        input_tokens: sum(Field::PromptTokenCount, Field::ToolUsePromptTokenCount),
        output_tokens: output,
        cache_read_tokens: usage.get(Field::CachedContentTokenCount),
        cache_creation_tokens: None,
    };
}

#[cfg(test)]
#[path = "google_tests.rs"]
mod tests;
