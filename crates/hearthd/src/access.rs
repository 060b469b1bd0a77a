//! Who a caller is: API keys, SSH session keys and SSH public keys turned into an [`Identity`],
//! the first-run bootstrap, the rate limit of failed logins, and the audit log's writer.
//!
//! What a caller may do is decided in one place, `vm::access` (on the [`crate::vm::Caller`] of
//! every action); front ends only authenticate.
//!
//! API keys are `hk_<id>_<secret>`: the store keeps the SHA-256 of the whole key under the id,
//! and a presented key is hashed and compared in constant time. SSH session keys (`hs_…`, given
//! to the `hearth` CLI that runs one SSH command) live in memory only, for as long as the SSH
//! command runs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use base64::Engine;
use hearth_api::{ErrorCode, Role};
use sha2::{Digest, Sha256};

use crate::store::access::{AuditRecord, SshKeyRecord, UserRecord};
use crate::store::{Store, StoreError};
use crate::vm::{Caller, Principal, Source, VmError};

/// The organization of everything made before users existed, and of local callers' creates.
pub const DEFAULT_ORG: &str = "default";

/// Names no user may take: they stand for principals that are not users.
const RESERVED_USERS: &[&str] = &["operator", "system", "anonymous"];

/// Failed logins one address may make in [`FAILURE_WINDOW`] before it must wait.
const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses the limiter tracks at most; past it, the oldest window is forgotten.
const MAX_TRACKED: usize = 4096;
/// Every this many audit rows, the oldest beyond `audit.max_rows` are deleted.
const PRUNE_EVERY: u64 = 1000;

/// `auth.*` and `audit.*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Callers on the loopback interface or the unix socket act as the host's operator (a host
    /// admin) without a key.
    pub localhost_admin: bool,
    /// When not empty, only these users may log in at all.
    pub allowed_users: Vec<String>,
    /// Host admins, besides users whose stored flag says so.
    pub admin_users: Vec<String>,
    /// The admin the first start makes.
    pub bootstrap_admin: String,
    pub audit_max_rows: u64,
}

/// An authenticated user, as the caller of an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub admin: bool,
    /// The organization the caller acts in: the API key's, else the user's active one (none
    /// when the user belongs to none).
    pub org: Option<String>,
    pub role: Option<Role>,
    pub via: Via,
}

/// How a user authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    ApiKey(String),
    /// A key given to the CLI that runs one SSH command; acts in the user's active org.
    SshSession,
    SshKey,
}

impl Via {
    pub fn as_str(&self) -> &'static str {
        match self {
            Via::ApiKey(_) => "api_key",
            Via::SshSession => "ssh_session",
            Via::SshKey => "ssh_key",
        }
    }
}

/// The checks of a user or organization name (`^[a-z][a-z0-9_-]{0,31}$`).
pub fn check_name(field: &str, name: &str) -> Result<(), VmError> {
    let mut chars = name.chars();
    let ok = name.len() <= 32
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        return Err(VmError::access(
            ErrorCode::InvalidName,
            format!(
                "{field} {name:?} is not valid: 1-32 characters, lowercase letters, digits, '-' and '_', starting with a letter"
            ),
        ));
    }
    Ok(())
}

/// A new user's name: [`check_name`] and not one of the principals that are not users.
pub fn check_user_name(name: &str) -> Result<(), VmError> {
    check_name("name", name)?;
    if RESERVED_USERS.contains(&name) {
        return Err(VmError::access(
            ErrorCode::InvalidName,
            format!("name {name:?} is reserved (operator, system and anonymous are not users)"),
        ));
    }
    Ok(())
}

/// A parsed OpenSSH public key line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub kind: String,
    /// `type base64`, as stored.
    pub openssh: String,
    pub comment: String,
    /// `SHA256:…` as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Parses one line of an OpenSSH public key file (`type base64 [comment]`).
pub fn parse_public_key(line: &str) -> Result<PublicKey, VmError> {
    let bad = |why: &str| {
        VmError::access(
            ErrorCode::InvalidRequest,
            format!(
                "public_key is not an OpenSSH public key ({why}); give one line of a .pub file, e.g. ~/.ssh/id_ed25519.pub"
            ),
        )
    };
    let line = line.trim();
    if line.contains(['\n', '\r']) {
        return Err(bad("it has more than one line"));
    }
    let mut parts = line.splitn(3, char::is_whitespace);
    let kind = parts.next().unwrap_or_default();
    let data = parts
        .next()
        .ok_or_else(|| bad("no key data after the type"))?;
    let comment = parts.next().unwrap_or_default().trim();
    if !KEY_TYPES.contains(&kind) {
        return Err(bad(&format!(
            "type {kind:?} is none of {}",
            KEY_TYPES.join(", ")
        )));
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| bad("the key data is not base64"))?;
    // The blob starts with its own type, as an SSH string (u32 length, bytes).
    let inner = blob
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .and_then(|len| blob.get(4..4 + len));
    if inner != Some(kind.as_bytes()) {
        return Err(bad("the key data does not hold a key of its type"));
    }
    if comment.chars().any(char::is_control) || comment.len() > 256 {
        return Err(bad(
            "the comment is longer than 256 characters or has control characters",
        ));
    }
    let digest = Sha256::digest(&blob);
    Ok(PublicKey {
        kind: kind.to_owned(),
        openssh: format!("{kind} {data}"),
        comment: comment.to_owned(),
        fingerprint: format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        ),
    })
}

fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    // Keys must be unguessable: without the kernel's randomness there is no key.
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("/dev/urandom is readable");
    hex(&buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a key.
pub fn key_hash(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new API key for `id`: `hk_<id>_<64 hex digits>`.
pub fn new_api_key() -> (String, String) {
    let id = random_hex(8);
    let key = format!("hk_{id}_{}", random_hex(32));
    (id, key)
}

/// `(prefix, id)` of a presented key that has the shape of one of ours.
fn split_key(key: &str) -> Option<(&str, &str)> {
    let (prefix, rest) = key.split_at_checked(3)?;
    if prefix != "hk_" && prefix != "hs_" {
        return None;
    }
    let (id, secret) = rest.split_once('_')?;
    let shaped = id.len() == 16
        && secret.len() == 64
        && id
            .bytes()
            .chain(secret.bytes())
            .all(|b| b.is_ascii_hexdigit());
    shaped.then_some((prefix, id))
}

#[derive(Debug)]
struct Session {
    hash: String,
    user: String,
    source: Source,
}

/// Failed logins per address in the current window.
#[derive(Debug, Default)]
struct Limiter {
    windows: HashMap<IpAddr, (Instant, u32)>,
}

impl Limiter {
    /// How long `ip` must still wait, if it must.
    fn blocked(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let (start, count) = *self.windows.get(&ip)?;
        let age = now.duration_since(start);
        if age >= FAILURE_WINDOW {
            self.windows.remove(&ip);
            return None;
        }
        (count >= MAX_FAILURES).then(|| FAILURE_WINDOW - age)
    }

    /// Counts a failure; true when it is the one that reaches the limit.
    fn fail(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.windows.len() >= MAX_TRACKED && !self.windows.contains_key(&ip) {
            self.windows
                .retain(|_, (start, _)| now.duration_since(*start) < FAILURE_WINDOW);
            if self.windows.len() >= MAX_TRACKED
                && let Some(oldest) = self
                    .windows
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(ip, _)| *ip)
            {
                self.windows.remove(&oldest);
            }
        }
        let entry = self.windows.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 == MAX_FAILURES
    }
}

/// Authentication and the audit log. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Access {
    inner: Arc<AccessInner>,
}

#[derive(Debug)]
struct AccessInner {
    store: Store,
    config: AuthConfig,
    sessions: Mutex<HashMap<String, Session>>,
    limiter: Mutex<Limiter>,
    audited: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A session key; it stops working when this is dropped.
#[derive(Debug)]
pub struct SessionKey {
    id: String,
    secret: String,
    access: Weak<AccessInner>,
}

impl Drop for SessionKey {
    fn drop(&mut self) {
        if let Some(access) = self.access.upgrade() {
            lock(&access.sessions).remove(&self.id);
        }
    }
}

impl Access {
    pub fn new(store: Store, config: AuthConfig) -> Access {
        Access {
            inner: Arc::new(AccessInner {
                store,
                config,
                sessions: Mutex::default(),
                limiter: Mutex::default(),
                audited: AtomicU64::new(0),
            }),
        }
    }

    /// Makes the organization `default`, and at the first start the admin
    /// `auth.bootstrap_admin` in it. Returns that admin's name when it was made now.
    pub async fn bootstrap(&self) -> Result<Option<String>, StoreError> {
        let store = &self.inner.store;
        store.ensure_org(DEFAULT_ORG).await?;
        if store.count_users().await? > 0 {
            return Ok(None);
        }
        let name = self.inner.config.bootstrap_admin.clone();
        let user = UserRecord {
            name: name.clone(),
            admin: true,
            active_org: Some(DEFAULT_ORG.into()),
            created_at: crate::store::now(),
        };
        match store
            .create_user(&user, DEFAULT_ORG, false, Role::Owner, None)
            .await
        {
            // Another hearthd on the same database made it first.
            Err(StoreError::Taken(..)) => Ok(None),
            other => other.map(|()| Some(name)),
        }
    }

    /// A new API key for `user` in the organization it acts in, made straight in the store
    /// (`hearthd admin-key`, for a host whose API has no local operator). Returns the key and
    /// the organization.
    pub async fn mint_key(&self, user: &str, name: &str) -> Result<(String, String), VmError> {
        let store = &self.inner.store;
        let record = store
            .get_user(user)
            .await?
            .ok_or_else(|| VmError::access(ErrorCode::UserNotFound, format!("no user {user:?}")))?;
        let orgs = store.memberships(user).await?;
        let org = record
            .active_org
            .filter(|o| orgs.iter().any(|(m, _)| m == o))
            .or_else(|| orgs.first().map(|(o, _)| o.clone()))
            .ok_or_else(|| {
                VmError::access(
                    ErrorCode::OrgNotFound,
                    format!("user {user:?} belongs to no organization"),
                )
            })?;
        let (id, key) = new_api_key();
        store
            .insert_api_key(&crate::store::access::ApiKeyRecord {
                id,
                user: user.to_owned(),
                org: org.clone(),
                name: name.to_owned(),
                hash: key_hash(&key),
                created_at: crate::store::now(),
            })
            .await?;
        Ok((key, org))
    }

    /// Whether a caller from `source` without a key is the host's operator.
    pub fn is_local_admin(&self, source: &Source) -> bool {
        self.inner.config.localhost_admin
            && match source {
                Source::Tcp(addr) => addr.ip().is_loopback(),
                Source::UnixSocket | Source::Internal => true,
                Source::Ssh(_) => false,
            }
    }

    /// Refuses `ip` while it is over the limit of failed logins.
    pub fn check_rate(&self, ip: Option<IpAddr>) -> Result<(), VmError> {
        let Some(ip) = ip else { return Ok(()) };
        match lock(&self.inner.limiter).blocked(ip, Instant::now()) {
            Some(wait) => Err(VmError::access(
                ErrorCode::RateLimited,
                format!(
                    "too many failed logins from {ip}: try again in {} s",
                    wait.as_secs().max(1)
                ),
            )),
            None => Ok(()),
        }
    }

    /// Counts a failed login of `ip`; true when this one reached the limit.
    pub fn failed(&self, ip: Option<IpAddr>) -> bool {
        ip.is_some_and(|ip| lock(&self.inner.limiter).fail(ip, Instant::now()))
    }

    /// The identity behind a bearer key and, for a session key, where its SSH client is.
    pub async fn authenticate(&self, key: &str) -> Result<(Identity, Option<Source>), VmError> {
        let invalid = || {
            VmError::access(
                ErrorCode::Unauthenticated,
                "the API key is not valid: it was revoked, or never made here (make one with `hearth key create`)",
            )
        };
        let (prefix, id) = split_key(key).ok_or_else(invalid)?;
        let hash = key_hash(key);
        if prefix == "hs_" {
            let (user, source) = {
                let sessions = lock(&self.inner.sessions);
                let s = sessions.get(id).ok_or_else(invalid)?;
                if !constant_time_eq(s.hash.as_bytes(), hash.as_bytes()) {
                    return Err(invalid());
                }
                (s.user.clone(), s.source.clone())
            };
            let identity = self.resolve(&user, None, Via::SshSession).await?;
            return Ok((identity, Some(source)));
        }
        let record = self
            .inner
            .store
            .api_key(id)
            .await
            .map_err(VmError::from)?
            .ok_or_else(invalid)?;
        if !constant_time_eq(record.hash.as_bytes(), hash.as_bytes()) {
            return Err(invalid());
        }
        let identity = self
            .resolve(&record.user, Some(&record.org), Via::ApiKey(record.id))
            .await?;
        Ok((identity, None))
    }

    /// The user who has SSH public key `line`, if any (and allowed to log in).
    pub async fn ssh_user(&self, line: &str) -> Option<Identity> {
        let key = parse_public_key(line).ok()?;
        let record = self.inner.store.ssh_key(&key.fingerprint).await.ok()??;
        self.resolve(&record.user, None, Via::SshKey).await.ok()
    }

    /// A key by which a CLI acts as `identity`'s user (in the user's active organization,
    /// read at each request), from `source`, until the key is dropped.
    pub fn session_key(&self, identity: &Identity, source: Source) -> SessionKey {
        let id = random_hex(8);
        let secret = format!("hs_{id}_{}", random_hex(32));
        lock(&self.inner.sessions).insert(
            id.clone(),
            Session {
                hash: key_hash(&secret),
                user: identity.user.clone(),
                source,
            },
        );
        SessionKey {
            id,
            secret,
            access: Arc::downgrade(&self.inner),
        }
    }

    /// Whether `user` is a host admin.
    pub fn is_admin(&self, user: &UserRecord) -> bool {
        user.admin || self.inner.config.admin_users.contains(&user.name)
    }

    /// The identity of `user` acting in `org` (an API key's) or else in its active
    /// organization (the first it belongs to when that is gone).
    pub async fn resolve(
        &self,
        user: &str,
        org: Option<&str>,
        via: Via,
    ) -> Result<Identity, VmError> {
        let gone = || {
            VmError::access(
                ErrorCode::Unauthenticated,
                format!("user {user:?} no longer exists or may not log in"),
            )
        };
        let store = &self.inner.store;
        let record = store.get_user(user).await?.ok_or_else(gone)?;
        let allowed = &self.inner.config.allowed_users;
        if !allowed.is_empty() && !allowed.contains(&record.name) {
            return Err(VmError::access(
                ErrorCode::Unauthenticated,
                format!("user {user:?} is not in auth.allowed_users"),
            ));
        }
        let orgs = store.memberships(user).await?;
        let wanted = org.or(record.active_org.as_deref());
        let current = wanted
            .and_then(|w| orgs.iter().find(|(o, _)| o == w))
            .or_else(|| if org.is_some() { None } else { orgs.first() });
        Ok(Identity {
            admin: self.is_admin(&record),
            user: record.name,
            org: current.map(|(o, _)| o.clone()),
            role: current.map(|(_, r)| *r),
            via,
        })
    }

    /// Writes one audit row; every [`PRUNE_EVERY`] rows, drops the oldest beyond
    /// `audit.max_rows`. A failure to write is logged, never the caller's.
    pub async fn audit(&self, row: AuditRecord) {
        let store = &self.inner.store;
        if let Err(e) = store.insert_audit(&row).await {
            tracing::warn!(error = %e, action = %row.action, "cannot write the audit log");
            return;
        }
        if self.inner.audited.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1
            && let Err(e) = store.prune_audit(self.inner.config.audit_max_rows).await
        {
            tracing::warn!(error = %e, "cannot prune the audit log");
        }
    }

    /// Audits a refused login (no key, a bad key, an unknown SSH key, a rate-limited address).
    pub async fn refused(
        &self,
        source: &Source,
        action: &str,
        target: Option<String>,
        why: ErrorCode,
        request_id: &str,
    ) {
        self.audit(AuditRecord {
            at: crate::store::now(),
            principal: "anonymous".into(),
            org: None,
            source: source.to_string(),
            action: action.into(),
            target,
            allowed: false,
            result: why.as_str().into(),
            duration_ms: 0,
            request_id: request_id.into(),
        })
        .await;
    }

    /// An SSH public key row for `user`.
    pub fn ssh_key_record(user: &str, key: &PublicKey) -> SshKeyRecord {
        SshKeyRecord {
            fingerprint: key.fingerprint.clone(),
            user: user.to_owned(),
            public_key: key.openssh.clone(),
            comment: key.comment.clone(),
            created_at: crate::store::now(),
        }
    }
}

impl Caller {
    /// The caller for `identity`.
    pub fn user(identity: Identity, source: Source, request_id: String) -> Caller {
        Caller {
            principal: Principal::User(Arc::new(identity)),
            source,
            request_id,
        }
    }
}

impl crate::ssh::SessionKey for SessionKey {
    fn secret(&self) -> &str {
        &self.secret
    }
}

/// The SSH front end's logins: a public key stands for its user, acting in the user's active
/// organization; its commands' CLI acts by a session key.
impl crate::ssh::Identities for Access {
    fn caller_for_key<'a>(
        &'a self,
        key: &'a str,
        source: std::net::SocketAddr,
    ) -> futures_util::future::BoxFuture<'a, Option<Caller>> {
        Box::pin(async move {
            let identity = self.ssh_user(key).await?;
            Some(Caller::user(identity, Source::Ssh(source), random_hex(8)))
        })
    }

    fn session_key(&self, caller: &Caller) -> Box<dyn crate::ssh::SessionKey> {
        match &caller.principal {
            Principal::User(identity) => {
                Box::new(Access::session_key(self, identity, caller.source.clone()))
            }
            // Only users log in over SSH; any other caller gets a key that opens nothing.
            Principal::Operator | Principal::System => Box::new(SessionKey {
                id: String::new(),
                secret: String::new(),
                access: Weak::new(),
            }),
        }
    }

    fn attempt_allowed(&self, source: IpAddr) -> bool {
        self.check_rate(Some(source)).is_ok()
    }

    fn refused(&self, source: std::net::SocketAddr, user: &str, reason: &str) {
        self.failed(Some(source.ip()));
        let (access, user, reason) = (self.clone(), user.to_owned(), reason.to_owned());
        tokio::spawn(async move {
            access
                .audit(AuditRecord {
                    at: crate::store::now(),
                    principal: "anonymous".into(),
                    org: None,
                    source: Source::Ssh(source).to_string(),
                    action: "ssh_login".into(),
                    target: Some(user),
                    allowed: false,
                    result: reason,
                    duration_ms: 0,
                    request_id: random_hex(8),
                })
                .await;
        });
    }

    fn command_done(&self, caller: &Caller, command: &str, exit: u32, took: Duration) {
        let row = AuditRecord {
            at: crate::store::now(),
            principal: caller.principal.to_string(),
            org: caller.org().map(str::to_owned),
            source: caller.source.to_string(),
            action: "ssh_command".into(),
            target: Some(command.chars().take(1024).collect()),
            allowed: true,
            result: if exit == 0 {
                "ok".into()
            } else {
                format!("exit {exit}")
            },
            duration_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            request_id: caller.request_id.clone(),
        };
        let access = self.clone();
        tokio::spawn(async move { access.audit(row).await });
    }
}

#[cfg(test)]
mod tests;
