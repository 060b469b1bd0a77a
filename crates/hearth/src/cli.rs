//! The command line: clap types, their value parsers and the usage rules clap cannot express
//! ([`Cli::parse_checked`]); no behaviour.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use hearth_api::{EgressMode, Size};

use crate::error::{Action, HintContext};

pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";

/// Run and manage Hearth microVMs through hearthd's REST API.
#[derive(Debug, Parser)]
#[command(
    name = "hearth",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Where hearthd listens (default: the profile's URL, else http://127.0.0.1:7070). The API
    /// key comes from HEARTH_API_KEY, else from the profile `hearth login` wrote.
    #[arg(long, global = true, env = "HEARTH_URL", value_name = "URL")]
    pub url: Option<String>,
    /// The profile of `hearth login` to use.
    #[arg(
        long,
        global = true,
        env = "HEARTH_PROFILE",
        default_value = "default",
        value_name = "NAME"
    )]
    pub profile: String,
    /// Print the API's JSON (and, on failure, its error body) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the command line, with the usage rules clap cannot say ([`Cli::check`]).
    pub fn parse_checked<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args)?;
        cli.check()?;
        Ok(cli)
    }

    /// Usage errors (exit 2) a flag's own parser cannot see: `vm egress` with no flag, and
    /// ports that limit nothing.
    fn check(&self) -> Result<(), clap::Error> {
        let (path, flags) = match &self.command {
            Command::Vm(VmCommand::New(a)) => (["vm", "new"], &a.egress),
            Command::Vm(VmCommand::Egress(a)) => (["vm", "egress"], &a.egress),
            _ => return Ok(()),
        };
        let usage_error = |message: &str| {
            let mut command = Cli::command();
            command.build();
            let sub = command
                .find_subcommand_mut(path[0])
                .and_then(|vm| vm.find_subcommand_mut(path[1]));
            match sub {
                Some(sub) => sub.error(ErrorKind::MissingRequiredArgument, message),
                None => Cli::command().error(ErrorKind::MissingRequiredArgument, message),
            }
        };
        if path[1] == "egress" && flags.is_empty() {
            return Err(usage_error(
                "`hearth vm egress` needs at least one of --egress-mode, --egress-allow-cidr, \
                 --egress-deny-cidr, --egress-allow-port and --egress-allow-domain \
                 (`--egress-mode allow_all` alone resets the policy to the default)",
            ));
        }
        if !flags.egress_allow_port.is_empty()
            && flags.egress_allow_cidr.is_empty()
            && flags.egress_allow_domain.is_empty()
        {
            return Err(usage_error(
                "--egress-allow-port limits what --egress-allow-cidr and --egress-allow-domain \
                 allow; give one of them too",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list and control VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Run a command in a VM (same as `hearth vm exec`).
    Exec(ExecArgs),
    /// Copy a file into or out of a VM (same as `hearth vm cp`).
    Cp(CpArgs),
    /// Create private networks and connect VMs to them.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Back up a stopped VM's root disk, list and delete its backups.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Put one of a stopped VM's backups in place of its root disk.
    Restore(RestoreArgs),
    /// Write a stopped VM as a tar archive (to stdout, or -o FILE), to move it to another host.
    Export(ExportArgs),
    /// Make a VM (stopped, same name) of an archive `hearth export` wrote (a file, or stdin).
    Import(ImportArgs),
    /// Named extra disks: create, list and delete them, attach them to stopped VMs.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Show hearthd's status, version, VMM, acceleration, guest image, capacity and networking.
    Health,
    /// Check a live host end to end: make a VM, exec, copy a file, reach the metadata service,
    /// stop, start, delete; on a failure, write what explains it to a directory.
    Smoke(SmokeArgs),
    /// A live table of the VMs: state, CPU %, memory, uptime (`--json`: one sample).
    Top(TopArgs),
    /// Keep an API key (read from stdin) and URL in a profile, after checking them.
    Login(LoginArgs),
    /// Forget the profile's API key.
    Logout,
    /// Show who hearthd takes you for: user, admin or not, organization and role.
    Whoami,
    /// Users and their SSH keys (host admins; anyone for their own SSH keys).
    #[command(subcommand)]
    User(UserCommand),
    /// API keys: make one (shown once), list and revoke them.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Organizations: list, create, switch the one you act in, manage members.
    #[command(subcommand)]
    Org(OrgCommand),
    /// Read the audit log, newest first (host admins).
    Audit(AuditArgs),
    /// Secrets of the organization you act in: set (the value read from stdin), list, delete;
    /// rotate the host's master key (host admins).
    #[command(subcommand)]
    Secret(SecretCommand),
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret (owners of the organization, host admins). The value is read from stdin,
    /// never from the command line: a terminal reads one line without echo; a pipe is read
    /// whole, less one trailing newline.
    Set(SecretNameArg),
    /// List the secrets: names, who made them and when; never values.
    #[command(visible_alias = "ls")]
    List,
    /// Delete a secret (owners of the organization, host admins).
    #[command(visible_alias = "rm")]
    Delete(SecretNameArg),
    /// Re-encrypt every secret of the host under a new master key (host admins).
    RotateMasterKey,
}

#[derive(Debug, Args)]
pub struct SecretNameArg {
    /// 1-64 characters: uppercase letters, digits and '_', starting with a letter (as an
    /// environment variable, e.g. OPENAI_API_KEY).
    pub name: String,
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Read the key from this file instead of stdin.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// List users with their organizations.
    #[command(visible_alias = "ls")]
    List,
    /// Make a user, in an organization of its own unless --org names one.
    Create(UserCreateArgs),
    /// Delete a user with its keys (its VMs stay with their organizations).
    #[command(visible_alias = "rm")]
    Delete(UserArg),
    /// A user's SSH public keys.
    #[command(subcommand, name = "ssh-key")]
    SshKey(SshKeyCommand),
}

#[derive(Debug, Args)]
pub struct UserArg {
    pub user: String,
}

#[derive(Debug, Args)]
pub struct UserCreateArgs {
    /// 1-32 characters: lowercase letters, digits, '-' and '_', starting with a letter.
    pub name: String,
    /// Make the user a host admin.
    #[arg(long)]
    pub admin: bool,
    /// Put the user in this existing organization.
    #[arg(long, value_name = "ORG")]
    pub org: Option<String>,
    /// Its role there (default member; owner of its own new organization).
    #[arg(long, value_enum)]
    pub role: Option<RoleArg>,
    /// An SSH public key file (e.g. ~/.ssh/id_ed25519.pub) to add at once.
    #[arg(long, value_name = "FILE")]
    pub ssh_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Owner,
    Member,
}

#[derive(Debug, Subcommand)]
pub enum SshKeyCommand {
    /// Add a public key (a .pub file, or - for stdin).
    Add(SshKeyAddArgs),
    /// List a user's keys.
    #[command(visible_alias = "ls")]
    List(UserArg),
    /// Remove a key by its fingerprint (SHA256:…).
    #[command(visible_alias = "rm")]
    Remove(SshKeyRemoveArgs),
}

#[derive(Debug, Args)]
pub struct SshKeyAddArgs {
    pub user: String,
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct SshKeyRemoveArgs {
    pub user: String,
    pub fingerprint: String,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List your API keys (every user's, for a host admin).
    #[command(visible_alias = "ls")]
    List,
    /// Make an API key; it is printed once.
    Create(KeyCreateArgs),
    /// Revoke an API key by its id: it stops working at once.
    #[command(visible_alias = "rm")]
    Revoke(KeyIdArg),
}

#[derive(Debug, Args)]
pub struct KeyCreateArgs {
    /// A label for the key.
    #[arg(long)]
    pub name: Option<String>,
    /// The organization it acts in (default: the one you act in).
    #[arg(long, value_name = "ORG")]
    pub org: Option<String>,
    /// Another user's key (host admins).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct KeyIdArg {
    pub id: String,
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// List your organizations and their members.
    #[command(visible_alias = "ls")]
    List,
    /// Make an organization; you are its owner.
    Create(OrgArg),
    /// Act in another of your organizations (over SSH and with session keys).
    Switch(OrgArg),
    /// Put a user in an organization or change its role (owners, host admins).
    AddMember(OrgMemberArgs),
    /// Take a user out of an organization (owners, host admins).
    RemoveMember(OrgMemberArgs),
}

#[derive(Debug, Args)]
pub struct OrgArg {
    pub org: String,
}

#[derive(Debug, Args)]
pub struct OrgMemberArgs {
    pub org: String,
    pub user: String,
    /// The role (add-member; default member).
    #[arg(long, value_enum)]
    pub role: Option<RoleArg>,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only this principal (a user, operator, anonymous).
    #[arg(long)]
    pub principal: Option<String>,
    /// Only this organization.
    #[arg(long)]
    pub org: Option<String>,
    /// Only this action (create_vm, login, ssh_command, ...).
    #[arg(long)]
    pub action: Option<String>,
    /// Only rows naming this VM, network, volume, user or command.
    #[arg(long)]
    pub target: Option<String>,
    /// Only allowed or only denied decisions.
    #[arg(long, value_parser = ["allow", "deny"])]
    pub decision: Option<String>,
    /// Only rows at or after this RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many rows (1-1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM and start it.
    New(NewArgs),
    /// List VMs.
    #[command(visible_alias = "ls")]
    List,
    /// Show a VM's details and event history.
    Inspect(NameArg),
    /// Start a stopped VM.
    Start(NameArg),
    /// Stop a running VM (graceful shutdown).
    Stop(StopArgs),
    /// Stop and start a VM.
    Restart(NameArg),
    /// Pause a running VM: its vCPUs stop; RAM, disk and network are kept.
    Pause(NameArg),
    /// Resume a paused VM where it stopped.
    Resume(NameArg),
    /// Delete a VM and its disk (stops it first).
    #[command(visible_alias = "rm")]
    Delete(NameArg),
    /// Print a VM's serial console or VMM log.
    Logs(LogsArgs),
    /// Run a command in a VM.
    Exec(ExecArgs),
    /// Copy a file into or out of a VM.
    Cp(CpArgs),
    /// Set a VM's egress policy: what it may reach outside hearthd's network.
    #[command(after_help = EGRESS_AFTER_HELP)]
    Egress(EgressArgs),
    /// Change a stopped VM's cpus, memory or root disk size (the disk only grows).
    Resize(ResizeArgs),
}

/// `hearth vm resize NAME [--cpus N] [--ram SIZE] [--rootfs-size SIZE]`: at least one.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("shape").required(true).multiple(true)))]
pub struct ResizeArgs {
    /// The VM's name.
    pub name: String,
    /// Virtual CPUs: 1 or an even number up to 32.
    #[arg(long, value_name = "N", group = "shape")]
    pub cpus: Option<u32>,
    /// Memory: MiB (e.g. 512) or with a unit (512M, 2G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, group = "shape")]
    pub ram: Option<Size>,
    /// Root disk size, at least its size now: MiB or with a unit (20G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, group = "shape")]
    pub rootfs_size: Option<Size>,
}

const EGRESS_AFTER_HELP: &str = "\
The flags replace the VM's whole policy; at least one is needed. `--egress-mode allow_all` alone
resets it to the default (everything goes out). Other VMs are reached through private networks
(`hearth network connect`), not through egress.";

/// Backups of a VM's root disk; each restores only into the VM it was made of.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Copy a stopped VM's root disk into a new backup.
    Create(NameArg),
    /// List a VM's backups.
    #[command(visible_alias = "ls")]
    List(NameArg),
    /// Delete one of a VM's backups.
    #[command(visible_alias = "rm")]
    Delete(BackupArg),
}

#[derive(Debug, Args)]
pub struct BackupArg {
    /// The VM's name.
    pub name: String,
    /// The backup's id (`hearth backup list VM`).
    pub backup: String,
}

/// Volumes: named extra disks that outlive the VMs they are attached to.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume (formatted ext4 at its first attach).
    Create(VolumeCreateArgs),
    /// List volumes and where they are attached.
    #[command(visible_alias = "ls")]
    List,
    /// Delete a volume and its data (it must be attached to no VM).
    #[command(visible_alias = "rm")]
    Delete(VolumeNameArg),
    /// Attach a volume to a stopped VM, mounted at --path from its next start.
    Attach(VolumeAttachArgs),
    /// Detach a volume from a stopped VM (the volume and its data are kept).
    Detach(VolumeDetachArgs),
}

#[derive(Debug, Args)]
pub struct VolumeCreateArgs {
    /// Name: lowercase letters, digits and hyphens, starting with a letter.
    pub name: String,
    /// Size: MiB (e.g. 512) or with a unit (10G); at most hearthd's volumes.max_size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Size,
}

#[derive(Debug, Args)]
pub struct VolumeNameArg {
    /// The volume's name.
    pub volume: String,
}

#[derive(Debug, Args)]
pub struct VolumeAttachArgs {
    /// The VM's name (stopped).
    pub vm: String,
    /// The volume's name.
    pub volume: String,
    /// Where the guest mounts it: an absolute path such as /data.
    #[arg(long, value_name = "PATH")]
    pub path: String,
}

#[derive(Debug, Args)]
pub struct VolumeDetachArgs {
    /// The VM's name (stopped).
    pub vm: String,
    /// The volume's name.
    pub volume: String,
}

/// `hearth restore VM BACKUP`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The VM's name (stopped).
    pub name: String,
    /// The id of one of its backups (`hearth backup list VM`).
    pub backup: String,
}

/// `hearth top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Seconds between refreshes (at least 0.2).
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub interval: f64,
}

/// `hearth smoke`.
#[derive(Debug, Args)]
pub struct SmokeArgs {
    /// The test VM's name (default smoke-<random>); it must not exist.
    #[arg(long)]
    pub name: Option<String>,
    /// How long the VM may take to boot, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 180)]
    pub ready_timeout: u64,
    /// Keep the VM when a step fails, to look at it.
    #[arg(long)]
    pub keep_failed: bool,
    /// Where a failure's artifacts go (default ./hearth-smoke-<name>-<time>).
    #[arg(long, value_name = "DIR")]
    pub artifacts: Option<std::path::PathBuf>,
}

/// `hearth export VM [-o FILE]`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The VM's name (stopped).
    pub name: String,
    /// Write the archive to FILE (replaced only once complete) instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
}

/// `hearth import [FILE]`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The archive; stdin when absent or `-`.
    pub file: Option<std::path::PathBuf>,
}

/// Private networks: their members reach each other; nothing else reaches them.
#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Create a private network.
    Create(NetworkNameArg),
    /// List private networks and their members.
    #[command(visible_alias = "ls")]
    List,
    /// Delete a private network (it must have no members left).
    #[command(visible_alias = "rm")]
    Delete(NetworkNameArg),
    /// Make a VM a member of a private network.
    Connect(MemberArgs),
    /// Take a VM out of a private network.
    Disconnect(MemberArgs),
}

#[derive(Debug, Args)]
pub struct NetworkNameArg {
    /// The network's name: lowercase letters, digits and hyphens, starting with a letter.
    #[arg(value_name = "NETWORK")]
    pub name: String,
}

#[derive(Debug, Args)]
pub struct MemberArgs {
    /// The network's name.
    pub network: String,
    /// The VM's name.
    pub vm: String,
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// The VM's name.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// Name: lowercase letters, digits and hyphens, starting with a letter.
    pub name: String,
    /// Virtual CPUs: 1 or an even number up to 32.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Memory: MiB (e.g. 512) or with a unit (512M, 2G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub ram: Option<Size>,
    /// Root disk size: MiB or with a unit (10G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub rootfs_size: Option<Size>,
    /// Create the VM without starting it.
    #[arg(long)]
    pub no_start: bool,
    /// Join this private network (repeatable; it must exist, see `hearth network create`).
    #[arg(long = "network", value_name = "NETWORK")]
    pub networks: Vec<String>,
    /// Give the guest this file as its user data (served by the metadata service at
    /// /v1/user-data); `-` reads stdin. UTF-8 text.
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// Give the guest the OpenSSH public keys in this file (repeatable; `authorized_keys`
    /// format: a key a line, blank lines and `#` comments skipped).
    #[arg(long = "ssh-key", value_name = "FILE")]
    pub ssh_keys: Vec<PathBuf>,
    /// Attach this volume, mounted at PATH in the guest (repeatable; it must exist and be
    /// attached to no VM, see `hearth volume create`).
    #[arg(long = "volume", value_name = "VOLUME:PATH", value_parser = parse_volume)]
    pub volumes: Vec<hearth_api::VolumeAttachment>,
    #[command(flatten)]
    pub egress: EgressFlags,
}

/// `hearth vm egress NAME FLAGS…`: at least one flag ([`Cli::check`]).
#[derive(Debug, Args)]
pub struct EgressArgs {
    /// The VM's name.
    pub name: String,
    #[command(flatten)]
    pub egress: EgressFlags,
}

/// The egress flags of `vm new` and `vm egress`. Allow lists without `--egress-mode` mean
/// `deny_all` (hearthd decides that; the request says only what was given).
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
#[command(next_help_heading = "Egress policy")]
pub struct EgressFlags {
    /// allow_all: everything not denied goes out (the default); deny_all: only what is
    /// allowed.
    #[arg(long, value_name = "MODE", value_enum)]
    pub egress_mode: Option<EgressModeArg>,
    /// Let the VM reach this IPv4 CIDR; a bare address is a /32 (repeatable; implies
    /// deny_all).
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    pub egress_allow_cidr: Vec<String>,
    /// Never let the VM reach this IPv4 CIDR (repeatable).
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    pub egress_deny_cidr: Vec<String>,
    /// Limit the allowed CIDRs and domains to this TCP port, 1-65535 (repeatable; default:
    /// every port).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub egress_allow_port: Vec<u16>,
    /// Let the VM resolve and reach this name: `api.example.com`, or `*.example.com` for the
    /// names under it (repeatable; implies deny_all).
    #[arg(long, value_name = "NAME", value_parser = parse_domain)]
    pub egress_allow_domain: Vec<String>,
}

impl EgressFlags {
    /// True when no egress flag was given.
    pub fn is_empty(&self) -> bool {
        self == &EgressFlags::default()
    }
}

/// `--egress-mode`, spelled as in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EgressModeArg {
    /// Everything not denied goes out.
    #[value(name = "allow_all", alias = "allow-all")]
    AllowAll,
    /// Only what is allowed goes out.
    #[value(name = "deny_all", alias = "deny-all")]
    DenyAll,
}

impl From<EgressModeArg> for EgressMode {
    fn from(mode: EgressModeArg) -> EgressMode {
        match mode {
            EgressModeArg::AllowAll => EgressMode::AllowAll,
            EgressModeArg::DenyAll => EgressMode::DenyAll,
        }
    }
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// The VM's name.
    pub name: String,
    /// Seconds to wait for a graceful shutdown before the VM is killed.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogSource {
    /// The guest's serial console.
    Serial,
    /// The VMM's own log.
    Vmm,
}

impl LogSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::Serial => "serial",
            LogSource::Vmm => "vmm",
        }
    }
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The VM's name.
    pub name: String,
    /// Which log.
    #[arg(value_enum, default_value_t = LogSource::Serial)]
    pub source: LogSource,
    /// Keep printing new output as it arrives.
    #[arg(short, long)]
    pub follow: bool,
    /// Start with only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The VM's name.
    pub name: String,
    /// Forward this terminal's stdin to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the command a terminal of this terminal's size (raw mode with -i).
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VAL", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest (absolute).
    #[arg(short, long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// The command and its arguments, after `--` or the VM name.
    #[arg(
        value_name = "CMD",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// `NAME:/abs/path` in a VM, a local path, or `-` for stdin.
    pub src: String,
    /// `NAME:/abs/path` in a VM, a local path, or `-` for stdout.
    pub dst: String,
}

/// A bare integer is MiB and goes to the server as a number; anything else goes as text for
/// the server to check (`512M`, `2G`).
pub fn parse_size(s: &str) -> Result<Size, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("a size cannot be empty; use e.g. 512M or 2G".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Size::Mib)
            .map_err(|_| format!("`{s}` is too large"));
    }
    Ok(Size::Text(s.to_owned()))
}

/// An IPv4 address with an optional `/0`-`/32` prefix, kept as written (hearthd checks the
/// rest, such as host bits).
pub fn parse_cidr(s: &str) -> Result<String, String> {
    let s = s.trim();
    let (addr, prefix) = match s.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (s, None),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u8>().is_ok_and(|n| n <= 32)
    });
    if addr.parse::<Ipv4Addr>().is_err() || !prefix_ok {
        return Err(format!(
            "`{s}` is not an IPv4 CIDR; use e.g. 10.0.0.0/8, or 192.0.2.7 for one address"
        ));
    }
    Ok(s.to_owned())
}

/// A DNS name, or `*.` and one, kept as written: labels of letters, digits, `-` and `_`, an
/// optional trailing dot. A loose check that catches URLs and typos; hearthd applies the exact
/// rule (and says it), so this never refuses a name hearthd would take.
pub fn parse_domain(s: &str) -> Result<String, String> {
    let s = s.trim();
    let name = s.strip_prefix("*.").unwrap_or(s);
    let name = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || s.len() > 254 || !name.split('.').all(label_ok) {
        return Err(format!(
            "`{s}` is not a domain name; use e.g. api.example.com, or *.example.com for the names \
             under it"
        ));
    }
    Ok(s.to_owned())
}

/// `VOLUME:PATH` of `vm new --volume`.
pub fn parse_volume(s: &str) -> Result<hearth_api::VolumeAttachment, String> {
    match s.split_once(':') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok(hearth_api::VolumeAttachment {
                name: name.to_owned(),
                path: path.to_owned(),
            })
        }
        _ => Err(format!("expected VOLUME:PATH (e.g. data:/data), got `{s}`")),
    }
}

pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VAL, got `{s}`")),
    }
}

impl Command {
    /// The command, VM and network an error hint should talk about.
    pub fn hint_context(&self) -> HintContext {
        let name = |n: &String| Some(n.clone());
        let (action, vm, network) = match self {
            Command::Health => (Action::Health, None, None),
            Command::Smoke(a) => (Action::Smoke, a.name.clone(), None),
            Command::Top(_) => (Action::Top, None, None),
            Command::Login(_)
            | Command::Logout
            | Command::Whoami
            | Command::User(_)
            | Command::Key(_)
            | Command::Org(_)
            | Command::Audit(_) => (Action::Access, None, None),
            Command::Secret(_) => (Action::Secret, None, None),
            Command::Exec(a) => (Action::Exec, name(&a.name), None),
            Command::Cp(a) => (Action::Cp, cp_vm_name(a), None),
            Command::Network(command) => match command {
                NetworkCommand::Create(a) => (Action::NetworkCreate, None, name(&a.name)),
                NetworkCommand::List => (Action::NetworkList, None, None),
                NetworkCommand::Delete(a) => (Action::NetworkDelete, None, name(&a.name)),
                NetworkCommand::Connect(a) => {
                    (Action::NetworkConnect, name(&a.vm), name(&a.network))
                }
                NetworkCommand::Disconnect(a) => {
                    (Action::NetworkDisconnect, name(&a.vm), name(&a.network))
                }
            },
            Command::Backup(command) => match command {
                BackupCommand::Create(a) => (Action::BackupCreate, name(&a.name), None),
                BackupCommand::List(a) => (Action::BackupList, name(&a.name), None),
                BackupCommand::Delete(a) => (Action::BackupDelete, name(&a.name), None),
            },
            Command::Restore(a) => (Action::Restore, name(&a.name), None),
            Command::Export(a) => (Action::Export, name(&a.name), None),
            Command::Import(_) => (Action::Import, None, None),
            Command::Volume(command) => match command {
                VolumeCommand::Create(_) => (Action::VolumeCreate, None, None),
                VolumeCommand::List => (Action::VolumeList, None, None),
                VolumeCommand::Delete(_) => (Action::VolumeDelete, None, None),
                VolumeCommand::Attach(a) => (Action::VolumeAttach, name(&a.vm), None),
                VolumeCommand::Detach(a) => (Action::VolumeDetach, name(&a.vm), None),
            },
            Command::Vm(vm) => match vm {
                // Of several networks, which one is missing only hearthd's message says.
                VmCommand::New(a) => {
                    let network = match a.networks.as_slice() {
                        [one] => Some(one.clone()),
                        _ => None,
                    };
                    (Action::New, name(&a.name), network)
                }
                VmCommand::List => (Action::List, None, None),
                VmCommand::Inspect(a) => (Action::Inspect, name(&a.name), None),
                VmCommand::Start(a) => (Action::Start, name(&a.name), None),
                VmCommand::Stop(a) => (Action::Stop, name(&a.name), None),
                VmCommand::Restart(a) => (Action::Restart, name(&a.name), None),
                VmCommand::Pause(a) => (Action::Pause, name(&a.name), None),
                VmCommand::Resume(a) => (Action::Resume, name(&a.name), None),
                VmCommand::Delete(a) => (Action::Delete, name(&a.name), None),
                VmCommand::Logs(a) => (Action::Logs, name(&a.name), None),
                VmCommand::Exec(a) => (Action::Exec, name(&a.name), None),
                VmCommand::Cp(a) => (Action::Cp, cp_vm_name(a), None),
                VmCommand::Egress(a) => (Action::Egress, name(&a.name), None),
                VmCommand::Resize(a) => (Action::Resize, name(&a.name), None),
            },
        };
        HintContext {
            action,
            vm,
            network,
        }
    }

    pub fn is_exec(&self) -> bool {
        matches!(self, Command::Exec(_) | Command::Vm(VmCommand::Exec(_)))
    }
}

fn cp_vm_name(args: &CpArgs) -> Option<String> {
    [&args.src, &args.dst].into_iter().find_map(|s| {
        crate::commands::cp::parse_endpoint(s)
            .ok()?
            .vm()
            .map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::parse_checked(std::iter::once("hearth").chain(args.iter().copied()))
    }

    fn new_args(args: &[&str]) -> NewArgs {
        let argv: Vec<&str> = ["vm", "new"].iter().chain(args).copied().collect();
        match parse(&argv).unwrap().command {
            Command::Vm(VmCommand::New(a)) => a,
            other => panic!("not vm new: {other:?}"),
        }
    }

    fn egress_args(args: &[&str]) -> Result<EgressArgs, clap::Error> {
        let argv: Vec<&str> = ["vm", "egress"].iter().chain(args).copied().collect();
        match parse(&argv)?.command {
            Command::Vm(VmCommand::Egress(a)) => Ok(a),
            other => panic!("not vm egress: {other:?}"),
        }
    }

    #[test]
    fn new_takes_networks_user_data_keys_and_egress() {
        let a = new_args(&[
            "web",
            "--network",
            "backend",
            "--network=db",
            "--user-data",
            "-",
            "--ssh-key",
            "a.pub",
            "--ssh-key",
            "/keys/b.pub",
            "--egress-mode",
            "deny_all",
            "--egress-allow-cidr",
            "10.0.0.0/8",
            "--egress-allow-cidr",
            "192.0.2.7",
            "--egress-deny-cidr",
            "10.9.0.0/16",
            "--egress-deny-cidr",
            "10.8.0.0/16",
            "--egress-allow-port",
            "443",
            "--egress-allow-port",
            "8080",
            "--egress-allow-domain",
            "api.example.com",
            "--egress-allow-domain",
            "*.example.org",
        ]);
        assert_eq!(a.networks, ["backend", "db"]);
        assert_eq!(a.user_data, Some(PathBuf::from("-")));
        assert_eq!(
            a.ssh_keys,
            [PathBuf::from("a.pub"), PathBuf::from("/keys/b.pub")]
        );
        assert_eq!(
            a.egress,
            EgressFlags {
                egress_mode: Some(EgressModeArg::DenyAll),
                egress_allow_cidr: vec!["10.0.0.0/8".into(), "192.0.2.7".into()],
                egress_deny_cidr: vec!["10.9.0.0/16".into(), "10.8.0.0/16".into()],
                egress_allow_port: vec![443, 8080],
                egress_allow_domain: vec!["api.example.com".into(), "*.example.org".into()],
            }
        );
        let plain = new_args(&["web"]);
        assert!(plain.networks.is_empty() && plain.ssh_keys.is_empty());
        assert!(plain.user_data.is_none() && plain.egress.is_empty());
        // The mode as the API spells it, or with a hyphen.
        for (value, mode) in [
            ("allow_all", EgressMode::AllowAll),
            ("allow-all", EgressMode::AllowAll),
            ("deny_all", EgressMode::DenyAll),
            ("deny-all", EgressMode::DenyAll),
        ] {
            let a = new_args(&["web", "--egress-mode", value]);
            assert_eq!(
                a.egress.egress_mode.map(EgressMode::from),
                Some(mode),
                "{value}"
            );
        }
    }

    #[test]
    fn bad_egress_values_exit_2() {
        for args in [
            &[
                "--egress-allow-port",
                "0",
                "--egress-allow-cidr",
                "10.0.0.0/8",
            ][..],
            &[
                "--egress-allow-port",
                "65536",
                "--egress-allow-cidr",
                "10.0.0.0/8",
            ],
            &[
                "--egress-allow-port",
                "https",
                "--egress-allow-cidr",
                "10.0.0.0/8",
            ],
            &[
                "--egress-allow-port",
                "-1",
                "--egress-allow-cidr",
                "10.0.0.0/8",
            ],
            &["--egress-allow-cidr", "10.0.0/8"],
            &["--egress-allow-cidr", "10.0.0.0/33"],
            &["--egress-deny-cidr", "example.com"],
            &["--egress-deny-cidr", "fd00::/8"],
            &["--egress-allow-domain", "https://api.example.com"],
            &["--egress-allow-domain", "a..b"],
            &["--egress-mode", "deny"],
            &["--egress-mode"],
            &["--network"],
            &["--ssh-key"],
        ] {
            let argv: Vec<&str> = ["vm", "new", "web"].iter().chain(args).copied().collect();
            let err = parse(&argv).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
        let err = parse(&["vm", "new", "web", "--egress-allow-port", "0"]).unwrap_err();
        assert!(err.to_string().contains("0 is not in 1..=65535"), "{err}");
        let err = parse(&["vm", "new", "web", "--egress-allow-cidr", "1.2.3/8"]).unwrap_err();
        assert!(
            err.to_string().contains("`1.2.3/8` is not an IPv4 CIDR"),
            "{err}"
        );
    }

    #[test]
    fn ports_need_something_they_limit() {
        let err = parse(&["vm", "new", "web", "--egress-allow-port", "443"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string()
                .contains("--egress-allow-port limits what --egress-allow-cidr"),
            "{err}"
        );
        assert!(err.to_string().contains("Usage: hearth vm new"), "{err}");
        let err = egress_args(&["demo", "--egress-allow-port", "443"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        for with in [
            &["--egress-allow-cidr", "10.0.0.0/8"][..],
            &["--egress-allow-domain", "*.example.com"],
        ] {
            let argv: Vec<&str> = ["demo", "--egress-allow-port", "443"]
                .iter()
                .chain(with)
                .copied()
                .collect();
            assert_eq!(egress_args(&argv).unwrap().egress.egress_allow_port, [443]);
        }
    }

    #[test]
    fn egress_takes_the_five_flags_and_needs_one() {
        let a = egress_args(&[
            "demo",
            "--egress-allow-domain",
            "*.example.com",
            "--egress-allow-domain",
            "pypi.org",
            "--egress-allow-port",
            "443",
        ])
        .unwrap();
        assert_eq!(a.name, "demo");
        assert_eq!(a.egress.egress_allow_domain, ["*.example.com", "pypi.org"]);
        assert_eq!(a.egress.egress_allow_port, [443]);
        assert_eq!(a.egress.egress_mode, None);
        let a = egress_args(&["demo", "--egress-mode", "allow_all"]).unwrap();
        assert_eq!(a.egress.egress_mode, Some(EgressModeArg::AllowAll));
        let a = egress_args(&["demo", "--egress-deny-cidr", "0.0.0.0/0"]).unwrap();
        assert_eq!(a.egress.egress_deny_cidr, ["0.0.0.0/0"]);

        let err = egress_args(&["demo"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let message = err.to_string();
        for flag in [
            "--egress-mode",
            "--egress-allow-cidr",
            "--egress-deny-cidr",
            "--egress-allow-port",
            "--egress-allow-domain",
            "`--egress-mode allow_all` alone resets",
        ] {
            assert!(message.contains(flag), "{flag}: {message}");
        }
        assert!(message.contains("Usage: hearth vm egress"), "{message}");
        assert_eq!(egress_args(&[]).unwrap_err().exit_code(), 2);
        // The help says how to reset.
        let mut command = Cli::command();
        let help = command
            .find_subcommand_mut("vm")
            .and_then(|vm| vm.find_subcommand_mut("egress"))
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("`--egress-mode allow_all` alone"), "{help}");
        assert!(help.contains("--egress-allow-domain <NAME>"), "{help}");
    }

    #[test]
    fn network_commands_and_aliases() {
        let network = |args: &[&str]| {
            let argv: Vec<&str> = ["network"].iter().chain(args).copied().collect();
            match parse(&argv).unwrap().command {
                Command::Network(n) => n,
                other => panic!("not network: {other:?}"),
            }
        };
        assert!(matches!(
            network(&["create", "backend"]),
            NetworkCommand::Create(NetworkNameArg { name }) if name == "backend"
        ));
        assert!(matches!(network(&["list"]), NetworkCommand::List));
        assert!(matches!(network(&["ls"]), NetworkCommand::List));
        for verb in ["delete", "rm"] {
            assert!(matches!(
                network(&[verb, "backend"]),
                NetworkCommand::Delete(NetworkNameArg { name }) if name == "backend"
            ));
        }
        assert!(matches!(
            network(&["connect", "backend", "web"]),
            NetworkCommand::Connect(MemberArgs { network, vm }) if network == "backend" && vm == "web"
        ));
        assert!(matches!(
            network(&["disconnect", "backend", "web"]),
            NetworkCommand::Disconnect(MemberArgs { network, vm }) if network == "backend" && vm == "web"
        ));
        let cli = parse(&["--json", "network", "ls"]).unwrap();
        assert!(cli.json);
        for args in [
            &["network"][..],
            &["network", "create"],
            &["network", "connect", "backend"],
            &["network", "disconnect"],
            &["network", "delete"],
            &["network", "list", "extra"],
            &["network", "attach", "a", "b"],
        ] {
            assert_eq!(parse(args).unwrap_err().exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn cidrs_and_domains_are_checked_and_kept_as_written() {
        for good in [
            "10.0.0.0/8",
            "192.0.2.7",
            "0.0.0.0/0",
            "10.1.2.3/32",
            " 10.0.0.0/8 ",
        ] {
            assert_eq!(parse_cidr(good).as_deref(), Ok(good.trim()), "{good}");
        }
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "::1",
            "a.b.c.d",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad:?}");
        }
        for good in [
            "api.example.com",
            "*.example.com",
            "localhost",
            "API.Example.com.",
            "_srv.x-y.example",
        ] {
            assert_eq!(parse_domain(good).as_deref(), Ok(good), "{good}");
        }
        let long = format!("{}.com", "a".repeat(64));
        for bad in [
            "",
            "*.",
            "*",
            "a.*.com",
            "example.com/path",
            "a b.com",
            "x..",
            ".x",
            "*..",
            &long,
        ] {
            assert!(parse_domain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn global_options_and_defaults() {
        let cli = parse(&["vm", "list"]).unwrap();
        assert!(!cli.json);
        assert!(matches!(cli.command, Command::Vm(VmCommand::List)));
        let cli = parse(&["vm", "ls", "--json", "--url", "http://10.0.0.1:9"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.url.as_deref(), Some("http://10.0.0.1:9"));
    }

    #[test]
    fn new_takes_sizes_as_numbers_or_text() {
        let cli = parse(&[
            "vm",
            "new",
            "demo",
            "--cpus",
            "2",
            "--ram",
            "2G",
            "--rootfs-size",
            "4096",
            "--no-start",
        ])
        .unwrap();
        let Command::Vm(VmCommand::New(a)) = cli.command else {
            panic!("not vm new")
        };
        assert_eq!(a.name, "demo");
        assert_eq!(a.cpus, Some(2));
        assert_eq!(a.ram, Some(Size::Text("2G".into())));
        assert_eq!(a.rootfs_size, Some(Size::Mib(4096)));
        assert!(a.no_start);
        assert!(parse(&["vm", "new", "demo", "--cpus", "two"]).is_err());
        assert!(parse(&["vm", "new", "demo", "--ram", ""]).is_err());
        assert!(parse(&["vm", "new"]).is_err());
    }

    #[test]
    fn exec_takes_the_command_after_dashes_or_the_name() {
        for args in [
            &[
                "exec", "demo", "-i", "-e", "A=1", "-e", "B=x=y", "-w", "/tmp", "--", "ls", "-la",
            ][..],
            &[
                "vm",
                "exec",
                "-i",
                "-e",
                "A=1",
                "--env",
                "B=x=y",
                "--workdir",
                "/tmp",
                "demo",
                "ls",
                "-la",
            ],
        ] {
            let cli = parse(args).unwrap();
            let (Command::Exec(a) | Command::Vm(VmCommand::Exec(a))) = cli.command else {
                panic!("not exec: {args:?}")
            };
            assert_eq!(a.name, "demo");
            assert!(a.interactive && !a.tty);
            assert_eq!(
                a.env,
                [("A".into(), "1".into()), ("B".into(), "x=y".into())]
            );
            assert_eq!(a.workdir.as_deref(), Some("/tmp"));
            assert_eq!(a.command, ["ls", "-la"]);
        }
        let cli = parse(&[
            "exec",
            "demo",
            "-it",
            "--timeout",
            "5",
            "sh",
            "-c",
            "echo -t",
        ])
        .unwrap();
        let Command::Exec(a) = cli.command else {
            panic!()
        };
        assert!(a.interactive && a.tty);
        assert_eq!(a.timeout, Some(5));
        assert_eq!(a.command, ["sh", "-c", "echo -t"]);
    }

    #[test]
    fn exec_needs_a_command_and_good_env() {
        let err = parse(&["exec", "demo"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["exec", "demo", "-e", "NOVALUE", "true"]).unwrap_err();
        assert!(err.to_string().contains("expected KEY=VAL"), "{err}");
        assert!(parse(&["exec", "demo", "-e", "=v", "true"]).is_err());
    }

    #[test]
    fn logs_source_and_flags() {
        let cli = parse(&["vm", "logs", "demo"]).unwrap();
        let Command::Vm(VmCommand::Logs(a)) = cli.command else {
            panic!()
        };
        assert_eq!(a.source, LogSource::Serial);
        assert!(!a.follow);
        let cli = parse(&["vm", "logs", "-f", "demo", "vmm", "--tail", "20"]).unwrap();
        let Command::Vm(VmCommand::Logs(a)) = cli.command else {
            panic!()
        };
        assert_eq!(
            (a.source, a.follow, a.tail),
            (LogSource::Vmm, true, Some(20))
        );
        assert!(parse(&["vm", "logs", "demo", "kernel"]).is_err());
    }

    #[test]
    fn stop_and_aliases() {
        let cli = parse(&["vm", "stop", "demo", "--timeout", "30"]).unwrap();
        let Command::Vm(VmCommand::Stop(a)) = cli.command else {
            panic!()
        };
        assert_eq!((a.name.as_str(), a.timeout), ("demo", Some(30)));
        assert!(matches!(
            parse(&["vm", "rm", "demo"]).unwrap().command,
            Command::Vm(VmCommand::Delete(_))
        ));
        assert!(matches!(
            parse(&["cp", "a", "demo:/b"]).unwrap().command,
            Command::Cp(_)
        ));
        assert!(matches!(
            parse(&["health"]).unwrap().command,
            Command::Health
        ));
    }

    #[test]
    fn usage_errors_exit_2() {
        for args in [
            &["vm"][..],
            &["vm", "frobnicate"],
            &["cp", "only-one"],
            &["--bogus"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn hint_context_names_the_vm() {
        let cli = parse(&["cp", "./x", "demo:/tmp/x"]).unwrap();
        assert_eq!(cli.command.hint_context().vm.as_deref(), Some("demo"));
        let cli = parse(&["vm", "start", "web"]).unwrap();
        let ctx = cli.command.hint_context();
        assert_eq!(
            (ctx.action, ctx.vm.as_deref()),
            (Action::Start, Some("web"))
        );
        assert!(parse(&["exec", "a", "true"]).unwrap().command.is_exec());
        let ctx = parse(&["network", "connect", "backend", "web"])
            .unwrap()
            .command
            .hint_context();
        assert_eq!(
            (ctx.action, ctx.vm.as_deref(), ctx.network.as_deref()),
            (Action::NetworkConnect, Some("web"), Some("backend"))
        );
        let ctx = parse(&["network", "rm", "backend"])
            .unwrap()
            .command
            .hint_context();
        assert_eq!(
            (ctx.action, ctx.vm, ctx.network.as_deref()),
            (Action::NetworkDelete, None, Some("backend"))
        );
        let ctx = parse(&["vm", "new", "web", "--network", "db"])
            .unwrap()
            .command
            .hint_context();
        assert_eq!(ctx.network.as_deref(), Some("db"));
        let ctx = parse(&["vm", "new", "web", "--network", "a", "--network", "b"])
            .unwrap()
            .command
            .hint_context();
        assert_eq!(ctx.network, None);
        let ctx = parse(&["vm", "egress", "web", "--egress-mode", "allow_all"])
            .unwrap()
            .command
            .hint_context();
        assert_eq!(
            (ctx.action, ctx.vm.as_deref()),
            (Action::Egress, Some("web"))
        );
    }
}
