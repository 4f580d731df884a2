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
        // both jobs may come in one batch) is done with: its run is in hand.
        let mut fresh = Vec::with_capacity(jobs.len());
        for job in jobs {
            match state.running.enter(&job.job.run_id) {
                Some(slot) => fresh.push((job, slot)),
                None => {
                    let _ = queue.ack(&job).await;
                }
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

/// Executes the run of a leased job, claimed by [`work`] (`None`: finished, cancelled or owned
/// by a live worker, so nothing to do for this delivery; an error: the claim failed).
async fn run_job(
    state: &AppState,
    job: LeasedJob,
    ttl: Duration,
    slot: Slot,
    claim: Result<Option<RunRecord>, Arc<StoreError>>,
) {
    // Keep the job's lease while the run executes.
    let heartbeat = {
        let (queue, job) = (state.stores.queue.clone(), job.clone());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                if queue.heartbeat(&job, ttl).await.is_err() {
                    return;
                }
            }
        }))
    };
    let outcome = match claim {
        Ok(Some(run)) => match lifecycle::execute(state, run, slot).await {
            // Handed back by a shutdown: due again at once, for another worker.
            Ok(done) if done.status == RunStatus::Queued => {
                drop(heartbeat);
                let _ = state.stores.queue.nack(&job, None).await;
                return;
            }
            // Done, or another owner took it over: this delivery is over.
            Ok(_) | Err(RunError::Store(StoreError::StaleLease(_))) => Ok(()),
            Err(e) => Err(e.to_string()),
        },
        Ok(None) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    drop(heartbeat);
    match outcome {
        Ok(()) => {
            let _ = state.stores.queue.ack(&job).await;
        }
        Err(error) => {
            tracing::warn!(run_id = %job.job.run_id, %error, "run failed to execute; retrying later");
            let _ = state
                .stores
                .queue
                .nack(
                    &job,
                    Some(chrono::Utc::now() + chrono::Duration::seconds(5)),
                )
                .await;
        }
    }
}
