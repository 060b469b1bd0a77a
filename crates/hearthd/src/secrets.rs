//! Secrets at rest: values an organization stores by name (API keys, tokens), encrypted with
//! XChaCha20-Poly1305 under one 256-bit master key kept in a file
//! (`secrets.master_key_path`, default `<data_dir>/secrets/master.key`: exactly 32 bytes, mode
//! 0600 in a 0700 directory, made at the first start and written atomically).
//!
//! Each value gets a fresh random 192-bit nonce; the associated data binds the organization and
//! the name, so a ciphertext moved to another row, or a row changed by a byte, does not
//! decrypt. Every row records the id of the key that sealed it (16 hex digits derived from the
//! key, never the key), so a start with the wrong key file is refused instead of failing later.
//!
//! Values never reach logs, events, audit rows, API answers or error messages: a value is a
//! [`Secret`], whose `Debug` and `Display` say `[redacted]`, and only the gateway's
//! [`Secrets::resolve`] hands one out. Values of `HEARTH_SECRET_<NAME>` environment variables
//! (srv's env-file style) are read once at start ([`capture_env`]), taken out of hearthd's
//! environment so no child process inherits them, and serve as the host operator's secrets:
//! the fallback of organization `default` for names it has not stored.
//!
//! Rotation ([`Secrets::rotate`]) is crash-safe: the new key is written to
//! `<master_key_path>.new` first; every row is re-encrypted under it in one transaction; only
//! after the commit is the new file renamed over the old one (and the directory synced). A
//! start that finds `master.key.new` finishes the rotation when the rows carry the new key's id
//! and rolls it back (removes the file) when none does.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hearth_api::{ErrorCode, MAX_SECRET_BYTES, RotatedMasterKey, SecretInfo};
use sha2::{Digest, Sha256};
use tokio::sync::{RwLock, RwLockReadGuard};

use crate::store::secret::{Sealed, SecretRecord};
use crate::store::{Store, StoreError};

/// Bytes of a master key.
pub const KEY_LEN: usize = 32;
/// Bytes of an XChaCha20-Poly1305 nonce.
const NONCE_LEN: usize = 24;
/// Environment variables whose values are the host operator's secrets.
pub const ENV_PREFIX: &str = "HEARTH_SECRET_";
/// What the associated data of every sealed value starts with (the format's version).
const AAD_PREFIX: &[u8] = b"hearth secret v1\0";

/// A secret's value. `Debug` and `Display` never show it; its bytes are overwritten when it
/// is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself: for the gateway that sends it upstream, and for nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(std::mem::take(&mut self.0).into_bytes());
    }
}

/// Overwrites `bytes` before they are freed (best effort: the write is kept by `black_box`).
fn wipe(mut bytes: Vec<u8>) {
    bytes.fill(0);
    std::hint::black_box(&bytes);
}

/// A master key and its id. `Debug` shows the id only.
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    bytes: [u8; KEY_LEN],
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.bytes.fill(0);
        std::hint::black_box(&self.bytes);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` bytes from the kernel's random number generator.
fn random<const N: usize>() -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// The associated data of a value: the format's version, the organization and the name
/// (neither can hold a NUL, so the encoding is unambiguous).
fn aad(org: &str, name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_PREFIX.len() + org.len() + name.len() + 1);
    aad.extend_from_slice(AAD_PREFIX);
    aad.extend_from_slice(org.as_bytes());
    aad.push(0);
    aad.extend_from_slice(name.as_bytes());
    aad
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> MasterKey {
        let mut h = Sha256::new();
        h.update(b"hearth master key id\0");
        h.update(bytes);
        MasterKey {
            id: hex(&h.finalize()[..8]),
            bytes,
        }
    }

    /// A new random key.
    pub fn generate() -> Result<MasterKey, SecretError> {
        Ok(MasterKey::from_bytes(
            random().map_err(SecretError::Random)?,
        ))
    }

    /// 16 hex digits derived from the key; they tell keys apart and reveal nothing of them.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&Key::from(self.bytes))
    }

    /// `value` encrypted for secret `name` of `org`, under a fresh random nonce.
    pub fn seal(&self, org: &str, name: &str, value: &Secret) -> Result<Sealed, SecretError> {
        let nonce: [u8; NONCE_LEN] = random().map_err(SecretError::Random)?;
        let ciphertext = self
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: value.expose().as_bytes(),
                    aad: &aad(org, name),
                },
            )
            .map_err(|_| SecretError::TooLarge {
                name: name.to_owned(),
                bytes: value.len(),
            })?;
        Ok(Sealed {
            ciphertext,
            nonce: nonce.to_vec(),
            key_id: self.id.clone(),
        })
    }

    /// The value of secret `name` of `org` from what [`MasterKey::seal`] made of it; fails
    /// for another key, another organization or name, or any changed byte.
    pub fn open(&self, org: &str, name: &str, sealed: &Sealed) -> Result<Secret, SecretError> {
        let undecryptable = || SecretError::Undecryptable {
            org: org.to_owned(),
            name: name.to_owned(),
            sealed_with: sealed.key_id.clone(),
            key_id: self.id.clone(),
        };
        let nonce: [u8; NONCE_LEN] = sealed
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| undecryptable())?;
        let plain = self
            .cipher()
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad(org, name),
                },
            )
            .map_err(|_| undecryptable())?;
        match String::from_utf8(plain) {
            Ok(text) => Ok(Secret(text)),
            Err(e) => {
                wipe(e.into_bytes());
                Err(undecryptable())
            }
        }
    }
}

/// What can go wrong with secrets. No message ever holds a value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "secret name {0:?} is not valid: 1-64 characters, uppercase letters, digits and '_', starting with a letter (an environment variable's name, such as OPENAI_API_KEY)"
    )]
    InvalidName(String),
    #[error("the value of secret {0:?} is empty: a secret needs at least one byte")]
    Empty(String),
    #[error("the value of secret {name:?} is {bytes} bytes: at most 65536 (64 KiB)")]
    TooLarge { name: String, bytes: usize },
    #[error("organization {org:?} has no secret {name:?}")]
    NotFound { org: String, name: String },
    #[error(
        "secret {name:?} of organization {org:?} (sealed with master key {sealed_with}) does not decrypt with master key {key_id}: its row was changed or moved from another"
    )]
    Undecryptable {
        org: String,
        name: String,
        sealed_with: String,
        key_id: String,
    },
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("cannot read random numbers from /dev/urandom")]
    Random(#[source] io::Error),
    #[error(
        "a master key rotation is pending ({0} exists): restart hearthd, which finishes or rolls it back"
    )]
    RotationPending(String),
    #[error(
        "the secrets are re-encrypted under master key {key_id}, but {path} could not be renamed into place; the next start of hearthd finishes it"
    )]
    Finish {
        key_id: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the secrets store failed")]
    Store(#[from] StoreError),
}

impl SecretError {
    /// The API code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            SecretError::InvalidName(_) => ErrorCode::InvalidName,
            SecretError::Empty(_) | SecretError::TooLarge { .. } => ErrorCode::InvalidRequest,
            SecretError::NotFound { .. } => ErrorCode::SecretNotFound,
            SecretError::Store(StoreError::NoOrg(_)) => ErrorCode::OrgNotFound,
            SecretError::Undecryptable { .. }
            | SecretError::KeyFile(_)
            | SecretError::Random(_)
            | SecretError::RotationPending(_)
            | SecretError::Finish { .. }
            | SecretError::Store(_) => ErrorCode::Internal,
        }
    }
}

/// Why the master key file cannot be used. Each stops hearthd at start, naming the path and
/// the rule.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error(
        "master key file {path} is missing, but the store holds {secrets} secrets sealed with master key {key_ids}: put the file back (from a backup) at secrets.master_key_path; a new key would decrypt none of them"
    )]
    Missing {
        path: String,
        secrets: u64,
        key_ids: String,
    },
    #[error("master key file {path} cannot be read")]
    Unreadable {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "master key file {path} is not a regular file (symlinks, directories and devices are refused): it must be a file of exactly 32 bytes"
    )]
    NotAFile { path: String },
    #[error("master key file {path} is {len} bytes: a master key is exactly 32 bytes (256 bits)")]
    WrongSize { path: String, len: u64 },
    #[error(
        "master key file {path} has mode {mode:04o}: group and others must have no access to it (chmod 600 {path})"
    )]
    TooOpen { path: String, mode: u32 },
    #[error(
        "master key file {path} holds master key {file_key}, but the store has secrets sealed with {stored}: it is not their key; put the right file at secrets.master_key_path"
    )]
    WrongKey {
        path: String,
        file_key: String,
        stored: String,
    },
    #[error("cannot write master key file {path}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "an interrupted master key rotation cannot be settled: the store has secrets sealed with the pending key {pending} of {path} and with others ({others}); restore the database and key files from a backup"
    )]
    Mixed {
        path: String,
        pending: String,
        others: String,
    },
}

/// Checks a secret's name: `^[A-Z][A-Z0-9_]{0,63}$`.
pub fn check_name(name: &str) -> Result<(), SecretError> {
    let mut chars = name.chars();
    let ok = name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(SecretError::InvalidName(name.to_owned()))
    }
}

/// Checks a value's size: 1 to [`MAX_SECRET_BYTES`] bytes.
pub fn check_value(name: &str, value: &Secret) -> Result<(), SecretError> {
    if value.is_empty() {
        return Err(SecretError::Empty(name.to_owned()));
    }
    if value.len() > MAX_SECRET_BYTES {
        return Err(SecretError::TooLarge {
            name: name.to_owned(),
            bytes: value.len(),
        });
    }
    Ok(())
}

/// Reads a master key file: `None` when there is none; refused when it is not a regular file,
/// is open to group or others, or is not exactly [`KEY_LEN`] bytes.
fn read_key(path: &Path) -> Result<Option<MasterKey>, KeyFileError> {
    let shown = path.display().to_string();
    let unreadable = |source| KeyFileError::Unreadable {
        path: shown.clone(),
        source,
    };
    // No symlinks; no waiting on a FIFO put there.
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(KeyFileError::NotAFile { path: shown });
        }
        Err(e) => return Err(unreadable(e)),
    };
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile { path: shown });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen { path: shown, mode });
    }
    if meta.len() != KEY_LEN as u64 {
        return Err(KeyFileError::WrongSize {
            path: shown,
            len: meta.len(),
        });
    }
    let mut bytes = [0u8; KEY_LEN];
    file.read_exact(&mut bytes).map_err(unreadable)?;
    let key = MasterKey::from_bytes(bytes);
    bytes.fill(0);
    Ok(Some(key))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `key` to `path`, which must not exist: its directory made 0700 when missing, the key
/// written to a temporary file (0600) and synced, then linked into place (never over another
/// file) and the directory synced, so a crash leaves either no file or the whole key.
fn write_key(path: &Path, key: &MasterKey) -> Result<(), KeyFileError> {
    let shown = path.display().to_string();
    let write = |source| KeyFileError::Write {
        path: shown.clone(),
        source,
    };
    let dir = parent_of(path);
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(write)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}",
        hex(&random::<8>().map_err(write)?)
    ));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        file.write_all(&key.bytes)?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    written.map_err(write)?;
    sync_dir(dir).map_err(write)
}

/// Removes the temporary files [`write_key`] leaves when hearthd dies before it links one into
/// place (keys that never sealed anything) beside the key file at `path`.
fn remove_stale_temporaries(path: &Path) {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let prefixes = [format!(".{name}.tmp-"), format!(".{name}.new.tmp-")];
    let Ok(entries) = std::fs::read_dir(parent_of(path)) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if prefixes.iter().any(|p| file.starts_with(p.as_str()))
            && entry.file_type().is_ok_and(|t| t.is_file())
        {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(path = %entry.path().display(), "removed the temporary key file of an interrupted write")
                }
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a temporary key file")
                }
            }
        }
    }
}

/// `path` with `.new` appended: where a rotation's new key waits for its commit.
fn pending_path(path: &Path) -> PathBuf {
    let mut p = OsString::from(path.as_os_str());
    p.push(".new");
    PathBuf::from(p)
}

/// The `HEARTH_SECRET_<NAME>` values hearthd started with, by name.
#[derive(Clone, Default)]
pub struct EnvSecrets(HashMap<String, Secret>);

impl fmt::Debug for EnvSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.0.keys().collect();
        names.sort();
        f.debug_tuple("EnvSecrets").field(&names).finish()
    }
}

impl EnvSecrets {
    /// The secrets among `vars` (name, value): those named `HEARTH_SECRET_<NAME>` with a valid
    /// `NAME`.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> EnvSecrets {
        EnvSecrets(
            vars.into_iter()
                .filter_map(|(k, v)| {
                    let name = k.strip_prefix(ENV_PREFIX)?;
                    check_name(name).ok()?;
                    Some((name.to_owned(), Secret(v)))
                })
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.0.get(name)
    }
}

static ENV: OnceLock<EnvSecrets> = OnceLock::new();

/// Takes the `HEARTH_SECRET_*` variables out of hearthd's environment, keeping their values
/// for [`Secrets::resolve`], so that no process hearthd starts (QEMU, the helper, the SSH
/// command account's CLI) inherits them. Returns the names of those whose name or value cannot
/// be used (not `HEARTH_SECRET_` and a valid name, or not UTF-8); they are removed too.
///
/// Must run before any other thread exists: `main` calls it first.
pub fn capture_env() -> Vec<String> {
    let mut found = Vec::new();
    let mut unusable = Vec::new();
    let mut remove = Vec::new();
    for (key, value) in std::env::vars_os() {
        let Some(key) = key.to_str().map(str::to_owned) else {
            continue;
        };
        let Some(name) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        match (check_name(name), value.into_string()) {
            (Ok(()), Ok(value)) => found.push((key.clone(), value)),
            _ => unusable.push(key.clone()),
        }
        remove.push(key);
    }
    for key in remove {
        // SAFETY: `main` calls this before it starts the async runtime or any other thread,
        // so nothing reads or writes the environment concurrently.
        unsafe { std::env::remove_var(&key) };
    }
    let _ = ENV.set(EnvSecrets::from_vars(found));
    unusable
}

/// The secrets of every organization, and the master key that seals them. Cheap to share.
#[derive(Debug)]
pub struct Secrets {
    store: Store,
    path: PathBuf,
    /// `None` until [`Secrets::open`] (or the first use) loads it. A rotation holds it for
    /// writing from start to end, so no value is sealed or opened with a key on its way out.
    key: RwLock<Option<MasterKey>>,
    env: EnvSecrets,
}

impl Secrets {
    /// The secrets of `store` under the key file at `path`, with the environment's secrets
    /// [`capture_env`] kept (none when it did not run).
    pub fn new(store: Store, path: PathBuf) -> Secrets {
        Secrets {
            store,
            path,
            key: RwLock::new(None),
            env: ENV.get().cloned().unwrap_or_default(),
        }
    }

    /// The same, with `env` as the environment's secrets.
    #[cfg(test)]
    pub fn with_env(mut self, env: EnvSecrets) -> Secrets {
        self.env = env;
        self
    }

    pub fn key_path(&self) -> &Path {
        &self.path
    }

    /// Loads the master key (making it at the first start, settling an interrupted rotation)
    /// and checks it is the key of the stored secrets. Returns its id. hearthd calls this at
    /// start, so a missing, unreadable, wrong-sized, too open or foreign key file stops it.
    pub async fn open(&self) -> Result<String, SecretError> {
        let mut slot = self.key.write().await;
        let key = self.load().await?;
        let id = key.id().to_owned();
        *slot = Some(key);
        Ok(id)
    }

    async fn load(&self) -> Result<MasterKey, SecretError> {
        remove_stale_temporaries(&self.path);
        let counts = self.store.secret_key_ids().await?;
        let total: u64 = counts.iter().map(|(_, n)| n).sum();
        let pending = pending_path(&self.path);
        let mut current = read_key(&self.path)?;
        if let Some(new) = read_key(&pending)? {
            let under_new: u64 = counts
                .iter()
                .filter(|(id, _)| *id == new.id)
                .map(|(_, n)| n)
                .sum();
            let shown = pending.display().to_string();
            if under_new > 0 && under_new == total {
                // The re-encryption committed; the rename did not happen.
                std::fs::rename(&pending, &self.path)
                    .and_then(|()| sync_dir(parent_of(&self.path)))
                    .map_err(|source| SecretError::Finish {
                        key_id: new.id.clone(),
                        path: shown.clone(),
                        source,
                    })?;
                tracing::warn!(
                    path = %self.path.display(),
                    key_id = %new.id,
                    "finished an interrupted master key rotation: the secrets were re-encrypted, and its new key is now in place"
                );
                current = Some(new);
            } else if under_new == 0 {
                // It never committed: the old key still seals everything.
                std::fs::remove_file(&pending)
                    .and_then(|()| sync_dir(parent_of(&pending)))
                    .map_err(|source| KeyFileError::Write {
                        path: shown.clone(),
                        source,
                    })?;
                tracing::warn!(
                    path = %shown,
                    "rolled back an interrupted master key rotation: it had not re-encrypted anything, so the old key stays"
                );
            } else {
                return Err(KeyFileError::Mixed {
                    path: shown,
                    pending: new.id.clone(),
                    others: ids_except(&counts, &new.id),
                }
                .into());
            }
        }
        match current {
            Some(key) => {
                let foreign = ids_except(&counts, &key.id);
                if !foreign.is_empty() {
                    return Err(KeyFileError::WrongKey {
                        path: self.path.display().to_string(),
                        file_key: key.id.clone(),
                        stored: foreign,
                    }
                    .into());
                }
                Ok(key)
            }
            None if total > 0 => Err(KeyFileError::Missing {
                path: self.path.display().to_string(),
                secrets: total,
                key_ids: ids_except(&counts, ""),
            }
            .into()),
            None => {
                let key = MasterKey::generate()?;
                match write_key(&self.path, &key) {
                    Ok(()) => {
                        tracing::info!(
                            path = %self.path.display(),
                            key_id = %key.id,
                            "made the master key of secrets; back it up apart from the database: without it no stored secret can be decrypted"
                        );
                        Ok(key)
                    }
                    // Another hearthd made it meanwhile: use that one.
                    Err(KeyFileError::Write { source, .. })
                        if source.kind() == io::ErrorKind::AlreadyExists =>
                    {
                        read_key(&self.path)?.ok_or_else(|| {
                            KeyFileError::Unreadable {
                                path: self.path.display().to_string(),
                                source,
                            }
                            .into()
                        })
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// The master key, loaded at the first use when [`Secrets::open`] did not run.
    async fn key(&self) -> Result<RwLockReadGuard<'_, MasterKey>, SecretError> {
        // A loaded key is never unloaded, so this loops at most twice.
        loop {
            if let Ok(key) = RwLockReadGuard::try_map(self.key.read().await, Option::as_ref) {
                return Ok(key);
            }
            let mut slot = self.key.write().await;
            if slot.is_none() {
                *slot = Some(self.load().await?);
            }
        }
    }

    /// Sets secret `name` of `org` to `value` (made by `by` when it is new). Returns what is
    /// listed of it and whether it is new.
    pub async fn set(
        &self,
        org: &str,
        name: &str,
        value: &Secret,
        by: &str,
    ) -> Result<(SecretInfo, bool), SecretError> {
        check_name(name)?;
        check_value(name, value)?;
        let key = self.key().await?;
        let now = crate::store::now();
        let record = SecretRecord {
            org: org.to_owned(),
            name: name.to_owned(),
            sealed: key.seal(org, name, value)?,
            created_at: now.clone(),
            created_by: by.to_owned(),
            updated_at: now,
        };
        let (stored, created) = self.store.put_secret(&record).await?;
        Ok((info(stored), created))
    }

    /// The secrets of `org`: names and history, never values.
    pub async fn list(&self, org: &str) -> Result<Vec<SecretInfo>, SecretError> {
        Ok(self
            .store
            .list_secrets(org)
            .await?
            .into_iter()
            .map(info)
            .collect())
    }

    pub async fn delete(&self, org: &str, name: &str) -> Result<(), SecretError> {
        check_name(name)?;
        if self.store.delete_secret(org, name).await? {
            Ok(())
        } else {
            Err(SecretError::NotFound {
                org: org.to_owned(),
                name: name.to_owned(),
            })
        }
    }

    /// The value of secret `name` for `org`, read now: the stored one, else (for organization
    /// `default`, the host operator's) the value of `HEARTH_SECRET_<NAME>` hearthd started
    /// with; `None` when neither exists. For the gateway, at request time.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "the integrations gateway (issue 17, part 2) reads secrets through it; tested here"
        )
    )]
    pub async fn resolve(&self, org: &str, name: &str) -> Result<Option<Secret>, SecretError> {
        check_name(name)?;
        // The key first: a rotation cannot then re-encrypt the row between its read and its
        // decryption.
        let key = self.key().await?;
        if let Some(record) = self.store.get_secret(org, name).await? {
            return key.open(org, name, &record.sealed).map(Some);
        }
        if org == crate::access::DEFAULT_ORG {
            return Ok(self.env.get(name).cloned());
        }
        Ok(None)
    }

    /// A new master key: every secret re-encrypted under it in one transaction, then the key
    /// file replaced. Afterwards the old key decrypts nothing.
    pub async fn rotate(&self) -> Result<RotatedMasterKey, SecretError> {
        let mut slot = self.key.write().await;
        let old = match slot.as_ref() {
            Some(key) => key.clone(),
            None => {
                let key = self.load().await?;
                *slot = Some(key.clone());
                key
            }
        };
        let new = self.stage_rotation()?;
        let secrets = match self.reseal(&old, &new).await {
            Ok(n) => n,
            Err(e) => {
                // Nothing was committed: the pending key goes.
                let _ = std::fs::remove_file(pending_path(&self.path));
                return Err(e);
            }
        };
        let key_id = new.id.clone();
        // From the commit on the rows are the new key's, whatever happens to the file.
        *slot = Some(new);
        self.finish_rotation(&key_id)?;
        tracing::info!(key_id = %key_id, secrets, "rotated the master key of secrets");
        Ok(RotatedMasterKey { key_id, secrets })
    }

    /// A rotation's first step: a new key, written to `<master_key_path>.new`.
    fn stage_rotation(&self) -> Result<MasterKey, SecretError> {
        let pending = pending_path(&self.path);
        if std::fs::symlink_metadata(&pending).is_ok() {
            return Err(SecretError::RotationPending(pending.display().to_string()));
        }
        let new = MasterKey::generate()?;
        write_key(&pending, &new)?;
        Ok(new)
    }

    /// A rotation's second step: every row re-encrypted under `new`, in one transaction.
    async fn reseal(&self, old: &MasterKey, new: &MasterKey) -> Result<u64, SecretError> {
        self.store
            .reseal_secrets(|r| {
                let value = old.open(&r.org, &r.name, &r.sealed)?;
                new.seal(&r.org, &r.name, &value)
            })
            .await
    }

    /// A rotation's last step, after the commit: the new key file renamed over the old one.
    fn finish_rotation(&self, key_id: &str) -> Result<(), SecretError> {
        let pending = pending_path(&self.path);
        std::fs::rename(&pending, &self.path)
            .and_then(|()| sync_dir(parent_of(&self.path)))
            .map_err(|source| SecretError::Finish {
                key_id: key_id.to_owned(),
                path: pending.display().to_string(),
                source,
            })
    }
}

/// The ids of `counts` other than `except`, comma-separated.
fn ids_except(counts: &[(String, u64)], except: &str) -> String {
    counts
        .iter()
        .filter(|(id, _)| id != except)
        .map(|(id, _)| id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn info(r: SecretRecord) -> SecretInfo {
    SecretInfo {
        name: r.name,
        org: r.org,
        created_at: r.created_at,
        created_by: r.created_by,
        updated_at: r.updated_at,
    }
}

#[cfg(test)]
mod tests;
