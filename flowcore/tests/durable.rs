//! Durable execution over the in-memory run store (the kit's `durable_runs` runs in
//! `memory_ports.rs`).

use std::sync::Arc;

use flowcore::ports::memory::MemoryRunStore;

/// Whoever hears `run_finished` (an API waiting for a worker's run) reads the run as finished:
/// the event goes out after the end is stored. It came before it once, and a waiting API
/// answered 202 `running` for a finished run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_finished_is_announced_after_the_end_is_stored() {
    use flowcore::durable::{self, DurableOptions, Hooks};
    use flowcore::ports::{NewRun, RunStore};
    use flowcore::{Engine, FlowDef, RunEvent, RunStatus};

    let store = Arc::new(MemoryRunStore::new());
    let engine = Engine::new();
    let plan = engine
        .compile(
            &FlowDef::from_value(serde_json::json!({"nodes": [{"id": "n", "type": "noop"}]}))
                .unwrap(),
        )
        .unwrap();
    let options = DurableOptions::new("w");
    let (run, _) = store
        .create(NewRun::new("f", 1, serde_json::json!({})).claimed(options.claim()))
        .await
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = {
        let (store, seen) = (store.clone(), seen.clone());
        Arc::new(move |event: &RunEvent| {
            if let RunEvent::RunFinished { run_id, .. } = event {
                // The memory store answers without waiting.
                let stored = futures::FutureExt::now_or_never(store.get(run_id))
                    .expect("ready")
                    .unwrap();
                seen.lock().unwrap().push(stored.status);
            }
        })
    };
    let runs: Arc<dyn RunStore> = store.clone();
    let hooks = Hooks {
        events: Some(sink),
        ..Hooks::default()
    };
    let done = durable::execute(&engine, &plan, &runs, &run, &options, hooks)
        .await
        .unwrap();
    assert_eq!(done.status, RunStatus::Succeeded);
    assert_eq!(*seen.lock().unwrap(), vec![RunStatus::Succeeded]);
}

mod commits {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use chrono::Utc;
    use flowcore::durable::{self, Checkpoint, DurableOptions, Hooks};
    use flowcore::ports::memory::MemoryRunStore;
    use flowcore::ports::{
        Due, Lapsed, Lease, NewRun, Page, Park, PruneRule, RunFilter, RunOutcome, RunRecord,
        RunStore, Signal, SignalTake, StoreResult,
    };
    use flowcore::{
        Engine, FlowDef, RunId, RunStatus, StepRecord, StoreError, Transition, async_trait,
    };

    /// Counts the calls that write (each is one commit in the SQL store); while `down`, the
    /// lease renewals and checkpoints fail as if the database were unreachable.
    #[derive(Default)]
    struct Counting {
        inner: MemoryRunStore,
        writes: AtomicUsize,
        down: AtomicBool,
    }

    impl Counting {
        fn write(&self) {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }

        fn reachable(&self) -> StoreResult<()> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::unavailable(
                    "the test",
                    std::io::Error::other("the database is down"),
                ));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl RunStore for Counting {
        async fn create(&self, run: NewRun) -> StoreResult<(RunRecord, bool)> {
            self.write();
            self.inner.create(run).await
        }
        async fn get(&self, id: &RunId) -> StoreResult<RunRecord> {
            self.inner.get(id).await
        }
        async fn list(&self, filter: &RunFilter) -> StoreResult<Page<RunRecord>> {
            self.inner.list(filter).await
        }
        async fn claim(&self, id: &RunId, owner: &str, ttl: Duration) -> StoreResult<Lease> {
            self.write();
            self.inner.claim(id, owner, ttl).await
        }
        async fn renew(&self, id: &RunId, epoch: u64, ttl: Duration) -> StoreResult<Lease> {
            self.reachable()?;
            self.write();
            self.inner.renew(id, epoch, ttl).await
        }
        async fn record_steps(
            &self,
            id: &RunId,
            epoch: u64,
            steps: &[StepRecord],
        ) -> StoreResult<()> {
            self.reachable()?;
            self.write();
            self.inner.record_steps(id, epoch, steps).await
        }
        async fn steps(&self, id: &RunId) -> StoreResult<Vec<StepRecord>> {
            self.inner.steps(id).await
        }
        async fn record_items(
            &self,
            id: &RunId,
            epoch: u64,
            batch: &flowcore::ItemBatch,
        ) -> StoreResult<()> {
            self.reachable()?;
            self.inner.record_items(id, epoch, batch).await
        }
        async fn items(
            &self,
            id: &RunId,
            node: &str,
        ) -> StoreResult<Vec<(u32, serde_json::Value)>> {
            self.inner.items(id, node).await
        }
        async fn finish(
            &self,
            id: &RunId,
            epoch: u64,
            outcome: RunOutcome,
        ) -> StoreResult<RunRecord> {
            self.write();
            self.inner.finish(id, epoch, outcome).await
        }
        async fn release(&self, id: &RunId, epoch: u64) -> StoreResult<()> {
            self.write();
            self.inner.release(id, epoch).await
        }
        async fn create_rerun(
            &self,
            run: NewRun,
            kept: Vec<StepRecord>,
            items: Vec<flowcore::ItemBatch>,
        ) -> StoreResult<RunRecord> {
            self.write();
            self.inner.create_rerun(run, kept, items).await
        }
        async fn record_actions(
            &self,
            actions: &[(RunId, flowcore::ports::RunAction)],
        ) -> StoreResult<()> {
            self.write();
            self.inner.record_actions(actions).await
        }
        async fn actions(&self, id: &RunId) -> StoreResult<Vec<flowcore::ports::RunAction>> {
            self.inner.actions(id).await
        }
        async fn transition(&self, id: &RunId, change: Transition) -> StoreResult<RunRecord> {
            self.write();
            self.inner.transition(id, change).await
        }
        async fn park(&self, id: &RunId, epoch: u64, park: Park) -> StoreResult<RunRecord> {
            self.write();
            self.inner.park(id, epoch, park).await
        }
        async fn wake_due(&self, due: &Due) -> StoreResult<Vec<RunRecord>> {
            self.inner.wake_due(due).await
        }
        async fn woken_unclaimed(&self, due: &Due) -> StoreResult<Vec<RunId>> {
            self.inner.woken_unclaimed(due).await
        }
        async fn send_signal(
            &self,
            id: &RunId,
            signal: Signal<'_>,
        ) -> StoreResult<(RunRecord, bool)> {
            self.inner.send_signal(id, signal).await
        }
        async fn send_keyed_signal(&self, signal: Signal<'_>) -> StoreResult<Vec<RunRecord>> {
            self.inner.send_keyed_signal(signal).await
        }
        async fn take_signal(
            &self,
            id: &RunId,
            take: SignalTake<'_>,
        ) -> StoreResult<Option<serde_json::Value>> {
            self.inner.take_signal(id, take).await
        }
        async fn expired(&self, due: &Due) -> StoreResult<Vec<Lapsed>> {
            self.inner.expired(due).await
        }
        async fn prunable(&self, rule: &PruneRule, limit: usize) -> StoreResult<Vec<RunId>> {
            self.inner.prunable(rule, limit).await
        }
        async fn delete_finished(&self, ids: &[RunId]) -> StoreResult<Vec<RunId>> {
            self.inner.delete_finished(ids).await
        }
        async fn drop_data(&self, rule: &PruneRule, batch: usize) -> StoreResult<Vec<RunId>> {
            self.inner.drop_data(rule, batch).await
        }
    }

    async fn writes_for(checkpoint: Checkpoint) -> (usize, usize) {
        let counting = Arc::new(Counting::default());
        let runs: Arc<dyn RunStore> = counting.clone();
        let engine = Engine::new();
        let flow = FlowDef::from_json(include_str!("../../examples/flows/greet.json")).unwrap();
        let plan = engine.compile(&flow).unwrap();
        let options = DurableOptions {
            checkpoint,
            ..DurableOptions::new("w")
        };
        let new = NewRun::new("greet", 1, serde_json::json!({"name": "ada", "n": 7}))
            .claimed(options.claim());
        let (run, _) = runs.create(new).await.unwrap();
        let done = durable::execute(&engine, &plan, &runs, &run, &options, Hooks::default())
            .await
            .unwrap();
        assert_eq!(done.status, RunStatus::Succeeded);
        let steps = runs.steps(&run.id).await.unwrap().len();
        (counting.writes.load(Ordering::SeqCst), steps)
    }

    /// A worker cut off from its store stops its run before the lease it last wrote lapses:
    /// after that another worker may claim the run, and the two would execute it side by side
    /// (the fault suite once saw a step run again after the new owner had stored its success).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_that_cannot_renew_stops_before_its_lease_lapses() {
        let counting = Arc::new(Counting::default());
        let runs: Arc<dyn RunStore> = counting.clone();
        let engine = Engine::new();
        let plan = engine
            .compile_json(
                r#"{"nodes": [
                    {"id": "wait", "type": "delay", "params": {"ms": 950}},
                    {"id": "after", "type": "noop"}
                ], "edges": [{"from": "wait", "to": "after"}]}"#,
            )
            .unwrap();
        let ttl = Duration::from_millis(900);
        let options = DurableOptions {
            lease_ttl: ttl,
            ..DurableOptions::new("w")
        };
        let new = NewRun::new("f", 1, serde_json::json!({})).claimed(options.claim());
        let (run, _) = runs.create(new).await.unwrap();
        let expires = run.lease.as_ref().unwrap().expires_at;
        counting.down.store(true, Ordering::SeqCst);
        let started = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = {
            let started = started.clone();
            Arc::new(move |event: &flowcore::RunEvent| {
                if let flowcore::RunEvent::NodeStarted { node, .. } = event {
                    started.lock().unwrap().push(node.to_string());
                }
            })
        };
        let hooks = Hooks {
            events: Some(sink),
            ..Hooks::default()
        };
        let outcome = durable::execute(&engine, &plan, &runs, &run, &options, hooks).await;
        let stopped = Utc::now();
        assert!(
            matches!(outcome, Err(StoreError::StaleLease(_))),
            "the run is given up: {outcome:?}"
        );
        assert!(
            stopped < expires,
            "stopped before the lease lapsed ({stopped} vs {expires})"
        );
        assert_eq!(*started.lock().unwrap(), vec!["wait".to_owned()]);
        let stored = runs.get(&run.id).await.unwrap();
        assert_eq!(stored.status, RunStatus::Running, "left for the next owner");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fast_four_node_run_costs_two_commits_when_batched() {
        assert_eq!(
            writes_for(Checkpoint::Batched(Duration::from_secs(5))).await,
            (2, 4),
            "create + finish"
        );
        assert_eq!(
            writes_for(Checkpoint::EveryStep).await,
            (6, 4),
            "create + 4 steps + finish"
        );
    }
}

mod offload {
    use std::sync::Arc;

    use flowcore::durable::{self, DurableOptions, Hooks};
    use flowcore::ports::memory::{MemoryBlobStore, MemoryRunStore};
    use flowcore::ports::{BlobStore, NewRun, RunStore};
    use flowcore::{Engine, RunStatus};
    use serde_json::json;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_outputs_go_to_the_blob_store_and_come_back_on_resume() {
        let engine = Engine::new();
        let plan = engine
            .compile_json(
                r#"{"nodes": [
                    {"id": "big", "type": "script", "params": {"source": "let s = \"\"; for i in 0..2000 { s += \"abcdefghij\"; } s"}},
                    {"id": "len", "type": "template", "params": {"template": "{{ nodes.big | length }}"}}
                ], "edges": [{"from": "big", "to": "len"}], "output": "big"}"#,
            )
            .unwrap();
        let runs: Arc<dyn RunStore> = Arc::new(MemoryRunStore::new());
        let blobs: Arc<dyn BlobStore> = Arc::new(MemoryBlobStore::new());
        let options = DurableOptions {
            blobs: Some(blobs.clone()),
            offload_over: 1024,
            ..DurableOptions::new("w")
        };
        let new = || NewRun::new("f", 1, json!({})).claimed(options.claim());
        let (run, _) = runs.create(new()).await.unwrap();
        let done = durable::execute(&engine, &plan, &runs, &run, &options, Hooks::default())
            .await
            .unwrap();
        assert_eq!(done.status, RunStatus::Succeeded);
        let stored = done.output.clone().unwrap();
        assert_eq!(
            stored["size"], 20_002,
            "the run's output is a reference in the run store: {stored}"
        );
        assert_eq!(
            durable::resolve(&stored, blobs.as_ref())
                .await
                .unwrap()
                .as_str()
                .map(str::len),
            Some(20_000)
        );
        let steps = runs.steps(&run.id).await.unwrap();
        let big = steps.iter().find(|s| &*s.node == "big").unwrap();
        assert!(
            big.output
                .as_ref()
                .unwrap()
                .get(durable::BLOB_REF)
                .is_some(),
            "the step's output is a reference"
        );
        let small = steps.iter().find(|s| &*s.node == "len").unwrap();
        assert_eq!(
            small.output.as_deref(),
            Some(&json!("20000")),
            "small outputs stay inline"
        );

        // Resume: a new owner gets the reference back as the value, so `len` sees the string.
        let (run2, _) = runs.create(new()).await.unwrap();
        runs.record_steps(&run2.id, 1, std::slice::from_ref(big))
            .await
            .unwrap();
        runs.release(&run2.id, 1).await.unwrap();
        runs.claim(&run2.id, "w2", std::time::Duration::from_secs(30))
            .await
            .unwrap();
        let claimed = runs.get(&run2.id).await.unwrap();
        durable::execute(&engine, &plan, &runs, &claimed, &options, Hooks::default())
            .await
            .unwrap();
        let len = runs
            .steps(&run2.id)
            .await
            .unwrap()
            .into_iter()
            .find(|s| &*s.node == "len")
            .unwrap();
        assert_eq!(
            len.output.as_deref(),
            Some(&json!("20000")),
            "the resumed step's output was resolved"
        );
    }
}
