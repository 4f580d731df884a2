//! Webhook paths to flows: the index of every flow's webhook triggers, kept fresh across
//! processes, and the check of a caller against a trigger's `auth`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method, StatusCode};
use flowcore::ports::{FlowChanges, FlowStore};
use flowcore::secret::SecretSource;
use flowcore::{FlowDef, Trigger, WebhookAuth, WebhookMode};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::credentials::Credentials;
use crate::error::ApiError;

/// What a webhook path runs, and how.
#[derive(Debug)]
pub struct Hook {
    /// The flow it starts.
    pub flow_id: String,
    /// Whether the caller waits for the run's end.
    pub mode: WebhookMode,
    /// What a caller must prove.
    pub auth: Option<WebhookAuth>,
    /// The headers passed to the run as `trigger.headers` (lowercase).
    pub headers: Vec<String>,
}

type Routes = Arc<HashMap<(String, String), Arc<Hook>>>;

/// Webhook paths to flows, rebuilt from the flow store after any flow changes (in any process).
#[derive(Debug, Default)]
pub struct WebhookIndex {
    map: RwLock<Option<(Instant, Routes)>>,
    /// One rebuild at a time: concurrent misses wait for it and use its result.
    rebuilding: tokio::sync::Mutex<()>,
    /// Counts invalidations: a rebuild that read the flows before the latest one is not kept
    /// (it may miss the change, such as a webhook's new `auth`).
    generation: std::sync::atomic::AtomicU64,
}

/// How old an index may be before a miss looks at the flows again (a flow created a moment
/// ago in another process may not have been announced yet).
const FRESH: Duration = Duration::from_secs(1);

impl WebhookIndex {
    /// An index that marks itself stale on every announced flow change.
    pub fn new(changes: &Arc<dyn FlowChanges>) -> Arc<Self> {
        let index = Arc::new(Self::default());
        let mut rx = changes.subscribe();
        let weak = Arc::downgrade(&index);
        tokio::spawn(async move {
            loop {
                let closed = matches!(
                    rx.recv().await,
                    Err(tokio::sync::broadcast::error::RecvError::Closed)
                );
                let Some(index) = weak.upgrade() else { return };
                index.invalidate();
                if closed {
                    return;
                }
            }
        });
        index
    }

    /// Forgets the index; the next lookup rebuilds it.
    pub fn invalidate(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *self
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    fn current(&self) -> Option<(Instant, Routes)> {
        self.map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The hook of `method` and `path`. A miss looks at the flows again at most once a second,
    /// and concurrent misses share that look: unknown paths cannot make the server read every
    /// flow on each request.
    pub async fn lookup(
        &self,
        flows: &dyn FlowStore,
        method: &str,
        path: &str,
    ) -> Result<Option<Arc<Hook>>, ApiError> {
        let key = (method.to_owned(), path.to_owned());
        if let Some((built, routes)) = self.current() {
            if let Some(hook) = routes.get(&key) {
                return Ok(Some(hook.clone()));
            }
            if built.elapsed() < FRESH {
                return Ok(None);
            }
        }
        let _one = self.rebuilding.lock().await;
        if let Some((built, routes)) = self.current()
            && built.elapsed() < FRESH
        {
            return Ok(routes.get(&key).cloned());
        }
        Ok(self.rebuild(flows).await?.get(&key).cloned())
    }

    async fn rebuild(&self, flows: &dyn FlowStore) -> Result<Routes, ApiError> {
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let mut map = HashMap::new();
        for flow in flowcore::ports::all_flows(flows).await? {
            for trigger in flow.definition.triggers {
                if let Trigger::Webhook {
                    path,
                    method,
                    mode,
                    auth,
                    headers,
                } = trigger
                {
                    let hook = Hook {
                        flow_id: flow.id.clone(),
                        mode,
                        auth,
                        headers: headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
                    };
                    map.insert((method.to_ascii_uppercase(), path), Arc::new(hook));
                }
            }
        }
        let routes: Routes = Arc::new(map);
        let mut current = self
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.generation.load(std::sync::atomic::Ordering::SeqCst) == generation {
            *current = Some((Instant::now(), routes.clone()));
        }
        Ok(routes)
    }

    /// Refuses (409 `conflict`) a flow whose webhook path and method another flow has. Looks
    /// at the flows as stored now.
    pub async fn check_free(&self, flows: &dyn FlowStore, flow: &FlowDef) -> Result<(), ApiError> {
        let wanted: Vec<(String, String)> = flow
            .triggers
            .iter()
            .filter_map(|t| match t {
                Trigger::Webhook { path, method, .. } => {
                    Some((method.to_ascii_uppercase(), path.clone()))
                }
                Trigger::Schedule { .. } => None,
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let _one = self.rebuilding.lock().await;
        let routes = self.rebuild(flows).await?;
        for key in wanted {
            if let Some(hook) = routes.get(&key)
                && Some(&hook.flow_id) != flow.id.as_ref()
            {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!(
                        "flow `{}` already has a {} webhook at `{}`",
                        hook.flow_id, key.0, key.1
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a caller against the hook's `auth`: 401 `unauthorized` when it does not prove it.
pub async fn authenticate(
    credentials: &Credentials,
    auth: &WebhookAuth,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), ApiError> {
    let refuse = |why: &str| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("this webhook needs {why}"),
        )
    };
    let secret = match credentials.secret(auth.credential()).await {
        Ok(secret) => secret,
        Err(e) => {
            // The flow names a credential that is gone or unreadable: nobody gets in, and the
            // operator learns why from the log.
            tracing::warn!(error = %e, "a webhook's credential is unavailable");
            return Err(refuse("a credential the server cannot read"));
        }
    };
    let Some(token) = secret.field("token").filter(|t| !t.is_empty()) else {
        tracing::warn!(
            credential = auth.credential(),
            "a webhook's credential has no `token`"
        );
        return Err(refuse("a credential the server cannot read"));
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match auth {
        WebhookAuth::Header { name, .. } => {
            let given = header(name).unwrap_or_default();
            // Digests of equal length: comparing the texts would end early on a length
            // mismatch and tell the token's length.
            if bool::from(Sha256::digest(given).ct_eq(&Sha256::digest(token))) {
                Ok(())
            } else {
                Err(refuse(&format!("the right token in `{name}`")))
            }
        }
        WebhookAuth::HmacSha256 {
            header: signature_header,
            prefix,
            timestamp_header,
            tolerance_seconds,
            payload,
            ..
        } => {
            let needs = || refuse(&format!("an HMAC-SHA256 signature in `{signature_header}`"));
            let raw = header(signature_header).ok_or_else(needs)?;
            let (signature, timestamp) = match timestamp_header {
                // Stripe: `t=<seconds>,v1=<hex>` in one header.
                Some(ts) if ts.eq_ignore_ascii_case(signature_header) => {
                    let field = |key: &str| {
                        raw.split(',')
                            .filter_map(|part| part.trim().split_once('='))
                            .find(|(k, _)| *k == key)
                            .map(|(_, v)| v)
                    };
                    (field("v1"), field("t"))
                }
                Some(ts) => (raw.strip_prefix(prefix.as_str()), header(ts)),
                None => (raw.strip_prefix(prefix.as_str()), None),
            };
            let signature = signature
                .and_then(|hex_text| hex::decode(hex_text.trim()).ok())
                .ok_or_else(needs)?;
            let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).map_err(|_| needs())?;
            match timestamp_header {
                None => mac.update(body),
                Some(_) => {
                    let timestamp = timestamp.ok_or_else(|| refuse("a signing timestamp"))?;
                    let seconds: i64 = timestamp.trim().parse().map_err(|_| needs())?;
                    // Milliseconds, as some senders give them.
                    let seconds = if seconds > 100_000_000_000 {
                        seconds / 1000
                    } else {
                        seconds
                    };
                    let skew = (chrono::Utc::now().timestamp() - seconds).unsigned_abs();
                    if skew > *tolerance_seconds {
                        return Err(refuse(&format!(
                            "a signature made within {tolerance_seconds} s (this one is {skew} s off)"
                        )));
                    }
                    let template = payload.as_deref().unwrap_or("{timestamp}.{body}");
                    let (before, after) = template.split_once("{body}").unwrap_or((template, ""));
                    mac.update(before.replace("{timestamp}", timestamp.trim()).as_bytes());
                    mac.update(body);
                    mac.update(after.replace("{timestamp}", timestamp.trim()).as_bytes());
                }
            }
            mac.verify_slice(&signature).map_err(|_| needs())
        }
    }
}

/// What templates see as `trigger`: the path, the method and the headers the hook passes.
pub fn trigger(hook: &Hook, method: &Method, path: &str, headers: &HeaderMap) -> Value {
    let mut passed = serde_json::Map::new();
    for name in &hook.headers {
        let values: Vec<&str> = headers
            .get_all(name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !values.is_empty() {
            passed.insert(name.clone(), Value::String(values.join(", ")));
        }
    }
    json!({"type": "webhook", "path": path, "method": method.as_str(), "headers": passed})
}
