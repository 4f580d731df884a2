//! Run and step records: statuses, results, and the recorder that makes runs durable.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::StoreError;
use crate::ids::RunId;

/// A run's status. `queued`, `running` and `waiting` are live; the others are final.
/// [`RunStatus::move_to`] says which changes are legal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Accepted, waiting for a worker.
    #[default]
    Queued,
    /// A worker is executing it.
    Running,
    /// Parked by a `wait` or a long `delay`: no worker holds it until a signal or its time
    /// wakes it.
    Waiting,
    /// Finished with an output.
    Succeeded,
    /// A node failed and the run stopped.
    Failed,
    /// Cancelled from outside.
    Cancelled,
    /// Ran past its time limit.
    TimedOut,
}

impl RunStatus {
    /// Every status, in life order.
    pub const ALL: [RunStatus; 7] = [
        Self::Queued,
        Self::Running,
        Self::Waiting,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
    ];

    /// Whether the run is over.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Running | Self::Waiting)
    }
    /// Whether a lease owns a run in this status (its owner is executing it).
    pub fn is_leased(self) -> bool {
        self == Self::Running
    }
    /// The move that takes a run from this status to `to`, `None` when none does: the table of
    /// a run's life (see [`Move`]).
    pub fn move_to(self, to: RunStatus) -> Option<Move> {
        use RunStatus::{Cancelled, Failed, Queued, Running, Succeeded, TimedOut, Waiting};
        match (self, to) {
            (Queued | Running, Running) => Some(Move::Claim),
            (Running, Queued) => Some(Move::Release),
            (Running, Waiting) => Some(Move::Park),
            (Waiting, Queued) => Some(Move::Wake),
            (Running, Succeeded | Failed | Cancelled | TimedOut) => Some(Move::Finish),
            (Queued | Waiting, Cancelled) => Some(Move::Cancel),
            _ => None,
        }
    }
    /// The change from this status to `to` (whether any move makes it is [`Self::move_to`]'s
    /// question).
    pub fn to(self, to: RunStatus) -> Transition {
        Transition { from: self, to }
    }
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Waiting => "waiting",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown run status `{s}`"))
    }
}

/// What moves a run from one status to another. [`RunStatus::move_to`] is the one table of a
/// run's life: every store applies these moves and refuses every other, and the server's run
/// lifecycle makes them through the store.
///
/// ```text
///            claim              finish
///  queued ─────────▶ running ─────────▶ succeeded | failed | cancelled | timed_out
///   │ ▲  ◀─────────  │ ▲ │
///   │ │    release   └─┘ │ claim again once the owner's lease lapsed
///   │ │     wake         │ park
///   │ └───────────── waiting
///   └────────────────────┴──────────▶ cancelled
///                cancel
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Move {
    /// A worker takes the run, with a lease: a queued run, or a running one whose owner's
    /// lease lapsed (`RunStore::claim`).
    Claim,
    /// The lease's owner hands the run back, to be claimed again (a shutdown):
    /// `RunStore::release`.
    Release,
    /// The lease's owner ends the run: `RunStore::finish`.
    Finish,
    /// The lease's owner parks the run until a signal or a time: `RunStore::park`.
    Park,
    /// A signal or its time wakes a parked run, to be claimed again: `RunStore::wake_due`,
    /// `RunStore::send_signal`.
    Wake,
    /// A run that no lease owns (queued or waiting) is cancelled: `RunStore::transition`.
    Cancel,
}

impl Move {
    /// Every move.
    pub const ALL: [Move; 6] = [
        Self::Claim,
        Self::Release,
        Self::Finish,
        Self::Park,
        Self::Wake,
        Self::Cancel,
    ];

    /// Whether only the owner of the run's current lease may make it (the store checks the
    /// lease's epoch).
    pub fn needs_lease(self) -> bool {
        matches!(self, Self::Release | Self::Finish | Self::Park)
    }

    /// The statuses this move starts from, in life order.
    pub fn sources(self) -> impl Iterator<Item = RunStatus> {
        RunStatus::ALL.into_iter().filter(move |from| {
            RunStatus::ALL
                .iter()
                .any(|to| from.move_to(*to) == Some(self))
        })
    }

    /// The move of `change` when it is one that no lease owner makes (what
    /// `RunStore::transition` does), else [`StoreError::Invalid`] saying why not.
    pub fn unowned(change: Transition) -> Result<Move, StoreError> {
        let Transition { from, to } = change;
        match from.move_to(to) {
            Some(m) if m != Self::Claim && !m.needs_lease() => Ok(m),
            Some(m) => Err(StoreError::Invalid(format!(
                "{from} -> {to} is a {m:?}, which only the run's lease makes"
            ))),
            None => Err(StoreError::Invalid(format!(
                "a {from} run cannot become {to}"
            ))),
        }
    }

    /// Whether it starts from `status`.
    pub fn starts_from(self, status: RunStatus) -> bool {
        self.sources().any(|s| s == status)
    }
}

/// A change of a run's status from one to another, as `RunStore::transition` makes it
/// (one value, so that the two statuses cannot be swapped silently).
///
/// ```
/// use flowcore::RunStatus;
///
/// let cancel = RunStatus::Queued.to(RunStatus::Cancelled);
/// assert_eq!((cancel.from, cancel.to), (RunStatus::Queued, RunStatus::Cancelled));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transition {
    /// The status the run must have.
    pub from: RunStatus,
    /// The status it gets.
    pub to: RunStatus,
}

/// A step's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// Executing.
    Running,
    /// Finished with an output.
    Succeeded,
    /// Failed after its retries (with `on_error` continue or route the run goes on).
    Failed,
    /// Not executed: none of its incoming edges was live.
    Skipped,
    /// Stopped because the run ended.
    Cancelled,
}

impl StepStatus {
    /// Every status.
    pub const ALL: [StepStatus; 6] = [
        Self::Pending,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Skipped,
        Self::Cancelled,
    ];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StepStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown step status `{s}`"))
    }
}

/// One node's execution in a run: the checkpoint from which a run resumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The node's id.
    pub node: Arc<str>,
    /// Its status.
    pub status: StepStatus,
    /// Attempts made.
    pub attempts: u32,
    /// When its first attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached its status.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its output (for a failed node with `on_error` continue or route,
    /// `{"error": ..., "code": ...}`).
    pub output: Option<Arc<Value>>,
    /// The error of its last attempt.
    pub error: Option<String>,
    /// The error's stable code (`timeout`, `node_failed`, `node_timeout`, ...; see
    /// [`NodeError::code`](crate::NodeError::code)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// The named port it took (`true`/`false` for a branch, `error` for a routed failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Arc<str>>,
    /// A `map` step's progress: how many items it has, and how many are done (`None` for
    /// other nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<ItemProgress>,
    /// Kept from an earlier run by a rerun ([`crate::rerun`]): not executed in this one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
}

/// How far a `map` step got: of `total` items, `done` are finished (and checkpointed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemProgress {
    /// How many items the step maps over.
    pub total: u32,
    /// How many of them are finished.
    pub done: u32,
}

/// Finished items of a `map` step, written together: the checkpoint from which a resumed run
/// executes only the items that had not finished. Each entry is an item's index and its output
/// (for a failed item under `on_item_error: continue`, `{"error", "code"}`).
#[derive(Debug, Clone, PartialEq)]
pub struct ItemBatch {
    /// The map node's id.
    pub node: Arc<str>,
    /// The step's progress once this batch is stored.
    pub progress: ItemProgress,
    /// When the step started (its progress row shows it).
    pub started_at: DateTime<Utc>,
    /// The finished items, by index.
    pub items: Vec<(u32, Arc<Value>)>,
}

impl StepRecord {
    /// A step of `node` that has not started: no attempt, no times, no output.
    pub fn pending(node: impl Into<Arc<str>>) -> Self {
        Self {
            node: node.into(),
            status: StepStatus::Pending,
            attempts: 0,
            started_at: None,
            finished_at: None,
            output: None,
            error: None,
            error_code: None,
            port: None,
            items: None,
            reused: false,
        }
    }

    /// The same step, kept by a rerun from an earlier run ([`StepRecord::reused`]).
    pub fn into_reused(self) -> Self {
        Self {
            reused: true,
            ..self
        }
    }

    /// Whether a resumed run can take this step as done instead of executing it again.
    pub fn is_checkpoint(&self) -> bool {
        matches!(self.status, StepStatus::Succeeded | StepStatus::Skipped)
            || (self.status == StepStatus::Failed && self.output.is_some())
    }
}

/// The outcome of a run executed by the engine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunResult {
    /// The run's id.
    pub run_id: RunId,
    /// Its final status.
    pub status: RunStatus,
    /// Its output, when it succeeded (the `output` node's, or the one sink's, or an
    /// object keyed by the sinks that ran).
    pub output: Option<Value>,
    /// Why it did not succeed.
    pub error: Option<String>,
    /// Every node that reached a status, in the flow's node order.
    pub steps: Vec<StepRecord>,
    /// With status `waiting`: what the parked nodes wait for.
    pub waits: Vec<crate::wait::Wait>,
    /// When execution started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
}

impl RunResult {
    /// The step of node `id`, if it reached a status.
    pub fn step(&self, id: &str) -> Option<&StepRecord> {
        self.steps.iter().find(|s| &*s.node == id)
    }
}

/// Receives every step as it finishes, before the nodes after it start: the durability hook
/// that a worker uses to checkpoint a run. An implementation may buffer, as long as it is durable
/// by the time the run's final status is written.
#[async_trait]
pub trait StepRecorder: Send + Sync {
    /// Records one finished (or skipped, or cancelled) step. An error stops the run as failed;
    /// [`StoreError::StaleLease`] means another worker owns the run now.
    async fn record_step(&self, run_id: &RunId, step: &StepRecord) -> Result<(), StoreError>;

    /// Records finished items of a `map` step (and its progress), so that a resumed run does
    /// not execute them again. The default keeps nothing.
    async fn record_items(&self, run_id: &RunId, batch: ItemBatch) -> Result<(), StoreError> {
        let _ = (run_id, batch);
        Ok(())
    }

    /// The items of `node`'s map step recorded by an earlier execution of the run, by index.
    async fn items(&self, run_id: &RunId, node: &str) -> Result<Vec<(u32, Value)>, StoreError> {
        let _ = (run_id, node);
        Ok(Vec::new())
    }
}

/// Where the wait nodes of one durable execution take the signals sent to their run.
#[async_trait]
pub trait SignalInbox: Send + Sync {
    /// The payload of the oldest pending signal `name` of the run, taken for `node`; the one
    /// `node` took already, if it took one (an execution resumed after a crash gets what the
    /// crashed one took). `None` when none is pending.
    async fn take(&self, node: &str, name: &str) -> Result<Option<Value>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_of_moves_reads_as_the_picture() {
        let sources = |m: Move| m.sources().collect::<Vec<_>>();
        assert_eq!(
            sources(Move::Claim),
            [RunStatus::Queued, RunStatus::Running]
        );
        assert_eq!(sources(Move::Release), [RunStatus::Running]);
        assert_eq!(sources(Move::Finish), [RunStatus::Running]);
        assert_eq!(sources(Move::Park), [RunStatus::Running]);
        assert_eq!(sources(Move::Wake), [RunStatus::Waiting]);
        assert_eq!(
            sources(Move::Cancel),
            [RunStatus::Queued, RunStatus::Waiting]
        );
        for status in RunStatus::ALL {
            let out = RunStatus::ALL
                .iter()
                .filter(|to| status.move_to(**to).is_some());
            // A final status is the end; a live one can always reach one.
            assert_eq!(out.clone().next().is_none(), status.is_final(), "{status}");
            assert_eq!(status.is_leased(), Move::Finish.starts_from(status));
        }
        for m in Move::ALL {
            assert!(m.sources().next().is_some(), "{m:?} starts somewhere");
        }
        assert!(Move::unowned(RunStatus::Queued.to(RunStatus::Cancelled)).is_ok());
        assert!(Move::unowned(RunStatus::Running.to(RunStatus::Cancelled)).is_err());
        assert!(Move::unowned(RunStatus::Succeeded.to(RunStatus::Queued)).is_err());
        assert!(Move::unowned(RunStatus::Waiting.to(RunStatus::Queued)).is_ok());
        assert!(Move::unowned(RunStatus::Running.to(RunStatus::Waiting)).is_err());
    }
}
