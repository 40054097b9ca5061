//! Operating the parts: systemd readiness and watchdog, status lines, Prometheus metrics.

use std::sync::Arc;

use edgebus_broker::{Stats, StatsSnapshot};
use edgebus_runtime::metrics::{family, Metrics};
use edgebus_runtime::service::Service;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType::{Counter, Gauge};

/// What a part does beside serving: export metrics, tell systemd, tell a parent it is ready.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// The process's exporter; the part adds its service once started.
    pub metrics: Option<Metrics>,
    /// Send READY=1 / WATCHDOG=1 / STATUS= for this part alone (one part per process).
    pub systemd: bool,
    /// Told the service once it is connected and registered (`edgebus up` waits for all).
    pub ready: Option<tokio::sync::mpsc::UnboundedSender<Service>>,
}

/// The broker's counters as Prometheus metrics (`edgebus_broker_*`).
#[derive(Debug)]
pub struct BrokerCollector(pub Arc<Stats>);

impl Collector for BrokerCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = self.0.snapshot();
        let one = |v: u64| [(Vec::<(&str, &str)>::new(), v as f64)];
        let plain: [(&str, &str, _, u64); 10] = [
            (
                "edgebus_broker_connections",
                "Client connections open now.",
                Gauge,
                s.connections,
            ),
            (
                "edgebus_broker_connections_accepted",
                "Client connections accepted since start.",
                Counter,
                s.connections_total,
            ),
            (
                "edgebus_broker_connects_refused",
                "CONNECTs refused (bad id, auth, limits, protocol version).",
                Counter,
                s.refused,
            ),
            (
                "edgebus_broker_messages_in",
                "PUBLISH packets accepted from clients.",
                Counter,
                s.messages_in,
            ),
            (
                "edgebus_broker_messages_out",
                "PUBLISH packets written to clients.",
                Counter,
                s.messages_out,
            ),
            (
                "edgebus_broker_bytes_in",
                "Bytes read from clients.",
                Counter,
                s.bytes_in,
            ),
            (
                "edgebus_broker_bytes_out",
                "Bytes written to clients.",
                Counter,
                s.bytes_out,
            ),
            (
                "edgebus_broker_filters",
                "Distinct subscription filters held by the router.",
                Gauge,
                s.filters,
            ),
            (
                "edgebus_broker_wills",
                "Last Will messages published.",
                Counter,
                s.wills,
            ),
            (
                "edgebus_broker_uptime_seconds",
                "Seconds since the broker started.",
                Gauge,
                s.uptime_s,
            ),
        ];
        for (name, help, kind, v) in plain {
            family(&mut e, name, help, kind, one(v))?;
        }
        let d = &s.dropped;
        let dropped = [
            ("denied_publish", d.denied_publish),
            ("denied_subscribe", d.denied_subscribe),
            ("properties_stripped", d.properties_stripped),
            ("protocol_error", d.protocol_errors),
            ("rate_limited", d.rate_limited),
            ("slow_subscriber", d.slow_subscriber),
            ("expired", d.expired),
            ("too_large", d.too_large),
        ];
        family(
            &mut e,
            "edgebus_broker_dropped",
            "Messages, subscriptions and connections refused or not delivered, by reason.",
            Counter,
            dropped.map(|(r, v)| (vec![("reason", r)], v as f64)),
        )
    }
}

/// This process's resident memory (`edgebus_process_resident_memory_bytes`).
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        family(
            &mut e,
            "edgebus_process_resident_memory_bytes",
            "Resident memory of this process.",
            Gauge,
            [(
                Vec::<(&str, &str)>::new(),
                edgebus_broker::stats::rss_bytes() as f64,
            )],
        )
    }
}

/// The broker's one-line status: clients, traffic, drops.
pub fn broker_status(addr: std::net::SocketAddr, s: &StatsSnapshot) -> String {
    let d = &s.dropped;
    let dropped = d.denied_publish
        + d.protocol_errors
        + d.rate_limited
        + d.slow_subscriber
        + d.expired
        + d.too_large
        + d.denied_subscribe;
    format!(
        "listening on {addr}; {} client{}, {} messages in, {} out, {} dropped, {} MiB RSS",
        s.connections,
        if s.connections == 1 { "" } else { "s" },
        s.messages_in,
        s.messages_out,
        dropped,
        s.rss_bytes / (1 << 20),
    )
}
