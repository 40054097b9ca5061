//! Per-target request policies: retries and circuit breakers, set by hand or from the
//! `[[service]]` contract.

use super::*;

/// How requests to one target are retried and guarded; see [`Bus::set_policy`].
#[derive(Debug)]
pub struct TargetPolicy {
    /// `service/endpoint`, for logs and stats.
    pub name: String,
    /// Retries; `None`: one attempt.
    pub retry: Option<crate::policy::RetryPolicy>,
    /// The circuit breaker, if any.
    pub circuit: Option<crate::policy::CircuitBreaker>,
}

impl Bus {
    /// Sets how requests to `target` (`service/endpoint` or a request topic) are retried and
    /// whether a circuit breaker guards them; replaces an earlier policy and its breaker state.
    pub fn set_policy(
        &self,
        target: &str,
        retry: Option<crate::policy::RetryPolicy>,
        circuit: Option<crate::policy::CircuitConfig>,
    ) {
        let topic = self.request_topic(target);
        let name = topic
            .strip_prefix(&format!("{}/", self.prefix()))
            .unwrap_or(&topic)
            .trim_end_matches("/request")
            .to_owned();
        let policy = TargetPolicy {
            name,
            retry,
            circuit: circuit.map(crate::policy::CircuitBreaker::new),
        };
        write(&self.inner.policies).insert(topic, Arc::new(policy));
    }

    /// Sets the retry and circuit policies every endpoint of `services` declares (endpoints
    /// that declare neither keep what they had).
    pub fn apply_contract(&self, services: &[crate::contract::ServiceSpec]) {
        for s in services {
            for e in &s.endpoints {
                if e.retry.is_some() || e.circuit.is_some() {
                    let topic = e.request_topic(self.prefix(), &s.name);
                    let known = read(&self.inner.policies).get(&topic).is_some_and(|p| {
                        p.retry == e.retry
                            && p.circuit.as_ref().map(|c| c.config()) == e.circuit.as_ref()
                    });
                    if !known {
                        self.set_policy(&topic, e.retry.clone(), e.circuit.clone());
                    }
                }
            }
        }
    }

    /// The policy for requests on `topic`, if one was set.
    pub fn policy(&self, topic: &str) -> Option<Arc<TargetPolicy>> {
        read(&self.inner.policies).get(topic).cloned()
    }

    /// The state of every circuit breaker, by `service/endpoint`.
    pub fn circuits(&self) -> std::collections::BTreeMap<String, crate::policy::CircuitSnapshot> {
        read(&self.inner.policies)
            .values()
            .filter_map(|p| Some((p.name.clone(), p.circuit.as_ref()?.snapshot())))
            .collect()
    }
}
