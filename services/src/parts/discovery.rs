//! The discovery service: a registry of service instances built from their retained
//! registrations alone, one `P/system/discovery/update` event per transition per incarnation,
//! offline records deleted after `expire_after`, fast `NO_RESPONDERS`, and the
//! `P/system/discovery/list` endpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use edgebus_runtime::bus::{Bus, Message, PublishOptions};
use edgebus_runtime::contract::{EndpointSpec, RESERVED_SERVICE_NAMES};
use edgebus_runtime::proto::records::{
    DiscoveryEvent, DiscoveryUpdate, Registration, REASON_STOPPED,
};
use edgebus_runtime::service::{reply_error, Request, Service, StartError};
use edgebus_runtime::tree::Tree;
use edgebus_runtime::wire::{code, timestamp, ErrorBody, ServiceError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// `[discovery]` in topics.toml.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// How long an offline record stays before discovery deletes it.
    #[serde(with = "edgebus_runtime::config::duration")]
    pub expire_after: Duration,
    /// Answer a request to a service with no online instance with `NO_RESPONDERS` at once.
    /// Only services that register (every edgebus service does) count as responders.
    pub no_responders: bool,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            expire_after: Duration::from_secs(60),
            no_responders: true,
        }
    }
}

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
        let mut endpoints = std::collections::BTreeSet::new();
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

    /// Records matching the filters (`service`, `capability`, `tag`, `status`), sorted.
    pub fn list(&self, filter: &ListFilter) -> Vec<Registration> {
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
        out.into_iter().map(|(_, v)| v).collect()
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

/// A running discovery service.
pub struct Discovery {
    /// The service (its `list` endpoint and its own registration).
    pub service: Service,
    /// The registry.
    pub registry: Arc<Registry>,
}

/// Starts discovery on `bus` (made with `BusOptions::for_service(…, "discovery", …)`).
pub async fn start(
    prefix: &str,
    config: &DiscoveryConfig,
    bus: &Bus,
) -> Result<Discovery, StartError> {
    let registry = Arc::new(Registry::default());
    let mut list = EndpointSpec::new("list");
    list.topic = Some(Tree::new(prefix).discovery_list());
    list.description = "instances, filtered by service, capability, tag, status".into();
    let reg = registry.clone();
    let service = edgebus_runtime::service!("discovery")
        .description("the registry of service instances")
        .capability("discovery")
        .endpoint_with(list, move |req: Request<Value>| {
            let reg = reg.clone();
            async move {
                let filter: ListFilter = if req.data.is_null() {
                    ListFilter::default()
                } else {
                    serde_json::from_value(req.data)
                        .map_err(|e| ServiceError::bad_request(format!("filter: {e}")))?
                };
                let instances = reg.list(&filter);
                Ok::<_, ServiceError>(json!({"count": instances.len(), "instances": instances}))
            }
        })
        .start(bus)
        .await?;

    let mut records = bus
        .subscribe(&Tree::new(prefix).all_registrations(), 1)
        .await?;
    let synced = Arc::new(AtomicBool::new(false));
    let updates = Tree::new(prefix).discovery_update();
    let tree = Tree::new(prefix);
    let (b, r, up) = (bus.clone(), registry.clone(), updates.clone());
    service.spawn(async move {
        while let Some(msg) = records.recv().await {
            if tree.registration_of(&msg.topic).is_none() {
                continue;
            }
            apply(&b, &r, &up, &msg).await;
        }
    });

    // Expiry of offline records.
    let (b, r, up) = (bus.clone(), registry.clone(), updates.clone());
    let expire_after = config.expire_after;
    service.spawn(async move {
        let mut tick = tokio::time::interval(
            Duration::from_secs(1).min(expire_after.max(Duration::from_millis(100))),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let due: Vec<Entry> = r
                .entries
                .iter()
                .filter(|e| e.offline_since.is_some_and(|t| t.elapsed() >= expire_after))
                .map(|e| e.value().clone())
                .collect();
            for e in due {
                r.entries.remove(&format!("{}/{}", e.service, e.instance));
                let opts = PublishOptions::retained();
                let _ = b.publish(&e.topic, Vec::new(), opts).await;
                emit(
                    &b,
                    &up,
                    DiscoveryEvent::Expired,
                    &e,
                    "offline past expire_after",
                )
                .await;
            }
        }
    });

    if config.no_responders {
        let mut requests = bus.subscribe(&Tree::new(prefix).all_requests(), 0).await?;
        let (b, r, s) = (bus.clone(), registry.clone(), synced.clone());
        let me = service.instance().to_owned();
        let levels = prefix.split('/').count();
        service.spawn(async move {
            while let Some(msg) = requests.recv().await {
                let Some(target) = msg.topic.split('/').nth(levels).map(str::to_owned) else {
                    continue;
                };
                if !s.load(Ordering::Relaxed)
                    || (target != "saga" && RESERVED_SERVICE_NAMES.contains(&target.as_str()))
                    || r.no_responder(&target, &msg.topic).is_none()
                {
                    continue;
                }
                // A registration and a request published one after the other reach us on
                // two subscriptions; look again once the first has had its turn, so that an
                // instance that just registered is not answered for.
                let (b, r, me) = (b.clone(), r.clone(), me.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    if let Some(message) = r.no_responder(&target, &msg.topic) {
                        let body = ErrorBody::new(code::NO_RESPONDERS, message);
                        let _ = reply_error(&b, &msg, &me, body);
                    }
                });
            }
        });
    }
    // Retained records arrive before our own round trip completes: from then on the
    // registry is whole and absence means absence.
    if bus.sync(Duration::from_secs(5)).await {
        synced.store(true, Ordering::Relaxed);
    } else {
        let (b, s) = (bus.clone(), synced.clone());
        service.spawn(async move {
            while !b.sync(Duration::from_secs(5)).await {}
            s.store(true, Ordering::Relaxed);
        });
    }
    Ok(Discovery { service, registry })
}

async fn emit(bus: &Bus, topic: &str, event: DiscoveryEvent, e: &Entry, reason: &str) {
    let name = event.as_str();
    tracing::info!(event = name, service = %e.service, instance = %e.instance, reason, "{} {}: {name} ({reason})", e.service, e.instance);
    let update = DiscoveryUpdate {
        event,
        service: e.service.clone(),
        instance: e.instance.clone(),
        incarnation: e.incarnation,
        reason: reason.to_owned(),
        at: timestamp(),
    };
    let _ = bus
        .publish_json(topic, &update, PublishOptions::qos(1))
        .await;
}

/// Applies one registration message; publishes the event its transition raises, if any.
async fn apply(bus: &Bus, registry: &Registry, updates: &str, msg: &Message) {
    let mut parts = msg.topic.rsplitn(3, '/');
    let (Some(instance), Some(service)) = (parts.next(), parts.next()) else {
        return;
    };
    let key = format!("{service}/{instance}");
    if msg.payload.is_empty() {
        if let Some((_, e)) = registry.entries.remove(&key) {
            emit(bus, updates, DiscoveryEvent::Expired, &e, "record deleted").await;
        }
        return;
    }
    let record = match serde_json::from_slice::<Registration>(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(topic = %msg.topic, error = %e, "registration record unreadable; ignored");
            return;
        }
    };
    let online = record.is_online();
    let incarnation = record.incarnation();
    let reason = match &record {
        Registration::Online(_) => "registered".to_owned(),
        Registration::Offline(d) if d.reason.is_empty() => "offline".to_owned(),
        Registration::Offline(d) => d.reason.clone(),
    };
    let stopped = reason == REASON_STOPPED;
    let new = Entry {
        service: service.to_owned(),
        instance: instance.to_owned(),
        incarnation,
        online,
        record,
        offline_since: (!online).then(Instant::now),
        topic: msg.topic.clone(),
    };
    let previous = registry.entries.get(&key).map(|e| e.value().clone());
    let event = match &previous {
        // A retained record we had not seen: the state as it was before we started.
        None if msg.retain => None,
        None if online => Some(DiscoveryEvent::Registered),
        None if stopped => Some(DiscoveryEvent::Deregistered),
        None => Some(DiscoveryEvent::Offline),
        // Older than what we know: a late will of a previous incarnation. Ignored.
        Some(p) if incarnation < p.incarnation => {
            tracing::debug!(%key, incarnation, known = p.incarnation, "stale registration ignored");
            return;
        }
        Some(p) if p.online == online && incarnation == p.incarnation => {
            // Nothing changed (a second will, a will after a clean stop, a repeated birth).
            return;
        }
        Some(p) if online && !p.online => Some(DiscoveryEvent::Recovered),
        Some(p) if online && p.online => Some(DiscoveryEvent::Registered),
        Some(_) if stopped => Some(DiscoveryEvent::Deregistered),
        Some(_) => Some(DiscoveryEvent::Offline),
    };
    let keep_since = previous
        .as_ref()
        .filter(|p| !p.online && !online)
        .and_then(|p| p.offline_since);
    let mut new = new;
    if keep_since.is_some() {
        new.offline_since = keep_since;
    }
    if let Some(event) = event {
        emit(bus, updates, event, &new, &reason).await;
    }
    registry.entries.insert(key, new);
}
