//! Publishing a service's declared events: one at a time ([`Emitter`]), or in batches
//! ([`Batcher`]). Each is checked against the event's schema before it goes out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{EventError, Service, ServiceInner};
use crate::bus::{BusError, PublishOptions};
use crate::contract::EventSpec;
use crate::events::Event;

/// An event's `type`: `{service}.{event}`, the event's `/` written as `.`.
fn kind(service: &str, event: &str) -> String {
    format!("{service}.{}", event.replace('/', "."))
}

/// Publishes one service's declared events. A handler has one in its
/// [`crate::service::Request`] (`req.emit(…)`); [`Service::emitter`] gives one to any task.
#[derive(Clone)]
pub struct Emitter(pub(crate) Arc<ServiceInner>);

impl std::fmt::Debug for Emitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emitter")
            .field("service", &self.0.name)
            .field("instance", &self.0.instance)
            .finish()
    }
}

impl Emitter {
    fn event_spec(&self, name: &str) -> Result<&EventSpec, EventError> {
        self.0
            .spec
            .events
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| EventError::Undeclared(name.to_owned()))
    }

    fn envelope<T: Serialize>(
        &self,
        name: &str,
        data: &T,
        correlation_id: Option<String>,
    ) -> Result<Event<Value>, EventError> {
        let spec = self.event_spec(name)?;
        let data = serde_json::to_value(data)
            .map_err(|e| EventError::Encode(name.into(), e.to_string()))?;
        if let Some(schema) = &spec.schema {
            schema.check(&data).map_err(|message| EventError::Schema {
                event: name.into(),
                message,
            })?;
        }
        Ok(Event::new(
            kind(&self.0.name, name),
            format!("{}/{}", self.0.name, self.0.instance),
            data,
            correlation_id,
        ))
    }

    /// Publishes a declared event.
    pub async fn emit<T: Serialize>(&self, name: &str, data: &T) -> Result<(), EventError> {
        self.emit_correlated(name, data, None).await
    }

    /// Publishes a declared event that belongs to a request.
    pub async fn emit_correlated<T: Serialize>(
        &self,
        name: &str,
        data: &T,
        correlation_id: Option<String>,
    ) -> Result<(), EventError> {
        let event = self.envelope(name, data, correlation_id)?;
        let spec = self.event_spec(name)?;
        let topic = spec.topic(self.0.bus.prefix(), &self.0.name);
        let opts = PublishOptions {
            qos: spec.qos,
            retain: spec.retain,
            properties: None,
        };
        self.0.bus.publish_json(&topic, &event, opts).await?;
        Ok(())
    }
}

impl Service {
    /// A handle that publishes this service's events, for tasks that outlive a request.
    pub fn emitter(&self) -> Emitter {
        Emitter(self.inner().clone())
    }

    /// Publishes a declared event.
    pub async fn emit<T: Serialize>(&self, name: &str, data: &T) -> Result<(), EventError> {
        self.emitter().emit(name, data).await
    }

    /// Publishes a declared event that belongs to a request.
    pub async fn emit_correlated<T: Serialize>(
        &self,
        name: &str,
        data: &T,
        correlation_id: Option<String>,
    ) -> Result<(), EventError> {
        self.emitter()
            .emit_correlated(name, data, correlation_id)
            .await
    }

    /// A publisher that sends events of `name` in batches (a JSON array of envelopes per
    /// message), flushed when `max_count` are waiting or `interval` has passed. It holds at
    /// most `4 × max_count` events; beyond that `push` fails and the drop is counted.
    pub fn batcher(
        &self,
        name: &str,
        max_count: usize,
        interval: Duration,
    ) -> Result<Batcher, EventError> {
        let spec = self.event_spec(name)?.clone();
        let max_count = max_count.max(1);
        let (tx, mut rx) = mpsc::channel::<Event<Value>>(max_count * 4);
        let bus = self.bus().clone();
        let topic = spec.topic(bus.prefix(), self.name());
        let opts = PublishOptions {
            qos: spec.qos,
            retain: false,
            properties: None,
        };
        let failed = Arc::new(AtomicU64::new(0));
        let task_failed = failed.clone();
        tokio::spawn(async move {
            let mut batch: Vec<Event<Value>> = Vec::with_capacity(max_count);
            let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let (closed, ticked) = tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(ev) => { batch.push(ev); (false, false) }
                        None => (true, false),
                    },
                    _ = tick.tick() => (false, true),
                };
                let full = batch.len() >= max_count;
                if (full || closed || ticked) && !batch.is_empty() {
                    let n = batch.len() as u64;
                    if bus
                        .publish_json(&topic, &batch, opts.clone())
                        .await
                        .is_err()
                    {
                        task_failed.fetch_add(n, Ordering::Relaxed);
                    }
                    batch.clear();
                }
                if closed {
                    return;
                }
            }
        });
        Ok(Batcher {
            service: self.name().to_owned(),
            name: name.to_owned(),
            source: format!("{}/{}", self.name(), self.instance()),
            schema: spec.schema,
            tx,
            dropped: failed,
        })
    }
}

/// Sends events in batches; see [`Service::batcher`].
#[derive(Debug)]
pub struct Batcher {
    service: String,
    name: String,
    source: String,
    schema: Option<crate::contract::Schema>,
    tx: mpsc::Sender<Event<Value>>,
    dropped: Arc<AtomicU64>,
}

impl Batcher {
    /// Adds an event to the next batch; fails at once when the batch buffer is full.
    pub fn push<T: Serialize>(&self, data: &T) -> Result<(), EventError> {
        let data = serde_json::to_value(data)
            .map_err(|e| EventError::Encode(self.name.clone(), e.to_string()))?;
        if let Some(schema) = &self.schema {
            schema.check(&data).map_err(|message| EventError::Schema {
                event: self.name.clone(),
                message,
            })?;
        }
        let ev = Event::new(
            kind(&self.service, &self.name),
            self.source.clone(),
            data,
            None,
        );
        self.tx.try_send(ev).map_err(|_| {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            EventError::Bus(BusError::Backpressure(Duration::ZERO))
        })
    }

    /// Events dropped: buffer full, or their batch failed to publish.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
