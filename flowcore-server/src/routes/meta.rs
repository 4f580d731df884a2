//! The process's own routes: liveness, readiness and metrics.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::state::Shared;

/// The process lives.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
}

/// Each backend's state: `ok` or `unavailable`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// The flow and run stores.
    pub database: &'static str,
    /// The queue.
    pub queue: &'static str,
    /// The blob store.
    pub blob_store: &'static str,
}

/// 200 while the process lives.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "meta", responses((status = 200, description = "the process lives", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// 200 when the database, the queue and the blob store answer; 503 with each one's state.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "meta", responses((status = 200, description = "every backend answers", body = Readiness), (status = 503, description = "each backend's state", body = Readiness)))]
pub async fn readyz(State(state): State<Shared>) -> (StatusCode, Json<Readiness>) {
    let stores = &state.stores;
    let database = stores.flows.list(1, None).await.is_ok();
    let queue = stores.queue.depth(&state.config.worker_group).await.is_ok();
    let blobs = stores.blobs.stat("readyz/probe").await.is_ok();
    let show = |ok: bool| if ok { "ok" } else { "unavailable" };
    let status = if database && queue && blobs {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        database: show(database),
        queue: show(queue),
        blob_store: show(blobs),
    };
    (status, Json(body))
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "meta", responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String)))]
pub async fn scrape(State(state): State<Shared>) -> Response {
    let group = state.config.worker_group.clone();
    let ready = state.stores.queue.depth(&group).await.ok().map(|d| d.ready);
    let body = state.metrics.render(ready.map(|r| (group.as_str(), r)));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
