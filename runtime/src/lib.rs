//! edgebus-runtime: the library every edgebus service links.
//!
//! # Layout
//! From [`edgebus_proto`], re-exported here so that a service needs one dependency:
//! - [`config`]: the `[bus]` part of topics.toml, and the duration and size types it uses.
//! - [`contract`]: the `[[service]]` part of topics.toml: endpoints, events, schemas.
//! - [`policy`]: retry policies, circuit breakers and rate limits.
//! - [`topic`]: the topic grammar: what names and filters may hold, and matching.
//! - [`wire`]: error codes, the reply body, request metadata.
//! - [`tree`]: every topic of the bus, named once, as a function of the prefix.
//! - [`records`]: the bus's own records (registration, heartbeat, health, discovery), typed.
//!
//! The client:
//! - [`app`]: a service as a program: options from the environment, the stop signal, and
//!   [`service::ServiceBuilder::run`], an instance's whole life in one call.
//! - [`env`]: where a service connects, from `EDGEBUS_CONFIG`, `EDGEBUS_BROKER` and
//!   `EDGEBUS_INSTANCE`; [`env::load_contract`] reads topics.toml's `[[service]]` contracts.
//! - [`bus`]: one resilient MQTT 5 connection per process: its options, messages, publishing,
//!   subscriptions, and the connection task (`bus/connection.rs`).
//! - [`presence`]: registration (birth, clean stop), heartbeats, health checks, all in one
//!   place (the Last Will is set with the bus's options, [`bus::BusOptions::for_service`]).
//! - [`request`]: the client side of request/response.
//! - [`service`]: services: the builder (`service/builder.rs`), the request a handler sees
//!   (`request.rs`), an endpoint's serving loop (`endpoint.rs`), the one reply path
//!   (`reply.rs`), and event publishing (`emit.rs`: one at a time, or batched).
//! - [`saga`]: sagas and pipelines: a run's state and what it does next (`saga/state.rs`), the
//!   executor with retries and compensation (`saga/run.rs`), a durable journal
//!   (`saga/journal.rs`), input templates (`saga/template.rs`).
//! - [`events`]: event envelopes and typed event streams.
//! - [`stats`]: per-endpoint counters and latency percentiles.
//! - [`systemd`]: readiness, status and a watchdog that pings only while the loops are healthy.
//! - [`metrics`]: Prometheus text for a process's buses and services, and a tiny HTTP server.
//! - [`logging`]: log lines to journald with fields, or timestamped to stderr
//!   ([`init_logging`]).

pub use edgebus_proto::{config, contract, policy, records, topic, tree, wire};

/// The whole of [`edgebus_proto`], for what the modules above do not name.
pub use edgebus_proto as proto;

pub mod app;
pub mod bus;
pub mod env;
pub mod events;
pub mod logging;
pub mod metrics;
pub mod presence;
pub mod request;
pub mod saga;
pub mod service;
pub mod stats;
pub mod systemd;

pub use app::shutdown_signal;
pub use env::load_contract;

/// Installs the log output a service needs, once, at the start of `main`: journald with
/// fields under systemd, timestamped lines otherwise, at `info` unless `EDGEBUS_LOG` (or
/// `RUST_LOG`) says otherwise. See [`logging`].
pub fn init_logging() {
    logging::init("info,rumqttc=warn");
}

/// What a service author needs, in one import.
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
