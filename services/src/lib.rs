//! edgebus-services: the parts of edgebus that run as processes, and the `edgebus` command line.
//!
//! # Layout
//! - [`config`]: topics.toml, loaded and validated with located errors.
//! - [`bench`]: the `edgebus bench` scenarios; [`detect`], its failure-detection scenario;
//!   [`overload`], the ones that push a broker past what its subscribers take.
//! - [`passwd`]: `edgebus passwd`.
//! - [`examples`]: the built-in example services (`echo`, `hostmetrics`, `kv`).
//! - [`discovery`], [`health`]: the registry and the health monitor, as services.
//! - [`orchestrator`]: the sagas of topics.toml, run durably.
//! - [`views`]: `edgebus services` and `edgebus health`.
//! - [`run`]: running services and making calls from the command line.
//! - [`ops`]: systemd readiness and watchdog, status lines, Prometheus metrics.

pub mod bench;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod examples;
pub mod health;
pub mod ops;
pub mod orchestrator;
pub mod overload;
pub mod passwd;
pub mod run;
pub mod views;
