//! Sagas end to end: `edgebus orchestrator` and `edgebus service kv` / `echo` processes on an
//! `edgebus broker`, driven by `mosquitto_rr` and rumqttc; effects checked in kv's own counts.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgebus_runtime::bus::random_u64;
use edgebus_runtime::request::RequestOptions;
use edgebus_runtime::wire::ReplyBody;
use serde_json::{json, Value};

use crate::harness::*;
use crate::presence::retained;
use crate::runtime::client;

const T: Duration = Duration::from_secs(10);

/// The order saga of the shipped topics.toml, and three more: a step that times out, a
/// compensation that fails (and is retried), and slow steps for the crash test.
fn sagas(journal: &Path) -> String {
    format!(
        r#"
[orchestrator]
journal = "{}"

[[saga]]
name = "order"
retain_for = "2s"
[[saga.step]]
name = "reserve"
call = "kv/put"
input = {{ key = "stock/${{request.order}}", value = "${{request.qty}}", if_absent = true }}
compensate = "kv/delete"
[[saga.step]]
name = "charge"
call = "kv/put"
input = {{ key = "payment/${{request.order}}", value = 10, if_absent = true }}
compensate = "kv/delete"
[[saga.step]]
name = "ship"
call = "kv/put"
input = {{ key = "shipment/${{request.order}}", value = "${{steps.reserve.version}}", if_absent = true }}
compensate = "kv/delete"

[[saga]]
name = "slow"
[[saga.step]]
name = "reserve"
call = "kv/put"
input = {{ key = "slow/${{request.order}}", value = 1 }}
compensate = "kv/delete"
[[saga.step]]
name = "wait"
call = "echo/echo"
input = {{ delay_ms = 2000 }}
timeout = "300ms"

[[saga]]
name = "fragile"
[[saga.step]]
name = "reserve"
call = "kv/put"
input = {{ key = "fragile/${{request.order}}", value = 1 }}
compensate = "kv/delete"
compensate_input = {{ key = "elsewhere/${{request.order}}", if_present = true }}
retries = 2
retry_delay = "50ms"
retry_on = ["NOT_FOUND"]
[[saga.step]]
name = "charge"
call = "kv/put"
input = {{ key = "fragile/${{request.order}}", value = 2, if_absent = true }}

[[saga]]
name = "crash"
[[saga.step]]
name = "a"
call = "kv/put"
input = {{ key = "crash/${{request.order}}/a", value = 1, delay_ms = 150 }}
compensate = "kv/delete"
[[saga.step]]
name = "b"
call = "kv/put"
input = {{ key = "crash/${{request.order}}/b", value = 1, delay_ms = 150 }}
compensate = "kv/delete"
[[saga.step]]
name = "c"
call = "kv/put"
input = {{ key = "crash/${{request.order}}/c", value = 1, delay_ms = 150, if_absent = true }}
compensate = "kv/delete"
"#,
        journal.display()
    )
}

pub(crate) fn start_saga(port: &str, saga: &str, body: &str) -> Value {
    let topic = format!("edge/saga/{saga}/request");
    let (ok, out) = rr(
        port,
        &[
            "-t",
            &topic,
            "-e",
            "test/saga/reply",
            "-m",
            body,
            "-W",
            "10",
        ],
    );
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.starts_with('{')).expect("a reply");
    serde_json::from_str(line).expect("JSON")
}

fn kv_stats(port: &str) -> Value {
    let (ok, out) = rr(
        port,
        &[
            "-t",
            "edge/kv/stats/request",
            "-e",
            "test/kv/reply",
            "-m",
            "{}",
        ],
    );
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.starts_with('{')).expect("a reply");
    serde_json::from_str::<Value>(line).expect("JSON")["data"].clone()
}

pub(crate) fn kv_put(port: &str, key: &str) {
    let body = format!(r#"{{"key":"{key}","value":"taken"}}"#);
    let (ok, out) = rr(
        port,
        &[
            "-t",
            "edge/kv/put/request",
            "-e",
            "test/kv/reply",
            "-m",
            &body,
        ],
    );
    assert!(ok && out.contains("\"success\":true"), "{out}");
}

pub(crate) fn states(run: &Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["state"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn sagas_complete_compensate_in_reverse_time_out_and_report_failed_compensations() {
    let dir = TempDir::new("saga");
    let cfg = dir.file("topics.toml", &sagas(&dir.0.join("sagas.journal")));
    let broker = Broker::start_with("");
    let port = broker.port();
    let _kv = Service::start("kv", broker.addr, &["-c", &cfg.display().to_string()]);
    let _echo = Service::start("echo", broker.addr, &[]);
    let _orch = part(&["orchestrator"], &cfg, broker.addr);

    // Success, started with mosquitto_rr; the next step sees the earlier one's output.
    let r = start_saga(&port, "order", r#"{"order":"ok","qty":3}"#);
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(r["data"]["status"], "completed", "{r}");
    assert_eq!(states(&r["data"]), ["completed"; 3], "{r}");
    let s = kv_stats(&port);
    assert_eq!(s["data"]["stock/ok"], 3, "{s}");
    assert_eq!(s["data"]["shipment/ok"], 1, "{s}");
    let run_id = r["data"]["run_id"].as_str().expect("run id").to_owned();
    let topic = format!("edge/saga/order/runs/{run_id}");
    let rec = retained(&port, &topic).expect("run record retained");
    assert_eq!(rec["status"], "completed", "{rec}");

    // Failure at step k: steps k-1 … 1 undone, each once; nothing else touched.
    let keys = ["stock", "payment", "shipment"];
    for k in 0..3 {
        let order = format!("f{k}");
        kv_put(&port, &format!("{}/{order}", keys[k]));
        let r = start_saga(&port, "order", &format!(r#"{{"order":"{order}","qty":1}}"#));
        assert_eq!(r["success"], false, "{r}");
        assert_eq!(r["error"]["code"], "CONFLICT", "{r}");
        assert_eq!(r["data"]["status"], "compensated", "{r}");
        let mut want = vec!["compensated"; k];
        want.push("failed");
        want.extend(vec!["pending"; 2 - k]);
        assert_eq!(states(&r["data"]), want, "{r}");
        let s = kv_stats(&port);
        for (j, key) in keys.iter().enumerate() {
            let key = format!("{key}/{order}");
            if j < k {
                assert!(s["data"].get(&key).is_none(), "{key} undone: {s}");
                assert_eq!(s["puts"][&key], 1, "{key}: {s}");
                assert_eq!(s["deletes"][&key], 1, "{key}: {s}");
            } else if j == k {
                assert_eq!(s["data"][&key], "taken", "{key} untouched: {s}");
                assert_eq!(s["puts"][&key], 1, "{key}: {s}");
            } else {
                assert!(s["puts"].get(&key).is_none(), "{key} never written: {s}");
            }
        }
    }

    // A step that outlives its timeout: TIMEOUT, the step before it undone.
    let t0 = Instant::now();
    let r = start_saga(&port, "slow", r#"{"order":"t"}"#);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(r["error"]["code"], "TIMEOUT", "{r}");
    assert_eq!(states(&r["data"]), ["compensated", "failed"], "{r}");
    assert!(kv_stats(&port)["data"].get("slow/t").is_none());

    // A compensation that fails: retried per policy (3 attempts), reported, run `failed`.
    let r = start_saga(&port, "fragile", r#"{"order":"x"}"#);
    assert_eq!(r["data"]["status"], "failed", "{r}");
    assert_eq!(r["error"]["code"], "INTERNAL_ERROR", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("compensation failed")),
        "{r}"
    );
    let step = &r["data"]["steps"][0];
    assert_eq!(step["state"], "compensation_failed", "{r}");
    assert_eq!(step["compensation_attempts"], 3, "{r}");
    assert_eq!(step["error"]["code"], "NOT_FOUND", "{r}");

    // The first run's record is cleared after retain_for (2 s).
    let deadline = Instant::now() + T;
    while retained(&port, &topic).is_some() {
        assert!(Instant::now() < deadline, "run record never cleared");
    }

    // 50 runs at once, from one rumqttc client.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let addr = broker.addr;
    let replies: Vec<ReplyBody> = rt.block_on(async move {
        let bus = client(addr).await;
        let mut tasks = Vec::new();
        for n in 0..50 {
            let bus = bus.clone();
            tasks.push(tokio::spawn(async move {
                let body = format!(r#"{{"order":"c{n}","qty":{n}}}"#);
                bus.request_reply(
                    "edge/saga/order/request",
                    Bytes::from(body),
                    &RequestOptions::timeout(T),
                )
                .await
                .expect("reply")
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    assert!(replies.iter().all(|r| r.success), "{replies:?}");
    let s = kv_stats(&port);
    for n in 0..50 {
        for key in keys {
            assert_eq!(s["puts"][format!("{key}/c{n}")], 1, "{s}");
        }
    }
}

#[test]
fn orchestrator_killed_mid_run_finishes_or_compensates_every_run_once() {
    let dir = TempDir::new("saga-crash");
    let cfg = dir.file("topics.toml", &sagas(&dir.0.join("sagas.journal")));
    let broker = Broker::start_with("");
    let port = broker.port();
    let _kv = Service::start("kv", broker.addr, &["-c", &cfg.display().to_string()]);
    let orch = part(&["orchestrator"], &cfg, broker.addr);
    // Odd runs fail at their last step: their first two are undone.
    for n in (1..20).step_by(2) {
        kv_put(&port, &format!("crash/r{n}/c"));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let addr = broker.addr;
    // Once every run is journaled (a request the orchestrator never received is not its to
    // lose; its record shows it was), while runs are at every step: each takes 450 ms.
    let kill_after = Duration::from_millis(random_u64() % 300);
    let cfg2 = cfg.clone();
    let (replies, restarted) = rt.block_on(async move {
        let bus = client(addr).await;
        let mut records = bus
            .subscribe("edge/saga/crash/runs/+", 1)
            .await
            .expect("subscribe");
        assert!(bus.sync(Duration::from_secs(5)).await);
        let mut tasks = Vec::new();
        for n in 0..20u64 {
            let bus = bus.clone();
            tasks.push(tokio::spawn(async move {
                // Staggered, so the kill finds runs at every step.
                tokio::time::sleep(Duration::from_millis(n * 15)).await;
                let body = format!(r#"{{"order":"r{n}"}}"#);
                bus.request_reply(
                    "edge/saga/crash/request",
                    Bytes::from(body),
                    &RequestOptions::timeout(Duration::from_secs(30)),
                )
                .await
            }));
        }
        let mut started = std::collections::BTreeSet::new();
        let all = tokio::time::timeout(Duration::from_secs(30), async {
            while started.len() < 20 {
                let m = records.recv().await.expect("run records");
                started.insert(m.topic);
            }
        })
        .await;
        assert!(all.is_ok(), "only {} of 20 runs started", started.len());
        tokio::time::sleep(kill_after).await;
        drop(orch);
        let restarted = tokio::task::spawn_blocking(move || part(&["orchestrator"], &cfg2, addr))
            .await
            .expect("restart");
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        (out, restarted)
    });
    eprintln!("orchestrator SIGKILLed {kill_after:?} after the 20th run started");
    let s = kv_stats(&port);
    for (n, r) in replies.iter().enumerate() {
        let r = r.as_ref().unwrap_or_else(|e| panic!("run r{n}: {e}"));
        let status = r.data.as_ref().map(|d| d["status"].clone());
        let a = format!("crash/r{n}/a");
        let b = format!("crash/r{n}/b");
        let c = format!("crash/r{n}/c");
        // Every step applied exactly once, and every undo once, whatever the kill cut.
        assert_eq!(s["puts"][&a], 1, "r{n}: {s}");
        assert_eq!(s["puts"][&b], 1, "r{n}: {s}");
        if n % 2 == 0 {
            assert!(r.success, "r{n}: {r:?}");
            assert_eq!(status, Some(json!("completed")));
            assert_eq!(s["puts"][&c], 1, "r{n}: {s}");
            assert!(s["deletes"].get(&a).is_none(), "r{n}: {s}");
        } else {
            assert_eq!(status, Some(json!("compensated")), "r{n}: {r:?}");
            assert_eq!(s["deletes"][&a], 1, "r{n}: {s}");
            assert_eq!(s["deletes"][&b], 1, "r{n}: {s}");
            assert!(s["data"].get(&a).is_none() && s["data"].get(&b).is_none());
            assert_eq!(s["data"][&c], "taken", "r{n}: {s}");
        }
    }
    eprintln!(
        "kv answered {} repeated step calls from its idempotency keys",
        s["repeats"]
    );
    drop(restarted);
}
