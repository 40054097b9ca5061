//! What goes over a bus: messages, publish options, errors and counters.

use super::*;

/// Why a bus operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The bus was closed.
    #[error("the bus is closed")]
    Closed,
    /// The publish queue stayed full for `publish_timeout` (broker down or too slow).
    #[error("publish queue full for {0:?} (broker unreachable or too slow); message dropped")]
    Backpressure(Duration),
    /// The payload exceeds `max_payload`.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Payload size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The broker address is not `host:port`, `mqtt://host[:port]` or `mqtts://host[:port]`.
    #[error("broker address `{0}` is not host:port, mqtt://host[:port] or mqtts://host[:port]")]
    InvalidAddress(String),
    /// TLS to the broker cannot be set up (a CA, certificate or key file).
    #[error("TLS: {0}")]
    Tls(String),
    /// A topic or filter is not valid.
    #[error("invalid topic `{0}`: {1}")]
    InvalidTopic(String, &'static str),
    /// A value could not be encoded as JSON.
    #[error("cannot encode the message: {0}")]
    Encode(String),
}

/// A message received from the broker.
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic it was published on.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// QoS it arrived with.
    pub qos: u8,
    /// Whether it is a retained message sent on subscription.
    pub retain: bool,
    /// MQTT 5 properties.
    pub properties: Option<PublishProperties>,
    /// When it arrived.
    pub received: Instant,
}

impl Message {
    /// The MQTT 5 response topic, if any.
    pub fn response_topic(&self) -> Option<&str> {
        self.properties.as_ref()?.response_topic.as_deref()
    }

    /// The MQTT 5 correlation data, if any.
    pub fn correlation_data(&self) -> Option<&Bytes> {
        self.properties.as_ref()?.correlation_data.as_ref()
    }

    /// The MQTT 5 user property `key`, if any.
    pub fn user_property(&self, key: &str) -> Option<&str> {
        self.properties
            .as_ref()?
            .user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What to attach to a publish.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// QoS 0 or 1.
    pub qos: u8,
    /// Retain at the broker.
    pub retain: bool,
    /// MQTT 5 properties (response topic, correlation data, user properties, expiry).
    pub properties: Option<PublishProperties>,
}

impl PublishOptions {
    /// QoS `qos`, not retained, no properties.
    pub fn qos(qos: u8) -> Self {
        PublishOptions {
            qos,
            ..Default::default()
        }
    }

    /// QoS 1, retained, no properties: registrations, status records, run records, and the
    /// empty payload that deletes one.
    pub const fn retained() -> Self {
        PublishOptions {
            qos: 1,
            retain: true,
            properties: None,
        }
    }
}

/// Counters of one bus; all monotonic except `connected`.
#[derive(Debug, Default, Serialize, Clone)]
pub struct BusStats {
    /// Whether the connection is up.
    pub connected: bool,
    /// Successful connects (the first one included).
    pub connects: u64,
    /// Messages handed to the connection.
    pub published: u64,
    /// Publishes that failed (queue full, too large, closed).
    pub publish_failed: u64,
    /// Messages re-published after a reconnect.
    pub republished: u64,
    /// Messages dropped from the re-publish queue because it was full.
    pub requeue_dropped: u64,
    /// Messages received.
    pub received: u64,
    /// Messages dropped because a subscription's buffer was full.
    pub dropped_incoming: u64,
    /// Subscriptions the broker refused.
    pub subscribe_refused: u64,
    /// Requests sent again by a retry policy.
    pub request_retries: u64,
    /// Requests failed at once because their target's circuit was open.
    pub circuit_rejected: u64,
    /// Requests that failed after their retries and were dead-lettered.
    pub dead_letters: u64,
    /// Messages for this client the broker dropped because it fell behind (edgebus broker
    /// lag reports; see [`BusOptions::watch_lag`]).
    pub skipped_at_broker: u64,
}
