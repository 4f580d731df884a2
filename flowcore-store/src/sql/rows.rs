//! The rows of the tables as diesel structs, in one place: what is read (`Queryable` +
//! `Selectable`: the columns come from the fields, in the fields' order) and what is written
//! (`Insertable`), with their conversions from and to the library's records. Written rows bind
//! `None` as NULL (`treat_none_as_default_value = false`): with diesel's default, `None` writes
//! `DEFAULT` into the SQL, whose text then varies from row to row, so diesel could not cache
//! the statement and each insert was prepared again (a 7% loss of webhook throughput). (Flows are stored
//! as their documents: `flows.rs`.)

use diesel::pg::Pg;
use diesel::prelude::*;
use flowcore::ports::{
    ApiKeyRecord, ConcurrencyKey, DEFAULT_PRIORITY, FileRecord, Lease, MAX_PRIORITY, RunRecord,
    StoreResult, StoredCredential, UsageDay,
};
use flowcore::{ItemBatch, ItemProgress, RunId, RunStatus, StepRecord, StepStatus, StoreError};
use serde_json::Value;

use super::schema::{
    api_keys, credentials, files, map_items, run_actions, runs, steps, usage_daily, usage_tokens,
};
use super::{from_micros, from_text, micros, stored_value, to_text};

/// A run's row as read.
#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = runs)]
pub(super) struct RunRow {
    pub seq: i64,
    pub id: String,
    pub flow_id: String,
    pub flow_version: i32,
    pub status: String,
    pub input: String,
    pub output: Option<String>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub epoch: i64,
    pub trigger: Option<String>,
    pub data_pruned_at: Option<i64>,
    pub parked: Option<String>,
    pub rerun_of: Option<String>,
    pub concurrency_key: Option<String>,
    pub concurrency_limit: Option<i32>,
    pub priority: i16,
}

/// The columns of a [`RunRow`], as statements select or return them (the same on both
/// backends: plain columns).
pub(super) type RunColumns = <RunRow as Selectable<Pg>>::SelectExpression;

/// The columns of a [`RunRow`].
pub(super) fn run_columns() -> RunColumns {
    <RunRow as Selectable<Pg>>::construct_selection()
}

/// A stored text that is not what this version writes: the store is corrupt, or newer.
fn unreadable(e: String) -> StoreError {
    StoreError::Backend {
        message: e,
        source: None,
    }
}

impl TryFrom<RunRow> for RunRecord {
    type Error = StoreError;

    fn try_from(row: RunRow) -> StoreResult<Self> {
        let lease = match (row.lease_owner, row.lease_expires_at) {
            (Some(owner), Some(expires)) => Some(Lease {
                owner,
                expires_at: from_micros(expires),
                epoch: row.epoch as u64,
            }),
            _ => None,
        };
        Ok(RunRecord {
            id: RunId::from(row.id),
            flow_id: row.flow_id,
            flow_version: u32::try_from(row.flow_version).unwrap_or_default(),
            status: row.status.parse().map_err(unreadable)?,
            input: stored_value(&row.input),
            output: row.output.as_deref().map(stored_value),
            error: row.error,
            idempotency_key: row.idempotency_key,
            created_at: from_micros(row.created_at),
            started_at: row.started_at.map(from_micros),
            finished_at: row.finished_at.map(from_micros),
            lease,
            epoch: row.epoch as u64,
            trigger: row.trigger.as_deref().map(stored_value),
            data_pruned: row.data_pruned_at.is_some(),
            parked: row
                .parked
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| unreadable(format!("a run's parked state: {e}")))?,
            rerun_of: row.rerun_of.map(RunId::from),
            concurrency: row.concurrency_key.map(|key| ConcurrencyKey {
                key,
                limit: row
                    .concurrency_limit
                    .and_then(|l| u32::try_from(l).ok())
                    .unwrap_or(1)
                    .max(1),
            }),
            priority: u8::try_from(row.priority)
                .unwrap_or(DEFAULT_PRIORITY)
                .min(MAX_PRIORITY),
        })
    }
}

/// A new run's row.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = runs, treat_none_as_default_value = false)]
pub(super) struct NewRunRow {
    pub id: String,
    pub flow_id: String,
    pub flow_version: i32,
    pub status: &'static str,
    pub input: String,
    pub idempotency_key: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub epoch: i64,
    pub trigger: Option<String>,
    pub rerun_of: Option<String>,
    pub concurrency_key: Option<String>,
    pub concurrency_limit: Option<i32>,
    pub priority: i16,
}

impl NewRunRow {
    /// The row of `run`, created at `now`; with `lease` (owner and expiry) created claimed:
    /// running since now, at epoch 1.
    pub fn new(
        run: &flowcore::ports::NewRun,
        now: i64,
        lease: Option<(String, i64)>,
    ) -> StoreResult<Self> {
        let claimed = lease.is_some();
        let (lease_owner, lease_expires_at) = lease.unzip();
        let status = if claimed {
            RunStatus::Running
        } else {
            RunStatus::Queued
        };
        Ok(Self {
            id: run.id.as_str().to_owned(),
            flow_id: run.flow_id.clone(),
            flow_version: i32::try_from(run.flow_version).unwrap_or(i32::MAX),
            status: status.as_str(),
            input: to_text(&run.input)?,
            idempotency_key: run.idempotency_key.clone(),
            created_at: now,
            started_at: claimed.then_some(now),
            lease_owner,
            lease_expires_at,
            epoch: i64::from(claimed),
            trigger: run.trigger.as_ref().map(to_text).transpose()?,
            rerun_of: run.rerun_of.as_ref().map(|id| id.as_str().to_owned()),
            concurrency_key: run.concurrency.as_ref().map(|c| c.key.clone()),
            concurrency_limit: run
                .concurrency
                .as_ref()
                .map(|c| i32::try_from(c.limit).unwrap_or(i32::MAX)),
            priority: i16::from(run.priority),
        })
    }
}

/// A step's row, read and written (inserted, or replacing the step's earlier row).
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = steps, treat_none_as_default_value = false)]
pub(super) struct StepRow {
    pub run_id: String,
    pub node: String,
    pub status: String,
    pub attempts: i32,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub output: Option<String>,
    pub error: Option<String>,
    pub port: Option<String>,
    pub error_code: Option<String>,
    pub items_total: Option<i32>,
    pub items_done: Option<i32>,
    pub reused: bool,
}

impl StepRow {
    /// The rows of run `id`'s `steps`.
    pub fn of(id: &RunId, steps: &[StepRecord]) -> StoreResult<Vec<Self>> {
        steps
            .iter()
            .map(|s| {
                Ok(Self {
                    run_id: id.as_str().to_owned(),
                    node: s.node.to_string(),
                    status: s.status.as_str().to_owned(),
                    attempts: i32::try_from(s.attempts).unwrap_or(i32::MAX),
                    started_at: s.started_at.map(micros),
                    finished_at: s.finished_at.map(micros),
                    output: s.output.as_deref().map(to_text).transpose()?,
                    error: s.error.clone(),
                    port: s.port.as_deref().map(str::to_owned),
                    error_code: s.error_code.clone(),
                    items_total: s.items.map(|p| items_count(p.total)),
                    items_done: s.items.map(|p| items_count(p.done)),
                    reused: s.reused,
                })
            })
            .collect()
    }
}

impl TryFrom<StepRow> for StepRecord {
    type Error = StoreError;

    fn try_from(row: StepRow) -> StoreResult<Self> {
        Ok(StepRecord {
            node: row.node.into(),
            status: row.status.parse::<StepStatus>().map_err(unreadable)?,
            attempts: u32::try_from(row.attempts).unwrap_or_default(),
            started_at: row.started_at.map(from_micros),
            finished_at: row.finished_at.map(from_micros),
            output: row
                .output
                .as_deref()
                .map(|text| std::sync::Arc::new(stored_value(text))),
            error: row.error,
            error_code: row.error_code,
            port: row.port.map(Into::into),
            items: row
                .items_total
                .zip(row.items_done)
                .map(|(total, done)| ItemProgress {
                    total: u32::try_from(total).unwrap_or_default(),
                    done: u32::try_from(done).unwrap_or_default(),
                }),
            reused: row.reused,
        })
    }
}

/// An item count as a SQL integer.
fn items_count(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// A person's action on a run ([`flowcore::ports::RunAction`] as JSON).
#[derive(Debug, Insertable)]
#[diesel(table_name = run_actions, treat_none_as_default_value = false)]
pub(super) struct RunActionRow {
    pub run_id: String,
    pub action: String,
}

/// A batch of a map step's finished items: `[[index, output], ...]`.
#[derive(Debug, Queryable, Selectable, Insertable)]
#[diesel(table_name = map_items)]
pub(super) struct MapItemsRow {
    pub run_id: String,
    pub node: String,
    pub first_index: i32,
    pub items: String,
}

impl MapItemsRow {
    /// The row of `batch` of run `id`.
    pub fn of(id: &RunId, batch: &ItemBatch) -> StoreResult<Self> {
        let items: Vec<(u32, &Value)> = batch.items.iter().map(|(i, v)| (*i, &**v)).collect();
        Ok(Self {
            run_id: id.as_str().to_owned(),
            node: batch.node.to_string(),
            first_index: items_count(batch.items.iter().map(|(i, _)| *i).min().unwrap_or(0)),
            items: to_text(&items)?,
        })
    }

    /// The items it holds.
    pub fn items(&self) -> StoreResult<Vec<(u32, Value)>> {
        from_text(&self.items)
    }

    /// The step that shows the progress of `batch`.
    pub fn progress(id: &RunId, batch: &ItemBatch) -> StepRow {
        StepRow {
            run_id: id.as_str().to_owned(),
            node: batch.node.to_string(),
            status: StepStatus::Running.as_str().to_owned(),
            attempts: 1,
            started_at: Some(micros(batch.started_at)),
            finished_at: None,
            output: None,
            error: None,
            port: None,
            error_code: None,
            items_total: Some(items_count(batch.progress.total)),
            items_done: Some(items_count(batch.progress.done)),
            reused: false,
        }
    }
}

/// A credential's row, read and written whole.
#[derive(Debug, Queryable, Selectable, Insertable)]
#[diesel(table_name = credentials, treat_none_as_default_value = false)]
pub(super) struct CredentialRow {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub key_id: String,
    pub ciphertext: Vec<u8>,
    pub created_at: i64,
    pub updated_at: i64,
    pub allowed_hosts: Option<String>,
}

impl CredentialRow {
    /// The row of `c`.
    pub fn of(c: &StoredCredential) -> StoreResult<Self> {
        Ok(Self {
            id: c.id.clone(),
            name: c.name.clone(),
            kind: c.kind.clone(),
            key_id: c.key_id.clone(),
            ciphertext: c.ciphertext.clone(),
            created_at: micros(c.created_at),
            updated_at: micros(c.updated_at),
            allowed_hosts: c.allowed_hosts.as_ref().map(to_text).transpose()?,
        })
    }
}

impl From<CredentialRow> for StoredCredential {
    fn from(row: CredentialRow) -> Self {
        Self {
            id: row.id,
            name: row.name,
            kind: row.kind,
            key_id: row.key_id,
            ciphertext: row.ciphertext,
            created_at: from_micros(row.created_at),
            updated_at: from_micros(row.updated_at),
            // An unreadable list allows nothing rather than anything.
            allowed_hosts: row
                .allowed_hosts
                .map(|text| serde_json::from_str(&text).unwrap_or_default()),
        }
    }
}

/// An API key's row (its hash, never the key), read and written whole.
#[derive(Debug, Queryable, Selectable, Insertable)]
#[diesel(table_name = api_keys, treat_none_as_default_value = false)]
pub(super) struct ApiKeyRow {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub hash: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub scopes: String,
    pub parent_id: Option<String>,
}

impl From<&ApiKeyRecord> for ApiKeyRow {
    fn from(key: &ApiKeyRecord) -> Self {
        Self {
            id: key.id.clone(),
            name: key.name.clone(),
            prefix: key.prefix.clone(),
            hash: key.hash.clone(),
            created_at: micros(key.created_at),
            revoked_at: key.revoked_at.map(micros),
            scopes: key.scopes.to_string(),
            parent_id: key.parent_id.clone(),
        }
    }
}

impl From<ApiKeyRow> for ApiKeyRecord {
    fn from(row: ApiKeyRow) -> Self {
        Self {
            id: row.id,
            name: row.name,
            prefix: row.prefix,
            hash: row.hash,
            created_at: from_micros(row.created_at),
            revoked_at: row.revoked_at.map(from_micros),
            // Unknown names (a newer version's scopes) grant nothing here.
            scopes: row
                .scopes
                .split(',')
                .filter_map(|s| s.trim().parse().ok())
                .collect(),
            parent_id: row.parent_id,
        }
    }
}

/// A count as stored (counts past `i64::MAX` stay there).
pub(super) fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One flow's usage on one day, read and added.
#[derive(Debug, Queryable, Selectable, Insertable)]
#[diesel(table_name = usage_daily)]
pub(super) struct UsageRow {
    pub flow_id: String,
    pub day: String,
    pub runs: i64,
    pub node_executions: i64,
    pub tokens: i64,
}

impl UsageRow {
    /// The row of `usage`.
    pub fn of(usage: &UsageDay) -> Self {
        Self {
            flow_id: usage.flow_id.clone(),
            day: usage.day.clone(),
            runs: count(usage.runs),
            node_executions: count(usage.node_executions),
            tokens: count(usage.tokens),
        }
    }
}

impl From<UsageRow> for UsageDay {
    fn from(row: UsageRow) -> Self {
        Self {
            flow_id: row.flow_id,
            day: row.day,
            runs: row.runs.max(0) as u64,
            node_executions: row.node_executions.max(0) as u64,
            tokens: row.tokens.max(0) as u64,
            models: Vec::new(),
        }
    }
}

/// One flow's tokens of one model on one day, read and added.
#[derive(Debug, Queryable, Selectable, Insertable)]
#[diesel(table_name = usage_tokens)]
pub(super) struct TokenRow {
    pub flow_id: String,
    pub day: String,
    pub model: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

impl TokenRow {
    /// The rows of `usage`'s models.
    pub fn of(usage: &UsageDay) -> Vec<Self> {
        usage
            .models
            .iter()
            .map(|m| Self {
                flow_id: usage.flow_id.clone(),
                day: usage.day.clone(),
                model: m.model.clone(),
                prompt_tokens: count(m.prompt_tokens),
                completion_tokens: count(m.completion_tokens),
            })
            .collect()
    }
}

/// A file's metadata row, read and written whole.
#[derive(Debug, Queryable, Selectable, Insertable)]
#[diesel(table_name = files, treat_none_as_default_value = false)]
pub(super) struct FileRow {
    pub id: String,
    pub name: String,
    pub content_type: String,
    pub size: i64,
    pub blob_key: String,
    pub created_at: i64,
}

impl From<&FileRecord> for FileRow {
    fn from(file: &FileRecord) -> Self {
        Self {
            id: file.id.clone(),
            name: file.name.clone(),
            content_type: file.content_type.clone(),
            size: count(file.size),
            blob_key: file.blob_key.clone(),
            created_at: micros(file.created_at),
        }
    }
}

impl From<FileRow> for FileRecord {
    fn from(row: FileRow) -> Self {
        Self {
            id: row.id,
            name: row.name,
            content_type: row.content_type,
            size: row.size.max(0) as u64,
            blob_key: row.blob_key,
            created_at: from_micros(row.created_at),
        }
    }
}
