//! `check`: validates the configuration and prints what each gateway compiles to.

use std::process::ExitCode;

use super::SourceArgs;
use crate::budget::KeyBy;
use crate::config::snapshot::MatchEntry;
use crate::config::{Catalog, ConfigErrors, GatewaySelector, Key, Snapshot};

pub(super) fn print_errors(errors: &ConfigErrors) -> ExitCode {
    eprintln!("keyswap: {errors}");
    ExitCode::FAILURE
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Exit 4 when the configuration compiles but draws a warning (what likely does not do what
    /// its author meant: a Vertex AI route any project can be named through, a JWKS file with no
    /// usable key, a validator whose callers name any tenant, …): for CI.
    #[arg(long)]
    pub strict: bool,
}

pub(super) fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let CheckArgs { source: args, strict } = args;
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
    let (mut unresolved, mut warnings) = (0, 0);
    let mut store_unusable = 0;
    let mut failed = false;
    for gw in &gateways {
        match catalog.compile(gw) {
            Ok(snap) => {
                warnings += print_warnings(&snap);
                unresolved += print_snapshot(&catalog, &snap);
                store_unusable += usize::from(matches!(snap.budget_store, Some(Err(_))));
            }
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
    }
    if store_unusable > 0 {
        eprintln!("keyswap: a gateway's budgetStore is unusable; its budgeted requests follow onStoreUnavailable");
    }
    if unresolved > 0 || store_unusable > 0 {
        return Ok(ExitCode::from(3));
    }
    if strict && warnings > 0 {
        eprintln!("keyswap: {warnings} warning(s), and --strict");
        return Ok(ExitCode::from(4));
    }
    println!("OK");
    Ok(ExitCode::SUCCESS)
}

/// Prints one gateway; returns how many entries are unresolved.
fn print_snapshot(catalog: &Catalog, snap: &Snapshot) -> usize {
    let allow = if snap.allow.is_empty() {
        "none".to_owned()
    } else {
        snap.allow.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    };
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
        if !e.budgets.is_empty() {
            let names: Vec<&str> = e.budgets.iter().map(|b| &*b.name).collect();
            println!("    budgets: {}", names.join(", "));
        }
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
    if !snap.budgets.is_empty() || snap.budget_store.is_some() {
        println!("  token budgets ({}):", super::explain::describe_store(snap));
        for b in &snap.budgets {
            println!("    {}", b.describe());
        }
    }
    for s in &snap.secrets {
        let fp = s.fingerprint.as_deref().unwrap_or("MISSING");
        println!("  secret {} key {}: <redacted> {fp}", s.secret, s.key);
    }
    let _ = catalog;
    unresolved
}

/// What compiles but likely does not do what its author meant, on stderr (stdout is what the
/// configuration compiles to); returns how many.
fn print_warnings(snap: &Snapshot) -> usize {
    let mut n = 0;
    let mut warn = |text: String| {
        n += 1;
        eprintln!("keyswap: warning: gateway {}: {text}", snap.gateway);
    };
    for e in snap.routes.entries.iter().filter(|e| e.provider.name == "google" && e.endpoints.is_empty()) {
        for h in e.hosts.iter().filter(|h| h.ends_with("aiplatform.googleapis.com")) {
            warn(format!(
                "route {} host {h} (Vertex AI) has no `endpoints` glob naming your project: agents can run and \
                 bill calls in any project its service account may use (docs/providers.md)",
                e.route
            ));
        }
    }
    if let Some(chain) = &snap.agent_auth {
        for (name, source) in chain.keyless_jwks_files() {
            warn(format!("validator {name}: the JWKS file {source} holds no RS256 or ES256 key: it admits no one"));
        }
    }
    for a in snap.allow_entries_of_routed_hosts() {
        warn(format!(
            "allow entry {a} names a routed host: a CONNECT to it is terminated and routed whatever its port, so the entry changes nothing"
        ));
    }
    for (route, host) in snap.foreign_host_patterns() {
        warn(format!("route {route} host {host}: {}", crate::config::FOREIGN_PATTERN));
    }
    if let Some(chain) = snap.agent_auth.as_ref().filter(|c| c.validators.len() > 1) {
        for name in chain.unscoped_tenant_namers() {
            warn(format!(
                "validator {name} takes its callers' tenant from their token or headers and has no \
                 `tenants`: they can name any tenant, another validator's agents' too (their keys and budgets)"
            ));
        }
    }
    let per_caller = |b: &crate::budget::Budget| !matches!(b.key, KeyBy::Route | KeyBy::Gateway);
    let optional = snap.agent_auth.as_ref().is_some_and(|c| c.optional);
    if optional && snap.routes.entries.iter().flat_map(|e| e.budgets.iter()).any(|b| per_caller(b)) {
        warn(
            "agentAuth is optional and budgets are kept per tenant, agent or label: a caller that leaves \
             its token out is counted in the one shared key `-` instead of its own"
                .into(),
        );
    }
    n
}

pub(super) fn describe_match(e: &MatchEntry) -> String {
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
