//! The OTLP exporter: the standard `OTEL_*` variables, overridden by `EgressGateway.spec.otlp`.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::trace::SpanExporter as _;
use opentelemetry_sdk::Resource;

use crate::api::Otlp;

pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    HttpProtobuf,
}

/// Where spans go, or `None` when tracing is off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub transport: Transport,
    /// From `spec.otlp.endpoint`; `None` lets the exporter read `OTEL_EXPORTER_OTLP_*ENDPOINT`.
    pub endpoint: Option<String>,
    pub headers: Vec<(String, String)>,
    pub service_name: String,
}

impl std::fmt::Display for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = match self.transport {
            Transport::Grpc => "grpc",
            Transport::HttpProtobuf => "http/protobuf",
        };
        // Header values may be credentials for the collector: names only.
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        write!(f, "{t} {} headers {names:?}", self.endpoint.as_deref().unwrap_or("(from OTEL_EXPORTER_OTLP_*)"))
    }
}

/// Tracing is on when the gateway names an endpoint or the environment does.
pub fn settings(otlp: Option<&Otlp>, env: impl Fn(&str) -> Option<String>) -> Result<Option<Settings>, String> {
    let first = |names: &[&str]| names.iter().find_map(|n| env(n).filter(|v| !v.is_empty()));
    if first(&["OTEL_TRACES_EXPORTER"]).is_some_and(|v| v == "none") {
        return Ok(None);
    }
    let endpoint = otlp.and_then(|o| o.endpoint.clone()).filter(|e| !e.is_empty());
    let env_endpoint = first(&["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]);
    if endpoint.is_none() && env_endpoint.is_none() {
        return Ok(None);
    }
    let transport = match first(&["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]).as_deref() {
        None | Some("http/protobuf") => Transport::HttpProtobuf,
        Some("grpc") => Transport::Grpc,
        Some(other) => {
            return Err(format!("OTEL_EXPORTER_OTLP_PROTOCOL `{other}` is not supported; use grpc or http/protobuf"))
        }
    };
    Ok(Some(Settings {
        transport,
        endpoint,
        headers: otlp.map(|o| o.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default(),
        service_name: first(&["OTEL_SERVICE_NAME"]).unwrap_or_else(|| "keyswap".into()),
    }))
}

/// Builds the exporter. Call inside the tokio runtime (the gRPC channel lives there).
pub fn build(s: &Settings) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let mut exporter = match s.transport {
        Transport::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_timeout(EXPORT_TIMEOUT);
            if let Some(e) = &s.endpoint {
                b = b.with_endpoint(e.clone());
            }
            if !s.headers.is_empty() {
                let mut md = tonic::metadata::MetadataMap::new();
                for (k, v) in &s.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("spec.otlp.headers: `{k}` is not a valid header name"))?;
                    let value = v.parse().map_err(|_| format!("spec.otlp.headers.{k}: not a valid header value"))?;
                    md.insert(key, value);
                }
                b = b.with_metadata(md);
            }
            b.build()
        }
        Transport::HttpProtobuf => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_timeout(EXPORT_TIMEOUT);
            if let Some(e) = &s.endpoint {
                let e = e.trim_end_matches('/');
                let full = if e.ends_with("/v1/traces") { e.to_owned() } else { format!("{e}/v1/traces") };
                b = b.with_endpoint(full);
            }
            if !s.headers.is_empty() {
                b = b.with_headers(s.headers.iter().cloned().collect::<HashMap<_, _>>());
            }
            b.build()
        }
    }
    .map_err(|e| format!("cannot build the OTLP exporter ({s}): {e}"))?;
    exporter.set_resource(&Resource::builder().with_service_name(s.service_name.clone()).build());
    Ok(exporter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracing_is_off_without_an_endpoint_and_follows_the_standard_variables() {
        let none = |_: &str| None;
        assert_eq!(settings(None, none).unwrap(), None);
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4317".to_string()),
            "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("grpc".to_string()),
            "OTEL_SERVICE_NAME" => Some("egress".to_string()),
            _ => None,
        };
        let s = settings(None, env).unwrap().unwrap();
        assert_eq!((s.transport, s.endpoint, s.service_name.as_str()), (Transport::Grpc, None, "egress"));
        let otlp = Otlp {
            endpoint: Some("http://otel:4318".into()),
            headers: [("authorization".to_string(), "Bearer collector-token".to_string())].into(),
            capture_body: None,
            read_bodies: None,
        };
        let s = settings(Some(&otlp), none).unwrap().unwrap();
        assert_eq!(s.transport, Transport::HttpProtobuf);
        assert!(!s.to_string().contains("collector-token"), "{s}");
        let bad = |k: &str| (k == "OTEL_EXPORTER_OTLP_PROTOCOL").then(|| "http/json".to_string());
        assert!(settings(Some(&otlp), bad).is_err());
        let off = |k: &str| (k == "OTEL_TRACES_EXPORTER").then(|| "none".to_string());
        assert_eq!(settings(Some(&otlp), off).unwrap(), None);
    }
}
