//! `delay` and `wait`: the nodes that wait for a time or a signal, parking their run in a
//! durable execution (see [`crate::wait`]).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::parse_params;
use crate::error::{NodeError, ParamError};
use crate::expr::{References, Template};
use crate::node::{Node, NodeContext, Output};
use crate::wait::{WaitFor, Waited};

/// The longest a `delay` or a `wait` may wait: a year.
pub(crate) const MAX_WAIT_MS: u64 = 365 * 24 * 3600 * 1000;

/// How long a `wait` waits for its signal unless told: a week.
const DEFAULT_WAIT_MS: u64 = 7 * 24 * 3600 * 1000;

/// `delay`: waits `ms` milliseconds, or until the time `until` gives, then outputs `null`.
struct Delay {
    wait: Until,
}

/// How long a `delay` waits.
enum Until {
    /// `ms`.
    For(Duration),
    /// `until`: a time, or a template giving one, rendered when the node runs.
    At(Template),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelayParams {
    #[serde(default)]
    ms: Option<u64>,
    #[serde(default)]
    until: Option<String>,
}

pub(crate) fn delay(params: &Value) -> Result<Box<dyn Node>, ParamError> {
    let p: DelayParams = parse_params(params)?;
    let wait = match (p.ms, p.until) {
        (Some(ms), None) => Until::For(Duration::from_millis(at_most(ms, "ms")?)),
        (None, Some(until)) => {
            let template =
                Template::compile(&until).map_err(|e| ParamError::new(format!("until: {e}")))?;
            // A time written as it is is checked now, not when the run gets there.
            if template.is_literal() {
                time(&until).map_err(|e| ParamError::new(format!("until: {e}")))?;
            }
            Until::At(template)
        }
        _ => return Err(ParamError::new("give one of `ms` and `until`")),
    };
    Ok(Box::new(Delay { wait }))
}

fn at_most(ms: u64, name: &str) -> Result<u64, ParamError> {
    if ms > MAX_WAIT_MS {
        return Err(ParamError::new(format!(
            "{name}: {ms} is over the maximum of {MAX_WAIT_MS} (a year)"
        )));
    }
    Ok(ms)
}

fn time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("`{text}` is not an RFC 3339 time: {e}"))
}

#[async_trait]
impl Node for Delay {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        let deadline = match &self.wait {
            Until::For(wait) => Utc::now() + chrono::Duration::from_std(*wait).unwrap_or_default(),
            Until::At(template) => {
                let text = template
                    .render_string(&cx.scope())
                    .map_err(|e| NodeError::fatal(format!("until: {e}")))?;
                let at = time(&text).map_err(|e| NodeError::fatal(format!("until: {e}")))?;
                // A time in the past does not wait; one further than `ms` may wait is refused.
                if at - Utc::now() > chrono::Duration::milliseconds(MAX_WAIT_MS as i64) {
                    return Err(NodeError::fatal(format!(
                        "until: `{text}` is more than {MAX_WAIT_MS} ms (a year) away"
                    )));
                }
                at
            }
        };
        let what = WaitFor {
            signal: None,
            key: None,
            deadline,
        };
        cx.wait_for(what).await?;
        Ok(Value::Null.into())
    }

    fn references(&self) -> References {
        match &self.wait {
            Until::For(_) => References::default(),
            Until::At(template) => template.references(),
        }
    }
}

/// `wait`: parks the run until signal `signal` comes (its payload is the output), at most
/// `timeout_ms`; past it, the node fails with code `timeout`.
struct WaitNode {
    signal: String,
    timeout: chrono::Duration,
    key: Option<Template>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitParams {
    signal: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    key: Option<String>,
}

/// Whether `name` can name a signal: 1 to 100 of `A-Z a-z 0-9 _ - .` (it is a URL path segment).
pub fn is_signal_name(name: &str) -> bool {
    (1..=100).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

pub(crate) fn wait(params: &Value) -> Result<Box<dyn Node>, ParamError> {
    let p: WaitParams = parse_params(params)?;
    if !is_signal_name(&p.signal) {
        return Err(ParamError::new(format!(
            "signal: `{}` is not a signal name (1 to 100 of A-Z a-z 0-9 _ - .)",
            p.signal
        )));
    }
    let ms = at_most(p.timeout_ms.unwrap_or(DEFAULT_WAIT_MS), "timeout_ms")?;
    let key = p
        .key
        .map(|k| Template::compile(&k).map_err(|e| ParamError::new(format!("key: {e}"))))
        .transpose()?;
    Ok(Box::new(WaitNode {
        signal: p.signal,
        timeout: chrono::Duration::milliseconds(ms as i64),
        key,
    }))
}

/// The longest key a keyed wait may have.
const MAX_KEY_BYTES: usize = 256;

#[async_trait]
impl Node for WaitNode {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        let key = match &self.key {
            None => None,
            Some(template) => {
                let key = template
                    .render_string(&cx.scope())
                    .map_err(|e| NodeError::fatal(format!("key: {e}")))?;
                if key.len() > MAX_KEY_BYTES {
                    return Err(NodeError::fatal(format!(
                        "key: it is {} bytes, more than {MAX_KEY_BYTES}",
                        key.len()
                    )));
                }
                Some(key)
            }
        };
        let what = WaitFor {
            signal: Some(self.signal.clone()),
            key,
            deadline: Utc::now() + self.timeout,
        };
        match cx.wait_for(what).await? {
            Waited::Signal(payload) => Ok(payload.into()),
            Waited::Deadline => Err(NodeError::WaitTimedOut {
                signal: self.signal.clone(),
            }),
        }
    }

    fn references(&self) -> References {
        self.key
            .as_ref()
            .map(Template::references)
            .unwrap_or_default()
    }
}
