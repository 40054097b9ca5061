//! The discovery service: a registry of service instances built from their retained
//! registrations alone, one `P/system/discovery/update` event per transition per incarnation,
//! offline records deleted after `expire_after`, fast `NO_RESPONDERS`, and the
//! `P/system/discovery/list` endpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgebus_runtime::bus::{Bus, Message, PublishOptions};
use edgebus_runtime::contract::{EndpointSpec, RESERVED_SERVICE_NAMES};
use edgebus_runtime::proto::records::{DiscoveryUpdate, Registration};
use edgebus_runtime::service::{reply_error, Request, Service, StartError};
use edgebus_runtime::tree::Tree;
use edgebus_runtime::wire::{code, ErrorBody, ServiceError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod registry;

pub use registry::{Change, ListFilter, Registry};

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
                Ok::<_, ServiceError>(reg.list(&filter))
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
            apply(&b, &r, &up, &tree, &msg).await;
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
            for (topic, update) in r.expire(Instant::now(), expire_after) {
                let opts = PublishOptions::retained();
                let _ = b.publish(&topic, Vec::new(), opts).await;
                emit(&b, &up, &update).await;
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

/// Publishes an update, and says it in the log.
async fn emit(bus: &Bus, topic: &str, update: &DiscoveryUpdate) {
    let (name, reason) = (update.event.as_str(), update.reason.as_str());
    tracing::info!(event = name, service = %update.service, instance = %update.instance, reason, "{} {}: {name} ({reason})", update.service, update.instance);
    let _ = bus
        .publish_json(topic, update, PublishOptions::qos(1))
        .await;
}

/// Applies one registration message; publishes the update its transition raises, if any.
async fn apply(bus: &Bus, registry: &Registry, updates: &str, tree: &Tree, msg: &Message) {
    let Some((service, instance)) = tree.registration_of(&msg.topic) else {
        return;
    };
    let record = if msg.payload.is_empty() {
        None
    } else {
        match serde_json::from_slice::<Registration>(&msg.payload) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(topic = %msg.topic, error = %e, "registration record unreadable; ignored");
                return;
            }
        }
    };
    let change = Change {
        service,
        instance,
        topic: &msg.topic,
        record,
        retained: msg.retain,
    };
    if let Some(update) = registry.apply(change, Instant::now()) {
        emit(bus, updates, &update).await;
    }
}
