//! The default guest image, built from Debian packages and cached by the hash of its inputs:
//!
//! - kernel: Debian's cloud kernel package (`linux-image-cloud-amd64`), fetched with
//!   `apt-get download`, so from the machine's own apt mirror;
//! - initramfs: busybox (static), the virtio modules and the guest agent `hearth-guest`, with an
//!   `/init` that mounts the root disk, copies the agent onto a tmpfs at the root disk's `/run`
//!   and switches to the disk with that copy as PID 1;
//! - root filesystem: `debootstrap --variant=minbase` plus `openssh-sftp-server` (for sftp/scp
//!   over SSH), written into an ext4 image with
//!   `mkfs.ext4 -d` (no loop mounts, no root-only mount calls). It holds no agent.
//!
//! The agent travels in the initramfs hearthd hands QEMU at every boot, never on a VM's disk: a
//! VM whose disk came from an older image, or whose guest replaced or removed files on its disk,
//! still boots the agent of the hearthd that starts it, and nothing from the disk runs before it.
//!
//! Four caches, each keyed by what it is built from, so a new agent binary costs only a new
//! initramfs (a second): the extracted kernel package (`kernel-<package>`), the debootstrap tree
//! (`debootstrap-<key>`), the root filesystem (`rootfs-<key>`, from the tree alone) and the image
//! (`<id>`: kernel, initramfs, and a link to its root filesystem).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{ImageConfig, MIN_ROOTFS_MIB};

/// Bump when the debootstrap step changes in a way its inputs do not capture.
const DEBOOTSTRAP_RECIPE: &str = "2";
/// Packages debootstrap adds to `minbase`: OpenSSH's sftp server, which the SSH front end runs
/// for `sftp` and `scp` into a VM (+15 MB of the root filesystem's 170, with the ssh client
/// libraries it depends on; no service, nothing runs at boot).
const DEBOOTSTRAP_INCLUDE: &[&str] = &["openssh-sftp-server"];
/// Bump when the root filesystem recipe changes in a way its inputs do not capture.
const ROOTFS_RECIPE: &str = "2";
/// Bump when the initramfs recipe changes in a way its inputs do not capture.
const INITRAMFS_RECIPE: &str = "2";

/// Modules the cloud kernel needs from the initramfs, in load order (DESIGN.md).
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
];

const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "/bin/busybox";

/// Where the agent is inside the initramfs.
const INITRAMFS_AGENT: &str = "bin/hearth-guest";
/// Where PID 1 runs from after `switch_root`: a tmpfs the initramfs mounts at the root disk's
/// `/run` (the mount PID 1 would make anyway) and copies the agent onto. Written out in
/// [`INIT_SCRIPT`]; the tests check the two agree.
#[cfg(test)]
const GUEST_AGENT_PATH: &str = "/run/hearth/hearth-guest";

/// Files the root filesystem gets on top of the debootstrap tree.
const ROOTFS_FILES: &[(&str, &str)] = &[
    ("etc/hostname", "hearth\n"),
    (
        "etc/hosts",
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    ),
];

/// The initramfs's `/init`. Uses only busybox and the agent from the initramfs itself (static,
/// so each command is a cheap fork): nothing on the root disk is executed, since a guest's root
/// user may have replaced any file there. The disk's mount points are checked to be real
/// directories first: a mount onto a symlink would follow it.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
$bb mount -t devtmpfs dev /dev
fail() { echo "hearth-init: $1"; $bb sleep 1; $bb poweroff -f; }
for m in virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net virtio_console; do
  $bb insmod /lib/modules/$m.ko || echo "hearth-init: cannot load module $m"
done
n=0
while [ ! -b /dev/vda ]; do
  n=$((n+1)); [ $n -gt 500 ] && fail "no root disk /dev/vda after 5 s"
  $bb usleep 10000
done
$bb mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "cannot mount the root disk"
for d in dev proc sys run; do
  if [ -L /newroot/$d ] || [ ! -d /newroot/$d ]; then
    echo "hearth-init: /$d on the root disk is not a directory, making it one"
    $bb rm -f /newroot/$d; $bb mkdir /newroot/$d || fail "cannot create /$d on the root disk"
  fi
done
$bb mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /newroot/run || fail "cannot mount /run"
$bb mkdir /newroot/run/hearth || fail "cannot create /run/hearth"
$bb cp /bin/hearth-guest /newroot/run/hearth/hearth-guest || fail "cannot copy the agent"
$bb mount --move /dev /newroot/dev
$bb mount --move /proc /newroot/proc
$bb mount --move /sys /newroot/sys
exec $bb switch_root /newroot /run/hearth/hearth-guest
fail "switch_root failed"
"#;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{step} failed: {detail}")]
    Step { step: String, detail: String },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the guest agent binary {0} does not exist; build it with `make agent` or set image.agent_path"
    )]
    NoAgent(String),
    #[error("no Debian mirror found in apt's sources; set image.mirror")]
    NoMirror,
}

/// A built guest image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Image {
    /// Content hash of the inputs (first 16 hex digits).
    pub id: String,
    pub kernel_version: String,
    #[serde(skip)]
    pub dir: PathBuf,
    /// Size of the root filesystem image in MiB: the smallest root disk a VM may have.
    pub rootfs_mib: u64,
}

impl Image {
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }

    /// Loads a finished image from its directory.
    pub fn load(dir: &Path) -> Option<Image> {
        let text = std::fs::read_to_string(dir.join("manifest.json")).ok()?;
        let mut image: Image = serde_json::from_str(&text).ok()?;
        image.dir = dir.to_owned();
        Some(image)
    }
}

/// Builds (or finds cached) guest images under `<data_dir>/images`.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    root: PathBuf,
    config: ImageConfig,
}

fn run(step: &str, cmd: &mut Command) -> Result<String, ImageError> {
    let out = cmd.output().map_err(|e| ImageError::Step {
        step: step.to_owned(),
        detail: format!("cannot run {:?}: {e}", cmd.get_program()),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(ImageError::Step {
            step: step.to_owned(),
            detail: format!(
                "{:?} exited with {}: {}",
                cmd.get_program(),
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.display().to_string();
    move |source| ImageError::Io { what, path, source }
}

fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let bytes = std::fs::read(path).map_err(io_err("read", path))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 16 hex digits of the SHA-256 of `parts`, each followed by a NUL.
fn key_of(parts: &[&str]) -> String {
    let mut key = Sha256::new();
    for part in parts {
        key.update(part.as_bytes());
        key.update([0]);
    }
    hex(&key.finalize())[..16].to_owned()
}

/// The debootstrap tree's cache key: the recipe, suite, mirror and included packages.
fn debootstrap_key(suite: &str, mirror: &str) -> String {
    let mut key = Sha256::new();
    key.update(format!(
        "{DEBOOTSTRAP_RECIPE}\0{suite}\0{mirror}\0{}",
        DEBOOTSTRAP_INCLUDE.join(",")
    ));
    hex(&key.finalize())[..16].to_owned()
}

/// The root filesystem's cache key: the tree and what is written on top of it. The agent is
/// deliberately not part of it.
fn rootfs_key(debootstrap_key: &str) -> String {
    let mib = MIN_ROOTFS_MIB.to_string();
    let mut parts = vec!["rootfs", ROOTFS_RECIPE, debootstrap_key, &mib];
    for (path, text) in ROOTFS_FILES {
        parts.extend([*path, *text]);
    }
    key_of(&parts)
}

/// The image id: the kernel package, the initramfs's inputs (busybox, the agent, `/init`) and
/// the root filesystem it links to.
fn image_id(kernel_pkg: &str, busybox_sha: &str, agent_sha: &str, rootfs_key: &str) -> String {
    key_of(&[
        "image",
        INITRAMFS_RECIPE,
        kernel_pkg,
        busybox_sha,
        agent_sha,
        INIT_SCRIPT,
        rootfs_key,
    ])
}

/// The initramfs: busybox, the agent, the modules (in [`MODULES`] order) and `/init`.
fn initramfs(busybox: &[u8], agent: &[u8], modules: &[Vec<u8>]) -> Vec<u8> {
    let mut cpio = Newc::default();
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        cpio.dir(d);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes());
    cpio.file("bin/busybox", 0o755, busybox);
    cpio.file(INITRAMFS_AGENT, 0o755, agent);
    for (m, bytes) in MODULES.iter().zip(modules) {
        cpio.file(&format!("lib/modules/{m}.ko"), 0o644, bytes);
    }
    cpio.finish()
}

/// The mirror apt uses for `suite`, from `apt-get indextargets`.
pub fn apt_mirror(suite: &str) -> Option<String> {
    let out = Command::new("apt-get")
        .args([
            "indextargets",
            "--format",
            "$(SITE) $(RELEASE) $(IDENTIFIER)",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    pick_mirror(&text, suite)
}

fn pick_mirror(indextargets: &str, suite: &str) -> Option<String> {
    indextargets.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (site, release, id) = (f.next()?, f.next()?, f.next()?);
        (release == suite && id == "Packages").then(|| site.trim_end_matches('/').to_owned())
    })
}

impl ImageBuilder {
    pub fn new(data_dir: &Path, config: ImageConfig) -> ImageBuilder {
        ImageBuilder {
            root: data_dir.join("images"),
            config,
        }
    }

    /// The newest finished image, if any (used at start-up, before any build).
    pub fn current(&self) -> Option<Image> {
        let link = std::fs::read_link(self.root.join("current")).ok()?;
        Image::load(&self.root.join(link))
    }

    /// Returns the image for the current inputs, building what is missing.
    pub fn ensure(&self, progress: &mut dyn FnMut(&str)) -> Result<Image, ImageError> {
        std::fs::create_dir_all(&self.root).map_err(io_err("create", &self.root))?;
        let agent = &self.config.agent_path;
        if !agent.is_file() {
            return Err(ImageError::NoAgent(agent.display().to_string()));
        }
        let mirror = match &self.config.mirror {
            Some(m) => m.clone(),
            None => apt_mirror(&self.config.suite).ok_or(ImageError::NoMirror)?,
        };
        let kernel_pkg = self.kernel_package()?;
        let busybox = PathBuf::from(BUSYBOX);
        let debootstrap_key = debootstrap_key(&self.config.suite, &mirror);
        let rootfs_key = rootfs_key(&debootstrap_key);
        let id = image_id(
            &kernel_pkg,
            &sha256_file(&busybox)?,
            &sha256_file(agent)?,
            &rootfs_key,
        );
        let dir = self.root.join(&id);
        if let Some(image) = Image::load(&dir) {
            progress(&format!("guest image {id} is cached"));
            self.set_current(&id)?;
            return Ok(image);
        }
        progress(&format!("building guest image {id}"));
        let kernel_dir = self.kernel(&kernel_pkg, progress)?;
        let rootfs_dir = self.rootfs(&debootstrap_key, &mirror, &rootfs_key, progress)?;

        let tmp = self.root.join(format!("{id}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        let result = self.assemble(
            &tmp,
            &kernel_dir,
            &rootfs_dir,
            &busybox,
            &kernel_pkg,
            &id,
            progress,
        );
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &dir).map_err(io_err("rename", &tmp))?;
        self.set_current(&id)?;
        progress(&format!("guest image {id} is ready"));
        Image::load(&dir).ok_or_else(|| ImageError::Step {
            step: "load manifest".into(),
            detail: format!("{} has no manifest", dir.display()),
        })
    }

    /// Writes the image directory: the kernel, the initramfs (with the agent), a relative link
    /// to the cached root filesystem, and the manifest.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        &self,
        tmp: &Path,
        kernel_dir: &Path,
        rootfs_dir: &Path,
        busybox: &Path,
        kernel_pkg: &str,
        id: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        let vmlinuz = find_file(&kernel_dir.join("boot"), "vmlinuz-")?;
        std::fs::copy(&vmlinuz, tmp.join("vmlinuz")).map_err(io_err("copy", &vmlinuz))?;
        progress("writing initramfs");
        let bb = std::fs::read(busybox).map_err(io_err("read", busybox))?;
        let agent = &self.config.agent_path;
        let agent = std::fs::read(agent).map_err(io_err("read", agent))?;
        let lib = kernel_dir.join("lib/modules");
        let mut modules = Vec::with_capacity(MODULES.len());
        for m in MODULES {
            let path = find_module(&lib, m)?;
            modules.push(std::fs::read(&path).map_err(io_err("read", &path))?);
        }
        let initrd = tmp.join("initrd.img");
        std::fs::write(&initrd, initramfs(&bb, &agent, &modules))
            .map_err(io_err("write", &initrd))?;

        // The root filesystem is shared by every image built from the same tree: link, not copy.
        let name = rootfs_dir.file_name().unwrap_or_default();
        let target = Path::new("..").join(name).join("rootfs.ext4");
        let link = tmp.join("rootfs.ext4");
        std::os::unix::fs::symlink(&target, &link).map_err(io_err("link", &link))?;
        let image = Image {
            id: id.to_owned(),
            kernel_version: kernel_pkg.to_owned(),
            dir: PathBuf::new(),
            rootfs_mib: MIN_ROOTFS_MIB,
        };
        let manifest = tmp.join("manifest.json");
        let text = serde_json::to_string_pretty(&image).unwrap_or_default();
        std::fs::write(&manifest, text).map_err(io_err("write", &manifest))?;
        Ok(())
    }

    /// The cached root filesystem `rootfs-<key>/rootfs.ext4`, built from the debootstrap tree
    /// when missing. Returns its directory.
    fn rootfs(
        &self,
        debootstrap_key: &str,
        mirror: &str,
        key: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PathBuf, ImageError> {
        let dir = self.root.join(format!("rootfs-{key}"));
        if dir.join("rootfs.ext4").is_file() {
            return Ok(dir);
        }
        let base = self.debootstrap(debootstrap_key, mirror, progress)?;
        progress("writing root filesystem");
        let tmp = self.root.join(format!("rootfs-{key}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        let result = (|| {
            let staging = tmp.join("tree");
            // Hard links: cheap, and every file we add below is a new inode.
            run(
                "copy the base root filesystem",
                Command::new("cp").arg("-al").arg(&base).arg(&staging),
            )?;
            for (rel, text) in ROOTFS_FILES {
                let p = staging.join(rel);
                let _ = std::fs::remove_file(&p);
                std::fs::write(&p, text).map_err(io_err("write", &p))?;
                // Readable by every guest user, whatever hearthd's own (private) umask.
                let mode =
                    <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644);
                std::fs::set_permissions(&p, mode).map_err(io_err("chmod", &p))?;
            }
            run(
                "mkfs.ext4",
                Command::new("mkfs.ext4")
                    .args([
                        "-q",
                        "-F",
                        "-L",
                        "hearth-root",
                        "-E",
                        "root_owner=0:0",
                        "-d",
                    ])
                    .arg(&staging)
                    .arg(tmp.join("rootfs.ext4"))
                    .arg(format!("{MIN_ROOTFS_MIB}M")),
            )?;
            std::fs::remove_dir_all(&staging).map_err(io_err("remove", &staging))
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &dir).map_err(io_err("rename", &tmp))?;
        Ok(dir)
    }

    fn set_current(&self, id: &str) -> Result<(), ImageError> {
        let link = self.root.join("current");
        let tmp = self.root.join("current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(id, &tmp).map_err(io_err("link", &tmp))?;
        std::fs::rename(&tmp, &link).map_err(io_err("rename", &tmp))
    }

    /// `linux-image-6.1.0-NN-cloud-amd64 (= version)`: the package the metapackage points at.
    fn kernel_package(&self) -> Result<String, ImageError> {
        let out = run(
            "look up the kernel package",
            Command::new("apt-cache").args(["depends", KERNEL_PACKAGE]),
        )?;
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .map(str::to_owned)
            .ok_or_else(|| ImageError::Step {
                step: "look up the kernel package".into(),
                detail: format!(
                    "apt knows no {KERNEL_PACKAGE}; run `apt-get update` (make deps does)"
                ),
            })
    }

    fn kernel(&self, package: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, ImageError> {
        let dir = self.root.join(format!("kernel-{package}"));
        if dir.join("boot").is_dir() {
            return Ok(dir);
        }
        progress(&format!("downloading kernel package {package}"));
        let tmp = self.root.join(format!("kernel-{package}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        run(
            "apt-get download",
            Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(&tmp),
        )?;
        let deb = find_file(&tmp, &format!("{package}_"))?;
        let tree = tmp.join("tree");
        run(
            "unpack the kernel package",
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree),
        )?;
        std::fs::rename(&tree, &dir).map_err(io_err("rename", &tree))?;
        let _ = std::fs::remove_dir_all(&tmp);
        Ok(dir)
    }

    fn debootstrap(
        &self,
        key: &str,
        mirror: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PathBuf, ImageError> {
        let dir = self.root.join(format!("debootstrap-{key}"));
        if dir.join("usr/bin").is_dir() {
            return Ok(dir);
        }
        progress(&format!(
            "running debootstrap {} from {mirror} (a few minutes)",
            self.config.suite
        ));
        let tmp = self.root.join("debootstrap.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        run(
            "debootstrap",
            Command::new("debootstrap")
                .arg("--variant=minbase")
                .arg(format!("--include={}", DEBOOTSTRAP_INCLUDE.join(",")))
                .arg(&self.config.suite)
                .arg(&tmp)
                .arg(mirror),
        )?;
        // The downloaded packages are not needed inside guests.
        let archives = tmp.join("var/cache/apt/archives");
        if let Ok(entries) = std::fs::read_dir(&archives) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "deb") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        std::fs::rename(&tmp, &dir).map_err(io_err("rename", &tmp))?;
        Ok(dir)
    }
}

fn find_file(dir: &Path, prefix: &str) -> Result<PathBuf, ImageError> {
    std::fs::read_dir(dir)
        .map_err(io_err("read", dir))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .ok_or_else(|| ImageError::Step {
            step: "find file".into(),
            detail: format!("no {prefix}* in {}", dir.display()),
        })
}

fn find_module(root: &Path, name: &str) -> Result<PathBuf, ImageError> {
    fn walk(dir: &Path, file: &str) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(found) = walk(&p, file) {
                    return Some(found);
                }
            } else if p.file_name().is_some_and(|n| n == file) {
                return Some(p);
            }
        }
        None
    }
    walk(root, &format!("{name}.ko")).ok_or_else(|| ImageError::Step {
        step: "find kernel module".into(),
        detail: format!("{name}.ko is not in {}", root.display()),
    })
}

/// A writer of the `newc` cpio format the kernel unpacks as initramfs.
#[derive(Debug, Default)]
struct Newc {
    out: Vec<u8>,
    ino: u32,
}

impl Newc {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            namesize,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut c = Newc::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let out = c.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // Header is 110 bytes; "bin\0" pads to 112.
        assert_eq!(&out[110..113], b"bin");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("#!/bin/sh\n"));
        assert!(text.contains("TRAILER!!!"));
        // The file entry's mode field: regular file 0755.
        assert!(text.contains(&format!("{:08x}", 0o100755)));
    }

    #[test]
    fn mirror_comes_from_apt_index_targets() {
        let targets = "http://mirror.example/debian bookworm DEP-11\n\
                       http://mirror.example/debian bookworm Packages\n\
                       http://sec.example/debian-security bookworm-security Packages\n";
        assert_eq!(
            pick_mirror(targets, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(pick_mirror(targets, "trixie"), None);
    }

    /// One entry of a `newc` archive, as the kernel reads it.
    #[derive(Debug)]
    struct Entry {
        name: String,
        mode: u32,
        uid: u32,
        data: Vec<u8>,
    }

    fn field(header: &[u8], index: usize) -> u32 {
        let text = std::str::from_utf8(&header[6 + index * 8..6 + (index + 1) * 8]).unwrap();
        u32::from_str_radix(text, 16).unwrap()
    }

    /// Reads a `newc` archive up to its trailer, checking magic and alignment on the way.
    fn read_newc(mut bytes: &[u8]) -> Vec<Entry> {
        fn padded(n: usize) -> usize {
            n.div_ceil(4) * 4
        }
        let mut entries = Vec::new();
        loop {
            assert!(bytes.starts_with(b"070701"), "bad magic");
            let header = &bytes[..110];
            let (mode, uid) = (field(header, 1), field(header, 2));
            let size = field(header, 6) as usize;
            let namesize = field(header, 11) as usize;
            let name_end = 110 + namesize;
            let name = std::str::from_utf8(&bytes[110..name_end - 1])
                .unwrap()
                .to_owned();
            assert_eq!(
                bytes[name_end - 1],
                0,
                "name of {name} is not NUL-terminated"
            );
            let data_start = padded(name_end);
            let data = bytes[data_start..data_start + size].to_vec();
            bytes = &bytes[padded(data_start + size)..];
            if name == "TRAILER!!!" {
                assert!(bytes.is_empty(), "bytes after the trailer");
                return entries;
            }
            entries.push(Entry {
                name,
                mode,
                uid,
                data,
            });
        }
    }

    fn test_initramfs() -> Vec<Entry> {
        let modules: Vec<Vec<u8>> = MODULES
            .iter()
            .map(|m| format!("module {m}").into_bytes())
            .collect();
        read_newc(&initramfs(
            b"busybox bytes",
            b"\x7fELF agent bytes",
            &modules,
        ))
    }

    #[test]
    fn the_initramfs_carries_the_agent() {
        let entries = test_initramfs();
        let get = |name: &str| {
            entries
                .iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("{name} is not in the initramfs"))
        };
        let agent = get(INITRAMFS_AGENT);
        assert_eq!(agent.data, b"\x7fELF agent bytes");
        assert_eq!(
            agent.mode, 0o100755,
            "the agent is an executable regular file"
        );
        assert_eq!(agent.uid, 0);
        let init = get("init");
        assert_eq!(init.data, INIT_SCRIPT.as_bytes());
        assert_eq!(init.mode, 0o100755);
        assert_eq!(get("bin/busybox").data, b"busybox bytes");
        assert_eq!(get("newroot").mode, 0o040755);
        assert_eq!(get("dev/console").mode, 0o020600);
        let modules: Vec<_> = entries
            .iter()
            .filter_map(|e| e.name.strip_prefix("lib/modules/"))
            .collect();
        let want: Vec<_> = MODULES.iter().map(|m| format!("{m}.ko")).collect();
        assert_eq!(modules, want);
        // Every parent directory comes before what it holds.
        for (i, e) in entries.iter().enumerate() {
            if let Some((parent, _)) = e.name.rsplit_once('/') {
                assert!(
                    entries[..i].iter().any(|p| p.name == parent),
                    "{} comes before its directory",
                    e.name
                );
            }
        }
    }

    /// The commands the script runs, in order: each `;`, `&&`, `||`, `then` or `do` starts one.
    fn script_commands() -> Vec<String> {
        let mut commands = Vec::new();
        for line in INIT_SCRIPT.lines().skip(1) {
            let line = line.trim();
            let mut rest = line;
            loop {
                let cut = [";", "&&", "||", " then ", " do "]
                    .iter()
                    .filter_map(|sep| rest.find(sep).map(|at| (at, sep.len())))
                    .min();
                let (head, tail) = match cut {
                    Some((at, len)) => (&rest[..at], Some(&rest[at + len..])),
                    None => (rest, None),
                };
                let head = head.trim();
                if !head.is_empty() {
                    commands.push(head.to_owned());
                }
                match tail {
                    Some(tail) => rest = tail,
                    None => break,
                }
            }
        }
        commands
    }

    #[test]
    fn init_runs_nothing_from_the_root_disk() {
        // Every command is busybox from the initramfs, a shell builtin or keyword, or `fail`.
        for command in script_commands() {
            let word = command.split_whitespace().next().unwrap_or_default();
            let word = if word == "exec" {
                command.split_whitespace().nth(1).unwrap_or_default()
            } else {
                word
            };
            let allowed = word == "$bb"
                || [
                    "echo", "[", "fail", "for", "do", "done", "if", "then", "fi", "while", "}",
                ]
                .contains(&word)
                || word.starts_with("n=")
                || word == "bb=/bin/busybox"
                || word == "fail()";
            assert!(allowed, "the init script runs `{command}`");
        }
    }

    #[test]
    fn init_switches_into_the_agent_from_the_initramfs() {
        let commands = script_commands();
        let position = |want: &str| {
            commands
                .iter()
                .position(|c| c == want)
                .unwrap_or_else(|| panic!("the init script does not run `{want}`:\n{commands:#?}"))
        };
        let tmpfs = position("$bb mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /newroot/run");
        let copy = position(&format!(
            "$bb cp /{INITRAMFS_AGENT} /newroot{GUEST_AGENT_PATH}"
        ));
        let switch = position(&format!("exec $bb switch_root /newroot {GUEST_AGENT_PATH}"));
        let root = position("$bb mount -t ext4 -o rw,noatime /dev/vda /newroot");
        assert!(root < tmpfs && tmpfs < copy && copy < switch);
        // The mount points on the disk are made real directories before anything is mounted
        // on them (a mount follows a symlink), /run among them.
        let check = position("$bb rm -f /newroot/$d");
        assert!(root < check && check < tmpfs);
        assert!(INIT_SCRIPT.contains("for d in dev proc sys run; do"));
        assert_eq!(
            commands
                .iter()
                .filter(|c| c.contains("$bb switch_root"))
                .count(),
            1,
            "one switch_root, into the agent's copy"
        );
        assert!(!INIT_SCRIPT.contains("/usr/sbin/hearth-guest"));
    }

    #[test]
    fn a_new_agent_changes_the_image_but_not_the_root_filesystem() {
        let tree = debootstrap_key("bookworm", "http://deb.debian.org/debian");
        // The first recipe's trees had no sftp server: they are not reused.
        let mut first = Sha256::new();
        first.update("1\0bookworm\0http://deb.debian.org/debian");
        assert_ne!(tree, hex(&first.finalize())[..16]);
        assert_ne!(tree, debootstrap_key("bookworm", "http://other"));
        let rootfs = rootfs_key(&tree);
        assert_eq!(rootfs.len(), 16);
        assert_ne!(rootfs, tree);
        assert_ne!(rootfs, rootfs_key(&debootstrap_key("trixie", "http://m")));
        let kernel = "linux-image-6.1.0-1-cloud-amd64";
        let old = image_id(kernel, "bb", "agent-1", &rootfs);
        assert_eq!(old, image_id(kernel, "bb", "agent-1", &rootfs));
        assert_ne!(old, image_id(kernel, "bb", "agent-2", &rootfs));
        assert_ne!(
            old,
            image_id("linux-image-6.1.0-2-cloud-amd64", "bb", "agent-1", &rootfs)
        );
        assert_ne!(old, image_id(kernel, "bb", "agent-1", "another-rootfs"));
    }

    #[test]
    fn init_loads_every_module_in_order() {
        let line = INIT_SCRIPT
            .lines()
            .find(|l| l.starts_with("for m in"))
            .unwrap();
        assert_eq!(line, format!("for m in {}; do", MODULES.join(" ")));
    }
}
