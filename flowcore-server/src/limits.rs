//! The client address (seen through `NUMBER_OF_PROXIES` trusted proxies) and rate limits per
//! client address and per API key (`RATE_LIMIT_PER_MINUTE`), shared through the `RateLimiter`.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::app::Shared;
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

/// Refuses with 429 and `Retry-After` when the client address or the presented API key is over
/// its per-minute limit.
pub async fn rate_limit(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let limit = state.config.rate_limit_per_minute;
    if limit == 0 {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let address = client_address(peer, request.headers(), state.config.number_of_proxies);
    let mut keys = vec![format!("ip:{address}")];
    if let Some(key) = crate::app::presented_key(request.headers()) {
        // A prefix of the key is enough to tell keys apart and keeps secrets out of Redis.
        keys.push(format!("key:{}", key.chars().take(16).collect::<String>()));
    }
    for key in keys {
        match state.limiter.check(&key, limit).await {
            Ok(decision) if !decision.allowed => {
                let seconds = decision.retry_after.as_secs_f64().ceil().max(1.0) as u64;
                let mut response = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("too many requests; retry in {seconds} s"),
                )
                .into_response();
                if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
                    response
                        .headers_mut()
                        .insert(axum::http::header::RETRY_AFTER, v);
                }
                return response;
            }
            Ok(_) => {}
            // The limiter's store is down: let traffic through rather than fail every request.
            Err(e) => tracing::warn!(error = %e, "rate limiter unavailable"),
        }
    }
    next.run(request).await
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
