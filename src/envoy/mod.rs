//! Envoy bootstrap generation for one EgressGateway.
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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::api::{DefaultPolicy, EgressGatewaySpec, ListenerProtocol, TlsMode};
use crate::certs;
use crate::config::{Key, Snapshot};

/// Debian's (and most distributions') system CA bundle.
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

pub struct Options<'a> {
    pub extproc: ExtProcAddress,
    pub upstreams: &'a [UpstreamOverride],
    pub certs: &'a certs::GatewayCerts,
    /// Envoy's admin interface, always on 127.0.0.1. Port 0 picks a free one.
    pub admin_port: u16,
    /// Address the gateway's listeners bind to.
    pub bind: std::net::IpAddr,
    pub system_ca: PathBuf,
}

/// A gateway listener's name and port.
pub type NamedPort = (String, u16);

/// The listener ports a gateway exposes: explicit proxies (CONNECT/HTTP) and TLS (redirected).
pub fn ports(spec: &EgressGatewaySpec) -> Result<(Vec<NamedPort>, Vec<NamedPort>), String> {
    let (mut proxy, mut tls) = (Vec::new(), Vec::new());
    for l in &spec.listeners {
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

/// The SDS file Envoy watches for the leaf certificate; rewritten atomically on renewal.
pub fn leaf_sds(certs: &certs::GatewayCerts) -> Value {
    json!({"resources": [{
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": LEAF_SECRET,
        "tls_certificate": {
            "certificate_chain": {"filename": abs(&certs.leaf_cert)},
            "private_key": {"filename": abs(&certs.leaf_key)},
        },
    }]})
}

pub fn leaf_sds_path(certs: &certs::GatewayCerts) -> PathBuf {
    certs.dir.join("leaf-sds.yaml")
}

/// Writes the SDS file next to the certificates (atomically).
pub fn write_leaf_sds(certs: &certs::GatewayCerts) -> std::io::Result<PathBuf> {
    let path = leaf_sds_path(certs);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, to_yaml(&leaf_sds(certs)))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
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

/// The bootstrap for `gateway`.
pub fn bootstrap(
    gateway: &Key,
    spec: &EgressGatewaySpec,
    snap: &Snapshot,
    opts: &Options<'_>,
) -> Result<Value, String> {
    let (proxy_ports, tls_ports) = ports(spec)?;
    let layout = Layout::new(snap, opts);
    for o in opts.upstreams {
        if !layout.exact.contains(&o.host) {
            return Err(format!("--upstream {}: no route of gateway {gateway} matches that host exactly", o.host));
        }
    }
    let mut listeners: Vec<Value> = proxy_ports.iter().map(|(n, p)| layout.proxy_listener(n, *p)).collect();
    listeners.extend(layout.tls_listeners(&tls_ports));
    Ok(json!({
        "node": {"id": format!("keyswap-{}-{}", gateway.namespace, gateway.name), "cluster": "keyswap"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": opts.admin_port}}},
        "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"}}],
        "static_resources": {"listeners": listeners, "clusters": layout.clusters()},
    }))
}

/// A gateway's hosts, sorted by how Envoy treats them, and the options the resources use.
struct Layout<'a> {
    opts: &'a Options<'a>,
    /// Hosts keyswap terminates TLS for: the routed hosts a certificate can name.
    routed: Vec<String>,
    /// Routed hosts without a wildcard: one cluster each.
    exact: Vec<String>,
    /// `*.` routed hosts: the dynamic forward proxy, with TLS.
    wildcard: Vec<String>,
    /// Unrouted hosts a deny-all gateway tunnels to.
    allow: Vec<String>,
    allow_all: bool,
    /// Whether any CONNECT is tunnelled raw (allow-all, or an allow list): the tunnel guard.
    tunnel: bool,
}

impl<'a> Layout<'a> {
    fn new(snap: &Snapshot, opts: &'a Options<'a>) -> Self {
        let routed: Vec<String> = opts.certs.hosts.clone();
        let (wildcard, exact) = routed.iter().cloned().partition(|h: &String| h.starts_with("*."));
        let allow: Vec<String> = snap.allow.iter().map(|h| h.to_string()).filter(|h| !routed.contains(h)).collect();
        let allow_all = snap.default_policy == DefaultPolicy::AllowAll;
        let tunnel = allow_all || !allow.is_empty();
        Layout { opts, routed, exact, wildcard, allow, allow_all, tunnel }
    }

    // === explicit proxy ===

    /// A CONNECT listener: routed hosts go to the internal TLS listener, allowed hosts through
    /// the tunnel guard to a raw tunnel, everything else is refused by Envoy.
    fn proxy_listener(&self, name: &str, port: u16) -> Value {
        let mut l = json!({
            "name": format!("proxy_{name}"),
            "address": {"socket_address": {"address": self.opts.bind.to_string(), "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": format!("proxy_{name}"),
                    // Python's http.client (urllib3: requests, boto3) sends `CONNECT … HTTP/1.0`;
                    // Envoy refuses HTTP/1.0 with 426 unless told otherwise.
                    "http_protocol_options": {"accept_http_10": true},
                    "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                    "http_filters": self.proxy_filters(),
                    // The CONNECT target keeps its port (the tunnel guard and the tunnel need
                    // it); virtual hosts match on the host alone.
                    "route_config": {"name": "proxy", "ignore_port_in_host_matching": true,
                        "virtual_hosts": self.proxy_vhosts()},
                },
            }]}],
        });
        hardened(&mut l["filter_chains"][0]["filters"][0]["typed_config"]);
        l
    }

    /// Only tunnels to unrouted hosts ask keyswap (the tunnel guard): routed hosts go to the
    /// internal listener, and refusals are answered by Envoy.
    fn proxy_vhosts(&self) -> Vec<Value> {
        let no_guard = json!({"envoy.filters.http.ext_proc": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": true}});
        let refuse_plain = json!({"match": {"prefix": "/"}, "direct_response": {"status": 403, "body": {
            "inline_string": "keyswap gateway: plain HTTP is not forwarded; use HTTPS through this proxy (CONNECT)\n"}}});
        let mut refuse_plain_unguarded = refuse_plain.clone();
        refuse_plain_unguarded["typed_per_filter_config"] = no_guard.clone();
        let mut vhosts = Vec::new();
        if !self.routed.is_empty() {
            vhosts.push(json!({"name": "routed", "domains": self.routed,
                "routes": [connect_to(INTERNAL_TLS), refuse_plain], "typed_per_filter_config": no_guard}));
        }
        if !self.allow.is_empty() && !self.allow_all {
            vhosts.push(json!({"name": "allowed", "domains": self.allow,
                "routes": [connect_to("keyswap_tunnel"), refuse_plain_unguarded.clone()]}));
        }
        let fallback = if self.allow_all {
            connect_to("keyswap_tunnel")
        } else {
            json!({"match": {"connect_matcher": {}}, "direct_response": {"status": 403},
                "typed_per_filter_config": no_guard})
        };
        vhosts.push(json!({"name": "default", "domains": ["*"], "routes": [fallback, refuse_plain_unguarded]}));
        vhosts
    }

    fn proxy_filters(&self) -> Vec<Value> {
        let mut filters = Vec::new();
        if self.tunnel {
            // The tunnel guard: keyswap resolves the CONNECT target, refuses loopback, private,
            // link-local and other non-public addresses, and pins the tunnel to the address it
            // checked by rewriting `:authority` to it (so a second DNS answer cannot differ).
            filters.push(json!({
                "name": "envoy.filters.http.ext_proc",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "keyswap"},
                        "initial_metadata": [{"key": crate::vocab::ROLE_METADATA, "value": crate::vocab::ROLE_TUNNEL}]},
                    "failure_mode_allow": false,
                    "message_timeout": "6s",
                    // `:authority` is rewritten; a refused rewrite must fail the request, never
                    // tunnel to the unchecked name.
                    "mutation_rules": {"allow_all_routing": true, "disallow_is_error": true},
                    "processing_mode": headers_only(),
                },
            }));
            filters.push(dfp_filter());
        }
        filters.push(router());
        filters
    }

    // === TLS termination (internal listener, and redirected TLS listeners) ===

    /// The internal listener the proxy hands routed CONNECTs to, and one listener per
    /// redirected TLS port; all share one filter chain.
    fn tls_listeners(&self, tls_ports: &[NamedPort]) -> Vec<Value> {
        let tls_inspector = json!([{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]);
        let chain = self.tls_chain();
        // SigV4 routes have Envoy buffer whole request bodies (ext_proc BUFFERED); the buffer must
        // hold the largest body keyswap signs, or Envoy answers 413 first.
        let buffer_limit = crate::inject::sigv4::MAX_BODY_BYTES + 1024 * 1024;
        let mut listeners =
            vec![json!({"name": INTERNAL_TLS, "internal_listener": {}, "listener_filters": tls_inspector,
            "per_connection_buffer_limit_bytes": buffer_limit, "filter_chains": [chain.clone()]})];
        for (name, port) in tls_ports {
            listeners.push(json!({
                "name": format!("tls_{name}"),
                "address": {"socket_address": {"address": self.opts.bind.to_string(), "port_value": port}},
                "per_connection_buffer_limit_bytes": buffer_limit,
                "listener_filters": tls_inspector, "filter_chains": [chain.clone()]}));
        }
        listeners
    }

    /// TLS with the leaf certificate (SDS), then ext_proc (fail closed) and the router.
    fn tls_chain(&self) -> Value {
        let mut filters = vec![ext_proc_filter()];
        if !self.wildcard.is_empty() {
            filters.push(dfp_filter());
        }
        filters.push(router());
        let certs = self.opts.certs;
        let mut chain = json!({
            "filter_chain_match": {"server_names": self.routed},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificate_sds_secret_configs": [{"name": LEAF_SECRET, "sds_config": {
                        "path_config_source": {"path": abs(&leaf_sds_path(certs)), "watched_directory": {"path": abs(&certs.dir)}},
                        "resource_api_version": "V3"}}],
                },
            }},
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "tls",
                    "strip_any_host_port": true,
                    // Paths are normalised before keyswap matches them (RFC 3986 dot-segments,
                    // `%2E`, `//`); keyswap refuses what is left ambiguous. Escaped slashes are
                    // kept: Bedrock model ARNs travel as `%2F`, and keyswap judges them decoded.
                    "normalize_path": true,
                    "merge_slashes": true,
                    "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
                    "http_filters": filters,
                    "route_config": {"name": "providers", "virtual_hosts": self.tls_vhosts()},
                },
            }],
        });
        hardened(&mut chain["filters"][0]["typed_config"]);
        chain
    }

    fn tls_vhosts(&self) -> Vec<Value> {
        let mut vhosts: Vec<Value> = self
            .exact
            .iter()
            .map(|h| {
                json!({"name": h, "domains": [h], "routes": [{"match": {"prefix": "/"},
                    "route": {"cluster": cluster_name(h), "timeout": "600s"}}]})
            })
            .collect();
        if !self.wildcard.is_empty() {
            vhosts.push(json!({"name": "wildcard", "domains": self.wildcard, "routes": [{"match": {"prefix": "/"},
                "route": {"cluster": "keyswap_dynamic_tls", "timeout": "600s"}}]}));
        }
        vhosts.push(json!({"name": "misdirected", "domains": ["*"], "routes": [{"match": {"prefix": "/"},
            "direct_response": {"status": 421, "body": {"inline_string": "keyswap gateway: no route for this host\n"}}}]}));
        vhosts
    }

    // === clusters ===

    fn clusters(&self) -> Vec<Value> {
        let keyswap_address = match &self.opts.extproc {
            ExtProcAddress::Uds(p) => json!({"pipe": {"path": abs(p)}}),
            ExtProcAddress::Tcp(a) => {
                json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}})
            }
        };
        let mut clusters = vec![
            json!({
                "name": "keyswap", "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": "keyswap", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": keyswap_address}}]}]},
            }),
            json!({
                "name": INTERNAL_TLS, "type": "STATIC",
                "load_assignment": {"cluster_name": INTERNAL_TLS, "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                    {"envoy_internal_address": {"server_listener_name": INTERNAL_TLS}}}}]}]},
            }),
        ];
        clusters.extend(self.exact.iter().map(|h| self.provider_cluster(h)));
        if !self.wildcard.is_empty() {
            clusters.push(self.dfp_cluster("keyswap_dynamic_tls", true));
        }
        if self.tunnel {
            clusters.push(self.dfp_cluster("keyswap_tunnel", false));
        }
        clusters
    }

    /// One routed host's upstream: TLS with SNI and a SAN check, at its address or an override.
    fn provider_cluster(&self, host: &str) -> Value {
        let over = self.opts.upstreams.iter().find(|o| o.host == host);
        let (addr, port) = match over {
            Some(o) => {
                let (a, p) = o.address.rsplit_once(':').expect("validated");
                (a.trim_matches(['[', ']']).to_owned(), p.parse::<u16>().expect("validated"))
            }
            None => (host.to_owned(), 443),
        };
        let static_ip = addr.parse::<std::net::IpAddr>().is_ok();
        let ca = over.and_then(|o| o.ca.as_deref()).map(abs).unwrap_or_else(|| abs(&self.opts.system_ca));
        json!({
            "name": cluster_name(host),
            "type": if static_ip { "STATIC" } else { "LOGICAL_DNS" },
            "dns_lookup_family": "V4_PREFERRED",
            "connect_timeout": "5s",
            "load_assignment": {"cluster_name": cluster_name(host), "endpoints": [{"lb_endpoints": [{"endpoint":
                {"address": {"socket_address": {"address": addr, "port_value": port}}}}]}]},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {"validation_context": {
                    "trusted_ca": {"filename": ca},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}]}},
            }},
        })
    }

    /// A dynamic forward proxy cluster: wildcard hosts (with TLS, SNI and SAN from the
    /// request) or raw tunnels.
    fn dfp_cluster(&self, name: &str, tls: bool) -> Value {
        let mut c = json!({
            "name": name, "connect_timeout": "5s", "lb_policy": "CLUSTER_PROVIDED",
            "cluster_type": {"name": "envoy.clusters.dynamic_forward_proxy", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                "dns_cache_config": dns_cache()}},
        });
        if tls {
            c["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"validation_context": {"trusted_ca": {"filename": abs(&self.opts.system_ca)}}}}});
            c["typed_extension_protocol_options"] = json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "upstream_http_protocol_options": {"auto_sni": true, "auto_san_validation": true},
                "explicit_http_config": {"http_protocol_options": {}}}});
        }
        c
    }
}

/// The fail-closed ext_proc filter on the TLS chain: every routed request asks keyswap.
fn ext_proc_filter() -> Value {
    json!({
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "keyswap"}},
            "failure_mode_allow": false,
            "allow_mode_override": true,
            "message_timeout": "2s",
            "max_message_timeout": "10s",
            // For spec.agentAuth edgeTrust: who is on the other end of the connection.
            "request_attributes": ["source.address", "connection.mtls"],
            "processing_mode": headers_only(),
        },
    })
}

/// What every connection manager does with agent input before any filter sees it: the peer
/// address is the TCP peer (never X-Forwarded-For), and headers spelled with underscores
/// (`x_api_key`) are dropped.
fn hardened(hcm: &mut Value) {
    hcm["use_remote_address"] = json!(true);
    hcm["xff_num_trusted_hops"] = json!(0);
    hcm["common_http_protocol_options"] = json!({"headers_with_underscores_action": "DROP_HEADER"});
}

fn connect_to(cluster: &str) -> Value {
    json!({"match": {"connect_matcher": {}}, "route": {"cluster": cluster,
        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}})
}

fn dns_cache() -> Value {
    json!({"name": "keyswap_dns", "dns_lookup_family": "V4_PREFERRED"})
}

fn dfp_filter() -> Value {
    json!({
        "name": "envoy.filters.http.dynamic_forward_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
            "dns_cache_config": dns_cache(),
        },
    })
}

fn router() -> Value {
    json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
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
