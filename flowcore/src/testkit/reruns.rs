//! Reruns: a queued run stored with the steps it keeps from an earlier run, in one commit.

use super::{new_run, step};
use crate::ports::{ConcurrencyKey, NewRun, RunStore};
use crate::run::{RunStatus, StepStatus};

/// Reruns on `store`.
pub async fn reruns(store: &dyn RunStore) {
    let (earlier, _) = store.create(new_run("rerun", None)).await.expect("create");
    let kept = vec![
        step("a", StepStatus::Succeeded),
        step("s", StepStatus::Skipped),
    ];
    let rerun = NewRun {
        rerun_of: Some(earlier.id.clone()),
        // Left out by a rerun: it has neither.
        idempotency_key: Some("k".into()),
        concurrency: Some(ConcurrencyKey {
            key: "tenant-1".into(),
            limit: 3,
        }),
        priority: 8,
        ..NewRun::new("rerun", 2, serde_json::json!({"again": true}))
    };
    let run = store
        .create_rerun(rerun, kept.clone(), Vec::new())
        .await
        .expect("create the rerun");
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(
        run.rerun_of.as_ref(),
        Some(&earlier.id),
        "it names the run it reruns"
    );
    assert_eq!(
        (run.flow_version, run.idempotency_key.as_deref()),
        (2, None)
    );
    let read = store.get(&run.id).await.expect("get");
    assert_eq!(read.rerun_of, run.rerun_of, "as read back");
    assert_eq!(
        (read.concurrency.as_ref(), read.priority),
        (
            Some(&ConcurrencyKey {
                key: "tenant-1".into(),
                limit: 3
            }),
            8
        ),
        "its place in the queue, as read back"
    );
    // A new run keeps its place too, created one at a time or in a batch.
    let placed = NewRun {
        concurrency: Some(ConcurrencyKey {
            key: "tenant-2".into(),
            limit: 1,
        }),
        priority: 0,
        ..new_run("rerun", None)
    };
    let (made, _) = store.create(placed.clone()).await.expect("create");
    let read = store.get(&made.id).await.expect("get");
    assert_eq!(
        (read.concurrency, read.priority),
        (placed.concurrency, 0),
        "a new run's place in the queue, as read back"
    );
    assert_eq!(made.priority, 0, "as created");
    let steps = store.steps(&run.id).await.expect("steps");
    assert_eq!(steps.len(), 2, "{steps:?}");
    for (step, earlier) in steps.iter().zip(&kept) {
        assert!(step.reused, "marked reused: {step:?}");
        assert_eq!(
            (&step.node, step.status, &step.output),
            (&earlier.node, earlier.status, &earlier.output),
            "as the earlier run recorded it"
        );
    }
    assert!(
        store
            .steps(&earlier.id)
            .await
            .expect("steps")
            .iter()
            .all(|s| !s.reused),
        "the earlier run's own steps are its own"
    );
    // A worker takes it as any queued run.
    let lease = store
        .claim(&run.id, "w1", std::time::Duration::from_secs(60))
        .await
        .expect("claim");
    assert_eq!(lease.epoch, 1);
}

/// A run stored with a run's end ([`crate::ports::RunOutcome::then`], a failure handler): there
/// once the end is written, never when it is not.
pub async fn runs_started_by_an_end(store: &dyn RunStore) {
    let ttl = std::time::Duration::from_secs(60);
    let (run, _) = store.create(new_run("ends", None)).await.expect("create");
    let epoch = store.claim(&run.id, "w1", ttl).await.expect("claim").epoch;
    let handler = NewRun::new("handler", 3, serde_json::json!({"run_id": run.id}));
    let stale = crate::ports::RunOutcome {
        status: RunStatus::Failed,
        then: Some(NewRun::new("handler", 3, serde_json::json!({}))),
        ..Default::default()
    };
    let stale_id = stale.then.as_ref().map(|t| t.id.clone()).expect("an id");
    assert!(
        store.finish(&run.id, epoch + 1, stale).await.is_err(),
        "a stale end is refused"
    );
    assert!(store.get(&stale_id).await.is_err(), "and starts nothing");
    let end = crate::ports::RunOutcome {
        status: RunStatus::Failed,
        error: Some("boom".into()),
        then: Some(handler.clone()),
        ..Default::default()
    };
    let ended = store.finish(&run.id, epoch, end).await.expect("finish");
    assert_eq!(ended.status, RunStatus::Failed);
    let started = store.get(&handler.id).await.expect("stored with the end");
    assert_eq!(
        (
            started.status,
            started.flow_id.as_str(),
            started.flow_version
        ),
        (RunStatus::Queued, "handler", 3)
    );
    assert_eq!(started.input, handler.input);
}
