//! The usage chunk keyswap asked a Chat Completions stream for, kept from the agent.
//!
//! A token budget settles a stream by the usage it reports, and OpenAI reports it only when the
//! body asks (`stream_options.include_usage`); keyswap asks where the agent did not
//! ([`super::budget`]). The answer then ends with one more chunk the agent never asked for:
//! `"choices": []` and the usage. Code written for the stream it asked for reads
//! `chunk.choices[0]` of every chunk (the OpenAI cookbook did for years) and fails on that one. So
//! the budget reads it and the agent gets the stream it asked for, without it.
//!
//! Events are cut at blank lines (`\n\n`, `\r\n\r\n`, `\r\r`); an event not yet complete is held
//! back until it is (or the body ends).

/// Drops, from a stream of server-sent events, each event whose data is a JSON object with an
/// empty `choices` array and a `usage` object; everything else passes unchanged.
#[derive(Debug, Default)]
pub struct UsageChunkFilter {
    /// The start of an event not yet complete.
    held: Vec<u8>,
}

impl UsageChunkFilter {
    /// The bytes to forward in place of `chunk` (`None`: `chunk` as it is); `end`: the body's last.
    pub fn filter(&mut self, chunk: &[u8], end: bool) -> Option<Vec<u8>> {
        // Most chunks are whole events with content: forwarded untouched, nothing copied.
        if self.held.is_empty() && ends_at_boundary(chunk) && !may_be_usage_chunk(chunk) {
            return None;
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let mut complete = if end { buf.len() } else { last_boundary(&buf) };
        // A usage chunk is a few hundred bytes: an event past this is not one, and goes on as it
        // comes (held, a stream with no blank line would be held whole).
        if buf.len() - complete > MAX_HELD {
            complete = buf.len();
        }
        self.held = buf[complete..].to_vec();
        buf.truncate(complete);
        let mut out = Vec::with_capacity(buf.len());
        let mut from = 0;
        while from < buf.len() {
            let to = next_boundary(&buf, from).unwrap_or(buf.len());
            let event = &buf[from..to];
            if !(may_be_usage_chunk(event) && is_usage_chunk(event)) {
                out.extend_from_slice(event);
            }
            from = to;
        }
        Some(out)
    }
}

/// The most of an unfinished event held back.
const MAX_HELD: usize = 64 * 1024;

/// Whether `bytes` could hold a usage chunk: its two marks, without parsing.
fn may_be_usage_chunk(bytes: &[u8]) -> bool {
    crate::scrub::contains(bytes, b"\"usage\"") && crate::scrub::contains(bytes, b"[]")
}

/// Whether the event's data is a JSON object whose `choices` is empty and whose `usage` is an
/// object. Data lines are joined with `\n`, as a client joins them.
fn is_usage_chunk(event: &[u8]) -> bool {
    let mut data = Vec::new();
    for line in event.split(|&b| b == b'\n' || b == b'\r') {
        if let Some(value) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(value.strip_prefix(b" ").unwrap_or(value));
        }
    }
    let Ok(serde_json::Value::Object(chunk)) = serde_json::from_slice(&data) else { return false };
    let no_choices = chunk.get("choices").and_then(|c| c.as_array()).is_some_and(|c| c.is_empty());
    no_choices && chunk.get("usage").is_some_and(|u| u.is_object())
}

/// Where the event starting at `from` ends (past its blank line), if it is complete.
fn next_boundary(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find_map(|i| match &buf[i..] {
        [b'\n', b'\n', ..] => Some(i + 2),
        [b'\r', b'\n', b'\r', b'\n', ..] => Some(i + 4),
        [b'\r', b'\r', rest @ ..] if rest.first() != Some(&b'\n') => Some(i + 2),
        _ => None,
    })
}

/// Where the last complete event of `buf` ends (0: none is).
fn last_boundary(buf: &[u8]) -> usize {
    let mut end = 0;
    while let Some(next) = next_boundary(buf, end) {
        end = next;
    }
    end
}

fn ends_at_boundary(chunk: &[u8]) -> bool {
    chunk.ends_with(b"\n\n") || chunk.ends_with(b"\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_USAGE: &str = include_str!("../../tests/data/usage/openai/chat.sse");
    const AZURE: &str = include_str!("../../tests/data/usage/openai/azure_chat.sse");

    /// `stream` through a filter, cut into chunks at `cuts`.
    fn through(stream: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut f = UsageChunkFilter::default();
        let mut out = Vec::new();
        let mut from = 0;
        for (i, &to) in cuts.iter().chain([&stream.len()]).enumerate() {
            let chunk = &stream[from..to];
            let end = i == cuts.len();
            out.extend(f.filter(chunk, end).unwrap_or_else(|| chunk.to_vec()));
            from = to;
        }
        out
    }

    fn without_usage_chunk(stream: &str) -> String {
        let events: Vec<&str> = stream.split_inclusive("\n\n").collect();
        events.into_iter().filter(|e| !(e.contains("\"choices\":[]") && e.contains("\"usage\":{"))).collect()
    }

    #[test]
    fn the_usage_chunk_is_dropped_wherever_the_stream_is_cut() {
        let expected = without_usage_chunk(WITH_USAGE);
        assert_ne!(expected, WITH_USAGE, "the fixture has a usage chunk");
        assert!(expected.ends_with("data: [DONE]\n\n"));
        let bytes = WITH_USAGE.as_bytes();
        assert_eq!(through(bytes, &[]), expected.as_bytes());
        for cut in 1..bytes.len() {
            assert_eq!(String::from_utf8_lossy(&through(bytes, &[cut])), expected, "cut at {cut}");
        }
        // One byte at a time.
        let every: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(String::from_utf8_lossy(&through(bytes, &every)), expected);
    }

    #[test]
    fn other_line_ends_and_data_lines_are_read_as_a_client_reads_them() {
        let crlf = WITH_USAGE.replace('\n', "\r\n");
        assert_eq!(
            String::from_utf8_lossy(&through(crlf.as_bytes(), &[7])),
            without_usage_chunk(WITH_USAGE).replace('\n', "\r\n")
        );
        let cr = WITH_USAGE.replace('\n', "\r");
        assert!(!String::from_utf8_lossy(&through(cr.as_bytes(), &[])).contains("\"usage\":{"));
        let split = "data: {\"choices\":[],\ndata: \"usage\":{\"total_tokens\":3}}\n\ndata: [DONE]\n\n";
        assert_eq!(through(split.as_bytes(), &[]), b"data: [DONE]\n\n");
    }

    #[test]
    fn chunks_with_choices_or_without_usage_pass_unchanged() {
        let no_usage = include_str!("../../tests/data/usage/openai/chat_no_usage.sse");
        assert_eq!(String::from_utf8_lossy(&through(no_usage.as_bytes(), &[])), no_usage);
        assert_eq!(UsageChunkFilter::default().filter(no_usage.as_bytes(), false), None, "copied for nothing");
        // Azure's first chunk has no choices and no usage (prompt filter results): kept; its last
        // has usage and no choices.
        let azure = through(AZURE.as_bytes(), &[]);
        assert_eq!(String::from_utf8_lossy(&azure), without_usage_chunk(AZURE));
        assert!(String::from_utf8_lossy(&azure).contains("prompt_filter_results"));
        assert_eq!(AZURE.len() - azure.len(), AZURE.rsplit("\n\n").nth(2).unwrap().len() + 2);
        let kept = [
            "data: {\"choices\":[{\"index\":0}],\"usage\":{\"total_tokens\":3}}\n\n",
            "data: {\"choices\":[],\"usage\":null}\n\n",
            "data: {\"choices\":[], \"usage\": [] }\n\n",
            "data: [\"usage\", []]\n\n",
            "data: {\"choices\":[],\"usage\":{}\n\n",
            ": a comment about \"usage\" []\n\n",
        ];
        for event in kept {
            assert_eq!(String::from_utf8_lossy(&through(event.as_bytes(), &[])), event);
        }
    }

    #[test]
    fn a_stream_without_blank_lines_is_not_held_whole() {
        let mut f = UsageChunkFilter::default();
        let line = vec![b'x'; 16 * 1024];
        let mut out = 0;
        for _ in 0..64 {
            out += f.filter(&line, false).map_or(line.len(), |o| o.len());
            assert!(f.held.len() <= MAX_HELD, "{}", f.held.len());
        }
        assert!(out >= 64 * line.len() - MAX_HELD, "{out} bytes went on");
        // The rest of an event let go early is delivered, not taken for a usage chunk.
        let rest = b"\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\n";
        let last = f.filter(rest, true).unwrap();
        assert!(last.ends_with(rest));
        assert_eq!(out + last.len(), 64 * line.len() + rest.len(), "every byte, once");
    }

    #[test]
    fn an_event_cut_off_by_the_end_of_the_body_is_still_delivered() {
        let mut f = UsageChunkFilter::default();
        assert_eq!(f.filter(b"data: {\"choices\":[{\"delta\":{}}]", false), Some(vec![]));
        assert_eq!(f.filter(b"}", true).unwrap(), b"data: {\"choices\":[{\"delta\":{}}]}");
    }
}
