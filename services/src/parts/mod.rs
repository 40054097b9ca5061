//! The bus's own parts, each a service: [`discovery`] (the registry, `NO_RESPONDERS`, the
//! list endpoint), [`health`] (the health monitor) and [`orchestrator`] (the sagas of
//! topics.toml, run durably); and [`run_service`], which runs one part or built-in service
//! as a process (or as a task of `edgebus up`) from connect to clean stop.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use edgebus_runtime::bus::{Bus, BusOptions};

use crate::config::TopicsFile;
use crate::examples;
use crate::ops::Hooks;

pub mod discovery;
pub mod health;
pub mod orchestrator;

/// Bus options for one instance of `service`, from topics.toml and an optional broker
/// override, with the bus's credentials ([`edgebus_runtime::env::credentials`]).
pub fn service_options(
    file: &TopicsFile,
    broker: Option<&str>,
    service: &str,
    instance: Option<String>,
) -> anyhow::Result<BusOptions> {
    let broker = broker.unwrap_or(&file.bus.broker).to_owned();
    let mut o = BusOptions::for_service(broker, file.bus.prefix.clone(), service, instance);
    o.max_payload = file.broker.max_payload.0 as usize;
    o.credentials = edgebus_runtime::env::credentials(&file.bus)?;
    o.tls = edgebus_runtime::env::tls(&file.bus);
    Ok(o)
}

/// Runs the built-in service `name` until `stop` completes: connects (retrying with backoff
/// while the broker is away), starts serving, prints `edgebus service NAME ready as INSTANCE`
/// on stdout once its subscriptions are active (and runs `hooks`: metrics, systemd READY and
/// watchdog), and stops cleanly.
pub async fn run_service(
    name: &str,
    file: &TopicsFile,
    options: BusOptions,
    stop: impl Future<Output = ()>,
    hooks: Hooks,
) -> anyhow::Result<()> {
    let bus = Bus::connect(options)?;
    tokio::pin!(stop);
    let service = tokio::select! {
        s = start_part(name, file, &bus) => s?,
        _ = &mut stop => { bus.close(Duration::from_secs(1)).await; return Ok(()) }
    };
    let ready = async {
        loop {
            if bus.sync(Duration::from_secs(2)).await {
                return;
            }
        }
    };
    let mut supervisor = None;
    let mut stopped = false;
    tokio::select! {
        _ = ready => {
            println!("edgebus service {name} ready as {}", service.instance());
            std::io::stdout().flush().ok();
            tracing::info!(service = name, instance = service.instance(), "ready");
            if let Some(m) = &hooks.metrics {
                m.add_service(&service);
            }
            if hooks.systemd {
                supervisor = Some(edgebus_runtime::systemd::service_supervisor(&service).ready());
            }
            if let Some(tx) = &hooks.ready {
                let _ = tx.send(service.clone());
            }
        }
        _ = &mut stop => stopped = true,
    }
    // A stop that came while connecting has completed already: awaiting it again would
    // resume a finished future.
    if !stopped {
        stop.await;
    }
    tracing::info!(service = name, "stopping");
    if let Some(s) = supervisor {
        s.stopping(&format!(
            "{name}: stopping; answering the requests already taken"
        ));
    }
    service.stop(Duration::from_secs(2)).await;
    bus.close(Duration::from_secs(1)).await;
    Ok(())
}

/// Part names that run as services: the built-in examples, `discovery`, `health-monitor` and
/// `orchestrator`.
pub async fn start_part(
    name: &str,
    file: &TopicsFile,
    bus: &Bus,
) -> Result<edgebus_runtime::service::Service, edgebus_runtime::service::StartError> {
    match name {
        "discovery" => Ok(discovery::start(&file.bus.prefix, &file.discovery, bus)
            .await?
            .service),
        "health-monitor" => Ok(health::start(&file.bus.prefix, &file.health, bus)
            .await?
            .service),
        "orchestrator" => Ok(orchestrator::start(
            &file.bus.prefix,
            &file.orchestrator,
            &file.saga,
            &file.service,
            bus,
        )
        .await?
        .service),
        other => examples::start(other, &file.service, &file.hostmetrics, bus).await,
    }
}
