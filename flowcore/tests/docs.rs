//! Every example of the flow reference (`docs/flows.md`) works: each `json flow` block
//! compiles, each `json flow store` block is stored (for the `subflow` and `map` examples that
//! name it), and each `json run` block after a flow gives the output it says for its input.

use std::sync::Arc;

use flowcore::ports::FlowStore;
use flowcore::ports::memory::MemoryFlowStore;
use flowcore::testkit::docs::fenced_blocks;
use flowcore::{Engine, FlowDef, RunStatus};
use serde_json::Value;

const REFERENCE: &str = include_str!("../../docs/flows.md");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_of_the_flow_reference_works() {
    let store = Arc::new(MemoryFlowStore::new());
    let engine = Engine::builder().flow_store(store.clone()).build();
    let mut last: Option<(FlowDef, usize)> = None;
    let (mut compiled, mut ran) = (0, 0);
    for (n, (info, body)) in fenced_blocks(REFERENCE).into_iter().enumerate() {
        match info.as_str() {
            "json flow" | "json flow store" => {
                let flow = FlowDef::from_json(&body)
                    .unwrap_or_else(|e| panic!("block {n} does not parse: {e}\n{body}"));
                if let Err(e) = engine.compile(&flow) {
                    panic!("block {n} does not compile: {e}\n{body}");
                }
                if info == "json flow store" {
                    store.create(&flow).await.expect("stored");
                }
                compiled += 1;
                last = Some((flow, n));
            }
            "json run" => {
                let (flow, at) = last.as_ref().expect("a run block follows a flow");
                let case: Value = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("block {n} is not JSON: {e}"));
                let plan = engine.compile(flow).expect("compiled above");
                let result = engine.run(&plan, case["input"].clone()).await;
                assert_eq!(
                    result.status,
                    RunStatus::Succeeded,
                    "the flow of block {at} with block {n}'s input: {:?}",
                    result.error
                );
                assert_eq!(
                    result.output.as_ref(),
                    Some(&case["output"]),
                    "the output of block {at}'s flow for block {n}'s input"
                );
                ran += 1;
            }
            _ => {}
        }
    }
    assert!(compiled >= 15 && ran >= 10, "{compiled} flows, {ran} runs");
}

/// The README's flow is the quick start's file, byte for byte: one is not changed without the
/// other.
#[test]
fn the_readmes_flow_is_the_quick_starts_file() {
    let readme = include_str!("../../README.md");
    let after = &readme[readme.find("## A flow").expect("a section `A flow`")..];
    let (_, first) = fenced_blocks(after)
        .into_iter()
        .next()
        .expect("a block in `A flow`");
    assert_eq!(first, include_str!("../../examples/flows/greet.json"));
}

/// Every relative link of the docs leads somewhere: its file exists, and its `#anchor` is a
/// heading of that file (as GitHub makes anchors: lower case, punctuation dropped, spaces as
/// hyphens).
#[test]
fn every_link_of_the_docs_resolves() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pages = [
        "README.md",
        "ARCHITECTURE.md",
        "BENCHMARKS.md",
        "CHANGELOG.md",
        "SECURITY.md",
        "docs/api.md",
        "docs/console.md",
        "docs/deployment.md",
        "docs/flows.md",
    ];
    let anchors = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with('#'))
            .map(|l| {
                l.trim_start_matches('#')
                    .trim()
                    .to_lowercase()
                    .chars()
                    .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
                    .map(|c| if c == ' ' { '-' } else { c })
                    .collect()
            })
            .collect()
    };
    let mut checked = 0;
    for page in pages {
        let path = root.join(page);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{page}: {e}"));
        // `](target)` outside code blocks; targets with a scheme are not ours to check.
        let mut in_code = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
            }
            if in_code {
                continue;
            }
            for part in line.split("](").skip(1) {
                let Some(target) = part.split(')').next() else {
                    continue;
                };
                if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
                    continue;
                }
                let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
                let linked = if file.is_empty() {
                    path.clone()
                } else {
                    path.parent().expect("a folder").join(file)
                };
                assert!(
                    linked.exists(),
                    "{page} links to {target}, which does not exist"
                );
                if !anchor.is_empty() {
                    let text = std::fs::read_to_string(&linked).unwrap_or_default();
                    assert!(
                        anchors(&text).iter().any(|a| a == anchor),
                        "{page} links to {target}: no such heading"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "{checked} links checked");
}
