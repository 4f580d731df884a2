//! Compilation reports every problem with where it is.

use flowcore::{Engine, FlowDef, Problem};
use serde_json::{Value, json};

fn problems(flow: Value) -> Vec<Problem> {
    let flow = FlowDef::from_value(flow).expect("parses");
    Engine::new()
        .compile(&flow)
        .expect_err("must be refused")
        .problems
}

fn has(problems: &[Problem], node: Option<&str>, edge: Option<usize>, text: &str) -> bool {
    problems
        .iter()
        .any(|p| p.node.as_deref() == node && p.edge == edge && p.problem.contains(text))
}

#[test]
fn every_problem_is_reported_at_once() {
    let p = problems(json!({
        "id": "bad id!",
        "nodes": [
            {"id": "a", "type": "set", "params": {"fields": {"x": "{{ nodes.c.v }}"}}},
            {"id": "a", "type": "noop"},
            {"id": "b", "type": "nope"},
            {"id": "c", "type": "branch", "params": {"condition": "input.n >"}},
            {"id": "d", "type": "delay", "params": {"ms": "soon"}},
            {"id": "e", "type": "noop", "retry": {"max_attempts": 0}},
            {"id": "with space", "type": "noop"}
        ],
        "edges": [
            {"from": "a", "to": "ghost"},
            {"from": "phantom", "to": "a"},
            {"from": "e", "port": "sideways", "to": "a"},
            {"from": "e", "port": "error", "to": "d"}
        ],
        "output": "nowhere",
        "triggers": [
            {"type": "schedule", "cron": "61 * * * *"},
            {"type": "schedule", "cron": "* * *"},
            {"type": "webhook", "path": "../etc"}
        ],
        "settings": {"max_concurrency": 0}
    }));
    assert!(has(&p, None, None, "flow id `bad id!`"), "{p:#?}");
    assert!(has(&p, Some("a"), None, "duplicate node id"));
    assert!(has(&p, Some("b"), None, "unknown node type `nope`"));
    assert!(has(&p, Some("c"), None, "invalid expression `input.n >`"));
    assert!(has(&p, Some("d"), None, "bad params: invalid type"));
    assert!(has(&p, Some("e"), None, "retry.max_attempts"));
    assert!(has(&p, Some("with space"), None, "node id is not"));
    assert!(has(&p, None, Some(0), "edge to missing node `ghost`"));
    assert!(has(&p, None, Some(1), "edge from missing node `phantom`"));
    assert!(has(&p, Some("e"), Some(2), "unknown port `sideways`"));
    assert!(has(
        &p,
        Some("e"),
        Some(3),
        "only taken when the node's on_error is `route`"
    ));
    assert!(has(&p, None, None, "output node `nowhere`"));
    assert!(has(&p, None, None, "invalid cron `61 * * * *`"));
    assert!(has(&p, None, None, "expected 5 fields"));
    assert!(has(&p, None, None, "webhook path `../etc`"));
    assert!(has(&p, None, None, "max_concurrency"));
    assert!(p.len() >= 16, "{p:#?}");
}

#[test]
fn cycles_name_their_nodes() {
    let p = problems(json!({
        "nodes": [{"id": "start", "type": "noop"}, {"id": "x", "type": "noop"}, {"id": "y", "type": "noop"}, {"id": "z", "type": "noop"}, {"id": "self", "type": "noop"}],
        "edges": [
            {"from": "start", "to": "x"}, {"from": "x", "to": "y"}, {"from": "y", "to": "z"}, {"from": "z", "to": "x"},
            {"from": "self", "to": "self"}
        ]
    }));
    assert!(
        has(&p, Some("x"), None, "cycle: x -> y -> z -> x"),
        "{p:#?}"
    );
    assert!(has(&p, Some("self"), None, "cycle: self -> self"), "{p:#?}");
    assert_eq!(p.len(), 2);
}

#[test]
fn templates_may_only_use_upstream_nodes_and_known_names() {
    let p = problems(json!({
        "nodes": [
            {"id": "a", "type": "set", "params": {"fields": {"v": 1}}},
            {"id": "b", "type": "set", "params": {"fields": {"v": "{{ nodes.c.v }} {{ nodes.a.v }} {{ nodes.zz }}"}}},
            {"id": "c", "type": "template", "params": {"template": "{{ inptu.name }}"}}
        ],
        "edges": [{"from": "a", "to": "b"}]
    }));
    assert!(has(&p, Some("b"), None, "`c` is not upstream"), "{p:#?}");
    assert!(
        has(&p, Some("b"), None, "refers to missing node `zz`"),
        "{p:#?}"
    );
    assert!(
        has(&p, Some("c"), None, "unknown variable `inptu`"),
        "{p:#?}"
    );
    assert!(
        !has(&p, Some("b"), None, "`a` is not upstream"),
        "a is upstream of b"
    );
    assert_eq!(p.len(), 3, "{p:#?}");
}

#[test]
fn parse_refuses_unknown_fields_and_bad_json() {
    let err =
        FlowDef::from_json(r#"{"nodes": [{"id": "a", "type": "noop", "on_eror": "continue"}]}"#)
            .unwrap_err();
    assert!(err.message.contains("unknown field `on_eror`"), "{err}");
    assert_eq!(err.code(), "invalid_json");
    let err = FlowDef::from_json("{\"nodes\": [").unwrap_err();
    assert_eq!(err.line, 1);
    // A document read from a value (as the API does) has no lines: the error names the field.
    let err = FlowDef::from_value(serde_json::json!({"nodes": [{"id": "a", "type": "noop"}, {"id": "b", "type": "noop", "retry": {"max_attempts": "x"}}]}))
        .unwrap_err();
    assert_eq!(
        err.path.as_deref(),
        Some("nodes[1].retry.max_attempts"),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("invalid flow JSON at `nodes[1].retry.max_attempts`: "),
        "{err}"
    );
    assert!(!err.to_string().contains("line 0"), "{err}");
    assert!(FlowDef::from_json(r#"{"nodes": "many"}"#).is_err());
    assert!(
        FlowDef::from_json(r#"{"nodes": [], "triggers": [{"type": "carrier_pigeon"}]}"#).is_err()
    );
    let deep = "[".repeat(100_000);
    assert!(
        FlowDef::from_json(&deep).is_err(),
        "deep nesting is an error, not a stack overflow"
    );
    assert!(FlowDef::from_slice(b"\xff\xfe").is_err(), "non-UTF-8");
}

#[test]
fn empty_flow_is_refused() {
    let p = problems(json!({"nodes": []}));
    assert!(has(&p, None, None, "at least one node"));
}

#[test]
fn a_valid_flow_round_trips_through_json() {
    let text = include_str!("../../examples/flows/greet.json");
    let flow = FlowDef::from_json(text).unwrap();
    let again = FlowDef::from_json(&serde_json::to_string(&flow).unwrap()).unwrap();
    assert_eq!(flow, again);
    assert!(Engine::new().compile(&flow).is_ok());
}

/// A duplicate node id is placed at the second node that has it: the first is where it belongs.
#[test]
fn a_duplicate_node_id_is_placed_at_the_second_node() {
    let text = "{\"id\": \"f\", \"nodes\": [\n  {\"id\": \"a\", \"type\": \"noop\"},\n  {\"id\": \"b\", \"type\": \"noop\"},\n  {\"id\": \"a\", \"type\": \"noop\"}\n]}";
    let flow: FlowDef = serde_json::from_str(text).expect("parses");
    let error = Engine::new()
        .compile(&flow)
        .expect_err("must be refused")
        .locate(text.as_bytes());
    let duplicate = error
        .problems
        .iter()
        .find(|p| p.problem == "duplicate node id")
        .expect("the duplicate is a problem");
    assert_eq!(duplicate.node.as_deref(), Some("a"));
    assert_eq!(duplicate.path.as_deref(), Some("nodes[2].id"));
    assert_eq!((duplicate.line, duplicate.column), (Some(4), Some(10)));
}
