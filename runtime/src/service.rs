//! Services: a builder, endpoints with async handlers over serde types, and the serving
//! loop that turns every request into exactly one reply.
//!
//! ```no_run
//! use edgebus_runtime::prelude::*;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::connect(BusOptions::for_service("127.0.0.1:1883", "edge", "greeter", None))?;
//! let service = ServiceBuilder::new("greeter")
//!     .endpoint("hello", |req: Request<serde_json::Value>| async move {
//!         Ok::<_, ServiceError>(serde_json::json!({"hello": req.data["name"]}))
//!     })
//!     .start(&bus)
//!     .await?;
//! # let _ = service; Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use futures_util::FutureExt;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::{random_u64, Bus, BusError, BusOptions, Message, PublishOptions};
use crate::contract::{EndpointSpec, EventSpec, ServiceSpec};
use crate::events::Emitter;
use crate::policy::TokenBucket;
use crate::presence::{birth_record, Check, Checks, Presence};
use crate::stats::{EndpointSnapshot, EndpointStats};
use crate::topic::check_topic;
use crate::wire::{
    code, decode_request, now_ms, timestamp, ErrorBody, ReplyBody, RequestMeta, ServiceError,
};
use edgebus_proto::records::{DeadLetter, Heartbeat, Lost, Registration};

/// A request as a handler sees it.
#[derive(Debug, Clone)]
pub struct Request<T> {
    /// The payload, with the addressing fields (`reply_to`, `correlation_id`, `session_id`,
    /// `deadline_ms`) taken out.
    pub data: T,
    /// The topic the request came on.
    pub topic: String,
    /// The caller's correlation id, if it gave one.
    pub correlation_id: Option<String>,
    /// When the caller stops waiting, if it said.
    pub deadline: Option<Instant>,
    /// MQTT 5 user properties of the request.
    pub user_properties: Vec<(String, String)>,
    /// The bus, for calls to other services.
    pub bus: Bus,
    /// The service's events, for [`Request::emit`].
    events: Emitter,
}

impl<T> Request<T> {
    /// Publishes one of the service's declared events, carrying this request's
    /// correlation id.
    pub async fn emit<E: Serialize>(&self, event: &str, data: &E) -> Result<(), EventError> {
        self.events
            .emit_correlated(event, data, self.correlation_id.clone())
            .await
    }

    /// The state given to [`ServiceBuilder::with_state`], shared by every handler of the
    /// service.
    ///
    /// # Panics
    /// When the builder was given no state of type `S`: a programming error, which the
    /// request it happens in answers with `INTERNAL_ERROR` (handlers run under
    /// `catch_unwind`).
    pub fn state<S: Send + Sync + 'static>(&self) -> Arc<S> {
        self.events
            .0
            .state
            .clone()
            .and_then(|s| s.downcast::<S>().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no state of type {} (give it with ServiceBuilder::with_state)",
                    std::any::type_name::<S>()
                )
            })
    }

    /// The value of the request's MQTT 5 user property `key`, if it has one.
    pub fn user_property(&self, key: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An event that could not be published fails the request that tried, as an internal error.
impl From<EventError> for ServiceError {
    fn from(e: EventError) -> ServiceError {
        ServiceError::internal(e.to_string())
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A type-erased endpoint handler.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request.
    fn call(&self, req: Request<Value>) -> BoxFuture<Result<Value, ServiceError>>;
}

struct FnHandler<F>(F);

impl<F> Handler for FnHandler<F>
where
    F: Fn(Request<Value>) -> BoxFuture<Result<Value, ServiceError>> + Send + Sync + 'static,
{
    fn call(&self, req: Request<Value>) -> BoxFuture<Result<Value, ServiceError>> {
        (self.0)(req)
    }
}

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The code and topics.toml disagree.
    #[error("service `{service}`: {message}")]
    Contract {
        /// The service.
        service: String,
        /// What disagrees.
        message: String,
    },
    /// State the service keeps (a journal, a store) could not be opened.
    #[error("service `{service}`: {what}: {message}")]
    State {
        /// The service.
        service: String,
        /// What could not be opened (`saga journal /var/lib/edgebus/sagas.journal`).
        what: String,
        /// Why.
        message: String,
    },
    /// No service of that name can be started here.
    #[error("no service `{name}` here ({known})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// What can be started, for the message.
        known: String,
    },
    /// topics.toml (`EDGEBUS_CONFIG`) could not be read or is invalid.
    #[error("{}: {message}", file.display())]
    Config {
        /// The file.
        file: std::path::PathBuf,
        /// What is wrong, with the line and key when known.
        message: String,
    },
    /// Subscribing failed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Why an event could not be published.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The service did not declare this event.
    #[error("event `{0}` is not declared by this service")]
    Undeclared(String),
    /// The data does not fit the event's schema.
    #[error("event `{event}` does not fit its schema: {message}")]
    Schema {
        /// The event.
        event: String,
        /// The field that does not fit.
        message: String,
    },
    /// The event could not be encoded.
    #[error("event `{0}` cannot be encoded: {1}")]
    Encode(String, String),
    /// Publishing failed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Decodes a request's JSON into a handler's type. The error names the field that does not
/// fit (``field `key`: invalid type: integer `5`, expected a string``), and speaks of JSON, never of
/// the Rust type it was decoded into.
pub fn decode_payload<T: DeserializeOwned>(data: Value) -> Result<T, String> {
    let empty = data.is_null();
    serde_path_to_error::deserialize(data).map_err(|e| {
        let path = e.path().to_string();
        let message = json_words(&e.into_inner().to_string());
        match (path.as_str(), empty) {
            (".", true) => format!("payload: empty; {message}"),
            (".", false) => format!("payload: {message}"),
            (p, _) => format!("field `{p}`: {message}"),
        }
    })
}

/// serde's "expected struct Put" / "expected tuple struct Pair" / "expected a map" spoken as
/// JSON: "expected a JSON object" / "expected a JSON array".
fn json_words(message: &str) -> String {
    let mut out = message.to_owned();
    for (rust, json) in [
        ("expected tuple struct ", "expected a JSON array"),
        ("expected struct variant ", "expected a JSON object"),
        ("expected struct ", "expected a JSON object"),
        ("expected unit struct ", "expected null"),
        ("expected enum ", "expected one of its names"),
    ] {
        while let Some(at) = out.find(rust) {
            let rest = &out[at + rust.len()..];
            let name_len = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            out = format!("{}{json}{}", &out[..at], &rest[name_len..]);
        }
    }
    out.replace("expected a map", "expected a JSON object")
        .replace("expected a sequence", "expected a JSON array")
}

/// Builds a service: its endpoints, its events, and its contract.
pub struct ServiceBuilder {
    spec: ServiceSpec,
    declared: Option<ServiceSpec>,
    /// The whole contract, for the retry and circuit policies of the endpoints it calls.
    contract: Vec<ServiceSpec>,
    version: String,
    handlers: BTreeMap<String, Arc<dyn Handler>>,
    max_request: usize,
    heartbeat: Duration,
    checks: Checks,
    state: Option<SharedState>,
}

/// State shared by a service's handlers ([`ServiceBuilder::with_state`]).
type SharedState = Arc<dyn std::any::Any + Send + Sync>;

/// A [`ServiceBuilder`] for `name`, with the version of the crate that calls the macro
/// (`CARGO_PKG_VERSION`): `edgebus_runtime::service!("greeter")`.
#[macro_export]
macro_rules! service {
    ($name:expr) => {
        $crate::service::ServiceBuilder::new($name).version(env!("CARGO_PKG_VERSION"))
    };
}

impl BusOptions {
    /// Options for one instance of `service`: the client id is the instance id (made up when
    /// `None`), and replies come back on `{prefix}/system/reply/{instance}`.
    pub fn for_service(
        broker: impl Into<String>,
        prefix: impl Into<String>,
        service: &str,
        instance: Option<String>,
    ) -> BusOptions {
        let prefix = prefix.into();
        let instance =
            instance.unwrap_or_else(|| format!("{service}-{:04x}", random_u64() & 0xffff));
        let mut o = BusOptions::new(broker, instance.clone()).prefix(prefix.clone());
        o.reply_topic = Some(edgebus_proto::tree::Tree::new(&prefix).reply(&instance));
        let identity = crate::presence::Identity::new(service, &instance);
        o.will = Some(identity.will(&prefix));
        o.presence = Some(identity);
        o.watch_lag = true;
        o
    }

    /// Options for an instance of `service` from the environment: `EDGEBUS_BROKER`,
    /// `EDGEBUS_INSTANCE`, and `[bus]` of the topics.toml `EDGEBUS_CONFIG` names (see
    /// [`crate::app::Environment`]).
    pub fn from_env(service: &str) -> Result<BusOptions, StartError> {
        Ok(crate::app::Environment::load()?.bus_options(service))
    }
}

impl ServiceBuilder {
    /// A service called `name` (the second topic level).
    pub fn new(name: impl Into<String>) -> ServiceBuilder {
        ServiceBuilder {
            spec: ServiceSpec {
                name: name.into(),
                ..Default::default()
            },
            declared: None,
            contract: Vec::new(),
            version: "unknown".into(),
            handlers: BTreeMap::new(),
            max_request: 256 * 1024,
            heartbeat: Duration::from_secs(1),
            checks: Checks::default(),
            state: None,
        }
    }

    /// State every handler of the service shares, read with [`Request::state`]: a store, a
    /// client, a configuration. Given once here instead of cloned into each closure.
    pub fn with_state<S: Send + Sync + 'static>(mut self, state: S) -> Self {
        self.state = Some(Arc::new(state));
        self
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether [`ServiceBuilder::contract`] was given.
    pub(crate) fn has_contract(&self) -> bool {
        self.declared.is_some() || !self.contract.is_empty()
    }

    /// How often the instance publishes its heartbeat (default 1 s; zero: never).
    pub fn heartbeat_interval(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// Adds a health check, run before every heartbeat (bounded by half the interval). Any
    /// failed check makes the instance `unhealthy`, any degraded one `degraded`.
    pub fn health_check<F, Fut>(mut self, name: &str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Check> + Send + 'static,
    {
        self.checks.add(name, check);
        self
    }

    /// The version reported in the registry (`unknown` unless given; [`crate::service!`]
    /// gives the calling crate's).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// A one-line description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.spec.description = text.into();
        self
    }

    /// Adds a capability word.
    pub fn capability(mut self, c: impl Into<String>) -> Self {
        self.spec.capabilities.push(c.into());
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, t: impl Into<String>) -> Self {
        self.spec.tags.push(t.into());
        self
    }

    /// Largest request payload handled; larger ones get `PAYLOAD_TOO_LARGE`.
    pub fn max_request(mut self, bytes: usize) -> Self {
        self.max_request = bytes;
        self
    }

    /// Binds the service to the `[[service]]` entries of topics.toml. When one declares this
    /// service, it is the contract: every endpoint and event the code registers must be
    /// declared there, and its settings (QoS, timeout, concurrency, schema) win.
    ///
    /// The other services' endpoints give this instance's requests to them their `retry`
    /// and `circuit` policies ([`Bus::apply_contract`]).
    pub fn contract(mut self, services: &[ServiceSpec]) -> Self {
        self.declared = services.iter().find(|s| s.name == self.spec.name).cloned();
        self.contract = services.to_vec();
        self
    }

    /// Adds an endpoint with default settings and a typed handler. A payload that does not
    /// decode into `T` gets `BAD_REQUEST` naming the field.
    pub fn endpoint<T, R, F, Fut>(self, name: &str, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(Request<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, ServiceError>> + Send + 'static,
    {
        self.endpoint_with(EndpointSpec::new(name), handler)
    }

    /// Adds an endpoint with explicit settings.
    pub fn endpoint_with<T, R, F, Fut>(mut self, spec: EndpointSpec, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(Request<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, ServiceError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased = move |req: Request<Value>| -> BoxFuture<Result<Value, ServiceError>> {
            let handler = handler.clone();
            Box::pin(async move {
                let Request {
                    data,
                    topic,
                    correlation_id,
                    deadline,
                    user_properties,
                    bus,
                    events,
                } = req;
                let data: T = decode_payload(data).map_err(ServiceError::bad_request)?;
                let out = handler(Request {
                    data,
                    topic,
                    correlation_id,
                    deadline,
                    user_properties,
                    bus,
                    events,
                })
                .await?;
                serde_json::to_value(out)
                    .map_err(|e| ServiceError::internal(format!("reply cannot be encoded: {e}")))
            })
        };
        self.handlers
            .insert(spec.name.clone(), Arc::new(FnHandler(erased)));
        self.spec.endpoints.retain(|e| e.name != spec.name);
        self.spec.endpoints.push(spec);
        self
    }

    /// Declares an event stream.
    pub fn event(mut self, spec: EventSpec) -> Self {
        self.spec.events.retain(|e| e.name != spec.name);
        self.spec.events.push(spec);
        self
    }

    /// The contract as it will run: the code's declarations checked against topics.toml's.
    pub fn resolve(&self) -> Result<ServiceSpec, StartError> {
        let err = |message: String| StartError::Contract {
            service: self.spec.name.clone(),
            message,
        };
        let Some(declared) = &self.declared else {
            return Ok(self.spec.clone());
        };
        let mut spec = declared.clone();
        for e in &self.spec.endpoints {
            if !declared.endpoints.iter().any(|d| d.name == e.name) {
                return Err(err(format!(
                    "endpoint `{}` is not declared in topics.toml (add a [[service.endpoint]] \
                     with name = \"{}\")",
                    e.name, e.name
                )));
            }
        }
        for d in &declared.endpoints {
            if !self.handlers.contains_key(&d.name) {
                return Err(err(format!(
                    "topics.toml declares endpoint `{}`, which this service does not serve",
                    d.name
                )));
            }
        }
        for e in &self.spec.events {
            if !declared.events.iter().any(|d| d.name == e.name) {
                return Err(err(format!(
                    "event `{}` is not declared in topics.toml (add a [[service.event]] with \
                     name = \"{}\")",
                    e.name, e.name
                )));
            }
        }
        if spec.description.is_empty() {
            spec.description = self.spec.description.clone();
        }
        if spec.capabilities.is_empty() {
            spec.capabilities = self.spec.capabilities.clone();
        }
        if spec.tags.is_empty() {
            spec.tags = self.spec.tags.clone();
        }
        Ok(spec)
    }

    /// Subscribes every endpoint (through the shared group named after the service, so that
    /// instances share the load) and starts serving.
    pub async fn start(self, bus: &Bus) -> Result<Service, StartError> {
        let spec = self.resolve()?;
        crate::contract::validate(std::slice::from_ref(&spec), bus.prefix()).map_err(|e| {
            StartError::Contract {
                service: spec.name.clone(),
                message: e.to_string(),
            }
        })?;
        bus.apply_contract(&self.contract);
        let stopping = CancellationToken::new();
        let presence = bus.options().presence.clone().and_then(|identity| {
            if identity.service != spec.name {
                tracing::warn!(
                    service = %spec.name,
                    bus_service = %identity.service,
                    "the bus was made for another service; this one does not register"
                );
                return None;
            }
            let birth = birth_record(
                &identity,
                &self.version,
                &spec,
                bus.prefix(),
                self.heartbeat,
            );
            Some(Arc::new(Presence::new(identity, bus.prefix(), birth)))
        });
        let inner = Arc::new(ServiceInner {
            presence: presence.clone(),
            name: spec.name.clone(),
            instance: bus.client_id().to_owned(),
            version: self.version.clone(),
            bus: bus.clone(),
            deadletter: edgebus_proto::tree::Tree::new(bus.prefix()).dead_letter(&spec.name),
            started: Instant::now(),
            state: self.state.clone(),
            stats: spec
                .endpoints
                .iter()
                .map(|e| (e.name.clone(), Arc::new(EndpointStats::default())))
                .collect(),
            spec,
        });
        let mut tasks = Vec::new();
        let mut serving = Vec::new();
        for e in &inner.spec.endpoints {
            let Some(handler) = self.handlers.get(&e.name).cloned() else {
                continue;
            };
            let base = e.base_topic(bus.prefix(), &inner.name);
            let ctx = Arc::new(EndpointCtx {
                service: inner.clone(),
                spec: e.clone(),
                request_topic: format!("{base}/request"),
                result_topic: format!("{base}/result"),
                error_topic: format!("{base}/error"),
                handler,
                stats: inner.stats[&e.name].clone(),
                max_request: self.max_request,
                limit: Arc::new(Semaphore::new(e.max_concurrency)),
                rate: e.rate_limit.map(|r| Mutex::new(TokenBucket::new(r))),
                dedupe: (e.dedupe_size > 0)
                    .then(|| Mutex::new(Dedupe::new(e.dedupe_size, e.dedupe_for))),
            });
            let overflow_ctx = ctx.clone();
            let overflow = Box::new(move |msg: Message| {
                overflow_ctx.stats.reject();
                let err = ErrorBody::unavailable(format!(
                    "endpoint saturated ({} in flight and the queue full); retry later",
                    overflow_ctx.spec.max_concurrency
                ));
                let service = &overflow_ctx.service;
                if let Err(e) = reply_error(&service.bus, &msg, &service.instance, err) {
                    tracing::warn!(
                        endpoint = %overflow_ctx.spec.name,
                        error = %e,
                        "endpoint saturated and the reply queue full; request refused without a reply"
                    );
                }
            });
            let sub = bus
                .subscribe_with(
                    &format!("$share/{}/{}", inner.name, ctx.request_topic),
                    &ctx.request_topic,
                    e.qos,
                    Some(overflow),
                )
                .await?;
            serving.push(tokio::spawn(serve(ctx, sub, stopping.clone())));
        }
        if let Some(p) = &presence {
            tasks.push(start_presence(p.clone(), &inner, bus, self.heartbeat, self.checks).await?);
        }
        tracing::info!(
            service = %inner.name,
            instance = %inner.instance,
            endpoints = inner.spec.endpoints.len(),
            "service started"
        );
        Ok(Service {
            inner,
            serving: Arc::new(std::sync::Mutex::new(serving)),
            tasks: Arc::new(std::sync::Mutex::new(tasks)),
            stopping,
        })
    }
}

pub(crate) struct ServiceInner {
    presence: Option<Arc<Presence>>,
    pub(crate) name: String,
    pub(crate) instance: String,
    version: String,
    pub(crate) bus: Bus,
    pub(crate) spec: ServiceSpec,
    deadletter: String,
    started: Instant,
    state: Option<SharedState>,
    stats: BTreeMap<String, Arc<EndpointStats>>,
}

/// A running service instance; clones share it.
#[derive(Clone)]
pub struct Service {
    inner: Arc<ServiceInner>,
    /// One task per endpoint, taking requests until the service stops.
    serving: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    /// Presence and tasks added with [`Service::spawn`].
    tasks: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    stopping: CancellationToken,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.inner.name)
            .field("instance", &self.inner.instance)
            .finish()
    }
}

impl Service {
    pub(crate) fn inner(&self) -> &Arc<ServiceInner> {
        &self.inner
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// This instance's id (its MQTT client id).
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// The version given to the builder.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// The contract the service runs with.
    pub fn spec(&self) -> &ServiceSpec {
        &self.inner.spec
    }

    /// The bus the service runs on.
    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Per-endpoint figures.
    pub fn stats(&self) -> BTreeMap<String, EndpointSnapshot> {
        self.inner
            .stats
            .iter()
            .map(|(k, v)| (k.clone(), v.snapshot()))
            .collect()
    }

    /// The live counters of each endpoint (for exporters such as [`crate::metrics`]).
    pub fn endpoint_stats(&self) -> impl Iterator<Item = (&str, &EndpointStats)> {
        self.inner.stats.iter().map(|(k, v)| (k.as_str(), &**v))
    }

    /// All endpoints' figures summed (latencies: the worst endpoint's).
    pub fn total_stats(&self) -> EndpointSnapshot {
        EndpointSnapshot::total(self.stats().into_values())
    }

    pub(crate) fn event_spec(&self, name: &str) -> Result<&EventSpec, EventError> {
        self.inner
            .spec
            .events
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| EventError::Undeclared(name.to_owned()))
    }

    /// Runs `task` for as long as the service runs; it is stopped by [`Service::stop`].
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    /// The instance's incarnation, when it registers.
    pub fn incarnation(&self) -> Option<u64> {
        self.inner.presence.as_ref().map(|p| p.identity.incarnation)
    }

    /// Stops serving: the endpoints are unsubscribed, so new requests go to other instances
    /// (or get `NO_RESPONDERS`); requests already received, queued or in flight, get `grace`
    /// to finish and be answered; the registration becomes
    /// `{"state": "offline", "reason": "stopped"}`.
    pub async fn stop(&self, grace: Duration) {
        if let Some(p) = &self.inner.presence {
            p.publish_stopped(&self.inner.bus).await;
        }
        self.stopping.cancel();
        let serving = std::mem::take(&mut *self.serving.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = Instant::now() + grace;
        for t in serving {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline.into(), t).await.is_err() {
                abort.abort();
            }
        }
        while Instant::now() < deadline && self.total_stats().inflight > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in &tasks {
            t.abort();
        }
    }
}

/// Registers the instance after every CONNACK, re-asserts the registration if something
/// overwrites it while the instance lives, and publishes heartbeats.
async fn start_presence(
    presence: Arc<Presence>,
    inner: &Arc<ServiceInner>,
    bus: &Bus,
    every: Duration,
    checks: Checks,
) -> Result<JoinHandle<()>, BusError> {
    let topic = presence.identity.registration_topic(bus.prefix());
    let mut own = bus.subscribe(&topic, 1).await?;
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
    let weak = Arc::downgrade(inner);
    let bus = bus.clone();
    Ok(tokio::spawn(async move {
        let _watcher = AbortOnDrop(watcher);
        if every.is_zero() {
            return std::future::pending().await;
        }
        let hb_topic = presence.identity.heartbeat_topic(bus.prefix());
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else { return };
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
                uptime_s: (inner.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                checks: results,
                stats: EndpointSnapshot::total(inner.stats.values().map(|s| s.snapshot())),
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
            drop(inner);
            let _ = bus
                .publish_json(&hb_topic, &beat, PublishOptions::qos(0))
                .await;
        }
    }))
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Everything a request task needs.
struct EndpointCtx {
    service: Arc<ServiceInner>,
    spec: EndpointSpec,
    request_topic: String,
    result_topic: String,
    error_topic: String,
    handler: Arc<dyn Handler>,
    stats: Arc<EndpointStats>,
    max_request: usize,
    limit: Arc<Semaphore>,
    rate: Option<Mutex<TokenBucket>>,
    dedupe: Option<Mutex<Dedupe>>,
}

/// A reply ready to publish: topic, payload, options.
type Encoded = Arc<(String, Bytes, PublishOptions)>;

enum Slot {
    /// The handler runs; the sender is dropped when it finishes.
    Running(tokio::sync::watch::Receiver<()>),
    /// Its reply, to send again to a duplicate.
    Done(Encoded),
}

/// Recent requests of one endpoint by correlation, bounded in count, age and bytes.
struct Dedupe {
    size: usize,
    ttl: Duration,
    bytes: usize,
    hasher: std::collections::hash_map::RandomState,
    slots: HashMap<u64, Slot>,
    order: VecDeque<(u64, Instant)>,
}

/// Bytes of cached replies one endpoint keeps at most.
const DEDUPE_MAX_BYTES: usize = 4 * 1024 * 1024;

enum Claim {
    /// A new request: run it.
    New(u64, tokio::sync::watch::Sender<()>),
    /// Already answered: send this again.
    Answered(Encoded),
    /// Running now: wait for it.
    Wait(tokio::sync::watch::Receiver<()>),
}

impl Dedupe {
    fn new(size: usize, ttl: Duration) -> Dedupe {
        Dedupe {
            size,
            ttl,
            bytes: 0,
            hasher: Default::default(),
            slots: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn key(&self, parts: &[&[u8]]) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = self.hasher.build_hasher();
        for p in parts {
            h.write_usize(p.len());
            h.write(p);
        }
        h.finish()
    }

    fn evict(&mut self, now: Instant) {
        while let Some(&(key, at)) = self.order.front() {
            let old = now.saturating_duration_since(at) > self.ttl;
            if !(old || self.order.len() > self.size || self.bytes > DEDUPE_MAX_BYTES) {
                break;
            }
            self.order.pop_front();
            if let Some(Slot::Done(e)) = self.slots.remove(&key) {
                self.bytes -= e.1.len();
            }
        }
    }

    fn claim(&mut self, key: u64) -> Claim {
        let now = Instant::now();
        self.evict(now);
        match self.slots.get(&key) {
            Some(Slot::Done(e)) => Claim::Answered(e.clone()),
            // A handler whose task ended without finishing (aborted at stop) leaves a closed
            // channel: the request is new again.
            Some(Slot::Running(rx)) if rx.has_changed().is_ok() => Claim::Wait(rx.clone()),
            _ => {
                let (tx, rx) = tokio::sync::watch::channel(());
                self.slots.insert(key, Slot::Running(rx));
                self.order.push_back((key, now));
                Claim::New(key, tx)
            }
        }
    }

    /// The request ran: keep its reply, or forget it so a retry runs it again.
    fn finish(&mut self, key: u64, reply: Option<Encoded>) {
        match reply {
            Some(e) => {
                self.bytes += e.1.len();
                self.slots.insert(key, Slot::Done(e));
            }
            None => {
                self.slots.remove(&key);
                self.order.retain(|(k, _)| *k != key);
            }
        }
    }
}

/// Where and how a reply goes.
#[derive(Debug, Default)]
struct ReplyTo {
    /// MQTT 5 response topic, or `reply_to`.
    topic: Option<String>,
    correlation_data: Option<Bytes>,
    correlation_id: Option<String>,
    session_id: Option<String>,
    request_id: String,
    qos: u8,
}

/// Takes requests until `stopping`; then unsubscribes and serves what was already received.
/// Returns once every request it took has been answered.
async fn serve(
    ctx: Arc<EndpointCtx>,
    mut sub: crate::bus::Subscriber,
    stopping: CancellationToken,
) {
    let mut running = tokio::task::JoinSet::new();
    let mut stopped = false;
    loop {
        let msg = tokio::select! {
            m = sub.recv() => m,
            _ = stopping.cancelled(), if !stopped => {
                stopped = true;
                sub.unsubscribe();
                continue;
            }
        };
        let Some(msg) = msg else { break };
        let Ok(permit) = ctx.limit.clone().acquire_owned().await else {
            break;
        };
        while running.try_join_next().is_some() {}
        let ctx = ctx.clone();
        running.spawn(async move {
            ctx.handle(msg).await;
            drop(permit);
        });
    }
    while running.join_next().await.is_some() {}
}

impl EndpointCtx {
    /// Reads the reply address from the MQTT 5 properties (no payload parsing).
    fn prepare(&self, msg: &Message) -> ReplyTo {
        let correlation_data = msg.correlation_data().cloned();
        let request_id = match &correlation_data {
            Some(c) => match std::str::from_utf8(c) {
                Ok(s) => s.to_owned(),
                Err(_) => base64::engine::general_purpose::STANDARD.encode(c),
            },
            None => format!("{:016x}", random_u64()),
        };
        ReplyTo {
            topic: msg.response_topic().map(str::to_owned),
            correlation_data,
            correlation_id: None,
            session_id: None,
            request_id,
            qos: msg.qos.min(self.spec.qos),
        }
    }

    async fn handle(&self, msg: Message) {
        let started = msg.received;
        let mut reply = self.prepare(&msg);
        let mut claimed = None;
        if let Some(dedupe) = &self.dedupe {
            if let Some(correlation) = dedupe_correlation(&msg) {
                let reply_topic = msg.response_topic().unwrap_or("").as_bytes();
                loop {
                    let claim = {
                        let mut d = lock(dedupe);
                        let key = d.key(&[reply_topic, &correlation, &msg.payload]);
                        d.claim(key)
                    };
                    match claim {
                        Claim::New(key, done) => {
                            claimed = Some((key, done));
                            break;
                        }
                        Claim::Answered(encoded) => {
                            self.stats.duplicate();
                            tracing::debug!(service = %self.service.name, endpoint = %self.spec.name, correlation_id = %reply.request_id, "duplicate request; reply sent again");
                            self.publish_reply(&encoded, &reply.request_id).await;
                            return;
                        }
                        // Returns when the first copy's handler is done (its sender dropped).
                        Claim::Wait(mut running) => while running.changed().await.is_ok() {},
                    }
                }
            }
        }
        self.stats.start();
        let limited = self.rate.as_ref().is_some_and(|r| !lock(r).try_take(1.0));
        let result = if limited {
            self.stats.rate_limited();
            Err(ErrorBody::new(
                code::RATE_LIMITED,
                format!(
                    "endpoint `{}` admits {} requests per second per instance; retry later",
                    self.spec.name,
                    self.spec.rate_limit.map_or(0.0, |r| r.per_second)
                ),
            ))
        } else {
            self.run(&msg, &mut reply).await
        };
        let ok = result.is_ok();
        let cacheable = result.as_ref().map_or_else(|e| !e.retryable, |_| true);
        let letter = match &result {
            Err(e)
                if e.code == code::BAD_REQUEST
                    || e.code == code::PAYLOAD_TOO_LARGE
                    || e.code == code::INTERNAL_ERROR =>
            {
                Some(e.clone())
            }
            _ => None,
        };
        match &result {
            Err(e) => {
                tracing::debug!(service = %self.service.name, endpoint = %self.spec.name, correlation_id = %reply.request_id, code = %e.code, error = %e.message, took_us = started.elapsed().as_micros() as u64, "request failed")
            }
            Ok(_) => {
                tracing::debug!(service = %self.service.name, endpoint = %self.spec.name, correlation_id = %reply.request_id, took_us = started.elapsed().as_micros() as u64, "request served")
            }
        }
        let encoded = Arc::new(self.encode(&reply, result));
        if let (Some((key, done)), Some(dedupe)) = (claimed, &self.dedupe) {
            lock(dedupe).finish(key, cacheable.then(|| encoded.clone()));
            drop(done);
        }
        // The caller waits for the reply; the dead letter is for operators, so it goes second.
        self.publish_reply(&encoded, &reply.request_id).await;
        if let Some(e) = letter {
            self.dead_letter(&msg, &e, &reply.request_id).await;
        }
        self.stats.finish(started.elapsed(), ok);
    }

    async fn run(&self, msg: &Message, reply: &mut ReplyTo) -> Result<Value, ServiceError> {
        if msg.payload.len() > self.max_request {
            return Err(ErrorBody::new(
                code::PAYLOAD_TOO_LARGE,
                format!(
                    "request of {} bytes exceeds this endpoint's limit of {} bytes",
                    msg.payload.len(),
                    self.max_request
                ),
            ));
        }
        let (data, meta) = decode_request(&msg.payload).map_err(ServiceError::bad_request)?;
        if reply.topic.is_none() {
            if let Some(to) = &meta.reply_to {
                match check_topic(to) {
                    Ok(()) if !to.starts_with('$') => reply.topic = Some(to.clone()),
                    _ => {
                        return Err(ServiceError::bad_request(format!(
                            "field `reply_to`: `{to}` is not a topic name"
                        )))
                    }
                }
            }
        }
        reply.correlation_id = meta.correlation_id.clone();
        reply.session_id = meta.session_id.clone();
        if reply.correlation_data.is_none() {
            if let Some(c) = meta.correlation_id.as_ref().or(meta.session_id.as_ref()) {
                reply.request_id = c.clone();
            }
        }
        // The earliest of: MQTT 5 expiry, the runtime's `deadline_ms` user property, and
        // `deadline_ms` in the JSON.
        let now_ms = now_ms();
        let mut deadline: Option<Instant> = msg
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| msg.received + Duration::from_secs(u64::from(s)));
        let user_deadline = msg
            .user_property("deadline_ms")
            .and_then(|v| v.parse().ok());
        for ms in [user_deadline, meta.deadline_ms].into_iter().flatten() {
            let at = msg.received + Duration::from_millis(ms.saturating_sub(now_ms));
            if ms <= now_ms {
                return Err(ErrorBody::new(
                    code::TIMEOUT,
                    format!(
                        "deadline passed {} ms before the request was handled",
                        now_ms - ms
                    ),
                ));
            }
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(ErrorBody::new(
                code::TIMEOUT,
                "deadline passed before the request was handled",
            ));
        }
        if let Some(schema) = &self.spec.schema {
            schema.check(&data).map_err(ServiceError::bad_request)?;
        }
        let budget = match deadline {
            Some(d) => self
                .spec
                .timeout
                .min(d.saturating_duration_since(Instant::now())),
            None => self.spec.timeout,
        };
        let req = Request {
            data,
            topic: msg.topic.clone(),
            correlation_id: meta.correlation_id.or(meta.session_id),
            deadline,
            user_properties: msg
                .properties
                .as_ref()
                .map(|p| p.user_properties.clone())
                .unwrap_or_default(),
            bus: self.service.bus.clone(),
            events: Emitter(self.service.clone()),
        };
        let fut = AssertUnwindSafe(self.handler.call(req)).catch_unwind();
        match tokio::time::timeout(budget, fut).await {
            Err(_) => Err(ErrorBody::new(
                code::TIMEOUT,
                format!("handler did not finish within {budget:?}"),
            )),
            Ok(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                tracing::error!(service = %self.service.name, endpoint = %self.spec.name, correlation_id = %reply.request_id, panic = %what, "handler panicked");
                Err(ServiceError::internal(format!("handler panicked: {what}")))
            }
            Ok(Ok(r)) => r,
        }
    }

    fn encode(
        &self,
        reply: &ReplyTo,
        result: Result<Value, ServiceError>,
    ) -> (String, Bytes, PublishOptions) {
        let (success, data, error) = match result {
            Ok(v) => (true, Some(v), None),
            Err(e) => (false, None, Some(e)),
        };
        let status = error
            .as_ref()
            .map_or_else(|| "ok".to_owned(), |e| e.code.clone());
        let topic = match &reply.topic {
            Some(t) => t.clone(),
            None if success => self.result_topic.clone(),
            None => self.error_topic.clone(),
        };
        let body = ReplyBody {
            success,
            data,
            error,
            request_id: reply.request_id.clone(),
            correlation_id: reply.correlation_id.clone(),
            session_id: reply.session_id.clone(),
            service: Some(self.service.name.clone()),
            instance: Some(self.service.instance.clone()),
            timestamp: timestamp(),
        };
        let mut payload = serde_json::to_vec(&body).unwrap_or_default();
        let limit = self.service.bus.options().max_payload;
        if payload.len() + topic.len() + crate::bus::PACKET_OVERHEAD > limit {
            let body = ReplyBody {
                success: false,
                data: None,
                error: Some(ErrorBody::new(
                    code::PAYLOAD_TOO_LARGE,
                    format!(
                        "reply of {} bytes exceeds the limit of {limit} bytes",
                        payload.len()
                    ),
                )),
                ..body
            };
            payload = serde_json::to_vec(&body).unwrap_or_default();
        }
        let properties = PublishProperties {
            payload_format_indicator: Some(1),
            correlation_data: reply.correlation_data.clone(),
            user_properties: vec![("status".into(), status)],
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        let opts = PublishOptions {
            qos: reply.qos,
            retain: false,
            properties: Some(properties),
        };
        (topic, Bytes::from(payload), opts)
    }

    async fn publish_reply(&self, encoded: &Encoded, correlation: &str) {
        let (topic, payload, opts) = &**encoded;
        if let Err(e) = self
            .service
            .bus
            .publish(topic, payload.clone(), opts.clone())
            .await
        {
            tracing::warn!(service = %self.service.name, endpoint = %self.spec.name, correlation_id = correlation, topic, error = %e, "reply not sent");
        }
    }

    async fn dead_letter(&self, msg: &Message, error: &ErrorBody, correlation: &str) {
        let letter = dead_letter_body(
            &self.service.name,
            &self.service.instance,
            &msg.topic,
            &msg.payload,
            error,
        );
        tracing::warn!(
            service = %self.service.name,
            endpoint = %self.spec.name,
            correlation_id = correlation,
            topic = %msg.topic,
            code = %error.code,
            error = %error.message,
            "request refused; dead letter published"
        );
        let _ = self
            .service
            .bus
            .publish_json(&self.service.deadletter, &letter, PublishOptions::qos(1))
            .await;
    }
}

/// What tells copies of one request apart: the MQTT 5 correlation data, or else the
/// `correlation_id` (or `session_id`) of a JSON object payload. `None`: no correlation, so no
/// duplicate detection.
fn dedupe_correlation(msg: &Message) -> Option<Bytes> {
    if let Some(c) = msg.correlation_data() {
        return Some(c.clone());
    }
    #[derive(serde::Deserialize)]
    struct Ids {
        correlation_id: Option<Value>,
        session_id: Option<Value>,
    }
    let ids: Ids = serde_json::from_slice(&msg.payload).ok()?;
    let id = ids.correlation_id.or(ids.session_id)?;
    Some(Bytes::from(id.to_string()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The body of a dead letter: the original topic and payload (base64 when not UTF-8, and cut
/// to 64 KiB), the error, and when.
pub fn dead_letter_body(
    service: &str,
    instance: &str,
    topic: &str,
    payload: &[u8],
    error: &ErrorBody,
) -> DeadLetter {
    let cut = &payload[..payload.len().min(DeadLetter::KEEP)];
    let (text, base64) = match std::str::from_utf8(cut) {
        Ok(s) => (Some(s.to_owned()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(cut)),
        ),
    };
    DeadLetter {
        service: service.to_owned(),
        instance: instance.to_owned(),
        topic: topic.to_owned(),
        payload: text,
        payload_base64: base64,
        payload_bytes: payload.len(),
        truncated: payload.len() > DeadLetter::KEEP,
        error: error.clone(),
        time: timestamp(),
    }
}

/// Where the reply to a request goes, read from the request as the contract says (response
/// topic with correlation data, `reply_to`, or `{base}/result|error`). It can be kept (it is
/// serializable) and used later: the orchestrator answers a saga request after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplyAddress {
    /// The reply topic; `None`: `{base}/result` or `{base}/error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The request topic without `/request`, for `{base}/result|error`.
    pub base: String,
    /// MQTT 5 correlation data, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<String>,
    /// The JSON `correlation_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The JSON `session_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// QoS of the reply.
    pub qos: u8,
}

impl ReplyAddress {
    /// The address of `msg`, given its metadata (already taken out of the payload).
    pub fn of(msg: &Message, meta: &RequestMeta) -> ReplyAddress {
        let topic = match (msg.response_topic(), &meta.reply_to) {
            (Some(t), _) => Some(t.to_owned()),
            (None, Some(t)) if check_topic(t).is_ok() && !t.starts_with('$') => Some(t.clone()),
            _ => None,
        };
        ReplyAddress {
            topic,
            base: msg
                .topic
                .strip_suffix("/request")
                .unwrap_or(&msg.topic)
                .to_owned(),
            correlation_data: msg
                .correlation_data()
                .map(|c| base64::engine::general_purpose::STANDARD.encode(c)),
            correlation_id: meta.correlation_id.clone(),
            session_id: meta.session_id.clone(),
            qos: msg.qos.min(1),
        }
    }

    /// Publishes the reply: `data` in the body either way, `error` when it failed.
    pub fn reply(
        &self,
        bus: &Bus,
        service: Option<&str>,
        instance: &str,
        data: Option<Value>,
        error: Option<ErrorBody>,
    ) -> Result<(), BusError> {
        let correlation_data = self.correlation_data.as_ref().and_then(|c| {
            base64::engine::general_purpose::STANDARD
                .decode(c)
                .ok()
                .map(Bytes::from)
        });
        let request_id = match (&correlation_data, &self.correlation_id, &self.session_id) {
            (Some(c), _, _) => String::from_utf8_lossy(c).into_owned(),
            (None, Some(c), _) | (None, None, Some(c)) => c.clone(),
            _ => format!("{:016x}", random_u64()),
        };
        let success = error.is_none();
        let topic = match &self.topic {
            Some(t) => t.clone(),
            None if success => format!("{}/result", self.base),
            None => format!("{}/error", self.base),
        };
        let status = error
            .as_ref()
            .map_or_else(|| "ok".to_owned(), |e| e.code.clone());
        let body = ReplyBody {
            success,
            data,
            error,
            request_id,
            correlation_id: self.correlation_id.clone(),
            session_id: self.session_id.clone(),
            service: service.map(str::to_owned),
            instance: Some(instance.to_owned()),
            timestamp: timestamp(),
        };
        let payload = serde_json::to_vec(&body).map_err(|e| BusError::Encode(e.to_string()))?;
        let properties = PublishProperties {
            payload_format_indicator: Some(1),
            correlation_data,
            user_properties: vec![("status".into(), status)],
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        bus.try_publish(
            &topic,
            payload,
            PublishOptions {
                qos: self.qos,
                retain: false,
                properties: Some(properties),
            },
        )
    }
}

/// Answers a request message with `error`, routed as the contract says (response topic with
/// correlation data, `reply_to`, or `{base}/error`), without waiting. For parts of the bus
/// that answer for others, such as discovery's `NO_RESPONDERS`.
pub fn reply_error(
    bus: &Bus,
    msg: &Message,
    instance: &str,
    error: ErrorBody,
) -> Result<(), BusError> {
    let mut data: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
    let meta = RequestMeta::take(&mut data).unwrap_or_default();
    ReplyAddress::of(msg, &meta).reply(bus, None, instance, None, Some(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Put {
        key: String,
        value: Value,
        #[serde(default)]
        nested: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    #[test]
    fn decode_errors_name_the_field_and_speak_json() {
        let e = decode_payload::<Put>(serde_json::json!({"key": 5})).unwrap_err();
        assert!(
            e.starts_with("field `key`: invalid type: integer `5`"),
            "{e}"
        );
        let e = decode_payload::<Put>(
            serde_json::json!({"key": "a", "value": 1, "nested": {"n": "x"}}),
        )
        .unwrap_err();
        assert!(e.starts_with("field `nested.n`:"), "{e}");
        let e = decode_payload::<Put>(Value::Null).unwrap_err();
        assert!(e.starts_with("payload: empty;"), "{e}");
        assert!(e.contains("expected a JSON object"), "{e}");
        assert!(!e.contains("Put"), "a Rust type name leaked: {e}");
        let e = decode_payload::<Put>(serde_json::json!([1])).unwrap_err();
        assert!(!e.contains("Put"), "a Rust type name leaked: {e}");
        let e = decode_payload::<Put>(serde_json::json!({"value": 1})).unwrap_err();
        assert_eq!(e, "payload: missing field `key`");
    }
}
