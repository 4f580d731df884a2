//! Several `flowcore migrate` processes started at once against one fresh PostgreSQL database:
//! exactly one applies the migrations, the others wait for its advisory lock and find nothing to
//! do. PostgreSQL missing is a failure, not a skip.

use flowcore_store::testing::TestDatabase;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrate_processes_migrate_once() {
    let db = TestDatabase::create("flowcore_test_procs").await;
    let url = db.url();
    let children: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new(env!("CARGO_BIN_EXE_flowcore"))
                .arg("migrate")
                .env("DATABASE_URL", &url)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut outputs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .collect();
    outputs.sort();
    db.drop().await;
    assert_eq!(
        outputs,
        vec![
            "0 migration(s) applied",
            "0 migration(s) applied",
            "0 migration(s) applied",
            "10 migration(s) applied"
        ],
        "exactly one process migrates"
    );
}
