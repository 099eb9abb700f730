//! `manifests/deploy` as it is applied: rendered as `kubectl apply -k` would render it
//! (`scripts/render-deploy`: the kustomization's namespace and image transformers) and validated
//! strictly (unknown fields are errors) against the oldest and newest Kubernetes it supports.

mod common;

use std::process::Command;

/// 1.29: native sidecars (init containers with `restartPolicy: Always`) are on by default.
const KUBERNETES: [&str; 2] = ["1.29.0", "1.37.0"];

fn render() -> String {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/render-deploy"))
        .output()
        .expect("python3 with PyYAML runs scripts/render-deploy");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn validate(path: &std::path::Path, version: &str) -> (bool, String) {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", version])
        .arg(path)
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("No module named kubernetes_validate"),
        "kubernetes-validate is missing: pip install kubernetes-validate (scripts/test installs it)"
    );
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_kustomization_renders_manifests_that_validate_strictly() {
    let text = render();
    let docs: Vec<serde_yaml_ng::Value> =
        serde_yaml_ng::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for want in ["Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap", "Role", "RoleBinding"] {
        assert!(kinds.contains(&want), "no {want} in {kinds:?}");
    }
    for d in docs.iter().filter(|d| d["kind"].as_str() != Some("Namespace")) {
        assert_eq!(d["metadata"]["namespace"].as_str(), Some("keyswap-system"), "{:?}", d["metadata"]);
    }
    // The image is the one scripts/image builds, by the crate version's tag.
    let deployment = docs.iter().find(|d| d["kind"].as_str() == Some("Deployment")).unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let keyswap = &pod["initContainers"][0];
    assert_eq!(keyswap["image"].as_str(), Some(format!("keyswap:{}", env!("CARGO_PKG_VERSION")).as_str()));
    assert_eq!(keyswap["restartPolicy"].as_str(), Some("Always"), "a native sidecar");
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert!(keyswap[probe]["httpGet"]["path"].is_string(), "keyswap has no {probe}");
    }
    assert_eq!(keyswap["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert_eq!(keyswap["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(keyswap["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert!(keyswap["resources"]["requests"]["memory"].is_string());
    let envoy = pod["containers"].as_sequence().unwrap().iter().find(|c| c["name"].as_str() == Some("envoy")).unwrap();
    let args: Vec<&str> = envoy["args"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert!(args.contains(&"--disable-hot-restart"), "Envoy's hot-restart socket is open to the pod: {args:?}");
    // Tunnels never reach the pod's own address: closed by the downward API's pod IP.
    let serve: Vec<&str> = keyswap["args"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert!(serve.windows(2).any(|w| w == ["--deny-destination", "$(POD_IP)"]), "{serve:?}");
    let pod_ip = keyswap["env"].as_sequence().unwrap().iter().find(|e| e["name"].as_str() == Some("POD_IP"));
    assert_eq!(pod_ip.map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str()), Some(Some("status.podIP")));
    // Spans name their pod and namespace: `$(VAR)` expands only variables defined before it.
    let env = keyswap["env"].as_sequence().expect("keyswap has env");
    let at = |name: &str| env.iter().position(|e| e["name"].as_str() == Some(name));
    let attrs = at("OTEL_RESOURCE_ATTRIBUTES").expect("OTEL_RESOURCE_ATTRIBUTES is set");
    assert_eq!(env[attrs]["value"].as_str(), Some("k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)"));
    for (var, field) in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")] {
        let i = at(var).unwrap_or_else(|| panic!("{var} is not set"));
        assert!(i < attrs, "{var} is defined after OTEL_RESOURCE_ATTRIBUTES uses it");
        assert_eq!(env[i]["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some(field));
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rendered.yaml");
    std::fs::write(&path, &text).unwrap();
    for v in KUBERNETES {
        let (ok, out) = validate(&path, v);
        assert!(ok, "Kubernetes {v}: {out}");
    }
    // Strict means strict: an unknown field fails.
    let bogus = dir.path().join("bogus.yaml");
    std::fs::write(&bogus, text.replacen("  maxUnavailable: 1\n", "  maxUnavailable: 1\n  maxUnavailible: 1\n", 1))
        .unwrap();
    let (ok, out) = validate(&bogus, KUBERNETES[0]);
    assert!(!ok, "a misspelt field passed: {out}");
}

/// Envoy closes its listeners at SIGTERM, cutting agents' open tunnels and streamed answers at
/// every rollout or drain. Its preStop hook drains first: the hook's command, run as written in
/// the manifest against a real Envoy with the manifest's drain flags, makes Envoy tell clients to
/// close their connections; and the grace period covers the hook's wait and keyswap's drain.
#[test]
fn envoys_pre_stop_hook_drains_a_real_envoy_before_it_is_stopped() {
    let text = render();
    let docs: Vec<serde_yaml_ng::Value> =
        serde_yaml_ng::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let deployment = docs.iter().find(|d| d["kind"].as_str() == Some("Deployment")).unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let envoy = pod["containers"].as_sequence().unwrap().iter().find(|c| c["name"].as_str() == Some("envoy")).unwrap();
    let hook: Vec<&str> = envoy["lifecycle"]["preStop"]["exec"]["command"]
        .as_sequence()
        .expect("a preStop exec hook")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let script = hook[2];
    let sleep: u64 = script.rsplit("sleep ").next().unwrap().trim().parse().expect("the hook ends with `sleep N`");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace >= sleep + 10 + 20,
        "grace period {grace} s: the hook waits {sleep} s, keyswap drains 10 s and flushes up to 20 s"
    );
    assert!(
        envoy["startupProbe"]["tcpSocket"].is_mapping(),
        "Envoy waits for keyswap's first sync under a startup probe"
    );
    let args: Vec<&str> = envoy["args"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    let drain_flags: Vec<&str> = args.iter().skip_while(|a| !a.starts_with("--drain")).copied().collect();
    assert!(drain_flags.starts_with(&["--drain-time-s", "20", "--drain-strategy", "immediate"]), "{args:?}");

    // A real Envoy, its admin on a free port in place of the bootstrap's 9901.
    let dir = tempfile::tempdir().unwrap();
    let (admin, listener) = (common::free_port(), common::free_port());
    let config = format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: proxy
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listener}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: proxy
          route_config: {{virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: /}}, direct_response: {{status: 200}}}}]}}]}}
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
"#
    );
    std::fs::write(dir.path().join("envoy.yaml"), config).unwrap();
    let mut cmd = Command::new(common::envoy_bin());
    cmd.arg("-c")
        .arg(dir.path().join("envoy.yaml"))
        .args(["--disable-hot-restart", "-l", "error"])
        .args(&drain_flags[..4]);
    let _envoy = common::Proc::spawn("envoy", cmd, dir.path().join("envoy.log"));
    let get = || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", listener)).ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let before = loop {
        if let Some(a) = get() {
            break a;
        }
        assert!(std::time::Instant::now() < deadline, "Envoy never listened");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(before.starts_with("http/1.1 200") && !before.contains("connection: close"), "{before}");
    let script =
        script.replace("127.0.0.1/9901", &format!("127.0.0.1/{admin}")).replace(&format!("sleep {sleep}"), "true");
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "the hook failed: {}", String::from_utf8_lossy(&out.stderr));
    let after = get().expect("Envoy still answers while it drains");
    assert!(after.contains("connection: close"), "Envoy does not drain after the hook: {after}");
}
