//! Rate limiters.

use std::sync::Arc;
use std::time::Duration;

/// A rate limiter: a burst up to the limit, then refusals with a `retry_after`, keys apart,
/// 0 = no limit, and concurrent requests never exceed the limit.
pub async fn rate_limiter(limiter: Arc<dyn crate::ports::RateLimiter>) {
    let key = format!("kit-{}", crate::ids::new_id());
    for i in 0..10 {
        let d = limiter.check(&key, 10).await.expect("check");
        assert!(d.allowed, "request {i} of a burst of 10 is allowed");
    }
    let refused = limiter.check(&key, 10).await.expect("check");
    assert!(!refused.allowed, "the 11th request in a minute is refused");
    assert!(
        refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(6),
        "retry after about one interval (6 s): {:?}",
        refused.retry_after
    );
    assert!(
        limiter
            .check(&format!("{key}-other"), 10)
            .await
            .expect("check")
            .allowed,
        "keys are apart"
    );
    assert!(
        limiter.check(&key, 0).await.expect("check").allowed,
        "0 means no limit"
    );

    let shared = format!("kit-{}", crate::ids::new_id());
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (limiter, shared) = (limiter.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            limiter.check(&shared, 25).await.expect("check").allowed
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += usize::from(t.await.expect("task"));
    }
    assert_eq!(allowed, 25, "concurrent requests get exactly the limit");
}
