//! The flowcore server: configuration, the HTTP API and the composition of the stores into the
//! topology (`all`, `api`, `worker`). The `flowcore` binary is `src/main.rs`.

pub mod admission;
pub mod app;
pub mod auth;
pub mod background;
pub mod config;
pub mod credentials;
pub mod error;
pub mod keyring;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod schedules;
pub mod usage;
pub mod worker;

use std::sync::Arc;

use flowcore::Engine;
use flowcore::cache::PlanCache;
use flowcore::ports::memory::{
    MemoryEventBus, MemoryFlowChanges, MemoryQueue, MemoryRateLimiter, MemoryRunSignals,
};
use flowcore::ports::{EventBus, FlowChanges, FlowStore, Queue, RateLimiter, RunSignals};
use flowcore_store::{OpendalBlobStore, RedisConfig, RedisQueue, SqlConfig, SqlStore};

use crate::app::{AppState, Shared};
use crate::config::{Config, Role};
use crate::credentials::Credentials;
use crate::keyring::Keyring;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A store did not connect or migrate.
    #[error(transparent)]
    Store(#[from] flowcore::StoreError),
    /// The credential keys could not be loaded.
    #[error(transparent)]
    Keys(#[from] keyring::KeyError),
}

/// Connects to the database the configuration names and loads the credential keys (for the
/// commands that need only those).
pub async fn open_credentials(config: &Config) -> Result<(SqlStore, Credentials), StartError> {
    let mut sql_config = SqlConfig::new(config.database_url.clone());
    sql_config.pool_size = config.database_pool_size;
    let sql = SqlStore::connect(sql_config).await?;
    sql.migrate().await?;
    if config.encryption_key.is_none() && config.database_url.starts_with("postgres") {
        tracing::warn!(
            "FLOWCORE_ENCRYPTION_KEY is unset: credentials are encrypted with a key generated into \
             this machine's data dir, which other machines sharing the database cannot read"
        );
    }
    let keyring = Keyring::load(config.encryption_key.as_deref(), &config.data_dir)?;
    let credentials = Credentials::new(sql.clone(), Arc::new(keyring));
    Ok((sql, credentials))
}

/// Connects the stores the configuration names (migrating the database) and builds the state.
pub async fn build_state(config: Config) -> Result<Shared, StartError> {
    let (sql, credentials) = open_credentials(&config).await?;
    let blobs = OpendalBlobStore::open(&config.storage)?;
    type Backends = (
        Arc<dyn Queue>,
        Arc<dyn FlowChanges>,
        Arc<dyn EventBus>,
        Arc<dyn RateLimiter>,
        Arc<dyn RunSignals>,
    );
    let (queue, changes, events, limiter, signals): Backends = match &config.redis_url {
        Some(url) => {
            let mut redis = RedisConfig::new(url.clone());
            redis.prefix = config.redis_prefix.clone();
            // An api process leases no jobs; a worker answers no waiting requests (its API
            // still works: a waiter there reads the store every second). Every other message
            // of those channels would be sent to it for nothing.
            redis.hear_enqueues = config.role != Role::Api;
            redis.hear_finished_runs = config.role != Role::Worker;
            let queue = RedisQueue::connect(redis).await?;
            (
                Arc::new(queue.clone()),
                Arc::new(queue.flow_changes()),
                Arc::new(queue.event_bus()),
                Arc::new(queue.rate_limiter()),
                Arc::new(queue.run_signals()),
            )
        }
        None => (
            Arc::new(MemoryQueue::default()),
            Arc::new(MemoryFlowChanges::default()),
            Arc::new(MemoryEventBus::default()),
            Arc::new(MemoryRateLimiter::new()),
            Arc::new(MemoryRunSignals::default()),
        ),
    };
    let limits = flowcore::Limits {
        run_timeout: std::time::Duration::from_secs(config.flow_timeout_seconds),
        max_output_bytes: usize::try_from(config.max_file_mb.saturating_mul(1024 * 1024))
            .unwrap_or(usize::MAX),
        max_run_log_bytes: usize::try_from(config.max_run_log_mb.saturating_mul(1024 * 1024))
            .unwrap_or(usize::MAX),
        ..flowcore::Limits::default()
    };
    let flows: Arc<dyn FlowStore> = Arc::new(sql.clone());
    let guard = config
        .http_guard
        .clone()
        .with_own_addresses(flowcore::net::own_addresses(config.bind.ip()));
    let engine = Engine::builder()
        .limits(limits)
        .http_guard(guard)
        .flow_store(flows.clone())
        .secrets(Arc::new(credentials.clone()))
        .build();
    let webhooks = routes::webhooks::WebhookIndex::new(&changes);
    let plans = PlanCache::new(engine.clone(), flows, Some(changes.clone()), 10_000);
    let (config_slots, config_queued) = (config.worker_concurrency, config.max_queued_runs);
    let worker_name = format!("{}-{}", std::process::id(), &flowcore::ids::new_id()[24..]);
    let usage = Arc::new(usage::Usage::new(sql.clone()));
    Ok(Arc::new(AppState {
        config,
        engine,
        run_store: Arc::new(sql.clone()),
        sql,
        plans,
        queue,
        blobs,
        event_sink: Arc::new(flowcore::ports::BusSink::new(events.clone())),
        events,
        running: crate::worker::Running::default(),
        worker_name,
        webhooks,
        metrics: Arc::new(metrics::Metrics::new()),
        limiter,
        usage,
        flow_changes: changes,
        signals,
        hand_back: flowcore::CancellationToken::new(),
        admission: admission::Admission::new(config_slots, config_queued),
        credentials,
    }))
}
