//! The file format: a magic line, then records, each `[length u32 LE][crc32 u32 LE][body]`.
//! A body is a kind byte and its fields:
//!
//! - `1` a retained message set: `[expires_ms u64 LE]` (Unix epoch milliseconds, 0: never)
//!   and the message as an MQTT 5 PUBLISH packet (topic, QoS, payload and properties, encoded
//!   by the same codec as on the wire);
//! - `2` a retained message cleared: the topic.
//!
//! Reading stops at nothing: a record whose checksum fails is skipped by looking for the
//! next place a whole, valid record starts, and everything skipped is counted.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{self, Packet, Protocol, Publish, QoS};

use crate::router::message::Message;

/// The first bytes of a file of this format.
pub(crate) const MAGIC: &[u8; 16] = b"edgebus-store 1\n";
/// Bytes before a record's body: length and checksum.
const HEADER: usize = 8;
/// Longest body accepted when reading (a retained message is at most `max_payload`, itself at
/// most a few MiB; anything longer is a corrupt length).
const MAX_BODY: usize = 64 * 1024 * 1024;

const SET: u8 = 1;
const CLEAR: u8 = 2;

/// One change of stored state.
#[derive(Debug, Clone)]
pub(crate) enum Record {
    /// A retained message set.
    Set(std::sync::Arc<Message>),
    /// A retained message cleared.
    Clear(Bytes),
}

/// Unix epoch milliseconds now.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Record {
    /// Appends the record, framed, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER]);
        match self {
            Record::Set(m) => {
                out.push(SET);
                let expires = m.expires.map_or(0, |at| {
                    let left = at.saturating_duration_since(Instant::now());
                    (unix_ms() + left.as_millis() as u64).max(1)
                });
                out.extend_from_slice(&expires.to_le_bytes());
                let qos = match m.qos {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => QoS::ExactlyOnce,
                };
                let pkid = if m.qos == 0 { 0 } else { 1 };
                let publish =
                    Publish::with(qos, pkid, false, true, m.topic.clone(), m.payload.clone());
                let mut buf = BytesMut::new();
                // The codec cannot fail on a message it decoded itself; should it, the record
                // keeps the topic and payload without properties.
                let packet = Packet::Publish(publish.clone(), m.props.clone());
                if protocol::v5::V5.write(packet, &mut buf).is_err() {
                    buf.clear();
                    let _ = protocol::v5::V5.write(Packet::Publish(publish, None), &mut buf);
                }
                out.extend_from_slice(&buf);
            }
            Record::Clear(topic) => {
                out.push(CLEAR);
                out.extend_from_slice(topic);
            }
        }
        let body = &out[start + HEADER..];
        let len = (body.len() as u32).to_le_bytes();
        let crc = crc32fast::hash(body).to_le_bytes();
        out[start..start + 4].copy_from_slice(&len);
        out[start + 4..start + 8].copy_from_slice(&crc);
    }

    /// Reads one body (checksum already checked). `None`: not a record this version knows.
    fn decode(body: &[u8], now: Instant, now_ms: u64) -> Option<Record> {
        let (&kind, rest) = body.split_first()?;
        match kind {
            SET => {
                let (expires, packet) = rest.split_at_checked(8)?;
                let expires = u64::from_le_bytes(expires.try_into().ok()?);
                let mut buf = BytesMut::from(packet);
                let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    protocol::v5::V5.read_mut(&mut buf, MAX_BODY)
                }));
                let Ok(Ok(Packet::Publish(p, props))) = read else {
                    return None;
                };
                let mut props = props;
                // The expiry interval left is what the message keeps [MQTT-3.3.2-6].
                let left = match expires {
                    0 => None,
                    at if at <= now_ms => Some(Duration::ZERO),
                    at => Some(Duration::from_millis(at - now_ms)),
                };
                if let (Some(p), Some(left)) = (props.as_mut(), left) {
                    p.message_expiry_interval = Some(left.as_secs().max(1) as u32);
                }
                let qos = p.qos() as u8;
                let mut msg = Message::new(p.topic, p.payload, qos, true, props, 0, now);
                msg.expires = left.map(|l| now + l);
                Some(Record::Set(std::sync::Arc::new(msg)))
            }
            CLEAR => Some(Record::Clear(Bytes::copy_from_slice(rest))),
            _ => None,
        }
    }
}

/// What reading a file found.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// The live retained messages, by topic.
    pub retained: HashMap<Bytes, std::sync::Arc<Message>>,
    /// Records read.
    pub records: usize,
    /// Bytes that held no valid record (a torn tail, a corrupt record), skipped.
    pub skipped_bytes: usize,
    /// Runs of skipped bytes.
    pub skipped_runs: usize,
    /// Whether the skipped bytes ended the file (a write cut short) rather than sat between
    /// valid records (corruption).
    pub torn_tail: bool,
    /// The file's length.
    pub file_bytes: u64,
}

/// Where a valid record starts at `at`, its body and the offset after it.
fn record_at(data: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let header = data.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    if len == 0 || len > MAX_BODY {
        return None;
    }
    let body = data.get(at + HEADER..at + HEADER + len)?;
    (crc32fast::hash(body) == crc).then_some((body, at + HEADER + len))
}

/// Reads the file at `path` (a missing file is an empty store).
pub(crate) fn load(path: &Path) -> io::Result<Loaded> {
    let mut data = Vec::new();
    match std::fs::File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut data)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(e) => return Err(e),
    }
    Ok(parse(&data))
}

/// Reads a file's bytes.
pub(crate) fn parse(data: &[u8]) -> Loaded {
    let now = Instant::now();
    let now_ms = unix_ms();
    let mut out = Loaded {
        file_bytes: data.len() as u64,
        ..Loaded::default()
    };
    let mut at = if data.starts_with(MAGIC) {
        MAGIC.len()
    } else if data.is_empty() {
        0
    } else {
        // Not ours, or its first bytes are damaged: look for records all the same.
        out.skipped_runs += 1;
        0
    };
    let mut skipping: Option<usize> = None;
    while at < data.len() {
        match record_at(data, at) {
            Some((body, next)) => {
                if let Some(from) = skipping.take() {
                    out.skipped_bytes += at - from;
                    out.skipped_runs += 1;
                }
                out.records += 1;
                match Record::decode(body, now, now_ms) {
                    Some(Record::Set(m)) => {
                        if m.expired(now) {
                            out.retained.remove(&m.topic);
                        } else {
                            out.retained.insert(m.topic.clone(), m);
                        }
                    }
                    Some(Record::Clear(t)) => {
                        out.retained.remove(&t);
                    }
                    None => {}
                }
                at = next;
            }
            None => {
                skipping.get_or_insert(at);
                at += 1;
            }
        }
    }
    if let Some(from) = skipping {
        out.skipped_bytes += data.len() - from;
        out.skipped_runs += 1;
        out.torn_tail = true;
    }
    out
}

/// Writes `records` as a whole new file at `path`, atomically: to a temporary file, synced,
/// renamed over `path`, and the directory synced.
pub(crate) fn write_file<'a>(
    path: &Path,
    records: impl Iterator<Item = &'a std::sync::Arc<Message>>,
) -> io::Result<u64> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    let mut buf = MAGIC.to_vec();
    for m in records {
        Record::Set(m.clone()).encode(&mut buf);
        if buf.len() > 1 << 20 {
            f.write_all(&buf)?;
            buf.clear();
        }
    }
    f.write_all(&buf)?;
    f.sync_data()?;
    let len = f.metadata()?.len();
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::PublishProperties;
    use std::sync::Arc;

    fn msg(topic: &str, payload: &str) -> Arc<Message> {
        let props = PublishProperties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        Arc::new(Message::new(
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(payload.as_bytes()),
            1,
            true,
            Some(props),
            7,
            Instant::now(),
        ))
    }

    fn file(records: &[Record]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for r in records {
            r.encode(&mut out);
        }
        out
    }

    #[test]
    fn sets_and_clears_replay_to_the_last_state_with_properties() {
        let data = file(&[
            Record::Set(msg("a", "1")),
            Record::Set(msg("b", "2")),
            Record::Set(msg("a", "3")),
            Record::Clear(Bytes::from_static(b"b")),
        ]);
        let l = parse(&data);
        assert_eq!(l.records, 4);
        assert_eq!(l.skipped_bytes, 0);
        assert_eq!(l.retained.len(), 1);
        let a = &l.retained[&Bytes::from_static(b"a")];
        assert_eq!(&a.payload[..], b"3");
        assert_eq!(a.qos, 1);
        assert!(a.retain);
        let props = a.props.as_ref().expect("properties kept");
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(props.user_properties, vec![("k".into(), "v".into())]);
    }

    #[test]
    fn a_torn_tail_is_dropped_and_counted() {
        let mut data = file(&[Record::Set(msg("a", "1")), Record::Set(msg("b", "2"))]);
        let whole = data.len();
        data.truncate(whole - 5);
        let l = parse(&data);
        assert_eq!(l.retained.len(), 1);
        assert!(l.torn_tail);
        assert_eq!(l.skipped_runs, 1);
        assert!(l.skipped_bytes > 0);
    }

    #[test]
    fn a_flipped_byte_in_the_middle_costs_that_record_only() {
        let mut data = file(&[
            Record::Set(msg("a", "1")),
            Record::Set(msg("b", "22222222")),
            Record::Set(msg("c", "3")),
        ]);
        // A byte inside b's payload.
        let at = data
            .windows(8)
            .position(|w| w == b"22222222")
            .expect("b's payload");
        data[at + 3] ^= 0x40;
        let l = parse(&data);
        let mut topics: Vec<_> = l.retained.keys().cloned().collect();
        topics.sort();
        assert_eq!(topics, [Bytes::from_static(b"a"), Bytes::from_static(b"c")]);
        assert_eq!(l.skipped_runs, 1);
        assert!(!l.torn_tail);
    }

    #[test]
    fn expired_messages_are_not_restored_and_the_others_keep_their_time_left() {
        let now = Instant::now();
        let props = PublishProperties {
            message_expiry_interval: Some(100),
            ..Default::default()
        };
        let long = Arc::new(Message::new(
            Bytes::from_static(b"long"),
            Bytes::from_static(b"x"),
            0,
            true,
            Some(props),
            0,
            now,
        ));
        let mut short = Message::new(
            Bytes::from_static(b"short"),
            Bytes::from_static(b"x"),
            0,
            true,
            None,
            0,
            now,
        );
        short.expires = Some(now);
        let data = file(&[Record::Set(long), Record::Set(Arc::new(short))]);
        std::thread::sleep(Duration::from_millis(5));
        let l = parse(&data);
        assert_eq!(l.retained.len(), 1);
        let left = l.retained[&Bytes::from_static(b"long")]
            .props
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .expect("interval");
        assert!((99..=100).contains(&left), "{left}");
    }
}
