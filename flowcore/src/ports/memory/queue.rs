//! The in-process queue.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::{lock, ttl_to_chrono};
use crate::error::StoreError;
use crate::ids::{RunId, new_id};
use crate::ports::{Job, LeasedJob, Queue, QueueDepth, StoreResult, Take};

/// An in-process queue with leases, delays and a dead-letter list: the embedded twin of the
/// Redis queue.
#[derive(Debug)]
pub struct MemoryQueue {
    max_deliveries: u32,
    state: Mutex<HashMap<String, GroupState>>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct GroupState {
    seq: u64,
    jobs: HashMap<String, QueuedJob>,
    /// Every job once: keyed by when it is due (ready time, or lease expiry when leased).
    due: BTreeSet<(DateTime<Utc>, u64, String)>,
    dead: Vec<Job>,
}

#[derive(Debug)]
struct QueuedJob {
    job: Job,
    due: (DateTime<Utc>, u64),
    token: Option<String>,
}

impl MemoryQueue {
    /// A queue that dead-letters a job after `max_deliveries` deliveries.
    pub fn new(max_deliveries: u32) -> Self {
        Self {
            max_deliveries: max_deliveries.max(1),
            state: Mutex::default(),
            notify: Notify::new(),
        }
    }

    fn try_lease(
        &self,
        group: &str,
        max: usize,
        ttl: Duration,
    ) -> (Vec<LeasedJob>, Option<DateTime<Utc>>) {
        let mut groups = lock(&self.state);
        let g = groups.entry(group.to_owned()).or_default();
        let now = Utc::now();
        let mut out = Vec::new();
        while out.len() < max {
            let Some(first) = g.due.first().cloned() else {
                break;
            };
            if first.0 > now {
                break;
            }
            g.due.pop_first();
            let id = first.2;
            let Some(q) = g.jobs.get_mut(&id) else {
                continue;
            };
            if q.job.deliveries >= self.max_deliveries {
                if let Some(q) = g.jobs.remove(&id) {
                    g.dead.push(q.job);
                }
                continue;
            }
            q.job.deliveries += 1;
            let token = new_id();
            q.token = Some(token.clone());
            g.seq += 1;
            q.due = (now + ttl_to_chrono(ttl), g.seq);
            g.due.insert((q.due.0, q.due.1, id));
            out.push(LeasedJob {
                job: q.job.clone(),
                group: group.to_owned(),
                token,
            });
        }
        let next_due = g.due.first().map(|d| d.0);
        (out, next_due)
    }

    fn with_lease<T>(
        &self,
        leased: &LeasedJob,
        f: impl FnOnce(&mut GroupState, &str) -> T,
    ) -> StoreResult<T> {
        let mut groups = lock(&self.state);
        let g = groups.entry(leased.group.clone()).or_default();
        match g.jobs.get(&leased.job.id) {
            Some(q) if q.token.as_deref() == Some(leased.token.as_str()) => {
                Ok(f(g, &leased.job.id))
            }
            _ => Err(StoreError::StaleLease(format!(
                "job `{}` was delivered again or finished",
                leased.job.id
            ))),
        }
    }
}

impl Default for MemoryQueue {
    fn default() -> Self {
        Self::new(5)
    }
}

impl GroupState {
    fn reschedule(&mut self, id: &str, at: DateTime<Utc>, token: Option<String>) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(q) = self.jobs.get_mut(id) {
            self.due.remove(&(q.due.0, q.due.1, id.to_owned()));
            q.due = (at, seq);
            q.token = token;
            self.due.insert((at, seq, id.to_owned()));
        }
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn enqueue(
        &self,
        group: &str,
        run_id: &RunId,
        not_before: Option<DateTime<Utc>>,
    ) -> StoreResult<String> {
        let id = new_id();
        {
            let mut groups = lock(&self.state);
            let g = groups.entry(group.to_owned()).or_default();
            g.seq += 1;
            let due = (not_before.unwrap_or_else(Utc::now), g.seq);
            g.due.insert((due.0, due.1, id.clone()));
            let job = Job {
                id: id.clone(),
                run_id: run_id.clone(),
                deliveries: 0,
            };
            g.jobs.insert(
                id.clone(),
                QueuedJob {
                    job,
                    due,
                    token: None,
                },
            );
        }
        self.notify.notify_waiters();
        Ok(id)
    }

    async fn lease(&self, group: &str, take: Take) -> StoreResult<Vec<LeasedJob>> {
        let Take { max, ttl, wait } = take;
        let until = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so an enqueue between the look and the wait
            // is not missed.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (jobs, next_due) = self.try_lease(group, max.max(1), ttl);
            let now = tokio::time::Instant::now();
            if !jobs.is_empty() || now >= until {
                return Ok(jobs);
            }
            let mut sleep_for = until - now;
            if let Some(due) = next_due {
                let until_due = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO)
                    + Duration::from_millis(1);
                sleep_for = sleep_for.min(until_due);
            }
            let _ = tokio::time::timeout(sleep_for, notified).await;
        }
    }

    async fn heartbeat(&self, job: &LeasedJob, ttl: Duration) -> StoreResult<()> {
        let at = Utc::now() + ttl_to_chrono(ttl);
        self.with_lease(job, |g, id| g.reschedule(id, at, Some(job.token.clone())))
    }

    async fn ack(&self, job: &LeasedJob) -> StoreResult<()> {
        let mut groups = lock(&self.state);
        let g = groups.entry(job.group.clone()).or_default();
        match g.jobs.get(&job.job.id) {
            // Already gone: acked before (by this delivery or a later one). Nothing to undo.
            None => Ok(()),
            Some(q) if q.token.as_deref() == Some(job.token.as_str()) => {
                if let Some(q) = g.jobs.remove(&job.job.id) {
                    g.due.remove(&(q.due.0, q.due.1, job.job.id.clone()));
                }
                Ok(())
            }
            Some(_) => Err(StoreError::StaleLease(format!(
                "job `{}` was delivered again",
                job.job.id
            ))),
        }
    }

    async fn nack(&self, job: &LeasedJob, retry_at: Option<DateTime<Utc>>) -> StoreResult<()> {
        let at = retry_at.unwrap_or_else(Utc::now);
        self.with_lease(job, |g, id| g.reschedule(id, at, None))?;
        self.notify.notify_waiters();
        Ok(())
    }

    async fn depth(&self, group: &str) -> StoreResult<QueueDepth> {
        let groups = lock(&self.state);
        let Some(g) = groups.get(group) else {
            return Ok(QueueDepth::default());
        };
        let now = Utc::now();
        let mut depth = QueueDepth {
            dead: g.dead.len() as u64,
            ..QueueDepth::default()
        };
        for q in g.jobs.values() {
            match (&q.token, q.due.0 <= now) {
                (Some(_), false) => depth.leased += 1,
                (None, false) => depth.delayed += 1,
                (_, true) => depth.ready += 1,
            }
        }
        Ok(depth)
    }
}
