//! The API's errors: one type, turned into `{"error": {"code", "message", "details"}}` in one
//! place. A 5xx hides its source and logs it.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flowcore::{CompileError, StoreError};
use serde_json::Value;

/// The body of every error answer: `{"error": {"code", "message", "details"}}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ApiErrorBody {
    /// What went wrong.
    pub error: ApiErrorDetail,
}

/// What went wrong.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ApiErrorDetail {
    /// A stable snake_case code (`invalid_json`, `not_found`, `unauthorized`, ...).
    pub code: &'static str,
    /// For people.
    pub message: String,
    /// Structured details (for `invalid_flow`: `[{"node", "edge", "problem"}]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u32>,
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable snake_case code.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// Structured details (for `invalid_flow`, the problems).
    pub details: Option<Box<Value>>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }
    /// The same error with a `Retry-After` header.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(u32::try_from(seconds).unwrap_or(u32::MAX));
        self
    }
    /// 401 `unauthorized`.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required (Authorization: Bearer <key> or x-api-key): the \
             server's FLOWCORE_ADMIN_KEY, or a key made by `flowcore api-key create` or \
             POST /api/v1/api-keys",
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
    /// The store's own code (`StoreError::code`), with the status that goes with it; a 5xx
    /// hides its cause from the caller and logs it.
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::AlreadyExists(_) | StoreError::Conflict(_) | StoreError::StaleLease(_) => {
                StatusCode::CONFLICT
            }
            StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
            StoreError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            StoreError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                tracing::error!(error = ?e, "a backend is unavailable");
                "a backend is unavailable; try again".to_owned()
            }
            s if s.is_server_error() => {
                tracing::error!(error = ?e, "internal error");
                "internal error".to_owned()
            }
            _ => e.to_string(),
        };
        Self::new(status, e.code(), message)
    }
}

impl From<CompileError> for ApiError {
    fn from(e: CompileError) -> Self {
        let details = serde_json::to_value(&e.problems).unwrap_or(Value::Null);
        Self {
            details: Some(Box::new(details)),
            ..Self::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
        }
    }
}

impl From<flowcore::Error> for ApiError {
    fn from(e: flowcore::Error) -> Self {
        match e {
            flowcore::Error::Parse(e) => {
                Self::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
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

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(e: axum::extract::rejection::BytesRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is over MAX_PAYLOAD_SIZE_MB",
            )
        } else {
            Self::bad_request(format!(
                "the request body could not be read: {}",
                e.body_text()
            ))
        }
    }
}

/// 400 `invalid_json`.
pub fn invalid_json(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string())
}

/// A request body read through [`flowcore::json::parse`] (400 `invalid_json`); a large one on
/// the blocking pool, since parsing megabytes takes milliseconds of a runtime thread.
pub async fn parse_json(bytes: Bytes) -> Result<Value, ApiError> {
    let len = bytes.len();
    off_runtime(len, move || {
        flowcore::json::parse(&bytes).map_err(invalid_json)
    })
    .await
}

/// `work` over a request body of `len` bytes: on the blocking pool past 256 KiB (work linear in
/// megabytes takes milliseconds of a runtime thread), else here.
pub async fn off_runtime<T: Send + 'static>(
    len: usize,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    if len > 256 * 1024 {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| flowcore::StoreError::backend("reading a request body", e))?
    } else {
        work()
    }
}

/// Whether a `Content-Type` names JSON (`application/json`, or any `+json` type).
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.len() > 5 && essence[essence.len() - 5..].eq_ignore_ascii_case("+json")
}

/// A JSON request body read as `T`, through [`flowcore::json::parse`]: 400 `invalid_json` when
/// it is malformed, nests deeper than [`flowcore::json::MAX_DEPTH`], repeats a key or does not
/// fit `T` (axum's `Json` takes any depth serde_json reads, keeps the last of repeated keys and
/// answers 422 for the last case); 415 without a JSON `Content-Type`; 413 past the body limit.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let JsonText(_, value) = JsonText::from_request(request, state).await?;
        serde_json::from_value(value)
            .map(JsonBody)
            .map_err(invalid_json)
    }
}

/// A JSON request body as [`JsonBody`] reads it, with its text: for a document whose problems
/// are found in the value and placed in the text (a flow's, with line and column).
#[derive(Debug)]
pub struct JsonText(pub Bytes, pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonText {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = request
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !is_json(content_type) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(request, state).await?;
        let value = parse_json(bytes.clone()).await?;
        Ok(Self(bytes, value))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = ApiErrorDetail {
            code: self.code,
            message: self.message,
            details: self.details.map(|d| *d),
        };
        let mut response = (self.status, Json(ApiErrorBody { error })).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// The JSON shape for every error answer, whoever made it: axum's extractors (a bad path or
/// query), tower-http's body limit and timeouts answer in plain text. An error answer that is
/// not JSON is rewritten here, once, at the edge of the router; its text becomes the message.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let kind = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    // JSON as it is; a page for a person (a resume link's) too.
    let as_it_is = kind.is_some_and(|k| is_json(k) || k.starts_with("text/html"));
    if !(status.is_client_error() || status.is_server_error()) || as_it_is {
        return response;
    }
    let (parts, body) = response.into_parts();
    // Such answers are a line of text; anything longer is cut, not buffered.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let message = match String::from_utf8_lossy(&text).trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        text if status.is_server_error() => {
            tracing::error!(%status, body = text, "an error answer from a layer");
            status.canonical_reason().unwrap_or("error").to_owned()
        }
        text => text.to_owned(),
    };
    let mut answer = ApiError::new(status, code, message).into_response();
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            answer.headers_mut().insert(name, value.clone());
        }
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_has_the_same_code_over_http_as_in_the_library() {
        let io = || std::io::Error::other("down");
        for e in [
            StoreError::not_found("run", "r1"),
            StoreError::AlreadyExists("x".into()),
            StoreError::Conflict("x".into()),
            StoreError::StaleLease("x".into()),
            StoreError::Invalid("x".into()),
            StoreError::TooLarge("x".into()),
            StoreError::unavailable("x", io()),
            StoreError::backend("x", io()),
        ] {
            let code = e.code();
            let answer = ApiError::from(e);
            assert_eq!(answer.code, code);
            assert!(answer.status.is_client_error() || answer.status.is_server_error());
        }
        let stale = ApiError::from(StoreError::StaleLease("epoch 2".into()));
        assert_eq!(
            (stale.status, stale.code),
            (StatusCode::CONFLICT, "stale_lease")
        );
        let hidden = ApiError::from(StoreError::backend("a secret cause", io()));
        assert!(!hidden.message.contains("secret"), "a 5xx hides its cause");
    }
}
