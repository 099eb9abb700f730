//! Command-line interface: `serve`, `dev`, `check`, `explain`, `certs`, `envoy-config`, `crds`, `token`.
//!
//! One file per subcommand, each with its arguments; this module holds what they share (the
//! configuration source, the runtime, small parsers), logging, and the dispatch in [`run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::file::{EnvSecret, FileSource};
use crate::config::{GatewaySelector, Key};

mod certs;
mod check;
mod dev;
mod envoy_config;
mod explain;
mod serve;
mod token;

pub use certs::CertsArgs;
pub use dev::DevArgs;
pub use envoy_config::{find_envoy, EnvoyConfigArgs, ResourceArgs};
pub use explain::ExplainArgs;
pub use serve::{ServeArgs, TunnelArgs};
pub use token::{TokenCommand, TokenCreateArgs};

const ABOUT: &str =
    "Envoy ext_proc sidecar that replaces an AI agent's placeholder key with the real provider credential";

const LONG_ABOUT: &str = "\
keyswap sits beside an Envoy egress gateway. Envoy asks it about every request; keyswap matches
the request to an AIProviderRoute, removes every credential the agent sent, and writes the real
one from a Secret. Agents only ever hold the placeholder `keyswap-injected-by-proxy`.

Configuration is a directory of Kubernetes-style manifests (EgressGateway, AIProviderRoute,
CredentialInjectionPolicy, TokenBudget, v1 Secret). Edits take effect without a restart; a bad edit is logged
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
    /// Run the ext_proc gRPC server Envoy calls (with gRPC health) and Envoy's ADS (listeners,
    /// routes, clusters, the leaf certificate). Watches --config for changes.
    Serve(ServeArgs),
    /// Validate the configuration and print what it compiles to (secrets as fingerprints only),
    /// token budgets included. Exits 1 on any error, 3 on an unresolved credential or an unusable
    /// budget store, 4 with --strict on any warning (2 on a usage error).
    Check(check::CheckArgs),
    /// Show what keyswap would do with one request: which route and policy, what it writes, which
    /// token budgets it is counted in, or why it would deny.
    Explain(ExplainArgs),
    /// Create or reuse the gateway's CA (what `serve` mints leaves from), and mint a leaf file (a
    /// SAN per routed host) for a static bootstrap (`envoy-config --static`).
    Certs(CertsArgs),
    /// Print the Envoy bootstrap for a gateway: by default the one that hands Envoy to keyswap's
    /// ADS (written once); with --static every resource inline.
    EnvoyConfig(EnvoyConfigArgs),
    /// Print the CustomResourceDefinitions (EgressGateway, AIProviderRoute, CredentialInjectionPolicy,
    /// TokenBudget) as YAML.
    Crds,
    /// Run the whole gateway locally: the gateway CA, Envoy on keyswap's ADS, and keyswap.
    /// Prints the environment an agent needs. Ctrl-C stops both.
    Dev(DevArgs),
    /// Per-agent tokens for `EgressGateway.spec.agentAuth` (apiKeys validators).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Directory of manifests (*.yaml, *.yml; multi-document files allowed). Required except for
    /// `serve --kubernetes`.
    #[arg(long, short = 'c', env = "KEYSWAP_CONFIG", value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// The EgressGateway, NAMESPACE/NAME: the one to serve (or explain, or make certificates
    /// for); optional when the configuration has exactly one. `check` without it checks every
    /// gateway.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub gateway: Option<String>,
    /// Take a Secret key from an environment variable (for development), e.g.
    /// `anthropic/token=ANTHROPIC_API_KEY`. NAMESPACE defaults to `default`. Repeatable; wins over files.
    #[arg(long = "secret", alias = "secret-from-env", value_name = "[NAMESPACE/]SECRET/KEY=ENVVAR")]
    pub secret_from_env: Vec<String>,
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

/// Where `serve` listens for Envoy by default, and where `envoy-config` points Envoy.
pub const DEFAULT_UDS: &str = "/run/keyswap/keyswap.sock";

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("`{s}` is not an octal file mode (e.g. 600 or 660)"))
}

/// A leaf's lifetime such as `30s`, `90m`, `24h` or `7d`: at least 10 s, at most 365 days (a
/// leaf must not outlive the gateway CA, valid 10 years; and one past the time types' range would
/// stop every leaf being minted).
fn parse_lifetime(s: &str) -> Result<std::time::Duration, String> {
    let secs = parse_seconds(s)?;
    if secs < 10 {
        return Err(format!("`{s}`: at least 10s"));
    }
    if secs > 365 * 86400 {
        return Err(format!("`{s}`: at most 365d"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// The seconds in a duration such as `30s`, `90m`, `24h` or `7d`.
fn parse_seconds(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}`: expected a number and a unit, s, m, h or d (e.g. 30s, 24h, 7d)");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let n: u64 = s[..split].parse().map_err(|_| bad())?;
    let unit = match &s[split..] {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    n.checked_mul(unit).ok_or_else(bad)
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

/// Libraries whose output can carry credentials, each capped at a level below what carries them
/// unless RUST_LOG names the target (or a parent of it) explicitly:
/// - aws-sigv4 logs canonical requests, session token included; h2/hyper log header frames (debug
///   and trace: capped at `info`).
/// - gcp_auth logs a failed token request's answer body at WARN (an endpoint that echoes the form
///   would log the signed assertion): capped at `error`; keyswap logs the failure itself.
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
    ("gcp_auth", "error"),
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
        Command::Serve(args) => serve::serve(args),
        Command::Check(args) => check::check(args),
        Command::Explain(args) => explain::explain(args),
        Command::Certs(args) => certs::certs_cmd(args),
        Command::EnvoyConfig(args) => envoy_config::envoy_config(args),
        Command::Dev(args) => dev::dev(args),
        Command::Token(TokenCommand::Create(args)) => token::token_create(args),
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

#[cfg(test)]
mod tests {
    #[test]
    fn lifetimes_parse() {
        use std::time::Duration;
        assert_eq!(super::parse_lifetime("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(super::parse_lifetime("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(super::parse_lifetime("7d"), Ok(Duration::from_secs(7 * 86400)));
        for bad in ["", "30", "h", "5s", "1.5h", "-1h", "366d", "9999999d", "99999999999999999999d"] {
            assert!(super::parse_lifetime(bad).is_err(), "{bad}");
        }
    }

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
        // gcp_auth's failed-token WARN carries the endpoint's answer (which may echo the assertion).
        assert!(super::log_filter(None).contains(",gcp_auth=error"), "{f}");
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
