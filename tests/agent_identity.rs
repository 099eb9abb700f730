//! Agent identity through the real Envoy: per-agent tokens (`keyswap token create`), a shared
//! token, per-tenant keys (bring your own key), 401/403 denials, revocation, attribution in spans.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::otlp::{self, Receiver};
use common::*;

const KEY_A: &str = "sk-ant-TENANT-A-0001-do-not-leak";
const KEY_B: &str = "sk-ant-TENANT-B-0002-do-not-leak";
const DEFAULT_KEY: &str = "sk-ant-DEFAULT-0003-do-not-leak";
const CI_TOKEN: &str = "ci-shared-token-0004-do-not-leak";

fn config() -> String {
    format!(
        r#"apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata: {{name: egress}}
spec:
  defaultPolicy: deny-all
  allow: ["allowed.example.com"]
  otlp: {{readBodies: false}}
  agentAuth:
    metricsTenants: [tenant-a]
    validators:
    - apiKeys: {{}}
    - name: ci
      sharedToken: {{secretRef: {{name: ci-token}}, agent: ci-bot, tenant: tenant-a}}
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: anthropic}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: anthropic}}]}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: anthropic-key}}
spec:
  parentRefs: [{{kind: AIProviderRoute, name: anthropic}}]
  secretRef: {{name: anthropic-default}}
  target: Header
  credentialSelector:
    byTenant: {{secretNameTemplate: "{{tenant}}-anthropic"}}
    fallback: Deny
---
{}---
{}---
{}---
{}"#,
        secret_manifest("tenant-a-anthropic", "token", KEY_A),
        secret_manifest("tenant-b-anthropic", "token", KEY_B),
        secret_manifest("anthropic-default", "token", DEFAULT_KEY),
        secret_manifest("ci-token", "token", CI_TOKEN),
    )
}

/// `keyswap token create`, as an operator runs it: the token on stdout, the Secret in `out`.
fn create_token(out: &Path, agent: &str, tenant: &str) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .args(["token", "create", "--agent", agent, "--tenant", tenant, "--expires", "1d", "--output"])
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let token = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("ksa_") && token.len() > 40, "{token}");
    let manifest = std::fs::read_to_string(out).unwrap();
    assert!(!manifest.contains(&token), "the manifest holds only the hash");
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_gets_its_tenants_key_and_everyone_else_is_refused() {
    let config_dir = tempfile::tempdir().unwrap();
    std::fs::write(config_dir.path().join("config.yaml"), config()).unwrap();
    let alpha_file = config_dir.path().join("alpha-token.yaml");
    let alpha = create_token(&alpha_file, "alpha", "tenant-a");
    let beta = create_token(&config_dir.path().join("beta-token.yaml"), "beta", "tenant-b");
    let gamma = create_token(&config_dir.path().join("gamma-token.yaml"), "gamma", "tenant-c");
    // An expired key, written by hand.
    let expired = "ksa_expired-token-0005";
    let digest = hex(&ring::digest::digest(&ring::digest::SHA256, expired.as_bytes()));
    std::fs::write(
        config_dir.path().join("old-token.yaml"),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: old, labels: {{keyswap.dev/agent-token: \"true\"}}}}\n\
             stringData: {{sha256: \"{digest}\", agent: old, tenant: tenant-a, expires: \"2020-01-01T00:00:00Z\"}}\n"
        ),
    )
    .unwrap();

    let (collector, collector_addr) = Receiver::start().await;
    let work = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start().await;
    fake.set_accepts(
        "api.anthropic.com",
        vec![Accept::Header("x-api-key", KEY_A.into()), Accept::Header("x-api-key", KEY_B.into())],
    );
    let endpoint = format!("http://{collector_addr}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("RUST_LOG", "debug"),
    ];
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let (keyswap, uds) = start_keyswap(config_dir.path(), work.path(), &env, &["--metrics", &metrics_addr]);
    let (envoy, port) = start_envoy(work.path(), &uds, fake.addr);
    let c = client();
    let last_key = |fake: &FakeProvider| {
        let seen = fake.seen();
        let last = seen.last().expect("a forwarded request");
        last.headers
            .iter()
            .filter(|(k, _)| k == "x-api-key")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect::<Vec<_>>()
    };
    let msgs = "/v1/messages";

    // Each agent's token, wherever its SDK puts a key, gets its own tenant's key.
    let bearer_beta = format!("Bearer {beta}");
    let cases: [(&str, Headers<'_>, &str); 4] = [
        ("alpha in x-api-key", &[("x-api-key", alpha.as_str())], KEY_A),
        ("beta as a bearer token", &[("authorization", bearer_beta.as_str())], KEY_B),
        (
            "beta in x-keyswap-agent-token",
            &[("x-keyswap-agent-token", beta.as_str()), ("x-api-key", PLACEHOLDER)],
            KEY_B,
        ),
        ("the shared CI token", &[("x-api-key", CI_TOKEN)], KEY_A),
    ];
    for (name, headers, key) in cases {
        let (st, body) = send(&c, port, "api.anthropic.com", msgs, headers).await;
        assert_eq!(st, 200, "{name}: {body}\n{}\n{}", keyswap.output(), envoy.output());
        assert_eq!(last_key(&fake), [key], "{name}");
    }
    // Nothing the agent sent as a token reached the provider.
    for s in fake.seen() {
        for (k, v) in &s.headers {
            let v = String::from_utf8_lossy(v);
            assert!(k != "x-keyswap-agent-token" && k != "authorization", "{k} forwarded");
            for t in [&alpha, &beta, CI_TOKEN] {
                assert!(!v.contains(t), "{k} carried an agent token");
            }
        }
    }

    // Denials: nothing is forwarded, the reason is a code, never the token.
    let forwarded = fake.seen().len();
    let bogus = "ksa_not-a-real-token-0006";
    let denials: [(&str, Headers<'_>, u16, &str); 5] = [
        ("no token", &[("x-api-key", PLACEHOLDER)], 401, "missing_agent_token"),
        ("unknown token", &[("x-api-key", bogus)], 401, "invalid_agent_token"),
        ("a provider key is not a gateway token", &[("x-api-key", STOLEN)], 401, "invalid_agent_token"),
        ("expired key", &[("x-api-key", expired)], 401, "expired_agent_token"),
        ("a tenant without a key", &[("x-api-key", gamma.as_str())], 403, "tenant_not_mapped"),
    ];
    for (name, headers, status, reason) in denials {
        let (st, body) = send(&c, port, "api.anthropic.com", msgs, headers).await;
        assert_eq!(st, status, "{name}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{name}: {body}"));
        assert_eq!(v["error"]["reason"], reason, "{name}: {body}");
        for (_, t) in headers.iter() {
            assert!(*t == PLACEHOLDER || !body.contains(t), "{name}: the token is echoed: {body}");
        }
    }
    assert_eq!(fake.seen().len(), forwarded, "a refused request reached the provider");

    // An allowed non-provider host: admitted, and the gateway token is removed before it leaves.
    fake.set_accepts("allowed.example.com", vec![Accept::Header("x-own", "fine".into())]);
    let (st, _) =
        send(&c, port, "allowed.example.com", "/x", &[("x-keyswap-agent-token", &alpha), ("x-own", "fine")]).await;
    assert_eq!(st, 200);
    let last = fake.seen().pop().unwrap();
    assert!(last.headers.iter().all(|(k, _)| k != "x-keyswap-agent-token"), "{:?}", last.headers);

    // Revocation: deleting alpha's Secret refuses alpha within 1 s; beta is untouched.
    std::fs::remove_file(&alpha_file).unwrap();
    let removed = Instant::now();
    loop {
        let (st, _) = send(&c, port, "api.anthropic.com", msgs, &[("x-api-key", &alpha)]).await;
        if st == 401 {
            break;
        }
        assert!(
            removed.elapsed() < Duration::from_secs(1),
            "alpha still admitted {:?} after revocation",
            removed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (st, _) = send(&c, port, "api.anthropic.com", msgs, &[("x-api-key", &beta)]).await;
    assert_eq!(st, 200);

    // Attribution in spans; tokens in neither spans nor logs.
    let spans = collector.wait_for(14).await;
    let by_agent = |agent: &str| {
        spans.iter().filter(|(_, s)| otlp::s(&s.attributes, "keyswap.agent").as_deref() == Some(agent)).count()
    };
    assert!(by_agent("alpha") >= 1 && by_agent("beta") >= 2 && by_agent("ci-bot") == 1, "{spans:?}");
    let beta_span =
        spans.iter().find(|(_, s)| otlp::s(&s.attributes, "keyswap.agent").as_deref() == Some("beta")).unwrap();
    let a = &beta_span.1.attributes;
    assert_eq!(otlp::s(a, "enduser.id").as_deref(), Some("beta"));
    assert_eq!(otlp::s(a, "keyswap.tenant").as_deref(), Some("tenant-b"));
    assert_eq!(otlp::s(a, "keyswap.auth.validator").as_deref(), Some("apiKeys"));
    let refused = spans
        .iter()
        .filter(|(_, s)| otlp::s(&s.attributes, "error.type").as_deref() == Some("invalid_agent_token"))
        .count();
    assert!(refused >= 2, "refused requests are traced too");
    let raw = String::from_utf8_lossy(&collector.raw_bytes()).into_owned();
    let logs = keyswap.output();
    for secret in [alpha.as_str(), beta.as_str(), gamma.as_str(), CI_TOKEN, bogus, expired, KEY_A, KEY_B, DEFAULT_KEY] {
        assert!(!raw.contains(secret), "exported spans contain a secret");
        assert!(!logs.contains(secret), "logs contain a secret");
    }

    // Metrics: admissions by tenant (tenant-a named, others "other"), refusals counted.
    let (_, metrics) = scrape(metrics_port, "/metrics").await;
    assert!(
        metric(&metrics, "keyswap_agent_admissions_total{result=\"admitted\",tenant=\"tenant-a\"}") >= 2.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "keyswap_agent_admissions_total{result=\"admitted\",tenant=\"other\"}") >= 4.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "keyswap_denials_total{reason=\"agent_unauthenticated\"}") >= 4.0, "{metrics}");
    assert_eq!(metric(&metrics, "keyswap_denials_total{reason=\"tenant_not_mapped\"}"), 1.0, "{metrics}");
}

type Headers<'a> = &'a [(&'a str, &'a str)];

fn hex(d: &ring::digest::Digest) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `keyswap explain --token` names the validator, the agent and the tenant's key.
#[test]
fn explain_shows_which_validator_admits_a_token_and_which_key_is_used() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), config()).unwrap();
    let beta = create_token(&dir.path().join("beta.yaml"), "beta", "tenant-b");
    let explain = |token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyswap"));
        cmd.args(["explain", "--config"]).arg(dir.path()).args([
            "--host",
            "api.anthropic.com",
            "--path",
            "/v1/messages",
        ]);
        if let Some(t) = token {
            cmd.env("KEYSWAP_AGENT_TOKEN", t);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let out = explain(Some(&beta));
    assert!(out.contains("admitted by validator `apiKeys`: agent `beta`, tenant `tenant-b`"), "{out}");
    assert!(out.contains("decision: inject"), "{out}");
    let b_fp = {
        let d = ring::digest::digest(&ring::digest::SHA256, KEY_B.as_bytes());
        format!("sha256:{}", &hex(&d)[..12])
    };
    assert!(out.contains(&b_fp), "tenant-b's key fingerprint {b_fp}:\n{out}");
    assert!(!out.contains(&beta), "the token is printed");
    let out = explain(Some("ksa_nope"));
    assert!(out.contains("decision: 401 invalid_agent_token"), "{out}");
    let out = explain(None);
    assert!(out.contains("decision: 401 missing_agent_token"), "{out}");
}
