//! Kubernetes mode against a fake API server that speaks real list/watch over HTTP: initial
//! sync, Secret rotation, deletion, route changes, dropped watches, 410 Gone and an outage —
//! with gRPC requests flowing the whole time, and only referenced Secrets ever fetched.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::grpc::{self, immediate, mutation, set_value};
use common::kubeapi::{FakeKube, Outage};
use common::*;
use serde_json::json;

const NS: &str = "agents";
const REFERENCED: usize = 10;

fn seed(kube: &FakeKube) {
    seed_one(kube, "sk-ant-k8s-one");
    // Ten more referenced Secrets, and five thousand that nothing references.
    for i in 0..REFERENCED - 1 {
        kube.put("aiproviderroutes", NS, &format!("r{i}"), json!({"spec": {"parentRefs": [{"name": "egress"}], "rules": [{"matches": [{"provider": "custom", "hosts": [format!("r{i}.test")]}]}]}}));
        kube.put("credentialinjectionpolicies", NS, &format!("p{i}"), json!({"spec": {"parentRefs": [{"kind": "AIProviderRoute", "name": format!("r{i}")}], "secretRef": {"name": format!("s{i}")}, "target": "Header", "headerName": "x-key"}}));
        kube.put("secrets", NS, &format!("s{i}"), json!({"stringData": {"token": format!("key-{i}")}}));
    }
    for i in 0..5000 {
        kube.put("secrets", NS, &format!("noise-{i}"), json!({"stringData": {"token": format!("unrelated-{i}")}}));
    }
}

async fn wait_for_key(c: &mut grpc::Client, want: &str, since: Instant) -> Duration {
    loop {
        if grpc::anthropic_key(c).await.as_deref() == Ok(want) {
            return since.elapsed();
        }
        assert!(since.elapsed() < Duration::from_secs(10), "{want} never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `keyswap serve --kubernetes` on free ports, once `/readyz` answers 200 (the initial sync is
/// done). Returns the process, the gRPC port and the admin port.
async fn start_ready(
    kubeconfig: &std::path::Path,
    work: &std::path::Path,
    extra: &[&str],
    rust_log: &str,
) -> (Proc, u16, u16) {
    start_ready_env(kubeconfig, work, extra, rust_log, &[]).await
}

/// [`start_ready`] with `env` set.
async fn start_ready_env(
    kubeconfig: &std::path::Path,
    work: &std::path::Path,
    extra: &[&str],
    rust_log: &str,
    env: &[(&str, &str)],
) -> (Proc, u16, u16) {
    let mut args = vec!["serve", "--kubernetes", "--namespace", NS];
    args.extend(extra);
    start_serving(kubeconfig, work, &args, rust_log, env).await
}

/// `keyswap ARGS` on free ports, once `/readyz` answers 200.
async fn start_serving(
    kubeconfig: &std::path::Path,
    work: &std::path::Path,
    args: &[&str],
    rust_log: &str,
    env: &[(&str, &str)],
) -> (Proc, u16, u16) {
    let (grpc_port, metrics_port) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyswap"));
    cmd.args(args)
        .args(["--listen", &format!("127.0.0.1:{grpc_port}"), "--metrics", &format!("127.0.0.1:{metrics_port}")])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", rust_log)
        .envs(env.iter().copied());
    let mut keyswap = Proc::spawn("keyswap", cmd, work.join("keyswap.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        keyswap.assert_running();
        if let Ok(Some((200, _))) =
            tokio::time::timeout(Duration::from_secs(2), try_scrape(metrics_port, "/readyz")).await
        {
            return (keyswap, grpc_port, metrics_port);
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", keyswap.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends requests back to back until stopped; counts any that did not get a key injected.
fn keep_requesting(
    addr: std::net::SocketAddr,
) -> (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
    let task = tokio::spawn(async move {
        let mut c = grpc::connect(addr).await;
        while !s.load(Ordering::Relaxed) {
            match grpc::anthropic_key(&mut c).await {
                Ok(k) if k.starts_with("sk-ant-k8s") => o.fetch_add(1, Ordering::Relaxed),
                _ => f.fetch_add(1, Ordering::Relaxed),
            };
        }
    });
    (stop, ok, failed, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_follows_the_api_server_and_never_fails_a_request_meanwhile() {
    let kube = FakeKube::start().await;
    seed(&kube);
    let work = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig(work.path());
    // Not ready until the initial sync; then ready and serving.
    let (mut keyswap, grpc_port, metrics_port) =
        start_ready(&kubeconfig, work.path(), &["--write-status"], "info,keyswap=debug").await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{grpc_port}").parse().unwrap();
    let mut c = grpc::connect(addr).await;
    assert_eq!(grpc::anthropic_key(&mut c).await, Ok("sk-ant-k8s-one".into()));

    // Only the referenced Secrets are held, and no Secret was ever listed without a name.
    let (_, m) = scrape(metrics_port, "/metrics").await;
    assert_eq!(metric(&m, "keyswap_kube_secrets_watched"), REFERENCED as f64, "{m}");
    let secret_requests: Vec<String> =
        kube.requests.lock().unwrap().iter().filter(|r| r.contains("/secrets")).cloned().collect();
    assert!(!secret_requests.is_empty());
    for r in &secret_requests {
        assert!(r.contains("fieldSelector=metadata.name"), "a Secret request without a name selector: {r}");
        assert!(r.starts_with("GET "), "keyswap only reads Secrets: {r}");
        assert!(!r.contains("noise-"), "an unreferenced Secret was requested: {r}");
    }

    // Memory with 5,000 Secrets in the namespace (10 held): reported, and bounded loosely.
    let status = std::fs::read_to_string(format!("/proc/{}/status", keyswap.child.id())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    eprintln!("keyswap RSS after the initial sync with 5,000 Secrets in the namespace: {} KiB", rss_kib);
    assert!(rss_kib < 96 * 1024, "RSS {rss_kib} KiB");

    // --write-status: conditions on the objects.
    let cond = |kube: &FakeKube, res: &str, name: &str, t: &str| -> Option<(String, String)> {
        let obj = kube.get(res, NS, name)?;
        let c = obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == t)?.clone();
        Some((c["status"].as_str()?.to_owned(), c["reason"].as_str()?.to_owned()))
    };
    let since = Instant::now();
    while cond(&kube, "credentialinjectionpolicies", "anthropic-key", "ResolvedRefs")
        != Some(("True".into(), "ResolvedRefs".into()))
    {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "no status written: {:?}",
            kube.get("credentialinjectionpolicies", NS, "anthropic-key")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cond(&kube, "aiproviderroutes", "anthropic", "Accepted"), Some(("True".into(), "Accepted".into())));
    assert_eq!(
        cond(&kube, "aiproviderroutes", "anthropic", "ResolvedRefs"),
        Some(("True".into(), "ResolvedRefs".into()))
    );
    // A route no policy binds answers 503: its status says why.
    kube.put("aiproviderroutes", NS, "orphan", json!({"spec": {"parentRefs": [{"name": "egress"}], "rules": [{"matches": [{"provider": "custom", "hosts": ["orphan.test"]}]}]}}));
    let since = Instant::now();
    while cond(&kube, "aiproviderroutes", "orphan", "ResolvedRefs") != Some(("False".into(), "NoPolicy".into())) {
        assert!(since.elapsed() < Duration::from_secs(5), "{:?}", kube.get("aiproviderroutes", NS, "orphan"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // kubectl edit secret: the next requests carry the new key within a second.
    let edited = Instant::now();
    kube.put("secrets", NS, "anthropic", json!({"data": {"token": b64(b"sk-ant-k8s-two")}}));
    let took = wait_for_key(&mut c, "sk-ant-k8s-two", edited).await;
    assert!(took < Duration::from_secs(1), "rotation took {took:?}");

    // Dropped watches, then 410 Gone: keyswap relists; not one request fails meanwhile.
    let (stop, ok, failed, task) = keep_requesting(addr);
    tokio::time::sleep(Duration::from_millis(200)).await;
    kube.drop_watches();
    tokio::time::sleep(Duration::from_millis(500)).await;
    kube.compact();
    kube.drop_watches();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let edited = Instant::now();
    kube.put("secrets", NS, "anthropic", json!({"stringData": {"token": "sk-ant-k8s-three"}}));
    let took = wait_for_key(&mut c, "sk-ant-k8s-three", edited).await;
    assert!(took < Duration::from_secs(2), "after relist, rotation took {took:?}");
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();
    assert!(ok.load(Ordering::Relaxed) > 20, "requests kept flowing");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed while watches were cut");

    // A route change changes routing.
    kube.put("aiproviderroutes", NS, "anthropic", json!({"spec": {"parentRefs": [{"name": "egress"}], "rules": [{"matches": [{"provider": "anthropic", "hosts": ["anthropic.internal.test"]}]}]}}));
    let since = Instant::now();
    while grpc::anthropic_key(&mut c).await != Err(403) {
        assert!(since.elapsed() < Duration::from_secs(5), "route change not applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = grpc::request(
        &mut c,
        &[(":method", "POST"), (":authority", "anthropic.internal.test"), (":path", "/v1/messages")],
    )
    .await;
    assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some("sk-ant-k8s-three"));

    // An invalid object is reported on its status and left out: its hosts fail closed (503),
    // everything else keeps serving.
    kube.put("aiproviderroutes", NS, "r1", json!({"spec": {"parentRefs": [{"name": "egress"}], "rules": [{"matches": [{"provider": "opnai", "hosts": ["r1.test"]}]}]}}));
    let since = Instant::now();
    while cond(&kube, "aiproviderroutes", "r1", "Accepted").map(|c| c.0) != Some("False".into()) {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "invalid route not reported: {:?}",
            kube.get("aiproviderroutes", NS, "r1")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let msg = kube.get("aiproviderroutes", NS, "r1").unwrap()["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(msg.contains("unknown provider `opnai`"), "{msg}");
    let r = grpc::request(&mut c, &[(":method", "POST"), (":authority", "r1.test"), (":path", "/x")]).await;
    let i = immediate(&r);
    assert_eq!(i.status.as_ref().unwrap().code, 503, "the invalid route's host fails closed");
    assert!(String::from_utf8_lossy(&i.body).contains("ConfigurationRejected"), "{i:?}");
    let r = grpc::request(
        &mut c,
        &[(":method", "POST"), (":authority", "anthropic.internal.test"), (":path", "/v1/messages")],
    )
    .await;
    assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some("sk-ant-k8s-three"), "the rest still serves");
    assert!(keyswap
        .output()
        .contains("AIProviderRoute agents/r1: field `spec.rules[0].matches[0].provider`: unknown provider"));
    kube.put("aiproviderroutes", NS, "r1", json!({"spec": {"parentRefs": [{"name": "egress"}], "rules": [{"matches": [{"provider": "custom", "hosts": ["r1.test"]}]}]}}));

    // Secret deleted: fail closed with 503.
    kube.delete("secrets", NS, "anthropic");
    let since = Instant::now();
    loop {
        let r = grpc::request(
            &mut c,
            &[(":method", "POST"), (":authority", "anthropic.internal.test"), (":path", "/v1/messages")],
        )
        .await;
        if let Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::ImmediateResponse(
            i,
        )) = &r.response
        {
            assert_eq!(i.status.as_ref().unwrap().code, 503);
            break;
        }
        assert!(since.elapsed() < Duration::from_secs(5), "deletion not applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let since = Instant::now();
    while cond(&kube, "credentialinjectionpolicies", "anthropic-key", "ResolvedRefs")
        != Some(("False".into(), "SecretNotFound".into()))
    {
        assert!(since.elapsed() < Duration::from_secs(5), "ResolvedRefs not updated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // API server down: keyswap keeps serving the last good snapshot and says so.
    kube.set_down(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..20 {
        let r = grpc::request(&mut c, &[(":method", "POST"), (":authority", "r0.test"), (":path", "/x")]).await;
        assert_eq!(set_value(&mutation(&r), "x-key").as_deref(), Some("key-0"), "request {i} during the outage");
    }
    // The client retries 503s for a while before the watch reports the error: poll.
    let since = Instant::now();
    loop {
        let (st, ready) = scrape(metrics_port, "/readyz").await;
        assert_eq!(st, 200, "still serving: {ready}");
        if ready.contains("serving the last good configuration") {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "/readyz never reported the outage: {ready}\n{}",
            keyswap.output()
        );
        let r = grpc::request(&mut c, &[(":method", "POST"), (":authority", "r0.test"), (":path", "/x")]).await;
        assert_eq!(set_value(&mutation(&r), "x-key").as_deref(), Some("key-0"), "request during the outage");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, m) = scrape(metrics_port, "/metrics").await;
    assert!(metric(&m, "keyswap_kube_watch_errors_total") > 0.0, "{m}");
    assert_eq!(metric(&m, "keyswap_kube_api_reachable"), 0.0, "{m}");
    assert_eq!(keyswap::prom::lint(&m), Vec::<String>::new(), "{m}");
    kube.set_down(false);

    let logs = keyswap.output();
    for secret in ["sk-ant-k8s-one", "sk-ant-k8s-two", "sk-ant-k8s-three", "key-0", "unrelated-1"] {
        assert!(!logs.contains(secret), "logs contain `{secret}`");
    }
    keyswap.terminate();
}

/// The SigV4 signature headers keyswap sends for one buffered Bedrock request: the request-headers
/// answer must ask for the whole body, and the body answer carries the signature.
async fn bedrock_signature(c: &mut grpc::Client) -> String {
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    let headers = grpc::headers(&[
        (":method", "POST"),
        (":authority", "bedrock-runtime.eu-west-1.amazonaws.com"),
        (":path", "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"),
        ("content-type", "application/json"),
        ("content-length", "2"),
        ("authorization", "AWS4-HMAC-SHA256 Credential=keyswap-injected-by-proxy/20250101/eu-west-1/bedrock/aws4_request, SignedHeaders=host, Signature=00"),
    ]);
    let answers = grpc::exchange(c, vec![headers, grpc::body(b"{}")]).await;
    assert_eq!(answers.len(), 2, "{answers:?}");
    let first = answers[0].as_ref().unwrap();
    let mode = first.mode_override.as_ref().expect("the body is asked for");
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
    assert_eq!(mode.request_body_mode, BodySendMode::Buffered as i32, "{mode:?}");
    let Some(Response::RequestBody(b)) = &answers[1].as_ref().unwrap().response else {
        panic!("a body answer: {answers:?}")
    };
    let m = b.response.as_ref().and_then(|r| r.header_mutation.as_ref()).expect("signature headers");
    set_value(m, "authorization").expect("authorization set")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_signs_bedrock_requests_with_multi_line_secrets_and_follows_rotation() {
    let kube = FakeKube::start().await;
    kube.put("egressgateways", NS, "egress", json!({"spec": {"defaultPolicy": "deny-all"}}));
    kube.put(
        "aiproviderroutes",
        NS,
        "bedrock",
        json!({"spec": {"parentRefs": [{"name": "egress"}], "rules": [{"matches": [{"provider": "bedrock"}]}]}}),
    );
    kube.put("credentialinjectionpolicies", NS, "sigv4", json!({"spec": {"parentRefs": [{"name": "bedrock"}], "secretRef": {"name": "aws"}, "target": "ProviderAuth", "providerAuth": {"type": "AWSv4"}}}));
    // A value with a trailing newline (as `kubectl create secret --from-file` leaves it) is fine here.
    kube.put("secrets", NS, "aws", json!({"data": {"AWS_ACCESS_KEY_ID": b64(b"AKIAKUBEONE\n"), "AWS_SECRET_ACCESS_KEY": b64(b"k8s-secret-one\n")}}));
    let work = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig(work.path());
    let (keyswap, grpc_port, _) = start_ready(&kubeconfig, work.path(), &[], "debug").await;
    let mut c = grpc::connect(format!("127.0.0.1:{grpc_port}").parse().unwrap()).await;
    let auth = bedrock_signature(&mut c).await;
    assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIAKUBEONE/"), "{auth}");
    assert!(auth.contains("/eu-west-1/bedrock/aws4_request"), "region from the host: {auth}");

    // kubectl edit secret: the next request is signed with the new key.
    kube.put(
        "secrets",
        NS,
        "aws",
        json!({"stringData": {"AWS_ACCESS_KEY_ID": "AKIAKUBETWO", "AWS_SECRET_ACCESS_KEY": "k8s-secret-two"}}),
    );
    let since = Instant::now();
    while !bedrock_signature(&mut c).await.starts_with("AWS4-HMAC-SHA256 Credential=AKIAKUBETWO/") {
        assert!(since.elapsed() < Duration::from_secs(2), "rotation not applied within 2 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let logs = keyswap.output();
    assert!(!logs.contains("k8s-secret-one") && !logs.contains("k8s-secret-two"), "secret in the logs");
}

/// Agent tokens in Kubernetes mode: the labelled token Secrets and the tenant Secrets a name
/// template matches are watched; each agent gets its tenant's key; deleting the token Secret
/// (`kubectl delete secret`) refuses the agent within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_admits_agents_by_token_and_picks_their_tenants_key() {
    let kube = FakeKube::start().await;
    kube.put(
        "egressgateways",
        NS,
        "egress",
        json!({"spec": {"defaultPolicy": "deny-all", "agentAuth": {"validators": [{"apiKeys": {}}]}}}),
    );
    kube.put(
        "aiproviderroutes",
        NS,
        "anthropic",
        json!({"spec": {"parentRefs": [{"name": "egress"}], "rules": [{"matches": [{"provider": "anthropic"}]}]}}),
    );
    kube.put("credentialinjectionpolicies", NS, "byok", json!({"spec": {"parentRefs": [{"name": "anthropic"}], "secretRef": {"name": "anthropic"}, "target": "Header", "credentialSelector": {"byTenant": {"secretNameTemplate": "{tenant}-anthropic"}}}}));
    kube.put("secrets", NS, "acme-anthropic", json!({"data": {"token": b64(b"sk-ant-k8s-acme")}}));
    let token = "ksa_k8s-agent-token-0001";
    let digest: String = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let token_secret = json!({
        "metadata": {"labels": {"keyswap.dev/agent-token": "true"}},
        "stringData": {"sha256": digest, "agent": "builder", "tenant": "acme"},
    });
    kube.put("secrets", NS, "agent-token-builder", token_secret);
    let work = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig(work.path());
    let (keyswap, grpc_port, _) = start_ready(&kubeconfig, work.path(), &[], "debug").await;
    let mut c = grpc::connect(format!("127.0.0.1:{grpc_port}").parse().unwrap()).await;
    let ask = |c: &mut grpc::Client| {
        let mut c = c.clone();
        async move {
            let r = grpc::request(
                &mut c,
                &[
                    (":method", "POST"),
                    (":authority", "api.anthropic.com"),
                    (":path", "/v1/messages"),
                    ("x-api-key", token),
                ],
            )
            .await;
            match &r.response {
                Some(
                    envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::ImmediateResponse(_),
                ) => Err(immediate(&r).status.as_ref().unwrap().code as u32),
                _ => Ok(set_value(&mutation(&r), "x-api-key").unwrap_or_default()),
            }
        }
    };
    assert_eq!(ask(&mut c).await, Ok("sk-ant-k8s-acme".to_owned()), "{}", keyswap.output());
    assert_eq!(grpc::anthropic_key(&mut c).await, Err(401), "no token: refused");

    kube.delete("secrets", NS, "agent-token-builder");
    let since = Instant::now();
    while ask(&mut c).await != Err(401) {
        assert!(since.elapsed() < Duration::from_secs(2), "revoked token still admitted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!keyswap.output().contains(token), "token in the logs");
}

/// The attack (or the misconfiguration): a team's policy names a Secret in a namespace whose
/// Secrets keyswap may not read (RBAC answers 403), so that Secret's watch never lists. Every
/// rebuild waited for it: keyswap never became ready, and once running no change for anyone
/// (a rotated key, a new route) was applied. Past a grace period the Secret counts as not found:
/// that team's route fails closed, everyone else's configuration follows the API server (also
/// while the team renames its Secret again and again), and the Secret is used as soon as it can
/// be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_keyswap_may_not_read_holds_no_one_elses_configuration() {
    let kube = FakeKube::start().await;
    seed_one(&kube, "sk-ant-k8s-one");
    let admits_team_a = json!({"spec": {"defaultPolicy": "deny-all", "allowedRoutes": {"namespaces": ["team-a"]}}});
    kube.put("egressgateways", NS, "egress", admits_team_a);
    kube.put("aiproviderroutes", "team-a", "svc", json!({"spec": {"parentRefs": [{"name": "egress", "namespace": NS}], "rules": [{"matches": [{"provider": "custom", "hosts": ["svc.team-a.test"]}]}]}}));
    kube.put("credentialinjectionpolicies", "team-a", "svc-key", json!({"spec": {"parentRefs": [{"kind": "AIProviderRoute", "name": "svc"}], "secretRef": {"name": "svc"}, "target": "Header", "headerName": "x-key"}}));
    kube.put("secrets", "team-a", "svc", json!({"stringData": {"token": "team-a-key"}}));
    kube.forbid("secrets", "team-a", true);
    let work = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig(work.path());
    let started = Instant::now();
    let (keyswap, grpc_port, _) = start_serving(
        &kubeconfig,
        work.path(),
        &["serve", "--kubernetes", "--gateway", &format!("{NS}/egress")],
        "info",
        &[],
    )
    .await;
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(30), "ready only after {waited:?}");
    let mut c = grpc::connect(format!("127.0.0.1:{grpc_port}").parse().unwrap()).await;
    assert_eq!(grpc::anthropic_key(&mut c).await.as_deref(), Ok("sk-ant-k8s-one"), "{}", keyswap.output());
    let team_a = |c: &mut grpc::Client| {
        let mut c = c.clone();
        async move {
            let r =
                grpc::request(&mut c, &[(":method", "POST"), (":authority", "svc.team-a.test"), (":path", "/v1/x")])
                    .await;
            match &r.response {
                Some(
                    envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::ImmediateResponse(_),
                ) => Err(immediate(&r).status.as_ref().unwrap().code as u32),
                _ => Ok(set_value(&mutation(&r), "x-key").unwrap_or_default()),
            }
        }
    };
    assert_eq!(team_a(&mut c).await, Err(503), "the unreadable Secret's route fails closed");
    let log = keyswap.output();
    assert!(log.contains("a Secret watch has not listed") && log.contains("team-a/svc"), "{log}");

    // The platform's key rotates while team-a's Secret stays unreadable: applied at once.
    kube.put("secrets", NS, "anthropic", json!({"data": {"token": b64(b"sk-ant-k8s-two")}}));
    let took = wait_for_key(&mut c, "sk-ant-k8s-two", Instant::now()).await;
    assert!(took < Duration::from_secs(2), "rotation took {took:?} while another Secret was unreadable");

    // The team renames its Secret every 4 s, each a new watch that never lists: rebuilds wait at
    // most the grace from the first that waited, so a rotation meanwhile still lands.
    let renames = tokio::spawn({
        let kube = kube.clone();
        async move {
            for i in 0..6 {
                kube.put("credentialinjectionpolicies", "team-a", "svc-key", json!({"spec": {"parentRefs": [{"kind": "AIProviderRoute", "name": "svc"}], "secretRef": {"name": format!("svc-{i}")}, "target": "Header", "headerName": "x-key"}}));
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let since = Instant::now();
    kube.put("secrets", NS, "anthropic", json!({"data": {"token": b64(b"sk-ant-k8s-three")}}));
    while grpc::anthropic_key(&mut c).await.as_deref() != Ok("sk-ant-k8s-three") {
        assert!(
            since.elapsed() < Duration::from_secs(17),
            "renamed unreadable Secrets held the rotation:\n{}",
            keyswap.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    renames.await.unwrap();
    kube.put("credentialinjectionpolicies", "team-a", "svc-key", json!({"spec": {"parentRefs": [{"kind": "AIProviderRoute", "name": "svc"}], "secretRef": {"name": "svc"}, "target": "Header", "headerName": "x-key"}}));

    // RBAC fixed: team-a's key is used as soon as its watch lists it.
    kube.forbid("secrets", "team-a", false);
    let since = Instant::now();
    while team_a(&mut c).await != Ok("team-a-key".to_owned()) {
        assert!(since.elapsed() < Duration::from_secs(10), "team-a's Secret never used:\n{}", keyswap.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!keyswap.output().contains("team-a-key"), "a key in the log");
}

/// The gateway, one route, its policy and its Secret: what the outage and logging tests need.
/// The attack: a team whose policy names its tenants' Secrets by template (`{tenant}-anthropic`)
/// fills its namespace with large Secrets of any other name (or churns them). keyswap listed the
/// whole namespace and cached every Secret in it, each rebuild copying them all, until it ran out
/// of memory: an outage for every tenant, since Envoy fails closed. Only Secrets whose names fit
/// a template are held now; the rest never reach the cache, and their churn rebuilds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_policy_holds_only_the_secrets_its_template_names() {
    let kube = FakeKube::start().await;
    seed_one(&kube, "sk-ant-k8s-one");
    kube.put("credentialinjectionpolicies", NS, "anthropic-key", json!({"spec": {"parentRefs": [{"kind": "AIProviderRoute", "name": "anthropic"}], "secretRef": {"name": "anthropic"}, "target": "Header", "credentialSelector": {"byTenant": {"secretNameTemplate": "{tenant}-anthropic"}}}}));
    kube.put("secrets", NS, "acme-anthropic", json!({"data": {"token": b64(b"sk-ant-k8s-acme")}}));
    let filler = "x".repeat(64 * 1024);
    for i in 0..200 {
        kube.put("secrets", NS, &format!("release-{i}"), json!({"stringData": {"release": filler}}));
    }
    // Named to fit the template, but no key is 128 KiB: a flood, never held.
    kube.put("secrets", NS, "junk-anthropic", json!({"stringData": {"token": "x".repeat(128 * 1024)}}));
    let work = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig(work.path());
    let (keyswap, _, metrics_port) = start_ready(&kubeconfig, work.path(), &[], "info").await;
    let held = async || metric(&scrape(metrics_port, "/metrics").await.1, "keyswap_kube_secrets_watched");
    // `anthropic` (by name, and as the template's namespace lists it: one Secret) and `acme-anthropic`.
    assert_eq!(held().await, 2.0, "{}", keyswap.output());
    // A new tenant's Secret is picked up; another churned Secret is not held.
    kube.put("secrets", NS, "globex-anthropic", json!({"data": {"token": b64(b"sk-ant-k8s-globex")}}));
    kube.put("secrets", NS, "release-0", json!({"stringData": {"release": "changed"}}));
    let since = Instant::now();
    while held().await != 3.0 {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "the new tenant's Secret was not picked up:\n{}",
            keyswap.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `--write-status` wrote every route in the cluster as this gateway saw it: a route attached to
/// another gateway got `Accepted`/`ResolvedRefs` True from this one (and two deployments, one
/// per gateway, overwrote each other's verdicts); two policies on one route both reported True
/// while the route answered 503. Now only this gateway's routes and their policies are written,
/// and the conflicting policies say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_of_another_gateway_or_a_conflicting_policy_is_never_reported_accepted_and_resolved() {
    let kube = FakeKube::start().await;
    seed_one(&kube, "sk-ant-k8s-one");
    kube.put("egressgateways", NS, "other", json!({"spec": {}}));
    let custom = |gateway: &str, host: &str| json!({"spec": {"parentRefs": [{"name": gateway}], "rules": [{"matches": [{"provider": "custom", "hosts": [host]}]}]}});
    kube.put("aiproviderroutes", NS, "theirs", custom("other", "theirs.test"));
    kube.put("credentialinjectionpolicies", NS, "theirs-key", json!({"spec": {"parentRefs": [{"kind": "AIProviderRoute", "name": "theirs"}], "secretRef": {"name": "anthropic"}, "target": "Header", "headerName": "x-key"}}));
    kube.put("aiproviderroutes", NS, "contested", custom("egress", "contested.test"));
    for p in ["one", "two"] {
        kube.put("credentialinjectionpolicies", NS, p, json!({"spec": {"parentRefs": [{"kind": "AIProviderRoute", "name": "contested"}], "secretRef": {"name": "anthropic"}, "target": "Header", "headerName": "x-key"}}));
    }
    let work = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig(work.path());
    let gateway = format!("{NS}/egress");
    let (keyswap, _, _) =
        start_ready(&kubeconfig, work.path(), &["--write-status", "--gateway", &gateway], "info").await;
    let cond = |res: &str, name: &str, t: &str| -> Option<String> {
        let obj = kube.get(res, NS, name)?;
        let c = obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == t)?.clone();
        Some(c["status"].as_str()?.to_owned())
    };
    let since = Instant::now();
    while cond("aiproviderroutes", "anthropic", "ResolvedRefs").is_none() {
        assert!(since.elapsed() < Duration::from_secs(10), "no status written:\n{}", keyswap.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every verdict of a rebuild is written in one pass: the others are in by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cond("aiproviderroutes", "anthropic", "Accepted").as_deref(), Some("True"));
    for p in ["one", "two"] {
        assert_eq!(
            cond("credentialinjectionpolicies", p, "Accepted").as_deref(),
            Some("False"),
            "{p}: {:?}",
            kube.get("credentialinjectionpolicies", NS, p)
        );
    }
    assert_eq!(cond("aiproviderroutes", "contested", "ResolvedRefs").as_deref(), Some("False"));
    for (res, name) in [("aiproviderroutes", "theirs"), ("credentialinjectionpolicies", "theirs-key")] {
        assert!(
            kube.get(res, NS, name).unwrap()["status"].is_null(),
            "{name} was written by another gateway's keyswap: {:?}",
            kube.get(res, NS, name)
        );
    }
}

fn seed_one(kube: &FakeKube, key: &str) {
    kube.put("egressgateways", NS, "egress", json!({"spec": {"defaultPolicy": "deny-all"}}));
    kube.put(
        "aiproviderroutes",
        NS,
        "anthropic",
        json!({"spec": {"parentRefs": [{"name": "egress"}], "rules": [{"matches": [{"provider": "anthropic"}]}]}}),
    );
    kube.put("credentialinjectionpolicies", NS, "anthropic-key", json!({"spec": {"parentRefs": [{"kind": "AIProviderRoute", "name": "anthropic"}], "secretRef": {"name": "anthropic"}, "target": "Header"}}));
    kube.put("secrets", NS, "anthropic", json!({"data": {"token": b64(key.as_bytes())}}));
}

/// A Secret rotated while the API server is down is in effect within 2 s of the API server
/// answering again (which then answers 410 Gone to every watch resuming from before the outage:
/// keyswap relists). Meanwhile requests keep the old key and /readyz and /metrics say the watch
/// is failing.
async fn rotation_during_an_outage(outage: Duration, how: Outage, gone_as_http: bool) {
    let kube = FakeKube::start().await;
    if gone_as_http {
        kube.gone_as_http_status();
    }
    seed_one(&kube, "sk-ant-k8s-before");
    let work = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig(work.path());
    let (mut keyswap, grpc_port, metrics_port) = start_ready(&kubeconfig, work.path(), &[], "info").await;
    let mut c = grpc::connect(format!("127.0.0.1:{grpc_port}").parse().unwrap()).await;
    assert_eq!(grpc::anthropic_key(&mut c).await, Ok("sk-ant-k8s-before".into()));
    let (_, m) = scrape(metrics_port, "/metrics").await;
    assert_eq!(metric(&m, "keyswap_kube_api_reachable"), 1.0, "{m}");

    kube.outage(Some(how));
    let down = Instant::now();
    kube.put("secrets", NS, "anthropic", json!({"stringData": {"token": "sk-ant-k8s-rotated"}}));

    // While down: the old key serves, and /readyz (still 200) and /metrics say the watch fails.
    let mut reported = None;
    while down.elapsed() < outage {
        assert_eq!(grpc::anthropic_key(&mut c).await, Ok("sk-ant-k8s-before".into()), "request during the outage");
        if reported.is_none() {
            let (st, ready) = scrape(metrics_port, "/readyz").await;
            let (_, m) = scrape(metrics_port, "/metrics").await;
            assert_eq!(st, 200, "still serving: {ready}");
            if ready.contains("watch failing") && metric(&m, "keyswap_kube_api_reachable") == 0.0 {
                assert!(ready.contains("serving the last good configuration"), "{ready}");
                assert!(metric(&m, "keyswap_kube_watch_errors_total") > 0.0, "{m}");
                assert!(metric(&m, "keyswap_kube_watches_failing") > 0.0, "{m}");
                eprintln!("{:?} into the outage, /readyz says: {ready}", down.elapsed());
                reported = Some(down.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reported = reported.expect("/readyz and /metrics never said the watch was failing during the outage");
    assert!(reported < Duration::from_secs(3), "the outage was reported after {reported:?}");
    let (_, m) = scrape(metrics_port, "/metrics").await;
    let errors_during = metric(&m, "keyswap_kube_watch_errors_total");

    // The API server answers again: the rotation is in effect within 2 s.
    kube.outage(None);
    let back = Instant::now();
    let took = wait_for_key(&mut c, "sk-ant-k8s-rotated", back).await;
    eprintln!(
        "{outage:?} outage ({how:?}): rotation in effect {took:?} after the API server answered again \
         ({errors_during} watch errors counted during the outage)"
    );
    assert!(took < Duration::from_secs(2), "rotation took {took:?} after recovery");

    // And /readyz and /metrics say so; the stale watches were relisted (410), not counted as errors.
    let since = Instant::now();
    loop {
        let (_, ready) = scrape(metrics_port, "/readyz").await;
        let (_, m) = scrape(metrics_port, "/metrics").await;
        if ready.contains("synced with the Kubernetes API") && metric(&m, "keyswap_kube_api_reachable") == 1.0 {
            assert_eq!(metric(&m, "keyswap_kube_watches_failing"), 0.0, "{m}");
            assert!(metric(&m, "keyswap_kube_relists_total") > 0.0, "no watch resumed into a 410: {m}");
            break;
        }
        assert!(since.elapsed() < Duration::from_secs(5), "still failing after recovery: {ready}\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Bounded retries: at most about one attempt per watch (4 here) per 100 ms, not a hot loop.
    let per_second = errors_during / outage.as_secs_f64();
    assert!(per_second < 4.0 * 10.0, "{per_second} watch errors a second during the outage");
    let logs = keyswap.output();
    assert!(!logs.contains("sk-ant-k8s-before") && !logs.contains("sk-ant-k8s-rotated"), "a key in the logs");
    keyswap.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotated_during_a_4s_outage_is_in_effect_within_2s_of_recovery() {
    rotation_during_an_outage(Duration::from_secs(4), Outage::Unavailable, false).await;
}

/// The same when the API server answers a stale watch with HTTP 410 rather than an ERROR event:
/// kube-runtime alone would retry the same resourceVersion forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotated_during_a_4s_outage_is_in_effect_within_2s_of_recovery_when_410_is_an_http_status() {
    rotation_during_an_outage(Duration::from_secs(4), Outage::Closed, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotated_during_a_60s_outage_is_in_effect_within_2s_of_recovery() {
    rotation_during_an_outage(Duration::from_secs(60), Outage::Closed, false).await;
}

/// Waits (10 s at most) for a line of keyswap's log containing `needle`.
async fn wait_for_log(keyswap: &Proc, needle: &str, rust_log: &str) {
    let since = Instant::now();
    loop {
        let logs = keyswap.output();
        if let Some(line) = logs.lines().find(|l| l.contains(needle)) {
            eprintln!("RUST_LOG={rust_log:?}: {line}");
            return;
        }
        assert!(since.elapsed() < Duration::from_secs(10), "no log line with `{needle}`:\n{logs}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Secret that cannot be parsed (its `data` a string, not a map: serde's message would quote
/// it) arrives as a watch event, then in a list. Neither its values nor the body reach the log,
/// with default logging or RUST_LOG=debug; keyswap's own log names the watch and the cause, and
/// the last good key keeps serving until the Secret is fixed.
async fn unparseable_secret(rust_log: &str) {
    let kube = FakeKube::start().await;
    seed_one(&kube, "sk-ant-k8s-good");
    let work = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig(work.path());
    let (mut keyswap, grpc_port, metrics_port) = start_ready(&kubeconfig, work.path(), &[], rust_log).await;
    let mut c = grpc::connect(format!("127.0.0.1:{grpc_port}").parse().unwrap()).await;
    assert_eq!(grpc::anthropic_key(&mut c).await, Ok("sk-ant-k8s-good".into()));

    let canaries = ["sk-leak-canary-in-data", "sk-leak-canary-in-stringdata", "c2stbGVhay1jYW5hcnktYjY0"];
    kube.put(
        "secrets",
        NS,
        "anthropic",
        json!({"data": canaries[0], "stringData": {"token": canaries[1]}, "metadata": {"annotations": {"b64": canaries[2]}}}),
    );
    // The event, then the relist keyswap makes because it lost one.
    let event = "watch=Secret agents/anthropic cause=watch stream failed: a watch event could not be parsed as Secret";
    wait_for_log(&keyswap, event, rust_log).await;
    let list = "watch=Secret agents/anthropic cause=list failed: the list response could not be parsed as Secret \
                (a field has the wrong type or value at line 1 column";
    wait_for_log(&keyswap, list, rust_log).await;
    let (_, ready) = scrape(metrics_port, "/readyz").await;
    assert!(ready.contains("Secret agents/anthropic") && ready.contains("could not be parsed as Secret"), "{ready}");
    assert_eq!(grpc::anthropic_key(&mut c).await, Ok("sk-ant-k8s-good".into()), "the last good key keeps serving");

    // Fixed: the new key serves within 2 s.
    kube.put("secrets", NS, "anthropic", json!({"stringData": {"token": "sk-ant-k8s-fixed"}}));
    let took = wait_for_key(&mut c, "sk-ant-k8s-fixed", Instant::now()).await;
    assert!(took < Duration::from_secs(2), "fix took {took:?}");

    let logs = keyswap.output();
    for secret in canaries.iter().chain(&["sk-ant-k8s-good", "sk-ant-k8s-fixed"]) {
        assert!(!logs.contains(secret), "RUST_LOG={rust_log:?}: logs contain `{secret}`:\n{logs}");
    }
    keyswap.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparseable_secret_never_reaches_the_log_and_the_failure_names_the_watch() {
    unparseable_secret("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparseable_secret_never_reaches_the_log_at_debug_either() {
    unparseable_secret("debug").await;
}

/// `OTEL_METRICS_EXPORTER=otlp` pushes what `/metrics` and `/readyz` report in Kubernetes mode:
/// the watches' own families, and readiness from the initial sync (not a constant 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_pushes_its_watch_metrics_and_readiness_over_otlp() {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let (collector, addr) = common::otlp::Receiver::start().await;
    let kube = FakeKube::start().await;
    seed_one(&kube, "sk-ant-k8s-otlp-0001");
    let work = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig(work.path());
    let endpoint = format!("http://{addr}");
    let env = [
        ("OTEL_METRICS_EXPORTER", "otlp"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
    ];
    let (keyswap, _, metrics_port) = start_ready_env(&kubeconfig, work.path(), &[], "info", &env).await;
    // The first push after the sync.
    let deadline = Instant::now() + Duration::from_secs(15);
    let pushed = loop {
        let last = collector.metrics.lock().unwrap().last().cloned();
        if let Some(r) = last {
            break r.resource_metrics[0].scope_metrics[0].metrics.clone();
        }
        assert!(Instant::now() < deadline, "no metrics push in 15 s:\n{}", keyswap.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let value = |name: &str| {
        let m = pushed.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("no {name} pushed: {pushed:#?}"));
        let points = match &m.data {
            Some(Data::Gauge(g)) => &g.data_points,
            Some(Data::Sum(s)) => &s.data_points,
            other => panic!("{name}: {other:?}"),
        };
        format!("{:?}", points[0].value)
    };
    assert!(value("keyswap.ready").contains('1'), "ready after the sync: {}", value("keyswap.ready"));
    assert!(value("keyswap.kube.secrets.watched").contains('1'), "{}", value("keyswap.kube.secrets.watched"));
    let _ = value("keyswap.kube.watch.errors");
    // The scrape says the same.
    let (_, text) = scrape(metrics_port, "/metrics").await;
    assert!(text.contains("keyswap_kube_secrets_watched 1"), "{text}");
    let raw = String::from_utf8_lossy(&collector.raw_bytes()).into_owned();
    assert!(!raw.contains("sk-ant-k8s-otlp-0001"), "a secret in the OTLP exports");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_applies_token_budget_changes_without_a_restart() {
    let kube = FakeKube::start().await;
    seed_one(&kube, "sk-ant-k8s-budget");
    let budget = |requests: u64| {
        json!({"spec": {"parentRefs": [{"name": "anthropic"}], "key": "Route", "window": "Hour",
            "limits": {"requests": requests}}})
    };
    kube.put("tokenbudgets", NS, "anthropic-hourly", budget(2));
    let work = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig(work.path());
    let (keyswap, grpc_port, metrics_port) = start_ready(&kubeconfig, work.path(), &[], "debug").await;
    let mut c = grpc::connect(format!("127.0.0.1:{grpc_port}").parse().unwrap()).await;
    // Bodiless requests reserve at their headers.
    let ask = |c: &mut grpc::Client| {
        let mut c = c.clone();
        async move {
            let mut h =
                grpc::headers(&[(":authority", "api.anthropic.com"), (":path", "/v1/models"), (":method", "GET")]);
            if let Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request::RequestHeaders(r)) =
                &mut h.request
            {
                r.end_of_stream = true;
            }
            let r = grpc::exchange(&mut c, vec![h]).await.remove(0).expect("an answer");
            match &r.response {
                Some(
                    envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::ImmediateResponse(_),
                ) => immediate(&r).status.as_ref().unwrap().code as u32,
                _ => 200,
            }
        }
    };
    assert_eq!((ask(&mut c).await, ask(&mut c).await), (200, 200), "{}", keyswap.output());
    assert_eq!(ask(&mut c).await, 429, "the third request of a 2-request budget was admitted");
    // Raised with `kubectl apply`: the requests already counted stay counted.
    kube.put("tokenbudgets", NS, "anthropic-hourly", budget(3));
    let since = Instant::now();
    while ask(&mut c).await != 200 {
        assert!(since.elapsed() < Duration::from_secs(2), "the raised budget never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ask(&mut c).await, 429, "3 of 3 used");
    // Deleted: no limit.
    kube.delete("tokenbudgets", NS, "anthropic-hourly");
    let since = Instant::now();
    while ask(&mut c).await != 200 {
        assert!(since.elapsed() < Duration::from_secs(2), "the deleted budget still applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, text) = scrape(metrics_port, "/metrics").await;
    // Two refusals above, and any while the changes were on their way.
    assert!(
        metric(&text, "keyswap_budget_decisions_total{budget=\"agents/anthropic-hourly\",decision=\"limited\"}") >= 2.0
    );
    assert_eq!(
        metric(&text, "keyswap_budget_decisions_total{budget=\"agents/anthropic-hourly\",decision=\"admitted\"}"),
        3.0
    );
}
