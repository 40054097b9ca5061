//! The `edgebus` command line.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use edgebus_runtime::metrics::{Metrics, MetricsServer};
use edgebus_runtime::systemd::{self, Supervisor};
use edgebus_runtime::tree::Tree;
use edgebus_services::bench::{self, BenchOptions, Spawned, Target};
use edgebus_services::config::TopicsFile;
use edgebus_services::ops::{broker_status, BrokerCollector, Hooks};
use edgebus_services::run;

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
    /// Measures brokers: round trips, fan-in, fan-out, connection rate, memory.
    Bench(BenchArgs),
    /// Runs one built-in service (echo, hostmetrics, kv) against any MQTT 5 broker.
    Service {
        /// The service.
        name: String,
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

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// A broker to measure, as host:port (repeatable).
    #[arg(long = "broker")]
    brokers: Vec<SocketAddr>,
    /// The pid of each --broker, in order, to read its memory from /proc.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Start an `edgebus broker` on a free loopback port and measure it.
    #[arg(long)]
    embedded: bool,
    /// Start Debian's `mosquitto` (set_tcp_nodelay true) on a free loopback port and measure it.
    #[arg(long)]
    mosquitto: bool,
    /// Also start an `edgebus broker` with `threads = N` and measure it (repeatable).
    #[arg(long = "embedded-threads")]
    embedded_threads: Vec<usize>,
    /// Round trips per round-trip scenario.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Messages per fan-in / fan-out scenario.
    #[arg(long, default_value_t = 20000)]
    messages: usize,
    /// Publishers in fan-in, subscribers in fan-out.
    #[arg(long, default_value_t = 4)]
    width: usize,
    /// Connections opened by the connection-rate scenario.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Idle connections held to measure memory per connection.
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Distinct topics published to in the memory scenario.
    #[arg(long, default_value_t = 100_000)]
    topics: usize,
    /// Distinct client ids connecting and leaving in the memory scenario.
    #[arg(long, default_value_t = 10_000)]
    client_ids: usize,
    /// Trials of the failure-detection scenario (SIGKILL, SIGSTOP, NO_RESPONDERS); 0 skips it.
    #[arg(long, default_value_t = 5)]
    detect_trials: usize,
    /// Also write the table, with the machine and versions, to this Markdown file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Only these scenario groups (comma-separated): rtt, runtime, fan, slow, churn, connect,
    /// memory, detect, saga.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(bench::GROUPS))]
    only: Vec<String>,
}

/// A duration above zero, such as `500ms` or `5s`.
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be above zero, e.g. 500ms or 5s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// jemalloc: memory a connection reserves but never touches (rumqttd sizes several queues per
/// connection up front) costs address space, not RSS, and freed memory goes back to the OS.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings for a small host: two arenas instead of four per core, and dirty pages
/// returned to the OS after a second instead of ten (`MALLOC_CONF` still overrides).
#[allow(unsafe_code, non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 47] = b"narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Returns every arena's unused dirty pages to the OS (the broker calls it once it is quiet).
#[allow(unsafe_code)]
fn purge_arenas() {
    // "arena.<MALLCTL_ARENAS_ALL>.purge" takes and returns nothing.
    let name = b"arena.4096.purge\0";
    // SAFETY: a valid NUL-terminated mallctl name, and null pointers for a control that
    // neither reads nor writes a value.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

fn main() -> ExitCode {
    edgebus_broker::set_heap_trimmer(purge_arenas);
    let cli = Cli::parse_from(multicall_args(std::env::args_os()));
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

/// Invoked through a link named after a built-in service (`/usr/lib/edgebus/services/echo`,
/// as the `edgebus-service@echo` unit does), `edgebus` runs `edgebus service echo ARGS…`.
fn multicall_args(args: std::env::ArgsOs) -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = args.collect();
    let name = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if edgebus_services::examples::BUILTIN.contains(&name.as_str()) {
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Up(args) => run_up(args),
        Cmd::Broker(args) => run_broker(args),
        Cmd::Service {
            name,
            config,
            broker,
            instance,
            metrics,
        } => run_part(
            &name,
            PartArgs {
                config,
                broker,
                instance,
                metrics,
            },
        ),
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
            current_thread()?.block_on(edgebus_services::views::health(
                &file,
                broker.as_deref(),
                json,
                watch,
            ))
        }
        Cmd::Services {
            json,
            config,
            broker,
        } => {
            let file = load(config.as_deref())?;
            current_thread()?.block_on(edgebus_services::views::services(
                &file,
                broker.as_deref(),
                json,
            ))
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
            let (reply, ok) = rt.block_on(run::call(
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
                    f.check_startable(edgebus_services::config::SHIPPED, Path::new("<built-in>"))?;
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
        } => edgebus_services::passwd::run(&file, &user, password),
        Cmd::Bench(args) => run_bench(args),
    }
}

fn run_broker(args: BrokerArgs) -> anyhow::Result<()> {
    let mut file = load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        file.broker.listen = listen;
    }
    let system_topic = Tree::new(&file.bus.prefix).broker();
    let handle = edgebus_broker::Broker::start(file.broker, Some(system_topic))?;
    let addr = handle.local_addr();
    // One stable line on stdout, for scripts and tests that start us on port 0.
    println!("edgebus broker listening on {addr}");
    if let Some(ws) = handle.websocket_addr() {
        println!("edgebus websocket listening on {ws}");
    }
    std::io::stdout().flush().ok();
    let rt = current_thread()?;
    let result = rt.block_on(async {
        let (metrics, _server) = serve_metrics(args.metrics).await?;
        if let Some(m) = &metrics {
            m.add(BrokerCollector(handle.counters()));
        }
        let prober = handle.prober();
        let counters = handle.counters();
        let supervisor = Supervisor::from_env()
            .probe("broker", Box::new(move |budget| prober.probe(budget)))
            .status(move || broker_status(addr, &counters.snapshot()))
            .ready();
        signal().await;
        tracing::info!("signal received; shutting down");
        supervisor.stopping("stopping: closing client connections");
        Ok::<_, anyhow::Error>(())
    });
    drop(rt);
    handle.shutdown(Duration::from_millis(1500));
    result
}

/// One part in this process: under systemd it sends READY=1 once connected and registered,
/// and pings the watchdog while its runtime and bus loop are healthy.
fn run_part(name: &str, a: PartArgs) -> anyhow::Result<()> {
    let file = load(a.config.as_deref())?;
    let options = run::service_options(&file, a.broker.as_deref(), name, a.instance);
    services_runtime()?.block_on(async {
        let (metrics, _server) = serve_metrics(a.metrics).await?;
        let hooks = Hooks {
            metrics,
            systemd: true,
            ready: None,
        };
        run::run_service(name, &file, options, signal(), hooks).await
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
    metrics.add(edgebus_services::ops::ProcessCollector);
    let server = metrics
        .serve(addr)
        .await
        .with_context(|| format!("metrics: cannot listen on {addr}"))?;
    println!("edgebus metrics on http://{}/metrics", server.local_addr());
    std::io::stdout().flush().ok();
    Ok((Some(metrics), Some(server)))
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

/// Completes on SIGINT or SIGTERM (inside a tokio runtime).
async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `edgebus up`: the broker, then the services `[up]` lists, connected to it over loopback.
/// Under systemd, READY=1 goes out once every part is connected and registered, and the
/// watchdog is pinged while the broker, the services' runtime and every part's bus are healthy.
fn run_up(args: BrokerArgs) -> anyhow::Result<()> {
    let mut file = load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        file.broker.listen = listen;
    }
    let system_topic = Tree::new(&file.bus.prefix).broker();
    let handle = edgebus_broker::Broker::start(file.broker.clone(), Some(system_topic))?;
    let listen = handle.local_addr();
    let mut addr = listen;
    println!("edgebus broker listening on {addr}");
    if let Some(ws) = handle.websocket_addr() {
        println!("edgebus websocket listening on {ws}");
    }
    std::io::stdout().flush().ok();
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let rt = services_runtime()?;
    let result = rt.block_on(async {
        let (metrics, _server) = serve_metrics(args.metrics).await?;
        if let Some(m) = &metrics {
            m.add(BrokerCollector(handle.counters()));
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
        let (failed_tx, mut failed_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut tasks = Vec::new();
        let mut parts = vec!["discovery".to_owned(), "health-monitor".to_owned()];
        if !file.saga.is_empty() {
            parts.push("orchestrator".to_owned());
        }
        parts.extend(file.up.services.clone());
        let count = parts.len();
        for name in parts {
            // One instance of each part per host: a stable id keeps one row per part in
            // the registry and the health view across restarts.
            let instance = edgebus_runtime::env::host_instance(&name);
            let options =
                run::service_options(&file, Some(&addr.to_string()), &name, Some(instance));
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
                if let Err(e) = run::run_service(&name, &file, options, stopped, hooks).await {
                    let _ = failed.send(format!("{name}: {e:#}"));
                }
            }));
        }
        drop(ready_tx);
        drop(failed_tx);
        let signalled = signal();
        tokio::pin!(signalled);
        let mut ready = Vec::new();
        let all_ready = async {
            while ready.len() < count {
                match ready_rx.recv().await {
                    Some(s) => ready.push(s),
                    None => std::future::pending::<()>().await,
                }
            }
        };
        let mut supervisor = None;
        let mut failure = None;
        tokio::select! {
            // A part that cannot start (its contract, its journal) fails the whole bus: under
            // systemd that is a failed start with the reason, not a wait for READY.
            Some(why) = failed_rx.recv() => failure = Some(why),
            _ = all_ready => {
                let prober = handle.prober();
                let counters = handle.counters();
                let services = ready.clone();
                let mut sup = Supervisor::from_env()
                    .probe("broker", Box::new(move |budget| prober.probe(budget)))
                    .probe("runtime", systemd::runtime_probe(tokio::runtime::Handle::current()));
                for s in &ready {
                    sup = sup.probe(s.name().to_owned(), systemd::bus_probe(s.bus()));
                }
                let sup = sup.status(move || {
                    let names: Vec<String> = services
                        .iter()
                        .map(|s| {
                            let t = s.total_stats();
                            let up = if s.bus().is_connected() { "" } else { " RECONNECTING" };
                            format!("{}{up} {}/{}", s.name(), t.requests, t.errors)
                        })
                        .collect();
                    format!(
                        "{}; parts (requests/errors): {}",
                        broker_status(listen, &counters.snapshot()),
                        names.join(", ")
                    )
                });
                tracing::info!(parts = count, "all parts ready");
                supervisor = Some(sup.ready());
                signalled.await;
            }
            _ = &mut signalled => {}
        }
        if failure.is_none() {
            tracing::info!("signal received; shutting down");
        }
        if let Some(s) = supervisor {
            s.stopping("stopping: parts first, then the broker");
        }
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        match failure {
            Some(why) => Err(anyhow!("a part did not start: {why}")),
            None => Ok::<_, anyhow::Error>(()),
        }
    });
    drop(rt);
    handle.shutdown(Duration::from_millis(1500));
    result
}

fn spawn_embedded(max_connections: usize, threads: usize) -> anyhow::Result<(Spawned, SocketAddr)> {
    let exe = std::env::current_exe()?;
    // The defaults, but for as many connections as the memory scenario holds, all from one
    // loopback client (its own user: let in beyond the per-address limit, but each one past it
    // would cost a read of the kernel's socket table).
    let dir = std::env::temp_dir().join(format!("edgebus-bench-{}-{threads}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("topics.toml");
    std::fs::write(
        &conf,
        format!(
            "[broker]\nlisten = \"127.0.0.1:0\"\nmax_connections = {max_connections}\n\
             max_connections_per_address = {max_connections}\nthreads = {threads}\n"
        ),
    )?;
    let mut child = Command::new(exe)
        .arg("broker")
        .arg("-c")
        .arg(&conf)
        .env("EDGEBUS_LOG", "error,rumqttd=off")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting edgebus broker")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let spawned = Spawned(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow!("edgebus broker printed `{}`", line.trim()))?;
    Ok((spawned, addr))
}

fn spawn_mosquitto() -> anyhow::Result<(Spawned, SocketAddr)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = std::env::temp_dir().join(format!("edgebus-bench-mosquitto-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\nmax_connections -1\n"),
    )?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto (apt-get install mosquitto)")?;
    let spawned = Spawned(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if t0.elapsed() > Duration::from_secs(5) {
            bail!("mosquitto did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((spawned, addr))
}

fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let mut targets = Vec::new();
    let mut children = Vec::new();
    // Brokers started here inherit the limit: enough for the largest idle-connection count.
    let most = args.idle_connections * 10;
    bench::raise_fd_limit(most + 1024);
    if args.embedded {
        let (child, addr) = spawn_embedded(most + 64, 1)?;
        targets.push(Target {
            name: "edgebus".into(),
            addr,
            pid: Some(child.0.id()),
        });
        children.push(child);
    }
    // Measured after mosquitto, so that ratios stay edgebus (one thread) ÷ mosquitto.
    let mut threaded = Vec::new();
    for &threads in &args.embedded_threads {
        let (child, addr) = spawn_embedded(most + 64, threads)?;
        threaded.push(Target {
            name: format!("edgebus, {threads} threads"),
            addr,
            pid: Some(child.0.id()),
        });
        children.push(child);
    }
    if args.mosquitto {
        let (child, addr) = spawn_mosquitto()?;
        targets.push(Target {
            name: "mosquitto".into(),
            addr,
            pid: Some(child.0.id()),
        });
        children.push(child);
    }
    targets.extend(threaded);
    for (i, addr) in args.brokers.iter().enumerate() {
        targets.push(Target {
            name: addr.to_string(),
            addr: *addr,
            pid: args.pids.get(i).copied(),
        });
    }
    if targets.is_empty() {
        bail!("nothing to measure: give --embedded, --mosquitto or --broker HOST:PORT");
    }
    let opts = BenchOptions {
        round_trips: args.round_trips,
        messages: args.messages,
        width: args.width,
        connections: args.connections,
        idle_connections: args.idle_connections,
        payload: args.payload,
        topics: args.topics,
        client_ids: args.client_ids,
        detect_trials: args.detect_trials,
        only: args.only,
        ..BenchOptions::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut results = Vec::new();
    for t in &targets {
        eprintln!("measuring {} at {} …", t.name, t.addr);
        results.push(rt.block_on(bench::run_all(t, &opts)));
    }
    bench::print_table(&targets, &results);
    drop(children);
    if let Some(path) = &args.markdown {
        let text = format!(
            "{}\n{}",
            bench::environment(&targets),
            bench::markdown_table(&targets, &results)
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
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
