//! Flows and their versions, and the announcements of their changes between processes.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Page, StoreResult};
use crate::model::FlowDef;

/// One version of a stored flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredFlow {
    /// The flow's id.
    pub id: String,
    /// 1 for the first version, then 2, 3, ...
    pub version: u32,
    /// The definition of this version (its `id` is the flow's id).
    pub definition: FlowDef,
    /// When this version was stored.
    pub created_at: DateTime<Utc>,
}

/// Flows and their versions. A run is pinned to the version it started on, and old versions stay
/// readable after a new one is stored.
#[async_trait]
pub trait FlowStore: Send + Sync {
    /// Stores version 1 of a new flow; its `id` must be set. `AlreadyExists` when the id is taken.
    async fn create(&self, flow: &FlowDef) -> StoreResult<StoredFlow>;
    /// Stores the next version of an existing flow. `NotFound` when there is none.
    async fn update(&self, id: &str, flow: &FlowDef) -> StoreResult<StoredFlow>;
    /// One version of a flow, the latest when `version` is `None`.
    async fn get(&self, id: &str, version: Option<u32>) -> StoreResult<StoredFlow>;
    /// The version of a flow that was current at `at`: the latest stored at or before it, or
    /// the latest of all when the flow had none then. A `subflow` or `map` child runs the
    /// version current when its top-level run started.
    async fn get_as_of(&self, id: &str, at: DateTime<Utc>) -> StoreResult<StoredFlow>;
    /// The latest version of each flow, newest first.
    async fn list(&self, limit: usize, cursor: Option<&str>) -> StoreResult<Page<StoredFlow>>;
    /// Deletes a flow and all its versions.
    async fn delete(&self, id: &str) -> StoreResult<()>;
}

/// Every stored flow (latest versions), read page by page.
pub async fn all_flows(store: &dyn FlowStore) -> StoreResult<Vec<StoredFlow>> {
    let mut flows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store.list(1000, cursor.as_deref()).await?;
        flows.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(flows),
        }
    }
}

/// Announces flow changes to every process, so that caches of compiled flows drop stale entries.
#[async_trait]
pub trait FlowChanges: Send + Sync {
    /// Tells every subscriber (in every process) that `flow_id` changed or was deleted.
    async fn publish(&self, flow_id: &str) -> StoreResult<()>;
    /// A receiver of changed flow ids. `*` (or a `Lagged` error) means changes may have been
    /// missed: drop everything.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String>;
}
