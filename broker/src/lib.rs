//! edgebus-broker: an embedded MQTT 3.1.1 + 5 broker for small hosts.
//!
//! It uses rumqttd's packet codecs and nothing else of rumqttd: the accept loop, the
//! connection handling and the router are edgebus's own. One port serves both MQTT versions;
//! every connection gets TCP_NODELAY; clients are refused with CONNACK codes, never by a
//! poisoned listener; users come from a mosquitto password file and per-topic ACLs apply to
//! every message delivered; memory is bounded and freed when no longer used; stats go out on
//! the bus; shutdown is clean.
//!
//! ```no_run
//! let config = edgebus_broker::BrokerConfig::default();
//! let broker = edgebus_broker::Broker::start(config, Some("edge/system/broker".into()))?;
//! println!("listening on {}", broker.local_addr());
//! broker.shutdown(std::time::Duration::from_secs(2));
//! # Ok::<(), edgebus_broker::BrokerError>(())
//! ```
//!
//! # Layout
//! - [`config`]: the `[broker]` part of topics.toml.
//! - [`acl`]: per-topic access rules and topic matching.
//! - [`auth`]: mosquitto-format password files.
//! - [`stats`]: counters and the retained stats record.
//! - `listener`: accept loops (TCP, WebSocket); `ws`: MQTT over WebSocket.
//! - `connection`: one client connection, up to CONNACK, and its end (Last Will, session).
//! - `client`: a connected client: its loop (`client/mod.rs`), the packets it sends
//!   (`client/inbound.rs`: PUBLISH routed in its task, SUBSCRIBE, UNSUBSCRIBE), and what its
//!   session has for it (`client/outbound.rs`).
//! - `peer`: what both share about a peer: its MQTT version and codec calls, why its
//!   connection ended, and log helpers.
//! - `router`: the subscription tree, retained messages, sessions and their queues.
//! - `frame`: fixed-header parsing that runs before the codecs.
//! - `strict`: the specification's rules the codecs do not check, on a frame's bytes.
//! - `admission`: connection limits per user and per address, and the reserve.
//! - `sessions`: client-id ownership and takeover.

pub mod acl;
mod admission;
pub mod auth;
mod client;
pub mod config;
mod connection;
mod frame;
mod listener;
mod peer;
mod router;
mod sessions;
pub mod stats;
mod store;
mod strict;
mod tls;
pub mod token;
mod will;
mod ws;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::{BrokerConfig, ByteSize};
pub use stats::{set_heap_trimmer, Stats, StatsSnapshot};
pub use tls::TlsError;

use router::message::Message;
use router::session::{Bounds, Full, Queued, Session};
use stats::bump;

/// Starting the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration is inconsistent.
    #[error("invalid broker configuration: {0}")]
    Config(String),
    /// The password file could not be loaded.
    #[error(transparent)]
    PasswordFile(#[from] auth::PasswordFileError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said (part of this message, said once).
        error: std::io::Error,
    },
    /// The runtime or the router could not start.
    #[error("cannot start the broker: {0}")]
    Start(String),
    /// The token key (`[broker.auth.jwt]`) could not be used.
    #[error("[broker.auth.jwt]: {0}")]
    TokenKey(#[from] token::KeyError),
    /// The TLS listener's certificate, key or client CA could not be used.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The persistence directory could not be read or written.
    #[error("persistence: {}: {error}", dir.display())]
    Persistence {
        /// `[broker.persistence] dir`, resolved.
        dir: std::path::PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
}

/// What every connection task shares.
pub(crate) struct Shared {
    config: BrokerConfig,
    passwords: Option<auth::PasswordFile>,
    tokens: Option<token::Verifier>,
    router: router::Router,
    sessions: sessions::Sessions,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    admission: Arc<admission::Admission>,
    limits: admission::Limits,
    refusals: admission::RefusalLog,
    /// Sessions that lost messages since the last lag report.
    lagging: std::sync::Mutex<Vec<Arc<Session>>>,
    /// Where retained messages and persistent sessions are kept on disk, when persistence
    /// is on.
    store: std::sync::OnceLock<Arc<store::Store>>,
    /// Topics under the broker's own system topic (`edge/system/broker/`): republished at
    /// every start, never written to disk.
    volatile: Option<String>,
    /// The TLS listener's certificate and key, when there is one.
    tls: Option<tls::Tls>,
}

impl Shared {
    /// Appends the deliveries of `msg` to `out` (stores it first if retained). Returns the
    /// store's sequence number when the change must reach the disk before it is
    /// acknowledged.
    fn route(&self, msg: &Arc<Message>, out: &mut VecDeque<(Arc<Session>, Queued)>) -> Option<u64> {
        let mut seq = None;
        if msg.retain {
            let durable = self.store.get().filter(|_| {
                self.volatile
                    .as_ref()
                    .map_or(true, |v| !msg.topic_str().starts_with(v.as_str()))
            });
            seq = self.router.retain(msg, || {
                durable.map(|store| {
                    store.append(if msg.payload.is_empty() {
                        store::clear(&msg.topic)
                    } else {
                        store::Record::Set(msg.clone())
                    })
                })
            });
            let (held, _) = self.router.retained_count();
            self.stats.retained.store(held as u64, Relaxed);
        }
        self.router.targets(msg, out);
        seq
    }

    /// Refreshes the stats' counts of sessions and subscriptions held.
    fn count_sessions(&self) {
        let sessions = self.router.session_count() as u64;
        self.stats.sessions.store(sessions, Relaxed);
        let filters = self.router.subscription_count() as u64;
        self.stats.filters.store(filters, Relaxed);
    }

    /// Publishes a message of the broker's own (stats, lag reports, Last Wills): queued
    /// where there is room, dropped and counted where there is not; it never waits.
    fn publish(
        &self,
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        retain: bool,
        props: Option<PublishProperties>,
    ) {
        let msg = Arc::new(Message::new(
            topic,
            payload,
            qos,
            retain,
            props,
            0,
            std::time::Instant::now(),
        ));
        let mut out = VecDeque::new();
        self.route(&msg, &mut out);
        for (target, q) in out {
            if let Err(Full::Queue(q)) = target.push(q) {
                self.drop_for(&target, &q, "queue full");
            }
        }
    }

    /// Counts a message not queued for `target`; the first of an episode is logged, and the
    /// episode reported on the lag topic.
    fn drop_for(&self, target: &Arc<Session>, q: &Queued, why: &str) {
        bump(&self.stats.slow_subscriber);
        if target.count_drop(q.msg.topic_str()) == 1 {
            warn!(
                client_id = %peer::clip(target.client_id()),
                topic = %peer::clip(q.msg.topic_str()),
                reason = why,
                "messages dropped for a subscriber"
            );
            self.lagging
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(target.clone());
        }
    }
}

/// Reads the store in `dir` back into the router (retained messages, then persistent
/// sessions and their delayed wills), says in one log line what came back, and starts the
/// store's writer. Runs inside the broker's runtime (the wills wait in tasks).
fn restore(shared: &Arc<Shared>, dir: &std::path::Path, window: Duration) -> std::io::Result<()> {
    let t0 = std::time::Instant::now();
    let (store, restored, starter) = store::Store::open(dir, window, shared.stats.clone())?;
    let store = Arc::new(store);
    let l = restored.loaded;
    for m in l.retained.values() {
        shared.router.retain(m, || ());
    }
    let (held, bytes) = shared.router.retained_count();
    shared.stats.retained.store(held as u64, Relaxed);
    shared.router.set_journal(store.clone());
    let mut images = l.sessions;
    let wills: Vec<_> = images
        .iter_mut()
        .filter_map(|(key, image)| image.will.take().map(|(due, m)| (key.clone(), due, m)))
        .collect();
    let (sessions, queued) = shared.router.restore(images);
    shared.count_sessions();
    if l.skipped_bytes > 0 {
        warn!(
            file = %restored.path.display(),
            skipped_bytes = l.skipped_bytes,
            skipped_runs = l.skipped_runs,
            torn_tail = l.torn_tail,
            "damaged records skipped; the file is rewritten with what was readable"
        );
    }
    let took = t0.elapsed().as_millis() as u64;
    info!(
        file = %restored.path.display(),
        retained = held,
        bytes,
        sessions,
        queued,
        records = l.records,
        file_bytes = l.file_bytes,
        read_ms = restored.took.as_millis() as u64,
        took_ms = took,
        "restored {held} retained messages and {sessions} sessions ({queued} queued messages, {wills} delayed wills) in {took} ms",
        wills = wills.len()
    );
    starter.start(Box::new(LiveState(Arc::downgrade(shared))))?;
    let _ = shared.store.set(store);
    for (key, due_ms, msg) in wills {
        will::schedule(shared, key, msg, due_ms);
    }
    Ok(())
}

/// The router's state as the store compacts it.
struct LiveState(std::sync::Weak<Shared>);

impl store::Live for LiveState {
    fn bytes(&self) -> u64 {
        self.0.upgrade().map_or(0, |s| {
            s.router.retained_count().1 as u64 + s.router.journaled_bytes()
        })
    }

    fn records(&self) -> Vec<store::Record> {
        let Some(shared) = self.0.upgrade() else {
            return Vec::new();
        };
        let (mut all, _) = shared.router.retained_all();
        if let Some(v) = &shared.volatile {
            all.retain(|m| !m.topic_str().starts_with(v.as_str()));
        }
        let mut out: Vec<store::Record> = all.into_iter().map(store::Record::Set).collect();
        let mut changes = Vec::new();
        shared.router.journaled(&mut changes);
        // After their sessions: a will of a session the file does not hold is dropped.
        for (key, due_ms, msg) in shared.sessions.pending_wills() {
            changes.push((
                Arc::from(key),
                router::journal::Change::Will { due_ms, msg },
            ));
        }
        out.extend(
            changes
                .into_iter()
                .map(|(key, c)| store::Record::Session(key, c)),
        );
        out
    }
}

/// The embedded broker.
pub struct Broker;

impl Broker {
    /// Binds the listeners and starts serving on a runtime of the broker's own.
    /// `system_topic` (`edge/system/broker`) is where the broker publishes: the retained stats
    /// record on `{system_topic}/stats`, lag reports on `{system_topic}/lag` (none: neither).
    pub fn start(
        config: BrokerConfig,
        system_topic: Option<String>,
    ) -> Result<BrokerHandle, BrokerError> {
        config.validate().map_err(BrokerError::Config)?;
        let mut config = config;
        // Permissions become rules once, here, under the bus's prefix.
        config.acl = std::mem::take(&mut config.acl)
            .compile(&config.prefix)
            .map_err(BrokerError::Config)?;
        let tokens = config
            .auth
            .jwt
            .as_ref()
            .map(|j| token::Verifier::load(j, &config.prefix))
            .transpose()?;
        let passwords = config
            .auth
            .password_file
            .as_deref()
            .map(auth::PasswordFile::load)
            .transpose()?;

        // One thread serves every connection unless `threads` says more: a small host's
        // cores are for its services.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads)
            .thread_name("edgebus-broker")
            .enable_all()
            .build()
            .map_err(|e| BrokerError::Start(e.to_string()))?;

        let bind = |addr: SocketAddr| {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|error| BrokerError::Bind { addr, error })?;
            l.set_nonblocking(true)
                .map_err(|error| BrokerError::Bind { addr, error })?;
            Ok::<_, BrokerError>(l)
        };
        let tcp = bind(config.listen)?;
        let ws = config.websocket.map(bind).transpose()?;
        let tls = config.tls.as_ref().map(tls::Tls::load).transpose()?;
        let tls_listener = config.tls.as_ref().map(|t| bind(t.listen)).transpose()?;
        let tls_addr = tls_listener.as_ref().and_then(|l| l.local_addr().ok());
        let tls_ws = config
            .tls
            .as_ref()
            .and_then(|t| t.websocket)
            .map(bind)
            .transpose()?;
        let tls_ws_addr = tls_ws.as_ref().and_then(|l| l.local_addr().ok());
        let local_addr = tcp
            .local_addr()
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        let ws_addr = ws.as_ref().and_then(|l| l.local_addr().ok());

        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let stats = Arc::new(Stats::default());
        let shared = {
            let _guard = runtime.enter();
            Arc::new(Shared {
                router: router::Router::new(
                    Bounds {
                        messages: config.max_queued_messages,
                        bytes: config.max_queued_bytes.as_usize(),
                    },
                    config.shared_strategy,
                    config.acl.clone(),
                ),
                passwords,
                tokens,
                sessions: sessions::Sessions::default(),
                stats: stats.clone(),
                shutdown: shutdown.clone(),
                lagging: Default::default(),
                admission: Default::default(),
                limits: admission::Limits {
                    total: config.max_connections,
                    per_user: config.max_connections_per_user,
                    per_address: config.max_connections_per_address,
                    reserved: config.reserved_connections.min(config.max_connections / 4),
                },
                refusals: Default::default(),
                store: Default::default(),
                volatile: system_topic.as_ref().map(|t| format!("{t}/")),
                tls,
                config,
            })
        };
        // What the broker kept on disk is back before anyone can connect.
        if let (Some(dir), Some(window)) = (
            shared.config.persistence.resolved_dir(),
            shared.config.persistence.sync,
        ) {
            let _guard = runtime.enter();
            restore(&shared, &dir, window).map_err(|error| BrokerError::Persistence {
                dir: dir.clone(),
                error,
            })?;
        }

        {
            let _guard = runtime.enter();
            let tcp = tokio::net::TcpListener::from_std(tcp)
                .map_err(|e| BrokerError::Start(e.to_string()))?;
            tracker.spawn(listener::accept_loop(
                tcp,
                listener::Kind::Tcp,
                shared.clone(),
                tracker.clone(),
            ));
            if let Some(ws) = ws {
                let ws = tokio::net::TcpListener::from_std(ws)
                    .map_err(|e| BrokerError::Start(e.to_string()))?;
                tracker.spawn(listener::accept_loop(
                    ws,
                    listener::Kind::WebSocket,
                    shared.clone(),
                    tracker.clone(),
                ));
            }
            for (l, kind) in [
                (tls_listener, listener::Kind::Tls),
                (tls_ws, listener::Kind::TlsWebSocket),
            ] {
                let Some(l) = l else { continue };
                let l = tokio::net::TcpListener::from_std(l)
                    .map_err(|e| BrokerError::Start(e.to_string()))?;
                tracker.spawn(listener::accept_loop(
                    l,
                    kind,
                    shared.clone(),
                    tracker.clone(),
                ));
            }
            let second = Duration::from_secs(1);
            if shared.tls.is_some() {
                // A renewed certificate is taken up within 5 s, without a restart.
                tracker.spawn(every(shared.clone(), second * 5, |s| {
                    if let Some(t) = &s.tls {
                        t.reload_if_changed();
                    }
                }));
            }
            tracker.spawn(every(shared.clone(), second * 2, trim_when_quiet()));
            tracker.spawn(every(shared.clone(), second, expire_sessions));
            if let Some(topic) = system_topic
                .as_ref()
                .filter(|_| !shared.config.stats_interval.is_zero())
            {
                let topic = Bytes::from(edgebus_proto::tree::stats_under(topic));
                let period = shared.config.stats_interval;
                tracker.spawn(every(shared.clone(), period, move |s| {
                    publish_stats(s, &topic)
                }));
            }
            let lag = system_topic.map(|t| Bytes::from(edgebus_proto::tree::lag_under(&t)));
            tracker.spawn(every(shared.clone(), second, move |s| {
                report_lag(s, lag.as_ref())
            }));
        }
        info!(%local_addr, websocket = ?ws_addr, tls = ?tls_addr, tls_websocket = ?tls_ws_addr, "broker listening (MQTT 3.1.1 and 5)");
        Ok(BrokerHandle {
            runtime: Some(runtime),
            local_addr,
            ws_addr,
            tls_addr,
            tls_ws_addr,
            shutdown,
            tracker,
            stats,
            shared,
        })
    }
}

/// Runs `work` every `period` until the broker shuts down.
async fn every(shared: Arc<Shared>, period: Duration, mut work: impl FnMut(&Shared)) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        work(&shared);
    }
}

/// Trims the heap when the broker has gone quiet after a burst (called every 2 s).
fn trim_when_quiet() -> impl FnMut(&Shared) {
    let mut last = (0, 0, 0);
    let mut trimmed = true;
    move |shared| {
        let s = &shared.stats;
        let now = (
            s.connections_total.load(Relaxed),
            s.messages_in.load(Relaxed),
            s.connections.load(Relaxed),
        );
        if now != last {
            last = now;
            trimmed = false;
        } else if !trimmed {
            // Nothing happened for a whole tick: a good moment, and only once per burst.
            stats::trim_heap();
            trimmed = true;
        }
    }
}

/// Ends offline sessions whose expiry passed (called every second).
fn expire_sessions(shared: &Shared) {
    let n = shared.router.expire(std::time::Instant::now());
    if n > 0 {
        info!(sessions = n, "offline sessions expired");
        shared.count_sessions();
    }
}

/// Reports the messages dropped for each subscriber since the last report (called every
/// second): a log line and `{"client_id", "filter", "lost", "at"}` on `{system topic}/lag`,
/// where the client (the edgebus runtime listens there) or an operator learns of it.
fn report_lag(shared: &Shared, topic: Option<&Bytes>) {
    let lagging = std::mem::take(&mut *shared.lagging.lock().unwrap_or_else(|e| e.into_inner()));
    let dropped = lagging.iter().map(|s| {
        let (lost, topic) = s.take_drops();
        (s.client_id().to_owned(), lost, topic, "its queue was full")
    });
    // Sessions that ended holding messages: they are lost too, and said so.
    let ended = shared
        .router
        .take_discarded()
        .into_iter()
        .map(|(c, lost, topic)| {
            shared.stats.slow_subscriber.fetch_add(lost, Relaxed);
            (c, lost, topic, "its session ended with them queued")
        });
    for (client_id, lost, filter, why) in dropped.chain(ended).collect::<Vec<_>>() {
        if lost == 0 {
            continue;
        }
        warn!(
            client_id = %peer::clip(&client_id),
            topic = %peer::clip(&filter),
            lost,
            reason = why,
            "messages dropped for a subscriber"
        );
        if let Some(topic) = topic {
            let report = edgebus_proto::records::LagReport {
                client_id,
                filter,
                lost,
                at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            };
            if let Ok(body) = serde_json::to_vec(&report) {
                shared.publish(topic.clone(), Bytes::from(body), 0, false, None);
            }
        }
    }
}

/// Publishes the retained stats record on `topic`.
fn publish_stats(shared: &Shared, topic: &Bytes) {
    if let Ok(payload) = serde_json::to_vec(&shared.stats.snapshot()) {
        shared.publish(topic.clone(), Bytes::from(payload), 0, true, None);
    }
}

/// Checks that a broker's runtime runs tasks and its router's locks are free.
#[derive(Clone)]
pub struct BrokerProbe {
    runtime: Option<tokio::runtime::Handle>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BrokerProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerProbe").finish_non_exhaustive()
    }
}

impl BrokerProbe {
    /// `Ok` when the broker's runtime ran a task that took the router's locks within
    /// `budget`; else which part did not.
    pub fn probe(&self, budget: Duration) -> Result<(), String> {
        let Some(rt) = &self.runtime else {
            return Err("the broker is stopped".into());
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        let shared = self.shared.clone();
        rt.spawn(async move {
            let _ = tx.try_send(false);
            shared.router.probe();
            let _ = tx.try_send(true);
        });
        let deadline = std::time::Instant::now() + budget;
        let wait =
            || rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
        if wait().is_err() {
            return Err(format!(
                "the broker runtime did not run a task within {} ms",
                budget.as_millis()
            ));
        }
        match wait() {
            Ok(true) => Ok(()),
            _ => Err(format!(
                "the router's locks were not free within {} ms",
                budget.as_millis()
            )),
        }
    }
}

/// A running broker. Dropping it shuts the broker down.
pub struct BrokerHandle {
    runtime: Option<tokio::runtime::Runtime>,
    local_addr: SocketAddr,
    ws_addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    tls_ws_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
}

impl BrokerHandle {
    /// Serves `bytes` as one in-process client's whole input, then end of stream, and waits
    /// (up to `limit`) for the connection to finish; false if it did not. The broker's
    /// whole connection path runs (framing, checks, both codecs, the router), so the fuzz
    /// target `broker_connection` drives it with this.
    #[doc(hidden)]
    pub fn serve_bytes(&self, bytes: &[u8], limit: Duration) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Some(runtime) = &self.runtime else {
            return false;
        };
        let (client, server) = tokio::io::duplex(64 * 1024);
        let loopback = SocketAddr::from(([127, 0, 0, 1], 1));
        let task = runtime.spawn(connection::serve(
            server,
            self.local_addr,
            loopback,
            self.shared.clone(),
            None,
        ));
        runtime.block_on(async {
            let (mut rx, mut tx) = tokio::io::split(client);
            let write = async {
                // The broker may close first; what it did not read is then dropped.
                let _ = tx.write_all(bytes).await;
                let _ = tx.shutdown().await;
            };
            let read = async {
                let mut sink = Vec::new();
                let _ = rx.read_to_end(&mut sink).await;
            };
            let feed = async {
                tokio::join!(write, read);
                let _ = task.await;
            };
            tokio::time::timeout(limit, feed).await.is_ok()
        })
    }

    /// A probe of this broker's health, usable from any thread (the watchdog's).
    pub fn prober(&self) -> BrokerProbe {
        BrokerProbe {
            runtime: self.runtime.as_ref().map(|r| r.handle().clone()),
            shared: self.shared.clone(),
        }
    }

    /// The live counters (for exporters; [`BrokerHandle::stats`] copies them).
    pub fn counters(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The MQTT listener's address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The WebSocket listener's address, if one is configured.
    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// The TLS listener's address, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The WebSocket-over-TLS listener's address, if there is one.
    pub fn tls_websocket_addr(&self) -> Option<SocketAddr> {
        self.tls_ws_addr
    }

    /// Reads the TLS certificate, key and client CA again (SIGHUP): new connections get
    /// them, connections already made keep going. On failure the ones before stay. Nothing
    /// to do without a TLS listener.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.shared.tls {
            Some(t) => t.reload(),
            None => Ok(()),
        }
    }

    /// The broker's counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Stops accepting, closes every client (MQTT 5 clients get DISCONNECT 0x8B) and waits
    /// up to `grace` for connection tasks to finish.
    pub fn shutdown(mut self, grace: Duration) {
        self.stop(grace);
    }

    fn stop(&mut self, grace: Duration) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        self.shutdown.cancel();
        self.tracker.close();
        let tracker = self.tracker.clone();
        runtime.block_on(async {
            let _ = tokio::time::timeout(grace, tracker.wait()).await;
        });
        runtime.shutdown_timeout(Duration::from_millis(100));
        if let Some(store) = self.shared.store.get() {
            store.flush(Duration::from_secs(2));
        }
        info!("broker stopped");
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz target's seeds, and some bytes no client should send, all end their
    /// connection once their input ends.
    #[test]
    fn in_process_connections_finish() {
        let config = BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..BrokerConfig::default()
        };
        let broker = Broker::start(config, None).expect("broker");
        let seeds = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/broker_connection"
        );
        let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(seeds)
            .expect("seed corpus")
            .map(|e| std::fs::read(e.expect("entry").path()).expect("seed"))
            .collect();
        assert!(inputs.len() >= 5, "seeds missing");
        inputs.push(vec![0x10, 0xff, 0xff, 0xff, 0x7f]);
        inputs.push(vec![0x30, 0x00]);
        for input in &inputs {
            assert!(
                broker.serve_bytes(input, Duration::from_secs(5)),
                "{input:?}"
            );
        }
        assert!(
            broker.stats().connections_total >= 5,
            "seeds did not connect"
        );
        assert_eq!(broker.stats().connections, 0);
    }
}
