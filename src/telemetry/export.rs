//! The OTLP exporter: the standard `OTEL_*` variables, overridden by `EgressGateway.spec.otlp`;
//! one task that batches encoded spans and sends them over OTLP/HTTP (protobuf, hyper) or
//! OTLP/gRPC (a tonic channel with a pass-through codec: keyswap's encoder makes the message
//! bytes, tonic frames, compresses and reads the status), plain or TLS.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};

use super::otlp::Envelope;

/// The most of a collector's answer an OTLP/HTTP export reads (the answer to a failed export is
/// shown in the log, cut to 200 bytes).
const ANSWER_MAX_BYTES: usize = 64 * 1024;
/// Used when `OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT` is unset.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

use super::settings::without_query;
pub use super::settings::{millis, sdk_disabled, settings, settings_for, traces_exported, Settings, Signal, Transport};

/// Why a batch did not reach the collector. [`ExportError::retryable`] says whether sending the
/// same batch again can succeed (the OTLP specification's retryable answers).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// No connection, a reset, or a broken answer: the collector may be back soon.
    #[error("{uri}: {reason}")]
    Unreachable { uri: String, reason: String },
    #[error("no answer from {uri} within {timeout:?}")]
    Timeout { uri: String, timeout: Duration },
    /// An OTLP/HTTP answer, or an HTTP status in front of OTLP/gRPC; `body` is its start.
    /// `retry_after`: the answer's `Retry-After`, in seconds.
    #[error("collector answered {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Http { status: hyper::StatusCode, body: String, retry_after: Option<Duration> },
    /// `retry_after`: the delay of the status's `google.rpc.RetryInfo`.
    #[error("collector answered grpc-status {code}: {message}")]
    Grpc { code: u32, message: String, retry_after: Option<Duration> },
    /// The request could not be built: sending it again cannot help.
    #[error("building the request: {0}")]
    Request(String),
}

impl ExportError {
    /// Retryable per the OTLP exporter specification: HTTP 429, 502, 503, 504; gRPC CANCELLED,
    /// DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS, and RESOURCE_EXHAUSTED
    /// only with a `RetryInfo` (without one the collector refuses what it was sent, a message over
    /// its size limit, say, and would refuse it again); and no answer at all.
    pub fn retryable(&self) -> bool {
        match self {
            ExportError::Unreachable { .. } | ExportError::Timeout { .. } => true,
            ExportError::Http { status, .. } => matches!(status.as_u16(), 429 | 502 | 503 | 504),
            ExportError::Grpc { code: 8, retry_after, .. } => retry_after.is_some(),
            ExportError::Grpc { code, .. } => matches!(code, 1 | 4 | 10 | 11 | 14 | 15),
            ExportError::Request(_) => false,
        }
    }

    /// How long the collector asked to be left alone, at most [`MAX_RETRY_AFTER`].
    fn retry_after(&self) -> Option<Duration> {
        match self {
            ExportError::Http { retry_after, .. } | ExportError::Grpc { retry_after, .. } => {
                retry_after.map(|d| d.min(MAX_RETRY_AFTER))
            }
            _ => None,
        }
    }
}

/// Sends batches of encoded spans to one collector.
pub struct Exporter {
    signal: Signal,
    uri: hyper::Uri,
    headers: hyper::HeaderMap,
    timeout: Duration,
    wire: Wire,
    envelope: Envelope,
    gzip: bool,
}

/// How requests travel: hyper for OTLP/HTTP, a tonic channel for OTLP/gRPC (both over the same
/// rustls connector).
enum Wire {
    Http(crate::http::HttpClient),
    Grpc(tonic::client::Grpc<tonic::transport::Channel>),
}

/// The gRPC codec for bytes already encoded (the request) and an answer keyswap does not read
/// (`Export…ServiceResponse`: partial success is not acted on).
#[derive(Clone, Copy, Default)]
struct PassThrough;

impl tonic::codec::Codec for PassThrough {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = PassThrough;
    type Decoder = PassThrough;
    fn encoder(&mut self) -> PassThrough {
        PassThrough
    }
    fn decoder(&mut self) -> PassThrough {
        PassThrough
    }
}

impl tonic::codec::Encoder for PassThrough {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for PassThrough {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf as _;
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

/// How often a batch is sent again after a retryable failure (429, 502–504, UNAVAILABLE …, no
/// answer), waiting [`RETRY_FIRST_PAUSE`] and doubling, each pause drawn between half and one and
/// a half times that (so that the replicas a collector's blip failed together do not come back
/// together), or what the collector asked for (`Retry-After`, gRPC `RetryInfo`; at most
/// [`MAX_RETRY_AFTER`]). New spans wait in the bounded queue meanwhile (full: dropped and
/// counted); a flush at shutdown ends the pause and sends no more.
pub const RETRIES: u32 = 3;
pub const RETRY_FIRST_PAUSE: Duration = Duration::from_millis(200);
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// `pause`, drawn between half and one and a half times it.
fn jittered(pause: Duration) -> Duration {
    crate::http::jittered(pause, 0.5, 1.5)
}

/// An HTTP `Retry-After` in seconds (the date form is not read).
fn retry_after_header(headers: &hyper::HeaderMap) -> Option<Duration> {
    let v = headers.get(hyper::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The delay of the `google.rpc.RetryInfo` among a gRPC status's details (its
/// `grpc-status-details-bin`, a `google.rpc.Status`).
fn grpc_retry_after(details: &[u8]) -> Option<Duration> {
    use envoy_types::pb::google::rpc::Status;
    use prost::Message as _;
    /// `google.rpc.RetryInfo`.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        retry_delay: Option<envoy_types::pb::google::protobuf::Duration>,
    }
    let status = Status::decode(details).ok()?;
    let info = status.details.iter().find(|a| a.type_url.ends_with("/google.rpc.RetryInfo"))?;
    let delay = RetryInfo::decode(&info.value[..]).ok()?.retry_delay.unwrap_or_default();
    let secs = u64::try_from(delay.seconds).unwrap_or(0);
    Some(Duration::from_secs(secs) + Duration::from_nanos(u64::try_from(delay.nanos).unwrap_or(0)))
}

impl Exporter {
    /// Builds the client; an `https` endpoint verifies the collector against the system roots.
    pub fn new(s: &Settings) -> Result<Exporter, String> {
        let uri: hyper::Uri = match s.transport {
            Transport::HttpProtobuf => s.endpoint.parse(),
            Transport::Grpc => format!("{}{}", s.endpoint, s.signal.grpc_path()).parse(),
        }
        .map_err(|e| format!("OTLP endpoint {}: {e}", without_query(&s.endpoint)))?;
        // Named as either variable may have set it (`…_TRACES_…` or `…_METRICS_…` over the general).
        let read = |p: &std::path::Path, what: &str| {
            std::fs::read(p).map_err(|e| format!("OTEL_EXPORTER_OTLP[_{}]_{what}={}: {e}", s.signal.var(), p.display()))
        };
        let tls = crate::http::Tls {
            roots: s.certificate.as_deref().map(|p| read(p, "CERTIFICATE")).transpose()?,
            identity: match (&s.client_certificate, &s.client_key) {
                (Some(c), Some(k)) => Some((read(c, "CLIENT_CERTIFICATE")?, read(k, "CLIENT_KEY")?)),
                _ => None,
            },
        };
        let wire = match s.transport {
            Transport::HttpProtobuf => Wire::Http(
                crate::http::client_with(&uri, false, &tls)
                    .map_err(|e| format!("OTLP endpoint {}: {e}", without_query(&uri.to_string())))?,
            ),
            Transport::Grpc => {
                let connector = crate::http::connector_with(&uri, true, &tls)
                    .map_err(|e| format!("OTLP endpoint {}: {e}", without_query(&uri.to_string())))?;
                let channel = tonic::transport::Endpoint::from_shared(s.endpoint.clone())
                    .map_err(|e| format!("OTLP endpoint {}: {e}", without_query(&s.endpoint)))?
                    .connect_with_connector_lazy(connector);
                let mut grpc = tonic::client::Grpc::new(channel);
                if s.gzip {
                    grpc = grpc.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                Wire::Grpc(grpc)
            }
        };
        let mut headers = hyper::HeaderMap::new();
        for (k, v) in &s.headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("OTLP header `{k}`: not a name"))?;
            let mut value = HeaderValue::from_str(v).map_err(|_| format!("OTLP header {k}: not a header value"))?;
            value.set_sensitive(true);
            headers.append(name, value);
        }
        Ok(Exporter {
            signal: s.signal,
            uri,
            headers,
            timeout: s.timeout,
            wire,
            envelope: Envelope::with_resource(&s.service_name, &s.resource),
            gzip: s.gzip,
        })
    }

    /// One `ExportTraceServiceRequest` with `spans` (each an encoded OTLP `Span`).
    pub async fn export(&self, spans: &[Vec<u8>]) -> Result<(), ExportError> {
        self.send(self.envelope.request(spans)).await
    }

    /// One encoded export request (of the exporter's signal), compressed and framed as the
    /// transport wants it, within the timeout.
    pub async fn send(&self, message: Vec<u8>) -> Result<(), ExportError> {
        let send = async {
            match &self.wire {
                Wire::Http(client) => self.send_http(client, message).await,
                Wire::Grpc(grpc) => self.send_grpc(grpc.clone(), message).await,
            }
        };
        match tokio::time::timeout(self.timeout, send).await {
            Ok(r) => r,
            Err(_) => Err(ExportError::Timeout { uri: without_query(&self.uri.to_string()), timeout: self.timeout }),
        }
    }

    async fn send_http(&self, client: &crate::http::HttpClient, mut message: Vec<u8>) -> Result<(), ExportError> {
        let mut req = hyper::Request::post(self.uri.clone());
        *req.headers_mut().unwrap() = self.headers.clone();
        req = req.header(CONTENT_TYPE, "application/x-protobuf");
        if self.gzip {
            message = gzip(&message).map_err(|e| ExportError::Request(format!("gzip: {e}")))?;
            req = req.header("content-encoding", "gzip");
        }
        let req = req.body(Full::new(Bytes::from(message))).map_err(|e| ExportError::Request(e.to_string()))?;
        let resp = client.request(req).await.map_err(|e| self.unreachable(crate::http::error_chain(&e)))?;
        let status = resp.status();
        let retry_after = retry_after_header(resp.headers());
        // The collector's answer is read up to a bound (what a reason takes), never whole: a
        // broken or hostile endpoint answering without end would hold the exporter's memory.
        let collected = http_body_util::Limited::new(resp.into_body(), ANSWER_MAX_BYTES).collect().await;
        if status.is_success() {
            return Ok(());
        }
        let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_owned();
        Err(ExportError::Http { status, body: text, retry_after })
    }

    async fn send_grpc(
        &self,
        mut grpc: tonic::client::Grpc<tonic::transport::Channel>,
        message: Vec<u8>,
    ) -> Result<(), ExportError> {
        grpc.ready().await.map_err(|e| self.unreachable(crate::http::error_chain(&e)))?;
        let mut req = tonic::Request::new(Bytes::from(message));
        for (name, value) in &self.headers {
            let key = tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes());
            let value = tonic::metadata::MetadataValue::try_from(value.as_bytes());
            if let (Ok(key), Ok(mut value)) = (key, value) {
                value.set_sensitive(true);
                req.metadata_mut().insert(key, value);
            }
        }
        let path = hyper::http::uri::PathAndQuery::from_static(self.signal.grpc_path());
        match grpc.unary(req, path, PassThrough).await {
            Ok(_) => Ok(()),
            Err(status) => Err(ExportError::Grpc {
                code: status.code() as u32,
                message: status.message().to_owned(),
                retry_after: grpc_retry_after(status.details()),
            }),
        }
    }

    fn unreachable(&self, reason: String) -> ExportError {
        ExportError::Unreachable { uri: without_query(&self.uri.to_string()), reason }
    }
}

/// Sends `batch`, again after retryable failures ([`RETRIES`]), unless `stopping` says a flush
/// at shutdown is waiting: then the pause ends and the batch is not sent again.
pub(super) async fn export_with_retries(
    exporter: &Exporter,
    batch: &[Vec<u8>],
    stopping: &tokio::sync::watch::Receiver<bool>,
) -> Result<(), ExportError> {
    let mut pause = RETRY_FIRST_PAUSE;
    let mut attempt = 0;
    loop {
        match exporter.export(batch).await {
            Err(e) if e.retryable() && attempt < RETRIES && !*stopping.borrow() => {
                attempt += 1;
                let wait = e.retry_after().unwrap_or_else(|| jittered(pause));
                tracing::debug!(error = %e, attempt, "OTLP export failed; sending the batch again in {wait:?}");
                let mut stop = stopping.clone();
                let stopped = async move {
                    if stop.wait_for(|s| *s).await.is_err() {
                        // No flush will come (its sender is gone): only the pause ends the wait.
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stopped => return Err(e),
                }
                pause *= 2;
            }
            other => return other,
        }
    }
}

fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 4), flate2::Compression::fast());
    e.write_all(data)?;
    e.finish()
}

pub use super::queue::{spawn, Batching, Flush, Rounds, SpanQueue};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Otlp;

    /// The default batching with a queue of `n`.
    fn queue_of(n: usize) -> Batching {
        Batching { queue: n, ..Batching::default() }
    }
    use crate::telemetry::Metrics;
    use std::sync::Arc;

    fn otlp(endpoint: &str) -> Otlp {
        Otlp {
            endpoint: Some(endpoint.into()),
            headers: [("authorization".to_string(), "Bearer collector-token".to_string())].into(),
            capture_body: None,
            read_bodies: None,
        }
    }

    #[test]
    fn tracing_is_off_without_an_endpoint_and_follows_the_standard_variables() {
        let none = |_: &str| None;
        assert_eq!(settings(None, none).unwrap(), None);
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4317/ignored".to_string()),
            "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("grpc".to_string()),
            "OTEL_SERVICE_NAME" => Some("egress".to_string()),
            "OTEL_EXPORTER_OTLP_HEADERS" => Some("x-a=1, Authorization=Bearer%20t0k".to_string()),
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS" => Some("x-a=2".to_string()),
            "OTEL_EXPORTER_OTLP_TIMEOUT" => Some("2500".to_string()),
            _ => None,
        };
        let s = settings(None, env).unwrap().unwrap();
        assert_eq!(
            (s.transport, s.endpoint.as_str(), s.service_name.as_str()),
            (Transport::Grpc, "http://collector:4317", "egress")
        );
        assert_eq!(s.headers, [("authorization".to_string(), "Bearer t0k".to_string()), ("x-a".into(), "2".into())]);
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert!(!format!("{s} {s:?}").contains("t0k"), "{s}");

        let s = settings(Some(&otlp("http://otel:4318/")), none).unwrap().unwrap();
        assert_eq!((s.transport, s.endpoint.as_str()), (Transport::HttpProtobuf, "http://otel:4318/v1/traces"));
        assert!(!s.to_string().contains("collector-token"), "{s}");
        let traces = |k: &str| (k == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").then(|| "https://c/custom".to_string());
        assert_eq!(settings(None, traces).unwrap().unwrap().endpoint, "https://c/custom", "used as is");

        // Enumerated values are read as the specification says: case ignored.
        let upper = |k: &str| (k == "OTEL_EXPORTER_OTLP_PROTOCOL").then(|| "GRPC".to_string());
        assert_eq!(settings(Some(&otlp("http://otel:4317")), upper).unwrap().unwrap().transport, Transport::Grpc);
        // A file that cannot be read is named by the variables that may have set it.
        let missing = |k: &str| (k == "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE").then(|| "/no/such/ca.pem".to_string());
        let m = settings_for(Signal::Metrics, Some(&otlp("https://otel:4318")), missing).unwrap().unwrap();
        let e = Exporter::new(&m).err().unwrap();
        assert!(e.contains("OTEL_EXPORTER_OTLP[_METRICS]_CERTIFICATE=/no/such/ca.pem"), "{e}");
        let bad = |k: &str| (k == "OTEL_EXPORTER_OTLP_PROTOCOL").then(|| "http/json".to_string());
        assert!(settings(Some(&otlp("http://otel:4318")), bad).unwrap_err().contains("http/json"));
        let off = |k: &str| (k == "OTEL_TRACES_EXPORTER").then(|| "none".to_string());
        assert_eq!(settings(Some(&otlp("http://otel:4318")), off).unwrap(), None);
        for (v, on) in [("true", false), ("TRUE", false), (" True ", false), ("false", true), ("1", true), ("", true)] {
            let disabled = |k: &str| (k == "OTEL_SDK_DISABLED").then(|| v.to_string());
            let s = settings_for(Signal::Traces, Some(&otlp("http://otel:4318")), disabled).unwrap();
            assert_eq!(s.is_some(), on, "OTEL_SDK_DISABLED={v:?}: only true (any case) disables");
            let m = settings_for(Signal::Metrics, Some(&otlp("http://otel:4318")), disabled).unwrap();
            assert_eq!(m.is_some(), on, "metrics, OTEL_SDK_DISABLED={v:?}");
        }
        // A timeout past a day is a mistake (it would also hold a shutdown flush that long).
        let huge = |k: &str| (k == "OTEL_EXPORTER_OTLP_TIMEOUT").then(|| u64::MAX.to_string());
        assert!(settings(Some(&otlp("http://otel:4318")), huge).unwrap_err().contains("OTEL_EXPORTER_OTLP_TIMEOUT"));
        let e = settings(Some(&otlp("otel:4318")), none).unwrap_err();
        assert!(e.contains("spec.otlp.endpoint") && e.contains("http://"), "{e}");
        let secret_in_bad_list =
            |k: &str| (k == "OTEL_EXPORTER_OTLP_HEADERS").then(|| "authorization:Bearer s3cret".to_string());
        let e = settings(Some(&otlp("http://otel:4318")), secret_in_bad_list).unwrap_err();
        assert!(e.contains("OTEL_EXPORTER_OTLP_HEADERS") && !e.contains("s3cret"), "{e}");
        // A curl-style item whose credential ends in base64 padding splits at that `=`.
        let padded = |k: &str| (k == "OTEL_EXPORTER_OTLP_HEADERS").then(|| "authorization: basic s3cret==".to_string());
        let e = settings(Some(&otlp("http://otel:4318")), padded).unwrap_err();
        assert!(e.contains("authorization") && !e.contains("s3cret"), "{e}");
        // The credential pasted without its name: bare, or ending in base64 padding (which then
        // reads as a name), or beside a good item.
        for list in ["hcaik_01s3cret", "dXNlcjpzs3cret==", "dXNlcjpzs3cret=", "x-a=1,s3cret/base64+", "x-a=1, s3cret"] {
            let bare = |k: &str| (k == "OTEL_EXPORTER_OTLP_HEADERS").then(|| list.to_string());
            let e = settings(Some(&otlp("http://otel:4318")), bare).unwrap_err();
            assert!(e.contains("OTLP") && !e.contains("s3cret"), "{list}: {e}");
        }
        let e = settings(Some(&otlp("http://otel:4318")), |k: &str| {
            (k == "OTEL_EXPORTER_OTLP_HEADERS").then(|| "x-a=1, s3cret".to_string())
        })
        .unwrap_err();
        assert!(e.contains("item 2"), "the item is named by its place: {e}");
        // Credentials in the endpoint's URL: refused, never echoed.
        for url in ["https://user:s3cret@otel:4318", "http://s3cret@otel:4318/v1/traces"] {
            let e = settings(Some(&otlp(url)), none).unwrap_err();
            assert!(e.contains("spec.otlp.endpoint") && !e.contains("s3cret"), "{e}");
            let env = |k: &str| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| url.to_string());
            let e = settings(None, env).unwrap_err();
            assert!(e.contains("OTEL_EXPORTER_OTLP_ENDPOINT") && !e.contains("s3cret"), "{e}");
        }
    }

    /// A collector on a real socket that answers every request with `status` and closes.
    async fn collector(status: &'static str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0; 65536];
                let _ = s.read(&mut buf).await;
                let body = "refused: bad batch";
                let answer =
                    format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{addr}/v1/traces")
    }

    /// Each request a test collector received: its headers (as text) and body.
    type Requests = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

    /// An OTLP/HTTP collector that answers 503 to its first `failures` requests, then 200; keeps
    /// every request's headers and body.
    async fn flaky_collector(failures: usize) -> (String, Requests) {
        flaky_collector_asking(failures, None).await
    }

    /// [`flaky_collector`], its failures answered with `Retry-After: retry_after`.
    async fn flaky_collector_asking(failures: usize, retry_after: Option<&'static str>) -> (String, Requests) {
        use http_body_util::BodyExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Requests = Arc::default();
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            let headers = format!("{:?}", req.headers());
                            let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                            let n = {
                                let mut seen = s.lock().unwrap();
                                seen.push((headers, body));
                                seen.len()
                            };
                            let mut answer = hyper::Response::builder().status(if n <= failures { 503 } else { 200 });
                            if let Some(after) = retry_after.filter(|_| n <= failures) {
                                answer = answer.header("retry-after", after);
                            }
                            Ok::<_, std::convert::Infallible>(answer.body(Full::new(Bytes::new())).unwrap())
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                });
            }
        });
        (format!("http://{addr}/v1/traces"), seen)
    }

    #[tokio::test]
    async fn a_collector_answering_503_twice_then_200_loses_no_span_and_gets_them_gzipped() {
        use prost::Message as _;
        let (endpoint, seen) = flaky_collector(2).await;
        let metrics: Arc<Metrics> = Arc::default();
        let (tx, _flush) =
            spawn(&Settings { gzip: true, ..http_settings(endpoint) }, metrics.clone(), queue_of(16)).unwrap();
        let span = |i: u8| {
            let mut s = Vec::new();
            crate::telemetry::otlp::bytes(&mut s, 1, &[i; 16]);
            s
        };
        for i in 1..=3 {
            tx.send(span(i)).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while metrics.spans_exported.load(std::sync::atomic::Ordering::Relaxed) < 3 {
            assert!(std::time::Instant::now() < deadline, "the spans never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(metrics.spans_export_failed.load(std::sync::atomic::Ordering::Relaxed), 0);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3, "two 503s, then the batch again");
        for (headers, body) in seen.iter() {
            assert!(headers.contains(r#""content-encoding": "gzip""#), "{headers}");
            let mut plain = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut plain).unwrap();
            let req = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(&plain[..])
                .unwrap();
            assert_eq!(req.resource_spans[0].scope_spans[0].spans.len(), 3);
        }
    }

    /// A collector whose answer never ends (broken, or hostile): read whole, it held the export
    /// until its timeout and a success counted as a failure, and the memory grew with it. The
    /// answer is read up to a bound: the export is done once the status is known.
    #[tokio::test]
    async fn a_collector_answer_without_end_is_read_no_further_than_a_reason_needs() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1 << 16];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
                    let chunk = format!("{:x}\r\n{}\r\n", 8192, "x".repeat(8192));
                    while s.write_all(chunk.as_bytes()).await.is_ok() {}
                });
            }
        });
        let metrics: Arc<Metrics> = Arc::default();
        let (tx, _flush) =
            spawn(&http_settings(format!("http://{addr}/v1/traces")), metrics.clone(), queue_of(16)).unwrap();
        tx.send(vec![]).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while metrics.spans_exported.load(std::sync::atomic::Ordering::Relaxed) < 1 {
            assert!(std::time::Instant::now() < deadline, "the export waited for the end of an endless answer");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(metrics.spans_export_failed.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_collector_that_keeps_failing_gets_a_bounded_number_of_attempts() {
        let (endpoint, seen) = flaky_collector(usize::MAX).await;
        let metrics: Arc<Metrics> = Arc::default();
        let (tx, _flush) = spawn(&http_settings(endpoint), metrics.clone(), queue_of(16)).unwrap();
        tx.send(vec![]).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while metrics.spans_export_failed.load(std::sync::atomic::Ordering::Relaxed) < 1 {
            assert!(std::time::Instant::now() < deadline, "never gave up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen.lock().unwrap().len(), 1 + RETRIES as usize);
    }

    /// After a collector's blip, every replica retried at exactly 200, 400 and 800 ms, together;
    /// a collector that said when to come back (`Retry-After`, gRPC `RetryInfo`) was not heard;
    /// and RESOURCE_EXHAUSTED without a `RetryInfo` (a message over the collector's size limit)
    /// was sent again three times.
    #[tokio::test]
    async fn retries_are_jittered_and_wait_as_long_as_the_collector_asks() {
        use envoy_types::pb::google::{protobuf, rpc};
        use prost::Message as _;
        let pauses: Vec<Duration> = (0..200).map(|_| jittered(Duration::from_millis(200))).collect();
        assert!(
            pauses.iter().all(|p| (Duration::from_millis(100)..Duration::from_millis(300)).contains(p)),
            "{pauses:?}"
        );
        assert!(pauses.iter().any(|p| *p != pauses[0]), "no jitter: {pauses:?}");

        #[derive(Clone, PartialEq, prost::Message)]
        struct RetryInfo {
            #[prost(message, optional, tag = "1")]
            retry_delay: Option<protobuf::Duration>,
        }
        let info = RetryInfo { retry_delay: Some(protobuf::Duration { seconds: 2, nanos: 500_000_000 }) };
        let any =
            protobuf::Any { type_url: "type.googleapis.com/google.rpc.RetryInfo".into(), value: info.encode_to_vec() };
        let status = rpc::Status { code: 8, message: "slow down".into(), details: vec![any] };
        let after = grpc_retry_after(&status.encode_to_vec());
        assert_eq!(after, Some(Duration::from_millis(2500)));
        let exhausted = |retry_after| ExportError::Grpc { code: 8, message: String::new(), retry_after };
        assert!(exhausted(after).retryable() && !exhausted(None).retryable());
        assert_eq!(grpc_retry_after(&rpc::Status { code: 8, ..Default::default() }.encode_to_vec()), None);
        assert_eq!(exhausted(Some(Duration::from_secs(3600))).retry_after(), Some(MAX_RETRY_AFTER));

        // Over HTTP: one 503 asking for a second, then 200.
        let (endpoint, seen) = flaky_collector_asking(1, Some("1")).await;
        let metrics: Arc<Metrics> = Arc::default();
        let (tx, _flush) = spawn(&http_settings(endpoint), metrics.clone(), queue_of(16)).unwrap();
        tx.send(vec![]).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut first = None;
        while seen.lock().unwrap().len() < 2 {
            assert!(std::time::Instant::now() < deadline, "no second attempt");
            if first.is_none() && !seen.lock().unwrap().is_empty() {
                first = Some(std::time::Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let waited = first.expect("the first attempt").elapsed();
        assert!(waited >= Duration::from_millis(900), "retried after {waited:?}, asked to wait 1 s");
    }

    /// A collector asking for 30 s between attempts held a shutdown's flush past its budget: the
    /// flush ends the pause, and the batch is not sent again.
    #[tokio::test]
    async fn a_flush_at_shutdown_ends_a_retry_pause() {
        let (endpoint, seen) = flaky_collector_asking(usize::MAX, Some("30")).await;
        let metrics: Arc<Metrics> = Arc::default();
        let (tx, flush) = spawn(&http_settings(endpoint), metrics.clone(), queue_of(16)).unwrap();
        tx.send(vec![]).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "no attempt");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(flush.finish(Duration::from_secs(10)).await, "the flush waited out the collector's pause");
        assert_eq!(seen.lock().unwrap().len(), 1, "sent again after the flush");
        assert_eq!(metrics.spans_export_failed.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    /// Spans with captured bodies run to hundreds of KB: a batch of them is split before it
    /// passes what a collector takes in one message (4 MiB by default), and no span is lost.
    #[tokio::test]
    async fn large_spans_are_sent_in_batches_a_collector_accepts() {
        use prost::Message as _;
        let (endpoint, seen) = flaky_collector(0).await;
        let metrics: Arc<Metrics> = Arc::default();
        let (tx, flush) = spawn(&http_settings(endpoint), metrics.clone(), queue_of(64)).unwrap();
        let big = |i: u8| {
            let mut s = Vec::new();
            crate::telemetry::otlp::bytes(&mut s, 1, &[i; 16]);
            crate::telemetry::otlp::bytes(&mut s, 5, &vec![b'x'; 900_000]);
            s
        };
        // Queued before the first round: one batch by count.
        for i in 0..12 {
            tx.try_send(big(i)).unwrap();
        }
        assert!(flush.finish(Duration::from_secs(20)).await, "the flush finished");
        assert_eq!(metrics.spans_exported.load(std::sync::atomic::Ordering::Relaxed), 12);
        let seen = seen.lock().unwrap();
        assert!(seen.len() >= 3, "{} exports", seen.len());
        let mut ids = Vec::new();
        for (_, body) in seen.iter() {
            assert!(body.len() <= 4 << 20, "an export of {} bytes", body.len());
            let req =
                opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(&body[..]).unwrap();
            ids.extend(req.resource_spans[0].scope_spans[0].spans.iter().map(|s| s.trace_id[0]));
        }
        assert_eq!(ids, (0..12).collect::<Vec<u8>>(), "every span once, in order");
    }

    /// Stopping (SIGTERM) sends what is queued at once, while senders are still alive (streams
    /// that outlived the drain still hold the queue), and waits for the collector's answer.
    #[tokio::test]
    async fn stopping_sends_the_spans_still_queued_and_waits_for_them() {
        use std::sync::atomic::Ordering::Relaxed;
        let (endpoint, seen) = flaky_collector(0).await;
        let metrics: Arc<Metrics> = Arc::default();
        let (tx, flush) = spawn(&http_settings(endpoint), metrics.clone(), queue_of(16)).unwrap();
        for i in 0..3 {
            tx.try_send(vec![i]).unwrap();
        }
        assert!(flush.finish(Duration::from_secs(10)).await, "the flush finished");
        assert_eq!(metrics.spans_exported.load(Relaxed), 3, "every queued span is out when it returns");
        assert!(!seen.lock().unwrap().is_empty());
        // The thread is gone: the queue takes no more spans.
        assert!(tx.try_send(vec![9]).is_err());
    }

    /// A collector that takes the connection and never answers holds shutdown no longer than
    /// the bound keyswap gives it.
    #[tokio::test]
    async fn a_collector_that_never_answers_holds_the_flush_only_up_to_its_bound() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let (tx, flush) = spawn(&http_settings(endpoint), Arc::default(), queue_of(16)).unwrap();
        tx.try_send(vec![1]).unwrap();
        let started = std::time::Instant::now();
        assert!(!flush.finish(Duration::from_millis(300)).await, "a hung collector cannot finish");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }

    /// The exporter runs on a thread of its own: spans go out while the runtime whose worker
    /// finished them is busy and never yields (as a worker answering Envoy is, under load), and
    /// batching and sending them never holds that worker up.
    #[test]
    fn spans_are_exported_while_the_runtime_that_finished_them_never_yields() {
        use std::sync::atomic::Ordering::Relaxed;
        let (collector_tx, collector) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                collector_tx.send(flaky_collector(0).await).unwrap();
                std::future::pending::<()>().await
            });
        });
        let (endpoint, seen) = collector.recv().unwrap();
        let metrics: Arc<Metrics> = Arc::default();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (tx, _flush) = spawn(&http_settings(endpoint), metrics.clone(), queue_of(16)).unwrap();
            for i in 0..3 {
                tx.try_send(vec![i]).unwrap();
            }
            // Blocks this runtime's only thread: nothing on it runs until the spans are out.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while metrics.spans_exported.load(Relaxed) < 3 {
                assert!(std::time::Instant::now() < deadline, "the spans wait for the runtime that finished them");
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        assert_eq!(seen.lock().unwrap().len(), 1, "one batch");
    }

    #[test]
    fn an_exporter_that_cannot_be_built_is_an_error_at_start() {
        let Err(err) = spawn(&http_settings("not a uri".into()), Arc::default(), queue_of(16)) else { panic!("built") };
        assert!(err.contains("OTLP endpoint"), "{err}");
    }

    fn http_settings(endpoint: String) -> Settings {
        Settings {
            signal: Signal::Traces,
            transport: Transport::HttpProtobuf,
            endpoint,
            headers: Vec::new(),
            service_name: "keyswap".into(),
            resource: Vec::new(),
            timeout: Duration::from_secs(5),
            gzip: false,
            certificate: None,
            client_certificate: None,
            client_key: None,
        }
    }

    #[test]
    fn resource_attributes_come_from_the_standard_variable_and_the_service_name_wins() {
        let vars = |service: Option<&'static str>| {
            move |k: &str| match k {
                "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318".to_string()),
                "OTEL_RESOURCE_ATTRIBUTES" => Some(
                    "openinference.project.name=agents, k8s.namespace.name=team%2Fa,service.name=from-resource".into(),
                ),
                "OTEL_SERVICE_NAME" => service.map(str::to_owned),
                _ => None,
            }
        };
        let s = settings(None, vars(None)).unwrap().unwrap();
        assert_eq!(s.service_name, "from-resource");
        assert_eq!(s.resource[0], ("openinference.project.name".to_string(), "agents".to_string()));
        assert_eq!(s.resource[1], ("k8s.namespace.name".to_string(), "team/a".to_string()));
        assert_eq!(settings(None, vars(Some("egress"))).unwrap().unwrap().service_name, "egress");
        let bad = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318".to_string()),
            "OTEL_RESOURCE_ATTRIBUTES" => Some("no-equals-sign".to_string()),
            _ => None,
        };
        assert!(settings(None, bad).unwrap_err().contains("OTEL_RESOURCE_ATTRIBUTES"));
    }

    /// OTLP wants unique keys and no empty one; a `%` that is no escape was passed on as is.
    #[test]
    fn resource_attributes_have_keys_once_and_valid_escapes() {
        let with = |v: &'static str| {
            move |k: &str| match k {
                "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318".to_string()),
                "OTEL_RESOURCE_ATTRIBUTES" => Some(v.to_string()),
                _ => None,
            }
        };
        let s = settings(None, with("team=a,zone=x,team=b")).unwrap().unwrap();
        assert_eq!(s.resource, [("zone".to_string(), "x".to_string()), ("team".into(), "b".into())]);
        for bad in ["=orphan", "team=100%", "team=a%ZZb", "team=%2"] {
            let e = settings(None, with(bad)).unwrap_err();
            assert!(e.contains("OTEL_RESOURCE_ATTRIBUTES"), "{bad}: {e}");
        }
        assert_eq!(settings(None, with("pct=100%25")).unwrap().unwrap().resource[0].1, "100%");
    }

    /// `OTEL_TRACES_EXPORTER=console` (or `NONE`) was compared to `none` exactly: OTLP went out.
    /// And a base endpoint written with the traces path sent metrics to `…/v1/traces/v1/metrics`;
    /// one with a query got the path after the query.
    #[test]
    fn exporters_are_read_as_a_list_and_base_endpoints_take_each_signals_path() {
        let env = |exporter: &'static str| move |k: &str| (k == "OTEL_TRACES_EXPORTER").then(|| exporter.to_string());
        let spec = otlp("http://otel:4318");
        for (v, on) in [("NONE", false), (" none ", false), ("otlp", true), ("OTLP, none", true), ("", true)] {
            assert_eq!(settings(Some(&spec), env(v)).unwrap().is_some(), on, "OTEL_TRACES_EXPORTER={v:?}");
        }
        for v in ["console", "zipkin", "otlp,console"] {
            assert!(settings(Some(&spec), env(v)).unwrap_err().contains("not supported"), "{v}");
            // Without an endpoint keyswap exports nothing: an inherited variable stops nothing.
            assert_eq!(settings(None, env(v)).unwrap(), None, "{v}");
        }
        let none = |_: &str| None;
        for (base, traces, metrics) in [
            ("http://c:4318/v1/traces", "http://c:4318/v1/traces", "http://c:4318/v1/metrics"),
            ("http://c:4318/otlp/", "http://c:4318/otlp/v1/traces", "http://c:4318/otlp/v1/metrics"),
            (
                "http://c:4318/otlp?tenant=a",
                "http://c:4318/otlp/v1/traces?tenant=a",
                "http://c:4318/otlp/v1/metrics?tenant=a",
            ),
        ] {
            let at = |signal| settings_for(signal, Some(&otlp(base)), none).unwrap().unwrap().endpoint;
            assert_eq!((at(Signal::Traces), at(Signal::Metrics)), (traces.to_string(), metrics.to_string()), "{base}");
        }
        // Errors at start name the endpoint and the attribute without the token either.
        let bad = |k: &str| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "ftp://c/?api_key=T0KEN".to_string());
        assert!(!settings(None, bad).unwrap_err().contains("T0KEN"));
        let bad = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://c:4318".to_string()),
            "OTEL_RESOURCE_ATTRIBUTES" => Some("team=a%ZZT0KEN".to_string()),
            _ => None,
        };
        assert!(!settings(None, bad).unwrap_err().contains("T0KEN"));
        // The start log prints the settings: not a token in the endpoint's query.
        let s = settings(Some(&otlp("http://c:4318/otlp?api_key=T0KEN")), none).unwrap().unwrap();
        assert!(!format!("{s} {s:?}").contains("T0KEN"), "{s}");
    }

    #[tokio::test]
    async fn export_errors_say_whether_sending_again_can_help() {
        let exporter = Exporter::new(&http_settings(collector("503 Service Unavailable").await)).unwrap();
        let e = exporter.export(&[vec![]]).await.unwrap_err();
        assert!(matches!(e, ExportError::Http { status, .. } if status == 503), "{e:?}");
        assert!(e.retryable() && e.to_string().contains("503"), "{e}");

        let exporter = Exporter::new(&http_settings(collector("400 Bad Request").await)).unwrap();
        let e = exporter.export(&[vec![]]).await.unwrap_err();
        assert!(!e.retryable(), "a collector that refuses the batch refuses it again: {e:?}");
        assert!(e.to_string().contains("refused: bad batch"), "{e}");

        let exporter = Exporter::new(&http_settings(collector("200 OK").await)).unwrap();
        exporter.export(&[vec![]]).await.unwrap();

        // Nobody listening: the collector may come back.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let exporter = Exporter::new(&http_settings(format!("http://{closed}/v1/traces?api_key=T0KEN"))).unwrap();
        let e = exporter.export(&[vec![]]).await.unwrap_err();
        assert!(matches!(e, ExportError::Unreachable { .. }) && e.retryable(), "{e:?}");
        // A collector token in the endpoint's query is in no error (each is logged).
        assert!(!e.to_string().contains("T0KEN") && e.to_string().contains("/v1/traces?…"), "{e}");

        let grpc = |code| ExportError::Grpc { code, message: String::new(), retry_after: None };
        assert!(grpc(14).retryable() && grpc(4).retryable() && !grpc(3).retryable() && !grpc(16).retryable());
    }
}
