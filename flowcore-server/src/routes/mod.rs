//! Route handlers, one module per resource, and the HTTP face of the run lifecycle's errors.

pub mod api_keys;
pub mod credentials;
pub mod events;
pub mod files;
pub mod flows;
pub mod meta;
pub mod resume;
pub mod runs;
pub mod usage;
pub mod webhooks;

use axum::http::StatusCode;
use serde::Serialize;

use crate::admission::Overloaded;
use crate::error::ApiError;
use crate::lifecycle::RunError;

/// A page of a listing, newest first, with the cursor of the next one.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The `cursor` of the next page, when there is one.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page of the store's, its items shown as `T`.
    pub fn of<S>(page: flowcore::ports::Page<S>, show: impl FnMut(S) -> T) -> Self {
        Self {
            items: page.items.into_iter().map(show).collect(),
            next_cursor: page.next_cursor,
        }
    }
}

impl From<Overloaded> for ApiError {
    fn from(e: Overloaded) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string()).retry_after(1)
    }
}

impl From<RunError> for ApiError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Store(e) => e.into(),
            RunError::Flow(e) => e.into(),
            RunError::Overloaded(e) => e.into(),
            RunError::QuotaExceeded { .. } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                e.to_string(),
            ),
            RunError::AlreadyFinished(_) => {
                Self::new(StatusCode::CONFLICT, "run_finished", e.to_string())
            }
            RunError::SignalTooLarge(_) => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                e.to_string(),
            ),
            RunError::NotFinished(_) => {
                Self::new(StatusCode::CONFLICT, "run_not_finished", e.to_string())
            }
            RunError::Pruned(_) => Self::new(StatusCode::CONFLICT, "run_pruned", e.to_string()),
            RunError::CannotRerun(_) | RunError::Placement(_) => Self::bad_request(e.to_string()),
            RunError::TooManySignals(_) => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_signals",
                e.to_string(),
            ),
        }
    }
}
