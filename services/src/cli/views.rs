//! `edgebus services` and `edgebus health`: the registry and the health view, as tables
//! (coloured on a terminal) or JSON.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{anyhow, bail};
use edgebus_runtime::bus::{random_u64, Bus, BusOptions};
use edgebus_runtime::records::{DiscoveryList, HealthAlert, HealthStatus, Registration};
use edgebus_runtime::tree::Tree;
use serde_json::Value;

use crate::config::TopicsFile;

fn cli_bus(file: &TopicsFile, broker: Option<&str>) -> anyhow::Result<Bus> {
    let broker = broker.unwrap_or(&file.bus.broker).to_owned();
    let mut o = BusOptions::new(broker, format!("edgebus-view-{:08x}", random_u64() as u32))
        .prefix(file.bus.prefix.clone());
    o.credentials = edgebus_runtime::env::credentials(&file.bus)?;
    o.tls = edgebus_runtime::env::tls(&file.bus);
    Ok(Bus::connect(o)?)
}

fn paint(status: &str, colour: bool) -> String {
    if !colour {
        return status.to_owned();
    }
    let code = match status {
        "healthy" | "online" => "32",
        "degraded" => "33",
        "unhealthy" => "31",
        _ => "90",
    };
    format!("\x1b[{code}m{status}\x1b[0m")
}

fn table(rows: &[Vec<String>], colour_col: Option<usize>) {
    let colour = std::io::stdout().is_terminal();
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for (n, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, v)| {
                let pad = " ".repeat(widths[c] - v.chars().count());
                if n > 0 && Some(c) == colour_col {
                    format!("{}{pad}", paint(v, colour))
                } else {
                    format!("{v}{pad}")
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// `edgebus services`: the registry, from discovery's list endpoint.
pub async fn services(file: &TopicsFile, broker: Option<&str>, json: bool) -> anyhow::Result<()> {
    let bus = cli_bus(file, broker)?;
    if !bus.sync(Duration::from_secs(5)).await {
        bail!("cannot reach the broker");
    }
    let topic = Tree::new(&file.bus.prefix).discovery_list_request();
    let r = bus
        .request_raw(
            &topic,
            bytes::Bytes::from_static(b"{}"),
            &edgebus_runtime::request::RequestOptions::timeout(Duration::from_secs(3)),
        )
        .await;
    bus.close(Duration::from_millis(200)).await;
    let data = r
        .map_err(|e| anyhow!("discovery did not answer ({e}); is `edgebus discovery` running?"))?
        .data
        .unwrap_or(Value::Null);
    if json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    let mut rows = vec![[
        "SERVICE",
        "INSTANCE",
        "STATE",
        "VERSION",
        "HOST",
        "PID",
        "ENDPOINTS",
    ]
    .map(String::from)
    .to_vec()];
    let list: DiscoveryList =
        serde_json::from_value(data).map_err(|e| anyhow!("discovery's list is unreadable: {e}"))?;
    for r in &list.instances {
        let row = match r {
            Registration::Online(b) => vec![
                b.service.clone(),
                b.instance.clone(),
                "online".to_owned(),
                b.version.clone(),
                b.host.clone(),
                b.pid.to_string(),
                b.endpoints
                    .iter()
                    .map(|e| e.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ],
            Registration::Offline(d) => vec![
                d.service.clone(),
                d.instance.clone(),
                "offline".to_owned(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
        };
        rows.push(row);
    }
    table(&rows, Some(2));
    Ok(())
}

/// `edgebus health`: the retained status records; `--watch` then prints alerts as they come.
pub async fn health(
    file: &TopicsFile,
    broker: Option<&str>,
    json: bool,
    watch: bool,
) -> anyhow::Result<()> {
    let p = &file.bus.prefix;
    let bus = cli_bus(file, broker)?;
    let mut statuses = bus
        .subscribe(&Tree::new(p).all_health_statuses(), 1)
        .await?;
    let mut alerts = bus.subscribe(&Tree::new(p).health_alert(), 1).await?;
    let mut beats = bus.subscribe(&Tree::new(p).all_heartbeats(), 0).await?;
    let t0 = std::time::Instant::now();
    if !bus.sync(Duration::from_secs(5)).await {
        bail!("cannot reach the broker");
    }
    let mut records: BTreeMap<String, HealthStatus> = BTreeMap::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), statuses.recv()).await
    {
        match serde_json::from_slice::<HealthStatus>(&m.payload) {
            Ok(v) => {
                records.insert(m.topic.clone(), v);
            }
            Err(e) => eprintln!("edgebus: {}: unreadable status record: {e}", m.topic),
        }
    }
    // A status record is published when a status changes; its `last_seen` is the last
    // heartbeat before that. The heartbeats of the next interval (1 s by default) say when
    // each live instance was last seen now.
    let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
    let beat_window = Duration::from_millis(1100);
    while let Ok(Some(m)) =
        tokio::time::timeout(beat_window.saturating_sub(t0.elapsed()), beats.recv()).await
    {
        let mut levels = m.topic.rsplit('/');
        if let (Some(instance), Some(service)) = (levels.next(), levels.next()) {
            seen.insert(
                (service.to_owned(), instance.to_owned()),
                edgebus_runtime::wire::timestamp(),
            );
        }
    }
    drop(beats);
    for v in records.values_mut() {
        for i in &mut v.instances {
            if let Some(at) = seen.get(&(v.service.clone(), i.instance.clone())) {
                i.last_seen = at.clone();
            }
        }
    }
    if json {
        let all: Vec<&HealthStatus> = records.values().collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if records.is_empty() {
        println!("no status records (is the health monitor running?)");
    } else {
        let mut rows = vec![["SERVICE", "STATUS", "SINCE", "INSTANCES"]
            .map(String::from)
            .to_vec()];
        for v in records.values() {
            let insts: Vec<String> = v
                .instances
                .iter()
                .map(|i| {
                    let ago = humantime::parse_rfc3339(&i.last_seen)
                        .ok()
                        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                        .map(|d| format!(" (seen {}s ago)", d.as_secs()))
                        .unwrap_or_default();
                    format!("{}:{}{ago}", i.instance, i.status.as_str())
                })
                .collect();
            rows.push(vec![
                v.service.clone(),
                v.status.as_str().to_owned(),
                v.since.clone(),
                insts.join(" "),
            ]);
        }
        table(&rows, Some(1));
    }
    if watch {
        let colour = std::io::stdout().is_terminal();
        while let Some(m) = alerts.recv().await {
            let Ok(a) = serde_json::from_slice::<HealthAlert>(&m.payload) else {
                continue;
            };
            if json {
                println!("{}", serde_json::to_string(&a).unwrap_or_default());
            } else {
                println!(
                    "{}  {}/{}  {} → {}  ({})",
                    a.at,
                    a.service,
                    a.instance,
                    paint(a.from.as_str(), colour),
                    paint(a.to.as_str(), colour),
                    a.reason
                );
            }
        }
    }
    bus.close(Duration::from_millis(200)).await;
    Ok(())
}
