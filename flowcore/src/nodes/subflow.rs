//! `subflow`: runs another stored flow as one step.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;

use super::parse_params;
use crate::error::{NodeError, ParamError, StoreError};
use crate::expr::{References, ValueTemplate};
use crate::model::is_valid_id;
use crate::node::{Node, NodeContext, Output};
use crate::plan::Plan;
use crate::run::RunStatus;

struct Subflow {
    flow_id: String,
    version: Option<u32>,
    input: Option<ValueTemplate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubflowParams {
    flow_id: String,
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    input: Option<Value>,
}

pub(crate) fn build(params: &Value) -> Result<Box<dyn Node>, ParamError> {
    let p: SubflowParams = parse_params(params)?;
    if !is_valid_id(&p.flow_id) {
        return Err(ParamError::new("flow_id: not a valid flow id"));
    }
    let input = super::value_template(p.input.as_ref(), "input")?;
    Ok(Box::new(Subflow {
        flow_id: p.flow_id,
        version: p.version,
        input,
    }))
}

/// The compiled plan of stored flow `flow_id` (`version`, or the version current when the
/// top-level run started), to run as a child: compiled once per version, and refused when it
/// has `wait` nodes (only a top-level run can park).
pub(crate) async fn load_stored(
    cx: &NodeContext,
    flow_id: &str,
    version: Option<u32>,
) -> Result<Plan, NodeError> {
    let engine = cx.engine();
    let flows = engine.flow_store();
    let stored = match version {
        Some(v) => flows.get(flow_id, Some(v)).await,
        None => flows.get_as_of(flow_id, cx.run.started_at).await,
    };
    let stored = stored.map_err(|e| match e {
        StoreError::NotFound { .. } => NodeError::fatal(format!("flow `{flow_id}` not found")),
        e if e.is_retryable() => NodeError::retryable(format!("loading flow `{flow_id}`: {e}")),
        e => NodeError::fatal(format!("loading flow `{flow_id}`: {e}")),
    })?;
    let plan = match engine.compiled(&stored) {
        Some(plan) => plan,
        // Compiled once per version, on the blocking pool: a large flow is milliseconds of
        // CPU that must not hold up the runtime's threads.
        None => {
            let engine = engine.clone();
            tokio::task::spawn_blocking(move || engine.compile_stored(&stored))
                .await
                .map_err(|e| NodeError::fatal(format!("compiling flow `{flow_id}`: {e}")))?
                .map_err(|e| NodeError::fatal(format!("flow `{flow_id}`: {e}")))?
        }
    };
    if !plan.signals().is_empty() {
        return Err(NodeError::fatal(format!(
            "flow `{flow_id}` has `wait` nodes, which a subflow or a `map` item cannot have \
             (only a top-level run can park)"
        )));
    }
    Ok(plan)
}

#[async_trait]
impl Node for Subflow {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        let engine = cx.engine();
        let plan = load_stored(cx, &self.flow_id, self.version).await?;
        let input = match &self.input {
            Some(t) => t
                .render(&cx.scope())
                .map_err(|e| NodeError::fatal(format!("input: {e}")))?,
            None => (**cx.input()).clone(),
        };
        cx.take_subflow_run()?;
        let result = engine.execute_child(&plan, input, cx).await;
        match result.status {
            RunStatus::Succeeded => Ok(result.output.unwrap_or(Value::Null).into()),
            status => {
                let message = format!(
                    "subflow `{}` {status}: {}",
                    self.flow_id,
                    result.error.unwrap_or_default()
                );
                // A child that failed or ran out of time may do better on another attempt; a
                // cancelled one was cancelled with its parent.
                Err(match status {
                    RunStatus::Cancelled => NodeError::fatal(message),
                    _ => NodeError::retryable(message),
                })
            }
        }
    }

    fn references(&self) -> References {
        self.input
            .as_ref()
            .map(ValueTemplate::references)
            .unwrap_or_default()
    }
}
