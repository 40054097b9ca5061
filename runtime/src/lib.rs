//! edgebus-runtime: the library every edgebus service links.
//!
//! # Layout
//! - [`config`]: the `[bus]` part of topics.toml.
//! - [`topic`]: validated topic names and filters, and the topic grammar the broker shares.

pub mod config;
pub mod topic;
