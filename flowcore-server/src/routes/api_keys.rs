//! `/api/v1/api-keys`: create (the key is shown once), list (never the key or its hash), revoke.
//! A key grants only scopes it has, and revoking a key revokes the keys it made.

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use flowcore::ports::{ApiKeyStore, Scopes};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::Shared;
use crate::auth::Caller;
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
pub(crate) struct CreateBody {
    name: String,
    /// What the new key may do; default: what the key making it may do.
    #[serde(default)]
    scopes: Option<Scopes>,
}

/// Creates an API key (shown once).
#[utoipa::path(post, path = "/api/v1/api-keys", operation_id = "create_api_key", tag = "api_keys", request_body = CreateApiKey, responses((status = 201, description = "the key, shown this once", body = Object), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn create(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    crate::error::JsonBody(body): crate::error::JsonBody<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if body.name.trim().is_empty() || body.name.len() > 200 {
        return Err(ApiError::bad_request("name must be 1 to 200 characters"));
    }
    let scopes = body.scopes.unwrap_or(caller.scopes);
    if scopes == Scopes::default() {
        return Err(ApiError::bad_request("scopes must name at least one scope"));
    }
    if !scopes.is_subset(caller.scopes) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "a key grants only scopes it has: this one has `{}`",
                caller.scopes
            ),
        ));
    }
    let (record, key) = crate::auth::generate_with(&body.name, scopes, caller.parent_id())?;
    ApiKeyStore::insert_api_key(&state.sql, &record).await?;
    // The maker may have been revoked while this request ran: its revocation took the keys it
    // had made then, so a key made after it goes now (read after the insert, so that one of
    // the two always sees the other).
    if let Some(parent) = &record.parent_id {
        let keys = ApiKeyStore::list_api_keys(&state.sql).await?;
        if keys
            .iter()
            .any(|k| &k.id == parent && k.revoked_at.is_some())
        {
            ApiKeyStore::revoke_api_key(&state.sql, &record.id).await?;
            return Err(ApiError::unauthorized());
        }
    }
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"id": record.id, "name": record.name, "prefix": record.prefix, "key": key, "scopes": record.scopes, "parent_id": record.parent_id, "created_at": record.created_at}),
        ),
    ))
}

/// Lists API keys (never the key or its hash).
#[utoipa::path(get, path = "/api/v1/api-keys", operation_id = "list_api_keys", tag = "api_keys", responses((status = 200, description = "the keys", body = Object), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn list(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    let keys = ApiKeyStore::list_api_keys(&state.sql).await?;
    let items: Vec<Value> = keys
        .iter()
        .map(|k| json!({"id": k.id, "name": k.name, "prefix": k.prefix, "scopes": k.scopes, "parent_id": k.parent_id, "created_at": k.created_at, "revoked_at": k.revoked_at}))
        .collect();
    Ok(Json(json!({"items": items})))
}

/// Revokes an API key.
#[utoipa::path(delete, path = "/api/v1/api-keys/{id}", operation_id = "revoke_api_key", tag = "api_keys", params(("id" = String, Path, description = "its id")), responses((status = 204, description = "revoked"), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn revoke(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let keys = ApiKeyStore::list_api_keys(&state.sql).await?;
    if !keys.iter().any(|k| k.id == id) {
        return Err(ApiError::not_found(format!(
            "API key `{id}` does not exist"
        )));
    }
    if !crate::auth::may_revoke(&caller, &id, &keys) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a key may revoke itself and the keys it made, not the key that made it or others",
        ));
    }
    // The keys it made, and theirs, go with it.
    ApiKeyStore::revoke_api_key(&state.sql, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
