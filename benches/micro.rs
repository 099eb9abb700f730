//! Criterion micro-benchmarks of the request path's pieces:
//!
//! ```sh
//! cargo bench --bench micro            # all; `cargo bench --bench micro -- route_match` for one group
//! ```
//!
//! - `route_match`: `Snapshot::decide` with 1,000 routes (exact host, wildcard host, no match);
//! - `request_headers`: the whole request-headers decision (`extproc::on_request_headers`: match,
//!   plan, Envoy mutation; with tracing on, the span's start too);
//! - `header_mutation`: the strip-and-write plan and its Envoy `HeaderMutation` alone;
//! - `redaction`: scrubbing live secrets from a 64 KiB captured body, and credential query
//!   parameters from a path;
//! - `sse_usage`: token usage from Anthropic and OpenAI SSE streams, fed in 1 KiB chunks (bytes/s);
//! - `sigv4`: signing a Bedrock request with a 4 KiB body;
//! - `agent_auth`: admitting an agent: an API key (SHA-256 + lookup), a JWT (HS256, ES256);
//! - `span`: one header-only span's whole life (start with the agent's headers, response headers,
//!   finish, OTLP protobuf encoding in an export request), without the HTTP send.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use keyswap::config::{Catalog, Decision, Key, Snapshot};
use keyswap::extproc::{self, Resume, Shared, Step};
use keyswap::inject;
use keyswap::provider::usage::{Format, UsageParser};
use keyswap::telemetry::{capture, Metrics, Sink};

const ROUTES: usize = 1000;

/// A gateway with `ROUTES` routes: custom providers on `svc-N.example.com` (every tenth a
/// wildcard `*.zone-N.example.net`), one catch-all Header policy, and anthropic last.
fn snapshot() -> Snapshot {
    let mut text = String::from(
        "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: egress}\nspec: {}\n---\n",
    );
    for i in 0..ROUTES {
        let host = if i % 10 == 0 { format!("'*.zone-{i}.example.net'") } else { format!("svc-{i}.example.com") };
        text.push_str(&format!(
            "apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: r{i:04}}}\nspec:\n  parentRefs: [{{name: egress}}]\n  rules: [{{matches: [{{provider: custom, hosts: [{host}], endpoints: ['/v1/*']}}]}}]\n---\n"
        ));
    }
    text.push_str(
        "apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {name: zz-anthropic}\nspec:\n  parentRefs: [{name: egress}]\n  rules: [{matches: [{provider: anthropic}]}]\n---\n\
         apiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {name: custom}\nspec:\n  parentRefs: [{kind: EgressGateway, name: egress}]\n  secretRef: {name: keys}\n  target: Header\n  headerName: x-api-key\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {name: keys}\nstringData: {token: sk-ant-REAL-0001-do-not-leak-xxxxxxxxxxxxxxxx}\n",
    );
    let (objects, errors) = keyswap::config::load::parse_file(std::path::Path::new("bench.yaml"), &text);
    assert!(errors.is_empty(), "{errors:?}");
    let catalog = Catalog::build(objects).expect("valid catalog");
    catalog.compile(&Key::new("default", "egress")).expect("valid snapshot")
}

fn route_match(c: &mut Criterion) {
    let snap = snapshot();
    assert_eq!(snap.routes.len(), ROUTES + 1);
    let mut g = c.benchmark_group("route_match");
    for (name, host, path) in [
        ("exact_host_1000_routes", "svc-999.example.com", "/v1/chat"),
        ("wildcard_host_1000_routes", "api.zone-990.example.net", "/v1/chat"),
        ("provider_default_host", "api.anthropic.com:443", "/v1/messages"),
        ("no_match_deny", "exfil.example.org", "/upload"),
    ] {
        assert!(
            matches!(snap.decide(host, path, None), Decision::Inject { .. } | Decision::Deny),
            "{name}: unexpected decision"
        );
        g.bench_function(name, |b| {
            b.iter(|| matches!(snap.decide(black_box(host), black_box(path), None), Decision::Inject { .. }))
        });
    }
    g.finish();
}

fn header(key: &str, value: &str) -> HeaderValue {
    HeaderValue { key: key.into(), raw_value: value.as_bytes().to_vec(), ..Default::default() }
}

/// What Envoy sends for an Anthropic SDK request.
fn agent_headers() -> Vec<HeaderValue> {
    vec![
        header(":authority", "api.anthropic.com"),
        header(":path", "/v1/messages"),
        header(":method", "POST"),
        header(":scheme", "https"),
        header("content-type", "application/json"),
        header("accept", "application/json"),
        header("user-agent", "Anthropic/Python 0.69.0"),
        header("anthropic-version", "2023-06-01"),
        header("authorization", "Bearer keyswap-injected-by-proxy"),
        header("x-stainless-lang", "python"),
        header("x-stainless-retry-count", "0"),
        header("content-length", "112"),
        header("x-forwarded-proto", "https"),
        header("x-request-id", "5f9c2a8e-3c0b-4c4e-9d0e-6a8a3d2b1f00"),
    ]
}

fn request_headers(c: &mut Criterion) {
    let snap = Arc::new(snapshot());
    let headers = agent_headers();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("request_headers");
    let peer = keyswap::auth::Peer::default();
    for tracing in [false, true] {
        let metrics: Arc<Metrics> = Arc::default();
        // With tracing on, spans would go to this channel; the bench drops them unfinished.
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let sink = Sink::new(metrics.clone(), tracing.then_some(tx));
        let shared = Shared {
            store: Arc::new(ArcSwap::from(snap.clone())),
            metrics,
            sink,
            tunnel: Default::default(),
            budgets: Arc::new(keyswap::budget::Engine::new(Default::default())),
            handoffs: Default::default(),
            streams: Default::default(),
        };
        let name = if tracing { "decide_and_mutate_tracing_on" } else { "decide_and_mutate_tracing_off" };
        g.bench_function(name, |b| {
            b.iter(|| {
                match extproc::on_request_headers(&snap, &shared, black_box(&headers), true, Resume::First, &peer) {
                    Step::Answer(o) => black_box(o),
                    Step::Wait(_) => unreachable!(),
                }
            })
        });
    }
    g.finish();
}

fn header_mutation(c: &mut Criterion) {
    let snap = snapshot();
    let headers = agent_headers();
    let Decision::Inject { entry, credential } = snap.decide("api.anthropic.com", "/v1/messages", None) else {
        panic!("anthropic must inject")
    };
    c.bench_function("header_mutation/plan_and_envoy_mutation", |b| {
        b.iter(|| {
            let pairs = headers.iter().map(|h| (h.key.as_str(), h.raw_value.as_slice()));
            let plan = inject::plan(&entry.binding.strip, credential, None, pairs, "/v1/messages", None);
            black_box(extproc::mutation::header_mutation(&plan, &[]))
        })
    });
}

fn redaction(c: &mut Criterion) {
    let secrets: [&[u8]; 3] =
        [b"sk-ant-REAL-0001-do-not-leak-xxxxxxxxxxxxxxxx", b"sk-openai-REAL-0002-do-not-leak", b"AIza%2BREAL%2F0003"];
    let mut body = Vec::with_capacity(64 * 1024);
    while body.len() < 64 * 1024 {
        body.extend_from_slice(br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello there, how are you today? "}}"#);
    }
    body.truncate(64 * 1024);
    let mut g = c.benchmark_group("redaction");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("scrub_64KiB_body_3_secrets", |b| {
        b.iter_batched(|| body.clone(), |mut buf| capture::scrub(&mut buf, &secrets, false), BatchSize::SmallInput)
    });
    // Response bodies toward the agent (spec.scrubResponseBodies): 4 KiB chunks, as Envoy streams.
    g.bench_function("stream_scrub_64KiB_in_4KiB_chunks_3_secrets", |b| {
        b.iter(|| {
            let mut s = keyswap::scrub::Streaming::default();
            let chunks: Vec<&[u8]> = body.chunks(4096).collect();
            for (i, c) in chunks.iter().enumerate() {
                black_box(s.chunk(c, i + 1 == chunks.len(), &secrets));
            }
        })
    });
    g.finish();
    let mut headers = vec![("content-type", b"application/json".as_slice()), ("x-request-id", b"req_0123456789abcdef")];
    headers.extend([
        ("cf-ray", b"8d1f2a3b4c5d6e7f-IAD".as_slice()),
        ("server", b"cloudflare"),
        ("date", b"Tue, 01 Dec 2026"),
    ]);
    c.bench_function("redaction/response_headers_clean_check_3_secrets", |b| {
        b.iter(|| black_box(headers.iter().any(|(_, v)| secrets.iter().any(|s| keyswap::scrub::contains(v, s)))))
    });
    let names: Vec<Box<str>> = vec!["key".into(), "api-key".into()];
    c.bench_function("redaction/query_param_in_path", |b| {
        b.iter(|| {
            black_box(inject::query::redact(
                black_box("/v1beta/models/gemini:streamGenerateContent?alt=sse&key=AIzaREAL&x=1"),
                &names,
            ))
        })
    });
}

fn sse(events: &[&str], repeat: usize) -> Vec<u8> {
    let mut out = String::new();
    out.push_str(events[0]);
    for _ in 0..repeat {
        out.push_str(events[1]);
    }
    for e in &events[2..] {
        out.push_str(e);
    }
    out.into_bytes()
}

fn sse_usage(c: &mut Criterion) {
    let anthropic = sse(
        &[
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello there, this is a streamed token. \"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":512}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ],
        400,
    );
    let openai = sse(
        &[
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello there \"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":400,\"total_tokens\":409}}\n\n",
            "data: [DONE]\n\n",
        ],
        400,
    );
    let mut g = c.benchmark_group("sse_usage");
    for (name, format, body) in
        [("anthropic_1KiB_chunks", Format::Anthropic, &anthropic), ("openai_1KiB_chunks", Format::OpenAi, &openai)]
    {
        let mut p = UsageParser::new(format, "text/event-stream");
        for chunk in body.chunks(1024) {
            p.feed(chunk);
        }
        let info = p.finish();
        assert!(info.usage.output_tokens.is_some(), "{name}: usage parsed");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut p = UsageParser::new(format, "text/event-stream");
                for chunk in body.chunks(1024) {
                    p.feed(black_box(chunk));
                }
                black_box(p.finish())
            })
        });
    }
    // A whole JSON answer, as a budget settles it: buffered, parsed once for model and usage.
    let answers: [(&str, Format, &[u8]); 2] = [
        (
            "anthropic_json_answer",
            Format::Anthropic,
            br#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"- ext_proc gains a new processing mode\n- HTTP/3 upstreams are stable\n- Many fixes"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":27,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":31,"service_tier":"standard"}}"#,
        ),
        (
            "openai_json_answer",
            Format::OpenAi,
            br#"{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion","created":1741570283,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, how may I assist you today?","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_fc9f1d7035"}"#,
        ),
    ];
    for (name, format, body) in answers {
        let mut p = UsageParser::new(format, "application/json");
        p.feed(body);
        assert!(p.finish().usage.output_tokens.is_some(), "{name}: usage parsed");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut p = UsageParser::new(format, "application/json");
                p.feed(black_box(body));
                black_box(p.finish().usage.output_tokens)
            })
        });
    }
    g.finish();
}

fn sigv4(c: &mut Criterion) {
    use keyswap::inject::sigv4::{Request, Signer};
    let signer =
        Signer::new("AKIAEXAMPLEKEYID", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None, None, None, "fp".into());
    let body = vec![b'x'; 4096];
    let headers = [("content-type", "application/json")];
    let req = Request {
        method: "POST",
        host: "bedrock-runtime.us-east-1.amazonaws.com",
        path: "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse",
        headers: &headers,
        body: &body,
    };
    let now = SystemTime::now();
    let mut g = c.benchmark_group("sigv4");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("sign_4KiB_body", |b| b.iter(|| black_box(signer.sign(black_box(&req), now).unwrap())));
    g.finish();
}

fn span(c: &mut Criterion) {
    use keyswap::telemetry::otlp::Envelope;
    use keyswap::telemetry::span::{Start, Transaction};
    let headers = agent_headers();
    let pairs: Vec<(&str, &[u8])> = headers.iter().map(|h| (h.key.as_str(), h.raw_value.as_slice())).collect();
    let response: [(&str, &[u8]); 8] = [
        (":status", b"200"),
        ("content-type", b"application/json"),
        ("date", b"Mon, 23 Nov 2026 17:00:00 GMT"),
        ("request-id", b"req_011CQ7y5ZbqM5m3eJ2WcS5aB"),
        ("anthropic-organization-id", b"5f9c2a8e-3c0b-4c4e-9d0e-6a8a3d2b1f00"),
        ("content-length", b"412"),
        ("server", b"envoy"),
        ("x-envoy-upstream-service-time", b"3"),
    ];
    let policy = Arc::new(capture::CapturePolicy { read_bodies: false, ..capture::CapturePolicy::default() });
    let start = Start {
        provider: keyswap::provider::lookup("anthropic"),
        route: Some("default/zz-anthropic"),
        policy: Some("default/custom"),
        method: "POST",
        scheme: "https",
        authority: "api.anthropic.com",
        host: "api.anthropic.com",
        redacted_path: "/v1/messages",
        request_model: None,
        injected: true,
        smuggled: true,
        redact_also: None,
        error: None,
        identity: None,
        tenant_label: None,
        root_trace_id: keyswap::telemetry::span::random_trace_id(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let sink = Sink::new(Arc::default(), Some(tx));
    let envelope = Envelope::new("keyswap");
    c.bench_function("span/header_only_start_finish_encode", |b| {
        b.iter(|| {
            let (mut t, traceparent) = Transaction::start(black_box(&start), black_box(&pairs), &policy);
            t.on_response_headers(black_box(&response));
            t.finish(&sink, &[]);
            let encoded = rx.try_recv().unwrap();
            black_box((traceparent, envelope.request(std::slice::from_ref(&encoded))))
        })
    });

    // A JSON call with bodies read (usage, 64 KiB capture, the prompt and completion as content
    // attributes): what `finish` costs is work the last answer no longer waits for (the stream
    // encodes the span when Envoy closes it).
    let bodies = Arc::new(capture::CapturePolicy::default());
    let request_body = br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Summarise the release notes of Envoy 1.40 in three bullet points."}]}"#;
    let response_body = br#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"- ext_proc gains a new processing mode\n- HTTP/3 upstreams are stable\n- Many fixes"}],"stop_reason":"end_turn","usage":{"input_tokens":27,"output_tokens":31}}"#;
    let record = |policy: &Arc<capture::CapturePolicy>| {
        let (mut t, _) = Transaction::start(&start, &pairs, policy);
        t.on_request_body(request_body);
        t.on_response_headers(&response);
        t.on_response_body(response_body);
        t
    };
    let mut g = c.benchmark_group("span");
    g.bench_function("json_bodies_start_and_record", |b| b.iter(|| black_box(record(black_box(&bodies)))));
    g.bench_function("json_bodies_finish_encode", |b| {
        b.iter_batched(
            || record(&bodies),
            |t| {
                t.finish(&sink, &[]);
                black_box(rx.try_recv().unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn agent_auth(c: &mut Criterion) {
    use base64::Engine as _;
    use keyswap::auth::{self, jwt, Admission, Chain, Identity, Peer, TenantCounters, Validator};
    use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = format!(
        r#"{{"keys": [{{"kty": "EC", "crv": "P-256", "kid": "e1", "x": "{}", "y": "{}"}}]}}"#,
        b64(&point[1..33]),
        b64(&point[33..65])
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks).unwrap();
    let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let claims =
        serde_json::json!({"iss": "https://idp", "aud": "keyswap", "sub": "agent-1", "org": "acme", "exp": exp});
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("e1".into());
    let es256 =
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref())).unwrap();
    let secret = b"an-hs256-secret-of-at-least-32-bytes-0001";
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap();
    let identity = |agent: &str| Identity {
        agent: agent.into(),
        tenant: Some("acme".into()),
        validator: "apiKeys".into(),
        role: None,
        labels: Vec::new(),
    };
    let mut keys = std::collections::HashMap::new();
    for i in 0..1000 {
        let key = auth::ApiKey { identity: identity(&format!("agent-{i}")), expires: None, secret: Key::new("d", "t") };
        keys.insert(auth::token_digest(format!("ksa_token_{i:04}").as_bytes()), key);
    }
    let jwt = |name: &str, jwks, hs256| {
        Validator::Jwt(Box::new(jwt::JwtValidator {
            name: name.into(),
            jwks,
            hs256,
            validation: jwt::JwtValidator::validation("https://idp", &["keyswap".to_owned()], 30),
            claims: jwt::ClaimMapping { subject: "sub".into(), tenant: Some("org".into()), role: None },
            cache: Default::default(),
        }))
    };
    let source = jwt::Source::File(path);
    let chain = Chain {
        optional: false,
        validators: vec![
            Validator::ApiKeys { name: "apiKeys".into(), keys },
            jwt("es", Some(jwt::Jwks::for_source(source, Duration::from_secs(300)).0), None),
            jwt("hs", None, Some(jsonwebtoken::DecodingKey::from_secret(secret))),
        ],
        counters: TenantCounters::new(&[]),
        scopes: Vec::new(),
        edge_headers: Vec::new(),
    };
    let peer = Peer::default();
    let mut g = c.benchmark_group("agent_auth");
    for (name, token) in
        [("api_key_1000_agents", "ksa_token_0500".to_owned()), ("jwt_es256", es256), ("jwt_hs256", hs256)]
    {
        assert!(
            matches!(chain.admit(Some(token.as_bytes()), &peer, |_| None, SystemTime::now()), Admission::Admitted(_)),
            "{name}"
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                matches!(
                    chain.admit(Some(black_box(token.as_bytes())), &peer, |_| None, SystemTime::now()),
                    Admission::Admitted(_)
                )
            })
        });
    }
    g.finish();
}

/// A budgeted request's own cost in the in-process store: reading the body's model and output
/// limit, reserving one claim, settling it.
fn budget(c: &mut Criterion) {
    use keyswap::api::BudgetWindow;
    use keyswap::budget::{Admit, Answered, Budget, Demand, Engine, KeyBy, Observed, Reserve};
    let engine = Arc::new(Engine::new(Default::default()));
    let budget = Arc::new(Budget {
        name: "default/bench".into(),
        key: KeyBy::Tenant,
        window: BudgetWindow::Day,
        limits: [None, None, None, Some(u64::MAX / 8)],
        concurrent: None,
        weights: Vec::new(),
        default_output_tokens: 4096,
        bytes_per_input_token: 1,
        referenced_input_tokens: 16_384,
        fail_closed: false,
        refuse_unmetered: true,
        invalid: None,
        metrics: Default::default(),
    });
    let body = br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Say hello in five words."}]}"#;
    let mut g = c.benchmark_group("budget");
    g.bench_function("demand_from_body", |b| b.iter(|| black_box(Demand::from_body(black_box(body), None))));
    g.bench_function("reserve_and_settle_in_process", |b| {
        b.iter(|| {
            let now = SystemTime::now();
            let demand = Demand::from_body(body, None);
            let claim = budget.claim("acme".into(), &demand, now);
            match engine.reserve(None, vec![claim], now) {
                Reserve::Now(Admit::Held(h, _)) => h.settle(Observed::Ended {
                    answered: Answered::Success,
                    input: Some(12),
                    output: Some(9),
                    events: 0,
                }),
                _ => panic!("admitted"),
            }
        })
    });
    // A request's place among its key's requests in flight (`limits.concurrentRequests`), taken
    // at its headers and given back when it ends.
    let in_flight = [Arc::new(Budget { name: "default/per-agent".into(), concurrent: Some(64), ..(*budget).clone() })];
    let keys: [Arc<str>; 1] = ["acme".into()];
    g.bench_function("enter_and_leave_in_flight", |b| {
        b.iter(|| drop(black_box(engine.enter(black_box(&in_flight), &keys).expect("a place"))))
    });
    g.finish();
}

/// What the request path records in metrics (counters, the phase histogram, a tenant's
/// admission, a budget's counters, a finished call's GenAI histograms); `tests/alloc_free.rs`
/// checks none of it allocates.
fn metrics(c: &mut Criterion) {
    use keyswap::telemetry::{genai::Observation, Metrics, Phase};
    let m = Metrics::default();
    let budget = m.budgets.of(&Arc::from("default/daily"));
    let call = Observation {
        provider: "anthropic",
        operation: "chat",
        model: "claude-sonnet-4-5",
        answered: true,
        tenant: "",
        error: 0,
        tokens: (Some(12), Some(700)),
        duration_s: 0.4,
        first_chunk_s: Some(0.05),
    };
    m.genai.record(&call);
    let mut g = c.benchmark_group("metrics");
    g.bench_function("request_counters_and_phase", |b| {
        b.iter(|| {
            Metrics::inc(&m.requests);
            Metrics::inc(&m.injections);
            m.observe(Phase::RequestHeaders, black_box(Duration::from_micros(20)));
            Metrics::inc(&budget.admitted);
            Metrics::add(&budget.reserved_tokens, 4096);
        })
    });
    g.bench_function("genai_call_known_labels", |b| b.iter(|| m.genai.record(black_box(&call))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = route_match, request_headers, header_mutation, redaction, sse_usage, sigv4, span, agent_auth, budget, metrics
}
criterion_main!(benches);
