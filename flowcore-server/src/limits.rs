//! The client address (seen through `NUMBER_OF_PROXIES` trusted proxies) and rate limits per
//! client address and per API key (`RATE_LIMIT_PER_MINUTE`), shared through the `RateLimiter`.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, StatusCode};
use flowcore::ports::RateLimiter;

use crate::error::ApiError;

/// The client's address: the peer, or, behind `proxies` trusted proxies, the address that many
/// hops back in `X-Forwarded-For`. Entries a client could have forged (further left) are never
/// used.
pub fn client_address(peer: Option<IpAddr>, headers: &HeaderMap, proxies: usize) -> String {
    let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
    if proxies == 0 {
        return peer;
    }
    let mut chain: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    chain.push(peer);
    // chain = [client?, ..., proxy_1_saw, peer]; each trusted proxy added one entry.
    let index = chain.len().saturating_sub(1 + proxies);
    chain.swap_remove(index)
}

/// The client address of a request (see [`client_address`]).
pub fn client_of(request: &Request, proxies: usize) -> String {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    client_address(peer, request.headers(), proxies)
}

/// Takes one request from `key`'s budget of `per_minute` (0: no limit); 429 `rate_limited`
/// with `Retry-After` and `message` past it. A limiter that does not answer lets the request
/// through rather than fail every request.
pub async fn take(
    limiter: &dyn RateLimiter,
    key: &str,
    per_minute: u32,
    message: &str,
) -> Result<(), ApiError> {
    if per_minute == 0 {
        return Ok(());
    }
    match limiter.check(key, per_minute).await {
        Ok(decision) if !decision.allowed => {
            let seconds = decision.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("{message}; retry in {seconds} s"),
            )
            .retry_after(seconds))
        }
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "rate limiter unavailable");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", value.parse().unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_trusted_only_as_deep_as_the_proxies() {
        let peer = Some("10.0.0.1".parse().unwrap());
        assert_eq!(
            client_address(peer, &xff("1.1.1.1"), 0),
            "10.0.0.1",
            "no proxies: the header is ignored"
        );
        assert_eq!(client_address(peer, &xff("1.1.1.1"), 1), "1.1.1.1");
        assert_eq!(
            client_address(peer, &xff("6.6.6.6, 1.1.1.1"), 1),
            "1.1.1.1",
            "a forged entry on the left is ignored"
        );
        assert_eq!(
            client_address(peer, &xff("6.6.6.6, 1.1.1.1, 10.0.0.2"), 2),
            "1.1.1.1"
        );
        assert_eq!(
            client_address(peer, &HeaderMap::new(), 1),
            "10.0.0.1",
            "no header: the peer"
        );
        assert_eq!(client_address(None, &HeaderMap::new(), 0), "unknown");
    }
}
