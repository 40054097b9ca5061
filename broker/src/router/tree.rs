//! The subscription tree: one node per topic level, holding who subscribed there.
//!
//! A PUBLISH walks it once, level by level, following the literal level, `+` and `#`
//! (mosquitto's and FlashMQ's shape). A node with no subscription and no child is removed as
//! soon as the last one goes, so the tree holds exactly the filters held now, whatever came
//! and went before: there is no lifetime budget of filters to run out of.
//!
//! Topics starting with `$` are not matched by a leading `#` or `+` [MQTT-4.7.2-1].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use super::session::{Session, SubOptions};

/// A subscriber as the tree holds it.
#[derive(Clone)]
pub(crate) struct Subscriber {
    pub session: Arc<Session>,
    pub options: SubOptions,
}

/// The members of one shared subscription (`$share/{group}/{filter}`).
pub(crate) struct Group {
    pub members: Vec<Subscriber>,
    /// Round-robin position.
    pub next: AtomicUsize,
    /// `$share/{group}/{filter}`, as messages routed through it remember it.
    pub key: Arc<str>,
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    subscribers: Vec<Subscriber>,
    groups: HashMap<Box<str>, Group>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.groups.is_empty()
    }
}

/// What a PUBLISH matched: plain subscribers, and shared groups to pick one member from.
pub(crate) enum Hit<'a> {
    Direct(&'a Subscriber),
    Shared(&'a Group),
}

/// The tree.
#[derive(Default)]
pub(crate) struct Tree {
    root: Node,
    /// Subscriptions held now (shared members included).
    count: usize,
}

impl Tree {
    /// Adds or replaces `session`'s subscription to `filter` (in group `share`, if shared);
    /// true if it replaced one.
    pub fn subscribe(
        &mut self,
        filter: &str,
        share: Option<&str>,
        session: &Arc<Session>,
        options: SubOptions,
    ) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let list = match share {
            None => &mut node.subscribers,
            Some(g) => {
                &mut node
                    .groups
                    .entry(g.into())
                    .or_insert_with(|| Group {
                        members: Vec::new(),
                        next: AtomicUsize::new(0),
                        key: format!("$share/{g}/{filter}").into(),
                    })
                    .members
            }
        };
        let sub = Subscriber {
            session: session.clone(),
            options,
        };
        match list.iter_mut().find(|s| Arc::ptr_eq(&s.session, session)) {
            Some(existing) => {
                *existing = sub;
                true
            }
            None => {
                list.push(sub);
                self.count += 1;
                false
            }
        }
    }

    /// Removes `session`'s subscription; true if there was one. Empty nodes go with it.
    pub fn unsubscribe(
        &mut self,
        filter: &str,
        share: Option<&str>,
        session: &Arc<Session>,
    ) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove(&mut self.root, &levels, share, session);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Subscriptions held now.
    pub fn len(&self) -> usize {
        self.count
    }

    /// The shared group `group` of `filter`, if it has members.
    pub fn group(&self, filter: &str, group: &str) -> Option<&Group> {
        let mut node = &self.root;
        for level in filter.split('/') {
            node = node.children.get(level)?;
        }
        node.groups.get(group).filter(|g| !g.members.is_empty())
    }

    /// Calls `hit` for every subscription matching `topic`.
    pub fn matches<'a>(&'a self, topic: &str, mut hit: impl FnMut(Hit<'a>)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        walk(&self.root, &levels, dollar, &mut hit);
    }
}

fn collect<'a>(node: &'a Node, hit: &mut impl FnMut(Hit<'a>)) {
    for s in &node.subscribers {
        hit(Hit::Direct(s));
    }
    for g in node.groups.values() {
        if !g.members.is_empty() {
            hit(Hit::Shared(g));
        }
    }
}

fn walk<'a>(node: &'a Node, levels: &[&str], dollar_root: bool, hit: &mut impl FnMut(Hit<'a>)) {
    let Some((level, rest)) = levels.split_first() else {
        collect(node, hit);
        // `a/#` matches `a` too [MQTT-4.7.1-2].
        if let Some(hash) = node.children.get("#") {
            collect(hash, hit);
        }
        return;
    };
    if let Some(child) = node.children.get(*level) {
        walk(child, rest, false, hit);
    }
    if dollar_root {
        return;
    }
    if let Some(plus) = node.children.get("+") {
        walk(plus, rest, false, hit);
    }
    if let Some(hash) = node.children.get("#") {
        collect(hash, hit);
    }
}

fn remove(node: &mut Node, levels: &[&str], share: Option<&str>, session: &Arc<Session>) -> bool {
    let Some((level, rest)) = levels.split_first() else {
        let same = |s: &Subscriber| Arc::ptr_eq(&s.session, session);
        return match share {
            None => {
                let before = node.subscribers.len();
                node.subscribers.retain(|s| !same(s));
                node.subscribers.len() != before
            }
            Some(g) => {
                let Some(group) = node.groups.get_mut(g) else {
                    return false;
                };
                let before = group.members.len();
                group.members.retain(|s| !same(s));
                let removed = group.members.len() != before;
                if group.members.is_empty() {
                    node.groups.remove(g);
                }
                removed
            }
        };
    };
    let Some(child) = node.children.get_mut(*level) else {
        return false;
    };
    let removed = remove(child, rest, share, session);
    if child.is_empty() {
        node.children.remove(*level);
    }
    removed
}

/// Picks a member of a shared group that `may` accept: `strategy`, preferring members that
/// are connected.
pub(crate) fn pick(
    group: &Group,
    strategy: crate::config::SharedStrategy,
    random: u64,
    may: impl Fn(&Subscriber) -> bool,
) -> Option<&Subscriber> {
    use crate::config::SharedStrategy;
    let members = &group.members;
    let n = members.len();
    if n == 0 {
        return None;
    }
    let start = match strategy {
        SharedStrategy::RoundRobin => group.next.fetch_add(1, Relaxed) % n,
        SharedStrategy::Random => (random % n as u64) as usize,
        SharedStrategy::Sticky => 0,
    };
    let order = || (0..n).map(|i| &members[(start + i) % n]).filter(|m| may(m));
    order()
        .find(|m| m.session.is_connected())
        .or_else(|| order().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> Arc<Session> {
        Session::new_for_test(id)
    }

    fn hits(tree: &Tree, topic: &str) -> Vec<String> {
        let mut v = Vec::new();
        tree.matches(topic, |h| match h {
            Hit::Direct(s) => v.push(s.session.client_id().to_owned()),
            Hit::Shared(g) => v.push(format!("group of {}", g.members.len())),
        });
        v.sort();
        v
    }

    #[test]
    fn levels_plus_and_hash() {
        let mut t = Tree::default();
        let (a, b, c, d) = (session("a"), session("b"), session("c"), session("d"));
        let o = SubOptions::default();
        t.subscribe("x/y", None, &a, o);
        t.subscribe("x/+", None, &b, o);
        t.subscribe("x/#", None, &c, o);
        t.subscribe("#", None, &d, o);
        assert_eq!(hits(&t, "x/y"), ["a", "b", "c", "d"]);
        assert_eq!(hits(&t, "x"), ["c", "d"], "x/# matches x");
        assert_eq!(hits(&t, "x/y/z"), ["c", "d"]);
        assert_eq!(hits(&t, "$SYS/x"), Vec::<String>::new(), "[MQTT-4.7.2-1]");
        t.subscribe("$SYS/#", None, &a, o);
        assert_eq!(hits(&t, "$SYS/x"), ["a"]);
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn empty_nodes_are_removed() {
        let mut t = Tree::default();
        let a = session("a");
        for i in 0..1000 {
            t.subscribe(&format!("churn/{i}/+/x"), None, &a, SubOptions::default());
        }
        assert!(t.subscribe(
            "churn/1/+/x",
            None,
            &a,
            SubOptions {
                qos: 1,
                ..Default::default()
            }
        ));
        for i in 0..1000 {
            assert!(t.unsubscribe(&format!("churn/{i}/+/x"), None, &a));
        }
        assert!(!t.unsubscribe("churn/1/+/x", None, &a));
        assert!(t.root.is_empty(), "nothing left behind");
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn shared_groups() {
        let mut t = Tree::default();
        let (a, b) = (session("a"), session("b"));
        let o = SubOptions::default();
        t.subscribe("s/+", Some("g"), &a, o);
        t.subscribe("s/+", Some("g"), &b, o);
        t.subscribe("s/#", Some("g"), &a, o);
        assert_eq!(
            hits(&t, "s/1"),
            ["group of 1", "group of 2"],
            "a group per filter"
        );
        t.unsubscribe("s/+", Some("g"), &a);
        t.unsubscribe("s/+", Some("g"), &b);
        t.unsubscribe("s/#", Some("g"), &a);
        assert!(t.root.is_empty());
    }
}
