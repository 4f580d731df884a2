//! Queues.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::error::StoreError;
use crate::ids::RunId;
use crate::ports::{Queue, Take};

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
    queue.enqueue(g, &run, None).await.expect("enqueue");
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
        .enqueue(g, &RunId::new(), None)
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
        queue.enqueue(g, &doomed, None).await.expect("enqueue");
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
