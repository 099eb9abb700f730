//! OTLP metrics push (`OTEL_METRICS_EXPORTER=otlp`): the registry `/metrics` serves, written
//! through the same [`Families`] calls into an `ExportMetricsServiceRequest` (opentelemetry-proto's
//! messages) every `OTEL_METRIC_EXPORT_INTERVAL`, and sent with the span exporter's transport
//! (HTTP `/v1/metrics` or gRPC `MetricsService/Export`, gzip, certificates, headers).
//!
//! Names follow OpenTelemetry's spelling, from which an OTLP-to-Prometheus bridge gets back the
//! `/metrics` names: `gen_ai_client_token_usage` is `gen_ai.client.token.usage` (unit `{token}`),
//! `gen_ai_client_operation_duration_seconds` is `gen_ai.client.operation.duration` (unit `s`),
//! `keyswap_requests_total` is `keyswap.requests`. Sums are cumulative and monotonic (counters),
//! histograms cumulative, with the same bounds.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;

use super::Metrics;
use crate::prom::{Families, Kind};

/// `OTEL_METRIC_EXPORT_INTERVAL`'s default (the specification's: 60 s).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// One export's worth of metrics, collected through [`Families`].
pub struct Collect {
    metrics: Vec<Metric>,
    /// Prometheus family name of each metric, in order.
    families: Vec<String>,
    start_ns: u64,
    now_ns: u64,
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The OpenTelemetry name and unit of a Prometheus family name.
pub fn otel_name(prometheus: &str) -> (String, &'static str) {
    let (base, unit) = match prometheus.strip_suffix("_seconds") {
        Some(b) => (b, "s"),
        None => (prometheus.strip_suffix("_total").unwrap_or(prometheus), ""),
    };
    match base {
        "gen_ai_client_token_usage" => ("gen_ai.client.token.usage".into(), "{token}"),
        "gen_ai_client_operation_duration" => ("gen_ai.client.operation.duration".into(), "s"),
        "gen_ai_client_operation_time_to_first_chunk" => ("gen_ai.client.operation.time_to_first_chunk".into(), "s"),
        other => (other.replace('_', "."), unit),
    }
}

/// The OpenTelemetry attribute name of a Prometheus label (`gen_ai_request_model` is
/// `gen_ai.request.model`; keyswap's own stay as they are).
fn attribute(label: &str) -> String {
    match label.strip_prefix("gen_ai_") {
        Some(rest) => format!("gen_ai.{}", rest.replace('_', ".")),
        None if label == "error_type" => "error.type".to_owned(),
        None if label == "otel_metric_overflow" => "otel.metric.overflow".to_owned(),
        None => label.to_owned(),
    }
}

fn attributes(labels: &[(&str, &str)]) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|(k, v)| KeyValue {
            key: attribute(k),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue((*v).to_owned())) }),
            ..Default::default()
        })
        .collect()
}

impl Collect {
    /// `start`: when the counters began (keyswap's start: cumulative temporality).
    pub fn new(start: SystemTime, now: SystemTime) -> Collect {
        Collect { metrics: Vec::new(), families: Vec::new(), start_ns: nanos(start), now_ns: nanos(now) }
    }

    fn metric(&mut self, family: &str) -> Option<&mut Metric> {
        let i = self.families.iter().position(|f| f == family)?;
        self.metrics.get_mut(i)
    }

    /// The request: `resource` attributes and `service.name`, keyswap's scope, the metrics.
    pub fn request(self, service_name: &str, resource: &[(String, String)]) -> ExportMetricsServiceRequest {
        let mut attrs: Vec<(&str, &str)> = vec![("service.name", service_name)];
        attrs.extend(resource.iter().filter(|(k, _)| k != "service.name").map(|(k, v)| (k.as_str(), v.as_str())));
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource { attributes: attributes(&attrs), ..Default::default() }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "keyswap".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    metrics: self.metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }
}

impl Families for Collect {
    fn family(&mut self, name: &str, help: &str, kind: Kind) {
        if self.families.iter().any(|f| f == name) {
            return;
        }
        let cumulative = AggregationTemporality::Cumulative as i32;
        let data = match kind {
            Kind::Counter => {
                metric::Data::Sum(Sum { data_points: vec![], aggregation_temporality: cumulative, is_monotonic: true })
            }
            Kind::Gauge => metric::Data::Gauge(Gauge { data_points: vec![] }),
            Kind::Histogram => {
                metric::Data::Histogram(Histogram { data_points: vec![], aggregation_temporality: cumulative })
            }
        };
        let (otel, unit) = otel_name(name);
        self.families.push(name.to_owned());
        self.metrics.push(Metric {
            name: otel,
            description: help.to_owned(),
            unit: unit.to_owned(),
            data: Some(data),
            ..Default::default()
        });
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let (start, now) = (self.start_ns, self.now_ns);
        let Some(m) = self.metric(name) else { return };
        let point = NumberDataPoint {
            attributes: attributes(labels),
            time_unix_nano: now,
            value: Some(if value.fract() == 0.0 && (0.0..9.0e18).contains(&value) {
                number_data_point::Value::AsInt(value as i64)
            } else {
                number_data_point::Value::AsDouble(value)
            }),
            ..Default::default()
        };
        match &mut m.data {
            Some(metric::Data::Sum(s)) => s.data_points.push(NumberDataPoint { start_time_unix_nano: start, ..point }),
            Some(metric::Data::Gauge(g)) => g.data_points.push(point),
            _ => {}
        }
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], bounds: &[f64], counts: &[u64], sum: f64) {
        let (start, now) = (self.start_ns, self.now_ns);
        let Some(Metric { data: Some(metric::Data::Histogram(h)), .. }) = self.metric(name) else { return };
        h.data_points.push(HistogramDataPoint {
            attributes: attributes(labels),
            start_time_unix_nano: start,
            time_unix_nano: now,
            count: counts.iter().sum(),
            sum: Some(sum),
            bucket_counts: counts.to_vec(),
            explicit_bounds: bounds.to_vec(),
            ..Default::default()
        });
    }
}

/// `OTEL_METRICS_EXPORTER` and `OTEL_METRIC_EXPORT_INTERVAL`: `Some(interval)` when metrics are
/// pushed over OTLP. `none` (or unset: keyswap's default is the `/metrics` scrape) pushes nothing;
/// `prometheus` means the scrape, which is always there.
pub fn push_interval(env: impl Fn(&str) -> Option<String>) -> Result<Option<Duration>, String> {
    // A list, case ignored, as the specification reads enumerated values.
    let exporters = env("OTEL_METRICS_EXPORTER").unwrap_or_default().to_ascii_lowercase();
    let mut otlp = false;
    for e in exporters.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match e {
            "otlp" => otlp = true,
            "none" | "prometheus" => {}
            other => {
                return Err(format!(
                    "OTEL_METRICS_EXPORTER `{other}` is not supported: otlp (push), prometheus (the /metrics scrape, always on) or none"
                ))
            }
        }
    }
    if !otlp || super::export::sdk_disabled(&env) {
        return Ok(None);
    }
    match env("OTEL_METRIC_EXPORT_INTERVAL").filter(|v| !v.trim().is_empty()) {
        None => Ok(Some(DEFAULT_INTERVAL)),
        Some(ms) => super::export::millis("OTEL_METRIC_EXPORT_INTERVAL", &ms).map(Some),
    }
}

/// Pushes the registry every `interval`, and once more when the [`Flush`] says stop (a failed
/// push is logged and counted; the next one carries the cumulative values anyway).
///
/// [`Flush`]: super::export::Flush
pub fn spawn(
    exporter: super::export::Exporter,
    metrics: Arc<Metrics>,
    interval: Duration,
    settings: super::export::Settings,
    ready: super::admin::ReadyFn,
    extra: super::admin::ExtraMetrics,
) -> super::export::Flush {
    let started = SystemTime::now();
    let (flush, mut rounds) = super::export::Flush::new(interval, interval);
    tokio::spawn(async move {
        loop {
            let last = rounds.next().await;
            let mut c = Collect::new(started, SystemTime::now());
            // What /readyz and /metrics say: readiness and the source's families included.
            metrics.write(&mut c, ready().0, |p| extra(p));
            let body = c.request(&settings.service_name, &settings.resource).encode_to_vec();
            if let Err(e) = exporter.send(body).await {
                Metrics::inc(&metrics.metric_exports_failed);
                tracing::warn!(error = %e, "OTLP metrics push failed; the next push carries the totals");
            }
            if last {
                rounds.done();
                return;
            }
        }
    });
    flush
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_names_map_to_opentelemetry_names_and_units() {
        assert_eq!(otel_name("gen_ai_client_token_usage"), ("gen_ai.client.token.usage".into(), "{token}"));
        assert_eq!(
            otel_name("gen_ai_client_operation_duration_seconds"),
            ("gen_ai.client.operation.duration".into(), "s")
        );
        assert_eq!(otel_name("keyswap_requests_total"), ("keyswap.requests".into(), ""));
        assert_eq!(otel_name("keyswap_extproc_phase_duration_seconds"), ("keyswap.extproc.phase.duration".into(), "s"));
        assert_eq!(attribute("gen_ai_request_model"), "gen_ai.request.model");
        assert_eq!(attribute("tenant"), "tenant");
    }

    #[test]
    fn the_registry_collects_into_sums_gauges_and_histograms() {
        let m = Metrics::default();
        Metrics::add(&m.requests, 7);
        m.observe(super::super::Phase::RequestHeaders, Duration::from_micros(30));
        let mut c = Collect::new(SystemTime::UNIX_EPOCH, SystemTime::now());
        m.write(&mut c, true, |_| {});
        let req = c.request("keyswap", &[("k8s.namespace.name".into(), "agents".into())]);
        let scope = &req.resource_metrics[0].scope_metrics[0];
        let find = |n: &str| scope.metrics.iter().find(|x| x.name == n).unwrap_or_else(|| panic!("no {n}"));
        let Some(metric::Data::Sum(s)) = &find("keyswap.requests").data else { panic!("a sum") };
        assert!(s.is_monotonic);
        assert_eq!(s.data_points[0].value, Some(number_data_point::Value::AsInt(7)));
        let Some(metric::Data::Gauge(g)) = &find("keyswap.ready").data else { panic!("a gauge") };
        assert_eq!(g.data_points[0].value, Some(number_data_point::Value::AsInt(1)));
        let Some(metric::Data::Histogram(h)) = &find("keyswap.extproc.phase.duration").data else {
            panic!("histogram")
        };
        let p = h.data_points.iter().find(|p| p.attributes.iter().any(|a| a.key == "phase")).unwrap();
        assert_eq!(p.bucket_counts.len(), p.explicit_bounds.len() + 1);
        assert_eq!(find("keyswap.extproc.phase.duration").unit, "s");
        let resource = req.resource_metrics[0].resource.as_ref().unwrap();
        assert!(resource.attributes.iter().any(|a| a.key == "k8s.namespace.name"));
    }

    #[test]
    fn the_exporter_variable_is_read_as_the_specification_says() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(push_interval(env(&[])), Ok(None));
        assert_eq!(push_interval(env(&[("OTEL_METRICS_EXPORTER", "none")])), Ok(None));
        assert_eq!(push_interval(env(&[("OTEL_METRICS_EXPORTER", "otlp")])), Ok(Some(DEFAULT_INTERVAL)));
        assert_eq!(
            push_interval(env(&[("OTEL_METRICS_EXPORTER", "prometheus,otlp"), ("OTEL_METRIC_EXPORT_INTERVAL", "500")])),
            Ok(Some(Duration::from_millis(500)))
        );
        assert!(push_interval(env(&[("OTEL_METRICS_EXPORTER", "console")])).unwrap_err().contains("console"));
        assert_eq!(
            push_interval(env(&[("OTEL_METRICS_EXPORTER", " OTLP ")])),
            Ok(Some(DEFAULT_INTERVAL)),
            "case ignored"
        );
        let disabled = env(&[("OTEL_METRICS_EXPORTER", "otlp"), ("OTEL_SDK_DISABLED", "true")]);
        assert_eq!(push_interval(disabled), Ok(None), "OTEL_SDK_DISABLED=true: no push");
        assert!(push_interval(env(&[("OTEL_METRICS_EXPORTER", "otlp"), ("OTEL_METRIC_EXPORT_INTERVAL", "0")])).is_err());
        // Past a day: an error naming the variable.
        let huge = env(&[("OTEL_METRICS_EXPORTER", "otlp"), ("OTEL_METRIC_EXPORT_INTERVAL", "18446744073709551615")]);
        assert!(push_interval(huge).unwrap_err().contains("OTEL_METRIC_EXPORT_INTERVAL"));
    }
}
