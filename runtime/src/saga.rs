//! Sagas: steps run in order, each an endpoint call (or a local async fn) with its own timeout,
//! retry policy and optional compensation. When a step fails for good, every completed step is
//! compensated in reverse order. A run's state moves only by [`Transition`]s, which a
//! [`Journal`] can make durable before the run acts on them, so a run cut off by a crash can be
//! resumed where it stopped ([`Saga::resume`]).
//!
//! Each call carries an idempotency key (`{run_id}/{step}`, `{run_id}/{step}/compensate`) as the
//! MQTT 5 user property `idempotency_key`, the same for every attempt and after a resume: a
//! service that remembers the keys it has applied runs each step once, however often it is sent.
//!
//! ```no_run
//! # async fn f(bus: edgebus_runtime::bus::Bus) {
//! use edgebus_runtime::saga::{Saga, Step};
//! use serde_json::json;
//! let saga = Saga::new("order")
//!     .step(
//!         Step::call("reserve", "edge/kv/put/request")
//!             .input(json!({"key": "${request.order}/reserved", "value": "${request.qty}"}))
//!             .compensate_call("edge/kv/delete/request"),
//!     )
//!     .step(Step::call("charge", "edge/payments/charge/request").retries(2));
//! let run = saga.run(&bus, json!({"order": "A1", "qty": 2}), None).await;
//! println!("{}", run.status.as_str());
//! # }
//! ```

use std::future::Future;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::bus::{random_u64, Bus};
use crate::request::RequestOptions;
use crate::wire::{code, timestamp, ErrorBody};

pub use crate::policy::RetryPolicy;

/// A local step: the rendered input and the run's context in, the step's output out.
pub type LocalFn = Arc<
    dyn Fn(Value, Value) -> Pin<Box<dyn Future<Output = Result<Value, ErrorBody>> + Send>>
        + Send
        + Sync,
>;

/// What a step (or its compensation) does.
#[derive(Clone)]
pub enum Action {
    /// A request to an endpoint's request topic.
    Call(String),
    /// An async fn in this process.
    Local(LocalFn),
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Call(t) => write!(f, "Call({t})"),
            Action::Local(_) => write!(f, "Local"),
        }
    }
}

/// One step of a saga.
#[derive(Debug, Clone)]
pub struct Step {
    /// Unique within the saga; the key of its output in `${steps.NAME…}`.
    pub name: String,
    /// What it does.
    pub action: Action,
    /// The input, a template over the run's context (see [`render`]); `None`: the request.
    pub input: Option<Value>,
    /// What undoes it, if anything.
    pub compensate: Option<Action>,
    /// The compensation's input; `None`: the step's own input.
    pub compensate_input: Option<Value>,
    /// Time allowed per attempt.
    pub timeout: Duration,
    /// Retries of the step and of its compensation.
    pub retry: RetryPolicy,
}

impl Step {
    /// A step that calls the endpoint whose request topic is `topic`.
    pub fn call(name: impl Into<String>, topic: impl Into<String>) -> Step {
        Step::with(name, Action::Call(topic.into()))
    }

    /// A step that runs `f(input, context)` in this process.
    pub fn local<F, Fut>(name: impl Into<String>, f: F) -> Step
    where
        F: Fn(Value, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, ErrorBody>> + Send + 'static,
    {
        let f: LocalFn = Arc::new(move |i, c| Box::pin(f(i, c)));
        Step::with(name, Action::Local(f))
    }

    fn with(name: impl Into<String>, action: Action) -> Step {
        Step {
            name: name.into(),
            action,
            input: None,
            compensate: None,
            compensate_input: None,
            timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }

    /// Sets the input template.
    pub fn input(mut self, template: Value) -> Step {
        self.input = Some(template);
        self
    }

    /// Compensates by calling the endpoint whose request topic is `topic`.
    pub fn compensate_call(mut self, topic: impl Into<String>) -> Step {
        self.compensate = Some(Action::Call(topic.into()));
        self
    }

    /// Compensates with a local async fn.
    pub fn compensate_local<F, Fut>(mut self, f: F) -> Step
    where
        F: Fn(Value, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, ErrorBody>> + Send + 'static,
    {
        let f: LocalFn = Arc::new(move |i, c| Box::pin(f(i, c)));
        self.compensate = Some(Action::Local(f));
        self
    }

    /// Sets the compensation's input template.
    pub fn compensate_input(mut self, template: Value) -> Step {
        self.compensate_input = Some(template);
        self
    }

    /// Sets the time allowed per attempt.
    pub fn timeout(mut self, timeout: Duration) -> Step {
        self.timeout = timeout;
        self
    }

    /// Sets the number of retries (default policy otherwise).
    pub fn retries(mut self, retries: u32) -> Step {
        self.retry.max_attempts = retries.saturating_add(1);
        self
    }

    /// Sets the whole retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Step {
        self.retry = policy;
        self
    }
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Steps are running.
    Running,
    /// A step failed; completed steps are being undone.
    Compensating,
    /// Every step completed.
    Completed,
    /// A step failed and every completed step was undone.
    Compensated,
    /// A step failed and some compensation failed too: effects may remain.
    Failed,
}

impl RunStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Compensating => "compensating",
            RunStatus::Completed => "completed",
            RunStatus::Compensated => "compensated",
            RunStatus::Failed => "failed",
        }
    }

    /// Whether the run is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Compensated | RunStatus::Failed
        )
    }
}

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// Sent; no final answer yet.
    Running,
    /// Done.
    Completed,
    /// Failed after its retries.
    Failed,
    /// Being undone.
    Compensating,
    /// Undone.
    Compensated,
    /// Its compensation failed after its retries.
    CompensationFailed,
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// The step's name.
    pub name: String,
    /// Where it stands.
    pub state: StepStatus,
    /// Attempts of the step.
    pub attempts: u32,
    /// Attempts of its compensation.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub compensation_attempts: u32,
    /// Its output, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it (or its compensation) failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A run: what it was asked, where every step stands, and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Unique per run.
    pub run_id: String,
    /// The saga's name.
    pub saga: String,
    /// Where the run stands.
    pub status: RunStatus,
    /// The request that started it.
    pub input: Value,
    /// Per step, in order.
    pub steps: Vec<StepState>,
    /// The failure that started compensation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Opaque data kept with the run (the orchestrator keeps the reply address here).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub meta: Value,
}

impl RunState {
    /// The context templates are rendered against:
    /// `{"request": …, "steps": {"NAME": output, …}, "run_id": …}`.
    pub fn context(&self) -> Value {
        let steps: Map<String, Value> = self
            .steps
            .iter()
            .filter_map(|s| s.output.clone().map(|o| (s.name.clone(), o)))
            .collect();
        json!({"request": self.input, "steps": steps, "run_id": self.run_id})
    }

    /// Applies one transition (the only way a run's state changes).
    pub fn apply(&mut self, t: &Transition) {
        match t {
            Transition::Start { .. } => {}
            Transition::StepStarted { step, attempt, .. } => {
                if let Some(s) = self.steps.get_mut(*step) {
                    s.state = StepStatus::Running;
                    s.attempts = *attempt;
                }
            }
            Transition::StepDone { step, output, .. } => {
                if let Some(s) = self.steps.get_mut(*step) {
                    s.state = StepStatus::Completed;
                    s.output = Some(output.clone());
                    s.error = None;
                }
            }
            Transition::StepFailed { step, error, .. } => {
                if let Some(s) = self.steps.get_mut(*step) {
                    s.state = StepStatus::Failed;
                    s.error = Some(error.clone());
                }
                self.status = RunStatus::Compensating;
                self.error = Some(error.clone());
            }
            Transition::CompensationStarted { step, attempt, .. } => {
                if let Some(s) = self.steps.get_mut(*step) {
                    s.state = StepStatus::Compensating;
                    s.compensation_attempts = *attempt;
                }
            }
            Transition::CompensationDone { step, .. } => {
                if let Some(s) = self.steps.get_mut(*step) {
                    s.state = StepStatus::Compensated;
                }
            }
            Transition::CompensationFailed { step, error, .. } => {
                if let Some(s) = self.steps.get_mut(*step) {
                    s.state = StepStatus::CompensationFailed;
                    s.error = Some(error.clone());
                }
            }
            Transition::End { status, at, .. } => {
                self.status = *status;
                self.ended_at = Some(at.clone());
            }
        }
    }

    /// A run as a start record describes it (`None` for any other transition).
    pub fn from_start(t: &Transition, saga: &Saga) -> Option<RunState> {
        match t {
            Transition::Start {
                run,
                input,
                at,
                meta,
                ..
            } => Some(saga.fresh(run, input, at, meta)),
            _ => None,
        }
    }
}

/// One change of a run, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Transition {
    /// A run begins.
    Start {
        /// Run id.
        run: String,
        /// Saga name.
        saga: String,
        /// The request.
        input: Value,
        /// When.
        at: String,
        /// Opaque data kept with the run.
        #[serde(default, skip_serializing_if = "Value::is_null")]
        meta: Value,
    },
    /// An attempt of step `step` is about to be sent.
    StepStarted {
        /// Run id.
        run: String,
        /// Step index.
        step: usize,
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// Step `step` completed.
    StepDone {
        /// Run id.
        run: String,
        /// Step index.
        step: usize,
        /// Its output.
        output: Value,
    },
    /// Step `step` failed for good.
    StepFailed {
        /// Run id.
        run: String,
        /// Step index.
        step: usize,
        /// Why.
        error: ErrorBody,
    },
    /// An attempt of step `step`'s compensation is about to be sent.
    CompensationStarted {
        /// Run id.
        run: String,
        /// Step index.
        step: usize,
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// Step `step` was undone.
    CompensationDone {
        /// Run id.
        run: String,
        /// Step index.
        step: usize,
    },
    /// Step `step`'s compensation failed for good.
    CompensationFailed {
        /// Run id.
        run: String,
        /// Step index.
        step: usize,
        /// Why.
        error: ErrorBody,
    },
    /// The run is over.
    End {
        /// Run id.
        run: String,
        /// How it ended.
        status: RunStatus,
        /// When.
        at: String,
    },
}

impl Transition {
    /// The run it belongs to.
    pub fn run(&self) -> &str {
        match self {
            Transition::Start { run, .. }
            | Transition::StepStarted { run, .. }
            | Transition::StepDone { run, .. }
            | Transition::StepFailed { run, .. }
            | Transition::CompensationStarted { run, .. }
            | Transition::CompensationDone { run, .. }
            | Transition::CompensationFailed { run, .. }
            | Transition::End { run, .. } => run,
        }
    }
}

/// Where transitions are made durable before a run acts on them.
pub trait Journal: Send + Sync {
    /// Records `t` (durably, for a journal that claims durability) before returning.
    fn record(&self, t: &Transition) -> std::io::Result<()>;
}

/// Called with the run's state after every transition (progress records, metrics).
pub type Observer = Arc<dyn Fn(&RunState) + Send + Sync>;

/// A saga: named steps in order.
#[derive(Debug, Clone)]
pub struct Saga {
    /// Its name.
    pub name: String,
    /// Its steps.
    pub steps: Vec<Step>,
}

/// Why a run could not go on (the journal failed): the run stops where it is, to be resumed.
#[derive(Debug, thiserror::Error)]
#[error("saga journal: {0}")]
pub struct JournalError(#[from] std::io::Error);

impl Saga {
    /// A saga with no steps yet.
    pub fn new(name: impl Into<String>) -> Saga {
        Saga {
            name: name.into(),
            steps: Vec::new(),
        }
    }

    /// Adds a step.
    pub fn step(mut self, step: Step) -> Saga {
        self.steps.push(step);
        self
    }

    /// A new run id: time-ordered, unique.
    pub fn new_run_id() -> String {
        format!(
            "{:x}-{:06x}",
            crate::wire::now_ms(),
            random_u64() & 0xff_ffff
        )
    }

    /// A run that has not started a step yet.
    fn fresh(&self, run_id: &str, input: &Value, at: &str, meta: &Value) -> RunState {
        RunState {
            run_id: run_id.to_owned(),
            saga: self.name.clone(),
            status: RunStatus::Running,
            input: input.clone(),
            steps: self
                .steps
                .iter()
                .map(|s| StepState {
                    name: s.name.clone(),
                    state: StepStatus::Pending,
                    attempts: 0,
                    compensation_attempts: 0,
                    output: None,
                    error: None,
                })
                .collect(),
            error: None,
            started_at: at.to_owned(),
            ended_at: None,
            meta: meta.clone(),
        }
    }

    /// Runs the saga on `input` to its end, without a journal.
    pub async fn run(&self, bus: &Bus, input: Value, observer: Option<Observer>) -> RunState {
        let state = self.fresh(&Saga::new_run_id(), &input, &timestamp(), &Value::Null);
        // Only a journal can fail, and there is none.
        self.resume(bus, state.clone(), None, observer)
            .await
            .unwrap_or(state)
    }

    /// The transition that starts a run.
    pub fn start_transition(&self, run_id: String, input: Value, meta: Value) -> Transition {
        Transition::Start {
            run: run_id,
            saga: self.name.clone(),
            input,
            at: timestamp(),
            meta,
        }
    }

    /// Runs from `start` (journaled first), to the end.
    pub async fn execute(
        &self,
        bus: &Bus,
        start: &Transition,
        journal: Option<&dyn Journal>,
        observer: Option<Observer>,
    ) -> Result<RunState, JournalError> {
        let Some(state) = RunState::from_start(start, self) else {
            return Err(JournalError(std::io::Error::other(
                "not a start transition",
            )));
        };
        if let Some(j) = journal {
            j.record(start)?;
        }
        self.resume(bus, state, journal, observer).await
    }

    /// Goes on with a run from `state` (rebuilt from a journal after a crash, or fresh) to its
    /// end. A step or compensation that was sent and not answered is sent again with the same
    /// idempotency key.
    pub async fn resume(
        &self,
        bus: &Bus,
        mut state: RunState,
        journal: Option<&dyn Journal>,
        observer: Option<Observer>,
    ) -> Result<RunState, JournalError> {
        let commit = |state: &mut RunState, t: Transition| -> Result<(), JournalError> {
            if let Some(j) = journal {
                j.record(&t)?;
            }
            state.apply(&t);
            if let Some(o) = &observer {
                o(state);
            }
            Ok(())
        };
        if let Some(o) = &observer {
            o(&state);
        }
        let run = state.run_id.clone();
        // Forward.
        while state.status == RunStatus::Running {
            let Some(i) = state
                .steps
                .iter()
                .position(|s| s.state != StepStatus::Completed)
            else {
                let end = Transition::End {
                    run: run.clone(),
                    status: RunStatus::Completed,
                    at: timestamp(),
                };
                commit(&mut state, end)?;
                return Ok(state);
            };
            let step = &self.steps[i];
            let ctx = state.context();
            let input = render_opt(step.input.as_ref(), &ctx, &state.input);
            let mut attempt = state.steps[i].attempts.max(1);
            if state.steps[i].state == StepStatus::Pending {
                attempt = 1;
            }
            let outcome = loop {
                commit(
                    &mut state,
                    Transition::StepStarted {
                        run: run.clone(),
                        step: i,
                        attempt,
                    },
                )?;
                let key = format!("{run}/{}", step.name);
                match perform(bus, &step.action, &input, &ctx, &key, step.timeout).await {
                    Ok(out) => break Ok(out),
                    Err(e)
                        if attempt < step.retry.max_attempts
                            && step.retry.retries_code(&e.code) =>
                    {
                        tracing::debug!(%run, step = %step.name, attempt, error = %e, "step failed; retrying");
                        tokio::time::sleep(step.retry.delay(attempt)).await;
                        attempt += 1;
                    }
                    Err(e) => break Err(e),
                }
            };
            match outcome {
                Ok(output) => commit(
                    &mut state,
                    Transition::StepDone {
                        run: run.clone(),
                        step: i,
                        output,
                    },
                )?,
                Err(error) => {
                    tracing::info!(%run, saga = %self.name, step = %step.name, %error, "step failed; compensating");
                    commit(
                        &mut state,
                        Transition::StepFailed {
                            run: run.clone(),
                            step: i,
                            error,
                        },
                    )?
                }
            }
        }
        // Backward: the last step completed (or being undone) first.
        let mut failed = state
            .steps
            .iter()
            .any(|s| s.state == StepStatus::CompensationFailed);
        while state.status == RunStatus::Compensating {
            let Some(i) = state
                .steps
                .iter()
                .rposition(|s| matches!(s.state, StepStatus::Completed | StepStatus::Compensating))
            else {
                let status = if failed {
                    RunStatus::Failed
                } else {
                    RunStatus::Compensated
                };
                let end = Transition::End {
                    run: run.clone(),
                    status,
                    at: timestamp(),
                };
                commit(&mut state, end)?;
                return Ok(state);
            };
            let step = &self.steps[i];
            let Some(action) = &step.compensate else {
                // Nothing to undo: done at once.
                commit(
                    &mut state,
                    Transition::CompensationDone {
                        run: run.clone(),
                        step: i,
                    },
                )?;
                continue;
            };
            let ctx = state.context();
            let forward = render_opt(step.input.as_ref(), &ctx, &state.input);
            let input = match &step.compensate_input {
                Some(t) => render(t, &ctx),
                None => forward,
            };
            let mut attempt = state.steps[i].compensation_attempts.max(1);
            if state.steps[i].state == StepStatus::Completed {
                attempt = 1;
            }
            let outcome = loop {
                commit(
                    &mut state,
                    Transition::CompensationStarted {
                        run: run.clone(),
                        step: i,
                        attempt,
                    },
                )?;
                let key = format!("{run}/{}/compensate", step.name);
                match perform(bus, action, &input, &ctx, &key, step.timeout).await {
                    Ok(_) => break Ok(()),
                    Err(e)
                        if attempt < step.retry.max_attempts
                            && step.retry.retries_code(&e.code) =>
                    {
                        tokio::time::sleep(step.retry.delay(attempt)).await;
                        attempt += 1;
                    }
                    Err(e) => break Err(e),
                }
            };
            match outcome {
                Ok(()) => commit(
                    &mut state,
                    Transition::CompensationDone {
                        run: run.clone(),
                        step: i,
                    },
                )?,
                Err(error) => {
                    tracing::warn!(%run, saga = %self.name, step = %step.name, %error, "compensation failed");
                    failed = true;
                    commit(
                        &mut state,
                        Transition::CompensationFailed {
                            run: run.clone(),
                            step: i,
                            error,
                        },
                    )?
                }
            }
        }
        Ok(state)
    }
}

/// One attempt of an action.
async fn perform(
    bus: &Bus,
    action: &Action,
    input: &Value,
    ctx: &Value,
    key: &str,
    timeout: Duration,
) -> Result<Value, ErrorBody> {
    match action {
        Action::Call(topic) => {
            let payload = serde_json::to_vec(input)
                .map_err(|e| ErrorBody::internal(format!("step input: {e}")))?;
            let opts = RequestOptions {
                timeout,
                qos: 1,
                user_properties: vec![("idempotency_key".into(), key.to_owned())],
                // The step's own retry policy applies, not the endpoint's.
                policy: false,
            };
            match bus.request_raw(topic, Bytes::from(payload), &opts).await {
                Ok(reply) => Ok(reply.data.unwrap_or(Value::Null)),
                Err(e) => Err(e.to_body()),
            }
        }
        Action::Local(f) => {
            match tokio::time::timeout(timeout, f(input.clone(), ctx.clone())).await {
                Ok(r) => r,
                Err(_) => Err(ErrorBody::new(
                    code::TIMEOUT,
                    format!("step did not finish within {timeout:?}"),
                )),
            }
        }
    }
}

fn render_opt(template: Option<&Value>, ctx: &Value, request: &Value) -> Value {
    match template {
        Some(t) => render(t, ctx),
        None => request.clone(),
    }
}

/// Fills a template from `ctx`: a string that is exactly `${path}` becomes the value at `path`
/// (any JSON type; `null` when absent); `${path}` inside a longer string is replaced by the
/// value's text. Paths are dot-separated (`request.order`, `steps.reserve.id`, `steps.list.0`).
pub fn render(template: &Value, ctx: &Value) -> Value {
    match template {
        Value::String(s) => {
            if let Some(path) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
                if !path.contains("${") {
                    return lookup(ctx, path).cloned().unwrap_or(Value::Null);
                }
            }
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(at) = rest.find("${") {
                out.push_str(&rest[..at]);
                let after = &rest[at + 2..];
                match after.find('}') {
                    Some(end) => {
                        match lookup(ctx, &after[..end]) {
                            Some(Value::String(v)) => out.push_str(v),
                            Some(Value::Null) | None => {}
                            Some(v) => out.push_str(&v.to_string()),
                        }
                        rest = &after[end + 1..];
                    }
                    None => {
                        out.push_str(&rest[at..]);
                        rest = "";
                    }
                }
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| render(v, ctx)).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), render(v, ctx))).collect())
        }
        other => other.clone(),
    }
}

/// The paths a template refers to (for validation).
pub fn template_paths(template: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => {
                let mut rest = s.as_str();
                while let Some(at) = rest.find("${") {
                    let after = &rest[at + 2..];
                    let Some(end) = after.find('}') else { break };
                    out.push(after[..end].to_owned());
                    rest = &after[end + 1..];
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            Value::Object(o) => o.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(template, &mut out);
    out
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.trim().split('.').try_fold(v, |v, key| match v {
        Value::Object(o) => o.get(key),
        Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// An append-only journal file: one JSON transition per line, `fdatasync` after each, and
/// compacted (finished runs dropped, by a write to a new file and a rename) once it passes
/// `max_bytes`, so it stays small on flash.
#[derive(Debug)]
pub struct FileJournal {
    path: PathBuf,
    max_bytes: u64,
    inner: Mutex<JournalFile>,
}

#[derive(Debug)]
struct JournalFile {
    file: std::fs::File,
    bytes: u64,
    written: u64,
    /// Transitions of runs not yet ended, by run, in order.
    open: std::collections::BTreeMap<String, Vec<String>>,
}

impl FileJournal {
    /// Opens (or creates) the journal at `path` and returns it with the transitions of every
    /// run that has not ended, grouped by run in the order they were written. A torn last line
    /// (a crash mid-write) is dropped.
    pub fn open(
        path: impl AsRef<Path>,
        max_bytes: u64,
    ) -> std::io::Result<(FileJournal, Vec<Vec<Transition>>)> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut open: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let mut order: Vec<String> = Vec::new();
        // Whether the file holds anything to drop (finished runs, a torn line).
        let mut stale = false;
        if let Ok(f) = std::fs::File::open(&path) {
            for line in std::io::BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                let Ok(t) = serde_json::from_str::<Transition>(&line) else {
                    tracing::warn!(path = %path.display(), "saga journal: a torn or unreadable line dropped");
                    stale = true;
                    continue;
                };
                let run = t.run().to_owned();
                if matches!(t, Transition::End { .. }) {
                    open.remove(&run);
                    stale = true;
                    continue;
                }
                if !open.contains_key(&run) {
                    order.push(run.clone());
                }
                open.entry(run).or_default().push(line);
            }
        }
        let pending: Vec<Vec<Transition>> = order
            .iter()
            .filter_map(|r| open.get(r))
            .map(|lines| {
                lines
                    .iter()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect()
            })
            .collect();
        // Rewritten (a flash write) only when something is to be dropped.
        let file = if stale || !path.exists() {
            write_compacted(&path, &open)?
        } else {
            std::fs::OpenOptions::new().append(true).open(&path)?
        };
        let bytes = file.metadata()?.len();
        let j = FileJournal {
            path,
            max_bytes: max_bytes.max(4096),
            inner: Mutex::new(JournalFile {
                file,
                bytes,
                written: 0,
                open,
            }),
        };
        Ok((j, pending))
    }

    /// Bytes written since the journal was opened (compactions included).
    pub fn bytes_written(&self) -> u64 {
        self.lock().written
    }

    /// The current size of the file.
    pub fn size(&self) -> u64 {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JournalFile> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn write_compacted(
    path: &Path,
    open: &std::collections::BTreeMap<String, Vec<String>>,
) -> std::io::Result<std::fs::File> {
    let tmp = path.with_extension("compact");
    {
        let mut f = std::fs::File::create(&tmp)?;
        let mut buf = Vec::new();
        for line in open.values().flatten() {
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
        }
        f.write_all(&buf)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    std::fs::OpenOptions::new().append(true).open(path)
}

impl Journal for FileJournal {
    fn record(&self, t: &Transition) -> std::io::Result<()> {
        let line = serde_json::to_string(t).map_err(std::io::Error::other)?;
        let mut j = self.lock();
        let mut buf = line.clone().into_bytes();
        buf.push(b'\n');
        j.file.write_all(&buf)?;
        j.file.sync_data()?;
        j.bytes += buf.len() as u64;
        j.written += buf.len() as u64;
        let run = t.run().to_owned();
        if matches!(t, Transition::End { .. }) {
            j.open.remove(&run);
        } else {
            j.open.entry(run).or_default().push(line);
        }
        if j.bytes > self.max_bytes {
            let file = write_compacted(&self.path, &j.open)?;
            j.bytes = file.metadata()?.len();
            j.written += j.bytes;
            j.file = file;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_whole_values_and_text() {
        let ctx =
            json!({"request": {"order": "A1", "qty": 2}, "steps": {"r": {"id": 7}}, "run_id": "x"});
        let t = json!({"key": "${request.order}/reserved", "n": "${request.qty}", "id": "${steps.r.id}", "missing": "${steps.none}", "run": "${run_id}"});
        assert_eq!(
            render(&t, &ctx),
            json!({"key": "A1/reserved", "n": 2, "id": 7, "missing": null, "run": "x"})
        );
        assert_eq!(template_paths(&t).len(), 5, "{:?}", template_paths(&t));
    }

    #[test]
    fn retry_delays_grow_and_stop_at_the_cap() {
        let p = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::retries(5)
        };
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(9), Duration::from_secs(2));
        assert!(p.retries_code("TIMEOUT"));
        assert!(!p.retries_code("BAD_REQUEST"));
    }

    #[test]
    fn the_journal_keeps_open_runs_across_reopen_and_compacts() {
        let dir = std::env::temp_dir().join(format!("edgebus-journal-{}", random_u64()));
        let path = dir.join("sagas.log");
        let saga = Saga::new("s").step(Step::call("a", "t/a/request"));
        {
            let (j, pending) = FileJournal::open(&path, 4096).expect("open");
            assert!(pending.is_empty());
            for n in 0..100 {
                let run = format!("r{n}");
                j.record(&saga.start_transition(run.clone(), json!({"n": n}), Value::Null))
                    .expect("start");
                j.record(&Transition::StepStarted {
                    run: run.clone(),
                    step: 0,
                    attempt: 1,
                })
                .expect("step");
                if n != 42 {
                    j.record(&Transition::End {
                        run,
                        status: RunStatus::Completed,
                        at: timestamp(),
                    })
                    .expect("end");
                }
            }
            assert!(j.size() <= 4096 + 512, "compacted: {}", j.size());
        }
        // A torn line at the end, as after a crash mid-write.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("append");
        f.write_all(b"{\"t\":\"step_do").expect("torn");
        drop(f);
        let (_, pending) = FileJournal::open(&path, 4096).expect("reopen");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].len(), 2);
        let mut state = RunState::from_start(&pending[0][0], &saga).expect("start");
        state.apply(&pending[0][1]);
        assert_eq!(state.run_id, "r42");
        assert_eq!(state.steps[0].state, StepStatus::Running);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
