//! Services: a builder, endpoints with async handlers over serde types, and the serving
//! loop that turns every request into exactly one reply.
//!
//! ```no_run
//! use edgebus_runtime::prelude::*;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::connect(BusOptions::for_service("127.0.0.1:1883", "edge", "greeter", None))?;
//! let service = ServiceBuilder::new("greeter")
//!     .endpoint("hello", |req: Request<serde_json::Value>| async move {
//!         Ok::<_, ServiceError>(serde_json::json!({"hello": req.data["name"]}))
//!     })
//!     .start(&bus)
//!     .await?;
//! # let _ = service; Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use futures_util::FutureExt;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::{random_u64, Bus, BusError, Message, PublishOptions};
use crate::contract::{EndpointSpec, EventSpec, ServiceSpec};
use crate::policy::TokenBucket;
use crate::presence::{birth_record, Check, Checks, Figures, Presence};
use crate::stats::{EndpointSnapshot, EndpointStats};
use crate::topic::check_topic;
use crate::wire::{
    code, decode_request, now_ms, timestamp, ErrorBody, ReplyBody, RequestMeta, ServiceError,
};
use edgebus_proto::records::DeadLetter;

mod builder;
mod emit;
mod endpoint;
mod reply;
mod request;

use crate::presence::start_presence;
pub use builder::ServiceBuilder;
use builder::SharedState;
pub use emit::{Batcher, Emitter};
use endpoint::{serve, Dedupe, EndpointCtx};
pub use reply::{dead_letter_body, reply_error, ReplyAddress};
pub use request::{decode_payload, Caller, Handler, Request};
use request::{BoxFuture, FnHandler};

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The code and topics.toml disagree.
    #[error("service `{service}`: {message}")]
    Contract {
        /// The service.
        service: String,
        /// What disagrees.
        message: String,
    },
    /// State the service keeps (a journal, a store) could not be opened.
    #[error("service `{service}`: {what}: {message}")]
    State {
        /// The service.
        service: String,
        /// What could not be opened (`saga journal /var/lib/edgebus/sagas.journal`).
        what: String,
        /// Why.
        message: String,
    },
    /// No service of that name can be started here.
    #[error("no service `{name}` here ({known})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// What can be started, for the message.
        known: String,
    },
    /// topics.toml (`EDGEBUS_CONFIG`) could not be read or is invalid.
    #[error(transparent)]
    Config(#[from] crate::env::ConfigError),
    /// Subscribing failed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Why an event could not be published.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The service did not declare this event.
    #[error("event `{0}` is not declared by this service")]
    Undeclared(String),
    /// The data does not fit the event's schema.
    #[error("event `{event}` does not fit its schema: {message}")]
    Schema {
        /// The event.
        event: String,
        /// The field that does not fit.
        message: String,
    },
    /// The event could not be encoded.
    #[error("event `{0}` cannot be encoded: {1}")]
    Encode(String, String),
    /// Publishing failed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

pub(crate) struct ServiceInner {
    pub(crate) presence: Option<Arc<Presence>>,
    pub(crate) name: String,
    pub(crate) instance: String,
    pub(crate) version: String,
    pub(crate) bus: Bus,
    pub(crate) spec: ServiceSpec,
    pub(crate) deadletter: String,
    pub(crate) started: Instant,
    pub(crate) state: Option<SharedState>,
    pub(crate) stats: BTreeMap<String, Arc<EndpointStats>>,
}

/// A running service instance; clones share it.
#[derive(Clone)]
pub struct Service {
    inner: Arc<ServiceInner>,
    /// One task per endpoint, taking requests until the service stops.
    serving: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    /// Presence and tasks added with [`Service::spawn`].
    tasks: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    stopping: CancellationToken,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.inner.name)
            .field("instance", &self.inner.instance)
            .finish()
    }
}

impl Service {
    pub(crate) fn inner(&self) -> &Arc<ServiceInner> {
        &self.inner
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// This instance's id (its MQTT client id).
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// The version given to the builder.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// The contract the service runs with.
    pub fn spec(&self) -> &ServiceSpec {
        &self.inner.spec
    }

    /// The bus the service runs on.
    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Per-endpoint figures.
    pub fn stats(&self) -> BTreeMap<String, EndpointSnapshot> {
        self.inner
            .stats
            .iter()
            .map(|(k, v)| (k.clone(), v.snapshot()))
            .collect()
    }

    /// The live counters of each endpoint (for exporters such as [`crate::metrics`]).
    pub fn endpoint_stats(&self) -> impl Iterator<Item = (&str, &EndpointStats)> {
        self.inner.stats.iter().map(|(k, v)| (k.as_str(), &**v))
    }

    /// All endpoints' figures summed (latencies: the worst endpoint's).
    pub fn total_stats(&self) -> EndpointSnapshot {
        EndpointSnapshot::total(self.stats().into_values())
    }

    pub(crate) fn event_spec(&self, name: &str) -> Result<&EventSpec, EventError> {
        self.inner
            .spec
            .events
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| EventError::Undeclared(name.to_owned()))
    }

    /// Runs `task` for as long as the service runs; it is stopped by [`Service::stop`].
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    /// The instance's incarnation, when it registers.
    pub fn incarnation(&self) -> Option<u64> {
        self.inner.presence.as_ref().map(|p| p.identity.incarnation)
    }

    /// Stops serving: the endpoints are unsubscribed, so new requests go to other instances
    /// (or get `NO_RESPONDERS`); requests already received, queued or in flight, get `grace`
    /// to finish and be answered; the registration becomes
    /// `{"state": "offline", "reason": "stopped"}`.
    pub async fn stop(&self, grace: Duration) {
        if let Some(p) = &self.inner.presence {
            p.publish_stopped(&self.inner.bus).await;
        }
        self.stopping.cancel();
        let serving = std::mem::take(&mut *self.serving.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = Instant::now() + grace;
        for t in serving {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline.into(), t).await.is_err() {
                abort.abort();
            }
        }
        while Instant::now() < deadline && self.total_stats().inflight > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in &tasks {
            t.abort();
        }
    }
}
