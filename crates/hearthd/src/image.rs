//! The default guest image, built from Debian packages and cached by the hash of its inputs:
//!
//! - kernel: Debian's cloud kernel package (`linux-image-cloud-amd64`), fetched with
//!   `apt-get download`, so from the machine's own apt mirror;
//! - initramfs: busybox (static) and the virtio modules, with an `/init` that mounts the root
//!   disk and switches to it, starting `hearth-guest` as PID 1;
//! - root filesystem: `debootstrap --variant=minbase`, plus `hearth-guest`, written into an ext4
//!   image with `mkfs.ext4 -d` (no loop mounts, no root-only mount calls).
//!
//! The debootstrap tree and the extracted kernel are cached separately, so a new agent binary
//! only costs a `mkfs.ext4` (about a second).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{ImageConfig, MIN_ROOTFS_MIB};

/// Bump when the recipe changes in a way the inputs below do not capture.
const RECIPE_VERSION: &str = "1";

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

/// The initramfs's `/init`. Uses only busybox (static, so each command is a cheap fork).
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
$bb mount --move /dev /newroot/dev
$bb mount --move /proc /newroot/proc
$bb mount --move /sys /newroot/sys
exec $bb switch_root /newroot /usr/sbin/hearth-guest
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
        let mut key = Sha256::new();
        for part in [
            RECIPE_VERSION,
            &self.config.suite,
            &mirror,
            &kernel_pkg,
            &sha256_file(&busybox)?,
            &sha256_file(agent)?,
            INIT_SCRIPT,
        ] {
            key.update(part.as_bytes());
            key.update([0]);
        }
        let id = hex(&key.finalize())[..16].to_owned();
        let dir = self.root.join(&id);
        if let Some(image) = Image::load(&dir) {
            progress(&format!("guest image {id} is cached"));
            self.set_current(&id)?;
            return Ok(image);
        }
        progress(&format!("building guest image {id}"));
        let kernel_dir = self.kernel(&kernel_pkg, progress)?;
        let base = self.debootstrap(&mirror, progress)?;

        let tmp = self.root.join(format!("{id}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        let result = self.assemble(
            &tmp,
            &kernel_dir,
            &base,
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

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        &self,
        tmp: &Path,
        kernel_dir: &Path,
        base: &Path,
        busybox: &Path,
        kernel_pkg: &str,
        id: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), ImageError> {
        let vmlinuz = find_file(&kernel_dir.join("boot"), "vmlinuz-")?;
        std::fs::copy(&vmlinuz, tmp.join("vmlinuz")).map_err(io_err("copy", &vmlinuz))?;
        progress("writing initramfs");
        let mut cpio = Newc::default();
        for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
            cpio.dir(d);
        }
        cpio.char_device("dev/console", 5, 1);
        cpio.file("init", 0o755, INIT_SCRIPT.as_bytes());
        let bb = std::fs::read(busybox).map_err(io_err("read", busybox))?;
        cpio.file("bin/busybox", 0o755, &bb);
        let modules = kernel_dir.join("lib/modules");
        for m in MODULES {
            let path = find_module(&modules, m)?;
            let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
            cpio.file(&format!("lib/modules/{m}.ko"), 0o644, &bytes);
        }
        let initrd = tmp.join("initrd.img");
        std::fs::write(&initrd, cpio.finish()).map_err(io_err("write", &initrd))?;

        progress("writing root filesystem");
        let staging = tmp.join("rootfs");
        // Hard links: cheap, and every file we add below is a new inode.
        run(
            "copy the base root filesystem",
            Command::new("cp").arg("-al").arg(base).arg(&staging),
        )?;
        let agent_dst = staging.join("usr/sbin/hearth-guest");
        let _ = std::fs::remove_file(&agent_dst);
        std::fs::copy(&self.config.agent_path, &agent_dst)
            .map_err(io_err("copy", &self.config.agent_path))?;
        for (rel, text) in [
            ("etc/hostname", "hearth\n"),
            (
                "etc/hosts",
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            ),
        ] {
            let p = staging.join(rel);
            let _ = std::fs::remove_file(&p);
            std::fs::write(&p, text).map_err(io_err("write", &p))?;
            // Readable by every guest user, whatever hearthd's own (private) umask.
            let mode =
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644);
            std::fs::set_permissions(&p, mode).map_err(io_err("chmod", &p))?;
        }
        let rootfs = tmp.join("rootfs.ext4");
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
                .arg(&rootfs)
                .arg(format!("{MIN_ROOTFS_MIB}M")),
        )?;
        std::fs::remove_dir_all(&staging).map_err(io_err("remove", &staging))?;
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
        mirror: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PathBuf, ImageError> {
        let mut key = Sha256::new();
        key.update(format!("{RECIPE_VERSION}\0{}\0{mirror}", self.config.suite));
        let dir = self
            .root
            .join(format!("debootstrap-{}", &hex(&key.finalize())[..16]));
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
                .args(["--variant=minbase", &self.config.suite])
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

    #[test]
    fn init_loads_every_module_in_order() {
        let line = INIT_SCRIPT
            .lines()
            .find(|l| l.starts_with("for m in"))
            .unwrap();
        assert_eq!(line, format!("for m in {}; do", MODULES.join(" ")));
    }
}
