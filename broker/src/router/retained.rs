//! Retained messages: a tree of topic levels, one message at most per topic.
//!
//! A SUBSCRIBE walks only the branches its filter can match, so a `+` or `#` filter does not
//! scan every retained message. An empty retained PUBLISH removes the topic's message
//! [MQTT-3.3.1-6], and its node goes as soon as nothing hangs below it.

use std::collections::HashMap;
use std::sync::Arc;

use super::message::Message;

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

/// The retained messages.
#[derive(Default)]
pub(crate) struct Retained {
    root: Node,
    count: usize,
    bytes: usize,
}

impl Retained {
    /// Sets `topic`'s retained message, or clears it with `None`.
    pub fn set(&mut self, topic: &str, message: Option<Arc<Message>>) {
        let levels: Vec<&str> = topic.split('/').collect();
        let (old, _) = put(&mut self.root, &levels, message.clone());
        if let Some(old) = old {
            self.count -= 1;
            self.bytes -= old.size();
        }
        if let Some(new) = message {
            self.count += 1;
            self.bytes += new.size();
        }
    }

    /// Retained messages held, and their bytes.
    pub fn len(&self) -> (usize, usize) {
        (self.count, self.bytes)
    }

    /// The retained messages whose topic `filter` matches.
    pub fn matching(&self, filter: &str, out: &mut Vec<Arc<Message>>) {
        let levels: Vec<&str> = filter.split('/').collect();
        find(&self.root, &levels, true, out);
    }
}

/// Returns the message replaced, and whether the node is now empty.
fn put(
    node: &mut Node,
    levels: &[&str],
    message: Option<Arc<Message>>,
) -> (Option<Arc<Message>>, bool) {
    let Some((level, rest)) = levels.split_first() else {
        let old = std::mem::replace(&mut node.message, message);
        return (old, node.message.is_none() && node.children.is_empty());
    };
    let old = if message.is_some() {
        put(
            node.children.entry((*level).into()).or_default(),
            rest,
            message,
        )
        .0
    } else {
        let Some(child) = node.children.get_mut(*level) else {
            return (None, false);
        };
        let (old, empty) = put(child, rest, None);
        if empty {
            node.children.remove(*level);
        }
        old
    };
    (old, node.message.is_none() && node.children.is_empty())
}

fn all(node: &Node, out: &mut Vec<Arc<Message>>) {
    out.extend(node.message.iter().cloned());
    for c in node.children.values() {
        all(c, out);
    }
}

fn find(node: &Node, levels: &[&str], root: bool, out: &mut Vec<Arc<Message>>) {
    let Some((level, rest)) = levels.split_first() else {
        out.extend(node.message.iter().cloned());
        return;
    };
    match *level {
        "#" => {
            // `a/#` matches `a` itself [MQTT-4.7.1-2]; a leading wildcard skips `$` topics.
            out.extend(node.message.iter().cloned());
            for (name, c) in &node.children {
                if !(root && name.starts_with('$')) {
                    all(c, out);
                }
            }
        }
        "+" => {
            for (name, c) in &node.children {
                if !(root && name.starts_with('$')) {
                    find(c, rest, false, out);
                }
            }
        }
        literal => {
            if let Some(c) = node.children.get(literal) {
                find(c, rest, false, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str) -> Option<Arc<Message>> {
        Some(Arc::new(Message::for_test(topic, b"v")))
    }

    fn topics(r: &Retained, filter: &str) -> Vec<String> {
        let mut v = Vec::new();
        r.matching(filter, &mut v);
        let mut t: Vec<String> = v.iter().map(|m| m.topic_str().to_owned()).collect();
        t.sort();
        t
    }

    #[test]
    fn set_match_clear() {
        let mut r = Retained::default();
        for t in ["a", "a/b", "a/c/d", "$SYS/x", "b"] {
            r.set(t, msg(t));
        }
        assert_eq!(topics(&r, "a/#"), ["a", "a/b", "a/c/d"]);
        assert_eq!(topics(&r, "+"), ["a", "b"]);
        assert_eq!(topics(&r, "#"), ["a", "a/b", "a/c/d", "b"], "no $ topics");
        assert_eq!(topics(&r, "$SYS/#"), ["$SYS/x"]);
        assert_eq!(topics(&r, "a/+/d"), ["a/c/d"]);
        assert_eq!(r.len().0, 5);
        r.set("a/b", msg("a/b"));
        assert_eq!(r.len().0, 5, "replaced, not added");
        for t in ["a", "a/b", "a/c/d", "$SYS/x", "b", "never/set"] {
            r.set(t, None);
        }
        assert_eq!(r.len(), (0, 0));
        assert!(r.root.children.is_empty(), "no empty node left");
    }
}
