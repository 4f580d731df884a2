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

async fn create(
    State(state): State<Shared>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(value) = body?;
    let body: CreateBody = serde_json::from_value(value)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))?;
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

async fn list(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    let keys = ApiKeyStore::list_api_keys(&state.sql).await?;
    let items: Vec<Value> = keys
        .iter()
        .map(|k| json!({"id": k.id, "name": k.name, "prefix": k.prefix, "created_at": k.created_at, "revoked_at": k.revoked_at}))
        .collect();
    Ok(Json(json!({"items": items})))
}

async fn revoke(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    ApiKeyStore::revoke_api_key(&state.sql, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
