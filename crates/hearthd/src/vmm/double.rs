//! A bootable test double: a [`Vmm`] whose "VM" is the real `hearth-guest` agent running as an
//! ordinary process, so tier-2 tests drive lifecycle, stop and restart, the monitor,
//! re-adoption, exec, stdin, PTYs and files without root, KVM or QEMU.
//!
//! QEMU listens on the agent socket (`server=on`) and hearthd connects; the agent's `--unix` mode
//! connects too. So the double plays QEMU's chardev: a bridge listens on
//! [`LaunchSpec::agent_socket`] for hearthd and on `guest.sock` (beside it in the run directory)
//! for the agent, and copies bytes between them. Like the virtio-serial port, the agent's side
//! outlives hearthd's: when hearthd goes away the bridge waits for the next hearthd, and when the
//! agent exits the bridge stops listening. Bridges and the tasks that watch the agents run on a
//! runtime of their own, so a test can drop a "hearthd" (its whole tokio runtime) and start
//! another that re-adopts the running agents.
//!
//! In `--unix` mode the agent is `Standalone`: a guest `shutdown` ends the agent process (the
//! "VM powers off") and never calls reboot(2). Its stderr is the VM's serial log. A pause is
//! SIGSTOP of the agent and a resume SIGCONT, each checked in `/proc/<pid>/stat` as QEMU's are
//! with `query-status`: the bridge goes on, so hearthd's connection stays open and the agent
//! answers nothing until it is resumed, as a paused guest does.

use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::LazyLock;

use async_trait::async_trait;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::qemu::{pidfd_open, register_pidfd, signal_pidfd};
use super::{Capabilities, GuestRun, LaunchSpec, VmHandle, Vmm, VmmError, socket_exists};

/// Runs the bridges and exit watchers, independent of any hearthd's runtime.
static BRIDGES: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("vmm-double")
        .enable_all()
        .build()
        .expect("the test double's runtime starts")
});

/// The agent's end of the "serial port".
fn guest_socket(spec: &LaunchSpec) -> PathBuf {
    spec.run_dir.join("guest.sock")
}

/// The agent binary of this workspace's build: `target/<profile>/hearth-guest`, next to the
/// `deps` directory the test executable runs from.
pub fn agent_binary() -> Result<PathBuf, VmmError> {
    let exe = std::env::current_exe().map_err(|e| {
        VmmError::Unavailable(format!("cannot find the test executable's path: {e}"))
    })?;
    let profile_dir = exe.parent().and_then(Path::parent).ok_or_else(|| {
        VmmError::Unavailable(format!("{} has no profile directory", exe.display()))
    })?;
    let agent = profile_dir.join("hearth-guest");
    if agent.is_file() {
        Ok(agent)
    } else {
        Err(VmmError::Unavailable(format!(
            "the test VMM double runs the agent binary {}, which is missing: build it with `cargo build -p hearth-guest` (`make test` does)",
            agent.display()
        )))
    }
}

/// A [`Vmm`] whose guests are `hearth-guest` processes.
#[derive(Debug)]
pub struct DoubleVmm {
    agent: PathBuf,
}

impl DoubleVmm {
    pub fn new() -> Result<DoubleVmm, VmmError> {
        Ok(DoubleVmm {
            agent: agent_binary()?,
        })
    }
}

#[async_trait]
impl Vmm for DoubleVmm {
    fn kind(&self) -> &'static str {
        "double"
    }

    fn accel(&self) -> &'static str {
        "tcg"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            ..Capabilities::default()
        }
    }

    async fn prepare(&self, _kernel: &Path, _cache: &Path) {}

    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmHandle>, VmmError> {
        let files_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| VmmError::Files { path, source }
        };
        std::fs::create_dir_all(&spec.run_dir).map_err(files_err(&spec.run_dir))?;
        let (host_path, guest_path) = (spec.agent_socket(), guest_socket(spec));
        for stale in [&host_path, &guest_path] {
            let _ = std::fs::remove_file(stale);
        }
        // Sockets, the agent and its reaper belong to the double's runtime, not to hearthd's.
        let _runtime = BRIDGES.enter();
        let bind = |path: &Path| UnixListener::bind(path).map_err(files_err(path));
        let (host, guest) = (bind(&host_path)?, bind(&guest_path)?);
        let serial = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&spec.serial_log)
            .map_err(files_err(&spec.serial_log))?;
        let serial_err = serial.try_clone().map_err(files_err(&spec.serial_log))?;
        let mut child = tokio::process::Command::new(&self.agent)
            .arg("--unix")
            .arg(&guest_path)
            .stdin(Stdio::null())
            .stdout(serial)
            .stderr(serial_err)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| VmmError::Spawn {
                binary: self.agent.display().to_string(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        // Opened before the child can be reaped, so it names exactly this process.
        let Some(pidfd) = pidfd_open(pid) else {
            let _ = child.start_kill();
            return Err(VmmError::Unavailable(format!(
                "pidfd_open of the agent (pid {pid}) failed: the double needs Linux 5.3 or newer"
            )));
        };
        let (tx, exited) = watch::channel(false);
        BRIDGES.spawn(async move {
            let _ = child.wait().await;
            let _ = tx.send(true);
        });
        BRIDGES.spawn(bridge(host, guest, exited.clone()));
        Ok(Box::new(DoubleHandle { pid, pidfd, exited }))
    }

    fn find(&self, spec: &LaunchSpec) -> Option<u32> {
        super::process_with_arg(&guest_socket(spec).display().to_string())
    }

    async fn adopt(
        &self,
        spec: &LaunchSpec,
        pid: u32,
    ) -> Result<Option<Box<dyn VmHandle>>, VmmError> {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let guest_path = guest_socket(spec).display().to_string();
        let ours = cmdline
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg) == guest_path);
        if !ours || !socket_exists(&spec.agent_socket()) {
            return Ok(None);
        }
        let Some(pidfd) = pidfd_open(pid) else {
            return Ok(None);
        };
        let watched = pidfd.try_clone().map_err(|source| VmmError::Files {
            path: format!("pidfd of {pid}"),
            source,
        })?;
        let (tx, exited) = watch::channel(false);
        BRIDGES.spawn(async move {
            if let Ok(fd) = register_pidfd(watched) {
                let _ = fd.readable().await;
            }
            let _ = tx.send(true);
        });
        Ok(Some(Box::new(DoubleHandle { pid, pidfd, exited })))
    }
}

/// Plays QEMU's socket chardev: takes the agent's connection, then serves one hearthd
/// connection at a time until the agent goes away.
async fn bridge(host: UnixListener, guest: UnixListener, mut exited: watch::Receiver<bool>) {
    let agent = tokio::select! {
        accepted = guest.accept() => match accepted {
            Ok((stream, _)) => stream,
            Err(_) => return,
        },
        _ = exited.wait_for(|e| *e) => return,
    };
    drop(guest);
    // Split halves stay alive across hearthd connections: dropping a write half would shut the
    // agent's socket down.
    let (mut from_agent, mut to_agent) = agent.into_split();
    loop {
        let hearthd: UnixStream = tokio::select! {
            accepted = host.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => return,
            },
            _ = exited.wait_for(|e| *e) => return,
        };
        let (mut from_host, mut to_host) = hearthd.into_split();
        // Bytes read but not yet written when hearthd goes away are lost, as stale frames are on
        // the virtio port; the next hearthd's decoder skips a partial frame.
        tokio::select! {
            // hearthd went away: wait for the next one, as the virtio port does.
            _ = tokio::io::copy(&mut from_host, &mut to_agent) => {}
            copied = tokio::io::copy(&mut from_agent, &mut to_host) => {
                if copied.is_ok() {
                    // The agent closed its end: the "VM" is gone.
                    return;
                }
            }
        }
    }
}

#[derive(Debug)]
struct DoubleHandle {
    pid: u32,
    /// Signals go through this, never through the bare pid, which could be recycled.
    pidfd: OwnedFd,
    exited: watch::Receiver<bool>,
}

impl DoubleHandle {
    fn signal(&self, signal: i32) {
        if !*self.exited.borrow() {
            signal_pidfd(&self.pidfd, signal);
        }
    }

    /// Sends `signal` and waits (a signal is delivered asynchronously) until the agent is in
    /// `want`.
    async fn signal_until(
        &self,
        signal: i32,
        operation: &'static str,
        want: GuestRun,
    ) -> Result<(), VmmError> {
        self.signal(signal);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let found = self.run_state().await?;
            if found == want {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(VmmError::RunState {
                    operation,
                    want,
                    found,
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `T` for stopped, `Z`, ...).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

#[async_trait]
impl VmHandle for DoubleHandle {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn wait_exit(&self) {
        let mut rx = self.exited.clone();
        let _ = rx.wait_for(|e| *e).await;
    }

    async fn request_poweroff(&self) -> Result<(), VmmError> {
        self.signal(libc::SIGTERM);
        Ok(())
    }

    async fn kill(&self) -> Result<(), VmmError> {
        self.signal(libc::SIGKILL);
        self.wait_exit().await;
        Ok(())
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.signal_until(libc::SIGSTOP, "SIGSTOP", GuestRun::Paused)
            .await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.signal_until(libc::SIGCONT, "SIGCONT", GuestRun::Running)
            .await
    }

    async fn run_state(&self) -> Result<GuestRun, VmmError> {
        if *self.exited.borrow() {
            return Ok(GuestRun::Other("exited".into()));
        }
        Ok(match process_state(self.pid) {
            Some('T') => GuestRun::Paused,
            Some('Z' | 'X') | None => GuestRun::Other("exited".into()),
            Some(_) => GuestRun::Running,
        })
    }
}

/// A VMM whose guests never start: lets tests reach every path up to the boot. `launch` waits
/// `delay`, calls `on_launch` (to look at the world as the boot would see it), then fails.
#[derive(Default)]
pub struct NoBootVmm {
    pub delay: std::time::Duration,
    pub on_launch: Option<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for NoBootVmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoBootVmm")
            .field("delay", &self.delay)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Vmm for NoBootVmm {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn accel(&self) -> &'static str {
        "tcg"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    async fn launch(&self, _spec: &LaunchSpec) -> Result<Box<dyn VmHandle>, VmmError> {
        tokio::time::sleep(self.delay).await;
        if let Some(look) = &self.on_launch {
            look();
        }
        Err(VmmError::Unavailable(
            "this test VMM cannot boot guests".into(),
        ))
    }
    async fn prepare(&self, _kernel: &Path, _cache: &Path) {}
    fn find(&self, _spec: &LaunchSpec) -> Option<u32> {
        None
    }
    async fn adopt(
        &self,
        _spec: &LaunchSpec,
        _pid: u32,
    ) -> Result<Option<Box<dyn VmHandle>>, VmmError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::guest::GuestClient;

    fn spec(dir: &Path, name: &str) -> LaunchSpec {
        LaunchSpec {
            id: name.into(),
            name: name.into(),
            cpus: 1,
            memory_mib: 128,
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            cmdline: String::new(),
            rootfs: dir.join("rootfs.ext4"),
            run_dir: dir.join("run").join(name),
            serial_log: dir.join(format!("{name}.serial.log")),
            vmm_log: dir.join(format!("{name}.vmm.log")),
            tap: None,
            volumes: Vec::new(),
        }
    }

    /// Ends the agent `pid` when a failing test unwinds (a no-op once it has exited).
    struct EndOnDrop(Option<OwnedFd>);

    impl Drop for EndOnDrop {
        fn drop(&mut self) {
            if let Some(fd) = &self.0 {
                signal_pidfd(fd, libc::SIGKILL);
            }
        }
    }

    async fn exits(handle: &dyn VmHandle) {
        tokio::time::timeout(Duration::from_secs(10), handle.wait_exit())
            .await
            .expect("the agent exits");
    }

    #[tokio::test]
    async fn agents_are_launched_found_adopted_and_ended() {
        let tmp = tempfile::tempdir().unwrap();
        let vmm = DoubleVmm::new().unwrap_or_else(|e| panic!("{e}"));
        let a = spec(tmp.path(), "a");
        let launched = vmm.launch(&a).await.unwrap();
        let pid = launched.pid();
        let _end = EndOnDrop(pidfd_open(pid));
        // hearthd's side of the bridge reaches the agent.
        let guest = GuestClient::connect(&a.agent_socket(), Duration::from_secs(10))
            .await
            .unwrap();
        guest.wait_ready(Duration::from_secs(10)).await.unwrap();
        // Pause and resume: the process stops and goes on, as the run state says.
        assert_eq!(launched.run_state().await.unwrap(), GuestRun::Running);
        launched.pause().await.unwrap();
        assert_eq!(process_state(pid), Some('T'));
        assert_eq!(launched.run_state().await.unwrap(), GuestRun::Paused);
        launched.pause().await.unwrap();
        launched.resume().await.unwrap();
        assert_eq!(launched.run_state().await.unwrap(), GuestRun::Running);
        assert!(vmm.capabilities().pause);
        assert_eq!(vmm.find(&a), Some(pid));
        assert_eq!(vmm.find(&spec(tmp.path(), "b")), None);
        // Only the process serving this VM's run directory is adopted.
        let me = std::process::id();
        assert!(vmm.adopt(&a, me).await.unwrap().is_none());
        assert!(
            vmm.adopt(&spec(tmp.path(), "b"), pid)
                .await
                .unwrap()
                .is_none()
        );
        let adopted = vmm.adopt(&a, pid).await.unwrap().expect("adopted");
        assert_eq!(adopted.pid(), pid);
        // Power-off (SIGTERM) ends it; both handles see the exit, and the socket closes.
        adopted.request_poweroff().await.unwrap();
        exits(adopted.as_ref()).await;
        exits(launched.as_ref()).await;
        assert_eq!(vmm.find(&a), None);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::os::unix::net::UnixStream::connect(a.agent_socket()).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the bridge still listens"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A second run of the same VM, ended by force.
        let again = vmm.launch(&a).await.unwrap();
        let _end_again = EndOnDrop(pidfd_open(again.pid()));
        assert_ne!(again.pid(), pid);
        again.kill().await.unwrap();
        assert_eq!(vmm.find(&a), None);
        // Adopting a pid that is gone finds nothing.
        assert!(vmm.adopt(&a, again.pid()).await.unwrap().is_none());
    }
}
