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

/// A concurrency key on a job: at most `limit` jobs with the same `key` in a group are ready or
/// leased at once; the others wait behind it, in order, holding nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobKey {
    /// The key (a flow's rendered `settings.concurrency.key`, prefixed with the flow's id).
    pub key: String,
    /// How many jobs with the key may hold a slot at once (at least 1).
    pub limit: u32,
}

/// The highest priority a job may have: 9 goes first.
pub const MAX_PRIORITY: u8 = 9;

/// The priority of a job whose flow sets none: the middle, so a flow may go before or after.
pub const DEFAULT_PRIORITY: u8 = 5;

/// A job to add to a queue ([`Queue::enqueue`]).
///
/// ```
/// use flowcore::ports::{JobKey, NewJob};
/// use flowcore::RunId;
/// let job = NewJob::run(RunId::new())
///     .keyed(JobKey { key: "sync:acme".into(), limit: 2 })
///     .with_priority(9);
/// assert_eq!(job.priority, 9);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// The run it executes.
    pub run_id: RunId,
    /// Not ready before this time (now when `None`).
    pub not_before: Option<DateTime<Utc>>,
    /// Its concurrency key.
    pub key: Option<JobKey>,
    /// 0 to [`MAX_PRIORITY`]: among ready jobs, a higher priority is leased first, and first
    /// in first out within a priority.
    pub priority: u8,
}

impl NewJob {
    /// A job for `run_id`: ready now, no key, the default priority.
    pub fn run(run_id: RunId) -> Self {
        Self {
            run_id,
            not_before: None,
            key: None,
            priority: DEFAULT_PRIORITY,
        }
    }

    /// The job of a stored run: its id, its concurrency key and its priority.
    pub fn of(run: &crate::ports::RunRecord) -> Self {
        Self {
            key: run.concurrency.as_ref().map(|c| JobKey {
                key: Self::key_of(&run.flow_id, &c.key),
                limit: c.limit,
            }),
            priority: run.priority,
            ..Self::run(run.id.clone())
        }
    }

    /// The queue's key for concurrency key `key` of flow `flow_id`: keys are per flow.
    pub fn key_of(flow_id: &str, key: &str) -> String {
        format!("{flow_id}:{key}")
    }

    /// The same job, not ready before `at`.
    pub fn not_before(self, at: DateTime<Utc>) -> Self {
        Self {
            not_before: Some(at),
            ..self
        }
    }

    /// The same job, with a concurrency key.
    pub fn keyed(self, key: JobKey) -> Self {
        Self {
            key: Some(key),
            ..self
        }
    }

    /// The same job, with a priority (capped at [`MAX_PRIORITY`]).
    pub fn with_priority(self, priority: u8) -> Self {
        Self {
            priority: priority.min(MAX_PRIORITY),
            ..self
        }
    }
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
    /// Held back behind their concurrency key, whose slots are all taken.
    pub held_back: u64,
}

/// Hands runs to workers: at-least-once delivery with leases, one queue per worker group.
///
/// A job leased and not acked before its lease lapses is delivered again; after
/// `max_deliveries` deliveries it moves to the dead-letter list instead, unless it holds a
/// concurrency slot.
///
/// Ready jobs are leased by priority, then in the order they became ready. A job with a
/// concurrency key ([`JobKey`]) takes one of its key's slots when it becomes ready, and keeps it
/// while ready or leased, across lapsed leases (another worker takes the job, and the slot with
/// it), until it is acked or nacked to a later time; the next job behind the key then takes it.
/// It is never dead-lettered: its run has steps to go, and the next run of its key must not
/// start before it ends (the server fails a run that too many workers lost, then acks its job).
/// Jobs behind a full key cost the other keys nothing.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Adds a job to `group`'s queue. Returns the job id. A run whose latest job is not held by
    /// a worker keeps that job (its id is returned): enqueuing a run again is cheap and adds
    /// nothing while it waits.
    async fn enqueue(&self, group: &str, job: NewJob) -> StoreResult<String>;
    /// How many jobs wait behind concurrency key `key` of `group` (see [`JobKey`]).
    async fn held_back(&self, group: &str, key: &str) -> StoreResult<u64>;
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
