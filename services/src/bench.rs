//! `edgebus bench`: broker scenarios against any MQTT broker, printed as a table.
//!
//! Every scenario is bounded in count and in time; losses are reported, never hidden. The same
//! run can measure several brokers (`--broker` repeated, `--embedded`, `--mosquitto`), so the
//! figures side by side come from one machine in one state.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use edgebus_runtime::bus::{Bus, BusOptions};
use edgebus_runtime::request::RequestOptions;
use edgebus_runtime::service::Service;
use edgebus_runtime::tree::Tree;
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
    /// Fan-in messages in all, QoS 0 and QoS 1: enough that a broker which drops what its
    /// subscriber cannot take shows it.
    pub fan_in: [usize; 2],
    /// Subscribers of the wide fan-out.
    pub fan_out_wide: usize,
    /// Messages of the slow-subscriber scenario.
    pub slow_messages: usize,
    /// Distinct filters of the churn scenario.
    pub churn_filters: usize,
}

impl BenchOptions {
    fn wants(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }
}

/// The scenario groups `--only` takes.
pub const GROUPS: &[&str] = &[
    "rtt", "runtime", "fan", "slow", "churn", "connect", "memory", "detect", "saga",
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
            fan_in: [1_000_000, 200_000],
            fan_out_wide: 100,
            slow_messages: 20_000,
            churn_filters: 20_000,
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
    /// The headline number of `value` (its first number), for ratios.
    pub figure: Option<f64>,
    /// Whether more is better, less is better, or it is only informative.
    pub better: Better,
    /// Whether the figure lost messages (a `got/want` with got < want).
    pub lossy: bool,
}

/// Which way a figure is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Throughput, rates.
    Higher,
    /// Latency, memory.
    Lower,
    /// Counts that explain other figures.
    Info,
}

/// The first number in `s` (digits, `.`, `,` separators ignored).
pub fn first_number(s: &str) -> Option<f64> {
    let start = s.find(|c: char| c.is_ascii_digit())?;
    let num: String = s[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ',')
        .filter(|c| *c != ',')
        .collect();
    num.parse().ok()
}

/// Whether `s` reports a `got/want` with got < want.
fn reports_loss(s: &str) -> bool {
    s.split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter_map(|w| w.split_once('/'))
        .any(|(a, b)| match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(a), Ok(b)) => a < b,
            _ => false,
        })
}

/// Runs every scenario against one broker.
pub async fn run_all(target: &Target, opts: &BenchOptions) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut push = |name: &str, r: anyhow::Result<String>| {
        // Which way is better follows from what the row measures.
        let better = if name.contains("/s") || name.contains("rate") {
            Better::Higher
        } else if name.contains("duplicated") || name.contains("journal bytes") {
            Better::Info
        } else {
            Better::Lower
        };
        let value = r.unwrap_or_else(|e| format!("error: {e:#}"));
        let figure = (!value.starts_with("error:"))
            .then(|| first_number(&value))
            .flatten();
        rows.push(Row {
            name: name.to_owned(),
            lossy: reports_loss(&value),
            value,
            figure,
            better,
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
        for instances in [1, 2] {
            push(
                &format!(
                    "runtime requests/s, {instances} echo instance{}, {RUNTIME_CONCURRENCY} in flight",
                    if instances == 1 { "" } else { "s" }
                ),
                runtime_throughput(target.addr, opts, instances).await,
            );
        }
    }
    if opts.wants("fan") {
        use crate::overload::{fan_in, fan_out};
        let (w, p, t) = (opts.width, opts.payload, opts.timeout);
        for (qos, total) in [QoS::AtMostOnce, QoS::AtLeastOnce]
            .into_iter()
            .zip(opts.fan_in)
        {
            let q = qos as u8;
            push(
                &format!("fan-in {w}→1 QoS {q}, {total} at full speed (msg/s, delivered)"),
                fan_in(target.addr, qos, w, total, p, t * 4).await,
            );
        }
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let q = qos as u8;
            // 20,000 deliveries to 4 subscribers; 200,000 to 100.
            for (width, per) in [(w, opts.messages / w.max(1)), (opts.fan_out_wide, 2_000)] {
                push(
                    &format!("fan-out 1→{width} QoS {q} (deliveries/s, delivered)"),
                    fan_out(target.addr, qos, width, per, p, t).await,
                );
            }
        }
    }
    if opts.wants("slow") {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            push(
                &format!(
                    "slow subscriber QoS {}, one of two SIGSTOPped, {} × 1 KiB (delivered)",
                    qos as u8, opts.slow_messages
                ),
                crate::overload::slow_subscriber(target.addr, qos, opts.slow_messages).await,
            );
        }
    }
    if let (true, Some(pid)) = (opts.wants("churn"), target.pid) {
        push(
            &format!(
                "filter churn, {} distinct filters, RSS (KiB)",
                opts.churn_filters
            ),
            crate::overload::filter_churn(target.addr, pid, opts.churn_filters).await,
        );
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
            "RSS after the load above, at once (KiB)",
            rss(pid).map(|k| k.to_string()),
        );
        // The broker trims its heap after 2 s of quiet; this is what it keeps.
        tokio::time::sleep(Duration::from_secs(3)).await;
        push(
            "RSS after the load above, 3 s later (KiB)",
            rss(pid).map(|k| k.to_string()),
        );
        for n in [opts.idle_connections, opts.idle_connections * 10] {
            push(
                &format!("RSS per idle connection, {n} held (bytes)"),
                idle_memory(target.addr, pid, n).await,
            );
        }
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

pub(crate) fn client(id: String, addr: SocketAddr) -> (AsyncClient, EventLoop) {
    let (c, mut el) = AsyncClient::new(options(id, addr), 1000);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    (c, el)
}

/// A name unique to one scenario run, so topics and client ids never meet an earlier run's.
pub(crate) fn run_id() -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:x}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    )
}

/// Drives an event loop; sends incoming publishes' payload lengths to `tx`, signals SUBACKs.
pub(crate) fn drive(
    mut el: EventLoop,
    tx: mpsc::UnboundedSender<Inbound>,
) -> tokio::task::JoinHandle<()> {
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

pub(crate) enum Inbound {
    Connected,
    SubAck,
    Publish(bytes::Bytes),
    Error,
}

pub(crate) async fn wait_for(
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

pub(crate) async fn subscriber(
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
    let (mut servers, client) = runtime_set(addr, 1).await?;
    let (server, service) = servers.remove(0);
    Ok((server, client, service))
}

/// `n` in-process `echo` instances (each on its own connection) and a runtime client, synced.
async fn runtime_set(addr: SocketAddr, n: usize) -> anyhow::Result<(Vec<(Bus, Service)>, Bus)> {
    let run = run_id();
    let file = TopicsFile::default();
    let mut servers = Vec::new();
    for i in 0..n {
        let server = Bus::connect(BusOptions::for_service(
            addr.to_string(),
            "edge",
            "echo",
            Some(format!("bench-echo-{run}-{i}")),
        ))?;
        let service = echo::start(&file, &server).await?;
        if !server.sync(Duration::from_secs(5)).await {
            bail!("runtime bus did not connect");
        }
        servers.push((server, service));
    }
    let mut o = BusOptions::new(addr.to_string(), format!("bench-client-{run}"));
    o.reply_topic = Some(format!("edge/system/reply/bench-client-{run}"));
    let client = Bus::connect(o)?;
    if !client.sync(Duration::from_secs(5)).await {
        bail!("runtime bus did not connect");
    }
    Ok((servers, client))
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

async fn runtime_throughput(
    addr: SocketAddr,
    opts: &BenchOptions,
    instances: usize,
) -> anyhow::Result<String> {
    let (servers, client) = runtime_set(addr, instances).await?;
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
    let mut s = format!("{:.0} req/s ({ok} answered", ok as f64 / secs);
    if served.len() > 1 {
        let split: Vec<String> = served.iter().map(u64::to_string).collect();
        s.push_str(&format!(", split {}", split.join(" + ")));
    }
    if failed > 0 {
        s.push_str(&format!(", {failed} failed"));
    }
    s.push(')');
    Ok(s)
}

pub(crate) async fn count_until(
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

async fn idle_memory(addr: SocketAddr, pid: u32, n: usize) -> anyhow::Result<String> {
    raise_fd_limit(n + 256);
    let before = rss(pid)?;
    let run = run_id();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        held.push(
            open_connected(addr, &format!("idle-{run}-{i}"))
                .await
                .with_context(|| format!("connection {} of {n}", i + 1))?,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss(pid)?;
    drop(held);
    // Let the broker close them before the next scenario.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = (after.saturating_sub(before) * 1024) / n.max(1) as u64;
    Ok(format!("{per} B/conn ({before} → {after} KiB)"))
}

/// Raises this process's open-file limit to at least `n` (up to the hard limit).
#[allow(unsafe_code)]
pub fn raise_fd_limit(n: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && (lim.rlim_cur as usize) < n {
            lim.rlim_cur = (n as libc::rlim_t).min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
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

pub(crate) fn rss(pid: u32) -> anyhow::Result<u64> {
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

/// A goal a figure is held to.
#[derive(Debug, Clone, Copy)]
enum Goal {
    /// edgebus ÷ the other broker at most this.
    RatioAtMost(f64),
    /// edgebus ÷ the other broker at least this, and nothing lost.
    RatioAtLeastNoLoss(f64),
    /// edgebus ÷ the other broker at least this.
    RatioAtLeast(f64),
    /// edgebus's own figure at most this.
    AtMost(f64),
    /// edgebus's figure at most this times its figure in the row named.
    TimesRow(f64, &'static str),
}

fn goal_for(name: &str) -> Option<Goal> {
    Some(if name.starts_with("round trip QoS") {
        Goal::RatioAtMost(1.0)
    } else if name.starts_with("fan-in") {
        Goal::RatioAtLeastNoLoss(3.0)
    } else if name.starts_with("fan-out") {
        Goal::RatioAtLeastNoLoss(15.0)
    } else if name.starts_with("connection rate") {
        Goal::RatioAtLeast(1.5)
    } else if name.starts_with("RSS per idle connection") {
        Goal::AtMost(2048.0)
    } else if name.starts_with("RSS after the load above, 3 s later") {
        Goal::TimesRow(1.2, "RSS idle")
    } else if name.starts_with("runtime request/response") {
        Goal::TimesRow(1.3, "round trip QoS 1")
    } else {
        return None;
    })
}

impl Goal {
    fn describe(self) -> String {
        match self {
            Goal::RatioAtMost(r) => format!("≤ {r}×"),
            Goal::RatioAtLeastNoLoss(r) => format!("≥ {r}×, none lost"),
            Goal::RatioAtLeast(r) => format!("≥ {r}×"),
            Goal::AtMost(v) => format!("≤ {v}"),
            Goal::TimesRow(r, row) => format!("≤ {r}× {row}"),
        }
    }
}

/// One row of the side-by-side table: figures, the ratio of the first broker to the second,
/// and the goal with whether it is met.
struct Compared {
    ratio: Option<f64>,
    goal: Option<(String, Option<bool>)>,
}

fn compare(i: usize, results: &[Vec<Row>]) -> Compared {
    let a = results.first().and_then(|r| r.get(i));
    let b = results.get(1).and_then(|r| r.get(i));
    let ratio = match (a.and_then(|r| r.figure), b.and_then(|r| r.figure)) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    let goal = a.and_then(|row| {
        let g = goal_for(&row.name)?;
        let met = match g {
            Goal::RatioAtMost(r) => ratio.map(|x| x <= r),
            Goal::RatioAtLeast(r) => ratio.map(|x| x >= r),
            Goal::RatioAtLeastNoLoss(r) => ratio.map(|x| x >= r && !row.lossy),
            Goal::AtMost(v) => row.figure.map(|x| x <= v),
            Goal::TimesRow(r, other) => {
                let base = results[0]
                    .iter()
                    .find(|o| o.name.starts_with(other))
                    .and_then(|o| o.figure);
                match (row.figure, base) {
                    (Some(x), Some(y)) if y > 0.0 => Some(x <= r * y),
                    _ => None,
                }
            }
        };
        Some((g.describe(), met))
    });
    Compared { ratio, goal }
}

/// The figures as a Markdown table: one column per broker; with two brokers, the first's
/// figure divided by the second's, and each goal with whether the first broker meets it.
pub fn markdown_table(targets: &[Target], results: &[Vec<Row>]) -> String {
    let mut out = String::new();
    let Some(first) = results.first() else {
        return out;
    };
    let two = targets.len() >= 2;
    out.push_str("| scenario |");
    for t in targets {
        out.push_str(&format!(" {} |", t.name));
    }
    if two {
        out.push_str(&format!(
            " {} ÷ {} | goal | met |",
            targets[0].name, targets[1].name
        ));
    }
    out.push('\n');
    out.push_str("|---|");
    for _ in targets {
        out.push_str("---|");
    }
    if two {
        out.push_str("---|---|---|");
    }
    out.push('\n');
    for (i, row) in first.iter().enumerate() {
        out.push_str(&format!("| {} |", row.name));
        for rows in results {
            let v = rows.get(i).map_or("", |r| r.value.as_str());
            out.push_str(&format!(" {v} |"));
        }
        if two {
            let c = compare(i, results);
            let ratio = c
                .ratio
                .filter(|_| row.better != Better::Info)
                .map_or(String::new(), |r| format!("{r:.2}×"));
            let (goal, met) = match c.goal {
                Some((g, Some(true))) => (g, "yes"),
                Some((g, Some(false))) => (g, "**no**"),
                Some((g, None)) => (g, "?"),
                None => (String::new(), ""),
            };
            out.push_str(&format!(" {ratio} | {goal} | {met} |"));
        }
        out.push('\n');
    }
    out
}

/// The machine and versions a run was made on, as Markdown lines.
pub fn environment(targets: &[Target]) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(first_number))
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let os = std::fs::read_to_string("/etc/debian_version")
        .map(|v| format!("Debian {}", v.trim()))
        .unwrap_or_else(|_| "Linux".into());
    let mosquitto = std::process::Command::new("mosquitto")
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let mut s = format!(
        "- machine: {cpu}, {cores} cores, {:.1} GiB, {os}, Linux {}\n- edgebus {} (release build), rumqttd 0.20, rumqttc 0.25 clients with TCP_NODELAY\n",
        mem_kib / (1024.0 * 1024.0),
        kernel.trim(),
        env!("CARGO_PKG_VERSION"),
    );
    if targets.iter().any(|t| t.name == "mosquitto") && !mosquitto.is_empty() {
        s.push_str(&format!(
            "- {mosquitto}, `set_tcp_nodelay true`, `max_connections -1`\n"
        ));
    }
    s.push_str(&format!(
        "- run at {at}, all brokers in the same run, loopback\n"
    ));
    s
}

/// Prints the figures of one or more brokers side by side (Markdown).
pub fn print_table(targets: &[Target], results: &[Vec<Row>]) {
    print!("{}", markdown_table(targets, results));
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
