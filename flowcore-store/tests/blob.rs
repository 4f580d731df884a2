//! The blob kit against the file system, memory, and a real S3-compatible server (moto's
//! server mode, started here on a free loopback port and killed afterwards). A missing
//! `moto_server` is a failure, not a skip: `.ci/run` installs it.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flowcore_store::{BlobConfig, OpendalBlobStore, S3Config};

/// The kit on an opendal blob store.
async fn check(store: OpendalBlobStore) {
    let backend = flowcore::testkit::Backend {
        name: store.kind(),
        blobs: Some(std::sync::Arc::new(store)),
        ..Default::default()
    };
    flowcore::testkit::check(&backend).await;
}

#[tokio::test]
async fn fs_blob_store() {
    let root = std::env::temp_dir().join(format!("flowcore-blob-{}", std::process::id()));
    let store = OpendalBlobStore::open(&BlobConfig::Fs {
        root: root.display().to_string(),
    })
    .expect("open fs");
    check(store).await;
    // Keys stay inside the root: nothing was written outside it.
    assert!(root.join("files").is_dir());
    std::fs::remove_dir_all(&root).ok();
    std::fs::remove_dir_all(format!("{}.tmp", root.display())).ok();
}

#[tokio::test]
async fn memory_blob_store() {
    let store = OpendalBlobStore::open(&BlobConfig::Memory).expect("open memory");
    check(store).await;
}

/// A throwaway moto server, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let program =
            std::env::var("FLOWCORE_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("`{program}` must be installed for the S3 tests (pip install 'moto[server]'): {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, port }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_blob_store_against_moto() {
    let moto = Moto::start();
    // Create the bucket with a plain PUT, as S3 does.
    let response = http_put(&format!("{}/flowcore-test", moto.endpoint())).await;
    assert!(response < 300, "bucket creation answered {response}");
    let config = BlobConfig::S3(S3Config {
        bucket: "flowcore-test".into(),
        region: Some("us-east-1".into()),
        endpoint: Some(moto.endpoint()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test-secret".into()),
    });
    assert!(
        !format!("{config:?}").contains("test-secret"),
        "Debug hides the secret"
    );
    let store = OpendalBlobStore::open(&config).expect("open s3");
    store.check().await.expect("the bucket answers");
    check(store).await;
}

#[tokio::test]
async fn s3_without_a_bucket_is_refused() {
    let err = OpendalBlobStore::open(&BlobConfig::S3(S3Config::default())).unwrap_err();
    assert!(err.to_string().contains("S3_STORAGE_BUCKET_NAME"), "{err}");
}

/// A bare HTTP PUT with no body (std only: the store's own HTTP client is opendal's).
async fn http_put(url: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').expect("path");
    let mut sock = tokio::net::TcpStream::connect(host).await.expect("connect");
    let request = format!(
        "PUT /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    sock.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    sock.read_to_string(&mut answer).await.expect("read");
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(599)
}
