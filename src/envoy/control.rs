//! keyswap as its Envoy's control plane: follows the snapshot and the gateway CA, mints the leaf
//! in memory (SANs = the routed hosts) and renews it before it expires, and publishes the
//! resources to the ADS server. A configuration that cannot be turned into resources is logged
//! and the last good resources stay in Envoy.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;

use super::ads::{Ads, TypeSet, XdsSnapshot};
use super::{leaf_hosts, leaf_secret, resources, xds, Options};
use crate::certs::{Ca, CaCell, Leaf};
use crate::config::{Snapshot, SnapshotStore};

/// How often the loop looks at the snapshot, the CA and the clock: the bound on how late a
/// change reaches Envoy (plus one ADS round trip).
pub const POLL: Duration = Duration::from_millis(100);

/// How long after a failed mint the next attempt waits.
const MINT_RETRY: Duration = Duration::from_secs(10);

/// The default lifetime of a leaf (`--leaf-lifetime`).
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);

pub struct ControlPlane {
    pub ads: Ads,
    /// Resources options; `delivery` is [`super::Delivery::Ads`].
    pub options: Options,
    pub ca: CaCell,
    pub leaf_lifetime: Duration,
}

/// The current leaf and when it was minted.
struct Minted {
    leaf: Leaf,
    issued: OffsetDateTime,
    ca: Arc<Ca>,
}

impl Minted {
    /// Renewed once two thirds of its life are over: a 30 s leaf every 20 s, a day's every 16 h.
    fn due(&self, now: OffsetDateTime, lifetime: Duration) -> bool {
        now >= self.issued + lifetime.mul_f64(2.0 / 3.0)
    }
}

impl ControlPlane {
    /// Runs until dropped (abort the task).
    pub async fn run(self, store: SnapshotStore) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen: Option<(Arc<Snapshot>, Option<Arc<Ca>>)> = None;
        let mut minted: Option<Minted> = None;
        // The routed hosts of the snapshot last seen (recomputed only when it changes), and when a
        // failed mint may be tried again.
        let mut hosts: Vec<String> = Vec::new();
        let mut retry_mint_at: Option<OffsetDateTime> = None;
        // The hosts of the leaf Envoy was last given.
        let mut published: Vec<String> = Vec::new();
        loop {
            tick.tick().await;
            let snap = store.load_full();
            let ca = self.ca.load_full();
            let now = OffsetDateTime::now_utc();
            if !seen.as_ref().is_some_and(|(s, _)| Arc::ptr_eq(s, &snap)) {
                hosts = leaf_hosts(&snap).0;
            }
            let mint_reason = match (&ca, &minted) {
                _ if retry_mint_at.is_some_and(|t| now < t) => None,
                (None, _) => None,
                (Some(_), None) => Some("first leaf"),
                (Some(ca), Some(m)) if !Arc::ptr_eq(ca, &m.ca) => Some("gateway CA changed"),
                (Some(_), Some(m)) if m.leaf.hosts != hosts => Some("routed hosts changed"),
                (Some(_), Some(m)) if m.due(now, self.leaf_lifetime) => Some("renewal"),
                _ => None,
            };
            let unchanged = seen.as_ref().is_some_and(|(s, c)| {
                Arc::ptr_eq(s, &snap) && c.as_ref().map(Arc::as_ptr) == ca.as_ref().map(Arc::as_ptr)
            });
            if unchanged && mint_reason.is_none() {
                continue;
            }
            if seen.as_ref().is_some_and(|(_, c)| c.is_some()) && ca.is_none() {
                tracing::error!("the gateway CA is gone: routed hosts keep the current leaf until it expires");
            }
            seen = Some((snap.clone(), ca.clone()));
            let mut renewed = false;
            if let (Some(reason), Some(ca)) = (mint_reason, &ca) {
                match ca.mint(&hosts, now, self.leaf_lifetime) {
                    Ok(leaf) => {
                        tracing::info!(hosts = ?hosts, not_after = %leaf.not_after, ca = %ca.fingerprint(), reason, "minted the gateway leaf certificate");
                        let stats = &self.ads.stats;
                        stats.leaf_mints.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let not_after = u64::try_from(leaf.not_after.unix_timestamp()).unwrap_or(0);
                        stats.leaf_not_after.store(not_after, std::sync::atomic::Ordering::Relaxed);
                        minted = Some(Minted { leaf, issued: now, ca: ca.clone() });
                        retry_mint_at = None;
                        renewed = true;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot mint the gateway leaf; keeping the current one, retrying in 10 s");
                        retry_mint_at = Some(now + MINT_RETRY);
                    }
                }
            }
            let leaf = minted.as_ref().map(|m| &m.leaf);
            match self.xds_snapshot(&snap, leaf) {
                Ok(x) => {
                    self.ads.publish(x);
                    published = leaf.map(|l| l.hosts.clone()).unwrap_or_default();
                }
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        "cannot generate Envoy's resources for this configuration; Envoy keeps the last good ones"
                    );
                    // A leaf minted meanwhile still reaches Envoy: renewed, the last one expires.
                    let last = self.ads.current();
                    if let (true, Some(last), Some(leaf)) = (renewed, last, leaf) {
                        if let Some(x) = leaf_over(&last, leaf, &published) {
                            tracing::info!(not_after = %leaf.not_after, "published the new leaf over the last good resources");
                            self.ads.publish(x);
                        }
                    }
                }
            }
        }
    }

    /// The resources of `snap` (and the leaf) as ADS sends them.
    pub fn xds_snapshot(&self, snap: &Snapshot, leaf: Option<&Leaf>) -> Result<XdsSnapshot, String> {
        let r = resources(snap, &self.options)?;
        let mut x = XdsSnapshot::default();
        x.insert(xds::LISTENER, typed(xds::LISTENER, &r.listeners)?);
        x.insert(xds::CLUSTER, typed(xds::CLUSTER, &r.clusters)?);
        x.insert(xds::ROUTE, typed(xds::ROUTE, &r.routes)?);
        let secrets: Vec<Value> = leaf.map(leaf_secret).into_iter().collect();
        x.insert(xds::SECRET, typed(xds::SECRET, &secrets)?);
        Ok(x)
    }
}

/// `last` with `leaf` in place of its leaf, when `leaf` serves every host of the one published
/// (`published`): a renewal, or a new CA's leaf; one for other hosts waits for their resources.
fn leaf_over(last: &XdsSnapshot, leaf: &Leaf, published: &[String]) -> Option<XdsSnapshot> {
    if !published.iter().all(|h| leaf.hosts.contains(h)) {
        return None;
    }
    let secret = typed(xds::SECRET, &[leaf_secret(leaf)]).ok()?;
    let mut x = last.clone();
    x.insert(xds::SECRET, secret);
    Some(x)
}

/// Encodes named resources of one type.
fn typed(type_url: &'static str, values: &[Value]) -> Result<TypeSet, String> {
    let resources = values
        .iter()
        .map(|v| {
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            xds::to_any(type_url, v).map(|a| (name, a))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TypeSet::new(resources))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leaf renewed while the configuration's resources cannot be generated (a generator bug)
    /// was published only with them: Envoy kept the old leaf until it expired, and every routed
    /// host failed TLS. It goes out alone over the last good resources; one for other hosts waits.
    #[test]
    fn a_renewed_leaf_reaches_envoy_when_the_resources_cannot_be_generated() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        crate::certs::ensure_ca(dir.path(), &crate::config::Key::new("default", "egress"), now).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        let hosts = vec!["api.anthropic.com".to_string(), "api.openai.com".to_string()];
        let old = ca.mint(&hosts, now, Duration::from_secs(60)).unwrap();
        let mut last = XdsSnapshot::default();
        last.insert(xds::SECRET, typed(xds::SECRET, &[leaf_secret(&old)]).unwrap());
        last.insert(xds::LISTENER, TypeSet::new(Vec::new()));
        let renewed = ca.mint(&hosts, now, Duration::from_secs(3600)).unwrap();
        let x = leaf_over(&last, &renewed, &hosts).expect("the renewed leaf is published");
        let (was, is) = (last.get(xds::SECRET).unwrap(), x.get(xds::SECRET).unwrap());
        assert_ne!(was.version, is.version, "the leaf did not change");
        assert_eq!(is.names().collect::<Vec<_>>(), was.names().collect::<Vec<_>>());
        assert_eq!(x.get(xds::LISTENER).unwrap().version, last.get(xds::LISTENER).unwrap().version);
        let fewer = ca.mint(&hosts[..1], now, Duration::from_secs(3600)).unwrap();
        assert!(leaf_over(&last, &fewer, &hosts).is_none(), "a leaf without a routed host replaced the one serving it");
    }
}
