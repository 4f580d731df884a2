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
use crate::ports::{
    Job, JobKey, LeasedJob, MAX_PRIORITY, NewJob, Queue, QueueDepth, StoreResult, Take,
};

/// An in-process queue with leases, delays, priorities, concurrency keys and a dead-letter
/// list: the embedded twin of the Redis queue.
#[derive(Debug)]
pub struct MemoryQueue {
    max_deliveries: u32,
    state: Mutex<HashMap<String, GroupState>>,
    notify: Notify,
}

/// A job's place among the ready: priority first (9 first), then order of arrival.
type Rank = (u8, u64);

#[derive(Debug, Default)]
struct GroupState {
    seq: u64,
    jobs: HashMap<String, QueuedJob>,
    /// Jobs waiting for a time: delayed ones (until due) and leased ones (until the lease
    /// lapses).
    timed: BTreeSet<(DateTime<Utc>, u64, String)>,
    /// Jobs ready to be leased, by rank.
    ready: BTreeSet<(Rank, String)>,
    /// The concurrency keys in use: slots taken, and the jobs held back behind the key.
    keys: HashMap<String, Gate>,
    /// Each run's latest job: a run enqueued again while that job is not leased keeps it.
    by_run: HashMap<RunId, String>,
    dead: Vec<Job>,
}

#[derive(Debug, Default)]
struct Gate {
    held: u32,
    backlog: BTreeSet<(Rank, String)>,
}

#[derive(Debug)]
struct QueuedJob {
    job: Job,
    rank: Rank,
    key: Option<JobKey>,
    /// Whether it holds one of its key's slots.
    admitted: bool,
    /// Its entry in `timed`, while delayed or leased.
    timed: Option<(DateTime<Utc>, u64)>,
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
        g.promote_due(now);
        let mut out = Vec::new();
        while out.len() < max {
            let Some((_, id)) = g.ready.pop_first() else {
                break;
            };
            let Some(q) = g.jobs.get_mut(&id) else {
                continue;
            };
            // A job holding its key's slot is never dead-lettered (see the Redis queue's
            // lease script): its run's guard against workers dying bounds its deliveries.
            if q.job.deliveries >= self.max_deliveries && !q.admitted {
                if let Some(q) = g.remove(&id) {
                    g.dead.push(q.job);
                }
                continue;
            }
            q.job.deliveries += 1;
            let token = new_id();
            q.token = Some(token.clone());
            out.push(LeasedJob {
                job: q.job.clone(),
                group: group.to_owned(),
                token,
            });
            g.set_timed(&id, now + ttl_to_chrono(ttl));
        }
        let next_due = g.timed.first().map(|d| d.0);
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
    /// Moves job `id` into `timed` at `at` (out of wherever it was).
    fn set_timed(&mut self, id: &str, at: DateTime<Utc>) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(q) = self.jobs.get_mut(id) {
            if let Some((t, s)) = q.timed.take() {
                self.timed.remove(&(t, s, id.to_owned()));
            }
            self.ready.remove(&(q.rank, id.to_owned()));
            q.timed = Some((at, seq));
            self.timed.insert((at, seq, id.to_owned()));
        }
    }

    /// Moves the jobs whose time came out of `timed`: a lapsed lease back among the ready
    /// (with the slot it holds), a delayed job through its key's gate.
    fn promote_due(&mut self, now: DateTime<Utc>) {
        while let Some(first) = self.timed.first().cloned() {
            if first.0 > now {
                break;
            }
            self.timed.pop_first();
            let id = first.2;
            if let Some(q) = self.jobs.get_mut(&id) {
                q.timed = None;
                self.make_ready(&id);
            }
        }
    }

    /// Makes job `id` ready: at once when it has no key or holds a slot already, else behind
    /// its key.
    fn make_ready(&mut self, id: &str) {
        let Some(q) = self.jobs.get(id) else { return };
        match &q.key {
            Some(key) if !q.admitted => {
                let key = key.key.clone();
                let rank = q.rank;
                self.keys
                    .entry(key.clone())
                    .or_default()
                    .backlog
                    .insert((rank, id.to_owned()));
                self.admit(&key);
            }
            _ => {
                self.ready.insert((q.rank, id.to_owned()));
            }
        }
    }

    /// Gives the free slots of `key` to the jobs first behind it.
    fn admit(&mut self, key: &str) {
        let Some(gate) = self.keys.get_mut(key) else {
            return;
        };
        while let Some((rank, id)) = gate.backlog.first().cloned() {
            let Some(q) = self.jobs.get_mut(&id) else {
                gate.backlog.pop_first();
                continue;
            };
            let limit = q.key.as_ref().map_or(1, |k| k.limit.max(1));
            if gate.held >= limit {
                break;
            }
            gate.backlog.pop_first();
            gate.held += 1;
            q.admitted = true;
            self.ready.insert((rank, id));
        }
        if gate.held == 0 && gate.backlog.is_empty() {
            self.keys.remove(key);
        }
    }

    /// Gives back the slot `q` holds, if any, to the next job behind its key.
    fn release(&mut self, q: &QueuedJob) {
        if let (Some(key), true) = (&q.key, q.admitted) {
            if let Some(gate) = self.keys.get_mut(&key.key) {
                gate.held = gate.held.saturating_sub(1);
            }
            self.admit(&key.key);
        }
    }

    /// Takes job `id` out of every index, and frees its slot.
    fn remove(&mut self, id: &str) -> Option<QueuedJob> {
        let q = self.jobs.remove(id)?;
        if self.by_run.get(&q.job.run_id).is_some_and(|j| j == id) {
            self.by_run.remove(&q.job.run_id);
        }
        if let Some((t, s)) = q.timed {
            self.timed.remove(&(t, s, id.to_owned()));
        }
        self.ready.remove(&(q.rank, id.to_owned()));
        if let Some(key) = &q.key
            && let Some(gate) = self.keys.get_mut(&key.key)
        {
            gate.backlog.remove(&(q.rank, id.to_owned()));
        }
        self.release(&q);
        Some(q)
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn enqueue(&self, group: &str, new: NewJob) -> StoreResult<String> {
        let id = new_id();
        {
            let mut groups = lock(&self.state);
            let g = groups.entry(group.to_owned()).or_default();
            // The run has a job that no worker holds: that one will do (the sweeps that find
            // runs without a job would otherwise pile up jobs of runs waiting behind a key).
            if let Some(existing) = g.by_run.get(&new.run_id)
                && g.jobs.get(existing).is_some_and(|q| q.token.is_none())
            {
                return Ok(existing.clone());
            }
            g.by_run.insert(new.run_id.clone(), id.clone());
            g.seq += 1;
            let job = Job {
                id: id.clone(),
                run_id: new.run_id,
                deliveries: 0,
            };
            g.jobs.insert(
                id.clone(),
                QueuedJob {
                    job,
                    rank: (MAX_PRIORITY - new.priority.min(MAX_PRIORITY), g.seq),
                    key: new.key,
                    admitted: false,
                    timed: None,
                    token: None,
                },
            );
            match new.not_before {
                Some(at) if at > Utc::now() => g.set_timed(&id, at),
                _ => g.make_ready(&id),
            }
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
        self.with_lease(job, |g, id| g.set_timed(id, at))
    }

    async fn ack(&self, job: &LeasedJob) -> StoreResult<()> {
        {
            let mut groups = lock(&self.state);
            let g = groups.entry(job.group.clone()).or_default();
            match g.jobs.get(&job.job.id) {
                // Already gone: acked before (by this delivery or a later one). Nothing to undo.
                None => return Ok(()),
                Some(q) if q.token.as_deref() == Some(job.token.as_str()) => {
                    g.remove(&job.job.id);
                }
                Some(_) => {
                    return Err(StoreError::StaleLease(format!(
                        "job `{}` was delivered again",
                        job.job.id
                    )));
                }
            }
        }
        // Its slot may have made another job ready.
        self.notify.notify_waiters();
        Ok(())
    }

    async fn nack(&self, job: &LeasedJob, retry_at: Option<DateTime<Utc>>) -> StoreResult<()> {
        let now = Utc::now();
        self.with_lease(job, |g, id| {
            if let Some(q) = g.jobs.get_mut(id) {
                q.token = None;
            }
            match retry_at {
                // Later: it gives its slot back meanwhile, and queues for one when due.
                Some(at) if at > now => {
                    g.set_timed(id, at);
                    let released = g.jobs.get_mut(id).map(|q| {
                        let was = q.admitted;
                        q.admitted = false;
                        (q.key.clone(), was)
                    });
                    if let Some((Some(key), true)) = released {
                        if let Some(gate) = g.keys.get_mut(&key.key) {
                            gate.held = gate.held.saturating_sub(1);
                        }
                        g.admit(&key.key);
                    }
                }
                // Now: ready again at once, with the slot it holds.
                _ => {
                    if let Some(q) = g.jobs.get_mut(id)
                        && let Some((t, s)) = q.timed.take()
                    {
                        g.timed.remove(&(t, s, id.to_owned()));
                    }
                    g.make_ready(id);
                }
            }
        })?;
        self.notify.notify_waiters();
        Ok(())
    }

    async fn held_back(&self, group: &str, key: &str) -> StoreResult<u64> {
        let groups = lock(&self.state);
        Ok(groups
            .get(group)
            .and_then(|g| g.keys.get(key))
            .map_or(0, |gate| gate.backlog.len() as u64))
    }

    async fn depth(&self, group: &str) -> StoreResult<QueueDepth> {
        let groups = lock(&self.state);
        let Some(g) = groups.get(group) else {
            return Ok(QueueDepth::default());
        };
        let now = Utc::now();
        let mut depth = QueueDepth {
            dead: g.dead.len() as u64,
            ready: g.ready.len() as u64,
            held_back: g.keys.values().map(|k| k.backlog.len() as u64).sum(),
            ..QueueDepth::default()
        };
        for q in g.jobs.values() {
            match (q.timed, &q.token) {
                (Some((at, _)), _) if at <= now => depth.ready += 1,
                (Some(_), Some(_)) => depth.leased += 1,
                (Some(_), None) => depth.delayed += 1,
                (None, _) => {}
            }
        }
        Ok(depth)
    }
}
