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

/// A run's status. `queued` and `running` are live; the others are final.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Accepted, waiting for a worker.
    #[default]
    Queued,
    /// A worker is executing it.
    Running,
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
    pub const ALL: [RunStatus; 6] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
    ];

    /// Whether the run is over.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
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
    /// Its output (for a failed node with `on_error` continue or route, `{"error": ...}`).
    pub output: Option<Arc<Value>>,
    /// The error of its last attempt.
    pub error: Option<String>,
    /// The named port it took (`true`/`false` for a branch, `error` for a routed failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Arc<str>>,
}

impl StepRecord {
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
    /// Its output, when it succeeded (contract: the `output` node's, or the one sink's, or an
    /// object keyed by the sinks that ran).
    pub output: Option<Value>,
    /// Why it did not succeed.
    pub error: Option<String>,
    /// Every node that reached a status, in the flow's node order.
    pub steps: Vec<StepRecord>,
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
}
