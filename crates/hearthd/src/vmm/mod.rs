//! VMM backends behind one trait. Only this module knows which VMM runs a VM; everything above
//! it speaks [`Vmm`] and [`VmHandle`].

#[cfg(test)]
pub mod double;
pub mod probe;
pub mod qemu;
pub mod qmp;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// What a backend can do, as far as hearthd drives it: a capability is true only once hearthd
/// has the operation behind it. Callers check a capability before offering the feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Pause and resume a running guest ([`VmHandle::pause`], [`VmHandle::resume`]).
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
    #[error("the guest is {found} after {operation}, not {want}")]
    RunState {
        operation: &'static str,
        want: GuestRun,
        found: GuestRun,
    },
}

/// Whether a VMM's guest runs, as the VMM itself reports it (QEMU: `query-status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRun {
    /// Its vCPUs run.
    Running,
    /// Its vCPUs are stopped by a pause; RAM and devices are kept.
    Paused,
    /// Anything else the VMM reports, in its own words (QEMU: `shutdown`, `io-error`, ...).
    Other(String),
}

impl std::fmt::Display for GuestRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestRun::Running => f.write_str("running"),
            GuestRun::Paused => f.write_str("paused"),
            GuestRun::Other(what) => f.write_str(what),
        }
    }
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
    /// The TAP of the VM's network slot, when it has one: the guest's NIC (MAC
    /// `hearth_helper::proto::GUEST_MAC`) is attached to it.
    pub tap: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// Extra disks (volumes), in the order the guest gets them.
    pub volumes: Vec<VolumeDisk>,
}

/// One extra disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDisk {
    /// A raw disk image.
    pub file: PathBuf,
    /// What the guest reads as the disk's serial (at most 20 bytes: virtio-blk's limit).
    pub serial: String,
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
    /// Called when a guest kernel is at hand, before VMs are launched with it: the backend
    /// finishes what it cannot decide without one (QEMU: whether KVM really runs guests).
    /// `cache` is a file the backend may keep its findings in.
    async fn prepare(&self, kernel: &Path, cache: &Path);
    /// The directory this backend keeps guest RAM files in, when it keeps guest RAM in files
    /// (QEMU: a 0700 directory of this hearthd's on the `/dev/shm` tmpfs); `statvfs` of it gives
    /// the capacity and use of the filesystem those files fill.
    fn ram_dir(&self) -> Option<&Path> {
        None
    }
    /// Starts the VMM for `spec`; returns once the VMM runs (the guest may still be booting).
    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmHandle>, VmmError>;
    /// The VMM process of `spec` found by its run directory, whatever pid was recorded: for a
    /// hearthd that died between launching a VMM and recording its pid.
    fn find(&self, spec: &LaunchSpec) -> Option<u32>;
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
    /// Stops the guest's vCPUs and returns once the VMM reports the guest paused; it keeps
    /// its RAM, devices and open files. Pausing a paused guest changes nothing.
    async fn pause(&self) -> Result<(), VmmError>;
    /// Lets a paused guest's vCPUs run again and returns once the VMM reports it running.
    async fn resume(&self) -> Result<(), VmmError>;
    /// What the VMM says its guest is doing now.
    async fn run_state(&self) -> Result<GuestRun, VmmError>;
}

/// The first process whose command line has an argument containing `needle`.
pub(crate) fn process_with_arg(needle: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        if pid == me {
            return None;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        cmdline
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(needle))
            .then_some(pid)
    })
}

/// True when `path` exists and is a socket something listens on.
pub(crate) fn socket_exists(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_are_found_by_an_argument() {
        let marker = format!("/tmp/hearth-find-test-{}/qmp.sock", std::process::id());
        // `tail -F` keeps running while it waits for the (missing) file to appear.
        let mut child = std::process::Command::new("tail")
            .args(["-F", "-q", &marker])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut found = None;
        while found.is_none() && std::time::Instant::now() < deadline {
            found = process_with_arg(&marker);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found, Some(child.id()));
        assert_eq!(process_with_arg("/no/such/hearth/run/dir"), None);
    }
}
