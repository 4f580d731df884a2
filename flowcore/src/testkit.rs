//! Conformance suites for the ports: every backend runs them from its own tests, so that the
//! in-memory, SQL, Redis and blob implementations behave the same.
//!
//! Each suite is an async function over a fresh, empty store; it panics with a message naming
//! the case that failed. Time-based cases use short leases (well under a second).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! use flowcore::ports::memory::MemoryRunStore;
//! flowcore::testkit::run_store(&MemoryRunStore::new()).await;
//! # });
//! ```

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use crate::error::StoreError;
use crate::ids::RunId;
use crate::model::FlowDef;
use crate::ports::{BlobStore, Claim, FlowStore, NewRun, Queue, RunFilter, RunOutcome, RunStore};
use crate::run::{Move, RunStatus, StepRecord, StepStatus};

fn flow(id: &str, node_type: &str) -> FlowDef {
    FlowDef::from_value(json!({"id": id, "nodes": [{"id": "n", "type": node_type}]}))
        .expect("a valid flow")
}

fn new_run(flow_id: &str, key: Option<&str>) -> NewRun {
    NewRun {
        id: RunId::new(),
        flow_id: flow_id.to_owned(),
        flow_version: 1,
        input: json!({"x": 1}),
        idempotency_key: key.map(str::to_owned),
        claim: None,
        trigger: None,
    }
}

fn step(node: &str, status: StepStatus) -> StepRecord {
    StepRecord {
        node: Arc::from(node),
        status,
        attempts: 1,
        started_at: Some(Utc::now()),
        finished_at: Some(Utc::now()),
        output: Some(Arc::new(json!({"node": node}))),
        error: None,
        port: None,
    }
}

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

/// The run store suite: idempotency keys, leases and epochs, compare-and-set, stale writes
/// refused, steps, listing with a cursor under concurrent inserts, expiry and pruning.
pub async fn run_store(store: &dyn RunStore) {
    // Idempotency: same key and flow -> same run; same key, other flow -> another run.
    let (a, created) = store
        .create(new_run("flow-a", Some("k1")))
        .await
        .expect("create");
    assert!(created);
    assert_eq!(a.status, RunStatus::Queued);
    let (again, created) = store
        .create(new_run("flow-a", Some("k1")))
        .await
        .expect("create again");
    assert!(
        !created,
        "the same idempotency key does not create a second run"
    );
    assert_eq!(again.id, a.id, "the same key gives the same run");
    let (other, created) = store
        .create(new_run("flow-b", Some("k1")))
        .await
        .expect("other flow");
    assert!(created && other.id != a.id, "keys are per flow");

    // Claim, epochs and stale writes.
    let ttl = Duration::from_millis(300);
    let lease1 = store
        .claim(&a.id, "w1", ttl)
        .await
        .expect("claim a queued run");
    assert_eq!(
        store.get(&a.id).await.expect("get").status,
        RunStatus::Running
    );
    assert!(
        matches!(
            store.claim(&a.id, "w2", ttl).await,
            Err(StoreError::Conflict(_))
        ),
        "a leased run is not claimable"
    );
    store
        .record_steps(&a.id, lease1.epoch, &[step("s1", StepStatus::Succeeded)])
        .await
        .expect("record");
    store.renew(&a.id, lease1.epoch, ttl).await.expect("renew");
    let before_expiry = Utc::now();
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let now = Utc::now();
    let expired = store.expired(None, now, 100).await.expect("expired");
    assert!(
        expired.iter().any(|(id, _)| id == &a.id),
        "a lapsed lease shows up for the reaper"
    );
    let since = store
        .expired(Some(before_expiry), now, 100)
        .await
        .expect("expired since");
    assert!(
        since.iter().any(|(id, _)| id == &a.id),
        "and for a reaper that looks at what lapsed since before its expiry"
    );
    assert!(
        since.windows(2).all(|w| w[0].1 <= w[1].1),
        "oldest expiry first"
    );
    let later = store
        .expired(Some(now), Utc::now(), 100)
        .await
        .expect("expired since now");
    assert!(
        !later.iter().any(|(id, _)| id == &a.id),
        "not for one that looked after its expiry"
    );
    let claimed = store
        .claim_run(&a.id, "w2", ttl)
        .await
        .expect("claim after expiry");
    let lease2 = claimed
        .lease
        .clone()
        .expect("the claimed run has its lease");
    assert_eq!(
        (claimed.status, lease2.owner.as_str(), claimed.epoch),
        (RunStatus::Running, "w2", lease2.epoch),
        "claim_run answers the run as claimed"
    );
    assert_eq!(claimed.input, a.input, "with the whole run");
    assert!(
        matches!(
            store.claim_run(&a.id, "w3", ttl).await,
            Err(StoreError::Conflict(_))
        ),
        "claim_run refuses a leased run too"
    );
    assert!(
        lease2.epoch > lease1.epoch,
        "a new owner gets a higher epoch"
    );
    assert!(
        matches!(
            store
                .record_steps(&a.id, lease1.epoch, &[step("s2", StepStatus::Succeeded)])
                .await,
            Err(StoreError::StaleLease(_))
        ),
        "the old owner's step write is refused"
    );
    assert!(
        matches!(
            store.renew(&a.id, lease1.epoch, ttl).await,
            Err(StoreError::StaleLease(_))
        ),
        "stale renew"
    );
    let stale_finish = store
        .finish(
            &a.id,
            lease1.epoch,
            RunOutcome {
                status: RunStatus::Failed,
                ..RunOutcome::default()
            },
        )
        .await;
    assert!(
        matches!(stale_finish, Err(StoreError::StaleLease(_))),
        "the old owner cannot finish the run"
    );
    store
        .record_steps(
            &a.id,
            lease2.epoch,
            &[
                step("s1", StepStatus::Failed),
                step("s2", StepStatus::Succeeded),
            ],
        )
        .await
        .expect("record");
    let steps = store.steps(&a.id).await.expect("steps");
    assert_eq!(steps.len(), 2, "steps are kept once per node: {steps:?}");
    assert_eq!(
        steps.iter().find(|s| &*s.node == "s1").map(|s| s.status),
        Some(StepStatus::Failed),
        "a step is replaced"
    );
    assert_eq!(
        steps
            .iter()
            .find(|s| &*s.node == "s2")
            .and_then(|s| s.output.clone()),
        Some(Arc::new(json!({"node": "s2"})))
    );
    let done = store
        .finish(
            &a.id,
            lease2.epoch,
            RunOutcome {
                status: RunStatus::Succeeded,
                output: Some(json!(42)),
                error: None,
                steps: vec![step("s3", StepStatus::Succeeded)],
            },
        )
        .await
        .expect("finish");
    assert_eq!(
        (done.status, done.output.clone()),
        (RunStatus::Succeeded, Some(json!(42)))
    );
    assert!(
        done.finished_at.is_some() && done.started_at.is_some(),
        "timestamps are set"
    );
    assert_eq!(
        store.steps(&a.id).await.expect("steps").len(),
        3,
        "finish writes its steps with the status"
    );
    assert!(
        matches!(
            store.claim(&a.id, "w3", ttl).await,
            Err(StoreError::Conflict(_))
        ),
        "a finished run is not claimable"
    );
    assert!(
        store
            .finish(
                &a.id,
                lease2.epoch,
                RunOutcome {
                    status: RunStatus::Failed,
                    ..RunOutcome::default()
                }
            )
            .await
            .is_err(),
        "a finished run cannot be finished again"
    );

    // Created already claimed: running at epoch 1, one commit.
    let claimed = NewRun {
        claim: Some(Claim {
            owner: "w9".into(),
            ttl,
        }),
        trigger: Some(json!({"type": "webhook", "headers": {"x-event": "push"}})),
        ..new_run("flow-c", None)
    };
    let (c, created) = store.create(claimed).await.expect("create claimed");
    assert!(created);
    assert_eq!(
        store.get(&c.id).await.expect("get").trigger,
        Some(json!({"type": "webhook", "headers": {"x-event": "push"}})),
        "what started a run is kept with it"
    );
    assert_eq!(
        (c.status, c.epoch),
        (RunStatus::Running, 1),
        "a claimed create is running at epoch 1"
    );
    assert_eq!(c.lease.as_ref().map(|l| l.owner.as_str()), Some("w9"));
    assert!(c.started_at.is_some());
    assert!(
        matches!(
            store.claim(&c.id, "w1", ttl).await,
            Err(StoreError::Conflict(_))
        ),
        "a claimed run is not claimable while its lease holds"
    );
    let stale_finish = store
        .finish(
            &c.id,
            2,
            RunOutcome {
                status: RunStatus::Succeeded,
                steps: vec![step("x", StepStatus::Succeeded)],
                ..RunOutcome::default()
            },
        )
        .await;
    assert!(
        matches!(stale_finish, Err(StoreError::StaleLease(_))),
        "a stale finish is refused"
    );
    assert!(
        store.steps(&c.id).await.expect("steps").is_empty(),
        "and its steps are not written"
    );
    store
        .finish(
            &c.id,
            1,
            RunOutcome {
                status: RunStatus::Failed,
                error: Some("boom".into()),
                ..RunOutcome::default()
            },
        )
        .await
        .expect("finish the claimed run");

    // Release hands the run back; compare-and-set transitions.
    let (b, _) = store
        .create(new_run("flow-a", None))
        .await
        .expect("create b");
    let lease = store.claim(&b.id, "w1", ttl).await.expect("claim b");
    store.release(&b.id, lease.epoch).await.expect("release");
    assert_eq!(
        store.get(&b.id).await.expect("get").status,
        RunStatus::Queued,
        "released runs are queued again"
    );
    assert!(
        matches!(
            store.release(&b.id, lease.epoch).await,
            Err(StoreError::StaleLease(_))
        ),
        "release twice"
    );
    store
        .transition(&b.id, RunStatus::Queued, RunStatus::Cancelled)
        .await
        .expect("cancel a queued run");
    assert!(
        matches!(
            store
                .transition(&b.id, RunStatus::Queued, RunStatus::Cancelled)
                .await,
            Err(StoreError::Conflict(_))
        ),
        "compare-and-set fails when the status moved on"
    );
    assert!(matches!(
        store.get(&RunId::from("missing")).await,
        Err(StoreError::NotFound { .. })
    ));

    // Pagination, newest first, stable under concurrent inserts.
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(
            store
                .create(new_run("flow-p", None))
                .await
                .expect("create")
                .0
                .id,
        );
    }
    let mut filter = RunFilter {
        flow_id: Some("flow-p".into()),
        limit: 3,
        ..RunFilter::default()
    };
    let mut seen = Vec::new();
    for page_no in 0..10 {
        let page = store.list(&filter).await.expect("list");
        seen.extend(page.items.iter().map(|r| r.id.clone()));
        if page_no == 0 {
            // Inserted while paging: must not shift the following pages.
            store
                .create(new_run("flow-p", None))
                .await
                .expect("concurrent insert");
        }
        match page.next_cursor {
            Some(c) => filter.cursor = Some(c),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(
        seen, ids,
        "pages list every run once, newest first, despite a concurrent insert"
    );
    let queued = store
        .list(&RunFilter {
            status: Some(RunStatus::Cancelled),
            limit: 10,
            ..RunFilter::default()
        })
        .await
        .expect("list by status");
    assert_eq!(
        queued
            .items
            .iter()
            .map(|r| r.id.clone())
            .collect::<Vec<_>>(),
        vec![b.id.clone()],
        "status filter"
    );
    assert!(
        store
            .list(&RunFilter {
                cursor: Some("zz".into()),
                limit: 1,
                ..RunFilter::default()
            })
            .await
            .is_err()
    );

    // Pruning removes finished runs only, in batches.
    let pruned_first = store.prune(Utc::now(), 1).await.expect("prune");
    assert_eq!(pruned_first, 1, "prune respects the batch size");
    let pruned_rest = store.prune(Utc::now(), 100).await.expect("prune");
    assert_eq!(
        pruned_rest, 2,
        "only the finished runs (a, b and c) are pruned"
    );
    assert!(
        matches!(store.get(&a.id).await, Err(StoreError::NotFound { .. })),
        "a was pruned"
    );
    assert!(store.get(&ids[0]).await.is_ok(), "queued runs stay");

    // Several at once: the claimable ones, not a leased one nor an unknown id.
    let mut made = Vec::new();
    for _ in 0..3 {
        let (run, _) = store
            .create(new_run("flow-batch", None))
            .await
            .expect("create");
        made.push(run);
    }
    let leased = store.claim(&made[1].id, "w0", ttl).await.expect("claim");
    let mut batch = store
        .claim_runs(
            &[
                made[0].id.clone(),
                made[1].id.clone(),
                RunId::new(),
                made[2].id.clone(),
            ],
            "w4",
            ttl,
        )
        .await
        .expect("claim a batch");
    batch.sort_by(|x, y| x.id.as_str().cmp(y.id.as_str()));
    let mut expected = vec![made[0].id.clone(), made[2].id.clone()];
    expected.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    assert_eq!(
        batch.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        expected,
        "claim_runs takes the claimable runs only"
    );
    for run in &batch {
        assert_eq!(
            (
                run.status,
                run.lease.as_ref().map(|l| l.owner.as_str()),
                run.epoch
            ),
            (RunStatus::Running, Some("w4"), 1),
            "each answered as claimed"
        );
        assert_eq!(run.input, made[0].input, "with the whole run");
    }
    assert!(
        store
            .claim_runs(&[made[0].id.clone()], "w5", ttl)
            .await
            .expect("claim again")
            .is_empty(),
        "a run claimed in a batch is leased"
    );
    // Leave the store as it was: finished, then pruned.
    let ends = batch
        .iter()
        .map(|r| (r.id.clone(), r.epoch))
        .chain([(made[1].id.clone(), leased.epoch)]);
    for (id, epoch) in ends {
        store
            .finish(
                &id,
                epoch,
                RunOutcome {
                    status: RunStatus::Succeeded,
                    ..RunOutcome::default()
                },
            )
            .await
            .expect("finish");
    }
    assert_eq!(store.prune(Utc::now(), 100).await.expect("prune"), 3);
}

/// The queue suite: leases, redelivery after expiry, no duplicate under concurrent leases,
/// idempotent ack, stale acks refused, nack with a delay, dead letters after `max_deliveries`
/// (the queue under test must be configured with `max_deliveries` = 3).
pub async fn queue(queue: Arc<dyn Queue>) {
    let ttl = Duration::from_millis(300);
    let none = Duration::ZERO;
    let g = "kit";
    let run = RunId::new();
    queue.enqueue(g, &run, None).await.expect("enqueue");
    let depth = queue.depth(g).await.expect("depth");
    assert_eq!(depth.ready, 1, "one ready job: {depth:?}");
    let got = queue.lease(g, 10, ttl, none).await.expect("lease");
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].job.run_id.clone(), got[0].job.deliveries),
        (run.clone(), 1)
    );
    assert!(
        queue
            .lease(g, 10, ttl, none)
            .await
            .expect("lease")
            .is_empty(),
        "a leased job is not delivered twice"
    );
    assert!(
        queue
            .lease("other-group", 10, ttl, none)
            .await
            .expect("lease")
            .is_empty(),
        "groups are separate"
    );
    queue.heartbeat(&got[0], ttl).await.expect("heartbeat");

    // Expiry: delivered again, and the old delivery can no longer ack or heartbeat.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let again = queue
        .lease(g, 10, ttl, none)
        .await
        .expect("lease after expiry");
    assert_eq!(again.len(), 1, "an expired lease is delivered again");
    assert_eq!(again[0].job.deliveries, 2);
    assert!(
        matches!(queue.ack(&got[0]).await, Err(StoreError::StaleLease(_))),
        "the old delivery's ack is refused"
    );
    assert!(
        matches!(
            queue.heartbeat(&got[0], ttl).await,
            Err(StoreError::StaleLease(_))
        ),
        "stale heartbeat"
    );
    queue.ack(&again[0]).await.expect("ack");
    queue.ack(&again[0]).await.expect("ack is idempotent");
    assert_eq!(
        queue.depth(g).await.expect("depth").ready + queue.depth(g).await.expect("depth").leased,
        0
    );

    // Nack with a delay; delayed enqueue.
    queue
        .enqueue(g, &RunId::new(), None)
        .await
        .expect("enqueue");
    let job = queue.lease(g, 1, ttl, none).await.expect("lease").remove(0);
    queue
        .nack(&job, Some(Utc::now() + chrono::Duration::milliseconds(200)))
        .await
        .expect("nack");
    assert!(
        queue
            .lease(g, 1, ttl, none)
            .await
            .expect("lease")
            .is_empty(),
        "a nacked job waits for its time"
    );
    assert_eq!(
        queue.depth(g).await.expect("depth").delayed,
        1,
        "the nacked job counts as delayed"
    );
    let later = queue
        .lease(g, 1, ttl, Duration::from_secs(2))
        .await
        .expect("lease with wait");
    assert_eq!(later.len(), 1, "lease waits for the delayed job");
    queue.ack(&later[0]).await.expect("ack");

    // Dead letters after 3 deliveries.
    let doomed = RunId::new();
    queue.enqueue(g, &doomed, None).await.expect("enqueue");
    for delivery in 1..=3 {
        let job = queue.lease(g, 1, ttl, none).await.expect("lease").remove(0);
        assert_eq!(job.job.deliveries, delivery);
        queue.nack(&job, None).await.expect("nack");
    }
    assert!(
        queue
            .lease(g, 1, ttl, none)
            .await
            .expect("lease")
            .is_empty(),
        "no fourth delivery"
    );
    let dead = queue.dead_letters(g, 10).await.expect("dead letters");
    assert_eq!(
        dead.iter().map(|j| j.run_id.clone()).collect::<Vec<_>>(),
        vec![doomed],
        "dead-lettered"
    );
    assert_eq!(queue.depth(g).await.expect("depth").dead, 1);

    // Concurrent leases: every job delivered exactly once.
    let total = 200;
    for _ in 0..total {
        queue
            .enqueue("kit-many", &RunId::new(), None)
            .await
            .expect("enqueue");
    }
    let mut workers = Vec::new();
    for _ in 0..4 {
        let queue = queue.clone();
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = queue
                    .lease("kit-many", 7, Duration::from_secs(30), Duration::ZERO)
                    .await
                    .expect("lease");
                if batch.is_empty() {
                    break mine;
                }
                for job in batch {
                    queue.ack(&job).await.expect("ack");
                    mine.push(job.job.id);
                }
            }
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("worker"));
    }
    assert_eq!(all.len(), total, "every job was delivered");
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        total,
        "no job was delivered twice"
    );
}

/// The blob store suite: round trips, replace, stat, delete, missing keys, keys that would
/// escape the store refused.
pub async fn blob_store(store: &dyn BlobStore) {
    store
        .put("files/a.txt", b"hello".to_vec())
        .await
        .expect("put");
    assert_eq!(store.get("files/a.txt").await.expect("get"), b"hello");
    assert_eq!(store.stat("files/a.txt").await.expect("stat"), Some(5));
    store
        .put("files/a.txt", vec![7; 100_000])
        .await
        .expect("replace");
    assert_eq!(
        store.get("files/a.txt").await.expect("get").len(),
        100_000,
        "put replaces"
    );
    // Streaming reads give the same bytes, in chunks.
    {
        use futures::StreamExt;
        let mut stream = store.get_stream("files/a.txt").await.expect("get_stream");
        let mut read = Vec::new();
        while let Some(chunk) = stream.next().await {
            read.extend(chunk.expect("a chunk"));
        }
        assert_eq!(read, vec![7; 100_000], "a streamed read");
        assert!(
            matches!(
                store.get_stream("files/none").await.map(|_| ()),
                Err(StoreError::NotFound { .. })
            ),
            "a streamed read of a missing blob"
        );
    }
    store
        .put("files/empty", Vec::new())
        .await
        .expect("empty blob");
    assert_eq!(
        store.get("files/empty").await.expect("get empty"),
        Vec::<u8>::new()
    );
    assert!(
        matches!(
            store.get("files/none").await,
            Err(StoreError::NotFound { .. })
        ),
        "missing blob"
    );
    assert_eq!(store.stat("files/none").await.expect("stat"), None);
    store
        .put("other/b", b"b".to_vec())
        .await
        .expect("put elsewhere");
    let mut listed = store.list("files/").await.expect("list");
    listed.sort();
    assert_eq!(
        listed,
        ["files/a.txt", "files/empty"],
        "the keys under a prefix"
    );
    store.delete("other/b").await.expect("delete");
    store.delete("files/a.txt").await.expect("delete");
    store
        .delete("files/a.txt")
        .await
        .expect("deleting a missing blob is fine");
    assert!(matches!(
        store.get("files/a.txt").await,
        Err(StoreError::NotFound { .. })
    ));
    // Streaming uploads: stored when under the limit, refused (and not stored) when over.
    let chunks = |n: usize| -> crate::ports::ChunkStream {
        Box::pin(futures::stream::iter(
            (0..n).map(|i| Ok(vec![i as u8; 1000])),
        ))
    };
    assert_eq!(
        store
            .put_stream("files/streamed", chunks(10), 10_000)
            .await
            .expect("put_stream"),
        10_000
    );
    assert_eq!(
        store.get("files/streamed").await.expect("get").len(),
        10_000
    );
    assert!(
        matches!(
            store.put_stream("files/too-big", chunks(11), 10_000).await,
            Err(StoreError::TooLarge(_))
        ),
        "a stream over the limit is refused"
    );
    assert_eq!(
        store.stat("files/too-big").await.expect("stat"),
        None,
        "and nothing is left behind"
    );
    for bad in [
        "../etc/passwd",
        "/abs",
        "a//b",
        "a/./b",
        "",
        "a\\b",
        "sp ace",
    ] {
        assert!(
            matches!(store.put(bad, vec![1]).await, Err(StoreError::Invalid(_))),
            "key `{bad}` must be refused"
        );
        assert!(store.get(bad).await.is_err(), "key `{bad}` must be refused");
    }
}

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

fn counting_engine(counts: &Arc<Counts>) -> crate::Engine {
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
    crate::Engine::builder().registry(registry).build()
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
    use crate::durable::{self, Checkpoint, DurableOptions, Hooks};

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

    // A worker dies (its task is dropped: no finish, no more renewals) after `one` is recorded.
    let a = worker("a");
    let new = NewRun {
        claim: Some(a.claim()),
        ..new_run("durable", None)
    };
    let (run, _) = runs.create(new).await.expect("create");
    let task = {
        let (engine, plan, runs, run, a) = (
            engine.clone(),
            plan.clone(),
            runs.clone(),
            run.clone(),
            a.clone(),
        );
        tokio::spawn(async move {
            durable::execute(&engine, &plan, &runs, &run, &a, Hooks::default()).await
        })
    };
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
        runs.expired(None, Utc::now(), 10)
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
        .create(NewRun {
            claim: Some(a.claim()),
            ..new_run("durable", None)
        })
        .await
        .expect("create");
    let task = {
        let (engine, plan, runs, run2, a) = (
            engine.clone(),
            plan.clone(),
            runs.clone(),
            run2.clone(),
            a.clone(),
        );
        tokio::spawn(async move {
            durable::execute(&engine, &plan, &runs, &run2, &a, Hooks::default()).await
        })
    };
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
        .create(NewRun {
            claim: Some(fast.claim()),
            ..new_run("durable", None)
        })
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
        .create(NewRun {
            claim: Some(a.claim()),
            ..new_run("durable", None)
        })
        .await
        .expect("create");
    let task = {
        let (engine, plan, runs, run4, a, token) = (
            engine.clone(),
            plan.clone(),
            runs.clone(),
            run4.clone(),
            a.clone(),
            token.clone(),
        );
        tokio::spawn(async move {
            durable::execute(
                &engine,
                &plan,
                &runs,
                &run4,
                &a,
                Hooks {
                    cancel: Some(token),
                    ..Hooks::default()
                },
            )
            .await
        })
    };
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
        .create(NewRun {
            claim: Some(slow_flush.claim()),
            ..new_run("durable", None)
        })
        .await
        .expect("create");
    let (ones, twos) = (counts.of("one"), counts.of("two"));
    let hand_back = crate::CancellationToken::new();
    let task = {
        let (engine, plan, runs, run5, hand_back) = (
            engine.clone(),
            plan.clone(),
            runs.clone(),
            run5.clone(),
            hand_back.clone(),
        );
        tokio::spawn(async move {
            let hooks = Hooks {
                hand_back: Some(hand_back),
                ..Hooks::default()
            };
            durable::execute(&engine, &plan, &runs, &run5, &slow_flush, hooks).await
        })
    };
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

/// Many creates at once (a group commit on SQLite puts them in one transaction): each gets its
/// answer, and the ones sharing an idempotency key get the one run, without undoing the others.
pub async fn concurrent_creates(store: Arc<dyn RunStore>) {
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = (i % 3 == 0).then_some("together");
                let run = NewRun {
                    input: json!({"i": i}),
                    ..new_run("concurrent", key)
                };
                let asked = run.id.clone();
                (asked, store.create(run).await)
            })
        })
        .collect();
    let mut created = 0;
    let mut keyed = std::collections::HashSet::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let (asked, answer) = task.await.expect("task");
        let (run, new) = answer.expect("create");
        created += usize::from(new);
        if i % 3 == 0 {
            keyed.insert(run.id.clone());
        } else {
            assert_eq!(
                (&run.id, &run.input),
                (&asked, &json!({"i": i})),
                "each creator gets its own run back"
            );
        }
        assert_eq!(store.get(&run.id).await.expect("stored").id, run.id);
    }
    assert_eq!(keyed.len(), 1, "one run for the shared key");
    assert_eq!(created, 41, "40 unique runs and the keyed one");
}

/// Many runs ended at once (PostgreSQL writes concurrent ends in one statement): each owner
/// gets its own run back with its own output and steps; an end under a stale epoch and a second
/// end of the same run in the same burst are refused without undoing the others.
pub async fn concurrent_finishes(store: Arc<dyn RunStore>) {
    let ttl = Duration::from_secs(30);
    let mut leased = Vec::new();
    for _ in 0..40 {
        let (run, _) = store
            .create(new_run("finishing", None))
            .await
            .expect("create");
        let lease = store.claim(&run.id, "w", ttl).await.expect("claim");
        leased.push((run.id, lease.epoch));
    }
    let finish = |i: usize, id: RunId, epoch: u64| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut done = step("last", StepStatus::Succeeded);
            done.output = Some(Arc::new(json!({"i": i})));
            let outcome = RunOutcome {
                status: RunStatus::Succeeded,
                output: Some(json!({"run": i})),
                error: None,
                steps: vec![done],
            };
            store.finish(&id, epoch, outcome).await
        })
    };
    // Runs 0 to 35 by their owner, 36 to 39 under a stale epoch, run 0 twice.
    let mut tasks: Vec<_> = leased
        .iter()
        .enumerate()
        .map(|(i, (id, epoch))| finish(i, id.clone(), if i < 36 { *epoch } else { epoch + 1 }))
        .collect();
    tasks.push(finish(0, leased[0].0.clone(), leased[0].1));
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    let second_of_run0 = answers.pop().expect("the second end of run 0");
    let ended_run0 = [&answers[0], &second_of_run0]
        .iter()
        .filter(|a| a.is_ok())
        .count();
    assert_eq!(ended_run0, 1, "one of two ends of the same run is taken");
    assert!(
        [&answers[0], &second_of_run0]
            .iter()
            .any(|a| matches!(a, Err(StoreError::StaleLease(_)))),
        "the other is refused as stale"
    );
    for (i, answer) in answers.iter().enumerate().skip(1) {
        let (id, _) = &leased[i];
        if i < 36 {
            let run = answer.as_ref().expect("the owner's end is taken");
            assert_eq!(
                (&run.id, run.status, &run.output),
                (id, RunStatus::Succeeded, &Some(json!({"run": i}))),
                "each owner gets its own run back"
            );
            let steps = store.steps(id).await.expect("steps");
            assert_eq!(steps.len(), 1);
            assert_eq!(steps[0].output.as_deref(), Some(&json!({"i": i})));
        } else {
            assert!(
                matches!(answer, Err(StoreError::StaleLease(_))),
                "a stale end is refused: {answer:?}"
            );
            let run = store.get(id).await.expect("stored");
            assert_eq!(run.status, RunStatus::Running, "and changes nothing");
            assert!(store.steps(id).await.expect("steps").is_empty());
        }
    }
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

/// Pruning in bounded batches: all old finished runs go, live and recent ones stay.
pub async fn pruning(store: &dyn RunStore) {
    let mut old = Vec::new();
    for _ in 0..25 {
        let (run, _) = store.create(new_run("prune", None)).await.expect("create");
        store
            .transition(&run.id, RunStatus::Queued, RunStatus::Cancelled)
            .await
            .expect("finish");
        old.push(run.id);
    }
    let (live, _) = store.create(new_run("prune", None)).await.expect("create");
    let cutoff = Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (recent, _) = store.create(new_run("prune", None)).await.expect("create");
    store
        .transition(&recent.id, RunStatus::Queued, RunStatus::Cancelled)
        .await
        .expect("finish");
    let deleted = crate::ports::prune_runs(store, cutoff, 10, Duration::from_millis(1))
        .await
        .expect("prune");
    assert_eq!(
        deleted, 25,
        "every old finished run is pruned, in batches of 10"
    );
    for id in &old {
        assert!(matches!(
            store.get(id).await,
            Err(StoreError::NotFound { .. })
        ));
    }
    assert!(store.get(&live.id).await.is_ok(), "a live run stays");
    assert!(store.get(&recent.id).await.is_ok(), "a recent run stays");
}

/// Credentials, API keys, usage and files.
pub async fn meta_store<S>(store: Arc<S>)
where
    S: crate::ports::CredentialStore
        + crate::ports::ApiKeyStore
        + crate::ports::UsageStore
        + crate::ports::FileStore
        + 'static,
{
    use crate::ports::{ApiKeyRecord, FileRecord, StoredCredential};
    let now = Utc::now();

    // Credentials.
    let cred = StoredCredential {
        id: "c1".into(),
        name: "github".into(),
        kind: "api_key".into(),
        key_id: "k1".into(),
        ciphertext: vec![1, 2, 3, 0, 255],
        created_at: now,
        updated_at: now,
        allowed_hosts: Some(vec!["api.github.com".into(), "[::1]:8080".into()]),
    };
    store
        .insert_credential(&cred)
        .await
        .expect("insert credential");
    assert!(
        matches!(
            store
                .insert_credential(&StoredCredential {
                    id: "c2".into(),
                    ..cred.clone()
                })
                .await,
            Err(StoreError::AlreadyExists(_))
        ),
        "credential names are unique"
    );
    assert_eq!(
        store
            .get_credential("c1")
            .await
            .expect("by id")
            .allowed_hosts,
        cred.allowed_hosts,
        "allowed hosts are kept"
    );
    assert_eq!(
        store.get_credential("c1").await.expect("by id").ciphertext,
        vec![1, 2, 3, 0, 255],
        "binary round trip"
    );
    assert_eq!(
        store.get_credential("github").await.expect("by name").id,
        "c1"
    );
    store
        .reencrypt_credential("c1", "k1", "k2", &[9, 9])
        .await
        .expect("re-encrypt");
    assert!(
        matches!(
            store.reencrypt_credential("c1", "k1", "k3", &[7]).await,
            Err(StoreError::Conflict(_))
        ),
        "re-encryption is compare-and-set on the key id"
    );
    let got = store.get_credential("c1").await.expect("get");
    assert_eq!(
        (got.key_id.as_str(), got.ciphertext.as_slice()),
        ("k2", &[9u8, 9][..])
    );
    assert_eq!(store.list_credentials().await.expect("list").len(), 1);
    store.delete_credential("c1").await.expect("delete");
    assert!(matches!(
        store.get_credential("c1").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete_credential("c1").await,
        Err(StoreError::NotFound { .. })
    ));

    // API keys.
    let key = ApiKeyRecord {
        id: "a1".into(),
        name: "ci".into(),
        prefix: "fc_abc123".into(),
        hash: "hash".into(),
        created_at: now,
        revoked_at: None,
        scopes: "read,run".parse().expect("scopes"),
        parent_id: None,
    };
    store.insert_api_key(&key).await.expect("insert key");
    assert!(matches!(
        store
            .insert_api_key(&ApiKeyRecord {
                id: "a2".into(),
                ..key.clone()
            })
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(
        store
            .find_api_key("fc_abc123")
            .await
            .expect("find")
            .map(|k| k.id),
        Some("a1".into())
    );
    assert!(store.find_api_key("fc_nope").await.expect("find").is_none());
    store.revoke_api_key("a1").await.expect("revoke");
    store
        .revoke_api_key("a1")
        .await
        .expect("revoke is idempotent");
    assert!(
        store
            .find_api_key("fc_abc123")
            .await
            .expect("find")
            .and_then(|k| k.revoked_at)
            .is_some()
    );
    assert!(matches!(
        store.revoke_api_key("zz").await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.list_api_keys().await.expect("list").len(), 1);
    assert_eq!(
        store
            .find_api_key("fc_abc123")
            .await
            .expect("find")
            .map(|k| k.scopes),
        Some("read,run".parse().expect("scopes")),
        "scopes are kept"
    );

    // Revoking a key revokes the keys it made, at any depth, and nothing else.
    let child = |id: &str, prefix: &str, parent: Option<&str>| ApiKeyRecord {
        id: id.into(),
        prefix: prefix.into(),
        parent_id: parent.map(Into::into),
        ..key.clone()
    };
    for k in [
        child("p", "fc_p", None),
        child("c", "fc_c", Some("p")),
        child("g", "fc_g", Some("c")),
        child("s", "fc_s", None),
    ] {
        store.insert_api_key(&k).await.expect("insert key");
    }
    store.revoke_api_key("c").await.expect("revoke a child");
    let revoked = |prefix: &'static str| {
        let store = &store;
        async move {
            store
                .find_api_key(prefix)
                .await
                .expect("find")
                .is_some_and(|k| k.revoked_at.is_some())
        }
    };
    assert!(!revoked("fc_p").await, "the parent of a revoked key stays");
    assert!(revoked("fc_c").await && revoked("fc_g").await);
    store.revoke_api_key("p").await.expect("revoke the parent");
    assert!(revoked("fc_p").await);
    assert!(!revoked("fc_s").await, "an unrelated key stays");

    // Usage: concurrent adds all count.
    let mut adds = Vec::new();
    for _ in 0..20 {
        let store = store.clone();
        adds.push(tokio::spawn(async move {
            store.add_usage("f1", "2026-11-22", 1, 4, 10).await
        }));
    }
    for a in adds {
        a.await.expect("task").expect("add usage");
    }
    store
        .add_usage("f1", "2026-11-23", 1, 1, 0)
        .await
        .expect("add");
    store
        .add_usage("f2", "2026-11-22", 2, 2, 2)
        .await
        .expect("add");
    let f1 = store
        .usage(Some("f1"), "2026-11-01", "2026-11-30")
        .await
        .expect("usage");
    assert_eq!(f1.len(), 2);
    assert_eq!(
        (
            f1[0].day.as_str(),
            f1[0].runs,
            f1[0].node_executions,
            f1[0].tokens
        ),
        ("2026-11-22", 20, 80, 200)
    );
    assert_eq!(
        store
            .usage(None, "2026-11-22", "2026-11-22")
            .await
            .expect("usage")
            .len(),
        2,
        "all flows, one day"
    );

    // Files.
    let file = FileRecord {
        id: "file1".into(),
        name: "report.pdf".into(),
        content_type: "application/pdf".into(),
        size: 1234,
        blob_key: "files/file1".into(),
        created_at: now,
    };
    store.insert_file(&file).await.expect("insert file");
    assert_eq!(store.get_file("file1").await.expect("get").size, 1234);
    store.delete_file("file1").await.expect("delete");
    assert!(matches!(
        store.get_file("file1").await,
        Err(StoreError::NotFound { .. })
    ));
}

/// Every move between run statuses, legal and illegal: from each status to each status, the
/// store makes exactly the moves of [`RunStatus::move_to`] through the method that owns each
/// (claim, release, finish, transition) and refuses every other, leaving the run as it was.
pub async fn transitions(store: &dyn RunStore) {
    let ttl = Duration::from_secs(60);
    // A run in `status`, with the epoch of its lease (for a running one, a lapsed lease when
    // `lapsed`: claimable again).
    let run_in = async |status: RunStatus, lapsed: bool| -> (RunId, u64) {
        let (run, _) = store.create(new_run("moves", None)).await.expect("create");
        if status == RunStatus::Queued {
            return (run.id, 0);
        }
        let first = if lapsed { Duration::ZERO } else { ttl };
        let lease = store.claim(&run.id, "w1", first).await.expect("claim");
        if status == RunStatus::Running {
            if lapsed {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            return (run.id, lease.epoch);
        }
        let outcome = RunOutcome {
            status,
            ..Default::default()
        };
        store
            .finish(&run.id, lease.epoch, outcome)
            .await
            .expect("finish");
        (run.id, lease.epoch)
    };
    for from in RunStatus::ALL {
        for to in RunStatus::ALL {
            let legal = from.move_to(to);
            let case = format!("{from} -> {to} ({legal:?})");
            let (id, epoch) = run_in(from, true).await;
            // Every method that could reach `to`, each tried on a run in `from`.
            let claim = async || store.claim(&id, "w2", ttl).await.map(|_| ());
            let release = async || store.release(&id, epoch).await;
            let finish = async || {
                let outcome = RunOutcome {
                    status: to,
                    ..Default::default()
                };
                store.finish(&id, epoch, outcome).await.map(|_| ())
            };
            let transition = async || store.transition(&id, from, to).await.map(|_| ());
            match legal {
                Some(m) => {
                    let done = match m {
                        Move::Claim => claim().await,
                        Move::Release => release().await,
                        Move::Finish => finish().await,
                        Move::Cancel => transition().await,
                    };
                    done.unwrap_or_else(|e| panic!("{case} is legal: {e}"));
                    let run = store.get(&id).await.expect("get");
                    assert_eq!(run.status, to, "{case}");
                    assert_eq!(run.lease.is_some(), to.is_leased(), "{case}: the lease");
                    assert_eq!(run.finished_at.is_some(), to.is_final(), "{case}");
                }
                None => {
                    if to == RunStatus::Running {
                        assert!(claim().await.is_err(), "{case}: claim refused");
                    }
                    if to == RunStatus::Queued {
                        assert!(release().await.is_err(), "{case}: release refused");
                    }
                    if to.is_final() {
                        assert!(finish().await.is_err(), "{case}: finish refused");
                    }
                    assert!(transition().await.is_err(), "{case}: transition refused");
                    let run = store.get(&id).await.expect("get");
                    assert_eq!(run.status, from, "{case}: the run is as it was");
                }
            }
        }
    }
    // The lease guards its moves: a live lease is not claimed, an old epoch neither releases
    // nor finishes, and the moves a lease makes are not made without it.
    let (id, epoch) = run_in(RunStatus::Running, false).await;
    assert!(matches!(
        store.claim(&id, "w2", ttl).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.release(&id, epoch + 1).await,
        Err(StoreError::StaleLease(_))
    ));
    let done = RunOutcome {
        status: RunStatus::Succeeded,
        ..Default::default()
    };
    assert!(matches!(
        store.finish(&id, epoch + 1, done.clone()).await,
        Err(StoreError::StaleLease(_))
    ));
    assert!(matches!(
        store
            .transition(&id, RunStatus::Running, RunStatus::Cancelled)
            .await,
        Err(StoreError::Invalid(_))
    ));
    store
        .finish(&id, epoch, done)
        .await
        .expect("the owner finishes");
}

/// A rate limiter: a burst up to the limit, then refusals with a `retry_after`, keys apart,
/// 0 = no limit, and concurrent requests never exceed the limit.
pub async fn rate_limiter(limiter: Arc<dyn crate::ports::RateLimiter>) {
    let key = format!("kit-{}", crate::ids::new_id());
    for i in 0..10 {
        let d = limiter.check(&key, 10).await.expect("check");
        assert!(d.allowed, "request {i} of a burst of 10 is allowed");
    }
    let refused = limiter.check(&key, 10).await.expect("check");
    assert!(!refused.allowed, "the 11th request in a minute is refused");
    assert!(
        refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(6),
        "retry after about one interval (6 s): {:?}",
        refused.retry_after
    );
    assert!(
        limiter
            .check(&format!("{key}-other"), 10)
            .await
            .expect("check")
            .allowed,
        "keys are apart"
    );
    assert!(
        limiter.check(&key, 0).await.expect("check").allowed,
        "0 means no limit"
    );

    let shared = format!("kit-{}", crate::ids::new_id());
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (limiter, shared) = (limiter.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            limiter.check(&shared, 25).await.expect("check").allowed
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += usize::from(t.await.expect("task"));
    }
    assert_eq!(allowed, 25, "concurrent requests get exactly the limit");
}

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
