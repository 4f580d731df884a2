//! Arbitrary bytes as a flow document: parsing and compiling must never panic or hang.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

static ENGINE: LazyLock<flowcore::Engine> = LazyLock::new(flowcore::Engine::new);

fuzz_target!(|data: &[u8]| {
    if let Ok(flow) = flowcore::FlowDef::from_slice(data) {
        let _ = ENGINE.compile(&flow);
    }
});
