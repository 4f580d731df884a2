//! Arbitrary text as a template and as an expression: compile and render must never panic.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let scope = flowcore::expr::Scope::input_only(Arc::new(serde_json::json!({"a": [1, {"b": "c"}], "n": 3})));
    if let Ok(t) = flowcore::expr::Template::compile(text) {
        let _ = t.render(&scope);
        let _ = t.references();
    }
    if let Ok(e) = flowcore::expr::Expression::compile(text) {
        let _ = e.eval_json(&scope);
    }
});
