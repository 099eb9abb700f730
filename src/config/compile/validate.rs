//! Validation: each gateway, route and policy on its own, and the references between them. Every
//! error names the object and the field.

use std::collections::HashSet;

use super::{label, resolve_ref, Catalog};
use crate::api::{
    ByTenant, CredentialInjectionPolicySpec, ParentRef, ProviderAuth, ProviderAuthType, RouteMatch, Target,
};
use crate::config::error::ConfigError;
use crate::config::load::{Key, Kind};
use crate::inject::sigv4;
use crate::provider;

impl Catalog {
    /// Gateways, then routes, then policies; the errors in that order.
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        self.validate_gateways(errors);
        self.validate_routes(errors);
        self.validate_policies(errors);
        self.validate_budgets(errors);
    }

    /// Each gateway: allowed hosts, listener names and ports (each unique), and modes Envoy's
    /// resources can express: one Envoy could not take was accepted here and left Envoy on the
    /// last resources it took, leaf certificate renewals included, while keyswap served the new.
    fn validate_gateways(&self, errors: &mut Vec<ConfigError>) {
        for (key, gw) in &self.gateways {
            let err = |f: &str, m: String| {
                ConfigError::new(m).at(&gw.origin).object(label(Kind::EgressGateway, key)).field(f)
            };
            for (i, entry) in gw.spec.allow.iter().enumerate() {
                if let Err(m) = crate::config::snapshot::Allowed::parse(entry) {
                    errors.push(err(&format!("spec.allow[{i}]"), m));
                }
            }
            let (mut names, mut ports) = (HashSet::new(), HashSet::new());
            for (i, l) in gw.spec.listeners.iter().enumerate() {
                if !names.insert(&l.name) {
                    errors.push(err(&format!("spec.listeners[{i}].name"), format!("`{}` is used twice", l.name)));
                }
                if l.port == 0 {
                    errors.push(err(&format!("spec.listeners[{i}].port"), "must be 1-65535".into()));
                } else if !ports.insert(l.port) {
                    errors.push(err(&format!("spec.listeners[{i}].port"), format!("{} is used twice", l.port)));
                }
                let https = l.protocol == crate::api::ListenerProtocol::Https;
                if https && l.tls.as_ref().is_some_and(|t| t.mode == crate::api::TlsMode::Passthrough) {
                    let m = "Passthrough is not supported by this build yet (Terminate is)".to_owned();
                    errors.push(err(&format!("spec.listeners[{i}].tls.mode"), m));
                }
            }
        }
    }

    /// Each route: its gateways exist, it has rules, each rule has matches, each match is valid.
    fn validate_routes(&self, errors: &mut Vec<ConfigError>) {
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
                    check_route_match(mt, &at, &err, errors);
                }
            }
        }
    }

    /// Each policy: its parents exist, its Secrets are in its own namespace, and it sets the
    /// fields its target uses (and no others).
    fn validate_policies(&self, errors: &mut Vec<ConfigError>) {
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
                check_by_tenant(&sel.by_tenant, &err, errors);
            }
            if s.secret_ref.name.is_empty() {
                errors.push(err("spec.secretRef.name".into(), "is required".into()));
            } else if !crate::vocab::is_object_name(&s.secret_ref.name) {
                errors.push(err("spec.secretRef.name".into(), NOT_AN_OBJECT_NAME.into()));
            }
            match s.target {
                Target::Header => check_header_target(s, &err, errors),
                Target::QueryParam => check_query_param_target(s, &err, errors),
                Target::ProviderAuth => check_provider_auth_target(s, &err, errors),
            }
            if s.provider_auth.is_some() && s.target != Target::ProviderAuth {
                errors.push(err("spec.providerAuth".into(), "applies only to target ProviderAuth".into()));
            }
            check_set_headers(s, &err, errors);
        }
    }

    /// `refs` name at least one parent, each of an `allowed` kind (the first one is the default)
    /// and present in the catalog.
    pub(super) fn check_parent_refs(
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
        // A route refused by one gateway is still attached where another admits it.
        let admitted_somewhere = refs.iter().any(|r| {
            matches!(resolve_ref(r, own, allowed[0]), Ok((Kind::EgressGateway, k))
                if self.gateways.get(&k).is_some_and(|g| g.spec.admits_routes_from(&k.namespace, &own.namespace)))
        });
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
                    } else if kind == Kind::EgressGateway
                        && !admitted_somewhere
                        && !self.gateways[&key].spec.admits_routes_from(&key.namespace, &own.namespace)
                    {
                        errors.push(err(
                            field,
                            format!(
                                "EgressGateway {key} does not admit routes from namespace `{}` (its spec.allowedRoutes.namespaces)",
                                own.namespace
                            ),
                        ));
                    }
                }
            }
        }
    }
}

/// One `matches[]` item of a route: a known provider, hosts (its own or the provider's),
/// endpoint paths, and models only where the provider puts them in the path. `at` names a field
/// of the match.
fn check_route_match(
    mt: &RouteMatch,
    at: &dyn Fn(&str) -> String,
    err: &dyn Fn(String, String) -> ConfigError,
    errors: &mut Vec<ConfigError>,
) {
    let Some(p) = provider::lookup(&mt.provider) else {
        let known = provider::names().collect::<Vec<_>>().join(", ");
        errors.push(err(at("provider"), format!("unknown provider `{}`; known: {known}", mt.provider)));
        return;
    };
    if mt.hosts.is_empty() && p.default_hosts.is_empty() {
        errors.push(err(at("hosts"), format!("provider `{}` has no default hosts: list them", p.name)));
    }
    if mt.hosts.len() > MAX_MATCH_HOSTS {
        errors.push(err(at("hosts"), format!("lists {} hosts; at most {MAX_MATCH_HOSTS} per match", mt.hosts.len())));
    }
    for (i, h) in mt.hosts.iter().enumerate().take(MAX_MATCH_HOSTS) {
        if let Err(msg) = check_host(h) {
            errors.push(err(at(&format!("hosts[{i}]")), msg));
        }
    }
    for (i, e) in mt.endpoints.iter().enumerate() {
        if !e.starts_with('/') || e.contains('?') {
            errors.push(err(
                at(&format!("endpoints[{i}]")),
                format!("{} must be a path starting with `/`, without a query", crate::config::load::shown(e)),
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

/// `credentialSelector.byTenant`: a name template with `{tenant}` once, or explicit tenants,
/// each reading a Secret of the policy's own namespace.
fn check_by_tenant(bt: &ByTenant, err: &dyn Fn(String, String) -> ConfigError, errors: &mut Vec<ConfigError>) {
    if bt.secret_name_template.is_none() && bt.tenants.is_empty() {
        errors.push(err("spec.credentialSelector.byTenant".into(), "needs secretNameTemplate or tenants".into()));
    }
    if let Some(t) = &bt.secret_name_template {
        if t.matches("{tenant}").count() != 1 || t == "{tenant}" {
            errors.push(err(
                "spec.credentialSelector.byTenant.secretNameTemplate".into(),
                format!(
                    "{} must contain `{{tenant}}` exactly once, with a fixed prefix or suffix",
                    crate::config::load::shown(t)
                ),
            ));
        }
    }
    for (tenant, ts) in &bt.tenants {
        if !crate::vocab::is_object_name(&ts.secret_ref.name) {
            errors.push(err(
                format!("spec.credentialSelector.byTenant.tenants.{tenant}.secretRef.name"),
                NOT_AN_OBJECT_NAME.into(),
            ));
        }
        if ts.secret_ref.namespace.is_some() {
            errors.push(err(
                format!("spec.credentialSelector.byTenant.tenants.{tenant}.secretRef.namespace"),
                "is not allowed: a policy reads Secrets only in its own namespace".into(),
            ));
        }
    }
}

/// `target: Header`: a header name that can carry a credential, a prefix without line breaks.
fn check_header_target(
    s: &CredentialInjectionPolicySpec,
    err: &dyn Fn(String, String) -> ConfigError,
    errors: &mut Vec<ConfigError>,
) {
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

/// `target: QueryParam`: a parameter name that cannot break the query, and no header fields.
fn check_query_param_target(
    s: &CredentialInjectionPolicySpec,
    err: &dyn Fn(String, String) -> ConfigError,
    errors: &mut Vec<ConfigError>,
) {
    match &s.query_param_name {
        Some(q) if q.is_empty() || q.contains(['&', '=', '#', '?', ' ']) => {
            let q = crate::config::load::shown(q);
            errors.push(err("spec.queryParamName".into(), format!("{q} is not a valid query parameter name")));
        }
        _ => {}
    }
    if s.header_name.is_some() || s.value_prefix.is_some() {
        errors.push(err("spec.headerName".into(), "headerName and valuePrefix apply only to target Header".into()));
    }
}

/// `target: ProviderAuth`: no header or parameter fields, and `providerAuth` valid for its type.
fn check_provider_auth_target(
    s: &CredentialInjectionPolicySpec,
    err: &dyn Fn(String, String) -> ConfigError,
    errors: &mut Vec<ConfigError>,
) {
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
            ProviderAuthType::AWSv4 => check_aws_v4(s, a, err, errors),
            ProviderAuthType::GCPServiceAccount => check_gcp_service_account(a, err, errors),
        },
    }
}

/// `providerAuth` of type AWSv4: no scopes, no `secretKey` (the key names are fixed), and a
/// well-formed region and service when set.
fn check_aws_v4(
    s: &CredentialInjectionPolicySpec,
    a: &ProviderAuth,
    err: &dyn Fn(String, String) -> ConfigError,
    errors: &mut Vec<ConfigError>,
) {
    if !a.scopes.is_empty() {
        errors.push(err("spec.providerAuth.scopes".into(), "applies only to type GCPServiceAccount".into()));
    }
    if s.secret_key.is_some() {
        errors.push(err(
            "spec.secretKey".into(),
            format!(
                "does not apply to AWSv4: the Secret holds the keys `{}`, `{}` and optionally `{}`",
                sigv4::ACCESS_KEY_ID,
                sigv4::SECRET_ACCESS_KEY,
                sigv4::SESSION_TOKEN
            ),
        ));
    }
    for (f, v) in [("region", &a.region), ("service", &a.service)] {
        if let Some(v) = v {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                let v = crate::config::load::shown(v);
                errors.push(err(format!("spec.providerAuth.{f}"), format!("{v} is not a valid AWS {f}")));
            }
        }
    }
}

/// `providerAuth` of type GCPServiceAccount: no region or service, and scopes without spaces.
fn check_gcp_service_account(
    a: &ProviderAuth,
    err: &dyn Fn(String, String) -> ConfigError,
    errors: &mut Vec<ConfigError>,
) {
    if a.region.is_some() || a.service.is_some() {
        errors.push(err("spec.providerAuth.region".into(), "region and service apply only to type AWSv4".into()));
    }
    if a.scopes.iter().any(|sc| sc.is_empty() || sc.contains(char::is_whitespace)) {
        errors.push(err("spec.providerAuth.scopes".into(), "each scope must be a non-empty URL without spaces".into()));
    }
}

/// The most hosts one match lists (errors name the field rather than one per host past it).
pub const MAX_MATCH_HOSTS: usize = 100;

pub(crate) fn check_host(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*')
        && !h.starts_with('.')
        && !h.ends_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a host name (no scheme, port or path; `*` stands for one DNS label)",
            crate::config::load::shown(h)
        ))
    }
}

/// What a Secret name that no Kubernetes object can have is told (not quoted: it may be a key).
const NOT_AN_OBJECT_NAME: &str =
    "is not a Kubernetes object name (lowercase letters, digits, `-` and `.`, at most 253 characters)";

/// At most this many `spec.setHeaders` per policy.
const MAX_SET_HEADERS: usize = 16;

/// `spec.setHeaders`: names a lenient server reads as distinct, none that carries a credential
/// or that Envoy, SigV4 or keyswap owns; values that travel in a header as written.
fn check_set_headers(
    s: &CredentialInjectionPolicySpec,
    err: &dyn Fn(String, String) -> ConfigError,
    errors: &mut Vec<ConfigError>,
) {
    if s.set_headers.len() > MAX_SET_HEADERS {
        errors.push(err(
            "spec.setHeaders".into(),
            format!("has {} entries; at most {MAX_SET_HEADERS}", s.set_headers.len()),
        ));
    }
    for (i, h) in s.set_headers.iter().enumerate() {
        let earlier = s.set_headers[..i].iter().any(|e| crate::vocab::same_header(&e.name, &h.name));
        let name = if earlier {
            Err(format!("`{}` is set twice (names are compared ignoring case, `_` read as `-`)", h.name))
        } else {
            check_set_header_name(&h.name, s.header_name.as_deref())
        };
        if let Err(m) = name {
            errors.push(err(format!("spec.setHeaders[{i}].name"), m));
        }
        let v = h.value.as_bytes();
        if v.is_empty() || v.len() > 1024 || v.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) || v[0] == b' ' {
            // The value is not secret, but a bad one is not echoed either: it could be a pasted key.
            errors.push(err(
                format!("spec.setHeaders[{i}].value"),
                "must be 1 to 1024 bytes with no control characters or leading space".into(),
            ));
        }
    }
}

/// A header name a policy may pin: not a credential header (the credential goes where
/// `target` says), not one Envoy, SigV4 or keyswap writes or reads as routing.
fn check_set_header_name(h: &str, policy_header: Option<&str>) -> Result<(), String> {
    // Read by keyswap on the agent's request (signing, method and body checks), or framing; the
    // method and path overrides it refuses; the forwarding headers the routes remove.
    const OWNED: &[&str] = &[
        "keep-alive",
        "proxy-connection",
        "expect",
        "traceparent",
        "tracestate",
        "content-type",
        "content-encoding",
        "accept-encoding",
    ];
    let owned = OWNED
        .iter()
        .chain(crate::target::METHOD_OVERRIDE_HEADERS)
        .chain(crate::target::PATH_OVERRIDE_HEADERS)
        .chain(&crate::vocab::FORWARDING_HEADERS);
    const OWNED_PREFIXES: &[&str] = &["x-envoy-", "x-keyswap-", "x-amz-", "x-forwarded-"];
    check_header_name(h)?;
    // A gateway's key beside the provider's may be pinned (LiteLLM, Portkey, Helicone in front).
    // (Never the policy's own header: a pinned value would overwrite the key.)
    let own = policy_header.as_slice().iter().any(|c| crate::vocab::same_header(c, h));
    let pinnable = !own && crate::vocab::GATEWAY_KEY_HEADERS.iter().any(|c| crate::vocab::same_header(c, h));
    let credential = crate::vocab::CREDENTIAL_HEADERS.iter().chain(policy_header.as_slice()).chain(&["set-cookie"]);
    if !pinnable && credential.into_iter().any(|c| crate::vocab::same_header(c, h)) {
        return Err(format!(
            "`{h}` carries a credential; the policy's `target` and `headerName` say where the key goes"
        ));
    }
    if h.contains('_') {
        let h = crate::config::load::shown(h);
        return Err(format!("{h} has `_`: write `-` (servers drop or fold names with underscores)"));
    }
    let lower = h.to_ascii_lowercase();
    if owned.into_iter().any(|o| *o == lower) || OWNED_PREFIXES.iter().any(|p| lower.starts_with(p)) {
        return Err(format!("`{h}` belongs to Envoy, SigV4 or keyswap and cannot be set by a policy"));
    }
    Ok(())
}

pub(super) fn check_header_name(h: &str) -> Result<(), String> {
    const FORBIDDEN: &[&str] = &["host", "content-length", "transfer-encoding", "connection", "te", "upgrade"];
    if h.is_empty()
        || h.starts_with(':')
        || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        // Not quoted: what fails here may be a key pasted into the wrong field.
        return Err("is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~, no `:`)".into());
    }
    if FORBIDDEN.iter().any(|f| f.eq_ignore_ascii_case(h)) {
        return Err(format!("`{h}` frames or routes the request; Envoy manages it"));
    }
    Ok(())
}
