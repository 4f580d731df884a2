//! The run store's checkpoints of `map` items: batches written under the lease, read back by
//! index, the step's progress, and cleared once the step succeeds (a failed map keeps them for
//! a rerun of its failed items).

use std::sync::Arc;

use chrono::Utc;
use serde_json::{Value, json};

use super::{new_run, step};
use crate::error::StoreError;
use crate::ports::{RunOutcome, RunStore};
use crate::run::{ItemBatch, ItemProgress, RunStatus, StepStatus};

fn batch(node: &str, indexes: &[u32], progress: ItemProgress) -> ItemBatch {
    ItemBatch {
        node: Arc::from(node),
        progress,
        started_at: Utc::now(),
        items: indexes
            .iter()
            .map(|i| (*i, Arc::new(json!({ "item": i }))))
            .collect(),
    }
}

/// Checkpoints of map items on `store`.
pub async fn map_items(store: &dyn RunStore) {
    let ttl = std::time::Duration::from_secs(60);
    let (run, _) = store.create(new_run("items", None)).await.expect("create");
    let epoch = store.claim(&run.id, "w1", ttl).await.expect("claim").epoch;
    let progress = |done| ItemProgress { total: 5, done };

    // Batches come in any order of index; reads answer by index.
    let first = batch("m", &[3, 0], progress(2));
    store
        .record_items(&run.id, epoch, &first)
        .await
        .expect("record items");
    // The same batch written again (a retried write that had committed) is still one.
    store
        .record_items(&run.id, epoch, &first)
        .await
        .expect("record again");
    store
        .record_items(&run.id, epoch, &batch("m", &[1], progress(3)))
        .await
        .expect("record more");
    let items = store.items(&run.id, "m").await.expect("items");
    let indexes: Vec<u32> = items.iter().map(|(i, _)| *i).collect();
    assert_eq!(indexes, [0, 1, 3], "each item once, by index");
    assert_eq!(items[2].1, json!({"item": 3}), "with its output");
    assert!(
        store
            .items(&run.id, "other")
            .await
            .expect("none")
            .is_empty(),
        "another node has none"
    );
    let steps = store.steps(&run.id).await.expect("steps");
    let shown = steps
        .iter()
        .find(|s| &*s.node == "m")
        .expect("a progress step");
    assert_eq!(
        (shown.status, shown.items),
        (StepStatus::Running, Some(progress(3))),
        "the step shows how far the map got"
    );

    // Only the lease's owner writes.
    assert!(
        matches!(
            store
                .record_items(&run.id, epoch + 1, &batch("m", &[2], progress(4)))
                .await,
            Err(StoreError::StaleLease(_))
        ),
        "a stale epoch is refused"
    );

    // Once the step ends its items are done with, and a late batch changes nothing.
    let ended = crate::run::StepRecord {
        items: Some(progress(5)),
        output: Some(Arc::new(Value::Array(vec![json!(0); 5]))),
        ..step("m", StepStatus::Succeeded)
    };
    store
        .record_steps(&run.id, epoch, std::slice::from_ref(&ended))
        .await
        .expect("record the step");
    assert!(
        store.items(&run.id, "m").await.expect("items").is_empty(),
        "an ended step's items are cleared"
    );
    store
        .record_items(&run.id, epoch, &batch("m", &[4], progress(4)))
        .await
        .expect("a late batch");
    let steps = store.steps(&run.id).await.expect("steps");
    let kept = steps.iter().find(|s| &*s.node == "m").expect("the step");
    assert_eq!(
        (kept.status, kept.items),
        (StepStatus::Succeeded, Some(progress(5))),
        "an ended step keeps its end"
    );

    // A run's items go with it: finished with the step among its last, then deleted. A map
    // whose step never ended (`c`, cancelled with the run) is done with at the finish too.
    for (node, total) in [("n", 2), ("c", 3)] {
        let progress = ItemProgress { total, done: 1 };
        store
            .record_items(&run.id, epoch, &batch(node, &[0], progress))
            .await
            .expect("another map");
    }
    let last = crate::run::StepRecord {
        items: Some(ItemProgress { total: 2, done: 2 }),
        ..step("n", StepStatus::Succeeded)
    };
    store
        .finish(
            &run.id,
            epoch,
            RunOutcome {
                status: RunStatus::Succeeded,
                output: None,
                error: None,
                steps: vec![last],
                then: None,
            },
        )
        .await
        .expect("finish");
    assert!(
        store.items(&run.id, "n").await.expect("items").is_empty(),
        "finishing with the ended step clears its items"
    );
    assert!(
        store.items(&run.id, "c").await.expect("items").is_empty(),
        "a finished run keeps no items"
    );
    let steps = store.steps(&run.id).await.expect("steps");
    let n = steps.iter().find(|s| &*s.node == "n").expect("the step");
    assert_eq!(n.items, Some(ItemProgress { total: 2, done: 2 }));
    store
        .delete_finished(std::slice::from_ref(&run.id))
        .await
        .expect("delete");
    assert!(
        matches!(
            store.items(&run.id, "m").await,
            Err(StoreError::NotFound { .. })
        ),
        "a deleted run has no items"
    );

    // A run that fails keeps the items of its map that failed (a rerun of the failed items
    // starts from them), and a rerun is created with the items it carries.
    let (run, _) = store.create(new_run("items", None)).await.expect("create");
    let epoch = store.claim(&run.id, "w1", ttl).await.expect("claim").epoch;
    let progress = ItemProgress { total: 3, done: 1 };
    store
        .record_items(&run.id, epoch, &batch("f", &[0], progress))
        .await
        .expect("record items");
    let failed = crate::run::StepRecord {
        items: Some(progress),
        ..step("f", StepStatus::Failed)
    };
    store
        .record_steps(&run.id, epoch, std::slice::from_ref(&failed))
        .await
        .expect("the map fails");
    store
        .finish(
            &run.id,
            epoch,
            RunOutcome {
                status: RunStatus::Failed,
                output: None,
                error: Some("item 1 failed".into()),
                steps: vec![failed],
                then: None,
            },
        )
        .await
        .expect("finish");
    let kept = store.items(&run.id, "f").await.expect("items");
    assert_eq!(
        kept,
        [(0, json!({"item": 0}))],
        "a failed map keeps its finished items"
    );
    let rerun = crate::ports::NewRun {
        rerun_of: Some(run.id.clone()),
        ..new_run("items", None)
    };
    let carried = batch("f", &[0, 2], ItemProgress { total: 3, done: 2 });
    let made = store
        .create_rerun(rerun, Vec::new(), vec![carried])
        .await
        .expect("create the rerun");
    let items = store.items(&made.id, "f").await.expect("items");
    assert_eq!(
        items.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        [0, 2],
        "the rerun starts with the items carried"
    );
}
