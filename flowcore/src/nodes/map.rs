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
        let engine = cx.engine();
        let plan = match &self.child {
            Child::Inline(plan) => plan.clone(),
            Child::Stored { flow_id, version } => load_stored(cx, flow_id, *version).await?,
        };
        let total = u32::try_from(items.len()).unwrap_or(u32::MAX);
        let node: Arc<str> = Arc::from(cx.node_id());
        let recorder = cx.recorder();
        let max_bytes = engine.limits().max_output_bytes;

        // Items an earlier execution finished are not executed again.
        let mut outputs: Vec<Option<Value>> = vec![None; items.len()];
        let mut bytes = 0usize;
        if let Some(recorder) = &recorder {
            let done = recorder
                .items(cx.run_id(), &node)
                .await
                .map_err(|e| NodeError::retryable(format!("reading finished items: {e}")))?;
            for (index, value) in done {
                if let Some(slot) = outputs.get_mut(index as usize) {
                    bytes += check_size(&value, usize::MAX)?;
                    *slot = Some(value);
                }
            }
        }
        let mut done = outputs.iter().filter(|o| o.is_some()).count() as u32;

        let concurrency = self.concurrency.min(cx.item_width()).max(1);
        let width = (cx.item_width() / concurrency).max(1);
        let mut items = items;
        let todo: Vec<usize> = (0..items.len()).filter(|&i| outputs[i].is_none()).collect();
        let mut todo = todo.into_iter();
        let mut running = FuturesUnordered::new();
        let mut pending = Pending {
            items: Vec::new(),
            bytes: 0,
            since: None,
        };
        let started_at = chrono::Utc::now();
        let mut failed: Option<NodeError> = None;
        let flush_timer = tokio::time::sleep(BATCH_AGE);
        tokio::pin!(flush_timer);
        loop {
            while failed.is_none() && running.len() < concurrency {
                let Some(index) = todo.next() else { break };
                let item = std::mem::take(&mut items[index]);
                let input = match &self.input {
                    None => item,
                    Some(template) => template
                        .render(&scope.with_item(Arc::new(item), index))
                        .map_err(|e| NodeError::fatal(format!("input of item {index}: {e}")))?,
                };
                let plan = &plan;
                let run = Item {
                    cancel: cx.cancellation().child_token(),
                    width,
                };
                running
                    .push(async move { (index, engine.execute_item(plan, input, cx, run).await) });
            }
            // Finished items wait at most BATCH_AGE for their checkpoint, even while the items
            // still running take long. One timer a batch, not one an item.
            let next = tokio::select! {
                biased;
                next = running.next() => next,
                () = &mut flush_timer, if pending.since.is_some() => {
                    self.checkpoint(cx, &node, &mut pending, total, done, started_at)
                        .await?;
                    continue;
                }
            };
            let Some((index, result)) = next else {
                break;
            };
            let value = match outcome(index, result) {
                Ok(value) => value,
                Err((message, code)) => match self.on_item_error {
                    OnItemError::Continue => serde_json::json!({"error": message, "code": code}),
                    OnItemError::Fail => {
                        // The items still running stop (the finished ones stay checkpointed).
                        failed = Some(NodeError::retryable(message));
                        break;
                    }
                },
            };
            // The outputs together may not pass the step's limit: fail as soon as they do,
            // holding no more than the limit.
            let size = check_size(&value, max_bytes.saturating_sub(bytes))
                .map_err(|_| NodeError::OutputTooLarge { limit: max_bytes })?;
            bytes += size;
            done += 1;
            if pending.since.is_none() {
                let now = Instant::now();
                pending.since = Some(now);
                flush_timer
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(now + BATCH_AGE));
            }
            if recorder.is_some() {
                let value = Arc::new(value);
                pending.items.push((index as u32, value.clone()));
                pending.bytes += size;
                outputs[index] = Some(Arc::unwrap_or_clone(value));
            } else {
                outputs[index] = Some(value);
            }
            if pending.is_due() {
                self.checkpoint(cx, &node, &mut pending, total, done, started_at)
                    .await?;
            }
        }
        drop(running);
        self.checkpoint(cx, &node, &mut pending, total, done, started_at)
            .await?;
        if let Some(e) = failed {
            return Err(e);
        }
        let values: Vec<Value> = outputs
            .into_iter()
            .map(|o| o.unwrap_or(Value::Null))
            .collect();
        Ok(Output {
            items: Some(ItemProgress { total, done }),
            ..Output::new(Value::Array(values))
        })
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

impl Map {
    /// Writes the pending items (in a durable execution) and tells the run's listeners how far
    /// the map got.
    async fn checkpoint(
        &self,
        cx: &NodeContext,
        node: &Arc<str>,
        pending: &mut Pending,
        total: u32,
        done: u32,
        started_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), NodeError> {
        if pending.since.is_none() {
            return Ok(());
        }
        let items = std::mem::take(&mut pending.items);
        pending.bytes = 0;
        pending.since = None;
        let progress = ItemProgress { total, done };
        if let Some(recorder) = cx.recorder()
            && !items.is_empty()
        {
            let batch = ItemBatch {
                node: node.clone(),
                progress,
                started_at,
                items,
            };
            recorder
                .record_items(cx.run_id(), batch)
                .await
                .map_err(|e| NodeError::retryable(format!("checkpointing items: {e}")))?;
        }
        cx.emit(&RunEvent::ItemsDone {
            run_id: cx.run_id().clone(),
            node: node.clone(),
            total,
            done,
            executions: cx.take_item_executions(),
        });
        Ok(())
    }
}
