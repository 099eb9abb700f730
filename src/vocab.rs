//! The shared vocabulary: the words every other module speaks. Imports nothing of keyswap.
//!
//! Object keys, the placeholder an agent sends instead of a key, the credential header and
//! query lists that are stripped and redacted everywhere, the caller's identity, and the gRPC
//! metadata that tells keyswap which of Envoy's filters is asking. Modules re-export what their
//! callers reach for (`config::Key`, `provider::CREDENTIAL_HEADERS`, `auth::Identity`); the
//! definition is here, once.

use std::fmt;
use std::sync::Arc;

/// `namespace/name` of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Key { namespace: namespace.into(), name: name.into() }
    }

    /// Parses `namespace/name`, or `name` in `default`.
    pub fn parse(s: &str) -> Option<Key> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Some(Key::new(ns, name)),
            None if !s.is_empty() => Some(Key::new(DEFAULT_NAMESPACE, s)),
            _ => None,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub const DEFAULT_NAMESPACE: &str = "default";

/// The header an agent can always use for its token, whatever its SDK sends otherwise.
pub const AGENT_TOKEN_HEADER: &str = "x-keyswap-agent-token";

/// Headers that carry credentials for some provider or proxy. The agent's copies are always
/// removed, and telemetry redacts them. The one redaction list: everything else reads it.
pub const CREDENTIAL_HEADERS: &[&str] = &CREDENTIALS;

const PROVIDER_KEY_HEADERS: [&str; 12] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "anthropic-api-key",
    "openai-api-key",
    "x-goog-api-key",
    "x-amz-security-token",
    "ocp-apim-subscription-key",
    "x-auth-token",
    "cookie",
    AGENT_TOKEN_HEADER,
];

/// Headers that say who the client is, removed toward providers (the generated routes): Envoy's
/// own, and those an agent may write (`X-Forwarded-For`, RFC 7239 `Forwarded`, and the common
/// others). No policy may pin one: it would be removed on the way.
pub const FORWARDING_HEADERS: [&str; 8] = [
    "x-envoy-external-address",
    "x-forwarded-for",
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
];

/// The key headers of the gateways and proxies a `custom` route may reach (Kong and Apigee, Azure
/// Functions, LiteLLM, Portkey, Cloudflare AI Gateway, Helicone, ElevenLabs, GitLab): one that
/// reads its own before `Authorization` would run the call on the agent's key. In the credential
/// list; a policy may still pin one (`spec.setHeaders`: a gateway's key beside the provider's).
pub const GATEWAY_KEY_HEADERS: [&str; 10] = [
    "apikey",
    "x-apikey",
    "x-functions-key",
    "x-litellm-api-key",
    "x-portkey-api-key",
    "cf-aig-authorization",
    "helicone-auth",
    "xi-api-key",
    "private-token",
    "x-access-token",
];

const CREDENTIALS: [&str; PROVIDER_KEY_HEADERS.len() + GATEWAY_KEY_HEADERS.len()] = {
    let mut all = [""; PROVIDER_KEY_HEADERS.len() + GATEWAY_KEY_HEADERS.len()];
    let mut i = 0;
    while i < PROVIDER_KEY_HEADERS.len() {
        all[i] = PROVIDER_KEY_HEADERS[i];
        i += 1;
    }
    let mut j = 0;
    while j < GATEWAY_KEY_HEADERS.len() {
        all[i + j] = GATEWAY_KEY_HEADERS[j];
        j += 1;
    }
    all
};

/// Query parameters that carry credentials somewhere (Google's `key`, and `oauth_token` and
/// `bearer_token` that every Google API's discovery document lists; Azure's `api-key`, Azure API
/// Management's `subscription-key`; OAuth's `access_token`; SigV4 query signing). Stripped from
/// every routed request, whatever the provider, and redacted in telemetry; names are compared
/// leniently ([`crate::inject::query::names_param`]).
pub const CREDENTIAL_QUERY_PARAMS: &[&str] = &[
    "key",
    "api-key",
    "access-token",
    "oauth-token",
    "bearer-token",
    "subscription-key",
    "x-amz-credential",
    "x-amz-signature",
    "x-amz-security-token",
];

/// Headers that choose which of the credential's organizations or projects a call is billed to
/// and runs in (OpenAI's organization and project, Google's quota project): a key that reaches
/// several would otherwise let the agent pick. Removed from every routed request whatever their
/// value, unless the policy pins them (`spec.setHeaders`); not secrets, so not redacted.
pub const SCOPE_HEADERS: &[&str] = &["openai-organization", "openai-project", "x-goog-user-project"];

/// The query form of [`SCOPE_HEADERS`]: Google's `userProject` system parameter (names compared
/// as credential parameters are, so `$userProject` and `user_project` too).
pub const SCOPE_QUERY_PARAMS: &[&str] = &["userproject"];

/// Whether `name` can name a Kubernetes object (a DNS-1123 subdomain: lowercase letters, digits,
/// `-` and `.`, starting and ending with a letter or digit, at most 253 bytes). keyswap puts
/// Secret names in field selectors; the API server refuses a selector with any other name, and
/// a watch it refuses never syncs.
pub fn is_object_name(name: &str) -> bool {
    let b = name.as_bytes();
    let edge = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    b.len() <= 253
        && edge(b.first())
        && edge(b.last())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
}

/// Whether two header names are the same header to a lenient server: ASCII case ignored, and
/// `_` read as `-` (some servers and frameworks fold underscores into dashes).
pub fn same_header(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).all(|(x, y)| {
            let fold = |c: u8| if c == b'_' { b'-' } else { c.to_ascii_lowercase() };
            fold(x) == fold(y)
        })
}

/// Whether telemetry shows `[redacted]` instead of this header's value: every credential header,
/// and cookies.
pub fn is_redacted(lowercase_name: &str) -> bool {
    // Most names have a length no redacted name has: answered without comparing.
    REDACTED_LENGTHS & (1 << (lowercase_name.len() % 64)) != 0
        && (CREDENTIAL_HEADERS.iter().any(|h| same_header(h, lowercase_name))
            || same_header(lowercase_name, "set-cookie"))
}

/// The lengths (modulo 64) of the names [`is_redacted`] redacts, one bit each.
const REDACTED_LENGTHS: u64 = {
    let mut mask = 1 << ("set-cookie".len() % 64);
    let mut i = 0;
    while i < CREDENTIAL_HEADERS.len() {
        mask |= 1 << (CREDENTIAL_HEADERS[i].len() % 64);
        i += 1;
    }
    mask
};

/// What the agent is told to send instead of a key.
pub const PLACEHOLDER: &str = "keyswap-injected-by-proxy";

/// Whether a credential value is the placeholder, with or without an auth scheme in front
/// (`Bearer keyswap-injected-by-proxy`), or a SigV4 signature made with the placeholder as
/// access key id. Empty values carry nothing and count as placeholders.
pub fn is_placeholder(value: &[u8]) -> bool {
    let token = value.rsplit(|&b| b == b' ').next().unwrap_or(value);
    value.is_empty() || token == PLACEHOLDER.as_bytes() || is_placeholder_sigv4(value)
}

fn is_placeholder_sigv4(value: &[u8]) -> bool {
    let Some(rest) = value.strip_prefix(b"AWS4-HMAC-SHA256 ") else { return false };
    let needle = [b"Credential=", PLACEHOLDER.as_bytes(), b"/"].concat();
    rest.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// Who is calling, as a validator established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub agent: Arc<str>,
    pub tenant: Option<Arc<str>>,
    /// The validator's name (`spec.agentAuth.validators[].name`, or its type).
    pub validator: Arc<str>,
    /// A role from a JWT claim (`claimMapping.role`), for attribution.
    pub role: Option<Arc<str>>,
    /// An API key's labels (its Secret's `metadata.labels`, except keyswap's own marker).
    pub labels: Vec<(Box<str>, Box<str>)>,
}

/// gRPC metadata Envoy's tunnel-guard filter sends on each stream (`initial_metadata`).
pub const ROLE_METADATA: &str = "x-keyswap-role";
pub const ROLE_TUNNEL: &str = "tunnel";
/// The role of the observing filter's streams (response bodies, send and go).
pub const ROLE_OBSERVE: &str = "observe";
/// gRPC metadata on a deciding stream: the observing filter runs on this request's route, so
/// response bodies are read there.
pub const OBSERVED_METADATA: &str = "x-keyswap-observed";
/// The dynamic metadata namespace keyswap's deciding filter writes (and the observing filter
/// forwards).
pub const METADATA_NAMESPACE: &str = "keyswap";

/// Fingerprint shown instead of a secret: enough to tell two values apart, useless to an attacker
/// holding logs (for any key with real entropy).
pub fn fingerprint(value: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(value);
    let mut s = String::from("sha256:");
    for b in &digest[..6] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// How many of something are under way (streams, settlements), for a shutdown that waits for
/// them: one atomic add when one starts, one subtract when it ends.
#[derive(Debug, Default)]
pub struct InFlight(std::sync::atomic::AtomicUsize);

impl InFlight {
    pub fn enter(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn leave(&self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Release);
    }

    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until none is under way, or `deadline`: whether none is.
    pub async fn ended(&self, deadline: tokio::time::Instant) -> bool {
        while self.count() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The length filter only skips comparisons: every credential header and cookie is redacted
    /// in any spelling a lenient server folds to it, and names of the same lengths that are not
    /// credentials are not.
    #[test]
    fn every_credential_header_is_redacted_in_every_spelling_and_nothing_else() {
        for name in CREDENTIAL_HEADERS.iter().chain(&["set-cookie"]) {
            assert!(is_redacted(name), "{name}");
            assert!(is_redacted(&name.replace('-', "_")), "{name} with underscores");
        }
        for other in ["accept", "content-type", "user-agent", "x-api-kez", "api_keys", "cookies", "x-request-id", ""] {
            assert!(!is_redacted(other), "{other}");
        }
    }
}

/// Lets a warning through at most once a period: a flood of one refusal (forged tokens, minted
/// budget keys) must not fill the operators' logs. One atomic, no lock.
#[derive(Debug, Default)]
pub struct Seldom(std::sync::atomic::AtomicU64);

impl Seldom {
    /// Whether to log now, `now_s` seconds into some clock, at most once every `period_s`.
    pub fn now(&self, now_s: u64, period_s: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        // Stored one on, so that 0 means never.
        let (last, next) = (self.0.load(Relaxed), now_s.saturating_add(1));
        (last == 0 || next >= last.saturating_add(period_s))
            && self.0.compare_exchange(last, next, Relaxed, Relaxed).is_ok()
    }
}

#[cfg(test)]
mod seldom_tests {
    #[test]
    fn a_flood_of_one_warning_is_logged_once_a_period() {
        let s = super::Seldom::default();
        assert!(s.now(0, 10), "the first");
        assert!(!(1..10).any(|t| s.now(t, 10)), "again within the period");
        assert!(s.now(10, 10) && !s.now(11, 10));
    }
}
