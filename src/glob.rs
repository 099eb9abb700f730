//! `*` globs for hosts, endpoints and models.
//!
//! `*` matches any run of bytes; with `stop` set it never crosses that byte, so the host
//! pattern `*.openai.azure.com` covers exactly one DNS label, as a TLS wildcard does.

/// Whether `text` matches `pattern`. Iterative with single backtracking point: linear in
/// practice and never recursive, so hostile input cannot blow the stack.
pub fn matches(pattern: &str, text: &str, stop: Option<u8>) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            // Let the last `*` swallow one more byte, unless that byte is the stop byte.
            if Some(t[st]) == stop {
                return false;
            }
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Whether `pattern` contains a wildcard.
pub fn is_pattern(pattern: &str) -> bool {
    pattern.contains('*')
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn host_wildcards_cover_one_label() {
        let dot = Some(b'.');
        assert!(matches("*.openai.azure.com", "myres.openai.azure.com", dot));
        assert!(!matches("*.openai.azure.com", "a.b.openai.azure.com", dot));
        assert!(!matches("*.openai.azure.com", "openai.azure.com", dot));
        assert!(matches("bedrock-runtime.*.amazonaws.com", "bedrock-runtime.us-east-1.amazonaws.com", dot));
        assert!(!matches("bedrock-runtime.*.amazonaws.com", "bedrock-runtime.evil.com.amazonaws.com", dot));
        assert!(matches("api.openai.com", "api.openai.com", dot));
        assert!(!matches("api.openai.com", "api.openai.com.evil", dot));
    }

    #[test]
    fn path_and_model_wildcards_cover_anything() {
        assert!(matches("/v1/*", "/v1/chat/completions", None));
        assert!(matches("claude-*", "claude-sonnet-4-5", None));
        assert!(matches("*", "", None));
        assert!(!matches("gpt-4o", "gpt-4o-mini", None));
        assert!(matches("gpt-4o*", "gpt-4o-mini", None));
        assert!(matches("*:generateContent", "/v1/models/x:generateContent", None));
        assert!(matches("a*b*c", "axxbyyc", None));
        assert!(!matches("a*b*c", "axxbyy", None));
    }
}
