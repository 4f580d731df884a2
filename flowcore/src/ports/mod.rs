//! Ports: the storage traits the engine and the server depend on. Implementations live apart:
//! in-memory ones in [`memory`] (for tests and zero-server embedding), SQL, Redis and blob stores
//! in `flowcore-store`. Every implementation runs the conformance kit in `flowcore::testkit`.

pub mod memory;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::StoreError;
use crate::ids::RunId;
use crate::model::FlowDef;
use crate::run::{RunStatus, StepRecord};

/// A result of a storage port.
pub type StoreResult<T> = Result<T, StoreError>;

/// One version of a stored flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredFlow {
    /// The flow's id.
    pub id: String,
    /// 1 for the first version, then 2, 3, ...
    pub version: u32,
    /// The definition of this version (its `id` is the flow's id).
    pub definition: FlowDef,
    /// When this version was stored.
    pub created_at: DateTime<Utc>,
}

/// A page of a listing, newest first, with the cursor of the next page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Pass this as `cursor` to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Flows and their versions. A run is pinned to the version it started on, and old versions stay
/// readable after a new one is stored.
#[async_trait]
pub trait FlowStore: Send + Sync {
    /// Stores version 1 of a new flow; its `id` must be set. `AlreadyExists` when the id is taken.
    async fn create(&self, flow: &FlowDef) -> StoreResult<StoredFlow>;
    /// Stores the next version of an existing flow. `NotFound` when there is none.
    async fn update(&self, id: &str, flow: &FlowDef) -> StoreResult<StoredFlow>;
    /// One version of a flow, the latest when `version` is `None`.
    async fn get(&self, id: &str, version: Option<u32>) -> StoreResult<StoredFlow>;
    /// The latest version of each flow, newest first.
    async fn list(&self, limit: usize, cursor: Option<&str>) -> StoreResult<Page<StoredFlow>>;
    /// Deletes a flow and all its versions.
    async fn delete(&self, id: &str) -> StoreResult<()>;
}

/// A new run, as the API accepts it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    /// Its id.
    pub id: RunId,
    /// The flow.
    pub flow_id: String,
    /// The version the run is pinned to.
    pub flow_version: u32,
    /// The input.
    pub input: Value,
    /// The same key for the same flow gives the same run.
    pub idempotency_key: Option<String>,
    /// Create the run already claimed (`running`, epoch 1) by this owner, for a process that
    /// executes the run itself: one commit instead of two.
    pub claim: Option<Claim>,
    /// What started it, as templates see it (`trigger`): a webhook's path and chosen headers.
    pub trigger: Option<Value>,
}

/// A worker's claim on a run: who, and for how long without renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The worker's name.
    pub owner: String,
    /// The lease's time to live.
    pub ttl: Duration,
}

/// Who executes a running run, until when, and which ownership this is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The worker's name.
    pub owner: String,
    /// When the lease lapses unless renewed.
    pub expires_at: DateTime<Utc>,
    /// Grows with every new owner; a write with an older epoch is refused.
    pub epoch: u64,
}

/// A stored run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Its id.
    pub id: RunId,
    /// The flow.
    pub flow_id: String,
    /// The flow version it runs.
    pub flow_version: u32,
    /// Its status.
    pub status: RunStatus,
    /// Its input.
    pub input: Value,
    /// Its output, once succeeded.
    pub output: Option<Value>,
    /// Why it failed.
    pub error: Option<String>,
    /// Its idempotency key.
    pub idempotency_key: Option<String>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When a worker first started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final status.
    pub finished_at: Option<DateTime<Utc>>,
    /// The current worker lease, while running.
    pub lease: Option<Lease>,
    /// The epoch of the latest lease (0 before any).
    pub epoch: u64,
    /// What started it (see [`NewRun::trigger`]).
    pub trigger: Option<Value>,
}

/// How a run ended, as stored: what a request that waited for the run answers. Carried by
/// [`RunSignals::finished`], so that the waiter need not read the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEnd {
    /// Its final status.
    pub status: RunStatus,
    /// Its output as stored (a large one is a blob reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunRecord {
    /// Its end, once its status is final.
    ///
    /// ```
    /// # use flowcore::ports::RunRecord;
    /// # fn show(run: &RunRecord) {
    /// if let Some(end) = run.end() {
    ///     println!("{:?}: {:?}", end.status, end.output);
    /// }
    /// # }
    /// ```
    pub fn end(&self) -> Option<RunEnd> {
        self.status.is_final().then(|| RunEnd {
            status: self.status,
            output: self.output.clone(),
            error: self.error.clone(),
        })
    }
}

/// Filters of a run listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Only runs of this flow.
    pub flow_id: Option<String>,
    /// Only runs in this status.
    pub status: Option<RunStatus>,
    /// Page size (the store may cap it).
    pub limit: usize,
    /// The cursor from the previous page.
    pub cursor: Option<String>,
}

/// The end of a run, written by its lease owner.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunOutcome {
    /// A final status.
    pub status: RunStatus,
    /// The output, when succeeded.
    pub output: Option<Value>,
    /// Why it did not succeed.
    pub error: Option<String>,
    /// Steps not yet recorded, written in the same commit as the status.
    pub steps: Vec<StepRecord>,
}

/// Runs and their steps, with worker leases so that exactly one worker owns a running run.
#[async_trait]
pub trait RunStore: Send + Sync {
    /// Stores a queued run (or a running one, with `claim`). With an idempotency key already
    /// used for this flow, returns the existing run and `false`.
    async fn create(&self, run: NewRun) -> StoreResult<(RunRecord, bool)>;
    /// One run.
    async fn get(&self, id: &RunId) -> StoreResult<RunRecord>;
    /// Runs, newest first, with a cursor that stays correct under concurrent inserts.
    async fn list(&self, filter: &RunFilter) -> StoreResult<Page<RunRecord>>;
    /// Takes ownership of a run to execute it: a queued run, or a running one whose lease has
    /// expired. Sets `running`, a lease for `ttl` and a new epoch. `Conflict` otherwise.
    async fn claim(&self, id: &RunId, owner: &str, ttl: Duration) -> StoreResult<Lease>;
    /// [`claim`](Self::claim), answering the claimed run (its `lease` set): what a worker
    /// needs to execute it, in one round trip where the backend can.
    async fn claim_run(&self, id: &RunId, owner: &str, ttl: Duration) -> StoreResult<RunRecord> {
        self.claim(id, owner, ttl).await?;
        self.get(id).await
    }
    /// [`claim_run`](Self::claim_run) for several runs at once (a worker leasing a batch of
    /// jobs): answers the runs it claimed, in no particular order, and leaves out the ones not
    /// claimable (finished, leased by another owner, or unknown). One statement and one commit
    /// where the backend can (PostgreSQL); the default claims them one by one.
    async fn claim_runs(
        &self,
        ids: &[RunId],
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Vec<RunRecord>> {
        claim_each(self, ids, owner, ttl).await
    }
    /// Extends the lease of the current owner. `StaleLease` when another owner took over.
    async fn renew(&self, id: &RunId, epoch: u64, ttl: Duration) -> StoreResult<Lease>;
    /// Checkpoints steps (insert or replace by node). `StaleLease` when `epoch` is not current.
    async fn record_steps(&self, id: &RunId, epoch: u64, steps: &[StepRecord]) -> StoreResult<()>;
    /// The recorded steps of a run.
    async fn steps(&self, id: &RunId) -> StoreResult<Vec<StepRecord>>;
    /// Writes the final status of a running run and its last steps, atomically. `StaleLease`
    /// when `epoch` is not current.
    async fn finish(&self, id: &RunId, epoch: u64, outcome: RunOutcome) -> StoreResult<RunRecord>;
    /// Hands a running run back (`running` -> `queued`) without waiting for its lease to expire.
    async fn release(&self, id: &RunId, epoch: u64) -> StoreResult<()>;
    /// Compare-and-set of the status, for changes without a lease (such as cancelling a queued
    /// run). `Conflict` when the status is not `from`.
    async fn transition(
        &self,
        id: &RunId,
        from: RunStatus,
        to: RunStatus,
    ) -> StoreResult<RunRecord>;
    /// Running runs whose lease expired by `now`, for the reaper, with their expiry (`None`:
    /// no lease). With `after`, only those whose lease expired after it, oldest expiry first: a
    /// reaper that looked at the earlier ones already looks only at what lapsed since, which
    /// on PostgreSQL is a short range of the lease index instead of every row version that was
    /// ever running (dead ones too, until a vacuum).
    async fn expired(
        &self,
        after: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> StoreResult<Vec<(RunId, Option<DateTime<Utc>>)>>;
    /// Deletes up to `batch` finished runs (and their steps) created before `before`; returns
    /// how many were deleted. Callers loop until it returns less than `batch`.
    async fn prune(&self, before: DateTime<Utc>, batch: usize) -> StoreResult<usize>;
}

/// A job in a queue: the run to execute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The job's id.
    pub id: String,
    /// The run it executes.
    pub run_id: RunId,
    /// How many times it has been delivered, this delivery included.
    pub deliveries: u32,
}

/// A job delivered to one worker until its lease lapses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedJob {
    /// The job.
    pub job: Job,
    /// The worker group's queue it came from.
    pub group: String,
    /// Proves this delivery: heartbeats, acks and nacks with an older token are refused.
    pub token: String,
}

/// How many jobs a queue holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueDepth {
    /// Ready to be leased.
    pub ready: u64,
    /// Waiting for their time.
    pub delayed: u64,
    /// Leased to a worker.
    pub leased: u64,
    /// In the dead-letter list.
    pub dead: u64,
}

/// Hands runs to workers: at-least-once delivery with leases, one queue per worker group.
///
/// A job leased and not acked before its lease lapses is delivered again; after
/// `max_deliveries` deliveries it moves to the dead-letter list instead.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Adds a job for `run_id`, ready at `not_before` (now when `None`). Returns the job id.
    async fn enqueue(
        &self,
        group: &str,
        run_id: &RunId,
        not_before: Option<DateTime<Utc>>,
    ) -> StoreResult<String>;
    /// Leases up to `max` ready jobs (expired leases included) for `ttl`, waiting up to `wait`
    /// for the first one. Returns an empty list when none came.
    async fn lease(
        &self,
        group: &str,
        max: usize,
        ttl: Duration,
        wait: Duration,
    ) -> StoreResult<Vec<LeasedJob>>;
    /// Extends a lease. `StaleLease` when the job was delivered again or acked since.
    async fn heartbeat(&self, job: &LeasedJob, ttl: Duration) -> StoreResult<()>;
    /// Removes a finished job. Idempotent for the same delivery; `StaleLease` for an older one.
    async fn ack(&self, job: &LeasedJob) -> StoreResult<()>;
    /// Gives a job back to be delivered again at `retry_at` (now when `None`).
    async fn nack(&self, job: &LeasedJob, retry_at: Option<DateTime<Utc>>) -> StoreResult<()>;
    /// The depth of a group's queue.
    async fn depth(&self, group: &str) -> StoreResult<QueueDepth>;
    /// Jobs in a group's dead-letter list.
    async fn dead_letters(&self, group: &str, limit: usize) -> StoreResult<Vec<Job>>;
    /// How many times this process found the backend had lost its jobs (a Redis that
    /// restarted without persistence): when it grows, the runs waiting in the run store must be
    /// enqueued again. `None` (the default) for a queue that cannot lose jobs while its process
    /// lives.
    fn losses(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Whether `key` is acceptable as a blob key: segments of `[A-Za-z0-9._-]` joined by `/`, no
/// empty, `.` or `..` segment, at most 512 bytes. Keys are made by the server; a name a caller
/// supplies never becomes a key unchecked.
pub fn is_valid_blob_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 512
        && key
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
}

/// Files and large outputs, by key.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores `data` under `key`, replacing what was there.
    async fn put(&self, key: &str, data: Vec<u8>) -> StoreResult<()>;
    /// The bytes under `key`. `NotFound` when there are none.
    async fn get(&self, key: &str) -> StoreResult<Vec<u8>>;
    /// The size of the blob under `key`, `None` when there is none.
    async fn stat(&self, key: &str) -> StoreResult<Option<u64>>;
    /// Removes `key`; removing a missing key is not an error.
    async fn delete(&self, key: &str) -> StoreResult<()>;
    /// The keys under `prefix` (a folder such as `files/`), in no particular order.
    async fn list(&self, prefix: &str) -> StoreResult<Vec<String>>;
    /// The bytes under `key` as a stream of chunks, so that a large blob is never held in
    /// memory whole. `NotFound` when there are none. The default reads it whole.
    async fn get_stream(&self, key: &str) -> StoreResult<ChunkStream> {
        use futures::StreamExt;
        let data = self.get(key).await?;
        Ok(futures::stream::once(async move { Ok(data) }).boxed())
    }
    /// Stores a stream of chunks under `key`, refusing with `TooLarge` as soon as more than
    /// `max_bytes` arrive: nothing over the limit is held in memory or left in the store.
    /// Returns the size stored. The default collects the chunks (with the limit) and calls `put`.
    async fn put_stream(
        &self,
        key: &str,
        mut chunks: ChunkStream,
        max_bytes: u64,
    ) -> StoreResult<u64> {
        use futures::StreamExt;
        let mut data = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if data.len() as u64 + chunk.len() as u64 > max_bytes {
                return Err(too_large(max_bytes));
            }
            data.extend_from_slice(&chunk);
        }
        let size = data.len() as u64;
        self.put(key, data).await?;
        Ok(size)
    }
}

/// Chunks of an upload, as they arrive.
pub type ChunkStream = futures::stream::BoxStream<'static, StoreResult<Vec<u8>>>;

/// The error of an upload over its limit.
pub fn too_large(max_bytes: u64) -> StoreError {
    StoreError::TooLarge(format!("larger than the limit of {max_bytes} bytes"))
}

/// Every stored flow (latest versions), read page by page.
pub async fn all_flows(store: &dyn FlowStore) -> StoreResult<Vec<StoredFlow>> {
    let mut flows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store.list(1000, cursor.as_deref()).await?;
        flows.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(flows),
        }
    }
}

/// Deletes finished runs created before `before`, in batches of `batch`, pausing `pause`
/// between batches so that normal work gets the database in between (n8n and Activepieces
/// users hit pruning that locks the pool). Returns how many runs were deleted.
pub async fn prune_runs(
    store: &dyn RunStore,
    before: DateTime<Utc>,
    batch: usize,
    pause: Duration,
) -> StoreResult<usize> {
    let batch = batch.max(1);
    let mut total = 0;
    loop {
        let n = store.prune(before, batch).await?;
        total += n;
        if n < batch {
            return Ok(total);
        }
        tokio::time::sleep(pause).await;
    }
}

/// A stored credential: only ciphertext, tagged with the id of the key that encrypted it (the
/// crypto is the server's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCredential {
    /// Its id.
    pub id: String,
    /// A unique name that flows refer to.
    pub name: String,
    /// What kind of secret (`api_key`, `basic_auth`, ...).
    pub kind: String,
    /// The id of the encryption key.
    pub key_id: String,
    /// The encrypted secret (nonce included).
    pub ciphertext: Vec<u8>,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// When it was last re-encrypted or replaced.
    pub updated_at: DateTime<Utc>,
    /// The only hosts (`host` or `host:port`) it may be sent to; `None`: hosts written
    /// literally in the flow.
    pub allowed_hosts: Option<Vec<String>>,
}

/// Encrypted credentials.
#[async_trait]
pub trait CredentialStore: Send + Sync {
    /// Stores a new credential. `AlreadyExists` when the name is taken.
    async fn insert_credential(&self, credential: &StoredCredential) -> StoreResult<()>;
    /// One credential by id or by name.
    async fn get_credential(&self, id_or_name: &str) -> StoreResult<StoredCredential>;
    /// All credentials, oldest first.
    async fn list_credentials(&self) -> StoreResult<Vec<StoredCredential>>;
    /// Replaces the ciphertext and key id (key rotation), if `key_id` is still `old_key_id`.
    async fn reencrypt_credential(
        &self,
        id: &str,
        old_key_id: &str,
        key_id: &str,
        ciphertext: &[u8],
    ) -> StoreResult<()>;
    /// Deletes a credential.
    async fn delete_credential(&self, id: &str) -> StoreResult<()>;
}

/// A stored API key: a hash and a short public prefix, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// Its id.
    pub id: String,
    /// A human name.
    pub name: String,
    /// The key's first characters, shown in listings and used to find the hash.
    pub prefix: String,
    /// The key's hash.
    pub hash: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// What it may do.
    pub scopes: Scopes,
    /// The key that made it (`None`: made by the admin key or the command line). Revoking a
    /// key revokes every key it made, and theirs.
    pub parent_id: Option<String>,
}

/// One thing an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every `GET`.
    Read,
    /// Start, cancel, rerun, replay and signal runs.
    Run,
    /// Create, change and delete flows and files.
    Write,
    /// Credentials and API keys.
    Admin,
}

impl Scope {
    /// Every scope, in order.
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Run, Scope::Write, Scope::Admin];

    /// Its name: `read`, `run`, `write`, `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Run => "run",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| format!("unknown scope `{s}` (read, run, write, admin)"))
    }
}

/// A set of [`Scope`]s, written as their names joined by commas (`read,run`).
///
/// ```
/// use flowcore::ports::{Scope, Scopes};
///
/// let reader: Scopes = "read".parse().unwrap();
/// assert!(reader.contains(Scope::Read) && !reader.contains(Scope::Run));
/// assert!(reader.is_subset(Scopes::all()));
/// assert_eq!(Scopes::all().to_string(), "read,run,write,admin");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// Every scope.
    pub fn all() -> Self {
        Scope::ALL.into_iter().collect()
    }
    /// Whether `scope` is in the set.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
    /// Whether every scope of `self` is in `other`.
    pub fn is_subset(self, other: Scopes) -> bool {
        self.0 & !other.0 == 0
    }
    /// The scopes, in order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Scopes(iter.into_iter().fold(0, |bits, s| bits | s.bit()))
    }
}

impl std::fmt::Display for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.iter().map(Scope::as_str).collect();
        f.write_str(&names.join(","))
    }
}

impl std::fmt::Debug for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scopes({self})")
    }
}

impl std::str::FromStr for Scopes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse::<Scope>)
            .collect()
    }
}

impl Serialize for Scopes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for Scopes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Vec::<Scope>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

/// API keys.
#[async_trait]
pub trait ApiKeyStore: Send + Sync {
    /// Stores a new key. `AlreadyExists` when the prefix is taken.
    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()>;
    /// The key with this prefix, revoked or not.
    async fn find_api_key(&self, prefix: &str) -> StoreResult<Option<ApiKeyRecord>>;
    /// All keys, oldest first.
    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>>;
    /// Revokes a key and every key made from it, at any depth (idempotent). `NotFound` when
    /// there is none.
    async fn revoke_api_key(&self, id: &str) -> StoreResult<()>;
}

/// Usage of one flow on one day (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageDay {
    /// The flow.
    pub flow_id: String,
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Runs started.
    pub runs: u64,
    /// Node executions.
    pub node_executions: u64,
    /// LLM tokens.
    pub tokens: u64,
}

/// Usage counters per flow and day.
#[async_trait]
pub trait UsageStore: Send + Sync {
    /// Adds to a flow's counters of a day (atomically; concurrent adds all count).
    async fn add_usage(
        &self,
        flow_id: &str,
        day: &str,
        runs: u64,
        node_executions: u64,
        tokens: u64,
    ) -> StoreResult<()>;
    /// Counters of one flow (or all) between two days, inclusive, by flow then day.
    async fn usage(
        &self,
        flow_id: Option<&str>,
        from_day: &str,
        to_day: &str,
    ) -> StoreResult<Vec<UsageDay>>;
}

/// Metadata of an uploaded file; the bytes are in the blob store under `blob_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileRecord {
    /// Its id.
    pub id: String,
    /// The name it was uploaded with (metadata only: never a path).
    pub name: String,
    /// Its content type.
    pub content_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// Where the bytes are.
    pub blob_key: String,
    /// When it was uploaded.
    pub created_at: DateTime<Utc>,
}

/// File metadata.
#[async_trait]
pub trait FileStore: Send + Sync {
    /// Stores a file's metadata.
    async fn insert_file(&self, file: &FileRecord) -> StoreResult<()>;
    /// One file's metadata.
    async fn get_file(&self, id: &str) -> StoreResult<FileRecord>;
    /// Deletes a file's metadata.
    async fn delete_file(&self, id: &str) -> StoreResult<()>;
}

/// A rate limiter's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request may go on.
    pub allowed: bool,
    /// When refused: how long until the next request would be allowed (for `Retry-After`).
    pub retry_after: Duration,
    /// Requests left in the current window (approximate).
    pub remaining: u32,
}

/// Counts requests per key (a client address, an API key) against a per-minute limit, shared by
/// every process that uses the same backend.
#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Takes one request for `key` under `per_minute` (0 means no limit).
    async fn check(&self, key: &str, per_minute: u32) -> StoreResult<RateDecision>;
}

/// [`RunStore::claim_runs`] one run at a time, with [`RunStore::claim_run`]: the default, and
/// what a backend without a batch statement does.
pub async fn claim_each<S: RunStore + ?Sized>(
    store: &S,
    ids: &[RunId],
    owner: &str,
    ttl: Duration,
) -> StoreResult<Vec<RunRecord>> {
    let mut claimed = Vec::with_capacity(ids.len());
    for id in ids {
        match store.claim_run(id, owner, ttl).await {
            Ok(run) => claimed.push(run),
            Err(StoreError::Conflict(_) | StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(claimed)
}

/// One stored run event: its id (increasing within a run, for SSE `Last-Event-ID`), its name
/// (`run_started`, `node_finished`, ...) and its JSON text. Kept as text: the event is
/// serialized once where it happens and goes out as it is (an SSE `data:` line), never as a
/// tree of values.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    /// Increasing within the run; pass it back as `after` to resume.
    pub id: String,
    /// The event's name.
    pub name: String,
    /// The event as JSON text.
    pub data: String,
}

/// Run events shared between the process that executes a run and the processes that stream it.
///
/// Reading is a bounded pull (`read` with `after` and `wait`), not a subscription, so a client
/// that goes away leaves nothing behind (Flowise leaked Redis subscriptions until Redis dropped
/// the subscriber). A run's events are kept for a while after it ends, then dropped.
#[async_trait]
pub trait EventBus: Send + Sync {
    /// Appends an event to its run's log and returns its id.
    async fn publish(&self, event: &crate::event::RunEvent) -> StoreResult<String>;
    /// Appends events in order, in one round trip where the backend can (the default
    /// publishes them one by one).
    async fn publish_many(&self, events: &[crate::event::RunEvent]) -> StoreResult<()> {
        for event in events {
            self.publish(event).await?;
        }
        Ok(())
    }
    /// Events of `run_id` after the id `after` (from the start when `None`), waiting up to
    /// `wait` for the first one. An empty list means none came in time.
    async fn read(
        &self,
        run_id: &RunId,
        after: Option<&str>,
        wait: Duration,
    ) -> StoreResult<Vec<EventRecord>>;
}

/// An [`crate::event::EventSink`] that publishes to an [`EventBus`] in the background, so that
/// the scheduler never waits for the bus. Events of one run keep their order; one sink may serve
/// many runs (a process's), whose events then share the bus's round trips.
pub struct BusSink {
    tx: tokio::sync::mpsc::UnboundedSender<crate::event::RunEvent>,
}

impl std::fmt::Debug for BusSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusSink").finish_non_exhaustive()
    }
}

impl BusSink {
    /// A sink whose events go to `bus` from a task of the current runtime; the task ends when
    /// the sink is dropped and its events are out.
    pub fn new(bus: std::sync::Arc<dyn EventBus>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<crate::event::RunEvent>();
        tokio::spawn(async move {
            // What piled up while the last batch was out goes in the next one.
            let mut batch = Vec::with_capacity(16);
            while rx.recv_many(&mut batch, 256).await > 0 {
                if let Err(e) = bus.publish_many(&batch).await {
                    tracing::warn!(first_run_id = %batch[0].run_id(), events = batch.len(), error = %e, "could not publish run events");
                }
                batch.clear();
            }
        });
        Self { tx }
    }
}

impl crate::event::EventSink for BusSink {
    fn emit(&self, event: &crate::event::RunEvent) {
        let _ = self.tx.send(event.clone());
    }
}

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

/// Announces flow changes to every process, so that caches of compiled flows drop stale entries.
#[async_trait]
pub trait FlowChanges: Send + Sync {
    /// Tells every subscriber (in every process) that `flow_id` changed or was deleted.
    async fn publish(&self, flow_id: &str) -> StoreResult<()>;
    /// A receiver of changed flow ids. `*` (or a `Lagged` error) means changes may have been
    /// missed: drop everything.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String>;
}
