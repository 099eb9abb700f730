//! `dev`: the whole gateway on one machine: the gateway CA, Envoy on the ADS bootstrap, and
//! keyswap serving ext_proc and ADS (routes, hosts and the leaf follow the manifests live).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use super::certs::{default_certs_dir, gateway_view, write_ca_bundle};
use super::envoy_config::find_envoy;
use super::serve::{run_extproc, shutdown_signal, Serving, TunnelArgs};
use super::{parse_lifetime, runtime, SourceArgs};
use crate::config::Key;
use crate::envoy::control::ControlPlane;
use crate::extproc::server::Bound;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Directory of manifests.
    #[arg(long, short = 'c', env = "KEYSWAP_CONFIG", value_name = "DIR", default_value = "manifests/examples")]
    pub config: PathBuf,
    /// The EgressGateway to run, NAMESPACE/NAME (optional with exactly one).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub gateway: Option<String>,
    /// Take a Secret key from an environment variable, e.g. `anthropic/token=ANTHROPIC_API_KEY`. Repeatable.
    #[arg(long = "secret", alias = "secret-from-env", value_name = "[NAMESPACE/]SECRET/KEY=ENVVAR")]
    pub secrets: Vec<String>,
    /// Working directory: the gateway CA, envoy.yaml, envoy.log, envoy-admin.sock (Envoy's admin
    /// interface) and envoy-admin.txt (its address), the ext_proc and ADS socket.
    /// Default: certs/<gateway name>.
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Send a provider host to another address (see envoy-config --help). Repeatable; in the
    /// environment, space-separated.
    #[arg(long = "upstream", value_name = "HOST=ADDR:PORT[,ca=FILE]", env = "KEYSWAP_UPSTREAM", value_delimiter = ' ')]
    pub upstreams: Vec<crate::envoy::UpstreamOverride>,
    /// Put Envoy's admin interface on 127.0.0.1:PORT (0 picks a free port) instead of the Unix
    /// socket envoy-admin.sock in --work, which only you can open. On a TCP port any local
    /// process, an agent included, can stop Envoy or turn on its debug log, which shows the real
    /// keys it sends upstream (the log file is owner-only).
    #[arg(long, value_name = "PORT")]
    pub admin_port: Option<u16>,
    /// CA bundle Envoy trusts for providers. Default: this machine's (Debian's, Fedora's and
    /// RHEL's, openSUSE's or Alpine's path).
    #[arg(long, value_name = "FILE", default_value = super::certs::local_system_ca_bundle())]
    pub system_ca: PathBuf,
    /// How long each leaf certificate is valid (renewed after two thirds of it), e.g. 30s, 24h
    /// (10s to 365d).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_lifetime)]
    pub leaf_lifetime: std::time::Duration,
    /// keyswap's admin HTTP address: /metrics, /healthz, /readyz. Port 0 picks a free port.
    /// (9465, not `serve`'s 9464; a dev gateway and a served one of the same manifests still
    /// share the proxy port, so run one at a time.)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9465")]
    pub metrics: SocketAddr,
    #[command(flatten)]
    pub tunnel: TunnelArgs,
    #[command(flatten)]
    pub observe: super::envoy_config::ObserveArgs,
    #[command(flatten)]
    pub tunnels: super::envoy_config::TunnelRouteArgs,
    #[command(flatten)]
    pub bounds: super::envoy_config::BoundsArgs,
}

pub(super) fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    let src_args = SourceArgs {
        config: Some(args.config.clone()),
        gateway: args.gateway.clone(),
        secret_from_env: args.secrets.clone(),
    };
    let source = Arc::new(src_args.source()?);
    // Watching from before the first load: a change while keyswap starts is not missed.
    let events = crate::config::file::Events::start(&source.dir);
    let view = match gateway_view(&source, &src_args.selector()?) {
        Ok(v) => v,
        Err(errors) => {
            eprintln!("keyswap: cannot start: {errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let envoy_bin = find_envoy()?;
    let (proxy_ports, _) = crate::envoy::ports(&view.snapshot.listeners).map_err(anyhow::Error::msg)?;
    let proxy_port =
        proxy_ports.first().map(|(_, p)| *p).ok_or_else(|| anyhow::anyhow!("gateway has no proxy listener"))?;
    let work = std::path::absolute(args.work.clone().unwrap_or_else(|| default_certs_dir(&view.key)))?;
    refuse_what_is_taken(proxy_port, &work)?;
    crate::certs::ensure_ca(&work, &view.key, time::OffsetDateTime::now_utc())?;
    let ca_cert = work.join("ca.crt");
    let uds = work.join("keyswap.sock");
    let envoy_yaml = work.join("envoy.yaml");
    let extproc = crate::envoy::ExtProcAddress::Uds(uds.clone());
    std::fs::write(
        &envoy_yaml,
        crate::envoy::to_yaml(&crate::envoy::ads_bootstrap(
            &view.key,
            &extproc,
            &args
                .admin_port
                .map_or_else(|| crate::envoy::Admin::Socket(work.join(ENVOY_ADMIN_SOCKET)), crate::envoy::Admin::Port),
            &args.bounds.bounds(),
        )),
    )?;
    let bundle = write_ca_bundle(&ca_cert, &args.system_ca)?;
    let snapshot = view.snapshot;
    let options = crate::envoy::Options {
        upstreams: args.upstreams.clone(),
        bind: std::net::IpAddr::from([127, 0, 0, 1]),
        system_ca: args.system_ca.clone(),
        delivery: crate::envoy::Delivery::Ads,
        spans: crate::envoy::span_env(),
        observe_response_bodies: args.observe.observe_response_bodies,
        tunnel_max_duration: args.tunnels.tunnel_max_duration.0,
    };

    let rt = runtime(None)?;
    rt.block_on(async move {
        let listeners =
            vec![Bound::uds(&uds, 0o600).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", uds.display()))?];
        let ca: crate::certs::CaCell = Arc::default();
        let ca_watch = crate::certs::watch_dir(work.clone(), ca.clone());
        let control = ControlPlane { ads: Default::default(), options, ca, leaf_lifetime: args.leaf_lifetime };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serving =
            Serving { listeners, span_queue: None, tunnel: args.tunnel.guard(), control: Some(control), ca_required: true };
        let mut server = tokio::spawn(run_extproc((source, events), snapshot, serving, args.metrics, async {
            let _ = stop_rx.await;
        }));
        let mut envoy = spawn_envoy(&envoy_bin, &envoy_yaml, &work)?;
        let envoy_pid = envoy.id();
        // keyswap's own start can fail after Envoy's began (its admin port taken, a bad OTEL_*
        // variable): said as such, not as an Envoy that never came up (Envoy is killed on return).
        tokio::select! {
            up = wait_until_listening(&mut envoy, proxy_port, &work) => up?,
            ended = &mut server => return Err(server_ended(ended)),
        }
        tracing::info!(port = proxy_port, log = %work.join("envoy.log").display(), "Envoy is up");
        print_agent_env(&view.key, proxy_port, &ca_cert, &bundle)?;

        let (result, server) = tokio::select! {
            _ = shutdown_signal() => (Ok(()), Some(server)),
            status = envoy.wait() => (Err(anyhow::anyhow!("Envoy exited ({}); see {}", status?, work.join("envoy.log").display())), Some(server)),
            ended = &mut server => (Err(server_ended(ended)), None),
        };
        ca_watch.abort();
        if let Some(pid) = envoy_pid {
            let _ = tokio::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), envoy.wait()).await;
        let _ = stop_tx.send(());
        if let Some(server) = server {
            server.await??;
        }
        result
    })?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// What another gateway holds, refused before anything is written or started: the proxy port
/// (whatever holds it would pass for Envoy being up), and a keyswap serving in `work` (which keeps
/// its files).
fn refuse_what_is_taken(proxy_port: u16, work: &Path) -> anyhow::Result<()> {
    std::net::TcpListener::bind(("127.0.0.1", proxy_port)).map_err(|e| {
        anyhow::anyhow!(
            "cannot use 127.0.0.1:{proxy_port}, the gateway's proxy port: {e} (another `keyswap dev` or Envoy \
             running? stop it first, or give the gateway's listener another port)"
        )
    })?;
    let uds = work.join("keyswap.sock");
    if std::os::unix::net::UnixStream::connect(&uds).is_ok() {
        anyhow::bail!(
            "cannot listen on {}: another process is serving on it (a second keyswap?): stop it, or give this one \
             another --work",
            uds.display()
        );
    }
    Ok(())
}

/// keyswap's server stopped on its own while Envoy ran: what it said.
fn server_ended(ended: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match ended {
        Ok(Err(e)) => e.context("keyswap stopped serving"),
        Ok(Ok(())) => anyhow::anyhow!("keyswap stopped serving"),
        Err(e) => anyhow::anyhow!("keyswap stopped serving: {e}"),
    }
}

/// Where `dev` has Envoy write its admin address, in the working directory.
pub const ENVOY_ADMIN_FILE: &str = "envoy-admin.txt";
/// `dev`'s Envoy admin socket (owner-only), in the working directory, unless `--admin-port`.
pub const ENVOY_ADMIN_SOCKET: &str = "envoy-admin.sock";

/// Starts Envoy on `envoy_yaml`, its output in `envoy.log` in `work`; killed if dropped.
fn spawn_envoy(envoy_bin: &Path, envoy_yaml: &Path, work: &Path) -> anyhow::Result<tokio::process::Child> {
    // Owner-only: Envoy's log shows the headers it sends upstream (the real key) at debug level,
    // which anyone reaching its admin interface can turn on (its socket is owner-only too, unless
    // --admin-port puts it on loopback TCP).
    let log = {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        let path = work.join("envoy.log");
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
        // A log left by an earlier run keeps its mode on open: made owner-only here.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file
    };
    tokio::process::Command::new(envoy_bin)
        .arg("-c")
        .arg(envoy_yaml)
        .args(["--disable-hot-restart", "-l", "warning"])
        // With --admin-port 0 the port is Envoy's choice; it is written here.
        .arg("--admin-address-path")
        .arg(work.join(ENVOY_ADMIN_FILE))
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
fn print_agent_env(key: &Key, proxy_port: u16, ca_cert: &Path, bundle: &Path) -> std::io::Result<()> {
    let ca = ca_cert.display().to_string();
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
