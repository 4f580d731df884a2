//! Embed flowcore in a service with zero servers: flows in memory, runs with events and a
//! recorder: `cargo run -p flowcore-examples --example embed`.
use std::sync::Arc;

use flowcore::ports::FlowStore;
use flowcore::ports::memory::MemoryFlowStore;
use flowcore::{Engine, FlowDef, RunEvent, RunOptions};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let flows = Arc::new(MemoryFlowStore::new());
    let engine = Engine::builder().flow_store(flows.clone()).build();
    let greet = FlowDef::from_json(include_str!("flows/greet.json"))?;
    flows.create(&greet).await?;

    let stored = flows.get("greet", None).await?;
    let plan = engine.compile(&stored.definition)?;
    let options = RunOptions {
        events: Some(Arc::new(|e: &RunEvent| {
            eprintln!("event: {}", serde_json::to_string(e).unwrap_or_default())
        })),
        ..RunOptions::default()
    };
    let result = engine
        .execute(&plan, json!({"name": "ada", "n": 7}), options)
        .await;
    println!("{} -> {}", result.status, result.output.unwrap_or_default());
    Ok(())
}
