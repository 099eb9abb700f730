//! Validation and compilation: raw objects → [`Catalog`] → one gateway's [`Snapshot`].
//!
//! Everything that can be checked is checked here, once, at load time. Missing Secrets or
//! keys are not errors (they may arrive later): they compile to a binding that fails closed.
//!
//! The phases, one file each: [`validate`] checks every object and the references between them;
//! [`isolate`] leaves invalid objects out and fails what depends on them closed; [`bind`] turns a
//! policy and its Secrets into credentials; [`agent_auth`] compiles a gateway's validators. This
//! file collects the objects and compiles one gateway's routes, match by match.

mod agent_auth;
mod bind;
mod budgets;
mod hosts;
mod isolate;
#[cfg(test)]
mod tests;
mod validate;
pub(crate) use validate::check_host;

use std::collections::BTreeMap;
use std::sync::Arc;

use secrecy::SecretSlice;

use self::bind::{region_error, strip_headers, strip_query};
use self::isolate::rejected_binding;
pub use self::isolate::Rejected;
use super::error::{ConfigError, ConfigErrors, Origin};
use super::load::{Key, Kind, Object, Resource, SecretData};
use super::snapshot::{Binding, MatchEntry, RouteMatcher, SecretUse, Snapshot, Unresolved};
use crate::api::{
    AIProviderRouteSpec, CredentialInjectionPolicySpec, EgressGatewaySpec, ParentRef, TokenBudgetSpec, GROUP,
};
use crate::auth;
use crate::inject::Strip;
use crate::provider::{self, Provider};

/// The key a policy reads when it names none.
pub const DEFAULT_SECRET_KEY: &str = "token";

#[derive(Debug)]
pub struct Entry<T> {
    pub origin: Origin,
    pub spec: T,
}

/// Every valid object, by kind and key.
#[derive(Debug, Default)]
pub struct Catalog {
    pub gateways: BTreeMap<Key, Entry<EgressGatewaySpec>>,
    pub routes: BTreeMap<Key, Entry<AIProviderRouteSpec>>,
    pub policies: BTreeMap<Key, Entry<CredentialInjectionPolicySpec>>,
    pub secrets: BTreeMap<Key, Entry<SecretData>>,
    pub budgets: BTreeMap<Key, Entry<TokenBudgetSpec>>,
    /// [`Catalog::build_isolated`]: the invalid objects left out, and why.
    pub rejected: Rejected,
    /// Namespaces whose Secrets could not be listed (the Kubernetes source went on without their
    /// watch): a tenant a `secretNameTemplate` there names no key of is unresolved (503), never
    /// put on the policy's own key.
    pub unlisted: std::collections::BTreeSet<String>,
}

pub use crate::vocab::fingerprint;

impl Catalog {
    /// Collects objects, refusing duplicates, then validates each object and the references
    /// between them.
    pub fn build(objects: Vec<Object>) -> Result<Catalog, ConfigErrors> {
        let (cat, mut errors) = Catalog::collect(objects, "defined twice; first in");
        cat.validate(&mut errors);
        if errors.is_empty() {
            Ok(cat)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The objects by kind and key; a second definition of a key is an error (`dup` then the
    /// first one's origin) and left out.
    fn collect(objects: Vec<Object>, dup: &str) -> (Catalog, Vec<ConfigError>) {
        let mut cat = Catalog::default();
        let mut errors = Vec::new();
        for obj in objects {
            let label = obj.label();
            let Object { origin, key, resource } = obj;
            let first = match resource {
                Resource::Gateway(spec) => insert(&mut cat.gateways, key, origin.clone(), spec),
                Resource::Route(spec) => insert(&mut cat.routes, key, origin.clone(), spec),
                Resource::Policy(spec) => insert(&mut cat.policies, key, origin.clone(), spec),
                Resource::Secret(data) => insert(&mut cat.secrets, key, origin.clone(), data),
                Resource::Budget(spec) => insert(&mut cat.budgets, key, origin.clone(), spec),
            };
            if let Some(first) = first {
                errors.push(ConfigError::new(format!("{dup} {first}")).at(&origin).object(label));
            }
        }
        (cat, errors)
    }

    /// Compiles the view of one gateway. Conflicts that only show for this gateway (two
    /// policies on one route) are errors here.
    pub fn compile(&self, gateway: &Key) -> Result<Snapshot, ConfigErrors> {
        self.compile_with(gateway, false)
    }

    /// Compiles what [`Catalog::build_isolated`] kept: conflicts and unusable bindings fail closed
    /// (503) instead of failing the snapshot, and every object left out is listed in
    /// `Snapshot::rejected`. Only a problem with the gateway itself fails.
    pub fn compile_isolated(&self, gateway: &Key) -> Result<Snapshot, ConfigErrors> {
        self.compile_with(gateway, true)
    }

    /// The routes attached to `gateway`, then (isolated) the hosts of routes left out, then the
    /// gateway's agent auth. Strict, any error fails; isolated, only an error on the gateway.
    fn compile_with(&self, gateway: &Key, isolate: bool) -> Result<Snapshot, ConfigErrors> {
        let Some(gw) = self.gateways.get(gateway) else { return Err(self.missing_gateway(gateway)) };
        let mut c = GatewayCompile::new(self, gateway, isolate);
        c.check_catch_all(&gw.origin);
        // The gateway's own namespace first: its routes win a host another namespace's route
        // also claims (matching takes the first entry).
        let (own, other): (Vec<_>, Vec<_>) = self.routes.iter().partition(|(k, _)| k.namespace == gateway.namespace);
        for (rkey, route) in own.into_iter().chain(other) {
            if self.attached(&route.spec.parent_refs, rkey, gateway) {
                c.route(rkey, route);
            }
        }
        if isolate {
            c.fail_closed_rejected_routes();
        }
        c.keep_own_hosts();
        c.cap_hosts();
        let agent_auth =
            gw.spec.agent_auth.as_ref().map(|a| self.compile_agent_auth(gateway, a, &mut c.errors, &mut c.live));
        let gateway_label = label(Kind::EgressGateway, gateway);
        if !c.errors.is_empty() && (!isolate || c.errors.iter().any(|e| e.object.as_deref() == Some(&*gateway_label))) {
            return Err(ConfigErrors(c.errors));
        }
        Ok(c.snapshot(&gw.spec, agent_auth))
    }

    /// Why `gateway` cannot compile when it is not in the catalog: the errors that left it out,
    /// or that it does not exist.
    fn missing_gateway(&self, gateway: &Key) -> ConfigErrors {
        let mut errors: Vec<ConfigError> = self
            .rejected
            .errors
            .iter()
            .filter(|e| e.object.as_deref() == Some(&*label(Kind::EgressGateway, gateway)))
            .cloned()
            .collect();
        if errors.is_empty() {
            errors.push(ConfigError::new(format!("EgressGateway {gateway} not found")));
        }
        ConfigErrors(errors)
    }
}

/// One gateway's compile in progress: what it reads, and what it has gathered so far.
struct GatewayCompile<'a> {
    catalog: &'a Catalog,
    gateway: &'a Key,
    /// An isolated compile: conflicts and unusable bindings fail their routes closed instead of
    /// failing the snapshot.
    isolate: bool,
    /// Catch-all policies: those that target the gateway itself.
    catch_all: Vec<&'a Key>,
    /// The policies that target each route (more than one is a conflict).
    per_route: BTreeMap<Key, Vec<&'a Key>>,
    errors: Vec<ConfigError>,
    entries: Vec<MatchEntry>,
    /// Every Secret key a binding reads, by fingerprint.
    secrets: Vec<SecretUse>,
    /// Every secret value read, for scrubbing.
    live: Vec<SecretSlice<u8>>,
    /// The TokenBudgets that apply to this gateway's routes, compiled.
    budgets: budgets::GatewayBudgets,
}

/// How the matches of one route are bound.
struct RoutePolicy<'a> {
    /// The route's own policy, else the gateway's catch-all.
    key: Option<&'a Key>,
    /// In an isolated compile, why the route's requests fail closed, if they do.
    fails_closed: Option<String>,
}

impl<'a> GatewayCompile<'a> {
    /// Sorts the policies by target: the gateway itself (catch-all), or a route.
    fn new(catalog: &'a Catalog, gateway: &'a Key, isolate: bool) -> Self {
        let mut catch_all: Vec<&Key> = Vec::new();
        let mut per_route: BTreeMap<Key, Vec<&Key>> = BTreeMap::new();
        for (pkey, pol) in &catalog.policies {
            for r in &pol.spec.parent_refs {
                match resolve_ref(r, pkey, Kind::AIProviderRoute) {
                    Ok((Kind::EgressGateway, k)) if &k == gateway => catch_all.push(pkey),
                    Ok((Kind::AIProviderRoute, k)) => per_route.entry(k).or_default().push(pkey),
                    _ => {}
                }
            }
        }
        GatewayCompile {
            catalog,
            gateway,
            isolate,
            catch_all,
            per_route,
            errors: Vec::new(),
            entries: Vec::new(),
            secrets: Vec::new(),
            live: Vec::new(),
            budgets: budgets::GatewayBudgets::new(catalog, gateway),
        }
    }

    /// More than one catch-all policy is an error: on the gateway (strict), or on each of the
    /// policies (isolated).
    fn check_catch_all(&mut self, gateway_origin: &Origin) {
        if self.catch_all.len() <= 1 {
            return;
        }
        let names = self.catch_all.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
        let e =
            ConfigError::new(format!("more than one CredentialInjectionPolicy targets the gateway itself: {names}"));
        if self.isolate {
            // The policies are at fault, not the gateway: routes without their own policy
            // fail closed, the rest of the gateway serves.
            for pk in &self.catch_all {
                let origin = &self.catalog.policies[*pk].origin;
                self.errors.push(e.clone().at(origin).object(label(Kind::CredentialInjectionPolicy, pk)));
            }
        } else {
            self.errors.push(e.at(gateway_origin).object(label(Kind::EgressGateway, self.gateway)));
        }
    }

    /// One route attached to the gateway: which policy binds it, then one entry per match.
    fn route(&mut self, rkey: &Key, route: &Entry<AIProviderRouteSpec>) {
        let Some(policy) = self.route_policy(rkey, route) else { return };
        let route_name: Arc<str> = rkey.to_string().into();
        let budgets = self.budgets.of(rkey);
        for (r, rule) in route.spec.rules.iter().enumerate() {
            for (m, mt) in rule.matches.iter().enumerate() {
                let Some(p) = provider::lookup(&mt.provider) else { continue };
                let Some(binding) = self.match_binding(rkey, (r, m), p, &policy) else { continue };
                let hosts: Vec<Box<str>> = if mt.hosts.is_empty() {
                    p.default_hosts.iter().map(|h| Box::from(*h)).collect()
                } else {
                    mt.hosts.iter().map(|h| h.to_ascii_lowercase().into_boxed_str()).collect()
                };
                let Some(binding) = self.check_region(rkey, &route.origin, (r, m), p, binding, &hosts) else {
                    continue;
                };
                // A minted token is scrubbed from bodies whatever the route says.
                let scrub_response_bodies =
                    route.spec.scrub_response_bodies.unwrap_or(p.scrub_bodies_by_default) || binding.mints_tokens();
                self.entries.push(MatchEntry {
                    route: route_name.clone(),
                    rule: r,
                    index: m,
                    provider: p,
                    hosts,
                    // Compared with the request's canonical path: in that form too (`*` kept).
                    endpoints: mt.endpoints.iter().map(|e| crate::target::canonical_path(e).into()).collect(),
                    models: mt.models.iter().map(|e| e.as_str().into()).collect(),
                    binding: Arc::new(binding),
                    scrub_response_bodies,
                    budgets: budgets.clone(),
                });
            }
        }
    }

    /// The policy that binds `rkey`, and in an isolated compile why it fails closed instead.
    /// `None`: a strict compile leaves the route out (its policies conflict: an error).
    fn route_policy(&mut self, rkey: &Key, route: &Entry<AIProviderRouteSpec>) -> Option<RoutePolicy<'a>> {
        let mut fails_closed: Option<String> = None;
        let key = match self.per_route.get(rkey).map(Vec::as_slice) {
            Some([one]) => Some(*one),
            Some(many) => {
                let names = many.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
                self.errors.push(
                    ConfigError::new(format!("more than one CredentialInjectionPolicy targets this route: {names}"))
                        .at(&route.origin)
                        .object(label(Kind::AIProviderRoute, rkey)),
                );
                if !self.isolate {
                    return None;
                }
                // On each policy too: its status must not say it binds a route that answers 503.
                for pk in many {
                    let origin = self.catalog.policies.get(pk).map_or(&route.origin, |p| &p.origin);
                    self.errors.push(
                        ConfigError::new(format!(
                            "AIProviderRoute {rkey} is targeted by other policies too ({names}): none binds it"
                        ))
                        .at(origin)
                        .object(label(Kind::CredentialInjectionPolicy, pk))
                        .field("spec.parentRefs"),
                    );
                }
                fails_closed = Some(format!("the policies {names} conflict on AIProviderRoute {rkey}"));
                None
            }
            None if self.catch_all.len() > 1 && self.isolate => {
                fails_closed = Some(format!("more than one catch-all policy targets EgressGateway {}", self.gateway));
                None
            }
            // The catch-all key is the gateway's namespace's: a route another namespace attaches
            // brings a policy of its own (else it fails closed), or it could send that key to
            // any host it names.
            None if rkey.namespace != self.gateway.namespace => None,
            None => self.catch_all.first().copied(),
        };
        if self.isolate && fails_closed.is_none() {
            if let Some(pk) = self.rejected_policy_for(rkey) {
                fails_closed = Some(format!("CredentialInjectionPolicy {pk} is invalid and left out"));
            }
        }
        Some(RoutePolicy { key, fails_closed })
    }

    /// The binding of match `m` of rule `r`: the policy's credential, none (no policy), or why it
    /// fails closed. `None`: a strict compile leaves the match out (the policy cannot bind: an
    /// error).
    fn match_binding(
        &mut self,
        rkey: &Key,
        (r, m): (usize, usize),
        p: &'static Provider,
        policy: &RoutePolicy<'a>,
    ) -> Option<Binding> {
        let binding = match (&policy.fails_closed, policy.key) {
            (Some(why), _) => rejected_binding(p, policy.key.map(|k| k.to_string().into()), why.clone()),
            (None, None) => Binding {
                policy: None,
                credential: Err(Unresolved::NoPolicy),
                strip: Strip { headers: strip_headers(None), query: strip_query(p, None), ..Strip::default() },
                tenants: None,
            },
            (None, Some(pk)) => match self.catalog.bind(pk, p, &mut self.secrets, &mut self.live) {
                Ok(b) => b,
                Err(e) => {
                    let message = format!("{} (route {rkey} rule {r} match {m})", e.message);
                    self.errors.push(ConfigError { message, ..e });
                    if !self.isolate {
                        return None;
                    }
                    let why = format!("CredentialInjectionPolicy {pk} cannot bind");
                    rejected_binding(p, Some(pk.to_string().into()), why)
                }
            },
        };
        Some(binding)
    }

    /// SigV4 signs for a region: hosts that name none, under a policy that sets none, are an
    /// error. `None`: a strict compile leaves the match out; an isolated one fails it closed.
    fn check_region(
        &mut self,
        rkey: &Key,
        route_origin: &Origin,
        (r, m): (usize, usize),
        p: &'static Provider,
        binding: Binding,
        hosts: &[Box<str>],
    ) -> Option<Binding> {
        let Some(e) = region_error(&binding, hosts) else { return Some(binding) };
        self.errors.push(
            e.at(route_origin)
                .object(label(Kind::AIProviderRoute, rkey))
                .field(format!("spec.rules[{r}].matches[{m}].hosts")),
        );
        if !self.isolate {
            return None;
        }
        let why = format!("AIProviderRoute {rkey} has hosts its SigV4 policy cannot sign for");
        Some(rejected_binding(p, binding.policy.clone(), why))
    }

    /// The snapshot of what compiled. `rejected` lists every object left out, then (isolated)
    /// every error that failed something closed.
    fn snapshot(self, gw: &EgressGatewaySpec, agent_auth: Option<auth::Chain>) -> Snapshot {
        let mut rejected = self.catalog.rejected.errors.clone();
        rejected.extend(self.errors);
        let mut secrets = self.secrets;
        secrets.sort_by(|a, b| (&a.secret, &a.key).cmp(&(&b.secret, &b.key)));
        secrets.dedup();
        let mut budgets: Vec<_> = self.entries.iter().flat_map(|e| e.budgets.iter().cloned()).collect();
        budgets.sort_by(|a, b| a.name.cmp(&b.name));
        budgets.dedup_by(|a, b| a.name == b.name);
        Snapshot {
            gateway: self.gateway.clone(),
            listeners: gw.listeners.clone(),
            default_policy: gw.default_policy,
            allow: gw.allow.iter().filter_map(|h| crate::config::snapshot::Allowed::parse(h).ok()).collect(),
            routes: RouteMatcher::new(self.entries),
            secrets,
            live_secrets: self.live,
            capture: Arc::new(capture_policy(gw.otlp.as_ref())),
            otlp: gw.otlp.clone(),
            agent_auth,
            budget_store: self.catalog.budget_store(self.gateway, gw),
            gateway_budgets: self.budgets.on_gateway(),
            budgets,
            rejected,
        }
    }
}

impl Catalog {
    /// Whether a route with these parentRefs is attached to `gateway`: it names the gateway, and
    /// is in the gateway's namespace or one the gateway admits (`spec.allowedRoutes`).
    fn attached(&self, parent_refs: &[ParentRef], rkey: &Key, gateway: &Key) -> bool {
        let admits =
            self.gateways.get(gateway).is_some_and(|g| g.spec.admits_routes_from(&gateway.namespace, &rkey.namespace));
        admits
            && parent_refs.iter().any(
                |r| matches!(resolve_ref(r, rkey, Kind::EgressGateway), Ok((Kind::EgressGateway, k)) if &k == gateway),
            )
    }
}

fn capture_policy(otlp: Option<&crate::api::Otlp>) -> super::snapshot::CapturePolicy {
    let mut p = super::snapshot::CapturePolicy::default();
    if let Some(read) = otlp.and_then(|o| o.read_bodies) {
        p.read_bodies = read;
    }
    if let Some(c) = otlp.and_then(|o| o.capture_body.as_ref()) {
        if let Some(m) = c.max_bytes {
            p.max_bytes = m as usize;
        }
        if !c.include_content_types.is_empty() {
            p.include_content_types = c.include_content_types.clone();
        }
    }
    p
}

fn insert<T>(map: &mut BTreeMap<Key, Entry<T>>, key: Key, origin: Origin, spec: T) -> Option<Origin> {
    if let Some(first) = map.get(&key) {
        return Some(first.origin.clone());
    }
    map.insert(key, Entry { origin, spec });
    None
}

fn label(kind: Kind, key: &Key) -> String {
    format!("{} {key}", kind.as_str())
}

/// The objects `parent_refs` of `own` name, those that resolve (`default_kind` as in
/// [`resolve_ref`]): which gateway a route is written for, and which routes a policy binds.
pub fn named_parents<'a>(
    parent_refs: &'a [ParentRef],
    own: &'a Key,
    default_kind: Kind,
) -> impl Iterator<Item = (Kind, Key)> + 'a {
    parent_refs.iter().filter_map(move |r| resolve_ref(r, own, default_kind).ok())
}

/// Resolves a parentRef to a kind and key. `default_kind` applies when `kind` is omitted: a
/// route's parents are gateways; a policy's or a budget's are routes (or a gateway), and those
/// must be in the referrer's own namespace, so that no team binds its key to (or limits, or
/// breaks) another team's routes or gateway.
fn resolve_ref(r: &ParentRef, own: &Key, default_kind: Kind) -> Result<(Kind, Key), String> {
    if let Some(g) = &r.group {
        if g != GROUP {
            return Err(format!("group `{g}` is not {GROUP}"));
        }
    }
    let kind = match r.kind.as_deref() {
        None => default_kind,
        Some("EgressGateway") => Kind::EgressGateway,
        Some("AIProviderRoute") => Kind::AIProviderRoute,
        Some(k) => return Err(format!("unknown kind `{k}`")),
    };
    let ns = r.namespace.clone().unwrap_or_else(|| own.namespace.clone());
    if default_kind == Kind::AIProviderRoute && ns != own.namespace {
        return Err(format!(
            "namespace `{ns}` is not allowed: a policy or budget attaches only to routes and gateways in its own namespace `{}`",
            own.namespace
        ));
    }
    Ok((kind, Key::new(ns, r.name.clone())))
}
