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
//!
//! **Permissions** say the same in the bus's own words, for a user in `[broker.acl.permissions]`
//! or in a token's `permissions` claim (see [`expand`]): `echo:call`, `echo:serve`,
//! `edge/sensors/#:write`. Each stands for the rules it expands to, under the bus's prefix.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `[broker.acl]` table.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    /// What happens when no rule matches: `allow` or `deny`.
    pub default: Default,
    /// The rules, in any order.
    pub rule: Vec<AclRule>,
    /// Permissions by username (`alice = ["echo:call"]`), each expanded into rules for that
    /// user when the broker starts (see [`expand`]).
    pub permissions: BTreeMap<String, Vec<String>>,
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
    /// Username from CONNECT (or a token's subject), if any.
    pub user: Option<&'a str>,
    /// Client id.
    pub client_id: &'a str,
    /// Rules that come with the client's credentials (a token's permissions), on top of the
    /// configured ones.
    pub grants: &'a [AclRule],
}

impl AclConfig {
    /// Checks every pattern and permission.
    pub fn validate(&self) -> Result<(), String> {
        for (i, r) in self.rule.iter().enumerate() {
            check_pattern(&r.topic)
                .map_err(|e| format!("acl.rule[{i}].topic `{}`: {e}", r.topic))?;
        }
        for (user, permissions) in &self.permissions {
            for (i, p) in permissions.iter().enumerate() {
                expand(p, "edge").map_err(|e| format!("acl.permissions.{user}[{i}] {e}"))?;
            }
        }
        Ok(())
    }

    /// The rules the permissions stand for, added to `rule` (for their users), under the
    /// bus's topic `prefix`. The broker does this once, when it starts.
    pub fn compile(mut self, prefix: &str) -> Result<AclConfig, String> {
        self.validate()?;
        for (user, permissions) in std::mem::take(&mut self.permissions) {
            for p in &permissions {
                for mut rule in expand(p, prefix)? {
                    rule.user = Some(user.clone());
                    self.rule.push(rule);
                }
            }
        }
        Ok(self)
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
        if self.rule.is_empty() && who.grants.is_empty() {
            return self.default == Default::Allow;
        }
        self.decide(who, |pattern, access| match access {
            Access::Deny | Access::Read | Access::Readwrite => Some(matches(pattern, topic)),
            Access::Write => None,
        })
    }

    fn decide(&self, who: Principal<'_>, test: impl Fn(&str, Access) -> Option<bool>) -> bool {
        if self.rule.is_empty() && who.grants.is_empty() {
            return self.default == Default::Allow;
        }
        let mut granted = false;
        for rule in self.rule.iter().chain(who.grants) {
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

/// Checks a rule's topic pattern, `%u` and `%c` standing for one level each.
fn check_pattern(pattern: &str) -> Result<(), String> {
    check_filter(&pattern.replace("%u", "u").replace("%c", "c")).map_err(str::to_owned)
}

/// Expands one permission into the rules it stands for, under the bus's topic `prefix` `P`.
/// The rules name no user: they apply to whoever holds the permission.
///
/// A permission is `WHAT:VERB`:
///
/// | permission | grants |
/// |---|---|
/// | `FILTER:read`, `FILTER:write`, `FILTER:readwrite` | that on the topic filter (`edge/sensors/#:write`), as a rule would |
/// | `SERVICE:call` | requests to every endpoint of the service (`P/SERVICE/+/request`), and the caller's own reply topic (`P/system/reply/{client id}`, read and write) |
/// | `SERVICE/ENDPOINT:call`, `saga/NAME:call` | requests to that one endpoint or saga (`P/…/request`), and the reply topic |
/// | `SERVICE:serve` | what an instance of the service does, as itself only: read its requests; write its replies (to callers' reply topics, or `…/result` and `…/error`), its events, and its own registration and heartbeat (`…/SERVICE/{client id}`, the instance id being the client id), its dead letters; read its own registration, the broker's lag reports; read and write `P/broadcast/+` |
/// | `edgebus:discovery`, `edgebus:health`, `edgebus:orchestrator` | what that part of the bus reads and writes, and nothing else (each also serves as the service `discovery`, `health-monitor` or `orchestrator`) |
/// | `edgebus:watch` | what `edgebus services` and `edgebus health` read: registrations, health, saga runs, broker stats |
///
/// `edgebus up` runs its parts under one identity: give it the three part permissions and a
/// `serve` for each built-in service it runs.
pub fn expand(permission: &str, prefix: &str) -> Result<Vec<AclRule>, String> {
    let (what, verb) = permission
        .rsplit_once(':')
        .ok_or_else(|| format!("`{permission}`: expected WHAT:VERB (e.g. `echo:call`)"))?;
    let bad = |why: &str| format!("`{permission}`: {why}");
    let name_ok =
        |s: &str| !s.is_empty() && !s.contains(['+', '#', '/', '%']) && !s.starts_with('$');
    let rule = |topic: String, access: Access| AclRule {
        user: None,
        topic,
        access,
    };
    let p = prefix;
    // Read and write: a client confirms its reply subscription with a message to itself.
    let own_reply = || rule(format!("{p}/system/reply/%c"), Access::Readwrite);
    let lag = || rule(format!("{p}/system/broker/lag"), Access::Read);
    let rules = match verb {
        "read" | "write" | "readwrite" => {
            check_pattern(what).map_err(|e| bad(&e))?;
            let access = match verb {
                "read" => Access::Read,
                "write" => Access::Write,
                _ => Access::Readwrite,
            };
            vec![rule(what.to_owned(), access)]
        }
        "call" => {
            let levels: Vec<&str> = what.split('/').collect();
            if levels.len() > 2 || !levels.iter().all(|l| name_ok(l)) {
                return Err(bad("`call` takes SERVICE, SERVICE/ENDPOINT or saga/NAME"));
            }
            let topic = if levels.len() == 1 {
                format!("{p}/{what}/+/request")
            } else {
                format!("{p}/{what}/request")
            };
            vec![rule(topic, Access::Write), own_reply()]
        }
        "serve" => {
            if !name_ok(what) {
                return Err(bad("`serve` takes a service name"));
            }
            let s = what;
            vec![
                rule(format!("{p}/{s}/+/request"), Access::Read),
                rule(format!("{p}/{s}/+/result"), Access::Write),
                rule(format!("{p}/{s}/+/error"), Access::Write),
                rule(format!("{p}/{s}/events/#"), Access::Write),
                rule(format!("{p}/system/reply/+"), Access::Write),
                rule(format!("{p}/health/heartbeat/{s}/%c"), Access::Write),
                rule(format!("{p}/system/discovery/{s}/%c"), Access::Readwrite),
                rule(format!("{p}/system/deadletter/{s}"), Access::Write),
                rule(format!("{p}/broadcast/+"), Access::Readwrite),
                own_reply(),
                lag(),
            ]
        }
        "discovery" | "health" | "orchestrator" | "watch" if what == "edgebus" => {
            use Access::{Read, Readwrite, Write};
            // The service each part is an instance of (its registration and heartbeat),
            // and the topics of its work.
            let (serves, topics): (Option<&str>, &[(&str, Access)]) = match verb {
                "discovery" => (
                    Some("discovery"),
                    &[
                        ("system/discovery/#", Readwrite),
                        ("+/+/request", Read),
                        ("+/+/error", Write),
                        ("system/reply/+", Write),
                    ],
                ),
                "health" => (
                    Some("health-monitor"),
                    &[
                        ("health/heartbeat/+/+", Read),
                        ("system/discovery/+/+", Read),
                        ("health/status/+", Readwrite),
                        ("health/summary", Write),
                        ("health/alert", Write),
                    ],
                ),
                "orchestrator" => (
                    Some("orchestrator"),
                    &[
                        ("saga/+/request", Read),
                        ("saga/+/runs/+", Readwrite),
                        ("saga/+/result", Write),
                        ("saga/+/error", Write),
                        ("+/+/request", Write),
                        ("system/reply/+", Write),
                    ],
                ),
                _ => (
                    None,
                    &[
                        ("system/discovery/#", Read),
                        ("system/discovery/list/request", Write),
                        ("health/#", Read),
                        ("saga/+/runs/+", Read),
                        ("system/broker/stats", Read),
                    ],
                ),
            };
            let mut rules = match serves {
                Some(service) => expand(&format!("{service}:serve"), prefix)?,
                None => vec![own_reply(), lag()],
            };
            rules.extend(topics.iter().map(|&(t, a)| rule(format!("{p}/{t}"), a)));
            rules
        }
        _ => {
            return Err(bad(
                "unknown verb (read, write, readwrite, call, serve; edgebus:discovery, \
                 edgebus:health, edgebus:orchestrator, edgebus:watch)",
            ))
        }
    };
    Ok(rules)
}

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
        grants: &[],
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
            ..AclConfig::default()
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
            grants: &[],
        };
        assert!(
            !acl.can_publish(anon, "edge/x/y"),
            "%u never matches anonymous"
        );
        let sneaky = Principal {
            user: Some("+"),
            client_id: "x",
            grants: &[],
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
            ..AclConfig::default()
        };
        assert!(!deny.can_subscribe(ALICE, "x"));
    }

    fn deny_all() -> AclConfig {
        AclConfig {
            default: Default::Deny,
            ..AclConfig::default()
        }
    }

    #[test]
    fn permissions_expand_to_rules() {
        let acl = AclConfig {
            permissions: [
                ("echo".to_owned(), vec!["echo:serve".to_owned()]),
                ("alice".to_owned(), vec!["echo/echo:call".to_owned()]),
            ]
            .into(),
            ..deny_all()
        }
        .compile("edge")
        .expect("compiles");
        let echo = Principal {
            user: Some("echo"),
            client_id: "echo-1",
            grants: &[],
        };
        assert!(acl.can_subscribe(echo, "edge/echo/+/request"));
        assert!(acl.can_publish(echo, "edge/system/discovery/echo/echo-1"));
        assert!(
            !acl.can_publish(echo, "edge/system/discovery/echo/echo-2"),
            "another instance's record"
        );
        assert!(!acl.can_publish(echo, "edge/system/discovery/stt/echo-1"));
        assert!(acl.can_publish(echo, "edge/health/heartbeat/echo/echo-1"));
        assert!(!acl.can_publish(echo, "edge/health/heartbeat/stt/echo-1"));
        assert!(acl.can_publish(echo, "edge/system/reply/alice-1"));
        assert!(!acl.can_publish(echo, "edge/stt/x/request"));
        assert!(acl.can_publish(ALICE, "edge/echo/echo/request"));
        assert!(!acl.can_publish(ALICE, "edge/echo/other/request"));
        assert!(acl.can_subscribe(ALICE, "edge/system/reply/alice-1"));
        assert!(!acl.can_subscribe(ALICE, "edge/system/reply/bob-1"));
        assert!(!acl.can_publish(ALICE, "edge/system/reply/bob-1"));
        assert!(!acl.can_publish(ALICE, "edge/system/discovery/echo/alice-1"));
    }

    #[test]
    fn grants_come_with_the_principal() {
        let grants = expand("edge/sensors/#:write", "edge").expect("valid");
        let acl = deny_all();
        let holder = Principal {
            grants: &grants,
            ..ALICE
        };
        assert!(acl.can_publish(holder, "edge/sensors/t1"));
        assert!(!acl.can_publish(holder, "edge/other"));
        assert!(!acl.can_publish(ALICE, "edge/sensors/t1"));
        let denied = AclConfig {
            rule: vec![rule(None, "edge/sensors/secret", Access::Deny)],
            ..deny_all()
        };
        assert!(
            !denied.can_publish(holder, "edge/sensors/secret"),
            "a configured deny wins over a token's grant"
        );
    }

    #[test]
    fn bad_permissions_say_why() {
        for p in [
            "echo",
            "echo:fly",
            "a/+/b:call",
            "x/y/z:call",
            "a/#/b:write",
            "+:serve",
        ] {
            assert!(expand(p, "edge").is_err(), "{p}");
        }
        let bad = AclConfig {
            permissions: [("bob".to_owned(), vec!["echo:fly".to_owned()])].into(),
            ..AclConfig::default()
        };
        let e = bad.validate().unwrap_err();
        assert!(e.starts_with("acl.permissions.bob[0] `echo:fly`"), "{e}");
    }
}
