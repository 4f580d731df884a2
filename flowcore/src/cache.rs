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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::engine::Engine;
use crate::error::Error;
use crate::plan::Plan;
use crate::ports::{FlowChanges, FlowStore};

/// Compiled flows by id and version.
pub struct PlanCache {
    engine: Engine,
    flows: Arc<dyn FlowStore>,
    changes: Option<Arc<dyn FlowChanges>>,
    state: Arc<Mutex<State>>,
    listener: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for PlanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = lock(&self.state).plans.len();
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

#[derive(Default)]
struct State {
    plans: HashMap<(String, u32), Plan>,
    latest: HashMap<String, u32>,
    capacity: usize,
}

impl State {
    fn forget(&mut self, flow_id: &str) {
        self.latest.remove(flow_id);
        self.plans.retain(|(id, _), _| id != flow_id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PlanCache {
    /// A cache of at most `capacity` compiled versions, listening to `changes` (must be called
    /// within a tokio runtime when `changes` is given).
    pub fn new(
        engine: Engine,
        flows: Arc<dyn FlowStore>,
        changes: Option<Arc<dyn FlowChanges>>,
        capacity: usize,
    ) -> Self {
        let state = Arc::new(Mutex::new(State {
            capacity: capacity.max(1),
            ..State::default()
        }));
        let listener = changes.as_ref().map(|changes| {
            let mut rx = changes.subscribe();
            let state = state.clone();
            tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        // `*`: changes may have been missed (a reconnect): drop everything.
                        Ok(flow_id) if flow_id == "*" => {
                            let mut st = lock(&state);
                            st.plans.clear();
                            st.latest.clear();
                        }
                        Ok(flow_id) => lock(&state).forget(&flow_id),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            let mut st = lock(&state);
                            st.plans.clear();
                            st.latest.clear();
                        }
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
        {
            let st = lock(&self.state);
            let wanted = version.or_else(|| st.latest.get(flow_id).copied());
            if let Some(v) = wanted
                && let Some(plan) = st.plans.get(&(flow_id.to_owned(), v))
            {
                return Ok((v, plan.clone()));
            }
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
        let mut st = lock(&self.state);
        if st.plans.len() >= st.capacity {
            // Simple and bounded: start over rather than track recency.
            st.plans.clear();
            st.latest.clear();
        }
        st.plans
            .insert((flow_id.to_owned(), stored.version), plan.clone());
        if version.is_none() {
            st.latest.insert(flow_id.to_owned(), stored.version);
        }
        Ok((stored.version, plan))
    }

    /// Drops `flow_id` here and announces the change to every other process.
    pub async fn changed(&self, flow_id: &str) -> Result<(), Error> {
        lock(&self.state).forget(flow_id);
        if let Some(changes) = &self.changes {
            changes.publish(flow_id).await?;
        }
        Ok(())
    }
}
