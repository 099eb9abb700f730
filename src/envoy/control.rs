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
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot mint the gateway leaf; keeping the current one, retrying in 10 s");
                        retry_mint_at = Some(now + MINT_RETRY);
                    }
                }
            }
            match self.xds_snapshot(&snap, minted.as_ref().map(|m| &m.leaf)) {
                Ok(x) => self.ads.publish(x),
                Err(e) => tracing::error!(
                    error = %e,
                    "cannot generate Envoy's resources for this configuration; Envoy keeps the last good ones"
                ),
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
