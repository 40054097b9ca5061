//! topics.toml: loading, validation, and errors that name file, line and key.

use std::fmt;
use std::path::{Path, PathBuf};

use edgebus_broker::BrokerConfig;
use edgebus_runtime::config::BusConfig;
use serde::Deserialize;

/// The whole of topics.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsFile {
    /// `[bus]`: prefix and broker address.
    pub bus: BusConfig,
    /// `[broker]`: the embedded broker.
    pub broker: BrokerConfig,
}

/// A configuration error, located.
#[derive(Debug)]
pub struct ConfigError {
    /// The file (`<built-in>` for the defaults).
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Dotted key path, when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl TopicsFile {
    /// Reads and validates a topics.toml.
    pub fn load(path: &Path) -> Result<TopicsFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates topics.toml text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<TopicsFile, ConfigError> {
        let de = toml::Deserializer::new(text);
        let file: TopicsFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.span().map(|s| line_of(text, s.start));
            ConfigError {
                file: path.to_owned(),
                line,
                key: (key != ".").then_some(key),
                message: inner.message().trim().to_owned(),
            }
        })?;
        let locate = |table: &str, message: String| {
            let key = message
                .split_whitespace()
                .next()
                .map(|k| {
                    k.trim_matches(|c: char| {
                        !c.is_alphanumeric() && c != '_' && c != '.' && c != '[' && c != ']'
                    })
                })
                .unwrap_or_default()
                .to_owned();
            ConfigError {
                file: path.to_owned(),
                line: find_key(
                    text,
                    table,
                    key.split(['.', '[']).next().unwrap_or_default(),
                ),
                key: Some(format!("{table}.{key}")),
                message,
            }
        };
        file.bus.validate().map_err(|m| locate("bus", m))?;
        file.broker.validate().map_err(|m| locate("broker", m))?;
        Ok(file)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line of `key = …` inside `[table]` (or its sub-tables), if written there.
fn find_key(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix('[') {
            current = name
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned();
            continue;
        }
        let in_table = current == table || current.starts_with(&format!("{table}."));
        if in_table && t.split_once('=').is_some_and(|(k, _)| k.trim() == key) {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_is_valid() {
        let text = include_str!("../../topics.toml");
        TopicsFile::parse(text, Path::new("topics.toml")).expect("shipped topics.toml");
    }

    #[test]
    fn errors_name_line_and_key() {
        let text = "[bus]\nprefix = \"edge\"\n\n[broker]\nmax_connections = \"many\"\n";
        let e = TopicsFile::parse(text, Path::new("t.toml")).unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert_eq!(e.key.as_deref(), Some("broker.max_connections"), "{e}");

        let e =
            TopicsFile::parse("[broker]\nmax_conections = 3\n", Path::new("t.toml")).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().contains("max_conections"), "{e}");

        let e =
            TopicsFile::parse("[broker]\nsegment_count = 0\n", Path::new("t.toml")).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert_eq!(e.key.as_deref(), Some("broker.segment_count"), "{e}");
    }
}
