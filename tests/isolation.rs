//! One bad object never freezes the rest (file mode): with another team's invalid policy and a
//! broken file in the directory, key rotation and agent-token revocation still take effect within
//! a second, and the invalid pieces are reported by `keyswap check`, the log and `/metrics`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::grpc::{self, immediate, mutation, set_value};
use common::*;

const CONFIG: &str = r#"apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata: {name: egress}
spec:
  defaultPolicy: deny-all
  agentAuth: {optional: true, validators: [{apiKeys: {}}]}
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {name: anthropic}
spec:
  parentRefs: [{name: egress}]
  rules: [{matches: [{provider: anthropic}]}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {name: anthropic-key}
spec:
  parentRefs: [{kind: AIProviderRoute, name: anthropic}]
  secretRef: {name: anthropic}
  target: Header
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {name: team-c}
spec:
  parentRefs: [{name: egress}]
  rules: [{matches: [{provider: custom, hosts: [team-c.test]}]}]
"#;

/// Team C's policy: a header name with a space (the CRD schema allows it; keyswap does not).
const INVALID_POLICY: &str = r#"apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {name: team-c-key}
spec:
  parentRefs: [{kind: AIProviderRoute, name: team-c}]
  secretRef: {name: team-c}
  target: Header
  headerName: "x team key"
"#;

fn token(dir: &std::path::Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .args(["token", "create", "--agent", "builder", "--tenant", "acme", "--output"])
        .arg(dir.join("agent-token.yaml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

fn anthropic(token: &str) -> Vec<(&str, &str)> {
    vec![
        (":method", "POST"),
        (":authority", "api.anthropic.com"),
        (":path", "/v1/messages"),
        ("x-keyswap-agent-token", token),
    ]
}

/// Polls `check` every 10 ms for up to 5 s; the time it took.
async fn within(what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let since = Instant::now();
    while !check().await {
        assert!(since.elapsed() < Duration::from_secs(5), "{what}: not in effect after 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    since.elapsed()
}

/// The first answer of `/readyz` (the admin port opens after the socket `start_keyswap` waits for).
async fn first_readyz(metrics_port: u16, keyswap: &Proc) -> (u16, String) {
    let since = Instant::now();
    loop {
        if let Some(answer) = try_scrape(metrics_port, "/readyz").await {
            return answer;
        }
        assert!(since.elapsed() < Duration::from_secs(10), "no admin port:\n{}", keyswap.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `serve --ca-dir DIR` before the CA is there (a volume not yet mounted, `keyswap certs` not
/// yet run, a path relative to another working directory): `/readyz` said 200 while Envoy got no
/// TLS listener and every routed host failed its handshake. Now it says 503 and why until the CA
/// appears, then 200 without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_ca_it_was_told_to_use() {
    let config = tempfile::tempdir().unwrap();
    std::fs::write(config.path().join("config.yaml"), CONFIG).unwrap();
    std::fs::write(config.path().join("anthropic.yaml"), secret_manifest("anthropic", "token", "sk-ant-one")).unwrap();
    let (work, ca) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let (keyswap, _uds) = start_keyswap(
        config.path(),
        work.path(),
        &[],
        &["--ca-dir", ca.path().to_str().unwrap(), "--metrics", &metrics],
    );
    let (status, ready) = first_readyz(metrics_port, &keyswap).await;
    assert_eq!(status, 503, "ready without its CA: {ready}");
    assert!(ready.contains("no gateway CA"), "{ready}");
    let now = time::OffsetDateTime::now_utc();
    keyswap::certs::ensure_ca(ca.path(), &keyswap::config::Key::new("default", "egress"), now).unwrap();
    let since = Instant::now();
    while !matches!(try_scrape(metrics_port, "/readyz").await, Some((200, _))) {
        assert!(since.elapsed() < Duration::from_secs(10), "not ready with its CA:\n{}", keyswap.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An invalid object already in the directory when `serve` starts is left out, and `/readyz`
/// says so from the start (it said `ok` until the first reload); a file over the manifest limits
/// there is set aside, and keyswap serves the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_what_was_left_out_or_set_aside_at_start() {
    let config = tempfile::tempdir().unwrap();
    std::fs::write(config.path().join("config.yaml"), CONFIG).unwrap();
    std::fs::write(config.path().join("anthropic.yaml"), secret_manifest("anthropic", "token", "sk-ant-one")).unwrap();
    std::fs::write(config.path().join("team-c.yaml"), INVALID_POLICY).unwrap();
    let token = token(config.path());
    // `serve` on the directory as it is now: its readiness text, and whether it injects.
    let start = async |config: &std::path::Path| {
        let work = tempfile::tempdir().unwrap();
        let (grpc_port, metrics_port) = (free_port(), free_port());
        let (listen, metrics) = (format!("127.0.0.1:{grpc_port}"), format!("127.0.0.1:{metrics_port}"));
        let (keyswap, _uds) = start_keyswap(config, work.path(), &[], &["--listen", &listen, "--metrics", &metrics]);
        let (status, ready) = first_readyz(metrics_port, &keyswap).await;
        assert_eq!(status, 200, "{ready}");
        let (_, m) = scrape(metrics_port, "/metrics").await;
        let mut c = grpc::connect(format!("127.0.0.1:{grpc_port}").parse().unwrap()).await;
        let r = grpc::request(&mut c, &anthropic(&token)).await;
        assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some("sk-ant-one"), "{ready}");
        (ready, metric(&m, "keyswap_config_rejected_objects"), keyswap.output())
    };
    let (ready, rejected, _) = start(config.path()).await;
    assert!(ready.contains("1 invalid object(s) left out"), "{ready}");
    assert_eq!(rejected, 1.0);
    // The same directory with a file over 1 MiB in it: set aside, the rest served.
    std::fs::write(config.path().join("huge.yaml"), format!("# {}\n", "x".repeat(1_100_000))).unwrap();
    let (ready, _, log) = start(config.path()).await;
    assert!(ready.contains("1 file(s) over the manifest limits set aside"), "{ready}");
    assert!(log.contains("huge.yaml"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_and_a_broken_file_do_not_freeze_rotation_or_revocation() {
    let (config, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(config.path().join("config.yaml"), CONFIG).unwrap();
    std::fs::write(config.path().join("anthropic.yaml"), secret_manifest("anthropic", "token", "sk-ant-one")).unwrap();
    let token = token(config.path());
    let (grpc_port, metrics_port) = (free_port(), free_port());
    let (listen, metrics) = (format!("127.0.0.1:{grpc_port}"), format!("127.0.0.1:{metrics_port}"));
    let (keyswap, _uds) = start_keyswap(config.path(), work.path(), &[], &["--listen", &listen, "--metrics", &metrics]);
    let mut c = grpc::connect(format!("127.0.0.1:{grpc_port}").parse().unwrap()).await;
    let r = grpc::request(&mut c, &anthropic(&token)).await;
    assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some("sk-ant-one"));

    // Another team's invalid policy, and a file that is not even YAML.
    std::fs::write(config.path().join("team-c.yaml"), INVALID_POLICY).unwrap();
    std::fs::write(config.path().join("stray.yaml"), "kind: [unclosed\n  : :\n").unwrap();
    within("the invalid objects reported in /metrics", async || {
        let (_, m) = scrape(metrics_port, "/metrics").await;
        metric(&m, "keyswap_config_rejected_objects") >= 2.0
    })
    .await;
    // Team C's route fails closed; it never forwards the placeholder.
    let r = grpc::request(&mut c, &[(":authority", "team-c.test"), (":path", "/x"), (":method", "GET")]).await;
    assert_eq!(immediate(&r).status.as_ref().unwrap().code, 503);

    // Rotating anthropic's Secret is in effect within 1 s.
    std::fs::write(config.path().join("anthropic.yaml"), secret_manifest("anthropic", "token", "sk-ant-two")).unwrap();
    let took = within("rotation", async || {
        let r = grpc::request(&mut c, &anthropic(&token)).await;
        set_value(&mutation(&r), "x-api-key").as_deref() == Some("sk-ant-two")
    })
    .await;
    eprintln!("rotation with an invalid policy and a broken file present: {took:?}");
    assert!(took < Duration::from_secs(1), "rotation took {took:?}");

    // Revoking the agent token (deleting its Secret) is in effect within 1 s.
    std::fs::remove_file(config.path().join("agent-token.yaml")).unwrap();
    let took = within("revocation", async || {
        let r = grpc::request(&mut c, &anthropic(&token)).await;
        matches!(&r.response, Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::ImmediateResponse(i)) if i.status.as_ref().unwrap().code == 401)
    })
    .await;
    eprintln!("revocation with an invalid policy and a broken file present: {took:?}");
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");

    // The invalid pieces are named in the log, by `keyswap check`, and in /readyz.
    let log = keyswap.output();
    assert!(
        log.contains("CredentialInjectionPolicy default/team-c-key: field `spec.headerName`")
            && log.contains("stray.yaml"),
        "{log}"
    );
    let (_, ready) = scrape(metrics_port, "/readyz").await;
    assert!(ready.contains("left out"), "{ready}");
    let out =
        Command::new(env!("CARGO_BIN_EXE_keyswap")).args(["check", "--config"]).arg(config.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("team-c-key") && text.contains("stray.yaml"), "{text}");
    assert!(!log.contains("sk-ant-one") && !log.contains("sk-ant-two") && !log.contains(&token), "secret in the log");
}

/// The attack on revocation through a typo: one file holds several documents (an agent token and
/// a colleague's Secret, a key and its route), one of them fails, and the operator deletes the
/// token to revoke it or rotates the key. The whole file's last good version stayed: the revoked
/// token admitted, the old key sent, for as long as the typo stayed. Only the failing document
/// keeps its last good version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_in_one_document_freezes_neither_rotation_nor_revocation_in_another_of_the_same_file() {
    const BROKEN: &str = "apiVersion: v1\nkind: Secret\nmetadata: {name: other}\ndata: {k: \"not base64!\"}\n";
    let (config, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(config.path().join("config.yaml"), CONFIG).unwrap();
    let other = secret_manifest("other", "k", "v1");
    let two = |a: &str, b: &str| format!("{a}---\n{b}");
    let keys = config.path().join("anthropic.yaml");
    std::fs::write(&keys, two(&secret_manifest("anthropic", "token", "sk-ant-one"), &other)).unwrap();
    let token = token(config.path());
    let tokens = config.path().join("agent-token.yaml");
    let token_doc = std::fs::read_to_string(&tokens).unwrap();
    std::fs::write(&tokens, two(&token_doc, &other.replace("other", "other-too"))).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let (keyswap, _uds) = start_keyswap(config.path(), work.path(), &[], &["--listen", &listen]);
    let mut c = grpc::connect(listen.parse().unwrap()).await;
    let r = grpc::request(&mut c, &anthropic(&token)).await;
    assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some("sk-ant-one"));

    // The colleague's Secret broken, the key rotated, in one edit of the file.
    std::fs::write(&keys, two(&secret_manifest("anthropic", "token", "sk-ant-two"), BROKEN)).unwrap();
    within("rotation beside a broken document", async || {
        let r = grpc::request(&mut c, &anthropic(&token)).await;
        set_value(&mutation(&r), "x-api-key").as_deref() == Some("sk-ant-two")
    })
    .await;
    // The token's document deleted, a broken one left beside where it was.
    std::fs::write(&tokens, BROKEN.replace("other", "other-too")).unwrap();
    let revoked = async |c: &mut grpc::Client| {
        let r = grpc::request(c, &anthropic(&token)).await;
        matches!(&r.response, Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::ImmediateResponse(i)) if i.status.as_ref().unwrap().code == 401)
    };
    within("revocation beside a broken document", async || revoked(&mut c).await).await;
    // The next edit breaks the file whole (YAML that does not parse): what stays in effect is
    // what the last version put in effect, the revoked token not among it.
    std::fs::write(&tokens, "kind: [unclosed\n").unwrap();
    within("the broken file reported", async || keyswap.output().contains("not valid YAML")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(revoked(&mut c).await, "a file broken after a revocation brought the revoked token back");
    let log = keyswap.output();
    assert!(log.contains("Secret default/other") && log.contains("last good version stays in effect"), "{log}");
    assert!(!log.contains("sk-ant-one") && !log.contains("sk-ant-two") && !log.contains(&token), "secret in the log");
}

/// The revocation an operator reaches for first: delete the CI system's shared-token Secret.
/// That was an error on the gateway, so the reload was refused and the last good configuration
/// kept serving: the revoked token still admitted, and every rotation after it was frozen until
/// the Secret came back. Now that validator admits no one, and the rest of the reload lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_shared_token_secret_revokes_that_token_and_freezes_no_rotation() {
    const SHARED: &str = "ci-shared-token-0001-do-not-leak";
    let (config, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let gateway = CONFIG.replace(
        "agentAuth: {optional: true, validators: [{apiKeys: {}}]}",
        "agentAuth: {validators: [{sharedToken: {secretRef: {name: ci-token}}}, {apiKeys: {}}]}",
    );
    assert_ne!(gateway, CONFIG);
    std::fs::write(config.path().join("config.yaml"), gateway).unwrap();
    std::fs::write(config.path().join("anthropic.yaml"), secret_manifest("anthropic", "token", "sk-ant-one")).unwrap();
    std::fs::write(config.path().join("ci-token.yaml"), secret_manifest("ci-token", "token", SHARED)).unwrap();
    let token = token(config.path());
    let grpc_port = free_port();
    let listen = format!("127.0.0.1:{grpc_port}");
    let (keyswap, _uds) = start_keyswap(config.path(), work.path(), &[], &["--listen", &listen]);
    let mut c = grpc::connect(format!("127.0.0.1:{grpc_port}").parse().unwrap()).await;
    for t in [SHARED, &token] {
        let r = grpc::request(&mut c, &anthropic(t)).await;
        assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some("sk-ant-one"));
    }

    std::fs::remove_file(config.path().join("ci-token.yaml")).unwrap();
    let took = within("the shared token revoked", async || {
        let r = grpc::request(&mut c, &anthropic(SHARED)).await;
        matches!(&r.response, Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::ImmediateResponse(i)) if i.status.as_ref().unwrap().code == 401)
    })
    .await;
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
    // A rotation after the revocation lands, for the agents that still have a way in.
    std::fs::write(config.path().join("anthropic.yaml"), secret_manifest("anthropic", "token", "sk-ant-two")).unwrap();
    let took = within("rotation after the revocation", async || {
        let r = grpc::request(&mut c, &anthropic(&token)).await;
        set_value(&mutation(&r), "x-api-key").as_deref() == Some("sk-ant-two")
    })
    .await;
    assert!(took < Duration::from_secs(1), "rotation took {took:?}");
    let log = keyswap.output();
    assert!(log.contains("Secret default/ci-token") && log.contains("admits no one"), "{log}");
    assert!(!log.contains(SHARED) && !log.contains("sk-ant-"), "a secret in the log");
}

// === Kubernetes mode ===

mod kube {
    use super::*;
    use common::kubeapi::FakeKube;
    use serde_json::json;

    const NS: &str = "agents";

    fn digest(token: &str) -> String {
        ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_invalid_policy_in_the_cluster_does_not_freeze_rotation_or_revocation() {
        let kube = FakeKube::start().await;
        let token = "ksa_isolation-test-token-0001";
        kube.put("egressgateways", NS, "egress", json!({"spec": {"defaultPolicy": "deny-all", "agentAuth": {"optional": true, "validators": [{"apiKeys": {}}]}}}));
        kube.put(
            "aiproviderroutes",
            NS,
            "anthropic",
            json!({"spec": {"parentRefs": [{"name": "egress"}], "rules": [{"matches": [{"provider": "anthropic"}]}]}}),
        );
        kube.put("credentialinjectionpolicies", NS, "anthropic-key", json!({"spec": {"parentRefs": [{"kind": "AIProviderRoute", "name": "anthropic"}], "secretRef": {"name": "anthropic"}, "target": "Header"}}));
        kube.put("secrets", NS, "anthropic", json!({"stringData": {"token": "sk-ant-k8s-one"}}));
        kube.put("aiproviderroutes", NS, "team-c", json!({"spec": {"parentRefs": [{"name": "egress"}], "rules": [{"matches": [{"provider": "custom", "hosts": ["team-c.test"]}]}]}}));
        let mut token_secret = json!({"stringData": {"sha256": digest(token), "agent": "builder", "tenant": "acme"}});
        token_secret["metadata"] = json!({"labels": {"keyswap.dev/agent-token": "true"}});
        kube.put("secrets", NS, "agent-token-builder", token_secret);

        let work = tempfile::tempdir().unwrap();
        let kubeconfig = kube.kubeconfig(work.path());
        let (grpc_port, metrics_port) = (free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyswap"));
        cmd.args(["serve", "--kubernetes", "--namespace", NS, "--write-status"])
            .args(["--listen", &format!("127.0.0.1:{grpc_port}"), "--metrics", &format!("127.0.0.1:{metrics_port}")])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info");
        let mut keyswap = Proc::spawn("keyswap", cmd, work.path().join("keyswap.log"));
        let since = Instant::now();
        while !matches!(try_scrape(metrics_port, "/readyz").await, Some((200, _))) {
            keyswap.assert_running();
            assert!(since.elapsed() < Duration::from_secs(60), "never ready:\n{}", keyswap.output());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut c = grpc::connect(format!("127.0.0.1:{grpc_port}").parse().unwrap()).await;
        let r = grpc::request(&mut c, &anthropic(token)).await;
        assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some("sk-ant-k8s-one"));

        // Team C applies a policy keyswap refuses (the CRD schema allows the header name).
        kube.put("credentialinjectionpolicies", NS, "team-c-key", json!({"spec": {"parentRefs": [{"kind": "AIProviderRoute", "name": "team-c"}], "secretRef": {"name": "team-c"}, "target": "Header", "headerName": "x team key"}}));
        within("Accepted=False on the invalid policy", async || {
            kube.get("credentialinjectionpolicies", NS, "team-c-key").is_some_and(|o| {
                o["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c["type"] == "Accepted"
                            && c["status"] == "False"
                            && c["message"].as_str().unwrap_or("").contains("headerName")
                    })
                })
            })
        })
        .await;
        let (_, m) = scrape(metrics_port, "/metrics").await;
        assert!(metric(&m, "keyswap_config_rejected_objects") >= 1.0, "{m}");

        kube.put("secrets", NS, "anthropic", json!({"stringData": {"token": "sk-ant-k8s-two"}}));
        let took = within("rotation", async || {
            let r = grpc::request(&mut c, &anthropic(token)).await;
            set_value(&mutation(&r), "x-api-key").as_deref() == Some("sk-ant-k8s-two")
        })
        .await;
        eprintln!("kubernetes rotation with an invalid policy present: {took:?}");
        assert!(took < Duration::from_secs(1), "rotation took {took:?}");

        kube.delete("secrets", NS, "agent-token-builder");
        let took = within("revocation", async || {
            let r = grpc::request(&mut c, &anthropic(token)).await;
            matches!(&r.response, Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::ImmediateResponse(i)) if i.status.as_ref().unwrap().code == 401)
        })
        .await;
        eprintln!("kubernetes revocation with an invalid policy present: {took:?}");
        assert!(took < Duration::from_secs(1), "revocation took {took:?}");
        let log = keyswap.output();
        assert!(log.contains("CredentialInjectionPolicy agents/team-c-key: field `spec.headerName`"), "{log}");
        assert!(!log.contains("sk-ant-k8s") && !log.contains(token), "a secret in the log");
    }
}
