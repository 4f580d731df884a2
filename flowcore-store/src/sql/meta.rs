//! Credentials (ciphertext only), API keys (hashes), usage counters and file metadata over SQL
//! (their rows: `rows.rs`).

use async_trait::async_trait;
use chrono::Utc;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::{AsyncConnection, RunQueryDsl};
use flowcore::StoreError;
use flowcore::ports::{
    ApiKeyRecord, ApiKeyStore, CredentialStore, FileRecord, FileStore, Reencryption, StoreResult,
    StoredCredential, UsageDay, UsageQuery, UsageStore,
};

use super::rows::{ApiKeyRow, CredentialRow, FileRow, TokenRow, UsageRow};
use super::schema::{api_keys, credentials, files, usage_daily, usage_tokens};
use super::{SqlStore, db_error, micros, with_conn};

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
                .values(CredentialRow::of(c)?)
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
                .select(CredentialRow::as_select())
                .first(conn)
                .await
                .optional()
                .map_err(|e| db_error("reading a credential", e))?
        });
        row.map(StoredCredential::from)
            .ok_or_else(|| StoreError::not_found("credential", id_or_name))
    }

    async fn list_credentials(&self) -> StoreResult<Vec<StoredCredential>> {
        let rows: Vec<CredentialRow> = with_conn!(self, read, |conn| {
            credentials::table
                .select(CredentialRow::as_select())
                .order((credentials::created_at.asc(), credentials::id.asc()))
                .load(conn)
                .await
                .map_err(|e| db_error("listing credentials", e))?
        });
        Ok(rows.into_iter().map(StoredCredential::from).collect())
    }

    async fn reencrypt_credential(&self, change: &Reencryption<'_>) -> StoreResult<()> {
        let (id, old_key_id) = (change.id, change.old_key_id);
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
                credentials::key_id.eq(change.key_id),
                credentials::ciphertext.eq(change.ciphertext),
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

#[async_trait]
impl ApiKeyStore for SqlStore {
    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        with_conn!(self, write, |conn| {
            diesel::insert_into(api_keys::table)
                .values(ApiKeyRow::from(key))
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
                .select(ApiKeyRow::as_select())
                .first(conn)
                .await
                .optional()
                .map_err(|e| db_error("reading an API key", e))?
        });
        Ok(row.map(ApiKeyRecord::from))
    }

    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows: Vec<ApiKeyRow> = with_conn!(self, read, |conn| {
            api_keys::table
                .select(ApiKeyRow::as_select())
                .order((api_keys::created_at.asc(), api_keys::id.asc()))
                .load(conn)
                .await
                .map_err(|e| db_error("listing API keys", e))?
        });
        Ok(rows.into_iter().map(ApiKeyRecord::from).collect())
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

#[async_trait]
impl UsageStore for SqlStore {
    async fn add_usage(&self, usage: &UsageDay) -> StoreResult<()> {
        let (day, models) = (UsageRow::of(usage), TokenRow::of(usage));
        with_conn!(self, write, |conn| {
            let (day, models) = (&day, &models);
            conn.transaction(async move |conn| {
                diesel::insert_into(usage_daily::table)
                    .values(day)
                    .on_conflict((usage_daily::flow_id, usage_daily::day))
                    .do_update()
                    .set((
                        usage_daily::runs.eq(usage_daily::runs + excluded(usage_daily::runs)),
                        usage_daily::node_executions
                            .eq(usage_daily::node_executions
                                + excluded(usage_daily::node_executions)),
                        usage_daily::tokens.eq(usage_daily::tokens + excluded(usage_daily::tokens)),
                    ))
                    .execute(conn)
                    .await?;
                for model in models {
                    diesel::insert_into(usage_tokens::table)
                        .values(model)
                        .on_conflict((
                            usage_tokens::flow_id,
                            usage_tokens::day,
                            usage_tokens::model,
                        ))
                        .do_update()
                        .set((
                            usage_tokens::prompt_tokens
                                .eq(usage_tokens::prompt_tokens
                                    + excluded(usage_tokens::prompt_tokens)),
                            usage_tokens::completion_tokens.eq(usage_tokens::completion_tokens
                                + excluded(usage_tokens::completion_tokens)),
                        ))
                        .execute(conn)
                        .await?;
                }
                Ok::<(), diesel::result::Error>(())
            })
            .await
            .map_err(|e| db_error("adding usage", e))?;
        });
        Ok(())
    }

    async fn usage(&self, asked: &UsageQuery) -> StoreResult<Vec<UsageDay>> {
        let rows: Vec<UsageRow> = with_conn!(self, read, |conn| {
            let days = usage_daily::day.between(&asked.from_day, &asked.to_day);
            let mut query = usage_daily::table
                .filter(days)
                .select(UsageRow::as_select())
                .order((usage_daily::flow_id.asc(), usage_daily::day.asc()))
                .into_boxed();
            if let Some(flow_id) = &asked.flow_id {
                query = query.filter(usage_daily::flow_id.eq(flow_id));
            }
            query
                .load(conn)
                .await
                .map_err(|e| db_error("reading usage", e))?
        });
        let tokens: Vec<TokenRow> = with_conn!(self, read, |conn| {
            let mut query = usage_tokens::table
                .filter(usage_tokens::day.between(&asked.from_day, &asked.to_day))
                .select(TokenRow::as_select())
                .order((
                    usage_tokens::flow_id.asc(),
                    usage_tokens::day.asc(),
                    usage_tokens::model.asc(),
                ))
                .into_boxed();
            if let Some(flow_id) = &asked.flow_id {
                query = query.filter(usage_tokens::flow_id.eq(flow_id));
            }
            query
                .load(conn)
                .await
                .map_err(|e| db_error("reading token usage", e))?
        });
        let mut days: Vec<UsageDay> = rows.into_iter().map(UsageDay::from).collect();
        // Both lists are ordered by flow and day.
        let mut at = 0;
        for row in tokens {
            while at < days.len() && (&days[at].flow_id, &days[at].day) < (&row.flow_id, &row.day) {
                at += 1;
            }
            if let Some(day) = days
                .get_mut(at)
                .filter(|d| d.flow_id == row.flow_id && d.day == row.day)
            {
                day.models.push(flowcore::ports::ModelTokens {
                    model: row.model,
                    prompt_tokens: row.prompt_tokens.max(0) as u64,
                    completion_tokens: row.completion_tokens.max(0) as u64,
                });
            }
        }
        Ok(days)
    }
}

#[async_trait]
impl FileStore for SqlStore {
    async fn insert_file(&self, file: &FileRecord) -> StoreResult<()> {
        with_conn!(self, write, |conn| {
            diesel::insert_into(files::table)
                .values(FileRow::from(file))
                .execute(conn)
                .await
                .map_err(already_exists(format!("file `{}` exists", file.id)))?;
        });
        Ok(())
    }

    async fn get_file(&self, id: &str) -> StoreResult<FileRecord> {
        let row: Option<FileRow> = with_conn!(self, read, |conn| {
            files::table
                .find(id)
                .select(FileRow::as_select())
                .first(conn)
                .await
                .optional()
                .map_err(|e| db_error("reading a file", e))?
        });
        row.map(FileRecord::from)
            .ok_or_else(|| StoreError::not_found("file", id))
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
