//! The real `hearthd` refuses to start on a master key file it must not use, naming the path
//! and the rule, before it touches a VMM or the network; and makes the file at its first start.
//! No VM, no root.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `hearthd` on `data` until it exits (it must, within a minute) or, when `stop_when`
/// appears in its log, stops it with SIGTERM.
fn hearthd(data: &Path, stop_when: Option<&str>) -> Output {
    let log = data.with_extension("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearthd"))
        .env("HEARTH_DATA_DIR", data)
        .env("HEARTH_LISTEN", "127.0.0.1:0")
        .env("HEARTH_SSH_LISTEN", "")
        .env("HEARTH_NETWORK_MODE", "off")
        .env("HEARTH_QEMU_BINARY", "/nonexistent/qemu")
        .env("HEARTH_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(stop) = stop_when
            && text.contains(stop)
        {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            break child.wait().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hearthd did not end: {text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: Vec::new(),
        stderr: std::fs::read(&log).unwrap(),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn hearthd_makes_its_master_key_and_refuses_one_it_must_not_use() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = data.join("secrets/master.key");
    let shown = key.display();

    // The first start makes it (this hearthd then stops at its VMM: /nonexistent/qemu).
    let out = hearthd(&data, None);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("made the master key of secrets"), "{log}");
    assert!(log.contains("cannot start /nonexistent/qemu"), "{log}");
    assert_eq!(std::fs::read(&key).unwrap().len(), 32);
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(key.parent().unwrap()), 0o700);
    let made = std::fs::read(&key).unwrap();
    // A later start keeps it.
    hearthd(&data, None);
    assert_eq!(std::fs::read(&key).unwrap(), made);

    for (prepare, says) in [
        (
            &(|k: &Path| std::fs::set_permissions(k, std::fs::Permissions::from_mode(0o644)))
                as &dyn Fn(&Path) -> std::io::Result<()>,
            format!(
                "error: master key file {shown} has mode 0644: group and others must have no access to it (chmod 600 {shown})"
            ),
        ),
        (
            &|k: &Path| std::fs::write(k, b"short"),
            format!(
                "error: master key file {shown} is 5 bytes: a master key is exactly 32 bytes (256 bits)"
            ),
        ),
        (
            &|k: &Path| {
                std::fs::remove_file(k)?;
                std::fs::create_dir(k)
            },
            format!("error: master key file {shown} is not a regular file"),
        ),
    ] {
        prepare(&key).unwrap();
        let out = hearthd(&data, None);
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{log}");
        assert!(log.contains(&says), "want {says:?} in:\n{log}");
        assert!(
            !log.contains("/nonexistent/qemu"),
            "hearthd went on past the key file to its VMM:\n{log}"
        );
        // Put the good key back.
        if key.is_dir() {
            std::fs::remove_dir(&key).unwrap();
        }
        std::fs::write(&key, &made).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}
