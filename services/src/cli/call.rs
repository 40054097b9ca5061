//! `edgebus call`: one request from the command line, its reply printed.

use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::Bytes;
use edgebus_runtime::bus::{random_u64, Bus, BusOptions, ConnectFailure};
use edgebus_runtime::request::{RequestError, RequestOptions};
use edgebus_runtime::wire::{timestamp, ReplyBody};

use crate::config::TopicsFile;

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
    // Replies come back on the call's own reply topic (`P/system/reply/{client id}`), the
    // one an ACL lets a caller read, and no other caller can.
    o.max_payload = file.broker.max_payload.0 as usize;
    o.queue_capacity = 8;
    o.credentials = edgebus_runtime::env::credentials(&file.bus)?;
    o.tls = edgebus_runtime::env::tls(&file.bus);
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
