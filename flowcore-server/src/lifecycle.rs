//! A run's life in the server, in one place: start (admit, store, hand to a slot here or to the
//! queue), wait for its end and answer, cancel, execute (durably, through
//! `flowcore::durable`), fail, announce its end to every process, and recover the runs whose
//! worker died. Routes, webhooks, schedules and the worker loop call these functions; they
//! answer with domain results ([`RunAnswer`], [`RunError`]), which the routes turn into HTTP.
//!
//! The statuses a run moves through, and by which move, are the table of
//! [`flowcore::RunStatus::move_to`]; every move below goes through the run store, which applies
//! that table.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flowcore::durable::{self, Checkpoint, DurableOptions, Hooks, resolve};
use flowcore::ports::{
    ActionKind, Actor, ConcurrencyKey, Due, FinishWatch, NewJob, NewRun, RunAction, RunEnd,
    RunFilter, RunOutcome, RunRecord, Signal,
};
use flowcore::rerun::{RerunFrom, carried_maps, changed_nodes, kept_steps};
use flowcore::{CancellationToken, ItemBatch, ItemProgress, Plan, RunId, RunStatus, StoreError};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;

use crate::admission::{Overloaded, Refused};
use crate::config::Role;
use crate::running::Slot;
use crate::state::{AppState, Shared};

/// Why a run could not be started or changed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A store failed (or the run or flow does not exist).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The flow could not be read or compiled.
    #[error(transparent)]
    Flow(#[from] flowcore::Error),
    /// The flow used its runs or LLM tokens of today (`FLOWCORE_QUOTA_RUNS_PER_DAY`,
    /// `FLOWCORE_QUOTA_TOKENS_PER_DAY`).
    #[error("flow `{flow_id}` has used its {quota} {what} of today ({setting})")]
    QuotaExceeded {
        /// The flow.
        flow_id: String,
        /// Its runs or tokens a day.
        quota: u64,
        /// `runs` or `LLM tokens`.
        what: &'static str,
        /// The setting.
        setting: &'static str,
    },
    /// Too many runs wait already.
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    /// The run is over: nothing to cancel, no signal to take.
    #[error("the run is {0}")]
    AlreadyFinished(RunStatus),
    /// The run has as many signals pending as it may.
    #[error("{0}")]
    TooManySignals(String),
    /// A signal's payload is larger than [`MAX_SIGNAL_BYTES`].
    #[error("a signal's payload is {0} bytes of JSON, more than {MAX_SIGNAL_BYTES}")]
    SignalTooLarge(usize),
    /// A rerun of a run that has not ended.
    #[error("the run is {0}: only a finished run can be rerun")]
    NotFinished(RunStatus),
    /// A rerun of a run whose data retention removed.
    #[error("run `{0}` had its data removed by retention; it cannot be rerun")]
    Pruned(RunId),
    /// A rerun that cannot start where it was asked to.
    #[error("{0}")]
    CannotRerun(String),
    /// The run's concurrency key or priority could not be rendered from its input.
    #[error("{0}")]
    Placement(String),
}

/// The largest payload a signal may carry, as JSON: a run holds up to 100 pending, and a keyed
/// signal is stored once for each run it reaches.
pub const MAX_SIGNAL_BYTES: usize = 256 * 1024;

/// `payload`'s size, refused past [`MAX_SIGNAL_BYTES`].
fn check_signal(payload: &Value) -> Result<(), RunError> {
    let size = serde_json::to_vec(payload).map_or(usize::MAX, |v| v.len());
    if size > MAX_SIGNAL_BYTES {
        return Err(RunError::SignalTooLarge(size));
    }
    Ok(())
}

impl From<Refused> for RunError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Overloaded(o) => Self::Overloaded(o),
            Refused::Store(e) => Self::Store(e),
        }
    }
}

/// How to start a run of the latest version of a flow.
#[derive(Debug, Clone)]
pub struct Start {
    /// The flow.
    pub flow_id: String,
    /// The run's input.
    pub input: Value,
    /// Whether the caller waits for the end (up to `WEBHOOK_TIMEOUT_SECONDS`).
    pub wait: bool,
    /// The same key (per flow) gives the same run.
    pub idempotency_key: Option<String>,
    /// What started it, as templates see it (`trigger`).
    pub trigger: Option<Value>,
}

/// A run as a caller sees it: its end with the output, or its live status.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunAnswer {
    /// The run's id.
    #[schema(value_type = String)]
    pub run_id: RunId,
    /// `queued`, `running`, `waiting`, `succeeded`, `failed`, `cancelled` or `timed_out`.
    #[schema(value_type = String)]
    pub status: RunStatus,
    /// Its output, once it ended (`null` when it has none); absent while it is live.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// Why it did not succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunAnswer {
    /// Whether the run is over.
    pub fn ended(&self) -> bool {
        self.status.is_final()
    }
}

/// The run's id and status, as a cancel leaves them.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunState {
    /// The run's id.
    #[schema(value_type = String)]
    pub run_id: RunId,
    /// Its status.
    #[schema(value_type = String)]
    pub status: RunStatus,
}

// ---------------------------------------------------------------------------------------------
// Start, wait, answer.

/// Refuses a new run of `flow_id` when the flow used its runs or its LLM tokens of today.
async fn within_quotas(state: &AppState, flow_id: &str) -> Result<(), RunError> {
    let (runs, tokens) = (
        state.config.quota_runs_per_day,
        state.config.quota_tokens_per_day,
    );
    let refused = |quota, what, setting| RunError::QuotaExceeded {
        flow_id: flow_id.to_owned(),
        quota,
        what,
        setting,
    };
    if runs > 0 && state.usage.runs_today(flow_id).await? >= runs {
        return Err(refused(runs, "runs", "FLOWCORE_QUOTA_RUNS_PER_DAY"));
    }
    if tokens > 0 && state.usage.tokens_today(flow_id).await? >= tokens {
        return Err(refused(
            tokens,
            "LLM tokens",
            "FLOWCORE_QUOTA_TOKENS_PER_DAY",
        ));
    }
    Ok(())
}

/// Starts a run of the latest version of `start.flow_id`: admitted (quota, slots, queue bound),
/// stored, then executed here (the `all` role's waited runs, in one of the process's slots) or
/// handed to the queue; answers with its end when the caller waits and it ends in time.
pub async fn start(state: &Shared, start: Start) -> Result<RunAnswer, RunError> {
    let Start {
        flow_id,
        input,
        wait,
        idempotency_key,
        trigger,
    } = start;
    let (version, plan) = state.plans.get(&flow_id, None).await?;
    let (input, concurrency, priority) = place(&plan, input)?;
    within_quotas(state, &flow_id).await?;
    // The `all` role executes a waited run itself: created already claimed (one commit) and
    // run at once; the run is still leased and checkpointed, so a crash loses nothing.
    // ... unless the flow names another worker group: then its workers must run it; or
    // unless it has a concurrency key: then it waits for a slot of its key in the queue.
    let own_group = plan
        .worker_group()
        .is_none_or(|g| g == state.config.worker_group)
        && concurrency.is_none();
    // ... in one of the process's slots, waited for (past the wait it goes to the queue).
    let limit = Duration::from_secs(state.config.webhook_timeout_seconds);
    let until = tokio::time::Instant::now() + limit;
    let permit = if wait && own_group && state.config.role == Role::All {
        state.admission.wait_slot(limit).await?
    } else {
        None
    };
    let group = plan
        .worker_group()
        .unwrap_or(&state.config.worker_group)
        .to_owned();
    if permit.is_none() {
        let key = concurrency.as_ref().map(|c| job_key(&flow_id, c));
        state
            .admission
            .admit_queued(state.stores.queue.as_ref(), &group, key.as_deref())
            .await?;
    }
    let new = NewRun {
        id: RunId::new(),
        flow_id,
        flow_version: version,
        input,
        idempotency_key,
        claim: permit.as_ref().map(|_| durable_options(state).claim()),
        trigger,
        rerun_of: None,
        concurrency,
        priority,
    };
    // In a task of its own: a client that goes away mid-request drops this future, and must
    // not leave a stored run that nobody starts (until the reaper or the orphan sweep finds it
    // a lease later).
    let accepting = tokio::spawn(accept(state.clone(), new, permit, wait, group));
    let accepted = accepting
        .await
        .map_err(|e| StoreError::backend("accepting a run", e))??;
    // What is left of the wait, after any wait for a slot.
    let limit = until.saturating_duration_since(tokio::time::Instant::now());
    let seen = match accepted {
        Accepted::Existing(run) => Seen::of(&run),
        Accepted::Inline(run, task) => match tokio::time::timeout(limit, task).await {
            Ok(Ok(Ok(done))) => Seen::of(&done),
            // Another owner took the run over (this process's lease lapsed): it goes on there,
            // and the caller is answered with the run as stored.
            Ok(Ok(Err(RunError::Store(StoreError::StaleLease(_))))) | Ok(Err(_)) | Err(_) => {
                Seen::of(&state.stores.runs.get(&run.id).await?)
            }
            Ok(Ok(Err(e))) => return Err(e),
        },
        // As accepted: a fast worker may already be done, but the caller asked not to wait.
        Accepted::Queued(run, None) => Seen::of(&run),
        Accepted::Queued(run, Some(watch)) => {
            wait_until_final(state, &run.id, watch, limit).await?
        }
    };
    Ok(answer(state, seen).await?)
}

/// A new run's input, with its place in the queue rendered from it ([`Plan::placement`]); a
/// key or priority that cannot be rendered refuses the run.
fn place(plan: &Plan, input: Value) -> Result<(Value, Option<ConcurrencyKey>, u8), RunError> {
    let input = Arc::new(input);
    let (key, priority) = plan.placement(&input).map_err(RunError::Placement)?;
    Ok((Arc::unwrap_or_clone(input), key, priority))
}

/// The queue's key for a run of `flow_id` with concurrency key `key` (as [`NewJob::of`] makes
/// it).
fn job_key(flow_id: &str, key: &ConcurrencyKey) -> String {
    NewJob::key_of(flow_id, &key.key)
}

/// How many reruns are prepared at once in this process (each reads a run and copies its
/// large outputs); the others wait their turn.
static RERUNS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// How to rerun a finished run ([`rerun`]).
#[derive(Debug, Clone)]
pub struct Rerun {
    /// Where it starts again.
    pub from: RerunFrom,
    /// The flow's latest version, instead of the one the earlier run executed.
    pub latest: bool,
    /// A new input, instead of the earlier run's.
    pub input: Option<Value>,
    /// Who asks.
    pub actor: Option<Actor>,
    /// A priority in the queue instead of the flow's (a bulk replay's reruns go last).
    pub priority: Option<u8>,
}

/// Starts a rerun of the finished run `id` (found in the archive too): a new run of its flow,
/// at its version or the latest, with its input or a new one, that keeps the steps of the
/// earlier run not downstream of where it starts again ([`flowcore::rerun::kept_steps`]); the
/// rest executes. Admitted as a new run is (quota, queue bound), then queued. The rerun is
/// recorded on both runs, by `actor`.
pub async fn rerun(state: &Shared, id: &RunId, rerun: Rerun) -> Result<RunRecord, RunError> {
    // A few at once: each reads the earlier run and copies its large outputs.
    let _turn = RERUNS
        .acquire()
        .await
        .map_err(|e| StoreError::backend("waiting for a rerun's turn", e))?;
    let (runs, blobs) = (&state.stores.runs, &state.stores.blobs);
    let (earlier, steps) = match runs.get(id).await {
        Ok(run) => {
            let steps = runs.steps(id).await?;
            (run, steps)
        }
        Err(StoreError::NotFound { .. }) if state.config.archive => {
            match crate::archive::find(blobs.as_ref(), id).await? {
                Some(found) => (found.run, found.steps),
                None => return Err(StoreError::not_found("run", id.as_str()).into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    if !earlier.status.is_final() {
        return Err(RunError::NotFinished(earlier.status));
    }
    if earlier.data_pruned {
        return Err(RunError::Pruned(id.clone()));
    }
    let version = (!rerun.latest).then_some(earlier.flow_version);
    let (version, plan) = state.plans.get(&earlier.flow_id, version).await?;
    let new_input = rerun.input.is_some();
    let (input, concurrency, priority) = place(&plan, rerun.input.unwrap_or(earlier.input))?;
    let priority = rerun.priority.unwrap_or(priority);
    // Admitted before anything is copied.
    within_quotas(state, &earlier.flow_id).await?;
    let group = plan
        .worker_group()
        .unwrap_or(&state.config.worker_group)
        .to_owned();
    let key = concurrency.as_ref().map(|c| job_key(&earlier.flow_id, c));
    state
        .admission
        .admit_queued(state.stores.queue.as_ref(), &group, key.as_deref())
        .await?;
    // At another version, the nodes defined otherwise start again too.
    let changed = if version == earlier.flow_version {
        Vec::new()
    } else {
        let flows = state.engine.flow_store();
        match flows
            .get(&earlier.flow_id, Some(earlier.flow_version))
            .await
        {
            Ok(before) => {
                let now = flows.get(&earlier.flow_id, Some(version)).await?;
                changed_nodes(&before.definition, &now.definition)
            }
            // The earlier version is gone: nothing of it is known to be the same.
            Err(StoreError::NotFound { .. }) => (0..plan.len())
                .map(|i| plan.node_id(i).to_owned())
                .collect(),
            Err(e) => return Err(e.into()),
        }
    };
    let mut kept = kept_steps(&plan, &steps, &rerun.from, &changed)
        .map_err(|e| RunError::CannotRerun(format!("{e} (version {version})")))?;
    let new_id = RunId::new();
    // The earlier run's blobs go when it is pruned: the rerun's own copies, one at a time.
    let over = durable_options(state).offload_over;
    for step in &mut kept {
        if let Some(output) = &step.output {
            let carried = durable::carry_output(output, blobs, &new_id, &format!("reused/{}", step.node), over)
                .await
                .map_err(|e| match e {
                    StoreError::NotFound { .. } => RunError::CannotRerun(format!(
                        "the output of step `{}` is gone from the blob store: rerun from it or before it",
                        step.node
                    )),
                    e => e.into(),
                })?;
            step.output = Some(Arc::new(carried));
        }
    }
    // A failed map reruns only the items that had not finished (same input, same map).
    let mut items = Vec::new();
    if !new_input {
        for node in carried_maps(&plan, &steps, &kept, &rerun.from, &changed) {
            items.extend(carried_items(state, &earlier.id, &new_id, &node, over).await?);
        }
    }
    let new = NewRun {
        id: new_id,
        rerun_of: Some(earlier.id.clone()),
        trigger: earlier.trigger.clone(),
        concurrency,
        priority,
        ..NewRun::new(earlier.flow_id.clone(), version, input)
    };
    let run = runs.create_rerun(new, kept, items).await?;
    state.usage.run_started(&run.flow_id);
    let from = match &rerun.from {
        RerunFrom::Failed => "failed",
        RerunFrom::Start => "start",
        RerunFrom::Node(node) => node,
    };
    let action =
        |detail| RunAction::now(ActionKind::Rerun, rerun.actor.clone()).with_detail(detail);
    record_actions(
        state,
        &[
            (
                run.id.clone(),
                action(json!({"rerun_of": earlier.id, "from": from, "version": version})),
            ),
            (earlier.id.clone(), action(json!({"rerun": run.id}))),
        ],
    )
    .await;
    if let Err(e) = state.stores.queue.enqueue(&group, NewJob::of(&run)).await {
        // As for a new run: not accepted, and not left queued without a job.
        if let Err(f) = fail(
            state,
            &run.id,
            "the queue was unavailable when the rerun was started".into(),
        )
        .await
        {
            tracing::warn!(run_id = %run.id, error = %f, "could not fail a rerun that was not enqueued");
        }
        return Err(e.into());
    }
    Ok(run)
}

/// How many items of a map a rerun carries in one checkpoint row.
const CARRIED_PER_BATCH: usize = 1000;

/// The finished items of map step `node` of run `earlier`, for its rerun `rerun` (their large
/// outputs copied for it, as kept steps' are), in batches. None when the earlier run's items
/// are gone (an archived run keeps none): the map then reruns whole.
async fn carried_items(
    state: &AppState,
    earlier: &RunId,
    rerun: &RunId,
    node: &str,
    over: usize,
) -> Result<Vec<ItemBatch>, RunError> {
    let done = match state.stores.runs.items(earlier, node).await {
        Ok(items) => items,
        Err(StoreError::NotFound { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let total = u32::try_from(done.len()).unwrap_or(u32::MAX);
    let mut batches: Vec<ItemBatch> = Vec::new();
    for chunk in done.chunks(CARRIED_PER_BATCH) {
        let mut items = Vec::with_capacity(chunk.len());
        for (index, value) in chunk {
            let name = format!("reused/{node}/{index}");
            let value = durable::carry_output(value, &state.stores.blobs, rerun, &name, over)
                .await
                .map_err(|e| match e {
                    // Its blob is gone: that item executes again.
                    StoreError::NotFound { .. } => None,
                    e => Some(e),
                });
            match value {
                Ok(value) => items.push((*index, Arc::new(value))),
                Err(None) => {}
                Err(Some(e)) => return Err(e.into()),
            }
        }
        // A batch whose every blob is gone: those items execute again.
        if items.is_empty() {
            continue;
        }
        batches.push(ItemBatch {
            node: Arc::from(node),
            progress: ItemProgress { total, done: total },
            started_at: chrono::Utc::now(),
            items,
        });
    }
    Ok(batches)
}

/// A run as [`accept`] left it.
enum Accepted {
    /// The idempotency key named a run started before.
    Existing(RunRecord),
    /// Executing here (the `all` role's waited runs).
    Inline(
        RunRecord,
        tokio::task::JoinHandle<Result<RunRecord, RunError>>,
    ),
    /// In the queue, with a watch for its end when the caller waits.
    Queued(RunRecord, Option<FinishWatch>),
}

/// Stores a new run (in the database before anyone answers) and hands it to whoever executes
/// it: a task here in `permit` (the run created already claimed) or the queue of `group`.
async fn accept(
    state: Shared,
    new: NewRun,
    permit: Option<OwnedSemaphorePermit>,
    wait: bool,
    group: String,
) -> Result<Accepted, RunError> {
    let flow_id = new.flow_id.clone();
    // Registered before the run exists, so that a cancel can never miss it (a new id: always
    // free).
    let slot = permit.as_ref().and_then(|_| state.running.enter(&new.id));
    let (run, created) = state.stores.runs.create(new).await?;
    if !created {
        return Ok(Accepted::Existing(run));
    }
    state.usage.run_started(&flow_id);
    if let (Some(slot), Some(permit)) = (slot, permit) {
        let task = {
            let (state, run) = (state.clone(), run.clone());
            tokio::spawn(async move { execute_inline(&state, run, slot, permit).await })
        };
        return Ok(Accepted::Inline(run, task));
    }
    // Watched before it is enqueued, so that its end cannot pass unseen.
    let watch = wait.then(|| state.stores.signals.watch_finished(&run.id));
    if let Err(e) = state.stores.queue.enqueue(&group, NewJob::of(&run)).await {
        // Not accepted: the caller gets the error, and the run must not wait for ever for a
        // job that does not exist (unless the enqueue went through after all and a worker has
        // it already).
        let failed = fail(
            &state,
            &run.id,
            "the queue was unavailable when the run was started".into(),
        )
        .await;
        if let Err(f) = failed {
            tracing::warn!(run_id = %run.id, error = %f, "could not fail a run that was not enqueued");
        }
        return Err(e.into());
    }
    Ok(Accepted::Queued(run, watch))
}

/// A run as a caller is answered: ended, or live in some status.
enum Seen {
    Ended(RunId, RunEnd),
    Live(RunId, RunStatus),
}

impl Seen {
    fn of(run: &RunRecord) -> Self {
        match run.end() {
            Some(end) => Self::Ended(run.id.clone(), end),
            None => Self::Live(run.id.clone(), run.status),
        }
    }
}

/// Waits until the run is final or parked, or `limit` passes. Woken by the run's announcement
/// from whichever process executes it, which carries the run's end as stored (else the store
/// is read); the store is also read every second, in case an announcement was lost (a Redis
/// reconnect).
async fn wait_until_final(
    state: &AppState,
    run_id: &RunId,
    mut watch: FinishWatch,
    limit: Duration,
) -> Result<Seen, StoreError> {
    let until = tokio::time::Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let heard = tokio::time::timeout(left.min(Duration::from_secs(1)), watch.finished()).await;
        if let Ok(Some(end)) = heard {
            return Ok(Seen::Ended(run_id.clone(), Arc::unwrap_or_clone(end)));
        }
        let run = state.stores.runs.get(run_id).await?;
        // A parked run waits for a signal or a time, maybe for days: said at once.
        let parked = run.status == RunStatus::Waiting;
        if run.status.is_final() || parked || tokio::time::Instant::now() >= until {
            return Ok(Seen::of(&run));
        }
        if heard.is_ok() {
            // Announced but not final as read: keep reading, gently.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The answer for a run as seen: its output (read back from the blob store when offloaded)
/// once it ended.
async fn answer(state: &AppState, seen: Seen) -> Result<RunAnswer, StoreError> {
    Ok(match seen {
        Seen::Ended(run_id, end) => RunAnswer {
            run_id,
            status: end.status,
            output: Some(match &end.output {
                Some(v) => resolve(v, state.stores.blobs.as_ref()).await?,
                None => Value::Null,
            }),
            error: end.error,
        },
        Seen::Live(run_id, status) => RunAnswer {
            run_id,
            status,
            output: None,
            error: None,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Cancel.

/// How long a cancel waits for a running run's engine to stop it and store its end.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// Cancels a queued or waiting run (a move of the table), or asks whichever process executes a
/// running one to stop it and waits for its end up to [`CANCEL_WAIT`] (still running after it: the
/// answer says so). A finished run: [`RunError::AlreadyFinished`].
///
/// The cancel is recorded with the run, by `actor`, with the status it answers (`detail`:
/// `{"status"}`): when the run ended cancelled, or still runs after the request (once: a
/// cancel asked again of a run that does not stop adds nothing). A run that ended otherwise
/// meanwhile (succeeded, failed) records nothing.
pub async fn cancel(
    state: &AppState,
    id: &RunId,
    actor: Option<Actor>,
) -> Result<RunState, RunError> {
    let done = stop(state, id).await?;
    let record = match done.status {
        RunStatus::Cancelled => true,
        status if status.is_final() => false,
        _ => state.stores.runs.actions(id).await.map_or(true, |a| {
            a.last().is_none_or(|a| a.action != ActionKind::Cancel)
        }),
    };
    if record {
        let action =
            RunAction::now(ActionKind::Cancel, actor).with_detail(json!({"status": done.status}));
        record_actions(state, &[(id.clone(), action)]).await;
    }
    Ok(done)
}

/// What [`cancel`] does to the run.
async fn stop(state: &AppState, id: &RunId) -> Result<RunState, RunError> {
    let mut run = state.stores.runs.get(id).await?;
    // A queued or waiting run may move meanwhile (claimed, woken): then it is looked at again.
    for _ in 0..3 {
        if !matches!(run.status, RunStatus::Queued | RunStatus::Waiting) {
            break;
        }
        let change = run.status.to(RunStatus::Cancelled);
        match state.stores.runs.transition(id, change).await {
            Ok(run) => {
                announce_finished(state, &run).await;
                return Ok(RunState {
                    run_id: run.id,
                    status: run.status,
                });
            }
            Err(StoreError::Conflict(_)) => run = state.stores.runs.get(id).await?,
            Err(e) => return Err(e.into()),
        }
    }
    match run.status {
        RunStatus::Queued | RunStatus::Waiting => Err(StoreError::Conflict(format!(
            "run `{id}` kept changing its status; try again"
        ))
        .into()),
        // Its owner is gone (the lease lapsed): nobody would hear the request, and the reaper
        // would run it again. Ended here instead, as `fail` does.
        RunStatus::Running
            if run
                .lease
                .as_ref()
                .is_none_or(|l| l.expires_at <= chrono::Utc::now())
                && end_unowned(state, id, RunStatus::Cancelled, None).await? =>
        {
            Ok(RunState {
                run_id: id.clone(),
                status: RunStatus::Cancelled,
            })
        }
        RunStatus::Running => {
            // Here, or in whichever process executes it.
            let watch = state.stores.signals.watch_finished(id);
            if !state.running.cancel(id) {
                state.stores.signals.cancel(id).await?;
            }
            let status = match wait_until_final(state, id, watch, CANCEL_WAIT).await? {
                Seen::Ended(_, end) => end.status,
                Seen::Live(_, status) => status,
            };
            // It parked as the cancel came (no engine executes it to hear it): cancelled as
            // a waiting run.
            if status == RunStatus::Waiting {
                let change = RunStatus::Waiting.to(RunStatus::Cancelled);
                if let Ok(run) = state.stores.runs.transition(id, change).await {
                    announce_finished(state, &run).await;
                    return Ok(RunState {
                        run_id: run.id,
                        status: run.status,
                    });
                }
            }
            Ok(RunState {
                run_id: id.clone(),
                status,
            })
        }
        status => Err(RunError::AlreadyFinished(status)),
    }
}

/// Cancels the runs executing here that any process asks to cancel, until `shutdown`.
pub async fn obey_cancels(state: Shared, shutdown: CancellationToken) {
    let mut cancels = state.stores.signals.cancels();
    loop {
        let id = tokio::select! {
            () = shutdown.cancelled() => return,
            id = cancels.recv() => id,
        };
        match id {
            Ok(id) => {
                if state.running.cancel(&id) {
                    tracing::info!(run_id = %id, "cancelled on request");
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "cancel requests were missed");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Signals and timers: what wakes a parked run.

/// A signal as stored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SignalSent {
    /// The run it was sent to.
    #[schema(value_type = String)]
    pub run_id: RunId,
    /// The signal's name.
    pub signal: String,
}

/// Sends signal `name` with `payload` to run `id`: kept until a wait of the run takes it, and
/// when the run waits for it now, the run is woken and handed to its queue. A finished run:
/// [`RunError::AlreadyFinished`]; too many pending: [`RunError::TooManySignals`]. Once stored,
/// `by` is recorded with the run.
pub async fn signal(
    state: &AppState,
    id: &RunId,
    name: &str,
    payload: &Value,
    by: RunAction,
) -> Result<SignalSent, RunError> {
    check_signal(payload)?;
    let (run, woke) = match state
        .stores
        .runs
        .send_signal(
            id,
            Signal {
                name,
                payload,
                key: None,
            },
        )
        .await
    {
        Ok(sent) => sent,
        Err(StoreError::Conflict(_)) => {
            let run = state.stores.runs.get(id).await?;
            return Err(RunError::AlreadyFinished(run.status));
        }
        Err(StoreError::TooLarge(message)) => return Err(RunError::TooManySignals(message)),
        Err(e) => return Err(e.into()),
    };
    // Woken: a queue that fails now leaves it to the reaper's sweep of woken runs (the signal
    // is stored; an error here would only invite the caller to send it again).
    if woke && let Err(e) = requeue(state, &run).await {
        tracing::warn!(run_id = %run.id, error = %e, "could not enqueue a woken run");
    }
    record_actions(state, &[(run.id.clone(), by)]).await;
    Ok(SignalSent {
        run_id: run.id,
        signal: name.to_owned(),
    })
}

/// Sends signal `name` with `payload` to every run waiting now for it with `key`, wakes them
/// and hands them to their queues; answers their ids.
pub async fn keyed_signal(
    state: &AppState,
    name: &str,
    key: &str,
    payload: &Value,
    actor: Option<Actor>,
) -> Result<Vec<RunId>, RunError> {
    check_signal(payload)?;
    let woken = state
        .stores
        .runs
        .send_keyed_signal(Signal {
            name,
            payload,
            key: Some(key),
        })
        .await?;
    requeue_all(state, &woken).await;
    // Not the key: it is often an order's id or an address, and it goes with the run's data.
    let action = RunAction::now(ActionKind::Signal, actor)
        .with_detail(json!({"signal": name, "keyed": true}));
    let actions: Vec<(RunId, RunAction)> = woken
        .iter()
        .map(|run| (run.id.clone(), action.clone()))
        .collect();
    record_actions(state, &actions).await;
    Ok(woken.into_iter().map(|r| r.id).collect())
}

/// Runs `act` to its end in a task of its own: a person's action and its record are not cut
/// short when the client goes away (the server drops a request's handler when its connection
/// closes, which would leave a cancel made and not recorded).
pub async fn detached<T: Send + 'static>(
    act: impl Future<Output = Result<T, RunError>> + Send + 'static,
) -> Result<T, RunError> {
    tokio::spawn(act)
        .await
        .map_err(|e| StoreError::backend("acting on a run", e))?
}

/// Records what a person did to runs. The change is made by now: a store that fails here
/// loses only the record, which is logged rather than answered (an error would invite the
/// caller to do it again).
async fn record_actions(state: &AppState, actions: &[(RunId, RunAction)]) {
    // Tried twice: a CI run lost one record on SQLite under load. The cause is not pinned
    // down: the batch writer shares the one writer connection, so it is no lock conflict of
    // ours; a wait for that connection past its timeout, or another transient error.
    for attempt in 1..=2 {
        match state.stores.runs.record_actions(actions).await {
            Ok(()) => return,
            Err(e) if attempt == 1 => {
                tracing::info!(error = %e, "recording who acted on a run failed; trying again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, runs = actions.len(), "could not record who acted on a run");
            }
        }
    }
}

/// How many woken runs are enqueued at once: each is a round trip to a shared queue.
const REQUEUES_AT_ONCE: usize = 32;

/// Hands woken runs to their queues, several at once. A queue that fails leaves a run to the
/// reaper's sweep of woken runs.
async fn requeue_all(state: &AppState, woken: &[RunRecord]) {
    use futures::StreamExt;
    futures::stream::iter(woken)
        .for_each_concurrent(REQUEUES_AT_ONCE, |run| async move {
            if let Err(e) = requeue(state, run).await {
                tracing::warn!(run_id = %run.id, error = %e, "could not enqueue a woken run");
            }
        })
        .await;
}

/// Hands a woken run to its flow's queue.
async fn requeue(state: &AppState, run: &RunRecord) -> Result<(), StoreError> {
    let group = group_of(state, run).await;
    state.stores.queue.enqueue(&group, NewJob::of(run)).await?;
    Ok(())
}

/// How often the timer looks for waiting runs whose time came: a run wakes within this of its
/// time (and of a wait's timeout).
pub const TIMER_EVERY: Duration = Duration::from_millis(200);

/// The most runs one look of the timer wakes; a full look is followed by another at once.
const WAKES_PER_LOOK: usize = 1000;

/// Wakes the waiting runs whose time came (a parked delay's, a wait's timeout) and hands them
/// to their queues, every [`TIMER_EVERY`] until `shutdown`. Every worker process runs one: the
/// store wakes each run once, whichever asks.
pub async fn wake_timers(state: Shared, shutdown: CancellationToken) {
    loop {
        let due = Due {
            after: None,
            by: chrono::Utc::now(),
            limit: WAKES_PER_LOOK,
        };
        let full = match state.stores.runs.wake_due(&due).await {
            Ok(woken) => {
                requeue_all(&state, &woken).await;
                woken.len() >= WAKES_PER_LOOK
            }
            Err(e) => {
                tracing::warn!(error = %e, "waking due runs failed; retrying");
                false
            }
        };
        if full && !shutdown.is_cancelled() {
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(TIMER_EVERY) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Execute, fail, announce.

/// The durable options of this process's runs.
pub fn durable_options(state: &AppState) -> DurableOptions {
    DurableOptions {
        // Batched checkpoints: a fast run costs two commits; a longer one is checkpointed every
        // 200 ms.
        checkpoint: Checkpoint::Batched(Duration::from_millis(200)),
        blobs: Some(state.stores.blobs.clone()),
        lease_ttl: state.config.lease(),
        on_failure: state.config.on_failure_flow.clone(),
        ..DurableOptions::new(state.worker_name.clone())
    }
}

/// Hands a failed run's failure handler run (stored with its end, see
/// [`durable::failure_handler`]) to its queue, when it has one. A queue that fails leaves it to
/// the reaper's sweep of queued runs (it is stored).
async fn start_handler(state: &AppState, failed: &RunRecord) {
    if !matches!(failed.status, RunStatus::Failed | RunStatus::TimedOut) {
        return;
    }
    let id = failed.id.failure_handler();
    match state.stores.runs.get(&id).await {
        Ok(handler) if handler.status == RunStatus::Queued => {
            state.usage.run_started(&handler.flow_id);
            if let Err(e) = requeue(state, &handler).await {
                tracing::warn!(run_id = %id, error = %e, "could not enqueue a failure handler");
            }
        }
        Ok(_) | Err(StoreError::NotFound { .. }) => {}
        Err(e) => tracing::warn!(run_id = %id, error = %e, "could not read a failure handler"),
    }
}

/// Executes a run this process holds (its lease is ours) to its end, in `slot` (its place in
/// the registry of runs executing here, left when this returns), and announces its end. A run
/// handed back by a shutdown comes back `queued`; a parked one `waiting` (or `queued`, when a
/// signal it waits for came while it parked: it goes back to the queue).
pub async fn execute(state: &AppState, run: RunRecord, slot: Slot) -> Result<RunRecord, RunError> {
    let (_, plan) = state
        .plans
        .get(&run.flow_id, Some(run.flow_version))
        .await?;
    let sink = state.metrics.node_sink(&plan, state.event_sink.clone());
    let hooks = Hooks {
        events: Some(state.usage.node_sink(&run.flow_id, sink)),
        cancel: Some(slot.token().clone()),
        hand_back: Some(state.hand_back.clone()),
    };
    let started = std::time::Instant::now();
    state.metrics.run_started();
    let result = durable::execute(
        &state.engine,
        &plan,
        &state.stores.runs,
        &run,
        &durable_options(state),
        hooks,
    )
    .await;
    drop(slot);
    let status = result.as_ref().map_or(RunStatus::Failed, |r| r.status);
    // A parked run is announced too: a request waiting for its end answers that it waits.
    if let Ok(done) = &result
        && (done.status.is_final() || done.status == RunStatus::Waiting)
    {
        announce_finished(state, done).await;
        start_handler(state, done).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    if status.is_final() {
        state.metrics.run_finished(status, seconds);
    } else {
        state.metrics.run_left(status);
    }
    Ok(result?)
}

/// [`execute`] for a run started by a request in one of the process's slots (`permit`): handed
/// back by a shutdown, it goes to the queue (it was never there).
async fn execute_inline(
    state: &AppState,
    run: RunRecord,
    slot: Slot,
    permit: OwnedSemaphorePermit,
) -> Result<RunRecord, RunError> {
    let done = execute(state, run, slot).await;
    drop(permit);
    let done = done?;
    if done.status == RunStatus::Queued {
        let group = group_of(state, &done).await;
        state
            .stores
            .queue
            .enqueue(&group, NewJob::of(&done))
            .await?;
    }
    Ok(done)
}

/// Fails a queued run, or a running one whose lease lapsed, with `error` (claimed first, so
/// that a worker that took it meanwhile is left alone). Returns whether it was failed here.
pub async fn fail(state: &AppState, id: &RunId, error: String) -> Result<bool, StoreError> {
    end_unowned(state, id, RunStatus::Failed, Some(error)).await
}

/// Ends a queued run, or a running one whose lease lapsed, as `status` (claimed first, so that
/// a worker that took it meanwhile is left alone), and announces it. Returns whether it was
/// ended here.
async fn end_unowned(
    state: &AppState,
    id: &RunId,
    status: RunStatus,
    error: Option<String>,
) -> Result<bool, StoreError> {
    let run = match state
        .stores
        .runs
        .claim_run(id, &state.worker_name, state.config.lease())
        .await
    {
        Ok(run) => run,
        // Someone took it meanwhile, or it ended.
        Err(StoreError::Conflict(_) | StoreError::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    end_claimed(state, run, status, error).await?;
    Ok(true)
}

/// Ends `run`, claimed by this process, as `status`, starts its failure handler and announces
/// its end.
async fn end_claimed(
    state: &AppState,
    run: RunRecord,
    status: RunStatus,
    error: Option<String>,
) -> Result<(), StoreError> {
    let mut outcome = RunOutcome {
        status,
        error,
        ..Default::default()
    };
    // Its flow's handler, else the server's (a flow gone since names none).
    let own = match state.plans.get(&run.flow_id, Some(run.flow_version)).await {
        Ok((_, plan)) => plan.on_failure().map(str::to_owned),
        Err(_) => None,
    };
    let handler = own.or_else(|| state.config.on_failure_flow.clone());
    outcome.then =
        durable::failure_handler(&state.engine, handler.as_deref(), &run, &outcome, None).await?;
    let epoch = run.lease.as_ref().map_or(run.epoch, |l| l.epoch);
    let ended = state.stores.runs.finish(&run.id, epoch, outcome).await?;
    announce_finished(state, &ended).await;
    start_handler(state, &ended).await;
    Ok(())
}

/// Tells every process that a run ended (its end is stored, as in `run`), waking the requests
/// waiting for it with its end; a lost announcement only delays them until they read the store.
pub async fn announce_finished(state: &AppState, run: &RunRecord) {
    if let Err(e) = state
        .stores
        .signals
        .finished(&run.id, run.end().as_ref())
        .await
    {
        tracing::warn!(run_id = %run.id, error = %e, "could not announce a finished run");
    }
}

/// The worker group whose queue a run goes to: its flow's, else this process's.
pub async fn group_of(state: &AppState, run: &RunRecord) -> String {
    state
        .plans
        .get(&run.flow_id, Some(run.flow_version))
        .await
        .ok()
        .and_then(|(_, plan)| plan.worker_group().map(str::to_owned))
        .unwrap_or_else(|| state.config.worker_group.clone())
}

// ---------------------------------------------------------------------------------------------
// Recover and reap: the runs whose worker died, and the queued runs that lost their job.

/// After this many owners lost a run (their leases lapsed), the run is failed instead of being
/// handed to another worker: something in it kills workers.
pub const MAX_OWNERS: u64 = 5;

/// How many owners lost the run in a row: its leases since it last parked (a run that parks
/// and wakes is claimed again each time, by no fault of its workers).
fn owners_lost(run: &RunRecord) -> u64 {
    run.epoch
        .saturating_sub(run.parked.as_ref().map_or(0, |p| p.epoch))
}

/// Whether `run`, just claimed by this process, was claimed by more than twice
/// [`MAX_OWNERS`] workers before it without ending or parking. Twice: those include the
/// workers that handed it back at a shutdown (the count cannot tell them apart), which the
/// reaper's own test, of lapsed runs only, leaves out.
pub fn lost_too_often(run: &RunRecord) -> bool {
    owners_lost(run) > 2 * MAX_OWNERS
}

/// Fails `run`, claimed by this process, that [`lost_too_often`] says too many workers lost: the
/// reaper does so for the runs it finds lapsed, but a job delivered again as its lease lapses
/// may take the run before the reaper looks (and a job that holds a concurrency slot is never
/// dead-lettered, which would have left the run to the reaper).
pub async fn give_up_claimed(state: &AppState, run: RunRecord) -> Result<(), StoreError> {
    let error = format!(
        "the run was lost by {} workers in a row (their leases lapsed, or they stopped); not \
         retried again",
        owners_lost(&run).saturating_sub(1)
    );
    tracing::warn!(run_id = %run.id, "a run lost by too many workers was failed");
    end_claimed(state, run, RunStatus::Failed, Some(error)).await
}

/// Fails a run that [`MAX_OWNERS`] workers lost in a row.
async fn give_up(state: &AppState, run: &RunRecord) -> Result<(), StoreError> {
    let error = format!(
        "the run was lost by {} workers in a row (their leases lapsed); not retried again",
        owners_lost(run)
    );
    if fail(state, &run.id, error).await? {
        tracing::warn!(run_id = %run.id, "a run lost by too many workers was failed");
    }
    Ok(())
}

/// Puts back in the queue the runs whose owner is gone (lease expired), and with
/// `queued_too` every run waiting in the database (an in-process queue starts empty after a
/// restart; a Redis may restart empty). A run already in the queue is delivered again at worst,
/// and its claim refused. Returns how many runs were enqueued.
pub async fn recover(state: &AppState, queued_too: bool) -> Result<usize, StoreError> {
    recover_except(
        state,
        queued_too,
        &mut HashMap::new(),
        &mut Lapsed::default(),
    )
    .await
}

/// How often the reaper looks at every running run with a lapsed lease; in between it looks at
/// the leases that lapsed since its last look.
const FULL_LOOK_EVERY: Duration = Duration::from_secs(30);

/// Where the reaper's look for lapsed leases stands.
#[derive(Debug, Default)]
struct Lapsed {
    /// Leases that lapsed up to this were looked at (`None`: look at all).
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// When all were last looked at.
    full_at: Option<std::time::Instant>,
}

/// The most runs with a lapsed lease one pass takes.
const LAPSED_PER_PASS: usize = 1000;

/// Every queued run, newest first, page by page.
async fn all_queued(state: &AppState) -> Result<Vec<RunRecord>, StoreError> {
    let mut filter = RunFilter {
        status: Some(RunStatus::Queued),
        limit: 500,
        ..Default::default()
    };
    let mut found = Vec::new();
    loop {
        let page = state.stores.runs.list(&filter).await?;
        found.extend(page.items);
        match page.next_cursor {
            Some(c) => filter.cursor = Some(c),
            None => return Ok(found),
        }
    }
}

/// [`recover`], leaving out the runs in `recent` enqueued less than a lease ago (a run whose
/// group has no worker is not enqueued again every pass), and adding those it enqueues. It
/// looks at every lapsed lease at the first pass, with `queued_too` and every
/// [`FULL_LOOK_EVERY`], else only at those that lapsed since the last pass (`lapsed`): a full
/// look costs a database a scan of every row version that was ever running until a vacuum.
async fn recover_except(
    state: &AppState,
    queued_too: bool,
    recent: &mut HashMap<RunId, std::time::Instant>,
    lapsed: &mut Lapsed,
) -> Result<usize, StoreError> {
    let lease = state.config.lease();
    recent.retain(|_, at| at.elapsed() < lease);
    let now = chrono::Utc::now();
    let full = queued_too
        || lapsed.since.is_none()
        || lapsed
            .full_at
            .is_none_or(|at| at.elapsed() >= FULL_LOOK_EVERY);
    let after = if full { None } else { lapsed.since };
    let found = state
        .stores
        .runs
        .expired(&Due {
            after,
            by: now,
            limit: LAPSED_PER_PASS,
        })
        .await?;
    // A full page: the next pass goes on from its last expiry (a full look: looks again).
    let next_since = match (found.len() >= LAPSED_PER_PASS, full) {
        (false, _) => Some(now),
        (true, true) => None,
        (true, false) => found.last().and_then(|(_, at)| *at).or(lapsed.since),
    };
    let mut ids: Vec<RunId> = found.into_iter().map(|(id, _)| id).collect();
    if queued_too {
        ids.extend(all_queued(state).await?.into_iter().map(|r| r.id));
    }
    let recovered = recover_ids(state, ids, recent).await?;
    lapsed.since = next_since;
    if full {
        lapsed.full_at = Some(std::time::Instant::now());
    }
    Ok(recovered)
}

/// Enqueues `ids` but those in `recent`, failing those lost by too many owners.
async fn recover_ids(
    state: &AppState,
    ids: Vec<RunId>,
    recent: &mut HashMap<RunId, std::time::Instant>,
) -> Result<usize, StoreError> {
    let mut count = 0;
    for id in ids {
        let run = match state.stores.runs.get(&id).await {
            Ok(run) => run,
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        // Before the look at `recent`: a run enqueued a moment ago and lost again is given up
        // now, not after the pause.
        if run.status.is_leased() && owners_lost(&run) >= MAX_OWNERS {
            give_up(state, &run).await?;
            continue;
        }
        if recent.contains_key(&id) {
            continue;
        }
        let group = group_of(state, &run).await;
        state.stores.queue.enqueue(&group, NewJob::of(&run)).await?;
        recent.insert(id, std::time::Instant::now());
        count += 1;
    }
    Ok(count)
}

/// How far back a process starting looks for runs left queued without a job.
const ORPHANS_BEFORE_START: Duration = Duration::from_secs(600);

/// The runs still `queued` that turned a lease old since `since` (moved on to now minus a
/// lease). An api process that dies between storing a run and enqueuing it leaves the run
/// without a job, and a Redis that restarts empty loses the jobs of all waiting runs; sweeping
/// each queued run once as it passes that age finds them. A run that only waits behind a
/// backlog gets one extra job per sweeping process, whose claim is refused.
async fn orphans(
    state: &AppState,
    since: &mut chrono::DateTime<chrono::Utc>,
) -> Result<Vec<RunId>, StoreError> {
    let until = chrono::Utc::now()
        - chrono::Duration::from_std(state.config.lease()).unwrap_or(chrono::Duration::MAX);
    if until <= *since {
        return Ok(Vec::new());
    }
    let mut filter = RunFilter {
        status: Some(RunStatus::Queued),
        limit: 500,
        ..Default::default()
    };
    let mut found = Vec::new();
    // Newest first: skip the young ones, stop at the ones swept before.
    'pages: loop {
        let page = state.stores.runs.list(&filter).await?;
        for run in page.items {
            if run.created_at <= *since {
                break 'pages;
            }
            if run.created_at <= until {
                found.push(run.id);
            }
        }
        match page.next_cursor {
            Some(c) => filter.cursor = Some(c),
            None => break,
        }
    }
    *since = until;
    Ok(found)
}

/// Recovers runs (see [`recover`]) at start and every `every` until `shutdown`: the queued
/// ones too at start with an in-process queue and whenever the queue lost its jobs, and with a
/// shared queue the queued runs left without a job (see [`orphans`]).
pub async fn reap(state: Shared, every: Duration, shutdown: CancellationToken) {
    let mut recent = HashMap::new();
    let mut lapsed = Lapsed::default();
    let losses = state.stores.queue.losses();
    // A queue that can lose its jobs while this process lives is another process's (Redis):
    // its runs may lose their jobs to a process that died between storing and enqueuing them
    // (the orphan sweep). An in-process queue starts empty with its process: every queued run
    // goes back into it at start.
    let shared = losses.is_some();
    let (mut handled, mut first) = (0, true);
    let mut swept = chrono::Utc::now()
        - chrono::Duration::from_std(ORPHANS_BEFORE_START).unwrap_or(chrono::Duration::MAX);
    loop {
        let lost = losses.as_ref().map_or(0, |l| *l.borrow());
        let queued_too = (first && !shared) || lost > handled;
        if queued_too {
            // Everything waiting goes back, whatever was enqueued lately.
            recent.clear();
        }
        match recover_except(&state, queued_too, &mut recent, &mut lapsed).await {
            Ok(n) => {
                (handled, first) = (lost, false);
                if n > 0 {
                    tracing::info!(runs = n, "runs recovered into the queue");
                }
            }
            Err(e) => tracing::warn!(error = %e, "recovering runs failed; retrying"),
        }
        if shared {
            let mut since = swept;
            let swept_now = async {
                let ids = orphans(&state, &mut since).await?;
                recover_ids(&state, ids, &mut recent).await
            };
            match swept_now.await {
                Ok(n) => {
                    swept = since;
                    if n > 0 {
                        tracing::info!(runs = n, "queued runs without a job enqueued again");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "sweeping queued runs failed; retrying"),
            }
            // Woken runs that no worker claimed within a lease: their job may be lost (a
            // process that died between waking them and enqueuing them, a queue that failed).
            let woken_now = async {
                let lease = chrono::Duration::from_std(state.config.lease()).unwrap_or_default();
                let due = Due {
                    after: None,
                    by: chrono::Utc::now() - lease,
                    limit: LAPSED_PER_PASS,
                };
                let ids = state.stores.runs.woken_unclaimed(&due).await?;
                recover_ids(&state, ids, &mut recent).await
            };
            match woken_now.await {
                Ok(n) if n > 0 => {
                    tracing::info!(runs = n, "woken runs without a job enqueued again");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "sweeping woken runs failed; retrying"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
