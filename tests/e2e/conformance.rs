//! MQTT as clients expect it: the broker's router against the specification, with hand-made
//! packets so that every flag and property is seen as sent. Each test names the normative
//! statements it checks.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::harness::packet::{self, Connect};
use crate::harness::*;

const T: Duration = Duration::from_secs(5);

/// A PUBLISH as received.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Pub {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    dup: bool,
    pkid: u16,
    alias: Option<u16>,
    sub_ids: Vec<u32>,
    expiry: Option<u32>,
}

fn varint(b: &[u8], at: &mut usize) -> u32 {
    let mut v = 0u32;
    for i in 0..4 {
        let x = b[*at];
        *at += 1;
        v |= u32::from(x & 0x7f) << (7 * i);
        if x & 0x80 == 0 {
            break;
        }
    }
    v
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// One MQTT connection, by hand.
struct Raw {
    s: TcpStream,
    v5: bool,
    /// Topic aliases the broker set (MQTT 5).
    aliases: std::collections::HashMap<u16, String>,
}

impl Raw {
    /// Connects; returns the client, the CONNACK code and Session Present.
    fn connect(addr: SocketAddr, c: Connect<'_>) -> (Raw, u8, bool) {
        let mut s = raw(addr);
        send(&mut s, &c.bytes());
        let (b1, body) = packet::read(&mut s).expect("CONNACK");
        assert_eq!(b1, 0x20, "{body:?}");
        let raw = Raw {
            s,
            v5: c.v5,
            aliases: Default::default(),
        };
        (raw, body[1], body[0] & 1 == 1)
    }

    fn v5(addr: SocketAddr, id: &str) -> Raw {
        let (r, code, _) = Raw::connect(
            addr,
            Connect {
                v5: true,
                client_id: id,
                keep_alive: 60,
                ..Connect::default()
            },
        );
        assert_eq!(code, 0);
        r
    }

    /// Subscribes (options byte per filter, subscription identifier); returns the codes.
    fn subscribe(&mut self, pkid: u16, filters: &[(&str, u8)], id: Option<u32>) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        if self.v5 {
            let props: Vec<u8> = id.map_or(Vec::new(), |i| vec![0x0b, i as u8]);
            body.extend(packet::props(&props));
        }
        for (f, o) in filters {
            body.extend(packet::field(f.as_bytes()));
            body.push(*o);
        }
        send(&mut self.s, &packet::frame(0x82, &body));
        let (_, ack) = packet::read_kind(&mut self.s, 9).expect("SUBACK");
        let skip = if self.v5 { 3 } else { 2 };
        ack[skip..].to_vec()
    }

    /// Publishes; QoS 1 waits for the PUBACK, QoS 2 completes the flow.
    fn publish(&mut self, topic: &str, qos: u8, retain: bool, props: &[u8], payload: &[u8]) {
        let pkid = 1 + (payload.len() as u16 % 100);
        let mut p = packet::publish(self.v5, qos, pkid, topic.as_bytes(), props, payload);
        if retain {
            p[0] |= 1;
        }
        send(&mut self.s, &p);
        match qos {
            1 => {
                packet::read_kind(&mut self.s, 4).expect("PUBACK");
            }
            2 => {
                packet::read_kind(&mut self.s, 5).expect("PUBREC");
                send(&mut self.s, &packet::frame(0x62, &pkid.to_be_bytes()));
                packet::read_kind(&mut self.s, 7).expect("PUBCOMP");
            }
            _ => {}
        }
    }

    /// The next PUBLISH within `wait`, decoded (aliases resolved).
    fn next(&mut self, wait: Duration) -> Option<Pub> {
        self.s.set_read_timeout(Some(wait)).expect("timeout");
        let got = packet::read_kind(&mut self.s, 3);
        self.s.set_read_timeout(Some(T)).expect("timeout");
        let (b1, body) = got?;
        let mut p = Pub {
            qos: (b1 >> 1) & 3,
            retain: b1 & 1 == 1,
            dup: b1 & 8 != 0,
            ..Pub::default()
        };
        let tlen = usize::from(u16_at(&body, 0));
        p.topic = String::from_utf8(body[2..2 + tlen].to_vec()).expect("topic");
        let mut at = 2 + tlen;
        if p.qos > 0 {
            p.pkid = u16_at(&body, at);
            at += 2;
        }
        if self.v5 {
            let len = varint(&body, &mut at) as usize;
            let end = at + len;
            while at < end {
                let id = body[at];
                at += 1;
                match id {
                    0x02 => {
                        p.expiry = Some(u32::from_be_bytes([
                            body[at],
                            body[at + 1],
                            body[at + 2],
                            body[at + 3],
                        ]));
                        at += 4;
                    }
                    0x23 => {
                        p.alias = Some(u16_at(&body, at));
                        at += 2;
                    }
                    0x0b => p.sub_ids.push(varint(&body, &mut at)),
                    0x01 => at += 1,
                    0x03 | 0x08 | 0x09 => at += 2 + usize::from(u16_at(&body, at)),
                    0x26 => {
                        at += 2 + usize::from(u16_at(&body, at));
                        at += 2 + usize::from(u16_at(&body, at));
                    }
                    other => panic!("unexpected property {other:#x}"),
                }
            }
            at = end;
            if let Some(a) = p.alias {
                if p.topic.is_empty() {
                    p.topic = self.aliases.get(&a).cloned().expect("a known alias");
                } else {
                    self.aliases.insert(a, p.topic.clone());
                }
            }
        }
        p.payload = body[at..].to_vec();
        Some(p)
    }

    fn ack(&mut self, pkid: u16) {
        send(&mut self.s, &packet::frame(0x40, &pkid.to_be_bytes()));
    }

    /// Nothing more within a short while.
    fn quiet(&mut self) -> bool {
        self.next(Duration::from_millis(300)).is_none()
    }
}

/// Delivery QoS is min(published, granted) [MQTT-3.8.4-6] (MQTT 5: [MQTT-3.8.4-8]); a
/// SUBSCRIBE of an existing filter replaces its options [MQTT-3.8.4-3].
#[test]
fn delivery_qos_is_the_lower_of_published_and_granted() {
    let b = Broker::start();
    for v5 in [false, true] {
        let (mut sub, _, _) = Raw::connect(
            b.addr,
            Connect {
                v5,
                client_id: "q-sub",
                keep_alive: 60,
                ..Connect::default()
            },
        );
        let mut pubr = Raw::v5(b.addr, "q-pub");
        assert_eq!(sub.subscribe(1, &[("q/t", 1)], None), [1]);
        pubr.publish("q/t", 2, false, &[], b"two");
        let p = sub.next(T).expect("delivered");
        assert_eq!(p.qos, 1, "published 2, granted 1 (v5 {v5})");
        sub.ack(p.pkid);
        pubr.publish("q/t", 0, false, &[], b"zero");
        assert_eq!(
            sub.next(T).expect("delivered").qos,
            0,
            "published 0, granted 1"
        );
        assert_eq!(
            sub.subscribe(2, &[("q/t", 0)], None),
            [0],
            "re-subscribed at QoS 0"
        );
        pubr.publish("q/t", 1, false, &[], b"one");
        assert_eq!(
            sub.next(T).expect("delivered").qos,
            0,
            "the new QoS applies"
        );
    }
}

/// Retained messages on subscribe, by Retain Handling: 0 on every SUBSCRIBE [MQTT-3.3.1-9]
/// [MQTT-3.8.4-4], 1 only for a new subscription [MQTT-3.3.1-10], 2 never [MQTT-3.3.1-11];
/// sent with RETAIN set [MQTT-3.3.1-9]; a live message's RETAIN is kept only with Retain As
/// Published [MQTT-3.3.1-12/13].
#[test]
fn retained_messages_follow_retain_handling_and_retain_as_published() {
    let b = Broker::start();
    let mut pubr = Raw::v5(b.addr, "r-pub");
    pubr.publish("r/a", 1, true, &[], b"kept");
    let mut s = Raw::v5(b.addr, "r-sub");
    s.subscribe(1, &[("r/#", 0x01)], None);
    let p = s.next(T).expect("retained on subscribe");
    assert!(p.retain && p.payload == b"kept", "{p:?}");
    s.subscribe(2, &[("r/#", 0x01)], None);
    assert!(s.next(T).expect("again: Retain Handling 0").retain);
    s.subscribe(3, &[("r/+", 0x11)], None);
    assert!(
        s.next(T)
            .expect("new subscription, Retain Handling 1")
            .retain
    );
    s.subscribe(4, &[("r/+", 0x11)], None);
    assert!(s.quiet(), "Retain Handling 1 on an existing subscription");
    s.subscribe(5, &[("r/a", 0x21)], None);
    assert!(s.quiet(), "Retain Handling 2");
    // Live: RETAIN cleared for r/# and r/+ (no Retain As Published), kept for r/a (0x08).
    s.subscribe(6, &[("r/a", 0x29)], None);
    pubr.publish("r/a", 0, true, &[], b"live");
    let p = s.next(T).expect("live");
    assert!(p.retain, "Retain As Published: {p:?}");
    let mut plain = Raw::v5(b.addr, "r-plain");
    plain.subscribe(1, &[("r/x", 0x20)], None);
    pubr.publish("r/x", 0, true, &[], b"live");
    assert!(
        !plain.next(T).expect("live").retain,
        "RETAIN cleared [MQTT-3.3.1-12]"
    );
}

/// No Local: a client does not get its own publishes back [MQTT-3.8.3-3].
#[test]
fn no_local() {
    let b = Broker::start();
    let mut a = Raw::v5(b.addr, "nl-a");
    a.subscribe(1, &[("nl/t", 0x04)], None);
    a.publish("nl/t", 0, false, &[], b"mine");
    assert!(a.quiet(), "its own publish came back");
    let mut other = Raw::v5(b.addr, "nl-b");
    other.publish("nl/t", 0, false, &[], b"theirs");
    assert_eq!(a.next(T).expect("another's").payload, b"theirs");
}

/// Subscription identifiers: a message matching two subscriptions is sent once, with both
/// identifiers [MQTT-3.3.4-3] [MQTT-3.3.4-5].
#[test]
fn subscription_identifiers() {
    let b = Broker::start();
    let mut s = Raw::v5(b.addr, "si");
    s.subscribe(1, &[("si/#", 0)], Some(7));
    s.subscribe(2, &[("si/+", 0)], Some(9));
    let mut p = Raw::v5(b.addr, "si-pub");
    p.publish("si/x", 0, false, &[], b"x");
    let mut got = s.next(T).expect("delivered");
    got.sub_ids.sort();
    assert_eq!(got.sub_ids, [7, 9]);
    assert!(s.quiet(), "one copy");
}

/// Topic aliases both ways (MQTT 5 §3.3.2.3.4): the broker sets one per topic (not per
/// subscription: three topics under one wildcard get three aliases) and then sends the alias
/// alone; a client's alias is resolved before routing and ACLs.
#[test]
fn topic_aliases_both_ways() {
    let b = Broker::start();
    let (mut s, code, _) = Raw::connect(
        b.addr,
        Connect {
            v5: true,
            client_id: "ta",
            keep_alive: 60,
            props: &[0x22, 0, 10],
            ..Connect::default()
        },
    );
    assert_eq!(code, 0);
    s.subscribe(1, &[("ta/#", 0)], None);
    let mut p = Raw::v5(b.addr, "ta-pub");
    for t in ["ta/a", "ta/b", "ta/a", "ta/c", "ta/b"] {
        p.publish(t, 0, false, &[], t.as_bytes());
    }
    let got: Vec<(String, Option<u16>)> = (0..5)
        .map(|_| s.next(T).expect("delivered"))
        .map(|m| {
            assert_eq!(m.payload, m.topic.as_bytes(), "topic and payload disagree");
            (m.topic, m.alias)
        })
        .collect();
    let topics: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, ["ta/a", "ta/b", "ta/a", "ta/c", "ta/b"]);
    assert!(got.iter().all(|(_, a)| a.is_some()), "{got:?}");
    // Inbound: an alias set with a topic, then used alone.
    let mut s2 = Raw::v5(b.addr, "ta-2");
    s2.subscribe(1, &[("ta/in", 0)], None);
    p.publish("ta/in", 0, false, &[0x23, 0, 5], b"first");
    p.publish("", 0, false, &[0x23, 0, 5], b"second");
    assert_eq!(s2.next(T).expect("first").topic, "ta/in");
    let second = s2.next(T).expect("second");
    assert_eq!(
        (second.topic.as_str(), second.payload.as_slice()),
        ("ta/in", &b"second"[..])
    );
}

/// Message Expiry: a message whose interval passed while queued is never delivered
/// [MQTT-3.3.2-5]; one delivered later carries what is left of its interval [MQTT-3.3.2-6].
#[test]
fn message_expiry() {
    let b = Broker::start();
    let c = |clean: bool| Connect {
        v5: true,
        client_id: "me",
        keep_alive: 60,
        persistent: !clean,
        props: &[0x11, 0, 0, 0, 60],
        ..Connect::default()
    };
    let (mut s, _, _) = Raw::connect(b.addr, c(true));
    s.subscribe(1, &[("me/t", 1)], None);
    drop(s);
    let mut p = Raw::v5(b.addr, "me-pub");
    p.publish("me/t", 1, false, &[0x02, 0, 0, 0, 1], b"short");
    p.publish("me/t", 1, false, &[0x02, 0, 0, 0, 60], b"long");
    std::thread::sleep(Duration::from_millis(2100));
    let (mut s, _, present) = Raw::connect(b.addr, c(false));
    assert!(present);
    let m = s.next(T).expect("the long one");
    assert_eq!(m.payload, b"long");
    assert!(m.expiry.is_some_and(|e| (55..60).contains(&e)), "{m:?}");
    s.ack(m.pkid);
    assert!(s.quiet(), "an expired message was delivered");
    let stats = wait_stats(&b.port(), "the expired one counted", |s| {
        s["dropped"]["expired"].as_u64() >= Some(1)
    });
    assert_eq!(stats["dropped"]["expired"], 1, "{stats}");
}

/// Receive Maximum: no more unacknowledged QoS 1/2 PUBLISHes than the client allows
/// [MQTT-3.3.4-9]; each acknowledgement lets the next one go.
#[test]
fn receive_maximum() {
    let b = Broker::start();
    let (mut s, _, _) = Raw::connect(
        b.addr,
        Connect {
            v5: true,
            client_id: "rm",
            keep_alive: 60,
            props: &[0x21, 0, 2],
            ..Connect::default()
        },
    );
    s.subscribe(1, &[("rm/t", 1)], None);
    let mut p = Raw::v5(b.addr, "rm-pub");
    for i in 0..5u8 {
        p.publish("rm/t", 1, false, &[], &[i]);
    }
    let a = s.next(T).expect("first");
    let b2 = s.next(T).expect("second");
    assert!(s.quiet(), "a third before any acknowledgement");
    s.ack(b2.pkid);
    let c = s.next(T).expect("third after an ack");
    assert!(s.quiet(), "two in flight again");
    s.ack(a.pkid);
    s.ack(c.pkid);
    let rest: Vec<u8> = (0..2)
        .map(|_| s.next(T).expect("the rest").payload[0])
        .collect();
    assert_eq!(rest, [3, 4], "in order");
}

/// Maximum Packet Size: a message larger than the client accepts is not sent to it
/// [MQTT-3.1.2-25], and counted; smaller ones are.
#[test]
fn maximum_packet_size() {
    let b = Broker::start();
    let (mut s, _, _) = Raw::connect(
        b.addr,
        Connect {
            v5: true,
            client_id: "mps",
            keep_alive: 60,
            props: &[0x27, 0, 0, 0, 100],
            ..Connect::default()
        },
    );
    s.subscribe(1, &[("mps/t", 1)], None);
    let mut p = Raw::v5(b.addr, "mps-pub");
    p.publish("mps/t", 1, false, &[], &[b'x'; 500]);
    p.publish("mps/t", 1, false, &[], b"small");
    assert_eq!(s.next(T).expect("the small one").payload, b"small");
    let stats = wait_stats(&b.port(), "the large one counted", |s| {
        s["dropped"]["too_large"].as_u64() >= Some(1)
    });
    assert_eq!(stats["dropped"]["too_large"], 1, "{stats}");
}

/// QoS 2 exactly once across reconnects, both ways [MQTT-4.3.3]: a PUBLISH sent again (DUP)
/// after the publisher reconnected is routed once [MQTT-4.3.3-10]; a subscriber that
/// reconnects after its PUBREC gets the PUBREL again, not the message [MQTT-4.4.0-1].
#[test]
fn qos2_exactly_once_across_reconnects() {
    let b = Broker::start();
    let conn = |id| Connect {
        v5: true,
        client_id: id,
        keep_alive: 60,
        persistent: true,
        props: &[0x11, 0, 0, 0, 60],
        ..Connect::default()
    };
    let (mut s, _, _) = Raw::connect(b.addr, conn("x2-sub"));
    s.subscribe(1, &[("x2/t", 2)], None);
    let (mut p, _, _) = Raw::connect(b.addr, conn("x2-pub"));
    let publish = packet::publish(true, 2, 10, b"x2/t", &[], b"once");
    send(&mut p.s, &publish);
    packet::read_kind(&mut p.s, 5).expect("PUBREC");
    drop(p);
    let (mut p, _, present) = Raw::connect(b.addr, conn("x2-pub"));
    assert!(present);
    let mut again = publish.clone();
    again[0] |= 0x08;
    send(&mut p.s, &again);
    packet::read_kind(&mut p.s, 5).expect("PUBREC again");
    send(&mut p.s, &packet::frame(0x62, &[0, 10]));
    let (_, comp) = packet::read_kind(&mut p.s, 7).expect("PUBCOMP");
    assert_eq!(&comp[..2], &[0, 10]);

    let m = s.next(T).expect("delivered");
    assert_eq!((m.qos, m.payload.as_slice()), (2, &b"once"[..]));
    assert!(s.quiet(), "delivered twice");
    send(&mut s.s, &packet::frame(0x50, &m.pkid.to_be_bytes()));
    packet::read_kind(&mut s.s, 6).expect("PUBREL");
    drop(s);
    let (mut s, _, present) = Raw::connect(b.addr, conn("x2-sub"));
    assert!(present);
    let (_, rel) = packet::read_kind(&mut s.s, 6).expect("PUBREL resent");
    assert_eq!(u16_at(&rel, 0), m.pkid);
    send(&mut s.s, &packet::frame(0x70, &m.pkid.to_be_bytes()));
    assert!(s.quiet(), "the message came again");
}

/// Sessions: Clean Start discards an earlier session [MQTT-3.1.2-4] and Session Present
/// says whether one was resumed [MQTT-3.2.2-2/3]; an MQTT 5 session lasts its Session Expiry
/// Interval after the connection, even with Clean Start [MQTT-3.1.2-23], and then ends.
#[test]
fn clean_start_and_session_expiry() {
    let b = Broker::start();
    let c = |id, clean: bool, expiry: u8| Connect {
        v5: true,
        client_id: id,
        keep_alive: 60,
        persistent: !clean,
        props: if expiry == 1 {
            &[0x11, 0, 0, 0, 1]
        } else {
            &[0x11, 0, 0, 0, 60]
        },
        ..Connect::default()
    };
    let mut p = Raw::v5(b.addr, "se-pub");
    // Clean Start with an expiry: kept after the connection.
    let (mut s, _, present) = Raw::connect(b.addr, c("se", true, 60));
    assert!(!present);
    s.subscribe(1, &[("se/t", 1)], None);
    drop(s);
    p.publish("se/t", 1, false, &[], b"queued");
    let (mut s, _, present) = Raw::connect(b.addr, c("se", false, 60));
    assert!(present, "[MQTT-3.1.2-23]");
    assert_eq!(s.next(T).expect("queued").payload, b"queued");
    drop(s);
    // Clean Start discards it.
    p.publish("se/t", 1, false, &[], b"dropped");
    let (s, _, present) = Raw::connect(b.addr, c("se", true, 60));
    assert!(!present, "[MQTT-3.1.2-4]");
    drop(s);
    let (mut s, _, present) = Raw::connect(b.addr, c("se", false, 60));
    assert!(present, "the clean session is the one kept");
    assert!(s.quiet(), "the discarded session's message came back");
    drop(s);
    // A one-second expiry ends it.
    let (s, _, _) = Raw::connect(b.addr, c("se", true, 1));
    drop(s);
    std::thread::sleep(Duration::from_millis(2500));
    let (_, _, present) = Raw::connect(b.addr, c("se", false, 60));
    assert!(!present, "the session outlived its expiry");
}

/// The order of a publisher's messages to one topic is kept [MQTT-4.6.0-5], QoS 1, 2,000 of
/// them, through a window of 20.
#[test]
fn order_per_topic_per_publisher() {
    let b = Broker::start();
    let (mut s, _, _) = Raw::connect(
        b.addr,
        Connect {
            v5: true,
            client_id: "ord",
            keep_alive: 60,
            props: &[0x21, 0, 20],
            ..Connect::default()
        },
    );
    s.subscribe(1, &[("ord/t", 1)], None);
    let p = std::thread::spawn({
        let addr = b.addr;
        move || {
            let mut p = Raw::v5(addr, "ord-pub");
            for i in 0..2000u32 {
                p.publish("ord/t", 1, false, &[], &i.to_be_bytes());
            }
        }
    });
    for i in 0..2000u32 {
        let m = s.next(T).unwrap_or_else(|| panic!("message {i} missing"));
        assert_eq!(m.payload, i.to_be_bytes(), "out of order at {i}");
        s.ack(m.pkid);
    }
    p.join().expect("publisher");
}

/// Server Keep Alive: with `max_keepalive`, a client asking for more (or none) is told the
/// broker's value in the CONNACK [MQTT-3.2.2-21] and held to it; the DISCONNECT the broker
/// sends is well formed (remaining length 1, reason 0x8D) [MQTT-3.14.4-1].
#[test]
fn server_keep_alive_and_a_well_formed_disconnect() {
    let b = Broker::start_with("max_keepalive = 1");
    let mut s = raw(b.addr);
    send(
        &mut s,
        &Connect {
            v5: true,
            client_id: "ka",
            keep_alive: 0,
            ..Connect::default()
        }
        .bytes(),
    );
    let (_, ack) = packet::read(&mut s).expect("CONNACK");
    // CONNACK: flags, reason, properties; Server Keep Alive is property 0x13.
    let props = &ack[3..];
    let at = props.windows(3).position(|w| w == [0x13, 0, 1]);
    assert!(at.is_some(), "no Server Keep Alive of 1 in {ack:?}");
    let t0 = std::time::Instant::now();
    let (b1, body) = packet::read(&mut s).expect("DISCONNECT");
    assert_eq!(
        (b1, body.as_slice()),
        (0xe0, &[0x8d][..]),
        "a well-formed DISCONNECT 0x8D"
    );
    assert!(t0.elapsed() < Duration::from_secs(3), "held to 1.5 × 1 s");
}

/// Shared subscriptions: one member per message (round robin here), and a member that leaves
/// mid-stream hands what it had not acknowledged, in flight or queued, to the others, so the
/// group loses nothing (MQTT 5 §4.8.2).
#[test]
fn a_shared_subscription_member_leaving_loses_nothing() {
    let b = Broker::start();
    let (mut a, _, _) = Raw::connect(
        b.addr,
        Connect {
            v5: true,
            client_id: "sh-a",
            keep_alive: 60,
            props: &[0x21, 0, 5],
            ..Connect::default()
        },
    );
    a.subscribe(1, &[("$share/g/sh/t", 1)], None);
    let mut c = Raw::v5(b.addr, "sh-c");
    c.subscribe(1, &[("$share/g/sh/t", 1)], None);
    let mut p = Raw::v5(b.addr, "sh-pub");
    for i in 0..40u8 {
        p.publish("sh/t", 1, false, &[], &[i]);
    }
    // `a` takes its first five and acknowledges none; then it goes.
    let mut a_got = 0;
    while a.next(Duration::from_millis(300)).is_some() {
        a_got += 1;
    }
    assert_eq!(a_got, 5, "Receive Maximum 5");
    drop(a);
    let mut seen = std::collections::BTreeSet::new();
    while let Some(m) = c.next(Duration::from_millis(700)) {
        seen.insert(m.payload[0]);
        c.ack(m.pkid);
    }
    assert_eq!(
        seen.len(),
        40,
        "the group lost {:?}",
        (0..40u8).filter(|i| !seen.contains(i)).collect::<Vec<_>>()
    );
}

/// A client id taken over within a Will Delay Interval: the session goes on, so the old
/// connection's delayed will is never sent [MQTT-3.1.3-9].
#[test]
fn a_delayed_will_is_not_sent_when_the_session_is_taken_over() {
    let b = Broker::start();
    let mut watcher = Raw::v5(b.addr, "dw-watch");
    watcher.subscribe(1, &[("dw/#", 0)], None);
    // Session Expiry 60 s, Will Delay 1 s (will properties: 0x18).
    let mut body = packet::field(b"MQTT");
    body.extend_from_slice(&[5, 0x04, 0, 60]);
    body.extend(packet::props(&[0x11, 0, 0, 0, 60]));
    body.extend(packet::field(b"dw"));
    body.extend(packet::props(&[0x18, 0, 0, 0, 1]));
    body.extend(packet::field(b"dw/will"));
    body.extend(packet::field(b"gone"));
    let connect = packet::frame(0x10, &body);
    let mut first = raw(b.addr);
    send(&mut first, &connect);
    packet::read(&mut first).expect("CONNACK");
    let mut second = raw(b.addr);
    send(&mut second, &connect);
    packet::read_kind(&mut second, 2).expect("CONNACK of the takeover");
    assert!(
        watcher.next(Duration::from_millis(2000)).is_none(),
        "a will came after the takeover"
    );
    // Without a takeover it comes, after its delay.
    drop(second);
    let will = watcher.next(T).expect("the will, 1 s after the drop");
    assert_eq!(will.topic, "dw/will");
}

/// A subscriber evicted for taking nothing (`slow_subscriber_timeout`) that comes back to its
/// persistent session is served again, not evicted at once by the old episode; a client
/// publishing to its own full queue is not held by itself.
#[test]
fn an_evicted_subscriber_comes_back_and_a_client_never_waits_for_itself() {
    let b = Broker::start_with("max_queued_messages = 5\nslow_subscriber_timeout = \"500ms\"");
    let c = Connect {
        v5: true,
        client_id: "ev",
        keep_alive: 60,
        persistent: true,
        props: &[0x11, 0, 0, 0, 60, 0x21, 0, 1],
        ..Connect::default()
    };
    let (mut s, _, _) = Raw::connect(b.addr, c.clone());
    s.subscribe(1, &[("ev/t", 1)], None);
    let mut p = Raw::v5(b.addr, "ev-pub");
    // Window 1 + queue 5 fill; the next publish waits 0.5 s, then the subscriber is evicted.
    for i in 0..8u8 {
        p.publish("ev/t", 1, false, &[], &[i]);
    }
    b.proc.expect_line("took nothing for", T);
    drop(s);
    let (mut s, _, present) = Raw::connect(b.addr, c);
    assert!(present);
    let first = s.next(T).expect("redelivered");
    s.ack(first.pkid);
    let second = s.next(T).expect("the session is served again");
    s.ack(second.pkid);
    p.publish("ev/t", 1, false, &[], b"after");
    let mut got_after = false;
    while let Some(m) = s.next(Duration::from_millis(700)) {
        got_after |= m.payload == b"after";
        s.ack(m.pkid);
    }
    assert!(
        got_after,
        "the reconnected subscriber was evicted again or starved"
    );

    // A client subscribed to what it publishes, never acknowledging: its own queue fills,
    // and it is not held (its PUBACKs keep coming).
    let (mut me, _, _) = Raw::connect(
        b.addr,
        Connect {
            v5: true,
            client_id: "self",
            keep_alive: 60,
            props: &[0x21, 0, 1],
            ..Connect::default()
        },
    );
    me.subscribe(1, &[("self/t", 1)], None);
    let t0 = std::time::Instant::now();
    for i in 0..20u8 {
        me.publish("self/t", 1, false, &[], &[i]);
    }
    assert!(
        t0.elapsed() < Duration::from_millis(400),
        "held by its own queue: {:?}",
        t0.elapsed()
    );
}

/// A member of a shared subscription that may not read a topic is never picked for it: the
/// member that may read gets every message (per-message ACL checks apply to groups too).
#[test]
fn a_shared_group_member_gets_only_what_it_may_read() {
    let dir = TempDir::new("shared-acl");
    let pw = password_file(&dir, &[("full", "f"), ("part", "p")]);
    let b = Broker::start_with(&format!(
        "[broker.auth]\npassword_file = \"{}\"\n[broker.acl]\ndefault = \"allow\"\n\
         [[broker.acl.rule]]\nuser = \"part\"\ntopic = \"sa/secret\"\naccess = \"deny\"\n",
        pw.display()
    ));
    let member = |id: &'static str, user: &'static str, pass: &'static str| {
        let (mut m, code, _) = Raw::connect(
            b.addr,
            Connect {
                v5: true,
                client_id: id,
                keep_alive: 60,
                username: Some(user),
                password: Some(pass),
                ..Connect::default()
            },
        );
        assert_eq!(code, 0);
        m.subscribe(1, &[("$share/g/sa/#", 0)], None);
        m
    };
    let mut full = member("sa-full", "full", "f");
    let mut part = member("sa-part", "part", "p");
    let mut p = Raw::v5(b.addr, "sa-pub");
    for i in 0..10u8 {
        p.publish("sa/secret", 0, false, &[], &[i]);
    }
    let mut got = 0;
    while full.next(Duration::from_millis(500)).is_some() {
        got += 1;
    }
    assert_eq!(got, 10, "the member that may read lost some");
    assert!(part.quiet(), "a member got what it may not read");
}
