//! Run events: what a caller subscribes to while a run executes.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::ids::RunId;
use crate::run::{RunStatus, StepStatus};

/// Something that happened in a run. Serialized with an `event` tag:
/// `{"event": "node_finished", "run_id": ..., "node": ..., "status": ..., "attempt": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RunEvent {
    /// The run began executing.
    RunStarted {
        /// The run.
        run_id: RunId,
    },
    /// An attempt of a node began.
    NodeStarted {
        /// The run.
        run_id: RunId,
        /// The node's id.
        node: Arc<str>,
        /// 1 for the first attempt.
        attempt: u32,
    },
    /// A node reached its final status (after its retries).
    NodeFinished {
        /// The run.
        run_id: RunId,
        /// The node's id.
        node: Arc<str>,
        /// Succeeded, failed, skipped or cancelled.
        status: StepStatus,
        /// Attempts made (0 for a skipped node).
        attempt: u32,
        /// The error of the last attempt, if it failed.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A streamed piece of a node's output, such as an LLM token.
    Token {
        /// The run.
        run_id: RunId,
        /// The node's id.
        node: Arc<str>,
        /// The text.
        delta: String,
        /// Which model call of the node (1 for the first; tools make more).
        turn: u32,
        /// The node's attempt (a retried call streams again under its new attempt).
        attempt: u32,
    },
    /// Tokens an LLM call used (sent once per model call, from any depth of the run).
    LlmUsage {
        /// The (top-level) run.
        run_id: RunId,
        /// The node's id.
        node: Arc<str>,
        /// The model that answered.
        model: String,
        /// Tokens of the prompt.
        prompt_tokens: u64,
        /// Tokens of the answer.
        completion_tokens: u64,
    },
    /// The run parked: nothing is left to do until a signal or a time wakes it.
    RunWaiting {
        /// The run.
        run_id: RunId,
        /// What its nodes wait for.
        waits: Vec<crate::wait::Wait>,
    },
    /// A parked run was woken and executes again.
    RunResumed {
        /// The run.
        run_id: RunId,
    },
    /// A `map` step finished more items (sent with each checkpoint of its items, and when it
    /// ends).
    ItemsDone {
        /// The run.
        run_id: RunId,
        /// The map node's id.
        node: Arc<str>,
        /// How many items it maps over.
        total: u32,
        /// How many are finished.
        done: u32,
        /// Node executions inside the run's map items since the run's last `items_done`
        /// (usage counts them as node executions).
        executions: u64,
    },
    /// The run reached its final status.
    RunFinished {
        /// The run.
        run_id: RunId,
        /// Its final status.
        status: RunStatus,
        /// Why it did not succeed.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl RunEvent {
    /// The event's name: `run_started`, `node_started`, `node_finished`, `token`, `llm_usage`, `items_done`,
    /// `run_waiting`, `run_resumed`, `run_finished`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::RunStarted { .. } => "run_started",
            Self::NodeStarted { .. } => "node_started",
            Self::NodeFinished { .. } => "node_finished",
            Self::Token { .. } => "token",
            Self::LlmUsage { .. } => "llm_usage",
            Self::ItemsDone { .. } => "items_done",
            Self::RunWaiting { .. } => "run_waiting",
            Self::RunResumed { .. } => "run_resumed",
            Self::RunFinished { .. } => "run_finished",
        }
    }

    /// The run the event belongs to.
    pub fn run_id(&self) -> &RunId {
        match self {
            Self::RunStarted { run_id }
            | Self::NodeStarted { run_id, .. }
            | Self::NodeFinished { run_id, .. }
            | Self::Token { run_id, .. }
            | Self::LlmUsage { run_id, .. }
            | Self::ItemsDone { run_id, .. }
            | Self::RunWaiting { run_id, .. }
            | Self::RunResumed { run_id }
            | Self::RunFinished { run_id, .. } => run_id,
        }
    }
}

/// Receives a run's events as they happen. Called inline by the scheduler: it must not block.
pub trait EventSink: Send + Sync {
    /// Takes one event.
    fn emit(&self, event: &RunEvent);
}

impl<F: Fn(&RunEvent) + Send + Sync> EventSink for F {
    fn emit(&self, event: &RunEvent) {
        self(event)
    }
}

/// An event sink that fans out to any number of subscribers through a tokio broadcast channel.
///
/// ```
/// let sink = flowcore::BroadcastSink::new(64);
/// let mut rx = sink.subscribe();
/// # drop(rx);
/// ```
#[derive(Debug, Clone)]
pub struct BroadcastSink(broadcast::Sender<RunEvent>);

impl BroadcastSink {
    /// A sink keeping up to `capacity` events for slow subscribers.
    pub fn new(capacity: usize) -> Self {
        Self(broadcast::channel(capacity.max(1)).0)
    }
    /// A new subscriber, seeing events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.0.subscribe()
    }
}

impl EventSink for BroadcastSink {
    fn emit(&self, event: &RunEvent) {
        // No subscriber is not an error: events are best effort for watchers.
        let _ = self.0.send(event.clone());
    }
}
