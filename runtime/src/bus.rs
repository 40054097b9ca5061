//! One resilient MQTT 5 connection per process, shared by every part of a service.
//!
//! A single task owns rumqttc's event loop. Handles ([`Bus`]) publish through rumqttc's bounded
//! request channel and receive through bounded per-subscription channels. What rumqttc leaves
//! to its user is done here (see the rumqtt notes, section 4):
//! - reconnects back off exponentially with jitter instead of spinning;
//! - every CONNACK re-subscribes every filter, then re-publishes what was in flight or queued
//!   when the connection broke (rumqttc would discard it on a clean session);
//! - TCP_NODELAY on, packet limits and the v5 in-flight window set, so a v5 client costs
//!   kilobytes rather than 14 MB;
//! - a publish while disconnected waits at most `publish_timeout` for queue space, then fails
//!   with [`BusError::Backpressure`]; every such drop is counted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    Filter, LastWill, LastWillProperties, Packet, Publish, PublishProperties, Subscribe,
    SubscribeProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Request};
use rumqttc::Outgoing;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::topic::{check_filter, check_topic, matches};

/// How a [`Bus`] connects. Its `Debug` never shows the password.
#[derive(Clone)]
pub struct BusOptions {
    /// Broker address, `host:port`.
    pub broker: String,
    /// MQTT client id; unique per process.
    pub client_id: String,
    /// Topic prefix (`edge`).
    pub prefix: String,
    /// Username and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// MQTT keep-alive (at least 5 s: rumqttc's v5 client refuses less). A dead broker is
    /// noticed after about twice this.
    pub keep_alive: Duration,
    /// Publishes queued while the connection is busy or down.
    pub queue_capacity: usize,
    /// How long `publish` waits for queue space before failing.
    pub publish_timeout: Duration,
    /// Largest payload this bus publishes (the broker's `max_payload`); larger ones fail at
    /// once instead of getting the connection closed.
    pub max_payload: usize,
    /// Largest packet accepted from the broker.
    pub max_incoming_packet: u32,
    /// Outgoing QoS 1 messages in flight before the client waits for acks.
    pub inflight: u16,
    /// First reconnect delay; doubles per failure up to `backoff_max`, with ±25 % jitter.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Messages kept to re-publish after a reconnect; beyond it the oldest are dropped (counted).
    pub requeue_limit: usize,
    /// Buffer of each subscription; a consumer that falls further behind loses messages,
    /// counted per subscription.
    pub subscription_buffer: usize,
    /// Topic replies to this client's requests come back on; `None`:
    /// `{prefix}/system/reply/{client_id}`, so that every bus can make requests.
    pub reply_topic: Option<String>,
    /// Last Will, published by the broker when this connection dies.
    pub will: Option<Will>,
    /// Who this connection is, when it is a service instance (registration and heartbeats).
    pub presence: Option<crate::presence::Identity>,
    /// Listen for the edgebus broker's lag reports (`{prefix}/system/broker/lag`): messages
    /// the broker dropped for this client (it took nothing for the broker's
    /// `slow_subscriber_timeout`, or its offline queue was full) are then counted, logged,
    /// charged to the subscriptions they were for, and sent to [`Bus::lag_events`].
    pub watch_lag: bool,
}

impl std::fmt::Debug for BusOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let credentials = self
            .credentials
            .as_ref()
            .map(|(user, _)| format!("{user}:<redacted>"));
        f.debug_struct("BusOptions")
            .field("broker", &self.broker)
            .field("client_id", &self.client_id)
            .field("prefix", &self.prefix)
            .field("credentials", &credentials)
            .field("keep_alive", &self.keep_alive)
            .field("queue_capacity", &self.queue_capacity)
            .field("publish_timeout", &self.publish_timeout)
            .field("max_payload", &self.max_payload)
            .field("max_incoming_packet", &self.max_incoming_packet)
            .field("inflight", &self.inflight)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("requeue_limit", &self.requeue_limit)
            .field("subscription_buffer", &self.subscription_buffer)
            .field("reply_topic", &self.reply_topic)
            .field("will", &self.will)
            .field("presence", &self.presence)
            .field("watch_lag", &self.watch_lag)
            .finish()
    }
}

/// A Last Will message.
#[derive(Debug, Clone)]
pub struct Will {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS 0 or 1.
    pub qos: u8,
    /// Retained or not.
    pub retain: bool,
}

impl BusOptions {
    /// Options with defaults for a small host: 5 s keep-alive, 256-message queue, 256 KiB payloads.
    pub fn new(broker: impl Into<String>, client_id: impl Into<String>) -> BusOptions {
        BusOptions {
            broker: broker.into(),
            client_id: client_id.into(),
            prefix: "edge".into(),
            credentials: None,
            keep_alive: Duration::from_secs(5),
            queue_capacity: 256,
            publish_timeout: Duration::from_secs(2),
            max_payload: 256 * 1024,
            max_incoming_packet: 1024 * 1024 + 1024,
            inflight: 100,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            requeue_limit: 1024,
            subscription_buffer: 1024,
            reply_topic: None,
            will: None,
            presence: None,
            watch_lag: false,
        }
    }

    /// Sets the topic prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

/// Why a bus operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The bus was closed.
    #[error("the bus is closed")]
    Closed,
    /// The publish queue stayed full for `publish_timeout` (broker down or too slow).
    #[error("publish queue full for {0:?} (broker unreachable or too slow); message dropped")]
    Backpressure(Duration),
    /// The payload exceeds `max_payload`.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Payload size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The broker address is not `host:port`.
    #[error("broker address `{0}` is not host:port")]
    InvalidAddress(String),
    /// A topic or filter is not valid.
    #[error("invalid topic `{0}`: {1}")]
    InvalidTopic(String, &'static str),
    /// A value could not be encoded as JSON.
    #[error("cannot encode the message: {0}")]
    Encode(String),
}

/// A message received from the broker.
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic it was published on.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// QoS it arrived with.
    pub qos: u8,
    /// Whether it is a retained message sent on subscription.
    pub retain: bool,
    /// MQTT 5 properties.
    pub properties: Option<PublishProperties>,
    /// When it arrived.
    pub received: Instant,
}

impl Message {
    /// The MQTT 5 response topic, if any.
    pub fn response_topic(&self) -> Option<&str> {
        self.properties.as_ref()?.response_topic.as_deref()
    }

    /// The MQTT 5 correlation data, if any.
    pub fn correlation_data(&self) -> Option<&Bytes> {
        self.properties.as_ref()?.correlation_data.as_ref()
    }

    /// The MQTT 5 user property `key`, if any.
    pub fn user_property(&self, key: &str) -> Option<&str> {
        self.properties
            .as_ref()?
            .user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What to attach to a publish.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// QoS 0 or 1.
    pub qos: u8,
    /// Retain at the broker.
    pub retain: bool,
    /// MQTT 5 properties (response topic, correlation data, user properties, expiry).
    pub properties: Option<PublishProperties>,
}

impl PublishOptions {
    /// QoS `qos`, not retained, no properties.
    pub fn qos(qos: u8) -> Self {
        PublishOptions {
            qos,
            ..Default::default()
        }
    }

    /// QoS 1, retained, no properties: registrations, status records, run records, and the
    /// empty payload that deletes one.
    pub const fn retained() -> Self {
        PublishOptions {
            qos: 1,
            retain: true,
            properties: None,
        }
    }
}

/// Counters of one bus; all monotonic except `connected`.
#[derive(Debug, Default, Serialize, Clone)]
pub struct BusStats {
    /// Whether the connection is up.
    pub connected: bool,
    /// Successful connects (the first one included).
    pub connects: u64,
    /// Messages handed to the connection.
    pub published: u64,
    /// Publishes that failed (queue full, too large, closed).
    pub publish_failed: u64,
    /// Messages re-published after a reconnect.
    pub republished: u64,
    /// Messages dropped from the re-publish queue because it was full.
    pub requeue_dropped: u64,
    /// Messages received.
    pub received: u64,
    /// Messages dropped because a subscription's buffer was full.
    pub dropped_incoming: u64,
    /// Subscriptions the broker refused.
    pub subscribe_refused: u64,
    /// Requests sent again by a retry policy.
    pub request_retries: u64,
    /// Requests failed at once because their target's circuit was open.
    pub circuit_rejected: u64,
    /// Requests that failed after their retries and were dead-lettered.
    pub dead_letters: u64,
    /// Messages for this client the broker dropped because it fell behind (edgebus broker
    /// lag reports; see [`BusOptions::watch_lag`]).
    pub skipped_at_broker: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    connects: AtomicU64,
    published: AtomicU64,
    publish_failed: AtomicU64,
    republished: AtomicU64,
    requeue_dropped: AtomicU64,
    received: AtomicU64,
    dropped_incoming: AtomicU64,
    subscribe_refused: AtomicU64,
    pub(crate) request_retries: AtomicU64,
    pub(crate) circuit_rejected: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    skipped_at_broker: AtomicU64,
}

/// Called with a message a full subscription buffer could not take.
pub type OverflowFn = Box<dyn Fn(Message) + Send + Sync>;

struct Subscription {
    id: u64,
    /// The MQTT 5 subscription identifier sent with `filter` (shared by every local
    /// subscription to the same wire filter), so that a message that matches several
    /// overlapping filters reaches each subscription once.
    sid: usize,
    /// What is sent to the broker (may be `$share/{group}/…`).
    filter: String,
    /// What incoming topics are matched against.
    matcher: String,
    qos: QoS,
    tx: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
    overflow: Option<OverflowFn>,
}

type ConnectHook = Arc<dyn Fn(&Bus) + Send + Sync>;

struct Inner {
    client: AsyncClient,
    options: BusOptions,
    subs: RwLock<Vec<Arc<Subscription>>>,
    next_sub: AtomicU64,
    /// Whether the broker takes subscription identifiers (CONNACK says).
    sub_ids: AtomicBool,
    counters: Counters,
    connected: watch::Sender<bool>,
    /// Why the last connection attempt failed; cleared by a CONNACK.
    failure: watch::Sender<Option<ConnectFailure>>,
    hooks: Mutex<Vec<ConnectHook>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Message>>>,
    next_request: AtomicU64,
    request_nonce: u64,
    unmatched_replies: AtomicU64,
    /// Lag reports for this client.
    lag: tokio::sync::broadcast::Sender<LagEvent>,
    /// Retry and circuit policies of request targets, by request topic.
    policies: RwLock<HashMap<String, Arc<TargetPolicy>>>,
    closing: AtomicBool,
    /// When the event loop is next due to turn (ms since `epoch`): it turns at least once
    /// per keep-alive while connected, and once per reconnect attempt while not.
    loop_due: AtomicU64,
    epoch: Instant,
    shutdown: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A handle on the bus connection; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("client_id", &self.inner.options.client_id)
            .field("broker", &self.inner.options.broker)
            .finish()
    }
}

/// A stream of messages from one subscription.
#[derive(Debug)]
pub struct Subscriber {
    rx: mpsc::Receiver<Message>,
    dropped: Arc<AtomicU64>,
    filter: String,
    id: u64,
    bus: std::sync::Weak<Inner>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            forget(&inner, &[self.id]);
        }
    }
}

impl Subscriber {
    /// Stops the subscription: the broker sends no more (once no other subscriber on this
    /// bus uses the same filter), and [`Subscriber::recv`] returns what is already buffered,
    /// then `None`.
    pub fn unsubscribe(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            forget(&inner, &[self.id]);
        }
        self.rx.close();
    }

    /// The next message; `None` once the bus is closed.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// The next message if one is buffered now.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// Messages lost because this subscriber fell more than its buffer behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The filter subscribed to.
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// Polls for the next message (for `Stream` implementations).
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn qos_num(q: QoS) -> u8 {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

/// How long a connection must hold before the reconnect backoff starts over.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// The largest MQTT 5 subscription identifier.
const MAX_SUBSCRIPTION_ID: usize = 268_435_455;

/// Room kept in every packet for the fixed header, properties and correlation data.
pub const PACKET_OVERHEAD: usize = 1024;

/// A fresh random `u64` (for ids and jitter).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // No OS randomness: std's per-process random hasher keys over the wall clock, the
        // pid and a counter, so two calls never return the same value.
        use std::hash::{BuildHasher, Hasher};
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        h.write_u128(now.as_nanos());
        h.write_u32(std::process::id());
        h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
        return h.finish();
    }
    u64::from_le_bytes(b)
}

impl Bus {
    /// Starts the connection task and returns at once; the connection comes up in the
    /// background (see [`Bus::wait_connected`]). Must be called inside a tokio runtime.
    pub fn connect(mut options: BusOptions) -> Result<Bus, BusError> {
        if options.reply_topic.is_none() {
            let topic = edgebus_proto::tree::Tree::new(&options.prefix).reply(&options.client_id);
            // A client id a topic level cannot hold (`+`, `#`) gets no reply topic.
            options.reply_topic = check_topic(&topic).is_ok().then_some(topic);
        }
        let (host, port) = split_host_port(&options.broker)
            .ok_or_else(|| BusError::InvalidAddress(options.broker.clone()))?;
        let mut mqtt = MqttOptions::new(options.client_id.clone(), host, port);
        mqtt.set_keep_alive(options.keep_alive.max(Duration::from_secs(5)));
        mqtt.set_clean_start(true);
        mqtt.set_max_packet_size(Some(options.max_incoming_packet));
        mqtt.set_outgoing_inflight_upper_limit(options.inflight.max(1));
        mqtt.set_connection_timeout(5);
        if let Some((u, p)) = &options.credentials {
            mqtt.set_credentials(u.clone(), p.clone());
        }
        if let Some(w) = &options.will {
            mqtt.set_last_will(LastWill {
                topic: Bytes::copy_from_slice(w.topic.as_bytes()),
                message: w.payload.clone(),
                qos: qos_of(w.qos),
                retain: w.retain,
                properties: Some(LastWillProperties {
                    delay_interval: None,
                    payload_format_indicator: Some(1),
                    message_expiry_interval: None,
                    content_type: Some("application/json".into()),
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                }),
            });
        }
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(5);
        mqtt.set_network_options(net);
        let (client, eventloop) = AsyncClient::new(mqtt, options.queue_capacity.max(1));
        let (connected, _) = watch::channel(false);
        let (failure, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            client,
            options,
            subs: RwLock::new(Vec::new()),
            next_sub: AtomicU64::new(1),
            sub_ids: AtomicBool::new(true),
            counters: Counters::default(),
            connected,
            failure,
            hooks: Mutex::new(Vec::new()),
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            request_nonce: random_u64(),
            unmatched_replies: AtomicU64::new(0),
            policies: RwLock::new(HashMap::new()),
            lag: tokio::sync::broadcast::channel(16).0,
            closing: AtomicBool::new(false),
            loop_due: AtomicU64::new(0),
            epoch: Instant::now(),
            shutdown: CancellationToken::new(),
            task: Mutex::new(None),
        });
        let bus = Bus { inner };
        bus.inner.expect_turn_within(Duration::from_secs(5));
        if let Some(reply) = bus.inner.options.reply_topic.clone() {
            bus.register_reply_subscription(reply)?;
        }
        if bus.inner.options.watch_lag {
            bus.register_lag_subscription();
        }
        let task = tokio::spawn(drive(Arc::downgrade(&bus.inner), eventloop));
        *lock(&bus.inner.task) = Some(task);
        Ok(bus)
    }

    /// How long the event loop is overdue, if it is: it turns at least once per keep-alive
    /// while connected (the ping) and once per attempt while reconnecting, so a loop that
    /// stays overdue is stuck (a blocked task, a deadlock). A closed bus is never overdue.
    pub fn event_loop_stalled(&self) -> Option<Duration> {
        if self.inner.closing.load(Ordering::Relaxed) || self.inner.shutdown.is_cancelled() {
            return None;
        }
        let now = self.inner.epoch.elapsed().as_millis() as u64;
        let due = self.inner.loop_due.load(Ordering::Relaxed);
        (now > due).then(|| Duration::from_millis(now - due))
    }

    /// The options this bus was made with.
    pub fn options(&self) -> &BusOptions {
        &self.inner.options
    }

    /// The topic prefix (`edge`).
    pub fn prefix(&self) -> &str {
        &self.inner.options.prefix
    }

    /// The MQTT client id.
    pub fn client_id(&self) -> &str {
        &self.inner.options.client_id
    }

    /// Whether the connection is up now.
    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
    }

    /// Waits until the connection is up, at most `timeout`; returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.connected.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits for the first outcome of connecting, at most `timeout`: `Ok` once connected,
    /// or why the last attempt failed, as soon as one has (the connection task keeps
    /// retrying in the background). A caller that makes one request (`edgebus call`) fails
    /// at once with the reason instead of waiting out its timeout.
    pub async fn connect_outcome(&self, timeout: Duration) -> Result<(), ConnectFailure> {
        let mut connected = self.inner.connected.subscribe();
        let mut failure = self.inner.failure.subscribe();
        let wait = async {
            loop {
                if *connected.borrow_and_update() {
                    return Ok(());
                }
                if let Some(f) = failure.borrow_and_update().clone() {
                    return Err(f);
                }
                tokio::select! {
                    r = connected.changed() => if r.is_err() { return Err(ConnectFailure::Closed) },
                    r = failure.changed() => if r.is_err() { return Err(ConnectFailure::Closed) },
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err(ConnectFailure::NoAnswer(timeout)))
    }

    /// A receiver that changes whenever the connection goes up or down.
    pub fn connection_state(&self) -> watch::Receiver<bool> {
        self.inner.connected.subscribe()
    }

    /// Runs `hook` after every CONNACK (and now, if connected): births, state to restore.
    pub fn on_connect(&self, hook: impl Fn(&Bus) + Send + Sync + 'static) {
        let hook: ConnectHook = Arc::new(hook);
        // The connection task sets the flag and copies the hooks under this lock, so a hook
        // added during a CONNACK runs exactly once for it.
        let now = {
            let mut hooks = lock(&self.inner.hooks);
            hooks.push(hook.clone());
            self.is_connected()
        };
        if now {
            hook(self);
        }
    }

    /// The bus's counters.
    pub fn stats(&self) -> BusStats {
        let c = &self.inner.counters;
        BusStats {
            connected: self.is_connected(),
            connects: c.connects.load(Ordering::Relaxed),
            published: c.published.load(Ordering::Relaxed),
            publish_failed: c.publish_failed.load(Ordering::Relaxed),
            republished: c.republished.load(Ordering::Relaxed),
            requeue_dropped: c.requeue_dropped.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            dropped_incoming: c.dropped_incoming.load(Ordering::Relaxed),
            subscribe_refused: c.subscribe_refused.load(Ordering::Relaxed),
            request_retries: c.request_retries.load(Ordering::Relaxed),
            circuit_rejected: c.circuit_rejected.load(Ordering::Relaxed),
            dead_letters: c.dead_letters.load(Ordering::Relaxed),
            skipped_at_broker: c.skipped_at_broker.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Sets how requests to `target` (`service/endpoint` or a request topic) are retried and
    /// whether a circuit breaker guards them; replaces an earlier policy and its breaker state.
    pub fn set_policy(
        &self,
        target: &str,
        retry: Option<crate::policy::RetryPolicy>,
        circuit: Option<crate::policy::CircuitConfig>,
    ) {
        let topic = self.request_topic(target);
        let name = topic
            .strip_prefix(&format!("{}/", self.prefix()))
            .unwrap_or(&topic)
            .trim_end_matches("/request")
            .to_owned();
        let policy = TargetPolicy {
            name,
            retry,
            circuit: circuit.map(crate::policy::CircuitBreaker::new),
        };
        write(&self.inner.policies).insert(topic, Arc::new(policy));
    }

    /// Sets the retry and circuit policies every endpoint of `services` declares (endpoints
    /// that declare neither keep what they had).
    pub fn apply_contract(&self, services: &[crate::contract::ServiceSpec]) {
        for s in services {
            for e in &s.endpoints {
                if e.retry.is_some() || e.circuit.is_some() {
                    let topic = format!("{}/request", e.base_topic(self.prefix(), &s.name));
                    let known = read(&self.inner.policies).get(&topic).is_some_and(|p| {
                        p.retry == e.retry
                            && p.circuit.as_ref().map(|c| c.config()) == e.circuit.as_ref()
                    });
                    if !known {
                        self.set_policy(&topic, e.retry.clone(), e.circuit.clone());
                    }
                }
            }
        }
    }

    /// The policy for requests on `topic`, if one was set.
    pub fn policy(&self, topic: &str) -> Option<Arc<TargetPolicy>> {
        read(&self.inner.policies).get(topic).cloned()
    }

    /// The state of every circuit breaker, by `service/endpoint`.
    pub fn circuits(&self) -> std::collections::BTreeMap<String, crate::policy::CircuitSnapshot> {
        read(&self.inner.policies)
            .values()
            .filter_map(|p| Some((p.name.clone(), p.circuit.as_ref()?.snapshot())))
            .collect()
    }

    /// Replies that matched no waiting request (late, after a timeout, or duplicated).
    pub fn unmatched_replies(&self) -> u64 {
        self.inner.unmatched_replies.load(Ordering::Relaxed)
    }

    fn check_publish(&self, topic: &str, len: usize) -> Result<(), BusError> {
        if let Err(reason) = check_topic(topic) {
            return Err(BusError::InvalidTopic(topic.into(), reason));
        }
        if topic.len() > usize::from(u16::MAX) {
            return Err(BusError::InvalidTopic(
                topic.chars().take(64).collect(),
                "longer than 65535 bytes",
            ));
        }
        // The broker's limit covers the whole packet: topic and properties count too, and a
        // packet it refuses would be re-sent after every reconnect.
        let limit = self.inner.options.max_payload;
        let size = len + topic.len() + PACKET_OVERHEAD;
        if size > limit {
            return Err(BusError::TooLarge { size, limit });
        }
        Ok(())
    }

    fn count_publish<T>(&self, r: Result<T, BusError>) -> Result<T, BusError> {
        let c = &self.inner.counters;
        match &r {
            Ok(_) => c.published.fetch_add(1, Ordering::Relaxed),
            Err(_) => c.publish_failed.fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    /// Publishes a message. Returns once it is queued for the connection (not when the
    /// broker acknowledged it). Waits at most `publish_timeout` for queue space.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        options: PublishOptions,
    ) -> Result<(), BusError> {
        let payload = payload.into();
        let r = async {
            self.check_publish(topic, payload.len())?;
            if self.inner.closing.load(Ordering::Relaxed) {
                return Err(BusError::Closed);
            }
            let wait = self.inner.options.publish_timeout;
            let send = self.inner.client.publish_bytes_with_properties(
                topic,
                qos_of(options.qos),
                options.retain,
                payload,
                options.properties.unwrap_or_default(),
            );
            queue(wait, send).await
        }
        .await;
        if let Err(e) = &r {
            tracing::debug!(topic, error = %e, "publish failed");
        }
        self.count_publish(r)
    }

    /// Publishes without waiting: fails at once when the queue is full.
    pub fn try_publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        options: PublishOptions,
    ) -> Result<(), BusError> {
        let payload = payload.into();
        let r = self.check_publish(topic, payload.len()).and_then(|()| {
            self.inner
                .client
                .try_publish_with_properties(
                    topic,
                    qos_of(options.qos),
                    options.retain,
                    payload,
                    options.properties.unwrap_or_default(),
                )
                .map_err(|_| BusError::Backpressure(Duration::ZERO))
        });
        self.count_publish(r)
    }

    /// Publishes `value` as JSON.
    pub async fn publish_json<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
        options: PublishOptions,
    ) -> Result<(), BusError> {
        let payload = serde_json::to_vec(value).map_err(|e| BusError::Encode(e.to_string()));
        self.publish(topic, payload?, options).await
    }

    /// Subscribes to `filter`. The subscription is restored after every reconnect.
    pub async fn subscribe(&self, filter: &str, qos: u8) -> Result<Subscriber, BusError> {
        self.subscribe_with(filter, filter, qos, None).await
    }

    /// Subscribes through the shared group `group`, so that each message goes to one member.
    pub async fn subscribe_shared(
        &self,
        group: &str,
        filter: &str,
        qos: u8,
    ) -> Result<Subscriber, BusError> {
        let shared = format!("$share/{group}/{filter}");
        self.subscribe_with(&shared, filter, qos, None).await
    }

    /// Subscribes with full control: `wire` is sent to the broker, `matcher` matches incoming
    /// topics, and `overflow` gets what a full buffer cannot take (instead of counting a drop).
    pub async fn subscribe_with(
        &self,
        wire: &str,
        matcher: &str,
        qos: u8,
        overflow: Option<OverflowFn>,
    ) -> Result<Subscriber, BusError> {
        if let Err(reason) = check_filter(matcher) {
            return Err(BusError::InvalidTopic(matcher.into(), reason));
        }
        if self.inner.closing.load(Ordering::Relaxed) {
            return Err(BusError::Closed);
        }
        let (sub, subscriber) = self.new_subscription(wire, matcher, qos, overflow);
        // Queued for the connection; if it is down, the next CONNACK subscribes anyway.
        let wait = self.inner.options.publish_timeout;
        let send = self.inner.client.subscribe_with_properties(
            sub.filter.clone(),
            sub.qos,
            self.sub_properties(sub.sid),
        );
        // On failure, dropping `subscriber` forgets the subscription.
        queue(wait, send).await.map(|()| subscriber)
    }

    fn sub_properties(&self, sid: usize) -> SubscribeProperties {
        SubscribeProperties {
            id: self.inner.sub_ids.load(Ordering::Relaxed).then_some(sid),
            user_properties: Vec::new(),
        }
    }

    fn new_subscription(
        &self,
        wire: &str,
        matcher: &str,
        qos: u8,
        overflow: Option<OverflowFn>,
    ) -> (Arc<Subscription>, Subscriber) {
        let (tx, rx) = mpsc::channel(self.inner.options.subscription_buffer.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let id = self.inner.next_sub.fetch_add(1, Ordering::Relaxed);
        let mut subs = write(&self.inner.subs);
        let sid = subs
            .iter()
            .find(|s| s.filter == wire)
            .map_or((id as usize - 1) % MAX_SUBSCRIPTION_ID + 1, |s| s.sid);
        let sub = Arc::new(Subscription {
            id,
            sid,
            filter: wire.to_owned(),
            matcher: matcher.to_owned(),
            qos: qos_of(qos.min(1)),
            tx,
            dropped: dropped.clone(),
            overflow,
        });
        subs.push(sub.clone());
        let subscriber = Subscriber {
            rx,
            dropped,
            filter: matcher.to_owned(),
            id,
            bus: Arc::downgrade(&self.inner),
        };
        (sub, subscriber)
    }

    fn register_reply_subscription(&self, topic: String) -> Result<(), BusError> {
        if let Err(reason) = check_topic(&topic) {
            return Err(BusError::InvalidTopic(topic, reason));
        }
        let (_, mut subscriber) = self.new_subscription(&topic, &topic, 1, None);
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while let Some(msg) = subscriber.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                let key = msg
                    .correlation_data()
                    .map(|c| String::from_utf8_lossy(c).into_owned());
                let waiter = key.and_then(|k| lock(&inner.pending).remove(&k));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(msg);
                    }
                    None => {
                        inner.unmatched_replies.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Ok(())
    }

    fn register_lag_subscription(&self) {
        let topic = edgebus_proto::tree::Tree::new(self.prefix()).broker_lag();
        let (_, mut subscriber) = self.new_subscription(&topic, &topic, 0, None);
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while let Some(msg) = subscriber.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                let Ok(event) = serde_json::from_slice::<LagEvent>(&msg.payload) else {
                    continue;
                };
                if event.client_id != inner.options.client_id {
                    continue;
                }
                inner
                    .counters
                    .skipped_at_broker
                    .fetch_add(event.lost, Ordering::Relaxed);
                // The broker names the filter as it keeps it: a shared one without its group.
                let wire = |f: &str| {
                    f.strip_prefix("$share/")
                        .and_then(|r| r.split_once('/'))
                        .map_or(f.to_owned(), |(_, f)| f.to_owned())
                };
                for s in read(&inner.subs).iter() {
                    if wire(&s.filter) == event.filter {
                        s.dropped.fetch_add(event.lost, Ordering::Relaxed);
                    }
                }
                tracing::warn!(
                    filter = %event.filter,
                    lost = event.lost,
                    "the broker dropped messages for this client: it fell behind"
                );
                let _ = inner.lag.send(event);
            }
        });
    }

    /// Lag reports for this client, as they come (needs [`BusOptions::watch_lag`]).
    pub fn lag_events(&self) -> tokio::sync::broadcast::Receiver<LagEvent> {
        self.inner.lag.subscribe()
    }

    /// Registers a waiter for a reply and returns its correlation id and receiver. The
    /// waiter is removed when the receiver's request finishes (see [`ReplyGuard`]).
    pub(crate) fn expect_reply(&self) -> Option<(ReplyGuard, oneshot::Receiver<Message>)> {
        self.inner.options.reply_topic.as_ref()?;
        let n = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:016x}{n:x}", self.inner.request_nonce);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(id.clone(), tx);
        Some((
            ReplyGuard {
                bus: self.clone(),
                id,
            },
            rx,
        ))
    }

    /// Waits until everything this bus sent before the call has been processed by the
    /// broker: a message sent to the bus's own reply topic comes back. Subscriptions made
    /// before `sync` are active once it returns `true`.
    pub async fn sync(&self, timeout: Duration) -> bool {
        let Some((guard, rx)) = self.expect_reply() else {
            return false;
        };
        let Some(topic) = self.inner.options.reply_topic.clone() else {
            return false;
        };
        let props = PublishProperties {
            correlation_data: Some(Bytes::from(guard.id.clone())),
            ..Default::default()
        };
        let opts = PublishOptions {
            qos: 1,
            retain: false,
            properties: Some(props),
        };
        let round_trip =
            async { self.publish(&topic, Bytes::new(), opts).await.is_ok() && rx.await.is_ok() };
        tokio::time::timeout(timeout, round_trip)
            .await
            .unwrap_or(false)
    }

    /// Closes the connection: queued publishes are flushed (for at most `grace`), then a
    /// DISCONNECT is sent (so no Last Will is published) and the connection task ends.
    pub async fn close(&self, grace: Duration) {
        if self.inner.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        let task = lock(&self.inner.task).take();
        if self.is_connected() {
            let _ = tokio::time::timeout(grace, self.inner.client.disconnect()).await;
        }
        if let Some(task) = task {
            let stop = self.inner.shutdown.clone();
            let abort = task.abort_handle();
            if tokio::time::timeout(grace, task).await.is_err() {
                stop.cancel();
                abort.abort();
            }
        }
        self.inner.shutdown.cancel();
        self.inner.connected.send_replace(false);
        write(&self.inner.subs).clear();
        lock(&self.inner.pending).clear();
    }
}

/// Waits at most `wait` for room in rumqttc's request queue.
async fn queue<E>(
    wait: Duration,
    send: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), BusError> {
    match tokio::time::timeout(wait, send).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(BusError::Closed),
        Err(_) => Err(BusError::Backpressure(wait)),
    }
}

/// Removes a reply waiter when the request is done, however it ends.
pub(crate) struct ReplyGuard {
    bus: Bus,
    pub(crate) id: String,
}

impl ReplyGuard {
    /// Waits for another reply with the same correlation (after one was taken).
    pub(crate) fn rearm(&self) -> oneshot::Receiver<Message> {
        let (tx, rx) = oneshot::channel();
        lock(&self.bus.inner.pending).insert(self.id.clone(), tx);
        rx
    }
}

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        lock(&self.bus.inner.pending).remove(&self.id);
    }
}

/// Messages the broker dropped for this client, because the client fell further behind than
/// the broker queues for it (`filter` names the topic of the first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LagEvent {
    /// The client.
    pub client_id: String,
    /// The filter (without a `$share/{group}/` part).
    pub filter: String,
    /// Messages skipped.
    pub lost: u64,
    /// When the broker noticed.
    pub at: String,
}

/// How requests to one target are retried and guarded; see [`Bus::set_policy`].
#[derive(Debug)]
pub struct TargetPolicy {
    /// `service/endpoint`, for logs and stats.
    pub name: String,
    /// Retries; `None`: one attempt.
    pub retry: Option<crate::policy::RetryPolicy>,
    /// The circuit breaker, if any.
    pub circuit: Option<crate::policy::CircuitBreaker>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

/// Splits `host:port` (or `[v6]:port`).
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port))
}

fn jitter(d: Duration) -> Duration {
    // ±25 %.
    let f = 0.75 + (random_u64() % 1000) as f64 / 2000.0;
    d.mul_f64(f)
}

/// Why a connection attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectFailure {
    /// Nothing answered at the address (refused, unreachable, a name that does not resolve).
    #[error("cannot reach the broker: {0}")]
    Unreachable(String),
    /// The broker answered and refused the CONNECT (credentials, authorization, limits).
    #[error("the broker refused the connection: {0}")]
    Refused(String),
    /// Neither a CONNACK nor a failure within the time given.
    #[error("no answer from the broker within {}", humantime::format_duration(*.0))]
    NoAnswer(Duration),
    /// The bus was closed.
    #[error("the bus was closed")]
    Closed,
}

impl ConnectFailure {
    fn of(e: &ConnectionError) -> ConnectFailure {
        match e {
            ConnectionError::ConnectionRefused(code) => ConnectFailure::Refused(refusal(code)),
            other => ConnectFailure::Unreachable(describe(other)),
        }
    }
}

/// A CONNACK reason in words: `BadUserNamePassword` → "bad user name or password".
fn refusal(code: &rumqttc::v5::mqttbytes::v5::ConnectReturnCode) -> String {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    match code {
        C::BadUserNamePassword => "bad user name or password".into(),
        C::NotAuthorized => "not authorized".into(),
        C::QuotaExceeded => "quota exceeded (too many connections)".into(),
        other => {
            let name = format!("{other:?}");
            let mut words = String::new();
            for (i, c) in name.chars().enumerate() {
                if c.is_uppercase() && i > 0 {
                    words.push(' ');
                }
                words.extend(c.to_lowercase());
            }
            words
        }
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Io(io) => format!("{io}"),
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection: {}", refusal(code))
        }
        ConnectionError::Timeout(_) => "connect timed out".into(),
        other => other.to_string(),
    }
}

/// The connection task: polls the event loop, reconnects with backoff, dispatches messages.
async fn drive(weak: std::sync::Weak<Inner>, mut el: EventLoop) {
    let shutdown = match weak.upgrade() {
        Some(inner) => inner.shutdown.clone(),
        None => return,
    };
    let mut backoff: Option<Duration> = None;
    let mut requeue: VecDeque<Publish> = VecDeque::new();
    let mut down_since: Option<Instant> = None;
    let mut failures: u32 = 0;
    let mut up_since: Option<Instant> = None;
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = el.poll() => ev,
        };
        let Some(inner) = weak.upgrade() else { return };
        // The next turn comes with the next packet, or the keep-alive ping at the latest (a
        // ping unanswered fails the connection one keep-alive later).
        inner.expect_turn_within(inner.options.keep_alive.max(Duration::from_secs(5)) * 2);
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                up_since = Some(Instant::now());
                inner.failure.send_replace(None);
                inner.counters.connects.fetch_add(1, Ordering::Relaxed);
                let ids = ack
                    .properties
                    .as_ref()
                    .and_then(|p| p.subscription_identifiers_available)
                    != Some(0);
                inner.sub_ids.store(ids, Ordering::Relaxed);
                // Subscriptions first (one SUBSCRIBE per filter, as each carries its
                // identifier), then what the last connection left unsent.
                let subs = read(&inner.subs).clone();
                let mut pending: VecDeque<Request> = VecDeque::new();
                let mut seen = std::collections::HashSet::new();
                for s in subs.iter().filter(|s| seen.insert(s.filter.clone())) {
                    let props = SubscribeProperties {
                        id: ids.then_some(s.sid),
                        user_properties: Vec::new(),
                    };
                    pending.push_back(Request::Subscribe(Subscribe::new(
                        Filter::new(s.filter.clone(), s.qos),
                        Some(props),
                    )));
                }
                let n = requeue.len() as u64;
                inner.counters.republished.fetch_add(n, Ordering::Relaxed);
                pending.extend(requeue.drain(..).map(|mut p| {
                    p.pkid = 0;
                    p.dup = false;
                    Request::Publish(p)
                }));
                // Whatever rumqttc kept (only on a resumed session; we always start clean).
                pending.extend(el.pending.drain(..));
                el.pending = pending;
                match down_since.take() {
                    Some(t) => tracing::info!(
                        broker = %inner.options.broker,
                        after_ms = t.elapsed().as_millis() as u64,
                        republished = n,
                        session_present = ack.session_present,
                        "reconnected"
                    ),
                    None => tracing::debug!(broker = %inner.options.broker, "connected"),
                }
                let hooks = {
                    let hooks = lock(&inner.hooks);
                    inner.connected.send_replace(true);
                    hooks.clone()
                };
                let bus = Bus {
                    inner: inner.clone(),
                };
                for h in &hooks {
                    h(&bus);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => dispatch(&inner, p),
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                for code in &ack.return_codes {
                    if !matches!(code, SubscribeReasonCode::Success(_)) {
                        inner
                            .counters
                            .subscribe_refused
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::error!(reason = ?code, "the broker refused a subscription");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                tracing::warn!(reason = ?d.reason_code, "the broker closed the connection");
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                if inner.closing.load(Ordering::Relaxed) {
                    inner.connected.send_replace(false);
                    drop(inner);
                    // Keep polling until the broker closes the connection, so the DISCONNECT
                    // is surely flushed (else the broker publishes the Last Will).
                    let drain = async { while el.poll().await.is_ok() {} };
                    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if inner.closing.load(Ordering::Relaxed) {
                    inner.connected.send_replace(false);
                    return;
                }
                // Take what rumqttc would discard on the next clean CONNACK.
                for req in el.pending.drain(..) {
                    if let Request::Publish(p) = req {
                        requeue.push_back(p);
                    }
                }
                let limit = inner.options.requeue_limit;
                while requeue.len() > limit {
                    requeue.pop_front();
                    inner
                        .counters
                        .requeue_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
                let was_up = inner.connected.send_replace(false);
                inner.failure.send_replace(Some(ConnectFailure::of(&e)));
                failures += 1;
                if was_up {
                    down_since = Some(Instant::now());
                    tracing::warn!(broker = %inner.options.broker, error = %describe(&e), queued = requeue.len(), "connection lost; reconnecting");
                } else if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(broker = %inner.options.broker, error = %describe(&e), attempts = failures, "cannot connect; retrying");
                }
                let opts = &inner.options;
                // A connection that held for a while starts the backoff over; one the broker
                // drops straight after CONNACK keeps backing off.
                if up_since
                    .take()
                    .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION)
                {
                    backoff = None;
                }
                let delay = match backoff {
                    None => opts.backoff_min,
                    Some(d) => (d * 2).min(opts.backoff_max),
                };
                backoff = Some(delay);
                // Then a connection attempt, bounded by the 5 s connection timeout.
                inner.expect_turn_within(delay + delay / 4 + Duration::from_secs(5));
                drop(inner);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(jitter(delay)) => {}
                }
            }
        }
    }
}

impl Inner {
    /// Records that the event loop will turn again within `within` (plus a margin).
    fn expect_turn_within(&self, within: Duration) {
        let due = self.epoch.elapsed() + within + Duration::from_secs(5);
        self.loop_due
            .store(due.as_millis() as u64, Ordering::Relaxed);
    }
}

fn dispatch(inner: &Arc<Inner>, p: Publish) {
    inner.counters.received.fetch_add(1, Ordering::Relaxed);
    let Ok(topic) = std::str::from_utf8(&p.topic) else {
        tracing::warn!("message with a non-UTF-8 topic ignored");
        return;
    };
    let subs = read(&inner.subs);
    let msg = Message {
        topic: topic.to_owned(),
        payload: p.payload,
        qos: qos_num(p.qos),
        retain: p.retain,
        properties: p.properties,
        received: Instant::now(),
    };
    // With subscription identifiers, each copy the broker sends goes to the subscriptions it
    // was sent for; without them (MQTT 3.1.1 brokers, or identifiers off), by topic.
    let ids = msg
        .properties
        .as_ref()
        .map(|p| p.subscription_identifiers.as_slice())
        .filter(|ids| !ids.is_empty());
    let mut closed = Vec::new();
    let targets = subs.iter().filter(|s| match ids {
        Some(ids) => ids.contains(&s.sid),
        None => matches(&s.matcher, topic),
    });
    for s in targets {
        match s.tx.try_send(msg.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => match &s.overflow {
                Some(f) => f(m),
                None => {
                    s.dropped.fetch_add(1, Ordering::Relaxed);
                    inner
                        .counters
                        .dropped_incoming
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(filter = %s.matcher, "subscriber too slow; message dropped");
                }
            },
            Err(mpsc::error::TrySendError::Closed(_)) => closed.push(s.id),
        }
    }
    drop(subs);
    if !closed.is_empty() {
        forget(inner, &closed);
    }
}

/// Removes subscriptions whose receivers are gone, unsubscribing filters no one else uses.
fn forget(inner: &Arc<Inner>, ids: &[u64]) {
    let mut subs = write(&inner.subs);
    let gone: Vec<Arc<Subscription>> = subs
        .iter()
        .filter(|s| ids.contains(&s.id))
        .cloned()
        .collect();
    subs.retain(|s| !ids.contains(&s.id));
    for g in gone {
        if !subs.iter().any(|s| s.filter == g.filter) {
            let _ = inner.client.try_unsubscribe(g.filter.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let mut o = BusOptions::new("127.0.0.1:1883", "c1");
        o.credentials = Some(("alice".into(), "s3cret-pw".into()));
        let shown = format!("{o:?}");
        assert!(shown.contains("alice:<redacted>"), "{shown}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
    }

    #[test]
    fn random_values_differ() {
        let a: std::collections::HashSet<u64> = (0..1000).map(|_| random_u64()).collect();
        assert_eq!(a.len(), 1000);
    }

    #[tokio::test]
    async fn every_bus_has_a_reply_topic() {
        let bus = Bus::connect(BusOptions::new("127.0.0.1:1", "plain-1")).expect("bus");
        assert_eq!(
            bus.options().reply_topic.as_deref(),
            Some("edge/system/reply/plain-1")
        );
        bus.close(Duration::ZERO).await;
        let bus = Bus::connect(BusOptions::new("127.0.0.1:1", "odd#id")).expect("bus");
        assert_eq!(bus.options().reply_topic, None);
        bus.close(Duration::ZERO).await;
    }
}
