//! Schedule triggers: every process checks the flows' cron triggers once a second and starts the
//! runs of ticks that passed. A tick fires once however many processes run: each tick's run has
//! the idempotency key `schedule:{trigger}:{tick}`, so every process asks for the same run and
//! only the one that created it enqueues it; a process dying half-way leaves nothing half-done.
//! Ticks that passed while no process ran are not made up for (like cron).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flowcore::{CancellationToken, Trigger};

use crate::lifecycle::{self, Start};
use crate::state::AppState;

/// One schedule trigger of one flow.
#[derive(Debug, Clone)]
struct Schedule {
    flow_id: String,
    /// `{flow_id}#{index of the trigger}`.
    id: String,
    cron: croner::Cron,
}

async fn load(state: &AppState) -> Result<Vec<Schedule>, flowcore::StoreError> {
    let mut out = Vec::new();
    for flow in flowcore::ports::all_flows(state.stores.flows.as_ref()).await? {
        for (i, trigger) in flow.definition.triggers.iter().enumerate() {
            if let Trigger::Schedule { cron } = trigger {
                // Stored flows were compiled on the way in; a cron that no longer parses is
                // skipped, not fatal.
                if let Ok(cron) = flowcore::plan::parse_cron(cron) {
                    out.push(Schedule {
                        flow_id: flow.id.clone(),
                        id: format!("{}#{i}", flow.id),
                        cron,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The ticks of `cron` in `(after, until]`, at most `max`.
fn ticks(
    cron: &croner::Cron,
    after: DateTime<Utc>,
    until: DateTime<Utc>,
    max: usize,
) -> Vec<DateTime<Utc>> {
    cron.iter_after(after)
        .take_while(|t| *t <= until)
        .take(max)
        .collect()
}

/// Starts the runs of the ticks in `(after, until]` of every schedule; returns how many starts
/// were asked for (a tick already started by another process counts too, and starts nothing).
async fn fire(
    state: &Arc<AppState>,
    schedules: &[Schedule],
    after: DateTime<Utc>,
    until: DateTime<Utc>,
) -> usize {
    let mut asked = 0;
    for schedule in schedules {
        for tick in ticks(&schedule.cron, after, until, 10) {
            let key = format!("schedule:{}:{}", schedule.id, tick.timestamp());
            let input = serde_json::json!({"scheduled_at": tick, "schedule": schedule.id});
            let start = Start {
                flow_id: schedule.flow_id.clone(),
                input,
                wait: false,
                idempotency_key: Some(key),
                trigger: None,
            };
            match lifecycle::start(state, start).await {
                Ok(_) => {
                    asked += 1;
                    tracing::debug!(schedule = %schedule.id, %tick, "schedule fired");
                }
                Err(e) => {
                    tracing::warn!(schedule = %schedule.id, %tick, error = %e, "a scheduled run could not start");
                }
            }
        }
    }
    asked
}

/// Fires the ticks of every stored schedule in `(after, until]` (what the loop does each second,
/// with a window of one second).
pub async fn fire_window(
    state: &Arc<AppState>,
    after: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<usize, flowcore::StoreError> {
    Ok(fire(state, &load(state).await?, after, until).await)
}

/// Fires due ticks until `shutdown`. The list of schedules is read again after a flow change
/// (from any process) and at least once a minute.
pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut changes = state.stores.flow_changes.subscribe();
    let mut schedules: Option<(std::time::Instant, Vec<Schedule>)> = None;
    let mut checked = Utc::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let mut stale = false;
        while let Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) =
            changes.try_recv()
        {
            stale = true;
        }
        if stale
            || schedules
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() > Duration::from_secs(60))
        {
            match load(&state).await {
                Ok(list) => schedules = Some((std::time::Instant::now(), list)),
                Err(e) => {
                    tracing::warn!(error = %e, "reading schedules failed; retrying");
                    continue;
                }
            }
        }
        let now = Utc::now();
        if let Some((_, list)) = &schedules {
            fire(&state, list, checked, now).await;
        }
        checked = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_in_a_window_and_bounded() {
        let cron = flowcore::plan::parse_cron("*/15 * * * *").unwrap();
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert_eq!(
            ticks(
                &cron,
                at("2026-01-01T10:00:00Z"),
                at("2026-01-01T10:45:00Z"),
                10
            ),
            vec![
                at("2026-01-01T10:15:00Z"),
                at("2026-01-01T10:30:00Z"),
                at("2026-01-01T10:45:00Z")
            ]
        );
        assert!(
            ticks(
                &cron,
                at("2026-01-01T10:00:00Z"),
                at("2026-01-01T10:14:59Z"),
                10
            )
            .is_empty()
        );
        assert_eq!(
            ticks(
                &cron,
                at("2026-01-01T00:00:00Z"),
                at("2026-01-02T00:00:00Z"),
                10
            )
            .len(),
            10
        );
    }
}
