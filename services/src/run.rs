//! Running services, and single calls, from the command line.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::Bytes;
use edgebus_runtime::bus::{random_u64, Bus, BusOptions, ConnectFailure};
use edgebus_runtime::request::{RequestError, RequestOptions};
use edgebus_runtime::tree::Tree;
use edgebus_runtime::wire::{timestamp, ReplyBody};

use crate::config::TopicsFile;
use crate::examples;
use crate::ops::Hooks;

/// Bus options for one instance of `service`, from topics.toml and an optional broker override.
pub fn service_options(
    file: &TopicsFile,
    broker: Option<&str>,
    service: &str,
    instance: Option<String>,
) -> BusOptions {
    let broker = broker.unwrap_or(&file.bus.broker).to_owned();
    let mut o = BusOptions::for_service(broker, file.bus.prefix.clone(), service, instance);
    o.max_payload = file.broker.max_payload.0 as usize;
    o
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
        "discovery" => Ok(
            crate::discovery::start(&file.bus.prefix, &file.discovery, bus)
                .await?
                .service,
        ),
        "health-monitor" => Ok(crate::health::start(&file.bus.prefix, &file.health, bus)
            .await?
            .service),
        "orchestrator" => Ok(crate::orchestrator::start(
            &file.bus.prefix,
            &file.orchestrator,
            &file.saga,
            &file.service,
            bus,
        )
        .await?
        .service),
        other => examples::start(other, file, bus).await,
    }
}

/// The outcome of `edgebus call`: the reply body to print, and whether it succeeded.
pub async fn call(
    file: &TopicsFile,
    broker: Option<&str>,
    target: &str,
    payload: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(ReplyBody, bool)> {
    if timeout.is_zero() {
        bail!("--timeout must be above zero (e.g. 500ms, 5s)");
    }
    let well_formed = target.ends_with("/request")
        || target
            .split_once('/')
            .is_some_and(|(s, e)| !s.is_empty() && !e.is_empty() && !e.contains('/'));
    if !well_formed {
        bail!(
            "`{target}`: give SERVICE/ENDPOINT (e.g. echo/echo), or a request topic ending in \
             /request; `edgebus services` lists what is registered"
        );
    }
    let payload = request_payload(payload)?;
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(&payload) {
        bail!("the request is not JSON: {e}");
    }
    let broker = broker.unwrap_or(&file.bus.broker).to_owned();
    let mut o = BusOptions::new(
        broker.clone(),
        format!("edgebus-call-{:08x}", random_u64() as u32),
    )
    .prefix(file.bus.prefix.clone());
    // One reply topic shared by every `edgebus call`: replies are told apart by their
    // correlation data, and the broker does not gain a filter per call.
    o.reply_topic = Some(Tree::new(&file.bus.prefix).cli_reply());
    o.max_payload = file.broker.max_payload.0 as usize;
    o.queue_capacity = 8;
    let bus = Bus::connect(o)?;
    let t0 = std::time::Instant::now();
    // The first failure ends the call at once, with its reason (a refused connection, bad
    // credentials), rather than a wait for the whole timeout.
    if let Err(e) = bus.connect_outcome(timeout).await {
        bus.close(Duration::ZERO).await;
        return Err(match e {
            ConnectFailure::Unreachable(why) => {
                anyhow!("cannot reach the broker at {broker}: {why}")
            }
            ConnectFailure::Refused(why) => {
                anyhow!("the broker at {broker} refused the connection: {why}")
            }
            other => anyhow!("the broker at {broker}: {other}"),
        });
    }
    // The reply subscription must be active before the request goes out.
    if !bus.sync(timeout.saturating_sub(t0.elapsed())).await {
        bus.close(Duration::ZERO).await;
        return Err(anyhow!(
            "{broker}: the broker accepted the connection but did not confirm the reply \
             subscription within {}",
            humantime::format_duration(timeout)
        ));
    }
    // The contract's retry and circuit policies apply to the call.
    bus.apply_contract(&file.service);
    let topic = bus.request_topic(target);
    let r = bus
        .request_reply(
            &topic,
            Bytes::from(payload),
            &RequestOptions::timeout(timeout),
        )
        .await;
    bus.close(Duration::from_millis(500)).await;
    match r {
        Ok(reply) => {
            let ok = reply.success;
            Ok((reply, ok))
        }
        Err(e) => Ok((error_reply(&e), false)),
    }
}

/// The request body of `edgebus call`: `{}` when none is given, the argument itself, `-` for
/// stdin, or `@FILE` for a file's contents (a shell caps arguments near 128 KiB).
fn request_payload(arg: Option<&str>) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    match arg {
        None => Ok(b"{}".to_vec()),
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| anyhow!("reading the request from stdin: {e}"))?;
            Ok(buf)
        }
        Some(a) if a.starts_with('@') => {
            std::fs::read(&a[1..]).map_err(|e| anyhow!("reading the request from {}: {e}", &a[1..]))
        }
        Some(a) => Ok(a.as_bytes().to_vec()),
    }
}

fn error_reply(e: &RequestError) -> ReplyBody {
    ReplyBody {
        success: false,
        data: None,
        error: Some(e.to_body()),
        request_id: String::new(),
        correlation_id: None,
        session_id: None,
        service: None,
        instance: None,
        timestamp: timestamp(),
    }
}
