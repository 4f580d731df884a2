//! The run store's parked runs: the timer index, signals kept before their wait, taken once,
//! keyed signals, the pending bound.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use super::new_run;
use crate::error::StoreError;
use crate::ids::RunId;
use crate::ports::{Due, Park, RunRecord, RunStore, Signal, SignalTake};
use crate::run::{RunStatus, Transition};
use crate::wait::{MAX_KEYED_RUNS, MAX_PENDING_SIGNALS, Parked, Wait};

const TTL: Duration = Duration::from_secs(60);

/// A running run of flow `flow`, with its epoch.
async fn running(store: &dyn RunStore, flow: &str) -> (RunId, u64) {
    let (run, _) = store.create(new_run(flow, None)).await.expect("create");
    let lease = store.claim(&run.id, "w1", TTL).await.expect("claim");
    (run.id, lease.epoch)
}

/// A park of node `node` until `deadline`, for `signal` (with `key`), or a delay.
fn park(node: &str, signal: Option<&str>, key: Option<&str>, deadline: DateTime<Utc>) -> Park {
    Park {
        parked: Parked {
            waits: vec![Wait {
                node: node.into(),
                signal: signal.map(str::to_owned),
                key: key.map(str::to_owned),
                deadline,
            }],
            active_ms: 7,
            epoch: 1,
        },
        steps: vec![
            super::step("before", crate::run::StepStatus::Succeeded),
            crate::run::StepRecord {
                error: Some("no signal `x` came within the wait's timeout".into()),
                error_code: Some("timeout".into()),
                ..super::step("failed", crate::run::StepStatus::Failed)
            },
        ],
    }
}

fn due(by: DateTime<Utc>, limit: usize) -> Due {
    Due {
        after: None,
        by,
        limit,
    }
}

fn ids(runs: &[RunRecord]) -> Vec<RunId> {
    runs.iter().map(|r| r.id.clone()).collect()
}

/// A signal without a key.
fn plain<'a>(name: &'a str, payload: &'a serde_json::Value) -> Signal<'a> {
    Signal {
        name,
        payload,
        key: None,
    }
}

/// Parked runs: a park stores its waits and steps and drops the lease; the timer index wakes
/// the due ones, earliest first, each once; a signal wakes the run that waits for it, one sent
/// before the wait is kept and answers the park at once, a wait takes a signal exactly once
/// (again the same one after a crash), keyed signals reach the runs waiting with that key, at
/// most [`MAX_PENDING_SIGNALS`] wait per run, and a finished or unknown run takes none.
/// Cancelling a waiting run takes it out of the timer index.
pub async fn parked_runs(store: Arc<dyn RunStore>) {
    let store = store.as_ref();
    let now = Utc::now();

    // The timer index: earliest first, at most the limit, each woken once.
    let soon = now + chrono::Duration::milliseconds(150);
    let mut timed = Vec::new();
    for (i, offset) in [30, 10, 20].into_iter().enumerate() {
        let (id, epoch) = running(store, "timers").await;
        let at = soon + chrono::Duration::milliseconds(offset);
        let parked = store
            .park(&id, epoch, park(&format!("d{i}"), None, None, at))
            .await
            .expect("park");
        assert_eq!(parked.status, RunStatus::Waiting, "parked");
        assert!(parked.lease.is_none(), "a waiting run holds no lease");
        assert_eq!(
            parked.parked.as_ref().and_then(Parked::wake_at),
            Some(at),
            "the record keeps what it waits for"
        );
        let steps = store.steps(&id).await.expect("steps");
        assert_eq!(steps.len(), 2, "the park's steps are stored");
        assert_eq!(
            steps
                .iter()
                .find(|s| &*s.node == "failed")
                .and_then(|s| s.error_code.as_deref()),
            Some("timeout"),
            "with their error codes"
        );
        timed.push(id);
    }
    assert!(
        store
            .wake_due(&due(now, 100))
            .await
            .expect("wake")
            .is_empty(),
        "nothing is due before its time"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let later = Utc::now();
    let first = store.wake_due(&due(later, 2)).await.expect("wake");
    assert_eq!(
        ids(&first),
        [timed[1].clone(), timed[2].clone()],
        "earliest first, at most the limit"
    );
    assert!(first.iter().all(|r| r.status == RunStatus::Queued));
    let rest = store.wake_due(&due(later, 100)).await.expect("wake");
    assert_eq!(ids(&rest), [timed[0].clone()], "each is woken once");
    assert!(
        store
            .wake_due(&due(later, 100))
            .await
            .expect("wake")
            .is_empty()
    );
    let woken = store.get(&timed[0]).await.expect("get");
    assert_eq!(
        woken.parked.as_ref().map(|p| p.active_ms),
        Some(7),
        "a woken run keeps its park for the execution that resumes it"
    );

    // A signal wakes the run waiting for it; the wait takes it exactly once.
    let far = now + chrono::Duration::hours(1);
    let (id, epoch) = running(store, "signals").await;
    store
        .park(&id, epoch, park("w", Some("go"), None, far))
        .await
        .expect("park");
    let (other, other_epoch) = running(store, "signals").await;
    store
        .park(&other, other_epoch, park("w", Some("stop"), None, far))
        .await
        .expect("park");
    let (run, woke) = store
        .send_signal(&other, plain("go", &json!("not for you")))
        .await
        .expect("signal");
    assert!(
        !woke && run.status == RunStatus::Waiting,
        "a signal no wait takes is kept, and wakes nothing"
    );
    let (run, woke) = store
        .send_signal(&id, plain("go", &json!({"approved": true})))
        .await
        .expect("signal");
    assert!(woke && run.status == RunStatus::Queued, "{run:?}");
    assert!(
        !ids(&store.wake_due(&due(far, 1000)).await.expect("wake")).contains(&id),
        "a run woken by a signal left the timer index"
    );
    let (_, second) = store
        .send_signal(&id, plain("go", &json!("second")))
        .await
        .expect("a second signal of the name is kept");
    assert!(!second, "a queued run is not woken again");
    let unclaimed = store
        .woken_unclaimed(&due(Utc::now(), 1000))
        .await
        .expect("woken");
    assert!(
        unclaimed.contains(&id) && unclaimed.contains(&timed[0]),
        "woken runs that no worker took are found (their job may be lost)"
    );
    let lease = store.claim(&id, "w2", TTL).await.expect("claim");
    assert!(
        !store
            .woken_unclaimed(&due(Utc::now(), 1000))
            .await
            .expect("woken")
            .contains(&id),
        "a claimed run is not"
    );
    assert!(matches!(
        store
            .take_signal(
                &id,
                SignalTake {
                    epoch,
                    node: "w",
                    name: "go"
                }
            )
            .await,
        Err(StoreError::StaleLease(_))
    ));
    let take = async |node: &str| {
        store
            .take_signal(
                &id,
                SignalTake {
                    epoch: lease.epoch,
                    node,
                    name: "go",
                },
            )
            .await
            .expect("take")
    };
    assert_eq!(
        take("w").await,
        Some(json!({"approved": true})),
        "oldest first"
    );
    assert_eq!(
        take("w").await,
        Some(json!({"approved": true})),
        "the same again for the node that took it (a resumed execution)"
    );
    assert_eq!(
        take("w2").await,
        Some(json!("second")),
        "the next for another"
    );
    assert_eq!(take("w3").await, None, "none left");

    // A signal sent before its wait is kept, and answers the park at once.
    let (early, epoch) = running(store, "signals").await;
    let (run, woke) = store
        .send_signal(&early, plain("ready", &json!(1)))
        .await
        .expect("signal");
    assert!(!woke && run.status == RunStatus::Running);
    let parked = store
        .park(&early, epoch, park("w", Some("ready"), None, far))
        .await
        .expect("park");
    assert_eq!(
        parked.status,
        RunStatus::Queued,
        "a park that a pending signal answers goes back to the queue"
    );

    // Keyed signals reach the runs waiting with that key, and only them.
    let mut keyed = Vec::new();
    for key in ["k1", "k2", "k1"] {
        let (id, epoch) = running(store, "keyed").await;
        store
            .park(&id, epoch, park("w", Some("approve"), Some(key), far))
            .await
            .expect("park");
        keyed.push(id);
    }
    let mut woken = ids(&store
        .send_keyed_signal(Signal {
            name: "approve",
            payload: &json!("yes"),
            key: Some("k1"),
        })
        .await
        .expect("keyed"));
    woken.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut expected = vec![keyed[0].clone(), keyed[2].clone()];
    expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(woken, expected, "every run waiting with the key");
    assert_eq!(
        store.get(&keyed[1]).await.expect("get").status,
        RunStatus::Waiting,
        "another key's run waits on"
    );
    assert!(
        store
            .send_keyed_signal(Signal {
                name: "approve",
                payload: &json!("again"),
                key: Some("k1"),
            })
            .await
            .expect("keyed")
            .is_empty(),
        "they wait no more"
    );
    // A run that parks again with another key is reached by that key only; a keyed signal
    // that reaches nobody is kept by nobody.
    let again = &keyed[1];
    let woken = store
        .transition(again, RunStatus::Waiting.to(RunStatus::Queued))
        .await
        .expect("wake");
    assert_eq!(woken.status, RunStatus::Queued);
    let lease = store.claim(again, "w3", TTL).await.expect("claim");
    store
        .park(
            again,
            lease.epoch,
            park("w", Some("approve"), Some("k9"), far),
        )
        .await
        .expect("park again");
    let keyed_send = async |key: &str| {
        let signal = Signal {
            name: "approve",
            payload: &json!("k"),
            key: Some(key),
        };
        ids(&store.send_keyed_signal(signal).await.expect("keyed"))
    };
    assert!(
        keyed_send("k2").await.is_empty(),
        "its old key reaches it no more"
    );
    assert_eq!(keyed_send("k9").await, std::slice::from_ref(again));
    let lease = store.claim(again, "w4", TTL).await.expect("claim");
    let take = SignalTake {
        epoch: lease.epoch,
        node: "w",
        name: "approve",
    };
    assert_eq!(
        store.take_signal(again, take).await.expect("take"),
        Some(json!("k")),
        "the keyed signal that reached it, and not the one that reached nobody"
    );

    // The bound on pending signals, and runs that take none.
    let (full, _) = store.create(new_run("full", None)).await.expect("create");
    for i in 0..MAX_PENDING_SIGNALS {
        store
            .send_signal(&full.id, plain("s", &json!(i)))
            .await
            .expect("under the bound");
    }
    assert!(matches!(
        store
            .send_signal(&full.id, plain("s", &json!("over")))
            .await,
        Err(StoreError::TooLarge(_))
    ));
    assert!(matches!(
        store
            .send_signal(&RunId::new(), plain("s", &json!(1)))
            .await,
        Err(StoreError::NotFound { .. })
    ));
    let (ended, epoch) = running(store, "ended").await;
    let outcome = crate::ports::RunOutcome {
        status: RunStatus::Succeeded,
        ..Default::default()
    };
    store.finish(&ended, epoch, outcome).await.expect("finish");
    assert!(matches!(
        store.send_signal(&ended, plain("s", &json!(1))).await,
        Err(StoreError::Conflict(_))
    ));

    // Cancelling a waiting run takes it out of the timer index.
    let (cancelled, epoch) = running(store, "cancel").await;
    let past = Utc::now() - chrono::Duration::seconds(1);
    store
        .park(&cancelled, epoch, park("d", None, None, past))
        .await
        .expect("park");
    let change = Transition {
        from: RunStatus::Waiting,
        to: RunStatus::Cancelled,
    };
    store.transition(&cancelled, change).await.expect("cancel");
    assert!(
        !ids(&store.wake_due(&due(Utc::now(), 100)).await.expect("wake")).contains(&cancelled),
        "a cancelled run is not woken"
    );
}

/// A keyed signal reaches at most [`MAX_KEYED_RUNS`] runs a call (the rest are reached by the
/// next call: a sender learns from the answer whom it reached), each woken once.
pub async fn keyed_fan_out(store: Arc<dyn RunStore>) {
    let store = store.as_ref();
    let far = Utc::now() + chrono::Duration::hours(1);
    for _ in 0..=MAX_KEYED_RUNS {
        let (id, epoch) = running(store, "fan").await;
        store
            .park(&id, epoch, park("w", Some("go"), Some("all"), far))
            .await
            .expect("park");
    }
    let payload = json!(1);
    let signal = Signal {
        key: Some("all"),
        ..plain("go", &payload)
    };
    let first = store.send_keyed_signal(signal).await.expect("keyed");
    assert_eq!(first.len(), MAX_KEYED_RUNS, "at most the cap a call");
    let rest = store.send_keyed_signal(signal).await.expect("keyed again");
    assert_eq!(rest.len(), 1, "the next call reaches the one left");
    assert!(!ids(&first).contains(&rest[0].id), "each woken once");
    assert!(
        store
            .send_keyed_signal(signal)
            .await
            .expect("none left")
            .is_empty()
    );
}
