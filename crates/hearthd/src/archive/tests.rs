use std::os::unix::fs::MetadataExt;
use std::process::Command;

use super::*;

fn manifest(rootfs_mib: u64) -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        hearth_version: "0.1.0".into(),
        exported_at: "2026-12-03T10:00:00.000Z".into(),
        exported_by: "operator".into(),
        vm: ManifestVm {
            name: "web".into(),
            created_at: "2026-12-01T10:00:00.000Z".into(),
            created_by: "operator".into(),
            cpus: 2,
            memory_mib: 512,
            rootfs_mib,
            egress: None,
            user_data: Some("#cloud-config\n".into()),
            ssh_authorized_keys: vec![],
        },
        files: vec![],
    }
}

/// A sparse 8 MiB disk: `blocks` 4 KiB blocks of data spread over it, ending in a hole.
fn disk(dir: &Path, blocks: u64) -> PathBuf {
    let path = dir.join("disk.ext4");
    let f = File::create(&path).unwrap();
    f.set_len(8 << 20).unwrap();
    for i in 0..blocks {
        let byte = u8::try_from(i % 250 + 1).unwrap();
        f.write_all_at(&[byte; 4096], i * 64 * 1024).unwrap();
    }
    path
}

fn export(dir: &Path, blocks: u64) -> Vec<u8> {
    let rootfs = disk(dir, blocks);
    let log = dir.join("serial.log");
    std::fs::write(&log, b"boot ok\n").unwrap();
    let sources = Sources {
        rootfs: &rootfs,
        logs: vec![("serial.log", log), ("vmm.log", dir.join("missing.log"))],
    };
    let plan = Export::plan(&sources, manifest(8), 1_700_000_000).unwrap();
    let len = plan.len();
    let mut out = Vec::new();
    plan.write(&mut out).unwrap();
    assert_eq!(
        out.len() as u64,
        len,
        "the planned length is the written one"
    );
    out
}

fn import(bytes: &[u8]) -> (tempfile::TempDir, Result<Manifest, ReadError<String>>) {
    let dir = tempfile::tempdir().unwrap();
    let result = read(bytes, dir.path(), |_| Ok(()));
    (dir, result)
}

fn invalid_message(result: Result<Manifest, ReadError<String>>) -> String {
    match result {
        Err(ReadError::Invalid(m)) => m,
        other => panic!("expected an invalid archive, got {other:?}"),
    }
}

#[test]
fn an_export_reads_back_whole_and_sparse() {
    let src = tempfile::tempdir().unwrap();
    // 40 extents: more than the header's four and one extension block's 21.
    let bytes = export(src.path(), 40);
    assert!(
        bytes.len() < 1 << 20,
        "only the data travels: {}",
        bytes.len()
    );
    let (dst, result) = import(&bytes);
    let m = result.unwrap();
    assert_eq!(m.vm, manifest(8).vm);
    let names: Vec<_> = m.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, [ROOTFS, "serial.log"], "a missing log is left out");
    assert_eq!(m.files[0].stored, 40 * 4096);
    let original = std::fs::read(src.path().join("disk.ext4")).unwrap();
    let copy = dst.path().join(ROOTFS);
    assert!(std::fs::read(&copy).unwrap() == original, "same bytes");
    let allocated = std::fs::metadata(&copy).unwrap().blocks() * 512;
    assert!(
        allocated < 1 << 20,
        "holes stay holes: {allocated} bytes allocated"
    );
    assert_eq!(
        std::fs::read(dst.path().join("serial.log")).unwrap(),
        b"boot ok\n"
    );
}

#[test]
fn gnu_tar_extracts_it_and_sha256sum_checks_it() {
    let src = tempfile::tempdir().unwrap();
    let bytes = export(src.path(), 30);
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("vm.tar");
    std::fs::write(&archive, &bytes).unwrap();
    let tar = Command::new("tar")
        .args(["-xSf", "vm.tar"])
        .current_dir(out.path())
        .output()
        .unwrap();
    assert!(
        tar.status.success(),
        "{}",
        String::from_utf8_lossy(&tar.stderr)
    );
    let sums = Command::new("sha256sum")
        .args(["-c", CHECKSUMS])
        .current_dir(out.path())
        .output()
        .unwrap();
    assert!(
        sums.status.success(),
        "{}",
        String::from_utf8_lossy(&sums.stdout)
    );
    assert_eq!(
        std::fs::read(out.path().join(ROOTFS)).unwrap(),
        std::fs::read(src.path().join("disk.ext4")).unwrap()
    );
}

#[test]
fn a_cut_short_archive_is_refused_wherever_it_ends() {
    let src = tempfile::tempdir().unwrap();
    let bytes = export(src.path(), 6);
    // Inside the manifest, the disk's header, its data, the log, the trailer; and at each
    // member boundary, where the cut looks like an archive's end.
    let cuts = [
        0,
        300,
        512,
        1536,
        2100,
        5000,
        20_000,
        bytes.len() - 1536,
        bytes.len() - 1100,
    ];
    for cut in cuts {
        let (_dir, result) = import(&bytes[..cut]);
        let message = invalid_message(result);
        assert!(
            message.contains("cut short")
                || message.contains("empty")
                || message.contains("ends before"),
            "cut at {cut}: {message}"
        );
    }
}

#[test]
fn a_flipped_byte_in_the_disk_fails_its_checksum() {
    let src = tempfile::tempdir().unwrap();
    let mut bytes = export(src.path(), 6);
    // The disk's member: its header, one extension block (six extents and the end are more
    // than the header's four), then the data, the first block of which is all 1s.
    let disk_header = (0..bytes.len())
        .step_by(512)
        .find(|&at| bytes[at..].starts_with(ROOTFS.as_bytes()))
        .unwrap();
    let data = disk_header + 1024;
    assert_eq!(bytes[data + 100], 1);
    bytes[data + 100] ^= 0x40;
    let (_dir, result) = import(&bytes);
    let message = invalid_message(result);
    assert!(message.contains("does not match its checksum"), "{message}");
}

#[test]
fn a_manifest_from_a_newer_hearth_is_refused_before_any_file() {
    let src = tempfile::tempdir().unwrap();
    let rootfs = disk(src.path(), 2);
    let mut m = manifest(8);
    m.version = VERSION + 1;
    let plan = Export::plan(
        &Sources {
            rootfs: &rootfs,
            logs: vec![],
        },
        m,
        0,
    )
    .unwrap();
    let mut bytes = Vec::new();
    plan.write(&mut bytes).unwrap();
    let (dir, result) = import(&bytes);
    let message = invalid_message(result);
    assert!(message.contains("version 2 is newer"), "{message}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn members_out_of_place_or_unknown_are_refused() {
    // Another tool's tar: the first member is not the manifest.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_cksum();
    b.append_data(&mut h, "notes.txt", &b"abc"[..]).unwrap();
    let bytes = b.into_inner().unwrap();
    let message = invalid_message(import(&bytes).1);
    assert!(message.contains("not a Hearth export"), "{message}");
    // Random bytes.
    let message = invalid_message(import(&[7u8; 4096]).1);
    assert!(message.contains("damaged"), "{message}");
}

#[test]
fn the_check_sees_the_manifest_before_anything_is_written() {
    let src = tempfile::tempdir().unwrap();
    let bytes = export(src.path(), 3);
    let dir = tempfile::tempdir().unwrap();
    let result = read(&bytes[..], dir.path(), |m| {
        Err(format!("name {} is taken", m.vm.name))
    });
    assert!(
        matches!(&result, Err(ReadError::Refused(m)) if m == "name web is taken"),
        "{result:?}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn manifests_that_disagree_with_themselves_are_refused() {
    let mut m = manifest(8);
    m.files = vec![ManifestFile {
        name: ROOTFS.into(),
        size: 4 << 20,
        stored: 0,
    }];
    let text = serde_json::to_vec(&m).unwrap();
    let message = invalid_message(parse_manifest::<String>(&text).map(|_| m.clone()));
    assert!(message.contains("vm.rootfs_mib"), "{message}");
    m.files = vec![ManifestFile {
        name: "etc-passwd".into(),
        size: 1,
        stored: 1,
    }];
    let text = serde_json::to_vec(&m).unwrap();
    let message = invalid_message(parse_manifest::<String>(&text).map(|_| m.clone()));
    assert!(message.contains("files must be"), "{message}");
    let message = invalid_message(
        parse_manifest::<String>(br#"{"format":"hearth-vm-export","version":0}"#).map(|_| m),
    );
    assert!(message.contains("version must be"), "{message}");
}

#[test]
fn zero_runs_become_holes_and_data_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let f = File::create(dir.path().join("f")).unwrap();
    let mut data = vec![0u8; 64 * 1024];
    data[5000] = 9;
    data[40_000..40_010].copy_from_slice(&[3; 10]);
    write_data(&f, &data, 8192).unwrap();
    f.set_len(8192 + data.len() as u64).unwrap();
    let back = std::fs::read(dir.path().join("f")).unwrap();
    assert_eq!(&back[8192..], &data[..]);
    assert!(f.metadata().unwrap().blocks() * 512 <= 3 * 4096);
}

/// A tmpfs of `kib` KiB, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn new(kib: u64) -> SmallFs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a small tmpfs and needs root; run the tests as root (make test does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_while_reading_is_a_write_error_naming_the_file() {
    let src = tempfile::tempdir().unwrap();
    // 120 blocks of 4 KiB: 480 KiB of data, more than the 256 KiB filesystem holds.
    let bytes = export(src.path(), 120);
    let small = SmallFs::new(256);
    let result = read(&bytes[..], small.dir.path(), |_| Ok::<(), String>(()));
    match result {
        Err(ReadError::Write { path, source }) => {
            assert!(path.ends_with(ROOTFS), "{path}");
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{source}");
        }
        other => panic!("expected a write error, got {other:?}"),
    }
}
