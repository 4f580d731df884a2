//! Reruns: a new run of a flow that keeps what an earlier run did before the point where it
//! starts again. The kept steps are stored with the new run ([`RunStore::create_rerun`]), marked
//! [`StepRecord::reused`]; a worker resumes from them as from its own checkpoints, so they do
//! not execute again, and everything downstream of the restart point does.
//!
//! [`RunStore::create_rerun`]: crate::ports::RunStore::create_rerun

use crate::model::FlowDef;
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

/// The steps of an earlier run (`earlier`) that a rerun of `plan` from `from` keeps, marked
/// reused. The rerun starts again at `from` (for `failed`: at every node without a succeeded
/// or skipped step), at every node of `changed` (nodes whose definition differs from the
/// earlier run's version), and at every node without a succeeded or skipped step whatever
/// `from` says (a step that failed under `on_error`, a node the earlier version lacked): all
/// downstream of those executes. So a kept step's predecessors are all kept: nothing kept
/// depends on something that executes again. An error says why the rerun cannot start there:
/// a node that `plan` does not have, or `failed` for a run without a failed step.
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
/// let kept = kept_steps(&plan, &earlier, &RerunFrom::Failed, &[]).unwrap();
/// assert_eq!(kept.len(), 1);
/// assert!(&*kept[0].node == "a" && kept[0].reused);
/// ```
pub fn kept_steps(
    plan: &Plan,
    earlier: &[StepRecord],
    from: &RerunFrom,
    changed: &[String],
) -> Result<Vec<StepRecord>, String> {
    let done = |s: &StepRecord| matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped);
    // Every node without a finished step of the earlier run.
    let unfinished: Vec<usize> = (0..plan.len())
        .filter(|i| {
            !earlier
                .iter()
                .any(|s| &*s.node == plan.node_id(*i) && done(s))
        })
        .collect();
    let mut starts: Vec<usize> = match from {
        RerunFrom::Start => return Ok(Vec::new()),
        RerunFrom::Node(id) => vec![
            plan.index_of(id)
                .ok_or_else(|| format!("the flow has no node `{id}` to rerun from"))?,
        ],
        RerunFrom::Failed if unfinished.is_empty() => {
            return Err(
                "the run has no failed step: rerun it from `start` or from a node".to_owned(),
            );
        }
        RerunFrom::Failed => Vec::new(),
    };
    starts.extend(unfinished);
    starts.extend(changed.iter().filter_map(|id| plan.index_of(id)));
    let again = plan.downstream(starts);
    Ok(earlier
        .iter()
        .filter(|s| done(s))
        .filter(|s| plan.index_of(&s.node).is_some_and(|i| !again[i]))
        .map(|s| s.clone().into_reused())
        .collect())
}

/// The `map` nodes whose finished items a rerun from `failed` keeps, so that only the items
/// that had not finished execute: each map step of the earlier run that failed or was
/// cancelled, whose node is defined as it was (not in `changed`) and whose predecessors all
/// keep their steps (`kept`), so that it maps over the same items. The caller leaves them out
/// when the rerun has a new input (the items may come from it).
///
/// ```
/// use flowcore::{StepRecord, StepStatus, ItemProgress};
/// use flowcore::rerun::{RerunFrom, carried_maps, kept_steps};
/// let plan = flowcore::Engine::new()
///     .compile_json(r#"{"nodes": [{"id": "a", "type": "noop"},
///         {"id": "m", "type": "map", "params": {"items": "{{ input.list }}",
///          "flow": {"nodes": [{"id": "n", "type": "noop"}]}}}],
///         "edges": [{"from": "a", "to": "m"}]}"#)
///     .unwrap();
/// let earlier = [
///     StepRecord { status: StepStatus::Succeeded, ..StepRecord::pending("a") },
///     StepRecord { status: StepStatus::Failed, items: Some(ItemProgress { total: 3, done: 1 }), ..StepRecord::pending("m") },
/// ];
/// let kept = kept_steps(&plan, &earlier, &RerunFrom::Failed, &[]).unwrap();
/// assert_eq!(carried_maps(&plan, &earlier, &kept, &RerunFrom::Failed, &[]), ["m"]);
/// assert!(carried_maps(&plan, &earlier, &kept, &RerunFrom::Start, &[]).is_empty());
/// ```
pub fn carried_maps(
    plan: &Plan,
    earlier: &[StepRecord],
    kept: &[StepRecord],
    from: &RerunFrom,
    changed: &[String],
) -> Vec<String> {
    if *from != RerunFrom::Failed {
        return Vec::new();
    }
    let is_kept = |i: usize| kept.iter().any(|s| *s.node == *plan.node_id(i));
    earlier
        .iter()
        .filter(|s| s.items.is_some())
        .filter(|s| matches!(s.status, StepStatus::Failed | StepStatus::Cancelled))
        .filter(|s| !changed.iter().any(|c| *c == *s.node))
        .filter_map(|s| plan.index_of(&s.node))
        .filter(|&i| !is_kept(i) && plan.preds(i).iter().all(|&p| is_kept(p)))
        .map(|i| plan.node_id(i).to_owned())
        .collect()
}

/// The nodes of `now` whose definition differs from `before`'s (its type, params, retry,
/// time limit, `on_error`, or the edges that come into it), or that `before` lacks: a rerun at
/// another version than the earlier run's starts again at them ([`kept_steps`]'s `changed`).
///
/// ```
/// use flowcore::FlowDef;
/// let before = FlowDef::from_value(serde_json::json!({"nodes": [{"id": "a", "type": "noop"},
///     {"id": "b", "type": "template", "params": {"template": "1"}}]})).unwrap();
/// let now = FlowDef::from_value(serde_json::json!({"nodes": [{"id": "a", "type": "noop"},
///     {"id": "b", "type": "template", "params": {"template": "2"}}]})).unwrap();
/// assert_eq!(flowcore::rerun::changed_nodes(&before, &now), ["b"]);
/// ```
pub fn changed_nodes(before: &FlowDef, now: &FlowDef) -> Vec<String> {
    let incoming = |flow: &FlowDef, id: &str| {
        let mut edges: Vec<(String, Option<String>)> = flow
            .edges
            .iter()
            .filter(|e| e.to == id)
            .map(|e| (e.from.clone(), e.port.clone()))
            .collect();
        edges.sort();
        edges
    };
    now.nodes
        .iter()
        .filter(|node| {
            let old = before.nodes.iter().find(|n| n.id == node.id);
            old.is_none_or(|old| {
                serde_json::to_value(old).ok() != serde_json::to_value(node).ok()
                    || incoming(before, &node.id) != incoming(now, &node.id)
            })
        })
        .map(|node| node.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StepStatus::{Failed, Skipped, Succeeded};

    fn plan(json: &str) -> Plan {
        crate::Engine::new().compile_json(json).unwrap()
    }

    fn steps(list: &[(&str, StepStatus)]) -> Vec<StepRecord> {
        list.iter()
            .map(|(node, status)| StepRecord {
                status: *status,
                ..StepRecord::pending(*node)
            })
            .collect()
    }

    fn kept(
        plan: &Plan,
        earlier: &[StepRecord],
        from: &RerunFrom,
        changed: &[String],
    ) -> Vec<String> {
        let mut nodes: Vec<String> = kept_steps(plan, earlier, from, changed)
            .unwrap()
            .iter()
            .map(|s| s.node.to_string())
            .collect();
        nodes.sort();
        nodes
    }

    #[test]
    fn nothing_kept_depends_on_what_runs_again() {
        // fetch routes its failure to alert; charge follows its success; report is apart.
        let p = plan(
            r#"{"nodes": [{"id": "fetch", "type": "noop", "on_error": "route"},
                {"id": "charge", "type": "noop"}, {"id": "alert", "type": "noop"},
                {"id": "report", "type": "noop"}],
               "edges": [{"from": "fetch", "to": "charge"},
                {"from": "fetch", "port": "error", "to": "alert"}]}"#,
        );
        let earlier = steps(&[
            ("fetch", Failed),
            ("charge", Skipped),
            ("alert", Succeeded),
            ("report", Failed),
        ]);
        // From `report`: `fetch` failed under `on_error`, so it runs again, and with it
        // what follows it; nothing is kept.
        assert!(kept(&p, &earlier, &RerunFrom::Node("report".into()), &[]).is_empty());
        let earlier = steps(&[
            ("fetch", Succeeded),
            ("charge", Succeeded),
            ("alert", Skipped),
            ("report", Succeeded),
        ]);
        assert_eq!(
            kept(&p, &earlier, &RerunFrom::Node("charge".into()), &[]),
            ["alert", "fetch", "report"]
        );
        // A node changed in the version the rerun runs starts again too.
        assert_eq!(
            kept(
                &p,
                &earlier,
                &RerunFrom::Node("report".into()),
                &["fetch".into()]
            ),
            Vec::<String>::new()
        );
        // A node the earlier run never reached (new in this version) runs, and what follows it.
        let earlier = steps(&[
            ("fetch", Succeeded),
            ("alert", Skipped),
            ("report", Succeeded),
        ]);
        assert_eq!(
            kept(&p, &earlier, &RerunFrom::Node("report".into()), &[]),
            ["alert", "fetch"]
        );
        assert!(
            kept_steps(
                &p,
                &steps(&[
                    ("fetch", Succeeded),
                    ("charge", Succeeded),
                    ("alert", Skipped),
                    ("report", Succeeded)
                ]),
                &RerunFrom::Failed,
                &[]
            )
            .is_err()
        );
    }
}
