//! `edgebus bench`: broker scenarios against any MQTT broker, printed as a table.
//!
//! Every scenario is bounded in count and in time; losses are reported, never hidden. The same
//! run can measure several brokers (`--broker` repeated, `--embedded`, `--mosquitto`), so the
//! figures side by side come from one machine in one state.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use edgebus_runtime::bus::{Bus, BusOptions};
use edgebus_runtime::request::RequestOptions;
use edgebus_runtime::service::Service;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::TopicsFile;
use crate::examples::echo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A child process SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub struct Spawned(pub std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Round trips per round-trip scenario.
    pub round_trips: usize,
    /// Messages per publisher in fan-in, and in total for fan-out.
    pub messages: usize,
    /// Publishers (fan-in) and subscribers (fan-out).
    pub width: usize,
    /// Connections opened by the connection-rate scenario.
    pub connections: usize,
    /// Idle connections held for the memory scenario (needs the broker's pid).
    pub idle_connections: usize,
    /// Payload size in bytes.
    pub payload: usize,
    /// Distinct topics published to by the memory scenario (each matched by a subscriber).
    pub topics: usize,
    /// Distinct client ids that connect and leave in the memory scenario.
    pub client_ids: usize,
    /// Trials of the failure-detection scenario (0 skips it).
    pub detect_trials: usize,
    /// Scenario groups to run (`rtt`, `runtime`, `fan`, `connect`, `memory`, `detect`);
    /// empty runs all.
    pub only: Vec<String>,
    /// Upper bound on each scenario.
    pub timeout: Duration,
}

impl BenchOptions {
    fn wants(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }
}

/// The scenario groups `--only` takes.
pub const GROUPS: &[&str] = &[
    "rtt", "runtime", "fan", "connect", "memory", "detect", "saga",
];

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            round_trips: 2000,
            messages: 20_000,
            width: 4,
            connections: 2000,
            idle_connections: 1000,
            payload: 64,
            topics: 100_000,
            client_ids: 10_000,
            detect_trials: 5,
            only: Vec::new(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// A broker under test.
#[derive(Debug, Clone)]
pub struct Target {
    /// Column name.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its process id, to read RSS from /proc.
    pub pid: Option<u32>,
}

/// One figure.
#[derive(Debug, Clone)]
pub struct Row {
    /// Scenario and measure.
    pub name: String,
    /// The value, formatted.
    pub value: String,
}

/// Runs every scenario against one broker.
pub async fn run_all(target: &Target, opts: &BenchOptions) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut push = |name: &str, r: anyhow::Result<String>| {
        rows.push(Row {
            name: name.to_owned(),
            value: r.unwrap_or_else(|e| format!("error: {e:#}")),
        });
    };
    let rss_idle = target.pid.map(rss).transpose();
    if opts.wants("rtt") {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let q = qos as u8;
            push(
                &format!("round trip QoS {q} p50 / p99 / p999"),
                round_trip(target.addr, qos, opts).await,
            );
        }
    }
    if opts.wants("runtime") {
        push(
            "runtime request/response QoS 1 p50 / p99 / p999",
            runtime_round_trip(target.addr, opts).await,
        );
        push(
            &format!("runtime requests/s, one echo, {RUNTIME_CONCURRENCY} in flight"),
            runtime_throughput(target.addr, opts).await,
        );
    }
    if opts.wants("fan") {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let q = qos as u8;
            push(
                &format!("fan-in {}→1 QoS {q} (msg/s, delivered)", opts.width),
                fan_in(target.addr, qos, opts).await,
            );
            push(
                &format!("fan-out 1→{} QoS {q} (deliveries/s, delivered)", opts.width),
                fan_out(target.addr, qos, opts).await,
            );
        }
    }
    if opts.wants("connect") {
        push(
            "connection rate (CONNECT→CONNACK/s)",
            connection_rate(target.addr, opts).await,
        );
    }
    if opts.wants("saga") {
        match saga_figures(target.addr, 300).await {
            Ok([rate, step, bytes]) => {
                push("saga runs/s, 3 steps, 16 at once, journaled", Ok(rate));
                push("saga per-step cost, one run at a time", Ok(step));
                push("saga journal bytes per run", Ok(bytes));
            }
            Err(e) => push("saga", Err(e)),
        }
    }
    if opts.wants("detect") && opts.detect_trials > 0 {
        let n = opts.detect_trials;
        match crate::detect::run(target.addr, n).await {
            Ok(d) => {
                push(
                    &format!("SIGKILL → offline alert, ms p50 / max ({n} trials)"),
                    Ok(crate::detect::p50_max_ms(&d.kill)),
                );
                push(
                    &format!("SIGSTOP → unhealthy alert, ms p50 / max ({n} trials)"),
                    Ok(crate::detect::p50_max_ms(&d.stop)),
                );
                push(
                    &format!("NO_RESPONDERS reply, ms p50 / max ({n} trials)"),
                    Ok(crate::detect::p50_max_ms(&d.no_responders)),
                );
                push(
                    "detection events duplicated / missing",
                    Ok(format!("{} / {}", d.duplicates, d.missing)),
                );
            }
            Err(e) => push("failure detection", Err(e)),
        }
    }
    if !opts.wants("memory") {
        return rows;
    }
    if let (Some(pid), Ok(Some(idle))) = (target.pid, rss_idle) {
        push("RSS idle (KiB)", Ok(idle.to_string()));
        push(
            &format!(
                "RSS per idle connection at {} (bytes)",
                opts.idle_connections
            ),
            idle_memory(target.addr, pid, opts).await,
        );
        push("RSS after load (KiB)", rss(pid).map(|k| k.to_string()));
        push(
            &format!("RSS after {} distinct topics (KiB)", opts.topics),
            distinct_topics(target.addr, pid, opts).await,
        );
        push(
            &format!("RSS after {} distinct client ids (KiB)", opts.client_ids),
            distinct_clients(target.addr, pid, opts).await,
        );
    }
    rows
}

fn options(id: String, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(100);
    o
}

fn client(id: String, addr: SocketAddr) -> (AsyncClient, EventLoop) {
    let (c, mut el) = AsyncClient::new(options(id, addr), 1000);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    (c, el)
}

/// A name unique to one scenario run, so topics and client ids never meet an earlier run's.
fn run_id() -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:x}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    )
}

/// Drives an event loop; sends incoming publishes' payload lengths to `tx`, signals SUBACKs.
fn drive(mut el: EventLoop, tx: mpsc::UnboundedSender<Inbound>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(Inbound::Publish(p.payload)).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(Inbound::SubAck);
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = tx.send(Inbound::Connected);
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = tx.send(Inbound::Error);
                    return;
                }
            }
        }
    })
}

enum Inbound {
    Connected,
    SubAck,
    Publish(bytes::Bytes),
    Error,
}

async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<Inbound>,
    want: fn(&Inbound) -> bool,
    t: Duration,
) -> anyhow::Result<()> {
    tokio::time::timeout(t, async {
        while let Some(m) = rx.recv().await {
            if matches!(m, Inbound::Error) {
                bail!("connection failed");
            }
            if want(&m) {
                return Ok(());
            }
        }
        bail!("connection closed")
    })
    .await
    .map_err(|_| anyhow!("timed out"))?
}

async fn subscriber(
    addr: SocketAddr,
    id: String,
    filter: &str,
    qos: QoS,
) -> anyhow::Result<(
    AsyncClient,
    mpsc::UnboundedReceiver<Inbound>,
    tokio::task::JoinHandle<()>,
)> {
    let (c, el) = client(id, addr);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let h = drive(el, tx);
    c.subscribe(filter, qos).await?;
    wait_for(
        &mut rx,
        |m| matches!(m, Inbound::SubAck),
        Duration::from_secs(5),
    )
    .await
    .context("subscribe")?;
    Ok((c, rx, h))
}

async fn round_trip(addr: SocketAddr, qos: QoS, opts: &BenchOptions) -> anyhow::Result<String> {
    let run = run_id();
    let ping = format!("bench/{run}/ping");
    let pong = format!("bench/{run}/pong");
    let (responder, mut rx_r, h_r) =
        subscriber(addr, format!("bench-{run}-resp"), &ping, qos).await?;
    let (requester, mut rx_q, h_q) =
        subscriber(addr, format!("bench-{run}-req"), &pong, qos).await?;
    let pong2 = pong.clone();
    let echo = tokio::spawn(async move {
        while let Some(m) = rx_r.recv().await {
            if let Inbound::Publish(p) = m {
                if responder
                    .publish_bytes(pong2.clone(), qos, false, p)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let payload = bytes::Bytes::from(vec![b'x'; opts.payload]);
    let deadline = Instant::now() + opts.timeout;
    let mut lost = 0;
    for _ in 0..opts.round_trips {
        if Instant::now() > deadline {
            break;
        }
        let t0 = Instant::now();
        requester
            .publish_bytes(ping.clone(), qos, false, payload.clone())
            .await?;
        let got = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(m) = rx_q.recv().await {
                if let Inbound::Publish(_) = m {
                    return true;
                }
            }
            false
        })
        .await;
        match got {
            Ok(true) => hist.record(t0.elapsed().as_micros().max(1) as u64)?,
            _ => lost += 1,
        }
    }
    echo.abort();
    h_r.abort();
    h_q.abort();
    let _ = requester.disconnect().await;
    percentiles(&hist, lost, "lost")
}

/// `p50 / p99 / p999 µs`, with the count of misses when there were any.
fn percentiles(hist: &Histogram<u64>, missed: usize, what: &str) -> anyhow::Result<String> {
    if hist.is_empty() {
        bail!("no round trip completed");
    }
    let mut s = format!(
        "{} / {} / {} µs",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999)
    );
    if missed > 0 {
        s.push_str(&format!(" ({missed} {what})"));
    }
    Ok(s)
}

/// Requests in flight in the runtime throughput scenario.
const RUNTIME_CONCURRENCY: usize = 32;

/// An in-process `echo` service and a runtime client on `addr`, both synced.
async fn runtime_pair(addr: SocketAddr) -> anyhow::Result<(Bus, Bus, Service)> {
    let run = run_id();
    let file = TopicsFile::default();
    let server = Bus::connect(BusOptions::for_service(
        addr.to_string(),
        "edge",
        "echo",
        Some(format!("bench-echo-{run}")),
    ))?;
    let service = echo::start(&file, &server).await?;
    let mut o = BusOptions::new(addr.to_string(), format!("bench-client-{run}"));
    o.reply_topic = Some(format!("edge/system/reply/bench-client-{run}"));
    let client = Bus::connect(o)?;
    for bus in [&server, &client] {
        if !bus.sync(Duration::from_secs(5)).await {
            bail!("runtime bus did not connect");
        }
    }
    Ok((server, client, service))
}

async fn runtime_round_trip(addr: SocketAddr, opts: &BenchOptions) -> anyhow::Result<String> {
    let (server, client, service) = runtime_pair(addr).await?;
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

async fn runtime_throughput(addr: SocketAddr, opts: &BenchOptions) -> anyhow::Result<String> {
    let (server, client, service) = runtime_pair(addr).await?;
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
    service.stop(Duration::ZERO).await;
    client.close(Duration::from_millis(200)).await;
    server.close(Duration::from_millis(200)).await;
    let mut s = format!("{:.0} req/s ({ok} answered", ok as f64 / secs);
    if failed > 0 {
        s.push_str(&format!(", {failed} failed"));
    }
    s.push(')');
    Ok(s)
}

async fn count_until(
    rx: &mut mpsc::UnboundedReceiver<Inbound>,
    want: u64,
    deadline: Instant,
) -> u64 {
    let mut got = 0;
    while got < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.min(Duration::from_secs(2)), rx.recv()).await {
            Ok(Some(Inbound::Publish(_))) => got += 1,
            Ok(Some(Inbound::Error)) | Ok(None) | Err(_) => break,
            Ok(Some(_)) => {}
        }
    }
    got
}

async fn fan_in(addr: SocketAddr, qos: QoS, opts: &BenchOptions) -> anyhow::Result<String> {
    let run = run_id();
    let (_sub, mut rx, h) = subscriber(
        addr,
        format!("bench-{run}-sink"),
        &format!("bench/{run}/in/+"),
        qos,
    )
    .await?;
    let per = opts.messages / opts.width.max(1);
    let want = (per * opts.width) as u64;
    let payload = bytes::Bytes::from(vec![b'x'; opts.payload]);
    let t0 = Instant::now();
    let mut pubs = Vec::new();
    for i in 0..opts.width {
        let (c, el) = client(format!("bench-{run}-p{i}"), addr);
        let (tx, _rx) = mpsc::unbounded_channel();
        let drv = drive(el, tx);
        let topic = format!("bench/{run}/in/{i}");
        let payload = payload.clone();
        pubs.push(tokio::spawn(async move {
            for _ in 0..per {
                if c.publish_bytes(topic.clone(), qos, false, payload.clone())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            (c, drv, _rx)
        }));
    }
    let got = count_until(&mut rx, want, t0 + opts.timeout).await;
    let secs = t0.elapsed().as_secs_f64();
    for p in pubs {
        if let Ok((_c, drv, _)) = p.await {
            drv.abort();
        }
    }
    h.abort();
    Ok(format!("{:.0} msg/s, {got}/{want}", got as f64 / secs))
}

async fn fan_out(addr: SocketAddr, qos: QoS, opts: &BenchOptions) -> anyhow::Result<String> {
    let run = run_id();
    let topic = format!("bench/{run}/out");
    let mut subs = Vec::new();
    for i in 0..opts.width {
        subs.push(subscriber(addr, format!("bench-{run}-s{i}"), &topic, qos).await?);
    }
    let per = (opts.messages / opts.width.max(1)) as u64;
    let (c, el) = client(format!("bench-{run}-src"), addr);
    let (tx, _rx) = mpsc::unbounded_channel();
    let drv = drive(el, tx);
    let payload = bytes::Bytes::from(vec![b'x'; opts.payload]);
    let t0 = Instant::now();
    let total = Arc::new(AtomicU64::new(0));
    let mut counters = Vec::new();
    for (_c, mut rx, h) in subs {
        let total = total.clone();
        let deadline = t0 + opts.timeout;
        counters.push(tokio::spawn(async move {
            let n = count_until(&mut rx, per, deadline).await;
            total.fetch_add(n, Ordering::Relaxed);
            h.abort();
        }));
    }
    for _ in 0..per {
        c.publish_bytes(topic.clone(), qos, false, payload.clone())
            .await?;
    }
    for h in counters {
        let _ = h.await;
    }
    let secs = t0.elapsed().as_secs_f64();
    drv.abort();
    let got = total.load(Ordering::Relaxed);
    let want = per * opts.width as u64;
    Ok(format!(
        "{:.0} deliveries/s, {got}/{want}",
        got as f64 / secs
    ))
}

/// A minimal MQTT 3.1.1 CONNECT (clean session, keep-alive 60 s).
fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    let mut p = vec![0x10, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

async fn open_connected(addr: SocketAddr, id: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(&connect_packet(id)).await?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await?;
    if ack[0] != 0x20 || ack[3] != 0 {
        bail!("CONNACK refused: {ack:?}");
    }
    Ok(s)
}

async fn connection_rate(addr: SocketAddr, opts: &BenchOptions) -> anyhow::Result<String> {
    let workers = 4;
    let per = opts.connections / workers;
    let run = run_id();
    let t0 = Instant::now();
    let deadline = t0 + opts.timeout;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            for i in 0..per {
                if Instant::now() > deadline {
                    break;
                }
                if let Ok(mut s) = open_connected(addr, &format!("cr-{run}-{w}-{i}")).await {
                    let _ = s.write_all(&[0xe0, 0]).await;
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap_or(0);
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(format!(
        "{:.0} conn/s ({ok}/{})",
        ok as f64 / secs,
        per * workers
    ))
}

async fn idle_memory(addr: SocketAddr, pid: u32, opts: &BenchOptions) -> anyhow::Result<String> {
    let before = rss(pid)?;
    let run = run_id();
    let mut held = Vec::with_capacity(opts.idle_connections);
    for i in 0..opts.idle_connections {
        held.push(open_connected(addr, &format!("idle-{run}-{i}")).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss(pid)?;
    drop(held);
    let per = (after.saturating_sub(before) * 1024) / opts.idle_connections.max(1) as u64;
    Ok(format!("{per} B/conn ({before} → {after} KiB)"))
}

async fn distinct_topics(
    addr: SocketAddr,
    pid: u32,
    opts: &BenchOptions,
) -> anyhow::Result<String> {
    let before = rss(pid)?;
    let run = run_id();
    let (_sub, mut rx, h) = subscriber(
        addr,
        format!("bench-{run}-topics"),
        &format!("bench/{run}/t/#"),
        QoS::AtMostOnce,
    )
    .await?;
    let (c, el) = client(format!("bench-{run}-tp"), addr);
    let (tx, _rx) = mpsc::unbounded_channel();
    let drv = drive(el, tx);
    let t0 = Instant::now();
    for i in 0..opts.topics {
        c.publish_bytes(
            format!("bench/{run}/t/{i}"),
            QoS::AtMostOnce,
            false,
            bytes::Bytes::from_static(b"x"),
        )
        .await?;
    }
    let got = count_until(&mut rx, opts.topics as u64, t0 + opts.timeout).await;
    drv.abort();
    h.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss(pid)?;
    Ok(format!(
        "{before} → {after} ({got}/{} delivered)",
        opts.topics
    ))
}

async fn distinct_clients(
    addr: SocketAddr,
    pid: u32,
    opts: &BenchOptions,
) -> anyhow::Result<String> {
    let before = rss(pid)?;
    let run = run_id();
    for i in 0..opts.client_ids {
        let mut s = open_connected(addr, &format!("churn-{run}-{i}")).await?;
        s.write_all(&[0xe0, 0]).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss(pid)?;
    Ok(format!("{before} → {after}"))
}

fn rss(pid: u32) -> anyhow::Result<u64> {
    rss_kib(pid).ok_or_else(|| anyhow!("no /proc for pid {pid}"))
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Prints the figures of one or more brokers side by side.
pub fn print_table(targets: &[Target], results: &[Vec<Row>]) {
    let Some(first) = results.first() else {
        return;
    };
    let w0 = first
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(10)
        .max(8);
    let widths: Vec<usize> = results
        .iter()
        .zip(targets)
        .map(|(rows, t)| {
            rows.iter()
                .map(|r| r.value.chars().count())
                .max()
                .unwrap_or(0)
                .max(t.name.len())
        })
        .collect();
    print!("| {:w0$} |", "scenario");
    for (t, w) in targets.iter().zip(&widths) {
        print!(" {:w$} |", t.name, w = *w);
    }
    println!();
    print!("|{}|", "-".repeat(w0 + 2));
    for w in &widths {
        print!("{}|", "-".repeat(w + 2));
    }
    println!();
    for (i, row) in first.iter().enumerate() {
        print!("| {:w0$} |", row.name);
        for (rows, w) in results.iter().zip(&widths) {
            let v = rows.get(i).map_or("", |r| r.value.as_str());
            print!(" {:w$} |", v, w = *w);
        }
        println!();
    }
}

/// The saga scenario: a 3-step saga over an in-process `kv` (each step a put), journaled to a
/// temporary file. Returns (runs/s with 16 at once, per-step overhead over a bare request,
/// journal bytes per run).
pub async fn saga_figures(addr: SocketAddr, runs: usize) -> anyhow::Result<[String; 3]> {
    use edgebus_runtime::saga::{FileJournal, Journal, Saga, Step};
    let prefix = format!("bench{:08x}", edgebus_runtime::bus::random_u64() as u32);
    let kv_bus = Bus::connect(BusOptions::for_service(
        addr.to_string(),
        prefix.clone(),
        "kv",
        None,
    ))?;
    let kv = crate::examples::kv::builder(&TopicsFile::default())
        .start(&kv_bus)
        .await?;
    let mut o = BusOptions::new(addr.to_string(), format!("{prefix}-saga"));
    o.reply_topic = Some(format!("{prefix}/system/reply/saga"));
    o.prefix = prefix.clone();
    let bus = Bus::connect(o)?;
    anyhow::ensure!(
        kv_bus.sync(Duration::from_secs(5)).await,
        "broker unreachable"
    );
    anyhow::ensure!(bus.sync(Duration::from_secs(5)).await, "broker unreachable");
    let put = format!("{prefix}/kv/put/request");
    let mut saga = Saga::new("bench");
    for s in ["a", "b", "c"] {
        saga = saga.step(
            Step::call(s, put.clone())
                .input(serde_json::json!({"key": format!("${{run_id}}/{s}"), "value": 1}))
                .compensate_call(format!("{prefix}/kv/delete/request")),
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
    Ok([
        format!("{rate:.0} runs/s"),
        format!(
            "{:.0} µs per step vs {:.0} µs bare (+{:.0} µs: 2 journal writes with fdatasync)",
            step.as_secs_f64() * 1e6,
            bare.as_secs_f64() * 1e6,
            step.saturating_sub(bare).as_secs_f64() * 1e6
        ),
        format!("{bytes} bytes"),
    ])
}
