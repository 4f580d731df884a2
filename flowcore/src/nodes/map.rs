//! `map`: runs a child flow once per item of an array, at most `concurrency` at once, and
//! outputs the children's outputs in item order.
//!
//! A child is a real run of the engine (its nodes' retries and timeouts apply, and it stops
//! with its parent), but a record of its parent, not a run of its own. In a durable execution
//! finished items are checkpointed in batches ([`StepRecorder::record_items`]): a run resumed
//! after a crash executes only the items that had not finished. The parent keeps each child's
//! output only, never its state, and fails as soon as the outputs pass the step output limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Deserialize;
use serde_json::Value;

use super::parse_params;
use super::subflow::load_stored;
use crate::engine::{Item, check_size};
use crate::error::{NodeError, ParamError};
use crate::event::RunEvent;
use crate::expr::{References, ValueTemplate};
use crate::model::{FlowDef, is_valid_id};
use crate::node::{BuildContext, Node, NodeContext, NodeFactory, Output};
use crate::plan::{Plan, compile_in};
use crate::run::{ItemBatch, ItemProgress, RunResult, RunStatus, StepStatus};

/// The most items one `map` may have (`max_items` may lower it).
pub const MAX_ITEMS: usize = 100_000;

/// The most items one `map` may run at once.
pub const MAX_CONCURRENCY: usize = 256;

/// Finished items are checkpointed together once this many are waiting...
const BATCH_ITEMS: usize = 512;
/// ...or once their outputs pass this many bytes...
const BATCH_BYTES: usize = 1024 * 1024;
/// ...or this long after the first of them finished.
const BATCH_AGE: Duration = Duration::from_millis(200);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapParams {
    items: Value,
    #[serde(default)]
    flow_id: Option<String>,
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    flow: Option<Value>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
    #[serde(default)]
    on_item_error: OnItemError,
    #[serde(default = "default_max_items")]
    max_items: usize,
}

fn default_concurrency() -> usize {
    8
}

fn default_max_items() -> usize {
    10_000
}

/// What a failed item does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnItemError {
    /// The first failed item fails the node.
    #[default]
    Fail,
    /// The item's entry is `{"error", "code"}` and the others go on.
    Continue,
}

/// Where the child flow comes from.
enum Child {
    /// Compiled with the parent.
    Inline(Plan),
    /// A stored flow, loaded (and compiled once per version) when the node runs.
    Stored {
        flow_id: String,
        version: Option<u32>,
    },
}

struct Map {
    items: ValueTemplate,
    child: Child,
    input: Option<ValueTemplate>,
    concurrency: usize,
    on_item_error: OnItemError,
    max_items: usize,
}

/// Builds `map` nodes; an inline `flow` is compiled here, with the parent's node types.
pub(crate) struct MapFactory;

impl NodeFactory for MapFactory {
    fn build(&self, params: &Value) -> Result<Box<dyn Node>, ParamError> {
        let registry = crate::node::Registry::with_builtins();
        self.build_in(
            params,
            &BuildContext {
                registry: &registry,
                child: false,
            },
        )
    }

    fn build_in(&self, params: &Value, cx: &BuildContext<'_>) -> Result<Box<dyn Node>, ParamError> {
        let p: MapParams = parse_params(params)?;
        let items =
            ValueTemplate::compile(&p.items).map_err(|e| ParamError::new(format!("items: {e}")))?;
        let child = match (p.flow_id, p.flow) {
            (Some(flow_id), None) => {
                if !is_valid_id(&flow_id) {
                    return Err(ParamError::new("flow_id: not a valid flow id"));
                }
                Child::Stored {
                    flow_id,
                    version: p.version,
                }
            }
            (None, Some(flow)) => {
                if p.version.is_some() {
                    return Err(ParamError::new("version: only with flow_id"));
                }
                if let Some(extra) = flow.as_object().and_then(|o| {
                    o.keys()
                        .find(|k| !["nodes", "edges", "output"].contains(&k.as_str()))
                }) {
                    return Err(ParamError::new(format!(
                        "flow: an inline flow has `nodes`, `edges` and `output` only, not `{extra}`"
                    )));
                }
                let def =
                    FlowDef::from_value(flow).map_err(|e| ParamError::new(format!("flow: {e}")))?;
                let plan = compile_in(
                    &def,
                    BuildContext {
                        registry: cx.registry,
                        child: true,
                    },
                )
                .map_err(|e| ParamError::new(format!("flow: {e}")))?;
                Child::Inline(plan)
            }
            _ => return Err(ParamError::new("exactly one of flow_id and flow")),
        };
        let input = super::value_template(p.input.as_ref(), "input")?;
        if p.concurrency == 0 || p.concurrency > MAX_CONCURRENCY {
            return Err(ParamError::new(format!(
                "concurrency: from 1 to {MAX_CONCURRENCY}"
            )));
        }
        if p.max_items == 0 || p.max_items > MAX_ITEMS {
            return Err(ParamError::new(format!("max_items: from 1 to {MAX_ITEMS}")));
        }
        Ok(Box::new(Map {
            items,
            child,
            input,
            concurrency: p.concurrency,
            on_item_error: p.on_item_error,
            max_items: p.max_items,
        }))
    }
}

/// An item's end: its output, or why it failed and the code of that.
fn outcome(index: usize, result: RunResult) -> Result<Value, (String, &'static str)> {
    match result.status {
        RunStatus::Succeeded => Ok(result.output.unwrap_or(Value::Null)),
        status => {
            let code = match status {
                RunStatus::TimedOut => "timeout",
                RunStatus::Cancelled => "cancelled",
                _ => result
                    .steps
                    .iter()
                    .find(|s| s.status == StepStatus::Failed)
                    .and_then(|s| s.error_code.as_deref())
                    .and_then(known_code)
                    .unwrap_or("node_failed"),
            };
            let error = result.error.unwrap_or_else(|| status.to_string());
            Err((format!("item {index} {status}: {error}"), code))
        }
    }
}

/// A step's error code as a static string (codes are a closed set).
fn known_code(code: &str) -> Option<&'static str> {
    [
        "node_failed",
        "node_timeout",
        "timeout",
        "output_too_large",
        "cancelled",
    ]
    .into_iter()
    .find(|c| *c == code)
}

/// Finished items not yet checkpointed.
struct Pending {
    items: Vec<(u32, Arc<Value>)>,
    bytes: usize,
    since: Option<Instant>,
}

impl Pending {
    fn is_due(&self) -> bool {
        self.items.len() >= BATCH_ITEMS
            || self.bytes >= BATCH_BYTES
            || self.since.is_some_and(|t| t.elapsed() >= BATCH_AGE)
    }
}

#[async_trait]
impl Node for Map {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        let scope = cx.scope();
        let items = match self.items.render(&scope) {
            Ok(Value::Array(items)) => items,
            Ok(other) => {
                return Err(NodeError::fatal(format!(
                    "items: must give an array, not {}",
                    crate::json::kind(&other)
                )));
            }
            Err(e) => return Err(NodeError::fatal(format!("items: {e}"))),
        };
        if items.len() > self.max_items {
            return Err(NodeError::fatal(format!(
                "items: {} items, more than max_items ({})",
                items.len(),
                self.max_items
            )));
        }
        let plan = match &self.child {
            Child::Inline(plan) => plan.clone(),
            Child::Stored { flow_id, version } => load_stored(cx, flow_id, *version).await?,
        };
        let mut map = Mapping {
            node: Arc::from(cx.node_id()),
            total: u32::try_from(items.len()).unwrap_or(u32::MAX),
            done: 0,
            pending: Pending {
                items: Vec::new(),
                bytes: 0,
                since: None,
            },
            started_at: chrono::Utc::now(),
        };
        let outcome = self.map_items(cx, &scope, &plan, items, &mut map).await;
        // Whatever ended the mapping, what finished is checkpointed and told.
        let told = map.checkpoint(cx).await;
        let outputs = outcome?;
        told?;
        Ok(Value::Array(outputs).into())
    }

    fn references(&self) -> References {
        let mut refs = self.items.references();
        if let Some(input) = &self.input {
            let mut input = input.references();
            input
                .unknown
                .retain(|name| name != "item" && name != "index");
            refs.merge(input);
        }
        refs
    }
}

/// One execution of a map node: its progress and the items not yet checkpointed.
struct Mapping {
    node: Arc<str>,
    total: u32,
    done: u32,
    pending: Pending,
    started_at: chrono::DateTime<chrono::Utc>,
}

impl Map {
    /// Executes the items not finished before, at most `concurrency` at once (one, plus as many
    /// as the run tree's item slots allow), and gives their outputs in item order.
    async fn map_items(
        &self,
        cx: &NodeContext,
        scope: &crate::expr::Scope,
        plan: &Plan,
        mut items: Vec<Value>,
        map: &mut Mapping,
    ) -> Result<Vec<Value>, NodeError> {
        let engine = cx.engine();
        let recorder = cx.recorder();
        let max_bytes = engine.limits().max_output_bytes;
        // Items an earlier execution finished are not executed again.
        let mut outputs: Vec<Option<Value>> = vec![None; items.len()];
        let mut bytes = 0usize;
        if let Some(recorder) = &recorder {
            let done = recorder
                .items(cx.run_id(), &map.node)
                .await
                .map_err(|e| NodeError::retryable(format!("reading finished items: {e}")))?;
            for (index, value) in done {
                if let Some(slot) = outputs.get_mut(index as usize) {
                    bytes += check_size(&value, usize::MAX)?;
                    *slot = Some(value);
                }
            }
        }
        map.done = outputs.iter().filter(|o| o.is_some()).count() as u32;
        let todo: Vec<usize> = (0..items.len()).filter(|&i| outputs[i].is_none()).collect();
        cx.take_items(todo.len() as u64)?;
        cx.set_items(ItemProgress {
            total: map.total,
            done: map.done,
        });

        // Each item's nodes may output their share of this run's limit, its input included.
        let log_limit = cx.item_log_limit(self.concurrency);
        // Stops the items still running whenever this returns (a failed item, an error).
        let items_cancel = cx.cancellation().child_token();
        let _stop_items = items_cancel.clone().drop_guard();
        let slots = cx.item_slots().clone();
        let mut todo = todo.into_iter().peekable();
        let mut running = FuturesUnordered::new();
        let flush_timer = tokio::time::sleep(BATCH_AGE);
        tokio::pin!(flush_timer);
        let mut launched = 0usize;
        loop {
            while running.len() < self.concurrency && todo.peek().is_some() {
                // One item runs on its own; more take a slot of the run tree's.
                let slot = match slots.clone().try_acquire_owned() {
                    Ok(slot) => Some(slot),
                    Err(_) if running.is_empty() => None,
                    Err(_) => break,
                };
                let Some(index) = todo.next() else { break };
                let item = Arc::new(std::mem::take(&mut items[index]));
                let input = match &self.input {
                    None => Ok(Arc::unwrap_or_clone(item)),
                    Some(template) => template
                        .render(&scope.with_item(item, index))
                        .map_err(|e| format!("input of item {index}: {e}")),
                };
                let input = input.and_then(|input| {
                    check_size(&input, log_limit)
                        .map(|_| input)
                        .map_err(|_| format!("input of item {index}: more than its share of the run's output limit ({log_limit} bytes)"))
                });
                let run = Item {
                    cancel: items_cancel.child_token(),
                    log_limit,
                };
                running.push(async move {
                    let result = match input {
                        Ok(input) => Ok(engine.execute_item(plan, input, cx, run).await),
                        Err(message) => Err(message),
                    };
                    drop(slot);
                    (index, result)
                });
                launched += 1;
                // Rendering inputs is CPU work: let the runtime's other tasks in now and then.
                if launched.is_multiple_of(16) {
                    tokio::task::yield_now().await;
                }
            }
            // Finished items wait at most BATCH_AGE for their checkpoint, even while the items
            // still running take long. One timer a batch, not one an item.
            let next = tokio::select! {
                biased;
                next = running.next() => next,
                () = &mut flush_timer, if map.pending.since.is_some() => {
                    map.checkpoint(cx).await?;
                    continue;
                }
            };
            let Some((index, result)) = next else {
                break;
            };
            let value = match result
                .map_err(|message| (message, "node_failed"))
                .and_then(|result| outcome(index, result))
            {
                Ok(value) => value,
                Err((message, code)) => match self.on_item_error {
                    OnItemError::Continue => serde_json::json!({"error": message, "code": code}),
                    // The items still running stop; the finished ones are checkpointed, for
                    // a retry of the step, a resumed run, or a rerun of the failed items.
                    OnItemError::Fail => {
                        map.checkpoint(cx).await?;
                        return Err(NodeError::retryable(message));
                    }
                },
            };
            // The outputs together may not pass the step's limit: fail as soon as they do,
            // holding no more than the limit.
            let size = check_size(&value, max_bytes.saturating_sub(bytes))
                .map_err(|_| NodeError::OutputTooLarge { limit: max_bytes })?;
            bytes += size;
            map.done += 1;
            if map.pending.since.is_none() {
                let now = Instant::now();
                map.pending.since = Some(now);
                flush_timer
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(now + BATCH_AGE));
            }
            if recorder.is_some() {
                let value = Arc::new(value);
                map.pending.items.push((index as u32, value.clone()));
                map.pending.bytes += size;
                outputs[index] = Some(Arc::unwrap_or_clone(value));
            } else {
                outputs[index] = Some(value);
            }
            if map.pending.is_due() {
                map.checkpoint(cx).await?;
            }
        }
        Ok(outputs
            .into_iter()
            .map(|o| o.unwrap_or(Value::Null))
            .collect())
    }
}

impl Mapping {
    /// Writes the pending items (in a durable execution), shows the step's progress, and tells
    /// the run's listeners how far the map got.
    async fn checkpoint(&mut self, cx: &NodeContext) -> Result<(), NodeError> {
        let items = std::mem::take(&mut self.pending.items);
        self.pending.bytes = 0;
        self.pending.since = None;
        let progress = ItemProgress {
            total: self.total,
            done: self.done,
        };
        cx.set_items(progress);
        if let Some(recorder) = cx.recorder()
            && !items.is_empty()
        {
            let batch = ItemBatch {
                node: self.node.clone(),
                progress,
                started_at: self.started_at,
                items,
            };
            recorder
                .record_items(cx.run_id(), batch)
                .await
                .map_err(|e| NodeError::retryable(format!("checkpointing items: {e}")))?;
        }
        // The top-level run's maps tell the node executions of every item below them (a
        // nested map's events have no listener).
        let executions = if cx.is_top_level() {
            cx.take_item_executions()
        } else {
            0
        };
        cx.emit(&RunEvent::ItemsDone {
            run_id: cx.run_id().clone(),
            node: self.node.clone(),
            total: self.total,
            done: self.done,
            executions,
        });
        Ok(())
    }
}
