//! The hot statements of a run's life, written out as queries with a static id so that diesel
//! prepares each once per connection and then only binds and executes it.
//!
//! diesel never caches an UPDATE (its SET list could vary), an upsert or a multi-row insert:
//! each execution would be parsed again (SQLite) or parsed and planned again (PostgreSQL). Under
//! load that was the largest cost of SQLite's single writer and a large part of PostgreSQL's
//! (`perf`, BENCHMARKS.md). The SQL is the same as the query builder's; the tests of the
//! `RunStore` suite run through these statements on both backends.

use diesel::backend::Backend;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{Array, BigInt, Integer, Nullable, SmallInt, Text};
use diesel::sqlite::Sqlite;

use flowcore::{Move, RunStatus};

use super::rows::{NewRunRow, RunColumns, StepRow, run_columns};

/// The statuses `m` starts from as an SQL list (`'queued', 'running'`), from the one table of a
/// run's moves ([`RunStatus::move_to`]).
pub(super) fn sources(m: Move) -> &'static str {
    static LISTS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        Move::ALL
            .iter()
            .map(|m| {
                let quoted: Vec<String> = m.sources().map(|s| format!("'{s}'")).collect();
                quoted.join(", ")
            })
            .collect()
    });
    &LISTS[m as usize]
}

/// Implements `QueryId` with a static id (the type itself) and `Query` returning a run's row.
macro_rules! run_query {
    ($name:ident) => {
        impl QueryId for $name {
            type QueryId = Self;
            const HAS_STATIC_QUERY_ID: bool = true;
        }

        impl Query for $name {
            type SqlType = <RunColumns as Expression>::SqlType;
        }
    };
}

/// Claims a run: `UPDATE runs SET status = 'running', epoch = epoch + 1, <the lease>
/// WHERE id = ? AND (queued, or running with a lapsed lease) RETURNING <the run>`; with
/// [`Ids`] (PostgreSQL), `WHERE id = ANY(?)`: a batch in one statement. (`W` makes the two
/// statements two types, so that each has its own cache entry.)
pub(super) struct ClaimRun<W> {
    id: W,
    owner: String,
    now: i64,
    expires: i64,
    columns: RunColumns,
}

/// One run's id.
pub(super) struct Id(pub String);

/// Several runs' ids.
pub(super) struct Ids(pub Vec<String>);

impl<W> ClaimRun<W> {
    pub(super) fn new(id: W, owner: String, now: i64, expires: i64) -> Self {
        Self {
            id,
            owner,
            now,
            expires,
            columns: run_columns(),
        }
    }
}

impl<W: 'static> QueryId for ClaimRun<W> {
    type QueryId = Self;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<W> Query for ClaimRun<W> {
    type SqlType = <RunColumns as Expression>::SqlType;
}

/// The `WHERE` on the id of a [`ClaimRun`].
pub(super) trait WhereId<DB: Backend> {
    fn walk_id<'b>(&'b self, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<()>;
}

impl<DB: Backend> WhereId<DB> for Id
where
    String: ToSql<Text, DB>,
{
    fn walk_id<'b>(&'b self, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<()> {
        out.push_sql("id = ");
        out.push_bind_param::<Text, _>(&self.0)
    }
}

impl WhereId<Pg> for Ids {
    fn walk_id<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("id = ANY(");
        out.push_bind_param::<Array<Text>, _>(&self.0)?;
        out.push_sql(")");
        Ok(())
    }
}

impl<DB, W> QueryFragment<DB> for ClaimRun<W>
where
    DB: Backend,
    String: ToSql<Text, DB>,
    i64: ToSql<BigInt, DB>,
    RunColumns: QueryFragment<DB>,
    W: WhereId<DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        out.push_sql("UPDATE runs SET status = '");
        out.push_sql(RunStatus::Running.as_str());
        out.push_sql("', epoch = epoch + 1, lease_owner = ");
        out.push_bind_param::<Text, _>(&self.owner)?;
        out.push_sql(", lease_expires_at = ");
        out.push_bind_param::<BigInt, _>(&self.expires)?;
        out.push_sql(", started_at = COALESCE(started_at, ");
        out.push_bind_param::<BigInt, _>(&self.now)?;
        // A woken run, once claimed, is no longer one whose job may be lost
        // (`RunStore::woken_unclaimed`).
        out.push_sql("), wake_at = NULL WHERE ");
        self.id.walk_id(&mut out)?;
        // The statuses a claim starts from; a leased one only once its lease lapsed.
        out.push_sql(" AND status IN (");
        out.push_sql(sources(Move::Claim));
        out.push_sql(") AND (status <> '");
        out.push_sql(RunStatus::Running.as_str());
        out.push_sql("' OR lease_expires_at IS NULL OR lease_expires_at <= ");
        out.push_bind_param::<BigInt, _>(&self.now)?;
        out.push_sql(") RETURNING ");
        self.columns.walk_ast(out.reborrow())
    }
}

/// What the end of a run writes to its row, for the owner `epoch`.
pub(super) struct Finish {
    pub id: String,
    pub epoch: i64,
    pub status: &'static str,
    pub output: Option<String>,
    pub error: Option<String>,
    pub finished_at: i64,
}

/// `UPDATE runs SET <the end> WHERE id = ? AND epoch = ? AND status IN (<what a finish starts
/// from>)`.
fn finish_update<'b, DB>(end: &'b Finish, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<()>
where
    DB: Backend,
    String: ToSql<Text, DB>,
    &'static str: ToSql<Text, DB>,
    i64: ToSql<BigInt, DB>,
{
    out.push_sql("UPDATE runs SET status = ");
    out.push_bind_param::<Text, _>(&end.status)?;
    out.push_sql(", output = ");
    out.push_bind_param::<Nullable<Text>, _>(&end.output)?;
    out.push_sql(", error = ");
    out.push_bind_param::<Nullable<Text>, _>(&end.error)?;
    out.push_sql(", finished_at = ");
    out.push_bind_param::<BigInt, _>(&end.finished_at)?;
    out.push_sql(", lease_owner = NULL, lease_expires_at = NULL WHERE id = ");
    out.push_bind_param::<Text, _>(&end.id)?;
    out.push_sql(" AND epoch = ");
    out.push_bind_param::<BigInt, _>(&end.epoch)?;
    out.push_sql(" AND status IN (");
    out.push_sql(sources(Move::Finish));
    out.push_sql(") RETURNING ");
    Ok(())
}

/// SQLite: the end of a run, `UPDATE ... RETURNING <the run>` (its steps are written by cached
/// single-row statements before it, on the single writer).
pub(super) struct FinishRun(Finish, RunColumns);

impl FinishRun {
    pub(super) fn new(end: Finish) -> Self {
        Self(end, run_columns())
    }
}

run_query!(FinishRun);

// Run on SQLite's writer thread, with diesel's blocking API.
impl diesel::RunQueryDsl<diesel::SqliteConnection> for FinishRun {}

impl QueryFragment<Sqlite> for FinishRun {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        finish_update(&self.0, &mut out)?;
        self.1.walk_ast(out.reborrow())
    }
}

/// Steps of runs as one array per column, so that any number of them is one bind each.
#[derive(Default)]
pub(super) struct StepArrays {
    pub run_id: Vec<String>,
    pub node: Vec<String>,
    pub status: Vec<String>,
    pub attempts: Vec<i32>,
    pub started_at: Vec<Option<i64>>,
    pub finished_at: Vec<Option<i64>>,
    pub output: Vec<Option<String>>,
    pub error: Vec<Option<String>>,
    pub port: Vec<Option<String>>,
    pub error_code: Vec<Option<String>>,
    pub items_total: Vec<Option<i32>>,
    pub items_done: Vec<Option<i32>>,
}

impl StepArrays {
    /// The rows as columns.
    pub(super) fn of(rows: Vec<StepRow>) -> Self {
        let mut a = Self::default();
        for row in rows {
            a.run_id.push(row.run_id);
            a.node.push(row.node);
            a.status.push(row.status);
            a.attempts.push(row.attempts);
            a.started_at.push(row.started_at);
            a.finished_at.push(row.finished_at);
            a.output.push(row.output);
            a.error.push(row.error);
            a.port.push(row.port);
            a.error_code.push(row.error_code);
            a.items_total.push(row.items_total);
            a.items_done.push(row.items_done);
        }
        a
    }

    fn append(&mut self, other: Self) {
        self.run_id.extend(other.run_id);
        self.node.extend(other.node);
        self.status.extend(other.status);
        self.attempts.extend(other.attempts);
        self.started_at.extend(other.started_at);
        self.finished_at.extend(other.finished_at);
        self.output.extend(other.output);
        self.error.extend(other.error);
        self.port.extend(other.port);
        self.error_code.extend(other.error_code);
        self.items_total.extend(other.items_total);
        self.items_done.extend(other.items_done);
    }
}

/// The ends of runs as one array per column, with their last steps.
#[derive(Default)]
pub(super) struct EndArrays {
    id: Vec<String>,
    epoch: Vec<i64>,
    status: Vec<&'static str>,
    output: Vec<Option<String>>,
    error: Vec<Option<String>>,
    finished_at: Vec<i64>,
    steps: StepArrays,
}

impl EndArrays {
    pub(super) fn push(&mut self, end: Finish, steps: StepArrays) {
        self.id.push(end.id);
        self.epoch.push(end.epoch);
        self.status.push(end.status);
        self.output.push(end.output);
        self.error.push(end.error);
        self.finished_at.push(end.finished_at);
        self.steps.append(steps);
    }
}

/// PostgreSQL: the ends of any number of runs and their last steps in one statement (one round
/// trip, one commit): each run's UPDATE under its epoch, then the upsert of the steps of the
/// runs it found. A run listed twice is ended once (the batcher never lists one twice).
///
/// ```sql
/// WITH run AS (UPDATE runs SET ... FROM unnest(<the ends>) AS e(...)
///              WHERE runs.id = e.e_id AND runs.epoch = e.e_epoch AND runs.status = 'running'
///              RETURNING <the runs>),
///   written AS (INSERT INTO steps SELECT ... FROM unnest(<the steps>) AS s(...)
///               WHERE s.run_id IN (SELECT id FROM run) ON CONFLICT (run_id, node) DO UPDATE ...)
/// SELECT * FROM run
/// ```
pub(super) struct FinishRuns(EndArrays, RunColumns);

impl FinishRuns {
    pub(super) fn new(ends: EndArrays) -> Self {
        Self(ends, run_columns())
    }
}

run_query!(FinishRuns);

impl QueryFragment<Pg> for FinishRuns {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let (e, s) = (&self.0, &self.0.steps);
        out.push_sql(
            "WITH run AS (UPDATE runs SET status = e.e_status, output = e.e_output, \
             error = e.e_error, finished_at = e.e_finished_at, lease_owner = NULL, \
             lease_expires_at = NULL FROM unnest(",
        );
        out.push_bind_param::<Array<Text>, _>(&e.id)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&e.epoch)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&e.status)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&e.output)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&e.error)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&e.finished_at)?;
        out.push_sql(
            ") AS e(e_id, e_epoch, e_status, e_output, e_error, e_finished_at) \
             WHERE runs.id = e.e_id AND runs.epoch = e.e_epoch AND runs.status IN (",
        );
        out.push_sql(sources(Move::Finish));
        out.push_sql(") RETURNING ");
        self.1.walk_ast(out.reborrow())?;
        out.push_sql(
            "), written AS (INSERT INTO steps (run_id, node, status, attempts, started_at, \
             finished_at, output, error, port, error_code, items_total, items_done) SELECT \
             s.run_id, s.node, s.status, s.attempts, s.started_at, s.finished_at, s.output, \
             s.error, s.port, s.error_code, s.items_total, s.items_done FROM unnest(",
        );
        out.push_bind_param::<Array<Text>, _>(&s.run_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&s.node)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&s.status)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Integer>, _>(&s.attempts)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<BigInt>>, _>(&s.started_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<BigInt>>, _>(&s.finished_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&s.output)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&s.error)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&s.port)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&s.error_code)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Integer>>, _>(&s.items_total)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Integer>>, _>(&s.items_done)?;
        out.push_sql(
            ") AS s(run_id, node, status, attempts, started_at, finished_at, output, error, \
             port, error_code, items_total, items_done) WHERE s.run_id IN (SELECT id FROM run) \
             ON CONFLICT (run_id, node) DO UPDATE SET status = excluded.status, \
             attempts = excluded.attempts, started_at = excluded.started_at, \
             finished_at = excluded.finished_at, output = excluded.output, \
             error = excluded.error, port = excluded.port, error_code = excluded.error_code, \
             items_total = excluded.items_total, items_done = excluded.items_done), \
             cleared AS (DELETE FROM map_items WHERE run_id IN \
             (SELECT id FROM run WHERE status = 'succeeded')) \
             SELECT * FROM run",
        );
        Ok(())
    }
}

/// New runs (without an idempotency key) as one array per column: PostgreSQL inserts a batch
/// of them with one bind each.
#[derive(Default)]
pub(super) struct RunArrays {
    id: Vec<String>,
    flow_id: Vec<String>,
    flow_version: Vec<i32>,
    status: Vec<&'static str>,
    input: Vec<String>,
    created_at: Vec<i64>,
    started_at: Vec<Option<i64>>,
    lease_owner: Vec<Option<String>>,
    lease_expires_at: Vec<Option<i64>>,
    epoch: Vec<i64>,
    trigger: Vec<Option<String>>,
    concurrency_key: Vec<Option<String>>,
    concurrency_limit: Vec<Option<i32>>,
    priority: Vec<i16>,
}

impl RunArrays {
    pub(super) fn push(&mut self, row: NewRunRow) {
        self.id.push(row.id);
        self.flow_id.push(row.flow_id);
        self.flow_version.push(row.flow_version);
        self.status.push(row.status);
        self.input.push(row.input);
        self.created_at.push(row.created_at);
        self.started_at.push(row.started_at);
        self.lease_owner.push(row.lease_owner);
        self.lease_expires_at.push(row.lease_expires_at);
        self.epoch.push(row.epoch);
        self.trigger.push(row.trigger);
        self.concurrency_key.push(row.concurrency_key);
        self.concurrency_limit.push(row.concurrency_limit);
        self.priority.push(row.priority);
    }
}

/// PostgreSQL: new runs without an idempotency key, any number in one statement:
/// `INSERT INTO runs (...) SELECT ... FROM unnest(...) RETURNING <the runs>`.
pub(super) struct InsertRuns(RunArrays, RunColumns);

impl InsertRuns {
    pub(super) fn new(runs: RunArrays) -> Self {
        Self(runs, run_columns())
    }
}

run_query!(InsertRuns);

impl QueryFragment<Pg> for InsertRuns {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let r = &self.0;
        out.push_sql(
            "INSERT INTO runs (id, flow_id, flow_version, status, input, idempotency_key, \
             created_at, started_at, lease_owner, lease_expires_at, epoch, trigger, \
             concurrency_key, concurrency_limit, priority) \
             SELECT id, flow_id, flow_version, status, input, NULL, created_at, started_at, \
             lease_owner, lease_expires_at, epoch, trigger, concurrency_key, concurrency_limit, \
             priority FROM unnest(",
        );
        out.push_bind_param::<Array<Text>, _>(&r.id)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&r.flow_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Integer>, _>(&r.flow_version)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&r.status)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&r.input)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&r.created_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<BigInt>>, _>(&r.started_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&r.lease_owner)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<BigInt>>, _>(&r.lease_expires_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&r.epoch)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&r.trigger)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&r.concurrency_key)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Integer>>, _>(&r.concurrency_limit)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<SmallInt>, _>(&r.priority)?;
        out.push_sql(
            ") AS t(id, flow_id, flow_version, status, input, created_at, started_at, \
             lease_owner, lease_expires_at, epoch, trigger, concurrency_key, concurrency_limit, \
             priority) RETURNING ",
        );
        self.1.walk_ast(out.reborrow())
    }
}
