//! The members of a provider's answer (or event) that carry its model and token usage, read by
//! one JSON parse into a fixed shape: no `serde_json::Value`, no map, no allocation unless a
//! string has escapes or an answer nests another (a Responses API event's `response`,
//! Anthropic's `message_start`). Every other member is skipped by the parser, unbuilt.
//!
//! Lenient as the providers' readers need: a member of the wrong type reads as absent, its
//! neighbours still count; a member named twice counts as its last occurrence (as a JSON object
//! read into a map). Not JSON, or JSON followed by anything, reads as nothing. What is skipped is
//! checked only for its JSON structure, as serde_json skips (iteratively, so no depth limit, and
//! without checking strings' UTF-8 or numbers' range): a lone surrogate or `1e400` in a member
//! nobody reads, even inside `usage`, leaves the counts readable (the `Value` reader this replaced
//! read nothing then).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A token count some provider reports, by where it reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Field {
    /// `prompt_tokens` (OpenAI chat).
    PromptTokens,
    /// `completion_tokens` (OpenAI chat).
    CompletionTokens,
    /// `input_tokens` (OpenAI Responses, Anthropic).
    InputTokens,
    /// `output_tokens` (OpenAI Responses, Anthropic).
    OutputTokens,
    /// `prompt_tokens_details.cached_tokens` (OpenAI chat).
    PromptCached,
    /// `input_tokens_details.cached_tokens` (OpenAI Responses).
    InputCached,
    /// `cache_read_input_tokens` (Anthropic).
    CacheReadInputTokens,
    /// `cache_creation_input_tokens` (Anthropic).
    CacheCreationInputTokens,
    /// `promptTokenCount` (Google).
    PromptTokenCount,
    /// `candidatesTokenCount` (Google).
    CandidatesTokenCount,
    /// `thoughtsTokenCount` (Google).
    ThoughtsTokenCount,
    /// `cachedContentTokenCount` (Google).
    CachedContentTokenCount,
    /// `toolUsePromptTokenCount` (Google: what its own tools fetched, billed as input).
    ToolUsePromptTokenCount,
    /// `inputTokens` (Bedrock).
    InputTokensCamel,
    /// `outputTokens` (Bedrock).
    OutputTokensCamel,
    /// `cacheReadInputTokens` (Bedrock).
    CacheReadInputTokensCamel,
    /// `cacheWriteInputTokens` (Bedrock).
    CacheWriteInputTokensCamel,
    /// `total_input_tokens` (Gemini's Interactions API; `totalInputTokens` on Vertex).
    TotalInputTokens,
    /// `total_output_tokens` (Interactions).
    TotalOutputTokens,
    /// `total_thought_tokens` (Interactions).
    TotalThoughtTokens,
    /// `total_cached_tokens` (Interactions).
    TotalCachedTokens,
    /// `total_tool_use_tokens` (Interactions: what its own tools fetched, billed as input).
    TotalToolUseTokens,
}

const COUNTS: usize = Field::TotalToolUseTokens as usize + 1;

impl Field {
    /// The count a usage object's member `name` holds (the details objects are read apart).
    fn named(name: &[u8]) -> Option<Field> {
        Some(match name {
            b"prompt_tokens" => Field::PromptTokens,
            b"completion_tokens" => Field::CompletionTokens,
            b"input_tokens" => Field::InputTokens,
            b"output_tokens" => Field::OutputTokens,
            b"cache_read_input_tokens" => Field::CacheReadInputTokens,
            b"cache_creation_input_tokens" => Field::CacheCreationInputTokens,
            b"promptTokenCount" => Field::PromptTokenCount,
            b"candidatesTokenCount" => Field::CandidatesTokenCount,
            b"thoughtsTokenCount" => Field::ThoughtsTokenCount,
            b"cachedContentTokenCount" => Field::CachedContentTokenCount,
            b"toolUsePromptTokenCount" => Field::ToolUsePromptTokenCount,
            b"inputTokens" => Field::InputTokensCamel,
            b"outputTokens" => Field::OutputTokensCamel,
            b"cacheReadInputTokens" => Field::CacheReadInputTokensCamel,
            b"cacheWriteInputTokens" => Field::CacheWriteInputTokensCamel,
            b"total_input_tokens" | b"totalInputTokens" => Field::TotalInputTokens,
            b"total_output_tokens" | b"totalOutputTokens" => Field::TotalOutputTokens,
            b"total_thought_tokens" | b"totalThoughtTokens" => Field::TotalThoughtTokens,
            b"total_cached_tokens" | b"totalCachedTokens" => Field::TotalCachedTokens,
            b"total_tool_use_tokens" | b"totalToolUseTokens" => Field::TotalToolUseTokens,
            _ => return None,
        })
    }
}

/// A usage object (`usage`, `usageMetadata`): the counts it holds as non-negative integers.
/// (A bit per count says it is there: an array of `Option<u64>` would double what every parse
/// moves around.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Counts {
    present: u32,
    n: [u64; COUNTS],
}

const _: () = assert!(COUNTS <= u32::BITS as usize);

impl Counts {
    pub(super) fn get(&self, c: Field) -> Option<u64> {
        (self.present & (1 << c as u32) != 0).then_some(self.n[c as usize])
    }

    fn set(&mut self, c: Field, v: Option<u64>) {
        let bit = 1 << c as u32;
        match v {
            Some(v) => {
                self.present |= bit;
                self.n[c as usize] = v;
            }
            None => self.present &= !bit,
        }
    }
}

/// What an answer (or one event of a stream) says about model and usage.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Answer<'de> {
    /// `model`, when a string.
    pub model: Option<Cow<'de, str>>,
    /// `modelVersion` (Google), when a string.
    pub model_version: Option<Cow<'de, str>>,
    /// `type`, when a string.
    pub kind: Option<Cow<'de, str>>,
    /// `usage`, when an object.
    pub usage: Option<Counts>,
    /// `usageMetadata` (Google), when an object.
    pub usage_metadata: Option<Counts>,
    /// `response` (a Responses API event), when an object.
    pub response: Option<Box<Answer<'de>>>,
    /// `message` (Anthropic's `message_start`), when an object.
    pub message: Option<Box<Answer<'de>>>,
    /// `interaction` (an event of Gemini's Interactions API), when an object.
    pub interaction: Option<Box<Answer<'de>>>,
}

/// A parsed body: one answer, or a JSON array of them (Gemini's `streamGenerateContent` without
/// SSE; an element that is not an object reads as an empty answer). A scalar is an empty answer.
// Built once per parse and read in place: boxing the answer would allocate.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parsed<'de> {
    One(Answer<'de>),
    Many(Vec<Answer<'de>>),
}

/// `data` read for model and usage; `None` when it is not JSON (or has bytes after it).
pub(super) fn parse(data: &[u8]) -> Option<Parsed<'_>> {
    let mut de = serde_json::Deserializer::from_slice(data);
    let parsed = (&mut de).deserialize_any(Top).ok()?;
    de.end().ok()?;
    Some(parsed)
}

/// How a member's value is read when it is an object; any other type reads as `None`.
trait FromMap<'de>: Sized {
    fn from_map<A: MapAccess<'de>>(m: A) -> Result<Self, A::Error>;
}

/// Reads a value as `Some(T)` when it is an object, `None` (skipped) when it is anything else.
struct Object<T>(PhantomData<T>);

impl<T> Object<T> {
    fn seed() -> Self {
        Object(PhantomData)
    }
}

/// Skips what `m` has left.
fn drain_map<'de, A: MapAccess<'de>>(mut m: A) -> Result<(), A::Error> {
    while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn drain_seq<'de, A: SeqAccess<'de>>(mut s: A) -> Result<(), A::Error> {
    while s.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// The visitor methods of a lenient read: every JSON type accepted, those not wanted read as
/// `None` (a container skipped to its end).
macro_rules! none_for {
    (scalars) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    };
    (u64) => {
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
    };
    (str) => {
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
    };
    (map) => {
        fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<Self::Value, A::Error> {
            drain_map(m).map(|_| None)
        }
    };
    (seq) => {
        fn visit_seq<A: SeqAccess<'de>>(self, s: A) -> Result<Self::Value, A::Error> {
            drain_seq(s).map(|_| None)
        }
    };
}

impl<'de, T: FromMap<'de>> DeserializeSeed<'de> for Object<T> {
    type Value = Option<T>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: FromMap<'de>> Visitor<'de> for Object<T> {
    type Value = Option<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<Option<T>, A::Error> {
        T::from_map(m).map(Some)
    }
    none_for!(scalars);
    none_for!(u64);
    none_for!(str);
    none_for!(seq);
}

/// A string member (borrowed from the body unless it has escapes).
struct Str;

impl<'de> Visitor<'de> for Str {
    type Value = Option<Cow<'de, str>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v.to_owned())))
    }
    none_for!(scalars);
    none_for!(u64);
    none_for!(map);
    none_for!(seq);
}

impl<'de> DeserializeSeed<'de> for Str {
    type Value = Option<Cow<'de, str>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// An object's member name, borrowed from the body unless it has escapes (serde's own `Cow`
/// always copies).
pub(super) struct Key;

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

/// A member name of the objects read here, as its bytes: no UTF-8 check (the names wanted are
/// ASCII; one that is not UTF-8 matches none and its value is skipped, as any unknown member's).
struct Name;

impl<'de> Visitor<'de> for Name {
    type Value = Cow<'de, [u8]>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

impl<'de> DeserializeSeed<'de> for Name {
    type Value = Cow<'de, [u8]>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_bytes(self)
    }
}

/// A count: a non-negative integer (a negative, fractional or quoted number is none).
struct Uint;

impl<'de> Visitor<'de> for Uint {
    type Value = Option<u64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_u64<E>(self, v: u64) -> Result<Option<u64>, E> {
        Ok(Some(v))
    }
    none_for!(scalars);
    none_for!(str);
    none_for!(map);
    none_for!(seq);
}

impl<'de> DeserializeSeed<'de> for Uint {
    type Value = Option<u64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_any(self)
    }
}

/// `*_tokens_details`: its `cached_tokens`.
struct Cached(Option<u64>);

impl<'de> FromMap<'de> for Cached {
    fn from_map<A: MapAccess<'de>>(mut m: A) -> Result<Self, A::Error> {
        let mut cached = None;
        while let Some(key) = m.next_key_seed(Name)? {
            if *key == *b"cached_tokens" {
                cached = m.next_value_seed(Uint)?;
            } else {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Cached(cached))
    }
}

impl<'de> FromMap<'de> for Counts {
    fn from_map<A: MapAccess<'de>>(mut m: A) -> Result<Self, A::Error> {
        let mut counts = Counts::default();
        while let Some(key) = m.next_key_seed(Name)? {
            let details = match &*key {
                b"prompt_tokens_details" => Some(Field::PromptCached),
                b"input_tokens_details" => Some(Field::InputCached),
                _ => None,
            };
            if let Some(slot) = details {
                counts.set(slot, m.next_value_seed(Object::<Cached>::seed())?.and_then(|c| c.0));
            } else if let Some(slot) = Field::named(&key) {
                counts.set(slot, m.next_value_seed(Uint)?);
            } else {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(counts)
    }
}

impl<'de> FromMap<'de> for Answer<'de> {
    fn from_map<A: MapAccess<'de>>(mut m: A) -> Result<Self, A::Error> {
        let mut a = Answer::default();
        while let Some(key) = m.next_key_seed(Name)? {
            match &*key {
                b"model" => a.model = m.next_value_seed(Str)?,
                b"modelVersion" => a.model_version = m.next_value_seed(Str)?,
                b"type" => a.kind = m.next_value_seed(Str)?,
                b"usage" => a.usage = m.next_value_seed(Object::seed())?,
                b"usageMetadata" => a.usage_metadata = m.next_value_seed(Object::seed())?,
                b"response" => a.response = m.next_value_seed(Object::seed())?.map(Box::new),
                b"message" => a.message = m.next_value_seed(Object::seed())?.map(Box::new),
                b"interaction" => a.interaction = m.next_value_seed(Object::seed())?.map(Box::new),
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(a)
    }
}

/// The top-level value: an answer, an array of them, or a scalar (an empty answer).
struct Top;

impl<'de> Visitor<'de> for Top {
    type Value = Parsed<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<Parsed<'de>, A::Error> {
        Answer::from_map(m).map(Parsed::One)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Parsed<'de>, A::Error> {
        let mut all = Vec::new();
        while let Some(a) = s.next_element_seed(Object::<Answer<'de>>::seed())? {
            all.push(a.unwrap_or_default());
        }
        Ok(Parsed::Many(all))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Parsed<'de>, E> {
        Ok(Parsed::One(Answer::default()))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Parsed<'de>, E> {
        Ok(Parsed::One(Answer::default()))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Parsed<'de>, E> {
        Ok(Parsed::One(Answer::default()))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Parsed<'de>, E> {
        Ok(Parsed::One(Answer::default()))
    }
    fn visit_str<E>(self, _: &str) -> Result<Parsed<'de>, E> {
        Ok(Parsed::One(Answer::default()))
    }
    fn visit_unit<E>(self) -> Result<Parsed<'de>, E> {
        Ok(Parsed::One(Answer::default()))
    }
}

#[cfg(test)]
#[path = "answer_tests.rs"]
mod tests;
