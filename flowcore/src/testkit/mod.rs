//! Conformance suites for the ports: every backend runs them from its own tests, so that the
//! in-memory, SQL, Redis and blob implementations behave the same.
//!
//! A backend's tests describe it once, as a [`Backend`] (the ports it implements and its
//! [`Capabilities`]), and call [`check`], which runs every suite that applies. Each suite is
//! also public, an async function over a fresh, empty store that panics with a message naming
//! the case that failed. Time-based cases use short leases (well under a second).
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(async {
//! use flowcore::testkit::{Backend, check};
//! check(&Backend::memory()).await;
//! # });
//! ```

mod actions;
mod blobs;
pub mod docs;
mod durable;
mod events;
mod flows;
mod items;
mod limits;
pub mod openai;
mod queue;
#[cfg(feature = "records")]
mod records;
mod reruns;
mod runs;
mod waits;

use std::sync::Arc;

use chrono::Utc;
use serde_json::json;

pub use actions::run_actions;
pub use blobs::blob_store;
pub use durable::durable_runs;
pub use events::{event_bus, run_signals};
pub use flows::{flow_changes, flow_store};
pub use items::map_items;
pub use limits::rate_limiter;
pub use queue::{queue, queue_keys};
#[cfg(feature = "records")]
pub use records::{Records, meta_store};
pub use reruns::{reruns, runs_started_by_an_end};
pub use runs::{concurrent_creates, concurrent_finishes, pruning, run_store, transitions};
pub use waits::{keyed_fan_out, parked_runs};

use crate::model::FlowDef;
use crate::ports::{
    BlobStore, EventBus, FlowChanges, FlowStore, NewRun, Queue, RateLimiter, RunSignals, RunStore,
};
use crate::run::{StepRecord, StepStatus};

/// What a backend can do, where the ports leave it a choice; the suites check what it claims.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Its queue moves a job to the dead letters after this many deliveries (`None`: it never
    /// does, and the queue suite does not look for them).
    pub max_deliveries: Option<u32>,
}

/// A flow store and two processes' views of its changes.
pub type SharedFlows = (Arc<dyn FlowStore>, [Arc<dyn FlowChanges>; 2]);

/// A backend under test: the ports it implements (`None`: not this one), each a fresh, empty
/// store, and its capabilities.
#[derive(Clone, Default)]
pub struct Backend {
    /// Its name, in the suites' messages.
    pub name: &'static str,
    /// Flows.
    pub flows: Option<Arc<dyn FlowStore>>,
    /// Runs.
    pub runs: Option<Arc<dyn RunStore>>,
    /// The queue.
    pub queue: Option<Arc<dyn Queue>>,
    /// Blobs.
    pub blobs: Option<Arc<dyn BlobStore>>,
    /// Run events.
    pub events: Option<Arc<dyn EventBus>>,
    /// Rate limits.
    pub limiter: Option<Arc<dyn RateLimiter>>,
    /// Cancels and run ends between processes.
    pub signals: Option<Arc<dyn RunSignals>>,
    /// Flow changes as two processes hear them (two connections, or one twice), over a flow
    /// store they share.
    pub flow_changes: Option<SharedFlows>,
    /// The server's records.
    #[cfg(feature = "records")]
    pub records: Option<Arc<dyn Records>>,
    /// What it can do.
    pub capabilities: Capabilities,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// The in-memory stores of [`crate::ports::memory`], every port.
    pub fn memory() -> Self {
        use crate::ports::memory::{
            MemoryBlobStore, MemoryEventBus, MemoryFlowChanges, MemoryFlowStore, MemoryQueue,
            MemoryRateLimiter, MemoryRunSignals, MemoryRunStore,
        };
        let changes: Arc<dyn FlowChanges> = Arc::new(MemoryFlowChanges::default());
        Self {
            name: "memory",
            flows: Some(Arc::new(MemoryFlowStore::new())),
            runs: Some(Arc::new(MemoryRunStore::new())),
            queue: Some(Arc::new(MemoryQueue::new(3))),
            blobs: Some(Arc::new(MemoryBlobStore::new())),
            events: Some(Arc::new(MemoryEventBus::default())),
            limiter: Some(Arc::new(MemoryRateLimiter::new())),
            signals: Some(Arc::new(MemoryRunSignals::default())),
            flow_changes: Some((Arc::new(MemoryFlowStore::new()), [changes.clone(), changes])),
            #[cfg(feature = "records")]
            records: Some(Arc::new(crate::ports::memory::MemoryMetaStore::new())),
            capabilities: Capabilities {
                max_deliveries: Some(3),
            },
        }
    }

    /// The names of the ports it implements.
    pub fn ports(&self) -> Vec<&'static str> {
        let mut ports = Vec::new();
        let has = [
            ("flows", self.flows.is_some()),
            ("runs", self.runs.is_some()),
            ("queue", self.queue.is_some()),
            ("blobs", self.blobs.is_some()),
            ("events", self.events.is_some()),
            ("limiter", self.limiter.is_some()),
            ("signals", self.signals.is_some()),
            ("flow_changes", self.flow_changes.is_some()),
            #[cfg(feature = "records")]
            ("records", self.records.is_some()),
        ];
        for (name, present) in has {
            if present {
                ports.push(name);
            }
        }
        ports
    }
}

/// Runs every suite that applies to `backend`: each port it implements against its suite (the
/// run store's: records, every move between statuses, parked runs, timers and signals,
/// checkpointed map items, concurrent creates and finishes, pruning and durable execution). Panics, naming the backend and the suite, at the first case
/// that fails.
pub async fn check(backend: &Backend) {
    // Names the suite on stderr (a failure's panic then says where it was), then runs it.
    macro_rules! suite {
        ($suite:ident($($arg:expr),*)) => {{
            eprintln!("testkit: {} on {}", stringify!($suite), backend.name);
            $suite($($arg),*).await;
        }};
    }
    if let Some(flows) = &backend.flows {
        suite!(flow_store(flows.as_ref()));
    }
    if let Some(runs) = &backend.runs {
        suite!(run_store(runs.as_ref()));
        suite!(transitions(runs.as_ref()));
        suite!(parked_runs(runs.clone()));
        suite!(keyed_fan_out(runs.clone()));
        suite!(map_items(runs.as_ref()));
        suite!(run_actions(runs.as_ref()));
        suite!(reruns(runs.as_ref()));
        suite!(runs_started_by_an_end(runs.as_ref()));
        suite!(concurrent_creates(runs.clone()));
        suite!(concurrent_finishes(runs.clone()));
        suite!(pruning(runs.as_ref()));
        suite!(durable_runs(runs.clone()));
    }
    if let Some(q) = &backend.queue {
        suite!(queue(q.clone(), backend.capabilities.max_deliveries));
        suite!(queue_keys(q.clone(), backend.capabilities.max_deliveries));
    }
    if let Some(blobs) = &backend.blobs {
        suite!(blob_store(blobs.as_ref()));
    }
    if let Some(events) = &backend.events {
        suite!(event_bus(events.clone()));
    }
    if let Some(limiter) = &backend.limiter {
        suite!(rate_limiter(limiter.clone()));
    }
    if let Some(signals) = &backend.signals {
        suite!(run_signals(signals.clone()));
    }
    if let Some((flows, [first, second])) = &backend.flow_changes {
        suite!(flow_changes(flows.clone(), first.clone(), second.clone()));
    }
    #[cfg(feature = "records")]
    if let Some(records) = &backend.records {
        suite!(meta_store(records.clone()));
    }
}

fn flow(id: &str, node_type: &str) -> FlowDef {
    FlowDef::from_value(json!({"id": id, "nodes": [{"id": "n", "type": node_type}]}))
        .expect("a valid flow")
}

fn new_run(flow_id: &str, key: Option<&str>) -> NewRun {
    NewRun {
        idempotency_key: key.map(str::to_owned),
        ..NewRun::new(flow_id, 1, json!({"x": 1}))
    }
}

fn step(node: &str, status: StepStatus) -> StepRecord {
    StepRecord {
        status,
        attempts: 1,
        started_at: Some(Utc::now()),
        finished_at: Some(Utc::now()),
        output: Some(Arc::new(json!({"node": node}))),
        ..StepRecord::pending(node)
    }
}
