//! `edgebus broker` against mosquitto's clients, rumqttc and hand-made packets.

use std::time::Duration;

use crate::harness::*;

const T: Duration = Duration::from_secs(5);

#[test]
fn v311_and_v5_share_one_port() {
    let b = Broker::start();
    let p = b.port();
    let s4 = Sub::start(&p, &["-t", "edge/mix/#", "-V", "mqttv311"]);
    let s5 = Sub::start(&p, &["-t", "edge/mix/#", "-V", "mqttv5"]);
    assert!(publish(&p, &["-t", "edge/mix/a", "-m", "from-v4", "-V", "mqttv311"]).0);
    assert!(publish(&p, &["-t", "edge/mix/b", "-m", "from-v5", "-V", "mqttv5"]).0);
    for s in [&s4, &s5] {
        assert_eq!(s.next(T).as_deref(), Some("edge/mix/a from-v4"));
        assert_eq!(s.next(T).as_deref(), Some("edge/mix/b from-v5"));
    }
}

#[test]
fn v5_properties_never_reach_a_v311_subscriber() {
    let b = Broker::start();
    let p = b.port();
    let s4 = Sub::start(
        &p,
        &["-t", "edge/props/#", "-V", "mqttv311", "-i", "plain-sub"],
    );
    let (ok, out) = publish(
        &p,
        &[
            "-t",
            "edge/props/x",
            "-m",
            "with-props",
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-D",
            "publish",
            "user-property",
            "k",
            "v",
            "-D",
            "publish",
            "response-topic",
            "edge/props/reply",
            "-D",
            "publish",
            "correlation-data",
            "abc",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(s4.next(T).as_deref(), Some("edge/props/x with-props"));
    // Still connected: a second message arrives on the same subscription.
    assert!(
        publish(
            &p,
            &[
                "-t",
                "edge/props/y",
                "-m",
                "again",
                "-V",
                "mqttv5",
                "-D",
                "publish",
                "user-property",
                "a",
                "b"
            ]
        )
        .0
    );
    assert_eq!(s4.next(T).as_deref(), Some("edge/props/y again"));
    // The record is refreshed every 200 ms in tests; wait for one taken after the publishes.
    let stats = Sub::start(&p, &["-t", "edge/system/broker/stats"]);
    stats.0.expect_line("\"properties_stripped\":2", T);
    assert_exchange(&p, "props");
}

#[test]
fn retained_and_cleared() {
    let b = Broker::start();
    let p = b.port();
    assert!(publish(&p, &["-t", "edge/ret/a", "-m", "kept", "-r", "-q", "1"]).0);
    let late = Sub::start(&p, &["-t", "edge/ret/#", "-V", "mqttv5"]);
    assert_eq!(late.next(T).as_deref(), Some("edge/ret/a kept"));
    assert!(publish(&p, &["-t", "edge/ret/a", "-n", "-r", "-q", "1"]).0);
    let later = Sub::start(&p, &["-t", "edge/ret/#"]);
    assert_eq!(
        later.next(Duration::from_millis(500)),
        None,
        "cleared retained message came back"
    );
}

#[test]
fn last_will_on_sigkill() {
    let b = Broker::start();
    let p = b.port();
    let watcher = Sub::start(&p, &["-t", "edge/will/#", "-q", "1"]);
    let victim = Sub::start(
        &p,
        &[
            "-t",
            "edge/nothing",
            "-i",
            "victim",
            "--will-topic",
            "edge/will/victim",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
        ],
    );
    victim.0.signal("KILL");
    assert_eq!(watcher.next(T).as_deref(), Some("edge/will/victim gone"));
    // A clean disconnect sends no will.
    let (ok, _) = publish(
        &p,
        &[
            "-t",
            "edge/x",
            "-m",
            "x",
            "--will-topic",
            "edge/will/clean",
            "--will-payload",
            "no",
        ],
    );
    assert!(ok);
    assert_eq!(watcher.next(Duration::from_millis(500)), None);
}

#[test]
fn shared_subscriptions_split_and_groups_stay_per_filter() {
    let b = Broker::start();
    let p = b.port();
    let a = Sub::start(
        &p,
        &["-t", "$share/workers/edge/jobs", "-q", "1", "-V", "mqttv5"],
    );
    let c = Sub::start(
        &p,
        &[
            "-t",
            "$share/workers/edge/jobs",
            "-q",
            "1",
            "-V",
            "mqttv311",
        ],
    );
    // The same group name on another filter must not steal messages (a rumqttd bug).
    let other = Sub::start(&p, &["-t", "$share/workers/edge/other", "-q", "1"]);
    for i in 0..10 {
        assert!(
            publish(
                &p,
                &["-t", "edge/jobs", "-m", &format!("job{i}"), "-q", "1"]
            )
            .0
        );
        assert!(publish(&p, &["-t", "edge/other", "-m", &format!("o{i}"), "-q", "1"]).0);
    }
    let quiet = Duration::from_millis(700);
    let (ga, gc, go) = (a.drain(quiet), c.drain(quiet), other.drain(quiet));
    assert_eq!(ga.len() + gc.len(), 10, "a={ga:?} c={gc:?}");
    assert!(!ga.is_empty() && !gc.is_empty(), "a={ga:?} c={gc:?}");
    assert_eq!(go.len(), 10, "{go:?}");
}

#[test]
fn qos2_both_ways_and_unsubscribe_of_unknown_filter() {
    let b = Broker::start();
    let p = b.port();
    let s = Sub::start(&p, &["-t", "edge/q2", "-q", "2"]);
    assert!(publish(&p, &["-t", "edge/q2", "-m", "exactly-once", "-q", "2"]).0);
    assert_eq!(s.next(T).as_deref(), Some("edge/q2 exactly-once"));
    // rumqttd sends no UNSUBACK for a filter it never saw; mosquitto_sub -U would hang.
    let (ok, out) = run_tool(
        "mosquitto_sub",
        &p,
        &["-t", "edge/q2", "-U", "edge/never", "-E"],
    );
    assert!(ok, "{out}");
}

#[test]
fn rumqttc_v5_request_reply_with_properties() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
    let b = Broker::start();
    let addr = b.addr;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let mut o = MqttOptions::new("rc5", addr.ip().to_string(), addr.port());
        o.set_outgoing_inflight_upper_limit(100);
        let (c, mut el) = AsyncClient::new(o, 10);
        c.subscribe("edge/rc/#", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let props = PublishProperties {
            response_topic: Some("edge/rc/reply".into()),
            correlation_data: Some(bytes::Bytes::from_static(b"c-1")),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let mut published = false;
        let got = tokio::time::timeout(T, async {
            loop {
                match el.poll().await.expect("poll") {
                    Event::Incoming(Incoming::SubAck(_)) if !published => {
                        published = true;
                        c.publish_with_properties(
                            "edge/rc/req",
                            QoS::AtLeastOnce,
                            false,
                            "hi",
                            props.clone(),
                        )
                        .await
                        .expect("publish");
                    }
                    Event::Incoming(Incoming::Publish(p)) => return p,
                    _ => {}
                }
            }
        })
        .await
        .expect("publish came back");
        let props = got.properties.expect("properties kept for MQTT 5");
        assert_eq!(props.response_topic.as_deref(), Some("edge/rc/reply"));
        assert_eq!(props.correlation_data.as_deref(), Some(&b"c-1"[..]));
        assert_eq!(
            props.user_properties,
            vec![("k".to_string(), "v".to_string())]
        );
    });
}

#[test]
fn invalid_client_ids_are_refused_and_the_listener_lives() {
    let b = Broker::start();
    let p = b.port();
    for i in 0..20 {
        let id = ["bad/id", "a+b", "#"][i % 3];
        let (ok, out) = publish(&p, &["-i", id, "-t", "edge/x", "-m", "x"]);
        assert!(!ok, "id {id} accepted");
        assert!(out.contains("identifier rejected"), "{out}");
    }
    let (ok, out) = publish(
        &p,
        &["-i", "bad/id", "-t", "edge/x", "-m", "x", "-V", "mqttv5"],
    );
    assert!(!ok && out.contains("Identifier not valid"), "{out}");
    assert_exchange(&p, "bad-ids");
}

#[test]
fn max_connections_then_retry_with_the_same_id() {
    let b = Broker::start_with("max_connections = 3");
    let p = b.port();
    let held: Vec<Sub> = (0..3)
        .map(|i| Sub::start(&p, &["-t", "edge/held", "-i", &format!("held{i}")]))
        .collect();
    for _ in 0..2 {
        let (ok, out) = publish(&p, &["-i", "retry-me", "-t", "edge/x", "-m", "x"]);
        assert!(!ok, "fourth connection accepted: {out}");
        assert!(out.contains("unavailable"), "{out}");
    }
    drop(held);
    // Slots free up as the router hears of the closes.
    let deadline = std::time::Instant::now() + T;
    while !publish(&p, &["-i", "retry-me", "-t", "edge/x", "-m", "x"]).0 {
        assert!(
            std::time::Instant::now() < deadline,
            "listener never recovered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_exchange(&p, "max-connections");
}

#[test]
fn server_only_packets_random_bytes_and_keep_alive_zero() {
    let b = Broker::start();
    // A CONNACK as the first packet.
    let mut s = raw(b.addr);
    send(&mut s, &[0x20, 2, 0, 0]);
    assert!(closed_by_peer(&mut s), "CONNACK-first connection left open");
    // A server-only packet after a valid CONNECT, for each version's codec.
    for bad in [
        &[0x20u8, 2, 0, 0][..],
        &[0x90, 3, 0, 1, 0],
        &[0xb0, 2, 0, 1],
        &[0xd0, 0],
    ] {
        let mut s = raw(b.addr);
        send(&mut s, &connect_v311("rawbad", 30));
        send(&mut s, bad);
        assert!(
            closed_by_peer(&mut s),
            "server-only packet {bad:?} left the connection open"
        );
    }
    // Random bytes, before and after a CONNECT.
    for seed in 1..=40u64 {
        let mut s = raw(b.addr);
        if seed % 2 == 0 {
            send(&mut s, &connect_v311(&format!("noise{seed}"), 30));
        }
        send(&mut s, &noise(seed, 64 + (seed as usize * 37) % 900));
        drop(s);
    }
    // Keep-alive 0 is allowed by the spec.
    let mut s = raw(b.addr);
    send(&mut s, &connect_v311("ka0", 0));
    let mut ack = [0u8; 4];
    std::io::Read::read_exact(&mut s, &mut ack).expect("CONNACK for keep-alive 0");
    assert_eq!(ack, [0x20, 2, 0, 0]);
    assert_exchange(&b.port(), "garbage");
    assert!(
        b.proc
            .find_line("panicked", Duration::from_millis(100))
            .is_none(),
        "a task panicked"
    );
}

#[test]
fn oversize_payload_closes_only_that_connection() {
    let b = Broker::start_with("max_payload = \"1KiB\"");
    let p = b.port();
    let sub = Sub::start(&p, &["-t", "edge/big", "-q", "1"]);
    let big = "x".repeat(4096);
    let (ok, _) = publish(&p, &["-t", "edge/big", "-m", &big, "-q", "1"]);
    assert!(!ok, "oversize publish acknowledged");
    assert!(publish(&p, &["-t", "edge/big", "-m", "small", "-q", "1"]).0);
    assert_eq!(
        sub.next(T).as_deref(),
        Some("edge/big small"),
        "subscriber lost or oversize delivered"
    );
    b.proc.expect_line("exceeds max_payload", T);
}

#[test]
fn password_file_and_acl() {
    let dir = TempDir::new("auth");
    let pw = password_file(&dir, &[("alice", "wonder"), ("admin", "root-pw")]);
    let b = Broker::start_with(&format!(
        r##"
[broker.auth]
password_file = "{}"
anonymous = "deny"
[broker.acl]
default = "deny"
[[broker.acl.rule]]
user = "alice"
topic = "edge/%u/#"
access = "readwrite"
[[broker.acl.rule]]
user = "alice"
topic = "edge/alice/secret"
access = "deny"
[[broker.acl.rule]]
user = "admin"
topic = "#"
access = "read"
[[broker.acl.rule]]
user = "admin"
topic = "edge/bob/#"
access = "write"
"##,
        pw.display()
    ));
    let p = b.port();
    let alice = ["-u", "alice", "-P", "wonder"];
    // Authentication: good, bad, missing.
    let (ok, out) = publish(
        &p,
        &["-u", "alice", "-P", "nope", "-t", "edge/alice/x", "-m", "x"],
    );
    assert!(!ok && out.contains("bad user name or password"), "{out}");
    let (ok, out) = publish(&p, &["-t", "edge/alice/x", "-m", "x"]);
    assert!(!ok && out.contains("not authorised"), "{out}");
    let admin = Sub::start(
        &p,
        &[
            "-u",
            "admin",
            "-P",
            "root-pw",
            "-t",
            "edge/alice/#",
            "-t",
            "edge/bob/#",
            "-q",
            "1",
        ],
    );
    // Alice's credentials in front of a tool's own arguments.
    let as_alice = |args: &[&'static str]| [&alice[..], args].concat();
    // Subscribe: nothing of it readable, or all of it denied: refused.
    for filter in ["other/#", "edge/alice/secret"] {
        let s = Sub::start_nowait(&p, &as_alice(&["-t", filter]));
        s.0.expect_line("All subscription requests were denied", T);
    }
    // Partly readable (`edge/#` holds her tree; a deny inside hers): granted, and each
    // message checked against her rules as it is delivered.
    let wide = Sub::start(&p, &as_alice(&["-t", "edge/#", "-q", "1"]));
    let mine = Sub::start(&p, &as_alice(&["-t", "edge/alice/ok", "-q", "1"]));
    // Publish: denied (MQTT 5 gets reason 0x87), then allowed.
    let (_, out) = publish(
        &p,
        &as_alice(&[
            "-t",
            "edge/alice/secret",
            "-m",
            "s",
            "-q",
            "1",
            "-V",
            "mqttv5",
        ]),
    );
    assert!(out.contains("Not authorized"), "{out}");
    let (ok, out) = publish(
        &p,
        &as_alice(&["-t", "edge/alice/secret", "-m", "s", "-q", "2"]),
    );
    assert!(ok, "3.1.1 QoS 2 denial must complete: {out}");
    let (ok, out) = publish(&p, &as_alice(&["-t", "edge/bob/x", "-m", "b", "-q", "1"]));
    assert!(ok, "{out}");
    let (ok, out) = publish(
        &p,
        &as_alice(&["-t", "edge/alice/ok", "-m", "fine", "-q", "1"]),
    );
    assert!(ok, "{out}");
    assert_eq!(
        admin.next(T).as_deref(),
        Some("edge/alice/ok fine"),
        "a denied publish was delivered"
    );
    assert_eq!(mine.next(T).as_deref(), Some("edge/alice/ok fine"));
    let admin_pw = ["-u", "admin", "-P", "root-pw"];
    let (ok, out) = publish(
        &p,
        &[
            &admin_pw[..],
            &["-t", "edge/bob/x", "-m", "bob's", "-q", "1"],
        ]
        .concat(),
    );
    assert!(ok, "{out}");
    assert_eq!(admin.next(T).as_deref(), Some("edge/bob/x bob's"));
    assert_eq!(wide.next(T).as_deref(), Some("edge/alice/ok fine"));
    assert_eq!(
        wide.next(Duration::from_millis(300)),
        None,
        "a message she may not read reached her wildcard subscription"
    );
    b.proc.expect_line("publish refused", T);
}

#[test]
fn websocket_listener_survives_an_idle_socket() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let b = Broker::start_with("websocket = \"127.0.0.1:0\"");
    let ws = b.ws.expect("websocket address");
    let _idle = raw(ws);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let mut req = format!("ws://{ws}/mqtt")
            .into_client_request()
            .expect("request");
        req.headers_mut()
            .insert("sec-websocket-protocol", "mqtt".parse().expect("header"));
        let (mut conn, resp) = tokio::time::timeout(T, tokio_tungstenite::connect_async(req))
            .await
            .expect("handshake blocked by the idle socket")
            .expect("handshake");
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .map(|v| v.as_bytes()),
            Some(&b"mqtt"[..])
        );
        conn.send(Message::Binary(connect_v311("ws-client", 30).into()))
            .await
            .expect("send");
        let msg = tokio::time::timeout(T, conn.next())
            .await
            .expect("CONNACK in time")
            .expect("frame")
            .expect("ok");
        assert_eq!(msg.into_data().as_ref(), &[0x20, 2, 0, 0]);
    });
    assert_exchange(&b.port(), "websocket");
}

#[test]
fn sigterm_stops_within_two_seconds() {
    let mut b = Broker::start();
    let p = b.port();
    let _sub = Sub::start(&p, &["-t", "edge/#", "-V", "mqttv5"]);
    let t0 = std::time::Instant::now();
    b.proc.signal("TERM");
    let status = b
        .proc
        .wait_exit(Duration::from_secs(2))
        .expect("still running 2 s after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[test]
fn check_config_names_file_line_and_key() {
    let dir = TempDir::new("cfg");
    let bad = dir.file(
        "topics.toml",
        "[bus]\nprefix = \"edge\"\n\n[broker]\nmax_connections = \"lots\"\n",
    );
    let out = edgebus()
        .arg("check-config")
        .arg("-c")
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("topics.toml:5") && err.contains("broker.max_connections"),
        "{err}"
    );
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../topics.toml");
    let out = edgebus()
        .args(["check-config", "-c", shipped])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
