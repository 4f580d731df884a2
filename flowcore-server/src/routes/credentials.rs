//! `/api/v1/credentials`: create (validated, then encrypted), list and read (metadata only, never
//! the secret), delete.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use flowcore::ports::CredentialStore;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::Shared;
use crate::credentials::{public, validate};
use crate::error::ApiError;
#[allow(unused_imports)]
use crate::openapi::*;

/// The credentials routes.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/credentials", get(list).post(create))
        .route("/credentials/{id}", get(read).delete(remove))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    // Kept as a value so that a type error in it is reported by `validate`, whose messages never
    // quote the secret (serde's would).
    data: Value,
    #[serde(default)]
    allowed_hosts: Option<Vec<String>>,
}

/// Stores a credential, encrypted.
#[utoipa::path(post, path = "/api/v1/credentials", operation_id = "create_credential", tag = "credentials", request_body = CreateCredential, responses((status = 201, description = "its metadata (never the secret)", body = CredentialView), (status = 400, description = "invalid_credential", body = ApiErrorBody), (status = 409, description = "the name exists", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn create(
    State(state): State<Shared>,
    crate::error::JsonBody(body): crate::error::JsonBody<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    Ok((StatusCode::CREATED, Json(public(&stored))))
}

/// Lists credentials (metadata only).
#[utoipa::path(get, path = "/api/v1/credentials", operation_id = "list_credentials", tag = "credentials", responses((status = 200, description = "the credentials", body = Object), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn list(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    let items: Vec<Value> = state
        .sql
        .list_credentials()
        .await?
        .iter()
        .map(public)
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// Reads a credential's metadata (by id or name).
#[utoipa::path(get, path = "/api/v1/credentials/{id}", operation_id = "read_credential", tag = "credentials", params(("id" = String, Path, description = "its id")), responses((status = 200, description = "its metadata", body = CredentialView), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn read(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(public(&state.sql.get_credential(&id).await?)))
}

/// Deletes a credential.
#[utoipa::path(delete, path = "/api/v1/credentials/{id}", operation_id = "delete_credential", tag = "credentials", params(("id" = String, Path, description = "its id")), responses((status = 204, description = "deleted"), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn remove(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let credential = state.sql.get_credential(&id).await?;
    state.sql.delete_credential(&credential.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
