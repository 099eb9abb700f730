//! Validation and compilation: raw objects → [`Catalog`] → one gateway's [`Snapshot`].
//!
//! Everything that can be checked is checked here, once, at load time. Missing Secrets or
//! keys are not errors (they may arrive later): they compile to a binding that fails closed.

use std::collections::BTreeMap;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretSlice};
use sha2::{Digest, Sha256};

use super::error::{ConfigError, ConfigErrors, Origin};
use super::load::{Key, Kind, Object, Resource, SecretData};
use super::snapshot::{
    Binding, Credential, MatchEntry, RouteMatcher, SecretUse, Snapshot, TenantCredentials, Unresolved,
};
use crate::api::{
    AIProviderRouteSpec, CredentialInjectionPolicySpec, EgressGatewaySpec, ParentRef, ProviderAuthType, Target, GROUP,
};
use crate::auth;
use crate::inject::{gcp, sigv4, Strip};
use crate::provider::{self, Provider, CREDENTIAL_HEADERS};

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
    /// [`Catalog::build_isolated`]: the invalid objects left out, and why.
    pub rejected: Rejected,
}

/// What [`Catalog::build_isolated`] left out. Dependents fail closed: a route whose policy was
/// left out answers 503 (never the placeholder upstream), the hosts of a route left out answer
/// 503 too (even on an allow-all gateway), an agent-token Secret left out admits nobody. A gateway
/// left out does not compile at all: the last good snapshot keeps serving (its listeners, allow
/// list, default policy and agent auth decide what leaves the cluster and who may call; no
/// fallback for those is safer than the last good one).
#[derive(Debug, Default)]
pub struct Rejected {
    pub errors: Vec<ConfigError>,
    pub gateways: std::collections::BTreeSet<Key>,
    pub routes: BTreeMap<Key, Entry<AIProviderRouteSpec>>,
    pub policies: BTreeMap<Key, Entry<CredentialInjectionPolicySpec>>,
    pub secrets: std::collections::BTreeSet<Key>,
}

/// Fingerprint shown instead of a secret: enough to tell two values apart, useless to an attacker
/// holding logs (for any key with real entropy).
pub fn fingerprint(value: &[u8]) -> String {
    let digest = Sha256::digest(value);
    let mut s = String::from("sha256:");
    for b in &digest[..6] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

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
            };
            if let Some(first) = first {
                errors.push(ConfigError::new(format!("{dup} {first}")).at(&origin).object(label));
            }
        }
        (cat, errors)
    }

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
    fn was_left_out(&self, kind: Kind, key: &Key) -> bool {
        match kind {
            Kind::EgressGateway => self.rejected.gateways.contains(key),
            Kind::AIProviderRoute => self.rejected.routes.contains_key(key),
            Kind::CredentialInjectionPolicy => self.rejected.policies.contains_key(key),
            Kind::Secret => self.rejected.secrets.contains(key),
        }
    }

    fn validate(&self, errors: &mut Vec<ConfigError>) {
        for (key, gw) in &self.gateways {
            let err = |f: &str, m: String| {
                ConfigError::new(m).at(&gw.origin).object(label(Kind::EgressGateway, key)).field(f)
            };
            for (i, host) in gw.spec.allow.iter().enumerate() {
                if let Err(m) = check_host(host) {
                    errors.push(err(&format!("spec.allow[{i}]"), m));
                }
            }
            let mut names = std::collections::HashSet::new();
            for (i, l) in gw.spec.listeners.iter().enumerate() {
                if !names.insert(&l.name) {
                    errors.push(err(&format!("spec.listeners[{i}].name"), format!("`{}` is used twice", l.name)));
                }
                if l.port == 0 {
                    errors.push(err(&format!("spec.listeners[{i}].port"), "must be 1-65535".into()));
                }
            }
        }
        for (key, route) in &self.routes {
            let err = |f: String, m: String| {
                ConfigError::new(m).at(&route.origin).object(label(Kind::AIProviderRoute, key)).field(f)
            };
            self.check_parent_refs(&route.spec.parent_refs, key, &[Kind::EgressGateway], &err, errors);
            if route.spec.rules.is_empty() {
                errors.push(err("spec.rules".into(), "needs at least one rule".into()));
            }
            for (r, rule) in route.spec.rules.iter().enumerate() {
                if rule.matches.is_empty() {
                    errors.push(err(format!("spec.rules[{r}].matches"), "needs at least one match".into()));
                }
                for (m, mt) in rule.matches.iter().enumerate() {
                    let at = |f: &str| format!("spec.rules[{r}].matches[{m}].{f}");
                    let Some(p) = provider::lookup(&mt.provider) else {
                        let known = provider::names().collect::<Vec<_>>().join(", ");
                        errors.push(err(at("provider"), format!("unknown provider `{}`; known: {known}", mt.provider)));
                        continue;
                    };
                    if mt.hosts.is_empty() && p.default_hosts.is_empty() {
                        errors.push(err(at("hosts"), format!("provider `{}` has no default hosts: list them", p.name)));
                    }
                    for (i, h) in mt.hosts.iter().enumerate() {
                        if let Err(msg) = check_host(h) {
                            errors.push(err(at(&format!("hosts[{i}]")), msg));
                        }
                    }
                    for (i, e) in mt.endpoints.iter().enumerate() {
                        if !e.starts_with('/') || e.contains('?') {
                            errors.push(err(
                                at(&format!("endpoints[{i}]")),
                                format!("`{e}` must be a path starting with `/`, without a query"),
                            ));
                        }
                    }
                    if !mt.models.is_empty() && p.model_in_path == provider::ModelInPath::No {
                        errors.push(err(
                            at("models"),
                            format!(
                                "provider `{}` sends the model in the request body; this build matches models only \
                                 where the provider puts them in the path (google, azure-openai, bedrock)",
                                p.name
                            ),
                        ));
                    }
                }
            }
        }
        for (key, pol) in &self.policies {
            let err = |f: String, m: String| {
                ConfigError::new(m).at(&pol.origin).object(label(Kind::CredentialInjectionPolicy, key)).field(f)
            };
            let s = &pol.spec;
            self.check_parent_refs(&s.parent_refs, key, &[Kind::AIProviderRoute, Kind::EgressGateway], &err, errors);
            if s.secret_ref.namespace.is_some() {
                errors.push(err(
                    "spec.secretRef.namespace".into(),
                    "is not allowed: a policy reads Secrets only in its own namespace".into(),
                ));
            }
            if let Some(sel) = &s.credential_selector {
                let bt = &sel.by_tenant;
                if bt.secret_name_template.is_none() && bt.tenants.is_empty() {
                    errors.push(err(
                        "spec.credentialSelector.byTenant".into(),
                        "needs secretNameTemplate or tenants".into(),
                    ));
                }
                if let Some(t) = &bt.secret_name_template {
                    if t.matches("{tenant}").count() != 1 || t == "{tenant}" {
                        errors.push(err(
                            "spec.credentialSelector.byTenant.secretNameTemplate".into(),
                            format!("`{t}` must contain `{{tenant}}` exactly once, with a fixed prefix or suffix"),
                        ));
                    }
                }
                for (tenant, ts) in &bt.tenants {
                    if ts.secret_ref.namespace.is_some() {
                        errors.push(err(
                            format!("spec.credentialSelector.byTenant.tenants.{tenant}.secretRef.namespace"),
                            "is not allowed: a policy reads Secrets only in its own namespace".into(),
                        ));
                    }
                }
            }
            if s.secret_ref.name.is_empty() {
                errors.push(err("spec.secretRef.name".into(), "is required".into()));
            }
            match s.target {
                Target::Header => {
                    if let Some(h) = &s.header_name {
                        if let Err(m) = check_header_name(h) {
                            errors.push(err("spec.headerName".into(), m));
                        }
                    }
                    if s.query_param_name.is_some() {
                        errors.push(err("spec.queryParamName".into(), "applies only to target QueryParam".into()));
                    }
                    if let Some(p) = &s.value_prefix {
                        if p.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                            errors.push(err("spec.valuePrefix".into(), "must not contain CR, LF or NUL".into()));
                        }
                    }
                }
                Target::QueryParam => {
                    match &s.query_param_name {
                        Some(q) if q.is_empty() || q.contains(['&', '=', '#', '?', ' ']) => {
                            errors.push(err(
                                "spec.queryParamName".into(),
                                format!("`{q}` is not a valid query parameter name"),
                            ));
                        }
                        _ => {}
                    }
                    if s.header_name.is_some() || s.value_prefix.is_some() {
                        errors.push(err(
                            "spec.headerName".into(),
                            "headerName and valuePrefix apply only to target Header".into(),
                        ));
                    }
                }
                Target::ProviderAuth => {
                    if s.header_name.is_some() || s.value_prefix.is_some() || s.query_param_name.is_some() {
                        errors.push(err(
                            "spec.headerName".into(),
                            "headerName, valuePrefix and queryParamName do not apply to target ProviderAuth".into(),
                        ));
                    }
                    match &s.provider_auth {
                        None => errors.push(err(
                            "spec.providerAuth".into(),
                            "is required when target is ProviderAuth (type AWSv4 or GCPServiceAccount)".into(),
                        )),
                        Some(a) => match a.kind {
                            ProviderAuthType::AWSv4 => {
                                if !a.scopes.is_empty() {
                                    errors.push(err(
                                        "spec.providerAuth.scopes".into(),
                                        "applies only to type GCPServiceAccount".into(),
                                    ));
                                }
                                if s.secret_key.is_some() {
                                    errors.push(err(
                                        "spec.secretKey".into(),
                                        format!(
                                            "does not apply to AWSv4: the Secret holds the keys `{}`, `{}` and optionally `{}`",
                                            sigv4::ACCESS_KEY_ID, sigv4::SECRET_ACCESS_KEY, sigv4::SESSION_TOKEN
                                        ),
                                    ));
                                }
                                for (f, v) in [("region", &a.region), ("service", &a.service)] {
                                    if let Some(v) = v {
                                        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                                            errors.push(err(
                                                format!("spec.providerAuth.{f}"),
                                                format!("`{v}` is not a valid AWS {f}"),
                                            ));
                                        }
                                    }
                                }
                            }
                            ProviderAuthType::GCPServiceAccount => {
                                if a.region.is_some() || a.service.is_some() {
                                    errors.push(err(
                                        "spec.providerAuth.region".into(),
                                        "region and service apply only to type AWSv4".into(),
                                    ));
                                }
                                if a.scopes.iter().any(|sc| sc.is_empty() || sc.contains(char::is_whitespace)) {
                                    errors.push(err(
                                        "spec.providerAuth.scopes".into(),
                                        "each scope must be a non-empty URL without spaces".into(),
                                    ));
                                }
                            }
                        },
                    }
                }
            }
            if s.provider_auth.is_some() && s.target != Target::ProviderAuth {
                errors.push(err("spec.providerAuth".into(), "applies only to target ProviderAuth".into()));
            }
        }
    }

    fn check_parent_refs(
        &self,
        refs: &[ParentRef],
        own: &Key,
        allowed: &[Kind],
        err: &dyn Fn(String, String) -> ConfigError,
        errors: &mut Vec<ConfigError>,
    ) {
        if refs.is_empty() {
            errors.push(err("spec.parentRefs".into(), "needs at least one parent".into()));
        }
        for (i, r) in refs.iter().enumerate() {
            let field = format!("spec.parentRefs[{i}]");
            match resolve_ref(r, own, allowed[0]) {
                Err(m) => errors.push(err(field, m)),
                Ok((kind, key)) if !allowed.contains(&kind) => {
                    let names = allowed.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" or ");
                    errors.push(err(format!("{field}.kind"), format!("must be {names}, not {}", kind.as_str())));
                    let _ = key;
                }
                Ok((kind, key)) => {
                    let exists = match kind {
                        Kind::EgressGateway => self.gateways.contains_key(&key),
                        Kind::AIProviderRoute => self.routes.contains_key(&key),
                        _ => false,
                    };
                    if !exists && self.was_left_out(kind, &key) {
                        errors.push(err(field, format!("{} {key} is invalid and left out", kind.as_str())));
                    } else if !exists {
                        errors.push(err(field, format!("{} {key} does not exist", kind.as_str())));
                    }
                }
            }
        }
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

    fn compile_with(&self, gateway: &Key, isolate: bool) -> Result<Snapshot, ConfigErrors> {
        let Some(gw) = self.gateways.get(gateway) else {
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
            return Err(ConfigErrors(errors));
        };
        // A binding that fails closed because `object` is invalid (isolated compiles only).
        let rejected_binding = |p: &Provider, policy: Option<Arc<str>>, object: String| Binding {
            policy,
            credential: Err(Unresolved::Rejected { object }),
            strip: Strip { headers: strip_headers(None), query: strip_query(p, None) },
            tenants: None,
        };
        let rejected_policy_for = |route: &Key| -> Option<&Key> {
            self.rejected.policies.iter().find_map(|(pk, pol)| {
                pol.spec
                    .parent_refs
                    .iter()
                    .any(|r| match resolve_ref(r, pk, Kind::AIProviderRoute) {
                        Ok((Kind::AIProviderRoute, k)) => &k == route,
                        Ok((Kind::EgressGateway, k)) => &k == gateway && !self.has_own_policy(route),
                        _ => false,
                    })
                    .then_some(pk)
            })
        };
        let mut errors = Vec::new();
        let mut entries = Vec::new();
        let mut secrets: Vec<SecretUse> = Vec::new();
        let mut live: Vec<SecretSlice<u8>> = Vec::new();

        // Catch-all policies on the gateway, and per-route policies.
        let mut catch_all: Vec<&Key> = Vec::new();
        let mut per_route: BTreeMap<Key, Vec<&Key>> = BTreeMap::new();
        for (pkey, pol) in &self.policies {
            for r in &pol.spec.parent_refs {
                match resolve_ref(r, pkey, Kind::AIProviderRoute) {
                    Ok((Kind::EgressGateway, k)) if &k == gateway => catch_all.push(pkey),
                    Ok((Kind::AIProviderRoute, k)) => per_route.entry(k).or_default().push(pkey),
                    _ => {}
                }
            }
        }
        if catch_all.len() > 1 {
            let names = catch_all.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
            let e = ConfigError::new(format!(
                "more than one CredentialInjectionPolicy targets the gateway itself: {names}"
            ));
            if isolate {
                // The policies are at fault, not the gateway: routes without their own policy
                // fail closed, the rest of the gateway serves.
                for pk in &catch_all {
                    let origin = &self.policies[*pk].origin;
                    errors.push(e.clone().at(origin).object(label(Kind::CredentialInjectionPolicy, pk)));
                }
            } else {
                errors.push(e.at(&gw.origin).object(label(Kind::EgressGateway, gateway)));
            }
        }

        for (rkey, route) in &self.routes {
            let attached = route.spec.parent_refs.iter().any(
                |r| matches!(resolve_ref(r, rkey, Kind::EgressGateway), Ok((Kind::EgressGateway, k)) if &k == gateway),
            );
            if !attached {
                continue;
            }
            // In an isolated compile, why this route's requests fail closed, if they do.
            let mut fails_closed: Option<String> = None;
            let policy_key = match per_route.get(rkey).map(Vec::as_slice) {
                Some([one]) => Some(*one),
                Some(many) => {
                    let names = many.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
                    errors.push(
                        ConfigError::new(format!(
                            "more than one CredentialInjectionPolicy targets this route: {names}"
                        ))
                        .at(&route.origin)
                        .object(label(Kind::AIProviderRoute, rkey)),
                    );
                    if !isolate {
                        continue;
                    }
                    fails_closed = Some(format!("the policies {names} conflict on AIProviderRoute {rkey}"));
                    None
                }
                None if catch_all.len() > 1 && isolate => {
                    fails_closed = Some(format!("more than one catch-all policy targets EgressGateway {gateway}"));
                    None
                }
                None => catch_all.first().copied(),
            };
            if isolate && fails_closed.is_none() {
                if let Some(pk) = rejected_policy_for(rkey) {
                    fails_closed = Some(format!("CredentialInjectionPolicy {pk} is invalid and left out"));
                }
            }
            let route_name: Arc<str> = rkey.to_string().into();
            for (r, rule) in route.spec.rules.iter().enumerate() {
                for (m, mt) in rule.matches.iter().enumerate() {
                    let Some(p) = provider::lookup(&mt.provider) else { continue };
                    let binding = match (&fails_closed, policy_key) {
                        (Some(why), _) => rejected_binding(p, policy_key.map(|k| k.to_string().into()), why.clone()),
                        (None, None) => Binding {
                            policy: None,
                            credential: Err(Unresolved::NoPolicy),
                            strip: Strip { headers: strip_headers(None), query: strip_query(p, None) },
                            tenants: None,
                        },
                        (None, Some(pk)) => match self.bind(pk, p, &mut secrets, &mut live) {
                            Ok(b) => b,
                            Err(e) => {
                                let message = format!("{} (route {rkey} rule {r} match {m})", e.message);
                                errors.push(ConfigError { message, ..e });
                                if !isolate {
                                    continue;
                                }
                                let why = format!("CredentialInjectionPolicy {pk} cannot bind");
                                rejected_binding(p, Some(pk.to_string().into()), why)
                            }
                        },
                    };
                    let hosts: Vec<Box<str>> = if mt.hosts.is_empty() {
                        p.default_hosts.iter().map(|h| Box::from(*h)).collect()
                    } else {
                        mt.hosts.iter().map(|h| h.to_ascii_lowercase().into_boxed_str()).collect()
                    };
                    let mut binding = binding;
                    if let Some(e) = region_error(&binding, &hosts) {
                        errors.push(
                            e.at(&route.origin)
                                .object(label(Kind::AIProviderRoute, rkey))
                                .field(format!("spec.rules[{r}].matches[{m}].hosts")),
                        );
                        if !isolate {
                            continue;
                        }
                        let why = format!("AIProviderRoute {rkey} has hosts its SigV4 policy cannot sign for");
                        binding = rejected_binding(p, binding.policy.clone(), why);
                    }
                    entries.push(MatchEntry {
                        route: route_name.clone(),
                        rule: r,
                        index: m,
                        provider: p,
                        hosts,
                        endpoints: mt.endpoints.iter().map(|e| e.as_str().into()).collect(),
                        models: mt.models.iter().map(|e| e.as_str().into()).collect(),
                        binding: Arc::new(binding),
                        scrub_response_bodies: route.spec.scrub_response_bodies.unwrap_or(p.scrub_bodies_by_default),
                    });
                }
            }
        }
        if isolate {
            // The hosts of a route left out fail closed, so an allow-all gateway never passes them
            // upstream with the placeholder.
            for (rkey, route) in &self.rejected.routes {
                let attached = route.spec.parent_refs.iter().any(|r| {
                    matches!(resolve_ref(r, rkey, Kind::EgressGateway), Ok((Kind::EgressGateway, k)) if &k == gateway)
                });
                if !attached {
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
                        entries.push(MatchEntry {
                            route: rkey.to_string().into(),
                            rule: r,
                            index: m,
                            provider: p,
                            hosts,
                            endpoints: Vec::new(),
                            models: Vec::new(),
                            binding: Arc::new(rejected_binding(p, None, why)),
                            scrub_response_bodies: true,
                        });
                    }
                }
            }
        }
        let agent_auth =
            gw.spec.agent_auth.as_ref().map(|a| self.compile_agent_auth(gateway, a, &mut errors, &mut live));
        let gateway_label = label(Kind::EgressGateway, gateway);
        if !errors.is_empty() && (!isolate || errors.iter().any(|e| e.object.as_deref() == Some(&*gateway_label))) {
            return Err(ConfigErrors(errors));
        }
        let mut rejected = self.rejected.errors.clone();
        rejected.extend(errors);
        secrets.sort_by(|a, b| (&a.secret, &a.key).cmp(&(&b.secret, &b.key)));
        secrets.dedup();
        Ok(Snapshot {
            gateway: gateway.clone(),
            default_policy: gw.spec.default_policy,
            allow: gw.spec.allow.iter().map(|h| h.to_ascii_lowercase().into_boxed_str()).collect(),
            routes: RouteMatcher::new(entries),
            secrets,
            live_secrets: live,
            capture: Arc::new(capture_policy(gw.spec.otlp.as_ref())),
            otlp: gw.spec.otlp.clone(),
            agent_auth,
            rejected,
        })
    }

    /// Whether some valid policy targets `route` directly.
    fn has_own_policy(&self, route: &Key) -> bool {
        self.policies.iter().any(|(pk, pol)| {
            pol.spec.parent_refs.iter().any(
                |r| matches!(resolve_ref(r, pk, Kind::AIProviderRoute), Ok((Kind::AIProviderRoute, k)) if &k == route),
            )
        })
    }

    /// `spec.agentAuth` of `gateway`: the validators in order, API keys read from the labelled
    /// Secrets of the gateway's namespace.
    fn compile_agent_auth(
        &self,
        gateway: &Key,
        a: &crate::api::AgentAuth,
        errors: &mut Vec<ConfigError>,
        live: &mut Vec<SecretSlice<u8>>,
    ) -> auth::Chain {
        let gw = &self.gateways[gateway];
        let gw_err = |f: String, m: String| {
            ConfigError::new(m).at(&gw.origin).object(label(Kind::EgressGateway, gateway)).field(f)
        };
        if a.validators.is_empty() {
            errors.push(gw_err("spec.agentAuth.validators".into(), "needs at least one validator".into()));
        }
        let mut validators = Vec::new();
        for (i, v) in a.validators.iter().enumerate() {
            let at = format!("spec.agentAuth.validators[{i}]");
            let kinds = [
                ("apiKeys", v.api_keys.is_some()),
                ("sharedToken", v.shared_token.is_some()),
                ("jwt", v.jwt.is_some()),
                ("edgeTrust", v.edge_trust.is_some()),
            ];
            let set: Vec<&str> = kinds.iter().filter(|(_, on)| *on).map(|(k, _)| *k).collect();
            let [kind] = set.as_slice() else {
                errors.push(gw_err(at, "set exactly one of apiKeys, sharedToken, jwt, edgeTrust".into()));
                continue;
            };
            let name: Arc<str> = v.name.as_deref().unwrap_or(kind).into();
            if let Some(e) = &v.edge_trust {
                let mut cidrs = Vec::new();
                for (c, text) in e.trusted_cidrs.iter().enumerate() {
                    match text.parse::<auth::Cidr>() {
                        Ok(n) => cidrs.push(n),
                        Err(m) => errors.push(gw_err(format!("{at}.edgeTrust.trustedCidrs[{c}]"), m)),
                    }
                }
                if !e.trust_mtls && cidrs.is_empty() {
                    errors
                        .push(gw_err(format!("{at}.edgeTrust"), "trusts nobody: set trustMtls or trustedCidrs".into()));
                }
                let mut header = |f: &str, h: &str| match check_header_name(h) {
                    Ok(()) => Some(h.to_ascii_lowercase().into_boxed_str()),
                    Err(m) => {
                        errors.push(gw_err(format!("{at}.edgeTrust.{f}"), m));
                        None
                    }
                };
                let agent_header = header("agentHeader", &e.agent_header);
                let tenant_header = e.tenant_header.as_deref().and_then(|t| header("tenantHeader", t));
                if let Some(agent_header) = agent_header {
                    validators.push(auth::Validator::EdgeTrust(auth::EdgeTrust {
                        name,
                        agent_header,
                        tenant_header,
                        trust_mtls: e.trust_mtls,
                        cidrs,
                    }));
                }
                continue;
            }
            if let Some(j) = &v.jwt {
                let at = format!("{at}.jwt");
                if j.issuer.is_empty() {
                    errors.push(gw_err(format!("{at}.issuer"), "is required".into()));
                }
                if j.audiences.is_empty() || j.audiences.iter().any(String::is_empty) {
                    errors.push(gw_err(format!("{at}.audiences"), "needs at least one non-empty audience".into()));
                }
                let refresh = std::time::Duration::from_secs(j.jwks_refresh_seconds.unwrap_or(300).max(10));
                let source = match (&j.jwks_file, &j.jwks_url) {
                    (Some(_), Some(_)) => {
                        errors.push(gw_err(at.clone(), "set jwksFile or jwksUrl, not both".into()));
                        None
                    }
                    (Some(f), None) => Some(auth::jwt::Source::File(f.into())),
                    (None, Some(u)) if u.starts_with("https://") && u.parse::<hyper::Uri>().is_ok() => {
                        Some(auth::jwt::Source::Url(u.clone()))
                    }
                    (None, Some(u)) => {
                        errors.push(gw_err(format!("{at}.jwksUrl"), format!("`{u}` must be an https:// URL")));
                        None
                    }
                    (None, None) => None,
                };
                let jwks = match source.map(|s| auth::jwt::Jwks::for_source(s, refresh)) {
                    None => None,
                    Some(Ok(j)) => Some(j),
                    Some(Err(m)) => {
                        errors.push(gw_err(format!("{at}.jwksFile"), m));
                        None
                    }
                };
                let hs256 = match &j.hs256_secret_ref {
                    None => None,
                    Some(r) => {
                        let skey = Key::new(gateway.namespace.clone(), r.name.clone());
                        let key_name = j.hs256_secret_key.as_deref().unwrap_or(DEFAULT_SECRET_KEY);
                        match self.secrets.get(&skey).and_then(|d| d.spec.entries.get(key_name)) {
                            Some(v) if v.expose_secret().trim_ascii().len() >= 32 => {
                                let v = v.expose_secret().trim_ascii();
                                live.push(SecretSlice::from(v.to_vec()));
                                Some(jsonwebtoken::DecodingKey::from_secret(v))
                            }
                            Some(_) => {
                                errors.push(gw_err(
                                    format!("{at}.hs256SecretRef"),
                                    format!("Secret {skey} key `{key_name}` must hold at least 32 bytes"),
                                ));
                                None
                            }
                            None => {
                                errors.push(gw_err(
                                    format!("{at}.hs256SecretRef"),
                                    format!("Secret {skey} with key `{key_name}` is required"),
                                ));
                                None
                            }
                        }
                    }
                };
                if j.jwks_file.is_none() && j.jwks_url.is_none() && j.hs256_secret_ref.is_none() {
                    errors.push(gw_err(at.clone(), "needs keys: jwksFile, jwksUrl or hs256SecretRef".into()));
                }
                let m = j.claim_mapping.clone().unwrap_or_default();
                validators.push(auth::Validator::Jwt(Box::new(auth::jwt::JwtValidator {
                    name,
                    jwks,
                    hs256,
                    validation: auth::jwt::JwtValidator::validation(
                        &j.issuer,
                        &j.audiences,
                        j.leeway_seconds.unwrap_or(30),
                    ),
                    claims: auth::jwt::ClaimMapping {
                        subject: m.subject.unwrap_or_else(|| "sub".into()),
                        tenant: m.tenant,
                        role: m.role,
                    },
                    cache: Default::default(),
                })));
                continue;
            }
            if let Some(st) = &v.shared_token {
                let skey = Key::new(gateway.namespace.clone(), st.secret_ref.name.clone());
                let key_name = st.secret_key.as_deref().unwrap_or(DEFAULT_SECRET_KEY);
                let value = self.secrets.get(&skey).and_then(|d| d.spec.entries.get(key_name));
                let Some(value) = value.map(|v| v.expose_secret().trim_ascii()).filter(|v| !v.is_empty()) else {
                    errors.push(gw_err(
                        format!("{at}.sharedToken.secretRef"),
                        format!("Secret {skey} with a non-empty key `{key_name}` is required"),
                    ));
                    continue;
                };
                live.push(SecretSlice::from(value.to_vec()));
                let identity = auth::Identity {
                    agent: st.agent.as_deref().unwrap_or("shared").into(),
                    tenant: st.tenant.as_deref().map(Arc::from),
                    validator: name.clone(),
                    role: None,
                    labels: Vec::new(),
                };
                validators.push(auth::Validator::SharedToken {
                    name,
                    token: SecretSlice::from(value.to_vec()),
                    identity,
                });
                continue;
            }
            let mut keys = std::collections::HashMap::new();
            for (skey, sec) in self.secrets.iter().filter(|(k, _)| k.namespace == gateway.namespace) {
                if sec.spec.labels.get(auth::API_KEY_LABEL).map(String::as_str) != Some("true") {
                    continue;
                }
                let serr =
                    |f: &str, m: String| ConfigError::new(m).at(&sec.origin).object(label(Kind::Secret, skey)).field(f);
                let text = |k: &str| {
                    sec.spec.entries.get(k).and_then(|v| std::str::from_utf8(v.expose_secret()).ok()).map(str::trim)
                };
                let digest = match text("sha256").map(parse_digest) {
                    Some(Some(d)) => d,
                    _ => {
                        errors.push(serr("sha256", "must be the 64-hex-digit SHA-256 of the agent token".into()));
                        continue;
                    }
                };
                let Some(agent) = text("agent").filter(|a| !a.is_empty()) else {
                    errors.push(serr("agent", "is required (the agent's name)".into()));
                    continue;
                };
                let expires = match text("expires").filter(|e| !e.is_empty()) {
                    None => None,
                    Some(e) => match e.parse::<k8s_openapi::jiff::Timestamp>() {
                        Ok(t) => Some(std::time::SystemTime::from(t)),
                        Err(_) => {
                            errors.push(serr("expires", format!("`{e}` is not an RFC 3339 time")));
                            continue;
                        }
                    },
                };
                let key = auth::ApiKey {
                    identity: auth::Identity {
                        agent: agent.into(),
                        tenant: text("tenant").filter(|t| !t.is_empty()).map(Arc::from),
                        validator: name.clone(),
                        role: None,
                        labels: sec
                            .spec
                            .labels
                            .iter()
                            .filter(|(k, _)| k.as_str() != auth::API_KEY_LABEL)
                            .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                            .collect(),
                    },
                    expires,
                    secret: skey.clone(),
                };
                if let Some(first) = keys.insert(digest, key) {
                    errors.push(serr("sha256", format!("the same token is already Secret {}", first.secret)));
                }
            }
            validators.push(auth::Validator::ApiKeys { name, keys });
        }
        let edge_headers = validators
            .iter()
            .flat_map(|v| match v {
                auth::Validator::EdgeTrust(e) => {
                    vec![e.agent_header.clone()].into_iter().chain(e.tenant_header.clone())
                }
                _ => Vec::new().into_iter().chain(None),
            })
            .collect();
        auth::Chain {
            optional: a.optional,
            validators,
            counters: auth::TenantCounters::new(&a.metrics_tenants),
            edge_headers,
        }
    }

    /// Binds a policy to one provider: its own Secret, and with `credentialSelector` each
    /// tenant's (explicit ones first, then every Secret the name template matches).
    fn bind(
        &self,
        pkey: &Key,
        p: &'static Provider,
        secrets: &mut Vec<SecretUse>,
        live: &mut Vec<SecretSlice<u8>>,
    ) -> Result<Binding, ConfigError> {
        let pol = &self.policies[pkey];
        let mut binding = self.bind_secret(pkey, p, &pol.spec.secret_ref.name, None, secrets, live)?;
        let Some(sel) = &pol.spec.credential_selector else { return Ok(binding) };
        let mut by_tenant = std::collections::HashMap::new();
        for (tenant, ts) in &sel.by_tenant.tenants {
            let b = self.bind_secret(pkey, p, &ts.secret_ref.name, ts.secret_key.as_deref(), secrets, live)?;
            by_tenant.insert(tenant.as_str().into(), b.credential);
        }
        if let Some((pre, post)) = sel.by_tenant.secret_name_template.as_deref().and_then(|t| t.split_once("{tenant}"))
        {
            for skey in self.secrets.keys().filter(|k| k.namespace == pkey.namespace) {
                let n = &skey.name;
                if n.len() <= pre.len() + post.len() || !n.starts_with(pre) || !n.ends_with(post) {
                    continue;
                }
                let tenant = &n[pre.len()..n.len() - post.len()];
                if by_tenant.contains_key(tenant) {
                    continue;
                }
                let b = self.bind_secret(pkey, p, n, None, secrets, live)?;
                by_tenant.insert(tenant.into(), b.credential);
            }
        }
        binding.tenants = Some(TenantCredentials { by_tenant, fallback: sel.fallback });
        Ok(binding)
    }

    /// Binds one Secret of a policy: resolves header or parameter, reads the value.
    /// `key_override` replaces the policy's `secretKey` (a tenant's own key name).
    fn bind_secret(
        &self,
        pkey: &Key,
        p: &'static Provider,
        secret_name: &str,
        key_override: Option<&str>,
        secrets: &mut Vec<SecretUse>,
        live: &mut Vec<SecretSlice<u8>>,
    ) -> Result<Binding, ConfigError> {
        let pol = &self.policies[pkey];
        let s = &pol.spec;
        let err = |f: &str, m: String| {
            ConfigError::new(m).at(&pol.origin).object(label(Kind::CredentialInjectionPolicy, pkey)).field(f)
        };
        let secret_key = Key::new(pkey.namespace.clone(), secret_name.to_owned());
        if let (Target::ProviderAuth, Some(auth)) = (s.target, &s.provider_auth) {
            return Ok(self.bind_provider_auth(pkey, p, auth, (&secret_key, key_override), secrets, live));
        }
        let key_name = key_override
            .map(str::to_owned)
            .or_else(|| s.secret_key.clone())
            .unwrap_or_else(|| DEFAULT_SECRET_KEY.into());
        let raw = match self.secrets.get(&secret_key) {
            None => Err(Unresolved::SecretNotFound { secret: secret_key.clone() }),
            Some(sec) => sec
                .spec
                .entries
                .get(&key_name)
                .ok_or_else(|| Unresolved::KeyNotFound { secret: secret_key.clone(), key: key_name.clone() }),
        };
        if let (Ok(v), Some(sec)) = (&raw, self.secrets.get(&secret_key)) {
            if let Err(m) = super::load::validate_secret_value(v.expose_secret()) {
                return Err(ConfigError::new(m)
                    .at(&sec.origin)
                    .object(label(Kind::Secret, &secret_key))
                    .field(key_name.clone()));
            }
        }
        if let Ok(v) = &raw {
            let v = v.expose_secret();
            live.push(SecretSlice::from(v.to_vec()));
            let encoded = crate::inject::query::encode_value(v);
            if encoded.as_bytes() != v {
                live.push(SecretSlice::from(encoded.into_bytes()));
            }
        }
        secrets.push(SecretUse {
            secret: secret_key.clone(),
            key: key_name.clone(),
            fingerprint: raw.as_ref().ok().map(|v| fingerprint(v.expose_secret())),
        });
        let policy: Arc<str> = pkey.to_string().into();
        let (credential, header, param) = match s.target {
            Target::Header => {
                let (name, default_prefix) = match (&s.header_name, p.default_header) {
                    (Some(h), Some(d)) if h.eq_ignore_ascii_case(d.name) => (d.name.to_owned(), d.prefix),
                    (Some(h), _) => (h.to_ascii_lowercase(), ""),
                    (None, Some(d)) => (d.name.to_owned(), d.prefix),
                    (None, None) => {
                        return Err(err(
                            "spec.headerName",
                            format!("is required: provider `{}` has no default header", p.name),
                        ))
                    }
                };
                let prefix = s.value_prefix.as_deref().unwrap_or(default_prefix);
                let cred = raw.map(|v| {
                    let mut bytes = Vec::with_capacity(prefix.len() + v.expose_secret().len());
                    bytes.extend_from_slice(prefix.as_bytes());
                    bytes.extend_from_slice(v.expose_secret());
                    Credential::Header {
                        name: name.clone().into(),
                        fingerprint: fingerprint(v.expose_secret()),
                        value: SecretSlice::from(bytes),
                    }
                });
                (cred, Some(name), None)
            }
            Target::QueryParam => {
                let param = match (&s.query_param_name, p.credential_query_params.first()) {
                    (Some(q), _) => q.clone(),
                    (None, Some(d)) => (*d).to_owned(),
                    (None, None) => {
                        return Err(err(
                            "spec.queryParamName",
                            format!("is required: provider `{}` has no default key parameter", p.name),
                        ))
                    }
                };
                let cred = raw.map(|v| Credential::Query {
                    param: param.clone().into(),
                    fingerprint: fingerprint(v.expose_secret()),
                    value: SecretSlice::from(crate::inject::query::encode_value(v.expose_secret()).into_bytes()),
                });
                (cred, None, Some(param))
            }
            Target::ProviderAuth => {
                return Err(err("spec.providerAuth", "is required when target is ProviderAuth".into()))
            }
        };
        Ok(Binding {
            policy: Some(policy),
            credential,
            strip: Strip { headers: strip_headers(header.as_deref()), query: strip_query(p, param.as_deref()) },
            tenants: None,
        })
    }

    /// Binds a `target: ProviderAuth` policy: AWS keys for SigV4, or a service-account key for
    /// GCP tokens. Missing or malformed keys compile to a binding that fails closed, named.
    fn bind_provider_auth(
        &self,
        pkey: &Key,
        p: &'static Provider,
        auth: &crate::api::ProviderAuth,
        (secret_key, key_override): (&Key, Option<&str>),
        secrets: &mut Vec<SecretUse>,
        live: &mut Vec<SecretSlice<u8>>,
    ) -> Binding {
        let s = &self.policies[pkey].spec;
        let data = self.secrets.get(secret_key);
        let mut extra_live = Vec::new();
        let mut read = |key: &str, required: bool| -> Result<Option<String>, Unresolved> {
            let raw = match data {
                None => return Err(Unresolved::SecretNotFound { secret: secret_key.clone() }),
                Some(d) => d.spec.entries.get(key),
            };
            let Some(raw) = raw else {
                if required {
                    secrets.push(SecretUse { secret: secret_key.clone(), key: key.into(), fingerprint: None });
                    return Err(Unresolved::KeyNotFound { secret: secret_key.clone(), key: key.into() });
                }
                return Ok(None);
            };
            let v = raw.expose_secret();
            secrets.push(SecretUse { secret: secret_key.clone(), key: key.into(), fingerprint: Some(fingerprint(v)) });
            live.push(SecretSlice::from(v.to_vec()));
            let text = std::str::from_utf8(v).map_err(|_| Unresolved::InvalidSecret {
                secret: secret_key.clone(),
                key: key.into(),
                message: "is not UTF-8 text".into(),
            })?;
            Ok(Some(text.trim().to_owned()))
        };
        let credential = match auth.kind {
            ProviderAuthType::AWSv4 => (|| {
                let id = read(sigv4::ACCESS_KEY_ID, true)?.unwrap_or_default();
                let secret = read(sigv4::SECRET_ACCESS_KEY, true)?.unwrap_or_default();
                let token = read(sigv4::SESSION_TOKEN, false)?;
                for (key, v) in [(sigv4::ACCESS_KEY_ID, &id), (sigv4::SECRET_ACCESS_KEY, &secret)] {
                    if v.is_empty() {
                        return Err(Unresolved::InvalidSecret {
                            secret: secret_key.clone(),
                            key: key.into(),
                            message: "is empty".into(),
                        });
                    }
                }
                let mut all = id.clone().into_bytes();
                all.extend_from_slice(secret.as_bytes());
                all.extend_from_slice(token.as_deref().unwrap_or("").as_bytes());
                let signer = sigv4::Signer::new(
                    &id,
                    &secret,
                    token.as_deref(),
                    auth.region.as_deref(),
                    auth.service.as_deref(),
                    fingerprint(&all),
                );
                Ok(Credential::AwsV4(Arc::new(signer)))
            })(),
            ProviderAuthType::GCPServiceAccount => (|| {
                let key = key_override
                    .map(str::to_owned)
                    .or_else(|| s.secret_key.clone())
                    .unwrap_or_else(|| gcp::DEFAULT_SECRET_KEY.into());
                let json = read(&key, true)?.unwrap_or_default();
                let account = gcp::check_key(&json).map_err(|message| Unresolved::InvalidSecret {
                    secret: secret_key.clone(),
                    key: key.clone(),
                    message,
                })?;
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&json) {
                    // The private key alone (as it would appear in a body) is scrubbed too.
                    if let Some(pk) = v.get("private_key").and_then(|p| p.as_str()) {
                        extra_live.push(SecretSlice::from(pk.as_bytes().to_vec()));
                    }
                }
                let scopes =
                    if auth.scopes.is_empty() { vec![gcp::DEFAULT_SCOPE.to_owned()] } else { auth.scopes.clone() };
                let fp = fingerprint(json.as_bytes());
                let source = gcp::TokenSource::for_key(&json.into(), account, scopes, fp);
                Ok(Credential::GcpToken(source))
            })(),
        };
        live.extend(extra_live);
        Binding {
            policy: Some(pkey.to_string().into()),
            credential,
            strip: Strip { headers: strip_headers(None), query: strip_query(p, None) },
            tenants: None,
        }
    }
}

/// SigV4 needs a region: from the policy, or from every exact host of the match.
fn region_error(binding: &Binding, hosts: &[Box<str>]) -> Option<ConfigError> {
    let Ok(Credential::AwsV4(signer)) = &binding.credential else { return None };
    let bad = hosts.iter().find(|h| !crate::glob::is_pattern(h) && signer.scope(h).is_err())?;
    Some(ConfigError::new(format!(
        "host `{bad}` names no AWS region and policy {} sets no spec.providerAuth.region",
        binding.policy.as_deref().unwrap_or("-")
    )))
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

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        *o = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
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

/// Resolves a parentRef to a kind and key. `default_kind` applies when `kind` is omitted.
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
    Ok((kind, Key::new(ns, r.name.clone())))
}

fn strip_headers(policy_header: Option<&str>) -> Box<[Box<str>]> {
    let mut v: Vec<Box<str>> = CREDENTIAL_HEADERS.iter().map(|h| Box::from(*h)).collect();
    if let Some(h) = policy_header {
        if !v.iter().any(|x| &**x == h) {
            v.push(h.into());
        }
    }
    v.into_boxed_slice()
}

fn strip_query(p: &Provider, policy_param: Option<&str>) -> Box<[Box<str>]> {
    let mut v: Vec<Box<str>> = p.credential_query_params.iter().map(|q| Box::from(*q)).collect();
    for q in provider::CREDENTIAL_QUERY_PARAMS {
        if !v.iter().any(|x| crate::inject::query::names_param(x, q)) {
            v.push(Box::from(*q));
        }
    }
    if let Some(q) = policy_param {
        if !v.iter().any(|x| &**x == q) {
            v.push(q.into());
        }
    }
    v.into_boxed_slice()
}

fn check_host(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*')
        && !h.starts_with('.')
        && !h.ends_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!("`{h}` is not a host name (no scheme, port or path; `*` stands for one DNS label)"))
    }
}

fn check_header_name(h: &str) -> Result<(), String> {
    const FORBIDDEN: &[&str] = &["host", "content-length", "transfer-encoding", "connection", "te", "upgrade"];
    if h.is_empty()
        || h.starts_with(':')
        || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        return Err(format!("`{h}` is not a valid HTTP header name"));
    }
    if FORBIDDEN.iter().any(|f| f.eq_ignore_ascii_case(h)) {
        return Err(format!("`{h}` cannot carry a credential"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_file;
    use crate::config::Decision;

    const GW: &str = "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: egress}\nspec: {}\n---\n";

    fn route(name: &str, matches: &str) -> String {
        format!("apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: egress}}]\n  rules: [{{matches: [{matches}]}}]\n---\n")
    }

    fn policy(name: &str, parent: &str, rest: &str) -> String {
        format!("apiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{parent}]\n  secretRef: {{name: s}}\n{rest}\n---\n")
    }

    fn compile(text: &str) -> Result<Snapshot, String> {
        let (objs, errs) = parse_file(std::path::Path::new("t.yaml"), text);
        assert!(errs.is_empty(), "{errs:?}");
        let cat = Catalog::build(objs).map_err(|e| e.to_string())?;
        cat.compile(&Key::new("default", "egress")).map_err(|e| e.to_string())
    }

    #[test]
    fn policy_conflicts_and_bad_references_are_errors() {
        let two = format!(
            "{GW}{}{}{}",
            route("r", "{provider: openai}"),
            policy("a", "{name: r}", "  target: Header"),
            policy("b", "{name: r}", "  target: Header")
        );
        let e = compile(&two).unwrap_err();
        assert!(e.contains("more than one CredentialInjectionPolicy targets this route: default/a, default/b"), "{e}");

        let dangling = format!("{GW}{}", policy("a", "{name: nope}", "  target: Header"));
        let e = compile(&dangling).unwrap_err();
        assert!(e.contains("field `spec.parentRefs[0]`: AIProviderRoute default/nope does not exist"), "{e}");

        let wrong_kind = format!("{GW}{}", policy("a", "{kind: Secret, name: s}", "  target: Header"));
        assert!(compile(&wrong_kind).unwrap_err().contains("unknown kind `Secret`"));
    }

    #[test]
    fn provider_specific_requirements_are_checked() {
        let custom = format!(
            "{GW}{}{}",
            route("r", "{provider: custom, hosts: [x.test]}"),
            policy("a", "{name: r}", "  target: Header")
        );
        let e = compile(&custom).unwrap_err();
        assert!(
            e.contains("CredentialInjectionPolicy default/a: field `spec.headerName`: is required: provider `custom` has no default header (route default/r rule 0 match 0)"),
            "{e}"
        );

        let no_hosts = format!("{GW}{}", route("r", "{provider: custom}"));
        assert!(compile(&no_hosts).unwrap_err().contains("provider `custom` has no default hosts"));

        let models = format!("{GW}{}", route("r", "{provider: openai, models: [gpt-4o]}"));
        assert!(compile(&models).unwrap_err().contains("sends the model in the request body"));

        let no_auth =
            format!("{GW}{}{}", route("r", "{provider: bedrock}"), policy("a", "{name: r}", "  target: ProviderAuth"));
        let e = compile(&no_auth).unwrap_err();
        assert!(e.contains("field `spec.providerAuth`: is required when target is ProviderAuth"), "{e}");

        let aws_key = format!(
            "{GW}{}{}",
            route("r", "{provider: bedrock}"),
            policy(
                "a",
                "{name: r}",
                "  target: ProviderAuth\n  secretKey: token\n  providerAuth: {type: AWSv4, scopes: [x]}"
            )
        );
        let e = compile(&aws_key).unwrap_err();
        assert!(
            e.contains(
                "field `spec.secretKey`: does not apply to AWSv4: the Secret holds the keys `AWS_ACCESS_KEY_ID`"
            ),
            "{e}"
        );
        assert!(e.contains("field `spec.providerAuth.scopes`: applies only to type GCPServiceAccount"), "{e}");

        let gcp_region = format!(
            "{GW}{}{}",
            route("r", "{provider: google}"),
            policy(
                "a",
                "{name: r}",
                "  target: ProviderAuth\n  providerAuth: {type: GCPServiceAccount, region: us-east-1}"
            )
        );
        assert!(compile(&gcp_region).unwrap_err().contains("region and service apply only to type AWSv4"));

        let header = format!(
            "{GW}{}{}",
            route("r", "{provider: openai}"),
            policy("a", "{name: r}", "  target: Header\n  headerName: \"bad header\"")
        );
        assert!(compile(&header).unwrap_err().contains("is not a valid HTTP header name"));
    }

    #[test]
    fn tenant_keys_come_from_the_map_then_the_template_then_the_fallback() {
        let secrets = [
            ("s", "house"),
            ("acme-anthropic", "acme"),
            ("globex-keys", "globex"),
            ("x-anthropic-extra", "no"),
        ]
        .iter()
        .map(|(n, v)| {
            format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: {n}}}\nstringData: {{token: sk-{v}-0001}}\n---\n")
        })
        .collect::<String>();
        let selector = |fallback: &str| {
            format!(
                "  target: Header\n  credentialSelector:\n    byTenant:\n      secretNameTemplate: '{{tenant}}-anthropic'\n      tenants: {{globex: {{secretRef: {{name: globex-keys}}}}}}\n    fallback: {fallback}"
            )
        };
        let fp = |v: &str| fingerprint(v.as_bytes());
        for fallback in ["Deny", "Default"] {
            let text = format!(
                "{GW}{}{}{secrets}",
                route("a", "{provider: anthropic}"),
                policy("p", "{name: a}", &selector(fallback))
            );
            let snap = compile(&text).unwrap();
            let key = |tenant: Option<&str>| match snap.decide("api.anthropic.com", "/v1/messages", tenant) {
                Decision::Inject { credential, .. } => Some(credential.fingerprint().to_owned()),
                Decision::TenantNotMapped { .. } => None,
                d => panic!("{d:?}"),
            };
            assert_eq!(key(Some("acme")), Some(fp("sk-acme-0001")), "template");
            assert_eq!(key(Some("globex")), Some(fp("sk-globex-0001")), "explicit map");
            let fallback_key = (fallback == "Default").then(|| fp("sk-house-0001"));
            assert_eq!(key(Some("initech")), fallback_key, "{fallback}: a tenant without a key");
            assert_eq!(key(None), fallback_key, "{fallback}: anonymous");
        }
        let bad = format!(
            "{GW}{}{}",
            route("a", "{provider: anthropic}"),
            policy(
                "p",
                "{name: a}",
                "  target: Header\n  credentialSelector: {byTenant: {secretNameTemplate: 'static-name'}}"
            )
        );
        let e = compile(&bad).unwrap_err();
        assert!(e.contains("secretNameTemplate") && e.contains("{tenant}"), "{e}");
    }

    #[test]
    fn agent_auth_validators_are_checked_and_name_the_field() {
        let gw = |validators: &str| {
            format!("apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: egress}}\nspec:\n  agentAuth:\n    validators: {validators}\n---\n")
        };
        for (validators, field, words) in [
            ("[]", "spec.agentAuth.validators", "at least one"),
            ("[{apiKeys: {}, sharedToken: {secretRef: {name: t}}}]", "spec.agentAuth.validators[0]", "exactly one"),
            ("[{jwt: {issuer: i, audiences: [], jwksUrl: 'https://idp/jwks'}}]", "audiences", "at least one"),
            ("[{jwt: {issuer: i, audiences: [a], jwksUrl: 'http://idp/jwks'}}]", "jwksUrl", "https://"),
            ("[{jwt: {issuer: i, audiences: [a]}}]", "spec.agentAuth.validators[0].jwt", "needs keys"),
            ("[{jwt: {issuer: i, audiences: [a], jwksFile: /nonexistent/jwks.json}}]", "jwksFile", "cannot read"),
            ("[{edgeTrust: {agentHeader: x-agent}}]", "edgeTrust", "trusts nobody"),
            ("[{edgeTrust: {agentHeader: x-agent, trustedCidrs: [10.0.0.0/40]}}]", "trustedCidrs[0]", "prefix"),
            ("[{sharedToken: {secretRef: {name: missing}}}]", "sharedToken.secretRef", "default/missing"),
        ] {
            let e = compile(&gw(validators)).unwrap_err();
            assert!(e.contains(field) && e.contains(words), "{validators}: {e}");
        }
        let token = "apiVersion: v1\nkind: Secret\nmetadata: {name: t1, labels: {keyswap.dev/agent-token: 'true'}}\nstringData: {sha256: nothex, agent: a}\n";
        let e = compile(&format!("{}{token}", gw("[{apiKeys: {}}]"))).unwrap_err();
        assert!(e.contains("Secret default/t1") && e.contains("sha256"), "{e}");
    }

    #[test]
    fn catch_all_policy_on_the_gateway_binds_every_route_with_each_providers_header() {
        let text = format!(
            "{GW}{}{}{}apiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\nstringData: {{token: k}}\n",
            route("a", "{provider: anthropic}"),
            route("o", "{provider: openai}"),
            policy("all", "{kind: EgressGateway, name: egress}", "  target: Header"),
        );
        let snap = compile(&text).unwrap();
        let Decision::Inject { credential, .. } = snap.decide("api.openai.com", "/v1/x", None) else { panic!() };
        assert_eq!(credential.value(), b"Bearer k");
        let Decision::Inject { credential, .. } = snap.decide("api.anthropic.com", "/v1/messages", None) else {
            panic!()
        };
        assert_eq!(credential.value(), b"k");
        assert!(format!("{credential:?}").contains("<redacted>"));
    }

    #[test]
    fn a_route_without_any_policy_fails_closed() {
        let snap = compile(&format!("{GW}{}", route("r", "{provider: anthropic}"))).unwrap();
        assert!(matches!(
            snap.decide("api.anthropic.com", "/", None),
            Decision::FailClosed { reason: Unresolved::NoPolicy, .. }
        ));
        assert!(matches!(snap.decide("other.test", "/", None), Decision::Deny));
    }

    #[test]
    fn wildcard_hosts_and_models_in_the_path_match() {
        let text = format!(
            "{GW}{}{}apiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\nstringData: {{token: k}}\n",
            route("az", "{provider: azure-openai, models: [gpt-4o*]}"),
            policy("p", "{name: az}", "  target: Header"),
        );
        let snap = compile(&text).unwrap();
        let d = snap.decide(
            "myres.openai.azure.com",
            "/openai/deployments/gpt-4o-mini/chat/completions?api-version=1",
            None,
        );
        let Decision::Inject { credential, .. } = d else { panic!("{d:?}") };
        assert_eq!(credential.describe(), "header `api-key`");
        assert!(matches!(
            snap.decide("myres.openai.azure.com", "/openai/deployments/o1/chat/completions", None),
            Decision::Deny
        ));
        assert!(matches!(snap.decide("a.b.openai.azure.com", "/openai/deployments/gpt-4o/x", None), Decision::Deny));
    }

    fn secret(data: &str) -> String {
        format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\nstringData:\n{data}\n---\n")
    }

    #[test]
    fn header_values_must_travel_in_a_header_but_provider_auth_reads_multi_line_keys() {
        let text = format!(
            "{GW}{}{}{}",
            route("r", "{provider: openai}"),
            policy("a", "{name: r}", "  target: Header"),
            secret("  token: \"sk-live-value\\n\"")
        );
        let e = compile(&text).unwrap_err();
        assert!(e.contains("Secret default/s: field `token`: ends with a newline"), "{e}");
        assert!(!e.contains("sk-live-value"), "{e}");
    }

    #[test]
    fn provider_auth_compiles_and_names_missing_or_broken_keys() {
        let aws = |data: &str, extra: &str| {
            format!(
                "{GW}{}{}{}",
                route("r", &format!("{{provider: bedrock{extra}}}")),
                policy("a", "{name: r}", "  target: ProviderAuth\n  providerAuth: {type: AWSv4}"),
                secret(data)
            )
        };
        let full = aws("  AWS_ACCESS_KEY_ID: AKIAREAL\n  AWS_SECRET_ACCESS_KEY: s3cr3t-value", "");
        let snap = compile(&full).unwrap();
        let Decision::Inject { credential, .. } =
            snap.decide("bedrock-runtime.eu-west-1.amazonaws.com", "/model/m/converse", None)
        else {
            panic!("bedrock should inject")
        };
        assert!(matches!(credential, Credential::AwsV4(_)));
        assert!(!format!("{credential:?}").contains("s3cr3t"));
        assert!(snap.secret_values().contains(&b"s3cr3t-value".as_slice()));

        let missing = aws("  AWS_ACCESS_KEY_ID: AKIAREAL", "");
        let snap = compile(&missing).unwrap();
        let Decision::FailClosed { reason, .. } = snap.decide("bedrock-runtime.eu-west-1.amazonaws.com", "/", None)
        else {
            panic!("missing secret key must fail closed")
        };
        assert_eq!(reason.to_string(), "Secret default/s has no key `AWS_SECRET_ACCESS_KEY`");

        // An exact host that names no region needs spec.providerAuth.region.
        let e =
            compile(&aws("  AWS_ACCESS_KEY_ID: A\n  AWS_SECRET_ACCESS_KEY: B", ", hosts: [bedrock.internal.example]"))
                .unwrap_err();
        assert!(e.contains("host `bedrock.internal.example` names no AWS region"), "{e}");

        let gcp = |json: &str| {
            format!(
                "{GW}{}{}{}",
                route("r", "{provider: google}"),
                policy("a", "{name: r}", "  target: ProviderAuth\n  providerAuth: {type: GCPServiceAccount}"),
                secret(&format!("  service-account.json: '{json}'"))
            )
        };
        let snap = compile(&gcp("{\"type\": \"service_account\", \"client_email\": \"a@b\"}")).unwrap();
        let Decision::FailClosed { reason, .. } = snap.decide("generativelanguage.googleapis.com", "/", None) else {
            panic!("a broken key must fail closed")
        };
        assert_eq!(reason.reason(), "InvalidSecret");
        assert!(
            reason.to_string().starts_with(
                "Secret default/s key `service-account.json` is not a service-account key: field `private_key`"
            ),
            "{reason}"
        );
    }

    #[test]
    fn wildcard_hosts_keep_entry_order_across_index_and_scan() {
        let custom = |name: &str, host: &str, endpoint: &str| {
            format!(
                "apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: egress}}]\n  rules: [{{matches: [{{provider: custom, hosts: ['{host}'], endpoints: ['{endpoint}']}}]}}]\n---\n"
            )
        };
        let text = format!(
            "{GW}{}{}{}{}{}",
            custom("a-scan", "api.*.com", "/a/*"),
            custom("b-label", "*.example.com", "/*"),
            custom("c-scan", "*x.example.com", "/*"),
            policy("p", "{kind: EgressGateway, name: egress}", "  target: Header\n  headerName: x-k"),
            secret("  token: v")
        );
        let snap = compile(&text).unwrap();
        let route = |host: &str, path: &str| match snap.decide(host, path, None) {
            Decision::Inject { entry, .. } => entry.route.to_string(),
            other => format!("{other:?}"),
        };
        // Both patterns match: the earlier route wins, whichever structure holds it.
        assert_eq!(route("api.example.com", "/a/1"), "default/a-scan");
        assert_eq!(route("api.example.com", "/b"), "default/b-label");
        assert_eq!(route("box.example.com", "/b"), "default/b-label");
        assert_eq!(route("API.Example.com:443", "/b"), "default/b-label");
        // One label only: deeper hosts do not match `*.example.com`.
        assert_eq!(route("a.b.example.com", "/b"), "Deny");
        assert_eq!(route("example.com", "/b"), "Deny");
    }
}
