//! Binding: a policy and its Secrets → the credential a route's requests carry (a header, a query
//! parameter, a SigV4 signer or a GCP token source), and what the agent may not send.

use std::collections::HashMap;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretSlice};

use super::{fingerprint, label, Catalog, Entry, DEFAULT_SECRET_KEY};
use crate::api::{CredentialInjectionPolicySpec, ProviderAuth, ProviderAuthType, Target};
use crate::config::error::ConfigError;
use crate::config::load::{validate_secret_value, Key, Kind, SecretData};
use crate::config::snapshot::{Binding, Credential, SecretUse, TenantCredentials, Unresolved};
use crate::inject::{gcp, sigv4, Strip};
use crate::provider::{self, Provider, CREDENTIAL_HEADERS};

/// A Secret key's value, or why it has none (the binding then fails closed).
type Value<'a> = Result<&'a SecretSlice<u8>, Unresolved>;

impl Catalog {
    /// Binds a policy to one provider: its own Secret, and with `credentialSelector` each
    /// tenant's (explicit ones first, then every Secret the name template matches).
    pub(super) fn bind(
        &self,
        pkey: &Key,
        p: &'static Provider,
        secrets: &mut Vec<SecretUse>,
        live: &mut Vec<SecretSlice<u8>>,
    ) -> Result<Binding, ConfigError> {
        let pol = &self.policies[pkey];
        let mut binding = self.bind_secret(pkey, p, &pol.spec.secret_ref.name, None, secrets, live)?;
        let Some(sel) = &pol.spec.credential_selector else { return Ok(binding) };
        let mut by_tenant = HashMap::new();
        // A tenant's Secret that cannot be used fails that tenant closed (503), not the policy:
        // one tenant's bad value (or a Secret that only matches the template) must not take the
        // house key and every other tenant's down with it.
        let tenant_key = |b: Result<Binding, ConfigError>, secret: &str| {
            b.map(|b| b.credential).unwrap_or_else(|e| {
                let secret = Key::new(pkey.namespace.clone(), secret.to_owned());
                Err(Unresolved::InvalidSecret { secret, key: e.field.unwrap_or_default(), message: e.message })
            })
        };
        for (tenant, ts) in &sel.by_tenant.tenants {
            let b = self.bind_secret(pkey, p, &ts.secret_ref.name, ts.secret_key.as_deref(), secrets, live);
            by_tenant.insert(tenant.as_str().into(), tenant_key(b, &ts.secret_ref.name));
        }
        if let Some((pre, post)) = sel.by_tenant.secret_name_template.as_deref().and_then(|t| t.split_once("{tenant}"))
        {
            let gateways_own = self.gateways_own_secrets();
            // Nor this policy's house key, nor a tenant's Secret named like another tenant's: a
            // caller naming its tenant `house` under `{tenant}-anthropic` would get the house key
            // `house-anthropic` that `fallback: Deny` withholds, or naming `initech`, globex's key
            // kept in `initech-anthropic`. (Other policies' Secrets follow the template's naming
            // for their own reasons: a tenant's key a dedicated route also uses stays its key.)
            let house = Key::new(pkey.namespace.clone(), pol.spec.secret_ref.name.clone());
            let assigned: HashMap<&str, &str> =
                sel.by_tenant.tenants.iter().map(|(t, ts)| (ts.secret_ref.name.as_str(), t.as_str())).collect();
            let taken = |k: &Key, tenant: &str| {
                gateways_own.contains(k) || *k == house || assigned.get(k.name.as_str()).is_some_and(|t| *t != tenant)
            };
            for skey in self.secrets.keys().filter(|k| k.namespace == pkey.namespace) {
                let n = &skey.name;
                if n.len() <= pre.len() + post.len() || !n.starts_with(pre) || !n.ends_with(post) {
                    continue;
                }
                let tenant = &n[pre.len()..n.len() - post.len()];
                if by_tenant.contains_key(tenant) || taken(skey, tenant) {
                    continue;
                }
                let b = self.bind_secret(pkey, p, n, None, secrets, live);
                by_tenant.insert(tenant.into(), tenant_key(b, n));
            }
        }
        let template = sel.by_tenant.secret_name_template.as_deref();
        let unlisted = template
            .filter(|_| self.unlisted.contains(&pkey.namespace))
            .map(|t| Unresolved::SecretNotFound { secret: Key::new(pkey.namespace.clone(), t.to_owned()) });
        binding.tenants = Some(TenantCredentials { by_tenant, fallback: sel.fallback, unlisted });
        Ok(binding)
    }

    /// The Secrets gateways read for themselves: agent tokens (labelled), shared tokens and HS256
    /// keys, the budget store's URL. A tenant template matches none of them: a caller naming its
    /// tenant `ci` under `{tenant}-token` would otherwise have the shared agent token (or, under
    /// `{tenant}`, any of them) written upstream as its provider key.
    fn gateways_own_secrets(&self) -> std::collections::HashSet<Key> {
        let mut own: std::collections::HashSet<Key> = self
            .secrets
            .iter()
            .filter(|(_, s)| s.spec.labels.get(crate::auth::API_KEY_LABEL).map(String::as_str) == Some("true"))
            .map(|(k, _)| k.clone())
            .collect();
        for (gkey, g) in &self.gateways {
            let at = |name: &str| Key::new(gkey.namespace.clone(), name.to_owned());
            for v in g.spec.agent_auth.iter().flat_map(|a| &a.validators) {
                own.extend(v.shared_token.as_ref().map(|t| at(&t.secret_ref.name)));
                own.extend(v.jwt.as_ref().and_then(|j| j.hs256_secret_ref.as_ref()).map(|r| at(&r.name)));
            }
            own.extend(g.spec.budget_store.as_ref().map(|b| at(&b.redis.secret_ref.name)));
        }
        own
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
        let raw = self.secret_value(&secret_key, &key_name)?;
        record_use(&secret_key, &key_name, &raw, secrets, live);
        let (credential, header, param) = match s.target {
            Target::Header => {
                let (name, cred) = header_credential(s, p, raw).map_err(|m| err("spec.headerName", m))?;
                (cred, Some(name), None)
            }
            Target::QueryParam => {
                let (param, cred) = query_credential(s, p, raw).map_err(|m| err("spec.queryParamName", m))?;
                (cred, None, Some(param))
            }
            Target::ProviderAuth => {
                return Err(err("spec.providerAuth", "is required when target is ProviderAuth".into()))
            }
        };
        Ok(Binding {
            policy: Some(pkey.to_string().into()),
            credential,
            strip: Strip {
                headers: strip_headers(header.as_deref()),
                query: strip_query(p, param.as_deref()),
                pinned: pinned(s),
            },
            tenants: None,
        })
    }

    /// Key `key_name` of Secret `secret_key`, or why there is none. A value that cannot travel in
    /// a header or parameter (a line break, …) is an error on the Secret.
    fn secret_value(&self, secret_key: &Key, key_name: &str) -> Result<Value<'_>, ConfigError> {
        let raw = match self.secrets.get(secret_key) {
            None => Err(Unresolved::SecretNotFound { secret: secret_key.clone() }),
            Some(sec) => sec
                .spec
                .entries
                .get(key_name)
                .ok_or_else(|| Unresolved::KeyNotFound { secret: secret_key.clone(), key: key_name.to_owned() }),
        };
        if let (Ok(v), Some(sec)) = (&raw, self.secrets.get(secret_key)) {
            if let Err(m) = validate_secret_value(v.expose_secret()) {
                return Err(ConfigError::new(m)
                    .at(&sec.origin)
                    .object(label(Kind::Secret, secret_key))
                    .field(key_name.to_owned()));
            }
        }
        Ok(raw)
    }

    /// Binds a `target: ProviderAuth` policy: AWS keys for SigV4, or a service-account key for
    /// GCP tokens. Missing or malformed keys compile to a binding that fails closed, named.
    fn bind_provider_auth(
        &self,
        pkey: &Key,
        p: &'static Provider,
        auth: &ProviderAuth,
        (secret_key, key_override): (&Key, Option<&str>),
        secrets: &mut Vec<SecretUse>,
        live: &mut Vec<SecretSlice<u8>>,
    ) -> Binding {
        let s = &self.policies[pkey].spec;
        let mut keys = SecretKeys { secret_key, data: self.secrets.get(secret_key), secrets, live };
        let credential = match auth.kind {
            ProviderAuthType::AWSv4 => aws_v4_credential(&mut keys, auth),
            ProviderAuthType::GCPServiceAccount => {
                let key = key_override
                    .map(str::to_owned)
                    .or_else(|| s.secret_key.clone())
                    .unwrap_or_else(|| gcp::DEFAULT_SECRET_KEY.into());
                gcp_credential(&mut keys, auth, key)
            }
        };
        Binding {
            policy: Some(pkey.to_string().into()),
            credential,
            strip: Strip { headers: strip_headers(None), query: strip_query(p, None), pinned: pinned(s) },
            tenants: None,
        }
    }
}

/// A policy's `spec.setHeaders`, names lowercased (validated before binding).
fn pinned(s: &CredentialInjectionPolicySpec) -> Box<[(Box<str>, Box<str>)]> {
    s.set_headers.iter().map(|h| (h.name.to_ascii_lowercase().into(), h.value.as_str().into())).collect()
}

/// Records a Secret key a binding reads: its value (and its query-encoded form, and the form JSON
/// encoders that escape `/` write, when different) for scrubbing, and its use, by fingerprint
/// (none when missing).
fn record_use(
    secret_key: &Key,
    key_name: &str,
    raw: &Value<'_>,
    secrets: &mut Vec<SecretUse>,
    live: &mut Vec<SecretSlice<u8>>,
) {
    if let Ok(v) = raw {
        scrub_forms(v.expose_secret(), live);
    }
    secrets.push(SecretUse {
        secret: secret_key.clone(),
        key: key_name.to_owned(),
        fingerprint: raw.as_ref().ok().map(|v| fingerprint(v.expose_secret())),
    });
}

/// Records `v` for scrubbing as it is sent, its query-encoded form, and the forms JSON encoders
/// that escape `/`, or the HTML-sensitive `+ = < > & '` as `\u00XX` (ASP.NET's default encoder,
/// Gson), write (when different). A value stored with its authentication scheme (`Bearer sk-…`,
/// `Token …`) is recorded bare too, in the same forms: an upstream that quotes the credential it
/// was sent quotes the token without its scheme as often as with it.
fn scrub_forms(v: &[u8], live: &mut Vec<SecretSlice<u8>>) {
    if let Some(token) = after_scheme(v) {
        forms_of(token, live);
    }
    forms_of(v, live);
}

/// The credential of `scheme SP credential` (RFC 9110's `auth-scheme`: a token of letters, digits
/// and `-`, up to 20 bytes): the rest, when it holds no space and is at least 8 bytes (shorter
/// than any key, and short strings scrubbed from every answer would maim it).
fn after_scheme(v: &[u8]) -> Option<&[u8]> {
    let sp = v.iter().position(|&b| b == b' ')?;
    let (scheme, token) = (&v[..sp], v[sp + 1..].trim_ascii());
    let scheme_ok = (1..=20).contains(&scheme.len()) && scheme.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-');
    (scheme_ok && token.len() >= 8 && !token.contains(&b' ')).then_some(token)
}

/// [`scrub_forms`] of one value.
fn forms_of(v: &[u8], live: &mut Vec<SecretSlice<u8>>) {
    // What each encoder escapes, and how: System.Text.Json (ASP.NET) `+ < > & '` in uppercase
    // hex, Gson `= < > & '` in lowercase.
    for (sensitive, hex) in [(b"+<>&'", b"0123456789ABCDEF"), (b"=<>&'", b"0123456789abcdef")] {
        if v.iter().any(|b| sensitive.contains(b)) {
            let mut escaped = Vec::with_capacity(6 * v.len());
            for &b in v {
                if sensitive.contains(&b) {
                    escaped.extend_from_slice(b"\\u00");
                    escaped.extend_from_slice(&[hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
                } else {
                    escaped.push(b);
                }
            }
            live.push(SecretSlice::from(escaped));
        }
    }
    live.push(SecretSlice::from(v.to_vec()));
    let encoded = crate::inject::query::encode_value(v);
    if encoded.as_bytes() != v {
        live.push(SecretSlice::from(encoded.into_bytes()));
    }
    // `"sk\/…"`: PHP's json_encode and some Java encoders escape every `/` in a string.
    if v.contains(&b'/') {
        let mut escaped = Vec::with_capacity(2 * v.len());
        for &b in v {
            if b == b'/' {
                escaped.push(b'\\');
            }
            escaped.push(b);
        }
        live.push(SecretSlice::from(escaped));
    }
}

/// A `target: Header` credential: the policy's header, else the provider's default (whose prefix
/// applies unless the policy sets one). Returns the header name; an error when there is none.
fn header_credential(
    s: &CredentialInjectionPolicySpec,
    p: &Provider,
    raw: Value<'_>,
) -> Result<(String, Result<Credential, Unresolved>), String> {
    let (name, default_prefix) = match (&s.header_name, p.default_header) {
        (Some(h), Some(d)) if h.eq_ignore_ascii_case(d.name) => (d.name.to_owned(), d.prefix),
        (Some(h), _) => (h.to_ascii_lowercase(), ""),
        (None, Some(d)) => (d.name.to_owned(), d.prefix),
        (None, None) => return Err(format!("is required: provider `{}` has no default header", p.name)),
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
    Ok((name, cred))
}

/// A `target: QueryParam` credential: the policy's parameter, else the provider's first key
/// parameter; the value query-encoded. Returns the parameter name; an error when there is none.
fn query_credential(
    s: &CredentialInjectionPolicySpec,
    p: &Provider,
    raw: Value<'_>,
) -> Result<(String, Result<Credential, Unresolved>), String> {
    let param = match (&s.query_param_name, p.credential_query_params.first()) {
        (Some(q), _) => q.clone(),
        (None, Some(d)) => (*d).to_owned(),
        (None, None) => return Err(format!("is required: provider `{}` has no default key parameter", p.name)),
    };
    let cred = raw.map(|v| Credential::Query {
        param: param.clone().into(),
        fingerprint: fingerprint(v.expose_secret()),
        value: SecretSlice::from(crate::inject::query::encode_value(v.expose_secret()).into_bytes()),
    });
    Ok((param, cred))
}

/// Reads the keys of one Secret for a `target: ProviderAuth` binding, recording each use and
/// value as it goes.
struct SecretKeys<'a> {
    secret_key: &'a Key,
    data: Option<&'a Entry<SecretData>>,
    secrets: &'a mut Vec<SecretUse>,
    live: &'a mut Vec<SecretSlice<u8>>,
}

impl SecretKeys<'_> {
    /// Key `key` as trimmed UTF-8 text; `None` when an optional key is missing.
    fn read(&mut self, key: &str, required: bool) -> Result<Option<String>, Unresolved> {
        let raw = match self.data {
            None => return Err(Unresolved::SecretNotFound { secret: self.secret_key.clone() }),
            Some(d) => d.spec.entries.get(key),
        };
        let Some(raw) = raw else {
            if required {
                self.secrets.push(SecretUse { secret: self.secret_key.clone(), key: key.into(), fingerprint: None });
                return Err(Unresolved::KeyNotFound { secret: self.secret_key.clone(), key: key.into() });
            }
            return Ok(None);
        };
        let v = raw.expose_secret();
        self.secrets.push(SecretUse {
            secret: self.secret_key.clone(),
            key: key.into(),
            fingerprint: Some(fingerprint(v)),
        });
        let text = std::str::from_utf8(v).map_err(|_| self.invalid(key, "is not UTF-8 text".into()))?.trim();
        // Scrubbed as it is sent (a session token travels in `x-amz-security-token`): a file
        // written by `echo` ends with a newline no echo of the header carries.
        scrub_forms(text.as_bytes(), self.live);
        Ok(Some(text.to_owned()))
    }

    /// Key `key` is there but unusable; `message` never contains the value.
    fn invalid(&self, key: &str, message: String) -> Unresolved {
        Unresolved::InvalidSecret { secret: self.secret_key.clone(), key: key.into(), message }
    }
}

/// A SigV4 signer: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (neither empty), optionally
/// `AWS_SESSION_TOKEN`; region and service from the policy, else from each host.
fn aws_v4_credential(keys: &mut SecretKeys<'_>, auth: &ProviderAuth) -> Result<Credential, Unresolved> {
    let id = keys.read(sigv4::ACCESS_KEY_ID, true)?.unwrap_or_default();
    let secret = keys.read(sigv4::SECRET_ACCESS_KEY, true)?.unwrap_or_default();
    let token = keys.read(sigv4::SESSION_TOKEN, false)?;
    for (key, v) in [(sigv4::ACCESS_KEY_ID, &id), (sigv4::SECRET_ACCESS_KEY, &secret)] {
        if v.is_empty() {
            return Err(keys.invalid(key, "is empty".into()));
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
}

/// A GCP token source: the service-account key JSON in key `key`, checked now; scopes from the
/// policy, else the default.
fn gcp_credential(keys: &mut SecretKeys<'_>, auth: &ProviderAuth, key: String) -> Result<Credential, Unresolved> {
    let json = keys.read(&key, true)?.unwrap_or_default();
    let account = gcp::check_key(&json).map_err(|message| keys.invalid(&key, message))?;
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&json) {
        // The private key alone (as it would appear in a body) is scrubbed too.
        if let Some(pk) = v.get("private_key").and_then(|p| p.as_str()) {
            keys.live.push(SecretSlice::from(pk.as_bytes().to_vec()));
        }
    }
    let scopes = if auth.scopes.is_empty() { vec![gcp::DEFAULT_SCOPE.to_owned()] } else { auth.scopes.clone() };
    let fp = fingerprint(json.as_bytes());
    let source = gcp::TokenSource::for_key(&json.into(), account, scopes, fp);
    Ok(Credential::GcpToken(source))
}

/// SigV4 needs a region: from the policy, or from every exact host of the match.
pub(super) fn region_error(binding: &Binding, hosts: &[Box<str>]) -> Option<ConfigError> {
    let Ok(Credential::AwsV4(signer)) = &binding.credential else { return None };
    let bad = hosts
        .iter()
        .find(|h| !crate::glob::is_pattern(h) && matches!(signer.scope(h), Err(sigv4::SignError::NoRegion { .. })))?;
    Some(ConfigError::new(format!(
        "host `{bad}` names no AWS region and policy {} sets no spec.providerAuth.region",
        binding.policy.as_deref().unwrap_or("-")
    )))
}

pub(super) fn strip_headers(policy_header: Option<&str>) -> Box<[Box<str>]> {
    let mut v: Vec<Box<str>> = CREDENTIAL_HEADERS.iter().map(|h| Box::from(*h)).collect();
    if let Some(h) = policy_header {
        if !v.iter().any(|x| &**x == h) {
            v.push(h.into());
        }
    }
    v.into_boxed_slice()
}

pub(super) fn strip_query(p: &Provider, policy_param: Option<&str>) -> Box<[Box<str>]> {
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
