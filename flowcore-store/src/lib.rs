//! Storage adapters for flowcore, behind the ports of [`flowcore::ports`].
//!
//! - [`sql`]: flows, runs and steps in SQLite (embedded default) or PostgreSQL, with diesel-async.

pub mod sql;

pub use sql::{Backend, SqlConfig, SqlStore};
