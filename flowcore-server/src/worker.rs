//! Executing runs: inline for the `all` role's waited runs, and from the queue for `all` and
//! `worker`. Both go through `flowcore::durable::execute`, so every run is checkpointed,
//! leased and resumable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowcore::durable::{self, Checkpoint, DurableOptions, Hooks};
use flowcore::ports::{BusSink, EventBus, LeasedJob, RunRecord, RunStore};
use flowcore::{CancellationToken, RunId, StoreError};
use tokio::sync::Semaphore;

use crate::app::AppState;

/// Runs executing in this process, so that a cancel can reach them.
#[derive(Debug, Default)]
pub struct Running(Mutex<HashMap<RunId, CancellationToken>>);

impl Running {
    /// Registers a run about to execute here (before it is claimed, so that a cancel arriving
    /// in between is not lost) and returns its token.
    pub fn insert(&self, id: &RunId) -> CancellationToken {
        let token = CancellationToken::new();
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.clone(), token.clone());
        token
    }
    /// Forgets a run.
    pub fn remove(&self, id: &RunId) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }
    /// How many runs execute here.
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
    /// Whether no run executes here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Cancels a run executing here; `false` when it is not here.
    pub fn cancel(&self, id: &RunId) -> bool {
        match self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
        {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

/// The durable options of this process's runs.
pub fn durable_options(state: &AppState) -> DurableOptions {
    DurableOptions {
        // Batched checkpoints: a fast run costs two commits; a longer one is checkpointed every
        // 200 ms.
        checkpoint: Checkpoint::Batched(Duration::from_millis(200)),
        blobs: Some(Arc::new(state.blobs.clone())),
        ..DurableOptions::new(state.worker_name.clone())
    }
}

/// Executes a run this process holds (its lease is ours) to its end; `token` is its entry in
/// [`AppState::running`](crate::app::AppState), removed at the end.
pub async fn execute(
    state: &AppState,
    run: RunRecord,
    token: CancellationToken,
) -> Result<RunRecord, StoreError> {
    let result = execute_inner(state, &run, token).await;
    state.running.remove(&run.id);
    result
}

/// After this many owners lost a run (their leases lapsed), the run is failed instead of being
/// handed to another worker: something in it kills workers.
pub const MAX_OWNERS: u64 = 5;

/// Fails a run that [`MAX_OWNERS`] workers lost in a row.
async fn give_up(state: &AppState, run: &RunRecord) -> Result<(), StoreError> {
    let lease = match RunStore::claim(
        &state.sql,
        &run.id,
        &state.worker_name,
        Duration::from_secs(30),
    )
    .await
    {
        Ok(lease) => lease,
        // Someone took it meanwhile, or it ended.
        Err(StoreError::Conflict(_) | StoreError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let outcome = flowcore::ports::RunOutcome {
        status: flowcore::RunStatus::Failed,
        error: Some(format!(
            "the run was lost by {} workers in a row (their leases lapsed); not retried again",
            run.epoch
        )),
        ..Default::default()
    };
    RunStore::finish(&state.sql, &run.id, lease.epoch, outcome).await?;
    tracing::warn!(run_id = %run.id, "a run lost by too many workers was failed");
    Ok(())
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

/// Puts back in the queue the runs whose owner is gone (lease expired), and with
/// `queued_too` every run waiting in the database (an in-process queue starts empty after a
/// restart). A run already in the queue is delivered again at worst, and its claim refused.
/// Returns how many runs were enqueued.
pub async fn recover(state: &AppState, queued_too: bool) -> Result<usize, StoreError> {
    let mut ids: Vec<RunId> = RunStore::expired(&state.sql, chrono::Utc::now(), 1000).await?;
    if queued_too {
        let mut filter = flowcore::ports::RunFilter {
            status: Some(flowcore::RunStatus::Queued),
            limit: 500,
            ..Default::default()
        };
        loop {
            let page = RunStore::list(&state.sql, &filter).await?;
            ids.extend(page.items.into_iter().map(|r| r.id));
            match page.next_cursor {
                Some(c) => filter.cursor = Some(c),
                None => break,
            }
        }
    }
    let mut count = 0;
    for id in ids {
        let run = match RunStore::get(&state.sql, &id).await {
            Ok(run) => run,
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        if run.status == flowcore::RunStatus::Running && run.epoch >= MAX_OWNERS {
            give_up(state, &run).await?;
            continue;
        }
        let group = group_of(state, &run).await;
        state.queue.enqueue(&group, &id, None).await?;
        count += 1;
    }
    Ok(count)
}

/// Cancels the runs executing here that any process asks to cancel, until `shutdown`.
pub async fn obey_cancels(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut cancels = state.signals.cancels();
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

/// Recovers runs (see [`recover`]) at start and every `every` until `shutdown`.
pub async fn reap(state: Arc<AppState>, every: Duration, shutdown: CancellationToken) {
    let mut first = true;
    loop {
        let queued_too = first && state.config.redis_url.is_none();
        match recover(&state, queued_too).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "runs recovered into the queue"),
            Err(e) => tracing::warn!(error = %e, "recovering runs failed; retrying"),
        }
        first = false;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// [`execute`] for a run started inline by a request: handed back by a shutdown, it goes to
/// the queue (it was never there).
pub async fn execute_inline(
    state: &AppState,
    run: RunRecord,
    token: CancellationToken,
) -> Result<RunRecord, StoreError> {
    let done = execute(state, run, token).await?;
    if done.status == flowcore::RunStatus::Queued {
        let group = group_of(state, &done).await;
        state.queue.enqueue(&group, &done.id, None).await?;
    }
    Ok(done)
}

async fn execute_inner(
    state: &AppState,
    run: &RunRecord,
    token: CancellationToken,
) -> Result<RunRecord, StoreError> {
    let (_, plan) = state
        .plans
        .get(&run.flow_id, Some(run.flow_version))
        .await
        .map_err(|e| match e {
            flowcore::Error::Store(e) => e,
            other => StoreError::Invalid(other.to_string()),
        })?;
    let runs: Arc<dyn RunStore> = Arc::new(state.sql.clone());
    let events: Arc<dyn EventBus> = state.events.clone();
    let sink = state
        .metrics
        .node_sink(&plan, Arc::new(BusSink::new(events)));
    let hooks = Hooks {
        events: Some(state.usage.node_sink(&run.flow_id, sink)),
        cancel: Some(token),
        hand_back: Some(state.hand_back.clone()),
    };
    let started = std::time::Instant::now();
    state.metrics.run_started();
    let result = durable::execute(
        &state.engine,
        &plan,
        &runs,
        run,
        &durable_options(state),
        hooks,
    )
    .await;
    let status = result
        .as_ref()
        .map_or(flowcore::RunStatus::Failed, |r| r.status);
    state
        .metrics
        .run_finished(status, started.elapsed().as_secs_f64());
    state.running.remove(&run.id);
    result
}

/// Takes runs from the queue and executes them, `WORKER_CONCURRENCY` at a time, until
/// `shutdown` fires.
pub async fn work(state: Arc<AppState>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(state.config.worker_concurrency));
    let ttl = Duration::from_secs(30);
    loop {
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                () = shutdown.cancelled() => return,
                permit = slots.clone().acquire_owned() => drop(permit),
            }
            continue;
        }
        let lease = tokio::select! {
            () = shutdown.cancelled() => return,
            lease = state.queue.lease(&state.config.worker_group, &state.worker_name, free, ttl, Duration::from_secs(1)) => lease,
        };
        let jobs = match lease {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(error = %e, "leasing jobs failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        for job in jobs {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                run_job(&state, job, ttl).await;
                drop(permit);
            });
        }
    }
}

async fn run_job(state: &AppState, job: LeasedJob, ttl: Duration) {
    let run_id = job.job.run_id.clone();
    // Keep the job's lease while the run executes.
    let heartbeat = {
        let (queue, job) = (state.queue.clone(), job.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                if queue.heartbeat(&job, ttl).await.is_err() {
                    return;
                }
            }
        })
    };
    let token = state.running.insert(&run_id);
    let outcome = match RunStore::claim(
        &state.sql,
        &run_id,
        &state.worker_name,
        Duration::from_secs(30),
    )
    .await
    {
        Ok(_) => match RunStore::get(&state.sql, &run_id).await {
            Ok(run) => match execute(state, run, token).await {
                // Handed back by a shutdown: due again at once, for another worker.
                Ok(done) if done.status == flowcore::RunStatus::Queued => {
                    heartbeat.abort();
                    let _ = state.queue.nack(&job, None).await;
                    return;
                }
                other => other.map(|_| ()),
            },
            Err(e) => Err(e),
        },
        // Finished, cancelled or owned by a live worker: nothing to do for this delivery.
        Err(StoreError::Conflict(_) | StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    };
    heartbeat.abort();
    state.running.remove(&run_id);
    match outcome {
        Ok(()) | Err(StoreError::StaleLease(_)) => {
            let _ = state.queue.ack(&job).await;
        }
        Err(e) => {
            tracing::warn!(run_id = %run_id, error = %e, "run failed to execute; retrying later");
            let _ = state
                .queue
                .nack(
                    &job,
                    Some(chrono::Utc::now() + chrono::Duration::seconds(5)),
                )
                .await;
        }
    }
}
