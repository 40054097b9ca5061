//! A run's state, and the transitions that alone move it: what a journal records and a
//! restart replays. [`RunState::next`] decides what the run does next from its state alone.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::wire::ErrorBody;

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

    /// What the run does next, decided from its state alone: forward, the first step not
    /// completed; backward, the last step completed or being undone. A step that was started
    /// and not finished (a crash) is attempted again under the same attempt number.
    pub fn next(&self) -> Next {
        match self.status {
            RunStatus::Running => {
                let Some(step) = self
                    .steps
                    .iter()
                    .position(|s| s.state != StepStatus::Completed)
                else {
                    return Next::End(RunStatus::Completed);
                };
                let s = &self.steps[step];
                let attempt = if s.state == StepStatus::Pending {
                    1
                } else {
                    s.attempts.max(1)
                };
                Next::Step { step, attempt }
            }
            RunStatus::Compensating => {
                let Some(step) = self.steps.iter().rposition(|s| {
                    matches!(s.state, StepStatus::Completed | StepStatus::Compensating)
                }) else {
                    let failed = self
                        .steps
                        .iter()
                        .any(|s| s.state == StepStatus::CompensationFailed);
                    return Next::End(if failed {
                        RunStatus::Failed
                    } else {
                        RunStatus::Compensated
                    });
                };
                let s = &self.steps[step];
                let attempt = if s.state == StepStatus::Completed {
                    1
                } else {
                    s.compensation_attempts.max(1)
                };
                Next::Compensate { step, attempt }
            }
            _ => Next::Ended,
        }
    }
}

/// What a run does next ([`RunState::next`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run step `step`; this is attempt `attempt`.
    Step {
        /// The step's index.
        step: usize,
        /// The attempt, from 1.
        attempt: u32,
    },
    /// Undo step `step`; this is attempt `attempt` of its compensation.
    Compensate {
        /// The step's index.
        step: usize,
        /// The attempt, from 1.
        attempt: u32,
    },
    /// Record the end of the run with this status.
    End(RunStatus),
    /// The run has ended already.
    Ended,
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
