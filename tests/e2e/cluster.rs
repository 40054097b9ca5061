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
use crate::presence::{retained, Watch};

const T: Duration = Duration::from_secs(10);

/// The two brokers the suite spreads the bus over, and what runs them.
pub struct Nodes {
    pub a: SocketAddr,
    pub b: SocketAddr,
    run: Run,
}

enum Run {
    /// Two rmqtt nodes: the node binary, the peer list, node B's gRPC port, and the nodes.
    Cluster {
        bin: std::ffi::OsString,
        peers: String,
        b_grpc: u16,
        _a: Proc,
        b: Option<Proc>,
    },
    /// One mosquitto as both.
    One(Mosquitto),
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
                run: Run::One(m),
            };
        };
        let p: Vec<u16> = (0..4).map(|_| free_port()).collect();
        let peers = format!("1@127.0.0.1:{} 2@127.0.0.1:{}", p[2], p[3]);
        let a = node(&bin, 1, p[0], p[2], &peers);
        let b = node(&bin, 2, p[1], p[3], &peers);
        let n = Nodes {
            a: SocketAddr::from(([127, 0, 0, 1], p[0])),
            b: SocketAddr::from(([127, 0, 0, 1], p[1])),
            run: Run::Cluster {
                bin,
                peers,
                b_grpc: p[3],
                _a: a,
                b: Some(b),
            },
        };
        n.wait_joined();
        n
    }

    /// Whether A and B are two cluster nodes (else one broker).
    pub fn is_cluster(&self) -> bool {
        matches!(self.run, Run::Cluster { .. })
    }

    /// SIGKILLs node B (on one broker: the broker).
    pub fn kill_b(&mut self) {
        match &mut self.run {
            Run::Cluster { b, .. } => {
                if let Some(mut b) = b.take() {
                    b.signal("KILL");
                    b.wait_exit(T);
                }
            }
            Run::One(m) => m.kill(),
        }
    }

    /// Starts node B again on its ports, and waits until the nodes have joined again.
    pub fn restart_b(&mut self) {
        match &mut self.run {
            Run::Cluster {
                bin,
                peers,
                b_grpc,
                b,
                ..
            } => *b = Some(node(bin, 2, self.b.port(), *b_grpc, peers)),
            Run::One(m) => m.start_again(),
        }
        self.wait_joined();
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

/// Cluster node `id`, listening for MQTT on `mqtt` and for its peers on `grpc`.
fn node(bin: &std::ffi::OsStr, id: u16, mqtt: u16, grpc: u16, peers: &str) -> Proc {
    let mut cmd = std::process::Command::new(bin);
    cmd.args([
        id.to_string(),
        format!("127.0.0.1:{mqtt}"),
        format!("127.0.0.1:{grpc}"),
        peers.to_owned(),
    ]);
    let proc = Proc::spawn(cmd);
    proc.expect_line("listening on", T);
    proc
}

/// `n` requests to `edge/echo/echo/request` through a bus on `broker`, 32 in flight: how
/// many each instance answered, and how many failed.
fn requests(broker: SocketAddr, n: usize, tag: &str) -> (HashMap<String, usize>, usize) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let bus = caller(broker, tag).await;
        let counts = send(&bus, n, tag, T).await;
        bus.close(Duration::from_millis(500)).await;
        counts
    })
}

/// A runtime caller on `broker`, connected.
async fn caller(broker: SocketAddr, tag: &str) -> Bus {
    let bus =
        Bus::connect(BusOptions::new(broker.to_string(), format!("caller-{tag}"))).expect("bus");
    assert!(bus.wait_connected(T).await, "caller on {broker} connected");
    bus
}

/// `n` requests to `edge/echo/echo/request` through `bus`, 32 in flight, each given
/// `timeout`: how many each instance answered, and how many failed.
async fn send(
    bus: &Bus,
    n: usize,
    tag: &str,
    timeout: Duration,
) -> (HashMap<String, usize>, usize) {
    let opts = RequestOptions {
        timeout,
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
    (by, failed)
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
    let mut total = serving(nodes.b, &[&on_a.instance, &on_b.instance]);
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

/// Sends batches of 20 requests from `from` until every one of `instances` has answered
/// one (their shared subscriptions are then in place cluster-wide); every request must be
/// answered. Returns how many were sent.
fn serving(from: SocketAddr, instances: &[&str]) -> u64 {
    let deadline = Instant::now() + T;
    let mut total = 0;
    loop {
        let (by, failed) = requests(from, 20, "warm");
        assert_eq!(failed, 0, "warm-up requests failed; answered {by:?}");
        total += 20;
        if instances.iter().all(|i| by.contains_key(*i)) {
            return total;
        }
        assert!(
            Instant::now() < deadline,
            "{instances:?} never all answered: {by:?}"
        );
    }
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

/// The shipped topics.toml, with its saga journal in `dir`: the parts run with the
/// configuration a user starts from, the `order` saga included.
fn shipped(dir: &TempDir) -> std::path::PathBuf {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../topics.toml"))
        .expect("shipped topics.toml");
    let journal = dir.0.join("sagas.journal");
    let text = text.replace(
        "journal = \"sagas.journal\"",
        &format!("journal = \"{}\"", journal.display()),
    );
    assert!(
        text.contains(&journal.display().to_string()),
        "journal line"
    );
    dir.file("topics.toml", &text)
}

/// `edgebus call TARGET BODY --broker BROKER`.
fn call(broker: SocketAddr, target: &str, body: &str) -> Output {
    run_edgebus(
        &["call", target, body, "--broker", &broker.to_string()],
        None,
        T,
    )
}

/// The only instance of echo is on node B; every kind of caller on node A is answered by it,
/// so every request crosses from A to B and every reply from B to A: `mosquitto_rr` (MQTT 5
/// response topic and correlation data), `edgebus call`, an MQTT 3.1.1 client with
/// `reply_to` in the JSON, a request with no reply address (the reply on `…/result`), and
/// 500 requests from the runtime, 32 in flight.
#[test]
fn replies_cross_nodes_to_every_kind_of_caller() {
    let nodes = Nodes::start();
    let pa = nodes.a.port().to_string();
    let on_b = Service::start("echo", nodes.b, &["--instance", "echo-b"]);
    serving(nodes.a, &[&on_b.instance]);

    let (ok, out) = rr(
        &pa,
        &[
            "-t",
            "edge/echo/echo/request",
            "-e",
            "test/cross/rr",
            "-m",
            r#"{"from":"rr"}"#,
            "-W",
            "5",
        ],
    );
    assert!(ok, "{out}");
    let reply = json_of(out.lines().find(|l| l.starts_with('{')).expect("a reply"));
    assert_eq!(reply["data"]["from"], "rr", "{reply}");
    assert_eq!(reply["instance"], "echo-b", "{reply}");

    let out = call(nodes.a, "echo/echo", r#"{"from":"call"}"#);
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(r#""from":"call""#) && out.stdout.contains("echo-b"),
        "{}",
        out.stdout
    );

    // MQTT 3.1.1 (mosquitto_pub's default), `reply_to` in the JSON; then no reply address.
    let reply = published(
        &pa,
        "test/cross/311",
        r#"{"reply_to":"test/cross/311","from":"v311"}"#,
    );
    assert_eq!(reply["data"]["from"], "v311", "{reply}");
    assert_eq!(reply["instance"], "echo-b", "{reply}");
    let reply = published(&pa, "edge/echo/echo/result", r#"{"from":"nowhere"}"#);
    assert_eq!(reply["data"]["from"], "nowhere", "{reply}");

    let (by, failed) = requests(nodes.a, 500, "cross");
    assert_eq!(failed, 0, "answered {by:?}");
    assert_eq!(by.get("echo-b"), Some(&500), "{by:?}");
}

/// Publishes `body` to `edge/echo/echo/request` on `port` (QoS 1, MQTT 3.1.1) and returns the
/// reply that arrives on `reply_topic`.
fn published(port: &str, reply_topic: &str, body: &str) -> serde_json::Value {
    let sub = Sub::start(port, &["-t", reply_topic, "-q", "1"]);
    let (ok, out) = publish(
        port,
        &["-t", "edge/echo/echo/request", "-q", "1", "-m", body],
    );
    assert!(ok, "{out}");
    json_of(
        &sub.next(T)
            .unwrap_or_else(|| panic!("no reply on {reply_topic}")),
    )
}

/// With echo and hostmetrics on node B, a client on node A: a malformed request gets its
/// `BAD_REQUEST` on `…/error` and its dead letter, a request past its deadline gets `TIMEOUT`
/// without running, and hostmetrics' retained event stream is the same on both nodes.
#[test]
fn errors_dead_letters_deadlines_and_events_cross_nodes() {
    let nodes = Nodes::start();
    let pa = nodes.a.port().to_string();
    let on_b = Service::start("echo", nodes.b, &["--instance", "echo-b"]);
    let _metrics = Service::start("hostmetrics", nodes.b, &[]);
    serving(nodes.a, &[&on_b.instance]);
    let dead = Sub::start(&pa, &["-t", "edge/system/deadletter/echo", "-q", "1"]);

    let reply = published(&pa, "edge/echo/echo/error", "{not json");
    assert_eq!(reply["error"]["code"], "BAD_REQUEST", "{reply}");
    let letter = json_of(&dead.next(T).expect("a dead letter on A"));
    assert_eq!(letter["payload"], "{not json", "{letter}");

    let reply = published(&pa, "edge/echo/echo/error", r#"{"deadline_ms":1000}"#);
    assert_eq!(reply["error"]["code"], "TIMEOUT", "{reply}");

    let reading = same_on_both(&nodes, "edge/hostmetrics/events/reading");
    assert_eq!(reading["type"], "hostmetrics.reading", "{reading}");
    let out = call(nodes.a, "hostmetrics/read", "{}");
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
}

/// Waits (bounded) until `topic`'s retained message is the same on both nodes, and there.
fn same_on_both(nodes: &Nodes, topic: &str) -> serde_json::Value {
    let deadline = Instant::now() + T;
    loop {
        let a = retained(&nodes.a.port().to_string(), topic);
        let b = retained(&nodes.b.port().to_string(), topic);
        if let (Some(a), Some(b)) = (&a, &b) {
            if a == b {
                return a.clone();
            }
        }
        assert!(Instant::now() < deadline, "{topic}: on A {a:?}, on B {b:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Discovery and the health monitor on node A, an instance of echo on each node, watchers on
/// both nodes: both see the same updates and alerts, and the same retained registrations and
/// health status; the views answer from either node. The instance on B SIGKILLed: offline on
/// A within the bound that holds on one broker (1 s); one SIGSTOPped: unhealthy within
/// 3.5 s, healthy again after SIGCONT. With no instance left, a caller on B gets
/// NO_RESPONDERS from discovery on A at once.
#[test]
fn discovery_and_health_on_node_a_see_instances_on_both_nodes() {
    let nodes = Nodes::start();
    let dir = TempDir::new("cluster-parts");
    let cfg = shipped(&dir);
    let (pa, pb) = (nodes.a.port().to_string(), nodes.b.port().to_string());
    let _discovery = part(&["discovery"], &cfg, nodes.a);
    let _monitor = part(&["health", "monitor"], &cfg, nodes.a);
    let (wa, wb) = (Watch::service(&pa, "echo"), Watch::service(&pb, "echo"));
    let on_a = Service::start("echo", nodes.a, &["--instance", "echo-a"]);
    let on_b = Service::start("echo", nodes.b, &["--instance", "echo-b"]);
    let up = [
        "echo-a update registered",
        "echo-a alert offline→healthy",
        "echo-b update registered",
        "echo-b alert offline→healthy",
    ];
    wa.expect(&up);
    wb.expect(&up);

    for instance in ["echo-a", "echo-b"] {
        let rec = same_on_both(&nodes, &format!("edge/system/discovery/echo/{instance}"));
        assert_eq!(rec["state"], "online", "{rec}");
    }
    let status = same_on_both(&nodes, "edge/health/status/echo");
    assert_eq!(status["status"], "healthy", "{status}");
    same_on_both(&nodes, "edge/health/summary");

    // The views, from node B: the registry and the health monitor answer from A.
    let (up, list) = listed_online(nodes.b, "echo");
    assert_eq!(up, ["echo-a", "echo-b"], "{list}");
    let b = nodes.b.to_string();
    let out = run_edgebus(&["health", "--json", "--broker", &b], None, T);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("echo-b"), "{}", out.stdout);

    // SIGKILL on B: its Last Will, published by node B, reaches discovery on A.
    let t0 = Instant::now();
    on_b._proc.signal("KILL");
    let offline = ["echo-b update offline", "echo-b alert healthy→offline"];
    let seen = wa.expect(&offline) - t0;
    eprintln!("SIGKILL on B → offline seen on A after {seen:?}");
    assert!(seen < Duration::from_secs(1), "{seen:?}");
    wb.expect(&offline);
    let rec = same_on_both(&nodes, "edge/system/discovery/echo/echo-b");
    assert_eq!(rec["state"], "offline", "{rec}");

    // SIGSTOP on B: its heartbeats stop crossing; unhealthy, then healthy after SIGCONT.
    let beats = Sub::start(&pa, &["-t", "edge/health/heartbeat/echo/echo-s"]);
    let stopped = Service::start("echo", nodes.b, &["--instance", "echo-s"]);
    wa.expect(&["echo-s update registered", "echo-s alert offline→healthy"]);
    // Past its first beats, as seen on A.
    for _ in 0..2 {
        beats.next(T).expect("a heartbeat from echo-s on A");
    }
    let t0 = Instant::now();
    stopped._proc.signal("STOP");
    let seen = wa.expect(&["echo-s alert healthy→unhealthy"]) - t0;
    eprintln!("SIGSTOP on B → unhealthy seen on A after {seen:?}");
    assert!(seen <= Duration::from_millis(3500), "{seen:?}");
    stopped._proc.signal("CONT");
    wa.expect(&["echo-s alert unhealthy→healthy"]);

    // No instance left: a caller on B is told at once, by discovery on A.
    on_a._proc.signal("KILL");
    stopped._proc.signal("KILL");
    wa.expect(&[
        "echo-a update offline",
        "echo-a alert healthy→offline",
        "echo-s update offline",
        "echo-s alert healthy→offline",
    ]);
    let t0 = Instant::now();
    let (ok, out) = rr(
        &pb,
        &[
            "-t",
            "edge/echo/echo/request",
            "-e",
            "test/cross/nr",
            "-m",
            "{}",
            "-W",
            "5",
        ],
    );
    assert!(ok && out.contains("NO_RESPONDERS"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

/// The shipped `order` saga with the orchestrator on node A and kv on node B, started by
/// callers on B: a run that completes, and one whose second step fails (the payment key is
/// taken) and is compensated: the stock reserved on B is released again.
#[test]
fn the_order_saga_runs_and_compensates_across_nodes() {
    use crate::saga::{kv_put, start_saga, states};
    let nodes = Nodes::start();
    let dir = TempDir::new("cluster-saga");
    let cfg = shipped(&dir);
    let (pa, pb) = (nodes.a.port().to_string(), nodes.b.port().to_string());
    let _orchestrator = part(&["orchestrator"], &cfg, nodes.a);
    let kv = Service::start("kv", nodes.b, &[]);
    kv_serves(nodes.a, &kv.instance);

    let run = start_saga(
        &pb,
        "order",
        r#"{"order":"c1","qty":2,"amount":10,"address":"pier 4"}"#,
    );
    assert_eq!(run["success"], true, "{run}");
    assert_eq!(run["data"]["status"], "completed", "{run}");
    assert_eq!(
        states(&run["data"]),
        ["completed", "completed", "completed"],
        "{run}"
    );

    kv_put(&pa, "payment/c2");
    let run = start_saga(
        &pb,
        "order",
        r#"{"order":"c2","qty":1,"amount":10,"address":"pier 4"}"#,
    );
    assert_eq!(run["success"], false, "{run}");
    assert_eq!(run["error"]["code"], "CONFLICT", "{run}");
    let message = run["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("undone: reserve"), "{run}");

    // Released on B, as seen from a caller on A; the completed run's stock is still held.
    let out = call(nodes.a, "kv/get", r#"{"key":"stock/c2"}"#);
    assert!(
        !out.ok && out.stdout.contains("NOT_FOUND"),
        "{}",
        out.stdout
    );
    let out = call(nodes.a, "kv/get", r#"{"key":"stock/c1"}"#);
    assert!(out.ok, "{} {}", out.stdout, out.stderr);
}

/// Waits (bounded) until kv instance `instance` answers a caller on `from`.
fn kv_serves(from: SocketAddr, instance: &str) {
    let deadline = Instant::now() + T;
    loop {
        let out = call(from, "kv/stats", "{}");
        if out.ok && out.stdout.contains(instance) {
            return;
        }
        assert!(Instant::now() < deadline, "{} {}", out.stdout, out.stderr);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Discovery and the monitor on A, an instance of echo on each node. Node B SIGKILLed:
/// callers on A keep being served, by the instance on A, and the instance on B is judged
/// unhealthy (no Last Will: its node is gone). Node B started again: the instance on B
/// reconnects, is online and healthy on A again, and serves again. On one broker there is no node to
/// lose: the broker itself is SIGKILLed and restarted, and both instances come back.
#[test]
fn node_b_lost_and_back() {
    let mut nodes = Nodes::start();
    let dir = TempDir::new("cluster-loss");
    let cfg = shipped(&dir);
    let _discovery = part(&["discovery"], &cfg, nodes.a);
    let _monitor = part(&["health", "monitor"], &cfg, nodes.a);
    let watch = Watch::start(&nodes.a.port().to_string(), "echo-b");
    let on_a = Service::start("echo", nodes.a, &["--instance", "echo-a"]);
    let on_b = Service::start("echo", nodes.b, &["--instance", "echo-b"]);
    let both = [on_a.instance.as_str(), on_b.instance.as_str()];
    serving(nodes.a, &both);
    watch.expect(&["update registered", "alert offline→healthy"]);

    // A caller connected on A before node B goes.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let on_a_caller = rt.block_on(caller(nodes.a, "before"));
    let killed = Instant::now();
    nodes.kill_b();
    if nodes.is_cluster() {
        // A new caller on A, connecting as node B dies: its CONNECT waits for the nodes'
        // answers to its session takeover, which rmqtt bounds at 15 s; it is then served.
        let port = nodes.a.port().to_string();
        let newcomer = std::thread::spawn(move || {
            run_command(
                std::process::Command::new("mosquitto_rr"),
                &[
                    "-p",
                    &port,
                    "-t",
                    "edge/echo/echo/request",
                    "-e",
                    "test/loss/rr",
                    "-m",
                    "{}",
                    "-W",
                    "25",
                ],
                None,
                Duration::from_secs(30),
            )
        });
        // The caller connected before: the first requests wait (about 7 s here) until node
        // A stops calling node B (its circuit breaker for B opens); every one is answered by
        // the instance on A, none lost.
        for round in 0..5 {
            let t0 = Instant::now();
            let (by, failed) =
                rt.block_on(send(&on_a_caller, 100, "alone", Duration::from_secs(30)));
            eprintln!(
                "node B down: 100 requests from A, round {round}, in {:?}: {by:?}",
                t0.elapsed()
            );
            assert_eq!(failed, 0, "answered {by:?}");
            assert_eq!(by.get("echo-a"), Some(&100), "{by:?}");
        }
        // No Last Will: the node that held it is gone. The monitor on A judges the instance
        // on B by its heartbeats, once node A is past its wait.
        let (seen, at) = watch.next(Duration::from_secs(15)).expect("an alert");
        eprintln!("node B down: {seen} on A after {:?}", at - killed);
        assert_eq!(seen, "alert healthy→unhealthy");
        let rec = retained(
            &nodes.a.port().to_string(),
            "edge/system/discovery/echo/echo-b",
        );
        assert_eq!(rec.expect("echo-b's record")["state"], "online");
        let out = newcomer.join().expect("mosquitto_rr");
        eprintln!(
            "node B down: a new mosquitto_rr on A answered after {:?}",
            out.took
        );
        assert!(
            out.ok && out.stdout.contains("echo-a"),
            "{} {}",
            out.stdout,
            out.stderr
        );
    }
    rt.block_on(on_a_caller.close(Duration::from_millis(200)));

    let t0 = Instant::now();
    nodes.restart_b();
    eprintln!("node B restarted and joined after {:?}", t0.elapsed());
    online(nodes.a, &both);
    serving(nodes.a, &both);
    if nodes.is_cluster() {
        watch.expect(&["alert unhealthy→healthy"]);
    }
    eprintln!(
        "node B back: both instances online and serving after {:?}",
        t0.elapsed()
    );
}

/// Waits (bounded, 30 s) until `edgebus services` on `broker` lists `instances` online.
fn online(broker: SocketAddr, instances: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (up, list) = listed_online(broker, "echo");
        if instances.iter().all(|i| up.iter().any(|u| u == i)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{instances:?} not all online: {list}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The instances of `service` that `edgebus services --json` on `broker` lists online,
/// sorted, and the whole listing (or the command's error) for a failure message.
fn listed_online(broker: SocketAddr, service: &str) -> (Vec<String>, String) {
    let out = run_edgebus(
        &["services", "--json", "--broker", &broker.to_string()],
        None,
        T,
    );
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    let mut up: Vec<String> = list["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["service"] == service && i["state"] == "online")
        .filter_map(|i| i["instance"].as_str().map(str::to_owned))
        .collect();
    up.sort();
    (up, format!("{}{}", out.stdout, out.stderr))
}

/// What each command of the README's `sh cluster` recipe must print (background commands,
/// ending in `&`, must say they are ready). Every command of the recipe must be here, and
/// everything here in the recipe.
const RECIPE: &[(&str, &[&str])] = &[
    ("edgebus discovery --broker \"$NODE_A\" &", &["ready as"]),
    ("edgebus health monitor --broker \"$NODE_A\" &", &["ready as"]),
    ("edgebus orchestrator --broker \"$NODE_A\" &", &["ready as"]),
    ("edgebus service echo --broker \"$NODE_A\" &", &["ready as"]),
    ("edgebus service echo --broker \"$NODE_B\" &", &["ready as"]),
    ("edgebus service kv --broker \"$NODE_B\" &", &["ready as"]),
    (
        "mosquitto_rr -h \"${NODE_A%:*}\" -p \"${NODE_A##*:}\" -t edge/echo/echo/request -e my/replies -m '{\"hello\":\"cluster\"}'",
        &[r#""success":true"#, r#""hello":"cluster""#],
    ),
    (
        "edgebus call saga/order '{\"order\":\"42\",\"qty\":1,\"amount\":10,\"address\":\"pier 4\"}' --broker \"$NODE_B\"",
        &[r#""status":"completed""#],
    ),
    ("edgebus services --broker \"$NODE_B\"", &["echo", "kv", "online"]),
];

/// The README's recipe for a cluster (its `sh cluster` block), run as written with
/// `NODE_A` and `NODE_B` set to the two nodes, from a scratch directory (the orchestrator's
/// journal lands there).
#[test]
fn the_readme_cluster_recipe_runs_as_written() {
    let nodes = Nodes::start();
    let dir = TempDir::new("cluster-recipe");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let recipe = crate::readme::blocks(&readme, "sh cluster");
    assert_eq!(recipe.len(), 1, "one `sh cluster` block in the README");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_edgebus"))
        .parent()
        .expect("bin dir")
        .to_owned();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let shell = |line: &str| {
        let mut c = std::process::Command::new("bash");
        c.args(["-c", &format!("exec stdbuf -oL {line}")])
            .current_dir(&dir.0)
            .env_remove("EDGEBUS_CONFIG")
            .env("PATH", &path)
            .env("EDGEBUS_LOG", "info")
            .env("NODE_A", nodes.a.to_string())
            .env("NODE_B", nodes.b.to_string());
        c
    };
    let mut background = Vec::new();
    let mut used = Vec::new();
    for line in recipe[0].lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (_, want) = RECIPE
            .iter()
            .find(|(l, _)| *l == line)
            .unwrap_or_else(|| panic!("README cluster recipe without a check: `{line}`"));
        used.push(line);
        if let Some(cmd) = line.strip_suffix('&') {
            let p = Proc::spawn(shell(cmd.trim()));
            p.expect_line(want[0], T);
            background.push(p);
            continue;
        }
        let mut p = Proc::spawn(shell(line));
        let status = p.wait_exit(Duration::from_secs(15));
        let mut out = String::new();
        while let Ok(l) = p.lines.recv_timeout(Duration::from_millis(100)) {
            out.push_str(&l);
            out.push('\n');
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "`{line}` ({status:?}):\n{out}"
        );
        for w in *want {
            assert!(out.contains(w), "`{line}`: no {w:?} in:\n{out}");
        }
    }
    let unused: Vec<_> = RECIPE
        .iter()
        .filter(|(l, _)| !used.contains(l))
        .map(|(l, _)| l)
        .collect();
    assert!(
        unused.is_empty(),
        "checks for commands not in the README: {unused:?}"
    );
}
