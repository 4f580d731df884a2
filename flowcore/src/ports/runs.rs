//! Runs and their steps, with the leases that make exactly one worker own a running run.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Page, StoreResult};
use crate::error::StoreError;
use crate::ids::RunId;
use crate::run::{ItemBatch, RunStatus, StepRecord, Transition};
use crate::wait::Parked;

/// A new run, as the API accepts it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    /// Its id.
    pub id: RunId,
    /// The flow.
    pub flow_id: String,
    /// The version the run is pinned to.
    pub flow_version: u32,
    /// The input.
    pub input: Value,
    /// The same key for the same flow gives the same run.
    pub idempotency_key: Option<String>,
    /// Create the run already claimed (`running`, epoch 1) by this owner, for a process that
    /// executes the run itself: one commit instead of two.
    pub claim: Option<Claim>,
    /// What started it, as templates see it (`trigger`): a webhook's path and chosen headers.
    pub trigger: Option<Value>,
    /// The run it reruns ([`RunStore::create_rerun`]).
    pub rerun_of: Option<RunId>,
    /// Its concurrency key, rendered from its input when it was created.
    pub concurrency: Option<ConcurrencyKey>,
    /// Its priority in the queue (0 to 9, 9 first).
    pub priority: u8,
}

/// A run's concurrency key (`settings.concurrency`), rendered once when the run is created: at
/// most `limit` runs of the flow with the same `key` execute at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConcurrencyKey {
    /// The rendered key.
    pub key: String,
    /// Runs with the key at once, at most.
    pub limit: u32,
}

impl NewRun {
    /// A run of `flow_id` at `flow_version` with `input`: a fresh id, no idempotency key, not
    /// claimed, no trigger.
    ///
    /// ```
    /// use flowcore::ports::NewRun;
    /// let new = NewRun::new("greet", 1, serde_json::json!({"name": "ada"}));
    /// assert!(new.claim.is_none() && new.idempotency_key.is_none());
    /// ```
    pub fn new(flow_id: impl Into<String>, flow_version: u32, input: Value) -> Self {
        Self {
            id: RunId::new(),
            flow_id: flow_id.into(),
            flow_version,
            input,
            idempotency_key: None,
            claim: None,
            trigger: None,
            rerun_of: None,
            concurrency: None,
            priority: crate::ports::DEFAULT_PRIORITY,
        }
    }

    /// The same run, created already claimed (see [`NewRun::claim`]).
    pub fn claimed(self, claim: Claim) -> Self {
        Self {
            claim: Some(claim),
            ..self
        }
    }
}

/// The part of a time index to walk (leases that expired): what is due by `by`; with `after`,
/// only what came due after it, oldest first. At most `limit` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// What came due at or before it was seen already.
    pub after: Option<DateTime<Utc>>,
    /// The end of the range (now, usually).
    pub by: DateTime<Utc>,
    /// The most entries answered.
    pub limit: usize,
}

/// A running run whose lease lapsed, with the lease's expiry (`None`: it had none).
pub type Lapsed = (RunId, Option<DateTime<Utc>>);

/// A worker's claim on a run: who, and for how long without renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The worker's name.
    pub owner: String,
    /// The lease's time to live.
    pub ttl: Duration,
}

/// Who executes a running run, until when, and which ownership this is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The worker's name.
    pub owner: String,
    /// When the lease lapses unless renewed.
    pub expires_at: DateTime<Utc>,
    /// Grows with every new owner; a write with an older epoch is refused.
    pub epoch: u64,
}

/// A stored run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Its id.
    pub id: RunId,
    /// The flow.
    pub flow_id: String,
    /// The flow version it runs.
    pub flow_version: u32,
    /// Its status.
    pub status: RunStatus,
    /// Its input.
    pub input: Value,
    /// Its output, once succeeded.
    pub output: Option<Value>,
    /// Why it failed.
    pub error: Option<String>,
    /// Its idempotency key.
    pub idempotency_key: Option<String>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When a worker first started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final status.
    pub finished_at: Option<DateTime<Utc>>,
    /// The current worker lease, while running.
    pub lease: Option<Lease>,
    /// The epoch of the latest lease (0 before any).
    pub epoch: u64,
    /// What started it (see [`NewRun::trigger`]).
    pub trigger: Option<Value>,
    /// Retention dropped its data ([`RunStore::drop_data`]): input `null`, no output, trigger
    /// or steps; its summary (status, timings, error) stays.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_pruned: bool,
    /// What it waited for when it last parked (kept until it ends; what it waits for now
    /// while `waiting`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<Parked>,
    /// The run this one reruns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<RunId>,
    /// Its concurrency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencyKey>,
    /// Its priority in the queue.
    #[serde(default = "default_priority")]
    pub priority: u8,
}

fn default_priority() -> u8 {
    crate::ports::DEFAULT_PRIORITY
}

/// How a run ended, as stored: what a request that waited for the run answers. Carried by
/// [`RunSignals::finished`], so that the waiter need not read the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEnd {
    /// Its final status.
    pub status: RunStatus,
    /// Its output as stored (a large one is a blob reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunRecord {
    /// Its end, once its status is final.
    ///
    /// ```
    /// # use flowcore::ports::RunRecord;
    /// # fn show(run: &RunRecord) {
    /// if let Some(end) = run.end() {
    ///     println!("{:?}: {:?}", end.status, end.output);
    /// }
    /// # }
    /// ```
    pub fn end(&self) -> Option<RunEnd> {
        self.status.is_final().then(|| RunEnd {
            status: self.status,
            output: self.output.clone(),
            error: self.error.clone(),
        })
    }
}

/// Filters of a run listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Only runs of this flow.
    pub flow_id: Option<String>,
    /// Only runs in this status.
    pub status: Option<RunStatus>,
    /// Page size (the store may cap it).
    pub limit: usize,
    /// The cursor from the previous page.
    pub cursor: Option<String>,
    /// Only runs created at or after this time.
    pub created_after: Option<DateTime<Utc>>,
    /// Only runs created before this time.
    pub created_before: Option<DateTime<Utc>>,
}

impl RunFilter {
    /// Whether a run's creation time is within the filter's window.
    pub fn created_within(&self, at: DateTime<Utc>) -> bool {
        self.created_after.is_none_or(|a| at >= a) && self.created_before.is_none_or(|b| at < b)
    }
}

/// The end of a run, written by its lease owner.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunOutcome {
    /// A final status.
    pub status: RunStatus,
    /// The output, when succeeded.
    pub output: Option<Value>,
    /// Why it did not succeed.
    pub error: Option<String>,
    /// Steps not yet recorded, written in the same commit as the status.
    pub steps: Vec<StepRecord>,
    /// A run stored (queued) in the same commit, only when the end is written: the failure
    /// handler's ([`crate::durable::failure_handler`]), so that no crash loses or doubles it.
    pub then: Option<NewRun>,
}

/// A parking run's state, written by its lease owner ([`RunStore::park`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Park {
    /// What it waits for, and how long it executed.
    pub parked: Parked,
    /// Steps not yet recorded, written in the same commit.
    pub steps: Vec<StepRecord>,
}

/// A signal for a run ([`RunStore::send_signal`]): its name and its payload, the output of the
/// `wait` that takes it; with a key for keyed waits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signal<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its payload.
    pub payload: &'a Value,
    /// For a keyed signal: the key. It is delivered only to a run waiting now for `name` with
    /// this key, never kept for later.
    pub key: Option<&'a str>,
}

/// Who acted on a run by hand: the API key of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The key's id (`admin` for the server's admin key).
    pub id: String,
    /// The key's name.
    pub name: String,
}

/// The most actions recorded for one run ([`RunStore::record_actions`]); later ones are not
/// kept. Far above what a run meets: its signals are bounded by its pending signals and its
/// waits, and a cancel is recorded once.
pub const MAX_ACTIONS_PER_RUN: usize = 1000;

/// What a person did to a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Cancelled it (or asked a running run to stop).
    Cancel,
    /// Sent it a signal.
    Signal,
    /// Started a rerun of it, or started it as a rerun.
    Rerun,
}

impl ActionKind {
    /// Its name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Signal => "signal",
            Self::Rerun => "rerun",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "cancel" => Some(Self::Cancel),
            "signal" => Some(Self::Signal),
            "rerun" => Some(Self::Rerun),
            _ => None,
        }
    }
}

/// A person's action on a run, recorded with the run ([`RunStore::record_actions`]): what,
/// by whom and when, with details such as a signal's name (never its payload).
///
/// ```
/// use flowcore::ports::{ActionKind, Actor, RunAction};
/// let cancelled = RunAction::now(ActionKind::Cancel, Some(Actor { id: "k1".into(), name: "ops".into() }));
/// assert_eq!(cancelled.action.as_str(), "cancel");
/// assert!(cancelled.detail.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunAction {
    /// What was done.
    pub action: ActionKind,
    /// Who did it: `None` when no API key was involved (a resume link). Its `id` is what
    /// names the key; a `name` is whatever its maker chose.
    pub actor: Option<Actor>,
    /// When.
    pub at: DateTime<Utc>,
    /// Details: for a signal, its `signal` name, and `key` or `via` (`resume_link`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

impl RunAction {
    /// `action` by `actor`, now, without details.
    pub fn now(action: ActionKind, actor: Option<Actor>) -> Self {
        Self {
            action,
            actor,
            at: Utc::now(),
            detail: None,
        }
    }

    /// The same, with `detail`.
    pub fn with_detail(self, detail: Value) -> Self {
        Self {
            detail: Some(detail),
            ..self
        }
    }
}

/// A wait taking a signal of its run ([`RunStore::take_signal`]), under its execution's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalTake<'a> {
    /// The lease's epoch.
    pub epoch: u64,
    /// The waiting node.
    pub node: &'a str,
    /// The signal's name.
    pub name: &'a str,
}

/// [`RunStore::send_signal`] to each of `ids` in turn, answering the runs it woke: what
/// [`RunStore::send_keyed_signal`] does once it found the runs waiting with the key. A run
/// woken, ended, full or deleted meanwhile is passed over.
pub async fn signal_each<S: RunStore + ?Sized>(
    store: &S,
    ids: impl IntoIterator<Item = RunId>,
    signal: Signal<'_>,
) -> StoreResult<Vec<RunRecord>> {
    let mut woken = Vec::new();
    for id in ids {
        match store.send_signal(&id, signal).await {
            Ok((run, true)) => woken.push(run),
            Ok(_)
            | Err(
                StoreError::Conflict(_) | StoreError::TooLarge(_) | StoreError::NotFound { .. },
            ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(woken)
}

/// Runs and their steps, with worker leases so that exactly one worker owns a running run.
#[async_trait]
pub trait RunStore: Send + Sync {
    /// Stores a queued run (or a running one, with `claim`). With an idempotency key already
    /// used for this flow, returns the existing run and `false`.
    async fn create(&self, run: NewRun) -> StoreResult<(RunRecord, bool)>;
    /// One run.
    async fn get(&self, id: &RunId) -> StoreResult<RunRecord>;
    /// Runs, newest first, with a cursor that stays correct under concurrent inserts.
    async fn list(&self, filter: &RunFilter) -> StoreResult<Page<RunRecord>>;
    /// Takes ownership of a run to execute it: a queued run, or a running one whose lease has
    /// expired. Sets `running`, a lease for `ttl` and a new epoch. `Conflict` otherwise.
    async fn claim(&self, id: &RunId, owner: &str, ttl: Duration) -> StoreResult<Lease>;
    /// [`claim`](Self::claim), answering the claimed run (its `lease` set): what a worker
    /// needs to execute it, in one round trip where the backend can.
    async fn claim_run(&self, id: &RunId, owner: &str, ttl: Duration) -> StoreResult<RunRecord> {
        self.claim(id, owner, ttl).await?;
        self.get(id).await
    }
    /// [`claim_run`](Self::claim_run) for several runs at once (a worker leasing a batch of
    /// jobs): answers the runs it claimed, in no particular order, and leaves out the ones not
    /// claimable (finished, leased by another owner, or unknown). One statement and one commit
    /// where the backend can (PostgreSQL); the default claims them one by one.
    async fn claim_runs(&self, ids: &[RunId], claim: &Claim) -> StoreResult<Vec<RunRecord>> {
        claim_each(self, ids, claim).await
    }
    /// Extends the lease of the current owner. `StaleLease` when another owner took over.
    async fn renew(&self, id: &RunId, epoch: u64, ttl: Duration) -> StoreResult<Lease>;
    /// Checkpoints steps (insert or replace by node). `StaleLease` when `epoch` is not current.
    async fn record_steps(&self, id: &RunId, epoch: u64, steps: &[StepRecord]) -> StoreResult<()>;
    /// The recorded steps of a run.
    async fn steps(&self, id: &RunId) -> StoreResult<Vec<StepRecord>>;
    /// Checkpoints finished items of a `map` step in one write, and shows the step's progress
    /// (a `running` step with its [`ItemProgress`](crate::ItemProgress), unless the step is
    /// already recorded as ended). The items stay until a final step of that node is recorded
    /// (by `record_steps`, `finish` or `park`) or the run is deleted. `StaleLease` when `epoch`
    /// is not current.
    async fn record_items(&self, id: &RunId, epoch: u64, batch: &ItemBatch) -> StoreResult<()>;
    /// The items of `node`'s map step checkpointed by [`RunStore::record_items`], by index.
    async fn items(&self, id: &RunId, node: &str) -> StoreResult<Vec<(u32, Value)>>;
    /// Writes the final status of a running run and its last steps, atomically. `StaleLease`
    /// when `epoch` is not current.
    async fn finish(&self, id: &RunId, epoch: u64, outcome: RunOutcome) -> StoreResult<RunRecord>;
    /// Hands a running run back (`running` -> `queued`) without waiting for its lease to expire.
    async fn release(&self, id: &RunId, epoch: u64) -> StoreResult<()>;
    /// Parks a running run (`running` -> `waiting`, the lease dropped): stores its last steps
    /// and `park.parked`, and indexes its earliest deadline for [`RunStore::wake_due`]. When a
    /// pending signal already answers one of its waits, the run goes to `queued` instead (a
    /// signal sent while it was parking does not wait for the deadline): the answer's status
    /// says which. `StaleLease` when `epoch` is not current.
    async fn park(&self, id: &RunId, epoch: u64, park: Park) -> StoreResult<RunRecord>;
    /// Wakes (`waiting` -> `queued`) the waiting runs whose earliest deadline is at or before
    /// `due.by`, earliest first, at most `due.limit`, and answers them: each is woken once,
    /// whichever processes ask. A range of the deadline index, never a scan of every run.
    async fn wake_due(&self, due: &Due) -> StoreResult<Vec<RunRecord>>;
    /// Queued runs that a wake (the timer, a signal) moved out of `waiting` at or before
    /// `due.by` and that no worker claimed since, the longest woken first, at most
    /// `due.limit`: the reaper enqueues them again (a process that died, or a queue that
    /// failed, between waking a run and enqueuing it left it without a job). A claim takes a
    /// run off this list.
    async fn woken_unclaimed(&self, due: &Due) -> StoreResult<Vec<RunId>>;
    /// Keeps signal `name` with `payload` for run `id` (first in first out, until a wait of
    /// the run takes it) and wakes the run (`waiting` -> `queued`) when one of its waits takes
    /// that signal. A keyed signal is kept only when the run waits for it with its key now
    /// (else nothing is kept, and the answer says it woke nothing). Answers the run and whether it was woken. `NotFound`; `Conflict` when the
    /// run is finished; `TooLarge` when [`MAX_PENDING_SIGNALS`](crate::wait::MAX_PENDING_SIGNALS)
    /// of its signals are pending.
    async fn send_signal(&self, id: &RunId, signal: Signal<'_>) -> StoreResult<(RunRecord, bool)>;
    /// Sends `signal` ([`RunStore::send_signal`]) to every run waiting now for it with its
    /// `key`, and answers those it woke (at most 1,000 runs). `Invalid` without a key.
    async fn send_keyed_signal(&self, signal: Signal<'_>) -> StoreResult<Vec<RunRecord>>;
    /// Takes the oldest pending signal `take.name` of run `id` for `take.node` and answers its
    /// payload; answers the one the node took already, if it took one (an execution resumed
    /// after a crash gets what the crashed one took, so a signal is taken exactly once). `None`
    /// when none is pending. `StaleLease` when `take.epoch` is not current.
    async fn take_signal(&self, id: &RunId, take: SignalTake<'_>) -> StoreResult<Option<Value>>;
    /// Records what people did to runs, each with its run (kept as long as the run, deleted
    /// with it; a run's data pruning keeps them). An action for a run that is gone is
    /// dropped, and so is one past [`MAX_ACTIONS_PER_RUN`] of its run.
    async fn record_actions(&self, actions: &[(RunId, RunAction)]) -> StoreResult<()>;
    /// The actions recorded for run `id`, oldest first.
    async fn actions(&self, id: &RunId) -> StoreResult<Vec<RunAction>>;
    /// Stores a queued rerun of an earlier run (`run.rerun_of`) with the steps it keeps from
    /// that run (marked [`StepRecord::reused`]), in one commit: a worker that takes it finds
    /// them as a resumed run finds its own, and executes only the rest. No idempotency key, no
    /// claim. `items` are finished items of `map` steps it executes again, checkpointed for
    /// it (a rerun of a failed map executes only the items that had not finished).
    async fn create_rerun(
        &self,
        run: NewRun,
        kept: Vec<StepRecord>,
        items: Vec<ItemBatch>,
    ) -> StoreResult<RunRecord>;
    /// Compare-and-set of the status, for changes without a lease (such as cancelling a queued
    /// run). `Conflict` when the status is not `change.from`.
    async fn transition(&self, id: &RunId, change: Transition) -> StoreResult<RunRecord>;
    /// Running runs whose lease expired by `due.by`, for the reaper, with their expiry
    /// (`None`: no lease). With `due.after`, only those whose lease expired after it, oldest
    /// expiry first: a reaper that looked at the earlier ones already looks only at what
    /// lapsed since, which on PostgreSQL is a short range of the lease index instead of every
    /// row version that was ever running (dead ones too, until a vacuum).
    async fn expired(&self, due: &Due) -> StoreResult<Vec<Lapsed>>;
    /// The finished runs that `rule` selects, oldest first, at most `limit`: what
    /// [`RunStore::prune`] deletes next. For a caller that does something with them first
    /// (the server's archive), then deletes them with [`RunStore::delete_finished`].
    async fn prunable(&self, rule: &PruneRule, limit: usize) -> StoreResult<Vec<RunId>>;
    /// Deletes those of `ids` that are finished, with their steps, and returns them (a run
    /// that is not finished, or not there, is left out).
    async fn delete_finished(&self, ids: &[RunId]) -> StoreResult<Vec<RunId>>;
    /// Deletes up to `batch` finished runs (and their steps) that `rule` selects, oldest
    /// first, and returns their ids. Callers loop until it returns less than `batch`. A store
    /// shared by several processes lets one prune at a time: the others get nothing. The
    /// default is [`RunStore::prunable`] then [`RunStore::delete_finished`].
    async fn prune(&self, rule: &PruneRule, batch: usize) -> StoreResult<Vec<RunId>> {
        let ids = self.prunable(rule, batch).await?;
        if ids.is_empty() {
            return Ok(ids);
        }
        self.delete_finished(&ids).await
    }
    /// Drops the data (input, output, trigger and steps) of up to `batch` finished runs that
    /// `rule` selects and that still have it, those that finished first first, and returns
    /// their ids. Here `before` applies to when a run finished (a run that waited long keeps
    /// its data as long after its end as any other), and `keep_newest` plays no part. Their summary stays, marked
    /// [`RunRecord::data_pruned`]. Callers loop until it returns less than `batch`; a store
    /// shared by several processes lets one prune at a time.
    async fn drop_data(&self, rule: &PruneRule, batch: usize) -> StoreResult<Vec<RunId>>;
    /// Gives some of the space that deleted rows left back to the system, a step at a time
    /// (SQLite's incremental vacuum: each step a short write); returns whether there may be
    /// more to give. The default gives nothing (a store whose database does it itself, or keeps
    /// nothing on disk).
    async fn reclaim(&self) -> StoreResult<bool> {
        Ok(false)
    }
    /// The bytes the store's database takes, when it can tell.
    async fn stored_bytes(&self) -> StoreResult<Option<u64>> {
        Ok(None)
    }
}

/// Which finished runs a prune deletes (queued and running ones never): those created before
/// `before`, and with `keep_newest` those of `flow_id` beyond its newest finished ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneRule {
    /// Only this flow's runs (`None`: every flow's but those in `except`).
    pub flow_id: Option<String>,
    /// Flows left alone when `flow_id` is `None` (they have rules of their own).
    pub except: Vec<String>,
    /// Runs created before this go.
    pub before: Option<DateTime<Utc>>,
    /// With `flow_id`: at most this many of its finished runs stay, the newest.
    pub keep_newest: Option<u64>,
}

impl PruneRule {
    /// Whether the rule is about the runs of `flow_id`: its one flow, or any flow not in
    /// `except`.
    pub fn is_about(&self, flow_id: &str) -> bool {
        match &self.flow_id {
            Some(flow) => flow == flow_id,
            None => !self.except.iter().any(|f| f == flow_id),
        }
    }

    /// Every flow's finished runs created before `before`.
    pub fn older_than(before: DateTime<Utc>) -> Self {
        Self {
            before: Some(before),
            ..Self::default()
        }
    }
}

/// Deletes the finished runs `rule` selects, in batches of `batch`, pausing `pause` between
/// batches so that normal work gets the database in between (n8n and Activepieces users hit
/// pruning that locks the pool). Returns how many runs were deleted.
pub async fn prune_runs(
    store: &dyn RunStore,
    rule: &PruneRule,
    batch: usize,
    pause: Duration,
) -> StoreResult<usize> {
    let batch = batch.max(1);
    let mut total = 0;
    loop {
        let n = store.prune(rule, batch).await?.len();
        total += n;
        if n < batch {
            return Ok(total);
        }
        tokio::time::sleep(pause).await;
    }
}

/// [`RunStore::claim_runs`] one run at a time, with [`RunStore::claim_run`]: the default, and
/// what a backend without a batch statement does.
pub async fn claim_each<S: RunStore + ?Sized>(
    store: &S,
    ids: &[RunId],
    claim: &Claim,
) -> StoreResult<Vec<RunRecord>> {
    let mut claimed = Vec::with_capacity(ids.len());
    for id in ids {
        match store.claim_run(id, &claim.owner, claim.ttl).await {
            Ok(run) => claimed.push(run),
            Err(StoreError::Conflict(_) | StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(claimed)
}
