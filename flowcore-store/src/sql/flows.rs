//! `FlowStore` over SQL: a row per flow (its latest version) and a row per version.

use async_trait::async_trait;
use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use flowcore::FlowDef;
use flowcore::StoreError;
use flowcore::ports::{FlowStore, Page, StoreResult, StoredFlow};

use super::schema::{flow_versions, flows};
use super::{SqlStore, db_error, from_micros, from_text, micros, to_text, with_conn};

fn stored(id: String, version: i32, definition: &str, created_at: i64) -> StoreResult<StoredFlow> {
    Ok(StoredFlow {
        id,
        version: u32::try_from(version).unwrap_or_default(),
        definition: from_text(definition)?,
        created_at: from_micros(created_at),
    })
}

fn parse_cursor(cursor: &str) -> StoreResult<(i64, String)> {
    cursor
        .split_once(':')
        .and_then(|(t, id)| Some((t.parse().ok()?, id.to_owned())))
        .ok_or_else(|| StoreError::Invalid(format!("invalid cursor `{cursor}`")))
}

#[async_trait]
impl FlowStore for SqlStore {
    async fn create(&self, flow: &FlowDef) -> StoreResult<StoredFlow> {
        let id = flow
            .id
            .clone()
            .ok_or_else(|| StoreError::Invalid("a stored flow needs an id".into()))?;
        let definition = to_text(flow)?;
        let now = micros(Utc::now());
        let result: Result<(), diesel::result::Error> = with_conn!(self, write, |conn| {
            let (id, definition) = (id.clone(), definition.clone());
            conn.transaction(async move |conn| {
                diesel::insert_into(flows::table)
                    .values((
                        flows::id.eq(&id),
                        flows::latest_version.eq(1),
                        flows::created_at.eq(now),
                        flows::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
                diesel::insert_into(flow_versions::table)
                    .values((
                        flow_versions::flow_id.eq(&id),
                        flow_versions::version.eq(1),
                        flow_versions::definition.eq(&definition),
                        flow_versions::created_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
                Ok(())
            })
            .await
        });
        match result {
            Ok(()) => stored(id, 1, &definition, now),
            Err(e) if super::is_unique_violation(&e) => {
                Err(StoreError::AlreadyExists(format!("flow `{id}` exists")))
            }
            Err(e) => Err(db_error("creating a flow", e)),
        }
    }

    async fn update(&self, id: &str, flow: &FlowDef) -> StoreResult<StoredFlow> {
        let mut definition = flow.clone();
        definition.id = Some(id.to_owned());
        let text = to_text(&definition)?;
        let now = micros(Utc::now());
        let version: Option<i32> = with_conn!(self, write, |conn| {
            let (id, text) = (id.to_owned(), text.clone());
            conn.transaction(async move |conn| {
                {
                    // The UPDATE takes the row's write lock, so concurrent updates get
                    // consecutive versions.
                    let version: Option<i32> = diesel::update(flows::table.find(&id))
                        .set((
                            flows::latest_version.eq(flows::latest_version + 1),
                            flows::updated_at.eq(now),
                        ))
                        .returning(flows::latest_version)
                        .get_result(conn)
                        .await
                        .optional()?;
                    if let Some(version) = version {
                        diesel::insert_into(flow_versions::table)
                            .values((
                                flow_versions::flow_id.eq(&id),
                                flow_versions::version.eq(version),
                                flow_versions::definition.eq(&text),
                                flow_versions::created_at.eq(now),
                            ))
                            .execute(conn)
                            .await?;
                    }
                    Ok::<_, diesel::result::Error>(version)
                }
            })
            .await
            .map_err(|e| db_error("updating a flow", e))?
        });
        match version {
            Some(v) => stored(id.to_owned(), v, &text, now),
            None => Err(StoreError::not_found("flow", id)),
        }
    }

    async fn get(&self, id: &str, version: Option<u32>) -> StoreResult<StoredFlow> {
        let which = match version {
            Some(v) => Which::Version(i32::try_from(v).unwrap_or(i32::MAX)),
            None => Which::Latest,
        };
        match self.version_row(id, which).await? {
            Some((v, definition, created_at)) => stored(id.to_owned(), v, &definition, created_at),
            None if version.is_some() => Err(StoreError::not_found(
                "flow version",
                format!("{id}@{}", version.unwrap_or(0)),
            )),
            None => Err(StoreError::not_found("flow", id)),
        }
    }

    async fn get_as_of(&self, id: &str, at: chrono::DateTime<Utc>) -> StoreResult<StoredFlow> {
        match self.version_row(id, Which::AsOf(micros(at))).await? {
            Some((v, definition, created_at)) => stored(id.to_owned(), v, &definition, created_at),
            // None then: the flow was created since.
            None => self.get(id, None).await,
        }
    }

    async fn list(&self, limit: usize, cursor: Option<&str>) -> StoreResult<Page<StoredFlow>> {
        let limit = limit.clamp(1, 1000);
        let after = cursor.map(parse_cursor).transpose()?;
        let rows: Vec<(String, i64, i32, String, i64)> = with_conn!(self, read, |conn| {
            let mut query = flows::table
                .inner_join(
                    flow_versions::table.on(flow_versions::flow_id
                        .eq(flows::id)
                        .and(flow_versions::version.eq(flows::latest_version))),
                )
                .select((
                    flows::id,
                    flows::updated_at,
                    flow_versions::version,
                    flow_versions::definition,
                    flow_versions::created_at,
                ))
                .order((flows::updated_at.desc(), flows::id.desc()))
                .limit(limit as i64 + 1)
                .into_boxed();
            if let Some((t, id)) = &after {
                query = query.filter(
                    flows::updated_at
                        .lt(*t)
                        .or(flows::updated_at.eq(*t).and(flows::id.lt(id.clone()))),
                );
            }
            query
                .load(conn)
                .await
                .map_err(|e| db_error("listing flows", e))?
        });
        let more = rows.len() > limit;
        let mut items = Vec::with_capacity(limit.min(rows.len()));
        let mut next_cursor = None;
        for (id, updated_at, version, definition, created_at) in rows.into_iter().take(limit) {
            next_cursor = Some(format!("{updated_at}:{id}"));
            items.push(stored(id, version, &definition, created_at)?);
        }
        Ok(Page {
            items,
            next_cursor: if more { next_cursor } else { None },
        })
    }

    async fn delete(&self, id: &str) -> StoreResult<()> {
        let deleted: usize = with_conn!(self, write, |conn| {
            let id = id.to_owned();
            conn.transaction(async move |conn| {
                diesel::delete(flow_versions::table.filter(flow_versions::flow_id.eq(&id)))
                    .execute(conn)
                    .await?;
                diesel::delete(flows::table.find(&id)).execute(conn).await
            })
            .await
            .map_err(|e| db_error("deleting a flow", e))?
        });
        super::found(deleted, "flow", id)
    }
}

/// Which version of a flow to read.
#[derive(Debug, Clone, Copy)]
enum Which {
    /// This one.
    Version(i32),
    /// The latest.
    Latest,
    /// The latest stored at or before this time (microseconds).
    AsOf(i64),
}

impl SqlStore {
    /// A version's number, definition and creation, if there is one.
    async fn version_row(&self, id: &str, which: Which) -> StoreResult<Option<(i32, String, i64)>> {
        Ok(with_conn!(self, read, |conn| {
            let query = flow_versions::table
                .inner_join(flows::table.on(flows::id.eq(flow_versions::flow_id)))
                .filter(flow_versions::flow_id.eq(id))
                .select((
                    flow_versions::version,
                    flow_versions::definition,
                    flow_versions::created_at,
                ))
                .into_boxed();
            let query = match which {
                Which::Version(v) => query.filter(flow_versions::version.eq(v)),
                Which::Latest => query.filter(flow_versions::version.eq(flows::latest_version)),
                Which::AsOf(at) => query
                    .filter(flow_versions::created_at.le(at))
                    .order(flow_versions::version.desc()),
            };
            query
                .first(conn)
                .await
                .optional()
                .map_err(|e| db_error("reading a flow", e))?
        }))
    }
}
