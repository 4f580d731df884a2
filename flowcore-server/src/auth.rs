//! API keys: generated from the OS's random source, shown once, stored as a SHA-256 hash with a
//! short public prefix to find it. Keys are high-entropy (192 bits), so a fast hash is the right
//! tool (a password hash buys nothing here); hashes are compared in constant time.

use axum::http::Method;
use chrono::Utc;
use flowcore::StoreError;
use flowcore::ports::{ApiKeyRecord, ApiKeyStore, Scope, Scopes};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Length of the public prefix: `fc_` and 8 hex digits.
const PREFIX_LEN: usize = 11;

fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Who made a request: the verified key and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's id; [`ADMIN`] for `FLOWCORE_ADMIN_KEY`.
    pub key_id: String,
    /// The key's name (`admin` for `FLOWCORE_ADMIN_KEY`).
    pub name: String,
    /// What it may do.
    pub scopes: Scopes,
    /// Whether it is the admin key or a key made by it or the command line (no parent): such a
    /// key may revoke any key; others only themselves and the keys they made.
    pub root: bool,
}

/// The key id of `FLOWCORE_ADMIN_KEY`.
pub const ADMIN: &str = "admin";

impl Caller {
    /// Who this caller is, as recorded on what it does to a run.
    pub fn actor(&self) -> flowcore::ports::Actor {
        flowcore::ports::Actor {
            id: self.key_id.clone(),
            name: self.name.clone(),
        }
    }

    /// The parent to record on a key this caller makes (`None` for the admin key).
    pub fn parent_id(&self) -> Option<String> {
        (self.key_id != ADMIN).then(|| self.key_id.clone())
    }
}

/// The scope a request needs: `read` for every `GET`; `admin` to change credentials and API
/// keys; `run` to start, cancel and otherwise act on runs; `write` for the rest (flows, files).
/// `path` is under `/api/v1`.
pub fn required_scope(method: &Method, path: &str) -> Scope {
    if method == Method::GET || method == Method::HEAD {
        return Scope::Read;
    }
    let path = path.strip_prefix("/api/v1").unwrap_or(path);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["credentials", ..] | ["api-keys", ..] => Scope::Admin,
        ["runs", ..] | ["flows", _, "runs"] | ["signals", ..] => Scope::Run,
        _ => Scope::Write,
    }
}

/// A new key: the record to store and the key to show once.
pub fn generate(name: &str) -> Result<(ApiKeyRecord, String), StoreError> {
    generate_with(name, Scopes::all(), None)
}

/// A new key with `scopes`, made by the key `parent_id` (`None`: by the admin key or the
/// command line).
pub fn generate_with(
    name: &str,
    scopes: Scopes,
    parent_id: Option<String>,
) -> Result<(ApiKeyRecord, String), StoreError> {
    let mut bytes = [0u8; 28];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Backend {
        message: format!("no randomness: {e}"),
        source: None,
    })?;
    let key = format!(
        "fc_{}_{}",
        hex::encode(&bytes[..4]),
        hex::encode(&bytes[4..])
    );
    let record = ApiKeyRecord {
        id: flowcore::ids::new_id(),
        name: name.to_owned(),
        prefix: key[..PREFIX_LEN].to_owned(),
        hash: hash(&key),
        created_at: Utc::now(),
        revoked_at: None,
        scopes,
        parent_id,
    };
    Ok((record, key))
}

/// The caller when `presented` is the admin key or a stored, unrevoked key.
pub async fn authenticate(
    store: &dyn ApiKeyStore,
    admin: Option<&str>,
    presented: &str,
) -> Result<Option<Caller>, StoreError> {
    if admin.is_some_and(|admin| bool::from(admin.as_bytes().ct_eq(presented.as_bytes()))) {
        return Ok(Some(Caller {
            key_id: ADMIN.to_owned(),
            name: ADMIN.to_owned(),
            scopes: Scopes::all(),
            root: true,
        }));
    }
    if presented.len() <= PREFIX_LEN
        || !presented.starts_with("fc_")
        || !presented.is_char_boundary(PREFIX_LEN)
    {
        return Ok(None);
    }
    let Some(record) = store.find_api_key(&presented[..PREFIX_LEN]).await? else {
        return Ok(None);
    };
    let valid = record.revoked_at.is_none()
        && bool::from(record.hash.as_bytes().ct_eq(hash(presented).as_bytes()));
    Ok(valid.then(|| Caller {
        root: record.parent_id.is_none(),
        key_id: record.id,
        name: record.name,
        scopes: record.scopes,
    }))
}

/// Whether `caller` may revoke key `target`: itself, a key it made (at any depth), or, for a
/// root key with the admin scope, any key but its own makers.
pub fn may_revoke(caller: &Caller, target: &str, keys: &[ApiKeyRecord]) -> bool {
    if caller.key_id == ADMIN || caller.key_id == target {
        return true;
    }
    let parent_of = |id: &str| {
        keys.iter()
            .find(|k| k.id == id)
            .and_then(|k| k.parent_id.clone())
    };
    // Walk up from the target: the caller among its makers means the caller made it. The chain
    // is bounded by the number of keys (a loop cannot be stored, but do not trust that).
    let mut current = parent_of(target);
    for _ in 0..keys.len() {
        match current {
            Some(id) if id == caller.key_id => return true,
            Some(id) => current = parent_of(&id),
            None => break,
        }
    }
    caller.root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_hashed() {
        let (a, key_a) = generate("a").unwrap();
        let (b, key_b) = generate("b").unwrap();
        assert_ne!(key_a, key_b);
        assert!(key_a.starts_with(&a.prefix) && key_a.len() == 3 + 8 + 1 + 48);
        assert_ne!(a.hash, key_a, "the key itself is not stored");
        assert_ne!(a.prefix, b.prefix);
    }

    #[test]
    fn each_request_needs_the_scope_of_what_it_does() {
        let cases = [
            (Method::GET, "/api/v1/credentials", Scope::Read),
            (Method::GET, "/api/v1/runs/r1/events", Scope::Read),
            (Method::POST, "/api/v1/flows/f/runs", Scope::Run),
            (Method::POST, "/api/v1/runs/r1/cancel", Scope::Run),
            (Method::POST, "/api/v1/flows", Scope::Write),
            (Method::PUT, "/api/v1/flows/f", Scope::Write),
            (Method::PUT, "/api/v1/flows/runs", Scope::Write),
            (Method::DELETE, "/api/v1/flows/runs", Scope::Write),
            (Method::DELETE, "/api/v1/files/x", Scope::Write),
            (Method::POST, "/api/v1/credentials", Scope::Admin),
            (Method::DELETE, "/api/v1/api-keys/k", Scope::Admin),
        ];
        for (method, path, scope) in cases {
            assert_eq!(required_scope(&method, path), scope, "{method} {path}");
        }
    }

    #[test]
    fn a_key_revokes_itself_and_what_it_made_and_a_root_key_anything_but_its_makers() {
        let key = |id: &str, parent: Option<&str>| ApiKeyRecord {
            id: id.into(),
            parent_id: parent.map(Into::into),
            ..generate("k").unwrap().0
        };
        let keys = [
            key("root", None),
            key("child", Some("root")),
            key("grandchild", Some("child")),
            key("other", None),
        ];
        let caller = |id: &str, root: bool| Caller {
            key_id: id.into(),
            name: id.into(),
            scopes: Scopes::all(),
            root,
        };
        let child = caller("child", false);
        assert!(may_revoke(&child, "child", &keys));
        assert!(may_revoke(&child, "grandchild", &keys));
        assert!(
            !may_revoke(&child, "root", &keys),
            "not the key that made it"
        );
        assert!(!may_revoke(&child, "other", &keys));
        let root = caller("root", true);
        assert!(may_revoke(&root, "other", &keys));
        assert!(may_revoke(&caller(ADMIN, true), "root", &keys));
    }
}
