//! The conformance kit against SQLite and a real PostgreSQL (the machine's; each test run makes
//! its own database and drops it). PostgreSQL missing is a failure, not a skip.

use flowcore::ports::FlowStore;
use flowcore_store::testing::TestDatabase;
use flowcore_store::{Backend, SqlConfig, SqlStore};

fn fastrand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

async fn store(url: &str) -> SqlStore {
    let store = SqlStore::connect(SqlConfig::new(url))
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    store
}

fn temp_sqlite() -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!(
        "flowcore-sql-{}-{}",
        std::process::id(),
        fastrand_suffix()
    ));
    let url = format!("sqlite://{}/db.sqlite", dir.display());
    (dir, url)
}

/// The SQL store as the kit sees it: flows, runs and the server's records (the queue, events,
/// limits and signals are Redis's or in process; blobs are opendal's).
fn kit(name: &'static str, store: &SqlStore) -> flowcore::testkit::Backend {
    let shared = std::sync::Arc::new(store.clone());
    flowcore::testkit::Backend {
        name,
        flows: Some(shared.clone()),
        runs: Some(shared.clone()),
        records: Some(shared),
        ..Default::default()
    }
}

/// The migrations of each backend (one folder each in `migrations/<backend>`).
const MIGRATIONS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_passes_the_kit() {
    let (dir, url) = temp_sqlite();
    let store = SqlStore::connect(SqlConfig::new(&url))
        .await
        .expect("connect");
    assert_eq!(store.backend(), Backend::Sqlite);
    assert_eq!(
        store.migrate().await.expect("migrate"),
        MIGRATIONS,
        "every migration runs"
    );
    assert_eq!(
        store.migrate().await.expect("migrate again"),
        0,
        "a second run is a no-op"
    );
    flowcore::testkit::check(&kit("sqlite", &store)).await;
    drop(store);
    // The data survives a reconnect.
    let again = crate::store(&url).await;
    assert!(
        again.get("f2", None).await.is_ok(),
        "flows persist across connections"
    );
    drop(again);
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_in_memory_passes_the_kit() {
    let store = store("sqlite::memory:").await;
    flowcore::testkit::check(&kit("sqlite in memory", &store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_kit() {
    let db = TestDatabase::create("flowcore_test").await;
    {
        let store = store(&db.url()).await;
        assert_eq!(store.backend(), Backend::Postgres);
        flowcore::testkit::check(&kit("postgres", &store)).await;
    }
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_postgres_migrations_run_once() {
    let db = TestDatabase::create("flowcore_test").await;
    {
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let url = db.url();
            tasks.push(tokio::spawn(async move {
                let store = SqlStore::connect(SqlConfig::new(url))
                    .await
                    .expect("connect");
                store.migrate().await.expect("migrate")
            }));
        }
        let mut ran = Vec::new();
        for t in tasks {
            ran.push(t.await.expect("task"));
        }
        ran.sort_unstable();
        assert_eq!(
            ran,
            vec![0, 0, 0, 0, 0, MIGRATIONS],
            "exactly one process migrates; the others wait and find nothing"
        );
        let store = store(&db.url()).await;
        flowcore::testkit::flow_store(&store).await;
    }
    db.drop().await;
}

#[tokio::test]
async fn unknown_schemes_are_refused() {
    let err = SqlStore::connect(SqlConfig::new("mysql://localhost/x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown scheme `mysql`"), "{err}");
}

#[test]
fn urls_are_redacted() {
    assert_eq!(
        flowcore_store::sql::redact_url("postgres://u:secret@h:5432/db"),
        "postgres://u:***@h:5432/db"
    );
    assert_eq!(
        flowcore_store::sql::redact_url("sqlite://x.db"),
        "sqlite://x.db"
    );
}

/// A run input nested this deep, as JSON text.
fn nested(levels: usize) -> String {
    format!("{}{}", "[".repeat(levels), "]".repeat(levels))
}

/// Creates two runs, lets `corrupt` overwrite the first one's stored input with `text`, and
/// checks that both still read, alone and in lists, and that a too-deep input is refused.
async fn unreadable_rows_stay_readable<F, Fut>(store: &SqlStore, corrupt: F)
where
    F: FnOnce(String, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use flowcore::ports::{NewRun, RunFilter, RunStore};
    let new = |input: serde_json::Value| NewRun::new("f", 1, input);
    let deep: serde_json::Value = serde_json::from_str(&nested(100)).expect("100 levels read");
    assert!(
        matches!(
            RunStore::create(store, new(deep)).await,
            Err(flowcore::StoreError::Invalid(_))
        ),
        "an input deeper than flowcore::json::MAX_DEPTH is refused"
    );
    let (bad, _) = RunStore::create(store, new(serde_json::json!({"n": 1})))
        .await
        .expect("create");
    let (good, _) = RunStore::create(store, new(serde_json::json!({"n": 2})))
        .await
        .expect("create");
    // What the store once accepted (before depth was bounded): 127 levels, which serde_json
    // reads alone but a reader with its default limit of 128 cannot once wrapped.
    corrupt(bad.id.to_string(), format!("{{\"a\": {}}}", nested(127))).await;
    let read = RunStore::get(store, &bad.id)
        .await
        .expect("the run still reads");
    assert!(read.input.get("$unreadable").is_some(), "{:?}", read.input);
    let page = RunStore::list(
        store,
        &RunFilter {
            limit: 10,
            ..RunFilter::default()
        },
    )
    .await
    .expect("the list still reads");
    let ids: Vec<_> = page.items.iter().map(|r| r.id.clone()).collect();
    assert!(ids.contains(&bad.id) && ids.contains(&good.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_stored_document_fails_no_read_on_sqlite() {
    let (dir, url) = temp_sqlite();
    let store = store(&url).await;
    let path = dir.join("db.sqlite");
    unreadable_rows_stay_readable(&store, |id, text| async move {
        use diesel::{Connection, RunQueryDsl, SqliteConnection};
        let mut conn = SqliteConnection::establish(path.to_str().expect("utf-8")).expect("open");
        diesel::sql_query("UPDATE runs SET input = ? WHERE id = ?")
            .bind::<diesel::sql_types::Text, _>(text)
            .bind::<diesel::sql_types::Text, _>(id)
            .execute(&mut conn)
            .expect("update");
    })
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_stored_document_fails_no_read_on_postgres() {
    let db = TestDatabase::create("flowcore_test").await;
    let store = store(&db.url()).await;
    let url = db.url();
    unreadable_rows_stay_readable(&store, |id, text| async move {
        use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
        let mut conn = AsyncPgConnection::establish(&url).await.expect("connect");
        diesel::sql_query("UPDATE runs SET input = $1 WHERE id = $2")
            .bind::<diesel::sql_types::Text, _>(text)
            .bind::<diesel::sql_types::Text, _>(id)
            .execute(&mut conn)
            .await
            .expect("update");
    })
    .await;
    drop(store);
    db.drop().await;
}

/// Pruned runs give their space back without a full VACUUM: a new SQLite database is created
/// with incremental auto-vacuum, and `reclaim` frees the pages step by step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_gives_the_space_of_pruned_runs_back() {
    use flowcore::ports::{NewRun, PruneRule, RunStore};
    let (dir, url) = temp_sqlite();
    let store = store(&url).await;
    let big = serde_json::json!({"text": "x".repeat(20_000)});
    for _ in 0..300 {
        let new = NewRun::new("big", 1, big.clone());
        let (run, _) = RunStore::create(&store, new).await.expect("create");
        store
            .transition(
                &run.id,
                flowcore::RunStatus::Queued.to(flowcore::RunStatus::Cancelled),
            )
            .await
            .expect("cancel");
    }
    let full = store.stored_bytes().await.expect("size").expect("known");
    assert!(full > 5_000_000, "{full}");

    let rule = PruneRule::older_than(chrono::Utc::now());
    assert_eq!(store.prune(&rule, 1000).await.expect("prune").len(), 300);
    assert_eq!(
        store.stored_bytes().await.expect("size"),
        Some(full),
        "deleted rows keep their pages"
    );
    let mut steps = 0;
    while store.reclaim().await.expect("reclaim") {
        steps += 1;
        assert!(steps < 100, "bounded");
    }
    let after = store.stored_bytes().await.expect("size").expect("known");
    assert!(after < full / 4, "{full} -> {after}");
    drop(store);
    std::fs::remove_dir_all(dir).ok();
}
