//! edgebus-services: the parts of edgebus that run as processes, and the `edgebus` command line.
//!
//! # Layout
//! - [`cli`]: the command line; `main.rs` only calls [`cli::main`]. [`cli::up`] runs the
//!   whole bus in one process and can run in-process; [`cli::call`] is `edgebus call`,
//!   [`cli::views`] `edgebus services` and `edgebus health`, [`cli::bench`] `edgebus bench`.
//! - [`parts`]: the bus's own parts as services ([`parts::discovery`], [`parts::health`],
//!   [`parts::orchestrator`]) and [`parts::run_service`], one part's life as a process.
//! - [`examples`]: the built-in example services (`echo`, `hostmetrics`, `kv`).
//! - [`config`]: topics.toml, loaded and validated with located errors.
//! - [`bench`]: the benchmark scenarios, each returning a typed [`bench::Figure`].
//! - [`ops`]: systemd readiness and watchdog, status lines, Prometheus metrics.
//! - [`passwd`]: `edgebus passwd`.

pub mod bench;
pub mod cli;
pub mod config;
pub mod examples;
pub mod ops;
pub mod parts;
pub mod passwd;
