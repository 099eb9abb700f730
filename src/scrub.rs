//! Scrubbing live secret values out of bytes: captured bodies (telemetry), and responses on their
//! way back to the agent (headers always, bodies where a route asks for it). Imports nothing of
//! keyswap.

/// What a secret value becomes.
pub const REDACTED: &[u8] = b"[redacted]";

/// Replaces every occurrence of each secret in `buf` with [`REDACTED`].
/// Returns how many occurrences were replaced.
pub fn scrub(buf: &mut Vec<u8>, secrets: &[&[u8]], cut_at_end: bool) -> usize {
    let mut replaced = 0;
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        let mut from = 0;
        while let Some(pos) = find(&buf[from..], secret) {
            let at = from + pos;
            buf.splice(at..at + secret.len(), REDACTED.iter().copied());
            from = at + REDACTED.len();
            replaced += 1;
        }
        if cut_at_end {
            // The capture may end inside a secret: drop a trailing prefix of it.
            let longest = (4..secret.len().min(buf.len() + 1)).rev().find(|&n| buf.ends_with(&secret[..n]));
            if let Some(n) = longest {
                let at = buf.len() - n;
                buf.truncate(at);
                buf.extend_from_slice(REDACTED);
            }
        }
    }
    replaced
}

/// Whether `haystack` contains `needle` (non-empty).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && find(haystack, needle).is_some()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > haystack.len() {
        return None;
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= haystack.len() {
        match haystack[i..=haystack.len() - needle.len()].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &haystack[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

/// Scrubs a body that arrives in chunks, where a secret may be split across two of them: the
/// tail of each chunk that could be the start of a secret is held back and prepended to the next.
/// At most the longest secret's length minus one byte is ever held.
#[derive(Debug, Default)]
pub struct Streaming {
    held: Vec<u8>,
    /// Secrets replaced so far.
    pub scrubbed: usize,
}

impl Streaming {
    /// The bytes to send on for `chunk` (the last when `end`). `None`: send the chunk unchanged
    /// (nothing held, nothing found: the common case, no allocation).
    pub fn chunk(&mut self, chunk: &[u8], end: bool, secrets: &[&[u8]]) -> Option<Vec<u8>> {
        let live = || secrets.iter().filter(|s| !s.is_empty());
        if self.held.is_empty() && !live().any(|s| contains(chunk, s)) && (end || held_len(chunk, secrets) == 0) {
            return None;
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        self.scrubbed += scrub(&mut buf, secrets, false);
        if !end {
            let keep = held_len(&buf, secrets);
            self.held = buf.split_off(buf.len() - keep);
        }
        Some(buf)
    }
}

/// How many trailing bytes of `buf` are a proper prefix of some secret.
fn held_len(buf: &[u8], secrets: &[&[u8]]) -> usize {
    secrets
        .iter()
        .filter(|s| s.len() > 1)
        .filter_map(|s| {
            let max = (s.len() - 1).min(buf.len());
            (1..=max).rev().find(|&n| buf[buf.len() - n] == s[0] && buf.ends_with(&s[..n]))
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_split_across_chunks_is_scrubbed_whatever_the_boundaries() {
        let secret: &[u8] = b"sk-REAL-0001";
        let body = b"data: {\"echo\":\"sk-REAL-0001\", \"again\": \"sk-REAL-0001\"} sk-";
        for size in 1..body.len() {
            let mut s = Streaming::default();
            let mut out = Vec::new();
            let chunks: Vec<&[u8]> = body.chunks(size).collect();
            for (i, c) in chunks.iter().enumerate() {
                let end = i + 1 == chunks.len();
                match s.chunk(c, end, &[secret]) {
                    Some(b) => out.extend_from_slice(&b),
                    None => out.extend_from_slice(c),
                }
            }
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("sk-REAL-0001"), "size {size}: {text}");
            assert_eq!(text, "data: {\"echo\":\"[redacted]\", \"again\": \"[redacted]\"} sk-", "size {size}");
        }
    }

    #[test]
    fn clean_chunks_pass_untouched() {
        let mut s = Streaming::default();
        assert_eq!(s.chunk(b"hello world", false, &[b"sk-REAL"]), None);
        assert_eq!(s.chunk(b"", true, &[b"sk-REAL"]), None);
    }
}
