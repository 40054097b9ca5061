//! What a persistent session tells the store, and the store's side of it.
//!
//! A session whose client asked it to outlive its connection (MQTT 5 Session Expiry Interval
//! above 0, or a 3.1.1 CleanSession 0) is *journaled*: every change of what it holds is
//! recorded, under the session's lock, so the store's file has them in the order they were
//! made. The records are absolute (they name a message by its number in the session, not by
//! its place in the queue), so replaying any suffix of them over a later image of the
//! session gives the same session; the store compacts on that.
//!
//! Only QoS 1/2 messages are recorded. QoS 0 messages queued for an offline session stay in
//! memory, and a crash may lose them, as the specification allows for QoS 0.
//!
//! # Packet ids
//! A journaled message's packet id is its number in the session, modulo 65,535 ([`pkid_of`]):
//! after a restart each message goes again with the packet id it had [MQTT-4.4.0-1], so a
//! client that holds a QoS 2 packet id waiting for its PUBREL does not take the resent
//! message for a new one [MQTT-4.3.3-9]. A PUBREC is recorded before the PUBREL goes: after
//! a restart the broker sends that PUBREL again, not the PUBLISH.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::message::{Message, Queued, SubOptions};

/// One change of a persistent session.
#[derive(Debug, Clone)]
pub(crate) enum Change {
    /// A connection took the session: who it belongs to and its Session Expiry Interval.
    /// Replaces what an earlier one said, and means "connected" until `Offline`.
    Open {
        client_id: String,
        owner: Option<String>,
        expiry_secs: u32,
    },
    /// The connection left; the session ends at this wall-clock time (Unix milliseconds).
    Offline { expires_at_ms: u64 },
    /// The session ended: everything recorded for it is gone.
    End,
    /// A subscription added or replaced.
    Subscribe { filter: String, options: SubOptions },
    /// A subscription removed.
    Unsubscribe { filter: String },
    /// A QoS 1/2 message queued, numbered `n` in the session.
    Queue { n: u64, q: Box<Queued> },
    /// The client's PUBREC for message `n` came: what is left is its PUBREL.
    Released { n: u64 },
    /// Message `n` is done: acknowledged, expired or never to be sent.
    Done { n: u64 },
    /// The client's QoS 2 PUBLISH with this packet id was routed; its PUBREL has not come.
    Incoming { pkid: u16 },
    /// That PUBREL came.
    IncomingDone { pkid: u16 },
    /// The session's Last Will waits for its delay, until `due_ms` (Unix milliseconds).
    Will { due_ms: u64, msg: Arc<Message> },
    /// The will due at `due_ms` was published, or cancelled by a client taking the session
    /// again (a later will of the session is not touched).
    WillDone { due_ms: u64 },
}

/// Where a journaled session's changes go: the store.
pub(crate) trait Journal: Send + Sync + std::fmt::Debug {
    /// Records `change` of the session `key`; returns the sequence number to wait for
    /// before telling a client it is stored.
    fn record(&self, key: &Arc<str>, change: Change) -> u64;
}

/// Unix epoch milliseconds now (what the store writes: a restart keeps wall-clock time).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A persistent session as its records rebuild it, when the broker starts.
#[derive(Debug, Default)]
pub(crate) struct Image {
    pub client_id: String,
    pub owner: Option<String>,
    /// Its Session Expiry Interval.
    pub expiry_secs: u32,
    /// When it expires (Unix milliseconds); 0 while a client was connected to it.
    pub expires_at_ms: u64,
    pub subscriptions: BTreeMap<String, SubOptions>,
    /// Its QoS 1/2 messages not done, by number.
    pub queue: BTreeMap<u64, Queued>,
    /// Messages whose PUBREC came, waiting for PUBCOMP.
    pub released: BTreeSet<u64>,
    /// Packet ids of the client's QoS 2 PUBLISHes waiting for their PUBREL.
    pub incoming: BTreeSet<u16>,
    /// The highest message number seen.
    pub last_n: u64,
    /// Its delayed Last Will, and when it is due (Unix milliseconds).
    pub will: Option<(u64, Arc<Message>)>,
}

impl Image {
    /// Replays one change of session `key` onto `images`. A change of a session with no
    /// `Open` before it (its start was compacted away or damaged) is ignored.
    pub fn apply(images: &mut HashMap<Arc<str>, Image>, key: Arc<str>, change: Change) {
        if let Change::Open {
            client_id,
            owner,
            expiry_secs,
        } = change
        {
            let image = images.entry(key).or_default();
            image.client_id = client_id;
            image.owner = owner;
            image.expiry_secs = expiry_secs;
            image.expires_at_ms = 0;
            return;
        }
        if matches!(change, Change::End) {
            images.remove(&key);
            return;
        }
        let Some(image) = images.get_mut(&key) else {
            return;
        };
        if let Change::Queue { n, .. } | Change::Released { n } | Change::Done { n } = &change {
            image.last_n = image.last_n.max(*n);
        }
        match change {
            Change::Open { .. } | Change::End => {}
            Change::Offline { expires_at_ms } => image.expires_at_ms = expires_at_ms,
            Change::Subscribe { filter, options } => {
                image.subscriptions.insert(filter, options);
            }
            Change::Unsubscribe { filter } => {
                image.subscriptions.remove(&filter);
            }
            Change::Queue { n, q } => {
                image.queue.insert(n, *q);
            }
            Change::Released { n } => {
                image.queue.remove(&n);
                image.released.insert(n);
            }
            Change::Done { n } => {
                image.queue.remove(&n);
                image.released.remove(&n);
            }
            Change::Incoming { pkid } => {
                image.incoming.insert(pkid);
            }
            Change::IncomingDone { pkid } => {
                image.incoming.remove(&pkid);
            }
            Change::Will { due_ms, msg } => image.will = Some((due_ms, msg)),
            Change::WillDone { due_ms } => {
                if image.will.as_ref().is_some_and(|(due, _)| *due == due_ms) {
                    image.will = None;
                }
            }
        }
    }

    /// How long it has left at `now_ms`; None when it has expired (or had no expiry). A
    /// session whose client was connected when the broker stopped has its whole interval.
    pub fn left(&self, now_ms: u64) -> Option<Duration> {
        if self.expiry_secs == 0 {
            return None;
        }
        if self.expires_at_ms == 0 {
            return Some(Duration::from_secs(u64::from(self.expiry_secs)));
        }
        (self.expires_at_ms > now_ms).then(|| Duration::from_millis(self.expires_at_ms - now_ms))
    }

    /// The number its next message gets.
    pub fn next_n(&self) -> u64 {
        self.last_n + 1
    }
}

/// The packet id of a journaled session's message `n` (n ≥ 1).
pub(crate) fn pkid_of(n: u64) -> u16 {
    ((n - 1) % u64::from(u16::MAX)) as u16 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_will_done_leaves_a_newer_will() {
        let key: Arc<str> = Arc::from("k");
        let msg = Arc::new(Message::for_test("w", b"gone"));
        let mut images = HashMap::new();
        let open = Change::Open {
            client_id: "c".into(),
            owner: None,
            expiry_secs: 60,
        };
        for c in [
            open,
            Change::Will {
                due_ms: 5,
                msg: msg.clone(),
            },
            Change::Will { due_ms: 9, msg },
            Change::WillDone { due_ms: 5 },
        ] {
            Image::apply(&mut images, key.clone(), c);
        }
        assert_eq!(images[&key].will.as_ref().map(|w| w.0), Some(9));
        Image::apply(&mut images, key.clone(), Change::WillDone { due_ms: 9 });
        assert!(images[&key].will.is_none());
    }

    #[test]
    fn packet_ids_cycle_through_every_valid_one() {
        assert_eq!(pkid_of(1), 1);
        assert_eq!(pkid_of(65_535), 65_535);
        assert_eq!(pkid_of(65_536), 1, "0 is never a packet id [MQTT-2.2.1-3]");
    }
}
