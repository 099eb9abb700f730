//! `certs`: the gateway's CA and leaf certificate, and the gateway view that `certs`,
//! `envoy-config` and `dev` build on.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::check::print_errors;
use super::SourceArgs;
use crate::config::file::FileSource;
use crate::config::{ConfigErrors, GatewaySelector, Key, Snapshot};

#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Output directory. Default: certs/<gateway name>.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The public CAs agents keep trusting: `ca-bundle.crt` is this bundle plus the gateway CA.
    /// Default: this machine's (Debian's, Fedora's and RHEL's, openSUSE's or Alpine's path).
    #[arg(long, value_name = "FILE", default_value = local_system_ca_bundle())]
    pub system_ca: PathBuf,
}

/// Everything about one gateway that certificates and Envoy need.
pub(super) struct GatewayView {
    pub(super) key: Key,
    pub(super) snapshot: Snapshot,
}

pub(super) fn gateway_view(source: &FileSource, selector: &GatewaySelector) -> Result<GatewayView, ConfigErrors> {
    let catalog = source.load()?;
    let key = selector.resolve(&catalog)?;
    let snapshot = catalog.compile(&key)?;
    Ok(GatewayView { key, snapshot })
}

pub(super) fn ensure_certs(view: &GatewayView, dir: &std::path::Path) -> anyhow::Result<crate::certs::GatewayCerts> {
    let certs = crate::certs::ensure(
        dir,
        &view.key,
        crate::envoy::route_hosts(&view.snapshot),
        time::OffsetDateTime::now_utc(),
        crate::certs::LeafPolicy::default(),
    )?;
    for h in &certs.skipped {
        tracing::warn!(host = %h, "host pattern cannot be put in a certificate (a `*` that is not the leftmost label); list explicit hosts to route it through the gateway");
    }
    crate::envoy::write_leaf_sds(&certs)?;
    Ok(certs)
}

pub(super) fn default_certs_dir(key: &Key) -> PathBuf {
    PathBuf::from("certs").join(&key.name)
}

/// The system CA bundle of this machine, for the commands that read it here or run Envoy here
/// (`certs`, `dev`): the first that exists of Debian's and Ubuntu's, Fedora's and RHEL's,
/// openSUSE's and Alpine's; Debian's when none does (and the command says so).
pub(super) fn local_system_ca_bundle() -> &'static str {
    const BUNDLES: [&str; 4] = [
        crate::envoy::SYSTEM_CA_BUNDLE,
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/ca-bundle.pem",
        "/etc/ssl/cert.pem",
    ];
    BUNDLES.into_iter().find(|p| std::path::Path::new(p).is_file()).unwrap_or(crate::envoy::SYSTEM_CA_BUNDLE)
}

/// Writes `ca-bundle.crt` beside the certificates: the public CAs (agents keep reaching tunnelled
/// hosts) plus the gateway's CA. The same file from `certs` and `dev`. Without the system bundle
/// it is an error: Envoy verifies providers against the same file, so every routed request would
/// fail, and agents would trust only the gateway.
pub(super) fn write_ca_bundle(ca_cert: &Path, system_ca: &Path) -> anyhow::Result<PathBuf> {
    let bundle = ca_cert.with_file_name("ca-bundle.crt");
    let mut pem = std::fs::read(system_ca).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the system CA bundle {}: {e}; Envoy verifies providers against it, and agents trust it \
             beside the gateway CA. Give this machine's with --system-ca",
            system_ca.display()
        )
    })?;
    if !pem.is_empty() && !pem.ends_with(b"\n") {
        pem.push(b'\n');
    }
    pem.extend_from_slice(&std::fs::read(ca_cert)?);
    std::fs::write(&bundle, pem)?;
    Ok(bundle)
}

pub(super) fn certs_cmd(args: CertsArgs) -> anyhow::Result<ExitCode> {
    let source = args.source.source()?;
    let view = match gateway_view(&source, &args.source.selector()?) {
        Ok(v) => v,
        Err(errors) => return Ok(print_errors(&errors)),
    };
    let dir = args.out.unwrap_or_else(|| default_certs_dir(&view.key));
    if crate::envoy::leaf_hosts(&view.snapshot).0.is_empty() {
        // Nothing to put in a leaf yet: the CA alone is what `serve` and `dev` need.
        let created = crate::certs::ensure_ca(&dir, &view.key, time::OffsetDateTime::now_utc())?;
        let ca_cert = dir.join("ca.crt");
        let bundle = write_ca_bundle(&ca_cert, &args.system_ca)?;
        println!("gateway {}: CA in {}", view.key, dir.display());
        println!("  CA: {}{}", ca_cert.display(), if created { " (new)" } else { "" });
        println!("  give agents: {} (the public CAs plus the gateway CA)", bundle.display());
        println!("  no leaf: no route names a host yet (keyswap serve mints leaves from the CA as routes appear)");
        return Ok(ExitCode::SUCCESS);
    }
    let certs = ensure_certs(&view, &dir)?;
    let bundle = write_ca_bundle(&certs.ca_cert, &args.system_ca)?;
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
