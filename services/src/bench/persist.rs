//! Durable state, side by side: brokers started here with their state on disk (edgebus with
//! `[broker.persistence]`, mosquitto with `persistence true`), measured on what their users
//! count on: retained updates per second and the bytes each costs the storage, what an
//! acknowledgement is worth after SIGKILL (for retained messages and for messages queued for
//! an offline persistent session), and how long a restart takes with 100,000 retained
//! messages.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};

use super::figure::{Better, Figure, Goal};
use super::host::{signal, Spawned};
use super::mqtt::{count_until, open_connected, run_id, subscriber};

/// Which broker, started with its state on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `edgebus broker` with `[broker.persistence] sync = "50ms"` (the shipped setting).
    Edgebus,
    /// Debian's mosquitto with `persistence true` and its default `autosave_interval` (1800 s).
    Mosquitto,
}

/// The kind of a target the bench started, by its column name.
pub fn kind_of(name: &str) -> Option<Kind> {
    match name {
        "edgebus" => Some(Kind::Edgebus),
        "mosquitto" => Some(Kind::Mosquitto),
        _ => None,
    }
}

/// A broker of `kind` keeping its state in `dir`, on a free loopback port.
struct Durable {
    child: Spawned,
    addr: SocketAddr,
}

fn start(kind: Kind, dir: &Path) -> anyhow::Result<Durable> {
    std::fs::create_dir_all(dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = match kind {
        Kind::Edgebus => {
            let conf = dir.join("topics.toml");
            std::fs::write(
                &conf,
                format!(
                    "[broker]\nlisten = \"{addr}\"\nstats_interval = \"0s\"\n\
                     max_connections_per_address = 1024\n\
                     max_queued_messages = 200000\nmax_queued_bytes = \"64MiB\"\n\
                     [broker.persistence]\ndir = \"{}\"\nsync = \"50ms\"\n",
                    dir.display()
                ),
            )?;
            let mut c = Command::new(std::env::current_exe()?);
            c.arg("broker")
                .arg("-c")
                .arg(conf)
                .env("EDGEBUS_LOG", "error");
            c
        }
        Kind::Mosquitto => {
            let conf = dir.join("mosquitto.conf");
            // Started as root, mosquitto becomes the `mosquitto` user, which cannot write a
            // directory of root's: it keeps root's, as edgebus does here.
            let user = if is_root() { "user root\n" } else { "" };
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n\
                     max_connections -1\nmax_queued_messages 200000\npersistence true\n\
                     persistence_location {}/\n{user}",
                    dir.display()
                ),
            )?;
            let mut c = Command::new("mosquitto");
            c.arg("-c").arg(conf);
            c
        }
    };
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the broker")?;
    let mut child = Spawned(child);
    if kind == Kind::Edgebus {
        let out = child.0.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if !line.contains("listening on") {
            bail!("edgebus broker printed `{}`", line.trim());
        }
    }
    let t0 = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("no listener on {addr}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Durable { child, addr })
}

/// Whether this process runs as root.
#[allow(unsafe_code)]
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Bytes the process caused to be written to storage (`write_bytes` of /proc/PID/io).
fn storage_writes(pid: u32) -> anyhow::Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no write_bytes for {pid}"))
}

/// What [`publish_qos1`] sends: `n` QoS 1 messages of `payload` bytes over `topics` topics
/// (`persist/0`, …), retained or not, at most `inflight` unacknowledged.
#[derive(Debug, Clone, Copy)]
struct Load {
    n: usize,
    topics: usize,
    payload: usize,
    inflight: u16,
    retain: bool,
}

/// Publishes `load`; returns how many were acknowledged (PUBACKs come in the order of their
/// PUBLISHes, so also the value of the last one) and the time, once all are acknowledged or
/// the connection fails.
async fn publish_qos1(addr: SocketAddr, load: Load) -> (usize, Duration) {
    let Load {
        n,
        topics,
        payload,
        inflight,
        retain,
    } = load;
    let mut o = MqttOptions::new(
        format!("persist-{}", run_id()),
        addr.ip().to_string(),
        addr.port(),
    );
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(inflight);
    let (c, mut el) = AsyncClient::new(o, usize::from(inflight) * 2);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    let t0 = Instant::now();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            let mut body = format!("{:08}", i + 1).into_bytes();
            body.resize(payload.max(8), b'x');
            let topic = format!("persist/{}", i % topics.max(1));
            if c.publish(topic, QoS::AtLeastOnce, retain, body)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // PUBACKs come in the order of their PUBLISHes [MQTT-4.6.0-2].
    let mut acked = 0usize;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let took = t0.elapsed();
    sender.abort();
    (acked, took)
}

/// Retained QoS 1 updates per second, one publisher with 32 in flight, and the storage bytes
/// each cost (over the payload bytes changed).
async fn updates(kind: Kind, dir: &Path, n: usize) -> anyhow::Result<Figure> {
    let b = start(kind, dir)?;
    let pid = b.child.0.id();
    let before = storage_writes(pid)?;
    let load = Load {
        n,
        topics: 100,
        payload: 64,
        inflight: 32,
        retain: true,
    };
    let (acked, took) = publish_qos1(b.addr, load).await;
    // What a broker writes a moment later (a commit window) is the updates' too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written = storage_writes(pid)? - before;
    if acked < n {
        bail!("{acked}/{n} acknowledged");
    }
    let rate = n as f64 / took.as_secs_f64();
    let per = written as f64 / n as f64;
    Ok(Figure::new(
        rate,
        format!(
            "{rate:.0} updates/s; {per:.0} B written per 64 B update ({:.1}×)",
            per / 64.0
        ),
    )
    .delivered(acked as u64, n as u64))
}

/// Acknowledged retained updates lost to a SIGKILL: one topic updated (QoS 1, 32 in
/// flight) for `run`; SIGKILL; restart; the retained value against the last acknowledged.
async fn loss_after_sigkill(kind: Kind, dir: &Path, run: Duration) -> anyhow::Result<Figure> {
    let b = start(kind, dir)?;
    let addr = b.addr;
    let pid = b.child.0.id();
    let killer = tokio::spawn(async move {
        tokio::time::sleep(run).await;
        let _ = signal(pid, "KILL");
    });
    let load = Load {
        n: 10_000_000,
        topics: 1,
        payload: 16,
        inflight: 32,
        retain: true,
    };
    let (acked, _) = publish_qos1(addr, load).await;
    let _ = killer.await;
    drop(b);
    let b = start(kind, dir)?;
    let (_sub, mut rx, h) = subscriber(
        b.addr,
        format!("loss-{}", run_id()),
        "persist/0",
        QoS::AtMostOnce,
    )
    .await?;
    let got = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
    h.abort();
    let value = match got {
        Ok(Some(super::mqtt::Inbound::Publish(p))) => std::str::from_utf8(&p[..8.min(p.len())])
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0),
        _ => 0,
    };
    let lost = acked.saturating_sub(value);
    Ok(Figure::new(
        lost as f64,
        format!("{lost} of {acked} acknowledged (retained after restart: {value})"),
    ))
}

/// Time from start to the first CONNACK of a broker holding 100,000 retained messages (left
/// by a clean stop), and how many a `#` subscriber then gets.
async fn restart_time(kind: Kind, dir: &Path, count: usize) -> anyhow::Result<Figure> {
    let b = start(kind, dir)?;
    let load = Load {
        n: count,
        topics: count,
        payload: 64,
        inflight: 256,
        retain: true,
    };
    let (acked, _) = publish_qos1(b.addr, load).await;
    if acked < count {
        bail!("{acked}/{count} retained messages stored");
    }
    let pid = b.child.0.id();
    signal(pid, "TERM")?;
    let mut b = b;
    let _ = b.child.0.wait();
    let t0 = Instant::now();
    let b = start(kind, dir)?;
    let connected = open_connected(b.addr, &format!("restart-{}", run_id())).await?;
    let took = t0.elapsed();
    drop(connected);
    let (_sub, mut rx, h) = subscriber(
        b.addr,
        format!("count-{}", run_id()),
        "persist/#",
        QoS::AtMostOnce,
    )
    .await?;
    let got = count_until(
        &mut rx,
        count as u64,
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    h.abort();
    let ms = took.as_secs_f64() * 1000.0;
    Ok(
        Figure::new(ms, format!("{ms:.0} ms ({got}/{count} retained back)"))
            .delivered(got, count as u64),
    )
}

/// A persistent (clean session 0) MQTT 3.1.1 client `id`.
fn persistent_client(addr: SocketAddr, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false);
    AsyncClient::new(o, 64)
}

/// Makes the persistent session `id`, subscribed to `persist/#` at QoS 1, and leaves it
/// (DISCONNECT: the session stays).
async fn leave_subscribed(addr: SocketAddr, id: &str) -> anyhow::Result<()> {
    let (c, mut el) = persistent_client(addr, id);
    c.subscribe("persist/#", QoS::AtLeastOnce).await?;
    let deadline = Duration::from_secs(10);
    loop {
        match tokio::time::timeout(deadline, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => c.disconnect().await?,
            Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("persistent subscriber: {e}"),
            Err(_) => bail!("persistent subscriber: no SUBACK within {deadline:?}"),
        }
    }
}

/// Takes the persistent session `id` back and counts what it gets, up to `want`, until 2 s
/// pass without a message (what did not come by then is lost).
async fn count_queued(addr: SocketAddr, id: &str, want: usize) -> usize {
    let (_c, mut el) = persistent_client(addr, id);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = 0;
    while got < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.min(Duration::from_secs(2)), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => got += 1,
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    got
}

/// QoS 1 messages queued for an offline persistent session: the rate they are accepted at
/// (one publisher, 32 in flight) and the bytes written per message; then SIGKILL, restart,
/// and how many acknowledged ones the session gets back.
async fn queued_loss(kind: Kind, dir: &Path, n: usize) -> anyhow::Result<Figure> {
    let b = start(kind, dir)?;
    let id = format!("offline-{}", run_id());
    leave_subscribed(b.addr, &id).await?;
    let pid = b.child.0.id();
    let before = storage_writes(pid)?;
    let load = Load {
        n,
        topics: 1,
        payload: 64,
        inflight: 32,
        retain: false,
    };
    let (acked, took) = publish_qos1(b.addr, load).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written = storage_writes(pid)? - before;
    signal(pid, "KILL")?;
    let mut b = b;
    let _ = b.child.0.wait();
    drop(b);
    let b = start(kind, dir)?;
    let got = count_queued(b.addr, &id, acked).await;
    let lost = acked.saturating_sub(got);
    let rate = acked as f64 / took.as_secs_f64();
    let per = written as f64 / acked.max(1) as f64;
    Ok(Figure::new(
        lost as f64,
        format!(
            "{lost} of {acked} lost; queued at {rate:.0}/s, {per:.0} B written per 64 B message"
        ),
    )
    .delivered(got as u64, acked as u64))
}

/// The rows of the group, in order: name, which way is better, and the goal.
pub fn rows(updates_n: usize) -> [(String, Better, Option<Goal>); 4] {
    [
        (
            format!("retained QoS 1 updates/s, persistence on, {updates_n} over 100 topics"),
            Better::Higher,
            None,
        ),
        (
            "acknowledged retained updates lost to SIGKILL".to_owned(),
            Better::Lower,
            Some(Goal::AtMost(0.0)),
        ),
        (
            "restart with 100,000 retained messages, to first CONNACK (ms)".to_owned(),
            Better::Lower,
            None,
        ),
        (
            format!(
                "acknowledged QoS 1 messages lost to SIGKILL, {updates_n} queued for an \
                 offline persistent session"
            ),
            Better::Lower,
            Some(Goal::AtMost(0.0)),
        ),
    ]
}

/// The group's figures for one broker, in the order of [`rows`].
pub async fn run(kind: Kind, updates_n: usize) -> Vec<anyhow::Result<Figure>> {
    let base: PathBuf = std::env::temp_dir().join(format!(
        "edgebus-bench-persist-{}-{}",
        std::process::id(),
        match kind {
            Kind::Edgebus => "edgebus",
            Kind::Mosquitto => "mosquitto",
        }
    ));
    let _ = std::fs::remove_dir_all(&base);
    let figures = vec![
        updates(kind, &base.join("updates"), updates_n).await,
        loss_after_sigkill(kind, &base.join("loss"), Duration::from_secs(2)).await,
        restart_time(kind, &base.join("restart"), 100_000).await,
        queued_loss(kind, &base.join("queued"), updates_n).await,
    ];
    let _ = std::fs::remove_dir_all(&base);
    figures
}
