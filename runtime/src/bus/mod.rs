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

mod connection;
mod message;
mod options;
mod policy;
mod publish;
mod subscribe;
mod tls;

pub use connection::ConnectFailure;
use connection::{drive, forget};
pub use message::*;
pub use options::{BusOptions, Will};
pub use policy::TargetPolicy;
pub use subscribe::Subscriber;
pub use tls::{client_config, BrokerAddress, TlsOptions};

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
        let address = BrokerAddress::parse(&options.broker)
            .ok_or_else(|| BusError::InvalidAddress(options.broker.clone()))?;
        let mut mqtt = MqttOptions::new(
            options.client_id.clone(),
            address.host.clone(),
            address.port,
        );
        if address.tls {
            let config = client_config(&options.tls).map_err(BusError::Tls)?;
            mqtt.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(config),
            ));
        }
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

    /// Replies that matched no waiting request (late, after a timeout, or duplicated).
    pub fn unmatched_replies(&self) -> u64 {
        self.inner.unmatched_replies.load(Ordering::Relaxed)
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

    /// Two instances started without an id never share one: 64 random bits each, where
    /// 16 let two instances take over each other's connection.
    #[test]
    fn made_up_instance_ids_carry_64_random_bits() {
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| BusOptions::for_service("127.0.0.1:1", "edge", "svc", None).client_id)
            .collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let hex = id.strip_prefix("svc-").expect("svc-…");
            assert_eq!(hex.len(), 16, "{id}");
            assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
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
