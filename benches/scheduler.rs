//! Scheduler and compiler benchmarks: `cargo bench -p flowcore-benches`.
//!
//! - `baseline/*`: a bare `tokio::spawn` + join, the yardstick for per-node overhead.
//! - `schedule/*`: no-op nodes through the engine (chain, fan-out, layered diamonds).
//! - `map/*`: a `map` of 10,000 items over a one-node child.
//! - `compile/*`: compiling large flows.
//! - `run/greet_4_nodes`: the contract's example flow (set -> branch -> set) end to end,
//!   1,000 runs per iteration, 100 in flight at a time, on a 2-thread runtime.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flowcore::{Engine, FlowDef, Plan};
use flowcore_benches::runtime;
use serde_json::{Value, json};

fn noop(i: usize) -> Value {
    json!({"id": format!("n{i}"), "type": "noop"})
}

fn chain(n: usize) -> FlowDef {
    let nodes: Vec<Value> = (0..n).map(noop).collect();
    let edges: Vec<Value> = (1..n)
        .map(|i| json!({"from": format!("n{}", i - 1), "to": format!("n{i}")}))
        .collect();
    FlowDef::from_value(json!({"nodes": nodes, "edges": edges})).expect("flow")
}

fn fan_out(n: usize) -> FlowDef {
    let nodes: Vec<Value> = (0..=n).map(noop).collect();
    let edges: Vec<Value> = (1..=n)
        .map(|i| json!({"from": "n0", "to": format!("n{i}")}))
        .collect();
    FlowDef::from_value(json!({"nodes": nodes, "edges": edges, "output": "n0"})).expect("flow")
}

/// `layers` layers of `width` nodes; each node depends on every node of the layer before.
fn diamonds(layers: usize, width: usize) -> FlowDef {
    let id = |l: usize, w: usize| format!("n{l}_{w}");
    let mut nodes = Vec::new();
    let mut edges = Vec::new();
    for l in 0..layers {
        for w in 0..width {
            nodes.push(json!({"id": id(l, w), "type": "noop"}));
            if l > 0 {
                for p in 0..width {
                    edges.push(json!({"from": id(l - 1, p), "to": id(l, w)}));
                }
            }
        }
    }
    FlowDef::from_value(json!({"nodes": nodes, "edges": edges, "output": id(0, 0)})).expect("flow")
}

fn compile(engine: &Engine, flow: &FlowDef) -> Plan {
    engine.compile(flow).expect("compiles")
}

fn baseline(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("baseline");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("spawn_join_sequential_1000", |b| {
        b.to_async(&rt).iter(|| async {
            for i in 0..1000u64 {
                black_box(
                    tokio::spawn(async move { black_box(i) })
                        .await
                        .expect("join"),
                );
            }
        });
    });
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("spawn_join_all_10000", |b| {
        b.to_async(&rt).iter(|| async {
            let handles: Vec<_> = (0..10_000u64)
                .map(|i| tokio::spawn(async move { black_box(i) }))
                .collect();
            for h in handles {
                black_box(h.await.expect("join"));
            }
        });
    });
    g.finish();
}

fn schedule(c: &mut Criterion) {
    let rt = runtime();
    let engine = Engine::new();
    let mut g = c.benchmark_group("schedule");
    for (name, flow, nodes) in [
        ("chain_1000", chain(1000), 1000u64),
        ("fan_out_10000", fan_out(10_000), 10_001),
        ("diamonds_50x10", diamonds(50, 10), 500),
    ] {
        let plan = compile(&engine, &flow);
        g.throughput(Throughput::Elements(nodes));
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let result = engine.run(&plan, Value::Null).await;
                assert_eq!(result.status, flowcore::RunStatus::Succeeded);
                black_box(result)
            });
        });
    }
    g.finish();
}

/// `map` over 10,000 items of a one-node (`noop`) child: the cost of an item (a child run
/// of one node) against a node's (`schedule/*`).
fn mapping(c: &mut Criterion) {
    let rt = runtime();
    let engine = Engine::new();
    let mut g = c.benchmark_group("map");
    let items: Vec<usize> = (0..10_000).collect();
    let input = json!({ "items": items });
    for concurrency in [8, 64] {
        let flow = FlowDef::from_value(json!({"nodes": [{"id": "m", "type": "map", "params": {
            "items": "{{ input.items }}",
            "concurrency": concurrency,
            "flow": {"nodes": [{"id": "n", "type": "noop"}]}
        }}]}))
        .expect("flow");
        let plan = compile(&engine, &flow);
        g.throughput(Throughput::Elements(10_000));
        g.bench_function(format!("noop_child_10000_at_{concurrency}"), |b| {
            b.to_async(&rt).iter(|| async {
                let result = engine.run(&plan, input.clone()).await;
                assert_eq!(result.status, flowcore::RunStatus::Succeeded);
                black_box(result)
            });
        });
    }
    g.finish();
}

fn compiling(c: &mut Criterion) {
    let engine = Engine::new();
    let mut g = c.benchmark_group("compile");
    for n in [1000usize, 10_000] {
        let flow = chain(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("chain", n), &flow, |b, flow| {
            b.iter(|| compile(&engine, black_box(flow)))
        });
    }
    let templated = {
        let n = 10_000;
        let nodes: Vec<Value> = (0..n)
            .map(|i| {
                if i == 0 {
                    json!({"id": "n0", "type": "set", "params": {"fields": {"v": "{{ input.x }}"}}})
                } else {
                    json!({"id": format!("n{i}"), "type": "set", "params": {"fields": {"v": format!("{{{{ nodes.n{}.v }}}}", i - 1)}}})
                }
            })
            .collect();
        let edges: Vec<Value> = (1..n)
            .map(|i| json!({"from": format!("n{}", i - 1), "to": format!("n{i}")}))
            .collect();
        FlowDef::from_value(json!({"nodes": nodes, "edges": edges})).expect("flow")
    };
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("templated_chain/10000", |b| {
        b.iter(|| compile(&engine, black_box(&templated)))
    });
    // The most nodes a flow may have, each naming the first: "is it upstream?" was one walk up
    // the chain per node (quadratic: 4.96 s); now one pass.
    let first_named = {
        let n = flowcore::plan::MAX_NODES;
        let nodes: Vec<Value> = (0..n)
            .map(|i| {
                if i == 0 {
                    json!({"id": "n0", "type": "noop"})
                } else {
                    json!({"id": format!("n{i}"), "type": "set", "params": {"fields": {"v": "{{ nodes.n0 }}"}}})
                }
            })
            .collect();
        let edges: Vec<Value> = (1..n)
            .map(|i| json!({"from": format!("n{}", i - 1), "to": format!("n{i}")}))
            .collect();
        FlowDef::from_value(json!({"nodes": nodes, "edges": edges})).expect("flow")
    };
    g.throughput(Throughput::Elements(flowcore::plan::MAX_NODES as u64));
    g.sample_size(10);
    g.bench_function("first_named_chain/20000", |b| {
        b.iter(|| compile(&engine, black_box(&first_named)))
    });
    g.finish();
}

fn end_to_end(c: &mut Criterion) {
    let rt = runtime();
    let engine = Engine::new();
    let greet: FlowDef =
        FlowDef::from_json(include_str!("../examples/flows/greet.json")).expect("flow");
    let plan = compile(&engine, &greet);
    let mut g = c.benchmark_group("run");
    const RUNS: u64 = 1000;
    const TASKS: u64 = 100;
    g.throughput(Throughput::Elements(RUNS));
    // 100 tasks, each running 10 runs one after another: 100 runs in flight at any time, as in a
    // server with 100 concurrent requests.
    g.bench_function("greet_4_nodes", |b| {
        b.to_async(&rt).iter(|| async {
            let handles: Vec<_> = (0..TASKS)
                .map(|t| {
                    let engine = engine.clone();
                    let plan = plan.clone();
                    tokio::spawn(async move {
                        for i in 0..RUNS / TASKS {
                            let result = engine
                                .run(&plan, json!({"name": "ada", "n": (t + i) % 10}))
                                .await;
                            debug_assert_eq!(result.status, flowcore::RunStatus::Succeeded);
                            black_box(result);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.await.expect("join");
            }
        });
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = baseline, schedule, mapping, compiling, end_to_end
}
criterion_main!(benches);
