//! The container image: `scripts/image` builds it with buildah, and keyswap runs *from the image's
//! filesystem*, mounted read-only, as uid 65532, serving ext_proc (Unix socket in the one writable
//! directory) and its admin port, with a real Envoy outside driving an agent request through it.
//!
//! `podman run` needs cgroup features these machines lack, and `buildah run`'s cleanup fails on a
//! read-only root, so the test does what `buildah run --isolation chroot` does itself: a private
//! mount namespace (`unshare --mount`), the container's root filesystem (`buildah mount`) bound
//! read-only, the socket and manifest directories bound into it, and `chroot --userspec`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn buildah(args: &[&str]) -> String {
    run(Command::new("buildah").args(args))
}

/// A working container of the image, mounted; removed when dropped.
struct Mounted {
    container: String,
    root: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("buildah").args(["umount", &self.container]).output();
        let _ = Command::new("buildah").args(["rm", &self.container]).output();
    }
}

fn version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_serves_an_agent_request_from_a_read_only_root_as_uid_65532() {
    let root_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    assert!(
        Command::new("buildah").arg("--version").output().is_ok(),
        "buildah is missing: apt-get install -y buildah (scripts/image installs it)"
    );
    let is_root = run(Command::new("id").arg("-u")) == "0";
    assert!(is_root, "the image test mounts and chroots: run it as root (CI does)");

    // Build: the script, as an operator runs it.
    let built = run(Command::new(root_dir.join("scripts/image")).current_dir(&root_dir));
    let image = format!("keyswap:{}", version());
    assert!(built.contains(&format!("{image} built (")), "{built}");
    eprintln!("{}", built.lines().last().unwrap_or_default());

    let container = buildah(&["from", "-q", &format!("localhost/{image}")]);
    let mounted = Mounted { root: PathBuf::from(buildah(&["mount", &container])), container };
    let root = &mounted.root;
    // What is in it: the binary, no shell, a non-root user, the CA bundle.
    assert!(root.join("usr/local/bin/keyswap").is_file());
    for shell in ["bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox"] {
        assert!(!root.join(shell).exists(), "the image has {shell}");
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.contains(":65532:65532:"), "{passwd}");
    assert!(root.join("etc/ssl/certs/ca-certificates.crt").is_file());
    let config = buildah(&["inspect", "--format", "{{.OCIv1.Config.User}} {{.OCIv1.Config.Entrypoint}}", &image]);
    assert_eq!(config, "65532:65532 [/usr/local/bin/keyswap]");

    // The manifests and the socket directory (the only writable path) from outside.
    let work = tempfile::tempdir().unwrap();
    let (config_dir, run_dir, ro_root) =
        (work.path().join("config"), work.path().join("run"), work.path().join("root"));
    for d in [&config_dir, &run_dir, &ro_root] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(config_dir.join("gateway.yaml"), standard_config()).unwrap();
    std::fs::write(config_dir.join("secret.yaml"), secret_manifest("anthropic", "token", ANTHROPIC_KEY)).unwrap();
    run(Command::new("chown").arg("65532:65532").arg(&run_dir));
    let fake = FakeProvider::start().await;
    let metrics_port = free_port();
    let keyswap = in_image(
        root,
        &ro_root,
        &config_dir,
        &run_dir,
        &["serve", "--config", "/etc/keyswap", "--metrics", &format!("127.0.0.1:{metrics_port}")],
        work.path(),
    );
    let uds = run_dir.join("keyswap.sock");
    let since = Instant::now();
    let mut keyswap = keyswap;
    while std::os::unix::net::UnixStream::connect(&uds).is_err() {
        keyswap.assert_running();
        assert!(since.elapsed() < Duration::from_secs(20), "no socket:\n{}", keyswap.output());
        std::thread::sleep(Duration::from_millis(50));
    }
    // It runs as 65532, and its root cannot be written.
    let status = std::fs::read_to_string(format!("/proc/{}/status", keyswap.child.id())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default().to_owned();
    assert!(uid.split_whitespace().skip(1).all(|u| u == "65532"), "{uid}");
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", keyswap.child.id())).unwrap();
    let root_mount = mounts.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).expect("a root mount");
    assert!(root_mount.split_whitespace().nth(5).is_some_and(|o| o.split(',').any(|x| x == "ro")), "{root_mount}");

    // An agent request through a real Envoy outside: placeholder in, real key out.
    let (envoy, port) = start_envoy(work.path(), &uds, fake.addr);
    let client = client();
    let (code, body) = send(
        &client,
        port,
        "api.anthropic.com",
        "/v1/messages",
        &[("x-api-key", PLACEHOLDER), ("authorization", &format!("Bearer {STOLEN}"))],
    )
    .await;
    assert_eq!(code, 200, "{body}\n{}\n{}", keyswap.output(), envoy.output());
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header_str("x-api-key").as_deref(), Some(ANTHROPIC_KEY));
    assert!(!seen[0].everything().contains(STOLEN) && !seen[0].everything().contains(PLACEHOLDER));
    for path in ["/healthz", "/readyz"] {
        assert_eq!(scrape(metrics_port, path).await.0, 200, "{path}");
    }
    let (_, m) = scrape(metrics_port, "/metrics").await;
    assert_eq!(metric(&m, "keyswap_injections_total"), 1.0, "{m}");
    assert!(keyswap.terminate().success(), "{}", keyswap.output());
    assert!(!keyswap.output().contains(ANTHROPIC_KEY), "the key in the log");
}

/// keyswap from the image's root filesystem `root`, bound read-only at `ro_root` in a private
/// mount namespace, with `config` at /etc/keyswap (read-only) and `run` at /run/keyswap, as uid
/// and gid 65532.
fn in_image(root: &Path, ro_root: &Path, config: &Path, run: &Path, args: &[&str], work: &Path) -> Proc {
    let script = r#"set -e
mount --bind "$1" "$2"
mount -o remount,bind,ro "$2"
mount --bind "$3" "$2/etc/keyswap"
mount -o remount,bind,ro "$2/etc/keyswap"
mount --bind "$4" "$2/run/keyswap"
root="$2"
shift 4
exec chroot --userspec=65532:65532 "$root" /usr/local/bin/keyswap "$@""#;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", script, "in-image"])
        .args([root, ro_root, config, run])
        .args(args)
        .env("RUST_LOG", "debug");
    Proc::spawn("keyswap (image)", cmd, work.join("keyswap.log"))
}
