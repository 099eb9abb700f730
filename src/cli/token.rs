//! `token create`: per-agent tokens for `EgressGateway.spec.agentAuth`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::parse_seconds;

/// The longest `--expires` (ten years): longer is a typo, and past the time types' range.
const MAX_EXPIRES_DAYS: u64 = 3650;
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
    /// Lifetime, e.g. `90d`, `12h`, `30m` (at most 3650d). Default: no expiry.
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

pub(super) fn token_create(args: TokenCreateArgs) -> anyhow::Result<ExitCode> {
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
            let secs = parse_seconds(d.trim()).map_err(|e| anyhow::anyhow!("--expires {e}"))?;
            anyhow::ensure!(
                (1..=MAX_EXPIRES_DAYS * 86400).contains(&secs),
                "--expires `{d}`: from 1s to {MAX_EXPIRES_DAYS}d"
            );
            let at = k8s_openapi::jiff::Timestamp::now()
                .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs as i64))
                .map_err(|e| anyhow::anyhow!("--expires `{d}`: {e}"))?;
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
