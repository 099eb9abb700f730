//! The embedded file source: watched directory, Kubernetes `..data` swaps, bad edits.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use common::*;
use keyswap::config::file::{self, FileSource};
use keyswap::config::{fingerprint, GatewaySelector};

fn anthropic_fingerprint(store: &keyswap::config::SnapshotStore) -> Option<String> {
    let snap = store.load();
    snap.secrets.iter().find(|s| s.secret.name == "anthropic" && s.key == "token").and_then(|s| s.fingerprint.clone())
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lays out a directory the way the kubelet mounts a ConfigMap/Secret volume.
fn kube_volume(dir: &Path, generation: &str, files: &[(&str, String)]) {
    let data_dir = dir.join(format!("..{generation}"));
    std::fs::create_dir(&data_dir).unwrap();
    for (name, text) in files {
        std::fs::write(data_dir.join(name), text).unwrap();
    }
    // Atomic swap: new symlink beside, then rename over `..data`.
    let tmp = dir.join("..data_tmp");
    symlink(format!("..{generation}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

#[test]
fn kubernetes_data_symlink_swap_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let files = |key: &str| {
        vec![("config.yaml", standard_config()), ("anthropic.yaml", secret_manifest("anthropic", "token", key))]
    };
    kube_volume(dir.path(), "2026_11_22_01", &files("sk-ant-first"));
    let source = Arc::new(FileSource::new(dir.path(), vec![]));
    let snap = source.snapshot(&GatewaySelector::Only).unwrap();
    let store = Arc::new(ArcSwap::from_pointee(snap));
    assert_eq!(anthropic_fingerprint(&store), Some(fingerprint(b"sk-ant-first")));

    let _watch = file::watch(source, GatewaySelector::Only, store.clone(), |_| {}).unwrap();
    kube_volume(dir.path(), "2026_11_22_02", &files("sk-ant-second"));
    wait_for("the swapped secret", || anthropic_fingerprint(&store) == Some(fingerprint(b"sk-ant-second")));
}

#[test]
fn a_file_that_stops_parsing_keeps_its_last_good_version_and_is_reported() {
    let dir = config_dir();
    let source = Arc::new(FileSource::new(dir.path(), vec![]));
    let store = Arc::new(ArcSwap::from_pointee(source.snapshot(&GatewaySelector::Only).unwrap()));
    let reports: Arc<Mutex<Vec<String>>> = Arc::default();
    let (r, st) = (reports.clone(), store.clone());
    let _watch = file::watch(source, GatewaySelector::Only, store.clone(), move |res| {
        r.lock().unwrap().push(match res {
            Ok(()) => st.load().rejected.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"),
            Err(e) => e.to_string(),
        })
    })
    .unwrap();
    let good = anthropic_fingerprint(&store);

    // A typo in a route field.
    let broken = standard_config()
        .replace("rules: [{matches: [{provider: anthropic}]}]", "rules: [{matches: [{providr: anthropic}]}]");
    std::fs::write(dir.path().join("config.yaml"), broken).unwrap();
    wait_for("the reload report", || !reports.lock().unwrap().is_empty());
    let report = reports.lock().unwrap()[0].clone();
    assert!(
        report.contains("config.yaml (document 2): AIProviderRoute default/anthropic: field `spec.rules[0].matches[0]"),
        "{report}"
    );
    assert!(report.contains("providr") && report.contains("last good version stays in effect"), "{report}");
    assert_eq!(anthropic_fingerprint(&store), good, "the old snapshot still serves");
    assert!(store.load().decide("api.anthropic.com", "/v1/messages", None).to_string_lossy().starts_with("inject"));

    // Fixing it swaps in the new configuration.
    std::fs::write(dir.path().join("config.yaml"), standard_config()).unwrap();
    std::fs::write(dir.path().join("anthropic-secret.yaml"), secret_manifest("anthropic", "token", "sk-ant-fixed"))
        .unwrap();
    wait_for("the fixed configuration", || anthropic_fingerprint(&store) == Some(fingerprint(b"sk-ant-fixed")));
}

#[test]
fn a_deleted_secret_fails_closed_after_reload() {
    let dir = config_dir();
    let source = Arc::new(FileSource::new(dir.path(), vec![]));
    let store = Arc::new(ArcSwap::from_pointee(source.snapshot(&GatewaySelector::Only).unwrap()));
    let _watch = file::watch(source, GatewaySelector::Only, store.clone(), |_| {}).unwrap();
    std::fs::remove_file(dir.path().join("anthropic-secret.yaml")).unwrap();
    wait_for("the secret to disappear", || anthropic_fingerprint(&store).is_none());
    let snap = store.load();
    assert_eq!(snap.decide("api.anthropic.com", "/v1/messages", None).to_string_lossy(), "fail-closed: SecretNotFound");
}

trait Describe {
    fn to_string_lossy(&self) -> String;
}

impl Describe for keyswap::config::Decision<'_> {
    fn to_string_lossy(&self) -> String {
        use keyswap::config::Decision::*;
        match self {
            Inject { entry, .. } => format!("inject: {}", entry.route),
            FailClosed { reason, .. } => format!("fail-closed: {}", reason.reason()),
            TenantNotMapped { entry } => format!("tenant-not-mapped: {}", entry.route),
            Deny => "deny".into(),
            PassThrough { allowed_by } => format!("pass: {allowed_by}"),
            Refused(r) => format!("refused: {}", r.reason()),
        }
    }
}
