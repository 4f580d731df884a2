//! Bulk replay (`POST /api/v1/runs/replay`): the finished runs of a flow that match a filter,
//! rerun one after another by a task in the background, at the lowest priority and paced by
//! the queue, so that a replay of 100,000 failures cannot starve new traffic. Its progress is
//! written to the blob store (`replays/{id}.json`), where every process reads it
//! (`GET /api/v1/replays/{id}`).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flowcore::ports::{ActionKind, Actor, BlobStore, RunFilter};
use flowcore::rerun::RerunFrom;
use flowcore::{RunId, RunStatus, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::lifecycle::{self, RunError};
use crate::state::Shared;

/// The most runs one replay reruns.
pub const MAX_REPLAY: usize = 100_000;

/// How many runs a replay reruns when it names no limit.
pub const DEFAULT_REPLAY: usize = 1_000;

/// How many replays one process runs at once; another is refused (429) meanwhile.
pub const REPLAYS_AT_ONCE: usize = 2;

/// The most reruns a second one replay starts, however empty the queue.
pub const REPLAY_PER_SECOND: u32 = 100;

/// A replay whose progress was not written for this long is shown `interrupted`: its process
/// stopped (a replay asked for again goes on where it stopped).
const STALE: Duration = Duration::from_secs(30);

/// The most runs a replay looks through to find the ones it reruns (newer than its `to`
/// included): past it, the request is refused with a word to narrow the range.
pub const MAX_SCANNED: usize = 200_000;

/// How many error messages a replay keeps.
const KEPT_ERRORS: usize = 10;

fn replays() -> &'static Arc<Semaphore> {
    static REPLAYS: std::sync::OnceLock<Arc<Semaphore>> = std::sync::OnceLock::new();
    REPLAYS.get_or_init(|| Arc::new(Semaphore::new(REPLAYS_AT_ONCE)))
}

/// Which runs a replay reruns.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// The flow whose runs are rerun.
    pub flow_id: String,
    /// Their status: `failed` (default), `timed_out`, `cancelled` or `succeeded`.
    pub status: Option<String>,
    /// Runs created at or after this time (RFC 3339).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub from: Option<DateTime<Utc>>,
    /// Runs created before this time (RFC 3339).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub to: Option<DateTime<Utc>>,
    /// The most runs rerun, the newest first (default 1,000, at most 100,000).
    pub limit: Option<usize>,
}

/// Where a replay stands.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplayProgress {
    /// Its id.
    pub replay_id: String,
    /// The flow whose runs it reruns.
    pub flow_id: String,
    /// `running`, `done`, `stopped` (a quota ran out, or the process shut down) or
    /// `interrupted` (its process stopped without a word).
    pub status: String,
    /// The runs that matched: it reruns each once.
    pub count: usize,
    /// Reruns started so far.
    pub rerun: usize,
    /// Runs left out: rerun before (by an earlier replay, or by hand).
    pub skipped: usize,
    /// Runs whose rerun could not start (`errors` has the first messages).
    pub failed: usize,
    /// The first error messages.
    pub errors: Vec<String>,
    /// Who asked.
    #[schema(value_type = Option<Object>)]
    pub actor: Option<Actor>,
    /// When it was asked for.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    /// When its progress was last written.
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: DateTime<Utc>,
}

/// Why a replay cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The request is wrong.
    #[error("{0}")]
    Invalid(String),
    /// `REPLAYS_AT_ONCE` replays run in this process already.
    #[error("{REPLAYS_AT_ONCE} replays run already: try again when one is done")]
    Busy,
    /// A replay of the flow runs in this process already.
    #[error("a replay of flow `{0}` runs already: wait for it to end, or follow it")]
    FlowBusy(String),
    /// A store failed, or the flow does not exist.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The flow could not be read.
    #[error(transparent)]
    Flow(#[from] flowcore::Error),
}

fn key(id: &str) -> String {
    format!("replays/{id}.json")
}

/// Starts a replay: finds the matching runs (newest first, up to the limit) and reruns them
/// in a task of its own. Answers with the replay's progress as it starts, `count` set.
pub async fn start(
    state: &Shared,
    request: ReplayRequest,
    actor: Option<Actor>,
) -> Result<ReplayProgress, ReplayError> {
    let status = match request.status.as_deref().unwrap_or("failed") {
        s @ ("failed" | "timed_out" | "cancelled" | "succeeded") => {
            s.parse::<RunStatus>().map_err(ReplayError::Invalid)?
        }
        other => {
            return Err(ReplayError::Invalid(format!(
                "status is `failed`, `timed_out`, `cancelled` or `succeeded`, not `{other}`"
            )));
        }
    };
    let limit = request.limit.unwrap_or(DEFAULT_REPLAY);
    if !(1..=MAX_REPLAY).contains(&limit) {
        return Err(ReplayError::Invalid(format!(
            "limit must be from 1 to {MAX_REPLAY}"
        )));
    }
    if let (Some(from), Some(to)) = (request.from, request.to)
        && from >= to
    {
        return Err(ReplayError::Invalid("`from` must be before `to`".into()));
    }
    if !flowcore::model::is_valid_id(&request.flow_id) {
        return Err(ReplayError::Invalid(
            "flow_id is not 1 to 64 of A-Z a-z 0-9 _ -".into(),
        ));
    }
    // The flow exists (404 otherwise).
    state.plans.get(&request.flow_id, None).await?;
    let permit = replays()
        .clone()
        .try_acquire_owned()
        .map_err(|_| ReplayError::Busy)?;
    let turn = FlowTurn::take(&request.flow_id)
        .ok_or_else(|| ReplayError::FlowBusy(request.flow_id.clone()))?;
    let ids = matching(state, &request, status, limit).await?;
    let now = Utc::now();
    let progress = ReplayProgress {
        replay_id: flowcore::ids::new_id(),
        flow_id: request.flow_id,
        status: "running".into(),
        count: ids.len(),
        rerun: 0,
        skipped: 0,
        failed: 0,
        errors: Vec::new(),
        actor,
        created_at: now,
        updated_at: now,
    };
    write(state.stores.blobs.as_ref(), &progress).await?;
    tokio::spawn(replay(state.clone(), ids, progress.clone(), (permit, turn)));
    Ok(progress)
}

/// The flows whose replay runs in this process: one at a time each (two would rerun the
/// same runs twice).
fn replaying() -> &'static std::sync::Mutex<std::collections::HashSet<String>> {
    static FLOWS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    FLOWS.get_or_init(Default::default)
}

/// A flow's turn to be replayed, given back when dropped.
#[derive(Debug)]
struct FlowTurn(String);

impl FlowTurn {
    fn take(flow_id: &str) -> Option<Self> {
        let mut flows = replaying()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        flows
            .insert(flow_id.to_owned())
            .then(|| Self(flow_id.to_owned()))
    }
}

impl Drop for FlowTurn {
    fn drop(&mut self) {
        replaying()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.0);
    }
}

/// The ids of the runs a replay reruns: the flow's runs of `status` created in the range,
/// newest first, at most `limit`, looking through at most [`MAX_SCANNED`] runs.
async fn matching(
    state: &Shared,
    request: &ReplayRequest,
    status: RunStatus,
    limit: usize,
) -> Result<Vec<RunId>, ReplayError> {
    let mut scanned = 0usize;
    let mut filter = RunFilter {
        flow_id: Some(request.flow_id.clone()),
        status: Some(status),
        limit: 500,
        ..Default::default()
    };
    let mut ids = Vec::new();
    loop {
        let page = state.stores.runs.list(&filter).await?;
        scanned += page.items.len();
        if scanned > MAX_SCANNED {
            return Err(ReplayError::Invalid(format!(
                "more than {MAX_SCANNED} runs of the flow lie in the range or after it: narrow it with `to`"
            )));
        }
        for run in page.items {
            if request.to.is_some_and(|to| run.created_at >= to) {
                continue;
            }
            // Newest first: the rest are older still.
            if request.from.is_some_and(|from| run.created_at < from) {
                return Ok(ids);
            }
            ids.push(run.id);
            if ids.len() >= limit {
                return Ok(ids);
            }
        }
        match page.next_cursor {
            Some(c) => filter.cursor = Some(c),
            None => return Ok(ids),
        }
    }
}

/// Reruns `ids` one after another (from their failed steps, else from the start) at the lowest
/// priority, each when the queue of the flow's group is less than half full and at most
/// [`REPLAY_PER_SECOND`] a second, writing the progress every second and at the end.
async fn replay(
    state: Shared,
    ids: Vec<RunId>,
    mut progress: ReplayProgress,
    _held: (OwnedSemaphorePermit, FlowTurn),
) {
    let blobs = state.stores.blobs.clone();
    let group = match state.plans.get(&progress.flow_id, None).await {
        Ok((_, plan)) => plan
            .worker_group()
            .unwrap_or(&state.config.worker_group)
            .to_owned(),
        Err(_) => state.config.worker_group.clone(),
    };
    let mut written = tokio::time::Instant::now();
    let mut pace = tokio::time::interval(Duration::from_secs(1) / REPLAY_PER_SECOND);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopped = None;
    'runs: for id in ids {
        // Paced: new runs get the other half of the queue, and go first (priority 0 here).
        loop {
            if state.hand_back.is_cancelled() {
                stopped = Some("the process shut down".to_owned());
                break 'runs;
            }
            match state
                .admission
                .room_for_background(state.stores.queue.as_ref(), &group)
                .await
            {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "a replay could not read the queue's depth"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            save_every_second(blobs.as_ref(), &mut progress, &mut written).await;
        }
        pace.tick().await;
        match rerun_once(&state, &id, progress.actor.clone()).await {
            Ok(true) => progress.rerun += 1,
            Ok(false) => progress.skipped += 1,
            Err(e @ RunError::QuotaExceeded { .. }) => {
                stopped = Some(e.to_string());
                break;
            }
            Err(e) => {
                progress.failed += 1;
                if progress.errors.len() < KEPT_ERRORS {
                    progress.errors.push(format!("{id}: {e}"));
                }
            }
        }
        save_every_second(blobs.as_ref(), &mut progress, &mut written).await;
    }
    progress.status = match stopped {
        Some(why) => {
            progress.errors.push(why);
            "stopped".into()
        }
        None => "done".into(),
    };
    progress.updated_at = Utc::now();
    if let Err(e) = write(blobs.as_ref(), &progress).await {
        tracing::warn!(replay_id = %progress.replay_id, error = %e, "could not write a replay's end");
    }
}

/// Writes `progress` when a second passed since the last write.
async fn save_every_second(
    blobs: &dyn BlobStore,
    progress: &mut ReplayProgress,
    written: &mut tokio::time::Instant,
) {
    if written.elapsed() < Duration::from_secs(1) {
        return;
    }
    progress.updated_at = Utc::now();
    if let Err(e) = write(blobs, progress).await {
        tracing::warn!(replay_id = %progress.replay_id, error = %e, "could not write a replay's progress");
    }
    *written = tokio::time::Instant::now();
}

/// Reruns `id` unless it was rerun before: `Ok(false)` when it was. From its failed steps, or
/// from the start when it has none (a run that succeeded, or was cancelled between steps).
async fn rerun_once(state: &Shared, id: &RunId, actor: Option<Actor>) -> Result<bool, RunError> {
    let actions = state.stores.runs.actions(id).await?;
    // The earlier run's record of a rerun names the rerun (a rerun's own record names the run
    // it reruns, `rerun_of`, and does not count).
    let rerun_before = actions.iter().any(|a| {
        a.action == ActionKind::Rerun && a.detail.as_ref().is_some_and(|d| d.get("rerun").is_some())
    });
    if rerun_before {
        return Ok(false);
    }
    let rerun = |from| lifecycle::Rerun {
        from,
        latest: false,
        input: None,
        actor: actor.clone(),
        priority: Some(0),
    };
    // A rerun is prepared in a task of its own, as the route's (nothing is left half done).
    let attempt = |from| {
        let (state, id, rerun) = (state.clone(), id.clone(), rerun(from));
        lifecycle::detached(async move { lifecycle::rerun(&state, &id, rerun).await })
    };
    loop {
        match attempt(RerunFrom::Failed).await {
            Ok(_) => return Ok(true),
            Err(RunError::CannotRerun(e)) if e.contains("no failed step") => {
                attempt(RerunFrom::Start).await?;
                return Ok(true);
            }
            // Full after all (another process queued meanwhile): wait, and try again.
            Err(RunError::Overloaded(e)) if !state.hand_back.is_cancelled() => {
                tracing::debug!(run_id = %id, error = %e, "a replay waits for room in the queue");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn write(blobs: &dyn BlobStore, progress: &ReplayProgress) -> Result<(), StoreError> {
    let bytes =
        serde_json::to_vec(progress).map_err(|e| StoreError::backend("a replay's progress", e))?;
    blobs.put(&key(&progress.replay_id), bytes).await
}

/// A replay's progress, as written by whichever process runs it; `interrupted` when it is
/// `running` and was not written for 30 s.
pub async fn progress(state: &Shared, id: &str) -> Result<ReplayProgress, StoreError> {
    if !flowcore::model::is_valid_id(id) {
        return Err(StoreError::not_found("replay", id));
    }
    let bytes = match state.stores.blobs.get(&key(id)).await {
        Ok(bytes) => bytes,
        Err(StoreError::NotFound { .. }) => return Err(StoreError::not_found("replay", id)),
        Err(e) => return Err(e),
    };
    let mut progress: ReplayProgress = serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::backend("reading a replay's progress", e))?;
    let stale = chrono::Duration::from_std(STALE).unwrap_or_default();
    if progress.status == "running" && Utc::now() - progress.updated_at > stale {
        progress.status = "interrupted".into();
    }
    Ok(progress)
}
