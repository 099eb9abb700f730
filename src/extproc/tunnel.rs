//! The tunnel guard: what keyswap answers for a `CONNECT` to an unrouted host.
//!
//! On an allow-all gateway, or for an `allow` entry, Envoy tunnels the agent's bytes to the
//! host it names. Left alone, `CONNECT 127.0.0.1:9901` reaches Envoy's admin API (and from there
//! the injected keys), `CONNECT 169.254.169.254:80` the cloud metadata service, and a name that
//! resolves to a private address the cluster's insides. So Envoy asks keyswap first (an ext_proc
//! filter on the proxy listener, for tunnel routes only): keyswap resolves the name itself,
//! refuses when any address is not public, and pins the tunnel to the address it checked by
//! rewriting `:authority` to it, so a second DNS answer cannot differ (no rebinding window).
//! On a gateway with `agentAuth`, the CONNECT is admitted first, by the token the agent gives the
//! proxy (`Proxy-Authorization`): keyswap never sees what a tunnel carries.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use serde_json::json;

use super::{find, header_bytes, mutation, Shared};
use crate::auth::{Admission, Cidr, Peer, Rejection};
use crate::config::Snapshot;
use crate::telemetry::Metrics;

/// How long a tunnel target's DNS lookup may take (within the filter's 6 s message timeout).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(4);

/// Name lookups in flight at once. `getaddrinfo` holds a thread of the blocking pool until it
/// answers, and a timeout does not stop it: CONNECTs to names whose servers never answer would
/// otherwise take every thread of the pool (which also signs large SigV4 bodies). A lookup keeps
/// its permit until `getaddrinfo` returns; a request that gets none within [`RESOLVE_TIMEOUT`]
/// is refused as unresolvable.
const MAX_LOOKUPS: usize = 64;
static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LOOKUPS);

/// A blocking name lookup (`getaddrinfo`, or a stand-in in tests).
type Lookup = fn(&str, u16) -> std::io::Result<Vec<SocketAddr>>;

/// `host:port`'s addresses, looked up on the blocking pool under `slots`, within `timeout`.
async fn resolve(
    slots: &'static tokio::sync::Semaphore,
    timeout: Duration,
    host: String,
    port: u16,
    lookup: Lookup,
) -> Option<Vec<SocketAddr>> {
    let found = tokio::time::timeout(timeout, async move {
        let permit = slots.acquire().await.ok()?;
        let task = tokio::task::spawn_blocking(move || {
            let _held = permit;
            lookup(&host, port)
        });
        task.await.ok()?.ok()
    });
    found.await.ok().flatten()
}

fn getaddrinfo(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).map(Iterator::collect)
}

/// Networks an operator opens to tunnels although they are not public
/// (`--allow-private-destination`), and networks closed to them although they are
/// (`--deny-destination`: the cluster's own public addresses). Closing wins.
#[derive(Clone, Debug, Default)]
pub struct TunnelGuard {
    pub allow_private: Vec<PrivateRange>,
    pub deny: Vec<Cidr>,
    /// The cluster's NAT64 prefixes besides the well-known one (`--nat64-prefix`): an address
    /// in one reaches the IPv4 address it embeds, and is judged as that address.
    pub nat64: Vec<Nat64Prefix>,
}

/// A non-public network opened to tunnels (`--allow-private-destination`): to every tunnel
/// (`CIDR`), or only to those whose CONNECT names one host (`HOST=CIDR`, `*.suffix=CIDR` for the
/// names under a domain), so that another allowed name resolving into it (an allow-all gateway, a
/// wildcard entry whose DNS the agent's side controls) does not reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrivateRange {
    /// `None`: every tunnel.
    pub host: Option<RangeHost>,
    pub net: Cidr,
}

/// Whose tunnels a [`PrivateRange`] opens to, as parsed once at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeHost {
    /// One name: lowercase, without a trailing dot.
    Name(String),
    /// The names under a domain (`*.domain`; the domain lowercase, without `*.`).
    Under(String),
    /// An address, in canonical form (`::ffff:10.0.0.5` is `10.0.0.5`): a CONNECT naming it in
    /// any spelling.
    Address(IpAddr),
}

impl std::str::FromStr for PrivateRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((host, net)) = s.split_once('=') else { return Ok(PrivateRange { host: None, net: s.parse()? }) };
        let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
        let bad = || format!("`{s}`: `{host}` is not a host name, `*.domain` or IP address (write HOST=CIDR or CIDR)");
        let parsed = match (host.strip_prefix("*."), host.parse::<IpAddr>()) {
            (Some(domain), _) if !domain.is_empty() && crate::target::is_dns_name(domain) => {
                RangeHost::Under(domain.to_string())
            }
            (None, Ok(ip)) => RangeHost::Address(ip.to_canonical()),
            (None, Err(_)) if !host.is_empty() && crate::target::is_dns_name(&host) => RangeHost::Name(host),
            _ => return Err(bad()),
        };
        Ok(PrivateRange { host: Some(parsed), net: net.parse()? })
    }
}

impl std::fmt::Display for PrivateRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            Some(RangeHost::Name(h)) => write!(f, "{h}={}", self.net),
            Some(RangeHost::Under(d)) => write!(f, "*.{d}={}", self.net),
            Some(RangeHost::Address(a)) => write!(f, "{a}={}", self.net),
            None => self.net.fmt(f),
        }
    }
}

impl PrivateRange {
    /// Whether it opens `ip` to a tunnel whose CONNECT names `host` (lowercase, no trailing dot).
    fn opens(&self, host: &str, ip: IpAddr) -> bool {
        let named = match &self.host {
            None => true,
            Some(RangeHost::Name(name)) => name == host,
            Some(RangeHost::Under(domain)) => {
                host.strip_suffix(domain.as_str()).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
            }
            // An address as an address: `FD00:0::1` is `fd00::1`, `::ffff:10.0.0.5` is `10.0.0.5`.
            Some(RangeHost::Address(a)) => host.parse::<IpAddr>().is_ok_and(|h| h.to_canonical() == *a),
        };
        named && self.net.contains(ip)
    }
}

/// A NAT64 network-specific prefix (RFC 6052): IPv6, of length 32, 40, 48, 56, 64 or 96. The
/// IPv4 address follows the prefix, skipping bits 64-71 (the `u` octet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat64Prefix(Cidr);

impl std::str::FromStr for Nat64Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("`{s}` is not a NAT64 prefix: an IPv6 network of length 32, 40, 48, 56, 64 or 96 (e.g. 2001:db8:64::/96)")
        };
        let net: Cidr = s.parse().map_err(|_| bad())?;
        if !s.contains('/') || !net.is_ipv6() || ![32, 40, 48, 56, 64, 96].contains(&net.prefix()) {
            return Err(bad());
        }
        Ok(Nat64Prefix(net))
    }
}

impl std::fmt::Display for Nat64Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Nat64Prefix {
    /// The IPv4 address `v6` embeds, when it is in this prefix.
    fn embedded(&self, v6: Ipv6Addr) -> Option<Ipv4Addr> {
        if !self.0.contains(IpAddr::V6(v6)) {
            return None;
        }
        let b = v6.octets();
        if self.0.prefix() == 96 {
            return Some(Ipv4Addr::new(b[12], b[13], b[14], b[15]));
        }
        // The address without its `u` octet (byte 8); the IPv4 address starts at the prefix's end.
        let mut packed = [0u8; 15];
        packed[..8].copy_from_slice(&b[..8]);
        packed[8..].copy_from_slice(&b[9..]);
        let at = usize::from(self.0.prefix() / 8);
        Some(Ipv4Addr::new(packed[at], packed[at + 1], packed[at + 2], packed[at + 3]))
    }
}

impl TunnelGuard {
    /// Whether a tunnel whose CONNECT names `host` may connect to `ip`.
    pub fn permits(&self, host: &str, ip: IpAddr) -> bool {
        self.judge(host, ip).is_ok()
    }

    /// Why a tunnel whose CONNECT names `host` may not connect to `ip`, if it may not.
    fn judge(&self, host: &str, ip: IpAddr) -> Result<(), Refusal> {
        // Through the cluster's NAT64, an address in its prefix is the IPv4 address it embeds.
        // Under overlapping prefixes (a /48 and a /96 inside it) each reading must pass, and so
        // must a built-in one (mapped, 64:ff9b::/96, 6to4): which translator routing picks is
        // not the guard's to know.
        if let IpAddr::V6(v6) = ip {
            let mut through = self.nat64.iter().filter_map(|p| p.embedded(v6)).peekable();
            if through.peek().is_some() {
                if self.deny.iter().any(|c| c.contains(ip)) {
                    return Err(Refusal::DeniedDestination);
                }
                for v4 in through.chain(embedded_v4(v6)) {
                    self.judge(host, IpAddr::V4(v4))?;
                }
                return Ok(());
            }
        }
        // An IPv6 form of a closed IPv4 address is closed too, and an IPv4 address closed in its
        // mapped IPv6 form (`::ffff:34.118.0.0/112`).
        let other = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
        };
        if self.deny.iter().any(|c| c.contains(ip) || other.is_some_and(|o| c.contains(o))) {
            Err(Refusal::DeniedDestination)
        } else if is_public(ip) || self.allow_private.iter().any(|r| r.opens(host, ip)) {
            Ok(())
        } else {
            Err(Refusal::PrivateDestination)
        }
    }
}

/// Whether `ip` is a globally routable unicast address: not loopback, unspecified, private,
/// shared (CGNAT), link-local (cloud metadata), documentation, benchmarking, multicast or
/// reserved; IPv6 forms that embed an IPv4 address (mapped, NAT64, 6to4) are judged by it.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // Global unicast is 2000::/3, less documentation (2001:db8::/32), Teredo (2001::/32)
            // and ORCHIDv2/benchmarking (2001:10::/28, 2001:20::/28, 2001:2::/48).
            let global = s[0] & 0xe000 == 0x2000;
            let special = (s[0] == 0x2001
                && (s[1] == 0xdb8 || s[1] == 0 || s[1] & 0xfff0 == 0x10 || s[1] & 0xfff0 == 0x20))
                || (s[0] == 0x2001 && s[1] == 2 && s[2] == 0);
            global && !special && v6 != Ipv6Addr::UNSPECIFIED
        }
    }
}

/// The IPv4 address an IPv6 address reaches: mapped (`::ffff:a.b.c.d`), NAT64 (64:ff9b::/96)
/// or 6to4 (2002::/16).
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    if let Some(v4) = v6.to_ipv4_mapped() {
        Some(v4)
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(Ipv4Addr::from(u128::from(v6) as u32))
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8))
    } else {
        None
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(o[0] == 0                                     // "this network", 0.0.0.0
        || o[0] == 10                               // private
        || o[0] == 127                              // loopback
        || (o[0] == 100 && (64..128).contains(&o[1])) // shared address space (CGNAT)
        || (o[0] == 169 && o[1] == 254)             // link-local: cloud metadata
        || o == [168, 63, 129, 16]                  // Azure's WireServer, HostGAPlugin: node provisioning
        || (o[0] == 172 && (16..32).contains(&o[1])) // private
        || (o[0] == 192 && o[1] == 0 && (o[2] == 0 || o[2] == 2)) // IETF protocol assignments, TEST-NET-1
        || (o[0] == 192 && o[1] == 88 && o[2] == 99) // 6to4 relay anycast
        || (o[0] == 192 && o[1] == 168)             // private
        || (o[0] == 198 && (o[1] == 18 || o[1] == 19)) // benchmarking
        || (o[0] == 198 && o[1] == 51 && o[2] == 100) // TEST-NET-2
        || (o[0] == 203 && o[1] == 0 && o[2] == 113) // TEST-NET-3
        || o[0] >= 224) // multicast, reserved, broadcast
}

/// Why a tunnel was refused, as the JSON reason and the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The CONNECT target is not `host:port`.
    MalformedTarget,
    /// The host is not allowed by the gateway (defaultPolicy and `allow`), as of now.
    NotAllowed,
    /// The name resolves (or the literal is) to a loopback, private, link-local or other
    /// non-public address.
    PrivateDestination,
    /// The host is (or resolves to) an address in a network the operator closed
    /// (`--deny-destination`).
    DeniedDestination,
    /// An `allow` entry names the host, for other ports (a bare host is 443 alone).
    PortNotAllowed,
    /// The name did not resolve in time.
    Unresolvable,
    /// The gateway's `agentAuth` did not admit the CONNECT (its `Proxy-Authorization`).
    Unauthenticated(Rejection),
    /// A routed host, in a spelling Envoy did not route to the terminating listener (a trailing
    /// dot): its connections are terminated and routed, never tunnelled past keyswap.
    RoutedHost,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::MalformedTarget => "malformed_connect_target",
            Refusal::NotAllowed => "egress_denied",
            Refusal::PortNotAllowed => "egress_port_denied",
            Refusal::PrivateDestination => "private_destination",
            Refusal::DeniedDestination => "denied_destination",
            Refusal::Unresolvable => "unresolvable_destination",
            Refusal::Unauthenticated(r) => r.reason(),
            Refusal::RoutedHost => "routed_host_not_tunnelled",
        }
    }

    fn status(self) -> u16 {
        match self {
            // Identified, but naming a tenant its validator may not: no other token helps.
            Refusal::Unauthenticated(r @ Rejection::TenantNotAllowed) => r.status(),
            Refusal::Unauthenticated(_) => 407,
            Refusal::Unresolvable => 502,
            Refusal::MalformedTarget => 400,
            Refusal::NotAllowed
            | Refusal::RoutedHost
            | Refusal::PortNotAllowed
            | Refusal::PrivateDestination
            | Refusal::DeniedDestination => 403,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::MalformedTarget => "a CONNECT target must be host:port",
            Refusal::NotAllowed => "the gateway does not allow tunnels to this host",
            Refusal::PortNotAllowed => {
                "the gateway allows tunnels to this host on other ports only (an allow entry without a port \
                 opens 443; host:PORT opens another)"
            }
            Refusal::DeniedDestination => {
                "this host is (or resolves to) an address in a network the gateway's operator closed to tunnels"
            }
            Refusal::PrivateDestination => {
                "tunnels reach public addresses only; this host is (or resolves to) a loopback, private, link-local or reserved address"
            }
            Refusal::Unresolvable => "the tunnel's host did not resolve",
            Refusal::RoutedHost => "the gateway routes this host itself; CONNECT to it by its plain name",
            Refusal::Unauthenticated(r @ Rejection::TenantNotAllowed) => r.message(),
            Refusal::Unauthenticated(_) => {
                "this gateway admits agents by token: give it to the proxy as the password of HTTPS_PROXY \
                 (http://agent:TOKEN@host:port, sent as Proxy-Authorization)"
            }
        }
    }
}

/// How long a CONNECT waits for a JWKS refetch its token needs; past it the token is refused.
const KEYS_WAIT: Duration = Duration::from_millis(1500);

/// The token an agent gives the proxy (`Proxy-Authorization`): `Bearer TOKEN`, or `Basic` with the
/// token as the password (what `HTTPS_PROXY=http://agent:TOKEN@gateway:10000` makes clients send;
/// the user alone when there is no password). The placeholder counts as no token.
fn proxy_token(headers: &[HeaderValue]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let value = find(headers, "proxy-authorization")?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let token = if scheme.eq_ignore_ascii_case("bearer") {
        rest.trim().as_bytes().to_vec()
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
        match decoded.iter().position(|&b| b == b':') {
            Some(colon) if colon + 1 < decoded.len() => decoded[colon + 1..].to_vec(),
            Some(colon) => decoded[..colon].to_vec(),
            None => decoded,
        }
    } else {
        return None;
    };
    (!token.is_empty() && !crate::vocab::is_placeholder(&token)).then_some(token)
}

/// Admits a CONNECT by the gateway's `agentAuth` (none: every CONNECT is admitted): its
/// `Proxy-Authorization`, the connection `peer`, and for edge trust its headers. A token whose
/// key set is being fetched waits for the fetch once.
async fn admit(snapshot: &Snapshot, token: Option<&[u8]>, headers: &Headers, peer: &Peer) -> Result<(), Rejection> {
    let Some(chain) = &snapshot.agent_auth else { return Ok(()) };
    let header = |n: &str| {
        crate::auth::single_value(headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| &v[..]))
    };
    let mut admission = chain.admit(token, peer, header, SystemTime::now());
    if let Admission::NeedKeys(jwks) = admission {
        // Within Envoy's 6 s for the whole decision, which may still resolve the target (4 s).
        let _ = tokio::time::timeout(KEYS_WAIT, jwks.refresh()).await;
        admission = chain.admit(token, peer, header, SystemTime::now());
    }
    chain.counters.count(&admission);
    match admission {
        Admission::Admitted(_) | Admission::Anonymous => Ok(()),
        Admission::Rejected(r) => Err(r),
        // The key set was fetched and still does not hold the token's key.
        Admission::NeedKeys(_) => Err(Rejection::InvalidToken),
    }
}

/// The CONNECT target's host and port (the port is required).
fn target(authority: &str) -> Option<(String, u16)> {
    let port = crate::target::port(authority).filter(|p| *p != 0)?;
    let mut buf = [0u8; 256];
    let host = crate::target::host(authority, &mut buf).ok()?;
    Some((host.to_owned(), port))
}

/// The decision for `CONNECT authority`: refuse, or continue pinned to a checked address.
pub async fn decide(
    authority: String,
    snapshot: Arc<Snapshot>,
    guard: TunnelGuard,
) -> Result<SocketAddr, (Refusal, Option<IpAddr>)> {
    let Some((host, port)) = target(&authority) else { return Err((Refusal::MalformedTarget, None)) };
    // A routed host's CONNECT reaches the guard only in a spelling Envoy's terminating route did
    // not take (or from an Envoy that has not taken keyswap's latest routes): an allow-all gateway
    // would otherwise tunnel it raw, past budgets, spans and header stripping.
    if snapshot.routes.terminates(&host) {
        return Err((Refusal::RoutedHost, None));
    }
    match snapshot.allows_unrouted(&host, port) {
        Ok(_) => {}
        Err(true) => return Err((Refusal::PortNotAllowed, None)),
        Err(false) => return Err((Refusal::NotAllowed, None)),
    }
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => match resolve(&LOOKUPS, RESOLVE_TIMEOUT, host.clone(), port, getaddrinfo).await {
            Some(a) => a,
            None => return Err((Refusal::Unresolvable, None)),
        },
    };
    // Every answer must be public: a name with one private record is a rebinding attempt.
    for a in &addrs {
        guard.judge(&host, a.ip()).map_err(|refusal| (refusal, Some(a.ip())))?;
    }
    let pick = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied();
    pick.ok_or((Refusal::Unresolvable, None))
}

/// A sampled tunnel request's headers, owned (the decision is made off the stream).
pub type Headers = Vec<(String, Vec<u8>)>;

/// The answer for a CONNECT's request headers, decided off the stream: admitted by the gateway's
/// `agentAuth`, then its target checked. A refusal gets a span (an agent reaching for the inside
/// is what a viewer should show); the headers are kept for it only when the request is sampled
/// (or edge trust reads them). `peer`: the agent's connection, as Envoy reports it.
pub(super) fn decide_headers(
    shared: Arc<Shared>,
    headers: &[HeaderValue],
    peer: Peer,
) -> impl std::future::Future<Output = ProcessingResponse> + Send + 'static {
    let authority = find(headers, ":authority").unwrap_or("").to_owned();
    let (guard, snapshot) = (shared.tunnel.clone(), shared.store.load_full());
    let token = snapshot.agent_auth.as_ref().and_then(|_| proxy_token(headers));
    let sampled = shared.sink.sampled(find(headers, "traceparent"));
    let owned: Option<Headers> = (sampled.is_some() || snapshot.agent_auth.is_some())
        .then(|| headers.iter().map(|h| (h.key.clone(), header_bytes(h).to_vec())).collect());
    async move {
        let admitted = match &owned {
            Some(h) => admit(&snapshot, token.as_deref(), h, &peer).await,
            None => Ok(()),
        };
        let decision = match admitted {
            Ok(()) => decide(authority.clone(), snapshot.clone(), guard).await,
            Err(r) => {
                Metrics::inc(&shared.metrics.denied_unauthenticated);
                Err((Refusal::Unauthenticated(r), None))
            }
        };
        let traced = owned.zip(sampled);
        if let (Err((refusal, _)), Some((headers, trace_id))) = (&decision, traced) {
            refusal_span(&shared, &snapshot, &authority, (*refusal, trace_id), &headers);
        }
        answer(&shared, &authority, decision)
    }
}

/// The span of a refused tunnel: `CONNECT host:port`, keyswap's status and the refusal as
/// `error.type`; no route, no body.
fn refusal_span(
    shared: &Shared,
    snapshot: &Snapshot,
    authority: &str,
    (refusal, root_trace_id): (Refusal, crate::telemetry::span::TraceId),
    headers: &Headers,
) {
    let host = target(authority).map(|(h, _)| h);
    let start = crate::telemetry::span::Start {
        provider: None,
        route: None,
        policy: None,
        method: "CONNECT",
        scheme: "",
        authority,
        host: host.as_deref().unwrap_or(authority),
        redacted_path: "",
        request_model: None,
        injected: false,
        smuggled: false,
        redact_also: None,
        error: Some(refusal.reason()),
        identity: None,
        tenant_label: None,
        root_trace_id,
    };
    let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let (mut tx, _) = crate::telemetry::span::Transaction::start(&start, &pairs, &snapshot.capture);
    tx.answered(refusal.status());
    tx.finish(&shared.sink, &[]);
}

/// The answer Envoy gets for a tunnel decision.
pub fn answer(
    shared: &Shared,
    authority: &str,
    decision: Result<SocketAddr, (Refusal, Option<IpAddr>)>,
) -> ProcessingResponse {
    match decision {
        Ok(addr) => {
            Metrics::inc(&shared.metrics.tunnels_allowed);
            tracing::debug!(target_authority = ?super::clip(authority), pinned = %addr, "tunnel allowed");
            let pinned = addr.to_string();
            let plan = crate::inject::Plan::default();
            let m = mutation::header_mutation(&plan, &[(":authority", pinned.as_bytes())]);
            mutation::request_headers(Some(m), None)
        }
        Err((refusal, address)) => {
            Metrics::inc(&shared.metrics.tunnels_refused);
            // 407 asks for (other) proxy credentials; a tenant the validator may not name is a 403.
            if matches!(refusal, Refusal::Unauthenticated(r) if r != Rejection::TenantNotAllowed) {
                // Clients that send proxy credentials only after a 407 do this on every tunnel.
                tracing::info!(target_authority = ?super::clip(authority), reason = refusal.reason(), "agent not admitted; answering 407");
                let body = json!({"error": {"type": "agent_unauthenticated", "reason": refusal.reason(),
                    "message": refusal.message(), "gateway": shared.store.load().gateway.to_string()}});
                let challenge: &[(&str, &[u8])] = &[("proxy-authenticate", b"Basic realm=\"keyswap\"")];
                return mutation::immediate_with(407, &body, "keyswap_agent_unauthenticated", challenge);
            }
            tracing::warn!(
                target_authority = ?super::clip(authority), address = ?address, reason = refusal.reason(),
                "tunnel refused"
            );
            let body =
                json!({"error": {"type": "tunnel_refused", "reason": refusal.reason(), "message": refusal.message()}});
            mutation::immediate(refusal.status(), &body, "keyswap_tunnel_refused")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static MOST: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// A name server that answers after `ms` (a stand-in: no resolver here can be made slow).
    fn slow(ms: u64) -> std::io::Result<Vec<SocketAddr>> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = RUNNING.fetch_add(1, SeqCst) + 1;
        MOST.fetch_max(now, SeqCst);
        std::thread::sleep(Duration::from_millis(ms));
        RUNNING.fetch_sub(1, SeqCst);
        Ok(vec![SocketAddr::from(([203, 0, 113, 7], 443))])
    }

    /// The attack: CONNECTs to names whose servers never answer. Each lookup holds a blocking
    /// thread past its timeout; bounded, they cannot take the whole pool, and a lookup that timed
    /// out still holds its slot until it returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_name_servers_cannot_take_more_than_their_lookup_slots() {
        let lookups: Vec<_> = (0..8)
            .map(|_| tokio::spawn(resolve(&SLOTS, Duration::from_secs(10), "a.test".into(), 443, |_, _| slow(100))))
            .collect();
        for l in lookups {
            assert!(l.await.unwrap().is_some());
        }
        assert_eq!(MOST.load(std::sync::atomic::Ordering::SeqCst), 2, "lookups at once");
        // Two that never come back in time: both slots stay taken until they return, so a
        // third (fast) lookup waits, and is refused when its own time runs out.
        let stuck = |_: &str, _: u16| slow(1500);
        let short = Duration::from_millis(200);
        for _ in 0..2 {
            assert!(resolve(&SLOTS, short, "b.test".into(), 443, stuck).await.is_none());
        }
        assert_eq!(SLOTS.available_permits(), 0);
        assert!(resolve(&SLOTS, short, "c.test".into(), 443, |_, _| slow(0)).await.is_none());
        let back = resolve(&SLOTS, Duration::from_secs(5), "c.test".into(), 443, |_, _| slow(0)).await;
        assert!(back.is_some(), "the slots came back once the stuck lookups returned");
    }

    /// The attack: on an allow-all gateway, `CONNECT api.anthropic.com.:443` (or any spelling an
    /// Envoy misses its routed virtual host by) reached the tunnel guard, which allowed it: a raw
    /// tunnel to a routed provider, past budgets, spans and header stripping. Envoy now strips the
    /// dot; the guard refuses a routed host whatever spelling brings it there.
    #[tokio::test]
    async fn a_routed_host_is_never_tunnelled_past_keyswap_whatever_its_spelling() {
        let text = "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: egress}\nspec: {defaultPolicy: allow-all}\n---\napiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: egress}], rules: [{matches: [{provider: azure-openai}, {provider: anthropic}]}]}\n";
        let (objs, errs) = crate::config::load::parse_file(std::path::Path::new("t.yaml"), text);
        assert!(errs.is_empty(), "{errs:?}");
        let catalog = crate::config::Catalog::build_isolated(objs);
        let snap = Arc::new(catalog.compile_isolated(&crate::config::load::Key::new("default", "egress")).unwrap());
        for authority in
            ["api.anthropic.com.:443", "API.Anthropic.com:443", "api.anthropic.com:8443", "x.openai.azure.com.:443"]
        {
            let refused = decide(authority.into(), snap.clone(), TunnelGuard::default()).await;
            assert!(matches!(refused, Err((Refusal::RoutedHost, None))), "{authority}: {refused:?}");
        }
        // An unrouted public host on the same gateway is tunnelled (here: refused only for want
        // of a name server, after the routed check).
        let other = decide("192.0.2.1:443".into(), snap, TunnelGuard::default()).await;
        assert!(!matches!(other, Err((Refusal::RoutedHost, _))), "{other:?}");
    }

    #[test]
    fn the_proxy_token_is_the_basic_password_or_the_bearer_token() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let token = |value: &str| {
            let h = HeaderValue {
                key: "Proxy-Authorization".into(),
                raw_value: value.as_bytes().to_vec(),
                ..Default::default()
            };
            proxy_token(&[h]).map(|t| String::from_utf8(t).unwrap())
        };
        assert_eq!(token(&format!("Basic {}", b64("agent:s3cret:with:colons"))).as_deref(), Some("s3cret:with:colons"));
        assert_eq!(token(&format!("basic {}", b64("only-user:"))).as_deref(), Some("only-user"));
        assert_eq!(token(&format!("Basic {}", b64("no-colon"))).as_deref(), Some("no-colon"));
        assert_eq!(token("Bearer  tok-1 ").as_deref(), Some("tok-1"));
        for none in [
            "Basic !!!".to_owned(),
            format!("Basic {}", b64(":")),
            format!("Basic {}", b64(&format!("a:{}", crate::provider::PLACEHOLDER))),
            format!("Bearer {}", crate::provider::PLACEHOLDER),
            "Digest x".to_owned(),
            "Bearer".to_owned(),
        ] {
            assert_eq!(token(&none), None, "{none}");
        }
    }

    #[test]
    fn only_public_unicast_addresses_are_public() {
        for a in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "168.63.129.16",
            "::ffff:168.63.129.16",
            "100.64.0.1",
            "192.0.0.1",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2001:db8::1",
            "ff02::1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a} is not public");
        }
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "168.63.129.17",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2002:808:808::",
        ] {
            assert!(is_public(a.parse().unwrap()), "{a} is public");
        }
    }

    #[test]
    fn operators_can_open_a_private_range_explicitly() {
        let g = TunnelGuard { allow_private: vec!["10.20.0.0/16".parse().unwrap()], ..Default::default() };
        assert!(g.permits("any.example", "10.20.1.1".parse().unwrap()));
        assert!(!g.permits("any.example", "10.21.1.1".parse().unwrap()));
        assert!(!g.permits("any.example", "127.0.0.1".parse().unwrap()));
    }

    /// The attack: a range opened for one internal service is reached through another allowed
    /// name that resolves into it (an allow-all gateway, a wildcard entry whose DNS the agent's
    /// side controls) or through its address. Opened for one host (`HOST=CIDR`, `*.domain=CIDR`),
    /// it is closed to every other tunnel.
    #[test]
    fn a_range_opened_for_one_host_is_closed_to_every_other_tunnel() {
        let range = |s: &str| s.parse::<PrivateRange>().unwrap();
        let g = TunnelGuard {
            allow_private: vec![range("Models.Corp.Example.=10.20.0.0/16"), range("*.gpu.corp.example=10.30.0.0/16")],
            ..Default::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(g.permits("models.corp.example", ip("10.20.1.1")));
        for other in ["evil.example", "10.20.1.1", "x.models.corp.example", "models.corp.example.evil.example"] {
            assert_eq!(g.judge(other, ip("10.20.1.1")), Err(Refusal::PrivateDestination), "{other}");
        }
        assert!(g.permits("a.gpu.corp.example", ip("10.30.0.9")) && g.permits("a.b.gpu.corp.example", ip("10.30.0.9")));
        for other in ["gpu.corp.example", "agpu.corp.example", "a.gpu.corp.example.evil"] {
            assert!(!g.permits(other, ip("10.30.0.9")), "{other}");
        }
        assert!(!g.permits("models.corp.example", ip("10.30.0.9")), "another host's range");
        assert_eq!(range("10.40.0.0/16").host, None, "a bare range opens to every tunnel");
        assert!(TunnelGuard { allow_private: vec![range("10.40.0.0/16")], ..Default::default() }
            .permits("any.example", ip("10.40.2.2")));
        assert_eq!(range("10.0.0.5=10.0.0.5/32").to_string(), "10.0.0.5=10.0.0.5/32");
        // Addresses compare as addresses, in any spelling.
        let literal = TunnelGuard {
            allow_private: vec![range("fd00::1=fd00::/64"), range("10.0.0.5=10.0.0.0/24")],
            ..Default::default()
        };
        assert!(literal.permits("FD00:0::1", ip("fd00::1")) && literal.permits("fd00::1", ip("fd00::1")));
        assert!(literal.permits("::ffff:10.0.0.5", ip("10.0.0.5")) && literal.permits("10.0.0.5", ip("10.0.0.5")));
        assert!(!literal.permits("10.0.0.6", ip("10.0.0.6")), "another address of the range");
        for bad in ["=10.0.0.0/8", "a b=10.0.0.0/8", "*.=10.0.0.0/8", "host=10.0.0.0/33", "host=nonsense"] {
            assert!(bad.parse::<PrivateRange>().is_err(), "{bad}");
        }
    }

    /// The cluster's own addresses can be public (nodes' external IPs, a public IPv6 pod
    /// range): the operator closes them, and closing wins over opening.
    #[test]
    fn operators_can_close_public_ranges_and_closing_wins() {
        let g = TunnelGuard {
            allow_private: vec!["10.20.0.0/16".parse().unwrap()],
            deny: vec![
                "2600:1900:4000::/44".parse().unwrap(),
                "34.118.0.0/16".parse().unwrap(),
                "10.20.5.0/24".parse().unwrap(),
            ],
            ..Default::default()
        };
        assert_eq!(g.judge("any.example", "2600:1900:4001::7".parse().unwrap()), Err(Refusal::DeniedDestination));
        for v6_form in ["::ffff:34.118.2.3", "64:ff9b::2276:203", "2002:2276:203::1"] {
            assert_eq!(g.judge("any.example", v6_form.parse().unwrap()), Err(Refusal::DeniedDestination), "{v6_form}");
        }
        assert_eq!(g.judge("any.example", "34.118.2.3".parse().unwrap()), Err(Refusal::DeniedDestination));
        assert_eq!(g.judge("any.example", "10.20.5.9".parse().unwrap()), Err(Refusal::DeniedDestination));
        assert_eq!(g.judge("any.example", "10.20.1.1".parse().unwrap()), Ok(()));
        assert_eq!(g.judge("any.example", "34.119.2.3".parse().unwrap()), Ok(()));
        assert_eq!(g.judge("any.example", "127.0.0.1".parse().unwrap()), Err(Refusal::PrivateDestination));
        // A range closed in its mapped IPv6 form closes the IPv4 literal too.
        let g = TunnelGuard { deny: vec!["::ffff:34.118.0.0/112".parse().unwrap()], ..Default::default() };
        assert_eq!(g.judge("any.example", "34.118.9.9".parse().unwrap()), Err(Refusal::DeniedDestination));
        assert_eq!(g.judge("any.example", "34.119.9.9".parse().unwrap()), Ok(()));
    }

    /// The attack: on a cluster whose NAT64 uses a prefix of its own (a global one, so the
    /// address looks public), `CONNECT [prefix::10.0.0.1]:443` reaches a private IPv4 service
    /// through the translator. With the prefix named, the embedded address is judged.
    #[test]
    fn a_tunnel_through_the_clusters_nat64_prefix_is_judged_by_the_ipv4_address_it_reaches() {
        let prefix = |s: &str| s.parse::<Nat64Prefix>().unwrap();
        // RFC 6052's examples: 192.0.2.33 under each prefix length.
        for (p, a) in [
            ("2001:db8::/32", "2001:db8:c000:221::"),
            ("2001:db8:100::/40", "2001:db8:1c0:2:21::"),
            ("2001:db8:122::/48", "2001:db8:122:c000:2:2100::"),
            ("2001:db8:122:300::/56", "2001:db8:122:3c0:0:221::"),
            ("2001:db8:122:344::/64", "2001:db8:122:344:c0:2:2100:0"),
            ("2001:db8:122:344::/96", "2001:db8:122:344::192.0.2.33"),
        ] {
            assert_eq!(prefix(p).embedded(a.parse().unwrap()), Some(Ipv4Addr::new(192, 0, 2, 33)), "{p}");
        }
        let open = TunnelGuard::default();
        let nsp = "2600:1f14:64::/96";
        let g = TunnelGuard { nat64: vec![prefix(nsp)], ..Default::default() };
        for private in ["2600:1f14:64::10.0.0.1", "2600:1f14:64::169.254.169.254", "2600:1f14:64::127.0.0.1"] {
            let ip = private.parse().unwrap();
            assert_eq!(open.judge("any.example", ip), Ok(()), "{private}: looks public without the prefix");
            assert_eq!(g.judge("any.example", ip), Err(Refusal::PrivateDestination), "{private}");
        }
        assert_eq!(g.judge("any.example", "2600:1f14:64::8.8.8.8".parse().unwrap()), Ok(()));
        assert_eq!(g.judge("any.example", "2600:1f14:65::10.0.0.1".parse().unwrap()), Ok(()), "outside the prefix");
        // Opening and closing apply to the embedded address, and closing the prefix itself works.
        let g = TunnelGuard {
            nat64: vec![prefix(nsp)],
            allow_private: vec!["10.20.0.0/16".parse().unwrap()],
            deny: vec!["34.118.0.0/16".parse().unwrap(), "2600:1f14:64::9.9.9.0/120".parse().unwrap()],
        };
        assert_eq!(g.judge("any.example", "2600:1f14:64::10.20.0.5".parse().unwrap()), Ok(()));
        assert_eq!(
            g.judge("any.example", "2600:1f14:64::34.118.1.1".parse().unwrap()),
            Err(Refusal::DeniedDestination)
        );
        assert_eq!(g.judge("any.example", "2600:1f14:64::9.9.9.9".parse().unwrap()), Err(Refusal::DeniedDestination));
        // Overlapping prefixes: every reading is judged (here the /48 reads 3.68.0.0, public).
        let (wide, narrow) = (prefix("2001:db8:122::/48"), prefix("2001:db8:122:344::/96"));
        let target: IpAddr = "2001:db8:122:344::10.0.0.1".parse().unwrap();
        assert_eq!(wide.embedded("2001:db8:122:344::10.0.0.1".parse().unwrap()), Some(Ipv4Addr::new(3, 68, 0, 0)));
        for nat64 in [vec![wide, narrow], vec![narrow, wide]] {
            let g = TunnelGuard { nat64, ..Default::default() };
            assert_eq!(g.judge("any.example", target), Err(Refusal::PrivateDestination), "{:?}", g.nat64);
        }
        for bad in ["2001:db8::/33", "10.0.0.0/8", "2001:db8::", "nat64"] {
            assert!(bad.parse::<Nat64Prefix>().unwrap_err().contains("32, 40, 48, 56, 64 or 96"), "{bad}");
        }
    }

    #[test]
    fn connect_targets_need_a_plain_host_and_port() {
        assert_eq!(target("example.com:443"), Some(("example.com".into(), 443)));
        assert_eq!(target("[::1]:80"), Some(("::1".into(), 80)));
        assert_eq!(target("example.com"), None);
        assert_eq!(target("example.com:0"), None);
        assert_eq!(target("[example.com]:443"), None);
        assert_eq!(target("a@example.com:443"), None);
    }
}
