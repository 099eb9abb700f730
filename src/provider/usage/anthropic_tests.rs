//! Anthropic message bodies, JSON and SSE.

use crate::provider::usage::fixtures::{
    info, parse, usage, ANTHROPIC_JSON, ANTHROPIC_SSE, ANTHROPIC_SSE_UNTYPED, JSON, SSE,
};
use crate::provider::usage::Format;

#[test]
fn anthropic_json_reports_model_tokens_and_both_cache_counts() {
    assert_eq!(
        parse(Format::Anthropic, JSON, ANTHROPIC_JSON),
        info(Some("claude-sonnet-4-5-20250929"), usage(Some(21), Some(393), Some(1862), Some(188)))
    );
}

#[test]
fn anthropic_sse_combines_message_start_with_the_message_delta_output_count() {
    assert_eq!(
        parse(Format::Anthropic, SSE, ANTHROPIC_SSE),
        info(Some("claude-sonnet-4-5-20250929"), usage(Some(472), Some(89), Some(2048), Some(312)))
    );
}

#[test]
fn anthropic_message_delta_counts_are_cumulative_so_the_last_wins_including_input_and_cache() {
    let body = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"model":"claude-opus-4-1-20250805","usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
        "\n\nevent: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"pause_turn"},"usage":{"output_tokens":30}}"#,
        "\n\nevent: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":4210,"cache_creation_input_tokens":null,"cache_read_input_tokens":900,"output_tokens":75,"server_tool_use":{"web_search_requests":1}}}"#,
        "\n\n",
    );
    assert_eq!(
        parse(Format::Anthropic, SSE, body),
        info(Some("claude-opus-4-1-20250805"), usage(Some(4210), Some(75), Some(900), Some(0)))
    );
}

#[test]
fn anthropic_event_name_is_used_when_the_data_has_no_type() {
    assert_eq!(
        parse(Format::Anthropic, SSE, ANTHROPIC_SSE_UNTYPED),
        info(Some("claude-3-5-haiku-20241022"), usage(Some(3), Some(7), None, None))
    );
}

#[test]
fn counts_are_provisional_from_message_start_until_message_delta() {
    let start = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"model":"claude-x","usage":{"input_tokens":10,"output_tokens":1}}}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
        "\n\n",
    );
    let cut = parse(Format::Anthropic, SSE, start);
    assert!(cut.provisional, "{cut:?}");
    assert_eq!(cut.usage, usage(Some(10), Some(1), None, None));
    let delta = concat!(
        "event: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":12}}"#,
        "\n\n"
    );
    let whole = parse(Format::Anthropic, SSE, &format!("{start}{delta}"));
    assert!(!whole.provisional && whole.usage.output_tokens == Some(12), "{whole:?}");
    // A JSON message is final as it is.
    assert!(!parse(Format::Anthropic, JSON, ANTHROPIC_JSON).provisional);
}
