//! Register your own node type and use it in a flow: `cargo run -p flowcore-examples --example custom_node`.
//! The node (`shout`) is in `src/lib.rs`; `custom_node_server` serves the same node over HTTP.
use flowcore::Engine;
use serde_json::json;

#[tokio::main]
async fn main() {
    let engine = Engine::builder()
        .registry(flowcore_examples::registry_with_shout())
        .build();
    let plan = engine
        .compile_json(r#"{"nodes": [{"id": "loud", "type": "shout", "params": {"field": "name", "times": 3}}]}"#)
        .expect("the flow compiles");
    let result = engine.run(&plan, json!({"name": "ada"})).await;
    println!("{}", result.output.unwrap_or_default());
}
