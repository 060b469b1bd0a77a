//! The QEMU backend: the `microvm` machine, KVM when the probe says it works, TCG otherwise.
//!
//! Guest RAM is a file on tmpfs shared with QEMU (`memory-backend-file`, `share=on`), so later
//! snapshots only have to save device state (DESIGN.md, "Guest memory and fast paths"). The
//! files live in a directory of this hearthd's own on `/dev/shm` ([`ram_dir_for`], mode 0700,
//! checked to be ours at start), and each is created by hearthd with `O_EXCL`, mode 0600, before
//! QEMU is given its path: no other local user can read a guest's memory or plant a file there.
//! Firmware is QEMU's qboot: Debian's default microvm firmware (SeaBIOS) corrupts guests that
//! have exactly 2048 MiB of RAM.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::qmp::{Qmp, RunState};
use super::{Capabilities, GuestRun, LaunchSpec, VmHandle, Vmm, VmmError, probe, socket_exists};

/// How long `stop`, `cont` and `query-status` may take: QEMU does each at once (`stop` waits
/// for the vCPUs to leave guest code), so this is only a bound on a QEMU that hangs.
const RUN_CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where QEMU's own microvm firmware lives (package qemu-system-data).
pub const DEFAULT_FIRMWARE: &str = "/usr/share/qemu/qboot.rom";

/// The tmpfs guest RAM files live on.
pub const SHM: &str = "/dev/shm";

/// The directory of the guest RAM files of the hearthd whose data directory is `data_dir`:
/// `/dev/shm/hearth-<the first 16 hex digits of the SHA-256 of the data_dir path>`. One per
/// data directory, so two hearthds (or test runs) never share one.
pub fn ram_dir_for(data_dir: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Path::new(SHM).join(format!("hearth-{hex}"))
}

/// Makes `dir` (mode 0700) or checks the one there: it must be a real directory owned by this
/// user, never a symlink or somebody else's directory planted in the world-writable `/dev/shm`.
pub fn prepare_ram_dir(dir: &Path) -> Result<(), VmmError> {
    let files_err = |source| VmmError::Files {
        path: dir.display().to_string(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(files_err(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(files_err)?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_dir() {
        return Err(VmmError::Unavailable(format!(
            "the guest RAM directory {} is not a directory (a symlink or file is in its place); remove it",
            dir.display()
        )));
    }
    if meta.uid() != me {
        return Err(VmmError::Unavailable(format!(
            "the guest RAM directory {} belongs to uid {}, not to hearthd's uid {me}: someone else made it; remove it",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(files_err)?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

#[derive(Debug)]
pub struct Qemu {
    binary: PathBuf,
    firmware: PathBuf,
    /// The accelerator guests are launched with now.
    accel: std::sync::RwLock<Accel>,
    /// `qemu.accel = auto` and the firmware probe passed: KVM is used once the kernel probe
    /// ([`Vmm::prepare`]) confirms that it runs a real guest kernel; until then, TCG.
    kvm_unconfirmed: bool,
    /// The kernel [`Vmm::prepare`] last settled the accelerator with.
    prepared_for: std::sync::Mutex<Option<PathBuf>>,
    probe_dir: PathBuf,
    tsc_khz: Option<u64>,
    ram_dir: PathBuf,
}

impl Qemu {
    /// Checks the binary and firmware and decides the accelerator: `want` is `None` for auto
    /// (probe), or a forced choice (KVM is still probed, so a broken KVM is a clear error).
    pub async fn new(
        binary: &Path,
        want: Option<Accel>,
        probe_dir: &Path,
        ram_dir: PathBuf,
    ) -> Result<Qemu, VmmError> {
        prepare_ram_dir(&ram_dir)?;
        let firmware = PathBuf::from(DEFAULT_FIRMWARE);
        if !firmware.exists() {
            return Err(VmmError::Unavailable(format!(
                "QEMU's microvm firmware {} is missing; install the qemu-system-data package (make deps)",
                firmware.display()
            )));
        }
        let version = tokio::process::Command::new(binary)
            .arg("--version")
            .output()
            .await
            .map_err(|source| VmmError::Spawn {
                binary: binary.display().to_string(),
                source,
            })?;
        let version = String::from_utf8_lossy(&version.stdout).to_string();
        check_version(&version)?;
        let (accel, kvm_unconfirmed) = match want {
            Some(Accel::Tcg) => (Accel::Tcg, false),
            Some(Accel::Kvm) => {
                probe::run(binary, "kvm", probe_dir).await.map_err(|why| {
                    VmmError::Unavailable(format!("qemu.accel is kvm but KVM does not work: {why}"))
                })?;
                (Accel::Kvm, false)
            }
            None => match probe::run(binary, "kvm", probe_dir).await {
                Ok(()) => (Accel::Tcg, true),
                Err(why) => {
                    tracing::info!(%why, "KVM is not usable; guests run under TCG emulation");
                    (Accel::Tcg, false)
                }
            },
        };
        Ok(Qemu {
            binary: binary.to_owned(),
            firmware,
            accel: std::sync::RwLock::new(accel),
            kvm_unconfirmed,
            prepared_for: std::sync::Mutex::default(),
            probe_dir: probe_dir.to_owned(),
            tsc_khz: host_tsc_khz(),
            ram_dir,
        })
    }

    fn current_accel(&self) -> Accel {
        *self
            .accel
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Path of a VM's RAM file.
    pub fn ram_file(&self, id: &str) -> PathBuf {
        self.ram_dir.join(format!("{id}.ram"))
    }

    /// Where a VM's RAM file was before hearthd had a directory of its own (VMs started by an
    /// older hearthd and adopted by this one).
    fn legacy_ram_file(id: &str) -> PathBuf {
        Path::new(SHM).join(format!("hearth-{id}.ram"))
    }

    /// Creates the VM's RAM file, empty (QEMU sizes it), mode 0600, failing if anything is
    /// there: only after this does QEMU get its path.
    fn create_ram_file(&self, id: &str) -> Result<PathBuf, VmmError> {
        let ram = self.ram_file(id);
        // A stale file of a crashed run; only hearthd can write to its directory.
        let _ = std::fs::remove_file(&ram);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&ram)
            .map_err(|source| VmmError::Files {
                path: ram.display().to_string(),
                source,
            })?;
        Ok(ram)
    }

    fn qmp_socket(spec: &LaunchSpec) -> PathBuf {
        spec.run_dir.join("qmp.sock")
    }

    /// The full argument vector for `spec`.
    pub fn args(&self, spec: &LaunchSpec) -> Vec<String> {
        let (accel, cpu) = match self.current_accel() {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        let mut cmdline = format!(
            "console=ttyS0 panic=1 no_timer_check tsc=reliable quiet {}",
            spec.cmdline
        );
        if let Some(khz) = self.tsc_khz {
            // lpj for HZ=250 (Debian's kernels); skips the delay-loop calibration.
            cmdline = format!("{cmdline} tsc_early_khz={khz} lpj={}", khz * 4);
        }
        let path = |p: &Path| p.display().to_string();
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("hearth-{},debug-threads=on", spec.name),
            "-M".into(),
            format!("microvm,accel={accel},memory-backend=mem0"),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            spec.cpus.to_string(),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-object".into(),
            format!(
                "memory-backend-file,id=mem0,size={}M,mem-path={},share=on",
                spec.memory_mib,
                path(&self.ram_file(&spec.id))
            ),
            "-bios".into(),
            path(&self.firmware),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            path(&spec.kernel),
            "-initrd".into(),
            path(&spec.initrd),
            "-append".into(),
            cmdline,
            "-chardev".into(),
            format!("file,id=serial0,path={},append=on", path(&spec.serial_log)),
            "-serial".into(),
            "chardev:serial0".into(),
            "-drive".into(),
            format!(
                "id=root,file={},format=raw,if=none,cache=writeback,discard=unmap",
                path(&spec.rootfs)
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                path(&spec.agent_socket())
            ),
            "-device".into(),
            format!(
                "virtserialport,chardev=agent,name={}",
                hearth_guest_proto::PORT_NAME
            ),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path(&Self::qmp_socket(spec))),
        ];
        for (n, volume) in spec.volumes.iter().enumerate() {
            args.extend([
                "-drive".into(),
                format!(
                    "id=vol{n},file={},format=raw,if=none,cache=writeback,discard=unmap",
                    path(&volume.file)
                ),
                "-device".into(),
                format!("virtio-blk-device,drive=vol{n},serial={}", volume.serial),
            ]);
        }
        if spec.tap.is_some() {
            // The TAP is the child's descriptor TAP_FD (see `launch`). vhost needs
            // /dev/vhost-net, which an unprivileged hearthd may not open; TCG gains nothing.
            args.extend([
                "-netdev".into(),
                format!("tap,id=net0,fd={TAP_FD},vhost=off"),
                "-device".into(),
                format!(
                    "virtio-net-device,netdev=net0,mac={}",
                    hearth_helper::proto::GUEST_MAC
                ),
            ]);
        }
        args
    }
}

/// The descriptor number QEMU finds the VM's TAP at.
const TAP_FD: i32 = 3;

fn check_version(text: &str) -> Result<(), VmmError> {
    // "QEMU emulator version 10.0.2 (Debian ...)"
    let version = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (8, 2) {
        return Err(VmmError::Unavailable(format!(
            "QEMU {version} is too old: Hearth needs 8.2 or newer (on Debian 12, from bookworm-backports; `make deps` installs it)"
        )));
    }
    Ok(())
}

/// The host's TSC frequency in kHz, which the guest kernel is told so it does not calibrate
/// (calibration under emulation is slow and sometimes hangs).
fn host_tsc_khz() -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        && let Ok(khz) = s.trim().parse()
    {
        return Some(khz);
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim();
    mhz_to_khz(mhz)
}

/// `"2596.098"` → `2596098`, without floating point.
fn mhz_to_khz(mhz: &str) -> Option<u64> {
    let (whole, frac) = mhz.split_once('.').unwrap_or((mhz, ""));
    let frac: String = frac.chars().chain("000".chars()).take(3).collect();
    let khz = whole.parse::<u64>().ok()? * 1000 + frac.parse::<u64>().ok()?;
    (khz > 0).then_some(khz)
}

#[async_trait]
impl Vmm for Qemu {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> &'static str {
        match self.current_accel() {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    fn ram_dir(&self) -> Option<&Path> {
        Some(&self.ram_dir)
    }

    fn capabilities(&self) -> Capabilities {
        // Only what hearthd drives: pause and resume (QMP `stop`/`cont`), no snapshot
        // operation yet (QEMU could), so offering it would promise what no endpoint does.
        Capabilities {
            pause: true,
            snapshot: false,
            vsock: false,
            hotplug: false,
            hardware_accel: self.current_accel() == Accel::Kvm,
        }
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmHandle>, VmmError> {
        let files_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| VmmError::Files { path, source }
        };
        std::fs::create_dir_all(&spec.run_dir).map_err(files_err(&spec.run_dir))?;
        let qmp_path = Self::qmp_socket(spec);
        for stale in [&qmp_path, &spec.agent_socket()] {
            let _ = std::fs::remove_file(stale);
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&spec.vmm_log)
            .map_err(files_err(&spec.vmm_log))?;
        let ram = self.create_ram_file(&spec.id)?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log.try_clone().map_err(files_err(&spec.vmm_log))?;
        let mut cmd = tokio::process::Command::new(&self.binary);
        if let Some(tap) = &spec.tap {
            let raw = tap.as_raw_fd();
            // SAFETY: the closure runs in the child between fork and exec and calls only
            // dup2(2) and fcntl(2), which are async-signal-safe; `raw` stays open in the parent
            // (the spec holds it) until the spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    if raw == TAP_FD {
                        // Already in place: only the close-on-exec flag must go.
                        if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else if libc::dup2(raw, TAP_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args(self.args(spec))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C or SIGTERM aimed at hearthd must not reach the VM,
            // which outlives hearthd and is re-adopted by the next one.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(source) => {
                let _ = std::fs::remove_file(&ram);
                return Err(VmmError::Spawn {
                    binary: self.binary.display().to_string(),
                    source,
                });
            }
        };
        let pid = child.id().unwrap_or(0);
        // Opened while the child cannot have been reaped yet, so it names exactly this process.
        let pidfd = pidfd_open(pid);
        let qmp = match control(&mut child, &qmp_path, &spec.vmm_log, log_start).await {
            Ok(q) => q,
            Err(e) => {
                // Whatever went wrong, nothing of this launch stays behind.
                let _ = child.start_kill();
                let _ = child.wait().await;
                let _ = std::fs::remove_file(&ram);
                return Err(e);
            }
        };
        let (tx, exited) = watch::channel(false);
        tokio::spawn(async move {
            let _ = child.wait().await;
            let _ = std::fs::remove_file(ram);
            let _ = tx.send(true);
        });
        Ok(Box::new(QemuHandle {
            pid,
            pidfd,
            qmp: Arc::new(qmp),
            exited,
        }))
    }

    async fn prepare(&self, kernel: &Path, cache: &Path) {
        // `qemu.accel = kvm` was forced (and passed the firmware probe); auto keeps deciding.
        let forced = !self.kvm_unconfirmed && self.current_accel() == Accel::Kvm;
        if !self.kvm_unconfirmed && !forced {
            return; // tcg
        }
        {
            let mut last = self
                .prepared_for
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.as_deref() == Some(kernel) {
                return; // settled for this kernel already
            }
            *last = Some(kernel.to_owned());
        }
        let verdict =
            probe::run_kernel(&self.binary, &self.firmware, kernel, &self.probe_dir, cache).await;
        let set = |accel| {
            *self
                .accel
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = accel;
        };
        match (verdict, forced) {
            (Ok(()), _) => {
                if !forced {
                    tracing::info!("KVM runs the guest kernel; guests from now on use KVM");
                }
                set(Accel::Kvm);
            }
            (Err(why), false) => {
                tracing::info!(%why, "KVM is not usable; guests run under TCG emulation");
                set(Accel::Tcg);
            }
            (Err(why), true) => {
                tracing::error!(%why, "qemu.accel is kvm but KVM does not run the guest kernel; VMs will not boot");
            }
        }
    }

    fn find(&self, spec: &LaunchSpec) -> Option<u32> {
        super::process_with_arg(&format!("unix:{},", Self::qmp_socket(spec).display()))
    }

    async fn adopt(
        &self,
        spec: &LaunchSpec,
        pid: u32,
    ) -> Result<Option<Box<dyn VmHandle>>, VmmError> {
        let qmp_path = Self::qmp_socket(spec);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let ours = cmdline.contains(&qmp_path.display().to_string());
        if !ours {
            let _ = std::fs::remove_file(self.ram_file(&spec.id));
            return Ok(None);
        }
        // A VMM started by a hearthd older than the RAM directory has its file in /dev/shm.
        let legacy = Self::legacy_ram_file(&spec.id);
        let ram = if cmdline.contains(&format!("mem-path={},", legacy.display())) {
            legacy
        } else {
            self.ram_file(&spec.id)
        };
        // A pidfd tells us when the process ends even though it is not our child.
        let Some(pidfd) = pidfd_open(pid) else {
            return Ok(None);
        };
        let answered = async {
            let qmp = Qmp::connect(&qmp_path).await?;
            let status = qmp.status().await?;
            Ok::<_, super::qmp::QmpError>((qmp, status))
        };
        let qmp = match answered.await {
            Ok((qmp, status)) => {
                let status = status.status;
                tracing::info!(vm = %spec.name, pid, %status, "re-attached to running VMM");
                qmp
            }
            Err(e) => {
                // Ours, but beyond control: end it rather than leave it running untracked.
                tracing::warn!(vm = %spec.name, pid, error = %e, "VMM does not answer on QMP; ending it");
                signal_pidfd(&pidfd, libc::SIGKILL);
                if let Ok(fd) = register_pidfd(pidfd) {
                    let _ = tokio::time::timeout(Duration::from_secs(10), fd.readable()).await;
                }
                let _ = std::fs::remove_file(&ram);
                return Ok(None);
            }
        };
        let (tx, exited) = watch::channel(false);
        let kill_fd = pidfd.try_clone().ok();
        tokio::spawn(async move {
            if let Ok(fd) = register_pidfd(pidfd) {
                let _ = fd.readable().await;
            }
            let _ = std::fs::remove_file(ram);
            let _ = tx.send(true);
        });
        Ok(Some(Box::new(QemuHandle {
            pid,
            pidfd: kill_fd,
            qmp: Arc::new(qmp),
            exited,
        })))
    }
}

/// Waits for a freshly launched QEMU's QMP socket and connects to it; fails when QEMU exits
/// first or the socket does not appear in time.
async fn control(
    child: &mut tokio::process::Child,
    qmp_path: &Path,
    vmm_log: &Path,
    log_start: u64,
) -> Result<Qmp, VmmError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            return Err(VmmError::EarlyExit {
                status: status.to_string(),
                log: log_tail(vmm_log, log_start),
            });
        }
        if socket_exists(qmp_path) {
            // QEMU creates the socket file a moment before it listens on it.
            match Qmp::connect(qmp_path).await {
                Ok(qmp) => return Ok(qmp),
                Err(super::qmp::QmpError::Connect { source, .. })
                    if source.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline => {}
                Err(e) => return Err(e.into()),
            }
        }
        if Instant::now() > deadline {
            return Err(VmmError::NoControlSocket(30));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub(super) fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new file descriptor or -1; no memory
    // is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    let fd = i32::try_from(fd).ok()?;
    // SAFETY: `fd` was just returned by pidfd_open, is open, and is owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd becomes readable when its process exits.
pub(super) fn register_pidfd(pidfd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `pidfd` is an open OwnedFd moved into the AsyncFd, which owns it until it is
    // dropped, so the descriptor stays valid and unchanged for the AsyncFd's lifetime.
    unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }.map_err(|e| e.into())
}

/// Sends `signal` to exactly the process `fd` refers to (never to a recycled pid).
pub(super) fn signal_pidfd(fd: &OwnedFd, signal: i32) {
    // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo; no memory is shared.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// How much of the end of a log [`log_tail`] reads.
const LOG_TAIL_BYTES: u64 = 16 * 1024;

/// The end of what the VMM wrote to its log since `from`, for error messages. Reads at most the
/// last [`LOG_TAIL_BYTES`], by seeking: the log may be large.
fn log_tail(path: &Path, from: u64) -> String {
    let mut text = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let start = from.max(len.saturating_sub(LOG_TAIL_BYTES));
        if start < len && file.seek(SeekFrom::Start(start)).is_ok() {
            let _ = file.take(LOG_TAIL_BYTES).read_to_end(&mut text);
        }
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
    if tail.is_empty() {
        "(nothing)".into()
    } else {
        tail
    }
}

#[derive(Debug)]
struct QemuHandle {
    pid: u32,
    /// Signals go through this, never through the bare pid, which could be recycled.
    pidfd: Option<OwnedFd>,
    qmp: Arc<Qmp>,
    exited: watch::Receiver<bool>,
}

#[async_trait]
impl VmHandle for QemuHandle {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn wait_exit(&self) {
        let mut rx = self.exited.clone();
        let _ = rx.wait_for(|e| *e).await;
    }

    async fn request_poweroff(&self) -> Result<(), VmmError> {
        self.qmp.execute("system_powerdown", None).await?;
        Ok(())
    }

    async fn kill(&self) -> Result<(), VmmError> {
        if *self.exited.borrow() {
            return Ok(());
        }
        // `quit` lets QEMU flush its disk caches; SIGKILL only if it does not go.
        let _ = tokio::time::timeout(Duration::from_secs(3), self.qmp.execute("quit", None)).await;
        if tokio::time::timeout(Duration::from_secs(5), self.wait_exit())
            .await
            .is_err()
        {
            if let Some(fd) = &self.pidfd {
                signal_pidfd(fd, libc::SIGKILL);
            }
            self.wait_exit().await;
        }
        Ok(())
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.qmp
            .execute_within("stop", None, RUN_CONTROL_TIMEOUT)
            .await?;
        self.expect("stop", GuestRun::Paused).await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.qmp
            .execute_within("cont", None, RUN_CONTROL_TIMEOUT)
            .await?;
        self.expect("cont", GuestRun::Running).await
    }

    async fn run_state(&self) -> Result<GuestRun, VmmError> {
        let info = self.qmp.status_within(RUN_CONTROL_TIMEOUT).await?;
        Ok(match info.status {
            RunState::Running => GuestRun::Running,
            RunState::Paused => GuestRun::Paused,
            other => GuestRun::Other(other.to_string()),
        })
    }
}

impl QemuHandle {
    /// Checks with `query-status` that `command` left the guest in `want`.
    async fn expect(&self, command: &'static str, want: GuestRun) -> Result<(), VmmError> {
        let found = self.run_state().await?;
        if found == want {
            Ok(())
        } else {
            Err(VmmError::RunState {
                operation: command,
                want,
                found,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_mhz_parsing() {
        assert_eq!(mhz_to_khz("2596.098"), Some(2_596_098));
        assert_eq!(mhz_to_khz("3000"), Some(3_000_000));
        assert_eq!(mhz_to_khz("1999.5"), Some(1_999_500));
        assert_eq!(mhz_to_khz("0.000"), None);
        assert_eq!(mhz_to_khz("fast"), None);
    }

    #[test]
    fn version_check() {
        assert!(check_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds)").is_ok());
        assert!(check_version("QEMU emulator version 8.2.0").is_ok());
        let err = check_version("QEMU emulator version 7.2.15 (Debian)").unwrap_err();
        assert!(err.to_string().contains("7.2.15 is too old"));
    }

    fn qemu_with_ram_dir(ram_dir: PathBuf) -> Qemu {
        Qemu {
            binary: "qemu-system-x86_64".into(),
            firmware: DEFAULT_FIRMWARE.into(),
            accel: std::sync::RwLock::new(Accel::Tcg),
            kvm_unconfirmed: false,
            prepared_for: std::sync::Mutex::default(),
            probe_dir: "/tmp".into(),
            tsc_khz: None,
            ram_dir,
        }
    }

    #[tokio::test]
    async fn auto_keeps_tcg_until_a_kernel_boots_under_kvm_and_probes_each_kernel_once() {
        let dir = tempfile::tempdir().unwrap();
        let q = Qemu {
            binary: "/no/such/qemu".into(),
            kvm_unconfirmed: true,
            probe_dir: dir.path().to_owned(),
            ..qemu_with_ram_dir(dir.path().join("ram"))
        };
        let cache = dir.path().join("kvm-probe");
        let kernel = dir.path().join("vmlinuz");
        assert_eq!(q.accel(), "tcg", "not before the kernel probe");
        q.prepare(&kernel, &cache).await;
        assert_eq!(q.accel(), "tcg", "a kernel that cannot run keeps TCG");
        assert!(cache.exists(), "the verdict is cached");
        std::fs::remove_file(&cache).unwrap();
        q.prepare(&kernel, &cache).await;
        assert!(!cache.exists(), "the same kernel is not probed again");
        q.prepare(&dir.path().join("vmlinuz-2"), &cache).await;
        assert!(cache.exists(), "a new kernel is");
    }

    #[test]
    fn capabilities_claim_only_what_hearthd_implements() {
        let caps = qemu_with_ram_dir("/tmp/unused".into()).capabilities();
        assert_eq!(
            caps,
            Capabilities {
                pause: true,
                snapshot: false,
                vsock: false,
                hotplug: false,
                hardware_accel: false,
            }
        );
    }

    #[test]
    fn each_data_dir_has_its_own_ram_dir() {
        let a = ram_dir_for(Path::new("/var/lib/hearth"));
        assert_eq!(a, ram_dir_for(Path::new("/var/lib/hearth")));
        assert_ne!(a, ram_dir_for(Path::new("/var/lib/hearth2")));
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(
            a.starts_with(SHM) && name.len() == "hearth-".len() + 16,
            "{a:?}"
        );
    }

    #[test]
    fn the_ram_dir_is_private_and_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ram");
        prepare_ram_dir(&dir).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        // One that was left open is closed again.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        prepare_ram_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // A symlink planted in its place is refused, not followed.
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let planted = tmp.path().join("planted");
        std::os::unix::fs::symlink(&elsewhere, &planted).unwrap();
        let err = prepare_ram_dir(&planted).unwrap_err().to_string();
        assert!(err.contains("is not a directory"), "{err}");
        if nix::unistd::geteuid().is_root() {
            let theirs = tmp.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let err = prepare_ram_dir(&theirs).unwrap_err().to_string();
            assert!(err.contains("belongs to uid 65534"), "{err}");
        }
    }

    #[test]
    fn ram_files_are_made_by_hearthd_private_and_fresh() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ram");
        prepare_ram_dir(&dir).unwrap();
        let q = qemu_with_ram_dir(dir.clone());
        let ram = q.create_ram_file("abc").unwrap();
        assert_eq!(ram, dir.join("abc.ram"));
        let meta = std::fs::symlink_metadata(&ram).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.len()), (0o600, 0));
        // A stale file, or a symlink in its place, is replaced, never written through.
        let target = tmp.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        std::fs::remove_file(&ram).unwrap();
        std::os::unix::fs::symlink(&target, &ram).unwrap();
        let ram = q.create_ram_file("abc").unwrap();
        assert!(std::fs::symlink_metadata(&ram).unwrap().is_file());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn log_tails_seek_to_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("vmm.log");
        std::fs::write(&log, b"old line\n").unwrap();
        let from = std::fs::metadata(&log).unwrap().len();
        assert_eq!(log_tail(&log, from), "(nothing)");
        // 64 GiB of hole, then the last words: reading the whole file could not work.
        let f = OpenOptions::new().write(true).open(&log).unwrap();
        f.set_len(64 << 30).unwrap();
        drop(f);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, b"one\ntwo\nthree\nfour\n").unwrap();
        assert_eq!(log_tail(&log, from), "two / three / four");
        assert_eq!(log_tail(&tmp.path().join("missing"), 0), "(nothing)");
    }

    #[test]
    fn args_carry_the_spec() {
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
            firmware: DEFAULT_FIRMWARE.into(),
            accel: std::sync::RwLock::new(Accel::Tcg),
            kvm_unconfirmed: false,
            prepared_for: std::sync::Mutex::default(),
            probe_dir: "/tmp".into(),
            tsc_khz: Some(2_000_000),
            ram_dir: "/dev/shm/hearth-0123456789abcdef".into(),
        };
        let spec = LaunchSpec {
            id: "abc".into(),
            name: "web".into(),
            cpus: 2,
            memory_mib: 2048,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "hearth.hostname=web".into(),
            rootfs: "/r.ext4".into(),
            run_dir: "/run/x".into(),
            serial_log: "/l/serial.log".into(),
            vmm_log: "/l/vmm.log".into(),
            tap: None,
            volumes: Vec::new(),
        };
        let args = q.args(&spec).join(" ");
        assert!(!args.contains("-netdev"), "no network without a TAP");
        assert!(!args.contains("vol0"), "no volumes");
        let with_volumes = LaunchSpec {
            volumes: vec![
                crate::vmm::VolumeDisk {
                    file: "/v/0123456789abcdef.ext4".into(),
                    serial: "0123456789abcdef".into(),
                },
                crate::vmm::VolumeDisk {
                    file: "/v/fedcba9876543210.ext4".into(),
                    serial: "fedcba9876543210".into(),
                },
            ],
            ..spec.clone()
        };
        let vols = q.args(&with_volumes).join(" ");
        assert!(
            vols.contains("-drive id=vol0,file=/v/0123456789abcdef.ext4,format=raw,if=none,cache=writeback,discard=unmap -device virtio-blk-device,drive=vol0,serial=0123456789abcdef -drive id=vol1,file=/v/fedcba9876543210.ext4,"),
            "{vols}"
        );
        assert!(
            vols.find("drive=root").unwrap() < vols.find("drive=vol0").unwrap(),
            "the root disk comes first: {vols}"
        );
        let with_tap = LaunchSpec {
            tap: Some(Arc::new(OwnedFd::from(
                std::fs::File::open("/dev/null").unwrap(),
            ))),
            ..spec.clone()
        };
        let net = q.args(&with_tap).join(" ");
        assert!(net.contains("-netdev tap,id=net0,fd=3,vhost=off"), "{net}");
        assert!(
            net.contains("virtio-net-device,netdev=net0,mac=06:00:0a:fe:fe:02"),
            "{net}"
        );
        assert!(args.contains("-M microvm,accel=tcg,memory-backend=mem0 -cpu max -smp 2 -m 2048M"));
        assert!(
            args.contains("size=2048M,mem-path=/dev/shm/hearth-0123456789abcdef/abc.ram,share=on")
        );
        assert!(args.contains("-bios /usr/share/qemu/qboot.rom"));
        assert!(args.contains("tsc_early_khz=2000000 lpj=8000000"));
        assert!(args.contains("hearth.hostname=web"));
        assert!(args.contains("path=/run/x/agent.sock,server=on,wait=off"));
        assert!(args.contains(&format!("name={}", hearth_guest_proto::PORT_NAME)));
        assert!(args.contains("-qmp unix:/run/x/qmp.sock,server=on,wait=off"));
    }
}
