//! Runs: start (sync or async, idempotent), read with steps, list, cancel.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use flowcore::durable::resolve;
use flowcore::ports::{FinishWatch, NewRun, RunEnd, RunFilter, RunRecord, RunStore};
use flowcore::{RunId, RunStatus};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::Shared;
use crate::config::Role;
use crate::error::ApiError;
#[allow(unused_imports)]
use crate::openapi::*;

/// The runs routes.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/flows/{id}/runs", post(start))
        .route("/runs", get(list))
        .route("/runs/{id}", get(read))
        .route("/runs/{id}/cancel", post(cancel))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartBody {
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    wait: Option<bool>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// Starts a run.
#[utoipa::path(post, path = "/api/v1/flows/{id}/runs", operation_id = "start_run", tag = "runs", params(("id" = String, Path, description = "its id")), request_body = StartRun, responses((status = 200, description = "finished within the wait", body = RunAnswer), (status = 202, description = "queued, or still running after WEBHOOK_TIMEOUT_SECONDS", body = RunAnswer), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 404, description = "not found", body = ApiErrorBody), (status = 429, description = "rate_limited or quota_exceeded", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn start(
    State(state): State<Shared>,
    Path(flow_id): Path<String>,
    crate::error::JsonBody(body): crate::error::JsonBody<StartBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !flowcore::model::is_valid_id(&flow_id) {
        return Err(ApiError::bad_request(
            "the flow id is not 1 to 64 of A-Z a-z 0-9 _ -",
        ));
    }
    if body
        .idempotency_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > 200)
    {
        return Err(ApiError::bad_request(
            "idempotency_key must be 1 to 200 characters",
        ));
    }
    start_run(
        &state,
        &flow_id,
        body.input.unwrap_or_else(|| json!({})),
        body.wait.unwrap_or(true),
        body.idempotency_key,
        None,
    )
    .await
}

/// Starts a run of the latest version of `flow_id` (shared by the API and webhooks).
pub async fn start_run(
    state: &Shared,
    flow_id: &str,
    input: Value,
    wait: bool,
    idempotency_key: Option<String>,
    trigger: Option<Value>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (version, plan) = state.plans.get(flow_id, None).await?;
    let quota = state.config.quota_runs_per_day;
    if quota > 0 && state.usage.runs_today(flow_id).await? >= quota {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota_exceeded",
            format!(
                "flow `{flow_id}` has started its {quota} runs of today (FLOWCORE_QUOTA_RUNS_PER_DAY)"
            ),
        ));
    }
    // The `all` role executes a waited run itself: created already claimed (one commit) and
    // run at once; the run is still leased and checkpointed, so a crash loses nothing.
    // ... unless the flow names another worker group: then its workers must run it.
    let own_group = plan
        .worker_group()
        .is_none_or(|g| g == state.config.worker_group);
    // ... in one of the process's slots, waited for (past the wait it goes to the queue).
    let limit = Duration::from_secs(state.config.webhook_timeout_seconds);
    let until = tokio::time::Instant::now() + limit;
    let slot = if wait && own_group && state.config.role == Role::All {
        state.admission.wait_slot(limit).await?
    } else {
        None
    };
    let claim = slot
        .is_some()
        .then(|| crate::worker::durable_options(state).claim());
    let group = plan
        .worker_group()
        .unwrap_or(&state.config.worker_group)
        .to_owned();
    if slot.is_none() {
        state
            .admission
            .admit_queued(state.queue.as_ref(), &group)
            .await?;
    }
    let new = NewRun {
        id: RunId::new(),
        flow_id: flow_id.to_owned(),
        flow_version: version,
        input,
        idempotency_key,
        claim,
        trigger,
    };
    // In a task of its own: a client that goes away mid-request drops this handler, and must
    // not leave a stored run that nobody starts (until the reaper or the orphan sweep finds it
    // a lease later).
    let accepting = tokio::spawn(accept(state.clone(), new, slot, wait, group));
    let accepted = accepting
        .await
        .map_err(|e| flowcore::StoreError::backend("accepting a run", e))??;
    // What is left of the wait, after any wait for a slot.
    let limit = until.saturating_duration_since(tokio::time::Instant::now());
    match accepted {
        Accepted::Existing(run) => answer(state, &run.id, Seen::of(&run)).await,
        Accepted::Inline(run, task) => {
            let done = match tokio::time::timeout(limit, task).await {
                Ok(Ok(done)) => done?,
                Ok(Err(_)) | Err(_) => RunStore::get(&state.sql, &run.id).await?,
            };
            answer(state, &run.id, Seen::of(&done)).await
        }
        // As accepted: a fast worker may already be done, but the caller asked not to wait.
        Accepted::Queued(run, None) => answer(state, &run.id, Seen::of(&run)).await,
        Accepted::Queued(run, Some(watch)) => {
            let seen = wait_until_final(state, &run.id, watch, limit).await?;
            answer(state, &run.id, seen).await
        }
    }
}

/// A run as [`accept`] left it.
enum Accepted {
    /// The idempotency key named a run started before.
    Existing(RunRecord),
    /// Executing here (the `all` role's waited runs).
    Inline(
        RunRecord,
        tokio::task::JoinHandle<Result<RunRecord, flowcore::StoreError>>,
    ),
    /// In the queue, with a watch for its end when the caller waits.
    Queued(RunRecord, Option<FinishWatch>),
}

/// Stores a new run (in the database before anyone answers) and hands it to whoever executes
/// it: a task here in `slot` (created already claimed) or the queue of `group`.
async fn accept(
    state: Shared,
    new: NewRun,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    wait: bool,
    group: String,
) -> Result<Accepted, ApiError> {
    let id = new.id.clone();
    let flow_id = new.flow_id.clone();
    // Registered before the run exists, so that a cancel can never miss it.
    let token = slot.as_ref().map(|_| state.running.insert(&id));
    let (run, created) = match RunStore::create(&state.sql, new).await {
        Ok(c) => c,
        Err(e) => {
            state.running.remove(&id);
            return Err(e.into());
        }
    };
    if !created {
        state.running.remove(&id);
        return Ok(Accepted::Existing(run));
    }
    state.usage.run_started(&flow_id);
    if let (Some(token), Some(slot)) = (token, slot) {
        let task = {
            let (state, run) = (state.clone(), run.clone());
            tokio::spawn(
                async move { crate::worker::execute_inline(&state, run, token, slot).await },
            )
        };
        return Ok(Accepted::Inline(run, task));
    }
    // Watched before it is enqueued, so that its end cannot pass unseen.
    let watch = wait.then(|| state.signals.watch_finished(&run.id));
    if let Err(e) = state.queue.enqueue(&group, &run.id, None).await {
        // Not accepted: the caller gets the error, and the run must not wait for ever for a
        // job that does not exist (unless the enqueue went through after all and a worker has
        // it already).
        let failed = crate::worker::fail_run(
            &state,
            &run.id,
            "the queue was unavailable when the run was started".into(),
        )
        .await;
        if let Err(f) = failed {
            tracing::warn!(run_id = %run.id, error = %f, "could not fail a run that was not enqueued");
        }
        return Err(e.into());
    }
    Ok(Accepted::Queued(run, watch))
}

/// A run as a request answers it: ended, or live in some status.
enum Seen {
    Ended(RunEnd),
    Live(RunStatus),
}

impl Seen {
    fn of(run: &RunRecord) -> Self {
        run.end().map_or(Self::Live(run.status), Self::Ended)
    }

    fn status(&self) -> RunStatus {
        match self {
            Self::Ended(end) => end.status,
            Self::Live(status) => *status,
        }
    }
}

/// Waits until the run is final or `limit` passes. Woken by the run's finish announcement from
/// whichever process executes it, which carries the run's end as stored (else the store is
/// read); the store is also read every second, in case an announcement was lost (a Redis
/// reconnect).
async fn wait_until_final(
    state: &Shared,
    run_id: &RunId,
    mut watch: FinishWatch,
    limit: Duration,
) -> Result<Seen, ApiError> {
    let until = tokio::time::Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let heard = tokio::time::timeout(left.min(Duration::from_secs(1)), watch.finished()).await;
        if let Ok(Some(end)) = heard {
            return Ok(Seen::Ended(std::sync::Arc::unwrap_or_clone(end)));
        }
        let run = RunStore::get(&state.sql, run_id).await?;
        if run.status.is_final() || tokio::time::Instant::now() >= until {
            return Ok(Seen::of(&run));
        }
        if heard.is_ok() {
            // Announced but not final as read: keep reading, gently.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// 200 with the output when the run is over, else 202 with its id and status.
async fn answer(
    state: &Shared,
    run_id: &RunId,
    seen: Seen,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    match seen {
        Seen::Ended(end) => {
            let output = match &end.output {
                Some(v) => Some(resolve(v, &state.blobs).await?),
                None => None,
            };
            let mut body = json!({"run_id": run_id, "status": end.status, "output": output});
            if let Some(error) = &end.error {
                body["error"] = json!(error);
            }
            Ok((StatusCode::OK, Json(body)))
        }
        Seen::Live(status) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"run_id": run_id, "status": status})),
        )),
    }
}

/// Reads a run with its steps.
#[utoipa::path(get, path = "/api/v1/runs/{id}", operation_id = "read_run", tag = "runs", params(("id" = String, Path, description = "its id")), responses((status = 200, description = "the run", body = Object), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn read(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = RunId::from(id);
    let run = RunStore::get(&state.sql, &id).await?;
    let mut steps = Vec::new();
    for step in RunStore::steps(&state.sql, &id).await? {
        let output = match &step.output {
            Some(v) => Some(resolve(v, &state.blobs).await?),
            None => None,
        };
        steps.push(json!({
            "node": step.node, "status": step.status, "attempts": step.attempts,
            "started_at": step.started_at, "finished_at": step.finished_at, "output": output, "error": step.error,
        }));
    }
    let output = match &run.output {
        Some(v) => Some(resolve(v, &state.blobs).await?),
        None => None,
    };
    Ok(Json(json!({
        "id": run.id, "flow_id": run.flow_id, "flow_version": run.flow_version, "status": run.status,
        "input": run.input, "output": output, "error": run.error, "created_at": run.created_at,
        "started_at": run.started_at, "finished_at": run.finished_at, "steps": steps,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    flow_id: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// Lists runs, newest first.
#[utoipa::path(get, path = "/api/v1/runs", operation_id = "list_runs", tag = "runs", params(("flow_id" = Option<String>, Query), ("status" = Option<String>, Query), ("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)), responses((status = 200, description = "a page of runs", body = Object), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn list(
    State(state): State<Shared>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = q
        .status
        .as_deref()
        .map(str::parse::<RunStatus>)
        .transpose()
        .map_err(ApiError::bad_request)?;
    let filter = RunFilter {
        flow_id: q.flow_id,
        status,
        limit: q.limit.unwrap_or(50),
        cursor: q.cursor,
    };
    let page = RunStore::list(&state.sql, &filter).await?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|r| json!({"id": r.id, "flow_id": r.flow_id, "flow_version": r.flow_version, "status": r.status, "created_at": r.created_at, "finished_at": r.finished_at}))
        .collect();
    Ok(Json(
        json!({"items": items, "next_cursor": page.next_cursor}),
    ))
}

/// Cancels a queued or running run.
#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", operation_id = "cancel_run", tag = "runs", params(("id" = String, Path, description = "its id")), responses((status = 200, description = "cancelled: `{run_id, status}`", body = Object), (status = 202, description = "asked to stop; still running after 5 s", body = Object), (status = 404, description = "not found", body = ApiErrorBody), (status = 409, description = "already finished", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn cancel(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = RunId::from(id);
    let run = RunStore::get(&state.sql, &id).await?;
    match run.status {
        RunStatus::Queued => {
            let run =
                RunStore::transition(&state.sql, &id, RunStatus::Queued, RunStatus::Cancelled)
                    .await?;
            crate::worker::announce_finished(&state, &run).await;
            Ok((
                StatusCode::OK,
                Json(json!({"run_id": run.id, "status": run.status})),
            ))
        }
        RunStatus::Running => {
            // Here, or in whichever process executes it; then wait (briefly) for the engine
            // to stop it and write the status.
            let watch = state.signals.watch_finished(&id);
            if !state.running.cancel(&id) {
                state.signals.cancel(&id).await?;
            }
            let seen = wait_until_final(&state, &id, watch, Duration::from_secs(5)).await?;
            let code = match seen {
                Seen::Ended(_) => StatusCode::OK,
                Seen::Live(_) => StatusCode::ACCEPTED,
            };
            Ok((code, Json(json!({"run_id": id, "status": seen.status()}))))
        }
        status => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_finished",
            format!("the run is {status}"),
        )),
    }
}
