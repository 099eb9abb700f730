//! Agent identity on the egress path: the ordered validator chain of `EgressGateway.spec.agentAuth`.
//!
//! The agent presents a per-agent token where its SDK already puts a key (`authorization:
//! Bearer`, `x-api-key`, `x-goog-api-key`, `api-key`) or in `x-keyswap-agent-token`. The first
//! validator that accepts it admits the request with an [`Identity`]; the token never leaves the
//! gateway (every credential header is stripped before the real key is written).
//!
//! Compiled into the [`crate::config::Snapshot`] like everything else: validating a token is a
//! SHA-256 and a hash lookup (API keys) or a constant-time comparison (shared token), no I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretSlice};
use sha2::{Digest, Sha256};

use crate::config::Key;

/// The header an agent can always use for its token, whatever its SDK sends otherwise.
pub const AGENT_TOKEN_HEADER: &str = "x-keyswap-agent-token";

/// Label that marks a Secret as an agent API key (what `keyswap token create` writes).
pub const API_KEY_LABEL: &str = "keyswap.dev/agent-token";

/// Headers an agent token is read from, in this order. `authorization` may carry `Bearer `.
pub const TOKEN_HEADERS: &[&str] = &[AGENT_TOKEN_HEADER, "authorization", "x-api-key", "x-goog-api-key", "api-key"];

/// Who is calling, as a validator established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub agent: Arc<str>,
    pub tenant: Option<Arc<str>>,
    /// The validator's name (`spec.agentAuth.validators[].name`, or its type).
    pub validator: Arc<str>,
}

/// One agent API key: identity, expiry, and the Secret it came from (for logs).
#[derive(Debug)]
pub struct ApiKey {
    pub identity: Identity,
    pub expires: Option<SystemTime>,
    pub secret: Key,
}

/// One link of the chain.
pub enum Validator {
    /// Per-agent tokens, looked up by their SHA-256.
    ApiKeys { name: Arc<str>, keys: HashMap<[u8; 32], ApiKey> },
    /// One token for every caller, from a Secret.
    SharedToken { name: Arc<str>, token: SecretSlice<u8>, identity: Identity },
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Validator::ApiKeys { name, keys } => write!(f, "ApiKeys({name}, {} keys)", keys.len()),
            Validator::SharedToken { name, identity, .. } => {
                write!(f, "SharedToken({name}, agent {}, <redacted>)", identity.agent)
            }
        }
    }
}

/// Why a request was not admitted: the `reason` in the 401 body and the span's `error.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// No token in any of [`TOKEN_HEADERS`] (or only the placeholder).
    MissingToken,
    /// A token no validator accepts.
    InvalidToken,
    /// An API key past its expiry.
    ExpiredToken,
}

impl Rejection {
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::MissingToken => "missing_agent_token",
            Rejection::InvalidToken => "invalid_agent_token",
            Rejection::ExpiredToken => "expired_agent_token",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Rejection::MissingToken => {
                "this gateway admits agents by token: send it as `x-keyswap-agent-token` or as the API key your SDK sends"
            }
            Rejection::InvalidToken => "the agent token is not valid here (unknown, revoked or malformed)",
            Rejection::ExpiredToken => "the agent token has expired",
        }
    }
}

/// The outcome of admission.
#[derive(Debug)]
pub enum Admission<'a> {
    Admitted(&'a Identity),
    /// No token, and the chain is `optional`.
    Anonymous,
    Rejected(Rejection),
}

/// `spec.agentAuth`, compiled.
#[derive(Debug)]
pub struct Chain {
    pub optional: bool,
    pub validators: Vec<Validator>,
    /// Per-tenant admission counters (`spec.agentAuth.metricsTenants`, then "other").
    pub counters: TenantCounters,
}

/// The token an agent sent and the header it came in: the placeholder and empty values count
/// as no token.
pub fn agent_token<'a>(headers: impl Iterator<Item = (&'a str, &'a [u8])> + Clone) -> Option<(&'a str, &'a [u8])> {
    for want in TOKEN_HEADERS {
        let Some((name, value)) = headers.clone().find(|(k, _)| k.eq_ignore_ascii_case(want)) else { continue };
        let token = if *want == "authorization" {
            match value.get(..7) {
                Some(p) if p.eq_ignore_ascii_case(b"bearer ") => value[7..].trim_ascii(),
                _ => continue,
            }
        } else {
            value.trim_ascii()
        };
        if !crate::inject::is_placeholder(token) {
            return Some((name, token));
        }
    }
    None
}

/// SHA-256 of a token, as API-key Secrets store it (hex).
pub fn token_digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal-length byte strings compared without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Chain {
    /// Runs the chain on `token` (from [`agent_token`]).
    pub fn admit(&self, token: Option<&[u8]>, now: SystemTime) -> Admission<'_> {
        let Some(token) = token else {
            return if self.optional { Admission::Anonymous } else { Admission::Rejected(Rejection::MissingToken) };
        };
        let mut rejection = Rejection::InvalidToken;
        let digest = token_digest(token);
        for v in &self.validators {
            match v {
                Validator::ApiKeys { keys, .. } => {
                    // The map finds the candidate; the digest comparison itself is constant-time.
                    if let Some((stored, key)) = keys.get_key_value(&digest) {
                        if !constant_time_eq(stored, &digest) {
                            continue;
                        }
                        if key.expires.is_some_and(|e| e <= now) {
                            rejection = Rejection::ExpiredToken;
                            continue;
                        }
                        return Admission::Admitted(&key.identity);
                    }
                }
                Validator::SharedToken { token: expected, identity, .. } => {
                    if constant_time_eq(expected.expose_secret(), token) {
                        return Admission::Admitted(identity);
                    }
                }
            }
        }
        Admission::Rejected(rejection)
    }

    /// Which validator would admit `token`, for `keyswap explain --token`.
    pub fn explain(&self, token: &str, now: SystemTime) -> String {
        match self.admit(Some(token.trim().as_bytes()), now) {
            Admission::Admitted(id) => format!(
                "admitted by validator `{}`: agent `{}`, tenant `{}`",
                id.validator,
                id.agent,
                id.tenant.as_deref().unwrap_or("-")
            ),
            Admission::Anonymous => "admitted as anonymous".into(),
            Admission::Rejected(r) => format!("rejected with 401 {}: {}", r.reason(), r.message()),
        }
    }
}

/// Admission counters by tenant, with bounded cardinality: the configured tenants by name,
/// everything else as "other". Lock-free on the request path; the registry lock is taken only
/// when a configuration is compiled and when `/metrics` renders.
#[derive(Debug)]
pub struct TenantCounters {
    named: Vec<(Arc<str>, Arc<AtomicU64>)>,
    other: Arc<AtomicU64>,
    anonymous: Arc<AtomicU64>,
    rejected: Arc<AtomicU64>,
}

type Registry = Mutex<std::collections::BTreeMap<String, Arc<AtomicU64>>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Default::default)
}

fn counter(label: &str) -> Arc<AtomicU64> {
    registry().lock().unwrap_or_else(|e| e.into_inner()).entry(label.to_owned()).or_default().clone()
}

impl TenantCounters {
    pub fn new(tenants: &[String]) -> Self {
        TenantCounters {
            named: tenants.iter().map(|t| (Arc::from(t.as_str()), counter(&format!("admitted\0{t}")))).collect(),
            other: counter("admitted\0other"),
            anonymous: counter("anonymous\0"),
            rejected: counter("rejected\0"),
        }
    }

    pub fn count(&self, admission: &Admission<'_>) {
        let c = match admission {
            Admission::Admitted(id) => match &id.tenant {
                Some(t) => self.named.iter().find(|(n, _)| **n == **t).map_or(&self.other, |(_, c)| c),
                None => &self.other,
            },
            Admission::Anonymous => &self.anonymous,
            Admission::Rejected(_) => &self.rejected,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The tenant label metrics use for `identity`.
    pub fn label<'a>(&'a self, identity: &Identity) -> &'a str {
        identity.tenant.as_ref().and_then(|t| self.named.iter().find(|(n, _)| **n == **t)).map_or("other", |(n, _)| n)
    }
}

/// Prometheus lines for agent admission (empty when no gateway ever used `agentAuth`).
pub fn render_metrics() -> String {
    let reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    if reg.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "# HELP keyswap_agent_admissions Requests admitted or refused by spec.agentAuth.\n# TYPE keyswap_agent_admissions counter\n",
    );
    for (label, c) in reg.iter() {
        let (result, tenant) = label.split_once('\0').unwrap_or((label, ""));
        let tenant = tenant.replace(['\\', '"', '\n'], "_");
        let v = c.load(Ordering::Relaxed);
        if tenant.is_empty() {
            out.push_str(&format!("keyswap_agent_admissions_total{{result=\"{result}\"}} {v}\n"));
        } else {
            out.push_str(&format!("keyswap_agent_admissions_total{{result=\"{result}\",tenant=\"{tenant}\"}} {v}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(optional: bool) -> Chain {
        let id = |agent: &str, tenant: &str| Identity {
            agent: agent.into(),
            tenant: Some(tenant.into()),
            validator: "apiKeys".into(),
        };
        let mut keys = HashMap::new();
        keys.insert(
            token_digest(b"ksa_alpha"),
            ApiKey { identity: id("alpha", "a"), expires: None, secret: Key::new("d", "x") },
        );
        keys.insert(
            token_digest(b"ksa_old"),
            ApiKey { identity: id("old", "a"), expires: Some(SystemTime::UNIX_EPOCH), secret: Key::new("d", "y") },
        );
        Chain {
            optional,
            validators: vec![
                Validator::ApiKeys { name: "apiKeys".into(), keys },
                Validator::SharedToken {
                    name: "shared".into(),
                    token: SecretSlice::from(b"team-token".to_vec()),
                    identity: id("ci", "b"),
                },
            ],
            counters: TenantCounters::new(&["a".into()]),
        }
    }

    #[test]
    fn the_first_validator_that_accepts_admits() {
        let c = chain(false);
        let now = SystemTime::now();
        assert!(matches!(c.admit(Some(b"ksa_alpha"), now), Admission::Admitted(id) if &*id.agent == "alpha"));
        assert!(matches!(c.admit(Some(b"team-token"), now), Admission::Admitted(id) if &*id.agent == "ci"));
        assert!(matches!(c.admit(Some(b"ksa_old"), now), Admission::Rejected(Rejection::ExpiredToken)));
        assert!(matches!(c.admit(Some(b"sk-real-key"), now), Admission::Rejected(Rejection::InvalidToken)));
        assert!(matches!(c.admit(None, now), Admission::Rejected(Rejection::MissingToken)));
        assert!(matches!(chain(true).admit(None, now), Admission::Anonymous));
        assert!(
            matches!(chain(true).admit(Some(b"nope"), now), Admission::Rejected(_)),
            "a bad token is never anonymous"
        );
        assert!(!format!("{:?}", c.validators).contains("team-token"));
    }

    #[test]
    fn tokens_come_from_the_sdk_credential_headers_and_never_the_placeholder() {
        let h = |pairs: &'static [(&'static str, &'static [u8])]| agent_token(pairs.iter().copied()).map(|(_, t)| t);
        assert_eq!(h(&[("Authorization", b"Bearer ksa_1")]), Some(&b"ksa_1"[..]));
        assert_eq!(h(&[("x-api-key", b"ksa_2"), ("x-keyswap-agent-token", b"ksa_3")]), Some(&b"ksa_3"[..]));
        assert_eq!(h(&[("x-api-key", b"keyswap-injected-by-proxy"), ("api-key", b"ksa_4")]), Some(&b"ksa_4"[..]));
        assert_eq!(h(&[("authorization", b"Basic abc")]), None);
        assert_eq!(h(&[("authorization", b"Bearer keyswap-injected-by-proxy")]), None);
    }
}
