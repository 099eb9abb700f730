//! The status conditions keyswap writes on routes and policies (`--write-status`): `Accepted`
//! and `ResolvedRefs`, from the latest build, patched only when they change.

use std::collections::HashMap;

use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource as _};

use crate::api::{AIProviderRoute, CredentialInjectionPolicy};
use crate::config::load::Key;

/// One condition as keyswap computes it: (type, status, reason, message).
pub(super) type Verdict = Vec<(String, String, String, String)>;

/// Which object a verdict is for: its resource, key, and uid (an object deleted and made again
/// under its name is another object, and gets its status written).
pub(super) type StatusId = (&'static str, Key, String);

/// `Accepted` and `ResolvedRefs` for the routes attached to `gateway` (whose parentRefs name it)
/// and the policies that bind them (or it), from the latest build. The routes and policies of
/// other gateways are another keyswap's to write: two deployments would overwrite each other.
pub(super) fn conditions(
    built: &Result<crate::config::Snapshot, crate::config::ConfigErrors>,
    gateway: Option<&Key>,
    routes: &Store<AIProviderRoute>,
    policies: &Store<CredentialInjectionPolicy>,
) -> Vec<(StatusId, Verdict)> {
    use crate::config::compile::named_parents;
    use crate::config::load::Kind;
    let key = super::object_key;
    let uid = |m: &kube::api::ObjectMeta| m.uid.clone().unwrap_or_default();
    let Some(gateway) = gateway else { return Vec::new() };
    let names_gateway = |r: &AIProviderRoute, k: &Key| {
        named_parents(&r.spec.parent_refs, k, Kind::EgressGateway)
            .any(|(kind, g)| kind == Kind::EgressGateway && g == *gateway)
    };
    let attached: std::collections::HashSet<Key> = routes
        .state()
        .iter()
        .map(|r| (r, key(r.meta())))
        .filter(|(r, k)| names_gateway(r, k))
        .map(|(_, k)| k)
        .collect();
    let errors_for = |label: String| -> Option<String> {
        let errs = match built {
            Err(errs) => &errs.0,
            Ok(snap) => &snap.rejected,
        };
        let mine: Vec<String> =
            errs.iter().filter(|e| e.object.as_deref() == Some(label.as_str())).map(|e| e.to_string()).collect();
        (!mine.is_empty()).then(|| mine.join("; "))
    };
    let cond = |t: &str, ok: bool, reason: &str, msg: String| {
        (t.to_owned(), if ok { "True" } else { "False" }.to_owned(), reason.to_owned(), msg)
    };
    let accepted = |label: String| match errors_for(label) {
        Some(m) => cond("Accepted", false, "Invalid", m),
        None => cond("Accepted", true, "Accepted", String::new()),
    };
    let mut out = Vec::new();
    for r in routes.state() {
        let k = key(r.meta());
        if !attached.contains(&k) {
            continue;
        }
        let accepted = accepted(format!("AIProviderRoute {k}"));
        // Whether its requests get a key: a route attached without any policy (one another
        // namespace attaches gets no catch-all) answers 503, which its status should say.
        let name = k.to_string();
        let unresolved = built.as_ref().ok().and_then(|snap| {
            let mine = snap.routes.entries.iter().filter(|e| *e.route == *name);
            mine.filter_map(|e| route_unresolved(&e.binding)).next()
        });
        let resolved = match (unresolved, built) {
            (Some((u, who)), _) => cond("ResolvedRefs", false, u.reason(), format!("{who}{u}")),
            (None, Err(_)) => cond("ResolvedRefs", false, "Invalid", "the configuration did not compile".into()),
            (None, Ok(_)) => cond("ResolvedRefs", true, "ResolvedRefs", String::new()),
        };
        out.push((("aiproviderroutes", k, uid(r.meta())), vec![accepted, resolved]));
    }
    for p in policies.state() {
        let k = key(p.meta());
        let binds_ours = named_parents(&p.spec.parent_refs, &k, Kind::AIProviderRoute).any(|(kind, t)| match kind {
            Kind::EgressGateway => t == *gateway,
            _ => attached.contains(&t),
        });
        if !binds_ours {
            continue;
        }
        let accepted = accepted(format!("CredentialInjectionPolicy {k}"));
        let name = k.to_string();
        let resolved = match built {
            Ok(snap) => {
                let unresolved = snap
                    .routes
                    .entries
                    .iter()
                    .filter(|e| e.binding.policy.as_deref() == Some(name.as_str()))
                    .find_map(|e| e.binding.credential.as_ref().err().map(|u| (u, "")).or(unlisted(&e.binding)));
                match unresolved {
                    Some((u, who)) => cond("ResolvedRefs", false, u.reason(), format!("{who}{u}")),
                    None => cond("ResolvedRefs", true, "ResolvedRefs", String::new()),
                }
            }
            Err(_) => cond("ResolvedRefs", false, "Invalid", "the configuration did not compile".into()),
        };
        out.push((("credentialinjectionpolicies", k, uid(p.meta())), vec![accepted, resolved]));
    }
    out
}

/// A key of `binding` that requests would need and cannot get, and whose it is (`tenant X: `):
/// the policy's own (unless only tenants' keys are used: `fallback: Deny`), then the tenants'
/// when their namespace's Secrets could not be listed, then each tenant's.
pub(super) fn route_unresolved(
    binding: &crate::config::snapshot::Binding,
) -> Option<(&crate::config::Unresolved, String)> {
    let own_used = binding.tenants.as_ref().is_none_or(|t| t.fallback == crate::api::TenantFallback::Default);
    if let (true, Err(u)) = (own_used, &binding.credential) {
        return Some((u, String::new()));
    }
    if let Some((u, who)) = unlisted(binding) {
        return Some((u, who.to_owned()));
    }
    let tenants = binding.tenants.iter().flat_map(|t| &t.by_tenant);
    let mut bad: Vec<_> = tenants.filter_map(|(name, c)| c.as_ref().err().map(|u| (name, u))).collect();
    bad.sort_by(|a, b| a.0.cmp(b.0));
    bad.first().map(|(name, u)| (*u, format!("tenant {name}: ")))
}

/// The tenants' keys of `binding` when their namespace's Secrets could not be listed, and whose.
fn unlisted(binding: &crate::config::snapshot::Binding) -> Option<(&crate::config::Unresolved, &'static str)> {
    let unlisted = binding.tenants.as_ref().and_then(|t| t.unlisted.as_ref());
    unlisted.map(|u| (u, "tenants' keys could not be listed: "))
}

/// Patches `status.conditions` of each object whose verdict changed since keyswap last wrote it,
/// and forgets the objects no longer there (or no longer this gateway's).
pub(super) async fn write_conditions(
    client: &Client,
    verdicts: Vec<(StatusId, Verdict)>,
    written: &mut HashMap<StatusId, Verdict>,
) {
    use kube::api::{Patch, PatchParams};
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let current: std::collections::HashSet<StatusId> = verdicts.iter().map(|(id, _)| id.clone()).collect();
    written.retain(|id, _| current.contains(id));
    for (id, verdict) in verdicts {
        if written.get(&id) == Some(&verdict) {
            continue;
        }
        let conditions: Vec<serde_json::Value> = verdict
            .iter()
            .map(|(t, st, reason, msg)| serde_json::json!({"type": t, "status": st, "reason": reason, "message": msg, "lastTransitionTime": now}))
            .collect();
        let patch = Patch::Merge(serde_json::json!({"status": {"conditions": conditions}}));
        let (kind, key, _) = &id;
        let params = PatchParams::default();
        let res = match *kind {
            "aiproviderroutes" => Api::<AIProviderRoute>::namespaced(client.clone(), &key.namespace)
                .patch_status(&key.name, &params, &patch)
                .await
                .map(|_| ()),
            _ => Api::<CredentialInjectionPolicy>::namespaced(client.clone(), &key.namespace)
                .patch_status(&key.name, &params, &patch)
                .await
                .map(|_| ()),
        };
        match res {
            Ok(()) => {
                written.insert(id, verdict);
            }
            Err(e) => {
                tracing::warn!(object = %key, kind, error = %e, "cannot write status; will retry on the next change")
            }
        }
    }
}
