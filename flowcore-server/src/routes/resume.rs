//! The resume routes: `GET /webhooks/resume/{token}` shows a page with a button (mail scanners
//! open links, and must not approve anything); `POST` delivers its body as the signal (see
//! [`crate::resume`] for the tokens).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flowcore::ports::{ActionKind, RunAction};
use serde_json::Value;

use crate::error::ApiError;
use crate::lifecycle;
use crate::state::Shared;

/// The resume routes: a body is at most a signal's payload (with room for a form's encoding).
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/webhooks/resume/{token}", get(page).post(deliver))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            lifecycle::MAX_SIGNAL_BYTES * 3,
        ))
}

fn refused() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "this resume link is not valid",
    )
}

/// Markup of names checked before (run ids, `[A-Za-z0-9_.-]` signal names, our messages):
/// nothing to escape, but kept out of the markup's syntax all the same.
fn text(s: &str) -> String {
    s.replace(['<', '>', '&', '"', '\''], "")
}

/// A small page for a person (no script, no outside resource).
fn html_page(status: StatusCode, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>flowcore</title>\
         <meta name=\"viewport\" content=\"width=device-width\"></head><body>{body}</body></html>"
    );
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(html),
    )
        .into_response()
}

/// A page with a button that delivers the signal (a GET must not: link checkers open it).
async fn page(State(state): State<Shared>, Path(token): Path<String>) -> Response {
    let Some((run_id, signal)) = state.resume.open(&token) else {
        return refused().into_response();
    };
    let body = format!(
        "<p>Send <b>{signal}</b> to run <code>{run}</code>?</p>\
         <form method=\"post\"><button type=\"submit\">Send {signal}</button></form>",
        signal = text(&signal),
        run = text(run_id.as_str()),
    );
    html_page(StatusCode::OK, &body)
}

/// Delivers the signal: a JSON body as it is, a form's fields as an object of strings, an
/// empty body as `{}`. The page's button (a form) is answered with a page, a program with
/// JSON.
async fn deliver(
    State(state): State<Shared>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let kind = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let form = kind.starts_with("application/x-www-form-urlencoded");
    match send(&state, &token, form, body).await {
        Ok(sent) if form => html_page(
            StatusCode::ACCEPTED,
            &format!(
                "<p>Sent <b>{}</b> to run <code>{}</code>.</p>",
                text(&sent.signal),
                text(sent.run_id.as_str())
            ),
        ),
        Ok(sent) => (StatusCode::ACCEPTED, Json(sent)).into_response(),
        Err(e) if form => html_page(e.status, &format!("<p>{}</p>", text(&e.message))),
        Err(e) => e.into_response(),
    }
}

async fn send(
    state: &Shared,
    token: &str,
    form: bool,
    body: axum::body::Bytes,
) -> Result<lifecycle::SignalSent, ApiError> {
    let (run_id, signal) = state.resume.open(token).ok_or_else(refused)?;
    // Only while the run waits for this signal: a link clicked twice, or kept after its wait,
    // does not pile up signals for the run's later waits.
    let run = state.stores.runs.get(&run_id).await?;
    let waits = run.status == flowcore::RunStatus::Waiting
        && run
            .parked
            .as_ref()
            .is_some_and(|p| p.waits_for(&signal, None));
    if !waits {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_waiting",
            format!("run `{run_id}` does not wait for `{signal}` now"),
        ));
    }
    let payload: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(serde_json::Map::new())
    } else if form {
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
            .map_err(|e| ApiError::bad_request(format!("the form cannot be read: {e}")))?;
        Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        )
    } else {
        crate::error::parse_json(body).await?
    };
    let by = RunAction::now(ActionKind::Signal, None)
        .with_detail(serde_json::json!({"signal": signal, "via": "resume_link"}));
    let state = state.clone();
    Ok(lifecycle::detached(async move {
        lifecycle::signal(&state, &run_id, &signal, &payload, by).await
    })
    .await?)
}
