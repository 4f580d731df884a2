//! The worker loop (`all` and `worker` roles): takes jobs from the queue of its worker group,
//! claims their runs in one batch, and executes each through [`lifecycle::execute`] in one of
//! the process's `WORKER_CONCURRENCY` slots (shared with the runs requests execute themselves).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flowcore::ports::{Claim, LeasedJob, RunRecord, Take};
use flowcore::{CancellationToken, RunId, RunStatus, StoreError};

use crate::lifecycle::{self, RunError};
use crate::running::Slot;
use crate::state::{AppState, Shared};

/// Takes runs from the queue and executes them, `WORKER_CONCURRENCY` at a time, until
/// `shutdown` fires.
pub async fn work(state: Shared, shutdown: CancellationToken) {
    let slots = state.admission.slots().clone();
    let ttl = state.config.lease();
    let queue = &state.stores.queue;
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
            lease = queue.lease(&state.config.worker_group, Take { max: free, ttl, wait: Duration::from_secs(1) }) => lease,
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
        // both jobs may come in one batch; or this job's lease lapsed under its execution) is
        // left to lapse, not acked: it may hold the concurrency slot of the execution in hand.
        // It comes back after a lease, and is acked then if the run has ended.
        let mut fresh = Vec::with_capacity(jobs.len());
        for job in jobs {
            if let Some(slot) = state.running.enter(&job.job.run_id) {
                fresh.push((job, slot));
            }
        }
        if fresh.is_empty() {
            continue;
        }
        // One statement for the whole batch where the database can.
        let ids: Vec<RunId> = fresh.iter().map(|(j, _)| j.job.run_id.clone()).collect();
        let mut claimed = state
            .stores
            .runs
            .claim_runs(
                &ids,
                &Claim {
                    owner: state.worker_name.clone(),
                    ttl,
                },
            )
            .await
            .map(|runs| {
                runs.into_iter()
                    .map(|r| (r.id.clone(), r))
                    .collect::<HashMap<_, _>>()
            })
            .map_err(Arc::new);
        for (job, slot) in fresh {
            let claim = match &mut claimed {
                Ok(runs) => Ok(runs.remove(&job.job.run_id)),
                Err(e) => Err(e.clone()),
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                run_job(&state, job, ttl, slot, claim).await;
                drop(permit);
            });
        }
    }
}

/// Whether run `id`, whose claim was just refused, is still unfinished: running (under a live
/// lease, which may be this process's own: a run whose execution here failed keeps it until it
/// lapses) or queued. Running under a lease that lapsed counts too: the claim was refused while
/// the lease of a worker that died still held, and the lease lapsed before this read. The job
/// must then not be acked, which would free a concurrency key's slot under the unfinished run:
/// it comes back after a lease, and claims the run then. A run that could not be read counts
/// as unfinished too; only one that is gone does not.
async fn unfinished(state: &AppState, id: &RunId) -> bool {
    match state.stores.runs.get(id).await {
        Ok(run) => matches!(run.status, RunStatus::Running | RunStatus::Queued),
        Err(StoreError::NotFound { .. }) => false,
        Err(_) => true,
    }
}

/// Whether a claim failed because the run store is away (its answer may come back).
fn outage(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Unavailable { .. } | StoreError::Backend { .. }
    )
}

/// How long a worker tries to claim a job's run again through a store failure that is not a
/// plain outage (a `Backend` error may be one, or may stay); an outage is waited out.
const CLAIM_THROUGH_BACKEND_ERRORS: Duration = Duration::from_secs(60);

/// Claims run `id` again and again while the run store fails, keeping the job (its lease is
/// heartbeated meanwhile), until the claim is answered, a process shutdown hands the job back,
/// or a non-outage error lasts [`CLAIM_THROUGH_BACKEND_ERRORS`].
///
/// Giving the job back to the queue instead would spend one of its deliveries each time: a
/// job that runs out of them is dead-lettered, and its run (queued, older than the orphan
/// sweep's look) would wait forever. A database failover of a minute did just that.
async fn claim_through(
    state: &AppState,
    id: &RunId,
    ttl: Duration,
) -> Result<Option<RunRecord>, Arc<StoreError>> {
    let started = std::time::Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        tokio::select! {
            () = state.hand_back.cancelled() => {
                return Err(Arc::new(StoreError::Unavailable {
                    message: "handed back while the run store was away".into(),
                    source: None,
                }));
            }
            () = tokio::time::sleep(wait) => {}
        }
        let claimed = state
            .stores
            .runs
            .claim_run(id, &state.worker_name, ttl)
            .await;
        match claimed {
            Ok(run) => return Ok(Some(run)),
            Err(StoreError::Conflict(_) | StoreError::NotFound { .. }) => return Ok(None),
            Err(e @ StoreError::Backend { .. })
                if started.elapsed() >= CLAIM_THROUGH_BACKEND_ERRORS =>
            {
                return Err(Arc::new(e));
            }
            Err(e) if outage(&e) => {
                tracing::debug!(run_id = %id, error = %e, "claiming a run failed; trying again");
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(Arc::new(e)),
        }
    }
}

/// Executes the run of a leased job, claimed by [`work`] (`None`: finished, cancelled or owned
/// by a live worker, so nothing to do for this delivery; an error: the claim failed).
async fn run_job(
    state: &AppState,
    job: LeasedJob,
    ttl: Duration,
    slot: Slot,
    claim: Result<Option<RunRecord>, Arc<StoreError>>,
) {
    // Keep the job's lease while the run executes: through a queue that fails for a while
    // too (the lease, and a concurrency key's slot with it, must not lapse under a run that
    // goes on); only a delivery taken over is given up.
    let heartbeat = {
        let (queue, job) = (state.stores.queue.clone(), job.clone());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut wait = ttl / 3;
            loop {
                tokio::time::sleep(wait).await;
                wait = match queue.heartbeat(&job, ttl).await {
                    Ok(()) => ttl / 3,
                    Err(StoreError::StaleLease(_)) => return,
                    // Sooner, while the lease lasts.
                    Err(e) => {
                        tracing::warn!(run_id = %job.job.run_id, error = %e, "a job's heartbeat failed; retrying");
                        (ttl / 10).max(Duration::from_millis(100))
                    }
                };
            }
        }))
    };
    let claim = match claim {
        Err(e) if outage(&e) => claim_through(state, &job.job.run_id, ttl).await,
        claim => claim,
    };
    let delivery = match claim {
        // Too many workers lost it: something in it kills them. Ended here, under the claim
        // just taken (the reaper ends those it finds lapsed; this one did not lapse long enough
        // to be seen).
        Ok(Some(run)) if lifecycle::lost_too_often(&run) => {
            match lifecycle::give_up_claimed(state, run).await {
                Ok(()) => Delivery::Done,
                Err(e) => Delivery::FailedKeepingSlot(e.to_string()),
            }
        }
        Ok(Some(run)) => {
            let keyed = run.concurrency.is_some();
            match lifecycle::execute(state, run, slot).await {
                // Handed back by a shutdown: due again at once, for another worker.
                Ok(done) if done.status == RunStatus::Queued => Delivery::Again,
                Ok(_) => Delivery::Done,
                // This process lost the run's lease (another worker took it over, or the
                // lease could not be renewed in time). The run may be unfinished: for a keyed
                // run, acking would free its concurrency slot under it, for the next run of its
                // key. Its job is left to lapse and come back, and is acked then if the run has
                // ended. Another job stands for an unkeyed run (the reaper's).
                Err(RunError::Store(StoreError::StaleLease(_))) if keyed => Delivery::Lapse,
                Err(RunError::Store(StoreError::StaleLease(_))) => Delivery::Done,
                Err(e) if keyed => Delivery::FailedKeepingSlot(e.to_string()),
                Err(e) => Delivery::Failed(e.to_string()),
            }
        }
        // Handed back while the store was away.
        Err(e) if outage(&e) && state.hand_back.is_cancelled() => Delivery::Again,
        // Another worker executes the run (this job's lease lapsed under it, or the job is a
        // second one of the run), or did until it died a moment ago: acking would free the
        // concurrency slot the run holds. By the time the job comes back, the run has ended, or
        // its owner is gone and it is claimed.
        Ok(None) if unfinished(state, &job.job.run_id).await => Delivery::Lapse,
        Ok(None) => Delivery::Done,
        // The run is not known here, nor whether it has a key: its job keeps any slot.
        Err(e) => Delivery::FailedKeepingSlot(e.to_string()),
    };
    drop(heartbeat);
    let queue = &state.stores.queue;
    match delivery {
        Delivery::Done => {
            let _ = queue.ack(&job).await;
        }
        Delivery::Again => {
            let _ = queue.nack(&job, None).await;
        }
        Delivery::Lapse => {}
        Delivery::FailedKeepingSlot(error) => {
            tracing::warn!(run_id = %job.job.run_id, %error, "run failed to execute; retrying after its lease");
        }
        Delivery::Failed(error) => {
            tracing::warn!(run_id = %job.job.run_id, %error, "run failed to execute; retrying later");
            let due = chrono::Utc::now() + chrono::Duration::seconds(5);
            let _ = queue.nack(&job, Some(due)).await;
        }
    }
}

/// What becomes of a job's delivery once [`run_job`] is done with it.
enum Delivery {
    /// Over: acked (which frees a concurrency key's slot).
    Done,
    /// Given back, due again at once for another worker (a shutdown handed the run back).
    Again,
    /// Left alone: its lease lapses and the job comes back then. A job that holds a
    /// concurrency key's slot keeps it meanwhile (the queue never dead-letters such a job).
    Lapse,
    /// The run failed to execute and keeps its slot: left to lapse, as [`Delivery::Lapse`]. A
    /// nack to later would give the slot to the next run of the key while this one has steps
    /// done.
    FailedKeepingSlot(String),
    /// The run (without a concurrency key) failed to execute: given back, due in 5 seconds.
    Failed(String),
}
