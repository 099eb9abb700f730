use std::borrow::Cow;

use super::{parse, Answer, Field, Parsed};

fn one(data: &str) -> Answer<'_> {
    match parse(data.as_bytes()) {
        Some(Parsed::One(a)) => a,
        other => panic!("one answer expected from {data}: {other:?}"),
    }
}

#[test]
fn reads_model_type_usage_and_nested_answers_and_borrows_plain_strings() {
    let a = one(r#"{"id":"x","type":"message_start","model":"m","choices":[{"message":{"content":"long text"}}],
            "usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,
                     "prompt_tokens_details":{"cached_tokens":2,"audio_tokens":0}},
            "response":{"model":"r","output":[1,2],"usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":1}}},
            "message":{"model":"c","usage":{"cache_read_input_tokens":9}}}"#);
    assert!(matches!(a.model, Some(Cow::Borrowed("m"))), "{:?}", a.model);
    assert_eq!(a.kind.as_deref(), Some("message_start"));
    let u = a.usage.unwrap();
    assert_eq!((u.get(Field::PromptTokens), u.get(Field::CompletionTokens)), (Some(3), Some(4)));
    assert_eq!(u.get(Field::PromptCached), Some(2));
    assert_eq!(u.get(Field::InputTokens), None);
    let r = a.response.unwrap();
    assert_eq!(r.model.as_deref(), Some("r"));
    let ru = r.usage.unwrap();
    assert_eq!((ru.get(Field::InputTokens), ru.get(Field::InputCached)), (Some(5), Some(1)));
    assert_eq!(a.message.unwrap().usage.unwrap().get(Field::CacheReadInputTokens), Some(9));
    // Escapes are decoded (into an owned string).
    assert_eq!(one(r#"{"model":"gpt\u002d4o\n"}"#).model.as_deref(), Some("gpt-4o\n"));
    // Gemini and Bedrock names.
    let g = one(
        r#"{"modelVersion":"g","usageMetadata":{"promptTokenCount":1,"candidatesTokenCount":2,"thoughtsTokenCount":3,"cachedContentTokenCount":4}}"#,
    );
    let gu = g.usage_metadata.unwrap();
    assert_eq!(g.model_version.as_deref(), Some("g"));
    assert_eq!(
        [
            Field::PromptTokenCount,
            Field::CandidatesTokenCount,
            Field::ThoughtsTokenCount,
            Field::CachedContentTokenCount
        ]
        .map(|c| gu.get(c)),
        [Some(1), Some(2), Some(3), Some(4)]
    );
    let b = one(r#"{"usage":{"inputTokens":1,"outputTokens":2,"cacheReadInputTokens":3,"cacheWriteInputTokens":4}}"#);
    let bu = b.usage.unwrap();
    assert_eq!(
        [
            Field::InputTokensCamel,
            Field::OutputTokensCamel,
            Field::CacheReadInputTokensCamel,
            Field::CacheWriteInputTokensCamel
        ]
        .map(|c| bu.get(c)),
        [Some(1), Some(2), Some(3), Some(4)]
    );
}

#[test]
fn wrongly_typed_members_read_as_absent_and_their_neighbours_still_count() {
    let a = one(r#"{"model":7,"type":{"a":[1,{"b":null}]},"usage":{"prompt_tokens":-3,"completion_tokens":4.0,
            "input_tokens":"5","output_tokens":[6],"cache_read_input_tokens":{"x":1},"cache_creation_input_tokens":true,
            "prompt_tokens_details":[{"cached_tokens":1}],"input_tokens_details":{"cached_tokens":null},
            "promptTokenCount":18446744073709551615,"candidatesTokenCount":18446744073709551616},
            "response":"not an object","message":[{"model":"m"}],"usageMetadata":null}"#);
    assert_eq!((a.model, a.kind, a.response, a.message, a.usage_metadata), (None, None, None, None, None));
    let u = a.usage.unwrap();
    for c in [
        Field::PromptTokens,
        Field::CompletionTokens,
        Field::InputTokens,
        Field::OutputTokens,
        Field::CacheReadInputTokens,
        Field::CacheCreationInputTokens,
        Field::PromptCached,
        Field::InputCached,
        Field::CandidatesTokenCount,
    ] {
        assert_eq!(u.get(c), None, "{c:?}");
    }
    assert_eq!(u.get(Field::PromptTokenCount), Some(u64::MAX));
    assert_eq!(one(r#"{"usage":"lots"}"#).usage, None);
    assert_eq!(one(r#"{"usage":[{"output_tokens":1}]}"#).usage, None);
}

#[test]
fn a_member_named_twice_counts_as_its_last_occurrence() {
    let a = one(r#"{"model":"a","model":"b","usage":{"output_tokens":1},"usage":{"output_tokens":2,"output_tokens":3},
            "type":"x","type":null}"#);
    assert_eq!(a.model.as_deref(), Some("b"));
    assert_eq!(a.usage.unwrap().get(Field::OutputTokens), Some(3));
    assert_eq!(a.kind, None);
    // A later occurrence of the wrong type takes the earlier one's place: absent.
    assert_eq!(one(r#"{"usage":{"input_tokens":1},"usage":null}"#).usage, None);
    let u = one(r#"{"usage":{"prompt_tokens_details":{"cached_tokens":1},"prompt_tokens_details":{}}}"#).usage;
    assert_eq!(u.unwrap().get(Field::PromptCached), None);
}

#[test]
fn arrays_scalars_and_what_is_not_json() {
    match parse(br#"[{"modelVersion":"g"},7,[1],{"usageMetadata":{"promptTokenCount":1}}]"#) {
        Some(Parsed::Many(all)) => {
            assert_eq!(all.len(), 4);
            assert_eq!(all[0].model_version.as_deref(), Some("g"));
            assert_eq!((&all[1], &all[2]), (&Answer::default(), &Answer::default()));
            assert_eq!(all[3].usage_metadata.unwrap().get(Field::PromptTokenCount), Some(1));
        }
        other => panic!("{other:?}"),
    }
    for scalar in [" 7 ", "-1", "1.5", "\"s\"", "true", "null"] {
        assert_eq!(parse(scalar.as_bytes()), Some(Parsed::One(Answer::default())), "{scalar}");
    }
    for bad in ["", "{\"model\":", "{} x", "{\"model\":\"m\"}{}", "\u{feff}{}", "{'model':'m'}", "[1,]"] {
        assert_eq!(parse(bad.as_bytes()), None, "{bad}");
    }
    assert_eq!(parse(b"{\"model\":\"\xff\"}"), None, "invalid UTF-8 is not JSON");
}

/// A provider's body nesting 100,000 deep never overflows the stack: where the reader skips a
/// member, serde_json skips it without recursing (nothing read from it, the rest still is); where
/// it descends into a nested answer, serde_json's depth limit ends the parse (nothing read).
#[test]
fn a_deeply_nested_body_never_overflows_the_stack() {
    let deep = |open: &str, close: &str| format!("{}1{}", open.repeat(100_000), close.repeat(100_000));
    assert_eq!(parse(deep("[", "]").as_bytes()), Some(Parsed::Many(vec![Answer::default()])));
    for skipped in [
        format!(r#"{{"choices":{},"model":"m"}}"#, deep("[", "]")),
        format!(r#"{{"usage":{{"x":{}}},"model":"m"}}"#, deep("{\"a\":", "}")),
    ] {
        assert_eq!(one(&skipped).model.as_deref(), Some("m"));
    }
    for descended in [
        format!("{}{{}}{}", r#"{"response":"#.repeat(100_000), "}".repeat(100_000)),
        format!("{}{{}}{}", r#"{"message":"#.repeat(100_000), "}".repeat(100_000)),
    ] {
        assert_eq!(parse(descended.as_bytes()), None);
    }
    let ok = format!("{}{{\"model\":\"m\"}}{}", r#"{"response":"#.repeat(50), "}".repeat(50));
    let mut a = one(&ok);
    for _ in 0..50 {
        a = *a.response.expect("nested");
    }
    assert_eq!(a.model.as_deref(), Some("m"));
}

/// Members nobody reads are skipped for their structure only: text a provider got wrong there
/// (a lone surrogate, invalid UTF-8, a number out of range, nesting past serde_json's depth
/// limit), or a member name nobody reads (a lone surrogate, not UTF-8), does not hide the counts
/// beside it.
#[test]
fn what_is_skipped_is_checked_for_structure_only() {
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let bodies = [
        r#"{"model":"m","usage":{"prompt_tokens":3,"foo":"\ud800"}}"#.to_string(),
        r#"{"model":"m","usage":{"prompt_tokens":3,"foo":1e400}}"#.to_string(),
        format!(r#"{{"model":"m","usage":{{"prompt_tokens":3,"x":{deep}}}}}"#),
        // Member names nobody reads, beside those read: a lone surrogate, at each level read.
        r#"{"\udc00":1,"model":"m","usage":{"\ud800":2,"prompt_tokens":3}}"#.to_string(),
    ];
    for body in &bodies {
        let a = one(body);
        assert_eq!(a.model.as_deref(), Some("m"), "{body}");
        assert_eq!(a.usage.unwrap().get(Field::PromptTokens), Some(3), "{body}");
    }
    let mut raw = br#"{"model":"m","usage":{"prompt_tokens":3,"foo":"x"}}"#.to_vec();
    let at = raw.iter().position(|&b| b == b'x').unwrap();
    raw[at] = 0xff;
    match parse(&raw) {
        Some(Parsed::One(a)) => assert_eq!(a.usage.unwrap().get(Field::PromptTokens), Some(3)),
        other => panic!("{other:?}"),
    }
    // A member name that is not UTF-8, at each level read.
    let mut raw = br#"{"N":1,"model":"m","usage":{"N":2,"prompt_tokens":3}}"#.to_vec();
    raw.iter_mut().filter(|b| **b == b'N').for_each(|b| *b = 0xff);
    match parse(&raw) {
        Some(Parsed::One(a)) => {
            assert_eq!(a.model.as_deref(), Some("m"));
            assert_eq!(a.usage.unwrap().get(Field::PromptTokens), Some(3));
        }
        other => panic!("{other:?}"),
    }
    // Still JSON structure: a member cut short, or a bare word, is not.
    assert_eq!(parse(br#"{"usage":{"prompt_tokens":3,"foo":tru}}"#), None);
}
