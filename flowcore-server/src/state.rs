//! What every part of a server process shares: its configuration, its engine and the
//! components it is made of, each store behind its port, so that the process can be composed
//! on any backend (SQL, Redis and S3 in the topology, memory in tests and embedders).

use std::sync::Arc;

use flowcore::cache::PlanCache;
use flowcore::ports::memory::{
    MemoryBlobStore, MemoryEventBus, MemoryFlowChanges, MemoryFlowStore, MemoryMetaStore,
    MemoryQueue, MemoryRateLimiter, MemoryRunSignals, MemoryRunStore,
};
use flowcore::ports::{
    ApiKeyStore, BlobStore, BusSink, CredentialStore, EventBus, FileStore, FlowChanges, FlowStore,
    Queue, RateLimiter, RunSignals, RunStore, UsageStore,
};
use flowcore::{CancellationToken, Engine, Registry};

use crate::admission::Admission;
use crate::config::Config;
use crate::credentials::Credentials;
use crate::hooks::WebhookIndex;
use crate::keyring::Keyring;
use crate::metrics::Metrics;
use crate::running::Running;
use crate::usage::Usage;

/// The stores a process is composed of, each behind its port.
#[derive(Clone)]
pub struct Stores {
    /// Flows and their versions.
    pub flows: Arc<dyn FlowStore>,
    /// Runs and their steps.
    pub runs: Arc<dyn RunStore>,
    /// API keys.
    pub api_keys: Arc<dyn ApiKeyStore>,
    /// Encrypted credentials.
    pub credentials: Arc<dyn CredentialStore>,
    /// Usage per flow and day.
    pub usage: Arc<dyn UsageStore>,
    /// Uploaded files' metadata.
    pub files: Arc<dyn FileStore>,
    /// Files' bytes and large outputs.
    pub blobs: Arc<dyn BlobStore>,
    /// Runs waiting for a worker.
    pub queue: Arc<dyn Queue>,
    /// Run events, for waiting and streaming.
    pub events: Arc<dyn EventBus>,
    /// Flow changes from every process.
    pub flow_changes: Arc<dyn FlowChanges>,
    /// Requests per client address and API key.
    pub limiter: Arc<dyn RateLimiter>,
    /// Cancel requests and run ends between processes.
    pub signals: Arc<dyn RunSignals>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

impl Stores {
    /// Every store in memory: one process, nothing kept past it (tests, demos, embedders).
    /// Not for a server strangers can reach: nothing prunes the memory run store, so every
    /// run's input and outputs stay until the process ends.
    pub fn memory() -> Self {
        let meta = Arc::new(MemoryMetaStore::new());
        Self {
            flows: Arc::new(MemoryFlowStore::new()),
            runs: Arc::new(MemoryRunStore::new()),
            api_keys: meta.clone(),
            credentials: meta.clone(),
            usage: meta.clone(),
            files: meta,
            blobs: Arc::new(MemoryBlobStore::new()),
            queue: Arc::new(MemoryQueue::default()),
            events: Arc::new(MemoryEventBus::default()),
            flow_changes: Arc::new(MemoryFlowChanges::default()),
            limiter: Arc::new(MemoryRateLimiter::new()),
            signals: Arc::new(MemoryRunSignals::default()),
        }
    }
}

/// What every request handler and background task shares.
pub struct AppState {
    /// The configuration.
    pub config: Config,
    /// Compiles and runs flows.
    pub engine: Engine,
    /// The stores.
    pub stores: Stores,
    /// Compiled flows.
    pub plans: PlanCache,
    /// Where the runs executing here emit their events: one background publisher for the
    /// process, so that events of concurrent runs share round trips to the bus.
    pub event_sink: Arc<BusSink>,
    /// Runs executing in this process.
    pub running: Running,
    /// This process's name as a lease owner.
    pub worker_name: String,
    /// Webhook paths to flows.
    pub webhooks: Arc<WebhookIndex>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Usage counters.
    pub usage: Arc<Usage>,
    /// Fired when this process shuts down and hands its unfinished runs back.
    pub hand_back: CancellationToken,
    /// Credentials, encrypted in their store.
    pub credentials: Credentials,
    /// Execution slots and the queue bound.
    pub admission: Admission,
    /// Resume URLs: made for templates, checked for `/webhooks/resume/`.
    pub resume: Arc<crate::resume::ResumeLinks>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The shared state handlers get.
pub type Shared = Arc<AppState>;

impl AppState {
    /// The state of a process: `config`, `stores`, the node types of `registry` and the
    /// credential keys of `keyring`. Call it within a tokio runtime (it starts the listeners of
    /// flow changes).
    pub fn new(config: Config, stores: Stores, registry: Registry, keyring: Keyring) -> Shared {
        let keyring = Arc::new(keyring);
        let credentials = Credentials::new(stores.credentials.clone(), keyring.clone());
        let resume = Arc::new(crate::resume::ResumeLinks::new(
            &config.public_url(),
            keyring,
        ));
        let limits = flowcore::Limits {
            run_timeout: std::time::Duration::from_secs(config.flow_timeout_seconds),
            max_output_bytes: usize::try_from(config.max_file_mb.saturating_mul(1024 * 1024))
                .unwrap_or(usize::MAX),
            max_run_log_bytes: usize::try_from(config.max_run_log_mb.saturating_mul(1024 * 1024))
                .unwrap_or(usize::MAX),
            ..flowcore::Limits::default()
        };
        let guard = config
            .http_guard
            .clone()
            .with_own_addresses(flowcore::net::own_addresses(config.bind.ip()));
        let engine = Engine::builder()
            .registry(registry)
            .limits(limits)
            .http_guard(guard)
            .flow_store(stores.flows.clone())
            .secrets(Arc::new(credentials.clone()))
            .resume_urls(resume.clone())
            .build();
        let plans = PlanCache::new(
            engine.clone(),
            stores.flows.clone(),
            Some(stores.flow_changes.clone()),
            10_000,
        );
        Arc::new(Self {
            worker_name: format!("{}-{}", std::process::id(), &flowcore::ids::new_id()[24..]),
            webhooks: WebhookIndex::new(&stores.flow_changes),
            usage: Arc::new(Usage::new(stores.usage.clone())),
            event_sink: Arc::new(BusSink::new(stores.events.clone())),
            admission: Admission::new(config.worker_concurrency, config.max_queued_runs),
            metrics: Arc::new(Metrics::new()),
            running: Running::default(),
            hand_back: CancellationToken::new(),
            credentials,
            resume,
            plans,
            engine,
            stores,
            config,
        })
    }
}
