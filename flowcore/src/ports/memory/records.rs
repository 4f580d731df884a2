//! Credentials, API keys, usage and files in memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::Utc;

use super::lock;
use crate::error::StoreError;
use crate::ports::{
    ApiKeyRecord, ApiKeyStore, CredentialStore, FileRecord, FileStore, Reencryption, StoreResult,
    StoredCredential, UsageDay, UsageQuery, UsageStore,
};

/// Credentials, API keys, usage and files in memory.
#[derive(Debug, Default)]
pub struct MemoryMetaStore {
    state: Mutex<MetaState>,
}

#[derive(Debug, Default)]
struct MetaState {
    credentials: Vec<StoredCredential>,
    api_keys: Vec<ApiKeyRecord>,
    usage: BTreeMap<(String, String), UsageDay>,
    files: HashMap<String, FileRecord>,
}

impl MemoryMetaStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl CredentialStore for MemoryMetaStore {
    async fn insert_credential(&self, credential: &StoredCredential) -> StoreResult<()> {
        let mut st = lock(&self.state);
        if st
            .credentials
            .iter()
            .any(|c| c.name == credential.name || c.id == credential.id)
        {
            return Err(StoreError::AlreadyExists(format!(
                "credential `{}` exists",
                credential.name
            )));
        }
        st.credentials.push(credential.clone());
        Ok(())
    }
    async fn get_credential(&self, id_or_name: &str) -> StoreResult<StoredCredential> {
        lock(&self.state)
            .credentials
            .iter()
            .find(|c| c.id == id_or_name || c.name == id_or_name)
            .cloned()
            .ok_or_else(|| StoreError::not_found("credential", id_or_name))
    }
    async fn list_credentials(&self) -> StoreResult<Vec<StoredCredential>> {
        Ok(lock(&self.state).credentials.clone())
    }
    async fn reencrypt_credential(&self, change: &Reencryption<'_>) -> StoreResult<()> {
        let (id, old_key_id) = (change.id, change.old_key_id);
        let mut st = lock(&self.state);
        let c = st
            .credentials
            .iter_mut()
            .find(|c| c.id == id)
            .ok_or_else(|| StoreError::not_found("credential", id))?;
        if c.key_id != old_key_id {
            return Err(StoreError::Conflict(format!(
                "credential `{id}` is under key `{}`, not `{old_key_id}`",
                c.key_id
            )));
        }
        c.key_id = change.key_id.to_owned();
        c.ciphertext = change.ciphertext.to_vec();
        c.updated_at = Utc::now();
        Ok(())
    }
    async fn delete_credential(&self, id: &str) -> StoreResult<()> {
        let mut st = lock(&self.state);
        let before = st.credentials.len();
        st.credentials.retain(|c| c.id != id);
        if st.credentials.len() == before {
            Err(StoreError::not_found("credential", id))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl ApiKeyStore for MemoryMetaStore {
    async fn insert_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        let mut st = lock(&self.state);
        if st
            .api_keys
            .iter()
            .any(|k| k.prefix == key.prefix || k.id == key.id)
        {
            return Err(StoreError::AlreadyExists(format!(
                "API key prefix `{}` exists",
                key.prefix
            )));
        }
        st.api_keys.push(key.clone());
        Ok(())
    }
    async fn find_api_key(&self, prefix: &str) -> StoreResult<Option<ApiKeyRecord>> {
        Ok(lock(&self.state)
            .api_keys
            .iter()
            .find(|k| k.prefix == prefix)
            .cloned())
    }
    async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        Ok(lock(&self.state).api_keys.clone())
    }
    async fn revoke_api_key(&self, id: &str) -> StoreResult<()> {
        let mut st = lock(&self.state);
        if !st.api_keys.iter().any(|k| k.id == id) {
            return Err(StoreError::not_found("API key", id));
        }
        let now = Utc::now();
        let mut tree = vec![id.to_owned()];
        while let Some(parent) = tree.pop() {
            for key in &mut st.api_keys {
                if key.id == parent || key.parent_id.as_deref() == Some(&parent) {
                    if key.id != parent {
                        tree.push(key.id.clone());
                    }
                    key.revoked_at.get_or_insert(now);
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl UsageStore for MemoryMetaStore {
    async fn add_usage(&self, usage: &UsageDay) -> StoreResult<()> {
        let mut st = lock(&self.state);
        let entry = st
            .usage
            .entry((usage.flow_id.clone(), usage.day.clone()))
            .or_insert_with(|| UsageDay {
                runs: 0,
                node_executions: 0,
                tokens: 0,
                models: Vec::new(),
                ..usage.clone()
            });
        entry.runs += usage.runs;
        entry.node_executions += usage.node_executions;
        entry.tokens += usage.tokens;
        for m in &usage.models {
            crate::ports::records::merge_model(&mut entry.models, m);
        }
        Ok(())
    }

    async fn usage(&self, query: &UsageQuery) -> StoreResult<Vec<UsageDay>> {
        Ok(lock(&self.state)
            .usage
            .values()
            .filter(|u| {
                query.flow_id.as_ref().is_none_or(|f| *f == u.flow_id)
                    && u.day >= query.from_day
                    && u.day <= query.to_day
            })
            .cloned()
            .collect())
    }
}

#[async_trait]
impl FileStore for MemoryMetaStore {
    async fn insert_file(&self, file: &FileRecord) -> StoreResult<()> {
        let mut st = lock(&self.state);
        if st.files.contains_key(&file.id) {
            return Err(StoreError::AlreadyExists(format!(
                "file `{}` exists",
                file.id
            )));
        }
        st.files.insert(file.id.clone(), file.clone());
        Ok(())
    }
    async fn get_file(&self, id: &str) -> StoreResult<FileRecord> {
        lock(&self.state)
            .files
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::not_found("file", id))
    }
    async fn delete_file(&self, id: &str) -> StoreResult<()> {
        lock(&self.state)
            .files
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| StoreError::not_found("file", id))
    }
}
