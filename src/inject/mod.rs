//! What to change in a matched request: the security contract in code.
//!
//! Strip every credential the agent sent — any case, duplicates, every known credential header
//! and key parameter — then write the real one. There is no agent-controlled way to opt out.
//! This module decides; `extproc::mutation` turns the plan into Envoy's wire format.

pub mod gcp;
pub mod query;
pub mod sigv4;

use std::fmt;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretSlice};

pub use crate::vocab::is_placeholder;
use crate::vocab::same_header;

/// The changes for one request. Borrowed from the snapshot: building it allocates only the
/// small vectors and, for query targets or stripped parameters, the new path. It holds the real
/// credential (the header's value, a path with the key in its query): its `Debug` names the
/// header and shows neither.
#[derive(Default)]
pub struct Plan<'a> {
    /// Lowercase names of agent headers to remove (all their values).
    pub remove: Vec<&'a str>,
    /// The credential header to write, overwriting whatever is there.
    pub set_header: Option<(&'a str, &'a [u8])>,
    /// Headers the policy pins (`spec.setHeaders`), overwriting whatever is there.
    pub pinned: &'a [(Box<str>, Box<str>)],
    /// A rewritten `:path`.
    pub path: Option<String>,
    /// Names of credential headers (and `?param`s) the agent tried to supply itself.
    pub smuggled: Vec<String>,
}

impl std::fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("remove", &self.remove)
            .field("set_header", &self.set_header.map(|(name, _)| (name, "[redacted]")))
            .field("pinned", &self.pinned)
            .field("path", &self.path.as_ref().map(|_| "[redacted]"))
            .field("smuggled", &self.smuggled)
            .finish()
    }
}

/// What the agent may not send on a route, whatever the value, and what the policy writes in
/// place of its scope headers: compiled once per binding.
#[derive(Debug, Default)]
pub struct Strip {
    /// Lowercase header names (the credential header list plus the policy's own header).
    pub headers: Box<[Box<str>]>,
    /// Query parameters (the provider's key parameters plus the policy's).
    pub query: Box<[Box<str>]>,
    /// The policy's `spec.setHeaders` (lowercase names; values are not secret), written over
    /// whatever the agent sent under those names.
    pub pinned: Box<[(Box<str>, Box<str>)]>,
}

impl Strip {
    /// Whether the header `name` (any case, `_` for `-`) is the policy's to choose: an
    /// organization or project header, or one it pins (`spec.setHeaders`).
    fn scopes(&self, name: &str) -> bool {
        crate::vocab::SCOPE_HEADERS.iter().any(|s| same_header(s, name))
            || self.pinned.iter().any(|(p, _)| same_header(p, name))
    }
}

/// The real credential, ready to write. `value` is the exact header value or the
/// percent-encoded query value; provider authentication computes it per request.
pub enum Credential {
    Header {
        name: Box<str>,
        value: SecretSlice<u8>,
        fingerprint: String,
    },
    Query {
        param: Box<str>,
        value: SecretSlice<u8>,
        fingerprint: String,
    },
    /// AWS SigV4: every request is signed with the real keys.
    AwsV4(Arc<sigv4::Signer>),
    /// A GCP access token minted from a service-account key, as `authorization: Bearer`.
    GcpToken(Arc<gcp::TokenSource>),
}

impl Credential {
    /// The static value written for Header and Query targets; empty for provider authentication.
    pub fn value(&self) -> &[u8] {
        match self {
            Credential::Header { value, .. } | Credential::Query { value, .. } => value.expose_secret(),
            Credential::AwsV4(_) | Credential::GcpToken(_) => b"",
        }
    }

    pub fn fingerprint(&self) -> &str {
        match self {
            Credential::Header { fingerprint, .. } | Credential::Query { fingerprint, .. } => fingerprint,
            Credential::AwsV4(s) => &s.fingerprint,
            Credential::GcpToken(s) => &s.fingerprint,
        }
    }

    /// `header x-api-key` or `query key`: where the credential goes, without its value.
    pub fn describe(&self) -> String {
        match self {
            Credential::Header { name, .. } => format!("header `{name}`"),
            Credential::Query { param, .. } => format!("query parameter `{param}`"),
            Credential::AwsV4(_) => {
                "an AWS SigV4 signature (`authorization`, `x-amz-date`, `x-amz-security-token`)".into()
            }
            Credential::GcpToken(s) => {
                format!("header `authorization: Bearer <access token of {}, scopes {}>`", s.account, s.scopes.join(" "))
            }
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}, <redacted> {})", self.describe(), self.fingerprint())
    }
}

/// Builds the plan for a request whose route strips `strip` and writes `credential`, with
/// `headers` as the agent sent them.
/// `token` is the current access token for a GCP binding (`None` otherwise); `agent_token` the
/// gateway token that admitted the caller (stripped like any credential, but not smuggling).
pub fn plan<'a>(
    strip: &'a Strip,
    credential: &'a Credential,
    token: Option<&'a [u8]>,
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    path: &str,
    agent_token: Option<&[u8]>,
) -> Plan<'a> {
    let mut plan = Plan { pinned: &strip.pinned, ..Plan::default() };
    let target = match credential {
        Credential::Header { name, value, .. } => {
            plan.set_header = Some((&**name, value.expose_secret()));
            Some(&**name)
        }
        Credential::GcpToken(_) => {
            plan.set_header = token.map(|t| ("authorization", t));
            Some("authorization")
        }
        Credential::Query { .. } | Credential::AwsV4(_) => None,
    };
    let sigv4 = matches!(credential, Credential::AwsV4(_));
    let mut target_seen = 0usize;
    for (name, value) in headers {
        // Compared as a lenient server would: any case, `_` for `-` (`X_Api_Key`).
        let Some(strip) = strip.headers.iter().find(|s| same_header(s, name)) else {
            // The organization or project the call runs in is the policy's to choose, not the
            // agent's, and so is a header the policy pins: removed under the name it came with
            // (`Anthropic_Beta` too), unless that is the pinned name, which overwrites it.
            let scope = strip.scopes(name);
            if scope {
                if !plan.remove.contains(&name) {
                    plan.remove.push(name);
                }
                continue;
            }
            // SigV4: the agent's x-amz-date, x-amz-content-sha256, … belong to its own signature.
            if sigv4 && name.get(..6).is_some_and(|p| same_header(p, "x-amz-")) && !plan.remove.contains(&name) {
                plan.remove.push(name);
            }
            continue;
        };
        let strip: &'a str = strip;
        let is_agent_token = agent_token.is_some_and(|t| value.rsplit(|&b| b == b' ').next() == Some(t));
        if !is_placeholder(value) && !is_agent_token {
            plan.smuggled.push(strip.to_owned());
        }
        if !name.eq_ignore_ascii_case(strip) {
            // A disguised spelling: removed under the name it was sent with.
            if !plan.remove.contains(&name) {
                plan.remove.push(name);
            }
            continue;
        }
        if Some(strip) == target {
            // Overwritten in place (OVERWRITE_IF_EXISTS_OR_ADD drops every existing value).
            target_seen += 1;
            if target_seen == 2 {
                plan.smuggled.push(format!("{strip} (duplicate)"));
            }
        } else if !plan.remove.contains(&strip) {
            plan.remove.push(strip);
        }
    }
    let set_param = match credential {
        Credential::Query { param, value, .. } => Some((&**param, value.expose_secret())),
        _ => None,
    };
    if set_param.is_some() || path.contains('?') {
        let rw = query::rewrite(path, &strip.query, crate::vocab::SCOPE_QUERY_PARAMS, set_param, |v| {
            is_placeholder(v.as_bytes())
        });
        plan.path = rw.path;
        for _ in 0..rw.smuggled {
            plan.smuggled.push("?query-parameter".to_owned());
        }
    }
    plan
}

/// The request trailers an agent may not send: every name [`plan`] strips or overwrites in the
/// headers (the credential names in any spelling, the organization and project names, the
/// policy's pinned headers) and `x-amz-*` (AWS reads trailers of its own, an aws-chunked
/// upload's checksum). Trailers follow no header
/// decision, so the credential a route writes is removed from them too. Returns the names to
/// remove, as sent, and the credential names that carried a value other than the placeholder.
pub fn strip_trailers<'a>(
    strip: &Strip,
    trailers: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> (Vec<&'a str>, Vec<String>) {
    let (mut remove, mut smuggled) = (Vec::new(), Vec::new());
    for (name, value) in trailers {
        let credential = strip.headers.iter().find(|s| same_header(s, name));
        let scope = strip.scopes(name);
        let amz = name.get(..6).is_some_and(|p| same_header(p, "x-amz-"));
        if let Some(c) = credential.filter(|_| !is_placeholder(value)) {
            smuggled.push(format!("{c} (trailer)"));
        }
        if (credential.is_some() || scope || amz) && !remove.contains(&name) {
            remove.push(name);
        }
    }
    (remove, smuggled)
}

#[cfg(test)]
mod tests {
    use super::{is_placeholder, strip_trailers, Strip};

    #[test]
    fn request_trailers_lose_every_name_the_headers_would() {
        let strip = Strip {
            headers: ["x-api-key".into(), "authorization".into(), "x-custom-key".into()].into(),
            query: Box::default(),
            pinned: [("anthropic-beta".into(), "pinned".into())].into(),
        };
        let trailers: [(&str, &[u8]); 9] = [
            ("x-api-key", b"keyswap-injected-by-proxy"),
            ("X_Custom_Key", b"sk-stolen"),
            ("authorization", b"Bearer sk-stolen"),
            ("openai_organization", b"org-agent"),
            ("anthropic-beta", b"agent-chosen"),
            ("x-amz-checksum-crc32", b"AAAA"),
            ("x-clean", b"kept"),
            ("grpc-status", b"0"),
            ("x-api-key", b"again"),
        ];
        let (remove, smuggled) = strip_trailers(&strip, trailers.iter().copied());
        assert_eq!(
            remove,
            [
                "x-api-key",
                "X_Custom_Key",
                "authorization",
                "openai_organization",
                "anthropic-beta",
                "x-amz-checksum-crc32"
            ]
        );
        // The placeholder is no smuggling; the other credential values are.
        assert_eq!(smuggled, ["x-custom-key (trailer)", "authorization (trailer)", "x-api-key (trailer)"]);
    }

    /// A plan printed by a future log line (`?plan`) must not carry the key it writes.
    #[test]
    fn a_plan_printed_for_debugging_shows_no_credential() {
        let plan = super::Plan {
            set_header: Some(("x-api-key", b"sk-ant-live-value")),
            path: Some("/v1beta/models?key=AIza-live-value".into()),
            smuggled: vec!["x-api-key".into()],
            ..Default::default()
        };
        let shown = format!("{plan:?}");
        assert!(!shown.contains("live-value") && shown.contains("x-api-key"), "{shown}");
    }

    #[test]
    fn placeholder_is_recognised_with_and_without_scheme() {
        assert!(is_placeholder(b"keyswap-injected-by-proxy"));
        assert!(is_placeholder(b"Bearer keyswap-injected-by-proxy"));
        assert!(is_placeholder(b""));
        assert!(!is_placeholder(b"Bearer sk-stolen"));
        assert!(!is_placeholder(b"keyswap-injected-by-proxyX"));
        assert!(is_placeholder(
            b"AWS4-HMAC-SHA256 Credential=keyswap-injected-by-proxy/20250101/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=ab"
        ));
        assert!(!is_placeholder(
            b"AWS4-HMAC-SHA256 Credential=AKIAREAL/20250101/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=ab"
        ));
    }
}
