//! PID 1 duties: set the guest up, supervise the agent, reap orphans, and power off on request.
//!
//! Everything here is plain syscalls: under TCG every fork+exec of a dynamic binary costs tens of
//! milliseconds, and the agent must answer the host's `hello` as early as possible. Nothing here
//! may panic: PID 1 exiting panics the kernel.

use std::io;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use hearth_guest_proto::ShutdownAction;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, sethostname, sync};

use crate::exec::DEFAULT_PATH;

/// Restart delays of the agent: doubled after each quick death, up to the maximum.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// An agent that ran this long before dying restarts after [`MIN_BACKOFF`] again.
const STABLE_RUN: Duration = Duration::from_secs(10);

/// How long processes get between SIGTERM and SIGKILL at shutdown.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// `PF_KTHREAD` in the flags field of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// One filesystem PID 1 makes sure is mounted.
struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In mount order: parents before children.
const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("ptmxmode=0666,mode=0620,gid=5"),
    },
    Mount {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
];

/// Sets the guest up, then forks the agent. Returns only in the agent child; PID 1 itself stays
/// in [`supervise`] for ever.
pub fn boot() {
    let started = Instant::now();
    mount_api_filesystems();
    ensure_std_fds();
    make_dev_links();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline_flag(&cmdline, "hearth.debug") {
        crate::log::enable_debug();
    }
    remount_root_read_write();
    // SAFETY: PID 1 has started no threads yet, so nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("PATH", DEFAULT_PATH);
        std::env::set_var("HOME", "/root");
    }
    if let Err(err) = std::env::set_current_dir("/") {
        log!("cannot change to /: {err}");
    }
    if let Some(name) = cmdline_param(&cmdline, "hearth.hostname") {
        if valid_hostname(name) {
            if let Err(err) = sethostname(name) {
                log!("cannot set the hostname to {name}: {err}");
            }
        } else {
            log!("ignoring invalid hearth.hostname={name}");
        }
    }
    mount_volumes(&cmdline);
    if let Err(err) = loopback_up() {
        log!("cannot bring up lo: {err}");
    }
    crate::net::configure_from_cmdline(&cmdline);
    debug!("init done in {:?}", started.elapsed());
    supervise();
}

/// Mounts what is not mounted yet. What the initramfs set up stays as it is: `/dev`, `/proc` and
/// `/sys` it moved over, and `/run`, the tmpfs this very binary runs from (hearthd's initramfs
/// copies the agent there, so a VM runs the agent of the hearthd that booted it, whatever its
/// disk holds). Mounting over `/run` would hide that copy, so it must never be remounted.
fn mount_api_filesystems() {
    if !Path::new("/proc/self/mountinfo").exists() {
        mount_one(&MOUNTS[0]);
    }
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| parse_mountinfo(&text))
        .unwrap_or_default();
    for spec in missing_mounts(&mounted) {
        mount_one(spec);
    }
}

/// The filesystems of [`MOUNTS`] that are not mounted yet, in mount order.
fn missing_mounts(mounted: &[MountEntry]) -> impl Iterator<Item = &'static Mount> + '_ {
    MOUNTS
        .iter()
        .filter(|spec| !mounted.iter().any(|m| m.mount_point == spec.target))
}

fn mount_one(spec: &Mount) {
    if let Err(err) = std::fs::create_dir_all(spec.target) {
        log!("cannot create {}: {err}", spec.target);
    }
    match mount(
        Some(spec.source),
        spec.target,
        Some(spec.fstype),
        spec.flags,
        spec.data,
    ) {
        Ok(()) | Err(Errno::EBUSY) => {}
        Err(err) => log!("cannot mount {} on {}: {err}", spec.fstype, spec.target),
    }
}

/// Makes sure fds 0, 1 and 2 are open, so nothing opened later lands on them by accident.
fn ensure_std_fds() {
    use std::os::unix::fs::OpenOptionsExt;
    for _ in 0..3 {
        let open = |path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(path)
        };
        match open("/dev/console").or_else(|_| open("/dev/null")) {
            // The lowest free descriptor: if it is a standard one, keep it open for good.
            Ok(file) if file.as_raw_fd() <= 2 => {
                let _ = fcntl(&file, FcntlArg::F_SETFD(FdFlag::empty()));
                let _ = file.into_raw_fd();
            }
            _ => return,
        }
    }
}

/// The links udev or systemd would make in `/dev`.
fn make_dev_links() {
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => log!("cannot link {link}: {err}"),
        }
    }
}

fn remount_root_read_write() {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    if root_is_read_only(&parse_mountinfo(&text))
        && let Err(err) = mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT,
            None::<&str>,
        )
    {
        log!("cannot remount / read-write: {err}");
    }
}

/// One line of `/proc/self/mountinfo`, the fields this module needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: String,
    pub options: String,
}

/// Parses `/proc/self/mountinfo`; lines it cannot read are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let mount_point = fields.nth(4)?;
            let options = fields.next()?;
            Some(MountEntry {
                mount_point: unescape_octal(mount_point),
                options: options.to_owned(),
            })
        })
        .collect()
}

/// Undoes the `\NNN` escapes the kernel writes for spaces and other odd bytes in paths.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match escape {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the mount that is visible at `/` (the last one listed there) is read-only.
pub fn root_is_read_only(mounts: &[MountEntry]) -> bool {
    mounts
        .iter()
        .rev()
        .find(|m| m.mount_point == "/")
        .is_some_and(|m| m.options.split(',').any(|o| o == "ro"))
}

/// The value of `key=value` on the kernel command line (the last one wins, as in the kernel).
pub fn cmdline_param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

/// Whether a bare `key` (or `key=1`) is on the kernel command line.
pub fn cmdline_flag(cmdline: &str, key: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|word| word == key || word.strip_prefix(key) == Some("=1"))
}

/// A hostname the kernel takes and resolvers understand: 1 to 64 bytes of letters, digits, `-`
/// and `.`.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// One `hearth.volume=<serial>:<path>` of the kernel command line: mount the disk whose
/// virtio serial is `serial` at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount<'a> {
    pub serial: &'a str,
    pub path: &'a str,
}

/// How long a volume's disk may take to appear in `/sys/block`.
const VOLUME_WAIT: Duration = Duration::from_secs(3);

/// Every `hearth.volume=` of the command line, in order; a malformed one is an `Err` with the
/// word, so it is logged and skipped.
pub fn volume_params(cmdline: &str) -> Vec<Result<VolumeMount<'_>, &str>> {
    cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("hearth.volume="))
        .map(|value| {
            let (serial, path) = value.split_once(':').ok_or(value)?;
            let serial_ok = !serial.is_empty()
                && serial.len() <= 20
                && serial.bytes().all(|b| b.is_ascii_alphanumeric());
            if serial_ok && valid_mount_path(path) {
                Ok(VolumeMount { serial, path })
            } else {
                Err(value)
            }
        })
        .collect()
}

/// The host's mount path rule, checked again: absolute, `A-Z a-z 0-9 . _ / -`, no `..`
/// component, not `/`, not under `/proc`, `/sys` or `/dev`, at most 128 bytes.
pub fn valid_mount_path(path: &str) -> bool {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    path.starts_with('/')
        && path.len() <= 128
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
        && !parts.contains(&"..")
        && parts
            .first()
            .is_some_and(|top| !matches!(*top, "proc" | "sys" | "dev"))
}

/// The disk (`vdb`) whose serial (as `/sys/block/<disk>/serial` reads) is `serial`.
pub fn disk_with_serial<'a>(serial: &str, disks: &'a [(String, String)]) -> Option<&'a str> {
    disks
        .iter()
        .find(|(_, s)| s.trim_end_matches(['\n', '\0', ' ']) == serial)
        .map(|(disk, _)| disk.as_str())
}

/// The virtio disks and their serials.
fn virtio_disks() -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            if !name.starts_with("vd") {
                return None;
            }
            let serial = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
            Some((name, serial))
        })
        .collect()
}

/// Mounts each volume of the command line at its path. A volume that cannot be mounted is
/// logged on the console and skipped: the guest boots without it.
fn mount_volumes(cmdline: &str) {
    for param in volume_params(cmdline) {
        let volume = match param {
            Ok(v) => v,
            Err(word) => {
                log!("ignoring invalid hearth.volume={word}");
                continue;
            }
        };
        let deadline = Instant::now() + VOLUME_WAIT;
        let disk = loop {
            if let Some(disk) = disk_with_serial(volume.serial, &virtio_disks()) {
                break Some(disk.to_owned());
            }
            if Instant::now() >= deadline {
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        let Some(disk) = disk else {
            log!(
                "volume {}: no disk has that serial; {} is not mounted",
                volume.serial,
                volume.path
            );
            continue;
        };
        if let Err(err) = std::fs::create_dir_all(volume.path) {
            log!(
                "volume {}: cannot create {}: {err}",
                volume.serial,
                volume.path
            );
            continue;
        }
        let device = format!("/dev/{disk}");
        match mount(
            Some(device.as_str()),
            volume.path,
            Some("ext4"),
            MsFlags::MS_NOATIME,
            None::<&str>,
        ) {
            Ok(()) => debug!(
                "volume {} ({device}) mounted on {}",
                volume.serial, volume.path
            ),
            Err(err) => log!(
                "volume {}: cannot mount {device} (ext4) on {}: {err}",
                volume.serial,
                volume.path
            ),
        }
    }
}

/// Unmounts the volumes of the command line (last first), or makes them read-only when they
/// are busy, so their filesystems are clean when the machine stops.
fn unmount_volumes() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for volume in volume_params(&cmdline).into_iter().flatten().rev() {
        if nix::mount::umount(volume.path).is_err()
            && let Err(err) = mount(
                None::<&str>,
                volume.path,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
        {
            log!("cannot unmount or remount read-only {}: {err}", volume.path);
        }
    }
}

/// Sets `IFF_UP` on `lo` with the classic ioctl pair.
fn loopback_up() -> io::Result<()> {
    crate::net::set_up(&crate::net::inet_socket()?, "lo")
}

/// Forks the agent and, in PID 1, reaps every child for ever, restarting the agent when it
/// dies. Returns only in the agent child.
fn supervise() {
    let mut backoff = MIN_BACKOFF;
    loop {
        // SAFETY: PID 1 is single-threaded (no thread or runtime was started), so the child may
        // run any code after fork.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => return,
            Ok(ForkResult::Parent { child }) => {
                let started = Instant::now();
                let status = reap_until(child);
                if started.elapsed() >= STABLE_RUN {
                    backoff = MIN_BACKOFF;
                }
                log!("agent {status}; restarting in {backoff:?}");
            }
            Err(err) => log!("cannot fork the agent: {err}; retrying in {backoff:?}"),
        }
        thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Reaps children (orphans included) until `agent` ends; describes how it ended.
fn reap_until(agent: Pid) -> String {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => {
                return format!("exited with code {code}");
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == agent => {
                return format!("was killed by {signal}");
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return "vanished".to_owned(),
            Err(err) => {
                log!("waitpid failed: {err}");
                thread::sleep(MIN_BACKOFF);
            }
        }
    }
}

/// Stops the machine: SIGTERM everything, wait a little, SIGKILL the rest, sync, remount `/`
/// read-only and power off or reboot. Returns only if the kernel refused.
pub fn power_off(action: ShutdownAction) -> std::process::ExitCode {
    log!("shutting down ({action:?})");
    let everyone = Pid::from_raw(-1);
    let _ = kill(everyone, Signal::SIGTERM);
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline && others_alive() {
        thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(everyone, Signal::SIGKILL);
    sync();
    unmount_volumes();
    if let Err(err) = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        log!("cannot remount / read-only: {err}");
    }
    sync();
    let mode = match action {
        ShutdownAction::Poweroff => RebootMode::RB_POWER_OFF,
        ShutdownAction::Reboot => RebootMode::RB_AUTOBOOT,
    };
    let Err(err) = reboot(mode);
    log!("reboot(2) failed: {err}");
    std::process::ExitCode::FAILURE
}

/// Whether any user process other than PID 1 and this one is still alive.
fn others_alive() -> bool {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.filter_map(Result::ok).any(|entry| {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            return false;
        };
        pid != 1
            && pid != me
            && std::fs::read_to_string(entry.path().join("stat"))
                .is_ok_and(|stat| is_live_user_process(&stat))
    })
}

/// Whether a `/proc/PID/stat` line describes a process that is neither a kernel thread nor a
/// zombie.
pub fn is_live_user_process(stat: &str) -> bool {
    // The command name is in parentheses and may contain anything, so parse after the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let state = fields.next();
    // After the state: ppid, pgrp, session, tty_nr, tpgid, then flags.
    let flags = fields.nth(5).and_then(|f| f.parse::<u64>().ok());
    match (state, flags) {
        (Some(state), Some(flags)) => state != "Z" && state != "X" && flags & PF_KTHREAD == 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_comes_from_the_cmdline() {
        let cmdline = "console=ttyS0 panic=1 hearth.hostname=box-1 quiet\n";
        assert_eq!(cmdline_param(cmdline, "hearth.hostname"), Some("box-1"));
        assert_eq!(cmdline_param("console=ttyS0", "hearth.hostname"), None);
        // A longer key with the same prefix is another parameter.
        assert_eq!(cmdline_param("hearth.hostnamex=a", "hearth.hostname"), None);
        assert_eq!(
            cmdline_param("hearth.hostname=a hearth.hostname=b", "hearth.hostname"),
            Some("b")
        );
        assert_eq!(
            cmdline_param("hearth.hostname=", "hearth.hostname"),
            Some("")
        );
        assert!(cmdline_flag("a hearth.debug b", "hearth.debug"));
        assert!(cmdline_flag("hearth.debug=1", "hearth.debug"));
        assert!(!cmdline_flag("hearth.debugger", "hearth.debug"));
    }

    #[test]
    fn volumes_come_from_the_cmdline() {
        let cmdline = "console=ttyS0 hearth.volume=0123456789abcdef:/data quiet \
             hearth.volume=fedcba9876543210:/srv/my-app_1.d hearth.volume=bad \
             hearth.volume=00ff:/proc/x hearth.volume=a-b:/x hearth.volume=abc:/ \
             hearth.volume=abc:/a/../b hearth.volumes=abc:/y\n";
        let got = volume_params(cmdline);
        assert_eq!(
            got,
            [
                Ok(VolumeMount {
                    serial: "0123456789abcdef",
                    path: "/data"
                }),
                Ok(VolumeMount {
                    serial: "fedcba9876543210",
                    path: "/srv/my-app_1.d"
                }),
                Err("bad"),
                Err("00ff:/proc/x"),
                Err("a-b:/x"),
                Err("abc:/"),
                Err("abc:/a/../b"),
            ]
        );
        assert!(volume_params("console=ttyS0").is_empty());
        let long = format!("hearth.volume={}:/x", "a".repeat(21));
        assert!(volume_params(&long)[0].is_err());
    }

    #[test]
    fn a_volume_is_the_disk_with_its_serial() {
        let disks = [
            ("vda".to_owned(), String::new()),
            ("vdb".to_owned(), "fedcba9876543210\n".to_owned()),
            ("vdc".to_owned(), "0123456789abcdef\n".to_owned()),
        ];
        assert_eq!(disk_with_serial("0123456789abcdef", &disks), Some("vdc"));
        assert_eq!(disk_with_serial("fedcba9876543210", &disks), Some("vdb"));
        assert_eq!(disk_with_serial("0123", &disks), None);
        assert_eq!(disk_with_serial("", &disks[1..]), None);
    }

    #[test]
    fn hostnames_are_checked() {
        assert!(valid_hostname("box-1.example"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("a b"));
        assert!(!valid_hostname("a/b"));
        assert!(!valid_hostname(&"a".repeat(65)));
    }

    const MOUNTINFO: &str = "\
22 1 254:1 / / ro,relatime shared:1 - ext4 /dev/vda ro
23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=1k,mode=755
24 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:3 - proc proc rw
25 22 0:40 / /mnt/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn mountinfo_is_parsed() {
        let mounts = parse_mountinfo(MOUNTINFO);
        let points: Vec<_> = mounts.iter().map(|m| m.mount_point.as_str()).collect();
        assert_eq!(points, ["/", "/dev", "/proc", "/mnt/with space"]);
        assert!(root_is_read_only(&mounts));
    }

    #[test]
    fn the_topmost_root_mount_decides() {
        let text = format!("{MOUNTINFO}30 22 254:1 / / rw,relatime - ext4 /dev/vda rw\n");
        assert!(!root_is_read_only(&parse_mountinfo(&text)));
        assert!(!root_is_read_only(&[]));
    }

    #[test]
    fn what_the_initramfs_mounted_is_kept() {
        // As hearthd's initramfs leaves it: the root disk, the moved API filesystems, and the
        // tmpfs on /run that holds the running agent.
        let text = "\
22 1 254:1 / / rw,noatime - ext4 /dev/vda rw
23 22 0:5 / /dev rw,nosuid - devtmpfs dev rw,mode=755
24 22 0:21 / /proc rw,relatime - proc proc rw
25 22 0:20 / /sys rw,relatime - sysfs sys rw
26 22 0:30 / /run rw,nosuid,nodev - tmpfs tmpfs rw,mode=755
";
        let missing: Vec<_> = missing_mounts(&parse_mountinfo(text))
            .map(|m| m.target)
            .collect();
        assert_eq!(missing, ["/dev/pts", "/dev/shm"]);
        let all: Vec<_> = missing_mounts(&[]).map(|m| m.target).collect();
        assert_eq!(all.len(), MOUNTS.len());
        assert!(all.contains(&"/run"));
    }

    #[test]
    fn kernel_threads_and_zombies_are_not_waited_for() {
        let user = "123 (my (odd) prog) S 1 123 123 0 -1 4194560 100 0 0 0";
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0";
        let zombie = "321 (sh) Z 1 321 321 0 -1 4194564 0 0 0 0";
        assert!(is_live_user_process(user));
        assert!(!is_live_user_process(kthread));
        assert!(!is_live_user_process(zombie));
        assert!(!is_live_user_process("garbage"));
    }

    #[test]
    fn this_process_is_a_live_user_process() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(is_live_user_process(&stat));
    }
}
