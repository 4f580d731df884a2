//! Runs: start (sync or async, idempotent), read with steps, list, cancel. What happens to a run
//! is in [`crate::lifecycle`]; these handlers turn requests into its calls and its results
//! into answers.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use flowcore::durable::resolve;
use flowcore::ports::{ActionKind, Actor, BlobStore, RunAction, RunFilter, RunRecord};
use flowcore::rerun::RerunFrom;
use flowcore::{RunId, RunStatus, StepStatus, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::archive;
use crate::auth::Caller;
use crate::error::{ApiError, ApiErrorBody, JsonBody};
use crate::lifecycle::{self, RunAnswer, RunState, SignalSent, Start};
use crate::replay::{ReplayError, ReplayProgress, ReplayRequest};
use crate::routes::Page;
use crate::state::Shared;

/// The runs routes.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/flows/{id}/runs", post(start))
        .route("/runs", get(list))
        .route("/runs/{id}", get(read))
        .route("/runs/{id}/cancel", post(cancel))
        .route("/runs/{id}/rerun", post(rerun))
        .route("/runs/replay", post(replay))
        .route("/replays/{id}", get(replay_progress))
        .route("/runs/{id}/signals/{name}", post(signal))
        .route("/signals/{name}", post(keyed_signal))
}

/// How to start a run.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// The run's input (default `{}`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub input: Option<Value>,
    /// Wait up to WEBHOOK_TIMEOUT_SECONDS for the end (default true).
    #[serde(default)]
    pub wait: Option<bool>,
    /// The same key gives the same run.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// 200 with the run's end, 202 while it is live.
pub fn answered(answer: RunAnswer) -> (StatusCode, Json<RunAnswer>) {
    let code = if answer.ended() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    (code, Json(answer))
}

/// Starts a run.
#[utoipa::path(post, path = "/api/v1/flows/{id}/runs", operation_id = "start_run", tag = "runs", params(("id" = String, Path, description = "its id")), request_body = StartRun, responses((status = 200, description = "finished within the wait", body = RunAnswer), (status = 202, description = "queued, or still running after WEBHOOK_TIMEOUT_SECONDS", body = RunAnswer), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 404, description = "not found", body = ApiErrorBody), (status = 429, description = "rate_limited or quota_exceeded", body = ApiErrorBody), (status = 503, description = "overloaded: too many runs wait", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn start(
    State(state): State<Shared>,
    Path(flow_id): Path<String>,
    JsonBody(body): JsonBody<StartRun>,
) -> Result<(StatusCode, Json<RunAnswer>), ApiError> {
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
    let start = Start {
        flow_id,
        input: body
            .input
            .unwrap_or_else(|| Value::Object(Default::default())),
        wait: body.wait.unwrap_or(true),
        idempotency_key: body.idempotency_key,
        trigger: None,
    };
    Ok(answered(lifecycle::start(&state, start).await?))
}

/// One step of a run.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StepView {
    /// The node's id.
    pub node: String,
    /// `pending`, `running`, `succeeded`, `failed`, `skipped` or `cancelled`.
    #[schema(value_type = String)]
    pub status: StepStatus,
    /// Attempts made.
    pub attempts: u32,
    /// When its first attempt started.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached its status.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Its output.
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// The error of its last attempt.
    pub error: Option<String>,
    /// The error's stable code (`timeout`, `node_failed`, `node_timeout`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// A `map` step's items in all (shown as they are checkpointed, while it runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items_total: Option<u32>,
    /// How many of its items are finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items_done: Option<u32>,
    /// Kept from the run this one reruns: not executed in this one.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
}

/// A run with its steps.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunView {
    /// What a listing shows of it.
    #[serde(flatten)]
    pub run: RunSummary,
    /// Its input.
    #[schema(value_type = Object)]
    pub input: Value,
    /// Its output, once it succeeded.
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// Why it did not succeed.
    pub error: Option<String>,
    /// When a worker first took it.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<DateTime<Utc>>,
    /// Its concurrency key, rendered from its input (`settings.concurrency`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    /// Its priority in the queue (0 to 9, 9 first).
    pub priority: u8,
    /// Its steps, in the flow's node order.
    pub steps: Vec<StepView>,
    /// Read from the archive: retention deleted it from the database (`FLOWCORE_ARCHIVE`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub archived: bool,
    /// While it is `waiting`: what its nodes wait for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waits: Option<Vec<WaitView>>,
    /// What people did to it (cancel, signal), oldest first: what, who (`actor`: the API
    /// key's `id` and `name`; `null` for a resume link), when, and details.
    #[schema(value_type = Vec<Object>)]
    pub actions: Vec<RunAction>,
}

/// What a node of a waiting run waits for.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WaitView {
    /// The waiting node.
    pub node: String,
    /// The signal it waits for; `null` for a parked `delay`.
    pub signal: Option<String>,
    /// The key a keyed signal must carry.
    pub key: Option<String>,
    /// When it stops waiting (a delay's time; a wait's timeout).
    pub deadline: DateTime<Utc>,
}

impl From<flowcore::wait::Wait> for WaitView {
    fn from(w: flowcore::wait::Wait) -> Self {
        Self {
            node: w.node,
            signal: w.signal,
            key: w.key,
            deadline: w.deadline,
        }
    }
}

/// A stored value as readers see it: read back from the blob store when it was offloaded. An
/// archived run's outputs were read back when it was archived (a reference left in one is to
/// a blob that was already gone, and is shown as it is).
async fn shown(
    value: Option<&Value>,
    blobs: &dyn BlobStore,
    archived: bool,
) -> Result<Option<Value>, ApiError> {
    Ok(match value {
        Some(v) if archived => Some(v.clone()),
        Some(v) => Some(resolve(v, blobs).await?),
        None => None,
    })
}

/// Reads a run with its steps.
#[utoipa::path(get, path = "/api/v1/runs/{id}", operation_id = "read_run", tag = "runs", params(("id" = String, Path, description = "its id")), responses((status = 200, description = "the run", body = RunView), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn read(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    let id = RunId::from(id);
    let (runs, blobs) = (&state.stores.runs, state.stores.blobs.as_ref());
    let (run, stored, actions, archived) = match runs.get(&id).await {
        Ok(run) => (run, runs.steps(&id).await?, runs.actions(&id).await?, false),
        Err(StoreError::NotFound { .. }) if state.config.archive => {
            match archive::find(blobs, &id).await? {
                Some(found) => (found.run, found.steps, found.actions, true),
                None => return Err(StoreError::not_found("run", id.as_str()).into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    let mut steps = Vec::new();
    for step in stored {
        steps.push(StepView {
            output: shown(step.output.as_deref(), blobs, archived).await?,
            node: step.node.to_string(),
            status: step.status,
            attempts: step.attempts,
            started_at: step.started_at,
            finished_at: step.finished_at,
            error: step.error,
            error_code: step.error_code,
            items_total: step.items.map(|p| p.total),
            items_done: step.items.map(|p| p.done),
            reused: step.reused,
        });
    }
    let waits = match (&run.parked, run.status) {
        (Some(parked), RunStatus::Waiting) => {
            Some(parked.waits.iter().cloned().map(WaitView::from).collect())
        }
        _ => None,
    };
    Ok(Json(RunView {
        output: shown(run.output.as_ref(), blobs, archived).await?,
        input: run.input.clone(),
        error: run.error.clone(),
        started_at: run.started_at,
        concurrency_key: run.concurrency.as_ref().map(|c| c.key.clone()),
        priority: run.priority,
        run: RunSummary::from(run),
        steps,
        archived,
        waits,
        actions,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    flow_id: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
    created_after: Option<DateTime<Utc>>,
    created_before: Option<DateTime<Utc>>,
}

/// A run in a list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunSummary {
    /// Its id.
    #[schema(value_type = String)]
    pub id: RunId,
    /// Its flow.
    pub flow_id: String,
    /// The flow's version it runs.
    pub flow_version: u32,
    /// Its status.
    #[schema(value_type = String)]
    pub status: RunStatus,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it ended.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Retention dropped its data (input, output, steps) and kept this summary
    /// (`FLOWCORE_RUN_DATA_RETENTION_DAYS`, `settings.retention.data_days`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub data_pruned: bool,
    /// The run it reruns (`POST /api/v1/runs/{id}/rerun`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub rerun_of: Option<RunId>,
}

impl From<RunRecord> for RunSummary {
    fn from(r: RunRecord) -> Self {
        Self {
            id: r.id,
            flow_id: r.flow_id,
            flow_version: r.flow_version,
            status: r.status,
            created_at: r.created_at,
            finished_at: r.finished_at,
            data_pruned: r.data_pruned,
            rerun_of: r.rerun_of,
        }
    }
}

/// Lists runs, newest first.
#[utoipa::path(get, path = "/api/v1/runs", operation_id = "list_runs", tag = "runs", params(("flow_id" = Option<String>, Query), ("status" = Option<String>, Query), ("created_after" = Option<String>, Query, description = "RFC 3339: only runs created at or after it"), ("created_before" = Option<String>, Query, description = "RFC 3339: only runs created before it"), ("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)), responses((status = 200, description = "a page of runs", body = Page<RunSummary>), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn list(
    State(state): State<Shared>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Page<RunSummary>>, ApiError> {
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
        created_after: q.created_after,
        created_before: q.created_before,
    };
    let page = state.stores.runs.list(&filter).await?;
    Ok(Json(Page::of(page, RunSummary::from)))
}

/// A rerun of a finished run.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RerunRequest {
    /// Where it starts again: `failed` (default: the steps that did not succeed, and all
    /// downstream of them), `start`, or a node's id (that node and all downstream of it).
    pub from: Option<String>,
    /// `original` (default: the version the run executed) or `latest`.
    pub version: Option<String>,
    /// A new input (default: the run's).
    #[schema(value_type = Option<Object>)]
    pub input: Option<Value>,
}

/// Reruns a finished run: a new run (`rerun_of`) that keeps the steps not downstream of `from`
/// (`reused`) and executes the rest.
#[utoipa::path(post, path = "/api/v1/runs/{id}/rerun", operation_id = "rerun_run", tag = "runs", params(("id" = String, Path, description = "the run to rerun")), request_body = RerunRequest, responses((status = 202, description = "the rerun, queued", body = RunState), (status = 400, description = "invalid input: a `from` node the version lacks, `failed` for a run without a failed step", body = ApiErrorBody), (status = 404, description = "not found", body = ApiErrorBody), (status = 409, description = "run_not_finished, or run_pruned: retention removed its data", body = ApiErrorBody), (status = 429, description = "quota_exceeded", body = ApiErrorBody), (status = 503, description = "overloaded: too many runs wait", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn rerun(
    State(state): State<Shared>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RerunRequest>,
) -> Result<(StatusCode, Json<RunState>), ApiError> {
    let latest = match body.version.as_deref() {
        None | Some("original") => false,
        Some("latest") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "version is `original` or `latest`, not `{other}`"
            )));
        }
    };
    let from = RerunFrom::parse(body.from.as_deref().unwrap_or("failed"));
    let rerun = lifecycle::Rerun {
        from,
        latest,
        input: body.input,
        actor: actor(caller),
        priority: None,
    };
    let run =
        lifecycle::detached(async move { lifecycle::rerun(&state, &RunId::from(id), rerun).await })
            .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RunState {
            run_id: run.id,
            status: run.status,
        }),
    ))
}

/// Reruns the finished runs of a flow that match a filter, in the background (see
/// [`crate::replay`]).
#[utoipa::path(post, path = "/api/v1/runs/replay", operation_id = "replay_runs", tag = "runs", request_body = ReplayRequest, responses((status = 202, description = "the replay, started: how many runs it reruns, and its id to follow it at /api/v1/replays/{id}", body = ReplayProgress), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 404, description = "no such flow", body = ApiErrorBody), (status = 429, description = "too_many_replays: two run in this process already", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn replay(
    State(state): State<Shared>,
    caller: Option<Extension<Caller>>,
    JsonBody(body): JsonBody<ReplayRequest>,
) -> Result<(StatusCode, Json<ReplayProgress>), ApiError> {
    let started = crate::replay::start(&state, body, actor(caller))
        .await
        .map_err(|e| match e {
            ReplayError::Invalid(m) => ApiError::bad_request(m),
            ReplayError::Busy | ReplayError::FlowBusy(_) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_replays",
                e.to_string(),
            ),
            ReplayError::Store(e) => e.into(),
            ReplayError::Flow(e) => e.into(),
        })?;
    Ok((StatusCode::ACCEPTED, Json(started)))
}

/// Where a replay stands.
#[utoipa::path(get, path = "/api/v1/replays/{id}", operation_id = "read_replay", tag = "runs", params(("id" = String, Path, description = "the replay's id")), responses((status = 200, description = "its progress", body = ReplayProgress), (status = 404, description = "not found", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn replay_progress(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<ReplayProgress>, ApiError> {
    Ok(Json(crate::replay::progress(&state, &id).await?))
}

/// Who made the request, as recorded on what it does to a run (`None` on a server without
/// API keys).
fn actor(caller: Option<Extension<Caller>>) -> Option<Actor> {
    caller.map(|Extension(caller)| caller.actor())
}

/// A signal's name as a route takes it: 400 unless it can name one.
fn signal_name(name: &str) -> Result<(), ApiError> {
    if flowcore::nodes::is_signal_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "the signal name is not 1 to 100 of A-Z a-z 0-9 _ - .",
        ))
    }
}

/// Sends a signal to a run: its JSON body is the output of the `wait` that takes it.
#[utoipa::path(post, path = "/api/v1/runs/{id}/signals/{name}", operation_id = "signal_run", tag = "runs", params(("id" = String, Path, description = "the run's id"), ("name" = String, Path, description = "the signal's name")), request_body(content = Object, description = "the payload (any JSON)"), responses((status = 202, description = "stored: a wait of the run takes it", body = SignalSent), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 404, description = "not found", body = ApiErrorBody), (status = 409, description = "run_finished", body = ApiErrorBody), (status = 429, description = "too_many_signals: 100 wait already", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn signal(
    State(state): State<Shared>,
    caller: Option<Extension<Caller>>,
    Path((id, name)): Path<(String, String)>,
    JsonBody(payload): JsonBody<Value>,
) -> Result<(StatusCode, Json<SignalSent>), ApiError> {
    signal_name(&name)?;
    let by = RunAction::now(ActionKind::Signal, actor(caller)).with_detail(json!({"signal": name}));
    let sent = lifecycle::detached(async move {
        lifecycle::signal(&state, &RunId::from(id), &name, &payload, by).await
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(sent)))
}

/// A signal for the runs waiting with a key.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyedSignal {
    /// The key the runs wait with (`wait`'s `key`).
    pub key: String,
    /// The payload, the output of each `wait` that takes it.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Value,
}

/// The runs a keyed signal reached.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyedSignalSent {
    /// The signal's name.
    pub signal: String,
    /// The runs that waited for it with the key, woken.
    #[schema(value_type = Vec<String>)]
    pub run_ids: Vec<RunId>,
}

/// Sends a signal to every run waiting now for it with a key.
#[utoipa::path(post, path = "/api/v1/signals/{name}", operation_id = "signal_keyed", tag = "runs", params(("name" = String, Path, description = "the signal's name")), request_body = KeyedSignal, responses((status = 200, description = "the runs it reached (maybe none)", body = KeyedSignalSent), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn keyed_signal(
    State(state): State<Shared>,
    caller: Option<Extension<Caller>>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<KeyedSignal>,
) -> Result<Json<KeyedSignalSent>, ApiError> {
    signal_name(&name)?;
    if body.key.is_empty() || body.key.len() > 256 {
        return Err(ApiError::bad_request("key must be 1 to 256 bytes"));
    }
    let actor = actor(caller);
    let signal = name.clone();
    let run_ids = lifecycle::detached(async move {
        lifecycle::keyed_signal(&state, &signal, &body.key, &body.data, actor).await
    })
    .await?;
    Ok(Json(KeyedSignalSent {
        signal: name,
        run_ids,
    }))
}

/// Cancels a queued, waiting or running run.
#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", operation_id = "cancel_run", tag = "runs", params(("id" = String, Path, description = "its id")), responses((status = 200, description = "cancelled", body = RunState), (status = 202, description = "asked to stop; still running after 5 s", body = RunState), (status = 404, description = "not found", body = ApiErrorBody), (status = 409, description = "already finished", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn cancel(
    State(state): State<Shared>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<RunState>), ApiError> {
    let actor = actor(caller);
    let done =
        lifecycle::detached(
            async move { lifecycle::cancel(&state, &RunId::from(id), actor).await },
        )
        .await?;
    let code = if done.status.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((code, Json(done)))
}
