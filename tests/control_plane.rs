//! keyswap as its Envoy's control plane, through a real Envoy on the ADS bootstrap
//! (`keyswap envoy-config`): routes and hosts follow the manifests without an Envoy restart, the
//! leaf is minted in memory and renewed, either side restarts without serving a stale route.
//! Agents are curl through the CONNECT proxy, trusting only the gateway CA.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const HOSTS: [&str; 2] = ["api.anthropic.com", "api.openai.com"];

fn gateway(proxy_port: u16) -> String {
    format!(
        r#"apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata: {{name: egress}}
spec:
  defaultPolicy: deny-all
  listeners: [{{name: proxy, protocol: CONNECT, port: {proxy_port}}}]
"#
    )
}

/// A route for `provider` with its policy and Secret.
fn route(provider: &str, key: &str) -> String {
    format!(
        r#"apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: {provider}}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: {provider}}}]}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: {provider}}}
spec:
  parentRefs: [{{kind: AIProviderRoute, name: {provider}}}]
  secretRef: {{name: {provider}}}
  target: Header
---
apiVersion: v1
kind: Secret
metadata: {{name: {provider}}}
stringData: {{token: "{key}"}}
"#
    )
}

/// Writes a manifest the way an editor or a ConfigMap update does: whole, then renamed in.
fn write_manifest(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// keyswap serving ext_proc and ADS, Envoy on the ADS bootstrap, and TLS fake providers.
struct Plane {
    work: tempfile::TempDir,
    config: PathBuf,
    keyswap: Option<Proc>,
    keyswap_args: Vec<String>,
    envoy: Option<Proc>,
    bootstrap: PathBuf,
    proxy_port: u16,
    admin_port: u16,
    /// The gateway CA agents trust.
    ca: PathBuf,
    fake: FakeProvider,
}

impl Plane {
    /// Starts the gateway with routes for `providers`, its leaves living `leaf_lifetime`.
    async fn start(providers: &[&str], leaf_lifetime: &str) -> Plane {
        Self::start_with(providers, leaf_lifetime, &[b"h2", b"http/1.1"]).await
    }

    /// [`Plane::start`], the providers offering the protocols `alpn` in their TLS handshakes.
    async fn start_with(providers: &[&str], leaf_lifetime: &str, alpn: &[&[u8]]) -> Plane {
        let work = tempfile::tempdir().unwrap();
        let config = work.path().join("config");
        std::fs::create_dir(&config).unwrap();
        let proxy_port = free_port();
        write_manifest(&config, "gateway.yaml", &gateway(proxy_port));
        for p in providers {
            write_manifest(&config, &format!("{p}.yaml"), &route(p, key_of(p)));
        }
        let (fake, provider_ca) = FakeProvider::start_tls_with(&HOSTS, work.path(), alpn).await;
        // `keyswap certs` creates the gateway CA; keyswap mints the leaves from it.
        let ca_dir = work.path().join("ca");
        let out = keyswap(&["certs", "--config", config.to_str().unwrap(), "--out", ca_dir.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut keyswap_args = vec!["--ca-dir".to_owned(), ca_dir.display().to_string()];
        keyswap_args.extend(["--leaf-lifetime".to_owned(), leaf_lifetime.to_owned()]);
        for h in HOSTS {
            keyswap_args.extend(["--upstream".to_owned(), format!("{h}={},ca={}", fake.addr, provider_ca.display())]);
        }
        let admin_port = free_port();
        let uds = work.path().join("keyswap.sock");
        let bootstrap = ads_bootstrap(&config, &uds, admin_port, &[], work.path());
        let ca = ca_dir.join("ca.crt");
        let mut plane = Plane {
            work,
            config,
            keyswap: None,
            keyswap_args,
            envoy: None,
            bootstrap,
            proxy_port,
            admin_port,
            ca,
            fake,
        };
        plane.start_keyswap();
        plane.start_envoy();
        plane
    }

    fn start_keyswap(&mut self) {
        let args: Vec<&str> = self.keyswap_args.iter().map(String::as_str).collect();
        let (p, _) = start_keyswap(&self.config, self.work.path(), &[], &args);
        self.keyswap = Some(p);
    }

    /// Starts Envoy; returns once its proxy listener (from ADS) accepts connections.
    fn start_envoy(&mut self) -> Instant {
        let mut cmd = Command::new(envoy_bin());
        cmd.arg("-c").arg(&self.bootstrap).args(["--concurrency", "1", "--disable-hot-restart", "-l", "info"]);
        let started = Instant::now();
        let mut p = Proc::spawn("envoy", cmd, self.work.path().join("envoy.log"));
        while std::net::TcpStream::connect(("127.0.0.1", self.proxy_port)).is_err() {
            p.assert_running();
            assert!(started.elapsed() < Duration::from_secs(30), "Envoy got no listener over ADS:\n{}", p.output());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.envoy = Some(p);
        // The port answering is Envoy's own listener, not some other process's server.
        while self.stat("listener_manager.total_listeners_active").unwrap_or(0) == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "Envoy's listener never became active:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            self.stat("listener_manager.lds.update_rejected"),
            Some(0),
            "Envoy refused its listener (port {} taken?):\n{}",
            self.proxy_port,
            self.logs()
        );
        started
    }

    fn call(&self, host: &str) -> (u16, Option<String>, String) {
        call(self.proxy_port, &self.ca, host)
    }

    /// keyswap's /metrics (its admin port is in its log: `--metrics 127.0.0.1:0`).
    async fn keyswap_metrics(&self) -> String {
        let log = self.keyswap.as_ref().unwrap().output();
        let port: u16 = log
            .lines()
            .find(|l| l.contains("admin endpoints"))
            .and_then(|l| l.rsplit_once("127.0.0.1:"))
            .and_then(|(_, p)| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no admin address in keyswap's log:\n{log}"));
        scrape(port, "/metrics").await.1
    }

    fn stat(&self, name: &str) -> Option<u64> {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", &format!("http://127.0.0.1:{}/stats?filter=^{name}$", self.admin_port)])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).and_then(|v| v.trim().parse().ok()))
    }

    fn logs(&self) -> String {
        let k = self.keyswap.as_ref().map(Proc::output).unwrap_or_default();
        let e = self.envoy.as_ref().map(Proc::output).unwrap_or_default();
        format!("keyswap:\n{k}\nenvoy:\n{e}")
    }

    /// The last lines of both logs, for a failure after minutes of traffic.
    fn logs_tail(&self) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        let k = self.keyswap.as_ref().map(Proc::output).unwrap_or_default();
        let e = self.envoy.as_ref().map(Proc::output).unwrap_or_default();
        format!("keyswap (last lines):\n{}\nenvoy (last lines):\n{}", tail(k), tail(e))
    }

    /// Every request the providers saw carried the real key of its host, and nothing else.
    fn assert_only_real_keys(&self) {
        for s in self.fake.seen() {
            let all = s.everything();
            assert!(!all.contains(PLACEHOLDER), "the placeholder reached a provider: {all}");
            let want = key_of(if s.host == "api.openai.com" { "openai" } else { "anthropic" });
            assert!(all.contains(want), "{} got no real key: {all}", s.host);
        }
    }
}

/// curl through the proxy on `proxy_port` to `host` with the placeholder key, trusting only `ca`:
/// the HTTP status (0 when curl failed: a refused CONNECT, a TLS failure) and the serial of the
/// leaf Envoy presented.
fn call(proxy_port: u16, ca: &Path, host: &str) -> (u16, Option<String>, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}\n%{certs}"])
        .args(["--proxy", &format!("http://127.0.0.1:{proxy_port}"), "--cacert"])
        .arg(ca)
        .args(["-H", &format!("x-api-key: {PLACEHOLDER}"), "-H", &format!("authorization: Bearer {PLACEHOLDER}")])
        .args(["-d", "{}", &format!("https://{host}/v1/messages")])
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .output()
        .expect("curl is installed (apt-get install -y curl)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let code = stdout.lines().next().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    let serial = stdout
        .lines()
        .find(|l| l.starts_with("Serial Number:"))
        .map(|l| l.trim_start_matches("Serial Number:").trim().to_owned());
    (code, serial, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn key_of(provider: &str) -> &'static str {
    match provider {
        "openai" => OPENAI_KEY,
        _ => ANTHROPIC_KEY,
    }
}

/// `keyswap envoy-config` (the ADS bootstrap) for the gateway in `config`, written to
/// `work/envoy.yaml`.
fn ads_bootstrap(config: &Path, uds: &Path, admin_port: u16, extra: &[&str], work: &Path) -> PathBuf {
    let admin = admin_port.to_string();
    let mut args = vec!["envoy-config", "--config", config.to_str().unwrap(), "--uds", uds.to_str().unwrap()];
    args.extend(["--admin-port", &admin]);
    args.extend(extra);
    let out = keyswap(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = work.join("envoy.yaml");
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

fn keyswap(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keyswap")).args(args).output().unwrap()
}

/// Calls `host` back to back from a thread until stopped: (calls, failures, serials seen).
struct Traffic {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    serials: Arc<std::sync::Mutex<BTreeSet<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(plane: &Arc<Plane>, host: &'static str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let serials = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
        let (p, s, c, f, se) = (plane.clone(), stop.clone(), calls.clone(), failures.clone(), serials.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (code, serial, err) = p.call(host);
                c.fetch_add(1, Ordering::Relaxed);
                if code != 200 {
                    f.lock().unwrap().push(format!("{host}: {code} {err}"));
                }
                se.lock().unwrap().extend(serial);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Traffic { stop, calls, failures, serials, thread: Some(thread) }
    }

    /// Stops; returns (calls, failures, distinct leaf serials).
    fn finish(mut self) -> (usize, Vec<String>, BTreeSet<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let f = self.failures.lock().unwrap().clone();
        let s = self.serials.lock().unwrap().clone();
        (self.calls.load(Ordering::Relaxed), f, s)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_for_a_new_host_is_injected_within_a_second_without_restarting_envoy() {
    let plane = Arc::new(Plane::start(&["anthropic"], "24h").await);
    assert_eq!(plane.call("api.anthropic.com").0, 200, "{}", plane.logs());
    assert_eq!(plane.call("api.openai.com").0, 0, "no route yet: the CONNECT is refused");
    let envoy_pid = plane.envoy.as_ref().unwrap().child.id();
    let modified = plane.stat("listener_manager.listener_modified").expect("Envoy admin stats");
    // A connection opened before the change, reused after it.
    let held = held_connection(&plane).await;

    let traffic = Traffic::start(&plane, "api.anthropic.com");
    std::thread::sleep(Duration::from_millis(500));
    write_manifest(&plane.config, "openai.yaml", &route("openai", OPENAI_KEY));
    let changed = Instant::now();
    let took = loop {
        let (code, _, err) = plane.call("api.openai.com");
        if code == 200 {
            break changed.elapsed();
        }
        assert!(changed.elapsed() < Duration::from_secs(10), "never routed ({code} {err}):\n{}", plane.logs());
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(500));
    let (calls, failures, _) = traffic.finish();
    eprintln!(
        "the new host was injected {took:?} after the manifest changed ({calls} calls to the other host meanwhile)"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(failures.is_empty(), "requests to the other host failed during the change: {failures:?}");
    assert!(calls > 5, "too little traffic to tell: {calls}");
    assert_eq!(held.reuse().await, 200, "the connection opened before the change was dropped");
    assert_eq!(plane.envoy.as_ref().unwrap().child.id(), envoy_pid);
    assert_eq!(plane.stat("listener_manager.listener_modified"), Some(modified), "a listener changed");
    assert_eq!(plane.stat("listener_manager.lds.update_rejected"), Some(0));
    assert_eq!(plane.stat("cluster_manager.cds.update_rejected"), Some(0));
    plane.assert_only_real_keys();
}

/// Envoy speaks HTTP/2 to a provider whose TLS handshake offers it (an answer then reaches
/// keyswap as one body message, and agents share the connection) and HTTP/1.1 to one that does
/// not; either way the provider gets the real key and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_get_http2_when_their_handshake_offers_it_and_http1_otherwise() {
    for (alpn, h2) in [(&[b"h2".as_slice(), b"http/1.1"][..], true), (&[b"http/1.1".as_slice()][..], false)] {
        let plane = Plane::start_with(&["anthropic"], "24h", alpn).await;
        for _ in 0..3 {
            let (code, _, err) = plane.call("api.anthropic.com");
            assert_eq!(code, 200, "{err}\n{}", plane.logs());
        }
        let cluster = "cluster.provider_api_anthropic_com";
        let http2 = plane.stat(&format!("{cluster}.upstream_cx_http2_total")).unwrap_or(0);
        let http1 = plane.stat(&format!("{cluster}.upstream_cx_http1_total")).unwrap_or(0);
        assert_eq!(
            (http2 > 0, http1 > 0),
            (h2, !h2),
            "offering {alpn:?}: {http2} HTTP/2, {http1} HTTP/1.1 connections"
        );
        assert_eq!(plane.fake.h2_connections.load(Ordering::Relaxed) > 0, h2);
        assert_eq!(plane.fake.seen().len(), 3);
        plane.assert_only_real_keys();
    }
}

/// A hostile agent speaking HTTP/1.1 sends what has no place on the HTTP/2 connection its
/// requests share with other agents' at the provider: connection-specific headers (one nominating
/// the credential header as hop-by-hop), `te` other than trailers, an h2c upgrade, chunked
/// framing. None of it reaches the provider, the connection keeps serving the next agent, and
/// the provider only ever sees the real key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_only_headers_from_an_agent_never_reach_or_break_the_shared_http2_provider_connection() {
    let plane = Plane::start(&["anthropic"], "24h").await;
    let attacks: &[&[&str]] = &[
        &["connection: keep-alive, x-api-key", "keep-alive: timeout=5"],
        &["proxy-connection: keep-alive"],
        &["te: gzip"],
        &["upgrade: h2c", "connection: Upgrade, HTTP2-Settings", "http2-settings: AAMAAABkAAQAAP__"],
        &["transfer-encoding: chunked"],
    ];
    for headers in attacks {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--http1.1", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["--proxy", &format!("http://127.0.0.1:{}", plane.proxy_port), "--cacert"])
            .arg(&plane.ca)
            .args(["-H", &format!("x-api-key: {PLACEHOLDER}")]);
        for h in *headers {
            cmd.args(["-H", h]);
        }
        let out = cmd.args(["-d", "{}", "https://api.anthropic.com/v1/messages"]).output().unwrap();
        let code: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
        // Answered (or refused by Envoy as malformed), never a broken upstream stream.
        assert!(code == 200 || (400..500).contains(&code), "{headers:?}: {code}\n{}", plane.logs());
        // The next agent on the same provider connection is served.
        let (next, _, err) = plane.call("api.anthropic.com");
        assert_eq!(next, 200, "after {headers:?}: {err}\n{}", plane.logs());
    }
    let cluster = "cluster.provider_api_anthropic_com";
    assert!(plane.stat(&format!("{cluster}.upstream_cx_http2_total")).unwrap_or(0) > 0, "not over HTTP/2");
    for seen in plane.fake.seen() {
        for name in ["connection", "keep-alive", "proxy-connection", "upgrade", "http2-settings", "transfer-encoding"] {
            assert!(seen.header(name).is_empty(), "{name} reached the provider: {:?}", seen.headers);
        }
        assert!(seen.header("te").iter().all(|v| v.eq_ignore_ascii_case(b"trailers")), "{:?}", seen.headers);
    }
    plane.assert_only_real_keys();
}

/// Edits that cannot become Envoy resources (a listener mode not built, a manifest that does not
/// parse) are refused, leaving keyswap and Envoy on the last good ones; the next good edit goes
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_edit_leaves_the_last_good_resources_in_envoy() {
    let plane = Plane::start(&["anthropic", "openai"], "24h").await;
    let both_served = |what: &str| {
        for host in HOSTS {
            let (code, _, err) = plane.call(host);
            assert_eq!(code, 200, "{what}: {host}: {err}\n{}", plane.logs());
        }
    };
    both_served("before");
    let listeners = plane.stat("listener_manager.total_listeners_active");
    let good = gateway(plane.proxy_port);
    let passthrough = good.replace(
        "listeners: [",
        &format!("listeners: [{{name: tls, protocol: HTTPS, port: {}, tls: {{mode: Passthrough}}}}, ", free_port()),
    );
    for (what, text) in
        [("a listener mode Envoy resources cannot express", passthrough.as_str()), ("broken YAML", "spec: [")]
    {
        write_manifest(&plane.config, "gateway.yaml", text);
        std::thread::sleep(Duration::from_millis(1000));
        both_served(what);
        assert_eq!(plane.stat("listener_manager.total_listeners_active"), listeners, "{what}");
    }
    let logs = plane.logs();
    // Refused as configuration, keyswap and Envoy alike: never served by one and not the other.
    assert!(logs.contains("Passthrough is not supported"), "{logs}");
    assert!(!logs.contains("cannot generate Envoy's resources"), "{logs}");
    assert_eq!(plane.stat("listener_manager.lds.update_rejected"), Some(0));
    // Back to a good gateway, without the openai route: in effect within a second.
    write_manifest(&plane.config, "gateway.yaml", &good);
    std::fs::remove_file(plane.config.join("openai.yaml")).unwrap();
    let changed = Instant::now();
    while plane.call("api.openai.com").0 == 200 {
        assert!(changed.elapsed() < Duration::from_secs(1), "the good edit never reached Envoy:\n{}", plane.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(plane.call("api.anthropic.com").0, 200);
    plane.assert_only_real_keys();
}

/// One agent connection through the proxy (CONNECT, TLS with the gateway CA), kept open.
struct Held {
    send: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
}

impl Held {
    async fn reuse(mut self) -> u16 {
        let req = hyper::Request::post("/v1/messages")
            .header("host", "api.anthropic.com")
            .header("x-api-key", PLACEHOLDER)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), self.send.send_request(req)).await;
        resp.expect("timed out").expect("the held connection failed").status().as_u16()
    }
}

async fn held_connection(plane: &Plane) -> Held {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", plane.proxy_port)).await.unwrap();
    tcp.write_all(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&plane.ca).unwrap();
    use rustls::pki_types::pem::PemObject as _;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("api.anthropic.com".try_into().unwrap(), tcp)
        .await
        .expect("TLS through the proxy");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/v1/messages")
        .header("host", "api.anthropic.com")
        .header("x-api-key", PLACEHOLDER)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);
    Held { send }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_leaf_is_renewed_under_two_minutes_of_traffic_without_a_failure() {
    let plane = Arc::new(Plane::start(&["anthropic"], "30s").await);
    let traffic = Traffic::start(&plane, "api.anthropic.com");
    std::thread::sleep(Duration::from_secs(120));
    let (calls, failures, serials) = traffic.finish();
    eprintln!("{calls} calls in 2 minutes, leaf serials seen: {serials:?}");
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        plane.logs_tail()
    );
    assert!(serials.len() >= 3, "only {} leaf serials in 2 minutes: {serials:?}", serials.len());
    assert!(calls > 100, "{calls} calls");
    let logs = plane.logs();
    assert!(logs.matches("reason=\"renewal\"").count() >= 2, "{logs}");
    assert_eq!(plane.stat("listener_manager.listener_modified"), Some(0), "a renewal touched a listener");
    // keyswap's /metrics tell the same story.
    let m = plane.keyswap_metrics().await;
    assert!(metric(&m, "keyswap_leaf_mints_total") >= serials.len() as f64, "{m}");
    assert_eq!(metric(&m, "keyswap_envoy_ads_streams"), 1.0, "{m}");
    assert_eq!(metric(&m, "keyswap_envoy_ads_rejected_total"), 0.0, "{m}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let not_after = metric(&m, "keyswap_leaf_not_after_seconds");
    assert!(not_after > now && not_after <= now + 31.0, "leaf not after {not_after}, now {now}");
    plane.assert_only_real_keys();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_restarted_gets_the_current_resources_within_two_seconds() {
    let mut plane = Plane::start(&["anthropic"], "24h").await;
    assert_eq!(plane.call("api.anthropic.com").0, 200, "{}", plane.logs());
    plane.envoy.as_mut().unwrap().child.kill().unwrap();
    plane.envoy.as_mut().unwrap().child.wait().unwrap();
    // A route added while Envoy is down is there when it comes back.
    write_manifest(&plane.config, "openai.yaml", &route("openai", OPENAI_KEY));
    std::thread::sleep(Duration::from_millis(500));
    let started = plane.start_envoy();
    let serving = loop {
        if plane.call("api.openai.com").0 == 200 && plane.call("api.anthropic.com").0 == 200 {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "not serving:\n{}", plane.logs());
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("Envoy restarted: serving both hosts {serving:?} after its start");
    assert!(serving < Duration::from_secs(2), "{serving:?}");
    plane.assert_only_real_keys();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyswap_restarted_fails_closed_meanwhile_and_envoy_never_serves_a_stale_route() {
    let mut plane = Plane::start(&["anthropic", "openai"], "24h").await;
    assert_eq!(plane.call("api.openai.com").0, 200, "{}", plane.logs());
    let k = plane.keyswap.as_mut().unwrap();
    k.child.kill().unwrap();
    k.child.wait().unwrap();
    let seen = plane.fake.seen().len();
    // Envoy keeps its resources; without keyswap every request fails closed.
    for host in HOSTS {
        let (code, _, _) = plane.call(host);
        assert!(code >= 500 || code == 0, "{host} answered {code} without keyswap");
    }
    assert_eq!(plane.fake.seen().len(), seen, "a request reached a provider while keyswap was down");
    // Meanwhile the openai route is removed: once keyswap is back it is never served again.
    std::fs::remove_file(plane.config.join("openai.yaml")).unwrap();
    let started = Instant::now();
    plane.start_keyswap();
    let back = loop {
        if plane.call("api.anthropic.com").0 == 200 {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "not back:\n{}", plane.logs());
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("keyswap restarted: requests work {back:?} after its start");
    assert!(back < Duration::from_secs(1), "{back:?}");
    let removed_at = Instant::now();
    while removed_at.elapsed() < Duration::from_secs(2) {
        let (code, _, _) = plane.call("api.openai.com");
        assert_ne!(code, 200, "the removed route was served after keyswap came back");
    }
    assert!(
        plane.fake.seen().iter().all(|s| s.host != "api.openai.com" || s.at < started),
        "the removed host got a request after keyswap came back"
    );
    plane.assert_only_real_keys();
}

/// Every example configuration's resources, served over ADS, are accepted by Envoy: nothing
/// rejected, every listener active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_accepts_the_ads_resources_of_every_example_configuration() {
    let examples = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/examples"));
    let variants = tempfile::tempdir().unwrap();
    let mut dirs = vec![(examples.to_path_buf(), None), (examples.join("echo-bot"), Some("keyswap-system/egress"))];
    // Both policies with an allow list, a redirected TLS listener and wildcard hosts.
    for (name, policy) in [("deny", "deny-all"), ("allow", "allow-all")] {
        let d = variants.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let port = free_port();
        let tls_port = free_port();
        let text = format!(
            "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  defaultPolicy: {policy}\n  allow: [\"pypi.org\", \"*.github.com\"]\n  listeners: [{{name: proxy, protocol: CONNECT, port: {port}}}, {{name: tls, protocol: HTTPS, port: {tls_port}, tls: {{mode: Terminate}}}}]\n---\napiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: clouds}}\nspec:\n  parentRefs: [{{name: egress}}]\n  rules: [{{matches: [{{provider: azure-openai}}, {{provider: bedrock}}, {{provider: anthropic}}]}}]\n"
        );
        std::fs::write(d.join("gateway.yaml"), text).unwrap();
        dirs.push((d, None));
    }
    for (dir, gw) in dirs {
        let work = tempfile::tempdir().unwrap();
        let ca_dir = work.path().join("ca");
        let mut args = vec!["certs", "--config", dir.to_str().unwrap(), "--out", ca_dir.to_str().unwrap()];
        args.extend(gw.iter().flat_map(|g| ["--gateway", *g]));
        let out = keyswap(&args);
        assert!(out.status.success(), "{}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
        let gw_args: Vec<&str> = gw.iter().flat_map(|g| ["--gateway", *g]).collect();
        let mut serve_args = vec!["--ca-dir", ca_dir.to_str().unwrap()];
        serve_args.extend(&gw_args);
        let (_keyswap, uds) = start_keyswap(&dir, work.path(), &[], &serve_args);
        let admin_port = free_port();
        let bootstrap = ads_bootstrap(&dir, &uds, admin_port, &gw_args, work.path());
        let mut cmd = Command::new(envoy_bin());
        cmd.arg("-c").arg(&bootstrap).args(["--concurrency", "1", "--disable-hot-restart", "-l", "info"]);
        let envoy = Proc::spawn("envoy", cmd, work.path().join("envoy.log"));
        let stats = || {
            let out = Command::new("curl")
                .args(["-s", "--max-time", "5", &format!("http://127.0.0.1:{admin_port}/stats")])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let stat = |text: &str, name: &str| {
            text.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).and_then(|v| v.trim().parse::<u64>().ok()))
        };
        let started = Instant::now();
        let text = loop {
            let text = stats();
            // Every resource type taken (routes and the leaf can follow the listeners' activation).
            let done = [
                "listener_manager.lds.update_success",
                "cluster_manager.cds.update_success",
                "http.tls.rds.providers.update_success",
                "sds.keyswap_leaf.update_success",
            ]
            .iter()
            .all(|s| stat(&text, s).unwrap_or(0) > 0)
                && stat(&text, "listener_manager.total_listeners_warming") == Some(0)
                && stat(&text, "listener_manager.total_listeners_active").unwrap_or(0) > 0;
            if done {
                break text;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{}: Envoy never took the resources:\n{text}\n{}",
                dir.display(),
                envoy.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let rejected: Vec<&str> =
            text.lines().filter(|l| l.contains("update_rejected") && !l.ends_with(": 0")).collect();
        assert!(rejected.is_empty(), "{}: Envoy rejected resources: {rejected:?}\n{}", dir.display(), envoy.output());
    }
}

/// `serve --kubernetes --ca-secret`: the CA comes from a kubernetes.io/tls Secret (as cert-manager
/// writes it); rotating the Secret re-mints the leaf, signed by the new CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_ca_secret_signs_the_leaf_and_rotating_it_re_mints() {
    use common::kubeapi::FakeKube;
    use serde_json::json;
    const NS: &str = "keyswap-system";
    let work = tempfile::tempdir().unwrap();
    let proxy_port = free_port();
    // Two CAs, made by `keyswap certs` from a directory holding the gateway.
    let config = work.path().join("config");
    std::fs::create_dir(&config).unwrap();
    let gw = gateway(proxy_port)
        .replace("metadata: {name: egress}", &format!("metadata: {{name: egress, namespace: {NS}}}"));
    std::fs::write(config.join("gateway.yaml"), &gw).unwrap();
    let cas: Vec<PathBuf> = ["ca1", "ca2"]
        .iter()
        .map(|d| {
            let dir = work.path().join(d);
            let out = keyswap(&["certs", "--config", config.to_str().unwrap(), "--out", dir.to_str().unwrap()]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            dir
        })
        .collect();
    let tls_secret = |dir: &Path| {
        let f = |n: &str| b64(&std::fs::read(dir.join(n)).unwrap());
        json!({"type": "kubernetes.io/tls", "data": {"tls.crt": f("ca.crt"), "tls.key": f("ca.key")}})
    };

    let kube = FakeKube::start().await;
    kube.put(
        "egressgateways",
        NS,
        "egress",
        json!({"spec": {"defaultPolicy": "deny-all", "listeners": [{"name": "proxy", "protocol": "CONNECT", "port": proxy_port}]}}),
    );
    kube.put(
        "aiproviderroutes",
        NS,
        "anthropic",
        json!({"spec": {"parentRefs": [{"name": "egress"}], "rules": [{"matches": [{"provider": "anthropic"}]}]}}),
    );
    kube.put("credentialinjectionpolicies", NS, "anthropic", json!({"spec": {"parentRefs": [{"kind": "AIProviderRoute", "name": "anthropic"}], "secretRef": {"name": "anthropic"}, "target": "Header"}}));
    kube.put("secrets", NS, "anthropic", json!({"data": {"token": b64(ANTHROPIC_KEY.as_bytes())}}));

    let (fake, provider_ca) = FakeProvider::start_tls(&HOSTS, work.path()).await;
    let uds = work.path().join("keyswap.sock");
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyswap"));
    cmd.args(["serve", "--kubernetes", "--namespace", NS, "--metrics", &metrics, "--ca-secret", "egress-ca"])
        .arg("--uds")
        .arg(&uds)
        .arg("--upstream")
        .arg(format!("api.anthropic.com={},ca={}", fake.addr, provider_ca.display()))
        .env("KUBECONFIG", kube.kubeconfig(work.path()))
        .env("RUST_LOG", "debug");
    let mut keyswap_proc = Proc::spawn("keyswap", cmd, work.path().join("keyswap.log"));
    let bootstrap = ads_bootstrap(&config, &uds, 0, &[], work.path());
    let mut cmd = Command::new(envoy_bin());
    cmd.arg("-c").arg(&bootstrap).args(["--concurrency", "1", "--disable-hot-restart"]);
    let envoy = Proc::spawn("envoy", cmd, work.path().join("envoy.log"));
    let (klog, elog) = (keyswap_proc.log.clone(), envoy.log.clone());
    let logs = || {
        let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        format!("keyswap:\n{}\nenvoy:\n{}", read(&klog), read(&elog))
    };

    // Synced, but no CA Secret yet: not ready (a rollout must not replace working pods with one
    // that serves routed hosts no certificate), and /readyz says what it waits for.
    let since = Instant::now();
    let waiting = loop {
        keyswap_proc.assert_running();
        assert!(since.elapsed() < Duration::from_secs(30), "/readyz never answered:\n{}", logs());
        match try_scrape(metrics_port, "/readyz").await {
            Some((st, text)) if text.contains("synced with the Kubernetes API") => break (st, text),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(waiting.0, 503, "ready without a CA: {}", waiting.1);
    assert!(waiting.1.contains("waiting for the gateway CA"), "{}", waiting.1);
    kube.put("secrets", NS, "egress-ca", tls_secret(&cas[0]));
    let since = Instant::now();
    while scrape(metrics_port, "/readyz").await.0 != 200 {
        assert!(since.elapsed() < Duration::from_secs(10), "not ready once the CA came:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (ca1, ca2) = (cas[0].join("ca.crt"), cas[1].join("ca.crt"));
    let since = Instant::now();
    while call(proxy_port, &ca1, "api.anthropic.com").0 != 200 {
        keyswap_proc.assert_running();
        assert!(since.elapsed() < Duration::from_secs(30), "never served with the Secret's CA:\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(call(proxy_port, &ca2, "api.anthropic.com").0, 0, "the leaf chains to the other CA");

    kube.put("secrets", NS, "egress-ca", tls_secret(&cas[1]));
    let rotated = Instant::now();
    while call(proxy_port, &ca2, "api.anthropic.com").0 != 200 {
        assert!(rotated.elapsed() < Duration::from_secs(10), "the rotated CA never signed the leaf:\n{}", logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("CA Secret rotated: the leaf signed by the new CA served {:?} later", rotated.elapsed());
    assert_eq!(call(proxy_port, &ca1, "api.anthropic.com").0, 0, "the old CA still verifies the leaf");

    // A broken CA Secret keeps the current CA (and says why, without the key).
    kube.put(
        "secrets",
        NS,
        "egress-ca",
        json!({"type": "kubernetes.io/tls", "data": {"tls.crt": b64(b"junk"), "tls.key": b64(b"junk")}}),
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(call(proxy_port, &ca2, "api.anthropic.com").0, 200, "{}", logs());
    let out = keyswap_proc.output();
    assert!(out.contains("cannot use the gateway CA Secret"), "{out}");
    for dir in &cas {
        let key = std::fs::read_to_string(dir.join("ca.key")).unwrap();
        for line in key.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!out.contains(line), "CA key material in keyswap's log");
        }
    }
    // SIGTERM with Envoy still connected: the ADS stream is closed at once, not drained for
    // the 10 s the server gives in-flight requests.
    let stopping = Instant::now();
    assert!(keyswap_proc.terminate().success());
    assert!(stopping.elapsed() < Duration::from_secs(5), "keyswap took {:?} to stop", stopping.elapsed());
}
