//! Admission: how many runs a process executes at once, and how many wait in the queue before
//! new ones are refused.
//!
//! `WORKER_CONCURRENCY` slots are shared by the worker loop and the runs a request executes
//! itself (the `all` role's waited runs), so that a thousand concurrent sync webhooks run ten at
//! a time, not a thousand. A run that finds no free slot goes to the queue like any other, and
//! past `FLOWCORE_MAX_QUEUED_RUNS` queued runs a new one is refused with 503 `overloaded` and
//! `Retry-After`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use flowcore::ports::Queue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// How long a read of the queue's depth is trusted: under load every request would otherwise
/// cost a round trip to the queue.
const DEPTH_FRESH: Duration = Duration::from_millis(250);

/// The slots and the queue bound of one process.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    max_queued: usize,
    /// The last depth read, by group.
    depths: Mutex<std::collections::HashMap<String, (Instant, u64)>>,
}

impl Admission {
    /// `concurrency` slots; refuse past `max_queued` queued runs (0: never refuse).
    pub fn new(concurrency: usize, max_queued: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            max_queued,
            depths: Mutex::default(),
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

    /// `Ok` when the queue of `group` has room for one more run; 503 `overloaded` otherwise.
    pub async fn admit_queued(&self, queue: &dyn Queue, group: &str) -> Result<(), ApiError> {
        if self.max_queued == 0 {
            return Ok(());
        }
        let cached = self
            .depths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(group)
            .filter(|(at, _)| at.elapsed() < DEPTH_FRESH)
            .map(|(_, depth)| *depth);
        let depth = match cached {
            Some(depth) => depth,
            // What waits for a worker: ready now, or due later (retries).
            None => queue.depth(group).await.map(|d| d.ready + d.delayed)?,
        };
        if depth < self.max_queued as u64 {
            // Counted at once, so that a burst within the depth's freshness sees itself.
            let mut depths = self
                .depths
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = depths
                .entry(group.to_owned())
                .or_insert((Instant::now(), depth));
            if cached.is_none() {
                *entry = (Instant::now(), depth);
            }
            entry.1 += 1;
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "{depth} runs are waiting for a worker (FLOWCORE_MAX_QUEUED_RUNS); try again shortly"
            ),
        )
        .retry_after(1))
    }
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
            admission.admit_queued(&queue, "g").await.expect("room");
        }
        assert!(admission.admit_queued(&queue, "g").await.is_err());
        // Read again once stale: what the queue holds.
        tokio::time::sleep(DEPTH_FRESH).await;
        admission
            .admit_queued(&queue, "g")
            .await
            .expect("the queue is empty");
        for _ in 0..3 {
            queue
                .enqueue("g", &flowcore::RunId::new(), None)
                .await
                .unwrap();
        }
        tokio::time::sleep(DEPTH_FRESH).await;
        let refused = admission.admit_queued(&queue, "g").await.unwrap_err();
        assert_eq!(
            (refused.status, refused.code, refused.retry_after),
            (StatusCode::SERVICE_UNAVAILABLE, "overloaded", Some(1))
        );
        admission
            .admit_queued(&queue, "other")
            .await
            .expect("per group");
    }
}
