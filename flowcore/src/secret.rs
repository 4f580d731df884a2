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
    allowed_hosts: Option<Vec<String>>,
}

impl Secret {
    /// A secret of a kind (`bearer`, `basic_auth`, `header`) with its fields.
    pub fn new(kind: impl Into<String>, data: Value) -> Self {
        Self {
            kind: kind.into(),
            data,
            allowed_hosts: None,
        }
    }
    /// The same secret, sent only to these hosts (`host`, or `host:port`). Without such a list
    /// a node sends it only to a host written literally in the flow.
    pub fn with_allowed_hosts(mut self, hosts: Vec<String>) -> Self {
        self.allowed_hosts = Some(hosts);
        self
    }
    /// The hosts it may be sent to, if the credential names them.
    pub fn allowed_hosts(&self) -> Option<&[String]> {
        self.allowed_hosts.as_deref()
    }
    /// Whether it may be sent to `url`: a listed `host` over https on port 443, or a listed
    /// `host:port` over either scheme. `None` when the credential lists no hosts.
    pub fn allows(&self, url: &url::Url) -> Option<bool> {
        let hosts = self.allowed_hosts.as_ref()?;
        let host = url
            .host_str()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = url.port_or_known_default();
        Some(hosts.iter().any(|allowed| {
            let (h, p) = split_host_port(allowed);
            h.eq_ignore_ascii_case(host)
                && match p {
                    Some(p) => port == Some(p),
                    None => url.scheme() == "https" && port == Some(443),
                }
        }))
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

/// `host`, `host:port`, `[v6]` or `[v6]:port` (a bare IPv6 address has no port).
fn split_host_port(item: &str) -> (&str, Option<u16>) {
    fn unbracket(h: &str) -> &str {
        h.trim_start_matches('[').trim_end_matches(']')
    }
    match item.rsplit_once(':') {
        Some((h, p)) if (h.starts_with('[') || !h.contains(':')) && p.parse::<u16>().is_ok() => {
            (unbracket(h), p.parse().ok())
        }
        _ => (unbracket(item), None),
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
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    forms: Vec<String>,
    /// Every form at once, matched case-insensitively, longest first; `None` until a secret
    /// is added.
    matcher: Option<std::sync::Arc<aho_corasick::AhoCorasick>>,
}

impl Scrubber {
    pub(crate) fn add(&self, secret: &Secret) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut added = false;
        for form in forms(secret) {
            if !held.forms.contains(&form) {
                held.forms.push(form);
                added = true;
            }
        }
        if added {
            held.matcher = aho_corasick::AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(&held.forms)
                .ok()
                .map(std::sync::Arc::new);
        }
    }

    fn matcher(&self) -> Option<std::sync::Arc<aho_corasick::AhoCorasick>> {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .matcher
            .clone()
    }

    /// The text with every secret replaced.
    pub(crate) fn text(&self, text: String) -> String {
        match self.matcher() {
            None => text,
            Some(m) => scrub_str(text, &m),
        }
    }

    /// The value with every secret replaced in its strings (and keys).
    pub(crate) fn value(&self, value: Value) -> Value {
        match self.matcher() {
            None => value,
            Some(m) => scrub_value(value, &m),
        }
    }
}

/// Every form in which a secret's strings may come back: as they are, in any ASCII case,
/// reversed, JSON-escaped, percent-encoded, hex, and base64 (standard and URL-safe, at each of
/// the three alignments it can have inside a longer base64 text); for `basic_auth`, also
/// `username:password` and its base64, which is what goes over the wire.
fn forms(secret: &Secret) -> Vec<String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};

    let mut plain = secret.strings();
    if secret.kind() == "basic_auth"
        && let (Some(user), Some(password)) = (secret.field("username"), secret.field("password"))
    {
        plain.push(format!("{user}:{password}"));
    }
    let mut out = Vec::new();
    for s in plain {
        out.push(s.chars().rev().collect());
        out.push(
            serde_json::to_string(&s)
                .unwrap_or_default()
                .trim_matches('"')
                .to_owned(),
        );
        out.push(percent_encode(&s));
        out.push(hex::encode(&s));
        for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
            for offset in 0..3usize {
                // `offset` bytes before the secret change the first characters, and bytes
                // after it the last group: keep what depends on the secret alone.
                let mut bytes = vec![0u8; offset];
                bytes.extend_from_slice(s.as_bytes());
                let encoded = engine.encode(&bytes);
                let front = (offset * 4).div_ceil(3);
                let whole = bytes.len() / 3 * 4;
                if whole > front + 6 {
                    out.push(encoded[front..whole].to_owned());
                }
            }
            out.push(engine.encode(s.as_bytes()));
        }
        out.push(s);
    }
    out.retain(|form| form.len() >= MIN_SCRUBBED_LEN);
    out.sort();
    out.dedup();
    out
}

/// `s` with everything but unreserved characters percent-encoded (RFC 3986).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn scrub_str(text: String, matcher: &aho_corasick::AhoCorasick) -> String {
    if matcher.is_match(&text) {
        matcher.replace_all(&text, &vec![REDACTED; matcher.patterns_len()])
    } else {
        text
    }
}

fn scrub_value(value: Value, matcher: &aho_corasick::AhoCorasick) -> Value {
    match value {
        Value::String(s) => Value::String(scrub_str(s, matcher)),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|v| scrub_value(v, matcher)).collect())
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (scrub_str(k, matcher), scrub_value(v, matcher)))
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

    #[test]
    fn scrubs_the_forms_a_secret_is_sent_and_echoed_in() {
        use base64::Engine as _;
        use base64::engine::general_purpose::STANDARD;
        let scrubber = Scrubber::default();
        scrubber.add(&Secret::new(
            "basic_auth",
            json!({"username": "ada", "password": "s3cr3t-pa55/word"}),
        ));
        let wire = STANDARD.encode("ada:s3cr3t-pa55/word");
        let echoed = [
            format!("Basic {wire}"),
            "S3CR3T-PA55/WORD".to_owned(),
            "drow/55ap-t3rc3s".to_owned(),
            "s3cr3t-pa55%2Fword".to_owned(),
            STANDARD.encode("s3cr3t-pa55/word"),
            // Inside a longer base64 text, at each alignment.
            STANDARD.encode("x:s3cr3t-pa55/word!"),
            STANDARD.encode("xy:s3cr3t-pa55/word!!"),
            STANDARD.encode("xyz:s3cr3t-pa55/word"),
            hex_of("s3cr3t-pa55/word"),
        ];
        for text in echoed {
            let scrubbed = scrubber.text(text.clone());
            assert!(scrubbed.contains(REDACTED), "{text} -> {scrubbed}");
            for leak in ["s3cr3t", "S3CR3T", "55ap", "czNjcjN0LXBhNTUvd29yZA"] {
                assert!(!scrubbed.contains(leak), "{text} -> {scrubbed}");
            }
        }
        assert_eq!(scrubber.text("ada was here".into()), "ada was here");
    }

    fn hex_of(s: &str) -> String {
        hex::encode(s)
    }
}
