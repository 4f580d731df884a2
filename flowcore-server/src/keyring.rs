//! The keys that encrypt credentials (XChaCha20-Poly1305, 256-bit keys, a random 192-bit nonce per
//! message, the credential's id as associated data so a ciphertext cannot be moved to another
//! row). Every ciphertext is stored with the id of its key; the first key of the ring encrypts,
//! all of them decrypt, so older keys stay readable until `flowcore rotate-key` has re-encrypted
//! everything under the newest.
//!
//! Keys come from `FLOWCORE_ENCRYPTION_KEY` (one or more comma-separated keys, 64 hex characters
//! or base64 of 32 bytes, newest first) or, without it, from the file `encryption.keys` in the
//! data dir (mode 0600, one base64 key a line, newest first), generated on first use.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

/// The name of the key file in the data dir.
pub const KEY_FILE: &str = "encryption.keys";

const NONCE_LEN: usize = 24;

/// Why keys could not be loaded or a ciphertext not be read. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `FLOWCORE_ENCRYPTION_KEY` or the key file holds something that is not a key.
    #[error("{source_name}: key {position} is not 32 bytes in hex (64 characters) or base64")]
    Malformed {
        /// Where the key came from.
        source_name: String,
        /// Its position, from 1.
        position: usize,
    },
    /// The key file could not be read or written.
    #[error("key file {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// A ciphertext names a key that the ring does not have.
    #[error("the key `{0}` is not in the key ring (was FLOWCORE_ENCRYPTION_KEY changed?)")]
    UnknownKey(String),
    /// The ciphertext does not decrypt: corrupted, or not for this record.
    #[error("a ciphertext under key `{0}` does not decrypt (corrupted or moved)")]
    Corrupt(String),
}

#[derive(Clone)]
struct Key {
    id: String,
    cipher: XChaCha20Poly1305,
    /// The key that signs resume tokens, derived from this one (never the same key for two
    /// purposes).
    tokens: [u8; 32],
}

/// A key's id: the first 8 bytes of its SHA-256, in hex. The same key has the same id in every
/// process, whether it came from the environment or the file.
fn key_id(bytes: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

fn make_key(bytes: &[u8; 32]) -> Key {
    Key {
        id: key_id(bytes),
        cipher: XChaCha20Poly1305::new_from_slice(bytes).expect("a 32-byte key"),
        tokens: hmac_sha256(bytes, b"flowcore resume tokens v1"),
    }
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// How many bytes of a token's MAC a token carries: 128 bits, unguessable.
const TOKEN_MAC_BYTES: usize = 16;

fn parse_key(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).ok()?
    } else {
        BASE64.decode(text).ok()?
    };
    bytes.try_into().ok()
}

fn parse_keys(text: &str, separator: char, source_name: &str) -> Result<Vec<Key>, KeyError> {
    text.split(separator)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .enumerate()
        .map(|(i, t)| {
            parse_key(t)
                .map(|k| make_key(&k))
                .ok_or(KeyError::Malformed {
                    source_name: source_name.to_owned(),
                    position: i + 1,
                })
        })
        .collect()
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).expect("the operating system has no random source");
    key
}

/// The ring of credential keys.
pub struct Keyring {
    keys: RwLock<Vec<Key>>,
    /// The key file, when the keys are not from the environment.
    file: Option<PathBuf>,
    /// When [`Keyring::verify`] last read the key file again.
    reloaded: std::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current_id())
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// The keys of `FLOWCORE_ENCRYPTION_KEY` when it is set, else those of the data dir's key
    /// file (created with one new key when missing).
    pub fn load(env_keys: Option<&str>, data_dir: &Path) -> Result<Self, KeyError> {
        match env_keys {
            Some(text) => {
                let keys = parse_keys(text, ',', "FLOWCORE_ENCRYPTION_KEY")?;
                if keys.is_empty() {
                    return Err(KeyError::Malformed {
                        source_name: "FLOWCORE_ENCRYPTION_KEY".into(),
                        position: 1,
                    });
                }
                Ok(Self {
                    keys: RwLock::new(keys),
                    file: None,
                    reloaded: Default::default(),
                })
            }
            None => {
                let path = data_dir.join(KEY_FILE);
                let keys = read_or_create(&path)?;
                Ok(Self {
                    keys: RwLock::new(keys),
                    file: Some(path),
                    reloaded: Default::default(),
                })
            }
        }
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, Vec<Key>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The id of the key that encrypts.
    pub fn current_id(&self) -> String {
        self.keys()[0].id.clone()
    }

    /// Encrypts `plain` bound to `aad`: the key id and `nonce || ciphertext`.
    pub fn encrypt(&self, aad: &[u8], plain: &[u8]) -> (String, Vec<u8>) {
        let key = self.keys()[0].clone();
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the operating system has no random source");
        let sealed = key
            .cipher
            .encrypt(&XNonce::from(nonce), Payload { msg: plain, aad })
            .expect("XChaCha20-Poly1305 encrypts any message under 256 GiB");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        (key.id, out)
    }

    /// Decrypts what [`Keyring::encrypt`] produced. A key id the ring does not know makes a
    /// file-backed ring read its file again (another process may have rotated).
    pub fn decrypt(&self, key_id: &str, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        let find = |keys: &[Key]| keys.iter().find(|k| k.id == key_id).cloned();
        // Bound first: a guard in the match's scrutinee would live through the arms.
        let known = find(&self.keys());
        let key = match known {
            Some(key) => key,
            None => {
                let path = self
                    .file
                    .as_ref()
                    .ok_or_else(|| KeyError::UnknownKey(key_id.to_owned()))?;
                let fresh = read_or_create(path)?;
                let key = find(&fresh).ok_or_else(|| KeyError::UnknownKey(key_id.to_owned()))?;
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                key
            }
        };
        if sealed.len() < NONCE_LEN {
            return Err(KeyError::Corrupt(key_id.to_owned()));
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| KeyError::Corrupt(key_id.to_owned()))?;
        key.cipher
            .decrypt(&nonce, Payload { msg: body, aad })
            .map_err(|_| KeyError::Corrupt(key_id.to_owned()))
    }

    /// A token for `message` (a resume URL's run and signal): 16 bytes of an HMAC-SHA256 under a
    /// key derived from the current one, base64url. Nothing is stored: [`Keyring::verify`]
    /// checks it against every key of the ring, so tokens outlive a rotation while the old key
    /// stays in the ring.
    pub fn sign(&self, message: &[u8]) -> String {
        let key = self.keys()[0].tokens;
        URL_SAFE_NO_PAD.encode(&hmac_sha256(&key, message)[..TOKEN_MAC_BYTES])
    }

    /// Whether `token` is [`Keyring::sign`]'s for `message` under a key of the ring (compared
    /// in constant time).
    pub fn verify(&self, message: &[u8], token: &str) -> bool {
        use subtle::ConstantTimeEq;
        let Ok(given) = URL_SAFE_NO_PAD.decode(token) else {
            return false;
        };
        if given.len() != TOKEN_MAC_BYTES {
            return false;
        }
        let matches = |keys: &[Key]| {
            keys.iter().any(|key| {
                let mac = hmac_sha256(&key.tokens, message);
                bool::from(mac[..TOKEN_MAC_BYTES].ct_eq(&given))
            })
        };
        if matches(&self.keys()) {
            return true;
        }
        // Another process may have made a new key current (`rotate-key`) and signed with it:
        // the key file is read again, at most every 10 s (a stranger's forged tokens must not
        // make every request read it).
        let Some(path) = &self.file else {
            return false;
        };
        {
            let mut last = self.reloaded.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(10)) {
                return false;
            }
            *last = Some(std::time::Instant::now());
        }
        match read_or_create(path) {
            Ok(fresh) => {
                let found = matches(&fresh);
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                found
            }
            Err(_) => false,
        }
    }

    /// Makes a new key the current one. With a key file, the new key is written first in the
    /// file (older keys stay); with `FLOWCORE_ENCRYPTION_KEY`, the first key of the variable is
    /// already the newest and nothing changes. Returns the current key's id.
    pub fn rotate(&self) -> Result<String, KeyError> {
        let Some(path) = &self.file else {
            return Ok(self.current_id());
        };
        let mut keys = read_or_create(path)?;
        let bytes = random_key();
        let existing = std::fs::read_to_string(path).map_err(|error| KeyError::Io {
            path: path.clone(),
            error,
        })?;
        write_private(path, &format!("{}\n{existing}", BASE64.encode(bytes)), true)?;
        keys.insert(0, make_key(&bytes));
        let id = keys[0].id.clone();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(id)
    }
}

fn read_or_create(path: &Path) -> Result<Vec<Key>, KeyError> {
    let io = |error| KeyError::Io {
        path: path.to_owned(),
        error,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let keys = parse_keys(&text, '\n', &path.display().to_string())?;
            if keys.is_empty() {
                return Err(KeyError::Malformed {
                    source_name: path.display().to_string(),
                    position: 1,
                });
            }
            Ok(keys)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                flowcore_store::private_dir(dir).map_err(io)?;
            }
            // Several processes may start at once: the first to link its file wins, the others
            // read that one.
            match write_private(path, &format!("{}\n", BASE64.encode(random_key())), false) {
                Ok(()) => {}
                Err(KeyError::Io { error, .. })
                    if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            read_or_create(path)
        }
        Err(e) => Err(io(e)),
    }
}

/// Writes `text` to `path` with mode 0600 through a temporary file, so a reader never sees a
/// partial key file; `replace` false fails with `AlreadyExists` when the file exists.
fn write_private(path: &Path, text: &str, replace: bool) -> Result<(), KeyError> {
    use std::io::Write;
    let io = |error| KeyError::Io {
        path: path.to_owned(),
        error,
    };
    let tmp = path.with_extension(format!("tmp-{}", flowcore::ids::new_id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        if replace {
            std::fs::rename(&tmp, path)
        } else {
            std::fs::hard_link(&tmp, path)
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("flowcore-keys-{}", flowcore::ids::new_id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn generated_once_with_mode_0600_and_stable_across_loads() {
        let dir = dir();
        let ring = Keyring::load(None, &dir).unwrap();
        let (id, sealed) = ring.encrypt(b"cred-1", b"top secret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = Keyring::load(None, &dir).unwrap();
        assert_eq!(again.current_id(), id);
        assert_eq!(
            again.decrypt(&id, b"cred-1", &sealed).unwrap(),
            b"top secret"
        );
        // Bound to its record, and tamper-evident.
        assert!(matches!(
            again.decrypt(&id, b"cred-2", &sealed),
            Err(KeyError::Corrupt(_))
        ));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(again.decrypt(&id, b"cred-1", &flipped).is_err());
        assert!(!String::from_utf8_lossy(&sealed).contains("top secret"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotation_keeps_old_keys_readable_and_other_processes_reload() {
        let dir = dir();
        let ring = Keyring::load(None, &dir).unwrap();
        let other_process = Keyring::load(None, &dir).unwrap();
        let (old_id, old) = ring.encrypt(b"a", b"one");
        let new_id = ring.rotate().unwrap();
        assert_ne!(old_id, new_id);
        let (id, new) = ring.encrypt(b"b", b"two");
        assert_eq!(id, new_id);
        assert_eq!(ring.decrypt(&old_id, b"a", &old).unwrap(), b"one");
        // The other ring has not seen the new key yet: it reads the file again.
        assert_eq!(other_process.decrypt(&new_id, b"b", &new).unwrap(), b"two");
        assert_eq!(other_process.current_id(), new_id);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tokens_verify_under_every_key_of_the_ring_and_a_rotation_elsewhere() {
        let dir = dir();
        let ring = Keyring::load(None, &dir).unwrap();
        let other_process = Keyring::load(None, &dir).unwrap();
        let token = ring.sign(b"run\0approve");
        assert!(ring.verify(b"run\0approve", &token));
        assert!(!ring.verify(b"run\0reject", &token), "for its message only");
        assert!(!ring.verify(b"run\0approve", "AAAAAAAAAAAAAAAAAAAAAA"));
        assert!(!ring.verify(b"run\0approve", "not base64!"));
        ring.rotate().unwrap();
        let newer = ring.sign(b"run\0approve");
        assert_ne!(newer, token, "signed with the new key");
        assert!(
            ring.verify(b"run\0approve", &token),
            "old tokens stay valid"
        );
        // The other process has not seen the new key: it reads the file again, once.
        assert!(other_process.verify(b"run\0approve", &newer));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn keys_from_the_environment_in_hex_or_base64_newest_first() {
        let hex_key = "00".repeat(31) + "01";
        let b64_key = BASE64.encode([9u8; 32]);
        let ring = Keyring::load(
            Some(&format!("{b64_key}, {hex_key}")),
            Path::new("/nonexistent"),
        )
        .unwrap();
        let older = Keyring::load(Some(&hex_key), Path::new("/nonexistent")).unwrap();
        let (id, sealed) = older.encrypt(b"x", b"payload");
        assert_eq!(ring.decrypt(&id, b"x", &sealed).unwrap(), b"payload");
        assert_ne!(ring.current_id(), id);
        assert_eq!(ring.rotate().unwrap(), ring.current_id());
        assert!(matches!(
            Keyring::load(Some(&older.current_id()), Path::new("/x")),
            Err(KeyError::Malformed { position: 1, .. })
        ));
        let error = Keyring::load(Some(&format!("{hex_key},short")), Path::new("/x")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "FLOWCORE_ENCRYPTION_KEY: key 2 is not 32 bytes in hex (64 characters) or base64"
        );
        assert!(matches!(
            older.decrypt("feedfeedfeedfeed", b"x", &sealed),
            Err(KeyError::UnknownKey(_))
        ));
    }
}
