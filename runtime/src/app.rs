//! A service as a program: where it connects (from the environment and topics.toml), a
//! signal to stop on, and the whole life of an instance in one call,
//! [`ServiceBuilder::run`]:
//!
//! 1. connect to the broker of `EDGEBUS_BROKER`, else `[bus] broker` of the topics.toml named
//!    by `EDGEBUS_CONFIG`, else `127.0.0.1:1883`, as instance `EDGEBUS_INSTANCE` (made up when
//!    unset), with that file's `[[service]]` declaration as the service's contract;
//! 2. start serving, and wait until the instance is registered and its endpoints are
//!    subscribed at the broker: a request sent from then on is answered;
//! 3. under systemd, send `READY=1` and ping the watchdog while the runtime and the bus are
//!    healthy ([`crate::systemd`]);
//! 4. on SIGINT or SIGTERM, answer the requests already taken, publish the `stopped`
//!    record and close the connection cleanly (so the Last Will does not overwrite it).

use std::future::Future;
use std::time::Duration;

use crate::bus::Bus;
use crate::env::Environment;
use crate::service::{Service, ServiceBuilder, StartError};

/// Completes on the first SIGINT or SIGTERM (inside a tokio runtime). If the handlers
/// cannot be installed it never completes, and says why in the log.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot catch SIGINT and SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Service {
    /// Waits until the instance is connected, registered, and its endpoints subscribed at
    /// the broker (confirmed by a round trip through it): a request sent from then on is
    /// answered. While the broker is away it keeps waiting.
    pub async fn ready(&self) {
        while !self.bus().sync(Duration::from_secs(2)).await {}
    }
}

impl ServiceBuilder {
    /// Runs the service as a program until SIGINT or SIGTERM (see the [module](self)
    /// documentation): connects as the environment says, serves, says when it is ready,
    /// and stops cleanly. Returns an error when it cannot start: topics.toml unreadable, or
    /// the code disagreeing with the file's declaration of the service.
    pub async fn run(self) -> Result<(), StartError> {
        let env = Environment::load()?;
        let name = self.name().to_owned();
        let bus = Bus::connect(env.bus_options(&name)?)?;
        let builder = if self.has_contract() {
            self
        } else {
            self.contract(&env.service)
        };
        let stop = shutdown_signal();
        tokio::pin!(stop);
        let started = tokio::select! {
            s = builder.start(&bus) => s,
            _ = &mut stop => {
                bus.close(Duration::from_secs(1)).await;
                return Ok(());
            }
        };
        let service = match started {
            Ok(s) => s,
            Err(e) => {
                bus.close(Duration::from_secs(1)).await;
                return Err(e);
            }
        };
        let mut supervisor = None;
        let stopped = tokio::select! {
            _ = service.ready() => false,
            _ = &mut stop => true,
        };
        if !stopped {
            tracing::info!(
                service = %name,
                instance = service.instance(),
                broker = %env.bus.broker,
                "{name} ready as {}",
                service.instance()
            );
            supervisor = Some(crate::systemd::service_supervisor(&service).ready());
            stop.await;
        }
        tracing::info!(service = %name, "stopping: answering the requests already taken");
        if let Some(s) = supervisor {
            s.stopping(&format!("{name}: stopping"));
        }
        service.stop(Duration::from_secs(2)).await;
        bus.close(Duration::from_secs(1)).await;
        Ok(())
    }
}
