//! Telemetry end to end: real Envoy, keyswap as a process exporting OTLP/gRPC to an in-process
//! collector, fake providers answering JSON and SSE with usage.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::otlp::{self, Receiver};
use common::*;
use http_body_util::BodyExt as _;

const MAX_BYTES: usize = 200;

/// The standard configuration plus tracing settings and a Bedrock route.
fn telemetry_config() -> tempfile::TempDir {
    let dir = config_dir();
    let text = standard_config().replace(
        "  defaultPolicy: deny-all\n",
        &format!("  defaultPolicy: deny-all\n  otlp:\n    captureBody: {{maxBytes: {MAX_BYTES}}}\n"),
    );
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    std::fs::write(
        dir.path().join("bedrock.yaml"),
        format!(
            "apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: bedrock}}\nspec:\n  parentRefs: [{{name: egress}}]\n  rules: [{{matches: [{{provider: bedrock}}]}}]\n---\n\
             apiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {{name: bedrock-key}}\nspec:\n  parentRefs: [{{name: bedrock}}]\n  secretRef: {{name: bedrock}}\n  target: Header\n---\n{}",
            secret_manifest("bedrock", "token", BEDROCK_KEY)
        ),
    )
    .unwrap();
    // SigV4 on a host pattern that names no region, and a policy that sets none: unsignable.
    std::fs::write(
        dir.path().join("bedrock-anywhere.yaml"),
        "apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {name: bedrock-anywhere}\nspec:\n  parentRefs: [{name: egress}]\n  rules: [{matches: [{provider: bedrock, hosts: [\"*.bedrock.test\"]}]}]\n---\n\
         apiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {name: bedrock-sigv4}\nspec:\n  parentRefs: [{name: bedrock-anywhere}]\n  secretRef: {name: aws}\n  target: ProviderAuth\n  providerAuth: {type: AWSv4}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {name: aws}\nstringData: {AWS_ACCESS_KEY_ID: AKIDEXAMPLE, AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("azure.yaml"),
        format!(
            "apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: azure}}\nspec:\n  parentRefs: [{{name: egress}}]\n  rules: [{{matches: [{{provider: azure-openai}}]}}]\n---\n\
             apiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {{name: azure-key}}\nspec:\n  parentRefs: [{{name: azure}}]\n  secretRef: {{name: azure}}\n  target: Header\n---\n{}",
            secret_manifest("azure", "token", AZURE_KEY)
        ),
    )
    .unwrap();
    dir
}

/// keyswap traced to a gRPC collector (`otel_env` plus `extra`), behind Envoy in front of a fake
/// provider; everything lives as long as the value.
struct Traced {
    collector: Receiver,
    keyswap: Proc,
    port: u16,
    /// keyswap's admin port (`/metrics`).
    metrics_port: u16,
    fake: FakeProvider,
    _envoy: Proc,
    _config: tempfile::TempDir,
    _work: tempfile::TempDir,
}

impl Traced {
    /// `gzip`: the collector accepts gzip; `observed`: Envoy's observing filter reads the bodies.
    async fn start(extra: &[(&str, &str)], gzip: bool, observed: bool) -> Traced {
        let (collector, collector_addr) = Receiver::start_with(gzip).await;
        let config = telemetry_config();
        let work = tempfile::tempdir().unwrap();
        let fake = FakeProvider::start().await;
        let mut env = otel_env(&format!("http://{collector_addr}"));
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let metrics_port = free_port();
        let metrics = format!("127.0.0.1:{metrics_port}");
        let (keyswap, uds) = start_keyswap(config.path(), work.path(), &env, &["--metrics", &metrics]);
        let (envoy, port) = start_envoy_as_generated(config.path(), &env, observed, work.path(), &uds, fake.addr);
        Traced { collector, keyswap, port, metrics_port, fake, _envoy: envoy, _config: config, _work: work }
    }
}

fn otel_env(collector: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.to_owned()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
        ("OTEL_SERVICE_NAME", "keyswap-test".to_owned()),
    ]
}

struct Case {
    host: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: &'static str,
    name: &'static str,
    provider: &'static str,
    response_model: Option<&'static str>,
    tokens: (i64, i64),
}

fn cases() -> Vec<Case> {
    let ph = PLACEHOLDER.to_owned();
    let anthropic = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;
    let anthropic_stream =
        r#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let openai = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let openai_stream = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let gemini = r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#;
    vec![
        Case {
            host: "api.anthropic.com",
            path: "/v1/messages",
            headers: vec![("x-api-key", ph.clone())],
            body: anthropic,
            name: "chat claude-sonnet-4-5",
            provider: "anthropic",
            response_model: Some("claude-sonnet-4-5"),
            tokens: (12, 7),
        },
        Case {
            host: "api.anthropic.com",
            path: "/v1/messages",
            headers: vec![("authorization", format!("Bearer {PLACEHOLDER}"))],
            body: anthropic_stream,
            name: "chat claude-sonnet-4-5",
            provider: "anthropic",
            response_model: Some("claude-sonnet-4-5"),
            tokens: (12, 7),
        },
        Case {
            host: "api.openai.com",
            path: "/v1/chat/completions",
            headers: vec![("authorization", format!("Bearer {PLACEHOLDER}"))],
            body: openai,
            name: "chat gpt-4o-mini",
            provider: "openai",
            response_model: Some("gpt-4o-mini"),
            tokens: (12, 7),
        },
        Case {
            host: "api.openai.com",
            path: "/v1/chat/completions",
            headers: vec![("authorization", format!("Bearer {PLACEHOLDER}"))],
            body: openai_stream,
            name: "chat gpt-4o-mini",
            provider: "openai",
            response_model: Some("gpt-4o-mini"),
            tokens: (12, 7),
        },
        Case {
            host: "generativelanguage.googleapis.com",
            path: "/v1beta/models/gemini-2.0-flash:generateContent?key=keyswap-injected-by-proxy",
            headers: vec![],
            body: gemini,
            name: "generate_content gemini-2.0-flash",
            provider: "gcp.gen_ai",
            response_model: Some("gemini-2.0-flash"),
            tokens: (12, 7),
        },
        Case {
            host: "generativelanguage.googleapis.com",
            path: "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=keyswap-injected-by-proxy",
            headers: vec![],
            body: gemini,
            name: "generate_content gemini-2.0-flash",
            provider: "gcp.gen_ai",
            response_model: Some("gemini-2.0-flash"),
            tokens: (12, 7),
        },
        Case {
            host: "bedrock-runtime.us-east-1.amazonaws.com",
            path: "/model/anthropic.claude-3-haiku-20240307-v1:0/converse",
            headers: vec![("authorization", format!("Bearer {PLACEHOLDER}"))],
            body: r#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#,
            name: "chat anthropic.claude-3-haiku-20240307-v1:0",
            provider: "aws.bedrock",
            response_model: None,
            tokens: (12, 7),
        },
    ]
}

fn secrets() -> Vec<String> {
    let mut v: Vec<String> = [ANTHROPIC_KEY, OPENAI_KEY, GEMINI_KEY, CUSTOM_KEY, BEDROCK_KEY, AZURE_KEY]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push("AIza%2BREAL%2F0003%3Ddo%20not%20leak".into());
    let b64: Vec<String> = v.iter().map(|s| b64(s.as_bytes())).collect();
    v.extend(b64);
    v.push("do-not-leak".into());
    v
}

fn decode_body(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(otlp::s(attrs, "body.base64").unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_json_and_sse_yields_a_complete_redacted_span() {
    let (collector, collector_addr) = Receiver::start().await;
    let config = telemetry_config();
    let work = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start().await;
    let metrics_port = free_port();
    let env = otel_env(&format!("http://{collector_addr}"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let metrics_arg = format!("127.0.0.1:{metrics_port}");
    let (keyswap, uds) = start_keyswap(config.path(), work.path(), &env, &["--metrics", &metrics_arg]);
    let (_envoy, port) = start_envoy_observed(work.path(), &uds, fake.addr);
    let c = client();
    let (_, before) = scrape(metrics_port, "/metrics").await;

    // One request per case, each with its own agent trace context.
    let mut parents = Vec::new();
    for (i, case) in cases().iter().enumerate() {
        let trace = format!("{:032x}", 0xabc000 + i);
        let parent = format!("{:016x}", 0xdef000 + i);
        let mut headers: Vec<(&str, &str)> = case.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let tp = format!("00-{trace}-{parent}-01");
        headers.push(("traceparent", &tp));
        let (st, body) = send_body(&c, port, case.host, case.path, &headers, case.body).await;
        assert_eq!(st, 200, "{}: {body}\n{}", case.name, keyswap.output());
        assert!(body.contains("Hello from") || body.contains("the fake provider"), "{body}");
        parents.push((trace, parent));
    }
    // The provider echoes the key it got: telemetry must scrub it.
    let (st, body) = send_body(&c, port, "llm.internal.test", "/echo", &[("x-internal-key", PLACEHOLDER)], "{}").await;
    assert_eq!(st, 200);
    let sent = fake.sent.lock().unwrap().last().cloned().unwrap_or_default();
    assert!(String::from_utf8_lossy(&sent).contains(CUSTOM_KEY), "the fake really echoed the key");
    // A custom upstream's response bodies are scrubbed toward the agent by default.
    assert!(!body.contains(CUSTOM_KEY) && body.contains("[redacted]"), "the agent got the echoed key: {body}");
    // A denial gets a span too, with error.type.
    let (st, _) = send(&c, port, "exfil.example.com", "/upload?key=agent-secret-in-query&x=1", &[]).await;
    assert_eq!(st, 403);

    let n = cases().len() + 2;
    let spans = collector.wait_for(n).await;
    assert_eq!(
        spans.len(),
        n,
        "spans: {:#?}\nkeyswap:\n{}",
        spans.iter().map(|s| &s.1.name).collect::<Vec<_>>(),
        keyswap.output()
    );
    let by_trace: HashMap<String, &opentelemetry_proto::tonic::trace::v1::Span> =
        spans.iter().map(|(_, s)| (otlp::hex(&s.trace_id), s)).collect();
    assert!(spans.iter().all(|(svc, _)| svc == "keyswap-test"), "service.name from OTEL_SERVICE_NAME");
    let seen = fake.seen();
    let sent = fake.sent.lock().unwrap().clone();

    for (i, case) in cases().iter().enumerate() {
        let (trace, parent) = &parents[i];
        let span = by_trace.get(trace).unwrap_or_else(|| panic!("{}: no span in trace {trace}", case.name));
        let a = &span.attributes;
        assert_eq!(span.name, case.name);
        assert_eq!(span.kind, 3, "{}: kind CLIENT", case.name);
        assert_eq!(otlp::hex(&span.parent_span_id), *parent, "{}: parented on the agent's span", case.name);
        // The upstream got a traceparent continuing the agent's trace from keyswap's span.
        let up = &seen[i];
        let forwarded = up.header_str("traceparent").expect("traceparent forwarded");
        assert_eq!(forwarded, format!("00-{trace}-{}-01", otlp::hex(&span.span_id)), "{}", case.name);
        assert_eq!(otlp::s(a, "gen_ai.provider.name").as_deref(), Some(case.provider));
        assert_eq!(otlp::s(a, "gen_ai.system").as_deref(), Some(case.provider));
        assert!(otlp::s(a, "gen_ai.operation.name").is_some());
        assert_eq!(otlp::s(a, "gen_ai.response.model").as_deref(), case.response_model, "{}", case.name);
        assert_eq!(otlp::i(a, "gen_ai.usage.input_tokens"), Some(case.tokens.0), "{}", case.name);
        assert_eq!(otlp::i(a, "gen_ai.usage.output_tokens"), Some(case.tokens.1), "{}", case.name);
        assert_eq!(otlp::i(a, "http.response.status_code"), Some(200));
        assert_eq!(otlp::s(a, "http.request.method").as_deref(), Some("POST"));
        assert_eq!(otlp::s(a, "server.address").as_deref(), Some(case.host));
        assert_eq!(otlp::b(a, "keyswap.credential.injected"), Some(true));
        assert_eq!(otlp::b(a, "keyswap.smuggle.detected"), Some(false));
        assert!(otlp::s(a, "keyswap.route").is_some() && otlp::s(a, "keyswap.policy").is_some());
        let url = otlp::s(a, "url.full").unwrap();
        assert!(
            url.starts_with(&format!("http://{}", case.host)) || url.starts_with(&format!("https://{}", case.host)),
            "{url}"
        );
        if case.path.contains("key=") {
            assert!(url.contains("key=[redacted]") && !url.contains(PLACEHOLDER), "{url}");
        }
        // Header events: credentials redacted, other headers kept as arrays.
        let req_headers = span.events.iter().find(|e| e.name == "http.request.headers").expect("request headers event");
        for (k, _) in &case.headers {
            assert_eq!(
                otlp::list(&req_headers.attributes, &format!("http.request.header.{k}")),
                Some(vec!["[redacted]".to_owned()]),
                "{}",
                case.name
            );
        }
        assert_eq!(
            otlp::list(&req_headers.attributes, "http.request.header.content-type"),
            Some(vec!["application/json".to_owned()])
        );
        assert!(span.events.iter().any(|e| e.name == "http.response.headers"));
        // Bodies: the first MAX_BYTES, base64, truncated flag and original length.
        let req_body = span.events.iter().find(|e| e.name == "http.request.body").expect("request body event");
        assert_eq!(decode_body(&req_body.attributes), case.body.as_bytes()[..case.body.len().min(MAX_BYTES)].to_vec());
        assert_eq!(otlp::b(&req_body.attributes, "body.truncated"), Some(case.body.len() > MAX_BYTES));
        let resp_body = span.events.iter().find(|e| e.name == "http.response.body").expect("response body event");
        let original = &sent[i];
        assert_eq!(
            decode_body(&resp_body.attributes),
            original[..original.len().min(MAX_BYTES)].to_vec(),
            "{}",
            case.name
        );
        assert_eq!(otlp::b(&resp_body.attributes, "body.truncated"), Some(original.len() > MAX_BYTES));
        assert_eq!(otlp::i(&resp_body.attributes, "body.original_length"), Some(original.len() as i64));
    }
    let echo = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| otlp::s(&s.attributes, "server.address").as_deref() == Some("llm.internal.test"))
        .unwrap();
    let echoed = echo.events.iter().find(|e| e.name == "http.response.body").unwrap();
    let text = String::from_utf8(decode_body(&echoed.attributes)).unwrap();
    assert!(text.contains(r#""you_sent":"[redacted]""#), "{text}");
    let denied = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| otlp::s(&s.attributes, "server.address").as_deref() == Some("exfil.example.com"))
        .unwrap();
    assert_eq!(otlp::s(&denied.attributes, "error.type").as_deref(), Some("no_route"));
    assert_eq!(denied.name, "POST exfil.example.com");
    // A refusal that matched no route still redacts the credential parameters in its URL.
    let url = otlp::s(&denied.attributes, "url.full").unwrap_or_default();
    assert!(url.ends_with("/upload?key=[redacted]&x=1"), "{url}");
    // Readable in a viewer: keyswap's own status, no placeholder route, no body event for a body
    // that was never read.
    assert_eq!(otlp::i(&denied.attributes, "http.response.status_code"), Some(403));
    assert_eq!(otlp::s(&denied.attributes, "keyswap.route"), None);
    let events: Vec<&str> = denied.events.iter().map(|e| e.name.as_str()).collect();
    assert!(!events.iter().any(|e| e.contains("body")), "a denial claims a body: {events:?}");

    // Metrics moved as expected. (The exporter counts a batch once the collector has answered.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let (st, text) = scrape(metrics_port, "/metrics").await;
        assert_eq!(st, 200);
        if metric(&text, "keyswap_spans_exported_total") >= n as f64 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let delta = |sample: &str| metric(&after, sample) - metric(&before, sample);
    assert_eq!(delta("keyswap_requests_total"), (cases().len() + 2) as f64, "{after}");
    assert_eq!(keyswap::prom::lint(&after), Vec::<String>::new(), "{after}");
    assert_eq!(delta("keyswap_injections_total"), (cases().len() + 1) as f64);
    assert_eq!(delta("keyswap_denials_total{reason=\"no_route\"}"), 1.0);
    // The GenAI conventions' histograms: two anthropic calls (JSON and SSE) of 7 output tokens.
    let labels =
        "gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"anthropic\",gen_ai_request_model=\"claude-sonnet-4-5\"";
    let sample =
        |s: &str| metric(&after, &format!("gen_ai_client_token_usage_{s}{{{labels},gen_ai_token_type=\"output\"}}"));
    assert_eq!((sample("sum"), sample("count")), (14.0, 2.0), "{after}");
    let le16 = format!("gen_ai_client_token_usage_bucket{{{labels},gen_ai_token_type=\"output\",le=\"16\"}}");
    assert_eq!(metric(&after, &le16), 2.0, "the conventions' buckets: 7 tokens fall under 16");
    assert!(metric(&after, &format!("gen_ai_client_operation_duration_seconds_count{{{labels}}}")) >= 2.0, "{after}");
    assert!(
        metric(&after, &format!("gen_ai_client_operation_time_to_first_chunk_seconds_count{{{labels}}}")) >= 1.0,
        "{after}"
    );
    // Every response body was read off the request path, by the observing filter, except the
    // custom upstream's: keyswap rewrites that one (scrubbed toward the agent), so it waits.
    assert_eq!(
        metric(&after, "keyswap_extproc_phase_duration_seconds_count{phase=\"response_body\"}"),
        1.0,
        "a body only telemetry reads was answered on the deciding stream"
    );
    assert!(delta("keyswap_observed_responses_total{outcome=\"ended\"}") >= cases().len() as f64, "{after}");
    assert!(metric(&after, "keyswap_spans_exported_total") >= n as f64);
    let (st, ready) = scrape(metrics_port, "/readyz").await;
    assert_eq!(st, 200, "{ready}");
    assert_eq!(scrape(metrics_port, "/healthz").await.0, 200);

    // Not one secret, in any form, in the exports or the logs.
    let exports = String::from_utf8_lossy(&collector.raw_bytes()).into_owned();
    let logs = keyswap.output();
    for s in secrets() {
        assert!(!exports.contains(&s), "OTLP export contains `{s}`");
        assert!(!logs.contains(&s), "logs contain `{s}`");
    }
}

/// The observing filter only watches: a JSON answer whose body keyswap reads off the path keeps
/// its `content-length` (Envoy drops it for a streamed body mode unless the filter also observes
/// the headers), and its body, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_observing_filter_leaves_the_agents_response_framing_as_the_provider_sent_it() {
    let Traced { collector, keyswap, port, .. } = &Traced::start(&[], false, true).await;
    let port = *port;
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}/v1/messages"))
        .header("host", "api.anthropic.com")
        .header("x-api-key", PLACEHOLDER)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(br#"{"model":"claude-sonnet-4-5"}"#)))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let length = resp.headers().get("content-length").map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
    assert!(resp.headers().get("transfer-encoding").is_none(), "{:?}", resp.headers());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(length, Some(body.len()), "the provider's content-length was dropped");
    let spans = collector.wait_for(1).await;
    assert_eq!(otlp::i(&spans[0].1.attributes, "gen_ai.usage.output_tokens"), Some(7), "{}", keyswap.output());
}

/// A streamed Anthropic call through the gateway to the fake's `/slow-stream`, which sends its
/// first event and holds the rest until `fake.release`: the body once that first event arrived.
async fn slow_stream_started(port: u16) -> hyper::body::Incoming {
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}/slow-stream"))
        .header("host", "api.anthropic.com")
        .header("x-api-key", PLACEHOLDER)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(br#"{"model":"claude-sonnet-4-5","stream":true}"#)))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event arrived while the provider held the rest")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("message_start"), "{first:?}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_sse_event_arrives_while_the_provider_holds_back_the_rest() {
    let Traced { collector, port, fake, .. } = &Traced::start(&[], false, false).await;
    let body = slow_stream_started(*port).await;
    fake.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains("message_stop"));
    let spans = collector.wait_for(1).await;
    assert_eq!(
        otlp::i(&spans[0].1.attributes, "gen_ai.usage.output_tokens"),
        Some(7),
        "usage read from the streamed body"
    );
}

/// SIGTERM while a streamed answer is still coming (a rolling restart): keyswap lets the stream
/// finish, and the span that ends with it and the metrics' final totals reach the collector
/// before the process exits (the metrics' interval is an hour: only the last push can carry them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_still_exports_its_span_and_the_final_metrics() {
    let extra = [("OTEL_METRICS_EXPORTER", "otlp"), ("OTEL_METRIC_EXPORT_INTERVAL", "3600000")];
    let mut t = Traced::start(&extra, false, false).await;
    let body = slow_stream_started(t.port).await;
    assert!(t.collector.spans().is_empty(), "no span before the stream ends");

    let pid = t.keyswap.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // keyswap drains: the stream goes on to its end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.fake.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains("message_stop"));
    let status = tokio::task::block_in_place(|| t.keyswap.terminate());
    let log = t.keyswap.output();
    assert!(status.success(), "{status}\n{log}");

    let spans = t.collector.spans();
    assert_eq!(spans.len(), 1, "the stream's span was exported before exit:\n{log}");
    assert_eq!(otlp::i(&spans[0].1.attributes, "gen_ai.usage.output_tokens"), Some(7), "with its usage");
    let metrics = t.collector.metrics.lock().unwrap().clone();
    assert_eq!(metrics.len(), 1, "one push, at shutdown:\n{log}");
    let pushed = &metrics[0].resource_metrics[0].scope_metrics[0].metrics;
    assert!(pushed.iter().any(|m| m.name == "gen_ai.client.token.usage"), "the call is in the final totals");
    assert!(log.contains("OTLP spans flushed") && log.contains("OTLP metrics flushed"), "{log}");
}

/// The batch span processor's variables: `OTEL_BSP_SCHEDULE_DELAY` of a minute holds the spans
/// until the shutdown flush, which sends them in batches of `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_bsp_variables_set_the_schedule_and_the_batch_size() {
    let extra = [("OTEL_BSP_SCHEDULE_DELAY", "60000"), ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")];
    let mut t = Traced::start(&extra, false, false).await;
    let c = client();
    // The first round comes at once: spans finished later wait for the next, a minute away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        let (st, _) = send(&c, t.port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]).await;
        assert_eq!(st, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(t.collector.spans().is_empty(), "exported before the schedule's next round");
    let status = tokio::task::block_in_place(|| t.keyswap.terminate());
    let log = t.keyswap.output();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("batch: 2"), "the log shows the batching in force:\n{log}");
    let sizes: Vec<usize> = t
        .collector
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.resource_spans.iter().flat_map(|rs| &rs.scope_spans).map(|ss| ss.spans.len()).sum())
        .collect();
    assert_eq!(sizes, [2, 2, 1], "five spans in batches of two, at shutdown:\n{log}");
}

/// The attack: thousands of idle connections to keyswap's admin port (`/metrics`, reachable
/// from scrapers' namespaces, or a local process in `keyswap dev`). Each held a file descriptor
/// and a task of the process every decision depends on, for as long as the peer liked: enough of
/// them and keyswap could open nothing else (tunnels' DNS, Redis, reloads), or ran out of memory.
/// A peer now holds a few at once, each only as long as its headers take (5 s); the kubelet's
/// probes (another address) and the agents' requests are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_the_admin_port_cannot_starve_keyswap() {
    let t = Traced::start(&[], false, false).await;
    let pid = t.keyswap.child.id();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let before = fds();
    let mut held = Vec::new();
    for _ in 0..2000 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        held.push(socket.connect(([127, 0, 0, 1], t.metrics_port).into()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = fds();
    assert!(
        during < before + 64,
        "keyswap holds {during} descriptors with 2,000 idle admin connections ({before} before)"
    );
    assert_eq!(scrape(t.metrics_port, "/healthz").await.0, 200, "the probe from another address");
    let c = client();
    let (st, _) = send(&c, t.port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]).await;
    assert_eq!(st, 200, "an agent's request during the attack");
    // The few admitted are closed once their headers are late.
    let deadline = Instant::now() + Duration::from_secs(12);
    while fds() > before + 2 {
        assert!(Instant::now() < deadline, "idle admin connections kept open: {} descriptors ({before} before)", fds());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
}

/// `OTEL_SDK_DISABLED=true` turns tracing off even where an endpoint is set, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_sdk_disabled_exports_nothing() {
    let extra = [("OTEL_SDK_DISABLED", "true"), ("OTEL_METRICS_EXPORTER", "otlp")];
    let mut t = Traced::start(&extra, false, false).await;
    let c = client();
    let (st, _) = send(&c, t.port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]).await;
    assert_eq!(st, 200, "requests are served as ever");
    let status = tokio::task::block_in_place(|| t.keyswap.terminate());
    let log = t.keyswap.output();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("tracing off (OTEL_SDK_DISABLED=true)"), "{log}");
    assert!(t.collector.spans().is_empty() && t.collector.metrics.lock().unwrap().is_empty(), "{log}");
}

/// Attack: an agent keeps a streamed answer open (the provider holds it back) to stall a rolling
/// restart. keyswap waits for it no longer than its drain timeout (10 s), still flushes what it
/// has, and exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_holding_a_stream_open_cannot_stall_shutdown_past_the_drain_timeout() {
    let mut t = Traced::start(&[], false, false).await;
    let _held = slow_stream_started(t.port).await;
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| t.keyswap.terminate());
    let took = started.elapsed();
    let log = t.keyswap.output();
    assert!(status.success(), "{status}\n{log}");
    assert!(took >= Duration::from_secs(9), "it waited for the stream in flight ({took:?})\n{log}");
    assert!(took < Duration::from_secs(14), "the drain timeout bounds the wait ({took:?})\n{log}");
    // Whichever side gives up first at the deadline (keyswap's drain, or Envoy closing its
    // connection after keyswap's GOAWAY), the flush still runs.
    assert!(log.contains("OTLP spans flushed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_hanging_collector_never_fails_or_slows_requests_and_drops_are_counted() {
    // A collector that accepts connections and never answers, and one that refuses them.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_addr = hanging.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hanging.accept().await {
            held.push(s);
        }
    });
    let refused = format!("http://127.0.0.1:{}", free_port());
    for (label, endpoint, queue) in [("hanging", format!("http://{hanging_addr}"), "2"), ("refused", refused, "4096")] {
        let config = telemetry_config();
        let work = tempfile::tempdir().unwrap();
        let fake = FakeProvider::start().await;
        let metrics_port = free_port();
        let env = otel_env(&endpoint);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let m = format!("127.0.0.1:{metrics_port}");
        let (keyswap, uds) = start_keyswap(config.path(), work.path(), &env, &["--metrics", &m, "--span-queue", queue]);
        let (_envoy, port) = start_envoy(work.path(), &uds, fake.addr);
        let c = client();
        let mut slowest = Duration::ZERO;
        for _ in 0..30 {
            let t = Instant::now();
            let (st, _) = send(&c, port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]).await;
            assert_eq!(st, 200, "{label}: {}", keyswap.output());
            slowest = slowest.max(t.elapsed());
        }
        // Loose bound: the 10 s export timeout must never show up in a request.
        assert!(slowest < Duration::from_secs(2), "{label}: slowest request {slowest:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, text) = scrape(metrics_port, "/metrics").await;
            let dropped = metric(&text, "keyswap_spans_dropped_total{reason=\"queue_full\"}");
            let failed = metric(&text, "keyswap_spans_dropped_total{reason=\"export_failed\"}");
            let counted = if label == "hanging" { dropped >= 20.0 } else { failed >= 1.0 };
            if counted {
                break;
            }
            assert!(Instant::now() < deadline, "{label}: drops not counted:\n{text}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// OTLP over HTTP/protobuf (the standard default), with the endpoint and a collector header from
/// `EgressGateway.spec.otlp`: the collector receives the span and the header; logs show neither
/// the header's value nor any secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_uses_the_gateway_endpoint_and_headers() {
    http_protobuf_export(Collector::Plain).await;
}

/// The same over HTTPS: keyswap verifies the collector against the system roots
/// (`SSL_CERT_FILE` names the test CA here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_over_tls_verifies_the_collector() {
    http_protobuf_export(Collector::SystemRoots).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_trusts_otel_exporter_otlp_certificate() {
    http_protobuf_export(Collector::CertificateVar).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_presents_a_client_certificate_to_a_collector_that_requires_one() {
    http_protobuf_export(Collector::Mutual).await;
}

/// How the test collector is reached: plain HTTP, TLS trusted through `SSL_CERT_FILE`, TLS trusted
/// through `OTEL_EXPORTER_OTLP_CERTIFICATE`, or mutual TLS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Collector {
    Plain,
    SystemRoots,
    CertificateVar,
    Mutual,
}

async fn http_protobuf_export(mode: Collector) {
    let tls = mode != Collector::Plain;
    use prost::Message as _;
    type Received = std::sync::Arc<std::sync::Mutex<Vec<(Option<String>, Vec<u8>)>>>;
    let received: Received = Default::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (acceptor, ca) = if tls {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (ca, leaf, key) = provider_certs(&["localhost"], certs.path());
        let builder = rustls::ServerConfig::builder();
        let builder = if mode == Collector::Mutual {
            // Clients must present a certificate from their own CA (in certs/client).
            let dir = certs.path().join("client");
            std::fs::create_dir(&dir).unwrap();
            let (client_ca, _, _) = provider_certs(&["keyswap"], &dir);
            let mut roots = rustls::RootCertStore::empty();
            let pem = std::fs::read(client_ca).unwrap();
            use rustls::pki_types::pem::PemObject as _;
            for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(std::sync::Arc::new(roots)).build().unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut cfg = builder
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        (Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg))), Some(ca))
    } else {
        (None, None)
    };
    let r = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let r = r.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let r = r.clone();
                    async move {
                        let token = req.headers().get("x-collector-token").map(|v| v.to_str().unwrap().to_owned());
                        let ok = req.uri().path() == "/v1/traces";
                        let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                        if ok {
                            r.lock().unwrap().push((token, body));
                        }
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(if ok { 200 } else { 404 })
                                .header("content-type", "application/x-protobuf")
                                .body(http_body_util::Full::new(bytes::Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match acceptor {
                    Some(a) => match a.accept(stream).await {
                        Ok(tls) => http.serve_connection(hyper_util::rt::TokioIo::new(tls), svc).await,
                        Err(_) => return,
                    },
                    None => http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await,
                };
            });
        }
    });
    let config = telemetry_config();
    let endpoint = if tls { format!("https://localhost:{}", addr.port()) } else { format!("http://{addr}") };
    let text = std::fs::read_to_string(config.path().join("config.yaml")).unwrap().replace(
        "  otlp:\n",
        &format!("  otlp:\n    endpoint: {endpoint}\n    headers: {{x-collector-token: collector-secret-777}}\n"),
    );
    std::fs::write(config.path().join("config.yaml"), text).unwrap();
    let work = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start().await;
    let ca = ca.map(|p| p.display().to_string()).unwrap_or_default();
    let (client_cert, client_key) = (
        certs.path().join("client/provider-leaf.pem").display().to_string(),
        certs.path().join("client/provider-leaf.key").display().to_string(),
    );
    let mut env = vec![("OTEL_SERVICE_NAME", "keyswap-http")];
    match mode {
        Collector::Plain => {}
        Collector::SystemRoots => env.push(("SSL_CERT_FILE", ca.as_str())),
        Collector::CertificateVar => env.push(("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_str())),
        Collector::Mutual => env.extend([
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_str()),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", client_cert.as_str()),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", client_key.as_str()),
        ]),
    }
    let (keyswap, uds) = start_keyswap(config.path(), work.path(), &env, &[]);
    let (_envoy, port) = start_envoy(work.path(), &uds, fake.addr);
    let (st, _) = send(&client(), port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]).await;
    assert_eq!(st, 200, "{}", keyswap.output());
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no HTTP export arrived:\n{}", keyswap.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (token, body) = received.lock().unwrap()[0].clone();
    assert_eq!(token.as_deref(), Some("collector-secret-777"));
    let req = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(&body[..]).unwrap();
    let span = &req.resource_spans[0].scope_spans[0].spans[0];
    assert_eq!(otlp::s(&span.attributes, "gen_ai.provider.name").as_deref(), Some("anthropic"));
    let logs = keyswap.output();
    assert!(logs.contains("tracing on"), "{logs}");
    assert!(!logs.contains("collector-secret-777"), "collector header value logged:\n{logs}");
    assert!(!String::from_utf8_lossy(&body).contains(ANTHROPIC_KEY));
}

/// What [`sampled_spans`] saw.
struct Sampled {
    /// The spans other than the marker's.
    spans: Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>,
    /// The resource attributes of the first export.
    resource: Vec<(String, String)>,
    /// Response body messages keyswap answered on the deciding streams.
    body_messages: f64,
}

/// keyswap with `sampler` env (none: the default), Envoy in front of a fake provider as the
/// generator configures it for that environment, and a collector. Sends `n` anthropic requests,
/// each with `traceparent(i)` if given; returns what was exported once a final marker request
/// (always sampled) arrived.
async fn sampled_spans(sampler: &[(&str, &str)], n: usize, traceparent: impl Fn(usize) -> Option<String>) -> Sampled {
    let Traced { collector, keyswap, port, metrics_port, .. } = &Traced::start(sampler, false, false).await;
    let port = *port;
    let c = client();
    for i in 0..n {
        let tp = traceparent(i);
        let mut headers = vec![("x-api-key", PLACEHOLDER)];
        if let Some(tp) = &tp {
            headers.push(("traceparent", tp));
        }
        let (st, body) = send(&c, port, "api.anthropic.com", "/v1/messages", &headers).await;
        assert_eq!(st, 200, "{body}\n{}", keyswap.output());
    }
    // The marker: a sampled parent whose trace id ends in small bytes, so that every sampler but
    // always_off samples it; spans leave in order, so once it arrives the others have.
    let marker = format!("00-{:032x}-{:016x}-01", 0xfeed, 0xbeef);
    let (st, _) =
        send(&c, port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER), ("traceparent", &marker)])
            .await;
    assert_eq!(st, 200);
    if !sampler.iter().any(|(_, v)| *v == "always_off") {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !collector.spans().iter().any(|(_, s)| otlp::hex(&s.trace_id) == format!("{:032x}", 0xfeed)) {
            assert!(Instant::now() < deadline, "the marker span never arrived:\n{}", keyswap.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        // Nothing can be awaited when nothing is sent: the exporter sends a span within 200 ms of
        // its arrival, so two seconds without one is none.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let resource = collector
        .requests
        .lock()
        .unwrap()
        .first()
        .and_then(|r| r.resource_spans.first()?.resource.clone())
        .map(|r| {
            r.attributes
                .iter()
                .map(|a| (a.key.clone(), otlp::s(std::slice::from_ref(a), &a.key).unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let spans =
        collector.spans().into_iter().filter(|(_, s)| otlp::hex(&s.trace_id) != format!("{:032x}", 0xfeed)).collect();
    let m = scrape(*metrics_port, "/metrics").await.1;
    let body_messages = metric(&m, "keyswap_extproc_phase_duration_seconds_count{phase=\"response_body\"}");
    Sampled { spans, resource, body_messages }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_unsampled_traceparent_gets_no_span_by_default() {
    let tp = |i: usize| Some(format!("00-{:032x}-{:016x}-0{}", 0xa000 + i, 0xb000 + i, i % 2));
    let resource = [("OTEL_RESOURCE_ATTRIBUTES", "openinference.project.name=keyswap-agents,k8s.pod.name=gw-0")];
    let Sampled { spans, resource: attributes, .. } = sampled_spans(&resource, 6, tp).await;
    // OTEL_RESOURCE_ATTRIBUTES reach the collector (Phoenix files spans by the project name).
    for (k, v) in
        [("service.name", "keyswap-test"), ("openinference.project.name", "keyswap-agents"), ("k8s.pod.name", "gw-0")]
    {
        assert!(attributes.contains(&(k.to_string(), v.to_string())), "{k}={v} missing from {attributes:?}");
    }
    let mut traces: Vec<String> = spans.iter().map(|(_, s)| otlp::hex(&s.trace_id)).collect();
    traces.sort();
    // Only the sampled ones (flag 01: odd i).
    let want: Vec<String> = [1, 3, 5].iter().map(|i| format!("{:032x}", 0xa000 + i)).collect();
    assert_eq!(traces, want);
}

/// SigV4 signing fails at the request headers (no body) and at the body (signed whole): both
/// refusals are spans with keyswap's status and the reason, like every other refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_keyswap_cannot_sign_is_a_span_with_its_status_and_reason() {
    let Traced { collector, keyswap, port, fake, .. } = &Traced::start(&[], false, false).await;
    let c = client();
    for method in ["GET", "POST"] {
        let b = hyper::Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{port}/model/m/converse?{method}"))
            .header("host", "runtime.bedrock.test");
        let body = if method == "POST" { hyper::body::Bytes::from_static(b"{}") } else { hyper::body::Bytes::new() };
        let resp = c.request(b.body(http_body_util::Full::new(body)).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let text = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
        assert_eq!(status, 503, "{method}: {text}\n{}", keyswap.output());
        assert!(text.contains("RegionUnknown") && !text.contains("wJalr"), "{text}");
    }
    assert!(fake.seen().is_empty(), "an unsigned request reached the provider");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let spans = collector.spans();
        let refused: Vec<_> = spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| otlp::s(&s.attributes, "keyswap.route").as_deref() == Some("default/bedrock-anywhere"))
            .collect();
        if refused.len() == 2 {
            for s in refused {
                assert_eq!(otlp::i(&s.attributes, "http.response.status_code"), Some(503), "{s:?}");
                assert_eq!(otlp::s(&s.attributes, "error.type").as_deref(), Some("signing_failed"), "{s:?}");
                assert!(!format!("{s:?}").contains("wJalr"));
            }
            break;
        }
        assert!(Instant::now() < deadline, "{} refusal spans of 2: {spans:?}", refused.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_off_exports_nothing() {
    let Sampled { spans, body_messages, .. } =
        sampled_spans(&[("OTEL_TRACES_SAMPLER", "always_off")], 5, |_| None).await;
    assert!(spans.is_empty(), "{} spans with always_off", spans.len());
    assert_eq!(body_messages, 0.0, "no span reads a body, yet Envoy sent response bodies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarter_ratio_exports_about_a_quarter_and_reads_only_their_bodies() {
    let sampler = [("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.25")];
    let Sampled { spans, body_messages, .. } = sampled_spans(&sampler, 200, |_| None).await;
    // Binomial(200, 0.25): mean 50, standard deviation 6.1; this range is ±4 of them.
    assert!((26..=74).contains(&spans.len()), "{} of 200 sampled at 0.25", spans.len());
    // Each exported root's trace id is one the ratio admits (its low 8 bytes under a quarter of
    // 2^64): the id the sampler decided on, so a collector or service sampling by the same ratio
    // keeps the same traces. (It was a second random id: three in four broke the rule.)
    for (_, span) in &spans {
        let low = u64::from_be_bytes(span.trace_id[8..16].try_into().unwrap());
        assert!((low as f64) < 0.25 * u64::MAX as f64, "trace id {:02x?} is not under the ratio", span.trace_id);
    }
    // The sampled ones read their response bodies (usage), asked for per request: the other
    // three quarters cost no body messages (at most two per read response: data, end of stream;
    // the marker is the one more).
    for (_, span) in &spans {
        assert!(otlp::i(&span.attributes, "gen_ai.usage.output_tokens").is_some_and(|t| t > 0), "{span:?}");
    }
    let read = spans.len() as f64 + 1.0;
    assert!(
        (read..=2.0 * read).contains(&body_messages),
        "{body_messages} response body messages for {read} sampled of 201 requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_is_gzipped_when_the_standard_variable_says_so() {
    // A collector that takes gzip gets the span; one that does not refuses the message (tonic:
    // "compressed with gzip, which isn't supported"), which proves keyswap compressed it.
    for accepts_gzip in [true, false] {
        let (collector, collector_addr) = Receiver::start_with(accepts_gzip).await;
        let config = telemetry_config();
        let work = tempfile::tempdir().unwrap();
        let fake = FakeProvider::start().await;
        let mut env = otel_env(&format!("http://{collector_addr}"));
        env.push(("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip".to_owned()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let metrics_port = free_port();
        let m = format!("127.0.0.1:{metrics_port}");
        let (keyswap, uds) = start_keyswap(config.path(), work.path(), &env, &["--metrics", &m]);
        let (_envoy, port) = start_envoy(work.path(), &uds, fake.addr);
        let (st, _) = send(&client(), port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]).await;
        assert_eq!(st, 200);
        if accepts_gzip {
            let spans = collector.wait_for(1).await;
            assert_eq!(spans.len(), 1, "no span through a gzip collector:\n{}", keyswap.output());
        } else {
            let deadline = Instant::now() + Duration::from_secs(10);
            while metric(
                &scrape(metrics_port, "/metrics").await.1,
                "keyswap_spans_dropped_total{reason=\"export_failed\"}",
            ) < 1.0
            {
                assert!(Instant::now() < deadline, "a collector without gzip took the span: not compressed?");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(collector.spans().is_empty());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_the_prompt_and_the_completion_as_text_for_json_and_streams() {
    prompt_and_completion_spans(false, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_the_prompt_and_the_completion_when_the_observing_filter_reads_the_bodies() {
    prompt_and_completion_spans(true, &[]).await;
}

/// Without the observing filter (the default), keyswap reads the bodies on the deciding stream.
/// The agent's headers named like keyswap's gRPC metadata must not make keyswap hand the body to
/// an observing stream that will never come (the span would then lack its completion, and the
/// test would wait for it in vain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_header_posing_as_the_observing_filter_changes_nothing_without_one() {
    let spoof = [("x-keyswap-observed", "1"), ("x-keyswap-role", "observe")];
    prompt_and_completion_spans(false, &spoof).await;
}

/// Sends a JSON and two streamed calls through Envoy (with the observing filter or without it),
/// with `extra` headers, and checks each span carries the prompt and the completion as text.
async fn prompt_and_completion_spans(observer: bool, extra: &[(&str, &str)]) {
    let (collector, collector_addr) = Receiver::start().await;
    // Capture at its default size (this file's other tests cap it at 200 bytes).
    let config = config_dir();
    let text = standard_config().replace("  defaultPolicy: deny-all\n", "  defaultPolicy: deny-all\n  otlp: {}\n");
    std::fs::write(config.path().join("config.yaml"), text).unwrap();
    let work = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start().await;
    let env = otel_env(&format!("http://{collector_addr}"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (keyswap, uds) = start_keyswap(config.path(), work.path(), &env, &[]);
    let envoy_port = free_port();
    let mut cfg = envoy_config_value(envoy_port, &uds, fake.addr);
    if observer {
        cfg = with_observer(cfg);
    }
    let (_envoy, port) = start_envoy_with(work.path(), envoy_port, keyswap::envoy::to_yaml(&cfg));
    let c = client();
    let cases = [
        (
            "api.anthropic.com",
            "/v1/messages",
            r#"{"model":"claude-sonnet-4-5","max_tokens":20,"system":"Be brief.","messages":[{"role":"user","content":"Say hello"}]}"#,
        ),
        (
            "api.anthropic.com",
            "/v1/messages",
            r#"{"model":"claude-sonnet-4-5","max_tokens":20,"stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#,
        ),
        (
            "api.openai.com",
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#,
        ),
    ];
    for (host, path, body) in cases {
        let key = if host.contains("openai") {
            ("authorization", format!("Bearer {PLACEHOLDER}"))
        } else {
            ("x-api-key", PLACEHOLDER.to_owned())
        };
        let mut headers = vec![(key.0, key.1.as_str())];
        headers.extend_from_slice(extra);
        let (st, text) = send_body(&c, port, host, path, &headers, body).await;
        assert_eq!(st, 200, "{text}\n{}", keyswap.output());
    }
    let spans = collector.wait_for(cases.len()).await;
    assert_eq!(spans.len(), cases.len());
    for ((_, span), (host, _, body)) in spans.iter().zip(cases) {
        let a = &span.attributes;
        assert_eq!(otlp::s(a, "input.value").as_deref(), Some(body), "{host}");
        let input: serde_json::Value = serde_json::from_str(&otlp::s(a, "gen_ai.input.messages").unwrap()).unwrap();
        assert!(input.to_string().contains(r#"{"content":"Say hello","type":"text"}"#), "{input}");
        // The completion's text, JSON or reassembled from the stream's events.
        assert_eq!(otlp::s(a, "output.value").as_deref(), Some("Hello from the fake provider"), "{host}: {a:?}");
        let output = otlp::s(a, "gen_ai.output.messages").unwrap();
        assert!(output.contains("Hello from the fake provider"), "{output}");
        assert!(!otlp::s(a, "input.value").unwrap_or_default().contains(ANTHROPIC_KEY));
    }
}

/// `OTEL_METRICS_EXPORTER=otlp`: the registry `/metrics` serves is pushed to the collector too,
/// gzipped like the spans, under OpenTelemetry's names: the GenAI histograms with the conventions'
/// attributes, keyswap's counters as cumulative monotonic sums; no secret in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_pushed_over_otlp_with_the_families_the_scrape_serves() {
    use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point::Value};
    let extra = [
        ("OTEL_METRICS_EXPORTER", "otlp"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ("OTEL_RESOURCE_ATTRIBUTES", "k8s.namespace.name=agents"),
    ];
    let Traced { collector, keyswap, port, .. } = &Traced::start(&extra, true, false).await;
    let port = *port;
    let c = client();
    let (st, body) = send_body(
        &c,
        port,
        "api.anthropic.com",
        "/v1/messages",
        &[("x-api-key", PLACEHOLDER)],
        r#"{"model":"claude-sonnet-4-5"}"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // A push after the call ended carries it (cumulative): wait for one with the token histogram.
    let deadline = Instant::now() + Duration::from_secs(15);
    let export = loop {
        let found = collector
            .metrics
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|r| {
                r.resource_metrics[0].scope_metrics[0].metrics.iter().any(|m| {
                    m.name == "gen_ai.client.token.usage"
                        && matches!(&m.data, Some(Data::Histogram(h)) if !h.data_points.is_empty())
                })
            })
            .cloned();
        if let Some(r) = found {
            break r;
        }
        assert!(Instant::now() < deadline, "no metrics export with token usage in 15 s:\n{}", keyswap.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rm = &export.resource_metrics[0];
    let resource = rm.resource.as_ref().unwrap();
    assert!(resource.attributes.iter().any(|a| a.key == "k8s.namespace.name"), "{resource:?}");
    let metrics = &rm.scope_metrics[0].metrics;
    let find = |n: &str| metrics.iter().find(|m| m.name == n).unwrap_or_else(|| panic!("no {n} in {metrics:#?}"));
    let Some(Data::Sum(requests)) = &find("keyswap.requests").data else { panic!("keyswap.requests is a sum") };
    assert!(requests.is_monotonic);
    assert!(matches!(requests.data_points[0].value, Some(Value::AsInt(n)) if n >= 1), "{requests:?}");
    let usage = find("gen_ai.client.token.usage");
    assert_eq!(usage.unit, "{token}");
    let Some(Data::Histogram(h)) = &usage.data else { panic!("a histogram") };
    let output = h
        .data_points
        .iter()
        .find(|p| p.attributes.iter().any(|a| a.key == "gen_ai.token.type" && format!("{a:?}").contains("output")))
        .expect("an output-tokens point");
    assert_eq!(output.sum, Some(7.0));
    assert!(output.attributes.iter().any(|a| a.key == "gen_ai.request.model"), "{output:?}");
    assert_eq!(find("gen_ai.client.operation.duration").unit, "s");
    let raw = String::from_utf8_lossy(&collector.raw_bytes()).into_owned();
    for s in secrets() {
        assert!(!raw.contains(&s), "a secret in the OTLP exports");
    }
}

/// OTLP/gRPC to an `https` collector signed by a private CA (`OTEL_EXPORTER_OTLP_CERTIFICATE`):
/// tonic's channel over keyswap's rustls connector, ALPN h2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_over_tls_trusts_otel_exporter_otlp_certificate() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = tempfile::tempdir().unwrap();
    let (ca, leaf, key) = provider_certs(&["localhost"], certs.path());
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let (collector, addr) = Receiver::start_tls(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg))).await;
    let config = telemetry_config();
    let work = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start().await;
    let mut env = otel_env(&format!("https://localhost:{}", addr.port()));
    env.push(("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.display().to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (keyswap, uds) = start_keyswap(config.path(), work.path(), &env, &[]);
    let (_envoy, port) = start_envoy(work.path(), &uds, fake.addr);
    let (st, body) = send(&client(), port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]).await;
    assert_eq!(st, 200, "{body}");
    let spans = collector.wait_for(1).await;
    assert_eq!(spans.len(), 1, "no span over gRPC+TLS:\n{}", keyswap.output());
}
