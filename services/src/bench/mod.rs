//! `edgebus bench`: broker scenarios against any MQTT broker, printed as a table.
//!
//! Every scenario is bounded in count and in time; losses are reported, never hidden. The same
//! run can measure several brokers (`--broker` repeated, `--embedded`, `--mosquitto`), so the
//! figures side by side come from one machine in one state.
//!
//! # Layout
//! - [`figure`]: what a scenario returns (a typed [`Figure`]), goals, and the table.
//! - [`broker`]: bare-MQTT scenarios: round trips, connection rate, memory.
//! - [`overload`]: fan-in and fan-out sized so a loss shows, a stopped subscriber, filter churn.
//! - [`runtime`]: request/response and sagas through the runtime.
//! - [`detect`]: failure detection with real processes killed and stopped.
//! - [`persist`]: durable state: retained updates on disk, SIGKILL, restart, side by side with
//!   mosquitto's `persistence true`.
//! - [`mqtt`]: the clients the scenarios use; [`host`]: processes, memory, the machine.

use std::time::Duration;

use rumqttc::QoS;

pub mod broker;
pub mod detect;
pub mod figure;
pub mod host;
pub mod mqtt;
pub mod overload;
pub mod persist;
pub mod runtime;

pub use figure::{Better, Figure, Goal, Key, Row};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Round trips per round-trip scenario.
    pub round_trips: usize,
    /// Messages per publisher in fan-in, and in total for fan-out.
    pub messages: usize,
    /// Publishers (fan-in) and subscribers (fan-out).
    pub width: usize,
    /// Connections opened by the connection-rate scenario.
    pub connections: usize,
    /// Idle connections held for the memory scenario (needs the broker's pid).
    pub idle_connections: usize,
    /// Payload size in bytes.
    pub payload: usize,
    /// Distinct topics published to by the memory scenario (each matched by a subscriber).
    pub topics: usize,
    /// Distinct client ids that connect and leave in the memory scenario.
    pub client_ids: usize,
    /// Trials of the failure-detection scenario (0 skips it).
    pub detect_trials: usize,
    /// Scenario groups to run (`rtt`, `runtime`, `fan`, `connect`, `memory`, `detect`);
    /// empty runs all.
    pub only: Vec<String>,
    /// Upper bound on each scenario.
    pub timeout: Duration,
    /// Fan-in messages in all, QoS 0 and QoS 1: enough that a broker which drops what its
    /// subscriber cannot take shows it.
    pub fan_in: [usize; 2],
    /// Subscribers of the wide fan-out.
    pub fan_out_wide: usize,
    /// Messages of the slow-subscriber scenario.
    pub slow_messages: usize,
    /// Distinct filters of the churn scenario.
    pub churn_filters: usize,
    /// Retained updates of the persistence scenario.
    pub persist_updates: usize,
}

impl BenchOptions {
    fn wants(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }
}

/// The scenario groups `--only` takes.
pub const GROUPS: &[&str] = &[
    "rtt", "runtime", "fan", "slow", "churn", "connect", "tls", "memory", "detect", "saga",
    "persist",
];

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            round_trips: 2000,
            messages: 20_000,
            width: 4,
            connections: 2000,
            idle_connections: 1000,
            payload: 64,
            topics: 100_000,
            client_ids: 10_000,
            detect_trials: 5,
            only: Vec::new(),
            timeout: Duration::from_secs(30),
            fan_in: [1_000_000, 200_000],
            fan_out_wide: 100,
            slow_messages: 20_000,
            churn_filters: 20_000,
            persist_updates: 20_000,
        }
    }
}

/// A broker under test.
#[derive(Debug, Clone)]
pub struct Target {
    /// Column name.
    pub name: String,
    /// Where it listens: the clients that send (requests, pings) connect here.
    pub addr: std::net::SocketAddr,
    /// Where the clients that answer connect: the round trip's responder and the runtime
    /// scenarios' `echo` instances. `addr`, except across the nodes of a cluster.
    pub far: std::net::SocketAddr,
    /// Its process id, to read RSS from /proc.
    pub pid: Option<u32>,
    /// Its MQTT-over-TLS listener, with the certificate of [`host::tls_files`] (brokers
    /// started by the bench only).
    pub tls: Option<std::net::SocketAddr>,
}

/// Runs every scenario `opts` asks for against one broker.
pub async fn run_all(target: &Target, opts: &BenchOptions) -> Vec<Row> {
    use Better::{Higher, Info, Lower};
    let addr = target.addr;
    let mut rows = Vec::new();
    let rss_idle = target.pid.map(host::rss).transpose();
    if opts.wants("rtt") {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let q = qos as u8;
            let row = Row::new(
                format!("round trip QoS {q} p50 / p99 / p999"),
                Lower,
                broker::round_trip(addr, target.far, qos, opts).await,
            )
            .goal(Goal::RatioAtMost(1.0));
            rows.push(if q == 1 {
                row.key(Key::RoundTripQos1)
            } else {
                row
            });
        }
    }
    if opts.wants("runtime") {
        rows.push(
            Row::new(
                "runtime request/response QoS 1 p50 / p99 / p999",
                Lower,
                runtime::runtime_round_trip(addr, target.far, opts).await,
            )
            .goal(Goal::TimesRow(1.3, Key::RoundTripQos1)),
        );
        for instances in [1, 2] {
            rows.push(Row::new(
                format!(
                    "runtime requests/s, {instances} echo instance{}, {} in flight",
                    if instances == 1 { "" } else { "s" },
                    runtime::RUNTIME_CONCURRENCY
                ),
                Higher,
                runtime::runtime_throughput(addr, target.far, opts, instances).await,
            ));
        }
    }
    if opts.wants("fan") {
        let (w, p, t) = (opts.width, opts.payload, opts.timeout);
        for (qos, total) in [QoS::AtMostOnce, QoS::AtLeastOnce]
            .into_iter()
            .zip(opts.fan_in)
        {
            rows.push(
                Row::new(
                    format!(
                        "fan-in {w}→1 QoS {}, {total} at full speed (msg/s, delivered)",
                        qos as u8
                    ),
                    Higher,
                    overload::fan_in(addr, qos, w, total, p, t * 4).await,
                )
                .goal(Goal::RatioAtLeastNoLoss(3.0)),
            );
        }
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            // 20,000 deliveries to 4 subscribers; 200,000 to 100.
            for (width, per) in [(w, opts.messages / w.max(1)), (opts.fan_out_wide, 2_000)] {
                rows.push(
                    Row::new(
                        format!(
                            "fan-out 1→{width} QoS {} (deliveries/s, delivered)",
                            qos as u8
                        ),
                        Higher,
                        overload::fan_out(addr, qos, width, per, p, t).await,
                    )
                    .goal(Goal::RatioAtLeastNoLoss(15.0)),
                );
            }
        }
    }
    if opts.wants("slow") {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            rows.push(Row::new(
                format!(
                    "slow subscriber QoS {}, one of two SIGSTOPped, {} × 1 KiB (delivered)",
                    qos as u8, opts.slow_messages
                ),
                Lower,
                overload::slow_subscriber(addr, qos, opts.slow_messages).await,
            ));
        }
    }
    if let (true, Some(pid)) = (opts.wants("churn"), target.pid) {
        rows.push(Row::new(
            format!(
                "filter churn, {} distinct filters, RSS (KiB)",
                opts.churn_filters
            ),
            Lower,
            overload::filter_churn(addr, pid, opts.churn_filters).await,
        ));
    }
    if opts.wants("connect") {
        rows.push(
            Row::new(
                "connection rate (CONNECT→CONNACK/s)",
                Higher,
                broker::connection_rate(addr, opts).await,
            )
            .goal(Goal::RatioAtLeast(1.5)),
        );
    }
    if let (true, Some(tls)) = (opts.wants("tls"), target.tls) {
        rows.push(Row::new(
            "TLS connection rate (handshake + CONNECT→CONNACK/s, 4 at once)",
            Higher,
            broker::tls_connection_rate(tls, opts).await,
        ));
        rows.push(Row::new(
            "TLS connect latency, one at a time (handshake + CONNACK)",
            Lower,
            broker::tls_connect_latency(tls, opts).await,
        ));
    }
    if opts.wants("saga") {
        match runtime::saga_figures(addr, 300).await {
            Ok([rate, step, bytes]) => {
                rows.push(Row::new(
                    "saga runs/s, 3 steps, 16 at once, journaled",
                    Higher,
                    Ok(rate),
                ));
                rows.push(Row::new(
                    "saga per-step cost, one run at a time",
                    Lower,
                    Ok(step),
                ));
                rows.push(Row::new("saga journal bytes per run", Info, Ok(bytes)));
            }
            Err(e) => rows.push(Row::new("saga", Lower, Err(e))),
        }
    }
    if opts.wants("detect") && opts.detect_trials > 0 {
        let n = opts.detect_trials;
        match detect::run(addr, n).await {
            Ok(d) => {
                for (what, h) in [
                    ("SIGKILL → offline alert", &d.kill),
                    ("SIGSTOP → unhealthy alert", &d.stop),
                    ("NO_RESPONDERS reply", &d.no_responders),
                ] {
                    rows.push(Row::new(
                        format!("{what}, ms p50 / max ({n} trials)"),
                        Lower,
                        detect::p50_max_ms(h),
                    ));
                }
                rows.push(Row::new(
                    "detection events duplicated / missing",
                    Info,
                    Ok(Figure::new(
                        d.duplicates as f64,
                        format!("{} / {}", d.duplicates, d.missing),
                    )),
                ));
            }
            Err(e) => rows.push(Row::new("failure detection", Lower, Err(e))),
        }
    }
    if opts.wants("persist") {
        let names = persist::rows(opts.persist_updates);
        let figures = match persist::kind_of(&target.name) {
            Some(kind) => persist::run(kind, opts.persist_updates).await,
            None => names
                .iter()
                .map(|_| Err(anyhow::anyhow!("only for the brokers the bench starts")))
                .collect(),
        };
        for ((name, better, goal), figure) in names.into_iter().zip(figures) {
            let row = Row::new(name, better, figure);
            rows.push(match goal {
                Some(g) => row.goal(g),
                None => row,
            });
        }
    }
    if !opts.wants("memory") {
        return rows;
    }
    if let (Some(pid), Ok(Some(idle))) = (target.pid, rss_idle) {
        let kib = |k: u64| Figure::new(k as f64, k.to_string());
        rows.push(Row::new("RSS idle (KiB)", Lower, Ok(kib(idle))).key(Key::RssIdle));
        rows.push(Row::new(
            "RSS after the load above, at once (KiB)",
            Lower,
            host::rss(pid).map(kib),
        ));
        // The broker trims its heap after 2 s of quiet; this is what it keeps.
        tokio::time::sleep(Duration::from_secs(3)).await;
        rows.push(
            Row::new(
                "RSS after the load above, 3 s later (KiB)",
                Lower,
                host::rss(pid).map(kib),
            )
            .goal(Goal::TimesRow(1.2, Key::RssIdle)),
        );
        for n in [opts.idle_connections, opts.idle_connections * 10] {
            rows.push(
                Row::new(
                    format!("RSS per idle connection, {n} held (bytes)"),
                    Lower,
                    broker::idle_memory(addr, pid, n).await,
                )
                .goal(Goal::AtMost(2048.0)),
            );
        }
        rows.push(Row::new(
            format!("RSS after {} distinct topics (KiB)", opts.topics),
            Lower,
            broker::distinct_topics(addr, pid, opts).await,
        ));
        rows.push(Row::new(
            format!("RSS after {} distinct client ids (KiB)", opts.client_ids),
            Lower,
            broker::distinct_clients(addr, pid, opts).await,
        ));
    }
    rows
}

/// The figures of several brokers side by side, as a Markdown table (see
/// [`figure::markdown_table`]).
pub fn markdown_table(targets: &[Target], results: &[Vec<Row>]) -> String {
    let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    figure::markdown_table(&names, results)
}
