//! Durable execution: a run kept in a [`RunStore`], checkpointed step by step, with its worker
//! lease renewed while it runs. This is the core of a worker; it uses only the ports.
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use flowcore::durable::{self, DurableOptions};
//! use flowcore::ports::{NewRun, RunStore, memory::MemoryRunStore};
//! use flowcore::{Engine, RunStatus};
//!
//! let engine = Engine::new();
//! let plan = engine.compile_json(r#"{"nodes": [{"id": "t", "type": "template", "params": {"template": "hi {{ input.who }}"}}]}"#).unwrap();
//! let runs: Arc<dyn RunStore> = Arc::new(MemoryRunStore::new());
//! let options = DurableOptions::new("worker-1");
//! let new = NewRun::new("f", 1, serde_json::json!({"who": "you"})).claimed(options.claim());
//! let (run, _) = runs.create(new).await.unwrap();
//! let done = durable::execute(&engine, &plan, &runs, &run, &options, Default::default()).await.unwrap();
//! assert_eq!(done.status, RunStatus::Succeeded);
//! assert_eq!(done.output, Some(serde_json::json!("hi you")));
//! assert_eq!(runs.steps(&run.id).await.unwrap().len(), 1);
//! # });
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::engine::{Engine, RunOptions};
use crate::error::StoreError;
use crate::event::EventSink;
use crate::ids::RunId;
use crate::plan::Plan;
use crate::ports::{BlobStore, Claim, NewRun, Park, RunOutcome, RunRecord, RunStore, SignalTake};
use crate::run::{ItemBatch, RunStatus, SignalInbox, StepRecord, StepRecorder};
use crate::wait::Parked;
use serde_json::Value;

/// When finished steps are written to the run store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// Each step is written before the nodes after it start: a crash never re-executes a
    /// finished step. One commit per step.
    EveryStep,
    /// Steps are buffered and written at most this long after they finish, or with the run's
    /// final status: a fast run costs one commit for all its steps, and a crash re-executes at
    /// most the steps of the last interval.
    Batched(Duration),
}

/// How a worker executes durable runs.
#[derive(Clone)]
pub struct DurableOptions {
    /// The worker's name, stored as the lease owner.
    pub owner: String,
    /// The lease's time to live; it is renewed every third of it.
    pub lease_ttl: Duration,
    /// When steps are written.
    pub checkpoint: Checkpoint,
    /// Where step outputs and run outputs larger than `offload_over` bytes go, so that the run
    /// store stays small; the store then keeps `{"$blob": key, "size": n}` (see [`resolve`]).
    pub blobs: Option<Arc<dyn BlobStore>>,
    /// The serialized size above which outputs go to `blobs` (64 KiB by default).
    pub offload_over: usize,
    /// The failure handler of runs whose flow names none (`settings.on_failure`): a flow id
    /// (see [`failure_handler`]).
    pub on_failure: Option<String>,
}

impl std::fmt::Debug for DurableOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableOptions")
            .field("owner", &self.owner)
            .field("lease_ttl", &self.lease_ttl)
            .field("checkpoint", &self.checkpoint)
            .field("blobs", &self.blobs.is_some())
            .field("offload_over", &self.offload_over)
            .finish()
    }
}

impl DurableOptions {
    /// A 30 s lease, renewed every 10 s, and every step checkpointed.
    pub fn new(owner: impl Into<String>) -> Self {
        Self {
            owner: owner.into(),
            lease_ttl: Duration::from_secs(30),
            checkpoint: Checkpoint::EveryStep,
            blobs: None,
            offload_over: 64 * 1024,
            on_failure: None,
        }
    }
    /// The claim to create a run with, or to claim one.
    pub fn claim(&self) -> Claim {
        Claim {
            owner: self.owner.clone(),
            ttl: self.lease_ttl,
        }
    }
}

/// What else an execution takes: events and outside cancellation.
#[derive(Default)]
pub struct Hooks {
    /// Receives the run's events.
    pub events: Option<Arc<dyn EventSink>>,
    /// Cancels the run from outside (it then ends `cancelled`).
    pub cancel: Option<CancellationToken>,
    /// Hands the run back (a worker shutting down): the nodes in flight are dropped, the
    /// finished steps are stored, and the run goes back to `queued` for another worker, which
    /// resumes it without executing those steps again.
    pub hand_back: Option<CancellationToken>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("events", &self.events.is_some())
            .finish_non_exhaustive()
    }
}

/// Executes `run`, which this worker holds (its `lease` is ours, status `running`): resumes from
/// its recorded steps, checkpoints steps as `options.checkpoint` says, renews the lease, and
/// writes the final status with the last steps in one commit.
///
/// Returns `StoreError::StaleLease` when the lease was lost on the way (another worker took
/// the run): the run was stopped and nothing more was written. A run handed back
/// ([`Hooks::hand_back`]) returns its record, `queued`.
pub async fn execute(
    engine: &Engine,
    plan: &Plan,
    runs: &Arc<dyn RunStore>,
    run: &RunRecord,
    options: &DurableOptions,
    hooks: Hooks,
) -> Result<RunRecord, StoreError> {
    let epoch = run.epoch;
    // The first owner of a run (epoch 1) cannot find steps of an earlier one, but for those a
    // rerun keeps.
    let offload = options.blobs.clone().map(|b| Offload {
        blobs: b,
        over: options.offload_over,
        run_id: run.id.clone(),
    });
    let mut resume = if epoch > 1 || run.rerun_of.is_some() {
        runs.steps(&run.id).await?
    } else {
        Vec::new()
    };
    tracing::debug!(run_id = %run.id, epoch, owner = %options.owner, finished_steps = resume.len(), "executing a run");
    if let Some(offload) = &offload {
        for step in &mut resume {
            if let Some(output) = &step.output {
                step.output = Some(Arc::new(resolve(output, offload.blobs.as_ref()).await?));
            }
        }
    }
    let cancel = hooks.cancel.unwrap_or_default();
    let recorder = Arc::new(Recorder {
        runs: runs.clone(),
        run_id: run.id.clone(),
        epoch,
        checkpoint: options.checkpoint,
        buffer: Mutex::new(Vec::new()),
        lost: CancellationToken::new(),
        offload: offload.clone(),
    });
    // Stopped when this function returns or its future is dropped (a worker shutting down
    // abruptly): the lease must then lapse, not be renewed by an orphan task.
    let keeper = AbortOnDropHandle::new(tokio::spawn(keep(
        recorder.clone(),
        options.lease_ttl,
        run.lease.as_ref().map(|l| l.expires_at),
        cancel.clone(),
    )));
    let hand_back = hooks.hand_back.unwrap_or_default();
    // `run_finished` goes out once the end is stored, so that whoever hears it reads it.
    let held = HeldFinish::new(hooks.events);
    let execution = engine.execute(
        plan,
        run.input.clone(),
        RunOptions {
            run_id: Some(run.id.clone()),
            events: held.sink(),
            recorder: Some(recorder.clone()),
            resume,
            cancel: Some(cancel.clone()),
            timeout: None,
            trigger: run.trigger.clone(),
            signals: Some(Arc::new(Inbox {
                runs: runs.clone(),
                run_id: run.id.clone(),
                epoch,
            })),
            parked: run.parked.clone(),
            started_at: Some(run.created_at),
        },
    );
    // `None` once handed back; the execution (and its nodes in flight) is dropped by then.
    let result = tokio::select! {
        result = execution => Some(result),
        () = hand_back.cancelled() => None,
    };
    drop(keeper);
    let Some(mut result) = result else {
        let steps = std::mem::take(&mut *lock(&recorder.buffer));
        if !steps.is_empty() {
            runs.record_steps(&run.id, epoch, &steps).await?;
        }
        runs.release(&run.id, epoch).await?;
        return runs.get(&run.id).await;
    };
    if recorder.lost.is_cancelled() {
        return Err(StoreError::StaleLease(format!(
            "run `{}` was taken over by another worker",
            run.id
        )));
    }
    let steps = std::mem::take(&mut *lock(&recorder.buffer));
    // A cancel that came as the run was parking ends it here: once parked, no engine would
    // hear it.
    if result.status == RunStatus::Waiting && cancel.is_cancelled() {
        result.status = RunStatus::Cancelled;
        result.error = Some("the run was cancelled".to_owned());
        held.replace(crate::event::RunEvent::RunFinished {
            run_id: run.id.clone(),
            status: result.status,
            error: result.error.clone(),
        });
    }
    if result.status == RunStatus::Waiting {
        let spent = (result.finished_at - result.started_at)
            .to_std()
            .unwrap_or_default();
        let before = run.parked.as_ref().map_or(0, |p| p.active_ms);
        let park = Park {
            parked: Parked {
                waits: result.waits,
                active_ms: before.saturating_add(u64::try_from(spent.as_millis()).unwrap_or(0)),
                epoch,
            },
            steps,
        };
        let parked = runs.park(&run.id, epoch, park).await?;
        held.release();
        return Ok(parked);
    }
    let output = match (&offload, result.output) {
        (Some(offload), Some(output)) => Some(offload.store("output", output).await?),
        (_, output) => output,
    };
    let mut outcome = RunOutcome {
        status: result.status,
        output,
        error: result.error,
        steps,
        then: None,
    };
    // Only a failed end looks for a handler (not every run's end, on the hot path).
    if outcome.status.is_final() && outcome.status != RunStatus::Succeeded {
        // The step whose failure ended the run: failed, and not carried on (`on_error`).
        let node = result
            .steps
            .iter()
            .find(|s| s.status == crate::run::StepStatus::Failed && s.output.is_none())
            .map(|s| s.node.clone());
        let handler = plan.on_failure().or(options.on_failure.as_deref());
        outcome.then = failure_handler(engine, handler, run, &outcome, node.as_deref()).await?;
    }
    let finished = runs.finish(&run.id, epoch, outcome).await?;
    held.release();
    Ok(finished)
}

/// The failure handler's run for `run`, which ends as `outcome` says, to store with that end
/// ([`RunOutcome::then`]): for a run that ends `failed` or `timed_out`, a queued run of
/// `handler` (the flow's `settings.on_failure`, else the server's default) at its latest
/// version, with input `{"run_id", "flow_id", "flow_version", "status", "error", "node",
/// "input"}` (`node`: the step whose failure ended the run, `null` for a time-out) and the
/// trigger `{"type": "failure", "run_id"}`. Its id is [`RunId::failure_handler`]. `None` for
/// another end, without a handler, or for a run a failure handler started: a handler's failure
/// starts no handler. A handler flow that is not there, or that cannot be read, starts
/// nothing (logged): the run ends all the same.
pub async fn failure_handler(
    engine: &Engine,
    handler: Option<&str>,
    run: &RunRecord,
    outcome: &RunOutcome,
    node: Option<&str>,
) -> Result<Option<NewRun>, StoreError> {
    let failed = matches!(outcome.status, RunStatus::Failed | RunStatus::TimedOut);
    let by_handler = run.trigger.as_ref().is_some_and(|t| t["type"] == "failure");
    let Some(flow_id) = handler.filter(|_| failed && !by_handler) else {
        return Ok(None);
    };
    let flow = match engine.flow_store().get(flow_id, None).await {
        Ok(flow) => flow,
        Err(StoreError::NotFound { .. }) => {
            tracing::warn!(run_id = %run.id, handler = flow_id, "the failure handler flow does not exist; no handler starts");
            return Ok(None);
        }
        // The run ends all the same: not ending it would leave it to a lease's lapse and an
        // execution again, side effects and all, which is worse than a handler not started.
        Err(e) => {
            tracing::error!(run_id = %run.id, handler = flow_id, error = %e, "the failure handler flow could not be read; no handler starts");
            return Ok(None);
        }
    };
    let node = node.filter(|_| outcome.status == RunStatus::Failed);
    let input = serde_json::json!({
        "run_id": run.id,
        "flow_id": run.flow_id,
        "flow_version": run.flow_version,
        "status": outcome.status,
        "error": outcome.error,
        "node": node,
        "input": run.input,
    });
    // Its place in the queue, from its own flow's settings; one that cannot be rendered
    // leaves the handler unkeyed, at the default priority, rather than not started.
    let input = Arc::new(input);
    let (concurrency, priority) = match engine
        .compile_stored(&flow)
        .map_err(|e| e.to_string())
        .and_then(|plan| plan.placement(&input))
    {
        Ok(placement) => placement,
        Err(e) => {
            tracing::warn!(run_id = %run.id, handler = flow_id, error = %e, "the failure handler's concurrency key or priority could not be rendered; it starts without them");
            (None, crate::ports::DEFAULT_PRIORITY)
        }
    };
    Ok(Some(NewRun {
        id: run.id.failure_handler(),
        trigger: Some(serde_json::json!({"type": "failure", "run_id": run.id})),
        concurrency,
        priority,
        ..NewRun::new(flow_id, flow.version, Arc::unwrap_or_clone(input))
    }))
}

/// The signals of the run one execution holds: taken through the run store, with its lease.
struct Inbox {
    runs: Arc<dyn RunStore>,
    run_id: RunId,
    epoch: u64,
}

#[async_trait]
impl SignalInbox for Inbox {
    async fn take(&self, node: &str, name: &str) -> Result<Option<Value>, StoreError> {
        self.runs
            .take_signal(
                &self.run_id,
                SignalTake {
                    epoch: self.epoch,
                    node,
                    name,
                },
            )
            .await
    }
}

/// Passes a run's events on, except `run_finished` and `run_waiting`, which wait for
/// [`HeldFinish::release`]: they go out once the store says so.
struct HeldFinish {
    inner: Option<Arc<dyn EventSink>>,
    finished: Arc<Mutex<Option<crate::event::RunEvent>>>,
}

impl HeldFinish {
    fn new(inner: Option<Arc<dyn EventSink>>) -> Self {
        Self {
            inner,
            finished: Arc::default(),
        }
    }

    fn sink(&self) -> Option<Arc<dyn EventSink>> {
        let inner = self.inner.clone()?;
        let finished = self.finished.clone();
        Some(Arc::new(move |event: &crate::event::RunEvent| {
            if matches!(
                event,
                crate::event::RunEvent::RunFinished { .. }
                    | crate::event::RunEvent::RunWaiting { .. }
            ) {
                *lock(&finished) = Some(event.clone());
            } else {
                inner.emit(event);
            }
        }))
    }

    /// Holds `event` instead of what was held.
    fn replace(&self, event: crate::event::RunEvent) {
        if self.inner.is_some() {
            *lock(&self.finished) = Some(event);
        }
    }

    fn release(&self) {
        if let (Some(inner), Some(event)) = (&self.inner, lock(&self.finished).take()) {
            inner.emit(&event);
        }
    }
}

/// Large outputs go to the blob store; the run store keeps a reference.
#[derive(Clone)]
struct Offload {
    blobs: Arc<dyn BlobStore>,
    over: usize,
    run_id: RunId,
}

impl Offload {
    /// `value`, or a `{"$blob": key, "size": n}` reference when it is larger than the limit.
    async fn store(&self, name: &str, value: Value) -> Result<Value, StoreError> {
        if matches!(value, Value::Null | Value::Bool(_) | Value::Number(_)) {
            return Ok(value);
        }
        let bytes =
            serde_json::to_vec(&value).map_err(|e| StoreError::backend("encoding an output", e))?;
        if bytes.len() <= self.over {
            return Ok(value);
        }
        let key = format!("runs/{}/{name}.json", self.run_id);
        let size = bytes.len();
        self.blobs.put(&key, bytes).await?;
        Ok(serde_json::json!({ BLOB_REF: key, "size": size }))
    }
}

/// An output of an earlier run carried into run `run_id` (a rerun's kept step `name`), as that
/// run stores it: one that went to the blob store is copied under `run_id`'s prefix (the
/// earlier run's blobs go with it), byte for byte; one inline and larger than `over` goes
/// there too; a smaller one stays inline.
pub async fn carry_output(
    value: &Value,
    blobs: &Arc<dyn BlobStore>,
    run_id: &RunId,
    name: &str,
    over: usize,
) -> Result<Value, StoreError> {
    let key = format!("runs/{run_id}/{name}.json");
    let reference = value
        .as_object()
        .filter(|o| o.len() == 2 && o.contains_key("size"))
        .and_then(|o| o.get(BLOB_REF))
        .and_then(Value::as_str);
    if let Some(from) = reference {
        let bytes = blobs.get(from).await?;
        let size = bytes.len();
        blobs.put(&key, bytes).await?;
        return Ok(serde_json::json!({ BLOB_REF: key, "size": size }));
    }
    let offload = Offload {
        blobs: blobs.clone(),
        over,
        run_id: run_id.clone(),
    };
    offload.store(name, value.clone()).await
}

/// The field that marks an output kept in the blob store.
pub const BLOB_REF: &str = "$blob";

/// An output as stored, with a blob reference (`{"$blob": key, "size": n}`) replaced by the
/// value it points to. Readers of stored runs (the API) call this before showing an output.
pub async fn resolve(value: &Value, blobs: &dyn BlobStore) -> Result<Value, StoreError> {
    match value
        .as_object()
        .and_then(|o| o.get(BLOB_REF))
        .and_then(Value::as_str)
    {
        Some(key)
            if value
                .as_object()
                .is_some_and(|o| o.len() == 2 && o.contains_key("size")) =>
        {
            let bytes = blobs.get(key).await?;
            serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::backend("decoding an offloaded output", e))
        }
        _ => Ok(value.clone()),
    }
}

/// Renews the lease and flushes buffered steps until aborted. Losing the lease cancels the run:
/// when the store says another owner took it, and when the lease lapses by this process's clock
/// without a renewal (the store unreachable, or too slow): from then on another worker may
/// claim the run, and this one must not start anything more. It stops a tenth of the lease
/// before the expiry it last wrote, a margin for the other processes' clocks.
async fn keep(
    recorder: Arc<Recorder>,
    ttl: Duration,
    expires_at: Option<DateTime<Utc>>,
    cancel: CancellationToken,
) {
    let renew_every = (ttl / 3).max(Duration::from_millis(10));
    let flush_every = match recorder.checkpoint {
        Checkpoint::Batched(d) => d.max(Duration::from_millis(1)),
        Checkpoint::EveryStep => renew_every,
    };
    let margin = ttl / 10;
    let held_until = |expires_at: DateTime<Utc>| {
        let left = (expires_at - Utc::now()).to_std().unwrap_or_default();
        tokio::time::Instant::now() + left.saturating_sub(margin)
    };
    let mut held = expires_at.map_or_else(
        || tokio::time::Instant::now() + ttl.saturating_sub(margin),
        held_until,
    );
    let mut renew = tokio::time::interval(renew_every);
    let mut flush = tokio::time::interval(flush_every);
    renew.tick().await;
    flush.tick().await;
    loop {
        let next = async {
            tokio::select! {
                _ = renew.tick() => recorder
                    .runs
                    .renew(&recorder.run_id, recorder.epoch, ttl)
                    .await
                    .map(|lease| Some(held_until(lease.expires_at))),
                _ = flush.tick() => recorder.flush().await.map(|()| None),
            }
        };
        let outcome = match tokio::time::timeout_at(held, next).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!(run_id = %recorder.run_id, "the lease lapsed without a renewal: stopping the run");
                recorder.lost.cancel();
                cancel.cancel();
                return;
            }
        };
        match outcome {
            Ok(Some(renewed)) => held = renewed,
            Ok(None) => {}
            Err(StoreError::StaleLease(_)) => {
                recorder.lost.cancel();
                cancel.cancel();
                return;
            }
            // The store is unreachable: keep trying while the lease holds.
            Err(e) => {
                tracing::warn!(run_id = %recorder.run_id, error = %e, "lease renewal or checkpoint failed");
            }
        }
    }
}

struct Recorder {
    runs: Arc<dyn RunStore>,
    run_id: RunId,
    epoch: u64,
    checkpoint: Checkpoint,
    buffer: Mutex<Vec<StepRecord>>,
    lost: CancellationToken,
    offload: Option<Offload>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Recorder {
    async fn flush(&self) -> Result<(), StoreError> {
        let steps = std::mem::take(&mut *lock(&self.buffer));
        if steps.is_empty() {
            return Ok(());
        }
        match self
            .runs
            .record_steps(&self.run_id, self.epoch, &steps)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                // Put them back (before newer ones) so that a later flush or the finish writes them.
                let mut buffer = lock(&self.buffer);
                let newer = std::mem::replace(&mut *buffer, steps);
                buffer.extend(newer);
                Err(e)
            }
        }
    }
}

impl Recorder {
    fn check_held(&self) -> Result<(), StoreError> {
        if self.lost.is_cancelled() {
            return Err(StoreError::StaleLease(format!(
                "run `{}` was taken over by another worker",
                self.run_id
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl StepRecorder for Recorder {
    async fn record_items(&self, _run_id: &RunId, mut batch: ItemBatch) -> Result<(), StoreError> {
        self.check_held()?;
        // The steps before the map are written first: a resumed run then finds them with
        // the items.
        self.flush().await?;
        if let Some(offload) = &self.offload {
            for (index, value) in &mut batch.items {
                // The epoch in the key: a worker that lost the run cannot write over the blob
                // that the new owner's checkpoint points to.
                let name = format!("items/{}/{index}.{}", batch.node, self.epoch);
                *value = Arc::new(offload.store(&name, (**value).clone()).await?);
            }
        }
        self.runs
            .record_items(&self.run_id, self.epoch, &batch)
            .await
    }

    async fn items(&self, _run_id: &RunId, node: &str) -> Result<Vec<(u32, Value)>, StoreError> {
        let mut items = self.runs.items(&self.run_id, node).await?;
        if let Some(offload) = &self.offload {
            for (_, value) in &mut items {
                *value = resolve(value, offload.blobs.as_ref()).await?;
            }
        }
        Ok(items)
    }

    async fn record_step(&self, _run_id: &RunId, step: &StepRecord) -> Result<(), StoreError> {
        self.check_held()?;
        let mut step = step.clone();
        if let (Some(offload), Some(output)) = (&self.offload, &step.output) {
            let stored = offload
                .store(&format!("steps/{}", step.node), (**output).clone())
                .await?;
            step.output = Some(Arc::new(stored));
        }
        match self.checkpoint {
            Checkpoint::EveryStep => {
                self.runs
                    .record_steps(&self.run_id, self.epoch, std::slice::from_ref(&step))
                    .await
            }
            Checkpoint::Batched(_) => {
                lock(&self.buffer).push(step);
                Ok(())
            }
        }
    }
}
