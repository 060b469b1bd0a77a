//! Real tests of the VM lifecycle, restarts and bad inputs (harness in `common`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

#[test]
fn vm_lifecycle_exec_files_and_cleanup() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = World::new();
    // 2 GiB exactly: the size that corrupts guests under Debian's default microvm firmware.
    let vm = json_of(
        &w.d()
            .hearth_ok(&["--json", "vm", "new", "e2e-a", "--ram", "2G"]),
    );
    let id = vm["id"].as_str().unwrap().to_owned();
    w.vm_ids.push(id.clone());
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["memory_mib"], 2048);

    let out = w.d().hearth_ok(&["exec", "e2e-a", "--", "uname", "-a"]);
    assert!(out.starts_with("Linux e2e-a "), "{out}");
    let meminfo = w
        .d()
        .hearth_ok(&["exec", "e2e-a", "--", "grep", "MemTotal", "/proc/meminfo"]);
    let kib: u64 = meminfo.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(kib > 1900 * 1024, "guest sees {kib} KiB");
    let three = w.d().hearth(&[
        "exec",
        "e2e-a",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(three.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&three.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&three.stderr), "err\n");

    let missing = w.d().hearth(&["exec", "e2e-a", "--", "no-such-program"]);
    assert_eq!(
        missing.status.code(),
        Some(127),
        "a missing program exits 127, as in a shell"
    );
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no-such-program"));

    // 10 MiB up and down, byte for byte.
    let local = w.dir.path().join("blob");
    let blob = pseudo_random(10 << 20);
    std::fs::write(&local, &blob).unwrap();
    w.d()
        .hearth_ok(&["cp", local.to_str().unwrap(), "e2e-a:/root/blob"]);
    w.assert_guest_file("e2e-a:/root/blob", &blob, "downloaded bytes differ");

    // Interactive paths: stdin over the WebSocket, a PTY, streamed output, the serial log.
    let echoed = w.d().hearth_with_stdin(
        &["exec", "-i", "e2e-a", "--", "tr", "a-z", "A-Z"],
        b"shout\n",
    );
    assert_eq!(echoed, "SHOUT\n");
    let tty = w.d().hearth_ok(&["exec", "-t", "e2e-a", "--", "tty"]);
    assert!(tty.starts_with("/dev/pts/"), "{tty:?}");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(streams("e2e-a"));

    // The agent dies mid-exec (PID 1 restarts it): open execs fail at once instead of hanging,
    // and the next exec works.
    let mut sleeper = hearth_cmd(&[
        "exec",
        "e2e-a",
        "--",
        "sh",
        "-c",
        "touch /run/sleeper; exec sleep 120",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !w
        .d()
        .hearth(&["exec", "e2e-a", "--", "test", "-e", "/run/sleeper"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the sleeping exec never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let killer = w
        .d()
        .hearth(&["exec", "e2e-a", "--", "sh", "-c", "kill -9 $PPID; sleep 5"]);
    assert_eq!(killer.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&killer.stderr).contains("agent restarted"),
        "{}",
        String::from_utf8_lossy(&killer.stderr)
    );
    let started = Instant::now();
    let status = sleeper.wait().unwrap();
    assert_eq!(status.code(), Some(125));
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(
        w.d().hearth_ok(&["exec", "e2e-a", "--", "echo", "back"]),
        "back\n"
    );

    // Start on a running VM is a clear 409, seen through the real API.
    let start = w.d().hearth(&["--json", "vm", "start", "e2e-a"]);
    assert_eq!(start.status.code(), Some(4));
    let body = json_of(&String::from_utf8_lossy(&start.stdout));
    assert_eq!(body["error"], "invalid_state");

    // Pause and resume. A busy loop in the guest makes a running QEMU burn a core, so the CPU
    // bound of the paused QEMU means something; it is measured running again after the resume.
    let qemu_pid = json_of(&w.d().hearth_ok(&["--json", "vm", "inspect", "e2e-a"]))["pid"]
        .as_u64()
        .unwrap();
    let mut spinner = hearth_cmd(&[
        "exec",
        "e2e-a",
        "--",
        "timeout",
        "8",
        "sh",
        "-c",
        "while :; do :; done",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cpu_over(qemu_pid, Duration::from_millis(500)) < Duration::from_millis(200) {
        assert!(Instant::now() < deadline, "the guest's busy loop never ran");
    }
    let paused = json_of(&w.d().hearth_ok(&["--json", "vm", "pause", "e2e-a"]));
    assert_eq!(paused["state"], "paused", "{paused}");
    let detail = json_of(&w.d().hearth_ok(&["--json", "vm", "inspect", "e2e-a"]));
    let last = detail["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (&last["kind"], &last["message"]),
        (
            &json!("paused"),
            &json!("vCPUs stopped; the VMM reports the guest paused")
        ),
        "the state comes from QEMU's query-status: {last}"
    );
    let listed = w.d().hearth_ok(&["vm", "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.contains("e2e-a") && l.contains("paused")),
        "{listed}"
    );
    let paused_cpu = cpu_over(qemu_pid, Duration::from_secs(2));
    assert!(
        paused_cpu < Duration::from_millis(400),
        "a paused QEMU used {paused_cpu:?} of CPU in 2 s"
    );
    let refused = w.d().hearth(&["--json", "exec", "e2e-a", "--", "true"]);
    assert_eq!(
        refused.status.code(),
        Some(125),
        "exec on a paused VM fails"
    );
    let refused = String::from_utf8_lossy(&refused.stderr).into_owned()
        + &String::from_utf8_lossy(&refused.stdout);
    assert!(
        refused.contains("invalid_state") && refused.contains("is paused"),
        "{refused}"
    );
    w.d().hearth_ok(&["vm", "logs", "e2e-a"]);
    let resumed = json_of(&w.d().hearth_ok(&["--json", "vm", "resume", "e2e-a"]));
    assert_eq!(resumed["state"], "running", "{resumed}");
    let running_cpu = cpu_over(qemu_pid, Duration::from_secs(1));
    assert!(
        running_cpu > Duration::from_millis(200),
        "the busy loop goes on after the resume: {running_cpu:?} of CPU in 1 s"
    );
    eprintln!("QEMU CPU time: {paused_cpu:?} in 2 s paused, {running_cpu:?} in 1 s resumed");
    let spun = spinner.wait().unwrap();
    assert_eq!(spun.code(), Some(124), "the busy loop ran to its timeout");
    assert_eq!(
        w.d().hearth_ok(&["exec", "e2e-a", "--", "echo", "awake"]),
        "awake\n"
    );

    // Stop, start: the file survived.
    let stopped = json_of(&w.d().hearth_ok(&["--json", "vm", "stop", "e2e-a"]));
    assert_eq!(stopped["state"], "stopped");
    assert!(stopped["pid"].is_null());
    w.assert_gone_runtime(&id);
    // Resized while stopped: the guest sees its new shape; a smaller disk is refused.
    let mib = stopped["rootfs_mib"].as_u64().unwrap();
    let shrink = w.d().hearth(&[
        "--json",
        "vm",
        "resize",
        "e2e-a",
        "--rootfs-size",
        &(mib - 1).to_string(),
    ]);
    assert!(!shrink.status.success());
    let body = json_of(&String::from_utf8_lossy(&shrink.stdout));
    assert_eq!(body["error"], "invalid_rootfs_size", "{body}");
    let grown = json_of(&w.d().hearth_ok(&[
        "--json",
        "vm",
        "resize",
        "e2e-a",
        "--cpus",
        "2",
        "--ram",
        "512M",
        "--rootfs-size",
        &(mib + 1024).to_string(),
    ]));
    assert_eq!(grown["rootfs_mib"], mib + 1024, "{grown}");
    w.d().hearth_ok(&["vm", "start", "e2e-a"]);
    w.assert_guest_file("e2e-a:/root/blob", &blob, "file changed across stop/start");
    let shape = w.d().hearth_ok(&[
        "exec",
        "e2e-a",
        "--",
        "sh",
        "-c",
        "nproc; sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo; df -BM --output=size / | tail -n 1",
    ]);
    let numbers: Vec<u64> = shape
        .split_whitespace()
        .map(|n| n.trim_end_matches('M').parse().unwrap())
        .collect();
    assert_eq!(numbers[0], 2, "nproc: {shape}");
    assert!(
        (400_000..=524_288).contains(&numbers[1]),
        "MemTotal kB: {shape}"
    );
    assert!(
        numbers[2] > mib + 512,
        "df MiB of a {} MiB disk: {shape}",
        mib + 1024
    );

    // Backup and restore: the marker of the backup's moment comes back, across boots.
    let marker = |text: &str| {
        let script = format!("echo {text} > /root/marker && sync");
        w.d()
            .hearth_ok(&["exec", "e2e-a", "--", "sh", "-c", &script]);
    };
    marker("before");
    w.d().hearth_ok(&["vm", "stop", "e2e-a"]);
    let backup = json_of(&w.d().hearth_ok(&["--json", "backup", "create", "e2e-a"]));
    let backup_id = backup["id"].as_str().unwrap().to_owned();
    let listed = json_of(&w.d().hearth_ok(&["--json", "backup", "list", "e2e-a"]));
    assert_eq!(listed[0]["id"], backup_id.as_str(), "{listed}");
    w.d().hearth_ok(&["vm", "start", "e2e-a"]);
    marker("after");
    w.d().hearth_ok(&["vm", "stop", "e2e-a"]);
    w.d().hearth_ok(&["restore", "e2e-a", &backup_id]);
    w.d().hearth_ok(&["vm", "start", "e2e-a"]);
    assert_eq!(
        w.d()
            .hearth_ok(&["exec", "e2e-a", "--", "cat", "/root/marker"]),
        "before\n"
    );

    // A volume: attached to the stopped VM, mounted in the guest at its path, written there,
    // detached, and attached to a second VM at create, which reads the same data.
    let volume = json_of(
        &w.d()
            .hearth_ok(&["--json", "volume", "create", "e2e-vol", "--size", "128M"]),
    );
    let volume_file = w
        .data()
        .join("volumes")
        .join(format!("{}.ext4", volume["id"].as_str().unwrap()));
    w.d().hearth_ok(&["vm", "stop", "e2e-a"]);
    w.d()
        .hearth_ok(&["volume", "attach", "e2e-a", "e2e-vol", "--path", "/mnt/vol"]);
    w.d().hearth_ok(&["vm", "start", "e2e-a"]);
    let mounts = w
        .d()
        .hearth_ok(&["exec", "e2e-a", "--", "cat", "/proc/mounts"]);
    assert!(
        mounts
            .lines()
            .any(|l| l.starts_with("/dev/vd") && l.contains(" /mnt/vol ext4 rw")),
        "{mounts}"
    );
    assert!(
        mounts.lines().any(|l| l.starts_with("/dev/vda / ext4")),
        "the root disk is still vda: {mounts}"
    );
    assert_eq!(
        w.d()
            .hearth_ok(&["exec", "e2e-a", "--", "cat", "/root/marker"]),
        "before\n",
        "the root disk is the VM's own"
    );
    w.d().hearth_ok(&[
        "exec",
        "e2e-a",
        "--",
        "sh",
        "-c",
        "echo written-by-a > /mnt/vol/marker && sync",
    ]);
    w.d().hearth_ok(&["vm", "stop", "e2e-a"]);
    w.d().hearth_ok(&["volume", "detach", "e2e-a", "e2e-vol"]);
    let b = json_of(&w.d().hearth_ok(&[
        "--json",
        "vm",
        "new",
        "e2e-b",
        "--ram",
        "512M",
        "--volume",
        "e2e-vol:/data",
    ]));
    let b_id = b["id"].as_str().unwrap().to_owned();
    w.vm_ids.push(b_id.clone());
    assert_eq!(b["volumes"][0]["path"], "/data", "{b}");
    assert_eq!(
        w.d()
            .hearth_ok(&["exec", "e2e-b", "--", "cat", "/data/marker"]),
        "written-by-a\n"
    );
    let df = w
        .d()
        .hearth_ok(&["exec", "e2e-b", "--", "df", "-m", "/data"]);
    assert!(df.lines().last().unwrap().ends_with(" /data"), "{df}");

    let restarted = json_of(&w.d().hearth_ok(&["--json", "vm", "restart", "e2e-a"]));

    assert_eq!(restarted["state"], "running");
    assert_eq!(
        w.d()
            .hearth_ok(&["exec", "e2e-a", "--", "cat", "/proc/sys/kernel/hostname"])
            .trim(),
        "e2e-a"
    );

    let logs = w.d().hearth_ok(&["vm", "logs", "e2e-a"]);
    assert!(
        logs.contains("hearth-guest: shutdown"),
        "serial log: {logs}"
    );
    let detail = json_of(&w.d().hearth_ok(&["--json", "vm", "inspect", "e2e-a"]));
    let kinds: Vec<&str> = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.starts_with(&[
            "created",
            "created_disk",
            "start_requested",
            "vmm_launched",
            "running"
        ]),
        "{kinds:?}"
    );
    assert!(kinds.contains(&"stopped"), "{kinds:?}");

    // Export, delete, import: the same name and data (the disk's checksum), new paths.
    w.d().hearth_ok(&["vm", "stop", "e2e-a"]);
    let disk_sum = sha256_of(&w.data().join("vms").join(&id).join("rootfs.ext4"));
    let archive = w.data().join("e2e-a.tar");
    let archive_arg = archive.to_str().unwrap();
    w.d().hearth_ok(&["export", "e2e-a", "-o", archive_arg]);
    w.d().hearth_ok(&["vm", "delete", "e2e-a"]);
    let gone = w.d().hearth(&["vm", "inspect", "e2e-a"]);
    assert_eq!(gone.status.code(), Some(3));
    w.assert_gone(&id);

    // The volume outlives the VMs it was attached to: the first one's delete leaves it with
    // the second, the second's (while attached) leaves it detached, its data whole.
    let listed = json_of(&w.d().hearth_ok(&["--json", "volume", "list"]));
    assert_eq!(
        (&listed[0]["name"], &listed[0]["vm"]),
        (&json!("e2e-vol"), &json!("e2e-b")),
        "{listed}"
    );
    w.d().hearth_ok(&["vm", "delete", "e2e-b"]);
    w.assert_gone(&b_id);
    let listed = json_of(&w.d().hearth_ok(&["--json", "volume", "list"]));
    assert_eq!(
        (
            &listed[0]["vm"],
            &listed[0]["path"],
            &listed[0]["formatted"]
        ),
        (&Value::Null, &Value::Null, &json!(true)),
        "{listed}"
    );
    let out = run(Command::new("debugfs")
        .args(["-R", "cat /marker"])
        .arg(&volume_file));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "written-by-a\n");
    w.d().hearth_ok(&["volume", "delete", "e2e-vol"]);
    assert!(!volume_file.exists());

    let imported = json_of(&w.d().hearth_ok(&["--json", "import", archive_arg]));
    assert_eq!(
        (imported["name"].as_str(), imported["state"].as_str()),
        (Some("e2e-a"), Some("stopped")),
        "{imported}"
    );
    let new_id = imported["id"].as_str().unwrap().to_owned();
    assert_ne!(new_id, id);
    w.vm_ids.push(new_id.clone());
    assert_eq!(
        sha256_of(&w.data().join("vms").join(&new_id).join("rootfs.ext4")),
        disk_sum
    );
    let again = w.d().hearth(&["import", archive_arg]);
    assert_eq!(again.status.code(), Some(4), "the name is taken");
    w.d().hearth_ok(&["vm", "start", "e2e-a"]);
    assert_eq!(
        w.d()
            .hearth_ok(&["exec", "e2e-a", "--", "cat", "/root/marker"]),
        "before\n"
    );

    w.d().hearth_ok(&["vm", "delete", "e2e-a"]);
    w.assert_gone(&new_id);
}

/// The CPU time (user + system, `/proc/<pid>/stat`) process `pid` used over the next `span`.
fn cpu_over(pid: u64, span: Duration) -> Duration {
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after "pid (comm)": state is the 1st, utime the 12th, stime the 13th.
        let fields: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|f| f.parse().unwrap())
            .collect();
        fields[0] + fields[1]
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .and_then(|hz| u64::try_from(hz).ok())
        .unwrap_or(100);
    let before = ticks();
    std::thread::sleep(span);
    Duration::from_millis((ticks() - before) * 1000 / hz)
}

fn sha256_of(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// The NDJSON exec stream and a followed serial log, over raw HTTP.
async fn streams(vm: &str) {
    let http = reqwest::Client::new();
    let body = json!({"command": ["sh", "-c", "echo a; echo b >&2; exit 5"]});
    let url = format!("/v1/vms/{vm}/exec/stream");
    let r = http
        .post(format!("{URL}{url}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, ct) = contract::status_and_type(&r);
    let text = r.text().await.unwrap();
    contract::assert_conforms(
        "exec stream",
        "POST",
        &url,
        Some(&body),
        status,
        ct.as_deref(),
        text.as_bytes(),
    );
    let lines: Vec<Value> = text.lines().map(json_of).collect();
    assert!(
        lines.contains(&json!({"type": "stdout", "data": "a\n"})),
        "{text}"
    );
    assert!(
        lines.contains(&json!({"type": "stderr", "data": "b\n"})),
        "{text}"
    );
    assert_eq!(
        lines.last().unwrap(),
        &json!({"type": "exit", "exit_code": 5, "signal": null, "timed_out": false})
    );

    // Follow the serial log, then write to the guest console: the line arrives on the stream.
    let url = format!("/v1/vms/{vm}/logs?follow=true&tail=0");
    let mut follow = http.get(format!("{URL}{url}")).send().await.unwrap();
    let (status, ct) = contract::status_and_type(&follow);
    contract::assert_conforms("follow logs", "GET", &url, None, status, ct.as_deref(), b"");
    let marker = "hearth-e2e-marker-7391";
    let exec = json!({"command": ["sh", "-c", format!("echo {marker} > /dev/console")]});
    let r = http
        .post(format!("{URL}/v1/vms/{vm}/exec"))
        .json(&exec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (status, ct) = contract::status_and_type(&r);
    let answer = r.bytes().await.unwrap();
    let url = format!("/v1/vms/{vm}/exec");
    contract::assert_conforms(
        "exec",
        "POST",
        &url,
        Some(&exec),
        status,
        ct.as_deref(),
        &answer,
    );
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = follow.chunk().await.unwrap() {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains(marker) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "followed log: {seen:?}");
}

#[test]
fn vms_survive_hearthd_kill9() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = World::new();
    let vm = json_of(&w.d().hearth_ok(&["--json", "vm", "new", "e2e-b"]));
    let id = vm["id"].as_str().unwrap().to_owned();
    w.vm_ids.push(id.clone());
    let pid = vm["pid"].as_u64().unwrap();

    w.restart_after_kill9();

    let list = json_of(&w.d().hearth_ok(&["--json", "vm", "list"]));
    assert_eq!(list[0]["name"], "e2e-b");
    assert_eq!(list[0]["state"], "running");
    assert_eq!(list[0]["pid"].as_u64(), Some(pid), "the same QEMU process");
    let out = w
        .d()
        .hearth_ok(&["exec", "e2e-b", "--", "echo", "still here"]);
    assert_eq!(out, "still here\n");
    let detail = json_of(&w.d().hearth_ok(&["--json", "vm", "inspect", "e2e-b"]));
    assert!(
        detail["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "readopted"),
        "{detail}"
    );

    // A guest that powers itself off is noticed by the re-adopted VM's monitor (via its pidfd).
    let _ = w.d().hearth(&[
        "exec",
        "e2e-b",
        "--",
        "sh",
        "-c",
        "echo o > /proc/sysrq-trigger",
    ]);
    nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        None,
    )
    .expect("reap QEMU");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let detail = json_of(&w.d().hearth_ok(&["--json", "vm", "inspect", "e2e-b"]));
        if detail["state"] == "stopped" {
            let last = detail["events"].as_array().unwrap().last().unwrap().clone();
            assert_eq!(last["kind"], "exited", "{detail}");
            break;
        }
        assert!(Instant::now() < deadline, "VM not marked stopped: {detail}");
        std::thread::sleep(Duration::from_millis(100));
    }
    w.assert_gone_runtime(&id);
    let vm = json_of(&w.d().hearth_ok(&["--json", "vm", "start", "e2e-b"]));
    let pid = vm["pid"].as_u64().unwrap();

    // A VM whose QEMU died while hearthd was down is marked stopped at the next start.
    w.daemon.as_mut().unwrap().kill9();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The killed hearthd's QEMU is now this test's child (subreaper): collect it.
    nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        None,
    )
    .expect("reap QEMU");
    w.daemon = Some(Daemon::start(&w.data()));
    let detail = json_of(&w.d().hearth_ok(&["--json", "vm", "inspect", "e2e-b"]));
    assert_eq!(detail["state"], "stopped");

    // hearthd killed in the middle of restores and backups: the disk is the old one or the new
    // one, whole (its filesystem checks clean), and after the next start nothing half-made is
    // left: every backup file is a listed backup.
    let backup = json_of(&w.d().hearth_ok(&["--json", "backup", "create", "e2e-b"]));
    let backup_id = backup["id"].as_str().unwrap().to_owned();
    let disk = w.data().join("vms").join(&id).join("rootfs.ext4");
    let backups = w.data().join("backups").join(&id);
    for delay_ms in [0, 30, 100, 250] {
        for args in [
            &["restore", "e2e-b", backup_id.as_str()][..],
            &["backup", "create", "e2e-b"],
        ] {
            let mut op = hearth_cmd(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(delay_ms));
            w.restart_after_kill9();
            let _ = op.wait();
            let fsck = Command::new("e2fsck")
                .args(["-f", "-n"])
                .arg(&disk)
                .output()
                .unwrap();
            assert!(
                fsck.status.success(),
                "{args:?} killed after {delay_ms} ms left a broken disk: {}",
                String::from_utf8_lossy(&fsck.stdout)
            );
            assert!(!disk.with_file_name("rootfs.ext4.restore").exists());
            let listed = json_of(&w.d().hearth_ok(&["--json", "backup", "list", "e2e-b"]));
            let mut ids: Vec<String> = listed
                .as_array()
                .unwrap()
                .iter()
                .map(|b| format!("{}.ext4", b["id"].as_str().unwrap()))
                .collect();
            ids.sort();
            let mut files: Vec<String> = std::fs::read_dir(&backups)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            assert_eq!(files, ids, "after {args:?} killed at {delay_ms} ms");
        }
    }
    w.d().hearth_ok(&["vm", "start", "e2e-b"]);
    assert_eq!(
        w.d().hearth_ok(&["exec", "e2e-b", "--", "echo", "whole"]),
        "whole\n"
    );
    w.d().hearth_ok(&["vm", "stop", "e2e-b"]);
    let archive = w.data().join("e2e-b.tar");
    let archive_arg = archive.to_str().unwrap().to_owned();
    w.d().hearth_ok(&["export", "e2e-b", "-o", &archive_arg]);
    let disk_sum = sha256_of(&disk);
    w.d().hearth_ok(&["vm", "delete", "e2e-b"]);
    assert!(!backups.exists(), "the VM's backups went with it");
    w.assert_gone(&id);

    // hearthd killed in the middle of imports: afterwards the VM is either there, stopped,
    // with the whole disk, or not there at all; nothing half-made is left either way.
    let imports = w.data().join("imports");
    for delay_ms in [0, 60, 200, 600] {
        let mut op = hearth_cmd(&["import", &archive_arg])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        w.restart_after_kill9();
        let _ = op.wait();
        assert_eq!(
            std::fs::read_dir(&imports).map_or(0, |d| d.count()),
            0,
            "an import killed at {delay_ms} ms left staged files"
        );
        let list = json_of(&w.d().hearth_ok(&["--json", "vm", "list"]));
        let dirs = std::fs::read_dir(w.data().join("vms")).map_or(0, |d| d.count());
        match list.as_array().unwrap().as_slice() {
            [] => assert_eq!(dirs, 0, "no VM, no VM directory ({delay_ms} ms)"),
            [vm] => {
                assert_eq!(
                    (vm["name"].as_str(), vm["state"].as_str()),
                    (Some("e2e-b"), Some("stopped"))
                );
                let vm_id = vm["id"].as_str().unwrap();
                let imported = w.data().join("vms").join(vm_id).join("rootfs.ext4");
                assert_eq!(
                    sha256_of(&imported),
                    disk_sum,
                    "a whole disk ({delay_ms} ms)"
                );
                w.d().hearth_ok(&["vm", "delete", "e2e-b"]);
            }
            more => panic!("one import made {} VMs", more.len()),
        }
    }
    let imported = json_of(&w.d().hearth_ok(&["--json", "import", &archive_arg]));
    let id = imported["id"].as_str().unwrap().to_owned();
    w.vm_ids.push(id.clone());
    w.d().hearth_ok(&["vm", "start", "e2e-b"]);
    assert_eq!(
        w.d().hearth_ok(&["exec", "e2e-b", "--", "echo", "whole"]),
        "whole\n"
    );
    w.d().hearth_ok(&["vm", "delete", "e2e-b"]);
    w.assert_gone(&id);

    // hearthd killed while a guest boots: the next hearthd adopts the booting VM and finishes
    // the start.
    let mut create = hearth_cmd(&["vm", "new", "e2e-c"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let out = w.d().hearth(&["--json", "vm", "inspect", "e2e-c"]);
        if out.status.success() {
            let d = json_of(&String::from_utf8_lossy(&out.stdout));
            let launched = d["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "vmm_launched");
            if d["state"] == "starting" && launched {
                break d["id"].as_str().unwrap().to_owned();
            }
            assert_ne!(
                d["state"], "running",
                "the boot finished before the test could interrupt it"
            );
        }
        assert!(Instant::now() < deadline, "e2e-c never reached starting");
        std::thread::sleep(Duration::from_millis(20));
    };
    w.vm_ids.push(id.clone());
    w.restart_after_kill9();
    let _ = create.wait();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = json_of(&w.d().hearth_ok(&["--json", "vm", "inspect", "e2e-c"]));
        if d["state"] == "running" {
            break;
        }
        assert_eq!(d["state"], "starting", "{d}");
        assert!(
            Instant::now() < deadline,
            "interrupted boot never finished: {d}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        w.d().hearth_ok(&["exec", "e2e-c", "--", "echo", "adopted"]),
        "adopted\n"
    );
    w.d().hearth_ok(&["vm", "delete", "e2e-c"]);
    w.assert_gone(&id);
}

#[test]
fn bad_inputs_through_the_real_api_create_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The namespace is entered before the runtime makes any socket on this thread.
    let w = World::new();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(bad_inputs(&w));
    w.d().hearth_ok(&["vm", "delete", "taken"]);
}

async fn bad_inputs(w: &World) {
    let http = reqwest::Client::new();
    let create = |body: Value| {
        let http = http.clone();
        async move {
            let r = http
                .post(format!("{URL}/v1/vms"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let (status, ct) = contract::status_and_type(&r);
            let answer = r.bytes().await.unwrap();
            // Every body here keeps the schema but breaks a rule only the server knows
            // (cpus 3, ram 64M, a taken name) except the bad name, which breaks its pattern.
            if body["name"] == "Not_Valid" {
                contract::assert_answer_conforms(
                    "create",
                    "POST",
                    "/v1/vms",
                    status,
                    ct.as_deref(),
                    &answer,
                );
            } else {
                contract::assert_conforms(
                    "create",
                    "POST",
                    "/v1/vms",
                    Some(&body),
                    status,
                    ct.as_deref(),
                    &answer,
                );
            }
            (
                status,
                serde_json::from_slice::<Value>(&answer).unwrap_or(Value::Null),
            )
        }
    };
    w.d().hearth_ok(&["vm", "new", "taken", "--no-start"]);
    for (body, status, code) in [
        (json!({"name": "Not_Valid"}), 400, "invalid_name"),
        (json!({"name": "odd", "cpus": 3}), 400, "invalid_cpus"),
        (json!({"name": "tiny", "ram": "64M"}), 400, "invalid_ram"),
        (json!({"name": "taken"}), 409, "vm_name_taken"),
        // Admission control: refused at once, before anything is made.
        (
            json!({"name": "huge", "ram": "1T"}),
            409,
            "insufficient_capacity",
        ),
    ] {
        let started = Instant::now();
        let (s, resp) = create(body.clone()).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{body} took {:?}",
            started.elapsed()
        );
        assert_eq!(
            (s, resp["error"].as_str()),
            (status, Some(code)),
            "{body}: {resp}"
        );
        assert!(!resp["message"].as_str().unwrap().is_empty());
    }
    let r = http
        .post(format!("{URL}/v1/vms/ghost/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let (status, ct) = contract::status_and_type(&r);
    let answer = r.bytes().await.unwrap();
    contract::assert_conforms(
        "start ghost",
        "POST",
        "/v1/vms/ghost/start",
        None,
        status,
        ct.as_deref(),
        &answer,
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&answer).unwrap()["error"],
        "vm_not_found"
    );

    let list: Value = http
        .get(format!("{URL}/v1/vms"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(std::fs::read_dir(w.data().join("vms")).unwrap().count(), 1);

    // The served OpenAPI document is the committed one.
    let served = http
        .get(format!("{URL}/openapi.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let committed = std::fs::read_to_string(workspace().join("openapi.json")).unwrap();
    assert_eq!(served, committed);
}

/// `hearth smoke` against the test's hearthd passes; against one whose guest image cannot boot
/// (its kernel replaced by junk) it fails with the artifacts that explain why.
#[test]
fn smoke_passes_and_an_unbootable_image_leaves_artifacts() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = World::new();
    let out = w.d().hearth_ok(&["smoke", "--name", "e2e-smoke"]);
    assert!(out.contains("smoke test passed"), "{out}");
    assert_eq!(
        w.d().hearth(&["vm", "inspect", "e2e-smoke"]).status.code(),
        Some(3),
        "it deleted its VM"
    );

    // The same image with a kernel that is not one.
    w.daemon.as_mut().unwrap().kill9();
    let cache = image_cache();
    let id = std::fs::read_link(cache.join("current")).unwrap();
    let images = w.data().join("images");
    std::fs::remove_file(&images).unwrap();
    let broken = images.join(&id);
    std::fs::create_dir_all(&broken).unwrap();
    for file in ["manifest.json", "initrd.img"] {
        std::fs::copy(cache.join(&id).join(file), broken.join(file)).unwrap();
    }
    std::fs::write(broken.join("vmlinuz"), vec![0x5au8; 1 << 16]).unwrap();
    let rootfs = std::fs::canonicalize(cache.join(&id).join("rootfs.ext4")).unwrap();
    std::os::unix::fs::symlink(rootfs, broken.join("rootfs.ext4")).unwrap();
    w.daemon = Some(Daemon::start(&w.data()));

    let artifacts = w.data().join("smoke-artifacts");
    let out = w.d().hearth(&[
        "smoke",
        "--name",
        "e2e-smoke-bad",
        "--ready-timeout",
        "60",
        "--artifacts",
        artifacts.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("smoke test failed; artifacts in"),
        "{stderr}"
    );
    let steps = std::fs::read_to_string(artifacts.join("steps.txt")).unwrap();
    assert!(
        steps.contains("ok    create") && steps.contains("FAIL"),
        "{steps}"
    );
    let inspect: Value =
        serde_json::from_str(&std::fs::read_to_string(artifacts.join("inspect.json")).unwrap())
            .unwrap();
    assert_eq!(inspect["state"], "error", "{inspect}");
    assert!(inspect["last_error"].is_string(), "{inspect}");
    for file in ["serial.log", "vmm.log", "health.json", "hearthd.log"] {
        assert!(artifacts.join(file).exists(), "{file} is missing");
    }
    assert_eq!(
        w.d()
            .hearth(&["vm", "inspect", "e2e-smoke-bad"])
            .status
            .code(),
        Some(3),
        "a failed smoke test removes its VM"
    );
}
