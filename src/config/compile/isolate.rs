//! Isolation: an invalid object is left out instead of refusing everything, and what depends on
//! it fails closed (a route whose policy was left out, the hosts of a route left out).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::bind::{strip_headers, strip_query};
use super::validate::check_host;
use super::{label, resolve_ref, Catalog, Entry, GatewayCompile};
use crate::api::{AIProviderRouteSpec, CredentialInjectionPolicySpec};
use crate::config::error::{ConfigError, ConfigErrors};
use crate::config::load::{Key, Kind, Object};
use crate::config::snapshot::{Binding, MatchEntry, Unresolved};
use crate::inject::Strip;
use crate::provider::{self, Provider};

/// What [`Catalog::build_isolated`] left out. Dependents fail closed: a route whose policy was
/// left out answers 503 (never the placeholder upstream), the hosts of a route left out answer
/// 503 too (even on an allow-all gateway), an agent-token Secret left out admits nobody. A gateway
/// left out does not compile at all: the last good snapshot keeps serving (its listeners, allow
/// list, default policy and agent auth decide what leaves the cluster and who may call; no
/// fallback for those is safer than the last good one).
#[derive(Debug, Default)]
pub struct Rejected {
    pub errors: Vec<ConfigError>,
    pub gateways: BTreeSet<Key>,
    pub routes: BTreeMap<Key, Entry<AIProviderRouteSpec>>,
    pub policies: BTreeMap<Key, Entry<CredentialInjectionPolicySpec>>,
    pub secrets: BTreeSet<Key>,
    /// Budgets left out: the routes they attach to fail closed (a limit is never lifted by a typo).
    pub budgets: BTreeMap<Key, Entry<crate::api::TokenBudgetSpec>>,
}

impl Catalog {
    /// Collects and validates like [`Catalog::build`], but leaves each invalid object out
    /// (recorded in `rejected`) instead of refusing everything: one team's typo must not freeze
    /// everyone's rotations. Leaving an object out can make another invalid (a policy whose route
    /// is gone); that is reported too.
    pub fn build_isolated(objects: Vec<Object>) -> Catalog {
        let (mut cat, dups) = Catalog::collect(objects, "defined twice; this copy is left out, the first counts:");
        cat.rejected.errors = dups;
        // Each round leaves out what is invalid; dependents show up in the next one.
        for _ in 0..8 {
            let mut errors = Vec::new();
            cat.validate(&mut errors);
            if errors.is_empty() {
                break;
            }
            for e in errors {
                cat.leave_out(e.object.as_deref());
                cat.rejected.errors.push(e);
            }
        }
        cat
    }

    /// Moves the object labelled `object` (`Kind namespace/name`) out of the catalog.
    fn leave_out(&mut self, object: Option<&str>) {
        let Some(object) = object else { return };
        fn find<'a>(kind: Kind, mut keys: impl Iterator<Item = &'a Key>, object: &str) -> Option<Key> {
            keys.find(|k| label(kind, k) == object).cloned()
        }
        if let Some(k) = find(Kind::EgressGateway, self.gateways.keys(), object) {
            self.gateways.remove(&k);
            self.rejected.gateways.insert(k);
        } else if let Some(k) = find(Kind::AIProviderRoute, self.routes.keys(), object) {
            let e = self.routes.remove(&k).expect("found");
            self.rejected.routes.insert(k, e);
        } else if let Some(k) = find(Kind::CredentialInjectionPolicy, self.policies.keys(), object) {
            let e = self.policies.remove(&k).expect("found");
            self.rejected.policies.insert(k, e);
        } else if let Some(k) = find(Kind::TokenBudget, self.budgets.keys(), object) {
            let e = self.budgets.remove(&k).expect("found");
            self.rejected.budgets.insert(k, e);
        } else if let Some(k) = find(Kind::Secret, self.secrets.keys(), object) {
            self.secrets.remove(&k);
            self.rejected.secrets.insert(k);
        }
    }

    /// `e` with what was left out, which explains why a gateway is missing or cannot compile.
    pub fn with_rejected(&self, mut e: ConfigErrors) -> ConfigErrors {
        let more: Vec<ConfigError> = self.rejected.errors.iter().filter(|r| !e.0.contains(r)).cloned().collect();
        e.0.extend(more);
        e
    }

    /// Whether `kind key` was left out as invalid.
    pub(super) fn was_left_out(&self, kind: Kind, key: &Key) -> bool {
        match kind {
            Kind::EgressGateway => self.rejected.gateways.contains(key),
            Kind::AIProviderRoute => self.rejected.routes.contains_key(key),
            Kind::CredentialInjectionPolicy => self.rejected.policies.contains_key(key),
            Kind::TokenBudget => self.rejected.budgets.contains_key(key),
            Kind::Secret => self.rejected.secrets.contains(key),
        }
    }

    /// Whether some valid policy targets `route` directly.
    fn has_own_policy(&self, route: &Key) -> bool {
        self.policies.iter().any(|(pk, pol)| {
            pol.spec.parent_refs.iter().any(
                |r| matches!(resolve_ref(r, pk, Kind::AIProviderRoute), Ok((Kind::AIProviderRoute, k)) if &k == route),
            )
        })
    }
}

impl<'a> GatewayCompile<'a> {
    /// A policy left out that would bind `route`: one that targets it, or a catch-all on the
    /// gateway when the route has no policy of its own.
    pub(super) fn rejected_policy_for(&self, route: &Key) -> Option<&'a Key> {
        let (catalog, gateway) = (self.catalog, self.gateway);
        catalog.rejected.policies.iter().find_map(|(pk, pol)| {
            pol.spec
                .parent_refs
                .iter()
                .any(|r| match resolve_ref(r, pk, Kind::AIProviderRoute) {
                    Ok((Kind::AIProviderRoute, k)) => &k == route,
                    Ok((Kind::EgressGateway, k)) => {
                        &k == gateway && route.namespace == gateway.namespace && !catalog.has_own_policy(route)
                    }
                    _ => false,
                })
                .then_some(pk)
        })
    }

    /// The hosts of a route left out fail closed, so an allow-all gateway never passes them
    /// upstream with the placeholder.
    pub(super) fn fail_closed_rejected_routes(&mut self) {
        for (rkey, route) in &self.catalog.rejected.routes {
            if !self.catalog.attached(&route.spec.parent_refs, rkey, self.gateway) {
                continue;
            }
            for (r, rule) in route.spec.rules.iter().enumerate() {
                for (m, mt) in rule.matches.iter().enumerate() {
                    // An unknown provider (a typo) still names hosts that must not pass.
                    let Some(p) = provider::lookup(&mt.provider).or_else(|| provider::lookup("custom")) else {
                        continue;
                    };
                    let hosts: Vec<Box<str>> = if mt.hosts.is_empty() {
                        p.default_hosts.iter().map(|h| Box::from(*h)).collect()
                    } else {
                        mt.hosts
                            .iter()
                            .filter(|h| check_host(h).is_ok())
                            .map(|h| h.to_ascii_lowercase().into())
                            .collect()
                    };
                    let why = format!("AIProviderRoute {rkey} is invalid and left out");
                    self.entries.push(MatchEntry {
                        route: rkey.to_string().into(),
                        rule: r,
                        index: m,
                        provider: p,
                        hosts,
                        endpoints: Vec::new(),
                        models: Vec::new(),
                        binding: Arc::new(rejected_binding(p, None, why)),
                        scrub_response_bodies: true,
                        budgets: Arc::new([]),
                    });
                }
            }
        }
    }
}

/// A binding that fails closed because `object` is invalid (isolated compiles only).
pub(super) fn rejected_binding(p: &Provider, policy: Option<Arc<str>>, object: String) -> Binding {
    Binding {
        policy,
        credential: Err(Unresolved::Rejected { object }),
        strip: Strip { headers: strip_headers(None), query: strip_query(p, None), ..Strip::default() },
        tenants: None,
    }
}
