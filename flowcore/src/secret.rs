//! Credentials at run time: nodes ask for a secret by name, and whatever a run was given is
//! scrubbed from its outputs and errors before they are stored, emitted or passed on.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use flowcore::secret::{MemorySecrets, Secret, SecretSource};
//! use serde_json::json;
//!
//! let secrets = MemorySecrets::default();
//! secrets.insert("github", Secret::new("bearer", json!({"token": "ghp_abc123"})));
//! let secret = secrets.secret("github").await.unwrap();
//! assert_eq!(secret.kind(), "bearer");
//! assert_eq!(format!("{secret:?}"), "Secret(bearer, [redacted])");
//! # });
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use async_trait::async_trait;
use serde_json::Value;

/// What replaces a secret's text in outputs and errors.
pub const REDACTED: &str = "[redacted]";

/// Strings shorter than this are not scrubbed: replacing every `a` or `1` of an output would
/// destroy it, and such values are no secret anyway.
const MIN_SCRUBBED_LEN: usize = 4;

/// A decrypted credential. It cannot be serialized and its `Debug` shows only its kind.
#[derive(Clone, PartialEq)]
pub struct Secret {
    kind: String,
    data: Value,
}

impl Secret {
    /// A secret of a kind (`bearer`, `basic_auth`, `header`) with its fields.
    pub fn new(kind: impl Into<String>, data: Value) -> Self {
        Self {
            kind: kind.into(),
            data,
        }
    }
    /// Its kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }
    /// Its fields, in plain text. Handle with care.
    pub fn expose(&self) -> &Value {
        &self.data
    }
    /// A string field.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.data.get(name).and_then(Value::as_str)
    }
    /// Every string inside, for scrubbing.
    fn strings(&self) -> Vec<String> {
        let mut out = Vec::new();
        collect_strings(&self.data, &mut out);
        out
    }
}

fn collect_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) if s.len() >= MIN_SCRUBBED_LEN => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({}, {REDACTED})", self.kind)
    }
}

/// Why a secret could not be had. Its message never contains secret material.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SecretError {
    /// No credential has that name.
    #[error("credential `{0}` does not exist")]
    NotFound(String),
    /// The engine was built without a secret source.
    #[error("credentials are not available in this engine")]
    Unavailable,
    /// It exists but could not be read (storage down, unknown key).
    #[error("credential `{name}` could not be read: {reason}")]
    Unreadable {
        /// The credential's name.
        name: String,
        /// Why (without secret material).
        reason: String,
    },
}

/// Where nodes get credentials from (the server decrypts them from its store).
#[async_trait]
pub trait SecretSource: Send + Sync {
    /// The credential called `name`.
    async fn secret(&self, name: &str) -> Result<Secret, SecretError>;
}

/// Secrets held in memory, for embedding and tests.
#[derive(Debug, Default)]
pub struct MemorySecrets(Mutex<HashMap<String, Secret>>);

impl MemorySecrets {
    /// Adds or replaces a secret.
    pub fn insert(&self, name: impl Into<String>, secret: Secret) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), secret);
    }
}

#[async_trait]
impl SecretSource for MemorySecrets {
    async fn secret(&self, name: &str) -> Result<Secret, SecretError> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| SecretError::NotFound(name.to_owned()))
    }
}

/// The secrets one run has been given, to scrub from what it produces.
#[derive(Debug, Default)]
pub(crate) struct Scrubber {
    // Empty for almost every run; a plain mutex is cheaper than anything cleverer here.
    secrets: Mutex<Vec<String>>,
}

impl Scrubber {
    pub(crate) fn add(&self, secret: &Secret) {
        let mut held = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        for s in secret.strings() {
            if !held.contains(&s) {
                held.push(s);
            }
        }
        // Longest first, so that a secret containing another is replaced whole.
        held.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    /// The text with every secret replaced.
    pub(crate) fn text(&self, text: String) -> String {
        let held = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_empty() {
            return text;
        }
        scrub_str(text, &held)
    }

    /// The value with every secret replaced in its strings (and keys).
    pub(crate) fn value(&self, value: Value) -> Value {
        let held = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_empty() {
            return value;
        }
        scrub_value(value, &held)
    }
}

fn scrub_str(mut text: String, held: &[String]) -> String {
    for s in held {
        if text.contains(s.as_str()) {
            text = text.replace(s.as_str(), REDACTED);
        }
    }
    text
}

fn scrub_value(value: Value, held: &[String]) -> Value {
    match value {
        Value::String(s) => Value::String(scrub_str(s, held)),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|v| scrub_value(v, held)).collect())
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (scrub_str(k, held), scrub_value(v, held)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scrubs_strings_keys_and_nested_values_longest_first() {
        let scrubber = Scrubber::default();
        assert_eq!(scrubber.text("untouched".into()), "untouched");
        scrubber.add(&Secret::new(
            "basic_auth",
            json!({"username": "ab", "password": "hunter2", "token": "hunter2-long"}),
        ));
        assert_eq!(
            scrubber
                .value(json!({"echo": "Bearer hunter2-long", "hunter2": ["x hunter2 y", 1, "ab"]})),
            json!({"echo": "Bearer [redacted]", "[redacted]": ["x [redacted] y", 1, "ab"]})
        );
        assert_eq!(
            scrubber.text("bad password hunter2".into()),
            "bad password [redacted]"
        );
    }
}
