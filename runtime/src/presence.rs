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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use edgebus_proto::records::{
    Birth, Departure, EndpointRecord, Registration, REASON_CONNECTION_LOST, REASON_STOPPED,
};
use edgebus_proto::tree::Tree;

use crate::bus::{Bus, PublishOptions, Will};
use crate::wire::{now_ms, timestamp};

/// Who an instance is. `incarnation` is new at every process start and never goes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Service name.
    pub service: String,
    /// Instance id (the MQTT client id).
    pub instance: String,
    /// Start time in Unix epoch milliseconds, made strictly increasing within the process.
    pub incarnation: u64,
}

static LAST_INCARNATION: AtomicU64 = AtomicU64::new(0);

impl Identity {
    /// A new identity with a fresh incarnation.
    pub fn new(service: &str, instance: &str) -> Identity {
        let now = now_ms();
        let prev = LAST_INCARNATION.fetch_max(now, Ordering::SeqCst);
        let incarnation = if now > prev {
            now
        } else {
            LAST_INCARNATION.fetch_add(1, Ordering::SeqCst) + 1
        };
        Identity {
            service: service.to_owned(),
            instance: instance.to_owned(),
            incarnation,
        }
    }

    /// `P/system/discovery/{service}/{instance}`.
    pub fn registration_topic(&self, prefix: &str) -> String {
        Tree::new(prefix).registration(&self.service, &self.instance)
    }

    /// `P/health/heartbeat/{service}/{instance}`.
    pub fn heartbeat_topic(&self, prefix: &str) -> String {
        Tree::new(prefix).heartbeat(&self.service, &self.instance)
    }

    /// The offline record with `reason`.
    pub fn offline(&self, reason: &str) -> Registration {
        Registration::Offline(Departure {
            service: self.service.clone(),
            instance: self.instance.clone(),
            incarnation: self.incarnation,
            reason: reason.to_owned(),
        })
    }

    /// The Last Will: the offline record, retained, QoS 1.
    pub fn will(&self, prefix: &str) -> Will {
        Will {
            topic: self.registration_topic(prefix),
            payload: Bytes::from(
                serde_json::to_vec(&self.offline(REASON_CONNECTION_LOST)).unwrap_or_default(),
            ),
            qos: 1,
            retain: true,
        }
    }
}

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
    pub(crate) prefix: String,
    pub(crate) birth: Mutex<Registration>,
    pub(crate) stopping: AtomicBool,
}

impl Presence {
    pub(crate) fn new(identity: Identity, prefix: &str, birth: Registration) -> Presence {
        Presence {
            identity,
            prefix: prefix.to_owned(),
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
        let topic = self.identity.registration_topic(&self.prefix);
        let payload = serde_json::to_vec(&birth).unwrap_or_default();
        let opts = PublishOptions {
            qos: 1,
            retain: true,
            properties: None,
        };
        if let Err(e) = bus.try_publish(&topic, payload, opts) {
            tracing::warn!(error = %e, "registration not published");
        }
    }

    /// Publishes the offline record of a clean stop.
    pub(crate) async fn publish_stopped(&self, bus: &Bus) {
        self.stopping.store(true, Ordering::Relaxed);
        let topic = self.identity.registration_topic(&self.prefix);
        let opts = PublishOptions {
            qos: 1,
            retain: true,
            properties: None,
        };
        let _ = bus
            .publish_json(&topic, &self.identity.offline(REASON_STOPPED), opts)
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
                request_topic: format!("{}/request", e.base_topic(prefix, &spec.name)),
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
