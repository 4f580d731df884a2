//! The webhook route: `/webhooks/{path}` starts the flow whose trigger has that path and
//! method.

use std::time::Duration;

use axum::extract::{FromRequest, Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::any;
use axum::{Json, Router};
use flowcore::{WebhookAuth, WebhookMode};
use serde_json::{Value, json};

use crate::error::{ApiError, ApiErrorBody};
use crate::hooks::authenticate;
use crate::lifecycle::{self, RunAnswer, Start};
use crate::routes::runs::answered;
use crate::state::Shared;

/// The webhook routes.
pub fn router() -> Router<Shared> {
    Router::new().route("/webhooks/{*path}", any(call))
}

/// Runs the flow whose webhook trigger has this path and method (any method; the body is the input).
#[utoipa::path(post, path = "/webhooks/{path}", operation_id = "webhook", tag = "webhooks", params(("path" = String, Path, description = "the trigger's path")), request_body(content = Object, description = "the run's input"), responses((status = 200, description = "sync mode: the finished run", body = RunAnswer), (status = 202, description = "async mode, or past the wait", body = RunAnswer), (status = 404, description = "no flow has this webhook", body = ApiErrorBody)))]
pub(crate) async fn call(
    State(state): State<Shared>,
    method: Method,
    Path(path): Path<String>,
    headers: HeaderMap,
    request: axum::extract::Request,
) -> Result<(StatusCode, Json<RunAnswer>), ApiError> {
    // The hook first: an unknown path, or a caller without the token, costs no body read.
    let Some(hook) = state
        .webhooks
        .lookup(state.stores.flows.as_ref(), method.as_str(), &path)
        .await?
    else {
        return Err(ApiError::not_found(format!(
            "no flow has a {method} webhook at `{path}`"
        )));
    };
    if let Some(auth @ WebhookAuth::Header { .. }) = &hook.auth {
        authenticate(&state.credentials, auth, &headers, &[]).await?;
    }
    // A deadline for the whole body (the router's timeout is between its pieces): a stranger
    // sending a byte a minute must not hold a connection for ever.
    let deadline = Duration::from_secs(state.config.idle_timeout_seconds);
    let body = tokio::time::timeout(deadline, axum::body::Bytes::from_request(request, &()))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the body took more than {} s", deadline.as_secs()),
            )
        })??;
    if let Some(auth @ WebhookAuth::HmacSha256 { .. }) = &hook.auth {
        authenticate(&state.credentials, auth, &headers, &body).await?;
    }
    let input = if body.is_empty() {
        Value::Object(serde_json::Map::new())
    } else {
        let content_type = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        if content_type.is_none_or(crate::error::is_json) {
            crate::error::parse_json(body).await?
        } else {
            let text = std::str::from_utf8(&body).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "the body is neither JSON nor UTF-8 text",
                )
            })?;
            json!({ "body": text })
        }
    };
    let start = Start {
        flow_id: hook.flow_id.clone(),
        input,
        wait: hook.mode == WebhookMode::Sync,
        idempotency_key: None,
        trigger: Some(crate::hooks::trigger(&hook, &method, &path, &headers)),
    };
    Ok(answered(lifecycle::start(&state, start).await?))
}
