//! The rules of the specification that rumqttd's codecs do not check, checked on the bytes
//! of a whole frame before a codec sees it.
//!
//! A packet that breaks one of them is a protocol error, and the specification's answer is to
//! close the connection (3.1.1 §4.8, 5 §4.13). mosquitto closes on each of these, so a client
//! that works with mosquitto never depends on edgebus accepting them. Every check names the
//! normative statement it enforces; [`Violation`] carries it into the log line.
//!
//! Strings follow mosquitto's reading of §1.5.4: besides ill-formed UTF-8 and U+0000 (which
//! the specification forbids), the control characters and the Unicode non-characters it says
//! a string SHOULD NOT hold are refused too, since a topic holding them is nothing a
//! subscriber can be expected to handle.

use crate::frame::{kind, Frame};

/// A rule a packet broke: what, and the normative statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Violation {
    pub what: &'static str,
    pub rule: &'static str,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}]", self.what, self.rule)
    }
}

fn bad(what: &'static str, rule: &'static str) -> Violation {
    Violation { what, rule }
}

const TRUNCATED: Violation = Violation {
    what: "packet ends inside a field",
    rule: "MQTT-1.5.5-1",
};

/// Checks a whole frame (`buf` starts with it) of a client to server packet.
pub(crate) fn check(buf: &[u8], f: Frame, v5: bool) -> Result<(), Violation> {
    let body = buf.get(f.header_len..f.len()).ok_or(TRUNCATED)?;
    let flags = f.byte1 & 0x0f;
    match f.kind() {
        kind::CONNECT => {
            if flags != 0 {
                return Err(bad("CONNECT fixed-header flags not 0", "MQTT-2.2.2-2"));
            }
            connect(body, v5)
        }
        kind::PUBLISH => publish(body, f, v5),
        kind::PUBREL if flags != 0b0010 => {
            Err(bad("PUBREL fixed-header flags not 0010", "MQTT-3.6.1-1"))
        }
        kind::SUBSCRIBE if flags != 0b0010 => {
            Err(bad("SUBSCRIBE fixed-header flags not 0010", "MQTT-3.8.1-1"))
        }
        kind::UNSUBSCRIBE if flags != 0b0010 => Err(bad(
            "UNSUBSCRIBE fixed-header flags not 0010",
            "MQTT-3.10.1-1",
        )),
        kind::PUBACK | kind::PUBREC | kind::PUBCOMP | kind::PINGREQ | kind::DISCONNECT
            if flags != 0 =>
        {
            Err(bad("fixed-header flags not 0", "MQTT-2.2.2-2"))
        }
        kind::SUBSCRIBE => subscribe(body, v5),
        kind::UNSUBSCRIBE => unsubscribe(body, v5),
        _ => Ok(()),
    }
}

/// A cursor over a packet's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }

    fn done(&self) -> bool {
        self.at >= self.buf.len()
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Violation> {
        let s = self.buf.get(self.at..self.at + n).ok_or(TRUNCATED)?;
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, Violation> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Violation> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, Violation> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn varint(&mut self) -> Result<u32, Violation> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(bad(
            "variable byte integer longer than 4 bytes",
            "MQTT-1.5.5-1",
        ))
    }

    /// Two-byte length, then that many bytes.
    fn binary(&mut self) -> Result<&'a [u8], Violation> {
        let n = usize::from(self.u16()?);
        self.bytes(n)
    }

    /// A UTF-8 Encoded String, checked.
    fn string(&mut self) -> Result<&'a str, Violation> {
        let b = self.binary()?;
        mqtt_str(b).map_err(|what| bad(what, "MQTT-1.5.4-1"))
    }
}

/// Reads a UTF-8 Encoded String's bytes as the specification (and mosquitto) allow them.
pub(crate) fn mqtt_str(b: &[u8]) -> Result<&str, &'static str> {
    let s = std::str::from_utf8(b).map_err(|_| "not UTF-8 (ill-formed)")?;
    for c in s.chars() {
        let cp = u32::from(c);
        if cp == 0 {
            return Err("string contains U+0000");
        }
        if cp <= 0x1f || (0x7f..=0x9f).contains(&cp) {
            return Err("string contains a control character");
        }
        if (0xfdd0..=0xfdef).contains(&cp) || cp & 0xfffe == 0xfffe {
            return Err("string contains a Unicode non-character");
        }
    }
    Ok(s)
}

/// Checks a topic name as a PUBLISH (or a Last Will) carries it.
pub(crate) fn topic_name(b: &[u8]) -> Result<&str, &'static str> {
    let s = mqtt_str(b)?;
    crate::acl::check_topic(s)?;
    Ok(s)
}

/// MQTT 5 property identifiers whose value is checked here.
mod prop {
    pub const PAYLOAD_FORMAT: u8 = 0x01;
    pub const SUBSCRIPTION_ID: u8 = 0x0b;
    pub const REQUEST_PROBLEM_INFO: u8 = 0x17;
    pub const REQUEST_RESPONSE_INFO: u8 = 0x19;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
}

/// Where a property list sits, for the rules that differ.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Props {
    Connect,
    Will,
    Publish,
    Subscribe,
    Unsubscribe,
}

/// Walks an MQTT 5 property list: known identifiers only, each at most once (user properties
/// excepted), and the values the specification constrains.
fn properties(r: &mut Reader<'_>, at: Props) -> Result<(), Violation> {
    let len = r.varint()? as usize;
    let mut p = Reader::new(r.bytes(len)?);
    let mut seen = 0u64;
    while !p.done() {
        let id = p.varint()?;
        let id = u8::try_from(id)
            .ok()
            .filter(|id| *id < 64)
            .ok_or(bad("unknown property", "MQTT 5 §2.2.2.2"))?;
        if id != prop::USER_PROPERTY {
            if seen & (1 << id) != 0 {
                return Err(bad("a property appears twice", "MQTT 5 §2.2.2.2"));
            }
            seen |= 1 << id;
        }
        let value: u64 = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => u64::from(p.u8()?),
            0x13 | 0x21 | 0x22 | 0x23 => u64::from(p.u16()?),
            0x02 | 0x11 | 0x18 | 0x27 => u64::from(p.u32()?),
            0x0b => u64::from(p.varint()?),
            0x03 | 0x08 | 0x12 | 0x15 | 0x1a | 0x1c | 0x1f => {
                p.string()?;
                0
            }
            0x09 | 0x16 => {
                p.binary()?;
                0
            }
            0x26 => {
                p.string()?;
                p.string()?;
                0
            }
            _ => return Err(bad("unknown property", "MQTT 5 §2.2.2.2")),
        };
        match id {
            prop::RECEIVE_MAXIMUM if value == 0 => {
                return Err(bad("Receive Maximum of 0", "MQTT 5 §3.1.2.11.3"))
            }
            prop::MAXIMUM_PACKET_SIZE if value == 0 => {
                return Err(bad("Maximum Packet Size of 0", "MQTT 5 §3.1.2.11.4"))
            }
            prop::PAYLOAD_FORMAT | prop::REQUEST_PROBLEM_INFO | prop::REQUEST_RESPONSE_INFO
                if value > 1 =>
            {
                return Err(bad(
                    "a 0-or-1 property holds another value",
                    "MQTT 5 §3.1.2.11",
                ))
            }
            prop::TOPIC_ALIAS if value == 0 => {
                return Err(bad("Topic Alias of 0", "MQTT 5 §3.3.2.3.4"));
            }
            prop::SUBSCRIPTION_ID if at == Props::Publish => {
                return Err(bad(
                    "a client's PUBLISH carries a Subscription Identifier",
                    "MQTT-3.3.4-6",
                ))
            }
            prop::SUBSCRIPTION_ID if value == 0 => {
                return Err(bad("Subscription Identifier of 0", "MQTT 5 §3.8.2.1.2"))
            }
            _ => {}
        }
        let allowed: &[u8] = match at {
            Props::Connect => &[0x11, 0x21, 0x27, 0x22, 0x19, 0x17, 0x26, 0x15, 0x16],
            Props::Will => &[0x18, 0x01, 0x02, 0x03, 0x08, 0x09, 0x26],
            Props::Publish => &[0x01, 0x02, 0x23, 0x08, 0x09, 0x26, 0x03],
            Props::Subscribe => &[0x0b, 0x26],
            Props::Unsubscribe => &[0x26],
        };
        if !allowed.contains(&id) {
            return Err(bad(
                "a property this packet may not carry",
                "MQTT 5 §2.2.2.2",
            ));
        }
    }
    Ok(())
}

fn connect(body: &[u8], v5: bool) -> Result<(), Violation> {
    let mut r = Reader::new(body);
    r.binary()?; // protocol name, already matched by the level check
    r.u8()?; // level
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(bad("CONNECT reserved flag set", "MQTT-3.1.2-3"));
    }
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let password = flags & 0x40 != 0;
    let username = flags & 0x80 != 0;
    if !will && (will_qos != 0 || will_retain) {
        return Err(bad(
            "Will QoS or Will Retain set without a Will",
            "MQTT-3.1.2-13",
        ));
    }
    if will_qos == 3 {
        return Err(bad("Will QoS 3", "MQTT-3.1.2-14"));
    }
    if !v5 && password && !username {
        return Err(bad("password without a user name", "MQTT-3.1.2-22"));
    }
    r.u16()?; // keep alive
    if v5 {
        properties(&mut r, Props::Connect)?;
    }
    r.string()?; // client id
    if will {
        if v5 {
            properties(&mut r, Props::Will)?;
        }
        r.binary()?; // topic: checked as a topic name once decoded, with the ACL
        r.binary()?;
    }
    if username {
        r.string()?;
    }
    if password {
        r.binary()?;
    }
    Ok(())
}

fn publish(body: &[u8], f: Frame, v5: bool) -> Result<(), Violation> {
    let qos = f.qos();
    if qos == 3 {
        return Err(bad("PUBLISH with QoS 3", "MQTT-3.3.1-4"));
    }
    if qos == 0 && f.byte1 & 0x08 != 0 {
        return Err(bad("DUP set on a QoS 0 PUBLISH", "MQTT-3.3.1-2"));
    }
    let mut r = Reader::new(body);
    let topic = r.binary()?;
    // Empty: an alias stands for it (MQTT 5); checked where the alias is resolved.
    if !topic.is_empty() {
        topic_name(topic).map_err(|what| bad(what, "MQTT-3.3.2-1"))?;
    }
    if qos > 0 && r.u16()? == 0 {
        return Err(bad("PUBLISH with packet identifier 0", "MQTT-2.3.1-1"));
    }
    if v5 {
        properties(&mut r, Props::Publish)?;
    }
    Ok(())
}

fn subscribe(body: &[u8], v5: bool) -> Result<(), Violation> {
    let mut r = Reader::new(body);
    if r.u16()? == 0 {
        return Err(bad("SUBSCRIBE with packet identifier 0", "MQTT-2.3.1-1"));
    }
    if v5 {
        properties(&mut r, Props::Subscribe)?;
    }
    if r.done() {
        return Err(bad("SUBSCRIBE without a topic filter", "MQTT-3.8.3-3"));
    }
    while !r.done() {
        let filter = r.string()?;
        let options = r.u8()?;
        if options & 0b11 == 3 {
            return Err(bad("subscription QoS 3", "MQTT-3-8.3-4"));
        }
        if v5 {
            if options & 0xc0 != 0 {
                return Err(bad(
                    "subscription options reserved bits set",
                    "MQTT-3.8.3-5",
                ));
            }
            if (options >> 4) & 0b11 == 3 {
                return Err(bad("Retain Handling 3", "MQTT 5 §3.8.3.1"));
            }
            if options & 0x04 != 0 && filter.starts_with("$share/") {
                return Err(bad("No Local on a shared subscription", "MQTT-3.8.3-4"));
            }
        } else if options & 0xfc != 0 {
            return Err(bad(
                "subscription options reserved bits set",
                "MQTT-3-8.3-4",
            ));
        }
    }
    Ok(())
}

fn unsubscribe(body: &[u8], v5: bool) -> Result<(), Violation> {
    let mut r = Reader::new(body);
    if r.u16()? == 0 {
        return Err(bad("UNSUBSCRIBE with packet identifier 0", "MQTT-2.3.1-1"));
    }
    if v5 {
        properties(&mut r, Props::Unsubscribe)?;
    }
    if r.done() {
        return Err(bad("UNSUBSCRIBE without a topic filter", "MQTT-3.10.3-2"));
    }
    while !r.done() {
        r.string()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, Check};

    fn run(bytes: &[u8], v5: bool) -> Result<(), Violation> {
        let Check::Ready(f) = frame::check(bytes, 1 << 20) else {
            panic!("not a whole frame: {bytes:?}")
        };
        check(bytes, f, v5)
    }

    /// A CONNECT with `flags`, and `props` (MQTT 5) as given.
    fn connect(v5: bool, flags: u8, props: &[u8], tail: &[u8]) -> Vec<u8> {
        let mut body = vec![
            0,
            4,
            b'M',
            b'Q',
            b'T',
            b'T',
            if v5 { 5 } else { 4 },
            flags,
            0,
            30,
        ];
        if v5 {
            body.push(props.len() as u8);
            body.extend_from_slice(props);
        }
        body.extend_from_slice(&[0, 1, b'c']);
        body.extend_from_slice(tail);
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    }

    #[test]
    fn connect_rules() {
        assert_eq!(run(&connect(false, 0x02, &[], &[]), false), Ok(()));
        assert_eq!(run(&connect(true, 0x02, &[0x21, 0, 5], &[]), true), Ok(()));
        let rule = |p: &[u8], v5| run(p, v5).map_err(|v| v.rule);
        assert_eq!(
            rule(&connect(false, 0x03, &[], &[]), false),
            Err("MQTT-3.1.2-3")
        );
        // Password flag without the user name flag; the password follows the client id.
        assert_eq!(
            rule(&connect(false, 0x42, &[], &[0, 1, b'p']), false),
            Err("MQTT-3.1.2-22")
        );
        assert_eq!(run(&connect(true, 0x42, &[], &[0, 1, b'p']), true), Ok(()));
        assert!(run(&connect(true, 0x02, &[0x21, 0, 0], &[]), true).is_err());
        assert!(run(&connect(true, 0x02, &[0x27, 0, 0, 0, 0], &[]), true).is_err());
        assert!(run(
            &connect(true, 0x02, &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2], &[]),
            true
        )
        .is_err());
        // User properties may repeat.
        let up = [0x26, 0, 1, b'k', 0, 1, b'v'];
        assert_eq!(
            run(&connect(true, 0x02, &[up, up].concat(), &[]), true),
            Ok(())
        );
        assert!(
            run(&connect(false, 0x12, &[], &[]), false).is_err(),
            "will QoS without will"
        );
    }

    #[test]
    fn publish_rules() {
        assert_eq!(run(&[0x30, 5, 0, 1, b'a', b'h', b'i'], false), Ok(()));
        // "a" + U+FFFF.
        let ffff = [0x30, 6, 0, 4, b'a', 0xef, 0xbf, 0xbf];
        assert_eq!(run(&ffff, false).map_err(|v| v.rule), Err("MQTT-3.3.2-1"));
        assert!(run(&[0x30, 3, 0, 1, 0], false).is_err(), "NUL topic");
        assert!(run(&[0x32, 5, 0, 1, b'a', 0, 0], false).is_err(), "pkid 0");
        assert!(run(&[0x38, 3, 0, 1, b'a'], false).is_err(), "DUP at QoS 0");
        // MQTT 5: Message Expiry twice.
        let twice = [0x30, 14, 0, 1, b'a', 10, 2, 0, 0, 0, 1, 2, 0, 0, 0, 1];
        assert!(run(&twice, true).is_err());
        let once = [0x30, 9, 0, 1, b'a', 5, 2, 0, 0, 0, 1];
        assert_eq!(run(&once, true), Ok(()));
    }

    #[test]
    fn subscribe_rules() {
        assert_eq!(run(&[0x82, 6, 0, 1, 0, 1, b'a', 1], false), Ok(()));
        assert!(
            run(&[0x80, 6, 0, 1, 0, 1, b'a', 1], false).is_err(),
            "flags 0"
        );
        assert!(
            run(&[0x82, 6, 0, 0, 0, 1, b'a', 1], false).is_err(),
            "pkid 0"
        );
        assert!(
            run(&[0x82, 6, 0, 1, 0, 1, b'a', 0x41], false).is_err(),
            "reserved"
        );
        assert!(
            run(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x81], true).is_err(),
            "reserved 5"
        );
        assert_eq!(run(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x2d], true), Ok(()));
        assert!(run(&[0x82, 2, 0, 1], false).is_err(), "no filter");
        assert!(run(&[0xa2, 2, 0, 1], false).is_err(), "no filter");
        assert!(run(&[0x60, 2, 0, 1], false).is_err(), "PUBREL flags");
    }
}
