//! Body capture for spans: the first `max_bytes` of a body, with every live secret value
//! replaced before anything is encoded.

use base64::Engine as _;

pub use crate::config::snapshot::{CapturePolicy, DEFAULT_CONTENT_TYPES, DEFAULT_MAX_BYTES};
pub use crate::scrub::{scrub, REDACTED};

/// One direction's captured bytes.
#[derive(Debug, Default)]
pub struct Capture {
    buf: Vec<u8>,
    max: usize,
    /// Every byte seen, captured or not.
    pub total: usize,
}

/// A finished capture, ready for a span event.
#[derive(Debug, PartialEq, Eq)]
pub struct Captured {
    pub base64: String,
    pub original_length: usize,
    pub truncated: bool,
    /// The captured bytes, scrubbed (what `base64` encodes).
    pub bytes: Vec<u8>,
}

impl Capture {
    pub fn new(max: usize) -> Self {
        Capture { buf: Vec::new(), max, total: 0 }
    }

    /// The bytes it holds.
    pub fn heap_bytes(&self) -> usize {
        self.buf.capacity()
    }

    /// The raw captured bytes (for parsing, never for export).
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len();
        let room = self.max.saturating_sub(self.buf.len());
        if room > 0 {
            self.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
    }

    /// Scrubs `secrets` out of the captured bytes and encodes them. A secret cut by the
    /// capture limit is scrubbed too: a trailing prefix of a secret (4+ bytes) is replaced.
    pub fn finish(mut self, secrets: &[&[u8]]) -> Captured {
        let truncated = self.total > self.buf.len();
        scrub(&mut self.buf, secrets, truncated);
        Captured {
            base64: base64::engine::general_purpose::STANDARD.encode(&self.buf),
            original_length: self.total,
            truncated,
            bytes: self.buf,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(c: &Captured) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(&c.base64).unwrap()
    }

    #[test]
    fn captures_the_first_max_bytes_and_flags_truncation() {
        let mut c = Capture::new(10);
        c.push(b"0123456");
        c.push(b"789abcdef");
        let done = c.finish(&[]);
        assert_eq!(decode(&done), b"0123456789");
        assert_eq!((done.original_length, done.truncated), (16, true));
        let mut c = Capture::new(10);
        c.push(b"short");
        let done = c.finish(&[]);
        assert_eq!((decode(&done), done.truncated), (b"short".to_vec(), false));
    }

    #[test]
    fn secrets_are_scrubbed_everywhere_even_when_cut_by_the_limit() {
        let mut c = Capture::new(1000);
        c.push(br#"{"echo":"sk-live-123","again":"sk-live-123"}"#);
        assert_eq!(decode(&c.finish(&[b"sk-live-123"])), br#"{"echo":"[redacted]","again":"[redacted]"}"#);
        let mut c = Capture::new(14);
        c.push(b"key: sk-live-123 tail");
        let out = decode(&c.finish(&[b"sk-live-123"]));
        assert_eq!(out, b"key: [redacted]");
        assert!(!String::from_utf8_lossy(&out).contains("sk-li"));
    }

    #[test]
    fn content_type_prefixes_select_bodies() {
        let p = CapturePolicy::default();
        assert!(p.wants("application/json; charset=utf-8"));
        assert!(p.wants("Text/Event-Stream"));
        assert!(!p.wants("image/png"));
        assert!(!CapturePolicy { max_bytes: 0, ..p }.wants("application/json"));
    }
}
