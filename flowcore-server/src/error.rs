//! The API's errors: one type, turned into `{"error": {"code", "message", "details"}}` in one
//! place. A 5xx hides its source and logs it.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flowcore::{CompileError, StoreError};
use serde_json::{Value, json};

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable snake_case code.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// Structured details (for `invalid_flow`, the problems).
    pub details: Option<Value>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
        }
    }
    /// 401 `unauthorized`.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required (Authorization: Bearer <key> or x-api-key)",
        )
    }
    /// 404 `not_found`.
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }
    /// 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound { .. } => {
                Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            StoreError::AlreadyExists(_) => {
                Self::new(StatusCode::CONFLICT, "already_exists", e.to_string())
            }
            StoreError::Conflict(_) | StoreError::StaleLease(_) => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StoreError::Invalid(_) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
            }
            StoreError::TooLarge(_) => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                e.to_string(),
            ),
            StoreError::Unavailable { .. } => {
                tracing::error!(error = ?e, "a backend is unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "a backend is unavailable; try again",
                )
            }
            _ => {
                tracing::error!(error = ?e, "internal error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl From<CompileError> for ApiError {
    fn from(e: CompileError) -> Self {
        let details = serde_json::to_value(&e.problems).unwrap_or(Value::Null);
        Self {
            details: Some(details),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_flow", e.to_string())
        }
    }
}

impl From<flowcore::Error> for ApiError {
    fn from(e: flowcore::Error) -> Self {
        match e {
            flowcore::Error::Parse(e) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string())
            }
            flowcore::Error::Compile(e) => e.into(),
            flowcore::Error::Store(e) => e.into(),
            other => {
                tracing::error!(error = ?other, "internal error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection as R;
        match &e {
            R::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ),
            R::BytesRejection(_) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is over MAX_PAYLOAD_SIZE_MB",
            ),
            _ => Self::new(StatusCode::BAD_REQUEST, "invalid_json", e.body_text()),
        }
    }
}

/// A JSON request body read as `T`: 400 `invalid_json` when it is malformed or does not fit
/// `T` (axum would answer 422 for the latter), 413/415 as [`From<JsonRejection>`] says.
///
/// [`From<JsonRejection>`]: ApiError#impl-From<JsonRejection>-for-ApiError
pub fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    let Json(value) = body?;
    serde_json::from_value(value)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(details) = self.details {
            error["details"] = details;
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}
