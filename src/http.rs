//! One outbound HTTP client for keyswap's own calls (OTLP export, JWKS): hyper over rustls,
//! `https` verified against the system roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` honoured).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client for `uri`'s scheme: `http2_only` for gRPC (h2c on `http`, ALPN h2 on `https`).
/// System CA certificates are loaded only for `https` (a missing store is then an error).
pub fn client(uri: &hyper::Uri, http2_only: bool) -> Result<HttpClient, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = if uri.scheme_str() == Some("https") {
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .map_err(|e| format!("{uri}: no system CA certificates to verify it ({e})"))?
    } else {
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
    };
    let mut builder = Client::builder(TokioExecutor::new());
    let connector = if http2_only {
        builder.http2_only(true);
        tls.https_or_http().enable_http2().build()
    } else {
        tls.https_or_http().enable_http1().build()
    };
    Ok(builder.build(connector))
}

/// An error with its sources, for logs (`client error (Connect): invalid peer certificate: …`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
