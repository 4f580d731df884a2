//! The `Node` trait, node factories and the registry of node types.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, RunShared};
use crate::error::{NodeError, ParamError};
use crate::event::RunEvent;
use crate::expr::{References, Scope};
use crate::ids::RunId;
use crate::wait::{PARK_FROM, Wait, WaitFor, Waited};

/// What one successful execution of a node produced: a JSON value and, for nodes with named
/// ports such as `branch`, the port taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The node's output, visible to later nodes as `nodes.<id>`.
    pub value: Value,
    /// The named port taken besides the main output (`"true"` or `"false"` for a branch).
    pub port: Option<Cow<'static, str>>,
}

impl Output {
    /// An output that takes only the main port.
    pub fn new(value: Value) -> Self {
        Self { value, port: None }
    }
    /// An output that also takes the named port.
    pub fn with_port(value: Value, port: impl Into<Cow<'static, str>>) -> Self {
        Self {
            value,
            port: Some(port.into()),
        }
    }
}

impl From<Value> for Output {
    fn from(value: Value) -> Self {
        Self::new(value)
    }
}

/// A step's behaviour, built once from its params when the flow is compiled.
///
/// ```
/// use flowcore::{async_trait, Node, NodeContext, NodeError, Output};
/// struct Upper;
/// #[async_trait]
/// impl Node for Upper {
///     async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
///         let name = cx.input()["name"].as_str().unwrap_or_default();
///         Ok(serde_json::json!(name.to_uppercase()).into())
///     }
/// }
/// ```
#[async_trait]
pub trait Node: Send + Sync {
    /// Executes one attempt. Called again for each retry, with `cx.attempt()` counting up.
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError>;

    /// The named output ports this node may take besides its main output (`branch`: true, false).
    /// Edges may name these, and `error` when the node's `on_error` is `route`.
    fn ports(&self) -> &[&str] {
        &[]
    }

    /// The retry policy of a node of this type whose flow gives none (`None`: one attempt).
    /// `llm_chat` retries a model server's 429 and 5xx three times by default.
    fn default_retry(&self) -> Option<crate::model::RetryPolicy> {
        None
    }

    /// The names its templates and expressions use, so that compilation can refuse a reference
    /// to an unknown variable or to a node that is not upstream.
    fn references(&self) -> References {
        References::default()
    }
}

/// Builds a node from its params; bad params fail here, at compile time, not at run time.
///
/// Any `Fn(&Value) -> Result<Box<dyn Node>, ParamError>` is a factory.
pub trait NodeFactory: Send + Sync {
    /// Checks the params and builds the node.
    fn build(&self, params: &Value) -> Result<Box<dyn Node>, ParamError>;

    /// Builds the node with what the compilation knows: a node that holds a flow of its own
    /// (`map` with an inline `flow`) compiles it here, with the same node types. The default
    /// calls [`build`](Self::build).
    fn build_in(&self, params: &Value, cx: &BuildContext<'_>) -> Result<Box<dyn Node>, ParamError> {
        let _ = cx;
        self.build(params)
    }
}

/// What a flow is compiled with, for [`NodeFactory::build_in`].
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    /// The node types.
    pub registry: &'a Registry,
    /// Whether the flow runs as a child of another (a `map`'s): `wait` is refused there.
    pub child: bool,
}

impl<F> NodeFactory for F
where
    F: Fn(&Value) -> Result<Box<dyn Node>, ParamError> + Send + Sync,
{
    fn build(&self, params: &Value) -> Result<Box<dyn Node>, ParamError> {
        self(params)
    }
}

/// The node types a flow may use, by their persistent type name.
#[derive(Clone, Default)]
pub struct Registry {
    factories: HashMap<String, Arc<dyn NodeFactory>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.factories.keys().collect();
        names.sort();
        f.debug_struct("Registry").field("types", &names).finish()
    }
}

impl Registry {
    /// A registry with no node types.
    pub fn empty() -> Self {
        Self::default()
    }

    /// A registry with every built-in node type (`set`, `branch`, `template`, `noop`, `delay`,
    /// `subflow`, and `script` and `http_request` when their features are on).
    pub fn with_builtins() -> Self {
        let mut registry = Self::empty();
        crate::nodes::register_builtins(&mut registry);
        registry
    }

    /// Adds or replaces a node type. The name is persistent API: stored flows refer to it.
    pub fn register(
        &mut self,
        name: impl Into<String>,
        factory: impl NodeFactory + 'static,
    ) -> &mut Self {
        self.factories.insert(name.into(), Arc::new(factory));
        self
    }

    /// The factory of a node type.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn NodeFactory>> {
        self.factories.get(name)
    }

    /// The registered type names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.factories.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// What a node sees while it runs: the run's input, upstream outputs, the attempt number,
/// cancellation, and the engine (for subflows).
pub struct NodeContext {
    pub(crate) run: Arc<RunShared>,
    pub(crate) index: usize,
    pub(crate) attempt: u32,
    /// A `map` node's progress, shown on its step whether it succeeds or fails.
    pub(crate) items: Arc<std::sync::Mutex<Option<crate::run::ItemProgress>>>,
}

impl fmt::Debug for NodeContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeContext")
            .field("run_id", &self.run.run_id)
            .field("node", &self.node_id())
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl NodeContext {
    /// The run's id.
    pub fn run_id(&self) -> &RunId {
        &self.run.run_id
    }
    /// This node's id.
    pub fn node_id(&self) -> &str {
        self.run.plan.node_id(self.index)
    }
    /// 1 on the first attempt, 2 on the first retry, ...
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The run's input.
    pub fn input(&self) -> &Arc<Value> {
        &self.run.input
    }
    /// The credential called `name`, from the engine's [`SecretSource`]. Its text is scrubbed
    /// (replaced by `[redacted]`) from every output and error of the run from now on, so it
    /// never reaches stored steps, events or the run's output.
    ///
    /// [`SecretSource`]: crate::secret::SecretSource
    pub async fn credential(&self, name: &str) -> Result<crate::secret::Secret, NodeError> {
        let source =
            self.run.engine.secrets().ok_or_else(|| {
                NodeError::fatal(crate::secret::SecretError::Unavailable.to_string())
            })?;
        let secret = source.secret(name).await.map_err(|e| match e {
            crate::secret::SecretError::Unreadable { .. } => NodeError::retryable(e.to_string()),
            _ => NodeError::fatal(e.to_string()),
        })?;
        self.run.scrubber.add(&secret);
        Ok(secret)
    }
    /// Counts one more subflow run against the top-level run's
    /// [`Limits::max_subflow_runs`](crate::Limits::max_subflow_runs).
    pub(crate) fn take_subflow_run(&self) -> Result<(), NodeError> {
        let limit = self.run.engine.limits().max_subflow_runs;
        let started = self
            .run
            .subflow_runs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if started >= limit {
            return Err(NodeError::fatal(format!(
                "this run has started {limit} subflow runs at every depth, its limit"
            )));
        }
        Ok(())
    }
    /// Where the run's steps are recorded, in a durable execution of a top-level run (a `map`
    /// checkpoints its items there).
    pub(crate) fn recorder(&self) -> Option<Arc<dyn crate::run::StepRecorder>> {
        self.run.recorder.clone()
    }
    /// The slots of `map` items beyond each map's first, shared by the run tree.
    pub(crate) fn item_slots(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.run.item_slots
    }
    /// Counts `n` more `map` items against the run tree's
    /// [`MAX_ITEMS_PER_RUN`](crate::engine::MAX_ITEMS_PER_RUN).
    pub(crate) fn take_items(&self, n: u64) -> Result<(), NodeError> {
        let limit = crate::engine::MAX_ITEMS_PER_RUN;
        let before = self
            .run
            .items_started
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if before.saturating_add(n) > limit {
            return Err(NodeError::fatal(format!(
                "this run would map over more than {limit} items at every depth, its limit"
            )));
        }
        Ok(())
    }
    /// This map item's share of the run's output limit, with `concurrency` items at once.
    pub(crate) fn item_log_limit(&self, concurrency: usize) -> usize {
        self.run.log_limit / concurrency.max(1)
    }
    /// Shows a `map` node's progress on its step.
    pub(crate) fn set_items(&self, progress: crate::run::ItemProgress) {
        *self
            .items
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(progress);
    }
    /// Whether this is a node of the top-level run (not of a subflow or a map item).
    pub(crate) fn is_top_level(&self) -> bool {
        self.run.depth == 0
    }
    /// The node executions inside `map` items since the last call (for any map of the run).
    pub(crate) fn take_item_executions(&self) -> u64 {
        self.run
            .item_executions
            .swap(0, std::sync::atomic::Ordering::Relaxed)
    }
    /// The scope that templates and expressions of this node evaluate in.
    pub fn scope(&self) -> Scope {
        Scope::for_run(
            self.run.input.clone(),
            self.run.clone(),
            self.attempt,
            self.run.trigger.clone(),
            self.run.about.clone(),
        )
    }
    /// The outputs of this node's finished ancestors, by id.
    pub fn ancestor_outputs(&self) -> serde_json::Map<String, Value> {
        self.ancestors()
            .into_iter()
            .map(|(id, v)| (id, (*v).clone()))
            .collect()
    }
    /// The outputs of the node's completed ancestors by id, shared (not copied).
    pub(crate) fn ancestors(&self) -> Vec<(String, Arc<Value>)> {
        let plan = &self.run.plan;
        let mut seen = vec![false; plan.len()];
        let mut stack: Vec<usize> = plan.preds(self.index).to_vec();
        let mut out = Vec::new();
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            if let Some(v) = self.run.output(i) {
                out.push((plan.node_id(i).to_owned(), v.clone()));
            }
            stack.extend_from_slice(plan.preds(i));
        }
        out
    }
    /// The token that is cancelled when the run is cancelled, times out or fails. Async nodes
    /// are simply dropped; blocking work should watch this.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.run.cancel
    }
    /// The engine running this flow, for nodes that start other runs.
    pub fn engine(&self) -> &Engine {
        &self.run.engine
    }
    /// How deep in subflows this run is (0 for a top-level run).
    pub fn depth(&self) -> u32 {
        self.run.depth
    }
    /// Waits for a signal sent to the run, or until a time: what `wait` and `delay` do.
    ///
    /// A node that waited before (the run parked, and executes again) keeps the deadline it
    /// had; its signal may have come meanwhile. In a durable execution (see [`crate::wait`])
    /// a wait of a second or more answers [`NodeError::Parked`]: the node passes it on (`?`)
    /// and the run parks until a signal or the deadline wakes it; a shorter one waits here.
    /// Outside a durable execution a wait for a time sleeps here, and a wait for a signal
    /// fails.
    ///
    /// ```
    /// use flowcore::wait::{WaitFor, Waited};
    /// use flowcore::{async_trait, Node, NodeContext, NodeError, Output};
    ///
    /// /// Outputs the payload of signal `go`, or `null` after an hour without it.
    /// struct Go;
    /// #[async_trait]
    /// impl Node for Go {
    ///     async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
    ///         let what = WaitFor {
    ///             signal: Some("go".into()),
    ///             key: None,
    ///             deadline: chrono::Utc::now() + chrono::Duration::hours(1),
    ///         };
    ///         Ok(match cx.wait_for(what).await? {
    ///             Waited::Signal(payload) => payload.into(),
    ///             Waited::Deadline => serde_json::Value::Null.into(),
    ///         })
    ///     }
    /// }
    /// ```
    pub async fn wait_for(&self, what: WaitFor) -> Result<Waited, NodeError> {
        let node = self.node_id();
        let deadline = self
            .run
            .parked
            .as_ref()
            .and_then(|p| p.deadline_of(node))
            .unwrap_or(what.deadline);
        let take = async || -> Result<Option<serde_json::Value>, NodeError> {
            let Some(name) = &what.signal else {
                return Ok(None);
            };
            let inbox = self.run.signals.as_ref().ok_or_else(|| {
                NodeError::fatal(format!(
                    "waiting for signal `{name}` needs a durable top-level run (not a subflow's, \
                     nor one of `Engine::run`)"
                ))
            })?;
            inbox
                .take(node, name)
                .await
                .map_err(|e| NodeError::retryable(format!("could not take signal `{name}`: {e}")))
        };
        if let Some(payload) = take().await? {
            return Ok(Waited::Signal(payload));
        }
        let left = (deadline - chrono::Utc::now()).to_std().unwrap_or_default();
        if left.is_zero() {
            return Ok(Waited::Deadline);
        }
        // Under a second from the deadline the node waits here: parking would cost more than
        // it saves, and a timer on a clock a little ahead would wake the run again and again.
        if self.run.signals.is_some() && left >= PARK_FROM {
            return Err(NodeError::Parked(Box::new(Wait {
                node: node.to_owned(),
                signal: what.signal.clone(),
                key: what.key.clone(),
                deadline,
            })));
        }
        tokio::time::sleep(left).await;
        // A signal that came meanwhile came before the deadline.
        Ok(match take().await? {
            Some(payload) => Waited::Signal(payload),
            None => Waited::Deadline,
        })
    }
    /// Sends an event to the run's subscribers, such as streamed LLM tokens. Only a top-level
    /// run has subscribers: a subflow's or a map item's events go nowhere.
    pub fn emit(&self, event: &RunEvent) {
        if let Some(sink) = &self.run.events {
            sink.emit(event);
        }
    }
    /// Sends an event to the top-level run's subscribers from any depth (what must count
    /// wherever it happens: [`RunEvent::LlmUsage`]).
    pub fn emit_to_root(&self, event: &RunEvent) {
        if let Some(sink) = &self.run.root_events {
            sink.emit(event);
        }
    }
    /// Checkpoints finished pieces of this node's work, by index, in a durable execution (a
    /// no-op otherwise): what [`NodeContext::checkpoints`] answers when the node executes
    /// again (a retry, a resumed run). The step shows `progress`. They are deleted once the
    /// node's step succeeds.
    pub async fn checkpoint(
        &self,
        progress: crate::run::ItemProgress,
        started_at: chrono::DateTime<chrono::Utc>,
        items: Vec<(u32, Arc<Value>)>,
    ) -> Result<(), NodeError> {
        let Some(recorder) = self.recorder().filter(|_| self.is_top_level()) else {
            return Ok(());
        };
        let batch = crate::run::ItemBatch {
            node: Arc::from(self.node_id()),
            progress,
            started_at,
            items,
        };
        self.set_items(progress);
        recorder
            .record_items(self.run_id(), batch)
            .await
            .map_err(|e| NodeError::retryable(format!("checkpointing: {e}")))
    }
    /// What [`NodeContext::checkpoint`] stored for this node, by index (empty outside a
    /// durable execution of a top-level run).
    pub async fn checkpoints(&self) -> Result<Vec<(u32, Value)>, NodeError> {
        let Some(recorder) = self.recorder().filter(|_| self.is_top_level()) else {
            return Ok(Vec::new());
        };
        recorder
            .items(self.run_id(), self.node_id())
            .await
            .map_err(|e| NodeError::retryable(format!("reading checkpoints: {e}")))
    }
}
