//! `/api/v1/flows`: create, list, read, new version, delete.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use flowcore::model::is_valid_id;
use flowcore::ports::StoredFlow;
use flowcore::secret::SecretSource;
use flowcore::{FlowDef, Trigger};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiErrorBody, JsonText, off_runtime};
use crate::routes::Page;
use crate::state::Shared;

/// A flow version was stored.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FlowCreated {
    /// The flow's id.
    pub id: String,
    /// The version stored.
    pub version: u32,
}

impl From<&StoredFlow> for FlowCreated {
    fn from(f: &StoredFlow) -> Self {
        Self {
            id: f.id.clone(),
            version: f.version,
        }
    }
}

/// A flow in a list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FlowSummary {
    /// Its id.
    pub id: String,
    /// Its latest version.
    pub version: u32,
    /// Its name.
    pub name: Option<String>,
    /// When this version was stored.
    pub created_at: DateTime<Utc>,
}

/// A version of a flow.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FlowView {
    /// Its id.
    pub id: String,
    /// The version.
    pub version: u32,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// The flow document.
    #[schema(value_type = Object)]
    pub definition: FlowDef,
}

/// The flows routes.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/flows", get(list).post(create))
        .route("/flows/{id}", get(read).put(update).delete(delete))
}

/// A flow from a request's JSON, with its text: 400 `invalid_flow` listing every problem of its
/// shape (each node, edge and trigger read on its own), placed in the text (line and column),
/// as the compiler lists every problem of its meaning. A body that is not JSON at all is
/// `invalid_json` (the extractor).
async fn parse_flow(JsonText(text, value): JsonText) -> Result<(FlowDef, Bytes), ApiError> {
    off_runtime(text.len(), move || match FlowDef::from_value_all(value) {
        Ok(flow) => Ok((flow, text)),
        Err(e) => Err(e.locate(&text).into()),
    })
    .await
}

/// Checks a flow before it is stored: it compiles (on the blocking pool: a large flow is CPU
/// work that must not hold up the runtime's threads; its problems placed in `text`), the
/// credentials its webhooks check exist, and no other flow has one of its webhook paths (409).
async fn check(state: &Shared, flow: FlowDef, text: Bytes) -> Result<FlowDef, ApiError> {
    let engine = state.engine.clone();
    let flow = tokio::task::spawn_blocking(move || {
        engine
            .compile(&flow)
            .map(|_| flow)
            .map_err(|e| e.locate(&text))
    })
    .await
    .map_err(|e| flowcore::StoreError::backend("compiling a flow", e))??;
    let mut problems = Vec::new();
    for trigger in &flow.triggers {
        if let Trigger::Webhook {
            auth: Some(auth), ..
        } = trigger
            && let Err(flowcore::secret::SecretError::NotFound(name)) =
                state.credentials.secret(auth.credential()).await
        {
            problems.push(flowcore::Problem::flow(format!(
                "webhook auth: credential `{name}` does not exist"
            )));
        }
    }
    if !problems.is_empty() {
        return Err(flowcore::CompileError::capped(problems, 0).into());
    }
    state
        .webhooks
        .check_free(state.stores.flows.as_ref(), &flow)
        .await?;
    Ok(flow)
}

/// Announces a flow's change to every process (their compiled plans and webhook indexes), and
/// forgets this process's webhook index at once: the announcement reaches it a moment later,
/// and a webhook called right after the answer must find the flow.
async fn changed(state: &Shared, id: &str) -> Result<(), ApiError> {
    // First, whatever the announcement does: a failed publish must not leave this process
    // serving the flow's old webhooks (an `auth` just added, say).
    state.webhooks.invalidate();
    state.plans.changed(id).await?;
    Ok(())
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "the flow id is not 1 to 64 of A-Z a-z 0-9 _ -",
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateQuery {
    #[serde(default)]
    dry_run: bool,
}

/// The answer of a dry run: the flow would be stored.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FlowChecked {
    /// Always true (a flow with problems answers 400 `invalid_flow`, as a create does).
    pub valid: bool,
}

/// Creates a flow; with `?dry_run=true`, only checks it as a create or an update checks it
/// (not whether its id is taken: the console's editor checks new flows and new versions as
/// you type) and answers 200 `{"valid": true}` or the same error; nothing is stored.
#[utoipa::path(post, path = "/api/v1/flows", operation_id = "create_flow", tag = "flows", params(("dry_run" = Option<bool>, Query, description = "check only, as a create or an update checks (not whether the id is taken): 200 `{\"valid\": true}`, or the same error; nothing is stored")), request_body(content = Object, description = "a flow definition (docs/flows.md)"), responses((status = 201, description = "created", body = FlowCreated), (status = 200, description = "dry run: it would be created", body = FlowChecked), (status = 400, description = "invalid_flow: every problem in details, or invalid_json", body = ApiErrorBody), (status = 409, description = "the id exists", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn create(
    State(state): State<Shared>,
    Query(q): Query<CreateQuery>,
    body: JsonText,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let (mut flow, text) = parse_flow(body).await?;
    if q.dry_run {
        check(&state, flow, text).await?;
        return Ok(Json(FlowChecked { valid: true }).into_response());
    }
    let id = flow.id.get_or_insert_with(flowcore::ids::new_id).clone();
    let flow = check(&state, flow, text).await?;
    let stored = state.stores.flows.create(&flow).await?;
    changed(&state, &id).await?;
    Ok((StatusCode::CREATED, Json(FlowCreated::from(&stored))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// Lists flows.
#[utoipa::path(get, path = "/api/v1/flows", operation_id = "list_flows", tag = "flows", params(("limit" = Option<u32>, Query, description = "page size"), ("cursor" = Option<String>, Query, description = "from the previous page")), responses((status = 200, description = "a page of flows", body = Page<FlowSummary>), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn list(
    State(state): State<Shared>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Page<FlowSummary>>, ApiError> {
    let page = state
        .stores
        .flows
        .list(q.limit.unwrap_or(50), q.cursor.as_deref())
        .await?;
    Ok(Json(Page::of(page, |f| FlowSummary {
        id: f.id,
        version: f.version,
        name: f.definition.name,
        created_at: f.created_at,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadQuery {
    version: Option<u32>,
}

/// Reads a flow (latest version).
#[utoipa::path(get, path = "/api/v1/flows/{id}", operation_id = "read_flow", tag = "flows", params(("id" = String, Path, description = "its id"), ("version" = Option<u32>, Query, description = "a version (default: the latest)")), responses((status = 200, description = "the flow", body = FlowView), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn read(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<FlowView>, ApiError> {
    check_id(&id)?;
    let f = state.stores.flows.get(&id, q.version).await?;
    Ok(Json(FlowView {
        id: f.id,
        version: f.version,
        created_at: f.created_at,
        definition: f.definition,
    }))
}

/// Stores a new version of a flow.
#[utoipa::path(put, path = "/api/v1/flows/{id}", operation_id = "update_flow", tag = "flows", params(("id" = String, Path, description = "its id")), request_body(content = Object, description = "a flow definition"), responses((status = 200, description = "the new version", body = FlowCreated), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn update(
    State(state): State<Shared>,
    Path(id): Path<String>,
    body: JsonText,
) -> Result<Json<FlowCreated>, ApiError> {
    check_id(&id)?;
    let (mut flow, text) = parse_flow(body).await?;
    if flow.id.as_deref().is_some_and(|body_id| body_id != id) {
        return Err(ApiError::bad_request(
            "the body's id differs from the path's",
        ));
    }
    flow.id = Some(id.clone());
    let flow = check(&state, flow, text).await?;
    let stored = state.stores.flows.update(&id, &flow).await?;
    changed(&state, &id).await?;
    Ok(Json((&stored).into()))
}

/// Deletes a flow.
#[utoipa::path(delete, path = "/api/v1/flows/{id}", operation_id = "delete_flow", tag = "flows", params(("id" = String, Path, description = "its id")), responses((status = 204, description = "deleted"), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn delete(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    state.stores.flows.delete(&id).await?;
    changed(&state, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
