//! edgebus-proto: what every part of edgebus agrees on, with no I/O. The broker and the
//! runtime both build on it.
//!
//! # Layout
//! - [`config`]: the `[bus]` part of topics.toml, and the duration and size types it uses.
//! - [`contract`]: the `[[service]]` part of topics.toml: endpoints, events, schemas.
//! - [`policy`]: retry policies, circuit breakers and rate limits.
//! - [`topic`]: the topic grammar: what names and filters may hold, and matching.
//! - [`wire`]: error codes, the reply body, request metadata.
//! - [`tree`]: every topic of the bus, named once, as a function of the prefix.
//! - [`records`]: the bus's own records (registration, heartbeat, health, discovery updates,
//!   lag reports, dead letters), typed for writers and readers alike.

pub mod config;
pub mod contract;
pub mod policy;
pub mod records;
pub mod topic;
pub mod tree;
pub mod wire;
