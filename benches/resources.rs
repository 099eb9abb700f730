//! Memory and rotation, measured on the release binary:
//!
//! ```sh
//! cargo bench --bench resources                       # RESOURCES_SOAK_SECONDS=600 by default
//! RESOURCES_SOAK_SECONDS=60 cargo bench --bench resources
//! ```
//!
//! 1. RSS of `keyswap serve` idle (after start and 100 requests);
//! 2. RSS with 2,000 concurrent ext_proc streams open (10 HTTP/2 connections × 200 streams, each
//!    past its request-headers answer and waiting, as Envoy holds streams for in-flight requests);
//! 3. rotation latency in file mode: the Secret file is rewritten, and a client polls every 2 ms
//!    until the injected value changes (30 rotations; distribution);
//! 4. the same in Kubernetes mode against the fake API server of the tests (a Secret MODIFIED
//!    event);
//! 5. a soak: 8 clients sending requests back to back for `RESOURCES_SOAK_SECONDS`, RSS sampled
//!    every 10 s; growth between the first and last minute is reported.
//!
//! Run without `--bench` (as `cargo test --all-targets` does), it prints "skipped" and exits.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::grpc;
use common::kubeapi::FakeKube;
use common::*;
use serde_json::json;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

async fn connect(port: u16) -> grpc::Client {
    grpc::connect(format!("127.0.0.1:{port}").parse().unwrap()).await
}

/// Time from the change to the first request that carries `want`, polling every 2 ms.
async fn until(c: &mut grpc::Client, want: &str, since: Instant) -> Duration {
    loop {
        if grpc::anthropic_key(c).await.ok().as_deref() == Some(want) {
            return since.elapsed();
        }
        assert!(since.elapsed() < Duration::from_secs(10), "{want} never arrived");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn distribution(name: &str, mut d: Vec<Duration>) {
    d.sort();
    let ms = |x: Duration| x.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(d[((d.len() - 1) as f64 * q).round() as usize]);
    println!(
        "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
        d.len(),
        ms(d[0]),
        at(0.5),
        at(0.9),
        at(0.99),
        ms(*d.last().unwrap())
    );
}

/// Opens `n` streams on `c`, each sent its request headers and answered, and kept open.
async fn hold_streams(
    mut c: grpc::Client,
    n: usize,
) -> Vec<(
    tokio::sync::mpsc::Sender<envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest>,
    tonic::Streaming<envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse>,
)> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.send(grpc::headers(&[
            (":method", "POST"),
            (":authority", "api.anthropic.com"),
            (":path", "/v1/messages"),
            ("x-api-key", PLACEHOLDER),
        ]))
        .await
        .unwrap();
        let mut resp = c.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("stream").into_inner();
        let first = resp.message().await.expect("answer").expect("one answer");
        assert!(first.response.is_some());
        held.push((tx, resp));
    }
    held
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("resources: skipped (run it with `cargo bench --bench resources`)");
        return;
    }
    let soak_s: u64 = std::env::var("RESOURCES_SOAK_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    println!("keyswap resources: {}", env!("CARGO_BIN_EXE_keyswap"));

    // --- file mode: idle, 2,000 streams, rotation, soak
    let dir = config_dir();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (keyswap, _uds) = tokio::task::block_in_place(|| {
        start_keyswap(dir.path(), work.path(), &[("RUST_LOG", "warn")], &["--listen", &listen])
    });
    let pid = keyswap.child.id();
    let mut c = connect(port).await;
    for _ in 0..100 {
        assert_eq!(grpc::anthropic_key(&mut c).await.ok().as_deref(), Some(ANTHROPIC_KEY));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kib(pid);

    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(tokio::spawn(hold_streams(connect(port).await, 200)));
    }
    let mut held = Vec::new();
    for h in conns {
        held.extend(h.await.unwrap());
    }
    assert_eq!(held.len(), 2000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = rss_kib(pid);
    drop(held);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    println!();
    println!("| keyswap serve (file mode, tracing off) | RSS |");
    println!("|---|---:|");
    println!("| idle, after start and 100 requests | {} |", mib(idle));
    println!("| 2,000 concurrent streams open | {} |", mib(busy));
    println!("| after they closed | {} |", mib(after));

    let mut file_times = Vec::new();
    for i in 0..30 {
        let value = format!("sk-ant-rotated-{i:03}");
        let path = dir.path().join("anthropic-secret.yaml");
        std::fs::write(&path, secret_manifest("anthropic", "token", &value)).unwrap();
        let t = until(&mut c, &value, Instant::now()).await;
        file_times.push(t);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // --- Kubernetes mode rotation
    let kube = FakeKube::start().await;
    kube.put("egressgateways", "default", "egress", json!({"spec": {"defaultPolicy": "deny-all"}}));
    kube.put(
        "aiproviderroutes",
        "default",
        "anthropic",
        json!({"spec": {"parentRefs": [{"name": "egress"}], "rules": [{"matches": [{"provider": "anthropic"}]}]}}),
    );
    kube.put("credentialinjectionpolicies", "default", "anthropic-key", json!({"spec": {"parentRefs": [{"kind": "AIProviderRoute", "name": "anthropic"}], "secretRef": {"name": "anthropic"}, "target": "Header"}}));
    kube.put("secrets", "default", "anthropic", json!({"stringData": {"token": "sk-ant-k8s-000"}}));
    let kwork = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig(kwork.path());
    let kport = free_port();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keyswap"));
    cmd.args(["serve", "--kubernetes", "--namespace", "default", "--listen", &format!("127.0.0.1:{kport}")])
        .args(["--metrics", "127.0.0.1:0"])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn");
    let mut kproc = Proc::spawn("keyswap --kubernetes", cmd, kwork.path().join("keyswap.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut kc = loop {
        kproc.assert_running();
        if let Ok(Ok(mut c)) = tokio::time::timeout(
            Duration::from_secs(2),
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{kport}")).unwrap().connect(),
        )
        .await
        .map(|r| {
            r.map(
                envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new,
            )
        }) {
            if grpc::anthropic_key(&mut c).await.ok().as_deref() == Some("sk-ant-k8s-000") {
                break c;
            }
        }
        assert!(Instant::now() < deadline, "Kubernetes mode never served:\n{}", kproc.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut kube_times = Vec::new();
    for i in 1..=30 {
        let value = format!("sk-ant-k8s-{i:03}");
        kube.put("secrets", "default", "anthropic", json!({"stringData": {"token": value}}));
        kube_times.push(until(&mut kc, &value, Instant::now()).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(kproc);
    println!();
    println!("Rotation: time from the change to the first request carrying the new value (ms)");
    println!();
    println!("| mode | rotations | min | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    distribution("file (Secret manifest rewritten)", file_times);
    distribution("Kubernetes (Secret MODIFIED watch event)", kube_times);

    // --- soak
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, done) = (stop.clone(), done.clone());
        let mut c = connect(port).await;
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let msgs = vec![
                    grpc::headers(&[
                        (":method", "POST"),
                        (":authority", "api.anthropic.com"),
                        (":path", "/v1/messages"),
                        ("x-api-key", PLACEHOLDER),
                    ]),
                    grpc::response_headers(&[(":status", "200"), ("content-type", "application/json")]),
                ];
                let answers = grpc::exchange(&mut c, msgs).await;
                assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    println!();
    println!("Soak: 8 clients, {soak_s} s, RSS every 10 s");
    println!();
    println!("| t (s) | requests so far | RSS |");
    println!("|---:|---:|---:|");
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(soak_s) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let r = rss_kib(pid);
        samples.push(r);
        println!("| {} | {} | {} |", start.elapsed().as_secs(), done.load(Ordering::Relaxed), mib(r));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let n = samples.len();
    if n >= 12 {
        let first = samples[..6].iter().sum::<u64>() / 6;
        let last = samples[n - 6..].iter().sum::<u64>() / 6;
        println!();
        println!(
            "soak: first minute {} average, last minute {} average ({:+.1} %), max {}",
            mib(first),
            mib(last),
            (last as f64 / first as f64 - 1.0) * 100.0,
            mib(*samples.iter().max().unwrap())
        );
    }
    drop(keyswap);
}
