//! The embedded default source: a directory of manifests, watched for changes.
//!
//! Every `*.yaml`/`*.yml` directly in the directory is read (symlinks followed; names starting
//! with `.` skipped, so Kubernetes' `..data` machinery is invisible). Any change in the
//! directory — an edit (when its writer closes the file, on Linux), a new file, a `..data`
//! symlink swap — triggers a debounced full reload; reads (opening, reading, closing without
//! writing) do not. Manifests that are symlinks (into another directory, where no event reaches
//! the watch) are compared by stamp every [`POLL`]. A reload skips the directory when
//! no manifest's stamp (device, inode, length, mtime, ctime; symlinks followed) changed, and
//! re-parses only the files that did: no file's content can hold up the others for long (see
//! [`load::prescan`] and [`load::MAX_MANIFEST_BYTES`]).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use secrecy::{ExposeSecret, SecretSlice};

mod parsed;

use parsed::{read_parsed, Parsed, Stamp};

use super::error::{ConfigError, ConfigErrors, Origin};
use super::load::{self, Key, Object, Resource, SecretData};
use super::{log_changes, Catalog, GatewaySelector, Snapshot, SnapshotStore};

/// How long the directory must be quiet before a reload: long enough to coalesce an editor's
/// write-rename dance, short enough that rotation lands well within a second.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// The longest a reload waits for the directory to be quiet: something writing without pause
/// cannot postpone a rotation.
pub const MAX_DEBOUNCE: Duration = Duration::from_millis(300);

/// How often the watch also compares stamps itself, where no event reports a change: manifests
/// that are symlinks (into a Secret volume, where the kubelet swaps its `..data`), and every
/// manifest once the watched directory was replaced (renamed over).
pub const POLL: Duration = Duration::from_secs(1);

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
        // What follows `=` may be the key itself, pasted in place of a variable's name: errors name
        // only what precedes it.
        let (target, var) = spec.split_once('=').ok_or_else(|| format!("an argument without `=`: {usage}"))?;
        let parts: Vec<&str> = target.split('/').collect();
        let (ns, name, key) = match parts.as_slice() {
            [name, key] => (load::DEFAULT_NAMESPACE, *name, *key),
            [ns, name, key] => (*ns, *name, *key),
            _ => return Err(format!("`{target}=…`: {usage}")),
        };
        if [ns, name, key, var].iter().any(|s| s.is_empty()) {
            return Err(format!("`{target}=…`: {usage}"));
        }
        // Named only when it looks like a variable's name (`UPPER_SNAKE`): a key in lowercase hex
        // (Azure's) is letters and digits too.
        let named = var.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            && !var.as_bytes()[0].is_ascii_digit();
        let value = env(var).ok_or_else(|| match named {
            true => format!("environment variable {var} (for Secret {ns}/{name} key {key}) is not set"),
            false => format!("`{target}=…`: no environment variable of that name is set (not shown: it does not look like one); {usage}"),
        })?;
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
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    files: HashMap<PathBuf, Parsed>,
    /// The manifests the last load read, when every stamp could be trusted.
    last: Option<Vec<(PathBuf, Stamp)>>,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>, env_secrets: Vec<EnvSecret>) -> Self {
        FileSource { dir: dir.into(), env_secrets, cache: Mutex::default() }
    }

    /// Reads and validates everything. All problems are reported together. Files unchanged
    /// since the last load are not parsed again.
    pub fn load(&self) -> Result<Catalog, ConfigErrors> {
        self.load_with(false)
    }

    /// The errors of the files the last load found over the manifest limits.
    pub fn refused(&self) -> Vec<ConfigError> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut refused: Vec<ConfigError> =
            cache.files.values().filter(|p| p.refused).flat_map(|p| p.errors.iter().cloned()).collect();
        refused.sort_by_key(|e| e.to_string());
        refused
    }

    /// `set_aside`: files over the manifest limits are not errors but left out (their last good
    /// version kept), so that a file nobody could have meant as configuration does not hold up
    /// the rest of the directory — a Secret rotation above all. `serve` does this, at start and on
    /// every reload; `check` does not.
    fn load_with(&self, set_aside: bool) -> Result<Catalog, ConfigErrors> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.last = None;
        let paths = manifest_files(&self.dir).map_err(|e| ConfigErrors(vec![e]))?;
        let now = SystemTime::now();
        let mut objects = Vec::new();
        let mut errors = Vec::new();
        let mut files = HashMap::new();
        let mut stamps = Some(Vec::new());
        for path in paths {
            match read_parsed(cache.files.remove(&path), &path, now) {
                Ok(parsed) => {
                    // A reload keeps the last good version of a file that is refused by the limits
                    // or does not parse (a typo while editing a Secret must not drop the key), of
                    // each document that fails where the failing ones are named; its errors are
                    // reported with the other objects left out.
                    let keep_last_good =
                        set_aside && (parsed.refused || (!parsed.errors.is_empty() && !parsed.kept.is_empty()));
                    if !keep_last_good {
                        objects.extend(parsed.objects.iter().cloned());
                        errors.extend(parsed.errors.iter().cloned());
                    } else if parsed.refused {
                        for e in &parsed.errors {
                            tracing::error!(error = %e, "manifest refused and set aside; its last good version stays in effect");
                        }
                        objects.extend(parsed.kept.iter().cloned());
                    } else {
                        let kept = |e: &ConfigError| ConfigError {
                            message: match e.object.as_deref().filter(|o| o.contains('/')) {
                                Some(_) => {
                                    format!("{} (its last good version stays in effect, if it had one)", e.message)
                                }
                                None => format!("{} (this file's last good version stays in effect)", e.message),
                            },
                            ..e.clone()
                        };
                        errors.extend(parsed.errors.iter().map(kept));
                        objects.extend(parsed.with_last_good());
                    }
                    match &mut stamps {
                        Some(s) if parsed.settled => s.push((path.clone(), parsed.stamp)),
                        _ => stamps = None,
                    }
                    files.insert(path, parsed);
                }
                Err((e, last_good)) => {
                    let e = *e;
                    // Unreadable for now (a mistaken chmod, not UTF-8, removed between the listing
                    // and the open): its last good version stays, as for a file that does not parse.
                    if !set_aside || last_good.is_empty() {
                        errors.push(e);
                    } else {
                        let kept = ConfigError {
                            message: format!("{} (this file's last good version stays in effect)", e.message),
                            ..e.clone()
                        };
                        errors.push(kept);
                        objects.extend(last_good.iter().cloned());
                        files.insert(path, Parsed::unreadable(last_good, e));
                    }
                    stamps = None;
                }
            }
        }
        *cache = Cache { files, last: stamps };
        drop(cache);
        self.overlay_env(&mut objects);
        if set_aside {
            // A reload: each invalid document or object is left out, the rest is kept.
            let mut catalog = Catalog::build_isolated(objects);
            errors.append(&mut catalog.rejected.errors);
            catalog.rejected.errors = errors;
            return Ok(catalog);
        }
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
                        origin: Origin { file: PathBuf::from("--secret"), document: 1 },
                        key: es.secret.clone(),
                        resource: Resource::Secret(data),
                    });
                }
            }
        }
    }

    /// Whether the directory holds exactly the manifests of the last load, judged by stamps
    /// alone (no file is opened).
    /// Whether a file was left unread because it was being written ([`Parsed::deferred`]): the
    /// watch reloads again at its next poll.
    pub fn has_deferred(&self) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.files.values().any(|p| p.deferred)
    }

    pub fn unchanged(&self) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(last), Ok(paths)) = (&cache.last, manifest_files(&self.dir)) else {
            return false;
        };
        paths.len() == last.len()
            && paths.iter().zip(last).all(|(path, (was, stamp))| {
                path == was && std::fs::metadata(path).is_ok_and(|m| Stamp::of(&m) == *stamp)
            })
    }

    /// Loads and compiles the snapshot for the selected gateway.
    pub fn snapshot(&self, selector: &GatewaySelector) -> Result<Snapshot, ConfigErrors> {
        self.snapshot_with(selector, false)
    }

    /// Loads and compiles the snapshot the way a running server does: files over the manifest
    /// limits set aside, invalid objects left out (listed in `Snapshot::rejected`, their
    /// dependents failing closed). Fails only when the gateway itself cannot be compiled.
    pub fn snapshot_isolated(&self, selector: &GatewaySelector) -> Result<Snapshot, ConfigErrors> {
        self.snapshot_with(selector, true)
    }

    fn snapshot_with(&self, selector: &GatewaySelector, isolate: bool) -> Result<Snapshot, ConfigErrors> {
        let catalog = self.load_with(isolate)?;
        if !isolate {
            let gateway = selector.resolve(&catalog)?;
            return catalog.compile(&gateway);
        }
        let gateway = selector.resolve(&catalog).map_err(|e| catalog.with_rejected(e))?;
        catalog.compile_isolated(&gateway).map_err(|e| catalog.with_rejected(e))
    }
}

/// What the poll compares: the directory's identity, and the stamps of the manifests no event
/// on the watched directory (`watched`) reports: those that are symlinks, or all once the
/// directory was replaced. Files written in the directory itself are left to their events (a
/// poll could read one half-written).
type Polled = (Option<(u64, u64)>, Vec<(PathBuf, Option<Stamp>)>);

fn unwatched_stamps(dir: &Path, watched: Option<(u64, u64)>) -> Polled {
    let now = dir_identity(dir);
    let unwatched = |p: &PathBuf| now != watched || std::fs::symlink_metadata(p).is_ok_and(|m| m.is_symlink());
    let paths = manifest_files(dir).unwrap_or_default().into_iter().filter(unwatched);
    (now, paths.map(|p| (std::fs::metadata(&p).ok().map(|m| Stamp::of(&m)), p)).map(|(s, p)| (p, s)).collect())
}

/// The device and inode of `dir` (symlinks followed).
fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
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

/// A running watch of the configuration directory; dropping it stops the watch.
pub struct Watch {
    _watcher: RecommendedWatcher,
}

/// The directory's change events, collected from the moment it is called: start it before the
/// first load, so that a change during the start is not missed.
pub struct Events {
    watcher: RecommendedWatcher,
    rx: mpsc::Receiver<notify::Result<Event>>,
    /// The directory's identity when the watch began (a replaced directory sends no events).
    watched: Option<(u64, u64)>,
    /// What the poll saw when the watch began.
    polled: Polled,
}

impl Events {
    pub fn start(dir: &Path) -> Result<Events, String> {
        let cannot = |e: notify::Error| format!("cannot watch {}: {e}", dir.display());
        let (tx, rx) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(tx).map_err(cannot)?;
        watcher.watch(dir, RecursiveMode::NonRecursive).map_err(cannot)?;
        let watched = dir_identity(dir);
        Ok(Events { watcher, rx, watched, polled: unwatched_stamps(dir, watched) })
    }

    /// Swaps in each new valid snapshot of `source` (loaded after [`Events::start`]). Keep the
    /// returned handle alive: dropping it stops the watch. `on_reload` is called after each
    /// reload, not for events that changed nothing (reads of the directory, a stamp-identical
    /// directory).
    pub fn watch(
        self,
        source: Arc<FileSource>,
        gateway: GatewaySelector,
        store: SnapshotStore,
        on_reload: impl Fn(&Result<(), ConfigErrors>) + Send + 'static,
    ) -> Result<Watch, String> {
        let Events { watcher, rx, watched, mut polled } = self;
        let dir = source.dir.clone();
        std::thread::Builder::new()
            .name("keyswap-config-watch".into())
            .spawn(move || {
                // Ends when the watcher is dropped (its sender goes with it).
                while next_change(&rx, &mut || {
                    let now = unwatched_stamps(&source.dir, watched);
                    std::mem::replace(&mut polled, now) != polled || source.has_deferred()
                }) {
                    if source.unchanged() {
                        tracing::debug!(dir = %source.dir.display(), "configuration directory unchanged; reload skipped");
                        continue;
                    }
                    let result = reload(&source, &gateway, &store);
                    on_reload(&result);
                }
            })
            .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
        Ok(Watch { _watcher: watcher })
    }
}

/// [`Events::start`] then [`Events::watch`], for a snapshot loaded just before.
pub fn watch(
    source: Arc<FileSource>,
    gateway: GatewaySelector,
    store: SnapshotStore,
    on_reload: impl Fn(&Result<(), ConfigErrors>) + Send + 'static,
) -> Result<Watch, String> {
    Events::start(&source.dir)?.watch(source, gateway, store, on_reload)
}

/// Waits for a change that matters (an event, or `polled` finding the stamps changed every
/// [`POLL`]), then for [`DEBOUNCE`] of quiet (at most [`MAX_DEBOUNCE`]). `false` when the
/// watcher is gone.
fn next_change(rx: &mpsc::Receiver<notify::Result<Event>>, polled: &mut impl FnMut() -> bool) -> bool {
    // On a clock of its own: events that do not matter (every read of a file in the directory
    // is one) must not put the poll off.
    let mut next_poll = Instant::now() + POLL;
    loop {
        if Instant::now() >= next_poll {
            next_poll = Instant::now() + POLL;
            if polled() {
                tracing::debug!("a manifest changed without an event (a symlink to another directory?); reloading");
                break;
            }
        }
        match rx.recv_timeout(next_poll.saturating_duration_since(Instant::now())) {
            Ok(event) if matters(&event) => break,
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
    let first = Instant::now();
    let mut last = first;
    loop {
        let deadline = (last + DEBOUNCE).min(first + MAX_DEBOUNCE);
        let Some(wait) = deadline.checked_duration_since(Instant::now()).filter(|w| !w.is_zero()) else {
            return true;
        };
        match rx.recv_timeout(wait) {
            Ok(event) if matters(&event) => last = Instant::now(),
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}

/// Everything but reading: opening a file, reading it and closing it unwritten change nothing
/// (and a reload's own reads must not trigger the next reload). On Linux a write matters when
/// the writer closes the file, not while it writes: `sops -d … > secrets.yaml` empties the file
/// first and fills it slowly, and a reload in between would take the Secret away (or a value
/// cut short).
fn matters(event: &notify::Result<Event>) -> bool {
    match event {
        Ok(event) => match event.kind {
            EventKind::Access(kind) => kind == AccessKind::Close(AccessMode::Write),
            EventKind::Modify(notify::event::ModifyKind::Data(_)) => !cfg!(target_os = "linux"),
            _ => true,
        },
        Err(e) => {
            tracing::warn!(error = %e, "file watch error; reloading");
            true
        }
    }
}

/// One reload: build, and swap only when valid. Files over the manifest limits are set aside
/// (logged, listed by [`FileSource::refused`]) rather than failing the reload.
pub fn reload(source: &FileSource, gateway: &GatewaySelector, store: &SnapshotStore) -> Result<(), ConfigErrors> {
    match source.snapshot_with(gateway, true) {
        Ok(snap) => {
            let old = store.load();
            log_changes(Some(&old), &snap);
            super::log_rejected(&snap);
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

    /// An operator pastes the key where the variable's name goes, or forgets the `=`: the error
    /// says what is wrong without repeating the key.
    #[test]
    fn env_secret_errors_never_echo_what_follows_the_equals_sign() {
        let env = |_: &str| None;
        for spec in [
            "anthropic/token=sk-ant-s3cret",
            "azure/token=0123abcdefs3cret",
            "x/y/z/token=sk-ant-s3cret",
            "sk-ant-s3cret",
            "/=sk-ant-s3cret",
        ] {
            let e = EnvSecret::parse(spec, env).unwrap_err();
            assert!(!e.contains("s3cret") && e.contains("expected"), "{spec}: {e}");
        }
    }
}
