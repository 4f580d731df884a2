//! Group commit for SQLite: the hot writes of many runs (creating a run, finishing one) share
//! one transaction. SQLite has one writer; a commit costs a WAL append, a hop to the blocking
//! pool and BEGIN/COMMIT, whatever it holds. Writes queue here while the writer is busy, and the
//! next transaction takes all of them (up to [`MAX_BATCH`]): under load a commit carries many
//! runs, with no wait added when idle. One refused write (a unique key) does not undo the
//! others: SQLite undoes a failed statement alone and the transaction goes on, so each write is
//! made to leave the database valid wherever it stops (no savepoint, whose journal and extra
//! statements cost the writer), and its caller hears back only after the commit.

use diesel::{QueryResult, SqliteConnection};
use diesel_async::pooled_connection::bb8::Pool;
use flowcore::StoreError;
use tokio::sync::{mpsc, oneshot};

use super::Sqlite;

/// The most writes one transaction carries.
pub(crate) const MAX_BATCH: usize = 128;

/// What a write tells its caller once the transaction has committed (or failed to).
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
/// One write, run on the writer connection inside the batch's transaction.
type Job = Box<dyn FnOnce(&mut SqliteConnection) -> Reply + Send>;

/// The queue in front of the writer connection.
#[derive(Clone)]
pub(crate) struct Batcher {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Batcher {
    /// Starts the writer task over `writer` (the single-connection pool); it ends when the last
    /// `Batcher` is dropped.
    pub(crate) fn start(writer: Pool<Sqlite>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut jobs = vec![first];
                while jobs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
                let mut conn = match writer.get().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        let message = format!("the database writer is unavailable: {e}");
                        // Dropping the jobs drops their senders: callers see the error below.
                        drop(jobs);
                        tracing::warn!("{message}");
                        continue;
                    }
                };
                let done = conn
                    .spawn_blocking(move |conn| {
                        let mut replies = Vec::with_capacity(jobs.len());
                        let committed = conn.immediate_transaction(|conn| {
                            for job in jobs {
                                replies.push(job(conn));
                            }
                            QueryResult::Ok(())
                        });
                        Ok((replies, committed.map_err(|e| e.to_string())))
                    })
                    .await;
                match done {
                    Ok((replies, committed)) => {
                        for reply in replies {
                            reply(committed.clone());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "a batch of writes failed"),
                }
            }
        });
        Self { jobs: tx }
    }

    /// Runs `write` in the next transaction; its result once that transaction has committed.
    /// `write` must leave the database valid if one of its statements fails (see above).
    pub(crate) async fn write<R: Send + 'static>(
        &self,
        what: &'static str,
        write: impl FnOnce(&mut SqliteConnection) -> QueryResult<R> + Send + 'static,
    ) -> Result<QueryResult<R>, StoreError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = write(conn);
            Box::new(move |committed: Result<(), String>| {
                let _ = tx.send(committed.map(|()| result));
            })
        });
        let lost = || StoreError::Unavailable {
            message: format!("{what}: the database writer stopped"),
            source: None,
        };
        self.jobs.send(job).map_err(|_| lost())?;
        match rx.await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => Err(StoreError::Unavailable {
                message: format!("{what}: the transaction failed: {e}"),
                source: None,
            }),
            Err(_) => Err(lost()),
        }
    }
}
