//! `RunStore` over SQL. Every change of a run is one conditional statement (compare-and-set on
//! status and lease epoch), so workers racing for a run need no other lock; step writes first
//! touch the run row under the caller's epoch, which takes the row lock (PostgreSQL) or the write
//! lock (SQLite) until the steps are in.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::{AsyncConnection, RunQueryDsl};
use flowcore::ports::{
    Claim, Due, Lapsed, Lease, MAX_ACTIONS_PER_RUN, NewRun, Page, Park, PruneRule, RunAction,
    RunFilter, RunOutcome, RunRecord, RunStore, Signal, SignalTake, StoreResult, signal_each,
};
use flowcore::wait::{MAX_KEYED_RUNS, MAX_PENDING_SIGNALS, Parked};
use flowcore::{ItemBatch, RunId, RunStatus, StepRecord, StepStatus, StoreError, Transition};
use serde_json::Value;

use super::prepared::{ClaimRun, EndArrays, Finish, FinishRuns, Id, Ids, StepArrays};
use super::rows::{MapItemsRow, NewRunRow, RunActionRow, RunRow, StepRow, run_columns};
use super::schema::{map_items, run_actions, runs, signals, steps, wait_keys};
use super::{
    SqlStore, db_error, from_micros, from_text, is_unique_violation, micros, to_text, with_conn,
};

/// The run `id` while `epoch` owns it and it runs: the target of every lease-guarded write.
/// The filter type of [`owned_run`].
type OwnedRun<'a> = diesel::dsl::Filter<
    runs::table,
    diesel::dsl::And<
        diesel::dsl::And<diesel::dsl::Eq<runs::id, &'a str>, diesel::dsl::Eq<runs::epoch, i64>>,
        diesel::dsl::Eq<runs::status, &'static str>,
    >,
>;

fn owned_run(id: &str, epoch: u64) -> OwnedRun<'_> {
    runs::table.filter(
        runs::id
            .eq(id)
            .and(runs::epoch.eq(epoch as i64))
            // The one status a lease owns (`RunStatus::is_leased`).
            .and(runs::status.eq(RunStatus::Running.as_str())),
    )
}

/// Whether run `id` is `epoch`'s, touching its row under that epoch, in the transaction of
/// `conn`: this takes the row's lock until commit, so a new owner cannot claim the run between
/// this check and the writes after it.
macro_rules! touch_owned {
    ($conn:expr, $id:expr, $epoch:expr) => {
        diesel::update(owned_run($id, $epoch))
            .set(runs::epoch.eq($epoch as i64))
            .execute($conn)
            .await?
            == 1
    };
}

/// Inserts or replaces step rows: one multi-row statement on PostgreSQL; one statement a row on
/// SQLite, where diesel cannot batch an upsert (and a statement costs no round trip).
trait UpsertSteps {
    fn upsert_steps(&mut self, rows: Vec<StepRow>) -> impl Future<Output = QueryResult<()>> + Send;
}

macro_rules! upsert {
    ($conn:expr, $rows:expr) => {
        diesel::insert_into(steps::table)
            .values($rows)
            .on_conflict((steps::run_id, steps::node))
            .do_update()
            .set((
                steps::status.eq(excluded(steps::status)),
                steps::attempts.eq(excluded(steps::attempts)),
                steps::started_at.eq(excluded(steps::started_at)),
                steps::finished_at.eq(excluded(steps::finished_at)),
                steps::output.eq(excluded(steps::output)),
                steps::error.eq(excluded(steps::error)),
                steps::port.eq(excluded(steps::port)),
                steps::error_code.eq(excluded(steps::error_code)),
                steps::items_total.eq(excluded(steps::items_total)),
                steps::items_done.eq(excluded(steps::items_done)),
            ))
            .execute($conn)
    };
}

/// The map steps among `rows` that succeeded (or were skipped), as a run id and nodes: their
/// checkpointed items are done with (the step holds their outputs). Those of a map that failed
/// stay, for a rerun of its failed items.
fn ended_maps(rows: &[StepRow]) -> Option<(String, Vec<String>)> {
    let done = [StepStatus::Succeeded.as_str(), StepStatus::Skipped.as_str()];
    let nodes: Vec<String> = rows
        .iter()
        .filter(|r| r.items_total.is_some() && done.contains(&r.status.as_str()))
        .map(|r| r.node.clone())
        .collect();
    Some((rows.first()?.run_id.clone(), nodes)).filter(|(_, nodes)| !nodes.is_empty())
}

/// Deletes the checkpointed items of the map steps among `rows` that ended.
macro_rules! clear_items {
    ($conn:expr, $rows:expr) => {
        if let Some((run_id, nodes)) = ended_maps($rows) {
            diesel::delete(
                map_items::table
                    .filter(map_items::run_id.eq(run_id))
                    .filter(map_items::node.eq_any(nodes)),
            )
            .execute($conn)
        } else {
            return Ok(());
        }
    };
}

impl UpsertSteps for diesel_async::AsyncPgConnection {
    async fn upsert_steps(&mut self, rows: Vec<StepRow>) -> QueryResult<()> {
        if !rows.is_empty() {
            upsert!(self, &rows).await?;
        }
        clear_items!(self, &rows).await?;
        Ok(())
    }
}

impl UpsertSteps for super::Sqlite {
    async fn upsert_steps(&mut self, rows: Vec<StepRow>) -> QueryResult<()> {
        for row in &rows {
            upsert!(&mut *self, row).await?;
        }
        clear_items!(&mut *self, &rows).await?;
        Ok(())
    }
}

/// SQLite's side of the hot writes, run whole on the connection's blocking thread: one hop to
/// the blocking pool per transaction instead of one per statement (BEGIN, UPDATE, each step,
/// COMMIT), which is most of a short write's cost. Every statement here is cached (see
/// `prepared`): steps go one cached single-row statement each, not one multi-row statement
/// parsed anew.
mod blocking {
    use diesel::prelude::*;
    use diesel::{RunQueryDsl, SqliteConnection};

    use super::super::prepared::{Finish, FinishRun};
    use super::{NewRunRow, RunRow, StepRow, map_items, owned_run, run_columns, runs, steps};

    /// The final write of a run, under the caller's epoch: its last steps, then the run row.
    /// No savepoint is needed (the batch's other writes must survive a failure here): the
    /// epoch is checked first, and on this single writer nothing can take the run before the
    /// row is written; a step written before a failure is a checkpoint like any other.
    pub(super) fn finish(
        conn: &mut SqliteConnection,
        end: Finish,
        rows: Vec<StepRow>,
        then: Option<NewRunRow>,
    ) -> QueryResult<Option<RunRow>> {
        let owned: bool = diesel::select(diesel::dsl::exists(owned_run(&end.id, end.epoch as u64)))
            .get_result(conn)?;
        if !owned {
            return Ok(None);
        }
        // First: a run that cannot be stored fails the end before anything of it is written.
        if let Some(then) = then {
            diesel::insert_into(runs::table)
                .values(then)
                .execute(conn)?;
        }
        for row in rows {
            // REPLACE writes every column, so replacing a row is updating it.
            diesel::replace_into(steps::table)
                .values(row)
                .execute(conn)?;
        }
        // A run that succeeded resumes no map and is not rerun from its failed items: its
        // checkpointed items are done with (another end keeps those of its failed maps).
        if end.status == flowcore::RunStatus::Succeeded.as_str() {
            diesel::delete(map_items::table.filter(map_items::run_id.eq(&end.id))).execute(conn)?;
        }
        FinishRun::new(end).get_result(conn).optional()
    }

    /// A new run's row.
    pub(super) fn create(conn: &mut SqliteConnection, row: NewRunRow) -> QueryResult<RunRow> {
        diesel::insert_into(runs::table)
            .values(row)
            .returning(run_columns())
            .get_result(conn)
    }
}

/// `status = '<status>'` written into the statement, not bound: PostgreSQL matches a partial
/// index's predicate (`runs_wake`, `runs_woken`) only against a literal; a generic plan for a
/// bound `status = $1` would read every waiting and running run's entry of another index.
fn status_is(status: RunStatus) -> diesel::expression::SqlLiteral<diesel::sql_types::Bool> {
    diesel::dsl::sql(&format!("status = '{}'", status.as_str()))
}

/// The final statuses' names.
fn final_statuses() -> Vec<&'static str> {
    RunStatus::ALL
        .into_iter()
        .filter(|s| s.is_final())
        .map(RunStatus::as_str)
        .collect()
}

fn ttl_micros(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX / 2)
}

fn parse_cursor(cursor: Option<&str>) -> StoreResult<i64> {
    match cursor {
        None => Ok(i64::MAX),
        Some(c) => c
            .parse()
            .map_err(|_| StoreError::Invalid(format!("invalid cursor `{c}`"))),
    }
}

/// Which run to read: by id, or by its flow's idempotency key.
#[derive(Debug, Clone, Copy)]
enum Find<'a> {
    Id(&'a str),
    Key { flow_id: &'a str, key: &'a str },
}

impl SqlStore {
    async fn get_row(&self, id: &str) -> StoreResult<Option<RunRecord>> {
        self.find(Find::Id(id)).await
    }

    async fn find_by_key(&self, flow_id: &str, key: &str) -> StoreResult<Option<RunRecord>> {
        self.find(Find::Key { flow_id, key }).await
    }

    async fn find(&self, by: Find<'_>) -> StoreResult<Option<RunRecord>> {
        let row: Option<RunRow> = with_conn!(self, read, |conn| {
            let query = runs::table.select(run_columns());
            match by {
                Find::Id(id) => query.filter(runs::id.eq(id)).first(conn).await,
                Find::Key { flow_id, key } => {
                    let same = runs::flow_id.eq(flow_id).and(runs::idempotency_key.eq(key));
                    query.filter(same).first(conn).await
                }
            }
            .optional()
            .map_err(|e| db_error("reading a run", e))?
        });
        row.map(RunRecord::try_from).transpose()
    }

    /// The run a conditional write returned, or why it returned none: the run is missing
    /// (`NotFound`), or in another status than the write expected (`Conflict`, saying `why`).
    async fn written(
        &self,
        id: &RunId,
        row: Option<RunRow>,
        why: impl FnOnce(RunStatus) -> String,
    ) -> StoreResult<RunRecord> {
        match row {
            Some(row) => row.try_into(),
            None => match self.get_row(id.as_str()).await? {
                Some(run) => Err(StoreError::Conflict(why(run.status))),
                None => Err(StoreError::not_found("run", id.as_str())),
            },
        }
    }

    /// Why a lease-guarded write found nothing: the run is missing, or the epoch is stale.
    async fn stale(&self, id: &RunId, epoch: u64) -> StoreError {
        match self.get_row(id.as_str()).await {
            Ok(Some(run)) => StoreError::StaleLease(format!(
                "run `{id}` is {} at epoch {}, not running at epoch {epoch}",
                run.status, run.epoch
            )),
            Ok(None) => StoreError::not_found("run", id.as_str()),
            Err(e) => e,
        }
    }
}

/// PostgreSQL: whether this transaction got the pruners' lock (`pg_try_advisory_xact_lock`,
/// held to its end). Processes prune one at a time; the others find it taken and skip.
macro_rules! pruner_lock {
    ($conn:expr) => {{
        let ours: bool = diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(
            "pg_try_advisory_xact_lock(4171003)",
        ))
        .get_result($conn)
        .await?;
        ours
    }};
}

/// Deletes what runs `ids` leave besides their row: steps, signals, wait keys. (A macro: the
/// connection is SQLite's or PostgreSQL's, and `ids` a list or a subquery.)
macro_rules! delete_belongings {
    ($conn:expr, $ids:expr) => {{
        diesel::delete(steps::table.filter(steps::run_id.eq_any($ids)))
            .execute($conn)
            .await?;
        diesel::delete(signals::table.filter(signals::run_id.eq_any($ids)))
            .execute($conn)
            .await?;
        diesel::delete(wait_keys::table.filter(wait_keys::run_id.eq_any($ids)))
            .execute($conn)
            .await?;
        diesel::delete(map_items::table.filter(map_items::run_id.eq_any($ids)))
            .execute($conn)
            .await?;
    }};
}

/// Deletes the runs `ids` and what they leave, in the transaction of `conn`.
macro_rules! delete_runs {
    ($conn:expr, $ids:expr) => {{
        delete_belongings!($conn, $ids);
        diesel::delete(runs::table.filter(runs::id.eq_any($ids)))
            .execute($conn)
            .await?;
    }};
}

impl SqlStore {
    /// `Ok` when a write under lease `epoch` found the run `owned`, else why not.
    async fn written_under(&self, owned: bool, id: &RunId, epoch: u64) -> StoreResult<()> {
        if owned {
            Ok(())
        } else {
            Err(self.stale(id, epoch).await)
        }
    }
}

#[async_trait]
impl RunStore for SqlStore {
    async fn create(&self, run: NewRun) -> StoreResult<(RunRecord, bool)> {
        if let Some(key) = &run.idempotency_key
            && let Some(existing) = self.find_by_key(&run.flow_id, key).await?
        {
            return Ok((existing, false));
        }
        if flowcore::json::too_deep(&run.input)
            || run.trigger.as_ref().is_some_and(flowcore::json::too_deep)
        {
            return Err(StoreError::Invalid(format!(
                "the run's input nests deeper than {} levels",
                flowcore::json::MAX_DEPTH
            )));
        }
        let now = micros(Utc::now());
        let lease = run
            .claim
            .as_ref()
            .map(|c| (c.owner.clone(), now.saturating_add(ttl_micros(c.ttl))));
        let new = NewRunRow::new(&run, now, lease)?;
        // `None`: the batch failed; the insert below reports this run's own error.
        if let super::Pools::Postgres { batches, .. } = &self.pools
            && new.idempotency_key.is_none()
            && let Some(row) = batches.creates.insert(new.clone()).await
        {
            return Ok((row.try_into()?, true));
        }
        let inserted: Result<RunRow, diesel::result::Error> = match &self.pools {
            super::Pools::Sqlite { batcher, .. } => {
                batcher
                    .write("creating a run", move |conn| blocking::create(conn, new))
                    .await?
            }
            super::Pools::Postgres { .. } => with_conn!(self, write, |conn| {
                let query = diesel::insert_into(runs::table)
                    .values(new)
                    .returning(run_columns());
                super::returned!(query, conn)
                    .and_then(|row| row.ok_or(diesel::result::Error::NotFound))
            }),
        };
        match inserted {
            Ok(row) => Ok((row.try_into()?, true)),
            Err(e) if is_unique_violation(&e) => {
                // Either a concurrent create with the same idempotency key won, or the id is taken.
                if let Some(key) = &run.idempotency_key
                    && let Some(existing) = self.find_by_key(&run.flow_id, key).await?
                {
                    return Ok((existing, false));
                }
                // The caller's fresh id: its batch did insert it, and then failed to answer.
                if matches!(self.pools, super::Pools::Postgres { .. })
                    && run.idempotency_key.is_none()
                    && let Some(mine) = self.get_row(run.id.as_str()).await?
                    && mine.created_at == from_micros(now)
                {
                    return Ok((mine, true));
                }
                Err(StoreError::AlreadyExists(format!(
                    "run `{}` exists",
                    run.id
                )))
            }
            Err(e) => Err(db_error("creating a run", e)),
        }
    }

    async fn get(&self, id: &RunId) -> StoreResult<RunRecord> {
        self.get_row(id.as_str())
            .await?
            .ok_or_else(|| StoreError::not_found("run", id.as_str()))
    }

    async fn list(&self, filter: &RunFilter) -> StoreResult<Page<RunRecord>> {
        let before = parse_cursor(filter.cursor.as_deref())?;
        let limit = filter.limit.clamp(1, 1000);
        let rows: Vec<RunRow> = with_conn!(self, read, |conn| {
            let mut query = runs::table
                .filter(runs::seq.lt(before))
                .select(run_columns())
                .order(runs::seq.desc())
                .limit(limit as i64 + 1)
                .into_boxed();
            if let Some(flow_id) = &filter.flow_id {
                query = query.filter(runs::flow_id.eq(flow_id.clone()));
            }
            if let Some(status) = filter.status {
                query = query.filter(runs::status.eq(status.as_str()));
            }
            if let Some(after) = filter.created_after {
                query = query.filter(runs::created_at.ge(micros(after)));
            }
            if let Some(before) = filter.created_before {
                query = query.filter(runs::created_at.lt(micros(before)));
            }
            query
                .load(conn)
                .await
                .map_err(|e| db_error("listing runs", e))?
        });
        let more = rows.len() > limit;
        let mut items = Vec::with_capacity(rows.len().min(limit));
        let mut last = None;
        for row in rows.into_iter().take(limit) {
            last = Some(row.seq);
            items.push(row.try_into()?);
        }
        Ok(Page {
            items,
            next_cursor: if more {
                last.map(|s| s.to_string())
            } else {
                None
            },
        })
    }

    async fn claim(&self, id: &RunId, owner: &str, ttl: Duration) -> StoreResult<Lease> {
        let run = self.claim_run(id, owner, ttl).await?;
        run.lease
            .ok_or_else(|| StoreError::Invalid(format!("run `{id}` was claimed without a lease")))
    }

    async fn claim_run(&self, id: &RunId, owner: &str, ttl: Duration) -> StoreResult<RunRecord> {
        let now = micros(Utc::now());
        let expires = now.saturating_add(ttl_micros(ttl));
        let row: Option<RunRow> = with_conn!(self, write, |conn| {
            let query = ClaimRun::new(Id(id.as_str().to_owned()), owner.to_owned(), now, expires);
            super::returned!(query, conn).map_err(|e| db_error("claiming a run", e))?
        });
        self.written(id, row, |status| {
            format!("run `{id}` is {status} and not claimable")
        })
        .await
    }

    async fn claim_runs(&self, ids: &[RunId], claim: &Claim) -> StoreResult<Vec<RunRecord>> {
        let super::Pools::Postgres { pool, .. } = &self.pools else {
            // SQLite: one by one, each a cached statement on the one writer.
            return flowcore::ports::claim_each(self, ids, claim).await;
        };
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let now = micros(Utc::now());
        let expires = now.saturating_add(ttl_micros(claim.ttl));
        let ids = Ids(ids.iter().map(|id| id.as_str().to_owned()).collect());
        let mut conn = pool.get().await.map_err(super::pool_error)?;
        let rows: Vec<RunRow> = ClaimRun::new(ids, claim.owner.clone(), now, expires)
            .load(&mut *conn)
            .await
            .map_err(|e| db_error("claiming runs", e))?;
        rows.into_iter().map(RunRecord::try_from).collect()
    }

    async fn renew(&self, id: &RunId, epoch: u64, ttl: Duration) -> StoreResult<Lease> {
        let expires = micros(Utc::now()).saturating_add(ttl_micros(ttl));
        let owner: Option<Option<String>> = with_conn!(self, write, |conn| {
            let query = diesel::update(owned_run(id.as_str(), epoch))
                .set(runs::lease_expires_at.eq(expires))
                .returning(runs::lease_owner);
            super::returned!(query, conn).map_err(|e| db_error("renewing a lease", e))?
        });
        match owner {
            Some(owner) => Ok(Lease {
                owner: owner.unwrap_or_default(),
                expires_at: from_micros(expires),
                epoch,
            }),
            None => Err(self.stale(id, epoch).await),
        }
    }

    async fn record_steps(&self, id: &RunId, epoch: u64, steps: &[StepRecord]) -> StoreResult<()> {
        let rows = StepRow::of(id, steps)?;
        let owned: bool = with_conn!(self, write, |conn| {
            let run_id = id.as_str().to_owned();
            conn.transaction(async move |conn| {
                if !touch_owned!(conn, &run_id, epoch) {
                    return Ok::<bool, diesel::result::Error>(false);
                }
                conn.upsert_steps(rows).await?;
                Ok(true)
            })
            .await
            .map_err(|e| db_error("recording steps", e))?
        });
        self.written_under(owned, id, epoch).await
    }

    async fn steps(&self, id: &RunId) -> StoreResult<Vec<StepRecord>> {
        let rows: Vec<StepRow> = with_conn!(self, read, |conn| {
            steps::table
                .filter(steps::run_id.eq(id.as_str()))
                .select(StepRow::as_select())
                .order((steps::started_at.asc(), steps::node.asc()))
                .load(conn)
                .await
                .map_err(|e| db_error("reading steps", e))?
        });
        if rows.is_empty() && self.get_row(id.as_str()).await?.is_none() {
            return Err(StoreError::not_found("run", id.as_str()));
        }
        rows.into_iter().map(StepRecord::try_from).collect()
    }

    async fn record_items(&self, id: &RunId, epoch: u64, batch: &ItemBatch) -> StoreResult<()> {
        if batch.items.is_empty() {
            return Ok(());
        }
        let (row, progress) = (
            MapItemsRow::of(id, batch)?,
            MapItemsRow::progress(id, batch),
        );
        let owned: bool = with_conn!(self, write, |conn| {
            let (run_id, row, progress) = (id.as_str().to_owned(), row, progress);
            conn.transaction(async move |conn| {
                if !touch_owned!(conn, &run_id, epoch) {
                    return Ok::<bool, diesel::result::Error>(false);
                }
                // A batch written again (a retried write that had committed) is the same batch.
                diesel::insert_into(map_items::table)
                    .values(row)
                    .on_conflict_do_nothing()
                    .execute(conn)
                    .await?;
                // The progress shows on a running step only: an ended step stays as it is.
                let upsert = diesel::insert_into(steps::table)
                    .values(progress)
                    .on_conflict((steps::run_id, steps::node))
                    .do_update()
                    .set((
                        steps::items_total.eq(excluded(steps::items_total)),
                        steps::items_done.eq(excluded(steps::items_done)),
                    ));
                diesel::query_dsl::methods::FilterDsl::filter(
                    upsert,
                    steps::status.eq(StepStatus::Running.as_str()),
                )
                .execute(conn)
                .await?;
                Ok(true)
            })
            .await
            .map_err(|e| db_error("recording items", e))?
        });
        self.written_under(owned, id, epoch).await
    }

    async fn create_rerun(
        &self,
        run: NewRun,
        kept: Vec<StepRecord>,
        items: Vec<ItemBatch>,
    ) -> StoreResult<RunRecord> {
        let run = NewRun {
            idempotency_key: None,
            claim: None,
            ..run
        };
        let new = NewRunRow::new(&run, micros(Utc::now()), None)?;
        let kept: Vec<StepRecord> = kept.into_iter().map(StepRecord::into_reused).collect();
        let rows = StepRow::of(&run.id, &kept)?;
        let batches = items
            .iter()
            .map(|batch| MapItemsRow::of(&run.id, batch))
            .collect::<StoreResult<Vec<_>>>()?;
        let row: RunRow = with_conn!(self, write, |conn| {
            let (new, rows, batches) = (new.clone(), rows.clone(), &batches);
            conn.transaction(async move |conn| {
                let row = diesel::insert_into(runs::table)
                    .values(new)
                    .returning(run_columns())
                    .get_result::<RunRow>(conn)
                    .await?;
                // A row a statement: few, and the same on both backends.
                for step in rows {
                    diesel::insert_into(steps::table)
                        .values(step)
                        .execute(conn)
                        .await?;
                }
                for batch in batches {
                    diesel::insert_into(map_items::table)
                        .values(batch)
                        .execute(conn)
                        .await?;
                }
                Ok::<RunRow, diesel::result::Error>(row)
            })
            .await
            .map_err(|e| db_error("creating a rerun", e))?
        });
        row.try_into()
    }

    async fn record_actions(&self, actions: &[(RunId, RunAction)]) -> StoreResult<()> {
        if actions.is_empty() {
            return Ok(());
        }
        let rows = actions
            .iter()
            .map(|(id, action)| {
                Ok(RunActionRow {
                    run_id: id.as_str().to_owned(),
                    action: to_text(action)?,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        with_conn!(self, write, |conn| {
            let rows = &rows;
            conn.transaction(async move |conn| {
                // Only for runs that are there (the foreign key refuses the others, and
                // deletes a run's actions with it), each up to its cap.
                let ids: Vec<&str> = rows.iter().map(|r| r.run_id.as_str()).collect();
                let there: Vec<String> = runs::table
                    .filter(runs::id.eq_any(&ids))
                    .select(runs::id)
                    .load(conn)
                    .await?;
                let mut counts: std::collections::HashMap<String, i64> = run_actions::table
                    .filter(run_actions::run_id.eq_any(&ids))
                    .group_by(run_actions::run_id)
                    .select((run_actions::run_id, diesel::dsl::count_star()))
                    .load::<(String, i64)>(conn)
                    .await?
                    .into_iter()
                    .collect();
                for row in rows.iter().filter(|r| there.contains(&r.run_id)) {
                    let count = counts.entry(row.run_id.clone()).or_default();
                    if *count >= MAX_ACTIONS_PER_RUN as i64 {
                        continue;
                    }
                    *count += 1;
                    diesel::insert_into(run_actions::table)
                        .values(row)
                        .execute(conn)
                        .await?;
                }
                Ok::<(), diesel::result::Error>(())
            })
            .await
            .map_err(|e| db_error("recording actions", e))?
        });
        Ok(())
    }

    async fn actions(&self, id: &RunId) -> StoreResult<Vec<RunAction>> {
        let rows: Vec<String> = with_conn!(self, read, |conn| {
            run_actions::table
                .filter(run_actions::run_id.eq(id.as_str()))
                .select(run_actions::action)
                .order(run_actions::id.asc())
                .load(conn)
                .await
                .map_err(|e| db_error("reading actions", e))?
        });
        rows.iter().map(|text| from_text(text)).collect()
    }

    async fn items(&self, id: &RunId, node: &str) -> StoreResult<Vec<(u32, Value)>> {
        let rows: Vec<MapItemsRow> = with_conn!(self, read, |conn| {
            map_items::table
                .filter(map_items::run_id.eq(id.as_str()))
                .filter(map_items::node.eq(node))
                .select(MapItemsRow::as_select())
                .order(map_items::first_index.asc())
                .load(conn)
                .await
                .map_err(|e| db_error("reading items", e))?
        });
        let mut items = Vec::new();
        for row in rows {
            items.extend(row.items()?);
        }
        items.sort_unstable_by_key(|(index, _)| *index);
        if items.is_empty() && self.get_row(id.as_str()).await?.is_none() {
            return Err(StoreError::not_found("run", id.as_str()));
        }
        Ok(items)
    }

    async fn finish(&self, id: &RunId, epoch: u64, outcome: RunOutcome) -> StoreResult<RunRecord> {
        if !outcome.status.is_final() {
            return Err(StoreError::Invalid(format!(
                "`{}` is not a final status",
                outcome.status
            )));
        }
        let finished_at = micros(Utc::now());
        let end = || -> StoreResult<Finish> {
            Ok(Finish {
                id: id.as_str().to_owned(),
                epoch: epoch as i64,
                status: outcome.status.as_str(),
                output: outcome.output.as_ref().map(to_text).transpose()?,
                error: outcome.error.clone(),
                finished_at,
            })
        };
        let now = micros(Utc::now());
        let then = outcome
            .then
            .as_ref()
            .map(|run| {
                NewRunRow::new(
                    &NewRun {
                        claim: None,
                        ..run.clone()
                    },
                    now,
                    None,
                )
            })
            .transpose()?;
        let row: Option<RunRow> = match &self.pools {
            super::Pools::Sqlite { batcher, .. } => {
                let (end, rows) = (end()?, StepRow::of(id, &outcome.steps)?);
                batcher
                    .write("finishing a run", move |conn| {
                        blocking::finish(conn, end, rows, then)
                    })
                    .await?
                    .map_err(|e| db_error("finishing a run", e))?
            }
            // A run that starts another (a failure handler; rare) ends in a transaction of
            // its own: the batch's statement writes ends only.
            super::Pools::Postgres { pool, .. } if let Some(then) = then => {
                let mut ends = EndArrays::default();
                ends.push(end()?, StepArrays::of(StepRow::of(id, &outcome.steps)?));
                let mut conn = pool.get().await.map_err(super::pool_error)?;
                let written = conn
                    .transaction(async move |conn| {
                        let ended: Option<RunRow> = super::returned!(FinishRuns::new(ends), conn)?;
                        if ended.is_some() {
                            diesel::insert_into(runs::table)
                                .values(then)
                                .execute(conn)
                                .await?;
                        }
                        Ok::<_, diesel::result::Error>(ended)
                    })
                    .await;
                drop(conn);
                match written {
                    Ok(row) => row,
                    // The commit may have gone through with its answer lost: ended at our
                    // epoch is ended by us (as after the batch).
                    Err(e) => match self.get_row(id.as_str()).await? {
                        Some(run) if run.epoch == epoch && run.status.is_final() => {
                            return Ok(run);
                        }
                        _ => return Err(db_error("finishing a run", e)),
                    },
                }
            }
            super::Pools::Postgres { pool, batches } => {
                let steps = StepArrays::of(StepRow::of(id, &outcome.steps)?);
                match batches.finishes.finish(end()?, steps).await {
                    Ok(row) => row,
                    Err(()) => {
                        let mut ends = EndArrays::default();
                        ends.push(end()?, StepArrays::of(StepRow::of(id, &outcome.steps)?));
                        let mut conn = pool.get().await.map_err(super::pool_error)?;
                        let alone: Option<RunRow> =
                            super::returned!(FinishRuns::new(ends), &mut *conn)
                                .map_err(|e| db_error("finishing a run", e))?;
                        drop(conn);
                        if alone.is_none()
                            && let Some(run) = self.get_row(id.as_str()).await?
                            && run.epoch == epoch
                            && run.status.is_final()
                        {
                            // Ended at our epoch, so by us: a batch that wrote it and then
                            // failed to answer.
                            return Ok(run);
                        }
                        alone
                    }
                }
            }
        };
        match row {
            Some(row) => row.try_into(),
            None => Err(self.stale(id, epoch).await),
        }
    }

    async fn release(&self, id: &RunId, epoch: u64) -> StoreResult<()> {
        let released: usize = with_conn!(self, write, |conn| {
            diesel::update(owned_run(id.as_str(), epoch))
                .set((
                    runs::status.eq(RunStatus::Queued.as_str()),
                    runs::lease_owner.eq(None::<String>),
                    runs::lease_expires_at.eq(None::<i64>),
                ))
                .execute(conn)
                .await
                .map_err(|e| db_error("releasing a run", e))?
        });
        if released == 1 {
            Ok(())
        } else {
            Err(self.stale(id, epoch).await)
        }
    }

    async fn transition(&self, id: &RunId, change: Transition) -> StoreResult<RunRecord> {
        flowcore::Move::unowned(change)?;
        let Transition { from, to } = change;
        let now = micros(Utc::now());
        let row: Option<RunRow> = with_conn!(self, write, |conn| {
            let target =
                runs::table.filter(runs::id.eq(id.as_str()).and(runs::status.eq(from.as_str())));
            if to.is_final() {
                let query = diesel::update(target)
                    .set((
                        runs::status.eq(to.as_str()),
                        runs::finished_at.eq(now),
                        runs::lease_owner.eq(None::<String>),
                        runs::lease_expires_at.eq(None::<i64>),
                    ))
                    .returning(run_columns());
                super::returned!(query, conn)
            } else {
                // The one move of no lease to a live status: a wake (see `woken_unclaimed`).
                let query = diesel::update(target)
                    .set((runs::status.eq(to.as_str()), runs::wake_at.eq(Some(now))))
                    .returning(run_columns());
                super::returned!(query, conn)
            }
            .map_err(|e| db_error("changing a run's status", e))?
        });
        self.written(id, row, |status| {
            format!("run `{id}` is {status}, not {from}")
        })
        .await
    }

    async fn park(&self, id: &RunId, epoch: u64, park: Park) -> StoreResult<RunRecord> {
        let rows = StepRow::of(id, &park.steps)?;
        let parked = to_text(&park.parked)?;
        let wake_at = park.parked.wake_at().map(micros);
        // A woken run keeps when it was woken in `wake_at` until a worker claims it (see
        // `woken_unclaimed`).
        let woke_at = micros(Utc::now());
        let names: Vec<String> = park
            .parked
            .waits
            .iter()
            .filter_map(|w| w.signal.clone())
            .collect();
        let keys: Vec<(String, String)> = park
            .parked
            .waits
            .iter()
            .filter_map(|w| Some((w.signal.clone()?, w.key.clone()?)))
            .collect();
        let row: Option<RunRow> = with_conn!(self, write, |conn| {
            let (run_id, rows, names, keys) = (id.as_str().to_owned(), rows, names, keys);
            let parked = parked.clone();
            conn.transaction(async move |conn| {
                // The row lock first: a signal sent meanwhile waits for this commit, or was
                // committed before and is seen below.
                let query = diesel::update(owned_run(&run_id, epoch))
                    .set((
                        runs::status.eq(RunStatus::Waiting.as_str()),
                        runs::parked.eq(Some(parked)),
                        runs::wake_at.eq(wake_at),
                        runs::lease_owner.eq(None::<String>),
                        runs::lease_expires_at.eq(None::<i64>),
                    ))
                    .returning(run_columns());
                let found: Option<RunRow> = super::returned!(query, conn)?;
                let Some(row) = found else {
                    return Ok::<_, diesel::result::Error>(None);
                };
                conn.upsert_steps(rows).await?;
                // The keys it waits with now, in place of those of an earlier park.
                diesel::delete(wait_keys::table.filter(wait_keys::run_id.eq(&run_id)))
                    .execute(conn)
                    .await?;
                for (signal, key) in keys {
                    diesel::insert_into(wait_keys::table)
                        .values((
                            wait_keys::signal.eq(signal),
                            wait_keys::key.eq(key),
                            wait_keys::run_id.eq(&run_id),
                        ))
                        .on_conflict_do_nothing()
                        .execute(conn)
                        .await?;
                }
                let answered: bool = diesel::select(diesel::dsl::exists(
                    signals::table.filter(
                        signals::run_id
                            .eq(&run_id)
                            .and(signals::taken_by.is_null())
                            .and(signals::name.eq_any(&names)),
                    ),
                ))
                .get_result(conn)
                .await?;
                if !answered {
                    return Ok(Some(row));
                }
                let query = diesel::update(runs::table.filter(runs::id.eq(&run_id)))
                    .set((
                        runs::status.eq(RunStatus::Queued.as_str()),
                        runs::wake_at.eq(Some(woke_at)),
                    ))
                    .returning(run_columns());
                super::returned!(query, conn)
            })
            .await
            .map_err(|e| db_error("parking a run", e))?
        });
        match row {
            Some(row) => row.try_into(),
            None => Err(self.stale(id, epoch).await),
        }
    }

    async fn wake_due(&self, due: &Due) -> StoreResult<Vec<RunRecord>> {
        let (by, limit) = (micros(due.by), due.limit.clamp(1, 10_000) as i64);
        let rows: Vec<RunRow> = with_conn!(self, write, |conn| {
            conn.transaction(async move |conn| {
                // The due range of the timer index (`runs_wake`: waiting runs by `wake_at`).
                let ids: Vec<String> = runs::table
                    .filter(status_is(RunStatus::Waiting))
                    .filter(runs::wake_at.le(by))
                    .order(runs::wake_at.asc())
                    .limit(limit)
                    .select(runs::id)
                    .load(conn)
                    .await?;
                if ids.is_empty() {
                    return Ok::<_, diesel::result::Error>(Vec::new());
                }
                // Still waiting and due: another process may have woken some meanwhile (and
                // one may have parked again since).
                diesel::update(
                    runs::table.filter(
                        runs::id
                            .eq_any(&ids)
                            .and(runs::status.eq(RunStatus::Waiting.as_str()))
                            .and(runs::wake_at.le(by)),
                    ),
                )
                .set((
                    runs::status.eq(RunStatus::Queued.as_str()),
                    runs::wake_at.eq(Some(by)),
                ))
                .returning(run_columns())
                .load(conn)
                .await
            })
            .await
            .map_err(|e| db_error("waking due runs", e))?
        });
        let mut woken = rows
            .into_iter()
            .map(RunRecord::try_from)
            .collect::<StoreResult<Vec<_>>>()?;
        woken.sort_by_key(|r| r.parked.as_ref().and_then(Parked::wake_at));
        Ok(woken)
    }

    async fn send_signal(&self, id: &RunId, signal: Signal<'_>) -> StoreResult<(RunRecord, bool)> {
        let Signal { name, payload, key } = signal;
        /// What a signal found.
        enum Sent {
            Missing,
            Finished(String),
            Full,
            Kept(RunRow),
            Woke(RunRow),
        }
        let payload = to_text(payload)?;
        let now = micros(Utc::now());
        let sent: Sent = with_conn!(self, write, |conn| {
            let (run_id, name, payload) =
                (id.as_str().to_owned(), name.to_owned(), payload.clone());
            let key = key.map(str::to_owned);
            conn.transaction(async move |conn| {
                // An update that changes nothing, for the row lock: a run parking meanwhile
                // commits first (and is seen waiting here), or sees this signal when it does.
                let query = diesel::update(runs::table.filter(runs::id.eq(&run_id)))
                    .set(runs::status.eq(runs::status))
                    .returning(run_columns());
                let found: Option<RunRow> = super::returned!(query, conn)?;
                let Some(row) = found else {
                    return Ok::<_, diesel::result::Error>(Sent::Missing);
                };
                let status = row.status.parse::<RunStatus>().unwrap_or(RunStatus::Failed);
                if status.is_final() {
                    return Ok(Sent::Finished(row.status));
                }
                let wakes = status == RunStatus::Waiting
                    && row
                        .parked
                        .as_deref()
                        .and_then(|text| serde_json::from_str::<Parked>(text).ok())
                        .is_some_and(|p| p.waits_for(&name, key.as_deref()));
                if key.is_some() && !wakes {
                    // A keyed signal is for the runs that wait with its key now.
                    return Ok(Sent::Kept(row));
                }
                let pending: i64 = signals::table
                    .filter(signals::run_id.eq(&run_id).and(signals::taken_by.is_null()))
                    .count()
                    .get_result(conn)
                    .await?;
                if pending >= MAX_PENDING_SIGNALS as i64 {
                    return Ok(Sent::Full);
                }
                diesel::insert_into(signals::table)
                    .values((
                        signals::run_id.eq(&run_id),
                        signals::name.eq(&name),
                        signals::payload.eq(payload),
                        signals::created_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
                if !wakes {
                    return Ok(Sent::Kept(row));
                }
                let query = diesel::update(runs::table.filter(runs::id.eq(&run_id)))
                    .set((
                        runs::status.eq(RunStatus::Queued.as_str()),
                        runs::wake_at.eq(Some(now)),
                    ))
                    .returning(run_columns());
                Ok(match super::returned!(query, conn)? {
                    Some(row) => Sent::Woke(row),
                    None => Sent::Kept(row),
                })
            })
            .await
            .map_err(|e| db_error("sending a signal", e))?
        });
        match sent {
            Sent::Missing => Err(StoreError::not_found("run", id.as_str())),
            Sent::Finished(status) => Err(StoreError::Conflict(format!("run `{id}` is {status}"))),
            Sent::Full => Err(StoreError::TooLarge(format!(
                "run `{id}` has {MAX_PENDING_SIGNALS} signals pending, the most it may"
            ))),
            Sent::Kept(row) => Ok((row.try_into()?, false)),
            Sent::Woke(row) => Ok((row.try_into()?, true)),
        }
    }

    async fn send_keyed_signal(&self, signal: Signal<'_>) -> StoreResult<Vec<RunRecord>> {
        let key = signal
            .key
            .ok_or_else(|| StoreError::Invalid("a keyed signal needs a key".into()))?;
        let waiting: Vec<String> = with_conn!(self, read, |conn| {
            let keyed = wait_keys::table
                .filter(
                    wait_keys::signal
                        .eq(signal.name)
                        .and(wait_keys::key.eq(key)),
                )
                .select(wait_keys::run_id);
            runs::table
                .filter(runs::id.eq_any(keyed))
                .filter(runs::status.eq(RunStatus::Waiting.as_str()))
                .select(runs::id)
                .limit(MAX_KEYED_RUNS as i64)
                .load(conn)
                .await
                .map_err(|e| db_error("finding keyed waits", e))?
        });
        signal_each(self, waiting.into_iter().map(RunId::from), signal).await
    }

    async fn take_signal(&self, id: &RunId, take: SignalTake<'_>) -> StoreResult<Option<Value>> {
        let SignalTake { epoch, node, name } = take;
        let taken: Option<Option<String>> = with_conn!(self, write, |conn| {
            let (run_id, node, name) = (id.as_str().to_owned(), node.to_owned(), name.to_owned());
            conn.transaction(async move |conn| {
                if !touch_owned!(conn, &run_id, epoch) {
                    return Ok::<_, diesel::result::Error>(None);
                }
                let of_run = signals::run_id.eq(&run_id).and(signals::name.eq(&name));
                let again: Option<String> = signals::table
                    .filter(of_run.and(signals::taken_by.eq(&node)))
                    .select(signals::payload)
                    .first(conn)
                    .await
                    .optional()?;
                if again.is_some() {
                    return Ok(Some(again));
                }
                let next: Option<(i64, String)> = signals::table
                    .filter(of_run.and(signals::taken_by.is_null()))
                    .order(signals::id.asc())
                    .select((signals::id, signals::payload))
                    .first(conn)
                    .await
                    .optional()?;
                let Some((signal, payload)) = next else {
                    return Ok(Some(None));
                };
                diesel::update(signals::table.filter(signals::id.eq(signal)))
                    .set(signals::taken_by.eq(Some(&node)))
                    .execute(conn)
                    .await?;
                Ok(Some(Some(payload)))
            })
            .await
            .map_err(|e| db_error("taking a signal", e))?
        });
        match taken {
            None => Err(self.stale(id, epoch).await),
            Some(payload) => Ok(payload.as_deref().map(super::stored_value)),
        }
    }

    async fn woken_unclaimed(&self, due: &Due) -> StoreResult<Vec<RunId>> {
        let (by, limit) = (micros(due.by), due.limit.clamp(1, 10_000) as i64);
        let ids: Vec<String> = with_conn!(self, read, |conn| {
            // `runs_woken`: queued runs by when they were woken.
            runs::table
                .filter(status_is(RunStatus::Queued))
                .filter(runs::wake_at.le(by))
                .order(runs::wake_at.asc())
                .limit(limit)
                .select(runs::id)
                .load(conn)
                .await
                .map_err(|e| db_error("finding woken runs", e))?
        });
        Ok(ids.into_iter().map(RunId::from).collect())
    }

    async fn expired(&self, due: &Due) -> StoreResult<Vec<Lapsed>> {
        let (after, now) = (due.after, micros(due.by));
        let limit = due.limit.min(10_000) as i64;
        let rows: Vec<(String, Option<i64>)> = with_conn!(self, read, |conn| {
            let query = runs::table
                .filter(runs::status.eq(RunStatus::Running.as_str()))
                .select((runs::id, runs::lease_expires_at))
                .limit(limit)
                .into_boxed();
            let query = match after {
                // The range of `runs_lease` (status, lease_expires_at) that lapsed since.
                Some(after) => query
                    .filter(runs::lease_expires_at.gt(micros(after)))
                    .filter(runs::lease_expires_at.le(now))
                    .order(runs::lease_expires_at.asc()),
                None => query
                    .filter(
                        runs::lease_expires_at
                            .is_null()
                            .or(runs::lease_expires_at.le(now)),
                    )
                    .order(runs::seq.asc()),
            };
            query
                .load(conn)
                .await
                .map_err(|e| db_error("finding expired leases", e))?
        });
        Ok(rows
            .into_iter()
            .map(|(id, at)| (RunId::from(id), at.map(from_micros)))
            .collect())
    }

    async fn reclaim(&self) -> StoreResult<bool> {
        use diesel::sql_types::BigInt;
        if !matches!(self.backend(), super::Backend::Sqlite) {
            // PostgreSQL's autovacuum makes the space of deleted rows reusable.
            return Ok(false);
        }
        // 1,000 pages (4 MB) a step: the write lock is held for milliseconds.
        let left: i64 = with_conn!(self, write, |conn| {
            // Run to its end (`batch_execute`): a prepared statement frees a page a step.
            diesel_async::SimpleAsyncConnection::batch_execute(
                conn,
                "PRAGMA incremental_vacuum(1000)",
            )
            .await
            .map_err(|e| db_error("reclaiming space", e))?;
            // Free pages left, in a database that can give them back (one created before
            // incremental auto-vacuum needs one `VACUUM` offline first).
            diesel::select(diesel::dsl::sql::<BigInt>(
                "(SELECT CASE WHEN (SELECT auto_vacuum FROM pragma_auto_vacuum()) = 2 \
                 THEN (SELECT freelist_count FROM pragma_freelist_count()) ELSE 0 END)",
            ))
            .get_result(conn)
            .await
            .map_err(|e| db_error("reading the free pages", e))?
        });
        Ok(left > 0)
    }

    async fn stored_bytes(&self) -> StoreResult<Option<u64>> {
        use diesel::sql_types::BigInt;
        let size = match self.backend() {
            super::Backend::Sqlite => {
                "(SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size())"
            }
            super::Backend::Postgres => "pg_database_size(current_database())",
        };
        let bytes: i64 = with_conn!(self, read, |conn| {
            diesel::select(diesel::dsl::sql::<BigInt>(size))
                .get_result(conn)
                .await
                .map_err(|e| db_error("reading the database size", e))?
        });
        Ok(u64::try_from(bytes).ok())
    }

    async fn prunable(&self, rule: &PruneRule, limit: usize) -> StoreResult<Vec<RunId>> {
        self.prune_or_look(rule, limit, false).await
    }

    async fn delete_finished(&self, ids: &[RunId]) -> StoreResult<Vec<RunId>> {
        let ids: Vec<&str> = ids.iter().map(RunId::as_str).collect();
        let gone: Vec<String> = with_conn!(self, write, |conn| {
            let ids = ids.clone();
            conn.transaction(async move |conn| {
                let finished = runs::id
                    .eq_any(&ids)
                    .and(runs::status.eq_any(final_statuses()));
                delete_belongings!(conn, runs::table.filter(finished.clone()).select(runs::id));
                // What this statement deleted: another process may have deleted some first.
                diesel::delete(runs::table.filter(finished))
                    .returning(runs::id)
                    .load::<String>(conn)
                    .await
            })
            .await
            .map_err(|e| db_error("deleting runs", e))?
        });
        Ok(gone.into_iter().map(RunId::from).collect())
    }

    async fn prune(&self, rule: &PruneRule, batch: usize) -> StoreResult<Vec<RunId>> {
        self.prune_or_look(rule, batch, true).await
    }

    async fn drop_data(&self, rule: &PruneRule, batch: usize) -> StoreResult<Vec<RunId>> {
        let Some(before) = rule.before.map(micros) else {
            return Ok(Vec::new());
        };
        let batch = batch.clamp(1, 10_000) as i64;
        let (flow, except) = (rule.flow_id.clone(), rule.except.clone());
        let postgres = matches!(self.backend(), super::Backend::Postgres);
        let now = micros(Utc::now());
        let ids: Vec<String> = with_conn!(self, write, |conn| {
            let (flow, except) = (flow.clone(), except.clone());
            conn.transaction(async move |conn| {
                // One process prunes at a time (the same lock as `prune`).
                if postgres && !pruner_lock!(conn) {
                    return Ok::<_, diesel::result::Error>(Vec::new());
                }
                // Those that finished first, first, through the partial indexes of the
                // finished runs that still have their data.
                let mut query = runs::table
                    .filter(runs::data_pruned_at.is_null())
                    .filter(runs::finished_at.is_not_null())
                    .filter(runs::finished_at.lt(before))
                    .filter(runs::status.eq_any(final_statuses()))
                    .into_boxed();
                query = match (flow, except.is_empty()) {
                    (Some(flow), _) => query.filter(runs::flow_id.eq(flow)),
                    (None, false) => query.filter(runs::flow_id.ne_all(except)),
                    (None, true) => query,
                };
                let ids: Vec<String> = query
                    .select(runs::id)
                    .order(runs::finished_at.asc())
                    .limit(batch)
                    .load(conn)
                    .await?;
                if ids.is_empty() {
                    return Ok(ids);
                }
                delete_belongings!(conn, &ids);
                diesel::update(runs::table.filter(runs::id.eq_any(&ids)))
                    .set((
                        runs::input.eq("null"),
                        runs::output.eq(None::<String>),
                        runs::trigger.eq(None::<String>),
                        // Rendered from the input: it goes with it.
                        runs::concurrency_key.eq(None::<String>),
                        runs::data_pruned_at.eq(Some(now)),
                    ))
                    .execute(conn)
                    .await?;
                Ok(ids)
            })
            .await
            .map_err(|e| db_error("dropping runs' data", e))?
        });
        Ok(ids.into_iter().map(RunId::from).collect())
    }
}

/// Where the pass of a pruning rule has got to: the greatest `seq` its batches took, and the
/// `seq` of the newest run its count keeps. Without it each batch looked again from the start:
/// on PostgreSQL through every row version the earlier batches deleted (dead until a vacuum),
/// and through `keep_newest` index entries for the count, and a pass fell behind 1,100 runs a
/// second (BENCHMARKS.md, "Retention on PostgreSQL"). A pass ends, and the next starts from
/// the beginning, when a batch takes less than a full batch: a run that finished late, below
/// the floor, is taken then.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PruneProgress {
    floor: i64,
    cutoff: Option<i64>,
}

impl SqlStore {
    /// The finished runs `rule` selects, oldest first, at most `batch`; deleted with their
    /// steps when `delete` (one process at a time on PostgreSQL: the others get nothing).
    async fn prune_or_look(
        &self,
        rule: &PruneRule,
        batch: usize,
        delete: bool,
    ) -> StoreResult<Vec<RunId>> {
        let key = format!(
            "{:?} {:?} {:?}",
            rule.flow_id, rule.except, rule.keep_newest
        );
        // Only a pass that deletes goes on from where it got to: a look (`prunable`) answers
        // the same until something changes.
        let progress = if delete {
            self.progress_of(&key)
        } else {
            PruneProgress::default()
        };
        let limit = batch.clamp(1, 10_000);
        let outcome = self.prune_batch(rule, limit as i64, delete, progress).await;
        // A full batch: the pass goes on from here. Less, or a failure: it is over, and the
        // next one starts from the beginning.
        let mut passes = self
            .prune_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match &outcome {
            Ok((taken, progress)) if delete && taken.len() == batch => {
                passes.insert(key, *progress);
            }
            _ => {
                passes.remove(&key);
            }
        }
        drop(passes);
        let (taken, _) = outcome?;
        Ok(taken.into_iter().map(|(id, _)| RunId::from(id)).collect())
    }

    /// One batch of [`SqlStore::prune_or_look`], from `progress`: the runs taken with their
    /// `seq`, and how far the pass got.
    async fn prune_batch(
        &self,
        rule: &PruneRule,
        batch: i64,
        delete: bool,
        progress: PruneProgress,
    ) -> StoreResult<(Vec<(String, i64)>, PruneProgress)> {
        let before = rule.before.map(micros);
        let (flow, except, keep) = (
            rule.flow_id.clone(),
            rule.except.clone(),
            rule.flow_id.as_ref().and(rule.keep_newest),
        );
        let postgres = matches!(self.backend(), super::Backend::Postgres);
        let (taken, progress): (Vec<(String, i64)>, PruneProgress) =
            with_conn!(self, write, |conn| {
                let (flow, except) = (flow.clone(), except.clone());
                conn.transaction(async move |conn| {
                    // One process prunes at a time: the others find the lock taken and prune
                    // nothing this pass. (SQLite has one writer anyway.)
                    if postgres && delete && !pruner_lock!(conn) {
                        return Ok::<_, diesel::result::Error>((Vec::new(), progress));
                    }
                    let mut progress = progress;
                    // The finished runs of the flows the rule is about past the pass's floor,
                    // oldest first.
                    let floor = progress.floor;
                    let chosen = || {
                        let query = runs::table
                            .filter(runs::status.eq_any(final_statuses()))
                            .filter(runs::seq.gt(floor))
                            .into_boxed();
                        match (&flow, except.is_empty()) {
                            (Some(flow), _) => query.filter(runs::flow_id.eq(flow.clone())),
                            (None, false) => query.filter(runs::flow_id.ne_all(except.clone())),
                            (None, true) => query,
                        }
                    };
                    let mut taken: Vec<(String, i64)> = Vec::new();
                    if let Some(before) = before {
                        taken = chosen()
                            .filter(runs::created_at.lt(before))
                            .select((runs::id, runs::seq))
                            .order(runs::seq.asc())
                            .limit(batch)
                            .load(conn)
                            .await?;
                    }
                    if let Some(keep) = keep
                        && (taken.len() as i64) < batch
                    {
                        // The newest run that stays (once a pass); the older ones go.
                        if progress.cutoff.is_none() {
                            progress.cutoff = runs::table
                                .filter(runs::status.eq_any(final_statuses()))
                                .filter(runs::flow_id.eq(flow.clone().unwrap_or_default()))
                                .select(runs::seq)
                                .order(runs::seq.desc())
                                .offset(i64::try_from(keep.saturating_sub(1)).unwrap_or(i64::MAX))
                                .limit(1)
                                .first(conn)
                                .await
                                .optional()?;
                        }
                        if let Some(cutoff) = progress.cutoff {
                            let ids: Vec<&str> = taken.iter().map(|(id, _)| id.as_str()).collect();
                            let more: Vec<(String, i64)> = chosen()
                                .filter(runs::seq.lt(cutoff))
                                .filter(runs::id.ne_all(ids))
                                .select((runs::id, runs::seq))
                                .order(runs::seq.asc())
                                .limit(batch - taken.len() as i64)
                                .load(conn)
                                .await?;
                            taken.extend(more);
                        }
                    }
                    if delete && !taken.is_empty() {
                        let ids: Vec<&str> = taken.iter().map(|(id, _)| id.as_str()).collect();
                        delete_runs!(conn, &ids);
                    }
                    progress.floor = taken
                        .iter()
                        .map(|(_, seq)| *seq)
                        .max()
                        .unwrap_or(progress.floor);
                    Ok((taken, progress))
                })
                .await
                .map_err(|e| db_error("pruning runs", e))?
            });
        Ok((taken, progress))
    }

    /// Where the pass of the rule `key` has got to.
    fn progress_of(&self, key: &str) -> PruneProgress {
        let passes = self
            .prune_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        passes.get(key).copied().unwrap_or_default()
    }
}
