//! Property tests: any random DAG runs every node exactly once, after all its inputs.

mod common;

use std::sync::Arc;

use common::{Probe, compile, engine};
use flowcore::RunStatus;
use proptest::prelude::*;
use serde_json::json;

fn dag() -> impl Strategy<Value = (usize, Vec<(usize, usize)>)> {
    (1usize..40).prop_flat_map(|n| {
        let pairs: Vec<(usize, usize)> = (0..n).flat_map(|j| (0..j).map(move |i| (i, j))).collect();
        let len = pairs.len();
        (
            Just(n),
            proptest::sample::subsequence(pairs, 0..=len.min(120)),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_node_runs_once_after_its_inputs((n, edges) in dag(), max_concurrency in 1usize..6) {
        let probe = Arc::new(Probe::default());
        let engine = engine(&probe);
        // Shuffle node order in the document so the scheduler cannot rely on it.
        let nodes: Vec<_> = (0..n).rev().map(|i| json!({"id": format!("n{i}"), "type": "probe"})).collect();
        let edge_defs: Vec<_> = edges.iter().map(|(a, b)| json!({"from": format!("n{a}"), "to": format!("n{b}")})).collect();
        let plan = compile(&engine, json!({"nodes": nodes, "edges": edge_defs, "settings": {"max_concurrency": max_concurrency}}));
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let result = rt.block_on(engine.run(&plan, json!({})));
        prop_assert_eq!(result.status, RunStatus::Succeeded);
        let order = probe.order.lock().unwrap().clone();
        prop_assert_eq!(order.len(), n, "every node ran once");
        let pos = |id: usize| order.iter().position(|x| *x == format!("n{id}")).unwrap();
        for i in 0..n {
            prop_assert_eq!(probe.runs_of(&format!("n{i}")), 1);
        }
        for (a, b) in &edges {
            prop_assert!(pos(*a) < pos(*b), "n{} ran before its input n{}", b, a);
        }
    }

    #[test]
    fn branches_skip_exactly_the_dead_paths((n, edges) in dag(), seed in any::<u64>()) {
        // Nodes with outgoing edges become branches with a fixed outcome; an edge uses port
        // true, false or main at random. A node must run iff some incoming edge is live.
        let mut rng = seed;
        let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
        let outcome: Vec<bool> = (0..n).map(|_| next() % 2 == 0).collect();
        let has_out: Vec<bool> = (0..n).map(|i| edges.iter().any(|(a, _)| *a == i)).collect();
        let ports: Vec<Option<bool>> = edges.iter().map(|_| match next() % 3 { 0 => None, 1 => Some(true), _ => Some(false) }).collect();
        let nodes: Vec<_> = (0..n).map(|i| if has_out[i] {
            json!({"id": format!("n{i}"), "type": "branch", "params": {"condition": if outcome[i] { "true" } else { "false" }}})
        } else {
            json!({"id": format!("n{i}"), "type": "noop"})
        }).collect();
        let edge_defs: Vec<_> = edges.iter().zip(&ports).map(|((a, b), p)| match p {
            None => json!({"from": format!("n{a}"), "to": format!("n{b}")}),
            Some(t) => json!({"from": format!("n{a}"), "to": format!("n{b}"), "port": t.to_string()}),
        }).collect();
        let engine = flowcore::Engine::new();
        let plan = compile(&engine, json!({"nodes": nodes, "edges": edge_defs}));
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let result = rt.block_on(engine.run(&plan, json!({})));
        prop_assert_eq!(result.status, RunStatus::Succeeded);

        // Expected: evaluate in index order (edges go from lower to higher index).
        let mut ran = vec![false; n];
        for j in 0..n {
            let incoming: Vec<usize> = (0..edges.len()).filter(|&e| edges[e].1 == j).collect();
            ran[j] = incoming.is_empty() || incoming.iter().any(|&e| {
                let a = edges[e].0;
                ran[a] && ports[e].is_none_or(|p| p == outcome[a])
            });
        }
        for (j, should_run) in ran.iter().enumerate() {
            let step = result.step(&format!("n{j}")).unwrap();
            let expected = if *should_run { flowcore::StepStatus::Succeeded } else { flowcore::StepStatus::Skipped };
            prop_assert_eq!(step.status, expected, "node n{}", j);
        }
    }
}
