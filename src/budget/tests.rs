use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn budget(limits: [Option<u64>; 4]) -> Arc<Budget> {
    Arc::new(Budget {
        name: "default/team".into(),
        key: KeyBy::Tenant,
        window: BudgetWindow::Day,
        limits,
        concurrent: None,
        weights: vec![("gpt-4o*".into(), 2.0)],
        default_output_tokens: 4096,
        bytes_per_input_token: 1,
        referenced_input_tokens: 16_384,
        fail_closed: false,
        refuse_unmetered: true,
        invalid: None,
        metrics: Default::default(),
    })
}

fn claim(b: &Arc<Budget>, key: &str, reserved: Amounts, now: SystemTime) -> Claim {
    let (window_start, window_end) = window_bounds(b.window, now);
    Claim { budget: b.clone(), key: key.into(), window_start, window_end, reserved, weight: 1.0 }
}

#[test]
fn windows_are_fixed_and_aligned_to_utc() {
    // 2026-12-02T01:29:01Z
    let now = at(1_796_174_941);
    assert_eq!(window_bounds(BudgetWindow::Minute, now), (1_796_174_940, 1_796_175_000));
    assert_eq!(window_bounds(BudgetWindow::Hour, now), (1_796_173_200, 1_796_176_800));
    assert_eq!(window_bounds(BudgetWindow::Day, now), (1_796_169_600, 1_796_256_000));
    // December 2026 → January 2027.
    assert_eq!(window_bounds(BudgetWindow::Month, now), (1_796_083_200, 1_798_761_600));
    // February of a leap year: 29 days.
    let (s, e) = window_bounds(BudgetWindow::Month, at(1_709_251_200 - 1)); // 2024-02-29T23:59:59Z
    assert_eq!(e - s, 29 * 86_400);
}

fn demand(body: &str) -> Demand {
    Demand::from_body(body.as_bytes(), None)
}

#[test]
fn demand_reads_every_providers_output_limit_and_bounds_input_by_bytes() {
    let d = demand(r#"{"model":"gpt-4o","max_tokens":100,"messages":[]}"#);
    assert_eq!((d.models.as_slice(), d.max_output_tokens, d.body_bytes), (&["gpt-4o".to_owned()][..], Some(100), 49));
    assert_eq!(d.output_tokens(4096), 100);
    for (body, limit) in [
        (r#"{"max_completion_tokens":7}"#, 7),
        (r#"{"max_output_tokens":8}"#, 8),
        (r#"{"generationConfig":{"maxOutputTokens":9}}"#, 9),
        (r#"{"generation_config":{"max_output_tokens":9}}"#, 9),
        (r#"{"inferenceConfig":{"maxTokens":10}}"#, 10),
        (r#"{"textGenerationConfig":{"maxTokenCount":11}}"#, 11),
        (r#"{"max_gen_len":12}"#, 12),
        (r#"{"maxTokens":13}"#, 13),
        // Amazon Nova on Bedrock's invoke API; text-generation servers' `parameters`.
        (r#"{"inferenceConfig":{"max_new_tokens":14}}"#, 14),
        (r#"{"inputs":"hi","parameters":{"max_new_tokens":15}}"#, 15),
        // Several sequences at once, in `parameters` as at the top.
        (r#"{"inputs":"hi","parameters":{"max_new_tokens":15,"best_of":3}}"#, 45),
        (r#"{"parameters":{"num_return_sequences":2,"max_new_tokens":10}}"#, 20),
        (r#"{"num_return_sequences":2,"max_tokens":10}"#, 20),
        // Cohere's Command on Bedrock InvokeModel: five generations of up to 4,000 tokens each.
        (r#"{"prompt":"x","max_tokens":4000,"num_generations":5}"#, 20000),
        (r#"{"max_new_tokens":16}"#, 16),
        // Two names for the limit: the larger counts (the provider may honour either).
        (r#"{"max_tokens":5,"max_completion_tokens":50}"#, 50),
    ] {
        assert_eq!(demand(body).output_tokens(4096), limit, "{body}");
    }
    let d = Demand::from_body(b"not json", Some("gemini-2.0-flash"));
    assert_eq!(
        (d.models.as_slice(), d.max_output_tokens, d.body_bytes),
        (&["gemini-2.0-flash".to_owned()][..], None, 8)
    );
    // No body, nothing generated.
    assert_eq!(demand("").output_tokens(4096), 0);
    // The model the path names wins over one the body claims (a cheaper weight).
    assert_eq!(Demand::from_body(br#"{"model":"cheap"}"#, Some("gemini-ultra")).models, ["gemini-ultra"]);
}

#[test]
fn demand_reads_an_agents_body_the_way_most_against_it() {
    // A key given twice: parsers disagree on which wins (Python, Go, JavaScript: the last).
    assert_eq!(demand(r#"{"max_tokens":1,"max_tokens":5000}"#).output_tokens(4096), 5000);
    assert_eq!(demand(r#"{"max_tokens":5000,"max_tokens":1}"#).output_tokens(4096), 5000);
    assert_eq!(
        demand(r#"{"generationConfig":{"maxOutputTokens":1},"generationConfig":{"maxOutputTokens":900}}"#)
            .output_tokens(10),
        900
    );
    // An escaped key is the same key to every JSON parser.
    assert_eq!(demand(r#"{"max\u005ftokens":7000}"#).output_tokens(4096), 7000);
    // Not a plain non-negative integer: the default counts as well as what it might mean.
    for (body, reserved) in [
        (r#"{"max_tokens":"1"}"#, 4096),
        (r#"{"max_tokens":"5000"}"#, 5000),
        (r#"{"max_tokens":5000.0}"#, 5000),
        (r#"{"max_tokens":1.5}"#, 4096),
        (r#"{"max_tokens":-5}"#, 4096),
        (r#"{"max_tokens":true}"#, 4096),
        (r#"{"max_tokens":[1]}"#, 4096),
        (r#"{"max_tokens":{"value":1}}"#, 4096),
        (r#"{"max_tokens":1e30}"#, u64::MAX),
        (r#"{"max_tokens":"NaN"}"#, 4096),
        // null sets no limit: the provider's own default applies, so the budget's does.
        (r#"{"max_tokens":null}"#, 4096),
        // Invalid JSON after a limit: what was read counts, and so does the default.
        (r#"{"max_tokens":1,"messages":[}"#, 4096),
        (r#"{"max_tokens":9000,"messages":[}"#, 9000),
        (r#"{"max_tokens":1} trailing"#, 4096),
    ] {
        assert_eq!(demand(body).output_tokens(4096), reserved, "{body}");
    }
    // Several completions at once: each may generate the whole limit.
    assert_eq!(demand(r#"{"max_tokens":100,"n":10}"#).output_tokens(4096), 1000);
    assert_eq!(demand(r#"{"max_tokens":100,"best_of":3,"n":2}"#).output_tokens(4096), 300);
    assert_eq!(demand(r#"{"generationConfig":{"maxOutputTokens":100,"candidateCount":4}}"#).output_tokens(4096), 400);
    assert_eq!(demand(r#"{"max_tokens":100,"n":0}"#).output_tokens(4096), 100);
    assert_eq!(demand(r#"{"max_tokens":100,"n":1000000000000}"#).output_tokens(4096), 100_000_000_000_000);
}

#[test]
fn a_background_run_is_recognised_however_the_flag_is_written() {
    for (body, background) in [
        (r#"{"model":"gpt-4o","input":"hi","background":true}"#, true),
        (r#"{"background":"true"}"#, true),
        (r#"{"background":"false"}"#, true),
        (r#"{"background":1}"#, true),
        (r#"{"background":{}}"#, true),
        (r#"{"background":false,"background":true}"#, true),
        (r#"{"background":true,"background":false}"#, true),
        (r#"{"background\u0020":true}"#, false),
        (r#"{"backgr\u006fund":true}"#, true),
        (r#"{"background":false}"#, false),
        (r#"{"background":null}"#, false),
        // Only the body's own flag: a `background` inside the input is text.
        (r#"{"input":[{"background":true}],"metadata":{"background":"true"}}"#, false),
    ] {
        assert_eq!(demand(body).background, background, "{body}");
    }
}

#[test]
fn input_the_body_refers_to_instead_of_carrying_is_counted_wherever_it_appears() {
    for (body, refs) in [
        (r#"{"model":"gpt-4o","previous_response_id":"resp_1","input":"go on"}"#, 1),
        (r#"{"conversation":{"id":"conv_1"},"input":"go on"}"#, 1),
        (r#"{"contents":[],"cachedContent":"cachedContents/abc"}"#, 1),
        (r#"{"prompt":{"id":"pmpt_1"}}"#, 1),
        // Gemini's Interactions API: a stored interaction; Gemini's OpenAI-compatible endpoint:
        // cached content nested in `extra_body`; OpenAI Responses: a stored item by id.
        (r#"{"model":"gemini-2.5-pro","previous_interaction_id":"v1_x","input":"continue"}"#, 1),
        (r#"{"messages":[],"extra_body":{"google":{"cached_content":"cachedContents/X"}}}"#, 1),
        (r#"{"input":[{"type":"item_reference","id":"msg_1"},{"role":"user","content":"go on"}]}"#, 1),
        // Code the provider runs, whose output becomes input of the next turn.
        (r#"{"tools":[{"type":"code_interpreter","container":{"type":"auto"}}]}"#, 1),
        (r#"{"tools":[{"type":"code_execution_20250825","name":"code_execution"}]}"#, 1),
        (r#"{"contents":[],"tools":[{"codeExecution":{}}]}"#, 1),
        (r#"{"input":"hi","tools":[{"type":"google_search"},{"type":"mcp_server","url":"https://x/mcp"}]}"#, 2),
        // Text, not a stored prompt; a null reference refers to nothing.
        (r#"{"prompt":"Say hi","previous_response_id":null}"#, 0),
        // OpenAI chat: an image by URL counts, inline data does not (the body carries it).
        (
            r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/a.png"}},
               {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#,
            1,
        ),
        // OpenAI responses: image_url as a string, a file by id and by URL.
        (
            r#"{"input":[{"role":"user","content":[{"type":"input_image","image_url":"https://x/b.png"},
               {"type":"input_file","file_id":"file-1"},{"type":"input_file","file_url":"https://x/c.pdf"}]}]}"#,
            3,
        ),
        // Anthropic: a URL source and a file source; base64 is carried.
        (
            r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"url","url":"https://x/d.png"}},
               {"type":"document","source":{"type":"file","file_id":"file_2"}},
               {"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}}]}]}"#,
            2,
        ),
        // Gemini: fileData by URI, either spelling.
        (
            r#"{"contents":[{"parts":[{"fileData":{"mimeType":"video/mp4","fileUri":"https://youtu.be/x"}},
               {"file_data":{"file_uri":"gs://b/o"}}]}]}"#,
            2,
        ),
        // Escaped keys are the same keys.
        (r#"{"messages":[{"content":[{"image\u005furl":"https://x/e.png"}]}]}"#, 1),
        // A `source` or `url` that is just text names nothing.
        (r#"{"messages":[{"content":"see source","source":"wiki","url":"https://x"}]}"#, 0),
        // Tools the provider runs itself, whose results are input the body does not carry:
        // Anthropic's web search and fetch (not the results of earlier searches, carried), its
        // remote MCP servers; OpenAI's web and file search and remote MCP, chat's search options;
        // Gemini's URL context and Google Search.
        (
            r#"{"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":5},{"type":"web_fetch_20250910","name":"web_fetch"}],
               "messages":[{"role":"assistant","content":[{"type":"web_search_tool_result","content":[]}]}]}"#,
            2,
        ),
        (r#"{"mcp_servers":[{"type":"url","url":"https://mcp.example/sse","name":"x"}]}"#, 1),
        (
            r#"{"tools":[{"type":"web_search"},{"type":"file_search","vector_store_ids":["vs_1"]},{"type":"mcp","server_url":"https://x"}],
               "input":[{"type":"web_search_call"},{"type":"mcp_call"}]}"#,
            3,
        ),
        (r#"{"model":"gpt-4o-search-preview","web_search_options":{}}"#, 1),
        (r#"{"tools":[{"url_context":{}},{"google_search":{}}]}"#, 2),
        (r#"{"tools":[{"googleSearch":{}}]}"#, 1),
        // A referring key straight in the body, or in an object read for its limits.
        (r#"{"image_url":"https://x/f.png","parameters":{"file_id":"file-9","max_new_tokens":5}}"#, 2),
        // Tools the agent runs (functions) fetch nothing on the provider's side.
        (r#"{"tools":[{"type":"function","function":{"name":"web_search"}}]}"#, 0),
    ] {
        assert_eq!(demand(body).references, refs, "{body}");
    }
    // The attack: a reference whose fifth byte falls inside a character (`é`, `€`), in every key
    // that names one (once a panic in the stream's task); inline data in capitals is still inline.
    let keys = [
        r#"{"previous_response_id":"%"}"#,
        r#"{"messages":[{"content":[{"image_url":"%"}]}]}"#,
        r#"{"input":[{"content":[{"type":"input_file","file_id":"%"}]}]}"#,
        r#"{"input":[{"content":[{"type":"input_file","file_url":"%"}]}]}"#,
        r#"{"messages":[{"content":[{"source":{"type":"url","url":"%"}}]}]}"#,
        r#"{"contents":[{"parts":[{"fileData":{"fileUri":"%"}}]}]}"#,
        r#"{"contents":[],"cachedContent":"%"}"#,
    ];
    for key in keys {
        for text in ["abcdé", "a€€", "dat€", "データ:x", "é"] {
            let body = key.replace('%', text);
            assert_eq!(demand(&body).references, 1, "{body}");
        }
    }
    let inline = r#"{"messages":[{"content":[{"image_url":"DATA:image/png;base64,AAAA"}]}]}"#;
    assert_eq!(demand(inline).references, 0, "{inline}");
    let b = Budget { referenced_input_tokens: 1000, ..(*budget([None, None, None, Some(1)])).clone() };
    let body = r#"{"model":"claude","previous_response_id":"resp_1","max_tokens":10}"#;
    // The body's bytes at 1 byte per token, plus 1,000 for the stored conversation.
    let input = body.len() as i64 + 1000;
    assert_eq!(b.reserve_amounts(&demand(body)), [1, input, 10, input + 10]);
}

#[test]
fn a_deeply_nested_or_truncated_body_cannot_crash_the_reader_or_shrink_the_reservation() {
    // serde_json stops at 128 levels: an error, so the default counts on top of what was read.
    let deep = format!(r#"{{"max_tokens":1,"messages":{}"#, "[".repeat(100_000));
    let d = demand(&deep);
    assert!(d.unreadable_limit && d.unreadable_body);
    // Cut short, or not UTF-8: unreadable to the end (a budget refuses them).
    for body in [&br#"{"max_tokens":9,"messages":"#[..], b"{\"messages\":\"\xff\",\"max_tokens\":9}"] {
        assert!(Demand::from_body(body, None).unreadable_body, "{body:?}");
    }
    // A limit after a lone surrogate escape (a JavaScript client's string cut inside an emoji):
    // read as lenient parsers read it, the escape as U+FFFD. Pairs and escaped backslashes stay.
    for (body, limit) in [
        (r#"{"messages":"\ud800","max_tokens":5000}"#, 5000),
        (r#"{"messages":"x\udc00y\ud83d\ude00z","max_tokens":5001}"#, 5001),
        (r#"{"messages":"\\ud800 \ud83d\ude00","max_tokens":5002}"#, 5002),
    ] {
        let d = demand(body);
        assert!(!d.unreadable_body && !d.unreadable_limit, "{body}");
        assert_eq!((d.max_output_tokens, d.body_bytes), (Some(limit), body.len() as u64), "{body}");
    }
    // Bytes after the object (JSON Lines: a batch file uploaded raw): the first object is what
    // any parser that accepts the body reads; the default counts as well.
    let jsonl = demand("{\"max_tokens\":9}\n{\"max_tokens\":7}\n");
    assert!(jsonl.unreadable_limit && !jsonl.unreadable_body);
    assert_eq!(jsonl.output_tokens(4096), 4096);
    // What is read whole is not, whatever its limits say.
    for body in [r#"{"max_tokens":"9"}"#, r#"{"messages":"\u00e9"}"#, "not json", ""] {
        assert!(!demand(body).unreadable_body, "{body}");
    }
    assert_eq!(d.output_tokens(4096), 4096);
    let deep_objects = format!(r#"{{"max_tokens":1,"messages":{}"#, r#"{"a":"#.repeat(100_000));
    assert_eq!(demand(&deep_objects).output_tokens(4096), 4096);
    // Cut off mid-key, mid-string, mid-number.
    for body in [r#"{"max_tok"#, r#"{"model":"gpt-4"#, r#"{"max_tokens":12"#] {
        assert_eq!(demand(body).output_tokens(4096), 4096, "{body}");
    }
}

#[test]
fn a_body_with_a_byte_order_mark_or_in_utf16_or_utf32_is_read_like_any_other() {
    let json = r#"{"model":"gpt-4o","max_tokens":100000}"#;
    let utf16 = |big: bool| -> Vec<u8> {
        json.encode_utf16().flat_map(|u| if big { u.to_be_bytes() } else { u.to_le_bytes() }).collect()
    };
    let utf32 = |big: bool| -> Vec<u8> {
        json.chars().flat_map(|c| if big { (c as u32).to_be_bytes() } else { (c as u32).to_le_bytes() }).collect()
    };
    let bodies: Vec<Vec<u8>> = vec![
        [b"\xEF\xBB\xBF".as_slice(), json.as_bytes()].concat(),
        utf16(false),
        utf16(true),
        [[0xFF, 0xFE].as_slice(), &utf16(false)].concat(),
        [[0xFE, 0xFF].as_slice(), &utf16(true)].concat(),
        utf32(false),
        utf32(true),
    ];
    for body in bodies {
        let d = Demand::from_body(&body, None);
        assert_eq!((d.output_tokens(4096), d.models.as_slice()), (100_000, &["gpt-4o".to_owned()][..]), "{body:?}");
        // Input is still bounded by the bytes that arrived.
        assert_eq!(d.body_bytes, body.len() as u64);
    }
}

/// The attack: a byte-order mark (or UTF-16) before JSON holding a lone surrogate, which Rust's
/// decoders refuse and Python's `json.loads` (`surrogatepass`) reads. The body was read as empty:
/// 0 output reserved, counted as bounded, whatever its `max_tokens` or `stream`. Refused instead,
/// as any body keyswap cannot read.
#[test]
fn an_undecodable_body_behind_a_byte_order_mark_is_refused_not_read_as_empty() {
    let mut utf8 = b"\xEF\xBB\xBF{\"max_tokens\":100000,\"stream\":true,\"x\":\"".to_vec();
    utf8.extend_from_slice(b"\xED\xA0\x80\"}");
    let utf16: Vec<u8> = "{\"max_tokens\":100000,\"x\":\""
        .encode_utf16()
        .chain([0xD800])
        .chain("\"}".encode_utf16())
        .flat_map(u16::to_le_bytes)
        .collect();
    for body in [utf8, utf16] {
        let d = Demand::from_body(&body, None);
        assert!(d.unreadable_body && !d.output_bounded(), "{body:?}: {d:?}");
        assert_ne!(d.max_output_tokens, Some(0), "read as an empty body");
    }
    // The same in an encoding that decodes is read.
    let utf16: Vec<u8> = "{\"max_tokens\":7}".encode_utf16().flat_map(u16::to_le_bytes).collect();
    let d = Demand::from_body(&utf16, None);
    assert!(!d.unreadable_body && d.output_bounded() && d.max_output_tokens == Some(7), "{d:?}");
}

/// The attack: name a weighted model in a multipart form (`model=gpt-image-1` for an image edit,
/// a transcription), which keyswap does not read: the call weighed 1, reserved and settled (its
/// answer names no model). A body that is not JSON weighs the budget's heaviest, unless the path
/// names the model.
#[test]
fn a_model_named_in_a_multipart_form_cannot_dodge_its_weight() {
    let b = budget([None, None, None, Some(1_000_000)]);
    let form = b"--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o\r\n--x--\r\n";
    assert_eq!(b.weight_of(&Demand::from_body(form, None)), 2.0);
    assert_eq!(b.weight_of(&Demand::from_body(form, Some("cheap-model"))), 1.0, "the path names the model");
    assert_eq!(b.weight_of(&Demand::from_body(b"{}", None)), 1.0);
    assert_eq!(b.weight_of(&Demand::from_body(b"", None)), 1.0);
}

/// The attack: an identity provider that signs any subject an agent asks for (service-account
/// tokens the agent may mint), each subject a new key of a per-agent budget: every key kept a
/// counter for the whole window, and each new one copied the whole map. Counters are capped (and
/// a new key copies one shard of them); a request needing one past the cap is refused, keys
/// already counted go on, and ended windows make room again.
#[test]
fn an_agent_cannot_grow_the_in_process_budget_counters_by_minting_identities() {
    let local = local::Local::with_max(256);
    let team = budget([None, None, None, Some(1_000_000)]);
    let now = at(1_796_174_941);
    let take = |key: &str, now: SystemTime| local.reserve(&[claim(&team, key, [1, 1, 0, 1], now)], now);
    let mut refused = Vec::new();
    for n in 0..2000 {
        let key = format!("minted-{n}");
        if let Err(l) = take(&key, now) {
            assert_eq!((l.dimension, l.limit), ("keys", 256), "{l:?}");
            refused.push(key);
        }
    }
    let held = 2000 - refused.len();
    assert!((128..=256).contains(&held), "{held} counters held");
    assert!(take("minted-0", now).is_ok(), "a key already counted goes on");
    // The next day, once the ended window's grace has passed: room again.
    let tomorrow = now + Duration::from_secs(86_400 + 120);
    let r = take(&refused[0], tomorrow);
    assert!(r.is_ok(), "{}: ended windows were not swept: {:?}", refused[0], r.err());
}

#[test]
fn a_body_naming_several_models_is_weighted_as_the_heaviest() {
    let b = budget([None, None, None, Some(1000)]);
    // gpt-4o* weighs 2.
    for body in [r#"{"model":"gpt-4o","model":"cheap"}"#, r#"{"model":"cheap","model":"gpt-4o"}"#] {
        assert_eq!(b.weight_of(&demand(body)), 2.0, "{body}");
    }
    assert_eq!(b.weight_of(&demand(r#"{"model":"cheap"}"#)), 1.0);
    // More names than are kept: the heaviest weight of the table.
    let many: Vec<String> = (0..20).map(|i| format!(r#""model":"m{i}""#)).collect();
    let d = demand(&format!("{{{}}}", many.join(",")));
    assert!(d.models_overflow && d.models.len() < 20);
    assert_eq!(b.weight_of(&d), 2.0);
    // The weight decided at reservation is the one settled with.
    let c = b.claim("k".into(), &demand(r#"{"model":"cheap","model":"gpt-4o","max_tokens":10}"#), at(1_796_174_941));
    assert_eq!((c.weight, c.reserved[2]), (2.0, 20));
}

#[test]
fn reservations_are_weighted_by_model_and_default_when_the_request_sets_no_limit() {
    let b = budget([None, None, None, Some(1000)]);
    let d = Demand {
        models: vec!["gpt-4o-mini".into()],
        max_output_tokens: Some(100),
        body_bytes: 30,
        choices: 1,
        ..Demand::default()
    };
    assert_eq!(b.reserve_amounts(&d), [1, 60, 200, 260]);
    let d = Demand {
        models: vec!["claude".into()],
        max_output_tokens: None,
        body_bytes: 30,
        choices: 1,
        ..Demand::default()
    };
    assert_eq!(b.reserve_amounts(&d), [1, 30, 4096, 4126]);
    // A budget of requests only reserves (and reads) no tokens.
    let requests_only = Budget { limits: [Some(10), None, None, None], ..(*b).clone() };
    assert!(!requests_only.counts_tokens());
    assert_eq!(requests_only.reserve_amounts(&d), [1, 0, 0, 0]);
}

#[test]
fn a_reservation_that_does_not_fit_takes_nothing_from_any_budget() {
    let engine = Arc::new(Engine::new(Default::default()));
    let now = at(1_796_174_941);
    let roomy =
        Arc::new(Budget { name: "default/roomy".into(), ..(*budget([None, None, None, Some(10_000)])).clone() });
    let tight = budget([Some(5), None, None, Some(100)]);
    let claims = |n: i64| vec![claim(&roomy, "t", [1, n, 0, n], now), claim(&tight, "t", [1, n, 0, n], now)];
    let Reserve::Now(Admit::Held(h, remaining)) = engine.reserve(None, claims(60), now) else { panic!("admitted") };
    assert_eq!(remaining, Some(40));
    let Reserve::Now(Admit::Limited(l)) = engine.reserve(None, claims(60), now) else { panic!("limited") };
    assert_eq!((&*l.budget, l.dimension, l.limit, l.used, l.requested), ("default/team", "total_tokens", 100, 60, 60));
    assert_eq!(l.retry_after, 1_796_256_000 - 1_796_174_941);
    let start = window_bounds(BudgetWindow::Day, now).0;
    // The refused request left both budgets as they were.
    assert_eq!(engine.local.used("default/roomy", "t", start), Some([1, 60, 0, 60]));
    assert_eq!(engine.local.used("default/team", "t", start), Some([1, 60, 0, 60]));
    // Settling gives back what was not used.
    h.settle_at(Observed::Ended { answered: Answered::Success, input: Some(10), output: Some(0), events: 0 }, now);
    assert_eq!(engine.local.used("default/team", "t", start), Some([1, 10, 0, 10]));
    assert!(matches!(engine.reserve(None, claims(60), now), Reserve::Now(Admit::Held(..))));
}

#[test]
fn concurrent_reservations_never_exceed_the_limit() {
    let engine = Arc::new(Engine::new(Default::default()));
    let now = at(1_796_174_941);
    let b = budget([None, None, None, Some(1000)]);
    let admitted = std::sync::atomic::AtomicI64::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..100 {
                    if let Reserve::Now(Admit::Held(h, _)) =
                        engine.reserve(None, vec![claim(&b, "k", [1, 0, 7, 7], now)], now)
                    {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        std::mem::forget(h);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 1000 / 7);
    let start = window_bounds(BudgetWindow::Day, now).0;
    assert_eq!(engine.local.used("default/team", "k", start).unwrap()[3], (1000 / 7) * 7);
}

#[test]
fn keys_of_callers_without_one_share_a_counter() {
    let id = Identity {
        agent: "bot-1".into(),
        tenant: None,
        validator: "apiKeys".into(),
        role: None,
        labels: vec![("team".into(), "red".into())],
    };
    assert_eq!(KeyBy::Tenant.value(Some(&id), "default/r"), "-");
    assert_eq!(KeyBy::Agent.value(Some(&id), "default/r"), "apiKeys/bot-1");
    assert_eq!(KeyBy::Label("team".into()).value(Some(&id), "default/r"), "red");
    assert_eq!(KeyBy::Label("cost-center".into()).value(Some(&id), "default/r"), "-");
    assert_eq!(KeyBy::Route.value(None, "default/r"), "default/r");
    assert_eq!(KeyBy::Gateway.value(None, "default/r"), "*");
    // An agent named `-` (a JWT subject, an edge header) is not an anonymous caller, and the
    // escape keeps every name its own: `-` → `--`, `--` → `---`.
    for (validator, agent, key) in
        [("jwt", "-", "jwt/-"), ("-", "x", "--/x"), ("--", "x", "---/x"), ("-x", "y", "--x/y"), ("x-", "y", "x-/y")]
    {
        let named = Identity { agent: agent.into(), validator: validator.into(), ..id.clone() };
        assert_eq!(KeyBy::Agent.value(Some(&named), "default/r"), key);
    }
    assert_eq!(KeyBy::Agent.value(None, "default/r"), "-");
}

/// The attack: an agent whose identity provider lets it pick its JWT `sub` (or a hop that lets it
/// pick an edge-trust header) names an API-key agent, and spends or exhausts that agent's
/// budget. Each validator's agents are counted apart.
#[test]
fn a_jwt_subject_naming_an_api_key_agent_spends_none_of_its_budget() {
    let by = |validator: &str| Identity {
        agent: "builder".into(),
        tenant: Some("acme".into()),
        validator: validator.into(),
        role: None,
        labels: Vec::new(),
    };
    let (key, jwt) = (by("apiKeys"), by("idp"));
    assert_ne!(KeyBy::Agent.value(Some(&key), "r"), KeyBy::Agent.value(Some(&jwt), "r"));
    assert_eq!(KeyBy::Tenant.value(Some(&key), "r"), KeyBy::Tenant.value(Some(&jwt), "r"), "tenants are shared");
}

#[test]
fn settlement_counts_what_was_reported_and_keeps_the_reservation_only_when_nothing_was() {
    let engine = Arc::new(Engine::new(Default::default()));
    let now = at(1_796_174_941);
    let b = budget([None, None, None, None]);
    let start = window_bounds(BudgetWindow::Day, now).0;
    let settle = |key: &str, observed: Observed| {
        let Reserve::Now(Admit::Held(h, _)) = engine.reserve(None, vec![claim(&b, key, [1, 30, 4096, 4126], now)], now)
        else {
            panic!("admitted")
        };
        h.settle_at(observed, now);
        engine.local.used("default/team", key, start).unwrap()
    };
    // Embeddings: input reported, no output: the output reservation is released.
    assert_eq!(
        settle("embed", Observed::Ended { answered: Answered::Success, input: Some(10), output: None, events: 0 }),
        [1, 10, 0, 10]
    );
    // No usage at all on a success: the reservation stands.
    assert_eq!(
        settle("silent", Observed::Ended { answered: Answered::Success, input: None, output: None, events: 0 }),
        [1, 30, 4096, 4126]
    );
    // Timed out (Envoy's 504 after the route's timeout, 408 after the stream idle timeout): the
    // provider may have run the call to its end; the reservation stands.
    let timed_out = Observed::Ended { answered: Answered::TimedOut, input: None, output: None, events: 0 };
    assert_eq!(settle("timeout", timed_out), [1, 30, 4096, 4126]);
    let statuses = [(Some(200), Answered::Success), (Some(504), Answered::TimedOut), (Some(408), Answered::TimedOut)];
    for (status, answered) in statuses.into_iter().chain([(Some(500), Answered::Error), (None, Answered::Error)]) {
        assert_eq!(Answered::of_status(status), answered, "{status:?}");
    }
    // An error without usage generated nothing.
    assert_eq!(
        settle("error", Observed::Ended { answered: Answered::Error, input: None, output: None, events: 0 }),
        [1, 0, 0, 0]
    );
    // Cut off after 200 bytes: the input stands, output up to the bytes seen.
    assert_eq!(
        settle("cut", Observed::Aborted { input: None, output: None, response_bytes: 200, events: 0 }),
        [1, 30, 200, 230]
    );
    // The attack: a long stream cut off after a placeholder count (Anthropic's `message_start`
    // says 1 output token) is charged the bytes that passed, capped at the reservation.
    let placeholder = Observed::Aborted { input: Some(12), output: Some(1), response_bytes: 50_000, events: 0 };
    assert_eq!(settle("placeholder", placeholder), [1, 12, 4096, 4108]);
    let short = Observed::Aborted { input: Some(12), output: Some(1), response_bytes: 300, events: 0 };
    assert_eq!(settle("short", short), [1, 12, 300, 312]);
    // A count above what the bytes bound (a final count before the cut) stands.
    let counted = Observed::Aborted { input: Some(12), output: Some(900), response_bytes: 300, events: 0 };
    assert_eq!(settle("counted", counted), [1, 12, 900, 912]);
    // The attack: a stream hangs up just before its usage event, 100,000 events in. With no count,
    // the events that passed are charged, not the reservation: whether or not the request named
    // an output limit (one under a name the upstream ignores, `max_gen_len` to a vLLM server,
    // bounds nothing).
    let long = Observed::Aborted { input: Some(12), output: None, response_bytes: 20_000_000, events: 100_000 };
    assert_eq!(settle("limitless", long), [1, 12, 100_000, 100_012]);
    let brief = Observed::Aborted { input: Some(12), output: None, response_bytes: 300, events: 3 };
    assert_eq!(settle("brief", brief), [1, 12, 300, 312], "bytes still count below the reservation");
    // A stream that ended without reporting usage (a `custom` vendor that was not asked): its
    // events count past the reservation too; one that kept to its limit is charged that.
    let unreported = Observed::Ended { answered: Answered::Success, input: None, output: None, events: 50_000 };
    assert_eq!(settle("unreported", unreported), [1, 30, 50_000, 50_030]);
    let kept = Observed::Ended { answered: Answered::Success, input: None, output: None, events: 4_000 };
    assert_eq!(settle("kept to its limit", kept), [1, 30, 4096, 4126]);
    // Dropped unsettled (never forwarded): everything released, the request too.
    let Reserve::Now(Admit::Held(h, _)) =
        engine.reserve(None, vec![claim(&b, "dropped", [1, 30, 4096, 4126], now)], now)
    else {
        panic!("admitted")
    };
    drop(h);
    assert_eq!(engine.local.used("default/team", "dropped", start), Some([0, 0, 0, 0]));
}

#[test]
fn each_budget_counts_under_its_own_name_even_a_copy_of_one_already_counted() {
    let registry = Arc::new(Registry::default());
    let engine = Arc::new(Engine::new(registry.clone()));
    let now = at(1_796_174_941);
    let team = budget([None, None, None, Some(10_000)]);
    let admit = |b: &Arc<Budget>| match engine.reserve(None, vec![claim(b, "t", [1, 5, 0, 5], now)], now) {
        Reserve::Now(Admit::Held(h, _)) => h.settle_at(
            Observed::Ended { answered: Answered::Success, input: Some(3), output: Some(1), events: 0 },
            now,
        ),
        _ => panic!("admitted"),
    };
    admit(&team);
    // Copied after its metrics were found: the copy must not count into the original's.
    let other = Arc::new(Budget { name: "default/other".into(), ..(*team).clone() });
    admit(&other);
    admit(&other);
    let counts = |name: &str| {
        let m = registry.of(&Arc::from(name));
        [&m.admitted, &m.reserved_tokens, &m.settled_tokens].map(|a| a.load(Ordering::Relaxed))
    };
    assert_eq!(counts("default/team"), [1, 5, 4]);
    assert_eq!(counts("default/other"), [2, 10, 8]);
}

/// The attack: at the end of a window, send requests whose claims were made in it but reach the
/// store after the first request of the next window swept it (large bodies read on a saturated
/// blocking pool). Each must find its window's counter, not open a fresh one at zero.
#[test]
fn a_request_reserved_across_the_window_boundary_cannot_open_a_fresh_counter_for_the_ended_window() {
    let engine = Arc::new(Engine::new(Default::default()));
    let team = budget([None, None, None, Some(100)]);
    let (before, after) = (at(1_796_255_999), at(1_796_256_001)); // a day's last second; the next day
    let take = |reserved: i64, claimed_at: SystemTime, now: SystemTime| {
        match engine.reserve(None, vec![claim(&team, "t", [1, reserved, 0, reserved], claimed_at)], now) {
            Reserve::Now(Admit::Held(h, _)) => {
                std::mem::forget(h); // charged as reserved, never settled
                true
            }
            Reserve::Now(Admit::Limited(_)) => false,
            _ => panic!("in-process"),
        }
    };
    assert!(take(90, before, before), "the day's budget has room");
    // The next day's first request sweeps ended windows.
    assert!(take(10, after, after));
    // A claim made in the last second of the day, reserved a moment later: the day is spent.
    assert!(!take(50, before, after), "a stale claim found a fresh counter for an ended window");
}

/// The attack: streams that outlast their window. An agent on a per-minute budget asks for
/// answers with no output limit (reserved at the default) that stream past the minute's end: what
/// they used beyond the reservation was charged to the minute already over, where it bounded
/// nothing. It counts in the window the response ends in; what a call used less than it reserved
/// goes back to the window it was reserved in.
#[test]
fn a_stream_outlasting_its_window_charges_its_excess_to_the_window_it_ends_in() {
    let engine = Arc::new(Engine::new(Default::default()));
    let minute =
        Arc::new(Budget { window: BudgetWindow::Minute, ..(*budget([None, None, None, Some(8_000)])).clone() });
    let (start, later) = (at(1_796_256_000), at(1_796_256_090)); // a minute's first second; 90 s on
    let (w0, w1) = (window_bounds(BudgetWindow::Minute, start).0, window_bounds(BudgetWindow::Minute, later).0);
    let reserve = |now: SystemTime| match engine.reserve(None, vec![claim(&minute, "t", [1, 10, 4096, 4106], now)], now)
    {
        Reserve::Now(Admit::Held(h, _)) => Some(h),
        Reserve::Now(Admit::Limited(_)) => None,
        _ => panic!("in-process"),
    };
    let ended =
        |output| Observed::Ended { answered: Answered::Success, input: Some(10), output: Some(output), events: 0 };
    reserve(start).unwrap().settle_at(ended(9_000), later);
    assert_eq!(engine.local.used("default/team", "t", w0), Some([1, 10, 4096, 4106]), "the minute it started in");
    assert_eq!(engine.local.used("default/team", "t", w1), Some([0, 0, 4904, 4904]), "the minute it ended in");
    assert!(reserve(later).is_none(), "the minute the stream ended in has no room for another 4,106");
    // Used less than reserved: given back where it was taken, nothing opened later.
    let (start, later) = (at(1_796_256_600), at(1_796_256_700));
    reserve(start).unwrap().settle_at(ended(100), later);
    assert_eq!(
        engine.local.used("default/team", "t", window_bounds(BudgetWindow::Minute, start).0),
        Some([1, 10, 100, 110])
    );
    assert_eq!(engine.local.used("default/team", "t", window_bounds(BudgetWindow::Minute, later).0), None);
}

/// The same in Redis (Debian's `redis-server` on loopback): the excess makes the later window's
/// counter, which expires as the reserve script's do; the counter reserved in keeps the
/// reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlasting_its_window_charges_its_excess_to_the_window_it_ends_in_in_redis() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    /// Stopped however the test ends.
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Server(
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is missing: apt-get install -y redis-server"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "redis-server did not listen in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("redis://127.0.0.1:{port}/0");
    let target = Ok(redis::RedisTarget::new(&url, None, "budget-redis".into()).unwrap());
    let engine = Arc::new(Engine::new(Default::default()));
    let minute =
        Arc::new(Budget { window: BudgetWindow::Minute, ..(*budget([None, None, None, Some(8_000)])).clone() });
    // Now (Redis expires counters by the wall clock), and 90 s on: always a later minute.
    let (start, later) = (SystemTime::now(), SystemTime::now() + Duration::from_secs(90));
    let Reserve::Later(reserving) =
        engine.reserve(Some(&target), vec![claim(&minute, "t", [1, 10, 4096, 4106], start)], start)
    else {
        panic!("counted in Redis")
    };
    let Admit::Held(held, _) = reserving.await else { panic!("reserved") };
    let ended = Observed::Ended { answered: Answered::Success, input: Some(10), output: Some(9_000), events: 0 };
    held.settle_at(ended, later);
    assert!(engine.settled().await, "the settlement reached Redis");
    let mut conn = ::redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let mut counter = async |at: SystemTime| -> (Vec<i64>, i64) {
        let key = redis::counter_key(&claim(&minute, "t", [0; 4], at));
        let used: Vec<Option<i64>> =
            ::redis::cmd("HMGET").arg(&key).arg(&["r", "i", "o", "t"]).query_async(&mut conn).await.unwrap();
        let ttl: i64 = ::redis::cmd("TTL").arg(&key).query_async(&mut conn).await.unwrap();
        (used.into_iter().map(|v| v.unwrap_or(0)).collect(), ttl)
    };
    let (first, _) = counter(start).await;
    assert_eq!(first, [1, 10, 4096, 4106], "the minute it started in keeps the reservation");
    let (last, ttl) = counter(later).await;
    assert_eq!(last, [0, 0, 4904, 4904], "the minute it ended in takes the excess");
    assert!(ttl > 3600, "the later counter expires after its window, as reserved ones do: TTL {ttl}");
}

/// The attack: name a weighted model another way — a Bedrock inference profile or its ARN, or
/// an alias the provider resolves (`gemini-pro-latest`) — to be charged at weight 1.
#[test]
fn an_inference_profile_or_model_alias_cannot_dodge_its_models_weight() {
    let base = budget([None, None, None, Some(1_000_000)]);
    let b = Arc::new(Budget {
        weights: vec![("anthropic.claude-opus-4*".into(), 5.0), ("gemini-2.5-pro*".into(), 4.0)],
        ..(*base).clone()
    });
    for model in [
        "anthropic.claude-opus-4-1-20250805-v1:0",
        "us.anthropic.claude-opus-4-1-20250805-v1:0",
        "global.anthropic.claude-opus-4-1-20250805-v1:0",
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-opus-4-1-20250805-v1:0",
    ] {
        assert_eq!(b.weight(model), 5.0, "{model}");
    }
    assert_eq!(b.weight("us.anthropic.claude-sonnet-4-5-20250929-v1:0"), 1.0);
    // The attack: an application inference profile (or a provisioned model, a prompt router) for
    // Opus, whose ARN ends in an opaque id: weighed 1 (and Bedrock's answer names no model). It
    // weighs as the heaviest weight now, unless a glob names the ARN itself.
    let profile = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3d4e5f6";
    for opaque in [
        profile,
        "arn:aws:bedrock:us-east-1:123456789012:provisioned-model/xyz123",
        "arn:aws:bedrock:us-east-1:123456789012:default-prompt-router/anthropic.claude:1",
        "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile",
        // A managed prompt's version (Converse takes it), a Bedrock Marketplace endpoint, an
        // unescaped foundation-model ARN cut at its resource type: no model named either.
        "arn:aws:bedrock:us-east-1:123456789012:prompt/PROMPT12345:1",
        "arn:aws:sagemaker:us-east-1:123456789012:endpoint/my-endpoint",
        "arn:aws:bedrock:us-east-1::foundation-model",
    ] {
        assert_eq!(b.weight(opaque), 5.0, "{opaque}");
    }
    assert_eq!(b.weight("arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-opus-4-1-20250805-v1:0"), 5.0);
    assert_eq!(b.weight("arn:aws-us-gov:bedrock:us-gov-west-1::foundation-model/anthropic.claude-3-haiku"), 1.0);
    let named = Budget {
        weights: vec![("arn:*a1b2c3d4e5f6".into(), 2.0), ("anthropic.claude-opus-4*".into(), 5.0), ("*".into(), 1.0)],
        ..(*b).clone()
    };
    assert_eq!(named.weight(profile), 2.0, "a glob naming the profile decides");
    let other = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/ffff";
    assert_eq!(named.weight(other), 5.0, "a catch-all `*` names no profile");
    // The model that answered weighs the call when it weighs more than the name asked for.
    let engine = Arc::new(Engine::new(Default::default()));
    let now = at(1_796_174_941);
    let mut c = claim(&b, "t", [1, 10, 100, 110], now);
    c.weight = b.weight("gemini-pro-latest");
    assert_eq!(c.weight, 1.0);
    let Reserve::Now(Admit::Held(mut h, _)) = engine.reserve(None, vec![c], now) else { panic!("admitted") };
    h.weigh_as("gemini-2.5-pro");
    h.settle_at(Observed::Ended { answered: Answered::Success, input: Some(10), output: Some(100), events: 0 }, now);
    let start = window_bounds(BudgetWindow::Day, now).0;
    assert_eq!(engine.local.used("default/team", "t", start), Some([1, 40, 400, 440]));
}

/// While the store is down, fail-open budgets admit uncounted: the settled-tokens metric says
/// what counters were charged, and none was.
#[test]
fn uncounted_admissions_are_not_reported_as_settled_tokens() {
    let registry = Arc::new(Registry::default());
    let engine = Arc::new(Engine::new(registry.clone()));
    let now = at(1_796_174_941);
    let team = budget([None, None, None, Some(10_000)]);
    let Admit::AdmittedUncounted(h) = engine.unavailable(vec![claim(&team, "t", [1, 5, 0, 5], now)], "down".into())
    else {
        panic!("fail-open admits uncounted")
    };
    h.settle_at(Observed::Ended { answered: Answered::Success, input: Some(3), output: Some(1), events: 0 }, now);
    let m = registry.of(&Arc::from("default/team"));
    assert_eq!(m.settled_tokens.load(Ordering::Relaxed), 0);
}

/// An agent that can choose its counter key (a label, a tenant or agent name it mints) cannot
/// make two keys share a counter, whatever their bytes: thousands of keys, keys that are
/// prefixes of each other, and a budget name and key that concatenate to another pair's.
#[test]
fn chosen_counter_keys_never_share_a_counter() {
    let engine = Arc::new(Engine::new(Default::default()));
    let now = at(1_796_174_941);
    let start = window_bounds(BudgetWindow::Day, now).0;
    let b = budget([None, None, None, Some(1_000_000)]);
    let mut keys: Vec<String> = (0..2_000).map(|i| format!("agent-{i}")).collect();
    keys.extend(["", "a", "aa", "a\u{0}", "a\u{ff}", "\u{ff}a"].map(String::from));
    for (i, key) in keys.iter().enumerate() {
        let n = i as i64 + 1;
        let Reserve::Now(Admit::Held(h, _)) = engine.reserve(None, vec![claim(&b, key, [1, n, 0, n], now)], now) else {
            panic!("admitted")
        };
        h.settle_at(
            Observed::Ended { answered: Answered::Success, input: Some(n as u64), output: Some(0), events: 0 },
            now,
        );
    }
    for (i, key) in keys.iter().enumerate() {
        let n = i as i64 + 1;
        assert_eq!(engine.local.used("default/team", key, start), Some([1, n, 0, n]), "key {key:?}");
    }
    // ("default/team", "x") against ("default/tea", "mx"): the same bytes end to end.
    let other = Arc::new(Budget { name: "default/tea".into(), ..(*b).clone() });
    let Reserve::Now(Admit::Held(h, _)) = engine.reserve(None, vec![claim(&other, "mx", [1, 7, 0, 7], now)], now)
    else {
        panic!("admitted")
    };
    drop(h);
    let Reserve::Now(Admit::Held(h, _)) = engine.reserve(None, vec![claim(&b, "x", [1, 5, 0, 5], now)], now) else {
        panic!("admitted")
    };
    assert_eq!(engine.local.used("default/team", "x", start), Some([1, 5, 0, 5]));
    drop(h);
}

/// The attack: `max_tokens` near `u64::MAX` on a budget that limits only input tokens. The output
/// and total counters, never checked against a limit, still add every reservation in flight:
/// uncapped, five such requests overflowed them (in Redis, `HINCRBY` failed the script, which
/// read as the store being down: every budget of the replica failed open or closed for a second).
#[test]
fn huge_output_limits_on_a_budget_of_input_only_never_overflow_its_counters() {
    let engine = Arc::new(Engine::new(Default::default()));
    let now = at(1_796_174_941);
    let start = window_bounds(BudgetWindow::Day, now).0;
    let b = budget([None, Some(1_000_000), None, None]);
    let mut held = Vec::new();
    for body in
        [r#"{"max_tokens":18446744073709551615}"#, r#"{"max_tokens":1e300}"#, r#"{"n":1e300,"max_tokens":1e300}"#]
    {
        let amounts = b.reserve_amounts(&Demand::from_body(body.as_bytes(), None));
        assert!(amounts.iter().all(|a| (0..=2 * MAX_PER_REQUEST).contains(a)), "{body}: {amounts:?}");
        for _ in 0..20 {
            let Reserve::Now(Admit::Held(h, _)) = engine.reserve(None, vec![claim(&b, "k", amounts, now)], now) else {
                panic!("admitted: the input fits")
            };
            held.push(h);
        }
    }
    let used = engine.local.used("default/team", "k", start).unwrap();
    assert!(used.iter().all(|u| *u >= 0), "a counter overflowed: {used:?}");
    assert_eq!(used[2], 60 * MAX_PER_REQUEST, "{used:?}");
    drop(held);
    assert_eq!(engine.local.used("default/team", "k", start), Some([0, 0, 0, 0]));
    // Counters already at the top (a window of reservations kept by calls that reported no
    // usage): they saturate at 2^62, never wrap.
    let Ok((counters, _)) = engine.local.reserve(&[claim(&b, "top", [0, 0, 0, 0], now)], now) else { panic!() };
    counters[0].add(&[0, 0, i64::MAX - 10, i64::MAX - 10]);
    let huge = b.reserve_amounts(&Demand::from_body(br#"{"max_tokens":1e300}"#, None));
    let Reserve::Now(Admit::Held(h, _)) = engine.reserve(None, vec![claim(&b, "top", huge, now)], now) else {
        panic!("admitted: the input fits")
    };
    let used = engine.local.used("default/team", "top", start).unwrap();
    assert_eq!((used[2], used[3]), (1 << 62, 1 << 62), "{used:?}");
    h.settle_at(Observed::Ended { answered: Answered::Success, input: None, output: None, events: 0 }, now);
}

/// In Redis a key too long or with control characters is stored by its digest: a key spelled
/// like that digest, or like another key's display fingerprint, still gets a counter of its own.
#[test]
fn a_key_spelled_like_another_keys_redis_digest_gets_its_own_counter() {
    let now = at(1_796_174_941);
    let b = budget([None, None, None, Some(1_000)]);
    let key = |k: &str| super::redis::counter_key(&claim(&b, k, [1, 0, 0, 0], now));
    for hidden in ["a\u{0}", &"x".repeat(129)] {
        let stored = key(hidden);
        let suffix = stored.rsplit_once(":sha256:").map(|(_, hex)| format!("sha256:{hex}")).expect("a digest");
        assert_ne!(key(&suffix), stored, "{hidden:?}: the key {suffix:?} names its counter");
        let display = crate::vocab::fingerprint(hidden.as_bytes());
        assert_ne!(key(&display), stored, "{hidden:?}: the key {display:?} names its counter");
        assert_eq!(key(hidden), stored, "one key, one counter");
    }
    assert!(key("agent-1").ends_with(":agent-1"), "{}", key("agent-1"));
}

#[test]
fn requests_in_flight_take_places_up_to_the_limit_per_key_and_give_them_back_when_they_end() {
    let flight = in_flight::InFlight::default();
    let b = Arc::new(Budget { concurrent: Some(2), ..(*budget([None; 4])).clone() });
    let other = Arc::new(Budget { name: "default/other".into(), concurrent: Some(1), ..(*b).clone() });
    let unlimited = budget([Some(10), None, None, None]);
    let both = [b.clone(), other.clone(), unlimited];
    let keys: [Arc<str>; 3] = ["acme".into(), "acme".into(), "acme".into()];
    let first = flight.enter(&both, &keys).unwrap();
    // `other` allows one: the second request is refused there, and gives back its place in `b`.
    let refused = flight.enter(&both, &keys).unwrap_err();
    assert_eq!(
        (&*refused.budget, refused.dimension, refused.limit, refused.used),
        ("default/other", "concurrent_requests", 1, 1)
    );
    assert_eq!(refused.retry_after, 1);
    assert_eq!(flight.count("default/team", "acme"), 1, "a refused request kept a place");
    let second = flight.enter(&both[..1], &keys[..1]).unwrap();
    assert!(flight.enter(&both[..1], &keys[..1]).is_err(), "a third request in flight");
    // Another key has places of its own.
    let globex = flight.enter(&both[..1], &["globex".into()]).unwrap();
    drop(first);
    assert_eq!(flight.count("default/other", "acme"), 0);
    let third = flight.enter(&both, &keys).unwrap();
    drop((second, third, globex));
    assert_eq!(flight.count("default/team", "acme"), 0);
    // Idle keys are swept out when a new one appears, and a swept key counts from zero again.
    for n in 0..100 {
        drop(flight.enter(&both[..1], &[format!("agent-{n}").into()]).unwrap());
    }
    let _held = flight.enter(&both[..1], &["acme".into()]).unwrap();
    assert_eq!(flight.count("default/team", "acme"), 1);
    // An invalid budget (`concurrentRequests: 0` is one) takes no place: the reservation refuses
    // its requests with 503 `budget_invalid`, not 429.
    let invalid = Arc::new(Budget { concurrent: Some(0), invalid: Some("limits".into()), ..(*b).clone() });
    assert!(flight.enter(&[invalid], &["acme".into()]).unwrap().is_empty());
}

/// A request that waited for a token keeps the places it took before waiting: the check says
/// whether places are the ones a request of these budgets and keys takes.
#[test]
fn places_say_whether_they_are_the_ones_a_request_takes() {
    let flight = in_flight::InFlight::default();
    let b = Arc::new(Budget { concurrent: Some(2), ..(*budget([None; 4])).clone() });
    let other = Arc::new(Budget { name: "default/other".into(), concurrent: Some(1), ..(*b).clone() });
    let unlimited = budget([Some(10), None, None, None]);
    let both = [b.clone(), unlimited, other.clone()];
    let keys: [Arc<str>; 3] = ["acme".into(), "acme".into(), "acme".into()];
    let held = flight.enter(&both, &keys).unwrap();
    assert!(held.is_for(&both, &keys));
    assert!(!held.is_for(&both, &["globex".into(), "acme".into(), "acme".into()]), "another key");
    assert!(!held.is_for(&both[..2], &keys[..2]), "fewer budgets");
    assert!(!held.is_for(&[other.clone(), b.clone()], &keys[..2]), "another order");
    assert!(in_flight::Places::default().is_for(&both[1..2], &keys[1..2]), "no limit, no place");
    assert_eq!(flight.count("default/other", "acme"), 1);
}

/// Requests of one key take places from several threads while other keys come and go (each
/// new key copies the map and sweeps idle slots out): the places held at once, counted by the
/// requests themselves, never exceed the limit (a count split between a swept slot and its
/// successor would let them).
#[test]
fn places_taken_from_many_threads_never_exceed_the_limit_while_keys_come_and_go() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    let flight = Arc::new(in_flight::InFlight::default());
    let b = Arc::new(Budget { concurrent: Some(3), ..(*budget([None; 4])).clone() });
    let (held, peak, taken) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (flight, b, held, peak, taken) = (flight.clone(), b.clone(), held.clone(), peak.clone(), taken.clone());
            std::thread::spawn(move || {
                for n in 0..5_000 {
                    // New keys all the time, so the map is copied and swept while others count.
                    if n % 3 == 0 {
                        drop(flight.enter(std::slice::from_ref(&b), &[format!("churn-{t}-{n}").into()]));
                    }
                    if let Ok(p) = flight.enter(std::slice::from_ref(&b), &["acme".into()]) {
                        peak.fetch_max(held.fetch_add(1, SeqCst) + 1, SeqCst);
                        taken.fetch_add(1, SeqCst);
                        std::thread::yield_now();
                        held.fetch_sub(1, SeqCst);
                        drop(p);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(peak.load(SeqCst) <= 3, "{} places held at once", peak.load(SeqCst));
    assert!(taken.load(SeqCst) > 1_000, "only {} places taken: the test proved little", taken.load(SeqCst));
    assert_eq!(flight.count("default/team", "acme"), 0);
}
