//! The flow definition: the JSON document users write (docs/flows.md).
//!
//! Every struct refuses unknown fields, so a typo such as `"on_eror"` is an error, not a silently
//! ignored setting.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{CompileError, MAX_PROBLEMS, ParseError, Problem};

/// A flow: nodes, the edges between them, and how it is triggered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowDef {
    /// `[A-Za-z0-9_-]{1,64}`; optional on create, the server assigns one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A human name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A longer description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The steps.
    pub nodes: Vec<NodeDef>,
    /// The wiring between steps.
    #[serde(default)]
    pub edges: Vec<EdgeDef>,
    /// The node whose output is the run's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// What starts the flow besides the API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<Trigger>,
    /// Run-wide settings.
    #[serde(default, skip_serializing_if = "Settings::is_empty")]
    pub settings: Settings,
}

impl FlowDef {
    /// Parses a flow from JSON text, refusing unknown fields.
    ///
    /// ```
    /// let flow = flowcore::FlowDef::from_json(r#"{"nodes": [{"id": "a", "type": "noop"}]}"#).unwrap();
    /// assert_eq!(flow.nodes[0].id, "a");
    /// assert!(flowcore::FlowDef::from_json(r#"{"nodes": [], "nodez": 1}"#).is_err());
    /// ```
    pub fn from_json(text: &str) -> Result<Self, ParseError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Parses a flow from JSON bytes (which must be UTF-8).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ParseError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Reads a flow from an already parsed JSON value; an error names the field's path
    /// (`nodes[0].params`), as a value has no lines.
    pub fn from_value(value: Value) -> Result<Self, ParseError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ParseError::at_path(path, e.into_inner())
        })
    }

    /// Reads a flow from a parsed JSON value, reporting every problem of its shape at once
    /// (an unknown field, a wrong type, a missing field): each node, edge and trigger is read
    /// on its own, so a typo in one does not hide another's. Each problem starts with its
    /// field path; a node's problem names the node (when it has an id), an edge's its index.
    ///
    /// ```
    /// use flowcore::FlowDef;
    /// let flow = serde_json::json!({"nodes": [
    ///     {"id": "a", "type": "noop", "retyr": {}},
    ///     {"id": "b", "type": "noop", "on_eror": "continue"}
    /// ]});
    /// let problems = FlowDef::from_value_all(flow).unwrap_err().problems;
    /// assert_eq!(problems.len(), 2);
    /// assert_eq!(problems[1].node.as_deref(), Some("b"));
    /// assert!(problems[1].problem.starts_with("`nodes[1]"));
    /// assert!(problems[1].problem.contains("unknown field `on_eror`"));
    /// ```
    pub fn from_value_all(value: Value) -> Result<Self, CompileError> {
        let Value::Object(mut top) = value else {
            return Err(CompileError {
                problems: vec![Problem::flow("the flow must be a JSON object")],
            });
        };
        let len = |field: &str| top.get(field).and_then(Value::as_array).map_or(0, Vec::len);
        if let Some(problem) = too_many(len("nodes"), len("edges"), len("triggers")) {
            return Err(CompileError {
                problems: vec![problem],
            });
        }
        let mut problems = Problems::default();
        let nodes = read_each::<NodeDef>(&mut top, "nodes", &mut problems);
        let edges = read_each::<EdgeDef>(&mut top, "edges", &mut problems);
        let triggers = read_each::<Trigger>(&mut top, "triggers", &mut problems);
        let rest: Result<Self, _> = serde_path_to_error::deserialize(Value::Object(top));
        let mut flow = match rest {
            Ok(flow) => flow,
            Err(e) => {
                problems
                    .listed
                    .insert(0, at(e.path().to_string(), e.into_inner()));
                return Err(CompileError::capped(problems.listed, problems.more));
            }
        };
        if !problems.listed.is_empty() {
            return Err(CompileError::capped(problems.listed, problems.more));
        }
        flow.nodes = nodes.unwrap_or(flow.nodes);
        flow.edges = edges.unwrap_or(flow.edges);
        flow.triggers = triggers.unwrap_or(flow.triggers);
        Ok(flow)
    }
}

/// The most nodes a flow may have.
pub const MAX_NODES: usize = 20_000;

/// The most edges a flow may have.
pub const MAX_EDGES: usize = 100_000;

/// The most triggers a flow may have.
pub const MAX_TRIGGERS: usize = 1_000;

/// The problem of a flow with more nodes, edges or triggers than a flow may have.
pub(crate) fn too_many(nodes: usize, edges: usize, triggers: usize) -> Option<Problem> {
    (nodes > MAX_NODES || edges > MAX_EDGES || triggers > MAX_TRIGGERS).then(|| {
        Problem::flow(format!(
            "a flow has at most {MAX_NODES} nodes, {MAX_EDGES} edges and {MAX_TRIGGERS} \
             triggers (this one: {nodes}, {edges} and {triggers})"
        ))
    })
}

/// `s`, cut to at most `max` bytes (at a character boundary) and marked `...` when cut: a name
/// or a message quoting its input stays small in an error.
pub(crate) fn shorten_to(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// The problem `` `path`: what serde said `` at `path`, as [`ParseError::at_path`] places and
/// words it; both cut short, as serde quotes the input (an unknown field's name) in full.
fn at(path: String, e: serde_json::Error) -> Problem {
    let e = ParseError::at_path(path, e);
    let path = shorten_to(&e.path.unwrap_or_default(), 128);
    Problem {
        problem: format!("`{path}`: {}", shorten_to(&e.message, 512)),
        path: Some(path),
        ..Problem::default()
    }
}

/// The problems of a flow's shape: the first [`MAX_PROBLEMS`] kept, the others only counted,
/// so that a flow of a million bad elements costs no more memory than its first ones.
#[derive(Default)]
struct Problems {
    listed: Vec<Problem>,
    more: usize,
}

impl Problems {
    fn push(&mut self, problem: Problem) {
        if self.listed.len() < MAX_PROBLEMS {
            self.listed.push(problem);
        } else {
            self.more += 1;
        }
    }
}

/// Reads the array `field` of `top` element by element, each problem at its own path, and
/// leaves an empty array in its place (the rest of the flow is read apart). `None` when the
/// field is missing or not an array: the read of the whole reports that.
fn read_each<T: serde::de::DeserializeOwned>(
    top: &mut serde_json::Map<String, Value>,
    field: &str,
    problems: &mut Problems,
) -> Option<Vec<T>> {
    let Some(Value::Array(items)) = top.get_mut(field) else {
        return None;
    };
    let items = std::mem::take(items);
    let mut read = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let id = item
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| is_valid_id(id))
            .map(str::to_owned);
        match serde_path_to_error::deserialize::<_, T>(item) {
            Ok(t) => read.push(t),
            Err(e) => {
                let inner = e.path().to_string();
                let path = if inner == "." {
                    format!("{field}[{i}]")
                } else {
                    format!("{field}[{i}].{inner}")
                };
                problems.push(Problem {
                    node: if field == "nodes" { id } else { None },
                    edge: (field == "edges").then_some(i),
                    ..at(path, e.into_inner())
                });
            }
        }
    }
    Some(read)
}

/// One step of a flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeDef {
    /// Unique in the flow, `[A-Za-z0-9_-]{1,64}`.
    pub id: String,
    /// The registered node type, such as `set` or `http_request`.
    #[serde(rename = "type")]
    pub node_type: String,
    /// The node type's parameters.
    #[serde(default = "empty_object", skip_serializing_if = "is_empty_object")]
    pub params: Value,
    /// Retries of a failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// The limit of one attempt, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// What a failure of this node does to the run.
    #[serde(default, skip_serializing_if = "OnError::is_fail")]
    pub on_error: OnError,
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

fn is_empty_object(v: &Value) -> bool {
    v.as_object().is_some_and(serde_json::Map::is_empty)
}

/// Exponential backoff with jitter between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    #[serde(default = "RetryPolicy::default_max_attempts")]
    pub max_attempts: u32,
    /// The wait before the second attempt; it doubles for each further one.
    #[serde(default = "RetryPolicy::default_backoff_ms")]
    pub backoff_ms: u64,
    /// The longest wait between two attempts.
    #[serde(default = "RetryPolicy::default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

impl RetryPolicy {
    fn default_max_attempts() -> u32 {
        3
    }
    fn default_backoff_ms() -> u64 {
        100
    }
    fn default_max_backoff_ms() -> u64 {
        10_000
    }

    /// The wait before attempt `next_attempt` (2 for the first retry): `backoff_ms * 2^(n-2)`,
    /// capped at `max_backoff_ms`, with "equal jitter" (half fixed, half random) so that many
    /// runs failing together do not retry in lockstep.
    pub fn backoff(&self, next_attempt: u32) -> std::time::Duration {
        let exp = next_attempt.saturating_sub(2).min(32);
        let base = self
            .backoff_ms
            .saturating_mul(1u64 << exp)
            .min(self.max_backoff_ms);
        let half = base / 2;
        let jitter = if half == 0 {
            0
        } else {
            fastrand::u64(0..=half)
        };
        std::time::Duration::from_millis(base - half + jitter)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: Self::default_max_attempts(),
            backoff_ms: Self::default_backoff_ms(),
            max_backoff_ms: Self::default_max_backoff_ms(),
        }
    }
}

/// What a node's failure does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The run fails (the default).
    #[default]
    Fail,
    /// The node's output becomes `{"error": "..."}` and the run goes on.
    Continue,
    /// The error object goes out of the node's `error` port; its other ports are not taken.
    Route,
}

impl OnError {
    fn is_fail(&self) -> bool {
        *self == Self::Fail
    }
}

/// A wire from one node (optionally one of its ports) to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeDef {
    /// The source node's id.
    pub from: String,
    /// The target node's id.
    pub to: String,
    /// The source's port; the main output when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
}

/// What starts a flow besides the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Trigger {
    /// An HTTP call to `/webhooks/{path}`.
    Webhook {
        /// The path after `/webhooks/`.
        path: String,
        /// The HTTP method, POST by default.
        #[serde(default = "default_method")]
        method: String,
        /// `sync` answers with the run's output, `async` with its id.
        #[serde(default)]
        mode: WebhookMode,
        /// What a caller must prove (a token in a header, or an HMAC signature of the body);
        /// none: anyone who knows the path may call it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth: Option<WebhookAuth>,
        /// Request headers passed to templates as `trigger.headers` (lowercase names).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<String>,
    },
    /// A cron schedule.
    Schedule {
        /// A 5-field cron expression.
        cron: String,
    },
}

fn default_method() -> String {
    "POST".to_owned()
}

/// How a webhook caller proves who it is. The secret is the `token` of a `bearer` credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WebhookAuth {
    /// The header `name` carries the token.
    Header {
        /// The header's name.
        name: String,
        /// The credential whose token it must equal.
        credential: String,
    },
    /// The header `header` carries the hex HMAC-SHA256 of the signed payload, after `prefix`
    /// (GitHub: `x-hub-signature-256`, `sha256=`). With `timestamp_header` the payload is
    /// `payload` with `{timestamp}` and `{body}` filled in (default `{timestamp}.{body}`; Slack:
    /// `v0:{timestamp}:{body}` with prefix `v0=`), and a timestamp further than
    /// `tolerance_seconds` from now is refused. When the timestamp and the signature share one
    /// header (Stripe's `stripe-signature: t=...,v1=...`), name it in both: `t` and `v1` are
    /// read from it.
    HmacSha256 {
        /// The header with the signature.
        header: String,
        /// Text before the hex signature.
        #[serde(default)]
        prefix: String,
        /// The credential whose token is the key.
        credential: String,
        /// The header with the time of signing, in Unix seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timestamp_header: Option<String>,
        /// How far the timestamp may be from now (300 s).
        #[serde(default = "default_tolerance")]
        tolerance_seconds: u64,
        /// What is signed when there is a timestamp.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload: Option<String>,
    },
}

fn default_tolerance() -> u64 {
    300
}

impl WebhookAuth {
    /// The credential it checks against.
    pub fn credential(&self) -> &str {
        match self {
            Self::Header { credential, .. } | Self::HmacSha256 { credential, .. } => credential,
        }
    }
}

/// Whether a webhook call waits for the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookMode {
    /// Wait for the run (up to the webhook timeout) and answer with its output.
    #[default]
    Sync,
    /// Answer at once with the run id.
    Async,
}

/// Run-wide settings of a flow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The run's time limit; the engine's limit (600 s by default) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// How many nodes of one run may execute at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<usize>,
    /// The worker group whose queue runs this flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_group: Option<String>,
    /// How long the flow's finished runs are kept, instead of the server's retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// The flow whose run starts when a run of this one ends `failed` or `timed_out`, instead
    /// of the server's (`FLOWCORE_ON_FAILURE_FLOW`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
    /// At most `limit` runs of the flow with the same key execute at once, across every
    /// worker; the others stay queued, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    /// The runs' priority in the queue: 0 to 9 (9 first), or a template rendering one from the
    /// input; 5 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Value>,
}

/// A flow's concurrency key (`settings.concurrency`).
///
/// ```
/// let flow = flowcore::FlowDef::from_json(r#"{"nodes": [{"id": "a", "type": "noop"}],
///     "settings": {"concurrency": {"key": "{{ input.tenant }}", "limit": 2}}}"#).unwrap();
/// assert_eq!(flow.settings.concurrency.unwrap().limit, 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// A template rendered from the run's input when the run is created.
    pub key: String,
    /// Runs with the same key at once, at most (1 to 10,000).
    pub limit: u32,
}

/// A flow's failure handler (`settings.on_failure`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnFailure {
    /// The handler flow's id.
    pub flow_id: String,
}

/// How long a flow's finished runs are kept (`settings.retention`): each field replaces the
/// server's (`FLOWCORE_RUN_RETENTION_DAYS`, `FLOWCORE_RUN_RETENTION_MAX_COUNT`). Queued,
/// running and waiting runs are never pruned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Finished runs older than this many days are pruned (1 to 36,500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<u32>,
    /// At most this many finished runs are kept, the newest (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_count: Option<u64>,
    /// The data (input, output, trigger and steps) of runs that finished more than this many
    /// days ago is dropped, their summary (status, timings, error) kept until `days` (1 to
    /// 36,500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_days: Option<u32>,
}

impl Settings {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Whether `id` is a valid flow or node id: `[A-Za-z0-9_-]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
