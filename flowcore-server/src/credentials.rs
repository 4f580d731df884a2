//! Credentials: validated, encrypted with the [`Keyring`] and stored as ciphertext; decrypted
//! only when a node asks for one by name (the engine then scrubs it from the run's outputs).

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use flowcore::StoreError;
use flowcore::ports::{CredentialStore, Reencryption, StoredCredential};
use flowcore::secret::{Secret, SecretError, SecretSource};
use serde_json::Value;

use crate::keyring::Keyring;

/// The kinds of credential and their string fields.
pub const KINDS: &[(&str, &[&str])] = &[
    ("bearer", &["token"]),
    ("basic_auth", &["username", "password"]),
    ("header", &["name", "value"]),
];

/// Checks `allowed_hosts`: each an exact `host`, `host:port` or `[v6]:port`, at most 100.
pub fn validate_hosts(hosts: &[String]) -> Result<(), String> {
    if hosts.is_empty() || hosts.len() > 100 {
        return Err("allowed_hosts must list 1 to 100 hosts".into());
    }
    for host in hosts {
        let valid = !host.is_empty()
            && host.len() <= 255
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c));
        if !valid {
            return Err(format!(
                "allowed_hosts: `{host}` is not a host or host:port (no scheme, path or wildcard)"
            ));
        }
    }
    Ok(())
}

/// Checks a credential's kind and fields. The message never quotes a value.
pub fn validate(kind: &str, data: &Value) -> Result<(), String> {
    let Some((_, fields)) = KINDS.iter().find(|(k, _)| *k == kind) else {
        let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
        return Err(format!("type must be one of {}", known.join(", ")));
    };
    let Some(object) = data.as_object() else {
        return Err("data must be an object".into());
    };
    for field in *fields {
        match object.get(*field) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 16_384 => {}
            _ => return Err(format!("data.{field} must be a non-empty string")),
        }
    }
    if let Some(extra) = object.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(format!(
            "data.{extra} is not a field of a {kind} credential"
        ));
    }
    Ok(())
}

/// Encrypts, stores and decrypts credentials.
#[derive(Clone)]
pub struct Credentials {
    store: Arc<dyn CredentialStore>,
    keyring: Arc<Keyring>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    /// Credentials in `store`, under `keyring`.
    pub fn new(store: Arc<dyn CredentialStore>, keyring: Arc<Keyring>) -> Self {
        Self { store, keyring }
    }

    /// Stores a new credential (validate it first). `AlreadyExists` when the name is taken.
    pub async fn create(
        &self,
        name: &str,
        kind: &str,
        data: &Value,
        allowed_hosts: Option<Vec<String>>,
    ) -> Result<StoredCredential, StoreError> {
        let id = flowcore::ids::new_id();
        let plain = serde_json::to_vec(data).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let (key_id, ciphertext) = self.keyring.encrypt(id.as_bytes(), &plain);
        let now = Utc::now();
        let credential = StoredCredential {
            id,
            name: name.to_owned(),
            kind: kind.to_owned(),
            key_id,
            ciphertext,
            created_at: now,
            updated_at: now,
            allowed_hosts,
        };
        self.store.insert_credential(&credential).await?;
        Ok(credential)
    }

    /// Makes a new key current (see [`Keyring::rotate`]); returns its id.
    pub fn rotate(&self) -> Result<String, crate::keyring::KeyError> {
        self.keyring.rotate()
    }

    /// Re-encrypts every credential that is not under the current key; returns how many.
    pub async fn reencrypt_all(&self) -> Result<usize, String> {
        let current = self.keyring.current_id();
        let mut count = 0;
        for c in self
            .store
            .list_credentials()
            .await
            .map_err(|e| e.to_string())?
        {
            if c.key_id == current {
                continue;
            }
            let plain = self
                .keyring
                .decrypt(&c.key_id, c.id.as_bytes(), &c.ciphertext)
                .map_err(|e| format!("credential `{}`: {e}", c.name))?;
            let (key_id, ciphertext) = self.keyring.encrypt(c.id.as_bytes(), &plain);
            match self
                .store
                .reencrypt_credential(&Reencryption {
                    id: &c.id,
                    old_key_id: &c.key_id,
                    key_id: &key_id,
                    ciphertext: &ciphertext,
                })
                .await
            {
                Ok(()) => count += 1,
                // Deleted or re-encrypted by someone else meanwhile: nothing to do.
                Err(StoreError::NotFound { .. } | StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(count)
    }
}

#[async_trait]
impl SecretSource for Credentials {
    async fn secret(&self, name: &str) -> Result<Secret, SecretError> {
        let c = match self.store.get_credential(name).await {
            Ok(c) => c,
            Err(StoreError::NotFound { .. }) => return Err(SecretError::NotFound(name.into())),
            Err(e) => {
                return Err(SecretError::Unreadable {
                    name: name.into(),
                    reason: e.to_string(),
                });
            }
        };
        let unreadable = |reason: String| SecretError::Unreadable {
            name: name.into(),
            reason,
        };
        let plain = self
            .keyring
            .decrypt(&c.key_id, c.id.as_bytes(), &c.ciphertext)
            .map_err(|e| unreadable(e.to_string()))?;
        let data = serde_json::from_slice(&plain).map_err(|_| unreadable("not JSON".into()))?;
        let secret = Secret::new(c.kind, data);
        Ok(match c.allowed_hosts {
            Some(hosts) => secret.with_allowed_hosts(hosts),
            None => secret,
        })
    }
}
