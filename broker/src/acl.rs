//! Per-topic access control, declared in topics.toml like mosquitto's `acl_file`.
//!
//! A rule applies to one user (or to everyone when `user` is left out) and grants `read`,
//! `write` or `readwrite` on a topic pattern, or `deny`s it. `%u` and `%c` in a pattern stand
//! for the client's username and client id; a rule whose substitution would inject a wildcard
//! or a level separator does not apply. Deny rules win over grants; when nothing matches,
//! `default` decides.
//!
//! A SUBSCRIBE is granted when some rule allows part of what the filter matches (or the
//! default allows) and no deny rule covers the whole of it; each message is then checked
//! against the subscriber's rules before it is queued, as mosquitto does. So with a grant of
//! `edge/a/#` and a deny of `edge/a/secret`, `edge/#` is granted and delivers exactly what is
//! under `edge/a/` but `edge/a/secret`.

use serde::{Deserialize, Serialize};

/// The `[broker.acl]` table.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    /// What happens when no rule matches: `allow` or `deny`.
    pub default: Default,
    /// The rules, in any order.
    pub rule: Vec<AclRule>,
}

/// The verdict when no rule matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Default {
    /// Anything not denied is allowed.
    #[default]
    Allow,
    /// Anything not granted is denied.
    Deny,
}

/// One `[[broker.acl.rule]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// The username this rule applies to; absent means every client (like mosquitto's `pattern`).
    pub user: Option<String>,
    /// A topic pattern (wildcards allowed), with `%u` and `%c` substituted.
    pub topic: String,
    /// `read`, `write`, `readwrite` or `deny`.
    pub access: Access,
}

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Subscribe.
    Read,
    /// Publish.
    Write,
    /// Both.
    Readwrite,
    /// Neither, whatever else grants it.
    Deny,
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Principal<'a> {
    /// Username from CONNECT, if any.
    pub user: Option<&'a str>,
    /// Client id.
    pub client_id: &'a str,
}

impl AclConfig {
    /// Checks every pattern.
    pub fn validate(&self) -> Result<(), String> {
        for (i, r) in self.rule.iter().enumerate() {
            let probe = r.topic.replace("%u", "u").replace("%c", "c");
            if let Err(e) = check_filter(&probe) {
                return Err(format!("acl.rule[{i}].topic `{}`: {e}", r.topic));
            }
        }
        Ok(())
    }

    /// Whether `who` may publish to `topic`.
    pub fn can_publish(&self, who: Principal<'_>, topic: &str) -> bool {
        self.decide(who, |pattern, access| match access {
            Access::Deny => Some(matches(pattern, topic)),
            Access::Write | Access::Readwrite => Some(matches(pattern, topic)),
            Access::Read => None,
        })
    }

    /// Whether `who` may subscribe to `filter` (shared-subscription prefix already removed):
    /// some of what it matches may be readable. What is delivered is checked message by
    /// message with [`AclConfig::can_read`].
    pub fn can_subscribe(&self, who: Principal<'_>, filter: &str) -> bool {
        self.decide(who, |pattern, access| match access {
            Access::Deny => Some(covers(pattern, filter)),
            Access::Read | Access::Readwrite => Some(overlaps(pattern, filter)),
            Access::Write => None,
        })
    }

    /// Whether `who` may receive a message published to `topic`.
    pub fn can_read(&self, who: Principal<'_>, topic: &str) -> bool {
        if self.rule.is_empty() {
            return self.default == Default::Allow;
        }
        self.decide(who, |pattern, access| match access {
            Access::Deny | Access::Read | Access::Readwrite => Some(matches(pattern, topic)),
            Access::Write => None,
        })
    }

    fn decide(&self, who: Principal<'_>, test: impl Fn(&str, Access) -> Option<bool>) -> bool {
        if self.rule.is_empty() {
            return self.default == Default::Allow;
        }
        let mut granted = false;
        for rule in &self.rule {
            if rule.user.as_deref().is_some_and(|u| Some(u) != who.user) {
                continue;
            }
            let Some(pattern) = substitute(&rule.topic, who) else {
                continue;
            };
            match (rule.access, test(&pattern, rule.access)) {
                (Access::Deny, Some(true)) => return false,
                (_, Some(true)) => granted = true,
                _ => {}
            }
        }
        granted || self.default == Default::Allow
    }
}

fn substitute(pattern: &str, who: Principal<'_>) -> Option<String> {
    let unsafe_part = |s: &str| s.is_empty() || s.contains(['/', '+', '#']);
    let mut out = pattern.to_owned();
    if out.contains("%u") {
        let user = who.user.filter(|u| !unsafe_part(u))?;
        out = out.replace("%u", user);
    }
    if out.contains("%c") {
        if unsafe_part(who.client_id) {
            return None;
        }
        out = out.replace("%c", who.client_id);
    }
    Some(out)
}

pub use edgebus_proto::topic::{check_filter, check_topic, matches};

/// Is every topic that `filter` matches also matched by `pattern`?
fn covers(pattern: &str, filter: &str) -> bool {
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(a), Some(b)) if a == b && b != "+" && b != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Can some topic be matched by both `a` and `b`?
fn overlaps(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(user: Option<&str>, topic: &str, access: Access) -> AclRule {
        AclRule {
            user: user.map(str::to_owned),
            topic: topic.into(),
            access,
        }
    }

    const ALICE: Principal<'static> = Principal {
        user: Some("alice"),
        client_id: "alice-1",
    };

    #[test]
    fn matching() {
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d"));
        assert!(!matches("#", "$SYS/x"));
        assert!(covers("a/#", "a/+/x"));
        assert!(!covers("a/#", "#"));
        assert!(!covers("a/+", "a/#"));
        assert!(overlaps("a/secret/#", "a/#"));
        assert!(!overlaps("a/secret/#", "b/#"));
    }

    #[test]
    fn filters_are_checked() {
        assert!(check_filter("a/#").is_ok());
        assert!(check_filter("a/#/b").is_err());
        assert!(check_filter("a/b+").is_err());
        assert!(check_filter("").is_err());
        assert!(check_topic("a/+").is_err());
    }

    #[test]
    fn grants_denies_and_patterns() {
        let acl = AclConfig {
            default: Default::Deny,
            rule: vec![
                rule(None, "edge/%u/#", Access::Readwrite),
                rule(Some("alice"), "edge/shared/#", Access::Read),
                rule(None, "edge/alice/secret", Access::Deny),
            ],
        };
        assert!(acl.can_publish(ALICE, "edge/alice/x"));
        assert!(!acl.can_publish(ALICE, "edge/alice/secret"));
        assert!(!acl.can_publish(ALICE, "edge/shared/x"));
        assert!(acl.can_subscribe(ALICE, "edge/shared/+"));
        assert!(
            acl.can_subscribe(ALICE, "edge/alice/#"),
            "a deny inside is filtered"
        );
        assert!(acl.can_subscribe(ALICE, "edge/#"), "part of it is readable");
        assert!(
            !acl.can_subscribe(ALICE, "edge/alice/secret"),
            "a deny covers it"
        );
        assert!(!acl.can_subscribe(ALICE, "other/#"), "nothing readable");
        assert!(acl.can_read(ALICE, "edge/alice/x"));
        assert!(!acl.can_read(ALICE, "edge/alice/secret"));
        assert!(!acl.can_read(ALICE, "edge/bob/x"));
        let anon = Principal {
            user: None,
            client_id: "x",
        };
        assert!(
            !acl.can_publish(anon, "edge/x/y"),
            "%u never matches anonymous"
        );
        let sneaky = Principal {
            user: Some("+"),
            client_id: "x",
        };
        assert!(!acl.can_publish(sneaky, "edge/bob/y"), "wildcard usernames");
    }

    #[test]
    fn no_rules_means_default() {
        let allow = AclConfig::default();
        assert!(allow.can_publish(ALICE, "x"));
        let deny = AclConfig {
            default: Default::Deny,
            rule: vec![],
        };
        assert!(!deny.can_subscribe(ALICE, "x"));
    }
}
