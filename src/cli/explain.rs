//! `explain`: what keyswap would do with one request.

use std::ops::ControlFlow;
use std::process::ExitCode;

use clap::Args;

use super::check::{describe_match, print_errors};
use super::SourceArgs;
use crate::config::{Decision, Snapshot};

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
    /// The value of a method-override header the request carries (`X-HTTP-Method-Override`,
    /// `X-HTTP-Method` or `X-Method-Override`; repeatable). keyswap judges the request by every
    /// method it may stand for, as it does on the wire: `--method POST --method-override TRACE`
    /// is refused like TRACE.
    #[arg(long, value_name = "METHOD")]
    pub method_override: Vec<String>,
    /// An agent token (gateways with `spec.agentAuth`): shows which validator admits it and which
    /// tenant's key would be used. Prefer the environment variable to keep it out of shell history.
    #[arg(long, env = "KEYSWAP_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

pub(super) fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let source = args.source.source()?;
    let snap = match source.snapshot(&args.source.selector()?) {
        Ok(s) => s,
        Err(errors) => return Ok(print_errors(&errors)),
    };
    let path_only = args.path.split_once('?').map_or(args.path.as_str(), |(p, _)| p);
    println!("request: {} https://{}{path_only}", args.method, args.host);
    for m in &args.method_override {
        println!("  with a method-override header: {m:?}");
    }
    println!("gateway: {} (defaultPolicy: {})", snap.gateway, snap.default_policy.as_str());
    let mut identity = None;
    if let Some(chain) = &snap.agent_auth {
        match admit_agent(chain, args.token.as_deref())? {
            ControlFlow::Continue(admitted) => identity = admitted,
            ControlFlow::Break(()) => return Ok(ExitCode::SUCCESS),
        }
    }
    let tenant = identity.as_ref().and_then(|i: &crate::auth::Identity| i.tenant.as_deref().map(str::to_owned));
    let overrides = args.method_override.iter().map(|m| m.as_bytes());
    let decision = match crate::target::check_methods(&args.method, overrides) {
        Err(r) => Decision::Refused(r),
        Ok(_) => snap.decide(&args.host, &args.path, tenant.as_deref()),
    };
    print_decision(&args, &snap, path_only, tenant.as_deref(), &decision);
    if let Decision::Inject { entry, .. } = decision {
        print_budgets(&snap, entry, identity.as_ref());
        print_phases(&snap, &args.host);
    }
    Ok(ExitCode::SUCCESS)
}

/// The budgets an injected request is admitted against, and the counter it would use in each.
fn print_budgets(
    snap: &Snapshot,
    entry: &crate::config::snapshot::MatchEntry,
    identity: Option<&crate::auth::Identity>,
) {
    if entry.budgets.is_empty() {
        return;
    }
    println!("  token budgets (reserved before forwarding; {}):", describe_store(snap));
    for b in entry.budgets.iter() {
        println!("    {}; this request counts as `{}`", b.describe(), b.key.value(identity, &entry.route));
    }
}

/// Which deciding filter Envoy runs for the request's host, and what it sends keyswap.
fn print_phases(snap: &Snapshot, authority: &str) {
    let spans = crate::envoy::span_env();
    let mut buf = [0u8; 256];
    let host = crate::target::host(authority, &mut buf).unwrap_or(authority);
    let tracing = match (spans.traces(snap), spans.sampling) {
        (false, _) => "tracing off in this environment",
        (true, crate::envoy::Sampling::Every) => "tracing on, every request sampled",
        (true, crate::envoy::Sampling::Some) => "tracing on, some requests sampled: their bodies asked for per request",
        (true, crate::envoy::Sampling::None) => "tracing on, no request sampled",
    };
    match crate::envoy::fixed_phases_of(snap, spans, host) {
        None => println!(
            "  Envoy phases ({tracing}): request headers, response headers; the request body only when this request \
             needs it (filter envoy.filters.http.ext_proc)"
        ),
        Some(body) => {
            let body = match body {
                crate::envoy::RequestBody::None => "no request body",
                crate::envoy::RequestBody::Capture => "the request body up to Envoy's buffer (BUFFERED_PARTIAL)",
                crate::envoy::RequestBody::Whole => {
                    "the request body up to Envoy's buffer (BUFFERED_PARTIAL; SigV4 or a token budget here needs it \
                     whole, and such a request with a larger body is refused with 413)"
                }
            };
            println!(
                "  Envoy phases ({tracing}): fixed for this host, keyswap reads its response bodies on every request: \
                 headers, {body}, the response body streamed without waiting for keyswap's header answer (filter {}; \
                 with --observe-response-bodies the observing filter reads them instead)",
                crate::envoy::BODIES_FILTER
            );
        }
    }
}

/// Where a snapshot's budgets are counted.
pub(super) fn describe_store(snap: &Snapshot) -> String {
    match &snap.budget_store {
        None => "counted in this process".to_owned(),
        Some(Ok(t)) => format!("counted in Redis at {} (Secret {})", t.endpoint(), t.secret),
        Some(Err(e)) => format!("store UNUSABLE: {e}; each budget's onStoreUnavailable decides"),
    }
}

/// Prints how the gateway's agent auth treats `token`. Continues with the identity it admits
/// (none for an anonymous caller), or breaks once it has printed the 401 the request gets.
fn admit_agent(
    chain: &crate::auth::Chain,
    token: Option<&str>,
) -> anyhow::Result<ControlFlow<(), Option<crate::auth::Identity>>> {
    use crate::auth::{Admission, Peer};
    let token = token.map(|t| t.trim().as_bytes());
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
            Ok(ControlFlow::Continue(Some(id.clone().into_owned())))
        }
        Admission::Anonymous => {
            println!("agent auth: no token; admitted as anonymous (agentAuth.optional)");
            Ok(ControlFlow::Continue(None))
        }
        Admission::Rejected(r) => {
            println!("agent auth: {}", r.message());
            println!("decision: 401 {} (nothing is forwarded)", r.reason());
            Ok(ControlFlow::Break(()))
        }
        Admission::NeedKeys(j) => {
            println!("decision: 401 invalid_agent_token: the JWT's key is not in {}", j.source);
            Ok(ControlFlow::Break(()))
        }
    }
}

/// Prints the decision for the request (`host`, `path_only` from `args`) and what it writes.
fn print_decision(args: &ExplainArgs, snap: &Snapshot, path_only: &str, tenant: Option<&str>, decision: &Decision<'_>) {
    match decision {
        Decision::Refused(r) => {
            println!("decision: {} {}: {} (nothing is forwarded)", r.status(), r.reason(), r.message());
        }
        Decision::TenantNotMapped { entry } => {
            println!(
                "decision: 403: policy {} has no key for tenant `{}` and its fallback is Deny",
                entry.binding.policy.as_deref().unwrap_or("-"),
                tenant.unwrap_or("(anonymous)")
            );
            println!("  {}", describe_match(entry));
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
            let strip = &entry.binding.strip;
            for (name, value) in &strip.pinned {
                println!("  writes header `{name}: {value}` (spec.setHeaders; overwrites any value the agent sent)");
            }
            println!("  strips headers whenever the agent sends them: {}", strip.headers.join(", "));
            if !strip.query.is_empty() {
                println!("  strips query parameters: {}", strip.query.join(", "));
            }
            let scope: Vec<&str> = crate::vocab::SCOPE_HEADERS
                .iter()
                .filter(|h| !strip.pinned.iter().any(|(p, _)| &**p == **h))
                .copied()
                .collect();
            let headers = if scope.is_empty() { String::new() } else { format!("headers {}; ", scope.join(", ")) };
            println!("  strips the organization and project the agent names: {headers}query parameter userProject");
        }
        Decision::FailClosed { entry, reason } => {
            println!("decision: 503 (fail closed): {reason}");
            println!("  {}", describe_match(entry));
            println!("  policy {}", entry.binding.policy.as_deref().unwrap_or("(none)"));
        }
        Decision::Deny => {
            println!(
                "decision: 403: no AIProviderRoute on {} matches host `{}` path `{path_only}`, and the gateway's \
                 defaultPolicy is deny-all (add a route, or the host to spec.allow)",
                snap.gateway, args.host
            );
        }
        Decision::PassThrough { allowed_by } => {
            println!("decision: pass through untouched (no route; allowed by {allowed_by})");
        }
    }
}
