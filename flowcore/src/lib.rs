//! flowcore: a workflow engine library. A flow is a DAG of steps (nodes) written as JSON; it is
//! compiled once into an immutable [`Plan`], and the [`Engine`] executes runs of it on tokio,
//! concurrently where the graph allows, with retries, timeouts, cancellation and limits.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! use flowcore::{Engine, RunStatus};
//! use serde_json::json;
//!
//! let engine = Engine::new();
//! let plan = engine.compile_json(r#"{
//!   "nodes": [
//!     {"id": "hello", "type": "set", "params": {"fields": {"greeting": "hello {{ input.name }}"}}},
//!     {"id": "big", "type": "branch", "params": {"condition": "input.n > 5"}},
//!     {"id": "a", "type": "set", "params": {"fields": {"path": "a", "msg": "{{ nodes.hello.greeting }}"}}},
//!     {"id": "b", "type": "set", "params": {"fields": {"path": "b"}}}
//!   ],
//!   "edges": [
//!     {"from": "hello", "to": "big"},
//!     {"from": "big", "port": "true", "to": "a"},
//!     {"from": "big", "port": "false", "to": "b"}
//!   ]
//! }"#).unwrap();
//! let result = engine.run(&plan, json!({"name": "ada", "n": 7})).await;
//! assert_eq!(result.status, RunStatus::Succeeded);
//! assert_eq!(result.output, Some(json!({"path": "a", "msg": "hello ada"})));
//! # });
//! ```
//!
//! The crate has no database or server dependency. Storage is behind the traits in [`ports`],
//! with in-memory implementations in [`ports::memory`]; `flowcore-store` has the SQL, Redis and
//! blob adapters.

#![warn(missing_docs)]

pub mod cache;
pub mod durable;
pub mod engine;
pub mod error;
pub mod event;
pub mod expr;
pub mod ids;
pub mod json;
mod locate;
pub mod memory;
pub mod model;
pub mod net;
pub mod node;
pub mod nodes;
pub mod plan;
pub mod ports;
pub mod rerun;
pub mod run;
pub mod secret;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod wait;

pub use async_trait::async_trait;
pub use engine::{Engine, EngineBuilder, Limits, RunHandle, RunOptions};
pub use error::{CompileError, Error, NodeError, ParamError, ParseError, Problem, StoreError};
pub use event::{BroadcastSink, EventSink, RunEvent};
pub use ids::RunId;
pub use model::{
    EdgeDef, FlowDef, NodeDef, OnError, Retention, RetryPolicy, Settings, Trigger, WebhookAuth,
    WebhookMode,
};
pub use node::{BuildContext, Node, NodeContext, NodeFactory, Output, Registry};
pub use plan::Plan;
pub use run::{
    ItemBatch, ItemProgress, Move, RunResult, RunStatus, StepRecord, StepRecorder, StepStatus,
    Transition,
};
pub use tokio_util::sync::CancellationToken;
