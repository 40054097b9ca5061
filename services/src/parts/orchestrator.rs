//! The orchestrator: runs the sagas declared in topics.toml (`[[saga]]`).
//!
//! - A request on `P/saga/{name}/request` starts a run; the reply (routed like any reply, so
//!   `mosquitto_rr` works) comes when the run ends: `success` when every step completed, else
//!   the failing step's error; `data` is the run either way.
//! - Progress: the retained `P/saga/{name}/runs/{run_id}`, updated at every transition and
//!   cleared `retain_for` after the run ends.
//! - Durability: every transition is written to the journal (`fdatasync`) before the run acts
//!   on it. Started again after a crash, the orchestrator resumes every run the journal says is
//!   unfinished (a step sent and not answered is sent again with the same idempotency key), and
//!   answers the original caller at the address it kept.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgebus_runtime::bus::{Bus, Message, PublishOptions};
use edgebus_runtime::config::ByteSize;
use edgebus_runtime::contract::{check_name, ContractError, ServiceSpec};
use edgebus_runtime::saga::{
    template_paths, FileJournal, Journal, Observer, RetryPolicy, RunState, RunStatus, Saga, Step,
    StepStatus, Transition,
};
use edgebus_runtime::service::{ReplyAddress, Service, StartError};
use edgebus_runtime::tree::Tree;
use edgebus_runtime::wire::{code, decode_request, ErrorBody};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

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
        if self.journal.is_absolute() {
            return self.journal.clone();
        }
        match std::env::var_os("STATE_DIRECTORY") {
            // systemd may list several, separated by ':'; the first is ours.
            Some(d) => PathBuf::from(
                d.to_string_lossy()
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .join(&self.journal),
            None => self.journal.clone(),
        }
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

/// A running orchestrator.
pub struct Orchestrator {
    /// Its own service (registration, heartbeat).
    pub service: Service,
    /// The journal.
    pub journal: Arc<FileJournal>,
}

struct Ctx {
    bus: Bus,
    prefix: String,
    instance: String,
    sagas: HashMap<String, (Saga, Duration)>,
    journal: Arc<FileJournal>,
    runs: Arc<Semaphore>,
}

/// Starts the orchestrator on `bus`: resumes what the journal left unfinished, then takes
/// requests.
pub async fn start(
    prefix: &str,
    config: &OrchestratorConfig,
    sagas: &[SagaConfig],
    services: &[ServiceSpec],
    bus: &Bus,
) -> Result<Orchestrator, StartError> {
    let path = config.journal_path();
    let (journal, pending) =
        FileJournal::open(&path, config.max_journal.0).map_err(|e| StartError::State {
            service: "orchestrator".into(),
            what: format!("saga journal {}", path.display()),
            message: e.to_string(),
        })?;
    let journal = Arc::new(journal);
    let mut builder = edgebus_runtime::service!("orchestrator")
        .description("runs the sagas declared in topics.toml")
        .capability("saga");
    for s in sagas {
        builder = builder.tag(format!("saga:{}", s.name));
    }
    let service = builder.start(bus).await?;
    let ctx = Arc::new(Ctx {
        bus: bus.clone(),
        prefix: prefix.to_owned(),
        instance: service.instance().to_owned(),
        sagas: sagas
            .iter()
            .map(|c| (c.name.clone(), (build(prefix, services, c), c.retain_for)))
            .collect(),
        journal: journal.clone(),
        runs: Arc::new(Semaphore::new(config.max_runs.max(1))),
    });

    // Finished runs whose records a crash left retained: cleared after retain_for.
    let mut old = bus.subscribe(&Tree::new(prefix).all_saga_runs(), 1).await?;
    bus.sync(Duration::from_secs(5)).await;
    while let Some(m) = old.try_recv() {
        let ended = serde_json::from_slice::<Value>(&m.payload)
            .map(|v| v["ended_at"].is_string())
            .unwrap_or(false);
        if m.retain && ended {
            let saga = m.topic.split('/').rev().nth(2).unwrap_or("");
            let keep = ctx.sagas.get(saga).map_or(Duration::ZERO, |s| s.1);
            ctx.clear_later(m.topic.clone(), keep);
        }
    }
    drop(old);

    // Unfinished runs first.
    for transitions in pending {
        let Some(first) = transitions.first() else {
            continue;
        };
        let Transition::Start { saga, .. } = first else {
            continue;
        };
        let Some((s, _)) = ctx.sagas.get(saga) else {
            tracing::error!(run = %first.run(), %saga, "journal has a run of a saga no longer declared; left as it is");
            continue;
        };
        let Some(mut state) = RunState::from_start(first, s) else {
            continue;
        };
        for t in &transitions[1..] {
            state.apply(t);
        }
        tracing::info!(run = %state.run_id, saga = %state.saga, "resuming an unfinished run");
        let c = ctx.clone();
        let permit = ctx.runs.clone().acquire_owned().await.ok();
        tokio::spawn(async move {
            c.finish(state).await;
            drop(permit);
        });
    }

    let mut requests = bus
        .subscribe_with(
            &format!(
                "$share/orchestrator/{}",
                Tree::new(prefix).all_saga_requests()
            ),
            &Tree::new(prefix).all_saga_requests(),
            1,
            None,
        )
        .await?;
    let c = ctx.clone();
    service.spawn(async move {
        while let Some(m) = requests.recv().await {
            c.request(m);
        }
    });
    tracing::info!(sagas = ctx.sagas.len(), journal = %path.display(), "orchestrator started");
    Ok(Orchestrator { service, journal })
}

impl Ctx {
    fn request(self: &Arc<Self>, msg: Message) {
        let levels = self.prefix.split('/').count();
        let name = msg
            .topic
            .split('/')
            .nth(levels + 1)
            .unwrap_or("")
            .to_owned();
        // Read once, as an endpoint reads a request: an empty payload is `{}`, and a
        // `reply_to` that is not a topic name is refused.
        let mut address = ReplyAddress::from_properties(&msg, 1);
        let decoded = decode_request(&msg.payload)
            .map_err(ErrorBody::bad_request)
            .and_then(|(input, meta)| address.apply(&meta).map(|()| input));
        let refuse = |e: ErrorBody| {
            let _ = address.reply(
                &self.bus,
                Some("orchestrator"),
                &self.instance,
                None,
                Some(e),
            );
        };
        let Some((saga, _)) = self.sagas.get(&name) else {
            refuse(ErrorBody::not_found(format!(
                "no saga `{name}` is declared"
            )));
            return;
        };
        let input = match decoded {
            Ok(Value::Null) => json!({}),
            Ok(input) => input,
            Err(e) => return refuse(e),
        };
        let Ok(permit) = self.runs.clone().try_acquire_owned() else {
            refuse(ErrorBody::unavailable(
                "too many saga runs at once; retry later",
            ));
            return;
        };
        let run_id = Saga::new_run_id();
        let start = saga.start_transition(
            run_id,
            input,
            serde_json::to_value(&address).unwrap_or(Value::Null),
        );
        let c = self.clone();
        tokio::spawn(async move {
            let Some((saga, _)) = c.sagas.get(&name) else {
                return;
            };
            if let Err(e) = c.journal.record(&start) {
                tracing::error!(error = %e, "saga journal write failed; run refused");
                let _ = address.reply(
                    &c.bus,
                    Some("orchestrator"),
                    &c.instance,
                    None,
                    Some(ErrorBody::internal(format!("saga journal: {e}"))),
                );
                return;
            }
            let Some(state) = RunState::from_start(&start, saga) else {
                return;
            };
            c.finish(state).await;
            drop(permit);
        });
    }

    /// Runs `state` to its end, then answers the caller and schedules the record's clearing.
    async fn finish(self: &Arc<Self>, state: RunState) {
        let Some((saga, retain_for)) = self.sagas.get(&state.saga) else {
            return;
        };
        let topic = Tree::new(&self.prefix).saga_run(&state.saga, &state.run_id);
        let bus = self.bus.clone();
        let t = topic.clone();
        let observer: Observer = Arc::new(move |s: &RunState| {
            let mut public = s.clone();
            public.meta = Value::Null;
            if let Ok(body) = serde_json::to_vec(&public) {
                let opts = PublishOptions::retained();
                if let Err(e) = bus.try_publish(&t, body, opts) {
                    tracing::debug!(topic = %t, error = %e, "run record not published");
                }
            }
        });
        let address: Option<ReplyAddress> = serde_json::from_value(state.meta.clone()).ok();
        let journal: &dyn Journal = &*self.journal;
        let end = match saga
            .resume(&self.bus, state, Some(journal), Some(observer))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                // The run stays unfinished in the journal; a restart resumes it.
                tracing::error!(error = %e, "saga journal write failed; run paused");
                return;
            }
        };
        tracing::info!(run = %end.run_id, saga = %end.saga, status = end.status.as_str(), "saga run ended");
        let mut public = end.clone();
        public.meta = Value::Null;
        let data = serde_json::to_value(&public).ok();
        let error = match end.status {
            RunStatus::Completed => None,
            status => {
                let failed = end.steps.iter().find(|s| s.state == StepStatus::Failed);
                let cause = end
                    .error
                    .clone()
                    .unwrap_or_else(|| ErrorBody::internal("run failed"));
                let undone: Vec<&str> = end
                    .steps
                    .iter()
                    .filter(|s| s.state == StepStatus::Compensated)
                    .map(|s| s.name.as_str())
                    .collect();
                let mut message = format!(
                    "step `{}` failed ({cause}); ",
                    failed.map_or("?", |s| s.name.as_str())
                );
                if status == RunStatus::Failed {
                    message.push_str("a compensation failed too, so effects may remain");
                } else if undone.is_empty() {
                    message.push_str("nothing to undo");
                } else {
                    message.push_str(&format!("undone: {}", undone.join(", ")));
                }
                let code = if status == RunStatus::Failed {
                    code::INTERNAL_ERROR.to_owned()
                } else {
                    cause.code.clone()
                };
                Some(ErrorBody::new(code, message).retryable(false))
            }
        };
        if let Some(a) = address {
            if let Err(e) = a.reply(&self.bus, Some("orchestrator"), &self.instance, data, error) {
                tracing::warn!(run = %end.run_id, error = %e, "saga reply not sent");
            }
        }
        self.clear_later(topic, *retain_for);
    }

    fn clear_later(self: &Arc<Self>, topic: String, after: Duration) {
        let bus = self.bus.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let opts = PublishOptions::retained();
            let _ = bus.publish(&topic, Vec::new(), opts).await;
        });
    }
}
