//! The `[broker]` part of topics.toml.
//!
//! Every default lives in the one `Default` impl below; every key is typed (durations are
//! strings like `"5s"`, sizes strings like `"256KiB"`), and unknown keys are errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::acl::AclConfig;
pub use edgebus_proto::config::{duration, ByteSize};
pub use edgebus_proto::policy::Rate;

/// Settings of the embedded broker.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// MQTT listener (3.1.1 and 5 on the same port).
    pub listen: SocketAddr,
    /// Optional MQTT-over-WebSocket listener (3.1.1 and 5, subprotocol `mqtt`).
    pub websocket: Option<SocketAddr>,
    /// Optional MQTT-over-TLS listener (`[broker.tls]`).
    pub tls: Option<TlsConfig>,
    /// Most client connections open at once; the next one gets a CONNACK refusal.
    pub max_connections: usize,
    /// Most connections one authenticated user holds at once.
    pub max_connections_per_user: usize,
    /// Most anonymous connections from one IP address at once. On loopback, clients running
    /// as the broker's own user (the bus's parts) are let in beyond it.
    pub max_connections_per_address: usize,
    /// Of `max_connections`, the last ones kept for authenticated clients and the broker's
    /// own local user: anonymous clients of other users cannot take them. At most a quarter
    /// of `max_connections` is reserved, whatever this says.
    pub reserved_connections: usize,
    /// Largest packet a client may send (remaining length), and largest payload forwarded.
    pub max_payload: ByteSize,
    /// Most subscriptions held at once, all clients together; beyond it SUBSCRIBE is refused.
    pub max_filters: usize,
    /// Messages queued for one session (connected or not) before its publishers wait
    /// (connected) or its messages are dropped (offline).
    pub max_queued_messages: usize,
    /// Bytes queued for one session, likewise.
    pub max_queued_bytes: ByteSize,
    /// A connected subscriber that takes nothing for this long while a publisher waits for
    /// room in its queue is disconnected.
    #[serde(with = "duration")]
    pub slow_subscriber_timeout: Duration,
    /// Longest an offline session is kept (MQTT 5 Session Expiry is capped to it; 3.1.1
    /// persistent sessions get it).
    #[serde(with = "duration")]
    pub max_session_expiry: Duration,
    /// Threads serving connections (1: the whole broker on one thread, as mosquitto).
    pub threads: usize,
    /// Longest keep-alive a client may use, in seconds (0: any). A client asking for more, or
    /// for none, gets this one (MQTT 5: in the CONNACK's Server Keep Alive).
    pub max_keepalive: u16,
    /// Time a new connection has to send CONNECT (and finish a websocket handshake).
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// A client that does not read for this long is disconnected.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// How often the retained stats record is published; `"0s"` turns it off.
    #[serde(with = "duration")]
    pub stats_interval: Duration,
    /// How `$share/{group}/…` subscriptions pick a member: `round_robin`, `random` or `sticky`.
    pub shared_strategy: SharedStrategy,
    /// Authentication.
    pub auth: AuthConfig,
    /// Per-topic access control.
    pub acl: AclConfig,
    /// What one client connection may publish; the excess is dropped and counted.
    pub rate_limit: ClientRateLimit,
    /// What the broker keeps on disk across restarts (`[broker.persistence]`).
    pub persistence: PersistenceConfig,
    /// The bus's topic prefix (`[bus] prefix`, not a `[broker]` key), which ACL permissions
    /// expand under.
    #[serde(skip)]
    pub prefix: String,
}

/// `[broker.tls]`: MQTT over TLS (1.2 and 1.3 only), with client certificates if asked.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The TLS listener, e.g. `0.0.0.0:8883`.
    pub listen: SocketAddr,
    /// Optional MQTT over WebSocket over TLS (`wss://`, subprotocol `mqtt`), with the same
    /// certificate, e.g. `0.0.0.0:8084`.
    #[serde(default)]
    pub websocket: Option<SocketAddr>,
    /// The server's certificate chain (PEM), read again on SIGHUP and when it changes.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; set, every client on
    /// this listener must present one (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: the client certificate is the login, its subject's common name
    /// (`"cn"`) or its first DNS subject alternative name (`"san"`) the username, as
    /// mosquitto's `use_identity_as_username`. The CONNECT's username and password are then
    /// not asked for.
    #[serde(default)]
    pub certificate_username: Option<CertificateUsername>,
}

/// Which name of a client certificate is the username.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateUsername {
    /// The subject's common name.
    Cn,
    /// The first DNS name of the subject alternative names.
    San,
}

/// `[broker.persistence]`: the retained messages and persistent sessions kept on disk, so
/// that a restart, a crash or a power cut loses nothing the broker acknowledged.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersistenceConfig {
    /// The directory of the broker's files. A relative path is taken inside
    /// `$STATE_DIRECTORY` (systemd's `StateDirectory=`) when that is set, else the working
    /// directory. Unset: nothing is kept (RAM only).
    pub dir: Option<PathBuf>,
    /// The commit window: at most one `fdatasync` per window. A change after a quiet spell
    /// is written at once; changes within the window are gathered and written when it ends
    /// (or once 16 are waiting). A QoS 1/2 PUBLISH that changes a retained message, or is
    /// queued for a persistent session, is acknowledged once its commit is on disk.
    /// `"none"`: RAM only, whatever `dir` says.
    #[serde(with = "sync_window")]
    pub sync: Option<Duration>,
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        PersistenceConfig {
            dir: None,
            sync: Some(Duration::from_millis(50)),
        }
    }
}

impl PersistenceConfig {
    /// Where the files go, when persistence is on: `dir`, resolved as its doc says.
    pub fn resolved_dir(&self) -> Option<PathBuf> {
        self.sync?;
        Some(edgebus_proto::config::state_path(self.dir.as_ref()?))
    }
}

/// `sync = "50ms"`, or `"none"`.
mod sync_window {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_str("none"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim() == "none" {
            return Ok(None);
        }
        humantime::parse_duration(text.trim())
            .map(Some)
            .map_err(|e| {
                serde::de::Error::custom(format!("`{text}`: {e} (e.g. \"50ms\", or \"none\")"))
            })
    }
}

/// Per-connection publish limits, e.g. `{ messages = "500/s", bytes = "256KiB/s" }`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientRateLimit {
    /// PUBLISH packets per second (`"500/s"`, `"100/s burst 1000"`); none: no limit.
    pub messages: Option<Rate>,
    /// Payload bytes per second (`"256KiB/s"`); none: no limit.
    pub bytes: Option<Rate>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            websocket: None,
            tls: None,
            max_connections: 1024,
            max_connections_per_user: 256,
            max_connections_per_address: 64,
            reserved_connections: 32,
            max_payload: ByteSize(256 * 1024),
            max_filters: 100_000,
            max_queued_messages: 1000,
            max_queued_bytes: ByteSize(1024 * 1024),
            slow_subscriber_timeout: Duration::from_secs(3),
            max_session_expiry: Duration::from_secs(24 * 3600),
            threads: 1,
            max_keepalive: 0,
            connect_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            stats_interval: Duration::from_secs(5),
            shared_strategy: SharedStrategy::RoundRobin,
            auth: AuthConfig::default(),
            acl: AclConfig::default(),
            rate_limit: ClientRateLimit::default(),
            persistence: PersistenceConfig::default(),
            prefix: "edge".into(),
        }
    }
}

/// Authentication settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A password file in mosquitto's format (`mosquitto_passwd` and `edgebus passwd` write it).
    pub password_file: Option<PathBuf>,
    /// Who may connect without a username: `loopback` (clients on 127.0.0.0/8 and ::1 only),
    /// `allow` (anyone) or `deny` (no one).
    pub anonymous: Anonymous,
    /// Tokens as passwords (`[broker.auth.jwt]`, see [`crate::token`]).
    pub jwt: Option<crate::token::JwtConfig>,
}

/// Policy for clients that connect without a username.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Anonymous {
    /// Only clients connecting from a loopback address.
    #[default]
    Loopback,
    /// Everyone.
    Allow,
    /// No one.
    Deny,
}

/// Shared subscription strategy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedStrategy {
    /// Members take turns.
    #[default]
    RoundRobin,
    /// A random member.
    Random,
    /// The same member while it stays subscribed.
    Sticky,
}

impl BrokerConfig {
    /// Checks what serde cannot: relations between values.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.max_connections_per_user == 0 || self.max_connections_per_address == 0 {
            return Err(
                "max_connections_per_user and max_connections_per_address must be at least 1"
                    .into(),
            );
        }
        if self.max_payload.0 < 1024 {
            return Err("max_payload must be at least 1KiB".into());
        }
        if self.max_queued_messages == 0 {
            return Err("max_queued_messages must be at least 1".into());
        }
        if self.max_queued_bytes < self.max_payload {
            return Err(format!(
                "max_queued_bytes ({}) must be at least max_payload ({})",
                self.max_queued_bytes, self.max_payload
            ));
        }
        if self.threads == 0 || self.threads > 64 {
            return Err("threads must be between 1 and 64".into());
        }
        if self
            .persistence
            .sync
            .is_some_and(|w| w > Duration::from_secs(10))
        {
            return Err(
                "persistence.sync must be at most 10s (acknowledgements wait for it)".into(),
            );
        }
        if let Some(tls) = &self.tls {
            if tls.certificate_username.is_some() && tls.client_ca.is_none() {
                return Err(
                    "tls.certificate_username needs tls.client_ca (the CA that vouches \
                            for the certificates)"
                        .into(),
                );
            }
        }
        self.acl.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(ByteSize::parse("256KiB"), Ok(ByteSize(262_144)));
        assert_eq!(ByteSize::parse("1 MB"), Ok(ByteSize(1_000_000)));
        assert_eq!(ByteSize::parse("10"), Ok(ByteSize(10)));
        assert!(ByteSize::parse("ten").is_err());
        assert!(ByteSize::parse("5 parsecs").is_err());
    }

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = BrokerConfig::default();
        c.validate().expect("defaults validate");
        let text = toml::to_string(&c).expect("serialize");
        let back: BrokerConfig = toml::from_str(&text).expect("parse");
        assert_eq!(back.max_payload, c.max_payload);
        assert_eq!(back.connect_timeout, c.connect_timeout);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<BrokerConfig>("max_conections = 3").unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }
}
