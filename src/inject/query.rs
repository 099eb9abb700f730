//! Query-parameter credentials: Envoy has no query mutation, so keyswap rewrites `:path`.

use std::borrow::Cow;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

// The query reader is vocabulary (`target`): the provider registry reads parameters with it too.
pub use crate::target::{names_param, param_values, params};

/// RFC 3986 unreserved characters stay; everything else is percent-encoded.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

pub fn encode_value(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(s) => utf8_percent_encode(s, QUERY_VALUE).to_string(),
        Err(_) => percent_encoding::percent_encode(value, QUERY_VALUE).to_string(),
    }
}

/// The result of rewriting one path.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// The new `:path`, when it differs from the old one.
    pub path: Option<String>,
    /// Credential parameters the agent sent with a value other than the placeholder.
    pub smuggled: usize,
}

/// The methods a request's query names for it to stand for (Google's `$httpMethod` system
/// parameter, the query form of `X-HTTP-Method-Override`), read as leniently as a credential
/// name ([`names_param`]: `%24httpMethod`, `http_method`), percent-decoded. Empty (no
/// allocation) for a query without one.
pub fn method_overrides(path: &str) -> Vec<Vec<u8>> {
    param_values(path, "httpmethod").collect()
}

/// Removes every parameter named in `strip` (compared by [`names_param`], so `%6Bey`, `KEY` and
/// `api_key` are caught too) and, when `set` is given, writes it where the first removed
/// occurrence stood, or at the end. Parameters named in `drop` are removed too, but are no
/// credential (the agent's `userProject`): never counted as smuggled. Other parameters keep
/// their bytes and order (joined by `&`).
pub fn rewrite(
    path: &str,
    strip: &[Box<str>],
    drop: &[&str],
    set: Option<(&str, &[u8])>,
    is_placeholder: impl Fn(&str) -> bool,
) -> Rewrite {
    let (base, query) = match path.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (path, None),
    };
    let mut out = Rewrite::default();
    let mut kept: Vec<Cow<'_, str>> = Vec::new();
    let mut placed = false;
    let mut changed = false;
    for segment in query.into_iter().flat_map(params) {
        let (raw_name, raw_value) = segment.split_once('=').unwrap_or((segment, ""));
        if drop.iter().any(|d| names_param(raw_name, d)) {
            changed = true;
            continue;
        }
        if strip.iter().any(|s| names_param(raw_name, s)) {
            changed = true;
            if !raw_value.is_empty() && !is_placeholder(&decode(raw_value)) {
                out.smuggled += 1;
            }
            if let (Some((param, value)), false) = (set, placed) {
                kept.push(Cow::Owned(param_segment(param, value)));
                placed = true;
            }
            continue;
        }
        kept.push(Cow::Borrowed(segment));
    }
    if let (Some((param, value)), false) = (set, placed) {
        kept.push(Cow::Owned(param_segment(param, value)));
        changed = true;
    }
    if changed {
        let mut p = String::with_capacity(path.len() + 64);
        p.push_str(base);
        if !kept.is_empty() {
            p.push('?');
            for (i, k) in kept.iter().enumerate() {
                if i > 0 {
                    p.push('&');
                }
                p.push_str(k);
            }
        }
        out.path = Some(p);
    }
    out
}

/// `path` with the values of the named parameters replaced by `[redacted]`, for telemetry.
pub fn redact<'a>(path: &'a str, names: &[Box<str>]) -> Cow<'a, str> {
    let Some((base, query)) = path.split_once('?') else { return Cow::Borrowed(path) };
    let mut hit = false;
    let parts: Vec<Cow<'_, str>> = params(query)
        .map(|seg| {
            let (raw_name, _) = seg.split_once('=').unwrap_or((seg, ""));
            if names.iter().any(|n| names_param(raw_name, n)) {
                hit = true;
                Cow::Owned(format!("{raw_name}=[redacted]"))
            } else {
                Cow::Borrowed(seg)
            }
        })
        .collect();
    if !hit {
        return Cow::Borrowed(path);
    }
    Cow::Owned(format!("{base}?{}", parts.join("&")))
}

fn param_segment(param: &str, encoded_value: &[u8]) -> String {
    let mut s = encode_value(param.as_bytes());
    s.push('=');
    // The value was encoded at compile time: it is ASCII.
    s.push_str(std::str::from_utf8(encoded_value).unwrap_or_default());
    s
}

fn decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let plus = s.replace('+', " ");
    Cow::Owned(percent_decode_str(&plus).decode_utf8_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Google's `$httpMethod` system parameter, in the spellings a lenient server reads.
    #[test]
    fn the_query_can_name_a_method_override_in_any_spelling() {
        assert_eq!(method_overrides("/x?alt=sse&%24httpMethod=GET+"), vec![b"GET ".to_vec()]);
        assert_eq!(method_overrides("/x?$http_method=post;$HTTPMETHOD"), vec![b"post".to_vec(), Vec::new()]);
        assert!(method_overrides("/x?alt=sse&method=x").is_empty() && method_overrides("/x").is_empty());
    }

    fn strip(names: &[&str]) -> Vec<Box<str>> {
        names.iter().map(|n| Box::from(*n)).collect()
    }

    fn ph(v: &str) -> bool {
        v == crate::provider::PLACEHOLDER
    }

    #[test]
    fn existing_parameter_is_replaced_in_place_and_others_keep_their_bytes() {
        let r = rewrite(
            "/v1beta/models/g:generateContent?alt=sse&key=keyswap-injected-by-proxy&q=a%20b+c",
            &strip(&["key"]),
            &[],
            Some(("key", encode_value(b"AIza real/+=").as_bytes())),
            ph,
        );
        assert_eq!(
            r.path.as_deref(),
            Some("/v1beta/models/g:generateContent?alt=sse&key=AIza%20real%2F%2B%3D&q=a%20b+c")
        );
        assert_eq!(r.smuggled, 0);
    }

    #[test]
    fn every_occurrence_and_disguise_is_removed() {
        let r = rewrite("/p?key=a&x=1&%6Bey=b&KEY=c&key", &strip(&["key"]), &[], Some(("key", b"R")), ph);
        assert_eq!(r.path.as_deref(), Some("/p?key=R&x=1"));
        assert_eq!(r.smuggled, 3);
    }

    #[test]
    fn lenient_spellings_of_the_parameter_are_removed() {
        let r = rewrite(
            "/p?api_key=a&API-KEY=b&apiKey=c&api%2Dkey=d&api-key%00=e&api-key[]=f&x=1;api.key=g&api+key=h",
            &strip(&["api-key"]),
            &[],
            Some(("api-key", b"R")),
            ph,
        );
        assert_eq!(r.path.as_deref(), Some("/p?api-key=R&x=1"));
        assert_eq!(r.smuggled, 8);
        assert_eq!(rewrite("/p?keys=1&monkey=2", &strip(&["key"]), &[], None, ph), Rewrite::default());
    }

    #[test]
    fn redaction_hides_credential_values_only() {
        assert_eq!(redact("/p?a=1&key=sk-x&%6Bey=y", &strip(&["key"])), "/p?a=1&key=[redacted]&%6Bey=[redacted]");
        assert_eq!(redact("/p?a=1", &strip(&["key"])), "/p?a=1");
    }

    #[test]
    fn absent_parameter_is_appended() {
        let r = rewrite("/p", &strip(&["key"]), &[], Some(("key", b"R")), ph);
        assert_eq!(r.path.as_deref(), Some("/p?key=R"));
        let r = rewrite("/p?a=1", &strip(&["key"]), &[], Some(("key", b"R")), ph);
        assert_eq!(r.path.as_deref(), Some("/p?a=1&key=R"));
    }

    #[test]
    fn scope_parameters_are_dropped_but_not_called_smuggled() {
        let drop = crate::vocab::SCOPE_QUERY_PARAMS;
        let r = rewrite("/p?userProject=other&a=1&$userProject=x&user_project=y", &strip(&["key"]), drop, None, ph);
        assert_eq!(r.path.as_deref(), Some("/p?a=1"));
        assert_eq!(r.smuggled, 0);
        assert_eq!(rewrite("/p?project=1", &strip(&["key"]), drop, None, ph), Rewrite::default());
    }

    #[test]
    fn strip_only_leaves_clean_paths_alone() {
        assert_eq!(rewrite("/p?a=1&b=2", &strip(&["key"]), &[], None, ph), Rewrite::default());
        let r = rewrite("/p?key=stolen", &strip(&["key"]), &[], None, ph);
        assert_eq!(r.path.as_deref(), Some("/p"));
        assert_eq!(r.smuggled, 1);
    }
}
