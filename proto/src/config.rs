//! The `[bus]` part of topics.toml: what every part of edgebus shares.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bus-wide settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// First level of every edgebus topic (`edge` → `edge/health/#`).
    pub prefix: String,
    /// Broker the services connect to: `host:port`, or `mqtts://host[:port]` for MQTT over
    /// TLS.
    pub broker: String,
    /// Username the bus's parts, services and `edgebus call` connect with
    /// (`EDGEBUS_USERNAME` overrides it).
    pub username: Option<String>,
    /// File holding their password, never the password itself (`EDGEBUS_PASSWORD_FILE`,
    /// `EDGEBUS_PASSWORD` and, under systemd, the credential `edgebus-password` override it).
    pub password_file: Option<std::path::PathBuf>,
    /// For an `mqtts://` broker: the CA certificates (PEM) its certificate must chain to
    /// (`EDGEBUS_CA_FILE` overrides it; none: the system's).
    pub ca_file: Option<std::path::PathBuf>,
    /// For an `mqtts://` broker that asks for client certificates: the certificate (PEM;
    /// `EDGEBUS_CERT` overrides it).
    pub cert: Option<std::path::PathBuf>,
    /// Its key (PEM; `EDGEBUS_KEY` overrides it).
    pub key: Option<std::path::PathBuf>,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            prefix: "edge".into(),
            broker: "127.0.0.1:1883".into(),
            username: None,
            password_file: None,
            ca_file: None,
            cert: None,
            key: None,
        }
    }
}

impl BusConfig {
    /// Checks the prefix is one or more plain topic levels.
    pub fn validate(&self) -> Result<(), String> {
        if self.prefix.is_empty()
            || self.prefix.contains(['+', '#', '\0'])
            || self.prefix.starts_with('$')
            || self.prefix.starts_with('/')
            || self.prefix.ends_with('/')
        {
            return Err(format!(
                "prefix `{}` must be plain topic levels such as \"edge\"",
                self.prefix
            ));
        }
        Ok(())
    }
}

/// A byte count, written in topics.toml as an integer or a string such as `"256KiB"` or `"1MB"`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes, as a `usize`.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }

    /// Parses `"256KiB"`, `"1 MB"`, `"4096"`, `"10B"`.
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size (expected e.g. \"256KiB\")"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "kib" | "k" => 1 << 10,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            other => return Err(format!("unknown size unit `{other}` in `{s}`")),
        };
        Ok(ByteSize((num * mult as f64) as u64))
    }
}

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1 << 20 && b % (1 << 20) == 0 {
            write!(f, "{}MiB", b >> 20)
        } else if b >= 1 << 10 && b % (1 << 10) == 0 {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}B")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"256KiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Where a state file or directory goes: an absolute `path` as it is; a relative one
/// inside `$STATE_DIRECTORY` (systemd's `StateDirectory=`) when that is set, else in the
/// working directory.
pub fn state_path(path: &std::path::Path) -> std::path::PathBuf {
    if path.is_absolute() {
        return path.to_owned();
    }
    match std::env::var_os("STATE_DIRECTORY") {
        // systemd may list several, separated by ':'; the first is ours.
        Some(d) => std::path::PathBuf::from(
            d.to_string_lossy()
                .split(':')
                .next()
                .unwrap_or_default()
                .to_owned(),
        )
        .join(path),
        None => path.to_owned(),
    }
}

/// Serde helpers for durations written as `"500ms"`, `"2s"`, `"1m 30s"`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes a duration as a humantime string.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    /// Reads a duration from a humantime string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration ({e}); write e.g. \"500ms\" or \"2s\""
            ))
        })
    }
}

/// Serde helpers for an optional duration (`None` when the key is absent).
pub mod opt_duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    /// Writes the duration as a humantime string.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Reads a humantime string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}
