//! `hostmetrics`: what a small host is doing, read from /proc and /sys.
//!
//! - event `reading` on `edge/hostmetrics/events/reading` every `[hostmetrics] interval`
//!   (default 10 s; retained, so a new subscriber sees the last one at once);
//! - endpoint `read` on `edge/hostmetrics/read/request`: a fresh reading.
//!
//! A reading: load averages, memory total and available, CPU busy percentage since the
//! previous reading, uptime, and the hottest thermal zone when the host has one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgebus_runtime::bus::Bus;
use edgebus_runtime::contract::{EndpointSpec, EventSpec};
use edgebus_runtime::service::{Request, Service, ServiceBuilder, StartError};
use edgebus_runtime::wire::ServiceError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use edgebus_runtime::contract::ServiceSpec;

/// One reading.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
    /// Total memory, bytes.
    pub mem_total_bytes: u64,
    /// Memory available without swapping, bytes.
    pub mem_available_bytes: u64,
    /// CPU busy since the previous reading, percent of all CPUs.
    pub cpu_percent: f64,
    /// Number of CPUs.
    pub cpus: usize,
    /// Seconds since boot.
    pub uptime_s: f64,
    /// Hottest thermal zone, °C, when the host reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f64>,
}

/// Reads /proc and /sys; keeps the previous CPU counters for the busy percentage.
#[derive(Debug, Default)]
pub struct Sampler {
    last_cpu: Option<(u64, u64)>,
}

impl Sampler {
    /// A reading now.
    pub fn read(&mut self) -> std::io::Result<Reading> {
        let loadavg = std::fs::read_to_string("/proc/loadavg")?;
        let mut load = [0.0; 3];
        for (slot, v) in load.iter_mut().zip(loadavg.split_whitespace()) {
            *slot = v.parse().unwrap_or(0.0);
        }
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        let kb = |key: &str| -> u64 {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        let stat = std::fs::read_to_string("/proc/stat")?;
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count();
        let (busy, total) = stat
            .lines()
            .next()
            .map(|l| {
                let v: Vec<u64> = l
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let total: u64 = v.iter().take(8).sum();
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                (total.saturating_sub(idle), total)
            })
            .unwrap_or((0, 0));
        let cpu_percent = match self.last_cpu.replace((busy, total)) {
            Some((b0, t0)) if total > t0 => {
                (busy.saturating_sub(b0)) as f64 * 100.0 / (total - t0) as f64
            }
            _ => 0.0,
        };
        let uptime_s = std::fs::read_to_string("/proc/uptime")?
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Ok(Reading {
            load,
            mem_total_bytes: kb("MemTotal"),
            mem_available_bytes: kb("MemAvailable"),
            cpu_percent: (cpu_percent * 10.0).round() / 10.0,
            cpus,
            uptime_s,
            temperature_c: temperature(),
        })
    }
}

fn temperature() -> Option<f64> {
    let dir = std::fs::read_dir("/sys/class/thermal").ok()?;
    dir.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("temp")).ok())
        .filter_map(|t| t.trim().parse::<f64>().ok())
        .map(|milli| milli / 1000.0)
        .fold(None, |acc: Option<f64>, t| {
            Some(acc.map_or(t, |a| a.max(t)))
        })
}

/// The service as built, before it is bound to a bus.
/// `contract` is topics.toml's `[[service]]` declarations.
pub fn builder(contract: &[ServiceSpec], sampler: Arc<Mutex<Sampler>>) -> ServiceBuilder {
    let mut read = EndpointSpec::new("read");
    read.description = "a fresh reading".into();
    let mut reading = EventSpec::new("reading");
    reading.retain = true;
    edgebus_runtime::service!("hostmetrics")
        .description("load, memory, CPU and temperature of this host")
        .capability("metrics")
        .contract(contract)
        .endpoint_with(read, move |_req: Request<Value>| {
            let sampler = sampler.clone();
            async move {
                let reading = sampler
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read()
                    .map_err(|e| ServiceError::internal(format!("cannot read /proc: {e}")))?;
                Ok::<_, ServiceError>(reading)
            }
        })
        .event(reading)
}

/// Starts `hostmetrics` on `bus`, publishing a reading every `[hostmetrics] interval`.
pub async fn start(
    contract: &[ServiceSpec],
    config: &HostmetricsConfig,
    bus: &Bus,
) -> Result<Service, StartError> {
    let sampler = Arc::new(Mutex::new(Sampler::default()));
    let service = builder(contract, sampler.clone()).start(bus).await?;
    let interval = config.interval;
    let emitter = service.clone();
    service.spawn(async move {
        if interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let reading = sampler.lock().unwrap_or_else(|e| e.into_inner()).read();
            match reading {
                Ok(r) => {
                    if let Err(e) = emitter.emit("reading", &r).await {
                        tracing::warn!(error = %e, "reading not published");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read /proc"),
            }
        }
    });
    Ok(service)
}

/// `[hostmetrics]` in topics.toml.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostmetricsConfig {
    /// How often a reading is published ("0s": only on request).
    #[serde(with = "edgebus_runtime::config::duration")]
    pub interval: Duration,
}

impl Default for HostmetricsConfig {
    fn default() -> Self {
        HostmetricsConfig {
            interval: Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host() {
        let mut s = Sampler::default();
        let r = s.read().expect("reading");
        assert!(r.mem_total_bytes > 0 && r.mem_available_bytes <= r.mem_total_bytes);
        assert!(r.cpus >= 1);
        let r2 = s.read().expect("reading");
        assert!((0.0..=100.0).contains(&r2.cpu_percent));
    }
}
