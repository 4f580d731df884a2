//! Flows in memory, and flow changes announced within the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{lock, parse_cursor};
use crate::error::StoreError;
use crate::model::FlowDef;
use crate::ports::{FlowChanges, FlowStore, Page, StoreResult, StoredFlow};

/// Flows in memory.
#[derive(Debug, Default)]
pub struct MemoryFlowStore {
    state: Mutex<FlowState>,
}

#[derive(Debug, Default)]
struct FlowState {
    next_seq: u64,
    /// id -> (seq of the latest version, versions)
    flows: HashMap<String, (u64, Vec<StoredFlow>)>,
    /// seq -> id, to list newest first.
    order: BTreeMap<u64, String>,
}

impl MemoryFlowStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn flow_id(flow: &FlowDef) -> StoreResult<&str> {
    flow.id
        .as_deref()
        .ok_or_else(|| StoreError::Invalid("a stored flow needs an id".into()))
}

#[async_trait]
impl FlowStore for MemoryFlowStore {
    async fn create(&self, flow: &FlowDef) -> StoreResult<StoredFlow> {
        let id = flow_id(flow)?.to_owned();
        let mut st = lock(&self.state);
        if st.flows.contains_key(&id) {
            return Err(StoreError::AlreadyExists(format!("flow `{id}` exists")));
        }
        st.next_seq += 1;
        let seq = st.next_seq;
        let stored = StoredFlow {
            id: id.clone(),
            version: 1,
            definition: flow.clone(),
            created_at: Utc::now(),
        };
        st.flows.insert(id.clone(), (seq, vec![stored.clone()]));
        st.order.insert(seq, id);
        Ok(stored)
    }

    async fn update(&self, id: &str, flow: &FlowDef) -> StoreResult<StoredFlow> {
        let mut st = lock(&self.state);
        st.next_seq += 1;
        let seq = st.next_seq;
        let (old_seq, versions) = st
            .flows
            .get_mut(id)
            .ok_or_else(|| StoreError::not_found("flow", id))?;
        let mut definition = flow.clone();
        definition.id = Some(id.to_owned());
        let version = versions.last().map_or(1, |v| v.version + 1);
        let stored = StoredFlow {
            id: id.to_owned(),
            version,
            definition,
            created_at: Utc::now(),
        };
        versions.push(stored.clone());
        let old = std::mem::replace(old_seq, seq);
        st.order.remove(&old);
        st.order.insert(seq, id.to_owned());
        Ok(stored)
    }

    async fn get(&self, id: &str, version: Option<u32>) -> StoreResult<StoredFlow> {
        let st = lock(&self.state);
        let (_, versions) = st
            .flows
            .get(id)
            .ok_or_else(|| StoreError::not_found("flow", id))?;
        match version {
            None => versions.last().cloned(),
            Some(v) => versions.iter().find(|s| s.version == v).cloned(),
        }
        .ok_or_else(|| {
            StoreError::not_found("flow version", format!("{id}@{}", version.unwrap_or(0)))
        })
    }

    async fn get_as_of(&self, id: &str, at: DateTime<Utc>) -> StoreResult<StoredFlow> {
        let st = lock(&self.state);
        let (_, versions) = st
            .flows
            .get(id)
            .ok_or_else(|| StoreError::not_found("flow", id))?;
        versions
            .iter()
            .rev()
            .find(|s| s.created_at <= at)
            .or(versions.last())
            .cloned()
            .ok_or_else(|| StoreError::not_found("flow", id))
    }

    async fn list(&self, limit: usize, cursor: Option<&str>) -> StoreResult<Page<StoredFlow>> {
        let before = parse_cursor(cursor)?;
        let st = lock(&self.state);
        let limit = limit.clamp(1, 1000);
        let mut items = Vec::new();
        let mut last = None;
        for (seq, id) in st.order.range(..before).rev().take(limit) {
            if let Some((_, versions)) = st.flows.get(id) {
                items.extend(versions.last().cloned());
            }
            last = Some(*seq);
        }
        let more = last.is_some_and(|l| st.order.range(..l).next().is_some());
        Ok(Page {
            items,
            next_cursor: if more {
                last.map(|l| l.to_string())
            } else {
                None
            },
        })
    }

    async fn delete(&self, id: &str) -> StoreResult<()> {
        let mut st = lock(&self.state);
        let (seq, _) = st
            .flows
            .remove(id)
            .ok_or_else(|| StoreError::not_found("flow", id))?;
        st.order.remove(&seq);
        Ok(())
    }
}

/// Flow changes within one process.
#[derive(Debug)]
pub struct MemoryFlowChanges(tokio::sync::broadcast::Sender<String>);

impl Default for MemoryFlowChanges {
    fn default() -> Self {
        Self(tokio::sync::broadcast::channel(1024).0)
    }
}

#[async_trait]
impl FlowChanges for MemoryFlowChanges {
    async fn publish(&self, flow_id: &str) -> StoreResult<()> {
        let _ = self.0.send(flow_id.to_owned());
        Ok(())
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.0.subscribe()
    }
}
