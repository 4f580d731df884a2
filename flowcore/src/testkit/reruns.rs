//! Reruns: a queued run stored with the steps it keeps from an earlier run, in one commit.

use super::{new_run, step};
use crate::ports::{NewRun, RunStore};
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
        ..NewRun::new("rerun", 2, serde_json::json!({"again": true}))
    };
    let run = store
        .create_rerun(rerun, kept.clone())
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
