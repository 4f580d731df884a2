//! Retention: finished runs older than their flow's retention, or beyond its count, are
//! deleted with their steps, in small batches with pauses between them so that live traffic
//! gets the database in between, one process at a time (the run store's lock). Queued and
//! running runs are never deleted.

use std::time::Duration;

use chrono::{DateTime, Utc};
use flowcore::ports::{PruneRule, all_flows};
use flowcore::{CancellationToken, Retention, RunId, StoreError};
use futures::StreamExt;

use crate::archive;
use crate::state::{AppState, Shared};

/// How often a process prunes: often, so that each pass is small.
pub const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// How often a pass applies the large counts (`max_count`) too: finding a flow's newest N
/// finished runs reads N index entries. Counts up to [`CHEAP_COUNT`] are applied every pass,
/// so that a minute of runs does not pile up behind them.
pub const COUNT_EVERY: Duration = Duration::from_secs(60);

/// The largest count applied every pass.
const CHEAP_COUNT: u64 = 100_000;

/// Runs deleted by one statement: small enough that no lock is held long.
const BATCH: usize = 200;

/// The least pause between two batches, and between two steps of giving space back. Within
/// [`PRUNE_EVERY`] of its start, a pass follows each batch with a pause as long as the batch
/// took: pruning has at most half of the database's writer (SQLite has one). A pass still
/// running after that is behind what comes in, and goes on with the least pause, so that the
/// database stays bounded (at the cost of throughput while it catches up).
const PAUSE: Duration = Duration::from_millis(20);

/// At most this many steps of giving space back a pass (each about 4 MB on SQLite).
const RECLAIM_STEPS: usize = 256;

/// Prunes as of `now`: each flow with a retention of its own (`settings.retention`, or a
/// server-wide count) by its own rule, then every flow's runs (deleted flows' too) by
/// `FLOWCORE_RUN_RETENTION_DAYS`, but those of the flows that keep them longer. Returns how
/// many runs were deleted.
pub async fn prune_once(
    state: &AppState,
    now: DateTime<Utc>,
) -> Result<usize, flowcore::StoreError> {
    let rules = rules(state).await?;
    prune_pass(state, now, &rules, true).await
}

/// Each flow's own retention, read from the flows (only what pruning needs of them).
async fn rules(state: &AppState) -> Result<Vec<(String, Retention)>, StoreError> {
    Ok(all_flows(state.stores.flows.as_ref())
        .await?
        .into_iter()
        .map(|f| (f.id, f.definition.settings.retention.unwrap_or_default()))
        .collect())
}

/// [`prune_once`], with every count (`max_count`), or only those up to [`CHEAP_COUNT`]
/// (finding a flow's newest N finished runs reads N index entries), and the blob clean-up.
async fn prune_pass(
    state: &AppState,
    now: DateTime<Utc>,
    rules: &[(String, Retention)],
    counts: bool,
) -> Result<usize, flowcore::StoreError> {
    let config = &state.config;
    let days_ago = |days: u32| now - chrono::Duration::days(i64::from(days));
    let default_before =
        (config.run_retention_days > 0).then(|| days_ago(config.run_retention_days));
    let runs = state.stores.runs.as_ref();
    // The flows that keep their runs longer than the default: the default pass leaves them
    // alone. (Only those: a flow that keeps them as long or shorter loses nothing to the
    // default pass, which keeps this list short, and so the default pass's statement.)
    let mut longer = Vec::new();
    let mut pruned = 0;
    for (flow_id, retention) in rules {
        let keep_newest = retention
            .max_count
            .or(config.run_retention_max_count)
            .filter(|keep| counts || *keep <= CHEAP_COUNT);
        if retention.days.is_none() && keep_newest.is_none() {
            continue;
        }
        let rule = PruneRule {
            flow_id: Some(flow_id.clone()),
            before: retention.days.map(days_ago).or(default_before),
            keep_newest,
            ..PruneRule::default()
        };
        pruned += prune(state, &rule).await?;
        if retention
            .days
            .is_some_and(|days| days > config.run_retention_days)
        {
            longer.push(flow_id.clone());
        }
    }
    if let Some(before) = default_before {
        let rule = PruneRule {
            except: longer,
            ..PruneRule::older_than(before)
        };
        if config.archive {
            state.metrics.archive_lag(lag(state, &rule, before).await?);
        }
        pruned += prune(state, &rule).await?;
    }
    state.metrics.runs_pruned(pruned);
    drop_data_pass(state, now, rules).await?;
    // Once a minute (with the counts): the blobs of runs that are gone, or lost their data.
    if counts {
        forget_orphan_blobs(state).await?;
    }
    // The space of what was deleted goes back a step at a time (SQLite), a bounded number of
    // steps a pass.
    if pruned > 0 {
        for _ in 0..RECLAIM_STEPS {
            if !runs.reclaim().await? {
                break;
            }
            tokio::time::sleep(PAUSE).await;
        }
    }
    if let Some(bytes) = runs.stored_bytes().await? {
        state.metrics.database_bytes(bytes);
    }
    Ok(pruned)
}

/// Drops the data of the runs past their data retention (`settings.retention.data_days`, or
/// `FLOWCORE_RUN_DATA_RETENTION_DAYS`): each flow with a rule of its own by it, then every
/// other flow's by the default. Returns how many runs lost their data.
async fn drop_data_pass(
    state: &AppState,
    now: DateTime<Utc>,
    rules: &[(String, Retention)],
) -> Result<usize, StoreError> {
    let default_days = state.config.run_data_retention_days;
    let days_ago = |days: u32| now - chrono::Duration::days(i64::from(days));
    let mut own = Vec::new();
    let mut dropped = 0;
    for (flow_id, retention) in rules {
        let Some(days) = retention.data_days else {
            continue;
        };
        let rule = PruneRule {
            flow_id: Some(flow_id.clone()),
            ..PruneRule::older_than(days_ago(days))
        };
        dropped += in_batches(|| state.stores.runs.drop_data(&rule, BATCH)).await?;
        own.push(flow_id.clone());
    }
    if default_days > 0 {
        let rule = PruneRule {
            except: own,
            ..PruneRule::older_than(days_ago(default_days))
        };
        dropped += in_batches(|| state.stores.runs.drop_data(&rule, BATCH)).await?;
    }
    state.metrics.runs_data_dropped(dropped);
    Ok(dropped)
}

/// Calls `batch` until it returns less than [`BATCH`] runs, pausing between calls as
/// [`prune`] does. Returns how many runs the calls returned.
async fn in_batches<F, Fut>(mut batch: F) -> Result<usize, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<RunId>, StoreError>>,
{
    let pass = std::time::Instant::now();
    let mut total = 0;
    loop {
        let started = std::time::Instant::now();
        let n = batch().await?.len();
        total += n;
        if n < BATCH {
            return Ok(total);
        }
        tokio::time::sleep(pause_after(pass, started)).await;
    }
}

/// The pause after a batch that started at `started`, in a pass that started at `pass`: as
/// long as the batch took while the pass is within [`PRUNE_EVERY`], then [`PAUSE`].
fn pause_after(pass: std::time::Instant, started: std::time::Instant) -> Duration {
    if pass.elapsed() < PRUNE_EVERY {
        started.elapsed().max(PAUSE)
    } else {
        PAUSE
    }
}

/// How long the oldest run that `rule` (due `before`) selects has been due: what the archive
/// (and retention) is behind by.
async fn lag(
    state: &AppState,
    rule: &PruneRule,
    before: DateTime<Utc>,
) -> Result<Duration, StoreError> {
    let oldest = state.stores.runs.prunable(rule, 1).await?;
    let created = oldest.first().and_then(RunId::created_at);
    Ok(created
        .and_then(|at| (before - at).to_std().ok())
        .unwrap_or_default())
}

/// Deletes the runs `rule` selects, batch by batch with a pause between (each batch written
/// to the archive first, with `FLOWCORE_ARCHIVE`). Returns how many runs were deleted.
async fn prune(state: &AppState, rule: &PruneRule) -> Result<usize, StoreError> {
    let pass = std::time::Instant::now();
    let runs = state.stores.runs.as_ref();
    let mut total = 0;
    loop {
        let started = std::time::Instant::now();
        let (chosen, deleted) = if state.config.archive {
            let ids = runs.prunable(rule, BATCH).await?;
            let mut deleted = 0;
            if !ids.is_empty() {
                let written = archive::write(runs, state.stores.blobs.as_ref(), &ids).await?;
                state.metrics.runs_archived(written);
                deleted = runs.delete_finished(&ids).await?.len();
            }
            (ids.len(), deleted)
        } else {
            let deleted = runs.prune(rule, BATCH).await?.len();
            (deleted, deleted)
        };
        total += deleted;
        if chosen < BATCH {
            return Ok(total);
        }
        tokio::time::sleep(pause_after(pass, started)).await;
    }
}

/// The most runs whose blobs one clean-up looks at.
const BLOB_RUNS_PER_PASS: usize = 10_000;

/// Deletes the offloaded outputs (`runs/{id}/...`) of runs that no longer exist or whose data
/// was dropped, from one
/// listing of `runs/`: pruned runs', and any a crash left behind. (One listing, not one per
/// pruned run: on a file system each listing is blocking work.) A blob that fails to go is
/// logged and left for the next clean-up. Returns how many runs' blobs went.
async fn forget_orphan_blobs(state: &AppState) -> Result<usize, StoreError> {
    let blobs = &state.stores.blobs;
    let mut by_run: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for key in blobs.list("runs/").await? {
        let Some(id) = key
            .strip_prefix("runs/")
            .and_then(|rest| rest.split('/').next())
        else {
            continue;
        };
        if by_run.len() >= BLOB_RUNS_PER_PASS && !by_run.contains_key(id) {
            continue;
        }
        by_run.entry(id.to_owned()).or_default().push(key);
    }
    let gone = futures::stream::iter(by_run)
        .map(|(id, keys)| async move {
            match state.stores.runs.get(&RunId::from(id.clone())).await {
                Err(StoreError::NotFound { .. }) => {}
                Ok(run) if run.data_pruned => {}
                Ok(_) => return false,
                Err(e) => {
                    tracing::warn!(run_id = %id, error = %e, "checking a blob's run failed");
                    return false;
                }
            }
            for key in keys {
                if let Err(e) = blobs.delete(&key).await {
                    tracing::warn!(%key, error = %e, "deleting a pruned run's blob failed");
                }
            }
            true
        })
        .buffer_unordered(8)
        .filter(|gone| std::future::ready(*gone))
        .count()
        .await;
    Ok(gone)
}

/// Prunes every [`PRUNE_EVERY`] until `shutdown`.
pub async fn run(state: Shared, shutdown: CancellationToken) {
    let mut counted: Option<std::time::Instant> = None;
    // The flows' rules, read again once a minute and after any flow changed (in any process),
    // not at every pass.
    let mut changes = state.stores.flow_changes.subscribe();
    let mut known: Option<Vec<(String, Retention)>> = None;
    loop {
        let counts = counted.is_none_or(|at| at.elapsed() >= COUNT_EVERY);
        if counts {
            counted = Some(std::time::Instant::now());
        }
        let mut changed = false;
        while let Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) =
            changes.try_recv()
        {
            changed = true;
        }
        if counts || changed || known.is_none() {
            match rules(&state).await {
                Ok(read) => known = Some(read),
                Err(e) => tracing::warn!(error = %e, "reading the flows' retention failed"),
            }
        }
        // Without the flows' rules, nothing is pruned: a flow that keeps its runs longer
        // must not lose them to the default.
        let pass = match &known {
            Some(rules) => prune_pass(&state, Utc::now(), rules, counts).await,
            None => Ok(0),
        };
        match pass {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "finished runs pruned by retention"),
            Err(e) => tracing::warn!(error = %e, "pruning runs failed; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}
