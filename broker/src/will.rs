//! Last Wills: published when a connection ends without a normal DISCONNECT, at once or after
//! their Will Delay Interval [MQTT-3.1.3-9].
//!
//! A delayed will waits in a task of its own, and is cancelled when a client takes its
//! session again before the delay ends. With persistence on, it is also recorded with its
//! session: after a restart it is scheduled again for the time it was due, and one that fell
//! due while the broker was down is published at once, late rather than never.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::protocol::{LastWill, LastWillProperties, PublishProperties};

use crate::router::journal::{unix_ms, Change, Journal};
use crate::router::message::Message;
use crate::stats::bump;
use crate::Shared;

/// Publishes the will of the session `session` (its router key) now, or after `delay_s`.
pub(crate) fn publish(
    shared: &Arc<Shared>,
    session: &str,
    will: LastWill,
    props: Option<LastWillProperties>,
    delay_s: u32,
) {
    let props = props.map(|p| PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        subscription_identifiers: Vec::new(),
        content_type: p.content_type,
    });
    let delay = Duration::from_secs(u64::from(delay_s));
    // Its Message Expiry Interval runs from when it is published.
    let msg = Arc::new(Message::new(
        will.topic,
        will.message,
        will.qos as u8,
        will.retain,
        props,
        0,
        Instant::now() + delay,
    ));
    if delay.is_zero() {
        fire(shared, &msg);
        return;
    }
    let key: Arc<str> = Arc::from(session);
    let due_ms = unix_ms().saturating_add(delay.as_millis() as u64);
    if let Some(store) = shared.store.get() {
        store.record(
            &key,
            Change::Will {
                due_ms,
                msg: msg.clone(),
            },
        );
    }
    schedule(shared, key, msg, due_ms);
}

/// Waits until `due_ms` (unless a client takes the session `key` first), then publishes
/// `msg`. Must run inside the broker's runtime.
pub(crate) fn schedule(shared: &Arc<Shared>, key: Arc<str>, msg: Arc<Message>, due_ms: u64) {
    let delay = Duration::from_millis(due_ms.saturating_sub(unix_ms()));
    let (generation, cancel) = shared.sessions.delay_will(&key, due_ms, msg.clone());
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(delay) => fire(&shared, &msg),
        }
        shared.sessions.will_done(&key, generation);
        if let Some(store) = shared.store.get() {
            store.record(&key, Change::WillDone { due_ms });
        }
    });
}

fn fire(shared: &Shared, msg: &Arc<Message>) {
    bump(&shared.stats.wills);
    // The expiry interval left: all of it, unless the will was restored late.
    shared.publish(
        msg.topic.clone(),
        msg.payload.clone(),
        msg.qos,
        msg.retain,
        msg.props_at(Instant::now()),
    );
}
