//! Flow stores, and flow changes between processes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::flow;
use crate::error::StoreError;
use crate::model::FlowDef;
use crate::ports::FlowStore;

/// The flow store suite: create, conflicts, versions, listing with a cursor, delete.
pub async fn flow_store(store: &dyn FlowStore) {
    let created = store.create(&flow("f1", "noop")).await.expect("create f1");
    assert_eq!(
        (created.id.as_str(), created.version),
        ("f1", 1),
        "create returns version 1"
    );
    assert!(
        matches!(
            store.create(&flow("f1", "noop")).await,
            Err(StoreError::AlreadyExists(_))
        ),
        "a second create with the same id is AlreadyExists"
    );
    let v2 = store
        .update("f1", &flow("f1", "set"))
        .await
        .expect("update f1");
    assert_eq!(v2.version, 2, "update stores version 2");
    assert_eq!(
        store
            .get("f1", None)
            .await
            .expect("latest")
            .definition
            .nodes[0]
            .node_type,
        "set",
        "latest is v2"
    );
    assert_eq!(
        store.get("f1", Some(1)).await.expect("v1").definition.nodes[0].node_type,
        "noop",
        "old versions stay readable"
    );
    assert!(
        matches!(
            store.get("f1", Some(9)).await,
            Err(StoreError::NotFound { .. })
        ),
        "missing version"
    );
    assert!(matches!(
        store.update("nope", &flow("nope", "noop")).await,
        Err(StoreError::NotFound { .. })
    ));
    // As of a time: the version current then; the latest when the flow had none yet.
    let v1 = store.get("f1", Some(1)).await.expect("v1");
    let as_of = |at| async move {
        store
            .get_as_of("f1", at)
            .await
            .expect("as of a time")
            .version
    };
    assert_eq!(as_of(v1.created_at).await, 1, "at v1's storing: v1");
    assert_eq!(
        as_of(v2.created_at - chrono::Duration::microseconds(1)).await,
        1,
        "just before v2: v1"
    );
    assert_eq!(as_of(v2.created_at).await, 2, "at v2's storing: v2");
    assert_eq!(
        as_of(v1.created_at - chrono::Duration::days(1)).await,
        2,
        "before the flow existed: the latest"
    );
    assert!(matches!(
        store.get_as_of("nope", chrono::Utc::now()).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(
        matches!(
            store.get("nope", None).await,
            Err(StoreError::NotFound { .. })
        ),
        "missing flow"
    );

    for i in 2..=5 {
        store
            .create(&flow(&format!("f{i}"), "noop"))
            .await
            .expect("create");
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    for _ in 0..10 {
        let page = store.list(2, cursor.as_deref()).await.expect("list");
        assert!(page.items.len() <= 2, "a page holds at most `limit` items");
        seen.extend(page.items.iter().map(|f| f.id.clone()));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(
        seen.len(),
        5,
        "listing pages through every flow once: {seen:?}"
    );
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        5,
        "no flow listed twice"
    );
    assert_eq!(seen[0], "f5", "newest first");
    assert!(
        store.list(2, Some("not a cursor")).await.is_err(),
        "a bad cursor is an error"
    );

    store.delete("f1").await.expect("delete");
    assert!(
        matches!(
            store.get("f1", None).await,
            Err(StoreError::NotFound { .. })
        ),
        "deleted"
    );
    assert!(
        matches!(store.delete("f1").await, Err(StoreError::NotFound { .. })),
        "delete twice"
    );
}

/// Flow changes between two caches ("two processes") sharing a flow store: an update announced
/// through one is seen by the other, without a restart; pinned versions stay cached.
pub async fn flow_changes(
    flows: Arc<dyn FlowStore>,
    first: Arc<dyn crate::ports::FlowChanges>,
    second: Arc<dyn crate::ports::FlowChanges>,
) {
    use crate::cache::PlanCache;
    let a = PlanCache::new(crate::Engine::new(), flows.clone(), Some(first), 100);
    let b = PlanCache::new(crate::Engine::new(), flows.clone(), Some(second), 100);
    let id = format!("cache-{}", fastrand::u64(..));
    flows.create(&flow(&id, "noop")).await.expect("create");
    assert_eq!(a.get(&id, None).await.expect("a").0, 1);
    assert_eq!(b.get(&id, None).await.expect("b").0, 1);
    let two_nodes = FlowDef::from_value(
        json!({"id": id, "nodes": [{"id": "x", "type": "noop"}, {"id": "y", "type": "noop"}]}),
    )
    .expect("flow");
    flows.update(&id, &two_nodes).await.expect("update");
    assert_eq!(
        b.get(&id, None).await.expect("b").0,
        1,
        "until announced, b serves its cached latest"
    );
    a.changed(&id).await.expect("announce");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (version, plan) = b.get(&id, None).await.expect("b");
        if version == 2 {
            assert_eq!(plan.len(), 2, "b compiled the new version");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the change reached the other cache"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        b.get(&id, Some(1)).await.expect("v1 pinned").1.len(),
        1,
        "pinned versions stay readable"
    );
}
