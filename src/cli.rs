//! Command-line interface: `serve`, `check`, `explain`.

use std::net::SocketAddr;
use std::path::PathBuf;
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
}

#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Directory of manifests (*.yaml, *.yml; multi-document files allowed).
    #[arg(long, short = 'c', env = "KEYSWAP_CONFIG", value_name = "DIR")]
    pub config: PathBuf,
    /// The EgressGateway to serve, NAMESPACE/NAME. Optional when the configuration has exactly one.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub gateway: Option<String>,
    /// Take a Secret key from an environment variable (for development), e.g.
    /// `anthropic/token=ANTHROPIC_API_KEY`. NAMESPACE defaults to `default`. Repeatable; wins over files.
    #[arg(long = "secret-from-env", value_name = "[NAMESPACE/]SECRET/KEY=ENVVAR")]
    pub secret_from_env: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// TCP address for the gRPC server. Default 127.0.0.1:50051 when --uds is not given.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Unix socket path for the gRPC server (what Envoy uses in a sidecar). A stale socket is replaced.
    #[arg(long, value_name = "PATH")]
    pub uds: Option<PathBuf>,
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
    /// Request method (shown only; routes do not match on it).
    #[arg(long, default_value = "POST")]
    pub method: String,
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
    fn source(&self) -> anyhow::Result<FileSource> {
        let env = |v: &str| std::env::var(v).ok();
        let secrets = self
            .secret_from_env
            .iter()
            .map(|s| EnvSecret::parse(s, env).map_err(|e| anyhow::anyhow!("--secret-from-env {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(FileSource::new(&self.config, secrets))
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
    let source = Arc::new(args.source.source()?);
    let selector = args.source.selector()?;
    let snapshot = match source.snapshot(&selector) {
        Ok(s) => s,
        Err(errors) => {
            eprintln!("keyswap: cannot start: {errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    log_changes(None, &snapshot);
    // From here on the gateway is pinned: a later edit adding a second gateway does not change it.
    let selector = GatewaySelector::Named(snapshot.gateway.clone());
    let store = Arc::new(ArcSwap::from_pointee(snapshot));
    let _watch = file::watch(source.clone(), selector, store.clone(), |_| {}).map_err(anyhow::Error::msg)?;
    tracing::info!(dir = %source.dir.display(), "watching configuration directory");
    let shared = Arc::new(Shared { store, metrics: Arc::new(Metrics::default()) });

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut listeners = Vec::new();
        if let Some(path) = &args.uds {
            listeners.push(Bound::uds(path).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?);
        }
        if args.listen.is_some() || args.uds.is_none() {
            let addr = args.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051)));
            listeners.push(Bound::tcp(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?);
        }
        server::run(shared, listeners, shutdown_signal()).await
    })?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

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
        eprintln!("keyswap: no EgressGateway found in {}", args.config.display());
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
    for e in &snap.routes.entries {
        println!("  {}", describe_match(e));
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

fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let source = args.source.source()?;
    let snap = match source.snapshot(&args.source.selector()?) {
        Ok(s) => s,
        Err(errors) => return Ok(print_errors(&errors)),
    };
    let path_only = args.path.split_once('?').map_or(args.path.as_str(), |(p, _)| p);
    println!("request: {} https://{}{path_only}", args.method, args.host);
    println!("gateway: {} (defaultPolicy: {})", snap.gateway, snap.default_policy.as_str());
    match snap.decide(&args.host, &args.path) {
        Decision::Inject { entry, credential } => {
            println!("decision: inject");
            println!("  {}", describe_match(entry));
            println!("  policy {}", entry.binding.policy.as_deref().unwrap_or("-"));
            println!(
                "  writes {} = <redacted> {} (overwrites any value the agent sent)",
                credential.describe(),
                credential.fingerprint()
            );
            println!("  strips headers whenever the agent sends them: {}", entry.binding.strip_headers.join(", "));
            if !entry.binding.strip_query.is_empty() {
                println!("  strips query parameters: {}", entry.binding.strip_query.join(", "));
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
