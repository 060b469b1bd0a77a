//! The REST API's request and response types, shared by `hearthd` (server) and `hearth` (CLI).
//!
//! Every type here appears in the OpenAPI document that `hearthd` generates; the committed copy is
//! `openapi.json` at the repository root, kept true by a test in `hearthd`.
//!
//! Errors have one shape, [`ErrorBody`], and one table, [`ErrorCode`], that gives each stable code
//! its HTTP status and the exit code the CLI returns for it.

use std::collections::BTreeMap;

mod access;
mod secret;
pub use access::*;
pub use secret::*;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Path prefix of every versioned endpoint.
pub const API_PREFIX: &str = "/v1";

/// Lifecycle state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Disk and record are being prepared.
    Creating,
    /// Not running; its disk is kept.
    Stopped,
    /// The VMM process is starting and the guest is booting.
    Starting,
    /// The guest agent answered; commands can run.
    Running,
    /// Its vCPUs are stopped (`hearth vm resume` continues it); it keeps its RAM, vCPUs and
    /// disk. Commands and file transfers wait for a resume; logs can be read.
    Paused,
    /// Shutting down.
    Stopping,
    /// A lifecycle step failed; `last_error` says which. Start or delete it.
    Error,
    /// Being deleted.
    Deleting,
}

impl VmState {
    pub const ALL: [VmState; 8] = [
        VmState::Creating,
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Error,
        VmState::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Error => "error",
            VmState::Deleting => "deleting",
        }
    }

    pub fn parse(s: &str) -> Option<VmState> {
        VmState::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VM as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    /// Stable identifier, never reused.
    pub id: String,
    /// Unique name: lowercase letters, digits and hyphens, starting with a letter.
    pub name: String,
    pub state: VmState,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Size of the root disk in MiB.
    pub rootfs_mib: u64,
    /// Guest image the root disk was made from (content hash).
    pub image: String,
    /// Backend that runs the VM (`qemu`, the only one today).
    pub vmm: String,
    /// Process id of the VMM while it runs.
    pub pid: Option<u32>,
    /// RFC 3339 time of creation.
    pub created_at: String,
    /// Who made it (for an imported VM: who made the VM it was exported from).
    pub created_by: String,
    /// The organization it belongs to; only its members (and host admins) see it.
    pub org: String,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
    /// Why the last lifecycle step failed, until the next one succeeds.
    pub last_error: Option<String>,
}

/// One recorded lifecycle transition or notable occurrence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmEvent {
    /// RFC 3339 time with milliseconds.
    pub at: String,
    /// What happened, e.g. `created`, `start_requested`, `running`, `stopped`, `start_failed`.
    pub kind: String,
    pub from_state: Option<VmState>,
    pub to_state: Option<VmState>,
    /// Human-readable detail; the error for failures.
    pub message: Option<String>,
}

/// A VM with its event history, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmDetail {
    #[serde(flatten)]
    pub vm: Vm,
    /// The VM's network; null for a VM made while networking was off.
    pub network: Option<VmNetwork>,
    /// The volumes attached to the VM, in the order it gets them as disks.
    pub volumes: Vec<VmVolume>,
    pub events: Vec<VmEvent>,
}

/// A volume attached to a VM, as `GET /v1/vms/{name}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmVolume {
    pub name: String,
    /// Where the guest mounts it.
    pub path: String,
    /// Its size in MiB.
    pub size_mib: u64,
}

/// A VM's network, as `GET /v1/vms/{name}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmNetwork {
    /// The VM's routable address (its /30's second address): how other VMs and the host reach it.
    pub address: String,
    /// The host's end of the VM's /30 (its first address).
    pub host_address: String,
    /// The VM's /30, e.g. `172.28.0.4/30`.
    pub subnet: String,
    /// The address the guest itself sees on its NIC (the same in every VM).
    pub guest_address: String,
    /// The guest's gateway and DNS server.
    pub guest_gateway: String,
    /// The guest NIC's MAC address (the same in every VM).
    pub mac: String,
    /// Private networks the VM is a member of.
    pub networks: Vec<String>,
    pub egress: EgressPolicy,
}

/// `allow_all`: everything not denied goes out; `deny_all`: only what is allowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    #[default]
    AllowAll,
    DenyAll,
}

/// A VM's egress policy: what it may reach outside `network.cidr` (other VMs are a matter of
/// private networks).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EgressPolicy {
    pub mode: EgressMode,
    /// Destinations allowed under `deny_all` (IPv4 CIDRs).
    pub allow_cidrs: Vec<String>,
    /// Destinations always denied (IPv4 CIDRs).
    pub deny_cidrs: Vec<String>,
    /// TCP ports `allow_cidrs` and `allow_domains` are limited to; empty: every port.
    pub allow_ports: Vec<u16>,
    /// Names (`api.example.com`, `*.example.com`) the VM may resolve and reach under `deny_all`;
    /// any other name does not resolve.
    pub allow_domains: Vec<String>,
}

/// An egress policy to set (on create, or `PUT /v1/vms/{name}/egress`). Allow lists without a
/// mode mean `deny_all`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressRequest {
    /// Default `deny_all` when an allow list is given, else `allow_all`.
    pub mode: Option<EgressMode>,
    /// IPv4 CIDRs such as `10.1.0.0/16` (a bare address means /32); at most 256.
    #[serde(default)]
    #[schema(max_items = 256)]
    pub allow_cidrs: Vec<String>,
    /// IPv4 CIDRs; at most 256.
    #[serde(default)]
    #[schema(max_items = 256)]
    pub deny_cidrs: Vec<String>,
    /// TCP ports 1-65535 (0 is refused); needs `allow_cidrs` or `allow_domains`; at most 64.
    /// The policy set replaces the VM's whole policy.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub allow_ports: Vec<u16>,
    /// `api.example.com` or `*.example.com`; at most 64.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub allow_domains: Vec<String>,
}

/// A private network: its members reach each other, nothing else reaches them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    pub name: String,
    /// The organization it belongs to.
    pub org: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Names of the member VMs.
    pub members: Vec<String>,
}

/// Body of `POST /v1/networks`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNetworkRequest {
    /// 1-63 characters: lowercase letters, digits and hyphens, starting with a letter.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z][a-z0-9-]{0,62}$")]
    pub name: String,
}

/// A size: an integer number of MiB, or a string with a unit such as `512M`, `2G` or `10G`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Size {
    Mib(u64),
    Text(String),
}

/// Body of `POST /v1/vms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// 1-63 characters: lowercase letters, digits and hyphens, starting with a letter.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z][a-z0-9-]{0,62}$")]
    pub name: String,
    /// 1 or an even number up to 32. Default from the server configuration.
    #[schema(minimum = 1, maximum = 32)]
    pub cpus: Option<u32>,
    /// Memory, at least 128 MiB. Default from the server configuration.
    pub ram: Option<Size>,
    /// Root disk size, at least the image's size. Default from the server configuration.
    pub rootfs_size: Option<Size>,
    /// Start the VM after creating it (default true).
    pub start: Option<bool>,
    /// Private networks to join (they must exist); at most 16.
    #[serde(default)]
    #[schema(max_items = 16)]
    pub networks: Vec<String>,
    /// Egress policy; default `allow_all`.
    pub egress: Option<EgressRequest>,
    /// Given to the guest by the metadata service (`/v1/user-data`); at most 64 KiB of UTF-8.
    pub user_data: Option<String>,
    /// OpenSSH public keys the metadata service gives the guest; at most 64.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub ssh_authorized_keys: Vec<String>,
    /// Volumes to attach (each must exist and be attached to no VM); at most 8.
    #[serde(default)]
    #[schema(max_items = 8)]
    pub volumes: Vec<VolumeAttachment>,
}

/// Body of `POST /v1/vms/{name}/resize`: the VM's new shape, for a stopped VM. Each field
/// that is given changes; at least one is needed. The root disk only grows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeVmRequest {
    /// 1 or an even number up to 32.
    #[schema(minimum = 1, maximum = 32)]
    pub cpus: Option<u32>,
    /// Memory, at least 128 MiB.
    pub ram: Option<Size>,
    /// Root disk size: at least its size now (the disk and its filesystem grow; they never
    /// shrink).
    pub rootfs_size: Option<Size>,
}

/// A backup of a VM's root disk, made while it was stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Backup {
    /// Unique id; `hearth restore VM ID` takes it.
    pub id: String,
    /// The VM it belongs to (and restores into), by name.
    pub vm: String,
    /// RFC 3339 time it was made.
    pub created_at: String,
    /// Who made it.
    pub created_by: String,
    /// The VM's shape when it was made.
    pub cpus: u32,
    pub memory_mib: u64,
    /// The size of the root disk it holds, in MiB.
    pub rootfs_mib: u64,
    /// What it takes on the host's disk, in bytes (a reflink clone shares what it has not
    /// changed since).
    pub size_bytes: u64,
}

/// A volume: a named extra disk (ext4) that outlives the VMs it is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    /// Stable identifier (16 hex digits); the guest sees it as the disk's serial.
    pub id: String,
    /// Unique name: lowercase letters, digits and hyphens, starting with a letter.
    pub name: String,
    /// Its size in MiB.
    pub size_mib: u64,
    /// RFC 3339 time of creation.
    pub created_at: String,
    /// True once it holds an ext4 filesystem (made at its first attach).
    pub formatted: bool,
    /// The VM it is attached to, by name; null when it is attached to none.
    pub vm: Option<String>,
    /// Where that VM mounts it; null when it is attached to none.
    pub path: Option<String>,
    /// What it takes on the host's disk, in bytes (the file is sparse).
    pub allocated_bytes: u64,
    /// The organization it belongs to.
    pub org: String,
}

/// Body of `POST /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// 1-63 characters: lowercase letters, digits and hyphens, starting with a letter.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z][a-z0-9-]{0,62}$")]
    pub name: String,
    /// At least 16 MiB, at most `volumes.max_size` (default 50G).
    pub size: Size,
}

/// Body of `PUT /v1/vms/{name}/volumes/{volume}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolumeRequest {
    /// Where the guest mounts it: an absolute path of at most 128 bytes of `A-Z a-z 0-9 . _ / -`,
    /// no `..` component, not `/` and not under `/proc`, `/sys` or `/dev`.
    #[schema(min_length = 2, max_length = 128, pattern = "^/[A-Za-z0-9._/-]*$")]
    pub path: String,
}

/// A volume to attach to a new VM (`CreateVmRequest.volumes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeAttachment {
    /// The volume's name; it must exist and be attached to no VM.
    pub name: String,
    /// Where the guest mounts it (the rule of `AttachVolumeRequest.path`).
    #[schema(min_length = 2, max_length = 128, pattern = "^/[A-Za-z0-9._/-]*$")]
    pub path: String,
}

/// Body of `POST /v1/vms/{name}/restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The id of one of the VM's own backups.
    pub backup: String,
}

/// Body of `POST /v1/vms/{name}/exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments, e.g. `["uname", "-a"]`. Not run through a shell.
    #[schema(min_items = 1)]
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute); `/` by default.
    pub cwd: Option<String>,
    /// Text given to the command's stdin; stdin is empty otherwise.
    pub stdin: Option<String>,
    /// Kill the command after this many seconds (at least 1).
    #[schema(minimum = 1)]
    pub timeout_secs: Option<u64>,
}

/// Result of a finished command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    /// Exit status when the command exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when a signal ended it.
    pub signal: Option<i32>,
    /// True when `timeout_secs` ran out and the command was killed.
    pub timed_out: bool,
    /// Output, decoded as UTF-8 (invalid bytes replaced).
    pub stdout: String,
    pub stderr: String,
    /// True when stdout or stderr went over 16 MiB and was cut; the streaming endpoints have no
    /// such limit.
    pub truncated: bool,
    /// Wall-clock time from request to exit, in milliseconds.
    pub duration_ms: u64,
}

/// One line of the newline-delimited JSON stream of `POST /v1/vms/{name}/exec/stream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecStreamEvent {
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    /// The last line.
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    /// The exec failed after the stream began; the last line.
    Error {
        error: ErrorCode,
        message: String,
    },
}

/// Terminal size for interactive sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TtySize {
    #[schema(maximum = 65535)]
    pub rows: u16,
    #[schema(maximum = 65535)]
    pub cols: u16,
}

/// Text messages a client sends on the exec WebSocket (`GET /v1/vms/{name}/exec/ws`).
/// The first message must be `start`. Binary messages after it are stdin bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WsClientMessage {
    Start {
        /// Program and arguments, as in `ExecRequest`.
        #[schema(min_items = 1)]
        command: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        cwd: Option<String>,
        /// Allocate a pseudo-terminal of this size.
        tty: Option<TtySize>,
        /// Forward stdin (binary messages); otherwise stdin is empty.
        #[serde(default)]
        stdin: bool,
        /// Kill the command after this many seconds (at least 1).
        #[schema(minimum = 1)]
        timeout_secs: Option<u64>,
    },
    /// End of stdin.
    Eof,
    Resize {
        size: TtySize,
    },
    Signal {
        signal: i32,
    },
}

/// Text messages the server sends on the exec WebSocket. Binary messages carry output: the first
/// byte is the stream ([`WS_STDOUT`] or [`WS_STDERR`]), the rest are its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WsServerMessage {
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    Error {
        error: ErrorCode,
        message: String,
    },
}

/// First byte of a binary WebSocket message carrying stdout.
pub const WS_STDOUT: u8 = 1;
/// First byte of a binary WebSocket message carrying stderr.
pub const WS_STDERR: u8 = 2;

/// One VM in `GET /v1/stats`: its state and shape, and while its VMM runs what that process
/// uses now (what `hearth top` shows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmStats {
    pub name: String,
    pub state: VmState,
    pub cpus: u32,
    pub memory_mib: u64,
    /// CPU time of the VM's VMM process so far, in seconds (its vCPUs and emulation); the
    /// difference between two samples over their interval is its CPU use.
    pub cpu_seconds: Option<f64>,
    /// Resident memory of the VMM process, in bytes.
    pub rss_bytes: Option<u64>,
    /// Seconds since the VMM process started.
    pub uptime_secs: Option<u64>,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// hearthd's version.
    pub version: String,
    /// VMM backend in use.
    pub vmm: String,
    /// How guests are accelerated: `kvm` or `tcg`.
    pub accel: String,
    /// Guest image VMs are created from, when it is ready.
    pub image: Option<String>,
    /// `ready`, `building: <step>` or `failed: <why>`.
    pub image_status: String,
    /// How VM disks and backups are copied on the data filesystem: `reflink` (clones that cost
    /// nothing until written), or `sparse (<why not reflink>)` (copies of the data).
    pub disk_copies: String,
    /// What VMs may commit on this host and what they have committed.
    pub capacity: Capacity,
    /// VM networking; null when `network.mode = "off"`.
    pub network: Option<NetworkHealth>,
}

/// The state of VM networking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkHealth {
    /// `ok`, or why the privileged helper cannot be used.
    pub helper: String,
    /// The helper's pid and version when it answers.
    pub helper_detail: Option<String>,
    /// `network.cidr`.
    pub cidr: String,
    /// /30s in `network.cidr`.
    pub subnets_total: u64,
    /// VMs holding a /30 (running or not).
    pub subnets_used: u64,
    /// Running VMs with a network slot.
    pub slots: u64,
}

/// Host capacity for VMs, after overcommit ratios and reserves (`capacity.*` in the config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Capacity {
    /// vCPUs of starting and running VMs.
    pub vcpus: Resource,
    /// Guest RAM of starting and running VMs, in MiB.
    pub memory_mib: Resource,
    /// Space for guest RAM files (a tmpfs; never overcommitted), in MiB.
    pub ram_files_mib: Resource,
    /// Provisioned root disks of all VMs, in MiB.
    pub disk_mib: Resource,
    /// Free space on the data directory's filesystem beyond the reserve, in MiB.
    pub disk_free_mib: u64,
}

/// One accounted resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Resource {
    /// What VMs may commit in all.
    pub total: u64,
    /// What they have committed.
    pub committed: u64,
    /// `total - committed`: what one more VM may ask for.
    pub available: u64,
}

/// Every error response's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code.
    pub error: ErrorCode,
    /// One sentence for people: what failed, naming the field and the rule for bad input.
    pub message: String,
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, $status:literal, $exit:literal; )*) => {
        /// Stable error codes. The one table of HTTP status and CLI exit code per code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as it appears in JSON.
            pub fn as_str(self) -> &'static str {
                match self { $( ErrorCode::$variant => $code, )* }
            }

            /// The HTTP status an API response with this code carries.
            pub fn http_status(self) -> u16 {
                match self { $( ErrorCode::$variant => $status, )* }
            }

            /// The exit code `hearth` (and the SSH surface) ends with for this error.
            pub fn exit_code(self) -> u8 {
                match self { $( ErrorCode::$variant => $exit, )* }
            }
        }
    };
}

error_codes! {
    /// The body or a parameter is malformed.
    InvalidRequest = "invalid_request", 400, 2;
    /// The VM name breaks the naming rule.
    InvalidName = "invalid_name", 400, 2;
    /// The vCPU count breaks the sizing rule.
    InvalidCpus = "invalid_cpus", 400, 2;
    /// The memory size breaks the sizing rule.
    InvalidRam = "invalid_ram", 400, 2;
    /// The root disk size breaks the sizing rule.
    InvalidRootfsSize = "invalid_rootfs_size", 400, 2;
    /// An import's archive is not a Hearth export this server reads, or is damaged or cut
    /// short (the message says what and where); nothing of it is kept.
    InvalidArchive = "invalid_archive", 400, 2;
    /// A volume size breaks the sizing rule (`volumes.max_size`).
    InvalidSize = "invalid_size", 400, 2;
    /// A guest path is not absolute or not valid.
    InvalidPath = "invalid_path", 400, 2;
    /// An exec command is empty or malformed.
    InvalidCommand = "invalid_command", 400, 2;
    /// The program an exec names does not exist in the guest (`hearth exec` exits 127, as a
    /// shell does).
    CommandNotFound = "command_not_found", 400, 127;
    /// No VM has that name or id.
    VmNotFound = "vm_not_found", 404, 3;
    /// No such endpoint.
    NotFound = "not_found", 404, 3;
    /// No private network has that name.
    NetworkNotFound = "network_not_found", 404, 3;
    /// The VM has no backup of that id (a backup belongs to the VM it was made of).
    BackupNotFound = "backup_not_found", 404, 3;
    /// No volume has that name.
    VolumeNotFound = "volume_not_found", 404, 3;
    /// The endpoint exists but not with this HTTP method.
    MethodNotAllowed = "method_not_allowed", 405, 2;
    /// No (or no valid) credential: send `Authorization: Bearer <api key>`.
    Unauthenticated = "unauthenticated", 401, 7;
    /// The caller is known but may not do this (the message names what it needs).
    PermissionDenied = "permission_denied", 403, 7;
    /// Too many failed logins from this address; the message says when to try again.
    RateLimited = "rate_limited", 429, 5;
    /// No such user (or none the caller may see).
    UserNotFound = "user_not_found", 404, 3;
    /// No such organization (or none the caller belongs to).
    OrgNotFound = "org_not_found", 404, 3;
    /// No such SSH or API key (or none of the caller's).
    KeyNotFound = "key_not_found", 404, 3;
    /// The organization the caller acts in has no secret of that name.
    SecretNotFound = "secret_not_found", 404, 3;
    /// The request's `Host` header names neither hearthd's listen address, a loopback name nor
    /// a name in `server.allowed_hosts` (a DNS-rebinding guard).
    ForbiddenHost = "forbidden_host", 403, 2;
    /// A browser sent the request from a page whose `Origin` is not in
    /// `server.allowed_origins` (nor hearthd's own).
    ForbiddenOrigin = "forbidden_origin", 403, 2;
    /// The request body is larger than `server.max_json_body_bytes`.
    RequestTooLarge = "request_too_large", 413, 2;
    /// The file does not exist in the guest.
    GuestFileNotFound = "guest_file_not_found", 404, 3;
    /// Another user or organization already has the name.
    NameTaken = "name_taken", 409, 4;
    /// Another VM already has the name.
    VmNameTaken = "vm_name_taken", 409, 4;
    /// Another private network already has the name.
    NetworkNameTaken = "network_name_taken", 409, 4;
    /// The private network still has members.
    NetworkInUse = "network_in_use", 409, 4;
    /// Another volume already has the name.
    VolumeNameTaken = "volume_name_taken", 409, 4;
    /// The volume is attached to a VM (the message names it): detach it first.
    VolumeInUse = "volume_in_use", 409, 4;
    /// The VM's state does not allow the operation (e.g. start a running VM).
    InvalidState = "invalid_state", 409, 4;
    /// Another lifecycle operation on this VM is in progress.
    VmBusy = "vm_busy", 409, 4;
    /// The host has not enough vCPUs, memory or RAM-file space left for the VM to run
    /// (admission control; the message names the resource, what was asked and what is free).
    InsufficientCapacity = "insufficient_capacity", 409, 4;
    /// The guest agent is not reachable (the VM is not running or still booting).
    GuestUnavailable = "guest_unavailable", 503, 5;
    /// The guest agent refused or failed the request.
    GuestError = "guest_error", 502, 1;
    /// The guest did not answer in time.
    GuestTimeout = "guest_timeout", 504, 6;
    /// The request took longer than the server waits; the operation itself goes on.
    OperationTimeout = "operation_timeout", 504, 6;
    /// The guest image is not built yet or failed to build.
    ImageUnavailable = "image_unavailable", 503, 5;
    /// The VMM failed to start or control the VM.
    VmmFailed = "vmm_failed", 500, 1;
    /// VM networking failed: the privileged helper is not reachable or refused the work.
    NetworkFailed = "network_failed", 503, 5;
    /// hearthd has as many requests (or streams) in hand and waiting as it takes; try again.
    Overloaded = "overloaded", 503, 5;
    /// The host ran out of something (disk space, memory), or a new disk would not fit.
    ResourceExhausted = "resource_exhausted", 507, 1;
    /// Anything else; the server log has details.
    Internal = "internal", 500, 1;
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Exit code of `hearth` when it cannot reach hearthd at all.
pub const EXIT_UNREACHABLE: u8 = 5;
/// Exit code of `hearth exec` when hearth itself failed (the command's own code otherwise).
pub const EXIT_EXEC_FAILED: u8 = 125;

/// Set (to `1`) in the environment of the `hearth` CLI that hearthd's SSH front end runs for a
/// remote caller. The CLI then reads and writes no file of the host it runs on (stdin and
/// stdout stand for local files), talks only to the `HEARTH_URL` it was given, and `exec`
/// always forwards stdin (the SSH channel's).
pub const REMOTE_ENV: &str = "HEARTH_REMOTE";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_serialize_as_their_names() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert!((400..600).contains(&code.http_status()));
            assert_ne!(code.exit_code(), 0);
        }
    }

    #[test]
    fn states_round_trip_through_text() {
        for s in VmState::ALL {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(VmState::parse("bogus"), None);
    }

    #[test]
    fn sizes_accept_numbers_and_text() {
        let r: CreateVmRequest =
            serde_json::from_str(r#"{"name":"a","ram":512,"rootfs_size":"10G"}"#).unwrap();
        assert_eq!(r.ram, Some(Size::Mib(512)));
        assert_eq!(r.rootfs_size, Some(Size::Text("10G".into())));
    }

    #[test]
    fn create_rejects_unknown_fields() {
        let err = serde_json::from_str::<CreateVmRequest>(r#"{"name":"a","memory":1}"#);
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("unknown field `memory`")
        );
    }
}
