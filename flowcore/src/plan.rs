//! Compilation: a flow definition becomes an immutable [`Plan`], or every problem is reported.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use serde_json::Value;

use crate::error::{CompileError, Problem};
use crate::expr::{Scope, Template, ValueTemplate};
use crate::model::{FlowDef, OnError, RetryPolicy, Trigger, is_valid_id, shorten_to, too_many};
pub use crate::model::{MAX_EDGES, MAX_NODES, MAX_TRIGGERS};
use crate::node::{BuildContext, Node, Registry};
use crate::ports::{ConcurrencyKey, DEFAULT_PRIORITY, MAX_PRIORITY};

/// The port name a routed failure goes out of.
pub const ERROR_PORT: &str = "error";

/// A compiled flow: nodes built from their params, edges resolved to indices, templates compiled.
/// Cheap to clone and shared by every run of the flow; never changed by a run.
#[derive(Clone)]
pub struct Plan(Arc<PlanInner>);

struct PlanInner {
    flow_id: Option<String>,
    worker_group: Option<String>,
    on_failure: Option<String>,
    /// `settings.concurrency`: the key's template and the limit.
    concurrency: Option<(Template, u32)>,
    /// `settings.priority`.
    priority: Option<ValueTemplate>,
    nodes: Vec<PlanNode>,
    index: HashMap<Arc<str>, usize>,
    output: Option<usize>,
    sinks: Vec<usize>,
    timeout: Option<Duration>,
    max_concurrency: Option<usize>,
    /// Outgoing edges of each node: the source port (`None` = main output) and the target.
    out: PerNode<OutEdge>,
    /// Predecessors of each node, one per incoming edge.
    preds: PerNode<usize>,
    /// The signals its `wait` nodes take, sorted, once each.
    signals: Vec<String>,
}

/// An outgoing edge: the source port (`None` = main output) and the target's index.
pub(crate) type OutEdge = (Option<Arc<str>>, usize);

pub(crate) struct PlanNode {
    pub(crate) id: Arc<str>,
    pub(crate) node_type: Arc<str>,
    pub(crate) node: Box<dyn Node>,
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) on_error: OnError,
    /// Number of incoming edges: a node is ready when all have been resolved.
    pub(crate) in_edges: usize,
}

/// Lists per node in one allocation ("compressed sparse rows"): node `i`'s items are
/// `items[start[i]..start[i + 1]]`. A 10,000-node flow then costs two vectors, not 20,000.
struct PerNode<T> {
    items: Vec<T>,
    start: Vec<usize>,
}

impl<T: Clone> PerNode<T> {
    /// Groups `(node, item)` pairs by node, keeping their order within a node.
    fn group(n: usize, pairs: &[(usize, T)]) -> Self {
        let mut start = vec![0usize; n + 1];
        for (node, _) in pairs {
            start[node + 1] += 1;
        }
        for i in 0..n {
            start[i + 1] += start[i];
        }
        let mut next = start.clone();
        let mut order = vec![0usize; pairs.len()];
        for (k, (node, _)) in pairs.iter().enumerate() {
            order[next[*node]] = k;
            next[*node] += 1;
        }
        Self {
            items: order.into_iter().map(|k| pairs[k].1.clone()).collect(),
            start,
        }
    }

    fn get(&self, node: usize) -> &[T] {
        &self.items[self.start[node]..self.start[node + 1]]
    }
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan")
            .field("flow", &self.0.flow_id)
            .field("nodes", &self.0.nodes.len())
            .finish()
    }
}

impl Plan {
    /// The id of the flow this plan was compiled from.
    pub fn flow_id(&self) -> Option<&str> {
        self.0.flow_id.as_deref()
    }
    /// The signals the flow's `wait` nodes take, sorted (what `run.resume_urls` holds).
    pub fn signals(&self) -> &[String] {
        &self.0.signals
    }
    /// The worker group whose queue runs this flow (`settings.worker_group`), if the flow names one.
    pub fn worker_group(&self) -> Option<&str> {
        self.0.worker_group.as_deref()
    }
    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.0.nodes.len()
    }
    /// Whether the plan has no nodes (never true: compilation refuses empty flows).
    pub fn is_empty(&self) -> bool {
        self.0.nodes.is_empty()
    }
    /// The index of node `id`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.0.index.get(id).copied()
    }
    /// The id of the node at `index`.
    pub fn node_id(&self, index: usize) -> &str {
        &self.0.nodes[index].id
    }
    /// The type name of the node at `index`.
    pub fn node_type(&self, index: usize) -> &str {
        &self.0.nodes[index].node_type
    }
    /// The flow's failure handler (`settings.on_failure.flow_id`).
    pub fn on_failure(&self) -> Option<&str> {
        self.0.on_failure.as_deref()
    }

    /// Where a run of this flow with `input` goes in the queue: its concurrency key
    /// (`settings.concurrency`) and its priority (`settings.priority`), rendered from the
    /// input. An error says which setting failed and why.
    ///
    /// ```
    /// use std::sync::Arc;
    /// let plan = flowcore::Engine::new()
    ///     .compile_json(r#"{"nodes": [{"id": "a", "type": "noop"}], "settings": {
    ///         "concurrency": {"key": "{{ input.tenant }}", "limit": 2},
    ///         "priority": "{{ input.urgent and 9 or 1 }}"}}"#)
    ///     .unwrap();
    /// let (key, priority) = plan.placement(&Arc::new(serde_json::json!({"tenant": "acme", "urgent": true}))).unwrap();
    /// assert_eq!((key.unwrap().key.as_str(), priority), ("acme", 9));
    /// assert!(plan.placement(&Arc::new(serde_json::json!({}))).is_err());
    /// ```
    pub fn placement(&self, input: &Arc<Value>) -> Result<(Option<ConcurrencyKey>, u8), String> {
        if self.0.concurrency.is_none() && self.0.priority.is_none() {
            return Ok((None, DEFAULT_PRIORITY));
        }
        let scope = Scope::input_only(input.clone());
        let key = match &self.0.concurrency {
            None => None,
            Some((template, limit)) => {
                let key = match template.render(&scope) {
                    Err(e) => return Err(format!("settings.concurrency.key: {e}")),
                    Ok(Value::Null) => {
                        return Err("settings.concurrency.key rendered null".into());
                    }
                    Ok(Value::String(s)) => s,
                    Ok(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                    Ok(_) => {
                        return Err(
                            "settings.concurrency.key rendered an object or an array, not a text"
                                .into(),
                        );
                    }
                };
                if key.len() > MAX_CONCURRENCY_KEY {
                    return Err(format!(
                        "settings.concurrency.key rendered {} bytes, more than {MAX_CONCURRENCY_KEY}",
                        key.len()
                    ));
                }
                Some(ConcurrencyKey { key, limit: *limit })
            }
        };
        let priority = match &self.0.priority {
            None => DEFAULT_PRIORITY,
            Some(template) => {
                let value = template
                    .render(&scope)
                    .map_err(|e| format!("settings.priority: {e}"))?;
                priority_of(&value)?
            }
        };
        Ok((key, priority))
    }
    /// The nodes reachable from `from` along edges (any port), `from` included: what must run
    /// again when they do. Indexes out of range are ignored.
    ///
    /// ```
    /// let plan = flowcore::Engine::new()
    ///     .compile_json(r#"{"nodes": [{"id": "a", "type": "noop"}, {"id": "b", "type": "noop"},
    ///         {"id": "c", "type": "noop"}], "edges": [{"from": "a", "to": "b"}]}"#)
    ///     .unwrap();
    /// let down = plan.downstream([plan.index_of("a").unwrap()]);
    /// assert!(down[plan.index_of("b").unwrap()] && !down[plan.index_of("c").unwrap()]);
    /// ```
    pub fn downstream(&self, from: impl IntoIterator<Item = usize>) -> Vec<bool> {
        let mut seen = vec![false; self.0.nodes.len()];
        let mut stack: Vec<usize> = from.into_iter().filter(|i| *i < seen.len()).collect();
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            stack.extend(self.0.out.get(i).iter().map(|(_, to)| *to));
        }
        seen
    }
    /// The flow's own time limit.
    pub fn timeout(&self) -> Option<Duration> {
        self.0.timeout
    }
    pub(crate) fn node(&self, index: usize) -> &PlanNode {
        &self.0.nodes[index]
    }
    pub(crate) fn preds(&self, index: usize) -> &[usize] {
        self.0.preds.get(index)
    }
    pub(crate) fn out(&self, index: usize) -> &[OutEdge] {
        self.0.out.get(index)
    }
    pub(crate) fn output_node(&self) -> Option<usize> {
        self.0.output
    }
    pub(crate) fn sinks(&self) -> &[usize] {
        &self.0.sinks
    }
    pub(crate) fn max_concurrency(&self) -> Option<usize> {
        self.0.max_concurrency
    }
}

/// Compiles a flow with the node types of `registry`.
pub fn compile(flow: &FlowDef, registry: &Registry) -> Result<Plan, CompileError> {
    compile_in(
        flow,
        BuildContext {
            registry,
            child: false,
        },
    )
}

/// Compiles a flow with what `cx` says: a child flow (a `map`'s) may not `wait`.
pub fn compile_in(flow: &FlowDef, cx: BuildContext<'_>) -> Result<Plan, CompileError> {
    let registry = cx.registry;
    if let Some(problem) = too_many(flow.nodes.len(), flow.edges.len(), flow.triggers.len()) {
        return Err(CompileError {
            problems: vec![problem],
        });
    }
    let mut problems = Vec::new();

    if let Some(id) = &flow.id
        && !is_valid_id(id)
    {
        problems.push(Problem::flow(format!(
            "flow id `{}` is not 1 to 64 of A-Z a-z 0-9 _ -",
            shorten(id)
        )));
    }
    if flow.nodes.is_empty() {
        problems.push(Problem::flow("a flow needs at least one node"));
    }

    // Ids first, so that edges and references can be checked against them.
    let mut index: HashMap<Arc<str>, usize> = HashMap::with_capacity(flow.nodes.len());
    let mut ids: Vec<Arc<str>> = Vec::with_capacity(flow.nodes.len());
    for (i, def) in flow.nodes.iter().enumerate() {
        let id: Arc<str> = Arc::from(def.id.as_str());
        if !is_valid_id(&def.id) {
            problems.push(Problem::node(
                shorten(&def.id),
                "node id is not 1 to 64 of A-Z a-z 0-9 _ -",
            ));
        } else if index.contains_key(&id) {
            // At the second node with the id, not the first (which `node` alone would name).
            problems.push(Problem {
                path: Some(format!("nodes[{i}].id")),
                ..Problem::node(&*def.id, "duplicate node id")
            });
        } else {
            index.insert(id.clone(), i);
        }
        ids.push(id);
    }

    // Build each node from its params. Type names are shared between nodes of a type.
    let mut type_names: HashMap<&str, Arc<str>> = HashMap::new();
    let mut built: Vec<Option<Box<dyn Node>>> = Vec::with_capacity(flow.nodes.len());
    for def in &flow.nodes {
        let node = match registry.get(&def.node_type) {
            None => {
                problems.push(Problem::node(
                    &*def.id,
                    format!("unknown node type `{}`", shorten(&def.node_type)),
                ));
                None
            }
            Some(_) if cx.child && def.node_type == "wait" => {
                problems.push(Problem::node(
                    &*def.id,
                    "`wait` is not allowed in a flow that runs as a `map` item or a subflow \
                     (only a top-level run can park); a `delay` there sleeps in place",
                ));
                None
            }
            Some(factory) => match factory.build_in(&def.params, &cx) {
                Ok(node) => Some(node),
                Err(e) => {
                    problems.push(Problem::node(&*def.id, format!("bad params: {e}")));
                    None
                }
            },
        };
        if node.is_some() && !type_names.contains_key(def.node_type.as_str()) {
            type_names.insert(def.node_type.as_str(), Arc::from(def.node_type.as_str()));
        }
        if let Some(retry) = &def.retry {
            if retry.max_attempts == 0 || retry.max_attempts > 100 {
                problems.push(Problem::node(
                    &*def.id,
                    "retry.max_attempts must be between 1 and 100",
                ));
            }
            if retry.max_backoff_ms < retry.backoff_ms {
                problems.push(Problem::node(
                    &*def.id,
                    "retry.max_backoff_ms is smaller than retry.backoff_ms",
                ));
            }
        }
        if def.timeout_ms == Some(0) {
            problems.push(Problem::node(&*def.id, "timeout_ms must be at least 1"));
        }
        built.push(node);
    }

    // Edges.
    let n = flow.nodes.len();
    let mut pairs: Vec<(usize, usize)> = Vec::with_capacity(flow.edges.len());
    let mut out_pairs: Vec<(usize, OutEdge)> = Vec::with_capacity(flow.edges.len());
    let mut pred_pairs: Vec<(usize, usize)> = Vec::with_capacity(flow.edges.len());
    let mut in_edges = vec![0usize; n];
    for (e, edge) in flow.edges.iter().enumerate() {
        let from = index.get(edge.from.as_str()).copied();
        let to = index.get(edge.to.as_str()).copied();
        if from.is_none() {
            problems.push(Problem::edge(
                e,
                format!("edge from missing node `{}`", shorten(&edge.from)),
            ));
        }
        if to.is_none() {
            problems.push(Problem::edge(
                e,
                format!("edge to missing node `{}`", shorten(&edge.to)),
            ));
        }
        let (Some(from), Some(to)) = (from, to) else {
            continue;
        };
        let port: Option<Arc<str>> = edge.port.as_deref().map(Arc::from);
        if let Some(p) = &edge.port {
            let def = &flow.nodes[from];
            if p == ERROR_PORT {
                if def.on_error != OnError::Route {
                    problems.push(Problem {
                        node: Some(def.id.clone()),
                        ..Problem::edge(
                            e,
                            "port `error` is only taken when the node's on_error is `route`",
                        )
                    });
                }
            } else if let Some(node) = &built[from]
                && !node.ports().contains(&p.as_str())
            {
                let known = node
                    .ports()
                    .iter()
                    .copied()
                    .chain([ERROR_PORT])
                    .collect::<Vec<_>>()
                    .join(", ");
                problems.push(Problem {
                    node: Some(def.id.clone()),
                    ..Problem::edge(
                        e,
                        format!(
                            "unknown port `{}` of a `{}` node (ports: {known})",
                            shorten(p),
                            def.node_type
                        ),
                    )
                });
            }
        }
        pairs.push((from, to));
        out_pairs.push((from, (port, to)));
        pred_pairs.push((to, from));
        in_edges[to] += 1;
    }

    let output = match &flow.output {
        None => None,
        Some(id) => {
            let found = index.get(id.as_str()).copied();
            if found.is_none() {
                problems.push(Problem::flow(format!(
                    "output node `{}` does not exist",
                    shorten(id)
                )));
            }
            found
        }
    };

    check_triggers(flow, &mut problems);
    if flow.settings.max_concurrency == Some(0) {
        problems.push(Problem::flow("settings.max_concurrency must be at least 1"));
    }
    if flow.settings.timeout_seconds == Some(0) {
        problems.push(Problem::flow("settings.timeout_seconds must be at least 1"));
    }
    if let Some(group) = &flow.settings.worker_group
        && !is_valid_id(group)
    {
        problems.push(Problem::flow(
            "settings.worker_group is not 1 to 64 of A-Z a-z 0-9 _ -",
        ));
    }
    if let Some(handler) = &flow.settings.on_failure
        && !is_valid_id(&handler.flow_id)
    {
        problems.push(Problem::flow(
            "settings.on_failure.flow_id is not 1 to 64 of A-Z a-z 0-9 _ -",
        ));
    }
    let (concurrency, priority) = placement_settings(flow, &mut problems);
    if let Some(retention) = &flow.settings.retention {
        if retention.days.is_some_and(|d| !(1..=36_500).contains(&d)) {
            problems.push(Problem::flow(
                "settings.retention.days must be from 1 to 36500",
            ));
        }
        if retention
            .data_days
            .is_some_and(|d| !(1..=36_500).contains(&d))
        {
            problems.push(Problem::flow(
                "settings.retention.data_days must be from 1 to 36500",
            ));
        }
        if retention.max_count == Some(0) {
            problems.push(Problem::flow(
                "settings.retention.max_count must be at least 1",
            ));
        }
    }

    // Cycles. Kahn's algorithm tells cheaply whether there is one; only then does petgraph find
    // the strongly connected components to name the nodes on each cycle.
    let out = PerNode::group(n, &out_pairs);
    let preds = PerNode::group(n, &pred_pairs);
    let order = topological_order(&out, &in_edges);
    let acyclic = order.len() == n;
    if !acyclic {
        report_cycles(n, &pairs, &ids, &mut problems);
    }

    // References of templates and expressions: known names, upstream nodes only.
    let mut refs: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, node) in built.iter().enumerate() {
        let Some(node) = node else { continue };
        let found = node.references();
        for name in &found.unknown {
            problems.push(Problem::node(
                &*ids[i],
                format!("unknown variable `{name}` (templates see `input`, `nodes`, `attempt`, `run` and `trigger`)"),
            ));
        }
        let mut wanted = Vec::new();
        for id in &found.nodes {
            match index.get(id.as_str()) {
                None => problems.push(Problem::node(
                    &*ids[i],
                    format!("refers to missing node `{id}`"),
                )),
                Some(&j) => wanted.push(j),
            }
        }
        if !wanted.is_empty() {
            refs.push((i, wanted));
        }
    }
    if acyclic {
        for (i, j) in not_upstream(&order, &preds, &out, &refs) {
            let id = &*ids[j];
            problems.push(Problem::node(
                &*ids[i],
                format!("refers to `nodes.{id}`, but `{id}` is not upstream of this node"),
            ));
        }
    }

    if !problems.is_empty() {
        return Err(CompileError::capped(problems, 0));
    }

    let sinks = (0..n).filter(|&i| out.get(i).is_empty()).collect();
    let mut signals: Vec<String> = flow
        .nodes
        .iter()
        .filter(|def| def.node_type == "wait")
        .filter_map(|def| def.params.get("signal")?.as_str().map(str::to_owned))
        .collect();
    signals.sort_unstable();
    signals.dedup();
    let nodes = flow
        .nodes
        .iter()
        .zip(built)
        .enumerate()
        .map(|(i, (def, node))| {
            let node = node.expect("no problems means every node was built");
            PlanNode {
                id: ids[i].clone(),
                node_type: type_names
                    .get(def.node_type.as_str())
                    .cloned()
                    .unwrap_or_else(|| Arc::from(def.node_type.as_str())),
                retry: def.retry.or_else(|| node.default_retry()),
                node,
                timeout: def.timeout_ms.map(Duration::from_millis),
                on_error: def.on_error,
                in_edges: in_edges[i],
            }
        })
        .collect();
    Ok(Plan(Arc::new(PlanInner {
        flow_id: flow.id.clone(),
        worker_group: flow.settings.worker_group.clone(),
        on_failure: flow.settings.on_failure.as_ref().map(|h| h.flow_id.clone()),
        concurrency,
        priority,
        nodes,
        index,
        output,
        sinks,
        timeout: flow.settings.timeout_seconds.map(Duration::from_secs),
        max_concurrency: flow.settings.max_concurrency,
        out,
        preds,
        signals,
    })))
}

/// The longest concurrency key a run's input may render, in bytes.
pub const MAX_CONCURRENCY_KEY: usize = 256;

/// The most runs a concurrency key may let execute at once.
pub const MAX_CONCURRENCY_LIMIT: u32 = 10_000;

/// `settings.concurrency` and `settings.priority`, compiled; their problems reported.
fn placement_settings(
    flow: &FlowDef,
    problems: &mut Vec<Problem>,
) -> (Option<(Template, u32)>, Option<ValueTemplate>) {
    let concurrency = flow.settings.concurrency.as_ref().and_then(|c| {
        if !(1..=MAX_CONCURRENCY_LIMIT).contains(&c.limit) {
            problems.push(Problem::flow(format!(
                "settings.concurrency.limit must be from 1 to {MAX_CONCURRENCY_LIMIT}"
            )));
        }
        match Template::compile(&c.key) {
            Ok(t) => Some((t, c.limit)),
            Err(e) => {
                problems.push(Problem::flow(format!("settings.concurrency.key: {e}")));
                None
            }
        }
    });
    let priority = flow.settings.priority.as_ref().and_then(|p| {
        let compiled = match p {
            Value::String(_) => ValueTemplate::compile(p).map_err(|e| e.to_string()),
            Value::Number(_) => {
                priority_of(p).and_then(|_| ValueTemplate::compile(p).map_err(|e| e.to_string()))
            }
            _ => Err("a number from 0 to 9 or a template".into()),
        };
        match compiled {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(Problem::flow(format!("settings.priority: {e}")));
                None
            }
        }
    });
    (concurrency, priority)
}

/// A rendered priority: a whole number from 0 to 9, or a text holding one.
fn priority_of(value: &Value) -> Result<u8, String> {
    let n = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n <= u64::from(MAX_PRIORITY) => Ok(n as u8),
        _ => Err(format!(
            "settings.priority rendered {}, not a whole number from 0 to 9",
            shorten(&value.to_string())
        )),
    }
}

/// The nodes in an order where each comes after its predecessors (Kahn's algorithm); shorter
/// than the flow when there is a cycle.
fn topological_order(out: &PerNode<OutEdge>, in_edges: &[usize]) -> Vec<usize> {
    let mut remaining = in_edges.to_vec();
    let mut stack: Vec<usize> = (0..remaining.len())
        .filter(|&i| remaining[i] == 0)
        .collect();
    let mut order = Vec::with_capacity(in_edges.len());
    while let Some(i) = stack.pop() {
        order.push(i);
        for (_, t) in out.get(i) {
            remaining[*t] -= 1;
            if remaining[*t] == 0 {
                stack.push(*t);
            }
        }
    }
    order
}

/// The references `(node, target)` of `refs` whose target is not an ancestor of the node,
/// sorted. One pass in topological order carries, for each node, the set of referenced nodes
/// above it as a bit set over the referenced nodes only; a node's set is dropped once its last
/// successor has taken it. Time O(edges x referenced / 64), memory the same times the widest
/// frontier, instead of one upward walk per node (20,000 chained nodes took 5 s).
fn not_upstream(
    order: &[usize],
    preds: &PerNode<usize>,
    out: &PerNode<OutEdge>,
    refs: &[(usize, Vec<usize>)],
) -> Vec<(usize, usize)> {
    let n = order.len();
    let mut bit: HashMap<usize, usize> = HashMap::new();
    for (_, targets) in refs {
        for &t in targets {
            let next = bit.len();
            bit.entry(t).or_insert(next);
        }
    }
    if bit.is_empty() {
        return Vec::new();
    }
    let words = bit.len().div_ceil(64);
    let mut wanted: Vec<Option<&Vec<usize>>> = vec![None; n];
    for (i, targets) in refs {
        wanted[*i] = Some(targets);
    }
    let mut successors_left: Vec<usize> = (0..n).map(|i| out.get(i).len()).collect();
    let mut above: Vec<Option<Vec<u64>>> = vec![None; n];
    let mut missing = Vec::new();
    for &i in order {
        let mut set = vec![0u64; words];
        for &p in preds.get(i) {
            if let Some(parent) = &above[p] {
                set.iter_mut().zip(parent).for_each(|(w, pw)| *w |= pw);
            }
            if let Some(&b) = bit.get(&p) {
                set[b / 64] |= 1 << (b % 64);
            }
            successors_left[p] -= 1;
            if successors_left[p] == 0 {
                above[p] = None;
            }
        }
        if let Some(targets) = wanted[i] {
            for &t in targets {
                let b = bit[&t];
                if set[b / 64] & (1 << (b % 64)) == 0 {
                    missing.push((i, t));
                }
            }
        }
        if successors_left[i] > 0 {
            above[i] = Some(set);
        }
    }
    missing.sort_unstable();
    missing.dedup();
    missing
}

/// One problem per cycle: each strongly connected component with more than one node, or a self
/// loop, named by an actual cycle through it.
fn report_cycles(
    n: usize,
    pairs: &[(usize, usize)],
    ids: &[Arc<str>],
    problems: &mut Vec<Problem>,
) {
    let mut graph: DiGraph<usize, ()> = DiGraph::with_capacity(n, pairs.len());
    let gidx: Vec<NodeIndex> = (0..n).map(|i| graph.add_node(i)).collect();
    for &(a, b) in pairs {
        graph.add_edge(gidx[a], gidx[b], ());
    }
    for scc in tarjan_scc(&graph) {
        let is_cycle = scc.len() > 1 || graph.contains_edge(scc[0], scc[0]);
        if !is_cycle {
            continue;
        }
        let path = cycle_path(&graph, &scc);
        let names: Vec<&str> = path.iter().map(|&g| &*ids[graph[g]]).collect();
        problems.push(Problem::node(
            names[0],
            format!("cycle: {}", names.join(" -> ")),
        ));
    }
}

/// One actual cycle inside a strongly connected component, starting and ending at the same node.
fn cycle_path(graph: &DiGraph<usize, ()>, scc: &[NodeIndex]) -> Vec<NodeIndex> {
    let members: HashSet<NodeIndex> = scc.iter().copied().collect();
    let start = *scc.iter().min_by_key(|g| graph[**g]).unwrap_or(&scc[0]);
    let mut path = vec![start];
    let mut seen_at: HashMap<NodeIndex, usize> = HashMap::from([(start, 0)]);
    let mut current = start;
    loop {
        // Every member of a strongly connected component has a successor inside it.
        let next = graph
            .neighbors(current)
            .filter(|g| members.contains(g))
            .min_by_key(|g| graph[*g])
            .unwrap_or(start);
        if let Some(&at) = seen_at.get(&next) {
            let mut cycle = path[at..].to_vec();
            cycle.push(next);
            return cycle;
        }
        seen_at.insert(next, path.len());
        path.push(next);
        current = next;
    }
}

fn check_triggers(flow: &FlowDef, problems: &mut Vec<Problem>) {
    let mut paths = HashSet::new();
    for trigger in &flow.triggers {
        match trigger {
            Trigger::Webhook {
                path,
                method,
                auth,
                headers,
                ..
            } => {
                if headers.len() > 50 {
                    problems.push(Problem::flow("a webhook passes at most 50 headers"));
                } else {
                    for name in headers {
                        if !is_header_name(name) {
                            problems.push(Problem::flow(format!(
                                "webhook header `{}` is not a header name",
                                shorten(name)
                            )));
                        }
                    }
                }
                if let Some(auth) = auth {
                    check_webhook_auth(auth, problems);
                }
                let ok = !path.is_empty()
                    && path.len() <= 200
                    && !path.starts_with('/')
                    && !path
                        .split('/')
                        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
                    && path
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
                if !ok {
                    problems.push(Problem::flow(format!(
                        "webhook path `{}` must be segments of A-Z a-z 0-9 - _ . separated by /",
                        shorten(path)
                    )));
                } else if path == "resume" || path.starts_with("resume/") {
                    problems.push(Problem::flow(format!(
                        "webhook path `{}`: paths under `resume/` are the resume URLs'",
                        shorten(path)
                    )));
                } else if !paths.insert((path.as_str(), method.to_ascii_uppercase())) {
                    problems.push(Problem::flow(format!(
                        "webhook path `{path}` is used twice"
                    )));
                }
                if !["GET", "POST", "PUT", "PATCH", "DELETE"]
                    .contains(&method.to_ascii_uppercase().as_str())
                {
                    problems.push(Problem::flow(format!(
                        "webhook method `{}` is not GET, POST, PUT, PATCH or DELETE",
                        shorten(method)
                    )));
                }
            }
            Trigger::Schedule { cron } => {
                if let Err(e) = parse_cron(cron) {
                    problems.push(Problem::flow(e));
                }
            }
        }
    }
}

fn check_webhook_auth(auth: &crate::model::WebhookAuth, problems: &mut Vec<Problem>) {
    use crate::model::WebhookAuth;
    if !is_valid_id(auth.credential()) {
        problems.push(Problem::flow(
            "webhook auth: `credential` is not a credential name",
        ));
    }
    let header = match auth {
        WebhookAuth::Header { name, .. } => name,
        WebhookAuth::HmacSha256 {
            header,
            timestamp_header,
            payload,
            tolerance_seconds,
            ..
        } => {
            if let Some(payload) = payload
                && (timestamp_header.is_none()
                    || !payload.contains("{body}")
                    || !payload.contains("{timestamp}"))
            {
                // Without the timestamp in what is signed, a captured call could be replayed
                // with any fresh timestamp.
                problems.push(Problem::flow(
                    "webhook auth: `payload` needs `timestamp_header` and must contain \
                     `{timestamp}` and `{body}`",
                ));
            }
            if *tolerance_seconds == 0 || *tolerance_seconds > 86_400 {
                problems.push(Problem::flow(
                    "webhook auth: `tolerance_seconds` must be between 1 and 86400",
                ));
            }
            header
        }
    };
    if !is_header_name(header) {
        problems.push(Problem::flow(format!(
            "webhook auth: `{}` is not a header name",
            shorten(header)
        )));
    }
}

/// A header name a trigger may name: 1 to 100 of A-Z a-z 0-9 - _.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Parses a 5-field cron expression (minute hour day-of-month month day-of-week).
pub fn parse_cron(cron: &str) -> Result<croner::Cron, String> {
    if cron.split_whitespace().count() != 5 {
        return Err(format!(
            "invalid cron `{}`: expected 5 fields (minute hour day month weekday)",
            shorten(cron)
        ));
    }
    croner::Cron::from_str(cron).map_err(|e| format!("invalid cron `{}`: {e}", shorten(cron)))
}

/// Keeps error messages short when the input is huge.
fn shorten(s: &str) -> String {
    shorten_to(s, 64)
}
