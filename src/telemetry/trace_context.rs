//! W3C Trace Context: the agent's `traceparent` and `tracestate` read, and the random ids of
//! the spans and traces keyswap starts.

use std::cell::Cell;
use std::time::SystemTime;

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// An agent's `traceparent`, when valid (W3C Trace Context, version 00): trace id, parent span
/// id, trace flags.
pub fn parse_traceparent(v: &str) -> Option<(TraceId, SpanId, u8)> {
    let mut parts = v.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let mut t = [0u8; 16];
    let mut s = [0u8; 8];
    let mut f = [0u8; 1];
    (from_hex(version, &mut [0u8; 1]) && from_hex(trace, &mut t) && from_hex(span, &mut s) && from_hex(flags, &mut f))
        .then_some(())?;
    (t != [0; 16] && s != [0; 8]).then_some((t, s, f[0]))
}

/// Lowercase hex only, as W3C Trace Context requires.
fn from_hex(s: &str, out: &mut [u8]) -> bool {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    if s.len() != out.len() * 2 {
        return false;
    }
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => *o = h << 4 | l,
            _ => return false,
        }
    }
    true
}

pub(super) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
}

/// A `tracestate` worth forwarding into the span: W3C's size limit, printable ASCII, `key=value`
/// members.
pub(super) fn valid_tracestate(v: &str) -> bool {
    v.len() <= 512
        && v.bytes().all(|b| (0x20..0x7f).contains(&b))
        && v.split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .all(|m| m.split_once('=').is_some_and(|(k, _)| !k.is_empty()))
}

/// Random ids for spans and traces: SplitMix64 per thread, seeded from the standard library's
/// per-process random keys. Unique, not secret.
fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher as _, Hasher as _};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos());
            h.finish()
        });
    }
    STATE.with(|s| {
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A random trace id (what a root span gets).
pub fn random_trace_id() -> TraceId {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&nonzero_random().to_be_bytes());
    t[8..].copy_from_slice(&random_u64().to_be_bytes());
    t
}

pub(super) fn nonzero_random() -> u64 {
    loop {
        let v = random_u64();
        if v != 0 {
            return v;
        }
    }
}

/// The `traceparent` (version 00) of a span keyswap starts, sent on upstream.
pub(super) fn traceparent(trace_id: &TraceId, span_id: &SpanId, flags: u8) -> String {
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    push_hex(&mut out, trace_id);
    out.push('-');
    push_hex(&mut out, span_id);
    out.push('-');
    push_hex(&mut out, &[flags]);
    out
}
