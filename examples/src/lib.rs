//! Examples live beside this file as `[[example]]` targets; what several of them share is here.

use flowcore::{Node, NodeContext, NodeError, Output, ParamError, Registry, async_trait};
use serde_json::{Value, json};

/// `shout`: upper-cases a field of the run's input, with `!` repeated `times` times (at most
/// 10).
#[derive(Debug)]
pub struct Shout {
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

/// The built-in node types and `shout`.
///
/// ```
/// let registry = flowcore_examples::registry_with_shout();
/// assert!(registry.get("shout").is_some());
/// ```
pub fn registry_with_shout() -> Registry {
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
    registry
}
