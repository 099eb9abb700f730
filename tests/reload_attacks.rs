//! Attacks on file-mode reloads: pathological manifests must not hold up a Secret rotation, and
//! reading the configuration directory must not trigger reloads.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use common::*;
use keyswap::config::file::{self, FileSource};
use keyswap::config::{fingerprint, GatewaySelector, SnapshotStore};

fn anthropic_fingerprint(store: &SnapshotStore) -> Option<String> {
    let snap = store.load();
    snap.secrets.iter().find(|s| s.secret.name == "anthropic" && s.key == "token").and_then(|s| s.fingerprint.clone())
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

#[test]
fn deeply_nested_manifest_does_not_block_secret_rotation() {
    let dir = config_dir();
    let source = Arc::new(FileSource::new(dir.path(), vec![]));
    let store = Arc::new(ArcSwap::from_pointee(source.snapshot(&GatewaySelector::Only).unwrap()));
    let reloads = Arc::new(AtomicUsize::new(0));
    let r = reloads.clone();
    let _watch = file::watch(source.clone(), GatewaySelector::Only, store.clone(), move |_| {
        r.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();

    // Unguarded, each of these keeps serde_yaml_ng busy for seconds to minutes.
    let deep = format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: deep}}\ndata: {}\n", "{a: ".repeat(100_000));
    let mut bomb = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..12 {
        bomb += &format!("a{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 9].join(", "));
    }
    let indented: String = (0..200).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
    let huge = format!("# padding\n{}", "k: value\n".repeat(600_000));
    for (name, text) in [("deep.yaml", &deep), ("bomb.yaml", &bomb), ("indented.yaml", &indented), ("huge.yaml", &huge)]
    {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    wait_for("the reload that sees the pathological files", Duration::from_secs(5), || {
        reloads.load(Ordering::SeqCst) >= 1 && source.refused().len() == 4
    });

    let started = Instant::now();
    std::fs::write(dir.path().join("anthropic-secret.yaml"), secret_manifest("anthropic", "token", "sk-ant-rotated"))
        .unwrap();
    let rotated = fingerprint(b"sk-ant-rotated");
    let elapsed = wait_for("the rotated key", Duration::from_secs(30), || {
        anthropic_fingerprint(&store).as_deref() == Some(rotated.as_str())
    });
    println!("rotation in effect {elapsed:?} after the Secret write ({:?} in all)", started.elapsed());
    assert!(elapsed < Duration::from_secs(1), "rotation took {elapsed:?}");
    let snap = store.load();
    assert!(matches!(snap.decide("api.anthropic.com", "/v1/messages", None), keyswap::config::Decision::Inject { .. }));

    let refused: Vec<String> = source.refused().iter().map(|e| e.to_string()).collect();
    let find = |name: &str| refused.iter().find(|e| e.contains(name)).unwrap_or_else(|| panic!("{name}: {refused:?}"));
    assert!(find("deep.yaml").contains("nesting deeper than 64 levels"), "{refused:?}");
    assert!(find("indented.yaml").contains("nesting deeper than 64 levels"), "{refused:?}");
    assert!(find("bomb.yaml").contains("aliases") && find("bomb.yaml").contains("1048576-byte limit"), "{refused:?}");
    assert!(find("huge.yaml").contains("over the 1048576-byte (1 MiB) limit"), "{refused:?}");

    // `check` and a fresh start still refuse the directory, naming the file and the limit.
    let fresh = FileSource::new(dir.path(), vec![]).load().unwrap_err().to_string();
    assert!(fresh.contains("deep.yaml: line 4: nesting deeper than 64 levels"), "{fresh}");
}

#[test]
fn reading_the_config_directory_does_not_trigger_reloads() {
    let dir = config_dir();
    let source = Arc::new(FileSource::new(dir.path(), vec![]));
    let store = Arc::new(ArcSwap::from_pointee(source.snapshot(&GatewaySelector::Only).unwrap()));
    let reloads: Arc<Mutex<Vec<bool>>> = Arc::default();
    let r = reloads.clone();
    let _watch = file::watch(source.clone(), GatewaySelector::Only, store.clone(), move |res| {
        r.lock().unwrap().push(res.is_ok());
    })
    .unwrap();

    // What `cat`, `keyswap check` or a second instance does, for two seconds.
    let started = Instant::now();
    let mut reads = 0;
    while started.elapsed() < Duration::from_secs(2) {
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            std::fs::read(entry.unwrap().path()).unwrap();
            reads += 1;
        }
        FileSource::new(dir.path(), vec![]).load().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(file::MAX_DEBOUNCE * 2);
    let seen = reloads.lock().unwrap().clone();
    println!("{reads} file reads, {} reloads", seen.len());
    assert!(seen.is_empty(), "reads triggered {} reloads", seen.len());

    // A real edit still reloads, once.
    std::fs::write(dir.path().join("anthropic-secret.yaml"), secret_manifest("anthropic", "token", "sk-ant-edited"))
        .unwrap();
    let edited = fingerprint(b"sk-ant-edited");
    wait_for("the edit", Duration::from_secs(5), || anthropic_fingerprint(&store).as_deref() == Some(edited.as_str()));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(*reloads.lock().unwrap(), vec![true], "one edit, one reload (its own reads trigger nothing)");
}
