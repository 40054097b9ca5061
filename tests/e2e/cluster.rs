//! One suite, two targets: the bus with its parts and callers spread over "node A" and
//! "node B". With `EDGEBUS_CLUSTER_NODE` naming the rmqtt node binary (`scripts/cluster test`
//! builds it and sets it), A and B are two nodes of a broadcast cluster on loopback, and
//! every message between them crosses nodes; without it, Debian's mosquitto is both.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgebus_runtime::bus::{Bus, BusOptions};
use edgebus_runtime::request::RequestOptions;

use crate::harness::*;

const T: Duration = Duration::from_secs(10);

/// The two brokers the suite spreads the bus over, and what runs them.
pub struct Nodes {
    pub a: SocketAddr,
    pub b: SocketAddr,
    _nodes: Vec<Proc>,
    _mosquitto: Option<Mosquitto>,
}

impl Nodes {
    /// Two cluster nodes when `EDGEBUS_CLUSTER_NODE` is set, else one mosquitto as both;
    /// returns once a message published on A reaches a subscriber on B.
    pub fn start() -> Nodes {
        let Some(bin) = std::env::var_os("EDGEBUS_CLUSTER_NODE") else {
            let m = Mosquitto::start();
            return Nodes {
                a: m.addr,
                b: m.addr,
                _nodes: Vec::new(),
                _mosquitto: Some(m),
            };
        };
        let p: Vec<u16> = (0..4).map(|_| free_port()).collect();
        let peers = format!("1@127.0.0.1:{} 2@127.0.0.1:{}", p[2], p[3]);
        let node = |id: u16, mqtt: u16, grpc: u16| {
            let mut cmd = std::process::Command::new(&bin);
            cmd.args([
                id.to_string(),
                format!("127.0.0.1:{mqtt}"),
                format!("127.0.0.1:{grpc}"),
                peers.clone(),
            ]);
            let proc = Proc::spawn(cmd);
            proc.expect_line("listening on", T);
            proc
        };
        let nodes = vec![node(1, p[0], p[2]), node(2, p[1], p[3])];
        let n = Nodes {
            a: SocketAddr::from(([127, 0, 0, 1], p[0])),
            b: SocketAddr::from(([127, 0, 0, 1], p[1])),
            _nodes: nodes,
            _mosquitto: None,
        };
        n.wait_joined();
        n
    }

    /// Nodes connect to each other lazily: publish on A until a subscriber on B sees it.
    fn wait_joined(&self) {
        let sub = Sub::start(&self.b.port().to_string(), &["-t", "cluster/joined"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            publish(
                &self.a.port().to_string(),
                &["-t", "cluster/joined", "-m", "x"],
            );
            if sub.next(Duration::from_millis(300)).is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the nodes did not join within 30 s"
            );
        }
    }
}

/// `n` requests to `edge/echo/echo/request` through a bus on `broker`, 32 in flight: how
/// many each instance answered, and how many failed.
fn requests(broker: SocketAddr, n: usize, tag: &str) -> (HashMap<String, usize>, usize) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let bus = Bus::connect(BusOptions::new(broker.to_string(), format!("caller-{tag}")))
            .expect("bus");
        assert!(bus.wait_connected(T).await, "caller on {broker} connected");
        let opts = RequestOptions {
            timeout: Duration::from_secs(10),
            qos: 1,
            ..RequestOptions::default()
        };
        let mut by = HashMap::new();
        let mut failed = 0;
        let mut pending = futures_util::stream::FuturesUnordered::new();
        let mut sent = 0;
        loop {
            while sent < n && pending.len() < 32 {
                let (bus, opts) = (bus.clone(), opts.clone());
                let body = format!(r#"{{"tag":"{tag}","n":{sent}}}"#);
                pending.push(async move {
                    bus.request_raw("edge/echo/echo/request", body.into(), &opts)
                        .await
                });
                sent += 1;
            }
            let Some(r) = futures_util::StreamExt::next(&mut pending).await else {
                break;
            };
            match r {
                Ok(reply) => *by.entry(reply.instance.unwrap_or_default()).or_insert(0) += 1,
                Err(_) => failed += 1,
            }
        }
        bus.close(Duration::from_millis(500)).await;
        (by, failed)
    })
}

/// 1,000 requests from a caller on each node, to two echo instances, one on each node:
/// every request answered, both instances serving, and none handled twice (the instances'
/// own request counts, from their heartbeats, add up to exactly the requests sent).
#[test]
fn requests_from_both_nodes_are_answered_once_by_instances_on_both() {
    let nodes = Nodes::start();
    let on_a = Service::start("echo", nodes.a, &[]);
    let on_b = Service::start("echo", nodes.b, &[]);
    let beats = Sub::start(
        &nodes.a.port().to_string(),
        &["-t", "edge/health/heartbeat/echo/+"],
    );
    // Both instances' shared subscriptions are in place once each has answered one. Every
    // warm-up request is answered too, so the instances' counts start from a known total.
    let warm = Instant::now() + T;
    let mut total = 0;
    loop {
        let (by, failed) = requests(nodes.b, 20, "warm");
        assert_eq!(failed, 0, "warm-up requests failed; answered {by:?}");
        total += 20;
        if by.contains_key(&on_a.instance) && by.contains_key(&on_b.instance) {
            break;
        }
        assert!(
            Instant::now() < warm,
            "both instances never answered: {by:?}"
        );
    }
    for (node, tag) in [(nodes.a, "a"), (nodes.b, "b")] {
        let (by, failed) = requests(node, 1000, tag);
        assert_eq!(
            failed, 0,
            "requests from node {tag} failed; answered {by:?}"
        );
        assert_eq!(by.values().sum::<usize>(), 1000, "{by:?}");
        for i in [&on_a.instance, &on_b.instance] {
            let served = by.get(i).copied().unwrap_or(0);
            assert!(served > 0, "{i} served nothing from {tag}: {by:?}");
        }
        total += 1000;
    }
    handled(&beats, &[&on_a.instance, &on_b.instance], total);
}

/// Waits until the instances' request counts, summed from their latest heartbeats, reach
/// `want`, and checks they are exactly that: a request handled twice would show.
fn handled(beats: &Sub, instances: &[&str], want: u64) {
    let mut last: HashMap<String, u64> = HashMap::new();
    let deadline = Instant::now() + T;
    loop {
        let line = beats.next(T).expect("heartbeats");
        let json = json_of(&line);
        let instance = json["instance"].as_str().unwrap_or_default().to_owned();
        if instances.contains(&instance.as_str()) {
            last.insert(instance, json["stats"]["requests"].as_u64().unwrap_or(0));
        }
        let sum = last.values().sum::<u64>();
        if last.len() == instances.len() && sum >= want {
            assert_eq!(sum, want, "requests handled more than once: {last:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "heartbeats say {last:?}, want {want}"
        );
    }
}
