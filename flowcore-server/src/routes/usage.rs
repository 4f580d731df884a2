//! `GET /api/v1/usage?flow_id=&from=&to=`: runs, node executions and tokens by flow and day
//! (UTC, `YYYY-MM-DD`, inclusive; the last 30 days by default). Counts reach the database
//! within a second (see [`crate::usage`]).

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{Duration, NaiveDate, Utc};
use flowcore::ports::{self, UsageDay};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiErrorBody};
use crate::state::Shared;

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

/// Usage by flow and day.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    /// The first day.
    #[schema(value_type = String, format = Date)]
    pub from: NaiveDate,
    /// The last day.
    #[schema(value_type = String, format = Date)]
    pub to: NaiveDate,
    /// `{flow_id, day, runs, node_executions, tokens, models: [{model, prompt_tokens,
    /// completion_tokens}]}` per flow and day with any.
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<UsageDay>,
    /// The quotas in force.
    pub quota: Quota,
}

/// The quotas in force (`null`: none).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Quota {
    /// `FLOWCORE_QUOTA_RUNS_PER_DAY`.
    pub runs_per_flow_per_day: Option<u64>,
    /// `FLOWCORE_QUOTA_TOKENS_PER_DAY`.
    pub tokens_per_flow_per_day: Option<u64>,
}

fn day(value: Option<String>, default: NaiveDate, name: &str) -> Result<NaiveDate, ApiError> {
    match value {
        None => Ok(default),
        Some(v) => NaiveDate::parse_from_str(&v, "%Y-%m-%d")
            .map_err(|_| ApiError::bad_request(format!("{name} must be a day as YYYY-MM-DD"))),
    }
}

/// Usage by flow and day.
#[utoipa::path(get, path = "/api/v1/usage", operation_id = "usage", tag = "usage", params(("flow_id" = Option<String>, Query), ("from" = Option<String>, Query, description = "YYYY-MM-DD"), ("to" = Option<String>, Query, description = "YYYY-MM-DD")), responses((status = 200, description = "runs, node executions and tokens by flow and day", body = UsageReport), (status = 400, description = "invalid input", body = ApiErrorBody), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub(crate) async fn usage(
    State(state): State<Shared>,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<UsageReport>, ApiError> {
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
    let items = state
        .stores
        .usage
        .usage(&ports::UsageQuery {
            flow_id: q.flow_id,
            from_day: from.format("%Y-%m-%d").to_string(),
            to_day: to.format("%Y-%m-%d").to_string(),
        })
        .await?;
    let (runs, tokens) = (
        state.config.quota_runs_per_day,
        state.config.quota_tokens_per_day,
    );
    Ok(Json(UsageReport {
        from,
        to,
        items,
        quota: Quota {
            runs_per_flow_per_day: (runs > 0).then_some(runs),
            tokens_per_flow_per_day: (tokens > 0).then_some(tokens),
        },
    }))
}
