//! Usage per flow and day (runs, node executions, tokens), counted in memory and added to the
//! database once a second, so that counting costs a run no extra commit. A process that dies
//! loses at most its last second of counts (usage, never runs). Quotas read the stored counts
//! (refreshed at most once a second) plus this process's unflushed ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use flowcore::ports::{UsageDay, UsageQuery, UsageStore};
use flowcore::{EventSink, RunEvent, StepStatus, StoreError};

/// How often counts are added to the database.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

type Key = (String, String);
type Day = chrono::NaiveDate;

#[derive(Debug, Default, Clone)]
struct Counts {
    runs: u64,
    nodes: u64,
    /// LLM tokens (`tokens`, and by model).
    tokens: UsageDay,
}

/// The longest model name usage and metrics keep (a longer one is cut: it comes from a model
/// server).
const MAX_MODEL_NAME: usize = 200;

/// Models a flow's day counts by name in one process's pending counts; more count as `other`.
const MAX_MODELS_A_DAY: usize = 20;

/// `model` cut to [`MAX_MODEL_NAME`] bytes.
pub fn model_name(model: &str) -> &str {
    let mut end = model.len().min(MAX_MODEL_NAME);
    while !model.is_char_boundary(end) {
        end -= 1;
    }
    &model[..end]
}

/// A flow's stored counts of a day, for quotas.
#[derive(Debug, Default, Clone, Copy)]
struct Stored {
    runs: u64,
    tokens: u64,
}

/// The usage counter of one process.
pub struct Usage {
    store: Arc<dyn UsageStore>,
    /// Not yet stored, by day then flow (looked up without allocating on every count).
    pending: Mutex<HashMap<Day, HashMap<String, Counts>>>,
    /// Runs and tokens stored per (flow, day), as read at an instant, for quotas.
    stored: Mutex<HashMap<Key, (Stored, Instant)>>,
}

/// Today (UTC) as `YYYY-MM-DD`.
pub fn today() -> String {
    Utc::now().format("%Y-%m-%d").to_string()
}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage").finish_non_exhaustive()
    }
}

impl Usage {
    /// A counter writing to `store`.
    pub fn new(store: Arc<dyn UsageStore>) -> Self {
        Self {
            store,
            pending: Mutex::new(HashMap::new()),
            stored: Mutex::new(HashMap::new()),
        }
    }

    fn add(&self, flow_id: &str, f: impl FnOnce(&mut Counts)) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let flows = pending.entry(Utc::now().date_naive()).or_default();
        match flows.get_mut(flow_id) {
            Some(counts) => f(counts),
            None => f(flows.entry(flow_id.to_owned()).or_default()),
        }
    }

    /// Counts a run started now.
    pub fn run_started(&self, flow_id: &str) {
        self.add(flow_id, |c| c.runs += 1);
    }

    /// Counts LLM tokens of `model` used now.
    pub fn tokens(&self, flow_id: &str, model: &str, prompt: u64, completion: u64) {
        let model = model_name(model);
        self.add(flow_id, |c| {
            // The server names the model: a flow's day counts a few by name, the rest as one.
            let known = c.tokens.models.iter().any(|m| m.model == model);
            let model = if known || c.tokens.models.len() < MAX_MODELS_A_DAY {
                model
            } else {
                "other"
            };
            c.tokens.add_tokens(model, prompt, completion);
        });
    }

    /// Wraps a run's event sink to count its node executions (steps that ran: succeeded or
    /// failed, not skipped or cancelled), those inside `map` items too, and its LLM tokens.
    pub fn node_sink(
        self: &Arc<Self>,
        flow_id: &str,
        inner: Arc<dyn EventSink>,
    ) -> Arc<dyn EventSink> {
        let (usage, flow_id) = (self.clone(), flow_id.to_owned());
        Arc::new(move |event: &RunEvent| {
            match event {
                RunEvent::NodeFinished {
                    status: StepStatus::Succeeded | StepStatus::Failed,
                    ..
                } => {
                    usage.add(&flow_id, |c| c.nodes += 1);
                }
                RunEvent::ItemsDone { executions, .. } if *executions > 0 => {
                    usage.add(&flow_id, |c| c.nodes += executions);
                }
                RunEvent::LlmUsage {
                    model,
                    prompt_tokens,
                    completion_tokens,
                    ..
                } => usage.tokens(&flow_id, model, *prompt_tokens, *completion_tokens),
                _ => {}
            }
            inner.emit(event);
        })
    }

    /// Adds the pending counts to the database. Counts that fail to store are kept for the next
    /// flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut failed = None;
        for (day, flow, c) in taken
            .into_iter()
            .flat_map(|(day, flows)| flows.into_iter().map(move |(flow, c)| (day, flow, c)))
        {
            let add = UsageDay {
                flow_id: flow.clone(),
                day: day.format("%Y-%m-%d").to_string(),
                runs: c.runs,
                node_executions: c.nodes,
                tokens: c.tokens.tokens,
                models: c.tokens.models.clone(),
            };
            if let Err(e) = self.store.add_usage(&add).await {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let slot = pending.entry(day).or_default().entry(flow).or_default();
                slot.runs += c.runs;
                slot.nodes += c.nodes;
                for m in &c.tokens.models {
                    slot.tokens
                        .add_tokens(&m.model, m.prompt_tokens, m.completion_tokens);
                }
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Runs of `flow_id` today across all processes, as of at most [`FLUSH_EVERY`] ago, plus
    /// this process's unflushed ones.
    pub async fn runs_today(&self, flow_id: &str) -> Result<u64, StoreError> {
        let stored = self.stored_today(flow_id).await?.runs;
        Ok(stored.saturating_add(self.pending_today(flow_id, |c| c.runs)))
    }

    /// LLM tokens of `flow_id` today across all processes, as [`Usage::runs_today`].
    pub async fn tokens_today(&self, flow_id: &str) -> Result<u64, StoreError> {
        let stored = self.stored_today(flow_id).await?.tokens;
        Ok(stored.saturating_add(self.pending_today(flow_id, |c| c.tokens.tokens)))
    }

    /// This process's unflushed count of `flow_id` today.
    fn pending_today(&self, flow_id: &str, count: impl Fn(&Counts) -> u64) -> u64 {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&Utc::now().date_naive())
            .and_then(|flows| flows.get(flow_id))
            .map_or(0, count)
    }

    /// The stored counts of `flow_id` today, read at most once per [`FLUSH_EVERY`].
    async fn stored_today(&self, flow_id: &str) -> Result<Stored, StoreError> {
        let key = (flow_id.to_owned(), today());
        let cached = self
            .stored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .filter(|(_, at)| at.elapsed() < FLUSH_EVERY)
            .map(|(n, _)| *n);
        if let Some(stored) = cached {
            return Ok(stored);
        }
        let stored = self
            .store
            .usage(&UsageQuery {
                flow_id: Some(flow_id.to_owned()),
                from_day: key.1.clone(),
                to_day: key.1.clone(),
            })
            .await?
            .first()
            .map_or_else(Stored::default, |d| Stored {
                runs: d.runs,
                tokens: d.tokens,
            });
        let mut cache = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        // Yesterday's entries are of no use any more.
        cache.retain(|(_, day), _| *day == key.1);
        cache.insert(key, (stored, Instant::now()));
        Ok(stored)
    }

    /// Flushes every [`FLUSH_EVERY`] until `shutdown`, then once more.
    pub async fn run_flusher(self: Arc<Self>, shutdown: flowcore::CancellationToken) {
        loop {
            let stop = tokio::select! {
                () = shutdown.cancelled() => true,
                () = tokio::time::sleep(FLUSH_EVERY) => false,
            };
            if let Err(e) = self.flush().await {
                tracing::warn!(error = %e, "storing usage failed; kept for the next try");
            }
            if stop {
                return;
            }
        }
    }
}
