//! Route handlers, one module per resource, and the HTTP face of the run lifecycle's errors.

pub mod api_keys;
pub mod credentials;
pub mod events;
pub mod files;
pub mod flows;
pub mod meta;
pub mod runs;
pub mod usage;
pub mod webhooks;

use axum::http::StatusCode;

use crate::admission::Overloaded;
use crate::error::ApiError;
use crate::lifecycle::RunError;

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
                Self::new(StatusCode::CONFLICT, "already_finished", e.to_string())
            }
        }
    }
}
