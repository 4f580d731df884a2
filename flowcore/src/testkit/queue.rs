//! Queues.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::error::StoreError;
use crate::ids::RunId;
use crate::ports::{JobKey, NewJob, Queue, Take};

/// The queue suite: leases, redelivery after expiry, no duplicate under concurrent leases,
/// idempotent ack, stale acks refused, nack with a delay, and with `max_deliveries` (the
/// queue's setting, [`Capabilities::max_deliveries`](super::Capabilities)) dead letters after
/// that many deliveries.
pub async fn queue(queue: Arc<dyn Queue>, max_deliveries: Option<u32>) {
    let ttl = Duration::from_millis(300);
    let none = Duration::ZERO;
    let one = Take {
        max: 1,
        ttl,
        wait: none,
    };
    let ten = Take { max: 10, ..one };
    let g = "kit";
    let run = RunId::new();
    queue
        .enqueue(g, NewJob::run(run.clone()))
        .await
        .expect("enqueue");
    let depth = queue.depth(g).await.expect("depth");
    assert_eq!(depth.ready, 1, "one ready job: {depth:?}");
    let got = queue.lease(g, ten).await.expect("lease");
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].job.run_id.clone(), got[0].job.deliveries),
        (run.clone(), 1)
    );
    nothing_to_lease(queue.as_ref(), g, 10, "a leased job is not delivered twice").await;
    nothing_to_lease(queue.as_ref(), "other-group", 10, "groups are separate").await;
    queue.heartbeat(&got[0], ttl).await.expect("heartbeat");

    // Expiry: delivered again, and the old delivery can no longer ack or heartbeat.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let again = queue.lease(g, ten).await.expect("lease after expiry");
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
        .enqueue(g, NewJob::run(RunId::new()))
        .await
        .expect("enqueue");
    let job = queue.lease(g, one).await.expect("lease").remove(0);
    queue
        .nack(&job, Some(Utc::now() + chrono::Duration::milliseconds(200)))
        .await
        .expect("nack");
    nothing_to_lease(queue.as_ref(), g, 1, "a nacked job waits for its time").await;
    assert_eq!(
        queue.depth(g).await.expect("depth").delayed,
        1,
        "the nacked job counts as delayed"
    );
    let patient = Take {
        wait: Duration::from_secs(2),
        ..one
    };
    let later = queue.lease(g, patient).await.expect("lease with wait");
    assert_eq!(later.len(), 1, "lease waits for the delayed job");
    queue.ack(&later[0]).await.expect("ack");

    // Dead letters after the last delivery.
    if let Some(max) = max_deliveries {
        let doomed = RunId::new();
        queue
            .enqueue(g, NewJob::run(doomed.clone()))
            .await
            .expect("enqueue");
        for delivery in 1..=max {
            let job = queue.lease(g, one).await.expect("lease").remove(0);
            assert_eq!(job.job.deliveries, delivery);
            queue.nack(&job, None).await.expect("nack");
        }
        nothing_to_lease(queue.as_ref(), g, 1, "no delivery past the last").await;
        assert_eq!(
            queue.depth(g).await.expect("depth").dead,
            1,
            "dead-lettered"
        );
    }

    // Concurrent leases: every job delivered exactly once.
    let total = 200;
    for _ in 0..total {
        queue
            .enqueue("kit-many", NewJob::run(RunId::new()))
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
                    .lease(
                        "kit-many",
                        Take {
                            max: 7,
                            ttl: Duration::from_secs(30),
                            wait: Duration::ZERO,
                        },
                    )
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

/// Asserts that `group` has nothing to deliver now (`why` says what the test expects).
async fn nothing_to_lease(queue: &dyn Queue, group: &str, max: usize, why: &str) {
    let got = queue
        .lease(
            group,
            Take {
                max,
                ttl: Duration::from_secs(5),
                wait: Duration::ZERO,
            },
        )
        .await
        .expect("lease");
    assert!(got.is_empty(), "{why}");
}

/// Leases everything `group` has ready now, acking nothing: the run ids, in order.
async fn lease_all(queue: &dyn Queue, group: &str, ttl: Duration) -> Vec<crate::ports::LeasedJob> {
    queue
        .lease(
            group,
            Take {
                max: 1000,
                ttl,
                wait: Duration::ZERO,
            },
        )
        .await
        .expect("lease")
}

/// The concurrency key and priority suite: priorities lease first and in order within one;
/// a key lets `limit` jobs out at once and holds the rest back, in order; an ack and a nack
/// to later free a slot; a lapsed lease keeps its slot and is delivered again; a job holding a
/// slot is not dead-lettered; a long backlog behind one key costs the other keys nothing.
pub async fn queue_keys(queue: Arc<dyn Queue>, max_deliveries: Option<u32>) {
    let ttl = Duration::from_millis(300);
    let run = |n: u8| NewJob::run(RunId::from(format!("run-{n}")));
    let key = |k: &str, limit: u32| JobKey {
        key: k.into(),
        limit,
    };
    let ids = |jobs: &[crate::ports::LeasedJob]| -> Vec<String> {
        jobs.iter().map(|j| j.job.run_id.to_string()).collect()
    };

    // Priorities: 9 first, first in first out within one.
    let g = "kit-priority";
    for (n, p) in [(1, 0), (2, 5), (3, 9), (4, 5), (5, 9)] {
        queue
            .enqueue(g, run(n).with_priority(p))
            .await
            .expect("enqueue");
    }
    let got = lease_all(queue.as_ref(), g, Duration::from_secs(30)).await;
    assert_eq!(ids(&got), ["run-3", "run-5", "run-2", "run-4", "run-1"]);
    for job in &got {
        queue.ack(job).await.expect("ack");
    }

    // A key at limit 2: two out, the rest held back in order; other keys and unkeyed jobs go.
    let g = "kit-keys";
    for n in 1..=5 {
        queue
            .enqueue(g, run(n).keyed(key("a", 2)))
            .await
            .expect("enqueue");
    }
    queue
        .enqueue(g, run(6).keyed(key("b", 1)))
        .await
        .expect("enqueue");
    queue.enqueue(g, run(7)).await.expect("enqueue");
    let depth = queue.depth(g).await.expect("depth");
    assert_eq!((depth.ready, depth.held_back), (4, 3), "{depth:?}");
    let first = lease_all(queue.as_ref(), g, ttl).await;
    assert_eq!(ids(&first), ["run-1", "run-2", "run-6", "run-7"]);
    nothing_to_lease(queue.as_ref(), g, 10, "key `a` has both its slots taken").await;

    // An ack frees a slot: the next in line comes out, and a waiting lease wakes for it.
    let waiting = {
        let queue = queue.clone();
        tokio::spawn(async move {
            queue
                .lease(
                    "kit-keys",
                    Take {
                        max: 10,
                        ttl: Duration::from_secs(30),
                        wait: Duration::from_secs(5),
                    },
                )
                .await
                .expect("lease")
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    queue.ack(&first[0]).await.expect("ack");
    let woke = waiting.await.expect("waiting lease");
    assert_eq!(ids(&woke), ["run-3"], "the first held back comes out");
    queue.ack(&first[2]).await.expect("ack b");
    queue.ack(&first[3]).await.expect("ack unkeyed");

    // A lapsed lease keeps its slot: the same job is delivered again, no other of its key.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let again = lease_all(queue.as_ref(), g, Duration::from_secs(30)).await;
    assert_eq!(
        ids(&again),
        ["run-2"],
        "the lapsed job comes again, holding its slot"
    );
    assert!(again[0].job.deliveries >= 2);
    queue.ack(&again[0]).await.expect("ack");
    queue.ack(&woke[0]).await.expect("ack");
    let next = lease_all(queue.as_ref(), g, Duration::from_secs(30)).await;
    assert_eq!(ids(&next), ["run-4", "run-5"]);

    // A nack to later gives the slot back; the job queues for one again when due.
    queue
        .enqueue(g, run(8).keyed(key("a", 2)))
        .await
        .expect("enqueue");
    queue
        .nack(
            &next[0],
            Some(Utc::now() + chrono::Duration::milliseconds(200)),
        )
        .await
        .expect("nack");
    let freed = lease_all(queue.as_ref(), g, Duration::from_secs(30)).await;
    assert_eq!(
        ids(&freed),
        ["run-8"],
        "the nacked job's slot went to the next"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    nothing_to_lease(queue.as_ref(), g, 10, "the nacked job waits for a slot").await;
    assert_eq!(queue.depth(g).await.expect("depth").held_back, 1);
    queue.ack(&freed[0]).await.expect("ack");
    let back = lease_all(queue.as_ref(), g, Duration::from_secs(30)).await;
    assert_eq!(ids(&back), ["run-4"]);
    // A nack for now keeps the slot: ready again at once.
    queue.nack(&back[0], None).await.expect("nack now");
    let back = lease_all(queue.as_ref(), g, Duration::from_secs(30)).await;
    assert_eq!(ids(&back), ["run-4"]);
    queue.ack(&back[0]).await.expect("ack");
    queue.ack(&next[1]).await.expect("ack");
    let depth = queue.depth(g).await.expect("depth");
    assert_eq!(
        (depth.ready, depth.leased, depth.delayed, depth.held_back),
        (0, 0, 0, 0),
        "{depth:?}"
    );

    // A job holding its key's slot is never dead-lettered: its run still has steps to go, and
    // the next run of the key must not start before it ends. Past `max_deliveries` it is
    // delivered again with its slot; its ack frees the slot.
    if let Some(max) = max_deliveries {
        let g = "kit-keys-dead";
        queue
            .enqueue(g, run(1).keyed(key("d", 1)))
            .await
            .expect("enqueue");
        queue
            .enqueue(g, run(2).keyed(key("d", 1)))
            .await
            .expect("enqueue");
        for _ in 0..max {
            let job = lease_all(queue.as_ref(), g, Duration::from_secs(30)).await;
            assert_eq!(ids(&job), ["run-1"], "the job keeps its slot");
            queue.nack(&job[0], None).await.expect("nack");
        }
        // Past `max_deliveries`, through lapsed leases too (a worker killed under it).
        for _ in 0..2 {
            let job = lease_all(queue.as_ref(), g, ttl).await;
            assert_eq!(
                ids(&job),
                ["run-1"],
                "the job keeps its slot past its deliveries"
            );
            tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        }
        assert_eq!(queue.depth(g).await.expect("depth").dead, 0);
        let job = lease_all(queue.as_ref(), g, Duration::from_secs(30)).await;
        assert_eq!(ids(&job), ["run-1"]);
        assert!(job[0].job.deliveries > max);
        queue.ack(&job[0]).await.expect("ack");
        let after = lease_all(queue.as_ref(), g, Duration::from_secs(30)).await;
        assert_eq!(ids(&after), ["run-2"], "the ack gave the slot to the next");
        queue.ack(&after[0]).await.expect("ack");
    }

    // A long backlog behind one key does not hold the others back.
    let g = "kit-keys-long";
    for _ in 0..2000 {
        queue
            .enqueue(g, NewJob::run(RunId::new()).keyed(key("busy", 1)))
            .await
            .expect("enqueue");
    }
    queue
        .enqueue(g, run(9).keyed(key("quiet", 1)))
        .await
        .expect("enqueue");
    let got = lease_all(queue.as_ref(), g, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2, "one of the busy key, and the quiet one");
    assert_eq!(got[1].job.run_id.as_str(), "run-9");
    assert_eq!(queue.depth(g).await.expect("depth").held_back, 1999);
    assert_eq!(queue.held_back(g, "busy").await.expect("held back"), 1999);
    assert_eq!(queue.held_back(g, "quiet").await.expect("held back"), 0);

    // A run enqueued again while its job waits keeps that job; once a worker holds it, the
    // run gets a new one.
    let g = "kit-again";
    let first = queue.enqueue(g, run(1)).await.expect("enqueue");
    let again = queue.enqueue(g, run(1)).await.expect("enqueue again");
    assert_eq!(first, again, "one job for a waiting run");
    assert_eq!(queue.depth(g).await.expect("depth").ready, 1);
    let held = lease_all(queue.as_ref(), g, Duration::from_secs(30)).await;
    assert_eq!(held.len(), 1);
    let third = queue.enqueue(g, run(1)).await.expect("enqueue while held");
    assert_ne!(third, first, "a held job does not stand for the run");
    queue.ack(&held[0]).await.expect("ack");
    let next = lease_all(queue.as_ref(), g, Duration::from_secs(30)).await;
    assert_eq!(ids(&next), ["run-1"]);
    queue.ack(&next[0]).await.expect("ack");
    let fourth = queue
        .enqueue(g, run(1))
        .await
        .expect("enqueue after the acks");
    assert!(
        fourth != first && fourth != third,
        "a finished job does not stand for the run"
    );
}
