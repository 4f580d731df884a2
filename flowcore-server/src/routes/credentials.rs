//! `/api/v1/credentials`: create (validated, then encrypted), list and read (metadata only, never
//! the secret), delete.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use flowcore::ports::StoredCredential;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::credentials::validate;
use crate::error::{ApiError, ApiErrorBody, JsonBody};
use crate::state::Shared;

/// The credentials routes.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/credentials", get(list).post(create))
        .route("/credentials/{id}", get(read).delete(remove))
}

/// A credential to store.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCredential {
    /// Flows refer to it by this name.
    pub name: String,
    /// `bearer` (`token`), `basic_auth` (`username`, `password`) or `header` (`name`, `value`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The secret fields. (Kept as a value so that a type error in it is reported by
    /// `validate`, whose messages never quote the secret, as serde's would.)
    #[schema(value_type = Object)]
    pub data: Value,
    /// The only hosts (`host` or `host:port`) it is sent to; without it, only hosts written
    /// literally in a flow's URL.
    #[serde(default)]
    pub allowed_hosts: Option<Vec<String>>,
}

impl std::fmt::Debug for CreateCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateCredential")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("allowed_hosts", &self.allowed_hosts)
            .finish_non_exhaustive()
    }
}

/// What the API shows of a credential: never the secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CredentialView {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The hosts it is sent to.
    pub allowed_hosts: Option<Vec<String>>,
    /// The key that encrypted it.
    pub key_id: String,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// When it was last encrypted.
    pub updated_at: DateTime<Utc>,
}

impl From<StoredCredential> for CredentialView {
    fn from(c: StoredCredential) -> Self {
        Self {
            id: c.id,
            name: c.name,
            kind: c.kind,
            allowed_hosts: c.allowed_hosts,
            key_id: c.key_id,
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }
}

/// The credentials (metadata only).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CredentialList {
    /// Every credential.
    pub items: Vec<CredentialView>,
}

/// Stores a credential, encrypted.
#[utoipa::path(post, path = "/api/v1/credentials", operation_id = "create_credential", tag = "credentials", request_body = CreateCredential, responses((status = 201, description = "its metadata (never the secret)", body = CredentialView), (status = 400, description = "invalid_credential", body = ApiErrorBody), (status = 409, description = "the name exists", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn create(
    State(state): State<Shared>,
    JsonBody(body): JsonBody<CreateCredential>,
) -> Result<(StatusCode, Json<CredentialView>), ApiError> {
    if !flowcore::model::is_valid_id(&body.name) {
        return Err(ApiError::bad_request(
            "name must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -",
        ));
    }
    validate(&body.kind, &body.data)
        .and_then(|()| {
            body.allowed_hosts
                .as_deref()
                .map_or(Ok(()), crate::credentials::validate_hosts)
        })
        .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "invalid_credential", m))?;
    let hosts = body
        .allowed_hosts
        .map(|hosts| hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect());
    let stored = state
        .credentials
        .create(&body.name, &body.kind, &body.data, hosts)
        .await?;
    Ok((StatusCode::CREATED, Json(stored.into())))
}

/// Lists credentials (metadata only).
#[utoipa::path(get, path = "/api/v1/credentials", operation_id = "list_credentials", tag = "credentials", responses((status = 200, description = "the credentials", body = CredentialList), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn list(State(state): State<Shared>) -> Result<Json<CredentialList>, ApiError> {
    let stored = state.stores.credentials.list_credentials().await?;
    let items = stored.into_iter().map(CredentialView::from).collect();
    Ok(Json(CredentialList { items }))
}

/// Reads a credential's metadata (by id or name).
#[utoipa::path(get, path = "/api/v1/credentials/{id}", operation_id = "read_credential", tag = "credentials", params(("id" = String, Path, description = "its id")), responses((status = 200, description = "its metadata", body = CredentialView), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn read(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<CredentialView>, ApiError> {
    let stored = state.stores.credentials.get_credential(&id).await?;
    Ok(Json(stored.into()))
}

/// Deletes a credential.
#[utoipa::path(delete, path = "/api/v1/credentials/{id}", operation_id = "delete_credential", tag = "credentials", params(("id" = String, Path, description = "its id")), responses((status = 204, description = "deleted"), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn remove(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let credentials = &state.stores.credentials;
    let credential = credentials.get_credential(&id).await?;
    credentials.delete_credential(&credential.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
