//! Anthropic messages, JSON or SSE.

use super::answer::{Answer, Counts, Field};
use super::{set_model, ResponseInfo, Usage};

/// One server-sent event, known by its data's `type` or, failing that, its `event:` name: the
/// model and first counts come in `message_start`, later counts in `message_delta`; no other event
/// carries either.
pub(super) fn apply_event(event: &[u8], a: &Answer<'_>, info: &mut ResponseInfo) {
    let kind = a.kind.as_deref().or_else(|| std::str::from_utf8(event).ok());
    match kind {
        Some("message_start") => {
            if let Some(message) = &a.message {
                apply_body(message, info);
                info.provisional |= message.usage.is_some();
            }
        }
        Some("message_delta") => {
            if let Some(usage) = &a.usage {
                apply_usage(usage, &mut info.usage);
                info.provisional = false;
            }
        }
        _ => {}
    }
}

/// A message (the JSON body, or `message_start`'s `message`).
pub(super) fn apply_body(message: &Answer<'_>, info: &mut ResponseInfo) {
    set_model(info, message.model.as_deref());
    match &message.usage {
        Some(usage) if super::openai::is_chat_usage(usage) => info.usage = super::openai::usage_of_chat(usage),
        Some(usage) => apply_usage(usage, &mut info.usage),
        None => {}
    }
}

/// Anthropic counts are cumulative: each one present replaces the one before.
fn apply_usage(usage: &Counts, into: &mut Usage) {
    let fields = [
        (Field::InputTokens, &mut into.input_tokens),
        (Field::OutputTokens, &mut into.output_tokens),
        (Field::CacheReadInputTokens, &mut into.cache_read_tokens),
        (Field::CacheCreationInputTokens, &mut into.cache_creation_tokens),
    ];
    for (count, slot) in fields {
        if let Some(n) = usage.get(count) {
            *slot = Some(n);
        }
    }
}

#[cfg(test)]
#[path = "anthropic_tests.rs"]
mod tests;
