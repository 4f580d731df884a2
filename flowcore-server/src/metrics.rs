//! Prometheus metrics with the names docs/deployment.md lists (prometheus-client), plus process memory and CPU
//! read from `/proc` at scrape time.

use std::sync::Arc;

use flowcore::{EventSink, Plan, RunEvent};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node_type: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    kind: &'static str,
}

/// Distinct `model` labels of `flowcore_llm_tokens_total`; more are counted as `other` (a
/// model name comes from a flow or a model server: unbounded labels would grow the
/// registry and every scrape).
const MAX_MODEL_LABELS: usize = 100;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<RouteLabels, Histogram>,
    runs: Family<StatusLabels, Counter>,
    run_duration: Histogram,
    nodes: Family<NodeLabels, Counter>,
    queue_depth: Family<GroupLabels, Gauge>,
    llm_tokens: Family<TokenLabels, Counter>,
    models: std::sync::Mutex<std::collections::HashSet<String>>,
    in_flight: Gauge,
    parked: Counter,
    pruned: Counter,
    archived: Counter,
    data_dropped: Counter,
    archive_lag: Gauge,
    database_bytes: Gauge,
    sqlite_memory: Gauge,
    memory: Gauge,
    cpu_millis: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let runs = Family::<StatusLabels, Counter>::default();
        let run_duration = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        let nodes = Family::<NodeLabels, Counter>::default();
        let queue_depth = Family::<GroupLabels, Gauge>::default();
        let llm_tokens = Family::<TokenLabels, Counter>::default();
        let in_flight = Gauge::default();
        let parked = Counter::default();
        let pruned = Counter::default();
        let archived = Counter::default();
        let data_dropped = Counter::default();
        let archive_lag = Gauge::default();
        let database_bytes = Gauge::default();
        let sqlite_memory = Gauge::default();
        let memory = Gauge::default();
        let cpu_millis = Gauge::default();
        registry.register(
            "flowcore_http_requests",
            "HTTP requests",
            http_requests.clone(),
        );
        registry.register(
            "flowcore_http_request_duration_seconds",
            "HTTP request duration",
            http_duration.clone(),
        );
        registry.register("flowcore_runs", "Finished runs by status", runs.clone());
        registry.register(
            "flowcore_run_duration_seconds",
            "Run duration",
            run_duration.clone(),
        );
        registry.register(
            "flowcore_node_executions",
            "Node executions by type and status",
            nodes.clone(),
        );
        registry.register(
            "flowcore_queue_depth",
            "Jobs ready in the worker group's queue",
            queue_depth.clone(),
        );
        registry.register(
            "flowcore_runs_in_flight",
            "Runs executing in this process",
            in_flight.clone(),
        );
        registry.register(
            "flowcore_runs_parked",
            "Runs that parked (a wait, a long delay) after executing here",
            parked.clone(),
        );
        registry.register(
            "flowcore_runs_pruned",
            "Finished runs deleted by retention (by this process)",
            pruned.clone(),
        );
        registry.register(
            "flowcore_runs_archived",
            "Runs written to the archive before retention deleted them (by this process)",
            archived.clone(),
        );
        registry.register(
            "flowcore_runs_data_dropped",
            "Finished runs whose data retention dropped, keeping their summary (by this process)",
            data_dropped.clone(),
        );
        registry.register(
            "flowcore_archive_lag_seconds",
            "How long the oldest run past its retention has waited to be archived and deleted",
            archive_lag.clone(),
        );
        registry.register(
            "flowcore_database_bytes",
            "The database's size as last measured (once a minute, by the retention pass)",
            database_bytes.clone(),
        );
        registry.register(
            "flowcore_llm_tokens",
            "LLM tokens used by llm_chat nodes, by model and kind (prompt, completion)",
            llm_tokens.clone(),
        );
        registry.register(
            "flowcore_sqlite_memory_bytes",
            "Memory SQLite holds in this process (page caches, statements); 0 without SQLite",
            sqlite_memory.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of this process",
            memory.clone(),
        );
        registry.register(
            "process_cpu_milliseconds",
            "CPU time used by this process (user + system)",
            cpu_millis.clone(),
        );
        Self {
            registry,
            http_requests,
            http_duration,
            runs,
            run_duration,
            nodes,
            queue_depth,
            llm_tokens,
            models: std::sync::Mutex::default(),
            in_flight,
            parked,
            pruned,
            archived,
            data_dropped,
            archive_lag,
            database_bytes,
            sqlite_memory,
            memory,
            cpu_millis,
        }
    }

    /// Tokens one model call used.
    pub fn llm_tokens(&self, model: &str, prompt: u64, completion: u64) {
        let model = crate::usage::model_name(model);
        let model = {
            let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
            if models.contains(model) || models.len() < MAX_MODEL_LABELS {
                models.insert(model.to_owned());
                model.to_owned()
            } else {
                "other".to_owned()
            }
        };
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            self.llm_tokens
                .get_or_create(&TokenLabels {
                    model: model.clone(),
                    kind,
                })
                .inc_by(n);
        }
    }

    /// Runs deleted by retention.
    pub fn runs_pruned(&self, n: usize) {
        self.pruned.inc_by(n as u64);
    }

    /// Runs archived.
    pub fn runs_archived(&self, n: usize) {
        self.archived.inc_by(n as u64);
    }

    /// Runs whose data was dropped.
    pub fn runs_data_dropped(&self, n: usize) {
        self.data_dropped.inc_by(n as u64);
    }

    /// How long the oldest run due for deletion has waited.
    pub fn archive_lag(&self, lag: std::time::Duration) {
        self.archive_lag
            .set(i64::try_from(lag.as_secs()).unwrap_or(i64::MAX));
    }

    /// The database's size.
    pub fn database_bytes(&self, bytes: u64) {
        self.database_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Counts and times a request by its route template (never the raw path: bounded labels).
    pub fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let (method, route) = (method.to_owned(), route.to_owned());
        self.http_requests
            .get_or_create(&HttpLabels {
                method: method.clone(),
                route: route.clone(),
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels { method, route })
            .observe(seconds);
    }

    /// A run started executing here.
    pub fn run_started(&self) {
        self.in_flight.inc();
    }

    /// A run stopped executing here without ending: it parked, or was handed back.
    pub fn run_left(&self, status: flowcore::RunStatus) {
        self.in_flight.dec();
        if status == flowcore::RunStatus::Waiting {
            self.parked.inc();
        }
    }

    /// A run finished executing here.
    pub fn run_finished(&self, status: flowcore::RunStatus, seconds: f64) {
        self.in_flight.dec();
        self.runs
            .get_or_create(&StatusLabels {
                status: status.as_str().to_owned(),
            })
            .inc();
        self.run_duration.observe(seconds);
    }

    /// Counts node executions and LLM tokens of a run from its events.
    pub fn node_sink(
        self: &Arc<Self>,
        plan: &Plan,
        inner: Arc<dyn EventSink>,
    ) -> Arc<dyn EventSink> {
        let (metrics, plan) = (self.clone(), plan.clone());
        Arc::new(move |event: &RunEvent| {
            match event {
                RunEvent::NodeFinished { node, status, .. } => {
                    if let Some(i) = plan.index_of(node) {
                        let labels = NodeLabels {
                            node_type: plan.node_type(i).to_owned(),
                            status: status.as_str().to_owned(),
                        };
                        metrics.nodes.get_or_create(&labels).inc();
                    }
                }
                // Accounting only: not one of the run's streamed events.
                RunEvent::LlmUsage {
                    model,
                    prompt_tokens,
                    completion_tokens,
                    ..
                } => {
                    metrics.llm_tokens(model, *prompt_tokens, *completion_tokens);
                    return;
                }
                _ => {}
            }
            inner.emit(event);
        })
    }

    /// The text exposition, with the queue depth and process figures read now.
    pub fn render(&self, queue_ready: Option<(&str, u64)>) -> String {
        if let Some((group, ready)) = queue_ready {
            self.queue_depth
                .get_or_create(&GroupLabels {
                    group: group.to_owned(),
                })
                .set(i64::try_from(ready).unwrap_or(i64::MAX));
        }
        if let Some((rss, cpu_ms)) = process_figures() {
            self.memory.set(rss);
            self.cpu_millis.set(cpu_ms);
        }
        self.sqlite_memory
            .set(i64::try_from(flowcore_store::sql::sqlite_memory_bytes()).unwrap_or(i64::MAX));
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Resident memory (bytes) and CPU time (ms) from /proc (Linux); `None` elsewhere.
fn process_figures() -> Option<(i64, i64)> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces, so split after the last ')').
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: i64 = fields.get(11)?.parse::<i64>().ok()? + fields.get(12)?.parse::<i64>().ok()?;
    let page = i64::try_from(rustix::param::page_size()).ok()?;
    let per_second = i64::try_from(rustix::param::clock_ticks_per_second())
        .ok()?
        .max(1);
    Some((pages * page, ticks * 1000 / per_second))
}
