//! The queue that hands runs to workers.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::StoreResult;
use crate::ids::RunId;

/// A job in a queue: the run to execute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The job's id.
    pub id: String,
    /// The run it executes.
    pub run_id: RunId,
    /// How many times it has been delivered, this delivery included.
    pub deliveries: u32,
}

/// A job delivered to one worker until its lease lapses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedJob {
    /// The job.
    pub job: Job,
    /// The worker group's queue it came from.
    pub group: String,
    /// Proves this delivery: heartbeats, acks and nacks with an older token are refused.
    pub token: String,
}

/// What a worker asks of [`Queue::lease`]: how many jobs at most, for how long, and how long
/// to wait for the first.
///
/// ```
/// use std::time::Duration;
/// use flowcore::ports::Take;
/// let take = Take { max: 8, ttl: Duration::from_secs(30), wait: Duration::from_secs(1) };
/// assert!(take.wait < take.ttl);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    /// Jobs at most.
    pub max: usize,
    /// The leases' time to live.
    pub ttl: Duration,
    /// How long to wait for a first job when none is ready.
    pub wait: Duration,
}

/// How many jobs a queue holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueDepth {
    /// Ready to be leased.
    pub ready: u64,
    /// Waiting for their time.
    pub delayed: u64,
    /// Leased to a worker.
    pub leased: u64,
    /// In the dead-letter list.
    pub dead: u64,
}

/// Hands runs to workers: at-least-once delivery with leases, one queue per worker group.
///
/// A job leased and not acked before its lease lapses is delivered again; after
/// `max_deliveries` deliveries it moves to the dead-letter list instead.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Adds a job for `run_id`, ready at `not_before` (now when `None`). Returns the job id.
    async fn enqueue(
        &self,
        group: &str,
        run_id: &RunId,
        not_before: Option<DateTime<Utc>>,
    ) -> StoreResult<String>;
    /// Leases up to `take.max` ready jobs of `group` (expired leases included) for `take.ttl`,
    /// waiting up to `take.wait` for the first one. Returns an empty list when none came.
    async fn lease(&self, group: &str, take: Take) -> StoreResult<Vec<LeasedJob>>;
    /// Extends a lease. `StaleLease` when the job was delivered again or acked since.
    async fn heartbeat(&self, job: &LeasedJob, ttl: Duration) -> StoreResult<()>;
    /// Removes a finished job. Idempotent for the same delivery; `StaleLease` for an older one.
    async fn ack(&self, job: &LeasedJob) -> StoreResult<()>;
    /// Gives a job back to be delivered again at `retry_at` (now when `None`).
    async fn nack(&self, job: &LeasedJob, retry_at: Option<DateTime<Utc>>) -> StoreResult<()>;
    /// The depth of a group's queue.
    async fn depth(&self, group: &str) -> StoreResult<QueueDepth>;
    /// How many times this process found the backend had lost its jobs (a Redis that
    /// restarted without persistence): when it grows, the runs waiting in the run store must be
    /// enqueued again. `None` (the default) for an in-process queue, which cannot lose jobs
    /// while its process lives; a queue shared with other processes answers `Some`, and the
    /// server then also sweeps for queued runs that lost their job to a process that died
    /// between storing and enqueuing them.
    fn losses(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}
