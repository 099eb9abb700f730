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
