//! Identities and access: users, organizations, SSH and API keys, and the audit log.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A user's role in an organization. Owners also manage its members; host admins (a user
/// flag, or `auth.admin_users`) see and act on everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Member => "member",
        }
    }
}

/// Who the caller is, as the server sees it (`GET /v1/whoami`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Whoami {
    /// The user's name; `operator` for a local caller under `auth.localhost_admin`.
    pub user: String,
    /// Host admin: sees and acts on every organization's VMs.
    pub admin: bool,
    /// The organization the caller acts in: the API key's, else the user's active one.
    pub org: Option<String>,
    /// The caller's role there.
    pub role: Option<Role>,
    /// How the caller authenticated: `api_key`, `ssh_session`, `local`.
    pub via: String,
    /// Every organization the user belongs to.
    pub orgs: Vec<OrgMembership>,
}

/// One organization a user belongs to, with the role there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrgMembership {
    pub org: String,
    pub role: Role,
}

/// A user as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub name: String,
    /// Host admin (the stored flag or `auth.admin_users`).
    pub admin: bool,
    /// The organization the user acts in over SSH (`hearth org switch`).
    pub active_org: Option<String>,
    pub orgs: Vec<OrgMembership>,
    /// How many SSH public keys the user has.
    pub ssh_keys: u32,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// Body of `POST /v1/users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    /// 1-32 characters: lowercase letters, digits, `-` and `_`, starting with a letter.
    #[schema(min_length = 1, max_length = 32, pattern = "^[a-z][a-z0-9_-]{0,31}$")]
    pub name: String,
    /// Make the user a host admin.
    #[serde(default)]
    pub admin: bool,
    /// The organization to put the user in; it must exist. Default: a new organization named
    /// after the user, with the user as its owner.
    #[serde(default)]
    pub org: Option<String>,
    /// The role in `org` (default `member`; `owner` for the user's own new organization).
    #[serde(default)]
    pub role: Option<Role>,
    /// An SSH public key (`ssh-ed25519 AAAA… comment`) to add at once.
    #[serde(default)]
    pub ssh_key: Option<String>,
}

/// An SSH public key of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SshKey {
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// The key's type, e.g. `ssh-ed25519`.
    pub kind: String,
    pub comment: String,
    pub user: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// Body of `POST /v1/users/{user}/ssh-keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddSshKeyRequest {
    /// One line of an OpenSSH public key file: `type base64 [comment]`.
    #[schema(min_length = 1, max_length = 16384)]
    pub public_key: String,
}

/// An API key as listed (the secret is shown once, at creation, and never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
    /// Public identifier; the key itself starts with `hk_<id>_`.
    pub id: String,
    pub name: String,
    pub user: String,
    /// The organization the key acts in.
    pub org: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// The answer of `POST /v1/api-keys`: the key, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedApiKey {
    /// The secret to send as `Authorization: Bearer <key>`. It is not shown again.
    pub key: String,
    pub api_key: ApiKey,
}

/// Body of `POST /v1/api-keys`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    /// A label, 1-64 printable characters (default `default`).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64)]
    pub name: Option<String>,
    /// The organization the key acts in (default: the caller's); the user must belong to it.
    #[serde(default)]
    pub org: Option<String>,
    /// Whose key it is (default: the caller; another user's needs a host admin).
    #[serde(default)]
    pub user: Option<String>,
}

/// An organization as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Org {
    pub name: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub members: Vec<OrgMember>,
}

/// A member of an organization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrgMember {
    pub user: String,
    pub role: Role,
}

/// Body of `POST /v1/orgs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrgRequest {
    /// 1-32 characters: lowercase letters, digits, `-` and `_`, starting with a letter.
    #[schema(min_length = 1, max_length = 32, pattern = "^[a-z][a-z0-9_-]{0,31}$")]
    pub name: String,
}

/// Body of `POST /v1/orgs/{org}/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    pub user: String,
    /// Default `member`.
    #[serde(default)]
    pub role: Option<Role>,
}

/// Body of `PUT /v1/whoami/org`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchOrgRequest {
    /// An organization the caller belongs to.
    pub org: String,
}

/// One audit record: a command or an authorization decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub seq: i64,
    /// RFC 3339 with milliseconds, UTC.
    pub at: String,
    /// The user (`operator` for local callers, `anonymous` before authentication).
    pub principal: String,
    /// The organization the caller acted in.
    pub org: Option<String>,
    /// Where it came from: `tcp:ADDR`, `unix`, `ssh:ADDR`, `internal`.
    pub source: String,
    /// The action (`create_vm`, `login`, `ssh_command`, …).
    pub action: String,
    /// What it named: a VM, network, volume, user, or the command line.
    pub target: Option<String>,
    /// `allow` or `deny`.
    pub decision: String,
    /// `ok`, or the error code.
    pub result: String,
    pub duration_ms: u64,
    pub request_id: String,
}
