//! A session: the subscriptions of one client id (of one identity), the messages queued for
//! it, and the QoS 1/2 messages in flight to it.
//!
//! The queue is bounded in messages and bytes. Publishers append to it from their own task
//! and wake the session's connection task ([`Session::ready`]); a publisher that finds it full
//! waits for [`Session::room`] while the subscriber is connected (that wait is the
//! backpressure: its socket is not read meanwhile), and drops the message, counted, when the
//! session is offline.
//!
//! In flight, at most the client's Receive Maximum QoS 1/2 messages wait for their
//! acknowledgement [MQTT-3.3.4-9]; they are sent again, with DUP, when the session resumes
//! [MQTT-4.4.0-1].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::journal::{pkid_of, unix_ms, Change, Image, Journal};
#[cfg(test)]
use super::message::Message;
pub(crate) use super::message::{Queued, SubOptions};
use crate::acl::AclRule;

/// What is waiting for an acknowledgement.
#[derive(Debug)]
enum Inflight {
    /// A PUBLISH, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Publish(Queued),
    /// PUBREL sent, waiting for PUBCOMP; the message's number if journaled.
    Released(u64),
}

/// What to send to the client.
#[derive(Debug)]
pub(crate) enum Out {
    /// A PUBLISH: packet id 0 at QoS 0.
    Publish { pkid: u16, dup: bool, q: Queued },
    /// A PUBREL for a message the client PUBRECed.
    PubRel(u16),
}

/// Why a message did not go into a queue.
#[derive(Debug)]
pub(crate) enum Full {
    /// The queue is at its bound; the message is given back.
    Queue(Queued),
}

/// Bounds of a session's queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub messages: usize,
    pub bytes: usize,
}

#[derive(Debug)]
struct State {
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    inflight: VecDeque<(u16, Inflight)>,
    next_pkid: u16,
    /// The client's Receive Maximum.
    window: usize,
    /// Incoming QoS 2 packet ids whose PUBREL has not come [MQTT-4.3.3-10].
    incoming_qos2: HashSet<u16>,
    /// Filters as the client wrote them (shared ones with their `$share/group/`).
    subscriptions: HashMap<String, SubOptions>,
    /// Session Expiry Interval.
    expiry: Duration,
    offline_since: Option<Instant>,
    /// Last time the client took a message or acknowledged one.
    progress: Instant,
    /// Messages dropped since the last report, and the topic of the first.
    dropped: u64,
    dropped_topic: String,
    /// Where its changes are recorded, while it is persistent.
    journal: Option<Journaled>,
}

/// A journaled session's link to the store.
#[derive(Debug)]
struct Journaled {
    key: Arc<str>,
    sink: Arc<dyn Journal>,
    /// The number the next QoS 1/2 message gets.
    next_n: u64,
}

impl Journaled {
    fn record(&self, change: Change) -> u64 {
        self.sink.record(&self.key, change)
    }
}

/// The store a session may record its changes in, and its key there.
pub(crate) type JournalLink<'a> = Option<(&'a Arc<str>, &'a Arc<dyn Journal>)>;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Session {
    id: u64,
    client_id: String,
    owner: Option<String>,
    /// What the credentials of its latest connection grant beyond the configured ACL (a
    /// token's permissions); read when a message is routed to it.
    grants: Mutex<Arc<[AclRule]>>,
    state: Mutex<State>,
    connected: AtomicBool,
    /// Counts attaches: a connection leaves only the attachment it made.
    attached: std::sync::atomic::AtomicU64,
    /// Set when a publisher gave up waiting for this session's client.
    evicted: AtomicBool,
    /// Wakes the connection task: something to send.
    pub ready: Notify,
    /// Wakes publishers waiting for room in the queue.
    pub room: Notify,
    /// Wakes the connection task when it is to close (see [`Session::evict`]).
    pub evicted_wake: Notify,
    bounds: Bounds,
}

impl Session {
    /// A new, offline session.
    pub fn new(id: u64, client_id: &str, owner: Option<&str>, bounds: Bounds) -> Arc<Session> {
        Arc::new(Session {
            id,
            client_id: client_id.to_owned(),
            owner: owner.map(str::to_owned),
            grants: Mutex::new(Arc::from([])),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued_bytes: 0,
                inflight: VecDeque::new(),
                next_pkid: 1,
                window: 65_535,
                incoming_qos2: HashSet::new(),
                subscriptions: HashMap::new(),
                expiry: Duration::ZERO,
                // Not offline until a connection leaves it: a session being opened must not
                // expire before its connection attaches.
                offline_since: None,
                progress: Instant::now(),
                dropped: 0,
                dropped_topic: String::new(),
                journal: None,
            }),
            connected: AtomicBool::new(false),
            attached: std::sync::atomic::AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            ready: Notify::new(),
            room: Notify::new(),
            evicted_wake: Notify::new(),
            bounds,
        })
    }

    #[cfg(test)]
    pub fn new_for_test(client_id: &str) -> Arc<Session> {
        Session::new(
            0,
            client_id,
            None,
            Bounds {
                messages: 10,
                bytes: 1 << 20,
            },
        )
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The router's id for it (messages carry it as their origin, for No Local).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The user that owns it.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// What its client's credentials grant beyond the configured ACL.
    pub fn grants(&self) -> Arc<[AclRule]> {
        self.grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets what its client's credentials grant: each connection's own.
    pub fn set_grants(&self, grants: Arc<[AclRule]>) {
        *self.grants.lock().unwrap_or_else(|e| e.into_inner()) = grants;
    }

    /// Whether a connection serves it now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Relaxed)
    }

    /// Asks the connection serving it to close: its client took nothing for too long.
    pub fn evict(&self) {
        self.evicted.store(true, Relaxed);
        self.ready.notify_one();
        self.evicted_wake.notify_one();
    }

    /// Whether the connection was asked to close (and clears the request).
    pub fn take_evicted(&self) -> bool {
        self.evicted.swap(false, Relaxed)
    }

    /// A connection takes it: `window` is the client's Receive Maximum, `expiry` its Session
    /// Expiry Interval. With `journal`, a session that is to outlive its connection is
    /// recorded from now on. Returns the attachment (to leave it with) and what was in
    /// flight, to send again first.
    pub fn attach(
        &self,
        window: u16,
        expiry: Duration,
        journal: JournalLink<'_>,
    ) -> (u64, Vec<Out>) {
        use futures_util::FutureExt;
        let mut s = self.state();
        let open = || Change::Open {
            client_id: self.client_id.clone(),
            owner: self.owner.clone(),
            expiry_secs: u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX),
        };
        match (&s.journal, journal) {
            (Some(j), _) => {
                j.record(open());
            }
            (None, Some((key, sink))) if !expiry.is_zero() => {
                let j = Journaled {
                    key: key.clone(),
                    sink: sink.clone(),
                    next_n: 1,
                };
                j.record(open());
                // A session a clean one took over keeps its subscriptions; its queued
                // messages stay unnumbered (in memory only).
                for (filter, options) in &s.subscriptions {
                    j.record(Change::Subscribe {
                        filter: filter.clone(),
                        options: *options,
                    });
                }
                s.journal = Some(j);
            }
            _ => {}
        }
        let attachment = self.attached.fetch_add(1, Relaxed) + 1;
        // An eviction of the connection before is not this one's.
        self.evicted.store(false, Relaxed);
        let _ = self.evicted_wake.notified().now_or_never();
        s.window = usize::from(window.max(1));
        s.expiry = expiry;
        s.offline_since = None;
        s.progress = Instant::now();
        self.connected.store(true, Relaxed);
        let resend = s
            .inflight
            .iter()
            .map(|(pkid, f)| match f {
                Inflight::Publish(q) => Out::Publish {
                    pkid: *pkid,
                    dup: true,
                    q: q.clone(),
                },
                Inflight::Released(_) => Out::PubRel(*pkid),
            })
            .collect();
        (attachment, resend)
    }

    /// The connection of `attachment` is gone; `expiry` is the Session Expiry Interval that
    /// now applies. False (and nothing done) when a later connection took the session.
    pub fn detach(&self, attachment: u64, expiry: Duration) -> bool {
        let mut s = self.state();
        if self.attached.load(Relaxed) != attachment {
            return false;
        }
        s.expiry = expiry;
        s.offline_since = Some(Instant::now());
        self.connected.store(false, Relaxed);
        if let Some(j) = s.journal.as_ref().filter(|_| !expiry.is_zero()) {
            j.record(Change::Offline {
                expires_at_ms: unix_ms().saturating_add(expiry.as_millis() as u64),
            });
        }
        drop(s);
        // Publishers waiting for room stop waiting for a client that is gone.
        self.room.notify_waiters();
        true
    }

    /// When an offline session expires.
    pub fn expires_at(&self) -> Option<Instant> {
        let s = self.state();
        s.offline_since.map(|at| at + s.expiry)
    }

    /// Appends a message, or gives it back when the queue is full. A QoS 1/2 message
    /// queued in a journaled session is recorded: the sequence number returned is the one to
    /// wait for before acknowledging its PUBLISH.
    pub fn push(&self, mut q: Queued) -> Result<Option<u64>, Full> {
        let mut s = self.state();
        let size = q.msg.size();
        if s.queue.len() >= self.bounds.messages
            || (s.queued_bytes + size > self.bounds.bytes && !s.queue.is_empty())
        {
            return Err(Full::Queue(q));
        }
        let mut seq = None;
        if let Some(j) = s.journal.as_mut().filter(|_| q.qos > 0) {
            q.n = j.next_n;
            j.next_n += 1;
            seq = Some(j.record(Change::Queue {
                n: q.n,
                q: Box::new(q.clone()),
            }));
        }
        s.queued_bytes += size;
        s.queue.push_back(q);
        drop(s);
        self.ready.notify_one();
        Ok(seq)
    }

    /// The session ends: nothing more of it is recorded, and the store forgets it.
    pub fn forget(&self) {
        if let Some(j) = self.state().journal.take() {
            j.record(Change::End);
        }
    }

    /// Counts a message to `topic` dropped for this session; returns the count since the
    /// last report.
    pub fn count_drop(&self, topic: &str) -> u64 {
        let mut s = self.state();
        if s.dropped == 0 {
            s.dropped_topic = topic.to_owned();
        }
        s.dropped += 1;
        s.dropped
    }

    /// Takes the drops to report: how many, and the topic of the first.
    pub fn take_drops(&self) -> (u64, String) {
        let mut s = self.state();
        (
            std::mem::take(&mut s.dropped),
            std::mem::take(&mut s.dropped_topic),
        )
    }

    /// How long the client has taken nothing while messages waited for it.
    pub fn stalled_for(&self, now: Instant) -> Duration {
        let s = self.state();
        if s.queue.is_empty() {
            return Duration::ZERO;
        }
        now.saturating_duration_since(s.progress)
    }

    /// Takes what can be sent now: QoS 0 messages, and QoS 1/2 ones while the in-flight
    /// window has room (each gets a packet id). Expired messages are dropped [MQTT-3.3.2-5];
    /// their count is returned beside what to send.
    pub fn take(&self, now: Instant, out: &mut Vec<Out>) -> u64 {
        let mut s = self.state();
        let mut expired = 0;
        let mut took = false;
        while let Some(front) = s.queue.front() {
            if front.qos > 0 && s.inflight.len() >= s.window {
                break;
            }
            // A numbered message goes with its own packet id, once that is free.
            let own = (front.n > 0).then(|| pkid_of(front.n));
            if own.is_some_and(|p| s.inflight.iter().any(|(x, _)| *x == p)) {
                break;
            }
            let Some(q) = s.queue.pop_front() else { break };
            took = true;
            s.queued_bytes -= q.msg.size();
            if q.msg.expired(now) {
                expired += 1;
                if let Some(j) = s.journal.as_ref().filter(|_| q.n > 0) {
                    j.record(Change::Done { n: q.n });
                }
                continue;
            }
            if q.qos == 0 {
                out.push(Out::Publish {
                    pkid: 0,
                    dup: q.dup,
                    q,
                });
                continue;
            }
            let pkid = own.unwrap_or_else(|| next_free(&mut s));
            s.inflight.push_back((pkid, Inflight::Publish(q.clone())));
            out.push(Out::Publish {
                pkid,
                dup: q.dup,
                q,
            });
        }
        if took {
            s.progress = now;
            drop(s);
            self.room.notify_waiters();
        }
        expired
    }

    /// A PUBACK (QoS 1) or PUBCOMP (QoS 2 done); false if nothing waited for it.
    pub fn acked(&self, pkid: u16) -> bool {
        let mut s = self.state();
        let Some(at) = s.inflight.iter().position(|(p, _)| *p == pkid) else {
            return false;
        };
        let n = match s.inflight.remove(at) {
            Some((_, Inflight::Publish(q))) => q.n,
            Some((_, Inflight::Released(n))) => n,
            None => 0,
        };
        if let Some(j) = s.journal.as_ref().filter(|_| n > 0) {
            j.record(Change::Done { n });
        }
        s.progress = Instant::now();
        drop(s);
        // The window has room again.
        self.ready.notify_one();
        true
    }

    /// A PUBREC: None if nothing with that packet id was in flight; otherwise the message
    /// waits for PUBCOMP, and the PUBREL is to wait for the sequence number given (the
    /// PUBREC of a journaled message is recorded first).
    pub fn received(&self, pkid: u16) -> Option<Option<u64>> {
        let mut guard = self.state();
        let s = &mut *guard;
        let (_, f) = s.inflight.iter_mut().find(|(p, _)| *p == pkid)?;
        let n = match f {
            Inflight::Publish(q) => q.n,
            Inflight::Released(n) => *n,
        };
        *f = Inflight::Released(n);
        s.progress = Instant::now();
        let journal = s.journal.as_ref().filter(|_| n > 0);
        Some(journal.map(|j| j.record(Change::Released { n })))
    }

    /// An incoming QoS 2 PUBLISH: true the first time its packet id is seen (route it),
    /// false for a resent one (already routed) [MQTT-4.3.3-10]. The sequence number is
    /// the record of it, in a journaled session.
    pub fn incoming_qos2(&self, pkid: u16) -> (bool, Option<u64>) {
        let mut s = self.state();
        if !s.incoming_qos2.insert(pkid) {
            return (false, None);
        }
        let seq = s
            .journal
            .as_ref()
            .map(|j| j.record(Change::Incoming { pkid }));
        (true, seq)
    }

    /// An incoming PUBREL: true if its packet id was waiting.
    pub fn release_qos2(&self, pkid: u16) -> bool {
        let mut s = self.state();
        let known = s.incoming_qos2.remove(&pkid);
        if let Some(j) = s.journal.as_ref().filter(|_| known) {
            j.record(Change::IncomingDone { pkid });
        }
        known
    }

    /// Records a subscription; returns the sequence number of its record, if journaled.
    pub fn add_subscription(&self, filter: &str, options: SubOptions) -> Option<u64> {
        let mut s = self.state();
        s.subscriptions.insert(filter.to_owned(), options);
        s.journal.as_ref().map(|j| {
            j.record(Change::Subscribe {
                filter: filter.to_owned(),
                options,
            })
        })
    }

    /// Forgets a subscription; returns the sequence number of its record, if journaled.
    pub fn remove_subscription(&self, filter: &str) -> Option<u64> {
        let mut s = self.state();
        let had = s.subscriptions.remove(filter).is_some();
        s.journal.as_ref().filter(|_| had).map(|j| {
            j.record(Change::Unsubscribe {
                filter: filter.to_owned(),
            })
        })
    }

    /// Every subscription, taken out (the session is ending).
    pub fn take_subscriptions(&self) -> Vec<String> {
        self.state().subscriptions.drain().map(|(f, _)| f).collect()
    }

    /// Takes out the messages queued or in flight that came through a shared subscription
    /// (the session ends: another member is to get them), in order.
    pub fn take_shared(&self) -> Vec<Queued> {
        let mut s = self.state();
        let mut out = Vec::new();
        s.inflight.retain(|(_, f)| match f {
            Inflight::Publish(q) if q.share.is_some() => {
                out.push(q.clone());
                false
            }
            _ => true,
        });
        let mut kept = VecDeque::new();
        for q in std::mem::take(&mut s.queue) {
            if q.share.is_some() {
                s.queued_bytes -= q.msg.size();
                out.push(q);
            } else {
                kept.push_back(q);
            }
        }
        s.queue = kept;
        out
    }

    /// Empties the queue and the in-flight window (the session ends); returns how many
    /// messages were in them, and the topic of the first.
    pub fn discard(&self) -> (u64, String) {
        let mut s = self.state();
        let first = s
            .queue
            .front()
            .map(|q| q.msg.topic_str().to_owned())
            .or_else(|| {
                s.inflight.iter().find_map(|(_, f)| match f {
                    Inflight::Publish(q) => Some(q.msg.topic_str().to_owned()),
                    Inflight::Released(_) => None,
                })
            })
            .unwrap_or_default();
        let n = s.queue.len()
            + s.inflight
                .iter()
                .filter(|(_, f)| matches!(f, Inflight::Publish(_)))
                .count();
        s.queue.clear();
        s.queued_bytes = 0;
        s.inflight.clear();
        (n as u64, first)
    }

    /// What a journaled session holds, as the changes that rebuild it (the store compacts
    /// with them), and its key; None when it is not journaled.
    pub fn image(&self, out: &mut Vec<Change>) -> Option<Arc<str>> {
        let s = self.state();
        let j = s.journal.as_ref()?;
        out.push(Change::Open {
            client_id: self.client_id.clone(),
            owner: self.owner.clone(),
            expiry_secs: u32::try_from(s.expiry.as_secs()).unwrap_or(u32::MAX),
        });
        if let Some(at) = s.offline_since {
            let left = (at + s.expiry).saturating_duration_since(Instant::now());
            out.push(Change::Offline {
                expires_at_ms: unix_ms().saturating_add(left.as_millis() as u64),
            });
        }
        for (filter, options) in &s.subscriptions {
            out.push(Change::Subscribe {
                filter: filter.clone(),
                options: *options,
            });
        }
        out.extend(
            s.incoming_qos2
                .iter()
                .map(|&pkid| Change::Incoming { pkid }),
        );
        for (_, f) in &s.inflight {
            match f {
                Inflight::Publish(q) if q.n > 0 => out.push(Change::Queue {
                    n: q.n,
                    q: Box::new(q.clone()),
                }),
                Inflight::Released(n) if *n > 0 => out.push(Change::Released { n: *n }),
                _ => {}
            }
        }
        for q in s.queue.iter().filter(|q| q.n > 0) {
            out.push(Change::Queue {
                n: q.n,
                q: Box::new(q.clone()),
            });
        }
        Some(j.key.clone())
    }

    /// About how many bytes its records take, if journaled (for the store's compaction).
    pub fn stored_bytes(&self) -> u64 {
        let s = self.state();
        if s.journal.is_none() {
            return 0;
        }
        (s.queued_bytes + 64 * (s.inflight.len() + s.subscriptions.len() + 1)) as u64
    }

    /// A session as the store kept it, offline, with `left` before it expires. Its QoS 1/2
    /// messages are queued again, with DUP (their client may have had them), in order;
    /// those whose PUBREC came wait for PUBCOMP.
    pub fn restored(
        id: u64,
        key: &Arc<str>,
        image: Image,
        left: Duration,
        sink: &Arc<dyn Journal>,
        bounds: Bounds,
    ) -> Arc<Session> {
        let session = Session::new(id, &image.client_id, image.owner.as_deref(), bounds);
        let next_n = image.next_n();
        {
            let mut s = session.state();
            s.expiry = left;
            s.offline_since = Some(Instant::now());
            s.subscriptions = image.subscriptions.into_iter().collect();
            s.incoming_qos2 = image.incoming.into_iter().collect();
            s.inflight = image
                .released
                .iter()
                .map(|&n| (pkid_of(n), Inflight::Released(n)))
                .collect();
            for (_, mut q) in image.queue {
                q.dup = true;
                s.queued_bytes += q.msg.size();
                s.queue.push_back(q);
            }
            s.journal = Some(Journaled {
                key: key.clone(),
                sink: sink.clone(),
                next_n,
            });
        }
        session
    }

    /// Its subscriptions, with their options.
    pub fn subscriptions(&self) -> Vec<(String, SubOptions)> {
        let s = self.state();
        s.subscriptions
            .iter()
            .map(|(f, o)| (f.clone(), *o))
            .collect()
    }

    /// Messages queued and in flight.
    #[cfg(test)]
    pub fn backlog(&self) -> (usize, usize) {
        let s = self.state();
        (s.queue.len(), s.inflight.len())
    }
}

/// The next packet id not in flight [MQTT-2.2.1-3].
fn next_free(s: &mut State) -> u16 {
    loop {
        let id = s.next_pkid;
        s.next_pkid = if id == u16::MAX { 1 } else { id + 1 };
        if !s.inflight.iter().any(|(p, _)| *p == id) {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(qos: u8) -> Queued {
        Queued::new(Arc::new(Message::for_test("t", b"x")), qos, false, None)
    }

    #[test]
    fn bounded_queue_window_and_redelivery() {
        let s = Session::new_for_test("a");
        assert!(s.attach(2, Duration::ZERO, None).1.is_empty());
        for _ in 0..10 {
            s.push(q(1)).expect("room");
        }
        assert!(matches!(s.push(q(1)), Err(Full::Queue(_))), "bound of 10");
        let mut out = Vec::new();
        s.take(Instant::now(), &mut out);
        assert_eq!(out.len(), 2, "Receive Maximum 2");
        let ids: Vec<u16> = out
            .iter()
            .map(|o| match o {
                Out::Publish { pkid, .. } => *pkid,
                Out::PubRel(p) => *p,
            })
            .collect();
        assert_eq!(ids, [1, 2]);
        // Acknowledged in reverse order; unknown ids are refused.
        assert!(s.acked(2));
        assert!(!s.acked(9));
        out.clear();
        s.take(Instant::now(), &mut out);
        assert_eq!(out.len(), 1);
        // Reconnect: what is in flight comes again with DUP, in order.
        assert!(s.detach(1, Duration::from_secs(60)));
        let (n, again) = s.attach(10, Duration::from_secs(60), None);
        assert!(
            !s.detach(n - 1, Duration::ZERO),
            "a stale connection leaves nothing"
        );
        assert!(matches!(
            again[..],
            [
                Out::Publish {
                    pkid: 1,
                    dup: true,
                    ..
                },
                Out::Publish {
                    pkid: 3,
                    dup: true,
                    ..
                }
            ]
        ));
        assert!(s.received(3).is_some());
        let (_, again) = s.attach(10, Duration::from_secs(60), None);
        assert!(matches!(again[1], Out::PubRel(3)));
        assert_eq!(s.backlog(), (7, 2));
    }

    /// Keeps what a journaled session records, as the store would.
    #[derive(Debug, Default)]
    struct Tape(Mutex<Vec<(Arc<str>, Change)>>);

    impl Journal for Tape {
        fn record(&self, key: &Arc<str>, change: Change) -> u64 {
            let mut t = self.0.lock().expect("tape");
            t.push((key.clone(), change));
            t.len() as u64
        }
    }

    impl Tape {
        fn replay(&self) -> std::collections::HashMap<Arc<str>, Image> {
            let mut images = std::collections::HashMap::new();
            for (k, c) in self.0.lock().expect("tape").iter() {
                Image::apply(&mut images, k.clone(), c.clone());
            }
            images
        }
    }

    #[test]
    fn a_journaled_session_is_rebuilt_from_its_records_with_its_packet_ids() {
        let tape = Arc::new(Tape::default());
        let sink: Arc<dyn Journal> = tape.clone();
        let key: Arc<str> = Arc::from("k");
        let s = Session::new_for_test("a");
        let hour = Duration::from_secs(3600);
        s.attach(3, hour, Some((&key, &sink)));
        assert!(s.add_subscription("t/#", SubOptions::default()).is_some());
        for qos in [1, 2, 2, 0, 1] {
            let seq = s.push(q(qos)).expect("room");
            assert_eq!(seq.is_some(), qos > 0, "QoS 0 never touches the disk");
        }
        let mut out = Vec::new();
        s.take(Instant::now(), &mut out);
        let ids: Vec<u16> = out
            .iter()
            .map(|o| match o {
                Out::Publish { pkid, .. } => *pkid,
                Out::PubRel(p) => *p,
            })
            .collect();
        assert_eq!(
            ids,
            [1, 2, 3, 0],
            "a journaled message's packet id is its number; QoS 0 has none"
        );
        assert!(s.acked(1));
        assert!(matches!(s.received(2), Some(Some(_))), "PUBREC recorded");
        assert!(s.detach(1, hour));

        let images = tape.replay();
        let image = images.get(&key).expect("the session");
        assert_eq!(image.subscriptions.len(), 1);
        assert_eq!(image.queue.keys().copied().collect::<Vec<_>>(), [3, 4]);
        assert_eq!(image.released.iter().copied().collect::<Vec<_>>(), [2]);
        let left = image.left(unix_ms()).expect("not expired");
        assert!(left > Duration::from_secs(3590), "{left:?}");

        // The image the store compacts with rebuilds the same session.
        let mut changes = Vec::new();
        assert_eq!(s.image(&mut changes).as_deref(), Some("k"));
        let mut again = std::collections::HashMap::new();
        for c in changes {
            Image::apply(&mut again, key.clone(), c);
        }
        let rebuilt = &again[&key];
        assert_eq!(rebuilt.queue.keys().copied().collect::<Vec<_>>(), [3, 4]);
        assert_eq!(rebuilt.released.iter().copied().collect::<Vec<_>>(), [2]);

        // Restored: PUBREL for 2 first, then 3 and 4 again with DUP and their packet ids.
        let image = tape.replay().remove(&key).expect("the session");
        let r = Session::restored(9, &key, image, left, &sink, s.bounds);
        let (_, resend) = r.attach(10, hour, Some((&key, &sink)));
        assert!(matches!(resend[..], [Out::PubRel(2)]));
        let mut out = Vec::new();
        r.take(Instant::now(), &mut out);
        assert!(matches!(
            out[..],
            [
                Out::Publish {
                    pkid: 3,
                    dup: true,
                    ..
                },
                Out::Publish {
                    pkid: 4,
                    dup: true,
                    ..
                }
            ]
        ));
        let seq = r.push(q(1)).expect("room").expect("recorded");
        assert!(seq > 0);
        assert_eq!(
            tape.replay()[&key].queue.keys().last(),
            Some(&5),
            "numbers go on"
        );
        r.forget();
        assert!(tape.replay().is_empty(), "an ended session is forgotten");
    }

    #[test]
    fn a_session_expires_by_the_wall_clock_across_a_restart() {
        let image = Image {
            expiry_secs: 60,
            expires_at_ms: 10_000,
            ..Image::default()
        };
        assert_eq!(image.left(4_000), Some(Duration::from_secs(6)));
        assert_eq!(image.left(10_000), None);
        let connected = Image {
            expiry_secs: 60,
            ..Image::default()
        };
        assert_eq!(connected.left(u64::MAX), Some(Duration::from_secs(60)));
        assert_eq!(Image::default().left(0), None, "expiry 0 never outlives");
    }

    #[test]
    fn qos2_in_once() {
        let s = Session::new_for_test("a");
        assert!(s.incoming_qos2(5).0);
        assert!(
            !s.incoming_qos2(5).0,
            "a resent PUBLISH is not routed twice"
        );
        assert!(s.release_qos2(5));
        assert!(!s.release_qos2(5));
    }
}
