//! Finds out whether KVM really works, by running a guest instruction under QEMU with KVM.
//!
//! `/dev/kvm` existing proves nothing: on nested or paravirtual hosts (PVM) it exists while stock
//! guests cannot run. The probe boots a 64 KiB firmware whose reset vector writes a byte to the
//! `isa-debug-exit` port; QEMU then exits with status `(byte << 1) | 1`. Any other outcome (a
//! failed MSR write, an assertion, a hang) means the accelerator is unusable.

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
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let result = async {
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
        let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
            .await
            .map_err(|_| "the probe guest did not finish within 20 s".to_owned())?
            .map_err(|e| e.to_string())?;
        let want = (i32::from(PROBE_BYTE) << 1) | 1;
        if out.status.code() == Some(want) {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let first = stderr.lines().next().unwrap_or("").trim();
            Err(format!("the probe guest failed ({}): {first}", out.status))
        }
    }
    .await;
    let _ = std::fs::remove_file(&rom);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_has_the_reset_vector_code() {
        let rom = probe_firmware();
        assert_eq!(rom.len(), 65536);
        assert_eq!(&rom[65520..65525], &[0xb0, 0x2a, 0xe6, 0xf4, 0xf4]);
    }
}
