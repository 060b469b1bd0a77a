//! `make install` / `make uninstall` (scripts/install.sh), staged with DESTDIR: the files and
//! their modes, a configuration made once and kept, systemd units `systemd-analyze verify`
//! accepts without a warning, and an uninstall that keeps the configuration and data unless
//! PURGE=1. The build host's PID 1 is not systemd, so the units are checked offline (their
//! text, users and paths), never started; the live install (user, image, `systemctl`) was
//! checked by hand, with the two services' command lines run as their units say.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

fn script(stage: &Path, what: &str, purge: bool) -> std::process::Output {
    let bin_source = hearthd_bin().parent().unwrap().to_owned();
    let mut cmd = Command::new("bash");
    cmd.arg(workspace().join("scripts/install.sh"))
        .arg(what)
        .env("DESTDIR", stage)
        .env("PREFIX", "/usr/local")
        .env("BIN_SOURCE", bin_source)
        .env("AGENT", agent_bin())
        .env_remove("PURGE");
    if purge {
        cmd.env("PURGE", "1");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "install.sh {what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn install_stages_everything_keeps_the_config_and_uninstall_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let stage = dir.path().join("stage");
    script(&stage, "install", false);

    for bin in ["hearthd", "hearth", "hearth-helper"] {
        assert_eq!(mode(&stage.join("usr/local/bin").join(bin)), 0o755, "{bin}");
    }
    assert_eq!(
        mode(&stage.join("usr/local/lib/hearth/hearth-guest")),
        0o755
    );
    assert_eq!(mode(&stage.join("var/lib/hearth")), 0o750);
    let conf = stage.join("etc/hearth/hearth.toml");
    assert_eq!(
        mode(&conf),
        0o640,
        "the config may hold a database password"
    );
    let text = std::fs::read_to_string(&conf).unwrap();
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(
        parsed["network"]["helper_socket"].as_str(),
        Some("/run/hearth-helper/helper.sock"),
        "hearthd uses the helper service's socket"
    );
    assert_eq!(
        parsed["image"]["agent_path"].as_str(),
        Some("/usr/local/lib/hearth/hearth-guest")
    );
    assert_eq!(parsed["data_dir"].as_str(), Some("/var/lib/hearth"));

    // The units, with their binaries pointed at the staged ones, verify without a warning.
    let units = dir.path().join("units");
    std::fs::create_dir(&units).unwrap();
    let staged_bin = stage.join("usr/local/bin");
    for unit in ["hearth-helper.service", "hearthd.service"] {
        let text = std::fs::read_to_string(stage.join("etc/systemd/system").join(unit)).unwrap();
        assert!(
            !text.contains('@'),
            "{unit} has an unfilled placeholder:\n{text}"
        );
        assert_eq!(mode(&stage.join("etc/systemd/system").join(unit)), 0o644);
        let text = text.replace("/usr/local/bin", staged_bin.to_str().unwrap());
        std::fs::write(units.join(unit), text).unwrap();
    }
    let hearthd_unit = std::fs::read_to_string(units.join("hearthd.service")).unwrap();
    for line in [
        "User=hearth",
        "KillMode=process",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(
            hearthd_unit.lines().any(|l| l == line),
            "hearthd.service lacks {line}"
        );
    }
    let verify = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            "./hearth-helper.service",
            "./hearthd.service",
        ])
        .current_dir(&units)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );

    // An upgrade keeps the configuration as the operator left it.
    std::fs::write(&conf, format!("{text}\n# edited by the operator\n")).unwrap();
    let out = script(&stage, "install", false);
    assert!(String::from_utf8_lossy(&out.stdout).contains("keeping /etc/hearth/hearth.toml"));
    assert!(
        std::fs::read_to_string(&conf)
            .unwrap()
            .ends_with("# edited by the operator\n")
    );

    // Uninstall removes what install made, and keeps the configuration and the VMs' data.
    std::fs::write(stage.join("var/lib/hearth/hearth.db"), b"vm records").unwrap();
    script(&stage, "uninstall", false);
    for gone in [
        "usr/local/bin/hearthd",
        "usr/local/bin/hearth",
        "usr/local/bin/hearth-helper",
        "usr/local/lib/hearth",
        "etc/systemd/system/hearthd.service",
        "etc/systemd/system/hearth-helper.service",
    ] {
        assert!(!stage.join(gone).exists(), "{gone} is left");
    }
    assert!(conf.exists(), "the configuration is kept");
    assert!(
        stage.join("var/lib/hearth/hearth.db").exists(),
        "the data is kept"
    );
    script(&stage, "uninstall", true);
    assert!(
        !conf.exists() && !stage.join("var/lib/hearth").exists(),
        "PURGE=1 removes them"
    );
}
