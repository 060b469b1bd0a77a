//! hearthd's configuration: a TOML file, every key overridable by a `HEARTH_*` environment
//! variable, validated once at start.
//!
//! [`KEYS`] is the single list of keys: it drives environment overrides, the commented default
//! printed by `--generate-config`, and the README's reference table (checked by a test).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_api::Size;
use serde::Deserialize;

use crate::rules;

/// A configuration problem. Messages name the key (and its environment variable) and the rule.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("{key} (env {env}): {message}")]
    Invalid {
        key: &'static str,
        env: String,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    String,
    Integer,
    /// A list of strings; its environment variable separates them with commas.
    List,
    /// `true` or `false` (its environment variable also takes `1`/`0`, `on`/`off`).
    Bool,
}

/// One configuration key: its TOML path, type, default (as TOML) and documentation.
#[derive(Debug)]
pub struct Key {
    pub path: &'static str,
    pub kind: Kind,
    pub default: &'static str,
    pub doc: &'static str,
}

impl Key {
    /// `guest.cpus` → `HEARTH_GUEST_CPUS`.
    pub fn env_var(&self) -> String {
        format!(
            "HEARTH_{}",
            self.path.replace('.', "_").to_ascii_uppercase()
        )
    }
}

pub const KEYS: &[Key] = &[
    Key {
        path: "listen",
        kind: Kind::String,
        default: "\"127.0.0.1:7070\"",
        doc: "Address of the REST API. Callers from beyond loopback need an API key (`Authorization: Bearer`).",
    },
    Key {
        path: "data_dir",
        kind: Kind::String,
        default: "\"/var/lib/hearth\"",
        doc: "State directory: database, guest images, VM disks, logs and sockets.",
    },
    Key {
        path: "database_url",
        kind: Kind::String,
        default: "\"\"",
        doc: "Database URL: sqlite://PATH, or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (unencrypted: no TLS in this build). Empty means the embedded SQLite file <data_dir>/hearth.db.",
    },
    Key {
        path: "vmm",
        kind: Kind::String,
        default: "\"auto\"",
        doc: "VMM backend: auto, qemu or firecracker. auto runs QEMU (the only backend hearthd has today); firecracker is refused at start-up until its backend exists.",
    },
    Key {
        path: "log",
        kind: Kind::String,
        default: "\"info\"",
        doc: "Log filter (tracing syntax), e.g. info or hearthd=debug.",
    },
    Key {
        path: "log_format",
        kind: Kind::String,
        default: "\"text\"",
        doc: "text (one line per event; colours only on a terminal) or json (one JSON object per line, for journald or a log collector).",
    },
    Key {
        path: "guest.cpus",
        kind: Kind::Integer,
        default: "1",
        doc: "Default vCPUs of a new VM: 1 or an even number up to 32.",
    },
    Key {
        path: "guest.memory",
        kind: Kind::String,
        default: "\"1G\"",
        doc: "Default memory of a new VM, e.g. 512M or 2G; at least 128M.",
    },
    Key {
        path: "guest.rootfs_size",
        kind: Kind::String,
        default: "\"10G\"",
        doc: "Default root disk size of a new VM.",
    },
    Key {
        path: "guest.ready_timeout_secs",
        kind: Kind::Integer,
        default: "180",
        doc: "How long a starting VM may take until its guest agent answers.",
    },
    Key {
        path: "guest.stop_timeout_secs",
        kind: Kind::Integer,
        default: "30",
        doc: "How long a graceful stop may take before the VM is powered off by force.",
    },
    Key {
        path: "guest.log_max_bytes",
        kind: Kind::Integer,
        default: "8388608",
        doc: "Size at which a VM's serial and VMM logs are rotated (one old copy is kept).",
    },
    Key {
        path: "server.request_timeout_secs",
        kind: Kind::Integer,
        default: "600",
        doc: "Longest time one API request may take (streams and WebSockets excepted).",
    },
    Key {
        path: "server.shutdown_timeout_secs",
        kind: Kind::Integer,
        default: "30",
        doc: "On SIGTERM/SIGINT, how long to let requests in flight finish. VMs keep running.",
    },
    Key {
        path: "server.unix_socket",
        kind: Kind::String,
        default: "\"\"",
        doc: "Unix socket the API also listens on (mode 0660; no Host check there). Empty: <data_dir>/hearth.sock; off: none.",
    },
    Key {
        path: "server.unix_socket_group",
        kind: Kind::String,
        default: "\"\"",
        doc: "Group (name or gid) given the unix socket, so its members may use the API. Empty: hearthd's own group.",
    },
    Key {
        path: "server.allowed_hosts",
        kind: Kind::List,
        default: "[]",
        doc: "Host names requests may carry in Host besides loopback names and the listen address: exact, or *.example.com. Others get 403 forbidden_host (a DNS-rebinding guard).",
    },
    Key {
        path: "server.allowed_origins",
        kind: Kind::List,
        default: "[]",
        doc: "Web origins whose pages may call the API: exact (https://app.example.com) or a wildcard (https://*.example.com); * allows any. hearthd's own origin always may; other browser requests get 403 forbidden_origin.",
    },
    Key {
        path: "server.max_requests",
        kind: Kind::Integer,
        default: "64",
        doc: "Requests handled at once, streams excepted; more wait in a queue.",
    },
    Key {
        path: "server.max_queued_requests",
        kind: Kind::Integer,
        default: "256",
        doc: "Requests that may wait for one of server.max_requests; beyond that, 503 overloaded at once.",
    },
    Key {
        path: "server.max_streams",
        kind: Kind::Integer,
        default: "128",
        doc: "Streams open at once (exec WebSockets and streams, followed logs, file transfers), counted apart from server.max_requests; beyond that, 503 overloaded.",
    },
    Key {
        path: "server.max_json_body_bytes",
        kind: Kind::Integer,
        default: "1048576",
        doc: "Largest JSON request body; larger ones get 413 request_too_large. File uploads are streamed and not limited by this.",
    },
    Key {
        path: "ssh.listen",
        kind: Kind::String,
        default: "\"127.0.0.1:2222\"",
        doc: "Address of the SSH front end (`ssh -p PORT hearth@HOST <command>`, `ssh -p PORT <vm>@HOST`). Empty: no SSH. Public keys only, each a user's (`hearth user ssh-key add`).",
    },
    Key {
        path: "ssh.command_user",
        kind: Kind::String,
        default: "\"hearth\"",
        doc: "SSH user name of the command account; any other user name is the VM to open a shell or run a command in (so a VM of this name is not reachable over SSH).",
    },
    Key {
        path: "ssh.cli_path",
        kind: Kind::String,
        default: "\"\"",
        doc: "The hearth CLI the command account runs for each command (same version as hearthd). Empty: hearth beside hearthd.",
    },
    Key {
        path: "image.agent_path",
        kind: Kind::String,
        default: "\"\"",
        doc: "Static hearth-guest binary put into the guest initramfs: every VM boots it. Empty: hearth-guest beside hearthd.",
    },
    Key {
        path: "image.suite",
        kind: Kind::String,
        default: "\"bookworm\"",
        doc: "Debian suite of the guest root filesystem.",
    },
    Key {
        path: "image.mirror",
        kind: Kind::String,
        default: "\"\"",
        doc: "Debian mirror for debootstrap. Empty: the mirror of this machine's apt sources.",
    },
    Key {
        path: "qemu.binary",
        kind: Kind::String,
        default: "\"qemu-system-x86_64\"",
        doc: "QEMU system emulator (>= 8.2).",
    },
    Key {
        path: "qemu.accel",
        kind: Kind::String,
        default: "\"auto\"",
        doc: "auto, kvm or tcg. auto uses KVM only when it boots the guest kernel (a firmware probe at start, then the kernel itself once the image is ready; the verdict is cached per host boot); else tcg.",
    },
    Key {
        path: "capacity.cpu_overcommit_percent",
        kind: Kind::Integer,
        default: "400",
        doc: "vCPUs of starting and running VMs may add up to this percentage of the host's CPUs.",
    },
    Key {
        path: "capacity.memory_overcommit_percent",
        kind: Kind::Integer,
        default: "100",
        doc: "Guest RAM of starting and running VMs may add up to this percentage of the host's memory less capacity.memory_reserve.",
    },
    Key {
        path: "capacity.memory_reserve",
        kind: Kind::String,
        default: "\"1G\"",
        doc: "Host memory kept for the host itself and hearthd, never given to guests.",
    },
    Key {
        path: "capacity.disk_overcommit_percent",
        kind: Kind::Integer,
        default: "200",
        doc: "Root disks of all VMs (sparse files) may add up to this percentage of the data directory's filesystem.",
    },
    Key {
        path: "capacity.disk_reserve",
        kind: Kind::String,
        default: "\"2G\"",
        doc: "Free space kept on the data directory's filesystem: a create that would leave less is refused.",
    },
    Key {
        path: "volumes.max_size",
        kind: Kind::String,
        default: "\"50G\"",
        doc: "The largest volume `hearth volume create` makes (sparse files; a larger size is refused).",
    },
    Key {
        path: "volumes.min_free_disk",
        kind: Kind::String,
        default: "\"10G\"",
        doc: "Free space a volume create must leave on the data directory's filesystem, counting the whole new volume as used.",
    },
    Key {
        path: "network.mode",
        kind: Kind::String,
        default: "\"on\"",
        doc: "on: every VM gets its own network slot (needs hearth-helper: hearthd starts one itself when it runs as root and network.helper_socket is empty); off: VMs have no network at all.",
    },
    Key {
        path: "network.cidr",
        kind: Kind::String,
        default: "\"172.28.0.0/16\"",
        doc: "IPv4 network the VMs' /30s come from (host side .1, VM side .2). Must not overlap a route of the host; a prefix from /8 to /29.",
    },
    Key {
        path: "network.helper_socket",
        kind: Kind::String,
        default: "\"\"",
        doc: "Unix socket of a hearth-helper started separately (as root, e.g. by systemd), so hearthd can run unprivileged. Empty: hearthd, as root, starts its own helper on <data_dir>/helper.sock.",
    },
    Key {
        path: "network.outbound_interface",
        kind: Kind::String,
        default: "\"\"",
        doc: "Host interface VM traffic is masqueraded on. Empty: any interface that is not a VM's.",
    },
    Key {
        path: "network.dns_upstream",
        kind: Kind::List,
        default: "[]",
        doc: "Resolvers (IPv4, port 53 unless given as ADDR:PORT) the per-VM DNS forwarder asks. Empty: the nameservers of the host's /etc/resolv.conf.",
    },
    Key {
        path: "auth.localhost_admin",
        kind: Kind::Bool,
        default: "true",
        doc: "A caller without an API key on the loopback interface or the unix socket acts as the host's operator, a host admin. Right for a single-user host; on a host shared with other local users turn it off (any local user can reach loopback) and use API keys.",
    },
    Key {
        path: "auth.allowed_users",
        kind: Kind::List,
        default: "[]",
        doc: "When not empty, only these users may log in (API keys and SSH); the others' keys are refused.",
    },
    Key {
        path: "auth.admin_users",
        kind: Kind::List,
        default: "[]",
        doc: "Users who are host admins (see and act on every organization), besides those made with `hearth user create --admin`.",
    },
    Key {
        path: "auth.bootstrap_admin",
        kind: Kind::String,
        default: "\"admin\"",
        doc: "The host admin hearthd makes at its first start (in organization `default`), when the store has no user yet.",
    },
    Key {
        path: "audit.max_rows",
        kind: Kind::Integer,
        default: "1000000",
        doc: "The audit log keeps this many newest rows; older ones are deleted.",
    },
    Key {
        path: "secrets.master_key_path",
        kind: Kind::String,
        default: "\"\"",
        doc: "File of the 256-bit master key that encrypts secrets at rest (exactly 32 bytes, mode 0600; made at the first start, its directory 0700). Empty: <data_dir>/secrets/master.key. Back it up apart from the database: without it no stored secret can be decrypted.",
    },
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    data_dir: String,
    database_url: String,
    vmm: String,
    log: String,
    log_format: String,
    guest: RawGuest,
    server: RawServer,
    image: RawImage,
    qemu: RawQemu,
    capacity: RawCapacity,
    volumes: RawVolumes,
    network: RawNetwork,
    auth: RawAuth,
    audit: RawAudit,
    ssh: RawSsh,
    secrets: RawSecrets,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecrets {
    master_key_path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    localhost_admin: bool,
    allowed_users: Vec<String>,
    admin_users: Vec<String>,
    bootstrap_admin: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    max_rows: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    listen: String,
    command_user: String,
    cli_path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolumes {
    max_size: String,
    min_free_disk: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    mode: String,
    cidr: String,
    helper_socket: String,
    outbound_interface: String,
    dns_upstream: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuest {
    cpus: i64,
    memory: String,
    rootfs_size: String,
    ready_timeout_secs: i64,
    stop_timeout_secs: i64,
    log_max_bytes: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    request_timeout_secs: i64,
    shutdown_timeout_secs: i64,
    unix_socket: String,
    unix_socket_group: String,
    allowed_hosts: Vec<String>,
    allowed_origins: Vec<String>,
    max_requests: i64,
    max_queued_requests: i64,
    max_streams: i64,
    max_json_body_bytes: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    agent_path: String,
    suite: String,
    mirror: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapacity {
    cpu_overcommit_percent: i64,
    memory_overcommit_percent: i64,
    memory_reserve: String,
    disk_overcommit_percent: i64,
    disk_reserve: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQemu {
    binary: String,
    accel: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmChoice {
    Auto,
    Qemu,
    Firecracker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub vmm: VmmChoice,
    pub log: String,
    /// Log lines as JSON objects (`log_format = "json"`), else text.
    pub log_json: bool,
    pub guest: GuestDefaults,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub server: ServerConfig,
    pub image: ImageConfig,
    pub qemu_binary: PathBuf,
    pub accel: AccelChoice,
    pub capacity: CapacityConfig,
    pub volumes: VolumesConfig,
    /// `None` when `network.mode = "off"`.
    pub network: Option<NetworkConfig>,
    pub auth: crate::access::AuthConfig,
    pub ssh: SshConfig,
    /// The master key file of secrets (`secrets.master_key_path`).
    pub master_key_path: PathBuf,
}

/// The SSH front end (`ssh.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConfig {
    /// `None` when `ssh.listen` is empty: no SSH.
    pub listen: Option<SocketAddr>,
    /// The user name of the command account.
    pub command_user: String,
    /// The hearth CLI the command account runs.
    pub cli_path: PathBuf,
}

/// VM networking (`network.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub cidr: hearth_helper::proto::Cidr,
    /// `None`: hearthd starts its own helper on `<data_dir>/helper.sock`.
    pub helper_socket: Option<PathBuf>,
    pub outbound_interface: Option<String>,
    /// Empty: the host's resolvers, read at start.
    pub dns_upstream: Vec<std::net::SocketAddr>,
}

/// How much of the host VMs may commit (admission control, `crate::capacity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityConfig {
    pub cpu_overcommit_percent: u64,
    pub memory_overcommit_percent: u64,
    pub memory_reserve_mib: u64,
    pub disk_overcommit_percent: u64,
    pub disk_reserve_mib: u64,
}

/// Volume limits (`volumes.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumesConfig {
    pub max_size_mib: u64,
    pub min_free_disk_mib: u64,
}

#[derive(Debug, Clone)]
pub struct GuestDefaults {
    pub cpus: u32,
    pub memory_mib: u64,
    pub rootfs_mib: u64,
    pub ready_timeout: Duration,
    pub stop_timeout: Duration,
    pub log_max_bytes: u64,
}

/// Listeners, request guards and limits of the API.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The unix socket beside TCP, unless `server.unix_socket = "off"`.
    pub unix_socket: Option<PathBuf>,
    /// The group the socket is given (`None`: hearthd's own).
    pub unix_socket_group: Option<u32>,
    /// Lowercase host names or `*.suffix` patterns.
    pub allowed_hosts: Vec<String>,
    /// Lowercase origins, `scheme://*.suffix` patterns, or `*`.
    pub allowed_origins: Vec<String>,
    pub max_requests: usize,
    pub max_queued_requests: usize,
    pub max_streams: usize,
    pub max_json_body_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub agent_path: PathBuf,
    pub suite: String,
    pub mirror: Option<String>,
}

/// The commented default configuration printed by `hearthd --generate-config`.
pub fn generate_default() -> String {
    let mut out = String::from(
        "# hearthd configuration. Every key can be overridden by the environment variable named\n\
         # beside it; values are validated at start.\n",
    );
    let mut section = "";
    for key in KEYS {
        let (sec, name) = key.path.rsplit_once('.').unwrap_or(("", key.path));
        if sec != section {
            out.push_str(&format!("\n[{sec}]\n"));
            section = sec;
        }
        out.push_str(&format!(
            "\n# {} (env {})\n{name} = {}\n",
            key.doc,
            key.env_var(),
            key.default
        ));
    }
    out
}

impl Config {
    /// Loads the file (if any), applies environment overrides from `env`, and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            generate_default()
                .parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: "(built-in defaults)".into(),
                    message: e.to_string(),
                })?;
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let file: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Parse {
                        path: path.display().to_string(),
                        message: e.message().to_owned(),
                    })?;
            merge(&mut table, file, path)?;
        }
        for key in KEYS {
            if let Some(value) = env(&key.env_var()) {
                set(&mut table, key, &value)?;
            }
        }
        let raw: RawConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path.map_or("(environment)".into(), |p| p.display().to_string()),
                    message: e.message().to_owned(),
                })?;
        Self::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let listen = raw.listen.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "listen",
                format!("{:?} is not an address like 127.0.0.1:7070", raw.listen),
            )
        })?;
        let data_dir = PathBuf::from(&raw.data_dir);
        if !data_dir.is_absolute() {
            return Err(invalid(
                "data_dir",
                format!("{:?} must be an absolute path", raw.data_dir),
            ));
        }
        let database_url = if raw.database_url.is_empty() {
            format!("sqlite://{}", data_dir.join("hearth.db").display())
        } else if crate::store::Backend::of_url(&raw.database_url).is_some() {
            raw.database_url
        } else {
            return Err(invalid(
                "database_url",
                format!(
                    "{:?} is not supported: use sqlite://PATH or postgres://USER@HOST/DATABASE",
                    crate::store::redact_url(&raw.database_url)
                ),
            ));
        };
        let vmm = match raw.vmm.as_str() {
            "auto" => VmmChoice::Auto,
            "qemu" => VmmChoice::Qemu,
            "firecracker" => VmmChoice::Firecracker,
            other => {
                return Err(invalid(
                    "vmm",
                    format!("{other:?} is not one of auto, qemu, firecracker"),
                ));
            }
        };
        tracing_subscriber::EnvFilter::try_new(&raw.log)
            .map_err(|e| invalid("log", format!("{:?} is not a log filter: {e}", raw.log)))?;
        let log_json = match raw.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?} is not one of text, json"),
                ));
            }
        };
        let cpus = u32::try_from(raw.guest.cpus).unwrap_or(0);
        rules::validate_cpus(cpus).map_err(|e| invalid("guest.cpus", e.message))?;
        let memory_mib = rules::validate_ram(&Size::Text(raw.guest.memory.clone()))
            .map_err(|e| invalid("guest.memory", e.message))?;
        let rootfs_mib =
            rules::validate_rootfs(&Size::Text(raw.guest.rootfs_size.clone()), MIN_ROOTFS_MIB)
                .map_err(|e| invalid("guest.rootfs_size", e.message))?;
        let accel = match raw.qemu.accel.as_str() {
            "auto" => AccelChoice::Auto,
            "kvm" => AccelChoice::Kvm,
            "tcg" => AccelChoice::Tcg,
            other => {
                return Err(invalid(
                    "qemu.accel",
                    format!("{other:?} is not one of auto, kvm, tcg"),
                ));
            }
        };
        if raw.image.suite.is_empty()
            || !raw
                .image
                .suite
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '-')
        {
            return Err(invalid(
                "image.suite",
                format!("{:?} is not a Debian suite name", raw.image.suite),
            ));
        }
        let mirror = match raw.image.mirror.as_str() {
            "" => None,
            m if m.starts_with("http://")
                || m.starts_with("https://")
                || m.starts_with("file:/") =>
            {
                Some(m.trim_end_matches('/').to_owned())
            }
            m => {
                return Err(invalid(
                    "image.mirror",
                    format!("{m:?} must be an http://, https:// or file:/ URL"),
                ));
            }
        };
        let server = validate_server(&raw.server, &data_dir)?;
        let network = validate_network(&raw.network)?;
        for (key, names) in [
            ("auth.allowed_users", &raw.auth.allowed_users),
            ("auth.admin_users", &raw.auth.admin_users),
        ] {
            for name in names {
                crate::access::check_name("name", name).map_err(|e| invalid(key, e.message()))?;
            }
        }
        crate::access::check_user_name(&raw.auth.bootstrap_admin)
            .map_err(|e| invalid("auth.bootstrap_admin", e.message()))?;
        let auth = crate::access::AuthConfig {
            localhost_admin: raw.auth.localhost_admin,
            allowed_users: raw.auth.allowed_users,
            admin_users: raw.auth.admin_users,
            bootstrap_admin: raw.auth.bootstrap_admin,
            audit_max_rows: positive("audit.max_rows", raw.audit.max_rows, 1000)?,
        };
        let ssh = validate_ssh(&raw.ssh)?;
        let master_key_path = match raw.secrets.master_key_path.as_str() {
            "" => data_dir.join("secrets").join("master.key"),
            p if Path::new(p).is_absolute() && !p.ends_with('/') => PathBuf::from(p),
            p => {
                return Err(invalid(
                    "secrets.master_key_path",
                    format!(
                        "{p:?} must be the absolute path of a file, or empty (<data_dir>/secrets/master.key)"
                    ),
                ));
            }
        };
        let agent_path = if raw.image.agent_path.is_empty() {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("hearth-guest")))
                .unwrap_or_else(|| PathBuf::from("hearth-guest"))
        } else {
            PathBuf::from(&raw.image.agent_path)
        };
        Ok(Config {
            listen,
            data_dir,
            database_url,
            vmm,
            log: raw.log,
            log_json,
            guest: GuestDefaults {
                cpus,
                memory_mib,
                rootfs_mib,
                ready_timeout: secs("guest.ready_timeout_secs", raw.guest.ready_timeout_secs)?,
                stop_timeout: secs("guest.stop_timeout_secs", raw.guest.stop_timeout_secs)?,
                log_max_bytes: positive("guest.log_max_bytes", raw.guest.log_max_bytes, 4096)?,
            },
            request_timeout: secs(
                "server.request_timeout_secs",
                raw.server.request_timeout_secs,
            )?,
            shutdown_timeout: secs(
                "server.shutdown_timeout_secs",
                raw.server.shutdown_timeout_secs,
            )?,
            server,
            image: ImageConfig {
                agent_path,
                suite: raw.image.suite,
                mirror,
            },
            qemu_binary: PathBuf::from(raw.qemu.binary),
            accel,
            capacity: CapacityConfig {
                cpu_overcommit_percent: positive(
                    "capacity.cpu_overcommit_percent",
                    raw.capacity.cpu_overcommit_percent,
                    1,
                )?,
                memory_overcommit_percent: positive(
                    "capacity.memory_overcommit_percent",
                    raw.capacity.memory_overcommit_percent,
                    1,
                )?,
                memory_reserve_mib: size_mib(
                    "capacity.memory_reserve",
                    &raw.capacity.memory_reserve,
                )?,
                disk_overcommit_percent: positive(
                    "capacity.disk_overcommit_percent",
                    raw.capacity.disk_overcommit_percent,
                    1,
                )?,
                disk_reserve_mib: size_mib("capacity.disk_reserve", &raw.capacity.disk_reserve)?,
            },
            volumes: VolumesConfig {
                max_size_mib: volume_max(&raw.volumes.max_size)?,
                min_free_disk_mib: size_mib("volumes.min_free_disk", &raw.volumes.min_free_disk)?,
            },
            network,
            auth,
            ssh,
            master_key_path,
        })
    }
}

fn validate_ssh(raw: &RawSsh) -> Result<SshConfig, ConfigError> {
    let listen = match raw.listen.as_str() {
        "" => None,
        text => Some(text.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "ssh.listen",
                format!("{text:?} is not an address like 127.0.0.1:2222 (empty turns SSH off)"),
            )
        })?),
    };
    let user = raw.command_user.as_str();
    let user_ok = (1..=32).contains(&user.len())
        && user.starts_with(|c: char| c.is_ascii_lowercase())
        && user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !user_ok {
        return Err(invalid(
            "ssh.command_user",
            format!(
                "{user:?} is not a user name: 1 to 32 lowercase letters, digits, - and _, starting \
                 with a letter"
            ),
        ));
    }
    let cli_path = match raw.cli_path.as_str() {
        "" => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("hearth")))
            .unwrap_or_else(|| PathBuf::from("hearth")),
        p if Path::new(p).is_absolute() => PathBuf::from(p),
        p => {
            return Err(invalid(
                "ssh.cli_path",
                format!("{p:?} must be an absolute path, or empty (hearth beside hearthd)"),
            ));
        }
    };
    Ok(SshConfig {
        listen,
        command_user: user.to_owned(),
        cli_path,
    })
}

fn validate_network(raw: &RawNetwork) -> Result<Option<NetworkConfig>, ConfigError> {
    match raw.mode.as_str() {
        "on" => {}
        "off" => return Ok(None),
        other => {
            return Err(invalid(
                "network.mode",
                format!("{other:?} is not one of on, off"),
            ));
        }
    }
    let cidr: hearth_helper::proto::Cidr = raw
        .cidr
        .parse()
        .map_err(|e: hearth_helper::proto::CidrError| invalid("network.cidr", e.to_string()))?;
    // The helper's own rules, so what hearthd starts with is what the helper will accept.
    hearth_helper::validate::network_cidr("network.cidr", cidr)
        .map_err(|e| invalid("network.cidr", helper_rule(e)))?;
    let helper_socket = match raw.helper_socket.as_str() {
        "" => None,
        p if Path::new(p).is_absolute() => Some(PathBuf::from(p)),
        p => {
            return Err(invalid(
                "network.helper_socket",
                format!("{p:?} must be an absolute path, or empty"),
            ));
        }
    };
    let outbound_interface = match raw.outbound_interface.as_str() {
        "" => None,
        name => {
            hearth_helper::validate::interface("network.outbound_interface", name)
                .map_err(|e| invalid("network.outbound_interface", helper_rule(e)))?;
            Some(name.to_owned())
        }
    };
    let mut dns_upstream = Vec::new();
    for entry in &raw.dns_upstream {
        let addr = entry
            .parse::<std::net::SocketAddr>()
            .ok()
            .or_else(|| {
                entry
                    .parse::<std::net::Ipv4Addr>()
                    .ok()
                    .map(|ip| std::net::SocketAddr::from((ip, 53)))
            })
            .filter(std::net::SocketAddr::is_ipv4)
            .ok_or_else(|| {
                invalid(
                    "network.dns_upstream",
                    format!("{entry:?} is not an IPv4 address or ADDR:PORT"),
                )
            })?;
        dns_upstream.push(addr);
    }
    Ok(Some(NetworkConfig {
        cidr,
        helper_socket,
        outbound_interface,
        dns_upstream,
    }))
}

/// A refusal of the helper's validation, without the field name `invalid` adds itself.
fn helper_rule(e: hearth_helper::validate::Invalid) -> String {
    match e {
        hearth_helper::validate::Invalid::Field { value, rule, .. } => format!("{value}: {rule}"),
        other => other.to_string(),
    }
}

fn validate_server(raw: &RawServer, data_dir: &Path) -> Result<ServerConfig, ConfigError> {
    let unix_socket = match raw.unix_socket.as_str() {
        "" => Some(data_dir.join("hearth.sock")),
        "off" => None,
        p if Path::new(p).is_absolute() => Some(PathBuf::from(p)),
        p => {
            return Err(invalid(
                "server.unix_socket",
                format!("{p:?} must be an absolute path, empty (<data_dir>/hearth.sock) or off"),
            ));
        }
    };
    let unix_socket_group = match raw.unix_socket_group.as_str() {
        "" => None,
        g => Some(group_id(g).ok_or_else(|| {
            invalid(
                "server.unix_socket_group",
                format!("{g:?} is neither a group of this host nor a numeric gid"),
            )
        })?),
    };
    let mut allowed_hosts = Vec::new();
    for host in &raw.allowed_hosts {
        let h = host.trim().trim_end_matches('.').to_ascii_lowercase();
        let name = h.strip_prefix("*.").unwrap_or(&h);
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !valid {
            return Err(invalid(
                "server.allowed_hosts",
                format!("{host:?} is not a host name or a *.example.com pattern"),
            ));
        }
        allowed_hosts.push(h);
    }
    let mut allowed_origins = Vec::new();
    for origin in &raw.allowed_origins {
        let o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        let valid = o == "*"
            || o.split_once("://").is_some_and(|(scheme, rest)| {
                matches!(scheme, "http" | "https")
                    && !rest.is_empty()
                    && !rest.contains(['/', '?', '#', '@'])
                    && !rest.strip_prefix("*.").unwrap_or(rest).contains('*')
            });
        if !valid {
            return Err(invalid(
                "server.allowed_origins",
                format!(
                    "{origin:?} is not an origin such as https://app.example.com, a pattern such as https://*.example.com, or *"
                ),
            ));
        }
        allowed_origins.push(o);
    }
    let count = |path: &str, value: i64, min: i64| {
        positive(path, value, min).map(|v| usize::try_from(v).unwrap_or(usize::MAX))
    };
    Ok(ServerConfig {
        unix_socket,
        unix_socket_group,
        allowed_hosts,
        allowed_origins,
        max_requests: count("server.max_requests", raw.max_requests, 1)?,
        max_queued_requests: count("server.max_queued_requests", raw.max_queued_requests, 0)?,
        max_streams: count("server.max_streams", raw.max_streams, 1)?,
        max_json_body_bytes: count("server.max_json_body_bytes", raw.max_json_body_bytes, 1024)?,
    })
}

/// A group name or numeric gid, as the group database knows it.
fn group_id(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Some(gid);
    }
    nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// The smallest root disk: the size of the guest image's filesystem.
pub const MIN_ROOTFS_MIB: u64 = 1024;

fn key(path: &str) -> &'static Key {
    KEYS.iter()
        .find(|k| k.path == path)
        .unwrap_or_else(|| panic!("config key {path} is missing from KEYS"))
}

fn invalid(path: &str, message: String) -> ConfigError {
    let key = key(path);
    ConfigError::Invalid {
        key: key.path,
        env: key.env_var(),
        message,
    }
}

fn positive(path: &str, value: i64, min: i64) -> Result<u64, ConfigError> {
    if value < min {
        return Err(invalid(path, format!("{value} must be at least {min}")));
    }
    Ok(value.unsigned_abs())
}

fn size_mib(path: &str, text: &str) -> Result<u64, ConfigError> {
    rules::parse_size_mib(text).map_err(|why| {
        invalid(
            path,
            format!("{why}: write it as 1G, 512M or a number of MiB"),
        )
    })
}

/// `volumes.max_size`: a size of at least the smallest volume.
fn volume_max(text: &str) -> Result<u64, ConfigError> {
    let mib = size_mib("volumes.max_size", text)?;
    if mib < rules::MIN_VOLUME_MIB {
        return Err(invalid(
            "volumes.max_size",
            format!(
                "{text:?} is less than the smallest volume, {} MiB",
                rules::MIN_VOLUME_MIB
            ),
        ));
    }
    Ok(mib)
}

fn secs(path: &str, value: i64) -> Result<Duration, ConfigError> {
    if !(1..=86_400).contains(&value) {
        return Err(invalid(
            path,
            format!("{value} must be a whole number of seconds from 1 to 86400"),
        ));
    }
    Ok(Duration::from_secs(value.unsigned_abs()))
}

/// Copies the file's values over the defaults, refusing keys that do not exist.
fn merge(base: &mut toml::Table, file: toml::Table, path: &Path) -> Result<(), ConfigError> {
    for (name, value) in file {
        match (base.get_mut(&name), value) {
            (Some(toml::Value::Table(section)), toml::Value::Table(values)) => {
                for (k, v) in values {
                    if !section.contains_key(&k) {
                        return Err(unknown_key(path, &format!("{name}.{k}")));
                    }
                    section.insert(k, v);
                }
            }
            (Some(toml::Value::Table(_)), _) => {
                return Err(ConfigError::Parse {
                    path: path.display().to_string(),
                    message: format!("[{name}] must be a table"),
                });
            }
            (Some(slot), v) => *slot = v,
            (None, _) => return Err(unknown_key(path, &name)),
        }
    }
    Ok(())
}

fn unknown_key(path: &Path, key: &str) -> ConfigError {
    let known: Vec<_> = KEYS.iter().map(|k| k.path).collect();
    ConfigError::Parse {
        path: path.display().to_string(),
        message: format!("unknown key {key:?}; the keys are {}", known.join(", ")),
    }
}

fn set(table: &mut toml::Table, key: &'static Key, text: &str) -> Result<(), ConfigError> {
    let value = match key.kind {
        Kind::String => toml::Value::String(text.to_owned()),
        Kind::Integer => toml::Value::Integer(
            text.trim()
                .parse()
                .map_err(|_| invalid(key.path, format!("{text:?} is not a whole number")))?,
        ),
        Kind::Bool => toml::Value::Boolean(match text.trim() {
            "true" | "1" | "on" | "yes" => true,
            "false" | "0" | "off" | "no" => false,
            _ => return Err(invalid(key.path, format!("{text:?} is not true or false"))),
        }),
        Kind::List => toml::Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
    };
    let (section, name) = key.path.rsplit_once('.').unwrap_or(("", key.path));
    let slot = if section.is_empty() {
        table
    } else {
        match table.get_mut(section) {
            Some(toml::Value::Table(t)) => t,
            _ => return Err(invalid(key.path, "section missing from defaults".into())),
        }
    };
    slot.insert(name.to_owned(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_keys_follow_the_helpers_rules() {
        let net = load_with(None, &[]).unwrap().network.unwrap();
        assert_eq!(net.cidr.to_string(), "172.28.0.0/16");
        let off = load_with(None, &[("HEARTH_NETWORK_MODE", "off")]).unwrap();
        assert!(off.network.is_none());
        for (key, value, want) in [
            (
                "HEARTH_NETWORK_CIDR",
                "10.0.0.0/8",
                "must not overlap 10.254.254.0/30",
            ),
            (
                "HEARTH_NETWORK_CIDR",
                "172.28.0.0/30",
                "prefix length must be 8 to 29",
            ),
            (
                "HEARTH_NETWORK_CIDR",
                "172.28.0.1/16",
                "bits set past the prefix",
            ),
            (
                "HEARTH_NETWORK_OUTBOUND_INTERFACE",
                "eth+",
                "must be an interface name",
            ),
            (
                "HEARTH_NETWORK_OUTBOUND_INTERFACE",
                "hv0123",
                "must not be a slot's interface",
            ),
            ("HEARTH_NETWORK_MODE", "maybe", "not one of on, off"),
        ] {
            let err = load_with(None, &[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(want), "{key}={value}: {err}");
            assert!(err.contains(key), "{err} names the variable");
        }
        let net = load_with(None, &[("HEARTH_NETWORK_OUTBOUND_INTERFACE", "eth0")])
            .unwrap()
            .network
            .unwrap();
        assert_eq!(net.outbound_interface.as_deref(), Some("eth0"));
    }

    fn load_with(file: Option<&str>, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hearth.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
        }
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(file.map(|_| path.as_path()), |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_match_the_handbook() {
        let c = load_with(None, &[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7070");
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.guest.cpus, 1);
        assert_eq!(c.guest.memory_mib, 1024);
        assert_eq!(c.guest.rootfs_mib, 10 * 1024);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.database_url, "sqlite:///var/lib/hearth/hearth.db");
        assert_eq!(c.vmm, VmmChoice::Auto);
        assert_eq!(
            c.master_key_path,
            PathBuf::from("/var/lib/hearth/secrets/master.key")
        );
    }

    #[test]
    fn generated_config_is_complete_and_parses() {
        let text = generate_default();
        for key in KEYS {
            assert!(text.contains(&key.env_var()), "{}", key.path);
        }
        let c = load_with(Some(&text), &[]).unwrap();
        assert_eq!(c.guest.memory_mib, 1024);
    }

    #[test]
    fn file_then_environment_override() {
        let c = load_with(
            Some("listen = \"127.0.0.1:9000\"\n[guest]\ncpus = 2\n"),
            &[("HEARTH_GUEST_CPUS", "4"), ("HEARTH_GUEST_MEMORY", "512M")],
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.guest.cpus, 4);
        assert_eq!(c.guest.memory_mib, 512);
    }

    #[test]
    fn database_url_takes_sqlite_or_postgres() {
        for url in [
            "sqlite:///srv/hearth.db",
            "postgres://hearth@db.internal/hearth",
            "postgresql://hearth:pw@127.0.0.1:5432/hearth",
        ] {
            let c = load_with(None, &[("HEARTH_DATABASE_URL", url)]).unwrap();
            assert_eq!(c.database_url, url);
        }
    }

    #[test]
    fn bad_values_name_the_key_and_rule() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("HEARTH_SECRETS_MASTER_KEY_PATH", "keys/master.key")],
                "secrets.master_key_path (env HEARTH_SECRETS_MASTER_KEY_PATH): \"keys/master.key\" must be the absolute path of a file",
            ),
            (
                &[("HEARTH_GUEST_CPUS", "3")],
                "guest.cpus (env HEARTH_GUEST_CPUS): invalid cpus 3: must be 1 or an even number",
            ),
            (
                &[("HEARTH_GUEST_CPUS", "two")],
                "guest.cpus (env HEARTH_GUEST_CPUS): \"two\" is not a whole number",
            ),
            (
                &[("HEARTH_GUEST_MEMORY", "64M")],
                "guest.memory (env HEARTH_GUEST_MEMORY): invalid ram \"64M\": must be at least 128 MiB",
            ),
            (
                &[("HEARTH_LISTEN", "localhost")],
                "listen (env HEARTH_LISTEN): \"localhost\" is not an address",
            ),
            (
                &[("HEARTH_DATA_DIR", "rel/dir")],
                "data_dir (env HEARTH_DATA_DIR): \"rel/dir\" must be an absolute path",
            ),
            (
                &[("HEARTH_VMM", "xen")],
                "vmm (env HEARTH_VMM): \"xen\" is not one of auto, qemu, firecracker",
            ),
            (
                &[("HEARTH_DATABASE_URL", "mysql://u:pw@x/db")],
                "database_url (env HEARTH_DATABASE_URL): \"mysql://u:***@x/db\" is not supported: use sqlite://PATH or postgres://USER@HOST/DATABASE",
            ),
            (
                &[("HEARTH_SERVER_SHUTDOWN_TIMEOUT_SECS", "0")],
                "server.shutdown_timeout_secs (env HEARTH_SERVER_SHUTDOWN_TIMEOUT_SECS): 0 must be",
            ),
            (
                &[("HEARTH_QEMU_ACCEL", "hvf")],
                "qemu.accel (env HEARTH_QEMU_ACCEL): \"hvf\" is not one of",
            ),
        ];
        for (env, want) in cases {
            let err = load_with(None, env).unwrap_err().to_string();
            assert!(err.starts_with(want), "got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_toml_are_refused() {
        let err = load_with(Some("lisen = \"x\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key \"lisen\""), "{err}");
        let err = load_with(Some("[guest]\nram = 1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key \"guest.ram\""), "{err}");
        let err = load_with(Some("listen = \n"), &[]).unwrap_err().to_string();
        assert!(err.contains("is not valid"), "{err}");
        let err = load_with(Some("[guest]\ncpus = \"2\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid type"), "{err}");
    }

    #[test]
    fn server_guards_listeners_and_limits() {
        let c = load_with(None, &[]).unwrap();
        assert_eq!(
            c.server.unix_socket.as_deref(),
            Some(Path::new("/var/lib/hearth/hearth.sock"))
        );
        assert_eq!(c.server.unix_socket_group, None);
        assert!(c.server.allowed_hosts.is_empty() && c.server.allowed_origins.is_empty());
        assert_eq!(
            (
                c.server.max_requests,
                c.server.max_queued_requests,
                c.server.max_streams
            ),
            (64, 256, 128)
        );
        let c = load_with(
            Some(
                "[server]\nallowed_origins = [\"https://*.Example.com/\", \"http://localhost:3000\"]\nunix_socket = \"off\"\n",
            ),
            &[
                ("HEARTH_SERVER_ALLOWED_HOSTS", "hearth.lan, *.corp.example,"),
                ("HEARTH_SERVER_UNIX_SOCKET_GROUP", "0"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.unix_socket, None);
        assert_eq!(c.server.unix_socket_group, Some(0));
        assert_eq!(c.server.allowed_hosts, ["hearth.lan", "*.corp.example"]);
        assert_eq!(
            c.server.allowed_origins,
            ["https://*.example.com", "http://localhost:3000"]
        );
        let cases: &[(&str, &str, &str)] = &[
            (
                "HEARTH_SERVER_UNIX_SOCKET",
                "rel.sock",
                "must be an absolute path",
            ),
            (
                "HEARTH_SERVER_UNIX_SOCKET_GROUP",
                "no-such-group-here",
                "is neither a group",
            ),
            ("HEARTH_SERVER_ALLOWED_HOSTS", "a b", "is not a host name"),
            (
                "HEARTH_SERVER_ALLOWED_ORIGINS",
                "example.com",
                "is not an origin",
            ),
            (
                "HEARTH_SERVER_ALLOWED_ORIGINS",
                "https://a.*.com",
                "is not an origin",
            ),
            ("HEARTH_SERVER_MAX_REQUESTS", "0", "0 must be at least 1"),
        ];
        for (var, value, words) in cases {
            let err = load_with(None, &[(var, value)]).unwrap_err().to_string();
            assert!(
                err.contains(var) && err.contains(words),
                "{var}={value}: {err}"
            );
        }
    }

    #[test]
    fn ssh_keys_are_checked() {
        let c = load_with(None, &[]).unwrap();
        assert_eq!(c.ssh.listen, Some("127.0.0.1:2222".parse().unwrap()));
        assert_eq!(c.ssh.command_user, "hearth");
        assert_eq!(c.ssh.cli_path.file_name().unwrap(), "hearth");
        let off = load_with(None, &[("HEARTH_SSH_LISTEN", "")]).unwrap();
        assert_eq!(off.ssh.listen, None);
        let c = load_with(
            Some("[ssh]\ncommand_user = \"srv\"\ncli_path = \"/opt/hearth/bin/hearth\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.ssh.command_user, "srv");
        assert_eq!(c.ssh.cli_path, Path::new("/opt/hearth/bin/hearth"));
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("HEARTH_SSH_LISTEN", "2222")],
                "ssh.listen (env HEARTH_SSH_LISTEN): \"2222\" is not an address",
            ),
            (
                &[("HEARTH_SSH_COMMAND_USER", "Hearth")],
                "ssh.command_user (env HEARTH_SSH_COMMAND_USER): \"Hearth\" is not a user name",
            ),
            (
                &[("HEARTH_SSH_CLI_PATH", "bin/hearth")],
                "ssh.cli_path (env HEARTH_SSH_CLI_PATH): \"bin/hearth\" must be an absolute path",
            ),
        ];
        for (env, want) in cases {
            let err = load_with(None, env).unwrap_err().to_string();
            assert!(err.starts_with(want), "got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn readme_documents_every_key() {
        let readme = include_str!("../../../README.md");
        for key in KEYS {
            assert!(
                readme.contains(&format!("`{}`", key.path)) && readme.contains(&key.env_var()),
                "README.md's configuration reference lacks {} / {}",
                key.path,
                key.env_var()
            );
        }
    }
}
