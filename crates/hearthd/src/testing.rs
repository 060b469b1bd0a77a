//! Fixtures shared by hearthd's own tests.

use std::path::Path;

use crate::config::Config;
use crate::image::Image;

/// The default configuration with `data` as the data directory.
pub fn config(data: &Path) -> Config {
    let env = [("HEARTH_DATA_DIR", data.display().to_string())];
    Config::load(None, |k| {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })
    .unwrap()
}

/// Image `testimage` under `data`, with a real (tiny, sparse) ext4 root filesystem of `mib` MiB,
/// so disk preparation runs for real.
pub fn image(data: &Path, mib: u64) -> Image {
    let dir = data.join("images").join("testimage");
    std::fs::create_dir_all(&dir).unwrap();
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(dir.join("rootfs.ext4"))
        .arg(format!("{mib}M"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "mkfs.ext4 failed");
    Image {
        id: "testimage".into(),
        kernel_version: "none".into(),
        dir,
        rootfs_mib: mib,
    }
}
