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

use super::message::Message;

/// How one subscription wants its messages (MQTT 5 subscription options; 3.1.1 uses QoS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SubOptions {
    /// The maximum QoS granted.
    pub qos: u8,
    /// Do not send the subscriber its own publishes [MQTT-3.8.3-3].
    pub no_local: bool,
    /// Keep the RETAIN flag as published [MQTT-3.3.1-12/13].
    pub retain_as_published: bool,
    /// The subscription identifier, if the SUBSCRIBE gave one.
    pub id: Option<u32>,
}

/// One message on its way to one subscriber.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub msg: Arc<Message>,
    /// min(published, granted) [MQTT-3.8.4-6] (5: [MQTT-3.8.4-8]).
    pub qos: u8,
    /// The RETAIN flag to send.
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions [MQTT-3.3.4-3].
    pub sub_ids: Vec<u32>,
    /// The shared subscription (`$share/{group}/{filter}`) it came through, if any: when the
    /// session ends before its client acknowledged it, another member gets it.
    pub share: Option<Arc<str>>,
}

/// What is waiting for an acknowledgement.
#[derive(Debug)]
enum Inflight {
    /// A PUBLISH, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Publish(Queued),
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
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
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Session {
    id: u64,
    client_id: String,
    owner: Option<String>,
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
    /// Expiry Interval. Returns the attachment (to leave it with) and what was in flight, to
    /// send again first.
    pub fn attach(&self, window: u16, expiry: Duration) -> (u64, Vec<Out>) {
        use futures_util::FutureExt;
        let mut s = self.state();
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
                Inflight::Released => Out::PubRel(*pkid),
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

    /// Appends a message, or gives it back when the queue is full.
    pub fn push(&self, q: Queued) -> Result<(), Full> {
        let mut s = self.state();
        let size = q.msg.size();
        if s.queue.len() >= self.bounds.messages
            || (s.queued_bytes + size > self.bounds.bytes && !s.queue.is_empty())
        {
            return Err(Full::Queue(q));
        }
        s.queued_bytes += size;
        s.queue.push_back(q);
        drop(s);
        self.ready.notify_one();
        Ok(())
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
            let Some(q) = s.queue.pop_front() else { break };
            took = true;
            s.queued_bytes -= q.msg.size();
            if q.msg.expired(now) {
                expired += 1;
                continue;
            }
            if q.qos == 0 {
                out.push(Out::Publish {
                    pkid: 0,
                    dup: false,
                    q,
                });
                continue;
            }
            let pkid = next_free(&mut s);
            s.inflight.push_back((pkid, Inflight::Publish(q.clone())));
            out.push(Out::Publish {
                pkid,
                dup: false,
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
        s.inflight.remove(at);
        s.progress = Instant::now();
        drop(s);
        // The window has room again.
        self.ready.notify_one();
        true
    }

    /// A PUBREC: true if the message was in flight (now waiting for PUBCOMP).
    pub fn received(&self, pkid: u16) -> bool {
        let mut s = self.state();
        match s.inflight.iter_mut().find(|(p, _)| *p == pkid) {
            Some((_, f)) => {
                *f = Inflight::Released;
                s.progress = Instant::now();
                true
            }
            None => false,
        }
    }

    /// An incoming QoS 2 PUBLISH: true the first time its packet id is seen (route it),
    /// false for a resent one (already routed) [MQTT-4.3.3-10].
    pub fn incoming_qos2(&self, pkid: u16) -> bool {
        self.state().incoming_qos2.insert(pkid)
    }

    /// An incoming PUBREL: true if its packet id was waiting.
    pub fn release_qos2(&self, pkid: u16) -> bool {
        self.state().incoming_qos2.remove(&pkid)
    }

    /// Records a subscription; returns the options it replaced.
    pub fn add_subscription(&self, filter: &str, options: SubOptions) -> Option<SubOptions> {
        self.state()
            .subscriptions
            .insert(filter.to_owned(), options)
    }

    /// Forgets a subscription; true if there was one.
    pub fn remove_subscription(&self, filter: &str) -> bool {
        self.state().subscriptions.remove(filter).is_some()
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
                    Inflight::Released => None,
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
        Queued {
            msg: Arc::new(Message::for_test("t", b"x")),
            qos,
            retain: false,
            sub_ids: Vec::new(),
            share: None,
        }
    }

    #[test]
    fn bounded_queue_window_and_redelivery() {
        let s = Session::new_for_test("a");
        assert!(s.attach(2, Duration::ZERO).1.is_empty());
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
        let (n, again) = s.attach(10, Duration::from_secs(60));
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
        assert!(s.received(3));
        let (_, again) = s.attach(10, Duration::from_secs(60));
        assert!(matches!(again[1], Out::PubRel(3)));
        assert_eq!(s.backlog(), (7, 2));
    }

    #[test]
    fn qos2_in_once() {
        let s = Session::new_for_test("a");
        assert!(s.incoming_qos2(5));
        assert!(!s.incoming_qos2(5), "a resent PUBLISH is not routed twice");
        assert!(s.release_qos2(5));
        assert!(!s.release_qos2(5));
    }
}
