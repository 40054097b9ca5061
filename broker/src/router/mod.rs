//! The broker's router: who is subscribed to what, the retained messages, and the sessions.
//!
//! There is no router thread. The connection task that read a PUBLISH routes it: it matches
//! the subscription tree under a read lock, checks each subscriber's read access, and appends
//! the message to each subscriber's queue, waking that subscriber's task. A message crosses
//! no channel and no thread on its way from one socket to another, whatever thread each
//! connection runs on (FlashMQ's design).
//!
//! # Layout
//! - `tree`: the subscription tree (freed level by level as subscriptions go).
//! - `retained`: the retained messages, in a tree of their own.
//! - `session`: a session's subscriptions, bounded queue and in-flight window.
//! - `message`: a published message, shared by every queue it is in.
//! - `journal`: what a persistent session records in the store, and how it is rebuilt.

pub(crate) mod journal;
pub(crate) mod message;
pub(crate) mod retained;
pub(crate) mod session;
pub(crate) mod tree;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use crate::acl::{AclConfig, Principal};
use crate::config::SharedStrategy;
use journal::{Change, Image, Journal};
use message::Message;
use retained::Retained;
use session::SubOptions;
use session::{Bounds, Queued, Session};
use tree::{Hit, Tree};

/// The router of one broker.
pub(crate) struct Router {
    tree: RwLock<Tree>,
    retained: RwLock<Retained>,
    /// Sessions by key (see `sessions::persistent_name`).
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    next_id: AtomicU64,
    random: AtomicU64,
    bounds: Bounds,
    strategy: SharedStrategy,
    acl: AclConfig,
    /// Messages lost with sessions that ended holding them: (client id, lost, first topic).
    discarded: Mutex<Vec<(String, u64, String)>>,
    /// Where persistent sessions record their changes (persistence on).
    journal: OnceLock<Arc<dyn Journal>>,
}

/// A filter as a SUBSCRIBE gives it: the topic filter, and its share group if shared.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Filter<'a> {
    /// The whole text the client sent (`$share/g/a/b` or `a/b`).
    pub full: &'a str,
    /// The topic filter (`a/b`).
    pub filter: &'a str,
    /// The share group (`g`).
    pub share: Option<&'a str>,
}

impl<'a> Filter<'a> {
    /// Splits a filter as the client wrote it; None for a malformed `$share/…`.
    pub fn parse(full: &'a str) -> Option<Filter<'a>> {
        match full.strip_prefix("$share/") {
            Some(rest) => {
                let (group, filter) = rest.split_once('/')?;
                Some(Filter {
                    full,
                    filter,
                    share: Some(group),
                })
            }
            None => Some(Filter {
                full,
                filter: full,
                share: None,
            }),
        }
    }
}

impl Router {
    /// An empty router.
    pub fn new(bounds: Bounds, strategy: SharedStrategy, acl: AclConfig) -> Router {
        Router {
            tree: RwLock::default(),
            retained: RwLock::default(),
            sessions: Mutex::default(),
            next_id: AtomicU64::new(1),
            random: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            bounds,
            strategy,
            acl,
            discarded: Mutex::default(),
            journal: OnceLock::new(),
        }
    }

    /// Persistent sessions are recorded in `journal` from now on.
    pub fn set_journal(&self, journal: Arc<dyn Journal>) {
        let _ = self.journal.set(journal);
    }

    /// A connection takes `session` (see [`Session::attach`]); a session that is to outlive
    /// it is recorded, when persistence is on.
    pub fn attach(
        &self,
        key: &str,
        session: &Session,
        window: u16,
        expiry: Duration,
    ) -> (u64, Vec<session::Out>) {
        let key: Arc<str> = Arc::from(key);
        let link = self.journal.get().map(|j| (&key, j));
        session.attach(window, expiry, link)
    }

    /// Puts back the persistent sessions the store kept: each with its subscriptions,
    /// queued messages and time left; those that expired while the broker was down are
    /// dropped. Returns the sessions and messages restored.
    pub fn restore(&self, images: HashMap<Arc<str>, Image>) -> (usize, usize) {
        let Some(sink) = self.journal.get() else {
            return (0, 0);
        };
        let now_ms = journal::unix_ms();
        let (mut restored, mut messages) = (0, 0);
        for (key, image) in images {
            let Some(left) = image.left(now_ms) else {
                // Expired while the broker was down: recorded as ended, so the next
                // compaction forgets it.
                sink.record(&key, Change::End);
                continue;
            };
            messages += image.queue.len() + image.released.len();
            let id = self.next_id.fetch_add(1, Relaxed);
            let session = Session::restored(id, &key, image, left, sink, self.bounds);
            {
                let mut tree = self.tree_mut();
                for (full, options) in session.subscriptions() {
                    if let Some(f) = Filter::parse(&full) {
                        tree.subscribe(f.filter, f.share, &session, options);
                    }
                }
            }
            self.sessions().insert(key.to_string(), session);
            restored += 1;
        }
        (restored, messages)
    }

    /// The changes that rebuild every persistent session, with their keys (the store
    /// compacts with them).
    pub fn journaled(&self, out: &mut Vec<(Arc<str>, Change)>) {
        let sessions: Vec<Arc<Session>> = self.sessions().values().cloned().collect();
        let mut changes = Vec::new();
        for s in sessions {
            changes.clear();
            if let Some(key) = s.image(&mut changes) {
                out.extend(changes.drain(..).map(|c| (key.clone(), c)));
            }
        }
    }

    /// About how many bytes the persistent sessions' records take.
    pub fn journaled_bytes(&self) -> u64 {
        self.sessions().values().map(|s| s.stored_bytes()).sum()
    }

    fn tree(&self) -> std::sync::RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|e| e.into_inner())
    }

    fn tree_mut(&self) -> std::sync::RwLockWriteGuard<'_, Tree> {
        self.tree.write().unwrap_or_else(|e| e.into_inner())
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds or makes the session `key` for a connecting client. `clean` discards an existing
    /// one first [MQTT-3.1.2-4]. Returns it and whether an earlier one was resumed (Session
    /// Present [MQTT-3.2.2-2/3]).
    pub fn open(
        &self,
        key: &str,
        client_id: &str,
        owner: Option<&str>,
        clean: bool,
    ) -> (Arc<Session>, bool) {
        let mut sessions = self.sessions();
        if !clean {
            // One whose expiry passed is over, whether or not the sweep has ended it yet.
            let live = |s: &Arc<Session>| {
                s.is_connected() || s.expires_at().map_or(true, |at| at > Instant::now())
            };
            if let Some(s) = sessions.get(key).filter(|s| live(s)) {
                return (s.clone(), true);
            }
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        let new = Session::new(id, client_id, owner, self.bounds);
        let old = sessions.insert(key.to_owned(), new.clone());
        drop(sessions);
        if let Some(old) = old {
            old.forget();
            self.drop_subscriptions(&old);
            self.note_discarded(&old);
        }
        (new, false)
    }

    /// The connection of `attachment` left its session: with `expiry` 0 the session ends now
    /// [MQTT-3.1.2-5], otherwise it waits that long for its client. A connection that a later
    /// one took the session from changes nothing.
    pub fn close(&self, key: &str, session: &Arc<Session>, attachment: u64, expiry: Duration) {
        if session.detach(attachment, expiry) && expiry.is_zero() {
            self.end(key, session);
        }
    }

    /// Ends a session if it is still the one under `key`.
    fn end(&self, key: &str, session: &Arc<Session>) {
        let mut sessions = self.sessions();
        if sessions.get(key).is_some_and(|s| Arc::ptr_eq(s, session)) {
            sessions.remove(key);
        }
        drop(sessions);
        session.forget();
        self.drop_subscriptions(session);
        self.hand_over_shared(session);
        self.note_discarded(session);
    }

    /// Gives what a leaving member of a shared subscription had not had acknowledged to
    /// another member of its group, so the group loses nothing; counted as discarded only
    /// when no member is left or its queue is full.
    fn hand_over_shared(&self, session: &Arc<Session>) {
        let leftover = session.take_shared();
        if leftover.is_empty() {
            return;
        }
        let tree = self.tree();
        let mut lost = 0;
        let mut first = String::new();
        for mut q in leftover {
            let Some(key) = q.share.clone() else { continue };
            let Some(f) = key.strip_prefix("$share/").and_then(|r| r.split_once('/')) else {
                continue;
            };
            let topic = q.msg.topic_str().to_owned();
            let member = tree.group(f.1, f.0).and_then(|g| {
                let may = |s: &tree::Subscriber| self.may_read(s, &topic);
                tree::pick(g, self.strategy, self.next_random(), may)
            });
            let handed = member.is_some_and(|m| {
                q.qos = q.msg.qos.min(m.options.qos);
                q.sub_ids = m.options.id.into_iter().collect();
                m.session.push(q).is_ok()
            });
            if !handed {
                if lost == 0 {
                    first = topic;
                }
                lost += 1;
            }
        }
        if lost > 0 {
            self.discarded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((session.client_id().to_owned(), lost, first));
        }
    }

    fn note_discarded(&self, session: &Session) {
        let (lost, topic) = session.discard();
        if lost > 0 {
            self.discarded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((session.client_id().to_owned(), lost, topic));
        }
    }

    /// Messages lost with sessions that ended since the last call.
    pub fn take_discarded(&self) -> Vec<(String, u64, String)> {
        std::mem::take(&mut *self.discarded.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn drop_subscriptions(&self, session: &Arc<Session>) {
        let filters = session.take_subscriptions();
        let mut tree = self.tree_mut();
        for full in &filters {
            if let Some(f) = Filter::parse(full) {
                tree.unsubscribe(f.filter, f.share, session);
            }
        }
    }

    /// Ends the offline sessions whose expiry passed; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let expired: Vec<(String, Arc<Session>)> = self
            .sessions()
            .iter()
            .filter(|(_, s)| !s.is_connected() && s.expires_at().is_some_and(|at| at <= now))
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        for (key, s) in &expired {
            self.end(key, s);
        }
        expired.len()
    }

    /// Sessions held, connected or not.
    pub fn session_count(&self) -> usize {
        self.sessions().len()
    }

    /// Subscriptions held now.
    pub fn subscription_count(&self) -> usize {
        self.tree().len()
    }

    /// Retained messages held, and their bytes.
    pub fn retained_count(&self) -> (usize, usize) {
        self.retained
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Adds or replaces a subscription; true if it replaced one of the same filter. The
    /// sequence number is its record's, in a persistent session.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        f: Filter<'_>,
        options: SubOptions,
    ) -> (bool, Option<u64>) {
        let seq = session.add_subscription(f.full, options);
        let existed = self
            .tree_mut()
            .subscribe(f.filter, f.share, session, options);
        (existed, seq)
    }

    /// Removes a subscription; true if there was one. The sequence number is its record's,
    /// in a persistent session.
    pub fn unsubscribe(&self, session: &Arc<Session>, f: Filter<'_>) -> (bool, Option<u64>) {
        let seq = session.remove_subscription(f.full);
        (self.tree_mut().unsubscribe(f.filter, f.share, session), seq)
    }

    /// The retained messages for a new subscription to `filter` [MQTT-3.3.1-9], unexpired.
    pub fn retained_for(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        self.retained
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .matching(filter, &mut out);
        out.retain(|m| !m.expired(now));
        out
    }

    /// Stores or clears (empty payload [MQTT-3.3.1-6]) a retained message, then runs
    /// `applied` while still holding the lock: whatever it records sees the changes in the
    /// order they were applied.
    pub fn retain<R>(&self, msg: &Arc<Message>, applied: impl FnOnce() -> R) -> R {
        let mut r = self.retained.write().unwrap_or_else(|e| e.into_inner());
        if msg.payload.is_empty() {
            r.set(msg.topic_str(), None);
        } else {
            r.set(msg.topic_str(), Some(msg.clone()));
        }
        applied()
    }

    /// Every retained message held, and their bytes (for the store's compaction).
    pub fn retained_all(&self) -> (Vec<Arc<Message>>, usize) {
        let r = self.retained.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(r.len().0);
        r.matching("#", &mut out);
        (out, r.len().1)
    }

    /// Who gets `msg`, and how: one entry per session (overlapping subscriptions merged:
    /// highest QoS, every subscription identifier), No Local and read access applied, one
    /// member per shared group.
    pub fn targets(&self, msg: &Arc<Message>, out: &mut impl Extend<(Arc<Session>, Queued)>) {
        let topic = msg.topic_str();
        let tree = self.tree();
        let mut per: HashMap<u64, (Arc<Session>, Queued)> = HashMap::new();
        let mut add = |s: &tree::Subscriber, share: Option<&Arc<str>>| {
            let o = s.options;
            if o.no_local && s.session.id() == msg.origin {
                return;
            }
            if !self.may_read(s, topic) {
                return;
            }
            let qos = o.qos.min(msg.qos);
            let retain = o.retain_as_published && msg.retain;
            let e = per.entry(s.session.id()).or_insert_with(|| {
                (
                    s.session.clone(),
                    Queued::new(msg.clone(), qos, retain, share.cloned()),
                )
            });
            e.1.qos = e.1.qos.max(qos);
            e.1.retain |= retain;
            e.1.sub_ids.extend(o.id);
        };
        tree.matches(topic, |hit| match hit {
            Hit::Direct(s) => add(s, None),
            Hit::Shared(g) => {
                let r = self.next_random();
                let may = |s: &tree::Subscriber| self.may_read(s, topic);
                if let Some(s) = tree::pick(g, self.strategy, r, may) {
                    add(s, Some(&g.key));
                }
            }
        });
        out.extend(per.into_values());
    }

    /// Whether the ACL lets `s`'s session read `topic`.
    fn may_read(&self, s: &tree::Subscriber, topic: &str) -> bool {
        if self.acl.rule.is_empty() && self.acl.default == crate::acl::Default::Allow {
            return true;
        }
        let who = Principal {
            user: s.session.owner(),
            client_id: s.session.client_id(),
            grants: &s.session.grants(),
        };
        self.acl.can_read(who, topic)
    }

    fn next_random(&self) -> u64 {
        // xorshift: the shared-subscription "random" strategy needs spread, not secrecy.
        let mut x = self.random.load(Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random.store(x, Relaxed);
        x
    }

    /// Takes and gives back each of the router's locks (the watchdog's probe: a lock held
    /// forever blocks it).
    pub fn probe(&self) {
        drop(self.tree());
        drop(self.retained.read().unwrap_or_else(|e| e.into_inner()));
        drop(self.sessions());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn router() -> Router {
        Router::new(
            Bounds {
                messages: 100,
                bytes: 1 << 20,
            },
            SharedStrategy::RoundRobin,
            AclConfig::default(),
        )
    }

    fn publish(topic: &str, qos: u8, origin: u64) -> Arc<Message> {
        Arc::new(Message::new(
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::from_static(b"x"),
            qos,
            true,
            None,
            origin,
            Instant::now(),
        ))
    }

    #[test]
    fn qos_is_the_lower_and_overlaps_merge() {
        let r = router();
        let (a, _) = r.open("a", "a", None, true);
        let f = |s| Filter::parse(s).expect("filter");
        r.subscribe(
            &a,
            f("t/#"),
            SubOptions {
                qos: 2,
                id: Some(7),
                ..Default::default()
            },
        );
        r.subscribe(
            &a,
            f("t/+"),
            SubOptions {
                qos: 0,
                id: Some(9),
                ..Default::default()
            },
        );
        let mut out = Vec::new();
        r.targets(&publish("t/x", 1, 0), &mut out);
        assert_eq!(out.len(), 1, "one delivery per session");
        let q = &out[0].1;
        assert_eq!(q.qos, 1, "min(published 1, granted 2) [MQTT-3.8.4-6]");
        let mut ids = q.sub_ids.clone();
        ids.sort();
        assert_eq!(ids, [7, 9]);
        assert!(
            !q.retain,
            "RETAIN cleared unless Retain As Published [MQTT-3.3.1-12]"
        );
    }

    #[test]
    fn no_local_and_clean_start() {
        let r = router();
        let (a, _) = r.open("a", "a", None, false);
        let f = Filter::parse("t").expect("filter");
        r.subscribe(
            &a,
            f,
            SubOptions {
                no_local: true,
                ..Default::default()
            },
        );
        let mut out = Vec::new();
        r.targets(&publish("t", 0, a.id()), &mut out);
        assert!(out.is_empty(), "[MQTT-3.8.3-3]");
        r.close("a", &a, 0, Duration::from_secs(60));
        let (again, present) = r.open("a", "a", None, false);
        assert!(present && Arc::ptr_eq(&again, &a));
        let (fresh, present) = r.open("a", "a", None, true);
        assert!(!present && !Arc::ptr_eq(&fresh, &a), "[MQTT-3.1.2-4]");
        assert_eq!(
            r.subscription_count(),
            0,
            "the old session's subscriptions went with it"
        );
        r.close("a", &fresh, 0, Duration::ZERO);
        assert_eq!(r.session_count(), 0);
    }

    #[test]
    fn offline_sessions_expire() {
        let r = router();
        let (a, _) = r.open("a", "a", None, false);
        r.subscribe(&a, Filter::parse("t").expect("f"), SubOptions::default());
        r.close("a", &a, 0, Duration::from_secs(5));
        assert_eq!(r.expire(Instant::now()), 0);
        assert_eq!(r.expire(Instant::now() + Duration::from_secs(6)), 1);
        assert_eq!((r.session_count(), r.subscription_count()), (0, 0));
    }
}
