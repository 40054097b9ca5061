//! Presence: who an instance is, its retained registration (birth after every CONNACK, Last
//! Will on the same topic, an explicit offline record on a clean stop), and its heartbeat.
//!
//! Topics (`P` is the prefix):
//! - `P/system/discovery/{service}/{instance}`, retained: `{"state": "online", …}` or
//!   `{"state": "offline", "reason": …}`;
//! - `P/health/heartbeat/{service}/{instance}`, QoS 0, every `heartbeat_interval`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgebus_proto::records::{
    Birth, EndpointRecord, Heartbeat, Identity, Lost, Registration, REASON_STOPPED,
};
use edgebus_proto::tree::Tree;
use tokio::task::JoinHandle;

use crate::bus::{Bus, BusError, PublishOptions};
use crate::stats::EndpointSnapshot;
use crate::wire::timestamp;

/// What a health check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// All is well.
    Ok,
    /// Working, but not fully (the reason says how).
    Degraded(String),
    /// Not working.
    Failed(String),
}

pub use edgebus_proto::records::Status;

type CheckFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Check> + Send>> + Send + Sync>;

/// Named health checks, run before every heartbeat.
#[derive(Clone, Default)]
pub struct Checks {
    checks: Vec<(String, CheckFn)>,
}

impl std::fmt::Debug for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.checks.iter().map(|(n, _)| n))
            .finish()
    }
}

impl Checks {
    /// Adds a check.
    pub fn add<F, Fut>(&mut self, name: &str, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Check> + Send + 'static,
    {
        let f: CheckFn = Arc::new(move || Box::pin(check()));
        self.checks.push((name.to_owned(), f));
    }

    /// Runs every check (each bounded by `timeout`, a check that takes longer has failed) and
    /// returns the overall status and each check's result.
    pub async fn run(&self, timeout: Duration) -> (Status, BTreeMap<String, String>) {
        let mut status = Status::Healthy;
        let mut out = BTreeMap::new();
        for (name, f) in &self.checks {
            let r = match tokio::time::timeout(timeout, f()).await {
                Ok(r) => r,
                Err(_) => Check::Failed(format!("check took longer than {timeout:?}")),
            };
            let text = match r {
                Check::Ok => "ok".to_owned(),
                Check::Degraded(why) => {
                    status = status.min(Status::Degraded);
                    format!("degraded: {why}")
                }
                Check::Failed(why) => {
                    status = status.min(Status::Unhealthy);
                    format!("failed: {why}")
                }
            };
            out.insert(name.clone(), text);
        }
        (status, out)
    }
}

/// The registration and heartbeat side of a running service.
pub(crate) struct Presence {
    pub(crate) identity: Identity,
    /// `P/system/discovery/{service}/{instance}`.
    registration: String,
    /// `P/health/heartbeat/{service}/{instance}`.
    heartbeat: String,
    birth: Mutex<Registration>,
    stopping: AtomicBool,
}

/// What a heartbeat reports of the service it belongs to: its uptime and its endpoints'
/// figures summed. `None` once the service is gone.
pub(crate) type Figures = Box<dyn Fn() -> Option<(Duration, EndpointSnapshot)> + Send + Sync>;

impl Presence {
    pub(crate) fn new(identity: Identity, prefix: &str, birth: Registration) -> Presence {
        let tree = Tree::new(prefix);
        Presence {
            registration: tree.registration(&identity.service, &identity.instance),
            heartbeat: tree.heartbeat(&identity.service, &identity.instance),
            identity,
            birth: Mutex::new(birth),
            stopping: AtomicBool::new(false),
        }
    }

    /// Publishes the birth (retained). Called from the connection task: never waits.
    pub(crate) fn publish_birth(&self, bus: &Bus) {
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        let birth = self.birth.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let payload = serde_json::to_vec(&birth).unwrap_or_default();
        let opts = PublishOptions {
            qos: 1,
            retain: true,
            properties: None,
        };
        if let Err(e) = bus.try_publish(&self.registration, payload, opts) {
            tracing::warn!(error = %e, "registration not published");
        }
    }

    /// Publishes the offline record of a clean stop.
    pub(crate) async fn publish_stopped(&self, bus: &Bus) {
        self.stopping.store(true, Ordering::Relaxed);
        let opts = PublishOptions {
            qos: 1,
            retain: true,
            properties: None,
        };
        let _ = bus
            .publish_json(
                &self.registration,
                &self.identity.offline(REASON_STOPPED),
                opts,
            )
            .await;
    }
}

/// The birth record.
pub(crate) fn birth_record(
    identity: &Identity,
    version: &str,
    spec: &crate::contract::ServiceSpec,
    prefix: &str,
    heartbeat: Duration,
) -> Registration {
    Registration::Online(Birth {
        service: identity.service.clone(),
        instance: identity.instance.clone(),
        incarnation: identity.incarnation,
        version: version.to_owned(),
        host: hostname(),
        pid: std::process::id(),
        started_at: timestamp(),
        description: spec.description.clone(),
        endpoints: spec
            .endpoints
            .iter()
            .map(|e| EndpointRecord {
                name: e.name.clone(),
                request_topic: e.request_topic(prefix, &spec.name),
            })
            .collect(),
        events: spec
            .events
            .iter()
            .map(|e| e.topic(prefix, &spec.name))
            .collect(),
        capabilities: spec.capabilities.clone(),
        tags: spec.tags.clone(),
        heartbeat_interval_ms: heartbeat.as_millis() as u64,
    })
}

/// The host's name, from gethostname(2): /proc/sys is hidden from hardened units
/// (`ProcSubset=pid`), the system call is not.
fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Registers the instance after every CONNACK, re-asserts the registration if something
/// overwrites it while the instance lives, and publishes heartbeats.
pub(crate) async fn start_presence(
    presence: Arc<Presence>,
    figures: Figures,
    bus: &Bus,
    every: Duration,
    checks: Checks,
) -> Result<JoinHandle<()>, BusError> {
    let mut own = bus.subscribe(&presence.registration, 1).await?;
    let hook_presence = presence.clone();
    bus.on_connect(move |bus| hook_presence.publish_birth(bus));
    let watch_presence = presence.clone();
    let watch_bus = bus.clone();
    let incarnation = presence.identity.incarnation;
    let watcher = tokio::spawn(async move {
        while let Some(msg) = own.recv().await {
            let record = serde_json::from_slice::<Registration>(&msg.payload).ok();
            let ours_online = record
                .as_ref()
                .is_some_and(|r| r.is_online() && r.incarnation() == incarnation);
            if !ours_online
                && watch_bus.is_connected()
                && !watch_presence
                    .stopping
                    .load(std::sync::atomic::Ordering::Relaxed)
            {
                let record = String::from_utf8_lossy(&msg.payload);
                tracing::info!(%record, "registration overwritten while running; re-registering");
                watch_presence.publish_birth(&watch_bus);
            }
        }
    });
    let bus = bus.clone();
    Ok(tokio::spawn(async move {
        let _watcher = AbortOnDrop(watcher);
        if every.is_zero() {
            return std::future::pending().await;
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        loop {
            tick.tick().await;
            let Some((uptime, stats)) = figures() else {
                return;
            };
            if !bus.is_connected() {
                continue;
            }
            let (status, results) = checks.run(every / 2).await;
            seq += 1;
            let bs = bus.stats();
            let circuits = bus.circuits();
            let beat = Heartbeat {
                service: presence.identity.service.clone(),
                instance: presence.identity.instance.clone(),
                incarnation: presence.identity.incarnation,
                seq,
                status,
                interval_ms: every.as_millis() as u64,
                uptime_s: (uptime.as_secs_f64() * 10.0).round() / 10.0,
                checks: results,
                stats,
                lost: (bs.skipped_at_broker + bs.dropped_incoming > 0).then_some(Lost {
                    at_broker: bs.skipped_at_broker,
                    in_buffers: bs.dropped_incoming,
                }),
                circuits: (!circuits.is_empty()).then(|| {
                    circuits
                        .iter()
                        .map(|(k, c)| (k.clone(), c.state.as_str().to_owned()))
                        .collect()
                }),
            };
            let _ = bus
                .publish_json(&presence.heartbeat, &beat, PublishOptions::qos(0))
                .await;
        }
    }))
}

pub(crate) struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
