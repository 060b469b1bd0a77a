//! Finds out whether KVM really works, by running guest code under QEMU with KVM, in two steps.
//!
//! `/dev/kvm` existing proves nothing: on nested or paravirtual hosts (PVM) it exists while stock
//! guests cannot run. The first probe boots a 64 KiB firmware whose reset vector writes a byte to
//! the `isa-debug-exit` port; QEMU then exits with status `(byte << 1) | 1`. Any other outcome (a
//! failed MSR write, an assertion, a hang) means the accelerator is unusable. That is not enough:
//! on a PVM host the firmware probe passes while a stock kernel hangs once it runs in long mode.
//! So the second probe, [`run_kernel`], boots the guest kernel itself without a root disk and
//! waits for its panic ("cannot mount root") on the serial console: only a kernel that got that
//! far proves KVM runs guests. Its verdict is cached per host boot, QEMU and kernel.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Byte the probe firmware writes; QEMU exits with `(PROBE_BYTE << 1) | 1`.
const PROBE_BYTE: u8 = 0x2a;
const DEBUG_EXIT_PORT: u8 = 0xf4;

/// A firmware image: `hlt` everywhere, and at the reset vector (16 bytes from the end):
/// `mov al, PROBE_BYTE; out DEBUG_EXIT_PORT, al; hlt`.
fn probe_firmware() -> Vec<u8> {
    let mut rom = vec![0xf4u8; 64 * 1024];
    let at = rom.len() - 16;
    rom[at..at + 5].copy_from_slice(&[0xb0, PROBE_BYTE, 0xe6, DEBUG_EXIT_PORT, 0xf4]);
    rom
}

/// Runs the probe with `accel` (`kvm` or `tcg`). Returns `Ok(())` when the guest instruction ran,
/// or why not.
pub async fn run(qemu: &Path, accel: &str, work_dir: &Path) -> Result<(), String> {
    if accel == "kvm" {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    }
    let rom = work_dir.join(format!("kvm-probe-{}.rom", std::process::id()));
    std::fs::write(&rom, probe_firmware()).map_err(|e| format!("cannot write probe: {e}"))?;
    let cpu = if accel == "kvm" { "host" } else { "max" };
    let mut cmd = tokio::process::Command::new(qemu);
    cmd.args(["-M", &format!("microvm,accel={accel}"), "-cpu", cpu])
        .args([
            "-m",
            "16",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .arg("-bios")
        .arg(&rom)
        .args([
            "-device",
            &format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=1"),
        ]);
    let result = async {
        let timeout = Duration::from_secs(20);
        let out = run_guest(&mut cmd, qemu, timeout, "the probe guest did not finish").await?;
        let want = (i32::from(PROBE_BYTE) << 1) | 1;
        if out.status.code() == Some(want) {
            Ok(())
        } else {
            Err(format!(
                "the probe guest failed ({}): {}",
                out.status,
                first_line(&out.stderr)
            ))
        }
    }
    .await;
    let _ = std::fs::remove_file(&rom);
    result
}

/// Runs a probe guest (stdout dropped, stderr kept) for at most `timeout`.
async fn run_guest(
    cmd: &mut tokio::process::Command,
    qemu: &Path,
    timeout: Duration,
    late: &str,
) -> Result<std::process::Output, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // A probe guest that hangs must not outlive a hearthd stopped while it waits for it.
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| format!("{late} within {} s", timeout.as_secs()))?
        .map_err(|e| e.to_string())
}

fn first_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines().next().unwrap_or("").trim().to_owned()
}

/// How long the kernel probe may take. A stock kernel reaches its root-mount panic in well
/// under a second with KVM (about 2 s even under TCG); a kernel that cannot run hangs.
const KERNEL_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The line a kernel without a root disk ends with.
const PANIC_MARK: &str = "Kernel panic";

/// Boots `kernel` under KVM with no disk and no initramfs; `Ok(())` when it ran until it
/// panicked for want of a root filesystem, the reason otherwise. The verdict is cached in
/// `cache` (keyed by the host's boot id, QEMU's binary and the kernel), since a failing probe
/// costs [`KERNEL_PROBE_TIMEOUT`].
pub async fn run_kernel(
    qemu: &Path,
    firmware: &Path,
    kernel: &Path,
    work_dir: &Path,
    cache: &Path,
) -> Result<(), String> {
    let key = format!(
        "{} {} {}",
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .trim(),
        qemu.display(),
        // Resolved, so data directories that share an image cache share the verdict.
        std::fs::canonicalize(kernel)
            .unwrap_or_else(|_| kernel.to_owned())
            .display()
    );
    if let Ok(text) = std::fs::read_to_string(cache)
        && let Some((cached_key, verdict)) = text.split_once('\n')
        && cached_key == key
    {
        return match verdict.strip_prefix("ok") {
            Some(_) => Ok(()),
            None => Err(verdict.trim().to_owned()),
        };
    }
    let verdict = kernel_probe(qemu, firmware, kernel, work_dir).await;
    let line = match &verdict {
        Ok(()) => "ok".to_owned(),
        Err(why) => why.clone(),
    };
    let _ = std::fs::write(cache, format!("{key}\n{line}\n"));
    verdict
}

async fn kernel_probe(
    qemu: &Path,
    firmware: &Path,
    kernel: &Path,
    work_dir: &Path,
) -> Result<(), String> {
    let serial = work_dir.join(format!("kvm-kernel-probe-{}.log", std::process::id()));
    let mut cmd = tokio::process::Command::new(qemu);
    cmd.args(["-M", "microvm,accel=kvm", "-cpu", "host", "-m", "128"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-bios")
        .arg(firmware)
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()));
    let result = async {
        let out = run_guest(
            &mut cmd,
            qemu,
            KERNEL_PROBE_TIMEOUT,
            "the guest kernel did not get to its root-mount panic under KVM",
        )
        .await?;
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        if console.contains(PANIC_MARK) {
            Ok(())
        } else {
            Err(format!(
                "the guest kernel stopped under KVM before its root-mount panic ({}): {}",
                out.status,
                first_line(&out.stderr)
            ))
        }
    }
    .await;
    let _ = std::fs::remove_file(&serial);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kernel_verdicts_are_cached_per_boot_qemu_and_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("kvm-probe");
        let (qemu, fw, kernel) = (Path::new("/no/qemu"), Path::new("/no/fw"), Path::new("/k"));
        // No QEMU at that path: the probe fails, and the failure is remembered.
        let first = run_kernel(qemu, fw, kernel, dir.path(), &cache).await;
        assert!(first.unwrap_err().contains("cannot run /no/qemu"));
        let text = std::fs::read_to_string(&cache).unwrap();
        assert!(text.ends_with("cannot run /no/qemu: No such file or directory (os error 2)\n"));
        // A cached "ok" for the same key is taken as it is.
        let key = text.split_once('\n').unwrap().0.to_owned();
        std::fs::write(&cache, format!("{key}\nok\n")).unwrap();
        assert_eq!(
            run_kernel(qemu, fw, kernel, dir.path(), &cache).await,
            Ok(())
        );
        // Another kernel is probed again.
        let other = run_kernel(qemu, fw, Path::new("/k2"), dir.path(), &cache).await;
        assert!(other.is_err());
    }

    #[test]
    fn firmware_has_the_reset_vector_code() {
        let rom = probe_firmware();
        assert_eq!(rom.len(), 65536);
        assert_eq!(&rom[65520..65525], &[0xb0, 0x2a, 0xe6, 0xf4, 0xf4]);
    }
}
