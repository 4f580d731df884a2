//! What people did to runs: recorded with the run, in order, kept when the run's data is
//! pruned, deleted with the run.

use chrono::Utc;
use serde_json::json;

use super::new_run;
use crate::ids::RunId;
use crate::ports::{ActionKind, Actor, MAX_ACTIONS_PER_RUN, PruneRule, RunAction, RunStore};
use crate::run::RunStatus;

/// Actions on runs of `store`.
pub async fn run_actions(store: &dyn RunStore) {
    let (run, _) = store
        .create(new_run("actions", None))
        .await
        .expect("create");
    let ops = Actor {
        id: "k1".into(),
        name: "ops".into(),
    };
    assert!(
        store.actions(&run.id).await.expect("none yet").is_empty(),
        "a new run has no actions"
    );
    let signal = RunAction::now(ActionKind::Signal, Some(ops.clone()))
        .with_detail(json!({"signal": "approval"}));
    let by_link = RunAction::now(ActionKind::Signal, None)
        .with_detail(json!({"signal": "approval", "via": "resume_link"}));
    let gone = RunId::from("no-such-run");
    store
        .record_actions(&[
            (run.id.clone(), signal.clone()),
            (gone.clone(), signal.clone()),
            (run.id.clone(), by_link.clone()),
        ])
        .await
        .expect("record");
    store.record_actions(&[]).await.expect("nothing to record");
    let cancel = RunAction::now(ActionKind::Cancel, Some(ops));
    store
        .transition(&run.id, RunStatus::Queued.to(RunStatus::Cancelled))
        .await
        .expect("cancel");
    store
        .record_actions(&[(run.id.clone(), cancel.clone())])
        .await
        .expect("record the cancel");
    let recorded = store.actions(&run.id).await.expect("actions");
    assert_eq!(
        recorded.iter().map(|a| a.action).collect::<Vec<_>>(),
        [ActionKind::Signal, ActionKind::Signal, ActionKind::Cancel],
        "in the order they were recorded"
    );
    // Times come back to the microsecond (SQL stores them as JSON text).
    assert_eq!(recorded[0].actor, signal.actor, "with who");
    assert_eq!(recorded[1].detail, by_link.detail, "with the details");
    assert_eq!(
        recorded[2].at.timestamp_micros(),
        cancel.at.timestamp_micros()
    );
    assert!(
        store.actions(&gone).await.expect("unknown run").is_empty(),
        "an action for a run that is not there is dropped"
    );

    // At most the cap a run, whatever comes.
    let (busy, _) = store
        .create(new_run("actions", None))
        .await
        .expect("create");
    let many: Vec<(RunId, RunAction)> = (0..MAX_ACTIONS_PER_RUN + 5)
        .map(|_| (busy.id.clone(), signal.clone()))
        .collect();
    store.record_actions(&many).await.expect("record many");
    store
        .record_actions(&many[..1])
        .await
        .expect("record past the cap");
    assert_eq!(
        store.actions(&busy.id).await.expect("actions").len(),
        MAX_ACTIONS_PER_RUN,
        "the cap holds"
    );

    // Pruning the run's data keeps them with its summary; deleting the run deletes them.
    let rule = PruneRule {
        flow_id: Some("actions".into()),
        ..PruneRule::older_than(Utc::now() + chrono::Duration::seconds(1))
    };
    store.drop_data(&rule, 10).await.expect("drop data");
    assert_eq!(
        store.actions(&run.id).await.expect("after drop").len(),
        3,
        "kept with the summary"
    );
    let deleted = store
        .delete_finished(std::slice::from_ref(&run.id))
        .await
        .expect("delete");
    assert_eq!(deleted, std::slice::from_ref(&run.id));
    assert!(
        store
            .actions(&run.id)
            .await
            .expect("after delete")
            .is_empty(),
        "deleted with the run"
    );
}
