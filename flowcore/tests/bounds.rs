//! What one hostile node can cost: memory of scripts and templates, the runs of a subflow tree,
//! the work of compiling a large flow. Memory is watched as the process's peak resident set
//! (`VmHWM`, reset through `/proc/self/clear_refs`), with flowcore's counting allocator
//! installed as the server installs it.

mod common;

use common::assert_error;
use flowcore::{Engine, FlowDef, RunStatus};
use serde_json::{Value, json};

#[global_allocator]
static ALLOCATOR: flowcore::memory::Counting<std::alloc::System> =
    flowcore::memory::Counting(std::alloc::System);

/// One memory measurement at a time: the tests of this file share the process.
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmHWM/VmRSS line")
}

/// Runs `work` and returns how far the peak resident set rose above the resident set before,
/// in MB.
async fn peak_growth_mb<F: std::future::Future<Output = ()>>(work: F) -> u64 {
    // "5" resets the peak to the current resident set (Linux 4.0+).
    std::fs::write("/proc/self/clear_refs", "5").expect("clear_refs");
    let before = kib("VmRSS:");
    work.await;
    kib("VmHWM:").saturating_sub(before) / 1024
}

async fn run_node(engine: &Engine, node: Value) -> flowcore::RunResult {
    let flow = FlowDef::from_value(json!({"nodes": [node]})).unwrap();
    let plan = engine.compile(&flow).unwrap();
    engine.run(&plan, json!({})).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_script_stops_when_it_holds_more_than_its_memory() {
    let _one = MEASURING.lock().await;
    // 200 statements, each keeping a new copy of an 8 MB string: 1.6 GB unbounded.
    let mut source = String::from("let s = \"\"; s.pad(8000000, \"x\");\n");
    for i in 0..200 {
        source.push_str(&format!("let c{i} = s + \"{i}\";\n"));
    }
    source.push_str("c199.len()");
    let engine = Engine::new();
    let mut result = None;
    let growth = peak_growth_mb(async {
        result = Some(
            run_node(
                &engine,
                json!({"id": "s", "type": "script", "params": {"source": source, "timeout_ms": 60000}}),
            )
            .await,
        );
    })
    .await;
    let result = result.unwrap();
    assert_eq!(result.status, RunStatus::Failed);
    let error = result.error.unwrap();
    assert!(error.contains("held more than 256 MB"), "{error}");
    assert!(growth < 500, "the peak rose by {growth} MB");

    // Under the limit, the same kind of script runs.
    let result = run_node(
        &engine,
        json!({"id": "s", "type": "script", "params": {"source": "let s = \"\"; s.pad(1000000, \"x\"); let t = s + s; t.len()"}}),
    )
    .await;
    assert_eq!(result.output, Some(json!(2_000_000)));
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_stop_at_their_rendered_size() {
    let _one = MEASURING.lock().await;
    let engine = Engine::new();
    let cases = [
        // 15 million items as JSON: 3,000 references to one list until converted.
        json!({"id": "t", "type": "set", "params": {"fields": {"v": "{{ [[0]*5000]*3000 }}"}}}),
        // A string built by concatenation in a loop.
        json!({"id": "t", "type": "template", "params": {"template": "{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}"}}),
        json!({"id": "t", "type": "template", "params": {"template": "a {{ 'x' * 90000000 }}"}}),
    ];
    for node in cases {
        let mut result = None;
        let growth = peak_growth_mb(async {
            result = Some(run_node(&engine, node.clone()).await);
        })
        .await;
        let result = result.unwrap();
        assert_eq!(result.status, RunStatus::Failed, "{node}");
        let error = result.error.unwrap();
        assert!(error.contains("larger than 32 MB"), "{node}: {error}");
        assert!(growth < 300, "{node}: the peak rose by {growth} MB");
    }
}

#[tokio::test]
async fn a_script_cannot_read_modules_from_disk() {
    let engine = Engine::new();
    let mut errors = Vec::new();
    for path in ["/etc/passwd", "../../../etc/hostname", "/no/such/file"] {
        let result = run_node(
            &engine,
            json!({"id": "s", "type": "script", "params": {"source": format!("import \"{path}\" as m; 1")}}),
        )
        .await;
        assert_eq!(result.status, RunStatus::Failed);
        let error = result.error.unwrap();
        assert!(error.contains("not found"), "{error}");
        errors.push(error.replace(path, "PATH"));
    }
    // The answer does not tell which files exist.
    assert!(errors.windows(2).all(|w| w[0] == w[1]), "{errors:?}");
}

#[tokio::test]
async fn a_subflow_tree_stops_at_its_total_runs() {
    use flowcore::ports::FlowStore;
    let flows = std::sync::Arc::new(flowcore::ports::memory::MemoryFlowStore::new());
    // Each run calls itself twice down to depth 7, within the depth limit: 255 runs.
    let call = json!({"flow_id": "twice", "input": {"d": "{{ input.d + 1 }}"}});
    flows
        .create(
            &FlowDef::from_value(json!({"id": "twice", "nodes": [
                {"id": "more", "type": "branch", "params": {"condition": "input.d < 7"}},
                {"id": "a", "type": "subflow", "params": call},
                {"id": "b", "type": "subflow", "params": call}
            ], "edges": [
                {"from": "more", "port": "true", "to": "a"},
                {"from": "more", "port": "true", "to": "b"}
            ]}))
            .unwrap(),
        )
        .await
        .unwrap();
    let engine = Engine::builder()
        .flow_store(flows.clone())
        .limits(flowcore::Limits {
            max_subflow_runs: 100,
            ..Default::default()
        })
        .build();
    let plan = engine
        .compile_stored(&flows.get("twice", None).await.unwrap())
        .unwrap();
    let unbounded = Engine::builder().flow_store(flows.clone()).build();
    let result = unbounded.run(&plan, json!({"d": 0})).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let result = engine.run(&plan, json!({"d": 0})).await;
    assert_eq!(result.status, RunStatus::Failed);
    assert_error(&result, "started 100 subflow runs");
}

#[test]
fn a_large_flow_compiles_in_linear_work_and_a_larger_one_is_refused() {
    // 20,000 nodes in a chain, each naming the first: one upward walk per node was quadratic.
    let n = flowcore::plan::MAX_NODES;
    let nodes: Vec<Value> = (0..n)
        .map(|i| json!({"id": format!("n{i}"), "type": "set", "params": {"fields": {"v": "{{ nodes.n0 }}"}}}))
        .collect();
    let edges: Vec<Value> = (1..n)
        .map(|i| json!({"from": format!("n{}", i - 1), "to": format!("n{i}")}))
        .collect();
    let mut nodes_0 = nodes.clone();
    nodes_0[0] = json!({"id": "n0", "type": "noop"});
    let flow = FlowDef::from_value(json!({"nodes": nodes_0, "edges": edges})).unwrap();
    assert_eq!(Engine::new().compile(&flow).unwrap().len(), n);

    // A reference to a node that is not upstream is still found, wherever it is.
    let mut wrong = flow.clone();
    wrong.nodes[5] = FlowDef::from_value(json!({"nodes": [
        {"id": "n5", "type": "set", "params": {"fields": {"v": "{{ nodes.n9 }}"}}}
    ]}))
    .unwrap()
    .nodes
    .remove(0);
    let problems = Engine::new().compile(&wrong).unwrap_err().problems;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].problem.contains("`n9` is not upstream"));

    let mut too_many = flow;
    too_many.nodes.push(too_many.nodes[1].clone());
    let problems = Engine::new().compile(&too_many).unwrap_err().problems;
    assert!(
        problems[0].problem.contains("at most 20000 nodes"),
        "{problems:?}"
    );
}

#[tokio::test]
async fn a_script_that_nests_its_data_deeply_fails_without_taking_the_process_down() {
    // `a = [a]` for twenty seconds: rhai checks the size of what it builds on each assignment
    // by walking it (quadratic), so depth grows slower and slower; what twenty seconds build in
    // a debug build overflowed a pool thread's 2 MB stack when dropped, aborting the process.
    let engine = Engine::new();
    let limits = json!({"timeout_ms": 60000, "max_operations": 1_000_000_000u64});
    for (source, deep_value) in [
        (
            "let t = timestamp(); let a = []; let d = 0; while t.elapsed < 20.0 { a = [a]; d += 1; } d",
            false,
        ),
        (
            "let t = timestamp(); let m = #{}; while t.elapsed < 1.0 { m = #{x: m}; } m",
            true,
        ),
    ] {
        let mut params = limits.clone();
        params["source"] = json!(source);
        let result = run_node(
            &engine,
            json!({"id": "s", "type": "script", "params": params}),
        )
        .await;
        // Reaching here is the point: the process is still up, and the run ended.
        if deep_value {
            assert_eq!(result.status, RunStatus::Failed);
            let error = result.error.unwrap();
            assert!(error.contains("nests deeper than 64"), "{error}");
        } else {
            assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
            let depth = result.output.unwrap().as_u64().unwrap();
            eprintln!("depth reached: {depth}");
            assert!(depth > 5_000, "{depth} levels");
        }
    }
}

#[test]
fn templates_cannot_carry_values_across_loop_iterations() {
    // With `namespace()`, `{% set ns.a = [ns.a] %}` in a loop nested a value deep enough to
    // overflow the stack when dropped, and `ns.s ~ ns.s` doubled a string each turn.
    let flow = FlowDef::from_value(json!({"nodes": [{"id": "t", "type": "template", "params": {"template":
        "{% set ns = namespace(a=[]) %}{% for i in range(100000) %}{% set ns.a = [ns.a] %}{% endfor %}{{ ns.a }}"}}]}))
    .unwrap();
    let problems = Engine::new().compile(&flow).unwrap_err().problems;
    assert!(
        problems[0].problem.contains("unknown variable `namespace`"),
        "{problems:?}"
    );
}
