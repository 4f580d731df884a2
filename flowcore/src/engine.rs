//! The scheduler: executes a compiled [`Plan`] on tokio.
//!
//! One run is one driver future. Nodes that are ready execute concurrently inside it (a
//! `FuturesUnordered`), so a node costs a boxed future and a wake-up rather than a spawned task;
//! the engine's many runs spread over the runtime's threads, and blocking nodes (scripts) move
//! their work to the blocking pool. The plan is never changed: a run keeps its own counters.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::{CompileError, Error, NodeError};
use crate::event::{EventSink, RunEvent};
use crate::expr::NodeOutputs;
use crate::ids::RunId;
use crate::model::{FlowDef, OnError};
use crate::node::{NodeContext, Registry};
use crate::plan::{ERROR_PORT, Plan, compile};
use crate::ports::FlowStore;
use crate::ports::memory::MemoryFlowStore;
use crate::run::{RunResult, RunStatus, SignalInbox, StepRecord, StepRecorder, StepStatus};
use crate::secret::{Scrubber, SecretSource};
use crate::wait::{Parked, ResumeUrls, Wait};

/// Limits the engine enforces on every run.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A run's time limit (`FLOW_TIMEOUT_SECONDS`, 600 s). A flow's `settings.timeout_seconds`
    /// may lower it, not raise it.
    pub run_timeout: Duration,
    /// The largest output of one step, as serialized JSON (`MAX_FILE_SIZE_MB`, 25 MB).
    pub max_output_bytes: usize,
    /// How many nodes may execute at once across all runs of this engine; `None` for no limit.
    pub max_concurrent_nodes: Option<usize>,
    /// How deep subflows may nest.
    pub max_subflow_depth: u32,
    /// The most a run may store as step outputs in all, as serialized JSON
    /// (`MAX_RUN_LOG_SIZE_MB`, 50 MB); a node whose output would pass it fails.
    pub max_run_log_bytes: usize,
    /// The most heap a `script` may hold at once, its copies of `input` and `nodes` included
    /// (256 MB); it is stopped past it. Counted only where
    /// [`memory::Counting`](crate::memory::Counting) is the global allocator.
    pub max_node_memory_bytes: usize,
    /// How many subflow runs one run may start in all, at every depth (1,000): a flow calling
    /// itself twice per run would otherwise start 2^depth runs.
    pub max_subflow_runs: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            run_timeout: Duration::from_secs(600),
            max_output_bytes: 25 * 1024 * 1024,
            max_concurrent_nodes: None,
            max_subflow_depth: 8,
            max_run_log_bytes: 50 * 1024 * 1024,
            max_node_memory_bytes: 256 * 1024 * 1024,
            max_subflow_runs: 1000,
        }
    }
}

/// Builds an [`Engine`].
#[derive(Default)]
pub struct EngineBuilder {
    registry: Option<Registry>,
    limits: Limits,
    flows: Option<Arc<dyn FlowStore>>,
    secrets: Option<Arc<dyn SecretSource>>,
    guard: Option<crate::net::Guard>,
    resume_urls: Option<Arc<dyn ResumeUrls>>,
}

impl fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl EngineBuilder {
    /// The node types (default: [`Registry::with_builtins`]).
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }
    /// The limits (default: [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
    /// Where `subflow` nodes find flows (default: an empty in-memory store).
    pub fn flow_store(mut self, flows: Arc<dyn FlowStore>) -> Self {
        self.flows = Some(flows);
        self
    }
    /// Where nodes get credentials (default: none; nodes asking for one fail).
    pub fn secrets(mut self, secrets: Arc<dyn SecretSource>) -> Self {
        self.secrets = Some(secrets);
        self
    }
    /// What makes the runs' resume URLs (`run.resume_urls.<signal>` in templates; default:
    /// none, and templates see no `resume_urls`).
    pub fn resume_urls(mut self, urls: Arc<dyn ResumeUrls>) -> Self {
        self.resume_urls = Some(urls);
        self
    }
    /// Where nodes may connect (default: [`Guard::default`](crate::net::Guard::default), which
    /// denies loopback, link-local, private and unspecified addresses).
    pub fn http_guard(mut self, guard: crate::net::Guard) -> Self {
        self.guard = Some(guard);
        self
    }
    /// The engine.
    pub fn build(self) -> Engine {
        let permits = self
            .limits
            .max_concurrent_nodes
            .map(|n| Arc::new(Semaphore::new(n.max(1))));
        Engine(Arc::new(EngineInner {
            registry: self.registry.unwrap_or_else(Registry::with_builtins),
            limits: self.limits,
            permits,
            flows: self
                .flows
                .unwrap_or_else(|| Arc::new(MemoryFlowStore::new())),
            secrets: self.secrets,
            resume_urls: self.resume_urls,
            guard: Arc::new(self.guard.unwrap_or_default()),
            stored_plans: std::sync::Mutex::default(),
            #[cfg(feature = "http")]
            http: std::sync::OnceLock::new(),
        }))
    }
}

/// Compiled stored flows by id, version and creation time.
type StoredPlans = std::collections::HashMap<(String, u32, DateTime<Utc>), Plan>;

/// How many compiled stored flows an engine keeps for `subflow`.
const STORED_PLANS: usize = 1024;

/// Compiles flows and executes runs. Cheap to clone; clones share limits and concurrency.
#[derive(Clone)]
pub struct Engine(Arc<EngineInner>);

struct EngineInner {
    registry: Registry,
    limits: Limits,
    permits: Option<Arc<Semaphore>>,
    flows: Arc<dyn FlowStore>,
    secrets: Option<Arc<dyn SecretSource>>,
    resume_urls: Option<Arc<dyn ResumeUrls>>,
    guard: Arc<crate::net::Guard>,
    stored_plans: std::sync::Mutex<StoredPlans>,
    /// The HTTP client of this engine's nodes, made on first use (it resolves names through
    /// the guard).
    #[cfg(feature = "http")]
    http: std::sync::OnceLock<Result<reqwest::Client, String>>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("registry", &self.0.registry)
            .field("limits", &self.0.limits)
            .finish()
    }
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

/// How to execute one run; every field is optional.
#[derive(Default)]
pub struct RunOptions {
    /// The run's id (default: a fresh one).
    pub run_id: Option<RunId>,
    /// Receives the run's events.
    pub events: Option<Arc<dyn EventSink>>,
    /// Receives every finished step before the nodes after it start.
    pub recorder: Option<Arc<dyn StepRecorder>>,
    /// Steps finished by an earlier execution of this run: they are not executed again.
    pub resume: Vec<StepRecord>,
    /// Cancels the run from outside.
    pub cancel: Option<CancellationToken>,
    /// Overrides the run's time limit.
    pub timeout: Option<Duration>,
    /// What started the run, seen by templates as `trigger` (`null` when absent).
    pub trigger: Option<Value>,
    /// Where `wait` nodes take their signals. With it, a node that must wait parks the run
    /// (it ends as `waiting`, see [`crate::wait`]); without it, `wait` fails and `delay`
    /// sleeps in place. [`crate::durable::execute`] sets it.
    pub signals: Option<Arc<dyn SignalInbox>>,
    /// The state of the run when it last parked (its waits' deadlines, the time it executed),
    /// for a run that executes again after waiting.
    pub parked: Option<Parked>,
    /// When the run started (default: now): the `subflow` and `map` children of the run tree
    /// execute their flow's version that was current then ([`FlowStore::get_as_of`]), however
    /// often the run parks and resumes. [`crate::durable::execute`] sets the run's creation.
    ///
    /// [`FlowStore::get_as_of`]: crate::ports::FlowStore::get_as_of
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunOptions")
            .field("run_id", &self.run_id)
            .field("events", &self.events.is_some())
            .field("recorder", &self.recorder.is_some())
            .field("resume", &self.resume.len())
            .field("timeout", &self.timeout)
            .field("signals", &self.signals.is_some())
            .field("parked", &self.parked)
            .finish()
    }
}

/// A run started with [`Engine::start`].
#[derive(Debug)]
pub struct RunHandle {
    run_id: RunId,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<RunResult>,
}

impl RunHandle {
    /// The run's id.
    pub fn run_id(&self) -> &RunId {
        &self.run_id
    }
    /// Cancels the run: running nodes are stopped and the run ends as `cancelled`.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
    /// The run's cancellation token.
    pub fn cancellation_token(&self) -> &CancellationToken {
        &self.cancel
    }
    /// Waits for the run's result.
    pub async fn wait(self) -> RunResult {
        let now = Utc::now();
        match self.task.await {
            Ok(result) => result,
            Err(e) => RunResult {
                run_id: self.run_id,
                status: RunStatus::Failed,
                output: None,
                error: Some(format!("the run's task ended abnormally: {e}")),
                steps: Vec::new(),
                waits: Vec::new(),
                started_at: now,
                finished_at: now,
            },
        }
    }
}

impl Engine {
    /// An engine with the built-in nodes, default limits and an in-memory flow store.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let engine = flowcore::Engine::new();
    /// let plan = engine.compile_json(r#"{"nodes": [{"id": "a", "type": "template", "params": {"template": "hi {{ input.who }}"}}]}"#).unwrap();
    /// let result = engine.run(&plan, serde_json::json!({"who": "you"})).await;
    /// assert_eq!(result.output, Some(serde_json::json!("hi you")));
    /// # });
    /// ```
    pub fn new() -> Self {
        Self::builder().build()
    }
    /// A builder to set the registry, limits and flow store.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }
    /// The node types.
    pub fn registry(&self) -> &Registry {
        &self.0.registry
    }
    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.0.limits
    }
    /// Where nodes get credentials, if anywhere.
    pub fn secrets(&self) -> Option<&Arc<dyn SecretSource>> {
        self.0.secrets.as_ref()
    }
    /// Where nodes may connect.
    pub fn http_guard(&self) -> &Arc<crate::net::Guard> {
        &self.0.guard
    }
    /// The HTTP client nodes call out with: no environment proxies, no redirects of its own
    /// (nodes follow them and check each hop), names resolved through [`Engine::http_guard`].
    #[cfg(feature = "http")]
    pub fn http_client(&self) -> Result<reqwest::Client, String> {
        self.0
            .http
            .get_or_init(|| crate::nodes::http::client(self.0.guard.clone()))
            .clone()
    }
    /// Where `subflow` nodes find flows.
    pub fn flow_store(&self) -> &Arc<dyn FlowStore> {
        &self.0.flows
    }
    /// Compiles a flow, reporting every problem.
    pub fn compile(&self, flow: &FlowDef) -> Result<Plan, CompileError> {
        compile(flow, &self.0.registry)
    }
    /// Compiles a stored flow version, once: versions never change, so the plan is kept (by
    /// id, version and creation time, which tells a re-created flow apart). `subflow` calls
    /// this on every run.
    pub fn compile_stored(&self, flow: &crate::ports::StoredFlow) -> Result<Plan, CompileError> {
        if let Some(plan) = self.compiled(flow) {
            return Ok(plan);
        }
        let plan = self.compile(&flow.definition)?;
        let mut plans = self
            .0
            .stored_plans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bounded without bookkeeping: a full cache starts over.
        if plans.len() >= STORED_PLANS {
            plans.clear();
        }
        plans.insert(
            (flow.id.clone(), flow.version, flow.created_at),
            plan.clone(),
        );
        Ok(plan)
    }
    /// The plan [`Engine::compile_stored`] made of `flow`, if it is kept.
    pub fn compiled(&self, flow: &crate::ports::StoredFlow) -> Option<Plan> {
        let key = (flow.id.clone(), flow.version, flow.created_at);
        self.0
            .stored_plans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .cloned()
    }
    /// Parses and compiles a flow from JSON text.
    pub fn compile_json(&self, text: &str) -> Result<Plan, Error> {
        Ok(self.compile(&FlowDef::from_json(text)?)?)
    }
    /// Executes a run to its end with default options.
    pub async fn run(&self, plan: &Plan, input: Value) -> RunResult {
        self.execute(plan, input, RunOptions::default()).await
    }
    /// Starts a run on the current tokio runtime and returns a handle to cancel or await it.
    pub fn start(&self, plan: &Plan, input: Value, mut options: RunOptions) -> RunHandle {
        let run_id = options.run_id.get_or_insert_with(RunId::new).clone();
        let cancel = options
            .cancel
            .get_or_insert_with(CancellationToken::new)
            .clone();
        let engine = self.clone();
        let plan = plan.clone();
        let task = tokio::spawn(async move { engine.execute(&plan, input, options).await });
        RunHandle {
            run_id,
            cancel,
            task,
        }
    }
    /// Executes a run to its end.
    pub async fn execute(&self, plan: &Plan, input: Value, options: RunOptions) -> RunResult {
        Driver::new(self.clone(), plan.clone(), Arc::new(input), options, None)
            .run()
            .await
    }
    /// Executes a run as a child of a running node (for `subflow`): it is cancelled with its
    /// parent and does not take a second concurrency permit.
    pub async fn execute_child(
        &self,
        plan: &Plan,
        input: Value,
        parent: &NodeContext,
    ) -> RunResult {
        let cancel = parent.cancellation().child_token();
        self.execute_under(plan, input, parent, cancel, None).await
    }

    /// Executes one item of a `map` node: a child run that is a record of its parent (it has
    /// the parent's id and `run`), stops when `item.cancel` does, and whose nodes may output
    /// `item.log_limit` bytes in all.
    pub(crate) async fn execute_item(
        &self,
        plan: &Plan,
        input: Value,
        parent: &NodeContext,
        item: Item,
    ) -> RunResult {
        let cancel = item.cancel.clone();
        self.execute_under(plan, input, parent, cancel, Some(item))
            .await
    }

    async fn execute_under(
        &self,
        plan: &Plan,
        input: Value,
        parent: &NodeContext,
        cancel: CancellationToken,
        item: Option<Item>,
    ) -> RunResult {
        let options = RunOptions {
            // An item is a record of its parent run, with its id.
            run_id: item.as_ref().map(|_| parent.run.run_id.clone()),
            cancel: Some(cancel),
            ..RunOptions::default()
        };
        let parent = Parent {
            run: &parent.run,
            item,
        };
        Driver::new(
            self.clone(),
            plan.clone(),
            Arc::new(input),
            options,
            Some(parent),
        )
        .run()
        .await
    }
}

/// What a child run takes from its parent.
struct Parent<'a> {
    run: &'a RunShared,
    /// Set for a `map` item.
    item: Option<Item>,
}

/// How a `map` item runs.
pub(crate) struct Item {
    /// Stops the item.
    pub(crate) cancel: CancellationToken,
    /// The most its nodes may output in all (its share of its parent's).
    pub(crate) log_limit: usize,
}

/// How many `map` items a top-level run may execute at once, over all its maps at every depth
/// (a map always runs one item; more only with free slots, so nesting cannot deadlock).
pub const MAX_ITEMS_AT_ONCE: usize = 1024;

/// How many `map` items a top-level run may execute in all, at every depth.
pub const MAX_ITEMS_PER_RUN: u64 = 1_000_000;

/// The part of a run that its nodes share.
pub(crate) struct RunShared {
    pub(crate) plan: Plan,
    pub(crate) run_id: RunId,
    pub(crate) input: Arc<Value>,
    pub(crate) trigger: Option<Arc<Value>>,
    pub(crate) cancel: CancellationToken,
    pub(crate) engine: Engine,
    pub(crate) depth: u32,
    /// When the top-level run started: its children's flows are read as of then.
    pub(crate) started_at: chrono::DateTime<chrono::Utc>,
    /// Subflow runs started so far by the top-level run and every run below it.
    pub(crate) subflow_runs: Arc<std::sync::atomic::AtomicU32>,
    /// Node executions inside `map` items so far, at every depth, not yet reported: the top
    /// run's maps report them ([`RunEvent::ItemsDone`]), so that usage counts them.
    pub(crate) item_executions: Arc<std::sync::atomic::AtomicU64>,
    /// Whether this run is a `map` item or runs inside one.
    pub(crate) in_item: bool,
    /// The slots of `map` items beyond each map's first, shared by the whole run tree.
    pub(crate) item_slots: Arc<Semaphore>,
    /// `map` items started so far in the whole run tree.
    pub(crate) items_started: Arc<std::sync::atomic::AtomicU64>,
    /// The most this run's nodes may output in all: the engine's run log limit, or a map
    /// item's share of its parent's.
    pub(crate) log_limit: usize,
    pub(crate) events: Option<Arc<dyn EventSink>>,
    /// The top-level run's events, for what counts at every depth (LLM token usage of a
    /// subflow's or a map item's nodes).
    pub(crate) root_events: Option<Arc<dyn EventSink>>,
    pub(crate) recorder: Option<Arc<dyn StepRecorder>>,
    outputs: Box<[OnceLock<Arc<Value>>]>,
    /// The secrets handed to this run's nodes, scrubbed from what they produce.
    pub(crate) scrubber: Scrubber,
    /// Bytes of outputs stored so far.
    log_bytes: std::sync::atomic::AtomicUsize,
    /// Where wait nodes take signals; `None`: the run cannot park.
    pub(crate) signals: Option<Arc<dyn SignalInbox>>,
    /// The run's state when it last parked.
    pub(crate) parked: Option<Parked>,
    /// What templates see as `run`: `{"id"}`.
    pub(crate) about: Arc<Value>,
}

impl fmt::Debug for RunShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunShared")
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

impl RunShared {
    /// Counts `bytes` more of the run's stored log (outputs and errors) against
    /// [`Limits::max_run_log_bytes`].
    fn take_log(&self, bytes: usize) -> Result<(), NodeError> {
        let limit = self.log_limit;
        let before = self
            .log_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        if before.saturating_add(bytes) > limit {
            return Err(NodeError::fatal(if self.is_map_item() {
                format!(
                    "this map item's outputs would pass its share of the run's output limit: \
                     {limit} bytes (MAX_RUN_LOG_SIZE_MB divided by the map's concurrency)"
                )
            } else {
                format!(
                    "the run's stored outputs would pass their limit of {limit} bytes (MAX_RUN_LOG_SIZE_MB)"
                )
            }));
        }
        Ok(())
    }

    fn is_map_item(&self) -> bool {
        self.in_item && self.log_limit < self.engine.limits().max_run_log_bytes
    }

    pub(crate) fn output(&self, index: usize) -> Option<&Arc<Value>> {
        self.outputs[index].get()
    }

    fn emit(&self, make: impl FnOnce() -> RunEvent) {
        if let Some(sink) = &self.events {
            sink.emit(&make());
        }
    }
}

impl NodeOutputs for RunShared {
    fn get(&self, id: &str) -> Option<Arc<Value>> {
        self.plan
            .index_of(id)
            .and_then(|i| self.outputs[i].get().cloned())
    }
    fn ids(&self) -> Vec<String> {
        (0..self.plan.len())
            .filter(|&i| self.outputs[i].get().is_some())
            .map(|i| self.plan.node_id(i).to_owned())
            .collect()
    }
}

/// What templates see as `run`: its id, and the resume URLs of its flow's signals when the
/// engine makes them.
fn about(engine: &Engine, plan: &Plan, run_id: &RunId) -> Arc<Value> {
    let mut about = serde_json::Map::new();
    about.insert("id".into(), Value::from(run_id.as_str()));
    if let Some(urls) = &engine.0.resume_urls
        && !plan.signals().is_empty()
    {
        let urls: serde_json::Map<String, Value> = plan
            .signals()
            .iter()
            .map(|signal| (signal.clone(), Value::from(urls.url(run_id, signal))))
            .collect();
        about.insert("resume_urls".into(), Value::Object(urls));
    }
    Arc::new(Value::Object(about))
}

/// Which outgoing edges of a finished node are live.
#[derive(Debug, Clone)]
enum Taken {
    /// The main output, plus a named port if any.
    Main(Option<Arc<str>>),
    /// Only the `error` port (a routed failure).
    ErrorPort,
    /// None (a skipped node).
    Nothing,
}

impl Taken {
    fn is_live(&self, edge_port: Option<&Arc<str>>) -> bool {
        match (self, edge_port) {
            (Self::Main(_), None) => true,
            (Self::Main(Some(p)), Some(e)) => p == e,
            (Self::ErrorPort, Some(e)) => &**e == ERROR_PORT,
            _ => false,
        }
    }

    fn of_checkpoint(step: &StepRecord) -> Self {
        match (step.status, step.port.as_deref()) {
            (StepStatus::Skipped, _) => Self::Nothing,
            (StepStatus::Failed, Some(ERROR_PORT)) => Self::ErrorPort,
            (_, _) => Self::Main(step.port.clone()),
        }
    }
}

struct Done {
    index: usize,
    step: StepRecord,
    taken: Taken,
    /// Set when the run must stop: a failed node with `on_error: fail`, or a failed recording.
    fail_run: Option<String>,
    /// Set when the node parks the run (it has no step yet).
    parked: Option<Box<Wait>>,
}

struct Driver {
    run: Arc<RunShared>,
    options_resume: Vec<Option<StepRecord>>,
    timeout: Duration,
    pending: Vec<usize>,
    live: Vec<bool>,
    steps: Vec<Option<StepRecord>>,
    launched: Vec<Option<DateTime<Utc>>>,
    ready: VecDeque<usize>,
    /// The nodes that parked the run, with what they wait for.
    waits: Vec<Wait>,
    /// Whether the run is a `map` item.
    is_item: bool,
}

impl Driver {
    fn new(
        engine: Engine,
        plan: Plan,
        input: Arc<Value>,
        options: RunOptions,
        parent: Option<Parent<'_>>,
    ) -> Self {
        let n = plan.len();
        let limit = engine.limits().run_timeout;
        // Time spent executing before the run last parked counts; time spent waiting does not.
        let spent = Duration::from_millis(options.parked.as_ref().map_or(0, |p| p.active_ms));
        let timeout = options
            .timeout
            .unwrap_or_else(|| plan.timeout().map_or(limit, |t| t.min(limit)))
            .saturating_sub(spent);
        let mut resume: Vec<Option<StepRecord>> = vec![None; n];
        for step in options.resume {
            if let Some(i) = plan.index_of(&step.node)
                && step.is_checkpoint()
            {
                resume[i] = Some(step);
            }
        }
        let pending: Vec<usize> = (0..n).map(|i| plan.node(i).in_edges).collect();
        let ready = (0..n).filter(|&i| pending[i] == 0).collect();
        let run_id = options.run_id.unwrap_or_default();
        // An item is a record of its parent run: it sees the parent's `run`.
        let about = match &parent {
            Some(Parent { run, item: Some(_) }) => run.about.clone(),
            _ => about(&engine, &plan, &run_id),
        };
        let log_limit = match &parent {
            Some(Parent {
                item: Some(item), ..
            }) => item.log_limit,
            Some(Parent { run, item: None }) => run.log_limit,
            None => engine.limits().max_run_log_bytes,
        };
        let is_item = parent.as_ref().is_some_and(|p| p.item.is_some());
        let in_item = is_item || parent.as_ref().is_some_and(|p| p.run.in_item);
        let parent = parent.map(|p| p.run);
        let run = Arc::new(RunShared {
            about,
            run_id,
            input,
            // A subflow's run sees what started the run above it.
            trigger: options
                .trigger
                .map(Arc::new)
                .or_else(|| parent.and_then(|p| p.trigger.clone())),
            cancel: options.cancel.unwrap_or_default(),
            engine,
            depth: parent.map_or(0, |p| p.depth + 1),
            started_at: parent.map_or_else(
                || options.started_at.unwrap_or_else(chrono::Utc::now),
                |p| p.started_at,
            ),
            subflow_runs: parent.map(|p| p.subflow_runs.clone()).unwrap_or_default(),
            item_executions: parent
                .map(|p| p.item_executions.clone())
                .unwrap_or_default(),
            in_item,
            item_slots: parent.map_or_else(
                || Arc::new(Semaphore::new(MAX_ITEMS_AT_ONCE)),
                |p| p.item_slots.clone(),
            ),
            items_started: parent.map(|p| p.items_started.clone()).unwrap_or_default(),
            log_limit,
            root_events: parent.map_or_else(|| options.events.clone(), |p| p.root_events.clone()),
            events: options.events,
            recorder: options.recorder,
            outputs: (0..n).map(|_| OnceLock::new()).collect(),
            scrubber: Scrubber::default(),
            log_bytes: std::sync::atomic::AtomicUsize::new(0),
            // Only a top-level run parks: a subflow's child waits inside its parent's node.
            signals: options.signals.filter(|_| parent.is_none()),
            parked: options.parked,
            plan,
        });
        Self {
            run,
            options_resume: resume,
            timeout,
            pending,
            live: vec![false; n],
            steps: vec![None; n],
            launched: vec![None; n],
            ready,
            waits: Vec::new(),
            is_item,
        }
    }

    async fn run(mut self) -> RunResult {
        let started_at = Utc::now();
        let run = self.run.clone();
        run.emit(|| match run.parked {
            Some(_) => RunEvent::RunResumed {
                run_id: run.run_id.clone(),
            },
            None => RunEvent::RunStarted {
                run_id: run.run_id.clone(),
            },
        });

        let too_deep = run.depth > run.engine.limits().max_subflow_depth;
        let limit = run.plan.max_concurrency().unwrap_or(usize::MAX);
        let mut running = FuturesUnordered::new();
        // A map item has no timer of its own unless its flow sets one (a timer per item would
        // cost more than a small item): its parent's ends it. A sleep never polled is never
        // registered with the timer.
        let timed = !self.is_item || run.plan.timeout().is_some();
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let token = run.cancel.clone();
        let cancelled = token.cancelled();
        tokio::pin!(cancelled);

        let mut failure: Option<(RunStatus, String)> = too_deep.then(|| {
            (
                RunStatus::Failed,
                format!(
                    "subflows nest deeper than {}",
                    run.engine.limits().max_subflow_depth
                ),
            )
        });
        while failure.is_none() {
            while running.len() < limit {
                let Some(i) = self.ready.pop_front() else {
                    break;
                };
                if let Some(step) = self.options_resume[i].take() {
                    let taken = Taken::of_checkpoint(&step);
                    if let Some(out) = &step.output {
                        let _ = run.outputs[i].set(out.clone());
                    }
                    self.finish(i, step, &taken);
                } else if run.plan.node(i).in_edges > 0 && !self.live[i] {
                    let step = StepRecord {
                        status: StepStatus::Skipped,
                        finished_at: Some(Utc::now()),
                        ..StepRecord::pending(run.plan.node(i).id.clone())
                    };
                    if let Err(e) = record(&run, &step).await {
                        failure = Some((RunStatus::Failed, e));
                    }
                    run.emit(|| finished_event(&run, &step));
                    self.finish(i, step, &Taken::Nothing);
                } else {
                    let now = Utc::now();
                    self.launched[i] = Some(now);
                    running.push(execute_node(run.clone(), i, now));
                }
            }
            if running.is_empty() {
                if self.ready.is_empty() {
                    break;
                }
                continue;
            }
            tokio::select! {
                biased;
                () = &mut cancelled => failure = Some((RunStatus::Cancelled, "the run was cancelled".to_owned())),
                () = &mut deadline, if timed => failure = Some((
                    RunStatus::TimedOut,
                    format!("the run timed out after {} s", self.timeout.as_secs_f64()),
                )),
                Some(done) = running.next() => {
                    let mut next = Some(done);
                    // Take every completion that is already there before going back through
                    // the select: with a wide fan-out this saves a timer and token poll per node.
                    while let Some(done) = next {
                        if let Some(message) = done.fail_run {
                            failure = Some((RunStatus::Failed, message));
                        }
                        match done.parked {
                            // Not finished: it executes again when the run is woken.
                            Some(wait) => self.waits.push(*wait),
                            None => self.finish(done.index, done.step, &done.taken),
                        }
                        next = if failure.is_none() { running.next().now_or_never().flatten() } else { None };
                    }
                }
            }
        }

        if failure.is_some() {
            // Stop everything still executing, including blocking work that watches the token.
            token.cancel();
            drop(running);
            let now = Utc::now();
            for i in 0..self.steps.len() {
                if self.steps[i].is_none()
                    && let Some(at) = self.launched[i]
                {
                    let step = StepRecord {
                        status: StepStatus::Cancelled,
                        started_at: Some(at),
                        finished_at: Some(now),
                        ..StepRecord::pending(run.plan.node(i).id.clone())
                    };
                    let _ = record(&run, &step).await;
                    run.emit(|| finished_event(&run, &step));
                    self.steps[i] = Some(step);
                }
            }
        }

        let waits = if failure.is_none() {
            std::mem::take(&mut self.waits)
        } else {
            Vec::new()
        };
        let (status, output, error) = match failure {
            Some((status, message)) => (status, None, Some(message)),
            None if !waits.is_empty() => (RunStatus::Waiting, None, None),
            None => (RunStatus::Succeeded, Some(self.output()), None),
        };
        run.emit(|| match status {
            RunStatus::Waiting => RunEvent::RunWaiting {
                run_id: run.run_id.clone(),
                waits: waits.clone(),
            },
            _ => RunEvent::RunFinished {
                run_id: run.run_id.clone(),
                status,
                error: error.clone(),
            },
        });
        RunResult {
            run_id: run.run_id.clone(),
            status,
            output,
            error,
            steps: self.steps.into_iter().flatten().collect(),
            waits,
            started_at,
            finished_at: Utc::now(),
        }
    }

    /// Takes a node's final step and resolves its outgoing edges.
    fn finish(&mut self, index: usize, step: StepRecord, taken: &Taken) {
        self.steps[index] = Some(step);
        let plan = &self.run.plan;
        for (port, target) in plan.out(index) {
            if taken.is_live(port.as_ref()) {
                self.live[*target] = true;
            }
            self.pending[*target] -= 1;
            if self.pending[*target] == 0 {
                self.ready.push_back(*target);
            }
        }
    }

    /// The run's output: the `output` node's, else the one sink's that ran, else an object of
    /// the sinks that ran by id.
    fn output(&self) -> Value {
        let value_of = |i: usize| self.run.output(i).map(|v| (**v).clone());
        if let Some(i) = self.run.plan.output_node() {
            return value_of(i).unwrap_or(Value::Null);
        }
        let ran: Vec<usize> = self
            .run
            .plan
            .sinks()
            .iter()
            .copied()
            .filter(|&i| self.run.output(i).is_some())
            .collect();
        match ran.as_slice() {
            [one] => value_of(*one).unwrap_or(Value::Null),
            many => Value::Object(
                many.iter()
                    .map(|&i| {
                        (
                            self.run.plan.node_id(i).to_owned(),
                            value_of(i).unwrap_or(Value::Null),
                        )
                    })
                    .collect(),
            ),
        }
    }
}

fn finished_event(run: &RunShared, step: &StepRecord) -> RunEvent {
    RunEvent::NodeFinished {
        run_id: run.run_id.clone(),
        node: step.node.clone(),
        status: step.status,
        attempt: step.attempts,
        error: step.error.clone(),
    }
}

async fn record(run: &RunShared, step: &StepRecord) -> Result<(), String> {
    match &run.recorder {
        None => Ok(()),
        Some(recorder) => recorder
            .record_step(&run.run_id, step)
            .await
            .map_err(|e| format!("could not record step `{}`: {e}", step.node)),
    }
}

/// Executes one node with its retries, timeout and size limit, and records its step.
async fn execute_node(run: Arc<RunShared>, index: usize, started_at: DateTime<Utc>) -> Done {
    // Child runs of a subflow node run under their parent's permit.
    let _permit = match (&run.engine.0.permits, run.depth) {
        (Some(permits), 0) => permits.acquire().await.ok(),
        _ => None,
    };
    let pn = run.plan.node(index);
    let max_attempts = pn.retry.map_or(1, |r| r.max_attempts.max(1));
    let max_bytes = run.engine.limits().max_output_bytes;
    let mut attempt = 0;
    // What a map node says of its progress, kept across its attempts.
    let progress = Arc::new(std::sync::Mutex::new(None));
    let result = loop {
        attempt += 1;
        run.emit(|| RunEvent::NodeStarted {
            run_id: run.run_id.clone(),
            node: pn.id.clone(),
            attempt,
        });
        let cx = NodeContext {
            run: run.clone(),
            index,
            attempt,
            items: progress.clone(),
        };
        let call = AssertUnwindSafe(pn.node.run(&cx)).catch_unwind();
        let outcome = match pn.timeout {
            None => call.await,
            // Boxed: most nodes have no timeout, and an inline timer would enlarge every node's
            // future.
            Some(limit) => Box::pin(tokio::time::timeout(limit, call))
                .await
                .unwrap_or(Ok(Err(NodeError::Timeout(limit)))),
        };
        let outcome = match outcome {
            Ok(result) => result.and_then(|out| {
                let size = check_size(&out.value, max_bytes)?;
                run.take_log(size)?;
                Ok(out)
            }),
            Err(panic) => Err(NodeError::fatal(format!(
                "the node panicked: {}",
                panic_message(&panic)
            ))),
        };
        match outcome {
            Err(e) if e.is_retryable() && attempt < max_attempts => {
                let backoff = pn.retry.unwrap_or_default().backoff(attempt + 1);
                let wait = e.retry_after().map_or(backoff, |after| after.max(backoff));
                Box::pin(tokio::time::sleep(wait)).await;
            }
            other => break other,
        }
    };

    let mut step = StepRecord {
        status: StepStatus::Succeeded,
        attempts: attempt,
        started_at: Some(started_at),
        finished_at: Some(Utc::now()),
        ..StepRecord::pending(pn.id.clone())
    };
    let result = match result {
        Err(NodeError::Parked(wait)) => {
            step.status = StepStatus::Running;
            step.finished_at = None;
            return Done {
                index,
                step,
                taken: Taken::Nothing,
                fail_run: None,
                parked: Some(wait),
            };
        }
        other => other,
    };
    step.items = *progress
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut fail_run = None;
    let taken = match result {
        Ok(out) => {
            let value = Arc::new(run.scrubber.value(out.value));
            let _ = run.outputs[index].set(value.clone());
            step.output = Some(value);
            step.port = out.port.map(|p| Arc::from(&*p));
            Taken::Main(step.port.clone())
        }
        Err(e) => {
            let message = run.scrubber.text(e.to_string());
            step.status = StepStatus::Failed;
            step.error = Some(message.clone());
            step.error_code = Some(e.code().to_owned());
            match pn.on_error {
                OnError::Fail => {
                    fail_run = Some(format!("node `{}` failed: {message}", pn.id));
                    Taken::Nothing
                }
                OnError::Continue | OnError::Route => {
                    let value = Arc::new(serde_json::json!({ "error": message, "code": e.code() }));
                    let _ = run.outputs[index].set(value.clone());
                    step.output = Some(value);
                    if pn.on_error == OnError::Route {
                        step.port = Some(Arc::from(ERROR_PORT));
                        Taken::ErrorPort
                    } else {
                        Taken::Main(None)
                    }
                }
            }
        }
    };
    if let Err(e) = record(&run, &step).await {
        fail_run = Some(e);
    }
    if run.in_item {
        run.item_executions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    run.emit(|| finished_event(&run, &step));
    Done {
        index,
        step,
        taken,
        fail_run,
        parked: None,
    }
}

/// Fails when `value` serializes to more than `limit` bytes (without building the whole text) or
/// nests deeper than [`crate::json::MAX_DEPTH`]. Checks one output against the limit; returns its size as serialized JSON (an upper bound
/// for plain values and short strings, which are not serialized to be measured).
pub(crate) fn check_size(value: &Value, limit: usize) -> Result<usize, NodeError> {
    struct Counter {
        written: usize,
        limit: usize,
    }
    impl io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written += buf.len();
            if self.written > self.limit {
                Err(io::Error::other("over the limit"))
            } else {
                Ok(buf.len())
            }
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    if matches!(value, Value::Null | Value::Bool(_) | Value::Number(_)) {
        return Ok(24);
    }
    // Deeper than what every store reads back (see `crate::json`).
    if crate::json::too_deep(value) {
        return Err(NodeError::fatal(format!(
            "the output nests deeper than {} levels",
            crate::json::MAX_DEPTH
        )));
    }
    if let Value::String(s) = value
        && s.len() + 2 <= limit / 6
    {
        return Ok(s.len() + 2); // even fully escaped it fits
    }
    let mut counter = Counter { written: 0, limit };
    serde_json::to_writer(&mut counter, value).map_err(|_| NodeError::OutputTooLarge { limit })?;
    Ok(counter.written)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("unknown panic")
}
