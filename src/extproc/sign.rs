//! SigV4 on the stream: a request whose body Envoy buffers is signed when the body arrives, and
//! a request that cannot be signed is refused (503, fail closed), never forwarded unsigned.

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use serde_json::json;

use super::{mutation, Shared};
use crate::inject::sigv4::{self, Signer};
use crate::telemetry::Metrics;

/// A SigV4 request whose body Envoy is buffering: signed when the body arrives.
pub struct PendingSign {
    pub(super) signer: Arc<Signer>,
    pub(super) method: String,
    pub(super) host: String,
    pub(super) path: String,
    /// The allowlisted headers the agent sent ([`sigv4::SIGNED_HEADERS`]).
    pub(super) headers: Vec<(&'static str, String)>,
}

/// Bodies up to this size are signed in place; larger ones on the blocking pool (SHA-256 runs at
/// roughly 500 MiB/s here: 256 KiB is half a millisecond).
pub(super) const SIGN_INLINE_MAX_BYTES: usize = 256 * 1024;

impl PendingSign {
    /// The signature headers for this request with `body`.
    pub(super) fn sign(&self, body: &[u8]) -> Result<Vec<(&'static str, String)>, sigv4::SignError> {
        let headers: Vec<(&str, &str)> = self.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let req = sigv4::Request { method: &self.method, host: &self.host, path: &self.path, headers: &headers, body };
        self.signer.sign(&req, std::time::SystemTime::now())
    }
}

/// Signs a buffered request body; the signature headers go out with it.
pub(super) fn sign_body(shared: &Shared, sign: &PendingSign, body: &[u8]) -> ProcessingResponse {
    match sign.sign(body) {
        Ok(signed) => {
            let pairs: Vec<(&str, &[u8])> = signed.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
            mutation::request_body_with(mutation::set_headers(&pairs))
        }
        Err(e) => signing_failed(shared, &e),
    }
}

/// The answer to a request SigV4 could not sign (503, fail closed): counted, logged, and its
/// JSON reason.
pub(super) fn signing_failed_body(shared: &Shared, error: &sigv4::SignError) -> serde_json::Value {
    Metrics::inc(&shared.metrics.denied_credential_unavailable);
    tracing::warn!(%error, "SigV4 signing failed; answering 503 (fail closed)");
    json!({"error": {
        "type": "credential_unavailable",
        "message": "keyswap could not sign this request; it was not forwarded",
        "reason": error.reason(),
    }})
}

/// Envoy's response details (and the span's `error.type`, without the prefix) of a signing failure.
pub(super) const SIGNING_FAILED: &str = "keyswap_signing_failed";

pub(super) fn signing_failed(shared: &Shared, error: &sigv4::SignError) -> ProcessingResponse {
    mutation::immediate(503, &signing_failed_body(shared, error), SIGNING_FAILED)
}
