//! Amazon Bedrock's streamed answers: `application/vnd.amazon.eventstream` frames, decoded by the
//! AWS SDK's decoder (checksums verified).
//!
//! - `converse-stream`: the `metadata` event carries the call's `usage` (camelCase, as the JSON
//!   Converse answer does).
//! - `invoke-with-response-stream`: each `chunk` event's payload is `{"bytes": "<base64>"}`, the
//!   model's own streamed event: Anthropic's `message_start` / `message_delta` with their usage,
//!   and in the last one, for every model, `amazon-bedrock-invocationMetrics` with the counts.

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use base64::Engine as _;
use bytes::BytesMut;

use super::answer;
use super::{anthropic, bedrock, ResponseInfo};

/// The most bytes of one frame held while it arrives (the decoder's own limit is 16 MiB); a larger
/// one stops the reading, and the reservation stands.
const MAX_FRAME_BYTES: usize = 1 << 20;

#[derive(Default)]
pub(super) struct EventStream {
    buf: BytesMut,
    decoder: MessageFrameDecoder,
    /// A frame that did not decode (or was too large): nothing after it is read.
    broken: bool,
}

impl EventStream {
    /// Reads `chunk` into `info`; returns the frames it completed.
    pub(super) fn feed(&mut self, chunk: &[u8], info: &mut ResponseInfo) -> u64 {
        let mut frames = 0;
        if self.broken {
            return frames;
        }
        self.buf.extend_from_slice(chunk);
        loop {
            match self.decoder.decode_frame(&mut self.buf) {
                Ok(DecodedFrame::Complete(message)) => {
                    frames += 1;
                    let kind = message.headers().iter().find(|h| h.name().as_str() == ":event-type");
                    let kind = kind.and_then(|h| h.value().as_string().ok()).map_or("", |s| s.as_str());
                    apply(kind, message.payload(), info);
                }
                Ok(DecodedFrame::Incomplete) if self.buf.len() <= MAX_FRAME_BYTES => return frames,
                _ => {
                    self.broken = true;
                    self.buf = BytesMut::new();
                    return frames;
                }
            }
        }
    }

    pub(super) fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    #[cfg(test)]
    pub(super) fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// Calls `on_frame(event type, payload)` for every whole frame of a captured body, in order,
/// the payload of a `chunk` (the model's own event, base64 in `{"bytes": …}`) decoded; stops at
/// the first frame that is cut short or does not decode (its checksum, a capture limit). `false`
/// when not even the first frame decodes: the body is no event stream.
pub(super) fn for_each_frame(body: &[u8], mut on_frame: impl FnMut(&str, &[u8])) -> bool {
    // A frame opens with its length, big-endian, under 16 MiB: a JSON answer (`{`) is no stream,
    // and is not copied to find that out.
    if body.first() != Some(&0) {
        return false;
    }
    let (mut buf, mut decoder, mut any) = (BytesMut::from(body), MessageFrameDecoder::new(), false);
    while let Ok(DecodedFrame::Complete(message)) = decoder.decode_frame(&mut buf) {
        any = true;
        let kind = message.headers().iter().find(|h| h.name().as_str() == ":event-type");
        let kind = kind.and_then(|h| h.value().as_string().ok()).map_or("", |s| s.as_str());
        match kind {
            "chunk" => {
                if let Some(event) = chunk_event(message.payload()) {
                    on_frame(kind, &event);
                }
            }
            _ => on_frame(kind, message.payload()),
        }
    }
    any
}

/// The model's event a `chunk` frame carries (`{"bytes": "<base64>"}`).
fn chunk_event(payload: &[u8]) -> Option<Vec<u8>> {
    #[derive(serde::Deserialize)]
    struct Chunk<'a> {
        #[serde(borrow)]
        bytes: std::borrow::Cow<'a, str>,
    }
    let chunk = serde_json::from_slice::<Chunk<'_>>(payload).ok()?;
    base64::engine::general_purpose::STANDARD.decode(chunk.bytes.as_bytes()).ok()
}

/// One event: the usage it reports, if any.
fn apply(kind: &str, payload: &[u8], info: &mut ResponseInfo) {
    match kind {
        "metadata" => {
            if let Some(answer::Parsed::One(a)) = answer::parse(payload) {
                bedrock::apply_body(&a, info);
            }
        }
        "chunk" => {
            let Some(event) = chunk_event(payload) else { return };
            if let Some(answer::Parsed::One(a)) = answer::parse(&event) {
                anthropic::apply_event(b"", &a, info);
            }
            invocation_metrics(&event, info);
        }
        _ => {}
    }
}

/// `amazon-bedrock-invocationMetrics`, in the last chunk of every model's stream.
fn invocation_metrics(event: &[u8], info: &mut ResponseInfo) {
    const KEY: &[u8] = b"amazon-bedrock-invocationMetrics";
    if !event.windows(KEY.len()).any(|w| w == KEY) {
        return;
    }
    #[derive(serde::Deserialize)]
    struct Last {
        #[serde(rename = "amazon-bedrock-invocationMetrics")]
        metrics: Metrics,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Metrics {
        input_token_count: Option<u64>,
        output_token_count: Option<u64>,
    }
    if let Ok(last) = serde_json::from_slice::<Last>(event) {
        let usage = &mut info.usage;
        usage.input_tokens = last.metrics.input_token_count.or(usage.input_tokens);
        usage.output_tokens = last.metrics.output_token_count.or(usage.output_tokens);
        info.provisional &= last.metrics.output_token_count.is_none();
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::{Format, UsageParser};
    use aws_smithy_types::event_stream::{Header, HeaderValue, Message};

    /// One frame as Bedrock sends it, written with the AWS SDK's encoder.
    pub(crate) fn frame(event: &str, payload: &[u8]) -> Vec<u8> {
        let message = Message::new(payload.to_vec())
            .add_header(Header::new(":event-type", HeaderValue::String(event.to_owned().into())))
            .add_header(Header::new(":content-type", HeaderValue::String("application/json".into())))
            .add_header(Header::new(":message-type", HeaderValue::String("event".into())));
        let mut out = Vec::new();
        aws_smithy_eventstream::frame::write_message_to(&message, &mut out).unwrap();
        out
    }

    fn chunk(event: &serde_json::Value) -> Vec<u8> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD.encode(event.to_string());
        frame("chunk", serde_json::json!({ "bytes": bytes }).to_string().as_bytes())
    }

    const CONTENT_TYPE: &str = "application/vnd.amazon.eventstream";

    /// Read in pieces of every size: frames split anywhere are joined.
    fn usage_of(stream: &[u8]) -> Vec<(Option<u64>, Option<u64>)> {
        [1, 7, 64, stream.len()]
            .iter()
            .map(|&n| {
                let mut p = UsageParser::new(Format::Bedrock, CONTENT_TYPE);
                for piece in stream.chunks(n) {
                    p.feed(piece);
                }
                let (u, provisional, _) = p.usage();
                assert!(!provisional, "the stream's last counts are final");
                (u.input_tokens, u.output_tokens)
            })
            .collect()
    }

    #[test]
    fn converse_stream_usage_comes_from_its_metadata_event() {
        let text =
            |t: &str| frame("contentBlockDelta", serde_json::json!({"delta": {"text": t}}).to_string().as_bytes());
        // The model writes usage-looking text: only the metadata event counts.
        let stream = [
            frame("messageStart", br#"{"role":"assistant"}"#),
            text(r#"{"usage":{"inputTokens":0,"outputTokens":0}}"#),
            frame("messageStop", br#"{"stopReason":"end_turn"}"#),
            frame(
                "metadata",
                br#"{"usage":{"inputTokens":25,"outputTokens":812,"totalTokens":837},"metrics":{"latencyMs":900}}"#,
            ),
        ]
        .concat();
        assert!(usage_of(&stream).iter().all(|u| *u == (Some(25), Some(812))), "{:?}", usage_of(&stream));
    }

    #[test]
    fn invoke_with_response_stream_usage_comes_from_the_models_events_and_the_invocation_metrics() {
        let anthropic = [
            chunk(&serde_json::json!({"type": "message_start", "message": {"model": "claude", "usage": {"input_tokens": 31, "output_tokens": 1}}})),
            chunk(&serde_json::json!({"type": "content_block_delta", "delta": {"text": "hi"}})),
            chunk(&serde_json::json!({"type": "message_delta", "usage": {"output_tokens": 640}})),
        ]
        .concat();
        assert!(usage_of(&anthropic).iter().all(|u| *u == (Some(31), Some(640))));
        // Any model: the last chunk's invocation metrics.
        let llama = [
            chunk(&serde_json::json!({"generation": "hi"})),
            chunk(&serde_json::json!({"generation": "", "amazon-bedrock-invocationMetrics":
                {"inputTokenCount": 12, "outputTokenCount": 345, "invocationLatency": 800}})),
        ]
        .concat();
        assert!(usage_of(&llama).iter().all(|u| *u == (Some(12), Some(345))));
    }

    /// A frame whose checksum does not match (or too large to hold) stops the reading: nothing
    /// after it counts, and the reservation stands; memory stays bounded.
    #[test]
    fn a_corrupt_or_oversized_frame_stops_the_reading() {
        let good = frame("metadata", br#"{"usage":{"inputTokens":5,"outputTokens":6}}"#);
        let mut bad = good.clone();
        let last = bad.len() - 5;
        bad[last] ^= 0xff;
        assert!(usage_of(&[bad, good.clone()].concat()).iter().all(|u| *u == (None, None)));
        let mut huge = UsageParser::new(Format::Bedrock, CONTENT_TYPE);
        let big = frame("chunk", &vec![b' '; 3 << 20]);
        for piece in big.chunks(64 * 1024) {
            huge.feed(piece);
        }
        huge.feed(&good);
        assert_eq!(huge.usage().0.input_tokens, None);
        assert!(huge.buffered_capacity() <= 2 << 20, "{}", huge.buffered_capacity());
    }
}
