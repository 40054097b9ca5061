//! The `edgebus` command line: its arguments, and one module per command that does more
//! than call into the library ([`up`], [`broker`], [`call`], [`views`], [`bench`]).

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use edgebus_runtime::metrics::{Metrics, MetricsServer};
use edgebus_runtime::shutdown_signal;

use crate::config::TopicsFile;
use crate::ops::Hooks;
use crate::parts;

pub mod bench;
pub mod broker;
pub mod call;
pub mod up;
pub mod views;

/// edgebus: an MQTT message bus for many small services on one small host.
#[derive(Debug, Parser)]
#[command(name = "edgebus", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the whole bus in one process: the broker, discovery, the health monitor, and the
    /// services `[up]` lists.
    Up(BrokerArgs),
    /// Runs the embedded MQTT broker (3.1.1 and 5 on one port).
    Broker(BrokerArgs),
    /// Validates topics.toml; errors name file, line and key.
    CheckConfig {
        /// The topics.toml to check (default: the built-in defaults).
        #[arg(short, long, env = "EDGEBUS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Adds or replaces a user in a mosquitto-format password file.
    Passwd {
        /// The password file (created if missing, mode 0600).
        file: PathBuf,
        /// The username.
        user: String,
        /// The password; without it, it is read from the terminal or from stdin.
        #[arg(long)]
        password: Option<String>,
    },
    /// Mints a token (a JWT) for SUBJECT with the key `[broker.auth.jwt]` names; clients
    /// send it as their MQTT password.
    Token {
        /// Who the token is for: the username it logs in as.
        subject: String,
        /// A permission it grants (repeat for more), e.g. `echo:call`, `echo:serve`,
        /// `edge/sensors/#:write`.
        #[arg(long = "permission", short = 'p')]
        permissions: Vec<String>,
        /// How long it is valid, e.g. `1h`, `30d`.
        #[arg(long, default_value = "1h", value_parser = positive_duration)]
        ttl: Duration,
        /// The private key to sign with (RS256, ES256, EdDSA), when `[broker.auth.jwt]` names
        /// none.
        #[arg(long)]
        key: Option<PathBuf>,
        /// topics.toml (default: built-in defaults).
        #[arg(short, long, env = "EDGEBUS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Measures brokers: round trips, fan-in, fan-out, connection rate, memory.
    Bench(bench::BenchArgs),
    /// Runs one built-in service (echo, hostmetrics, kv) against any MQTT 5 broker.
    Service {
        /// The service.
        name: String,
        #[command(flatten)]
        part: PartArgs,
    },
    /// Runs the discovery service (the registry, NO_RESPONDERS, the list endpoint).
    Discovery(PartArgs),
    /// Runs the saga orchestrator (the `[[saga]]` tables of topics.toml).
    Orchestrator(PartArgs),
    /// The health view; `edgebus health monitor` runs the health monitor itself.
    Health {
        /// `monitor`: run the health monitor (one systemd unit).
        #[command(subcommand)]
        run: Option<HealthCmd>,
        /// Keep printing alerts as they come.
        #[arg(long)]
        watch: bool,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// topics.toml (default: built-in defaults).
        #[arg(short, long, env = "EDGEBUS_CONFIG")]
        config: Option<PathBuf>,
        /// The broker, host:port (default: `bus.broker` of topics.toml).
        #[arg(long, env = "EDGEBUS_BROKER")]
        broker: Option<String>,
    },
    /// The registry: every service instance, online and offline.
    Services {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// topics.toml (default: built-in defaults).
        #[arg(short, long, env = "EDGEBUS_CONFIG")]
        config: Option<PathBuf>,
        /// The broker, host:port (default: `bus.broker` of topics.toml).
        #[arg(long, env = "EDGEBUS_BROKER")]
        broker: Option<String>,
    },
    /// Sends one request and prints the reply; exit status 0 when it succeeded.
    Call {
        /// SERVICE/ENDPOINT, or a full request topic ending in /request.
        target: String,
        /// The request, JSON (default: {}); `-` reads it from stdin, `@FILE` from a file.
        payload: Option<String>,
        /// topics.toml (default: built-in defaults).
        #[arg(short, long, env = "EDGEBUS_CONFIG")]
        config: Option<PathBuf>,
        /// The broker, host:port (default: `bus.broker` of topics.toml).
        #[arg(long, env = "EDGEBUS_BROKER")]
        broker: Option<String>,
        /// How long to wait for the reply (above zero).
        #[arg(long, default_value = "5s", value_parser = positive_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum HealthCmd {
    /// Runs the health monitor.
    Monitor(PartArgs),
}

#[derive(Debug, clap::Args)]
struct PartArgs {
    /// topics.toml (default: built-in defaults).
    #[arg(short, long, env = "EDGEBUS_CONFIG")]
    config: Option<PathBuf>,
    /// The broker, host:port (default: `bus.broker` of topics.toml).
    #[arg(long, env = "EDGEBUS_BROKER")]
    broker: Option<String>,
    /// Instance id, also the MQTT client id (default: NAME-xxxx, new at each start; the
    /// systemd units set a stable one).
    #[arg(long, env = "EDGEBUS_INSTANCE")]
    instance: Option<String>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9184.
    #[arg(long, env = "EDGEBUS_METRICS")]
    metrics: Option<SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct BrokerArgs {
    /// topics.toml (default: built-in defaults, listening on 127.0.0.1:1883).
    #[arg(short, long, env = "EDGEBUS_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `broker.listen`, e.g. 0.0.0.0:1883 (port 0 picks a free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9183.
    #[arg(long, env = "EDGEBUS_METRICS")]
    metrics: Option<SocketAddr>,
}

/// A duration above zero, such as `500ms` or `5s`.
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be above zero, e.g. 500ms or 5s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// Invoked through a link named after a built-in service (`/usr/lib/edgebus/services/echo`,
/// as the `edgebus-service@echo` unit does), `edgebus` runs `edgebus service echo ARGS…`.
fn multicall_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<_> = args.into_iter().collect();
    let name = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if crate::examples::BUILTIN.contains(&name.as_str()) {
        args.splice(1..1, ["service".into(), name.into()]);
    }
    args
}

fn load(config: Option<&Path>) -> anyhow::Result<TopicsFile> {
    match config {
        Some(p) => Ok(TopicsFile::load(p)?),
        None => Ok(TopicsFile::builtin()),
    }
}

/// Runs the command line `args` (the program name first) and returns its exit status.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = Cli::parse_from(multicall_args(args));
    // The bench prints a table and the one-shot commands print their answer: their
    // in-process parts only speak up about trouble they do not report themselves.
    edgebus_runtime::logging::init(match cli.command {
        Cmd::Bench(_) => "warn,rumqttd=off",
        Cmd::Call { .. } | Cmd::Services { .. } | Cmd::Health { run: None, .. } => "error",
        _ => "info,rumqttd=off",
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: to the journal with fields, or as a plain line on stderr.
            if edgebus_runtime::logging::detect() == edgebus_runtime::logging::Format::Journal {
                tracing::error!("{e:#}");
            } else {
                eprintln!("edgebus: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The topics.toml of `broker` and `up`, with `--listen` applied.
fn broker_file(args: &BrokerArgs) -> anyhow::Result<TopicsFile> {
    let mut file = load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        file.broker.listen = listen;
    }
    Ok(file)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Up(args) => up::run(broker_file(&args)?, args.metrics, shutdown_signal),
        Cmd::Broker(args) => broker::run(broker_file(&args)?, args.metrics, shutdown_signal),
        Cmd::Service { name, part } => run_part(&name, part),
        Cmd::Discovery(a) => run_part("discovery", a),
        Cmd::Orchestrator(a) => run_part("orchestrator", a),
        Cmd::Health {
            run: Some(HealthCmd::Monitor(a)),
            ..
        } => run_part("health-monitor", a),
        Cmd::Health {
            run: None,
            watch,
            json,
            config,
            broker,
        } => {
            let file = load(config.as_deref())?;
            current_thread()?.block_on(views::health(&file, broker.as_deref(), json, watch))
        }
        Cmd::Services {
            json,
            config,
            broker,
        } => {
            let file = load(config.as_deref())?;
            current_thread()?.block_on(views::services(&file, broker.as_deref(), json))
        }
        Cmd::Call {
            target,
            payload,
            config,
            broker,
            timeout,
        } => {
            let file = load(config.as_deref())?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (reply, ok) = rt.block_on(call::call(
                &file,
                broker.as_deref(),
                &target,
                payload.as_deref(),
                timeout,
            ))?;
            println!("{}", serde_json::to_string(&reply)?);
            if ok {
                Ok(())
            } else {
                let e = reply.error.map(|e| e.to_string()).unwrap_or_default();
                Err(anyhow!("{e}"))
            }
        }
        Cmd::CheckConfig { config } => {
            let file = match config.as_deref() {
                Some(p) => TopicsFile::load_checked(p)?,
                None => {
                    let f = TopicsFile::builtin();
                    f.check_startable(crate::config::SHIPPED, Path::new("<built-in>"))?;
                    f
                }
            };
            let name = config.map_or_else(
                || "built-in defaults (the shipped topics.toml)".into(),
                |p| p.display().to_string(),
            );
            println!(
                "{name}: ok (prefix `{}`, broker listens on {})",
                file.bus.prefix, file.broker.listen
            );
            Ok(())
        }
        Cmd::Passwd {
            file,
            user,
            password,
        } => crate::passwd::run(&file, &user, password),
        Cmd::Token {
            subject,
            permissions,
            ttl,
            key,
            config,
        } => {
            let file = load(config.as_deref())?;
            let jwt = file.broker.auth.jwt.as_ref().ok_or_else(|| {
                anyhow!("topics.toml has no [broker.auth.jwt]: there is no key to sign with")
            })?;
            let token =
                edgebus_broker::token::mint(jwt, key.as_deref(), &subject, &permissions, ttl)
                    .map_err(|e| anyhow!("{e}"))?;
            println!("{token}");
            Ok(())
        }
        Cmd::Bench(args) => bench::run(args),
    }
}

/// One part in this process: under systemd it sends READY=1 once connected and registered,
/// and pings the watchdog while its runtime and bus loop are healthy.
fn run_part(name: &str, a: PartArgs) -> anyhow::Result<()> {
    let file = load(a.config.as_deref())?;
    let options = parts::service_options(&file, a.broker.as_deref(), name, a.instance)?;
    services_runtime()?.block_on(async {
        let (metrics, _server) = serve_metrics(a.metrics).await?;
        let hooks = Hooks {
            metrics,
            systemd: true,
            ready: None,
        };
        parts::run_service(name, &file, options, shutdown_signal(), hooks).await
    })
}

/// Starts the `/metrics` endpoint when an address is given (inside a tokio runtime).
async fn serve_metrics(
    addr: Option<SocketAddr>,
) -> anyhow::Result<(Option<Metrics>, Option<MetricsServer>)> {
    let Some(addr) = addr else {
        return Ok((None, None));
    };
    let metrics = Metrics::default();
    metrics.add(crate::ops::ProcessCollector);
    let server = metrics
        .serve(addr)
        .await
        .with_context(|| format!("metrics: cannot listen on {addr}"))?;
    println!("edgebus metrics on http://{}/metrics", server.local_addr());
    std::io::stdout().flush().ok();
    Ok((Some(metrics), Some(server)))
}

/// Prints where the broker listens, on stdout: one stable line each, for scripts and tests
/// that start it on port 0.
fn startup_lines(handle: &edgebus_broker::BrokerHandle) {
    println!("edgebus broker listening on {}", handle.local_addr());
    if let Some(ws) = handle.websocket_addr() {
        println!("edgebus websocket listening on {ws}");
    }
    if let Some(tls) = handle.tls_addr() {
        println!("edgebus TLS listening on {tls}");
    }
    if let Some(wss) = handle.tls_websocket_addr() {
        println!("edgebus TLS websocket listening on {wss}");
    }
    std::io::stdout().flush().ok();
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The runtime services run on: two workers are plenty on a small host.
fn services_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("edgebus-svc")
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }
}
