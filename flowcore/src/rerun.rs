//! Reruns: a new run of a flow that keeps what an earlier run did before the point where it
//! starts again. The kept steps are stored with the new run ([`RunStore::create_rerun`]), marked
//! [`StepRecord::reused`]; a worker resumes from them as from its own checkpoints, so they do
//! not execute again, and everything downstream of the restart point does.
//!
//! [`RunStore::create_rerun`]: crate::ports::RunStore::create_rerun

use crate::plan::Plan;
use crate::run::{StepRecord, StepStatus};

/// Where a rerun starts again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RerunFrom {
    /// At the steps that did not succeed (failed, cancelled, never finished) and all
    /// downstream of them.
    Failed,
    /// From the start: nothing is kept.
    Start,
    /// At this node and all downstream of it.
    Node(String),
}

impl RerunFrom {
    /// `failed`, `start`, or a node's id.
    ///
    /// ```
    /// use flowcore::rerun::RerunFrom;
    /// assert_eq!(RerunFrom::parse("failed"), RerunFrom::Failed);
    /// assert_eq!(RerunFrom::parse("charge"), RerunFrom::Node("charge".into()));
    /// ```
    pub fn parse(text: &str) -> Self {
        match text {
            "failed" => Self::Failed,
            "start" => Self::Start,
            node => Self::Node(node.to_owned()),
        }
    }
}

/// The steps of an earlier run (`earlier`) that a rerun of `plan` from `from` keeps: those that
/// succeeded (or were skipped) at nodes of `plan` that are not downstream of where the rerun
/// starts, marked reused. An error says why the rerun cannot start there: a node that `plan`
/// does not have, or `failed` for a run whose every step succeeded.
///
/// ```
/// use flowcore::rerun::{RerunFrom, kept_steps};
/// use flowcore::{StepRecord, StepStatus};
/// let plan = flowcore::Engine::new()
///     .compile_json(r#"{"nodes": [{"id": "a", "type": "noop"}, {"id": "b", "type": "noop"}],
///         "edges": [{"from": "a", "to": "b"}]}"#)
///     .unwrap();
/// let step = |node: &str, status| StepRecord { status, ..StepRecord::pending(node) };
/// let earlier = [step("a", StepStatus::Succeeded), step("b", StepStatus::Failed)];
/// let kept = kept_steps(&plan, &earlier, &RerunFrom::Failed).unwrap();
/// assert_eq!(kept.len(), 1);
/// assert!(&*kept[0].node == "a" && kept[0].reused);
/// ```
pub fn kept_steps(
    plan: &Plan,
    earlier: &[StepRecord],
    from: &RerunFrom,
) -> Result<Vec<StepRecord>, String> {
    let done = |s: &StepRecord| matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped);
    let starts: Vec<usize> = match from {
        RerunFrom::Start => return Ok(Vec::new()),
        RerunFrom::Node(id) => vec![
            plan.index_of(id)
                .ok_or_else(|| format!("the flow has no node `{id}` to rerun from"))?,
        ],
        RerunFrom::Failed => {
            // Every node without a finished step: those that failed or stopped, and those
            // that never ran.
            let starts: Vec<usize> = (0..plan.len())
                .filter(|i| {
                    !earlier
                        .iter()
                        .any(|s| &*s.node == plan.node_id(*i) && done(s))
                })
                .collect();
            if starts.is_empty() {
                return Err(
                    "the run has no failed step: rerun it from `start` or from a node".to_owned(),
                );
            }
            starts
        }
    };
    let again = plan.downstream(starts);
    Ok(earlier
        .iter()
        .filter(|s| done(s))
        .filter(|s| plan.index_of(&s.node).is_some_and(|i| !again[i]))
        .map(|s| StepRecord {
            reused: true,
            ..s.clone()
        })
        .collect())
}
