//! Register your own node type and use it in a flow: `cargo run -p flowcore-examples --example custom_node`.
use flowcore::{Engine, Node, NodeContext, NodeError, Output, ParamError, Registry, async_trait};
use serde_json::{Value, json};

/// `shout`: upper-cases a field of the run's input, with `!` repeated `times` times.
struct Shout {
    field: String,
    times: usize,
}

#[async_trait]
impl Node for Shout {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        let text = cx.input()[&self.field]
            .as_str()
            .ok_or_else(|| NodeError::fatal(format!("input.{} is not a string", self.field)))?;
        Ok(json!(format!("{}{}", text.to_uppercase(), "!".repeat(self.times))).into())
    }
}

#[tokio::main]
async fn main() {
    let mut registry = Registry::with_builtins();
    registry.register(
        "shout",
        |params: &Value| -> Result<Box<dyn Node>, ParamError> {
            let field = params["field"]
                .as_str()
                .ok_or_else(|| ParamError::new("field: a string is required"))?;
            let times = params["times"].as_u64().unwrap_or(1).min(10) as usize;
            Ok(Box::new(Shout {
                field: field.to_owned(),
                times,
            }))
        },
    );
    let engine = Engine::builder().registry(registry).build();
    let plan = engine
        .compile_json(r#"{"nodes": [{"id": "loud", "type": "shout", "params": {"field": "name", "times": 3}}]}"#)
        .expect("the flow compiles");
    let result = engine.run(&plan, json!({"name": "ada"})).await;
    println!("{}", result.output.unwrap_or_default());
}
