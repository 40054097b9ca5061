//! `kv`: a small in-memory key-value store whose writes are idempotent, made to show sagas
//! with effects you can watch.
//!
//! - `edge/kv/put/request` `{"key", "value", "if_absent"?, "delay_ms"?}` → `{"key", "version"}`;
//!   `CONFLICT` when `if_absent` and the key exists.
//! - `edge/kv/get/request` `{"key"}` → `{"key", "value", "version"}`, or `NOT_FOUND`.
//! - `edge/kv/delete/request` `{"key", "if_present"?}` → `{"key", "deleted"}`; `NOT_FOUND` when
//!   `if_present` and the key is absent.
//! - `edge/kv/stats/request` `{"prefix"?}` → every key with its value, and how many puts and
//!   deletes were applied per key (never reset, so a step applied twice shows).
//!
//! A request with the MQTT 5 user property `idempotency_key` (every saga step has one) is
//! applied once: a repeat, even while the first is still running, gets the first one's reply.
//! The last 10,000 keys are remembered.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use edgebus_runtime::bus::Bus;
use edgebus_runtime::service::{Request, Service, ServiceBuilder, StartError};
use edgebus_runtime::wire::{ErrorBody, ServiceError};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::OnceCell;

use edgebus_runtime::contract::ServiceSpec;

/// Idempotency keys remembered.
const REMEMBER: usize = 10_000;

#[derive(Debug, Default)]
struct Store {
    data: BTreeMap<String, (Value, u64)>,
    puts: BTreeMap<String, u64>,
    deletes: BTreeMap<String, u64>,
}

type Outcome = Result<Value, ErrorBody>;

#[derive(Default)]
struct Kv {
    store: Mutex<Store>,
    seen: DashMap<String, Arc<OnceCell<Outcome>>>,
    order: Mutex<VecDeque<String>>,
    repeats: std::sync::atomic::AtomicU64,
}

impl Kv {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `op` once per idempotency key; repeats get the first outcome.
    async fn once<F, Fut>(&self, key: Option<String>, op: F) -> Outcome
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Outcome>,
    {
        let Some(key) = key else { return op().await };
        let cell = self
            .seen
            .entry(key.clone())
            .or_insert_with(|| {
                let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
                order.push_back(key.clone());
                while order.len() > REMEMBER {
                    if let Some(old) = order.pop_front() {
                        self.seen.remove(&old);
                    }
                }
                Arc::new(OnceCell::new())
            })
            .clone();
        if cell.initialized() {
            self.repeats
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        cell.get_or_init(op).await.clone()
    }
}

fn idempotency_key<T>(req: &Request<T>) -> Option<String> {
    req.user_property("idempotency_key").map(str::to_owned)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Put {
    key: String,
    value: Value,
    #[serde(default)]
    if_absent: bool,
    #[serde(default)]
    delay_ms: u64,
}

/// A key; other fields are ignored, so a delete can take a put's input as it is.
#[derive(Debug, Deserialize)]
struct Key {
    key: String,
    #[serde(default)]
    if_present: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Prefix {
    #[serde(default)]
    prefix: String,
}

/// The service as built, before it is bound to a bus.
/// `contract` is topics.toml's `[[service]]` declarations.
pub fn builder(contract: &[ServiceSpec]) -> ServiceBuilder {
    edgebus_runtime::service!("kv")
        .description("an in-memory key-value store with idempotent writes")
        .capability("kv")
        .contract(contract)
        .with_state(Kv::default())
        .endpoint("put", put)
        .endpoint("get", get)
        .endpoint("delete", delete)
        .endpoint("stats", stats)
}

async fn put(req: Request<Put>) -> Result<Value, ServiceError> {
    let kv = req.state::<Kv>();
    let key = idempotency_key(&req);
    let p = req.data;
    if p.delay_ms > 60_000 {
        return Err(ServiceError::bad_request(
            "field `delay_ms`: expected 0 to 60000",
        ));
    }
    kv.clone()
        .once(key, || async move {
            if p.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(p.delay_ms)).await;
            }
            let mut s = kv.store();
            if p.if_absent && s.data.contains_key(&p.key) {
                return Err(ErrorBody::new(
                    "CONFLICT",
                    format!("key `{}` exists", p.key),
                ));
            }
            let version = s.data.get(&p.key).map_or(1, |(_, v)| v + 1);
            s.data.insert(p.key.clone(), (p.value, version));
            *s.puts.entry(p.key.clone()).or_default() += 1;
            Ok(json!({"key": p.key, "version": version}))
        })
        .await
}

async fn get(req: Request<Key>) -> Result<Value, ServiceError> {
    let kv = req.state::<Kv>();
    let s = kv.store();
    match s.data.get(&req.data.key) {
        Some((v, version)) => Ok(json!({"key": req.data.key, "value": v, "version": version})),
        None => Err(ServiceError::not_found(format!(
            "no key `{}`",
            req.data.key
        ))),
    }
}

async fn delete(req: Request<Key>) -> Result<Value, ServiceError> {
    let kv = req.state::<Kv>();
    let key = idempotency_key(&req);
    let k = req.data;
    kv.clone()
        .once(key, || async move {
            let mut s = kv.store();
            let deleted = s.data.remove(&k.key).is_some();
            if !deleted && k.if_present {
                return Err(ServiceError::not_found(format!("no key `{}`", k.key)));
            }
            if deleted {
                *s.deletes.entry(k.key.clone()).or_default() += 1;
            }
            Ok(json!({"key": k.key, "deleted": deleted}))
        })
        .await
}

async fn stats(req: Request<Option<Prefix>>) -> Result<Value, ServiceError> {
    let kv = req.state::<Kv>();
    let prefix = req.data.unwrap_or_default().prefix;
    let s = kv.store();
    let keep = |k: &&String| k.starts_with(&prefix);
    let data: BTreeMap<&String, &Value> = s
        .data
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, (v, _))| (k, v))
        .collect();
    let puts: BTreeMap<&String, &u64> = s.puts.iter().filter(|(k, _)| keep(k)).collect();
    let deletes: BTreeMap<&String, &u64> = s.deletes.iter().filter(|(k, _)| keep(k)).collect();
    Ok(json!({
        "data": data,
        "puts": puts,
        "deletes": deletes,
        "repeats": kv.repeats.load(std::sync::atomic::Ordering::Relaxed),
    }))
}

/// Starts `kv` on `bus`.
pub async fn start(contract: &[ServiceSpec], bus: &Bus) -> Result<Service, StartError> {
    builder(contract).start(bus).await
}
