//! Configuration: resources in, validated [`Snapshot`] out.
//!
//! Sources never serve requests; they build snapshots. [`file`] reads a directory of manifests
//! (the embedded default); a bad edit is reported and the last good snapshot keeps serving.

pub mod compile;
pub mod error;
pub mod file;
pub mod kube;
pub mod load;
pub mod snapshot;

use std::sync::Arc;

use arc_swap::ArcSwap;

pub(crate) use compile::check_host;
pub use compile::{fingerprint, Catalog};
pub use error::{ConfigError, ConfigErrors, Origin};
pub use load::Key;
pub use snapshot::{Credential, Decision, Snapshot, Unresolved};

/// What `check` and the load log say of a route host pattern that is not its provider's own.
pub const FOREIGN_PATTERN: &str = "route host pattern sends the key to whatever name under it an agent asks for (Envoy checks only that the upstream's certificate names it): keep it to names the provider alone owns, or list your own resources' hosts";

/// The one place the request path reads configuration from: lock-free loads, atomic swaps.
pub type SnapshotStore = Arc<ArcSwap<Snapshot>>;

/// Which EgressGateway this process serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewaySelector {
    Named(Key),
    /// The only EgressGateway in the configuration; an error when there are none or several.
    Only,
}

impl GatewaySelector {
    pub fn resolve(&self, catalog: &Catalog) -> Result<Key, ConfigErrors> {
        let err = |m: String| Err(ConfigErrors(vec![ConfigError::new(m)]));
        match self {
            GatewaySelector::Named(k) if catalog.gateways.contains_key(k) => Ok(k.clone()),
            GatewaySelector::Named(k) => {
                let have = catalog.gateways.keys().map(|k| k.to_string()).collect::<Vec<_>>();
                err(format!("EgressGateway {k} not found (found: {})", list_or_none(&have)))
            }
            GatewaySelector::Only => match catalog.gateways.len() {
                1 => Ok(catalog.gateways.keys().next().cloned().expect("one gateway")),
                0 => err("no EgressGateway found in the configuration".into()),
                _ => {
                    let have = catalog.gateways.keys().map(|k| k.to_string()).collect::<Vec<_>>();
                    err(format!(
                        "several EgressGateways found ({}); choose one with --gateway NAMESPACE/NAME",
                        have.join(", ")
                    ))
                }
            },
        }
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// Logs every object the snapshot left out as invalid (what depended on it fails closed).
pub fn log_rejected(snap: &Snapshot) {
    for e in &snap.rejected {
        tracing::error!(error = %e, "invalid object left out; what depends on it fails closed, the rest is in effect");
    }
}

/// Logs what changed between two snapshots: which secrets rotated (by fingerprint), route counts.
pub fn log_changes(old: Option<&Snapshot>, new: &Snapshot) {
    tracing::info!(
        gateway = %new.gateway,
        default_policy = new.default_policy.as_str(),
        routes = new.routes.len(),
        secrets = new.secrets.len(),
        "configuration loaded"
    );
    for s in &new.secrets {
        let before = old.and_then(|o| o.secrets.iter().find(|p| p.secret == s.secret && p.key == s.key));
        let before_fp = before.and_then(|b| b.fingerprint.as_deref());
        match (&s.fingerprint, before_fp) {
            (Some(fp), Some(old_fp)) if fp != old_fp => {
                tracing::info!(secret = %s.secret, key = %s.key, from = old_fp, to = %fp, "secret rotated")
            }
            (None, _) => tracing::warn!(
                secret = %s.secret,
                key = %s.key,
                "credential unresolved: requests on routes that use it get 503 until it exists"
            ),
            _ => {}
        }
    }
    let before = old.map(Snapshot::allow_entries_of_routed_hosts).unwrap_or_default();
    for a in new.allow_entries_of_routed_hosts().into_iter().filter(|a| !before.contains(a)) {
        tracing::warn!(
            gateway = %new.gateway, entry = %a,
            "spec.allow entry names a routed host: a CONNECT to it is terminated and routed whatever its port, so the entry changes nothing"
        );
    }
    let before = old.map(Snapshot::foreign_host_patterns).unwrap_or_default();
    for (route, host) in new.foreign_host_patterns().into_iter().filter(|p| !before.contains(p)) {
        tracing::warn!(route, host, "{FOREIGN_PATTERN}");
    }
    // Keys that exist but cannot be used (malformed service-account JSON, …): named once each.
    let mut seen: Vec<&str> = Vec::new();
    for e in &new.routes.entries {
        let Some(policy) = e.binding.policy.as_deref() else { continue };
        if seen.contains(&policy) {
            continue;
        }
        seen.push(policy);
        if let Err(reason @ Unresolved::InvalidSecret { .. }) = &e.binding.credential {
            tracing::warn!(policy, %reason, "credential unusable: requests on routes that use it get 503 until it is fixed");
        }
        for (tenant, c) in e.binding.tenants.iter().flat_map(|t| &t.by_tenant) {
            if let Err(reason @ Unresolved::InvalidSecret { .. }) = c {
                tracing::warn!(policy, tenant = %tenant, %reason, "tenant's credential unusable: that tenant's requests get 503 until it is fixed");
            }
        }
    }
}
