//! `edgebus bench`: the brokers to measure (started here or given), the scenarios, the table.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::bench::{self, host, BenchOptions, Target};

/// `edgebus bench`'s arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A broker to measure, as host:port (repeatable).
    #[arg(long = "broker")]
    brokers: Vec<SocketAddr>,
    /// Two nodes of one cluster, as A,B: measures the round trip and the runtime scenarios
    /// with everything on A ("one node"), then with the senders on A and the responders and
    /// `echo` instances on B ("across nodes").
    #[arg(long, value_delimiter = ',', num_args = 1, value_name = "A,B")]
    cluster: Vec<SocketAddr>,
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
    /// tls, memory, detect, saga, persist.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(bench::GROUPS))]
    only: Vec<String>,
}

/// Runs `edgebus bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut targets = Vec::new();
    let mut children = Vec::new();
    // Brokers started here inherit the limit: enough for the largest idle-connection count.
    let most = args.idle_connections * 10;
    host::raise_fd_limit(most + 1024);
    if args.embedded {
        let (child, addr, tls) = host::spawn_embedded(most + 64, 1)?;
        targets.push(Target {
            name: "edgebus".into(),
            addr,
            far: addr,
            tls: Some(tls),
            pid: Some(child.0.id()),
        });
        children.push(child);
    }
    // Measured after mosquitto, so that ratios stay edgebus (one thread) ÷ mosquitto.
    let mut threaded = Vec::new();
    for &threads in &args.embedded_threads {
        let (child, addr, tls) = host::spawn_embedded(most + 64, threads)?;
        threaded.push(Target {
            name: format!("edgebus, {threads} threads"),
            addr,
            far: addr,
            tls: Some(tls),
            pid: Some(child.0.id()),
        });
        children.push(child);
    }
    if args.mosquitto {
        let (child, addr, tls) = host::spawn_mosquitto()?;
        targets.push(Target {
            name: "mosquitto".into(),
            addr,
            far: addr,
            tls: Some(tls),
            pid: Some(child.0.id()),
        });
        children.push(child);
    }
    targets.extend(threaded);
    for (i, addr) in args.brokers.iter().enumerate() {
        targets.push(Target {
            name: addr.to_string(),
            addr: *addr,
            far: *addr,
            tls: None,
            pid: args.pids.get(i).copied(),
        });
    }
    match args.cluster[..] {
        [] => {}
        [a, b] => {
            for (name, far) in [("cluster, one node", a), ("cluster, across nodes", b)] {
                targets.push(Target {
                    name: name.into(),
                    addr: a,
                    far,
                    tls: None,
                    pid: None,
                });
            }
        }
        _ => bail!("--cluster takes two nodes' addresses, A,B"),
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
    let table = bench::markdown_table(&targets, &results);
    print!("{table}");
    drop(children);
    if let Some(path) = &args.markdown {
        let text = format!("{}\n{table}", host::environment(&targets));
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
