//! Durable runs per second: the contract's 4-node flow, each run created already claimed,
//! executed with its steps checkpointed, and finished, on SQLite and on PostgreSQL.
//!
//! `cargo bench -p flowcore-benches --bench durable`. PostgreSQL: the machine's
//! (`FLOWCORE_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432`); the bench makes
//! its own database and drops it.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowcore::durable::{self, Checkpoint, DurableOptions, Hooks};
use flowcore::ports::{NewRun, RunStore};
use flowcore::{Engine, FlowDef, Plan, RunStatus};
use flowcore_benches::runtime;
use flowcore_store::testing::TestDatabase;
use flowcore_store::{SqlConfig, SqlStore};
use serde_json::json;

const RUNS: u64 = 400;
const IN_FLIGHT: u64 = 64;

async fn batch(engine: &Engine, plan: &Plan, runs: &Arc<dyn RunStore>, options: &DurableOptions) {
    let mut tasks = Vec::new();
    for t in 0..IN_FLIGHT {
        let (engine, plan, runs, options) =
            (engine.clone(), plan.clone(), runs.clone(), options.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..RUNS / IN_FLIGHT {
                let new = NewRun::new("greet", 1, json!({"name": "ada", "n": (t + i) % 10}))
                    .claimed(options.claim());
                let (run, _) = runs.create(new).await.expect("create");
                let done =
                    durable::execute(&engine, &plan, &runs, &run, &options, Hooks::default())
                        .await
                        .expect("execute");
                assert_eq!(done.status, RunStatus::Succeeded);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

fn bench_store(
    c: &mut Criterion,
    name: &str,
    rt: &tokio::runtime::Runtime,
    runs: Arc<dyn RunStore>,
) {
    let engine = Engine::new();
    let flow = FlowDef::from_json(include_str!("../examples/flows/greet.json")).expect("flow");
    let plan = engine.compile(&flow).expect("compile");
    let mut g = c.benchmark_group(format!("durable/{name}"));
    g.throughput(Throughput::Elements(RUNS - RUNS % IN_FLIGHT));
    for (mode, checkpoint) in [
        ("batched", Checkpoint::Batched(Duration::from_millis(100))),
        ("every_step", Checkpoint::EveryStep),
    ] {
        let options = DurableOptions {
            checkpoint,
            ..DurableOptions::new("bench")
        };
        g.bench_function(mode, |b| {
            b.to_async(rt)
                .iter(|| batch(&engine, &plan, &runs, &options))
        });
    }
    g.finish();
}

fn sqlite(c: &mut Criterion) {
    let rt = runtime();
    let dir = std::env::temp_dir().join(format!("flowcore-bench-{}", std::process::id()));
    let url = format!("sqlite://{}/bench.sqlite", dir.display());
    let store = rt.block_on(async {
        let store = SqlStore::connect(SqlConfig::new(url))
            .await
            .expect("connect");
        store.migrate().await.expect("migrate");
        store
    });
    bench_store(c, "sqlite", &rt, Arc::new(store));
    std::fs::remove_dir_all(dir).ok();
}

fn postgres(c: &mut Criterion) {
    let rt = runtime();
    let db = rt.block_on(TestDatabase::create("flowcore_bench"));
    let store = rt.block_on(async {
        let mut config = SqlConfig::new(db.url());
        config.pool_size = 16;
        let store = SqlStore::connect(config).await.expect("connect");
        store.migrate().await.expect("migrate");
        store
    });
    bench_store(c, "postgres", &rt, Arc::new(store));
    rt.block_on(db.drop());
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    targets = sqlite, postgres
}
criterion_main!(benches);
