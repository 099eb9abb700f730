//! The Envoy resources of one gateway, from its snapshot: listeners, clusters and route
//! configurations. The static bootstrap and the ADS server both take them from here.

use serde_json::{json, Value};

use super::{
    abs, bodies_filter, bodies_on_route, cluster_name, ext_proc_filter, headers_only, keyswap_cluster, leaf_sds_path,
    observe_filter, observe_on_route, router, Delivery, NamedPort, Options, RequestBody, INTERNAL_TLS, LEAF_SECRET,
};
use crate::api::DefaultPolicy;
use crate::config::snapshot::terminated;
use crate::config::Snapshot;

use crate::vocab::FORWARDING_HEADERS as AGENT_FORWARDING_HEADERS;

/// A gateway's hosts, sorted by how Envoy treats them, and the options the resources use.
pub(super) struct Layout<'a> {
    opts: &'a Options,
    /// Resources for ADS (route configurations and the leaf by name) rather than inline.
    ads: bool,
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
    /// Route host patterns whose response bodies keyswap reads on every request, with the
    /// request body it reads there: their virtual hosts turn on the body-streaming deciding
    /// filter, or with `--observe-response-bodies` the observing one.
    bodies: Vec<(String, RequestBody)>,
}

impl<'a> Layout<'a> {
    /// `routed`: the hosts the leaf certificate names (see [`super::leaf_hosts`]).
    pub(super) fn new(snap: &Snapshot, opts: &'a Options, routed: Vec<String>) -> Self {
        let (wildcard, exact) = routed.iter().cloned().partition(|h: &String| h.starts_with("*."));
        // Virtual hosts match the host alone: the tunnel guard checks the port.
        let mut allow: Vec<String> =
            snap.allow.iter().map(|a| a.host.to_string()).filter(|h| !terminated(&routed, h)).collect();
        allow.sort();
        allow.dedup();
        let allow_all = snap.default_policy == DefaultPolicy::AllowAll;
        let tunnel = allow_all || !allow.is_empty();
        let ads = matches!(opts.delivery, Delivery::Ads);
        let bodies = body_hosts(snap, opts);
        Layout { opts, ads, routed, exact, wildcard, allow, allow_all, tunnel, bodies }
    }

    /// The per-filter configuration of a virtual host for `hosts`: the filter that reads their
    /// response bodies, when keyswap reads those of any of them.
    fn body_filters(&self, hosts: &[String]) -> Option<Value> {
        let reads = self.reads_bodies(hosts)?;
        Some(if self.opts.observe_response_bodies { observe_on_route() } else { bodies_on_route(reads) })
    }

    /// The most of the request body a virtual host for `hosts` reads, when keyswap reads the
    /// response bodies of any of them on every request.
    fn reads_bodies(&self, hosts: &[String]) -> Option<RequestBody> {
        self.bodies.iter().filter(|(h, _)| hosts.contains(h)).map(|(_, r)| *r).max()
    }

    /// [`Self::reads_bodies`] for the virtual host that serves a request to the routed `host`:
    /// its own when a route names it exactly, else the one for all `*.` patterns.
    pub(super) fn reads_bodies_of(&self, host: &str) -> Option<RequestBody> {
        let host = host.to_ascii_lowercase();
        if self.routes_exactly(&host) {
            self.reads_bodies(std::slice::from_ref(&host))
        } else {
            self.reads_bodies(&self.wildcard)
        }
    }

    /// The routed virtual hosts of a TLS chain: one per host a route names exactly, then one for
    /// every `*.` pattern, each with its domains and [`Self::body_filters`].
    pub(super) fn routed_virtual_hosts(&self) -> Vec<(Vec<String>, Option<Value>)> {
        let mut vhosts: Vec<(Vec<String>, Option<Value>)> =
            self.exact.iter().map(|h| (vec![h.clone()], self.body_filters(std::slice::from_ref(h)))).collect();
        if !self.wildcard.is_empty() {
            vhosts.push((self.wildcard.clone(), self.body_filters(&self.wildcard)));
        }
        vhosts
    }

    /// Whether a route names `host` exactly (so it has a cluster an `--upstream` can redirect).
    pub(super) fn routes_exactly(&self, host: &str) -> bool {
        self.exact.iter().any(|h| h == host)
    }

    // === explicit proxy ===

    /// A CONNECT listener: routed hosts go to the internal TLS listener, allowed hosts through
    /// the tunnel guard to a raw tunnel, everything else is refused by Envoy.
    pub(super) fn proxy_listener(&self, name: &str, port: u16) -> Value {
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
                    // `CONNECT api.openai.com.:443` is the routed host's, terminated as it is.
                    "strip_trailing_host_dot": true,
                    "http_filters": self.proxy_filters(),
                },
            }]}],
        });
        let hcm = &mut l["filter_chains"][0]["filters"][0]["typed_config"];
        self.attach_routes(hcm, self.proxy_routes());
        hardened(hcm);
        l
    }

    /// The route configuration of the explicit proxies. The CONNECT target keeps its port (the
    /// tunnel guard and the tunnel need it); virtual hosts match on the host alone.
    fn proxy_routes(&self) -> Value {
        json!({"name": "proxy", "ignore_port_in_host_matching": true, "virtual_hosts": self.proxy_vhosts()})
    }

    /// The route configuration of the TLS chain. `x-envoy-external-address` (the agent's address,
    /// which Envoy sets on requests from outside) never reaches a provider, nor the forwarding
    /// headers an agent writes itself: the organisation's key would carry whatever client address
    /// an agent makes up to the provider's abuse and rate systems (keyswap still sees them, for
    /// spans: the router removes them last).
    fn tls_routes(&self) -> Value {
        json!({"name": "providers", "virtual_hosts": self.tls_vhosts(),
            "request_headers_to_remove": AGENT_FORWARDING_HEADERS})
    }

    /// The route configurations ADS serves by name (none inline).
    pub(super) fn route_configs(&self) -> Vec<Value> {
        vec![self.proxy_routes(), self.tls_routes()]
    }

    /// Inline in a static bootstrap; by name over ADS, so a route change never touches a
    /// listener (a listener update drains its connections).
    fn attach_routes(&self, hcm: &mut Value, routes: Value) {
        if self.ads {
            hcm["rds"] = json!({"config_source": {"ads": {}, "resource_api_version": "V3"},
                "route_config_name": routes["name"]});
        } else {
            hcm["route_config"] = routes;
        }
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
                "routes": [self.tunnel_route(), refuse_plain_unguarded.clone()]}));
        }
        let fallback = if self.allow_all {
            self.tunnel_route()
        } else {
            json!({"match": {"connect_matcher": {}}, "direct_response": {"status": 403},
                "typed_per_filter_config": no_guard})
        };
        vhosts.push(json!({"name": "default", "domains": ["*"], "routes": [fallback, refuse_plain_unguarded]}));
        vhosts
    }

    /// The route of raw tunnels: CONNECT to the tunnel cluster, closed after
    /// `--tunnel-max-duration` (Envoy never closes a tunnel when the route that let it open
    /// changes: a host taken off `spec.allow` stays reachable through the tunnels already open).
    fn tunnel_route(&self) -> Value {
        let mut r = connect_to("keyswap_tunnel");
        if let Some(d) = self.opts.tunnel_max_duration {
            r["route"]["max_stream_duration"] = json!({"max_stream_duration": format!("{}s", d.as_secs())});
        }
        r
    }

    fn proxy_filters(&self) -> Vec<Value> {
        let mut filters = Vec::new();
        // Over ADS the filters are there whether or not anything tunnels (the guard is disabled
        // on every other route), so the listener stays the same when the allow list changes.
        if self.tunnel || self.ads {
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
                    // For spec.agentAuth (edgeTrust): who is on the other end of the connection.
                    "request_attributes": crate::auth::REQUEST_ATTRIBUTES,
                    // `:authority` is rewritten; a refused rewrite must fail the request, never
                    // tunnel to the unchecked name.
                    "mutation_rules": {"allow_all_routing": true, "disallow_is_error": true},
                    "processing_mode": headers_only(),
                },
            }));
            filters.push(dfp_filter(true));
        }
        filters.push(router());
        filters
    }

    // === TLS termination (internal listener, and redirected TLS listeners) ===

    /// The internal listener the proxy hands routed CONNECTs to, and one listener per
    /// redirected TLS port; all share one filter chain.
    pub(super) fn tls_listeners(&self, tls_ports: &[NamedPort]) -> Vec<Value> {
        let tls_inspector = json!([{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]);
        let chain = self.tls_chain();
        let buffer_limit = REQUEST_BUFFER_BYTES;
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
        // The observing filter is always there (off by default), so turning it on for a route
        // is a route change, never a listener change.
        // So are both deciding filters: a route turns on the one that streams bodies.
        let mut filters = vec![observe_filter(), ext_proc_filter(), bodies_filter()];
        if !self.wildcard.is_empty() || self.ads {
            filters.push(dfp_filter(false));
        }
        filters.push(router());
        let sds_config = match &self.opts.delivery {
            Delivery::Static { certs_dir, .. } => json!({"path_config_source": {
                "path": abs(&leaf_sds_path(certs_dir)), "watched_directory": {"path": abs(certs_dir)}},
                "resource_api_version": "V3"}),
            Delivery::Ads => json!({"ads": {}, "resource_api_version": "V3"}),
        };
        let mut chain = json!({
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificate_sds_secret_configs": [{"name": LEAF_SECRET, "sds_config": sds_config}],
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
                },
            }],
        });
        // A static bootstrap only terminates TLS for the routed names. Over ADS the chain matches
        // any name, so a host change never touches the listener: an unrouted name gets the leaf
        // (which does not name it) and, past that, 421 from the `misdirected` virtual host.
        if !self.ads {
            chain["filter_chain_match"] = json!({"server_names": self.routed});
        }
        let hcm = &mut chain["filters"][0]["typed_config"];
        self.attach_routes(hcm, self.tls_routes());
        hardened(hcm);
        // Over HTTP/2 a request's buffer is its stream's flow-control window, not the listener's
        // buffer limit: at Envoy's default window (256 MiB) a 40 MiB body went to keyswap whole
        // where HTTP/1.1 gets 413. The same limit for both. (Not smaller: a 64 KiB window, Envoy's
        // edge guidance, made every body over 64 KiB that a budget or SigV4 reads whole a 413.)
        hcm["http2_protocol_options"]["initial_stream_window_size"] = json!(REQUEST_BUFFER_BYTES);
        hcm["http2_protocol_options"]["initial_connection_window_size"] = json!(REQUEST_BUFFER_BYTES);
        chain
    }

    fn tls_vhosts(&self) -> Vec<Value> {
        let mut vhosts: Vec<Value> = self
            .routed_virtual_hosts()
            .into_iter()
            .map(|(domains, filters)| {
                let (name, cluster) = match domains.as_slice() {
                    [h] if self.routes_exactly(h) => (h.clone(), cluster_name(h)),
                    _ => ("wildcard".to_owned(), "keyswap_dynamic_tls".to_owned()),
                };
                let mut v = json!({"name": name, "domains": domains, "routes": [{"match": {"prefix": "/"},
                    "route": {"cluster": cluster, "timeout": "600s"}}]});
                if let Some(filters) = filters {
                    v["typed_per_filter_config"] = filters;
                }
                v
            })
            .collect();
        vhosts.push(json!({"name": "misdirected", "domains": ["*"], "routes": [{"match": {"prefix": "/"},
            "direct_response": {"status": 421, "body": {"inline_string": "keyswap gateway: no route for this host\n"}}}]}));
        vhosts
    }

    // === clusters ===

    /// The clusters; over ADS without `keyswap` itself, which the bootstrap defines (Envoy
    /// reaches ADS through it).
    pub(super) fn clusters(&self) -> Vec<Value> {
        let mut clusters = Vec::new();
        if let Delivery::Static { extproc, .. } = &self.opts.delivery {
            clusters.push(keyswap_cluster(extproc));
        }
        clusters.push(json!({
                "name": INTERNAL_TLS, "type": "STATIC", "circuit_breakers": super::circuit_breakers(),
                "load_assignment": {"cluster_name": INTERNAL_TLS, "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                    {"envoy_internal_address": {"server_listener_name": INTERNAL_TLS}}}}]}]},
        }));
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
            "circuit_breakers": super::circuit_breakers(),
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
            "typed_extension_protocol_options": negotiated_http(json!({})),
        })
    }

    /// A dynamic forward proxy cluster: wildcard hosts (with TLS, SNI and SAN from the
    /// request) or raw tunnels.
    fn dfp_cluster(&self, name: &str, tls: bool) -> Value {
        let mut c = json!({
            "name": name, "connect_timeout": "5s", "lb_policy": "CLUSTER_PROVIDED",
            "circuit_breakers": super::circuit_breakers(),
            "cluster_type": {"name": "envoy.clusters.dynamic_forward_proxy", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                "dns_cache_config": dns_cache(!tls)}},
        });
        if tls {
            c["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"validation_context": {"trusted_ca": {"filename": abs(&self.opts.system_ca)}}}}});
            c["typed_extension_protocol_options"] =
                negotiated_http(json!({"auto_sni": true, "auto_san_validation": true}));
        }
        c
    }
}

/// The route host patterns whose response bodies keyswap reads on every request, each with the
/// most of the request body a route of it needs: every routed host when spans read bodies
/// (`spec.otlp.readBodies`, the default, with tracing on and a sampler that samples every
/// request; the request body too when `captureBody.maxBytes` is not 0), the hosts of routes with a budget on tokens (and their whole
/// request bodies, as SigV4's), and those of routes with `scrubResponseBodies` (only without
/// `--observe-response-bodies`: the observing filter never rewrites a body).
fn body_hosts(snap: &Snapshot, opts: &Options) -> Vec<(String, RequestBody)> {
    use super::Sampling;
    let tracing = opts.spans.traces(snap);
    // Spans read bodies of sampled requests only: of every request under the default sampler, of
    // a fraction under a ratio (then a host is fixed only for what reads every request).
    let spans_may_read = tracing && snap.capture.read_bodies && opts.spans.sampling != Sampling::None;
    let spans_read_every = spans_may_read && opts.spans.sampling == Sampling::Every;
    let mut hosts: Vec<(String, RequestBody)> = Vec::new();
    for e in &snap.routes.entries {
        let budget_reads = e.budgets.iter().any(|b| b.counts_tokens());
        let scrubs = e.scrub_response_bodies && !opts.observe_response_bodies;
        if !(spans_read_every || budget_reads || scrubs) {
            continue;
        }
        let request_body = if budget_reads || e.binding.signs_bodies() {
            RequestBody::Whole
        } else if spans_may_read && snap.capture.max_bytes > 0 {
            RequestBody::Capture
        } else {
            RequestBody::None
        };
        hosts.extend(e.hosts.iter().map(|h| (h.to_ascii_lowercase(), request_body)));
    }
    // One entry per host, with the most any of its routes reads.
    hosts.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    hosts.dedup_by(|a, b| a.0 == b.0);
    hosts
}

/// HTTP to a provider: HTTP/2 when its TLS handshake offers it (ALPN `h2`), else HTTP/1.1.
/// Over HTTP/2 a provider's answer ends with its last DATA frame, so Envoy sends keyswap one body
/// message where HTTP/1.1 takes two (the data, then an empty end of stream: benchmarks.md, run
/// 20), and one TLS connection carries many agents' requests.
fn negotiated_http(upstream_options: Value) -> Value {
    json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "upstream_http_protocol_options": upstream_options,
        "auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}})
}

/// What every connection manager does with agent input before any filter sees it: the peer
/// address is the TCP peer (never X-Forwarded-For), headers spelled with underscores
/// (`x_api_key`) are dropped, and a request's headers must arrive within
/// [`REQUEST_HEADERS_TIMEOUT`] (Envoy waits forever by default: a connection that sends half a
/// request line and stops holds its slot until the hour-long idle timeout). An agent's HTTP/2
/// connection carries at most [`MAX_CONCURRENT_STREAMS`] requests at once (Envoy's default is
/// 2^31 - 1), with flow-control windows of [`STREAM_WINDOW_BYTES`] and [`CONNECTION_WINDOW_BYTES`]
/// (Envoy's are 256 MiB: what a tunnel whose far end stopped reading made Envoy hold); what
/// bounds all agents' memory together is the overload manager ([`super::overload`]). A
/// connection with no request open is closed after [`IDLE_TIMEOUT`] (Envoy's default is an hour,
/// counted from accept: connections that never send a byte, or stall their TLS handshake, held
/// the gateway's connection limit against every other agent). The agent's address is not
/// appended to `X-Forwarded-For` (providers have no use for the cluster's addresses; keyswap
/// reads the connection's own).
fn hardened(hcm: &mut Value) {
    hcm["request_headers_timeout"] = json!(REQUEST_HEADERS_TIMEOUT);
    hcm["http2_protocol_options"] = json!({"max_concurrent_streams": MAX_CONCURRENT_STREAMS,
        "initial_stream_window_size": STREAM_WINDOW_BYTES, "initial_connection_window_size": CONNECTION_WINDOW_BYTES});
    hcm["use_remote_address"] = json!(true);
    hcm["xff_num_trusted_hops"] = json!(0);
    hcm["skip_xff_append"] = json!(true);
    hcm["common_http_protocol_options"] =
        json!({"headers_with_underscores_action": "DROP_HEADER", "idle_timeout": IDLE_TIMEOUT});
}

/// How long an agent's connection may stay open with no request on it.
pub const IDLE_TIMEOUT: &str = "60s";
/// An agent's HTTP/2 stream and connection windows on the proxy listener (the TLS chain's are
/// [`REQUEST_BUFFER_BYTES`]: it buffers the bodies keyswap reads whole).
const STREAM_WINDOW_BYTES: usize = 64 * 1024;
const CONNECTION_WINDOW_BYTES: usize = 1024 * 1024;

/// What Envoy buffers of one request on the TLS chain (listener buffer limit, HTTP/2 stream
/// window). SigV4 routes have Envoy buffer whole request bodies (ext_proc BUFFERED), token budgets
/// and body spans up to this (BUFFERED_PARTIAL); it must hold the largest body keyswap signs, or
/// Envoy answers 413 first.
const REQUEST_BUFFER_BYTES: usize = crate::inject::sigv4::MAX_BODY_BYTES + 1024 * 1024;

/// Requests one HTTP/2 connection of an agent's may have open at once; a client library waits
/// for a slot past it (Envoy's edge guidance says 100).
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// How long an agent's request headers may take to arrive, from the request's first byte.
pub const REQUEST_HEADERS_TIMEOUT: &str = "10s";

fn connect_to(cluster: &str) -> Value {
    json!({"match": {"connect_matcher": {}}, "route": {"cluster": cluster,
        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}})
}

/// The DNS cache of the dynamic forward proxy: one for tunnels, one for routed `*.` hosts. Envoy
/// keys it by `host:port` and refuses new hosts once it holds `max_hosts` (1,024 by default) until
/// unused ones expire (`host_ttl`, 5 min by default): one agent CONNECTing to an address on 1,024
/// ports made every new tunnel, and every new routed `*.` host (Azure resources), fail for five
/// minutes. Each cache holds ten times as many, whose entries expire in a minute: tunnels
/// (keyswap pins each tunnel to an address it resolved itself; Envoy's lookup of it is a copy),
/// and routed `*.` hosts, which an agent names (`r1.openai.azure.com` … `r1024…`).
fn dns_cache(tunnel: bool) -> Value {
    let name = if tunnel { "keyswap_tunnel_dns" } else { "keyswap_dns" };
    json!({"name": name, "dns_lookup_family": "V4_PREFERRED", "max_hosts": 10_240, "host_ttl": "60s"})
}

fn dfp_filter(tunnel: bool) -> Value {
    json!({
        "name": "envoy.filters.http.dynamic_forward_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
            "dns_cache_config": dns_cache(tunnel),
        },
    })
}
