//! Cancel requests and run ends between processes.

use async_trait::async_trait;

use super::{RunEnd, StoreResult};
use crate::ids::RunId;

/// Asks whichever process executes a run to cancel it (the API may run in another process than
/// the worker). Best effort across an outage of the backend: a request published while a
/// process was disconnected does not reach it.
#[async_trait]
pub trait RunSignals: Send + Sync {
    /// Tells every process to cancel `run_id` if it executes it.
    async fn cancel(&self, run_id: &RunId) -> StoreResult<()>;
    /// A receiver of the runs to cancel.
    fn cancels(&self) -> tokio::sync::broadcast::Receiver<RunId>;
    /// Tells every process that `run_id` ended, once its end is stored: their
    /// [`watch_finished`](Self::watch_finished) watches of it wake up, with `end` (as stored)
    /// when given and the backend carries it (a backend may leave a large one out: the
    /// waiter then reads the store).
    async fn finished(&self, run_id: &RunId, end: Option<&RunEnd>) -> StoreResult<()>;
    /// A watch of `run_id` in this process that wakes when any process says it
    /// [`finished`](Self::finished). Take it before the run can end (before enqueueing it).
    /// Best effort like the rest: a waiter also checks the store now and then.
    fn watch_finished(&self, run_id: &RunId) -> FinishWatch;
}

/// The runs that requests of this process wait for, keyed by run, each woken once by
/// [`FinishWaiters::notify`]. A backend of [`RunSignals`] holds one and calls `notify` for every
/// finished run it hears of; runs nobody here waits for cost a map lookup.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use flowcore::RunId;
/// use flowcore::ports::{FinishWaiters, RunEnd};
/// use flowcore::RunStatus;
///
/// let waiters = FinishWaiters::new();
/// let id = RunId::new();
/// let mut watch = waiters.watch(&id);
/// let end = RunEnd { status: RunStatus::Succeeded, output: None, error: None };
/// waiters.notify(&id, Some(end.clone()));
/// // At once: the run was announced, with its end.
/// assert_eq!(watch.finished().await.as_deref(), Some(&end));
/// assert_eq!(waiters.len(), 1);
/// drop(watch);
/// assert_eq!(waiters.len(), 0);
/// # });
/// ```
#[derive(Debug, Default)]
pub struct FinishWaiters(std::sync::Mutex<std::collections::HashMap<RunId, Watched>>);

/// What a watch heard of its run.
#[derive(Debug, Clone)]
enum Heard {
    Nothing,
    /// Announced finished, with its end when the announcement carried it.
    Finished(Option<std::sync::Arc<RunEnd>>),
}

#[derive(Debug)]
struct Watched {
    heard: tokio::sync::watch::Sender<Heard>,
    watches: usize,
}

impl FinishWaiters {
    /// No waiters yet.
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<RunId, Watched>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts watching `run_id`; the watch is forgotten when dropped.
    pub fn watch(self: &std::sync::Arc<Self>, run_id: &RunId) -> FinishWatch {
        let mut map = self.map();
        let entry = map.entry(run_id.clone()).or_insert_with(|| Watched {
            heard: tokio::sync::watch::channel(Heard::Nothing).0,
            watches: 0,
        });
        entry.watches += 1;
        FinishWatch {
            heard: entry.heard.subscribe(),
            run_id: run_id.clone(),
            waiters: self.clone(),
        }
    }

    /// Wakes the watches of `run_id`, if any, with its `end` when known.
    pub fn notify(&self, run_id: &RunId, end: Option<RunEnd>) {
        if let Some(watched) = self.map().get(run_id) {
            watched
                .heard
                .send_replace(Heard::Finished(end.map(std::sync::Arc::new)));
        }
    }

    /// How many runs are watched.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether no run is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A watch of one run, from [`RunSignals::watch_finished`] or [`FinishWaiters::watch`].
#[derive(Debug)]
pub struct FinishWatch {
    heard: tokio::sync::watch::Receiver<Heard>,
    run_id: RunId,
    waiters: std::sync::Arc<FinishWaiters>,
}

impl FinishWatch {
    /// Resolves once the run was announced finished (at once if it already was), with its end
    /// when the announcement carried it.
    pub async fn finished(&mut self) -> Option<std::sync::Arc<RunEnd>> {
        // The sender lives while this watch does, so this only ends by the announcement.
        match self
            .heard
            .wait_for(|heard| matches!(heard, Heard::Finished(_)))
            .await
            .as_deref()
        {
            Ok(Heard::Finished(end)) => end.clone(),
            _ => None,
        }
    }
}

impl Drop for FinishWatch {
    fn drop(&mut self) {
        let mut map = self.waiters.map();
        if let Some(watched) = map.get_mut(&self.run_id) {
            watched.watches -= 1;
            if watched.watches == 0 {
                map.remove(&self.run_id);
            }
        }
    }
}
