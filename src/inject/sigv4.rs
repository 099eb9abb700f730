//! AWS Signature Version 4 for `providerAuth.type: AWSv4` (Bedrock).
//!
//! The agent's own signature is worthless (it signs with placeholder keys); keyswap removes its
//! `authorization` and every `x-amz-*` header and signs the request again with the real keys,
//! using the `aws-sigv4` crate. Only a small allowlist of headers is signed ([`SIGNED_HEADERS`]):
//! anything a later hop may add or rewrite (Envoy's `x-forwarded-*`, `x-request-id`,
//! `user-agent`, …) stays out of the signature.

use std::fmt;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign as aws_sign, PayloadChecksumKind, SessionTokenMode, SignableBody, SignableRequest, SignatureLocation,
    SigningSettings, UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;

/// The largest request body keyswap buffers to sign. Larger bodies get 413 before Envoy buffers
/// them (by `content-length`); Envoy's listener buffer limit is set to match in generated configs.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Request headers included in the signature when the agent sent them (`host`, `x-amz-date` and
/// `x-amz-security-token` are always signed).
pub const SIGNED_HEADERS: &[&str] = &["content-type"];

/// Secret keys an `AWSv4` policy reads (the names of the AWS CLI environment variables).
pub const ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";

/// Real AWS keys and where to sign for. `Debug` never shows a key.
pub struct Signer {
    identity: Identity,
    /// `spec.providerAuth.region`; `None`: taken from each request's host.
    region: Option<Box<str>>,
    /// `spec.providerAuth.service`; `None`: derived from each request's host.
    service: Option<Box<str>>,
    pub fingerprint: String,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Signer(AWSv4, region {:?}, service {:?}, <redacted> {})",
            self.region, self.service, self.fingerprint
        )
    }
}

/// How the canonical request is built. Production uses [`Options::default`]; the AWS test
/// suite varies them per case.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Normalize `.`/`..`/`//` in the path (every service but S3).
    pub normalize_path: bool,
    /// Add and sign `x-amz-content-sha256` (S3 style). Bedrock does not need it.
    pub payload_header: bool,
    /// Sign `x-amz-security-token` (true) or add it after signing.
    pub sign_session_token: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { normalize_path: true, payload_header: false, sign_session_token: true }
    }
}

/// A request as it will reach AWS.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The upstream authority without a default port.
    pub host: &'a str,
    /// `:path` exactly as it is forwarded (percent-encoding untouched).
    pub path: &'a str,
    /// Headers to sign besides `host` (lowercase names).
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// Why a request could not be signed. Nothing in it is secret: hosts and the signing library's
/// messages, never a key.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The host names no AWS region and the policy sets none: the operator must set one.
    #[error("host `{host}` names no AWS region; set spec.providerAuth.region on the policy")]
    NoRegion { host: String },
    /// The request itself cannot be signed (e.g. a header value the signer rejects).
    #[error("cannot sign this request: {0}")]
    Unsignable(String),
    #[error("SigV4 signing failed: {0}")]
    Failed(String),
}

impl SignError {
    /// The `reason` keyswap's refusal carries, so an operator can tell a policy to fix from a
    /// request that cannot be signed.
    pub fn reason(&self) -> &'static str {
        match self {
            SignError::NoRegion { .. } => "RegionUnknown",
            SignError::Unsignable(_) | SignError::Failed(_) => "SigningFailed",
        }
    }
}

impl Signer {
    pub fn new(
        access_key_id: &str,
        secret_access_key: &str,
        session_token: Option<&str>,
        region: Option<&str>,
        service: Option<&str>,
        fingerprint: String,
    ) -> Signer {
        let identity = identity(access_key_id, secret_access_key, session_token);
        Signer { identity, region: region.map(Into::into), service: service.map(Into::into), fingerprint }
    }

    /// The region and service to sign `host` for: the policy's, else derived from the host.
    pub fn scope(&self, host: &str) -> Result<(String, String), SignError> {
        let region = match &self.region {
            Some(r) => r.to_string(),
            None => region_from_host(host).ok_or_else(|| SignError::NoRegion { host: host.to_owned() })?,
        };
        let service = match &self.service {
            Some(s) => s.to_string(),
            None => service_from_host(host),
        };
        Ok((region, service))
    }

    /// The headers to set on `req`: `authorization`, `x-amz-date`, and `x-amz-security-token`
    /// with temporary credentials. Values are secret-bearing only in the case of the token.
    pub fn sign(&self, req: &Request<'_>, time: SystemTime) -> Result<Vec<(&'static str, String)>, SignError> {
        let (region, service) = self.scope(req.host)?;
        sign(req, &self.identity, &region, &service, time, Options::default())
    }
}

/// The signing identity for a key pair (and session token).
pub fn identity(access_key_id: &str, secret_access_key: &str, session_token: Option<&str>) -> Identity {
    Credentials::new(access_key_id, secret_access_key, session_token.map(str::to_owned), None, "keyswap-secret").into()
}

/// Signs `req` for `region`/`service` at `time`. Returns the headers to add.
pub fn sign(
    req: &Request<'_>,
    identity: &Identity,
    region: &str,
    service: &str,
    time: SystemTime,
    opts: Options,
) -> Result<Vec<(&'static str, String)>, SignError> {
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::Headers;
    settings.uri_path_normalization_mode =
        if opts.normalize_path { UriPathNormalizationMode::Enabled } else { UriPathNormalizationMode::Disabled };
    settings.payload_checksum_kind =
        if opts.payload_header { PayloadChecksumKind::XAmzSha256 } else { PayloadChecksumKind::NoHeader };
    settings.session_token_mode =
        if opts.sign_session_token { SessionTokenMode::Include } else { SessionTokenMode::Exclude };
    let params = v4::SigningParams::builder()
        .identity(identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| SignError::Failed(format!("parameters: {e}")))?
        .into();
    let uri = format!("https://{}{}", req.host, req.path);
    let headers = std::iter::once(("host", req.host)).chain(req.headers.iter().copied());
    let signable = SignableRequest::new(req.method, uri, headers, SignableBody::Bytes(req.body))
        .map_err(|e| SignError::Unsignable(e.to_string()))?;
    let (instructions, _signature) =
        aws_sign(signable, &params).map_err(|e| SignError::Failed(e.to_string()))?.into_parts();
    let (headers, _params) = instructions.into_parts();
    Ok(headers.into_iter().map(|h| (h.name(), h.value().to_owned())).collect())
}

/// `bedrock-runtime.us-east-1.amazonaws.com` → `us-east-1` (the label after the service).
pub fn region_from_host(host: &str) -> Option<String> {
    let mut labels = host.split('.');
    let _service = labels.next()?;
    let region = labels.next()?;
    let rest: Vec<&str> = labels.collect();
    let aws = matches!(rest.as_slice(), ["amazonaws", "com"] | ["amazonaws", "com", "cn"] | ["api", "aws"]);
    let looks_like_region = region.split('-').count() >= 3
        && region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    (aws && looks_like_region).then(|| region.to_owned())
}

/// The signing name for a host: `bedrock` for every Bedrock endpoint (`bedrock-runtime`,
/// `bedrock-agent-runtime`, their `-fips` forms), else the first label.
pub fn service_from_host(host: &str) -> String {
    let first = host.split('.').next().unwrap_or(host);
    let first = first.strip_suffix("-fips").unwrap_or(first);
    if first.starts_with("bedrock") {
        "bedrock".to_owned()
    } else {
        first.to_owned()
    }
}

/// `host:443` → `host`: AWS signs the authority without the default port.
pub fn upstream_host(authority: &str) -> &str {
    authority.strip_suffix(":443").unwrap_or(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_and_service_come_from_the_host() {
        assert_eq!(region_from_host("bedrock-runtime.us-east-1.amazonaws.com").as_deref(), Some("us-east-1"));
        assert_eq!(
            region_from_host("bedrock-runtime-fips.us-gov-west-1.amazonaws.com").as_deref(),
            Some("us-gov-west-1")
        );
        assert_eq!(region_from_host("bedrock-runtime.cn-north-1.amazonaws.com.cn").as_deref(), Some("cn-north-1"));
        assert_eq!(region_from_host("example.com"), None);
        assert_eq!(region_from_host("bedrock.amazonaws.com"), None);
        assert_eq!(service_from_host("bedrock-runtime.us-east-1.amazonaws.com"), "bedrock");
        assert_eq!(service_from_host("bedrock-runtime-fips.us-east-1.amazonaws.com"), "bedrock");
        assert_eq!(service_from_host("bedrock-agent-runtime.eu-west-1.amazonaws.com"), "bedrock");
        assert_eq!(service_from_host("sts.us-east-1.amazonaws.com"), "sts");
        assert_eq!(
            upstream_host("bedrock-runtime.us-east-1.amazonaws.com:443"),
            "bedrock-runtime.us-east-1.amazonaws.com"
        );
        assert_eq!(upstream_host("localhost:8443"), "localhost:8443");
    }

    #[test]
    fn signature_covers_host_date_and_token_only_from_the_allowlist() {
        let s = Signer::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("tok"),
            None,
            None,
            "fp".into(),
        );
        let req = Request {
            method: "POST",
            host: "bedrock-runtime.us-east-1.amazonaws.com",
            path: "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse",
            headers: &[("content-type", "application/json")],
            body: b"{}",
        };
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let h = s.sign(&req, t).unwrap();
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
        let auth = get("authorization").unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/us-east-1/bedrock/aws4_request"),
            "{auth}"
        );
        assert!(auth.contains("SignedHeaders=content-type;host;x-amz-date;x-amz-security-token,"), "{auth}");
        assert_eq!(get("x-amz-date"), Some("20231114T221320Z"));
        assert_eq!(get("x-amz-security-token"), Some("tok"));
        // Deterministic: same input, same signature; another body, another one.
        assert_eq!(s.sign(&req, t).unwrap(), h);
        let other = Request { body: b"{ }", ..req };
        let other_auth = s.sign(&other, t).unwrap().into_iter().find(|(k, _)| *k == "authorization").unwrap().1;
        assert_ne!(other_auth, auth);
        assert!(!format!("{s:?}").contains("wJalr"));
    }
}
