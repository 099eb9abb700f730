//! End to end through the real Envoy: agent → Envoy (ext_proc, fail closed) → fake provider,
//! with keyswap running as its own process on a Unix socket.

mod common;

use std::time::{Duration, Instant};

use common::grpc;
use common::*;

/// Every scenario against one keyswap process, then its logs are searched for secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_requests_through_envoy_carry_only_the_real_key() {
    let config = config_dir();
    let work = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start().await;
    fake.set_accepts("allowed.example.com", vec![Accept::Header("x-agent-own", "fine".into())]);
    let grpc_port = free_port();
    let listen = format!("127.0.0.1:{grpc_port}");
    let (mut keyswap, uds) = start_keyswap(config.path(), work.path(), &[], &["--listen", &listen]);
    let (mut envoy, port) = start_envoy(work.path(), &uds, fake.addr);
    let c = client();

    // Each provider, with the placeholder the agent's SDK sends.
    let (st, body) = send(&c, port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]).await;
    assert_eq!(st, 200, "anthropic: {body}\n{}", envoy.output());
    // The anthropic Python SDK 2.x sends the key as a bearer token.
    let (st, _) =
        send(&c, port, "api.anthropic.com", "/v1/messages", &[("authorization", "Bearer keyswap-injected-by-proxy")])
            .await;
    assert_eq!(st, 200);
    let (st, _) = send(
        &c,
        port,
        "api.openai.com",
        "/v1/chat/completions",
        &[("authorization", "Bearer keyswap-injected-by-proxy")],
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = send(
        &c,
        port,
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.0-flash:generateContent?alt=sse&key=keyswap-injected-by-proxy",
        &[],
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = send(&c, port, "llm.internal.test", "/generate", &[("x-internal-key", PLACEHOLDER)]).await;
    assert_eq!(st, 200);

    // Smuggling: the agent's own credentials never reach the provider.
    let (st, _) = send(
        &c,
        port,
        "api.anthropic.com",
        "/v1/messages",
        &[
            ("x-api-key", STOLEN),
            ("x-api-key", PLACEHOLDER),
            ("authorization", "Bearer sk-stolen-by-agent-9999"),
            ("proxy-authorization", "Basic c2stc3RvbGVuLWJ5LWFnZW50LTk5OTk="),
            ("x-goog-api-key", STOLEN),
            ("anthropic-api-key", STOLEN),
        ],
    )
    .await;
    assert_eq!(st, 200, "smuggled headers are stripped and the real key still works");
    let (st, _) = send(
        &c,
        port,
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-pro:generateContent?key=sk-stolen-by-agent-9999&alt=json&key=keyswap-injected-by-proxy",
        &[("x-goog-api-key", STOLEN)],
    )
    .await;
    assert_eq!(st, 200);
    // curl, a real client sending mixed-case header names on the wire.
    let curl = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: api.anthropic.com"])
        .args(["-H", "X-Api-Key: sk-stolen-by-agent-9999", "-H", "Authorization: Bearer sk-stolen-by-agent-9999"])
        .args(["-H", "content-type: application/json", "-d", "{}"])
        .arg(format!("http://127.0.0.1:{port}/v1/messages"))
        .output()
        .await
        .expect("curl is installed (apt-get install -y curl)");
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "200");

    // What the provider saw: exactly the real credential, never the placeholder or a stolen one.
    let seen = fake.seen();
    assert_eq!(seen.len(), 8, "{seen:#?}");
    for s in &seen {
        let all = s.everything();
        assert!(!all.contains(PLACEHOLDER), "placeholder reached the provider: {all}");
        assert!(!all.contains(STOLEN) && !all.contains("c2stc3RvbGVu"), "agent credential reached the provider: {all}");
        for h in ["proxy-authorization", "anthropic-api-key", "openai-api-key", "api-key"] {
            assert!(s.header(h).is_empty(), "{h} reached the provider: {all}");
        }
        match s.host.as_str() {
            "api.anthropic.com" => {
                assert_eq!(s.header_str("x-api-key").as_deref(), Some(ANTHROPIC_KEY));
                assert_eq!(s.header_str("authorization"), None);
                assert_eq!(s.header_str("x-goog-api-key"), None);
            }
            "api.openai.com" => {
                assert_eq!(s.header_str("authorization"), Some(format!("Bearer {OPENAI_KEY}")));
                assert_eq!(s.header_str("x-api-key"), None);
            }
            "generativelanguage.googleapis.com" => {
                let params = url_params(s.path_and_query.split_once('?').unwrap().1);
                let keys: Vec<_> = params.iter().filter(|(k, _)| k == "key").map(|(_, v)| v.as_str()).collect();
                assert_eq!(keys, [GEMINI_KEY], "{}", s.path_and_query);
                assert!(params.iter().any(|(k, _)| k == "alt"), "other parameters kept: {}", s.path_and_query);
                assert_eq!(s.header_str("x-goog-api-key"), None);
            }
            "llm.internal.test" => assert_eq!(s.header_str("x-internal-key").as_deref(), Some(CUSTOM_KEY)),
            other => panic!("unexpected host {other}"),
        }
    }

    // Fail closed: unresolvable credentials → 503, unmatched on deny-all → 403; upstream untouched.
    let (st, body) = send(&c, port, "missing-secret.test", "/v1/x", &[("x-api-key", PLACEHOLDER)]).await;
    assert_eq!(st, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["route"], "default/no-secret");
    assert_eq!(body["error"]["policy"], "default/no-secret-key");
    let (st, _) = send(&c, port, "missing-key.test", "/", &[]).await;
    assert_eq!(st, 503);
    let (st, body) = send(&c, port, "exfil.example.com", "/upload", &[("x-api-key", PLACEHOLDER)]).await;
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("egress_denied"), "{body}");
    let (st, _) = send(&c, port, "allowed.example.com", "/", &[("x-agent-own", "fine")]).await;
    assert_eq!(st, 200, "allow-listed host passes untouched");
    assert_eq!(fake.seen().len(), 9, "denied requests never reached the upstream");

    // A malformed gRPC message straight to keyswap (TCP listener) errors that stream only.
    let mut g = grpc::connect(format!("127.0.0.1:{grpc_port}").parse().unwrap()).await;
    let bad = grpc::exchange(&mut g, vec![grpc::body(b"{}")]).await;
    assert!(bad.last().unwrap().is_err());
    let (st, _) = send(&c, port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]).await;
    assert_eq!(st, 200, "still serving after a malformed stream");

    // Graceful stop on SIGTERM, then the sidecar is gone: Envoy fails closed, nothing is forwarded.
    keyswap.assert_running();
    let status = keyswap.terminate();
    assert!(status.success(), "keyswap exit status on SIGTERM: {status}\n{}", keyswap.output());
    let before = fake.seen().len();
    let (st, _) = send(&c, port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]).await;
    assert!(st >= 500, "sidecar down must fail the request, got {st}");
    assert_eq!(fake.seen().len(), before, "sidecar down: the placeholder was forwarded");
    envoy.assert_running();

    // The logs saw every scenario and hold no secret or agent credential.
    let logs = keyswap.output();
    assert!(logs.contains("agent sent credentials of its own"), "smuggling is logged:\n{logs}");
    assert!(logs.contains("fail closed"), "503 is logged:\n{logs}");
    assert!(logs.contains("answering 403"), "403 is logged:\n{logs}");
    assert!(logs.contains("ext_proc protocol error"), "protocol errors are logged:\n{logs}");
    let encoded_gemini = "AIza%2BREAL%2F0003%3Ddo%20not%20leak";
    for secret in [
        ANTHROPIC_KEY,
        OPENAI_KEY,
        GEMINI_KEY,
        encoded_gemini,
        CUSTOM_KEY,
        STOLEN,
        "REAL-000",
        "do-not-leak",
        "do not leak",
    ] {
        assert!(!logs.contains(secret), "keyswap logged a secret fragment `{secret}`:\n{logs}");
    }
}

/// Rotation: edit the Secret file while requests flow; within 1 s every request carries the new
/// key, and not one request fails during the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_secret_file_rotates_the_key_without_failing_a_request() {
    const NEW_KEY: &str = "sk-ant-ROTATED-0005-do-not-leak";
    let config = config_dir();
    let work = tempfile::tempdir().unwrap();
    let fake = FakeProvider::start().await;
    // Like a real provider mid-rotation, both keys are valid; what matters is which one arrives.
    fake.set_accepts(
        "api.anthropic.com",
        vec![Accept::Header("x-api-key", ANTHROPIC_KEY.into()), Accept::Header("x-api-key", NEW_KEY.into())],
    );
    let (keyswap, uds) = start_keyswap(config.path(), work.path(), &[], &[]);
    let (_envoy, port) = start_envoy(work.path(), &uds, fake.addr);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for _ in 0..2 {
        let stop = stop.clone();
        senders.push(tokio::spawn(async move {
            let c = client();
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (st, body) =
                    send(&c, port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]).await;
                statuses.push((st, body));
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let secret_file = config.path().join("anthropic-secret.yaml");
    std::fs::write(&secret_file, secret_manifest("anthropic", "token", NEW_KEY)).unwrap();
    let written = Instant::now();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = Vec::new();
    for s in senders {
        statuses.extend(s.await.unwrap());
    }

    let failed: Vec<_> = statuses.iter().filter(|(st, _)| *st != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during rotation: {:?}",
        failed.len(),
        statuses.len(),
        failed.first()
    );
    let seen = fake.seen();
    let keys: Vec<(Instant, String)> = seen.iter().map(|s| (s.at, s.header_str("x-api-key").unwrap())).collect();
    assert!(keys.iter().any(|(_, k)| k == ANTHROPIC_KEY), "traffic flowed before the edit");
    let last_old = keys.iter().filter(|(_, k)| k == ANTHROPIC_KEY).map(|(t, _)| *t).max().unwrap();
    let first_new = keys.iter().filter(|(_, k)| k == NEW_KEY).map(|(t, _)| *t).min().expect("the new key arrived");
    let switch = last_old.saturating_duration_since(written);
    assert!(switch < Duration::from_secs(1), "old key still used {switch:?} after the write");
    // A request decided on the old snapshot just before the swap can reach the provider a moment
    // after one decided on the new snapshot (two connections race through Envoy); anything
    // later than that in-flight window must carry the new key.
    let in_flight = Duration::from_millis(100);
    let late_old: Vec<_> = keys
        .iter()
        .filter(|(t, k)| *t > first_new + in_flight && k == ANTHROPIC_KEY)
        .map(|(t, _)| *t - first_new)
        .collect();
    assert!(late_old.is_empty(), "keys flip-flopped after the switch: old key {late_old:?} after the first new one");
    assert!(
        keys.iter().filter(|(t, _)| *t > written + Duration::from_secs(1)).count() > 10,
        "traffic continued after the switch"
    );
    eprintln!(
        "rotation: {} requests, old key last seen {:?} after the write, new key first seen {:?} after",
        statuses.len(),
        switch,
        first_new.saturating_duration_since(written)
    );

    // An edit that does not parse keeps the file's last good version serving, and is logged with
    // file and field.
    std::fs::write(
        &secret_file,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: anthropic}\nstringData: {token: [oops]}\n",
    )
    .unwrap();
    // Reported once the file has settled (a file broken under a second ago may still be being
    // written: its last version serves meanwhile).
    let reported = "anthropic-secret.yaml: Secret default/anthropic: field `stringData.token`: must be a string";
    let since = Instant::now();
    while !keyswap.output().contains(reported) {
        assert!(since.elapsed() < Duration::from_secs(4), "bad edit never reported:\n{}", keyswap.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = client();
    let (st, _) = send(&c, port, "api.anthropic.com", "/v1/messages", &[("x-api-key", PLACEHOLDER)]).await;
    assert_eq!(st, 200, "last good snapshot keeps serving after a bad edit");
    assert_eq!(fake.seen().last().unwrap().header_str("x-api-key").as_deref(), Some(NEW_KEY));
    let logs = keyswap.output();
    assert!(
        logs.contains("anthropic-secret.yaml: Secret default/anthropic: field `stringData.token`: must be a string"),
        "bad edit is reported with file, object and field:\n{logs}"
    );
    assert!(logs.contains("secret rotated"), "{logs}");
    for secret in [ANTHROPIC_KEY, NEW_KEY] {
        assert!(!logs.contains(secret), "keyswap logged a secret:\n{logs}");
    }
}
