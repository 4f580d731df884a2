//! The server's records: credentials, API keys, usage, files.

use std::sync::Arc;

use chrono::Utc;

use crate::error::StoreError;
use crate::ports::{ModelTokens, Reencryption, UsageDay, UsageQuery};

/// The four stores of the server's records, as one backend implements them.
pub trait Records:
    crate::ports::CredentialStore
    + crate::ports::ApiKeyStore
    + crate::ports::UsageStore
    + crate::ports::FileStore
{
}

impl<S> Records for S where
    S: crate::ports::CredentialStore
        + crate::ports::ApiKeyStore
        + crate::ports::UsageStore
        + crate::ports::FileStore
{
}

/// Credentials, API keys, usage and files.
pub async fn meta_store(store: Arc<dyn Records>) {
    use crate::ports::{ApiKeyRecord, FileRecord, StoredCredential};
    let now = Utc::now();

    // Credentials.
    let cred = StoredCredential {
        id: "c1".into(),
        name: "github".into(),
        kind: "api_key".into(),
        key_id: "k1".into(),
        ciphertext: vec![1, 2, 3, 0, 255],
        created_at: now,
        updated_at: now,
        allowed_hosts: Some(vec!["api.github.com".into(), "[::1]:8080".into()]),
    };
    store
        .insert_credential(&cred)
        .await
        .expect("insert credential");
    assert!(
        matches!(
            store
                .insert_credential(&StoredCredential {
                    id: "c2".into(),
                    ..cred.clone()
                })
                .await,
            Err(StoreError::AlreadyExists(_))
        ),
        "credential names are unique"
    );
    assert_eq!(
        store
            .get_credential("c1")
            .await
            .expect("by id")
            .allowed_hosts,
        cred.allowed_hosts,
        "allowed hosts are kept"
    );
    assert_eq!(
        store.get_credential("c1").await.expect("by id").ciphertext,
        vec![1, 2, 3, 0, 255],
        "binary round trip"
    );
    assert_eq!(
        store.get_credential("github").await.expect("by name").id,
        "c1"
    );
    store
        .reencrypt_credential(&Reencryption {
            id: "c1",
            old_key_id: "k1",
            key_id: "k2",
            ciphertext: &[9, 9],
        })
        .await
        .expect("re-encrypt");
    assert!(
        matches!(
            store
                .reencrypt_credential(&Reencryption {
                    id: "c1",
                    old_key_id: "k1",
                    key_id: "k3",
                    ciphertext: &[7],
                })
                .await,
            Err(StoreError::Conflict(_))
        ),
        "re-encryption is compare-and-set on the key id"
    );
    let got = store.get_credential("c1").await.expect("get");
    assert_eq!(
        (got.key_id.as_str(), got.ciphertext.as_slice()),
        ("k2", &[9u8, 9][..])
    );
    assert_eq!(store.list_credentials().await.expect("list").len(), 1);
    store.delete_credential("c1").await.expect("delete");
    assert!(matches!(
        store.get_credential("c1").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete_credential("c1").await,
        Err(StoreError::NotFound { .. })
    ));

    // API keys.
    let key = ApiKeyRecord {
        id: "a1".into(),
        name: "ci".into(),
        prefix: "fc_abc123".into(),
        hash: "hash".into(),
        created_at: now,
        revoked_at: None,
        scopes: "read,run".parse().expect("scopes"),
        parent_id: None,
    };
    store.insert_api_key(&key).await.expect("insert key");
    assert!(matches!(
        store
            .insert_api_key(&ApiKeyRecord {
                id: "a2".into(),
                ..key.clone()
            })
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(
        store
            .find_api_key("fc_abc123")
            .await
            .expect("find")
            .map(|k| k.id),
        Some("a1".into())
    );
    assert!(store.find_api_key("fc_nope").await.expect("find").is_none());
    store.revoke_api_key("a1").await.expect("revoke");
    store
        .revoke_api_key("a1")
        .await
        .expect("revoke is idempotent");
    assert!(
        store
            .find_api_key("fc_abc123")
            .await
            .expect("find")
            .and_then(|k| k.revoked_at)
            .is_some()
    );
    assert!(matches!(
        store.revoke_api_key("zz").await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.list_api_keys().await.expect("list").len(), 1);
    assert_eq!(
        store
            .find_api_key("fc_abc123")
            .await
            .expect("find")
            .map(|k| k.scopes),
        Some("read,run".parse().expect("scopes")),
        "scopes are kept"
    );

    // Revoking a key revokes the keys it made, at any depth, and nothing else.
    let child = |id: &str, prefix: &str, parent: Option<&str>| ApiKeyRecord {
        id: id.into(),
        prefix: prefix.into(),
        parent_id: parent.map(Into::into),
        ..key.clone()
    };
    for k in [
        child("p", "fc_p", None),
        child("c", "fc_c", Some("p")),
        child("g", "fc_g", Some("c")),
        child("s", "fc_s", None),
    ] {
        store.insert_api_key(&k).await.expect("insert key");
    }
    store.revoke_api_key("c").await.expect("revoke a child");
    let revoked = |prefix: &'static str| {
        let store = &store;
        async move {
            store
                .find_api_key(prefix)
                .await
                .expect("find")
                .is_some_and(|k| k.revoked_at.is_some())
        }
    };
    assert!(!revoked("fc_p").await, "the parent of a revoked key stays");
    assert!(revoked("fc_c").await && revoked("fc_g").await);
    store.revoke_api_key("p").await.expect("revoke the parent");
    assert!(revoked("fc_p").await);
    assert!(!revoked("fc_s").await, "an unrelated key stays");

    // Usage: concurrent adds all count.
    let mut adds = Vec::new();
    for _ in 0..20 {
        let store = store.clone();
        adds.push(tokio::spawn(async move {
            store
                .add_usage(&usage_of("f1", "2026-11-22", [1, 4, 10]))
                .await
        }));
    }
    for a in adds {
        a.await.expect("task").expect("add usage");
    }
    store
        .add_usage(&usage_of("f1", "2026-11-23", [1, 1, 0]))
        .await
        .expect("add");
    store
        .add_usage(&usage_of("f2", "2026-11-22", [2, 2, 2]))
        .await
        .expect("add");
    let f1 = store
        .usage(&days(Some("f1"), "2026-11-01", "2026-11-30"))
        .await
        .expect("usage");
    assert_eq!(f1.len(), 2);
    assert_eq!(
        (
            f1[0].day.as_str(),
            f1[0].runs,
            f1[0].node_executions,
            f1[0].tokens
        ),
        ("2026-11-22", 20, 80, 200)
    );
    assert_eq!(
        f1[0].models,
        vec![
            ModelTokens {
                model: "model-a".into(),
                prompt_tokens: 60,
                completion_tokens: 0
            },
            ModelTokens {
                model: "model-b".into(),
                prompt_tokens: 100,
                completion_tokens: 40
            }
        ],
        "tokens by model, sorted by name"
    );
    assert!(
        f1[1].models.is_empty(),
        "a day without tokens has no models"
    );
    assert_eq!(
        store
            .usage(&days(None, "2026-11-22", "2026-11-22"))
            .await
            .expect("usage")
            .len(),
        2,
        "all flows, one day"
    );

    // Files.
    let file = FileRecord {
        id: "file1".into(),
        name: "report.pdf".into(),
        content_type: "application/pdf".into(),
        size: 1234,
        blob_key: "files/file1".into(),
        created_at: now,
    };
    store.insert_file(&file).await.expect("insert file");
    assert_eq!(store.get_file("file1").await.expect("get").size, 1234);
    store.delete_file("file1").await.expect("delete");
    assert!(matches!(
        store.get_file("file1").await,
        Err(StoreError::NotFound { .. })
    ));
}

/// A flow's day of usage: runs, node executions and tokens.
fn usage_of(flow_id: &str, day: &str, [runs, node_executions, tokens]: [u64; 3]) -> UsageDay {
    let mut usage = UsageDay {
        flow_id: flow_id.into(),
        day: day.into(),
        runs,
        node_executions,
        tokens: 0,
        models: Vec::new(),
    };
    // Tokens of two models: the prompt's share first.
    if tokens > 0 {
        usage.add_tokens("model-b", tokens / 2, tokens / 4);
        usage.add_tokens("model-a", tokens - tokens / 2 - tokens / 4, 0);
    }
    usage
}

fn days(flow_id: Option<&str>, from_day: &str, to_day: &str) -> UsageQuery {
    UsageQuery {
        flow_id: flow_id.map(str::to_owned),
        from_day: from_day.into(),
        to_day: to_day.into(),
    }
}
