//! Parked runs in durable execution over the memory stores: `wait` and signals, long delays,
//! wait timeouts, signals sent early, and what stays in place outside a durable execution.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::assert_error;
use flowcore::durable::{self, DurableOptions, Hooks};
use flowcore::ports::memory::MemoryRunStore;
use flowcore::ports::{Due, NewRun, RunRecord, RunStore, Signal};
use flowcore::{Engine, Plan, RunStatus, StepStatus};
use serde_json::{Value, json};

struct Fixture {
    engine: Engine,
    runs: Arc<dyn RunStore>,
    options: DurableOptions,
}

impl Fixture {
    fn new() -> Self {
        Self {
            engine: Engine::new(),
            runs: Arc::new(MemoryRunStore::new()),
            options: DurableOptions::new("w"),
        }
    }

    fn plan(&self, flow: Value) -> Plan {
        self.engine
            .compile(&flowcore::FlowDef::from_value(flow).expect("parse"))
            .expect("compile")
    }

    /// Creates a queued run of `plan` with `input`.
    async fn create(&self, input: Value) -> RunRecord {
        let (run, _) = self
            .runs
            .create(NewRun::new("f", 1, input))
            .await
            .expect("create");
        run
    }

    /// Claims run `id` and executes it until it ends or parks.
    async fn execute(&self, plan: &Plan, id: &flowcore::RunId) -> RunRecord {
        let run = self
            .runs
            .claim_run(id, "w", Duration::from_secs(30))
            .await
            .expect("claim");
        durable::execute(
            &self.engine,
            plan,
            &self.runs,
            &run,
            &self.options,
            Hooks::default(),
        )
        .await
        .expect("execute")
    }

    /// Wakes the due runs, as the server's timer does, until `id` is woken (by the timer, or
    /// by a signal).
    async fn wake(&self, id: &flowcore::RunId) {
        for _ in 0..300 {
            let due = Due {
                after: None,
                by: Utc::now(),
                limit: 100,
            };
            self.runs.wake_due(&due).await.expect("wake");
            if self.runs.get(id).await.expect("get").status != RunStatus::Waiting {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("run `{id}` was never woken");
    }
}

/// A signal without a key.
fn plain<'a>(name: &'a str, payload: &'a Value) -> Signal<'a> {
    Signal {
        name,
        payload,
        key: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_parks_until_its_signal_and_outputs_it() {
    let f = Fixture::new();
    let plan = f.plan(json!({
        "nodes": [
            {"id": "ask", "type": "set", "params": {"fields": {"order": "{{ input.order }}"}}},
            {"id": "approve", "type": "wait", "params": {"signal": "approval"}},
            {"id": "other", "type": "delay", "params": {"ms": 50}},
            {"id": "done", "type": "template", "params": {"template": "{{ nodes.ask.order }}: {{ nodes.approve.by }}"}}
        ],
        "edges": [{"from": "ask", "to": "approve"}, {"from": "approve", "to": "done"}],
        "output": "done"
    }));
    let run = f.create(json!({"order": 7})).await;
    let parked = f.execute(&plan, &run.id).await;
    assert_eq!(parked.status, RunStatus::Waiting);
    let waits = &parked.parked.as_ref().expect("parked").waits;
    assert_eq!(waits.len(), 1);
    assert_eq!(
        (waits[0].node.as_str(), waits[0].signal.as_deref()),
        ("approve", Some("approval"))
    );
    let steps = f.runs.steps(&run.id).await.expect("steps");
    let status_of = |node: &str| steps.iter().find(|s| &*s.node == node).map(|s| s.status);
    assert_eq!(status_of("ask"), Some(StepStatus::Succeeded));
    assert_eq!(
        status_of("other"),
        Some(StepStatus::Succeeded),
        "the run parks once nothing else is left to do"
    );
    assert_eq!(status_of("approve"), None, "a waiting node has no step yet");

    let (woken, woke) = f
        .runs
        .send_signal(&run.id, plain("approval", &json!({"by": "ada"})))
        .await
        .expect("signal");
    assert!(woke && woken.status == RunStatus::Queued);
    let done = f.execute(&plan, &run.id).await;
    assert_eq!(done.status, RunStatus::Succeeded, "{:?}", done.error);
    assert_eq!(done.output, Some(json!("7: ada")));
    let steps = f.runs.steps(&run.id).await.expect("steps");
    let ask = steps.iter().find(|s| &*s.node == "ask").expect("ask");
    assert_eq!(ask.attempts, 1, "finished steps are not executed again");
    let approve = steps
        .iter()
        .find(|s| &*s.node == "approve")
        .expect("approve");
    assert_eq!(approve.output.as_deref(), Some(&json!({"by": "ada"})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_sent_before_its_wait_is_taken_when_the_run_gets_there() {
    let f = Fixture::new();
    let plan = f.plan(json!({
        "nodes": [{"id": "w", "type": "wait", "params": {"signal": "go"}}]
    }));
    let run = f.create(json!({})).await;
    f.runs
        .send_signal(&run.id, plain("go", &json!("early")))
        .await
        .expect("signal");
    let done = f.execute(&plan, &run.id).await;
    assert_eq!(done.status, RunStatus::Succeeded);
    assert_eq!(done.output, Some(json!("early")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_delay_parks_and_waiting_does_not_count_against_the_timeout() {
    let f = Fixture::new();
    // A one-second run limit, and a delay longer than it.
    let plan = f.plan(json!({
        "nodes": [
            {"id": "d", "type": "delay", "params": {"ms": 1200}},
            {"id": "after", "type": "template", "params": {"template": "woke"}}
        ],
        "edges": [{"from": "d", "to": "after"}],
        "settings": {"timeout_seconds": 1}
    }));
    let run = f.create(json!({})).await;
    let started = std::time::Instant::now();
    let parked = f.execute(&plan, &run.id).await;
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the worker is free at once"
    );
    assert_eq!(parked.status, RunStatus::Waiting);
    let deadline = parked
        .parked
        .as_ref()
        .and_then(|p| p.wake_at())
        .expect("deadline");
    f.wake(&run.id).await;
    assert!(Utc::now() >= deadline, "woken at its time, not before");
    let done = f.execute(&plan, &run.id).await;
    assert_eq!(done.status, RunStatus::Succeeded, "{:?}", done.error);
    assert_eq!(done.output, Some(json!("woke")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_past_its_timeout_fails_with_code_timeout_and_on_error_applies() {
    let f = Fixture::new();
    let plan = f.plan(json!({
        "nodes": [
            {"id": "w", "type": "wait", "params": {"signal": "late", "timeout_ms": 1200}, "on_error": "continue"},
            {"id": "after", "type": "template", "params": {"template": "{{ nodes.w.code }}"}}
        ],
        "edges": [{"from": "w", "to": "after"}]
    }));
    let run = f.create(json!({})).await;
    assert_eq!(f.execute(&plan, &run.id).await.status, RunStatus::Waiting);
    f.wake(&run.id).await;
    let done = f.execute(&plan, &run.id).await;
    assert_eq!(done.status, RunStatus::Succeeded, "{:?}", done.error);
    assert_eq!(done.output, Some(json!("timeout")));
    let steps = f.runs.steps(&run.id).await.expect("steps");
    let w = steps.iter().find(|s| &*s.node == "w").expect("w");
    assert_eq!(w.status, StepStatus::Failed);
    assert_eq!(w.error_code.as_deref(), Some("timeout"));
    // A signal that comes after the timeout is kept for no one, and wakes nothing.
    let answer = f.runs.send_signal(&run.id, plain("late", &json!(1))).await;
    assert!(answer.is_err(), "the run is finished: {answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_waiting_run_ends_it() {
    let f = Fixture::new();
    let plan = f.plan(json!({"nodes": [{"id": "w", "type": "wait", "params": {"signal": "s"}}]}));
    let run = f.create(json!({})).await;
    assert_eq!(f.execute(&plan, &run.id).await.status, RunStatus::Waiting);
    let cancelled = f
        .runs
        .transition(&run.id, RunStatus::Waiting.to(RunStatus::Cancelled))
        .await
        .expect("cancel");
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    assert!(
        f.runs
            .send_signal(&run.id, plain("s", &json!(1)))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn outside_a_durable_execution_a_wait_fails_and_a_delay_sleeps_in_place() {
    let engine = Engine::new();
    let waiting = engine
        .compile_json(r#"{"nodes": [{"id": "w", "type": "wait", "params": {"signal": "s"}}]}"#)
        .expect("compile");
    let result = engine.run(&waiting, json!({})).await;
    assert_eq!(result.status, RunStatus::Failed);
    assert_error(&result, "durable");
    let delay = engine
        .compile_json(r#"{"nodes": [{"id": "d", "type": "delay", "params": {"ms": 1000}}]}"#)
        .expect("compile");
    let started = std::time::Instant::now();
    let result = engine.run(&delay, json!({})).await;
    assert_eq!(result.status, RunStatus::Succeeded);
    assert!(started.elapsed() >= Duration::from_millis(1000));
}

#[test]
fn wait_params_are_checked_at_compile_time() {
    let engine = Engine::new();
    for (params, problem) in [
        (json!({}), "signal"),
        (json!({"signal": "a b"}), "not a signal name"),
        (
            json!({"signal": "s", "timeout_ms": 400_000_000_000u64}),
            "a year",
        ),
        (json!({"signal": "s", "key": "{{ nope( }}"}), "key"),
        (json!({"signal": "s", "retries": 1}), "unknown field"),
    ] {
        let flow = json!({"nodes": [{"id": "w", "type": "wait", "params": params}]});
        let err = engine
            .compile(&flowcore::FlowDef::from_value(flow).expect("parse"))
            .expect_err("refused");
        assert!(err.to_string().contains(problem), "{params}: {err}");
    }
}

/// A signal racing a wait's timeout: whichever comes first wins, exactly one of them (the
/// wait outputs the signal, or fails with `timeout`), and the run ends once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_racing_the_timeout_wins_or_loses_whole() {
    let f = Fixture::new();
    let plan = f.plan(json!({
        "nodes": [
            {"id": "w", "type": "wait", "params": {"signal": "go", "timeout_ms": 1300}, "on_error": "continue"},
            {"id": "after", "type": "noop"}
        ],
        "edges": [{"from": "w", "to": "after"}]
    }));
    let (mut signalled, mut timed_out) = (0, 0);
    for i in 0..6u64 {
        let run = f.create(json!({})).await;
        assert_eq!(f.execute(&plan, &run.id).await.status, RunStatus::Waiting);
        let deadline = f
            .runs
            .get(&run.id)
            .await
            .expect("get")
            .parked
            .and_then(|p| p.wake_at())
            .expect("deadline");
        // The signal comes around the deadline: a little before, at, or a little after.
        let at = deadline + chrono::Duration::milliseconds(i as i64 * 40 - 100);
        let runs = f.runs.clone();
        let id = run.id.clone();
        let sender = tokio::spawn(async move {
            let left = (at - Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(left).await;
            let payload = json!({"n": i});
            let signal = plain("go", &payload);
            runs.send_signal(&id, signal).await
        });
        f.wake(&run.id).await;
        let _ = sender.await.expect("sender");
        // Woken by the timer or the signal: executed until it ends.
        let mut done = f.execute(&plan, &run.id).await;
        for _ in 0..3 {
            if done.status.is_final() {
                break;
            }
            f.wake(&run.id).await;
            done = f.execute(&plan, &run.id).await;
        }
        assert_eq!(done.status, RunStatus::Succeeded, "{:?}", done.error);
        let steps = f.runs.steps(&run.id).await.expect("steps");
        let w = steps.iter().find(|s| &*s.node == "w").expect("w");
        match w.status {
            StepStatus::Succeeded => {
                assert_eq!(w.output.as_deref(), Some(&json!({"n": i})));
                signalled += 1;
            }
            StepStatus::Failed => {
                assert!(
                    w.error
                        .as_deref()
                        .unwrap_or_default()
                        .contains("no signal `go`")
                );
                timed_out += 1;
            }
            other => panic!("the wait ended {other:?}"),
        }
        assert_eq!(w.attempts, 1, "the wait ran to its end once");
    }
    assert_eq!(signalled + timed_out, 6);
}
