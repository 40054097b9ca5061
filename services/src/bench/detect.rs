//! The failure-detection scenario of `edgebus bench`: real `edgebus service` processes killed
//! with SIGKILL and frozen with SIGSTOP, timed from the signal to the health monitor's alert.
//!
//! Discovery and the health monitor run in the bench process under a prefix of their own, so
//! the scenario works against any broker and never meets a running bus's services. Each trial
//! runs two processes at once: `echo` is SIGKILLed (then a request to it times
//! `NO_RESPONDERS`), `hostmetrics` is SIGSTOPped at a random point of its heartbeat interval.
//! Every update and alert is counted per instance, so duplicates and misses are reported.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use edgebus_runtime::bus::{random_u64, Bus, BusOptions, PublishOptions};
use edgebus_runtime::records::{DiscoveryUpdate, HealthAlert};
use edgebus_runtime::request::{RequestError, RequestOptions};
use edgebus_runtime::tree::Tree;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;

use super::figure::Figure;
use super::host::{signal, Spawned};
use crate::parts::discovery::{self, DiscoveryConfig};
use crate::parts::health::{self, HealthConfig};

/// The figures of one detection run.
#[derive(Debug, Clone)]
pub struct Detection {
    /// Signal → alert, in microseconds.
    pub kill: Histogram<u64>,
    /// SIGSTOP → `unhealthy` alert, in microseconds.
    pub stop: Histogram<u64>,
    /// Request → `NO_RESPONDERS` reply, in microseconds.
    pub no_responders: Histogram<u64>,
    /// Updates and alerts seen more often than their transition happened.
    pub duplicates: u64,
    /// Updates and alerts expected and never seen.
    pub missing: u64,
}

/// An update or alert: (instance, what), with when it arrived.
type Seen = (String, String, Instant);

/// Runs `trials` trials against the broker at `addr`.
pub async fn run(addr: SocketAddr, trials: usize) -> anyhow::Result<Detection> {
    let prefix = format!("bench{:08x}", random_u64() as u32);
    let exe = std::env::current_exe().context("the edgebus binary")?;
    let dir = std::env::temp_dir().join(format!("edgebus-detect-{prefix}"));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("topics.toml");
    std::fs::write(
        &cfg,
        format!("[bus]\nprefix = \"{prefix}\"\nbroker = \"{addr}\"\n"),
    )?;
    let result = trials_on(addr, &prefix, &exe, &cfg, trials).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn trials_on(
    addr: SocketAddr,
    prefix: &str,
    exe: &std::path::Path,
    cfg: &std::path::Path,
    trials: usize,
) -> anyhow::Result<Detection> {
    let broker = addr.to_string();
    let d_bus = Bus::connect(BusOptions::for_service(
        broker.clone(),
        prefix,
        "discovery",
        None,
    ))?;
    let m_bus = Bus::connect(BusOptions::for_service(
        broker.clone(),
        prefix,
        "health-monitor",
        None,
    ))?;
    let mut o = BusOptions::new(broker.clone(), format!("{prefix}-watch"));
    o.prefix = prefix.to_owned();
    o.reply_topic = Some(Tree::new(prefix).reply("watch"));
    let watch = Bus::connect(o)?;
    let disc = discovery::start(prefix, &DiscoveryConfig::default(), &d_bus).await?;
    let mon = health::start(prefix, &HealthConfig::default(), &m_bus).await?;

    let mut updates = watch
        .subscribe(&Tree::new(prefix).discovery_update(), 1)
        .await?;
    let mut alerts = watch
        .subscribe(&Tree::new(prefix).health_alert(), 1)
        .await?;
    let mut beats = watch
        .subscribe(&Tree::new(prefix).heartbeats_of("hostmetrics"), 0)
        .await?;
    if !watch.sync(Duration::from_secs(5)).await {
        bail!("the broker at {addr} did not answer");
    }
    let (tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let t = tx.clone();
    let forward_updates = tokio::spawn(async move {
        while let Some(m) = updates.recv().await {
            if let Ok(u) = serde_json::from_slice::<DiscoveryUpdate>(&m.payload) {
                let _ = t.send((
                    u.instance,
                    format!("update {}", u.event.as_str()),
                    m.received,
                ));
            }
        }
    });
    let forward_alerts = tokio::spawn(async move {
        while let Some(m) = alerts.recv().await {
            if let Ok(a) = serde_json::from_slice::<HealthAlert>(&m.payload) {
                let what = format!("alert {}→{}", a.from.as_str(), a.to.as_str());
                let _ = tx.send((a.instance, what, m.received));
            }
        }
    });

    let mut out = Detection {
        kill: Histogram::new(3)?,
        stop: Histogram::new(3)?,
        no_responders: Histogram::new(3)?,
        duplicates: 0,
        missing: 0,
    };
    let mut log: Vec<Seen> = Vec::new();
    let mut instances = Vec::new();
    for trial in 0..trials {
        let a = format!("echo-{prefix}-{trial}");
        let b = format!("hostmetrics-{prefix}-{trial}");
        instances.push(("echo", a.clone()));
        instances.push(("hostmetrics", b.clone()));
        let spawn = |service: &str, instance: &str| -> anyhow::Result<Spawned> {
            Ok(Spawned(
                Command::new(exe)
                    .args(["service", service, "--instance", instance, "-c"])
                    .arg(cfg)
                    .env("EDGEBUS_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            ))
        };
        let mut ka = spawn("echo", &a)?;
        let kb = spawn("hostmetrics", &b)?;
        wait_seen(&mut seen, &mut log, &a, "alert offline→healthy").await?;
        wait_seen(&mut seen, &mut log, &b, "alert offline→healthy").await?;

        // SIGKILL → offline.
        let t0 = Instant::now();
        ka.0.kill()?;
        let at = wait_seen(&mut seen, &mut log, &a, "alert healthy→offline").await?;
        out.kill.record(micros(at - t0))?;
        wait_seen(&mut seen, &mut log, &a, "update offline").await?;

        // A request to a service with no live instance.
        let t0 = Instant::now();
        let opts = RequestOptions {
            timeout: Duration::from_secs(2),
            ..RequestOptions::default()
        };
        let topic = Tree::new(prefix).request("echo", "echo");
        match watch
            .request_raw(&topic, bytes::Bytes::from_static(b"{}"), &opts)
            .await
        {
            Err(RequestError::Remote(e)) if e.code == "NO_RESPONDERS" => {
                out.no_responders.record(micros(t0.elapsed()))?;
            }
            other => bail!("expected NO_RESPONDERS, got {other:?}"),
        }

        // SIGSTOP at a random point of the heartbeat interval → unhealthy.
        let mut n = 0;
        while n < 2 {
            let m = tokio::time::timeout(Duration::from_secs(5), beats.recv())
                .await
                .context("no heartbeat from hostmetrics")?
                .context("bus closed")?;
            if m.topic.ends_with(&b) {
                n += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(random_u64() % 1000)).await;
        let t0 = Instant::now();
        signal(kb.0.id(), "STOP")?;
        let at = wait_seen(&mut seen, &mut log, &b, "alert healthy→unhealthy").await?;
        out.stop.record(micros(at.saturating_duration_since(t0)))?;
        drop(kb);
        wait_seen(&mut seen, &mut log, &b, "alert unhealthy→offline").await?;
        wait_seen(&mut seen, &mut log, &b, "update offline").await?;
    }
    // Anything late or doubled shows up here.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while let Ok(s) = seen.try_recv() {
        log.push(s);
    }
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (instance, what, _) in log
        .iter()
        .filter(|s| instances.iter().any(|(_, i)| *i == s.0))
    {
        *counts.entry((instance.clone(), what.clone())).or_default() += 1;
    }
    for (service, instance) in &instances {
        let want: &[&str] = if *service == "echo" {
            &[
                "update registered",
                "alert offline→healthy",
                "update offline",
                "alert healthy→offline",
            ]
        } else {
            &[
                "update registered",
                "alert offline→healthy",
                "alert healthy→unhealthy",
                "update offline",
                "alert unhealthy→offline",
            ]
        };
        for w in want {
            match counts.remove(&(instance.clone(), (*w).to_owned())) {
                None => out.missing += 1,
                Some(n) => out.duplicates += n - 1,
            }
        }
        // Offline records expire after a minute: early trials' may, once.
        if let Some(n) = counts.remove(&(instance.clone(), "update expired".to_owned())) {
            out.duplicates += n - 1;
        }
    }
    // Whatever is left was never expected at all.
    for ((instance, what), n) in &counts {
        tracing::warn!(%instance, %what, n, "unexpected detection event");
    }
    out.duplicates += counts.values().sum::<u64>();

    // Leave no retained records behind on the broker.
    let clear = PublishOptions::retained();
    for (service, instance) in &instances {
        let topic = Tree::new(prefix).registration(service, instance);
        let _ = watch.publish(&topic, Vec::new(), clear.clone()).await;
    }
    mon.service.stop(Duration::from_millis(500)).await;
    disc.service.stop(Duration::from_millis(500)).await;
    m_bus.close(Duration::from_millis(500)).await;
    d_bus.close(Duration::from_millis(500)).await;
    for (service, instance) in [
        ("health-monitor", mon.service.instance()),
        ("discovery", disc.service.instance()),
    ] {
        let topic = Tree::new(prefix).registration(service, instance);
        let _ = watch.publish(&topic, Vec::new(), clear.clone()).await;
    }
    for s in ["echo", "hostmetrics"] {
        let topic = Tree::new(prefix).health_status(s);
        let _ = watch.publish(&topic, Vec::new(), clear.clone()).await;
    }
    let _ = watch
        .publish(&Tree::new(prefix).health_summary(), Vec::new(), clear)
        .await;
    watch.sync(Duration::from_secs(2)).await;
    watch.close(Duration::from_millis(500)).await;
    forward_updates.abort();
    forward_alerts.abort();
    Ok(out)
}

/// Waits (at most 10 s) for `what` about `instance`; keeps everything seen in `log`.
async fn wait_seen(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    log: &mut Vec<Seen>,
    instance: &str,
    what: &str,
) -> anyhow::Result<Instant> {
    if let Some((_, _, at)) = log.iter().find(|(i, w, _)| i == instance && w == what) {
        return Ok(*at);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .with_context(|| format!("no `{what}` for {instance} within 10 s"))?
            .context("watcher closed")?;
        let hit = s.0 == instance && s.1 == what;
        let at = s.2;
        log.push(s);
        if hit {
            return Ok(at);
        }
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().max(1) as u64
}

/// `p50 / max` in milliseconds; the p50 is the headline.
pub fn p50_max_ms(h: &Histogram<u64>) -> anyhow::Result<Figure> {
    if h.is_empty() {
        bail!("no trial completed");
    }
    let p50 = h.value_at_quantile(0.5) as f64 / 1000.0;
    Ok(Figure::new(
        p50,
        format!("{p50:.1} / {:.1}", h.max() as f64 / 1000.0),
    ))
}
