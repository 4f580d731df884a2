//! Several `flowcore migrate` processes started at once against one fresh PostgreSQL database:
//! exactly one applies the migrations, the others wait for its advisory lock and find nothing to
//! do. PostgreSQL missing is a failure, not a skip.

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};

fn base() -> String {
    std::env::var("FLOWCORE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrate_processes_migrate_once() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("flowcore_test_procs_{}_{nanos}", std::process::id());
    let mut admin = AsyncPgConnection::establish(&format!("{}/postgres", base()))
        .await
        .expect("PostgreSQL must run on 127.0.0.1:5432 (or FLOWCORE_TEST_POSTGRES_URL)");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let url = format!("{}/{name}", base());
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
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("drop database");
    assert_eq!(
        outputs,
        vec![
            "0 migration(s) applied",
            "0 migration(s) applied",
            "0 migration(s) applied",
            "2 migration(s) applied"
        ],
        "exactly one process migrates"
    );
}
