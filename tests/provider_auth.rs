//! `target: ProviderAuth` end to end through `keyswap dev` (real Envoy, generated config):
//!
//! - AWS SigV4: boto3's `bedrock-runtime` client, with placeholder credentials, calls Converse and
//!   InvokeModel through the gateway; a fake Bedrock (Python) verifies every signature on its own
//!   with botocore and the real keys, which only it and the Secret know.
//! - GCP: a fake token endpoint verifies the JWT-bearer assertions keyswap sends and issues
//!   tokens; a fake Gemini endpoint accepts only those tokens.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::dev::*;
use common::gcp::FakeTokenEndpoint;
use common::otlp;
use common::*;

const BEDROCK_HOST: &str = "bedrock-runtime.us-east-1.amazonaws.com";
const AWS_KEY_ID: &str = "AKIAKEYSWAPTEST0001";
const AWS_SECRET: &str = "kS3cr3t/REAL+0008/do-not-leak-aws-secret";
const AWS_TOKEN: &str = "IQoJb3JpZ2luX2VjREAL0009do-not-leak-session";

fn python_with(modules: &str, install: &str) -> String {
    let out = Command::new("python3").args(["-c", &format!("import sys, {modules}; print(sys.executable)")]).output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => panic!("Python modules {modules} are missing: {install}"),
    }
}

/// The EgressGateway both tests use: a CONNECT proxy on `proxy_port`.
fn gateway(proxy_port: u16) -> String {
    format!(
        "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  listeners: [{{name: proxy, protocol: CONNECT, port: {proxy_port}}}]\n---\n"
    )
}

fn bedrock_config(proxy_port: u16, provider_auth: &str) -> String {
    let gateway = gateway(proxy_port);
    format!(
        r#"{gateway}apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: bedrock}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: bedrock, hosts: [{BEDROCK_HOST}]}}]}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: bedrock-sigv4}}
spec:
  parentRefs: [{{name: bedrock}}]
  secretRef: {{name: aws}}
  target: ProviderAuth
  providerAuth: {provider_auth}
---
apiVersion: v1
kind: Secret
metadata: {{name: aws}}
stringData:
  AWS_ACCESS_KEY_ID: {AWS_KEY_ID}
  AWS_SECRET_ACCESS_KEY: {AWS_SECRET}
  AWS_SESSION_TOKEN: {AWS_TOKEN}
"#
    )
}

/// The Python fake Bedrock: HTTPS with a leaf for the Bedrock host, botocore verification.
fn start_fake_bedrock(work: &Path) -> (Proc, u16, PathBuf) {
    let python = python_with("boto3, botocore", "pip install boto3");
    let _ = provider_certs(&[BEDROCK_HOST], work);
    let port_file = work.join("bedrock.port");
    let log = work.join("bedrock.log");
    let mut cmd = Command::new(python);
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/bedrock_fake.py"))
        .arg("--cert")
        .arg(work.join("provider-leaf.pem"))
        .arg("--key")
        .arg(work.join("provider-leaf.key"))
        .arg("--port-file")
        .arg(&port_file)
        .arg("--log")
        .arg(&log)
        .args(["--access-key-id", AWS_KEY_ID, "--secret-access-key", AWS_SECRET, "--session-token", AWS_TOKEN])
        .args(["--region", "us-east-1", "--service", "bedrock", "--debug-canonical"]);
    let mut proc = Proc::spawn("fake bedrock", cmd, work.join("bedrock.stderr"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let port = loop {
        if let Some(p) = std::fs::read_to_string(&port_file).ok().and_then(|s| s.trim().parse().ok()) {
            break p;
        }
        proc.assert_running();
        assert!(Instant::now() < deadline, "fake bedrock did not start:\n{}", proc.output());
        std::thread::sleep(Duration::from_millis(100));
    };
    (proc, port, log)
}

/// boto3 through the gateway: only the proxy and CA variables, placeholder credentials.
fn boto3(dev: &Dev, op: &str) -> (i32, String) {
    let python = python_with("boto3", "pip install boto3");
    let out = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/bedrock_client.py"))
        .args(["--op", op, "--region", "us-east-1"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()))
        .env("HTTPS_PROXY", &dev.env["HTTPS_PROXY"])
        .env("AWS_CA_BUNDLE", &dev.env["AWS_CA_BUNDLE"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn fake_log(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("fake log line is JSON"))
        .collect()
}

/// Retries `f` until it returns true (a configuration reload is asynchronous).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 15 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// OTLP to an in-process collector, so that spans can be searched for secrets.
fn otel_env(collector: std::net::SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
        ("OTEL_SERVICE_NAME", "keyswap-test".to_owned()),
    ]
}

/// Waits for `n` spans and checks none carries any of `secrets` (raw export bytes searched).
async fn spans_without(collector: &otlp::Receiver, n: usize, secrets: &[&str]) {
    let spans = collector.wait_for(n).await;
    assert!(spans.len() >= n);
    let raw = collector.raw_bytes();
    for secret in secrets {
        assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()), "a secret is in an exported span");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_bedrock_calls_are_signed_with_the_real_keys() {
    let (collector, collector_addr) = otlp::Receiver::start().await;
    tokio::task::block_in_place(|| bedrock_through_the_gateway(collector_addr));
    // One span per request that reached keyswap (2 boto3, 3 curl, the negative and final boto3 calls).
    spans_without(&collector, 6, &[AWS_SECRET, AWS_TOKEN]).await;
    // The 413 keyswap answered itself is one of them, readable as such in a viewer.
    let spans = collector.spans();
    let refused = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| otlp::i(&s.attributes, "http.response.status_code") == Some(413))
        .expect("a span for the 413");
    assert_eq!(otlp::s(&refused.attributes, "error.type").as_deref(), Some("request_too_large"));
    assert_eq!(otlp::s(&refused.attributes, "keyswap.route").as_deref(), Some("default/bedrock"));
}

fn bedrock_through_the_gateway(collector: std::net::SocketAddr) {
    let work = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let (_fake, port, log) = start_fake_bedrock(work.path());
    let proxy_port = free_port();
    let cfg = config.path().join("bedrock.yaml");
    // Region and service derived from the host.
    std::fs::write(&cfg, bedrock_config(proxy_port, "{type: AWSv4}")).unwrap();
    let ca = work.path().join("provider-ca.pem");
    let upstream = format!("{BEDROCK_HOST}=127.0.0.1:{port},ca={}", ca.display());
    let env = otel_env(collector);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dev = start_dev_env(config.path(), work.path(), &[upstream], &env);

    // Converse and InvokeModel, model id with `:` (sent as %3A).
    for op in ["converse", "invoke"] {
        let (code, out) = boto3(&dev, op);
        assert_eq!(code, 0, "boto3 {op}: {out}\nkeyswap:\n{}", dev.proc.output());
        let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(line["status"], 200, "{out}");
        assert_eq!(line["text"], "hello from fake bedrock", "{out}");
    }
    let seen = fake_log(&log);
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert_eq!(s["verified"], true, "{s}");
        assert_eq!(s["access_key_id"], AWS_KEY_ID);
        assert_eq!(s["scope_region"], "us-east-1");
        assert_eq!(s["scope_service"], "bedrock");
        assert_eq!(s["model_id"], "anthropic.claude-3-5-sonnet-20240620-v1:0");
        assert_eq!(s["host_has_port"], false);
        let signed: Vec<&str> = s["signed_headers"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(signed, ["content-type", "host", "x-amz-date", "x-amz-security-token"], "{s}");
    }
    assert!(seen[0]["path"].as_str().unwrap().contains("%3A0/converse"), "{}", seen[0]);

    // A request without a body is signed at the headers phase; the agent's own signature headers
    // are replaced or removed (the fake answers 404 to a verified GET, 403 otherwise).
    let (code, out, err) = curl(
        &dev,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            "authorization: AWS4-HMAC-SHA256 Credential=keyswap-injected-by-proxy/20250101/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=00",
            "-H",
            "x-amz-date: 20250101T000000Z",
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            &format!("https://{BEDROCK_HOST}/model/m/describe"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n404"), "{out}\n{}", dev.proc.output());
    let last = fake_log(&log).pop().unwrap();
    assert_eq!(last["verified"], true, "{last}");
    assert_eq!(last["method"], "GET");

    // A body larger than Envoy's default 1 MiB buffer is signed too; one beyond keyswap's limit
    // is refused with 413 before anything is buffered or sent.
    let big = work.path().join("big.json");
    let text = format!(r#"{{"messages":[{{"role":"user","content":[{{"text":"{}"}}]}}]}}"#, "x".repeat(3 << 20));
    std::fs::write(&big, text).unwrap();
    let url = format!("https://{BEDROCK_HOST}/model/m/converse");
    // HTTP/1.1: an HTTP/2 client that is still uploading when the 413 arrives sees the stream
    // reset instead (curl: "Stream error in the HTTP/2 framing layer").
    let post = |file: &Path| {
        let data = format!("@{}", file.display());
        curl(
            &dev,
            &[
                "--http1.1",
                "-w",
                "\n%{http_code}",
                "-H",
                "content-type: application/json",
                "--data-binary",
                &data,
                &url,
            ],
        )
    };
    let (code, out, err) = post(&big);
    let envoy_log = || std::fs::read_to_string(dev.work.join("envoy.log")).unwrap_or_default();
    assert_eq!(code, 0, "{err}\n{}\n{}", dev.proc.output(), envoy_log());
    assert!(out.ends_with("\n200"), "3 MiB body: {out}\n{}", dev.proc.output());
    assert_eq!(fake_log(&log).last().unwrap()["verified"], true);
    let huge = work.path().join("huge.json");
    std::fs::write(&huge, vec![b'x'; 9 << 20]).unwrap();
    let (code, out, err) = post(&huge);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n413"), "{out}");
    assert!(out.contains("keyswap signs bodies up to 8388608 bytes"), "{out}");
    assert_eq!(fake_log(&log).len(), 4, "the 413 never reached the provider");

    // Negative: the wrong region, then the wrong service, and the fake (like AWS) rejects.
    for (auth, what) in
        [("{type: AWSv4, region: us-west-2}", "region"), ("{type: AWSv4, region: us-east-1, service: s3}", "service")]
    {
        std::fs::write(&cfg, bedrock_config(proxy_port, auth)).unwrap();
        eventually(&format!("a wrong {what} is rejected"), || {
            let (code, out) = boto3(&dev, "converse");
            code == 3 && out.contains("\"status\": 403")
        });
        let last = fake_log(&log).last().cloned().unwrap();
        assert_eq!(last["verified"], false, "{last}");
    }
    // Back to the right region: accepted again, without a restart.
    std::fs::write(&cfg, bedrock_config(proxy_port, "{type: AWSv4, region: us-east-1, service: bedrock}")).unwrap();
    eventually("the corrected policy is used", || boto3(&dev, "converse").0 == 0);

    // Nothing secret in keyswap's output (debug logs included).
    let logs = dev.proc.output() + &std::fs::read_to_string(dev.work.join("dev.stdout")).unwrap();
    for secret in [AWS_SECRET, AWS_TOKEN] {
        assert!(!logs.contains(secret), "secret in keyswap's output");
    }
}

fn gcp_config(proxy_port: u16, service_account_json: &str) -> String {
    let indented: String = service_account_json.lines().map(|l| format!("    {l}\n")).collect();
    let gateway = gateway(proxy_port);
    format!(
        r#"{gateway}apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: gemini}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: google}}]}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: gemini-sa}}
spec:
  parentRefs: [{{name: gemini}}]
  secretRef: {{name: gcp}}
  target: ProviderAuth
  providerAuth: {{type: GCPServiceAccount}}
---
apiVersion: v1
kind: Secret
metadata: {{name: gcp}}
stringData:
  service-account.json: |
{indented}"#
    )
}

const GEMINI_HOST: &str = "generativelanguage.googleapis.com";
const GEMINI_PATH: &str = "/v1beta/models/gemini-2.0-flash:generateContent";

fn gemini(dev: &Dev) -> (i32, String, String) {
    gemini_via(&dev.env)
}

fn gemini_via(env: &std::collections::HashMap<String, String>) -> (i32, String, String) {
    let url = format!("https://{GEMINI_HOST}{GEMINI_PATH}");
    curl_via(env, &["-w", "\n%{http_code}", "-H", "x-goog-api-key: keyswap-injected-by-proxy", "-d", "{}", &url])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_service_account_tokens_are_minted_cached_and_fail_closed() {
    let (collector, collector_addr) = otlp::Receiver::start().await;
    let env = otel_env(collector_addr);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let work = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let tokens = FakeTokenEndpoint::start(3600).await;
    let (fake, ca) = FakeProvider::start_tls(&[GEMINI_HOST], work.path()).await;
    let accept = (1..=10).map(|n| Accept::Header("authorization", format!("Bearer ya29.fake-{n}"))).collect();
    fake.set_accepts(GEMINI_HOST, accept);
    let proxy_port = free_port();
    let cfg = config.path().join("gemini.yaml");
    let sa1 = tokens.service_account(work.path(), "agent-one@keyswap-test.iam.gserviceaccount.com");
    std::fs::write(&cfg, gcp_config(proxy_port, &sa1)).unwrap();
    let upstream = format!("{GEMINI_HOST}={},ca={}", fake.addr, ca.display());
    let dev = tokio::task::block_in_place(|| start_dev_env(config.path(), work.path(), &[upstream], &env));

    // Many concurrent first requests: one token fetch, every request carries that token.
    // The threads hold the gateway's addresses, not `dev`: a failing assertion still stops it.
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let env = dev.env.clone();
            std::thread::spawn(move || gemini_via(&env))
        })
        .collect();
    for h in handles {
        let (code, out, err) = h.join().unwrap();
        assert_eq!(code, 0, "{err}");
        assert!(out.ends_with("\n200"), "{out}\nkeyswap:\n{}", dev.proc.output());
    }
    assert_eq!(tokens.issued.load(Ordering::SeqCst), 1, "refused: {:?}", tokens.refused.lock().unwrap());
    for s in fake.seen() {
        assert_eq!(s.header_str("authorization").as_deref(), Some("Bearer ya29.fake-1"));
        assert!(s.header("x-goog-api-key").is_empty(), "the agent's key header was stripped");
    }
    // Cached: more requests, no more fetches.
    assert!(tokio::task::block_in_place(|| gemini(&dev)).1.ends_with("\n200"));
    assert_eq!(tokens.issued.load(Ordering::SeqCst), 1);
    // The attack: a path whose answer echoes the credential it got (a debug endpoint, an error
    // page). The minted token reaches neither the agent (its body is scrubbed whatever the route's
    // scrubResponseBodies says) nor the span's captured body (checked below).
    let echo = format!("https://{GEMINI_HOST}/echo");
    let (code, out, err) = tokio::task::block_in_place(|| {
        curl(&dev, &["-w", "\n%{http_code}", "-H", "x-goog-api-key: keyswap-injected-by-proxy", "-d", "{}", &echo])
    });
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n200") && out.contains(r#""credential":"Bearer [redacted]""#), "{out}");
    assert!(!out.contains("ya29.fake"), "the agent got the minted token from an echoing upstream: {out}");

    // Rotating the key drops the cached token: the next request uses a token of the new key.
    let sa2 = tokens.service_account(work.path(), "agent-two@keyswap-test.iam.gserviceaccount.com");
    std::fs::write(&cfg, gcp_config(proxy_port, &sa2)).unwrap();
    tokio::task::block_in_place(|| {
        eventually("a token of the rotated key is used", || {
            tokens.issued.load(Ordering::SeqCst) == 2 || {
                let _ = gemini(&dev);
                false
            }
        })
    });
    assert_eq!(fake.seen().last().unwrap().header_str("authorization").as_deref(), Some("Bearer ya29.fake-2"));

    // Token endpoint down and no usable token (rotated again): 503, fail closed, nothing forwarded.
    tokens.down();
    let sa3 = tokens.service_account(work.path(), "agent-three@keyswap-test.iam.gserviceaccount.com");
    std::fs::write(&cfg, gcp_config(proxy_port, &sa3)).unwrap();
    tokio::task::block_in_place(|| {
        eventually("503 while the token endpoint is down", || {
            let (_, out, _) = gemini(&dev);
            out.ends_with("\n503")
        })
    });
    let forwarded = fake.seen().len();
    let (_, out, _) = tokio::task::block_in_place(|| gemini(&dev));
    assert!(out.ends_with("\n503"), "{out}");
    assert!(out.contains("\"reason\":\"TokenUnavailable\""), "{out}");
    assert!(out.contains("\"policy\":\"default/gemini-sa\""), "{out}");
    assert_eq!(fake.seen().len(), forwarded, "nothing forwarded while failing closed");
    assert_eq!(tokens.issued.load(Ordering::SeqCst), 2);

    // Back up: the next request mints a token and goes through.
    tokens.up().await;
    let (code, out, err) = tokio::task::block_in_place(|| gemini(&dev));
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n200"), "{out}");
    assert_eq!(fake.seen().len(), forwarded + 1);
    assert_eq!(fake.seen().last().unwrap().header_str("authorization").as_deref(), Some("Bearer ya29.fake-3"));

    // No token or private key in keyswap's output (debug logs).
    let logs = dev.proc.output() + &std::fs::read_to_string(dev.work.join("dev.stdout")).unwrap();
    assert!(!logs.contains("ya29.fake"), "access token in keyswap's output");
    let mut key_lines = Vec::new();
    for sa in [&sa1, &sa2, &sa3] {
        let v: serde_json::Value = serde_json::from_str(sa).unwrap();
        for line in v["private_key"].as_str().unwrap().lines().filter(|l| !l.starts_with("-----")) {
            assert!(!logs.contains(line), "private key in keyswap's output");
            key_lines.push(line.to_owned());
        }
    }
    // Nor in the spans (one per request: 12 + 1 first, the echo, the rotation, the 503s, the
    // recovery).
    let mut secrets: Vec<&str> = key_lines.iter().map(String::as_str).collect();
    secrets.push("ya29.fake");
    spans_without(&collector, 17, &secrets).await;
}

/// A token endpoint that issues `ya29.fake-1`, a fake Gemini that takes only it, a service
/// account of that endpoint, and the directories and proxy port a `keyswap dev` of them uses.
struct Gemini {
    work: tempfile::TempDir,
    config: tempfile::TempDir,
    tokens: std::sync::Arc<FakeTokenEndpoint>,
    fake: FakeProvider,
    ca: PathBuf,
    proxy_port: u16,
    sa: String,
}

impl Gemini {
    async fn start() -> Gemini {
        let work = tempfile::tempdir().unwrap();
        let config = tempfile::tempdir().unwrap();
        let tokens = FakeTokenEndpoint::start(3600).await;
        let (fake, ca) = FakeProvider::start_tls(&[GEMINI_HOST], work.path()).await;
        fake.set_accepts(GEMINI_HOST, vec![Accept::Header("authorization", "Bearer ya29.fake-1".into())]);
        let sa = tokens.service_account(work.path(), "agent-one@keyswap-test.iam.gserviceaccount.com");
        Gemini { work, config, tokens, fake, ca, proxy_port: free_port(), sa }
    }
}

/// The attack: while the token endpoint is slow (up to the 5 s fetch timeout), every request of
/// a GCP route waits parked in keyswap and Envoy, holding an ext_proc stream and Envoy's buffers.
/// A request took its place among its key's requests in flight only once the token came, so an
/// agent could park any number of requests past its `concurrentRequests`. A parked request holds
/// its place; one past the limit is refused at once, while the fetch is still under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_parked_for_a_slow_token_fetch_hold_their_places_in_flight() {
    let Gemini { work, config, tokens, fake, ca, proxy_port, sa } = Gemini::start().await;
    let budget = "---\napiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {name: two-at-once}\nspec:\n  parentRefs: [{kind: AIProviderRoute, name: gemini}]\n  key: Route\n  window: Day\n  limits: {concurrentRequests: 2}\n";
    std::fs::write(config.path().join("gemini.yaml"), gcp_config(proxy_port, &sa) + budget).unwrap();
    let upstream = format!("{GEMINI_HOST}={},ca={}", fake.addr, ca.display());
    let dev = tokio::task::block_in_place(|| start_dev_env(config.path(), work.path(), &[upstream], &[]));
    // The threads hold the gateway's addresses, not `dev`: a failing assertion still stops it.
    let spawn = |dev: &Dev| {
        let env = dev.env.clone();
        std::thread::spawn(move || gemini_via(&env))
    };

    tokens.hold();
    // The first request starts the fetch and waits for it.
    let first = spawn(&dev);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokens.asked.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no token request: {}", dev.proc.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two more: one parks in the second place, the other is past the limit.
    let (second, third) = (spawn(&dev), spawn(&dev));
    let deadline = Instant::now() + Duration::from_secs(3);
    while !second.is_finished() && !third.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the request past the limit waited for the token with the others: it held no place"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tokens.issued.load(Ordering::SeqCst), 0, "the token endpoint answered while held");
    let (refused, parked) = if third.is_finished() { (third, second) } else { (second, third) };
    let (code, out, err) = refused.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n429"), "{out}");
    assert!(
        out.contains("\"budget_exhausted\"") && out.contains("\"concurrent_requests\""),
        "not a concurrency refusal: {out}"
    );
    // The token comes: both parked requests go on with it.
    tokens.release();
    for (name, h) in [("first", first), ("parked", parked)] {
        let (code, out, err) = tokio::task::block_in_place(|| h.join().unwrap());
        assert_eq!(code, 0, "{err}");
        assert!(out.ends_with("\n200"), "the {name} request: {out}");
    }
    assert_eq!(fake.seen().len(), 2, "the refused request reached the provider");
    // Their places were given back when they ended.
    let (_, out, _) = tokio::task::block_in_place(|| gemini(&dev));
    assert!(out.ends_with("\n200"), "{out}");
}

/// An agent token revoked while its request waits for a provider token (a slow token endpoint)
/// is refused when the token comes: the request is decided on the configuration in effect then,
/// not on the one it parked on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_while_its_request_waited_for_a_provider_token_is_refused() {
    const OLD: &str = "ci-shared-token-0010-revoked";
    const NEW: &str = "ci-shared-token-0011-current";
    let Gemini { work, config, tokens, fake, ca, proxy_port, sa } = Gemini::start().await;
    let auth = "spec:\n  agentAuth:\n    validators:\n    - name: ci\n      sharedToken: {secretRef: {name: ci-token}, agent: ci-bot}\n";
    std::fs::write(config.path().join("gemini.yaml"), gcp_config(proxy_port, &sa).replacen("spec:\n", auth, 1))
        .unwrap();
    let agents = config.path().join("agents.yaml");
    std::fs::write(&agents, secret_manifest("ci-token", "token", OLD)).unwrap();
    let upstream = format!("{GEMINI_HOST}={},ca={}", fake.addr, ca.display());
    let dev = tokio::task::block_in_place(|| start_dev_env(config.path(), work.path(), &[upstream], &[]));
    let call = |token: &str| {
        let (env, key) = (dev.env.clone(), format!("x-goog-api-key: {token}"));
        let url = format!("https://{GEMINI_HOST}{GEMINI_PATH}");
        std::thread::spawn(move || curl_via(&env, &["-w", "\n%{http_code}", "-H", &key, "-d", "{}", &url]))
    };
    let loads = |dev: &Dev| dev.proc.output().matches("configuration loaded").count();

    tokens.hold();
    let parked = call(OLD);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokens.asked.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no token request: {}", dev.proc.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The operator rotates the shared token while the request waits.
    let before = loads(&dev);
    std::fs::write(&agents, secret_manifest("ci-token", "token", NEW)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while loads(&dev) == before {
        assert!(Instant::now() < deadline, "the rotation was not loaded: {}", dev.proc.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!parked.is_finished(), "the parked request did not wait for the token");
    tokens.release();
    let (code, out, err) = tokio::task::block_in_place(|| parked.join().unwrap());
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n401"), "the revoked token's parked request was admitted: {out}");
    assert!(fake.seen().is_empty(), "the revoked token's request reached the provider");
    // The current token goes through.
    let (code, out, err) = tokio::task::block_in_place(|| call(NEW).join().unwrap());
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n200"), "{out}");
    assert_eq!(fake.seen().len(), 1);
}

/// A request parked for a token while the operator rotates the service-account key: decided
/// again on the new configuration, it waits for the new key's token. It took its own place in
/// flight a second time (held until it was decided), and a route allowing one request at once
/// refused it with 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_parked_across_a_key_rotation_keeps_its_place_in_flight() {
    let Gemini { work, config, tokens, fake, ca, proxy_port, sa } = Gemini::start().await;
    fake.set_accepts(GEMINI_HOST, vec![Accept::Header("authorization", "Bearer ya29.fake-2".into())]);
    let budget = "---\napiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {name: one-at-once}\nspec:\n  parentRefs: [{kind: AIProviderRoute, name: gemini}]\n  key: Route\n  window: Day\n  limits: {concurrentRequests: 1}\n";
    let file = config.path().join("gemini.yaml");
    std::fs::write(&file, gcp_config(proxy_port, &sa) + budget).unwrap();
    let upstream = format!("{GEMINI_HOST}={},ca={}", fake.addr, ca.display());
    let dev = tokio::task::block_in_place(|| start_dev_env(config.path(), work.path(), &[upstream], &[]));
    let loads = |dev: &Dev| dev.proc.output().matches("configuration loaded").count();

    tokens.hold();
    let parked = {
        let env = dev.env.clone();
        std::thread::spawn(move || gemini_via(&env))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokens.asked.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no token request: {}", dev.proc.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = loads(&dev);
    let rotated = tokens.service_account(work.path(), "agent-two@keyswap-test.iam.gserviceaccount.com");
    std::fs::write(&file, gcp_config(proxy_port, &rotated) + budget).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while loads(&dev) == before {
        assert!(Instant::now() < deadline, "the rotation was not loaded: {}", dev.proc.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokens.release();
    let (code, out, err) = tokio::task::block_in_place(|| parked.join().unwrap());
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n200"), "the parked request, decided again on the rotated key: {out}");
    assert_eq!(tokens.issued.load(Ordering::SeqCst), 2, "the old key's token, then the new key's");
    assert_eq!(fake.seen().len(), 1);
}
