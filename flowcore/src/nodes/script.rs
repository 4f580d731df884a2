//! `script`: a sandboxed rhai script. It sees `input`, `nodes` (its ancestors' outputs) and
//! `attempt`; its value is the node's output; `throw` fails the node.
//!
//! The sandbox: no file, network or process access (rhai has none without extra packages, and
//! `import` finds no module), `print`/`debug` go nowhere, and each execution is bounded in
//! operations, wall time and memory ([`Limits::max_node_memory_bytes`](crate::Limits)) and
//! stops when the run is cancelled. Scripts run on tokio's blocking pool, so a busy script never
//! stalls other runs.

use std::cell::Cell;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rhai::{AST, Dynamic, EvalAltResult, Scope};
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::parse_params;
use crate::error::{NodeError, ParamError};
use crate::node::{Node, NodeContext, Output};

const DEFAULT_MAX_OPERATIONS: u64 = 1_000_000;
const MAX_MAX_OPERATIONS: u64 = 1_000_000_000;
const DEFAULT_TIMEOUT_MS: u64 = 1_000;
const MAX_TIMEOUT_MS: u64 = 60_000;

/// The limits of the execution on this thread, read by the engine's progress callback.
#[derive(Clone, Copy)]
struct Budget {
    deadline: Instant,
    max_operations: u64,
    /// The thread's live bytes when the script started, and how many more it may hold.
    memory_base: i64,
    max_memory: i64,
}

thread_local! {
    static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
    static CANCEL: std::cell::RefCell<Option<CancellationToken>> = const { std::cell::RefCell::new(None) };
}

static RHAI: LazyLock<rhai::Engine> = LazyLock::new(|| {
    let mut engine = rhai::Engine::new();
    engine.set_max_expr_depths(64, 32);
    engine.set_max_call_levels(32);
    engine.set_max_string_size(16 * 1024 * 1024);
    engine.set_max_array_size(1_000_000);
    engine.set_max_map_size(1_000_000);
    engine.on_print(|_| {});
    engine.on_debug(|_, _, _| {});
    engine.disable_symbol("eval");
    // `import` must not read the server's disk (rhai's default resolver loads `.rhai` files
    // from any path, and its errors tell which exist): every module is "not found".
    engine.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    engine.on_progress(|ops| {
        let budget = BUDGET.get()?;
        if ops > budget.max_operations {
            return Some(Dynamic::from(format!(
                "the script ran more than {} operations",
                budget.max_operations
            )));
        }
        // One operation allocates at most a string or collection of the sizes above, so
        // looking after each keeps the overshoot to one of those.
        let held = crate::memory::thread_live_bytes() - budget.memory_base;
        if held > budget.max_memory {
            return Some(Dynamic::from(format!(
                "the script held more than {} MB of memory",
                budget.max_memory / (1024 * 1024)
            )));
        }
        // Reading the clock costs more than an operation: look every 1024 operations.
        if ops % 1024 == 0 {
            if Instant::now() >= budget.deadline {
                return Some(Dynamic::from(
                    "the script ran past its time limit".to_owned(),
                ));
            }
            if CANCEL.with_borrow(|c| c.as_ref().is_some_and(CancellationToken::is_cancelled)) {
                return Some(Dynamic::from("the run was cancelled".to_owned()));
            }
        }
        None
    });
    engine
});

/// Scripts running at once in this process: one fewer than the CPUs (at least one), so that a
/// core stays for the runtime's threads (health checks, requests, other runs) however many
/// CPU-bound scripts are started; the rest wait their turn without holding a thread.
static RUNNING: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    tokio::sync::Semaphore::new(cpus.saturating_sub(1).max(1))
});

/// The stack of a script's thread: enough for the deepest data the default operation limit can
/// build (each `a = [a]` costs a few operations and a few hundred bytes of stack to walk).
const SCRIPT_STACK: usize = 512 * 1024 * 1024;

struct Script {
    ast: Arc<AST>,
    max_operations: u64,
    timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptParams {
    source: String,
    #[serde(default)]
    max_operations: Option<u64>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

pub(crate) fn build(params: &Value) -> Result<Box<dyn Node>, ParamError> {
    let p: ScriptParams = parse_params(params)?;
    let max_operations = p.max_operations.unwrap_or(DEFAULT_MAX_OPERATIONS);
    if max_operations == 0 || max_operations > MAX_MAX_OPERATIONS {
        return Err(ParamError::new(format!(
            "max_operations must be between 1 and {MAX_MAX_OPERATIONS}"
        )));
    }
    let timeout_ms = p.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
        return Err(ParamError::new(format!(
            "timeout_ms must be between 1 and {MAX_TIMEOUT_MS}"
        )));
    }
    let ast = RHAI
        .compile(&p.source)
        .map_err(|e| ParamError::new(format!("source: {e}")))?;
    Ok(Box::new(Script {
        ast: Arc::new(ast),
        max_operations,
        timeout: Duration::from_millis(timeout_ms),
    }))
}

#[async_trait]
impl Node for Script {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        let max_memory =
            i64::try_from(cx.engine().limits().max_node_memory_bytes).unwrap_or(i64::MAX);
        // The turn first: a script waiting for one holds only references to the run's data.
        let _turn = tokio::select! {
            turn = RUNNING.acquire() => turn.map_err(|_| NodeError::fatal("the script pool is closed"))?,
            () = cx.cancellation().cancelled() => return Err(NodeError::fatal("the run was cancelled")),
        };
        let input = cx.input().clone();
        let ancestors = cx.ancestors();
        let attempt = i64::from(cx.attempt());
        let ast = self.ast.clone();
        let deadline = Instant::now() + self.timeout;
        let max_operations = self.max_operations;
        let cancel = cx.cancellation().clone();
        let (done, result) = tokio::sync::oneshot::channel();
        let task = move || {
            // Counted from before the script's copies of its data are made, on its own thread:
            // the copies are its memory, and freeing them gives it nothing more.
            let memory_base = crate::memory::thread_live_bytes();
            let input = rhai::serde::to_dynamic(&*input).map_err(|e| format!("input: {e}"))?;
            let mut nodes = rhai::Map::new();
            for (id, output) in &ancestors {
                let value =
                    rhai::serde::to_dynamic(&**output).map_err(|e| format!("nodes: {e}"))?;
                nodes.insert(id.as_str().into(), value);
            }
            drop(ancestors);
            BUDGET.set(Some(Budget {
                deadline,
                max_operations,
                memory_base,
                max_memory,
            }));
            CANCEL.set(Some(cancel));
            let mut scope = Scope::new();
            scope
                .push_constant("input", input)
                .push_constant("nodes", Dynamic::from_map(nodes))
                .push_constant("attempt", attempt);
            let result = RHAI.eval_ast_with_scope::<Dynamic>(&mut scope, &ast);
            BUDGET.set(None);
            CANCEL.set(None);
            // What the script built is freed here, on its thread, before the next one starts.
            drop(scope);
            let value = result.map_err(|e| describe(*e)).and_then(|value| {
                rhai::serde::from_dynamic::<Value>(&value)
                    .map_err(|e| format!("the script's value is not JSON: {e}"))
            })?;
            // Refused (and dropped) here, on this thread's stack, not after it is handed back.
            if crate::json::too_deep(&value) {
                return Err(format!(
                    "the script's value nests deeper than {} levels",
                    crate::json::MAX_DEPTH
                ));
            }
            Ok(value)
        };
        // A thread of its own with a large stack (reserved, not used, until a script needs
        // it): rhai walks, checks and drops nested data recursively, and `a = [a]` in a loop
        // nests it as deep as the script's operations allow, far past a pool thread's 2 MB
        // (seen: the process aborted on a stack overflow).
        std::thread::Builder::new()
            .name("flowcore-script".into())
            .stack_size(SCRIPT_STACK)
            .spawn(move || {
                let _ = done.send(task());
            })
            .map_err(|e| NodeError::retryable(format!("no thread for the script: {e}")))?;
        match result.await {
            Ok(Ok(value)) => Ok(value.into()),
            // A `throw`, a run-time error, a limit passed: the node's `retry` policy decides
            // (a flow that asks for 3 attempts of a script gets 3).
            Ok(Err(message)) => Err(NodeError::retryable(message)),
            Err(_) => Err(NodeError::fatal("the script stopped abnormally")),
        }
    }
}

fn describe(error: EvalAltResult) -> String {
    match error {
        EvalAltResult::ErrorTerminated(reason, _) => reason
            .into_string()
            .unwrap_or_else(|_| "the script was stopped".into()),
        EvalAltResult::ErrorRuntime(value, pos) => {
            let text = if value.is_string() {
                value.into_string().unwrap_or_default()
            } else {
                value.to_string()
            };
            format!("the script threw: {text} ({pos})")
        }
        other => format!("script error: {other}"),
    }
}
