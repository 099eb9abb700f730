//! The Kubernetes source: kube-rs reflectors for the three resources, and one name-scoped watch
//! per Secret the configuration names (never a cluster-wide Secret list). Two features need
//! wider watches, in their own namespace only: `agentAuth.apiKeys` (Secrets labelled
//! `keyswap.dev/agent-token=true`) and `credentialSelector.byTenant.secretNameTemplate` (every
//! Secret of the policy's namespace: the template names them by pattern).
//!
//! Every change rebuilds the whole snapshot from the in-memory caches; an invalid result is
//! logged and the last good snapshot keeps serving. Watch errors (dropped connections, an
//! unreachable API server) are retried on a short bounded backoff (at most [`RETRY_CAP`] apart,
//! reset on success) while the caches, and so the snapshot, stay as they were; an expired
//! resourceVersion (410 Gone) is not a failure: the watch relists at once.
//!
//! This file holds the source's loop (watch, settle, follow the Secrets named, rebuild, publish);
//! `kube/conditions.rs` the objects' status conditions; `kube/watch.rs` one watch: its retries,
//! backoff and failure causes.

mod ca;
mod conditions;
mod secrets;
mod watch;

pub use ca::watch_ca_secret;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, Resource as _, ResourceExt as _};
use secrecy::SecretSlice;
use tokio::sync::Notify;

#[cfg(test)]
use self::conditions::route_unresolved;
use self::conditions::{conditions, write_conditions, Verdict};
use self::secrets::{tenant_secrets, wanted_secrets, SecretWatch};
use self::watch::{watch, watch_noting_deletions, Watched};
use super::error::Origin;
use super::load::{Key, Object, Resource, SecretData, DEFAULT_NAMESPACE};
use super::{log_changes, Catalog, GatewaySelector, SnapshotStore};
use crate::api::{AIProviderRoute, CredentialInjectionPolicy, EgressGateway, TokenBudget};

/// How long the caches must be quiet before a rebuild: coalesces a burst (an initial list,
/// `kubectl apply -f dir/`) into one snapshot, far below the 1 s rotation budget.
const SETTLE: Duration = Duration::from_millis(30);

/// The first pause after a watch failure; it doubles on each further failure up to [`RETRY_CAP`]
/// (with jitter, so the watches of one process do not retry in step) and resets on success.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between two attempts of a failing watch: once the API server answers again,
/// every watch is back (and a relist done) within about this long.
const RETRY_CAP: Duration = Duration::from_secs(1);
/// A failing watch that, retried, raises no error for this long is taken as connected again (a
/// resumed watch with nothing new to report sends no event). Longer than the client's connect
/// timeout (4 s, set in `cli`), so a connection attempt hanging on an unreachable API server fails
/// first.
const QUIET: Duration = Duration::from_secs(5);

/// How long a rebuild waits for Secret watches' initial lists before it goes on without those
/// still missing, their Secrets counted as not found: a namespace whose Secrets keyswap may not
/// read (RBAC), or a watch the API server keeps failing, would otherwise hold every change for
/// every route (and, at start, keep keyswap from serving at all). Counted from the first rebuild
/// that waited, so new watches that never list (a policy renamed again and again) cannot hold
/// rebuilds longer. Once a list arrives its Secrets are used at once.
pub(crate) const SECRET_SYNC_GRACE: Duration = Duration::from_secs(10);

/// What `/readyz` and the metrics report about the Kubernetes source.
#[derive(Debug, Default)]
pub struct KubeStatus {
    /// Initial lists done and a first snapshot built.
    pub synced: AtomicBool,
    /// Watch failures (each retry of a failing watch counts once). Not an expired
    /// resourceVersion (410 Gone): that is a relist, counted in `relists`.
    pub watch_errors: AtomicU64,
    /// Watches failing now (their last attempt failed and nothing succeeded since).
    pub watches_failing: AtomicU64,
    /// Relists after an expired resourceVersion (410 Gone).
    pub relists: AtomicU64,
    /// Secrets held (watched and cached) at the last rebuild: those the configuration names, the
    /// agent tokens, and those a tenant template names.
    pub secrets_watched: AtomicU64,
    pub rebuilds: AtomicU64,
    /// The latest watch failure (shown while `watches_failing` is not 0).
    pub last_error: Mutex<Option<String>>,
    /// Invalid objects left out of the snapshot in effect.
    pub rejected: AtomicU64,
}

impl KubeStatus {
    /// The Kubernetes source's families.
    pub fn render(&self, p: &mut dyn crate::prom::Families) {
        use crate::prom::Kind::{Counter, Gauge};
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let failing = g(&self.watches_failing);
        p.single(
            "keyswap_kube_watch_errors_total",
            "Kubernetes watch errors (retried with backoff).",
            Counter,
            g(&self.watch_errors),
        );
        p.single(
            "keyswap_kube_watches_failing",
            "Kubernetes watches failing now (retried at most 1 s apart).",
            Gauge,
            failing,
        );
        p.single(
            "keyswap_kube_relists_total",
            "Relists after an expired resourceVersion (410 Gone).",
            Counter,
            g(&self.relists),
        );
        p.single(
            "keyswap_kube_secrets_watched",
            "Secrets held in keyswap's caches: those the configuration names, agent tokens, and tenant templates' Secrets.",
            Gauge,
            g(&self.secrets_watched),
        );
        p.single(
            "keyswap_kube_api_reachable",
            "Whether every Kubernetes watch is connected (none failing).",
            Gauge,
            f64::from(u8::from(failing == 0.0)),
        );
    }

    pub fn detail(&self) -> String {
        let failing = self.watches_failing.load(Ordering::Relaxed);
        let err = match failing {
            0 => None,
            _ => Some(self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default()),
        };
        match (self.synced.load(Ordering::Relaxed), err) {
            (false, None) => "waiting for the initial sync with the Kubernetes API".into(),
            (false, Some(e)) => format!("waiting for the initial sync; last watch error: {e}"),
            (true, None) => "synced with the Kubernetes API".into(),
            (true, Some(e)) => format!(
                "Kubernetes API watch failing ({failing} failing; last error: {e}); serving the last good configuration"
            ),
        }
    }

    fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
    }
}

/// Converts a Kubernetes Secret into keyswap's form. Values are checked where a policy uses them.
pub fn secret_data(secret: &Secret) -> SecretData {
    let mut out = SecretData { labels: secret.labels().clone(), ..SecretData::default() };
    let data = secret.data.iter().flatten().map(|(k, v)| (k, v.0.clone()));
    let string_data = secret.string_data.iter().flatten().map(|(k, v)| (k, v.clone().into_bytes()));
    for (k, bytes) in data.chain(string_data) {
        out.entries.insert(k.clone(), SecretSlice::from(bytes));
    }
    out
}

/// Runs the Kubernetes source. Returns the store once the initial sync produced a valid
/// snapshot; keeps it current in the background.
pub async fn start(
    client: Client,
    namespace: Option<String>,
    selector: GatewaySelector,
    status: Arc<KubeStatus>,
    write_status: bool,
) -> anyhow::Result<SnapshotStore> {
    let changed = Arc::new(Notify::new());
    let (gateways, routes, policies, budgets) = watch_resources(&client, namespace.as_deref(), &changed, &status);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<SnapshotStore>();
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    progress.tick().await;
    let source = Source {
        client,
        selector,
        status,
        write_status,
        changed,
        gateways,
        routes,
        policies,
        budgets,
        secrets: HashMap::new(),
        deleted: Default::default(),
        store: None,
        ready_tx: Some(ready_tx),
        written: HashMap::new(),
        held_since: None,
    };
    tokio::spawn(source.run(progress));
    ready_rx.await.map_err(|_| anyhow::anyhow!("the Kubernetes source stopped before the initial sync"))
}

/// The watched keyswap resources.
type Watches =
    (Watched<EgressGateway>, Watched<AIProviderRoute>, Watched<CredentialInjectionPolicy>, Watched<TokenBudget>);

/// Watches keyswap's four resources, in `namespace` or in all namespaces.
fn watch_resources(
    client: &Client,
    namespace: Option<&str>,
    changed: &Arc<Notify>,
    status: &Arc<KubeStatus>,
) -> Watches {
    fn api<K>(c: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(c.clone(), ns),
            None => Api::all(c.clone()),
        }
    }
    let cfg = watcher::Config::default;
    let gateways = watch(api(client, namespace), cfg(), changed.clone(), status.clone());
    let routes = watch(api(client, namespace), cfg(), changed.clone(), status.clone());
    let policies = watch(api(client, namespace), cfg(), changed.clone(), status.clone());
    let budgets = watch(api(client, namespace), cfg(), changed.clone(), status.clone());
    (gateways, routes, policies, budgets)
}

/// The background loop of the Kubernetes source: its watches, and the store once built.
struct Source {
    client: Client,
    selector: GatewaySelector,
    status: Arc<KubeStatus>,
    /// Write `status.conditions` on routes and policies.
    write_status: bool,
    /// Poked by every watch event.
    changed: Arc<Notify>,
    gateways: Watched<EgressGateway>,
    routes: Watched<AIProviderRoute>,
    policies: Watched<CredentialInjectionPolicy>,
    budgets: Watched<TokenBudget>,
    secrets: HashMap<SecretWatch, Watched<Secret>>,
    /// Secrets the watches saw deleted.
    deleted: Arc<Deleted>,
    store: Option<SnapshotStore>,
    /// Hands the store to [`start`] once the first snapshot is built.
    ready_tx: Option<tokio::sync::oneshot::Sender<SnapshotStore>>,
    /// The conditions last written on each object.
    written: HashMap<conditions::StatusId, Verdict>,
    /// Since when a rebuild has waited for Secret watches' initial lists.
    held_since: Option<std::time::Instant>,
}

impl Source {
    /// On each change, once the caches are quiet and synced: follow the Secrets the configuration
    /// names, then rebuild. Until the first sync, `progress` logs what it waits for.
    async fn run(mut self, mut progress: tokio::time::Interval) {
        loop {
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = progress.tick() => {
                    if !self.status.synced.load(Ordering::Relaxed) {
                        tracing::info!(status = %self.status.detail(), "waiting for the Kubernetes caches");
                    }
                    if self.held_since.is_none_or(|t| t.elapsed() < SECRET_SYNC_GRACE) {
                        continue;
                    }
                }
            }
            tokio::time::sleep(SETTLE).await;
            if !self.resources_synced() {
                continue;
            }
            self.watch_wanted_secrets();
            if self.secrets_pending() {
                continue;
            }
            self.rebuild().await;
        }
    }

    /// Whether the rebuild waits for a Secret watch's initial list: for [`SECRET_SYNC_GRACE`]
    /// from the first rebuild that waited. Past it, each watch still without its list is marked
    /// overdue (logged once) and rebuilds go on without it; one started under a second ago (a
    /// policy that just changed its Secret) is waited for a second longer at most.
    fn secrets_pending(&mut self) -> bool {
        if !self.secrets.values().any(|w| !w.is_synced() && !w.overdue) {
            self.held_since = None;
            return false;
        }
        let since = *self.held_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() < SECRET_SYNC_GRACE {
            return true;
        }
        let late = since.elapsed() >= SECRET_SYNC_GRACE + Duration::from_secs(1);
        let due = |w: &Watched<Secret>| {
            !w.is_synced() && !w.overdue && (late || w.started.elapsed() >= Duration::from_secs(1))
        };
        for (k, w) in self.secrets.iter_mut().filter(|(_, w)| due(w)) {
            w.overdue = true;
            tracing::error!(
                secrets = %k, waited = ?since.elapsed(), status = %self.status.detail(),
                "a Secret watch has not listed; going on without it (what needs those Secrets fails closed until it lists)"
            );
        }
        // Watches started under a second ago are waited for until they are a second old.
        if self.secrets.values().any(|w| !w.is_synced() && !w.overdue) {
            return true;
        }
        self.held_since = None;
        false
    }

    /// Namespaces whose Secrets keyswap went on without (their watch never listed).
    fn unlisted_namespaces(&self) -> std::collections::BTreeSet<String> {
        let unlisted = self.secrets.iter().filter(|(_, w)| w.overdue && !w.is_synced());
        unlisted
            .filter_map(|(k, _)| match k {
                SecretWatch::Namespace(ns, _) => Some(ns.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether the initial lists of the four resources are done.
    fn resources_synced(&self) -> bool {
        self.gateways.synced.load(Ordering::Relaxed)
            && self.routes.synced.load(Ordering::Relaxed)
            && self.policies.synced.load(Ordering::Relaxed)
            && self.budgets.synced.load(Ordering::Relaxed)
    }

    /// Watch exactly the Secrets the configuration names, each in its object's namespace: stops
    /// the watches no longer wanted, starts the new ones.
    fn watch_wanted_secrets(&mut self) {
        let wanted = wanted_secrets(&self.gateways.store, &self.policies.store);
        self.secrets.retain(|k, w| {
            let keep = wanted.contains(k);
            if !keep {
                w.task.abort();
                tracing::debug!(secret = %k, "no longer referenced; stopped watching");
            }
            keep
        });
        for k in &wanted {
            if !self.secrets.contains_key(k) {
                let mut keep: Option<watch::Keep<Secret>> = None;
                let (ns, cfg) = match k {
                    SecretWatch::Named(k) => {
                        (&k.namespace, watcher::Config::default().fields(&format!("metadata.name={}", k.name)))
                    }
                    SecretWatch::AgentTokens(ns) => {
                        (ns, watcher::Config::default().labels(&format!("{}=true", crate::auth::API_KEY_LABEL)))
                    }
                    SecretWatch::Namespace(ns, templates) => {
                        keep = Some(tenant_secrets(templates.clone()));
                        (ns, watcher::Config::default())
                    }
                };
                let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
                let (changed, status, deleted) = (self.changed.clone(), self.status.clone(), self.deleted.clone());
                let watched = watch_noting_deletions(api, cfg, changed, status, Some(deleted), keep);
                self.secrets.insert(k.clone(), watched);
            }
        }
    }

    /// Builds a snapshot from the caches and publishes it, then writes the objects' conditions
    /// when asked to.
    async fn rebuild(&mut self) {
        let objects = collect(&self.gateways.store, &self.routes.store, &self.policies.store, &self.budgets.store).map(
            |mut objects| {
                let secrets = secret_objects(&self.secrets, &self.deleted);
                self.status.secrets_watched.store(secrets.len() as u64, Ordering::Relaxed);
                objects.extend(secrets);
                objects
            },
        );
        // One team's invalid object is left out (Accepted=False on it); everything else,
        // every Secret it references included, keeps following changes.
        let unlisted = self.unlisted_namespaces();
        let built = objects.and_then(|objs| {
            let mut catalog = Catalog::build_isolated(objs);
            catalog.unlisted = unlisted;
            let key = self.selector.resolve(&catalog).map_err(|e| catalog.with_rejected(e))?;
            catalog.compile_isolated(&key).map_err(|e| catalog.with_rejected(e))
        });
        if let Ok(snap) = &built {
            super::log_rejected(snap);
            self.status.rejected.store(snap.rejected.len() as u64, Ordering::Relaxed);
        }
        self.status.rebuilds.fetch_add(1, Ordering::Relaxed);
        // A configuration that did not compile is said on this gateway's objects too: the one
        // named, or the one of the last good configuration.
        let gateway = match (&built, &self.selector) {
            (Ok(snap), _) => Some(snap.gateway.clone()),
            (Err(_), GatewaySelector::Named(k)) => Some(k.clone()),
            (Err(_), GatewaySelector::Only) => self.store.as_ref().map(|s| s.load().gateway.clone()),
        };
        let verdicts =
            self.write_status.then(|| conditions(&built, gateway.as_ref(), &self.routes.store, &self.policies.store));
        self.publish(built);
        if let Some(v) = verdicts {
            write_conditions(&self.client, v, &mut self.written).await;
        }
    }

    /// Swaps a new snapshot in (the first one creates the store and ends [`start`]'s wait), or
    /// logs why the last good one keeps serving.
    fn publish(&mut self, built: Result<super::Snapshot, super::ConfigErrors>) {
        match (built, &self.store) {
            (Ok(snap), None) => {
                log_changes(None, &snap);
                let s = Arc::new(ArcSwap::from_pointee(snap));
                self.store = Some(s.clone());
                self.status.synced.store(true, Ordering::Relaxed);
                if let Some(tx) = self.ready_tx.take() {
                    let _ = tx.send(s);
                }
            }
            (Ok(snap), Some(s)) => {
                log_changes(Some(&s.load()), &snap);
                s.store(Arc::new(snap));
            }
            (Err(errors), _) => {
                for e in &errors.0 {
                    tracing::error!(error = %e, "configuration rejected; the last good configuration keeps serving");
                }
            }
        }
    }
}

fn origin() -> Origin {
    Origin { file: PathBuf::from("kubernetes"), document: 1 }
}

fn collect(
    gateways: &Store<EgressGateway>,
    routes: &Store<AIProviderRoute>,
    policies: &Store<CredentialInjectionPolicy>,
    budgets: &Store<TokenBudget>,
) -> Result<Vec<Object>, super::ConfigErrors> {
    let key = object_key;
    let mut objects = Vec::new();
    for g in gateways.state() {
        objects.push(Object { origin: origin(), key: key(g.meta()), resource: Resource::Gateway(g.spec.clone()) });
    }
    for r in routes.state() {
        objects.push(Object { origin: origin(), key: key(r.meta()), resource: Resource::Route(r.spec.clone()) });
    }
    for p in policies.state() {
        objects.push(Object { origin: origin(), key: key(p.meta()), resource: Resource::Policy(p.spec.clone()) });
    }
    for b in budgets.state() {
        objects.push(Object { origin: origin(), key: key(b.meta()), resource: Resource::Budget(b.spec.clone()) });
    }
    Ok(objects)
}

/// The Secrets the watches hold, one copy of each ([`newest_secrets`]).
fn secret_objects(secrets: &HashMap<SecretWatch, Watched<Secret>>, deleted: &Deleted) -> Vec<Object> {
    let newest = newest_secrets(secrets.values().map(|w| w.store.state()), deleted);
    newest
        .into_iter()
        .map(|(k, s)| Object { origin: origin(), key: k, resource: Resource::Secret(secret_data(&s)) })
        .collect()
}

/// An etcd revision as a `resourceVersion`: a decimal number, compared as such (by length,
/// then digits).
type Version = (usize, String);

fn version(m: &kube::core::ObjectMeta) -> Version {
    let v = m.resource_version.as_deref().unwrap_or("");
    (v.len(), v.to_owned())
}

/// How long a deletion is remembered: longer than a watch lags behind another in practice.
const DELETIONS_KEPT: std::time::Duration = std::time::Duration::from_secs(600);

/// Secrets a watch saw deleted, at the `resourceVersion` of their deletion. Another watch that
/// holds the Secret too (the house key is watched by name and by its namespace's watch) and lags
/// behind still has a copy from before: without this, the deleted Secret (a revoked agent token,
/// a withdrawn key) stayed in effect until that watch caught up, or for as long as it failed.
#[derive(Default)]
/// Each with whether the copy at that version is buried too (`true`: the version a watch last saw
/// before its relist no longer held the Secret; the deletion's own is later).
pub(super) struct Deleted(std::sync::Mutex<HashMap<Key, (Version, bool, std::time::Instant)>>);

impl Deleted {
    /// `m` deleted at its version (a Delete event), or gone after its version (`with_it`: a
    /// relist that no longer holds it).
    pub(super) fn bury(&self, m: &kube::core::ObjectMeta, with_it: bool) {
        let mut d = self.0.lock().unwrap_or_else(|e| e.into_inner());
        d.retain(|_, (_, _, at)| at.elapsed() < DELETIONS_KEPT);
        let v = version(m);
        let e = d.entry(object_key(m)).or_insert_with(|| (v.clone(), with_it, std::time::Instant::now()));
        if v > e.0 || (v == e.0 && with_it && !e.1) {
            *e = (v, with_it, std::time::Instant::now());
        }
    }

    /// Whether `m` is a copy from before its Secret's deletion. (A copy at the deletion's own
    /// version is the Secret as it left a label selector's watch, not deleted: it still counts.)
    fn buries(&self, m: &kube::core::ObjectMeta) -> bool {
        let d = self.0.lock().unwrap_or_else(|e| e.into_inner());
        d.get(&object_key(m)).is_some_and(|(v, with_it, _)| version(m) < *v || (*with_it && version(m) == *v))
    }
}

/// The key of an object the API server sent (its namespace, `default` when it has none).
pub(super) fn object_key(m: &kube::core::ObjectMeta) -> Key {
    Key::new(m.namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.into()), m.name.clone().unwrap_or_default())
}

/// One copy of each Secret from watches that overlap (the house key is watched by name and by
/// its namespace's watch when a policy templates tenants' Secrets there): the newest by
/// `resourceVersion`, whatever order the watches come in. A watch that lags (relisting after an
/// outage) could otherwise put an old key back over a rotation, or keep a deleted Secret.
fn newest_secrets(watches: impl Iterator<Item = Vec<Arc<Secret>>>, deleted: &Deleted) -> BTreeMap<Key, Arc<Secret>> {
    let key = object_key;
    let version = |s: &Secret| version(&s.metadata);
    let mut by_key: BTreeMap<Key, Arc<Secret>> = BTreeMap::new();
    for s in watches.flatten().filter(|s| !deleted.buries(&s.metadata)) {
        match by_key.entry(key(s.meta())) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(s);
            }
            std::collections::btree_map::Entry::Occupied(mut e) => {
                if version(&s) > version(e.get()) {
                    e.insert(s);
                }
            }
        }
    }
    by_key
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two watches hold one Secret: the one that lags (relisting after an outage) has the key
    /// before its rotation. Whichever order the watches come in, the rotated key is taken.
    #[test]
    fn a_lagging_watch_never_puts_an_old_key_back_over_a_rotation() {
        let secret = |rv: &str, value: &str| {
            let mut s = Secret::default();
            s.metadata.name = Some("anthropic".into());
            s.metadata.namespace = Some("egress".into());
            s.metadata.resource_version = Some(rv.into());
            s.string_data = Some([("token".to_owned(), value.to_owned())].into());
            Arc::new(s)
        };
        let (old, new) = (secret("998", "sk-old"), secret("1002", "sk-new"));
        for watches in [vec![vec![old.clone()], vec![new.clone()]], vec![vec![new.clone()], vec![old.clone()]]] {
            let merged = newest_secrets(watches.into_iter(), &Deleted::default());
            let got = &merged[&Key::new("egress", "anthropic")];
            assert_eq!(got.metadata.resource_version.as_deref(), Some("1002"));
        }
    }

    /// The attack on revocation: an agent token Secret (or a key) is deleted; the watch that sees
    /// it by name drops it, but the namespace's watch (which holds it too, for a policy's tenant
    /// template) lags, or is failing and backing off, and still has its copy: the revoked token
    /// kept admitting until that watch caught up. A copy from before the deletion no longer
    /// counts; a Secret created again afterwards does, and so does the copy of a Secret that only
    /// left a label selector's watch (its label removed: the same version, not deleted).
    #[test]
    fn a_lagging_watch_never_keeps_a_deleted_secret() {
        let secret = |rv: &str| {
            let mut s = Secret::default();
            s.metadata.name = Some("agent-token-builder".into());
            s.metadata.namespace = Some("agents".into());
            s.metadata.resource_version = Some(rv.into());
            Arc::new(s)
        };
        let key = Key::new("agents", "agent-token-builder");
        let deleted = Deleted::default();
        let lagging = vec![vec![secret("998")], Vec::new()];
        assert!(newest_secrets(lagging.clone().into_iter(), &deleted).contains_key(&key), "not deleted yet");
        deleted.bury(&secret("1003").metadata, false);
        assert!(!newest_secrets(lagging.into_iter(), &deleted).contains_key(&key), "the stale copy is gone");
        let recreated = vec![vec![secret("998")], vec![secret("1010")]];
        let merged = newest_secrets(recreated.into_iter(), &deleted);
        assert_eq!(merged[&key].metadata.resource_version.as_deref(), Some("1010"));
        // Left the label watch at 1003 (its label removed), still held by the namespace's watch.
        let unlabelled = vec![vec![secret("1003")]];
        assert!(newest_secrets(unlabelled.into_iter(), &deleted).contains_key(&key));
        // Versions compare as numbers: 10000 is after 9999.
        deleted.bury(&secret("9999").metadata, false);
        assert!(newest_secrets(vec![vec![secret("10000")]].into_iter(), &deleted).contains_key(&key));
    }

    /// The same attack when the watch that held the Secret was away at its deletion (an outage, a
    /// compaction): its relist simply no longer holds it, and kube-runtime sends no Delete. The
    /// relist is compared with what the watch held: the copy it last saw, and older ones, no longer
    /// count in the lagging watch; a newer copy (the Secret relabelled, or created again) does.
    #[test]
    fn a_secret_deleted_while_its_watch_was_away_is_buried_when_it_relists() {
        let secret = |name: &str, rv: &str| {
            let mut s = Secret::default();
            s.metadata.name = Some(name.into());
            s.metadata.namespace = Some("agents".into());
            s.metadata.resource_version = Some(rv.into());
            Arc::new(s)
        };
        let key = Key::new("agents", "agent-token-builder");
        let deleted = Deleted::default();
        let held = [secret("agent-token-builder", "1003"), secret("agent-token-other", "1004")];
        watch::bury_missing(&held, &[secret("agent-token-other", "1004")], &deleted);
        let lagging = vec![vec![secret("agent-token-builder", "1003"), secret("agent-token-other", "1004")]];
        let merged = newest_secrets(lagging.into_iter(), &deleted);
        assert!(!merged.contains_key(&key), "the revoked token's stale copy still counts");
        assert!(merged.contains_key(&Key::new("agents", "agent-token-other")), "a Secret the relist holds");
        let newer = vec![vec![secret("agent-token-builder", "1010")]];
        assert!(newest_secrets(newer.into_iter(), &deleted).contains_key(&key), "created again, or relabelled");
        // A Delete event at 1003 seen later does not unbury the copy at 1003.
        deleted.bury(&secret("agent-token-builder", "1003").metadata, false);
        let lagging = vec![vec![secret("agent-token-builder", "1003")]];
        assert!(!newest_secrets(lagging.into_iter(), &deleted).contains_key(&key));
    }

    fn store_of<K>(objects: Vec<K>) -> Store<K>
    where
        K: kube::Resource + Clone,
        K::DynamicType: std::hash::Hash + Eq + Clone + Default,
    {
        let (store, mut writer) = kube::runtime::reflector::store();
        for o in objects {
            writer.apply_watcher_event(&watcher::Event::Apply(o));
        }
        store
    }

    fn policy(name: &str, secret: &str) -> CredentialInjectionPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyswap.dev/v1alpha1", "kind": "CredentialInjectionPolicy",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {"parentRefs": [{"name": "r"}], "secretRef": {"name": secret}, "target": "Header"},
        }))
        .unwrap()
    }

    /// A route's `ResolvedRefs` follows the keys its requests need: a per-tenant policy that never
    /// falls back needs no house key; a tenant whose key is missing is named.
    #[test]
    fn a_route_is_unresolved_only_by_a_key_its_requests_need() {
        let text = |fallback: &str, by_tenant: &str| {
            format!(
                "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec: {{}}\n---\n\
                 apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: r}}\nspec: {{parentRefs: [{{name: egress}}], rules: [{{matches: [{{provider: anthropic}}]}}]}}\n---\n\
                 apiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {{name: p}}\nspec: {{parentRefs: [{{name: r}}], secretRef: {{name: house}}, target: Header, \
                 credentialSelector: {{byTenant: {{{by_tenant}}}, fallback: {fallback}}}}}\n---\n\
                 apiVersion: v1\nkind: Secret\nmetadata: {{name: acme}}\nstringData: {{token: sk-acme}}\n"
            )
        };
        let listed = |fallback: &str, by_tenant: &str, unlisted: bool| {
            let (objs, errs) =
                crate::config::load::parse_file(std::path::Path::new("t.yaml"), &text(fallback, by_tenant));
            assert!(errs.is_empty(), "{errs:?}");
            let mut catalog = Catalog::build(objs).unwrap();
            if unlisted {
                catalog.unlisted.insert("default".into());
            }
            let snap = catalog.compile(&Key::new("default", "egress")).unwrap();
            route_unresolved(&snap.routes.entries[0].binding).map(|(u, who)| format!("{who}{}", u.reason()))
        };
        let verdict = |fallback: &str, tenants: &str| listed(fallback, &format!("tenants: {{{tenants}}}"), false);
        let acme = "acme: {secretRef: {name: acme}}";
        assert_eq!(verdict("Deny", acme), None, "the house key is never used");
        // A template's tenants, when their namespace's Secrets could not be listed: unresolved.
        let templated = |t: &str, f: &str, u: bool| {
            listed(f, &format!("tenants: {{{t}}}, secretNameTemplate: '{{tenant}}-key'"), u)
        };
        assert_eq!(templated(acme, "Deny", false), None);
        assert_eq!(templated(acme, "Deny", true).as_deref(), Some("tenants' keys could not be listed: SecretNotFound"));
        assert_eq!(verdict("Default", acme).as_deref(), Some("SecretNotFound"));
        let gone = format!("{acme}, globex: {{secretRef: {{name: gone}}}}");
        assert_eq!(verdict("Deny", &gone).as_deref(), Some("tenant globex: SecretNotFound"));
    }

    /// The attack: a policy naming the Secret `x,y` (or `A`, or `../x`). Its field selector is one
    /// the API server refuses, so the watch would never sync, and keyswap rebuilds only once every
    /// Secret watch has: rotations, revocations and route removals froze for every namespace.
    #[test]
    fn a_secret_name_no_object_can_have_is_never_watched_so_it_cannot_hold_every_rebuild() {
        let policies =
            ["x,y", "Upper", "../x", "a b", "fine"].iter().enumerate().map(|(i, s)| policy(&format!("p{i}"), s));
        let wanted = wanted_secrets(&store_of(Vec::new()), &store_of(policies.collect()));
        assert_eq!(wanted.into_iter().collect::<Vec<_>>(), vec![SecretWatch::Named(Key::new("team", "fine"))]);
    }
}
