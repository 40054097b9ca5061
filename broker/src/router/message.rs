//! A published message as the router holds it, shared by every queue it is in; a delivery
//! of it to one subscriber ([`Queued`]), and how a subscription wants it ([`SubOptions`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;

/// One published message.
#[derive(Debug)]
pub(crate) struct Message {
    /// The topic name, checked UTF-8.
    pub topic: Bytes,
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: u8,
    /// The RETAIN flag it was published with.
    pub retain: bool,
    /// MQTT 5 properties as published, without topic alias and subscription identifiers.
    pub props: Option<PublishProperties>,
    /// When the message expires (MQTT 5 Message Expiry Interval) [MQTT-3.3.2-5].
    pub expires: Option<Instant>,
    /// The publishing session (for No Local); 0 for the broker's own messages.
    pub origin: u64,
}

impl Message {
    /// Builds a message, taking the expiry out of `props`.
    pub fn new(
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        retain: bool,
        mut props: Option<PublishProperties>,
        origin: u64,
        now: Instant,
    ) -> Message {
        let expires = props
            .as_mut()
            .and_then(|p| {
                p.topic_alias = None;
                p.subscription_identifiers.clear();
                p.message_expiry_interval
            })
            .map(|s| now + Duration::from_secs(u64::from(s)));
        Message {
            topic,
            payload,
            qos,
            retain,
            props,
            expires,
            origin,
        }
    }

    /// Bytes it holds, as counted against queue bounds.
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + 64
    }

    /// Whether it expired at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }

    /// The properties to send at `now`: the expiry interval is what is left of it
    /// [MQTT-3.3.2-6].
    pub fn props_at(&self, now: Instant) -> Option<PublishProperties> {
        let mut p = self.props.clone()?;
        if let Some(at) = self.expires {
            let left = at.saturating_duration_since(now).as_secs_f64().ceil() as u32;
            p.message_expiry_interval = Some(left.max(1));
        }
        Some(p)
    }

    /// The topic as text.
    pub fn topic_str(&self) -> &str {
        // Checked at PUBLISH, and the broker's own topics are text.
        std::str::from_utf8(&self.topic).unwrap_or_default()
    }

    #[cfg(test)]
    pub fn for_test(topic: &str, payload: &[u8]) -> Message {
        Message::new(
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(payload),
            0,
            false,
            None,
            0,
            Instant::now(),
        )
    }
}

/// How one subscription wants its messages (MQTT 5 subscription options; 3.1.1 uses QoS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SubOptions {
    /// The maximum QoS granted.
    pub qos: u8,
    /// Do not send the subscriber its own publishes [MQTT-3.8.3-3].
    pub no_local: bool,
    /// Keep the RETAIN flag as published [MQTT-3.3.1-12/13].
    pub retain_as_published: bool,
    /// The subscription identifier, if the SUBSCRIBE gave one.
    pub id: Option<u32>,
}

/// One message on its way to one subscriber.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub msg: Arc<Message>,
    /// min(published, granted) [MQTT-3.8.4-6] (5: [MQTT-3.8.4-8]).
    pub qos: u8,
    /// The RETAIN flag to send.
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions [MQTT-3.3.4-3].
    pub sub_ids: Vec<u32>,
    /// The shared subscription (`$share/{group}/{filter}`) it came through, if any: when the
    /// session ends before its client acknowledged it, another member gets it.
    pub share: Option<Arc<str>>,
    /// Its number in a journaled session (0: not recorded).
    pub n: u64,
    /// It may have been sent before (restored after a restart): it goes with DUP.
    pub dup: bool,
}

impl Queued {
    /// A delivery of `msg` at `qos`, not yet numbered.
    pub fn new(msg: Arc<Message>, qos: u8, retain: bool, share: Option<Arc<str>>) -> Queued {
        Queued {
            msg,
            qos,
            retain,
            sub_ids: Vec::new(),
            share,
            n: 0,
            dup: false,
        }
    }
}
