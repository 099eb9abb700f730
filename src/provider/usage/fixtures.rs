//! What the usage tests read: response shapes as the providers document them, kept as files under
//! `tests/data/usage/`, and the helpers that feed them to a parser. Non-ASCII text is there so that
//! split points land inside UTF-8 characters.

use super::{Format, ResponseInfo, Usage, UsageParser};

pub(super) const JSON: &str = "application/json";
pub(super) const SSE: &str = "text/event-stream; charset=utf-8";

/// OpenAI chat completion, with cached prompt tokens.
pub(super) const OPENAI_CHAT_JSON: &str = include_str!("../../../tests/data/usage/openai/chat.json");

/// OpenAI chat completions stream with `stream_options.include_usage`: usage in a last chunk
/// with `choices: []`, then `[DONE]`.
pub(super) const OPENAI_CHAT_SSE: &str = include_str!("../../../tests/data/usage/openai/chat.sse");

/// The same stream without `include_usage`: the model, no usage.
pub(super) const OPENAI_CHAT_SSE_NO_USAGE: &str = include_str!("../../../tests/data/usage/openai/chat_no_usage.sse");

/// Azure OpenAI stream: a first chunk with `"model": ""` and prompt filter results.
pub(super) const AZURE_CHAT_SSE: &str = include_str!("../../../tests/data/usage/openai/azure_chat.sse");

/// OpenAI Responses API response object.
pub(super) const OPENAI_RESPONSES_JSON: &str = include_str!("../../../tests/data/usage/openai/responses.json");

/// OpenAI Responses API stream: named events; usage only in `response.completed`.
pub(super) const OPENAI_RESPONSES_SSE: &str = include_str!("../../../tests/data/usage/openai/responses.sse");

/// A Responses API stream cut short by `max_output_tokens`: it ends in `response.incomplete`.
pub(super) const OPENAI_RESPONSES_SSE_INCOMPLETE: &str =
    include_str!("../../../tests/data/usage/openai/responses_incomplete.sse");

/// Anthropic message with prompt caching.
pub(super) const ANTHROPIC_JSON: &str = include_str!("../../../tests/data/usage/anthropic/message.json");

/// Anthropic message stream: model and input/cache usage in `message_start`, the final output
/// count in `message_delta`.
pub(super) const ANTHROPIC_SSE: &str = include_str!("../../../tests/data/usage/anthropic/message.sse");

/// Gemini `generateContent` with context caching and thinking.
pub(super) const GOOGLE_JSON: &str = include_str!("../../../tests/data/usage/google/generate_content.json");

/// Gemini `streamGenerateContent?alt=sse` (CRLF line endings, as Google sends them).
pub(super) const GOOGLE_SSE_LF: &str = include_str!("../../../tests/data/usage/google/stream_generate_content.sse");

/// Gemini `streamGenerateContent` without `alt=sse`: one JSON array, `application/json`.
pub(super) const GOOGLE_JSON_ARRAY: &str =
    include_str!("../../../tests/data/usage/google/stream_generate_content_array.json");

/// Bedrock Converse response with prompt caching.
pub(super) const BEDROCK_JSON: &str = include_str!("../../../tests/data/usage/bedrock/converse.json");

/// Anthropic events whose data has no `type`: the `event:` name says what they are.
pub(super) const ANTHROPIC_SSE_UNTYPED: &str = include_str!("../../../tests/data/usage/anthropic/message_untyped.sse");

/// SSE framing corners: a BOM, comments, ignored fields, one JSON value over several `data`
/// lines (with and without the optional space, and a bare `data` line), `[DONE]`.
pub(super) const SSE_FRAMING: &str = concat!(
    "\u{feff}data:{\"model\":\n",
    ": keep-alive comment\n",
    "id: 42\n",
    "retry: 1000\n",
    "data:  \"gpt-4o\",\n",
    "data\n",
    "data: \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 5}}\n",
    "\n",
    ": another comment\n",
    "\n",
    "data: [DONE]\n",
    "\n",
);

pub(super) fn google_sse() -> String {
    GOOGLE_SSE_LF.replace('\n', "\r\n")
}

/// Every fixture, with the format and content type it is read with.
pub(super) fn fixtures() -> Vec<(Format, &'static str, String)> {
    vec![
        (Format::OpenAi, JSON, OPENAI_CHAT_JSON.into()),
        (Format::OpenAi, SSE, OPENAI_CHAT_SSE.into()),
        (Format::OpenAi, SSE, OPENAI_CHAT_SSE_NO_USAGE.into()),
        (Format::OpenAi, SSE, AZURE_CHAT_SSE.into()),
        (Format::OpenAi, JSON, OPENAI_RESPONSES_JSON.into()),
        (Format::OpenAi, SSE, OPENAI_RESPONSES_SSE.into()),
        (Format::OpenAi, SSE, OPENAI_RESPONSES_SSE_INCOMPLETE.into()),
        (Format::Anthropic, JSON, ANTHROPIC_JSON.into()),
        (Format::Anthropic, SSE, ANTHROPIC_SSE.into()),
        (Format::Anthropic, SSE, ANTHROPIC_SSE.replace('\n', "\r\n")),
        (Format::Anthropic, SSE, ANTHROPIC_SSE.replace('\n', "\r")),
        (Format::Google, JSON, GOOGLE_JSON.into()),
        (Format::Google, SSE, google_sse()),
        (Format::Google, JSON, GOOGLE_JSON_ARRAY.into()),
        (Format::Bedrock, JSON, BEDROCK_JSON.into()),
        (Format::Anthropic, SSE, ANTHROPIC_SSE_UNTYPED.into()),
        (Format::Anthropic, SSE, ANTHROPIC_SSE_UNTYPED.replace('\n', "\r\n")),
        (Format::Anthropic, SSE, ANTHROPIC_SSE_UNTYPED.replace('\n', "\r")),
        (Format::OpenAi, SSE, SSE_FRAMING.into()),
        (Format::OpenAi, SSE, SSE_FRAMING.replace('\n', "\r\n")),
        (Format::OpenAi, SSE, SSE_FRAMING.replace('\n', "\r")),
    ]
}

pub(super) fn parse_chunks<'a>(
    format: Format,
    content_type: &str,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> ResponseInfo {
    let mut parser = UsageParser::new(format, content_type);
    for chunk in chunks {
        parser.feed(chunk);
    }
    parser.finish()
}

/// As [`parse_chunks`], the last chunk given as the last ([`UsageParser::feed_last`]).
pub(super) fn parse_chunks_ending(format: Format, content_type: &str, chunks: &[&[u8]]) -> ResponseInfo {
    let mut parser = UsageParser::new(format, content_type);
    let (last, before) = chunks.split_last().expect("a last chunk");
    for chunk in before {
        parser.feed(chunk);
    }
    parser.feed_last(last);
    parser.finish()
}

pub(super) fn parse(format: Format, content_type: &str, body: &str) -> ResponseInfo {
    parse_chunks(format, content_type, [body.as_bytes()])
}

pub(super) fn usage(
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cache_read_tokens: cache_read,
        cache_creation_tokens: cache_creation,
    }
}

pub(super) fn info(model: Option<&str>, usage: Usage) -> ResponseInfo {
    ResponseInfo { model: model.map(str::to_owned), usage, provisional: false }
}
