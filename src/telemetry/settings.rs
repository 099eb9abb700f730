//! The exporters' settings: the standard `OTEL_EXPORTER_OTLP_*` variables and
//! `EgressGateway.spec.otlp` (over them), read and checked at start; what a malformed value is
//! called in an error never quotes a credential.

use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue};
use percent_encoding::percent_decode_str;

use super::export::EXPORT_TIMEOUT;
use crate::api::Otlp;

/// What an exporter sends: spans, or metrics (`OTEL_METRICS_EXPORTER=otlp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    /// The signal's part of the standard variables' names (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
    pub(super) fn var(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
        }
    }

    /// The OTLP/HTTP path a base endpoint gets.
    fn http_path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
        }
    }

    /// The OTLP/gRPC method every collector serves.
    pub(super) fn grpc_path(self) -> &'static str {
        match self {
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    HttpProtobuf,
}

/// Where spans go, or `None` when tracing is off.
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    pub signal: Signal,
    pub transport: Transport,
    /// The full URL spans are sent to (`…/v1/traces` for HTTP; scheme and authority for gRPC).
    pub endpoint: String,
    /// Standard variables first, the gateway's `spec.otlp.headers` over them.
    pub headers: Vec<(String, String)>,
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES` (`service.name` among them yields to `OTEL_SERVICE_NAME`).
    pub resource: Vec<(String, String)>,
    pub timeout: Duration,
    /// `OTEL_EXPORTER_OTLP[_TRACES]_COMPRESSION=gzip`.
    pub gzip: bool,
    /// `OTEL_EXPORTER_OTLP[_TRACES]_CERTIFICATE`, `…_CLIENT_CERTIFICATE`, `…_CLIENT_KEY`: the files,
    /// read when the exporter is made.
    pub certificate: Option<std::path::PathBuf>,
    pub client_certificate: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
}

impl std::fmt::Display for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = match self.transport {
            Transport::Grpc => "grpc",
            Transport::HttpProtobuf => "http/protobuf",
        };
        // Header values may be credentials for the collector: names only.
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        let resource: Vec<&str> = self.resource.iter().map(|(k, _)| k.as_str()).collect();
        write!(
            f,
            "{t} {} headers {names:?} timeout {:?} service.name {} resource {resource:?}{}",
            without_query(&self.endpoint),
            self.timeout,
            self.service_name,
            if self.gzip { " gzip" } else { "" }
        )
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// `k1=v1,k2=v2` with percent-encoded values (`OTEL_EXPORTER_OTLP_HEADERS`).
fn parse_header_list(var: &str, v: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, item) in v.split(',').map(str::trim).filter(|i| !i.is_empty()).enumerate() {
        let (k, val) = item.split_once('=').ok_or_else(|| format!("{var}: {} is not key=value", shown(item, n + 1)))?;
        // A base64 credential pasted without its name splits at its padding: its "name" would be
        // the credential, and names are logged.
        if !val.is_empty() && val.bytes().all(|b| b == b'=') {
            return Err(format!(
                "{var}: {} has only `=` for a value (a credential without its name?)",
                shown(k, n + 1)
            ));
        }
        let decode = |s: &str| percent_decode_str(s.trim()).decode_utf8().map(|c| c.into_owned());
        let k = decode(k).map_err(|_| format!("{var}: a header name is not UTF-8"))?;
        let val = decode(val).map_err(|_| format!("{var}.{k}: the value is not UTF-8"))?;
        out.push((k, val));
    }
    Ok(out)
}

/// `OTEL_RESOURCE_ATTRIBUTES`: [`parse_header_list`], stricter as OTLP needs: a key is not
/// empty, an escape is valid percent-encoding, and a key given twice takes its last value (OTLP
/// requires unique keys).
fn resource_attributes(var: &str, v: &str) -> Result<Vec<(String, String)>, String> {
    let bad_escape = |s: &str| {
        let b = s.as_bytes();
        b.iter().enumerate().any(|(i, &c)| {
            c == b'%' && !(i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit())
        })
    };
    if let Some((n, item)) = v.split(',').enumerate().find(|(_, i)| bad_escape(i)) {
        return Err(format!("{var}: {} has a `%` that is no percent-escape (write %25)", shown(item, n + 1)));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, val) in parse_header_list(var, v)? {
        if k.is_empty() {
            return Err(format!("{var}: an attribute has no key"));
        }
        out.retain(|(old, _)| *old != k);
        out.push((k, val));
    }
    Ok(out)
}

/// A collector URL as logs and errors print it: its query (where a collector's token may travel)
/// left out.
pub(super) fn without_query(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    }
}

/// The part of a malformed `k=v` item safe to print: what comes before a `=`, `:` or space (the
/// name of `name: value`). An item with none of them may be the credential itself, pasted without
/// its name: nothing of it.
fn name_of(item: &str) -> Option<&str> {
    item.trim().split_once([':', ' ', '=']).map(|(name, _)| name)
}

/// How an error names the malformed `n`th item of a list: its name, or its position.
fn shown(item: &str, n: usize) -> String {
    name_of(item).map_or_else(|| format!("item {n}"), |name| format!("`{name}`"))
}

/// The longest time an `OTEL_*` millisecond variable may name: a day (a schedule or timeout
/// longer than that is a mistake, e.g. a value meant in microseconds).
const MAX_MILLIS: u64 = 86_400_000;

/// `v`, the value of `var`, as a positive number of milliseconds, at most a day.
pub fn millis(var: &str, v: &str) -> Result<Duration, String> {
    match v.trim().parse::<u64>() {
        Ok(ms) if (1..=MAX_MILLIS).contains(&ms) => Ok(Duration::from_millis(ms)),
        _ => Err(format!("{var} `{v}` must be a positive number of milliseconds, at most a day ({MAX_MILLIS})")),
    }
}

/// `OTEL_SDK_DISABLED=true` (case ignored; any other value, empty included, is false, as the
/// specification says): no signal is exported, whatever else is set.
pub fn sdk_disabled(env: impl Fn(&str) -> Option<String>) -> bool {
    env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Whether `signal` may be exported at all: not with `OTEL_SDK_DISABLED=true`, nor traces with
/// `OTEL_TRACES_EXPORTER=none`. The variable is a list (case ignored, as the specification reads
/// its values); an exporter keyswap does not have (`console`, `zipkin`) is an error at start, not
/// OTLP sent anyway.
fn exported(signal: Signal, env: impl Fn(&str) -> Option<String>) -> Result<bool, String> {
    let mut traces = true;
    if signal == Signal::Traces {
        let named = env("OTEL_TRACES_EXPORTER").unwrap_or_default().to_ascii_lowercase();
        let named: Vec<&str> = named.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
        if let Some(other) = named.iter().find(|e| !matches!(**e, "otlp" | "none")) {
            return Err(format!("OTEL_TRACES_EXPORTER `{other}` is not supported: otlp (the default) or none"));
        }
        traces = named.is_empty() || named.contains(&"otlp");
    }
    Ok(traces && !sdk_disabled(env))
}

/// The collector's headers, from every source in order: later sources win, names compared
/// case-insensitively; a name or value that is no valid header refused.
fn merged_headers(headers: Vec<(String, String)>) -> Result<Vec<(String, String)>, String> {
    let mut merged: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        let k = k.to_ascii_lowercase();
        // Not quoted: `Authorization: Basic dXNl=` split at its `=` makes a "name" of a credential.
        HeaderName::from_bytes(k.as_bytes()).map_err(|_| match name_of(&k) {
            Some(name) => format!("an OTLP header `{name}` is not a valid header name (write name=value)"),
            None => "an OTLP header name is not a valid header name (write name=value; not quoted, it may be a \
                         credential)"
                .to_owned(),
        })?;
        HeaderValue::from_str(&v).map_err(|_| format!("OTLP header {k}: the value is not a valid header value"))?;
        merged.retain(|(old, _)| *old != k);
        merged.push((k, v));
    }
    Ok(merged)
}

/// Whether spans may be exported at all, whatever names a collector: [`exported`], a value it
/// refuses counting as yes (keyswap does not start with it).
pub fn traces_exported(env: impl Fn(&str) -> Option<String>) -> bool {
    exported(Signal::Traces, env).unwrap_or(true)
}

/// `endpoint`, a base URL, with `signal`'s path appended to its path (its query kept): a base
/// that already ends with a signal's path (`…/v1/traces`, as often written for traces) has it
/// replaced, so metrics never go to `…/v1/traces/v1/metrics`.
fn signal_url(uri: &hyper::Uri, signal: Signal) -> String {
    let mut path = uri.path().trim_end_matches('/');
    for s in [Signal::Traces, Signal::Metrics] {
        path = path.strip_suffix(s.http_path()).unwrap_or(path);
    }
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let authority = uri.authority().map_or("", |a| a.as_str());
    format!("{}://{authority}{path}{}{query}", uri.scheme_str().unwrap_or("http"), signal.http_path())
}

/// Tracing is on when the gateway names an endpoint or the environment does.
pub fn settings(otlp: Option<&Otlp>, env: impl Fn(&str) -> Option<String>) -> Result<Option<Settings>, String> {
    settings_for(Signal::Traces, otlp, env)
}

/// [`settings`] for `signal`: its own variables (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` …) over
/// the general ones. Whether the signal is exported at all is the caller's question for metrics
/// ([`super::otlp_metrics::push_interval`]).
pub fn settings_for(
    signal: Signal,
    otlp: Option<&Otlp>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Settings>, String> {
    let first =
        |names: &[&str]| names.iter().find_map(|&n| env(n).filter(|v| !v.is_empty()).map(|v| (n.to_owned(), v)));
    let var = |suffix: &str| format!("OTEL_EXPORTER_OTLP_{}_{suffix}", signal.var());
    if sdk_disabled(&env) {
        return Ok(None);
    }
    let transport = match first(&[&var("PROTOCOL"), "OTEL_EXPORTER_OTLP_PROTOCOL"]) {
        None => Transport::HttpProtobuf,
        Some((_, p)) if p.trim().eq_ignore_ascii_case("http/protobuf") => Transport::HttpProtobuf,
        Some((_, p)) if p.trim().eq_ignore_ascii_case("grpc") => Transport::Grpc,
        Some((var, other)) => return Err(format!("{var} `{other}` is not supported; use grpc or http/protobuf")),
    };
    let spec = otlp.and_then(|o| o.endpoint.clone()).filter(|e| !e.is_empty());
    // A base URL gets the signal path for HTTP; OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is used as is.
    let (source, endpoint, base) = match (spec, first(&[&var("ENDPOINT")])) {
        (Some(e), _) => ("spec.otlp.endpoint".to_owned(), e, true),
        (None, Some((var, e))) => (var, e, false),
        (None, None) => match first(&["OTEL_EXPORTER_OTLP_ENDPOINT"]) {
            Some((var, e)) => (var, e, true),
            None => return Ok(None),
        },
    };
    // Only with an endpoint: a variable inherited from a base image (`console`) stops no keyswap
    // that exports nothing anyway.
    if !exported(signal, &env)? {
        return Ok(None);
    }
    let uri = endpoint_uri(&source, &endpoint)?;
    let endpoint = match transport {
        Transport::HttpProtobuf if base => signal_url(&uri, signal),
        Transport::HttpProtobuf => endpoint,
        Transport::Grpc => {
            format!("{}://{}", uri.scheme_str().unwrap_or("http"), uri.authority().map_or("", |a| a.as_str()))
        }
    };
    let mut headers = Vec::new();
    for var in ["OTEL_EXPORTER_OTLP_HEADERS".to_owned(), var("HEADERS")] {
        if let Some(v) = env(&var) {
            let list = parse_header_list(&var, &v)?;
            // A base64 credential with one `=` of padding, pasted without its name, splits into a
            // "name" (the credential: names are logged) and nothing.
            if let Some(n) = list.iter().position(|(_, val)| val.is_empty()) {
                return Err(format!("{var}: item {} has an empty value (a credential without its name?)", n + 1));
            }
            headers.extend(list);
        }
    }
    if let Some(o) = otlp {
        headers.extend(o.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let merged = merged_headers(headers)?;
    let timeout = match first(&[&var("TIMEOUT"), "OTEL_EXPORTER_OTLP_TIMEOUT"]) {
        None => EXPORT_TIMEOUT,
        Some((var, ms)) => millis(&var, &ms)?,
    };
    let gzip = match first(&[&var("COMPRESSION"), "OTEL_EXPORTER_OTLP_COMPRESSION"]) {
        None => false,
        Some((_, c)) if c.trim().eq_ignore_ascii_case("gzip") => true,
        Some((_, c)) if c.trim().eq_ignore_ascii_case("none") => false,
        Some((var, c)) => return Err(format!("{var}={c}: keyswap sends `gzip` or `none`")),
    };
    let resource = match first(&["OTEL_RESOURCE_ATTRIBUTES"]) {
        Some((var, v)) => resource_attributes(&var, &v)?,
        None => Vec::new(),
    };
    let file = |names: &[&str]| first(names).map(|(_, v)| std::path::PathBuf::from(v));
    let certificate = file(&[&var("CERTIFICATE"), "OTEL_EXPORTER_OTLP_CERTIFICATE"]);
    let client_certificate = file(&[&var("CLIENT_CERTIFICATE"), "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"]);
    let client_key = file(&[&var("CLIENT_KEY"), "OTEL_EXPORTER_OTLP_CLIENT_KEY"]);
    if client_certificate.is_some() != client_key.is_some() {
        return Err("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together".into());
    }
    Ok(Some(Settings {
        signal,
        transport,
        endpoint,
        headers: merged,
        service_name: first(&["OTEL_SERVICE_NAME"])
            .map(|(_, v)| v)
            .or_else(|| resource.iter().find(|(k, _)| k == "service.name").map(|(_, v)| v.clone()))
            .unwrap_or_else(|| "keyswap".into()),
        resource,
        timeout,
        gzip,
        certificate,
        client_certificate,
        client_key,
    }))
}

/// The collector's URL from `source`: http or https, with a host. Credentials in it
/// (`https://user:token@collector`) are never sent (hyper drops them) and would be in every log
/// line that names the endpoint: refused, and never quoted.
fn endpoint_uri(source: &str, endpoint: &str) -> Result<hyper::Uri, String> {
    let authority = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest).split(['/', '?', '#']).next();
    if authority.is_some_and(|a| a.contains('@')) {
        return Err(format!("{source} has credentials in its URL (user:password@); send them as OTLP headers instead"));
    }
    let shown = without_query(endpoint);
    let uri: hyper::Uri = endpoint.parse().map_err(|e| format!("{source} `{shown}` is not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return Err(format!("{source} `{shown}` must be an http:// or https:// URL with a host"));
    }
    Ok(uri)
}
