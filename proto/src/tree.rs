//! The topic tree, named in one place: every topic and filter of the bus as a function of the
//! prefix (`bus.prefix` of topics.toml, `edge` by default). Writers and readers both name
//! their topics here, so the two cannot spell one differently.

/// The topic tree under one prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tree {
    prefix: String,
}

impl Tree {
    /// The tree under `prefix` (`edge`).
    pub fn new(prefix: impl Into<String>) -> Tree {
        Tree {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many topic levels the prefix has (`edge` → 1).
    pub fn levels(&self) -> usize {
        self.prefix.split('/').count()
    }

    /// `P/{service}/{endpoint}`: an endpoint's base topic, beside which its `request`,
    /// `result` and `error` leaves are.
    pub fn endpoint_base(&self, service: &str, endpoint: &str) -> String {
        format!("{}/{service}/{endpoint}", self.prefix)
    }

    /// `P/{service}/{endpoint}/request`.
    pub fn request(&self, service: &str, endpoint: &str) -> String {
        format!("{}/{service}/{endpoint}/request", self.prefix)
    }

    /// `P/+/+/request`: every request to an endpoint on its default base topic.
    pub fn all_requests(&self) -> String {
        format!("{}/+/+/request", self.prefix)
    }

    /// `P/{service}/events/{event}`.
    pub fn event(&self, service: &str, event: &str) -> String {
        format!("{}/{service}/events/{event}", self.prefix)
    }

    /// `P/health/heartbeat/{service}/{instance}`.
    pub fn heartbeat(&self, service: &str, instance: &str) -> String {
        format!("{}/health/heartbeat/{service}/{instance}", self.prefix)
    }

    /// `P/health/heartbeat/+/+`.
    pub fn all_heartbeats(&self) -> String {
        format!("{}/health/heartbeat/+/+", self.prefix)
    }

    /// `P/health/heartbeat/{service}/+`: every instance of one service.
    pub fn heartbeats_of(&self, service: &str) -> String {
        format!("{}/health/heartbeat/{service}/+", self.prefix)
    }

    /// `P/health/status/{service}`, retained.
    pub fn health_status(&self, service: &str) -> String {
        format!("{}/health/status/{service}", self.prefix)
    }

    /// `P/health/status/+`.
    pub fn all_health_statuses(&self) -> String {
        format!("{}/health/status/+", self.prefix)
    }

    /// `P/health/summary`, retained.
    pub fn health_summary(&self) -> String {
        format!("{}/health/summary", self.prefix)
    }

    /// `P/health/alert`.
    pub fn health_alert(&self) -> String {
        format!("{}/health/alert", self.prefix)
    }

    /// `P/system/discovery/{service}/{instance}`, retained: the registration record.
    pub fn registration(&self, service: &str, instance: &str) -> String {
        format!("{}/system/discovery/{service}/{instance}", self.prefix)
    }

    /// `P/system/discovery/+/+`: every registration, and also `update` and `list/request`
    /// (see [`Tree::registration_of`]).
    pub fn all_registrations(&self) -> String {
        format!("{}/system/discovery/+/+", self.prefix)
    }

    /// The service and instance of a registration record's topic; `None` for any other
    /// topic, such as discovery's own `update` and `list/request`.
    pub fn registration_of<'t>(&self, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/system/discovery/")?;
        let (service, instance) = rest.split_once('/')?;
        if instance.contains('/') || topic.starts_with(&self.discovery_list_base()) {
            return None;
        }
        Some((service, instance))
    }

    /// `P/system/discovery/update`.
    pub fn discovery_update(&self) -> String {
        format!("{}/system/discovery/update", self.prefix)
    }

    fn discovery_list_base(&self) -> String {
        format!("{}/system/discovery/list/", self.prefix)
    }

    /// `P/system/discovery/list`: the list endpoint's base topic.
    pub fn discovery_list(&self) -> String {
        format!("{}/system/discovery/list", self.prefix)
    }

    /// `P/system/deadletter/{service}`.
    pub fn dead_letter(&self, service: &str) -> String {
        format!("{}/system/deadletter/{service}", self.prefix)
    }

    /// `P/system/reply/{client_id}`: the one reply topic of a connection.
    pub fn reply(&self, client_id: &str) -> String {
        format!("{}/system/reply/{client_id}", self.prefix)
    }

    /// `P/system/broker`: where the embedded broker publishes about itself.
    pub fn broker(&self) -> String {
        format!("{}/system/broker", self.prefix)
    }

    /// `P/system/broker/stats`, retained.
    pub fn broker_stats(&self) -> String {
        stats_under(&self.broker())
    }

    /// `P/system/broker/lag`.
    pub fn broker_lag(&self) -> String {
        lag_under(&self.broker())
    }

    /// The request topic of `target`: `service/endpoint` is `P/service/endpoint/request`; a
    /// topic that already ends in `/request` is taken as it is.
    pub fn request_for(&self, target: &str) -> String {
        if target.ends_with("/request") {
            target.to_owned()
        } else {
            request_under(&format!("{}/{}", self.prefix, target.trim_matches('/')))
        }
    }

    /// `P/system/discovery/list/request`: where a list request goes.
    pub fn discovery_list_request(&self) -> String {
        request_under(&self.discovery_list())
    }

    /// `P/saga/{name}/request`.
    pub fn saga_request(&self, name: &str) -> String {
        format!("{}/saga/{name}/request", self.prefix)
    }

    /// `P/saga/+/request`.
    pub fn all_saga_requests(&self) -> String {
        format!("{}/saga/+/request", self.prefix)
    }

    /// `P/saga/{name}/runs/{run_id}`, retained for `retain_for` after the run ends.
    pub fn saga_run(&self, name: &str, run_id: &str) -> String {
        format!("{}/saga/{name}/runs/{run_id}", self.prefix)
    }

    /// `P/saga/+/runs/+`.
    pub fn all_saga_runs(&self) -> String {
        format!("{}/saga/+/runs/+", self.prefix)
    }

    /// The level of `topic` just under the prefix (the service of a request), if any.
    pub fn service_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic.split('/').nth(self.levels())
    }
}

/// An endpoint's request topic under its base topic: `{base}/request`.
pub fn request_under(base: &str) -> String {
    format!("{base}/request")
}

/// Where a reply goes when its request named no reply topic: `{base}/result` on success,
/// `{base}/error` on failure.
pub fn reply_under(base: &str, success: bool) -> String {
    if success {
        format!("{base}/result")
    } else {
        format!("{base}/error")
    }
}

/// The broker's stats record under its system topic: `{system}/stats`.
pub fn stats_under(system: &str) -> String {
    format!("{system}/stats")
}

/// The broker's lag reports under its system topic: `{system}/lag`.
pub fn lag_under(system: &str) -> String {
    format!("{system}/lag")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;

    #[test]
    fn names_and_filters_agree() {
        let t = Tree::new("edge");
        assert!(matches(&t.all_requests(), &t.request("echo", "echo")));
        assert!(matches(&t.all_heartbeats(), &t.heartbeat("echo", "e-1")));
        assert!(matches(&t.all_health_statuses(), &t.health_status("echo")));
        assert!(matches(
            &t.all_registrations(),
            &t.registration("echo", "e-1")
        ));
        assert!(matches(&t.all_saga_requests(), &t.saga_request("order")));
        assert!(matches(&t.all_saga_runs(), &t.saga_run("order", "r1")));
        assert_eq!(
            t.registration_of(&t.registration("echo", "e-1")),
            Some(("echo", "e-1"))
        );
        assert_eq!(t.registration_of(&t.discovery_update()), None);
        assert_eq!(
            t.registration_of(&format!("{}/request", t.discovery_list())),
            None
        );
        assert_eq!(t.registration_of(&t.heartbeat("echo", "e-1")), None);
        assert_eq!(t.service_of(&t.request("echo", "x")), Some("echo"));
        let deep = Tree::new("site/a");
        assert_eq!(deep.service_of(&deep.request("kv", "put")), Some("kv"));
        assert_eq!(deep.reply("c-1"), "site/a/system/reply/c-1");
    }
}
