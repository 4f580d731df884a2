//! Rate limits shared by every process on one backend.

use std::time::Duration;

use async_trait::async_trait;

use super::StoreResult;

/// A rate limiter's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request may go on.
    pub allowed: bool,
    /// When refused: how long until the next request would be allowed (for `Retry-After`).
    pub retry_after: Duration,
    /// Requests left in the current window (approximate).
    pub remaining: u32,
}

/// Counts requests per key (a client address, an API key) against a per-minute limit, shared by
/// every process that uses the same backend.
#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Takes one request for `key` under `per_minute` (0 means no limit).
    async fn check(&self, key: &str, per_minute: u32) -> StoreResult<RateDecision>;
}
