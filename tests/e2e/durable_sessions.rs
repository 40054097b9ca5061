//! Persistent sessions across a broker restart: subscriptions, queued QoS 1/2 messages and
//! in-flight state survive SIGTERM and SIGKILL; a subscriber gets again exactly what it had
//! not acknowledged, in order, with the packet ids it had; session expiry runs on the wall
//! clock while the broker is down.
//!
//! The subscriber and the publisher are hand-made MQTT 5 clients, so the test decides when
//! each acknowledgement goes, and sees packet ids and DUP flags.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::packet::{self as pkt, frame};
use crate::harness::*;
use crate::persistence::{durable_broker, line};

const T: Duration = Duration::from_secs(10);

/// A hand-made MQTT 5 client.
struct Raw(TcpStream);

/// One PUBLISH as received.
#[derive(Debug)]
struct Got {
    qos: u8,
    dup: bool,
    pkid: u16,
    topic: String,
    payload: String,
}

impl Raw {
    /// Connects as `id` with Session Expiry Interval `expiry` (clean start 0); returns the
    /// client and Session Present.
    fn connect(addr: SocketAddr, id: &str, expiry: u32) -> (Raw, bool) {
        let mut s = raw(addr);
        s.set_read_timeout(Some(T)).expect("timeout");
        let mut props = vec![0x11];
        props.extend_from_slice(&expiry.to_be_bytes());
        let c = pkt::Connect {
            v5: true,
            client_id: id,
            keep_alive: 60,
            persistent: true,
            props: &props,
            ..Default::default()
        };
        send(&mut s, &c.bytes());
        let (b1, body) = pkt::read(&mut s).expect("CONNACK");
        assert_eq!(b1, 0x20, "CONNACK");
        assert_eq!(body[1], 0, "accepted: {body:?}");
        (Raw(s), body[0] & 1 == 1)
    }

    fn subscribe(&mut self, filter: &str, qos: u8) {
        send(&mut self.0, &pkt::subscribe(true, 1, &[(filter, qos)]));
        let (_, body) = pkt::read_kind(&mut self.0, 9).expect("SUBACK");
        assert_eq!(body[3], qos, "granted");
    }

    fn ack(&mut self, kind: u8, pkid: u16) {
        let mut body = pkid.to_be_bytes().to_vec();
        body.push(0);
        send(&mut self.0, &frame(kind, &body));
    }

    /// Publishes `payloads` to `topic` at `qos`, all sent before any acknowledgement is
    /// read, and waits for every acknowledgement (PUBACK, or PUBREC, PUBREL, PUBCOMP).
    fn publish_all(&mut self, topic: &str, qos: u8, payloads: impl Iterator<Item = u32>) {
        self.publish_padded(topic, qos, payloads, 0);
    }

    /// As [`Raw::publish_all`], each payload `n` followed by a space and `pad` bytes.
    fn publish_padded(
        &mut self,
        topic: &str,
        qos: u8,
        payloads: impl Iterator<Item = u32>,
        pad: usize,
    ) {
        let mut sent = 0;
        for (i, p) in payloads.enumerate() {
            let pkid = (i % 60_000) as u16 + 1;
            let mut payload = p.to_string();
            if pad > 0 {
                payload.push(' ');
                payload.push_str(&"x".repeat(pad));
            }
            let packet = pkt::publish(true, qos, pkid, topic.as_bytes(), &[], payload.as_bytes());
            send(&mut self.0, &packet);
            sent += 1;
        }
        let mut done = 0;
        while done < sent {
            let (b1, body) = pkt::read(&mut self.0).expect("an acknowledgement");
            let pkid = u16::from_be_bytes([body[0], body[1]]);
            match b1 >> 4 {
                4 | 7 => done += 1,
                5 => self.ack(0x62, pkid),
                other => panic!("publisher got packet type {other}"),
            }
        }
    }

    /// The next PUBLISH (PUBRELs are answered with PUBCOMP on the way and listed in `rels`).
    fn next_publish(&mut self, rels: &mut Vec<u16>) -> Got {
        loop {
            let (b1, body) = pkt::read(&mut self.0).expect("a packet");
            match b1 >> 4 {
                3 => return parse_publish(b1, &body),
                6 => {
                    let pkid = u16::from_be_bytes([body[0], body[1]]);
                    rels.push(pkid);
                    self.ack(0x70, pkid);
                }
                other => panic!("subscriber got packet type {other}"),
            }
        }
    }

    /// Acknowledges every one of `got` completely (nothing else may be on its way: the
    /// PUBRELs are read with whatever comes before them skipped).
    fn complete(&mut self, got: &[Got]) {
        for g in got {
            self.ack(if g.qos == 1 { 0x40 } else { 0x50 }, g.pkid);
        }
        for g in got.iter().filter(|g| g.qos == 2) {
            let (_, body) = pkt::read_kind(&mut self.0, 6).expect("PUBREL");
            assert_eq!(
                u16::from_be_bytes([body[0], body[1]]),
                g.pkid,
                "PUBRELs in order"
            );
            self.ack(0x70, g.pkid);
        }
    }
}

fn parse_publish(b1: u8, body: &[u8]) -> Got {
    let qos = (b1 >> 1) & 3;
    let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8_lossy(&body[2..2 + tlen]).into_owned();
    let mut at = 2 + tlen;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([body[at], body[at + 1]]);
        at += 2;
    }
    // The property length (a variable byte integer), then the properties.
    let (mut plen, mut shift) = (0usize, 0);
    loop {
        let b = body[at];
        at += 1;
        plen |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    at += plen;
    Got {
        qos,
        dup: b1 & 0x08 != 0,
        pkid,
        topic,
        payload: String::from_utf8_lossy(&body[at..]).into_owned(),
    }
}

fn stop(b: Broker, signal: &str) {
    let mut b = b;
    b.proc.signal(signal);
    assert!(
        b.proc.wait_exit(T).is_some(),
        "the broker did not stop on SIG{signal}"
    );
}

/// 300 messages reach a persistent subscriber, which acknowledges the first 100 (and, at
/// QoS 2, sends PUBREC for the next 50 without completing them) and goes away; 1,000 more
/// are queued for it while it is offline; the broker is stopped with `signal` and started
/// again. The subscriber comes back with its client id and gets, in order, exactly what it
/// had not acknowledged: at QoS 2 the PUBRELs of the 50 first, then every other message
/// once, each with the packet id it had before.
fn queued_messages_survive(state: &Path, dir: &TempDir, qos: u8, signal: &str) {
    let _ = std::fs::remove_dir_all(state);
    let (b, _) = durable_broker(dir, state, "50ms");
    let (mut sub, present) = Raw::connect(b.addr, "keeper", 3600);
    assert!(!present);
    sub.subscribe("q/#", qos);
    let (mut publisher, _) = Raw::connect(b.addr, "feeder", 0);
    publisher.publish_all("q/n", qos, 1..=300);
    let mut rels = Vec::new();
    let first: Vec<Got> = (0..300).map(|_| sub.next_publish(&mut rels)).collect();
    for (i, g) in first.iter().enumerate() {
        assert_eq!(g.payload, (i + 1).to_string(), "in order");
        assert_eq!(
            usize::from(g.pkid),
            i + 1,
            "packet id = number in the session"
        );
    }
    sub.complete(&first[..100]);
    let mut received = Vec::new();
    if qos == 2 {
        for g in &first[100..150] {
            sub.ack(0x50, g.pkid);
            let (_, body) = pkt::read_kind(&mut sub.0, 6).expect("PUBREL");
            received.push(u16::from_be_bytes([body[0], body[1]]));
        }
    }
    // The last PUBCOMP is read by the broker before it goes: a PING's answer says so.
    send(&mut sub.0, &[0xc0, 0]);
    pkt::read_kind(&mut sub.0, 13).expect("PINGRESP");
    drop(sub);
    publisher.publish_all("q/n", qos, 301..=1300);
    drop(publisher);
    stop(b, signal);

    let (b, log) = durable_broker(dir, state, "50ms");
    let restored = line(&log, "restored");
    assert!(restored.contains("1 sessions"), "{restored}");
    let (mut sub, present) = Raw::connect(b.addr, "keeper", 3600);
    assert!(present, "the session came back after SIG{signal}");
    let first_left = if qos == 2 { 151 } else { 101 };
    let mut rels = Vec::new();
    let mut got = Vec::new();
    for _ in first_left..=1300 {
        let g = sub.next_publish(&mut rels);
        assert!(
            g.dup,
            "a restored message may have been sent before: DUP [MQTT-3.3.1-1]"
        );
        got.push(g);
    }
    sub.complete(&got);
    let payloads: Vec<u32> = got.iter().map(|g| g.payload.parse().expect("n")).collect();
    let want: Vec<u32> = (first_left..=1300).collect();
    assert_eq!(
        payloads, want,
        "QoS {qos} after SIG{signal}: each once, in order"
    );
    assert!(got
        .iter()
        .all(|g| u32::from(g.pkid) == g.payload.parse::<u32>().expect("n")));
    let want_rels: Vec<u16> = if qos == 2 {
        (101..=150).collect()
    } else {
        Vec::new()
    };
    assert_eq!(
        rels, want_rels,
        "the PUBRELs of what was PUBRECed, not the PUBLISHes"
    );
    assert_eq!(received.len(), want_rels.len());
    // The subscription is still there, and numbering goes on.
    let (mut publisher, _) = Raw::connect(b.addr, "feeder", 0);
    publisher.publish_all("q/live", qos, 1..=1);
    let g = sub.next_publish(&mut rels);
    assert_eq!(
        (g.topic.as_str(), g.payload.as_str(), g.dup),
        ("q/live", "1", false)
    );
    assert_eq!(g.pkid, 1301);
}

#[test]
fn queued_qos1_messages_survive_sigterm_and_sigkill() {
    let dir = TempDir::new("queued1");
    let state = dir.0.join("state");
    for signal in ["TERM", "KILL"] {
        queued_messages_survive(&state, &dir, 1, signal);
    }
}

#[test]
fn queued_qos2_messages_survive_sigterm_and_sigkill_exactly_once() {
    let dir = TempDir::new("queued2");
    let state = dir.0.join("state");
    for signal in ["TERM", "KILL"] {
        queued_messages_survive(&state, &dir, 2, signal);
    }
}

/// Session expiry is wall-clock time: a session whose expiry passes while the broker is down
/// is gone; one with time left keeps what it had left, not a fresh interval.
#[test]
fn session_expiry_is_honoured_across_a_restart() {
    let dir = TempDir::new("expiry");
    let state = dir.0.join("state");
    let (b, _) = durable_broker(&dir, &state, "50ms");
    for (id, expiry) in [("short", 1), ("middle", 5), ("long", 3600)] {
        let (mut c, _) = Raw::connect(b.addr, id, expiry);
        c.subscribe("e/#", 1);
    }
    // Each connection closes without DISCONNECT: its session waits `expiry` from here.
    let left_at = Instant::now();
    stop(b, "KILL");
    // The short one's second passes while the broker is down.
    let wait = Duration::from_millis(1500).saturating_sub(left_at.elapsed());
    std::thread::sleep(wait);
    let (b, log) = durable_broker(&dir, &state, "50ms");
    let restored = line(&log, "restored");
    assert!(restored.contains("2 sessions"), "{restored}");
    let (_, present) = Raw::connect(b.addr, "short", 0);
    assert!(!present, "expired while the broker was down");
    // The middle one had 5 s from when it went offline, not 5 s from the restart: by 6 s
    // after it left, it is gone.
    let due = left_at + Duration::from_secs(6);
    std::thread::sleep(due.saturating_duration_since(Instant::now()));
    let (_, present) = Raw::connect(b.addr, "middle", 0);
    assert!(!present, "the restart did not give it a fresh interval");
    let (_, present) = Raw::connect(b.addr, "long", 3600);
    assert!(present, "an hour left: still there");
}

/// The broker's state file and the saga journal share the state directory without touching
/// each other: `edgebus up` with both, an order saga run, a retained message and a persistent
/// session, a SIGKILL, and everything back.
#[test]
fn the_state_file_sits_beside_the_saga_journal() {
    let dir = TempDir::new("beside");
    let state = dir.0.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let cfg = dir.file(
        "topics.toml",
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../topics.toml"))
            .expect("shipped topics.toml")
            .replace("listen = \"127.0.0.1:1883\"", "listen = \"127.0.0.1:0\""),
    );
    let run = || {
        let mut cmd = edgebus();
        cmd.arg("up")
            .arg("-c")
            .arg(&cfg)
            .env("STATE_DIRECTORY", &state);
        start_up(cmd, true)
    };
    let (up, addr) = run();
    let port = addr.port().to_string();
    let (ok, out) = publish(&port, &["-t", "site/mode", "-m", "eco", "-r", "-q", "1"]);
    assert!(ok, "{out}");
    let (mut c, _) = Raw::connect(addr, "durable-watcher", 3600);
    c.subscribe("site/#", 1);
    drop(c);
    let (ok, out) = rr(
        &port,
        &[
            "-t",
            "edge/saga/order/request",
            "-e",
            "test/saga/reply",
            "-m",
            r#"{"order":"beside","qty":1}"#,
            "-W",
            "10",
        ],
    );
    assert!(ok && out.contains(r#""status":"completed""#), "{out}");
    for file in [crate::harness::STATE_FILE, "sagas.journal"] {
        assert!(state.join(file).exists(), "{file} in {}", state.display());
    }
    drop(up);
    let (_up, addr) = run();
    let port = addr.port().to_string();
    let (ok, out) = run_tool(
        "mosquitto_sub",
        &port,
        &["-t", "site/mode", "-C", "1", "-W", "5"],
    );
    assert!(ok && out.trim() == "eco", "{out}");
    let (_, present) = Raw::connect(addr, "durable-watcher", 3600);
    assert!(present, "the persistent session is back");
}

/// Connects a persistent MQTT 5 session `id` whose Last Will (retained, on `w/{id}`) has the
/// Will Delay Interval `delay`, and drops the connection without DISCONNECT.
fn leave_with_delayed_will(addr: SocketAddr, id: &str, delay: u32) {
    let mut s = raw(addr);
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut props = vec![0x11];
    props.extend_from_slice(&3600u32.to_be_bytes());
    let mut will_props = vec![0x18];
    will_props.extend_from_slice(&delay.to_be_bytes());
    let topic = format!("w/{id}");
    let c = pkt::Connect {
        v5: true,
        client_id: id,
        keep_alive: 60,
        persistent: true,
        props: &props,
        will: Some((topic.as_bytes(), b"gone", true)),
        will_props: &will_props,
        ..Default::default()
    };
    send(&mut s, &c.bytes());
    let (b1, body) = pkt::read(&mut s).expect("CONNACK");
    assert_eq!((b1, body[1]), (0x20, 0), "accepted");
}

/// A delayed Last Will is stored with its session: one that fell due while the broker was
/// down is published when it starts, one due later is published when due, and one whose
/// client came back is cancelled.
#[test]
fn delayed_wills_survive_a_restart() {
    let dir = TempDir::new("wills");
    let state = dir.0.join("state");
    let (b, _) = durable_broker(&dir, &state, "50ms");
    let left = Instant::now();
    for (id, delay) in [("early", 1), ("later", 5), ("back", 60)] {
        leave_with_delayed_will(b.addr, id, delay);
    }
    // Each will is recorded once the broker has seen its connection close.
    let file = state.join(STATE_FILE);
    let deadline = Instant::now() + T;
    let recorded = |d: &[u8]| {
        [&b"w/early"[..], b"w/later", b"w/back"]
            .iter()
            .all(|t| d.windows(t.len()).any(|w| w == *t))
    };
    while !std::fs::read(&file).is_ok_and(|d| recorded(&d)) {
        assert!(
            Instant::now() < deadline,
            "the wills never reached the file"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop(b, "KILL");
    // `early` falls due while the broker is down.
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(left.elapsed()));
    let (b, log) = durable_broker(&dir, &state, "50ms");
    let restored = line(&log, "restored");
    assert!(restored.contains("3 delayed wills"), "{restored}");
    let port = b.port();
    let sub = Sub::start(&port, &["-t", "w/#", "-v"]);
    assert_eq!(
        sub.next(T).as_deref(),
        Some("w/early gone"),
        "due while the broker was down: published when it started"
    );
    let (_, present) = Raw::connect(b.addr, "back", 3600);
    assert!(present);
    let later = sub.next(T);
    assert_eq!(later.as_deref(), Some("w/later gone"));
    assert!(
        left.elapsed() >= Duration::from_secs(5),
        "`later` came {:?} after its client left, before its 5 s delay",
        left.elapsed()
    );
    assert_eq!(
        sub.drain(Duration::from_millis(500)),
        Vec::<String>::new(),
        "the will of the session its client took back was cancelled"
    );
}

/// Compaction rewrites the file from the router's sessions: 5,000 messages of 1 KiB through a
/// connected persistent session grow the file past its bound and it is compacted; then 100
/// messages queued while the subscriber is away survive a SIGKILL, and nothing else comes.
#[test]
fn a_compacted_file_keeps_the_sessions() {
    let dir = TempDir::new("compact");
    let state = dir.0.join("state");
    let (b, _) = durable_broker(&dir, &state, "5ms");
    let addr = b.addr;
    let (mut sub, _) = Raw::connect(addr, "steady", 3600);
    sub.subscribe("c/#", 1);
    let feeder = std::thread::spawn(move || {
        let (mut p, _) = Raw::connect(addr, "bulk", 0);
        p.publish_padded("c/bulk", 1, 1..=5000, 1024);
    });
    let mut rels = Vec::new();
    for n in 1..=5000u32 {
        let g = sub.next_publish(&mut rels);
        assert!(g.payload.starts_with(&format!("{n} ")), "in order");
        sub.ack(0x40, g.pkid);
    }
    feeder.join().expect("feeder");
    send(&mut sub.0, &[0xc0, 0]);
    pkt::read_kind(&mut sub.0, 13).expect("PINGRESP");
    b.proc.expect_line("state file compacted", T);
    drop(sub);
    let (mut p, _) = Raw::connect(addr, "bulk", 0);
    p.publish_all("c/tail", 1, 1..=100);
    stop(b, "KILL");
    let (b, log) = durable_broker(&dir, &state, "5ms");
    let restored = line(&log, "restored");
    assert!(
        restored.contains("1 sessions (100 queued messages,"),
        "{restored}"
    );
    let (mut sub, present) = Raw::connect(b.addr, "steady", 3600);
    assert!(present);
    let got: Vec<String> = (0..100)
        .map(|_| sub.next_publish(&mut rels).payload)
        .collect();
    let want: Vec<String> = (1..=100).map(|n| n.to_string()).collect();
    assert_eq!(got, want);
    sub.0
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    assert!(
        pkt::read(&mut sub.0).is_none(),
        "nothing acknowledged comes back"
    );
}
