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
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::bus::{Bus, BusOptions};
use crate::config::BusConfig;
use crate::contract::ServiceSpec;
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

/// The parts of topics.toml a service reads: `[bus]` and the `[[service]]` declarations
/// (the rest of the file belongs to the bus's own parts, and is not checked here).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Environment {
    /// `[bus]`: prefix and broker address.
    pub bus: BusConfig,
    /// `[[service]]`: the declared contracts.
    pub service: Vec<ServiceSpec>,
    /// The file read, if any.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

impl Environment {
    /// Reads the topics.toml named by `EDGEBUS_CONFIG` (the defaults when unset), then lets
    /// `EDGEBUS_BROKER` override its broker address.
    pub fn load() -> Result<Environment, StartError> {
        let mut env = match std::env::var_os("EDGEBUS_CONFIG") {
            Some(path) => Self::read(PathBuf::from(path))?,
            None => Environment::default(),
        };
        if let Ok(broker) = std::env::var("EDGEBUS_BROKER") {
            if !broker.is_empty() {
                env.bus.broker = broker;
            }
        }
        Ok(env)
    }

    /// Reads `[bus]` and `[[service]]` from a topics.toml.
    pub fn read(path: PathBuf) -> Result<Environment, StartError> {
        let err = |message: String| StartError::Config {
            file: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| err(format!("cannot read: {e}")))?;
        let de = toml::Deserializer::new(&text);
        let mut env: Environment = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
            err(format!("{at}key `{key}`: {}", inner.message().trim()))
        })?;
        env.bus
            .validate()
            .map_err(|m| err(format!("key `bus.prefix`: {m}")))?;
        crate::contract::validate(&env.service, &env.bus.prefix)
            .map_err(|e| err(format!("key `{}`: {}", e.path, e.message)))?;
        env.file = Some(path);
        Ok(env)
    }

    /// Options for an instance of `service`: this environment's broker and prefix, and the
    /// instance id `EDGEBUS_INSTANCE` (made up when unset; the systemd template unit sets
    /// it, so that an instance keeps its id across restarts).
    pub fn bus_options(&self, service: &str) -> BusOptions {
        let instance = std::env::var("EDGEBUS_INSTANCE")
            .ok()
            .filter(|i| !i.is_empty());
        BusOptions::for_service(
            self.bus.broker.clone(),
            self.bus.prefix.clone(),
            service,
            instance,
        )
    }
}

/// A stable instance id for the one instance of `service` a host runs:
/// `{service}-{short host name}` (characters a client id may not hold become `-`). Kept
/// across restarts, so the registry and the health view keep one row per instance.
pub fn host_instance(service: &str) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let short: String = host
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if short.is_empty() {
        service.to_owned()
    } else {
        format!("{service}-{short}")
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
        let bus = Bus::connect(env.bus_options(&name))?;
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
