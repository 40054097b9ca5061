//! Bench scenarios that push a broker past what its subscribers take: fan-in at full speed
//! sized so a loss shows, fan-out to many subscribers, a subscriber stopped mid-stream, and
//! filter churn. Each reports what was delivered out of what was sent, so a broker that
//! drops looks like it.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use rumqttc::QoS;
use std::io::{BufRead, BufReader};
use tokio::sync::mpsc;

use super::figure::Figure;
use super::host::{rss, signal, Spawned};
use super::mqtt::{client, count_until, drive, run_id, subscriber, Inbound};

/// `width` publishers send `total` messages between them, as fast as they can, to one
/// wildcard subscriber.
pub async fn fan_in(
    addr: SocketAddr,
    qos: QoS,
    width: usize,
    total: usize,
    payload: usize,
    timeout: Duration,
) -> anyhow::Result<Figure> {
    let run = run_id();
    let (_sub, mut rx, h) = subscriber(
        addr,
        format!("bench-{run}-sink"),
        &format!("bench/{run}/in/+"),
        qos,
    )
    .await?;
    let per = total / width.max(1);
    let want = (per * width) as u64;
    let payload = bytes::Bytes::from(vec![b'x'; payload]);
    let t0 = Instant::now();
    let mut pubs = Vec::new();
    for i in 0..width {
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
    let got = count_until(&mut rx, want, t0 + timeout).await;
    let secs = t0.elapsed().as_secs_f64();
    for p in pubs {
        if let Ok((_c, drv, _)) = p.await {
            drv.abort();
        }
    }
    h.abort();
    let rate = got as f64 / secs;
    Ok(Figure::new(rate, format!("{rate:.0} msg/s, {got}/{want}")).delivered(got, want))
}

/// One publisher sends `per` messages to `width` subscribers of one topic.
pub async fn fan_out(
    addr: SocketAddr,
    qos: QoS,
    width: usize,
    per: usize,
    payload: usize,
    timeout: Duration,
) -> anyhow::Result<Figure> {
    let run = run_id();
    let topic = format!("bench/{run}/out");
    let mut subs = Vec::new();
    for i in 0..width {
        subs.push(subscriber(addr, format!("bench-{run}-s{i}"), &topic, qos).await?);
    }
    let (c, el) = client(format!("bench-{run}-src"), addr);
    let (tx, _rx) = mpsc::unbounded_channel();
    let drv = drive(el, tx);
    let payload = bytes::Bytes::from(vec![b'x'; payload]);
    let t0 = Instant::now();
    let total = Arc::new(AtomicU64::new(0));
    let mut counters = Vec::new();
    for (_c, mut rx, h) in subs {
        let total = total.clone();
        let deadline = t0 + timeout;
        counters.push(tokio::spawn(async move {
            let n = count_until(&mut rx, per as u64, deadline).await;
            total.fetch_add(n, Ordering::Relaxed);
            h.abort();
            _c
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
    let want = (per * width) as u64;
    let rate = got as f64 / secs;
    Ok(Figure::new(rate, format!("{rate:.0} deliveries/s, {got}/{want}")).delivered(got, want))
}

/// A `mosquitto_sub` process subscribed to `topic`, counting the messages it prints.
struct Counted {
    child: Spawned,
    count: Arc<AtomicU64>,
}

fn counted_sub(addr: SocketAddr, topic: &str, qos: QoS) -> anyhow::Result<Counted> {
    let mut child = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub", "-h", &addr.ip().to_string()])
        .args(["-p", &addr.port().to_string(), "-t", topic])
        .args(["-q", &(qos as u8).to_string(), "-d"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto_sub (apt-get install mosquitto-clients)")?;
    let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let child = Spawned(child);
    let count = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let n = count.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if l.contains("received SUBACK") {
                let _ = ready_tx.send(());
            } else if !l.starts_with("Client ") {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!("mosquitto_sub did not subscribe"))?;
    Ok(Counted { child, count })
}

/// One subscriber process SIGSTOPped while a fast one reads the same topic and one publisher
/// sends `n` messages; then SIGCONT. Reports what each got, and how long the fast one took
/// to get all (the headline: a broker that lets a stopped subscriber hold back the others
/// shows here).
pub async fn slow_subscriber(addr: SocketAddr, qos: QoS, n: usize) -> anyhow::Result<Figure> {
    let run = run_id();
    let topic = format!("bench/{run}/slow");
    let (_fast, mut rx, h) = subscriber(addr, format!("bench-{run}-fast"), &topic, qos).await?;
    let slow = counted_sub(addr, &topic, qos)?;
    let pid = slow.child.0.id();
    signal(pid, "STOP")?;
    let (c, el) = client(format!("bench-{run}-src"), addr);
    let (tx, _rx) = mpsc::unbounded_channel();
    let drv = drive(el, tx);
    let payload = bytes::Bytes::from(vec![b'x'; 1024]);
    let t0 = Instant::now();
    // Counted until all came or none came for longer than a broker may hold a publisher.
    let fast = tokio::spawn(async move {
        let mut got = 0u64;
        while got < n as u64 {
            match tokio::time::timeout(Duration::from_secs(15), rx.recv()).await {
                Ok(Some(Inbound::Publish(_))) => got += 1,
                Ok(Some(Inbound::Error)) | Ok(None) | Err(_) => break,
                Ok(Some(_)) => {}
            }
        }
        (got, Instant::now())
    });
    for _ in 0..n {
        c.publish_bytes(topic.clone(), qos, false, payload.clone())
            .await?;
    }
    let (fast_got, fast_done) = fast.await?;
    let took = fast_done.duration_since(t0);
    signal(pid, "CONT")?;
    // What the stopped one still gets once it runs again.
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = slow.count.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    drv.abort();
    h.abort();
    let secs = took.as_secs_f64();
    let n = n as u64;
    Ok(Figure::new(
        secs,
        format!("fast {fast_got}/{n} in {secs:.1} s, stopped one {last}/{n}"),
    )
    .delivered(fast_got + last, 2 * n))
}

/// `n` distinct filters subscribed and unsubscribed, 100 at a time; then a new subscription.
/// Reports whether it was still granted, and the broker's memory before and after (the
/// headline: after).
pub async fn filter_churn(addr: SocketAddr, pid: u32, n: usize) -> anyhow::Result<Figure> {
    let before = rss(pid)?;
    let run = run_id();
    let (c, el) = client(format!("bench-{run}-churn"), addr);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let drv = drive(el, tx);
    for batch in (0..n).collect::<Vec<_>>().chunks(100) {
        for i in batch {
            c.subscribe(format!("bench/{run}/churn/{i}/+"), QoS::AtMostOnce)
                .await?;
        }
        for i in batch {
            c.unsubscribe(format!("bench/{run}/churn/{i}/+")).await?;
        }
    }
    let mut acks = 0;
    while acks < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Inbound::SubAck)) => acks += 1,
            Ok(Some(Inbound::Error)) | Ok(None) | Err(_) => break,
            Ok(Some(_)) => {}
        }
    }
    drv.abort();
    // A fresh client, a fresh filter: granted?
    let granted = subscriber(
        addr,
        format!("bench-{run}-after"),
        &format!("bench/{run}/new/#"),
        QoS::AtMostOnce,
    )
    .await
    .is_ok();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss(pid)?;
    Ok(Figure::new(
        after as f64,
        format!(
            "{before} → {after} KiB; {acks}/{n} SUBACKs; a new subscription after: {}",
            if granted { "granted" } else { "REFUSED" }
        ),
    )
    .delivered(acks as u64, n as u64))
}
