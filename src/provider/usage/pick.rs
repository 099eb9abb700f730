//! A JSON parse that keeps only the members a reader looks at: the objects of a provider's answer
//! are mostly text (choices, content, candidates), and building all of it into a
//! `serde_json::Value` (a map and a `String` per member) only to read three numbers was the larger
//! part of a traced request's span work. Members not named are skipped by the parser, unbuilt.

use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// `data` parsed, keeping of each object only the members named in `keep`; a member named in
/// `recurse` is an object picked the same way (a Responses API event's `response`, Anthropic's
/// `message`). A top-level array (Gemini's chunks without SSE) is picked element by element.
/// `None` when `data` is not JSON.
pub fn parse_picked(data: &[u8], keep: &[&str], recurse: &[&str]) -> Option<Value> {
    let mut de = serde_json::Deserializer::from_slice(data);
    let v = Pick { keep, recurse }.deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(v)
}

#[derive(Clone, Copy)]
struct Pick<'k> {
    keep: &'k [&'k str],
    recurse: &'k [&'k str],
}

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = m.next_key_seed(super::answer::Key)? {
            if self.recurse.contains(&&*key) {
                let v = m.next_value_seed(self)?;
                out.insert(key.into_owned(), v);
            } else if self.keep.contains(&&*key) {
                out.insert(key.into_owned(), m.next_value()?);
            } else {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = s.next_element_seed(self)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    // Scalars: as serde_json builds them.
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_picked;
    use serde_json::json;

    #[test]
    fn keeps_the_named_members_recurses_where_asked_and_skips_the_rest() {
        let body = br#"{"id":"x","model":"m","choices":[{"message":{"content":"long text"}}],
            "usage":{"prompt_tokens":3,"completion_tokens":4},
            "response":{"model":"r","output":[1,2],"usage":{"input_tokens":5}}}"#;
        let v = parse_picked(body, &["model", "usage"], &["response"]).unwrap();
        assert_eq!(
            v,
            json!({"model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 4},
                "response": {"model": "r", "usage": {"input_tokens": 5}}})
        );
        let chunks = br#"[{"modelVersion":"g","candidates":[]},{"usageMetadata":{"promptTokenCount":1}}]"#;
        let v = parse_picked(chunks, &["modelVersion", "usageMetadata"], &[]).unwrap();
        assert_eq!(v, json!([{"modelVersion": "g"}, {"usageMetadata": {"promptTokenCount": 1}}]));
        // Not JSON, or JSON with trailing bytes: nothing, as serde_json::from_slice.
        assert!(parse_picked(b"{\"model\":", &["model"], &[]).is_none());
        assert!(parse_picked(b"{} x", &["model"], &[]).is_none());
        assert_eq!(parse_picked(b" 7 ", &[], &[]), Some(json!(7)));
    }

    /// The prompt is read from the agent's request body: nesting it 100,000 deep, in a member
    /// that is kept, one that is picked again or the top-level array, ends in serde_json's depth
    /// limit (a parse error: no content attributes), never in a stack overflow.
    #[test]
    fn an_agents_deeply_nested_body_ends_in_a_parse_error_not_a_stack_overflow() {
        let deep = |open: &str, close: &str| format!("{}1{}", open.repeat(100_000), close.repeat(100_000));
        let cases = [
            deep("[", "]"),
            format!(r#"{{"messages":{}}}"#, deep("[", "]")),
            format!("{}{{}}{}", r#"{"response":"#.repeat(100_000), "}".repeat(100_000)),
        ];
        for body in &cases {
            assert_eq!(parse_picked(body.as_bytes(), &["messages", "model"], &["response"]), None);
        }
        // Within the limit it parses.
        let ok = format!("{}{{}}{}", r#"{"response":"#.repeat(50), "}".repeat(50));
        assert!(parse_picked(ok.as_bytes(), &[], &["response"]).is_some());
    }
}
