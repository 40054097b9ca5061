//! Where a service connects, from the environment: `EDGEBUS_CONFIG` (a topics.toml, of
//! which a service reads `[bus]` and its `[[service]]` contract), `EDGEBUS_BROKER`,
//! `EDGEBUS_INSTANCE`, and who it connects as ([`credentials`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bus::BusOptions;
use crate::config::BusConfig;
use crate::contract::ServiceSpec;

/// topics.toml could not be read, or is invalid.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", file.display())]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// What is wrong, with the line and key when known.
    pub message: String,
}

/// TLS files for an `mqtts://` broker: `EDGEBUS_CA_FILE`, `EDGEBUS_CERT` and `EDGEBUS_KEY`,
/// else `[bus] ca_file`, `cert` and `key`.
pub fn tls(bus: &BusConfig) -> crate::bus::TlsOptions {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    crate::bus::TlsOptions {
        ca_file: var("EDGEBUS_CA_FILE").or_else(|| bus.ca_file.clone()),
        cert: var("EDGEBUS_CERT").or_else(|| bus.cert.clone()),
        key: var("EDGEBUS_KEY").or_else(|| bus.key.clone()),
    }
}

/// The `[[service]]` contracts of a topics.toml, checked (its `[bus]` too, since the
/// contracts' topics depend on its prefix).
pub fn load_contract(path: impl AsRef<Path>) -> Result<Vec<ServiceSpec>, ConfigError> {
    Ok(Environment::read(path.as_ref().to_path_buf())?.service)
}

impl BusOptions {
    /// Options for an instance of `service` from the environment: `EDGEBUS_BROKER`,
    /// `EDGEBUS_INSTANCE`, and `[bus]` of the topics.toml `EDGEBUS_CONFIG` names (see
    /// [`Environment`]).
    pub fn from_env(service: &str) -> Result<BusOptions, ConfigError> {
        Environment::load()?.bus_options(service)
    }
}

/// The credential systemd hands a unit with `LoadCredential=edgebus-password:FILE`.
pub const CREDENTIAL: &str = "edgebus-password";

/// Who the bus's parts, services and `edgebus call` connect as: the username from
/// `EDGEBUS_USERNAME`, else `[bus] username`; the password from `EDGEBUS_PASSWORD`, else the
/// file `EDGEBUS_PASSWORD_FILE` names, else the systemd credential `edgebus-password` (in
/// `$CREDENTIALS_DIRECTORY`), else the file `[bus] password_file` names. A password is never
/// taken from the command line (other users can read it there). A file's trailing line end
/// is not part of the password; an empty file means none. None when neither is set.
pub fn credentials(bus: &BusConfig) -> Result<Option<(String, String)>, ConfigError> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let user = var("EDGEBUS_USERNAME").or_else(|| bus.username.clone());
    let read = |path: PathBuf, from: &str| {
        std::fs::read_to_string(&path)
            .map(|p| p.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| ConfigError {
                file: path,
                message: format!("cannot read the bus password ({from}): {e}"),
            })
    };
    let systemd = std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|d| PathBuf::from(d).join(CREDENTIAL))
        .filter(|p| p.exists());
    let password = if let Some(p) = var("EDGEBUS_PASSWORD") {
        Some(p)
    } else if let Some(f) = var("EDGEBUS_PASSWORD_FILE") {
        Some(read(PathBuf::from(f), "EDGEBUS_PASSWORD_FILE")?)
    } else if let Some(f) = systemd {
        Some(read(f, "the systemd credential edgebus-password")?)
    } else if let Some(f) = &bus.password_file {
        Some(read(f.clone(), "[bus] password_file")?)
    } else {
        None
    };
    let password = password.filter(|p| !p.is_empty());
    match (user, password) {
        (None, None) => Ok(None),
        (Some(u), p) => Ok(Some((u, p.unwrap_or_default()))),
        (None, Some(_)) => Err(ConfigError {
            file: PathBuf::from("EDGEBUS_USERNAME"),
            message: "a bus password is set but no username (set EDGEBUS_USERNAME or \
                      [bus] username)"
                .into(),
        }),
    }
}

/// The parts of topics.toml a service reads: `[bus]` and the `[[service]]` declarations
/// (the rest of the file belongs to the bus's own parts, and is not checked here).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Environment {
    /// `[bus]`: prefix and broker address.
    pub bus: BusConfig,
    /// `[[service]]`: the declared contracts.
    pub service: Vec<ServiceSpec>,
    /// The file read, if any.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

impl Environment {
    /// Reads the topics.toml named by `EDGEBUS_CONFIG` (the defaults when unset), then lets
    /// `EDGEBUS_BROKER` override its broker address.
    pub fn load() -> Result<Environment, ConfigError> {
        let mut env = match std::env::var_os("EDGEBUS_CONFIG") {
            Some(path) => Self::read(PathBuf::from(path))?,
            None => Environment::default(),
        };
        if let Ok(broker) = std::env::var("EDGEBUS_BROKER") {
            if !broker.is_empty() {
                env.bus.broker = broker;
            }
        }
        Ok(env)
    }

    /// Reads `[bus]` and `[[service]]` from a topics.toml.
    pub fn read(path: PathBuf) -> Result<Environment, ConfigError> {
        let err = |message: String| ConfigError {
            file: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| err(format!("cannot read: {e}")))?;
        let de = toml::Deserializer::new(&text);
        let mut env: Environment = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
            err(format!("{at}key `{key}`: {}", inner.message().trim()))
        })?;
        env.bus
            .validate()
            .map_err(|m| err(format!("key `bus.prefix`: {m}")))?;
        crate::contract::validate(&env.service, &env.bus.prefix)
            .map_err(|e| err(format!("key `{}`: {}", e.path, e.message)))?;
        env.file = Some(path);
        Ok(env)
    }

    /// Options for an instance of `service`: this environment's broker and prefix, its
    /// [`credentials`], and the instance id `EDGEBUS_INSTANCE` (made up when unset; the
    /// systemd template unit sets it, so that an instance keeps its id across restarts).
    pub fn bus_options(&self, service: &str) -> Result<BusOptions, ConfigError> {
        let instance = std::env::var("EDGEBUS_INSTANCE")
            .ok()
            .filter(|i| !i.is_empty());
        let mut o = BusOptions::for_service(
            self.bus.broker.clone(),
            self.bus.prefix.clone(),
            service,
            instance,
        );
        o.credentials = credentials(&self.bus)?;
        o.tls = tls(&self.bus);
        Ok(o)
    }
}

/// A stable instance id for the one instance of `service` a host runs:
/// `{service}-{short host name}` (characters a client id may not hold become `-`). Kept
/// across restarts, so the registry and the health view keep one row per instance.
pub fn host_instance(service: &str) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let short: String = host
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if short.is_empty() {
        service.to_owned()
    } else {
        format!("{service}-{short}")
    }
}
