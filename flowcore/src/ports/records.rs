//! The server's records: encrypted credentials, API keys and their scopes, usage per flow
//! and day, uploaded files. The engine needs none of them; the server and its stores do (the
//! `records` feature).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::StoreResult;

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

/// A credential encrypted anew (key rotation): one value, so that its three ids cannot be
/// swapped silently.
#[derive(Debug, Clone, Copy)]
pub struct Reencryption<'a> {
    /// The credential's id.
    pub id: &'a str,
    /// The key it must still be under.
    pub old_key_id: &'a str,
    /// The key of `ciphertext`.
    pub key_id: &'a str,
    /// The secret encrypted under `key_id`.
    pub ciphertext: &'a [u8],
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
    /// Replaces the ciphertext and key id (key rotation), if the credential is still under
    /// `change.old_key_id`: `Conflict` otherwise.
    async fn reencrypt_credential(&self, change: &Reencryption<'_>) -> StoreResult<()>;
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
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct UsageDay {
    /// The flow.
    pub flow_id: String,
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Runs started.
    pub runs: u64,
    /// Node executions.
    pub node_executions: u64,
    /// LLM tokens (prompt and completion, every model).
    pub tokens: u64,
    /// LLM tokens by model, by model name.
    pub models: Vec<ModelTokens>,
}

/// LLM tokens of one model (in a [`UsageDay`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelTokens {
    /// The model, as the server named it in its answer.
    pub model: String,
    /// Tokens of prompts.
    pub prompt_tokens: u64,
    /// Tokens of answers.
    pub completion_tokens: u64,
}

impl UsageDay {
    /// Adds `prompt` and `completion` tokens of `model` (to `tokens` too).
    pub fn add_tokens(&mut self, model: &str, prompt: u64, completion: u64) {
        self.tokens = self
            .tokens
            .saturating_add(prompt.saturating_add(completion));
        merge_model(
            &mut self.models,
            &ModelTokens {
                model: model.to_owned(),
                prompt_tokens: prompt,
                completion_tokens: completion,
            },
        );
    }
}

/// Adds `tokens` to its model's entry of `models` (kept sorted by name).
pub(crate) fn merge_model(models: &mut Vec<ModelTokens>, tokens: &ModelTokens) {
    match models.binary_search_by(|m| m.model.cmp(&tokens.model)) {
        Ok(i) => {
            models[i].prompt_tokens = models[i].prompt_tokens.saturating_add(tokens.prompt_tokens);
            models[i].completion_tokens = models[i]
                .completion_tokens
                .saturating_add(tokens.completion_tokens);
        }
        Err(i) => models.insert(i, tokens.clone()),
    }
}

/// Usage counters per flow and day.
#[async_trait]
pub trait UsageStore: Send + Sync {
    /// Adds the counts of `usage` to its flow's counters of its day, its models' tokens
    /// included (atomically; concurrent adds all count).
    async fn add_usage(&self, usage: &UsageDay) -> StoreResult<()>;
    /// The counters the query asks for, by flow then day, each day's models by name.
    async fn usage(&self, query: &UsageQuery) -> StoreResult<Vec<UsageDay>>;
}

/// Which usage counters to read: of one flow (or all) between two days, inclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// One flow's, or every flow's when `None`.
    pub flow_id: Option<String>,
    /// The first day, `YYYY-MM-DD`.
    pub from_day: String,
    /// The last day, `YYYY-MM-DD`.
    pub to_day: String,
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
