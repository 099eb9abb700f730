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
