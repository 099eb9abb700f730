//! Configuration errors that name the file, the object and the field.

use std::fmt;
use std::path::PathBuf;

/// Where an object came from: a file and the document's index inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based index of the YAML document in a multi-document file.
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document > 1 {
            write!(f, "{} (document {})", self.file.display(), self.document)
        } else {
            write!(f, "{}", self.file.display())
        }
    }
}

/// One problem with the configuration. Never carries a secret value: messages are written
/// by keyswap, and serde messages are only used for non-secret objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: Option<Origin>,
    /// `Kind namespace/name`, when the object is known.
    pub object: Option<String>,
    /// Dotted path inside the object, e.g. `spec.rules[0].matches[0].provider`.
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError { origin: None, object: None, field: None, message: message.into() }
    }

    pub fn at(mut self, origin: &Origin) -> Self {
        self.origin = Some(origin.clone());
        self
    }

    pub fn object(mut self, object: impl Into<String>) -> Self {
        self.object = Some(object.into());
        self
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "{}: ", Plain(&origin.to_string()))?;
        }
        if let Some(object) = &self.object {
            write!(f, "{}: ", Plain(object))?;
        }
        if let Some(field) = &self.field {
            write!(f, "field `{}`: ", Plain(field))?;
        }
        write!(f, "{}", Plain(&self.message))
    }
}

/// Text from a manifest as one line: control characters (a line break, a terminal escape) are
/// written escaped, so a value in someone's manifest cannot forge a log line or drive the
/// terminal of whoever runs `keyswap check`.
struct Plain<'a>(&'a str);

impl fmt::Display for Plain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in self.0.split_inclusive(char::is_control) {
            match part.char_indices().last() {
                Some((i, c)) if c.is_control() => {
                    f.write_str(&part[..i])?;
                    write!(f, "{}", c.escape_default())?;
                }
                _ => f.write_str(part)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one load, reported together so an operator fixes them in one pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} configuration error{}:", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
mod tests {
    use super::ConfigError;

    /// The attack: a route host (or any string a manifest quotes back) carrying a line break
    /// and a forged log line, or a terminal escape, in someone's namespace.
    #[test]
    fn manifest_text_in_an_error_cannot_forge_a_log_line_or_drive_a_terminal() {
        let e = ConfigError::new("`x\n2026-12-05T00:00:00Z  INFO secret rotated\u{1b}[2J` is not a host name")
            .object("AIProviderRoute team/r\r")
            .field("spec.rules[0]\t");
        let text = e.to_string();
        assert!(!text.chars().any(|c| c.is_control()), "{text:?}");
        assert!(text.contains(r"`x\n2026-12-05T00:00:00Z  INFO secret rotated\u{1b}[2J` is not a host name"), "{text}");
        assert!(text.starts_with(r"AIProviderRoute team/r\r: field `spec.rules[0]\t`: "), "{text}");
    }
}
