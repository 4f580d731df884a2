//! `GET /api/v1/runs/{id}/events`: Server-Sent Events of a run, from any process, resumable with
//! `Last-Event-ID`. The stream ends after `run_finished`; each poll of the event bus is bounded,
//! so a client that leaves costs nothing after its current poll.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use flowcore::RunId;
use futures::Stream;

use crate::error::{ApiError, ApiErrorBody};
use crate::state::Shared;

/// The events route.
pub fn router() -> Router<Shared> {
    Router::new().route("/runs/{id}/events", get(events))
}

struct Cursor {
    state: Shared,
    run_id: RunId,
    after: Option<String>,
    pending: std::collections::VecDeque<flowcore::ports::EventRecord>,
    done: bool,
    /// The run was seen final with nothing more to read: one short read more (its last events
    /// may still be on their way to the bus), then the stream ends.
    ending: bool,
}

/// Streams a run's events (Server-Sent Events; Last-Event-ID resumes).
#[utoipa::path(get, path = "/api/v1/runs/{id}/events", operation_id = "run_events", tag = "events", params(("id" = String, Path, description = "its id")), responses((status = 200, description = "text/event-stream of run_started, node_started, node_finished, run_finished", content_type = "text/event-stream", body = String), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn events(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let run_id = RunId::from(id);
    let run = state.stores.runs.get(&run_id).await?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let cursor = Cursor {
        state,
        run_id,
        after,
        pending: Default::default(),
        done: false,
        ending: run.status.is_final(),
    };
    let stream = futures::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(record) = c.pending.pop_front() {
                c.after = Some(record.id.clone());
                if record.name == "run_finished" {
                    c.done = true;
                }
                let event = Event::default()
                    .id(record.id)
                    .event(record.name)
                    .data(record.data);
                return Some((Ok(event), c));
            }
            if c.done {
                return None;
            }
            let wait = Duration::from_secs(if c.ending { 1 } else { 15 });
            match c
                .state
                .stores
                .events
                .read(&c.run_id, c.after.as_deref(), wait)
                .await
            {
                Ok(batch) if batch.is_empty() => {
                    // A finished run with nothing more to send ends the stream instead of
                    // waiting for ever: its events expired, or the client resumed after the
                    // last one (`Last-Event-ID`, as every reconnecting EventSource sends).
                    if c.ending {
                        return None;
                    }
                    match c.state.stores.runs.get(&c.run_id).await {
                        Ok(run) if run.status.is_final() => c.ending = true,
                        Ok(_) => {}
                        Err(_) => return None,
                    }
                }
                Ok(batch) => c.pending.extend(batch),
                Err(_) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
