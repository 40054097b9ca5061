//! edgebus-runtime: the library every edgebus service links.
//!
//! # Layout
//! - [`config`]: the `[bus]` part of topics.toml.
//! - [`topic`]: validated topic names and filters.

pub mod config;
pub mod topic;
