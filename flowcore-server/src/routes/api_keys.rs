//! `/api/v1/api-keys`: create (the key is shown once), list (never the key or its hash), revoke.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use flowcore::ports::ApiKeyStore;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::Shared;
use crate::error::ApiError;
#[allow(unused_imports)]
use crate::openapi::*;

/// The API keys routes.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/api-keys", get(list).post(create))
        .route("/api-keys/{id}", delete(revoke))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
}

/// Creates an API key (shown once).
#[utoipa::path(post, path = "/api/v1/api-keys", operation_id = "create_api_key", tag = "api_keys", request_body = CreateApiKey, responses((status = 201, description = "the key, shown this once", body = Object), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn create(
    State(state): State<Shared>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body: CreateBody = crate::error::json_body(body)?;
    if body.name.trim().is_empty() || body.name.len() > 200 {
        return Err(ApiError::bad_request("name must be 1 to 200 characters"));
    }
    let (record, key) = crate::auth::generate(&body.name)?;
    ApiKeyStore::insert_api_key(&state.sql, &record).await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"id": record.id, "name": record.name, "prefix": record.prefix, "key": key, "created_at": record.created_at}),
        ),
    ))
}

/// Lists API keys (never the key or its hash).
#[utoipa::path(get, path = "/api/v1/api-keys", operation_id = "list_api_keys", tag = "api_keys", responses((status = 200, description = "the keys", body = Object), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn list(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    let keys = ApiKeyStore::list_api_keys(&state.sql).await?;
    let items: Vec<Value> = keys
        .iter()
        .map(|k| json!({"id": k.id, "name": k.name, "prefix": k.prefix, "created_at": k.created_at, "revoked_at": k.revoked_at}))
        .collect();
    Ok(Json(json!({"items": items})))
}

/// Revokes an API key.
#[utoipa::path(delete, path = "/api/v1/api-keys/{id}", operation_id = "revoke_api_key", tag = "api_keys", params(("id" = String, Path, description = "its id")), responses((status = 204, description = "revoked"), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn revoke(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    ApiKeyStore::revoke_api_key(&state.sql, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
