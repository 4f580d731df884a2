//! The HTTP API: `fn app(state) -> Router`, so tests drive it without a socket.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderName;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flowcore::Engine;
use flowcore::cache::PlanCache;
use flowcore::ports::{BlobStore, FlowStore, Queue};
use flowcore_store::{OpendalBlobStore, SqlStore};
use serde_json::json;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::error::ApiError;
use crate::routes;

/// What every request handler shares.
pub struct AppState {
    /// The configuration.
    pub config: Config,
    /// Compiles and runs flows.
    pub engine: Engine,
    /// Flows, runs and the server's records.
    pub sql: SqlStore,
    /// The same store as the runs' store that durable execution takes (made once, not per run).
    pub run_store: Arc<dyn flowcore::ports::RunStore>,
    /// Compiled flows.
    pub plans: PlanCache,
    /// Runs waiting for a worker.
    pub queue: Arc<dyn Queue>,
    /// Files and large outputs.
    pub blobs: OpendalBlobStore,
    /// Run events, for waiting and streaming.
    pub events: Arc<dyn flowcore::ports::EventBus>,
    /// Where the runs executing here emit their events: one background publisher for the
    /// process, so that events of concurrent runs share round trips to the bus.
    pub event_sink: Arc<flowcore::ports::BusSink>,
    /// Runs executing in this process.
    pub running: crate::worker::Running,
    /// This process's name as a lease owner.
    pub worker_name: String,
    /// Webhook paths to flows.
    pub webhooks: Arc<crate::routes::webhooks::WebhookIndex>,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Flow changes from every process.
    pub flow_changes: Arc<dyn flowcore::ports::FlowChanges>,
    /// Cancel requests between processes.
    pub signals: Arc<dyn flowcore::ports::RunSignals>,
    /// Usage counters.
    pub usage: Arc<crate::usage::Usage>,
    /// Fired when this process shuts down and hands its unfinished runs back.
    pub hand_back: flowcore::CancellationToken,
    /// Encrypted credentials.
    pub credentials: crate::credentials::Credentials,
    /// Requests per client address and API key.
    pub limiter: Arc<dyn flowcore::ports::RateLimiter>,
    /// Execution slots and the queue bound.
    pub admission: crate::admission::Admission,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The header that carries a request's id (set when the client did not send one, and returned).
pub const REQUEST_ID: &str = "x-request-id";

/// Request ids: the same time-ordered ids as runs.
#[derive(Clone, Copy, Debug)]
struct MakeId;

impl MakeRequestId for MakeId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        axum::http::HeaderValue::from_str(&flowcore::ids::new_id())
            .ok()
            .map(RequestId::new)
    }
}

/// The shared state handlers get.
pub type Shared = Arc<AppState>;

/// The router of the whole API.
pub fn app(state: Shared) -> Router {
    let body_limit = usize::try_from(state.config.max_payload_mb.saturating_mul(1024 * 1024))
        .unwrap_or(usize::MAX);
    let limited = middleware::from_fn_with_state(state.clone(), crate::limits::rate_limit);
    let payload_limit = RequestBodyLimitLayer::new(body_limit);
    let api = routes::flows::router()
        .merge(routes::runs::router())
        .merge(routes::events::router())
        .merge(routes::api_keys::router())
        .merge(routes::credentials::router())
        .merge(routes::usage::router())
        .route("/openapi.json", get(crate::openapi::openapi_json))
        .layer(payload_limit)
        // Files carry their own limit (MAX_FILE_SIZE_MB), enforced while streaming.
        .merge(routes::files::router())
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key))
        .route_layer(limited.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::scrape))
        .nest("/api/v1", api)
        .merge(
            routes::webhooks::router()
                .route_layer(limited)
                .layer(payload_limit),
        )
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::map_response(crate::error::json_errors))
        // A request body that pauses longer than this fails (slow uploads hold a connection).
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            std::time::Duration::from_secs(state.config.idle_timeout_seconds),
        ))
        .layer(middleware::from_fn_with_state(state.clone(), crate::metrics::track))
        .layer(DefaultBodyLimit::disable())
        // Outermost: every request gets an id (kept when the client sent one), a span with it
        // for every log line, and the id back in the answer.
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default();
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
        }))
        .layer(PropagateRequestIdLayer::new(HeaderName::from_static(REQUEST_ID)))
        .layer(SetRequestIdLayer::new(HeaderName::from_static(REQUEST_ID), MakeId))
        .with_state(state)
}

/// 200 while the process lives.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "meta", responses((status = 200, description = "`{\"status\": \"ok\"}`", body = Object)))]
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when the database, the queue and the blob store answer; 503 with each one's state.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "meta", responses((status = 200, description = "every backend answers", body = Object), (status = 503, description = "each backend's state", body = Object)))]
pub(crate) async fn readyz(State(state): State<Shared>) -> Response {
    let database = FlowStore::list(&state.sql, 1, None).await.map(|_| ());
    let queue = state
        .queue
        .depth(&state.config.worker_group)
        .await
        .map(|_| ());
    let blobs = state.blobs.stat("readyz/probe").await.map(|_| ());
    let show = |r: &Result<(), flowcore::StoreError>| if r.is_ok() { "ok" } else { "unavailable" };
    let body =
        json!({"database": show(&database), "queue": show(&queue), "blob_store": show(&blobs)});
    let status = if database.is_ok() && queue.is_ok() && blobs.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// The API key of a request: `Authorization: Bearer <key>` or `x-api-key: <key>`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim());
    }
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, key) = auth.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Refuses requests without a valid key (the admin key or a stored, unrevoked API key) with
/// 401, and a key without the scope the request needs with 403; counts the request against the
/// key's rate limit (by its verified id), and a failed attempt against the client address's
/// budget of failures. The [`Caller`](crate::auth::Caller) goes to the handler as an extension.
async fn require_key(
    State(state): State<Shared>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = match presented_key(request.headers()) {
        Some(presented) => {
            crate::auth::authenticate(&state.sql, state.config.admin_key.as_deref(), presented)
                .await?
        }
        None => None,
    };
    let Some(caller) = caller else {
        let address = crate::limits::client_of(&request, state.config.number_of_proxies);
        crate::limits::take(
            &state,
            &format!("authfail:{address}"),
            state.config.auth_failures_per_minute,
            "too many requests with a wrong API key from this address",
        )
        .await?;
        return Err(ApiError::unauthorized());
    };
    crate::limits::take(
        &state,
        &format!("key:{}", caller.key_id),
        state.config.rate_limit_per_minute,
        "too many requests with this API key",
    )
    .await?;
    let needed = crate::auth::required_scope(request.method(), request.uri().path());
    if !caller.scopes.contains(needed) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this API key lacks the `{}` scope", needed.as_str()),
        ));
    }
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}
