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

use edgebus_runtime::contract::ServiceSpec;

/// Names of the built-in services.
pub const BUILTIN: &[&str] = &["echo", "hostmetrics", "kv"];

/// Starts the built-in service `name` on `bus`, with topics.toml's `[[service]]`
/// declarations (`contract`) and its `[hostmetrics]` table.
pub async fn start(
    name: &str,
    contract: &[ServiceSpec],
    hostmetrics: &hostmetrics::HostmetricsConfig,
    bus: &Bus,
) -> Result<Service, StartError> {
    match name {
        "echo" => echo::start(contract, bus).await,
        "hostmetrics" => hostmetrics::start(contract, hostmetrics, bus).await,
        "kv" => kv::start(contract, bus).await,
        other => Err(StartError::Unknown {
            name: other.to_owned(),
            known: format!("built-in: {}", BUILTIN.join(", ")),
        }),
    }
}
