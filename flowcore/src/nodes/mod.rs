//! The built-in node types.

mod basic;
#[cfg(feature = "http")]
pub(crate) mod http;
#[cfg(feature = "llm")]
pub(crate) mod llm;
mod map;
#[cfg(feature = "script")]
mod script;
mod subflow;
mod wait;

pub use map::{MAX_CONCURRENCY as MAX_MAP_CONCURRENCY, MAX_ITEMS as MAX_MAP_ITEMS};
pub use wait::is_signal_name;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ParamError;
use crate::node::Registry;

pub(crate) fn register_builtins(registry: &mut Registry) {
    registry
        .register("set", basic::set)
        .register("branch", basic::branch)
        .register("template", basic::template)
        .register("noop", basic::noop)
        .register("delay", wait::delay)
        .register("wait", wait::wait)
        .register("subflow", subflow::build)
        .register("map", map::MapFactory);
    #[cfg(feature = "script")]
    registry.register("script", script::build);
    #[cfg(feature = "http")]
    registry.register("http_request", http::build);
    #[cfg(feature = "llm")]
    registry.register("llm_chat", llm::build);
}

/// Compiles an optional JSON param whose strings are templates, naming the param in its error.
pub(crate) fn value_template(
    value: Option<&Value>,
    param: &str,
) -> Result<Option<crate::expr::ValueTemplate>, ParamError> {
    value
        .map(crate::expr::ValueTemplate::compile)
        .transpose()
        .map_err(|e| ParamError::new(format!("{param}: {e}")))
}

/// Reads a node's params into a typed struct (which should refuse unknown fields), with a
/// message that names the param.
pub fn parse_params<T: DeserializeOwned>(params: &Value) -> Result<T, ParamError> {
    T::deserialize(params).map_err(|e| ParamError::new(e.to_string()))
}
