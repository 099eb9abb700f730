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
  agentAuth:
    metricsTenants: [tenant-a]
    validators:
    - apiKeys: {{}}
    - name: ci
      sharedToken: {{secretRef: {{name: ci-token}}, agent: ci-bot, tenant: tenant-a}}
---
{}{}---
{}---
{}"#,
        anthropic_byok("    byTenant: {secretNameTemplate: \"{tenant}-anthropic\"}\n    fallback: Deny"),
        secret_manifest("tenant-a-anthropic", "token", KEY_A),
        secret_manifest("tenant-b-anthropic", "token", KEY_B),
        secret_manifest("ci-token", "token", CI_TOKEN),
    )
}

/// The Anthropic route, a per-tenant policy with `selector` under `credentialSelector:`, and its
/// (unused with `fallback: Deny`) default Secret; ends with `---`.
fn anthropic_byok(selector: &str) -> String {
    format!(
        "apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: anthropic}}\nspec:\n  \
         parentRefs: [{{name: egress}}]\n  rules: [{{matches: [{{provider: anthropic}}]}}]\n---\n\
         apiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {{name: anthropic-key}}\nspec:\n  \
         parentRefs: [{{kind: AIProviderRoute, name: anthropic}}]\n  secretRef: {{name: anthropic-default}}\n  \
         target: Header\n  credentialSelector:\n{selector}\n---\n{}---\n",
        secret_manifest("anthropic-default", "token", DEFAULT_KEY)
    )
}

/// The anthropic route and its policy, writing `DEFAULT_KEY` for everyone admitted.
fn anthropic_default_key() -> String {
    format!(
        "apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: anthropic}}\nspec:\n  \
         parentRefs: [{{name: egress}}]\n  rules: [{{matches: [{{provider: anthropic}}]}}]\n---\n\
         apiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {{name: anthropic-key}}\nspec:\n  \
         parentRefs: [{{kind: AIProviderRoute, name: anthropic}}]\n  secretRef: {{name: anthropic-default}}\n  \
         target: Header\n---\n{}",
        secret_manifest("anthropic-default", "token", DEFAULT_KEY)
    )
}

/// `keyswap token create`, as an operator runs it: the token on stdout, the Secret in `out`.
fn create_token(out: &Path, agent: &str, tenant: &str) -> String {
    create_token_with(out, agent, tenant, &[])
}

fn create_token_with(out: &Path, agent: &str, tenant: &str, extra: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .args(["token", "create", "--agent", agent, "--tenant", tenant, "--expires", "1d", "--output"])
        .arg(out)
        .args(extra)
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
    let beta =
        create_token_with(&config_dir.path().join("beta-token.yaml"), "beta", "tenant-b", &["--label", "team=search"]);
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
    assert_eq!(otlp::s(a, "keyswap.agent.label.team").as_deref(), Some("search"), "the token's labels");
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

    // Metrics: admissions by tenant (tenant-a named, others "other"), refusals counted; the page
    // as a strict parser reads it.
    let (_, metrics) = scrape(metrics_port, "/metrics").await;
    assert_eq!(keyswap::prom::lint(&metrics), Vec::<String>::new(), "{metrics}");
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
    // Spend by tenant: token usage carries the same bounded tenant label.
    let usage = |tenant: &str| {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("gen_ai_client_token_usage_count{") && l.contains(&format!(",tenant=\"{tenant}\""))
            })
            .count()
    };
    assert!(usage("tenant-a") >= 2 && usage("other") >= 2, "{metrics}");
    assert_eq!(usage("tenant-b"), 0, "tenants outside metricsTenants are `other`");
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

    // `keyswap check` lists the validators and each tenant's key (fingerprints only).
    let o = Command::new(env!("CARGO_BIN_EXE_keyswap")).args(["check", "--config"]).arg(dir.path()).output().unwrap();
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("apiKeys: apiKeys, 1 agent token(s)") && out.contains("ci: sharedToken (agent ci-bot)"),
        "{out}"
    );
    assert!(
        out.contains("per tenant (2 tenant key(s), fallback Deny)")
            && out.contains(&format!("tenant tenant-b: writes header `x-api-key` = <redacted> {b_fp}")),
        "{out}"
    );
    assert!(!out.contains(KEY_B) && !out.contains(CI_TOKEN), "{out}");
}

/// The `x-api-key` values of the last request the fake provider got.
fn last_api_key(fake: &FakeProvider) -> Vec<String> {
    let seen = fake.seen();
    let h = &seen.last().expect("forwarded").headers;
    h.iter().filter(|(k, _)| k == "x-api-key").map(|(_, v)| String::from_utf8_lossy(v).into_owned()).collect()
}

// === JWT and edge trust ===

const ISSUER: &str = "https://idp.example.test";
const HS_SECRET: &str = "hs256-shared-secret-0007-do-not-leak-xxxxxxxx";

fn jwt_tool(args: &[&str]) -> String {
    let tool = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/jwt_tool.py");
    let o = Command::new("python3").arg(tool).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "jwt_tool {args:?}: {} (needs PyJWT: python3 -m pip install pyjwt cryptography)",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

/// A JWKS endpoint over HTTPS (certificate from a test CA, trusted by keyswap through
/// `SSL_CERT_FILE`); the document can be swapped while it runs. Returns (port, CA path, fetches).
async fn jwks_server(
    dir: &Path,
    doc: std::sync::Arc<std::sync::Mutex<String>>,
) -> (u16, std::path::PathBuf, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use http_body_util::BodyExt as _;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (ca, leaf, key) = provider_certs(&["localhost"], dir);
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let f = fetches.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, doc, f) = (acceptor.clone(), doc.clone(), f.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (doc, f) = (doc.clone(), f.clone());
                    async move {
                        let ok = req.uri().path() == "/.well-known/jwks.json";
                        let _ = req.into_body().collect().await;
                        f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let body = if ok { doc.lock().unwrap().clone() } else { String::new() };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(if ok { 200 } else { 404 })
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, ca, fetches)
}

fn jwt_config(jwks_port: u16, edge_cidr: &str) -> String {
    format!(
        r#"apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata: {{name: egress}}
spec:
  otlp: {{readBodies: false}}
  agentAuth:
    validators:
    - name: mesh
      edgeTrust: {{agentHeader: x-edge-agent, tenantHeader: x-edge-tenant, trustMtls: true, mtlsPeers: ["spiffe://td/ns/edge/*"], trustedCidrs: ["{edge_cidr}"]}}
    - name: idp
      jwt:
        issuer: {ISSUER}
        audiences: [keyswap]
        jwksUrl: https://localhost:{jwks_port}/.well-known/jwks.json
        jwksRefreshSeconds: 10
        claimMapping: {{tenant: org, role: roles}}
    - name: internal
      jwt:
        issuer: {ISSUER}
        audiences: [keyswap]
        hs256SecretRef: {{name: hs-secret}}
        claimMapping: {{tenant: org}}
---
{}{}---
{}---
{}"#,
        anthropic_byok(
            "    byTenant:\n      tenants:\n        tenant-a: {secretRef: {name: key-a}}\n        tenant-b: {secretRef: {name: key-b}}"
        ),
        secret_manifest("key-a", "token", KEY_A),
        secret_manifest("key-b", "token", KEY_B),
        secret_manifest("hs-secret", "token", HS_SECRET),
    )
}

/// JWTs minted by PyJWT: RS256 and ES256 from a JWKS fetched over HTTPS, HS256 from a Secret;
/// forged ones refused with nothing forwarded; a JWKS rotation to a new `kid` without a
/// restart; edge-trust headers ignored and stripped from an untrusted peer, honoured from a
/// trusted one (Envoy's `source.address` attribute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_verified_against_a_rotating_jwks_and_edge_headers_need_a_trusted_peer() {
    let keys = tempfile::tempdir().unwrap();
    let kd = keys.path().to_str().unwrap();
    let k1 = jwt_tool(&["keygen", kd, "k1", "rsa"]);
    let e1 = jwt_tool(&["keygen", kd, "e1", "ec"]);
    let k2 = jwt_tool(&["keygen", kd, "k2", "rsa"]);
    // An attacker's key, published nowhere, claiming the kid `k1`.
    let _ = jwt_tool(&["keygen", kd, "evil", "rsa"]);
    let doc = std::sync::Arc::new(std::sync::Mutex::new(format!("{{\"keys\": [{k1}, {e1}]}}")));
    let certs = tempfile::tempdir().unwrap();
    let (jwks_port, ca, fetches) = jwks_server(certs.path(), doc.clone()).await;

    let config_dir = tempfile::tempdir().unwrap();
    std::fs::write(config_dir.path().join("config.yaml"), jwt_config(jwks_port, "10.0.0.0/8")).unwrap();
    let (collector, collector_addr) = Receiver::start().await;
    let work = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start().await;
    fake.set_accepts(
        "api.anthropic.com",
        vec![Accept::Header("x-api-key", KEY_A.into()), Accept::Header("x-api-key", KEY_B.into())],
    );
    let endpoint = format!("http://{collector_addr}");
    let ca = ca.display().to_string();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("SSL_CERT_FILE", ca.as_str()),
        ("RUST_LOG", "debug"),
    ];
    let (keyswap, uds) = start_keyswap(config_dir.path(), work.path(), &env, &[]);
    let (_envoy, port) = start_envoy(work.path(), &uds, fake.addr);
    let c = client();
    let msgs = "/v1/messages";
    let key_pem = |kid: &str| format!("{kd}/{kid}.key.pem");
    let claims = |extra: &str| {
        format!(r#"{{"iss": "{ISSUER}", "aud": "keyswap", "sub": "agent-7", "exp": 600, "org": "tenant-a"{extra}}}"#)
    };
    let last_key = || last_api_key(&fake);

    // Valid tokens; the first waits for the JWKS fetch.
    let rs = jwt_tool(&["sign", "RS256", &key_pem("k1"), "k1", &claims(r#", "roles": ["planner", "admin"]"#)]);
    let es = jwt_tool(&["sign", "ES256", &key_pem("e1"), "e1", &claims(r#", "org": ["tenant-b"]"#)]);
    let hs = jwt_tool(&["sign", "HS256", HS_SECRET, "-", &claims("")]);
    let bearer = |t: &str| format!("Bearer {t}");
    for (name, token, key) in
        [("RS256", &rs, KEY_A), ("ES256, tenant from an array claim", &es, KEY_B), ("HS256", &hs, KEY_A)]
    {
        let (st, body) = send(&c, port, "api.anthropic.com", msgs, &[("authorization", &bearer(token))]).await;
        assert_eq!(st, 200, "{name}: {body}\n{}", keyswap.output());
        assert_eq!(last_key(), [key], "{name}");
    }
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1, "one JWKS fetch for all of them");

    // Forged tokens: 401, nothing forwarded.
    let forwarded = fake.seen().len();
    let forged = [
        ("signed by another key under kid k1", jwt_tool(&["sign", "RS256", &key_pem("evil"), "k1", &claims("")])),
        (
            "wrong audience",
            jwt_tool(&["sign", "RS256", &key_pem("k1"), "k1", &claims("").replace("\"keyswap\"", "\"other\"")]),
        ),
        (
            "wrong issuer",
            jwt_tool(&["sign", "RS256", &key_pem("k1"), "k1", &claims("").replace(ISSUER, "https://evil.test")]),
        ),
        (
            "expired",
            jwt_tool(&["sign", "RS256", &key_pem("k1"), "k1", &claims("").replace("\"exp\": 600", "\"exp\": -600")]),
        ),
        ("not yet valid", jwt_tool(&["sign", "RS256", &key_pem("k1"), "k1", &claims(r#", "nbf": 600"#)])),
        ("alg none", jwt_tool(&["sign", "none", "-", "-", &claims("")])),
        (
            "HS256 signed with the RSA public key",
            jwt_tool(&["confuse", &format!("{kd}/k1.pub.pem"), "k1", &claims("")]),
        ),
        (
            "HS256 with the wrong secret",
            jwt_tool(&["sign", "HS256", "not-the-secret-but-long-enough-xxxxxxxxxx", "-", &claims("")]),
        ),
    ];
    for (name, token) in &forged {
        let (st, body) = send(&c, port, "api.anthropic.com", msgs, &[("authorization", &bearer(token))]).await;
        assert_eq!(st, 401, "{name}: {body}");
        assert!(!body.contains(token.as_str()), "{name}: token echoed");
        let reason = if *name == "expired" { "expired_agent_token" } else { "invalid_agent_token" };
        assert!(body.contains(reason), "{name}: {body}");
    }
    assert_eq!(fake.seen().len(), forwarded, "a forged token reached the provider");

    // JWKS rotation: the IdP publishes k2; a token signed with it is accepted without a restart
    // (an unknown kid refetches, at most once per 5 s).
    *doc.lock().unwrap() = format!("{{\"keys\": [{k1}, {e1}, {k2}]}}");
    let rotated = jwt_tool(&["sign", "RS256", &key_pem("k2"), "k2", &claims("")]);
    let since = Instant::now();
    loop {
        let (st, _) = send(&c, port, "api.anthropic.com", msgs, &[("authorization", &bearer(&rotated))]).await;
        if st == 200 {
            break;
        }
        assert!(since.elapsed() < Duration::from_secs(12), "new kid never accepted");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Edge trust from an untrusted peer (plain HTTP, not mTLS; loopback is not in 10.0.0.0/8): the headers admit
    // nobody, and with a valid token they are stripped before the provider.
    let edge = [("x-edge-agent", "impostor"), ("x-edge-tenant", "tenant-b")];
    let (st, body) = send(&c, port, "api.anthropic.com", msgs, &edge).await;
    assert_eq!(st, 401, "{body}");
    let with_token = [edge[0], edge[1], ("authorization", bearer(&rs).leak() as &str)];
    let (st, _) = send(&c, port, "api.anthropic.com", msgs, &with_token).await;
    assert_eq!(st, 200);
    assert_eq!(last_key(), [KEY_A], "the JWT's tenant, not the header's");
    let seen = fake.seen();
    assert!(seen.last().unwrap().headers.iter().all(|(k, _)| !k.starts_with("x-edge-")), "edge headers forwarded");

    // Trust loopback: the same headers now admit (Envoy reports source.address).
    std::fs::write(config_dir.path().join("config.yaml"), jwt_config(jwks_port, "127.0.0.0/8")).unwrap();
    let since = Instant::now();
    loop {
        let (st, _) = send(&c, port, "api.anthropic.com", msgs, &edge).await;
        if st == 200 {
            break;
        }
        assert!(since.elapsed() < Duration::from_secs(5), "trusted edge headers never admitted\n{}", keyswap.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last_key(), [KEY_B], "tenant from the trusted header");
    assert!(fake.seen().last().unwrap().headers.iter().all(|(k, _)| !k.starts_with("x-edge-")));
    // A hop that appends its header instead of replacing the agent's: two copies that differ
    // name no one (the first, the agent's, used to win); copies that agree are one value.
    let appended = [("x-edge-agent", "impostor"), ("x-edge-agent", "planner"), ("x-edge-tenant", "tenant-b")];
    let (st, body) = send(&c, port, "api.anthropic.com", msgs, &appended).await;
    assert_eq!(st, 401, "differing edge headers admitted someone: {body}");
    let tenants = [("x-edge-agent", "planner"), ("x-edge-tenant", "tenant-a"), ("x-edge-tenant", "tenant-b")];
    assert_eq!(send(&c, port, "api.anthropic.com", msgs, &tenants).await.0, 403, "a tenant from differing copies");
    let agreed = [("x-edge-agent", "planner"), ("x-edge-agent", "planner"), ("x-edge-tenant", "tenant-b")];
    assert_eq!(send(&c, port, "api.anthropic.com", msgs, &agreed).await.0, 200);

    // Attribution and leaks (the last span, the trusted edge request, may still be in a batch).
    let mesh = |spans: &[(String, opentelemetry_proto::tonic::trace::v1::Span)]| {
        spans.iter().any(|(_, s)| otlp::s(&s.attributes, "keyswap.auth.validator").as_deref() == Some("mesh"))
    };
    let since = Instant::now();
    let mut spans = collector.wait_for(10).await;
    while !mesh(&spans) && since.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        spans = collector.spans();
    }
    let rs_span = spans
        .iter()
        .find(|(_, s)| otlp::s(&s.attributes, "keyswap.role").is_some())
        .expect("a span with the role claim");
    let a = &rs_span.1.attributes;
    assert_eq!(otlp::s(a, "keyswap.agent").as_deref(), Some("agent-7"));
    assert_eq!(otlp::s(a, "keyswap.role").as_deref(), Some("planner,admin"));
    assert_eq!(otlp::s(a, "keyswap.auth.validator").as_deref(), Some("idp"));
    assert!(mesh(&spans), "a span admitted by the edge-trust validator");
    let raw = String::from_utf8_lossy(&collector.raw_bytes()).into_owned();
    let logs = keyswap.output();
    let sig = |t: &str| t.rsplit('.').next().unwrap().to_owned();
    for t in [&rs, &es, &hs, &rotated].into_iter().chain(forged.iter().map(|(_, t)| t)) {
        let s = sig(t);
        assert!(s.len() < 8 || (!raw.contains(&s) && !logs.contains(&s)), "a token signature leaked");
    }
    for secret in [HS_SECRET, KEY_A, KEY_B] {
        assert!(!raw.contains(secret) && !logs.contains(secret), "a secret leaked");
    }

    // The IdP withdraws k1 (a leaked key): a token verified under it before, and cached, stops
    // being admitted at the next scheduled refresh (10 s here), although every request carries
    // that cached token and none would make keyswap fetch the keys otherwise.
    let (st, body) = send(&c, port, "api.anthropic.com", msgs, &[("authorization", &bearer(&rs))]).await;
    assert_eq!(st, 200, "{body}");
    *doc.lock().unwrap() = format!("{{\"keys\": [{e1}, {k2}]}}");
    let since = Instant::now();
    loop {
        let (st, _) = send(&c, port, "api.anthropic.com", msgs, &[("authorization", &bearer(&rs))]).await;
        if st == 401 {
            break;
        }
        assert_eq!(st, 200);
        assert!(since.elapsed() < Duration::from_secs(30), "a withdrawn key kept admitting its cached tokens");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Edge trust over mTLS: Envoy terminates TLS and verifies client certificates when offered
/// (`connection.mtls`, and the certificate's first URI SAN). The hop's certificate gets its edge
/// headers honoured; the same headers without a client certificate, or with an agent's own
/// certificate from the same mesh CA (the attack: every workload of a mesh holds one), admit
/// nobody; both are stripped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_trust_honours_headers_only_on_mtls_connections() {
    let config_dir = tempfile::tempdir().unwrap();
    let config = config().replace(
        "    validators:\n    - apiKeys: {}",
        "    validators:\n    - {name: mesh, edgeTrust: {agentHeader: x-edge-agent, tenantHeader: x-edge-tenant, trustMtls: true, mtlsPeers: ['spiffe://td/ns/edge/sa/authn-proxy']}}\n    - apiKeys: {}",
    );
    assert!(config.contains("name: mesh"));
    std::fs::write(config_dir.path().join("config.yaml"), config).unwrap();
    let work = tempfile::tempdir().unwrap();
    let pki = work.path();
    // The server certificate (localhost) and a client CA with one client certificate.
    let (server_ca, leaf, leaf_key) = provider_certs(&["localhost"], pki);
    std::fs::write(pki.join("server.pem"), leaf.pem()).unwrap();
    std::fs::write(pki.join("server.key"), leaf_key.serialize_pem()).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "mesh client CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    // The hop's certificate, and an agent's: the mesh CA signs every workload's.
    for (file, spiffe) in
        [("client", "spiffe://td/ns/edge/sa/authn-proxy"), ("agent", "spiffe://td/ns/agents/sa/default")]
    {
        let client_key = rcgen::KeyPair::generate().unwrap();
        let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params.distinguished_name.push(rcgen::DnType::CommonName, "mesh-proxy");
        client_params.subject_alt_names = vec![rcgen::SanType::URI(spiffe.try_into().unwrap())];
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params.signed_by(&client_key, &issuer).unwrap();
        std::fs::write(pki.join(format!("{file}.pem")), client.pem()).unwrap();
        std::fs::write(pki.join(format!("{file}.key")), client_key.serialize_pem()).unwrap();
    }
    std::fs::write(pki.join("client-ca.pem"), ca_cert.pem()).unwrap();

    let fake = FakeProvider::start().await;
    fake.set_accepts(
        "api.anthropic.com",
        vec![Accept::Header("x-api-key", KEY_A.into()), Accept::Header("x-api-key", KEY_B.into())],
    );
    let (keyswap, uds) = start_keyswap(config_dir.path(), work.path(), &[], &[]);
    let port = free_port();
    let mut cfg = envoy_config_value(port, &uds, fake.addr);
    let pem = |f: &str| pki.join(f).display().to_string();
    cfg["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"] = serde_json::json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": false,
            "common_tls_context": {
                "tls_certificates": [{"certificate_chain": {"filename": pem("server.pem")}, "private_key": {"filename": pem("server.key")}}],
                "validation_context": {"trusted_ca": {"filename": pem("client-ca.pem")}},
            },
        },
    });
    let cfg = keyswap::envoy::to_yaml(&cfg);
    let (envoy, port) = start_envoy_with(work.path(), port, cfg);
    let curl = |client_cert: Option<&str>| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&server_ca)
            .args(["-H", "host: api.anthropic.com", "-H", "content-type: application/json"])
            .args([
                "-H",
                "x-edge-agent: planner",
                "-H",
                "x-edge-tenant: tenant-b",
                "-H",
                "x-api-key: keyswap-injected-by-proxy",
            ])
            .args(["--data", "{}"]);
        if let Some(file) = client_cert {
            cmd.arg("--cert").arg(pki.join(format!("{file}.pem"))).arg("--key").arg(pki.join(format!("{file}.key")));
        }
        cmd.arg(format!("https://localhost:{port}/v1/messages"));
        let o = cmd.output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    };
    assert_eq!(curl(None), "401", "no client certificate: the edge headers admit nobody\n{}", envoy.output());
    assert_eq!(curl(Some("agent")), "401", "an agent's own mesh certificate: the edge headers admit nobody");
    assert!(fake.seen().is_empty());
    assert_eq!(curl(Some("client")), "200", "verified client certificate\n{}\n{}", keyswap.output(), envoy.output());
    let seen = fake.seen();
    let last = seen.last().unwrap();
    let key: Vec<_> = last.headers.iter().filter(|(k, _)| k == "x-api-key").map(|(_, v)| v.clone()).collect();
    assert_eq!(key, [KEY_B.as_bytes().to_vec()], "the tenant from the trusted header");
    assert!(last.headers.iter().all(|(k, _)| !k.starts_with("x-edge-")), "edge headers forwarded");
}

/// keyswap on `config` (its gateway written to `config.yaml`), over loopback gRPC: the process,
/// its work directory and a client.
async fn keyswap_over_grpc(
    config: &Path,
    gateway: String,
    env: &[(&str, &str)],
) -> (Proc, tempfile::TempDir, common::grpc::Client) {
    std::fs::write(config.join("config.yaml"), gateway).unwrap();
    let work = tempfile::tempdir().unwrap();
    let grpc_port = free_port();
    let listen = format!("127.0.0.1:{grpc_port}");
    let (keyswap, _uds) = start_keyswap(config, work.path(), env, &["--listen", &listen]);
    let c = common::grpc::connect(format!("127.0.0.1:{grpc_port}").parse().unwrap()).await;
    (keyswap, work, c)
}

/// keyswap's decision on an Anthropic call with `authorization: <bearer>` (a request that waits
/// is first told to extend Envoy's timeout: the decision is the last answer), within 9 s.
/// Asserts that agent-7's token, signed RS256 with `dir/key.key.pem` naming `kid` ("-": none),
/// is admitted with the default key.
async fn admits_signed_by(c: &mut common::grpc::Client, dir: &str, key: &str, kid: &str, keyswap: &Proc) {
    let claims = format!(r#"{{"iss": "{ISSUER}", "aud": "keyswap", "sub": "agent-7", "exp": 600}}"#);
    let token = jwt_tool(&["sign", "RS256", &format!("{dir}/{key}.key.pem"), kid, &claims]);
    let r = decide_with_bearer(c, &format!("Bearer {token}")).await;
    let written = common::grpc::set_value(&common::grpc::mutation(&r), "x-api-key");
    assert_eq!(written.as_deref(), Some(DEFAULT_KEY), "{}", keyswap.output());
}

/// Asks with `bearer` until keyswap answers 401; fails naming `what` if it still admits after 5 s.
/// Returns how long that took.
async fn refused_within_5s(c: &mut common::grpc::Client, bearer: &str, what: &str) -> Duration {
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    let since = Instant::now();
    loop {
        let r = decide_with_bearer(c, bearer).await;
        if matches!(&r.response, Some(Response::ImmediateResponse(i)) if i.status.as_ref().unwrap().code == 401) {
            return since.elapsed();
        }
        assert!(since.elapsed() < Duration::from_secs(5), "{what} still admits after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn decide_with_bearer(
    c: &mut common::grpc::Client,
    bearer: &str,
) -> envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse {
    use common::grpc;
    let pairs = [
        (":method", "POST"),
        (":authority", "api.anthropic.com"),
        (":path", "/v1/messages"),
        ("authorization", bearer),
    ];
    let r = tokio::time::timeout(Duration::from_secs(9), grpc::exchange(c, vec![grpc::headers(&pairs)])).await;
    r.expect("no answer in 9 s").pop().expect("an answer").expect("a decision")
}

/// Two JWT validators, the first with an identity provider that hangs (accepts connections and
/// never answers). A token of the second issuer waited for the first's JWKS fetch, and then again
/// (the fetch timeout equals the refetch cooldown): every agent of the second validator was
/// locked out for as long as the first IdP hung. Now a token naming another issuer skips that
/// validator, and a key still unknown after one refetch is refused, never waited for again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_identity_provider_locks_out_no_other_issuers_agents() {
    use common::grpc::{immediate, mutation, set_value};
    let keys = tempfile::tempdir().unwrap();
    let kd = keys.path().to_str().unwrap();
    let k1 = jwt_tool(&["keygen", kd, "k1", "rsa"]);
    let config = tempfile::tempdir().unwrap();
    let jwks = config.path().join("jwks.json");
    std::fs::write(&jwks, format!("{{\"keys\": [{k1}]}}")).unwrap();
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let gateway = format!(
        r#"apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata: {{name: egress}}
spec:
  agentAuth:
    validators:
    - name: hung
      jwt: {{issuer: "https://hung.test", audiences: [keyswap], jwksUrl: "https://127.0.0.1:{hung_port}/jwks.json"}}
    - name: idp
      jwt: {{issuer: "{ISSUER}", audiences: [keyswap], jwksFile: "{}"}}
---
{}"#,
        jwks.display(),
        anthropic_default_key()
    );
    let (_keyswap, _work, mut c) = keyswap_over_grpc(config.path(), gateway, &[]).await;
    let sign = |kid: &str, iss: &str| {
        let claims = format!(r#"{{"iss": "{iss}", "aud": "keyswap", "sub": "agent-7", "exp": 600}}"#);
        jwt_tool(&["sign", "RS256", &format!("{kd}/k1.key.pem"), kid, &claims])
    };
    let ask = async |c: &mut common::grpc::Client, token: &str| {
        let since = Instant::now();
        (decide_with_bearer(c, &format!("Bearer {token}")).await, since.elapsed())
    };

    // The second issuer's agent is admitted at once, the first's IdP hanging or not.
    let (r, took) = ask(&mut c, &sign("k1", ISSUER)).await;
    assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some(DEFAULT_KEY));
    assert!(took < Duration::from_secs(2), "the second issuer's token waited {took:?} for the hung IdP");
    // The hung issuer's token waits for one fetch (it times out), then is refused.
    let (r, took) = ask(&mut c, &sign("k9", "https://hung.test")).await;
    assert_eq!(immediate(&r).status.as_ref().unwrap().code, 401);
    assert!(took >= Duration::from_secs(3), "it did not wait for the fetch: {took:?}");
}

/// An operator removes a compromised signing key from the `jwksFile`. Nothing else changed, so
/// no manifest reload ran, and tokens signed with that key (cached as verified) kept being
/// admitted until a restart. The file is read again every second while tokens are checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_key_from_a_jwks_file_stops_its_tokens_without_a_reload() {
    use common::grpc::{mutation, set_value};
    let keys = tempfile::tempdir().unwrap();
    let kd = keys.path().to_str().unwrap();
    let (k1, k2) = (jwt_tool(&["keygen", kd, "k1", "rsa"]), jwt_tool(&["keygen", kd, "k2", "rsa"]));
    let config = tempfile::tempdir().unwrap();
    // Outside the watched directory, as a mounted file would be: no event reaches the watch.
    let jwks_dir = tempfile::tempdir().unwrap();
    let jwks = jwks_dir.path().join("jwks.json");
    std::fs::write(&jwks, format!("{{\"keys\": [{k1}, {k2}]}}")).unwrap();
    let gateway = format!(
        "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  agentAuth:\n    \
         validators: [{{jwt: {{issuer: \"{ISSUER}\", audiences: [keyswap], jwksFile: \"{}\"}}}}]\n---\n{}",
        jwks.display(),
        anthropic_default_key()
    );
    let (keyswap, _work, mut c) = keyswap_over_grpc(config.path(), gateway, &[]).await;
    let claims = format!(r#"{{"iss": "{ISSUER}", "aud": "keyswap", "sub": "agent-7", "exp": 600}}"#);
    let token =
        |kid: &str| format!("Bearer {}", jwt_tool(&["sign", "RS256", &format!("{kd}/{kid}.key.pem"), kid, &claims]));
    let (t1, t2) = (token("k1"), token("k2"));
    let ask = decide_with_bearer;
    for t in [&t1, &t2] {
        let r = ask(&mut c, t).await;
        assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some(DEFAULT_KEY), "{}", keyswap.output());
    }
    std::fs::write(&jwks, format!("{{\"keys\": [{k2}]}}")).unwrap();
    let after = refused_within_5s(&mut c, &t1, "the removed key").await;
    eprintln!("removed key refused after {after:?}");
    let r = ask(&mut c, &t2).await;
    assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some(DEFAULT_KEY), "the kept key still admits");
    // The last key, revoked by emptying the document: "no usable key" held the old keys.
    std::fs::write(&jwks, "{\"keys\": []}").unwrap();
    refused_within_5s(&mut c, &t2, "the last key, the JWKS emptied,").await;
    assert!(keyswap.output().contains("admits no one"), "the empty JWKS is not logged: {}", keyswap.output());
}

/// An issuer moving its keys: two validators of one issuer, the token's key published only by
/// the second source. The request waits for the first source's refetch (no such key there); the
/// second source, never fetched yet, must still be fetched once: refusing every key still unknown
/// after one refetch refused such tokens for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_key_source_of_one_issuer_is_fetched_after_the_first_comes_up_empty() {
    use std::sync::{atomic::Ordering, Arc, Mutex};
    let keys = tempfile::tempdir().unwrap();
    let kd = keys.path().to_str().unwrap();
    let (k1, k2) = (jwt_tool(&["keygen", kd, "k1", "rsa"]), jwt_tool(&["keygen", kd, "k2", "rsa"]));
    let (certs_a, certs_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let doc = |k: &str| Arc::new(Mutex::new(format!("{{\"keys\": [{k}]}}")));
    let (port_a, ca_a, fetches_a) = jwks_server(certs_a.path(), doc(&k2)).await;
    let (port_b, ca_b, fetches_b) = jwks_server(certs_b.path(), doc(&k1)).await;
    let bundle = certs_a.path().join("both-cas.pem");
    std::fs::write(&bundle, std::fs::read_to_string(ca_a).unwrap() + &std::fs::read_to_string(ca_b).unwrap()).unwrap();
    let source = |name: &str, port: u16| {
        format!("    - name: {name}\n      jwt: {{issuer: \"{ISSUER}\", audiences: [keyswap], jwksUrl: \"https://localhost:{port}/.well-known/jwks.json\"}}\n")
    };
    let gateway = format!(
        "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  agentAuth:\n    validators:\n{}{}---\n{}",
        source("old-keys", port_a),
        source("new-keys", port_b),
        anthropic_default_key()
    );
    let config = tempfile::tempdir().unwrap();
    let bundle = bundle.display().to_string();
    let (keyswap, _work, mut c) = keyswap_over_grpc(config.path(), gateway, &[("SSL_CERT_FILE", &bundle)]).await;
    admits_signed_by(&mut c, kd, "k1", "k1", &keyswap).await;
    assert_eq!((fetches_a.load(Ordering::SeqCst), fetches_b.load(Ordering::SeqCst)), (1, 1));
}

/// An identity provider whose tokens carry no `kid` (one signing key): a `jwksUrl` is fetched on
/// first use, and only a token naming a `kid` made keyswap fetch it, so no one was admitted
/// until such a token came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kidless_token_triggers_the_first_jwks_fetch() {
    use std::sync::{atomic::Ordering, Arc, Mutex};
    let keys = tempfile::tempdir().unwrap();
    let kd = keys.path().to_str().unwrap();
    let mut jwk: serde_json::Value = serde_json::from_str(&jwt_tool(&["keygen", kd, "k1", "rsa"])).unwrap();
    jwk.as_object_mut().unwrap().remove("kid");
    let certs = tempfile::tempdir().unwrap();
    let doc = Arc::new(Mutex::new(serde_json::json!({ "keys": [jwk] }).to_string()));
    let (port, ca, fetches) = jwks_server(certs.path(), doc).await;
    let gateway = format!(
        "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  agentAuth:\n    \
         validators: [{{jwt: {{issuer: \"{ISSUER}\", audiences: [keyswap], jwksUrl: \"https://localhost:{port}/.well-known/jwks.json\"}}}}]\n---\n{}",
        anthropic_default_key()
    );
    let config = tempfile::tempdir().unwrap();
    let ca = ca.display().to_string();
    let (keyswap, _work, mut c) = keyswap_over_grpc(config.path(), gateway, &[("SSL_CERT_FILE", &ca)]).await;
    admits_signed_by(&mut c, kd, "k1", "-", &keyswap).await;
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}

/// The attack: a partner's identity provider (a `jwt` validator whose callers, or whose IdP
/// admins, choose the `org` claim) mints a token naming tenant-a, whose agents are API-key agents
/// with tenant-a's own provider key. Without `tenants` on the validator, keyswap wrote tenant-a's
/// key for the partner's agent, and counted it in tenant-a's budgets. With `tenants:
/// [partner-*]`: 403 `tenant_not_allowed`, nothing forwarded, while the partner's own tenants and
/// tenant-a's API-key agent are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_identity_provider_cannot_name_another_validators_tenant() {
    let config_dir = tempfile::tempdir().unwrap();
    let gateway = format!(
        "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  agentAuth:\n    validators:\n    - apiKeys: {{}}\n    - name: partner\n      tenants: ['partner-*']\n      jwt: {{issuer: {ISSUER}, audiences: [keyswap], hs256SecretRef: {{name: hs-secret}}, claimMapping: {{tenant: org}}}}\n---\n{}{}---\n{}---\n{}",
        anthropic_byok(
            "    byTenant:\n      tenants:\n        tenant-a: {secretRef: {name: key-a}}\n        partner-b: {secretRef: {name: key-b}}"
        ),
        secret_manifest("key-a", "token", KEY_A),
        secret_manifest("key-b", "token", KEY_B),
        secret_manifest("hs-secret", "token", HS_SECRET),
    );
    std::fs::write(config_dir.path().join("config.yaml"), gateway).unwrap();
    let alpha = create_token(&config_dir.path().join("alpha-token.yaml"), "alpha", "tenant-a");
    let work = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start().await;
    fake.set_accepts(
        "api.anthropic.com",
        vec![Accept::Header("x-api-key", KEY_A.into()), Accept::Header("x-api-key", KEY_B.into())],
    );
    let (keyswap, uds) = start_keyswap(config_dir.path(), work.path(), &[], &[]);
    let (_envoy, port) = start_envoy(work.path(), &uds, fake.addr);
    let c = client();
    let jwt = |org: &str| {
        let claims = format!(r#"{{"iss": "{ISSUER}", "aud": "keyswap", "sub": "alpha", "exp": 600, "org": "{org}"}}"#);
        format!("Bearer {}", jwt_tool(&["sign", "HS256", HS_SECRET, "-", &claims]))
    };
    let last_key = || last_api_key(&fake);
    let msgs = "/v1/messages";
    for org in ["tenant-a", "partner", "Partner-b"] {
        let (st, body) = send(&c, port, "api.anthropic.com", msgs, &[("authorization", &jwt(org))]).await;
        assert_eq!(st, 403, "{org}: {body}\n{}", keyswap.output());
        assert!(body.contains("tenant_not_allowed") && body.contains("agent_forbidden"), "{org}: {body}");
        assert!(!body.contains(KEY_A) && !body.contains(HS_SECRET), "{body}");
    }
    assert!(fake.seen().is_empty(), "a refused caller reached the provider");
    let (st, body) = send(&c, port, "api.anthropic.com", msgs, &[("authorization", &jwt("partner-b"))]).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(last_key(), [KEY_B], "the partner's own tenant");
    let (st, body) = send(&c, port, "api.anthropic.com", msgs, &[("x-api-key", &alpha)]).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(last_key(), [KEY_A], "tenant-a's own agent");
    assert!(keyswap.output().contains("tenant_not_allowed"), "the log names the reason");
}
