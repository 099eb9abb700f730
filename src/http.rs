//! One outbound HTTP client for keyswap's own calls (OTLP export, JWKS): hyper over rustls,
//! `https` verified against the system roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` honoured).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A pause before retrying one of keyswap's own outbound calls (an OTLP export, a Kubernetes
/// watch), drawn between `low` and `high` times `pause`, so that many clients (a process's
/// watches, a fleet's exporters) do not retry in step. Each `RandomState` has keys of its own: a
/// fresh draw per call, no generator to keep.
pub fn jittered(pause: std::time::Duration, low: f64, high: f64) -> std::time::Duration {
    use std::hash::BuildHasher as _;
    let r = std::collections::hash_map::RandomState::new().hash_one(0u8);
    pause.mul_f64(low + (high - low) * (r % 1024) as f64 / 1024.0)
}

/// A client for `uri`'s scheme: `http2_only` for gRPC (h2c on `http`, ALPN h2 on `https`).
/// System CA certificates are loaded only for `https` (a missing store is then an error).
pub fn client(uri: &hyper::Uri, http2_only: bool) -> Result<HttpClient, String> {
    client_with(uri, http2_only, &Tls::default())
}

/// TLS settings of a client beyond the defaults: its own trusted CAs instead of the system's, and
/// a client certificate (mutual TLS). PEM, as read from files.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tls {
    pub roots: Option<Vec<u8>>,
    /// Certificate chain and private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Tls {
    /// The key is never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("roots", &self.roots.is_some()).field("identity", &self.identity.is_some()).finish()
    }
}

/// [`client`] with `tls`: an `https` endpoint is verified against `tls.roots` when given, and
/// keyswap presents `tls.identity` when given.
pub fn client_with(uri: &hyper::Uri, http2_only: bool, tls: &Tls) -> Result<HttpClient, String> {
    let connector = connector_with(uri, http2_only, tls)?;
    let mut builder = Client::builder(TokioExecutor::new());
    if http2_only {
        builder.http2_only(true);
    }
    Ok(builder.build(connector))
}

/// The connector [`client_with`] uses (also under tonic channels): plain or rustls TLS as `uri`'s
/// scheme says, ALPN h2 when `http2_only`.
pub fn connector_with(uri: &hyper::Uri, http2_only: bool, tls: &Tls) -> Result<HttpsConnector<HttpConnector>, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let https = uri.scheme_str() == Some("https");
    let tls = if https && (tls.roots.is_some() || tls.identity.is_some()) {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.roots {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| format!("the trusted certificate file: {e}"))?;
                    roots.add(cert).map_err(|e| format!("the trusted certificate file: {e}"))?;
                }
                if roots.is_empty() {
                    return Err("the trusted certificate file holds no certificate".into());
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots);
        // ALPN is set by the connector builder (enable_http1 / enable_http2).
        let config = match &tls.identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("the client certificate file: {e}"))?;
                // The parser's error never quotes the key.
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|_| "the client key file holds no usable PEM private key".to_owned())?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("the client certificate and key: {e}"))?
            }
        };
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
    } else if https {
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            // Not the URI: its query may carry a collector's token (callers name it without).
            .map_err(|e| format!("no system CA certificates to verify it ({e})"))?
    } else {
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
    };
    Ok(if http2_only { tls.https_or_http().enable_http2().build() } else { tls.https_or_http().enable_http1().build() })
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
