//! What the connection task and the client loop share about a peer: the MQTT version it
//! speaks (and the codec calls, which never panic past it), why its connection ended, and how
//! what it sends is logged (cut to a log line's length, at most once a second when repeated).

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{self, Packet, Protocol};
use tokio::time::Instant;

/// Which MQTT version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V311,
    V5,
}

impl Version {
    pub fn decode(self, buf: &mut BytesMut, max: usize) -> Result<Packet, String> {
        // rumqttd's codecs have `unreachable!()` arms; a panic here must cost one connection.
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| match self {
            Version::V311 => protocol::v4::V4.read_mut(buf, max),
            Version::V5 => protocol::v5::V5.read_mut(buf, max),
        }));
        match r {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("codec panicked on this packet".into()),
        }
    }

    pub fn encode(self, packet: Packet, out: &mut BytesMut) -> Result<(), String> {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| match self {
            Version::V311 => protocol::v4::V4.write(packet, out),
            Version::V5 => protocol::v5::V5.write(packet, out),
        }));
        match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("codec panicked writing this packet".into()),
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The client sent DISCONNECT; `with_will` for MQTT 5 reason 0x04.
    Disconnect { with_will: bool },
    /// The socket closed or failed.
    Closed(String),
    /// The client broke the protocol.
    Protocol(String),
    /// No packet within 1.5 × keep-alive.
    KeepAlive,
    /// Another connection took over the client id.
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
    /// The client read nothing for `write_timeout`.
    Stalled(String),
    /// The client's token expired.
    TokenExpired,
}

/// What a client sent, cut to a length fit for a log line (a client id or topic can be
/// 64 KiB).
pub(crate) fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 96;
    if s.len() <= MAX {
        return s.into();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len()).into()
}

/// Lets a repeated event be logged at most once a second, with the count in between.
#[derive(Default)]
pub(crate) struct Throttle {
    since: u64,
    last: Option<Instant>,
}

impl Throttle {
    /// Counts one event; `Some(events since the last line, this one included)` when a line
    /// is due.
    pub fn tick(&mut self) -> Option<u64> {
        self.since += 1;
        if self
            .last
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}

/// Removes everything MQTT 3.1.1 cannot carry.
pub(crate) fn strip_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        Packet::ConnAck(p, _) => Packet::ConnAck(p, None),
        other => other,
    }
}
