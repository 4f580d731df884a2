//! Identifiers.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A run's id: a UUIDv7 string by default, so ids sort by creation time (but a failure
/// handler's, which has its failed run's time: [`RunId::failure_handler`]).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(Arc<str>);

impl RunId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(new_id().into())
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// When a UUIDv7 id (the default) was made, to the millisecond; `None` for another id.
    ///
    /// ```
    /// let id = flowcore::RunId::new();
    /// let age = chrono::Utc::now() - id.created_at().unwrap();
    /// assert!(age.num_seconds() < 5);
    /// assert!(flowcore::RunId::from("not-a-uuid").created_at().is_none());
    /// ```
    pub fn created_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let uuid = uuid::Uuid::try_parse(&self.0).ok()?;
        if uuid.get_version_num() != 7 {
            return None;
        }
        let (secs, nanos) = uuid.get_timestamp()?.to_unix();
        chrono::DateTime::from_timestamp(i64::try_from(secs).ok()?, nanos)
    }
}

impl RunId {
    /// The id of this run's failure handler run: derived, so that whoever knows the failed run
    /// knows its handler's (a worker enqueues it after the commit that stored both), and the
    /// same for every try. For a UUIDv7 id, the same time with the random bits changed; for
    /// another id, the id with `.on_failure` appended.
    ///
    /// ```
    /// let failed = flowcore::RunId::new();
    /// let handler = failed.failure_handler();
    /// assert_ne!(handler, failed);
    /// assert_eq!(handler, failed.failure_handler());
    /// assert_eq!(handler.created_at(), failed.created_at());
    /// assert_ne!(handler.failure_handler(), failed);
    /// ```
    pub fn failure_handler(&self) -> RunId {
        match uuid::Uuid::try_parse(&self.0) {
            Ok(uuid) if uuid.get_version_num() == 7 => {
                let mut bytes = *uuid.as_bytes();
                // Bytes 10 to 15 are random bits only (the variant is in byte 8). Not an
                // involution (as a XOR would be): a handler's handler's id is not the run's.
                for b in &mut bytes[10..] {
                    *b = b.wrapping_add(0x5b);
                }
                Self(uuid::Uuid::from_bytes(bytes).to_string().into())
            }
            _ => Self(format!("{}.on_failure", self.0).into()),
        }
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<&str> for RunId {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<String> for RunId {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({})", self.0)
    }
}

impl AsRef<str> for RunId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A fresh id for records (runs, jobs, blobs): a UUIDv7 string, time-ordered.
///
/// The random part comes from `fastrand` rather than the OS: ids must be unique, not secret
/// (access is by API key), and a `getrandom` system call per run showed up in profiles. Never
/// use this for keys or tokens that guard access.
pub fn new_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let random: [u8; 10] = fastrand::u128(..).to_le_bytes()[..10]
        .try_into()
        .unwrap_or_default();
    uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .to_string()
}
