//! SQL persistence with diesel-async: SQLite (the embedded default) and PostgreSQL.
//!
//! The backend follows the URL scheme (`sqlite://`, `postgres://`); an unknown scheme is an
//! error. The schema is shared; migrations are embedded, one folder per backend, and run at
//! start-up ([`SqlStore::migrate`]): on PostgreSQL under an advisory lock, so that when many
//! processes start at once exactly one migrates and the others wait, then find nothing to do.
//!
//! SQLite runs in WAL mode with a busy timeout, through diesel-async's `SyncConnectionWrapper`
//! (each query on tokio's blocking pool). All writes of a process go through one connection:
//! SQLite has one writer at a time anyway, and this way our own writers never meet
//! `SQLITE_BUSY`. Reads use a pool of their own.

mod batch;
mod flows;
mod meta;
mod pg_batch;
mod prepared;
mod rows;
mod runs;
pub mod schema;
// SQLite's allocations through the global allocator, and its memory figure: FFI, unsafe by
// nature, kept to that file.
#[allow(unsafe_code)]
mod sqlite_alloc;

pub use sqlite_alloc::sqlite_memory_bytes;

use std::fmt;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::SqliteConnection;
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use flowcore::StoreError;

pub(crate) type Sqlite = SyncConnectionWrapper<SqliteConnection>;

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// An arbitrary constant: the advisory lock key under which PostgreSQL migrations run.
const MIGRATION_LOCK_KEY: i64 = 0x666c_6f77_636f_7265; // "flowcore"

/// How to connect.
#[derive(Clone)]
pub struct SqlConfig {
    /// `sqlite://PATH`, `sqlite::memory:` or `postgres://...` (`DATABASE_URL`).
    pub url: String,
    /// Connections per process (`DATABASE_POOL_SIZE`, 10).
    pub pool_size: u32,
    /// PostgreSQL `statement_timeout`; the SQLite busy timeout.
    pub statement_timeout: Duration,
    /// How long to wait for a pooled connection.
    pub connect_timeout: Duration,
}

impl SqlConfig {
    /// Defaults for `url`: a pool of 10, 30 s statement timeout, 10 s to get a connection.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 10,
            statement_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for SqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .finish()
    }
}

/// Hides the password of a database URL for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let creds = &url[scheme_end + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Which database a [`SqlStore`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, embedded.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

#[derive(Clone)]
enum Pools {
    Sqlite {
        writer: Pool<Sqlite>,
        readers: Pool<Sqlite>,
        /// The group-committing queue in front of the writer.
        batcher: batch::Batcher,
    },
    Postgres {
        pool: Pool<AsyncPgConnection>,
        /// New runs of concurrent requests inserted together, and ends of concurrent runs
        /// written together.
        batches: pg_batch::Batches,
    },
}

/// The SQL store: implements [`flowcore::ports::FlowStore`] and [`flowcore::ports::RunStore`].
/// Cheap to clone (the pools are shared).
#[derive(Clone)]
pub struct SqlStore {
    pools: Pools,
    config: SqlConfig,
    /// Where each pruning rule's pass has got to (see `runs.rs`, `PruneProgress`).
    prune_progress:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, runs::PruneProgress>>>,
}

impl fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore")
            .field("backend", &self.backend())
            .field("config", &self.config)
            .finish()
    }
}

/// Runs `$body` with `$conn` bound to a pooled connection of either backend: the body is
/// written once and compiled for each. `writer` picks SQLite's writer connection.
macro_rules! with_conn {
    ($store:expr, $kind:ident, |$conn:ident| $body:expr) => {
        match &$store.pools {
            $crate::sql::Pools::Sqlite {
                writer, readers, ..
            } => {
                let pool = if stringify!($kind) == "write" {
                    writer
                } else {
                    readers
                };
                let mut pooled = pool.get().await.map_err($crate::sql::pool_error)?;
                let $conn: &mut $crate::sql::Sqlite = &mut *pooled;
                $body
            }
            $crate::sql::Pools::Postgres { pool, .. } => {
                let mut pooled = pool.get().await.map_err($crate::sql::pool_error)?;
                let $conn: &mut diesel_async::AsyncPgConnection = &mut *pooled;
                $body
            }
        }
    };
}
pub(crate) use with_conn;

/// The row a write returns (`Ok(None)`: it returned none), read once the statement is over.
/// diesel-async's `get_result` returns at the first row, before PostgreSQL has handled the
/// protocol's Sync, which is where a statement outside a transaction commits: a crash right
/// then lost a run the API had already answered for (seen by the fault suite). `load` reads up
/// to the server's ReadyForQuery, after the commit. (A macro: an async fn generic over the
/// query trips the compiler's `Send` inference in the callers.)
macro_rules! returned {
    ($query:expr, $conn:expr) => {
        diesel_async::RunQueryDsl::load($query, $conn)
            .await
            .map(|rows: Vec<_>| rows.into_iter().next())
    };
}
pub(crate) use returned;

impl SqlStore {
    /// Connects to the database of `config.url`. Does not migrate: call [`SqlStore::migrate`].
    ///
    /// The first SQLite database of the process makes SQLite allocate through the process's
    /// global allocator rather than the C library's `malloc` (under glibc, the memory SQLite
    /// freed on the runtime's many blocking threads stayed in their arenas); unless the
    /// process used SQLite before, which keeps it as it was.
    pub async fn connect(config: SqlConfig) -> Result<Self, StoreError> {
        let url = config.url.trim();
        let pools = if let Some(path) = sqlite_path(url) {
            sqlite_alloc::use_global_allocator();
            // A plain path (not `:memory:`, not a `file:` URI with options).
            if path != ":memory:" && !path.starts_with("file:") && !path.contains('?') {
                let file = Path::new(&path);
                if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                    crate::private_dir(dir).map_err(|e| {
                        StoreError::unavailable(
                            format!("cannot create the database folder {}", dir.display()),
                            e,
                        )
                    })?;
                }
                crate::private_file(file).map_err(|e| {
                    StoreError::unavailable(
                        format!("cannot create the database file {}", file.display()),
                        e,
                    )
                })?;
            }
            let busy_ms = config.statement_timeout.as_millis();
            let setup = move |writer: bool| -> SetupFn<Sqlite> {
                Box::new(move |url: &str| {
                    let url = url.to_owned();
                    Box::pin(async move {
                        let mut conn = Sqlite::establish(&url).await?;
                        // `auto_vacuum` first: it takes effect only in a database that has no
                        // table yet (a new one), and lets `reclaim` give deleted rows' pages
                        // back without a full VACUUM, which would stop every writer. The writer
                        // alone sets it: setting it writes the database's header, so a reader
                        // connecting under load wrote too, and the writer's next transaction
                        // that read before writing failed at once with "database is locked".
                        let auto_vacuum = if writer {
                            "PRAGMA auto_vacuum = INCREMENTAL;"
                        } else {
                            ""
                        };
                        conn.batch_execute(&format!(
                            "{auto_vacuum} \
                             PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA busy_timeout = {busy_ms}; PRAGMA foreign_keys = ON;"
                        ))
                        .await
                        .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                        Ok(conn)
                    })
                })
            };
            let manager = |setup: SetupFn<Sqlite>| {
                let mut mc = ManagerConfig::default();
                mc.recycling_method = RecyclingMethod::Fast;
                mc.custom_setup = setup;
                AsyncDieselConnectionManager::<Sqlite>::new_with_config(path.clone(), mc)
            };
            // `:memory:` is one database per connection: keep a single connection for all.
            let memory = path == ":memory:";
            let writer = build_pool!(manager(setup(true)), 1, config)?;
            let readers = if memory {
                writer.clone()
            } else {
                build_pool!(manager(setup(false)), config.pool_size.max(1), config)?
            };
            let batcher = batch::Batcher::start(writer.clone());
            Pools::Sqlite {
                writer,
                readers,
                batcher,
            }
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let timeout_ms = config.statement_timeout.as_millis();
            let setup: SetupFn<AsyncPgConnection> = Box::new(move |url: &str| {
                let url = url.to_owned();
                Box::pin(async move {
                    // As `AsyncPgConnection::establish`, but the error keeps its cause
                    // ("Connection refused", "password authentication failed", "database
                    // ... does not exist"), which `establish` drops.
                    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .map_err(|e| {
                            diesel::ConnectionError::BadConnection(flowcore::error::causes(&e))
                        })?;
                    let mut conn =
                        AsyncPgConnection::try_from_client_and_connection(client, connection)
                            .await?;
                    conn.batch_execute(&format!("SET statement_timeout = {timeout_ms}"))
                        .await
                        .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                    Ok(conn)
                })
            });
            let mut mc = ManagerConfig::default();
            mc.recycling_method = RecyclingMethod::Fast;
            mc.custom_setup = setup;
            let manager =
                AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, mc);
            let pool = build_pool!(manager, config.pool_size.max(1), config)?;
            let batches = pg_batch::Batches::start(pool.clone());
            Pools::Postgres { pool, batches }
        } else {
            let scheme = url.split(':').next().unwrap_or_default();
            return Err(StoreError::Invalid(format!(
                "DATABASE_URL: unknown scheme `{scheme}` (expected sqlite:// or postgres://)"
            )));
        };
        Ok(Self {
            pools,
            config,
            prune_progress: Default::default(),
        })
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self.pools {
            Pools::Sqlite { .. } => Backend::Sqlite,
            Pools::Postgres { .. } => Backend::Postgres,
        }
    }

    /// Runs the pending migrations. On PostgreSQL, under an advisory lock: concurrent callers
    /// wait for the one migrating, then find nothing left to do. Returns how many ran.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let url = self.config.url.clone();
        match self.backend() {
            Backend::Sqlite => {
                // Through the writer connection, so that `:memory:` databases see the tables.
                let Pools::Sqlite { writer, .. } = &self.pools else {
                    unreachable!("checked")
                };
                let mut pooled = writer.get().await.map_err(pool_error)?;
                let conn: &mut Sqlite = &mut pooled;
                conn.spawn_blocking(|conn| {
                    conn.run_pending_migrations(SQLITE_MIGRATIONS)
                        .map(|v| v.len())
                        .map_err(diesel::result::Error::QueryBuilderError)
                })
                .await
                .map_err(|e| StoreError::backend(format!("migrating {}", redact_url(&url)), e))
            }
            Backend::Postgres => {
                // The migration harness connects through diesel-async's `establish`, which
                // keeps only the first line of an error: a connection made here first says
                // why the database cannot be reached ("Connection refused", a password, a
                // missing database).
                let (_client, _unused) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| {
                        StoreError::unavailable(format!("connecting to {}", redact_url(&url)), e)
                    })?;
                tokio::task::spawn_blocking(move || migrate_postgres(&url))
                    .await
                    .map_err(|e| StoreError::backend("the migration task failed", e))?
            }
        }
    }
}

type SetupFn<C> = diesel_async::pooled_connection::SetupCallback<C>;

/// Runs on a blocking thread: diesel's migration harness is synchronous, and PostgreSQL goes
/// through diesel-async's `AsyncConnectionWrapper` (no libpq).
fn migrate_postgres(url: &str) -> Result<usize, StoreError> {
    use diesel::Connection;
    use diesel::connection::SimpleConnection;
    type Wrapped =
        diesel_async::async_connection_wrapper::AsyncConnectionWrapper<AsyncPgConnection>;
    let mut conn = <Wrapped as Connection>::establish(url)
        .map_err(|e| StoreError::unavailable(format!("connecting to {}", redact_url(url)), e))?;
    SimpleConnection::batch_execute(
        &mut conn,
        &format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"),
    )
    .map_err(|e| StoreError::backend("taking the migration lock", e))?;
    let result = conn
        .run_pending_migrations(POSTGRES_MIGRATIONS)
        .map(|v| v.len());
    let unlock = SimpleConnection::batch_execute(
        &mut conn,
        &format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"),
    );
    let ran = result.map_err(|e| StoreError::Backend {
        message: format!("migrating: {e}"),
        source: None,
    })?;
    unlock.map_err(|e| StoreError::backend("releasing the migration lock", e))?;
    Ok(ran)
}

/// A bb8 pool of `size` connections. A macro, not a function: the manager's trait bounds are
/// long and differ per connection type.
macro_rules! build_pool {
    ($manager:expr, $size:expr, $config:expr) => {
        Pool::builder()
            .max_size($size)
            .connection_timeout($config.connect_timeout)
            .build($manager)
            .await
            .map_err(|e| {
                StoreError::unavailable(format!("connecting to {}", redact_url(&$config.url)), e)
            })
    };
}
use build_pool;

fn sqlite_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("sqlite:")?;
    Some(rest.strip_prefix("//").unwrap_or(rest).to_owned())
}

pub(crate) fn pool_error<E: std::error::Error + Send + Sync + 'static>(
    e: bb8::RunError<E>,
) -> StoreError {
    match e {
        bb8::RunError::User(e) => StoreError::unavailable("database connection failed", e),
        bb8::RunError::TimedOut => StoreError::Unavailable {
            message: "timed out waiting for a database connection".into(),
            source: None,
        },
    }
}

/// Maps a diesel error: unique violations to `AlreadyExists`, lost connections to
/// `Unavailable`, the rest to `Backend`.
pub(crate) fn db_error(what: &str, e: diesel::result::Error) -> StoreError {
    use diesel::result::{DatabaseErrorKind, Error};
    match e {
        Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
            StoreError::AlreadyExists(format!("{what}: already exists"))
        }
        Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            _,
        ) => StoreError::unavailable(what.to_owned(), e),
        Error::DatabaseError(_, ref info) if server_going_away(info.message()) => {
            StoreError::unavailable(what.to_owned(), e)
        }
        Error::NotFound => StoreError::not_found("row", what.to_owned()),
        e => StoreError::backend(what.to_owned(), e),
    }
}

/// Whether PostgreSQL refused a statement because it is stopping, starting or recovering
/// (SQLSTATE class 57P: the connection ends or the server is not ready). diesel does not
/// expose the SQLSTATE of such errors, only their message: with a translated `lc_messages`
/// they stay `Backend` errors (the connection is dropped and replaced all the same).
fn server_going_away(message: &str) -> bool {
    message.starts_with("terminating connection due to administrator command")
        || message.starts_with("the database system is ")
}

pub(crate) fn is_unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

/// `Ok` when a write touched a row, `NotFound` for `what` `id` when it touched none.
pub(crate) fn found(rows: usize, what: &'static str, id: &str) -> Result<(), StoreError> {
    if rows == 0 {
        Err(StoreError::not_found(what, id))
    } else {
        Ok(())
    }
}

pub(crate) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

pub(crate) fn to_text<T: serde::Serialize + ?Sized>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::backend("encoding JSON", e))
}

pub(crate) fn from_text<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::backend("decoding stored JSON", e))
}

/// A stored run value (an input or an output), or, when it cannot be read, a marker object
/// `{"$unreadable": why}` in its place: one bad document must not make its run, or a list of
/// runs, unreadable. Whatever flowcore writes today reads back (see `flowcore::json`); this is
/// for rows written before depth was bounded, or changed by hand.
pub(crate) fn stored_value(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "a stored JSON value could not be read");
        serde_json::json!({ "$unreadable": format!("the stored value could not be read: {e}") })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader connecting while the writer is in a transaction that read and is about to
    /// write must not write the database: the writer's write would then fail at once with
    /// "database is locked" (its snapshot is stale), whatever the busy timeout. It did, as
    /// each connection set `auto_vacuum`, which writes the header, and retention's deletes
    /// (which read first) failed now and then under load.
    #[tokio::test]
    async fn a_reader_connecting_does_not_write_the_database() {
        let dir = std::env::temp_dir().join(format!(
            "flowcore-sql-unit-{}-{}",
            std::process::id(),
            flowcore::ids::new_id()
        ));
        let url = format!("sqlite://{}/db.sqlite", dir.display());
        let store = SqlStore::connect(SqlConfig::new(&url))
            .await
            .expect("connect");
        store.migrate().await.expect("migrate");
        let Pools::Sqlite {
            writer, readers, ..
        } = &store.pools
        else {
            unreachable!("a SQLite URL")
        };
        let mut write = writer.get().await.expect("the writer");
        write
            .batch_execute("BEGIN DEFERRED; SELECT count(*) FROM runs;")
            .await
            .expect("a transaction that reads");
        // Connections are made when first needed: these are new.
        let first = readers.get().await.expect("a reader");
        let second = readers.get().await.expect("another reader");
        write
            .batch_execute("DELETE FROM runs WHERE id = 'none'; COMMIT;")
            .await
            .expect("the writer writes after readers connected");
        drop((second, write));
        let mut read = first;
        let mode: i64 = diesel_async::RunQueryDsl::get_result(
            diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
                "(SELECT auto_vacuum FROM pragma_auto_vacuum())",
            )),
            &mut *read,
        )
        .await
        .expect("auto_vacuum");
        assert_eq!(mode, 2, "the writer still made the database incremental");
        drop(read);
        drop(store);
        std::fs::remove_dir_all(dir).ok();
    }
}
