//! Tier-2 tests of the SSH front end with the real OpenSSH client (`ssh`, `ssh-keygen`, `sftp`,
//! `scp`): a "hearthd" of its own runtime (the VM service with the [`DoubleVmm`], whose guests
//! are real agent processes on this host; the REST API on a unix socket in a temp dir, for the
//! CLI children; the SSH server on a loopback port), logins checked by a test [`Identities`]
//! that knows the keys the test made. No root, QEMU or network beyond loopback.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::watch;

use super::{Identities, SessionKey};
use crate::api::guard::{ConnInfo, GuardedListener, Transport};
use crate::image::Image;
use crate::store::Store;
use crate::testing;
use crate::vm::{Caller, ImageState, Source, VmService};
use crate::vmm::double::DoubleVmm;
use crate::vmm::process_with_arg;

/// The keys a test knows, what was refused and which commands finished. Logins and session keys
/// are the real ones (`access::Access`): the known keys are the bootstrap admin's.
#[derive(Debug, Default)]
struct TestIdentities {
    keys: Vec<String>,
    access: std::sync::OnceLock<crate::access::Access>,
    blocked: AtomicBool,
    refused: Mutex<Vec<(String, String)>>,
    done: Mutex<Vec<(String, u32)>>,
}

struct TestKey(String);

impl SessionKey for TestKey {
    fn secret(&self) -> &str {
        &self.0
    }
}

impl Identities for TestIdentities {
    fn caller_for_key<'a>(
        &'a self,
        key: &'a str,
        source: SocketAddr,
    ) -> BoxFuture<'a, Option<Caller>> {
        let known = self.keys.iter().any(|k| k == key);
        Box::pin(async move {
            if !known {
                return None;
            }
            let access = self.access.get()?;
            Identities::caller_for_key(access, key, source).await
        })
    }

    fn session_key(&self, caller: &Caller) -> Box<dyn SessionKey> {
        match self.access.get() {
            Some(access) => Identities::session_key(access, caller),
            None => Box::new(TestKey(format!("session-of-{}", caller.principal))),
        }
    }

    fn attempt_allowed(&self, _source: IpAddr) -> bool {
        !self.blocked.load(Ordering::SeqCst)
    }

    fn refused(&self, _source: SocketAddr, user: &str, reason: &str) {
        self.refused
            .lock()
            .unwrap()
            .push((user.to_owned(), reason.to_owned()));
    }

    fn command_done(&self, _caller: &Caller, command: &str, exit: u32, _took: Duration) {
        self.done.lock().unwrap().push((command.to_owned(), exit));
    }
}

/// Ends, by pid, every process whose command line names the test's directory (the agents the
/// double started), even when the test fails half-way.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let marker = self.0.display().to_string();
        for _ in 0..100 {
            let Some(pid) = process_with_arg(&marker) else {
                return;
            };
            kill(pid);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn kill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// A key pair made by `ssh-keygen`.
struct Key {
    path: PathBuf,
    /// `ssh-ed25519 AAAA…`, without the comment.
    public: String,
}

fn keygen(dir: &Path, name: &str) -> Key {
    let path = dir.join(name);
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen (Debian's openssh-client) is installed");
    assert!(ok.success(), "ssh-keygen failed");
    let text = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    let public = text
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    Key { path, public }
}

/// The CLI of this workspace's build, beside the `deps` directory tests run from.
fn cli_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let cli = exe.parent().and_then(Path::parent).unwrap().join("hearth");
    assert!(
        cli.is_file(),
        "the SSH tests run the CLI {}, which is missing: build it with `cargo build -p hearth` (`make test` does)",
        cli.display()
    );
    cli
}

/// A temp dir with a data dir, a tiny image and keys, shared by the hearthds of a test.
struct World {
    dir: tempfile::TempDir,
    image: Image,
    known: Key,
    stranger: Key,
    _reaper: Reaper,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let image = testing::image(&dir.path().join("data"), 1024);
        let known = keygen(dir.path(), "known");
        let stranger = keygen(dir.path(), "stranger");
        let reaper = Reaper(dir.path().to_owned());
        World {
            dir,
            image,
            known,
            stranger,
            _reaper: reaper,
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Where the "guest" keeps files: the agent runs on this host.
    fn guest_path(&self, rel: &str) -> PathBuf {
        self.dir.path().join("guest").join(rel)
    }

    fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// A hearthd with SSH on this world's data dir; it knows the `known` key only.
    fn hearthd(&self) -> Hearthd {
        let identities = Arc::new(TestIdentities {
            keys: vec![self.known.public.clone()],
            ..TestIdentities::default()
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (data, image, ids) = (self.data(), self.image.clone(), identities.clone());
        let (service, port) = rt.block_on(async move {
            let mut config = testing::config(&data);
            config.ssh.cli_path = cli_binary();
            let store = Store::open(&config.database_url).await.unwrap();
            let (tx, rx) = watch::channel(ImageState::Ready(image));
            std::mem::forget(tx);
            let vmm = DoubleVmm::new().unwrap_or_else(|e| panic!("{e}"));
            let guard = Arc::new(crate::api::guard::Guard::new(config.listen, &config.server));
            let request_timeout = config.request_timeout;
            let config = Arc::new(config);
            let service = VmService::new(config.clone(), store.clone(), Arc::new(vmm), rx);
            service.recover().await.unwrap();
            let access = service.access().clone();
            access.bootstrap().await.unwrap();
            let admin = config.auth.bootstrap_admin.clone();
            for key in &ids.keys {
                let key = crate::access::parse_public_key(key).unwrap();
                // A restarted hearthd on the same data dir has it already.
                if store.ssh_key(&key.fingerprint).await.unwrap().is_none() {
                    store
                        .add_ssh_key(&crate::access::Access::ssh_key_record(&admin, &key))
                        .await
                        .unwrap();
                }
            }
            ids.access.set(access).unwrap();
            let app = crate::api::router(crate::api::AppState {
                service: service.clone(),
                request_timeout,
                guard,
            });
            let socket = config.server.unix_socket.clone().unwrap();
            let _ = std::fs::remove_file(&socket);
            let unix = tokio::net::UnixListener::bind(&socket).unwrap();
            tokio::spawn(async move {
                axum::serve(
                    GuardedListener::new(unix, Transport::Unix),
                    app.into_make_service_with_connect_info::<ConnInfo>(),
                )
                .await
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let serving = super::serve(listener, config, service.clone(), ids, socket);
            tokio::spawn(async move { serving.await.unwrap() });
            (service, port)
        });
        Hearthd {
            rt: Some(rt),
            service: Some(service),
            port,
            identities,
        }
    }

    /// The OpenSSH client's options for `hearthd` with `key`.
    fn ssh_options(&self, hearthd: &Hearthd, key: &Key, port_flag: &str) -> Vec<String> {
        let mut options: Vec<String> = vec![
            "-F".into(),
            "/dev/null".into(),
            port_flag.into(),
            hearthd.port.to_string(),
            "-i".into(),
            key.path.display().to_string(),
        ];
        for option in [
            "StrictHostKeyChecking=no".to_owned(),
            format!("UserKnownHostsFile={}", self.known_hosts().display()),
            "IdentitiesOnly=yes".into(),
            "BatchMode=yes".into(),
            "LogLevel=ERROR".into(),
            "ConnectTimeout=10".into(),
        ] {
            options.push("-o".into());
            options.push(option);
        }
        options
    }

    /// `ssh [options] user@127.0.0.1 command…` with `stdin`, to its end.
    fn ssh(
        &self,
        hearthd: &Hearthd,
        opts: &[&str],
        user: &str,
        command: &[&str],
        stdin: &[u8],
    ) -> Run {
        self.ssh_as(hearthd, &self.known, opts, user, command, stdin)
    }

    fn ssh_as(
        &self,
        hearthd: &Hearthd,
        key: &Key,
        opts: &[&str],
        user: &str,
        command: &[&str],
        stdin: &[u8],
    ) -> Run {
        let mut cmd = Command::new("ssh");
        cmd.args(self.ssh_options(hearthd, key, "-p"))
            .args(opts)
            .arg(format!("{user}@127.0.0.1"))
            .args(command);
        run(cmd, stdin, Duration::from_secs(60))
    }

    /// `ssh` started and left running, its stdin open.
    fn ssh_spawn(&self, hearthd: &Hearthd, opts: &[&str], user: &str, command: &[&str]) -> Session {
        let mut cmd = Command::new("ssh");
        cmd.args(self.ssh_options(hearthd, &self.known, "-p"))
            .args(opts)
            .arg(format!("{user}@127.0.0.1"))
            .args(command);
        Session::spawn(cmd)
    }
}

/// One hearthd: its runtime, service and SSH port.
struct Hearthd {
    rt: Option<tokio::runtime::Runtime>,
    service: Option<VmService>,
    port: u16,
    identities: Arc<TestIdentities>,
}

impl Drop for Hearthd {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // As when hearthd dies: every task, connection and CLI child goes.
            let _enter = rt.enter();
            drop(self.service.take());
            drop(_enter);
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// How a client process ended.
#[derive(Debug)]
struct Run {
    status: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn ok(self) -> Run {
        assert_eq!(self.status, 0, "{self:?} ({})", self.out());
        self
    }
}

/// Runs `cmd` with `stdin` written and closed, reading its output, killed after `timeout`.
fn run(mut cmd: Command, stdin: &[u8], timeout: Duration) -> Run {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    Run {
        status: status.code().unwrap_or(-1),
        stdout: reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

/// A client left running: its output collected as it comes.
struct Session {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Session {
    fn spawn(mut cmd: Command) -> Session {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    output.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        Session {
            stdin: child.stdin.take(),
            child,
            output,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(&self.text()) {
            assert!(Instant::now() < deadline, "no {what} in {:?}", self.text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    fn exit_status(mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "the client never ended: {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(run: &Run) -> Value {
    serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} {}", run.out(), run.stderr))
}

/// Live processes (not zombies) one of whose arguments contains `needle`.
fn pids_with_arg(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            (pid != me
                && cmdline
                    .split(|b| *b == 0)
                    .any(|arg| String::from_utf8_lossy(arg).contains(needle)))
            .then_some(pid)
        })
        .collect()
}

#[test]
fn the_command_account_runs_the_cli_and_vm_logins_reach_the_guest() {
    let world = World::new();
    let h = world.hearthd();
    let hearth = "hearth";

    // help, and an empty command, list the surface's commands.
    let help = world.ssh(&h, &[], hearth, &["help"], b"").ok();
    for verb in ["new", "list", "exec", "export", "import", "status", "top"] {
        assert!(
            help.out().contains(&format!("\n  {verb}")),
            "{verb}: {}",
            help.out()
        );
    }
    assert!(
        help.out()
            .contains(&format!("ssh -p {} hearth@127.0.0.1", h.port))
    );
    // (OpenSSH sends no command at all as a shell request; a blank one is an exec.)
    let empty = world.ssh(&h, &[], hearth, &[" "], b"").ok();
    assert_eq!(empty.out(), help.out());
    let options = world.ssh(&h, &[], hearth, &["help", "new"], b"").ok();
    assert!(options.out().contains("--cpus"), "{options:?}");

    // new, then --json list parses and has it running.
    let new = world.ssh(&h, &[], hearth, &["new", "web"], b"").ok();
    assert!(new.out().contains("web"), "{new:?}");
    let list = world
        .ssh(&h, &[], hearth, &["--", "--json", "list"], b"")
        .ok();
    let vms = json(&list);
    let web = vms.as_array().unwrap().iter().find(|v| v["name"] == "web");
    assert_eq!(
        web.map(|v| v["state"].clone()),
        Some("running".into()),
        "{vms}"
    );

    // Exit codes are the CLI's: not found 3, bad input 2, wrong state 4.
    let missing = world.ssh(&h, &[], hearth, &["inspect", "nope"], b"");
    assert_eq!(missing.status, 3, "{missing:?}");
    assert!(missing.stderr.contains("nope"), "{missing:?}");
    let bad = world.ssh(&h, &[], hearth, &["new", "Bad_Name"], b"");
    assert_eq!(bad.status, 2, "{bad:?}");
    let busy = world.ssh(&h, &[], hearth, &["start", "web"], b"");
    assert_eq!(busy.status, 4, "{busy:?}");
    // The surface's own refusals: an unknown verb, a quote left open, a local option.
    let unknown = world.ssh(&h, &[], hearth, &["frobnicate", "x"], b"");
    assert_eq!(unknown.status, 2, "{unknown:?}");
    assert!(
        unknown.stderr.contains("unknown command `frobnicate`"),
        "{unknown:?}"
    );
    let unknown = world.ssh(&h, &[], hearth, &["--", "--json", "frobnicate"], b"");
    assert_eq!(unknown.status, 2, "{unknown:?}");
    assert_eq!(json(&unknown)["error"], "invalid_request", "{unknown:?}");
    let open_quote = world.ssh(&h, &[], hearth, &["inspect", "'web"], b"");
    assert_eq!(open_quote.status, 2, "{open_quote:?}");
    assert!(
        open_quote.stderr.contains("unterminated single quote"),
        "{open_quote:?}"
    );
    // The CLI runs with hearthd's rights: it names no other server and no file of the host.
    let url = world.ssh(
        &h,
        &[],
        hearth,
        &["list", "--url", "http://127.0.0.1:9"],
        b"",
    );
    assert_eq!(url.status, 2, "{url:?}");
    assert!(
        url.stderr.contains("--url cannot be given over SSH"),
        "{url:?}"
    );
    let host_file = world.ssh(&h, &[], hearth, &["cp", "web:/etc/hostname", "/tmp/x"], b"");
    assert_eq!(host_file.status, 2, "{host_file:?}");
    assert!(
        host_file.stderr.contains("names a file of the host"),
        "{host_file:?}"
    );

    // exec: the command's exit code, stdout and stderr apart.
    let exec = world.ssh(
        &h,
        &[],
        hearth,
        &[
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "'echo out; echo err >&2; exit 7'",
        ],
        b"",
    );
    assert_eq!(
        (exec.status, exec.out().as_str(), exec.stderr.as_str()),
        (7, "out\n", "err\n"),
        "{exec:?}"
    );
    let done = h.identities.done.lock().unwrap().clone();
    assert!(
        done.contains(&(
            "exec web -- sh -c 'echo out; echo err >&2; exit 7'".into(),
            7
        )),
        "{done:?}"
    );
    // stdin passes through, and its end is the command's end of input.
    let cat = world
        .ssh(&h, &[], hearth, &["exec", "web", "--", "cat"], b"hi\n")
        .ok();
    assert_eq!(cat.out(), "hi\n");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let count = world
        .ssh(&h, &[], hearth, &["exec", "web", "--", "wc", "-c"], &big)
        .ok();
    assert_eq!(count.out().trim(), "3000000");

    // The command account runs one command: a shell is refused, exit 2.
    let shell = world.ssh(&h, &["-T"], hearth, &[], b"");
    assert_eq!(shell.status, 2, "{shell:?}");
    assert!(
        shell.stderr.contains(&format!(
            "hearth@127.0.0.1 runs one command: ssh -p {} hearth@127.0.0.1 help",
            h.port
        )),
        "{shell:?}"
    );

    // Into the VM: a shell on a PTY, with its exit code.
    let tty = world.ssh(&h, &["-tt"], "web", &[], b"echo $((6*7))\nexit 3\n");
    assert_eq!(tty.status, 3, "{tty:?} {}", tty.out());
    assert!(tty.out().contains("42"), "{}", tty.out());
    // One command, its streams apart, no PTY unless asked for.
    let one = world.ssh(
        &h,
        &[],
        "web",
        &[
            "--",
            "echo one; echo two >&2; test -t 0 || echo no-tty; exit 5",
        ],
        b"",
    );
    assert_eq!(
        (one.status, one.out().as_str(), one.stderr.as_str()),
        (5, "one\nno-tty\n", "two\n"),
        "{one:?}"
    );
    let stdin = world
        .ssh(&h, &[], "web", &["tr", "a-z", "A-Z"], b"shout\n")
        .ok();
    assert_eq!(stdin.out(), "SHOUT\n");
    // A VM that does not exist: the CLI's not found, exit 3.
    let nowhere = world.ssh(&h, &[], "nope", &["true"], b"");
    assert_eq!(nowhere.status, 3, "{nowhere:?}");
    assert!(nowhere.stderr.contains("nope"), "{nowhere:?}");

    // Files: sftp and scp (OpenSSH 9's scp speaks sftp) through the VM's sftp server.
    let sftp_server = super::into_vm::SFTP_SERVER;
    assert!(
        Path::new(sftp_server).is_file(),
        "the guests of this test are this host's processes, and sftp into them runs {sftp_server}: \
         install openssh-sftp-server without recommends (`make deps` does)"
    );
    let local = world.dir.path().join("local.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    std::fs::create_dir_all(world.guest_path("")).unwrap();
    let remote = world.guest_path("put.bin");
    let back = world.dir.path().join("back.bin");
    let batch = world.dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\n",
            local.display(),
            remote.display(),
            remote.display(),
            back.display()
        ),
    )
    .unwrap();
    let mut sftp = Command::new("sftp");
    sftp.args(world.ssh_options(&h, &world.known, "-P"))
        .arg("-b")
        .arg(&batch)
        .arg("web@127.0.0.1");
    run(sftp, b"", Duration::from_secs(60)).ok();
    assert!(std::fs::read(&remote).unwrap() == data, "sftp put");
    assert!(std::fs::read(&back).unwrap() == data, "sftp get");
    let scp_to = world.guest_path("scp.bin");
    let mut scp = Command::new("scp");
    scp.args(world.ssh_options(&h, &world.known, "-P"))
        .arg(&local)
        .arg(format!("web@127.0.0.1:{}", scp_to.display()));
    run(scp, b"", Duration::from_secs(60)).ok();
    assert!(std::fs::read(&scp_to).unwrap() == data, "scp");
    // The command account has no files to serve, and says where they are.
    let mut sftp = Command::new("sftp");
    sftp.args(world.ssh_options(&h, &world.known, "-P"))
        .arg("-b")
        .arg(&batch)
        .arg("hearth@127.0.0.1");
    let refused = run(sftp, b"", Duration::from_secs(60));
    assert_ne!(refused.status, 0, "{refused:?}");
    assert!(
        refused.stderr.contains(&format!(
            "sftp and scp work with a VM: sftp -P {} VM@127.0.0.1",
            h.port
        )),
        "{refused:?}"
    );

    // A client that goes away ends its command: the CLI child and the process in the guest.
    let mut gone = world.ssh_spawn(&h, &[], hearth, &["exec", "web", "--", "sleep", "4242.5"]);
    let client = gone.child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    // The client, the CLI child and the guest's sleep.
    while pids_with_arg("4242.5").len() < 3 {
        assert!(Instant::now() < deadline, "the guest's sleep never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(client);
    let _ = gone.child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = pids_with_arg("4242.5");
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{left:?} outlived their client");
        std::thread::sleep(Duration::from_millis(20));
    }

    // top on a PTY redraws until q.
    let mut top = world.ssh_spawn(&h, &["-tt"], hearth, &["top", "--interval", "0.2"]);
    top.wait_for("two frames", |t| {
        t.matches("\x1b[2J").count() >= 2 && t.contains("web")
    });
    top.send(b"q");
    assert_eq!(top.exit_status(), 0);

    // export | import: a stopped VM out as a tar on stdout, back in from stdin.
    world.ssh(&h, &[], hearth, &["stop", "web"], b"").ok();
    let archive = world.ssh(&h, &[], hearth, &["export", "web"], b"").ok();
    assert!(
        archive.stdout.len() > 1024,
        "{} bytes",
        archive.stdout.len()
    );
    world.ssh(&h, &[], hearth, &["delete", "web"], b"").ok();
    world
        .ssh(&h, &[], hearth, &["import"], &archive.stdout)
        .ok();
    let back = json(
        &world
            .ssh(&h, &[], hearth, &["--", "--json", "inspect", "web"], b"")
            .ok(),
    );
    assert_eq!(back["state"], "stopped", "{back}");
    world.ssh(&h, &[], hearth, &["delete", "web"], b"").ok();
}

#[test]
fn logins_take_known_keys_only_and_the_host_key_survives_a_restart() {
    let world = World::new();
    let h = world.hearthd();
    // The first connection records the host key under an alias, whatever the port.
    let pin = [
        "-o",
        "HostKeyAlias=hearthd-test",
        "-o",
        "StrictHostKeyChecking=accept-new",
    ];
    world.ssh(&h, &pin, "hearth", &["help"], b"").ok();

    // An unknown key, passwords, and a source over its attempts are refused and reported.
    let stranger = world.ssh_as(&h, &world.stranger, &[], "hearth", &["help"], b"");
    assert_eq!(stranger.status, 255, "{stranger:?}");
    assert!(
        stranger.stderr.contains("Permission denied (publickey)"),
        "{stranger:?}"
    );
    let password = world.ssh(
        &h,
        &[
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password",
        ],
        "web",
        &["true"],
        b"",
    );
    assert_eq!(password.status, 255, "{password:?}");
    h.identities.blocked.store(true, Ordering::SeqCst);
    let limited = world.ssh(&h, &[], "hearth", &["help"], b"");
    assert_eq!(limited.status, 255, "{limited:?}");
    h.identities.blocked.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let refused = h.identities.refused.lock().unwrap().clone();
        if refused.len() >= 3 || Instant::now() > deadline {
            break refused;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let reasons: Vec<&str> = refused.iter().map(|(_, r)| r.as_str()).collect();
    assert!(
        refused[0].0 == "hearth" && reasons[0].starts_with("unknown key SHA256:"),
        "{refused:?}"
    );
    assert_eq!(refused[1].0, "web", "{refused:?}");
    assert!(
        reasons.iter().any(|r| r.starts_with("rate limited")),
        "{refused:?}"
    );

    // The host key was made once, private, and a new hearthd serves the same one.
    let key_file = super::host_key_path(&world.data());
    let mode = std::fs::metadata(&key_file).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let before = std::fs::read(&key_file).unwrap();
    drop(h);
    let again = world.hearthd();
    let strict = [
        "-o",
        "HostKeyAlias=hearthd-test",
        "-o",
        "StrictHostKeyChecking=yes",
    ];
    world.ssh(&again, &strict, "hearth", &["help"], b"").ok();
    assert!(std::fs::read(&key_file).unwrap() == before);
}

#[test]
fn host_keys_are_made_once_and_bad_ones_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let first = super::host_key(dir.path()).unwrap();
    let second = super::host_key(dir.path()).unwrap();
    assert_eq!(first.public_key(), second.public_key());
    let public = std::fs::read_to_string(dir.path().join("ssh_host_ed25519_key.pub")).unwrap();
    assert!(public.starts_with("ssh-ed25519 "), "{public}");
    std::fs::write(super::host_key_path(dir.path()), "not a key").unwrap();
    let err = super::host_key(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("ssh_host_ed25519_key is not an OpenSSH ed25519 private key"),
        "{err}"
    );
}

/// A client on a terminal of ours: `ssh -tt` with the slave of a PTY as its stdio.
struct Terminal {
    child: std::process::Child,
    master: std::fs::File,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Terminal {
    fn spawn(mut cmd: Command, rows: u16, cols: u16) -> Terminal {
        let winsize = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&winsize), None).unwrap();
        let stdio = || Stdio::from(pty.slave.try_clone().unwrap());
        let child = cmd
            .stdin(stdio())
            .stdout(stdio())
            .stderr(stdio())
            .spawn()
            .unwrap();
        drop(pty.slave);
        let master = std::fs::File::from(pty.master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let out = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            child,
            master,
            output,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.text().contains(what) {
            assert!(
                Instant::now() < deadline,
                "no {what:?} in {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn type_line(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\r").unwrap();
    }

    /// Resizes the terminal and tells the client, as a terminal emulator does.
    fn resize(&self, rows: u16, cols: u16) {
        use std::os::fd::AsRawFd;
        let winsize = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which points at a live
        // local; the descriptor is the open master of the test's PTY.
        let rc = unsafe {
            libc::ioctl(
                self.master.as_raw_fd(),
                libc::TIOCSWINSZ,
                &raw const winsize,
            )
        };
        assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGWINCH).unwrap();
    }

    fn exit_status(mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "the client never ended: {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn terminals_get_the_clients_size_and_follow_its_changes() {
    let world = World::new();
    let h = world.hearthd();
    world.ssh(&h, &[], "hearth", &["new", "tty"], b"").ok();
    let client = |user: &str, command: &[&str]| {
        let mut cmd = Command::new("ssh");
        cmd.args(world.ssh_options(&h, &world.known, "-p"))
            .arg("-tt")
            .arg(format!("{user}@127.0.0.1"))
            .args(command);
        cmd
    };

    // A shell in the VM on a PTY of the client's size; a window change reaches it.
    let mut shell = Terminal::spawn(client("tty", &[]), 30, 100);
    shell.type_line("stty size");
    shell.wait_for("30 100");
    shell.resize(40, 120);
    // The change and the typing reach the guest by two paths (a resize request, the stdin
    // queue), so the first `stty size` after it may still see the old size.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !shell.text().contains("40 120") {
        assert!(Instant::now() < deadline, "no resize in {:?}", shell.text());
        shell.type_line("stty size");
        std::thread::sleep(Duration::from_millis(200));
    }
    shell.type_line("exit 4");
    assert_eq!(shell.exit_status(), 4);

    // The command account's child runs on a PTY of ours, resized the same way: `exec -t`
    // inside it gives the guest command a terminal of that size and passes the change on.
    let mut exec = Terminal::spawn(client("hearth", &["exec", "-t", "tty", "--", "sh"]), 25, 90);
    exec.type_line("stty size");
    exec.wait_for("25 90");
    exec.resize(50, 132);
    // The change travels: our PTY, the CLI's SIGWINCH, the exec session, the guest's PTY.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exec.text().contains("50 132") {
        assert!(Instant::now() < deadline, "no resize in {:?}", exec.text());
        exec.type_line("stty size");
        std::thread::sleep(Duration::from_millis(200));
    }
    exec.type_line("exit 6");
    assert_eq!(exec.exit_status(), 6);
    world.ssh(&h, &[], "hearth", &["delete", "tty"], b"").ok();
}

#[test]
fn a_command_that_reads_no_stdin_holds_its_client_back() {
    let world = World::new();
    let h = world.hearthd();
    world.ssh(&h, &[], "hearth", &["new", "slow"], b"").ok();
    for (user, command) in [
        ("hearth", &["exec", "slow", "--", "sleep", "30"][..]),
        ("slow", &["sleep", "30"][..]),
    ] {
        let mut client = world.ssh_spawn(&h, &[], user, command);
        let mut stdin = client.stdin.take().unwrap();
        let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = written.clone();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..256 {
                if stdin.write_all(&chunk).is_err() {
                    return;
                }
                count.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        });
        // Bounded queues at every step (the client's and the kernel's buffers, the SSH window,
        // russh's channel queue, ours, the CLI's and the guest's credit): the client stalls.
        std::thread::sleep(Duration::from_secs(4));
        let sent = written.load(Ordering::SeqCst);
        assert!(
            sent < 64 << 20,
            "{user}: {} MiB went into a command that reads nothing",
            sent >> 20
        );
        drop(client);
    }
    world.ssh(&h, &[], "hearth", &["delete", "slow"], b"").ok();
}

#[test]
fn exit_statuses_sizes_signals_and_sources_are_spelled_as_ssh_and_audit_want() {
    assert_eq!(super::exit_status(Some(7), None), 7);
    assert_eq!(super::exit_status(Some(-1), None), 255);
    assert_eq!(super::exit_status(None, Some(9)), 137);
    assert_eq!(super::exit_status(None, None), 1);
    let size = super::pty_size(132, 50);
    assert_eq!((size.rows, size.cols), (50, 132));
    let size = super::pty_size(0, 100_000);
    assert_eq!((size.rows, size.cols), (u16::MAX, 80));
    assert_eq!(super::signal_number(&russh::Sig::INT), Some(libc::SIGINT));
    assert_eq!(
        super::signal_number(&russh::Sig::Custom("USR2".into())),
        Some(libc::SIGUSR2)
    );
    assert_eq!(
        super::signal_number(&russh::Sig::Custom("NOPE".into())),
        None
    );
    let source = Source::Ssh("127.0.0.1:40222".parse().unwrap());
    assert_eq!(source.to_string(), "ssh:127.0.0.1:40222");
    let key = russh::keys::PublicKey::from_openssh(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGm1hK4bQ3OeXf2o2X3dZ6J4m8o3QbU9gWm0Vt1xS8hF someone@somewhere",
    )
    .unwrap();
    assert_eq!(
        super::openssh_key(&key),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGm1hK4bQ3OeXf2o2X3dZ6J4m8o3QbU9gWm0Vt1xS8hF"
    );
}

#[test]
fn one_connection_carries_commands_side_by_side_up_to_its_limit() {
    let world = World::new();
    let h = world.hearthd();
    world.ssh(&h, &[], "hearth", &["new", "mux"], b"").ok();
    let ctl = world.dir.path().join("ctl");
    let path = format!("ControlPath={}", ctl.display());
    // A connection is one login, so one user: its sessions are all in VM mux.
    let _master = world.ssh_spawn(&h, &["-M", "-N", "-o", &path], "mux", &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ctl.exists() {
        assert!(Instant::now() < deadline, "the master never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let marker = |i: usize| format!("3.25{i:02}");
    let sessions: Vec<Session> = (0..super::MAX_SESSIONS)
        .map(|i| {
            world.ssh_spawn(
                &h,
                &["-o", &path],
                "mux",
                &[&format!("sleep {}", marker(i))],
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Each: its mux client and the guest's sleep.
    while (0..super::MAX_SESSIONS).any(|i| pids_with_arg(&marker(i)).len() < 2) {
        assert!(Instant::now() < deadline, "not all sessions started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused = world.ssh(&h, &["-o", &path], "mux", &["true"], b"");
    // (OpenSSH's mux client says so, and exits 0 all the same.)
    assert!(
        refused.stderr.contains("Session open refused by peer"),
        "{refused:?}"
    );
    for session in sessions {
        assert_eq!(session.exit_status(), 0);
    }
    // Their slots are free again.
    world.ssh(&h, &["-o", &path], "mux", &["true"], b"").ok();
    world.ssh(&h, &[], "hearth", &["delete", "mux"], b"").ok();
}

/// `secret set` over the command account reads the value from the channel's stdin; the value
/// never comes back over SSH, and one given as an argument is refused.
#[test]
fn a_secret_is_set_over_ssh_from_the_channels_stdin() {
    let world = World::new();
    let h = world.hearthd();
    let set = world
        .ssh(
            &h,
            &[],
            "hearth",
            &["secret", "set", "SSH_TOKEN"],
            b"over-ssh-9c1f\n",
        )
        .ok();
    assert_eq!(set.out(), "set secret SSH_TOKEN of default\n");
    let list = world
        .ssh(&h, &[], "hearth", &["--", "--json", "secret", "list"], b"")
        .ok();
    assert_eq!(json(&list)[0]["name"], "SSH_TOKEN", "{list:?}");
    assert!(!list.out().contains("over-ssh-9c1f"));
    let service = h.service.clone().unwrap();
    let value =
        h.rt.as_ref()
            .unwrap()
            .block_on(async move { service.secrets().resolve("default", "SSH_TOKEN").await })
            .unwrap()
            .unwrap();
    assert_eq!(value.expose(), "over-ssh-9c1f");
    let argv = world.ssh(
        &h,
        &[],
        "hearth",
        &["secret", "set", "ON_ARGV", "a-value"],
        b"",
    );
    assert_eq!(argv.status, 2, "{argv:?}");
    let help = world.ssh(&h, &[], "hearth", &["help"], b"").ok();
    assert!(help.out().contains("\n  secret set NAME"), "{}", help.out());
}
