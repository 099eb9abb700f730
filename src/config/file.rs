//! The embedded default source: a directory of manifests, watched for changes.
//!
//! Every `*.yaml`/`*.yml` directly in the directory is read (symlinks followed; names starting
//! with `.` skipped, so Kubernetes' `..data` machinery is invisible). Any change in the
//! directory — an edit, a new file, a `..data` symlink swap — triggers a debounced full reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify_debouncer_mini::{new_debouncer, notify::RecursiveMode, DebounceEventResult, Debouncer};
use secrecy::{ExposeSecret, SecretSlice};

use super::error::{ConfigError, ConfigErrors, Origin};
use super::load::{self, Key, Object, Resource, SecretData};
use super::{log_changes, Catalog, GatewaySelector, Snapshot, SnapshotStore};

/// How long the directory must be quiet before a reload: long enough to coalesce an editor's
/// write-rename dance, short enough that rotation lands well within a second.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// A Secret key taken from the process environment (`--secret-from-env`).
pub struct EnvSecret {
    pub secret: Key,
    pub key: String,
    pub value: SecretSlice<u8>,
}

impl std::fmt::Debug for EnvSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EnvSecret({}/{}, <redacted>)", self.secret, self.key)
    }
}

impl EnvSecret {
    /// Parses `[NAMESPACE/]SECRET/KEY=ENVVAR` and reads the variable through `env`.
    pub fn parse(spec: &str, env: impl Fn(&str) -> Option<String>) -> Result<EnvSecret, String> {
        let usage = "expected [NAMESPACE/]SECRET/KEY=ENVVAR, e.g. anthropic/token=ANTHROPIC_API_KEY";
        let (target, var) = spec.split_once('=').ok_or_else(|| format!("`{spec}`: {usage}"))?;
        let parts: Vec<&str> = target.split('/').collect();
        let (ns, name, key) = match parts.as_slice() {
            [name, key] => (load::DEFAULT_NAMESPACE, *name, *key),
            [ns, name, key] => (*ns, *name, *key),
            _ => return Err(format!("`{spec}`: {usage}")),
        };
        if [ns, name, key, var].iter().any(|s| s.is_empty()) {
            return Err(format!("`{spec}`: {usage}"));
        }
        let value = env(var)
            .ok_or_else(|| format!("environment variable {var} (for Secret {ns}/{name} key {key}) is not set"))?;
        if value.is_empty() || value.contains(['\r', '\n', '\0']) {
            return Err(format!("environment variable {var} is empty or contains CR, LF or NUL"));
        }
        Ok(EnvSecret { secret: Key::new(ns, name), key: key.into(), value: SecretSlice::from(value.into_bytes()) })
    }
}

/// Reads a manifest directory and overlays environment secrets.
pub struct FileSource {
    pub dir: PathBuf,
    pub env_secrets: Vec<EnvSecret>,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>, env_secrets: Vec<EnvSecret>) -> Self {
        FileSource { dir: dir.into(), env_secrets }
    }

    /// Reads and validates everything. All problems are reported together.
    pub fn load(&self) -> Result<Catalog, ConfigErrors> {
        let mut objects = Vec::new();
        let mut errors = Vec::new();
        for path in manifest_files(&self.dir).map_err(|e| ConfigErrors(vec![e]))? {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let (objs, errs) = load::parse_file(&path, &text);
                    objects.extend(objs);
                    errors.extend(errs);
                }
                Err(e) => {
                    errors.push(ConfigError::new(format!("cannot read: {e}")).at(&Origin { file: path, document: 1 }))
                }
            }
        }
        self.overlay_env(&mut objects);
        // Validate what did parse too, so one pass reports every problem.
        match Catalog::build(objects) {
            Ok(catalog) if errors.is_empty() => Ok(catalog),
            Ok(_) => Err(ConfigErrors(errors)),
            Err(more) => {
                errors.extend(more.0);
                Err(ConfigErrors(errors))
            }
        }
    }

    fn overlay_env(&self, objects: &mut Vec<Object>) {
        for es in &self.env_secrets {
            let existing = objects.iter_mut().find_map(|o| match &mut o.resource {
                Resource::Secret(d) if o.key == es.secret => Some(d),
                _ => None,
            });
            let value = SecretSlice::from(es.value.expose_secret().to_vec());
            match existing {
                Some(data) => {
                    data.entries.insert(es.key.clone(), value);
                }
                None => {
                    let mut data = SecretData::default();
                    data.entries.insert(es.key.clone(), value);
                    objects.push(Object {
                        origin: Origin { file: PathBuf::from("--secret-from-env"), document: 1 },
                        key: es.secret.clone(),
                        resource: Resource::Secret(data),
                    });
                }
            }
        }
    }

    /// Loads and compiles the snapshot for the selected gateway.
    pub fn snapshot(&self, selector: &GatewaySelector) -> Result<Snapshot, ConfigErrors> {
        let catalog = self.load()?;
        let gateway = selector.resolve(&catalog)?;
        catalog.compile(&gateway)
    }
}

/// The manifest files of `dir`, sorted by name.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ConfigError::new(format!("cannot read configuration directory {}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml")) && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Watches the directory and swaps in each new valid snapshot. Keep the returned handle
/// alive: dropping it stops the watch.
pub fn watch(
    source: Arc<FileSource>,
    gateway: GatewaySelector,
    store: SnapshotStore,
    on_reload: impl Fn(&Result<(), ConfigErrors>) + Send + 'static,
) -> Result<Debouncer<notify_debouncer_mini::notify::RecommendedWatcher>, String> {
    let dir = source.dir.clone();
    let mut debouncer = new_debouncer(DEBOUNCE, move |res: DebounceEventResult| {
        if let Err(e) = res {
            tracing::warn!(error = %e, "file watch error; will reload on the next change");
        }
        let result = reload(&source, &gateway, &store);
        on_reload(&result);
    })
    .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    debouncer
        .watcher()
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    Ok(debouncer)
}

/// One reload: build, and swap only when valid.
pub fn reload(source: &FileSource, gateway: &GatewaySelector, store: &SnapshotStore) -> Result<(), ConfigErrors> {
    match source.snapshot(gateway) {
        Ok(snap) => {
            let old = store.load();
            log_changes(Some(&old), &snap);
            store.store(Arc::new(snap));
            Ok(())
        }
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!(error = %e, "configuration rejected; the last good configuration keeps serving");
            }
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_secret_specs_parse_with_and_without_namespace() {
        let env = |v: &str| (v == "K").then(|| "sk-x".to_string());
        let s = EnvSecret::parse("anthropic/token=K", env).unwrap();
        assert_eq!((s.secret.to_string(), s.key.as_str()), ("default/anthropic".into(), "token"));
        let s = EnvSecret::parse("team/anthropic/token=K", env).unwrap();
        assert_eq!(s.secret.to_string(), "team/anthropic");
        assert!(EnvSecret::parse("anthropic=K", env).unwrap_err().contains("expected"));
        let e = EnvSecret::parse("anthropic/token=MISSING", env).unwrap_err();
        assert!(e.contains("MISSING") && e.contains("not set"), "{e}");
        assert!(!format!("{s:?}").contains("sk-x"));
    }
}
