//! Cancel requests and run ends within the process.

use std::sync::Arc;

use async_trait::async_trait;

use crate::ids::RunId;
use crate::ports::{FinishWaiters, FinishWatch, RunEnd, RunSignals, StoreResult};

/// Run signals within one process.
#[derive(Debug)]
pub struct MemoryRunSignals {
    cancels: tokio::sync::broadcast::Sender<RunId>,
    waiters: Arc<FinishWaiters>,
}

impl Default for MemoryRunSignals {
    fn default() -> Self {
        Self {
            cancels: tokio::sync::broadcast::channel(1024).0,
            waiters: FinishWaiters::new(),
        }
    }
}

#[async_trait]
impl RunSignals for MemoryRunSignals {
    async fn cancel(&self, run_id: &RunId) -> StoreResult<()> {
        let _ = self.cancels.send(run_id.clone());
        Ok(())
    }
    fn cancels(&self) -> tokio::sync::broadcast::Receiver<RunId> {
        self.cancels.subscribe()
    }
    async fn finished(&self, run_id: &RunId, end: Option<&RunEnd>) -> StoreResult<()> {
        self.waiters.notify(run_id, end.cloned());
        Ok(())
    }
    fn watch_finished(&self, run_id: &RunId) -> FinishWatch {
        self.waiters.watch(run_id)
    }
}
