//! The bus's own records, typed: what the runtime, discovery, the health monitor, the broker
//! and the command line write and read on the topics of [`crate::tree`]. Each writer builds
//! one of these and each reader parses one, so a renamed field is a compile error, not a
//! silent default. Fields a record may lack (older writers, other implementations) have
//! serde defaults; a field of the wrong type makes the whole record unreadable, and readers
//! say so.
//!
//! The shapes are the contract's (`CONTRACT.md`): registration, heartbeat, health status,
//! summary and alert, discovery update, lag report, dead letter.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::wire::ErrorBody;

/// The status of an instance or a service, worst first (so `max` is the best).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Connection gone, or expired.
    Offline,
    /// Failing, or silent for too long.
    Unhealthy,
    /// Working, but not fully.
    Degraded,
    /// All checks pass.
    Healthy,
}

impl Status {
    /// The status as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Offline => "offline",
            Status::Unhealthy => "unhealthy",
            Status::Degraded => "degraded",
            Status::Healthy => "healthy",
        }
    }

    /// The status named `s` on the wire.
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "offline" => Some(Status::Offline),
            "unhealthy" => Some(Status::Unhealthy),
            "degraded" => Some(Status::Degraded),
            "healthy" => Some(Status::Healthy),
            _ => None,
        }
    }
}

/// The retained registration record, `P/system/discovery/{service}/{instance}`: a birth, or
/// an offline record (the Last Will, or a clean stop's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Registration {
    /// The instance is up: published after every CONNACK.
    Online(Birth),
    /// The instance is gone.
    Offline(Departure),
}

impl Registration {
    /// The service.
    pub fn service(&self) -> &str {
        match self {
            Registration::Online(b) => &b.service,
            Registration::Offline(d) => &d.service,
        }
    }

    /// The instance.
    pub fn instance(&self) -> &str {
        match self {
            Registration::Online(b) => &b.instance,
            Registration::Offline(d) => &d.instance,
        }
    }

    /// The incarnation (new at every process start, never going back).
    pub fn incarnation(&self) -> u64 {
        match self {
            Registration::Online(b) => b.incarnation,
            Registration::Offline(d) => d.incarnation,
        }
    }

    /// Whether it is a birth.
    pub fn is_online(&self) -> bool {
        matches!(self, Registration::Online(_))
    }
}

/// A birth: who the instance is and what it serves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Birth {
    /// The service.
    pub service: String,
    /// The instance id (its MQTT client id).
    pub instance: String,
    /// New at every process start (Unix epoch milliseconds), never going back.
    pub incarnation: u64,
    /// The service's version.
    #[serde(default)]
    pub version: String,
    /// The host it runs on.
    #[serde(default)]
    pub host: String,
    /// Its process id.
    #[serde(default)]
    pub pid: u32,
    /// When the process started (RFC 3339).
    #[serde(default)]
    pub started_at: String,
    /// A one-line description.
    #[serde(default)]
    pub description: String,
    /// Its endpoints and their request topics.
    #[serde(default)]
    pub endpoints: Vec<EndpointRecord>,
    /// The topics of its events.
    #[serde(default)]
    pub events: Vec<String>,
    /// Capability words.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Its heartbeat interval, milliseconds.
    #[serde(default = "one_second_ms")]
    pub heartbeat_interval_ms: u64,
}

fn one_second_ms() -> u64 {
    1000
}

/// One endpoint of a birth.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// The endpoint's name.
    pub name: String,
    /// Where its requests go.
    pub request_topic: String,
}

/// An offline record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departure {
    /// The service.
    pub service: String,
    /// The instance id.
    pub instance: String,
    /// The incarnation that went away.
    pub incarnation: u64,
    /// `connection lost` (the Last Will) or `stopped` (a clean stop).
    #[serde(default)]
    pub reason: String,
}

/// The reason of a clean stop's offline record.
pub const REASON_STOPPED: &str = "stopped";
/// The reason of the Last Will's offline record.
pub const REASON_CONNECTION_LOST: &str = "connection lost";

/// Who an instance is. `incarnation` is new at every process start and never goes back, so
/// a reader can tell a restarted instance from the one before it.
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
        let now = crate::wire::now_ms();
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

    /// The offline record with `reason` ([`REASON_STOPPED`], [`REASON_CONNECTION_LOST`]).
    pub fn offline(&self, reason: &str) -> Registration {
        Registration::Offline(Departure {
            service: self.service.clone(),
            instance: self.instance.clone(),
            incarnation: self.incarnation,
            reason: reason.to_owned(),
        })
    }
}

/// A heartbeat, `P/health/heartbeat/{service}/{instance}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The service.
    pub service: String,
    /// The instance id.
    pub instance: String,
    /// The incarnation.
    #[serde(default)]
    pub incarnation: u64,
    /// Counts up from 1 within an incarnation.
    #[serde(default)]
    pub seq: u64,
    /// What the instance's own checks say (`offline` is never sent).
    pub status: Status,
    /// The interval to the next heartbeat, milliseconds.
    #[serde(default = "one_second_ms")]
    pub interval_ms: u64,
    /// Seconds since the service started, to 0.1 s.
    #[serde(default)]
    pub uptime_s: f64,
    /// Each check's result: `ok`, or what is wrong.
    #[serde(default)]
    pub checks: BTreeMap<String, String>,
    /// Its endpoints' figures, summed.
    #[serde(default)]
    pub stats: EndpointFigures,
    /// Messages lost on the way to it, when any were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<Lost>,
    /// The state of each circuit breaker of its calls, when it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuits: Option<BTreeMap<String, String>>,
}

/// Messages a connection lost, in a heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    /// Dropped by the broker (its lag reports).
    pub at_broker: u64,
    /// Dropped from the client's own full buffers.
    pub in_buffers: u64,
}

/// Figures of one endpoint, or of all of a service's endpoints summed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointFigures {
    /// Requests answered (successes and errors).
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Requests being handled now.
    pub inflight: u64,
    /// Requests refused because the endpoint was saturated.
    pub rejected: u64,
    /// Duplicate requests answered with the first copy's reply, without running again.
    pub duplicates: u64,
    /// Requests answered `RATE_LIMITED`.
    pub rate_limited: u64,
    /// Median handling time, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile handling time, milliseconds.
    pub p99_ms: f64,
}

impl EndpointFigures {
    /// The sum of several endpoints' figures; the percentiles are the worst endpoint's.
    pub fn total(all: impl IntoIterator<Item = EndpointFigures>) -> EndpointFigures {
        let mut t = EndpointFigures::default();
        for s in all {
            t.requests += s.requests;
            t.errors += s.errors;
            t.inflight += s.inflight;
            t.rejected += s.rejected;
            t.duplicates += s.duplicates;
            t.rate_limited += s.rate_limited;
            t.p50_ms = t.p50_ms.max(s.p50_ms);
            t.p99_ms = t.p99_ms.max(s.p99_ms);
        }
        t
    }
}

/// `P/health/status/{service}`, retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStatus {
    /// The service.
    pub service: String,
    /// Its best instance's status.
    pub status: Status,
    /// When the service's status last changed.
    #[serde(default)]
    pub since: String,
    /// Each instance.
    #[serde(default)]
    pub instances: Vec<InstanceStatus>,
}

/// One instance in a [`HealthStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The instance id.
    pub instance: String,
    /// Its status.
    pub status: Status,
    /// The last heartbeat (or birth) the monitor had when it published the record.
    #[serde(default)]
    pub last_seen: String,
    /// Its incarnation.
    #[serde(default)]
    pub incarnation: u64,
}

/// `P/health/summary`, retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSummary {
    /// The worst service's status.
    pub status: Status,
    /// Each service's status.
    #[serde(default)]
    pub services: BTreeMap<String, Status>,
    /// How many services have each status.
    #[serde(default)]
    pub counts: BTreeMap<Status, u32>,
    /// When it was made.
    #[serde(default)]
    pub at: String,
}

/// `P/health/alert`: one instance's status changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthAlert {
    /// The service.
    pub service: String,
    /// The instance id.
    pub instance: String,
    /// The status before.
    pub from: Status,
    /// The status now.
    pub to: Status,
    /// Why (`heartbeat`, `missed 3 heartbeats`, `connection lost`, a check's message …).
    #[serde(default)]
    pub reason: String,
    /// When.
    #[serde(default)]
    pub at: String,
}

/// What happened to an instance, in a [`DiscoveryUpdate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryEvent {
    /// A new incarnation came online.
    Registered,
    /// It lost its connection (its Last Will).
    Offline,
    /// It stopped cleanly.
    Deregistered,
    /// The same incarnation came back online.
    Recovered,
    /// Offline past `expire_after`: its record was deleted.
    Expired,
}

impl DiscoveryEvent {
    /// The event as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            DiscoveryEvent::Registered => "registered",
            DiscoveryEvent::Offline => "offline",
            DiscoveryEvent::Deregistered => "deregistered",
            DiscoveryEvent::Recovered => "recovered",
            DiscoveryEvent::Expired => "expired",
        }
    }
}

/// `P/system/discovery/update`: one transition of one incarnation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveryUpdate {
    /// What happened.
    pub event: DiscoveryEvent,
    /// The service.
    pub service: String,
    /// The instance id.
    pub instance: String,
    /// The incarnation.
    pub incarnation: u64,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// When.
    #[serde(default)]
    pub at: String,
}

/// The reply of `P/system/discovery/list`: the instances that match the request's filters,
/// sorted by service and instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryList {
    /// How many.
    pub count: usize,
    /// Their registration records, online and offline.
    pub instances: Vec<Registration>,
}

/// `P/system/broker/lag`: messages the broker dropped for one subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagReport {
    /// The subscriber's client id.
    pub client_id: String,
    /// The topic of the first message lost.
    pub filter: String,
    /// How many.
    pub lost: u64,
    /// When.
    #[serde(default)]
    pub at: String,
}

/// `P/system/deadletter/{service}`: a message a service could not decode or handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The service.
    pub service: String,
    /// The instance that gave up.
    pub instance: String,
    /// Where the message came.
    pub topic: String,
    /// The payload, when it is UTF-8 (cut at [`DeadLetter::KEEP`] bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The payload in base64, when it is not UTF-8 (cut the same way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// The whole payload's size.
    pub payload_bytes: usize,
    /// Present and true when the payload was cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Why it was given up.
    pub error: ErrorBody,
    /// When.
    pub time: String,
}

impl DeadLetter {
    /// How much of a payload a dead letter keeps.
    pub const KEEP: usize = 64 * 1024;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_contracts_examples_read_and_write_back() {
        let birth = json!({"state": "online", "service": "stt", "instance": "stt-1a2b",
            "incarnation": 1732270200123u64, "version": "0.3.1", "host": "pi-kitchen", "pid": 812,
            "started_at": "t", "description": "",
            "endpoints": [{"name": "transcribe", "request_topic": "edge/stt/transcribe/request"}],
            "events": ["edge/stt/events/#"], "capabilities": ["de", "en"], "tags": ["audio"],
            "heartbeat_interval_ms": 1000});
        let r: Registration = serde_json::from_value(birth.clone()).expect("birth");
        assert!(r.is_online());
        assert_eq!(serde_json::to_value(&r).expect("json"), birth);
        let will = json!({"state": "offline", "service": "stt", "instance": "stt-1a2b",
            "incarnation": 1, "reason": "connection lost"});
        let r: Registration = serde_json::from_value(will.clone()).expect("will");
        assert_eq!(r.incarnation(), 1);
        assert_eq!(serde_json::to_value(&r).expect("json"), will);

        let beat = json!({"service": "stt", "instance": "stt-1a2b", "incarnation": 17, "seq": 42,
            "status": "healthy", "interval_ms": 1000, "uptime_s": 42.1,
            "checks": {"model_loaded": "ok"}, "stats": {"requests": 1200, "errors": 3,
            "inflight": 2, "rejected": 0, "duplicates": 0, "rate_limited": 0,
            "p50_ms": 0.4, "p99_ms": 2.1}});
        let h: Heartbeat = serde_json::from_value(beat.clone()).expect("heartbeat");
        assert_eq!(h.stats.requests, 1200);
        assert_eq!(serde_json::to_value(&h).expect("json"), beat);

        let summary = json!({"status": "degraded", "services": {"stt": "healthy", "kv": "degraded"},
            "counts": {"healthy": 1, "degraded": 1}, "at": "t"});
        let s: HealthSummary = serde_json::from_value(summary.clone()).expect("summary");
        assert_eq!(serde_json::to_value(&s).expect("json"), summary);

        let update = json!({"event": "registered", "service": "a", "instance": "a-1",
            "incarnation": 3, "reason": "birth", "at": "t"});
        let u: DiscoveryUpdate = serde_json::from_value(update.clone()).expect("update");
        assert_eq!(u.event, DiscoveryEvent::Registered);
        assert_eq!(serde_json::to_value(&u).expect("json"), update);
    }

    #[test]
    fn a_wrong_field_type_is_an_error_not_a_default() {
        let beat = json!({"service": "a", "instance": "a-1", "status": "fine"});
        assert!(serde_json::from_value::<Heartbeat>(beat).is_err());
        let reg = json!({"state": "online", "service": "a", "instance": "a-1", "incarnation": "x"});
        assert!(serde_json::from_value::<Registration>(reg).is_err());
    }
}
