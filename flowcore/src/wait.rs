//! Parked runs: what a run waits for when a `wait` node or a long `delay` parks it, and where
//! wait nodes take the signals sent to their run.
//!
//! A node that must wait calls [`NodeContext::wait_for`](crate::NodeContext::wait_for). In a
//! durable execution (one with a [`SignalInbox`](crate::run::SignalInbox), see [`crate::durable`]) the node is parked:
//! the run goes on with whatever else it can do, and once nothing else is left it ends its
//! execution as [`RunStatus::Waiting`](crate::RunStatus::Waiting) with its [`Wait`]s. The store
//! keeps them; a signal or the earliest deadline wakes the run, a worker executes it again, the
//! finished steps are not executed again, and the waiting node asks again: it gets its signal,
//! or its deadline has passed, or it parks once more with the same deadline.
//!
//! ```
//! use chrono::{Duration, Utc};
//! use flowcore::wait::{Parked, Wait};
//!
//! let parked = Parked {
//!     waits: vec![Wait {
//!         node: "approve".into(),
//!         signal: Some("approval".into()),
//!         key: None,
//!         deadline: Utc::now() + Duration::days(7),
//!     }],
//!     active_ms: 120,
//!     epoch: 1,
//! };
//! assert_eq!(parked.deadline_of("approve"), Some(parked.waits[0].deadline));
//! assert_eq!(parked.wake_at(), parked.waits.first().map(|w| w.deadline));
//! ```

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The most signals one run may have pending (sent, not yet taken by a wait).
pub const MAX_PENDING_SIGNALS: usize = 100;

/// The most runs one keyed signal reaches.
pub const MAX_KEYED_RUNS: usize = 1000;

/// A wait with this long or longer left (a `delay`, or a `wait` before its timeout) parks the
/// run instead of holding a worker.
pub const PARK_FROM: std::time::Duration = std::time::Duration::from_secs(1);

/// What one node of a parked run waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wait {
    /// The waiting node.
    pub node: String,
    /// The signal it waits for; `None` for a parked `delay`.
    pub signal: Option<String>,
    /// The key a keyed signal must carry to reach it (`wait`'s `key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When it stops waiting: a `delay`'s time, a `wait`'s timeout.
    pub deadline: DateTime<Utc>,
}

/// A parked run's state, kept by the run store from when it parks until it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parked {
    /// What its nodes wait for.
    pub waits: Vec<Wait>,
    /// How long it has executed so far, in milliseconds: waiting does not count against the
    /// run's time limit, executing does.
    pub active_ms: u64,
    /// The lease epoch it parked at: the owners that lose it after it wakes are counted from
    /// there (each wake is a new claim, which no worker lost).
    #[serde(default)]
    pub epoch: u64,
}

impl Parked {
    /// The deadline `node` had when the run parked.
    pub fn deadline_of(&self, node: &str) -> Option<DateTime<Utc>> {
        self.waits
            .iter()
            .find(|w| w.node == node)
            .map(|w| w.deadline)
    }
    /// When the run must be woken at the latest: its earliest deadline.
    pub fn wake_at(&self) -> Option<DateTime<Utc>> {
        self.waits.iter().map(|w| w.deadline).min()
    }
    /// Whether one of its nodes waits for signal `name` (with `key`, for a keyed signal).
    pub fn waits_for(&self, name: &str, key: Option<&str>) -> bool {
        self.waits.iter().any(|w| {
            w.signal.as_deref() == Some(name) && (key.is_none() || w.key.as_deref() == key)
        })
    }
}

/// Makes the resume URLs that templates see as `run.resume_urls.<signal>`: an address that
/// delivers one signal to one run without an API key (an approval link in an email). The
/// server's makes unguessable ones; an engine without one shows none.
pub trait ResumeUrls: Send + Sync {
    /// The URL that delivers signal `signal` to run `run_id`.
    fn url(&self, run_id: &crate::RunId, signal: &str) -> String;
}

/// What [`NodeContext::wait_for`](crate::NodeContext::wait_for) waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitFor {
    /// A signal, or `None` to wait only for the deadline (a delay).
    pub signal: Option<String>,
    /// The key that keyed signals must carry.
    pub key: Option<String>,
    /// When to stop waiting, the first time the node waits; a node that waited before keeps
    /// the deadline it had.
    pub deadline: DateTime<Utc>,
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Waited {
    /// The signal came, with this payload.
    Signal(serde_json::Value),
    /// The deadline passed first.
    Deadline,
}
