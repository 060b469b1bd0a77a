//! Real tests: `hearthd` started for real inside a network namespace this test creates, real
//! QEMU guests booted from the real guest image, driven by the real `hearth` CLI and raw HTTP.
//! Every namespace, process and file a test makes is removed when it ends, failed or not.
//!
//! Needs root (network namespaces), QEMU, and the static guest agent (`make agent`); `make test`
//! provides all three. The guest image is built once per checkout into `target/hearth-test-cache`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Real-VM tests share two cores; run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());
static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);
const URL: &str = "http://127.0.0.1:7070";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn hearthd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hearthd"))
}

fn hearth_bin() -> PathBuf {
    let p = hearthd_bin().with_file_name("hearth");
    assert!(
        p.exists(),
        "the hearth CLI is not built at {}; run `cargo build --workspace` first (make test does)",
        p.display()
    );
    p
}

fn agent_bin() -> PathBuf {
    let p = std::env::var_os("HEARTH_IMAGE_AGENT_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace().join("target/x86_64-unknown-linux-gnu/release/hearth-guest")
        });
    assert!(
        p.exists(),
        "the static guest agent is not built at {}; run `make agent` (make test does)",
        p.display()
    );
    p
}

/// The real CLI, pointed at the test's hearthd.
fn hearth_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(hearth_bin());
    cmd.args(args).env("HEARTH_URL", URL);
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The shared image cache: built once, by the real `hearthd build-image`, from the host's
/// network namespace (never call it from inside a test namespace: it has no route out).
fn image_cache() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let data = workspace().join("target/hearth-test-cache");
            let out = Command::new(hearthd_bin())
                .arg("build-image")
                .env("HEARTH_DATA_DIR", &data)
                .env("HEARTH_IMAGE_AGENT_PATH", agent_bin())
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                .status()
                .expect("run hearthd build-image");
            assert!(out.success(), "hearthd build-image failed");
            data.join("images")
        })
        .clone()
}

/// A network namespace of this test's own, entered by the calling thread: hearthd, QEMU and
/// the CLI started from this thread live in it, and so do this thread's sockets.
struct Netns {
    name: String,
}

impl Netns {
    fn create_and_enter() -> Netns {
        let name = format!(
            "hearth-e2e-{}-{}",
            std::process::id(),
            NETNS_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        let f = File::open(format!("/run/netns/{}", ns.name)).expect("open netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// One hearthd on a temporary data directory.
struct Daemon {
    child: Option<Child>,
    data: PathBuf,
}

impl Daemon {
    fn start(data: &Path) -> Daemon {
        std::fs::create_dir_all(data).unwrap();
        let images = data.join("images");
        if !images.exists() {
            std::os::unix::fs::symlink(image_cache(), &images).unwrap();
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(data.join("hearthd.log"))
            .unwrap();
        let child = Command::new(hearthd_bin())
            .env("HEARTH_DATA_DIR", data)
            .env("HEARTH_LISTEN", "127.0.0.1:7070")
            .env("HEARTH_IMAGE_AGENT_PATH", agent_bin())
            .env("HEARTH_GUEST_MEMORY", "256M")
            .env("HEARTH_LOG", "hearthd=debug,info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start hearthd");
        let d = Daemon {
            child: Some(child),
            data: data.to_owned(),
        };
        d.wait_healthy();
        d
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = self.hearth(&["--json", "health"]);
            if out.status.success() {
                let h: Value = serde_json::from_slice(&out.stdout).unwrap();
                if h["image"].is_string() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "hearthd did not become healthy with an image; its log:\n{}",
                std::fs::read_to_string(self.data.join("hearthd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn hearth(&self, args: &[&str]) -> Output {
        hearth_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run hearth")
    }

    fn hearth_ok(&self, args: &[&str]) -> String {
        let out = self.hearth(args);
        assert!(
            out.status.success(),
            "hearth {args:?} exited {:?}: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn hearth_with_stdin(&self, args: &[&str], input: &[u8]) -> String {
        use std::io::Write;
        let mut child = hearth_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run hearth");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "hearth {args:?}: {:?}", out.status);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Processes (by pid) whose command line mentions `needle`: the QEMUs of one test's data dir.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains(needle))
        {
            pids.push(pid);
        }
    }
    pids
}

/// A test's world: its namespace, data dir and daemon; on drop, everything they made is removed.
struct World {
    dir: tempfile::TempDir,
    daemon: Option<Daemon>,
    _netns: Netns,
    vm_ids: Vec<String>,
}

impl World {
    fn new() -> World {
        // QEMUs outlive a killed hearthd; as subreaper this test inherits and reaps them, as
        // systemd does on a real host.
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
        // Built before entering the namespace: the build downloads Debian packages.
        image_cache();
        let netns = Netns::create_and_enter();
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(&dir.path().join("data"));
        World {
            dir,
            daemon: Some(daemon),
            _netns: netns,
            vm_ids: Vec::new(),
        }
    }

    fn d(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn restart_after_kill9(&mut self) {
        self.daemon.as_mut().unwrap().kill9();
        self.daemon = Some(Daemon::start(&self.data()));
    }

    /// Downloads `guest_path` (`VM:/path`) with the CLI and compares it with `want`.
    fn assert_guest_file(&self, guest_path: &str, want: &[u8], what: &str) {
        let local = self.dir.path().join("download");
        let _ = std::fs::remove_file(&local);
        self.d()
            .hearth_ok(&["cp", guest_path, local.to_str().unwrap()]);
        assert!(std::fs::read(&local).unwrap() == want, "{what}");
    }

    /// Nothing of VM `id` is left: no process, no socket, no disk, no RAM file.
    fn assert_gone(&self, id: &str) {
        assert!(!self.data().join("vms").join(id).exists(), "VM dir left");
        self.assert_no_run(id);
    }

    /// After a stop: nothing of the run is left (the disk stays).
    fn assert_gone_runtime(&self, id: &str) {
        assert!(
            self.data()
                .join("vms")
                .join(id)
                .join("rootfs.ext4")
                .exists(),
            "disk must stay"
        );
        self.assert_no_run(id);
    }

    /// No sockets, no RAM file, no QEMU process of VM `id`.
    fn assert_no_run(&self, id: &str) {
        let data = self.data();
        assert!(
            !data.join("run").join(id).exists(),
            "run dir (sockets) left"
        );
        assert!(
            !Path::new(&format!("/dev/shm/hearth-{id}.ram")).exists(),
            "RAM file left"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !processes_mentioning(&data.join("run").join(id).display().to_string()).is_empty() {
            assert!(Instant::now() < deadline, "QEMU process left");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.daemon.take();
        let data = self.data().display().to_string();
        for pid in processes_mentioning(&data) {
            if pid != std::process::id() as i32 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.data().join("vms")) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(format!(
                    "/dev/shm/hearth-{}.ram",
                    e.file_name().to_string_lossy()
                ));
            }
        }
        for id in &self.vm_ids {
            let _ = std::fs::remove_file(format!("/dev/shm/hearth-{id}.ram"));
        }
        reap_orphans();
    }
}

/// Waits for exited children this process inherited as subreaper (QEMUs of a killed hearthd).
fn reap_orphans() {
    let me = std::process::id().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pending = false;
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let mut f = rest.split_whitespace();
            let (state, ppid) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
            if ppid != me {
                continue;
            }
            if state == "Z" {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            } else if std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
            {
                pending = true; // killed above, not yet exited
            }
        }
        if !pending || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

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

    // Stop, start: the file survived.
    let stopped = json_of(&w.d().hearth_ok(&["--json", "vm", "stop", "e2e-a"]));
    assert_eq!(stopped["state"], "stopped");
    assert!(stopped["pid"].is_null());
    w.assert_gone_runtime(&id);
    w.d().hearth_ok(&["vm", "start", "e2e-a"]);
    w.assert_guest_file("e2e-a:/root/blob", &blob, "file changed across stop/start");

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

    w.d().hearth_ok(&["vm", "delete", "e2e-a"]);
    let gone = w.d().hearth(&["vm", "inspect", "e2e-a"]);
    assert_eq!(gone.status.code(), Some(3));
    w.assert_gone(&id);
}

/// The NDJSON exec stream and a followed serial log, over raw HTTP.
async fn streams(vm: &str) {
    let http = reqwest::Client::new();
    let body = json!({"command": ["sh", "-c", "echo a; echo b >&2; exit 5"]});
    let text = http
        .post(format!("{URL}/v1/vms/{vm}/exec/stream"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
    let mut follow = http
        .get(format!("{URL}/v1/vms/{vm}/logs?follow=true&tail=0"))
        .send()
        .await
        .unwrap();
    let marker = "hearth-e2e-marker-7391";
    let exec = json!({"command": ["sh", "-c", format!("echo {marker} > /dev/console")]});
    let r = http
        .post(format!("{URL}/v1/vms/{vm}/exec"))
        .json(&exec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
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
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    w.d().hearth_ok(&["vm", "new", "taken", "--no-start"]);
    for (body, status, code) in [
        (json!({"name": "Not_Valid"}), 400, "invalid_name"),
        (json!({"name": "odd", "cpus": 3}), 400, "invalid_cpus"),
        (json!({"name": "tiny", "ram": "64M"}), 400, "invalid_ram"),
        (json!({"name": "taken"}), 409, "vm_name_taken"),
    ] {
        let (s, resp) = create(body.clone()).await;
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
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "vm_not_found");

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
