//! A cache of compiled flows, kept right across processes by [`FlowChanges`].
//!
//! Versions never change, so a compiled version stays valid for ever; what goes stale is which
//! version is the latest, and a deleted flow. A change announced by any process drops the flow's
//! entries here; a lost announcement (a lagging receiver) drops everything.
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use flowcore::cache::PlanCache;
//! use flowcore::ports::memory::{MemoryFlowChanges, MemoryFlowStore};
//! use flowcore::ports::FlowStore;
//!
//! let flows = Arc::new(MemoryFlowStore::new());
//! let changes = Arc::new(MemoryFlowChanges::default());
//! let cache = PlanCache::new(flowcore::Engine::new(), flows.clone(), Some(changes), 1000);
//! flows.create(&flowcore::FlowDef::from_json(r#"{"id": "f", "nodes": [{"id": "a", "type": "noop"}]}"#).unwrap()).await.unwrap();
//! let (version, plan) = cache.get("f", None).await.unwrap();
//! assert_eq!((version, plan.len()), (1, 1));
//! # });
//! ```

use std::sync::Arc;

use quick_cache::sync::Cache;

use crate::engine::Engine;
use crate::error::Error;
use crate::plan::Plan;
use crate::ports::{FlowChanges, FlowStore};

/// Compiled flows by id and version.
pub struct PlanCache {
    engine: Engine,
    flows: Arc<dyn FlowStore>,
    changes: Option<Arc<dyn FlowChanges>>,
    state: Arc<State>,
    listener: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for PlanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.state.plans.len();
        f.debug_struct("PlanCache")
            .field("plans", &len)
            .finish_non_exhaustive()
    }
}

impl Drop for PlanCache {
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
    }
}

/// The compiled versions and which version is the latest, both bounded (least useful out
/// first).
struct State {
    plans: Cache<(String, u32), Plan>,
    latest: Cache<String, u32>,
}

impl State {
    fn forget(&self, flow_id: &str) {
        self.latest.remove(flow_id);
        self.plans.retain(|(id, _), _| id != flow_id);
    }

    fn clear(&self) {
        self.plans.clear();
        self.latest.clear();
    }
}

impl PlanCache {
    /// A cache of about `capacity` compiled versions, listening to `changes` (must be called
    /// within a tokio runtime when `changes` is given).
    pub fn new(
        engine: Engine,
        flows: Arc<dyn FlowStore>,
        changes: Option<Arc<dyn FlowChanges>>,
        capacity: usize,
    ) -> Self {
        let state = Arc::new(State {
            plans: Cache::new(capacity.max(1)),
            latest: Cache::new(capacity.max(1)),
        });
        let listener = changes.as_ref().map(|changes| {
            let mut rx = changes.subscribe();
            let state = state.clone();
            tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        // `*`: changes may have been missed (a reconnect): drop everything.
                        Ok(flow_id) if flow_id == "*" => state.clear(),
                        Ok(flow_id) => state.forget(&flow_id),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => state.clear(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            })
        });
        Self {
            engine,
            flows,
            changes,
            state,
            listener,
        }
    }

    /// The compiled `version` of a flow (the latest when `None`) and its version number.
    pub async fn get(&self, flow_id: &str, version: Option<u32>) -> Result<(u32, Plan), Error> {
        let st = &self.state;
        let wanted = version.or_else(|| st.latest.get(flow_id));
        if let Some(v) = wanted
            && let Some(plan) = st.plans.get(&(flow_id.to_owned(), v))
        {
            return Ok((v, plan));
        }
        let stored = self.flows.get(flow_id, version).await?;
        // On the blocking pool: a large flow is milliseconds of CPU, which must not hold up
        // the other tasks of the runtime's thread.
        let engine = self.engine.clone();
        let (stored, plan) = tokio::task::spawn_blocking(move || {
            let plan = engine.compile(&stored.definition);
            (stored, plan)
        })
        .await
        .map_err(|e| crate::StoreError::backend("compiling a flow", e))?;
        let plan = plan?;
        st.plans
            .insert((flow_id.to_owned(), stored.version), plan.clone());
        if version.is_none() {
            st.latest.insert(flow_id.to_owned(), stored.version);
        }
        Ok((stored.version, plan))
    }

    /// Drops `flow_id` here and announces the change to every other process.
    pub async fn changed(&self, flow_id: &str) -> Result<(), Error> {
        self.state.forget(flow_id);
        if let Some(changes) = &self.changes {
            changes.publish(flow_id).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::memory::MemoryFlowStore;

    #[tokio::test]
    async fn the_cache_stays_bounded_and_keeps_serving() {
        let flows = Arc::new(MemoryFlowStore::new());
        let cache = PlanCache::new(crate::Engine::new(), flows.clone(), None, 8);
        for i in 0..100 {
            let text = format!(r#"{{"id": "f{i}", "nodes": [{{"id": "a", "type": "noop"}}]}}"#);
            flows
                .create(&crate::FlowDef::from_json(&text).unwrap())
                .await
                .unwrap();
            let (version, _) = cache.get(&format!("f{i}"), None).await.unwrap();
            assert_eq!(version, 1);
        }
        assert!(cache.state.plans.len() <= 16, "{cache:?}");
        assert!(cache.state.latest.len() <= 16, "{cache:?}");
        // An evicted flow compiles again on demand.
        assert!(cache.get("f0", None).await.is_ok());
        cache.changed("f99").await.unwrap();
        assert!(cache.state.plans.get(&("f99".to_owned(), 1)).is_none());
    }
}
