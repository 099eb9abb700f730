//! YAML documents → typed objects. Strict about keyswap's own kinds, quiet about others.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use secrecy::{ExposeSecret as _, SecretSlice};
use serde::de::DeserializeOwned;
use serde::Deserialize as _;
use serde_yaml_ng::Value;

use super::error::{ConfigError, Origin};
use crate::api::{
    AIProviderRouteSpec, CredentialInjectionPolicySpec, EgressGatewaySpec, ObjectMeta, TokenBudgetSpec, API_VERSION,
    GROUP,
};
pub use crate::vocab::{Key, DEFAULT_NAMESPACE};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    EgressGateway,
    AIProviderRoute,
    CredentialInjectionPolicy,
    TokenBudget,
    Secret,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::EgressGateway => "EgressGateway",
            Kind::AIProviderRoute => "AIProviderRoute",
            Kind::CredentialInjectionPolicy => "CredentialInjectionPolicy",
            Kind::TokenBudget => "TokenBudget",
            Kind::Secret => "Secret",
        }
    }
}

/// The decoded keys of a Secret. Values never appear in `Debug`.
#[derive(Default)]
pub struct SecretData {
    pub entries: BTreeMap<String, SecretSlice<u8>>,
    /// `metadata.labels` (agent API-key Secrets are found by label).
    pub labels: BTreeMap<String, String>,
}

/// Cloned by hand: `SecretSlice` is not `Clone` (the file source caches parsed files).
impl Clone for SecretData {
    fn clone(&self) -> Self {
        let entries =
            self.entries.iter().map(|(k, v)| (k.clone(), SecretSlice::from(v.expose_secret().to_vec()))).collect();
        SecretData { entries, labels: self.labels.clone() }
    }
}

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretData").field("keys", &self.entries.keys().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
pub enum Resource {
    Gateway(EgressGatewaySpec),
    Route(AIProviderRouteSpec),
    Policy(CredentialInjectionPolicySpec),
    Budget(TokenBudgetSpec),
    Secret(SecretData),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Gateway(_) => Kind::EgressGateway,
            Resource::Route(_) => Kind::AIProviderRoute,
            Resource::Policy(_) => Kind::CredentialInjectionPolicy,
            Resource::Budget(_) => Kind::TokenBudget,
            Resource::Secret(_) => Kind::Secret,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Object {
    pub origin: Origin,
    pub key: Key,
    pub resource: Resource,
}

impl Object {
    /// `Kind namespace/name`, as used in error messages and logs.
    pub fn label(&self) -> String {
        format!("{} {}", self.resource.kind().as_str(), self.key)
    }
}

/// The largest manifest file read, in bytes (1 MiB, the largest object Kubernetes stores).
/// Checked before reading; it also bounds what aliases may expand to (see [`prescan`]).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// The deepest nesting a manifest may have: block indentation levels plus flow brackets
/// (`[`/`{`), counted together. keyswap's own resources need about 8, CustomResourceDefinition
/// schemas about 20; the YAML parser itself stops at 128 (but only after scanning everything).
pub const MAX_NESTING: usize = 64;

/// Refuses, before the YAML parser sees it, text whose parse would cost far more than its size:
/// nesting deeper than [`MAX_NESTING`] (the parser slows down with every open flow collection:
/// 100,000 nested `{a: ` took over two minutes) and aliases that could expand past
/// [`MAX_MANIFEST_BYTES`] (each alias can at most double what came before it, so the bound is
/// `bytes × 2^aliases`; 16 nested aliases in 58 KB took 8 s). One pass over the bytes, no
/// allocation beyond the indentation stack (itself bounded by the limit). Quoted scalars,
/// comments and block scalars are skipped, so brackets inside strings do not count.
pub fn prescan(text: &str) -> Result<(), String> {
    let mut scan = Prescan::default();
    for (i, line) in text.split('\n').enumerate() {
        scan.line(line.strip_suffix('\r').unwrap_or(line).as_bytes())
            .map_err(|m| format!("line {}: {m}; refused before parsing", i + 1))?;
    }
    let aliases = scan.aliases;
    let bytes = text.len() as u64;
    if aliases > 0 && (aliases >= 64 || bytes > MAX_MANIFEST_BYTES >> aliases) {
        let allowed = (MAX_MANIFEST_BYTES / bytes.max(1)).checked_ilog2().unwrap_or(0);
        return Err(format!(
            "{aliases} YAML aliases (`*name`) in {bytes} bytes could expand past the {MAX_MANIFEST_BYTES}-byte \
             limit (bytes × 2^aliases); a file this size may hold at most {allowed}; refused before parsing"
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Prescan {
    /// Columns of the open block nodes (the document root is not on it).
    block: Vec<i64>,
    flow: usize,
    aliases: u32,
    /// Inside a quoted scalar that continues on the next line: its quote byte.
    quote: Option<u8>,
    /// Inside a block scalar (`|`, `>`): the parent's column, and the content's once known.
    block_scalar: Option<(i64, Option<i64>)>,
    /// The previous line ended where a node may begin (after `key:`, `- `, `[`, `,`), not
    /// inside a plain scalar that may continue on this line.
    expect_node: bool,
}

impl Prescan {
    fn depth_check(&self) -> Result<(), String> {
        let depth = self.block.len() + self.flow;
        if depth > MAX_NESTING {
            return Err(format!("nesting deeper than {MAX_NESTING} levels (block indentation plus `[`/`{{`)"));
        }
        Ok(())
    }

    fn line(&mut self, line: &[u8]) -> Result<(), String> {
        let indent = line.iter().take_while(|&&b| b == b' ').count();
        let blank = line[indent..].iter().all(|b| b.is_ascii_whitespace());
        let col = indent as i64;
        let marker = (line.starts_with(b"---") || line.starts_with(b"..."))
            && (line.len() == 3 || line[3] == b' ' || line[3] == b'\t');
        if let Some((parent, content)) = self.block_scalar {
            let inside = match content {
                _ if blank => true,
                Some(c) => col >= c,
                None => col > parent,
            };
            if inside && !marker {
                self.block_scalar = Some((parent, content.or(Some(col).filter(|_| !blank))));
                return Ok(());
            }
            self.block_scalar = None;
            self.expect_node = true;
        }
        if let Some(q) = self.quote {
            return match skip_quoted(line, 0, q) {
                Some(end) => {
                    self.quote = None;
                    self.tokens(line, end, false)
                }
                None => Ok(()),
            };
        }
        if marker {
            self.block.clear();
            self.flow = 0;
            return self.tokens(line, 3, true);
        }
        if blank || line[indent] == b'#' {
            return Ok(());
        }
        if self.flow > 0 {
            return self.tokens(line, indent, self.expect_node);
        }
        // A more indented line after a plain scalar continues that scalar.
        if !self.expect_node && self.block.last().is_some_and(|&top| col > top) {
            return self.tokens(line, indent, false);
        }
        while self.block.last().is_some_and(|&top| top > col) {
            self.block.pop();
        }
        if self.block.last() != Some(&col) {
            self.block.push(col);
        }
        // Compact nesting on one line: `- - - x`, `? - x`.
        let mut i = indent;
        while i < line.len()
            && matches!(line[i], b'-' | b'?' | b':')
            && line.get(i + 1).is_none_or(|b| *b == b' ' || *b == b'\t')
        {
            i += 1;
            while i < line.len() && (line[i] == b' ' || line[i] == b'\t') {
                i += 1;
            }
            self.block.push(i as i64);
        }
        self.depth_check()?;
        self.tokens(line, i, true)
    }

    /// The rest of a line from `i`; `node_start`: a node may begin here (not inside a plain scalar).
    fn tokens(&mut self, line: &[u8], mut i: usize, mut node_start: bool) -> Result<(), String> {
        let mut after_space = true;
        while i < line.len() {
            let b = line[i];
            let next_blank = line.get(i + 1).is_none_or(|n| *n == b' ' || *n == b'\t');
            match b {
                b' ' | b'\t' => {
                    after_space = true;
                    i += 1;
                    continue;
                }
                b'#' if after_space => break,
                b'"' | b'\'' if node_start => match skip_quoted(line, i + 1, b) {
                    Some(end) => {
                        i = end;
                        node_start = false;
                    }
                    None => {
                        self.quote = Some(b);
                        return Ok(());
                    }
                },
                b'[' | b'{' if node_start || self.flow > 0 => {
                    self.flow += 1;
                    self.depth_check()?;
                    i += 1;
                    node_start = true;
                }
                b']' | b'}' if self.flow > 0 => {
                    self.flow -= 1;
                    i += 1;
                    node_start = false;
                }
                b',' if self.flow > 0 => {
                    i += 1;
                    node_start = true;
                }
                b':' if next_blank || (self.flow > 0 && matches!(line.get(i + 1), Some(b',' | b']' | b'}'))) => {
                    i += 1;
                    node_start = true;
                }
                b'-' | b'?' if node_start && next_blank => i += 1,
                b'&' | b'!' | b'*' if node_start && !next_blank => {
                    if b == b'*' {
                        self.aliases += 1;
                    }
                    i += 1;
                    while i < line.len() && !matches!(line[i], b' ' | b'\t' | b',' | b'[' | b']' | b'{' | b'}') {
                        i += 1;
                    }
                    node_start = b != b'*';
                }
                b'|' | b'>' if node_start && self.flow == 0 => {
                    // The rest of the line is the header and maybe a comment.
                    let parent = self.block.last().copied().unwrap_or(-1);
                    self.block_scalar = Some((parent, None));
                    return Ok(());
                }
                _ => {
                    // A plain scalar: inside flow collections it ends at an indicator.
                    i += 1;
                    node_start = false;
                }
            }
            after_space = false;
        }
        self.expect_node = node_start;
        Ok(())
    }
}

/// The index just past the closing quote, or `None` when the scalar continues on the next line.
fn skip_quoted(line: &[u8], mut i: usize, quote: u8) -> Option<usize> {
    while i < line.len() {
        match line[i] {
            b'\\' if quote == b'"' => i += 2,
            b'\'' if quote == b'\'' && line.get(i + 1) == Some(&b'\'') => i += 2,
            b if b == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Parses every document of one file. Errors do not stop the other documents from being read,
/// so one pass reports everything. Text that fails [`prescan`] is refused unparsed.
pub fn parse_file(origin_file: &std::path::Path, text: &str) -> (Vec<Object>, Vec<ConfigError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    if let Err(message) = prescan(text) {
        errors.push(ConfigError::new(message).at(&Origin { file: origin_file.to_path_buf(), document: 1 }));
        return (objects, errors);
    }
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let origin = Origin { file: origin_file.to_path_buf(), document: i + 1 };
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                // A syntax error ends the stream: the parser cannot find the next document.
                // The document may be a Secret: a tagged value (`!!int sk-…`) is quoted by the
                // parser's message, so quoted text is left out (the line and column stay).
                errors.push(ConfigError::new(format!("not valid YAML: {}", unquoted(&e.to_string()))).at(&origin));
                break;
            }
        };
        match parse_object(value, &origin) {
            Ok(Some(obj)) => {
                if let Resource::Budget(TokenBudgetSpec { unparsed: Some((field, message)), .. }) = &obj.resource {
                    let object = format!("{} {}", Kind::TokenBudget.as_str(), obj.key);
                    errors.push(ConfigError::new(message.clone()).at(&origin).object(object).field(field.clone()));
                }
                objects.push(obj)
            }
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    (objects, errors)
}

fn parse_object(value: Value, origin: &Origin) -> Result<Option<Object>, ConfigError> {
    let Value::Mapping(mut map) = value else {
        return match value {
            Value::Null => Ok(None), // empty document, e.g. a trailing `---`
            _ => Err(ConfigError::new("a document must be a mapping with apiVersion and kind").at(origin)),
        };
    };
    let api_version = take_str(&mut map, "apiVersion").map_err(|m| m.at(origin))?;
    let kind = take_str(&mut map, "kind").map_err(|m| m.at(origin))?;
    let meta: ObjectMeta = match map.remove("metadata") {
        Some(m) => typed(m, "metadata").map_err(|e| e.at(origin))?,
        None => ObjectMeta::default(),
    };
    let kind = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Secret") => Kind::Secret,
        (API_VERSION, "EgressGateway") => Kind::EgressGateway,
        (API_VERSION, "AIProviderRoute") => Kind::AIProviderRoute,
        (API_VERSION, "CredentialInjectionPolicy") => Kind::CredentialInjectionPolicy,
        (API_VERSION, "TokenBudget") => Kind::TokenBudget,
        (v, k) if v.starts_with(&format!("{GROUP}/")) => {
            return Err(ConfigError::new(format!(
                "unknown keyswap resource `{v}` `{k}`; this build reads {API_VERSION} EgressGateway, \
                 AIProviderRoute, CredentialInjectionPolicy and TokenBudget"
            ))
            .at(origin));
        }
        (v, k) => {
            tracing::debug!(file = %origin, api_version = v, kind = k, "skipping a resource keyswap does not read");
            return Ok(None);
        }
    };
    let name = meta.name.filter(|n| !n.is_empty());
    let namespace = meta.namespace.filter(|n| !n.is_empty()).unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let Some(name) = name else {
        return Err(ConfigError::new("is required").at(origin).object(kind.as_str()).field("metadata.name"));
    };
    let key = Key::new(namespace, name);
    let label = format!("{} {}", kind.as_str(), key);
    let err = |e: ConfigError| e.at(origin).object(label.clone());

    let resource = if kind == Kind::Secret {
        let mut data = parse_secret(map).map_err(err)?;
        data.labels = meta.labels;
        Resource::Secret(data)
    } else {
        let spec = map.remove("spec");
        map.remove("status");
        if let Some((k, _)) = map.iter().next() {
            let k = k.as_str().unwrap_or("?").to_owned();
            return Err(err(
                ConfigError::new("unknown top-level field; expected apiVersion, kind, metadata, spec").field(k)
            ));
        }
        let Some(spec) = spec else {
            return Err(err(ConfigError::new("is required").field("spec")));
        };
        match kind {
            Kind::EgressGateway => Resource::Gateway(typed(spec, "spec").map_err(err)?),
            Kind::AIProviderRoute => Resource::Route(typed(spec, "spec").map_err(err)?),
            Kind::CredentialInjectionPolicy => Resource::Policy(typed(spec, "spec").map_err(err)?),
            Kind::TokenBudget => Resource::Budget(budget_spec(spec).map_err(err)?),
            Kind::Secret => unreachable!(),
        }
    };
    Ok(Some(Object { origin: origin.clone(), key, resource }))
}

/// A TokenBudget's spec. One that does not parse but still names its parents is kept as
/// [`TokenBudgetSpec::unparsed`]: its routes fail closed (a typo never lifts a limit, even when no
/// earlier version of the file is in effect); [`parse_file`] reports the error all the same.
fn budget_spec(spec: Value) -> Result<TokenBudgetSpec, ConfigError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Parents {
        parent_refs: Vec<crate::api::ParentRef>,
    }
    typed(spec.clone(), "spec").or_else(|e| match serde_yaml_ng::from_value::<Parents>(spec) {
        Ok(p) if !p.parent_refs.is_empty() => {
            Ok(TokenBudgetSpec::unparsed(p.parent_refs, e.field.unwrap_or_else(|| "spec".into()), e.message))
        }
        _ => Err(e),
    })
}

fn take_str(map: &mut serde_yaml_ng::Mapping, field: &str) -> Result<String, ConfigError> {
    match map.remove(field) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ConfigError::new("must be a string").field(field)),
        None => Err(ConfigError::new("is required").field(field)),
    }
}

/// Deserializes a non-secret value, reporting the full path of the offending field. The values of
/// [`SECRET_FIELDS`] (collector credentials written inline) are never quoted; elsewhere a value
/// of the wrong type or an unknown variant is not quoted either (a key pasted where a
/// `secretRef`, a Redis store or a `target` goes), while the names the parser expected are.
fn typed<T: DeserializeOwned>(value: Value, prefix: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { prefix.to_owned() } else { format!("{prefix}.{path}") };
        let message = e.into_inner().to_string();
        // A short value is a typo worth showing (`deny-some`, `anthropic` where a map goes); a long
        // one may be a key pasted in the wrong place.
        let long_value = first_quoted(&message).is_some_and(|v| !quotable(&v));
        let quotes_a_value =
            long_value && ["invalid type", "invalid value", "unknown variant"].iter().any(|p| message.starts_with(p));
        let message = match SECRET_FIELDS.iter().any(|f| field.starts_with(f)) {
            true => unquoted(&message),
            false if quotes_a_value => match message.split_once(", expected") {
                Some((value, expected)) => format!("{}, expected{expected}", unquoted(value)),
                None => unquoted(&message),
            },
            false => message,
        };
        ConfigError::new(message).field(field)
    })
}

/// The longest value a type error quotes back (credentials are longer: 32 hex digits and up).
const MAX_QUOTED_VALUE: usize = 24;

/// Whether an error may quote `v` back: short, and no URL or `user:password@` (a key pasted into
/// the wrong field, a URL with its credentials).
fn quotable(v: &str) -> bool {
    v.len() <= MAX_QUOTED_VALUE && !v.contains(['@', '\\']) && !v.contains("://")
}

/// How an error names a value an operator wrote: quoted (`` `deny-some` ``) when [`quotable`],
/// else only its length (a pasted key or a URL with credentials stays out of logs and status).
pub(crate) fn shown(v: &str) -> String {
    if quotable(v) {
        format!("`{v}`")
    } else {
        format!("the value ({} bytes, not shown)", v.len())
    }
}

/// Fields of keyswap's resources whose values may be credentials.
const SECRET_FIELDS: &[&str] = &["spec.otlp.headers"];

/// A parser's message in parts: text outside quotes (`None`), and each quoted value with its
/// quote (`"…"` with Debug escapes: `\\"` inside does not end it; or `` `…` ``), the quotes left
/// out. A quote never closed runs to the end.
fn quoted_parts(message: &str) -> Vec<(Option<char>, String)> {
    let mut parts: Vec<(Option<char>, String)> = vec![(None, String::new())];
    let mut escaped = false;
    for c in message.chars() {
        let open = parts.last().and_then(|p| p.0);
        match open {
            Some(_) if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => {
                parts.push((None, String::new()));
                continue;
            }
            Some(_) => {}
            None if c == '"' || c == '`' => {
                parts.push((Some(c), String::new()));
                continue;
            }
            None => {}
        }
        if let Some(last) = parts.last_mut() {
            last.1.push(c);
        }
    }
    parts
}

/// What a parser's message quotes first.
fn first_quoted(message: &str) -> Option<String> {
    quoted_parts(message).into_iter().find(|p| p.0.is_some()).map(|p| p.1)
}

/// A parser's message with what it quotes (`"…"`, `` `…` ``: the offending value) left out.
fn unquoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let parts = quoted_parts(message);
    let last = parts.len() - 1;
    for (i, (quote, text)) in parts.into_iter().enumerate() {
        match quote {
            None => out.push_str(&text),
            // An unclosed quote (the message's end) shows its opening only, as before.
            Some(q) if i == last => out.push(q),
            Some(q) => {
                out.push(q);
                out.push('…');
                out.push(q);
            }
        }
    }
    out
}

/// Secrets are parsed by hand so that no error message can quote a value.
fn parse_secret(mut map: serde_yaml_ng::Mapping) -> Result<SecretData, ConfigError> {
    let mut out = SecretData::default();
    for field in ["type", "immutable"] {
        map.remove(field);
    }
    let data = map.remove("data");
    let string_data = map.remove("stringData");
    if let Some((k, _)) = map.iter().next() {
        let k = k.as_str().unwrap_or("?").to_owned();
        return Err(ConfigError::new("unknown field in a Secret; expected data, stringData, type, immutable").field(k));
    }
    for (field, value, is_base64) in [("data", data, true), ("stringData", string_data, false)] {
        let entries = match value {
            None | Some(Value::Null) => continue,
            Some(Value::Mapping(m)) => m,
            Some(_) => return Err(ConfigError::new("must be a mapping of key to value").field(field)),
        };
        for (k, v) in entries {
            let Value::String(k) = k else {
                return Err(ConfigError::new("keys must be strings").field(field));
            };
            let path = format!("{field}.{k}");
            let raw = match v {
                Value::String(s) => s,
                Value::Null => String::new(),
                _ => return Err(ConfigError::new("must be a string (quote it)").field(path)),
            };
            let bytes = if is_base64 {
                // Kubernetes accepts standard base64 with padding; tolerate wrapped lines.
                let compact: String = raw.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                base64::engine::general_purpose::STANDARD
                    .decode(compact.as_bytes())
                    .map_err(|_| ConfigError::new("is not valid base64").field(path.clone()))?
            } else {
                raw.into_bytes()
            };
            let _ = path;
            out.entries.insert(k, SecretSlice::from(bytes));
        }
    }
    Ok(out)
}

/// Values a Header or QueryParam policy writes end up in HTTP header values and query strings:
/// refuse what cannot travel there. (Provider authentication reads multi-line values, such as a
/// service-account JSON key, so this is checked where a policy binds a value, not at load.)
pub(crate) fn validate_secret_value(bytes: &[u8]) -> Result<(), &'static str> {
    if bytes.is_empty() {
        return Err("is empty");
    }
    if bytes.ends_with(b"\n") {
        return Err("ends with a newline, which cannot travel in an HTTP header; \
                    write the value without one (printf '%s' …, or kubectl create secret generic --from-literal)");
    }
    if bytes.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Err("contains a line break (CR or LF), which cannot travel in an HTTP header");
    }
    if bytes.contains(&0) {
        return Err("contains a NUL byte, which cannot travel in an HTTP header");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::path::Path;

    fn parse(text: &str) -> (Vec<Object>, Vec<ConfigError>) {
        parse_file(Path::new("t.yaml"), text)
    }

    #[test]
    fn prescan_accepts_every_manifest_in_the_repository() {
        fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                    out.push(p);
                }
            }
        }
        let mut files = Vec::new();
        walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests"), &mut files);
        assert!(files.len() > 5, "{files:?}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            prescan(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
    }

    #[test]
    fn prescan_refuses_deep_flow_and_block_nesting_naming_line_and_limit() {
        let deep = |text: String| {
            let started = std::time::Instant::now();
            let e = prescan(&text).unwrap_err();
            assert!(started.elapsed() < std::time::Duration::from_millis(500), "slow pre-scan");
            assert!(e.contains("nesting deeper than 64 levels"), "{e}");
            e
        };
        assert!(deep("[".repeat(100_000)).starts_with("line 1:"));
        deep(format!("k: {}", "{a: ".repeat(100_000)));
        deep(format!("{}x\n", "- ".repeat(100_000)));
        let indented: String = (0..100).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
        assert!(deep(indented).starts_with("line 65:"));
        // Inside flow collections that span lines, indentation does not hide brackets.
        deep(format!("k: [\n{}\n", "  [\n".repeat(100)));
        // Just under the limit is fine, and closing brackets count down.
        prescan(&format!("k: {}{}\nl: {}{}", "[".repeat(63), "]".repeat(63), "[".repeat(63), "]".repeat(63))).unwrap();
    }

    #[test]
    fn prescan_ignores_brackets_in_strings_comments_and_block_scalars_but_not_after_them() {
        let b = "[{".repeat(100);
        for ok in [
            format!("k: \"{b}\"\n"),
            format!("k: '{b}''{b}'\n"),
            format!("k: \"a\\\"{b}\"\n"),
            format!("k: \"multi\n  line {b}\n  \"\n"),
            format!("# {b}\nk: v # {b}\n"),
            format!("k: a{b}\n"),
            format!("k: |\n  {b}\n\n  {b}\nl: v\n"),
            format!("- k: >-\n    {b}\n  l: v\n"),
            format!("k: [\"{b}\", '{b}']\n"),
        ] {
            prescan(&ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let deeper = "[".repeat(100);
        for bad in [
            format!("k: \"s\"\nl: {deeper}\n"),
            format!("k: |\n  text\nl: {deeper}\n"),
            format!("- k: |\n    text\n  l: {deeper}\n"),
            // A quote inside a continued plain scalar opens nothing.
            format!("k: abc\n  'x\nl: {deeper}\n"),
            format!("k: [abc,\n  d 'x, {deeper}\n"),
            format!("---\nk: v\n--- {deeper}\n"),
        ] {
            assert!(prescan(&bad).unwrap_err().contains("nesting"), "{bad}");
        }
    }

    #[test]
    fn prescan_bounds_what_aliases_can_expand_to() {
        // Billion laughs: nine aliases per level, nine levels, in 600 bytes.
        let mut bomb = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..9 {
            bomb += &format!("a{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 9].join(", "));
        }
        let e = prescan(&bomb).unwrap_err();
        assert!(e.contains("72 YAML aliases") && e.contains("1048576-byte limit"), "{e}");
        // A few aliases in a small file are fine; the same count in a large one is not.
        let few = "base: &b {x: 1}\none: *b\ntwo: *b\nthree: *b\n";
        prescan(few).unwrap();
        let large = format!("{few}pad: \"{}\"\n", "x".repeat(200_000));
        let e = prescan(&large).unwrap_err();
        assert!(e.contains("at most 2"), "{e}");
        // Anchors, tags and `*` inside scalars are not aliases.
        prescan(&format!("{}path: /v1/*\nhost: \"*.example.com\"\nt: !!str 5\n", "a: &x 1\n".repeat(100))).unwrap();
    }

    #[test]
    fn parse_file_refuses_unparsed_and_names_file_and_limit() {
        let (objs, errs) =
            parse(&format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\nstringData: {}\n", "[".repeat(200)));
        assert!(objs.is_empty());
        let msg = errs[0].to_string();
        assert!(msg.starts_with("t.yaml: line 4: nesting deeper than 64 levels"), "{msg}");
        assert!(msg.ends_with("refused before parsing"), "{msg}");
    }

    #[test]
    fn multi_document_files_load_every_object_and_skip_foreign_kinds() {
        let (objs, errs) = parse(
            "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: egress, namespace: agents}\nspec: {defaultPolicy: allow-all}\n\
             ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {whatever: 1}\n\
             ---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {token: c2stcmVhbA==}\nstringData: {other: plain}\n---\n",
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].key, Key::new("agents", "egress"));
        let Resource::Secret(s) = &objs[1].resource else { panic!() };
        assert_eq!(s.entries["token"].expose_secret(), b"sk-real");
        assert_eq!(s.entries["other"].expose_secret(), b"plain");
        assert_eq!(objs[1].origin.document, 3);
    }

    #[test]
    fn a_typo_in_a_field_names_file_object_and_field() {
        let (_, errs) = parse(
            "apiVersion: keyswap.dev/v1alpha1\nkind: AIProviderRoute\nmetadata: {name: r}\n\
             spec:\n  parentRefs: [{name: egress}]\n  rules:\n  - matches:\n    - provider: openai\n      hostz: [a]\n",
        );
        assert_eq!(errs.len(), 1);
        let msg = errs[0].to_string();
        assert!(msg.starts_with("t.yaml: AIProviderRoute default/r: field `spec.rules[0].matches[0]"), "{msg}");
        assert!(msg.contains("unknown field `hostz`"), "{msg}");
    }

    #[test]
    fn secret_errors_never_quote_the_value() {
        let (_, errs) = parse(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {token: 123456789}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {name: t}\ndata: {token: 'sk-!!notbase64'}\n",
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
        let all = errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
        for leaked in ["123456789", "notbase64", "sk-live"] {
            assert!(!all.contains(leaked), "error text leaks a value: {all}");
        }
        assert!(all.contains("Secret default/s: field `stringData.token`: must be a string"), "{all}");
        assert!(all.contains("Secret default/t: field `data.token`: is not valid base64"), "{all}");
    }

    /// An operator writes a collector's credential the way `OTEL_EXPORTER_OTLP_HEADERS` spells
    /// it, or a Secret value with a YAML tag: the error names the field, never the value.
    #[test]
    fn otlp_header_values_and_tagged_secret_values_are_never_quoted_in_config_errors() {
        let gateway = |headers: &str| {
            format!(
                "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: g}}\n\
                 spec: {{otlp: {{endpoint: 'http://127.0.0.1:4318', headers: {headers}}}}}\n"
            )
        };
        for (text, field) in [
            (gateway("'authorization=Bearer s3cret-one'"), "spec.otlp.headers"),
            (gateway("{x-k: 12345678}"), "spec.otlp.headers"),
            (gateway("{x-k: [s3cret-one]}"), "spec.otlp.headers"),
            ("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {token: !!int s3cret-one}\n".into(), ""),
            ("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {token: !!bool 12345678}\n".into(), ""),
        ] {
            let (_, errs) = parse(&text);
            assert_eq!(errs.len(), 1, "{text}: {errs:?}");
            let e = errs[0].to_string();
            assert!(!e.contains("s3cret") && !e.contains("12345678"), "error text leaks a value: {e}");
            assert!(e.contains(field), "{e}");
        }
    }

    /// The mistake: the key itself pasted where its reference goes (`secretRef`, a Redis store)
    /// or where a name goes (`target`). The error said `invalid type: string "sk-ant-…"` into
    /// the log and `keyswap check`'s output. It names the field and what was expected, not the
    /// value (a short one, a typo, is still shown); a `\"` inside a quoted value no longer ends
    /// the redaction early.
    #[test]
    fn a_key_pasted_where_a_reference_or_a_name_goes_is_never_quoted_back() {
        let policy = |rest: &str| {
            format!(
                "apiVersion: keyswap.dev/v1alpha1\nkind: CredentialInjectionPolicy\nmetadata: {{name: p}}\n\
                 spec:\n  parentRefs: [{{name: r, kind: AIProviderRoute}}]\n{rest}\n"
            )
        };
        for (text, expected) in [
            (policy("  secretRef: sk-ant-api03-s3cret-0123456789abcdef\n  target: Header"), "expected struct"),
            (
                policy("  secretRef: {name: s}\n  target: sk-ant-api03-s3cret-0123456789abcdef"),
                "expected one of `Header`",
            ),
            (
                policy("  secretRef: {name: s}\n  target: 0123456789abcdef0123456789abs3cret"),
                "expected one of `Header`",
            ),
            (
                "apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {name: g}\n\
                 spec: {budgetStore: {redis: 'rediss://:s3cret@redis:6379'}}\n"
                    .into(),
                "expected",
            ),
        ] {
            let (_, errs) = parse(&text);
            assert_eq!(errs.len(), 1, "{text}: {errs:?}");
            let e = errs[0].to_string();
            assert!(!e.contains("s3cret") && e.contains(expected), "{e}");
        }
        // Short but credential-shaped (a URL with a password), or quoting a quote: not shown.
        let gw = |store: &str| {
            format!("apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {{name: g}}\nspec: {{budgetStore: {{redis: {store}}}}}\n")
        };
        for store in ["'redis://:hunter2@r:6379'", r#"'ab"hunter2'"#] {
            let (_, errs) = parse(&gw(store));
            assert!(!errs[0].to_string().contains("hunter2"), "{errs:?}");
        }
        // A short value, a typo, is shown: it is what the operator needs to see.
        let (_, errs) = parse(&policy("  secretRef: {name: s}\n  target: Hedaer"));
        assert!(errs[0].to_string().contains("unknown variant `Hedaer`"), "{errs:?}");
        let escaped = unquoted(r#"invalid type: string "pa\"ss-s3cret", expected a map"#);
        assert!(!escaped.contains("s3cret"), "{escaped}");
    }

    #[test]
    fn unknown_keyswap_kinds_and_missing_names_are_errors() {
        let (_, errs) = parse(
            "apiVersion: keyswap.dev/v1alpha1\nkind: EgresGateway\nmetadata: {name: x}\nspec: {}\n---\n\
             apiVersion: keyswap.dev/v1alpha1\nkind: EgressGateway\nmetadata: {}\nspec: {}\n",
        );
        assert_eq!(errs.len(), 2);
        assert!(errs[0].to_string().contains("unknown keyswap resource"));
        assert!(errs[1].to_string().contains("field `metadata.name`: is required"));
    }

    #[test]
    fn secret_data_debug_shows_keys_only() {
        let (objs, _) =
            parse("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {token: sk-do-not-print}\n");
        let dbg = format!("{objs:?}");
        assert!(dbg.contains("token") && !dbg.contains("sk-do-not-print"), "{dbg}");
    }
}
