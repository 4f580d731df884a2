//! Run events within the process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::lock;
use crate::error::StoreError;
use crate::ids::RunId;
use crate::ports::{EventBus, EventRecord, StoreResult};

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

/// The most events kept of one run (the oldest go first), as the Redis bus keeps about as
/// many: a run that streams a long LLM answer does not grow the process without bound.
const MAX_EVENTS_PER_RUN: usize = 10_000;

#[derive(Debug, Default)]
struct RunLog {
    next: u64,
    events: std::collections::VecDeque<EventRecord>,
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
            if log.events.len() >= MAX_EVENTS_PER_RUN {
                log.events.pop_front();
            }
            log.events.push_back(EventRecord {
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
