//! Admission: how many runs a process executes at once, and how many wait in the queue before
//! new ones are refused.
//!
//! `WORKER_CONCURRENCY` slots are shared by the worker loop and the runs a request executes
//! itself (the `all` role's waited runs), so that a thousand concurrent sync webhooks run ten at
//! a time, not a thousand. A waited run waits for a slot in the process (past
//! `WEBHOOK_TIMEOUT_SECONDS` it goes to the queue); any other run goes to the queue. Past
//! `FLOWCORE_MAX_QUEUED_RUNS` waiting requests, or runs in the group's queue, a new run is
//! refused with 503 `overloaded` and `Retry-After`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowcore::ports::Queue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a read of the queue's depth is trusted: under load every request would otherwise
/// cost a round trip to the queue.
const DEPTH_FRESH: Duration = Duration::from_millis(250);

/// The slots and the queue bound of one process.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    max_queued: usize,
    /// Requests waiting here for a slot to execute their run in.
    waiting: std::sync::atomic::AtomicUsize,
    /// The last depth read, by group.
    depths: Mutex<std::collections::HashMap<String, (Instant, u64)>>,
}

impl Admission {
    /// `concurrency` slots; refuse past `max_queued` queued runs (0: never refuse).
    pub fn new(concurrency: usize, max_queued: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            max_queued,
            waiting: std::sync::atomic::AtomicUsize::new(0),
            depths: Mutex::default(),
        }
    }

    /// Whether work in the background (a bulk replay) may queue one more run in `group`: the
    /// queue holds less than half of `FLOWCORE_MAX_QUEUED_RUNS` (the other half is left to new
    /// runs), or 1,000 runs without a bound.
    pub async fn room_for_background(
        &self,
        queue: &dyn Queue,
        group: &str,
    ) -> Result<bool, flowcore::StoreError> {
        let depth = queue.depth(group).await?;
        let waiting = depth.ready + depth.delayed + depth.held_back;
        let bound = match self.max_queued {
            0 => 1000,
            n => (n / 2).max(1),
        };
        Ok(waiting < bound as u64)
    }

    /// A slot for a run the request executes itself, waited for up to `limit`: `Ok(None)` past
    /// it (the run then goes to the queue), 503 `overloaded` when `FLOWCORE_MAX_QUEUED_RUNS`
    /// requests wait already. Waiting here costs no write and no queue round trip (a run that
    /// goes through the queue costs both): under a burst of waited runs, the process executes
    /// `WORKER_CONCURRENCY` of them at a time, in order, at the speed of inline runs.
    pub async fn wait_slot(
        &self,
        limit: Duration,
    ) -> Result<Option<OwnedSemaphorePermit>, Overloaded> {
        use std::sync::atomic::Ordering;
        if let Some(slot) = self.try_slot() {
            return Ok(Some(slot));
        }
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _leave = Leave(&self.waiting);
        if self.max_queued != 0 && before >= self.max_queued {
            return Err(Overloaded {
                waiting: before as u64,
            });
        }
        match tokio::time::timeout(limit, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(Some(slot)),
            _ => Ok(None),
        }
    }

    /// The execution slots, for the worker loop.
    pub fn slots(&self) -> &Arc<Semaphore> {
        &self.slots
    }

    /// A free slot, if there is one now.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// `Ok` when the queue of `group` has room for one more run, and the backlog of its
    /// concurrency key `key` (if it has one) too; [`Refused::Overloaded`] otherwise. Each holds
    /// up to `FLOWCORE_MAX_QUEUED_RUNS`: the runs held back behind one key do not count
    /// against the group, so a tenant that floods its key is refused alone.
    pub async fn admit_queued(
        &self,
        queue: &dyn Queue,
        group: &str,
        key: Option<&str>,
    ) -> Result<(), Refused> {
        if self.max_queued == 0 {
            return Ok(());
        }
        // The key first: a run its key refuses does not count against the group.
        if let Some(key) = key {
            self.admit_in(&format!("{group}\u{0}{key}"), queue.held_back(group, key))
                .await?;
        }
        // What waits for a worker: ready now, or due later (retries).
        self.admit_in(group, async {
            queue.depth(group).await.map(|d| d.ready + d.delayed)
        })
        .await
    }

    /// Admits one more run where `read` tells how many wait (read at most every
    /// [`DEPTH_FRESH`] for `what`, and counted here in between).
    async fn admit_in(
        &self,
        what: &str,
        read: impl std::future::Future<Output = Result<u64, flowcore::StoreError>>,
    ) -> Result<(), Refused> {
        let cached = self
            .depths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(what)
            .filter(|(at, _)| at.elapsed() < DEPTH_FRESH)
            .map(|(_, depth)| *depth);
        let depth = match cached {
            Some(depth) => depth,
            None => read.await?,
        };
        if depth < self.max_queued as u64 {
            // Counted at once, so that a burst within the depth's freshness sees itself.
            let mut depths = self
                .depths
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // One entry a group and a key: the stale ones go when there are many.
            if depths.len() >= MAX_DEPTHS {
                depths.retain(|_, (at, _)| at.elapsed() < DEPTH_FRESH);
            }
            let entry = depths
                .entry(what.to_owned())
                .or_insert((Instant::now(), depth));
            if cached.is_none() {
                *entry = (Instant::now(), depth);
            }
            entry.1 += 1;
            return Ok(());
        }
        Err(Overloaded { waiting: depth }.into())
    }
}

/// How many depths (of groups and keys) are remembered before the stale ones are dropped.
const MAX_DEPTHS: usize = 10_000;

/// Counts a waiter out however its wait ends.
struct Leave<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Why a run was not admitted to the queue.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Too many runs wait already.
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    /// The queue's depth could not be read.
    #[error(transparent)]
    Store(#[from] flowcore::StoreError),
}

/// Too many runs wait already (`FLOWCORE_MAX_QUEUED_RUNS`): come back in a second.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{waiting} runs are waiting for a worker (FLOWCORE_MAX_QUEUED_RUNS); try again shortly")]
pub struct Overloaded {
    /// How many wait.
    pub waiting: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowcore::ports::memory::MemoryQueue;

    #[tokio::test]
    async fn runs_past_the_slots_queue_and_past_the_bound_are_refused() {
        let admission = Admission::new(2, 3);
        let a = admission.try_slot().expect("a slot");
        let _b = admission.try_slot().expect("a second slot");
        assert!(admission.try_slot().is_none(), "two slots only");
        drop(a);
        assert!(admission.try_slot().is_some(), "a slot comes back");

        let queue = MemoryQueue::default();
        // A burst counts itself before the queue is read again.
        for _ in 0..3 {
            admission
                .admit_queued(&queue, "g", None)
                .await
                .expect("room");
        }
        assert!(admission.admit_queued(&queue, "g", None).await.is_err());
        // Read again once stale: what the queue holds.
        tokio::time::sleep(DEPTH_FRESH).await;
        admission
            .admit_queued(&queue, "g", None)
            .await
            .expect("the queue is empty");
        for _ in 0..3 {
            queue
                .enqueue("g", flowcore::ports::NewJob::run(flowcore::RunId::new()))
                .await
                .unwrap();
        }
        tokio::time::sleep(DEPTH_FRESH).await;
        let refused = admission.admit_queued(&queue, "g", None).await.unwrap_err();
        assert!(matches!(
            refused,
            Refused::Overloaded(Overloaded { waiting: 3 })
        ));
        admission
            .admit_queued(&queue, "other", None)
            .await
            .expect("per group");

        // A key's backlog has a bound of its own, and does not count against the group.
        let admission = Admission::new(2, 3);
        let keyed = || {
            flowcore::ports::NewJob::run(flowcore::RunId::new()).keyed(flowcore::ports::JobKey {
                key: "a".into(),
                limit: 1,
            })
        };
        for _ in 0..4 {
            queue.enqueue("k", keyed()).await.unwrap();
        }
        let refused = admission
            .admit_queued(&queue, "k", Some("a"))
            .await
            .unwrap_err();
        assert!(matches!(
            refused,
            Refused::Overloaded(Overloaded { waiting: 3 })
        ));
        for _ in 0..2 {
            admission
                .admit_queued(&queue, "k", Some("b"))
                .await
                .expect("another key, and the group, have room");
        }
    }

    #[tokio::test]
    async fn waited_runs_wait_for_a_slot_in_order_and_past_the_bound_are_refused() {
        let admission = Arc::new(Admission::new(1, 1));
        let held = admission.wait_slot(Duration::from_secs(1)).await.unwrap();
        assert!(held.is_some());
        let waiter = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.wait_slot(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = admission
            .wait_slot(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(refused.waiting, 1, "one waiter at most");
        drop(held);
        assert!(
            waiter.await.unwrap().unwrap().is_some(),
            "the waiter gets the slot"
        );
        let _busy = admission.try_slot();
        assert!(
            admission
                .wait_slot(Duration::from_millis(50))
                .await
                .unwrap()
                .is_none(),
            "past the wait: no slot, the run goes to the queue"
        );
    }
}
