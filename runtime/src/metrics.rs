//! Prometheus metrics: the process's services, their buses, endpoints and circuit breakers,
//! plus any other [`Collector`] (the broker adds its own), served as text on `/metrics`.
//!
//! Nothing is counted twice: the exporter reads the same counters the heartbeats and
//! `edge/system/broker/stats` publish, at scrape time, so serving metrics costs nothing
//! between scrapes. Latency histograms come from each endpoint's HDR histogram.
//!
//! ```no_run
//! # async fn f(service: edgebus_runtime::service::Service) -> std::io::Result<()> {
//! let metrics = edgebus_runtime::metrics::Metrics::default();
//! metrics.add_service(&service);
//! let server = metrics.serve("127.0.0.1:9184".parse().unwrap()).await?;
//! println!("metrics on http://{}/metrics", server.local_addr());
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::bus::BusStats;
use crate::policy::CircuitState;
use crate::service::Service;
use crate::stats::EndpointSnapshot;

/// Upper bounds of the handling-time histogram buckets, seconds.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The content type of the exposition (OpenMetrics text, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What one process exports; clones share it.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Sources>>,
}

#[derive(Default)]
struct Sources {
    services: Vec<Service>,
    others: Vec<Arc<dyn Collector>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("Metrics")
            .field("services", &s.services.len())
            .field("others", &s.others.len())
            .finish()
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Exports a service: its endpoints, its bus and the circuit breakers of its calls.
    pub fn add_service(&self, service: &Service) {
        self.lock().services.push(service.clone());
    }

    /// Exports another collector (its metric names must not clash with `edgebus_bus_*`,
    /// `edgebus_endpoint_*`, `edgebus_circuit_*` and `edgebus_service_*`).
    pub fn add(&self, collector: impl Collector) {
        self.lock().others.push(Arc::new(collector));
    }

    /// The exposition text, as `/metrics` serves it.
    pub fn encode(&self) -> String {
        let mut registry = Registry::default();
        let (services, others) = {
            let s = self.lock();
            (s.services.clone(), s.others.clone())
        };
        if !services.is_empty() {
            registry.register_collector(Box::new(ServicesCollector(services)));
        }
        for c in others {
            registry.register_collector(Box::new(Shared(c)));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out = "# EOF\n".into();
        }
        out
    }

    /// Serves `GET /metrics` on `addr` until the returned server is stopped or dropped.
    pub async fn serve(&self, addr: SocketAddr) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, self.clone(), stop.clone()));
        tracing::info!(%local_addr, "metrics served on /metrics");
        Ok(MetricsServer {
            local_addr,
            stop,
            _task: task,
        })
    }
}

/// A running `/metrics` endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: CancellationToken,
    _task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(listener: TcpListener, metrics: Metrics, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &metrics)).await;
        });
    }
}

/// One request per connection, HTTP/1.x: `GET /metrics` (or `HEAD`); anything else is 404
/// or 405. The head is read up to 8 KiB.
async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > 8192 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", CONTENT_TYPE, metrics.encode()),
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "edgebus metrics: /metrics\n".to_owned(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; try /metrics\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[derive(Debug)]
struct Shared(Arc<dyn Collector>);

impl Collector for Shared {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

/// Writes one metric family: `name` of `kind`, one sample per `(labels, value)`.
pub fn family<L: AsRef<str>>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'static str, L)>, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_ref())).collect();
        let fam = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value as u64).encode(fam)?,
            _ => ConstGauge::new(value).encode(fam)?,
        }
    }
    Ok(())
}

#[derive(Debug)]
struct ServicesCollector(Vec<Service>);

impl Collector for ServicesCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let svc = |s: &Service| vec![("service", s.name().to_owned())];
        let info = self.0.iter().map(|s| {
            (
                vec![
                    ("service", s.name().to_owned()),
                    ("instance", s.instance().to_owned()),
                    ("version", s.version().to_owned()),
                ],
                1.0,
            )
        });
        family(
            &mut e,
            "edgebus_service_info",
            "The service instance running in this process.",
            Gauge,
            info,
        )?;
        family(
            &mut e,
            "edgebus_service_uptime_seconds",
            "Seconds since the service started.",
            Gauge,
            self.0.iter().map(|s| (svc(s), s.uptime().as_secs_f64())),
        )?;

        // The bus of each service: one family per counter.
        type BusRow = (&'static str, &'static str, MetricType, fn(&BusStats) -> f64);
        let bus_rows: [BusRow; 12] = [
            (
                "edgebus_bus_connected",
                "1 while the connection to the broker is up.",
                Gauge,
                |s| f64::from(u8::from(s.connected)),
            ),
            (
                "edgebus_bus_connects",
                "Successful connects to the broker, the first included.",
                Counter,
                |s| s.connects as f64,
            ),
            (
                "edgebus_bus_published",
                "Messages handed to the connection.",
                Counter,
                |s| s.published as f64,
            ),
            (
                "edgebus_bus_publish_failed",
                "Publishes that failed (queue full, too large, closed).",
                Counter,
                |s| s.publish_failed as f64,
            ),
            (
                "edgebus_bus_republished",
                "Messages published again after a reconnect.",
                Counter,
                |s| s.republished as f64,
            ),
            (
                "edgebus_bus_requeue_dropped",
                "Messages dropped from the reconnect queue because it was full.",
                Counter,
                |s| s.requeue_dropped as f64,
            ),
            ("edgebus_bus_received", "Messages received.", Counter, |s| {
                s.received as f64
            }),
            (
                "edgebus_bus_dropped_incoming",
                "Messages dropped because a subscription's buffer was full.",
                Counter,
                |s| s.dropped_incoming as f64,
            ),
            (
                "edgebus_bus_skipped_at_broker",
                "Messages for this client the broker skipped because it fell behind.",
                Counter,
                |s| s.skipped_at_broker as f64,
            ),
            (
                "edgebus_bus_request_retries",
                "Requests sent again by a retry policy.",
                Counter,
                |s| s.request_retries as f64,
            ),
            (
                "edgebus_bus_circuit_rejected",
                "Requests failed at once because the target's circuit was open.",
                Counter,
                |s| s.circuit_rejected as f64,
            ),
            (
                "edgebus_bus_dead_letters",
                "Requests dead-lettered after their retries.",
                Counter,
                |s| s.dead_letters as f64,
            ),
        ];
        let stats: Vec<_> = self.0.iter().map(|s| (svc(s), s.bus().stats())).collect();
        for (name, help, kind, value) in bus_rows {
            let samples = stats.iter().map(|(l, s)| (l.clone(), value(s)));
            family(&mut e, name, help, kind, samples)?;
        }

        // Endpoints.
        let eps: Vec<_> = self
            .0
            .iter()
            .flat_map(|s| {
                s.endpoint_stats().map(move |(ep, st)| {
                    (
                        vec![
                            ("service", s.name().to_owned()),
                            ("endpoint", ep.to_owned()),
                        ],
                        st,
                    )
                })
            })
            .collect();
        let snaps: Vec<_> = eps
            .iter()
            .map(|(l, st)| (l.clone(), st.snapshot()))
            .collect();
        type EndpointRow = (
            &'static str,
            &'static str,
            MetricType,
            fn(&EndpointSnapshot) -> u64,
        );
        let endpoint_rows: [EndpointRow; 6] = [
            (
                "edgebus_endpoint_requests",
                "Requests answered, successes and errors.",
                Counter,
                |s| s.requests,
            ),
            (
                "edgebus_endpoint_errors",
                "Requests answered with an error.",
                Counter,
                |s| s.errors,
            ),
            (
                "edgebus_endpoint_rejected",
                "Requests refused because the endpoint was saturated.",
                Counter,
                |s| s.rejected,
            ),
            (
                "edgebus_endpoint_duplicates",
                "Duplicate requests answered from the first copy's reply.",
                Counter,
                |s| s.duplicates,
            ),
            (
                "edgebus_endpoint_rate_limited",
                "Requests answered RATE_LIMITED.",
                Counter,
                |s| s.rate_limited,
            ),
            (
                "edgebus_endpoint_inflight",
                "Requests being handled now.",
                Gauge,
                |s| s.inflight,
            ),
        ];
        for (name, help, kind, value) in endpoint_rows {
            let samples = snaps.iter().map(|(l, s)| (l.clone(), value(s) as f64));
            family(&mut e, name, help, kind, samples)?;
        }
        let mut m = e.encode_descriptor(
            "edgebus_endpoint_duration_seconds",
            "Time from receiving a request to publishing its reply.",
            None,
            MetricType::Histogram,
        )?;
        for (labels, st) in &eps {
            let (sum, count, buckets) = st.latency_histogram(&LATENCY_BUCKETS);
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            m.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum,
                    count,
                    &with_inf(buckets, count),
                    None,
                )?;
        }

        // Circuit breakers of the calls each service makes.
        let mut states = Vec::new();
        let mut opened = Vec::new();
        for s in &self.0 {
            for (target, c) in s.bus().circuits() {
                for st in [
                    CircuitState::Closed,
                    CircuitState::Open,
                    CircuitState::HalfOpen,
                ] {
                    states.push((
                        vec![
                            ("service", s.name().to_owned()),
                            ("target", target.clone()),
                            ("state", st.to_string()),
                        ],
                        f64::from(u8::from(c.state == st)),
                    ));
                }
                opened.push((
                    vec![("service", s.name().to_owned()), ("target", target.clone())],
                    c.opened as f64,
                ));
            }
        }
        family(
            &mut e,
            "edgebus_circuit_state",
            "1 for the state each circuit breaker is in.",
            Gauge,
            states,
        )?;
        family(
            &mut e,
            "edgebus_circuit_opened",
            "Times each circuit breaker opened.",
            Counter,
            opened,
        )
    }
}

/// The encoder's buckets: per-bucket counts (it accumulates them), ending with the `+Inf`
/// bucket (`f64::MAX` to the encoder).
fn with_inf(cumulative: Vec<(f64, u64)>, count: u64) -> Vec<(f64, u64)> {
    let mut below = 0;
    let mut out: Vec<(f64, u64)> = cumulative
        .into_iter()
        .map(|(bound, c)| {
            let n = c.saturating_sub(below);
            below = below.max(c);
            (bound, n)
        })
        .collect();
    out.push((f64::MAX, count.saturating_sub(below)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct One;

    impl Collector for One {
        fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            family(
                &mut e,
                "test_things",
                "Things.",
                MetricType::Counter,
                [(vec![("kind", "a")], 3.0), (vec![("kind", "b")], 4.0)],
            )
        }
    }

    #[test]
    fn encodes_families_once_with_labels() {
        let m = Metrics::default();
        m.add(One);
        let text = m.encode();
        assert!(text.contains("# TYPE test_things counter"), "{text}");
        assert!(text.contains("test_things_total{kind=\"a\"} 3"), "{text}");
        assert!(text.contains("test_things_total{kind=\"b\"} 4"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }

    #[test]
    fn histogram_encodes_cumulative_buckets_and_inf() {
        let st = crate::stats::EndpointStats::default();
        for ms in [1, 2, 3, 40, 20_000] {
            st.start();
            st.finish(Duration::from_millis(ms), true);
        }
        let (sum, count, b) = st.latency_histogram(&[0.0025, 0.05]);
        let mut out = String::new();
        let mut registry = Registry::default();
        #[derive(Debug)]
        struct H(f64, u64, Vec<(f64, u64)>);
        impl Collector for H {
            fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
                let mut m = e.encode_descriptor("h_seconds", "h", None, MetricType::Histogram)?;
                m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    self.0,
                    self.1,
                    &with_inf(self.2.clone(), self.1),
                    None,
                )
            }
        }
        registry.register_collector(Box::new(H(sum, count, b)));
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        assert!(out.contains("h_seconds_bucket{le=\"0.0025\"} 2\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{le=\"0.05\"} 4\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("h_seconds_count 5\n"), "{out}");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let st = crate::stats::EndpointStats::default();
        for ms in [1, 2, 3, 40] {
            st.start();
            st.finish(Duration::from_millis(ms), true);
        }
        let (sum, count, b) = st.latency_histogram(&[0.0025, 0.05]);
        assert_eq!(count, 4);
        assert_eq!(b, vec![(0.0025, 2), (0.05, 4)]);
        assert!((sum - 0.046).abs() < 0.002, "{sum}");
    }
}
