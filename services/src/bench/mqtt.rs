//! The MQTT clients the scenarios use: rumqttc clients driven into a channel, and raw
//! connections for the connection-rate and memory scenarios.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Client options of every bench client: 30 s keep-alive, 1 MiB packets, 100 in flight.
fn options(id: String, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(100);
    o
}

/// A rumqttc client with TCP_NODELAY, not yet polled.
pub fn client(id: String, addr: SocketAddr) -> (AsyncClient, EventLoop) {
    let (c, mut el) = AsyncClient::new(options(id, addr), 1000);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    (c, el)
}

/// A name unique to one scenario run, so topics and client ids never meet an earlier run's.
pub fn run_id() -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:x}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    )
}

/// Drives an event loop; sends incoming publishes' payload lengths to `tx`, signals SUBACKs.
pub fn drive(mut el: EventLoop, tx: mpsc::UnboundedSender<Inbound>) -> tokio::task::JoinHandle<()> {
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

/// What a driven event loop reports.
#[derive(Debug)]
pub enum Inbound {
    /// A CONNACK.
    Connected,
    /// A SUBACK.
    SubAck,
    /// A message's payload.
    Publish(bytes::Bytes),
    /// The connection failed; the loop has stopped.
    Error,
}

/// Waits (at most `t`) for an event `want` accepts; fails on a connection error.
pub async fn wait_for(
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

/// A client subscribed to `filter`, its SUBACK received: the client, what it receives, and
/// its event loop's task.
pub async fn subscriber(
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

/// Counts messages until `want` came, `deadline` passed, or none came for 2 s.
pub async fn count_until(
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
pub fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    let mut p = vec![0x10, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

/// A raw TCP connection with a CONNECT sent and a successful CONNACK read.
pub async fn open_connected(addr: SocketAddr, id: &str) -> anyhow::Result<TcpStream> {
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
