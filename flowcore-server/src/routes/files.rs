//! `/api/v1/files`: uploads streamed into the blob store (the body is the file; `?name=` and
//! `Content-Type` describe it), refused with 413 past MAX_FILE_SIZE_MB while streaming; reads and
//! deletes by id. The metadata is in the database, the bytes in the blob store.

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use flowcore::StoreError;
use flowcore::ports::FileRecord;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiErrorBody};
use crate::state::Shared;

/// The files routes. They carry their own size limit (MAX_FILE_SIZE_MB), not the payload one.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/files", post(upload))
        .route("/files/{id}", get(download).delete(remove))
        .route("/files/{id}/meta", get(meta))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UploadQuery {
    #[serde(default)]
    name: Option<String>,
}

/// A file's metadata.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FileView {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The `Content-Type` given at upload.
    pub content_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was uploaded.
    pub created_at: DateTime<Utc>,
}

impl From<FileRecord> for FileView {
    fn from(f: FileRecord) -> Self {
        Self {
            id: f.id,
            name: f.name,
            content_type: f.content_type,
            size: f.size,
            created_at: f.created_at,
        }
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the file is over MAX_FILE_SIZE_MB ({limit} bytes)"),
    )
}

/// Uploads a file (the body is the file).
#[utoipa::path(post, path = "/api/v1/files", operation_id = "upload_file", tag = "files", params(("name" = Option<String>, Query, description = "its name")), request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the bytes; Content-Type is kept"), responses((status = 201, description = "its metadata", body = FileView), (status = 413, description = "over MAX_FILE_SIZE_MB", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn upload(
    State(state): State<Shared>,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Result<(StatusCode, Json<FileView>), ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let name = query.name.unwrap_or_else(|| "upload".to_owned());
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "name must be 1 to 255 characters without control characters",
        ));
    }
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned();
    let limit = state.config.max_file_mb.saturating_mul(1024 * 1024);
    // Refuse early when the client says how much is coming.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let id = flowcore::ids::new_id();
    let blob_key = format!("files/{id}");
    let chunks = request
        .into_body()
        .into_data_stream()
        .map(|chunk| {
            chunk
                .map(|bytes| bytes.to_vec())
                .map_err(|e| StoreError::Invalid(format!("reading the upload: {e}")))
        })
        .boxed();
    let blobs = &state.stores.blobs;
    let size = match blobs.put_stream(&blob_key, chunks, limit).await {
        Ok(size) => size,
        Err(StoreError::TooLarge(_)) => return Err(too_large(limit)),
        Err(e) => return Err(e.into()),
    };
    let file = FileRecord {
        id,
        name,
        content_type,
        size,
        blob_key,
        created_at: Utc::now(),
    };
    if let Err(e) = state.stores.files.insert_file(&file).await {
        let _ = blobs.delete(&file.blob_key).await;
        return Err(e.into());
    }
    Ok((StatusCode::CREATED, Json(file.into())))
}

/// Reads a file's metadata.
#[utoipa::path(get, path = "/api/v1/files/{id}/meta", operation_id = "file_meta", tag = "files", params(("id" = String, Path, description = "its id")), responses((status = 200, description = "its metadata", body = FileView), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn meta(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<FileView>, ApiError> {
    Ok(Json(state.stores.files.get_file(&id).await?.into()))
}

/// Downloads a file.
#[utoipa::path(get, path = "/api/v1/files/{id}", operation_id = "download_file", tag = "files", params(("id" = String, Path, description = "its id")), responses((status = 200, description = "the bytes, with the Content-Type given at upload", content_type = "application/octet-stream", body = Vec<u8>), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn download(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let file = state.stores.files.get_file(&id).await?;
    // Streamed: forty slow downloads of a large file must not hold forty copies in memory.
    let chunks = state.stores.blobs.get_stream(&file.blob_key).await?;
    // The name is metadata from a client: only safe characters go into the header.
    let safe: String = file
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok((
        [
            (header::CONTENT_TYPE, file.content_type.clone()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{safe}\""),
            ),
            (header::CONTENT_LENGTH, file.size.to_string()),
            // The type is the uploader's word: browsers must not guess another from the bytes.
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}

/// Deletes a file.
#[utoipa::path(delete, path = "/api/v1/files/{id}", operation_id = "delete_file", tag = "files", params(("id" = String, Path, description = "its id")), responses((status = 204, description = "deleted"), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn remove(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let file = state.stores.files.get_file(&id).await?;
    state.stores.files.delete_file(&file.id).await?;
    state.stores.blobs.delete(&file.blob_key).await?;
    Ok(StatusCode::NO_CONTENT)
}
