//! The watch machinery: one kube-runtime reflector per watch, retried on a bounded backoff with
//! jitter, an expired resourceVersion relisted at once, and every failure described without a
//! response body.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use kube::core::Status;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::Api;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use super::{KubeStatus, QUIET, RETRY_CAP, RETRY_FIRST};

/// One running watch: its cache, whether its initial list is done, and its task (aborted when
/// the watch is no longer wanted).
pub(super) struct Watched<K: kube::Resource + Clone + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    pub(super) store: Store<K>,
    pub(super) synced: Arc<AtomicBool>,
    pub(super) task: tokio::task::JoinHandle<()>,
    /// Rebuilds go on without this (Secret) watch's initial list: a rebuild waited for it
    /// [`super::SECRET_SYNC_GRACE`].
    pub(super) overdue: bool,
    /// When the watch started: one just started gets a moment to list before it can be overdue.
    pub(super) started: Instant,
}

impl<K: kube::Resource + Clone + 'static> Watched<K>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    pub(super) fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }
}

/// Starts a reflector on `api`; every event pokes `changed`. Failures are retried at most
/// [`RETRY_CAP`] apart; an expired resourceVersion relists at once and is not a failure.
pub(super) fn watch<K>(api: Api<K>, cfg: watcher::Config, changed: Arc<Notify>, status: Arc<KubeStatus>) -> Watched<K>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Default,
{
    watch_noting_deletions(api, cfg, changed, status, None, None)
}

/// Which objects a watch keeps: the others it lists are dropped as they arrive (never cached,
/// never a rebuild).
pub(super) type Keep<K> = Arc<dyn Fn(&K) -> bool + Send + Sync>;

/// [`watch`], noting in `deleted` each object it sees deleted (Secrets: a copy another watch
/// still holds then no longer counts).
pub(super) fn watch_noting_deletions<K>(
    api: Api<K>,
    cfg: watcher::Config,
    changed: Arc<Notify>,
    status: Arc<KubeStatus>,
    deleted: Option<Arc<super::Deleted>>,
    keep: Option<Keep<K>>,
) -> Watched<K>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Default,
{
    let (store, mut writer) = reflector::store();
    let synced = Arc::new(AtomicBool::new(false));
    let s = synced.clone();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let what = describe(&kind, api.resource_url(), &cfg);
    let task = tokio::spawn(async move {
        let mut backoff = Backoff::default();
        let mut failing = Failing { status: status.clone(), on: false };
        let mut last_expired: Option<Instant> = None;
        // The cause last logged at WARN: a retry failing the same way is logged at debug.
        let mut last_cause: Option<String> = None;
        // Success: the API server answered this watch.
        let recovered = |failing: &mut Failing, backoff: &mut Backoff, last_cause: &mut Option<String>| {
            backoff.reset();
            if failing.set(false) {
                last_cause.take();
                tracing::info!(watch = %what, "Kubernetes watch recovered");
            }
        };
        // One kube-runtime watcher per round; a new round relists from scratch.
        loop {
            let stream = watcher(api.clone(), cfg.clone()).modify(|o: &mut K| {
                // Never cache what keyswap does not read.
                o.meta_mut().managed_fields = None;
            });
            futures_util::pin_mut!(stream);
            loop {
                let next = if failing.on {
                    match tokio::time::timeout(QUIET, stream.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            recovered(&mut failing, &mut backoff, &mut last_cause);
                            continue;
                        }
                    }
                } else {
                    stream.next().await
                };
                let Some(event) = next else { break };
                if dropped(keep.as_ref(), &event) {
                    recovered(&mut failing, &mut backoff, &mut last_cause);
                    continue;
                }
                match event {
                    Ok(event) => {
                        apply(&mut writer, &event, deleted.as_deref());
                        match event {
                            watcher::Event::Init => {}
                            watcher::Event::InitApply(_) => recovered(&mut failing, &mut backoff, &mut last_cause),
                            watcher::Event::InitDone => {
                                recovered(&mut failing, &mut backoff, &mut last_cause);
                                s.store(true, Ordering::Relaxed);
                                changed.notify_one();
                            }
                            watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                                recovered(&mut failing, &mut backoff, &mut last_cause);
                                changed.notify_one();
                            }
                        }
                    }
                    // The resourceVersion to resume from is gone (compacted, or the API server
                    // restarted): relist now. Not a failure, unless it repeats at once.
                    Err(e) if expired(&e) && last_expired.is_none_or(|t| t.elapsed() > RETRY_CAP) => {
                        last_expired = Some(Instant::now());
                        status.relists.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(watch = %what, "resourceVersion expired (410 Gone); relisting");
                        if matches!(e, watcher::Error::WatchStartFailed(_)) {
                            // kube-runtime would retry the same resourceVersion: start over.
                            break;
                        }
                    }
                    Err(e) => {
                        let cause = cause(&e, &kind);
                        failed(&what, cause, &mut failing, &mut backoff, &mut last_cause).await;
                        if unparseable_event(&e) {
                            // The event is lost and the cache may be stale: relist.
                            break;
                        }
                    }
                }
            }
        }
    });
    Watched { store, synced, task, overdue: false, started: Instant::now() }
}

/// Applies `event` to a watch's cache, noting in `deleted` what it shows deleted: a Delete event,
/// or what the cache held that a relist no longer holds.
/// Whether `event` is of an object `keep` drops. (A name never changes: an object dropped once
/// was never kept.)
fn dropped<K>(keep: Option<&Keep<K>>, event: &Result<watcher::Event<K>, watcher::Error>) -> bool {
    match event {
        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o)) => {
            keep.is_some_and(|k| !k(o))
        }
        _ => false,
    }
}

fn apply<K>(writer: &mut reflector::store::Writer<K>, event: &watcher::Event<K>, deleted: Option<&super::Deleted>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    let reader = writer.as_reader();
    // What the watch held before a relist replaces it (nothing before the first).
    let held = match (event, deleted) {
        (watcher::Event::InitDone, Some(_)) => reader.state(),
        _ => Vec::new(),
    };
    writer.apply_watcher_event(event);
    if let Some(d) = deleted {
        if let watcher::Event::Delete(o) = event {
            d.bury(o.meta(), false);
        }
        if !held.is_empty() {
            bury_missing(&held, &reader.state(), d);
        }
    }
}

/// Notes in `deleted` the objects a watch `held` that its relist (`now`) no longer holds: deleted
/// while the watch was away, for which kube-runtime sends no Delete, or out of its label selector.
/// Buried at the last version the watch saw, that copy included: another watch's copy from then
/// or before no longer counts, a newer one (relabelled, created again) still does.
pub(super) fn bury_missing<K: kube::Resource>(held: &[Arc<K>], now: &[Arc<K>], deleted: &super::Deleted) {
    let now: std::collections::HashSet<_> = now.iter().map(|o| super::object_key(o.meta())).collect();
    for o in held.iter().filter(|o| !now.contains(&super::object_key(o.meta()))) {
        tracing::debug!(object = %super::object_key(o.meta()), "gone from the watch's relist; its copies elsewhere no longer count");
        deleted.bury(o.meta(), true);
    }
}

/// A failure of watch `what`: counted, logged (at WARN unless the last one had the same `cause`)
/// and waited out.
async fn failed(
    what: &str,
    cause: String,
    failing: &mut Failing,
    backoff: &mut Backoff,
    last_cause: &mut Option<String>,
) {
    failing.status.watch_errors.fetch_add(1, Ordering::Relaxed);
    failing.set(true);
    let pause = backoff.next_pause();
    if last_cause.as_deref() == Some(cause.as_str()) {
        tracing::debug!(watch = %what, %cause, retry_in = ?pause, "Kubernetes watch failed again");
    } else {
        tracing::warn!(watch = %what, %cause, retry_in = ?pause, "Kubernetes watch failed; retrying, the last good configuration keeps serving");
    }
    failing.status.set_error(format!("{what}: {cause}"));
    *last_cause = Some(cause);
    tokio::time::sleep(pause).await;
}

/// Whether one watch is failing, counted in [`KubeStatus::watches_failing`] (also when the watch
/// is stopped: it no longer counts).
struct Failing {
    status: Arc<KubeStatus>,
    on: bool,
}

impl Failing {
    /// Returns whether it changed.
    fn set(&mut self, on: bool) -> bool {
        if self.on == on {
            return false;
        }
        self.on = on;
        if on {
            self.status.watches_failing.fetch_add(1, Ordering::Relaxed);
        } else {
            self.status.watches_failing.fetch_sub(1, Ordering::Relaxed);
        }
        true
    }
}

impl Drop for Failing {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Names a watch: kind, then namespace/name, namespace or all namespaces, then the label selector.
fn describe(kind: &str, url: &str, cfg: &watcher::Config) -> String {
    let ns = url.split("/namespaces/").nth(1).and_then(|rest| rest.split('/').next());
    let name = cfg.field_selector.as_deref().and_then(|f| f.strip_prefix("metadata.name="));
    let scope = match (ns, name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (Some(ns), None) => format!("in namespace {ns}"),
        (None, Some(name)) => format!("named {name} in all namespaces"),
        (None, None) => "in all namespaces".to_owned(),
    };
    match &cfg.label_selector {
        Some(l) => format!("{kind} {scope} labelled {l}"),
        None => format!("{kind} {scope}"),
    }
}

/// 410 Gone: the resourceVersion the watch would resume from is no longer available.
fn expired(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(s) => s.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 410,
        _ => false,
    }
}

/// A watch event kube-client could not parse (as the object, or as a Status).
fn unparseable_event(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchFailed(kube::Error::SerdeError(_)) => true,
        watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 0 && s.message.is_empty() && s.reason.is_empty(),
        _ => false,
    }
}

/// Why a watch failed, for the log and `/readyz`: never a response body, and never a JSON error
/// message (serde quotes the value it could not parse, which can be a key).
fn cause(e: &watcher::Error, kind: &str) -> String {
    match e {
        watcher::Error::InitialListFailed(e) => format!("list failed: {}", client_cause(e, kind, "the list response")),
        watcher::Error::WatchStartFailed(e) => {
            format!("watch request failed: {}", client_cause(e, kind, "the watch response"))
        }
        watcher::Error::WatchFailed(e) => format!("watch stream failed: {}", client_cause(e, kind, "a watch event")),
        watcher::Error::WatchError(s) => format!("the API server ended the watch: {}", status_cause(s)),
        watcher::Error::NoResourceVersion => "the API server sent no resourceVersion".to_owned(),
    }
}

fn client_cause(e: &kube::Error, kind: &str, what: &str) -> String {
    match e {
        kube::Error::SerdeError(e) => {
            let why = match e.classify() {
                serde_json::error::Category::Data => "a field has the wrong type or value",
                serde_json::error::Category::Syntax => "not valid JSON",
                serde_json::error::Category::Eof => "truncated JSON",
                serde_json::error::Category::Io => "read error",
            };
            format!(
                "{what} could not be parsed as {kind} ({why} at line {} column {}; the body is not logged)",
                e.line(),
                e.column()
            )
        }
        // kube-client answers a watch line it cannot parse (as the object or as a Status) with an
        // empty Status: the parse error is lost, but that is what happened.
        kube::Error::Api(s) if s.code == 0 && s.message.is_empty() && s.reason.is_empty() => {
            format!("{what} could not be parsed as {kind} (the event is not logged)")
        }
        kube::Error::Api(s) => status_cause(s),
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                let more = s.to_string();
                if !text.contains(&more) {
                    text = format!("{text}: {more}");
                }
                source = s.source();
            }
            text
        }
    }
}

fn status_cause(s: &Status) -> String {
    // kube-client makes a Status of an error body that is not one, the body as its message.
    if s.reason == "Failed to parse error data" {
        return format!("HTTP {} (the error body is not a Status; not logged)", s.code);
    }
    match (s.reason.as_str(), s.message.as_str()) {
        ("", m) => format!("HTTP {}: {m}", s.code),
        (r, "") => format!("HTTP {} {r}", s.code),
        (r, m) => format!("HTTP {} {r}: {m}", s.code),
    }
}

/// Pauses between attempts of a failing watch: [`RETRY_FIRST`] doubling to [`RETRY_CAP`], each
/// between half and all of that (jitter).
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: RETRY_FIRST }
    }
}

impl Backoff {
    fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(RETRY_CAP);
        crate::http::jittered(pause, 0.5, 1.0)
    }

    fn reset(&mut self) {
        self.next = RETRY_FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Watches that fail together (an API server restarting) must not all retry in step, nor
    /// wait longer than the cap.
    #[test]
    fn watch_retries_double_to_their_cap_and_are_spread() {
        let mut b = Backoff::default();
        let pauses: Vec<Duration> = (0..12).map(|_| b.next_pause()).collect();
        let mut nominal = RETRY_FIRST;
        for p in &pauses {
            assert!(*p >= nominal / 2 && *p <= nominal, "{p:?} against {nominal:?}");
            nominal = (nominal * 2).min(RETRY_CAP);
        }
        let firsts: Vec<Duration> = (0..50).map(|_| Backoff::default().next_pause()).collect();
        assert!(firsts.iter().any(|p| *p != firsts[0]), "no jitter: {firsts:?}");
        b.reset();
        assert!(b.next_pause() <= RETRY_FIRST);
    }
}
