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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgebus_runtime::bus::{Bus, Message, PublishOptions};
use edgebus_runtime::presence::Status;
use edgebus_runtime::records::{
    HealthAlert, HealthStatus, HealthSummary, Heartbeat, InstanceStatus, Registration,
};
use edgebus_runtime::service::{Service, StartError};
use edgebus_runtime::tree::Tree;
use edgebus_runtime::wire::timestamp;
use serde::{Deserialize, Serialize};

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

#[derive(Debug, Clone)]
struct Inst {
    incarnation: u64,
    status: Status,
    last_seen: Instant,
    last_seen_at: String,
    interval: Duration,
    beats: u64,
    candidate: Option<(Status, u32)>,
    missed: bool,
}

#[derive(Debug, Default)]
struct State {
    services: BTreeMap<String, BTreeMap<String, Inst>>,
    service_status: BTreeMap<String, (Status, String)>,
}

/// A running health monitor.
pub struct Monitor {
    /// The monitor's own service (registration and heartbeat).
    pub service: Service,
}

struct Ctx {
    bus: Bus,
    prefix: String,
    config: HealthConfig,
    state: Mutex<State>,
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
        prefix: prefix.to_owned(),
        config: config.clone(),
        state: Mutex::new(State::default()),
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
                c.restart_windows();
            }
            was_up = up;
            if up {
                c.check_misses().await;
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

/// A transition to announce: (service, instance, from, to, reason).
type Transition = (String, String, Status, Status, String);

impl Ctx {
    /// Loads a retained status record (ours, from before a restart) without alerting.
    fn load_status(&self, m: &Message) {
        let Ok(record) = serde_json::from_slice::<HealthStatus>(&m.payload) else {
            return;
        };
        let mut st = lock(&self.state);
        st.service_status
            .entry(record.service.clone())
            .or_insert((record.status, record.since.clone()));
        for i in record.instances {
            st.services
                .entry(record.service.clone())
                .or_default()
                .entry(i.instance)
                .or_insert(Inst {
                    incarnation: i.incarnation,
                    status: i.status,
                    last_seen: Instant::now(),
                    last_seen_at: i.last_seen,
                    interval: Duration::from_secs(1),
                    beats: 1,
                    candidate: None,
                    missed: false,
                });
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
        let (service, instance) = (beat.service.as_str(), beat.instance.as_str());
        let reported = beat.status;
        let incarnation = beat.incarnation;
        let interval = Duration::from_millis(beat.interval_ms.max(10));
        let confirm = self.config.confirm_beats.max(1);
        let mut transitions = Vec::new();
        {
            let mut st = lock(&self.state);
            let insts = st.services.entry(service.to_owned()).or_default();
            let inst = insts.entry(instance.to_owned()).or_insert(Inst {
                incarnation,
                status: Status::Offline,
                last_seen: Instant::now(),
                last_seen_at: timestamp(),
                interval,
                beats: 0,
                candidate: None,
                missed: false,
            });
            if incarnation < inst.incarnation {
                return;
            }
            if incarnation > inst.incarnation {
                inst.incarnation = incarnation;
                inst.beats = 0;
                inst.candidate = None;
            }
            inst.last_seen = Instant::now();
            inst.last_seen_at = timestamp();
            inst.interval = interval;
            inst.beats += 1;
            inst.missed = false;
            if reported == inst.status {
                inst.candidate = None;
            } else if inst.beats == 1 || inst.status == Status::Offline {
                let from = inst.status;
                inst.status = reported;
                inst.candidate = None;
                transitions.push((
                    service.into(),
                    instance.into(),
                    from,
                    reported,
                    "heartbeat".into(),
                ));
            } else {
                let n = match inst.candidate {
                    Some((s, n)) if s == reported => n + 1,
                    _ => 1,
                };
                if n >= confirm {
                    let from = inst.status;
                    inst.status = reported;
                    inst.candidate = None;
                    let why = beat
                        .checks
                        .iter()
                        .find(|(_, r)| r.as_str() != "ok")
                        .map(|(k, r)| format!("{k}: {r}"))
                        .unwrap_or_else(|| "heartbeat".into());
                    transitions.push((service.into(), instance.into(), from, reported, why));
                } else {
                    inst.candidate = Some((reported, n));
                }
            }
        }
        self.announce(transitions).await;
    }

    async fn registration(&self, m: &Message) {
        let mut parts = m.topic.rsplitn(3, '/');
        let (Some(instance), Some(service)) = (parts.next(), parts.next()) else {
            return;
        };
        if service == "list" || instance == "update" {
            return;
        }
        let mut transitions = Vec::new();
        let mut forget_service = false;
        let mut quiet = false;
        {
            let mut st = lock(&self.state);
            if m.payload.is_empty() {
                if let Some(insts) = st.services.get_mut(service) {
                    if let Some(i) = insts.remove(instance) {
                        if i.status != Status::Offline {
                            transitions.push((
                                service.into(),
                                instance.into(),
                                i.status,
                                Status::Offline,
                                "expired".into(),
                            ));
                        }
                    }
                    forget_service = insts.is_empty();
                }
                if forget_service {
                    st.services.remove(service);
                }
            } else {
                let record = match serde_json::from_slice::<Registration>(&m.payload) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(topic = %m.topic, error = %e, "registration unreadable; ignored");
                        return;
                    }
                };
                let incarnation = record.incarnation();
                let online = record.is_online();
                let interval = Duration::from_millis(match &record {
                    Registration::Online(b) => b.heartbeat_interval_ms.max(10),
                    Registration::Offline(_) => 1000,
                });
                let insts = st.services.entry(service.to_owned()).or_default();
                match insts.get_mut(instance) {
                    Some(i) if incarnation < i.incarnation => {}
                    Some(i) if !online => {
                        if i.status != Status::Offline && incarnation >= i.incarnation {
                            let reason = match &record {
                                Registration::Offline(d) if !d.reason.is_empty() => {
                                    d.reason.clone()
                                }
                                _ => "offline".to_owned(),
                            };
                            transitions.push((
                                service.into(),
                                instance.into(),
                                i.status,
                                Status::Offline,
                                reason,
                            ));
                            i.status = Status::Offline;
                            i.incarnation = incarnation;
                            i.candidate = None;
                        }
                    }
                    Some(i) => {
                        if online {
                            // A birth is a sign of life as good as a heartbeat.
                            i.last_seen = Instant::now();
                        }
                        if incarnation > i.incarnation {
                            i.incarnation = incarnation;
                            i.beats = 0;
                            i.last_seen = Instant::now();
                            i.missed = false;
                        }
                        i.interval = interval;
                    }
                    None => {
                        insts.insert(
                            instance.to_owned(),
                            Inst {
                                incarnation,
                                status: if online {
                                    Status::Healthy
                                } else {
                                    Status::Offline
                                },
                                last_seen: Instant::now(),
                                last_seen_at: timestamp(),
                                interval,
                                beats: 0,
                                candidate: None,
                                missed: false,
                            },
                        );
                        if online && !m.retain {
                            transitions.push((
                                service.into(),
                                instance.into(),
                                Status::Offline,
                                Status::Healthy,
                                "registered".into(),
                            ));
                        } else {
                            // A retained record: state from before we started; publish it quietly.
                            quiet = true;
                        }
                    }
                }
            }
        }
        if quiet {
            self.publish_status(service).await;
            return;
        }
        let removed = m.payload.is_empty() && !forget_service;
        if removed && transitions.is_empty() {
            // An offline instance expired while others live: the record must stop listing it.
            self.publish_status(service).await;
            return;
        }
        if forget_service {
            self.announce(transitions).await;
            let opts = PublishOptions::retained();
            let topic = Tree::new(&self.prefix).health_status(service);
            let _ = self.bus.publish(&topic, Vec::new(), opts).await;
            lock(&self.state).service_status.remove(service);
            self.publish_summary().await;
        } else {
            self.announce(transitions).await;
        }
    }

    fn restart_windows(&self) {
        let mut st = lock(&self.state);
        for i in st.services.values_mut().flat_map(|m| m.values_mut()) {
            i.last_seen = Instant::now();
        }
    }

    /// Publishes every status record and the summary again.
    async fn republish(&self) {
        let services: Vec<String> = lock(&self.state).services.keys().cloned().collect();
        for s in &services {
            self.publish_status(s).await;
        }
        self.publish_summary().await;
    }

    async fn check_misses(&self) {
        let misses = self.config.heartbeat_misses.max(1);
        let mut transitions = Vec::new();
        {
            let mut st = lock(&self.state);
            for (service, insts) in st.services.iter_mut() {
                for (name, i) in insts.iter_mut() {
                    if i.status == Status::Offline || i.missed {
                        continue;
                    }
                    if i.last_seen.elapsed() > i.interval * misses {
                        i.missed = true;
                        i.candidate = None;
                        if i.status != Status::Unhealthy {
                            transitions.push((
                                service.clone(),
                                name.clone(),
                                i.status,
                                Status::Unhealthy,
                                format!("missed {misses} heartbeats"),
                            ));
                            i.status = Status::Unhealthy;
                        }
                    }
                }
            }
        }
        self.announce(transitions).await;
    }

    /// Publishes an alert per transition, then the status of each service touched.
    async fn announce(&self, transitions: Vec<Transition>) {
        let mut touched = Vec::new();
        for (service, instance, from, to, reason) in transitions {
            tracing::info!(%service, %instance, from = from.as_str(), to = to.as_str(), %reason, "{service} {instance}: {} → {} ({reason})", from.as_str(), to.as_str());
            let alert = HealthAlert {
                service: service.clone(),
                instance,
                from,
                to,
                reason,
                at: timestamp(),
            };
            let topic = Tree::new(&self.prefix).health_alert();
            let _ = self
                .bus
                .publish_json(&topic, &alert, PublishOptions::qos(1))
                .await;
            if !touched.contains(&service) {
                touched.push(service);
            }
        }
        for s in touched {
            self.publish_status(&s).await;
        }
    }

    async fn publish_status(&self, service: &str) {
        let summary_changed;
        let record = {
            let mut st = lock(&self.state);
            let Some(insts) = st.services.get(service) else {
                return;
            };
            let best = insts
                .values()
                .map(|i| i.status)
                .max()
                .unwrap_or(Status::Offline);
            let instances: Vec<InstanceStatus> = insts
                .iter()
                .map(|(n, i)| InstanceStatus {
                    instance: n.clone(),
                    status: i.status,
                    last_seen: i.last_seen_at.clone(),
                    incarnation: i.incarnation,
                })
                .collect();
            let (since, changed) = match st.service_status.get(service) {
                Some((s, since)) if *s == best => (since.clone(), false),
                _ => (timestamp(), true),
            };
            summary_changed = changed;
            st.service_status
                .insert(service.to_owned(), (best, since.clone()));
            HealthStatus {
                service: service.to_owned(),
                status: best,
                since,
                instances,
            }
        };
        let topic = Tree::new(&self.prefix).health_status(service);
        let opts = PublishOptions::retained();
        let _ = self.bus.publish_json(&topic, &record, opts).await;
        if summary_changed {
            self.publish_summary().await;
        }
    }

    async fn publish_summary(&self) {
        let summary = {
            let st = lock(&self.state);
            let worst = st
                .service_status
                .values()
                .map(|(s, _)| *s)
                .min()
                .unwrap_or(Status::Healthy);
            let mut counts: BTreeMap<Status, u32> = BTreeMap::new();
            let services: BTreeMap<String, Status> = st
                .service_status
                .iter()
                .map(|(k, (s, _))| {
                    *counts.entry(*s).or_default() += 1;
                    (k.clone(), *s)
                })
                .collect();
            HealthSummary {
                status: worst,
                services,
                counts,
                at: timestamp(),
            }
        };
        let topic = Tree::new(&self.prefix).health_summary();
        let opts = PublishOptions::retained();
        let _ = self.bus.publish_json(&topic, &summary, opts).await;
    }
}
