//! The broker against hostile clients: Last Wills that try to publish what their client may
//! not, a client id used to reach another user's session, one client holding every
//! connection, acknowledgements the broker does not expect, packets the specification says to
//! close on, skipped messages of a resuming session, and log lines a client can flood.

use std::process::Command;
use std::time::Duration;

use crate::harness::packet::{self, Connect};
use crate::harness::*;

const T: Duration = Duration::from_secs(5);

/// A CONNACK as the broker sends it: (reason or return code, session present).
fn connack(s: &mut std::net::TcpStream) -> Option<(u8, bool)> {
    let (b1, body) = packet::read(s)?;
    assert_eq!(b1, 0x20, "not a CONNACK: {b1:#x} {body:?}");
    Some((body[1], body[0] == 1))
}

/// Connects by hand and returns the CONNACK's code (None: closed without one).
fn try_connect(b: &Broker, c: &Connect<'_>) -> Option<u8> {
    let mut s = raw(b.addr);
    send(&mut s, &c.bytes());
    connack(&mut s).map(|(code, _)| code)
}

/// A broker with users mallory and bob, each allowed their own tree, and anyone `edge/#`.
fn two_users(dir: &TempDir) -> Broker {
    let pw = password_file(dir, &[("mallory", "m-pw"), ("bob", "b-pw")]);
    Broker::start_with(&format!(
        r##"
[broker.auth]
password_file = "{}"
[broker.acl]
default = "deny"
[[broker.acl.rule]]
user = "mallory"
topic = "users/mallory/#"
access = "readwrite"
[[broker.acl.rule]]
user = "bob"
topic = "bob/#"
access = "readwrite"
[[broker.acl.rule]]
topic = "edge/#"
access = "readwrite"
"##,
        pw.display()
    ))
}

/// A Last Will is a PUBLISH the broker makes for the client, so it gets a PUBLISH's checks at
/// CONNECT: the ACL and `$` topics (refused as not authorized: 3.1.1 return code 0x05,
/// §3.2.2.3; MQTT 5 reason 0x87, §3.2.2.2), and the topic grammar: a UTF-8 string
/// [MQTT-3.1.3-10] without U+0000 [MQTT-1.5.4-2], a topic name without wildcards
/// [MQTT-3.3.2-2] (3.1.1: the connection is closed; MQTT 5: CONNACK 0x90).
#[test]
fn a_last_will_passes_the_checks_of_a_publish() {
    let dir = TempDir::new("will");
    let b = two_users(&dir);
    let p = b.port();
    let bob = Sub::start(&p, &["-u", "bob", "-P", "b-pw", "-t", "bob/#", "-q", "1"]);
    let mine = Sub::start(
        &p,
        &["-u", "mallory", "-P", "m-pw", "-t", "users/mallory/#"],
    );
    let everything = Sub::start(&p, &["-t", "edge/w/#", "-V", "mqttv5"]);

    // Mallory's will on bob's topic, retained: refused, for both versions; the socket then
    // dropped as a crashed client would (the will would fire now if it had been accepted).
    for v5 in [false, true] {
        let c = Connect {
            v5,
            client_id: "mallory-1",
            keep_alive: 30,
            will: Some((b"bob/private/will", b"gotcha", true)),
            username: Some("mallory"),
            password: Some("m-pw"),
            ..Connect::default()
        };
        let code = try_connect(&b, &c);
        assert_eq!(code, Some(if v5 { 0x87 } else { 0x05 }), "v5 {v5}");
    }
    b.proc.expect_line("Last Will refused", T);
    // Her will on her own tree is accepted, and fires when she drops.
    let c = Connect {
        client_id: "mallory-2",
        keep_alive: 30,
        will: Some((b"users/mallory/status", b"gone", false)),
        username: Some("mallory"),
        password: Some("m-pw"),
        ..Connect::default()
    };
    assert_eq!(try_connect(&b, &c), Some(0));
    assert_eq!(mine.next(T).as_deref(), Some("users/mallory/status gone"));

    // Poison topics, from an anonymous loopback client (the default config's client).
    for topic in [
        &b"edge/w/a\0b"[..],
        b"edge/w/#",
        b"edge/w/+/x",
        "edge/w/\u{ffff}".as_bytes(),
    ] {
        for v5 in [false, true] {
            let c = Connect {
                v5,
                client_id: "poison",
                keep_alive: 30,
                will: Some((topic, b"x", true)),
                ..Connect::default()
            };
            let code = try_connect(&b, &c);
            assert_eq!(
                code,
                if v5 { Some(0x90) } else { None },
                "will topic {topic:?}, v5 {v5}"
            );
        }
    }
    let c = Connect {
        v5: true,
        client_id: "dollar",
        keep_alive: 30,
        will: Some((b"$SYS/x", b"x", true)),
        ..Connect::default()
    };
    assert_eq!(try_connect(&b, &c), Some(0x87), "a `$` will topic");

    // Nothing reached bob, nothing was retained, and the wildcard subscriber never dropped:
    // its first message is the one published now.
    assert_eq!(bob.next(Duration::from_millis(300)), None, "bob got a will");
    let (ok, out) = publish(&p, &["-t", "edge/w/after", "-m", "fine"]);
    assert!(ok, "{out}");
    assert_eq!(everything.next(T).as_deref(), Some("edge/w/after fine"));
    let (_, retained) = run_tool(
        "mosquitto_sub",
        &p,
        &[
            "-t",
            "#",
            "-u",
            "bob",
            "-P",
            "b-pw",
            "--retained-only",
            "-W",
            "1",
        ],
    );
    assert!(!retained.contains("gotcha"), "{retained}");
}

/// A client id is not a key to another user's session. With persistent sessions (3.1.1
/// clean session 0), mallory connecting with bob's client id while bob is offline gets a
/// session of her own: none of bob's subscriptions, none of his queued messages. While she
/// holds the id, bob's CONNECT with it is refused as not authorized (the broker's checks of
/// a CONNECT [MQTT-3.1.4-2]); once she leaves, bob resumes his session with everything
/// queued for him.
#[test]
fn a_client_id_never_carries_a_session_to_another_user() {
    let dir = TempDir::new("owner");
    let b = two_users(&dir);
    let p = b.port();
    const BOB: [&str; 4] = ["-u", "bob", "-P", "b-pw"];
    let as_bob =
        |args: &[&str]| -> Vec<String> { BOB.iter().chain(args).map(|a| a.to_string()).collect() };
    let bob_publish = |m: &str| {
        let args = as_bob(&["-t", "bob/private/x", "-m", m, "-q", "1"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        publish(&p, &args)
    };
    let bob_args = as_bob(&["-c", "-i", "shared-id", "-q", "1", "-t", "bob/private/#"]);
    let bob_args: Vec<&str> = bob_args.iter().map(String::as_str).collect();
    drop(Sub::start(&p, &bob_args));
    for i in 0..3 {
        let (ok, out) = bob_publish(&format!("m{i}"));
        assert!(ok, "{out}");
    }
    let mallory = Sub::start(
        &p,
        &[
            "-u",
            "mallory",
            "-P",
            "m-pw",
            "-c",
            "-i",
            "shared-id",
            "-q",
            "1",
            "-t",
            "users/mallory/x",
        ],
    );
    assert_eq!(
        mallory.next(Duration::from_millis(500)),
        None,
        "the intruder got bob's queued messages"
    );
    // bob's own publish while mallory holds the id: his subscription is not hers.
    assert!(bob_publish("m3").0);
    assert_eq!(
        mallory.next(Duration::from_millis(500)),
        None,
        "bob's subscription delivered to the intruder"
    );
    let args = as_bob(&["-i", "shared-id", "-t", "bob/x", "-m", "x"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = publish(&p, &args);
    assert!(!ok && out.contains("not authorised"), "{out}");
    b.proc
        .expect_line("client id is connected under another identity", T);
    drop(mallory);

    let bob = Sub::start_nowait(&p, &bob_args);
    let got = bob.drain(Duration::from_millis(700));
    assert_eq!(
        got,
        (0..4)
            .map(|i| format!("bob/private/x m{i}"))
            .collect::<Vec<_>>(),
        "bob's session lost something"
    );
}

/// Opens `n` MQTT 3.1.1 connections (keep-alive 0, anonymous) from a process running as
/// `nobody`, and holds them until dropped.
fn hold_as_nobody(port: &str, n: usize) -> Proc {
    let connect = r"\x10\x0c\x00\x04MQTT\x04\x02\x00\x00\x00\x00";
    let script = format!(
        "for i in $(seq {n}); do exec {{fd}}<>/dev/tcp/127.0.0.1/{port} && printf '{connect}' >&$fd; done; \
         echo held; exec sleep 600"
    );
    let mut cmd = Command::new("bash");
    cmd.args([
        "-c",
        &format!(
            "ulimit -n {}; exec setpriv --reuid=65534 --regid=65534 --clear-groups bash -c \"$0\"",
            n + 64
        ),
        &script,
    ]);
    let p = Proc::spawn(cmd);
    p.expect_line("held", Duration::from_secs(30));
    p
}

/// A mosquitto client run as `nobody`: another local user than the broker's.
fn as_nobody(tool: &str, port: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        tool,
        "-p",
        port,
    ])
    .args(args);
    let mut p = Proc::spawn(cmd);
    let ok = p.wait_exit(T).is_some_and(|s| s.success());
    let out: Vec<String> = p.lines.try_iter().collect();
    (ok, out.join("\n"))
}

/// One local user holding 1,024 idle connections (the default `max_connections`) gets
/// `max_connections_per_address` of them; the bus's parts (the broker's own user), other
/// addresses and authenticated clients still get in, and the refusals are logged a line a
/// second, not a line each. With a small `max_connections`, the reserve keeps the last slots
/// for authenticated clients and the broker's own user.
#[test]
fn one_client_cannot_take_every_connection() {
    let b = Broker::start();
    let p = b.port();
    let _held = hold_as_nobody(&p, 1024);
    let s = wait_stats(&p, "960 refusals", |s| s["refused"].as_u64() >= Some(960));
    assert!(s["connections"].as_u64() <= Some(64 + 2), "{s}");
    // A bus part: `edgebus service echo`, as the broker's own user, answers a request.
    let echo = Service::start("echo", b.addr, &[]);
    let (ok, out) = rr(
        &p,
        &[
            "-t",
            "edge/echo/echo/request",
            "-e",
            "t/r",
            "-m",
            "{\"a\":1}",
            "-W",
            "5",
        ],
    );
    assert!(ok && out.contains("\"a\""), "{out}");
    // Another address (127.0.0.2 is loopback too) has slots of its own.
    let (ok, out) = as_nobody(
        "mosquitto_pub",
        &p,
        &["-A", "127.0.0.2", "-t", "edge/x", "-m", "x"],
    );
    assert!(ok, "another address refused: {out}");
    // The same local user from the same address is refused.
    let (ok, out) = as_nobody("mosquitto_pub", &p, &["-t", "edge/x", "-m", "x"]);
    assert!(!ok && out.contains("unavailable"), "{out}");
    let lines: Vec<String> = b.proc.lines.try_iter().collect();
    let refusals = lines
        .iter()
        .filter(|l| l.contains("connection limit reached"))
        .count();
    assert!(
        (1..=10).contains(&refusals),
        "{refusals} refusal lines:\n{}",
        lines.join("\n")
    );
    drop(echo);

    // The reserve: 40 connections, a quarter of them kept.
    let dir = TempDir::new("reserve");
    let pw = password_file(&dir, &[("alice", "a-pw")]);
    let b = Broker::start_with(&format!(
        "max_connections = 40\n[broker.auth]\npassword_file = \"{}\"\n",
        pw.display()
    ));
    let p = b.port();
    let _held = hold_as_nobody(&p, 60);
    wait_stats(&p, "30 refusals", |s| s["refused"].as_u64() >= Some(30));
    let alice = Sub::start(&p, &["-u", "alice", "-P", "a-pw", "-t", "edge/r"]);
    let _echo = Service::start("echo", b.addr, &[]);
    let (ok, out) = as_nobody(
        "mosquitto_pub",
        &p,
        &["-A", "127.0.0.2", "-t", "edge/x", "-m", "x"],
    );
    assert!(
        !ok && out.contains("unavailable"),
        "an anonymous client took the reserve: {out}"
    );
    let (ok, out) = publish(
        &p,
        &["-u", "alice", "-P", "a-pw", "-t", "edge/r", "-m", "in"],
    );
    assert!(ok, "{out}");
    assert_eq!(alice.next(T).as_deref(), Some("edge/r in"));
}

/// Acknowledgements for packet ids the broker never used, and PUBACKs in another order than
/// the PUBLISHes, keep the connection: an unknown PUBACK or PUBCOMP is ignored, an unknown
/// PUBREC gets PUBREL and an unknown PUBREL gets PUBCOMP (MQTT 5: reason 0x92, §3.6.2.1,
/// §3.7.2.1; §4.3.3: a PUBREL is answered with a PUBCOMP), and acknowledgements in another
/// order than the PUBLISHes are taken as they come: the order is the client's duty
/// [MQTT-4.6.0-2], and mosquitto tolerates any order too.
#[test]
fn unexpected_and_reordered_acknowledgements_keep_the_connection() {
    let b = Broker::start();
    let p = b.port();
    for v5 in [false, true] {
        let mut s = raw(b.addr);
        let c = Connect {
            v5,
            client_id: "acks",
            keep_alive: 30,
            ..Connect::default()
        };
        send(&mut s, &c.bytes());
        assert_eq!(connack(&mut s), Some((0, false)));
        send(&mut s, &packet::frame(0x40, &[0, 77])); // PUBACK
        send(&mut s, &packet::frame(0x70, &[0, 79])); // PUBCOMP
        send(&mut s, &packet::frame(0x50, &[0, 78])); // PUBREC
        let (b1, body) = packet::read(&mut s).expect("PUBREL for an unknown PUBREC");
        assert_eq!((b1, &body[..2]), (0x62, &[0, 78][..]));
        if v5 {
            assert_eq!(body.get(2), Some(&0x92), "{body:?}");
        }
        send(&mut s, &packet::frame(0x62, &[0, 80])); // PUBREL
        let (b1, body) = packet::read(&mut s).expect("PUBCOMP for an unknown PUBREL");
        assert_eq!((b1, &body[..2]), (0x70, &[0, 80][..]));
        if v5 {
            assert_eq!(body.get(2), Some(&0x92), "{body:?}");
        }

        // Three QoS 1 messages, acknowledged last first.
        send(&mut s, &packet::subscribe(v5, 1, &[("edge/ooo", 1)]));
        packet::read_kind(&mut s, 9).expect("SUBACK");
        for i in 0..3 {
            let (ok, out) = publish(&p, &["-t", "edge/ooo", "-m", &format!("m{i}"), "-q", "1"]);
            assert!(ok, "{out}");
        }
        let mut ids = Vec::new();
        for _ in 0..3 {
            let (b1, body) = packet::read_kind(&mut s, 3).expect("PUBLISH");
            assert_eq!((b1 >> 1) & 3, 1, "QoS 1");
            let at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
            ids.push([body[at], body[at + 1]]);
        }
        for id in ids.iter().rev() {
            send(&mut s, &packet::frame(0x40, id));
        }
        send(&mut s, &[0xc0, 0]);
        assert_eq!(
            packet::read_kind(&mut s, 13).map(|p| p.0),
            Some(0xd0),
            "closed (v5 {v5})"
        );
        let (ok, _) = publish(&p, &["-t", "edge/ooo", "-m", "after", "-q", "1"]);
        assert!(ok);
        let (_, body) = packet::read_kind(&mut s, 3).expect("delivery goes on");
        assert!(body.ends_with(b"after"), "{body:?}");
        send(&mut s, &[0xe0, 0]);
    }
}

/// Packets the specification says to close the connection on, each closing its connection
/// while the listener serves a fresh client after it.
#[test]
fn packets_the_specification_refuses_close_the_connection() {
    let b = Broker::start();
    let connects: Vec<(&str, Connect)> = vec![
        (
            "[MQTT-3.1.2-3] reserved flag",
            Connect {
                extra_flags: 0x01,
                ..Connect::default()
            },
        ),
        (
            "[MQTT-3.1.2-22] password without user name",
            Connect {
                password: Some("p"),
                ..Connect::default()
            },
        ),
        (
            "§3.1.2.11.3 Receive Maximum 0",
            Connect {
                v5: true,
                props: &[0x21, 0, 0],
                ..Connect::default()
            },
        ),
        (
            "§3.1.2.11.4 Maximum Packet Size 0",
            Connect {
                v5: true,
                props: &[0x27, 0, 0, 0, 0],
                ..Connect::default()
            },
        ),
        (
            "§3.1.2.11.2 Session Expiry Interval twice",
            Connect {
                v5: true,
                props: &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 1],
                ..Connect::default()
            },
        ),
    ];
    for (rule, c) in connects {
        let c = Connect {
            client_id: "strict",
            keep_alive: 30,
            ..c
        };
        let mut s = raw(b.addr);
        send(&mut s, &c.bytes());
        let code = connack(&mut s);
        assert!(
            matches!(code, None | Some((0x81..=0x82, _))),
            "{rule}: {code:?}"
        );
        assert!(closed_by_peer(&mut s), "{rule}: left open");
    }
    let ffff = "edge/\u{ffff}".as_bytes();
    let after_connect: Vec<(&str, bool, Vec<u8>)> = vec![
        (
            "§3.3.2.3 Message Expiry Interval twice",
            true,
            packet::publish(true, 0, 0, b"edge/x", &[2, 0, 0, 0, 1, 2, 0, 0, 0, 1], b"x"),
        ),
        (
            "[MQTT-3-8.3-4] SUBSCRIBE reserved option bits",
            false,
            packet::subscribe(false, 1, &[("edge/x", 0x41)]),
        ),
        (
            "[MQTT-3.8.3-5] SUBSCRIBE reserved option bits",
            true,
            packet::subscribe(true, 1, &[("edge/x", 0xc1)]),
        ),
        ("[MQTT-3.8.1-1] SUBSCRIBE flags 0", false, {
            let mut p = packet::subscribe(false, 1, &[("edge/x", 0)]);
            p[0] = 0x80;
            p
        }),
        (
            "[MQTT-2.3.1-1] SUBSCRIBE packet id 0",
            false,
            packet::subscribe(false, 0, &[("edge/x", 0)]),
        ),
        (
            "[MQTT-1.5.4-1] topic with U+FFFF",
            false,
            packet::publish(false, 0, 0, ffff, &[], b"x"),
        ),
        (
            "[MQTT-1.5.4-1] topic with U+FFFF",
            true,
            packet::publish(true, 0, 0, ffff, &[], b"x"),
        ),
    ];
    for (rule, v5, bad) in after_connect {
        let mut s = raw(b.addr);
        let c = Connect {
            v5,
            client_id: "strict",
            keep_alive: 30,
            ..Connect::default()
        };
        send(&mut s, &c.bytes());
        assert_eq!(connack(&mut s), Some((0, false)), "{rule}");
        send(&mut s, &bad);
        assert!(closed_by_peer(&mut s), "{rule}: left open");
    }
    b.proc.expect_line("non-character", T);
    assert_exchange(&b.port(), "strict");
}

/// A persistent session whose queue filled while it was offline loses what did not fit, and
/// every one of those is counted in the stats and in a lag report naming the client:
/// received + dropped = published, in every trial.
#[test]
fn skipped_messages_of_a_resumed_session_are_all_counted() {
    let b = Broker::start_with("max_queued_messages = 25");
    let p = b.port();
    let lag = Sub::start(&p, &["-t", "edge/system/broker/lag"]);
    let body = "x".repeat(64);
    let mut skipped_before = 0;
    for trial in 0..6 {
        let id = format!("lagger-{trial}");
        let topic = format!("edge/lag/{trial}");
        let args = ["-c", "-i", &id, "-q", "1", "-t", &topic];
        drop(Sub::start(&p, &args));
        let (ok, out) = publish(
            &p,
            &["-t", &topic, "-m", &body, "-q", "1", "--repeat", "100"],
        );
        assert!(ok, "{out}");
        let resumed = Sub::start_nowait(&p, &args);
        let received = resumed.drain(Duration::from_millis(700)).len() as u64;
        let want = 100 - received;
        let s = wait_stats(&p, "the skips", |s| {
            s["dropped"]["slow_subscriber"].as_u64() >= Some(skipped_before + want)
        });
        let skipped = s["dropped"]["slow_subscriber"].as_u64().unwrap_or(0) - skipped_before;
        skipped_before += skipped;
        assert!(
            skipped > 0,
            "trial {trial}: nothing skipped; the test does not test"
        );
        assert_eq!(
            received + skipped,
            100,
            "trial {trial}: received {received}, skipped {skipped}"
        );
        let mut reported = 0;
        while reported < skipped {
            let line = lag
                .next(T)
                .unwrap_or_else(|| panic!("trial {trial}: lag reports stop at {reported}"));
            let r = json_of(&line);
            assert_eq!(r["client_id"], id.as_str(), "{line}");
            reported += r["lost"].as_u64().unwrap_or(0);
        }
        assert_eq!(reported, skipped, "trial {trial}");
    }
}

/// A client that stops reading is a WARN (its messages stop); a SUBSCRIBE refusing 2,000
/// filters is one line with counts; a 64 KiB client id is cut short in the log.
#[test]
fn what_clients_do_is_logged_once_and_short() {
    let b = Broker::start_with("write_timeout = \"1s\"");
    let p = b.port();

    let mut s = raw(b.addr);
    send(&mut s, &connect_v311("refused-filters", 30));
    connack(&mut s);
    let filters: Vec<String> = (0..2000).map(|i| format!("$x/{i}")).collect();
    let refs: Vec<(&str, u8)> = filters.iter().map(|f| (f.as_str(), 0)).collect();
    send(&mut s, &packet::subscribe(false, 1, &refs));
    let (_, suback) = packet::read_kind(&mut s, 9).expect("SUBACK");
    assert_eq!(suback.len(), 2 + 2000);
    let line = b.proc.expect_line("subscriptions refused", T);
    assert!(line.contains("refused=2000"), "{line}");
    assert!(
        b.proc
            .find_line("subscriptions refused", Duration::from_millis(300))
            .is_none(),
        "a line per filter"
    );

    let long = "y".repeat(65_000);
    let c = Connect {
        client_id: &long,
        keep_alive: 30,
        ..Connect::default()
    };
    let mut s = raw(b.addr);
    send(&mut s, &c.bytes());
    assert_eq!(connack(&mut s), Some((0x02, false)));
    let line = b.proc.expect_line("invalid client id", T);
    assert!(line.len() < 600, "{} bytes: {}", line.len(), &line[..200]);

    // A subscriber that reads nothing while 16 MB are sent to it.
    let mut stalled = raw(b.addr);
    send(&mut stalled, &connect_v311("stalled", 0));
    connack(&mut stalled);
    send(
        &mut stalled,
        &packet::subscribe(false, 1, &[("edge/flood", 0)]),
    );
    packet::read_kind(&mut stalled, 9).expect("SUBACK");
    let dir = TempDir::new("flood");
    let big = dir.file("big", &"z".repeat(200 * 1024));
    let (ok, out) = publish(
        &p,
        &[
            "-t",
            "edge/flood",
            "-f",
            big.to_str().expect("utf-8"),
            "--repeat",
            "80",
        ],
    );
    assert!(ok, "{out}");
    let line = b.proc.expect_line("client stopped reading", T);
    assert!(line.contains("WARN"), "{line}");
    assert!(
        closed_by_peer(&mut stalled),
        "the stalled client was not closed"
    );
}
