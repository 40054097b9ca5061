//! Durable broker state: retained messages across SIGTERM and SIGKILL, acknowledgements that
//! mean "on disk", and damaged files that are reported, not fatal.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;

const T: Duration = Duration::from_secs(5);

/// A broker keeping its state in `state`, with the commit window `sync`, and what it logged
/// up to the line that says what it restored.
pub(crate) fn durable_broker(dir: &TempDir, state: &Path, sync: &str) -> (Broker, Vec<String>) {
    let cfg = dir.file(
        "topics.toml",
        &format!(
            "[broker]\nlisten = \"127.0.0.1:0\"\nstats_interval = \"0s\"\n\
             [broker.persistence]\ndir = \"{}\"\nsync = \"{sync}\"\n",
            state.display()
        ),
    );
    let mut cmd = edgebus();
    cmd.arg("broker").arg("-c").arg(&cfg);
    let proc = Proc::spawn(cmd);
    let mut log = Vec::new();
    let mut addr = None;
    let deadline = Instant::now() + T;
    // stdout and stderr arrive on two pipes: wait for both lines, in either order.
    while addr.is_none() || !log.iter().any(|l: &String| l.contains("restored")) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = proc
            .lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("broker did not start; saw {log:?}"));
        if let Some(a) = line.strip_prefix("edgebus broker listening on ") {
            addr = a.trim().parse().ok();
        }
        log.push(line);
    }
    let broker = Broker {
        proc,
        addr: addr.expect("address"),
        ws: None,
        _dir: None,
    };
    (broker, log)
}

/// The line of `log` containing `needle`.
pub(crate) fn line<'a>(log: &'a [String], needle: &str) -> &'a str {
    log.iter()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no `{needle}` in {log:?}"))
}

/// Every retained message under `filter`, as `topic payload` lines, sorted.
fn retained(port: &str, filter: &str) -> Vec<String> {
    let sub = Sub::start(port, &["-t", filter, "-V", "mqttv5"]);
    let mut got = sub.drain(Duration::from_millis(400));
    got.sort();
    got
}

#[test]
fn retained_messages_survive_sigterm_and_sigkill_with_their_properties() {
    let dir = TempDir::new("durable");
    let state = dir.0.join("state");
    for stop in ["TERM", "KILL"] {
        let _ = std::fs::remove_dir_all(&state);
        let (b, _) = durable_broker(&dir, &state, "50ms");
        let port = b.port();
        for (topic, payload) in [("dev/a", "1"), ("dev/b", "2"), ("dev/c", "3")] {
            let (ok, out) = publish(&port, &["-t", topic, "-m", payload, "-r", "-q", "1"]);
            assert!(ok, "{out}");
        }
        // MQTT 5 properties are kept with the message.
        let (ok, out) = publish(
            &port,
            &[
                "-V",
                "mqttv5",
                "-t",
                "dev/d",
                "-m",
                "4",
                "-r",
                "-q",
                "1",
                "-D",
                "publish",
                "content-type",
                "text/x-count",
                "-D",
                "publish",
                "user-property",
                "unit",
                "pcs",
            ],
        );
        assert!(ok, "{out}");
        // Cleared with an empty retained message [MQTT-3.3.1-6]: gone after the restart too.
        let (ok, out) = publish(&port, &["-t", "dev/b", "-n", "-r", "-q", "1"]);
        assert!(ok, "{out}");
        // QoS 0: no acknowledgement to wait for; a clean stop still writes it.
        let (ok, out) = publish(&port, &["-t", "dev/e", "-m", "5", "-r"]);
        assert!(ok, "{out}");
        let pid = b.proc.child.id();
        if stop == "KILL" {
            // The QoS 0 change has no acknowledgement to wait for: wait (bounded) until its
            // commit window has passed and it is in the file.
            let file = state.join(STATE_FILE);
            let deadline = Instant::now() + T;
            while !std::fs::read(&file).is_ok_and(|d| d.windows(5).any(|w| w == b"dev/e")) {
                assert!(
                    Instant::now() < deadline,
                    "the QoS 0 change never reached the file"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let st = std::process::Command::new("kill")
            .args([&format!("-{stop}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
        let mut b = b;
        let _ = b.proc.child.wait();
        let (b, log) = durable_broker(&dir, &state, "50ms");
        let restored = line(&log, "restored");
        assert!(
            restored.contains("restored 4 retained messages"),
            "{restored}"
        );
        assert_eq!(
            retained(&b.port(), "dev/#"),
            ["dev/a 1", "dev/c 3", "dev/d 4", "dev/e 5"],
            "after SIG{stop}"
        );
        // The properties, as an MQTT 5 subscriber sees them.
        let (ok, out) = run_tool(
            "mosquitto_sub",
            &b.port(),
            &[
                "-V", "mqttv5", "-t", "dev/d", "-C", "1", "-W", "5", "-F", "%C|%P",
            ],
        );
        assert!(ok, "{out}");
        assert_eq!(out.trim(), "text/x-count|unit:pcs", "after SIG{stop}");
    }
}

/// A raw MQTT 3.1.1 publisher of QoS 1 retained messages to one topic, `1`, `2`, … as
/// payloads and packet ids, at most 32 unacknowledged; returns the last value acknowledged
/// and the last one sent once the connection drops.
fn publish_until_killed(addr: std::net::SocketAddr, topic: &str) -> (u16, u16) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).ok();
    s.write_all(&connect_v311("acker", 30)).expect("connect");
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).expect("connack");
    assert_eq!(connack[3], 0, "accepted");
    let acked = Arc::new(AtomicU16::new(0));
    let mut reader = s.try_clone().expect("clone");
    let a = acked.clone();
    let read = std::thread::spawn(move || {
        let mut buf = [0u8; 4];
        while reader.read_exact(&mut buf).is_ok() {
            if buf[0] == 0x40 {
                // PUBACKs come in the order of their PUBLISHes [MQTT-4.6.0-2].
                let id = u16::from_be_bytes([buf[2], buf[3]]);
                let before = a.swap(id, Ordering::SeqCst);
                assert!(id == before + 1, "PUBACK {id} after {before}");
            }
        }
    });
    let mut sent = 0u16;
    loop {
        if sent >= 60_000 || sent.saturating_sub(acked.load(Ordering::SeqCst)) >= 32 {
            if read.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let n = sent + 1;
        let payload = n.to_string();
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&n.to_be_bytes());
        body.extend_from_slice(payload.as_bytes());
        let mut packet = vec![0x33, body.len() as u8];
        packet.extend_from_slice(&body);
        if s.write_all(&packet).is_err() {
            break;
        }
        sent = n;
    }
    let _ = read.join();
    (acked.load(Ordering::SeqCst), sent)
}

/// Acknowledged means on disk: a publisher counts PUBACKs while the broker is SIGKILLed at a
/// random moment; after the restart the retained message is the last acknowledged one or
/// a later one sent, never an earlier one. Twenty times.
#[test]
fn an_acknowledged_retained_update_survives_sigkill() {
    let dir = TempDir::new("acked");
    let state = dir.0.join("state");
    let mut seed = edgebus_runtime::bus::random_u64();
    for round in 0..20 {
        let _ = std::fs::remove_dir_all(&state);
        let (mut b, _) = durable_broker(&dir, &state, "5ms");
        let addr = b.addr;
        let pid = b.proc.child.id();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let after = Duration::from_millis(30 + seed % 300);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(after);
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        });
        let (acked, sent) = publish_until_killed(addr, "meter/1");
        killer.join().expect("killer");
        let _ = b.proc.child.wait();
        assert!(
            acked > 0,
            "round {round}: nothing acknowledged in {after:?}"
        );
        let (b, _) = durable_broker(&dir, &state, "5ms");
        let (ok, out) = run_tool(
            "mosquitto_sub",
            &b.port(),
            &["-t", "meter/1", "-C", "1", "-W", "5"],
        );
        assert!(
            ok,
            "round {round}: no retained message after the restart: {out}"
        );
        let value: u16 = out.trim().parse().expect("a number");
        assert!(
            value >= acked && value <= sent,
            "round {round}: retained {value}, acknowledged {acked}, sent {sent}"
        );
    }
}

#[test]
fn a_damaged_file_is_reported_and_the_rest_served() {
    let dir = TempDir::new("torn");
    let state = dir.0.join("state");
    let (b, _) = durable_broker(&dir, &state, "5ms");
    let port = b.port();
    for (topic, payload) in [
        ("d/a", "first"),
        ("d/b", "MIDDLE-MIDDLE"),
        ("d/c", "third"),
        ("d/d", "last-one"),
    ] {
        let (ok, out) = publish(&port, &["-t", topic, "-m", payload, "-r", "-q", "1"]);
        assert!(ok, "{out}");
    }
    drop(b);
    let file = state.join(STATE_FILE);
    let mut data = std::fs::read(&file).expect(STATE_FILE);
    // A flipped byte inside the second record, and the last record cut in half.
    let at = data
        .windows(13)
        .position(|w| w == b"MIDDLE-MIDDLE")
        .expect("the middle record");
    data[at + 4] ^= 0x20;
    data.truncate(data.len() - 6);
    std::fs::write(&file, &data).expect("damage");
    let (b, log) = durable_broker(&dir, &state, "5ms");
    let warning = line(&log, "damaged records skipped");
    assert!(warning.contains("torn_tail=true"), "{warning}");
    let restored = line(&log, "restored");
    assert!(
        restored.contains("restored 2 retained messages"),
        "{restored}"
    );
    assert_eq!(retained(&b.port(), "d/#"), ["d/a first", "d/c third"]);
    // The file was rewritten clean: the next start reads it without a complaint.
    drop(b);
    let (_b, log) = durable_broker(&dir, &state, "5ms");
    let restored = line(&log, "restored");
    assert!(
        restored.contains("restored 2 retained messages"),
        "{restored}"
    );
    assert!(
        !log.iter().any(|l| l.contains("records skipped")),
        "{log:?}"
    );
}

/// An idle broker writes nothing: once its changes are committed, its file stays as it is,
/// and the process writes no byte to storage.
#[test]
fn an_idle_broker_writes_nothing() {
    let dir = TempDir::new("idle");
    let state = dir.0.join("state");
    let (b, _) = durable_broker(&dir, &state, "5ms");
    let (ok, out) = publish(&b.port(), &["-t", "i/a", "-m", "x", "-r", "-q", "1"]);
    assert!(ok, "{out}");
    let file = state.join(STATE_FILE);
    let look = || {
        let m = std::fs::metadata(&file).expect(STATE_FILE);
        let io = std::fs::read_to_string(format!("/proc/{}/io", b.proc.child.id()))
            .expect("/proc/PID/io");
        let written: u64 = io
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("write_bytes");
        (m.len(), m.modified().ok(), written)
    };
    let before = look();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        look(),
        before,
        "(file length, modified, bytes written to storage)"
    );
}
