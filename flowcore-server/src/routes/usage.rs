//! `GET /api/v1/usage?flow_id=&from=&to=`: runs, node executions and tokens by flow and day
//! (UTC, `YYYY-MM-DD`, inclusive; the last 30 days by default). Counts reach the database
//! within a second (see [`crate::usage`]).

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{Duration, NaiveDate, Utc};
use flowcore::ports::UsageStore;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::Shared;
use crate::error::ApiError;
#[allow(unused_imports)]
use crate::openapi::*;

/// The usage route.
pub fn router() -> Router<Shared> {
    Router::new().route("/usage", get(usage))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsageQuery {
    #[serde(default)]
    flow_id: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
}

fn day(value: Option<String>, default: NaiveDate, name: &str) -> Result<NaiveDate, ApiError> {
    match value {
        None => Ok(default),
        Some(v) => NaiveDate::parse_from_str(&v, "%Y-%m-%d")
            .map_err(|_| ApiError::bad_request(format!("{name} must be a day as YYYY-MM-DD"))),
    }
}

/// Usage by flow and day.
#[utoipa::path(get, path = "/api/v1/usage", operation_id = "usage", tag = "usage", params(("flow_id" = Option<String>, Query), ("from" = Option<String>, Query, description = "YYYY-MM-DD"), ("to" = Option<String>, Query, description = "YYYY-MM-DD")), responses((status = 200, description = "runs, node executions and tokens by flow and day", body = Object), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn usage(
    State(state): State<Shared>,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if q.flow_id
        .as_deref()
        .is_some_and(|f| !flowcore::model::is_valid_id(f))
    {
        return Err(ApiError::bad_request(
            "flow_id is not 1 to 64 of A-Z a-z 0-9 _ -",
        ));
    }
    let today = Utc::now().date_naive();
    let to = day(q.to, today, "to")?;
    let from = day(q.from, to - Duration::days(29), "from")?;
    if from > to || (to - from).num_days() > 366 {
        return Err(ApiError::bad_request(
            "from must be before to, at most 366 days apart",
        ));
    }
    let days = state
        .sql
        .usage(
            q.flow_id.as_deref(),
            &from.format("%Y-%m-%d").to_string(),
            &to.format("%Y-%m-%d").to_string(),
        )
        .await?;
    Ok(Json(json!({
        "from": from, "to": to, "items": days,
        "quota": {"runs_per_flow_per_day": (state.config.quota_runs_per_day > 0).then_some(state.config.quota_runs_per_day)},
    })))
}
