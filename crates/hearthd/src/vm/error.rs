//! Errors of VM operations. [`VmError::code`] is the one place they become API codes.

use hearth_api::{ErrorCode, VmState};

use super::state::NotAllowed;
use crate::capacity::CapacityError;
use crate::disk::DiskError;
use crate::guest::GuestError;
use crate::net::NetError;
use crate::rules::RuleError;
use crate::secrets::SecretError;
use crate::store::StoreError;
use crate::vmm::VmmError;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("no VM named {0:?}")]
    NotFound(String),
    #[error("a VM named {0:?} already exists")]
    NameTaken(String),
    #[error("cannot {verb} VM {name:?}: {reason}", verb = reason.input.verb())]
    NotAllowed { name: String, reason: NotAllowed },
    #[error("cannot {what} VM {name:?}: it is {state}, and that needs it stopped")]
    NotStopped {
        what: &'static str,
        name: String,
        state: VmState,
    },
    #[error("VM {name:?} is {state}: {what} needs it running")]
    NotRunning {
        name: String,
        state: VmState,
        what: &'static str,
    },
    #[error("the guest image is not ready: {0}")]
    ImageUnavailable(String),
    #[error("VM {name:?} did not start: {reason}")]
    StartFailed { name: String, reason: String },
    #[error("cannot prepare the disk of VM {name:?}")]
    Disk {
        name: String,
        #[source]
        source: DiskError,
    },
    #[error("VMM failure")]
    Vmm(#[from] VmmError),
    #[error("guest of VM {name:?}: {source}")]
    Guest {
        name: String,
        #[source]
        source: GuestError,
    },
    #[error("file {path:?} in VM {name:?}: {source}")]
    GuestFile {
        name: String,
        path: String,
        #[source]
        source: GuestError,
    },
    #[error("program {program:?} cannot run in VM {name:?}: {message}")]
    BadCommand {
        name: String,
        program: String,
        code: hearth_guest_proto::ErrorCode,
        message: String,
    },
    #[error("cannot read the {source_name} log of VM {name:?}")]
    Log {
        name: String,
        source_name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    #[error("cannot measure the host's capacity")]
    HostProbe(#[source] std::io::Error),
    #[error("VM networking failed")]
    Net(#[from] NetError),
    #[error("no network named {0:?}")]
    NoNetwork(String),
    #[error("a network named {0:?} already exists")]
    NetworkTaken(String),
    #[error(
        "network {name:?} still has members ({members}): disconnect them or delete those VMs first"
    )]
    NetworkInUse { name: String, members: String },
    #[error(
        "no address left for a new VM: all {slots} /30 networks of network.cidr are taken; delete a VM, or give network.cidr a shorter prefix"
    )]
    NoAddresses { slots: u32 },
    #[error("VM {vm:?} has no backup {id:?} (a backup restores only into the VM it was made of)")]
    NoBackup { vm: String, id: String },
    #[error("{0}")]
    NoSpace(String),
    #[error("invalid archive: {0}")]
    BadArchive(String),
    #[error("cannot export or import VM {name:?}")]
    Export {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no volume named {0:?} (`hearth volume list` shows the volumes)")]
    NoVolume(String),
    #[error("a volume named {0:?} already exists")]
    VolumeTaken(String),
    #[error(
        "volume {volume:?} is attached to VM {vm:?}: detach it first (`hearth volume detach {vm} {volume}`, with the VM stopped)"
    )]
    VolumeInUse { volume: String, vm: String },
    #[error("VM {vm:?} has no volume {volume:?} attached")]
    VolumeNotAttached { volume: String, vm: String },
    #[error("invalid path {path:?}: VM {vm:?} already has a volume mounted there")]
    VolumePathTaken { vm: String, path: String },
    #[error("cannot prepare volume {volume:?}")]
    VolumeDisk {
        volume: String,
        #[source]
        source: DiskError,
    },
    /// Who the caller is and what it may do: authentication, permissions, users,
    /// organizations and keys. The message is the whole answer.
    #[error("{message}")]
    Access { code: ErrorCode, message: String },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("state store failure")]
    Store(StoreError),
    #[error("an internal task failed: {0}")]
    Task(String),
}

impl From<StoreError> for VmError {
    /// What the store refuses about networks is the caller's to fix, and says so itself.
    fn from(e: StoreError) -> VmError {
        match e {
            StoreError::NoNetwork(n) => VmError::NoNetwork(n),
            StoreError::NetworkTaken(n) => VmError::NetworkTaken(n),
            StoreError::NetworkInUse { name, members } => VmError::NetworkInUse { name, members },
            StoreError::NoAddresses { slots } => VmError::NoAddresses { slots },
            StoreError::NoBackup { vm, id } => VmError::NoBackup { vm, id },
            StoreError::NoVolume(v) => VmError::NoVolume(v),
            StoreError::VolumeTaken(v) => VmError::VolumeTaken(v),
            StoreError::VolumeAttached { volume, vm } => VmError::VolumeInUse { volume, vm },
            StoreError::VolumeNotAttached { volume, vm } => {
                VmError::VolumeNotAttached { volume, vm }
            }
            StoreError::VolumePathTaken { vm, path } => VmError::VolumePathTaken { vm, path },
            StoreError::Taken(..) => VmError::access(ErrorCode::NameTaken, e.to_string()),
            StoreError::NoOrg(_) => VmError::access(ErrorCode::OrgNotFound, e.to_string()),
            other => VmError::Store(other),
        }
    }
}

impl VmError {
    pub fn access(code: ErrorCode, message: impl Into<String>) -> VmError {
        VmError::Access {
            code,
            message: message.into(),
        }
    }

    /// The stable code of this error; the HTTP status and exit code follow from it.
    pub fn code(&self) -> ErrorCode {
        use hearth_guest_proto::ErrorCode as G;
        match self {
            VmError::Rule(r) => r.code,
            VmError::BadRequest(_) => ErrorCode::InvalidRequest,
            VmError::Access { code, .. } => *code,
            VmError::Secret(e) => e.code(),
            VmError::NotFound(_) | VmError::Store(StoreError::NotFound(_)) => ErrorCode::VmNotFound,
            VmError::NameTaken(_) | VmError::Store(StoreError::NameTaken(_)) => {
                ErrorCode::VmNameTaken
            }
            VmError::NotAllowed { .. }
            | VmError::NotRunning { .. }
            | VmError::NotStopped { .. } => ErrorCode::InvalidState,
            VmError::Store(StoreError::StateChanged { .. }) => ErrorCode::VmBusy,
            VmError::ImageUnavailable(_) => ErrorCode::ImageUnavailable,
            VmError::StartFailed { .. } | VmError::Vmm(_) => ErrorCode::VmmFailed,
            VmError::Disk { source, .. } | VmError::VolumeDisk { source, .. } => {
                match source.io() {
                    Some(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                        ErrorCode::ResourceExhausted
                    }
                    _ => ErrorCode::Internal,
                }
            }
            VmError::NoVolume(_) | VmError::VolumeNotAttached { .. } => ErrorCode::VolumeNotFound,
            VmError::VolumeTaken(_) => ErrorCode::VolumeNameTaken,
            VmError::VolumeInUse { .. } => ErrorCode::VolumeInUse,
            VmError::VolumePathTaken { .. } => ErrorCode::InvalidPath,
            VmError::Guest { source, .. } | VmError::GuestFile { source, .. } => match source {
                GuestError::Disconnected => ErrorCode::GuestUnavailable,
                GuestError::NotReady(_) | GuestError::Timeout => ErrorCode::GuestTimeout,
                GuestError::Agent { code, .. } => match (self, code) {
                    (VmError::GuestFile { .. }, G::NotFound) => ErrorCode::GuestFileNotFound,
                    (VmError::GuestFile { .. }, G::InvalidRequest) => ErrorCode::InvalidPath,
                    _ => ErrorCode::GuestError,
                },
                GuestError::Unexpected(_)
                | GuestError::Protocol { .. }
                | GuestError::Overrun
                | GuestError::AgentRestarted => ErrorCode::GuestError,
                GuestError::Aborted(_) => ErrorCode::InvalidRequest,
            },
            VmError::BadCommand {
                code: G::NotFound, ..
            } => ErrorCode::CommandNotFound,
            VmError::BadCommand { .. } => ErrorCode::InvalidCommand,
            VmError::NoNetwork(_) => ErrorCode::NetworkNotFound,
            VmError::NoBackup { .. } => ErrorCode::BackupNotFound,
            VmError::NoSpace(_) => ErrorCode::ResourceExhausted,
            VmError::BadArchive(_) => ErrorCode::InvalidArchive,
            VmError::Export { .. } => ErrorCode::Internal,
            VmError::NetworkTaken(_) => ErrorCode::NetworkNameTaken,
            VmError::NetworkInUse { .. } => ErrorCode::NetworkInUse,
            VmError::NoAddresses { .. } => ErrorCode::InsufficientCapacity,
            VmError::Net(NetError::Store(_)) => ErrorCode::Internal,
            VmError::Net(_) => ErrorCode::NetworkFailed,
            VmError::Capacity(e) if e.disk => ErrorCode::ResourceExhausted,
            VmError::Capacity(_) => ErrorCode::InsufficientCapacity,
            VmError::Log { .. } | VmError::HostProbe(_) | VmError::Store(_) | VmError::Task(_) => {
                ErrorCode::Internal
            }
        }
    }

    /// The message for API clients: this error and its causes, each said once.
    pub fn message(&self) -> String {
        let mut msg = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            let text = s.to_string();
            if !msg.contains(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            source = s.source();
        }
        msg
    }
}
