//! Bedrock Converse bodies.

use crate::provider::usage::fixtures::{info, parse, usage, BEDROCK_JSON, JSON, SSE};
use crate::provider::usage::Format;

#[test]
fn bedrock_converse_json_reports_tokens_and_cache_write_as_creation_without_model() {
    assert_eq!(
        parse(Format::Bedrock, JSON, BEDROCK_JSON),
        info(None, usage(Some(14), Some(33), Some(1800), Some(212)))
    );
}

#[test]
fn bedrock_is_read_as_json_even_when_labelled_event_stream() {
    assert_eq!(parse(Format::Bedrock, SSE, BEDROCK_JSON), parse(Format::Bedrock, JSON, BEDROCK_JSON));
}

/// InvokeModel answers in the model's own format: an Anthropic model's `usage` is snake_case.
/// Read as Converse only, every such call kept its reservation whatever it used.
#[test]
fn a_bedrock_invoke_answer_of_an_anthropic_model_is_settled_by_the_usage_it_reports() {
    let body = r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"hi"}],
        "usage":{"input_tokens":21,"output_tokens":4000,"cache_read_input_tokens":7,"cache_creation_input_tokens":3}}"#;
    assert_eq!(parse(Format::Bedrock, JSON, body), info(None, usage(Some(21), Some(4000), Some(7), Some(3))));
}
