//! Event streams: a CloudEvents-style envelope, and typed subscriptions as a `Stream`. A
//! service publishes its events with [`crate::service::Emitter`] and
//! [`crate::service::Batcher`].

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bus::{random_u64, Bus, BusError, Subscriber};
use crate::wire::timestamp;

/// One event as it travels: `{"id", "type", "source", "time", "correlation_id", "data"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event<T> {
    /// Unique id (`{instance}-{seq}` hex).
    pub id: String,
    /// `{service}.{event}`, e.g. `hostmetrics.reading`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `{service}/{instance}`.
    pub source: String,
    /// When it was made (RFC 3339, UTC).
    pub time: String,
    /// The request this event belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The event itself.
    pub data: T,
}

impl<T> Event<T> {
    /// A new event of `kind` (`{service}.{event}`) from `source` (`{service}/{instance}`),
    /// with a fresh id and the time now.
    pub fn new(kind: String, source: String, data: T, correlation_id: Option<String>) -> Self {
        Event {
            id: format!("{:016x}", random_u64()),
            kind,
            source,
            time: timestamp(),
            correlation_id,
            data,
        }
    }
}

/// An event payload that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable event on `{topic}`: {message}")]
pub struct DecodeError {
    /// Where it came from.
    pub topic: String,
    /// Why it could not be read.
    pub message: String,
}

/// A typed subscription to events; a `Stream` of `Result<Event<T>, DecodeError>`.
///
/// Its buffer is bounded: a consumer that falls behind loses events, and
/// [`EventStream::lagged`] counts them.
#[derive(Debug)]
pub struct EventStream<T> {
    sub: Subscriber,
    ready: VecDeque<Result<Event<T>, DecodeError>>,
    _t: PhantomData<fn() -> T>,
}

impl Bus {
    /// Subscribes to the events matching `filter`, decoded as `T`.
    pub async fn events<T: DeserializeOwned>(
        &self,
        filter: &str,
        qos: u8,
    ) -> Result<EventStream<T>, BusError> {
        let sub = self.subscribe(filter, qos).await?;
        Ok(EventStream {
            sub,
            ready: VecDeque::new(),
            _t: PhantomData,
        })
    }
}

impl<T: DeserializeOwned> EventStream<T> {
    /// The next event, or a decode error for a payload that is not an event of `T`; `None`
    /// when the bus is closed.
    pub async fn next(&mut self) -> Option<Result<Event<T>, DecodeError>> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            let msg = self.sub.recv().await?;
            self.decode(&msg.topic, &msg.payload);
        }
    }

    /// Events lost because this stream fell behind.
    pub fn lagged(&self) -> u64 {
        self.sub.dropped()
    }

    fn decode(&mut self, topic: &str, payload: &[u8]) {
        let err = |message: String| DecodeError {
            topic: topic.to_owned(),
            message,
        };
        match serde_json::from_slice::<Value>(payload) {
            Err(e) => self
                .ready
                .push_back(Err(err(format!("malformed JSON: {e}")))),
            Ok(Value::Array(items)) => {
                for item in items {
                    self.ready
                        .push_back(serde_json::from_value(item).map_err(|e| err(e.to_string())));
                }
            }
            Ok(v) => self
                .ready
                .push_back(serde_json::from_value(v).map_err(|e| err(e.to_string()))),
        }
    }
}

// Nothing in an `EventStream` is pinned in place: events are only moved out of the queue.
impl<T> Unpin for EventStream<T> {}

impl<T: DeserializeOwned> Stream for EventStream<T> {
    type Item = Result<Event<T>, DecodeError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(e) = this.ready.pop_front() {
                return Poll::Ready(Some(e));
            }
            match this.sub.poll_recv(cx) {
                Poll::Ready(Some(msg)) => this.decode(&msg.topic, &msg.payload),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
