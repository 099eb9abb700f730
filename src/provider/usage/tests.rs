//! The machinery every provider shares: format selection, chunk boundaries, SSE framing, memory
//! bounds, malformed input, and request bodies. Each provider's own bodies are tested next to
//! its parser (`openai_tests.rs`, ...).

use super::fixtures::{
    fixtures, google_sse, info, parse, parse_chunks, parse_chunks_ending, usage, ANTHROPIC_JSON, ANTHROPIC_SSE,
    ANTHROPIC_SSE_UNTYPED, GOOGLE_SSE_LF, JSON, OPENAI_CHAT_SSE, SSE, SSE_FRAMING,
};
use super::*;

/// The format of a request to `path` as sent.
fn format_for(provider: &str, path: &str) -> Option<Format> {
    super::format_for(provider, &crate::target::CanonicalPath::of(path))
}

// ---- Format selection.

#[test]
fn providers_map_to_their_formats_and_custom_has_none() {
    let any = "/v1/x";
    assert_eq!(format_for("openai", any), Some(Format::OpenAi));
    assert_eq!(format_for("azure-openai", "/openai/v1/chat/completions"), Some(Format::OpenAi));
    assert_eq!(format_for("anthropic", "/v1/messages"), Some(Format::Anthropic));
    assert_eq!(format_for("google", "/v1beta/models/m:generateContent"), Some(Format::Google));
    assert_eq!(format_for("google", "/v1beta/interactions"), Some(Format::Google));
    let predict = "/v1/projects/p/locations/us-central1/endpoints/1234:predict";
    assert_eq!(format_for("google", predict), Some(Format::Google));
    assert_eq!(format_for("bedrock", "/model/m/converse"), Some(Format::Bedrock));
    assert_eq!(format_for("custom", any), None);
    assert_eq!(format_for("OpenAI", any), None);
    for name in crate::provider::names() {
        assert_eq!(format_for(name, any).is_none(), name == "custom", "{name}");
    }
}

/// The attack: Claude on Vertex AI (the `google` provider's `publishers/anthropic` models),
/// whose answers are Anthropic's Messages: read as Gemini's, their usage went unread and every
/// call kept its reservation (a few KB of PDF bytes that are thousands of tokens).
#[test]
fn claude_on_vertex_is_read_as_anthropic() {
    let base = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5";
    for method in [":rawPredict", ":streamRawPredict"] {
        assert_eq!(format_for("google", &format!("{base}{method}")), Some(Format::Anthropic), "{method}");
    }
    let gemini = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent";
    assert_eq!(format_for("google", gemini), Some(Format::Google));
    let answer = r#"{"id":"msg_1","type":"message","model":"claude-sonnet-4-5","usage":{"input_tokens":3000,"output_tokens":7}}"#;
    let format = format_for("google", &format!("{base}:rawPredict")).unwrap();
    assert_eq!(parse(format, JSON, answer).usage, usage(Some(3000), Some(7), None, None));
}

/// The attack: on a budgeted `custom` route (an OpenAI-compatible vendor the registry does not
/// name: Mistral, Groq, DeepSeek, vLLM, LiteLLM), no answer was read, so every call was charged
/// its reservation whatever the model generated (4,096 output tokens reserved, tens of
/// thousands used). The paths of the APIs such upstreams copy are read in their format.
#[test]
fn a_custom_upstream_is_read_on_the_paths_of_the_apis_it_copies() {
    let compatible = [
        "/v1/chat/completions",
        "/chat/completions",
        "/openai/v1/chat/completions?x=1",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
    ];
    for path in compatible {
        assert_eq!(format_for("custom", path), Some(Format::OpenAi), "{path}");
    }
    assert_eq!(format_for("custom", "/v1/messages"), Some(Format::Anthropic));
    for path in ["/v1/models", "/chat/completions/x", "/v1/responsesx", "/v1/files"] {
        assert_eq!(format_for("custom", path), None, "{path}");
    }
    let answer = r#"{"model":"mistral-large","usage":{"prompt_tokens":12,"completion_tokens":60000}}"#;
    let format = format_for("custom", "/v1/chat/completions").unwrap();
    assert_eq!(parse(format, JSON, answer).usage, usage(Some(12), Some(60000), None, None));
}

/// The attack: call the OpenAI-compatible endpoint a provider serves beside its own API. Its
/// answers are in OpenAI's format, which the provider's own reader did not read: every call was
/// charged its reservation, however much it used (4,096 output tokens reserved, 65,536 used).
#[test]
fn the_openai_compatible_endpoints_of_other_providers_are_read_as_openai() {
    for (provider, path) in [
        ("google", "/v1beta/openai/chat/completions"),
        ("google", "/v1/projects/p/locations/us-central1/endpoints/openapi/chat/completions"),
        ("google", "/v1/projects/p/locations/us-central1/endpoints/1234/chat/completions"),
        ("bedrock", "/openai/v1/chat/completions"),
        ("bedrock", "/openai/v1/responses?x=1"),
        ("anthropic", "/v1/chat/completions"),
    ] {
        assert_eq!(format_for(provider, path), Some(Format::OpenAi), "{provider} {path}");
    }
    // Reached through the provider's own reader anyway (a path spelled past the selection), an
    // answer in Chat Completions' naming is still read.
    let answer = r#"{"model":"m","usage":{"prompt_tokens":12,"completion_tokens":60000,"prompt_tokens_details":{"cached_tokens":8}}}"#;
    assert_eq!(parse(Format::Google, JSON, answer).usage, usage(Some(12), Some(60000), Some(8), None));
    // Anthropic and Bedrock count cached tokens apart from the input: the 8 are in the 12.
    for format in [Format::Anthropic, Format::Bedrock] {
        assert_eq!(parse(format, JSON, answer).usage, usage(Some(12), Some(60000), None, None), "{format:?}");
    }
}

#[test]
fn event_stream_content_type_is_matched_with_parameters_in_any_case() {
    for ct in ["text/event-stream", "Text/Event-Stream", "text/event-stream; charset=utf-8", " TEXT/EVENT-STREAM ;x=y"]
    {
        assert!(is_event_stream(ct), "{ct}");
    }
    for ct in ["", "application/json", "text/event-streams", "text/plain; text/event-stream"] {
        assert!(!is_event_stream(ct), "{ct}");
    }
    // The same SSE body read as JSON yields nothing; read as SSE, everything.
    assert_eq!(parse(Format::OpenAi, "application/json", OPENAI_CHAT_SSE), ResponseInfo::default());
    assert!(parse(Format::OpenAi, "TEXT/EVENT-STREAM", OPENAI_CHAT_SSE).usage.input_tokens.is_some());
}

// ---- Chunking.

/// A stream cut off before its usage is charged at least its events when its request set no
/// output limit (`budget::held`): each complete event counts once, whatever the chunking, and a
/// JSON answer has none.
#[test]
fn streams_count_their_complete_events_whatever_the_chunk_boundaries() {
    let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n".repeat(50) + "data: {\"choices\":[";
    let frames: Vec<u8> = (0..20).flat_map(|_| eventstream::tests::frame("contentBlockDelta", b"{}")).collect();
    for n in [1, 3, 64, 4096] {
        let mut p = UsageParser::new(Format::OpenAi, "text/event-stream");
        sse.as_bytes().chunks(n).for_each(|c| p.feed(c));
        assert_eq!(p.usage().2, 50, "chunks of {n}");
        let mut p = UsageParser::new(Format::Bedrock, "application/vnd.amazon.eventstream");
        frames.chunks(n).for_each(|c| p.feed(c));
        assert_eq!(p.usage().2, 20, "frames in chunks of {n}");
    }
    let mut p = UsageParser::new(Format::OpenAi, "application/json");
    p.feed_last(JSON.as_bytes());
    assert_eq!(p.usage().2, 0);
}

/// The attack: a Responses API stream whose `response.completed` event outgrows the 1 MiB an
/// event is kept whole (`include: ["message.output_text.logprobs"]`, `top_logprobs: 20`: every
/// token's alternatives), after continuing a stored conversation of 980,000 tokens. The event was
/// dropped whole, its usage unread, and the call kept its reservation (the body's bytes): the
/// 980,000 input tokens went uncharged, on every call. Its usage is read from its end.
#[test]
fn a_usage_event_too_large_to_keep_is_still_read_from_its_end() {
    let logprobs = r#"{"token":"x","logprob":-0.1,"top_logprobs":[]},"#.repeat(40_000);
    let completed = format!(
        r#"{{"type":"response.completed","response":{{"id":"resp_1","model":"gpt-4.1","output":[{{"type":"message","content":[{{"type":"output_text","text":"ok","logprobs":[{logprobs}{{}}]}}]}}],"usage":{{"input_tokens":980000,"output_tokens":1000,"total_tokens":981000}}}}}}"#
    );
    assert!(completed.len() > MAX_EVENT_BYTES);
    let stream = format!(
        "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"model\":\"gpt-4.1\"}}}}\n\nevent: response.completed\ndata: {completed}\n\n"
    );
    for n in [977, 65_536, stream.len()] {
        let mut p = UsageParser::new(Format::OpenAi, "text/event-stream");
        stream.as_bytes().chunks(n).for_each(|c| p.feed(c));
        assert!(p.buffered_capacity() <= 4 * TAIL_BYTES + 2 * SSE_KEEP_CAPACITY, "{}", p.buffered_capacity());
        let info = p.finish();
        assert_eq!(info.usage, usage(Some(980_000), Some(1000), None, None), "chunks of {n}");
        assert_eq!(p.usage().2, 2, "both events counted");
    }
    // The attack on that reading: `response.created` echoes the request's `instructions` and
    // `tools` (then `"usage":null`); an agent sends 1 MiB of them with a usage-shaped object in a
    // tool's schema, and hangs up before `response.completed`. Only events that carry the final
    // usage are read from their end: the planted count is never taken.
    let planted = format!(
        r#"{{"type":"response.created","response":{{"model":"gpt-4.1","instructions":"{}","tools":[{{"type":"function","parameters":{{"examples":[{{"usage":{{"input_tokens":1,"output_tokens":1}}}}]}}}}],"usage":null}}}}"#,
        "x".repeat(MAX_EVENT_BYTES)
    );
    let cut_short = format!("event: response.created\ndata: {planted}\n\n");
    let mut p = UsageParser::new(Format::OpenAi, "text/event-stream");
    cut_short.as_bytes().chunks(65_536).for_each(|c| p.feed(c));
    assert_eq!(p.usage().0, Usage::default(), "a planted count was taken");
    // Telemetry's reader of captured events leaves such an event out, as before.
    let mut seen = 0;
    for_each_event(stream.as_bytes(), |_, _| seen += 1);
    assert_eq!(seen, 1);
}

#[test]
fn finish_mid_stream_reports_what_the_events_so_far_said() {
    let cut = ANTHROPIC_SSE.find("event: content_block_start").unwrap();
    let mut parser = UsageParser::new(Format::Anthropic, SSE);
    parser.feed(&ANTHROPIC_SSE.as_bytes()[..cut]);
    // `message_start`'s counts, provisional until `message_delta`.
    let provisional = ResponseInfo {
        provisional: true,
        ..info(Some("claude-sonnet-4-5-20250929"), usage(Some(472), Some(2), Some(2048), Some(312)))
    };
    assert_eq!(parser.finish(), provisional);
    parser.feed(&ANTHROPIC_SSE.as_bytes()[cut..]);
    assert_eq!(parser.finish(), parse(Format::Anthropic, SSE, ANTHROPIC_SSE));

    // A JSON body reports nothing until it is complete, then everything.
    let mut parser = UsageParser::new(Format::Anthropic, JSON);
    parser.feed(&ANTHROPIC_JSON.as_bytes()[..100]);
    assert_eq!(parser.finish(), ResponseInfo::default());
    parser.feed(&ANTHROPIC_JSON.as_bytes()[100..]);
    assert_eq!(parser.finish(), parse(Format::Anthropic, JSON, ANTHROPIC_JSON));
    assert_eq!(parser.finish(), parse(Format::Anthropic, JSON, ANTHROPIC_JSON));
}

#[test]
fn every_body_gives_the_same_result_whatever_the_chunk_boundaries() {
    for (format, content_type, body) in fixtures() {
        let body = body.as_bytes();
        let whole = parse_chunks(format, content_type, [body]);
        assert_ne!(whole, ResponseInfo::default(), "{format:?} fixture parses to something");
        for split in 0..=body.len() {
            let (a, b) = body.split_at(split);
            assert_eq!(parse_chunks(format, content_type, [a, b]), whole, "{format:?} split at {split}");
            assert_eq!(
                parse_chunks_ending(format, content_type, &[a, b]),
                whole,
                "{format:?} split at {split}, b last"
            );
        }
        // The whole body as the last chunk (read where it lies), or an empty last chunk.
        assert_eq!(parse_chunks_ending(format, content_type, &[body]), whole, "{format:?} whole as the last");
        assert_eq!(parse_chunks_ending(format, content_type, &[body, b""]), whole, "{format:?} empty last");
        if content_type == JSON {
            let mut parser = UsageParser::new(format, content_type);
            parser.feed_last(body);
            for more in [&b"{}"[..], b"garbage", body] {
                parser.feed(more);
                assert_eq!(
                    parser.finish(),
                    whole,
                    "{format:?}: a JSON body's bytes after its last chunk change nothing"
                );
            }
        }
        assert_eq!(parse_chunks(format, content_type, body.chunks(1)), whole, "{format:?} byte by byte");
        for size in [2, 3, 7, 64] {
            assert_eq!(parse_chunks(format, content_type, body.chunks(size)), whole, "{format:?} chunks of {size}");
        }
        // Empty chunks and mid-stream `finish` calls change nothing.
        let mut parser = UsageParser::new(format, content_type);
        for chunk in body.chunks(5) {
            parser.feed(b"");
            parser.feed(chunk);
            let _ = parser.finish();
        }
        assert_eq!(parser.finish(), whole, "{format:?} with finish between chunks");
    }
}

// ---- SSE framing.

#[test]
fn sse_line_endings_crlf_cr_and_lf_are_equivalent() {
    let lf = parse(Format::Anthropic, SSE, ANTHROPIC_SSE);
    assert_eq!(parse(Format::Anthropic, SSE, &ANTHROPIC_SSE.replace('\n', "\r\n")), lf);
    assert_eq!(parse(Format::Anthropic, SSE, &ANTHROPIC_SSE.replace('\n', "\r")), lf);
    assert_eq!(parse(Format::Google, SSE, &google_sse()), parse(Format::Google, SSE, GOOGLE_SSE_LF));
    // With the event name and multi-line data depending on the framing, a CRLF read as two
    // line ends would lose them.
    for body in [ANTHROPIC_SSE_UNTYPED, SSE_FRAMING] {
        let format = if body == SSE_FRAMING { Format::OpenAi } else { Format::Anthropic };
        let lf = parse(format, SSE, body);
        assert_ne!(lf, ResponseInfo::default());
        assert_eq!(parse(format, SSE, &body.replace('\n', "\r\n")), lf);
        assert_eq!(parse(format, SSE, &body.replace('\n', "\r")), lf);
    }
    // Mixed endings, a CRLF split across chunks included.
    let mixed = "data: {\"model\":\"m\"}\r\n\rdata: {\"model\":\"m\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r";
    let mixed = format!("{mixed}\n\n");
    assert_eq!(parse(Format::OpenAi, SSE, &mixed), info(Some("m"), usage(Some(1), Some(2), None, None)));
}

#[test]
fn sse_data_lines_join_with_newline_and_comments_ids_and_one_space_are_handled() {
    let body = SSE_FRAMING;
    assert_eq!(parse(Format::OpenAi, SSE, body), info(Some("gpt-4o"), usage(Some(3), Some(5), None, None)));
}

#[test]
fn sse_event_without_its_terminating_blank_line_is_not_dispatched() {
    let body = "data: {\"model\":\"gpt-4o\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n";
    assert_eq!(parse(Format::OpenAi, SSE, body), ResponseInfo::default());
}

#[test]
fn oversized_sse_event_is_skipped_and_the_next_event_still_counts() {
    // One huge line, then many lines: both overflow; a usage chunk follows each.
    let usage_event =
        "data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":9}}\n\n";
    let huge_line = format!("data: {{\"model\":\"evil\",\"pad\":\"{}\"}}\n\n", "x".repeat(MAX_EVENT_BYTES));
    let many_lines = format!(
        "event: message\n{}\n",
        "data: {\"model\":\"evil\",\"usage\":{\"prompt_tokens\":1}}\n".repeat(MAX_EVENT_BYTES / 40)
    );
    for oversized in [huge_line, many_lines] {
        let body = format!("{oversized}{usage_event}");
        let mut parser = UsageParser::new(Format::OpenAi, SSE);
        for chunk in body.as_bytes().chunks(64 * 1024 + 3) {
            parser.feed(chunk);
            assert!(parser.buffered_len() <= MAX_EVENT_BYTES);
            assert!(parser.buffered_capacity() <= MAX_EVENT_BYTES + SSE_KEEP_CAPACITY);
        }
        assert_eq!(parser.finish(), info(Some("gpt-4o"), usage(Some(7), Some(9), None, None)));
    }
}

#[test]
fn sse_event_just_under_the_cap_is_read() {
    let head = "{\"model\":\"gpt-4o\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2},\"pad\":\"";
    let tail = "\"}";
    // The data buffer holds the value plus its line feed.
    let pad = "y".repeat(MAX_EVENT_BYTES - 1 - head.len() - tail.len());
    let body = format!("data: {head}{pad}{tail}\n\n");
    assert_eq!(parse(Format::OpenAi, SSE, &body), info(Some("gpt-4o"), usage(Some(1), Some(2), None, None)));
    let over = format!("data: {head}{pad}y{tail}\n\n");
    assert_eq!(parse(Format::OpenAi, SSE, &over), ResponseInfo::default());
}

// ---- JSON bounds.

/// The attack: an answer made larger than the parser keeps (logprobs of every token, no
/// `max_tokens`), so that its usage is never read and the call is charged only its reservation.
/// Past the cap only the tail is kept, and the usage every provider writes there is read.
#[test]
fn an_agent_cannot_hide_its_usage_in_a_response_too_large_for_the_parser() {
    let pad = "z\\\"usage\\\":{\\\"completion_tokens\\\":1}".repeat(MAX_JSON_BYTES / 30);
    for (format, body, want) in [
        (
            Format::OpenAi,
            format!("{{\"model\":\"gpt-4o\",\"pad\":\"{pad}\",\"usage\": {{\"prompt_tokens\":7,\"completion_tokens\":32000}}}}"),
            usage(Some(7), Some(32000), None, None),
        ),
        (
            Format::Anthropic,
            format!("{{\"content\":[{{\"text\":\"{pad}\"}}],\"usage\":{{\"input_tokens\":5,\"output_tokens\":9000}}}}"),
            usage(Some(5), Some(9000), None, None),
        ),
        (
            Format::Google,
            format!("{{\"candidates\":[{{\"text\":\"{pad}\"}}],\"usageMetadata\":{{\"promptTokenCount\":3,\"candidatesTokenCount\":8000}}}}"),
            usage(Some(3), Some(8000), None, None),
        ),
    ] {
        assert!(body.len() > MAX_JSON_BYTES);
        let mut parser = UsageParser::new(format, JSON);
        for chunk in body.as_bytes().chunks(100 * 1024 + 1) {
            parser.feed(chunk);
            assert!(parser.buffered_len() <= MAX_JSON_BYTES);
            assert!(parser.buffered_capacity() <= MAX_JSON_BYTES);
            let _ = parser.finish();
        }
        assert!(parser.buffered_capacity() <= 2 * TAIL_BYTES, "only the tail is kept once over the cap");
        assert_eq!(parser.finish().usage, want, "{format:?}");
        let last = parse_chunks_ending(format, JSON, &[body.as_bytes()]);
        assert_eq!(last.usage, want, "{format:?} in one last chunk");
    }
    // A member of that name after the usage whose value is no object (metadata the agent had
    // echoed) does not hide it.
    let echoed = format!(
        "{{\"pad\":\"{}\",\"usage\":{{\"input_tokens\":4,\"output_tokens\":6000}},\"metadata\":{{\"usage\":\"0\"}}}}",
        "z".repeat(MAX_JSON_BYTES)
    );
    let read = parse_chunks_ending(Format::OpenAi, JSON, &[echoed.as_bytes()]);
    assert_eq!(read.usage.output_tokens, Some(6000), "{:?}", read.usage);
    // A tail whose usage is cut or absent reports nothing (the call keeps its reservation).
    let body = format!("{{\"pad\":\"{}\",\"usage\":{{\"prompt_tokens\":1", "z".repeat(MAX_JSON_BYTES));
    assert_eq!(parse_chunks_ending(Format::OpenAi, JSON, &[body.as_bytes()]), ResponseInfo::default());
}

#[test]
fn json_exactly_at_the_cap_is_read() {
    let head = "{\"model\":\"gpt-4o\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2},\"pad\":\"";
    let tail = "\"}";
    let body = format!("{head}{}{tail}", "w".repeat(MAX_JSON_BYTES - head.len() - tail.len()));
    assert_eq!(body.len(), MAX_JSON_BYTES);
    let mut parser = UsageParser::new(Format::OpenAi, JSON);
    for chunk in body.as_bytes().chunks(64 * 1024) {
        parser.feed(chunk);
    }
    assert!(parser.buffered_capacity() <= MAX_JSON_BYTES);
    assert_eq!(parser.finish(), info(Some("gpt-4o"), usage(Some(1), Some(2), None, None)));
    let last = parse_chunks_ending(Format::OpenAi, JSON, &[body.as_bytes()]);
    assert_eq!(last, info(Some("gpt-4o"), usage(Some(1), Some(2), None, None)), "in one last chunk");
}

// ---- Garbage.

/// Deterministic pseudo-random bytes.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        })
        .collect()
}

#[test]
fn garbage_yields_nothing_and_never_panics() {
    let mut bodies: Vec<Vec<u8>> = vec![
        Vec::new(),
        noise(64 * 1024, 1),
        noise(4096, 2).into_iter().map(|b| if b % 7 == 0 { b'\n' } else { b }).collect(),
        b"\xff\xfe\x00data: \xc3\x28\n\n".to_vec(),
        "[".repeat(100_000).into_bytes(),
        format!("data: {}\n\n", "{\"a\":".repeat(10_000)).into_bytes(),
        b"\r\r\r\n\n\n::::\n\n".to_vec(),
        b"data: {\"model\":\"gpt-4o\",\"usage\":{\"prompt_tokens\":1\n\n".to_vec(),
        b"null".to_vec(),
        b"\"usage\"".to_vec(),
        b"[1, \"two\", null, {}]".to_vec(),
        b"data: null\n\ndata: 17\n\ndata: []\n\n".to_vec(),
        br#"{"model":5,"modelVersion":[],"usage":"lots","usageMetadata":7}"#.to_vec(),
        br#"{"usage":{"prompt_tokens":-1,"completion_tokens":1.5,"input_tokens":"3","prompt_tokens_details":4,"inputTokens":null,"cache_read_input_tokens":1e99}}"#.to_vec(),
        br#"{"usageMetadata":{"promptTokenCount":-4,"candidatesTokenCount":"x","thoughtsTokenCount":false}}"#.to_vec(),
        b"data: {\"type\":\"message_start\",\"message\":null}\n\ndata: {\"type\":\"message_delta\",\"usage\":[1,2]}\n\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":\"no\"}}\n\n".to_vec(),
        b"event: message_delta\ndata: {\"type\":5,\"usage\":{\"output_tokens\":-2}}\n\n".to_vec(),
    ];
    let sse_variants: Vec<Vec<u8>> =
        bodies.iter().filter(|b| !b.starts_with(b"data")).map(|b| [b"data: ", &b[..], b"\n\n"].concat()).collect();
    bodies.extend(sse_variants);
    for format in [Format::OpenAi, Format::Anthropic, Format::Google, Format::Bedrock] {
        for content_type in [JSON, SSE] {
            for body in &bodies {
                let whole = parse_chunks(format, content_type, [&body[..]]);
                assert_eq!(
                    whole,
                    ResponseInfo::default(),
                    "{format:?} {content_type} {:?}",
                    String::from_utf8_lossy(&body[..body.len().min(80)])
                );
                assert_eq!(parse_chunks(format, content_type, body.chunks(3)), whole);
            }
        }
    }
}

#[test]
fn wrongly_typed_fields_are_none_while_their_neighbours_still_count() {
    let body =
        r#"{"model":"gpt-4o","usage":{"prompt_tokens":"12","completion_tokens":34,"prompt_tokens_details":null}}"#;
    assert_eq!(parse(Format::OpenAi, JSON, body), info(Some("gpt-4o"), usage(None, Some(34), None, None)));
}

// ---- Request bodies.

#[test]
fn request_model_reads_the_model_field_of_a_json_object() {
    assert_eq!(
        request_model(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Grüß dich 👋"}],"stream":true}"#.as_bytes()
        ),
        Some("gpt-4o".into())
    );
    assert_eq!(
        request_model(b" \n{\"max_tokens\":1024,\"messages\":[],\"model\":\"claude-sonnet-4-5\"}"),
        Some("claude-sonnet-4-5".into())
    );
    assert_eq!(request_model(br#"{"model":"gpt\u002d4o"}"#), Some("gpt-4o".into()));
    let big = format!("{{\"messages\":[{{\"content\":\"{}\"}}],\"model\":\"o3\"}}", "a".repeat(1 << 20));
    assert_eq!(request_model(big.as_bytes()), Some("o3".into()));
}

#[test]
fn request_model_is_none_for_absent_mistyped_or_non_json_bodies() {
    for body in [
        &b""[..],
        b"   ",
        b"{}",
        b"{\"messages\":[]}",
        b"{\"model\":\"\"}",
        b"{\"model\":null}",
        b"{\"model\":42}",
        b"{\"model\":{\"name\":\"gpt-4o\"}}",
        b"[\"gpt-4o\"]",
        b"\"gpt-4o\"",
        b"{\"model\":\"gpt-4o\"",
        b"{\"model\":\"gpt-4o\"} trailing",
        b"{\"model\":\"a\",\"model\":\"b\"}",
        b"\xff\xfe{\"model\":\"x\"}",
        b"{\"model\":\"\xc3\x28\"}",
        b"model=gpt-4o&stream=true",
    ] {
        assert_eq!(request_model(body), None, "{:?}", String::from_utf8_lossy(body));
    }
    assert_eq!(request_model("[".repeat(100_000).as_bytes()), None);
    assert_eq!(request_model(&noise(10_000, 3)), None);
}

#[test]
fn usage_object_prefilter() {
    assert!(!super::has_object(br#"{"choices":[],"usage":null}"#, br#""usage""#));
    assert!(super::has_object(br#"{"usage" : {"prompt_tokens":1}}"#, br#""usage""#));
    assert!(super::has_object(br#"{"x":"usage","usage":{"a":1}}"#, br#""usage""#));
    assert!(!super::has_object(br#"{"text":""usage" is a word"}"#, br#""usage""#));
    assert!(!super::has_object(br#"{"usage""#, br#""usage""#));
}
