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
use std::sync::Arc;
use std::time::Duration;

use edgebus_runtime::bus::{Bus, Message, PublishOptions};
use edgebus_runtime::contract::ServiceSpec;
use edgebus_runtime::saga::{
    FileJournal, Journal, Observer, RunState, RunStatus, Saga, StepStatus, Transition,
};
use edgebus_runtime::service::{ReplyAddress, Service, StartError};
use edgebus_runtime::tree::Tree;
use edgebus_runtime::wire::{code, decode_request, ErrorBody};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

mod config;

pub use config::{build, validate, OrchestratorConfig, SagaConfig, StepConfig};

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
