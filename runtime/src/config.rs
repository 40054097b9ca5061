//! The `[bus]` part of topics.toml: what every part of edgebus shares.

use serde::{Deserialize, Serialize};

/// Bus-wide settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// First level of every edgebus topic (`edge` → `edge/health/#`).
    pub prefix: String,
    /// Broker the services connect to, as `host:port`.
    pub broker: String,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            prefix: "edge".into(),
            broker: "127.0.0.1:1883".into(),
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
