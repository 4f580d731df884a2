//! `ANY /webhooks/{path}`: runs the flow whose webhook trigger has that path; the body is the
//! input; sync mode answers like a waited run, async mode with the run id.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::any;
use axum::{Json, Router};
use flowcore::ports::{FlowChanges, FlowStore};
use flowcore::{Trigger, WebhookMode};
use serde_json::Value;

use crate::app::Shared;
use crate::error::ApiError;
#[allow(unused_imports)]
use crate::openapi::*;

/// Webhook paths to flows, rebuilt from the flow store after any flow changes (in any process).
#[derive(Debug, Default)]
pub struct WebhookIndex {
    map: RwLock<Option<(std::time::Instant, Routes)>>,
}

type Routes = Arc<HashMap<(String, String), (String, WebhookMode)>>;

impl WebhookIndex {
    /// An index that marks itself stale on every announced flow change.
    pub fn new(changes: &Arc<dyn FlowChanges>) -> Arc<Self> {
        let index = Arc::new(Self::default());
        let mut rx = changes.subscribe();
        let weak = Arc::downgrade(&index);
        tokio::spawn(async move {
            loop {
                let closed = matches!(
                    rx.recv().await,
                    Err(tokio::sync::broadcast::error::RecvError::Closed)
                );
                let Some(index) = weak.upgrade() else { return };
                index.invalidate();
                if closed {
                    return;
                }
            }
        });
        index
    }

    /// Forgets the index; the next lookup rebuilds it.
    pub fn invalidate(&self) {
        *self
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    async fn lookup(
        &self,
        flows: &dyn FlowStore,
        method: &str,
        path: &str,
    ) -> Result<Option<(String, WebhookMode)>, ApiError> {
        let key = (method.to_owned(), path.to_owned());
        let current = self
            .map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match current {
            Some((_, map)) if map.contains_key(&key) => return Ok(map.get(&key).cloned()),
            // A miss on an index older than a second may be a flow created a moment ago whose
            // announcement has not arrived: look again (at most once a second, so unknown paths
            // cannot make us rebuild on every request).
            Some((built, _)) if built.elapsed() < std::time::Duration::from_secs(1) => {
                return Ok(None);
            }
            _ => {}
        }
        let mut map = HashMap::new();
        for flow in flowcore::ports::all_flows(flows).await? {
            for trigger in &flow.definition.triggers {
                if let Trigger::Webhook { path, method, mode } = trigger {
                    map.insert(
                        (method.to_ascii_uppercase(), path.clone()),
                        (flow.id.clone(), *mode),
                    );
                }
            }
        }
        let found = map.get(&key).cloned();
        *self
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((std::time::Instant::now(), Arc::new(map)));
        Ok(found)
    }
}

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
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some((flow_id, mode)) = state
        .webhooks
        .lookup(&state.sql, method.as_str(), &path)
        .await?
    else {
        return Err(ApiError::not_found(format!(
            "no flow has a {method} webhook at `{path}`"
        )));
    };
    let body = body?;
    let input = if body.is_empty() {
        Value::Object(serde_json::Map::new())
    } else {
        let content_type = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        if content_type.is_none_or(crate::error::is_json) {
            flowcore::json::parse(&body).map_err(crate::error::invalid_json)?
        } else {
            let text = std::str::from_utf8(&body).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "the body is neither JSON nor UTF-8 text",
                )
            })?;
            serde_json::json!({ "body": text })
        }
    };
    crate::routes::runs::start_run(&state, &flow_id, input, mode == WebhookMode::Sync, None).await
}
