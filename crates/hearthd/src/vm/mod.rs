//! VMs: every front end (REST, SSH, E2B) turns its input into one [`Action`] and hands it, with
//! the [`Caller`] it came from, to [`VmService::handle`]; streams (exec sessions, file transfers,
//! logs) are actions too, whose replies are handles the front end drives. Only this module
//! changes VM state, and only through [`state::next`] and `Store::transition`.
//!
//! - `error`: [`VmError`], the one place errors get their API code.
//! - `lifecycle`: create, start, stop, restart, pause, resume, delete, and the one teardown of a
//!   run.
//! - `running`: running VMs (VMM handle + agent connection) and the exit monitor.
//! - `admission`: whether the host can take one more VM (`crate::capacity` decides).
//! - `recovery`: what hearthd does at start with the VMs of its last run.
//! - `exec`, `files`, `logs`: the operations on a VM's guest and its logs.
//! - `backup`, `resize`, `volume`: a stopped VM's disks; volumes outlive their VMs.

mod access;
mod admission;
mod backup;
mod error;
mod exec;
mod export;
mod files;
mod lifecycle;
mod logs;
mod network;
mod recovery;
mod resize;
mod running;
mod secret;
pub mod state;
mod volume;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hearth_api::{
    CreateNetworkRequest, CreateVmRequest, EgressRequest, ExecRequest, ExecResponse, Health,
    Network as NetworkInfo, ResizeVmRequest, Vm, VmDetail,
};
use tokio::sync::watch;

use crate::config::Config;
use crate::disk::{self, Spares};
use crate::image::Image;
use crate::net::Network;
use crate::store::{Store, StoreError, Transition, VmRecord};
use crate::vmm::Vmm;
use running::Runtime;
use state::Input;

pub use error::VmError;
pub use exec::{ExecEvent, ExecInput, ExecOpen, ExecOutput, ExecStream};
pub use export::ExportStream;
pub use files::{Download, Upload};
pub use logs::{LogSource, LogStream, LogWindow};

/// Who asked for an action: decided on by authorization and recorded by audit, for every
/// action of every front end.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub source: Source,
    /// Set by the front end (or taken from the client's `x-request-id`); ties logs to requests.
    pub request_id: String,
}

/// The identity behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The host's operator, a host admin without a user: a caller without a key on the API's
    /// loopback port or its unix socket, when `auth.localhost_admin` is on.
    Operator,
    /// hearthd itself (recovery, background work).
    System,
    /// A user, authenticated by an API key, an SSH session key or an SSH public key.
    User(Arc<crate::access::Identity>),
}

/// Where a request came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Tcp(std::net::SocketAddr),
    UnixSocket,
    /// A session of the SSH front end, from the client's address.
    Ssh(std::net::SocketAddr),
    Internal,
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Principal::Operator => "operator",
            Principal::System => "system",
            Principal::User(identity) => &identity.user,
        })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Tcp(addr) => write!(f, "tcp:{addr}"),
            Source::UnixSocket => f.write_str("unix"),
            Source::Ssh(addr) => write!(f, "ssh:{addr}"),
            Source::Internal => f.write_str("internal"),
        }
    }
}

impl Source {
    /// The address failed logins are counted against.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Source::Tcp(addr) | Source::Ssh(addr) => Some(addr.ip()),
            Source::UnixSocket | Source::Internal => None,
        }
    }
}

impl Caller {
    /// The organization what this caller makes belongs to: a user's current one; `default`
    /// for the operator and hearthd itself.
    pub fn org(&self) -> Option<&str> {
        match &self.principal {
            Principal::User(identity) => identity.org.as_deref(),
            Principal::Operator | Principal::System => Some(crate::access::DEFAULT_ORG),
        }
    }

    /// The organization what this caller makes goes to; an error for a user in none.
    pub fn owning_org(&self) -> Result<String, VmError> {
        self.org().map(str::to_owned).ok_or_else(|| {
            VmError::access(
                hearth_api::ErrorCode::PermissionDenied,
                format!(
                    "user {} belongs to no organization, so cannot make anything: an admin adds users to one with `hearth org add-member`",
                    self.principal
                ),
            )
        })
    }

    /// A host admin: sees and acts on every organization's things.
    pub fn is_admin(&self) -> bool {
        match &self.principal {
            Principal::User(identity) => identity.admin,
            Principal::Operator | Principal::System => true,
        }
    }

    /// hearthd's own work.
    pub fn system() -> Caller {
        Caller {
            principal: Principal::System,
            source: Source::Internal,
            request_id: random_id(),
        }
    }
}

/// Every operation on VMs, of every front end.
#[derive(Debug)]
pub enum Action {
    Health,
    /// Every VM's state and what its VMM uses now.
    Stats,
    /// The Prometheus scrape; OpenMetrics when true, else the classic text format.
    Metrics {
        openmetrics: bool,
    },
    ListVms,
    GetVm(String),
    CreateVm(CreateVmRequest),
    StartVm(String),
    StopVm {
        name: String,
        timeout: Option<Duration>,
    },
    RestartVm(String),
    /// Stop a running VM's vCPUs, keeping everything else.
    PauseVm(String),
    /// Let a paused VM's vCPUs run again.
    ResumeVm(String),
    DeleteVm(String),
    /// Run a command to completion and collect its output.
    Exec {
        name: String,
        request: ExecRequest,
    },
    /// Start an exec session; the reply is a stream to drive.
    OpenExec {
        name: String,
        open: ExecOpen,
    },
    /// Write a file into the guest from a stream of chunks.
    PutFile {
        name: String,
        path: String,
        mode: u32,
        data: Upload,
    },
    /// Read a file from the guest as a stream of chunks.
    GetFile {
        name: String,
        path: String,
    },
    /// Read (and optionally follow) one of a VM's logs.
    Logs {
        name: String,
        source: LogSource,
        window: LogWindow,
    },
    /// Copy a stopped VM's root disk into a new backup of it.
    CreateBackup(String),
    ListBackups(String),
    DeleteBackup {
        name: String,
        id: String,
    },
    /// Put one of a stopped VM's backups in place of its root disk.
    Restore {
        name: String,
        backup: String,
    },
    /// Stream a stopped VM as an archive; the reply is the stream.
    Export(String),
    /// Make a VM (stopped) of an archive read from a stream.
    Import(Upload),
    /// Change a stopped VM's cpus, memory or root disk size.
    ResizeVm {
        name: String,
        request: ResizeVmRequest,
    },
    /// Replace a VM's egress policy (applied at once when it runs).
    SetEgress {
        name: String,
        request: EgressRequest,
    },
    ListNetworks,
    CreateNetwork(CreateNetworkRequest),
    DeleteNetwork(String),
    /// Put a VM in a private network (`member`), or take it out.
    SetMembership {
        network: String,
        vm: String,
        member: bool,
    },
    ListVolumes,
    CreateVolume(hearth_api::CreateVolumeRequest),
    DeleteVolume(String),
    /// Attach a volume to a stopped VM, mounted at `path` in the guest.
    AttachVolume {
        vm: String,
        volume: String,
        path: String,
    },
    /// Detach a volume from a stopped VM.
    DetachVolume {
        vm: String,
        volume: String,
    },
    /// Who the caller is.
    Whoami,
    /// Make another of the caller's organizations the one it acts in.
    SwitchOrg(String),
    ListUsers,
    CreateUser(hearth_api::CreateUserRequest),
    DeleteUser(String),
    ListSshKeys(String),
    AddSshKey {
        user: String,
        public_key: String,
    },
    RemoveSshKey {
        user: String,
        fingerprint: String,
    },
    /// The caller's API keys (every user's, for a host admin).
    ListApiKeys,
    CreateApiKey(hearth_api::CreateApiKeyRequest),
    RevokeApiKey(String),
    /// The caller's organizations (all, for a host admin).
    ListOrgs,
    CreateOrg(String),
    SetMember {
        org: String,
        user: String,
        role: Option<hearth_api::Role>,
    },
    RemoveMember {
        org: String,
        user: String,
    },
    Audit(crate::store::access::AuditFilter),
    /// Set a secret of the organization the caller acts in (its owners, host admins).
    SetSecret {
        name: String,
        value: crate::secrets::Secret,
    },
    /// The names of the secrets of the organization the caller acts in (its members).
    ListSecrets,
    DeleteSecret(String),
    /// A new master key for every secret of the host (host admins).
    RotateMasterKey,
}

impl Action {
    /// The action's name, for logs and audit.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Health => "health",
            Action::Stats => "stats",
            Action::Metrics { .. } => "metrics",
            Action::ListVms => "list_vms",
            Action::GetVm(_) => "get_vm",
            Action::CreateVm(_) => "create_vm",
            Action::StartVm(_) => "start_vm",
            Action::StopVm { .. } => "stop_vm",
            Action::RestartVm(_) => "restart_vm",
            Action::PauseVm(_) => "pause_vm",
            Action::ResumeVm(_) => "resume_vm",
            Action::DeleteVm(_) => "delete_vm",
            Action::Exec { .. } => "exec",
            Action::OpenExec { .. } => "open_exec",
            Action::PutFile { .. } => "put_file",
            Action::GetFile { .. } => "get_file",
            Action::Logs { .. } => "logs",
            Action::ResizeVm { .. } => "resize_vm",
            Action::CreateBackup(_) => "create_backup",
            Action::ListBackups(_) => "list_backups",
            Action::DeleteBackup { .. } => "delete_backup",
            Action::Restore { .. } => "restore",
            Action::Export(_) => "export",
            Action::Import(_) => "import",
            Action::SetEgress { .. } => "set_egress",
            Action::ListNetworks => "list_networks",
            Action::CreateNetwork(_) => "create_network",
            Action::DeleteNetwork(_) => "delete_network",
            Action::SetMembership { member: true, .. } => "connect_network",
            Action::SetMembership { member: false, .. } => "disconnect_network",
            Action::ListVolumes => "list_volumes",
            Action::CreateVolume(_) => "create_volume",
            Action::DeleteVolume(_) => "delete_volume",
            Action::AttachVolume { .. } => "attach_volume",
            Action::DetachVolume { .. } => "detach_volume",
            Action::Whoami => "whoami",
            Action::SwitchOrg(_) => "switch_org",
            Action::ListUsers => "list_users",
            Action::CreateUser(_) => "create_user",
            Action::DeleteUser(_) => "delete_user",
            Action::ListSshKeys(_) => "list_ssh_keys",
            Action::AddSshKey { .. } => "add_ssh_key",
            Action::RemoveSshKey { .. } => "remove_ssh_key",
            Action::ListApiKeys => "list_api_keys",
            Action::CreateApiKey(_) => "create_api_key",
            Action::RevokeApiKey(_) => "revoke_api_key",
            Action::ListOrgs => "list_orgs",
            Action::CreateOrg(_) => "create_org",
            Action::SetMember { .. } => "set_member",
            Action::RemoveMember { .. } => "remove_member",
            Action::Audit(_) => "audit",
            Action::SetSecret { .. } => "set_secret",
            Action::ListSecrets => "list_secrets",
            Action::DeleteSecret(_) => "delete_secret",
            Action::RotateMasterKey => "rotate_master_key",
        }
    }

    /// The VM the action names, if it names one.
    pub fn vm(&self) -> Option<&str> {
        match self {
            Action::GetVm(name)
            | Action::StartVm(name)
            | Action::StopVm { name, .. }
            | Action::RestartVm(name)
            | Action::PauseVm(name)
            | Action::ResumeVm(name)
            | Action::DeleteVm(name)
            | Action::Exec { name, .. }
            | Action::OpenExec { name, .. }
            | Action::PutFile { name, .. }
            | Action::GetFile { name, .. }
            | Action::Logs { name, .. }
            | Action::CreateBackup(name)
            | Action::ListBackups(name)
            | Action::DeleteBackup { name, .. }
            | Action::Restore { name, .. }
            | Action::Export(name)
            | Action::ResizeVm { name, .. }
            | Action::SetEgress { name, .. } => Some(name),
            Action::SetMembership { vm, .. }
            | Action::AttachVolume { vm, .. }
            | Action::DetachVolume { vm, .. } => Some(vm),
            _ => None,
        }
    }

    /// What the action names, for the audit log: a VM, network, volume, user, org or key.
    pub fn target(&self) -> Option<String> {
        if let Some(vm) = self.vm() {
            return Some(vm.to_owned());
        }
        match self {
            Action::CreateVm(req) => Some(req.name.clone()),
            Action::CreateNetwork(req) => Some(req.name.clone()),
            Action::DeleteNetwork(name)
            | Action::DeleteVolume(name)
            | Action::SwitchOrg(name)
            | Action::DeleteUser(name)
            | Action::ListSshKeys(name)
            | Action::RevokeApiKey(name)
            | Action::CreateOrg(name)
            | Action::DeleteSecret(name)
            | Action::SetSecret { name, .. } => Some(name.clone()),
            Action::CreateVolume(req) => Some(req.name.clone()),
            Action::CreateUser(req) => Some(req.name.clone()),
            Action::AddSshKey { user, .. } | Action::RemoveSshKey { user, .. } => {
                Some(user.clone())
            }
            Action::CreateApiKey(req) => req.user.clone(),
            Action::SetMember { org, user, .. } | Action::RemoveMember { org, user } => {
                Some(format!("{org}/{user}"))
            }
            _ => None,
        }
    }
}

/// The successful result of an [`Action`].
#[derive(Debug)]
pub enum Reply {
    Health(Health),
    Stats(Vec<hearth_api::VmStats>),
    Metrics(String),
    Vms(Vec<Vm>),
    Vm(Vm),
    Created(VmDetail),
    VmDetail(VmDetail),
    Deleted,
    Exec(ExecResponse),
    ExecStream(ExecStream),
    Written,
    Download(Download),
    Log(LogStream),
    Networks(Vec<NetworkInfo>),
    Network(NetworkInfo),
    Backup(hearth_api::Backup),
    Backups(Vec<hearth_api::Backup>),
    Export(ExportStream),
    Volume(hearth_api::Volume),
    Volumes(Vec<hearth_api::Volume>),
    Whoami(hearth_api::Whoami),
    Users(Vec<hearth_api::User>),
    User(hearth_api::User),
    SshKeys(Vec<hearth_api::SshKey>),
    SshKey(hearth_api::SshKey),
    ApiKeys(Vec<hearth_api::ApiKey>),
    CreatedApiKey(hearth_api::CreatedApiKey),
    Orgs(Vec<hearth_api::Org>),
    Org(hearth_api::Org),
    Audit(Vec<hearth_api::AuditEntry>),
    /// A secret as listed, and whether it is new.
    Secret {
        info: hearth_api::SecretInfo,
        created: bool,
    },
    Secrets(Vec<hearth_api::SecretInfo>),
    MasterKeyRotated(hearth_api::RotatedMasterKey),
}

/// State of the guest image, shared with the background build.
#[derive(Debug, Clone)]
pub enum ImageState {
    Building(String),
    Ready(Image),
    Failed(String),
}

/// Owns VM lifecycles. Cheap to clone.
#[derive(Debug, Clone)]
pub struct VmService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<Config>,
    store: Store,
    vmm: Arc<dyn Vmm>,
    image: watch::Receiver<ImageState>,
    spares: Arc<Spares>,
    runtimes: Mutex<HashMap<String, Arc<Runtime>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Set to true when a VM is removed, for the log followers of that VM.
    gone: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Held from an admission check until what it admitted is recorded, so two requests
    /// cannot both take the last of a resource.
    admission: tokio::sync::Mutex<()>,
    /// VM networking; `None` when `network.mode = "off"`.
    network: Option<Network>,
    /// How disks are copied on the data filesystem, as health says it: probed at the first
    /// health request (the filesystem does not change under a running hearthd).
    disk_copies: std::sync::OnceLock<String>,
    /// Held by every change of volumes (after the VM's lock where one is taken), so a volume
    /// is formatted once and attached to one VM.
    volumes: tokio::sync::Mutex<()>,
    metrics: crate::metrics::Metrics,
    access: crate::access::Access,
    secrets: Arc<crate::secrets::Secrets>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// 16 random hex digits (request ids).
pub(crate) fn random_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !ok {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let low = u64::try_from(nanos & u128::from(u64::MAX)).unwrap_or(0);
        bytes = (low ^ u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl VmService {
    #[cfg(test)]
    pub fn new(
        config: Arc<Config>,
        store: Store,
        vmm: Arc<dyn Vmm>,
        image: watch::Receiver<ImageState>,
    ) -> VmService {
        Self::with_network(config, store, vmm, image, None)
    }

    /// [`VmService::new`] with VM networking.
    pub fn with_network(
        config: Arc<Config>,
        store: Store,
        vmm: Arc<dyn Vmm>,
        image: watch::Receiver<ImageState>,
        network: Option<Network>,
    ) -> VmService {
        let access = crate::access::Access::new(store.clone(), config.auth.clone());
        let secrets = Arc::new(crate::secrets::Secrets::new(
            store.clone(),
            config.master_key_path.clone(),
        ));
        VmService {
            inner: Arc::new(Inner {
                store,
                vmm,
                image,
                spares: Arc::new(Spares::new(&config.data_dir, config.guest.rootfs_mib)),
                config,
                runtimes: Mutex::default(),
                locks: Mutex::default(),
                gone: Mutex::default(),
                admission: tokio::sync::Mutex::new(()),
                network,
                disk_copies: std::sync::OnceLock::new(),
                metrics: crate::metrics::Metrics::new(),
                access,
                secrets,
                volumes: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Keeps a spare root disk of the default size ready for the current image (in the
    /// background), so a default create is a rename.
    pub fn refill_spare(&self) {
        let Ok(image) = self.image() else { return };
        let spares = self.inner.spares.clone();
        tokio::task::spawn_blocking(move || spares.refill(&image.id, &image.rootfs()));
    }

    /// Runs one action for `caller`. Every operation of every front end passes here, so this is
    /// where authorization and audit see it.
    pub async fn handle(&self, caller: &Caller, action: Action) -> Result<Reply, VmError> {
        use tracing::Instrument;
        let span = tracing::debug_span!(
            "action",
            action = action.name(),
            principal = %caller.principal,
            source = %caller.source,
            request_id = %caller.request_id,
        );
        let name = action.name();
        let target = action.target();
        async move {
            tracing::debug!("started");
            let started = std::time::Instant::now();
            let allowed = self.authorize(caller, access::Needs::of(&action)).await;
            let decided = allowed.is_ok();
            let reply = match allowed {
                Ok(()) => match self.dispatch(caller, action).await {
                    Ok(reply) => self.visible(caller, reply).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            if let Err(e) = &reply {
                tracing::debug!(code = %e.code(), "failed");
            }
            let code = reply.as_ref().err().map(|e| e.code().as_str());
            let took = started.elapsed();
            self.inner.metrics.action(name, took.as_secs_f64(), code);
            // hearthd's own work is not the callers' to audit.
            if caller.principal != Principal::System {
                self.inner
                    .access
                    .audit(crate::store::access::AuditRecord {
                        at: crate::store::now(),
                        principal: caller.principal.to_string(),
                        org: caller.org().map(str::to_owned),
                        source: caller.source.to_string(),
                        action: name.into(),
                        target,
                        allowed: decided,
                        result: code.unwrap_or("ok").into(),
                        duration_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                        request_id: caller.request_id.clone(),
                    })
                    .await;
            }
            reply
        }
        .instrument(span)
        .await
    }

    async fn dispatch(&self, caller: &Caller, action: Action) -> Result<Reply, VmError> {
        match action {
            Action::Health => Ok(Reply::Health(self.health().await?)),
            Action::Stats => Ok(Reply::Stats(self.stats().await?)),
            Action::Metrics { openmetrics } => {
                Ok(Reply::Metrics(self.metrics_text(openmetrics).await?))
            }
            Action::ListVms => Ok(Reply::Vms(
                self.inner
                    .store
                    .list_vms()
                    .await?
                    .vms
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            )),
            Action::GetVm(name) => Ok(Reply::VmDetail(self.detail(&name).await?)),
            // Lifecycle work runs in a task of its own: a client that hangs up or a request
            // timeout stops the waiting, never the work half-way.
            Action::CreateVm(req) => {
                let (s, caller) = (self.clone(), caller.clone());
                Ok(Reply::Created(
                    lifecycle::detached(async move { s.create(&caller, req).await }).await?,
                ))
            }
            Action::StartVm(name) => {
                let s = self.clone();
                Ok(Reply::Vm(
                    lifecycle::detached(async move { s.start(&name).await }).await?,
                ))
            }
            Action::StopVm { name, timeout } => {
                let s = self.clone();
                Ok(Reply::Vm(
                    lifecycle::detached(async move { s.stop(&name, timeout).await }).await?,
                ))
            }
            Action::RestartVm(name) => {
                let s = self.clone();
                Ok(Reply::Vm(
                    lifecycle::detached(async move { s.restart(&name).await }).await?,
                ))
            }
            Action::PauseVm(name) => {
                let s = self.clone();
                Ok(Reply::Vm(
                    lifecycle::detached(async move { s.pause(&name).await }).await?,
                ))
            }
            Action::ResumeVm(name) => {
                let s = self.clone();
                Ok(Reply::Vm(
                    lifecycle::detached(async move { s.resume(&name).await }).await?,
                ))
            }
            Action::DeleteVm(name) => {
                let s = self.clone();
                lifecycle::detached(async move { s.delete(&name).await }).await?;
                Ok(Reply::Deleted)
            }
            Action::Exec { name, request } => Ok(Reply::Exec(self.exec(&name, request).await?)),
            Action::OpenExec { name, open } => {
                Ok(Reply::ExecStream(self.open_exec_stream(&name, open).await?))
            }
            Action::PutFile {
                name,
                path,
                mode,
                data,
            } => {
                self.put_file(&name, &path, mode, data).await?;
                Ok(Reply::Written)
            }
            Action::GetFile { name, path } => {
                Ok(Reply::Download(self.get_file(&name, &path).await?))
            }
            Action::Logs {
                name,
                source,
                window,
            } => Ok(Reply::Log(self.log_stream(&name, source, window).await?)),
            Action::CreateBackup(name) => {
                Ok(Reply::Backup(self.create_backup(caller, &name).await?))
            }
            Action::ListBackups(name) => Ok(Reply::Backups(self.list_backups(&name).await?)),
            Action::DeleteBackup { name, id } => {
                self.delete_backup(&name, &id).await?;
                Ok(Reply::Deleted)
            }
            Action::Restore { name, backup } => {
                Ok(Reply::VmDetail(self.restore(&name, &backup).await?))
            }
            Action::Export(name) => Ok(Reply::Export(self.export(caller, &name).await?)),
            Action::Import(body) => Ok(Reply::Created(self.import(caller, body).await?)),
            Action::ResizeVm { name, request } => {
                Ok(Reply::VmDetail(self.resize(&name, request).await?))
            }
            Action::SetEgress { name, request } => {
                let s = self.clone();
                Ok(Reply::VmDetail(
                    lifecycle::detached(async move { s.set_egress(&name, request).await }).await?,
                ))
            }
            Action::ListNetworks => Ok(Reply::Networks(self.list_networks().await?)),
            Action::CreateNetwork(req) => {
                Ok(Reply::Network(self.create_network(caller, req).await?))
            }
            Action::DeleteNetwork(name) => {
                self.delete_network(&name).await?;
                Ok(Reply::Deleted)
            }
            Action::SetMembership {
                network,
                vm,
                member,
            } => {
                let s = self.clone();
                Ok(Reply::Network(
                    lifecycle::detached(
                        async move { s.set_membership(&network, &vm, member).await },
                    )
                    .await?,
                ))
            }
            Action::ListVolumes => Ok(Reply::Volumes(self.list_volumes().await?)),
            Action::CreateVolume(req) => {
                let (s, caller) = (self.clone(), caller.clone());
                Ok(Reply::Volume(
                    lifecycle::detached(async move { s.create_volume(&caller, req).await }).await?,
                ))
            }
            Action::DeleteVolume(name) => {
                let s = self.clone();
                lifecycle::detached(async move { s.delete_volume(&name).await }).await?;
                Ok(Reply::Deleted)
            }
            Action::AttachVolume { vm, volume, path } => {
                let s = self.clone();
                Ok(Reply::VmDetail(
                    lifecycle::detached(async move { s.attach_volume(&vm, &volume, &path).await })
                        .await?,
                ))
            }
            Action::DetachVolume { vm, volume } => {
                let s = self.clone();
                Ok(Reply::VmDetail(
                    lifecycle::detached(async move { s.detach_volume(&vm, &volume).await }).await?,
                ))
            }
            action @ (Action::SetSecret { .. }
            | Action::ListSecrets
            | Action::DeleteSecret(_)
            | Action::RotateMasterKey) => self.secret_action(caller, action).await,
            other => self.access_action(caller, other).await,
        }
    }

    async fn health(&self) -> Result<Health, VmError> {
        let (image, image_status) = match &*self.inner.image.borrow() {
            ImageState::Ready(i) => (Some(i.id.clone()), "ready".to_owned()),
            ImageState::Building(step) => (None, format!("building: {step}")),
            ImageState::Failed(why) => (None, format!("failed: {why}")),
        };
        Ok(Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            vmm: self.inner.vmm.kind().into(),
            accel: self.inner.vmm.accel().into(),
            image,
            image_status,
            disk_copies: self.disk_copies().await?,
            capacity: self.capacity().await?,
            network: match &self.inner.network {
                Some(net) => Some(net.health().await),
                None => None,
            },
        })
    }

    /// Every VM's state and shape, and what its VMM process uses now.
    async fn stats(&self) -> Result<Vec<hearth_api::VmStats>, VmError> {
        let vms = self.inner.store.list_vms().await?.vms;
        Ok(vms
            .into_iter()
            .map(|v| {
                let p = v.pid.and_then(crate::metrics::process);
                hearth_api::VmStats {
                    name: v.name,
                    state: v.state,
                    cpus: v.cpus,
                    memory_mib: v.memory_mib,
                    cpu_seconds: p.map(|p| p.cpu_seconds),
                    rss_bytes: p.map(|p| p.rss_bytes),
                    uptime_secs: p.map(|p| p.uptime_secs),
                }
            })
            .collect())
    }

    /// The metrics as a scrape reads them: what was counted, and the host and VMs now.
    async fn metrics_text(&self, openmetrics: bool) -> Result<String, VmError> {
        use hearth_api::VmState as S;
        let vms = self.inner.store.list_vms().await?.vms;
        let states = [
            S::Creating,
            S::Stopped,
            S::Starting,
            S::Running,
            S::Paused,
            S::Stopping,
            S::Error,
            S::Deleting,
        ];
        let vms_by_state = states
            .iter()
            .map(|s| {
                (
                    s.as_str(),
                    vms.iter().filter(|v| v.state == *s).count() as u64,
                )
            })
            .collect();
        let c = self.capacity().await?;
        let capacity = vec![
            ("vcpus", c.vcpus.total, c.vcpus.committed),
            ("memory_mib", c.memory_mib.total, c.memory_mib.committed),
            (
                "ram_files_mib",
                c.ram_files_mib.total,
                c.ram_files_mib.committed,
            ),
            ("disk_mib", c.disk_mib.total, c.disk_mib.committed),
        ];
        let samples = vms
            .iter()
            .filter_map(|v| {
                let p = crate::metrics::process(v.pid?)?;
                Some(crate::metrics::VmSample {
                    name: v.name.clone(),
                    cpu_seconds: p.cpu_seconds,
                    rss_bytes: p.rss_bytes,
                })
            })
            .collect();
        let snapshot = crate::metrics::Snapshot {
            vms_by_state,
            capacity,
            vms: samples,
        };
        Ok(self.inner.metrics.encode(snapshot, openmetrics))
    }

    /// `reflink`, or `sparse (FICLONE: <why not>)`; probed once.
    async fn disk_copies(&self) -> Result<String, VmError> {
        if let Some(known) = self.inner.disk_copies.get() {
            return Ok(known.clone());
        }
        let dir = self.inner.config.data_dir.clone();
        let (method, why) = tokio::task::spawn_blocking(move || disk::probe_clone(&dir))
            .await
            .map_err(|e| VmError::Task(e.to_string()))?;
        let text = match method {
            disk::CopyMethod::Reflink => "reflink".to_owned(),
            disk::CopyMethod::Sparse => format!("sparse (FICLONE: {why})"),
        };
        Ok(self.inner.disk_copies.get_or_init(|| text).clone())
    }

    async fn detail(&self, name: &str) -> Result<VmDetail, VmError> {
        let vm = self.record(name).await?;
        let events = self.inner.store.events(&vm.id).await?;
        let network = self.vm_network(&vm).await?;
        let volumes = self.vm_volumes(&vm.id).await?;
        Ok(VmDetail {
            network,
            volumes,
            vm: vm.into(),
            events: events.into_iter().map(Into::into).collect(),
        })
    }

    pub async fn record(&self, name: &str) -> Result<VmRecord, VmError> {
        match self.inner.store.get_vm(name).await {
            Err(StoreError::NotFound(_)) => Err(VmError::NotFound(name.to_owned())),
            other => Ok(other?),
        }
    }

    fn vm_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.inner.locks)
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.inner.config.data_dir.join("vms").join(id)
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.inner.config.data_dir.join("run").join(id)
    }

    fn image(&self) -> Result<Image, VmError> {
        match &*self.inner.image.borrow() {
            ImageState::Ready(i) => Ok(i.clone()),
            ImageState::Building(step) => Err(VmError::ImageUnavailable(format!(
                "it is being built ({step}); try again when `hearth health` shows an image"
            ))),
            ImageState::Failed(e) => {
                Err(VmError::ImageUnavailable(format!("its build failed: {e}")))
            }
        }
    }

    async fn transition(
        &self,
        vm: &VmRecord,
        input: Input,
        message: Option<&str>,
        pid: Option<Option<u32>>,
        last_error: Option<Option<&str>>,
    ) -> Result<VmRecord, VmError> {
        let to = state::next(vm.state, input).map_err(|reason| VmError::NotAllowed {
            name: vm.name.clone(),
            reason,
        })?;
        let t = Transition {
            from: vm.state,
            to,
            kind: input.event_kind(),
            message,
            pid,
            last_error,
        };
        Ok(self.inner.store.transition(&vm.id, &t).await?)
    }
}
