//! Server-sent events, per the WHATWG HTML "event stream interpretation": lines end in \n, \r\n or
//! \r; `field: value` with one optional space after the colon; a line starting with `:` is a
//! comment; a line without a colon is a field with an empty value; a blank line dispatches the
//! event; `data` lines are joined with \n. Only `data` and `event` matter here.

use super::{push_bounded, MAX_EVENT_BYTES, SSE_KEEP_CAPACITY, TAIL_BYTES};

/// The SSE fields this parser keeps; every other field (and comments) is read past.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Data,
    Event,
    Ignored,
}

#[derive(Clone, Copy)]
enum Line {
    /// Reading the field name, from the start of the line.
    Name,
    /// Just past the colon: one space is dropped here.
    ValueStart(Field),
    /// Reading the value.
    Value(Field),
}

/// Longest field name that can matter (`event`).
const NAME_CAP: usize = 5;

pub(super) struct SseReader {
    line: Line,
    /// The current line's field name, as far as it fits; `name_len` counts all of it.
    name: [u8; NAME_CAP],
    name_len: usize,
    /// Nothing but the terminator on this line so far.
    line_empty: bool,
    /// The last byte seen ended a line with \r: a \n right after it belongs to the same terminator.
    pending_cr: bool,
    /// Bytes of a leading UTF-8 byte order mark seen; 3 once the start of the stream is past.
    bom_seen: u8,
    /// The current event outgrew [`MAX_EVENT_BYTES`]: up to the next blank line only the last
    /// [`TAIL_BYTES`] of its data are kept (in `tail`), where a provider writes its usage.
    skipping: bool,
    tail: Vec<u8>,
    /// The current event's data lines, each followed by \n.
    data: Vec<u8>,
    /// The current event's `event:` field.
    event: Vec<u8>,
}

impl SseReader {
    pub(super) fn new() -> Self {
        Self {
            line: Line::Name,
            name: [0; NAME_CAP],
            name_len: 0,
            line_empty: true,
            pending_cr: false,
            bom_seen: 0,
            skipping: false,
            tail: Vec::new(),
            data: Vec::new(),
            event: Vec::new(),
        }
    }

    /// Bytes held for the current event: its name and data.
    pub(super) fn buffered_len(&self) -> usize {
        self.data.len() + self.event.len() + self.tail.len()
    }

    /// Memory reserved for those bytes.
    #[cfg(test)]
    pub(super) fn buffered_capacity(&self) -> usize {
        self.data.capacity() + self.event.capacity() + self.tail.capacity()
    }

    /// Reads `input`, calling `on_event(event_name, data, truncated)` for every complete event;
    /// `truncated`: the event outgrew [`MAX_EVENT_BYTES`], `data` is its last [`TAIL_BYTES`] (its
    /// name, when it came before the data, is kept).
    pub(super) fn feed(&mut self, input: &[u8], mut on_event: impl FnMut(&[u8], &[u8], bool)) {
        let mut input = self.skip_bom(input);
        while let Some(&first) = input.first() {
            if self.pending_cr {
                self.pending_cr = false;
                if first == b'\n' {
                    input = &input[1..];
                    continue;
                }
            }
            match self.line {
                Line::Name => {
                    let end = input.iter().position(|&b| matches!(b, b':' | b'\n' | b'\r')).unwrap_or(input.len());
                    self.push_name(&input[..end]);
                    input = &input[end..];
                    match input.first() {
                        None => {}
                        Some(b':') => {
                            input = &input[1..];
                            self.line_empty = false;
                            let field = self.field();
                            if field == Field::Event {
                                self.event.clear();
                            }
                            self.line = Line::ValueStart(field);
                        }
                        Some(&terminator) => {
                            input = &input[1..];
                            self.end_line(terminator, &mut on_event);
                        }
                    }
                }
                Line::ValueStart(field) => {
                    if first == b' ' {
                        input = &input[1..];
                    }
                    self.line = Line::Value(field);
                }
                Line::Value(field) => {
                    let end = input.iter().position(|&b| b == b'\n' || b == b'\r').unwrap_or(input.len());
                    self.push_value(field, &input[..end]);
                    input = &input[end..];
                    if let Some(&terminator) = input.first() {
                        input = &input[1..];
                        self.end_line(terminator, &mut on_event);
                    }
                }
            }
        }
    }

    /// Drops one leading UTF-8 byte order mark, however it is split.
    fn skip_bom<'a>(&mut self, mut input: &'a [u8]) -> &'a [u8] {
        const BOM: &[u8; 3] = b"\xEF\xBB\xBF";
        while let (Some(&expected), Some(&b)) = (BOM.get(usize::from(self.bom_seen)), input.first()) {
            if b != expected {
                // Not a BOM after all. A partial match only ever eats bytes that were not a field
                // name anyway (0xEF 0xBB are not ASCII).
                self.bom_seen = 3;
                break;
            }
            self.bom_seen += 1;
            input = &input[1..];
        }
        input
    }

    fn push_name(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.line_empty = false;
        let end = self.name_len + bytes.len();
        if end <= NAME_CAP {
            self.name[self.name_len..end].copy_from_slice(bytes);
        }
        self.name_len = self.name_len.saturating_add(bytes.len());
    }

    fn field(&self) -> Field {
        if self.name_len > NAME_CAP {
            return Field::Ignored;
        }
        match &self.name[..self.name_len] {
            b"data" => Field::Data,
            b"event" if !self.skipping => Field::Event,
            _ => Field::Ignored,
        }
    }

    fn push_value(&mut self, field: Field, bytes: &[u8]) {
        if self.skipping {
            if field == Field::Data {
                self.push_tail(bytes);
            }
            return;
        }
        let fits = match field {
            Field::Data => push_bounded(&mut self.data, bytes, MAX_EVENT_BYTES - self.event.len()),
            Field::Event => push_bounded(&mut self.event, bytes, MAX_EVENT_BYTES - self.data.len()),
            Field::Ignored => true,
        };
        if !fits {
            self.overflow();
            if field == Field::Data {
                self.push_tail(bytes);
            }
        }
    }

    /// The current event is too big: keep the end of its data, and of the data up to the blank
    /// line.
    fn overflow(&mut self) {
        self.skipping = true;
        let data = std::mem::take(&mut self.data);
        self.tail.clear();
        self.push_tail(&data);
        // The rest of a data line goes on into the tail; of any other, nowhere.
        if let Line::ValueStart(f) | Line::Value(f) = self.line {
            self.line = Line::Value(if f == Field::Data { Field::Data } else { Field::Ignored });
        }
    }

    /// Appends to the kept end of an oversized event's data: at most [`TAIL_BYTES`] stay (twice
    /// that while it grows, moved down once it is past).
    fn push_tail(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
        if self.tail.len() + bytes.len() > 2 * TAIL_BYTES {
            let keep = TAIL_BYTES.saturating_sub(bytes.len());
            self.tail.drain(..self.tail.len() - keep.min(self.tail.len()));
        }
        self.tail.extend_from_slice(bytes);
    }

    fn end_line(&mut self, terminator: u8, on_event: &mut impl FnMut(&[u8], &[u8], bool)) {
        self.pending_cr = terminator == b'\r';
        match self.line {
            Line::Name if self.line_empty => self.dispatch(on_event),
            // A field name alone is that field with an empty value.
            Line::Name => match self.field() {
                Field::Data => self.push_value(Field::Data, b"\n"),
                Field::Event => self.event.clear(),
                Field::Ignored => {}
            },
            Line::ValueStart(field) | Line::Value(field) => {
                if field == Field::Data {
                    self.push_value(Field::Data, b"\n");
                }
            }
        }
        self.line = Line::Name;
        self.name_len = 0;
        self.line_empty = true;
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(&[u8], &[u8], bool)) {
        if self.skipping {
            self.skipping = false;
            let tail = &self.tail[self.tail.len().saturating_sub(TAIL_BYTES)..];
            on_event(&self.event, tail, true);
            self.tail = Vec::new();
        } else if !self.data.is_empty() {
            if self.data.last() == Some(&b'\n') {
                self.data.pop();
            }
            on_event(&self.event, &self.data, false);
        }
        self.clear_event();
    }

    fn clear_event(&mut self) {
        self.data.clear();
        self.event.clear();
        if self.data.capacity() > SSE_KEEP_CAPACITY {
            self.data.shrink_to(SSE_KEEP_CAPACITY);
        }
        if self.event.capacity() > SSE_KEEP_CAPACITY {
            self.event.shrink_to(SSE_KEEP_CAPACITY);
        }
    }
}
