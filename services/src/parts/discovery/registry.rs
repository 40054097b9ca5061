//! The registry: every instance as its retained registration says, and the rules that turn
//! a record into an update (registered, offline, deregistered, recovered, expired). Time is
//! an argument of every method that depends on it, so the rules are tested without a clock.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use edgebus_runtime::proto::records::{
    DiscoveryEvent, DiscoveryList, DiscoveryUpdate, Registration, REASON_STOPPED,
};
use edgebus_runtime::wire::timestamp;
use serde::Deserialize;

/// One instance as the registry knows it.
#[derive(Debug, Clone)]
struct Entry {
    service: String,
    instance: String,
    incarnation: u64,
    online: bool,
    record: Registration,
    offline_since: Option<Instant>,
    topic: String,
}

/// One registration message: whose, where, what (`None`: the record was deleted), and
/// whether it is retained (state from before discovery subscribed).
#[derive(Debug, Clone)]
pub struct Change<'a> {
    /// The service.
    pub service: &'a str,
    /// The instance.
    pub instance: &'a str,
    /// The record's topic (deleted there at expiry).
    pub topic: &'a str,
    /// The record; `None` when it was deleted.
    pub record: Option<Registration>,
    /// A retained record.
    pub retained: bool,
}

impl Entry {
    fn update(&self, event: DiscoveryEvent, reason: &str) -> DiscoveryUpdate {
        DiscoveryUpdate {
            event,
            service: self.service.clone(),
            instance: self.instance.clone(),
            incarnation: self.incarnation,
            reason: reason.to_owned(),
            at: timestamp(),
        }
    }
}

/// The registry, shared by the message loop, the expiry tick and the list endpoint.
#[derive(Debug, Default)]
pub struct Registry {
    entries: DashMap<String, Entry>,
}

/// The capabilities and tags of an online record (an offline one has neither).
fn words(r: &Registration) -> (&[String], &[String]) {
    match r {
        Registration::Online(b) => (&b.capabilities, &b.tags),
        Registration::Offline(_) => (&[], &[]),
    }
}

impl Registry {
    /// Whether any instance of `service` is online.
    pub fn has_online(&self, service: &str) -> bool {
        self.entries
            .iter()
            .any(|e| e.service == service && e.online)
    }

    /// Why a request on `topic` to `service` has no responder, or `None` when an online
    /// instance serves it: no instance online, or none of the online ones registered an
    /// endpoint with that request topic. `edge/saga/{name}/request` is served by any online
    /// instance with the `saga` capability (the orchestrator answers an unknown saga itself).
    pub fn no_responder(&self, service: &str, topic: &str) -> Option<String> {
        if service == "saga" {
            let online = self
                .entries
                .iter()
                .any(|e| e.online && words(&e.record).0.iter().any(|c| c == "saga"));
            let name = topic.rsplit('/').nth(1).unwrap_or_default();
            return (!online).then(|| {
                format!("no orchestrator is online to run saga `{name}` (`edgebus orchestrator`, or `edgebus up` with [[saga]] in topics.toml)")
            });
        }
        let mut known = false;
        let mut online = false;
        let mut endpoints = BTreeSet::new();
        for e in self.entries.iter().filter(|e| e.service == service) {
            known = true;
            if !e.online {
                continue;
            }
            online = true;
            let Registration::Online(birth) = &e.record else {
                continue;
            };
            for ep in &birth.endpoints {
                if ep.request_topic == topic {
                    return None;
                }
                endpoints.insert(ep.name.clone());
            }
        }
        let endpoint = topic.rsplit('/').nth(1).unwrap_or_default();
        Some(match (known, online) {
            (false, _) => format!("no service `{service}` is registered"),
            (true, false) => format!("no instance of `{service}` is online"),
            (true, true) if endpoints.is_empty() => {
                format!("`{service}` serves no endpoints, so nothing answers `{endpoint}`")
            }
            (true, true) => format!(
                "`{service}` has no endpoint `{endpoint}` (its endpoints: {})",
                endpoints.into_iter().collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// Applies one registration message at `now`; returns the update its transition raises.
    pub fn apply(&self, change: Change<'_>, now: Instant) -> Option<DiscoveryUpdate> {
        let key = format!("{}/{}", change.service, change.instance);
        let Some(record) = change.record else {
            let (_, e) = self.entries.remove(&key)?;
            return Some(e.update(DiscoveryEvent::Expired, "record deleted"));
        };
        let online = record.is_online();
        let incarnation = record.incarnation();
        let reason = match &record {
            Registration::Online(_) => "registered".to_owned(),
            Registration::Offline(d) if d.reason.is_empty() => "offline".to_owned(),
            Registration::Offline(d) => d.reason.clone(),
        };
        let stopped = reason == REASON_STOPPED;
        let previous = self.entries.get(&key).map(|e| e.value().clone());
        let event = match &previous {
            // A retained record we had not seen: the state as it was before we started.
            None if change.retained => None,
            None if online => Some(DiscoveryEvent::Registered),
            None if stopped => Some(DiscoveryEvent::Deregistered),
            None => Some(DiscoveryEvent::Offline),
            // Older than what we know: a late will of a previous incarnation. Ignored.
            Some(p) if incarnation < p.incarnation => {
                tracing::debug!(%key, incarnation, known = p.incarnation, "stale registration ignored");
                return None;
            }
            // Nothing changed (a second will, a will after a clean stop, a repeated birth).
            Some(p) if p.online == online && incarnation == p.incarnation => return None,
            Some(p) if online && !p.online => Some(DiscoveryEvent::Recovered),
            Some(p) if online && p.online => Some(DiscoveryEvent::Registered),
            Some(_) if stopped => Some(DiscoveryEvent::Deregistered),
            Some(_) => Some(DiscoveryEvent::Offline),
        };
        // Offline since the first offline record, not the last: a second will does not
        // put off the expiry.
        let offline_since = match &previous {
            Some(p) if !p.online && !online => p.offline_since,
            _ => (!online).then_some(now),
        };
        let entry = Entry {
            service: change.service.to_owned(),
            instance: change.instance.to_owned(),
            incarnation,
            online,
            record,
            offline_since,
            topic: change.topic.to_owned(),
        };
        let update = event.map(|e| entry.update(e, &reason));
        self.entries.insert(key, entry);
        update
    }

    /// Forgets the instances offline for `after` or longer at `now`; returns the topic of
    /// each one's record (to delete) and its `expired` update.
    pub fn expire(&self, now: Instant, after: Duration) -> Vec<(String, DiscoveryUpdate)> {
        let due: Vec<String> = self
            .entries
            .iter()
            .filter(|e| {
                e.offline_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= after)
            })
            .map(|e| e.key().clone())
            .collect();
        due.into_iter()
            .filter_map(|key| self.entries.remove(&key))
            .map(|(_, e)| {
                let update = e.update(DiscoveryEvent::Expired, "offline past expire_after");
                (e.topic, update)
            })
            .collect()
    }

    /// Records matching the filters (`service`, `capability`, `tag`, `status`), sorted.
    pub fn list(&self, filter: &ListFilter) -> DiscoveryList {
        let mut out: Vec<(String, Registration)> = self
            .entries
            .iter()
            .filter(|e| filter.service.as_ref().map_or(true, |s| *s == e.service))
            .filter(|e| {
                let status = if e.online { "online" } else { "offline" };
                filter.status.as_ref().map_or(true, |s| s == status)
            })
            .filter(|e| {
                filter
                    .capability
                    .as_ref()
                    .map_or(true, |c| words(&e.record).0.contains(c))
            })
            .filter(|e| {
                filter
                    .tag
                    .as_ref()
                    .map_or(true, |t| words(&e.record).1.contains(t))
            })
            .map(|e| (e.key().clone(), e.record.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        let instances: Vec<Registration> = out.into_iter().map(|(_, v)| v).collect();
        DiscoveryList {
            count: instances.len(),
            instances,
        }
    }
}

/// The filters of a list request.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListFilter {
    /// Only this service.
    pub service: Option<String>,
    /// Only instances with this capability.
    pub capability: Option<String>,
    /// Only instances with this tag.
    pub tag: Option<String>,
    /// `online` or `offline`.
    pub status: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgebus_runtime::proto::records::{
        Birth, EndpointRecord, Identity, REASON_CONNECTION_LOST,
    };

    const MINUTE: Duration = Duration::from_secs(60);

    fn birth(service: &str, instance: &str, incarnation: u64) -> Registration {
        Registration::Online(Birth {
            service: service.into(),
            instance: instance.into(),
            incarnation,
            endpoints: vec![EndpointRecord {
                name: "put".into(),
                request_topic: format!("edge/{service}/put/request"),
            }],
            capabilities: vec!["store".into()],
            ..Birth::default()
        })
    }

    fn offline(instance: &str, incarnation: u64, reason: &str) -> Registration {
        Identity {
            service: "kv".into(),
            instance: instance.into(),
            incarnation,
        }
        .offline(reason)
    }

    fn change(instance: &str, record: Option<Registration>, retained: bool) -> Change<'_> {
        Change {
            service: "kv",
            instance,
            topic: "edge/system/discovery/kv/x",
            record,
            retained,
        }
    }

    fn event(u: Option<DiscoveryUpdate>) -> Option<(DiscoveryEvent, String)> {
        u.map(|u| (u.event, u.reason))
    }

    #[test]
    fn one_update_per_transition_of_an_incarnation() {
        let r = Registry::default();
        let t0 = Instant::now();
        let e = |rec, at| event(r.apply(change("a", Some(rec), false), at));
        assert_eq!(
            e(birth("kv", "a", 1), t0),
            Some((DiscoveryEvent::Registered, "registered".into()))
        );
        assert_eq!(e(birth("kv", "a", 1), t0), None, "a repeated birth");
        let lost = offline("a", 1, REASON_CONNECTION_LOST);
        assert_eq!(
            e(lost.clone(), t0),
            Some((DiscoveryEvent::Offline, REASON_CONNECTION_LOST.into()))
        );
        assert_eq!(e(lost, t0), None, "a second will");
        assert_eq!(
            e(birth("kv", "a", 2), t0),
            Some((DiscoveryEvent::Recovered, "registered".into()))
        );
        assert_eq!(
            e(offline("a", 1, REASON_CONNECTION_LOST), t0),
            None,
            "the late will of the previous incarnation"
        );
        assert_eq!(
            e(offline("a", 2, REASON_STOPPED), t0),
            Some((DiscoveryEvent::Deregistered, REASON_STOPPED.into()))
        );
        assert!(!r.has_online("kv"));
    }

    #[test]
    fn retained_records_fill_the_registry_quietly() {
        let r = Registry::default();
        let u = r.apply(change("a", Some(birth("kv", "a", 1)), true), Instant::now());
        assert_eq!(u, None);
        assert!(r.has_online("kv"));
    }

    #[test]
    fn offline_records_expire_after_their_first_offline_moment() {
        let r = Registry::default();
        let t0 = Instant::now();
        r.apply(change("a", Some(birth("kv", "a", 1)), false), t0);
        r.apply(
            change("a", Some(offline("a", 1, REASON_CONNECTION_LOST)), false),
            t0,
        );
        // A clean stop's record after the will: still offline since t0.
        r.apply(
            change("a", Some(offline("a", 1, REASON_STOPPED)), false),
            t0 + MINUTE / 2,
        );
        assert!(r
            .expire(t0 + MINUTE - Duration::from_millis(1), MINUTE)
            .is_empty());
        let gone = r.expire(t0 + MINUTE, MINUTE);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, "edge/system/discovery/kv/x");
        assert_eq!(gone[0].1.event, DiscoveryEvent::Expired);
        assert_eq!(r.list(&ListFilter::default()).count, 0);
        // Its deletion then comes back from the broker: nothing left to say.
        assert_eq!(r.apply(change("a", None, false), t0 + MINUTE), None);
    }

    #[test]
    fn online_instances_never_expire() {
        let r = Registry::default();
        let t0 = Instant::now();
        r.apply(change("a", Some(birth("kv", "a", 1)), false), t0);
        assert!(r.expire(t0 + 100 * MINUTE, MINUTE).is_empty());
    }

    #[test]
    fn no_responder_says_why() {
        let r = Registry::default();
        let t0 = Instant::now();
        let topic = "edge/kv/put/request";
        assert_eq!(
            r.no_responder("kv", topic).as_deref(),
            Some("no service `kv` is registered")
        );
        r.apply(change("a", Some(birth("kv", "a", 1)), false), t0);
        assert_eq!(r.no_responder("kv", topic), None);
        assert_eq!(
            r.no_responder("kv", "edge/kv/get/request").as_deref(),
            Some("`kv` has no endpoint `get` (its endpoints: put)")
        );
        r.apply(
            change("a", Some(offline("a", 1, REASON_CONNECTION_LOST)), false),
            t0,
        );
        assert_eq!(
            r.no_responder("kv", topic).as_deref(),
            Some("no instance of `kv` is online")
        );
        assert!(r
            .no_responder("saga", "edge/saga/order/request")
            .is_some_and(|m| m.contains("no orchestrator")));
    }

    #[test]
    fn the_list_filters_and_counts() {
        let r = Registry::default();
        let t0 = Instant::now();
        r.apply(change("b", Some(birth("kv", "b", 1)), false), t0);
        r.apply(change("a", Some(birth("kv", "a", 1)), false), t0);
        r.apply(
            change("a", Some(offline("a", 1, REASON_STOPPED)), false),
            t0,
        );
        let all = r.list(&ListFilter::default());
        assert_eq!(all.count, 2);
        let online = r.list(&ListFilter {
            status: Some("online".into()),
            ..ListFilter::default()
        });
        assert_eq!(online.count, 1);
        let store = r.list(&ListFilter {
            capability: Some("store".into()),
            ..ListFilter::default()
        });
        // An offline record has no capabilities.
        assert_eq!(store.count, 1);
        let json = serde_json::to_value(&all).unwrap();
        assert_eq!(json["count"], 2);
        assert_eq!(json["instances"][0]["instance"], "a");
    }
}
