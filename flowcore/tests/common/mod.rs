//! Test nodes shared by the integration tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowcore::{
    Engine, Limits, Node, NodeContext, NodeError, Output, ParamError, Plan, Registry, async_trait,
};
use serde_json::{Value, json};

/// Counts executions per node and the most nodes in flight at once.
#[derive(Debug, Default)]
pub struct Probe {
    pub order: Mutex<Vec<String>>,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
}

impl Probe {
    pub fn runs_of(&self, id: &str) -> usize {
        self.order
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == id)
            .count()
    }
}

struct ProbeNode {
    probe: Arc<Probe>,
    sleep: Duration,
    fail_until: u32,
    fatal: bool,
}

#[async_trait]
impl Node for ProbeNode {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        self.probe
            .order
            .lock()
            .unwrap()
            .push(cx.node_id().to_owned());
        let now = self.probe.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.probe.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if !self.sleep.is_zero() {
            tokio::time::sleep(self.sleep).await;
        }
        self.probe.in_flight.fetch_sub(1, Ordering::SeqCst);
        if cx.attempt() < self.fail_until {
            let message = format!("failing attempt {}", cx.attempt());
            return Err(if self.fatal {
                NodeError::fatal(message)
            } else {
                NodeError::retryable(message)
            });
        }
        Ok(json!({"node": cx.node_id(), "attempt": cx.attempt()}).into())
    }
}

/// A registry with the built-ins plus `probe` (params: `sleep_ms`, `fail_until` attempt,
/// `fatal`) and `boom` (panics).
pub fn registry(probe: &Arc<Probe>) -> Registry {
    let mut registry = Registry::with_builtins();
    let p = probe.clone();
    registry.register(
        "probe",
        move |params: &Value| -> Result<Box<dyn Node>, ParamError> {
            Ok(Box::new(ProbeNode {
                probe: p.clone(),
                sleep: Duration::from_millis(params["sleep_ms"].as_u64().unwrap_or(0)),
                fail_until: params["fail_until"].as_u64().unwrap_or(0) as u32,
                fatal: params["fatal"].as_bool().unwrap_or(false),
            }))
        },
    );
    registry.register("boom", |_: &Value| -> Result<Box<dyn Node>, ParamError> {
        Ok(Box::new(Boom))
    });
    registry
}

struct Boom;

#[async_trait]
impl Node for Boom {
    async fn run(&self, _cx: &NodeContext) -> Result<Output, NodeError> {
        panic!("boom")
    }
}

pub fn engine(probe: &Arc<Probe>) -> Engine {
    Engine::builder().registry(registry(probe)).build()
}

pub fn engine_with_limits(probe: &Arc<Probe>, limits: Limits) -> Engine {
    Engine::builder()
        .registry(registry(probe))
        .limits(limits)
        .build()
}

pub fn compile(engine: &Engine, flow: Value) -> Plan {
    match engine.compile(&flowcore::FlowDef::from_value(flow).expect("parse")) {
        Ok(plan) => plan,
        Err(e) => panic!("compile: {e}"),
    }
}

/// Asserts that `result` ended with an error that says `text`.
#[track_caller]
pub fn assert_error(result: &flowcore::RunResult, text: &str) {
    let error = result.error.as_deref().unwrap_or_default();
    assert!(error.contains(text), "`{text}` not in {:?}", result.error);
}
