//! Ports: the storage traits the engine and the server depend on. Implementations live apart:
//! in-memory ones in [`memory`] (for tests and zero-server embedding), SQL, Redis and blob stores
//! in `flowcore-store`. Every implementation runs the conformance kit in `flowcore::testkit`.

mod blobs;
mod events;
mod flows;
mod limits;
pub mod memory;
mod queue;
#[cfg(feature = "records")]
mod records;
mod runs;
mod signals;

use serde::Serialize;

pub use blobs::{BlobStore, ChunkStream, is_valid_blob_key, too_large};
pub use events::{BusSink, EventBus, EventRecord};
pub use flows::{FlowChanges, FlowStore, StoredFlow, all_flows};
pub use limits::{RateDecision, RateLimiter};
pub use queue::{
    DEFAULT_PRIORITY, Job, JobKey, LeasedJob, MAX_PRIORITY, NewJob, Queue, QueueDepth, Take,
};
#[cfg(feature = "records")]
pub use records::{
    ApiKeyRecord, ApiKeyStore, CredentialStore, FileRecord, FileStore, ModelTokens, Reencryption,
    Scope, Scopes, StoredCredential, UsageDay, UsageQuery, UsageStore,
};
pub use runs::{
    ActionKind, Actor, Claim, ConcurrencyKey, Due, Lapsed, Lease, MAX_ACTIONS_PER_RUN, NewRun,
    Park, PruneRule, RunAction, RunEnd, RunFilter, RunOutcome, RunRecord, RunStore, Signal,
    SignalTake, claim_each, prune_runs, signal_each,
};
pub use signals::{FinishWaiters, FinishWatch, RunSignals};

use crate::error::StoreError;

/// A result of a storage port.
pub type StoreResult<T> = Result<T, StoreError>;

/// A page of a listing, newest first, with the cursor of the next page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Pass this as `cursor` to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}
