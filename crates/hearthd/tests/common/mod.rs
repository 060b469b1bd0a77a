//! The harness of the real-VM tests (`tests/e2e*.rs`): `hearthd` started for real inside a
//! network namespace the test creates, real QEMU guests booted from the real guest image, driven
//! by the real `hearth` CLI and raw HTTP. Every namespace, process and file a test makes is
//! removed when it ends, failed or not.
//!
//! Needs root (network namespaces), QEMU, and the static guest agent (`make agent`); `make test`
//! provides all three. The guest image is built once per checkout into `target/hearth-test-cache`.
//! Each test binary uses part of it.
#![allow(dead_code)]

pub mod contract;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Real-VM tests share two cores; run them one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());
pub static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);
pub const URL: &str = "http://127.0.0.1:7070";

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn hearthd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hearthd"))
}

pub fn hearth_bin() -> PathBuf {
    let p = hearthd_bin().with_file_name("hearth");
    assert!(
        p.exists(),
        "the hearth CLI is not built at {}; run `cargo build --workspace` first (make test does)",
        p.display()
    );
    p
}

pub fn agent_bin() -> PathBuf {
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

/// The directory of hearthd's guest RAM files for data directory `data` (the rule of
/// `vmm::qemu::ram_dir_for`: the first 16 hex digits of the SHA-256 of the path).
pub fn ram_dir(data: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(data.as_os_str().as_encoded_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    PathBuf::from(format!("/dev/shm/hearth-{hex}"))
}

/// Which hearthd a network slot belongs to (the rule of `net::instance_of`: the first 8 hex
/// digits of the SHA-256 of the data directory).
pub fn instance(data: &Path) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(data.as_os_str().as_encoded_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The network namespaces (slots) of the hearthd with data directory `data`.
pub fn slots(data: &Path) -> Vec<String> {
    let prefix = format!("hearth-{}-", instance(data));
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Removes the slots of the hearthd with data directory `data`.
pub fn remove_slots(data: &Path) {
    for ns in slots(data) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
}

/// The RAM file of VM `id` of the hearthd with data directory `data`.
pub fn ram_file(data: &Path, id: &str) -> PathBuf {
    ram_dir(data).join(format!("{id}.ram"))
}

/// The real CLI, pointed at the test's hearthd.
pub fn hearth_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(hearth_bin());
    // The operator's own login (a profile, HEARTH_API_KEY) must not leak into the tests.
    cmd.args(args)
        .env("HEARTH_URL", URL)
        .env("HEARTH_CONFIG", "/nonexistent/hearth-e2e-config.toml")
        .env_remove("HEARTH_API_KEY")
        .env_remove("HEARTH_PROFILE");
    cmd
}

pub fn run(cmd: &mut Command) -> Output {
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
pub fn image_cache() -> PathBuf {
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
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create_and_enter() -> Netns {
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
pub struct Daemon {
    pub child: Option<Child>,
    pub data: PathBuf,
}

impl Daemon {
    pub fn start(data: &Path) -> Daemon {
        Daemon::start_with_env(data, &[])
    }

    /// [`Daemon::start`] with extra environment variables (they win over the defaults).
    pub fn start_with_env(data: &Path, env: &[(&str, &str)]) -> Daemon {
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
            .envs(env.iter().copied())
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

    pub fn wait_healthy(&self) {
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

    pub fn hearth(&self, args: &[&str]) -> Output {
        hearth_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run hearth")
    }

    pub fn hearth_ok(&self, args: &[&str]) -> String {
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

    pub fn hearth_with_stdin(&self, args: &[&str], input: &[u8]) -> String {
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

    pub fn kill9(&mut self) {
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
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
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
pub struct World {
    pub dir: tempfile::TempDir,
    pub daemon: Option<Daemon>,
    pub _netns: Netns,
    pub vm_ids: Vec<String>,
}

impl World {
    pub fn new() -> World {
        World::with_env(&[])
    }

    /// [`World::new`] with extra environment for its hearthd; `setup` runs inside the test's
    /// namespace before hearthd starts (to build the rest of the test's network).
    pub fn with_env(env: &[(&str, &str)]) -> World {
        World::with_setup(env, || {})
    }

    pub fn with_setup(env: &[(&str, &str)], setup: impl FnOnce()) -> World {
        // QEMUs outlive a killed hearthd; as subreaper this test inherits and reaps them, as
        // systemd does on a real host.
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
        // Built before entering the namespace: the build downloads Debian packages.
        image_cache();
        let netns = Netns::create_and_enter();
        setup();
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start_with_env(&dir.path().join("data"), env);
        World {
            dir,
            daemon: Some(daemon),
            _netns: netns,
            vm_ids: Vec::new(),
        }
    }

    pub fn d(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn restart_after_kill9(&mut self) {
        self.restart_after_kill9_with_env(&[]);
    }

    pub fn restart_after_kill9_with_env(&mut self, env: &[(&str, &str)]) {
        self.daemon.as_mut().unwrap().kill9();
        self.daemon = Some(Daemon::start_with_env(&self.data(), env));
    }

    /// Downloads `guest_path` (`VM:/path`) with the CLI and compares it with `want`.
    pub fn assert_guest_file(&self, guest_path: &str, want: &[u8], what: &str) {
        let local = self.dir.path().join("download");
        let _ = std::fs::remove_file(&local);
        self.d()
            .hearth_ok(&["cp", guest_path, local.to_str().unwrap()]);
        assert!(std::fs::read(&local).unwrap() == want, "{what}");
    }

    /// Nothing of VM `id` is left: no process, no socket, no disk, no RAM file.
    pub fn assert_gone(&self, id: &str) {
        assert!(!self.data().join("vms").join(id).exists(), "VM dir left");
        self.assert_no_run(id);
    }

    /// After a stop: nothing of the run is left (the disk stays).
    pub fn assert_gone_runtime(&self, id: &str) {
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
    pub fn assert_no_run(&self, id: &str) {
        let data = self.data();
        assert!(
            !data.join("run").join(id).exists(),
            "run dir (sockets) left"
        );
        assert!(!ram_file(&data, id).exists(), "RAM file left");
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
        // The RAM directory is this test's alone (named after its data directory), and so are
        // the network slots named after it.
        let _ = std::fs::remove_dir_all(ram_dir(&self.data()));
        reap_orphans();
        remove_slots(&self.data());
    }
}

/// Waits for exited children this process inherited as subreaper (QEMUs of a killed hearthd).
pub fn reap_orphans() {
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

pub fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

pub fn pseudo_random(len: usize) -> Vec<u8> {
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
