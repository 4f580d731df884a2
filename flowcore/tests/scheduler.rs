//! The scheduler's behaviours: order, concurrency, skips, retries, timeouts, cancellation,
//! error handling, limits, events, durability hooks, panics.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Probe, compile, engine, engine_with_limits};
use flowcore::{
    Engine, Limits, RunEvent, RunId, RunOptions, RunResult, RunStatus, StepRecord, StepRecorder,
    StepStatus, StoreError, async_trait,
};
use serde_json::{Value, json};

/// How many attempts the run made of `node`.
fn attempts(result: &RunResult, node: &str) -> u32 {
    result.step(node).expect("the node ran").attempts
}

/// Runs `flow` once on a default engine, with an empty input.
async fn run_flow(flow: Value) -> RunResult {
    run_on(&Engine::new(), flow).await
}

/// Runs `flow` once on `engine`, with an empty input.
async fn run_on(engine: &Engine, flow: Value) -> RunResult {
    engine.run(&compile(engine, flow), json!({})).await
}

fn greet() -> Value {
    serde_json::from_str(include_str!("../../examples/flows/greet.json")).unwrap()
}

#[tokio::test]
async fn contract_example_takes_one_branch() {
    let engine = Engine::new();
    let plan = compile(&engine, greet());
    let big = engine.run(&plan, json!({"name": "ada", "n": 7})).await;
    assert_eq!(big.status, RunStatus::Succeeded);
    assert_eq!(big.output, Some(json!({"path": "a", "msg": "hello ada"})));
    assert_eq!(big.step("b").unwrap().status, StepStatus::Skipped);
    assert_eq!(
        big.step("big").unwrap().output.as_deref(),
        Some(&json!(true))
    );
    assert_eq!(big.step("big").unwrap().port.as_deref(), Some("true"));

    let small = engine.run(&plan, json!({"name": "bob", "n": 1})).await;
    assert_eq!(small.output, Some(json!({"path": "b"})));
    assert_eq!(small.step("a").unwrap().status, StepStatus::Skipped);
}

#[tokio::test]
async fn diamond_runs_branches_concurrently_and_joins() {
    let probe = Arc::new(Probe::default());
    let engine = engine(&probe);
    let result = run_on(
        &engine,
        json!({
            "nodes": [
                {"id": "a", "type": "probe"},
                {"id": "b", "type": "probe", "params": {"sleep_ms": 50}},
                {"id": "c", "type": "probe", "params": {"sleep_ms": 50}},
                {"id": "d", "type": "set", "params": {"fields": {"b": "{{ nodes.b.node }}", "c": "{{ nodes.c.node }}", "a": "{{ nodes.a.node }}"}}}
            ],
            "edges": [{"from": "a", "to": "b"}, {"from": "a", "to": "c"}, {"from": "b", "to": "d"}, {"from": "c", "to": "d"}]
        }),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(result.output, Some(json!({"a": "a", "b": "b", "c": "c"})));
    assert_eq!(
        probe.max_in_flight.load(Ordering::SeqCst),
        2,
        "b and c overlap"
    );
    let order = probe.order.lock().unwrap().clone();
    assert_eq!(order[0], "a");
}

#[tokio::test]
async fn max_concurrency_of_a_flow_is_respected() {
    let probe = Arc::new(Probe::default());
    let engine = engine(&probe);
    let nodes: Vec<Value> = (0..6)
        .map(|i| json!({"id": format!("n{i}"), "type": "probe", "params": {"sleep_ms": 10}}))
        .collect();
    let result = run_on(
        &engine,
        json!({"nodes": nodes, "settings": {"max_concurrency": 2}}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded);
    assert_eq!(probe.max_in_flight.load(Ordering::SeqCst), 2);
    assert_eq!(
        result.output.unwrap().as_object().unwrap().len(),
        6,
        "six sinks give an object keyed by id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_wide_limit_bounds_all_runs_together() {
    let probe = Arc::new(Probe::default());
    let limits = Limits {
        max_concurrent_nodes: Some(3),
        ..Limits::default()
    };
    let engine = engine_with_limits(&probe, limits);
    let nodes: Vec<Value> = (0..4)
        .map(|i| json!({"id": format!("n{i}"), "type": "probe", "params": {"sleep_ms": 10}}))
        .collect();
    let plan = compile(&engine, json!({"nodes": nodes}));
    let handles: Vec<_> = (0..5)
        .map(|_| engine.start(&plan, json!({}), RunOptions::default()))
        .collect();
    for h in handles {
        assert_eq!(h.wait().await.status, RunStatus::Succeeded);
    }
    assert_eq!(probe.order.lock().unwrap().len(), 20);
    assert!(
        probe.max_in_flight.load(Ordering::SeqCst) <= 3,
        "at most 3 nodes at once over all runs"
    );
}

#[tokio::test]
async fn join_after_a_branch_runs_and_skips_spread() {
    let engine = Engine::new();
    let plan = compile(
        &engine,
        json!({
            "nodes": [
                {"id": "br", "type": "branch", "params": {"condition": "input.go"}},
                {"id": "yes", "type": "set", "params": {"fields": {"v": "yes"}}},
                {"id": "no", "type": "set", "params": {"fields": {"v": "no"}}},
                {"id": "after_no", "type": "noop"},
                {"id": "deep", "type": "noop"},
                {"id": "join", "type": "template", "params": {"template": "{{ nodes.yes.v if nodes.yes else nodes.no.v }}"}}
            ],
            "edges": [
                {"from": "br", "port": "true", "to": "yes"},
                {"from": "br", "port": "false", "to": "no"},
                {"from": "no", "to": "after_no"},
                {"from": "after_no", "to": "deep"},
                {"from": "yes", "to": "join"},
                {"from": "no", "to": "join"}
            ],
            "output": "join"
        }),
    );
    let result = engine.run(&plan, json!({"go": true})).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(result.output, Some(json!("yes")));
    for skipped in ["no", "after_no", "deep"] {
        assert_eq!(
            result.step(skipped).unwrap().status,
            StepStatus::Skipped,
            "{skipped} is skipped"
        );
    }
    let result = engine.run(&plan, json!({"go": false})).await;
    assert_eq!(result.output, Some(json!("no")));
    assert_eq!(result.step("deep").unwrap().status, StepStatus::Succeeded);
}

#[tokio::test]
async fn retries_succeed_on_attempt_three() {
    let probe = Arc::new(Probe::default());
    let engine = engine(&probe);
    let plan = compile(
        &engine,
        json!({"nodes": [{"id": "f", "type": "probe", "params": {"fail_until": 3}, "retry": {"max_attempts": 3, "backoff_ms": 1, "max_backoff_ms": 5}}]}),
    );
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let options = RunOptions {
        events: Some(Arc::new(move |e: &RunEvent| {
            sink.lock().unwrap().push(e.clone())
        })),
        ..Default::default()
    };
    let result = engine.execute(&plan, json!({}), options).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(result.output, Some(json!({"node": "f", "attempt": 3})));
    assert_eq!(attempts(&result, "f"), 3);
    let attempts: Vec<u32> = events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            RunEvent::NodeStarted { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, vec![1, 2, 3]);
}

#[tokio::test]
async fn retries_stop_when_exhausted_or_fatal() {
    let probe = Arc::new(Probe::default());
    let engine = engine(&probe);
    let result = run_on(
        &engine,
        json!({"nodes": [{"id": "f", "type": "probe", "params": {"fail_until": 9}, "retry": {"max_attempts": 2, "backoff_ms": 1}}]}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Failed);
    assert_eq!(attempts(&result, "f"), 2);
    assert!(
        result
            .error
            .unwrap()
            .contains("node `f` failed: failing attempt 2")
    );

    let result = run_on(
        &engine,
        json!({"nodes": [{"id": "g", "type": "probe", "params": {"fail_until": 9, "fatal": true}, "retry": {"max_attempts": 5, "backoff_ms": 1}}]}),
    )
    .await;
    assert_eq!(attempts(&result, "g"), 1, "a fatal error is not retried");
}

#[tokio::test]
async fn node_timeout_fails_the_attempt() {
    let result = run_flow(
        json!({"nodes": [{"id": "slow", "type": "delay", "params": {"ms": 10000}, "timeout_ms": 20, "retry": {"max_attempts": 2, "backoff_ms": 1}}]}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Failed);
    let step = result.step("slow").unwrap();
    assert_eq!(step.attempts, 2, "timeouts are retryable");
    assert_eq!(step.error.as_deref(), Some("timed out after 20 ms"));
}

#[tokio::test]
async fn run_timeout_cancels_running_nodes() {
    let engine = Engine::new();
    let plan = compile(
        &engine,
        json!({"nodes": [{"id": "quick", "type": "noop"}, {"id": "slow", "type": "delay", "params": {"ms": 60000}}]}),
    );
    let options = RunOptions {
        timeout: Some(Duration::from_millis(50)),
        ..Default::default()
    };
    let result = engine.execute(&plan, json!({}), options).await;
    assert_eq!(result.status, RunStatus::TimedOut);
    assert_eq!(result.step("slow").unwrap().status, StepStatus::Cancelled);
    assert_eq!(result.step("quick").unwrap().status, StepStatus::Succeeded);
    assert!(result.output.is_none());
}

#[tokio::test]
async fn flow_setting_lowers_the_run_timeout() {
    let engine = Engine::new();
    let plan = compile(
        &engine,
        json!({"nodes": [{"id": "slow", "type": "delay", "params": {"ms": 60000}}], "settings": {"timeout_seconds": 1}}),
    );
    let result = tokio::time::timeout(Duration::from_secs(30), engine.run(&plan, json!({})))
        .await
        .unwrap();
    assert_eq!(result.status, RunStatus::TimedOut);
    assert!(result.error.unwrap().contains("timed out after 1 s"));
}

#[tokio::test]
async fn cancellation_from_outside_stops_the_run() {
    let engine = Engine::new();
    let plan = compile(
        &engine,
        json!({"nodes": [{"id": "slow", "type": "delay", "params": {"ms": 60000}}, {"id": "after", "type": "noop"}], "edges": [{"from": "slow", "to": "after"}]}),
    );
    let sink = flowcore::BroadcastSink::new(16);
    let mut rx = sink.subscribe();
    let handle = engine.start(
        &plan,
        json!({}),
        RunOptions {
            events: Some(Arc::new(sink)),
            ..Default::default()
        },
    );
    loop {
        if let RunEvent::NodeStarted { .. } = rx.recv().await.unwrap() {
            break;
        }
    }
    handle.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .expect("cancel is prompt");
    assert_eq!(result.status, RunStatus::Cancelled);
    assert_eq!(result.step("slow").unwrap().status, StepStatus::Cancelled);
    assert!(result.step("after").is_none(), "never started");
}

#[tokio::test]
async fn on_error_continue_passes_the_error_on() {
    let result = run_flow(
        json!({
            "nodes": [
                {"id": "bad", "type": "script", "params": {"source": "throw \"no luck\""}, "on_error": "continue"},
                {"id": "next", "type": "template", "params": {"template": "got {{ nodes.bad.error }}"}}
            ],
            "edges": [{"from": "bad", "to": "next"}]
        }),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(result.step("bad").unwrap().status, StepStatus::Failed);
    let out = result.output.unwrap();
    assert!(
        out.as_str()
            .unwrap()
            .starts_with("got the script threw: no luck"),
        "{out}"
    );
}

#[tokio::test]
async fn on_error_route_takes_only_the_error_port() {
    let result = run_flow(
        json!({
            "nodes": [
                {"id": "bad", "type": "script", "params": {"source": "throw \"x\""}, "on_error": "route"},
                {"id": "ok_path", "type": "set", "params": {"fields": {"v": 1}}},
                {"id": "err_path", "type": "set", "params": {"fields": {"why": "{{ nodes.bad.error }}"}}}
            ],
            "edges": [{"from": "bad", "to": "ok_path"}, {"from": "bad", "port": "error", "to": "err_path"}]
        }),
    )
    .await;
    assert_eq!(result.status, RunStatus::Succeeded);
    assert_eq!(result.step("ok_path").unwrap().status, StepStatus::Skipped);
    assert_eq!(result.step("bad").unwrap().port.as_deref(), Some("error"));
    assert!(
        result.output.unwrap()["why"]
            .as_str()
            .unwrap()
            .contains("the script threw: x")
    );
}

#[tokio::test]
async fn a_failed_node_fails_the_run_and_stops_the_others() {
    let flow = json!({"nodes": [
        {"id": "bad", "type": "script", "params": {"source": "throw \"x\""}},
        {"id": "slow", "type": "delay", "params": {"ms": 60000}}
    ]});
    let result = tokio::time::timeout(Duration::from_secs(10), run_flow(flow))
        .await
        .unwrap();
    assert_eq!(result.status, RunStatus::Failed);
    assert_eq!(result.step("slow").unwrap().status, StepStatus::Cancelled);
}

#[tokio::test]
async fn output_over_the_limit_fails_the_step() {
    let limits = Limits {
        max_output_bytes: 1000,
        ..Limits::default()
    };
    let engine = Engine::builder().limits(limits).build();
    let plan = compile(
        &engine,
        json!({"nodes": [{"id": "big", "type": "script", "params": {"source": "let s = \"\"; for i in 0..2000 { s += \"x\"; } s"}}]}),
    );
    let result = engine.run(&plan, json!({})).await;
    assert_eq!(result.status, RunStatus::Failed);
    assert_eq!(
        result.step("big").unwrap().error.as_deref(),
        Some("output is larger than the limit of 1000 bytes")
    );
    let small = compile(
        &engine,
        json!({"nodes": [{"id": "ok", "type": "script", "params": {"source": "\"fine\""}}]}),
    );
    assert_eq!(
        engine.run(&small, json!({})).await.output,
        Some(json!("fine"))
    );
}

#[tokio::test]
async fn a_run_stores_no_more_than_its_log_limit() {
    let limits = Limits {
        max_output_bytes: 1000,
        max_run_log_bytes: 2500,
        ..Limits::default()
    };
    let engine = Engine::builder().limits(limits).build();
    // Each step outputs 802 bytes: three fit (2,406), the fourth would pass 2,500.
    let node =
        |id: &str| json!({"id": id, "type": "template", "params": {"template": "{{ 'y' * 800 }}"}});
    let result = run_on(
        &engine,
        json!({"nodes": [node("a"), node("b"), node("c"), node("d")],
               "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}, {"from": "c", "to": "d"}]}),
    )
    .await;
    assert_eq!(result.status, RunStatus::Failed);
    for id in ["a", "b", "c"] {
        assert_eq!(
            result.step(id).unwrap().status,
            StepStatus::Succeeded,
            "{id}"
        );
    }
    assert_eq!(
        result.step("d").unwrap().error.as_deref(),
        Some("the run's stored outputs would pass their limit of 2500 bytes (MAX_RUN_LOG_SIZE_MB)")
    );
}

#[tokio::test]
async fn a_panicking_node_fails_instead_of_crashing() {
    let probe = Arc::new(Probe::default());
    let engine = engine(&probe);
    let plan = compile(&engine, json!({"nodes": [{"id": "b", "type": "boom"}]}));
    let result = engine.run(&plan, json!({})).await;
    assert_eq!(result.status, RunStatus::Failed);
    assert_eq!(
        result.step("b").unwrap().error.as_deref(),
        Some("the node panicked: boom")
    );
}

#[tokio::test]
async fn events_come_in_order() {
    let engine = Engine::new();
    let plan = compile(&engine, greet());
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let options = RunOptions {
        events: Some(Arc::new(move |e: &RunEvent| {
            sink.lock().unwrap().push(e.clone())
        })),
        ..Default::default()
    };
    engine
        .execute(&plan, json!({"name": "x", "n": 9}), options)
        .await;
    let names: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .map(|e| match e {
            RunEvent::NodeStarted { node, .. } => format!("start {node}"),
            RunEvent::NodeFinished { node, status, .. } => format!("{status} {node}"),
            other => other.name().to_owned(),
        })
        .collect();
    assert_eq!(
        names,
        vec![
            "run_started",
            "start hello",
            "succeeded hello",
            "start big",
            "succeeded big",
            "skipped b",
            "start a",
            "succeeded a",
            "run_finished"
        ]
    );
}

/// Records steps; fails on the node named `fail_on` once.
#[derive(Default)]
struct Recorder {
    steps: Mutex<Vec<StepRecord>>,
}

#[async_trait]
impl StepRecorder for Recorder {
    async fn record_step(&self, _run: &RunId, step: &StepRecord) -> Result<(), StoreError> {
        self.steps.lock().unwrap().push(step.clone());
        Ok(())
    }
}

#[tokio::test]
async fn resume_skips_finished_steps() {
    let probe = Arc::new(Probe::default());
    let engine = engine(&probe);
    let flow = |third_fails: bool| {
        json!({
            "nodes": [
                {"id": "one", "type": "probe"},
                {"id": "br", "type": "branch", "params": {"condition": "true"}},
                {"id": "two", "type": "probe"},
                {"id": "no", "type": "probe"},
                {"id": "three", "type": "probe", "params": {"fail_until": if third_fails { 99 } else { 0 }, "fatal": true}}
            ],
            "edges": [
                {"from": "one", "to": "br"}, {"from": "br", "port": "true", "to": "two"},
                {"from": "br", "port": "false", "to": "no"}, {"from": "two", "to": "three"}
            ]
        })
    };
    let recorder = Arc::new(Recorder::default());
    let first = engine
        .execute(
            &compile(&engine, flow(true)),
            json!({}),
            RunOptions {
                recorder: Some(recorder.clone()),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(first.status, RunStatus::Failed);
    let recorded = recorder.steps.lock().unwrap().clone();
    assert_eq!(
        recorded.len(),
        5,
        "every step reached the recorder: {recorded:?}"
    );

    let second = engine
        .execute(
            &compile(&engine, flow(false)),
            json!({}),
            RunOptions {
                resume: recorded,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(second.status, RunStatus::Succeeded, "{:?}", second.error);
    assert_eq!(
        probe.runs_of("one"),
        1,
        "finished steps are not executed again"
    );
    assert_eq!(probe.runs_of("two"), 1);
    assert_eq!(probe.runs_of("three"), 2, "the failed step runs again");
    assert_eq!(probe.runs_of("no"), 0, "the skip is kept");
    assert_eq!(second.output, Some(json!({"node": "three", "attempt": 1})));
}

struct FailingRecorder;

#[async_trait]
impl StepRecorder for FailingRecorder {
    async fn record_step(&self, _run: &RunId, _step: &StepRecord) -> Result<(), StoreError> {
        Err(StoreError::StaleLease("another worker owns the run".into()))
    }
}

#[tokio::test]
async fn a_failed_recording_stops_the_run() {
    let probe = Arc::new(Probe::default());
    let engine = engine(&probe);
    let plan = compile(
        &engine,
        json!({"nodes": [{"id": "a", "type": "probe"}, {"id": "b", "type": "probe"}], "edges": [{"from": "a", "to": "b"}]}),
    );
    let result = engine
        .execute(
            &plan,
            json!({}),
            RunOptions {
                recorder: Some(Arc::new(FailingRecorder)),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(result.status, RunStatus::Failed);
    assert!(result.error.unwrap().contains("stale lease"));
    assert_eq!(
        probe.runs_of("b"),
        0,
        "nothing runs after a step that could not be recorded"
    );
}

#[tokio::test]
async fn subflows_run_through_the_flow_store_and_nest_boundedly() {
    let engine = Engine::new();
    let child = flowcore::FlowDef::from_value(json!({
        "id": "child", "nodes": [{"id": "c", "type": "template", "params": {"template": "child got {{ input.v }}"}}]
    }))
    .unwrap();
    engine.flow_store().create(&child).await.unwrap();
    let plan = compile(
        &engine,
        json!({"nodes": [{"id": "call", "type": "subflow", "params": {"flow_id": "child", "input": {"v": "{{ input.x }}"}}}]}),
    );
    let result = engine.run(&plan, json!({"x": 5})).await;
    assert_eq!(
        result.output,
        Some(json!("child got 5")),
        "{:?}",
        result.error
    );

    let selfish = flowcore::FlowDef::from_value(json!({
        "id": "selfish", "nodes": [{"id": "again", "type": "subflow", "params": {"flow_id": "selfish"}}]
    }))
    .unwrap();
    engine.flow_store().create(&selfish).await.unwrap();
    let result = engine
        .run(&engine.compile(&selfish).unwrap(), json!({}))
        .await;
    assert_eq!(result.status, RunStatus::Failed);
    assert!(
        result
            .error
            .unwrap()
            .contains("subflows nest deeper than 8")
    );

    let missing = compile(
        &engine,
        json!({"nodes": [{"id": "m", "type": "subflow", "params": {"flow_id": "nope"}}]}),
    );
    let result = engine.run(&missing, json!({})).await;
    assert!(result.error.unwrap().contains("flow `nope` not found"));
}

#[tokio::test]
async fn scripts_are_bounded() {
    let engine = Engine::new();
    let looping = compile(
        &engine,
        json!({"nodes": [{"id": "spin", "type": "script", "params": {"source": "loop {}", "timeout_ms": 100, "max_operations": 1000000000}}]}),
    );
    let result = tokio::time::timeout(Duration::from_secs(20), engine.run(&looping, json!({})))
        .await
        .unwrap();
    assert_eq!(result.status, RunStatus::Failed);
    assert_eq!(
        result.step("spin").unwrap().error.as_deref(),
        Some("the script ran past its time limit")
    );

    let counted = compile(
        &engine,
        json!({"nodes": [{"id": "spin", "type": "script", "params": {"source": "loop {}", "max_operations": 5000}}]}),
    );
    let result = engine.run(&counted, json!({})).await;
    assert_eq!(
        result.step("spin").unwrap().error.as_deref(),
        Some("the script ran more than 5000 operations")
    );

    let computed = compile(
        &engine,
        json!({"nodes": [
            {"id": "a", "type": "set", "params": {"fields": {"k": 20}}},
            {"id": "s", "type": "script", "params": {"source": "#{ sum: input.n + nodes.a.k, attempt: attempt }"}}
        ], "edges": [{"from": "a", "to": "s"}]}),
    );
    let result = engine.run(&computed, json!({"n": 22})).await;
    assert_eq!(result.output, Some(json!({"sum": 42, "attempt": 1})));
}

/// `delay` waits `ms`, or until a time (a template): a time in the past does not wait, a text
/// that is not an RFC 3339 time fails the node, and exactly one of the two is given.
#[tokio::test]
async fn delay_waits_until_a_time() {
    let engine = Engine::new();
    let plan = compile(
        &engine,
        json!({"nodes": [{"id": "d", "type": "delay", "params": {"until": "{{ input.at }}"}}]}),
    );
    let started = std::time::Instant::now();
    let soon = (chrono::Utc::now() + chrono::Duration::milliseconds(300)).to_rfc3339();
    let result = engine.run(&plan, json!({"at": soon})).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert!(started.elapsed() >= Duration::from_millis(250), "it waited");
    let past = engine.run(&plan, json!({"at": "2001-01-01T00:00:00Z"}));
    let result = tokio::time::timeout(Duration::from_secs(10), past)
        .await
        .expect("no wait");
    assert_eq!(
        result.status,
        RunStatus::Succeeded,
        "the past does not wait"
    );
    let result = engine.run(&plan, json!({"at": "tomorrow"})).await;
    assert_eq!(result.status, RunStatus::Failed);
    let error = result.step("d").unwrap().error.clone().unwrap();
    assert!(
        error.contains("`tomorrow` is not an RFC 3339 time"),
        "{error}"
    );
    let far = (chrono::Utc::now() + chrono::Duration::days(400)).to_rfc3339();
    let result = engine.run(&plan, json!({"at": far})).await;
    let error = result.step("d").unwrap().error.clone().unwrap();
    assert!(
        error.contains("(a year) away"),
        "no longer than `ms` may wait: {error}"
    );
    for (params, why) in [
        (json!({}), "give one of `ms` and `until`"),
        (
            json!({"ms": 5, "until": "2001-01-01T00:00:00Z"}),
            "give one of `ms` and `until`",
        ),
        (json!({"until": "soon"}), "`soon` is not an RFC 3339 time"),
    ] {
        let flow = flowcore::FlowDef::from_value(
            json!({"nodes": [{"id": "d", "type": "delay", "params": params}]}),
        )
        .unwrap();
        let err = engine.compile(&flow).unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
    }
}

/// A script's `throw` is retried by the node's policy (a flow that asked for 3 attempts once
/// got 1), and so is a subflow that failed; a template that cannot render is not.
#[tokio::test]
async fn script_throws_and_failed_subflows_are_retried() {
    let engine = Engine::new();
    let flaky = compile(
        &engine,
        json!({"nodes": [{"id": "s", "type": "script", "params": {"source": "if attempt < 3 { throw \"not yet\" } attempt"}, "retry": {"max_attempts": 3, "backoff_ms": 1}}]}),
    );
    let result = engine.run(&flaky, json!({})).await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(result.output, Some(json!(3)));
    assert_eq!(attempts(&result, "s"), 3);

    let child = flowcore::FlowDef::from_value(json!({"id": "child", "nodes": [
        {"id": "t", "type": "script", "params": {"source": "throw \"always\""}}
    ]}))
    .unwrap();
    engine.flow_store().create(&child).await.unwrap();
    let parent = compile(
        &engine,
        json!({"nodes": [{"id": "p", "type": "subflow", "params": {"flow_id": "child"}, "retry": {"max_attempts": 2, "backoff_ms": 1}}]}),
    );
    let result = engine.run(&parent, json!({})).await;
    assert_eq!(result.status, RunStatus::Failed);
    assert_eq!(attempts(&result, "p"), 2, "{:?}", result.error);

    let broken = compile(
        &engine,
        json!({"nodes": [{"id": "b", "type": "set", "params": {"fields": {"x": "{{ input.n + 'x' }}"}}, "retry": {"max_attempts": 3, "backoff_ms": 1}}]}),
    );
    let result = engine.run(&broken, json!({"n": 1})).await;
    assert_eq!(result.status, RunStatus::Failed);
    assert_eq!(attempts(&result, "b"), 1, "a template error is permanent");
}

#[tokio::test]
async fn templates_keep_types_and_see_attempts() {
    let engine = Engine::new();
    let plan = compile(
        &engine,
        json!({"nodes": [{"id": "s", "type": "set", "params": {"fields": {
            "n": "{{ input.n }}", "text": "n is {{ input.n }}", "obj": {"nested": ["{{ input.n * 2 }}", true]}, "plain": 3, "att": "{{ attempt }}"
        }}}]}),
    );
    let result = engine.run(&plan, json!({"n": 4})).await;
    assert_eq!(
        result.output,
        Some(json!({"n": 4, "text": "n is 4", "obj": {"nested": [8, true]}, "plain": 3, "att": 1}))
    );
}

#[tokio::test]
async fn output_field_picks_the_run_output() {
    let engine = Engine::new();
    let plan = compile(
        &engine,
        json!({"nodes": [{"id": "x", "type": "set", "params": {"fields": {"v": 1}}}, {"id": "y", "type": "noop"}], "edges": [{"from": "x", "to": "y"}], "output": "x"}),
    );
    assert_eq!(
        engine.run(&plan, json!({})).await.output,
        Some(json!({"v": 1}))
    );
}

#[tokio::test]
async fn engine_flow_store_is_shared_by_clones() {
    let engine = Engine::new();
    let clone = engine.clone();
    clone
        .flow_store()
        .create(
            &flowcore::FlowDef::from_value(
                json!({"id": "z", "nodes": [{"id": "n", "type": "noop"}]}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    assert!(engine.flow_store().get("z", None).await.is_ok());
}
