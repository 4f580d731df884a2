//! In-memory implementations of the ports: the embedded defaults for tests and for services that
//! embed flowcore with no servers. They keep everything in the process and lose it on exit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::{
    ApiKeyRecord, ApiKeyStore, BlobStore, CredentialStore, EventBus, EventRecord, FileRecord,
    FileStore, FlowStore, Job, Lease, LeasedJob, NewRun, Page, Queue, QueueDepth, RateDecision,
    RateLimiter, RunFilter, RunOutcome, RunRecord, RunStore, StoreResult, StoredCredential,
    StoredFlow, UsageDay, UsageStore, is_valid_blob_key,
};
use crate::error::StoreError;
use crate::ids::{RunId, new_id};
use crate::model::FlowDef;
use crate::run::{Move, RunStatus, StepRecord};

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical section
/// here leaves the state consistent before anything can panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn parse_cursor(cursor: Option<&str>) -> StoreResult<u64> {
    match cursor {
        None => Ok(u64::MAX),
        Some(c) => c
            .parse()
            .map_err(|_| StoreError::Invalid(format!("invalid cursor `{c}`"))),
    }
}

fn ttl_to_chrono(ttl: Duration) -> chrono::Duration {
    chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}

/// Flows in memory.
#[derive(Debug, Default)]
pub struct MemoryFlowStore {
    state: Mutex<FlowState>,
}

#[derive(Debug, Default)]
struct FlowState {
    next_seq: u64,
    /// id -> (seq of the latest version, versions)
    flows: HashMap<String, (u64, Vec<StoredFlow>)>,
    /// seq -> id, to list newest first.
    order: BTreeMap<u64, String>,
}

impl MemoryFlowStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn flow_id(flow: &FlowDef) -> StoreResult<&str> {
    flow.id
        .as_deref()
        .ok_or_else(|| StoreError::Invalid("a stored flow needs an id".into()))
}

#[async_trait]
impl FlowStore for MemoryFlowStore {
    async fn create(&self, flow: &FlowDef) -> StoreResult<StoredFlow> {
        let id = flow_id(flow)?.to_owned();
        let mut st = lock(&self.state);
        if st.flows.contains_key(&id) {
            return Err(StoreError::AlreadyExists(format!("flow `{id}` exists")));
        }
        st.next_seq += 1;
        let seq = st.next_seq;
        let stored = StoredFlow {
            id: id.clone(),
            version: 1,
            definition: flow.clone(),
            created_at: Utc::now(),
        };
        st.flows.insert(id.clone(), (seq, vec![stored.clone()]));
        st.order.insert(seq, id);
        Ok(stored)
    }

    async fn update(&self, id: &str, flow: &FlowDef) -> StoreResult<StoredFlow> {
        let mut st = lock(&self.state);
        st.next_seq += 1;
        let seq = st.next_seq;
        let (old_seq, versions) = st
            .flows
            .get_mut(id)
            .ok_or_else(|| StoreError::not_found("flow", id))?;
        let mut definition = flow.clone();
        definition.id = Some(id.to_owned());
        let version = versions.last().map_or(1, |v| v.version + 1);
        let stored = StoredFlow {
            id: id.to_owned(),
            version,
            definition,
            created_at: Utc::now(),
        };
        versions.push(stored.clone());
        let old = std::mem::replace(old_seq, seq);
        st.order.remove(&old);
        st.order.insert(seq, id.to_owned());
        Ok(stored)
    }

    async fn get(&self, id: &str, version: Option<u32>) -> StoreResult<StoredFlow> {
        let st = lock(&self.state);
        let (_, versions) = st
            .flows
            .get(id)
            .ok_or_else(|| StoreError::not_found("flow", id))?;
        match version {
            None => versions.last().cloned(),
            Some(v) => versions.iter().find(|s| s.version == v).cloned(),
        }
        .ok_or_else(|| {
            StoreError::not_found("flow version", format!("{id}@{}", version.unwrap_or(0)))
        })
    }

    async fn list(&self, limit: usize, cursor: Option<&str>) -> StoreResult<Page<StoredFlow>> {
        let before = parse_cursor(cursor)?;
        let st = lock(&self.state);
        let limit = limit.clamp(1, 1000);
        let mut items = Vec::new();
        let mut last = None;
        for (seq, id) in st.order.range(..before).rev().take(limit) {
            if let Some((_, versions)) = st.flows.get(id) {
                items.extend(versions.last().cloned());
            }
            last = Some(*seq);
        }
        let more = last.is_some_and(|l| st.order.range(..l).next().is_some());
        Ok(Page {
            items,
            next_cursor: if more {
                last.map(|l| l.to_string())
            } else {
                None
            },
        })
    }

    async fn delete(&self, id: &str) -> StoreResult<()> {
        let mut st = lock(&self.state);
        let (seq, _) = st
            .flows
            .remove(id)
            .ok_or_else(|| StoreError::not_found("flow", id))?;
        st.order.remove(&seq);
        Ok(())
    }
}

/// Runs in memory.
#[derive(Debug, Default)]
pub struct MemoryRunStore {
    state: Mutex<RunState>,
}

#[derive(Debug, Default)]
struct RunState {
    next_seq: u64,
    runs: HashMap<RunId, (u64, RunRecord)>,
    order: BTreeMap<u64, RunId>,
    idempotency: HashMap<(String, String), RunId>,
    steps: HashMap<RunId, Vec<StepRecord>>,
}

impl MemoryRunStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl RunState {
    fn upsert_steps(&mut self, id: &RunId, steps: &[StepRecord]) {
        let stored = self.steps.entry(id.clone()).or_default();
        for step in steps {
            match stored.iter_mut().find(|s| s.node == step.node) {
                Some(existing) => *existing = step.clone(),
                None => stored.push(step.clone()),
            }
        }
    }

    fn run_mut(&mut self, id: &RunId) -> StoreResult<&mut RunRecord> {
        self.runs
            .get_mut(id)
            .map(|(_, r)| r)
            .ok_or_else(|| StoreError::not_found("run", id.as_str()))
    }

    /// The run, if `epoch` is its current lease and it is running.
    fn owned_mut(&mut self, id: &RunId, epoch: u64) -> StoreResult<&mut RunRecord> {
        let run = self.run_mut(id)?;
        if run.epoch != epoch || !run.status.is_leased() {
            return Err(StoreError::StaleLease(format!(
                "run `{id}` is {} at epoch {}, not running at epoch {epoch}",
                run.status, run.epoch
            )));
        }
        Ok(run)
    }
}

#[async_trait]
impl RunStore for MemoryRunStore {
    async fn create(&self, run: NewRun) -> StoreResult<(RunRecord, bool)> {
        let mut st = lock(&self.state);
        if let Some(key) = &run.idempotency_key
            && let Some(existing) = st.idempotency.get(&(run.flow_id.clone(), key.clone()))
        {
            let existing = existing.clone();
            return Ok((st.run_mut(&existing)?.clone(), false));
        }
        if st.runs.contains_key(&run.id) {
            return Err(StoreError::AlreadyExists(format!(
                "run `{}` exists",
                run.id
            )));
        }
        st.next_seq += 1;
        let seq = st.next_seq;
        let now = Utc::now();
        let lease = run.claim.as_ref().map(|c| Lease {
            owner: c.owner.clone(),
            expires_at: now + ttl_to_chrono(c.ttl),
            epoch: 1,
        });
        let record = RunRecord {
            id: run.id.clone(),
            flow_id: run.flow_id.clone(),
            flow_version: run.flow_version,
            status: if lease.is_some() {
                RunStatus::Running
            } else {
                RunStatus::Queued
            },
            input: run.input,
            output: None,
            error: None,
            idempotency_key: run.idempotency_key.clone(),
            created_at: now,
            started_at: lease.as_ref().map(|_| now),
            finished_at: None,
            epoch: u64::from(lease.is_some()),
            lease,
            trigger: run.trigger,
        };
        if let Some(key) = run.idempotency_key {
            st.idempotency.insert((run.flow_id, key), run.id.clone());
        }
        st.order.insert(seq, run.id.clone());
        st.runs.insert(run.id, (seq, record.clone()));
        Ok((record, true))
    }

    async fn get(&self, id: &RunId) -> StoreResult<RunRecord> {
        lock(&self.state).run_mut(id).map(|r| r.clone())
    }

    async fn list(&self, filter: &RunFilter) -> StoreResult<Page<RunRecord>> {
        let before = parse_cursor(filter.cursor.as_deref())?;
        let limit = filter.limit.clamp(1, 1000);
        let st = lock(&self.state);
        let mut items = Vec::new();
        let mut next_cursor = None;
        for (seq, id) in st.order.range(..before).rev() {
            let Some((_, run)) = st.runs.get(id) else {
                continue;
            };
            if filter.flow_id.as_ref().is_some_and(|f| *f != run.flow_id)
                || filter.status.is_some_and(|s| s != run.status)
            {
                continue;
            }
            if items.len() == limit {
                // The cursor is exclusive: this run, the first not returned, opens the next page.
                next_cursor = Some((seq + 1).to_string());
                break;
            }
            items.push(run.clone());
        }
        Ok(Page { items, next_cursor })
    }

    async fn claim(&self, id: &RunId, owner: &str, ttl: Duration) -> StoreResult<Lease> {
        let mut st = lock(&self.state);
        let run = st.run_mut(id)?;
        let now = Utc::now();
        let claimable = Move::Claim.starts_from(run.status)
            && run.lease.as_ref().is_none_or(|l| l.expires_at <= now);
        if !claimable {
            return Err(StoreError::Conflict(format!(
                "run `{id}` is {} and not claimable",
                run.status
            )));
        }
        run.epoch += 1;
        let lease = Lease {
            owner: owner.to_owned(),
            expires_at: now + ttl_to_chrono(ttl),
            epoch: run.epoch,
        };
        run.status = RunStatus::Running;
        run.started_at.get_or_insert(now);
        run.lease = Some(lease.clone());
        Ok(lease)
    }

    async fn renew(&self, id: &RunId, epoch: u64, ttl: Duration) -> StoreResult<Lease> {
        let mut st = lock(&self.state);
        let run = st.owned_mut(id, epoch)?;
        let lease = run
            .lease
            .as_mut()
            .ok_or_else(|| StoreError::StaleLease(format!("run `{id}` has no lease")))?;
        lease.expires_at = Utc::now() + ttl_to_chrono(ttl);
        Ok(lease.clone())
    }

    async fn record_steps(&self, id: &RunId, epoch: u64, steps: &[StepRecord]) -> StoreResult<()> {
        let mut st = lock(&self.state);
        st.owned_mut(id, epoch)?;
        st.upsert_steps(id, steps);
        Ok(())
    }

    async fn steps(&self, id: &RunId) -> StoreResult<Vec<StepRecord>> {
        let mut st = lock(&self.state);
        st.run_mut(id)?;
        Ok(st.steps.get(id).cloned().unwrap_or_default())
    }

    async fn finish(&self, id: &RunId, epoch: u64, outcome: RunOutcome) -> StoreResult<RunRecord> {
        if !outcome.status.is_final() {
            return Err(StoreError::Invalid(format!(
                "`{}` is not a final status",
                outcome.status
            )));
        }
        let mut st = lock(&self.state);
        let run = st.owned_mut(id, epoch)?;
        if run.status.move_to(outcome.status) != Some(Move::Finish) {
            return Err(StoreError::Invalid(format!(
                "a {} run cannot be finished as {}",
                run.status, outcome.status
            )));
        }
        run.status = outcome.status;
        run.output = outcome.output;
        run.error = outcome.error;
        run.finished_at = Some(Utc::now());
        run.lease = None;
        let record = run.clone();
        st.upsert_steps(id, &outcome.steps);
        Ok(record)
    }

    async fn release(&self, id: &RunId, epoch: u64) -> StoreResult<()> {
        let mut st = lock(&self.state);
        let run = st.owned_mut(id, epoch)?;
        run.status = RunStatus::Queued;
        run.lease = None;
        Ok(())
    }

    async fn transition(
        &self,
        id: &RunId,
        from: RunStatus,
        to: RunStatus,
    ) -> StoreResult<RunRecord> {
        Move::unowned(from, to)?;
        let mut st = lock(&self.state);
        let run = st.run_mut(id)?;
        if run.status != from {
            return Err(StoreError::Conflict(format!(
                "run `{id}` is {}, not {from}",
                run.status
            )));
        }
        run.status = to;
        if to.is_final() {
            run.finished_at = Some(Utc::now());
            run.lease = None;
        }
        Ok(run.clone())
    }

    async fn expired(
        &self,
        after: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> StoreResult<Vec<(RunId, Option<DateTime<Utc>>)>> {
        let st = lock(&self.state);
        let mut found: Vec<(RunId, Option<DateTime<Utc>>)> = st
            .order
            .values()
            .filter_map(|id| st.runs.get(id))
            .filter(|(_, r)| r.status == RunStatus::Running)
            .map(|(_, r)| (r.id.clone(), r.lease.as_ref().map(|l| l.expires_at)))
            .filter(|(_, expires)| match (after, expires) {
                (None, None) => true,
                (None, Some(at)) => *at <= now,
                (Some(_), None) => false,
                (Some(after), Some(at)) => *at > after && *at <= now,
            })
            .collect();
        if after.is_some() {
            found.sort_by_key(|(_, at)| *at);
        }
        found.truncate(limit);
        Ok(found)
    }

    async fn prune(&self, before: DateTime<Utc>, batch: usize) -> StoreResult<usize> {
        let mut st = lock(&self.state);
        let doomed: Vec<(u64, RunId)> = st
            .order
            .iter()
            .filter_map(|(seq, id)| st.runs.get(id).map(|(_, r)| (*seq, r)))
            .filter(|(_, r)| r.status.is_final() && r.created_at < before)
            .map(|(seq, r)| (seq, r.id.clone()))
            .take(batch)
            .collect();
        for (seq, id) in &doomed {
            st.order.remove(seq);
            if let Some((_, run)) = st.runs.remove(id)
                && let Some(key) = run.idempotency_key
            {
                st.idempotency.remove(&(run.flow_id, key));
            }
            st.steps.remove(id);
        }
        Ok(doomed.len())
    }
}

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

    async fn lease(
        &self,
        group: &str,
        max: usize,
        ttl: Duration,
        wait: Duration,
    ) -> StoreResult<Vec<LeasedJob>> {
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

    async fn dead_letters(&self, group: &str, limit: usize) -> StoreResult<Vec<Job>> {
        let groups = lock(&self.state);
        Ok(groups
            .get(group)
            .map(|g| g.dead.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }
}

/// Blobs in memory.
#[derive(Debug, Default)]
pub struct MemoryBlobStore {
    blobs: Mutex<HashMap<String, Vec<u8>>>,
}

impl MemoryBlobStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn check_key(key: &str) -> StoreResult<()> {
    if is_valid_blob_key(key) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("invalid blob key `{key}`")))
    }
}

#[async_trait]
impl BlobStore for MemoryBlobStore {
    async fn put(&self, key: &str, data: Vec<u8>) -> StoreResult<()> {
        check_key(key)?;
        lock(&self.blobs).insert(key.to_owned(), data);
        Ok(())
    }
    async fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        check_key(key)?;
        lock(&self.blobs)
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::not_found("blob", key))
    }
    async fn stat(&self, key: &str) -> StoreResult<Option<u64>> {
        check_key(key)?;
        Ok(lock(&self.blobs).get(key).map(|b| b.len() as u64))
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        check_key(key)?;
        lock(&self.blobs).remove(key);
        Ok(())
    }
    async fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let blobs = lock(&self.blobs);
        Ok(blobs
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }
}

/// Credentials, API keys, usage and files in memory.
#[derive(Debug, Default)]
pub struct MemoryMetaStore {
    state: Mutex<MetaState>,
}

#[derive(Debug, Default)]
struct MetaState {
    credentials: Vec<StoredCredential>,
    api_keys: Vec<ApiKeyRecord>,
    usage: BTreeMap<(String, String), UsageDay>,
    files: HashMap<String, FileRecord>,
}

impl MemoryMetaStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl CredentialStore for MemoryMetaStore {
    async fn insert_credential(&self, credential: &StoredCredential) -> StoreResult<()> {
        let mut st = lock(&self.state);
        if st
            .credentials
            .iter()
            .any(|c| c.name == credential.name || c.id == credential.id)
        {
            return Err(StoreError::AlreadyExists(format!(
                "credential `{}` exists",
                credential.name
            )));
        }
        st.credentials.push(credential.clone());
        Ok(())
    }
    async fn get_credential(&self, id_or_name: &str) -> StoreResult<StoredCredential> {
        lock(&self.state)
            .credentials
            .iter()
            .find(|c| c.id == id_or_name || c.name == id_or_name)
            .cloned()
            .ok_or_else(|| StoreError::not_found("credential", id_or_name))
    }
    async fn list_credentials(&self) -> StoreResult<Vec<StoredCredential>> {
        Ok(lock(&self.state).credentials.clone())
    }
    async fn reencrypt_credential(
        &self,
        id: &str,
        old_key_id: &str,
        key_id: &str,
        ciphertext: &[u8],
    ) -> StoreResult<()> {
        let mut st = lock(&self.state);
        let c = st
            .credentials
            .iter_mut()
            .find(|c| c.id == id)
            .ok_or_else(|| StoreError::not_found("credential", id))?;
        if c.key_id != old_key_id {
            return Err(StoreError::Conflict(format!(
                "credential `{id}` is under key `{}`, not `{old_key_id}`",
                c.key_id
            )));
        }
        c.key_id = key_id.to_owned();
        c.ciphertext = ciphertext.to_vec();
        c.updated_at = Utc::now();
        Ok(())
    }
    async fn delete_credential(&self, id: &str) -> StoreResult<()> {
        let mut st = lock(&self.state);
        let before = st.credentials.len();
        st.credentials.retain(|c| c.id != id);
        if st.credentials.len() == before {
            Err(StoreError::not_found("credential", id))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl ApiKeyStore for MemoryMetaStore {
    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        let mut st = lock(&self.state);
        if st
            .api_keys
            .iter()
            .any(|k| k.prefix == key.prefix || k.id == key.id)
        {
            return Err(StoreError::AlreadyExists(format!(
                "API key prefix `{}` exists",
                key.prefix
            )));
        }
        st.api_keys.push(key.clone());
        Ok(())
    }
    async fn find_api_key(&self, prefix: &str) -> StoreResult<Option<ApiKeyRecord>> {
        Ok(lock(&self.state)
            .api_keys
            .iter()
            .find(|k| k.prefix == prefix)
            .cloned())
    }
    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        Ok(lock(&self.state).api_keys.clone())
    }
    async fn revoke_api_key(&self, id: &str) -> StoreResult<()> {
        let mut st = lock(&self.state);
        if !st.api_keys.iter().any(|k| k.id == id) {
            return Err(StoreError::not_found("API key", id));
        }
        let now = Utc::now();
        let mut tree = vec![id.to_owned()];
        while let Some(parent) = tree.pop() {
            for key in &mut st.api_keys {
                if key.id == parent || key.parent_id.as_deref() == Some(&parent) {
                    if key.id != parent {
                        tree.push(key.id.clone());
                    }
                    key.revoked_at.get_or_insert(now);
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl UsageStore for MemoryMetaStore {
    async fn add_usage(
        &self,
        flow_id: &str,
        day: &str,
        runs: u64,
        node_executions: u64,
        tokens: u64,
    ) -> StoreResult<()> {
        let mut st = lock(&self.state);
        let entry = st
            .usage
            .entry((flow_id.to_owned(), day.to_owned()))
            .or_insert_with(|| UsageDay {
                flow_id: flow_id.to_owned(),
                day: day.to_owned(),
                runs: 0,
                node_executions: 0,
                tokens: 0,
            });
        entry.runs += runs;
        entry.node_executions += node_executions;
        entry.tokens += tokens;
        Ok(())
    }
    async fn usage(
        &self,
        flow_id: Option<&str>,
        from_day: &str,
        to_day: &str,
    ) -> StoreResult<Vec<UsageDay>> {
        Ok(lock(&self.state)
            .usage
            .values()
            .filter(|u| {
                flow_id.is_none_or(|f| f == u.flow_id)
                    && u.day.as_str() >= from_day
                    && u.day.as_str() <= to_day
            })
            .cloned()
            .collect())
    }
}

#[async_trait]
impl FileStore for MemoryMetaStore {
    async fn insert_file(&self, file: &FileRecord) -> StoreResult<()> {
        let mut st = lock(&self.state);
        if st.files.contains_key(&file.id) {
            return Err(StoreError::AlreadyExists(format!(
                "file `{}` exists",
                file.id
            )));
        }
        st.files.insert(file.id.clone(), file.clone());
        Ok(())
    }
    async fn get_file(&self, id: &str) -> StoreResult<FileRecord> {
        lock(&self.state)
            .files
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::not_found("file", id))
    }
    async fn delete_file(&self, id: &str) -> StoreResult<()> {
        lock(&self.state)
            .files
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| StoreError::not_found("file", id))
    }
}

/// The generic cell rate algorithm (GCRA) over one "theoretical arrival time" per key: a limit of
/// N per minute allows a burst of N and then one request every 60/N seconds. The Redis limiter
/// runs the same arithmetic in a Lua script.
pub fn gcra(tat_ms: Option<i64>, now_ms: i64, per_minute: u32) -> (RateDecision, i64) {
    let interval = 60_000 / i64::from(per_minute.max(1));
    let burst = interval * i64::from(per_minute.max(1));
    let tat = tat_ms.unwrap_or(now_ms).max(now_ms);
    let new_tat = tat + interval;
    let allow_at = new_tat - burst;
    if allow_at > now_ms {
        let wait = Duration::from_millis(u64::try_from(allow_at - now_ms).unwrap_or(0));
        return (
            RateDecision {
                allowed: false,
                retry_after: wait,
                remaining: 0,
            },
            tat,
        );
    }
    let remaining = u32::try_from((now_ms - allow_at) / interval).unwrap_or(0);
    (
        RateDecision {
            allowed: true,
            retry_after: Duration::ZERO,
            remaining,
        },
        new_tat,
    )
}

/// An in-process rate limiter (per process; the Redis one is shared by all API servers).
#[derive(Debug, Default)]
pub struct MemoryRateLimiter {
    tats: Mutex<HashMap<String, i64>>,
}

impl MemoryRateLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn check(&self, key: &str, per_minute: u32) -> StoreResult<RateDecision> {
        if per_minute == 0 {
            return Ok(RateDecision {
                allowed: true,
                retry_after: Duration::ZERO,
                remaining: u32::MAX,
            });
        }
        let now = Utc::now().timestamp_millis();
        let mut tats = lock(&self.tats);
        // Keys whose window has passed carry no state: drop them so the map stays small.
        if tats.len() > 100_000 {
            tats.retain(|_, tat| *tat > now);
        }
        let (decision, tat) = gcra(tats.get(key).copied(), now, per_minute);
        tats.insert(key.to_owned(), tat);
        Ok(decision)
    }
}

/// Run events in memory, kept for `keep` after a run's last event and for at most `max_runs`
/// runs.
#[derive(Debug)]
pub struct MemoryEventBus {
    runs: Mutex<EventLogs>,
    notify: Notify,
    keep: Duration,
    max_runs: usize,
}

/// The runs' logs, and the runs in the order of their first event: evicting the oldest is
/// O(1) (a busy process publishes thousands of runs a second).
#[derive(Debug, Default)]
struct EventLogs {
    logs: HashMap<RunId, RunLog>,
    order: std::collections::VecDeque<RunId>,
}

impl EventLogs {
    /// Makes room for one more run: drops runs idle for `keep`, then, while there are
    /// `max_runs` or more, the oldest (one not ended and still publishing in the last second
    /// goes to the back, a few times at most).
    fn make_room(&mut self, now: std::time::Instant, keep: Duration, max_runs: usize) {
        let mut spared = 0;
        while let Some(front) = self.order.front() {
            let (idle, ended) = self.logs.get(front).map_or((keep, true), |log| {
                (log.last.map_or(keep, |t| now.duration_since(t)), log.ended)
            });
            if idle < keep && self.logs.len() < max_runs {
                return;
            }
            let Some(front) = self.order.pop_front() else {
                return;
            };
            if !ended && idle < Duration::from_secs(1) && spared < 8 {
                spared += 1;
                self.order.push_back(front);
                continue;
            }
            self.logs.remove(&front);
        }
    }
}

#[derive(Debug, Default)]
struct RunLog {
    next: u64,
    events: Vec<EventRecord>,
    last: Option<std::time::Instant>,
    /// Whether `run_finished` was published: nothing more will come.
    ended: bool,
}

impl Default for MemoryEventBus {
    /// Five minutes after a run's last event, at most 1,000 runs: enough for a stream to
    /// attach or resume, small enough that a busy process does not grow with every run.
    fn default() -> Self {
        Self::new(Duration::from_secs(300), 1_000)
    }
}

impl MemoryEventBus {
    /// A bus keeping each run's events for `keep` after its last one, and at most `max_runs` runs.
    pub fn new(keep: Duration, max_runs: usize) -> Self {
        Self {
            runs: Mutex::default(),
            notify: Notify::new(),
            keep,
            max_runs: max_runs.max(1),
        }
    }

    fn after(&self, run_id: &RunId, after: u64) -> Vec<EventRecord> {
        let runs = lock(&self.runs);
        runs.logs
            .get(run_id)
            .map(|log| {
                log.events
                    .iter()
                    .filter(|e| e.id.parse::<u64>().is_ok_and(|n| n > after))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[async_trait]
impl EventBus for MemoryEventBus {
    async fn publish(&self, event: &crate::event::RunEvent) -> StoreResult<String> {
        let data = serde_json::to_string(event)
            .map_err(|e| StoreError::backend("encoding an event", e))?;
        let id = {
            let mut runs = lock(&self.runs);
            let now = std::time::Instant::now();
            if !runs.logs.contains_key(event.run_id()) {
                runs.make_room(now, self.keep, self.max_runs);
                runs.order.push_back(event.run_id().clone());
            }
            let log = runs.logs.entry(event.run_id().clone()).or_default();
            log.next += 1;
            log.last = Some(now);
            log.ended |= matches!(event, crate::event::RunEvent::RunFinished { .. });
            let id = log.next.to_string();
            log.events.push(EventRecord {
                id: id.clone(),
                name: event.name().to_owned(),
                data,
            });
            id
        };
        self.notify.notify_waiters();
        Ok(id)
    }

    async fn read(
        &self,
        run_id: &RunId,
        after: Option<&str>,
        wait: Duration,
    ) -> StoreResult<Vec<EventRecord>> {
        let after = match after {
            None => 0,
            Some(a) => a
                .parse::<u64>()
                .map_err(|_| StoreError::Invalid(format!("invalid event id `{a}`")))?,
        };
        let until = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let events = self.after(run_id, after);
            if !events.is_empty() || tokio::time::Instant::now() >= until {
                return Ok(events);
            }
            let _ = tokio::time::timeout_at(until, notified).await;
        }
    }
}

use super::FlowChanges;

/// Flow changes within one process.
#[derive(Debug)]
pub struct MemoryFlowChanges(tokio::sync::broadcast::Sender<String>);

impl Default for MemoryFlowChanges {
    fn default() -> Self {
        Self(tokio::sync::broadcast::channel(1024).0)
    }
}

#[async_trait]
impl FlowChanges for MemoryFlowChanges {
    async fn publish(&self, flow_id: &str) -> StoreResult<()> {
        let _ = self.0.send(flow_id.to_owned());
        Ok(())
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.0.subscribe()
    }
}

/// Run signals within one process.
#[derive(Debug)]
pub struct MemoryRunSignals {
    cancels: tokio::sync::broadcast::Sender<RunId>,
    waiters: Arc<super::FinishWaiters>,
}

impl Default for MemoryRunSignals {
    fn default() -> Self {
        Self {
            cancels: tokio::sync::broadcast::channel(1024).0,
            waiters: super::FinishWaiters::new(),
        }
    }
}

#[async_trait]
impl super::RunSignals for MemoryRunSignals {
    async fn cancel(&self, run_id: &RunId) -> StoreResult<()> {
        let _ = self.cancels.send(run_id.clone());
        Ok(())
    }
    fn cancels(&self) -> tokio::sync::broadcast::Receiver<RunId> {
        self.cancels.subscribe()
    }
    async fn finished(&self, run_id: &RunId, end: Option<&super::RunEnd>) -> StoreResult<()> {
        self.waiters.notify(run_id, end.cloned());
        Ok(())
    }
    fn watch_finished(&self, run_id: &RunId) -> super::FinishWatch {
        self.waiters.watch(run_id)
    }
}
