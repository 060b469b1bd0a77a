//! VM disks: a per-VM copy of the image's root filesystem (reflink when the filesystem can,
//! sparse copy otherwise), grown to the VM's size.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot copy {from} to {to}")]
    Copy {
        from: String,
        to: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot grow {path} to {mib} MiB")]
    Grow {
        path: String,
        mib: u64,
        #[source]
        source: io::Error,
    },
    #[error("resize2fs failed on {path}: {stderr}")]
    Resize { path: String, stderr: String },
    #[error("cannot create {path}")]
    Create {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("mkfs.ext4 failed on {path}: {stderr}")]
    Format { path: String, stderr: String },
}

impl DiskError {
    /// The I/O error behind this one, when there is one.
    pub fn io(&self) -> Option<&io::Error> {
        match self {
            DiskError::Copy { source, .. }
            | DiskError::Grow { source, .. }
            | DiskError::Create { source, .. } => Some(source),
            DiskError::Resize { .. } | DiskError::Format { .. } => None,
        }
    }
}

/// Makes the new sparse file `path` (mode 0600; it must not exist) of `mib` MiB, synced with
/// its directory entry. A failure leaves no file.
pub fn create_sparse(path: &Path, mib: u64) -> Result<(), DiskError> {
    let err = |source| DiskError::Create {
        path: path.display().to_string(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    let done = file
        .set_len(mib.saturating_mul(1 << 20))
        .and_then(|()| file.sync_all())
        .and_then(|()| match path.parent() {
            Some(dir) => File::open(dir)?.sync_all(),
            None => Ok(()),
        });
    if let Err(e) = done {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    Ok(())
}

/// Makes an ext4 filesystem on the whole of file `path` (`mkfs.ext4 -F -q`).
pub fn format_ext4(path: &Path) -> Result<(), DiskError> {
    let out = Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(path)
        .output()
        .map_err(|source| DiskError::Create {
            path: path.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(DiskError::Format {
            path: path.display().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// How a disk was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    Reflink,
    Sparse,
}

/// Copies `from` to a new file `to` (which must not exist): a reflink when the filesystem
/// supports it, else a copy of only the data extents, so holes stay holes.
pub fn clone_file(from: &Path, to: &Path) -> Result<CopyMethod, DiskError> {
    let err = |source| DiskError::Copy {
        from: from.display().to_string(),
        to: to.display().to_string(),
        source,
    };
    let src = File::open(from).map_err(err)?;
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(err)?;
    let result = reflink(&src, &dst).and_then(|done| {
        if done {
            Ok(CopyMethod::Reflink)
        } else {
            sparse_copy(&src, &dst).map(|()| CopyMethod::Sparse)
        }
    });
    if result.is_err() {
        let _ = std::fs::remove_file(to);
    }
    result.map_err(err)
}

/// How disks will be copied in `dir`: a reflink of a scratch file made there (and removed), or
/// else sparse copies, with what FICLONE said.
pub fn probe_clone(dir: &Path) -> (CopyMethod, String) {
    let src = dir.join(".clone-probe-src");
    let dst = dir.join(".clone-probe-dst");
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    let result = (|| -> io::Result<bool> {
        std::fs::write(&src, [0x5a; 4096])?;
        let dst_file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&dst)?;
        // SAFETY: FICLONE takes the source descriptor as its argument; both descriptors are
        // open for the duration of the call and no memory is shared with the kernel.
        let rc = unsafe {
            libc::ioctl(
                dst_file.as_raw_fd(),
                libc::FICLONE,
                File::open(&src)?.as_raw_fd(),
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        Err(io::Error::last_os_error())
    })();
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    match result {
        Ok(_) => (CopyMethod::Reflink, "it works".into()),
        Err(e) => (CopyMethod::Sparse, e.to_string()),
    }
}

/// FICLONE; `Ok(false)` when the filesystem cannot share extents.
fn reflink(src: &File, dst: &File) -> io::Result<bool> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both descriptors are open for
    // the duration of the call and no memory is shared with the kernel.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::EPERM) => {
            Ok(false)
        }
        _ => Err(e),
    }
}

/// The data extents of `file` (offset, length), found with SEEK_DATA/SEEK_HOLE, in order; what
/// lies between them reads as zeros. A filesystem without hole reporting gives one extent.
pub fn data_segments(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let len =
        i64::try_from(file.metadata()?.len()).map_err(|_| io::Error::other("file too large"))?;
    let mut segments = Vec::new();
    let mut pos: i64 = 0;
    while pos < len {
        // SAFETY: lseek on an open descriptor; no memory involved.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        if hole <= data {
            return Err(io::Error::other(
                "SEEK_HOLE did not advance: the file changed",
            ));
        }
        // Both are non-negative offsets within the file.
        segments.push((data.unsigned_abs(), (hole - data).unsigned_abs()));
        pos = hole;
    }
    Ok(segments)
}

/// Copies the data extents of `src` with copy_file_range, so holes stay holes.
fn sparse_copy(src: &File, dst: &File) -> io::Result<()> {
    dst.set_len(src.metadata()?.len())?;
    for (offset, length) in data_segments(src)? {
        let to_i64 = |v: u64| i64::try_from(v).map_err(|_| io::Error::other("file too large"));
        let (mut off_in, end) = (to_i64(offset)?, to_i64(offset + length)?);
        let mut off_out = off_in;
        while off_in < end {
            let want = usize::try_from(end - off_in)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            // SAFETY: both offsets point to live i64s owned by this frame; descriptors are open.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    want,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                // Across filesystems (of different types, or before Linux 5.3) the kernel does
                // not copy: the bytes go through this process instead.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                ) {
                    let done = u64::try_from(off_in).unwrap_or(0);
                    copy_range(src, dst, done, offset + length - done)?;
                    break;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "source shrank",
                ));
            }
        }
    }
    Ok(())
}

/// Copies `len` bytes at `offset` of `src` to the same offset of `dst` by reading and writing.
fn copy_range(src: &File, dst: &File, mut offset: u64, mut len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    while len > 0 {
        let n = usize::try_from(len.min(buf.len() as u64)).unwrap_or(buf.len());
        src.read_exact_at(&mut buf[..n], offset)?;
        dst.write_all_at(&buf[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// A failure to grow `path` to `mib` MiB.
fn grow_error(path: &Path, mib: u64) -> impl Fn(io::Error) -> DiskError + '_ {
    move |source| DiskError::Grow {
        path: path.display().to_string(),
        mib,
        source,
    }
}

/// Grows the ext4 filesystem image at `path` to `mib` MiB (never shrinks).
pub fn grow_ext4(path: &Path, mib: u64) -> Result<(), DiskError> {
    let bytes = mib * 1024 * 1024;
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(grow_error(path, mib))?;
    let current = file.metadata().map(|m| m.len()).unwrap_or(0);
    if bytes <= current {
        return Ok(());
    }
    file.set_len(bytes).map_err(grow_error(path, mib))?;
    drop(file);
    // -f: the image was just copied from a clean, unmounted filesystem, so the fsck resize2fs
    // would otherwise insist on is not needed.
    let out = Command::new("resize2fs")
        .arg("-f")
        .arg(path)
        .output()
        .map_err(grow_error(path, mib))?;
    if !out.status.success() {
        return Err(DiskError::Resize {
            path: path.display().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Grows the ext4 root disk of a VM that has run to `mib` MiB: its filesystem is checked first
/// (`e2fsck -f -p`: a VMM that was killed leaves it unclean, and resize2fs needs a clean one),
/// and when the resize fails the file goes back to its size, so the disk is as it was.
pub fn grow_used_ext4(path: &Path, mib: u64) -> Result<(), DiskError> {
    let resize_err = |stderr: String| DiskError::Resize {
        path: path.display().to_string(),
        stderr,
    };
    let out = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(path)
        .output()
        .map_err(grow_error(path, mib))?;
    // 0: clean; 1 and 2: errors fixed. Anything else leaves errors or did not run.
    if !matches!(out.status.code(), Some(0..=2)) {
        return Err(resize_err(format!(
            "e2fsck could not make the filesystem clean ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    let before = std::fs::metadata(path).map(|m| m.len()).ok();
    let result = grow_ext4(path, mib);
    if result.is_err()
        && let Some(len) = before
        && let Ok(file) = OpenOptions::new().write(true).open(path)
    {
        let _ = file.set_len(len);
    }
    result
}

/// One spare root disk of the default size, made from the current image and kept ready in
/// `<data_dir>/spare`, so a create that wants exactly that size takes it with a rename instead of
/// copying and growing the image on the request path.
#[derive(Debug)]
pub struct Spares {
    dir: PathBuf,
    mib: u64,
    /// True while a spare is being prepared.
    refilling: AtomicBool,
}

impl Spares {
    pub fn new(data_dir: &Path, mib: u64) -> Spares {
        Spares {
            dir: data_dir.join("spare"),
            mib,
            refilling: AtomicBool::new(false),
        }
    }

    fn path(&self, image_id: &str) -> PathBuf {
        self.dir.join(format!("{image_id}-{}.ext4", self.mib))
    }

    /// Moves the spare for `image_id` to `dst` when the wanted size is the spare's; false when
    /// there is none (the caller copies the image itself).
    pub fn take(&self, image_id: &str, mib: u64, dst: &Path) -> bool {
        mib == self.mib && std::fs::rename(self.path(image_id), dst).is_ok()
    }

    /// Prepares a spare of `rootfs` (image `image_id`) unless one is ready or being made; spares
    /// of other images or sizes are removed. Blocking: run it off the async threads.
    pub fn refill(&self, image_id: &str, rootfs: &Path) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let spare = self.path(image_id);
        let result = (|| {
            std::fs::create_dir_all(&self.dir).map_err(|source| DiskError::Copy {
                from: rootfs.display().to_string(),
                to: self.dir.display().to_string(),
                source,
            })?;
            for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                if e.path() != spare {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            if spare.exists() {
                return Ok(());
            }
            let tmp = spare.with_extension("tmp");
            clone_file(rootfs, &tmp)?;
            grow_ext4(&tmp, self.mib)?;
            std::fs::rename(&tmp, &spare).map_err(|source| DiskError::Copy {
                from: tmp.display().to_string(),
                to: spare.display().to_string(),
                source,
            })
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot prepare a spare disk; creates will copy the image");
        }
        self.refilling.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop-mounted xfs (made with reflink) in a temp dir, unmounted on drop.
    struct Xfs {
        dir: tempfile::TempDir,
    }

    impl Xfs {
        fn new() -> Xfs {
            assert!(
                nix::unistd::geteuid().is_root(),
                "this test mounts a loop xfs and needs root; run the tests as root (make test does)"
            );
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("fs.img");
            File::create(&image).unwrap().set_len(8 << 30).unwrap();
            let run = |cmd: &mut Command| {
                let out = cmd.output().unwrap();
                assert!(
                    out.status.success(),
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            run(Command::new("mkfs.xfs")
                .args(["-q", "-m", "reflink=1"])
                .arg(&image));
            std::fs::create_dir(dir.path().join("mnt")).unwrap();
            run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(dir.path().join("mnt")));
            Xfs { dir }
        }
        fn mnt(&self) -> PathBuf {
            self.dir.path().join("mnt")
        }
    }

    impl Drop for Xfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.mnt()).status();
        }
    }

    #[test]
    fn on_a_reflink_filesystem_a_disk_of_any_size_is_a_clone() {
        use std::os::unix::fs::FileExt;
        let xfs = Xfs::new();
        let (method, why) = probe_clone(&xfs.mnt());
        assert_eq!(method, CopyMethod::Reflink, "{why}");
        // Images with data spread through them (1 MiB every 64 MiB), of 64 MiB and 4 GiB.
        for mib in [64u64, 4096] {
            let src = xfs.mnt().join(format!("src-{mib}"));
            let f = File::create(&src).unwrap();
            f.set_len(mib << 20).unwrap();
            let chunk = vec![0xa5u8; 1 << 20];
            for at in (0..mib).step_by(64) {
                f.write_all_at(&chunk, at << 20).unwrap();
            }
            f.sync_all().unwrap();
            let dst = xfs.mnt().join(format!("dst-{mib}"));
            let started = std::time::Instant::now();
            assert_eq!(clone_file(&src, &dst).unwrap(), CopyMethod::Reflink);
            eprintln!("clone of {mib} MiB: {:?}", started.elapsed());
            let mut buf = vec![0u8; 1 << 20];
            File::open(&dst)
                .unwrap()
                .read_exact_at(&mut buf, 0)
                .unwrap();
            assert_eq!(buf, chunk);
            assert_eq!(std::fs::metadata(&dst).unwrap().len(), mib << 20);
        }
    }

    #[test]
    fn the_clone_probe_says_how_and_why_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (method, why) = probe_clone(dir.path());
        match method {
            CopyMethod::Reflink => assert_eq!(why, "it works"),
            CopyMethod::Sparse => assert!(why.contains("os error"), "{why}"),
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_copy_across_filesystems_keeps_data_and_holes() {
        use std::os::unix::fs::FileExt;
        let xfs = Xfs::new();
        let src = xfs.mnt().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 3 << 20], 10 << 20).unwrap();
        drop(f);
        let other = tempfile::tempdir().unwrap();
        let dst = other.path().join("dst");
        assert_eq!(clone_file(&src, &dst).unwrap(), CopyMethod::Sparse);
        assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap());
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(64 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        f.set_len(128 << 20).unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        clone_file(&src, &dst).unwrap();
        let a = std::fs::read(&src).unwrap();
        let b = std::fs::read(&dst).unwrap();
        assert_eq!(a, b);
        // 128 MiB apparent, only a few blocks allocated.
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < (1 << 20));
        // The target must not exist yet.
        assert!(clone_file(&src, &dst).is_err());
        assert_eq!(
            std::fs::read(&dst).unwrap(),
            a,
            "a failed copy must not touch an existing file"
        );
    }
}
