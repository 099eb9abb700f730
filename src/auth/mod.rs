//! Agent identity on the egress path: the ordered validator chain of `EgressGateway.spec.agentAuth`.
//!
//! The agent presents a per-agent token where its SDK already puts a key (`authorization:
//! Bearer`, `x-api-key`, `x-goog-api-key`, `api-key`) or in `x-keyswap-agent-token`. The first
//! validator that accepts it admits the request with an [`Identity`]; the token never leaves the
//! gateway (every credential header is stripped before the real key is written).
//!
//! Compiled into the [`crate::config::Snapshot`] like everything else: validating a token is a
//! SHA-256 and a hash lookup (API keys) or a constant-time comparison (shared token), no I/O.

pub mod jwt;
pub mod verified;

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::vocab::Key;
pub use crate::vocab::{Identity, AGENT_TOKEN_HEADER};

/// Label that marks a Secret as an agent API key (what `keyswap token create` writes).
pub const API_KEY_LABEL: &str = "keyswap.dev/agent-token";

/// Headers an agent token is read from, in this order. `authorization` may carry `Bearer `.
pub const TOKEN_HEADERS: &[&str] = &[AGENT_TOKEN_HEADER, "authorization", "x-api-key", "x-goog-api-key", "api-key"];

/// What Envoy reports about the downstream connection (ext_proc request attributes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// `connection.mtls`: the client presented a certificate Envoy verified.
    pub mtls: bool,
    /// `source.address`, when it is an IP address.
    pub source: Option<IpAddr>,
    /// The verified client certificate's first URI SAN (`connection.uri_san_peer_certificate`:
    /// a SPIFFE ID in a mesh) and first DNS SAN (`connection.dns_san_peer_certificate`).
    pub sans: [Option<Box<str>>; 2],
}

/// The request attributes keyswap's filters ask Envoy for: who is on the other end of the
/// connection (for `edgeTrust`).
pub const REQUEST_ATTRIBUTES: [&str; 4] =
    ["source.address", "connection.mtls", "connection.uri_san_peer_certificate", "connection.dns_san_peer_certificate"];

impl Peer {
    /// The downstream connection as Envoy reports it in `request_attributes` (`source.address`,
    /// `connection.mtls`); absent attributes mean "not trusted".
    pub fn from_attributes(
        attributes: &std::collections::HashMap<String, envoy_types::pb::google::protobuf::Struct>,
    ) -> Peer {
        use envoy_types::pb::google::protobuf::value::Kind;
        let Some(fields) = attributes.get("envoy.filters.http.ext_proc").map(|s| &s.fields) else {
            return Peer::default();
        };
        let mtls = matches!(fields.get("connection.mtls").and_then(|v| v.kind.as_ref()), Some(Kind::BoolValue(true)));
        let text = |name: &str| match fields.get(name).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(a)) if !a.is_empty() => Some(a.as_str()),
            _ => None,
        };
        let source = text("source.address").and_then(|a| {
            a.parse::<std::net::SocketAddr>().map(|s| s.ip()).ok().or_else(|| a.parse::<std::net::IpAddr>().ok())
        });
        // Read only from a connection whose certificate Envoy verified.
        let san = |name: &str| text(name).filter(|_| mtls).map(Box::from);
        let sans = [san(REQUEST_ATTRIBUTES[2]), san(REQUEST_ATTRIBUTES[3])];
        Peer { mtls, source, sans }
    }
}

/// An IP network (`10.0.0.0/8`, `fd00::/8`, or one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("`{s}` is not an IP network (e.g. 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => {
                p.trim().parse().ok().filter(|p| *p <= max).ok_or_else(|| format!("`{s}`: prefix must be 0-{max}"))?
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// Whether the network is IPv6.
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Identity headers set by a trusted hop in front of the gateway.
#[derive(Debug)]
pub struct EdgeTrust {
    pub name: Arc<str>,
    pub agent_header: Box<str>,
    pub tenant_header: Option<Box<str>>,
    /// Honour the headers on connections Envoy reports as mTLS…
    pub trust_mtls: bool,
    /// …whose certificate's first URI or DNS SAN matches one of these globs (`*`: any).
    pub mtls_peers: Vec<Box<str>>,
    /// …or from these source networks.
    pub cidrs: Vec<Cidr>,
}

impl EdgeTrust {
    fn trusts(&self, peer: &Peer) -> bool {
        let certified = || {
            let named = |p: &str| peer.sans.iter().flatten().any(|san| crate::glob::matches(p, san, None));
            self.mtls_peers.iter().any(|p| &**p == "*" || named(p))
        };
        (self.trust_mtls && peer.mtls && certified())
            || peer.source.is_some_and(|ip| self.cidrs.iter().any(|c| c.contains(ip)))
    }
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
    /// One token for a group of callers, held as its SHA-256 (compared digest to digest: the
    /// time taken says nothing of the token's length).
    SharedToken { name: Arc<str>, digest: [u8; 32], identity: Identity },
    /// Signed tokens (JWKS or HS256).
    Jwt(Box<jwt::JwtValidator>),
    /// Identity headers from a trusted hop.
    EdgeTrust(EdgeTrust),
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Validator::ApiKeys { name, keys } => write!(f, "ApiKeys({name}, {} keys)", keys.len()),
            Validator::SharedToken { name, identity, .. } => {
                write!(f, "SharedToken({name}, agent {}, <redacted>)", identity.agent)
            }
            Validator::Jwt(j) => write!(f, "{j:?}"),
            Validator::EdgeTrust(e) => write!(f, "{e:?}"),
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
    /// A caller admitted by a validator whose `tenants` do not include the tenant it names.
    TenantNotAllowed,
}

impl Rejection {
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::MissingToken => "missing_agent_token",
            Rejection::InvalidToken => "invalid_agent_token",
            Rejection::ExpiredToken => "expired_agent_token",
            Rejection::TenantNotAllowed => "tenant_not_allowed",
        }
    }

    /// 401 for a caller not identified; 403 for one identified but naming a tenant its
    /// validator may not.
    pub fn status(self) -> u16 {
        match self {
            Rejection::TenantNotAllowed => 403,
            _ => 401,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Rejection::MissingToken => {
                "this gateway admits agents by token: send it as `x-keyswap-agent-token` or as the API key your SDK sends"
            }
            Rejection::InvalidToken => "the agent token is not valid here (unknown, revoked or malformed)",
            Rejection::ExpiredToken => "the agent token has expired",
            Rejection::TenantNotAllowed => "the validator that admitted this agent may not name its tenant",
        }
    }
}

/// The outcome of admission.
#[derive(Debug)]
pub enum Admission<'a> {
    Admitted(Cow<'a, Identity>),
    /// No token, and the chain is `optional`.
    Anonymous,
    Rejected(Rejection),
    /// A JWT names a key its JWKS does not hold yet: wait for this refetch, then admit again.
    NeedKeys(Arc<jwt::Jwks>),
}

/// The tenants a validator's callers may name (`validators[].tenants`: names or `*` globs).
/// Empty: any tenant.
#[derive(Clone, Debug, Default)]
pub struct TenantScope(pub Box<[Box<str>]>);

impl TenantScope {
    /// Whether an identity with `tenant` may be admitted (one without a tenant always may).
    pub fn allows(&self, tenant: Option<&str>) -> bool {
        match tenant {
            None => true,
            Some(t) => self.0.is_empty() || self.0.iter().any(|p| crate::glob::matches(p, t, None)),
        }
    }
}

/// `spec.agentAuth`, compiled.
#[derive(Debug)]
pub struct Chain {
    pub optional: bool,
    pub validators: Vec<Validator>,
    /// Each validator's tenants, by its index in `validators` (a validator past the end has
    /// none: any tenant).
    pub scopes: Vec<TenantScope>,
    /// Per-tenant admission counters (`spec.agentAuth.metricsTenants`, then "other").
    pub counters: TenantCounters,
    /// Header names edge-trust validators read: never forwarded upstream, trusted or not.
    pub edge_headers: Vec<Box<str>>,
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
        if !crate::vocab::is_placeholder(token) {
            return Some((name, token));
        }
    }
    None
}

/// The one value a request gives a header an edge-trust validator reads: `None` when it has none,
/// or copies that differ (the agent's own beside the trusted hop's, where the hop appends rather
/// than replaces: whichever came first would otherwise name the agent).
pub fn single_value<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Option<&'a str> {
    let first = values.next()?;
    if values.any(|v| v != first) {
        return None;
    }
    std::str::from_utf8(first).ok()
}

/// The longest agent token read. A longer one is refused unread: every token is hashed (API
/// keys, the JWT cache) before it is known to be anyone's, and Envoy lets headers grow to 60 KiB.
/// Identity providers' JWTs run to a few KiB.
pub const MAX_AGENT_TOKEN_BYTES: usize = 16 * 1024;

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
    /// The `jwt` validators whose `jwksFile` holds no usable key: they admit no one.
    pub fn keyless_jwks_files(&self) -> impl Iterator<Item = (&str, &jwt::Source)> {
        self.validators.iter().filter_map(|v| match v {
            Validator::Jwt(j) => j
                .jwks
                .as_ref()
                .filter(|k| matches!(k.source, jwt::Source::File(_)) && k.key_count() == 0)
                .map(|k| (&*j.name, &k.source)),
            _ => None,
        })
    }

    /// The validators whose callers' tenant comes from what they send (a JWT claim, an
    /// edge-trust header) without `tenants` to bound it.
    pub fn unscoped_tenant_namers(&self) -> impl Iterator<Item = &str> {
        self.validators.iter().enumerate().filter_map(|(i, v)| {
            let (name, names_tenant) = match v {
                Validator::Jwt(j) => (&j.name, j.claims.tenant.is_some()),
                Validator::EdgeTrust(e) => (&e.name, e.tenant_header.is_some()),
                Validator::ApiKeys { .. } | Validator::SharedToken { .. } => return None,
            };
            let unscoped = self.scopes.get(i).is_none_or(|s| s.0.is_empty() || s.0.iter().any(|t| &**t == "*"));
            (names_tenant && unscoped).then_some(&**name)
        })
    }

    /// Runs the chain on `token` (from [`agent_token`]), the connection `peer` and the request's
    /// headers (`header(name)`, for edge trust).
    pub fn admit<'s, 'h>(
        &'s self,
        token: Option<&[u8]>,
        peer: &Peer,
        header: impl Fn(&str) -> Option<&'h str>,
        now: SystemTime,
    ) -> Admission<'s> {
        let mut rejection = Rejection::InvalidToken;
        // An oversized token is nobody's: no validator hashes or parses it (it is still refused
        // as invalid, never taken for an anonymous caller).
        let readable = token.filter(|t| t.len() <= MAX_AGENT_TOKEN_BYTES);
        // Hashed once, and only when an API-key validator is reached.
        let mut digest = None;
        for (i, v) in self.validators.iter().enumerate() {
            // An identity this validator may not give: refused, never passed to the next one
            // (which would admit the same caller under another name).
            let scoped = |id: Cow<'s, Identity>| match self.scopes.get(i) {
                Some(scope) if !scope.allows(id.tenant.as_deref()) => Admission::Rejected(Rejection::TenantNotAllowed),
                _ => Admission::Admitted(id),
            };
            match (v, readable) {
                (Validator::EdgeTrust(e), _) => {
                    if !e.trusts(peer) {
                        continue;
                    }
                    let Some(agent) = header(&e.agent_header).map(str::trim).filter(|a| !a.is_empty()) else {
                        continue;
                    };
                    let tenant = e.tenant_header.as_deref().and_then(&header).map(str::trim).filter(|t| !t.is_empty());
                    return scoped(Cow::Owned(Identity {
                        agent: agent.into(),
                        tenant: tenant.map(Arc::from),
                        validator: e.name.clone(),
                        role: None,
                        labels: Vec::new(),
                    }));
                }
                (_, None) => {}
                (Validator::ApiKeys { keys, .. }, Some(t)) => {
                    let digest = &*digest.get_or_insert_with(|| token_digest(t));
                    // The map finds the candidate; the digest comparison itself is constant-time.
                    if let Some((stored, key)) = keys.get_key_value(digest) {
                        if !constant_time_eq(stored, digest) {
                            continue;
                        }
                        if key.expires.is_some_and(|e| e <= now) {
                            rejection = Rejection::ExpiredToken;
                            continue;
                        }
                        return scoped(Cow::Borrowed(&key.identity));
                    }
                }
                (Validator::SharedToken { digest: expected, identity, .. }, Some(t)) => {
                    let digest = &*digest.get_or_insert_with(|| token_digest(t));
                    if constant_time_eq(expected, digest) {
                        return scoped(Cow::Borrowed(identity));
                    }
                }
                (Validator::Jwt(j), Some(t)) => match j.verify(t) {
                    jwt::Verdict::Admitted(id) => return scoped(Cow::Owned(id)),
                    jwt::Verdict::NeedKeys(jwks) => return Admission::NeedKeys(jwks),
                    // A more specific reason (expired) is kept over a later validator's "invalid".
                    jwt::Verdict::Rejected(r) if r != Rejection::InvalidToken => rejection = r,
                    jwt::Verdict::Rejected(_) => {}
                    jwt::Verdict::NotJwt => {}
                },
            }
        }
        match token {
            None if self.optional => Admission::Anonymous,
            None => Admission::Rejected(Rejection::MissingToken),
            Some(_) => Admission::Rejected(rejection),
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
    other_label: Arc<str>,
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
            other_label: Arc::from("other"),
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
            Admission::NeedKeys(_) => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The tenant label metrics use for `identity`: its tenant when listed, else "other".
    pub fn label(&self, identity: &Identity) -> Arc<str> {
        identity
            .tenant
            .as_ref()
            .and_then(|t| self.named.iter().find(|(n, _)| **n == **t))
            .map_or_else(|| self.other_label.clone(), |(n, _)| n.clone())
    }
}

/// Agent admissions (nothing when no gateway ever used `agentAuth`).
pub fn render_metrics(p: &mut dyn crate::prom::Families) {
    const NAME: &str = "keyswap_agent_admissions_total";
    let reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    if reg.is_empty() {
        return;
    }
    p.family(NAME, "Requests admitted or refused by spec.agentAuth.", crate::prom::Kind::Counter);
    let mut all: Vec<_> = reg.iter().collect();
    all.sort_by(|a, b| a.0.cmp(b.0));
    for (label, c) in all {
        let (result, tenant) = label.split_once('\0').unwrap_or((label, ""));
        let v = c.load(Ordering::Relaxed) as f64;
        if tenant.is_empty() {
            p.sample(NAME, &[("result", result)], v);
        } else {
            p.sample(NAME, &[("result", result), ("tenant", tenant)], v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(optional: bool) -> Chain {
        let id = |agent: &str, tenant: &str| Identity {
            agent: agent.into(),
            tenant: Some(tenant.into()),
            validator: "apiKeys".into(),
            role: None,
            labels: Vec::new(),
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
                    digest: token_digest(b"team-token"),
                    identity: id("ci", "b"),
                },
            ],
            counters: TenantCounters::new(&["a".into()]),
            scopes: Vec::new(),
            edge_headers: Vec::new(),
        }
    }

    fn admit<'a>(c: &'a Chain, token: Option<&[u8]>) -> Admission<'a> {
        c.admit(token, &Peer::default(), |_| None, SystemTime::now())
    }

    #[test]
    fn the_first_validator_that_accepts_admits() {
        let c = chain(false);
        assert!(matches!(admit(&c, Some(b"ksa_alpha")), Admission::Admitted(id) if &*id.agent == "alpha"));
        assert!(matches!(admit(&c, Some(b"team-token")), Admission::Admitted(id) if &*id.agent == "ci"));
        assert!(matches!(admit(&c, Some(b"ksa_old")), Admission::Rejected(Rejection::ExpiredToken)));
        assert!(matches!(admit(&c, Some(b"sk-real-key")), Admission::Rejected(Rejection::InvalidToken)));
        assert!(matches!(admit(&c, None), Admission::Rejected(Rejection::MissingToken)));
        let o = chain(true);
        assert!(matches!(admit(&o, None), Admission::Anonymous));
        assert!(matches!(admit(&o, Some(b"nope")), Admission::Rejected(_)), "a bad token is never anonymous");
        assert!(!format!("{:?}", c.validators).contains("team-token"));
    }

    /// The attack: tokens near Envoy's 60 KiB header limit, hashed (and looked up) on every
    /// request before anyone knows whose they are. Refused unread, even one whose digest is an
    /// agent's.
    #[test]
    fn a_token_over_16_kib_is_refused_unread() {
        let huge = vec![b'k'; MAX_AGENT_TOKEN_BYTES + 1];
        let mut c = chain(true);
        if let Validator::SharedToken { digest, .. } = &mut c.validators[1] {
            *digest = token_digest(&huge);
        }
        assert!(matches!(admit(&c, Some(&huge)), Admission::Rejected(Rejection::InvalidToken)));
        assert!(matches!(admit(&c, Some(&huge[1..])), Admission::Rejected(Rejection::InvalidToken)));
        let fits = vec![b'k'; MAX_AGENT_TOKEN_BYTES];
        if let Validator::SharedToken { digest, .. } = &mut c.validators[1] {
            *digest = token_digest(&fits);
        }
        assert!(matches!(admit(&c, Some(&fits)), Admission::Admitted(_)));
    }

    /// The attack: a validator whose callers name their own tenant (a partner's identity provider,
    /// a hop's header) names a tenant of another validator's agents, to be given its key and
    /// budget. Refused with 403, never handed to a later validator.
    #[test]
    fn a_validator_naming_a_tenant_outside_its_tenants_admits_no_one() {
        let mut c = chain(false);
        c.validators.insert(
            0,
            Validator::EdgeTrust(EdgeTrust {
                name: "partner".into(),
                agent_header: "x-agent".into(),
                tenant_header: Some("x-tenant".into()),
                trust_mtls: true,
                mtls_peers: vec!["*".into()],
                cidrs: Vec::new(),
            }),
        );
        c.scopes =
            vec![TenantScope(vec!["globex".into(), "partner-*".into()].into()), TenantScope(vec!["b".into()].into())];
        let peer = Peer { mtls: true, ..Peer::default() };
        let now = SystemTime::now();
        let as_tenant = |tenant: &'static str| {
            move |n: &str| match n {
                "x-agent" => Some("planner"),
                "x-tenant" if !tenant.is_empty() => Some(tenant),
                _ => None,
            }
        };
        for (tenant, admitted) in [("globex", true), ("partner-7", true), ("", true), ("a", false), ("partner", false)]
        {
            match c.admit(Some(b"ksa_alpha"), &peer, as_tenant(tenant), now) {
                Admission::Admitted(id) => assert!(admitted && &*id.validator == "partner", "{tenant}: {id:?}"),
                Admission::Rejected(r) => assert!(!admitted && r == Rejection::TenantNotAllowed && r.status() == 403),
                other => panic!("{other:?}"),
            }
        }
        // The API-key agent of tenant `a` is under the second scope, which names only `b`.
        let off_peer = Peer::default();
        assert!(matches!(
            c.admit(Some(b"ksa_alpha"), &off_peer, |_| None, now),
            Admission::Rejected(Rejection::TenantNotAllowed)
        ));
        // A validator past the scopes' end (the shared token, tenant `b`) may name any tenant.
        assert!(matches!(c.admit(Some(b"team-token"), &off_peer, |_| None, now), Admission::Admitted(_)));
    }

    #[test]
    fn edge_trust_headers_count_only_from_trusted_peers() {
        let mut c = chain(false);
        c.validators.insert(
            0,
            Validator::EdgeTrust(EdgeTrust {
                name: "mesh".into(),
                agent_header: "x-agent".into(),
                tenant_header: Some("x-tenant".into()),
                trust_mtls: true,
                mtls_peers: vec!["*".into()],
                cidrs: vec!["10.1.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()],
            }),
        );
        let headers = |n: &str| match n {
            "x-agent" => Some("planner"),
            "x-tenant" => Some("t9"),
            _ => None,
        };
        let now = SystemTime::now();
        let ip = |s: &str| Some(s.parse().unwrap());
        for (peer, trusted) in [
            (Peer { mtls: true, ..Peer::default() }, true),
            (Peer { source: ip("10.1.200.3"), ..Peer::default() }, true),
            (Peer { source: ip("fd12::1"), ..Peer::default() }, true),
            (Peer { source: ip("::ffff:10.1.0.9"), ..Peer::default() }, true),
            (Peer { source: ip("10.2.0.1"), ..Peer::default() }, false),
            (Peer { source: ip("127.0.0.1"), ..Peer::default() }, false),
            (Peer::default(), false),
        ] {
            match c.admit(None, &peer, headers, now) {
                Admission::Admitted(id) => {
                    assert!(trusted, "{peer:?}");
                    assert_eq!((&*id.agent, id.tenant.as_deref()), ("planner", Some("t9")));
                }
                Admission::Rejected(Rejection::MissingToken) => assert!(!trusted, "{peer:?}"),
                other => panic!("{other:?}"),
            }
        }
        assert!("10.0.0.0/33".parse::<Cidr>().is_err() && "nope".parse::<Cidr>().is_err());
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("192.0.2.1".parse().unwrap()));
    }

    /// The attack: in a service mesh every workload holds a client certificate the mesh CA signed,
    /// the agents' pods too. With `trustMtls` alone, an agent connecting with its own mesh
    /// certificate set the edge headers and named itself any agent of any tenant. Only the
    /// certificates `mtlsPeers` names (their first URI or DNS SAN) are trusted.
    #[test]
    fn a_mesh_certificate_of_another_workload_buys_no_edge_identity() {
        let edge = |peers: &[&str]| Chain {
            optional: false,
            validators: vec![Validator::EdgeTrust(EdgeTrust {
                name: "mesh".into(),
                agent_header: "x-agent".into(),
                tenant_header: None,
                trust_mtls: true,
                mtls_peers: peers.iter().map(|p| Box::from(*p)).collect(),
                cidrs: Vec::new(),
            })],
            scopes: Vec::new(),
            counters: TenantCounters::new(&[]),
            edge_headers: Vec::new(),
        };
        let proxy = "spiffe://cluster.local/ns/edge/sa/authn-proxy";
        let peer = |mtls: bool, uri: Option<&str>, dns: Option<&str>| Peer {
            mtls,
            source: None,
            sans: [uri.map(Box::from), dns.map(Box::from)],
        };
        let headers = |n: &str| (n == "x-agent").then_some("planner");
        let now = SystemTime::now();
        let admitted = |c: &Chain, p: &Peer| matches!(c.admit(None, p, headers, now), Admission::Admitted(_));
        let named = edge(&[proxy, "authn.edge.svc"]);
        assert!(admitted(&named, &peer(true, Some(proxy), None)));
        assert!(admitted(&named, &peer(true, None, Some("authn.edge.svc"))));
        for other in [
            peer(true, Some("spiffe://cluster.local/ns/agents/sa/default"), None),
            peer(true, Some(&format!("{proxy}-evil")), None),
            peer(true, None, None),
            peer(false, Some(proxy), None),
        ] {
            assert!(!admitted(&named, &other), "{other:?}");
        }
        let glob = edge(&["spiffe://cluster.local/ns/edge/*"]);
        assert!(admitted(&glob, &peer(true, Some(proxy), None)));
        assert!(!admitted(&glob, &peer(true, Some("spiffe://cluster.local/ns/agents/sa/x"), None)));
        let any = edge(&["*"]);
        assert!(admitted(&any, &peer(true, None, None)), "`*`: any certificate Envoy verified");
        assert!(!admitted(&edge(&[]), &peer(true, Some(proxy), None)), "no peers listed: none trusted");
    }

    #[test]
    fn the_peer_sans_are_read_only_from_a_verified_certificate() {
        use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
        let attrs = |mtls: bool| {
            let v = |k: Kind| Value { kind: Some(k) };
            let fields = [
                ("connection.mtls".to_owned(), v(Kind::BoolValue(mtls))),
                ("source.address".to_owned(), v(Kind::StringValue("10.0.0.7:4242".into()))),
                (REQUEST_ATTRIBUTES[2].to_owned(), v(Kind::StringValue("spiffe://td/ns/edge/sa/p".into()))),
                (REQUEST_ATTRIBUTES[3].to_owned(), v(Kind::StringValue(String::new()))),
            ];
            std::iter::once(("envoy.filters.http.ext_proc".to_owned(), Struct { fields: fields.into_iter().collect() }))
                .collect::<std::collections::HashMap<_, _>>()
        };
        let p = Peer::from_attributes(&attrs(true));
        assert_eq!(p.sans, [Some("spiffe://td/ns/edge/sa/p".into()), None]);
        assert_eq!(p.source, Some("10.0.0.7".parse().unwrap()));
        assert_eq!(Peer::from_attributes(&attrs(false)).sans, [None, None]);
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
