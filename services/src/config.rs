//! topics.toml: loading, validation, and errors that name file, line and key.

use std::fmt;
use std::path::{Path, PathBuf};

use edgebus_broker::BrokerConfig;
use edgebus_runtime::config::BusConfig;
use edgebus_runtime::contract::{self, ServiceSpec};
use serde::Deserialize;

use crate::examples::hostmetrics::HostmetricsConfig;
use crate::parts::discovery::DiscoveryConfig;
use crate::parts::health::HealthConfig;
use crate::parts::orchestrator::{OrchestratorConfig, SagaConfig};

/// The whole of topics.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsFile {
    /// `[bus]`: prefix and broker address.
    pub bus: BusConfig,
    /// `[broker]`: the embedded broker.
    pub broker: BrokerConfig,
    /// `[[service]]`: each service's endpoints and events.
    pub service: Vec<ServiceSpec>,
    /// `[up]`: what `edgebus up` runs besides the broker.
    pub up: UpConfig,
    /// `[hostmetrics]`: settings of the built-in hostmetrics service.
    pub hostmetrics: HostmetricsConfig,
    /// `[discovery]`: the registry.
    pub discovery: DiscoveryConfig,
    /// `[health]`: the health monitor.
    pub health: HealthConfig,
    /// `[[saga]]`: sagas the orchestrator runs.
    pub saga: Vec<SagaConfig>,
    /// `[orchestrator]`: its journal and limits.
    pub orchestrator: OrchestratorConfig,
}

/// `[up]`: what `edgebus up` runs in one process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpConfig {
    /// Built-in services to run (`echo`, `hostmetrics`).
    pub services: Vec<String>,
}

impl Default for UpConfig {
    fn default() -> Self {
        UpConfig {
            services: vec!["echo".into(), "hostmetrics".into(), "kv".into()],
        }
    }
}

/// The shipped topics.toml, compiled in: what every part runs with when no `-c` is given, so
/// the built-in defaults and the documented file cannot drift apart.
pub const SHIPPED: &str = include_str!("../../topics.toml");

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

    /// The built-in configuration: the shipped topics.toml ([`SHIPPED`]).
    pub fn builtin() -> TopicsFile {
        // The unit test `shipped_file_is_valid` keeps this from failing.
        Self::parse(SHIPPED, Path::new("<built-in topics.toml>"))
            .unwrap_or_else(|e| panic!("the built-in topics.toml is invalid: {e}"))
    }

    /// Reads and validates a topics.toml, then checks what the parts would otherwise refuse
    /// only when they start: the bus's password (read as the parts read it), the password
    /// file (read and parsed as the broker does) and, when
    /// sagas are declared, the journal's directory. `edgebus check-config` runs this, so a unit's
    /// `ExecStartPre=` catches every refusal before the part runs.
    pub fn load_checked(path: &Path) -> Result<TopicsFile, ConfigError> {
        let file = Self::load(path)?;
        let text = std::fs::read_to_string(path).unwrap_or_default();
        file.check_startable(&text, path)?;
        Ok(file)
    }

    /// The start-time checks of [`TopicsFile::load_checked`], on a parsed file; `text` is
    /// its source, for line numbers.
    pub fn check_startable(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        // The bus's password, as each part reads it (the environment and a systemd
        // credential first).
        if let Err(e) = edgebus_runtime::env::credentials(&self.bus) {
            return Err(ConfigError {
                file: path.to_owned(),
                line: find_key(text, "bus", "password_file"),
                key: Some("bus.password_file".into()),
                message: e.to_string(),
            });
        }
        // TLS to the broker, as each part sets it up.
        let address = edgebus_runtime::bus::BrokerAddress::parse(&self.bus.broker);
        if address.as_ref().is_some_and(|a| a.tls) {
            let files = edgebus_runtime::env::tls(&self.bus);
            if let Err(message) = edgebus_runtime::bus::client_config(&files) {
                // The message names the file at fault; a CA problem otherwise.
                let names = |f: &Option<PathBuf>| {
                    f.as_ref()
                        .is_some_and(|f| message.contains(&*f.to_string_lossy()))
                };
                let key = if names(&files.cert) {
                    "cert"
                } else if names(&files.key) {
                    "key"
                } else {
                    "ca_file"
                };
                return Err(ConfigError {
                    file: path.to_owned(),
                    line: find_key(text, "bus", key),
                    key: Some(format!("bus.{key}")),
                    message,
                });
            }
        }
        if let Some(pw) = &self.broker.auth.password_file {
            if let Err(e) = edgebus_broker::auth::PasswordFile::load(pw) {
                return Err(ConfigError {
                    file: path.to_owned(),
                    line: find_key(text, "broker.auth", "password_file"),
                    key: Some("broker.auth.password_file".into()),
                    message: e.to_string(),
                });
            }
        }
        if let Some(jwt) = &self.broker.auth.jwt {
            if let Err(e) = edgebus_broker::token::Verifier::load(jwt, &self.bus.prefix) {
                let key = match jwt.algorithm {
                    edgebus_broker::token::JwtAlgorithm::HS256 => "secret_file",
                    _ => "public_key",
                };
                return Err(ConfigError {
                    file: path.to_owned(),
                    line: find_key(text, "broker.auth.jwt", key),
                    key: Some(format!("broker.auth.jwt.{key}")),
                    message: e.to_string(),
                });
            }
        }
        if let Some(dir) = self.broker.persistence.resolved_dir() {
            // The broker makes the directory itself; its parent must be there.
            let (checked, what) = if dir.exists() {
                (dir.clone(), "")
            } else {
                let parent = match dir.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                    _ => PathBuf::from("."),
                };
                (parent, " (to be made inside)")
            };
            let problem = dir_problem(
                &checked,
                &format!("the persistence directory {}{what}", checked.display()),
            );
            if let Some(message) = problem {
                return Err(ConfigError {
                    file: path.to_owned(),
                    line: find_key(text, "broker.persistence", "dir"),
                    key: Some("broker.persistence.dir".into()),
                    message,
                });
            }
        }
        if !self.saga.is_empty() {
            let journal = self.orchestrator.journal_path();
            let dir = match journal.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
                _ => PathBuf::from("."),
            };
            let problem = dir_problem(
                &dir,
                &format!("the saga journal's directory {}", dir.display()),
            );
            if let Some(message) = problem {
                return Err(ConfigError {
                    file: path.to_owned(),
                    line: find_key(text, "orchestrator", "journal"),
                    key: Some("orchestrator.journal".into()),
                    message,
                });
            }
        }
        Ok(())
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
        file.broker.validate().map_err(|m| {
            // `acl.permissions.alice[0] …`: the user's line in [broker.acl.permissions].
            match m.strip_prefix("acl.permissions.") {
                Some(rest) => {
                    let user = rest.split(['[', ' ']).next().unwrap_or_default();
                    ConfigError {
                        file: path.to_owned(),
                        line: find_key(text, "broker.acl.permissions", user),
                        key: Some(format!("broker.acl.permissions.{user}")),
                        message: m,
                    }
                }
                None => locate("broker", m),
            }
        })?;
        let mut file = file;
        file.broker.prefix = file.bus.prefix.clone();
        contract::validate(&file.service, &file.bus.prefix).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: find_path(text, &e.path),
            key: Some(e.path.clone()),
            message: e.message,
        })?;
        crate::parts::orchestrator::validate(&file.saga, &file.service).map_err(|e| {
            ConfigError {
                file: path.to_owned(),
                line: find_path(text, &e.path),
                key: Some(e.path.clone()),
                message: e.message,
            }
        })?;
        for (i, name) in file.up.services.iter().enumerate() {
            if !crate::examples::BUILTIN.contains(&name.as_str()) {
                return Err(ConfigError {
                    file: path.to_owned(),
                    line: find_key(text, "up", "services"),
                    key: Some(format!("up.services[{i}]")),
                    message: format!(
                        "no built-in service `{name}` (built-in: {})",
                        crate::examples::BUILTIN.join(", ")
                    ),
                });
            }
        }
        Ok(file)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line of `key = …` inside `[table]` (or its sub-tables), if written there.
/// Why `dir` (described as `what`) cannot hold the files a part writes, if it cannot.
fn dir_problem(dir: &Path, what: &str) -> Option<String> {
    match std::fs::metadata(dir) {
        Err(e) => Some(format!("{what}: {e}")),
        Ok(m) if !m.is_dir() => Some(format!("{what} is not a directory")),
        Ok(m) if m.permissions().readonly() => Some(format!("{what} is read-only")),
        Ok(_) => None,
    }
}

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

/// The line of a key path such as `service[1].endpoint[0].qos`: the key inside the right
/// `[[service]]` / `[[service.endpoint]]` table, or that table's header.
fn find_path(text: &str, path: &str) -> Option<usize> {
    let mut tables: Vec<(String, usize)> = Vec::new();
    let mut key = None;
    for part in path.split('.') {
        match part.split_once('[') {
            Some((name, rest)) => {
                let n = rest.trim_end_matches(']').parse().ok()?;
                tables.push((name.to_owned(), n));
            }
            None => key = Some(part),
        }
    }
    // Walk the headers, counting the occurrences of each array table inside its parent.
    let mut counts: Vec<usize> = vec![0; tables.len()];
    let mut depth_ok = 0usize;
    let mut found_header = None;
    let mut in_target = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_target = false;
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            let levels: Vec<&str> = name.split('.').collect();
            let d = levels.len();
            let matches_prefix = d <= tables.len()
                && levels
                    .iter()
                    .zip(&tables)
                    .all(|(l, (n, _))| *l == n.as_str());
            if t.starts_with("[[") && matches_prefix && d <= depth_ok + 1 {
                let idx = d - 1;
                counts[idx] += 1;
                for c in counts.iter_mut().skip(idx + 1) {
                    *c = 0;
                }
                depth_ok = if counts[idx] == tables[idx].1 + 1 {
                    d
                } else {
                    idx
                };
                if depth_ok == tables.len() {
                    found_header = Some(i + 1);
                    in_target = true;
                }
            }
            continue;
        }
        if in_target {
            if let Some(k) = key {
                if t.split_once('=').is_some_and(|(lhs, _)| lhs.trim() == k) {
                    return Some(i + 1);
                }
            }
        }
    }
    found_header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_persistence_directory_that_cannot_be_made_is_refused_with_its_key() {
        let text = "[broker]\nlisten = \"127.0.0.1:0\"\n\n[broker.persistence]\n\
                    dir = \"/nonexistent-edgebus/a/b\"\n";
        let file = TopicsFile::parse(text, Path::new("t.toml")).expect("parses");
        let e = file
            .check_startable(text, Path::new("t.toml"))
            .expect_err("no such parent");
        let shown = e.to_string();
        assert!(
            shown.starts_with("t.toml:5: key `broker.persistence.dir`: the persistence directory /nonexistent-edgebus/a"),
            "{shown}"
        );
        // "none": nothing is written, so nothing is checked.
        let text = text.replace("dir =", "sync = \"none\"\ndir =");
        let file = TopicsFile::parse(&text, Path::new("t.toml")).expect("parses");
        assert!(file.check_startable(&text, Path::new("t.toml")).is_ok());
    }

    #[test]
    fn shipped_file_is_valid() {
        TopicsFile::parse(SHIPPED, Path::new("topics.toml")).expect("shipped topics.toml");
    }

    /// A key left out of a user's file takes its default; the shipped file writes every key
    /// out. The two agree, table by table, so leaving a key out never changes what runs.
    #[test]
    fn defaults_are_the_shipped_values() {
        let shipped = TopicsFile::builtin();
        let d = TopicsFile::default();
        assert_eq!(format!("{:?}", shipped.bus), format!("{:?}", d.bus));
        // The one exception: a file without [broker.persistence] keeps the broker in RAM, as
        // before persistence existed (an upgrade never starts writing where nobody said);
        // the shipped file, and so `edgebus up` without a file, keeps retained messages.
        let mut broker = shipped.broker.clone();
        assert_eq!(broker.persistence.dir.as_deref(), Some(Path::new(".")));
        assert_eq!(d.broker.persistence.dir, None);
        broker.persistence.dir = None;
        assert_eq!(format!("{:?}", broker), format!("{:?}", d.broker));
        assert_eq!(format!("{:?}", shipped.up), format!("{:?}", d.up));
        assert_eq!(
            format!("{:?}", shipped.hostmetrics),
            format!("{:?}", d.hostmetrics)
        );
        assert_eq!(
            format!("{:?}", shipped.discovery),
            format!("{:?}", d.discovery)
        );
        assert_eq!(format!("{:?}", shipped.health), format!("{:?}", d.health));
        assert_eq!(
            format!("{:?}", shipped.orchestrator),
            format!("{:?}", d.orchestrator)
        );
        // The lists are what a file declares: the shipped one declares the `order` saga.
        assert_eq!(shipped.saga.len(), 1);
        assert_eq!(shipped.saga[0].name, "order");
    }

    #[test]
    fn a_missing_password_file_is_refused_with_its_key() {
        let text = "[broker.auth]\npassword_file = \"/nonexistent/edgebus-passwd\"\n";
        let file = TopicsFile::parse(text, Path::new("t.toml")).expect("parses");
        let e = file.check_startable(text, Path::new("t.toml")).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert_eq!(e.key.as_deref(), Some("broker.auth.password_file"), "{e}");
        assert!(e.message.contains("/nonexistent/edgebus-passwd"), "{e}");
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

        let text = "[[service]]\nname = \"a\"\n[[service.endpoint]]\nname = \"x\"\n\n\
                    [[service]]\nname = \"b\"\n[[service.endpoint]]\nname = \"x\"\n\
                    [[service.endpoint]]\nname = \"y\"\nqos = 2\n";
        let e = TopicsFile::parse(text, Path::new("t.toml")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("service[1].endpoint[1].qos"), "{e}");
        assert_eq!(e.line, Some(12), "{e}");
        let text =
            "[[service]]\nname = \"a\"\n[[service.endpoint]]\nname = \"x\"\ntimeout = \"soon\"\n";
        let e = TopicsFile::parse(text, Path::new("t.toml")).unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.to_string().contains("timeout"), "{e}");

        let text = "[[saga]]\nname = \"s\"\n[[saga.step]]\nname = \"a\"\ncall = \"kv/put\"\n\
                    [[saga.step]]\nname = \"b\"\ncall = \"kv/put\"\n\
                    input = { key = \"${steps.c.key}\" }\n";
        let e = TopicsFile::parse(text, Path::new("t.toml")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("saga[0].step[1].input"), "{e}");
        assert_eq!(e.line, Some(9), "{e}");
        let text = "[[saga]]\nname = \"s\"\n[[saga.step]]\nname = \"a\"\ncall = \"kv\"\n";
        let e = TopicsFile::parse(text, Path::new("t.toml")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("saga[0].step[0].call"), "{e}");
        assert_eq!(e.line, Some(5), "{e}");

        let e = TopicsFile::parse("[broker]\nmax_queued_messages = 0\n", Path::new("t.toml"))
            .unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert_eq!(e.key.as_deref(), Some("broker.max_queued_messages"), "{e}");
    }
}
