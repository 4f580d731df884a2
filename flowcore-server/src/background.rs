//! The work a server process does besides answering requests, by role: executing runs from the
//! queue, recovering runs whose worker died and waking parked runs whose time came (`all`,
//! `worker`), firing schedules, storing usage
//! and pruning finished runs by retention (every role); and its graceful
//! end: stop taking runs, let running ones finish within the grace period, hand the rest back.

use std::time::Duration;

use flowcore::CancellationToken;
use tokio::task::JoinHandle;

use crate::config::Role;
use crate::lifecycle;
use crate::state::Shared;

/// How often a worker looks for runs whose owner is gone: an indexed query that mostly finds
/// nothing, often enough that a dead worker's runs move on within a second of its lease lapsing.
pub const REAP_EVERY: Duration = Duration::from_secs(1);

/// The background tasks of one process.
#[derive(Debug)]
pub struct Background {
    state: Shared,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Starts the background tasks of the process's role.
pub fn start(state: &Shared) -> Background {
    let shutdown = CancellationToken::new();
    let mut tasks = vec![
        tokio::spawn(state.usage.clone().run_flusher(shutdown.clone())),
        tokio::spawn(crate::schedules::run(state.clone(), shutdown.clone())),
        tokio::spawn(crate::retention::run(state.clone(), shutdown.clone())),
    ];
    if matches!(state.config.role, Role::All | Role::Worker) {
        tasks.push(tokio::spawn(crate::worker::work(
            state.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(lifecycle::obey_cancels(
            state.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(lifecycle::reap(
            state.clone(),
            REAP_EVERY,
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(lifecycle::wake_timers(
            state.clone(),
            shutdown.clone(),
        )));
    }
    Background {
        state: state.clone(),
        shutdown,
        tasks,
    }
}

impl Background {
    /// Stops taking new runs, waits up to `grace` for the runs executing here to finish, then
    /// hands the others back to the queue (their finished steps kept), and stops the tasks.
    /// Returns how many runs were handed back.
    pub async fn stop(self, grace: Duration) -> usize {
        self.shutdown.cancel();
        let until = tokio::time::Instant::now() + grace;
        while !self.state.running.is_empty() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.state.running.len();
        if left > 0 {
            tracing::info!(runs = left, "handing unfinished runs back to the queue");
            self.state.hand_back.cancel();
            // Handing back is a store write or two per run.
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while !self.state.running.is_empty() && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        left
    }
}
