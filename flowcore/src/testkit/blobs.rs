//! Blob stores.

use crate::error::StoreError;
use crate::ports::BlobStore;

/// The blob store suite: round trips, replace, stat, delete, missing keys, keys that would
/// escape the store refused.
pub async fn blob_store(store: &dyn BlobStore) {
    store
        .put("files/a.txt", b"hello".to_vec())
        .await
        .expect("put");
    assert_eq!(store.get("files/a.txt").await.expect("get"), b"hello");
    assert_eq!(store.stat("files/a.txt").await.expect("stat"), Some(5));
    store
        .put("files/a.txt", vec![7; 100_000])
        .await
        .expect("replace");
    assert_eq!(
        store.get("files/a.txt").await.expect("get").len(),
        100_000,
        "put replaces"
    );
    // Streaming reads give the same bytes, in chunks.
    {
        use futures::StreamExt;
        let mut stream = store.get_stream("files/a.txt").await.expect("get_stream");
        let mut read = Vec::new();
        while let Some(chunk) = stream.next().await {
            read.extend(chunk.expect("a chunk"));
        }
        assert_eq!(read, vec![7; 100_000], "a streamed read");
        assert!(
            matches!(
                store.get_stream("files/none").await.map(|_| ()),
                Err(StoreError::NotFound { .. })
            ),
            "a streamed read of a missing blob"
        );
    }
    store
        .put("files/empty", Vec::new())
        .await
        .expect("empty blob");
    assert_eq!(
        store.get("files/empty").await.expect("get empty"),
        Vec::<u8>::new()
    );
    assert!(
        matches!(
            store.get("files/none").await,
            Err(StoreError::NotFound { .. })
        ),
        "missing blob"
    );
    assert_eq!(store.stat("files/none").await.expect("stat"), None);
    for key in ["files/sub/c", "files-other/d"] {
        store.put(key, b"x".to_vec()).await.expect("put elsewhere");
    }
    let mut listed = store.list("files/").await.expect("list");
    listed.sort();
    assert_eq!(
        listed,
        ["files/a.txt", "files/empty", "files/sub/c"],
        "the keys under a prefix, nested ones too"
    );
    assert!(store.list("nothing-here/").await.expect("list").is_empty());
    for key in ["files/sub/c", "files-other/d"] {
        store.delete(key).await.expect("delete");
    }
    store.delete("files/a.txt").await.expect("delete");
    store
        .delete("files/a.txt")
        .await
        .expect("deleting a missing blob is fine");
    assert!(matches!(
        store.get("files/a.txt").await,
        Err(StoreError::NotFound { .. })
    ));
    // Streaming uploads: stored when under the limit, refused (and not stored) when over.
    let chunks = |n: usize| -> crate::ports::ChunkStream {
        Box::pin(futures::stream::iter(
            (0..n).map(|i| Ok(vec![i as u8; 1000])),
        ))
    };
    assert_eq!(
        store
            .put_stream("files/streamed", chunks(10), 10_000)
            .await
            .expect("put_stream"),
        10_000
    );
    assert_eq!(
        store.get("files/streamed").await.expect("get").len(),
        10_000
    );
    assert!(
        matches!(
            store.put_stream("files/too-big", chunks(11), 10_000).await,
            Err(StoreError::TooLarge(_))
        ),
        "a stream over the limit is refused"
    );
    assert_eq!(
        store.stat("files/too-big").await.expect("stat"),
        None,
        "and nothing is left behind"
    );
    for bad in [
        "../etc/passwd",
        "/abs",
        "a//b",
        "a/./b",
        "",
        "a\\b",
        "sp ace",
    ] {
        assert!(
            matches!(store.put(bad, vec![1]).await, Err(StoreError::Invalid(_))),
            "key `{bad}` must be refused"
        );
        assert!(store.get(bad).await.is_err(), "key `{bad}` must be refused");
    }
}
