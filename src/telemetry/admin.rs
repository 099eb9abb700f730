//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz`, `/readyz`. Loopback by default.

use std::convert::Infallible;
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

/// Serves until the listener fails or the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, ready: ReadyFn, extra: ExtraMetrics) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (metrics, ready, extra) = (metrics.clone(), ready.clone(), extra.clone());
        tokio::spawn(async move {
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
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
