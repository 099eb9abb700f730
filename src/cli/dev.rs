//! `dev`: the whole gateway on one machine (certificates, Envoy config, Envoy and the ext_proc
//! server).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use super::certs::{default_certs_dir, ensure_certs, gateway_view, write_ca_bundle, GatewayView};
use super::envoy_config::find_envoy;
use super::serve::{run_extproc, shutdown_signal, Serving, TunnelArgs, SPAN_QUEUE};
use super::{runtime, SourceArgs};
use crate::certs::GatewayCerts;
use crate::config::Key;
use crate::extproc::server::Bound;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Directory of manifests.
    #[arg(long, short = 'c', value_name = "DIR", default_value = "manifests/examples")]
    pub config: PathBuf,
    /// The EgressGateway to run, NAMESPACE/NAME (optional with exactly one).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub gateway: Option<String>,
    /// Take a Secret key from an environment variable, e.g. `anthropic/token=ANTHROPIC_API_KEY`. Repeatable.
    #[arg(long = "secret", alias = "secret-from-env", value_name = "[NAMESPACE/]SECRET/KEY=ENVVAR")]
    pub secrets: Vec<String>,
    /// Working directory: certificates, envoy.yaml, envoy.log, the ext_proc socket. Default: certs/<gateway name>.
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Send a provider host to another address (see envoy-config --help). Repeatable; in the
    /// environment, space-separated.
    #[arg(long = "upstream", value_name = "HOST=ADDR:PORT[,ca=FILE]", env = "KEYSWAP_UPSTREAM", value_delimiter = ' ')]
    pub upstreams: Vec<crate::envoy::UpstreamOverride>,
    /// Envoy admin port on 127.0.0.1 (0 picks a free port).
    #[arg(long, default_value_t = 9901)]
    pub admin_port: u16,
    /// CA bundle Envoy trusts for providers.
    #[arg(long, value_name = "FILE", default_value = crate::envoy::SYSTEM_CA_BUNDLE)]
    pub system_ca: PathBuf,
    /// keyswap's admin HTTP address: /metrics, /healthz, /readyz. Port 0 picks a free port.
    /// (9465, beside `serve`'s 9464, so a dev gateway and a served one can run side by side.)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9465")]
    pub metrics: SocketAddr,
    #[command(flatten)]
    pub tunnel: TunnelArgs,
}

pub(super) fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    let src_args = SourceArgs {
        config: Some(args.config.clone()),
        gateway: args.gateway.clone(),
        secret_from_env: args.secrets.clone(),
    };
    let source = Arc::new(src_args.source()?);
    let view = match gateway_view(&source, &src_args.selector()?) {
        Ok(v) => v,
        Err(errors) => {
            eprintln!("keyswap: cannot start: {errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let envoy_bin = find_envoy()?;
    let work = args.work.clone().unwrap_or_else(|| default_certs_dir(&view.key));
    let certs = ensure_certs(&view, &work)?;
    let work = std::path::absolute(&work)?;
    let uds = work.join("keyswap.sock");
    let envoy_yaml = write_envoy_yaml(&args, &view, &certs, &work, &uds)?;
    let bundle = write_ca_bundle(&certs, &args.system_ca)?;
    let (proxy_ports, _) = crate::envoy::ports(&view.spec).map_err(anyhow::Error::msg)?;
    let proxy_port =
        proxy_ports.first().map(|(_, p)| *p).ok_or_else(|| anyhow::anyhow!("gateway has no proxy listener"))?;
    let snapshot = view.snapshot;

    let rt = runtime(None)?;
    rt.block_on(async move {
        let listeners =
            vec![Bound::uds(&uds, 0o600).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", uds.display()))?];
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = Serving { listeners, span_queue: SPAN_QUEUE, tunnel: args.tunnel.guard() };
        let server = tokio::spawn(run_extproc(source, snapshot, serving, args.metrics, async {
            let _ = stop_rx.await;
        }));
        let mut envoy = spawn_envoy(&envoy_bin, &envoy_yaml, &work)?;
        let envoy_pid = envoy.id();
        wait_until_listening(&mut envoy, proxy_port, &work).await?;
        tracing::info!(port = proxy_port, log = %work.join("envoy.log").display(), "Envoy is up");
        print_agent_env(&view.key, proxy_port, &certs, &bundle)?;

        let renew = spawn_leaf_renewal(work.clone(), view.key.clone(), certs.hosts.clone());
        let result = tokio::select! {
            _ = shutdown_signal() => Ok(()),
            status = envoy.wait() => Err(anyhow::anyhow!("Envoy exited ({}); see {}", status?, work.join("envoy.log").display())),
        };
        renew.abort();
        if let Some(pid) = envoy_pid {
            let _ = tokio::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), envoy.wait()).await;
        let _ = stop_tx.send(());
        server.await??;
        result
    })?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Writes the gateway's Envoy bootstrap to `envoy.yaml` in `work` (ext_proc on `uds`, listeners on
/// 127.0.0.1) and returns its path.
fn write_envoy_yaml(
    args: &DevArgs,
    view: &GatewayView,
    certs: &GatewayCerts,
    work: &Path,
    uds: &Path,
) -> anyhow::Result<PathBuf> {
    let opts = crate::envoy::Options {
        extproc: crate::envoy::ExtProcAddress::Uds(uds.to_path_buf()),
        upstreams: &args.upstreams,
        certs,
        admin_port: args.admin_port,
        bind: std::net::IpAddr::from([127, 0, 0, 1]),
        system_ca: args.system_ca.clone(),
    };
    let bootstrap =
        crate::envoy::bootstrap(&view.key, &view.spec, &view.snapshot, &opts).map_err(anyhow::Error::msg)?;
    let envoy_yaml = work.join("envoy.yaml");
    std::fs::write(&envoy_yaml, crate::envoy::to_yaml(&bootstrap))?;
    Ok(envoy_yaml)
}

/// Starts Envoy on `envoy_yaml`, its output in `envoy.log` in `work`; killed if dropped.
fn spawn_envoy(envoy_bin: &Path, envoy_yaml: &Path, work: &Path) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::File::create(work.join("envoy.log"))?;
    tokio::process::Command::new(envoy_bin)
        .arg("-c")
        .arg(envoy_yaml)
        .args(["--disable-hot-restart", "-l", "warning"])
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", envoy_bin.display()))
}

/// Waits until Envoy accepts connections on `proxy_port`: an error if it exits first (with its
/// log) or is not listening within 30 s.
async fn wait_until_listening(envoy: &mut tokio::process::Child, proxy_port: u16, work: &Path) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", proxy_port)).await.is_err() {
        if let Some(status) = envoy.try_wait()? {
            let log = std::fs::read_to_string(work.join("envoy.log")).unwrap_or_default();
            anyhow::bail!("Envoy exited ({status}) before listening:\n{log}");
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "Envoy did not listen on 127.0.0.1:{proxy_port} within 30 s; see {}",
                work.join("envoy.log").display()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Prints the environment an agent needs to go through the gateway, and flushes stdout.
fn print_agent_env(key: &Key, proxy_port: u16, certs: &GatewayCerts, bundle: &Path) -> std::io::Result<()> {
    let ca = certs.ca_cert.display().to_string();
    let b = bundle.display();
    println!("# keyswap dev: gateway {key} is running. Point an agent at it:");
    println!("export HTTPS_PROXY=http://127.0.0.1:{proxy_port}");
    println!("export SSL_CERT_FILE={b}");
    println!("export REQUESTS_CA_BUNDLE={b}");
    println!("export NODE_EXTRA_CA_CERTS={ca}");
    println!("export AWS_CA_BUNDLE={b}");
    println!("# and give it placeholder keys, e.g. ANTHROPIC_API_KEY={}", crate::provider::PLACEHOLDER);
    use std::io::Write as _;
    std::io::stdout().flush()
}

/// Every hour, mints a new leaf certificate when the current one is due and rewrites its SDS file.
fn spawn_leaf_renewal(dir: PathBuf, key: Key, hosts: Vec<String>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            let now = time::OffsetDateTime::now_utc();
            match crate::certs::ensure(&dir, &key, hosts.clone(), now, crate::certs::LeafPolicy::default()) {
                Ok(c) if c.leaf_minted => {
                    if let Err(e) = crate::envoy::write_leaf_sds(&c) {
                        tracing::error!(error = %e, "cannot update the leaf SDS file");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "leaf renewal failed; will retry in an hour"),
            }
        }
    })
}
