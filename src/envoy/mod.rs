//! The Envoy configuration of one EgressGateway: one generator ([`layout`]) of listeners,
//! clusters and route configurations, delivered either in a static bootstrap
//! (`keyswap envoy-config --static`) or over keyswap's ADS ([`ads`], kept current by
//! [`control`]) behind a small bootstrap that never changes ([`ads_bootstrap`]).
//!
//! ```text
//! agent ─CONNECT host:443─► proxy listener ─(routed host)──► internal listener keyswap_tls_terminate
//!                            │                               tls_inspector, leaf cert (SDS file)
//!                            │                               HCM: ext_proc (fail closed) → router
//!                            │                               └► provider cluster: TLS, SNI, SAN check
//!                            ├─(allowed host / allow-all)─► dynamic forward proxy, raw tunnel
//!                            └─(anything else)────────────► 403; plain HTTP ► 403
//! agent ─TLS (redirected)─► HTTPS listener: same TLS chain as the internal listener
//! ```

pub mod ads;
pub mod control;
mod layout;
pub mod overload;
pub mod xds;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::api::{Listener, ListenerProtocol, TlsMode};
use crate::config::{Key, Snapshot};
use layout::Layout;
pub use overload::Bounds;

/// Debian's (and most distributions') system CA bundle: the default where the bundle is a path
/// in Envoy's file system, which keyswap cannot see (`serve`, `envoy-config`).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The port of the explicit proxy when the gateway lists no listener.
pub const DEFAULT_PROXY_PORT: u16 = 10000;
const INTERNAL_TLS: &str = "keyswap_tls_terminate";
const LEAF_SECRET: &str = "keyswap_leaf";

/// Where Envoy reaches keyswap's ext_proc server.
#[derive(Clone, Debug)]
pub enum ExtProcAddress {
    Uds(PathBuf),
    Tcp(SocketAddr),
}

/// `--upstream HOST=ADDR[,ca=FILE]`: send a provider host somewhere else (tests, air-gapped setups).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamOverride {
    pub host: String,
    /// `IP:PORT` or `NAME:PORT`.
    pub address: String,
    pub ca: Option<PathBuf>,
}

impl std::str::FromStr for UpstreamOverride {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("`{s}`: expected HOST=ADDR:PORT[,ca=FILE]");
        let (host, rest) = s.split_once('=').ok_or_else(usage)?;
        let mut parts = rest.split(',');
        let address = parts.next().filter(|a| !a.is_empty()).ok_or_else(usage)?.to_owned();
        let port_ok = address.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if host.is_empty() || !port_ok {
            return Err(usage());
        }
        let mut ca = None;
        for p in parts {
            match p.split_once('=') {
                Some(("ca", f)) if !f.is_empty() => ca = Some(PathBuf::from(f)),
                _ => return Err(usage()),
            }
        }
        Ok(UpstreamOverride { host: host.to_ascii_lowercase(), address, ca })
    }
}

/// What the generated resources need besides the snapshot.
#[derive(Clone, Debug)]
pub struct Options {
    pub upstreams: Vec<UpstreamOverride>,
    /// Address the gateway's listeners bind to.
    pub bind: std::net::IpAddr,
    pub system_ca: PathBuf,
    pub delivery: Delivery,
    /// What keyswap's environment says of spans: an exporter (`OTEL_EXPORTER_OTLP_ENDPOINT` …)
    /// turns tracing on even where the gateway names no collector, and the sampler says whether
    /// spans read the response bodies of every request (fixed phases) or of some (per request).
    pub spans: SpanEnv,
    /// Routes whose response bodies keyswap reads get the observing filter
    /// (`--observe-response-bodies`); off, the body-streaming deciding filter ([`bodies_filter`]).
    pub observe_response_bodies: bool,
    /// How long a raw tunnel (an `allow` host, or anything on an allow-all gateway) may stay
    /// open (`--tunnel-max-duration`); `None`: as long as its ends keep it.
    pub tunnel_max_duration: Option<std::time::Duration>,
}

/// A tunnel's longest life by default: long enough for any download an agent makes, short
/// enough that a tunnel opened before its host left `spec.allow` does not outlive the change
/// by more than this.
pub const DEFAULT_TUNNEL_MAX_DURATION: &str = "1h";

/// What keyswap's environment says of its spans, as `serve` reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanEnv {
    /// An exporter is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` …).
    pub exporter: bool,
    /// Spans are switched off whatever names a collector (`OTEL_SDK_DISABLED=true`,
    /// `OTEL_TRACES_EXPORTER=none`).
    pub off: bool,
    /// How many transactions the sampler (`OTEL_TRACES_SAMPLER`) gives a span.
    pub sampling: Sampling,
}

/// How many transactions a sampler gives a span: what decides whether spans read the response
/// bodies of a host on every request (Envoy's phases fixed for it) or only of the sampled ones
/// (asked for per request, so that an unsampled request costs no body messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    /// Every transaction an agent does not mark unsampled (`parentbased_always_on`, the default;
    /// `always_on`; a ratio of 1).
    Every,
    /// A fraction of them (`traceidratio`, `parentbased_traceidratio` below 1), or only those
    /// whose agent marks them sampled (`parentbased_always_off`).
    Some,
    /// None (`always_off`, a ratio of 0).
    None,
}

impl SpanEnv {
    /// Whether keyswap traces the gateway of `snap`: an exporter in the environment, or a
    /// collector the gateway names (`spec.otlp.endpoint`), unless the environment switches spans off.
    pub fn traces(&self, snap: &Snapshot) -> bool {
        let named = snap.otlp.as_ref().is_some_and(|o| o.endpoint.as_deref().is_some_and(|e| !e.is_empty()));
        !self.off && (self.exporter || named)
    }
}

/// What keyswap's environment says of spans, as `serve` will read it.
pub fn span_env() -> SpanEnv {
    span_env_from(|k| std::env::var(k).ok())
}

/// What the environment `env` reads from says of spans. A sampler `serve` would refuse counts as
/// the default: keyswap does not start with it.
pub fn span_env_from(env: impl Fn(&str) -> Option<String>) -> SpanEnv {
    use crate::telemetry::sample::{Root, Sampler};
    let ratio = |r: f64| match r {
        r if r >= 1.0 => Sampling::Every,
        r if r <= 0.0 => Sampling::None,
        _ => Sampling::Some,
    };
    let sampling = match Sampler::from_env(&env).unwrap_or_default() {
        Sampler::AlwaysOn | Sampler::ParentBased(Root::AlwaysOn) => Sampling::Every,
        Sampler::AlwaysOff => Sampling::None,
        Sampler::TraceIdRatio(r) => ratio(r),
        Sampler::ParentBased(Root::TraceIdRatio(r)) => match ratio(r) {
            Sampling::None => Sampling::Some,
            other => other,
        },
        Sampler::ParentBased(Root::AlwaysOff) => Sampling::Some,
    };
    let off = !crate::telemetry::export::traces_exported(&env);
    SpanEnv { exporter: crate::telemetry::export::settings(None, &env).ok().flatten().is_some(), off, sampling }
}

/// The request body the body-streaming deciding filter sends for a request to the routed `host`
/// (no port), when keyswap reads the response bodies of its virtual host on every request
/// (`None`: the first deciding filter, phases chosen per request), for a keyswap whose
/// environment says `spans`.
pub fn fixed_phases_of(snap: &Snapshot, spans: SpanEnv, host: &str) -> Option<RequestBody> {
    let opts = harness_options(spans, false);
    Layout::new(snap, &opts, leaf_hosts(snap).0).reads_bodies_of(host)
}

/// Options for resources outside a gateway's own configuration (`explain`, the harnesses).
fn harness_options(spans: SpanEnv, observe_response_bodies: bool) -> Options {
    Options {
        upstreams: Vec::new(),
        bind: std::net::IpAddr::from([127, 0, 0, 1]),
        system_ca: PathBuf::new(),
        delivery: Delivery::Ads,
        spans,
        observe_response_bodies,
        tunnel_max_duration: None,
    }
}

/// The routed virtual hosts the generator gives `snap`'s TLS chains (one per host a route names
/// exactly, one for every `*.` pattern), as their domains and their per-filter configuration
/// (`None`: the first deciding filter, phases chosen per request), for a keyswap whose
/// environment says `spans`. The test harnesses build their Envoy's virtual hosts from it.
pub fn routed_virtual_hosts(
    snap: &Snapshot,
    spans: SpanEnv,
    observe_response_bodies: bool,
) -> Vec<(Vec<String>, Option<Value>)> {
    let opts = harness_options(spans, observe_response_bodies);
    Layout::new(snap, &opts, leaf_hosts(snap).0).routed_virtual_hosts()
}

/// How the resources reach Envoy.
#[derive(Clone, Debug)]
pub enum Delivery {
    /// All in the bootstrap; the leaf from the SDS file in the certificates' directory, which
    /// `keyswap certs` rewrites (a route change needs a new bootstrap and an Envoy restart).
    /// `extproc`: where Envoy reaches keyswap.
    Static { certs_dir: PathBuf, extproc: ExtProcAddress },
    /// Over keyswap's ADS: route configurations and the leaf by name.
    Ads,
}

/// A gateway listener's name and port.
pub type NamedPort = (String, u16);

/// The listener ports a gateway exposes: explicit proxies (CONNECT/HTTP) and TLS (redirected).
pub fn ports(listeners: &[Listener]) -> Result<(Vec<NamedPort>, Vec<NamedPort>), String> {
    let (mut proxy, mut tls) = (Vec::new(), Vec::new());
    for l in listeners {
        match (l.protocol, l.tls.as_ref().map(|t| t.mode)) {
            (ListenerProtocol::Connect | ListenerProtocol::Http, _) => proxy.push((l.name.clone(), l.port)),
            (ListenerProtocol::Https, None | Some(TlsMode::Terminate)) => tls.push((l.name.clone(), l.port)),
            (ListenerProtocol::Https, Some(TlsMode::Passthrough)) => {
                return Err(format!("listener `{}`: tls.mode Passthrough is not supported by this build yet", l.name))
            }
        }
    }
    if proxy.is_empty() && tls.is_empty() {
        proxy.push(("proxy".into(), DEFAULT_PROXY_PORT));
    }
    Ok((proxy, tls))
}

/// The SDS file Envoy watches for the leaf certificate (static bootstrap); rewritten atomically
/// on renewal.
pub fn leaf_sds(certs: &crate::certs::GatewayCerts) -> Value {
    json!({"resources": [{
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": LEAF_SECRET,
        "tls_certificate": {
            "certificate_chain": {"filename": abs(&certs.leaf_cert)},
            "private_key": {"filename": abs(&certs.leaf_key)},
        },
    }]})
}

pub fn leaf_sds_path(certs_dir: &Path) -> PathBuf {
    certs_dir.join("leaf-sds.yaml")
}

/// Writes the SDS file next to the certificates (atomically).
pub fn write_leaf_sds(certs: &crate::certs::GatewayCerts) -> std::io::Result<PathBuf> {
    let path = leaf_sds_path(&certs.dir);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, to_yaml(&leaf_sds(certs)))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The leaf as ADS serves it (SDS), PEM inline. The value holds the private key: encode it and
/// drop it, never log it.
pub fn leaf_secret(leaf: &crate::certs::Leaf) -> Value {
    use secrecy::ExposeSecret as _;
    json!({"name": LEAF_SECRET, "tls_certificate": {
        "certificate_chain": {"inline_string": leaf.chain_pem},
        "private_key": {"inline_string": leaf.key_pem.expose_secret()},
    }})
}

/// Every host the gateway's routes match.
pub fn route_hosts(snap: &Snapshot) -> Vec<String> {
    snap.routes.entries.iter().flat_map(|e| e.hosts.iter().map(|h| h.to_string())).collect()
}

/// The hosts the leaf names and Envoy terminates TLS for (sorted), and the route host patterns
/// no certificate can carry.
pub fn leaf_hosts(snap: &Snapshot) -> (Vec<String>, Vec<String>) {
    crate::certs::certifiable(route_hosts(snap))
}

fn abs(p: &Path) -> String {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

pub fn to_yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_default()
}

/// The ext_proc phases Envoy sends unless keyswap asks for more (`mode_override`): request
/// headers only. Every phase is a round trip.
fn headers_only() -> Value {
    json!({
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",
        "request_body_mode": "NONE",
        "response_body_mode": "NONE",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    })
}

fn cluster_name(host: &str) -> String {
    format!("provider_{}", host.replace(['.', '*'], "_"))
}

/// A gateway's listeners, clusters and (over ADS) route configurations.
pub struct Resources {
    pub listeners: Vec<Value>,
    pub clusters: Vec<Value>,
    /// Empty in a static bootstrap: the routes are inline in the listeners.
    pub routes: Vec<Value>,
}

/// The resources for the gateway of `snap`. A static bootstrap refuses an `--upstream` for a host
/// no route names (a typo would send nothing there); over ADS such an override waits, unused,
/// until a route names the host.
pub fn resources(snap: &Snapshot, opts: &Options) -> Result<Resources, String> {
    let (proxy_ports, tls_ports) = ports(&snap.listeners)?;
    let layout = Layout::new(snap, opts, leaf_hosts(snap).0);
    if let Delivery::Static { .. } = opts.delivery {
        if let Some(o) = opts.upstreams.iter().find(|o| !layout.routes_exactly(&o.host)) {
            return Err(format!(
                "--upstream {}: no route of gateway {} matches that host exactly",
                o.host, snap.gateway
            ));
        }
    }
    let mut listeners: Vec<Value> = proxy_ports.iter().map(|(n, p)| layout.proxy_listener(n, *p)).collect();
    listeners.extend(layout.tls_listeners(&tls_ports));
    let routes = match opts.delivery {
        Delivery::Static { .. } => Vec::new(),
        Delivery::Ads => layout.route_configs(),
    };
    Ok(Resources { listeners, clusters: layout.clusters(), routes })
}

/// Envoy's node: who it is to keyswap's ADS, and what SDS files require.
fn node(gateway: &Key) -> Value {
    json!({"id": format!("keyswap-{}-{}", gateway.namespace, gateway.name), "cluster": "keyswap"})
}

/// Where Envoy's admin interface listens. It is unauthenticated and can stop Envoy, change its
/// runtime and turn on the debug log that shows the headers it sends upstream (the real key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admin {
    /// 127.0.0.1:PORT (0: Envoy picks): any process of the machine (or the pod) reaches it.
    Port(u16),
    /// A Unix socket only its owner can open (mode 0600).
    Socket(std::path::PathBuf),
}

/// Envoy's admin interface; reachable when agents hold every connection Envoy takes
/// (`--envoy-max-connections`), so an operator can still read why.
fn admin(admin: &Admin) -> Value {
    let address = match admin {
        Admin::Port(port) => json!({"socket_address": {"address": "127.0.0.1", "port_value": port}}),
        Admin::Socket(path) => json!({"pipe": {"path": path.display().to_string(), "mode": 0o600}}),
    };
    json!({"address": address, "ignore_global_conn_limit": true})
}

fn internal_listener_extension() -> Value {
    json!([{"name": "envoy.bootstrap.internal_listener", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"}}])
}

/// The static bootstrap for the gateway of `snap` (`opts.delivery` must be static): every
/// resource inline.
pub fn bootstrap(snap: &Snapshot, opts: &Options, admin_at: &Admin, bounds: &Bounds) -> Result<Value, String> {
    let r = resources(snap, opts)?;
    Ok(json!({
        "node": node(&snap.gateway),
        "admin": admin(admin_at),
        "bootstrap_extensions": internal_listener_extension(),
        "overload_manager": overload::overload_manager(bounds),
        "static_resources": {"listeners": r.listeners, "clusters": r.clusters},
    }))
}

/// The bootstrap that hands Envoy to keyswap's ADS: only the `keyswap` cluster (ext_proc and ADS
/// on one socket). It names no route, host or certificate, so it never changes when they do.
pub fn ads_bootstrap(gateway: &Key, extproc: &ExtProcAddress, admin_at: &Admin, bounds: &Bounds) -> Value {
    let ads = json!({"ads": {}, "resource_api_version": "V3"});
    json!({
        "node": node(gateway),
        "admin": admin(admin_at),
        "bootstrap_extensions": internal_listener_extension(),
        "overload_manager": overload::overload_manager(bounds),
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                // Reconnect quickly when keyswap restarts; Envoy keeps its last resources meanwhile.
                "grpc_services": [{"envoy_grpc": {"cluster_name": "keyswap",
                    "retry_policy": {"retry_back_off": {"base_interval": "0.25s", "max_interval": "2s"}}}}],
            },
            "lds_config": ads.clone(),
            "cds_config": ads,
        },
        "static_resources": {"clusters": [keyswap_cluster(extproc)]},
    })
}

/// Circuit-breaker thresholds of every generated cluster. Envoy's default is 1,024 connections,
/// pending and active requests per cluster. Every request Envoy holds has an ext_proc stream open
/// to keyswap for as long as it runs (a streamed answer, a body being uploaded), so the 1,025th
/// request in flight, any agent's, failed closed with 500; 1,024 long streams to one provider
/// made every other agent's request to it a 503; 1,024 held tunnels took every agent's next
/// tunnel. One agent holding requests open (or a busy hour of long streams) shut the gateway.
/// Raised, but finite: past it requests fail closed; what bounds all of them together is Envoy's
/// memory ([`overload`]).
const CLUSTER_LIMIT: u64 = 65_536;

/// The `circuit_breakers` of every generated cluster ([`CLUSTER_LIMIT`]).
pub(crate) fn circuit_breakers() -> Value {
    json!({"thresholds": [{
        "max_connections": CLUSTER_LIMIT, "max_pending_requests": CLUSTER_LIMIT,
        "max_requests": CLUSTER_LIMIT, "max_retries": CLUSTER_LIMIT,
    }]})
}

/// The cluster of keyswap itself: ext_proc (and ADS) over HTTP/2.
pub fn keyswap_cluster(extproc: &ExtProcAddress) -> Value {
    let address = match extproc {
        ExtProcAddress::Uds(p) => json!({"pipe": {"path": abs(p)}}),
        ExtProcAddress::Tcp(a) => json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}),
    };
    json!({
        "name": "keyswap", "type": "STATIC", "connect_timeout": "1s",
        "circuit_breakers": circuit_breakers(),
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "keyswap", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]},
    })
}

/// The fail-closed ext_proc filter on the TLS chain: every routed request asks keyswap. Public for
/// the test and bench harnesses, whose Envoys put it in front of stand-in providers.
pub fn ext_proc_filter() -> Value {
    json!({
        "name": DECIDE_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "keyswap"}},
            "failure_mode_allow": false,
            "allow_mode_override": true,
            "message_timeout": "2s",
            "max_message_timeout": "10s",
            // For spec.agentAuth edgeTrust: who is on the other end of the connection.
            "request_attributes": crate::auth::REQUEST_ATTRIBUTES,
            // keyswap names a parked transaction here for the observing filter.
            "metadata_options": {"receiving_namespaces": {"untyped": [crate::vocab::METADATA_NAMESPACE]}},
            // A secret an upstream echoes under an `x-envoy-*` name is scrubbed like any other
            // (Envoy drops mutations of those names unless allowed), and a mutation Envoy still
            // refuses fails the request instead of being dropped: a strip or a scrub that does
            // not happen must never let the request or the response go on.
            "mutation_rules": {"allow_envoy": true, "disallow_is_error": true},
            "processing_mode": headers_only(),
        },
    })
}

/// How much of the request body keyswap asks Envoy for (ordered: more reads more).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RequestBody {
    None,
    /// For the span: BUFFERED_PARTIAL, never a 413 for size.
    Capture,
    /// For SigV4: BUFFERED, the whole body in one message (Envoy answers 413 beyond its buffer limit).
    Whole,
}

/// The deciding filter's name in the HTTP filter chain.
pub const DECIDE_FILTER: &str = "envoy.filters.http.ext_proc";

/// The name of the deciding filter that streams bodies ([`bodies_filter`]).
pub const BODIES_FILTER: &str = "keyswap.decide_bodies";

/// The deciding filter of routes whose response bodies keyswap reads on every request (a budget
/// on tokens, `scrubResponseBodies`, spans that read bodies): the same fail-closed filter, with
/// `send_body_without_waiting_for_header_response` and the phases the route fixes
/// ([`bodies_on_route`]). Envoy streams the response body to keyswap as it arrives instead of
/// holding it until keyswap has answered the response headers, so the headers and the first
/// chunk are read and answered in one wake-up (docs/benchmarks.md, runs 18 and 19). Envoy ignores
/// `mode_override` on such a filter: keyswap answers the phases a request did not need with a
/// plain continue, and refuses one that needs a body the route's phases do not deliver. Off
/// unless a route turns it on, and a route that does turns the other deciding filter off: exactly
/// one of the two decides every request.
pub fn bodies_filter() -> Value {
    let mut f = ext_proc_filter();
    f["name"] = json!(BODIES_FILTER);
    f["disabled"] = json!(true);
    let c = &mut f["typed_config"];
    c["stat_prefix"] = json!("keyswap_bodies");
    c["allow_mode_override"] = json!(false);
    c["send_body_without_waiting_for_header_response"] = json!(true);
    c["processing_mode"] = fixed_phases(RequestBody::None);
    f
}

/// The phases of the body-streaming deciding filter on a route: headers both ways, the request
/// body when `request_body` reads it, the response body STREAMED. The request body is
/// BUFFERED_PARTIAL even where SigV4 or a token budget needs it whole: the phases hold for every
/// request to the host, and BUFFERED would have Envoy answer 413 to any body over its buffer (a
/// file upload on another route of the host). Up to the buffer the body arrives whole; a request
/// that needs it whole and is larger is refused with 413 by keyswap.
fn fixed_phases(request_body: RequestBody) -> Value {
    let request_body_mode = match request_body {
        RequestBody::None => "NONE",
        RequestBody::Capture | RequestBody::Whole => "BUFFERED_PARTIAL",
    };
    json!({
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": request_body_mode,
        "response_body_mode": "STREAMED",
        // Stripped of credentials like the headers; a request without trailers costs nothing.
        "request_trailer_mode": "SEND",
        // Scrubbed like the headers; Envoy sends a trailers message only when there are trailers.
        "response_trailer_mode": "SEND",
    })
}

/// `typed_per_filter_config` for a virtual host whose response bodies keyswap reads on every
/// request: the body-streaming deciding filter on, with the route's phases, and the other one
/// off, in one map (one cannot be written without the other).
pub fn bodies_on_route(request_body: RequestBody) -> Value {
    let per_route = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute";
    json!({
        DECIDE_FILTER: {"@type": per_route, "disabled": true},
        BODIES_FILTER: {"@type": per_route, "overrides": {"processing_mode": fixed_phases(request_body)}},
    })
}

/// The observing filter's name in the HTTP filter chain (per-route configurations name it).
pub const OBSERVE_FILTER: &str = "keyswap.observe";

/// The observing ext_proc filter (observability mode: Envoy sends and goes on, never waits):
/// response body chunks that only spans and budget settlement read, off the path the agent waits
/// on. Off unless a route turns it on ([`observe_on_route`]); it never fails a request. It comes
/// before the deciding filter, so responses reach it after keyswap answered their headers (and
/// named the parked transaction in the dynamic metadata it forwards).
pub fn observe_filter() -> Value {
    json!({
        "name": OBSERVE_FILTER,
        "disabled": true,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            // Its own Envoy stats (`http.<hcm>.ext_proc.keyswap_observe.*`).
            "stat_prefix": "keyswap_observe",
            "grpc_service": {"envoy_grpc": {"cluster_name": "keyswap"},
                "initial_metadata": [{"key": crate::vocab::ROLE_METADATA, "value": crate::vocab::ROLE_OBSERVE}]},
            "observability_mode": true,
            "failure_mode_allow": true,
            "metadata_options": {"forwarding_namespaces": {"untyped": [crate::vocab::METADATA_NAMESPACE]}},
            // Response headers too: their message opens the stream (so a response cut off before
            // its first chunk still ends its span), and in observability mode Envoy then keeps the
            // response's content-length (with headers skipped, a STREAMED body mode drops it and
            // the agent gets the body chunked).
            "processing_mode": {
                "request_header_mode": "SKIP",
                "response_header_mode": "SEND",
                "request_body_mode": "NONE",
                "response_body_mode": "STREAMED",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
        },
    })
}

/// `typed_per_filter_config` for a virtual host or route whose response bodies keyswap reads:
/// turns the observing filter on, and tells keyswap's deciding stream (gRPC metadata) that it
/// runs, so the body is read there rather than on the path the agent waits on.
pub fn observe_on_route() -> Value {
    let per_route = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute";
    json!({
        OBSERVE_FILTER: {"@type": per_route, "overrides": {}},
        DECIDE_FILTER: {"@type": per_route, "overrides": {
            "grpc_initial_metadata": [{"key": crate::vocab::OBSERVED_METADATA, "value": "1"}]}},
    })
}

/// The router: Envoy's own headers (`x-envoy-upstream-service-time` to the agent,
/// `x-envoy-expected-rq-timeout-ms` to the provider) suppressed.
pub fn router() -> Value {
    json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        "suppress_envoy_headers": true}})
}

#[cfg(test)]
mod tests {
    use super::UpstreamOverride;

    #[test]
    fn upstream_overrides_parse() {
        let o: UpstreamOverride = "API.anthropic.com=127.0.0.1:8443,ca=/tmp/ca.pem".parse().unwrap();
        assert_eq!(o.host, "api.anthropic.com");
        assert_eq!(o.address, "127.0.0.1:8443");
        assert_eq!(o.ca.as_deref(), Some(std::path::Path::new("/tmp/ca.pem")));
        assert!("x=127.0.0.1".parse::<UpstreamOverride>().is_err());
        assert!("x=127.0.0.1:1,cb=f".parse::<UpstreamOverride>().is_err());
        assert!("=a:1".parse::<UpstreamOverride>().is_err());
    }
}
