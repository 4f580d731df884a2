//! Credentials (ciphertext only), API keys (hashes), usage counters, file metadata and
//! schedule ticks over SQL.

use async_trait::async_trait;
use chrono::Utc;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;
use flowcore::StoreError;
use flowcore::ports::{
    ApiKeyRecord, ApiKeyStore, CredentialStore, FileRecord, FileStore, StoreResult,
    StoredCredential, UsageDay, UsageStore,
};

use super::schema::{api_keys, credentials, files, usage_daily};
use super::{SqlStore, db_error, from_micros, micros, with_conn};

type CredentialRow = (
    String,
    String,
    String,
    String,
    Vec<u8>,
    i64,
    i64,
    Option<String>,
);

fn credential(row: CredentialRow) -> StoredCredential {
    let (id, name, kind, key_id, ciphertext, created_at, updated_at, allowed_hosts) = row;
    StoredCredential {
        id,
        name,
        kind,
        key_id,
        ciphertext,
        created_at: from_micros(created_at),
        updated_at: from_micros(updated_at),
        // An unreadable list allows nothing rather than anything.
        allowed_hosts: allowed_hosts.map(|text| serde_json::from_str(&text).unwrap_or_default()),
    }
}

const CREDENTIAL_COLUMNS: (
    credentials::id,
    credentials::name,
    credentials::kind,
    credentials::key_id,
    credentials::ciphertext,
    credentials::created_at,
    credentials::updated_at,
    credentials::allowed_hosts,
) = (
    credentials::id,
    credentials::name,
    credentials::kind,
    credentials::key_id,
    credentials::ciphertext,
    credentials::created_at,
    credentials::updated_at,
    credentials::allowed_hosts,
);

fn already_exists(what: String) -> impl FnOnce(diesel::result::Error) -> StoreError {
    move |e| {
        if super::is_unique_violation(&e) {
            StoreError::AlreadyExists(what)
        } else {
            db_error("writing", e)
        }
    }
}

#[async_trait]
impl CredentialStore for SqlStore {
    async fn insert_credential(&self, c: &StoredCredential) -> StoreResult<()> {
        with_conn!(self, write, |conn| {
            diesel::insert_into(credentials::table)
                .values((
                    credentials::id.eq(&c.id),
                    credentials::name.eq(&c.name),
                    credentials::kind.eq(&c.kind),
                    credentials::key_id.eq(&c.key_id),
                    credentials::ciphertext.eq(&c.ciphertext),
                    credentials::created_at.eq(micros(c.created_at)),
                    credentials::updated_at.eq(micros(c.updated_at)),
                    credentials::allowed_hosts.eq(c
                        .allowed_hosts
                        .as_ref()
                        .map(super::to_text)
                        .transpose()?),
                ))
                .execute(conn)
                .await
                .map_err(already_exists(format!("credential `{}` exists", c.name)))?;
        });
        Ok(())
    }

    async fn get_credential(&self, id_or_name: &str) -> StoreResult<StoredCredential> {
        let row: Option<CredentialRow> = with_conn!(self, read, |conn| {
            credentials::table
                .filter(
                    credentials::id
                        .eq(id_or_name)
                        .or(credentials::name.eq(id_or_name)),
                )
                .select(CREDENTIAL_COLUMNS)
                .first(conn)
                .await
                .optional()
                .map_err(|e| db_error("reading a credential", e))?
        });
        row.map(credential)
            .ok_or_else(|| StoreError::not_found("credential", id_or_name))
    }

    async fn list_credentials(&self) -> StoreResult<Vec<StoredCredential>> {
        let rows: Vec<CredentialRow> = with_conn!(self, read, |conn| {
            credentials::table
                .select(CREDENTIAL_COLUMNS)
                .order((credentials::created_at.asc(), credentials::id.asc()))
                .load(conn)
                .await
                .map_err(|e| db_error("listing credentials", e))?
        });
        Ok(rows.into_iter().map(credential).collect())
    }

    async fn reencrypt_credential(
        &self,
        id: &str,
        old_key_id: &str,
        key_id: &str,
        ciphertext: &[u8],
    ) -> StoreResult<()> {
        let now = micros(Utc::now());
        let changed: usize = with_conn!(self, write, |conn| {
            diesel::update(
                credentials::table.filter(
                    credentials::id
                        .eq(id)
                        .and(credentials::key_id.eq(old_key_id)),
                ),
            )
            .set((
                credentials::key_id.eq(key_id),
                credentials::ciphertext.eq(ciphertext),
                credentials::updated_at.eq(now),
            ))
            .execute(conn)
            .await
            .map_err(|e| db_error("re-encrypting a credential", e))?
        });
        if changed == 1 {
            return Ok(());
        }
        let current = self.get_credential(id).await?;
        Err(StoreError::Conflict(format!(
            "credential `{id}` is under key `{}`, not `{old_key_id}`",
            current.key_id
        )))
    }

    async fn delete_credential(&self, id: &str) -> StoreResult<()> {
        let deleted: usize = with_conn!(self, write, |conn| {
            diesel::delete(credentials::table.find(id))
                .execute(conn)
                .await
                .map_err(|e| db_error("deleting a credential", e))?
        });
        super::found(deleted, "credential", id)
    }
}

type ApiKeyRow = (
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    String,
    Option<String>,
);

fn api_key(row: ApiKeyRow) -> ApiKeyRecord {
    let (id, name, prefix, hash, created_at, revoked_at, scopes, parent_id) = row;
    ApiKeyRecord {
        id,
        name,
        prefix,
        hash,
        created_at: from_micros(created_at),
        revoked_at: revoked_at.map(from_micros),
        // Unknown names (a newer version's scopes) grant nothing here.
        scopes: scopes
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
        parent_id,
    }
}

const API_KEY_COLUMNS: (
    api_keys::id,
    api_keys::name,
    api_keys::prefix,
    api_keys::hash,
    api_keys::created_at,
    api_keys::revoked_at,
    api_keys::scopes,
    api_keys::parent_id,
) = (
    api_keys::id,
    api_keys::name,
    api_keys::prefix,
    api_keys::hash,
    api_keys::created_at,
    api_keys::revoked_at,
    api_keys::scopes,
    api_keys::parent_id,
);

#[async_trait]
impl ApiKeyStore for SqlStore {
    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        with_conn!(self, write, |conn| {
            diesel::insert_into(api_keys::table)
                .values((
                    api_keys::id.eq(&key.id),
                    api_keys::name.eq(&key.name),
                    api_keys::prefix.eq(&key.prefix),
                    api_keys::hash.eq(&key.hash),
                    api_keys::created_at.eq(micros(key.created_at)),
                    api_keys::revoked_at.eq(key.revoked_at.map(micros)),
                    api_keys::scopes.eq(key.scopes.to_string()),
                    api_keys::parent_id.eq(&key.parent_id),
                ))
                .execute(conn)
                .await
                .map_err(already_exists(format!(
                    "API key prefix `{}` exists",
                    key.prefix
                )))?;
        });
        Ok(())
    }

    async fn find_api_key(&self, prefix: &str) -> StoreResult<Option<ApiKeyRecord>> {
        let row: Option<ApiKeyRow> = with_conn!(self, read, |conn| {
            api_keys::table
                .filter(api_keys::prefix.eq(prefix))
                .select(API_KEY_COLUMNS)
                .first(conn)
                .await
                .optional()
                .map_err(|e| db_error("reading an API key", e))?
        });
        Ok(row.map(api_key))
    }

    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows: Vec<ApiKeyRow> = with_conn!(self, read, |conn| {
            api_keys::table
                .select(API_KEY_COLUMNS)
                .order((api_keys::created_at.asc(), api_keys::id.asc()))
                .load(conn)
                .await
                .map_err(|e| db_error("listing API keys", e))?
        });
        Ok(rows.into_iter().map(api_key).collect())
    }

    async fn revoke_api_key(&self, id: &str) -> StoreResult<()> {
        use diesel::sql_types::{BigInt, Text};
        // The key and the keys made from it, at any depth, in one statement.
        let query = diesel::sql_query(
            "WITH RECURSIVE tree(id) AS ( \
                 SELECT id FROM api_keys WHERE id = $1 \
                 UNION SELECT k.id FROM api_keys k JOIN tree t ON k.parent_id = t.id) \
             UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) \
             WHERE id IN (SELECT id FROM tree)",
        )
        .bind::<Text, _>(id)
        .bind::<BigInt, _>(micros(Utc::now()));
        let found: usize = with_conn!(self, write, |conn| {
            query
                .clone()
                .execute(conn)
                .await
                .map_err(|e| db_error("revoking an API key", e))?
        });
        super::found(found, "API key", id)
    }
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl UsageStore for SqlStore {
    async fn add_usage(
        &self,
        flow_id: &str,
        day: &str,
        runs: u64,
        node_executions: u64,
        tokens: u64,
    ) -> StoreResult<()> {
        with_conn!(self, write, |conn| {
            diesel::insert_into(usage_daily::table)
                .values((
                    usage_daily::flow_id.eq(flow_id),
                    usage_daily::day.eq(day),
                    usage_daily::runs.eq(count(runs)),
                    usage_daily::node_executions.eq(count(node_executions)),
                    usage_daily::tokens.eq(count(tokens)),
                ))
                .on_conflict((usage_daily::flow_id, usage_daily::day))
                .do_update()
                .set((
                    usage_daily::runs.eq(usage_daily::runs + excluded(usage_daily::runs)),
                    usage_daily::node_executions
                        .eq(usage_daily::node_executions + excluded(usage_daily::node_executions)),
                    usage_daily::tokens.eq(usage_daily::tokens + excluded(usage_daily::tokens)),
                ))
                .execute(conn)
                .await
                .map_err(|e| db_error("adding usage", e))?;
        });
        Ok(())
    }

    async fn usage(
        &self,
        flow_id: Option<&str>,
        from_day: &str,
        to_day: &str,
    ) -> StoreResult<Vec<UsageDay>> {
        let rows: Vec<(String, String, i64, i64, i64)> = with_conn!(self, read, |conn| {
            let mut query = usage_daily::table
                .filter(
                    usage_daily::day
                        .ge(from_day)
                        .and(usage_daily::day.le(to_day)),
                )
                .select((
                    usage_daily::flow_id,
                    usage_daily::day,
                    usage_daily::runs,
                    usage_daily::node_executions,
                    usage_daily::tokens,
                ))
                .order((usage_daily::flow_id.asc(), usage_daily::day.asc()))
                .into_boxed();
            if let Some(flow_id) = flow_id {
                query = query.filter(usage_daily::flow_id.eq(flow_id.to_owned()));
            }
            query
                .load(conn)
                .await
                .map_err(|e| db_error("reading usage", e))?
        });
        Ok(rows
            .into_iter()
            .map(|(flow_id, day, runs, node_executions, tokens)| UsageDay {
                flow_id,
                day,
                runs: runs.max(0) as u64,
                node_executions: node_executions.max(0) as u64,
                tokens: tokens.max(0) as u64,
            })
            .collect())
    }
}

#[async_trait]
impl FileStore for SqlStore {
    async fn insert_file(&self, file: &FileRecord) -> StoreResult<()> {
        with_conn!(self, write, |conn| {
            diesel::insert_into(files::table)
                .values((
                    files::id.eq(&file.id),
                    files::name.eq(&file.name),
                    files::content_type.eq(&file.content_type),
                    files::size.eq(count(file.size)),
                    files::blob_key.eq(&file.blob_key),
                    files::created_at.eq(micros(file.created_at)),
                ))
                .execute(conn)
                .await
                .map_err(already_exists(format!("file `{}` exists", file.id)))?;
        });
        Ok(())
    }

    async fn get_file(&self, id: &str) -> StoreResult<FileRecord> {
        let row: Option<(String, String, String, i64, String, i64)> =
            with_conn!(self, read, |conn| {
                files::table
                    .find(id)
                    .select((
                        files::id,
                        files::name,
                        files::content_type,
                        files::size,
                        files::blob_key,
                        files::created_at,
                    ))
                    .first(conn)
                    .await
                    .optional()
                    .map_err(|e| db_error("reading a file", e))?
            });
        let (id, name, content_type, size, blob_key, created_at) =
            row.ok_or_else(|| StoreError::not_found("file", id))?;
        Ok(FileRecord {
            id,
            name,
            content_type,
            size: size.max(0) as u64,
            blob_key,
            created_at: from_micros(created_at),
        })
    }

    async fn delete_file(&self, id: &str) -> StoreResult<()> {
        let deleted: usize = with_conn!(self, write, |conn| {
            diesel::delete(files::table.find(id))
                .execute(conn)
                .await
                .map_err(|e| db_error("deleting a file", e))?
        });
        super::found(deleted, "file", id)
    }
}
