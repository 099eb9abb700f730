//! Gemini bodies: `generateContent`, and `streamGenerateContent` as SSE or as one JSON array.

use crate::provider::usage::fixtures::{google_sse, info, parse, usage, GOOGLE_JSON, GOOGLE_JSON_ARRAY, JSON, SSE};
use crate::provider::usage::Format;

#[test]
fn google_json_adds_thoughts_to_output_and_reports_cached_content() {
    assert_eq!(
        parse(Format::Google, JSON, GOOGLE_JSON),
        info(Some("gemini-2.5-flash"), usage(Some(2153), Some(12 + 1027), Some(2048), None))
    );
}

#[test]
fn google_sse_takes_the_last_usage_metadata() {
    assert_eq!(
        parse(Format::Google, SSE, &google_sse()),
        info(Some("gemini-2.0-flash"), usage(Some(10), Some(7), None, None))
    );
}

#[test]
fn google_stream_as_a_json_array_takes_the_last_element_with_usage_metadata() {
    assert_eq!(
        parse(Format::Google, JSON, GOOGLE_JSON_ARRAY),
        info(Some("gemini-2.5-pro"), usage(Some(6), Some(20 + 540), None, None))
    );
}

/// The attack: a prompt that makes Gemini's own tools (URL context, Google Search) fetch pages,
/// billed as input under `toolUsePromptTokenCount` and not in `promptTokenCount`.
#[test]
fn google_input_counts_what_its_tools_fetched() {
    let body = r#"{"usageMetadata":{"promptTokenCount":40,"candidatesTokenCount":5,"toolUsePromptTokenCount":5000,"totalTokenCount":5045},"modelVersion":"gemini-2.5-flash"}"#;
    assert_eq!(
        parse(Format::Google, JSON, body),
        info(Some("gemini-2.5-flash"), usage(Some(5040), Some(5), None, None))
    );
    let alone = r#"{"usageMetadata":{"toolUsePromptTokenCount":7}}"#;
    assert_eq!(parse(Format::Google, JSON, alone).usage, usage(Some(7), None, None, None));
}

#[test]
fn google_output_is_thoughts_alone_when_candidates_are_not_counted() {
    let body = r#"{"usageMetadata":{"promptTokenCount":4,"totalTokenCount":1004,"thoughtsTokenCount":1000},"modelVersion":"gemini-2.5-pro"}"#;
    assert_eq!(parse(Format::Google, JSON, body), info(Some("gemini-2.5-pro"), usage(Some(4), Some(1000), None, None)));
}

/// The attack: Gemini's Interactions API (`/v1beta/interactions`), where `previous_interaction_id`
/// bills a whole stored conversation as input. Its usage (`total_*_tokens`) was not read: every
/// call was charged its reservation.
#[test]
fn gemini_interactions_report_their_usage_json_and_streamed() {
    let json = r#"{"id":"v1_x","object":"interaction","model":"gemini-2.5-pro","status":"completed","outputs":[{"type":"text","text":"hi"}],"usage":{"total_input_tokens":900000,"total_cached_tokens":1000,"total_output_tokens":40,"total_thought_tokens":700,"total_tool_use_tokens":60,"total_tokens":901800}}"#;
    let want = info(Some("gemini-2.5-pro"), usage(Some(900_060), Some(740), Some(1000), None));
    assert_eq!(parse(Format::Google, JSON, json), want);
    // Vertex AI's spelling.
    let camel = r#"{"model":"gemini-2.5-pro","usage":{"totalInputTokens":900000,"totalCachedTokens":1000,"totalOutputTokens":40,"totalThoughtTokens":700,"totalToolUseTokens":60}}"#;
    assert_eq!(parse(Format::Google, JSON, camel), want);
    let sse = concat!(
        "event: interaction.created\n",
        "data: {\"interaction\":{\"id\":\"v1_x\",\"status\":\"in_progress\",\"model\":\"gemini-2.5-pro\"},\"event_type\":\"interaction.created\"}\n\n",
        "event: step.delta\n",
        "data: {\"event_type\":\"step.delta\",\"index\":0,\"delta\":{\"type\":\"text\",\"text\":\"hi\"}}\n\n",
        "event: interaction.completed\n",
        "data: {\"event_type\":\"interaction.completed\",\"interaction\":{\"id\":\"v1_x\",\"status\":\"completed\",\"model\":\"gemini-2.5-pro\",\"usage\":{\"total_input_tokens\":900000,\"total_cached_tokens\":1000,\"total_output_tokens\":40,\"total_thought_tokens\":700,\"total_tool_use_tokens\":60}}}\n\n",
    );
    assert_eq!(parse(Format::Google, SSE, sse), want);
    // Read from its tail past the whole-body limit, as generateContent's usageMetadata is.
    let big = format!(r#"{{"outputs":[{{"type":"text","text":"{}"}}],{}"#, "x".repeat(5 << 20), &json[1..]);
    assert_eq!(parse(Format::Google, JSON, &big).usage, want.usage);
}
