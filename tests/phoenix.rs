//! Acceptance: what a real OTLP trace viewer shows. The official SDKs call through the whole
//! gateway (`keyswap dev`: Envoy with the generated configuration, both ext_proc filters, TLS
//! terminated with the gateway CA's leaf) in front of TLS fake providers; keyswap exports to Arize
//! Phoenix (`pip install arize-phoenix`, in its own virtualenv: `scripts/test` makes it), and the
//! test reads back what Phoenix serves its UI, over Phoenix's REST API.
//!
//! Slow (Phoenix takes seconds to start and migrate its database): one test, run by CI.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::dev::*;
use common::*;

const PROJECT: &str = "keyswap-acceptance";

/// Where `scripts/test` installs Phoenix, unless `PHOENIX_BIN` says otherwise.
fn phoenix_bin() -> PathBuf {
    let bin = std::env::var_os("PHOENIX_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/root".into());
        home.join(".cache/keyswap/phoenix-venv/bin/phoenix")
    });
    assert!(
        bin.is_file(),
        "Arize Phoenix is missing at {}: python3 -m venv ~/.cache/keyswap/phoenix-venv && \
         ~/.cache/keyswap/phoenix-venv/bin/pip install arize-phoenix (scripts/test does this), or set PHOENIX_BIN",
        bin.display()
    );
    bin
}

/// Phoenix serving its UI, REST API and OTLP/HTTP receiver on one loopback port.
fn start_phoenix(work: &Path) -> (Proc, u16) {
    let (port, grpc_port) = (free_port(), free_port());
    let mut cmd = Command::new(phoenix_bin());
    cmd.arg("serve")
        .env("PHOENIX_HOST", "127.0.0.1")
        .env("PHOENIX_PORT", port.to_string())
        .env("PHOENIX_GRPC_PORT", grpc_port.to_string())
        .env("PHOENIX_WORKING_DIR", work)
        // No usage reports to the internet from a test.
        .env("PHOENIX_TELEMETRY_ENABLED", "false")
        .stdout(std::fs::File::create(work.join("phoenix.log")).unwrap())
        .stderr(std::fs::File::create(work.join("phoenix.err")).unwrap());
    let child = own_group(&mut cmd).spawn().expect("start phoenix");
    let mut proc = Proc { name: "phoenix", child, log: work.join("phoenix.err") };
    let deadline = Instant::now() + Duration::from_secs(120);
    while get(port, "/v1/projects").is_none() {
        proc.assert_running();
        assert!(Instant::now() < deadline, "Phoenix did not answer within 120 s:\n{}", proc.output());
        std::thread::sleep(Duration::from_millis(250));
    }
    (proc, port)
}

/// GET on Phoenix's REST API: the JSON body of a 200, else `None`.
fn get(port: u16, path: &str) -> Option<serde_json::Value> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-f"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The spans Phoenix holds for the project, once at least `n` arrived.
fn spans(port: u16, n: usize, keyswap: &Proc) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = get(port, &format!("/v1/projects/{PROJECT}/spans?limit=100"))
            .and_then(|v| v["data"].as_array().cloned())
            .unwrap_or_default();
        if spans.len() >= n {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "Phoenix shows {} of {n} spans in project {PROJECT} after 30 s; projects: {:?}\nkeyswap:\n{}",
            spans.len(),
            get(port, "/v1/projects"),
            keyswap.output()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The gateway of `tests/gateway.rs`, tracing with body capture, and the openai route limited
/// to chat (so another path is a denial keyswap answers).
fn phoenix_gateway(proxy_port: u16) -> String {
    gateway_config("deny-all", proxy_port, "")
        .replace("  allow: []\n", "  allow: []\n  otlp: {captureBody: {maxBytes: 65536}}\n")
        .replace("{provider: openai}]", "{provider: openai, endpoints: [\"/v1/chat/*\"]}]")
}

/// A span attribute as Phoenix serves it: flat (`"a.b": v`) or nested (`"a": {"b": v}`).
fn attr<'a>(span: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    let attrs = &span["attributes"];
    attrs.get(key).or_else(|| key.split('.').try_fold(attrs, |v, part| v.get(part)))
}

fn attr_str(span: &serde_json::Value, key: &str) -> String {
    attr(span, key).map(|v| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phoenix_shows_llm_spans_with_tokens_prompt_completion_and_denials_in_the_configured_project() {
    let work = tempfile::tempdir().unwrap();
    let (phoenix, phoenix_port) = tokio::task::block_in_place(|| start_phoenix(work.path()));
    let config = tempfile::tempdir().unwrap();
    let proxy_port = free_port();
    std::fs::write(config.path().join("gateway.yaml"), phoenix_gateway(proxy_port)).unwrap();
    let (fake, provider_ca) = FakeProvider::start_tls(&["api.anthropic.com", "api.openai.com"], work.path()).await;
    fake.set_accepts("api.openai.com", vec![Accept::Header("authorization", format!("Bearer {ANTHROPIC_KEY}"))]);
    let ca = provider_ca.display();
    let upstreams =
        [format!("api.anthropic.com={},ca={ca}", fake.addr), format!("api.openai.com={},ca={ca}", fake.addr)];
    let endpoint = format!("http://127.0.0.1:{phoenix_port}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_RESOURCE_ATTRIBUTES", "openinference.project.name=keyswap-acceptance,k8s.namespace.name=agents"),
    ];
    let dev = tokio::task::block_in_place(|| start_dev_env(config.path(), work.path(), &upstreams, &env));

    tokio::task::block_in_place(|| {
        for (provider, mode) in
            [("anthropic", "plain"), ("anthropic", "stream"), ("openai", "plain"), ("openai", "stream")]
        {
            sdk(&dev, provider, mode);
        }
    });
    // A denial keyswap answers itself: an endpoint the route does not allow. Without a body: over
    // HTTP/2 a denial answered before curl 7.88 has closed its upload races curl's early-response
    // handling (about 1 in 100 such calls ends in curl error 92 though the 403 arrived).
    let (code, out, err) =
        tokio::task::block_in_place(|| curl(&dev, &["-w", "\n%{http_code}", "https://api.openai.com/v1/files"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("403"), "{out}");

    let spans = tokio::task::block_in_place(|| spans(phoenix_port, 5, &dev.proc));
    let projects = get(phoenix_port, "/v1/projects").unwrap_or_default();
    assert!(projects.to_string().contains(PROJECT), "Phoenix has no project {PROJECT}: {projects}");

    let llm: Vec<&serde_json::Value> = spans.iter().filter(|s| s["span_kind"] == "LLM").collect();
    assert_eq!(llm.len(), 4, "four LLM spans (JSON and streamed, two providers): {spans:#?}");
    for s in &llm {
        let name = s["name"].as_str().unwrap_or_default();
        let prompt = attr(s, "llm.token_count.prompt").and_then(|v| v.as_u64()).unwrap_or(0);
        let completion = attr(s, "llm.token_count.completion").and_then(|v| v.as_u64()).unwrap_or(0);
        assert!(prompt > 0 && completion > 0, "{name}: Phoenix shows no token counts: {s:#}");
        assert!(attr_str(s, "input.value").contains("Say hello"), "{name}: no prompt as input: {s:#}");
        assert!(
            attr_str(s, "output.value").contains("Hello from the fake provider"),
            "{name}: no completion text as output: {s:#}"
        );
        assert!(!s.to_string().contains(ANTHROPIC_KEY), "{name}: the real key reached the viewer");
    }
    let denied: Vec<&serde_json::Value> =
        spans.iter().filter(|s| attr_str(s, "http.response.status_code") == "403").collect();
    assert_eq!(denied.len(), 1, "one denial with its status code: {spans:#?}");
    assert_eq!(denied[0]["status_code"], "ERROR", "a denial reads as an error: {:#}", denied[0]);
    assert!(!attr_str(denied[0], "keyswap.route").contains('-'), "no placeholder route: {:#}", denied[0]);
    drop(phoenix);
}
