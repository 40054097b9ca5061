//! One node of a two-node rmqtt cluster on loopback, for the cluster proof.
//!
//! `edgebus-cluster-node ID MQTT_ADDR GRPC_ADDR "1@host:port 2@host:port"`: MQTT 3.1.1 and 5
//! on `MQTT_ADDR`, the inter-node gRPC server on `GRPC_ADDR`, and the broadcast cluster with
//! every node's gRPC address. Prints `cluster node ID listening on MQTT_ADDR` once it accepts.
//! `edgebus-cluster-node free-ports N` prints N free loopback ports.

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::time::Duration;

use rmqtt::context::{CircuitBreakerConfig, ServerContext};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;

#[tokio::main]
async fn main() -> rmqtt::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<String> = std::env::args().collect();
    // `free-ports N`: N loopback ports free now, for a script to hand out.
    if args.len() == 3 && args[1] == "free-ports" {
        let n: usize = args[2].parse()?;
        let held: Vec<std::net::TcpListener> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        for l in &held {
            println!("{}", l.local_addr()?.port());
        }
        return Ok(());
    }
    if args.len() != 5 {
        eprintln!("usage: edgebus-cluster-node ID MQTT_ADDR GRPC_ADDR \"1@host:port 2@host:port\"");
        std::process::exit(2);
    }
    let node_id: u64 = args[1].parse()?;
    let mqtt: SocketAddr = args[2].parse()?;
    let grpc: SocketAddr = args[3].parse()?;
    let peers = args[4]
        .split_whitespace()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    // A dead peer costs an acknowledgement at most this long (the default is 60 s).
    let cluster = format!("node_grpc_addrs = [{peers}]\nnode_grpc_client_timeout = \"1s\"\n");
    let scx = ServerContext::new()
        .node_id(node_id)
        // On a 2-core CI host under load rmqtt would refuse CONNECTs as "overloaded".
        .busy_check_enable(false)
        // After a peer's failures its calls are skipped for this long, so a restarted peer
        // is reached again only then (the default is 30 s).
        .circuit_breaker_config(CircuitBreakerConfig {
            wait_duration_in_open: Duration::from_secs(3),
            ..CircuitBreakerConfig::default()
        })
        .plugins_config_map_add("rmqtt-cluster-broadcast", &cluster)
        .plugins_config_map_add("rmqtt-retainer", "storage.type = \"ram\"\n")
        // `round_robin` gave one member of a two-member group every message in a trial.
        .plugins_config_map_add("rmqtt-shared-subscription", "strategy = \"random\"\n")
        .build()
        .await;
    scx.node.start_grpc_server(scx.clone(), grpc, true, false);
    rmqtt_retainer::register(&scx, true, false).await?;
    rmqtt_shared_subscription::register(&scx, true, false).await?;
    rmqtt_cluster_broadcast::register(&scx, true, true).await?;
    let listener = Builder::new()
        .name("external/tcp")
        .laddr(mqtt)
        .allow_anonymous(true)
        .max_inflight(NonZeroU16::new(1024).expect("non-zero"))
        .max_mqueue_len(100_000)
        .mqueue_rate_limit(
            NonZeroU32::new(u32::MAX).expect("non-zero"),
            Duration::from_secs(1),
        )
        .max_handshaking_limit(10_000)
        .nodelay(true)
        // Restarted on the same port at once, past the last run's TIME_WAIT connections.
        .reuseaddr(Some(true))
        .bind()?
        .tcp()?;
    println!("cluster node {node_id} listening on {mqtt}");
    MqttServer::new(scx)
        .listener(listener)
        .build()
        .run()
        .await?;
    Ok(())
}
