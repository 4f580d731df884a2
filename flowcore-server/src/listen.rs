//! The accept loop: HTTP/1.1 connections under a cap, with a header-read timeout that also ends
//! idle kept-alive connections, and a graceful stop.
//!
//! `axum::serve` takes every connection the kernel gives it and never times one out, so a few
//! hundred idle sockets could use up the process's descriptors and stall `/healthz` (seen). Here
//! a connection past `FLOWCORE_MAX_CONNECTIONS` waits in the listen backlog, a client has
//! `FLOWCORE_HEADER_TIMEOUT_SECONDS` to send each request's headers (counted from the end of the
//! previous request on a kept-alive connection), and a request body that pauses longer than
//! `FLOWCORE_IDLE_TIMEOUT_SECONDS` fails (`RequestBodyTimeoutLayer`, in the router).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How connections are bounded.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at most (`FLOWCORE_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Time to send a request's headers, and to send the next one on an idle connection
    /// (`FLOWCORE_HEADER_TIMEOUT_SECONDS`).
    pub header_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits of `config`, the cap kept under the process's descriptor limit (a quarter
    /// of the descriptors stay for the database, Redis, files and outbound calls).
    pub fn from_config(config: &crate::config::Config, descriptors: u64) -> Self {
        let room = usize::try_from(descriptors.saturating_mul(3) / 4).unwrap_or(usize::MAX);
        Self {
            max_connections: config.max_connections.min(room.max(16)),
            header_timeout: Duration::from_secs(config.header_timeout_seconds),
        }
    }
}

/// Raises the soft limit of open descriptors to the hard limit (a common default soft limit is
/// 1,024, too few for a server); returns the limit in force.
pub fn raise_descriptor_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// Serves `app` on `listener` until `stop`; then stops accepting, lets each connection finish
/// its request in progress, and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors (or a connection reset before accept): wait a moment
                    // rather than spin on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service =
            app.clone()
                .map_request(move |request: hyper::Request<hyper::body::Incoming>| {
                    let mut request = request.map(axum::body::Body::new);
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request
                });
        let service = hyper_util::service::TowerToHyperService::new(service);
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
}
