//! `echo`: answers every request with its own data.
//!
//! `edge/echo/echo/request` → the request's JSON back as `data`. A JSON object with an
//! integer `delay_ms` (at most 60000) is answered after that delay, which makes timeouts
//! and concurrency limits easy to try out. With `"emit": true` it also publishes the data as
//! an event on `edge/echo/events/said` before it replies: a side effect a test can count.

use std::time::Duration;

use edgebus_runtime::bus::Bus;
use edgebus_runtime::contract::{EndpointSpec, EventSpec};
use edgebus_runtime::service::{EventError, Request, Service, ServiceBuilder, StartError};
use edgebus_runtime::wire::ServiceError;
use serde_json::Value;

use edgebus_runtime::contract::ServiceSpec;

/// The service as built (endpoints, handlers), before it is bound to a bus.
/// `contract` is topics.toml's `[[service]]` declarations.
pub fn builder(contract: &[ServiceSpec]) -> ServiceBuilder {
    let mut spec = EndpointSpec::new("echo");
    spec.max_concurrency = 64;
    spec.description =
        "replies with the request's data; `delay_ms` delays the reply, `emit` publishes it".into();
    let mut builder = edgebus_runtime::service!("echo")
        .description("answers every request with its own data")
        .capability("echo")
        .contract(contract);
    // A contract that declares echo without the event keeps it off (`emit` is then refused).
    let declared = contract.iter().find(|s| s.name == "echo");
    if declared.map_or(true, |s| s.events.iter().any(|e| e.name == "said")) {
        let mut said = EventSpec::new("said");
        said.qos = 1;
        builder = builder.event(said);
    }
    builder.endpoint_with(spec, echo)
}

/// Starts `echo` on `bus`.
pub async fn start(contract: &[ServiceSpec], bus: &Bus) -> Result<Service, StartError> {
    builder(contract).start(bus).await
}

async fn echo(req: Request<Value>) -> Result<Value, ServiceError> {
    if let Some(delay) = req.data.get("delay_ms") {
        let ms = delay
            .as_u64()
            .filter(|ms| *ms <= 60_000)
            .ok_or_else(|| ServiceError::bad_request("field `delay_ms`: expected 0 to 60000"))?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if req.data.get("emit") == Some(&Value::Bool(true)) {
        req.emit("said", &req.data).await.map_err(|e| match e {
            EventError::Bus(e) => ServiceError::unavailable(format!("event not sent: {e}")),
            other => ServiceError::bad_request(format!("field `emit`: {other}")),
        })?;
    }
    Ok(req.data)
}
