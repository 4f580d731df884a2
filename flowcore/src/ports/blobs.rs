//! Files and large outputs, by key.

use async_trait::async_trait;

use super::StoreResult;
use crate::error::StoreError;

/// Whether `key` is acceptable as a blob key: segments of `[A-Za-z0-9._-]` joined by `/`, no
/// empty, `.` or `..` segment, at most 512 bytes. Keys are made by the server; a name a caller
/// supplies never becomes a key unchecked.
pub fn is_valid_blob_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 512
        && key
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
}

/// Files and large outputs, by key.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores `data` under `key`, replacing what was there.
    async fn put(&self, key: &str, data: Vec<u8>) -> StoreResult<()>;
    /// The bytes under `key`. `NotFound` when there are none.
    async fn get(&self, key: &str) -> StoreResult<Vec<u8>>;
    /// The size of the blob under `key`, `None` when there is none.
    async fn stat(&self, key: &str) -> StoreResult<Option<u64>>;
    /// Removes `key`; removing a missing key is not an error.
    async fn delete(&self, key: &str) -> StoreResult<()>;
    /// The keys under `prefix` (a folder such as `files/`), in no particular order.
    async fn list(&self, prefix: &str) -> StoreResult<Vec<String>>;
    /// The bytes under `key` as a stream of chunks, so that a large blob is never held in
    /// memory whole. `NotFound` when there are none. The default reads it whole.
    async fn get_stream(&self, key: &str) -> StoreResult<ChunkStream> {
        use futures::StreamExt;
        let data = self.get(key).await?;
        Ok(futures::stream::once(async move { Ok(data) }).boxed())
    }
    /// Stores a stream of chunks under `key`, refusing with `TooLarge` as soon as more than
    /// `max_bytes` arrive: nothing over the limit is held in memory or left in the store.
    /// Returns the size stored. The default collects the chunks (with the limit) and calls `put`.
    async fn put_stream(
        &self,
        key: &str,
        mut chunks: ChunkStream,
        max_bytes: u64,
    ) -> StoreResult<u64> {
        use futures::StreamExt;
        let mut data = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if data.len() as u64 + chunk.len() as u64 > max_bytes {
                return Err(too_large(max_bytes));
            }
            data.extend_from_slice(&chunk);
        }
        let size = data.len() as u64;
        self.put(key, data).await?;
        Ok(size)
    }
}

/// Chunks of an upload, as they arrive.
pub type ChunkStream = futures::stream::BoxStream<'static, StoreResult<Vec<u8>>>;

/// The error of an upload over its limit.
pub fn too_large(max_bytes: u64) -> StoreError {
    StoreError::TooLarge(format!("larger than the limit of {max_bytes} bytes"))
}
