//! The HTTP API: `fn app(state) -> Router`, so tests drive it without a socket. The router on
//! top of the route modules, and the layers every request goes through: request ids and
//! tracing, metrics, JSON errors, body limits and timeouts, rate limits and API keys.

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::HeaderName;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::routes;
use crate::state::Shared;

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

/// The router of the whole API.
pub fn app(state: Shared) -> Router {
    let body_limit = usize::try_from(state.config.max_payload_mb.saturating_mul(1024 * 1024))
        .unwrap_or(usize::MAX);
    let limited = middleware::from_fn_with_state(state.clone(), rate_limit);
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
        .route("/healthz", get(routes::meta::healthz))
        .route("/readyz", get(routes::meta::readyz))
        .route("/metrics", get(routes::meta::scrape))
        .nest("/api/v1", api)
        .merge(crate::console::router())
        .merge(
            routes::webhooks::router()
                .layer(payload_limit)
                .merge(routes::resume::router())
                .route_layer(limited),
        )
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::map_response(crate::error::json_errors))
        // A request body that pauses longer than this fails (slow uploads hold a connection).
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            std::time::Duration::from_secs(state.config.idle_timeout_seconds),
        ))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::disable())
        // Outermost: every request gets an id (kept when the client sent one), a span with it
        // for every log line, and the id back in the answer.
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default();
            // A resume URL's path is its credential: not written to the logs.
            let path = request.uri().path();
            let path = if path.starts_with(crate::resume::PREFIX) { crate::resume::PREFIX } else { path };
            tracing::info_span!("request", method = %request.method(), path = %path, request_id = %id)
        }))
        .layer(PropagateRequestIdLayer::new(HeaderName::from_static(REQUEST_ID)))
        .layer(SetRequestIdLayer::new(HeaderName::from_static(REQUEST_ID), MakeId))
        .with_state(state)
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
            crate::auth::authenticate(
                state.stores.api_keys.as_ref(),
                state.config.admin_key.as_deref(),
                presented,
            )
            .await?
        }
        None => None,
    };
    let Some(caller) = caller else {
        let address = crate::limits::client_of(&request, state.config.number_of_proxies);
        crate::limits::take(
            state.stores.limiter.as_ref(),
            &format!("authfail:{address}"),
            state.config.auth_failures_per_minute,
            "too many requests with a wrong API key from this address",
        )
        .await?;
        return Err(ApiError::unauthorized());
    };
    crate::limits::take(
        state.stores.limiter.as_ref(),
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

/// Refuses with 429 and `Retry-After` when the client address is over its per-minute limit.
/// (API keys are limited by their verified id once checked, in [`require_key`]: a key
/// presented here is not yet known to be anyone's.)
async fn rate_limit(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let address = crate::limits::client_of(&request, state.config.number_of_proxies);
    let limit = state.config.rate_limit_per_minute;
    let key = format!("ip:{address}");
    match crate::limits::take(
        state.stores.limiter.as_ref(),
        &key,
        limit,
        "too many requests",
    )
    .await
    {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// Counts and times every request by its route template.
async fn track(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    state
        .metrics
        .request(method.as_str(), &route, response.status().as_u16(), seconds);
    response
}
