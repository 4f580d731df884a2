//! Executing runs: inline for the `all` role's waited runs, and from the queue for `all` and
//! `worker`. Both go through `flowcore::durable::execute`, so every run is checkpointed,
//! leased and resumable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowcore::durable::{self, Checkpoint, DurableOptions, Hooks};
use flowcore::ports::{LeasedJob, RunRecord, RunStore};
use flowcore::{CancellationToken, RunId, StoreError};

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
    /// [`insert`](Self::insert) unless the run is registered here already (another delivery
    /// of its job): then `None`, and the registration is left alone.
    pub fn try_insert(&self, id: &RunId) -> Option<CancellationToken> {
        let mut runs = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if runs.contains_key(id) {
            return None;
        }
        let token = CancellationToken::new();
        runs.insert(id.clone(), token.clone());
        Some(token)
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
        lease_ttl: state.config.lease(),
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

/// Fails a queued run, or a running one whose lease lapsed, with `error` (claimed first, so
/// that a worker that took it meanwhile is left alone). Returns whether it was failed here.
pub async fn fail_run(state: &AppState, id: &RunId, error: String) -> Result<bool, StoreError> {
    let lease =
        match RunStore::claim(&state.sql, id, &state.worker_name, state.config.lease()).await {
            Ok(lease) => lease,
            // Someone took it meanwhile, or it ended.
            Err(StoreError::Conflict(_) | StoreError::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
    let outcome = flowcore::ports::RunOutcome {
        status: flowcore::RunStatus::Failed,
        error: Some(error),
        ..Default::default()
    };
    let failed = RunStore::finish(&state.sql, id, lease.epoch, outcome).await?;
    announce_finished(state, &failed).await;
    Ok(true)
}

/// Fails a run that [`MAX_OWNERS`] workers lost in a row.
async fn give_up(state: &AppState, run: &RunRecord) -> Result<(), StoreError> {
    let error = format!(
        "the run was lost by {} workers in a row (their leases lapsed); not retried again",
        run.epoch
    );
    if fail_run(state, &run.id, error).await? {
        tracing::warn!(run_id = %run.id, "a run lost by too many workers was failed");
    }
    Ok(())
}

/// Tells every process that a run ended (its end is stored, as in `run`), waking the requests
/// waiting for it with its end; a lost announcement only delays them until they read the store.
pub async fn announce_finished(state: &AppState, run: &RunRecord) {
    if let Err(e) = state.signals.finished(&run.id, run.end().as_ref()).await {
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
    let found = RunStore::expired(&state.sql, after, now, LAPSED_PER_PASS).await?;
    // A full page: the next pass goes on from its last expiry (a full look: looks again).
    let next_since = match (found.len() >= LAPSED_PER_PASS, full) {
        (false, _) => Some(now),
        (true, true) => None,
        (true, false) => found.last().and_then(|(_, at)| *at).or(lapsed.since),
    };
    let mut ids: Vec<RunId> = found.into_iter().map(|(id, _)| id).collect();
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
        if recent.contains_key(&id) {
            continue;
        }
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
    let mut filter = flowcore::ports::RunFilter {
        status: Some(flowcore::RunStatus::Queued),
        limit: 500,
        ..Default::default()
    };
    let mut found = Vec::new();
    // Newest first: skip the young ones, stop at the ones swept before.
    'pages: loop {
        let page = RunStore::list(&state.sql, &filter).await?;
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

/// Recovers runs (see [`recover`]) at start and every `every` until `shutdown`: the queued
/// ones too at start with an in-process queue and whenever the queue lost its jobs, and with a
/// shared queue the queued runs left without a job (see [`orphans`]).
pub async fn reap(state: Arc<AppState>, every: Duration, shutdown: CancellationToken) {
    let mut recent = HashMap::new();
    let mut lapsed = Lapsed::default();
    let losses = state.queue.losses();
    let (mut handled, mut first) = (0, true);
    let mut swept = chrono::Utc::now()
        - chrono::Duration::from_std(ORPHANS_BEFORE_START).unwrap_or(chrono::Duration::MAX);
    loop {
        let lost = losses.as_ref().map_or(0, |l| *l.borrow());
        let queued_too = (first && state.config.redis_url.is_none()) || lost > handled;
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
        if state.config.redis_url.is_some() {
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
        }
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
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Result<RunRecord, StoreError> {
    let done = execute(state, run, token).await;
    drop(slot);
    let done = done?;
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
    let sink = state.metrics.node_sink(&plan, state.event_sink.clone());
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
        &state.run_store,
        run,
        &durable_options(state),
        hooks,
    )
    .await;
    let status = result
        .as_ref()
        .map_or(flowcore::RunStatus::Failed, |r| r.status);
    if let Ok(done) = &result
        && done.status.is_final()
    {
        announce_finished(state, done).await;
    }
    state
        .metrics
        .run_finished(status, started.elapsed().as_secs_f64());
    state.running.remove(&run.id);
    result
}

/// Takes runs from the queue and executes them, `WORKER_CONCURRENCY` at a time, until
/// `shutdown` fires.
pub async fn work(state: Arc<AppState>, shutdown: CancellationToken) {
    // Shared with the runs requests execute themselves.
    let slots = state.admission.slots().clone();
    let ttl = state.config.lease();
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
            lease = state.queue.lease(&state.config.worker_group, free, ttl, Duration::from_secs(1)) => lease,
        };
        let jobs = match lease {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(error = %e, "leasing jobs failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // Registered before they are claimed, so that a cancel arriving in between is not lost.
        // A job of a run that executes here already (the sweep may enqueue a run twice, and
        // both jobs may come in one batch) is done with: its run is in hand.
        let mut fresh = Vec::with_capacity(jobs.len());
        for job in jobs {
            match state.running.try_insert(&job.job.run_id) {
                Some(token) => fresh.push((job, token)),
                None => {
                    let _ = state.queue.ack(&job).await;
                }
            }
        }
        if fresh.is_empty() {
            continue;
        }
        // One statement for the whole batch where the database can.
        let ids: Vec<RunId> = fresh.iter().map(|(j, _)| j.job.run_id.clone()).collect();
        let claimed = RunStore::claim_runs(&state.sql, &ids, &state.worker_name, ttl).await;
        let mut claimed = match claimed {
            Ok(runs) => Ok(runs
                .into_iter()
                .map(|r| (r.id.clone(), r))
                .collect::<HashMap<_, _>>()),
            Err(e) => Err(e.to_string()),
        };
        for (job, token) in fresh {
            let claim = match &mut claimed {
                Ok(runs) => Ok(runs.remove(&job.job.run_id)),
                Err(e) => Err(e.clone()),
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                run_job(&state, job, ttl, token, claim).await;
                drop(permit);
            });
        }
    }
}

/// Executes the run of a leased job, claimed by [`work`] (`None`: finished, cancelled or owned
/// by a live worker, so nothing to do for this delivery; an error: the claim failed).
async fn run_job(
    state: &AppState,
    job: LeasedJob,
    ttl: Duration,
    token: CancellationToken,
    claim: Result<Option<RunRecord>, String>,
) {
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
    let outcome = match claim {
        Ok(Some(run)) => match execute(state, run, token).await {
            // Handed back by a shutdown: due again at once, for another worker.
            Ok(done) if done.status == flowcore::RunStatus::Queued => {
                heartbeat.abort();
                let _ = state.queue.nack(&job, None).await;
                return;
            }
            // Done, or another owner took it over: this delivery is over.
            Ok(_) | Err(StoreError::StaleLease(_)) => Ok(()),
            Err(e) => Err(e.to_string()),
        },
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    heartbeat.abort();
    state.running.remove(&run_id);
    match outcome {
        Ok(()) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_delivery_of_a_run_here_leaves_its_registration_alone() {
        let running = Running::default();
        let id = RunId::new();
        let first = running.try_insert(&id).expect("registered");
        assert!(running.try_insert(&id).is_none(), "already here");
        assert!(running.cancel(&id));
        assert!(
            first.is_cancelled(),
            "a cancel reaches the first registration"
        );
        running.remove(&id);
        assert!(running.try_insert(&id).is_some(), "free again once removed");
    }
}
