//! The flowcore server: configuration, the HTTP API and the composition of the stores into the
//! topology (`all`, `api`, `worker`). The `flowcore` binary is `src/main.rs`.
//!
//! The server is built on the ports of `flowcore`: [`build_state`] composes the stores that
//! the configuration names (SQL, Redis, opendal), and [`build_state_with`] takes any
//! [`Stores`] and any [`flowcore::Registry`], so an embedder can serve its own node types on its
//! own backends:
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use flowcore_server::{config::Config, state::Stores};
//! let config = Config::from_env()?;
//! let registry = flowcore::Registry::with_builtins(); // .register(...) your node types
//! let state = flowcore_server::build_state_with(config, Stores::memory(), registry)?;
//! let router = flowcore_server::app::app(state);
//! # Ok(()) }
//! ```

pub mod admission;
pub mod app;
pub mod archive;
pub mod auth;
pub mod background;
pub mod config;
pub mod console;
pub mod credentials;
pub mod error;
pub mod hooks;
pub mod keyring;
pub mod lifecycle;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod openapi;
pub mod replay;
pub mod resume;
pub mod retention;
pub mod routes;
pub mod running;
pub mod schedules;
pub mod state;
pub mod usage;
pub mod worker;

use std::sync::Arc;

use flowcore::ports::memory::{
    MemoryEventBus, MemoryFlowChanges, MemoryQueue, MemoryRateLimiter, MemoryRunSignals,
};
use flowcore::{CancellationToken, Registry};
use flowcore_store::{OpendalBlobStore, RedisConfig, RedisQueue, SqlConfig, SqlStore};

use crate::config::{Config, Role};
use crate::credentials::Credentials;
use crate::keyring::Keyring;
pub use crate::state::{AppState, Shared, Stores};

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

/// Connects to the database the configuration names (migrating it).
async fn open_sql(config: &Config) -> Result<SqlStore, StartError> {
    let mut sql_config = SqlConfig::new(config.database_url.as_str());
    sql_config.pool_size = config.database_pool_size;
    let sql = SqlStore::connect(sql_config).await?;
    sql.migrate().await?;
    if config.encryption_key.is_none() && config.database_url.starts_with("postgres") {
        tracing::warn!(
            "FLOWCORE_ENCRYPTION_KEY is unset: credentials are encrypted with a key generated into \
             this machine's data dir, which other machines sharing the database cannot read"
        );
    }
    Ok(sql)
}

/// The credential keys the configuration names (`FLOWCORE_ENCRYPTION_KEY`, else a key
/// generated into the data dir).
pub fn load_keyring(config: &Config) -> Result<Keyring, StartError> {
    Ok(Keyring::load(
        config.encryption_key.as_deref(),
        &config.data_dir,
    )?)
}

/// Connects to the database the configuration names and loads the credential keys (for the
/// commands that need only those).
pub async fn open_credentials(config: &Config) -> Result<(SqlStore, Credentials), StartError> {
    let sql = open_sql(config).await?;
    let credentials = Credentials::new(Arc::new(sql.clone()), Arc::new(load_keyring(config)?));
    Ok((sql, credentials))
}

/// The stores the configuration names: the SQL database for the records, Redis (when
/// `REDIS_URL` is set) for the queue, events, rate limits and signals between processes, else
/// their in-process twins, and the blob store of `STORAGE_TYPE`.
pub async fn open_stores(config: &Config) -> Result<Stores, StartError> {
    let sql = open_sql(config).await?;
    let mut stores = Stores {
        flows: Arc::new(sql.clone()),
        runs: Arc::new(sql.clone()),
        api_keys: Arc::new(sql.clone()),
        credentials: Arc::new(sql.clone()),
        usage: Arc::new(sql.clone()),
        files: Arc::new(sql),
        blobs: Arc::new(OpendalBlobStore::open(&config.storage)?),
        queue: Arc::new(MemoryQueue::default()),
        events: Arc::new(MemoryEventBus::default()),
        flow_changes: Arc::new(MemoryFlowChanges::default()),
        limiter: Arc::new(MemoryRateLimiter::new()),
        signals: Arc::new(MemoryRunSignals::default()),
    };
    if let Some(url) = &config.redis_url {
        let mut redis = RedisConfig::new(url.as_str());
        redis.prefix = config.redis_prefix.clone();
        // An api process leases no jobs; a worker answers no waiting requests (its API still
        // works: a waiter there reads the store every second). Every other message of those
        // channels would be sent to it for nothing.
        redis.hear_enqueues = config.role != Role::Api;
        redis.hear_finished_runs = config.role != Role::Worker;
        let queue = RedisQueue::connect(redis).await?;
        stores.flow_changes = Arc::new(queue.flow_changes());
        stores.events = Arc::new(queue.event_bus());
        stores.limiter = Arc::new(queue.rate_limiter());
        stores.signals = Arc::new(queue.run_signals());
        stores.queue = Arc::new(queue);
    }
    Ok(stores)
}

/// Connects the stores the configuration names (migrating the database) and builds the state,
/// with the built-in node types.
pub async fn build_state(config: Config) -> Result<Shared, StartError> {
    let stores = open_stores(&config).await?;
    build_state_with(config, stores, Registry::with_builtins())
}

/// The state of a process on any `stores`, serving the node types of `registry`. Call it within
/// a tokio runtime.
pub fn build_state_with(
    config: Config,
    stores: Stores,
    registry: Registry,
) -> Result<Shared, StartError> {
    let keyring = load_keyring(&config)?;
    Ok(AppState::new(config, stores, registry, keyring))
}

/// Serves `state` on its `FLOWCORE_BIND` address, with the background work of its role
/// (executing runs, recovering them, schedules, usage), until `stop` fires; then stops taking
/// runs, lets the running ones finish within `FLOWCORE_SHUTDOWN_GRACE_SECONDS` while requests
/// drain, and hands the rest back to the queue. Returns how many runs were handed back.
pub async fn serve(state: Shared, stop: CancellationToken) -> std::io::Result<usize> {
    let bind = state.config.bind;
    let descriptors = listen::raise_descriptor_limit();
    let limits = listen::ConnectionLimits::from_config(&state.config, descriptors);
    let listener = tokio::net::TcpListener::bind(bind).await?;
    // The address bound (port 0 in FLOWCORE_BIND picks a free one: this says which).
    let bound = listener.local_addr().unwrap_or(bind);
    // One line (the log's), not a second one printed beside it.
    tracing::info!(
        max_connections = limits.max_connections,
        descriptors,
        "flowcore listening on http://{bound}"
    );
    if state.config.public_url.is_none() && bind.ip().is_unspecified() {
        tracing::warn!(
            "FLOWCORE_PUBLIC_URL is not set: resume URLs point at http://{bind}, which nobody \
             reaches; set it to the address users reach the server at"
        );
    }
    if state.config.role != Role::Worker && state.config.admin_key.is_none() {
        match state.stores.api_keys.list_api_keys().await {
            Ok(keys) if keys.iter().all(|k| k.revoked_at.is_some()) => tracing::warn!(
                "no API key exists and FLOWCORE_ADMIN_KEY is not set: every /api/ call and \
                 the console at http://{bound}/ui/ answer 401. Set FLOWCORE_ADMIN_KEY, or run \
                 `flowcore api-key create` with this DATABASE_URL"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not list the API keys"),
        }
    }
    let grace = std::time::Duration::from_secs(state.config.shutdown_grace_seconds);
    let background = background::start(&state);
    // The background stops (runs finish or are handed back) while the server drains requests.
    let stopping = tokio::spawn({
        let stop = stop.clone();
        async move {
            stop.cancelled().await;
            background.stop(grace).await
        }
    });
    listen::serve(listener, app::app(state), limits, stop.clone()).await;
    stop.cancel();
    Ok(stopping.await.unwrap_or(0))
}
