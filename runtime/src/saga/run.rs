//! The executor: a run driven from its state to its end, one journaled transition at a
//! time, each step and compensation retried as its policy says.

use bytes::Bytes;
use serde_json::Value;
use std::time::Duration;

use super::journal::{Journal, JournalError};
use super::state::{Next, RunState, Transition};
use super::template::render;
use super::{Action, Observer, Saga};
use crate::bus::Bus;
use crate::request::RequestOptions;
use crate::wire::{code, timestamp, ErrorBody};

impl Saga {
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
        loop {
            match state.next() {
                Next::Ended => return Ok(state),
                Next::End(status) => {
                    let end = Transition::End {
                        run: run.clone(),
                        status,
                        at: timestamp(),
                    };
                    commit(&mut state, end)?;
                    return Ok(state);
                }
                Next::Step { step: i, attempt } => {
                    let step = &self.steps[i];
                    let ctx = state.context();
                    let input = render_opt(step.input.as_ref(), &ctx, &state.input);
                    let key = format!("{run}/{}", step.name);
                    let mut attempt = attempt;
                    let outcome = loop {
                        let started = Transition::StepStarted {
                            run: run.clone(),
                            step: i,
                            attempt,
                        };
                        commit(&mut state, started)?;
                        match perform(bus, &step.action, &input, &ctx, &key, step.timeout).await {
                            Ok(out) => break Ok(out),
                            Err(e) => match step.retry.retry_after(attempt, &e.code) {
                                Some(delay) => {
                                    tracing::debug!(%run, step = %step.name, attempt, error = %e, "step failed; retrying");
                                    tokio::time::sleep(delay).await;
                                    attempt += 1;
                                }
                                None => break Err(e),
                            },
                        }
                    };
                    let t = match outcome {
                        Ok(output) => Transition::StepDone {
                            run: run.clone(),
                            step: i,
                            output,
                        },
                        Err(error) => {
                            tracing::info!(%run, saga = %self.name, step = %step.name, %error, "step failed; compensating");
                            Transition::StepFailed {
                                run: run.clone(),
                                step: i,
                                error,
                            }
                        }
                    };
                    commit(&mut state, t)?;
                }
                Next::Compensate { step: i, attempt } => {
                    let step = &self.steps[i];
                    let Some(action) = &step.compensate else {
                        // Nothing to undo: done at once.
                        let done = Transition::CompensationDone {
                            run: run.clone(),
                            step: i,
                        };
                        commit(&mut state, done)?;
                        continue;
                    };
                    let ctx = state.context();
                    let forward = render_opt(step.input.as_ref(), &ctx, &state.input);
                    let input = match &step.compensate_input {
                        Some(t) => render(t, &ctx),
                        None => forward,
                    };
                    let key = format!("{run}/{}/compensate", step.name);
                    let mut attempt = attempt;
                    let outcome = loop {
                        let started = Transition::CompensationStarted {
                            run: run.clone(),
                            step: i,
                            attempt,
                        };
                        commit(&mut state, started)?;
                        match perform(bus, action, &input, &ctx, &key, step.timeout).await {
                            Ok(_) => break Ok(()),
                            Err(e) => match step.retry.retry_after(attempt, &e.code) {
                                Some(delay) => {
                                    tokio::time::sleep(delay).await;
                                    attempt += 1;
                                }
                                None => break Err(e),
                            },
                        }
                    };
                    let t = match outcome {
                        Ok(()) => Transition::CompensationDone {
                            run: run.clone(),
                            step: i,
                        },
                        Err(error) => {
                            tracing::warn!(%run, saga = %self.name, step = %step.name, %error, "compensation failed");
                            Transition::CompensationFailed {
                                run: run.clone(),
                                step: i,
                                error,
                            }
                        }
                    };
                    commit(&mut state, t)?;
                }
            }
        }
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
