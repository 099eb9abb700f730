//! A request body's text encoding, made what serde_json reads: UTF-16/32 and byte-order marks
//! decoded, lone surrogate escapes replaced (as lenient providers read them).

/// `body` with every `\u` escape of a lone surrogate (a high one not followed by a low one, or a
/// low one alone) written as `\ufffd`, the same length; `None` when it has none.
pub(super) fn lone_surrogates_replaced(body: &[u8]) -> Option<Vec<u8>> {
    let unit = |at: usize| -> Option<u16> {
        let hex = body.get(at..at + 6).filter(|e| e.starts_with(b"\\u"))?;
        u16::from_str_radix(std::str::from_utf8(&hex[2..]).ok()?, 16).ok()
    };
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < body.len() {
        if body[i] != b'\\' {
            i += 1;
            continue;
        }
        let Some(u) = unit(i) else {
            // Any other escape (`\\` among them): the escaped byte is skipped with it.
            i += 2;
            continue;
        };
        let paired = (0xD800..0xDC00).contains(&u) && unit(i + 6).is_some_and(|l| (0xDC00..0xE000).contains(&l));
        if paired {
            i += 12;
        } else {
            if (0xD800..0xE000).contains(&u) {
                out.get_or_insert_with(|| body.to_vec())[i..i + 6].copy_from_slice(b"\\ufffd");
            }
            i += 6;
        }
    }
    out
}

/// `body` as UTF-8 when it is not already: without a UTF-8 byte-order mark, or decoded from
/// UTF-16/32 (with or without a mark, detected as Python's `json.detect_encoding` does). `None`:
/// plain UTF-8 (or not text at all), read as it is. `Some(Err(()))`: in such an encoding, and it
/// does not decode (a lone surrogate, which Python's `surrogatepass` reads all the same).
pub(super) fn utf8_json(body: &[u8]) -> Option<Result<String, ()>> {
    let units = |width: usize, big: bool, skip: usize| -> Option<String> {
        let rest = body.get(skip..)?;
        let word = |c: &[u8]| {
            let mut v = 0u32;
            for i in 0..width {
                let b = u32::from(c[if big { i } else { width - 1 - i }]);
                v = (v << 8) | b;
            }
            v
        };
        let words = rest.chunks_exact(width).map(word);
        if width == 2 {
            char::decode_utf16(words.map(|w| w as u16)).collect::<Result<String, _>>().ok()
        } else {
            words.map(char::from_u32).collect()
        }
    };
    let decoded = match body {
        [0xEF, 0xBB, 0xBF, rest @ ..] => String::from_utf8(rest.to_vec()).ok(),
        [0x00, 0x00, 0xFE, 0xFF, ..] => units(4, true, 4),
        [0xFF, 0xFE, 0x00, 0x00, ..] => units(4, false, 4),
        [0xFE, 0xFF, ..] => units(2, true, 2),
        [0xFF, 0xFE, ..] => units(2, false, 2),
        [0, 0, _, _, ..] => units(4, true, 0),
        [0, _, ..] => units(2, true, 0),
        [_, 0, 0, 0, ..] => units(4, false, 0),
        [_, 0, ..] => units(2, false, 0),
        _ => return None,
    };
    Some(decoded.ok_or(()))
}
