//! The service runtime end to end: `edgebus service` processes and in-process services on a
//! real broker (the embedded one, and Debian's mosquitto), driven by mosquitto's clients,
//! `edgebus call` and the runtime's own client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgebus_runtime::bus::{random_u64, Bus, BusOptions};
use edgebus_runtime::contract::EventSpec;
use edgebus_runtime::events::Event;
use edgebus_runtime::request::{RequestError, RequestOptions};
use edgebus_runtime::service::{EventError, Request, ServiceBuilder};
use edgebus_runtime::wire::{code, ServiceError};
use serde_json::{json, Value};

use crate::harness::*;

const T: Duration = Duration::from_secs(5);

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A runtime client with its own reply topic, connected and synced.
pub async fn client(addr: SocketAddr) -> Bus {
    let id = format!("test-{:08x}", random_u64() as u32);
    // Every bus has its reply topic, `edge/system/reply/{client id}`.
    let bus = Bus::connect(BusOptions::new(addr.to_string(), id)).expect("bus");
    assert!(bus.sync(T).await, "client could not reach {addr}");
    bus
}

fn config(dir: &TempDir, text: &str) -> String {
    dir.file("topics.toml", text).display().to_string()
}

/// The request/response paths of the contract, against any broker at `addr`.
fn request_paths(addr: SocketAddr) {
    let port = addr.port().to_string();
    let echo = Service::start("echo", addr, &[]);

    // 1. MQTT 5: mosquitto_rr sets a response topic; correlation data is echoed.
    let (ok, out) = rr(
        &port,
        &[
            "-t",
            "edge/echo/echo/request",
            "-e",
            "test/rr/reply",
            "-m",
            r#"{"x":1}"#,
            "-D",
            "publish",
            "correlation-data",
            "corr-42",
            "-W",
            "5",
        ],
    );
    assert!(ok, "mosquitto_rr failed: {out}");
    let reply: Value = serde_json::from_str(out.trim()).expect("reply JSON");
    assert_eq!(reply["success"], true, "{reply}");
    assert_eq!(reply["data"], json!({"x": 1}), "{reply}");
    assert_eq!(reply["request_id"], "corr-42", "{reply}");
    assert_eq!(reply["instance"], echo.instance.as_str(), "{reply}");

    // 2. MQTT 3.1.1: `reply_to` and `correlation_id` in the JSON.
    let sub = Sub::start(&port, &["-V", "311", "-t", "test/v311/reply", "-q", "1"]);
    let (ok, out) = publish(
        &port,
        &[
            "-V",
            "311",
            "-q",
            "1",
            "-t",
            "edge/echo/echo/request",
            "-m",
            r#"{"reply_to":"test/v311/reply","correlation_id":"c-1","v":5}"#,
        ],
    );
    assert!(ok, "{out}");
    let line = sub.next(T).expect("reply on reply_to");
    let reply = json_of(&line);
    assert_eq!(reply["success"], true, "{reply}");
    assert_eq!(reply["correlation_id"], "c-1", "{reply}");
    assert_eq!(
        reply["data"],
        json!({"v": 5}),
        "the addressing fields are not data: {reply}"
    );

    // 3. No reply address: `.../result`, and `.../error` for a malformed request, which
    //    also goes to the dead letters.
    let sub = Sub::start(&port, &["-t", "edge/echo/echo/+", "-q", "1"]);
    let dead = Sub::start(&port, &["-t", "edge/system/deadletter/echo", "-q", "1"]);
    let (ok, out) = publish(
        &port,
        &[
            "-q",
            "1",
            "-t",
            "edge/echo/echo/request",
            "-m",
            r#"{"session_id":"s-9","n":2}"#,
        ],
    );
    assert!(ok, "{out}");
    let line = sub.find_result("edge/echo/echo/result");
    let reply = json_of(&line);
    assert_eq!(reply["session_id"], "s-9", "{reply}");
    assert_eq!(reply["request_id"], "s-9", "{reply}");
    assert_eq!(reply["data"], json!({"n": 2}), "{reply}");

    let (ok, out) = publish(
        &port,
        &["-q", "1", "-t", "edge/echo/echo/request", "-m", "{not json"],
    );
    assert!(ok, "{out}");
    let line = sub.find_result("edge/echo/echo/error");
    let reply = json_of(&line);
    assert_eq!(reply["success"], false, "{reply}");
    assert_eq!(reply["error"]["code"], code::BAD_REQUEST, "{reply}");
    assert_eq!(reply["error"]["retryable"], false, "{reply}");
    let letter = json_of(&dead.next(T).expect("dead letter"));
    assert_eq!(letter["payload"], "{not json", "{letter}");
    assert_eq!(letter["topic"], "edge/echo/echo/request", "{letter}");
    assert_eq!(letter["error"]["code"], code::BAD_REQUEST, "{letter}");

    // 4. `edgebus call`: the reply on stdout, exit status by success.
    let out = edgebus()
        .args([
            "call",
            "echo/echo",
            r#"{"hello":"bus"}"#,
            "--broker",
            &addr.to_string(),
        ])
        .output()
        .expect("edgebus call");
    assert!(out.status.success(), "{out:?}");
    let reply: Value = serde_json::from_slice(&out.stdout).expect("call output is JSON");
    assert_eq!(reply["data"], json!({"hello": "bus"}));
    let out = edgebus()
        .args([
            "call",
            "echo/echo",
            r#"{"delay_ms":"soon"}"#,
            "--broker",
            &addr.to_string(),
        ])
        .output()
        .expect("edgebus call");
    assert!(!out.status.success(), "{out:?}");
    let reply: Value = serde_json::from_slice(&out.stdout).expect("call output is JSON");
    assert_eq!(reply["error"]["code"], code::BAD_REQUEST, "{reply}");
}

impl Sub {
    /// The next message on `topic`, skipping others.
    fn find_result(&self, topic: &str) -> String {
        let deadline = Instant::now() + T;
        while let Some(m) = self.next(deadline.saturating_duration_since(Instant::now())) {
            if m.starts_with(&format!("{topic} ")) {
                return m;
            }
        }
        panic!("nothing on {topic}");
    }
}

#[test]
fn request_response_on_embedded_broker() {
    let broker = Broker::start();
    request_paths(broker.addr);
}

#[test]
fn request_response_on_mosquitto() {
    let m = Mosquitto::start();
    request_paths(m.addr);
}

#[test]
fn deadlines_schema_timeouts_and_sizes_from_topics_toml() {
    let dir = TempDir::new("contract");
    let cfg = config(
        &dir,
        r#"
[broker]
listen = "127.0.0.1:0"
max_payload = "1MiB"
max_queued_bytes = "4MiB"

[[service]]
name = "echo"

[[service.endpoint]]
name = "echo"
timeout = "300ms"
schema = { text = "string", delay_ms = "integer?" }
"#,
    );
    let broker = Broker::start_config(std::path::Path::new(&cfg), false);
    let port = broker.port();
    let _echo = Service::start("echo", broker.addr, &["-c", &cfg]);
    let sub = Sub::start(&port, &["-t", "edge/echo/echo/+", "-q", "1"]);
    let dead = Sub::start(&port, &["-t", "edge/system/deadletter/echo", "-q", "1"]);
    let send = |m: &str| {
        let (ok, out) = publish(&port, &["-q", "1", "-t", "edge/echo/echo/request", "-m", m]);
        assert!(ok, "{out}");
    };

    send(r#"{"text":"ok"}"#);
    assert_eq!(
        json_of(&sub.find_result("edge/echo/echo/result"))["data"]["text"],
        "ok"
    );

    // Schema: refused before the handler, naming the field.
    send(r#"{"text":5}"#);
    let reply = json_of(&sub.find_result("edge/echo/echo/error"));
    assert_eq!(reply["error"]["code"], code::BAD_REQUEST, "{reply}");
    let msg = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("`text`"), "{reply}");
    assert!(dead.next(T).is_some(), "schema failures are dead letters");

    // A deadline already passed.
    send(r#"{"text":"late","deadline_ms":1000}"#);
    let reply = json_of(&sub.find_result("edge/echo/echo/error"));
    assert_eq!(reply["error"]["code"], code::TIMEOUT, "{reply}");

    // The endpoint's own timeout (300 ms from topics.toml) cuts a slow handler.
    let t0 = Instant::now();
    send(r#"{"text":"slow","delay_ms":3000}"#);
    let reply = json_of(&sub.find_result("edge/echo/echo/error"));
    assert_eq!(reply["error"]["code"], code::TIMEOUT, "{reply}");
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );

    // Larger than the endpoint takes (256 KiB), smaller than the broker's 1 MiB.
    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(300 * 1024));
    let file = dir.file("big.json", &big);
    let (ok, out) = publish(
        &port,
        &[
            "-q",
            "1",
            "-t",
            "edge/echo/echo/request",
            "-f",
            &file.display().to_string(),
        ],
    );
    assert!(ok, "{out}");
    let reply = json_of(&sub.find_result("edge/echo/echo/error"));
    assert_eq!(reply["error"]["code"], code::PAYLOAD_TOO_LARGE, "{reply}");
    let letter = json_of(&dead.next(T).expect("dead letter for the oversize request"));
    assert_eq!(letter["payload_bytes"], big.len(), "{letter}");

    // Larger than the broker takes: the publisher is cut off, the service keeps serving.
    let huge = dir.file("huge.json", &"y".repeat(2 * 1024 * 1024));
    let (ok, _) = publish(
        &port,
        &[
            "-q",
            "1",
            "-t",
            "edge/echo/echo/request",
            "-f",
            &huge.display().to_string(),
        ],
    );
    assert!(!ok, "the broker must refuse a 2 MiB publish");
    send(r#"{"text":"still here"}"#);
    assert_eq!(
        json_of(&sub.find_result("edge/echo/echo/result"))["data"]["text"],
        "still here"
    );
}

#[test]
fn panicking_and_failing_handlers_get_internal_error_and_serving_goes_on() {
    let broker = Broker::start();
    let rt = runtime();
    rt.block_on(async {
        let server = Bus::connect(BusOptions::for_service(
            broker.addr.to_string(),
            "edge",
            "fragile",
            None,
        ))
        .expect("bus");
        let _svc = ServiceBuilder::new("fragile")
            .endpoint("work", |req: Request<Value>| async move {
                if req.data["panic"] == true {
                    panic!("boom at {}", req.data["n"]);
                }
                if req.data["fail"] == true {
                    return Err(ServiceError::new("DISK_FULL", "no space left"));
                }
                Ok::<_, ServiceError>(json!({"done": req.data["n"]}))
            })
            .start(&server)
            .await
            .expect("start");
        assert!(server.sync(T).await);
        let c = client(broker.addr).await;
        let e = c
            .request::<_, Value>("fragile/work", &json!({"panic": true, "n": 1}), T)
            .await
            .expect_err("panic must be an error reply");
        assert_eq!(e.code(), code::INTERNAL_ERROR, "{e}");
        assert!(e.to_string().contains("boom at 1"), "{e}");
        let e = c
            .request::<_, Value>("fragile/work", &json!({"fail": true}), T)
            .await
            .expect_err("failure");
        assert_eq!(e.code(), "DISK_FULL");
        assert!(!e.retryable());
        for n in 0..20 {
            let r: Value = c
                .request("fragile/work", &json!({"n": n}), T)
                .await
                .expect("serving goes on");
            assert_eq!(r["done"], n);
        }
    });
}

/// A handler sees who called, as the broker vouches for it: the client id and the
/// authenticated user, whoever the caller is (the runtime, a service, `mosquitto_rr`), and
/// a caller that writes someone else's name into its request is not believed. Through
/// mosquitto, which vouches for nothing, the handler sees what the caller states, unverified.
#[test]
fn a_handler_sees_who_called() {
    let dir = TempDir::new("whoami");
    let users = password_file(&dir, &[("alice", "alice-pw")]);
    let broker = Broker::start_with(&format!(
        "[broker.auth]\npassword_file = \"{}\"\n",
        users.display()
    ));
    let mosquitto = Mosquitto::start();
    let rt = runtime();
    let mosquitto_addr: SocketAddr = format!("127.0.0.1:{}", mosquitto.port())
        .parse()
        .expect("addr");
    rt.block_on(async {
        let mut services = Vec::new();
        for addr in [broker.addr, mosquitto_addr] {
            let server = Bus::connect(BusOptions::for_service(
                addr.to_string(),
                "edge",
                "whoami",
                None,
            ))
            .expect("bus");
            let svc = ServiceBuilder::new("whoami")
                .endpoint("ask", |req: Request<Value>| async move {
                    let c = req.caller();
                    Ok::<_, ServiceError>(json!({
                        "client_id": c.client_id,
                        "service": c.service,
                        "user": c.user,
                        "verified": c.verified,
                    }))
                })
                .start(&server)
                .await
                .expect("start");
            assert!(server.sync(T).await);
            services.push((server, svc));
        }
        let plain = client(broker.addr).await;
        let r: Value = plain
            .request("whoami/ask", &json!({}), T)
            .await
            .expect("reply");
        let want = json!({"client_id": plain.client_id(), "service": null, "user": null, "verified": true});
        assert_eq!(r, want);
        let as_service = Bus::connect(BusOptions::for_service(
            broker.addr.to_string(),
            "edge",
            "billing",
            Some("billing-7".into()),
        ))
        .expect("bus");
        assert!(as_service.sync(T).await);
        let r: Value = as_service
            .request("whoami/ask", &json!({}), T)
            .await
            .expect("reply");
        let want = json!({"client_id": "billing-7", "service": "billing", "user": null, "verified": true});
        assert_eq!(r, want);
        // mosquitto_rr, logged in, and writing someone else's names into its request.
        let (ok, out) = rr(
            &broker.port(),
            &[
                "-V", "mqttv5", "-u", "alice", "-P", "alice-pw", "-i", "alice-box",
                "-D", "publish", "user-property", "edgebus-user", "root",
                "-D", "publish", "user-property", "edgebus-client-id", "billing-7",
                "-t", "edge/whoami/ask/request", "-e", "t/who", "-m", "{}", "-W", "3",
            ],
        );
        assert!(ok, "{out}");
        let reply: Value = serde_json::from_str(out.trim()).expect("reply");
        assert_eq!(
            reply["data"],
            json!({"client_id": "alice-box", "service": null, "user": "alice", "verified": true})
        );
        // Through mosquitto: what the caller states, not verified.
        let other = client(mosquitto_addr).await;
        let r: Value = other
            .request("whoami/ask", &json!({}), T)
            .await
            .expect("reply");
        let want = json!({"client_id": other.client_id(), "service": null, "user": null, "verified": false});
        assert_eq!(r, want);
        drop(services);
    });
}

#[test]
fn two_instances_share_a_thousand_requests_each_answered_once() {
    let broker = Broker::start();
    let a = Service::start("echo", broker.addr, &[]);
    let b = Service::start("echo", broker.addr, &[]);
    let rt = runtime();
    rt.block_on(async {
        let c = client(broker.addr).await;
        let served_a = Arc::new(AtomicUsize::new(0));
        let served_b = Arc::new(AtomicUsize::new(0));
        let limit = Arc::new(tokio::sync::Semaphore::new(50));
        let mut tasks = Vec::new();
        for n in 0..1000u32 {
            let (c, limit) = (c.clone(), limit.clone());
            let (sa, sb) = (served_a.clone(), served_b.clone());
            let (ia, ib) = (a.instance.clone(), b.instance.clone());
            tasks.push(tokio::spawn(async move {
                let _p = limit.acquire().await.expect("permit");
                let topic = c.request_topic("echo/echo");
                let reply = c
                    .request_raw(
                        &topic,
                        serde_json::to_vec(&json!({ "n": n })).expect("json").into(),
                        &RequestOptions::timeout(T),
                    )
                    .await
                    .expect("reply");
                assert_eq!(reply.data, Some(json!({ "n": n })));
                let inst = reply.instance.unwrap_or_default();
                if inst == ia {
                    sa.fetch_add(1, Ordering::Relaxed);
                } else if inst == ib {
                    sb.fetch_add(1, Ordering::Relaxed);
                } else {
                    panic!("reply from unknown instance {inst}");
                }
            }));
        }
        for t in tasks {
            t.await.expect("request task");
        }
        let (na, nb) = (
            served_a.load(Ordering::Relaxed),
            served_b.load(Ordering::Relaxed),
        );
        assert_eq!(na + nb, 1000);
        assert!(na > 100 && nb > 100, "both instances serve: {na} / {nb}");
        // A second reply to any request would arrive as unmatched; give one a moment to.
        assert!(c.sync(T).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(c.unmatched_replies(), 0, "duplicate replies");
    });
}

#[test]
fn broker_killed_and_restarted_under_load() {
    let mut broker = Broker::start();
    let addr = broker.addr;
    let _echo = Service::start("echo", addr, &[]);
    let rt = runtime();
    rt.block_on(async {
        let c = client(addr).await;
        let timeout = Duration::from_secs(2);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..4 {
            let (c, stop) = (c.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                let mut log: Vec<(Instant, Duration, Result<(), String>)> = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let t0 = Instant::now();
                    let r: Result<Value, RequestError> =
                        c.request("echo/echo", &json!({"w": w, "n": n}), timeout).await;
                    let r = match r {
                        Ok(v) if v == json!({"w": w, "n": n}) => Ok(()),
                        Ok(v) => Err(format!("wrong reply {v}")),
                        Err(e) => Err(e.to_string()),
                    };
                    let failed = r.is_err();
                    log.push((t0 + t0.elapsed(), t0.elapsed(), r));
                    if failed {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                log
            }));
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        broker.proc.signal("KILL");
        let _ = broker.proc.wait_exit(T);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let restarted = tokio::task::spawn_blocking(move || Broker::start_on(addr.port()))
            .await
            .expect("restart");
        let back = Instant::now();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        stop.store(true, Ordering::Relaxed);
        let mut ok_after = 0;
        let mut first_ok_after: Option<Duration> = None;
        let mut failures = 0;
        for w in workers {
            for (done, took, r) in w.await.expect("worker") {
                assert!(
                    took <= timeout + Duration::from_millis(300),
                    "a request took {took:?}, past its {timeout:?} deadline"
                );
                match r {
                    Ok(()) if done > back => {
                        ok_after += 1;
                        let after = done - back;
                        first_ok_after = Some(first_ok_after.map_or(after, |f| f.min(after)));
                    }
                    Ok(()) => {}
                    Err(_) => failures += 1,
                }
            }
        }
        let first = first_ok_after.expect("served again after the restart");
        assert!(first < Duration::from_secs(2), "served again after {first:?}");
        assert!(ok_after > 10, "only {ok_after} requests succeeded after the restart");
        eprintln!("restart: served again {first:?} after the broker came back; {failures} requests failed with a clear error");
        drop(restarted);
    });
}

#[test]
fn events_typed_streams_batches_and_lag() {
    for on_mosquitto in [false, true] {
        let (_b, _m, addr) = if on_mosquitto {
            let m = Mosquitto::start();
            let a = m.addr;
            (None, Some(m), a)
        } else {
            let b = Broker::start();
            let a = b.addr;
            (Some(b), None, a)
        };
        let port = addr.port().to_string();
        let sub = Sub::start(&port, &["-t", "edge/sensor/events/#", "-q", "1"]);
        let rt = runtime();
        rt.block_on(async {
            let bus = Bus::connect(BusOptions::for_service(
                addr.to_string(),
                "edge",
                "sensor",
                None,
            ))
            .expect("bus");
            let mut temp = EventSpec::new("temperature");
            temp.qos = 1;
            let svc = ServiceBuilder::new("sensor")
                .event(temp)
                .start(&bus)
                .await
                .expect("start");
            assert!(bus.sync(T).await);
            let c = client(addr).await;
            let mut stream = c
                .events::<Value>("edge/sensor/events/temperature", 1)
                .await
                .expect("events");
            assert!(c.sync(T).await);
            for i in 0..3 {
                svc.emit("temperature", &json!({"c": 20 + i}))
                    .await
                    .expect("emit");
            }
            for i in 0..3 {
                let ev: Event<Value> = tokio::time::timeout(T, stream.next())
                    .await
                    .expect("in time")
                    .expect("open")
                    .expect("decodes");
                assert_eq!(ev.data, json!({"c": 20 + i}));
                assert_eq!(ev.kind, "sensor.temperature");
                assert!(ev.source.starts_with("sensor/"), "{}", ev.source);
            }
            let e = svc
                .emit("humidity", &json!({}))
                .await
                .expect_err("undeclared");
            assert!(matches!(e, EventError::Undeclared(_)), "{e}");

            // A batch of 5 is one message holding 5 envelopes.
            let batch = svc
                .batcher("temperature", 5, Duration::from_secs(60))
                .expect("batcher");
            for i in 0..5 {
                batch.push(&json!({"c": i})).expect("push");
            }
            for i in 0..5 {
                let ev = tokio::time::timeout(T, stream.next())
                    .await
                    .expect("batched event in time")
                    .expect("open")
                    .expect("decodes");
                assert_eq!(ev.data, json!({"c": i}));
            }
            assert_eq!(stream.lagged(), 0);

            // A consumer that stops reading loses events, and they are counted.
            let mut o = BusOptions::new(addr.to_string(), format!("slow-{}", random_u64() as u16));
            o.subscription_buffer = 4;
            o.reply_topic = Some(format!("edge/system/reply/slow-{}", random_u64() as u16));
            let slow_bus = Bus::connect(o).expect("bus");
            let mut slow = slow_bus
                .events::<Value>("edge/sensor/events/temperature", 1)
                .await
                .expect("events");
            assert!(slow_bus.sync(T).await);
            for i in 0..20 {
                svc.emit("temperature", &json!({"c": i}))
                    .await
                    .expect("emit");
            }
            let deadline = Instant::now() + T;
            while slow.lagged() < 16 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(slow.lagged(), 16, "4 buffered, 16 counted as lost");
            let first = slow.next().await.expect("open").expect("decodes");
            assert_eq!(first.data, json!({"c": 0}));
        });
        // mosquitto_sub sees the envelope as JSON.
        let ev = json_of(&sub.next(T).expect("event seen by mosquitto_sub"));
        assert_eq!(ev["type"], "sensor.temperature", "{ev}");
        assert!(ev["id"].is_string() && ev["time"].is_string(), "{ev}");
    }
}

#[test]
fn hostmetrics_publishes_readings_and_answers_requests() {
    let dir = TempDir::new("hostmetrics");
    let cfg = config(&dir, "[hostmetrics]\ninterval = \"200ms\"\n");
    let m = Mosquitto::start();
    let sub = Sub::start(
        &m.port(),
        &["-t", "edge/hostmetrics/events/reading", "-q", "0"],
    );
    let _svc = Service::start("hostmetrics", m.addr, &["-c", &cfg]);
    let ev = json_of(&sub.next(T).expect("a reading event"));
    assert_eq!(ev["type"], "hostmetrics.reading", "{ev}");
    assert!(
        ev["data"]["mem_total_bytes"].as_u64().unwrap_or(0) > 0,
        "{ev}"
    );
    let (ok, out) = rr(
        &m.port(),
        &[
            "-t",
            "edge/hostmetrics/read/request",
            "-e",
            "test/hm",
            "-m",
            "{}",
            "-W",
            "5",
        ],
    );
    assert!(ok, "{out}");
    let reply: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert!(reply["data"]["cpus"].as_u64().unwrap_or(0) >= 1, "{reply}");
}
