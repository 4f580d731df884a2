//! `map`: a child flow per item, in item order, bounded at once; failed items; limits; stored
//! and inline children; nesting; cancellation; and checkpointed items in durable execution.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Probe, assert_error, compile, engine};
use flowcore::durable::{self, DurableOptions, Hooks};
use flowcore::ports::memory::{MemoryFlowStore, MemoryRunStore};
use flowcore::ports::{FlowStore, NewRun, RunStore};
use flowcore::{Engine, FlowDef, ItemProgress, RunEvent, RunOptions, RunStatus, StepStatus};
use serde_json::{Value, json};

/// A flow of one `map` node with `params`, over `input.items`.
fn mapping(params: Value) -> Value {
    let mut params = params;
    params["items"] = json!("{{ input.items }}");
    json!({"nodes": [{"id": "m", "type": "map", "params": params}]})
}

/// A default engine, and `flow` compiled on it.
fn plain(flow: Value) -> (Engine, flowcore::Plan) {
    let engine = Engine::new();
    let plan = compile(&engine, flow);
    (engine, plan)
}

/// An engine with the `probe` node, and `flow` compiled on it.
fn probed(flow: Value) -> (Arc<Probe>, Engine, flowcore::Plan) {
    let probe = Arc::new(Probe::default());
    let engine = engine(&probe);
    let plan = compile(&engine, flow);
    (probe, engine, plan)
}

#[tokio::test]
async fn outputs_come_in_item_order_and_at_most_concurrency_items_run_at_once() {
    // Later items finish first: the output is still in item order.
    let (probe, engine, plan) = probed(mapping(json!({
            "flow": {"nodes": [
                {"id": "p", "type": "probe", "params": {"sleep_ms": 20}},
                {"id": "br", "type": "branch", "params": {"condition": "input % 2 == 0"}},
                {"id": "slow", "type": "delay", "params": {"ms": 40}},
                {"id": "out", "type": "script", "params": {"source": "input * 10"}}
            ], "edges": [
                {"from": "p", "to": "br"},
                {"from": "br", "port": "true", "to": "slow"},
                {"from": "slow", "to": "out"},
                {"from": "br", "port": "false", "to": "out"}
            ], "output": "out"},
            "concurrency": 3
    })));
    let items: Vec<u32> = (0..12).collect();
    let result = engine.run(&plan, json!({ "items": items })).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let expected: Vec<u32> = items.iter().map(|i| i * 10).collect();
    assert_eq!(result.output, Some(json!(expected)));
    assert_eq!(probe.runs_of("p"), 12, "one child per item");
    assert_eq!(probe.max_in_flight.load(Ordering::SeqCst), 3);
    let step = result.step("m").unwrap();
    assert_eq!(
        step.items,
        Some(ItemProgress {
            total: 12,
            done: 12
        })
    );
}

#[tokio::test]
async fn the_input_template_sees_item_index_and_the_parents_scope() {
    let (engine, plan) = plain(json!({
        "nodes": [
            {"id": "first", "type": "set", "params": {"fields": {"tag": "t"}}},
            {"id": "m", "type": "map", "params": {
                "items": "{{ input.orders }}",
                "input": {"order": "{{ item }}", "n": "{{ index }}", "customer": "{{ input.customer }}", "tag": "{{ nodes.first.tag }}"},
                "flow": {"nodes": [{"id": "t", "type": "template", "params": {"template": "{{ input.customer }}-{{ input.n }}-{{ input.order.id }}-{{ input.tag }}"}}]}
            }}
        ],
        "edges": [{"from": "first", "to": "m"}]
    }));
    let input = json!({"customer": "ada", "orders": [{"id": "a"}, {"id": "b"}]});
    let result = engine.run(&plan, input).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(result.output, Some(json!(["ada-0-a-t", "ada-1-b-t"])));
}

#[tokio::test]
async fn a_failed_item_fails_the_node_or_becomes_an_error_entry() {
    let engine = Engine::new();
    let child = json!({"nodes": [{"id": "s", "type": "script", "params": {"source": "if input == 2 { throw \"two\" } input"}}]});
    let fail = compile(&engine, mapping(json!({"flow": child})));
    let result = engine.run(&fail, json!({"items": [1, 2, 3]})).await;
    assert_eq!(result.status, RunStatus::Failed);
    let error = result.error.unwrap();
    assert!(
        error.contains("item 1 failed") && error.contains("two"),
        "{error}"
    );

    let go_on = compile(
        &engine,
        mapping(json!({"flow": child, "on_item_error": "continue"})),
    );
    let result = engine.run(&go_on, json!({"items": [1, 2, 3]})).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let out = result.output.unwrap();
    assert_eq!((&out[0], &out[2]), (&json!(1), &json!(3)));
    assert_eq!(out[1]["code"], "node_failed");
    assert!(out[1]["error"].as_str().unwrap().contains("two"), "{out}");
}

#[tokio::test]
async fn bad_items_and_too_many_items_fail_with_a_clear_error() {
    let (engine, plan) = plain(mapping(
        json!({"flow": {"nodes": [{"id": "n", "type": "noop"}]}, "max_items": 3}),
    ));
    let result = engine.run(&plan, json!({"items": [1, 2, 3, 4]})).await;
    assert_eq!(result.status, RunStatus::Failed);
    assert_error(&result, "4 items, more than max_items (3)");
    let result = engine.run(&plan, json!({"items": "nope"})).await;
    assert_error(&result, "must give an array, not a string");
    // Params are checked when the flow is compiled, the inline flow with them.
    let bad = |params: Value| {
        let flow = FlowDef::from_value(mapping(params)).unwrap();
        engine.compile(&flow).unwrap_err().to_string()
    };
    let noop = json!({"nodes": [{"id": "n", "type": "noop"}]});
    assert!(bad(json!({"flow": noop, "concurrency": 0})).contains("concurrency"));
    assert!(bad(json!({"flow": noop, "max_items": 100_001})).contains("max_items"));
    assert!(bad(json!({"flow": noop, "flow_id": "x"})).contains("exactly one of flow_id and flow"));
    assert!(bad(json!({})).contains("exactly one of flow_id and flow"));
    assert!(
        bad(json!({"flow": {"nodes": [{"id": "n", "type": "nope"}]}}))
            .contains("unknown node type `nope`")
    );
    let waits =
        bad(json!({"flow": {"nodes": [{"id": "w", "type": "wait", "params": {"signal": "s"}}]}}));
    assert!(waits.contains("`wait` is not allowed"), "{waits}");
    // A reference to a name the scope does not have is refused; `item` and `index` are there.
    let unknown = bad(json!({"flow": noop, "input": "{{ itme }}"}));
    assert!(unknown.contains("itme"), "{unknown}");
}

#[tokio::test]
async fn a_stored_child_runs_by_flow_id_and_one_that_waits_is_refused() {
    let flows = Arc::new(MemoryFlowStore::new());
    let engine = Engine::builder().flow_store(flows.clone()).build();
    for flow in [
        json!({"id": "double", "nodes": [{"id": "t", "type": "script", "params": {"source": "input * 2"}}]}),
        json!({"id": "waits", "nodes": [{"id": "w", "type": "wait", "params": {"signal": "s"}}]}),
    ] {
        let flow = FlowDef::from_value(flow).unwrap();
        flows.create(&flow).await.unwrap();
    }
    let plan = compile(&engine, mapping(json!({"flow_id": "double"})));
    let result = engine.run(&plan, json!({"items": [1, 2]})).await;
    assert_eq!(result.output, Some(json!([2, 4])), "{:?}", result.error);
    let plan = compile(&engine, mapping(json!({"flow_id": "waits"})));
    let result = engine.run(&plan, json!({"items": [1]})).await;
    assert_error(&result, "has `wait` nodes");
    let plan = compile(&engine, mapping(json!({"flow_id": "missing"})));
    let result = engine.run(&plan, json!({"items": [1]})).await;
    assert_error(&result, "flow `missing` not found");
}

#[tokio::test]
async fn a_map_inside_a_map_works() {
    let (engine, plan) = plain(mapping(json!({
        "flow": {"nodes": [{"id": "inner", "type": "map", "params": {
            "items": "{{ input }}",
            "flow": {"nodes": [{"id": "t", "type": "script", "params": {"source": "input + 1"}}]}
        }}]}
    })));
    let result = engine.run(&plan, json!({"items": [[1, 2], [], [3]]})).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(result.output, Some(json!([[2, 3], [], [4]])));
}

#[tokio::test]
async fn cancelling_the_parent_stops_every_child_and_a_childs_delay_sleeps_in_place() {
    let (probe, engine, plan) = probed(mapping(json!({
            "flow": {"nodes": [
                {"id": "p", "type": "probe", "params": {"sleep_ms": 60000}}
            ]},
            "concurrency": 4
    })));
    let handle = engine.start(
        &plan,
        json!({"items": [1, 2, 3, 4, 5, 6]}),
        RunOptions::default(),
    );
    for _ in 0..200 {
        if probe.in_flight.load(Ordering::SeqCst) == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        probe.in_flight.load(Ordering::SeqCst),
        4,
        "four children run"
    );
    handle.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), handle.wait())
        .await
        .expect("the run ends at once");
    assert_eq!(result.status, RunStatus::Cancelled);
    assert_eq!(probe.runs_of("p"), 4, "no item started after the cancel");

    // In a durable execution a child's delay does not park the run: it sleeps in place.
    let runs: Arc<dyn RunStore> = Arc::new(MemoryRunStore::new());
    let (engine, plan) = plain(mapping(
        json!({"flow": {"nodes": [{"id": "d", "type": "delay", "params": {"ms": 1100}}]}}),
    ));
    let options = DurableOptions::new("w");
    let new = NewRun::new("f", 1, json!({"items": [1, 2]})).claimed(options.claim());
    let (run, _) = runs.create(new).await.unwrap();
    let done = durable::execute(&engine, &plan, &runs, &run, &options, Hooks::default())
        .await
        .unwrap();
    assert_eq!(done.status, RunStatus::Succeeded, "{:?}", done.error);
}

#[tokio::test]
async fn progress_is_told_as_items_finish() {
    let (engine, plan) = plain(mapping(json!({"flow": {"nodes": [
        {"id": "a", "type": "noop"}, {"id": "b", "type": "noop"}
    ]}})));
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    let options = RunOptions {
        events: Some(Arc::new(move |e: &RunEvent| {
            sink.lock().unwrap().push(e.clone())
        })),
        ..Default::default()
    };
    let result = engine
        .execute(&plan, json!({"items": [1, 2, 3]}), options)
        .await;
    assert_eq!(result.status, RunStatus::Succeeded);
    let events = events.lock().unwrap();
    let (done, executions) = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::ItemsDone {
                done, executions, ..
            } => Some((*done, *executions)),
            _ => None,
        })
        .fold((0, 0), |(_, n), (done, e)| (done, n + e));
    assert_eq!(done, 3, "the last event says every item is done");
    assert_eq!(executions, 6, "two node executions per item, told once");
    assert_eq!(result.step("m").unwrap().status, StepStatus::Succeeded);
}

/// Records each input it runs with, after `sleep`, and outputs it doubled; items from 20 up
/// take a minute while `slow_tail` is set.
struct Seen {
    inputs: Arc<std::sync::Mutex<Vec<Value>>>,
    sleep: Duration,
    slow_tail: Arc<std::sync::atomic::AtomicBool>,
}

#[flowcore::async_trait]
impl flowcore::Node for Seen {
    async fn run(
        &self,
        cx: &flowcore::NodeContext,
    ) -> Result<flowcore::Output, flowcore::NodeError> {
        let n = cx.input().as_u64().unwrap_or_default();
        if n >= 20 && self.slow_tail.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        tokio::time::sleep(self.sleep).await;
        self.inputs.lock().unwrap().push((**cx.input()).clone());
        Ok(json!(cx.input().as_u64().unwrap_or_default() * 2).into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_durable_run_executes_only_the_items_that_had_not_finished() {
    let inputs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut registry = flowcore::Registry::with_builtins();
    let seen = inputs.clone();
    let slow_tail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let slow = slow_tail.clone();
    registry.register(
        "seen",
        move |_: &Value| -> Result<Box<dyn flowcore::Node>, flowcore::ParamError> {
            Ok(Box::new(Seen {
                inputs: seen.clone(),
                sleep: Duration::from_millis(40),
                slow_tail: slow.clone(),
            }))
        },
    );
    let engine = Engine::builder().registry(registry).build();
    let plan = compile(
        &engine,
        mapping(json!({"flow": {"nodes": [{"id": "s", "type": "seen"}]}, "concurrency": 4})),
    );
    let runs: Arc<dyn RunStore> = Arc::new(MemoryRunStore::new());
    let options = DurableOptions::new("w1");
    let items: Vec<u64> = (0..40).collect();
    let new = NewRun::new("f", 1, json!({ "items": items })).claimed(options.claim());
    let (run, _) = runs.create(new).await.unwrap();

    // The worker hands the run back half way (as a shutdown does), the first items finished
    // and checkpointed, the last ones still running: what was checkpointed stays done.
    let hand_back = flowcore::CancellationToken::new();
    let hooks = Hooks {
        hand_back: Some(hand_back.clone()),
        ..Hooks::default()
    };
    let stopper = tokio::spawn({
        let runs = runs.clone();
        let id = run.id.clone();
        async move {
            for _ in 0..500 {
                if runs.items(&id, "m").await.unwrap().len() >= 16 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            hand_back.cancel();
        }
    });
    let handed = durable::execute(&engine, &plan, &runs, &run, &options, hooks)
        .await
        .unwrap();
    stopper.await.unwrap();
    assert_eq!(handed.status, RunStatus::Queued, "handed back");
    let checkpointed: Vec<u32> = runs
        .items(&run.id, "m")
        .await
        .unwrap()
        .into_iter()
        .map(|(i, _)| i)
        .collect();
    assert!(
        checkpointed.len() >= 16 && checkpointed.iter().all(|i| *i < 20),
        "{checkpointed:?}"
    );
    let steps = runs.steps(&run.id).await.unwrap();
    let progress = steps.iter().find(|s| &*s.node == "m").unwrap();
    assert_eq!(progress.status, StepStatus::Running);
    assert_eq!(progress.items.unwrap().total, 40);

    // Another worker resumes it.
    slow_tail.store(false, Ordering::SeqCst);
    let run = runs
        .claim_run(&run.id, "w2", Duration::from_secs(30))
        .await
        .unwrap();
    let options = DurableOptions::new("w2");
    let done = durable::execute(&engine, &plan, &runs, &run, &options, Hooks::default())
        .await
        .unwrap();
    assert_eq!(done.status, RunStatus::Succeeded, "{:?}", done.error);
    let doubled: Vec<u64> = items.iter().map(|i| i * 2).collect();
    assert_eq!(done.output, Some(json!(doubled)), "every item's result");
    let inputs = inputs.lock().unwrap().clone();
    for index in &checkpointed {
        let ran = inputs.iter().filter(|v| **v == json!(index)).count();
        assert_eq!(ran, 1, "checkpointed item {index} ran once");
    }
    for index in &items {
        assert!(inputs.contains(&json!(index)), "item {index} ran");
    }
    let steps = runs.steps(&run.id).await.unwrap();
    let step = steps.iter().find(|s| &*s.node == "m").unwrap();
    assert_eq!(
        step.items,
        Some(ItemProgress {
            total: 40,
            done: 40
        })
    );
    assert!(
        runs.items(&run.id, "m").await.unwrap().is_empty(),
        "cleared"
    );
}

#[tokio::test]
async fn an_items_bad_input_is_its_error_entry_and_a_failed_map_keeps_its_progress() {
    let engine = Engine::new();
    let child =
        json!({"nodes": [{"id": "t", "type": "template", "params": {"template": "{{ input }}"}}]});
    let go_on = compile(
        &engine,
        mapping(json!({"flow": child, "input": "{{ item.a.b }}", "on_item_error": "continue"})),
    );
    let result = engine
        .run(&go_on, json!({"items": [{"a": {"b": 1}}, {"c": 2}]}))
        .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let out = result.output.unwrap();
    assert_eq!(out[0], json!("1"));
    assert!(
        out[1]["error"]
            .as_str()
            .unwrap()
            .contains("input of item 1"),
        "{out}"
    );
    let fail = compile(
        &engine,
        mapping(json!({"flow": child, "input": "{{ item.a.b }}", "concurrency": 1})),
    );
    let result = engine
        .run(
            &fail,
            json!({"items": [{"a": {"b": 1}}, {"c": 2}, {"a": {"b": 3}}]}),
        )
        .await;
    assert_eq!(result.status, RunStatus::Failed);
    let step = result.step("m").unwrap();
    assert_eq!(
        step.items,
        Some(ItemProgress { total: 3, done: 1 }),
        "{step:?}"
    );
}

#[tokio::test]
async fn an_item_may_output_its_share_of_the_run_limit_only() {
    let engine = Engine::builder()
        .limits(flowcore::Limits {
            max_run_log_bytes: 400_000,
            ..Default::default()
        })
        .build();
    // Four at once: each item may output 100,000 bytes.
    let plan = compile(
        &engine,
        mapping(json!({
            "flow": {"nodes": [{"id": "t", "type": "script", "params": {"source": "let s = \"\"; s.pad(input, \"x\"); s"}}]},
            "concurrency": 4,
            "on_item_error": "continue"
        })),
    );
    let result = engine
        .run(&plan, json!({"items": [10, 90000, 150000]}))
        .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    let out = result.output.unwrap();
    assert_eq!(out[1].as_str().map(str::len), Some(90000));
    assert!(
        out[2]["error"]
            .as_str()
            .unwrap()
            .contains("share of the run's output limit"),
        "{}",
        out[2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maps_of_a_run_share_its_item_slots() {
    // Six maps side by side, each asking for 256 items at once: together they run at most the
    // run's slots, plus one item each.
    let maps: Vec<Value> = (0..6)
        .map(|i| {
            json!({"id": format!("m{i}"), "type": "map", "params": {
                "items": "{{ input.items }}", "concurrency": 256,
                "flow": {"nodes": [{"id": "p", "type": "probe", "params": {"sleep_ms": 300}}]}
            }})
        })
        .collect();
    let (probe, engine, plan) = probed(json!({ "nodes": maps }));
    let items: Vec<u32> = (0..256).collect();
    let result = engine.run(&plan, json!({ "items": items })).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(probe.runs_of("p"), 6 * 256);
    let most = probe.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (1024..=1024 + 6).contains(&most),
        "at most the run's 1,024 slots and one item a map: {most}"
    );
}
