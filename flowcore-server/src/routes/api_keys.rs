//! `/api/v1/api-keys`: create (the key is shown once), list (never the key or its hash), revoke.
//! A key grants only scopes it has, and revoking a key revokes the keys it made.

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use flowcore::ports::{ApiKeyRecord, Scopes};
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::error::{ApiError, ApiErrorBody, JsonBody};
use crate::state::Shared;

/// The API keys routes.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/api-keys", get(list).post(create))
        .route("/api-keys/{id}", delete(revoke))
}

/// A new API key.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// A human name.
    pub name: String,
    /// Of `read`, `run`, `write`, `admin`; default: the scopes of the key making it (a key
    /// grants only scopes it has).
    #[serde(default)]
    #[schema(value_type = Option<Vec<String>>)]
    pub scopes: Option<Scopes>,
}

/// An API key as listed: never the key or its hash.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiKeyView {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The key's first characters.
    pub prefix: String,
    /// What it may do.
    #[schema(value_type = Vec<String>)]
    pub scopes: Scopes,
    /// The key that made it.
    pub parent_id: Option<String>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it was revoked.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRecord> for ApiKeyView {
    fn from(k: ApiKeyRecord) -> Self {
        Self {
            id: k.id,
            name: k.name,
            prefix: k.prefix,
            scopes: k.scopes,
            parent_id: k.parent_id,
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// A key just made: the only answer that holds the key (`Debug` leaves it out).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ApiKeyCreated {
    /// The key as listed.
    #[serde(flatten)]
    pub view: ApiKeyView,
    /// The key, shown this once.
    pub key: String,
}

impl std::fmt::Debug for ApiKeyCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyCreated")
            .field("view", &self.view)
            .finish_non_exhaustive()
    }
}

/// The API keys.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiKeyList {
    /// Every key, revoked ones too.
    pub items: Vec<ApiKeyView>,
}

/// Creates an API key (shown once).
#[utoipa::path(post, path = "/api/v1/api-keys", operation_id = "create_api_key", tag = "api_keys", request_body = CreateApiKey, responses((status = 201, description = "the key, shown this once", body = ApiKeyCreated), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn create(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<CreateApiKey>,
) -> Result<(StatusCode, Json<ApiKeyCreated>), ApiError> {
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
    let keys = &state.stores.api_keys;
    keys.insert_api_key(&record).await?;
    // The maker may have been revoked while this request ran: its revocation took the keys it
    // had made then, so a key made after it goes now (read after the insert, so that one of
    // the two always sees the other).
    if let Some(parent) = &record.parent_id {
        let listed = keys.list_api_keys().await?;
        if listed
            .iter()
            .any(|k| &k.id == parent && k.revoked_at.is_some())
        {
            keys.revoke_api_key(&record.id).await?;
            return Err(ApiError::unauthorized());
        }
    }
    let created = ApiKeyCreated {
        view: record.into(),
        key,
    };
    Ok((StatusCode::CREATED, Json(created)))
}

/// Lists API keys (never the key or its hash).
#[utoipa::path(get, path = "/api/v1/api-keys", operation_id = "list_api_keys", tag = "api_keys", responses((status = 200, description = "the keys", body = ApiKeyList), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn list(State(state): State<Shared>) -> Result<Json<ApiKeyList>, ApiError> {
    let keys = state.stores.api_keys.list_api_keys().await?;
    let items = keys.into_iter().map(ApiKeyView::from).collect();
    Ok(Json(ApiKeyList { items }))
}

/// Revokes an API key.
#[utoipa::path(delete, path = "/api/v1/api-keys/{id}", operation_id = "revoke_api_key", tag = "api_keys", params(("id" = String, Path, description = "its id")), responses((status = 204, description = "revoked"), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn revoke(
    State(state): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let keys = state.stores.api_keys.list_api_keys().await?;
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
    state.stores.api_keys.revoke_api_key(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
