//! Storage adapters for flowcore, behind the ports of [`flowcore::ports`].
//!
//! - [`sql`]: flows, runs and steps in SQLite (embedded default) or PostgreSQL, with diesel-async.

pub mod sql;

pub use sql::{Backend, SqlConfig, SqlStore};

/// The README's Rust examples, compiled and run as doctests so that they stay true (here,
/// because this crate sees both `flowcore` and the stores).
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
