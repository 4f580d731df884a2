//! Blobs in memory.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::lock;
use crate::error::StoreError;
use crate::ports::{BlobStore, StoreResult, is_valid_blob_key};

/// Blobs in memory.
#[derive(Debug, Default)]
pub struct MemoryBlobStore {
    blobs: Mutex<HashMap<String, Vec<u8>>>,
}

impl MemoryBlobStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn check_key(key: &str) -> StoreResult<()> {
    if is_valid_blob_key(key) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("invalid blob key `{key}`")))
    }
}

#[async_trait]
impl BlobStore for MemoryBlobStore {
    async fn put(&self, key: &str, data: Vec<u8>) -> StoreResult<()> {
        check_key(key)?;
        lock(&self.blobs).insert(key.to_owned(), data);
        Ok(())
    }
    async fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        check_key(key)?;
        lock(&self.blobs)
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::not_found("blob", key))
    }
    async fn stat(&self, key: &str) -> StoreResult<Option<u64>> {
        check_key(key)?;
        Ok(lock(&self.blobs).get(key).map(|b| b.len() as u64))
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        check_key(key)?;
        lock(&self.blobs).remove(key);
        Ok(())
    }
    async fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let blobs = lock(&self.blobs);
        Ok(blobs
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }
}
