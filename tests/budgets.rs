//! Token budgets through a real Envoy: admission by reservation before the provider, settlement
//! from the usage the provider reports (JSON and SSE), the in-process store and a real Redis
//! (Debian's `redis-server`, started by the tests on loopback) shared by two replicas.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use common::*;

const OPENAI: &str = "api.openai.com";
const ANTHROPIC: &str = "api.anthropic.com";
const REAL_KEY: &str = "sk-real-budget-test-0001-do-not-leak";
const ACME_TOKEN: &str = "acme-agent-token-0001-xxxxxxxxxxxxxxxx";
const GLOBEX_TOKEN: &str = "globex-agent-token-0002-xxxxxxxxxxxxxx";
/// What the metered provider reports as each call's input tokens.
const INPUT_TOKENS: u64 = 10;
/// What a stored conversation (`previous_response_id`) adds to a call's input tokens.
const STORED_CONVERSATION_TOKENS: u64 = 300;

// === a metered provider ===

/// A provider stand-in that reports usage like the real ones: `INPUT_TOKENS` in, and as many
/// tokens out as the request allowed (`max_tokens`, the worst case for a budget), after a delay
/// that keeps concurrent requests in flight together. Tallies every token it served.
#[derive(Clone)]
struct Meter {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    delay: Duration,
    /// `?hold` streams send their first event, then wait here (for abort tests).
    hold: Arc<tokio::sync::Notify>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Meter {
    async fn start(delay: Duration) -> Meter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let m = Meter {
            addr: listener.local_addr().unwrap(),
            served: Arc::default(),
            requests: Arc::default(),
            delay,
            hold: Arc::default(),
            seen: Arc::default(),
        };
        let meter = m.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let meter = meter.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let meter = meter.clone();
                        async move { Ok::<_, Infallible>(meter.handle(req).await) }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        m
    }

    async fn handle(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<FakeBody> {
        let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
        let headers = format!("{:?}", req.headers());
        // Like the real APIs, a JSON answer is gzipped for a client that accepts it.
        let gzip = req.headers().get_all("accept-encoding").iter().any(|v| v.to_str().unwrap_or("").contains("gzip"));
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        self.seen.lock().unwrap().push(format!("{path} {headers} {}", String::from_utf8_lossy(&body)));
        self.requests.fetch_add(1, Ordering::SeqCst);
        // `?status=NNN`: an error without usage, as a provider's (or its edge's: 504 after a long
        // generation).
        if let Some(code) = path.split("status=").nth(1).and_then(|c| c.get(..3)?.parse::<u16>().ok()) {
            let body = http_body_util::BodyExt::boxed(Full::new(Bytes::from("upstream request timeout")));
            return hyper::Response::builder().status(code).header("content-type", "text/plain").body(body).unwrap();
        }
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        // Read the way a lenient provider reads it (the last of repeated keys, `5000.0` and
        // `"5000"` as numbers), generating the limit once per choice (`n`).
        let lax = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.fract() == 0.0).map(|f| f as u64),
            v => v.as_u64().or(v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64)),
        };
        let out =
            lax(&v["max_tokens"]).or(lax(&v["max_completion_tokens"])).or(lax(&v["inferenceConfig"]["maxTokens"]));
        let out = out.unwrap_or(50) * lax(&v["n"]).unwrap_or(1).max(1);
        let model = v["model"].as_str().unwrap_or("m").to_owned();
        let stream = v["stream"].as_bool() == Some(true);
        tokio::time::sleep(self.delay).await;
        // A stored conversation the request continues counts as input it did not carry.
        let stored = if v["previous_response_id"].is_string() { STORED_CONVERSATION_TOKENS } else { 0 };
        let input = INPUT_TOKENS + stored;
        self.served.fetch_add(input + out, Ordering::SeqCst);
        if path.ends_with("/converse-stream") {
            return converse_stream(input, out);
        }
        let anthropic = path.starts_with("/v1/messages");
        let (ctype, events): (&str, Vec<String>) = match (anthropic, stream) {
            (false, false) => {
                // `?echo`: the model writes usage-looking JSON in its answer (an agent can ask it
                // to); `?pad`: a large answer (1.2 MB).
                let content = if path.contains("echo") {
                    r#"{"usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}"#
                } else {
                    "ok"
                };
                let padding = if path.contains("pad") { "x".repeat(1_200_000) } else { String::new() };
                (
                    "application/json",
                    vec![serde_json::json!({
                    "id": "chatcmpl-1", "object": "chat.completion", "model": model, "system_fingerprint": padding,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": input, "completion_tokens": out, "total_tokens": input + out},
                })
                    .to_string()],
                )
            }
            (true, false) => (
                "application/json",
                vec![serde_json::json!({
                    "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                    "usage": {"input_tokens": input, "output_tokens": out},
                })
                .to_string()],
            ),
            (false, true) => {
                let chunk = |content: &str| {
                    format!(
                        "data: {}\n\n",
                        serde_json::json!({"id": "c", "object": "chat.completion.chunk", "model": model,
                        "choices": [{"index": 0, "delta": {"content": content}}]})
                    )
                };
                let usage = format!(
                    "data: {}\n\n",
                    serde_json::json!({"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [],
                        "usage": {"prompt_tokens": input, "completion_tokens": out, "total_tokens": input + out}})
                );
                // As OpenAI: a Chat Completions stream reports its usage only when asked.
                let usage = if v["stream_options"]["include_usage"] == true { usage } else { String::new() };
                ("text/event-stream", vec![chunk("o"), chunk("k"), usage, "data: [DONE]\n\n".into()])
            }
            (true, true) => {
                let ev = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
                (
                    "text/event-stream",
                    vec![
                        ev(
                            "message_start",
                            serde_json::json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
                        "role": "assistant", "model": model, "content": [], "usage": {"input_tokens": input, "output_tokens": 1}}}),
                        ),
                        ev(
                            "content_block_delta",
                            serde_json::json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": "ok"}}),
                        ),
                        ev(
                            "message_delta",
                            serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                        "usage": {"output_tokens": out}}),
                        ),
                        ev("message_stop", serde_json::json!({"type": "message_stop"})),
                    ],
                )
            }
        };
        let body: FakeBody = if path.contains("hold") {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            // `?hold&pad`: a long answer (200 text deltas) before the hold.
            let pad = if path.contains("pad") { events[1].repeat(200) } else { String::new() };
            let (first, hold) = (events[0].clone() + &pad, self.hold.clone());
            tokio::spawn(async move {
                let _ = tx.send(Ok(hyper::body::Frame::data(Bytes::from(first)))).await;
                hold.notified().await;
                drop(tx);
            });
            http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
        } else if gzip && !stream {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut gz, events.concat().as_bytes()).unwrap();
            let body = http_body_util::BodyExt::boxed(Full::new(Bytes::from(gz.finish().unwrap())));
            let resp = hyper::Response::builder().status(200).header("content-type", ctype);
            return resp.header("content-encoding", "gzip").body(body).unwrap();
        } else {
            http_body_util::BodyExt::boxed(Full::new(Bytes::from(events.concat())))
        };
        hyper::Response::builder().status(200).header("content-type", ctype).body(body).unwrap()
    }
}

/// A Bedrock `converse-stream` answer: AWS event stream frames (written with the AWS SDK's
/// encoder), the usage in the last, `metadata` event.
fn converse_stream(input: u64, output: u64) -> hyper::Response<FakeBody> {
    use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
    let frame = |event: &str, payload: serde_json::Value| {
        let message = Message::new(payload.to_string().into_bytes())
            .add_header(Header::new(":event-type", HeaderValue::String(event.to_owned().into())))
            .add_header(Header::new(":message-type", HeaderValue::String("event".into())));
        let mut out = Vec::new();
        aws_smithy_eventstream::frame::write_message_to(&message, &mut out).unwrap();
        out
    };
    let frames = [
        frame("messageStart", serde_json::json!({"role": "assistant"})),
        frame("contentBlockDelta", serde_json::json!({"contentBlockIndex": 0, "delta": {"text": "ok"}})),
        frame("messageStop", serde_json::json!({"stopReason": "end_turn"})),
        frame(
            "metadata",
            serde_json::json!({"usage": {"inputTokens": input, "outputTokens": output,
            "totalTokens": input + output}, "metrics": {"latencyMs": 10}}),
        ),
    ];
    let body = http_body_util::BodyExt::boxed(Full::new(Bytes::from(frames.concat())));
    hyper::Response::builder()
        .status(200)
        .header("content-type", "application/vnd.amazon.eventstream")
        .body(body)
        .unwrap()
}

// === the gateway ===

/// The gateway, routes for OpenAI and Anthropic with a catch-all key, agentAuth admitting the
/// acme and globex tenants by shared token (and anonymous callers), and `extra` documents
/// (budgets). `store` is the gateway's `budgetStore` block, if any.
fn gateway(extra: &str, store: &str) -> String {
    format!(
        r#"apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata: {{name: egress}}
spec:
  defaultPolicy: deny-all
  {store}
  agentAuth:
    optional: true
    validators:
    - name: acme
      sharedToken: {{secretRef: {{name: acme-token}}, agent: acme-bot, tenant: acme}}
    - name: globex
      sharedToken: {{secretRef: {{name: globex-token}}, agent: globex-bot, tenant: globex}}
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: openai}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: openai}}]}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: anthropic}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: anthropic}}]}}]
{keys}---
apiVersion: v1
kind: Secret
metadata: {{name: acme-token}}
stringData: {{token: {ACME_TOKEN}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: globex-token}}
stringData: {{token: {GLOBEX_TOKEN}}}
{extra}"#,
        keys = gateway_keys(REAL_KEY)
    )
}

/// A TokenBudget document.
fn budget(name: &str, parent: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{parent}]\n{spec}\n"
    )
}

/// One replica: `keyswap serve` on the config directory and an Envoy in front of the meter.
struct Replica {
    keyswap: Proc,
    _envoy: Proc,
    port: u16,
    metrics: u16,
    _work: tempfile::TempDir,
}

impl Replica {
    fn start(config: &Path, upstream: SocketAddr) -> Replica {
        Replica::start_with(config, upstream, false)
    }

    /// `observe`: Envoy's observing filter reads the response bodies (`--observe-response-bodies`).
    fn start_with(config: &Path, upstream: SocketAddr, observe: bool) -> Replica {
        Replica::start_env_with(config, upstream, &[], observe)
    }

    fn start_env(config: &Path, upstream: SocketAddr, env: &[(&str, &str)]) -> Replica {
        Replica::start_env_with(config, upstream, env, false)
    }

    fn start_env_with(config: &Path, upstream: SocketAddr, env: &[(&str, &str)], observe: bool) -> Replica {
        let work = tempfile::tempdir().unwrap();
        let metrics = free_port();
        let (keyswap, uds) = start_keyswap(config, work.path(), env, &["--metrics", &format!("127.0.0.1:{metrics}")]);
        let (envoy, port) = start_envoy_as_generated(config, env, observe, work.path(), &uds, upstream);
        Replica { keyswap, _envoy: envoy, port, metrics, _work: work }
    }

    /// Restarts keyswap on the same socket (Envoy reconnects).
    fn restart_keyswap(&mut self, config: &Path) {
        self.keyswap.terminate();
        let (keyswap, _) =
            start_keyswap(config, self._work.path(), &[], &["--metrics", &format!("127.0.0.1:{}", self.metrics)]);
        self.keyswap = keyswap;
    }

    /// A counter or gauge of this replica's Envoy.
    async fn envoy_stat(&self, name: &str) -> u64 {
        envoy_stat(self._work.path(), name).await
    }

    async fn metric(&self, sample: &str) -> f64 {
        metric(&scrape(self.metrics, "/metrics").await.1, sample)
    }

    /// A streamed call whose body the test reads itself (and may hang up on): answered 200.
    async fn open_stream(&self, host: &str, path: &str, body: &'static str) -> hyper::Response<hyper::body::Incoming> {
        let req = hyper::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1:{}{path}", self.port))
            .header("host", host)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp
    }

    /// Waits up to 5 s for `budget` to have settled `want` tokens past `before`.
    async fn settles(&self, budget: &str, before: f64, want: u64, what: &str) {
        let sample = format!("keyswap_budget_tokens_total{{budget=\"{budget}\",kind=\"settled\"}}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = self.metric(&sample).await - before;
            if got == want as f64 {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: settled {got}, not {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The tokens `budget` settled, once it has settled any (a stream the agent hung up on is
    /// settled when Envoy closes its ext_proc stream: up to 5 s later on the observing filter).
    async fn settled_once_any(&self, budget: &str) -> u64 {
        let sample = format!("keyswap_budget_tokens_total{{budget=\"{budget}\",kind=\"settled\"}}");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let settled = self.metric(&sample).await;
            if settled > 0.0 {
                return settled as u64;
            }
            assert!(
                Instant::now() < deadline,
                "{budget}: an aborted stream was never settled:\n{}",
                self.keyswap.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A gateway with one budget (`name`, attached to `parent`, with `spec` lines), served by one
/// replica in front of `meter`; the config directory lives as long as the first value.
/// A gateway-wide budget's spec that reserves 10 output tokens for a request naming no limit
/// (less than the meter writes then): what it settles shows whether the real usage was read.
const SMALL_RESERVATION: &str =
    "  key: Gateway\n  window: Day\n  limits: {totalTokens: 100000}\n  reservation: {defaultOutputTokens: 10}";

/// The tokens budget `default/shared` settled (`/metrics`).
const SHARED_SETTLED: &str = "keyswap_budget_tokens_total{budget=\"default/shared\",kind=\"settled\"}";

fn one_budget(meter: &Meter, name: &str, parent: &str, spec: &str) -> (tempfile::TempDir, Replica) {
    one_budget_with(meter, name, parent, spec, false)
}

/// [`one_budget`]; `observe`: the observing filter reads the response bodies.
fn one_budget_with(meter: &Meter, name: &str, parent: &str, spec: &str, observe: bool) -> (tempfile::TempDir, Replica) {
    let config = tempfile::tempdir().unwrap();
    write(config.path(), &gateway(&budget(name, parent, spec), ""));
    let r = tokio::task::block_in_place(|| Replica::start_with(config.path(), meter.addr, observe));
    (config, r)
}

/// A call as the agent makes it: (status, retry-after, body).
async fn call(port: u16, host: &str, token: Option<&str>, body: &str) -> (u16, Option<String>, String) {
    let path = if host == ANTHROPIC { "/v1/messages" } else { "/v1/chat/completions" };
    call_path(port, host, path, token, body).await
}

async fn call_path(
    port: u16,
    host: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Option<String>, String) {
    call_with(port, host, ("POST", path), &[], token, body).await
}

/// [`call_path`] with another method and more headers.
async fn call_with(
    port: u16,
    host: &str,
    (method, path): (&str, &str),
    headers: &[(&str, &str)],
    token: Option<&str>,
    body: &str,
) -> (u16, Option<String>, String) {
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("host", host)
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let req = b.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(15), client().request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, retry, String::from_utf8_lossy(&body).into_owned())
}

fn chat(max_tokens: u64) -> String {
    format!(r#"{{"model":"gpt-4o-mini","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#)
}

fn write(dir: &Path, text: &str) {
    // Written beside, then renamed: the watcher never sees half a file.
    let tmp = dir.join(".gateway.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("gateway.yaml")).unwrap();
}

/// A refusal is keyswap's 429: `Retry-After`, a JSON reason naming the budget, no secret.
fn assert_budget_refusal(status: u16, retry: Option<&str>, body: &str, budget: &str) {
    assert_eq!(status, 429, "{body}");
    let retry: u64 = retry.expect("Retry-After").parse().expect("Retry-After is seconds");
    assert!((1..=86_400 * 31).contains(&retry), "Retry-After {retry}");
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON reason");
    assert_eq!(v["error"]["type"], "budget_exhausted", "{body}");
    assert_eq!(v["error"]["budget"], budget, "{body}");
    for secret in [REAL_KEY, ACME_TOKEN, GLOBEX_TOKEN] {
        assert!(!body.contains(secret), "a refusal quoted a secret: {body}");
    }
}

// === in-process ===

/// 20 concurrent acme requests with `max_tokens: 100`, spread over `ports`, at a 1,000-token
/// budget: the provider never serves more than 1,000 tokens, every refusal is a 429 that reached
/// nothing. Returns how many were admitted.
async fn twenty_concurrent(ports: &[u16], meter: &Meter) -> u64 {
    let body = chat(100);
    let calls = (0..20).map(|i| call(ports[i % ports.len()], OPENAI, Some(ACME_TOKEN), &body));
    let results = futures_util::future::join_all(calls).await;
    let admitted = results.iter().filter(|(s, _, _)| *s == 200).count() as u64;
    for (status, retry, body) in results.iter().filter(|(s, _, _)| *s != 200) {
        assert_budget_refusal(*status, retry.as_deref(), body, "default/acme-daily");
    }
    // Worst case stated in docs/budgets.md: zero overshoot when every request sets max_tokens
    // and input is bounded by body bytes (the default).
    let served = meter.served.load(Ordering::SeqCst);
    assert!(served <= 1000, "the provider served {served} tokens on a 1000-token budget");
    assert_eq!(meter.requests.load(Ordering::SeqCst), admitted, "a refused request reached the provider");
    assert!(admitted >= 3, "only {admitted} admitted: reservations must leave room for several in flight");
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_requests_never_spend_past_a_tenants_daily_budget() {
    let meter = Meter::start(Duration::from_millis(300)).await;
    let (_config, r) = acme_budget(&meter);

    let admitted = twenty_concurrent(&[r.port], &meter).await;
    let body = chat(100);
    // Sequential requests fill what settlement gave back, and stop at the limit.
    let mut more = 0;
    loop {
        let (status, retry, body) = call(r.port, OPENAI, Some(ACME_TOKEN), &body).await;
        if status != 200 {
            assert_budget_refusal(status, retry.as_deref(), &body, "default/acme-daily");
            break;
        }
        more += 1;
        assert!(more < 20, "never refused");
    }
    let served = meter.served.load(Ordering::SeqCst);
    assert!(served <= 1000 && served > 1000 - 2 * (INPUT_TOKENS + 100) - 200, "served {served}");
    // Another tenant's budget is its own.
    let (status, _, body) = call(r.port, OPENAI, Some(GLOBEX_TOKEN), &body).await;
    assert_eq!(status, 200, "globex was refused by acme's budget: {body}\n{}", r.keyswap.output());
    let decisions =
        |d: &str| format!("keyswap_budget_decisions_total{{budget=\"default/acme-daily\",decision=\"{d}\"}}");
    assert_eq!(r.metric(&decisions("admitted")).await as u64, admitted + more + 1);
    assert!(r.metric(&decisions("limited")).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_openai_and_anthropic_responses_settle_their_reported_usage() {
    streamed_openai_and_anthropic_responses_settle_their_reported_usage_with(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_openai_and_anthropic_responses_settle_their_reported_usage_off_the_request_path() {
    streamed_openai_and_anthropic_responses_settle_their_reported_usage_with(true).await;
}

/// Also traced: the budget and the span read one response, and both see its usage (the span
/// takes the budget's reading rather than parsing the body again).
async fn streamed_openai_and_anthropic_responses_settle_their_reported_usage_with(observe: bool) {
    use common::otlp::{i, Receiver};
    let (collector, collector_addr) = Receiver::start().await;
    let meter = Meter::start(Duration::ZERO).await;
    let config = tempfile::tempdir().unwrap();
    let spec = "  key: Gateway\n  window: Hour\n  limits: {totalTokens: 100000}";
    write(config.path(), &gateway(&budget("shared", "{kind: EgressGateway, name: egress}", spec), ""));
    let endpoint = format!("http://{collector_addr}");
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")];
    let r = tokio::task::block_in_place(|| Replica::start_env_with(config.path(), meter.addr, &env, observe));
    let settled = || r.metric(SHARED_SETTLED);
    let reserved = || r.metric("keyswap_budget_tokens_total{budget=\"default/shared\",kind=\"reserved\"}");
    let cases = [
        (
            OPENAI,
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"max_tokens":300,"messages":[]}"#,
            37,
        ),
        (ANTHROPIC, r#"{"model":"claude-sonnet-4-5","stream":true,"max_tokens":300,"messages":[]}"#, 41),
        // Not asked for by the agent: keyswap asks for it.
        (OPENAI, r#"{"model":"gpt-4o","stream":true,"max_tokens":300,"messages":[]}"#, 39),
        (OPENAI, r#"{"model":"gpt-4o","max_tokens":300,"messages":[]}"#, 43),
        (ANTHROPIC, r#"{"model":"claude-sonnet-4-5","max_tokens":300,"messages":[]}"#, 47),
    ];
    for (host, template, out) in cases {
        // The meter reports `max_tokens` as output: ask for `out` after reserving 300.
        let body = template.replace("300", &out.to_string());
        let (s0, r0) = (settled().await, reserved().await);
        let (status, _, text) = call(r.port, host, None, &body).await;
        assert_eq!(status, 200, "{host}: {text}");
        if body.contains("\"stream\":true") {
            assert!(text.contains("data: "), "{host}: not a stream: {text}");
        }
        let want = (INPUT_TOKENS + out) as f64;
        let deadline = Instant::now() + Duration::from_secs(5);
        while settled().await - s0 != want {
            assert!(Instant::now() < deadline, "{host} {body}: settled {} of {want}", settled().await - s0);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // It had reserved more: body bytes (≥ input tokens) plus max_tokens.
        assert_eq!(reserved().await - r0, (body.len() as u64 + out) as f64, "{host}");
    }
    let spans = collector.wait_for(cases.len()).await;
    let mut outputs: Vec<i64> = spans
        .iter()
        .map(|(_, sp)| {
            let input = i(&sp.attributes, "gen_ai.usage.input_tokens");
            assert_eq!(input, Some(INPUT_TOKENS as i64), "a span without the usage the budget read: {sp:?}");
            i(&sp.attributes, "gen_ai.usage.output_tokens").expect("output tokens")
        })
        .collect();
    outputs.sort();
    assert_eq!(outputs, [37, 39, 41, 43, 47], "the spans' output tokens");
    // Read by the observing filter exactly when it runs.
    let observed = r.metric("keyswap_observed_responses_total{outcome=\"ended\"}").await;
    assert_eq!(observed > 0.0, observe, "responses read by the observing filter: {observed}");
}

/// The attack: a Chat Completions stream with no `max_tokens` and no `stream_options`. It is
/// reserved the budget's default output, and OpenAI's stream reports no usage unless asked, so
/// it was settled at that default however much the model wrote. keyswap asks for the usage and
/// keeps the chunk that carries it (empty `choices`) from the agent, which did not ask for it and
/// may index `choices[0]` of every chunk; a body that says `include_usage` is not true is refused
/// as unmetered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_ask_for_its_usage_is_still_charged_what_it_used() {
    let meter = Meter::start(Duration::ZERO).await;
    let spec = SMALL_RESERVATION;
    let (_config, r) = one_budget(&meter, "shared", "{kind: EgressGateway, name: egress}", spec);
    let settled = || r.metric(SHARED_SETTLED);
    // The meter writes 50 output tokens when no max_tokens is set: more than the 10 reserved.
    for body in [
        r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"  {}"#.replace("{}", r#"{"stream":1,"model":"gpt-4o","messages":[]}"#).leak(),
    ] {
        let before = settled().await;
        let (status, _, text) = call(r.port, OPENAI, None, body).await;
        assert_eq!(status, 200, "{text}");
        assert!(!text.contains(r#""choices":[]"#), "the agent got the usage chunk it did not ask for: {text}");
        if body.contains(r#""stream":true"#) {
            assert!(text.contains(r#"{"content":"k"}"#) && text.ends_with("data: [DONE]\n\n"), "{text}");
        }
        let forwarded = meter.seen.lock().unwrap().last().cloned().unwrap();
        assert!(forwarded.contains(r#""stream_options":{"include_usage":true}"#), "{forwarded}");
        r.settles("default/shared", before, INPUT_TOKENS + 50, &format!("{body} (reserved 10 output)")).await;
    }
    // Told not to report it (also by a repeated key, or a value other than `true`), with no
    // output limit: refused.
    let seen = meter.requests.load(Ordering::SeqCst);
    for options in [
        r#"{"include_usage":false}"#,
        r#"{"include_usage":true,"include_usage":false}"#,
        r#"{"include_usage":"true"}"#,
        "null",
        r#"{}"#,
    ] {
        let body = format!(r#"{{"model":"gpt-4o","stream":true,"stream_options":{options},"messages":[]}}"#);
        let (status, _, text) = call(r.port, OPENAI, None, &body).await;
        assert_eq!(status, 403, "{options}: {text}");
        assert!(text.contains("budget_unmetered_request") && text.contains("include_usage"), "{text}");
    }
    // Asked for by the agent: forwarded as it is.
    let body = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let (status, _, text) = call(r.port, OPENAI, None, body).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(r#""choices":[]"#) && text.contains(r#""usage":{"#), "the usage chunk it asked for: {text}");
    assert!(meter.seen.lock().unwrap().last().unwrap().ends_with(body), "the body was rewritten");
    assert_eq!(meter.requests.load(Ordering::SeqCst), seen + 1, "a refused stream reached the provider");
    // Told not to report it, but with max_tokens: its reservation bounds what it can use, and it
    // is settled at that reservation.
    let body =
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false},"max_tokens":30,"messages":[]}"#;
    let before = settled().await;
    let (status, _, text) = call(r.port, OPENAI, None, body).await;
    assert_eq!(status, 200, "{text}");
    r.settles("default/shared", before, (body.len() + 30) as u64, "its reservation").await;
}

/// The attack: a Chat Completions stream with no `max_tokens` on a route whose policy signs with
/// SigV4 (an OpenAI-compatible API behind AWS). keyswap cannot add `stream_options` to a body it
/// signs, so the stream reports no usage; it was admitted as if asked, and settled at its
/// reservation however much the model wrote. Refused as unmetered now, as an unasked stream is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_stream_that_cannot_be_asked_for_its_usage_is_refused_as_unmetered() {
    let meter = Meter::start(Duration::ZERO).await;
    let signed = "---\napiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {name: openai-signed}\n\
                  spec:\n  parentRefs: [{kind: AIProviderRoute, name: openai}]\n  secretRef: {name: aws}\n  \
                  target: ProviderAuth\n  providerAuth: {type: AWSv4, region: us-east-1, service: bedrock}\n---\n\
                  apiVersion: v1\nkind: Secret\nmetadata: {name: aws}\nstringData: {AWS_ACCESS_KEY_ID: AKIAKEYSWAPTEST0002, \
                  AWS_SECRET_ACCESS_KEY: kS3cr3t0012do-not-leak}\n";
    let config = tempfile::tempdir().unwrap();
    let shared = budget("shared", "{kind: EgressGateway, name: egress}", SMALL_RESERVATION);
    write(config.path(), &gateway(&(shared + signed), ""));
    let r = tokio::task::block_in_place(|| Replica::start_with(config.path(), meter.addr, false));
    let seen = meter.requests.load(Ordering::SeqCst);
    let (status, _, text) = call(r.port, OPENAI, None, r#"{"model":"gpt-4o","stream":true,"messages":[]}"#).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("budget_unmetered_request") && text.contains("include_usage"), "{text}");
    assert_eq!(meter.requests.load(Ordering::SeqCst), seen, "the unmetered stream reached the provider");
    // With an output limit its reservation bounds it: signed and forwarded as written.
    let body = r#"{"model":"gpt-4o","stream":true,"max_tokens":30,"messages":[]}"#;
    let (status, _, text) = call(r.port, OPENAI, None, body).await;
    assert_eq!(status, 200, "{text}");
    let forwarded = meter.seen.lock().unwrap().last().cloned().unwrap();
    assert!(forwarded.ends_with(body), "the signed body was rewritten: {forwarded}");
}

/// The attack: Gemini generates up to its output limit, and a field mask (`?fields=candidates`,
/// `X-Goog-FieldMask`), `alt=proto`, a JSONP `callback` or a protobuf body leaves the
/// `usageMetadata` out of the answer, or puts it where keyswap does not read: the call was
/// settled at its reservation, whatever it generated. Refused as unmetered; the parameters
/// Google's own clients send (`alt=sse`, `$alt=json;enum-encoding=int`) pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gemini_answer_stripped_of_its_usage_cannot_settle_at_its_reservation() {
    let meter = Meter::start(Duration::ZERO).await;
    let google = "---\napiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {name: gemini}\nspec:\n  \
                  parentRefs: [{name: egress}]\n  rules: [{matches: [{provider: google}]}]\n";
    let config = tempfile::tempdir().unwrap();
    let shared = budget("shared", "{kind: EgressGateway, name: egress}", SMALL_RESERVATION);
    write(config.path(), &gateway(&format!("{google}{shared}"), ""));
    let r = tokio::task::block_in_place(|| Replica::start(config.path(), meter.addr));
    let host = "generativelanguage.googleapis.com";
    let model = "/v1beta/models/gemini-2.5-pro";
    let body = r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#;
    let seen = meter.requests.load(Ordering::SeqCst);
    for (path, headers) in [
        (format!("{model}:generateContent?fields=candidates"), vec![]),
        (format!("{model}:generateContent?%24Fields=candidates"), vec![]),
        (format!("{model}:generateContent?alt=proto"), vec![]),
        (format!("{model}:streamGenerateContent?alt=sse&callback=f"), vec![]),
        (format!("{model}:generateContent"), vec![("x-goog-fieldmask", "candidates")]),
        (format!("{model}:generateContent"), vec![("x-goog-fieldmask", "\u{e9}")]),
    ] {
        let (status, _, text) = call_with(r.port, host, ("POST", &path), &headers, None, body).await;
        assert_eq!(status, 403, "{path} {headers:?}: {text}");
        assert!(text.contains("budget_unmetered_request") && text.contains("usageMetadata"), "{text}");
    }
    assert_eq!(meter.requests.load(Ordering::SeqCst), seen, "a request hiding its usage reached the provider");
    for path in [
        format!("{model}:generateContent"),
        format!("{model}:streamGenerateContent?alt=sse"),
        format!("{model}:generateContent?$alt=json;enum-encoding=int"),
    ] {
        let (status, _, text) = call_with(r.port, host, ("POST", &path), &[], None, body).await;
        assert_eq!(status, 200, "{path}: {text}");
    }
    // Reading a file spends no tokens, whatever its format (the SDK's `files.download`).
    let (status, _, text) =
        call_with(r.port, host, ("GET", "/v1beta/files/f1:download?alt=media"), &[], None, "").await;
    assert_eq!(status, 200, "a download: {text}");
}

/// The attack: call the OpenAI-compatible endpoint a provider serves beside its own API (here
/// Anthropic's `/v1/chat/completions`; Gemini's `/v1beta/openai/…` and Bedrock's `/openai/v1/…`
/// alike). Its answers are OpenAI's, which the provider's own reader did not read: every call was
/// charged its reservation (10 output tokens reserved, 50 written). Now they are settled by what
/// they report; a stream that does not ask for its usage is asked, as on OpenAI (Anthropic's
/// compatibility layer takes `stream_options`; Gemini's and Bedrock's are not asked, and such a
/// stream without a limit there is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_compatible_endpoint_of_another_provider_is_charged_what_it_used() {
    let meter = Meter::start(Duration::ZERO).await;
    let spec = SMALL_RESERVATION;
    let (_config, r) = one_budget(&meter, "shared", "{kind: EgressGateway, name: egress}", spec);
    let settled = || r.metric(SHARED_SETTLED);
    let path = "/v1/chat/completions";
    for body in [
        r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"claude-sonnet-4-5","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
    ] {
        let before = settled().await;
        let (status, _, text) = call_path(r.port, ANTHROPIC, path, None, body).await;
        assert_eq!(status, 200, "{text}");
        r.settles("default/shared", before, INPUT_TOKENS + 50, &format!("{body} (reserved 10 output)")).await;
    }
    let before = settled().await;
    let body = r#"{"model":"claude-sonnet-4-5","stream":true,"messages":[]}"#;
    let (status, _, text) = call_path(r.port, ANTHROPIC, path, None, body).await;
    assert_eq!(status, 200, "{text}");
    let forwarded = meter.seen.lock().unwrap().last().cloned().unwrap();
    assert!(forwarded.contains(r#""stream_options":{"include_usage":true}"#), "{forwarded}");
    r.settles("default/shared", before, INPUT_TOKENS + 50, "an unasked stream").await;
}

/// The attack: a budgeted `custom` route to an OpenAI-compatible vendor the registry does not
/// name (Mistral, Groq, DeepSeek, vLLM, LiteLLM). Its answers were never read, so every call was
/// charged its reservation (here 10 output tokens) whatever the model generated (50). Read now
/// on the paths of the APIs it copies; a stream that reports no usage is admitted and charged at
/// least its events (vendors that report unasked would otherwise be refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_openai_compatible_upstream_is_charged_what_it_used() {
    let meter = Meter::start(Duration::ZERO).await;
    let config = tempfile::tempdir().unwrap();
    let vendor = "---\napiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {name: vendor}\nspec:\n  \
                  parentRefs: [{name: egress}]\n  rules: [{matches: [{provider: custom, hosts: [llm.vendor.test]}]}]\n---\n\
                  apiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {name: vendor-key}\nspec:\n  \
                  parentRefs: [{kind: AIProviderRoute, name: vendor}]\n  secretRef: {name: provider-keys}\n  \
                  target: Header\n  headerName: authorization\n  valuePrefix: 'Bearer '\n";
    let shared = budget("shared", "{kind: AIProviderRoute, name: vendor}", SMALL_RESERVATION);
    write(config.path(), &gateway(&format!("{vendor}{shared}"), ""));
    let r = tokio::task::block_in_place(|| Replica::start(config.path(), meter.addr));
    let settled = || r.metric(SHARED_SETTLED);
    let host = "llm.vendor.test";
    for body in [
        r#"{"model":"mistral-large","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"mistral-large","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
    ] {
        let before = settled().await;
        let (status, _, text) = call_path(r.port, host, "/v1/chat/completions", None, body).await;
        assert_eq!(status, 200, "{text}\n{}", r.keyswap.output());
        r.settles("default/shared", before, INPUT_TOKENS + 50, &format!("{body} (reserved 10 output)")).await;
    }
    // Not asked for its usage (keyswap does not ask a vendor it does not know): admitted, and
    // charged its reservation (10) or its events, whichever is more.
    let body = r#"{"model":"mistral-large","stream":true,"messages":[]}"#;
    let before = settled().await;
    let (status, _, text) = call_path(r.port, host, "/v1/chat/completions", None, body).await;
    assert_eq!(status, 200, "{text}");
    r.settles("default/shared", before, body.len() as u64 + 10, "a stream reporting no usage").await;
    // The attack: an output limit under a name the upstream ignores (`max_gen_len`, Llama's on
    // Bedrock, means nothing to vLLM) reserved 1 and capped the charge at it, whatever streamed.
    // The 3 events that passed (the meter wrote 50 tokens) are charged.
    let body = r#"{"model":"mistral-large","stream":true,"max_gen_len":1,"messages":[]}"#;
    let before = settled().await;
    let (status, _, text) = call_path(r.port, host, "/v1/chat/completions", None, body).await;
    assert_eq!(status, 200, "{text}");
    r.settles("default/shared", before, body.len() as u64 + 3, "a limit the upstream ignores").await;
}

/// Bodies above 256 KiB are read on the blocking pool (a 9 MiB body takes milliseconds to
/// parse, which would hold up every other agent on the worker): they are decided as small ones
/// are, reserved, refused, or asked for their stream's usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_body_is_reserved_refused_and_asked_for_usage_as_a_small_one_is() {
    let meter = Meter::start(Duration::ZERO).await;
    let spec = "  key: Gateway\n  window: Day\n  limits: {totalTokens: 700000}";
    let (_config, r) = one_budget(&meter, "big", "{kind: EgressGateway, name: egress}", spec);
    let reserved = || r.metric("keyswap_budget_tokens_total{budget=\"default/big\",kind=\"reserved\"}");
    let prompt = "x".repeat(300 * 1024);
    let body = |extra: &str| {
        format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{prompt}"}}]{extra},"max_tokens":10}}"#)
    };
    // Reserved by its bytes and max_tokens, and streamed with its usage asked for.
    let streamed = body(r#","stream":true"#);
    let (status, _, text) = call(r.port, OPENAI, None, &streamed).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(reserved().await, (streamed.len() + 10) as f64);
    let forwarded = meter.seen.lock().unwrap().last().cloned().unwrap();
    assert!(forwarded.contains(r#""stream_options":{"include_usage":true}"#), "not asked for its usage");
    // Unmetered: refused before anything is reserved.
    let (status, _, text) = call(r.port, OPENAI, None, &body(r#","background":true"#)).await;
    assert_eq!(status, 403, "{text}");
    // Past what is left (700,000 − what the first call used): refused, not forwarded.
    let huge = format!(r#"{{"model":"gpt-4o","messages":[],"max_tokens":600000,"pad":"{prompt}"}}"#);
    let (status, _, text) = call(r.port, OPENAI, None, &huge).await;
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("budget_exhausted"), "{text}");
    assert_eq!(meter.requests.load(Ordering::SeqCst), 1, "a refused body reached the provider");
}

/// The attack: a Bedrock `converse-stream` call without `maxTokens`, reserved the budget's default
/// output. Its answer is an AWS event stream (binary frames), which keyswap read as JSON and
/// could not: it was settled at the reservation however much the model wrote. The usage in its
/// `metadata` event settles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bedrock_stream_is_settled_by_the_usage_in_its_event_stream() {
    let meter = Meter::start(Duration::ZERO).await;
    let route = "---\napiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {name: bedrock}\nspec:\n  \
                 parentRefs: [{name: egress}]\n  rules: [{matches: [{provider: bedrock}]}]\n";
    let spec = SMALL_RESERVATION;
    let config = tempfile::tempdir().unwrap();
    write(
        config.path(),
        &gateway(&(route.to_owned() + &budget("shared", "{kind: EgressGateway, name: egress}", spec)), ""),
    );
    let r = tokio::task::block_in_place(|| Replica::start(config.path(), meter.addr));
    let settled = || r.metric(SHARED_SETTLED);
    let body = r#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#;
    let host = "bedrock-runtime.us-east-1.amazonaws.com";
    let (status, _, text) =
        call_path(r.port, host, "/model/anthropic.claude-sonnet-4-5/converse-stream", None, body).await;
    assert_eq!(status, 200, "{text}");
    // The meter wrote 50 output tokens where 10 were reserved.
    let deadline = Instant::now() + Duration::from_secs(5);
    while settled().await != (INPUT_TOKENS + 50) as f64 {
        assert!(Instant::now() < deadline, "settled {} (reserved {} input, 10 output)", settled().await, body.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent can make the model write anything, usage-looking JSON included; only the provider's
/// own `usage` object counts, in a small answer and in a large one (1.2 MB, read as it streams).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_the_model_writes_in_its_answer_is_not_mistaken_for_what_the_provider_counted() {
    let meter = Meter::start(Duration::ZERO).await;
    let (_config, r) =
        one_budget(&meter, "b", "{name: openai}", "  key: Route\n  window: Hour\n  limits: {totalTokens: 100000}");
    let settled = || r.metric("keyswap_budget_tokens_total{budget=\"default/b\",kind=\"settled\"}");
    let (status, _, text) = call_path(r.port, OPENAI, "/v1/chat/completions?echo", None, &chat(25)).await;
    assert_eq!(status, 200);
    assert!(text.contains(r#"\"completion_tokens\": 0"#), "the answer carries the fake usage: {text}");
    assert_eq!(settled().await, (INPUT_TOKENS + 25) as f64);
    let (status, _, text) = call_path(r.port, OPENAI, "/v1/chat/completions?echo&pad", None, &chat(35)).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&text).expect("the whole JSON answer");
    assert_eq!(v["system_fingerprint"].as_str().map(str::len), Some(1_200_000));
    assert_eq!(settled().await, (2 * INPUT_TOKENS + 60) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_stream_releases_what_it_did_not_use_but_not_what_it_received() {
    an_aborted_stream_releases_what_it_did_not_use_but_not_what_it_received_with(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_stream_releases_what_it_did_not_use_but_not_what_it_received_off_the_request_path() {
    an_aborted_stream_releases_what_it_did_not_use_but_not_what_it_received_with(true).await;
}

async fn an_aborted_stream_releases_what_it_did_not_use_but_not_what_it_received_with(observe: bool) {
    let meter = Meter::start(Duration::ZERO).await;
    let (_config, r) = one_budget_with(
        &meter,
        "tight",
        "{kind: EgressGateway, name: egress}",
        "  key: Gateway\n  window: Day\n  limits: {totalTokens: 3000}",
        observe,
    );
    // Asking for its usage itself: a stream keyswap asks is read on the deciding filter, which
    // keeps the usage chunk from the agent, never on the observing one.
    let body =
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"max_tokens":2000,"messages":[]}"#;
    // The agent reads the first event, then hangs up before the usage event.
    let mut resp = r.open_stream(OPENAI, "/v1/chat/completions?hold", body).await;
    let first = resp.body_mut().frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    drop(resp);
    // Settled: the prompt (the provider answered, so it read it: reserved as body bytes) and
    // no more output than the bytes that passed; the rest of the 2000 is released. The body is
    // read by the observing filter, whose stream Envoy closes 5 s (its deferred-close timeout)
    // after the agent hung up.
    let charged = r.settled_once_any("default/tight").await;
    assert!(charged >= body.len() as u64, "charged {charged}: less than the prompt");
    assert!(
        charged <= body.len() as u64 + first.len() as u64 * 2,
        "charged {charged}: the unused output was not released"
    );
    // What was released is spendable again: a 2000-token request fits.
    let (status, _, text) = call(r.port, OPENAI, None, &chat(2000)).await;
    assert_eq!(status, 200, "{text}");
    meter.hold.notify_waiters();
    let cut_off = r.metric("keyswap_observed_responses_total{outcome=\"cut_off\"}").await;
    assert_eq!(cut_off > 0.0, observe, "responses cut off on the observing stream: {cut_off}");
}

/// The attack: a streamed call that sets no output limit (its reservation is the default, which
/// bounds nothing a model generates), read to its last event and hung up on just before the usage
/// event. Settled as cut off, its output was the bytes that passed capped at the reservation: the
/// default, however long the answer (a 100,000-token answer charged 4,096, on every call). The
/// events that passed are charged: a model streams a token or more per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_up_before_the_usage_of_a_stream_without_a_limit_does_not_cap_it_at_the_default() {
    let meter = Meter::start(Duration::ZERO).await;
    let spec =
        "  key: Gateway\n  window: Day\n  limits: {totalTokens: 100000}\n  reservation: {defaultOutputTokens: 50}";
    let (_config, r) = one_budget(&meter, "limitless", "{kind: EgressGateway, name: egress}", spec);
    let body = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    // The first event and 200 more, then the provider holds the rest (the usage chunk).
    let mut resp = r.open_stream(OPENAI, "/v1/chat/completions?hold&pad", body).await;
    let mut received = Vec::new();
    while received.windows(2).filter(|w| w == b"\n\n").count() < 201 {
        let frame = resp.body_mut().frame().await.expect("more of the stream").unwrap();
        received.extend_from_slice(&frame.into_data().unwrap_or_default());
    }
    drop(resp);
    let charged = r.settled_once_any("default/limitless").await;
    let input = body.len() as u64; // reserved as body bytes: the provider said nothing
    assert!(charged >= input + 201, "charged {charged} for 201 streamed events ({} bytes)", received.len());
    assert!(charged <= input + received.len() as u64, "charged {charged}: more than the bytes that passed");
    meter.hold.notify_waiters();
}

/// A replica with budget `default/roomy` (100,000 tokens a day) and an Anthropic stream through
/// it that reserved 2,000 output tokens: `message_start` (the placeholder count) and 200 text
/// deltas, then held until `meter.hold` is notified, when it ends without `message_delta`.
async fn long_anthropic_stream(meter: &Meter) -> (tempfile::TempDir, Replica, hyper::Response<hyper::body::Incoming>) {
    let limits = "  key: Gateway\n  window: Day\n  limits: {totalTokens: 100000}";
    let (config, r) = one_budget_with(meter, "roomy", "{kind: EgressGateway, name: egress}", limits, false);
    let body = r#"{"model":"claude-x","stream":true,"max_tokens":2000,"messages":[]}"#;
    let resp = r.open_stream(ANTHROPIC, "/v1/messages?hold&pad", body).await;
    (config, r, resp)
}

/// The attack: read a long Anthropic stream and hang up before its `message_delta`, the only
/// event with the real output count (`message_start` says 1, a placeholder).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_anthropic_stream_is_charged_for_what_it_received_not_its_placeholder_count() {
    let meter = Meter::start(Duration::ZERO).await;
    let (_config, r, mut resp) = long_anthropic_stream(&meter).await;
    let mut received = 0;
    while received < 20_000 {
        let frame = resp.body_mut().frame().await.expect("more of the stream").unwrap();
        received += frame.into_data().map_or(0, |d| d.len());
    }
    drop(resp);
    // Over 20 KB passed: the whole 2,000-token output reservation is charged, with the input
    // `message_start` reported; not the placeholder's 1 output token.
    let charged = r.settled_once_any("default/roomy").await;
    assert_eq!(charged, INPUT_TOKENS + 2000, "charged {charged} for a cut-off stream of {received} bytes");
    meter.hold.notify_waiters();
}

/// An Anthropic stream the provider ends after its content and before `message_delta` (an error
/// event mid-stream, a connection closed early): its only count is `message_start`'s placeholder
/// (1 output token), and it was settled at that however much passed. It says no more than a
/// stream cut off does, and is settled like one: by the bytes that passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_anthropic_stream_ended_before_its_final_count_is_charged_for_what_passed() {
    let meter = Meter::start(Duration::ZERO).await;
    let (_config, r, mut resp) = long_anthropic_stream(&meter).await;
    let mut received = resp.body_mut().frame().await.unwrap().unwrap().into_data().unwrap().len();
    // The provider ends the stream there (told until it has: it may not be waiting yet); the
    // agent reads it to its end.
    let hold = meter.hold.clone();
    let end = tokio::spawn(async move {
        loop {
            hold.notify_waiters();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    while let Some(frame) = resp.body_mut().frame().await {
        received += frame.unwrap().into_data().map_or(0, |d| d.len());
    }
    end.abort();
    assert!(received > 20_000, "{received} bytes");
    let charged = r.settled_once_any("default/roomy").await;
    assert_eq!(charged, INPUT_TOKENS + 2000, "charged {charged} for a stream of {received} bytes without its count");
}

/// The attack: make a call outlive the timeouts of a gateway in front of the model (a long
/// generation, answered 504 or 408 with no usage). The model may have run it to the end; before,
/// a status without usage released the whole reservation, and such calls were free. Any other
/// error without usage still gives its tokens back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_that_times_out_after_forwarding_is_not_free() {
    let meter = Meter::start(Duration::ZERO).await;
    let limits = "  key: Gateway\n  window: Day\n  limits: {totalTokens: 100000}";
    let (_config, r) = one_budget_with(&meter, "roomy", "{kind: EgressGateway, name: egress}", limits, false);
    let metric = |kind: &'static str| {
        let r = &r;
        async move { r.metric(&format!("keyswap_budget_tokens_total{{budget=\"default/roomy\",kind=\"{kind}\"}}")).await }
    };
    let mut settled = 0.0;
    for (status, kept) in [(504, true), (408, true), (500, false), (429, false)] {
        let path = format!("/v1/chat/completions?status={status}");
        let (got, _, text) = call_path(r.port, OPENAI, &path, None, &chat(2000)).await;
        assert_eq!(got, status, "{text}");
        // In memory, settled before the end of the response reached the agent.
        let now = metric("settled").await;
        let charged = now - settled;
        settled = now;
        if kept {
            assert!(charged >= 2000.0, "{status}: charged {charged}, not the 2,000-token reservation");
        } else {
            assert!(charged <= 1.0, "{status}: charged {charged} for an error without usage");
        }
    }
}

// === Redis ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_requests_over_two_replicas_sharing_redis_never_overspend() {
    let meter = Meter::start(Duration::from_millis(300)).await;
    let b = budget("acme-daily", "{kind: EgressGateway, name: egress}", ACME_DAILY);
    let redis = tokio::task::block_in_place(|| RedisConfig::start(&b));
    let config = redis.config.path();
    let (a, b) =
        tokio::task::block_in_place(|| (Replica::start(config, meter.addr), Replica::start(config, meter.addr)));
    twenty_concurrent(&[a.port, b.port], &meter).await;
}

const REDIS_PASSWORD: &str = "redis-pass-0003-do-not-leak";

fn redis_bin() -> &'static str {
    match Command::new("redis-server").arg("--version").output() {
        Ok(o) if o.status.success() => "redis-server",
        _ => panic!("redis-server is missing: apt-get install redis-server (scripts/test installs it)"),
    }
}

/// Debian's redis-server on loopback, with a password, no persistence.
fn start_redis(work: &Path, port: u16) -> Proc {
    let mut cmd = Command::new(redis_bin());
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--requirepass", REDIS_PASSWORD])
        .arg("--dir")
        .arg(work);
    let mut p = Proc::spawn("redis-server", cmd, work.join(format!("redis-{port}.log")));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        p.assert_running();
        assert!(Instant::now() < deadline, "redis-server did not listen in 10 s:\n{}", p.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

fn redis_store(port: u16) -> (String, String) {
    let secret = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: budget-redis}}\nstringData: {{url: \"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0\"}}\n"
    );
    ("budgetStore: {redis: {secretRef: {name: budget-redis}}}".to_owned(), secret)
}

/// A Debian redis-server on loopback, and a config directory whose gateway counts `budgets`
/// (TokenBudget documents) in it. Both live as long as this value.
struct RedisConfig {
    _redis: Proc,
    _redis_dir: tempfile::TempDir,
    port: u16,
    config: tempfile::TempDir,
}

impl RedisConfig {
    fn start(budgets: &str) -> RedisConfig {
        let redis_dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let redis = start_redis(redis_dir.path(), port);
        let (store, secret) = redis_store(port);
        let config = tempfile::tempdir().unwrap();
        write(config.path(), &gateway(&(budgets.to_owned() + &secret), &store));
        RedisConfig { _redis: redis, _redis_dir: redis_dir, port, config }
    }
}

/// One budget on the gateway (`name`, on every route), counted in a Redis of its own, served by
/// one replica in front of `meter`.
fn one_redis_budget(meter: &Meter, name: &str, spec: &str) -> (RedisConfig, Replica) {
    tokio::task::block_in_place(|| {
        let redis = RedisConfig::start(&budget(name, "{kind: EgressGateway, name: egress}", spec));
        let r = Replica::start(redis.config.path(), meter.addr);
        (redis, r)
    })
}

/// A forwarder to Redis on `to` that can go silent for the connections it holds, as a Redis
/// whose node died, or that failed over behind the same address, does: no reset arrives, and
/// nothing more. Connections made after [`Silence::now`] reach Redis again.
struct Silence(Arc<AtomicU64>);

impl Silence {
    async fn start(to: u16) -> (u16, Silence) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let epoch = Arc::new(AtomicU64::new(0));
        let e = epoch.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else { continue };
                let (mine, e) = (e.load(Ordering::SeqCst), e.clone());
                let pump = move |mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf| {
                    let e = e.clone();
                    async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if e.load(Ordering::SeqCst) != mine {
                                // Silent: the bytes go nowhere, the sockets stay open.
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                };
                let ((dr, dw), (ur, uw)) = (down.into_split(), up.into_split());
                tokio::spawn(pump(dr, uw));
                tokio::spawn(pump(ur, dw));
            }
        });
        (port, Silence(epoch))
    }

    fn now(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Redis stops answering on keyswap's connection without closing it (its node gone, or a
/// failover behind the same name), and answers new connections. keyswap kept waiting on the
/// dead socket (its own timer fired, redis-rs never saw an error, so never reconnected) until the
/// kernel gave up on it, about 15 minutes: every budget followed its fail mode meanwhile (here,
/// every request refused). Now the first timeout replaces the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_goes_silent_is_reconnected_not_waited_on_for_a_quarter_hour() {
    let meter = Meter::start(Duration::ZERO).await;
    let redis_dir = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let _redis = tokio::task::block_in_place(|| start_redis(redis_dir.path(), redis_port));
    let (proxy_port, silence) = Silence::start(redis_port).await;
    let config = tempfile::tempdir().unwrap();
    let (store, secret) = redis_store(proxy_port);
    let spec = "  key: Gateway\n  window: Day\n  limits: {totalTokens: 1000000}\n  onStoreUnavailable: FailClosed";
    write(config.path(), &gateway(&(budget("shared", "{kind: EgressGateway, name: egress}", spec) + &secret), &store));
    let r = tokio::task::block_in_place(|| Replica::start(config.path(), meter.addr));
    let (status, _, body) = call(r.port, OPENAI, None, &chat(10)).await;
    assert_eq!(status, 200, "{body}");

    silence.now();
    let (status, _, body) = call(r.port, OPENAI, None, &chat(10)).await;
    assert_eq!(status, 503, "FailClosed admitted with Redis silent: {body}");
    let since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, _, body) = call(r.port, OPENAI, None, &chat(10)).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "still no new connection to Redis after 10 s:\n{}",
            r.keyswap.output()
        );
    }
    eprintln!("counted in Redis again {:?} after it went silent", since.elapsed());
}

/// Redis loses its counters while requests are in flight (a restart without persistence, a
/// failover, eviction). Each settlement was an `HINCRBY` of minus what the request reserved but
/// did not use: it re-created the counter below zero, with no expiry, so the key had that much
/// more for the window and a key that never went. A settlement now changes only a counter Redis
/// still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_lost_its_counters_is_not_settled_below_zero() {
    let meter = Meter::start(Duration::from_millis(800)).await;
    let limits = "  key: Gateway\n  window: Day\n  limits: {totalTokens: 100000}";
    let (redis, r) = one_redis_budget(&meter, "shared", limits);
    let port = r.port;
    let in_flight: Vec<_> =
        (0..3).map(|_| tokio::spawn(async move { call(port, OPENAI, None, &chat(2000)).await })).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis_counters(redis.port).is_empty() {
        assert!(Instant::now() < deadline, "nothing was reserved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(redis_cli(redis.port, &["FLUSHALL"]).trim(), "OK");
    for c in in_flight {
        let (status, _, body) = c.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = redis_counters(redis.port);
    assert!(
        left.iter().all(|(_, fields)| fields.values().all(|v| *v >= 0)),
        "a lost counter came back below zero: {left:?}"
    );
    for (key, _) in &left {
        let ttl: i64 = redis_cli(redis.port, &["TTL", key]).trim().parse().unwrap();
        assert!(ttl > 0, "{key} never expires");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_sharing_redis_enforce_one_limit_keep_counts_across_a_restart_and_follow_the_fail_mode() {
    let meter = Meter::start(Duration::ZERO).await;
    let redis_dir = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let mut redis = tokio::task::block_in_place(|| start_redis(redis_dir.path(), redis_port));
    let config = tempfile::tempdir().unwrap();
    let (store, secret) = redis_store(redis_port);
    let budgets = [
        budget("openai-requests", "{name: openai}", "  key: Route\n  window: Day\n  limits: {requests: 6}"),
        budget(
            "anthropic-tokens",
            "{name: anthropic}",
            "  key: Route\n  window: Minute\n  limits: {totalTokens: 100000}\n  onStoreUnavailable: FailClosed",
        ),
        secret,
    ]
    .concat();
    write(config.path(), &gateway(&budgets, &store));
    let (mut a, b) = tokio::task::block_in_place(|| {
        (Replica::start(config.path(), meter.addr), Replica::start(config.path(), meter.addr))
    });

    // One limit across both replicas: 6 requests a day on the route, whoever serves them.
    let mut admitted = 0;
    for i in 0..10 {
        let port = if i % 2 == 0 { a.port } else { b.port };
        let (status, retry, body) = call(port, OPENAI, None, &chat(10)).await;
        match status {
            200 => admitted += 1,
            _ => assert_budget_refusal(status, retry.as_deref(), &body, "default/openai-requests"),
        }
    }
    assert_eq!(admitted, 6, "two replicas admitted {admitted} requests on a shared limit of 6");
    assert_eq!(meter.requests.load(Ordering::SeqCst), 6);

    // A restarted replica finds the counts where they were.
    tokio::task::block_in_place(|| a.restart_keyswap(config.path()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, retry, body) = loop {
        let r = call(a.port, OPENAI, None, &chat(10)).await;
        // Envoy answers 500 until it reconnects to the new keyswap (fail closed).
        if r.0 != 500 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_budget_refusal(status, retry.as_deref(), &body, "default/openai-requests");
    let (status, _, body) = call(a.port, ANTHROPIC, None, &chat(10)).await;
    assert_eq!(status, 200, "{body}");

    // Redis gone: the openai budget fails open (admitted, uncounted), anthropic's fails closed.
    redis.terminate();
    let (status, _, body) = call(b.port, OPENAI, None, &chat(10)).await;
    assert_eq!(status, 200, "FailOpen (the default) refused while Redis was down: {body}");
    let (status, retry, body) = call(b.port, ANTHROPIC, None, &chat(10)).await;
    assert_eq!(status, 503, "FailClosed admitted while Redis was down: {body}");
    assert!(retry.is_some(), "503 without Retry-After");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "budget_store_unavailable", "{body}");
    let m = |d: &str, budget: &str| {
        format!("keyswap_budget_decisions_total{{budget=\"default/{budget}\",decision=\"{d}\"}}")
    };
    assert!(b.metric(&m("store_unavailable_admitted", "openai-requests")).await >= 1.0);
    assert!(b.metric(&m("store_unavailable_refused", "anthropic-tokens")).await >= 1.0);

    // Redis back: served again once the replica reconnects.
    let _redis = tokio::task::block_in_place(|| start_redis(redis_dir.path(), redis_port));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = call(b.port, ANTHROPIC, None, &chat(10)).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "not served after Redis came back: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The outage is logged with where Redis is, never with the URL's password.
    let log = b.keyswap.output();
    assert!(
        log.contains(&format!("Redis at 127.0.0.1:{redis_port}")) && log.contains("budget store unavailable"),
        "{log}"
    );
    for r in [&a, &b] {
        let log = r.keyswap.output();
        assert!(!log.contains(REDIS_PASSWORD), "the Redis password reached the log:\n{log}");
        let metrics = scrape(r.metrics, "/metrics").await.1;
        assert!(!metrics.contains(REDIS_PASSWORD));
    }
}

/// The attack: ask for most of a shared key's budget and hang up while Redis reserves it. The
/// script runs all the same; before, the future that would have held (and given back) the
/// reservation was dropped with the stream, and the key stayed spent, for every agent on it,
/// until its window ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hanging_up_while_redis_reserves_leaves_no_reservation_behind() {
    // Redis holds every command for 300 ms (under keyswap's 500 ms timeout); the agent asks for
    // 2,500 tokens and hangs up after 100 ms.
    let outcome = reservation_no_one_waits_for("300", "  onStoreUnavailable: FailClosed", true).await;
    assert_eq!(outcome, None, "the hung-up request got an answer");
}

/// The attack: an agent (or a burst of them) slows Redis past keyswap's 500 ms timeout. Each
/// request then follows its fail mode, but the script still runs when Redis catches up; what it
/// took was held until the window ended, draining the budget for every agent that shares it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_redis_makes_after_the_timeout_are_given_back_not_held_for_the_window() {
    // Redis holds every command for 1.5 s: the request stops waiting after 500 ms.
    let closed = reservation_no_one_waits_for("1500", "  onStoreUnavailable: FailClosed", false).await;
    let (status, body) = closed.expect("an answer");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("budget_store_unavailable"), "{body}");
    let open = reservation_no_one_waits_for("1500", "", false).await;
    let (status, body) = open.expect("an answer");
    assert_eq!(status, 200, "FailOpen (the default) refused while Redis was slow: {body}");
}

/// One call counted in a Redis of its own, then one for 2,500 tokens while Redis is paused for
/// `pause_ms`, which the agent abandons after 100 ms (`hang_up`) or keyswap after its timeout.
/// Asserts that the script ran for it and that its reservation is given back; returns its
/// answer (status and body), if the agent waited for one.
async fn reservation_no_one_waits_for(pause_ms: &str, fail_mode: &str, hang_up: bool) -> Option<(u16, String)> {
    let meter = Meter::start(Duration::ZERO).await;
    let limits = format!("  key: Gateway\n  window: Day\n  limits: {{totalTokens: 3000}}\n{fail_mode}");
    let (redis, r) = one_redis_budget(&meter, "shared", &limits);
    let redis_port = redis.port;
    let total = || redis_counters(redis_port).iter().map(|(_, f)| f.get("t").copied().unwrap_or(0)).sum::<i64>();
    // A first call: keyswap's connection to Redis is up, the script loaded, and what it used is
    // counted.
    let (status, _, text) = call(r.port, OPENAI, None, &chat(10)).await;
    assert_eq!(status, 200, "{text}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while total() != (INPUT_TOKENS + 10) as i64 {
        assert!(Instant::now() < deadline, "the first call was not settled: {:?}", redis_counters(redis_port));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Settled by one script run (all of it or nothing), which looked for the counter first.
    assert_eq!(redis_calls(redis_port, "exists"), 1);
    let runs_before = script_runs(redis_port);
    let forwarded_before = meter.requests.load(Ordering::SeqCst);
    assert_eq!(redis_cli(redis_port, &["CLIENT", "PAUSE", pause_ms, "ALL"]).trim(), "OK");
    let port = r.port;
    let second = tokio::spawn(async move { call(port, OPENAI, None, &chat(2500)).await });
    let answer = if hang_up {
        tokio::time::sleep(Duration::from_millis(100)).await;
        second.abort();
        None
    } else {
        let (status, _, body) = second.await.unwrap();
        Some((status, body))
    };
    // The script ran for it once Redis went on (proof that there was something to give back) …
    let deadline = Instant::now() + Duration::from_secs(10);
    while script_runs(redis_port) == runs_before {
        assert!(Instant::now() < deadline, "the reservation never ran: the test proved nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(script_runs(redis_port), runs_before + 1);
    // … and whatever it took is given back: the counters return to the first call's usage.
    let deadline = Instant::now() + Duration::from_secs(5);
    while total() != (INPUT_TOKENS + 10) as i64 {
        assert!(
            Instant::now() < deadline,
            "a reservation outlived the request that stopped waiting for it: {:?}\n{}",
            redis_counters(redis_port),
            r.keyswap.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Counted once, as what the request got: never also as admitted.
    let admitted = r.metric("keyswap_budget_decisions_total{budget=\"default/shared\",decision=\"admitted\"}").await;
    assert_eq!(admitted, 1.0, "{}", r.keyswap.output());
    let forwarded = meter.requests.load(Ordering::SeqCst) - forwarded_before;
    let admitted_uncounted = matches!(answer, Some((200, _)));
    assert_eq!(forwarded, u64::from(admitted_uncounted), "forwarded without an admission");
    // Redis is usable again at once for the next request.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, text) = call(r.port, OPENAI, None, &chat(2500)).await;
    assert_eq!(status, 200, "{text}");
    answer
}

/// How many times Redis has run keyswap's reservation script for a one-budget request: the
/// script's `HMGET` (commandstats counts what scripts run; the settlement script runs `EXISTS`).
fn script_runs(port: u16) -> u64 {
    redis_calls(port, "hmget")
}

/// How many times Redis has run `command` (lowercase), from `INFO commandstats`.
fn redis_calls(port: u16, command: &str) -> u64 {
    let stats = redis_cli(port, &["INFO", "commandstats"]);
    let line = stats.lines().find(|l| l.starts_with(&format!("cmdstat_{command}:"))).unwrap_or("");
    line.split(['=', ',']).nth(1).map_or(0, |n| n.parse().unwrap())
}

/// The attack: one agent opens 1,100 requests on one HTTP/2 connection and never finishes their
/// bodies. Each holds an ext_proc stream to keyswap open (a budget reads the whole body first);
/// with Envoy's default of 1,024 requests per cluster, every other agent's request then failed
/// closed with 500. (A busy hour of long streamed answers did the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_holding_a_thousand_requests_open_does_not_shut_the_gateway_for_others() {
    let meter = Meter::start(Duration::ZERO).await;
    let limits = "  key: Gateway\n  window: Day\n  limits: {totalTokens: 100000000}";
    let (_config, r) = one_budget(&meter, "big", "{kind: EgressGateway, name: egress}", limits);
    // Over two connections: Envoy lets a downstream HTTP/2 connection have 1,024 streams at once.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut sender = h2_connection(r.port).await;
        for _ in 0..550 {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"{")))).await.unwrap();
            let req = openai_frames(tokio_stream::wrappers::ReceiverStream::new(rx));
            sender.ready().await.unwrap();
            let pending = sender.send_request(req);
            held.push((tx, tokio::spawn(pending)));
        }
    }
    // Envoy has every held request (and has opened an ext_proc stream to keyswap for each).
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.envoy_stat("http.egress.downstream_rq_active").await < 1100 {
        assert!(Instant::now() < deadline, "Envoy never held 1,100 requests: the test proved nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, text) = call(r.port, OPENAI, None, &chat(10)).await;
    assert_eq!(status, 200, "another agent's request failed while one agent held requests open: {text}");
    assert_eq!(r.envoy_stat("cluster.keyswap.upstream_rq_pending_overflow").await, 0);
    assert!(r.envoy_stat("cluster.keyswap.upstream_rq_active").await >= 1100, "the held streams were not open");
    assert_eq!(meter.requests.load(Ordering::SeqCst), 1, "a held request reached the provider");
    drop(held);
}

/// The attack: one agent holds request after request open, each a body it never finishes (Envoy
/// buffers what a token budget or SigV4 reads, up to 9 MiB each), until the gateway's memory or
/// its provider connections are gone for every agent. A budget's `concurrentRequests` bounds
/// what one key holds: past it, 429 at the request's headers, before Envoy reads (or buffers) its
/// body; other agents go on, and a place is given back when a request ends. Twice: a budget
/// that reads bodies (they are buffered) and one of requests in flight alone (they stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_at_its_concurrent_requests_is_refused_at_the_headers_and_others_go_on() {
    for limits in ["{totalTokens: 100000000, concurrentRequests: 3}", "{concurrentRequests: 3}"] {
        let meter = Meter::start(Duration::ZERO).await;
        let spec = format!("  key: Agent\n  window: Day\n  limits: {limits}");
        let (_config, r) = one_budget(&meter, "per-agent", "{kind: EgressGateway, name: egress}", &spec);
        let mut sender = h2_connection(r.port).await;
        let held_request = |sender: &mut hyper::client::conn::http2::SendRequest<Frames>, token: &str| {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.try_send(Ok(hyper::body::Frame::data(Bytes::from_static(b"{\"model\":\"gpt-4o-mini\",")))).unwrap();
            let mut req = openai_frames(tokio_stream::wrappers::ReceiverStream::new(rx));
            req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            (tx, sender.send_request(req))
        };
        let mut held = Vec::new();
        for _ in 0..3 {
            sender.ready().await.unwrap();
            held.push(held_request(&mut sender, ACME_TOKEN));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.envoy_stat("cluster.keyswap.upstream_rq_active").await < 3 {
            assert!(Instant::now() < deadline, "{limits}: Envoy never held the three requests");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let in_flight = "keyswap_budget_requests_in_flight{budget=\"default/per-agent\"}";
        assert_eq!(r.metric(in_flight).await, 3.0, "{limits}: the gauge of requests in flight");
        // The fourth: refused at its headers, though its body never ends.
        sender.ready().await.unwrap();
        let (_tx4, fourth) = held_request(&mut sender, ACME_TOKEN);
        let resp = tokio::time::timeout(Duration::from_secs(5), fourth)
            .await
            .unwrap_or_else(|_| panic!("{limits}: the fourth request waited for its body"))
            .unwrap();
        let (status, retry) = (resp.status().as_u16(), resp.headers().get("retry-after").cloned());
        let body = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
        assert_budget_refusal(status, retry.as_ref().map(|v| v.to_str().unwrap()), &body, "default/per-agent");
        assert_eq!(retry.unwrap(), "1", "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["error"]["limit"].as_str(), v["error"]["limit_value"].as_u64()),
            (Some("concurrent_requests"), Some(3))
        );
        // Another agent has its own places.
        assert_eq!(call(r.port, OPENAI, Some(GLOBEX_TOKEN), &chat(10)).await.0, 200, "{limits}");
        // One held request ends: its place is acme's again.
        let (tx, pending) = held.pop().unwrap();
        tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"\"max_tokens\":5,\"messages\":[]}")))).await.unwrap();
        drop(tx);
        let resp = tokio::time::timeout(Duration::from_secs(10), pending).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200, "{limits}");
        let _ = resp.into_body().collect().await;
        let status = acme_call_once_a_place_is_free(r.port).await;
        assert_eq!(status, 200, "{limits}: the ended request's place was never given back");
        // The two still held (the last call's stream may end just after its answer did).
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.metric(in_flight).await != 2.0 {
            assert!(Instant::now() < deadline, "{limits}: the gauge is not 2 once the others ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let limited = "keyswap_budget_decisions_total{budget=\"default/per-agent\",decision=\"limited\"}";
        assert!(r.metric(limited).await >= 1.0, "{limits}: the refusal was not counted");
        // Only globex's, the ended one and acme's last reached the provider; none of the refused.
        assert_eq!(meter.requests.load(Ordering::SeqCst), 3, "{limits}: a refused request reached the provider");
        drop(held);
    }
}

/// The attack, on an allow-all gateway: a path of a budgeted host that no route matches is
/// passed through, and went through without a budget, so without a place among the agent's
/// requests in flight; the host's fixed phases still make Envoy buffer each body for keyswap. An
/// agent held any number of such bodies past its `concurrentRequests`. The gateway's budgets
/// bound passed-through requests in flight too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_cannot_hold_bodies_past_its_limit_through_a_path_no_route_matches() {
    let meter = Meter::start(Duration::ZERO).await;
    let config = tempfile::tempdir().unwrap();
    let spec = "  key: Agent\n  window: Day\n  limits: {totalTokens: 100000000, concurrentRequests: 2}";
    let text = gateway(&budget("per-agent", "{kind: EgressGateway, name: egress}", spec), "")
        .replace("defaultPolicy: deny-all", "defaultPolicy: allow-all")
        .replace(
            "rules: [{matches: [{provider: openai}]}]",
            "rules: [{matches: [{provider: openai, endpoints: ['/v1/chat/*']}]}]",
        );
    write(config.path(), &text);
    let r = tokio::task::block_in_place(|| Replica::start_with(config.path(), meter.addr, false));
    let mut sender = h2_connection(r.port).await;
    let unrouted = |sender: &mut hyper::client::conn::http2::SendRequest<Frames>| {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.try_send(Ok(hyper::body::Frame::data(Bytes::from_static(b"{\"purpose\":\"held\",")))).unwrap();
        let mut req = openai_frames(tokio_stream::wrappers::ReceiverStream::new(rx));
        *req.uri_mut() = format!("http://{OPENAI}/v1/uploads").parse().unwrap();
        req.headers_mut().insert("authorization", format!("Bearer {ACME_TOKEN}").parse().unwrap());
        (tx, sender.send_request(req))
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        sender.ready().await.unwrap();
        held.push(unrouted(&mut sender));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.envoy_stat("cluster.keyswap.upstream_rq_active").await < 2 {
        assert!(Instant::now() < deadline, "Envoy never held the two requests");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A third: refused at its headers, though its body never ends.
    sender.ready().await.unwrap();
    let (_tx3, third) = unrouted(&mut sender);
    let resp = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third request waited for its body: it held no place")
        .unwrap();
    let (status, retry) = (resp.status().as_u16(), resp.headers().get("retry-after").cloned());
    let body = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    assert_budget_refusal(status, retry.as_ref().map(|v| v.to_str().unwrap()), &body, "default/per-agent");
    assert!(body.contains("concurrent_requests"), "{body}");
    // The agent's routed calls count among the same places; another agent has its own.
    assert_eq!(call(r.port, OPENAI, Some(ACME_TOKEN), &chat(10)).await.0, 429);
    assert_eq!(call(r.port, OPENAI, Some(GLOBEX_TOKEN), &chat(10)).await.0, 200);
    // One held upload ends: its place is acme's again.
    let (tx, pending) = held.pop().unwrap();
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"\"bytes\":1}")))).await.unwrap();
    drop(tx);
    let resp = tokio::time::timeout(Duration::from_secs(10), pending).await.unwrap().unwrap();
    let _ = resp.into_body().collect().await;
    assert_eq!(acme_call_once_a_place_is_free(r.port).await, 200, "the ended upload's place was never given back");
    drop(held);
}

/// The attack: one agent holds streamed responses open (each a long generation it reads
/// slowly, or not at all), each holding a provider connection and Envoy's buffers. Envoy ends
/// keyswap's stream for a request once it expects no more messages on it: a budget that reads no
/// bodies gave back the request's place at the response headers, and the agent could hold any
/// number of streams. A place is held until the response ends, on every filter a route runs
/// (the observing one too).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_holding_streamed_responses_open_holds_its_places_until_they_end() {
    let cases = [
        ("{concurrentRequests: 2}", false),
        ("{totalTokens: 100000000, concurrentRequests: 2}", false),
        ("{totalTokens: 100000000, concurrentRequests: 2}", true),
    ];
    for (limits, observe) in cases {
        let meter = Meter::start(Duration::ZERO).await;
        let spec = format!("  key: Agent\n  window: Day\n  limits: {limits}");
        let (_config, r) = one_budget_with(&meter, "per-agent", "{kind: EgressGateway, name: egress}", &spec, observe);
        let body =
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"max_tokens":20,"messages":[]}"#;
        let open = async || {
            let req = hyper::Request::builder()
                .method("POST")
                .uri(format!("http://127.0.0.1:{}/v1/chat/completions?hold", r.port))
                .header("host", OPENAI)
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {ACME_TOKEN}"))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            client().request(req).await.unwrap()
        };
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut resp = open().await;
            assert_eq!(resp.status(), 200, "{limits}");
            // The first event arrived: the response is under way, its headers long answered.
            let first = resp.body_mut().frame().await.unwrap().unwrap().into_data().unwrap();
            assert!(first.starts_with(b"data: "), "{first:?}");
            held.push(resp);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let third = open().await;
        let status = third.status().as_u16();
        let text = String::from_utf8_lossy(&third.into_body().collect().await.unwrap().to_bytes()).into_owned();
        assert_eq!(status, 429, "{limits} observe={observe}: a third stream while two are open: {text}");
        assert!(text.contains("concurrent_requests"), "{text}");
        assert_eq!(call(r.port, OPENAI, Some(GLOBEX_TOKEN), &chat(10)).await.0, 200, "another agent");
        // The streams end: their places are acme's again.
        meter.hold.notify_waiters();
        for resp in held {
            let _ = resp.into_body().collect().await;
        }
        let status = acme_call_once_a_place_is_free(r.port).await;
        assert_eq!(status, 200, "{limits} observe={observe}: the ended streams' places were never given back");
    }
}

/// An acme call, repeated until it is admitted (a place given back reaches keyswap when Envoy
/// closes the ended request's stream) or 5 s have passed: its last status.
async fn acme_call_once_a_place_is_free(port: u16) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = call(port, OPENAI, Some(ACME_TOKEN), &chat(10)).await.0;
        if status == 200 || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The attack: HTTP/2 request headers without END_STREAM, then trailers and no DATA. Envoy sends
/// keyswap no body message for such a request, and the budget waited for one before reserving:
/// the request went on with the key and was never counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_headers_and_trailers_only_cannot_skip_its_budget() {
    let meter = Meter::start(Duration::ZERO).await;
    let limits = "  key: Gateway\n  window: Day\n  limits: {totalTokens: 100000}";
    let (_config, r) = one_budget(&meter, "big", "{kind: EgressGateway, name: egress}", limits);
    let mut sender = h2_connection(r.port).await;
    let trailers = || {
        let mut t = hyper::HeaderMap::new();
        t.insert("x-end", "1".parse().unwrap());
        Ok(hyper::body::Frame::trailers(t))
    };
    let (status, text) = h2_call(&mut sender, openai_frames(tokio_stream::iter([trailers()]))).await;
    assert_eq!(meter.requests.load(Ordering::SeqCst), 0, "forwarded without a budget decision: {status} {text}");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("body_required"), "{text}");
    // A body followed by trailers: Envoy sends it as a body that has not ended, which keyswap
    // cannot reserve by either (refused, as a body larger than the buffer is).
    let frames = [Ok(hyper::body::Frame::data(Bytes::from(chat(10)))), trailers()];
    let (status, text) = h2_call(&mut sender, openai_frames(tokio_stream::iter(frames))).await;
    assert_eq!((status, meter.requests.load(Ordering::SeqCst)), (413, 0), "{text}");
}

/// A request body sent frame by frame over an agent's HTTP/2 connection.
type Frames = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// An agent's HTTP/2 connection (prior knowledge) to the Envoy listening on `port`.
async fn h2_connection(port: u16) -> hyper::client::conn::http2::SendRequest<Frames> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// A Chat Completions POST whose body is `frames`, as they come (data, trailers, or held open).
fn openai_frames(
    frames: impl futures_util::Stream<Item = Result<hyper::body::Frame<Bytes>, Infallible>> + Send + 'static,
) -> hyper::Request<Frames> {
    hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{OPENAI}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(frames)))
        .unwrap()
}

/// Sends `req` on `sender`: the status and body of the answer.
async fn h2_call(
    sender: &mut hyper::client::conn::http2::SendRequest<Frames>,
    req: hyper::Request<Frames>,
) -> (u16, String) {
    sender.ready().await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    (status, String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned())
}

/// The attack: `max_tokens` far past any model's on a budget that limits only input tokens, in
/// Redis. The output and total counters, checked against no limit, add every reservation; at the
/// top of an `i64`, `HINCRBY` fails the script, which read as the store being down (every budget
/// of the replica then failed open or closed). They saturate instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_reservations_on_an_input_only_redis_budget_saturate_instead_of_failing_the_store() {
    let meter = Meter::start(Duration::ZERO).await;
    let limits = "  key: Gateway\n  window: Day\n  limits: {inputTokens: 1000000}";
    let (redis, r) = one_redis_budget(&meter, "input-only", limits);
    let redis_port = redis.port;
    // Counters already at the top, as a window of such requests leaves them.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let key = format!("keyswap:budget:{{default/input-only}}:{}:*", now - now % 86_400);
    let top = (i64::MAX - 10).to_string();
    redis_cli(redis_port, &["HSET", &key, "o", &top, "t", &top]);
    for _ in 0..2 {
        let (status, _, text) = call(r.port, OPENAI, None, &chat(1_000_000_000_000_000)).await;
        assert_eq!(status, 200, "{text}");
    }
    let decisions = |d: &'static str| {
        let r = &r;
        async move {
            r.metric(&format!("keyswap_budget_decisions_total{{budget=\"default/input-only\",decision=\"{d}\"}}")).await
        }
    };
    assert_eq!(decisions("admitted").await, 2.0, "{}", r.keyswap.output());
    assert_eq!(decisions("store_unavailable_admitted").await, 0.0, "{}", r.keyswap.output());
    let fields: std::collections::BTreeMap<String, i64> =
        redis_counters(redis_port).into_iter().find(|(k, _)| *k == key).expect("the counter").1;
    assert!(fields["o"] > 0 && fields["t"] > 0, "{fields:?}");
    assert!(fields["i"] > 0 && fields["i"] < 1_000_000, "{fields:?}");
}

/// Debian's `redis-cli` (beside `redis-server`) against the test Redis on `port`: its output.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "-a", REDIS_PASSWORD, "--no-auth-warning"])
        .args(args)
        .output()
        .expect("redis-cli is missing: apt-get install redis-tools (scripts/test installs redis-server with it)");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// What Redis holds for every budget counter: (key, field → value).
fn redis_counters(port: u16) -> Vec<(String, std::collections::BTreeMap<String, i64>)> {
    let cli = |args: &[&str]| redis_cli(port, args);
    let keys = cli(&["--scan", "--pattern", "keyswap:budget:*"]);
    let mut keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let all = cli(&["HGETALL", k]);
            let lines: Vec<&str> = all.lines().collect();
            let fields = lines.chunks(2).map(|p| (p[0].to_owned(), p[1].parse().unwrap())).collect();
            (k.to_owned(), fields)
        })
        .collect()
}

/// A rolling restart with a streamed answer in flight: keyswap drains the stream, and the
/// settlement it ends with reaches Redis before the process exits, so the replicas see what the
/// call used, not the 5,000 tokens it reserved (kept until the window ends, a day here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_mid_stream_settles_its_redis_reservation_before_it_exits() {
    let meter = Meter::start(Duration::ZERO).await;
    let spec = "  key: Route\n  window: Day\n  limits: {totalTokens: 1000000}";
    let redis =
        tokio::task::block_in_place(|| RedisConfig::start(&budget("anthropic-tokens", "{name: anthropic}", spec)));
    let redis_port = redis.port;
    let mut r = tokio::task::block_in_place(|| Replica::start(redis.config.path(), meter.addr));
    let port = r.port;
    let body = r#"{"model":"claude-x","max_tokens":5000,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let call = tokio::spawn(async move { call_path(port, ANTHROPIC, "/v1/messages?hold", None, body).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while meter.requests.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the stream never reached the provider:\n{}", r.keyswap.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reserved = redis_counters(redis_port);
    assert!(reserved.len() == 1 && reserved[0].1["o"] >= 5000, "reserved before the answer: {reserved:?}");

    let pid = r.keyswap.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // keyswap drains: the stream goes on to its end (its first event, the one with usage).
    tokio::time::sleep(Duration::from_millis(300)).await;
    meter.hold.notify_one();
    let (status, _, text) = call.await.unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("message_start"), "{text}");
    let exit = tokio::task::block_in_place(|| r.keyswap.terminate());
    let log = r.keyswap.output();
    assert!(exit.success(), "{exit}\n{log}");

    // The stream ended after `message_start`, without its final count: 10 tokens in, as the
    // provider reported, and as output the bytes that passed (its 1 was a placeholder).
    let settled = redis_counters(redis_port);
    assert_eq!(settled.len(), 1, "{settled:?}");
    let out = text.len() as i64;
    let want: std::collections::BTreeMap<String, i64> =
        [("r", 1), ("i", INPUT_TOKENS as i64), ("o", out), ("t", INPUT_TOKENS as i64 + out)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
    assert_eq!(settled[0].1, want, "the settlement did not reach Redis before exit:\n{log}");
    assert!(!log.contains("did not reach Redis"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_changes_in_the_config_directory_apply_without_a_restart() {
    let meter = Meter::start(Duration::ZERO).await;
    let config = tempfile::tempdir().unwrap();
    let with_limit = |requests: u32| {
        gateway(
            &budget(
                "hourly",
                "{name: openai}",
                &format!("  key: Route\n  window: Hour\n  limits: {{requests: {requests}}}"),
            ),
            "",
        )
    };
    write(config.path(), &with_limit(1));
    let r = tokio::task::block_in_place(|| Replica::start(config.path(), meter.addr));
    assert_eq!(call(r.port, OPENAI, None, &chat(5)).await.0, 200);
    let (status, retry, body) = call(r.port, OPENAI, None, &chat(5)).await;
    assert_budget_refusal(status, retry.as_deref(), &body, "default/hourly");
    // Raised: the request already counted stays counted, one more fits.
    write(config.path(), &with_limit(2));
    let since = Instant::now();
    while call(r.port, OPENAI, None, &chat(5)).await.0 != 200 {
        assert!(since.elapsed() < Duration::from_secs(3), "the raised limit never applied:\n{}", r.keyswap.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(call(r.port, OPENAI, None, &chat(5)).await.0, 429, "2 of 2 used");
    // A broken edit (a limit that is not a number) is refused; the last good budget keeps serving.
    write(config.path(), &with_limit(2).replace("requests: 2", "requests: lots"));
    // Reported once the file has settled (a file broken under a second ago may still be being
    // written: its last version stays meanwhile).
    let since = Instant::now();
    while !r.keyswap.output().contains("spec.limits.requests") {
        assert!(since.elapsed() < Duration::from_secs(4), "the broken edit never reported:\n{}", r.keyswap.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(call(r.port, OPENAI, None, &chat(5)).await.0, 429, "a broken edit dropped the budget");
    let log = r.keyswap.output();
    assert!(log.contains("TokenBudget default/hourly") && log.contains("spec.limits.requests"), "{log}");
    // Removed: no limit.
    write(config.path(), &gateway("", ""));
    let since = Instant::now();
    while call(r.port, OPENAI, None, &chat(5)).await.0 != 200 {
        assert!(since.elapsed() < Duration::from_secs(3), "the removed budget still applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// === attacks: the agent tries to spend past its budget ===

/// A gateway whose `acme` tenant (and every other) has 1,000 tokens a day.
fn acme_budget(meter: &Meter) -> (tempfile::TempDir, Replica) {
    one_budget(meter, "acme-daily", "{kind: EgressGateway, name: egress}", ACME_DAILY)
}

const ACME_DAILY: &str = "  key: Tenant\n  window: Day\n  limits: {totalTokens: 1000}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_dodge_its_budget_by_omitting_or_garbling_max_tokens() {
    let meter = Meter::start(Duration::ZERO).await;
    let (_config, r) = acme_budget(&meter);
    // No max_tokens, a string, a negative number, a float, a huge number: each reserves the
    // budget's default (4096 > 1000) or more, so none fits; nothing reaches the provider.
    for limit in [
        "",
        r#","max_tokens":"1""#,
        r#","max_tokens":-5"#,
        r#","max_tokens":1.5"#,
        r#","max_tokens":18446744073709551615"#,
        r#","max_tokens":1e30"#,
    ] {
        let body = format!(r#"{{"model":"gpt-4o"{limit},"messages":[]}}"#);
        let (status, retry, text) = call(r.port, OPENAI, Some(ACME_TOKEN), &body).await;
        assert_budget_refusal(status, retry.as_deref(), &text, "default/acme-daily");
    }
    // Two names for the limit: the larger counts.
    let (status, _, text) =
        call(r.port, OPENAI, Some(ACME_TOKEN), r#"{"max_tokens":1,"max_completion_tokens":5000}"#).await;
    assert_eq!(status, 429, "{text}");
    assert_eq!(meter.requests.load(Ordering::SeqCst), 0, "a refused request reached the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_shrink_its_reservation_with_repeated_keys_lax_numbers_several_choices_or_a_compressed_body() {
    let meter = Meter::start(Duration::ZERO).await;
    // 1,000 tokens a day, 50 output tokens reserved when a request sets no limit: a request the
    // budget cannot read must not be reserved at 50 and then generate thousands.
    let spec = "  key: Tenant\n  window: Day\n  limits: {totalTokens: 1000}\n  reservation: {defaultOutputTokens: 50}";
    let (_config, r) = one_budget(&meter, "acme-daily", "{kind: EgressGateway, name: egress}", spec);
    for body in [
        // The provider's parser takes the last of a repeated key.
        r#"{"model":"gpt-4o-mini","max_tokens":1,"max_tokens":5000,"messages":[]}"#,
        r#"{"model":"gpt-4o-mini","max_tokens":5000,"max_tokens":1,"messages":[]}"#,
        // A lenient provider reads these as 5000.
        r#"{"model":"gpt-4o-mini","max_tokens":"5000","messages":[]}"#,
        r#"{"model":"gpt-4o-mini","max_tokens":5000.0,"messages":[]}"#,
        r#"{"model":"gpt-4o-mini","max\u005ftokens":5000,"messages":[]}"#,
        // 20 choices of 100 tokens each.
        r#"{"model":"gpt-4o-mini","max_tokens":100,"n":20,"messages":[]}"#,
    ] {
        let (status, retry, text) = call(r.port, OPENAI, Some(ACME_TOKEN), body).await;
        assert_budget_refusal(status, retry.as_deref(), &text, "default/acme-daily");
    }
    // A limit after a lone surrogate escape, where serde_json stops and lenient parsers
    // (Python's, JavaScript's, Go's) read on: read the way they read it, and refused for it.
    let surrogate = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\ud800"}],"max_tokens":5000}"#;
    let (status, retry, text) = call(r.port, OPENAI, Some(ACME_TOKEN), surrogate).await;
    assert_budget_refusal(status, retry.as_deref(), &text, "default/acme-daily");
    // A limit after nesting past serde_json's 128 levels (Python reads 1,000): reserved at the
    // default, the provider would have served 5,000. Refused, 400, nothing forwarded.
    let deep = format!(
        r#"{{"model":"gpt-4o-mini","x":{}1{},"max_tokens":5000,"messages":[]}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let (status, _, text) = call(r.port, OPENAI, Some(ACME_TOKEN), &deep).await;
    assert_eq!(status, 400, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON reason");
    assert_eq!(v["error"]["type"], "budget_unreadable_request", "{text}");
    assert_eq!(v["error"]["budget"], "default/acme-daily", "{text}");
    assert_eq!(
        r.metric(r#"keyswap_budget_decisions_total{budget="default/acme-daily",decision="unreadable"}"#).await,
        1.0
    );
    // A gzip body: its bytes bound nothing and its limit is unreadable until decompressed.
    let json = br#"{"model":"gpt-4o-mini","max_tokens":5000,"messages":[]}"#;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, json).unwrap();
    let gzipped = Bytes::from(gz.finish().unwrap());
    for encoding in ["gzip", "GZIP", "identity, gzip", "br"] {
        let req = hyper::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1:{}/v1/chat/completions", r.port))
            .header("host", OPENAI)
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .header("authorization", format!("Bearer {ACME_TOKEN}"))
            .body(Full::new(gzipped.clone()))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        let status = resp.status().as_u16();
        let text = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
        assert_eq!(status, 415, "content-encoding {encoding}: {text}");
        assert!(text.contains("request_body_encoded") && !text.contains(REAL_KEY), "{text}");
    }
    assert_eq!(meter.requests.load(Ordering::SeqCst), 0, "a request the budget could not read reached the provider");
    // What the budget can read still goes through, and is counted.
    let (status, _, text) = call(r.port, OPENAI, Some(ACME_TOKEN), &chat(100)).await;
    assert_eq!(status, 200, "{text}");
    // `identity` is no encoding.
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{}/v1/chat/completions", r.port))
        .header("host", OPENAI)
        .header("content-encoding", "identity")
        .header("authorization", format!("Bearer {ACME_TOKEN}"))
        .body(Full::new(Bytes::from(chat(100))))
        .unwrap();
    assert_eq!(client().request(req).await.unwrap().status(), 200);
    assert!(meter.served.load(Ordering::SeqCst) <= 1000, "the provider served past the budget");
    assert_eq!(r.metric(r#"keyswap_denials_total{reason="body_encoded"}"#).await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_cannot_overspend_by_continuing_a_stored_conversation_its_body_does_not_carry() {
    let meter = Meter::start(Duration::from_millis(300)).await;
    // Each continued conversation adds 300 input tokens the 100-byte body does not bound.
    let spec =
        "  key: Tenant\n  window: Day\n  limits: {totalTokens: 1000}\n  reservation: {referencedInputTokens: 300}";
    let (_config, r) = one_budget(&meter, "acme-daily", "{kind: EgressGateway, name: egress}", spec);
    let body = r#"{"model":"gpt-4o-mini","previous_response_id":"resp_abc","max_tokens":100,"messages":[]}"#;
    let calls = (0..20).map(|_| call(r.port, OPENAI, Some(ACME_TOKEN), body));
    let results = futures_util::future::join_all(calls).await;
    let admitted = results.iter().filter(|(s, _, _)| *s == 200).count() as u64;
    for (status, retry, text) in results.iter().filter(|(s, _, _)| *s != 200) {
        assert_budget_refusal(*status, retry.as_deref(), text, "default/acme-daily");
    }
    let served = meter.served.load(Ordering::SeqCst);
    assert!(served <= 1000, "the provider served {served} tokens on a 1000-token budget ({admitted} admitted)");
    assert!(admitted >= 1, "nothing admitted");
    assert_eq!(meter.requests.load(Ordering::SeqCst), admitted, "a refused request reached the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_asking_for_compressed_answers_cannot_hide_its_usage_from_its_budget() {
    let meter = Meter::start(Duration::ZERO).await;
    let (_config, r) = acme_budget(&meter);
    let settled = || r.metric("keyswap_budget_tokens_total{budget=\"default/acme-daily\",kind=\"settled\"}");
    // The official SDKs send `accept-encoding: gzip, deflate`; the provider gzips JSON for them.
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{}/v1/chat/completions", r.port))
        .header("host", OPENAI)
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip, deflate")
        .header("authorization", format!("Bearer {ACME_TOKEN}"))
        .body(Full::new(Bytes::from(chat(40))))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    // keyswap asked for the answer uncompressed: it read the usage, the agent got plain JSON.
    let v: serde_json::Value = serde_json::from_slice(&body).expect("an uncompressed answer");
    assert_eq!(v["usage"]["completion_tokens"], 40);
    assert!(
        meter.seen.lock().unwrap()[0].contains(r#""accept-encoding": "identity""#),
        "{:?}",
        meter.seen.lock().unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while settled().await == 0.0 {
        assert!(Instant::now() < deadline, "never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Settled to what the provider counted, not kept at the reservation (body bytes + 40).
    assert_eq!(settled().await, (INPUT_TOKENS + 40) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_spend_another_tenants_budget_or_escape_its_own_by_sending_headers() {
    let meter = Meter::start(Duration::ZERO).await;
    let (_config, r) = acme_budget(&meter);
    // Spend acme's budget.
    while call(r.port, OPENAI, Some(ACME_TOKEN), &chat(200)).await.0 == 200 {}
    // Identity headers an agent might try: the tenant comes from the verified token only.
    let mut b = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{}/v1/chat/completions", r.port))
        .header("host", OPENAI)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {ACME_TOKEN}"));
    for (k, v) in [("x-keyswap-tenant", "globex"), ("x-tenant", "globex"), ("x-keyswap-agent", "globex-bot")] {
        b = b.header(k, v);
    }
    let resp = client().request(b.body(Full::new(Bytes::from(chat(200)))).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 429, "a header moved acme's request to another tenant's budget");
    // Anonymous callers share one counter of their own, not acme's.
    assert_eq!(call(r.port, OPENAI, None, &chat(200)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_larger_than_the_budget_is_refused_before_it_reaches_the_provider() {
    let meter = Meter::start(Duration::ZERO).await;
    let (_config, r) = acme_budget(&meter);
    // 2,000 bytes of prompt with max_tokens 1: its input alone may be 2,000 tokens.
    let big = format!(
        r#"{{"model":"gpt-4o","max_tokens":1,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(2000)
    );
    let (status, retry, text) = call(r.port, OPENAI, Some(ACME_TOKEN), &big).await;
    assert_budget_refusal(status, retry.as_deref(), &text, "default/acme-daily");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["error"]["requested"].as_u64().unwrap() > 2000, "{text}");
    // Sent chunked, without a content-length: Envoy buffers it all the same.
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{}/v1/chat/completions", r.port))
        .header("host", OPENAI)
        .header("authorization", format!("Bearer {ACME_TOKEN}"))
        .body(http_body_util::StreamBody::new(tokio_stream::iter(
            big.into_bytes()
                .chunks(100)
                .map(|c| Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
                .collect::<Vec<_>>(),
        )))
        .unwrap();
    let chunked: hyper_util::client::legacy::Client<_, http_body_util::StreamBody<_>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let resp = chunked.request(req).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(meter.requests.load(Ordering::SeqCst), 0, "a refused request reached the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_private_ca_and_a_password() {
    let meter = Meter::start(Duration::ZERO).await;
    let redis_dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = provider_certs(&["127.0.0.1"], redis_dir.path());
    let port = free_port();
    let mut cmd = Command::new(redis_bin());
    cmd.args([
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .args(["--requirepass", REDIS_PASSWORD, "--tls-auth-clients", "no"])
    .arg("--tls-cert-file")
    .arg(redis_dir.path().join("provider-leaf.pem"))
    .arg("--tls-key-file")
    .arg(redis_dir.path().join("provider-leaf.key"))
    .arg("--dir")
    .arg(redis_dir.path());
    let mut redis = Proc::spawn("redis-server", cmd, redis_dir.path().join("redis.log"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        redis.assert_running();
        assert!(Instant::now() < deadline, "redis-server (TLS) did not listen:\n{}", redis.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    let ca_pem = std::fs::read_to_string(ca).unwrap().replace('\n', "\n    ");
    let secret = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: budget-redis}}\nstringData:\n  url: \"rediss://:{REDIS_PASSWORD}@127.0.0.1:{port}/0\"\n  ca.crt: |\n    {ca_pem}\n"
    );
    let store = "budgetStore: {redis: {secretRef: {name: budget-redis}, caKey: ca.crt}}";
    let b = budget(
        "tls",
        "{name: openai}",
        "  key: Route\n  window: Day\n  limits: {requests: 2}\n  onStoreUnavailable: FailClosed",
    );
    let config = tempfile::tempdir().unwrap();
    write(config.path(), &gateway(&(b + &secret), store));
    let r = tokio::task::block_in_place(|| Replica::start(config.path(), meter.addr));
    // Counted in Redis over TLS (FailClosed: a failed handshake would answer 503).
    for _ in 0..2 {
        let (status, _, body) = call(r.port, OPENAI, None, &chat(5)).await;
        assert_eq!(status, 200, "{body}\n{}", r.keyswap.output());
    }
    let (status, retry, body) = call(r.port, OPENAI, None, &chat(5)).await;
    assert_budget_refusal(status, retry.as_deref(), &body, "default/tls");
    assert!(!r.keyswap.output().contains(REDIS_PASSWORD));
    // The wrong CA: the handshake fails, and the budget fails closed.
    let other_dir = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = provider_certs(&["127.0.0.1"], other_dir.path());
    let wrong = secret.replace(
        &std::fs::read_to_string(redis_dir.path().join("provider-ca.pem")).unwrap().replace('\n', "\n    "),
        &std::fs::read_to_string(other_ca).unwrap().replace('\n', "\n    "),
    );
    assert_ne!(wrong, secret);
    let b = budget(
        "tls",
        "{name: openai}",
        "  key: Route\n  window: Day\n  limits: {requests: 100}\n  onStoreUnavailable: FailClosed",
    );
    write(config.path(), &gateway(&(b + &wrong), store));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, body) = call(r.port, OPENAI, None, &chat(5)).await;
        if status == 503 {
            assert!(body.contains("budget_store_unavailable"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "a Redis with an untrusted certificate was used: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_the_budget_decision_and_what_is_left() {
    use common::otlp::{i, s, Receiver};
    let (collector, collector_addr) = Receiver::start().await;
    let meter = Meter::start(Duration::ZERO).await;
    let config = tempfile::tempdir().unwrap();
    write(config.path(), &gateway(&budget("acme-daily", "{kind: EgressGateway, name: egress}", ACME_DAILY), ""));
    let endpoint = format!("http://{collector_addr}");
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")];
    let r = tokio::task::block_in_place(|| Replica::start_env(config.path(), meter.addr, &env));
    let body = chat(100);
    assert_eq!(call(r.port, OPENAI, Some(ACME_TOKEN), &body).await.0, 200);
    let big = chat(5000);
    assert_eq!(call(r.port, OPENAI, Some(ACME_TOKEN), &big).await.0, 429);
    let spans = collector.wait_for(2).await;
    let (_, admitted) = spans
        .iter()
        .find(|(_, sp)| i(&sp.attributes, "http.response.status_code") == Some(200))
        .expect("admitted span");
    assert_eq!(s(&admitted.attributes, "keyswap.budget.decision").as_deref(), Some("admitted"));
    // What was left after reserving: 1000 − (body bytes + 100).
    let left = 1000 - (body.len() as i64 + 100);
    assert_eq!(i(&admitted.attributes, "keyswap.budget.remaining_tokens"), Some(left));
    let (_, limited) =
        spans.iter().find(|(_, sp)| i(&sp.attributes, "http.response.status_code") == Some(429)).expect("refused span");
    assert_eq!(s(&limited.attributes, "keyswap.budget.decision").as_deref(), Some("limited"));
    assert_eq!(s(&limited.attributes, "keyswap.budget.name").as_deref(), Some("default/acme-daily"));
    assert_eq!(s(&limited.attributes, "error.type").as_deref(), Some("budget_exhausted"));
    let raw = String::from_utf8_lossy(&collector.raw_bytes()).into_owned();
    for secret in [REAL_KEY, ACME_TOKEN] {
        assert!(!raw.contains(secret), "a secret reached a span");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_up_before_the_answer_does_not_make_a_prompt_free() {
    let meter = Meter::start(Duration::from_millis(500)).await;
    let (_config, r) = acme_budget(&meter);
    let settled = || r.metric("keyswap_budget_tokens_total{budget=\"default/acme-daily\",kind=\"settled\"}");
    let prompt = format!(
        r#"{{"model":"gpt-4o","max_tokens":10,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(300)
    );
    // The agent gives up before the provider answers: the request was forwarded all the same.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(150), call(r.port, OPENAI, Some(ACME_TOKEN), &prompt)).await;
    assert!(gave_up.is_err(), "answered before the agent hung up");
    let deadline = Instant::now() + Duration::from_secs(5);
    while settled().await == 0.0 {
        assert!(Instant::now() < deadline, "the abandoned request was never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(settled().await >= prompt.len() as f64, "the prompt was released: {}", settled().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_gets_budget_exhaustion_at_once_without_retrying() {
    let meter = Meter::start(Duration::ZERO).await;
    let (_config, r) = acme_budget(&meter);
    let script = r#"
import sys, openai
c = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key=sys.argv[2],
                  default_headers={"Host": "api.openai.com"}, max_retries=2)
# A stream that does not ask for its usage, read as the OpenAI cookbook read streams for years
# (`choices[0]` of every chunk): keyswap asks for the usage, and keeps that chunk to itself.
text, used = "", None
for chunk in c.chat.completions.create(model="gpt-4o", max_tokens=20, stream=True,
                                       messages=[{"role": "user", "content": "hi"}]):
    text += chunk.choices[0].delta.content or ""
    used = chunk.usage.completion_tokens if chunk.usage else used
print("streamed", text, used)
try:
    c.chat.completions.create(model="gpt-4o", max_tokens=5000, messages=[{"role": "user", "content": "hi"}])
    print("admitted")
except openai.RateLimitError as e:
    print("limited", e.body["type"] if isinstance(e.body, dict) else e.body)
"#;
    let out = tokio::task::block_in_place(|| {
        Command::new("python3").args(["-c", script, &r.port.to_string(), ACME_TOKEN]).output().unwrap()
    });
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the openai SDK is missing (pip install openai) or failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "streamed ok None\nlimited budget_exhausted", "{stderr}");
    let limited = r.metric("keyswap_budget_decisions_total{budget=\"default/acme-daily\",decision=\"limited\"}").await;
    assert_eq!(limited, 1.0, "the SDK retried a request that could never fit");
    assert_eq!(meter.requests.load(Ordering::SeqCst), 1, "only the stream reached the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_with_a_typo_never_lifts_its_limit_at_startup_or_on_an_edit() {
    let meter = Meter::start(Duration::ZERO).await;
    let config = tempfile::tempdir().unwrap();
    // A field name that does not exist: the spec does not parse. With no earlier version of the
    // file in effect, the route it names is refused, not run without a limit.
    let typo = budget("hourly", "{name: openai}", "  key: Route\n  window: Hour\n  limits: {request: 1}");
    write(config.path(), &gateway(&typo, ""));
    let r = tokio::task::block_in_place(|| Replica::start(config.path(), meter.addr));
    let (status, _, body) = call(r.port, OPENAI, None, &chat(5)).await;
    assert_eq!(status, 503, "{body}\n{}", r.keyswap.output());
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "budget_invalid", "{body}");
    assert_eq!(meter.requests.load(Ordering::SeqCst), 0);
    let log = r.keyswap.output();
    assert!(log.contains("TokenBudget default/hourly") && log.contains("spec.limits"), "{log}");
    // Other routes are untouched.
    assert_eq!(call(r.port, ANTHROPIC, None, &chat(5)).await.0, 200);
    // Fixed: one request an hour.
    write(
        config.path(),
        &gateway(&budget("hourly", "{name: openai}", "  key: Route\n  window: Hour\n  limits: {requests: 1}"), ""),
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while call(r.port, OPENAI, None, &chat(5)).await.0 != 200 {
        assert!(Instant::now() < deadline, "the fixed budget never applied:\n{}", r.keyswap.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The typo again, on an edit: the last good version keeps counting (429, not lifted).
    let forwarded = meter.requests.load(Ordering::SeqCst);
    write(config.path(), &gateway(&typo, ""));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _, body) = call(r.port, OPENAI, None, &chat(5)).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(meter.requests.load(Ordering::SeqCst), forwarded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_budget_fails_its_route_closed_instead_of_lifting_the_limit() {
    let meter = Meter::start(Duration::ZERO).await;
    let config = tempfile::tempdir().unwrap();
    let good = budget("hourly", "{name: openai}", "  key: Route\n  window: Hour\n  limits: {requests: 100}");
    write(config.path(), &gateway(&good, ""));
    let r = tokio::task::block_in_place(|| Replica::start(config.path(), meter.addr));
    assert_eq!(call(r.port, OPENAI, None, &chat(5)).await.0, 200);
    // Valid YAML, invalid budget (no limit at all): left out, and its route refused meanwhile.
    let bad = budget("hourly", "{name: openai}", "  key: Route\n  window: Hour\n  limits: {}");
    write(config.path(), &gateway(&bad, ""));
    let deadline = Instant::now() + Duration::from_secs(3);
    let body = loop {
        let (status, _, body) = call(r.port, OPENAI, None, &chat(5)).await;
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "the invalid budget was never applied:\n{}", r.keyswap.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "budget_invalid", "{body}");
    assert_eq!(v["error"]["budget"], "default/hourly", "{body}");
    // Other routes are untouched; the log names the object and field.
    assert_eq!(call(r.port, ANTHROPIC, None, &chat(5)).await.0, 200);
    let log = r.keyswap.output();
    assert!(log.contains("TokenBudget default/hourly") && log.contains("spec.limits"), "{log}");
    let requests = meter.requests.load(Ordering::SeqCst);
    write(config.path(), &gateway(&good, ""));
    let deadline = Instant::now() + Duration::from_secs(3);
    while call(r.port, OPENAI, None, &chat(5)).await.0 != 200 {
        assert!(Instant::now() < deadline, "the fixed budget never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(meter.requests.load(Ordering::SeqCst) > requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_of_requests_only_reads_no_bodies_and_a_token_budget_reads_both() {
    let meter = Meter::start(Duration::ZERO).await;
    let phase = |p: &str| format!("keyswap_extproc_phase_duration_seconds_count{{phase=\"{p}\"}}");
    for (spec, reads) in [
        ("  key: Route\n  window: Hour\n  limits: {requests: 100}", false),
        ("  key: Route\n  window: Hour\n  limits: {outputTokens: 100000}", true),
    ] {
        let (_config, r) = one_budget(&meter, "b", "{name: openai}", spec);
        let (status, _, body) = call(r.port, OPENAI, None, &chat(10)).await;
        assert_eq!(status, 200, "{body}");
        let admitted = r.metric("keyswap_budget_decisions_total{budget=\"default/b\",decision=\"admitted\"}").await;
        assert_eq!(admitted, 1.0, "{spec}");
        // The response body is read on the deciding stream, or on the observing one.
        let observed = r.metric("keyswap_observed_responses_total{outcome=\"ended\"}").await;
        let bodies = (r.metric(&phase("request_body")).await, r.metric(&phase("response_body")).await + observed);
        if reads {
            assert!(bodies.0 >= 1.0 && bodies.1 >= 1.0, "a token budget must read both bodies: {bodies:?}");
        } else {
            assert_eq!(bodies, (0.0, 0.0), "a requests-only budget read a body");
        }
        // Trailers are asked for both ways (scrubbed; the whole body awaited), and Envoy sends
        // them only when there are some: a request and response without them cost no message.
        assert_eq!(r.metric(&phase("trailers")).await, 0.0, "{spec}: a trailers message without trailers");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_spend_past_its_budget_through_a_batch_a_background_response_or_an_assistant_run() {
    let meter = Meter::start(Duration::ZERO).await;
    // Room for every one of these requests' reservations: only what they are decides.
    let spec =
        "  key: Tenant\n  window: Day\n  limits: {totalTokens: 100000}\n  reservation: {defaultOutputTokens: 100}";
    let (config, r) = one_budget(&meter, "acme-daily", "{kind: EgressGateway, name: egress}", spec);
    let batch = r#"{"input_file_id":"file-abc","endpoint":"/v1/chat/completions","completion_window":"24h"}"#;
    let background = |flag: &str| format!(r#"{{"model":"gpt-4o","max_output_tokens":10,"input":"hi",{flag}}}"#);
    let attacks = [
        (OPENAI, "/v1/batches", batch.to_owned()),
        (OPENAI, "/v1/b%61tches/", batch.to_owned()),
        (OPENAI, "/v1//batches?limit=1", batch.to_owned()),
        (ANTHROPIC, "/v1/messages/batches", r#"{"requests":[]}"#.to_owned()),
        (OPENAI, "/v1/threads/thread_abc/runs", r#"{"assistant_id":"asst_1"}"#.to_owned()),
        (OPENAI, "/v1/responses", background(r#""background":true"#)),
        (OPENAI, "/v1/responses", background(r#""background":"true""#)),
        (OPENAI, "/v1/responses", background(r#""background":false,"background":1"#)),
    ];
    for (host, path, body) in &attacks {
        let (status, _, text) = call_path(r.port, host, path, Some(ACME_TOKEN), body).await;
        assert_eq!(status, 403, "{host}{path} {body}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON reason");
        assert_eq!(v["error"]["type"], "budget_unmetered_request", "{text}");
        assert_eq!(v["error"]["budget"], "default/acme-daily", "{text}");
        for secret in [REAL_KEY, ACME_TOKEN] {
            assert!(!text.contains(secret), "a refusal quoted a secret: {text}");
        }
    }
    // The same batch behind a method override: a server that honours it creates the batch.
    let overridden = [
        ("GET", "x-http-method-override", "POST"),
        ("DELETE", "X-HTTP-Method", " post "),
        ("GET", "x-method-override", "PUT"),
    ];
    for (method, header, named) in overridden {
        let (status, _, text) =
            call_with(r.port, OPENAI, (method, "/v1/batches"), &[(header, named)], Some(ACME_TOKEN), batch).await;
        assert_eq!(status, 403, "{method} with {header}: {named}: {text}");
        assert!(text.contains("budget_unmetered_request"), "{text}");
    }
    assert_eq!(meter.requests.load(Ordering::SeqCst), 0, "an unmetered request reached the provider");
    let refused =
        r.metric("keyswap_budget_decisions_total{budget=\"default/acme-daily\",decision=\"unmetered\"}").await;
    assert_eq!(refused, (attacks.len() + overridden.len()) as f64);

    // A foreground response, and a batch's cancellation, are metered or free: forwarded.
    let (status, _, text) =
        call_path(r.port, OPENAI, "/v1/responses", Some(ACME_TOKEN), &background(r#""background":false"#)).await;
    assert_eq!(status, 200, "{text}");
    let (status, _, text) = call_path(r.port, OPENAI, "/v1/batches/batch_1/cancel", Some(ACME_TOKEN), "{}").await;
    assert_eq!(status, 200, "{text}");

    // A value the field does not take: the edit is refused (the log names the field) and the
    // last good budget keeps refusing.
    let with = |v: &str| {
        let spec = format!("{spec}\n  unmeteredRequests: {v}");
        gateway(&budget("acme-daily", "{kind: EgressGateway, name: egress}", &spec), "")
    };
    write(config.path(), &with("Allow"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !r.keyswap.output().contains("unmeteredRequests") {
        assert!(Instant::now() < deadline, "the bad edit was not reported:\n{}", r.keyswap.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(call_path(r.port, OPENAI, "/v1/batches", Some(ACME_TOKEN), batch).await.0, 403);

    // The operator's choice, applied without a restart: such requests are admitted, counted as
    // their reservation.
    write(config.path(), &with("Admit"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, text) = call_path(r.port, OPENAI, "/v1/batches", Some(ACME_TOKEN), batch).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 403, "{text}");
        assert!(Instant::now() < deadline, "unmeteredRequests: Admit never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A budget on one route has its host's phases send request bodies (whole up to Envoy's buffer:
/// BUFFERED_PARTIAL). A request to another route there that reads no body, a file upload larger
/// than the buffer, still goes through untouched; a budgeted request larger than the buffer is
/// refused (413, `request_too_large`) and never reaches the provider unreserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_larger_than_the_buffer_passes_where_no_budget_reads_it_and_is_refused_where_one_does() {
    let meter = Meter::start(Duration::ZERO).await;
    let (_config, r) = one_budget(
        &meter,
        "b",
        "{name: anthropic}",
        "  key: Route\n  window: Hour\n  limits: {totalTokens: 100000000}",
    );
    // Over the test Envoy's 1 MiB listener buffer.
    let big = "x".repeat(3 << 20);
    let upload = format!(r#"{{"purpose":"batch","file":"{big}"}}"#);
    let (status, _, body) = call_path(r.port, OPENAI, "/v1/files", None, &upload).await;
    assert_eq!(status, 200, "an upload on a route without a budget: {body}");
    let seen = meter.seen.lock().unwrap().last().cloned().unwrap_or_default();
    assert!(seen.starts_with("/v1/files") && seen.len() > 3 << 20, "the provider got the whole upload");
    let before = meter.requests.load(Ordering::SeqCst);
    let chat = format!(r#"{{"model":"m","max_tokens":10,"messages":[{{"role":"user","content":"{big}"}}]}}"#);
    let (status, _, body) = call(r.port, ANTHROPIC, None, &chat).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("request_too_large"), "{body}");
    assert_eq!(meter.requests.load(Ordering::SeqCst), before, "the budgeted request reached the provider");
}
