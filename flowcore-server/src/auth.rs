//! API keys: generated from the OS's random source, shown once, stored as a SHA-256 hash with a
//! short public prefix to find it. Keys are high-entropy (192 bits), so a fast hash is the right
//! tool (a password hash buys nothing here); hashes are compared in constant time.

use chrono::Utc;
use flowcore::StoreError;
use flowcore::ports::{ApiKeyRecord, ApiKeyStore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Length of the public prefix: `fc_` and 8 hex digits.
const PREFIX_LEN: usize = 11;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// A new key: the record to store and the key to show once.
pub fn generate(name: &str) -> Result<(ApiKeyRecord, String), StoreError> {
    let mut bytes = [0u8; 28];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Backend {
        message: format!("no randomness: {e}"),
        source: None,
    })?;
    let key = format!("fc_{}_{}", hex(&bytes[..4]), hex(&bytes[4..]));
    let record = ApiKeyRecord {
        id: flowcore::ids::new_id(),
        name: name.to_owned(),
        prefix: key[..PREFIX_LEN].to_owned(),
        hash: hash(&key),
        created_at: Utc::now(),
        revoked_at: None,
    };
    Ok((record, key))
}

/// Whether `presented` is the admin key or a stored, unrevoked key.
pub async fn is_valid(
    store: &dyn ApiKeyStore,
    admin: Option<&str>,
    presented: &str,
) -> Result<bool, StoreError> {
    if admin.is_some_and(|admin| bool::from(admin.as_bytes().ct_eq(presented.as_bytes()))) {
        return Ok(true);
    }
    if presented.len() <= PREFIX_LEN
        || !presented.starts_with("fc_")
        || !presented.is_char_boundary(PREFIX_LEN)
    {
        return Ok(false);
    }
    let Some(record) = store.find_api_key(&presented[..PREFIX_LEN]).await? else {
        return Ok(false);
    };
    Ok(record.revoked_at.is_none()
        && bool::from(record.hash.as_bytes().ct_eq(hash(presented).as_bytes())))
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
}
