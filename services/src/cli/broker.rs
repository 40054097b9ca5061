//! `edgebus broker`: the embedded broker alone, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use edgebus_runtime::systemd::Supervisor;
use edgebus_runtime::tree::Tree;

use super::{current_thread, serve_metrics, startup_lines};
use crate::config::TopicsFile;
use crate::ops::{broker_status, BrokerCollector};

/// Runs the broker of `file` until the future `stop` makes (inside the runtime) completes,
/// then closes every client connection.
pub fn run<S>(
    file: TopicsFile,
    metrics: Option<SocketAddr>,
    stop: impl FnOnce() -> S,
) -> anyhow::Result<()>
where
    S: std::future::Future<Output = ()>,
{
    let system_topic = Tree::new(&file.bus.prefix).broker();
    let handle = edgebus_broker::Broker::start(file.broker, Some(system_topic))?;
    let addr = handle.local_addr();
    startup_lines(&handle);
    let rt = current_thread()?;
    let result = rt.block_on(async {
        let (metrics, _server) = serve_metrics(metrics).await?;
        let mut hup = sighup()?;
        if let Some(m) = &metrics {
            m.add(BrokerCollector(handle.counters()));
        }
        let prober = handle.prober();
        let counters = handle.counters();
        let supervisor = Supervisor::from_env()
            .probe("broker", Box::new(move |budget| prober.probe(budget)))
            .status(move || broker_status(addr, &counters.snapshot()))
            .ready();
        let stop = stop();
        tokio::pin!(stop);
        reload_on_sighup(&handle, &mut hup, &mut stop).await;
        tracing::info!("signal received; shutting down");
        supervisor.stopping("stopping: closing client connections");
        Ok::<_, anyhow::Error>(())
    });
    drop(rt);
    handle.shutdown(Duration::from_millis(1500));
    result
}

/// SIGHUP, caught from now on: installed before the process says it is ready, so that a
/// `systemctl reload` right after the start reloads rather than kills it.
pub fn sighup() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Waits for `stop`, reading the TLS certificate and key again at each SIGHUP meanwhile
/// (`systemctl reload`).
pub async fn reload_on_sighup<S>(
    handle: &edgebus_broker::BrokerHandle,
    hup: &mut tokio::signal::unix::Signal,
    stop: &mut std::pin::Pin<&mut S>,
) where
    S: std::future::Future<Output = ()>,
{
    loop {
        tokio::select! {
            _ = stop.as_mut() => return,
            _ = hup.recv() => {
                if let Err(e) = handle.reload_tls() {
                    tracing::warn!(error = %e, "SIGHUP: the TLS files cannot be used; keeping the ones before");
                }
            }
        }
    }
}
