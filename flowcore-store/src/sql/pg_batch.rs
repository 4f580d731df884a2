//! Group commit for PostgreSQL's hot writes: the new runs of concurrent requests (without an
//! idempotency key) go in one multi-row INSERT ([`InsertRuns`]), and the ends of concurrent
//! runs in one UPDATE with their steps ([`FinishRuns`]): one round trip and one commit for a
//! batch. A batch is taken whenever one of [`IN_FLIGHT`] slots is free, so nothing waits when
//! the database keeps up, and batches grow when it does not. A batch that fails is not retried
//! here: each caller is told, and writes alone (which then reports its own error, or succeeds).
//!
//! (Written here rather than taken from a crate: the batching is a channel and a semaphore,
//! and the statements are the store's own.)

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::prepared::{EndArrays, Finish, FinishRuns, InsertRuns, RunArrays, StepArrays};
use super::rows::{NewRunRow, RunRow};

/// The most runs one statement carries.
const MAX_BATCH: usize = 64;
/// How many batches of one kind may be in flight at once.
const IN_FLIGHT: usize = 4;

/// The written row (`None`: the statement did not touch this run), or `Err(())` when the batch
/// failed (write alone then).
type Reply = oneshot::Sender<Result<Option<RunRow>, ()>>;

/// Writes a batch, returning the rows written (`None`: the statement failed).
type Write<T> = fn(
    Pool<AsyncPgConnection>,
    Vec<T>,
) -> Pin<Box<dyn Future<Output = Option<Vec<RunRow>>> + Send>>;

/// The queue in front of one kind of batched write; items are keyed by run id.
pub(super) struct Batcher<T> {
    tx: mpsc::UnboundedSender<(String, T, Reply)>,
}

impl<T> Clone for Batcher<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the batching task over `pool`; it ends when the last handle is dropped.
    fn start(pool: Pool<AsyncPgConnection>, write: Write<T>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, T, Reply)>();
        // For a run twice in one batch: its second write goes back in the queue.
        let again = tx.downgrade();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(IN_FLIGHT));
            while let Some(first) = rx.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let (pool, again) = (pool.clone(), again.clone());
                tokio::spawn(async move {
                    run(pool, batch, write, again).await;
                    drop(slot);
                });
            }
        });
        Self { tx }
    }

    /// Writes `item` of run `id` with others: the row written, `Ok(None)` when the statement
    /// did not touch the run, `Err(())` when the batch failed (the caller writes alone).
    async fn write(&self, id: String, item: T) -> Result<Option<RunRow>, ()> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((id, item, tx)).map_err(|_| ())?;
        rx.await.map_err(|_| ())?
    }
}

async fn run<T>(
    pool: Pool<AsyncPgConnection>,
    batch: Vec<(String, T, Reply)>,
    write: Write<T>,
    again: mpsc::WeakUnboundedSender<(String, T, Reply)>,
) {
    let mut ids = HashSet::with_capacity(batch.len());
    let mut items = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for (id, item, reply) in batch {
        // A run twice in one statement would be written once: the second goes in a later
        // batch, after the first (or alone, when the batcher is going away).
        if !ids.insert(id.clone()) {
            match again.upgrade() {
                Some(tx) => {
                    if let Err(mpsc::error::SendError((_, _, reply))) = tx.send((id, item, reply)) {
                        let _ = reply.send(Err(()));
                    }
                }
                None => {
                    let _ = reply.send(Err(()));
                }
            }
            continue;
        }
        items.push(item);
        replies.push((id, reply));
    }
    let Some(rows) = write(pool, items).await else {
        // Each caller writes alone and hears its own error.
        for (_, reply) in replies {
            let _ = reply.send(Err(()));
        }
        return;
    };
    let mut rows: HashMap<String, RunRow> = rows.into_iter().map(|r| (r.id.clone(), r)).collect();
    for (id, reply) in replies {
        let _ = reply.send(Ok(rows.remove(&id)));
    }
}

/// PostgreSQL's batched writes.
#[derive(Clone)]
pub(super) struct Batches {
    pub(super) creates: Creates,
    pub(super) finishes: Finishes,
}

impl Batches {
    /// Starts both batchers over `pool`.
    pub(super) fn start(pool: Pool<AsyncPgConnection>) -> Self {
        Self {
            creates: Creates::creates(pool.clone()),
            finishes: Finishes::finishes(pool),
        }
    }
}

/// The batched inserts of new runs.
pub(super) type Creates = Batcher<NewRunRow>;

impl Creates {
    /// Starts batching new runs over `pool`.
    pub(super) fn creates(pool: Pool<AsyncPgConnection>) -> Self {
        Self::start(pool, |pool, rows| {
            Box::pin(async move {
                let mut arrays = RunArrays::default();
                for row in rows {
                    arrays.push(row);
                }
                let mut conn = pool.get().await.ok()?;
                InsertRuns::new(arrays).load(&mut *conn).await.ok()
            })
        })
    }

    /// Inserts `row` (without an idempotency key) with others; `None` when the batch failed
    /// (the caller inserts it alone).
    pub(super) async fn insert(&self, row: NewRunRow) -> Option<RunRow> {
        self.write(row.id.clone(), row).await.ok().flatten()
    }
}

/// The batched ends of runs.
pub(super) type Finishes = Batcher<(Finish, StepArrays)>;

impl Finishes {
    /// Starts batching the ends of runs over `pool`.
    pub(super) fn finishes(pool: Pool<AsyncPgConnection>) -> Self {
        Self::start(pool, |pool, ends| {
            Box::pin(async move {
                let mut arrays = EndArrays::default();
                for (end, steps) in ends {
                    arrays.push(end, steps);
                }
                let mut conn = pool.get().await.ok()?;
                FinishRuns::new(arrays).load(&mut *conn).await.ok()
            })
        })
    }

    /// Ends a run (`end` under its epoch, with its last `steps`) with others: its row, `Ok(None)`
    /// when it is not running at that epoch, `Err(())` when the batch failed (the caller ends
    /// it alone).
    pub(super) async fn finish(
        &self,
        end: Finish,
        steps: StepArrays,
    ) -> Result<Option<RunRow>, ()> {
        self.write(end.id.clone(), (end, steps)).await
    }
}
