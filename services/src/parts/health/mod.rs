//! The health monitor: per-instance status from heartbeats and registrations, the retained
//! `P/health/status/{service}` and `P/health/summary`, and one `P/health/alert` per transition.
//!
//! - A heartbeat carries the instance's own status (`healthy`, `degraded`, `unhealthy`). A
//!   change is taken after `confirm_beats` heartbeats in a row say so (flap damping), except
//!   the first heartbeat of an incarnation, which is taken at once.
//! - `heartbeat_misses` intervals without a heartbeat: `unhealthy` (a hung process: SIGSTOP,
//!   a wedged event loop), checked every 100 ms.
//! - The Last Will or a clean stop's record: `offline` at once. A deleted registration (expiry):
//!   the instance is forgotten, and a service with no instance left loses its status record.
//! - A service is as healthy as its best instance; the summary is as healthy as the worst service.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgebus_runtime::bus::{Bus, Message, PublishOptions};
use edgebus_runtime::records::{HealthAlert, HealthStatus, Heartbeat, Registration};
use edgebus_runtime::service::{Service, StartError};
use edgebus_runtime::tree::Tree;
use edgebus_runtime::wire::timestamp;
use serde::{Deserialize, Serialize};

mod state;

pub use state::{Effect, Health, Transition};

/// `[health]` in topics.toml.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Heartbeat intervals without a heartbeat before an instance is `unhealthy`.
    pub heartbeat_misses: u32,
    /// Heartbeats in a row that must report a new status before it is taken.
    pub confirm_beats: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            heartbeat_misses: 3,
            confirm_beats: 2,
        }
    }
}

/// A running health monitor.
pub struct Monitor {
    /// The monitor's own service (registration and heartbeat).
    pub service: Service,
}

struct Ctx {
    bus: Bus,
    tree: Tree,
    state: Mutex<Health>,
}

/// Starts the monitor on `bus` (made with `BusOptions::for_service(…, "health-monitor", …)`).
pub async fn start(prefix: &str, config: &HealthConfig, bus: &Bus) -> Result<Monitor, StartError> {
    let service = edgebus_runtime::service!("health-monitor")
        .description("status of every service from heartbeats and registrations")
        .capability("health")
        .start(bus)
        .await?;
    let ctx = Arc::new(Ctx {
        bus: bus.clone(),
        tree: Tree::new(prefix),
        state: Mutex::new(Health::new(config.heartbeat_misses, config.confirm_beats)),
    });
    // Our own retained records first: the state already alerted before a restart.
    let mut statuses = bus
        .subscribe(&Tree::new(prefix).all_health_statuses(), 1)
        .await?;
    // Retained statuses are in before our round trip completes; take them before anything
    // else, so that what happened while the monitor was away is compared with what it last
    // said, whatever order the broker sends the rest in.
    if bus.sync(Duration::from_secs(5)).await {
        while let Some(m) = statuses.try_recv() {
            if m.retain {
                ctx.load_status(&m);
            }
        }
    }
    let mut beats = bus
        .subscribe(&Tree::new(prefix).all_heartbeats(), 0)
        .await?;
    let mut records = bus
        .subscribe(&Tree::new(prefix).all_registrations(), 1)
        .await?;
    let c = ctx.clone();
    service.spawn(async move {
        while let Some(m) = statuses.recv().await {
            if m.retain {
                c.load_status(&m);
            }
        }
    });
    let c = ctx.clone();
    service.spawn(async move {
        while let Some(m) = beats.recv().await {
            c.heartbeat(&m).await;
        }
    });
    let c = ctx.clone();
    service.spawn(async move {
        while let Some(m) = records.recv().await {
            c.registration(&m).await;
        }
    });
    let c = ctx.clone();
    service.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_up = true;
        loop {
            tick.tick().await;
            // Heartbeats cannot reach us while our own connection is down: that is no
            // instance's fault, so each gets a fresh window once we are back.
            let up = c.bus.is_connected();
            if up && !was_up {
                lock(&c.state).restart_windows(Instant::now());
            }
            was_up = up;
            if up {
                let transitions = lock(&c.state).check_misses(Instant::now());
                c.announce(transitions).await;
            }
        }
    });
    // A broker restart loses retained messages: after every reconnect but the first, the
    // status records and the summary are published again from what the monitor knows.
    let c = ctx.clone();
    let connects = Arc::new(std::sync::atomic::AtomicU64::new(0));
    bus.on_connect(move |_| {
        if connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            return;
        }
        let c = c.clone();
        tokio::spawn(async move { c.republish().await });
    });
    Ok(Monitor { service })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ctx {
    /// Loads a retained status record (ours, from before a restart) without alerting.
    fn load_status(&self, m: &Message) {
        if let Ok(record) = serde_json::from_slice::<HealthStatus>(&m.payload) {
            lock(&self.state).load_status(record, Instant::now());
        }
    }

    async fn heartbeat(&self, m: &Message) {
        let beat = match serde_json::from_slice::<Heartbeat>(&m.payload) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(topic = %m.topic, error = %e, "heartbeat unreadable; ignored");
                return;
            }
        };
        let transition = lock(&self.state).heartbeat(&beat, Instant::now());
        self.announce(transition.into_iter().collect()).await;
    }

    async fn registration(&self, m: &Message) {
        let Some((service, instance)) = self.tree.registration_of(&m.topic) else {
            return;
        };
        let record = if m.payload.is_empty() {
            None
        } else {
            match serde_json::from_slice::<Registration>(&m.payload) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::debug!(topic = %m.topic, error = %e, "registration unreadable; ignored");
                    return;
                }
            }
        };
        let effect = lock(&self.state).registration(
            service,
            instance,
            record.as_ref(),
            m.retain,
            Instant::now(),
        );
        match effect {
            Effect::Announce(transitions) => self.announce(transitions).await,
            Effect::Republish(service) => self.publish_status(&service).await,
            Effect::Forget(service, transitions) => {
                self.announce(transitions).await;
                let topic = self.tree.health_status(&service);
                let _ = self
                    .bus
                    .publish(&topic, Vec::new(), PublishOptions::retained())
                    .await;
                self.publish_summary().await;
            }
        }
    }

    /// Publishes every status record and the summary again.
    async fn republish(&self) {
        let services = lock(&self.state).services();
        for s in &services {
            self.publish_status(s).await;
        }
        self.publish_summary().await;
    }

    /// Publishes an alert per transition, then the status of each service touched.
    async fn announce(&self, transitions: Vec<Transition>) {
        let mut touched = Vec::new();
        for t in transitions {
            let (from, to) = (t.from.as_str(), t.to.as_str());
            tracing::info!(service = %t.service, instance = %t.instance, from, to, reason = %t.reason, "{} {}: {from} → {to} ({})", t.service, t.instance, t.reason);
            let alert = HealthAlert {
                service: t.service.clone(),
                instance: t.instance,
                from: t.from,
                to: t.to,
                reason: t.reason,
                at: timestamp(),
            };
            let _ = self
                .bus
                .publish_json(&self.tree.health_alert(), &alert, PublishOptions::qos(1))
                .await;
            if !touched.contains(&t.service) {
                touched.push(t.service);
            }
        }
        for s in touched {
            self.publish_status(&s).await;
        }
    }

    async fn publish_status(&self, service: &str) {
        let Some((record, changed)) = lock(&self.state).status_record(service) else {
            return;
        };
        let topic = self.tree.health_status(service);
        let _ = self
            .bus
            .publish_json(&topic, &record, PublishOptions::retained())
            .await;
        if changed {
            self.publish_summary().await;
        }
    }

    async fn publish_summary(&self) {
        let summary = lock(&self.state).summary();
        let _ = self
            .bus
            .publish_json(
                &self.tree.health_summary(),
                &summary,
                PublishOptions::retained(),
            )
            .await;
    }
}
