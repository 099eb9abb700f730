//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz`, `/readyz`. Loopback by default.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::Metrics;

/// Whether keyswap is ready, and a line saying why (for `/readyz`).
pub type ReadyFn = Arc<dyn Fn() -> (bool, String) + Send + Sync>;
/// More families on the page (a configuration source's own metrics).
pub type ExtraMetrics = Arc<dyn Fn(&mut dyn crate::prom::Families) + Send + Sync>;

/// Binds the admin address (errors name it) and serves in the background.
pub async fn spawn(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    ready: ReadyFn,
    extra: ExtraMetrics,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for /metrics: {e} (choose another with --metrics)"))?;
    tracing::info!(address = %listener.local_addr()?, "admin endpoints: /metrics /healthz /readyz");
    Ok(tokio::spawn(serve(listener, metrics, ready, extra)))
}

/// Connections one peer address may hold open at once, and all peers together. The admin port is
/// reachable by more than the kubelet (scrapers, anyone the network lets in, a local process in
/// `keyswap dev`), and every connection held costs the process Envoy's decisions depend on a file
/// descriptor and a task: an unbounded number of idle connections would starve it. Per peer, so
/// that one peer holding its share leaves the kubelet's probes theirs.
const PER_PEER: usize = 8;
const MAX_CONNECTIONS: usize = 512;
/// How long a connection may take to send its request headers; one request per connection.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long any connection may last.
const LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Open admin connections by peer address.
#[derive(Default)]
struct Open {
    by_peer: std::sync::Mutex<HashMap<IpAddr, usize>>,
}

/// One admin connection, counted until it closes.
struct Counted {
    open: Arc<Open>,
    peer: IpAddr,
}

impl Open {
    /// A place for a connection from `peer`, if it and the process are under their limits.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Counted> {
        let mut by_peer = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = by_peer.values().sum();
        let n = by_peer.entry(peer).or_default();
        if *n >= PER_PEER || total >= MAX_CONNECTIONS {
            return None;
        }
        *n += 1;
        Some(Counted { open: self.clone(), peer })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut by_peer = self.open.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                by_peer.remove(&self.peer);
            }
        }
    }
}

/// Serves until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, ready: ReadyFn, extra: ExtraMetrics) {
    let open = Arc::new(Open::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: a moment for some to close, not a spin.
                tracing::debug!(error = %e, "admin port: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(counted) = open.admit(peer.ip()) else {
            tracing::debug!(%peer, "admin port: connection over the limit closed");
            continue;
        };
        let (metrics, ready, extra) = (metrics.clone(), ready.clone(), extra.clone());
        tokio::spawn(async move {
            let _counted = counted;
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (metrics, ready, extra) = (metrics.clone(), ready.clone(), extra.clone());
                async move {
                    let (is_ready, detail) = ready();
                    let (status, ctype, body) = match req.uri().path() {
                        "/metrics" => (200, "text/plain; version=0.0.4", metrics.render_with(is_ready, |p| extra(p))),
                        "/healthz" => (200, "text/plain", "ok\n".to_owned()),
                        "/readyz" if is_ready => (200, "text/plain", format!("ready: {detail}\n")),
                        "/readyz" => (503, "text/plain", format!("not ready: {detail}\n")),
                        _ => (404, "text/plain", "not found: try /metrics, /healthz, /readyz\n".to_owned()),
                    };
                    Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .status(status)
                            .header("content-type", ctype)
                            .body(Full::new(Bytes::from(body)))
                            .expect("static response"),
                    )
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(LIFETIME, conn).await;
        });
    }
}
