//! Which Secrets keyswap watches: those the configuration names, the agent tokens of a gateway's
//! namespace, and those a tenant template names.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::Store;
use kube::Resource as _;

use super::DEFAULT_NAMESPACE;
use crate::api::{CredentialInjectionPolicy, EgressGateway};
use crate::config::load::Key;

/// One Secret watch: by name (what a policy or validator names), the labelled agent-token
/// Secrets of a gateway's namespace (`agentAuth.apiKeys`), or those of a namespace whose names
/// fit a policy's `credentialSelector.byTenant.secretNameTemplate` (each template's text before
/// and after `{tenant}`): the namespace is listed, but only those are kept, so a team's Helm
/// releases, TLS Secrets or a flood of large Secrets of its own never fill keyswap's memory nor
/// make it rebuild. A template changed is another watch.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum SecretWatch {
    Named(Key),
    AgentTokens(String),
    Namespace(String, Vec<(String, String)>),
}

/// Whether Secret `name` fits a template split at `{tenant}` (a tenant name in between).
fn fits_template(name: &str, (pre, post): &(String, String)) -> bool {
    name.len() > pre.len() + post.len() && name.starts_with(pre.as_str()) && name.ends_with(post.as_str())
}

impl std::fmt::Display for SecretWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretWatch::Named(k) => write!(f, "{k}"),
            SecretWatch::AgentTokens(ns) => write!(f, "agent tokens in {ns}"),
            SecretWatch::Namespace(ns, templates) => {
                let t: Vec<String> = templates.iter().map(|(pre, post)| format!("{pre}{{tenant}}{post}")).collect();
                write!(f, "namespace {ns}, named {}", t.join(" or "))
            }
        }
    }
}

pub(super) fn wanted_secrets(
    gateways: &Store<EgressGateway>,
    policies: &Store<CredentialInjectionPolicy>,
) -> BTreeSet<SecretWatch> {
    let ns_of = |m: &kube::core::ObjectMeta| m.namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let mut wanted = BTreeSet::new();
    let mut templates: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for p in policies.state() {
        let ns = ns_of(p.meta());
        wanted.insert(SecretWatch::Named(Key::new(ns.clone(), p.spec.secret_ref.name.clone())));
        if let Some(sel) = &p.spec.credential_selector {
            for t in sel.by_tenant.tenants.values() {
                wanted.insert(SecretWatch::Named(Key::new(ns.clone(), t.secret_ref.name.clone())));
            }
            // (A template with no fixed part is invalid, and would hold every Secret.)
            let template = sel.by_tenant.secret_name_template.as_deref().and_then(|t| t.split_once("{tenant}"));
            if let Some((pre, post)) = template.filter(|(pre, post)| !pre.is_empty() || !post.is_empty()) {
                templates.entry(ns.clone()).or_default().insert((pre.to_owned(), post.to_owned()));
            }
        }
    }
    for g in gateways.state() {
        let ns = ns_of(g.meta());
        for v in g.spec.agent_auth.iter().flat_map(|a| &a.validators) {
            if v.api_keys.is_some() {
                wanted.insert(SecretWatch::AgentTokens(ns.clone()));
            }
            if let Some(st) = &v.shared_token {
                wanted.insert(SecretWatch::Named(Key::new(ns.clone(), st.secret_ref.name.clone())));
            }
            if let Some(r) = v.jwt.as_ref().and_then(|j| j.hs256_secret_ref.as_ref()) {
                wanted.insert(SecretWatch::Named(Key::new(ns.clone(), r.name.clone())));
            }
        }
        if let Some(store) = &g.spec.budget_store {
            wanted.insert(SecretWatch::Named(Key::new(ns.clone(), store.redis.secret_ref.name.clone())));
        }
    }
    wanted.extend(templates.into_iter().map(|(ns, t)| SecretWatch::Namespace(ns, t.into_iter().collect())));
    // A name no Secret can have is never watched (the API server would refuse its field selector
    // and the watch would never sync, holding every rebuild): it resolves as not found.
    wanted.retain(|w| !matches!(w, SecretWatch::Named(k) if !crate::vocab::is_object_name(&k.name)));
    wanted
}

/// The largest Secret a `secretNameTemplate` may name (its data, keys included): larger ones of
/// the namespace are never held (their tenants' keys unresolved: 503), so a flood of large
/// Secrets named to fit cannot fill keyswap's memory.
pub const MAX_TENANT_SECRET_BYTES: usize = 64 * 1024;

/// Which Secrets of a namespace a template watch keeps: named to fit one of `templates`, and no
/// larger than a key is (a service-account JSON is 2-3 KiB; a large one named to fit is a flood).
pub(super) fn tenant_secrets(templates: Vec<(String, String)>) -> super::watch::Keep<Secret> {
    std::sync::Arc::new(move |s: &Secret| {
        let name = s.metadata.name.as_deref().unwrap_or_default();
        let bytes = s.data.iter().flatten().map(|(k, v)| k.len() + v.0.len()).sum::<usize>()
            + s.string_data.iter().flatten().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        bytes <= MAX_TENANT_SECRET_BYTES && templates.iter().any(|t| fits_template(name, t))
    })
}
