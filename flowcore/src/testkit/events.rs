//! Run events and signals between processes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::ids::RunId;
use crate::run::RunStatus;

/// An event bus: every event of a run in order, resume after an id, a waiting read woken by a
/// publish, runs apart, a real run streamed through [`crate::ports::BusSink`].
pub async fn event_bus(bus: Arc<dyn crate::ports::EventBus>) {
    use crate::event::RunEvent;
    let run = RunId::new();
    let other = RunId::new();
    assert!(
        bus.read(&run, None, Duration::ZERO)
            .await
            .expect("read")
            .is_empty(),
        "nothing yet"
    );
    let waiter = {
        let (bus, run) = (bus.clone(), run.clone());
        tokio::spawn(async move {
            bus.read(&run, None, Duration::from_secs(10))
                .await
                .expect("read")
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let first = bus
        .publish(&RunEvent::RunStarted {
            run_id: run.clone(),
        })
        .await
        .expect("publish");
    let woken = waiter.await.expect("task");
    assert_eq!(woken.len(), 1, "a waiting read returns the new event");
    assert_eq!(
        (woken[0].id.as_str(), woken[0].name.as_str()),
        (first.as_str(), "run_started")
    );
    bus.publish(&RunEvent::RunStarted {
        run_id: other.clone(),
    })
    .await
    .expect("publish");
    let node = |i: u32| RunEvent::NodeStarted {
        run_id: run.clone(),
        node: Arc::from(format!("n{i}")),
        attempt: 1,
    };
    for i in 0..2u32 {
        bus.publish(&node(i)).await.expect("publish");
    }
    bus.publish_many(&[node(2), node(3), node(4)])
        .await
        .expect("publish a batch");
    let all = bus.read(&run, None, Duration::ZERO).await.expect("read");
    assert_eq!(all.len(), 6, "runs are apart: {all:?}");
    let nodes: Vec<String> = all[1..]
        .iter()
        .map(|e| {
            let data: serde_json::Value = serde_json::from_str(&e.data).expect("events are JSON");
            data["node"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(nodes, vec!["n0", "n1", "n2", "n3", "n4"], "in order");
    let rest = bus
        .read(&run, Some(&all[2].id), Duration::ZERO)
        .await
        .expect("resume");
    assert_eq!(rest.len(), 3, "resume after an id");
    assert_eq!(rest[0].id, all[3].id);
    assert!(
        bus.read(&run, Some("not-an-id"), Duration::ZERO)
            .await
            .is_err(),
        "a bad id is refused"
    );

    // A real run streamed through the sink.
    let engine = crate::Engine::new();
    let plan = engine
        .compile_json(r#"{"nodes": [{"id": "a", "type": "noop"}, {"id": "b", "type": "noop"}], "edges": [{"from": "a", "to": "b"}]}"#)
        .expect("compile");
    let sink = Arc::new(crate::ports::BusSink::new(bus.clone()));
    let result = engine
        .execute(
            &plan,
            json!({}),
            crate::RunOptions {
                events: Some(sink),
                ..Default::default()
            },
        )
        .await;
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..50 {
        let batch = bus
            .read(&result.run_id, after.as_deref(), Duration::from_millis(200))
            .await
            .expect("read");
        if let Some(last) = batch.last() {
            after = Some(last.id.clone());
        }
        seen.extend(batch.into_iter().map(|e| e.name));
        if seen.last().map(String::as_str) == Some("run_finished") {
            break;
        }
    }
    assert_eq!(
        seen,
        vec![
            "run_started",
            "node_started",
            "node_finished",
            "node_started",
            "node_finished",
            "run_finished"
        ],
        "every event of the run, in order"
    );
}

/// Cancel requests reach every subscriber (published again until one arrives: a backend's
/// subscriber may still be connecting).
pub async fn run_signals(signals: Arc<dyn crate::ports::RunSignals>) {
    let mut a = signals.cancels();
    let mut b = signals.cancels();
    let id = RunId::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let got = loop {
        signals.cancel(&id).await.expect("publish");
        if let Ok(Ok(got)) = tokio::time::timeout(Duration::from_millis(100), a.recv()).await {
            break got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cancel request arrived"
        );
    };
    assert_eq!(got, id);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(2), b.recv())
            .await
            .expect("b hears it too")
            .expect("recv"),
        id
    );

    // A finished run wakes its watches, here or in another process, and no other run's.
    let (done, other) = (RunId::new(), RunId::new());
    let (mut watch, mut twice, mut untouched) = (
        signals.watch_finished(&done),
        signals.watch_finished(&done),
        signals.watch_finished(&other),
    );
    // It carries the run's end (a small one: a backend may leave a large one out).
    let end = crate::ports::RunEnd {
        status: RunStatus::Failed,
        output: Some(serde_json::json!({"partial": [1, "two"]})),
        error: Some("node `b` failed: boom".into()),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let heard = loop {
        signals.finished(&done, Some(&end)).await.expect("publish");
        if let Ok(heard) = tokio::time::timeout(Duration::from_millis(100), watch.finished()).await
        {
            break heard;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no finish announcement arrived"
        );
    };
    assert_eq!(heard.as_deref(), Some(&end), "the end as announced");
    let heard = tokio::time::timeout(Duration::from_secs(2), twice.finished())
        .await
        .expect("every watch of the run wakes");
    assert_eq!(heard.as_deref(), Some(&end));
    // Announced without its end: the watch wakes all the same.
    let bare = RunId::new();
    let mut watch = signals.watch_finished(&bare);
    signals.finished(&bare, None).await.expect("publish");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(2), watch.finished())
            .await
            .expect("a bare announcement wakes it"),
        None
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), untouched.finished())
            .await
            .is_err(),
        "another run's watch stays asleep"
    );
}
