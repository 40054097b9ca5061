//! edgebus-services: the parts of edgebus that run as processes, and the `edgebus` command line.
//!
//! # Layout
//! - [`config`]: topics.toml, loaded and validated with located errors.
//! - [`bench`]: the `edgebus bench` scenarios.
//! - [`passwd`]: `edgebus passwd`.

pub mod bench;
pub mod config;
pub mod passwd;
