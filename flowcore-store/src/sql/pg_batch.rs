//! Group commit for PostgreSQL's new runs: runs created by concurrent requests (without an
//! idempotency key) go in one multi-row INSERT, one round trip and one commit for the batch
//! ([`InsertRuns`]). A batch is taken whenever one of [`IN_FLIGHT`] slots is free, so nothing
//! waits when the database keeps up, and batches grow when it does not. A batch that fails is
//! not retried here: each caller is told, and inserts its run alone (which then reports its
//! own error, or succeeds).

use std::sync::Arc;

use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::prepared::{InsertRuns, RunArrays};
use super::runs::{NewRow, RunRow};

/// The most runs one statement carries.
const MAX_BATCH: usize = 64;
/// How many batches may be in flight at once.
const IN_FLIGHT: usize = 4;

/// The inserted row, or `None` when the batch failed (insert alone then).
type Reply = oneshot::Sender<Option<RunRow>>;

/// The queue in front of the batched inserts.
#[derive(Clone)]
pub(crate) struct Creates {
    tx: mpsc::UnboundedSender<(NewRow, Reply)>,
}

impl Creates {
    /// Starts the batching task over `pool`; it ends when the last `Creates` is dropped.
    pub(crate) fn start(pool: Pool<AsyncPgConnection>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(NewRow, Reply)>();
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
                let pool = pool.clone();
                tokio::spawn(async move {
                    insert(&pool, batch).await;
                    drop(slot);
                });
            }
        });
        Self { tx }
    }

    /// Inserts `row` (without an idempotency key) with others; `None` when the batch failed
    /// (the caller inserts it alone).
    pub(super) async fn insert(&self, row: NewRow) -> Option<RunRow> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((row, tx)).ok()?;
        rx.await.ok().flatten()
    }
}

async fn insert(pool: &Pool<AsyncPgConnection>, batch: Vec<(NewRow, Reply)>) {
    let mut arrays = RunArrays::default();
    let mut replies = Vec::with_capacity(batch.len());
    for (row, reply) in batch {
        replies.push((row.id.clone(), reply));
        arrays.push(row);
    }
    let rows: Option<Vec<RunRow>> = match pool.get().await {
        Ok(mut conn) => InsertRuns::new(arrays).load(&mut *conn).await.ok(),
        Err(_) => None,
    };
    let Some(rows) = rows else {
        // Each caller inserts alone and hears its own error.
        for (_, reply) in replies {
            let _ = reply.send(None);
        }
        return;
    };
    let mut rows: std::collections::HashMap<String, RunRow> =
        rows.into_iter().map(|r| (r.1.clone(), r)).collect();
    for (id, reply) in replies {
        let _ = reply.send(rows.remove(&id));
    }
}
