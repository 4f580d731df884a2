//! Runs and steps in memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{lock, parse_cursor, ttl_to_chrono};
use crate::error::StoreError;
use crate::ids::RunId;
use crate::ports::{
    Due, Lapsed, Lease, MAX_ACTIONS_PER_RUN, NewRun, Page, Park, PruneRule, RunAction, RunFilter,
    RunOutcome, RunRecord, RunStore, Signal, SignalTake, StoreResult, signal_each,
};
use crate::run::{ItemBatch, Move, RunStatus, StepRecord, StepStatus, Transition};
use crate::wait::{MAX_KEYED_RUNS, MAX_PENDING_SIGNALS};

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
    /// Waiting runs by their earliest deadline (and sequence number): the timer index.
    wakes: BTreeMap<(DateTime<Utc>, u64), RunId>,
    /// Signals by run, oldest first, pending and taken.
    signals: HashMap<RunId, Vec<StoredSignal>>,
    /// When each woken run that no worker claimed since was woken.
    woken: HashMap<RunId, DateTime<Utc>>,
    /// Checkpointed items of map steps, by run and node.
    items: HashMap<RunId, HashMap<String, BTreeMap<u32, Value>>>,
    /// What people did to each run, oldest first.
    actions: HashMap<RunId, Vec<RunAction>>,
}

/// A signal sent to a run.
#[derive(Debug)]
struct StoredSignal {
    name: String,
    payload: Value,
    /// The node whose wait took it.
    taken_by: Option<String>,
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
        // A map step that succeeded holds its items' outputs: their checkpoints are done with.
        // Those of a map that failed stay, for a rerun of its failed items.
        if let Some(items) = self.items.get_mut(id) {
            let done =
                |s: &&StepRecord| matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped);
            for step in steps.iter().filter(done) {
                items.remove(&*step.node);
            }
        }
    }

    /// Stores a new run (see [`RunStore::create`]).
    fn insert(&mut self, run: NewRun) -> StoreResult<(RunRecord, bool)> {
        let st = self;
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
            data_pruned: false,
            parked: None,
            rerun_of: run.rerun_of,
            concurrency: run.concurrency,
            priority: run.priority,
        };
        if let Some(key) = run.idempotency_key {
            st.idempotency.insert((run.flow_id, key), run.id.clone());
        }
        st.order.insert(seq, run.id.clone());
        st.runs.insert(run.id, (seq, record.clone()));
        Ok((record, true))
    }

    /// Forgets what run `id` holds besides its record.
    fn drop_belongings(&mut self, id: &RunId) {
        self.steps.remove(id);
        self.signals.remove(id);
        self.items.remove(id);
        self.actions.remove(id);
    }

    fn run_mut(&mut self, id: &RunId) -> StoreResult<&mut RunRecord> {
        self.runs
            .get_mut(id)
            .map(|(_, r)| r)
            .ok_or_else(|| StoreError::not_found("run", id.as_str()))
    }

    /// The key of a waiting run in the timer index.
    fn wake_key(&self, id: &RunId) -> Option<(DateTime<Utc>, u64)> {
        let (seq, run) = self.runs.get(id)?;
        let at = run.parked.as_ref()?.wake_at()?;
        (run.status == RunStatus::Waiting).then_some((at, *seq))
    }

    /// Leaves the timer index (before the run leaves `waiting`).
    fn unindex(&mut self, id: &RunId) {
        if let Some(key) = self.wake_key(id) {
            self.wakes.remove(&key);
        }
    }

    /// `waiting` -> `queued`.
    fn wake(&mut self, id: &RunId) -> StoreResult<RunRecord> {
        self.unindex(id);
        self.woken.insert(id.clone(), Utc::now());
        let run = self.run_mut(id)?;
        run.status = RunStatus::Queued;
        Ok(run.clone())
    }

    /// Whether run `id` has a pending signal that one of its waits takes.
    fn answered(&self, id: &RunId, parked: &crate::wait::Parked) -> bool {
        self.signals.get(id).is_some_and(|signals| {
            signals
                .iter()
                .any(|s| s.taken_by.is_none() && parked.waits_for(&s.name, None))
        })
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
        lock(&self.state).insert(run)
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
                || !filter.created_within(run.created_at)
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
        // A leased status only once its lease lapsed.
        let claimable = Move::Claim.starts_from(run.status)
            && (!run.status.is_leased() || run.lease.as_ref().is_none_or(|l| l.expires_at <= now));
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
        st.woken.remove(id);
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

    async fn record_items(&self, id: &RunId, epoch: u64, batch: &ItemBatch) -> StoreResult<()> {
        let mut st = lock(&self.state);
        st.owned_mut(id, epoch)?;
        let steps = st.steps.entry(id.clone()).or_default();
        let progress = StepRecord {
            node: batch.node.clone(),
            status: StepStatus::Running,
            attempts: 1,
            started_at: Some(batch.started_at),
            finished_at: None,
            output: None,
            error: None,
            error_code: None,
            port: None,
            items: Some(batch.progress),
            reused: false,
        };
        match steps.iter_mut().find(|s| s.node == batch.node) {
            Some(step) if step.status != StepStatus::Running => return Ok(()),
            Some(step) => *step = progress,
            None => steps.push(progress),
        }
        let items = st
            .items
            .entry(id.clone())
            .or_default()
            .entry(batch.node.to_string())
            .or_default();
        for (index, value) in &batch.items {
            items.insert(*index, (**value).clone());
        }
        Ok(())
    }

    async fn items(&self, id: &RunId, node: &str) -> StoreResult<Vec<(u32, Value)>> {
        let mut st = lock(&self.state);
        st.run_mut(id)?;
        Ok(st
            .items
            .get(id)
            .and_then(|nodes| nodes.get(node))
            .map(|items| items.iter().map(|(i, v)| (*i, v.clone())).collect())
            .unwrap_or_default())
    }

    async fn finish(&self, id: &RunId, epoch: u64, outcome: RunOutcome) -> StoreResult<RunRecord> {
        if !outcome.status.is_final() {
            return Err(StoreError::Invalid(format!(
                "`{}` is not a final status",
                outcome.status
            )));
        }
        let mut st = lock(&self.state);
        st.owned_mut(id, epoch)?;
        // First: a run that cannot be stored fails the end before anything of it is written.
        if let Some(then) = &outcome.then
            && st.runs.contains_key(&then.id)
        {
            return Err(StoreError::AlreadyExists(format!(
                "run `{}` exists",
                then.id
            )));
        }
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
        // A run that succeeded resumes no map, and is not rerun from its failed items: its
        // checkpointed items are done with. Another end keeps those of its maps that did
        // not succeed.
        if record.status == RunStatus::Succeeded {
            st.items.remove(id);
        }
        if let Some(then) = outcome.then {
            st.insert(NewRun {
                claim: None,
                ..then
            })?;
        }
        Ok(record)
    }

    async fn release(&self, id: &RunId, epoch: u64) -> StoreResult<()> {
        let mut st = lock(&self.state);
        let run = st.owned_mut(id, epoch)?;
        run.status = RunStatus::Queued;
        run.lease = None;
        Ok(())
    }

    async fn create_rerun(
        &self,
        run: NewRun,
        kept: Vec<StepRecord>,
        items: Vec<ItemBatch>,
    ) -> StoreResult<RunRecord> {
        let run = NewRun {
            idempotency_key: None,
            claim: None,
            ..run
        };
        // Nothing takes the run before this returns (its job is enqueued after).
        let (record, _) = self.create(run).await?;
        let kept: Vec<StepRecord> = kept.into_iter().map(StepRecord::into_reused).collect();
        let mut st = lock(&self.state);
        st.upsert_steps(&record.id, &kept);
        for batch in items {
            let checkpoint = st
                .items
                .entry(record.id.clone())
                .or_default()
                .entry(batch.node.to_string())
                .or_default();
            for (index, value) in batch.items {
                checkpoint.insert(index, Arc::unwrap_or_clone(value));
            }
        }
        Ok(record)
    }

    async fn record_actions(&self, actions: &[(RunId, RunAction)]) -> StoreResult<()> {
        let mut st = lock(&self.state);
        for (id, action) in actions {
            if !st.runs.contains_key(id) {
                continue;
            }
            let kept = st.actions.entry(id.clone()).or_default();
            if kept.len() < MAX_ACTIONS_PER_RUN {
                kept.push(action.clone());
            }
        }
        Ok(())
    }

    async fn actions(&self, id: &RunId) -> StoreResult<Vec<RunAction>> {
        Ok(lock(&self.state)
            .actions
            .get(id)
            .cloned()
            .unwrap_or_default())
    }

    async fn transition(&self, id: &RunId, change: Transition) -> StoreResult<RunRecord> {
        Move::unowned(change)?;
        let Transition { from, to } = change;
        let mut st = lock(&self.state);
        let status = st.run_mut(id)?.status;
        if status != from {
            return Err(StoreError::Conflict(format!(
                "run `{id}` is {status}, not {from}"
            )));
        }
        st.unindex(id);
        if from == RunStatus::Waiting && to == RunStatus::Queued {
            st.woken.insert(id.clone(), Utc::now());
        } else {
            st.woken.remove(id);
        }
        let run = st.run_mut(id)?;
        run.status = to;
        if to.is_final() {
            run.finished_at = Some(Utc::now());
            run.lease = None;
        }
        Ok(run.clone())
    }

    async fn park(&self, id: &RunId, epoch: u64, park: Park) -> StoreResult<RunRecord> {
        let mut st = lock(&self.state);
        let run = st.owned_mut(id, epoch)?;
        run.status = RunStatus::Waiting;
        run.lease = None;
        run.parked = Some(park.parked.clone());
        st.upsert_steps(id, &park.steps);
        if st.answered(id, &park.parked) {
            return st.wake(id);
        }
        if let Some(key) = st.wake_key(id) {
            st.wakes.insert(key, id.clone());
        }
        st.run_mut(id).map(|r| r.clone())
    }

    async fn wake_due(&self, due: &Due) -> StoreResult<Vec<RunRecord>> {
        let mut st = lock(&self.state);
        let ids: Vec<RunId> = st
            .wakes
            .range(..=(due.by, u64::MAX))
            .take(due.limit)
            .map(|(_, id)| id.clone())
            .collect();
        ids.iter().map(|id| st.wake(id)).collect()
    }

    async fn woken_unclaimed(&self, due: &Due) -> StoreResult<Vec<RunId>> {
        let st = lock(&self.state);
        let mut found: Vec<(DateTime<Utc>, RunId)> = st
            .woken
            .iter()
            .filter(|(id, at)| {
                **at <= due.by
                    && st
                        .runs
                        .get(*id)
                        .is_some_and(|(_, r)| r.status == RunStatus::Queued)
            })
            .map(|(id, at)| (*at, id.clone()))
            .collect();
        found.sort();
        Ok(found
            .into_iter()
            .take(due.limit)
            .map(|(_, id)| id)
            .collect())
    }

    async fn send_signal(&self, id: &RunId, signal: Signal<'_>) -> StoreResult<(RunRecord, bool)> {
        let Signal { name, payload, key } = signal;
        let mut st = lock(&self.state);
        let run = st.run_mut(id)?.clone();
        if run.status.is_final() {
            return Err(StoreError::Conflict(format!(
                "run `{id}` is {}",
                run.status
            )));
        }
        let wakes = run.status == RunStatus::Waiting
            && run.parked.as_ref().is_some_and(|p| p.waits_for(name, key));
        if key.is_some() && !wakes {
            return Ok((run, false));
        }
        let signals = st.signals.entry(id.clone()).or_default();
        if signals.iter().filter(|s| s.taken_by.is_none()).count() >= MAX_PENDING_SIGNALS {
            return Err(StoreError::TooLarge(format!(
                "run `{id}` has {MAX_PENDING_SIGNALS} signals pending, the most it may"
            )));
        }
        signals.push(StoredSignal {
            name: name.to_owned(),
            payload: payload.clone(),
            taken_by: None,
        });
        if wakes {
            return st.wake(id).map(|run| (run, true));
        }
        Ok((run, false))
    }

    async fn send_keyed_signal(&self, signal: Signal<'_>) -> StoreResult<Vec<RunRecord>> {
        let key = signal
            .key
            .ok_or_else(|| StoreError::Invalid("a keyed signal needs a key".into()))?;
        // A scan of the waiting runs: the memory store keeps no index of keys.
        let waiting: Vec<RunId> = {
            let st = lock(&self.state);
            st.wakes
                .values()
                .filter(|id| {
                    st.runs.get(*id).is_some_and(|(_, r)| {
                        r.parked
                            .as_ref()
                            .is_some_and(|p| p.waits_for(signal.name, Some(key)))
                    })
                })
                .take(MAX_KEYED_RUNS)
                .cloned()
                .collect()
        };
        signal_each(self, waiting, signal).await
    }

    async fn take_signal(&self, id: &RunId, take: SignalTake<'_>) -> StoreResult<Option<Value>> {
        let SignalTake { epoch, node, name } = take;
        let mut st = lock(&self.state);
        st.owned_mut(id, epoch)?;
        let Some(signals) = st.signals.get_mut(id) else {
            return Ok(None);
        };
        if let Some(taken) = signals
            .iter()
            .find(|s| s.name == name && s.taken_by.as_deref() == Some(node))
        {
            return Ok(Some(taken.payload.clone()));
        }
        Ok(signals
            .iter_mut()
            .find(|s| s.name == name && s.taken_by.is_none())
            .map(|s| {
                s.taken_by = Some(node.to_owned());
                s.payload.clone()
            }))
    }

    async fn expired(&self, due: &Due) -> StoreResult<Vec<Lapsed>> {
        let &Due {
            after,
            by: now,
            limit,
        } = due;
        let st = lock(&self.state);
        let mut found: Vec<Lapsed> = st
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

    async fn prunable(&self, rule: &PruneRule, limit: usize) -> StoreResult<Vec<RunId>> {
        let st = lock(&self.state);
        let chosen = |r: &RunRecord| r.status.is_final() && rule.is_about(&r.flow_id);
        // The newest finished run of the flow that stays: older ones go.
        let cutoff = rule
            .flow_id
            .as_ref()
            .and(rule.keep_newest)
            .and_then(|keep| {
                st.order
                    .iter()
                    .rev()
                    .filter(|(_, id)| st.runs.get(*id).is_some_and(|(_, r)| chosen(r)))
                    .nth(usize::try_from(keep.saturating_sub(1)).unwrap_or(usize::MAX))
                    .map(|(seq, _)| *seq)
            });
        Ok(st
            .order
            .iter()
            .filter_map(|(seq, id)| st.runs.get(id).map(|(_, r)| (*seq, r)))
            .filter(|(seq, r)| {
                chosen(r)
                    && (rule.before.is_some_and(|before| r.created_at < before)
                        || cutoff.is_some_and(|cutoff| *seq < cutoff))
            })
            .map(|(_, r)| r.id.clone())
            .take(limit)
            .collect())
    }

    async fn drop_data(&self, rule: &PruneRule, batch: usize) -> StoreResult<Vec<RunId>> {
        let Some(before) = rule.before else {
            return Ok(Vec::new());
        };
        let mut st = lock(&self.state);
        let chosen: Vec<RunId> = st
            .order
            .values()
            .filter_map(|id| st.runs.get(id).map(|(_, r)| r))
            .filter(|r| {
                r.status.is_final()
                    && !r.data_pruned
                    && r.finished_at.is_some_and(|at| at < before)
                    && rule.is_about(&r.flow_id)
            })
            .map(|r| r.id.clone())
            .take(batch)
            .collect();
        for id in &chosen {
            if let Some((_, run)) = st.runs.get_mut(id) {
                run.input = Value::Null;
                run.output = None;
                run.trigger = None;
                // Rendered from the input: it goes with it.
                run.concurrency = None;
                run.data_pruned = true;
            }
            // What people did to it stays with its summary.
            let actions = st.actions.remove(id);
            st.drop_belongings(id);
            if let Some(actions) = actions {
                st.actions.insert(id.clone(), actions);
            }
        }
        Ok(chosen)
    }

    async fn delete_finished(&self, ids: &[RunId]) -> StoreResult<Vec<RunId>> {
        let mut st = lock(&self.state);
        let mut gone = Vec::new();
        for id in ids {
            if !st.runs.get(id).is_some_and(|(_, r)| r.status.is_final()) {
                continue;
            }
            if let Some((seq, run)) = st.runs.remove(id) {
                st.order.remove(&seq);
                if let Some(key) = run.idempotency_key {
                    st.idempotency.remove(&(run.flow_id, key));
                }
            }
            st.drop_belongings(id);
            gone.push(id.clone());
        }
        Ok(gone)
    }
}
