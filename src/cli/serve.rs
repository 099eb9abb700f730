//! `serve`: the ext_proc server Envoy calls, and the ADS server Envoy takes its listeners, routes,
//! clusters and leaf certificate from; configured from a directory of manifests or from the
//! Kubernetes API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Args;

use super::envoy_config::ResourceArgs;
use super::{parse_lifetime, parse_mode, runtime, SourceArgs, DEFAULT_UDS, DEFAULT_WORKER_THREADS};
use crate::certs::CaCell;
use crate::config::file::{self, FileSource};
use crate::config::{log_changes, GatewaySelector, Snapshot};
use crate::envoy::control::ControlPlane;
use crate::extproc::server::{self, Bound};
use crate::extproc::Shared;
use crate::telemetry::Metrics;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Also (or only) serve ext_proc on this TCP address. Anyone who can open a stream to it
    /// and send request headers for a routed host gets the real key back in the answer: bind it
    /// to loopback at most, and prefer the Unix socket. Without --uds, TCP replaces the socket.
    /// Envoy's ADS (which carries the leaf's private key) is served on the Unix socket only.
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
    #[command(flatten)]
    pub control: ControlArgs,
    /// Admin HTTP address: /metrics (Prometheus), /healthz, /readyz. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    pub metrics: SocketAddr,
    /// Finished spans that may wait for the OTLP exporter; beyond this they are dropped (and
    /// counted in keyswap_spans_dropped_total) so a slow collector never slows a request.
    /// Default: OTEL_BSP_MAX_QUEUE_SIZE, else 4096. The queue also holds at most 64 MiB of spans.
    #[arg(long, value_name = "N")]
    pub span_queue: Option<usize>,
    /// Threads answering Envoy (tokio workers). One thread costs the least CPU per request (see
    /// docs/benchmarks.md) and answers tens of thousands of ext_proc messages per second; raise it
    /// for an Envoy with many busy workers.
    #[arg(long, value_name = "N", env = "KEYSWAP_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=256), default_value_t = DEFAULT_WORKER_THREADS)]
    pub worker_threads: u16,
    /// Read EgressGateways, AIProviderRoutes, CredentialInjectionPolicies, TokenBudgets and the
    /// Secrets they reference from the Kubernetes API (in-cluster config, or KUBECONFIG) instead of --config.
    #[arg(long, conflicts_with = "secret_from_env")]
    pub kubernetes: bool,
    /// With --kubernetes: the namespace to watch. Default: all namespaces the RBAC allows (then
    /// --gateway is required: anyone may create an EgressGateway in a namespace of their own).
    #[arg(long, value_name = "NS", requires = "kubernetes")]
    pub namespace: Option<String>,
    /// With --kubernetes: write `Accepted` and `ResolvedRefs` conditions to the status of routes
    /// and policies (needs `patch` on their `/status` subresources).
    #[arg(long, requires = "kubernetes")]
    pub write_status: bool,
}

/// Which CONNECT destinations the tunnel guard lets through besides public addresses.
#[derive(Debug, Args)]
pub struct TunnelArgs {
    /// Let tunnels reach this non-public network, e.g. for an internal service on the allow
    /// list. HOST=CIDR (or *.domain=CIDR) opens it only to tunnels whose CONNECT names that host
    /// (or a name under that domain); a bare CIDR opens it to every tunnel the gateway admits (on
    /// an allow-all gateway any name resolving into it, on any port). Open the narrowest range
    /// (a /32). Repeatable. Loopback and link-local ranges also open the gateway's own admin
    /// ports and cloud metadata to agents: never list them in production.
    #[arg(long = "allow-private-destination", value_name = "[HOST=]CIDR")]
    pub allow_private: Vec<crate::extproc::tunnel::PrivateRange>,
    /// Refuse tunnels to this network (CIDR) although it is public: the cluster's own addresses
    /// that are, such as nodes' external IPs or a public IPv6 pod or service range (the guard
    /// knows only what is private everywhere). Repeatable; wins over
    /// --allow-private-destination. Refused CONNECTs get 403 `denied_destination`.
    #[arg(long = "deny-destination", value_name = "CIDR")]
    pub deny: Vec<crate::auth::Cidr>,
    /// The cluster's NAT64 prefix, when it is not the well-known 64:ff9b::/96 (RFC 6052: an IPv6
    /// network of length 32, 40, 48, 56, 64 or 96). A CONNECT to an address in it reaches the
    /// IPv4 address it embeds, and is judged as that address; without this, a prefix of the
    /// cluster's own in public IPv6 space lets tunnels reach private IPv4 services through the
    /// translator. Repeatable.
    #[arg(long = "nat64-prefix", value_name = "PREFIX")]
    pub nat64: Vec<crate::extproc::tunnel::Nat64Prefix>,
}

/// keyswap as its Envoy's control plane: ADS on the ext_proc sockets, and the leaf certificate.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// Directory holding the gateway CA, `ca.crt` and `ca.key` (as `keyswap certs` writes them).
    /// keyswap mints the leaf Envoy presents from it, in memory, and re-reads the files when they
    /// change. Default: certs/<gateway name>, relative to the current directory, not to
    /// --config (with --kubernetes: none; see --ca-secret). Given, /readyz answers 503 until a CA
    /// is there; defaulted, /readyz only says it is missing.
    #[arg(long, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// With --kubernetes: the gateway CA from this Secret of type kubernetes.io/tls (`tls.crt`,
    /// `tls.key`, as cert-manager writes them), NAMESPACE/NAME or NAME in --namespace. Followed as
    /// it rotates; a new CA re-mints the leaf at once.
    #[arg(long, value_name = "[NAMESPACE/]NAME", requires = "kubernetes", conflicts_with = "ca_dir")]
    pub ca_secret: Option<String>,
    /// How long each leaf certificate is valid; a new one is minted after two thirds of it, and
    /// at once when the routed hosts or the CA change. E.g. 30s, 90m, 24h, 7d (10s to 365d).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_lifetime)]
    pub leaf_lifetime: std::time::Duration,
    #[command(flatten)]
    pub resources: ResourceArgs,
}

impl ControlArgs {
    /// The control plane for `gateway`, with its CA from a directory (watched) when one is given
    /// or defaulted. The Kubernetes CA Secret is wired by the caller.
    fn setup(&self, gateway: Option<&crate::config::Key>) -> ControlPlane {
        let ca: CaCell = Arc::default();
        let dir = self.ca_dir.clone().or_else(|| gateway.map(super::certs::default_certs_dir));
        if let Some(dir) = dir {
            crate::certs::watch_dir(dir, ca.clone());
        }
        ControlPlane {
            ads: crate::envoy::ads::Ads::default(),
            options: self.resources.options(crate::envoy::Delivery::Ads),
            ca,
            leaf_lifetime: self.leaf_lifetime,
        }
    }
}

impl TunnelArgs {
    pub(super) fn guard(&self) -> crate::extproc::tunnel::TunnelGuard {
        if !self.allow_private.is_empty() || !self.deny.is_empty() || !self.nat64.is_empty() {
            fn list<T: ToString>(l: &[T]) -> String {
                l.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            }
            tracing::info!(
                opened = %list(&self.allow_private), closed = %list(&self.deny), nat64 = %list(&self.nat64),
                "tunnel destinations: non-public ranges opened (--allow-private-destination), ranges closed (--deny-destination), NAT64 prefixes judged by their IPv4 address (--nat64-prefix)"
            );
        }
        crate::extproc::tunnel::TunnelGuard {
            allow_private: self.allow_private.clone(),
            deny: self.deny.clone(),
            nat64: self.nat64.clone(),
        }
    }
}

pub(super) fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.kubernetes {
        if args.source.config.is_some() {
            anyhow::bail!("--kubernetes and --config (or KEYSWAP_CONFIG) are exclusive: choose one source");
        }
        // Watching every namespace, "the only gateway" is whatever anyone may create: one
        // EgressGateway in a team's namespace and every reload fails (rotations, revocations).
        if args.namespace.is_none() && args.source.gateway.is_none() {
            anyhow::bail!(
                "--kubernetes without --namespace watches every namespace: name the gateway to serve with \
                 --gateway NAMESPACE/NAME (an EgressGateway anyone creates elsewhere must not change which one)"
            );
        }
        return serve_kubernetes(args);
    }
    let source = Arc::new(args.source.source()?);
    let selector = args.source.selector()?;
    // Watching from before the first load: a change while keyswap starts is not missed.
    let events = file::Events::start(&source.dir);
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
        let control = Some(args.control.setup(Some(&snapshot.gateway)));
        let ca_required = args.control.ca_dir.is_some();
        let serving =
            Serving { listeners, span_queue: args.span_queue, tunnel: args.tunnel.guard(), control, ca_required };
        run_extproc((source, events), snapshot, serving, args.metrics, shutdown_signal()).await
    })?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn bind_listeners(args: &ServeArgs) -> anyhow::Result<Vec<Bound>> {
    // The socket file last: once it appears at its path, every listener is bound (a caller that
    // waits for it, a test or a startup script, then finds the TCP port listening too).
    let mut listeners = Vec::new();
    if let Some(addr) = args.listen {
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "ext_proc on a non-loopback TCP address: whoever reaches it can obtain real keys");
        }
        listeners.push(Bound::tcp(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?);
    }
    if let Some(path) = &args.uds {
        if args.uds_mode & 0o007 != 0 {
            tracing::warn!(mode = format!("{:o}", args.uds_mode), path = %path.display(),
                "the ext_proc socket is open to every local user: whoever connects can obtain real keys and, over ADS, the leaf's private key");
        }
        let bound = Bound::uds(path, args.uds_mode).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (choose a path you can write with --uds, and point Envoy at the same path: `keyswap envoy-config --uds PATH`)"
            } else {
                ""
            };
            anyhow::anyhow!("cannot listen on {}: {e}{hint}", path.display())
        })?;
        listeners.push(bound);
    } else {
        tracing::warn!(
            "no --uds: Envoy's ADS (listeners, routes, the leaf) is served only on the Unix socket, so an Envoy \
             on `keyswap envoy-config`'s bootstrap gets none; ext_proc alone is on TCP"
        );
    }
    Ok(listeners)
}

fn serve_kubernetes(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let selector = args.source.selector()?;
    let rt = runtime(Some(args.worker_threads))?;
    rt.block_on(async move {
        // The sockets first: /readyz must never say ready before Envoy can connect (a connection
        // made before the first sync waits in the backlog until the server runs).
        let listeners = bind_listeners(&args).await?;
        let metrics = Arc::new(Metrics::default());
        let status = Arc::new(crate::config::kube::KubeStatus::default());
        let kube_status = status.clone();
        let (s1, s2) = (status.clone(), status.clone());
        let control = args.control.setup(None);
        // With a CA to follow, ready means a CA is loaded too: a pod without one would serve
        // routed hosts no certificate, and a rollout would replace working pods with it.
        let awaited_ca =
            (args.control.ca_secret.is_some() || args.control.ca_dir.is_some()).then(|| control.ca.clone());
        let ready: crate::telemetry::admin::ReadyFn = Arc::new(move || {
            let synced = s1.synced.load(std::sync::atomic::Ordering::Relaxed);
            match &awaited_ca {
                Some(ca) if ca.load().is_none() => (
                    false,
                    format!("waiting for the gateway CA (--ca-secret or --ca-dir; see the log); {}", s1.detail()),
                ),
                _ => (synced, s1.detail()),
            }
        });
        let m = metrics.clone();
        let render = Arc::new(move |p: &mut dyn crate::prom::Families| {
            m.config_rejected
                .store(s2.rejected.load(std::sync::atomic::Ordering::Relaxed), std::sync::atomic::Ordering::Relaxed);
            s2.render(p)
        });
        let report = Report { ready: ready.clone(), extra: render.clone() };
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
            crate::config::kube::start(client.clone(), args.namespace.clone(), selector, status, args.write_status)
                .await?;
        match &args.control.ca_secret {
            Some(name) => {
                let key = ca_secret_key(name, args.namespace.as_deref())?;
                crate::config::kube::watch_ca_secret(client, key, control.ca.clone(), kube_status.clone());
            }
            None if args.control.ca_dir.is_none() => tracing::warn!(
                "no --ca-secret or --ca-dir: Envoy gets no leaf certificate over ADS, and routed hosts fail TLS"
            ),
            None => {}
        }
        let serving = Serving {
            listeners,
            span_queue: args.span_queue,
            tunnel: args.tunnel.guard(),
            control: Some(control),
            ca_required: false,
        };
        let result = serve_store(store, metrics, serving, report, shutdown_signal()).await;
        admin.abort();
        result
    })?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// How the ext_proc server runs: its sockets, the span queue, the tunnel guard, and the control
/// plane serving ADS on the same sockets.
pub(super) struct Serving {
    pub(super) listeners: Vec<Bound>,
    /// `--span-queue`, if given (over `OTEL_BSP_MAX_QUEUE_SIZE`).
    pub(super) span_queue: Option<usize>,
    pub(super) tunnel: crate::extproc::tunnel::TunnelGuard,
    pub(super) control: Option<ControlPlane>,
    /// `/readyz` waits for the control plane's CA (one named with --ca-dir, or made by `dev`).
    pub(super) ca_required: bool,
}

/// What `/metrics` and `/readyz` report beside the registry, for the OTLP metrics push to report
/// the same: readiness, and the configuration source's own families (the Kubernetes watches).
pub(super) struct Report {
    pub(super) ready: crate::telemetry::admin::ReadyFn,
    pub(super) extra: crate::telemetry::admin::ExtraMetrics,
}

/// `--ca-secret [NAMESPACE/]NAME`: the namespace defaults to --namespace.
fn ca_secret_key(name: &str, namespace: Option<&str>) -> anyhow::Result<crate::config::Key> {
    let key = crate::config::Key::parse(name)
        .ok_or_else(|| anyhow::anyhow!("--ca-secret `{name}`: expected NAMESPACE/NAME, or NAME in --namespace"))?;
    match namespace {
        Some(ns) if !name.contains('/') => Ok(crate::config::Key::new(ns, key.name)),
        _ => Ok(key),
    }
}

/// Serves `snapshot` and keeps it current from `source` until `shutdown`.
pub(super) async fn run_extproc(
    (source, events): (Arc<FileSource>, Result<file::Events, String>),
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
    let at_start = load_text(Ok(()), source.refused().len(), store.load().rejected.len());
    let last_reload: Arc<std::sync::Mutex<String>> = Arc::new(std::sync::Mutex::new(at_start));
    let lr = last_reload.clone();
    let src = source.clone();
    let (st, m) = (store.clone(), metrics.clone());
    let _watch = events
        .and_then(|e| {
            e.watch(source.clone(), selector, store.clone(), move |res| {
                let left_out = st.load().rejected.len();
                m.config_rejected.store(left_out as u64, std::sync::atomic::Ordering::Relaxed);
                let text = load_text(res.as_ref().map(|_| ()).map_err(|e| e.0.len()), src.refused().len(), left_out);
                *lr.lock().unwrap_or_else(|e| e.into_inner()) = text;
            })
        })
        .map_err(anyhow::Error::msg)?;
    tracing::info!(dir = %source.dir.display(), "watching configuration directory");
    // Without a CA, an Envoy on ADS gets no TLS listener (routed hosts fail their handshakes):
    // said in /readyz, and not ready where the CA was asked for (--ca-dir, or `dev`'s own). The
    // default directory, relative to the working directory, is often absent on purpose (an Envoy
    // on a static bootstrap, or ext_proc over TCP only).
    let (awaited_ca, required) = (serving.control.as_ref().map(|c| c.ca.clone()), serving.ca_required);
    let ready: crate::telemetry::admin::ReadyFn = Arc::new(move || {
        let last = last_reload.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match &awaited_ca {
            Some(ca) if ca.load().is_none() => (
                !required,
                format!(
                    "gateway {gateway} loaded, but no gateway CA: an Envoy on ADS gets no TLS listener (--ca-dir; \
                     see the log); last reload: {last}"
                ),
            ),
            _ => (true, format!("gateway {gateway} loaded; last reload: {last}")),
        }
    });
    let report = Report { ready: ready.clone(), extra: Arc::new(|_: &mut dyn crate::prom::Families| {}) };
    let admin = crate::telemetry::admin::spawn(metrics_addr, metrics.clone(), ready, report.extra.clone()).await?;
    let result = serve_store(store, metrics, serving, report, shutdown).await;
    admin.abort();
    result
}

/// What `/readyz` says of the last load (the start, then each reload): `errors` when the whole
/// directory was refused, else the files set aside and the invalid objects left out.
fn load_text(errors: Result<(), usize>, files_set_aside: usize, left_out: usize) -> String {
    match (errors, files_set_aside, left_out) {
        (Ok(()), 0, 0) => "ok".to_owned(),
        (Ok(()), 0, n) => format!("ok; {n} invalid object(s) left out (see the log or `keyswap check`)"),
        (Ok(()), f, n) => format!("ok; {f} file(s) over the manifest limits set aside, {n} problem(s) left out"),
        (Err(n), _, _) => format!("rejected ({n} error(s); last good configuration serving)"),
    }
}

/// The ext_proc server over `store`, with the OTLP exporter the gateway (or environment) names.
async fn serve_store(
    store: crate::config::SnapshotStore,
    metrics: Arc<Metrics>,
    serving: Serving,
    report: Report,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let Serving { listeners, span_queue, tunnel, control, .. } = serving;
    let otlp = store.load().otlp.clone();
    let sampler = crate::telemetry::sample::Sampler::from_env(|k| std::env::var(k).ok()).map_err(anyhow::Error::msg)?;
    let (tx, spans_flush) = match crate::telemetry::export::settings(otlp.as_ref(), |k| std::env::var(k).ok())
        .map_err(anyhow::Error::msg)?
    {
        Some(settings) => {
            let env = |k: &str| std::env::var(k).ok();
            let batching = crate::telemetry::export::Batching::from_env(span_queue, env).map_err(anyhow::Error::msg)?;
            let (queue, flush) =
                crate::telemetry::export::spawn(&settings, metrics.clone(), batching).map_err(anyhow::Error::msg)?;
            tracing::info!(exporter = %settings, sampler = ?sampler, ?batching, "tracing on: one span per sampled transaction");
            (Some(queue), Some((flush, settings.timeout * 2)))
        }
        None if crate::telemetry::export::sdk_disabled(|k| std::env::var(k).ok()) => {
            tracing::info!("tracing off (OTEL_SDK_DISABLED=true)");
            (None, None)
        }
        None => {
            tracing::info!("tracing off (set OTEL_EXPORTER_OTLP_ENDPOINT or EgressGateway spec.otlp.endpoint)");
            (None, None)
        }
    };
    let sink = crate::telemetry::Sink::new(metrics.clone(), tx).with_sampler(sampler);
    let metrics_push = metrics_push(otlp.as_ref(), &metrics, report)?;
    let control = control.map(|mut c| {
        c.ads.stats = metrics.xds.clone();
        c
    });
    let ads = control.as_ref().map(|c| c.ads.clone());
    let plane = control.map(|c| tokio::spawn(c.run(store.clone())));
    let budgets = Arc::new(crate::budget::Engine::new(metrics.budgets.clone()));
    let shared = Arc::new(Shared {
        store,
        metrics,
        sink,
        tunnel,
        budgets: budgets.clone(),
        handoffs: Default::default(),
        streams: Default::default(),
    });
    let result = server::run(shared, listeners, ads, shutdown).await;
    if let Some(p) = plane {
        p.abort();
    }
    // The spans of the streams just drained, and the metrics' final totals, before the process
    // ends: each bounded by twice its exporter's timeout (an export already under way, then the
    // last one).
    // Beside them, the budget settlements still on their way to Redis.
    let flushes = [("spans", spans_flush), ("metrics", metrics_push)];
    let flushed = futures_util::future::join_all(flushes.into_iter().filter_map(|(what, f)| {
        let (flush, within) = f?;
        Some(async move {
            match flush.finish(within).await {
                true => tracing::info!("OTLP {what} flushed"),
                false => tracing::warn!(timeout = ?within, "the OTLP collector did not take the last {what} in time; they are lost"),
            }
        })
    }));
    let settled = async {
        if !budgets.settled().await {
            tracing::warn!("budget settlements did not reach Redis before exit; those reservations stay counted until their windows end");
        }
    };
    tokio::join!(flushed, settled);
    result
}

pub(super) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// `OTEL_METRICS_EXPORTER=otlp`: the registry pushed to the OTLP endpoint (the spans' endpoint
/// and settings unless `OTEL_EXPORTER_OTLP_METRICS_*` say otherwise) every
/// `OTEL_METRIC_EXPORT_INTERVAL`.
fn metrics_push(
    otlp: Option<&crate::api::Otlp>,
    metrics: &Arc<Metrics>,
    report: Report,
) -> anyhow::Result<Option<(crate::telemetry::export::Flush, Duration)>> {
    use crate::telemetry::{export, otlp_metrics};
    let env = |k: &str| std::env::var(k).ok();
    let Some(interval) = otlp_metrics::push_interval(env).map_err(anyhow::Error::msg)? else { return Ok(None) };
    let Some(settings) = export::settings_for(export::Signal::Metrics, otlp, env).map_err(anyhow::Error::msg)? else {
        anyhow::bail!(
            "OTEL_METRICS_EXPORTER=otlp needs an endpoint: OTEL_EXPORTER_OTLP_ENDPOINT, \
             OTEL_EXPORTER_OTLP_METRICS_ENDPOINT or the gateway's spec.otlp.endpoint"
        );
    };
    let exporter = export::Exporter::new(&settings).map_err(anyhow::Error::msg)?;
    tracing::info!(exporter = %settings, ?interval, "metrics pushed over OTLP");
    let Report { ready, extra } = report;
    let within = settings.timeout * 2;
    Ok(Some((otlp_metrics::spawn(exporter, metrics.clone(), interval, settings, ready, extra), within)))
}
