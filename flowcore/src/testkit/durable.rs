//! Durable execution over a run store: checkpoints, resumes, leases lost and taken over.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use super::new_run;
use crate::durable::{self, DurableOptions, Hooks};
use crate::engine::Engine;
use crate::error::StoreError;
use crate::ids::RunId;
use crate::model::FlowDef;
use crate::ports::{Due, RunRecord, RunStore};
use crate::run::RunStatus;

/// Counts executions of each node id (the `count` node type of [`durable_runs`]).
#[derive(Debug, Default)]
struct Counts(std::sync::Mutex<std::collections::HashMap<String, usize>>);

impl Counts {
    fn of(&self, id: &str) -> usize {
        self.0
            .lock()
            .map(|m| m.get(id).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

struct CountNode {
    counts: Arc<Counts>,
    sleep: Duration,
}

#[async_trait::async_trait]
impl crate::Node for CountNode {
    async fn run(&self, cx: &crate::NodeContext) -> Result<crate::Output, crate::NodeError> {
        if let Ok(mut m) = self.counts.0.lock() {
            *m.entry(cx.node_id().to_owned()).or_default() += 1;
        }
        tokio::time::sleep(self.sleep).await;
        Ok(json!({"node": cx.node_id()}).into())
    }
}

fn counting_engine(counts: &Arc<Counts>) -> Engine {
    let mut registry = crate::Registry::with_builtins();
    let c = counts.clone();
    registry.register(
        "count",
        move |params: &serde_json::Value| -> Result<Box<dyn crate::Node>, crate::ParamError> {
            Ok(Box::new(CountNode {
                counts: c.clone(),
                sleep: Duration::from_millis(params["sleep_ms"].as_u64().unwrap_or(0)),
            }))
        },
    );
    Engine::builder().registry(registry).build()
}

async fn wait_for_step(runs: &Arc<dyn RunStore>, id: &RunId, node: &str) {
    for _ in 0..500 {
        if runs
            .steps(id)
            .await
            .expect("steps")
            .iter()
            .any(|s| &*s.node == node)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("step `{node}` was never recorded");
}

/// Durable execution over a run store: a worker that dies mid-run is replaced after its lease
/// expires and the run resumes without re-executing finished steps; a worker whose lease moved
/// on is stopped and cannot write; batched checkpoints write a fast run in one commit.
/// Needs a multi-threaded tokio runtime.
pub async fn durable_runs(runs: Arc<dyn RunStore>) {
    use crate::durable::Checkpoint;

    let counts = Arc::new(Counts::default());
    let engine = counting_engine(&counts);
    let flow = FlowDef::from_value(json!({
        "nodes": [
            {"id": "one", "type": "count"},
            {"id": "two", "type": "count", "params": {"sleep_ms": 300}},
            {"id": "three", "type": "count"}
        ],
        "edges": [{"from": "one", "to": "two"}, {"from": "two", "to": "three"}]
    }))
    .expect("flow");
    let plan = engine.compile(&flow).expect("compile");
    let ttl = Duration::from_millis(400);
    let worker = |name: &str| DurableOptions {
        lease_ttl: ttl,
        ..DurableOptions::new(name)
    };
    // Executes a run in a task of its own, as a worker does.
    let spawn_execute = |run: &RunRecord, options: &DurableOptions, hooks: Hooks| {
        let (engine, plan, runs) = (engine.clone(), plan.clone(), runs.clone());
        let (run, options) = (run.clone(), options.clone());
        tokio::spawn(
            async move { durable::execute(&engine, &plan, &runs, &run, &options, hooks).await },
        )
    };

    // A worker dies (its task is dropped: no finish, no more renewals) after `one` is recorded.
    let a = worker("a");
    let new = new_run("durable", None).claimed(a.claim());
    let (run, _) = runs.create(new).await.expect("create");
    let task = spawn_execute(&run, &a, Hooks::default());
    wait_for_step(&runs, &run.id, "one").await;
    task.abort();
    let _ = task.await;
    assert!(
        matches!(
            runs.claim(&run.id, "b", ttl).await,
            Err(StoreError::Conflict(_))
        ),
        "the dead worker's lease holds until it expires"
    );
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(
        runs.expired(&Due {
            after: None,
            by: Utc::now(),
            limit: 10
        })
        .await
        .expect("expired")
        .iter()
        .any(|(id, _)| id == &run.id),
        "the reaper sees it"
    );
    let b = worker("b");
    let lease = runs
        .claim(&run.id, "b", ttl)
        .await
        .expect("another worker claims the run");
    assert_eq!(lease.epoch, 2);
    let claimed = runs.get(&run.id).await.expect("get");
    let done = durable::execute(&engine, &plan, &runs, &claimed, &b, Hooks::default())
        .await
        .expect("resumed run");
    assert_eq!(done.status, RunStatus::Succeeded, "{:?}", done.error);
    assert_eq!(done.output, Some(json!({"node": "three"})));
    assert_eq!(counts.of("one"), 1, "a finished step is not executed again");
    assert_eq!(counts.of("three"), 1);
    assert_eq!(runs.steps(&run.id).await.expect("steps").len(), 3);

    // A worker whose lease moved on is stopped and its writes are refused.
    let before = counts.of("three");
    let (run2, _) = runs
        .create(new_run("durable", None).claimed(a.claim()))
        .await
        .expect("create");
    let task = spawn_execute(&run2, &a, Hooks::default());
    wait_for_step(&runs, &run2.id, "one").await;
    // Taken over while `two` runs (as if a's lease had lapsed during a pause).
    runs.release(&run2.id, 1).await.expect("release");
    let stolen = runs.claim(&run2.id, "b", ttl).await.expect("claim");
    let outcome = task.await.expect("task");
    assert!(
        matches!(outcome, Err(StoreError::StaleLease(_))),
        "the old owner learns it lost the run: {outcome:?}"
    );
    assert_eq!(
        counts.of("three") - before,
        0,
        "the old owner stopped before `three`"
    );
    let current = runs.get(&run2.id).await.expect("get");
    assert_eq!(
        (current.status, current.epoch),
        (RunStatus::Running, stolen.epoch),
        "the new owner's state is intact"
    );
    let claimed = runs.get(&run2.id).await.expect("get");
    let done = durable::execute(&engine, &plan, &runs, &claimed, &b, Hooks::default())
        .await
        .expect("finish by b");
    assert_eq!(done.status, RunStatus::Succeeded);

    // Batched checkpoints: a fast run writes its steps with its final status.
    let fast = DurableOptions {
        checkpoint: Checkpoint::Batched(Duration::from_secs(5)),
        ..worker("c")
    };
    let quick = FlowDef::from_value(json!({"nodes": [{"id": "x", "type": "count"}, {"id": "y", "type": "count"}], "edges": [{"from": "x", "to": "y"}]}))
        .expect("flow");
    let quick = engine.compile(&quick).expect("compile");
    let (run3, _) = runs
        .create(new_run("durable", None).claimed(fast.claim()))
        .await
        .expect("create");
    let done = durable::execute(&engine, &quick, &runs, &run3, &fast, Hooks::default())
        .await
        .expect("batched run");
    assert_eq!(done.status, RunStatus::Succeeded);
    assert_eq!(
        runs.steps(&run3.id).await.expect("steps").len(),
        2,
        "the buffered steps were written with the status"
    );

    // Cancellation from outside ends the run as cancelled.
    let token = crate::CancellationToken::new();
    let (run4, _) = runs
        .create(new_run("durable", None).claimed(a.claim()))
        .await
        .expect("create");
    let hooks = Hooks {
        cancel: Some(token.clone()),
        ..Hooks::default()
    };
    let task = spawn_execute(&run4, &a, hooks);
    wait_for_step(&runs, &run4.id, "one").await;
    token.cancel();
    let done = task.await.expect("task").expect("cancelled run");
    assert_eq!(done.status, RunStatus::Cancelled);

    // A worker shutting down hands its run back: finished steps stored even when buffered, the
    // run queued again at once (no lease to wait for), resumed elsewhere without re-executing.
    let slow_flush = DurableOptions {
        checkpoint: Checkpoint::Batched(Duration::from_secs(60)),
        ..worker("leaving")
    };
    let (run5, _) = runs
        .create(new_run("durable", None).claimed(slow_flush.claim()))
        .await
        .expect("create");
    let (ones, twos) = (counts.of("one"), counts.of("two"));
    let hand_back = crate::CancellationToken::new();
    let hooks = Hooks {
        hand_back: Some(hand_back.clone()),
        ..Hooks::default()
    };
    let task = spawn_execute(&run5, &slow_flush, hooks);
    // `two` (300 ms) has started: `one` is finished and buffered, `two` is in flight.
    for _ in 0..500 {
        if counts.of("two") > twos {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    hand_back.cancel();
    let back = task.await.expect("task").expect("handed back");
    assert_eq!(back.status, RunStatus::Queued);
    let stored = runs.steps(&run5.id).await.expect("steps");
    assert_eq!(stored.len(), 1, "the buffered step `one` was stored");
    runs.claim(&run5.id, "next", ttl)
        .await
        .expect("claimed at once, without waiting for a lease");
    let claimed = runs.get(&run5.id).await.expect("get");
    let done = durable::execute(
        &engine,
        &plan,
        &runs,
        &claimed,
        &worker("next"),
        Hooks::default(),
    )
    .await
    .expect("resumed");
    assert_eq!(done.status, RunStatus::Succeeded);
    assert_eq!(counts.of("one"), ones + 1, "`one` ran once");
}
