//! Throwaway PostgreSQL databases for tests and benchmarks (feature `testkit`): the server is
//! `FLOWCORE_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432`), and each
//! [`TestDatabase`] is a database of its own on it, so that runs never collide.

use std::sync::atomic::{AtomicU32, Ordering};

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};

/// The PostgreSQL server that tests and benchmarks create their databases on.
pub fn postgres_server() -> String {
    std::env::var("FLOWCORE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// A fresh database on [`postgres_server`], dropped by [`TestDatabase::drop`].
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
}

impl TestDatabase {
    /// Creates a database named `{prefix}_{pid}_{n}_{nanos}`. Panics when PostgreSQL does not
    /// answer: the tests that need it fail, they do not skip.
    pub async fn create(prefix: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let name = format!("{prefix}_{}_{n}_{nanos}", std::process::id());
        admin(&format!("CREATE DATABASE {name}")).await;
        Self { name }
    }

    /// The database's URL.
    pub fn url(&self) -> String {
        format!("{}/{}", postgres_server(), self.name)
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops the database, closing the connections still open to it.
    pub async fn drop(self) {
        admin(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .await;
    }
}

/// Runs `sql` on the server's `postgres` database.
async fn admin(sql: &str) {
    let url = format!("{}/postgres", postgres_server());
    let mut conn = AsyncPgConnection::establish(&url)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL must run on 127.0.0.1:5432 (or FLOWCORE_TEST_POSTGRES_URL): {e}")
        });
    if let Err(e) = conn.batch_execute(sql).await {
        panic!("{sql}: {e}");
    }
}
