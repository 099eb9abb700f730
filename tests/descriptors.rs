//! `proto/envoy.binpb` is the subset of envoy-types' descriptor set that keyswap's Envoy
//! resources need (`keyswap::envoy::xds::ROOT_FILES` and their imports). This test rebuilds it
//! from the envoy-types in Cargo.lock and fails when the committed file differs (an envoy-types
//! upgrade, a new root file); `KEYSWAP_BLESS=1 cargo test --test descriptors` rewrites it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use prost::Message as _;
use prost_types::FileDescriptorSet;

/// envoy-types' own descriptor set, in the cargo registry.
fn envoy_types_descriptors() -> PathBuf {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"envoy-types\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"').to_owned())
        .expect("envoy-types in Cargo.lock");
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cargo"));
    let src = home.join("registry/src");
    for index in std::fs::read_dir(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let p = index.unwrap().path().join(format!("envoy-types-{version}/src/generated/types.bin"));
        if p.is_file() {
            return p;
        }
    }
    panic!("envoy-types {version} sources not found under {} (run `cargo fetch`)", src.display());
}

/// The root files and everything they import, in the order of `all` (imports first).
fn subset(all: FileDescriptorSet, roots: &[&str]) -> FileDescriptorSet {
    let by_name: HashMap<String, &prost_types::FileDescriptorProto> =
        all.file.iter().map(|f| (f.name().to_owned(), f)).collect();
    let mut keep = HashSet::new();
    let mut todo: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
    while let Some(name) = todo.pop() {
        let f = by_name.get(&name).unwrap_or_else(|| panic!("{name} is not in envoy-types' descriptors"));
        if keep.insert(name) {
            todo.extend(f.dependency.iter().cloned());
        }
    }
    let file = all
        .file
        .iter()
        .filter(|f| keep.contains(f.name()))
        .cloned()
        .map(|mut f| {
            f.source_code_info = None;
            f
        })
        .collect();
    FileDescriptorSet { file }
}

#[test]
fn committed_envoy_descriptors_are_the_subset_of_envoy_types_keyswap_needs() {
    let all = FileDescriptorSet::decode(&*std::fs::read(envoy_types_descriptors()).unwrap()).unwrap();
    let want = subset(all, keyswap::envoy::xds::ROOT_FILES).encode_to_vec();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/envoy.binpb");
    if std::env::var_os("KEYSWAP_BLESS").is_some() {
        std::fs::write(path, &want).unwrap();
    }
    let have = std::fs::read(path).unwrap_or_default();
    assert!(
        have == want,
        "proto/envoy.binpb is not the subset of envoy-types' descriptors keyswap needs ({} bytes, want {}); \
         regenerate it with `KEYSWAP_BLESS=1 cargo test --test descriptors`",
        have.len(),
        want.len()
    );
}
