//! VMM backends behind one trait. Only this module knows which VMM runs a VM; everything above
//! it speaks [`Vmm`] and [`VmHandle`].

pub mod probe;
pub mod qemu;
pub mod qmp;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// What a backend can do. Callers check a capability before offering the feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Pause and resume a running guest.
    pub pause: bool,
    /// Save and restore memory snapshots.
    pub snapshot: bool,
    /// virtio-vsock between host and guest.
    pub vsock: bool,
    /// Add devices to a running guest.
    pub hotplug: bool,
    /// Hardware acceleration (KVM) is in use.
    pub hardware_accel: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM exited during start-up ({status}); its log says: {log}")]
    EarlyExit { status: String, log: String },
    #[error("the VMM did not open its control socket within {0} s")]
    NoControlSocket(u64),
    #[error("VMM control failed")]
    Qmp(#[from] qmp::QmpError),
    #[error("cannot prepare VM files in {path}")]
    Files {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unavailable(String),
}

/// Everything a backend needs to launch one VM. Paths are owned by the caller.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub id: String,
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub rootfs: PathBuf,
    /// Directory for sockets and other per-run files; removed after the VM stops.
    pub run_dir: PathBuf,
    /// Serial console output.
    pub serial_log: PathBuf,
    /// The VMM's own stdout/stderr.
    pub vmm_log: PathBuf,
}

impl LaunchSpec {
    /// Host end of the guest agent's virtio-serial port.
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }
}

/// A backend: QEMU, Firecracker, or a test double.
#[async_trait]
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// `qemu` or `firecracker`, as stored with each VM.
    fn kind(&self) -> &'static str;
    /// `kvm` or `tcg`.
    fn accel(&self) -> &'static str;
    fn capabilities(&self) -> Capabilities;
    /// The directory this backend keeps guest RAM files in, when it keeps guest RAM in files
    /// (QEMU: a 0700 directory of this hearthd's on the `/dev/shm` tmpfs); `statvfs` of it gives
    /// the capacity and use of the filesystem those files fill.
    fn ram_dir(&self) -> Option<&Path> {
        None
    }
    /// Starts the VMM for `spec`; returns once the VMM runs (the guest may still be booting).
    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmHandle>, VmmError>;
    /// Re-attaches to a VMM process started by an earlier hearthd. `Ok(None)` when that process
    /// is gone (or `pid` now belongs to something else).
    async fn adopt(
        &self,
        spec: &LaunchSpec,
        pid: u32,
    ) -> Result<Option<Box<dyn VmHandle>>, VmmError>;
}

/// A running VMM process.
#[async_trait]
pub trait VmHandle: Send + Sync + std::fmt::Debug {
    fn pid(&self) -> u32;
    /// Resolves once the VMM process has exited and released the VM's files.
    async fn wait_exit(&self);
    /// Asks the guest to power off through virtual hardware (ACPI power button).
    async fn request_poweroff(&self) -> Result<(), VmmError>;
    /// Ends the VMM now.
    async fn kill(&self) -> Result<(), VmmError>;
}

/// True when `path` exists and is a socket something listens on.
pub(crate) fn socket_exists(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
