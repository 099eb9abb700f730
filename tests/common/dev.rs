//! `keyswap dev` as a process (Envoy + keyswap, generated config), driven like an agent would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{envoy_bin, Proc, ANTHROPIC_KEY};

/// `keyswap dev` as a process, and the environment it printed for agents.
pub struct Dev {
    pub proc: Proc,
    pub env: HashMap<String, String>,
    pub work: PathBuf,
}

/// keyswap's admin address (`/metrics`), from its log line.
#[allow(dead_code)]
pub fn metrics_port(dev: &Dev) -> u16 {
    let log = dev.proc.output();
    let line = log.lines().find(|l| l.contains("admin endpoints")).expect("admin log line");
    let addr = line.rsplit("address=").next().unwrap().trim();
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

pub fn start_dev(config: &Path, work: &Path, upstreams: &[String]) -> Dev {
    start_dev_env(config, work, upstreams, &[])
}

/// [`start_dev`] with extra environment (OTLP settings, say).
pub fn start_dev_env(config: &Path, work: &Path, upstreams: &[String], env: &[(&str, &str)]) -> Dev {
    start_dev_with(config, work, upstreams, env, &["dev"])
}

/// [`start_dev_env`] with extra `keyswap dev` arguments.
pub fn start_dev_with(config: &Path, work: &Path, upstreams: &[String], env: &[(&str, &str)], args: &[&str]) -> Dev {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyswap"));
    cmd.args(args);
    cmd.arg("--config").arg(config).arg("--work").arg(work).args(["--metrics", "127.0.0.1:0"]);
    for u in upstreams {
        cmd.arg("--upstream").arg(u);
    }
    cmd.env("RUST_LOG", "debug").env("ENVOY_BIN", envoy_bin()).envs(env.iter().copied());
    let out = work.join("dev.stdout");
    let err = std::fs::File::create(work.join("dev.stderr")).unwrap();
    cmd.stdout(std::fs::File::create(&out).unwrap()).stderr(err);
    let child = super::own_group(&mut cmd).spawn().unwrap();
    let mut proc = Proc { name: "keyswap dev", child, log: work.join("dev.stderr") };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("export AWS_CA_BUNDLE=") {
            let env = text
                .lines()
                .filter_map(|l| l.strip_prefix("export "))
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            return Dev { proc, env, work: work.to_path_buf() };
        }
        proc.assert_running();
        assert!(Instant::now() < deadline, "keyswap dev printed no environment in 60 s:\n{}", proc.output());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs curl through the gateway the way an agent would (proxy + gateway CA only).
pub fn curl(dev: &Dev, args: &[&str]) -> (i32, String, String) {
    curl_via(&dev.env, args)
}

/// [`curl`] through the gateway `env` names (`HTTPS_PROXY`, `NODE_EXTRA_CA_CERTS`): for a thread
/// that must not keep the gateway's processes alive (a `Dev` is stopped when dropped).
pub fn curl_via(env: &HashMap<String, String>, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--proxy", &env["HTTPS_PROXY"], "--cacert", &env["NODE_EXTRA_CA_CERTS"]])
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .expect("curl is installed (apt-get install -y curl)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A deny-all or allow-all gateway with one CONNECT listener, anthropic and openai routes and
/// one key for both (`ANTHROPIC_KEY`).
pub fn gateway_config(policy: &str, proxy_port: u16, allow: &str) -> String {
    format!(
        r#"apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata: {{name: egress}}
spec:
  defaultPolicy: {policy}
  listeners: [{{name: proxy, protocol: CONNECT, port: {proxy_port}}}]
  allow: [{allow}]
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: providers}}
spec:
  parentRefs: [{{name: egress}}]
  rules:
  - matches: [{{provider: anthropic}}, {{provider: openai}}]
{keys}"#,
        keys = super::gateway_keys(ANTHROPIC_KEY)
    )
}

pub fn python() -> String {
    let out = Command::new("python3").args(["-c", "import sys, openai, anthropic; print(sys.executable)"]).output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => panic!("the official SDKs are missing: pip install openai anthropic"),
    }
}

/// The SDK script with a clean environment: only what `keyswap dev` printed, PATH and HOME.
pub fn sdk(dev: &Dev, provider: &str, mode: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/chat.py");
    let out = Command::new(python())
        .arg(script)
        .args([provider, mode])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()))
        .envs(&dev.env)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{provider} {mode} failed:\n{stdout}\n{stderr}\nkeyswap:\n{}", dev.proc.output());
    stdout.into_owned()
}

/// An agent's TLS connection to `host` through the gateway, as a client library makes it: CONNECT
/// on the proxy port, then TLS trusting only the gateway CA, offering `alpn`.
pub async fn tunnel_tls(dev: &Dev, host: &str, alpn: &[u8]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    try_tunnel_tls(dev, host, alpn).await.unwrap()
}

/// [`tunnel_tls`], or the proxy's refusal.
pub async fn try_tunnel_tls(
    dev: &Dev,
    host: &str,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    try_tunnel_tls_as(dev, host, host, alpn).await
}

/// [`try_tunnel_tls`] with the CONNECT target spelled `connect_host` (a trailing dot, a case).
pub async fn try_tunnel_tls_as(
    dev: &Dev,
    connect_host: &str,
    host: &str,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use rustls::pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let proxy = dev.env["HTTPS_PROXY"].trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let connect = format!("CONNECT {connect_host}:443 HTTP/1.1\r\nHost: {connect_host}:443\r\n\r\n");
    tcp.write_all(connect.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        if tcp.read(&mut byte).await.unwrap_or(0) != 1 {
            return Err(format!("the proxy hung up: {}", String::from_utf8_lossy(&answer)));
        }
        answer.push(byte[0]);
    }
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err(format!("CONNECT refused: {}", String::from_utf8_lossy(&answer)));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&dev.env["NODE_EXTRA_CA_CERTS"]).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)).connect(name, tcp).await.map_err(|e| e.to_string())
}

/// An agent's HTTP/2 connection to `host` through the gateway ([`tunnel_tls`], ALPN `h2`).
pub async fn tunnel_h2<B>(dev: &Dev, host: &str) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = hyper_util::rt::TokioIo::new(tunnel_tls(dev, host, b"h2").await);
    let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    sender
}
