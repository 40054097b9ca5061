//! The `[orchestrator]` and `[[saga]]` tables of topics.toml: checked against the
//! `[[service]]` contract, and built into runtime sagas.

use std::path::PathBuf;
use std::time::Duration;

use edgebus_runtime::config::ByteSize;
use edgebus_runtime::contract::{check_name, ContractError, ServiceSpec};
use edgebus_runtime::saga::{template_paths, RetryPolicy, Saga, Step};
use edgebus_runtime::tree::Tree;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `[orchestrator]` in topics.toml.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestratorConfig {
    /// The journal file. A relative path is taken inside `$STATE_DIRECTORY` (systemd's
    /// `StateDirectory=`) when that is set, else the working directory.
    pub journal: PathBuf,
    /// Size past which the journal is compacted (finished runs dropped).
    pub max_journal: ByteSize,
    /// Runs at once; more get `SERVICE_UNAVAILABLE`.
    pub max_runs: usize,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig {
            journal: PathBuf::from("sagas.journal"),
            max_journal: ByteSize(1024 * 1024),
            max_runs: 256,
        }
    }
}

impl OrchestratorConfig {
    /// The journal's path, resolved.
    pub fn journal_path(&self) -> PathBuf {
        edgebus_runtime::config::state_path(&self.journal)
    }
}

/// `[[saga]]`: one saga.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SagaConfig {
    /// Name: `P/saga/{name}/request` starts it.
    pub name: String,
    /// For people.
    #[serde(default)]
    pub description: String,
    /// How long the run record stays retained after the run ends.
    #[serde(default = "default_retain", with = "edgebus_runtime::config::duration")]
    pub retain_for: Duration,
    /// The steps, in order.
    #[serde(default)]
    pub step: Vec<StepConfig>,
}

fn default_retain() -> Duration {
    Duration::from_secs(60)
}

fn default_step_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_retry_delay() -> Duration {
    Duration::from_millis(100)
}

/// `[[saga.step]]`: one step.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// Unique within the saga; `${steps.NAME.…}` refers to its output.
    pub name: String,
    /// `SERVICE/ENDPOINT` to call.
    pub call: String,
    /// The request sent, a template: `"${request.field}"`, `"${steps.NAME.field}"`,
    /// `"${run_id}"`, or text around them. Default: the saga's request.
    #[serde(default)]
    pub input: Option<Value>,
    /// `SERVICE/ENDPOINT` that undoes the step.
    #[serde(default)]
    pub compensate: Option<String>,
    /// The compensation's request, a template. Default: the step's own input.
    #[serde(default)]
    pub compensate_input: Option<Value>,
    /// Time allowed per attempt.
    #[serde(
        default = "default_step_timeout",
        with = "edgebus_runtime::config::duration"
    )]
    pub timeout: Duration,
    /// Retries after a retryable error (also for the compensation).
    #[serde(default)]
    pub retries: u32,
    /// First delay between attempts (doubling, up to 2 s, ±25 %).
    #[serde(
        default = "default_retry_delay",
        with = "edgebus_runtime::config::duration"
    )]
    pub retry_delay: Duration,
    /// Error codes worth a retry; default: the retryable ones.
    #[serde(default)]
    pub retry_on: Vec<String>,
}

/// Checks every `[[saga]]`: names, calls, templates; errors carry the key path
/// (`saga[0].step[1].call`).
pub fn validate(sagas: &[SagaConfig], services: &[ServiceSpec]) -> Result<(), ContractError> {
    let err = |path: String, message: String| ContractError { path, message };
    let mut names = std::collections::HashSet::new();
    for (i, s) in sagas.iter().enumerate() {
        let at = format!("saga[{i}]");
        check_name(&s.name).map_err(|m| err(format!("{at}.name"), m))?;
        if !names.insert(&s.name) {
            return Err(err(
                format!("{at}.name"),
                format!("saga `{}` is declared twice", s.name),
            ));
        }
        if s.step.is_empty() {
            return Err(err(
                format!("{at}.name"),
                format!("saga `{}` has no [[saga.step]]", s.name),
            ));
        }
        let mut steps: Vec<&str> = Vec::new();
        for (j, st) in s.step.iter().enumerate() {
            let at = format!("{at}.step[{j}]");
            check_name(&st.name).map_err(|m| err(format!("{at}.name"), m))?;
            if steps.contains(&st.name.as_str()) {
                return Err(err(
                    format!("{at}.name"),
                    format!("step `{}` is declared twice", st.name),
                ));
            }
            for (key, call) in [
                ("call", Some(&st.call)),
                ("compensate", st.compensate.as_ref()),
            ] {
                let Some(call) = call else { continue };
                split_call(call).map_err(|m| err(format!("{at}.{key}"), m))?;
                if let Some((svc, ep)) = call.split_once('/') {
                    if let Some(spec) = services.iter().find(|x| x.name == svc) {
                        if !spec.endpoints.iter().any(|e| e.name == ep) {
                            return Err(err(
                                format!("{at}.{key}"),
                                format!("service `{svc}` declares no endpoint `{ep}`"),
                            ));
                        }
                    }
                }
            }
            for (key, t) in [
                ("input", st.input.as_ref()),
                ("compensate_input", st.compensate_input.as_ref()),
            ] {
                for path in t.map(template_paths).unwrap_or_default() {
                    let mut parts = path.trim().split('.');
                    let ok = match parts.next() {
                        Some("request") | Some("run_id") => true,
                        Some("steps") => {
                            let name = parts.next().unwrap_or("");
                            steps.contains(&name) || (key == "compensate_input" && name == st.name)
                        }
                        _ => false,
                    };
                    if !ok {
                        return Err(err(
                            format!("{at}.{key}"),
                            format!(
                                "`${{{path}}}`: a template refers to `request.…`, `run_id`, or \
                                 `steps.NAME.…` of an earlier step"
                            ),
                        ));
                    }
                }
            }
            if st.timeout.is_zero() {
                return Err(err(
                    format!("{at}.timeout"),
                    "timeout must be above 0".into(),
                ));
            }
            steps.push(&st.name);
        }
    }
    Ok(())
}

fn split_call(call: &str) -> Result<(&str, &str), String> {
    match call.split_once('/') {
        Some((s, e)) if check_name(s).is_ok() && check_name(e).is_ok() => Ok((s, e)),
        _ => Err(format!(
            "`{call}`: expected SERVICE/ENDPOINT, such as \"kv/put\""
        )),
    }
}

/// The request topic of `SERVICE/ENDPOINT`, with the endpoint's own base topic if topics.toml
/// gives one.
fn request_topic(prefix: &str, services: &[ServiceSpec], call: &str) -> String {
    let (svc, ep) = call.split_once('/').unwrap_or((call, ""));
    services
        .iter()
        .find(|s| s.name == svc)
        .and_then(|s| s.endpoints.iter().find(|e| e.name == ep))
        .map_or_else(
            || Tree::new(prefix).request(svc, ep),
            |e| e.request_topic(prefix, svc),
        )
}

/// The runtime saga a `[[saga]]` describes.
pub fn build(prefix: &str, services: &[ServiceSpec], c: &SagaConfig) -> Saga {
    let mut saga = Saga::new(&c.name);
    for s in &c.step {
        let mut step = Step::call(&s.name, request_topic(prefix, services, &s.call))
            .timeout(s.timeout)
            .retry(RetryPolicy {
                max_attempts: s.retries.saturating_add(1),
                initial_delay: s.retry_delay,
                retry_on: s.retry_on.clone(),
                ..RetryPolicy::default()
            });
        if let Some(i) = &s.input {
            step = step.input(i.clone());
        }
        if let Some(c) = &s.compensate {
            step = step.compensate_call(request_topic(prefix, services, c));
        }
        if let Some(i) = &s.compensate_input {
            step = step.compensate_input(i.clone());
        }
        saga = saga.step(step);
    }
    saga
}
