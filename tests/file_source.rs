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
    // Reported once the file has settled (a file broken under a second ago may still be being
    // written, and keeps its last version until then).
    wait_for("the reload report", || reports.lock().unwrap().iter().any(|r| r.contains("providr")));
    let report = reports.lock().unwrap().iter().find(|r| r.contains("providr")).unwrap().clone();
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

/// Watches `dir` (its first snapshot already built); the store it swaps into.
fn watched(dir: &Path) -> (keyswap::config::SnapshotStore, file::Watch) {
    let source = Arc::new(FileSource::new(dir, vec![]));
    let events = file::Events::start(dir).unwrap();
    let store = Arc::new(ArcSwap::from_pointee(source.snapshot(&GatewaySelector::Only).unwrap()));
    (store.clone(), events.watch(source, GatewaySelector::Only, store, |_| {}).unwrap())
}

/// `sops -d secrets.enc.yaml > anthropic-secret.yaml`: the shell empties the file, then the
/// decryption fills it, slowly. A reload in between took the Secret away (503 for as long as the
/// command ran) or injected the value cut short. Now the file counts when its writer closes it.
#[test]
fn a_secret_rewritten_slowly_through_a_shell_redirect_is_never_read_half_written() {
    let dir = config_dir();
    let (store, _watch) = watched(dir.path());
    rewrite_slowly(dir.path(), &store, || std::thread::sleep(file::MAX_DEBOUNCE * 3));
}

/// Rewrites the anthropic Secret in `dir` as `sops -d … >` does (emptied, the value's first part,
/// then the rest and the close), calling `meanwhile` while the file is empty and while the value
/// is cut short: the old key holds through both, and the rotated key follows the close.
fn rewrite_slowly(dir: &Path, store: &keyswap::config::SnapshotStore, mut meanwhile: impl FnMut()) {
    use std::io::Write as _;
    let old = anthropic_fingerprint(store);
    assert_eq!(old, Some(fingerprint(ANTHROPIC_KEY.as_bytes())));
    let text = secret_manifest("anthropic", "token", "sk-ant-rotated-slowly-0123456789");
    let (head, tail) = text.split_at(text.find("sk-ant-rotated").unwrap() + 10);
    let mut f = std::fs::File::create(dir.join("anthropic-secret.yaml")).unwrap();
    meanwhile();
    assert_eq!(anthropic_fingerprint(store), old, "the Secret went away while its file was empty");
    f.write_all(head.as_bytes()).unwrap();
    f.flush().unwrap();
    meanwhile();
    assert_eq!(anthropic_fingerprint(store), old, "a value cut short was taken");
    f.write_all(tail.as_bytes()).unwrap();
    drop(f);
    let rotated = Some(fingerprint(b"sk-ant-rotated-slowly-0123456789"));
    wait_for("the rotated key", || anthropic_fingerprint(store) == rotated);
}

/// The same rewrite while another file changes (a second `sops -d … > other.yaml` right after,
/// an operator's edit elsewhere): that file's change reloaded the directory, and every file was
/// read, this one half written, its Secret gone or cut short. A file emptied or broken under a
/// second ago keeps its last version until it settles; one emptied on purpose takes effect once
/// it has (the poll reads it again).
#[test]
fn a_secret_being_rewritten_is_not_read_half_written_when_another_file_triggers_the_reload() {
    let dir = config_dir();
    let (store, _watch) = watched(dir.path());
    let other = dir.path().join("other.yaml");
    // Another file written whole; returns once the reload it triggers has swapped a snapshot in.
    let mut n = 0;
    rewrite_slowly(dir.path(), &store, || {
        n += 1;
        let before = store.load_full();
        std::fs::write(&other, secret_manifest("other", "k", &format!("v{n}"))).unwrap();
        wait_for("the other file's reload", || !Arc::ptr_eq(&store.load_full(), &before));
    });
    // Emptied on purpose (and closed): in effect once settled, within the poll after.
    std::fs::File::create(dir.path().join("anthropic-secret.yaml")).unwrap();
    wait_for("the emptied file to take effect", || anthropic_fingerprint(&store).is_none());
}

/// A Secret file saved with one Latin-1 byte (or otherwise unreadable) dropped its last good
/// version for good: the route answered 503 until someone noticed.
#[test]
fn an_unreadable_secret_file_keeps_its_last_good_key() {
    let dir = config_dir();
    let (store, _watch) = watched(dir.path());
    let good = anthropic_fingerprint(&store);
    let mut latin1 = secret_manifest("anthropic", "token", "sk-ant-caf").into_bytes();
    let at = latin1.iter().position(|&b| b == b'"').unwrap() + 11;
    latin1.insert(at, 0xe9);
    std::fs::write(dir.path().join("anthropic-secret.yaml"), latin1).unwrap();
    let rejected = || store.load().rejected.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
    wait_for("the reload", || rejected().contains("anthropic-secret.yaml"));
    assert_eq!(anthropic_fingerprint(&store), good, "the last good key was dropped");
    assert!(rejected().contains("cannot read") && rejected().contains("last good version"), "{}", rejected());
    std::fs::write(dir.path().join("anthropic-secret.yaml"), secret_manifest("anthropic", "token", "sk-ant-fixed"))
        .unwrap();
    wait_for("the fixed key", || anthropic_fingerprint(&store) == Some(fingerprint(b"sk-ant-fixed")));
}

/// A pod cannot mount a ConfigMap and a Secret into one directory, so the Secret's manifest is
/// a symlink into the Secret volume. The kubelet rotates it by swapping `..data` there: no event
/// in the watched directory, and the rotation was never seen.
#[test]
fn a_manifest_symlinked_from_a_secret_volume_rotates_when_the_kubelet_swaps_it() {
    let (config, volume) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(config.path().join("config.yaml"), standard_config()).unwrap();
    let secret = |key: &str| vec![("anthropic.yaml", secret_manifest("anthropic", "token", key))];
    kube_volume(volume.path(), "2026_12_05_01", &secret("sk-ant-first"));
    symlink(volume.path().join("anthropic.yaml"), config.path().join("anthropic.yaml")).unwrap();
    let (store, _watch) = watched(config.path());
    assert_eq!(anthropic_fingerprint(&store), Some(fingerprint(b"sk-ant-first")));
    // Something reads the directory all the while (a jwksFile beside the manifests, a sidecar):
    // each read is an event, and none may put the comparison off.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, dir) = (stop.clone(), config.path().to_owned());
    let reader = std::thread::spawn(move || {
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = std::fs::read(dir.join("config.yaml"));
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    kube_volume(volume.path(), "2026_12_05_02", &secret("sk-ant-second"));
    wait_for("the swapped secret", || anthropic_fingerprint(&store) == Some(fingerprint(b"sk-ant-second")));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
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
