//! The immutable, validated view the request path reads.
//!
//! Built by [`super::compile`], swapped in whole through `arc-swap`, never mutated. Everything a
//! request needs is precomputed here: host index, credential bytes, strip lists.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretSlice};

use super::load::Key;
use crate::api::DefaultPolicy;
use crate::glob;
pub use crate::inject::{Credential, Strip};
use crate::provider::Provider;

/// One gateway's compiled configuration.
#[derive(Debug)]
pub struct Snapshot {
    pub gateway: Key,
    /// The gateway's listeners (`spec.listeners`): the ports Envoy opens.
    pub listeners: Vec<crate::api::Listener>,
    pub default_policy: DefaultPolicy,
    /// Hosts reachable without a route on a deny-all gateway, each with its tunnel ports.
    pub allow: Vec<Allowed>,
    pub routes: RouteMatcher,
    /// Every secret key a binding uses, with its fingerprint: for `check`, logs and rotation notices.
    pub secrets: Vec<SecretUse>,
    /// Every resolved secret value (and its query-encoded form): scrubbed from captured bodies.
    pub live_secrets: Vec<SecretSlice<u8>>,
    /// Body capture for spans (`spec.otlp.captureBody`).
    pub capture: Arc<CapturePolicy>,
    /// The gateway's OTLP settings, read when the exporter starts.
    pub otlp: Option<crate::api::Otlp>,
    /// `spec.agentAuth`: who may use the gateway. `None` admits everyone.
    pub agent_auth: Option<crate::auth::Chain>,
    /// `spec.budgetStore`: Redis for the budgets (`Err`: its Secret is missing or unusable; budgeted
    /// requests then follow their fail mode). `None`: budgets are counted in this process.
    pub budget_store: Option<Result<crate::budget::redis::RedisTarget, String>>,
    /// Every TokenBudget that applies to a route of this gateway.
    pub budgets: Vec<Arc<crate::budget::Budget>>,
    /// The TokenBudgets attached to the gateway itself: their `concurrentRequests` also bound
    /// the requests no route matches that an allow-all gateway passes through.
    pub gateway_budgets: Arc<[Arc<crate::budget::Budget>]>,
    /// Invalid objects left out of this snapshot (isolated compiles), with why; what depended on
    /// them fails closed.
    pub rejected: Vec<super::error::ConfigError>,
}

impl Snapshot {
    /// The live secret values, for scrubbing.
    pub fn secret_values(&self) -> Vec<&[u8]> {
        self.live_secrets.iter().map(|s| s.expose_secret()).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretUse {
    pub secret: Key,
    pub key: String,
    /// `None` when the secret or key is missing.
    pub fingerprint: Option<String>,
}

/// Host-indexed matcher: exact hosts hash to their candidates; one-label wildcards
/// (`*.openai.azure.com`) hash by the part after the label; other patterns are scanned after.
#[derive(Debug, Default)]
pub struct RouteMatcher {
    pub entries: Vec<MatchEntry>,
    exact: HashMap<Box<str>, Vec<usize>>,
    /// `*.rest` patterns by `rest`.
    label_wildcards: HashMap<Box<str>, Vec<usize>>,
    /// Every other pattern, in entry order.
    patterns: Vec<(Box<str>, usize)>,
}

/// One `matches[]` item of one route rule, bound to its credential.
#[derive(Debug)]
pub struct MatchEntry {
    /// `namespace/name` of the AIProviderRoute.
    pub route: Arc<str>,
    pub rule: usize,
    pub index: usize,
    pub provider: &'static Provider,
    pub hosts: Vec<Box<str>>,
    pub endpoints: Vec<Box<str>>,
    pub models: Vec<Box<str>>,
    pub binding: Arc<Binding>,
    /// `spec.scrubResponseBodies` of the route: response bodies are scrubbed of secrets too.
    pub scrub_response_bodies: bool,
    /// The TokenBudgets this match's requests are admitted against (the gateway's and the route's).
    pub budgets: Arc<[Arc<crate::budget::Budget>]>,
}

/// What to do to a request that matched: which policy, which credential, what to strip.
#[derive(Debug)]
pub struct Binding {
    /// `namespace/name` of the CredentialInjectionPolicy, when one applies.
    pub policy: Option<Arc<str>>,
    pub credential: Result<Credential, Unresolved>,
    /// What the agent may not send: the credential header list plus the policy's own header;
    /// the provider's key parameters plus the policy's.
    pub strip: Strip,
    /// Per-tenant credentials (`spec.credentialSelector`); `credential` is then the fallback.
    pub tenants: Option<TenantCredentials>,
}

/// Credentials chosen by the caller's tenant.
#[derive(Debug)]
pub struct TenantCredentials {
    pub by_tenant: HashMap<Box<str>, Result<Credential, Unresolved>>,
    pub fallback: crate::api::TenantFallback,
    /// The template's Secrets could not be listed: a tenant without a key is this, not the
    /// fallback (its Secret may exist).
    pub unlisted: Option<Unresolved>,
}

/// Why [`Binding::credential_for`] found no credential.
#[derive(Debug)]
pub enum NoCredential<'a> {
    /// Named but unusable: fail closed (503).
    Unresolved(&'a Unresolved),
    /// The tenant has no key and the fallback is `Deny` (403).
    TenantNotMapped,
}

impl Binding {
    /// Whether a credential of this binding signs requests (SigV4): then keyswap reads whole
    /// request bodies.
    pub fn signs_bodies(&self) -> bool {
        let sigv4 = |c: &Result<Credential, Unresolved>| matches!(c, Ok(Credential::AwsV4(_)));
        sigv4(&self.credential) || self.tenants.as_ref().is_some_and(|t| t.by_tenant.values().any(sigv4))
    }

    /// Whether a credential of this binding is minted per request (a GCP access token): a live
    /// credential no manifest holds, which an echoing upstream could hand the agent in a body.
    pub fn mints_tokens(&self) -> bool {
        let minted = |c: &Result<Credential, Unresolved>| matches!(c, Ok(Credential::GcpToken(_)));
        minted(&self.credential) || self.tenants.as_ref().is_some_and(|t| t.by_tenant.values().any(minted))
    }

    /// The credential for a caller of `tenant` (`None`: anonymous or no agent auth).
    pub fn credential_for(&self, tenant: Option<&str>) -> Result<&Credential, NoCredential<'_>> {
        let chosen = match &self.tenants {
            None => &self.credential,
            Some(t) => match (tenant.and_then(|name| t.by_tenant.get(name)), &t.unlisted) {
                (Some(c), _) => c,
                // A named tenant whose Secret may exist unseen: not the fallback's key.
                (None, Some(unlisted)) if tenant.is_some() => return Err(NoCredential::Unresolved(unlisted)),
                (None, _) if t.fallback == crate::api::TenantFallback::Default => &self.credential,
                (None, _) => return Err(NoCredential::TenantNotMapped),
            },
        };
        chosen.as_ref().map_err(NoCredential::Unresolved)
    }
}

/// Why a matched route has no usable credential. Each one fails closed with 503.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unresolved {
    NoPolicy,
    SecretNotFound {
        secret: Key,
    },
    KeyNotFound {
        secret: Key,
        key: String,
    },
    /// The key is there but unusable (malformed service-account JSON, …). `message` never
    /// contains the value.
    InvalidSecret {
        secret: Key,
        key: String,
        message: String,
    },
    /// The route, its policy or the policies around it are invalid and left out (`object` says
    /// which and how; `keyswap check` and the log say why).
    Rejected {
        object: String,
    },
}

impl Unresolved {
    pub fn reason(&self) -> &'static str {
        match self {
            Unresolved::NoPolicy => "NoPolicy",
            Unresolved::SecretNotFound { .. } => "SecretNotFound",
            Unresolved::KeyNotFound { .. } => "KeyNotFound",
            Unresolved::InvalidSecret { .. } => "InvalidSecret",
            Unresolved::Rejected { .. } => "ConfigurationRejected",
        }
    }
}

impl fmt::Display for Unresolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unresolved::NoPolicy => f.write_str(
                "no CredentialInjectionPolicy targets this route (nor, for a route in the gateway's namespace, the gateway)",
            ),
            Unresolved::SecretNotFound { secret } => write!(f, "Secret {secret} not found"),
            Unresolved::KeyNotFound { secret, key } => write!(f, "Secret {secret} has no key `{key}`"),
            Unresolved::InvalidSecret { secret, key, message } => write!(f, "Secret {secret} key `{key}` {message}"),
            Unresolved::Rejected { object } => write!(f, "{object} (see `keyswap check` or the log)"),
        }
    }
}

/// What keyswap does with one request.
#[derive(Debug)]
pub enum Decision<'a> {
    /// Matched, credential resolved: strip and write.
    Inject { entry: &'a MatchEntry, credential: &'a Credential },
    /// Matched, credential missing: 503.
    FailClosed { entry: &'a MatchEntry, reason: &'a Unresolved },
    /// Matched, but the caller's tenant has no key on a `fallback: Deny` policy: 403.
    TenantNotMapped { entry: &'a MatchEntry },
    /// No route and the gateway denies by default: 403.
    Deny,
    /// No route, and the gateway allows it (allow-all, or an `allow` host): untouched.
    PassThrough { allowed_by: &'static str },
    /// The authority or path is not plain enough to match (400), whatever the routes say.
    Refused(crate::target::Refused),
}

impl RouteMatcher {
    pub fn new(entries: Vec<MatchEntry>) -> Self {
        let mut exact: HashMap<Box<str>, Vec<usize>> = HashMap::new();
        let mut label_wildcards: HashMap<Box<str>, Vec<usize>> = HashMap::new();
        let mut patterns = Vec::new();
        let add = |map: &mut HashMap<Box<str>, Vec<usize>>, k: &str, i: usize| {
            let slot = map.entry(k.into()).or_default();
            if !slot.contains(&i) {
                slot.push(i);
            }
        };
        for (i, e) in entries.iter().enumerate() {
            for h in &e.hosts {
                match h.strip_prefix("*.") {
                    Some(rest) if !glob::is_pattern(rest) => add(&mut label_wildcards, rest, i),
                    _ if glob::is_pattern(h) => patterns.push((h.clone(), i)),
                    _ => add(&mut exact, h, i),
                }
            }
        }
        RouteMatcher { entries, exact, label_wildcards, patterns }
    }

    /// The first entry matching host and path. Exact hosts win over patterns; within each,
    /// entries keep their compiled order (the gateway's namespace's routes first, then the
    /// others, each by namespace/name, rule, match). A host some namespace's route names exactly
    /// is that namespace's for every path: a path its entries leave out (their `endpoints`,
    /// `models`) falls to its own patterns only, never to another namespace's `*.` over it.
    pub fn find(&self, host: &str, path: &str) -> Option<&MatchEntry> {
        let path = &PathForms::new(path);
        let mut owner = None;
        if let Some(candidates) = self.exact.get(host) {
            if let Some(e) = candidates.iter().map(|&i| &self.entries[i]).find(|e| e.accepts(path)) {
                return Some(e);
            }
            // (The compiler leaves a host exactly named in one namespace's routes at most.)
            owner = candidates.first().map(|&i| self.entries[i].namespace());
        }
        let theirs = |e: &MatchEntry| owner.is_none_or(|ns| e.namespace() == ns);
        // The first accepting entry, in entry order, over both kinds of pattern.
        let mut best = host
            .split_once('.')
            .and_then(|(_, rest)| self.label_wildcards.get(rest))
            .and_then(|c| c.iter().copied().find(|&i| theirs(&self.entries[i]) && self.entries[i].accepts(path)));
        for (p, i) in &self.patterns {
            if best.is_some_and(|b| b < *i) {
                break;
            }
            let e = &self.entries[*i];
            if glob::matches(p, host, Some(b'.')) && e.provider.admits_host(p, host) && theirs(e) && e.accepts(path) {
                best = Some(*i);
                break;
            }
        }
        best.map(|i| &self.entries[i])
    }

    /// Whether a route names `host` as a certificate can carry it (exactly, or under a `*.`
    /// label wildcard): the gateway terminates its connections ([`terminated`]).
    pub fn terminates(&self, host: &str) -> bool {
        self.exact.contains_key(host)
            || host.split_once('.').is_some_and(|(_, rest)| self.label_wildcards.contains_key(rest))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A request's path as route matching reads it: as sent, and its canonical form, made at most
/// once per request and only when an entry with `endpoints` asks.
struct PathForms<'a> {
    path: &'a str,
    canonical: std::cell::OnceCell<crate::target::CanonicalPath<'a>>,
}

impl<'a> PathForms<'a> {
    fn new(path: &'a str) -> Self {
        PathForms { path, canonical: std::cell::OnceCell::new() }
    }

    fn canonical(&self) -> &str {
        self.canonical.get_or_init(|| crate::target::CanonicalPath::of(self.path))
    }
}

impl MatchEntry {
    /// The namespace of the route it was compiled from.
    pub fn namespace(&self) -> &str {
        self.route.split_once('/').map_or("", |(ns, _)| ns)
    }

    fn accepts(&self, path: &PathForms<'_>) -> bool {
        // Endpoints are kept in canonical form ([`crate::target::canonical_path`]).
        if !self.endpoints.is_empty() && !self.endpoints.iter().any(|p| glob::matches(p, path.canonical(), None)) {
            return false;
        }
        if self.models.is_empty() {
            return true;
        }
        match self.provider.model_from_path(path.path) {
            Some(model) => self.models.iter().any(|m| glob::matches(m, &model, None)),
            None => false,
        }
    }
}

impl Snapshot {
    /// The decision for a request to `authority` (Host or :authority, port allowed: 443 when it
    /// names none) and `path` from a caller of `tenant`.
    pub fn decide(&self, authority: &str, path: &str, tenant: Option<&str>) -> Decision<'_> {
        let mut buf = [0u8; 256];
        let host = match crate::target::host(authority, &mut buf) {
            Ok(h) => h,
            Err(r) => return Decision::Refused(r),
        };
        if let Err(r) = crate::target::check_path(path) {
            return Decision::Refused(r);
        }
        if let Some(entry) = self.routes.find(host, path) {
            return match entry.binding.credential_for(tenant) {
                Ok(credential) => Decision::Inject { entry, credential },
                Err(NoCredential::Unresolved(reason)) => Decision::FailClosed { entry, reason },
                Err(NoCredential::TenantNotMapped) => Decision::TenantNotMapped { entry },
            };
        }
        // A routed host's requests are its routes' to decide: on a deny-all gateway one that no
        // route takes (an endpoint or model the routes leave out) is refused, whatever `allow`
        // says of the host (such an entry changes nothing: `allow_entries_of_routed_hosts`).
        if self.default_policy == DefaultPolicy::DenyAll && self.routes.terminates(host) {
            return Decision::Deny;
        }
        let port = crate::target::port(authority).unwrap_or(443);
        match self.allows_unrouted(host, port) {
            Ok(allowed_by) => Decision::PassThrough { allowed_by },
            Err(_) => Decision::Deny,
        }
    }

    /// The `spec.allow` entries that change nothing: a CONNECT to their host is terminated and
    /// routed whatever its port ([`terminated`]). `check` and the load log name them.
    pub fn allow_entries_of_routed_hosts(&self) -> Vec<&Allowed> {
        let hosts = self.routes.entries.iter().flat_map(|e| e.hosts.iter().map(|h| h.to_string()));
        let (certified, _) = crate::certs::certifiable(hosts);
        self.allow.iter().filter(|a| terminated(&certified, &a.host)).collect()
    }

    /// Route host patterns (`*.example.net`) that are not their provider's own hosts, with the
    /// route naming them, or a provider's own whose `*` its customers name (Azure's resources):
    /// the key goes to whatever name under the pattern an agent asks for, so a pattern over names
    /// others can own (a platform's tenant subdomains) hands it to them.
    /// `check` and the load log name them.
    pub fn foreign_host_patterns(&self) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        // Whether or not the key resolves here (`check` in CI, without the Secrets): the pattern
        // is the risk.
        for e in &self.routes.entries {
            let foreign = |h: &str| e.provider.customer_named_hosts || !e.provider.default_hosts.contains(&h);
            for h in e.hosts.iter().filter(|h| crate::glob::is_pattern(h) && foreign(h)) {
                if !out.contains(&(&*e.route, &**h)) {
                    out.push((&e.route, h));
                }
            }
        }
        out
    }

    /// Whether an unrouted (lowercase) `host` may be reached on `port`, and why: the gateway
    /// allows all (any port), or an `allow` entry names the host and the port. `Err(true)`: an
    /// entry names the host, on other ports only.
    pub fn allows_unrouted(&self, host: &str, port: u16) -> Result<&'static str, bool> {
        match self.default_policy {
            DefaultPolicy::AllowAll => Ok("allow-all"),
            DefaultPolicy::DenyAll => Allowed::admits(&self.allow, host, port).map(|()| "allow-list"),
        }
    }
}

/// One `spec.allow` entry: a host (`*` stands for one DNS label) and the port tunnels to it may
/// use: `host` is 443 alone, `host:PORT` that port, `host:*` any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// Lowercase.
    pub host: Box<str>,
    /// `None`: any port.
    pub port: Option<u16>,
}

impl Allowed {
    /// The port a bare `host` entry opens: HTTPS, what an agent's CONNECT is for.
    pub const DEFAULT_PORT: u16 = 443;

    /// Whether `list` admits a tunnel to `host` on `port`. `Err(true)`: an entry names the host,
    /// for other ports only.
    pub fn admits(list: &[Allowed], host: &str, port: u16) -> Result<(), bool> {
        let mut named = list.iter().filter(|a| host_matches(&a.host, host)).peekable();
        if named.peek().is_none() {
            return Err(false);
        }
        named.any(|a| a.port.is_none_or(|p| p == port)).then_some(()).ok_or(true)
    }

    /// An entry as written in `spec.allow`; the error says what is wrong with it.
    pub fn parse(entry: &str) -> Result<Allowed, String> {
        let (host, port) = entry.rsplit_once(':').map_or((entry, None), |(h, p)| (h, Some(p)));
        let port_like = port.is_none_or(|p| p == "*" || p.bytes().all(|b| b.is_ascii_digit()));
        if !port_like || crate::config::check_host(host).is_err() {
            return Err(format!(
                "{} is not a host, host:PORT or host:* (no scheme or path; `*` in a host stands for one DNS label)",
                crate::config::load::shown(entry)
            ));
        }
        // Envoy matches a proxy virtual host's domains exactly or by a leading `*.`: any other `*`
        // (`*` alone breaks the whole route configuration) would be an entry that never matches.
        if host.strip_prefix("*.").map_or(host, |rest| rest).contains('*') {
            return Err(format!(
                "{}: `*` may only stand for the first DNS label (`*.example.com`); for every host, use `spec.defaultPolicy: allow-all`",
                crate::config::load::shown(entry)
            ));
        }
        let port = match port {
            None => Some(Self::DEFAULT_PORT),
            Some("*") => None,
            // Digits only (checked above).
            Some(p) => match p.parse::<u16>() {
                Ok(port) if port > 0 => Some(port),
                _ => {
                    return Err(format!(
                        "{}: the port must be 1-65535, or `*` for any",
                        crate::config::load::shown(entry)
                    ))
                }
            },
        };
        Ok(Allowed { host: host.to_ascii_lowercase().into_boxed_str(), port })
    }
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(Self::DEFAULT_PORT) => f.write_str(&self.host),
            Some(p) => write!(f, "{}:{p}", self.host),
            None => write!(f, "{}:*", self.host),
        }
    }
}

/// Whether the gateway terminates and routes a CONNECT to `host` (an allow entry's, lowercase)
/// rather than tunnelling it: `certified`, the route hosts the leaf certificate names
/// ([`crate::certs::certifiable`]), names it exactly, or by a `*.` pattern of one label. The
/// generated layout leaves such entries out of the tunnelled hosts, so that an exact entry
/// never wins over a routed pattern in Envoy's matching (exact domains first); patterns no
/// certificate carries (`bedrock-runtime.*.amazonaws.com`) are never terminated.
pub fn terminated(certified: &[String], host: &str) -> bool {
    certified.iter().any(|r| *r == host || (r.starts_with("*.") && !glob::is_pattern(host) && host_matches(r, host)))
}

fn host_matches(pattern: &str, host: &str) -> bool {
    if glob::is_pattern(pattern) {
        glob::matches(pattern, host, Some(b'.'))
    } else {
        pattern == host
    }
}

/// Which bodies are captured, and how much of each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturePolicy {
    /// Per direction. 0 disables capture.
    pub max_bytes: usize,
    /// Content-type prefixes (case-insensitive) that are captured.
    pub include_content_types: Vec<String>,
    /// `spec.otlp.readBodies`: whether telemetry reads bodies at all (capture, usage, model).
    pub read_bodies: bool,
}

pub const DEFAULT_MAX_BYTES: usize = 65536;
pub const DEFAULT_CONTENT_TYPES: &[&str] = &["application/json", "application/x-ndjson", "text/event-stream"];

impl Default for CapturePolicy {
    fn default() -> Self {
        CapturePolicy {
            max_bytes: DEFAULT_MAX_BYTES,
            include_content_types: DEFAULT_CONTENT_TYPES.iter().map(|s| s.to_string()).collect(),
            read_bodies: true,
        }
    }
}

impl CapturePolicy {
    /// Whether a body with this content type is captured.
    pub fn wants(&self, content_type: &str) -> bool {
        self.read_bodies
            && self.max_bytes > 0
            && self.include_content_types.iter().any(|p| {
                content_type.len() >= p.len() && content_type.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::Allowed;

    #[test]
    fn an_allow_entry_is_a_host_and_its_port_443_by_default() {
        let shown = |e: &str| Allowed::parse(e).map(|a| (a.host.to_string(), a.port, a.to_string()));
        assert_eq!(shown("PyPI.org").unwrap(), ("pypi.org".into(), Some(443), "pypi.org".into()));
        assert_eq!(shown("github.com:22").unwrap(), ("github.com".into(), Some(22), "github.com:22".into()));
        assert_eq!(shown("*.example.com:*").unwrap(), ("*.example.com".into(), None, "*.example.com:*".into()));
        for bad in [
            "pypi.org:0",
            "pypi.org:65536",
            "pypi.org:",
            "pypi.org:+1",
            "pypi.org:22:23",
            "https://pypi.org",
            ":443",
            "a b",
        ] {
            assert!(Allowed::parse(bad).is_err(), "{bad}");
        }
        assert!(Allowed::parse("pypi.org:99999").unwrap_err().contains("1-65535"));
        assert!(Allowed::parse("pypi.org:x").unwrap_err().contains("host:PORT"));
        // A `*` Envoy's virtual hosts cannot match as keyswap would: `*` alone (Envoy refused the
        // whole proxy route configuration), or inside a name.
        for bad in ["*", "*:*", "files-*.example.com", "a.*.example.com", "*.*.example.com", "example.*"] {
            let e = Allowed::parse(bad).unwrap_err();
            assert!(e.contains("first DNS label") && e.contains("allow-all"), "{bad}: {e}");
        }
        assert!(Allowed::parse("*.example.com:*").is_ok());
    }

    #[test]
    fn a_tunnel_is_admitted_on_the_ports_its_host_is_listed_for() {
        let list: Vec<Allowed> = ["pypi.org", "github.com:22", "*.example.com:*", "github.com:8443"]
            .iter()
            .map(|e| Allowed::parse(e).unwrap())
            .collect();
        assert_eq!(Allowed::admits(&list, "pypi.org", 443), Ok(()));
        assert_eq!(Allowed::admits(&list, "pypi.org", 22), Err(true));
        assert_eq!(Allowed::admits(&list, "github.com", 22), Ok(()));
        assert_eq!(Allowed::admits(&list, "github.com", 8443), Ok(()));
        assert_eq!(Allowed::admits(&list, "github.com", 443), Err(true));
        assert_eq!(Allowed::admits(&list, "a.example.com", 5432), Ok(()));
        assert_eq!(Allowed::admits(&list, "a.b.example.com", 443), Err(false));
        assert_eq!(Allowed::admits(&list, "evil.example", 443), Err(false));
    }
}
