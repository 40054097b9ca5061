//! How a bus connects: its options, and its Last Will.

use super::*;
use edgebus_proto::records::{Identity, REASON_CONNECTION_LOST};
use edgebus_proto::tree::Tree;

/// How a [`Bus`] connects. Its `Debug` never shows the password.
#[derive(Clone)]
pub struct BusOptions {
    /// Broker address: `host:port`, `mqtt://host[:port]`, or `mqtts://host[:port]` for MQTT
    /// over TLS.
    pub broker: String,
    /// MQTT client id; unique per process.
    pub client_id: String,
    /// Topic prefix (`edge`).
    pub prefix: String,
    /// Username and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// CA, client certificate and key for an `mqtts://` broker.
    pub tls: TlsOptions,
    /// MQTT keep-alive (at least 5 s: rumqttc's v5 client refuses less). A dead broker is
    /// noticed after about twice this.
    pub keep_alive: Duration,
    /// Publishes queued while the connection is busy or down.
    pub queue_capacity: usize,
    /// How long `publish` waits for queue space before failing.
    pub publish_timeout: Duration,
    /// Largest payload this bus publishes (the broker's `max_payload`); larger ones fail at
    /// once instead of getting the connection closed.
    pub max_payload: usize,
    /// Largest packet accepted from the broker.
    pub max_incoming_packet: u32,
    /// Outgoing QoS 1 messages in flight before the client waits for acks.
    pub inflight: u16,
    /// First reconnect delay; doubles per failure up to `backoff_max`, with ±25 % jitter.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Messages kept to re-publish after a reconnect; beyond it the oldest are dropped (counted).
    pub requeue_limit: usize,
    /// Buffer of each subscription; a consumer that falls further behind loses messages,
    /// counted per subscription.
    pub subscription_buffer: usize,
    /// Topic replies to this client's requests come back on; `None`:
    /// `{prefix}/system/reply/{client_id}`, so that every bus can make requests.
    pub reply_topic: Option<String>,
    /// Last Will, published by the broker when this connection dies.
    pub will: Option<Will>,
    /// Who this connection is, when it is a service instance (registration and heartbeats).
    pub presence: Option<Identity>,
    /// Listen for the edgebus broker's lag reports (`{prefix}/system/broker/lag`): messages
    /// the broker dropped for this client (it took nothing for the broker's
    /// `slow_subscriber_timeout`, or its offline queue was full) are then counted, logged,
    /// charged to the subscriptions they were for, and sent to [`Bus::lag_events`].
    pub watch_lag: bool,
}

impl std::fmt::Debug for BusOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let credentials = self
            .credentials
            .as_ref()
            .map(|(user, _)| format!("{user}:<redacted>"));
        f.debug_struct("BusOptions")
            .field("broker", &self.broker)
            .field("client_id", &self.client_id)
            .field("prefix", &self.prefix)
            .field("credentials", &credentials)
            .field("tls", &self.tls)
            .field("keep_alive", &self.keep_alive)
            .field("queue_capacity", &self.queue_capacity)
            .field("publish_timeout", &self.publish_timeout)
            .field("max_payload", &self.max_payload)
            .field("max_incoming_packet", &self.max_incoming_packet)
            .field("inflight", &self.inflight)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("requeue_limit", &self.requeue_limit)
            .field("subscription_buffer", &self.subscription_buffer)
            .field("reply_topic", &self.reply_topic)
            .field("will", &self.will)
            .field("presence", &self.presence)
            .field("watch_lag", &self.watch_lag)
            .finish()
    }
}

/// A Last Will message.
#[derive(Debug, Clone)]
pub struct Will {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS 0 or 1.
    pub qos: u8,
    /// Retained or not.
    pub retain: bool,
}

impl BusOptions {
    /// Options with defaults for a small host: 5 s keep-alive, 256-message queue, 256 KiB payloads.
    pub fn new(broker: impl Into<String>, client_id: impl Into<String>) -> BusOptions {
        BusOptions {
            broker: broker.into(),
            client_id: client_id.into(),
            prefix: "edge".into(),
            credentials: None,
            tls: TlsOptions::default(),
            keep_alive: Duration::from_secs(5),
            queue_capacity: 256,
            publish_timeout: Duration::from_secs(2),
            max_payload: 256 * 1024,
            max_incoming_packet: 1024 * 1024 + 1024,
            inflight: 100,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            requeue_limit: 1024,
            subscription_buffer: 1024,
            reply_topic: None,
            will: None,
            presence: None,
            watch_lag: false,
        }
    }

    /// Options for one instance of `service`: the client id is the instance id (made up when
    /// `None`), replies come back on `{prefix}/system/reply/{instance}`, and the Last Will
    /// is the instance's offline record (`connection lost`), retained.
    pub fn for_service(
        broker: impl Into<String>,
        prefix: impl Into<String>,
        service: &str,
        instance: Option<String>,
    ) -> BusOptions {
        let prefix = prefix.into();
        let instance = instance.unwrap_or_else(|| format!("{service}-{:016x}", random_u64()));
        let tree = Tree::new(&prefix);
        let mut o = BusOptions::new(broker, instance.clone()).prefix(prefix.clone());
        o.reply_topic = Some(tree.reply(&instance));
        let identity = Identity::new(service, &instance);
        o.will = Some(Will {
            topic: tree.registration(service, &instance),
            payload: Bytes::from(
                serde_json::to_vec(&identity.offline(REASON_CONNECTION_LOST)).unwrap_or_default(),
            ),
            qos: 1,
            retain: true,
        });
        o.presence = Some(identity);
        o.watch_lag = true;
        o
    }

    /// Sets the topic prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}
