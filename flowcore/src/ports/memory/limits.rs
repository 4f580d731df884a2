//! Rate limits within the process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;

use super::lock;
use crate::ports::{RateDecision, RateLimiter, StoreResult};

/// The generic cell rate algorithm (GCRA) over one "theoretical arrival time" per key: a limit of
/// N per minute allows a burst of N and then one request every 60/N seconds. The Redis limiter
/// runs the same arithmetic in a Lua script.
pub fn gcra(tat_ms: Option<i64>, now_ms: i64, per_minute: u32) -> (RateDecision, i64) {
    let interval = 60_000 / i64::from(per_minute.max(1));
    let burst = interval * i64::from(per_minute.max(1));
    let tat = tat_ms.unwrap_or(now_ms).max(now_ms);
    let new_tat = tat + interval;
    let allow_at = new_tat - burst;
    if allow_at > now_ms {
        let wait = Duration::from_millis(u64::try_from(allow_at - now_ms).unwrap_or(0));
        return (
            RateDecision {
                allowed: false,
                retry_after: wait,
                remaining: 0,
            },
            tat,
        );
    }
    let remaining = u32::try_from((now_ms - allow_at) / interval).unwrap_or(0);
    (
        RateDecision {
            allowed: true,
            retry_after: Duration::ZERO,
            remaining,
        },
        new_tat,
    )
}

/// An in-process rate limiter (per process; the Redis one is shared by all API servers).
#[derive(Debug, Default)]
pub struct MemoryRateLimiter {
    tats: Mutex<HashMap<String, i64>>,
}

impl MemoryRateLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn check(&self, key: &str, per_minute: u32) -> StoreResult<RateDecision> {
        if per_minute == 0 {
            return Ok(RateDecision {
                allowed: true,
                retry_after: Duration::ZERO,
                remaining: u32::MAX,
            });
        }
        let now = Utc::now().timestamp_millis();
        let mut tats = lock(&self.tats);
        // Keys whose window has passed carry no state: drop them so the map stays small.
        if tats.len() > 100_000 {
            tats.retain(|_, tat| *tat > now);
        }
        let (decision, tat) = gcra(tats.get(key).copied(), now, per_minute);
        tats.insert(key.to_owned(), tat);
        Ok(decision)
    }
}
