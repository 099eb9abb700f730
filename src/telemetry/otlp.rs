//! OTLP protobuf, written directly: a span is encoded field by field into one buffer while the
//! transaction runs, and a batch of encoded spans becomes an `ExportTraceServiceRequest` by
//! prefixing the resource and scope. No intermediate span structs, no per-attribute allocation.
//!
//! Field numbers are those of `opentelemetry/proto/{trace,common,resource}/v1/*.proto` and
//! `collector/trace/v1/trace_service.proto`; tests decode the output with `opentelemetry-proto`.

use prost::encoding::{encoded_len_varint, WireType};

/// A varint appended to a `Vec` (prost's `BufMut` path checks capacity per byte).
#[inline]
fn encode_varint(mut v: u64, buf: &mut Vec<u8>) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

#[inline]
fn encode_key(field: u32, wire_type: WireType, buf: &mut Vec<u8>) {
    encode_varint(u64::from(field << 3 | wire_type as u32), buf);
}

pub mod span {
    pub const TRACE_ID: u32 = 1;
    pub const SPAN_ID: u32 = 2;
    pub const TRACE_STATE: u32 = 3;
    pub const PARENT_SPAN_ID: u32 = 4;
    pub const NAME: u32 = 5;
    pub const KIND: u32 = 6;
    pub const START: u32 = 7;
    pub const END: u32 = 8;
    pub const ATTRIBUTES: u32 = 9;
    pub const EVENTS: u32 = 11;
    pub const STATUS: u32 = 15;
    pub const FLAGS: u32 = 16;
    pub const KIND_CLIENT: u64 = 3;
    /// `SpanFlags`: the low byte is the W3C trace flags; these say whether the parent is remote.
    pub const FLAGS_HAS_IS_REMOTE: u32 = 0x100;
    pub const FLAGS_IS_REMOTE: u32 = 0x200;
}

pub mod event {
    pub const TIME: u32 = 1;
    pub const NAME: u32 = 2;
    pub const ATTRIBUTES: u32 = 3;
}

mod status {
    pub const MESSAGE: u32 = 2;
    pub const CODE: u32 = 3;
    pub const CODE_ERROR: u64 = 2;
}

/// `AnyValue` oneof fields.
mod any {
    pub const STRING: u32 = 1;
    pub const BOOL: u32 = 2;
    pub const INT: u32 = 3;
    pub const ARRAY: u32 = 5;
}

/// A scalar attribute value.
#[derive(Clone, Copy, Debug)]
pub enum Value<'a> {
    Str(&'a str),
    /// A string written from parts (`scheme`, `://`, `host`, `path`) without joining them first.
    Concat(&'a [&'a str]),
    Bool(bool),
    Int(i64),
}

pub fn string(buf: &mut Vec<u8>, field: u32, s: &str) {
    bytes(buf, field, s.as_bytes());
}

/// A string field written from parts.
pub fn string_parts(buf: &mut Vec<u8>, field: u32, parts: &[&str]) {
    encode_key(field, WireType::LengthDelimited, buf);
    encode_varint(parts.iter().map(|p| p.len()).sum::<usize>() as u64, buf);
    for p in parts {
        buf.extend_from_slice(p.as_bytes());
    }
}

pub fn bytes(buf: &mut Vec<u8>, field: u32, b: &[u8]) {
    encode_key(field, WireType::LengthDelimited, buf);
    encode_varint(b.len() as u64, buf);
    buf.extend_from_slice(b);
}

pub fn fixed64(buf: &mut Vec<u8>, field: u32, v: u64) {
    encode_key(field, WireType::SixtyFourBit, buf);
    buf.extend_from_slice(&v.to_le_bytes());
}

pub fn fixed32(buf: &mut Vec<u8>, field: u32, v: u32) {
    encode_key(field, WireType::ThirtyTwoBit, buf);
    buf.extend_from_slice(&v.to_le_bytes());
}

pub fn varint(buf: &mut Vec<u8>, field: u32, v: u64) {
    encode_key(field, WireType::Varint, buf);
    encode_varint(v, buf);
}

/// Length of a length-delimited field holding `len` bytes (key of a field number below 16).
fn delimited_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// A nested message whose length is not known in advance: written in place, then the one-byte
/// length placeholder is widened if the content outgrew it (a short memmove, only for large
/// messages; the length's bytes are made on the stack).
pub fn message(buf: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    encode_key(field, WireType::LengthDelimited, buf);
    let at = buf.len();
    buf.push(0);
    write(buf);
    let len = buf.len() - at - 1;
    if len < 0x80 {
        buf[at] = len as u8;
    } else {
        let mut prefix = [0u8; 10];
        let mut n = 0;
        let mut v = len as u64;
        while v >= 0x80 {
            prefix[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        prefix[n] = v as u8;
        let n = n + 1;
        // Room for the extra bytes, the content moved up once, the length written in.
        let end = buf.len();
        buf.resize(end + n - 1, 0);
        buf.copy_within(at + 1..end, at + n);
        buf[at..at + n].copy_from_slice(&prefix[..n]);
    }
}

/// One `KeyValue` with a scalar value. The key is written from parts so that prefixed names
/// (`http.request.header.` + name) need no joined copy.
pub fn attribute(buf: &mut Vec<u8>, field: u32, key: &[&str], value: Value<'_>) {
    let key_len: usize = key.iter().map(|k| k.len()).sum();
    let value_len = match value {
        Value::Str(s) => delimited_len(s.len()),
        Value::Concat(parts) => delimited_len(parts.iter().map(|p| p.len()).sum()),
        Value::Bool(_) => 2,
        Value::Int(i) => 1 + encoded_len_varint(i as u64),
    };
    let kv_len = delimited_len(key_len) + delimited_len(value_len);
    encode_key(field, WireType::LengthDelimited, buf);
    encode_varint(kv_len as u64, buf);
    write_key(buf, key, key_len);
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(value_len as u64, buf);
    match value {
        Value::Str(s) => string(buf, any::STRING, s),
        Value::Concat(parts) => string_parts(buf, any::STRING, parts),
        Value::Bool(b) => varint(buf, any::BOOL, u64::from(b)),
        Value::Int(i) => varint(buf, any::INT, i as u64),
    }
}

/// One `KeyValue` whose value is an array of strings (`http.request.header.<name>`).
pub fn string_array_attribute<I>(buf: &mut Vec<u8>, field: u32, key: &[&str], values: I)
where
    I: Iterator + Clone,
    I::Item: AsRef<str>,
{
    let key_len: usize = key.iter().map(|k| k.len()).sum();
    let array_len: usize = values.clone().map(|v| delimited_len(delimited_len(v.as_ref().len()))).sum();
    let any_len = delimited_len(array_len);
    let kv_len = delimited_len(key_len) + delimited_len(any_len);
    encode_key(field, WireType::LengthDelimited, buf);
    encode_varint(kv_len as u64, buf);
    write_key(buf, key, key_len);
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(any_len as u64, buf);
    encode_key(any::ARRAY, WireType::LengthDelimited, buf);
    encode_varint(array_len as u64, buf);
    for v in values {
        let v = v.as_ref();
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(delimited_len(v.len()) as u64, buf);
        string(buf, any::STRING, v);
    }
}

fn write_key(buf: &mut Vec<u8>, key: &[&str], key_len: usize) {
    encode_key(1, WireType::LengthDelimited, buf);
    encode_varint(key_len as u64, buf);
    for k in key {
        buf.extend_from_slice(k.as_bytes());
    }
}

/// `Status { code: ERROR, message }`.
pub fn error_status(buf: &mut Vec<u8>, message: &str) {
    let len = delimited_len(message.len()) + 2;
    encode_key(span::STATUS, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
    string(buf, status::MESSAGE, message);
    varint(buf, status::CODE, status::CODE_ERROR);
}

/// The resource and scope every exported span shares, encoded once per exporter.
pub struct Envelope {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Envelope {
    pub fn new(service_name: &str) -> Self {
        Envelope::with_resource(service_name, &[])
    }

    /// `service.name`, then the other resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    pub fn with_resource(service_name: &str, attributes: &[(String, String)]) -> Self {
        let mut resource = Vec::new();
        attribute(&mut resource, 1, &["service.name"], Value::Str(service_name));
        for (k, v) in attributes.iter().filter(|(k, _)| k != "service.name") {
            attribute(&mut resource, 1, &[k], Value::Str(v));
        }
        let mut scope = Vec::new();
        string(&mut scope, 1, "keyswap");
        string(&mut scope, 2, env!("CARGO_PKG_VERSION"));
        Envelope { resource, scope }
    }

    /// `ExportTraceServiceRequest { resource_spans: [{ resource, scope_spans: [{ scope, spans }] }] }`.
    pub fn request(&self, spans: &[Vec<u8>]) -> Vec<u8> {
        let spans_len: usize = spans.iter().map(|s| delimited_len(s.len())).sum();
        let scope_spans_len = delimited_len(self.scope.len()) + spans_len;
        let resource_spans_len = delimited_len(self.resource.len()) + delimited_len(scope_spans_len);
        let mut out = Vec::with_capacity(delimited_len(resource_spans_len));
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(resource_spans_len as u64, &mut out);
        bytes(&mut out, 1, &self.resource);
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(scope_spans_len as u64, &mut out);
        bytes(&mut out, 1, &self.scope);
        for s in spans {
            bytes(&mut out, 2, s);
        }
        debug_assert_eq!(out.len(), delimited_len(resource_spans_len));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use prost::Message as _;

    /// A nested message's length takes as many bytes as its varint needs, whatever was before it.
    #[test]
    fn nested_messages_of_every_length_width_decode() {
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 2_097_151, 2_097_152] {
            let mut buf = vec![0xAB; 3];
            message(&mut buf, 5, |b| b.extend((0..len).map(|i| i as u8)));
            let mut rest = &buf[3..];
            let (field, wire) = prost::encoding::decode_key(&mut rest).unwrap();
            assert_eq!((field, wire), (5, WireType::LengthDelimited));
            assert_eq!(prost::encoding::decode_varint(&mut rest).unwrap(), len as u64, "{len}");
            assert_eq!(rest.len(), len, "{len}");
            assert!(rest.iter().enumerate().all(|(i, &b)| b == i as u8), "{len}: content moved intact");
            assert_eq!(&buf[..3], &[0xAB; 3]);
        }
    }

    #[test]
    fn encoded_spans_decode_with_the_reference_types() {
        let mut s = Vec::new();
        bytes(&mut s, span::TRACE_ID, &[7; 16]);
        string(&mut s, span::NAME, "chat gpt-4o");
        varint(&mut s, span::KIND, span::KIND_CLIENT);
        fixed64(&mut s, span::START, 1_700_000_000_000_000_000);
        fixed32(&mut s, span::FLAGS, 1 | span::FLAGS_HAS_IS_REMOTE);
        attribute(&mut s, span::ATTRIBUTES, &["gen_ai.", "system"], Value::Str("openai"));
        attribute(&mut s, span::ATTRIBUTES, &["ok"], Value::Bool(true));
        attribute(&mut s, span::ATTRIBUTES, &["n"], Value::Int(-3));
        attribute(&mut s, span::ATTRIBUTES, &["url"], Value::Concat(&["https", "://", "h", "/p"]));
        let long = "x".repeat(300);
        message(&mut s, span::EVENTS, |e| {
            string(e, event::NAME, "http.request.headers");
            string_array_attribute(e, event::ATTRIBUTES, &["h.", "a"], ["1", long.as_str()].into_iter());
        });
        error_status(&mut s, "403");
        let req = Envelope::new("svc").request(&[s.clone(), s]);
        let req = ExportTraceServiceRequest::decode(&req[..]).unwrap();
        let rs = &req.resource_spans[0];
        assert_eq!(rs.resource.as_ref().unwrap().attributes[0].key, "service.name");
        let ss = &rs.scope_spans[0];
        assert_eq!(ss.scope.as_ref().unwrap().name, "keyswap");
        assert_eq!(ss.spans.len(), 2);
        let sp = &ss.spans[1];
        assert_eq!((sp.name.as_str(), sp.kind, sp.flags), ("chat gpt-4o", 3, 0x101));
        assert_eq!(sp.trace_id, vec![7; 16]);
        assert_eq!(sp.start_time_unix_nano, 1_700_000_000_000_000_000);
        let v = |i: usize| sp.attributes[i].value.as_ref().unwrap().value.clone().unwrap();
        assert_eq!(sp.attributes[0].key, "gen_ai.system");
        assert_eq!(v(0), Any::StringValue("openai".into()));
        assert_eq!(v(1), Any::BoolValue(true));
        assert_eq!(v(2), Any::IntValue(-3));
        assert_eq!(v(3), Any::StringValue("https://h/p".into()));
        let ev = &sp.events[0];
        assert_eq!(ev.attributes[0].key, "h.a");
        match ev.attributes[0].value.as_ref().unwrap().value.as_ref().unwrap() {
            Any::ArrayValue(a) => {
                assert_eq!(a.values[0].value, Some(Any::StringValue("1".into())));
                assert_eq!(a.values[1].value, Some(Any::StringValue(long.clone())));
            }
            other => panic!("{other:?}"),
        }
        let st = sp.status.as_ref().unwrap();
        assert_eq!((st.code, st.message.as_str()), (2, "403"));
    }
}
