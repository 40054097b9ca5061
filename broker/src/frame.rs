//! Just enough MQTT framing to check a packet before rumqttd's codecs see it.
//!
//! rumqttd's codecs hit `unreachable!()` on some packet types a client must never send, and
//! hide the QoS and packet id of a PUBLISH behind `pub(crate)` fields. This module reads the
//! fixed header and the protocol level of a CONNECT straight from the bytes, without
//! allocating.

/// MQTT control packet types.
pub(crate) mod kind {
    pub const CONNECT: u8 = 1;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const PINGREQ: u8 = 12;
    pub const DISCONNECT: u8 = 14;
}

/// The name of a packet type, for log lines.
pub(crate) fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "CONNECT",
        2 => "CONNACK",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        8 => "SUBSCRIBE",
        9 => "SUBACK",
        10 => "UNSUBSCRIBE",
        11 => "UNSUBACK",
        12 => "PINGREQ",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        15 => "AUTH",
        _ => "reserved type 0",
    }
}

/// A complete frame at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    /// First byte: type in the high nibble, flags in the low one.
    pub byte1: u8,
    /// Fixed header length (2 to 5 bytes).
    pub header_len: usize,
    /// Remaining length.
    pub remaining: usize,
}

impl Frame {
    pub fn kind(&self) -> u8 {
        self.byte1 >> 4
    }

    pub fn len(&self) -> usize {
        self.header_len + self.remaining
    }

    /// QoS bits of a PUBLISH.
    pub fn qos(&self) -> u8 {
        (self.byte1 >> 1) & 0b11
    }
}

/// What [`check`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// More bytes are needed.
    Incomplete,
    /// A whole frame is buffered.
    Ready(Frame),
    /// The frame announces more than the limit.
    TooLarge(usize),
    /// The remaining length is not a valid variable byte integer.
    Malformed,
}

/// Looks for a whole frame at the start of `buf`.
pub(crate) fn check(buf: &[u8], max_remaining: usize) -> Check {
    if buf.len() < 2 {
        return Check::Incomplete;
    }
    let mut remaining = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        if i > 4 {
            return Check::Malformed;
        }
        let Some(&b) = buf.get(i) else {
            return Check::Incomplete;
        };
        remaining |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    if remaining > max_remaining {
        return Check::TooLarge(remaining);
    }
    let frame = Frame {
        byte1: buf[0],
        header_len: i,
        remaining,
    };
    if buf.len() < frame.len() {
        Check::Incomplete
    } else {
        Check::Ready(frame)
    }
}

/// The protocol level a CONNECT asks for (4 = MQTT 3.1.1, 5 = MQTT 5, 3 = MQTT 3.1).
pub(crate) fn connect_level(buf: &[u8], frame: Frame) -> Option<u8> {
    let body = buf.get(frame.header_len..frame.len())?;
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    body.get(2 + name_len).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(check(&[0x30], 10), Check::Incomplete);
        assert_eq!(
            check(&[0xc0, 0x00], 10),
            Check::Ready(Frame {
                byte1: 0xc0,
                header_len: 2,
                remaining: 0
            })
        );
        assert_eq!(check(&[0x30, 0x05, 1, 2], 10), Check::Incomplete);
        assert_eq!(
            check(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 10),
            Check::Malformed
        );
        assert_eq!(check(&[0x30, 0x80, 0x01], 100), Check::TooLarge(128));
    }

    #[test]
    fn connect_levels() {
        let buf = [0x10, 7, 0, 4, b'M', b'Q', b'T', b'T', 5];
        let Check::Ready(f) = check(&buf, 100) else {
            panic!("frame")
        };
        assert_eq!(connect_level(&buf, f), Some(5));
    }
}
