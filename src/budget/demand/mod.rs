//! What a request may cost, read from its body before it is forwarded.
//!
//! The body is the agent's, so it is read the way the most lenient provider would read it, and
//! every doubt goes against the agent: a key given twice counts with its larger value (JSON
//! parsers disagree on which one wins: Python, Go and JavaScript take the last), a limit that is
//! not a plain non-negative integer counts as at least the budget's default, several completions
//! asked for at once (`n`, `best_of`, `candidateCount`) each may generate the limit, a body
//! naming several models is weighted as the heaviest of them, and input the body refers to
//! instead of carrying (a stored conversation, an uploaded file, a URL the provider fetches) is
//! counted wherever in the body it appears.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

/// The scalar `visit_*` methods of a visitor to which any number, boolean (and `null`, with
/// `unit`) means the same `value`.
macro_rules! scalars_are {
    ($value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        numbers_are!($value);
    };
    ($value:expr, unit) => {
        scalars_are!($value);
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// The number `visit_*` methods of a visitor to which any number means the same `value`.
macro_rules! numbers_are {
    ($value:expr) => {
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// The `visit_seq` and `visit_map` methods of a visitor to which an array means `$seq` and an
/// object `$map` (one value: both), each skipped unread.
macro_rules! containers_are {
    ($seq:expr, $map:expr) => {
        fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            IgnoredAny.visit_seq(seq).map(|_| $seq)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            IgnoredAny.visit_map(map).map(|_| $map)
        }
    };
    ($both:expr) => {
        containers_are!($both, $both);
    };
}

mod text;
mod values;
pub use values::StreamUsage;
use values::{Count, Enabled, Model, ServerTool, Shape, UsageAsked};

/// Distinct model names kept from one body; past this, the budget's heaviest weight applies.
const MAX_MODELS: usize = 8;

/// What a request asks for: the models it names, the most output it allows, and the body's size
/// (an upper bound on its input tokens: a token is at least one byte).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// The model the path names (the provider reads it there and ignores the body's), else every
    /// distinct `model` of the body. Empty: none named.
    pub models: Vec<String>,
    /// The body names more models than are kept, or is not JSON (a multipart form names its
    /// model in a field keyswap does not read): weighted as the budget's heaviest.
    pub models_overflow: bool,
    /// The largest output limit the body sets, under any provider's name for it.
    pub max_output_tokens: Option<u64>,
    /// Some output limit is not a plain non-negative integer (a string, a fraction, a negative
    /// number, a body that is not valid JSON): the budget's default counts as well.
    pub unreadable_limit: bool,
    /// The body starts as a JSON object but could not be read to its end: what comes after the
    /// point where reading stopped (a limit, a reference) was not seen.
    pub unreadable_body: bool,
    /// Completions generated at once (at least 1); each may use the whole output limit.
    pub choices: u64,
    /// Pieces of input the body refers to instead of carrying, which its size does not bound:
    /// a stored conversation, response or interaction (`previous_response_id`, `conversation`,
    /// `previous_interaction_id`), a stored item (`"type": "item_reference"`), cached content
    /// (`cachedContent`, at any depth), an assistant (`assistant_id`), a stored prompt (`prompt` as an
    /// object), and at any depth an uploaded file (`file_id`, `fileUri`) or a URL the provider
    /// fetches (`image_url`, `file_url`, `audio_url`, `video_url`, the `url` of a `source`; not
    /// `data:` URLs, which the body carries).
    pub references: u64,
    pub body_bytes: u64,
    /// The body asks for the work to run in the background (OpenAI's `"background": true`): the
    /// answer comes before the tokens are spent and never carries their count. Anything but
    /// `false` or `null` counts, as a lax parser may read a string or a number as true.
    pub background: bool,
    /// `stream` is anything but `false` or `null` (read as a lax parser may).
    pub stream: bool,
    pub stream_usage: StreamUsage,
}

impl Demand {
    /// Reads a request body (JSON; anything else names nothing): the models, and the output limit
    /// under any provider's name for it — `max_tokens`, `max_completion_tokens`,
    /// `max_output_tokens`, `maxTokens`, `max_gen_len` (Llama on Bedrock), Gemini's
    /// `generationConfig.maxOutputTokens` (or `generation_config.max_output_tokens`: its JSON
    /// mapping accepts both), Bedrock's `inferenceConfig.maxTokens` (`.max_new_tokens` for Nova)
    /// and `textGenerationConfig.maxTokenCount`, `max_new_tokens` (also in text-generation
    /// servers' `parameters`) — with the completions asked for (`n`, `best_of`,
    /// `num_return_sequences`, `generationConfig.candidateCount`). Never fails. A request without
    /// a body (a model list) generates nothing: its output limit is 0.
    pub fn from_body(body: &[u8], path_model: Option<&str>) -> Demand {
        let mut d = Demand { choices: 1, body_bytes: body.len() as u64, ..Demand::default() };
        // JSON with a byte-order mark, or in UTF-16/32: parsers that detect the encoding (Python's
        // `json.loads` on bytes) read it, so keyswap reads it too.
        let decoded = text::utf8_json(body);
        let body = match &decoded {
            Some(Ok(text)) => text.as_bytes(),
            // Marked or laid out as such an encoding, and not decodable in it: unreadable (400),
            // never read as an empty body (which generates nothing: 0 output reserved).
            Some(Err(())) => {
                d.unreadable_limit = true;
                d.unreadable_body = true;
                &[]
            }
            None => body,
        };
        if d.unreadable_body {
        } else if body.is_empty() {
            d.max_output_tokens = Some(0);
        } else if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            // A lone surrogate escape (a string a JavaScript client cut inside an emoji) stops
            // serde_json; Go reads it as U+FFFD and Python and JavaScript keep it, so the body is
            // read again that way.
            let read = d.read_object(body).or_else(|()| {
                let replaced = text::lone_surrogates_replaced(body).ok_or(())?;
                d = Demand { choices: 1, body_bytes: d.body_bytes, ..Demand::default() };
                d.read_object(&replaced)
            });
            match read {
                Ok(true) => {}
                // Bytes after the object: Python and JavaScript refuse such a body, Go and Java
                // read its first object, read whole here. The default counts as well.
                Ok(false) => d.unreadable_limit = true,
                // What was read before the error counts; what comes after it went unseen.
                Err(()) => {
                    d.unreadable_limit = true;
                    d.unreadable_body = true;
                }
            }
        } else {
            // Not JSON (`multipart/form-data`: OpenAI's image edits, transcriptions): its model is
            // in a form field, unread, and a `model=` there must not weigh 1.
            d.models_overflow = true;
        }
        // Where the provider reads the model from the path, a `model` in the body is ignored by
        // it: the path's counts (an agent must not pick a cheaper weight that way).
        if let Some(m) = path_model {
            d.models = vec![m.to_owned()];
            d.models_overflow = false;
        }
        d
    }

    /// Reads the object `body` starts with: `Ok(true)` when nothing but whitespace follows it,
    /// `Ok(false)` when more does, `Err` when the object itself cannot be read to its end.
    fn read_object(&mut self, body: &[u8]) -> Result<bool, ()> {
        let mut de = serde_json::Deserializer::from_slice(body);
        Section::Top.read(Acc(self), &mut de).map_err(drop)?;
        Ok(de.end().is_ok())
    }

    /// The output tokens to reserve when the budget's default is `default`.
    /// Whether the body named an output limit keyswap read (`max_tokens` and its kin).
    pub fn output_bounded(&self) -> bool {
        self.max_output_tokens.is_some() && !self.unreadable_limit
    }

    pub fn output_tokens(&self, default: u64) -> u64 {
        let limit = match self.max_output_tokens {
            Some(m) if self.unreadable_limit => m.max(default),
            Some(m) => m,
            None => default,
        };
        limit.saturating_mul(self.choices.max(1))
    }

    fn limit(&mut self, c: Count) {
        self.unreadable_limit |= c.unreadable;
        if c.value.is_some() {
            self.max_output_tokens = self.max_output_tokens.max(c.value);
        }
    }

    fn choices(&mut self, c: Count) {
        if let Some(n) = c.value {
            self.choices = self.choices.max(n);
        }
    }

    /// A URL the provider fetches: counted unless the body carries the data itself.
    fn fetched(&mut self, url: Shape) {
        if matches!(url, Shape::Other) {
            self.references += 1;
        }
    }

    fn model(&mut self, m: String) {
        if m.is_empty() || self.models.contains(&m) {
            return;
        }
        if self.models.len() == MAX_MODELS {
            self.models_overflow = true;
        } else {
            self.models.push(m);
        }
    }
}

/// Which object is being read: the body, or one of the providers' nested generation settings.
#[derive(Clone, Copy)]
enum Section {
    Top,
    Nested,
}

/// The keys that matter, recognised without allocating.
enum Key {
    Model,
    Limit,
    Choices,
    Nested,
    /// Refers to stored input when it has a value (a string or an object).
    Reference,
    /// `prompt`: a stored prompt when an object (`{"id": …}`), text when a string.
    Prompt,
    Background,
    Stream,
    StreamOptions,
    /// Any other key: its value is scanned for input it refers to (`referring` names the key's
    /// own kind, if any).
    Other(Option<KeyKind>),
}

impl Section {
    fn key(self, name: &str) -> Key {
        match (self, name) {
            (Section::Top, "model") => Key::Model,
            (
                Section::Top,
                "max_tokens"
                | "max_completion_tokens"
                | "max_output_tokens"
                | "maxTokens"
                | "max_gen_len"
                | "max_new_tokens",
            ) => Key::Limit,
            (Section::Top, "n" | "best_of" | "num_return_sequences" | "num_generations") => Key::Choices,
            (
                Section::Top,
                "generationConfig"
                | "generation_config"
                | "inferenceConfig"
                | "inference_config"
                | "textGenerationConfig"
                | "parameters",
            ) => Key::Nested,
            (
                Section::Nested,
                "maxOutputTokens" | "max_output_tokens" | "maxTokens" | "max_tokens" | "maxTokenCount"
                | "max_new_tokens",
            ) => Key::Limit,
            (
                Section::Nested,
                "candidateCount" | "candidate_count" | "n" | "best_of" | "num_return_sequences" | "num_generations",
            ) => Key::Choices,
            (
                Section::Top,
                "previous_response_id"
                    | "previous_interaction_id"
                    | "conversation"
                    | "cachedContent"
                    | "cached_content"
                    | "assistant_id"
                // Remote MCP servers (Anthropic), web search options (OpenAI search models).
                | "mcp_servers" | "web_search_options",
            ) => Key::Reference,
            (Section::Top, "prompt") => Key::Prompt,
            (Section::Top, "background") => Key::Background,
            (Section::Top, "stream") => Key::Stream,
            (Section::Top, "stream_options") => Key::StreamOptions,
            _ => Key::Other(referring(name)),
        }
    }
}

/// The demand being filled in while one object is read.
struct Acc<'a>(&'a mut Demand);

impl Section {
    /// Reads one object of this section into `acc`.
    fn read<'de, D: Deserializer<'de>>(self, acc: Acc<'_>, de: D) -> Result<(), D::Error> {
        de.deserialize_any(ObjectVisitor { section: self, acc })
    }
}

struct ObjectVisitor<'a> {
    section: Section,
    acc: Acc<'a>,
}

impl<'de> Visitor<'de> for ObjectVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let ObjectVisitor { section, acc: Acc(d) } = self;
        while let Some(key) = map.next_key_seed(KeySeed(section))? {
            match key {
                Key::Model => {
                    if let Some(m) = map.next_value::<Option<Model>>()?.and_then(|m| m.0) {
                        d.model(m);
                    }
                }
                Key::Limit => d.limit(map.next_value()?),
                Key::Choices => d.choices(map.next_value()?),
                Key::Nested => map.next_value_seed(NestedSeed(Acc(d)))?,
                Key::Reference => {
                    if !matches!(map.next_value::<Shape>()?, Shape::Nothing) {
                        d.references += 1;
                    }
                }
                Key::Prompt => {
                    if matches!(map.next_value::<Shape>()?, Shape::Object) {
                        d.references += 1;
                    }
                }
                Key::Background => d.background |= map.next_value::<Enabled>()?.0,
                Key::Stream => d.stream |= map.next_value::<Enabled>()?.0,
                Key::StreamOptions => {
                    let asked = map.next_value::<UsageAsked>()?.0 && d.stream_usage != StreamUsage::NotAsked;
                    d.stream_usage = if asked { StreamUsage::Asked } else { StreamUsage::NotAsked };
                }
                Key::Other(kind) => read_value(d, kind, false, &mut map)?,
            }
        }
        Ok(())
    }

    // Anything but an object (where one is read) names nothing.
    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        IgnoredAny.visit_seq(seq).map(drop)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    scalars_are!((), unit);
}

/// Any other value, searched at every depth for input it refers to.
struct Scan<'a> {
    d: &'a mut Demand,
    /// An object whose `url` the provider fetches (a `source`, an `image_url` object).
    url_holder: bool,
}

/// The value of a key named `kind` ([`referring`]; `None`: any other key), read for the input
/// it refers to; `url_holder`: the object it is in is one whose `url` the provider fetches.
fn read_value<'de, A: MapAccess<'de>>(
    d: &mut Demand,
    kind: Option<KeyKind>,
    url_holder: bool,
    map: &mut A,
) -> Result<(), A::Error> {
    match kind {
        Some(KeyKind::Url) if url_holder => d.fetched(map.next_value::<Shape>()?),
        Some(KeyKind::Fetched) => map.next_value_seed(Scan { d, url_holder: true })?,
        Some(KeyKind::Holder) => map.next_value_seed(Holder(Scan { d, url_holder: true }))?,
        Some(KeyKind::Stored) => {
            if !matches!(map.next_value::<Shape>()?, Shape::Nothing) {
                d.references += 1;
            }
        }
        Some(KeyKind::Type) => d.references += u64::from(map.next_value::<ServerTool>()?.0),
        Some(KeyKind::Tool) => {
            if matches!(map.next_value::<Shape>()?, Shape::Object) {
                d.references += 1;
            }
        }
        _ => map.next_value_seed(Scan { d, url_holder: false })?,
    }
    Ok(())
}

/// Keys whose value is input the provider fetches or holds, at any depth.
fn referring(key: &str) -> Option<KeyKind> {
    match key {
        "url" => Some(KeyKind::Url),
        // A URL, or an object whose `url` is one.
        "image_url" | "file_url" | "audio_url" | "video_url" => Some(KeyKind::Fetched),
        // An object whose `url` is one (Anthropic's `source`); a string there is no URL.
        "source" => Some(KeyKind::Holder),
        // Cached content also nested: Gemini's OpenAI-compatible `extra_body.google.cached_content`.
        "file_id" | "fileUri" | "file_uri" | "cached_content" | "cachedContent" => Some(KeyKind::Stored),
        // A tool the provider runs itself: by its `type` (OpenAI, Anthropic), or by its key
        // (Gemini's `tools: [{"url_context": {}}]`).
        "type" => Some(KeyKind::Type),
        "url_context"
        | "urlContext"
        | "google_search"
        | "googleSearch"
        | "google_search_retrieval"
        | "googleSearchRetrieval"
        | "code_execution"
        | "codeExecution" => Some(KeyKind::Tool),
        _ => None,
    }
}

impl<'de> DeserializeSeed<'de> for Scan<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Scan<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Scan { d, url_holder } = self;
        while let Some(key) = map.next_key::<KeyText>()? {
            read_value(d, key.0, url_holder, &mut map)?;
        }
        Ok(())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Scan { d, .. } = self;
        while seq.next_element_seed(Scan { d: &mut *d, url_holder: false })?.is_some() {}
        Ok(())
    }

    /// A URL given directly as the value of a referring key (`"image_url": "https://…"`).
    fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
        if self.url_holder {
            self.d.fetched(Shape::of_str(s));
        }
        Ok(())
    }
    scalars_are!((), unit);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Url,
    Fetched,
    Holder,
    Stored,
    Type,
    Tool,
}

/// The value of a `source`: an object is scanned as a URL holder; anything else names nothing.
struct Holder<'a>(Scan<'a>);

impl<'de> DeserializeSeed<'de> for Holder<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Holder<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.0.visit_map(map)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        Scan { url_holder: false, ..self.0 }.visit_seq(seq)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    scalars_are!((), unit);
}

/// An object key inside the scan, recognised without allocating.
struct KeyText(Option<KeyKind>);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<KeyText, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<KeyText, E> {
                Ok(KeyText(referring(key)))
            }
        }
        de.deserialize_str(V)
    }
}

struct NestedSeed<'a>(Acc<'a>);

impl<'de> DeserializeSeed<'de> for NestedSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        Section::Nested.read(self.0, de)
    }
}

struct KeySeed(Section);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Key, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    // serde_json hands over keys with escapes resolved (`max\u005ftokens` is `max_tokens`).
    fn visit_str<E: de::Error>(self, name: &str) -> Result<Key, E> {
        Ok(self.0.key(name))
    }
}
