//! Errors of the flowcore library: one enum per concern, each with a stable `code()`.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// One problem found while checking or compiling a flow, with where it is.
///
/// Serialized as `{"node", "edge", "problem"}`, with `"path"`, `"line"` and `"column"` when
/// known: the shape of the HTTP API's `invalid_flow` details.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The id of the node the problem is about, if any.
    pub node: Option<String>,
    /// The index of the edge in `edges` the problem is about, if any.
    pub edge: Option<usize>,
    /// What is wrong, in one sentence.
    pub problem: String,
    /// The field the problem is in, as a path (`nodes[1].retry`), for a problem of the flow's
    /// shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The 1-based line of the problem in the flow's text, when the flow was read from one
    /// (see [`CompileError::locate`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// The 1-based column of the problem, in bytes, with [`line`](Self::line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
}

impl Problem {
    /// A problem with the flow as a whole.
    pub fn flow(problem: impl Into<String>) -> Self {
        Self {
            problem: problem.into(),
            ..Self::default()
        }
    }
    /// A problem with one node.
    pub fn node(node: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            node: Some(node.into()),
            problem: problem.into(),
            ..Self::default()
        }
    }
    /// A problem with one edge.
    pub fn edge(edge: usize, problem: impl Into<String>) -> Self {
        Self {
            edge: Some(edge),
            problem: problem.into(),
            ..Self::default()
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.node, self.edge) {
            (Some(node), Some(edge)) => write!(f, "node `{node}`, edge {edge}")?,
            (Some(node), None) => write!(f, "node `{node}`")?,
            (None, Some(edge)) => write!(f, "edge {edge}")?,
            (None, None) => write!(f, "flow")?,
        }
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, " (line {line}, column {column})")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// Why a flow was refused: every problem found, not only the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid flow: {}", self.problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct CompileError {
    /// The problems, in the order of the flow's nodes and edges.
    pub problems: Vec<Problem>,
}

/// The most problems a [`CompileError`] lists; past them, one more problem says how many were
/// left out. A refused flow's answer stays small however broken the flow (a 25 MB array of
/// bad edges would otherwise list millions).
pub const MAX_PROBLEMS: usize = 100;

impl CompileError {
    /// The error of `problems`, the first [`MAX_PROBLEMS`] of them, and one more saying how
    /// many are left out when there are more.
    ///
    /// ```
    /// use flowcore::{CompileError, Problem, error::MAX_PROBLEMS};
    /// let e = CompileError::capped((0..500).map(|i| Problem::edge(i, "bad")).collect(), 0);
    /// assert_eq!(e.problems.len(), MAX_PROBLEMS + 1);
    /// assert_eq!(e.problems[MAX_PROBLEMS].problem, "and 400 more problems, not listed");
    /// ```
    pub fn capped(mut problems: Vec<Problem>, more: usize) -> Self {
        let more = more + problems.len().saturating_sub(MAX_PROBLEMS);
        problems.truncate(MAX_PROBLEMS);
        if more > 0 {
            problems.push(Problem::flow(format!(
                "and {more} more problems, not listed"
            )));
        }
        Self { problems }
    }

    /// The stable error code, `invalid_flow`.
    pub fn code(&self) -> &'static str {
        "invalid_flow"
    }
}

/// A flow document that could not be read at all (not JSON, wrong types, unknown fields).
#[derive(Debug, thiserror::Error)]
#[error("invalid flow JSON at {}: {message}", self.place())]
pub struct ParseError {
    /// 1-based line of the problem (0 for a document read from a value, which has no lines).
    pub line: usize,
    /// 1-based column of the problem (0 for a document read from a value).
    pub column: usize,
    /// Where in the document, as a path (`nodes[1].params`), for a document read from a
    /// value.
    pub path: Option<String>,
    /// What serde found wrong.
    pub message: String,
    #[source]
    source: serde_json::Error,
}

impl ParseError {
    /// The place of the problem: its path, else its line and column.
    fn place(&self) -> String {
        match &self.path {
            Some(path) => format!("`{path}`"),
            None => format!("line {}, column {}", self.line, self.column),
        }
    }

    /// The error of a document read from a value, at `path`.
    pub fn at_path(path: String, source: serde_json::Error) -> Self {
        Self {
            path: Some(if path == "." { "the top".into() } else { path }),
            ..Self::from(source)
        }
    }

    /// The stable error code, `invalid_json`.
    pub fn code(&self) -> &'static str {
        "invalid_json"
    }
}

impl From<serde_json::Error> for ParseError {
    fn from(source: serde_json::Error) -> Self {
        let full = source.to_string();
        // serde_json appends " at line L column C"; we keep the position as fields instead.
        let message = match full.rfind(" at line ") {
            Some(i) => full[..i].to_owned(),
            None => full,
        };
        Self {
            line: source.line(),
            column: source.column(),
            path: None,
            message,
            source,
        }
    }
}

/// A node type refused its params at compile time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

impl ParamError {
    /// A new param error with a message naming the param.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Why one execution of a node failed. Whether a retry may help is data of the error
/// ([`NodeError::is_retryable`]), in one place per kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The node failed: retryably (a 503, a connection reset, a script's `throw`, a failed
    /// subflow: whatever a node does not know to be permanent) or not (invalid params, a 404).
    #[error("{message}")]
    Failed {
        /// What failed.
        message: String,
        /// Whether a retry may succeed.
        retryable: bool,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The node failed in a way a retry may fix, no sooner than `after` (a 429 or a 503 with
    /// `Retry-After`): the next attempt waits at least that long (retryable).
    #[error("{message}")]
    RetryAfter {
        /// What failed.
        message: String,
        /// The shortest wait before the next attempt.
        after: Duration,
    },
    /// The attempt ran past the node's `timeout_ms` (retryable).
    #[error("timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The node's output is larger than the engine's limit (not retryable).
    #[error("output is larger than the limit of {limit} bytes")]
    OutputTooLarge {
        /// The limit in force, in bytes of serialized JSON.
        limit: usize,
    },
    /// Not a failure: the node parks its run until a signal or a time (what
    /// [`NodeContext::wait_for`](crate::NodeContext::wait_for) answers in a durable execution;
    /// a node passes it on with `?`). The engine ends the execution as `waiting` once nothing
    /// else is left to do.
    #[error("waiting until {}", .0.deadline)]
    Parked(Box<crate::wait::Wait>),
    /// A `wait` ran past its `timeout_ms` without its signal (not retryable).
    #[error("no signal `{signal}` came within the wait's timeout")]
    WaitTimedOut {
        /// The signal waited for.
        signal: String,
    },
}

impl NodeError {
    /// A failure that a retry may fix.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Failed {
            message: message.into(),
            retryable: true,
            source: None,
        }
    }
    /// A failure that a retry will not fix.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self::Failed {
            message: message.into(),
            retryable: false,
            source: None,
        }
    }
    /// A failure caused by `source`.
    pub fn caused_by(
        message: impl Into<String>,
        retryable: bool,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Failed {
            message: message.into(),
            retryable,
            source: Some(Box::new(source)),
        }
    }
    /// The shortest wait before the next attempt the failure asks for (`RetryAfter`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RetryAfter { after, .. } => Some(*after),
            _ => None,
        }
    }
    /// Whether the node's `retry` policy applies to this error.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Failed { retryable, .. } => *retryable,
            Self::Timeout(_) | Self::RetryAfter { .. } => true,
            Self::OutputTooLarge { .. } | Self::Parked(_) | Self::WaitTimedOut { .. } => false,
        }
    }
    /// A stable code for the kind of failure.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Failed { .. } | Self::RetryAfter { .. } => "node_failed",
            Self::Timeout(_) => "node_timeout",
            Self::OutputTooLarge { .. } => "output_too_large",
            Self::Parked(_) => "parked",
            Self::WaitTimedOut { .. } => "timeout",
        }
    }
}

/// An error of a storage port (flows, runs, queue, blobs).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The thing asked for does not exist.
    #[error("{what} `{id}` not found")]
    NotFound {
        /// What kind of thing: "flow", "run", "blob", ...
        what: &'static str,
        /// Its id or key.
        id: String,
    },
    /// The thing exists already (a flow id taken, a unique key used).
    #[error("{0}")]
    AlreadyExists(String),
    /// A compare-and-set found another state than expected.
    #[error("{0}")]
    Conflict(String),
    /// A write came with a lease (epoch or token) that is no longer the current one.
    #[error("stale lease: {0}")]
    StaleLease(String),
    /// The input is not acceptable to the store (a bad key, a bad cursor).
    #[error("{0}")]
    Invalid(String),
    /// The data is larger than the store accepts.
    #[error("{0}")]
    TooLarge(String),
    /// The backend could not be reached or did not answer in time.
    #[error("{message}")]
    Unavailable {
        /// What was being done.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Any other backend failure.
    #[error("{message}")]
    Backend {
        /// What was being done.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl StoreError {
    /// A `NotFound` for `what` with this id.
    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound {
            what,
            id: id.into(),
        }
    }
    /// A backend failure with its source.
    pub fn backend(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Backend {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
    /// An outage of the backend with its source.
    pub fn unavailable(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
    /// A stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::AlreadyExists(_) => "already_exists",
            Self::Conflict(_) => "conflict",
            Self::StaleLease(_) => "stale_lease",
            Self::Invalid(_) => "invalid_request",
            Self::TooLarge(_) => "payload_too_large",
            Self::Unavailable { .. } => "unavailable",
            Self::Backend { .. } => "internal",
        }
    }
    /// Whether trying the same call again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// Any error of the library, for callers that do not care which step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The flow document could not be parsed.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The flow was parsed but is invalid.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// A storage port failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    /// A stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Parse(e) => e.code(),
            Self::Compile(e) => e.code(),
            Self::Store(e) => e.code(),
        }
    }
}

/// An error and its causes on one line, each cause after a colon, as a person reads them:
/// `connecting to postgres://…: error connecting to server: Connection refused (os error
/// 111)`. A cause whose text is already in the line is not repeated.
///
/// ```
/// let e = std::io::Error::other("disk full");
/// assert_eq!(flowcore::error::causes(&e), "disk full");
/// ```
pub fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    // Bounded: chains are short, and a cycle must not loop.
    for _ in 0..8 {
        let Some(c) = cause else { break };
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}
