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
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::bus::{random_u64, Bus};
use crate::wire::{timestamp, ErrorBody};

mod journal;
mod run;
mod state;
mod template;

pub use crate::policy::RetryPolicy;
pub use journal::{FileJournal, Journal, JournalError};
pub use state::{Next, RunState, RunStatus, StepState, StepStatus, Transition};
pub use template::{render, template_paths};

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
    pub(crate) fn fresh(&self, run_id: &str, input: &Value, at: &str, meta: &Value) -> RunState {
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
}

impl RunState {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusOptions;
    use crate::wire::code;
    use serde_json::json;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    /// A journal in memory: what was recorded, in order.
    #[derive(Default)]
    struct Log(Mutex<Vec<Transition>>);

    impl Journal for Log {
        fn record(&self, t: &Transition) -> std::io::Result<()> {
            self.0.lock().unwrap().push(t.clone());
            Ok(())
        }
    }

    impl Log {
        fn started(&self) -> Vec<(usize, u32, bool)> {
            let log = self.0.lock().unwrap();
            log.iter()
                .filter_map(|t| match t {
                    Transition::StepStarted { step, attempt, .. } => Some((*step, *attempt, false)),
                    Transition::CompensationStarted { step, attempt, .. } => {
                        Some((*step, *attempt, true))
                    }
                    _ => None,
                })
                .collect()
        }
    }

    /// A bus that never connects: the steps here are local.
    fn offline_bus() -> Bus {
        Bus::connect(BusOptions::new("127.0.0.1:9", "saga-test")).expect("bus")
    }

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(2),
            jitter: 0.0,
            ..RetryPolicy::default()
        }
    }

    /// A local step that fails with `code` its first `failures` times, then succeeds.
    fn flaky(name: &str, failures: u32, code: &'static str, calls: Arc<AtomicU32>) -> Step {
        Step::local(name, move |_, _| {
            let calls = calls.clone();
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n < failures {
                    Err(ErrorBody::new(code, "not now"))
                } else {
                    Ok(json!({"n": n}))
                }
            }
        })
    }

    /// A compensation that writes its step's name to `undone` (or fails with `fails`).
    fn undo(step: Step, undone: Arc<Mutex<Vec<String>>>, fails: bool) -> Step {
        let name = step.name.clone();
        step.compensate_local(move |_, _| {
            let (undone, name) = (undone.clone(), name.clone());
            async move {
                if fails {
                    return Err(ErrorBody::new(code::BAD_REQUEST, "cannot undo"));
                }
                undone.lock().unwrap().push(name);
                Ok(Value::Null)
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_is_retried_after_its_policy_delays() {
        let bus = offline_bus();
        let calls = Arc::new(AtomicU32::new(0));
        let saga =
            Saga::new("s").step(flaky("a", 2, code::TIMEOUT, calls.clone()).retry(policy(3)));
        let log = Log::default();
        let start = saga.start_transition("r1".into(), json!({}), Value::Null);
        let t0 = tokio::time::Instant::now();
        let end = saga.execute(&bus, &start, Some(&log), None).await.unwrap();
        let waited = t0.elapsed();
        assert_eq!(end.status, RunStatus::Completed);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(log.started(), [(0, 1, false), (0, 2, false), (0, 3, false)]);
        // 100 ms after the first failure, 200 ms after the second, nothing more.
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_millis(305),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_the_policy_does_not_retry_fails_at_once_and_compensates_in_reverse() {
        let bus = offline_bus();
        let undone = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicU32::new(0));
        let saga = Saga::new("s")
            .step(undo(
                flaky("a", 0, code::TIMEOUT, calls.clone()),
                undone.clone(),
                false,
            ))
            .step(undo(
                flaky("b", 0, code::TIMEOUT, calls.clone()),
                undone.clone(),
                false,
            ))
            .step(flaky("c", 9, code::BAD_REQUEST, calls.clone()).retry(policy(5)));
        let log = Log::default();
        let start = saga.start_transition("r2".into(), json!({}), Value::Null);
        let t0 = tokio::time::Instant::now();
        let end = saga.execute(&bus, &start, Some(&log), None).await.unwrap();
        assert_eq!(end.status, RunStatus::Compensated);
        assert_eq!(t0.elapsed(), Duration::ZERO, "no retry delay");
        assert_eq!(*undone.lock().unwrap(), ["b", "a"]);
        assert_eq!(
            log.started(),
            [
                (0, 1, false),
                (1, 1, false),
                (2, 1, false),
                (1, 1, true),
                (0, 1, true)
            ]
        );
        assert_eq!(
            end.error.map(|e| e.code),
            Some(code::BAD_REQUEST.to_owned())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_compensation_that_fails_ends_the_run_failed_after_the_others() {
        let bus = offline_bus();
        let undone = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicU32::new(0));
        let saga = Saga::new("s")
            .step(undo(
                flaky("a", 0, code::TIMEOUT, calls.clone()),
                undone.clone(),
                false,
            ))
            .step(undo(
                flaky("b", 0, code::TIMEOUT, calls.clone()),
                undone.clone(),
                true,
            ))
            .step(flaky("c", 9, code::BAD_REQUEST, calls.clone()));
        let end = saga.run(&bus, json!({}), None).await;
        assert_eq!(end.status, RunStatus::Failed);
        assert_eq!(*undone.lock().unwrap(), ["a"], "a is still undone");
        assert_eq!(end.steps[1].state, StepStatus::CompensationFailed);
    }

    #[test]
    fn next_follows_the_journal() {
        let saga = Saga::new("s")
            .step(Step::call("a", "t/a/request"))
            .step(Step::call("b", "t/b/request"));
        let start = saga.start_transition("r".into(), json!({}), Value::Null);
        let mut st = RunState::from_start(&start, &saga).unwrap();
        assert_eq!(
            st.next(),
            Next::Step {
                step: 0,
                attempt: 1
            }
        );
        let run = || "r".to_owned();
        st.apply(&Transition::StepStarted {
            run: run(),
            step: 0,
            attempt: 1,
        });
        st.apply(&Transition::StepDone {
            run: run(),
            step: 0,
            output: json!(1),
        });
        st.apply(&Transition::StepStarted {
            run: run(),
            step: 1,
            attempt: 2,
        });
        // Cut off here (a crash): the step is sent again under the same attempt.
        assert_eq!(
            st.next(),
            Next::Step {
                step: 1,
                attempt: 2
            }
        );
        st.apply(&Transition::StepFailed {
            run: run(),
            step: 1,
            error: ErrorBody::new(code::TIMEOUT, "x"),
        });
        assert_eq!(
            st.next(),
            Next::Compensate {
                step: 0,
                attempt: 1
            }
        );
        st.apply(&Transition::CompensationStarted {
            run: run(),
            step: 0,
            attempt: 3,
        });
        assert_eq!(
            st.next(),
            Next::Compensate {
                step: 0,
                attempt: 3
            }
        );
        st.apply(&Transition::CompensationDone {
            run: run(),
            step: 0,
        });
        assert_eq!(st.next(), Next::End(RunStatus::Compensated));
        st.apply(&Transition::End {
            run: run(),
            status: RunStatus::Compensated,
            at: timestamp(),
        });
        assert_eq!(st.next(), Next::Ended);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_run_goes_on_from_the_started_step() {
        let bus = offline_bus();
        let calls = Arc::new(AtomicU32::new(0));
        let saga = Saga::new("s")
            .step(flaky("a", 0, code::TIMEOUT, calls.clone()))
            .step(flaky("b", 0, code::TIMEOUT, calls.clone()));
        let start = saga.start_transition("r".into(), json!({}), Value::Null);
        let mut st = RunState::from_start(&start, &saga).unwrap();
        st.apply(&Transition::StepStarted {
            run: "r".into(),
            step: 0,
            attempt: 1,
        });
        st.apply(&Transition::StepDone {
            run: "r".into(),
            step: 0,
            output: json!({"done": true}),
        });
        st.apply(&Transition::StepStarted {
            run: "r".into(),
            step: 1,
            attempt: 1,
        });
        let log = Log::default();
        let end = saga.resume(&bus, st, Some(&log), None).await.unwrap();
        assert_eq!(end.status, RunStatus::Completed);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a is not run again");
        assert_eq!(log.started(), [(1, 1, false)]);
    }

    #[test]
    fn retry_delays_grow_and_stop_at_the_cap() {
        let p = policy(5);
        assert_eq!(
            p.retry_after(1, code::TIMEOUT),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            p.retry_after(2, code::TIMEOUT),
            Some(Duration::from_millis(200))
        );
        assert_eq!(p.delay(9), Duration::from_secs(2));
        assert_eq!(p.retry_after(5, code::TIMEOUT), None, "attempts used up");
        assert_eq!(p.retry_after(1, code::BAD_REQUEST), None, "not retried");
    }
}
