//! The vault: AES-256-GCM encryption of secrets at rest (captured CLI
//! credentials, upstream proxy passwords).
//!
//! - a fresh random 96-bit nonce for every encryption;
//! - associated data binds each record to what it belongs to (user, purpose,
//!   reference), so a record moved to another row does not decrypt;
//! - every record names the key that sealed it, so keys can rotate: a new key
//!   seals from then on, old keys keep opening until everything was re-sealed.
//!
//! A record is stored as text: `v1:<key id>:<base64 nonce>:<base64 ciphertext+tag>`.
//!
//! The keyring comes from, in order: the `AIRLOCK_VAULT_KEY` environment
//! variable (base64 of 32 bytes, key id `env`), a systemd credential named
//! `airlock-vault-key` (same format), or `<data_dir>/vault.keys`, created at first
//! start with mode 0600.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use secrecy::{ExposeSecret, SecretBox};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const RECORD_VERSION: &str = "v1";
const KEY_ENV: &str = "AIRLOCK_VAULT_KEY";
const CREDENTIAL_NAME: &str = "airlock-vault-key";
/// The keyring's file name in the data dir.
pub const KEYRING_FILE: &str = "vault.keys";

/// The lock file beside the keyring (see [`KeyringLock`]).
pub const KEYRING_LOCK_FILE: &str = "vault.lock";

/// A `flock` on `<data_dir>/vault.lock` that keeps a key from being retired
/// while a command outside the server seals with it. Commands that load the
/// keyring and then write a sealed row (`airlock egress …`) hold it shared
/// from loading to writing; `airlock vault rotate` holds it exclusively from
/// adding a key to retiring the old ones, so such a row is either written
/// before the rotation (and re-sealed by it) or sealed with the new keyring.
/// Released when dropped, or when the process ends however it does.
#[derive(Debug)]
pub struct KeyringLock {
    _file: std::fs::File,
}

impl KeyringLock {
    /// Wait for, then take, a shared hold.
    pub fn shared(data_dir: &Path) -> Result<Self, VaultError> {
        Self::take(data_dir, false)
    }

    /// Wait for, then take, the exclusive hold.
    pub fn exclusive(data_dir: &Path) -> Result<Self, VaultError> {
        Self::take(data_dir, true)
    }

    fn take(data_dir: &Path, exclusive: bool) -> Result<Self, VaultError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join(KEYRING_LOCK_FILE);
        let io = |source| VaultError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        if exclusive {
            file.lock().map_err(io)?;
        } else {
            file.lock_shared().map_err(io)?;
        }
        Ok(KeyringLock { _file: file })
    }
}

/// Narrow a keyring file that an older version (or a hand) left readable by
/// others to 0600.
fn owner_only(path: &Path) -> Result<(), VaultError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| VaultError::Io {
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the keyring was readable by others; making it 0600");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

/// Flush a directory entry change (a create or rename in `path`'s directory)
/// to disk.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("the vault record is malformed ({0})")]
    Malformed(&'static str),
    #[error("the vault record was sealed with key {0:?}, which this keyring does not hold")]
    UnknownKey(String),
    #[error("the vault record does not decrypt: it was altered, belongs to another owner, or the key is wrong")]
    Decrypt,
    #[error("the vault key from {source_name} is invalid: {why}")]
    BadKey { source_name: String, why: String },
    #[error("could not read or write the keyring {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the vault key {0:?} comes from the environment or a credential and cannot rotate here"
    )]
    ReadOnly(String),
}

/// What a record is bound to; any difference makes it fail to decrypt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aad(String);

impl Aad {
    pub fn new(user_id: &str, purpose: &str, reference: &str) -> Self {
        // Lengths first, so no choice of fields can collide with another.
        Aad(format!(
            "airlock/{}:{user_id}/{}:{purpose}/{}:{reference}",
            user_id.len(),
            purpose.len(),
            reference.len()
        ))
    }
}

type Key = SecretBox<[u8; 32]>;

#[derive(Serialize, Deserialize)]
struct KeyFile {
    current: String,
    keys: BTreeMap<String, String>,
}

/// The keys, and which one seals new records.
pub struct Vault {
    current: String,
    keys: BTreeMap<String, Key>,
    /// Where the keyring lives, when it is a file we may rewrite.
    file: Option<PathBuf>,
    /// False for a key from the environment or a credential: it cannot rotate.
    rotatable: bool,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("current", &self.current)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("file", &self.file)
            .finish()
    }
}

fn random_key() -> Key {
    SecretBox::new(Box::new(rand::random::<[u8; 32]>()))
}

fn decode_key(text: &str, source_name: &str) -> Result<Key, VaultError> {
    let bad = |why: &str| VaultError::BadKey {
        source_name: source_name.to_owned(),
        why: why.to_owned(),
    };
    let mut raw = B64.decode(text.trim()).map_err(|_| bad("not base64"))?;
    let key: [u8; 32] = raw.as_slice().try_into().map_err(|_| bad("not 32 bytes"))?;
    zeroize::Zeroize::zeroize(&mut raw);
    Ok(SecretBox::new(Box::new(key)))
}

impl Vault {
    /// A keyring with one fresh key, kept in memory only (tests).
    pub fn ephemeral() -> Self {
        Vault {
            current: "k1".into(),
            keys: [("k1".to_owned(), random_key())].into(),
            file: None,
            rotatable: true,
        }
    }

    /// The keyring for a data dir (see the module docs for the order).
    pub fn load(data_dir: &Path) -> Result<Self, VaultError> {
        if let Ok(text) = std::env::var(KEY_ENV) {
            return Ok(Vault {
                current: "env".into(),
                keys: [("env".to_owned(), decode_key(&text, KEY_ENV)?)].into(),
                file: None,
                rotatable: false,
            });
        }
        if let Ok(dir) = std::env::var("CREDENTIALS_DIRECTORY") {
            let path = Path::new(&dir).join(CREDENTIAL_NAME);
            if let Ok(text) = std::fs::read_to_string(&path) {
                let key = decode_key(&text, &path.display().to_string())?;
                return Ok(Vault {
                    current: "cred".into(),
                    keys: [("cred".to_owned(), key)].into(),
                    file: None,
                    rotatable: false,
                });
            }
        }
        let path = data_dir.join(KEYRING_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                owner_only(&path)?;
                Self::parse_file(&text, &path)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let vault = Vault {
                    current: "k1".into(),
                    keys: [("k1".to_owned(), random_key())].into(),
                    file: Some(path),
                    rotatable: true,
                };
                vault.save()?;
                Ok(vault)
            }
            Err(source) => Err(VaultError::Io { path, source }),
        }
    }

    fn parse_file(text: &str, path: &Path) -> Result<Self, VaultError> {
        let name = path.display().to_string();
        let file: KeyFile = serde_json::from_str(text).map_err(|e| VaultError::BadKey {
            source_name: name.clone(),
            why: format!("not a keyring: {e}"),
        })?;
        let mut keys = BTreeMap::new();
        for (id, text) in &file.keys {
            keys.insert(id.clone(), decode_key(text, &format!("{name} key {id}"))?);
        }
        if !keys.contains_key(&file.current) {
            return Err(VaultError::BadKey {
                source_name: name,
                why: format!("current key {:?} is missing", file.current),
            });
        }
        Ok(Vault {
            current: file.current,
            keys,
            file: Some(path.to_owned()),
            rotatable: true,
        })
    }

    fn save(&self) -> Result<(), VaultError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let Some(path) = &self.file else {
            return Ok(());
        };
        let file = KeyFile {
            current: self.current.clone(),
            keys: self
                .keys
                .iter()
                .map(|(id, k)| (id.clone(), B64.encode(k.expose_secret())))
                .collect(),
        };
        let mut text = serde_json::to_string_pretty(&file).unwrap_or_default();
        let tmp = path.with_extension("keys.tmp");
        let io = |source| VaultError::Io {
            path: path.clone(),
            source,
        };
        // A leftover temporary file may have any mode; start from none, so
        // `mode(0o600)` applies (it only does to a file it creates).
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let mut out = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        out.write_all(text.as_bytes()).map_err(io)?;
        out.sync_all().map_err(io)?;
        zeroize::Zeroize::zeroize(&mut text);
        std::fs::rename(&tmp, path).map_err(io)?;
        // The rename is only durable once the directory is: without this a
        // crash can bring back the old keyring after `rotate` has committed
        // records sealed under the new key.
        sync_parent(path).map_err(io)
    }

    pub fn current_key_id(&self) -> &str {
        &self.current
    }

    pub fn key_ids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// Encrypt under the current key.
    pub fn seal(&self, plaintext: &[u8], aad: &Aad) -> String {
        let key = &self.keys[&self.current];
        let cipher = Aes256Gcm::new(key.expose_secret().into());
        let nonce_bytes: [u8; 12] = rand::random();
        let nonce = Nonce::from_slice(&nonce_bytes);
        // Encryption with a valid key and nonce cannot fail for inputs this size.
        let ciphertext = cipher
            .encrypt(
                nonce,
                Payload {
                    msg: plaintext,
                    aad: aad.0.as_bytes(),
                },
            )
            .unwrap_or_default();
        format!(
            "{RECORD_VERSION}:{}:{}:{}",
            self.current,
            B64.encode(nonce_bytes),
            B64.encode(ciphertext)
        )
    }

    /// Decrypt a record sealed by any key this keyring holds.
    pub fn open(&self, record: &str, aad: &Aad) -> Result<SecretBox<Vec<u8>>, VaultError> {
        let mut parts = record.split(':');
        let (Some(version), Some(key_id), Some(nonce), Some(body), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(VaultError::Malformed("expected four fields"));
        };
        if version != RECORD_VERSION {
            return Err(VaultError::Malformed("unknown record version"));
        }
        let key = self
            .keys
            .get(key_id)
            .ok_or_else(|| VaultError::UnknownKey(key_id.to_owned()))?;
        let nonce = B64
            .decode(nonce)
            .map_err(|_| VaultError::Malformed("nonce is not base64"))?;
        if nonce.len() != 12 {
            return Err(VaultError::Malformed("nonce is not 12 bytes"));
        }
        let body = B64
            .decode(body)
            .map_err(|_| VaultError::Malformed("ciphertext is not base64"))?;
        let cipher = Aes256Gcm::new(key.expose_secret().into());
        let plain = cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &body,
                    aad: aad.0.as_bytes(),
                },
            )
            .map_err(|_| VaultError::Decrypt)?;
        Ok(SecretBox::new(Box::new(plain)))
    }

    /// Which key sealed a record.
    pub fn key_of(record: &str) -> Option<&str> {
        record.split(':').nth(1)
    }

    /// Add a new key and make it current; returns its id. Old keys stay, so
    /// existing records still open, until [`Vault::retire`].
    pub fn rotate(&mut self) -> Result<String, VaultError> {
        if !self.rotatable {
            return Err(VaultError::ReadOnly(self.current.clone()));
        }
        let next = (1..)
            .map(|n| format!("k{n}"))
            .find(|id| !self.keys.contains_key(id))
            .unwrap_or_default();
        self.keys.insert(next.clone(), random_key());
        self.current = next.clone();
        self.save()?;
        Ok(next)
    }

    /// Drop every key but the current one that `in_use` does not name (the
    /// keys some stored record still names); returns the ones dropped.
    pub fn retire_unused(
        &mut self,
        in_use: &std::collections::BTreeSet<String>,
    ) -> Result<Vec<String>, VaultError> {
        let old: Vec<String> = self
            .keys
            .keys()
            .filter(|k| **k != self.current && !in_use.contains(*k))
            .cloned()
            .collect();
        if old.is_empty() {
            return Ok(old);
        }
        for id in &old {
            self.keys.remove(id);
        }
        self.save()?;
        Ok(old)
    }

    /// Where the keyring is kept, when it is a file.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

#[cfg(test)]
mod tests;
