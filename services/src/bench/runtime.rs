//! Scenarios of the runtime over a broker: request/response with in-process `echo`
//! instances, and sagas over an in-process `kv`, journaled.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::bail;
use edgebus_runtime::bus::{Bus, BusOptions};
use edgebus_runtime::request::RequestOptions;
use edgebus_runtime::service::Service;
use edgebus_runtime::tree::Tree;
use hdrhistogram::Histogram;

use super::broker::percentiles;
use super::figure::Figure;
use super::mqtt::run_id;
use super::BenchOptions;
use crate::examples::echo;

/// Requests in flight in the runtime throughput scenario.
pub const RUNTIME_CONCURRENCY: usize = 32;

/// An in-process `echo` service on `far` and a runtime client on `addr`, both synced.
async fn runtime_pair(addr: SocketAddr, far: SocketAddr) -> anyhow::Result<(Bus, Bus, Service)> {
    let (mut servers, client) = runtime_set(addr, far, 1).await?;
    let (server, service) = servers.remove(0);
    Ok((server, client, service))
}

/// `n` in-process `echo` instances on `far` (each on its own connection) and a runtime
/// client on `addr`, synced.
async fn runtime_set(
    addr: SocketAddr,
    far: SocketAddr,
    n: usize,
) -> anyhow::Result<(Vec<(Bus, Service)>, Bus)> {
    let run = run_id();
    let mut servers = Vec::new();
    for i in 0..n {
        let server = Bus::connect(BusOptions::for_service(
            far.to_string(),
            "edge",
            "echo",
            Some(format!("bench-echo-{run}-{i}")),
        ))?;
        let service = echo::start(&[], &server).await?;
        if !server.sync(Duration::from_secs(5)).await {
            bail!("runtime bus did not connect");
        }
        servers.push((server, service));
    }
    let client = Bus::connect(BusOptions::new(
        addr.to_string(),
        format!("bench-client-{run}"),
    ))?;
    if !client.sync(Duration::from_secs(5)).await {
        bail!("runtime bus did not connect");
    }
    Ok((servers, client))
}

/// One request at a time through the runtime, from a client on `addr` to an in-process
/// `echo` on `far`.
pub async fn runtime_round_trip(
    addr: SocketAddr,
    far: SocketAddr,
    opts: &BenchOptions,
) -> anyhow::Result<Figure> {
    let (server, client, service) = runtime_pair(addr, far).await?;
    let payload = bytes::Bytes::from(serde_json::to_vec(&serde_json::json!({
        "p": "x".repeat(opts.payload.saturating_sub(8))
    }))?);
    let topic = client.request_topic("echo/echo");
    let ro = RequestOptions::timeout(Duration::from_secs(2));
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let deadline = Instant::now() + opts.timeout;
    let mut failed = 0;
    for _ in 0..opts.round_trips {
        if Instant::now() > deadline {
            break;
        }
        let t0 = Instant::now();
        match client.request_raw(&topic, payload.clone(), &ro).await {
            Ok(_) => hist.record(t0.elapsed().as_micros().max(1) as u64)?,
            Err(_) => failed += 1,
        }
    }
    service.stop(Duration::ZERO).await;
    client.close(Duration::from_millis(200)).await;
    server.close(Duration::from_millis(200)).await;
    percentiles(&hist, failed, "failed")
}

/// Requests per second through the runtime from a client on `addr`, [`RUNTIME_CONCURRENCY`]
/// in flight, to `instances` in-process `echo` instances on `far` sharing the endpoint.
pub async fn runtime_throughput(
    addr: SocketAddr,
    far: SocketAddr,
    opts: &BenchOptions,
    instances: usize,
) -> anyhow::Result<Figure> {
    let (servers, client) = runtime_set(addr, far, instances).await?;
    let total = (opts.messages / 2).max(RUNTIME_CONCURRENCY);
    let topic = client.request_topic("echo/echo");
    let payload = bytes::Bytes::from(serde_json::to_vec(&serde_json::json!({
        "p": "x".repeat(opts.payload.saturating_sub(8))
    }))?);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..RUNTIME_CONCURRENCY {
        let (client, topic, payload, next) =
            (client.clone(), topic.clone(), payload.clone(), next.clone());
        let deadline = t0 + opts.timeout;
        workers.push(tokio::spawn(async move {
            let ro = RequestOptions::timeout(Duration::from_secs(5));
            let (mut ok, mut failed) = (0usize, 0usize);
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total
                && Instant::now() < deadline
            {
                match client.request_raw(&topic, payload.clone(), &ro).await {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for w in workers {
        let (o, f) = w.await?;
        ok += o;
        failed += f;
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut served = Vec::new();
    for (server, service) in servers {
        served.push(service.total_stats().requests);
        service.stop(Duration::ZERO).await;
        server.close(Duration::from_millis(200)).await;
    }
    client.close(Duration::from_millis(200)).await;
    let rate = ok as f64 / secs;
    let mut s = format!("{rate:.0} req/s ({ok} answered");
    if served.len() > 1 {
        let split: Vec<String> = served.iter().map(u64::to_string).collect();
        s.push_str(&format!(", split {}", split.join(" + ")));
    }
    if failed > 0 {
        s.push_str(&format!(", {failed} failed"));
    }
    s.push(')');
    Ok(Figure::new(rate, s).delivered(ok as u64, (ok + failed) as u64))
}

/// The saga scenario: a 3-step saga over an in-process `kv` (each step a put), journaled to a
/// temporary file. Returns (runs/s with 16 at once, per-step overhead over a bare request,
/// journal bytes per run).
pub async fn saga_figures(addr: SocketAddr, runs: usize) -> anyhow::Result<[Figure; 3]> {
    use edgebus_runtime::saga::{FileJournal, Journal, Saga, Step};
    let prefix = format!("bench{:08x}", edgebus_runtime::bus::random_u64() as u32);
    let kv_bus = Bus::connect(BusOptions::for_service(
        addr.to_string(),
        prefix.clone(),
        "kv",
        None,
    ))?;
    let kv = crate::examples::kv::builder(&[]).start(&kv_bus).await?;
    let mut o = BusOptions::new(addr.to_string(), format!("{prefix}-saga"));
    o.reply_topic = Some(Tree::new(&prefix).reply("saga"));
    o.prefix = prefix.clone();
    let bus = Bus::connect(o)?;
    anyhow::ensure!(
        kv_bus.sync(Duration::from_secs(5)).await,
        "broker unreachable"
    );
    anyhow::ensure!(bus.sync(Duration::from_secs(5)).await, "broker unreachable");
    let put = Tree::new(&prefix).request("kv", "put");
    let mut saga = Saga::new("bench");
    for s in ["a", "b", "c"] {
        saga = saga.step(
            Step::call(s, put.clone())
                .input(serde_json::json!({"key": format!("${{run_id}}/{s}"), "value": 1}))
                .compensate_call(Tree::new(&prefix).request("kv", "delete")),
        );
    }
    let dir = std::env::temp_dir().join(format!("edgebus-bench-{prefix}"));
    let (journal, _) = FileJournal::open(dir.join("sagas.journal"), 1024 * 1024)?;
    let journal = std::sync::Arc::new(journal);
    let saga = std::sync::Arc::new(saga);

    // Bare requests, one at a time.
    let n = runs.max(10);
    let t0 = Instant::now();
    for i in 0..n {
        let body = format!(r#"{{"key":"bare/{i}","value":1}}"#);
        bus.request_raw(&put, bytes::Bytes::from(body), &RequestOptions::default())
            .await
            .map_err(|e| anyhow::anyhow!("bare request: {e}"))?;
    }
    let bare = t0.elapsed() / n as u32;

    // Runs one at a time: the per-step cost.
    let run_one = |saga: std::sync::Arc<Saga>, journal: std::sync::Arc<FileJournal>, bus: Bus| async move {
        let start = saga.start_transition(
            Saga::new_run_id(),
            serde_json::json!({}),
            serde_json::Value::Null,
        );
        let j: &dyn Journal = &*journal;
        saga.execute(&bus, &start, Some(j), None).await
    };
    let before = journal.bytes_written();
    let t0 = Instant::now();
    for _ in 0..n {
        let s = run_one(saga.clone(), journal.clone(), bus.clone()).await?;
        anyhow::ensure!(
            s.status.as_str() == "completed",
            "run {}",
            s.status.as_str()
        );
    }
    let per_run = t0.elapsed() / n as u32;
    let bytes = (journal.bytes_written() - before) / n as u64;

    // Runs 16 at once: throughput.
    let t0 = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let f = run_one(saga.clone(), journal.clone(), bus.clone());
        tasks.push(tokio::spawn(async move {
            let r = f.await;
            drop(permit);
            r
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    kv.stop(Duration::from_millis(200)).await;
    kv_bus.close(Duration::from_millis(200)).await;
    bus.close(Duration::from_millis(200)).await;
    let _ = std::fs::remove_dir_all(&dir);
    let step = per_run / 3;
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    Ok([
        Figure::new(rate, format!("{rate:.0} runs/s")),
        Figure::new(
            micros(step),
            format!(
                "{:.0} µs per step vs {:.0} µs bare (+{:.0} µs: 2 journal writes with fdatasync)",
                micros(step),
                micros(bare),
                micros(step.saturating_sub(bare))
            ),
        ),
        Figure::new(bytes as f64, format!("{bytes} bytes")),
    ])
}
