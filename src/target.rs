//! The request target as keyswap judges it: the host an `:authority` names, and whether a path,
//! method and authority are plain enough to carry a real key.
//!
//! Everything here is agent input. Envoy in front normalises paths and refuses some malformed
//! requests, but keyswap does not rely on it: a hand-written Envoy config, a catch-all virtual
//! host or a client speaking gRPC to keyswap directly must not get a key for a target that only
//! looks like a routed one. The rules are strict on purpose; what real SDKs send passes.
//!
//! This module imports nothing of keyswap.

/// Why a request target is refused before any route is consulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The authority is not `host[:port]` (brackets around anything but an IPv6 literal,
    /// userinfo, spaces, a second colon, a bad port, characters a DNS name cannot hold).
    MalformedAuthority,
    /// The path is not an origin-form path keyswap can match unambiguously: dot-segments (also
    /// percent-encoded or behind encoded slashes), backslashes, double encoding, control
    /// characters, a fragment, or no leading `/`.
    MalformedPath,
    /// A method no provider API uses; `TRACE` would echo the injected key back to the agent.
    MethodNotAllowed,
}

impl Refused {
    /// The reason code in the JSON body, the span and the metric.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::MalformedAuthority => "malformed_authority",
            Refused::MalformedPath => "malformed_path",
            Refused::MethodNotAllowed => "method_not_allowed",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Refused::MalformedAuthority | Refused::MalformedPath => 400,
            Refused::MethodNotAllowed => 405,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refused::MalformedAuthority => "the request's host is not a plain host[:port]; keyswap does not forward it",
            Refused::MalformedPath => {
                "the request path has dot-segments, backslashes, double encoding or control characters; keyswap does not forward it with a credential"
            }
            Refused::MethodNotAllowed => "this method is not forwarded with a credential",
        }
    }
}

/// Methods a routed request may use. Everything else (TRACE, TRACK, CONNECT inside the tunnel,
/// WebDAV verbs, inventions) is refused before a key is written.
pub const ALLOWED_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

pub fn check_method(method: &str) -> Result<(), Refused> {
    if ALLOWED_METHODS.contains(&method) {
        Ok(())
    } else {
        Err(Refused::MethodNotAllowed)
    }
}

/// Headers by which some APIs (Google's among them) let a request stand for another method.
pub const METHOD_OVERRIDE_HEADERS: &[&str] = &["x-http-method-override", "x-http-method", "x-method-override"];

/// Headers some servers (IIS, Symfony and Zend behind a proxy) serve instead of the request's path:
/// the upstream would answer a path other than the one a route's `endpoints` matched. A request
/// that carries one is refused as a malformed path.
pub const PATH_OVERRIDE_HEADERS: &[&str] = &["x-original-url", "x-rewrite-url"];

/// Whether `name` is one of [`PATH_OVERRIDE_HEADERS`] (in any spelling a lenient server folds).
pub fn is_path_override(name: &str) -> bool {
    PATH_OVERRIDE_HEADERS.iter().any(|n| crate::vocab::same_header(n, name))
}

/// Whether `name` is one of [`METHOD_OVERRIDE_HEADERS`].
pub fn is_method_override(name: &str) -> bool {
    METHOD_OVERRIDE_HEADERS.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Whether `method` (any case) creates something upstream: POST, PUT or PATCH.
pub fn creates(method: &str) -> bool {
    ["POST", "PUT", "PATCH"].iter().any(|m| m.eq_ignore_ascii_case(method))
}

/// [`check_method`], and every method an override header names (`overrides`: the values of
/// [`METHOD_OVERRIDE_HEADERS`] the request carries): an upstream that honours the override acts
/// on that method, so `POST` with `X-HTTP-Method-Override: TRACE` is refused like `TRACE`. An
/// override is read as a lenient server would (surrounding space, any case); anything that is
/// not one allowed method (a list, bytes that are not text) is refused.
///
/// `Ok(creates)`: whether the request [`creates`] by its own method or by an override (a server
/// that honours the override creates, one that ignores it acts on the method: either counts).
pub fn check_methods<'a>(method: &str, overrides: impl Iterator<Item = &'a [u8]>) -> Result<bool, Refused> {
    check_method(method)?;
    let mut creating = creates(method);
    for value in overrides {
        let named = std::str::from_utf8(value).map(str::trim).unwrap_or("");
        if !ALLOWED_METHODS.iter().any(|m| m.eq_ignore_ascii_case(named)) {
            return Err(Refused::MethodNotAllowed);
        }
        creating |= creates(named);
    }
    Ok(creating)
}

/// The lowercase host named by `authority` (`host`, `host:port`, `[v6]`, `[v6]:port`; a trailing
/// dot dropped), or `MalformedAuthority`. Allocates nothing for hosts that fit `buf`.
pub fn host<'a>(authority: &'a str, buf: &'a mut [u8; 256]) -> Result<&'a str, Refused> {
    let bad = Err(Refused::MalformedAuthority);
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else { return bad };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return bad;
        }
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return bad,
            },
        };
        (v6, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u16>().is_err() {
            return bad;
        }
    }
    if authority.starts_with('[') {
        return Ok(host);
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if !is_dns_name(host) {
        return bad;
    }
    if !host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Ok(host);
    }
    let out = &mut buf[..host.len()];
    out.copy_from_slice(host.as_bytes());
    out.make_ascii_lowercase();
    // ASCII only (checked above).
    Ok(std::str::from_utf8(out).unwrap_or(host))
}

/// The port `authority` names (`host:port`, `[v6]:port`), if it names one.
pub fn port(authority: &str) -> Option<u16> {
    let after_host = match authority.strip_prefix('[') {
        Some(rest) => rest.split_once(']')?.1,
        None => authority.split_once(':').map_or("", |(_, p)| p),
    };
    let digits = after_host.strip_prefix(':').unwrap_or(after_host);
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// Letters, digits, `-` and `_` in dot-separated labels of 1–63 bytes, at most 253 in all
/// (an IPv4 literal is such a name too).
pub fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Whether the query parameter `raw_name` (as sent) names the credential parameter `strip`, the
/// way a lenient server might read it: percent-decoded, `+` as space, ASCII case ignored, and
/// every byte that is not a letter or digit ignored (`API_KEY`, `api-key`, `apiKey`, `key[]`,
/// `%6Bey`, `key%00` all name `api-key` or `key`).
pub fn names_param(raw_name: &str, strip: &str) -> bool {
    // Compared as canonical byte streams, without a copy: decoding `+` to a space and invalid
    // UTF-8 to U+FFFD changes only bytes the comparison ignores (not ASCII letters or digits).
    fn canon(bytes: impl Iterator<Item = u8>) -> impl Iterator<Item = u8> {
        bytes.filter(u8::is_ascii_alphanumeric).map(|b| b.to_ascii_lowercase())
    }
    !strip.is_empty() && canon(percent_encoding::percent_decode(raw_name.as_bytes())).eq(canon(strip.bytes()))
}

/// The values, percent-decoded, of every parameter of `path`'s query that names `name` as
/// leniently as a credential name ([`names_param`]; `name` in its canonical form: lowercase
/// letters and digits). Allocates nothing for a query without one.
pub fn param_values<'a>(path: &'a str, name: &'a str) -> impl Iterator<Item = Vec<u8>> + 'a {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    params(query)
        .filter_map(|p| p.split_once('=').or(Some((p, ""))))
        .filter(move |(n, _)| names_param(n, name))
        .map(|(_, value)| percent_encoding::percent_decode(value.replace('+', " ").as_bytes()).collect())
}

/// The parameters of a query: split on `&` and on `;` (which some servers also treat as a
/// separator, so `a=1;key=x` carries a `key`).
pub fn params(query: &str) -> impl Iterator<Item = &str> {
    query.split(['&', ';'])
}

/// `path` (without its query and fragment) as the most lenient router reads it: percent-decoded
/// (`%2F` too), lowercased, each segment's `;parameters` cut off, empty and `.` segments dropped,
/// `..` applied, no trailing `/`. Every decision that classifies a request by its path reads this
/// form (route `endpoints`, unmetered APIs, usage formats), so `/v1/Chat/Completions/` or
/// `/v1/chat%2Fcompletions` is what a provider that reads it so takes it for. Borrowed when the
/// path is that already (no allocation for lowercase, unencoded paths; Gemini's `:generateContent`
/// and Bedrock's encoded ARNs take one).
pub fn canonical_path(path: &str) -> std::borrow::Cow<'_, str> {
    CanonicalPath::of(path).0
}

/// A request's path in [`canonical_path`]'s form, the one every path decision reads. Made once per
/// request and passed along: the form is not idempotent (`%252F` decodes once to `%2F`, and again
/// to `/`), so a decision must never canonicalize what another already did, and these types say
/// which form each one takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalPath<'a>(std::borrow::Cow<'a, str>);

impl std::ops::Deref for CanonicalPath<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'a> CanonicalPath<'a> {
    /// `path` as sent (query and fragment allowed; they are cut off).
    pub fn of(path: &'a str) -> Self {
        CanonicalPath(canonical_form(path))
    }
}

fn canonical_form(path: &str) -> std::borrow::Cow<'_, str> {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let plain = path.starts_with('/')
        && !path.bytes().any(|b| b.is_ascii_uppercase() || matches!(b, b'%' | b';'))
        && !path.contains("//")
        && !path.contains("/.")
        && (path.len() == 1 || !path.ends_with('/'));
    if plain {
        return std::borrow::Cow::Borrowed(path);
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy().to_ascii_lowercase();
    let mut segments: Vec<&str> = Vec::new();
    for s in decoded.split('/').map(|s| s.split(';').next().unwrap_or(s)) {
        match s {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    std::borrow::Cow::Owned(format!("/{}", segments.join("/")))
}

/// Whether `path` (the `:path` pseudo-header, query included) is safe to match and forward with a
/// key. Checks the part before `?`: it starts with `/`; it holds only visible ASCII; decoded once,
/// it has no `.` or `..` segment (with `/` or an encoded `%2F` around it), no backslash and no
/// NUL; and it is not encoded twice (`%252e`). Encoded slashes themselves are allowed: Bedrock
/// model ids that are ARNs travel as `…inference-profile%2F…`.
pub fn check_path(path: &str) -> Result<(), Refused> {
    let bad = Err(Refused::MalformedPath);
    let raw = path.split_once('?').map_or(path, |(p, _)| p);
    if !raw.starts_with('/') || raw.bytes().any(|b| !(0x21..0x7f).contains(&b) || b == b'#' || b == b'\\') {
        return bad;
    }
    if !raw.contains('%') && !raw.contains("/.") {
        return Ok(()); // the common case: nothing to decode, no dot-segment possible
    }
    let decoded = percent_encoding::percent_decode_str(raw).collect::<Vec<u8>>();
    // Control bytes too: a server that trims them (Java's `String.trim`) reads `..%0b` as `..`.
    if decoded.iter().any(|&b| b == b'\\' || b < 0x20 || b == 0x7f) {
        return bad;
    }
    // Encoded twice: a server that decodes again would see `.`, `/`, `\` or `%`.
    if decoded.windows(3).any(|w| w[0] == b'%' && matches!(hex_pair(w[1], w[2]), Some(b'.' | b'/' | b'\\' | b'%'))) {
        return bad;
    }
    // A dot-segment also as servers that cut path parameters (`..;x`) or trailing spaces read it.
    let dots = |seg: &[u8]| {
        let core = seg.split(|&b| b == b';').next().unwrap_or(seg);
        let core = core.trim_ascii_end();
        core == b"." || core == b".."
    };
    if decoded.split(|&b| b == b'/').any(dots) {
        return bad;
    }
    Ok(())
}

fn hex_pair(a: u8, b: u8) -> Option<u8> {
    let h = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    Some(h(a)? << 4 | h(b)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(a: &str) -> Result<String, Refused> {
        let mut b = [0u8; 256];
        host(a, &mut b).map(str::to_owned)
    }

    #[test]
    fn plain_authorities_name_their_lowercase_host() {
        assert_eq!(h("api.openai.com").unwrap(), "api.openai.com");
        assert_eq!(h("API.OpenAI.com:443").unwrap(), "api.openai.com");
        assert_eq!(h("api.anthropic.com.").unwrap(), "api.anthropic.com");
        assert_eq!(h("[::1]:8080").unwrap(), "::1");
        assert_eq!(h("[2001:db8::1]").unwrap(), "2001:db8::1");
        assert_eq!(h("10.0.0.1:80").unwrap(), "10.0.0.1");
    }

    #[test]
    fn an_authority_names_its_port_or_none() {
        assert_eq!(port("api.openai.com"), None);
        assert_eq!(port("api.openai.com:8443"), Some(8443));
        assert_eq!(port("[::1]:22"), Some(22));
        assert_eq!(port("[::1]"), None);
        assert_eq!(port("api.openai.com:99999"), None);
        assert_eq!(port("api.openai.com:+1"), None);
    }

    #[test]
    fn bracket_and_userinfo_tricks_are_malformed() {
        for a in [
            "[api.anthropic.com].evil.example",
            "[api.anthropic.com",
            "[api.anthropic.com]",
            "[::1].evil",
            "[::1]x",
            "api.anthropic.com]",
            "user@api.anthropic.com",
            "api.anthropic.com:443:1",
            "api.anthropic.com:",
            "api.anthropic.com:99999",
            "api.anthropic.com:+443",
            "api.anthropic.com evil",
            "api.anthropic.com\t",
            "api..anthropic.com",
            ".api.anthropic.com",
            "api.anthropic.com..",
            "",
            ":443",
            "api.anthropic.com/x",
            "api.anthropic.com\\x",
            "api.anthropic.com%2e",
            "ápi.anthropic.com",
            "*.openai.azure.com",
        ] {
            assert_eq!(h(a), Err(Refused::MalformedAuthority), "{a:?}");
        }
    }

    #[test]
    fn dot_segments_are_refused_however_they_are_spelled() {
        for p in [
            "/v1/../admin",
            "/v1/./messages",
            "/v1/..",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2E/admin",
            "/v1/.%2e/admin",
            "/v1/x%2F..%2Fadmin",
            "/v1/x%2f..%2fadmin",
            "/v1%2F..%2F..%2Fadmin",
            "/v1/%252e%252e/admin",
            "/v1/x%252Fy",
            "/v1\\..\\admin",
            "/v1/%5c../admin",
            "/v1/%00/messages",
            "/v1/messages#frag",
            "v1/messages",
            "*",
            "/v1/mess ages",
            "/v1/messages\u{7f}",
            "/models/gemini-pro/../gemini-ultra:generateContent",
        ] {
            assert_eq!(check_path(p), Err(Refused::MalformedPath), "{p:?}");
        }
    }

    #[test]
    fn what_sdks_send_passes() {
        for p in [
            "/v1/messages",
            "/v1/chat/completions?x=../y",
            "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse",
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.anthropic.claude/converse",
            "/v1beta/models/gemini-2.5-pro:generateContent?key=x",
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            "/v1/files/file-abc.jsonl",
            "/.well-known/x",
            "/v1/...",
        ] {
            assert_eq!(check_path(p), Ok(()), "{p:?}");
        }
    }

    #[test]
    fn only_provider_methods_get_a_key() {
        for m in ALLOWED_METHODS {
            assert!(check_method(m).is_ok());
        }
        for m in ["TRACE", "TRACK", "CONNECT", "PROPFIND", "get", "DEBUG", ""] {
            assert_eq!(check_method(m), Err(Refused::MethodNotAllowed), "{m}");
        }
    }

    #[test]
    fn a_method_override_naming_a_refused_method_is_refused_like_the_method() {
        let none: [&[u8]; 0] = [];
        assert_eq!(check_methods("POST", none.into_iter()), Ok(true));
        assert_eq!(check_methods("GET", none.into_iter()), Ok(false));
        for ok in [&b"PATCH"[..], b" delete ", b"Get"] {
            assert_eq!(check_methods("POST", [ok].into_iter()), Ok(true), "{ok:?}");
        }
        // A GET or DELETE whose override names a creating method creates, in any case.
        assert_eq!(check_methods("GET", [&b" post "[..]].into_iter()), Ok(true));
        assert_eq!(check_methods("DELETE", [&b"Put"[..]].into_iter()), Ok(true));
        assert_eq!(check_methods("GET", [&b"DELETE"[..]].into_iter()), Ok(false));
        assert!(creates("patch") && !creates("OPTIONS"));
        for bad in [&b"TRACE"[..], b"trace", b" TRACK", b"PATCH, TRACE", b"PROPFIND", b"", b"\xffGET", b"CONNECT"] {
            assert_eq!(check_methods("POST", [bad].into_iter()), Err(Refused::MethodNotAllowed), "{bad:?}");
        }
        // Every override must pass, not just the first.
        assert_eq!(check_methods("POST", [&b"PATCH"[..], b"TRACE"].into_iter()), Err(Refused::MethodNotAllowed));
        assert!(is_method_override("X-HTTP-Method-Override") && is_method_override("x-method-override"));
        assert!(!is_method_override("x-http-method-overrides"));
    }

    /// A server that cuts `;` path parameters (Tomcat, Spring) or trailing spaces off a segment
    /// reads these as `..`; Envoy's RFC 3986 normalisation does not.
    #[test]
    fn a_path_parameter_or_a_trailing_space_cannot_hide_a_dot_segment() {
        for bad in [
            "/v1beta/models/gemini-allowed/..;/gemini-other:generateContent",
            "/v1beta/models/gemini-allowed/%2e%2e;x=1/gemini-other:generateContent",
            "/v1beta/models/gemini-allowed/..%20/gemini-other:generateContent",
            "/v1/messages/.;/x",
            "/v1beta/models/gemini-allowed/..%0b/gemini-other:generateContent",
            "/v1beta/models/gemini-allowed/..%1f;x/gemini-other:generateContent",
        ] {
            assert_eq!(check_path(bad), Err(Refused::MalformedPath), "{bad}");
        }
        for ok in ["/v1/messages", "/a;b/c", "/v1/files/a..b", "/model/x.y/converse"] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
    }
}
