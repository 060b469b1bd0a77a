//! Real test of upgrades (issue 11 item 8): the agent travels in the initramfs hearthd hands
//! QEMU at each boot, so a VM whose disk came from an older image boots the current agent,
//! whatever its disk holds (harness in `common`).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use sha2::{Digest, Sha256};

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn image_id(d: &Daemon) -> String {
    let health = json_of(&d.hearth_ok(&["--json", "health"]));
    health["image"].as_str().unwrap().to_owned()
}

/// The SHA-256 of the binary PID 1 runs in VM `name`, computed in the guest.
fn pid1_sha(d: &Daemon, name: &str) -> String {
    let out = d.hearth_ok(&["exec", name, "--", "sha256sum", "/proc/1/exe"]);
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// Runs a debugfs command file on an ext4 image (read-write) and returns its output.
fn debugfs(image: &Path, commands: &str, scratch: &Path) -> String {
    let file = scratch.join("debugfs.cmds");
    std::fs::write(&file, commands).unwrap();
    let out = run(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&file)
        .arg(image));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn a_vm_from_an_older_image_boots_the_current_agent() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = World::new();
    let current = image_id(w.d());
    let data = w.data();

    // An older hearthd: another agent binary (the same program with bytes appended, so its
    // hash and with it the image id differ) and an images directory of this test's own, whose
    // caches are links to the shared ones, so the shared cache is left as it is.
    w.daemon.take();
    let images = data.join("images");
    std::fs::remove_file(&images).unwrap();
    std::fs::create_dir(&images).unwrap();
    let cache = image_cache();
    for e in std::fs::read_dir(&cache).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "current" && !name.ends_with(".tmp") {
            std::os::unix::fs::symlink(e.path(), images.join(&name)).unwrap();
        }
    }
    let mut old_bytes = std::fs::read(agent_bin()).unwrap();
    old_bytes.extend_from_slice(b"\nan older hearth-guest\n");
    let old_agent = w.dir.path().join("hearth-guest-old");
    std::fs::write(&old_agent, &old_bytes).unwrap();
    std::fs::set_permissions(
        &old_agent,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    w.daemon = Some(Daemon::start_with_env(
        &data,
        &[("HEARTH_IMAGE_AGENT_PATH", old_agent.to_str().unwrap())],
    ));
    let older = image_id(w.d());
    assert_ne!(older, current, "another agent makes another image");
    // Only an initramfs was built: the image's root filesystem is the shared, cached one.
    assert!(images.join(&older).is_dir());
    assert_eq!(
        std::fs::read_link(images.join(&older).join("rootfs.ext4")).unwrap(),
        std::fs::read_link(cache.join(&current).join("rootfs.ext4")).unwrap(),
        "a new agent must not cost a new root filesystem"
    );

    let vm = json_of(&w.d().hearth_ok(&["--json", "vm", "new", "upgraded"]));
    let id = vm["id"].as_str().unwrap().to_owned();
    w.vm_ids.push(id.clone());
    assert_eq!(vm["image"], older.as_str());
    assert_eq!(pid1_sha(w.d(), "upgraded"), sha256_hex(&old_bytes));
    let absent = w.d().hearth(&[
        "exec",
        "upgraded",
        "--",
        "test",
        "-e",
        "/usr/sbin/hearth-guest",
    ]);
    assert_eq!(
        absent.status.code(),
        Some(1),
        "the root filesystem holds no agent"
    );
    w.d().hearth_ok(&["vm", "stop", "upgraded"]);

    // What an older image's disk, or the guest's own root user, may leave behind: an agent on
    // the disk that cannot work, and /run replaced by a symlink (a mount onto it would follow).
    let disk = data.join("vms").join(&id).join("rootfs.ext4");
    let fake = w.dir.path().join("fake-agent");
    std::fs::write(&fake, "#!/bin/sh\necho the disk agent ran >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Whatever files the image's packages left in /run go first, so /run can be removed.
    let listing = debugfs(&disk, "ls -p /run\n", w.dir.path());
    let leftovers: String = listing
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split('/').collect();
            // `/inode/mode/uid/gid/name/size/`: regular files have a mode starting with 10.
            (fields.len() > 5 && fields[2].starts_with("10"))
                .then(|| format!("rm /run/{}\n", fields[5]))
        })
        .collect();
    debugfs(
        &disk,
        &format!(
            "rm /usr/sbin/hearth-guest\nwrite {} /usr/sbin/hearth-guest\n\
             {leftovers}rmdir /run/lock\nrmdir /run\nsymlink /run /usr/sbin\n",
            fake.display()
        ),
        w.dir.path(),
    );
    let check = debugfs(
        &disk,
        "stat /run\ncat /usr/sbin/hearth-guest\n",
        w.dir.path(),
    );
    assert!(check.contains("Type: symlink"), "{check}");
    assert!(check.contains("the disk agent ran"), "{check}");

    // The current hearthd starts it: it boots the current image and runs the current agent,
    // from the initramfs's copy on /run.
    w.daemon.take();
    w.daemon = Some(Daemon::start(&data));
    // Until its own build is checked, a starting hearthd offers the image it had last.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while image_id(w.d()) != current {
        assert!(
            std::time::Instant::now() < deadline,
            "the current image never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        images.join(&older).is_dir(),
        "the older image is still there"
    );
    w.d().hearth_ok(&["vm", "start", "upgraded"]);
    assert_eq!(
        w.d()
            .hearth_ok(&["exec", "upgraded", "--", "echo", "exec works"]),
        "exec works\n"
    );
    assert_eq!(
        w.d().hearth_ok(&[
            "exec",
            "upgraded",
            "--",
            "sh",
            "-c",
            "tr '\\0' '\\n' </proc/1/cmdline"
        ]),
        "/run/hearth/hearth-guest\n",
        "PID 1 was started from the initramfs's copy"
    );
    assert_eq!(
        w.d()
            .hearth_ok(&["exec", "upgraded", "--", "readlink", "/proc/1/exe"]),
        "/run/hearth/hearth-guest\n"
    );
    assert_eq!(
        pid1_sha(w.d(), "upgraded"),
        sha256_hex(&std::fs::read(agent_bin()).unwrap()),
        "PID 1 is the current agent"
    );
    assert_eq!(
        w.d()
            .hearth_ok(&["exec", "upgraded", "--", "cat", "/usr/sbin/hearth-guest"]),
        std::fs::read_to_string(&fake).unwrap(),
        "the disk's own agent is still there, and was not run"
    );
    let serial = std::fs::read_to_string(data.join("vms").join(&id).join("serial.log")).unwrap();
    assert!(
        serial.contains("hearth-init: /run on the root disk is not a directory, making it one"),
        "{serial}"
    );
    assert!(!serial.contains("the disk agent ran"), "{serial}");
    w.d()
        .hearth_ok(&["exec", "upgraded", "--", "test", "-d", "/run/hearth"]);

    // The image the disk came from is gone altogether: the VM still starts.
    w.d().hearth_ok(&["vm", "stop", "upgraded"]);
    std::fs::remove_dir_all(images.join(&older)).unwrap();
    w.d().hearth_ok(&["vm", "start", "upgraded"]);
    assert_eq!(
        w.d()
            .hearth_ok(&["exec", "upgraded", "--", "echo", "still"]),
        "still\n"
    );

    w.d().hearth_ok(&["vm", "delete", "upgraded"]);
    w.assert_gone(&id);
}
