//! The disk benchmarks (`bench disk`, also run at the end of `bench`):
//!
//! - clone time on a reflink filesystem (a loop-mounted xfs with `reflink=1` the bench makes
//!   and removes), by FICLONE as hearthd clones disks, of a 64 MiB and a 4 GiB sparse-filled
//!   image holding the same data (1 MiB every 4 MiB of the first 64 MiB: a disk grown from an
//!   image), and the ratio of medians 4 GiB / 64 MiB (target at most 2); beside them, for the
//!   record, a 4 GiB image with data spread through it (1 MiB every 8 MiB): a clone costs by
//!   extents, not by size;
//! - export and import throughput through hearthd (release) and the CLI, of a VM whose 1 GiB
//!   disk is all data, beside `cat` doing the same I/O: the disk read to /dev/null for the
//!   export (the archive to /dev/null too), the archive copied through a pipe (no reflink or
//!   in-kernel copy can shortcut it) to a synced file for the import; each from a cold page
//!   cache (dropped before every run), as a stopped VM's disk is; ratios of MB/s (target at
//!   least 0.5 each).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{Netns, Proc, median, run};

const CLONE_ROUNDS: usize = 9;
const TRANSFER_ROUNDS: usize = 3;
const CLONE_TARGET: f64 = 2.0;
const THROUGHPUT_TARGET: f64 = 0.5;
const LISTEN: &str = "127.0.0.1:7072";
/// The exported VM's disk (the image's size: the smallest a VM may have).
const DISK_MIB: u64 = 1024;

/// A loop-mounted xfs with reflinks, unmounted and removed when dropped.
struct Xfs {
    dir: PathBuf,
}

impl Xfs {
    fn make(dir: &Path) -> Result<Xfs> {
        let _ = Command::new("umount").arg(dir.join("mnt")).status();
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("mnt"))?;
        let image = dir.join("xfs.img");
        File::create(&image)?.set_len(16 << 30)?;
        run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(dir.join("mnt")))?;
        Ok(Xfs {
            dir: dir.to_owned(),
        })
    }

    fn mnt(&self) -> PathBuf {
        self.dir.join("mnt")
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mnt()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A sparse file of `mib` MiB with 1 MiB of data every `every` MiB of its first `data_mib`.
fn sparse_filled(path: &Path, mib: u64, data_mib: u64, every: u64) -> Result<()> {
    let f = File::create(path)?;
    f.set_len(mib << 20)?;
    let chunk = vec![0xa5u8; 1 << 20];
    for at in (0..data_mib).step_by(usize::try_from(every)?) {
        f.write_all_at(&chunk, at << 20)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Seconds FICLONE takes to clone `src` into a new `dst`.
fn clone_secs(src: &Path, dst: &Path) -> Result<f64> {
    let _ = std::fs::remove_file(dst);
    let from = File::open(src)?;
    let to = File::create(dst)?;
    let started = Instant::now();
    // SAFETY: FICLONE takes the source descriptor as its argument; both descriptors are open
    // for the duration of the call and no memory is shared with the kernel.
    let rc = unsafe { nix::libc::ioctl(to.as_raw_fd(), nix::libc::FICLONE, from.as_raw_fd()) };
    let secs = started.elapsed().as_secs_f64();
    if rc != 0 {
        bail!("FICLONE failed: {}", std::io::Error::last_os_error());
    }
    drop(to);
    std::fs::remove_file(dst)?;
    Ok(secs)
}

/// Median clone times: 64 MiB and 4 GiB of the same data, and 4 GiB with data throughout.
fn clones(xfs: &Xfs) -> Result<(f64, f64, f64)> {
    let mut figures = Vec::new();
    for (mib, data_mib, every) in [(64u64, 64, 4), (4096, 64, 4), (4096, 4096, 8)] {
        let src = xfs.mnt().join(format!("image-{mib}"));
        sparse_filled(&src, mib, data_mib, every)?;
        let dst = xfs.mnt().join("clone");
        let mut secs = Vec::new();
        for _ in 0..CLONE_ROUNDS {
            secs.push(clone_secs(&src, &dst)?);
        }
        figures.push(median(&mut secs));
        std::fs::remove_file(&src)?;
    }
    Ok((figures[0], figures[1], figures[2]))
}

/// Empties the page cache, so the next run reads from the disk.
fn drop_caches() -> Result<()> {
    run(&mut Command::new("sync"))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").context("dropping the page cache")
}

/// Seconds `cmd` takes; it must succeed.
fn timed(cmd: &mut Command) -> Result<f64> {
    let started = Instant::now();
    run(cmd)?;
    Ok(started.elapsed().as_secs_f64())
}

fn sh(script: &str, args: &[&Path]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).arg("sh").args(args);
    c
}

struct Transfers {
    export_mbps: f64,
    cat_read_mbps: f64,
    import_mbps: f64,
    cat_copy_mbps: f64,
}

fn transfers(bin: &Path, agent: &Path, images: &Path, xfs: &Xfs) -> Result<Transfers> {
    let data = xfs.mnt().join("data");
    std::fs::create_dir_all(&data)?;
    std::os::unix::fs::symlink(images, data.join("images"))?;
    let log = File::create(xfs.dir.join("hearthd.log"))?;
    let child = Command::new(bin.join("hearthd"))
        .env("HEARTH_DATA_DIR", &data)
        .env("HEARTH_LISTEN", LISTEN)
        .env("HEARTH_IMAGE_AGENT_PATH", agent)
        .env("HEARTH_NETWORK_MODE", "off")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let _daemon = Proc(child);
    let url = format!("http://{LISTEN}");
    let cli = |args: &[&str]| {
        let mut c = Command::new(bin.join("hearth"));
        c.env("HEARTH_URL", &url).args(args);
        c
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = || -> bool {
        cli(&["--json", "health"])
            .stderr(Stdio::null())
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
            .is_some_and(|h| h["image"].is_string())
    };
    while !ready() {
        if Instant::now() > deadline {
            bail!(
                "the disk bench's hearthd did not start; see {}",
                xfs.dir.join("hearthd.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = cli(&[
        "--json",
        "vm",
        "new",
        "bench-disk",
        "--no-start",
        "--rootfs-size",
        "1G",
    ])
    .output()?;
    if !out.status.success() {
        bail!(
            "vm new: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let vm: Value = serde_json::from_slice(&out.stdout)?;
    let disk_of = |vm: &Value| -> Result<PathBuf> {
        let id = vm["id"].as_str().context("no id")?;
        Ok(data.join("vms").join(id).join("rootfs.ext4"))
    };
    // All data: every block of the disk written (pseudo-random, so nothing is a hole).
    let disk = disk_of(&vm)?;
    {
        let f = File::options().write(true).open(&disk)?;
        let mut block = vec![0u8; 1 << 20];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for at in 0..DISK_MIB {
            for b in block.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all_at(&block, at << 20)?;
        }
        f.sync_all()?;
    }
    let archive = xfs.mnt().join("bench-disk.tar");
    let copy = xfs.mnt().join("copy.tar");
    let (mut export, mut read, mut import, mut cp) = (vec![], vec![], vec![], vec![]);
    let mb = |secs: f64, path: &Path| -> Result<f64> {
        Ok(std::fs::metadata(path)?.len() as f64 / secs / 1e6)
    };
    run(cli(&["export", "bench-disk"]).stdout(File::create(&archive)?))?;
    let archive_len = std::fs::metadata(&archive)?.len();
    for _ in 0..TRANSFER_ROUNDS {
        let disk = disk_of(&json!({"id": vm_id(&cli)?}))?;
        drop_caches()?;
        let secs = timed(&mut sh("cat \"$1\" > /dev/null", &[&disk]))?;
        read.push(mb(secs, &disk)?);
        drop_caches()?;
        let secs = timed(cli(&["export", "bench-disk"]).stdout(Stdio::null()))?;
        export.push(archive_len as f64 / secs / 1e6);
        drop_caches()?;
        let copy_script = "cat \"$1\" | cat > \"$2\" && sync \"$2\"";
        let secs = timed(&mut sh(copy_script, &[&archive, &copy]))?;
        cp.push(mb(secs, &archive)?);
        std::fs::remove_file(&copy)?;
        run(cli(&["vm", "delete", "bench-disk"]).stdout(Stdio::null()))?;
        let archive_arg = archive.to_str().context("path")?;
        drop_caches()?;
        let secs = timed(cli(&["import", archive_arg]).stdout(Stdio::null()))?;
        import.push(mb(secs, &archive)?);
    }
    run(cli(&["vm", "delete", "bench-disk"]).stdout(Stdio::null()))?;
    Ok(Transfers {
        export_mbps: median(&mut export),
        cat_read_mbps: median(&mut read),
        import_mbps: median(&mut import),
        cat_copy_mbps: median(&mut cp),
    })
}

fn vm_id(cli: &dyn Fn(&[&str]) -> Command) -> Result<String> {
    let out = cli(&["--json", "vm", "inspect", "bench-disk"]).output()?;
    let vm: Value = serde_json::from_slice(&out.stdout)?;
    Ok(vm["id"].as_str().context("no id")?.to_owned())
}

/// Runs the disk benchmarks and prints their figures.
pub fn bench(root: &Path, bin: &Path, agent: &Path, images: &Path) -> Result<()> {
    let xfs = Xfs::make(&root.join("target/bench-disk"))?;
    eprintln!("bench: disk clones on a loop xfs with reflink");
    let (small, big, spread) = clones(&xfs)?;
    eprintln!("bench: export and import of a 1 GiB disk of data");
    let t = {
        let _ns = Netns::enter()?;
        transfers(bin, agent, images, &xfs)?
    };
    println!("\ndisk (medians)");
    println!(
        "  clone 64 MiB (reflink)                {:>8.3} ms",
        small * 1e3
    );
    println!(
        "  clone 4 GiB, same data (reflink)      {:>8.3} ms",
        big * 1e3
    );
    let ratio = big / small;
    println!(
        "  ratio clone 4 GiB / 64 MiB            {ratio:>8.3}   (target <= {CLONE_TARGET}) {}",
        met(ratio <= CLONE_TARGET)
    );
    println!(
        "  clone 4 GiB, data throughout          {:>8.3} ms   (512 extents: a clone costs by extents)",
        spread * 1e3
    );
    println!(
        "  export, MB/s of archive               {:>8.0}",
        t.export_mbps
    );
    println!(
        "  cat of the disk, MB/s                 {:>8.0}",
        t.cat_read_mbps
    );
    let ratio = t.export_mbps / t.cat_read_mbps;
    println!(
        "  ratio export / cat                    {ratio:>8.3}   (target >= {THROUGHPUT_TARGET}) {}",
        met(ratio >= THROUGHPUT_TARGET)
    );
    println!(
        "  import, MB/s of archive               {:>8.0}",
        t.import_mbps
    );
    println!(
        "  cat of the archive to a file, MB/s    {:>8.0}",
        t.cat_copy_mbps
    );
    let ratio = t.import_mbps / t.cat_copy_mbps;
    println!(
        "  ratio import / cat                    {ratio:>8.3}   (target >= {THROUGHPUT_TARGET}) {}",
        met(ratio >= THROUGHPUT_TARGET)
    );
    Ok(())
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}
