//! `edgebus up`: the broker, then discovery, the health monitor, the orchestrator (when
//! sagas are declared) and the services `[up]` lists, each connected to the broker over
//! loopback as its own client, all in one process.
//!
//! [`Parts`] is the part that runs on a broker already started, so that it can be run and
//! stopped in-process (its tests do); [`run`] is the command: broker, parts, systemd, signal.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::anyhow;
use edgebus_runtime::metrics::Metrics;
use edgebus_runtime::service::Service;
use edgebus_runtime::systemd::{self, Supervisor};
use edgebus_runtime::tree::Tree;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{serve_metrics, services_runtime, startup_lines};
use crate::config::TopicsFile;
use crate::ops::{broker_status, BrokerCollector, Hooks};
use crate::parts;

/// The names of the parts `edgebus up` runs for `file`, in start order.
pub fn part_names(file: &TopicsFile) -> Vec<String> {
    let mut names = vec!["discovery".to_owned(), "health-monitor".to_owned()];
    if !file.saga.is_empty() {
        names.push("orchestrator".to_owned());
    }
    names.extend(file.up.services.iter().cloned());
    names
}

/// The parts of `edgebus up`, running as tasks of the current tokio runtime.
#[derive(Debug)]
pub struct Parts {
    count: usize,
    tasks: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    ready: mpsc::UnboundedReceiver<Service>,
    failed: mpsc::UnboundedReceiver<String>,
}

impl Parts {
    /// Starts every part of `file` against the broker at `broker`: one stable instance id
    /// per part and host (`{part}-{host}`), so the registry and the health view keep one
    /// row per part across restarts. Fails when the bus's credentials cannot be read.
    pub fn start(
        file: &TopicsFile,
        broker: SocketAddr,
        metrics: Option<Metrics>,
    ) -> anyhow::Result<Parts> {
        // Read once before any part starts, so a failure leaves nothing running.
        edgebus_runtime::env::credentials(&file.bus)?;
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready) = mpsc::unbounded_channel();
        let (failed_tx, failed) = mpsc::unbounded_channel();
        let names = part_names(file);
        let count = names.len();
        let mut tasks = Vec::new();
        for name in names {
            let instance = edgebus_runtime::env::host_instance(&name);
            let options =
                parts::service_options(file, Some(&broker.to_string()), &name, Some(instance))?;
            let file = file.clone();
            let mut stop = stop_rx.clone();
            let hooks = Hooks {
                metrics: metrics.clone(),
                systemd: false,
                ready: Some(ready_tx.clone()),
            };
            let failed = failed_tx.clone();
            tasks.push(tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = parts::run_service(&name, &file, options, stopped, hooks).await {
                    let _ = failed.send(format!("{name}: {e:#}"));
                }
            }));
        }
        Ok(Parts {
            count,
            tasks,
            stop,
            ready,
            failed,
        })
    }

    /// Waits until every part is connected and registered, and returns their services; or
    /// returns the first part that could not start (its contract, its journal) and why.
    pub async fn ready(&mut self) -> Result<Vec<Service>, String> {
        let mut ready = Vec::with_capacity(self.count);
        while ready.len() < self.count {
            tokio::select! {
                Some(why) = self.failed.recv() => return Err(why),
                Some(s) = self.ready.recv() => ready.push(s),
                else => return Err("every part stopped before it was ready".into()),
            }
        }
        Ok(ready)
    }

    /// Stops every part: each answers the requests it took and says it stopped.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Runs `edgebus up` until the future `stop` makes (inside the runtime) completes. Under systemd, READY=1 goes out once every
/// part is connected and registered, and the watchdog is pinged while the broker, the
/// services' runtime and every part's bus are healthy.
pub fn run<S>(
    mut file: TopicsFile,
    metrics: Option<SocketAddr>,
    stop: impl FnOnce() -> S,
) -> anyhow::Result<()>
where
    S: Future<Output = ()>,
{
    let system_topic = Tree::new(&file.bus.prefix).broker();
    let handle = edgebus_broker::Broker::start(file.broker.clone(), Some(system_topic))?;
    let listen = handle.local_addr();
    startup_lines(&handle);
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    file.broker.listen = listen;
    let rt = services_runtime()?;
    let result = rt.block_on(async {
        let (metrics, _server) = serve_metrics(metrics).await?;
        let mut hup = super::broker::sighup()?;
        if let Some(m) = &metrics {
            m.add(BrokerCollector(handle.counters()));
        }
        let stop = stop();
        let mut parts = Parts::start(&file, addr, metrics)?;
        tokio::pin!(stop);
        let mut supervisor = None;
        let mut failure = None;
        tokio::select! {
            ready = parts.ready() => match ready {
                // A part that cannot start fails the whole bus: under systemd that is a
                // failed start with the reason, not a wait for READY.
                Err(why) => failure = Some(why),
                Ok(ready) => {
                    let prober = handle.prober();
                    let counters = handle.counters();
                    let mut sup = Supervisor::from_env()
                        .probe("broker", Box::new(move |budget| prober.probe(budget)))
                        .probe("runtime", systemd::runtime_probe(tokio::runtime::Handle::current()));
                    for s in &ready {
                        sup = sup.probe(s.name().to_owned(), systemd::bus_probe(s.bus()));
                    }
                    let sup = sup.status(move || {
                        format!(
                            "{}; parts (requests/errors): {}",
                            broker_status(listen, &counters.snapshot()),
                            parts_status(&ready)
                        )
                    });
                    tracing::info!(parts = parts.count, "all parts ready");
                    supervisor = Some(sup.ready());
                    super::broker::reload_on_sighup(&handle, &mut hup, &mut stop).await;
                }
            },
            _ = &mut stop => {}
        }
        if failure.is_none() {
            tracing::info!("signal received; shutting down");
        }
        if let Some(s) = supervisor {
            s.stopping("stopping: parts first, then the broker");
        }
        parts.stop().await;
        match failure {
            Some(why) => Err(anyhow!("a part did not start: {why}")),
            None => Ok::<_, anyhow::Error>(()),
        }
    });
    drop(rt);
    handle.shutdown(Duration::from_millis(1500));
    result
}

/// `echo 12/0, kv RECONNECTING 3/1`: each part's requests and errors, and whether its
/// connection is down.
fn parts_status(ready: &[Service]) -> String {
    let names: Vec<String> = ready
        .iter()
        .map(|s| {
            let t = s.total_stats();
            let up = if s.bus().is_connected() {
                ""
            } else {
                " RECONNECTING"
            };
            format!("{}{up} {}/{}", s.name(), t.requests, t.errors)
        })
        .collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgebus_runtime::bus::{Bus, BusOptions};
    use edgebus_runtime::request::RequestOptions;

    /// `edgebus up`'s parts on an in-process broker: every part becomes ready, a request to
    /// a listed service is answered, the registry lists each part once, and they stop.
    #[test]
    fn parts_start_answer_and_stop_in_process() {
        let mut file = TopicsFile::builtin();
        file.broker.listen = "127.0.0.1:0".parse().unwrap();
        let dir = std::env::temp_dir().join(format!("edgebus-up-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        file.orchestrator.journal = dir.join("sagas.journal");
        let broker = edgebus_broker::Broker::start(file.broker.clone(), None).unwrap();
        let addr = broker.local_addr();
        let rt = services_runtime().unwrap();
        rt.block_on(async {
            let mut parts = Parts::start(&file, addr, None).expect("parts");
            let ready = tokio::time::timeout(Duration::from_secs(20), parts.ready())
                .await
                .expect("ready within 20 s")
                .expect("every part starts");
            let mut names: Vec<&str> = ready.iter().map(|s| s.name()).collect();
            names.sort_unstable();
            assert_eq!(
                names,
                [
                    "discovery",
                    "echo",
                    "health-monitor",
                    "hostmetrics",
                    "kv",
                    "orchestrator"
                ]
            );
            let bus = Bus::connect(BusOptions::new(addr.to_string(), "up-test-caller")).unwrap();
            assert!(bus.sync(Duration::from_secs(5)).await);
            let reply = bus
                .request_reply(
                    &bus.request_topic("echo/echo"),
                    bytes::Bytes::from_static(br#"{"n":1}"#),
                    &RequestOptions::timeout(Duration::from_secs(5)),
                )
                .await
                .expect("echo answers");
            assert!(reply.success, "{reply:?}");
            assert_eq!(reply.data, Some(serde_json::json!({"n": 1})));
            bus.close(Duration::from_millis(200)).await;
            tokio::time::timeout(Duration::from_secs(10), parts.stop())
                .await
                .expect("parts stop within 10 s");
        });
        drop(rt);
        broker.shutdown(Duration::from_millis(500));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_saga_less_file_runs_no_orchestrator() {
        let mut file = TopicsFile::builtin();
        file.saga.clear();
        file.up.services = vec!["echo".into()];
        assert_eq!(part_names(&file), ["discovery", "health-monitor", "echo"]);
    }
}
