//! Resume URLs: `run.resume_urls.<signal>` in templates, an address under
//! `/webhooks/resume/` that delivers one signal to one run without an API key (an approval
//! link in an email). `GET` shows a page with a button (mail scanners open links, and must not
//! approve anything); `POST` delivers its body.
//!
//! A token is `{run id}.{signal}.{mac}`: the MAC is [`Keyring::sign`] of the run id and the
//! signal, so a token is valid for that run and that signal only, cannot be guessed, and needs
//! no table of its own. It delivers only while the run waits for that signal (409
//! `not_waiting` otherwise). The URL is a credential: whoever holds it chooses the payload, and
//! a template that renders it leaves it in the step's output (readable with the `read` scope);
//! the request logs leave its path out.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flowcore::RunId;
use serde_json::Value;

use crate::error::ApiError;
use crate::keyring::Keyring;
use crate::lifecycle;
use crate::state::Shared;

/// Where resume tokens are made and checked.
pub struct ResumeLinks {
    /// `{FLOWCORE_PUBLIC_URL}/webhooks/resume/`.
    base: String,
    keys: Arc<Keyring>,
}

impl std::fmt::Debug for ResumeLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeLinks")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn message(run_id: &str, signal: &str) -> Vec<u8> {
    format!("resume\0{run_id}\0{signal}").into_bytes()
}

impl ResumeLinks {
    /// Links under `public_url`, signed with `keys`.
    pub fn new(public_url: &str, keys: Arc<Keyring>) -> Self {
        Self {
            base: format!("{}/webhooks/resume/", public_url.trim_end_matches('/')),
            keys,
        }
    }

    /// The run and signal of a token, when it is one of ours.
    pub fn open(&self, token: &str) -> Option<(RunId, String)> {
        let (run_id, rest) = token.split_once('.')?;
        let (signal, mac) = rest.rsplit_once('.')?;
        let ok = flowcore::nodes::is_signal_name(signal)
            && run_id.len() <= 64
            && self.keys.verify(&message(run_id, signal), mac);
        ok.then(|| (RunId::from(run_id), signal.to_owned()))
    }
}

impl flowcore::wait::ResumeUrls for ResumeLinks {
    fn url(&self, run_id: &RunId, signal: &str) -> String {
        let mac = self.keys.sign(&message(run_id.as_str(), signal));
        format!("{}{run_id}.{signal}.{mac}", self.base)
    }
}

/// Where resume URLs live.
pub const PREFIX: &str = "/webhooks/resume/";

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
    Ok(lifecycle::signal(state, &run_id, &signal, &payload).await?)
}
