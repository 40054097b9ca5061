//! Scenarios of the broker alone, with bare MQTT clients: round trips, the connection rate,
//! and memory (per idle connection, after many topics, after many client ids).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rumqttc::QoS;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::figure::Figure;
use super::host::{raise_fd_limit, rss};
use super::mqtt::{client, count_until, drive, open_connected, run_id, subscriber, Inbound};
use super::BenchOptions;

/// One requester and one responder, bare MQTT: the time from a publish to its echo.
pub async fn round_trip(
    addr: SocketAddr,
    far: SocketAddr,
    qos: QoS,
    opts: &BenchOptions,
) -> anyhow::Result<Figure> {
    let run = run_id();
    let ping = format!("bench/{run}/ping");
    let pong = format!("bench/{run}/pong");
    let (responder, mut rx_r, h_r) =
        subscriber(far, format!("bench-{run}-resp"), &ping, qos).await?;
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

/// `p50 / p99 / p999 µs`, with the count of misses when there were any; the p50 is the
/// headline.
pub fn percentiles(hist: &Histogram<u64>, missed: usize, what: &str) -> anyhow::Result<Figure> {
    if hist.is_empty() {
        bail!("no round trip completed");
    }
    let p50 = hist.value_at_quantile(0.5);
    let mut s = format!(
        "{p50} / {} / {} µs",
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999)
    );
    if missed > 0 {
        s.push_str(&format!(" ({missed} {what})"));
    }
    let done = hist.len();
    Ok(Figure::new(p50 as f64, s).delivered(done, done + missed as u64))
}

/// CONNECT → CONNACK → DISCONNECT, from 4 tasks at once.
pub async fn connection_rate(addr: SocketAddr, opts: &BenchOptions) -> anyhow::Result<Figure> {
    let run = run_id();
    Ok(in_four_tasks(opts.connections, opts.timeout, move |w, i| {
        let id = format!("cr-{run}-{w}-{i}");
        async move {
            let mut s = open_connected(addr, &id).await?;
            s.write_all(&[0xe0, 0]).await?;
            Ok(())
        }
    })
    .await)
}

/// `total` attempts of `attempt(worker, i)`, shared by 4 tasks, until `timeout`: the rate of
/// those that succeeded, and how many did.
async fn in_four_tasks<F, Fut>(total: usize, timeout: Duration, attempt: F) -> Figure
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let workers = 4;
    let per = total / workers;
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let attempt = attempt.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            for i in 0..per {
                if Instant::now() > deadline {
                    break;
                }
                if attempt(w, i).await.is_ok() {
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
    let rate = ok as f64 / t0.elapsed().as_secs_f64();
    let want = per * workers;
    Figure::new(rate, format!("{rate:.0} conn/s ({ok}/{want})")).delivered(ok as u64, want as u64)
}

/// A TLS client trusting the bench's CA ([`super::host::tls_files`]), resuming no session:
/// every connection pays a full handshake, as a device's first connection does.
fn tls_connector() -> anyhow::Result<tokio_rustls::TlsConnector> {
    let files = super::host::tls_files()?;
    let config = edgebus_runtime::bus::client_config(&edgebus_runtime::bus::TlsOptions {
        ca_file: Some(files.ca),
        ..Default::default()
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    let mut config = std::sync::Arc::unwrap_or_clone(config);
    config.resumption = tokio_rustls::rustls::client::Resumption::disabled();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// A full TLS handshake (no session resumption), CONNECT, CONNACK, DISCONNECT.
async fn tls_connect_once(
    tls: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    id: &str,
) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut s = tls.connect("localhost".try_into()?, tcp).await?;
    s.write_all(&super::mqtt::connect_packet(id)).await?;
    s.flush().await?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await?;
    if ack[0] != 0x20 || ack[3] != 0 {
        bail!("CONNACK refused: {ack:?}");
    }
    s.write_all(&[0xe0, 0]).await?;
    let _ = s.shutdown().await;
    Ok(())
}

/// TLS handshake + CONNECT → CONNACK → DISCONNECT, from 4 tasks at once; a quarter as many
/// connections as the plain scenario (each handshake costs milliseconds).
pub async fn tls_connection_rate(addr: SocketAddr, opts: &BenchOptions) -> anyhow::Result<Figure> {
    let run = run_id();
    let tls = tls_connector()?;
    Ok(
        in_four_tasks(opts.connections / 4, opts.timeout, move |w, i| {
            let (tls, id) = (tls.clone(), format!("tr-{run}-{w}-{i}"));
            async move { tls_connect_once(&tls, addr, &id).await }
        })
        .await,
    )
}

/// One TLS connection at a time: handshake to CONNACK, p50 / p99 / p999.
pub async fn tls_connect_latency(addr: SocketAddr, opts: &BenchOptions) -> anyhow::Result<Figure> {
    let run = run_id();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut failed = 0;
    let deadline = Instant::now() + opts.timeout;
    let tls = tls_connector()?;
    for i in 0..opts.connections / 4 {
        if Instant::now() > deadline {
            break;
        }
        let t0 = Instant::now();
        match tls_connect_once(&tls, addr, &format!("tl-{run}-{i}")).await {
            Ok(()) => hist.record(t0.elapsed().as_micros().max(1) as u64)?,
            Err(_) => failed += 1,
        }
    }
    percentiles(&hist, failed, "failed")
}

/// The broker's memory per idle connection, `n` of them held.
pub async fn idle_memory(addr: SocketAddr, pid: u32, n: usize) -> anyhow::Result<Figure> {
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
    Ok(Figure::new(
        per as f64,
        format!("{per} B/conn ({before} → {after} KiB)"),
    ))
}

/// The broker's memory after a message on each of `opts.topics` distinct topics.
pub async fn distinct_topics(
    addr: SocketAddr,
    pid: u32,
    opts: &BenchOptions,
) -> anyhow::Result<Figure> {
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
    let want = opts.topics as u64;
    Ok(Figure::new(
        after as f64,
        format!("{before} → {after} ({got}/{want} delivered)"),
    )
    .delivered(got, want))
}

/// The broker's memory after `opts.client_ids` distinct clients connected and left.
pub async fn distinct_clients(
    addr: SocketAddr,
    pid: u32,
    opts: &BenchOptions,
) -> anyhow::Result<Figure> {
    let before = rss(pid)?;
    let run = run_id();
    for i in 0..opts.client_ids {
        let mut s = open_connected(addr, &format!("churn-{run}-{i}")).await?;
        s.write_all(&[0xe0, 0]).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss(pid)?;
    Ok(Figure::new(after as f64, format!("{before} → {after}")))
}
