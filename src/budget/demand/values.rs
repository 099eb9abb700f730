//! The values the demand reader reads without keeping them: a flag, the shape of a reference, a
//! model name, a count. Each reads any JSON value (never an error for an unexpected type: the
//! body is the agent's, and what it cannot mean is decided by the reader).

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

/// Whether a flag is on: anything but `false` and `null` (a lax provider reads `"true"` or `1`
/// as true; erring the other way would let an agent slip a background run past its budget).
pub(super) struct Enabled(pub(super) bool);

impl<'de> de::Deserialize<'de> for Enabled {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Enabled, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Enabled;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Enabled, E> {
                Ok(Enabled(b))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Enabled, E> {
                Ok(Enabled(false))
            }
            fn visit_none<E: de::Error>(self) -> Result<Enabled, E> {
                Ok(Enabled(false))
            }
            numbers_are!(Enabled(true));
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Enabled, E> {
                Ok(Enabled(true))
            }
            containers_are!(Enabled(true));
        }
        de.deserialize_any(V)
    }
}

/// What a value is, read without keeping it: nothing (`null`, an empty string), inline data (a
/// `data:` URL), an object, or something else.
pub(super) enum Shape {
    Nothing,
    Inline,
    Object,
    Other,
}

impl Shape {
    pub(super) fn of_str(s: &str) -> Shape {
        let s = s.trim_start();
        if s.is_empty() {
            Shape::Nothing
        // Bytes, not `&s[..5]`: the fifth byte of the agent's text may fall inside a character.
        } else if s.as_bytes().get(..5).is_some_and(|p| p.eq_ignore_ascii_case(b"data:")) {
            Shape::Inline
        } else {
            Shape::Other
        }
    }
}

impl<'de> de::Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Shape, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Shape;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Shape, E> {
                Ok(Shape::of_str(s))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
                Ok(Shape::Nothing)
            }
            fn visit_none<E: de::Error>(self) -> Result<Shape, E> {
                Ok(Shape::Nothing)
            }
            scalars_are!(Shape::Other);
            containers_are!(Shape::Other, Shape::Object);
        }
        de.deserialize_any(V)
    }
}

/// A `type` value: whether it names a tool the provider runs itself and whose results become
/// input the body does not carry (a web search, a page fetch, a file search, a remote MCP
/// server, code it runs), or a stored item the body names by id (`item_reference`). The conversation items those tools leave (`web_search_call`,
/// `web_search_tool_result`) are carried in the body, so they are not counted.
pub(super) struct ServerTool(pub(super) bool);

impl ServerTool {
    fn named(t: &str) -> bool {
        matches!(
            t,
            "web_search" | "web_search_preview" | "file_search" | "mcp" | "url_context" | "code_interpreter"
                // Gemini's Interactions API names its tools by type.
                | "google_search" | "code_execution" | "mcp_server"
                // A stored conversation item, by id (OpenAI Responses).
                | "item_reference"
        ) || t.starts_with("web_search_preview_")
            // Anthropic's dated tool types: `web_search_20250305`, `web_fetch_20250910`,
            // `code_execution_20250825`.
            || ["web_search_2", "web_fetch_2", "code_execution_2"].iter().any(|p| t.starts_with(p))
    }
}

impl<'de> de::Deserialize<'de> for ServerTool {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<ServerTool, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ServerTool;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a type")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ServerTool, E> {
                Ok(ServerTool(ServerTool::named(s)))
            }
            scalars_are!(ServerTool(false), unit);
            containers_are!(ServerTool(false));
        }
        de.deserialize_any(V)
    }
}

/// A `model` value: its name when it is a string (anything else is no model to a provider).
pub(super) struct Model(pub(super) Option<String>);

impl<'de> de::Deserialize<'de> for Model {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Model, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Model;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a model name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Model, E> {
                Ok(Model(Some(s.to_owned())))
            }
            scalars_are!(Model(None));
            containers_are!(Model(None));
        }
        de.deserialize_any(V)
    }
}

/// A count (an output limit, a number of completions) as a lenient provider might read it.
/// `null` sets nothing; a plain non-negative integer is exact; a float or a numeric string
/// counts rounded up but is `unreadable` (the default counts as well); anything else is
/// `unreadable` with no value.
#[derive(Default)]
pub(super) struct Count {
    pub(super) value: Option<u64>,
    pub(super) unreadable: bool,
}

impl Count {
    fn float(f: f64) -> Count {
        let value = (f.is_finite() && f >= 0.0).then(|| if f >= u64::MAX as f64 { u64::MAX } else { f.ceil() as u64 });
        Count { value, unreadable: true }
    }

    fn garbled() -> Count {
        Count { value: None, unreadable: true }
    }
}

impl<'de> de::Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Count, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a count")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count { value: Some(v), unreadable: false })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                Ok(if v >= 0 { Count { value: Some(v as u64), unreadable: false } } else { Count::garbled() })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                Ok(Count::float(v))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Count, E> {
                Ok(s.trim().parse::<f64>().map_or_else(|_| Count::garbled(), Count::float))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
                Ok(Count::default())
            }
            fn visit_none<E: de::Error>(self) -> Result<Count, E> {
                Ok(Count::default())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Count, E> {
                Ok(Count::garbled())
            }
            containers_are!(Count::garbled());
        }
        de.deserialize_any(V)
    }
}

/// Whether a streamed answer will report its usage: OpenAI's `stream_options.include_usage`
/// (Chat Completions streams carry no usage without it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamUsage {
    /// No `stream_options` at all.
    #[default]
    Unset,
    /// Every `stream_options` is an object whose every `include_usage` is `true`.
    Asked,
    /// Some `stream_options` is not, as a provider reading the last key may see it.
    NotAsked,
}

/// A `stream_options` value: `true` when it is an object whose every `include_usage` is `true`
/// (and it has one).
pub(super) struct UsageAsked(pub(super) bool);

impl<'de> de::Deserialize<'de> for UsageAsked {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<UsageAsked, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UsageAsked;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<UsageAsked, A::Error> {
                let (mut seen, mut all_true) = (false, true);
                while let Some(IncludeUsage(is)) = map.next_key()? {
                    if is {
                        seen = true;
                        all_true &= map.next_value::<IsTrue>()?.0;
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
                Ok(UsageAsked(seen && all_true))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<UsageAsked, E> {
                Ok(UsageAsked(false))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<UsageAsked, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| UsageAsked(false))
            }
            scalars_are!(UsageAsked(false), unit);
        }
        de.deserialize_any(V)
    }
}

/// An object key: whether it is `include_usage` (escapes resolved).
struct IncludeUsage(bool);

impl<'de> de::Deserialize<'de> for IncludeUsage {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<IncludeUsage, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IncludeUsage;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<IncludeUsage, E> {
                Ok(IncludeUsage(name == "include_usage"))
            }
        }
        de.deserialize_str(V)
    }
}

/// A value that is exactly `true` (anything else, of any type, is not).
struct IsTrue(bool);

impl<'de> de::Deserialize<'de> for IsTrue {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<IsTrue, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IsTrue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<IsTrue, E> {
                Ok(IsTrue(b))
            }
            numbers_are!(IsTrue(false));
            fn visit_unit<E: de::Error>(self) -> Result<IsTrue, E> {
                Ok(IsTrue(false))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<IsTrue, E> {
                Ok(IsTrue(false))
            }
            containers_are!(IsTrue(false));
        }
        de.deserialize_any(V)
    }
}
