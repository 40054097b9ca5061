//! edgebus-broker: an embedded MQTT 3.1.1 + 5 broker for small hosts.
//!
//! It keeps rumqttd's router (fast fan-in and fan-out, retained messages, QoS 0/1/2, shared
//! subscriptions, persistent sessions) and replaces everything between the router and the
//! socket with code that survives any client: one port for both MQTT versions, TCP_NODELAY on
//! every connection, CONNACK refusals instead of poisoned listeners, authentication from a
//! mosquitto password file, per-topic ACLs, bounded memory, stats on the bus and a clean
//! shutdown.
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
//! - `connection`: one client connection, from CONNECT to close.
//! - `frame`: fixed-header parsing that runs before rumqttd's codecs.
//! - `strict`: the specification's rules the codecs do not check, on a frame's bytes.
//! - `admission`: connection limits per user and per address, and the reserve.
//! - `listener`: accept loops (TCP, WebSocket).
//! - [`lag`]: subscribers that fall behind, and the messages they skip.
//! - `sessions`: client-id ownership, takeover and the router's names for clients.
//! - `system`: the broker's own link, for wills and stats.

pub mod acl;
mod admission;
pub mod auth;
pub mod config;
mod connection;
mod frame;
pub mod lag;
mod listener;
mod sessions;
pub mod stats;
mod strict;
mod system;
mod ws;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig, Strategy};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use config::{BrokerConfig, ByteSize};
pub use stats::{set_heap_trimmer, Stats, StatsSnapshot};

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
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The runtime or the router could not start.
    #[error("cannot start the broker: {0}")]
    Start(String),
}

/// Builds router links; the router's channel type is not nameable outside rumqttd.
#[allow(clippy::result_large_err)]
type LinkFactory =
    Box<dyn Fn(&str, bool, u16) -> Result<(LinkTx, LinkRx, Notification), LinkError> + Send + Sync>;

/// What every connection task shares.
pub(crate) struct Shared {
    config: BrokerConfig,
    passwords: Option<auth::PasswordFile>,
    links: LinkFactory,
    sessions: sessions::Sessions,
    stats: Arc<Stats>,
    sys: system::SysTx,
    shutdown: CancellationToken,
    filters: Mutex<std::collections::HashSet<String>>,
    /// Connected clients by the router's name for them (for lag reports).
    names: dashmap::DashMap<String, String>,
    /// Starts every router name of this broker's clients (a process may run two brokers,
    /// and lag reports reach both).
    router_prefix: String,
    admission: Arc<admission::Admission>,
    limits: admission::Limits,
    refusals: admission::RefusalLog,
}

impl Shared {
    /// Counts a distinct filter against `max_filters`; false once the budget is spent.
    fn admit_filter(&self, filter: &str) -> bool {
        let mut set = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        if set.contains(filter) {
            return true;
        }
        if set.len() >= self.config.max_filters {
            return false;
        }
        set.insert(filter.to_owned());
        self.stats.filters.store(set.len() as u64, Relaxed);
        true
    }
}

/// The embedded broker.
pub struct Broker;

impl Broker {
    // LinkError is rumqttd's.
    #[allow(clippy::result_large_err)]
    /// Binds the listeners and starts serving on a runtime of the broker's own.
    /// `system_topic` (`edge/system/broker`) is where the broker publishes: the retained stats
    /// record on `{system_topic}/stats`, lag reports on `{system_topic}/lag` (none: neither).
    pub fn start(
        config: BrokerConfig,
        system_topic: Option<String>,
    ) -> Result<BrokerHandle, BrokerError> {
        config.validate().map_err(BrokerError::Config)?;
        let passwords = config
            .auth
            .password_file
            .as_deref()
            .map(auth::PasswordFile::load)
            .transpose()?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(2)))
            .thread_name("edgebus-broker")
            .enable_all()
            .build()
            .map_err(|e| BrokerError::Start(e.to_string()))?;

        let bind = |addr: SocketAddr| {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|source| BrokerError::Bind { addr, source })?;
            l.set_nonblocking(true)
                .map_err(|source| BrokerError::Bind { addr, source })?;
            Ok::<_, BrokerError>(l)
        };
        let tcp = bind(config.listen)?;
        let ws = config.websocket.map(bind).transpose()?;
        let local_addr = tcp
            .local_addr()
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        let ws_addr = ws.as_ref().and_then(|l| l.local_addr().ok());

        let router_config = RouterConfig {
            // Our own limit is checked first; the router's leaves room for the system link
            // and for connections still being torn down.
            max_connections: config.max_connections * 2 + 16,
            max_outgoing_packet_count: 200,
            max_segment_size: config.segment_size.as_usize(),
            max_segment_count: config.segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: match config.shared_strategy {
                config::SharedStrategy::RoundRobin => Strategy::RoundRobin,
                config::SharedStrategy::Random => Strategy::Random,
                config::SharedStrategy::Sticky => Strategy::Sticky,
            },
        };
        let router_tx = Router::new(0, router_config).spawn();
        let links: LinkFactory = Box::new(move |name, clean, alias_max| {
            LinkBuilder::new(name, router_tx.clone())
                .clean_session(clean)
                .topic_alias_max(alias_max)
                .build()
        });
        let (sys_tx, sys_rx, _) =
            links("sys", true, 0).map_err(|e| BrokerError::Start(e.to_string()))?;

        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let stats = Arc::new(Stats::default());
        let shared = {
            let _guard = runtime.enter();
            Arc::new(Shared {
                sys: system::spawn(sys_tx, sys_rx),
                passwords,
                links,
                sessions: sessions::Sessions::default(),
                stats: stats.clone(),
                shutdown: shutdown.clone(),
                filters: Mutex::new(Default::default()),
                names: Default::default(),
                router_prefix: {
                    static BROKERS: std::sync::atomic::AtomicU64 =
                        std::sync::atomic::AtomicU64::new(0);
                    format!("b{}.", BROKERS.fetch_add(1, Relaxed))
                },
                admission: Default::default(),
                limits: admission::Limits {
                    total: config.max_connections,
                    per_user: config.max_connections_per_user,
                    per_address: config.max_connections_per_address,
                    reserved: config.reserved_connections.min(config.max_connections / 4),
                },
                refusals: Default::default(),
                config,
            })
        };

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
            tracker.spawn(trim_when_quiet(shared.clone()));
            if let Some(topic) = system_topic
                .as_ref()
                .filter(|_| !shared.config.stats_interval.is_zero())
            {
                tracker.spawn(publish_stats(shared.clone(), format!("{topic}/stats")));
            }
            tracker.spawn(report_lag(
                shared.clone(),
                system_topic.map(|t| Bytes::from(format!("{t}/lag"))),
            ));
        }
        info!(%local_addr, websocket = ?ws_addr, "broker listening (MQTT 3.1.1 and 5)");
        Ok(BrokerHandle {
            runtime: Some(runtime),
            local_addr,
            ws_addr,
            shutdown,
            tracker,
            stats,
            sys: shared.sys.clone(),
            shared,
        })
    }
}

/// Trims the heap when the broker has gone quiet after a burst.
async fn trim_when_quiet(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (0, 0, 0);
    let mut trimmed = true;
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
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

/// Counts, logs and publishes the messages this broker's subscribers skipped.
async fn report_lag(shared: Arc<Shared>, topic: Option<Bytes>) {
    let mut skips = lag::listen();
    loop {
        let skip = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            s = skips.recv() => match s { Some(s) => s, None => return },
        };
        // Another broker's client, in a process that runs two.
        let Some(own) = skip.router_name.strip_prefix(&shared.router_prefix) else {
            continue;
        };
        // Counted even when the connection is already gone: then by the router's name.
        let client_id = shared
            .names
            .get(&skip.router_name)
            .map_or_else(|| own.to_owned(), |c| c.clone());
        shared.stats.slow_subscriber.fetch_add(skip.lost, Relaxed);
        // A shared filter as the client wrote it, without the router's group name.
        let filter = match skip.filter.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f).to_owned(),
            None => skip.filter.clone(),
        };
        tracing::warn!(
            client_id,
            filter = %filter,
            lost = skip.lost,
            "subscriber fell behind; messages skipped (raise segment_size or segment_count)"
        );
        if let Some(topic) = &topic {
            let body = serde_json::json!({
                "client_id": client_id,
                "filter": filter,
                "lost": skip.lost,
                "at": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            });
            shared.sys.send(system::SysMsg::Publish {
                topic: topic.clone(),
                payload: Bytes::from(body.to_string()),
                retain: false,
                props: None,
            });
        }
    }
}

async fn publish_stats(shared: Arc<Shared>, topic: String) {
    let topic = Bytes::from(topic);
    let mut tick = tokio::time::interval(shared.config.stats_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snapshot = shared.stats.snapshot();
        let Ok(payload) = serde_json::to_vec(&snapshot) else {
            continue;
        };
        shared.sys.send(system::SysMsg::Publish {
            topic: topic.clone(),
            payload: Bytes::from(payload),
            retain: true,
            props: None,
        });
    }
}

/// Checks that a broker's runtime runs tasks and its router answers.
#[derive(Debug, Clone)]
pub struct BrokerProbe {
    runtime: Option<tokio::runtime::Handle>,
    sys: system::SysTx,
}

impl BrokerProbe {
    /// `Ok` when the broker's runtime ran a task and its router answered a PINGREQ within
    /// `budget`; else which part did not.
    pub fn probe(&self, budget: Duration) -> Result<(), String> {
        let Some(rt) = &self.runtime else {
            return Err("the broker is stopped".into());
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        let sys = self.sys.clone();
        rt.spawn(async move {
            let (done, answered) = tokio::sync::oneshot::channel();
            let _ = tx.try_send(false);
            sys.send(system::SysMsg::Ping(done));
            if answered.await.is_ok() {
                let _ = tx.try_send(true);
            }
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
                "the router did not answer a ping within {} ms",
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
    shutdown: CancellationToken,
    tracker: TaskTracker,
    stats: Arc<Stats>,
    sys: system::SysTx,
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
            sys: self.sys.clone(),
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
