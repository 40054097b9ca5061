//! Discovery and health beyond one instance: a health check that turns degraded, two
//! instances with one killed, discovery and the monitor themselves killed and restarted, and
//! the broker restarted. Each asserts the exact updates and alerts seen on `edge/#` and the
//! retained state a late subscriber sees.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgebus_runtime::bus::{Bus, BusOptions};
use edgebus_runtime::presence::Check;
use edgebus_runtime::service::ServiceBuilder;

use crate::harness::*;
use crate::presence::{retained, up, Watch};

const T: Duration = Duration::from_secs(10);

/// `edgebus discovery` or `edgebus health monitor` (ARGS) against `broker`, ready.
/// A request with `reply_to` (MQTT 3.1.1 style), and every reply that arrives within `quiet`
/// of the last: a request must be answered exactly once.
fn replies(port: &str, topic: &str, body: &str) -> Vec<serde_json::Value> {
    let reply_to = format!("test/replies/{}", free_port());
    let sub = Sub::start(port, &["-t", &reply_to, "-q", "1"]);
    let body = body.replacen('{', &format!("{{\"reply_to\":\"{reply_to}\","), 1);
    let (ok, out) = publish(port, &["-t", topic, "-q", "1", "-m", &body]);
    assert!(ok, "{out}");
    let mut got = Vec::new();
    if let Some(first) = sub.next(T) {
        got.push(json_of(&first));
        got.extend(
            sub.drain(Duration::from_millis(700))
                .iter()
                .map(|l| json_of(l)),
        );
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_turns_degraded_and_flaps_are_damped() {
    let dir = TempDir::new("health-degraded");
    let (_up, addr) = up(&dir, "");
    let port = addr.port().to_string();
    let w = Watch::start(&port, "probe-1");

    // 0 ok, 1 degraded, 2 failed: what the service's own check says.
    let level = Arc::new(AtomicU8::new(0));
    let l = level.clone();
    let mut o = BusOptions::for_service(addr.to_string(), "edge", "probe", Some("probe-1".into()));
    o.backoff_max = Duration::from_millis(500);
    let bus = Bus::connect(o).expect("bus");
    let service = ServiceBuilder::new("probe")
        .health_check("disk", move || {
            let l = l.clone();
            async move {
                match l.load(Ordering::Relaxed) {
                    0 => Check::Ok,
                    1 => Check::Degraded("disk 91% full".into()),
                    _ => Check::Failed("disk read-only".into()),
                }
            }
        })
        .start(&bus)
        .await
        .expect("start");
    let w = tokio::task::spawn_blocking(move || {
        w.expect(&["update registered", "alert offline→healthy"]);
        w
    })
    .await
    .expect("watch");

    // Degraded for two beats (confirm_beats = 2): one alert, and the status says why.
    level.store(1, Ordering::Relaxed);
    let w = tokio::task::spawn_blocking(move || {
        w.expect(&["alert healthy→degraded"]);
        w
    })
    .await
    .expect("watch");
    let p = port.clone();
    let status = tokio::task::spawn_blocking(move || retained(&p, "edge/health/status/probe"))
        .await
        .expect("status")
        .expect("status retained");
    assert_eq!(status["status"], "degraded", "{status}");

    // One degraded beat between healthy ones is a flap: no alert either way.
    level.store(0, Ordering::Relaxed);
    let w = tokio::task::spawn_blocking(move || {
        w.expect(&["alert degraded→healthy"]);
        w
    })
    .await
    .expect("watch");
    let mut beats = bus
        .subscribe("edge/health/heartbeat/probe/probe-1", 0)
        .await
        .expect("beats");
    level.store(1, Ordering::Relaxed);
    loop {
        let b = tokio::time::timeout(T, beats.recv())
            .await
            .expect("heartbeat")
            .expect("open");
        let v: serde_json::Value = serde_json::from_slice(&b.payload).expect("JSON");
        if v["status"] == "degraded" {
            break;
        }
    }
    level.store(0, Ordering::Relaxed);
    let w = tokio::task::spawn_blocking(move || {
        w.expect_quiet(Duration::from_millis(2500));
        w
    })
    .await
    .expect("watch");

    // A failed check: unhealthy, and the summary (retained) agrees.
    level.store(2, Ordering::Relaxed);
    let w = tokio::task::spawn_blocking(move || {
        w.expect(&["alert healthy→unhealthy"]);
        w
    })
    .await
    .expect("watch");
    let p = port.clone();
    let (status, summary) = tokio::task::spawn_blocking(move || {
        (
            retained(&p, "edge/health/status/probe"),
            retained(&p, "edge/health/summary"),
        )
    })
    .await
    .expect("late subscriber");
    let status = status.expect("status");
    let summary = summary.expect("summary");
    assert_eq!(status["status"], "unhealthy", "{status}");
    assert_eq!(summary["services"]["probe"], "unhealthy", "{summary}");
    assert_eq!(summary["status"], "unhealthy", "{summary}");

    service.stop(Duration::from_secs(1)).await;
    bus.close(Duration::from_secs(1)).await;
    tokio::task::spawn_blocking(move || {
        w.expect(&["update deregistered", "alert unhealthy→offline"])
    })
    .await
    .expect("watch");
}

#[test]
fn two_instances_one_killed_the_service_stays_healthy() {
    let dir = TempDir::new("health-two");
    let (_up, addr) = up(&dir, "");
    let port = addr.port().to_string();
    let w = Watch::service(&port, "echo");
    let a = Service::start("echo", addr, &["--instance", "echo-a"]);
    w.expect(&["echo-a update registered", "echo-a alert offline→healthy"]);
    let _b = Service::start("echo", addr, &["--instance", "echo-b"]);
    w.expect(&["echo-b update registered", "echo-b alert offline→healthy"]);

    // Discovery's list is answered once, though its filter overlaps discovery's own.
    let list = replies(
        &port,
        "edge/system/discovery/list/request",
        r#"{"service":"echo"}"#,
    );
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["data"]["count"], 2, "{list:?}");

    a._proc.signal("KILL");
    w.expect(&["echo-a update offline", "echo-a alert healthy→offline"]);
    w.expect_quiet(Duration::from_millis(1500));

    // The service is as healthy as its best instance; the survivor answers, once.
    let status = retained(&port, "edge/health/status/echo").expect("status");
    assert_eq!(status["status"], "healthy", "{status}");
    let states: Vec<(String, String)> = status["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| {
            (
                i["instance"].as_str().unwrap_or("").to_owned(),
                i["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("echo-a".to_owned(), "offline".to_owned()),
            ("echo-b".to_owned(), "healthy".to_owned())
        ]
    );
    let got = replies(&port, "edge/echo/echo/request", r#"{"n":1}"#);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["instance"], "echo-b", "{got:?}");
    let rec = retained(&port, "edge/system/discovery/echo/echo-a").expect("record");
    assert_eq!(rec["state"], "offline", "{rec}");
}

#[test]
fn discovery_and_monitor_restarted_rebuild_from_retained_state() {
    let dir = TempDir::new("health-restart");
    let cfg = dir.file(
        "topics.toml",
        "[broker]\nstats_interval = \"0s\"\n[discovery]\nexpire_after = \"3s\"\n",
    );
    let broker = Broker::start_with("");
    let port = broker.port();
    let w = Watch::service(&port, "echo");
    let disc = part(&["discovery"], &cfg, broker.addr);
    let mon = part(&["health", "monitor"], &cfg, broker.addr);
    let keep = Service::start("echo", broker.addr, &["--instance", "echo-keep"]);
    w.expect(&[
        "echo-keep update registered",
        "echo-keep alert offline→healthy",
    ]);

    // Both killed and started again with the service unchanged: nothing to say.
    drop(disc);
    drop(mon);
    let disc = part(&["discovery"], &cfg, broker.addr);
    let mon = part(&["health", "monitor"], &cfg, broker.addr);
    w.expect_quiet(Duration::from_millis(2500));
    let list = replies(
        &port,
        "edge/system/discovery/list/request",
        r#"{"service":"echo"}"#,
    );
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["data"]["count"], 1, "{list:?}");

    // The service dies while both are away. The monitor, back, compares with what it last
    // said (healthy) and alerts once; discovery loads the offline record quietly, and
    // deletes it after expire_after.
    drop(disc);
    drop(mon);
    keep._proc.signal("KILL");
    let rec = (0..50)
        .find_map(|_| {
            retained(&port, "edge/system/discovery/echo/echo-keep")
                .filter(|r| r["state"] == "offline")
        })
        .expect("the will, retained");
    assert_eq!(rec["reason"], "connection lost", "{rec}");
    let _disc = part(&["discovery"], &cfg, broker.addr);
    let _mon = part(&["health", "monitor"], &cfg, broker.addr);
    w.expect(&["echo-keep alert healthy→offline"]);
    let status = retained(&port, "edge/health/status/echo").expect("status");
    assert_eq!(status["status"], "offline", "{status}");
    w.expect(&["echo-keep update expired"]);
    w.expect_quiet(Duration::from_millis(1500));
    assert!(retained(&port, "edge/system/discovery/echo/echo-keep").is_none());
    assert!(retained(&port, "edge/health/status/echo").is_none());
}

#[test]
fn broker_restarted_everything_comes_back_without_a_word() {
    let dir = TempDir::new("health-broker");
    let cfg = dir.file("topics.toml", "[broker]\nstats_interval = \"0s\"\n");
    let broker = Broker::start_with("");
    let addr = broker.addr;
    let port = broker.port();
    let _disc = part(&["discovery"], &cfg, addr);
    let _mon = part(&["health", "monitor"], &cfg, addr);
    let echo = Service::start("echo", addr, &["--instance", "echo-r"]);
    {
        let w = Watch::service(&port, "echo");
        w.expect_quiet(Duration::from_millis(1200));
        let status = retained(&port, "edge/health/status/echo").expect("status");
        assert_eq!(status["status"], "healthy", "{status}");
    }

    // Dropping SIGKILLs and reaps it: the port is free at once.
    drop(broker);
    let broker = Broker::start_on(addr.port());
    let w = Watch::service(&port, "echo");
    // Everyone reconnects; the registration and the monitor's records come back retained.
    let rec = (0..50)
        .find_map(|_| retained(&port, "edge/system/discovery/echo/echo-r"))
        .expect("registration back");
    assert_eq!(rec["state"], "online", "{rec}");
    let status = (0..50)
        .find_map(|_| retained(&port, "edge/health/status/echo"))
        .expect("status back");
    assert_eq!(status["status"], "healthy", "{status}");
    assert!(retained(&port, "edge/health/summary").is_some());
    // Not one update or alert: no instance changed.
    w.expect_quiet(Duration::from_millis(4000));
    let got = replies(&port, "edge/echo/echo/request", r#"{"n":2}"#);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["instance"], "echo-r", "{got:?}");
    drop(echo);
    drop(broker);
}
