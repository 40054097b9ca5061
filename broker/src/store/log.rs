//! The file format: a magic line, then records, each `[length u32 LE][crc32 u32 LE][body]`.
//! A body is a kind byte and its fields:
//!
//! - `1` a retained message set: `[expires_ms u64 LE]` (Unix epoch milliseconds, 0: never)
//!   and the message as an MQTT 5 PUBLISH packet (topic, QoS, payload and properties, encoded
//!   by the same codec as on the wire);
//! - `2` a retained message cleared: the topic.
//! - `3`…`12` a change of a persistent session (`router::journal::Change`): the kind, the
//!   session's key (`[len u16 LE][bytes]`) and the change's fields, little-endian, strings
//!   as `[len u16][bytes]`; a queued message is written as a retained one is, after its
//!   number, QoS, RETAIN flag, shared group and subscription identifiers.
//!
//! Reading stops at nothing: a record whose checksum fails is skipped by looking for the
//! next place a whole, valid record starts, and everything skipped is counted.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{self, Packet, Protocol, Publish, QoS};

pub(crate) use crate::router::journal::unix_ms;
use crate::router::journal::{Change, Image};
use crate::router::message::Message;
use crate::router::session::{Queued, SubOptions};

/// The first bytes of a file of this format.
pub(crate) const MAGIC: &[u8; 16] = b"edgebus-store 1\n";
/// Bytes before a record's body: length and checksum.
const HEADER: usize = 8;
/// Longest body accepted when reading (a retained message is at most `max_payload`, itself at
/// most a few MiB; anything longer is a corrupt length).
const MAX_BODY: usize = 64 * 1024 * 1024;

const SET: u8 = 1;
const CLEAR: u8 = 2;
const OPEN: u8 = 3;
const OFFLINE: u8 = 4;
const END: u8 = 5;
const SUBSCRIBE: u8 = 6;
const UNSUBSCRIBE: u8 = 7;
const QUEUE: u8 = 8;
const RELEASED: u8 = 9;
const DONE: u8 = 10;
const INCOMING: u8 = 11;
const INCOMING_DONE: u8 = 12;
const WILL: u8 = 13;
const WILL_DONE: u8 = 14;

/// One change of stored state.
#[derive(Debug, Clone)]
pub(crate) enum Record {
    /// A retained message set.
    Set(Arc<Message>),
    /// A retained message cleared.
    Clear(Bytes),
    /// A change of the persistent session with this key.
    Session(Arc<str>, Change),
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    // Keys, client ids and filters are MQTT strings: at most 65,535 bytes.
    let len = s.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&s[..len]);
}

/// A message as the wire has it: `[expires_ms u64]` and an MQTT 5 PUBLISH.
fn put_message(out: &mut Vec<u8>, m: &Message) {
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
    let publish = Publish::with(
        qos,
        pkid,
        false,
        m.retain,
        m.topic.clone(),
        m.payload.clone(),
    );
    let mut buf = BytesMut::new();
    // The codec cannot fail on a message it decoded itself; should it, the record keeps the
    // topic and payload without properties.
    let packet = Packet::Publish(publish.clone(), m.props.clone());
    if protocol::v5::V5.write(packet, &mut buf).is_err() {
        buf.clear();
        let _ = protocol::v5::V5.write(Packet::Publish(publish, None), &mut buf);
    }
    out.extend_from_slice(&buf);
}

/// Reads what [`put_message`] wrote; the expiry interval left is what the message keeps
/// [MQTT-3.3.2-6].
fn get_message(rest: &[u8], now: Instant, now_ms: u64) -> Option<Message> {
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
    let left = match expires {
        0 => None,
        at if at <= now_ms => Some(Duration::ZERO),
        at => Some(Duration::from_millis(at - now_ms)),
    };
    if let (Some(p), Some(left)) = (props.as_mut(), left) {
        p.message_expiry_interval = Some(left.as_secs().max(1) as u32);
    }
    let qos = p.qos() as u8;
    let mut msg = Message::new(p.topic, p.payload, qos, p.retain, props, 0, now);
    msg.expires = left.map(|l| now + l);
    Some(msg)
}

/// Reads a record's fields in order.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<&'a str> {
        let len = usize::from(self.u16()?);
        std::str::from_utf8(self.take(len)?).ok()
    }
}

fn put_change(out: &mut Vec<u8>, key: &str, change: &Change) {
    let kind = match change {
        Change::Open { .. } => OPEN,
        Change::Offline { .. } => OFFLINE,
        Change::End => END,
        Change::Subscribe { .. } => SUBSCRIBE,
        Change::Unsubscribe { .. } => UNSUBSCRIBE,
        Change::Queue { .. } => QUEUE,
        Change::Released { .. } => RELEASED,
        Change::Done { .. } => DONE,
        Change::Incoming { .. } => INCOMING,
        Change::IncomingDone { .. } => INCOMING_DONE,
        Change::Will { .. } => WILL,
        Change::WillDone { .. } => WILL_DONE,
    };
    out.push(kind);
    put_str(out, key.as_bytes());
    match change {
        Change::Open {
            client_id,
            owner,
            expiry_secs,
        } => {
            put_str(out, client_id.as_bytes());
            out.push(u8::from(owner.is_some()));
            put_str(out, owner.as_deref().unwrap_or_default().as_bytes());
            out.extend_from_slice(&expiry_secs.to_le_bytes());
        }
        Change::Offline { expires_at_ms } => out.extend_from_slice(&expires_at_ms.to_le_bytes()),
        Change::End => {}
        Change::Subscribe { filter, options } => {
            put_str(out, filter.as_bytes());
            out.push(options.qos);
            let flags = u8::from(options.no_local)
                | u8::from(options.retain_as_published) << 1
                | u8::from(options.id.is_some()) << 2;
            out.push(flags);
            out.extend_from_slice(&options.id.unwrap_or(0).to_le_bytes());
        }
        Change::Unsubscribe { filter } => put_str(out, filter.as_bytes()),
        Change::Queue { n, q } => {
            out.extend_from_slice(&n.to_le_bytes());
            out.push(q.qos);
            out.push(u8::from(q.retain));
            out.push(u8::from(q.share.is_some()));
            put_str(out, q.share.as_deref().unwrap_or_default().as_bytes());
            let ids = &q.sub_ids[..q.sub_ids.len().min(usize::from(u16::MAX))];
            out.extend_from_slice(&(ids.len() as u16).to_le_bytes());
            for id in ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
            put_message(out, &q.msg);
        }
        Change::Released { n } | Change::Done { n } => out.extend_from_slice(&n.to_le_bytes()),
        Change::Incoming { pkid } | Change::IncomingDone { pkid } => {
            out.extend_from_slice(&pkid.to_le_bytes())
        }
        Change::Will { due_ms, msg } => {
            out.extend_from_slice(&due_ms.to_le_bytes());
            put_message(out, msg);
        }
        Change::WillDone { due_ms } => out.extend_from_slice(&due_ms.to_le_bytes()),
    }
}

fn get_change(kind: u8, f: &mut Fields<'_>, now: Instant, now_ms: u64) -> Option<Change> {
    Some(match kind {
        OPEN => {
            let client_id = f.str()?.to_owned();
            let has_owner = f.u8()? != 0;
            let owner = f.str()?.to_owned();
            Change::Open {
                client_id,
                owner: has_owner.then_some(owner),
                expiry_secs: f.u32()?,
            }
        }
        OFFLINE => Change::Offline {
            expires_at_ms: f.u64()?,
        },
        END => Change::End,
        SUBSCRIBE => {
            let filter = f.str()?.to_owned();
            let qos = f.u8()?.min(2);
            let flags = f.u8()?;
            let id = f.u32()?;
            Change::Subscribe {
                filter,
                options: SubOptions {
                    qos,
                    no_local: flags & 1 != 0,
                    retain_as_published: flags & 2 != 0,
                    id: (flags & 4 != 0).then_some(id),
                },
            }
        }
        UNSUBSCRIBE => Change::Unsubscribe {
            filter: f.str()?.to_owned(),
        },
        QUEUE => {
            let n = f.u64()?;
            let qos = f.u8()?.min(2);
            let retain = f.u8()? != 0;
            let has_share = f.u8()? != 0;
            let share = f.str()?;
            let share = has_share.then(|| Arc::<str>::from(share));
            let count = usize::from(f.u16()?);
            let mut sub_ids = Vec::with_capacity(count);
            for _ in 0..count {
                sub_ids.push(f.u32()?);
            }
            let msg = Arc::new(get_message(f.0, now, now_ms)?);
            let mut q = Queued::new(msg, qos, retain, share);
            q.sub_ids = sub_ids;
            q.n = n;
            Change::Queue { n, q: Box::new(q) }
        }
        RELEASED => Change::Released { n: f.u64()? },
        DONE => Change::Done { n: f.u64()? },
        INCOMING => Change::Incoming { pkid: f.u16()? },
        INCOMING_DONE => Change::IncomingDone { pkid: f.u16()? },
        WILL => Change::Will {
            due_ms: f.u64()?,
            msg: Arc::new(get_message(f.0, now, now_ms)?),
        },
        WILL_DONE => Change::WillDone { due_ms: f.u64()? },
        _ => return None,
    })
}

impl Record {
    /// Appends the record, framed, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER]);
        match self {
            Record::Set(m) => {
                out.push(SET);
                put_message(out, m);
            }
            Record::Clear(topic) => {
                out.push(CLEAR);
                out.extend_from_slice(topic);
            }
            Record::Session(key, change) => put_change(out, key, change),
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
                let mut msg = get_message(rest, now, now_ms)?;
                msg.retain = true;
                Some(Record::Set(Arc::new(msg)))
            }
            CLEAR => Some(Record::Clear(Bytes::copy_from_slice(rest))),
            _ => {
                let mut f = Fields(rest);
                let key = Arc::<str>::from(f.str()?);
                Some(Record::Session(key, get_change(kind, &mut f, now, now_ms)?))
            }
        }
    }
}

/// What reading a file found.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// The live retained messages, by topic.
    pub retained: HashMap<Bytes, Arc<Message>>,
    /// The persistent sessions, by key.
    pub sessions: HashMap<Arc<str>, Image>,
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
                    Some(Record::Session(key, change)) => {
                        Image::apply(&mut out.sessions, key, change);
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
    records: impl Iterator<Item = &'a Record>,
) -> io::Result<u64> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    let mut buf = MAGIC.to_vec();
    for r in records {
        r.encode(&mut buf);
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
    fn session_changes_read_back_as_written() {
        let key: Arc<str> = Arc::from("id\u{0}user");
        let mut q = Queued::new(
            msg("q/1", "hello"),
            2,
            true,
            Some(Arc::from("$share/g/q/#")),
        );
        q.sub_ids = vec![3, 70_000];
        q.n = 41;
        let changes = [
            Change::Open {
                client_id: "id".into(),
                owner: Some("user".into()),
                expiry_secs: 3600,
            },
            Change::Subscribe {
                filter: "q/#".into(),
                options: SubOptions {
                    qos: 2,
                    no_local: true,
                    retain_as_published: false,
                    id: Some(3),
                },
            },
            Change::Queue {
                n: 41,
                q: Box::new(q),
            },
            Change::Incoming { pkid: 9 },
            Change::Offline {
                expires_at_ms: unix_ms() + 60_000,
            },
        ];
        let records: Vec<Record> = changes
            .iter()
            .map(|c| Record::Session(key.clone(), c.clone()))
            .collect();
        let l = parse(&file(&records));
        assert_eq!((l.records, l.skipped_bytes), (5, 0));
        let image = &l.sessions[&key];
        assert_eq!(image.owner.as_deref(), Some("user"));
        assert_eq!(image.expiry_secs, 3600);
        assert!(image.subscriptions["q/#"].no_local);
        assert_eq!(image.subscriptions["q/#"].id, Some(3));
        let q = &image.queue[&41];
        assert_eq!((q.qos, q.retain, q.n), (2, true, 41));
        assert_eq!(q.sub_ids, [3, 70_000]);
        assert_eq!(q.share.as_deref(), Some("$share/g/q/#"));
        assert_eq!(&q.msg.payload[..], b"hello");
        assert!(image.incoming.contains(&9));
        assert!(image.left(unix_ms()).is_some());
        let ended = file(&[
            records[0].clone(),
            Record::Session(key.clone(), Change::End),
        ]);
        assert!(parse(&ended).sessions.is_empty());
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
