//! Run stores: records, moves between statuses, concurrency, pruning.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use super::{new_run, step};
use crate::error::StoreError;
use crate::ids::RunId;
use crate::ports::{Claim, Due, NewRun, Park, PruneRule, RunFilter, RunOutcome, RunStore};
use crate::run::{Move, RunStatus, StepStatus};
use crate::wait::{Parked, Wait};

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
    let lapsed = |after, by| {
        let due = Due {
            after,
            by,
            limit: 100,
        };
        async move { store.expired(&due).await.expect("expired") }
    };
    let expired = lapsed(None, now).await;
    assert!(
        expired.iter().any(|(id, _)| id == &a.id),
        "a lapsed lease shows up for the reaper"
    );
    let since = lapsed(Some(before_expiry), now).await;
    assert!(
        since.iter().any(|(id, _)| id == &a.id),
        "and for a reaper that looks at what lapsed since before its expiry"
    );
    assert!(
        since.windows(2).all(|w| w[0].1 <= w[1].1),
        "oldest expiry first"
    );
    let later = lapsed(Some(now), Utc::now()).await;
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
                then: None,
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
        .transition(&b.id, RunStatus::Queued.to(RunStatus::Cancelled))
        .await
        .expect("cancel a queued run");
    assert!(
        matches!(
            store
                .transition(&b.id, RunStatus::Queued.to(RunStatus::Cancelled))
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
    // A window of creation times: the oldest run of the flow opens it, nothing precedes it.
    let oldest = store
        .get(ids.last().expect("runs were made"))
        .await
        .expect("the oldest run");
    let window = |after, before| RunFilter {
        flow_id: Some("flow-p".into()),
        limit: 100,
        created_after: after,
        created_before: before,
        ..RunFilter::default()
    };
    let before_it = store
        .list(&window(None, Some(oldest.created_at)))
        .await
        .expect("list before the oldest");
    assert!(before_it.items.is_empty(), "no run precedes the oldest");
    let from_it = store
        .list(&window(
            Some(oldest.created_at),
            Some(oldest.created_at + chrono::Duration::microseconds(1)),
        ))
        .await
        .expect("list its microsecond");
    assert!(
        from_it.items.iter().any(|r| r.id == oldest.id),
        "the window [created_at, created_at + 1 µs) holds the run"
    );
    let later = store
        .list(&window(Some(Utc::now() + chrono::Duration::hours(1)), None))
        .await
        .expect("list the future");
    assert!(later.items.is_empty(), "nothing was created in the future");
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
    let now = PruneRule::older_than(Utc::now());
    let pruned_first = store.prune(&now, 1).await.expect("prune").len();
    assert_eq!(pruned_first, 1, "prune respects the batch size");
    let pruned_rest = store.prune(&now, 100).await.expect("prune").len();
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
            &Claim {
                owner: "w4".into(),
                ttl,
            },
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
            .claim_runs(
                &[made[0].id.clone()],
                &Claim {
                    owner: "w5".into(),
                    ttl,
                },
            )
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
    let now = PruneRule::older_than(Utc::now());
    assert_eq!(store.prune(&now, 100).await.expect("prune").len(), 3);
}

/// A park until `deadline`, for a delay of node `d`.
fn park_until(deadline: chrono::DateTime<Utc>) -> Park {
    Park {
        parked: Parked {
            waits: vec![Wait {
                node: "d".into(),
                signal: None,
                key: None,
                deadline,
            }],
            active_ms: 5,
            epoch: 1,
        },
        steps: Vec::new(),
    }
}

/// Every move between run statuses, legal and illegal: from each status to each status, the
/// store makes exactly the moves of [`RunStatus::move_to`] through the method that owns each
/// (claim, release, finish, park, transition) and refuses every other, leaving the run as it
/// was.
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
        if status == RunStatus::Waiting {
            store
                .park(
                    &run.id,
                    lease.epoch,
                    park_until(Utc::now() + chrono::Duration::hours(1)),
                )
                .await
                .expect("park");
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
            let transition = async || store.transition(&id, from.to(to)).await.map(|_| ());
            let park = async || {
                let far = park_until(Utc::now() + chrono::Duration::hours(1));
                store.park(&id, epoch, far).await.map(|_| ())
            };
            match legal {
                Some(m) => {
                    let done = match m {
                        Move::Claim => claim().await,
                        Move::Release => release().await,
                        Move::Finish => finish().await,
                        Move::Park => park().await,
                        Move::Wake | Move::Cancel => transition().await,
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
                    if to == RunStatus::Waiting {
                        assert!(park().await.is_err(), "{case}: park refused");
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
            .transition(&id, RunStatus::Running.to(RunStatus::Cancelled))
            .await,
        Err(StoreError::Invalid(_))
    ));
    store
        .finish(&id, epoch, done)
        .await
        .expect("the owner finishes");
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
                then: None,
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

/// Pruning in bounded batches: all old finished runs go, live and recent ones stay.
pub async fn pruning(store: &dyn RunStore) {
    let mut old = Vec::new();
    for _ in 0..25 {
        let (run, _) = store.create(new_run("prune", None)).await.expect("create");
        store
            .transition(&run.id, RunStatus::Queued.to(RunStatus::Cancelled))
            .await
            .expect("finish");
        old.push(run.id);
    }
    let (live, _) = store.create(new_run("prune", None)).await.expect("create");
    let cutoff = Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (recent, _) = store.create(new_run("prune", None)).await.expect("create");
    store
        .transition(&recent.id, RunStatus::Queued.to(RunStatus::Cancelled))
        .await
        .expect("finish");
    let rule = PruneRule {
        flow_id: Some("prune".into()),
        ..PruneRule::older_than(cutoff)
    };
    let deleted = crate::ports::prune_runs(store, &rule, 10, Duration::from_millis(1))
        .await
        .expect("prune");
    // (Other suites may have left finished runs of their own in the store: pruned too.)
    assert!(
        deleted >= old.len(),
        "every old finished run is pruned, in batches of 10: {deleted}"
    );
    for id in &old {
        assert!(matches!(
            store.get(id).await,
            Err(StoreError::NotFound { .. })
        ));
    }
    assert!(store.get(&live.id).await.is_ok(), "a live run stays");
    assert!(store.get(&recent.id).await.is_ok(), "a recent run stays");

    // At most N finished runs of a flow stay, the newest; its unfinished ones are not counted.
    let flow = format!("keep-{}", crate::ids::new_id());
    let mut finished = Vec::new();
    for i in 0..5 {
        let (run, _) = store.create(new_run(&flow, None)).await.expect("create");
        if i == 2 {
            continue; // queued: stays, and does not count
        }
        store
            .transition(&run.id, RunStatus::Queued.to(RunStatus::Cancelled))
            .await
            .expect("finish");
        finished.push(run.id);
    }
    let keep_two = PruneRule {
        flow_id: Some(flow.clone()),
        keep_newest: Some(2),
        ..PruneRule::default()
    };
    let mut gone = store.prune(&keep_two, 100).await.expect("prune");
    gone.sort();
    let mut oldest = finished[..2].to_vec();
    oldest.sort();
    assert_eq!(
        gone, oldest,
        "the two oldest finished runs go, the two newest stay"
    );
    assert!(store.prune(&keep_two, 100).await.expect("prune").is_empty());
    for id in &finished[2..] {
        assert!(store.get(id).await.is_ok(), "the newest stay");
    }
    // A flow with a rule of its own is left alone by the others' rule.
    let others = PruneRule {
        except: vec![flow.clone()],
        ..PruneRule::older_than(Utc::now())
    };
    store.prune(&others, 1000).await.expect("prune");
    for id in &finished[2..] {
        assert!(store.get(id).await.is_ok(), "an excepted flow's runs stay");
    }
    let all = PruneRule {
        flow_id: Some(flow),
        ..PruneRule::older_than(Utc::now())
    };
    assert_eq!(store.prune(&all, 100).await.expect("prune").len(), 2);

    // A run that finishes late, older than runs a pass already went past, is pruned by a
    // later pass (a store may go on from where a pass got to, but starts over after it).
    let flow = format!("late-{}", crate::ids::new_id());
    let (late, _) = store.create(new_run(&flow, None)).await.expect("create");
    for _ in 0..4 {
        let (run, _) = store.create(new_run(&flow, None)).await.expect("create");
        store
            .transition(&run.id, RunStatus::Queued.to(RunStatus::Cancelled))
            .await
            .expect("finish");
    }
    let rule = PruneRule {
        flow_id: Some(flow),
        ..PruneRule::older_than(Utc::now())
    };
    assert_eq!(store.prune(&rule, 2).await.expect("prune").len(), 2);
    store
        .transition(&late.id, RunStatus::Queued.to(RunStatus::Cancelled))
        .await
        .expect("finish late");
    let mut gone = 2;
    for _ in 0..4 {
        gone += store.prune(&rule, 2).await.expect("prune").len();
    }
    assert_eq!(gone, 5, "the late one too");
    assert!(matches!(
        store.get(&late.id).await,
        Err(StoreError::NotFound { .. })
    ));

    // Looking first, deleting after (what an archive does): the look deletes nothing, and
    // the delete takes only finished runs.
    let flow = format!("look-{}", crate::ids::new_id());
    let (queued, _) = store.create(new_run(&flow, None)).await.expect("create");
    let mut done = Vec::new();
    for _ in 0..3 {
        let (run, _) = store.create(new_run(&flow, None)).await.expect("create");
        store
            .transition(&run.id, RunStatus::Queued.to(RunStatus::Cancelled))
            .await
            .expect("finish");
        done.push(run.id);
    }
    let rule = PruneRule {
        flow_id: Some(flow),
        ..PruneRule::older_than(Utc::now())
    };
    let looked = store.prunable(&rule, 2).await.expect("prunable");
    assert_eq!(
        looked,
        done[..2].to_vec(),
        "the oldest finished runs, at most the limit"
    );
    assert!(store.get(&done[0]).await.is_ok(), "looking deletes nothing");
    let mut asked = vec![queued.id.clone(), done[0].clone(), RunId::new()];
    asked.extend(looked.iter().cloned());
    let mut gone = store.delete_finished(&asked).await.expect("delete");
    gone.sort();
    let mut expected = looked.clone();
    expected.sort();
    assert_eq!(gone, expected, "only the finished ones go");
    assert!(store.get(&queued.id).await.is_ok(), "a queued run stays");
    assert!(matches!(
        store.steps(&done[0]).await.map(|s| s.len()),
        Ok(0) | Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        store.prunable(&rule, 10).await.expect("prunable"),
        vec![done[2].clone()]
    );

    // Dropping the data of old finished runs keeps their summary; live runs keep everything.
    let flow = format!("data-{}", crate::ids::new_id());
    let (live, _) = store.create(new_run(&flow, None)).await.expect("create");
    let (running, _) = store.create(new_run(&flow, None)).await.expect("create");
    store
        .claim(&running.id, "w", Duration::from_secs(30))
        .await
        .expect("claim");
    let mut old = Vec::new();
    for _ in 0..3 {
        let (run, _) = store.create(new_run(&flow, None)).await.expect("create");
        store
            .claim(&run.id, "w", Duration::from_secs(30))
            .await
            .expect("claim");
        store
            .record_steps(&run.id, 1, &[step("a", StepStatus::Succeeded)])
            .await
            .expect("steps");
        let outcome = RunOutcome {
            status: RunStatus::Succeeded,
            output: Some(json!({"big": "data"})),
            error: None,
            steps: vec![step("b", StepStatus::Succeeded)],
            then: None,
        };
        store.finish(&run.id, 1, outcome).await.expect("finish");
        old.push(run.id);
    }
    let rule = PruneRule {
        flow_id: Some(flow),
        ..PruneRule::older_than(Utc::now())
    };
    assert_eq!(
        store.drop_data(&rule, 2).await.expect("drop").len(),
        2,
        "a batch at most"
    );
    assert_eq!(
        store.drop_data(&rule, 2).await.expect("drop").len(),
        1,
        "then the rest"
    );
    assert!(
        store.drop_data(&rule, 2).await.expect("drop").is_empty(),
        "once only"
    );
    for id in &old {
        let run = store.get(id).await.expect("the summary stays");
        assert!(run.data_pruned);
        assert_eq!(
            (run.status, run.input, run.output, run.trigger),
            (RunStatus::Succeeded, json!(null), None, None)
        );
        assert!(run.finished_at.is_some(), "its timings stay");
        assert!(store.steps(id).await.expect("steps").is_empty());
    }
    let live = store.get(&live.id).await.expect("get");
    assert!(
        !live.data_pruned && live.input == json!({"x": 1}),
        "a queued run keeps its data"
    );
    let running = store.get(&running.id).await.expect("get");
    assert!(
        !running.data_pruned && running.input == json!({"x": 1}),
        "a running run too"
    );
    // A run without data is still pruned whole later.
    assert_eq!(store.prune(&rule, 10).await.expect("prune").len(), 3);
}
