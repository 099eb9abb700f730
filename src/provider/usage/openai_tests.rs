//! OpenAI and Azure OpenAI bodies: chat completions and the Responses API, JSON and SSE.

use crate::provider::usage::fixtures::{
    info, parse, usage, AZURE_CHAT_SSE, JSON, OPENAI_CHAT_JSON, OPENAI_CHAT_SSE, OPENAI_CHAT_SSE_NO_USAGE,
    OPENAI_RESPONSES_JSON, OPENAI_RESPONSES_SSE, OPENAI_RESPONSES_SSE_INCOMPLETE, SSE,
};
use crate::provider::usage::{Format, Usage};

#[test]
fn openai_chat_json_reports_model_tokens_and_cached_tokens() {
    assert_eq!(
        parse(Format::OpenAi, JSON, OPENAI_CHAT_JSON),
        info(Some("gpt-4o-2024-08-06"), usage(Some(1117), Some(46), Some(1024), None))
    );
}

#[test]
fn openai_chat_sse_takes_usage_from_the_final_empty_choices_chunk() {
    assert_eq!(
        parse(Format::OpenAi, SSE, OPENAI_CHAT_SSE),
        info(Some("gpt-4o-mini-2024-07-18"), usage(Some(9), Some(4), Some(0), None))
    );
}

#[test]
fn openai_chat_sse_without_include_usage_reports_only_the_model() {
    assert_eq!(
        parse(Format::OpenAi, SSE, OPENAI_CHAT_SSE_NO_USAGE),
        info(Some("gpt-4o-mini-2024-07-18"), Usage::default())
    );
}

#[test]
fn azure_chat_sse_skips_the_empty_model_of_the_prompt_filter_chunk() {
    assert_eq!(
        parse(Format::OpenAi, SSE, AZURE_CHAT_SSE),
        info(Some("gpt-4o-2024-08-06"), usage(Some(12), Some(8), Some(0), None))
    );
}

#[test]
fn openai_responses_json_reports_input_output_and_cached_tokens() {
    assert_eq!(
        parse(Format::OpenAi, JSON, OPENAI_RESPONSES_JSON),
        info(Some("gpt-4.1-2025-04-14"), usage(Some(2036), Some(87), Some(1920), None))
    );
}

#[test]
fn openai_responses_sse_takes_usage_from_response_completed() {
    assert_eq!(
        parse(Format::OpenAi, SSE, OPENAI_RESPONSES_SSE),
        info(Some("gpt-4.1-2025-04-14"), usage(Some(37), Some(11), Some(0), None))
    );
}

#[test]
fn openai_responses_sse_takes_usage_from_response_incomplete_and_failed() {
    assert_eq!(
        parse(Format::OpenAi, SSE, OPENAI_RESPONSES_SSE_INCOMPLETE),
        info(Some("o4-mini-2025-04-16"), usage(Some(1500), Some(64), Some(1024), None))
    );
    let failed = "event: response.failed\ndata: {\"type\":\"response.failed\",\"sequence_number\":3,\"response\":{\"id\":\"resp_2\",\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"x\"},\"model\":\"gpt-4.1\",\"usage\":{\"input_tokens\":5,\"output_tokens\":0}}}\n\n";
    assert_eq!(parse(Format::OpenAi, SSE, failed), info(Some("gpt-4.1"), usage(Some(5), Some(0), None, None)));
}

#[test]
fn openai_responses_sse_without_event_lines_still_reads_response_completed() {
    let stripped: String =
        OPENAI_RESPONSES_SSE.lines().filter(|l| !l.starts_with("event:")).map(|l| format!("{l}\n")).collect();
    assert_eq!(parse(Format::OpenAi, SSE, &stripped), parse(Format::OpenAi, SSE, OPENAI_RESPONSES_SSE));
}
