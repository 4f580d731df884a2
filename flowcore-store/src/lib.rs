//! Storage adapters for flowcore, behind the ports of [`flowcore::ports`].
//!
//! - [`sql`]: flows, runs and steps in SQLite (embedded default) or PostgreSQL, with diesel-async.
//! - [`redis`]: the shared queue of the production topology.
//! - [`blob`]: files and large outputs through opendal (fs, S3, memory).

pub mod blob;
pub mod redis;
pub mod sql;
#[cfg(feature = "testkit")]
pub mod testing;

pub use blob::{BlobConfig, OpendalBlobStore, S3Config};
pub use redis::{
    RedisConfig, RedisEventBus, RedisFlowChanges, RedisQueue, RedisRateLimiter, RedisRunSignals,
};
pub use sql::{Backend, SqlConfig, SqlStore};

// The unit tests count their threads' heap bytes, to see SQLite allocate through the global
// allocator.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: flowcore::memory::Counting<std::alloc::System> =
    flowcore::memory::Counting(std::alloc::System);

/// Creates `dir` and its missing parents readable by this user only (0700 on Unix): the data
/// folder holds the database, the blobs and the credentials key. A folder that exists is left
/// as it is.
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates `path` empty, readable and writable by this user only (0600 on Unix), unless it
/// exists. SQLite gives its WAL and shared-memory files the database file's permissions.
pub fn private_file(path: &std::path::Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// The README's Rust examples, compiled and run as doctests so that they stay true (here,
/// because this crate sees both `flowcore` and the stores).
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
