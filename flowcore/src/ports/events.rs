//! Run events, from the process that executes a run to the processes that stream it.

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use super::StoreResult;
use crate::ids::RunId;

/// One stored run event: its id (increasing within a run, for SSE `Last-Event-ID`), its name
/// (`run_started`, `node_finished`, ...) and its JSON text. Kept as text: the event is
/// serialized once where it happens and goes out as it is (an SSE `data:` line), never as a
/// tree of values.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    /// Increasing within the run; pass it back as `after` to resume.
    pub id: String,
    /// The event's name.
    pub name: String,
    /// The event as JSON text.
    pub data: String,
}

/// Run events shared between the process that executes a run and the processes that stream it.
///
/// Reading is a bounded pull (`read` with `after` and `wait`), not a subscription, so a client
/// that goes away leaves nothing behind (Flowise leaked Redis subscriptions until Redis dropped
/// the subscriber). A run's events are kept for a while after it ends, then dropped.
#[async_trait]
pub trait EventBus: Send + Sync {
    /// Appends an event to its run's log and returns its id.
    async fn publish(&self, event: &crate::event::RunEvent) -> StoreResult<String>;
    /// Appends events in order, in one round trip where the backend can (the default
    /// publishes them one by one).
    async fn publish_many(&self, events: &[crate::event::RunEvent]) -> StoreResult<()> {
        for event in events {
            self.publish(event).await?;
        }
        Ok(())
    }
    /// Events of `run_id` after the id `after` (from the start when `None`), waiting up to
    /// `wait` for the first one. An empty list means none came in time.
    async fn read(
        &self,
        run_id: &RunId,
        after: Option<&str>,
        wait: Duration,
    ) -> StoreResult<Vec<EventRecord>>;
}

/// An [`crate::event::EventSink`] that publishes to an [`EventBus`] in the background, so that
/// the scheduler never waits for the bus. Events of one run keep their order; one sink may serve
/// many runs (a process's), whose events then share the bus's round trips.
pub struct BusSink {
    tx: tokio::sync::mpsc::UnboundedSender<crate::event::RunEvent>,
}

impl std::fmt::Debug for BusSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusSink").finish_non_exhaustive()
    }
}

impl BusSink {
    /// A sink whose events go to `bus` from a task of the current runtime; the task ends when
    /// the sink is dropped and its events are out.
    pub fn new(bus: std::sync::Arc<dyn EventBus>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<crate::event::RunEvent>();
        tokio::spawn(async move {
            // What piled up while the last batch was out goes in the next one.
            let mut batch = Vec::with_capacity(16);
            while rx.recv_many(&mut batch, 256).await > 0 {
                if let Err(e) = bus.publish_many(&batch).await {
                    tracing::warn!(first_run_id = %batch[0].run_id(), events = batch.len(), error = %e, "could not publish run events");
                }
                batch.clear();
            }
        });
        Self { tx }
    }
}

impl crate::event::EventSink for BusSink {
    fn emit(&self, event: &crate::event::RunEvent) {
        let _ = self.tx.send(event.clone());
    }
}
