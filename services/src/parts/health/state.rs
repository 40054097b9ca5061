//! The health monitor's decisions, apart from its I/O: what a heartbeat, a registration
//! record or the passing of time does to each instance's status. Every method takes the
//! time as an argument, so the rules are tested without a clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edgebus_runtime::presence::Status;
use edgebus_runtime::records::{
    HealthStatus, HealthSummary, Heartbeat, InstanceStatus, Registration,
};
use edgebus_runtime::wire::timestamp;

/// One instance as the monitor sees it.
#[derive(Debug, Clone)]
struct Inst {
    incarnation: u64,
    status: Status,
    last_seen: Instant,
    last_seen_at: String,
    interval: Duration,
    beats: u64,
    /// A new status reported, and how many heartbeats in a row reported it.
    candidate: Option<(Status, u32)>,
    /// The missed-heartbeats alert was given for this silence.
    missed: bool,
}

impl Inst {
    fn new(incarnation: u64, status: Status, interval: Duration, now: Instant) -> Inst {
        Inst {
            incarnation,
            status,
            last_seen: now,
            last_seen_at: timestamp(),
            interval,
            beats: 0,
            candidate: None,
            missed: false,
        }
    }
}

/// A change of an instance's status, to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The service.
    pub service: String,
    /// The instance.
    pub instance: String,
    /// The status before.
    pub from: Status,
    /// The status now.
    pub to: Status,
    /// Why (`heartbeat`, `missed 3 heartbeats`, `connection lost`, a failing check…).
    pub reason: String,
}

impl Transition {
    fn new(service: &str, instance: &str, from: Status, to: Status, reason: &str) -> Self {
        Transition {
            service: service.to_owned(),
            instance: instance.to_owned(),
            from,
            to,
            reason: reason.to_owned(),
        }
    }
}

/// What a registration record asks of the monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Announce these transitions (an alert each, then the status of each service touched).
    Announce(Vec<Transition>),
    /// Publish the service's status record again, without an alert (a retained record from
    /// before the monitor started; an offline instance that expired while others live).
    Republish(String),
    /// Announce these transitions, then forget the service: its last instance expired.
    Forget(String, Vec<Transition>),
}

/// Every instance's status, the status last published per service, and the rules.
#[derive(Debug, Default)]
pub struct Health {
    services: BTreeMap<String, BTreeMap<String, Inst>>,
    service_status: BTreeMap<String, (Status, String)>,
    /// Heartbeat intervals of silence before an instance is `unhealthy`.
    misses: u32,
    /// Heartbeats in a row that must report a new status before it is taken.
    confirm: u32,
}

impl Health {
    /// The rules of `[health]`: `heartbeat_misses` and `confirm_beats` (each at least 1).
    pub fn new(heartbeat_misses: u32, confirm_beats: u32) -> Health {
        Health {
            misses: heartbeat_misses.max(1),
            confirm: confirm_beats.max(1),
            ..Health::default()
        }
    }

    /// Loads a retained status record (the monitor's own, from before a restart) without
    /// alerting: what happened while it was away is then compared with what it last said.
    pub fn load_status(&mut self, record: HealthStatus, now: Instant) {
        self.service_status
            .entry(record.service.clone())
            .or_insert((record.status, record.since.clone()));
        for i in record.instances {
            self.services
                .entry(record.service.clone())
                .or_default()
                .entry(i.instance)
                .or_insert(Inst {
                    incarnation: i.incarnation,
                    status: i.status,
                    last_seen: now,
                    last_seen_at: i.last_seen,
                    interval: Duration::from_secs(1),
                    beats: 1,
                    candidate: None,
                    missed: false,
                });
        }
    }

    /// A heartbeat arrived at `now`. The first heartbeat of an incarnation is taken at once;
    /// a later change of status after `confirm_beats` heartbeats in a row report it.
    pub fn heartbeat(&mut self, beat: &Heartbeat, now: Instant) -> Option<Transition> {
        let (service, instance) = (beat.service.as_str(), beat.instance.as_str());
        let reported = beat.status;
        let interval = Duration::from_millis(beat.interval_ms.max(10));
        let insts = self.services.entry(service.to_owned()).or_default();
        let inst = insts
            .entry(instance.to_owned())
            .or_insert_with(|| Inst::new(beat.incarnation, Status::Offline, interval, now));
        if beat.incarnation < inst.incarnation {
            return None;
        }
        if beat.incarnation > inst.incarnation {
            inst.incarnation = beat.incarnation;
            inst.beats = 0;
            inst.candidate = None;
        }
        inst.last_seen = now;
        inst.last_seen_at = timestamp();
        inst.interval = interval;
        inst.beats += 1;
        inst.missed = false;
        if reported == inst.status {
            inst.candidate = None;
            return None;
        }
        let from = inst.status;
        if inst.beats == 1 || inst.status == Status::Offline {
            inst.status = reported;
            inst.candidate = None;
            return Some(Transition::new(
                service,
                instance,
                from,
                reported,
                "heartbeat",
            ));
        }
        let n = match inst.candidate {
            Some((s, n)) if s == reported => n + 1,
            _ => 1,
        };
        if n < self.confirm {
            inst.candidate = Some((reported, n));
            return None;
        }
        inst.status = reported;
        inst.candidate = None;
        let why = beat
            .checks
            .iter()
            .find(|(_, r)| r.as_str() != "ok")
            .map(|(k, r)| format!("{k}: {r}"))
            .unwrap_or_else(|| "heartbeat".into());
        Some(Transition::new(service, instance, from, reported, &why))
    }

    /// A registration record of `service`/`instance` arrived at `now`: `None` when it was
    /// deleted (the registry expired it), `retained` when it is state from before the
    /// monitor subscribed.
    pub fn registration(
        &mut self,
        service: &str,
        instance: &str,
        record: Option<&Registration>,
        retained: bool,
        now: Instant,
    ) -> Effect {
        let Some(record) = record else {
            return self.expired(service, instance);
        };
        let incarnation = record.incarnation();
        let online = record.is_online();
        let interval = Duration::from_millis(match record {
            Registration::Online(b) => b.heartbeat_interval_ms.max(10),
            Registration::Offline(_) => 1000,
        });
        let insts = self.services.entry(service.to_owned()).or_default();
        let Some(i) = insts.get_mut(instance) else {
            let status = if online {
                Status::Healthy
            } else {
                Status::Offline
            };
            insts.insert(
                instance.to_owned(),
                Inst::new(incarnation, status, interval, now),
            );
            if online && !retained {
                return Effect::Announce(vec![Transition::new(
                    service,
                    instance,
                    Status::Offline,
                    Status::Healthy,
                    "registered",
                )]);
            }
            return Effect::Republish(service.to_owned());
        };
        if incarnation < i.incarnation {
            return Effect::Announce(Vec::new());
        }
        if !online {
            if i.status == Status::Offline {
                return Effect::Announce(Vec::new());
            }
            let reason = match record {
                Registration::Offline(d) if !d.reason.is_empty() => d.reason.as_str(),
                _ => "offline",
            };
            let t = Transition::new(service, instance, i.status, Status::Offline, reason);
            i.status = Status::Offline;
            i.incarnation = incarnation;
            i.candidate = None;
            return Effect::Announce(vec![t]);
        }
        // A birth is a sign of life as good as a heartbeat.
        i.last_seen = now;
        if incarnation > i.incarnation {
            i.incarnation = incarnation;
            i.beats = 0;
            i.missed = false;
        }
        i.interval = interval;
        Effect::Announce(Vec::new())
    }

    /// The registry deleted the instance's record: it is forgotten, and so is its service
    /// when it was the last.
    fn expired(&mut self, service: &str, instance: &str) -> Effect {
        let Some(insts) = self.services.get_mut(service) else {
            return Effect::Announce(Vec::new());
        };
        let mut transitions = Vec::new();
        if let Some(i) = insts.remove(instance) {
            if i.status != Status::Offline {
                transitions.push(Transition::new(
                    service,
                    instance,
                    i.status,
                    Status::Offline,
                    "expired",
                ));
            }
        }
        if insts.is_empty() {
            self.services.remove(service);
            self.service_status.remove(service);
            return Effect::Forget(service.to_owned(), transitions);
        }
        if transitions.is_empty() {
            // An offline instance expired while others live: the record must stop listing it.
            return Effect::Republish(service.to_owned());
        }
        Effect::Announce(transitions)
    }

    /// Instances silent for `heartbeat_misses` of their intervals at `now` become
    /// `unhealthy`, once per silence.
    pub fn check_misses(&mut self, now: Instant) -> Vec<Transition> {
        let misses = self.misses;
        let mut transitions = Vec::new();
        for (service, insts) in self.services.iter_mut() {
            for (name, i) in insts.iter_mut() {
                if i.status == Status::Offline || i.missed {
                    continue;
                }
                if now.saturating_duration_since(i.last_seen) > i.interval * misses {
                    i.missed = true;
                    i.candidate = None;
                    if i.status != Status::Unhealthy {
                        transitions.push(Transition::new(
                            service,
                            name,
                            i.status,
                            Status::Unhealthy,
                            &format!("missed {misses} heartbeats"),
                        ));
                        i.status = Status::Unhealthy;
                    }
                }
            }
        }
        transitions
    }

    /// The monitor's own connection came back at `now`: heartbeats could not reach it while
    /// it was down, which is no instance's fault, so each gets a fresh window.
    pub fn restart_windows(&mut self, now: Instant) {
        for i in self.services.values_mut().flat_map(|m| m.values_mut()) {
            i.last_seen = now;
        }
    }

    /// The services the monitor knows.
    pub fn services(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    /// The status record of `service` (as healthy as its best instance), and whether its
    /// status changed since the last record (then the summary changed too).
    pub fn status_record(&mut self, service: &str) -> Option<(HealthStatus, bool)> {
        let insts = self.services.get(service)?;
        let best = insts
            .values()
            .map(|i| i.status)
            .max()
            .unwrap_or(Status::Offline);
        let instances = insts
            .iter()
            .map(|(n, i)| InstanceStatus {
                instance: n.clone(),
                status: i.status,
                last_seen: i.last_seen_at.clone(),
                incarnation: i.incarnation,
            })
            .collect();
        let (since, changed) = match self.service_status.get(service) {
            Some((s, since)) if *s == best => (since.clone(), false),
            _ => (timestamp(), true),
        };
        self.service_status
            .insert(service.to_owned(), (best, since.clone()));
        let record = HealthStatus {
            service: service.to_owned(),
            status: best,
            since,
            instances,
        };
        Some((record, changed))
    }

    /// The summary: as healthy as the worst service.
    pub fn summary(&self) -> HealthSummary {
        let worst = self
            .service_status
            .values()
            .map(|(s, _)| *s)
            .min()
            .unwrap_or(Status::Healthy);
        let mut counts: BTreeMap<Status, u32> = BTreeMap::new();
        let services = self
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgebus_runtime::records::{Birth, Identity, REASON_CONNECTION_LOST};

    const SECOND: Duration = Duration::from_secs(1);

    fn beat(instance: &str, incarnation: u64, status: Status) -> Heartbeat {
        Heartbeat {
            service: "svc".into(),
            instance: instance.into(),
            incarnation,
            seq: 1,
            status,
            interval_ms: 1000,
            uptime_s: 0.0,
            checks: BTreeMap::from([("disk".to_owned(), "failed: full".to_owned())]),
            stats: Default::default(),
            lost: None,
            circuits: None,
        }
    }

    fn birth(instance: &str, incarnation: u64) -> Registration {
        Registration::Online(Birth {
            service: "svc".into(),
            instance: instance.into(),
            incarnation,
            heartbeat_interval_ms: 1000,
            ..Birth::default()
        })
    }

    fn lost(instance: &str, incarnation: u64) -> Registration {
        Identity {
            service: "svc".into(),
            instance: instance.into(),
            incarnation,
        }
        .offline(REASON_CONNECTION_LOST)
    }

    fn statuses(t: &[Transition]) -> Vec<(Status, Status, &str)> {
        t.iter()
            .map(|t| (t.from, t.to, t.reason.as_str()))
            .collect()
    }

    #[test]
    fn a_change_is_taken_after_confirm_beats_in_a_row() {
        let t0 = Instant::now();
        let mut h = Health::new(3, 2);
        let first = h.heartbeat(&beat("a", 1, Status::Healthy), t0).unwrap();
        assert_eq!((first.from, first.to), (Status::Offline, Status::Healthy));
        // One degraded beat between healthy ones is a flap: no alert.
        assert_eq!(
            h.heartbeat(&beat("a", 1, Status::Degraded), t0 + SECOND),
            None
        );
        assert_eq!(
            h.heartbeat(&beat("a", 1, Status::Healthy), t0 + 2 * SECOND),
            None
        );
        assert_eq!(
            h.heartbeat(&beat("a", 1, Status::Degraded), t0 + 3 * SECOND),
            None
        );
        let t = h
            .heartbeat(&beat("a", 1, Status::Degraded), t0 + 4 * SECOND)
            .expect("two in a row");
        assert_eq!(
            statuses(&[t]),
            [(Status::Healthy, Status::Degraded, "disk: failed: full")]
        );
    }

    #[test]
    fn the_first_beat_of_a_new_incarnation_is_taken_at_once_and_an_old_one_is_ignored() {
        let t0 = Instant::now();
        let mut h = Health::new(3, 3);
        h.heartbeat(&beat("a", 5, Status::Healthy), t0);
        let t = h
            .heartbeat(&beat("a", 6, Status::Unhealthy), t0 + SECOND)
            .expect("a restart's first beat");
        assert_eq!(t.to, Status::Unhealthy);
        assert_eq!(
            h.heartbeat(&beat("a", 5, Status::Healthy), t0 + SECOND),
            None
        );
        assert_eq!(
            h.status_record("svc").unwrap().0.instances[0].incarnation,
            6
        );
    }

    #[test]
    fn silence_of_heartbeat_misses_intervals_is_unhealthy_once() {
        let t0 = Instant::now();
        let mut h = Health::new(3, 2);
        h.heartbeat(&beat("a", 1, Status::Healthy), t0);
        // Exactly three intervals is not yet a miss; just past it is.
        assert!(h.check_misses(t0 + 3 * SECOND).is_empty());
        let t = h.check_misses(t0 + 3 * SECOND + Duration::from_millis(1));
        assert_eq!(
            statuses(&t),
            [(Status::Healthy, Status::Unhealthy, "missed 3 heartbeats")]
        );
        assert!(
            h.check_misses(t0 + 10 * SECOND).is_empty(),
            "once per silence"
        );
        // A heartbeat after the silence: the instance says it is healthy, and is believed
        // after confirm_beats.
        let now = t0 + 11 * SECOND;
        assert_eq!(h.heartbeat(&beat("a", 1, Status::Healthy), now), None);
        let back = h.heartbeat(&beat("a", 1, Status::Healthy), now + SECOND);
        assert_eq!(back.map(|t| t.to), Some(Status::Healthy));
    }

    #[test]
    fn a_fresh_window_after_the_monitors_own_outage() {
        let t0 = Instant::now();
        let mut h = Health::new(3, 2);
        h.heartbeat(&beat("a", 1, Status::Healthy), t0);
        h.restart_windows(t0 + 10 * SECOND);
        assert!(h.check_misses(t0 + 12 * SECOND).is_empty());
        assert_eq!(h.check_misses(t0 + 14 * SECOND).len(), 1);
    }

    #[test]
    fn the_will_is_offline_at_once_and_a_birth_counts_as_a_sign_of_life() {
        let t0 = Instant::now();
        let mut h = Health::new(3, 2);
        let e = h.registration("svc", "a", Some(&birth("a", 1)), false, t0);
        let Effect::Announce(t) = e else {
            panic!("{e:?}")
        };
        assert_eq!(
            statuses(&t),
            [(Status::Offline, Status::Healthy, "registered")]
        );
        // A birth again (a reconnect) restarts the window.
        h.registration("svc", "a", Some(&birth("a", 1)), false, t0 + 2 * SECOND);
        assert!(h.check_misses(t0 + 4 * SECOND).is_empty());
        let e = h.registration("svc", "a", Some(&lost("a", 1)), false, t0 + 5 * SECOND);
        let Effect::Announce(t) = e else {
            panic!("{e:?}")
        };
        assert_eq!(
            statuses(&t),
            [(Status::Healthy, Status::Offline, "connection lost")]
        );
        // Offline instances are not checked for silence.
        assert!(h.check_misses(t0 + 60 * SECOND).is_empty());
        // The will of an older incarnation changes nothing.
        h.registration("svc", "a", Some(&birth("a", 2)), false, t0 + 61 * SECOND);
        h.heartbeat(&beat("a", 2, Status::Healthy), t0 + 61 * SECOND);
        let e = h.registration("svc", "a", Some(&lost("a", 1)), false, t0 + 62 * SECOND);
        assert_eq!(e, Effect::Announce(Vec::new()));
    }

    #[test]
    fn retained_records_are_loaded_quietly() {
        let t0 = Instant::now();
        let mut h = Health::new(3, 2);
        let e = h.registration("svc", "a", Some(&birth("a", 1)), true, t0);
        assert_eq!(e, Effect::Republish("svc".into()));
    }

    #[test]
    fn expiry_forgets_the_instance_and_then_the_service() {
        let t0 = Instant::now();
        let mut h = Health::new(3, 2);
        h.registration("svc", "a", Some(&birth("a", 1)), false, t0);
        h.registration("svc", "b", Some(&birth("b", 1)), false, t0);
        h.registration("svc", "b", Some(&lost("b", 1)), false, t0);
        // b was offline already: the record is republished without it, no alert.
        assert_eq!(
            h.registration("svc", "b", None, false, t0),
            Effect::Republish("svc".into())
        );
        assert_eq!(h.status_record("svc").unwrap().0.instances.len(), 1);
        let e = h.registration("svc", "a", None, false, t0);
        let Effect::Forget(service, t) = e else {
            panic!("{e:?}")
        };
        assert_eq!(service, "svc");
        assert_eq!(
            statuses(&t),
            [(Status::Healthy, Status::Offline, "expired")]
        );
        assert!(h.status_record("svc").is_none());
        assert!(h.summary().services.is_empty());
    }

    #[test]
    fn a_service_is_as_healthy_as_its_best_instance_and_the_summary_as_its_worst_service() {
        let t0 = Instant::now();
        let mut h = Health::new(3, 1);
        h.heartbeat(&beat("a", 1, Status::Healthy), t0);
        h.heartbeat(&beat("b", 1, Status::Unhealthy), t0);
        let (record, changed) = h.status_record("svc").unwrap();
        assert!(changed);
        assert_eq!(record.status, Status::Healthy);
        let mut other = beat("c", 1, Status::Degraded);
        other.service = "other".into();
        h.heartbeat(&other, t0);
        h.status_record("other");
        assert_eq!(h.summary().status, Status::Degraded);
        // The same status again is no change.
        assert!(!h.status_record("svc").unwrap().1);
    }
}
