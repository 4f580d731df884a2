//! In-memory implementations of the ports: the embedded defaults for tests and for services that
//! embed flowcore with no servers. They keep everything in the process and lose it on exit.

mod blobs;
mod events;
mod flows;
mod limits;
mod queue;
#[cfg(feature = "records")]
mod records;
mod runs;
mod signals;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub use blobs::MemoryBlobStore;
pub use events::MemoryEventBus;
pub use flows::{MemoryFlowChanges, MemoryFlowStore};
pub use limits::{MemoryRateLimiter, gcra};
pub use queue::MemoryQueue;
#[cfg(feature = "records")]
pub use records::MemoryMetaStore;
pub use runs::MemoryRunStore;
pub use signals::MemoryRunSignals;

use super::StoreResult;
use crate::error::StoreError;

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical section
/// here leaves the state consistent before anything can panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn parse_cursor(cursor: Option<&str>) -> StoreResult<u64> {
    match cursor {
        None => Ok(u64::MAX),
        Some(c) => c
            .parse()
            .map_err(|_| StoreError::Invalid(format!("invalid cursor `{c}`"))),
    }
}

fn ttl_to_chrono(ttl: Duration) -> chrono::Duration {
    chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}
