//! Agent-auth compilation: a gateway's `spec.agentAuth` → an [`auth::Chain`], one validator type
//! at a time (edge trust, JWT, shared token, API keys), Secrets read from the gateway's namespace.

use std::collections::HashMap;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretSlice};

use super::validate::check_header_name;
use super::{label, Catalog, Entry, DEFAULT_SECRET_KEY};
use crate::api::{AgentAuth, AgentValidator, EdgeTrustValidator, JwtValidator, SharedTokenValidator};
use crate::auth;
use crate::config::error::{ConfigError, Origin};
use crate::config::load::{Key, Kind, SecretData};

impl Catalog {
    /// `spec.agentAuth` of `gateway`: the validators in order, API keys read from the labelled
    /// Secrets of the gateway's namespace.
    pub(super) fn compile_agent_auth(
        &self,
        gateway: &Key,
        a: &AgentAuth,
        errors: &mut Vec<ConfigError>,
        live: &mut Vec<SecretSlice<u8>>,
    ) -> auth::Chain {
        let origin = &self.gateways[gateway].origin;
        let mut c = AgentAuthCompile { catalog: self, gateway, origin, errors, live };
        if a.validators.is_empty() {
            c.err("spec.agentAuth.validators".into(), "needs at least one validator".into());
        }
        let (mut validators, mut scopes) = (Vec::new(), Vec::new());
        let mut names = std::collections::HashSet::new();
        for (i, v) in a.validators.iter().enumerate() {
            let at = format!("spec.agentAuth.validators[{i}]");
            let Some(kind) = validator_kind(v) else {
                c.err(at, "set exactly one of apiKeys, sharedToken, jwt, edgeTrust".into());
                continue;
            };
            let name: Arc<str> = v.name.as_deref().unwrap_or(kind).into();
            if name.is_empty() || name.contains('/') {
                c.err(format!("{at}.name"), "must be non-empty and hold no `/`".into());
            } else if !names.insert(name.clone()) {
                // (The name itself is not quoted back: whatever was pasted there stays out of logs.)
                let m = "is the name of an earlier validator too (or, unset, its type is): give each its own (spans \
                         and budgets kept per agent tell validators' agents apart by it)";
                c.err(format!("{at}.name"), m.into());
            }
            let scope = c.tenant_scope(&at, &v.tenants);
            let validator = if let Some(e) = &v.edge_trust {
                c.edge_trust(&at, name, e)
            } else if let Some(j) = &v.jwt {
                Some(c.jwt(&format!("{at}.jwt"), name, j))
            } else if let Some(st) = &v.shared_token {
                c.shared_token(&at, name, st)
            } else {
                Some(c.api_keys(name))
            };
            if let Some(auth::Validator::SharedToken { identity: auth::Identity { tenant, .. }, .. }) = &validator {
                if !scope.allows(tenant.as_deref()) {
                    c.err(format!("{at}.sharedToken.tenant"), "is not among the validator's `tenants`".into());
                }
            }
            if let Some(validator) = validator {
                validators.push(validator);
                scopes.push(scope);
            }
        }
        let edge_headers = edge_headers(&validators);
        auth::Chain {
            optional: a.optional,
            validators,
            scopes,
            counters: auth::TenantCounters::new(&a.metrics_tenants),
            edge_headers,
        }
    }
}

/// One gateway's agent-auth compile: where its Secrets are, where its errors point, and the
/// secret values it reads (for scrubbing).
struct AgentAuthCompile<'a> {
    catalog: &'a Catalog,
    gateway: &'a Key,
    origin: &'a Origin,
    errors: &'a mut Vec<ConfigError>,
    live: &'a mut Vec<SecretSlice<u8>>,
}

impl AgentAuthCompile<'_> {
    /// An error on a field of the gateway.
    fn err(&mut self, field: String, message: String) {
        self.errors.push(
            ConfigError::new(message).at(self.origin).object(label(Kind::EgressGateway, self.gateway)).field(field),
        );
    }

    /// A Secret a validator reads that is missing or unusable: an error on the Secret, not the
    /// gateway, so the rest of the configuration (every other rotation and revocation) still
    /// compiles, and that validator admits no one until the Secret is fixed. An error on the
    /// gateway would keep the last good configuration serving, and with it the token the
    /// operator just revoked by deleting its Secret.
    fn secret_err(&mut self, skey: &Key, at: &str, message: String) {
        let origin = self.catalog.secrets.get(skey).map_or(self.origin, |s| &s.origin);
        let gateway = label(Kind::EgressGateway, self.gateway);
        self.errors.push(
            ConfigError::new(format!("{message} ({gateway} `{at}`); until it is, that validator admits no one"))
                .at(origin)
                .object(label(Kind::Secret, skey)),
        );
    }

    /// A validator's `tenants`: names or `*` globs, none empty.
    fn tenant_scope(&mut self, at: &str, tenants: &[String]) -> auth::TenantScope {
        for (i, t) in tenants.iter().enumerate() {
            if t.trim().is_empty() {
                self.err(format!("{at}.tenants[{i}]"), "is empty: name a tenant, or a glob such as `partner-*`".into());
            }
        }
        auth::TenantScope(tenants.iter().map(|t| t.trim().into()).collect())
    }

    /// `edgeTrust`: the identity headers, trusted on mTLS connections or from the listed
    /// networks (one of them is required). `None` when the agent header is invalid.
    fn edge_trust(&mut self, at: &str, name: Arc<str>, e: &EdgeTrustValidator) -> Option<auth::Validator> {
        let mut cidrs = Vec::new();
        for (c, text) in e.trusted_cidrs.iter().enumerate() {
            match text.parse::<auth::Cidr>() {
                Ok(n) => cidrs.push(n),
                Err(m) => self.err(format!("{at}.edgeTrust.trustedCidrs[{c}]"), m),
            }
        }
        if !e.trust_mtls && cidrs.is_empty() {
            self.err(format!("{at}.edgeTrust"), "trusts nobody: set trustMtls or trustedCidrs".into());
        }
        if e.trust_mtls && e.mtls_peers.is_empty() {
            let m = "is required with trustMtls: the URI or DNS SANs of the hop's client certificate (in a \
                     service mesh every workload, an agent too, holds a certificate the CA signed); [\"*\"] trusts \
                     any certificate Envoy verified";
            self.err(format!("{at}.edgeTrust.mtlsPeers"), m.into());
        } else if !e.trust_mtls && !e.mtls_peers.is_empty() {
            self.err(format!("{at}.edgeTrust.mtlsPeers"), "applies only with trustMtls: true".into());
        }
        for (i, p) in e.mtls_peers.iter().enumerate().filter(|(_, p)| p.trim().is_empty()) {
            self.err(format!("{at}.edgeTrust.mtlsPeers[{i}]"), format!("`{p}` is empty"));
        }
        let agent_header = self.header(at, "agentHeader", &e.agent_header);
        let tenant_header = e.tenant_header.as_deref().and_then(|t| self.header(at, "tenantHeader", t));
        let agent_header = agent_header?;
        Some(auth::Validator::EdgeTrust(auth::EdgeTrust {
            name,
            agent_header,
            tenant_header,
            trust_mtls: e.trust_mtls,
            mtls_peers: e.mtls_peers.iter().map(|p| p.trim().into()).collect(),
            cidrs,
        }))
    }

    /// An edge-trust header name, lowercased; `None` (and an error on `field`) when invalid.
    fn header(&mut self, at: &str, field: &str, h: &str) -> Option<Box<str>> {
        match check_header_name(h) {
            Ok(()) => Some(h.to_ascii_lowercase().into_boxed_str()),
            Err(m) => {
                self.err(format!("{at}.edgeTrust.{field}"), m);
                None
            }
        }
    }

    /// `jwt` (at `at`): issuer, audiences, keys (a JWKS file or URL, or an HS256 Secret) and the
    /// claims that name the caller.
    fn jwt(&mut self, at: &str, name: Arc<str>, j: &JwtValidator) -> auth::Validator {
        if j.issuer.is_empty() {
            self.err(format!("{at}.issuer"), "is required".into());
        }
        if j.audiences.is_empty() || j.audiences.iter().any(String::is_empty) {
            self.err(format!("{at}.audiences"), "needs at least one non-empty audience".into());
        }
        let jwks = self.jwks(at, j);
        if j.hs256_secret_ref.as_ref().is_some_and(|r| r.namespace.is_some()) {
            self.err(
                format!("{at}.hs256SecretRef.namespace"),
                "is not allowed: agentAuth reads Secrets only in the gateway's own namespace".into(),
            );
        }
        let hs256 = j.hs256_secret_ref.as_ref().and_then(|r| self.hs256_key(at, &r.name, j));
        if j.jwks_file.is_none() && j.jwks_url.is_none() && j.hs256_secret_ref.is_none() {
            self.err(at.to_owned(), "needs keys: jwksFile, jwksUrl or hs256SecretRef".into());
        }
        let m = j.claim_mapping.clone().unwrap_or_default();
        auth::Validator::Jwt(Box::new(auth::jwt::JwtValidator {
            name,
            jwks,
            hs256,
            validation: auth::jwt::JwtValidator::validation(&j.issuer, &j.audiences, j.leeway_seconds.unwrap_or(30)),
            claims: auth::jwt::ClaimMapping {
                subject: m.subject.unwrap_or_else(|| "sub".into()),
                tenant: m.tenant,
                role: m.role,
            },
            cache: Default::default(),
        }))
    }

    /// The JWKS of a `jwt` validator: from `jwksFile` or an https:// `jwksUrl` (not both),
    /// refreshed every `jwksRefreshSeconds` (at least 10).
    fn jwks(&mut self, at: &str, j: &JwtValidator) -> Option<Arc<auth::jwt::Jwks>> {
        let refresh = std::time::Duration::from_secs(j.jwks_refresh_seconds.unwrap_or(300).max(10));
        let source = match (&j.jwks_file, &j.jwks_url) {
            (Some(_), Some(_)) => {
                self.err(at.to_owned(), "set jwksFile or jwksUrl, not both".into());
                None
            }
            (Some(f), None) => Some(auth::jwt::Source::File(f.into())),
            (None, Some(u)) if u.starts_with("https://") && u.parse::<hyper::Uri>().is_ok() => {
                Some(auth::jwt::Source::Url(u.clone()))
            }
            (None, Some(_)) => {
                // (Not quoted: a URL may carry `user:token@`.)
                self.err(format!("{at}.jwksUrl"), "must be an https:// URL".into());
                None
            }
            (None, None) => None,
        };
        let (jwks, problem) = auth::jwt::Jwks::for_source(source?, refresh);
        if let Some(m) = problem {
            // Not an error on the gateway: that would refuse the whole reload, and with it every
            // other rotation and revocation, while a mounted file is briefly unreadable.
            let gateway = label(Kind::EgressGateway, self.gateway);
            self.errors.push(ConfigError::new(format!("{gateway} `{at}.jwksFile`: {m}")).at(self.origin));
        }
        Some(jwks)
    }

    /// The HS256 key of a `jwt` validator: Secret `secret_name`, at least 32 bytes.
    fn hs256_key(&mut self, at: &str, secret_name: &str, j: &JwtValidator) -> Option<jsonwebtoken::DecodingKey> {
        let skey = Key::new(self.gateway.namespace.clone(), secret_name.to_owned());
        let key_name = j.hs256_secret_key.as_deref().unwrap_or(DEFAULT_SECRET_KEY);
        match self.catalog.secrets.get(&skey).and_then(|d| d.spec.entries.get(key_name)) {
            Some(v) if v.expose_secret().trim_ascii().len() >= 32 => {
                let v = v.expose_secret().trim_ascii();
                self.live.push(SecretSlice::from(v.to_vec()));
                Some(jsonwebtoken::DecodingKey::from_secret(v))
            }
            Some(_) => {
                let m = format!("key `{key_name}` must hold at least 32 bytes for HS256");
                self.secret_err(&skey, &format!("{at}.hs256SecretRef"), m);
                None
            }
            None => {
                let m = format!("key `{key_name}` is required for HS256 and missing (or the Secret is)");
                self.secret_err(&skey, &format!("{at}.hs256SecretRef"), m);
                None
            }
        }
    }

    /// `sharedToken`: one token for every caller, read from a Secret; `None` (no validator: its
    /// token admits no one, an error on the Secret) when the Secret or its key is missing or empty.
    fn shared_token(&mut self, at: &str, name: Arc<str>, st: &SharedTokenValidator) -> Option<auth::Validator> {
        if st.secret_ref.namespace.is_some() {
            self.err(
                format!("{at}.sharedToken.secretRef.namespace"),
                "is not allowed: agentAuth reads Secrets only in the gateway's own namespace".into(),
            );
        }
        let skey = Key::new(self.gateway.namespace.clone(), st.secret_ref.name.clone());
        let key_name = st.secret_key.as_deref().unwrap_or(DEFAULT_SECRET_KEY);
        let value = self.catalog.secrets.get(&skey).and_then(|d| d.spec.entries.get(key_name));
        let Some(value) = value.map(|v| v.expose_secret().trim_ascii()).filter(|v| !v.is_empty()) else {
            let m =
                format!("a non-empty key `{key_name}` is required for the shared token and missing (or the Secret is)");
            self.secret_err(&skey, &format!("{at}.sharedToken.secretRef"), m);
            return None;
        };
        self.live.push(SecretSlice::from(value.to_vec()));
        let identity = auth::Identity {
            agent: st.agent.as_deref().unwrap_or("shared").into(),
            tenant: st.tenant.as_deref().map(Arc::from),
            validator: name.clone(),
            role: None,
            labels: Vec::new(),
        };
        Some(auth::Validator::SharedToken { name, digest: auth::token_digest(value), identity })
    }

    /// `apiKeys`: every Secret of the gateway's namespace labelled as an agent token. A token
    /// Secret that does not parse is an error on the Secret, and left out. A digest two Secrets
    /// carry admits no one: whoever can create a labelled Secret could otherwise copy another
    /// agent's digest and rebind that agent's token to an identity (a tenant, a key) of its own.
    fn api_keys(&mut self, name: Arc<str>) -> auth::Validator {
        let mut keys: HashMap<[u8; 32], auth::ApiKey> = HashMap::new();
        let mut shared = Vec::new();
        let namespace = &self.gateway.namespace;
        for (skey, sec) in self.catalog.secrets.iter().filter(|(k, _)| &k.namespace == namespace) {
            if sec.spec.labels.get(auth::API_KEY_LABEL).map(String::as_str) != Some("true") {
                continue;
            }
            let serr =
                |f: &str, m: String| ConfigError::new(m).at(&sec.origin).object(label(Kind::Secret, skey)).field(f);
            match api_key(skey, sec, &name) {
                Ok((digest, key)) => match keys.get(&digest) {
                    Some(first) => {
                        let m = format!(
                            "the same token is already Secret {}: that token admits no one until one of the two changes",
                            first.secret
                        );
                        self.errors.push(serr("sha256", m));
                        shared.push(digest);
                    }
                    None => {
                        keys.insert(digest, key);
                    }
                },
                Err((field, message)) => self.errors.push(serr(field, message)),
            }
        }
        for digest in &shared {
            keys.remove(digest);
        }
        auth::Validator::ApiKeys { name, keys }
    }
}

/// The one validator type `v` sets; `None` when it sets none or several.
fn validator_kind(v: &AgentValidator) -> Option<&'static str> {
    let kinds = [
        ("apiKeys", v.api_keys.is_some()),
        ("sharedToken", v.shared_token.is_some()),
        ("jwt", v.jwt.is_some()),
        ("edgeTrust", v.edge_trust.is_some()),
    ];
    let set: Vec<&str> = kinds.iter().filter(|(_, on)| *on).map(|(k, _)| *k).collect();
    let [kind] = set.as_slice() else { return None };
    Some(*kind)
}

/// One agent-token Secret of validator `validator`: the SHA-256 of the token, and the identity it
/// admits (until `expires`, when set). An error names the field: (field, message).
fn api_key(
    skey: &Key,
    sec: &Entry<SecretData>,
    validator: &Arc<str>,
) -> Result<([u8; 32], auth::ApiKey), (&'static str, String)> {
    let text =
        |k: &str| sec.spec.entries.get(k).and_then(|v| std::str::from_utf8(v.expose_secret()).ok()).map(str::trim);
    let Some(digest) = text("sha256").and_then(parse_digest) else {
        return Err(("sha256", "must be the 64-hex-digit SHA-256 of the agent token".into()));
    };
    let Some(agent) = text("agent").filter(|a| !a.is_empty()) else {
        return Err(("agent", "is required (the agent's name)".into()));
    };
    let expires = match text("expires").filter(|e| !e.is_empty()) {
        None => None,
        Some(e) => match e.parse::<k8s_openapi::jiff::Timestamp>() {
            Ok(t) => Some(std::time::SystemTime::from(t)),
            Err(_) => {
                let e = crate::config::load::shown(e);
                return Err(("expires", format!("{e} is not an RFC 3339 time (e.g. 2027-01-31T00:00:00Z)")));
            }
        },
    };
    let key = auth::ApiKey {
        identity: auth::Identity {
            agent: agent.into(),
            tenant: text("tenant").filter(|t| !t.is_empty()).map(Arc::from),
            validator: validator.clone(),
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
    Ok((digest, key))
}

/// The header names edge-trust validators read (never forwarded upstream).
fn edge_headers(validators: &[auth::Validator]) -> Vec<Box<str>> {
    validators
        .iter()
        .flat_map(|v| match v {
            auth::Validator::EdgeTrust(e) => vec![e.agent_header.clone()].into_iter().chain(e.tenant_header.clone()),
            _ => Vec::new().into_iter().chain(None),
        })
        .collect()
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
