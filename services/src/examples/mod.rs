//! Built-in example services, run by `edgebus service NAME` or by `edgebus up` when
//! topics.toml lists them in `[up] services`.
//!
//! - [`echo`]: request/response in its simplest form.
//! - [`hostmetrics`]: the host's load, memory, CPU and temperature from /proc and /sys, as an
//!   event stream and a request endpoint.
//! - [`kv`]: an in-memory key-value store with idempotent writes, for sagas you can watch.

pub mod echo;
pub mod hostmetrics;
pub mod kv;

use edgebus_runtime::bus::Bus;
use edgebus_runtime::service::{Service, StartError};

use crate::config::TopicsFile;

/// Names of the built-in services.
pub const BUILTIN: &[&str] = &["echo", "hostmetrics", "kv"];

/// Starts the built-in service `name` on `bus`.
pub async fn start(name: &str, file: &TopicsFile, bus: &Bus) -> Result<Service, StartError> {
    match name {
        "echo" => echo::start(file, bus).await,
        "hostmetrics" => hostmetrics::start(file, bus).await,
        "kv" => kv::start(file, bus).await,
        other => Err(StartError::Unknown {
            name: other.to_owned(),
            known: format!("built-in: {}", BUILTIN.join(", ")),
        }),
    }
}
