//! edgebus-runtime: the library every edgebus service links.
//!
//! # Layout
//! - [`config`]: the `[bus]` part of topics.toml, and the duration and size types it uses.
//! - [`contract`]: the `[[service]]` part of topics.toml: endpoints, events, schemas.
//! - [`policy`]: retry policies, circuit breakers and rate limits.
//! - [`topic`]: validated topic names and filters, and the topic grammar the broker shares.
//! - [`wire`]: error codes, the reply body, request metadata.
//!
//! With the `client` feature (on by default):
//! - [`app`]: a service as a program: options from the environment, the stop signal, and
//!   [`service::ServiceBuilder::run`], an instance's whole life in one call.
//! - [`bus`]: one resilient MQTT 5 connection per process.
//! - [`presence`]: registration (birth, will, clean stop), heartbeats, health checks.
//! - [`request`]: the client side of request/response.
//! - [`service`]: services, endpoints and the serving loop.
//! - [`saga`]: sagas and pipelines: steps, retries, compensation, a durable journal.
//! - [`events`]: event envelopes, typed event streams, batching.
//! - [`stats`]: per-endpoint counters and latency percentiles.
//! - [`systemd`]: readiness, status and a watchdog that pings only while the loops are healthy.
//! - [`metrics`]: Prometheus text for a process's buses and services, and a tiny HTTP server.
//! - [`logging`]: log lines to journald with fields, or timestamped to stderr
//!   ([`init_logging`]).

pub mod config;
pub mod contract;
pub mod policy;
pub mod topic;
pub mod wire;

#[cfg(feature = "client")]
pub mod app;
#[cfg(feature = "client")]
pub mod bus;
#[cfg(feature = "client")]
pub mod events;
#[cfg(feature = "client")]
pub mod logging;
#[cfg(feature = "client")]
pub mod metrics;
#[cfg(feature = "client")]
pub mod presence;
#[cfg(feature = "client")]
pub mod request;
#[cfg(feature = "client")]
pub mod saga;
#[cfg(feature = "client")]
pub mod service;
#[cfg(feature = "client")]
pub mod stats;
#[cfg(feature = "client")]
pub mod systemd;

/// Installs the log output a service needs, once, at the start of `main`: journald with
/// fields under systemd, timestamped lines otherwise, at `info` unless `EDGEBUS_LOG` (or
/// `RUST_LOG`) says otherwise. See [`logging`].
#[cfg(feature = "client")]
pub fn init_logging() {
    logging::init("info,rumqttc=warn");
}

/// What a service author needs, in one import.
#[cfg(feature = "client")]
pub mod prelude {
    pub use crate::app::shutdown_signal;
    pub use crate::bus::{Bus, BusOptions, Message, PublishOptions};
    pub use crate::contract::{EndpointSpec, EventSpec, ServiceSpec};
    pub use crate::events::{Event, EventStream};
    pub use crate::presence::{Check, Status};
    pub use crate::request::{RequestError, RequestOptions};
    pub use crate::saga::{RetryPolicy, RunState, RunStatus, Saga, Step};
    pub use crate::service::{Request, Service, ServiceBuilder};
    pub use crate::wire::{code, ServiceError};
}
