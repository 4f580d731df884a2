//! Blob storage through opendal: the local file system (default, in the data dir), S3 or any
//! S3-compatible store, or memory.
//!
//! Keys are the store's own (see [`flowcore::ports::is_valid_blob_key`]): a name a caller
//! supplies never becomes a path, so no `..` escapes the root.

use std::fmt;
use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use async_trait::async_trait;
use flowcore::StoreError;
use flowcore::ports::{BlobStore, ChunkStream, StoreResult, is_valid_blob_key, too_large};
use futures::StreamExt;
use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{ErrorKind, Operator, services};

/// Where blobs go (`STORAGE_TYPE` and the `S3_*` variables).
#[derive(Clone, PartialEq, Eq)]
pub enum BlobConfig {
    /// A folder on the local file system.
    Fs {
        /// The folder (created when missing).
        root: String,
    },
    /// Process memory (tests, throwaway servers).
    Memory,
    /// S3 or an S3-compatible store.
    S3(S3Config),
}

/// S3 settings.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct S3Config {
    /// `S3_STORAGE_BUCKET_NAME`.
    pub bucket: String,
    /// `S3_STORAGE_REGION` (default `us-east-1`).
    pub region: Option<String>,
    /// `S3_ENDPOINT_URL`, for S3-compatible stores.
    pub endpoint: Option<String>,
    /// `S3_STORAGE_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `S3_STORAGE_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
}

impl fmt::Debug for BlobConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fs { root } => f.debug_struct("Fs").field("root", root).finish(),
            Self::Memory => f.write_str("Memory"),
            Self::S3(s3) => s3.fmt(f),
        }
    }
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

/// Installs rustls' ring provider and opendal's reqwest transport once per process: both crates
/// are built without their default TLS stack (aws-lc's C build is the slowest step of a cold
/// build), so the choice is made here.
fn init_http() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        opendal_http_transport_reqwest::install_default();
    });
}

/// A [`BlobStore`] over an opendal operator, with timeouts and retries of transient errors.
#[derive(Clone)]
pub struct OpendalBlobStore {
    op: Operator,
    kind: &'static str,
}

impl fmt::Debug for OpendalBlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpendalBlobStore")
            .field("kind", &self.kind)
            .finish()
    }
}

impl OpendalBlobStore {
    /// Opens the store `config` describes.
    pub fn open(config: &BlobConfig) -> StoreResult<Self> {
        let invalid = |e: opendal::Error| StoreError::Invalid(format!("blob storage: {e}"));
        let (op, kind) = match config {
            BlobConfig::Fs { root } => {
                // Writes go to a folder beside the root and are renamed into place when complete,
                // so a failed or aborted write never leaves a partial blob.
                let staging = format!("{}.tmp", root.trim_end_matches('/'));
                for dir in [root.as_str(), staging.as_str()] {
                    crate::private_dir(Path::new(dir)).map_err(|e| {
                        StoreError::unavailable(format!("cannot create the blob folder {dir}"), e)
                    })?;
                }
                let builder = services::Fs::default()
                    .root(root)
                    .atomic_write_dir(&staging);
                (Operator::new(builder).map_err(invalid)?, "fs")
            }
            BlobConfig::Memory => (
                Operator::new(services::Memory::default()).map_err(invalid)?,
                "memory",
            ),
            BlobConfig::S3(s3) => {
                init_http();
                if s3.bucket.is_empty() {
                    return Err(StoreError::Invalid(
                        "S3_STORAGE_BUCKET_NAME is required for STORAGE_TYPE=s3".into(),
                    ));
                }
                let mut builder = services::S3::default()
                    .bucket(&s3.bucket)
                    .region(s3.region.as_deref().unwrap_or("us-east-1"))
                    .disable_config_load()
                    .disable_ec2_metadata();
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.endpoint(endpoint);
                }
                if let Some(key) = &s3.access_key_id {
                    builder = builder.access_key_id(key);
                }
                if let Some(secret) = &s3.secret_access_key {
                    builder = builder.secret_access_key(secret);
                }
                (Operator::new(builder).map_err(invalid)?, "s3")
            }
        };
        let op = op
            .layer(TimeoutLayer::new().with_timeout(Duration::from_secs(60)))
            .layer(RetryLayer::new().with_max_times(3).with_jitter());
        Ok(Self { op, kind })
    }

    /// `fs`, `memory` or `s3`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Answers when the store is reachable (for readiness checks).
    pub async fn check(&self) -> StoreResult<()> {
        self.op
            .check()
            .await
            .map_err(|e| map_error("checking the blob store", "", e))
    }
}

fn check_key(key: &str) -> StoreResult<()> {
    if is_valid_blob_key(key) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("invalid blob key `{key}`")))
    }
}

fn map_error(what: &str, key: &str, e: opendal::Error) -> StoreError {
    match e.kind() {
        ErrorKind::NotFound => StoreError::not_found("blob", key),
        _ if e.is_temporary() => StoreError::unavailable(format!("{what} `{key}`"), e),
        _ => StoreError::backend(format!("{what} `{key}`"), e),
    }
}

#[async_trait]
impl BlobStore for OpendalBlobStore {
    async fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let entries = self
            .op
            .list_with(prefix)
            .recursive(true)
            .await
            .map_err(|e| map_error("listing blobs", prefix, e))?;
        Ok(entries
            .into_iter()
            .map(|e| e.path().to_owned())
            .filter(|p| !p.ends_with('/'))
            .collect())
    }

    async fn put(&self, key: &str, data: Vec<u8>) -> StoreResult<()> {
        check_key(key)?;
        self.op
            .write(key, data)
            .await
            .map(|_| ())
            .map_err(|e| map_error("writing blob", key, e))
    }

    async fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        check_key(key)?;
        self.op
            .read(key)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| map_error("reading blob", key, e))
    }

    /// Reads in chunks of 64 KiB (S3: ranged reads).
    async fn get_stream(&self, key: &str) -> StoreResult<ChunkStream> {
        check_key(key)?;
        let reader = self
            .op
            .reader_with(key)
            .chunk(64 * 1024)
            .await
            .map_err(|e| map_error("reading blob", key, e))?;
        let owned = key.to_owned();
        let stream = reader
            .into_bytes_stream(..)
            .await
            .map_err(|e| map_error("reading blob", key, e))?;
        Ok(stream
            .map(move |chunk| {
                chunk
                    .map(|bytes| bytes.to_vec())
                    .map_err(|e| StoreError::unavailable(format!("reading blob `{owned}`"), e))
            })
            .boxed())
    }

    async fn stat(&self, key: &str) -> StoreResult<Option<u64>> {
        check_key(key)?;
        match self.op.stat(key).await {
            Ok(meta) => Ok(Some(meta.content_length())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(map_error("reading blob metadata", key, e)),
        }
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        check_key(key)?;
        self.op
            .delete(key)
            .await
            .map_err(|e| map_error("deleting blob", key, e))
    }

    /// Writes chunk by chunk through an opendal writer (S3: multipart), aborting the write as
    /// soon as the limit is passed, so an oversized upload never sits in memory or in the store.
    async fn put_stream(
        &self,
        key: &str,
        mut chunks: ChunkStream,
        max_bytes: u64,
    ) -> StoreResult<u64> {
        check_key(key)?;
        let mut writer = self
            .op
            .writer(key)
            .await
            .map_err(|e| map_error("writing blob", key, e))?;
        let mut size = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(e);
                }
            };
            size += chunk.len() as u64;
            if size > max_bytes {
                let _ = writer.abort().await;
                return Err(too_large(max_bytes));
            }
            if let Err(e) = writer.write(chunk).await {
                let _ = writer.abort().await;
                return Err(map_error("writing blob", key, e));
            }
        }
        writer
            .close()
            .await
            .map_err(|e| map_error("writing blob", key, e))?;
        Ok(size)
    }
}
