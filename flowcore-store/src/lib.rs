//! Storage adapters for flowcore, behind the ports of [`flowcore::ports`].
//!
//! - [`sql`]: flows, runs and steps in SQLite (embedded default) or PostgreSQL, with diesel-async.
//! - [`redis`]: the shared queue of the production topology.
//! - [`blob`]: files and large outputs through opendal (fs, S3, memory).

pub mod blob;
pub mod redis;
pub mod sql;

pub use blob::{BlobConfig, OpendalBlobStore, S3Config};
pub use redis::{
    RedisConfig, RedisEventBus, RedisFlowChanges, RedisQueue, RedisRateLimiter, RedisRunSignals,
};
pub use sql::{Backend, SqlConfig, SqlStore};

/// The README's Rust examples, compiled and run as doctests so that they stay true (here,
/// because this crate sees both `flowcore` and the stores).
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
