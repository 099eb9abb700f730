//! YAML documents → typed objects. Strict about keyswap's own kinds, quiet about others.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use secrecy::SecretSlice;
use serde::de::DeserializeOwned;
use serde::Deserialize as _;
use serde_yaml_ng::Value;

use super::error::{ConfigError, Origin};
use crate::api::{
    AIProviderRouteSpec, CredentialInjectionPolicySpec, EgressGatewaySpec, ObjectMeta, API_VERSION, GROUP,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    EgressGateway,
    AIProviderRoute,
    CredentialInjectionPolicy,
    Secret,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::EgressGateway => "EgressGateway",
            Kind::AIProviderRoute => "AIProviderRoute",
            Kind::CredentialInjectionPolicy => "CredentialInjectionPolicy",
            Kind::Secret => "Secret",
        }
    }
}

/// `namespace/name` of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Key { namespace: namespace.into(), name: name.into() }
    }

    /// Parses `namespace/name`, or `name` in `default`.
    pub fn parse(s: &str) -> Option<Key> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Some(Key::new(ns, name)),
            None if !s.is_empty() => Some(Key::new(DEFAULT_NAMESPACE, s)),
            _ => None,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub const DEFAULT_NAMESPACE: &str = "default";

/// The decoded keys of a Secret. Values never appear in `Debug`.
#[derive(Default)]
pub struct SecretData {
    pub entries: BTreeMap<String, SecretSlice<u8>>,
    /// `metadata.labels` (agent API-key Secrets are found by label).
    pub labels: BTreeMap<String, String>,
}

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretData").field("keys", &self.entries.keys().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub enum Resource {
    Gateway(EgressGatewaySpec),
    Route(AIProviderRouteSpec),
    Policy(CredentialInjectionPolicySpec),
    Secret(SecretData),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Gateway(_) => Kind::EgressGateway,
            Resource::Route(_) => Kind::AIProviderRoute,
            Resource::Policy(_) => Kind::CredentialInjectionPolicy,
            Resource::Secret(_) => Kind::Secret,
        }
    }
}

#[derive(Debug)]
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

/// Parses every document of one file. Errors do not stop the other documents from being read,
/// so one pass reports everything.
pub fn parse_file(origin_file: &std::path::Path, text: &str) -> (Vec<Object>, Vec<ConfigError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let origin = Origin { file: origin_file.to_path_buf(), document: i + 1 };
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                // A syntax error ends the stream: the parser cannot find the next document.
                errors.push(ConfigError::new(format!("not valid YAML: {e}")).at(&origin));
                break;
            }
        };
        match parse_object(value, &origin) {
            Ok(Some(obj)) => objects.push(obj),
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
        (v, k) if v.starts_with(&format!("{GROUP}/")) => {
            return Err(ConfigError::new(format!(
                "unknown keyswap resource `{v}` `{k}`; this build reads {API_VERSION} EgressGateway, \
                 AIProviderRoute and CredentialInjectionPolicy"
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
            Kind::Secret => unreachable!(),
        }
    };
    Ok(Some(Object { origin: origin.clone(), key, resource }))
}

fn take_str(map: &mut serde_yaml_ng::Mapping, field: &str) -> Result<String, ConfigError> {
    match map.remove(field) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ConfigError::new("must be a string").field(field)),
        None => Err(ConfigError::new("is required").field(field)),
    }
}

/// Deserializes a non-secret value, reporting the full path of the offending field.
fn typed<T: DeserializeOwned>(value: Value, prefix: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { prefix.to_owned() } else { format!("{prefix}.{path}") };
        ConfigError::new(e.into_inner().to_string()).field(field)
    })
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
