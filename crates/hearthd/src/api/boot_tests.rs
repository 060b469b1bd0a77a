//! Tier-2 tests that boot: the real router, store and VM service over TCP on loopback, with the
//! [`DoubleVmm`] whose guests are real `hearth-guest` processes. No root, KVM or QEMU; seconds.
//!
//! Each "hearthd" is a tokio runtime of its own, so a test can drop one (every task and
//! connection of it goes, as when the process dies) and start another on the same data dir.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::{AppState, router};
use crate::config::NetworkConfig;
use crate::image::Image;
use crate::net::Network;
use crate::net::helper::RecordingHelper;
use crate::store::Store;
use crate::testing;
use crate::vm::{ImageState, VmService};
use crate::vmm::double::DoubleVmm;
use crate::vmm::process_with_arg;
use hearth_helper::proto::Request;

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
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One temp dir with a data dir and a tiny real image, shared by the hearthds of a test.
struct World {
    dir: tempfile::TempDir,
    image: Image,
    _reaper: Reaper,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let image = testing::image(&dir.path().join("data"), 1024);
        let reaper = Reaper(dir.path().to_owned());
        World {
            dir,
            image,
            _reaper: reaper,
        }
    }

    /// True when `pid` is a live process (not a zombie) started for this world.
    fn runs(&self, pid: u32) -> bool {
        let marker = self.dir.path().display().to_string();
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Loses the recorded VMM pid of VM `name`, as a hearthd that died between launching a VMM
    /// and recording its pid would have.
    fn forget_pid(&self, name: &str) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = format!("sqlite://{}", self.data().join("hearth.db").display());
        rt.block_on(async {
            let store = Store::open(&url).await.unwrap();
            store
                .execute_for_test("UPDATE vms SET pid = NULL WHERE name = $1", name)
                .await;
            store.close().await;
        });
    }

    /// Where the "guest" keeps files: the agent runs on this host.
    fn guest_path(&self, rel: &str) -> PathBuf {
        self.dir.path().join("guest").join(rel)
    }

    /// Starts a hearthd on this world's data dir, recovering what the last one left.
    fn hearthd(&self) -> Hearthd {
        self.hearthd_with(None)
    }

    /// [`World::hearthd`] with networking through `helper` (shared by the hearthds of a test,
    /// as the host's kernel state is), on `network`, a loopback /16 (every address in 127/8 is
    /// local), with the metadata service answering `guest` (the helper's service sockets are
    /// real, on loopback).
    fn hearthd_with(&self, net: Option<(Arc<RecordingHelper>, &str, &str)>) -> Hearthd {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (data, image) = (self.data(), self.image.clone());
        let (service, base) = rt.block_on(async move {
            let config = testing::config(&data);
            let store = Store::open(&config.database_url).await.unwrap();
            let (tx, rx) = watch::channel(ImageState::Ready(image));
            std::mem::forget(tx);
            let vmm = DoubleVmm::new().unwrap_or_else(|e| panic!("{e}"));
            let request_timeout = config.request_timeout;
            let guard = Arc::new(super::guard::Guard::new(config.listen, &config.server));
            let network = match net {
                Some((helper, cidr, guest)) => {
                    let net_config = NetworkConfig {
                        cidr: cidr.parse().unwrap(),
                        helper_socket: None,
                        outbound_interface: None,
                        dns_upstream: vec!["127.0.0.1:9".parse().unwrap()],
                    };
                    Some(
                        Network::with_helper_for(
                            net_config,
                            &data,
                            store.clone(),
                            helper,
                            None,
                            guest.parse().unwrap(),
                        )
                        .await
                        .unwrap(),
                    )
                }
                None => None,
            };
            let service =
                VmService::with_network(Arc::new(config), store, Arc::new(vmm), rx, network);
            service.recover().await.unwrap();
            let app = router(AppState {
                service: service.clone(),
                request_timeout,
                guard,
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
            tokio::spawn(async move { axum::serve(listener, app).await });
            (service, base)
        });
        Hearthd {
            rt: Some(rt),
            service: Some(service),
            base,
            http: reqwest::Client::new(),
        }
    }
}

/// One hearthd: its runtime, service and API address.
struct Hearthd {
    rt: Option<tokio::runtime::Runtime>,
    service: Option<VmService>,
    base: String,
    http: reqwest::Client,
}

impl Drop for Hearthd {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // As when hearthd dies: every task, and so every agent connection, ends.
            let _enter = rt.enter();
            drop(self.service.take());
            drop(_enter);
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Hearthd {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.as_ref().unwrap().block_on(f)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.block_on(async {
            let url = format!("http://{}{path}", self.base);
            let mut req = self
                .http
                .request(method.parse().unwrap(), url)
                .timeout(Duration::from_secs(30));
            if let Some(body) = body {
                req = req.json(&body);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        })
    }

    fn vm(&self, name: &str) -> Value {
        let (s, vm) = self.call("GET", &format!("/v1/vms/{name}"), None);
        assert_eq!(s, 200, "{vm}");
        vm
    }

    /// The VM's agent pid, checked to be a live process serving that VM's run dir.
    fn agent_pid(&self, name: &str) -> u32 {
        let vm = self.vm(name);
        let pid =
            u32::try_from(vm["pid"].as_u64().unwrap_or_else(|| panic!("no pid: {vm}"))).unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let id = vm["id"].as_str().unwrap();
        assert!(
            String::from_utf8_lossy(&cmdline).contains(&format!("run/{id}/guest.sock")),
            "pid {pid} is not the agent of {name}"
        );
        pid
    }

    fn exec(&self, name: &str, body: Value) -> Value {
        let (s, out) = self.call("POST", &format!("/v1/vms/{name}/exec"), Some(body));
        assert_eq!(s, 200, "{out}");
        out
    }

    fn wait_state(&self, name: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let vm = self.vm(name);
            if vm["state"] == state {
                return vm;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never became {state}: {vm}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `command` through the exec WebSocket (on a PTY when `pty`), sending `input` as
    /// stdin and, without a PTY, an end of stdin after it; returns stdout, stderr and the exit
    /// message.
    fn ws_exec(
        &self,
        name: &str,
        command: &[&str],
        pty: bool,
        input: &[u8],
    ) -> (String, String, Value) {
        self.block_on(async {
            let url = format!("ws://{}/v1/vms/{name}/exec/ws", self.base);
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let tty = pty.then(|| json!({"rows": 30, "cols": 100}));
            let start = json!({"type": "start", "command": command, "tty": tty, "stdin": true});
            ws.send(Message::Text(start.to_string().into()))
                .await
                .unwrap();
            ws.send(Message::Binary(input.to_vec().into()))
                .await
                .unwrap();
            if !pty {
                let eof = json!({"type": "eof"}).to_string();
                ws.send(Message::Text(eof.into())).await.unwrap();
            }
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            let read = async {
                while let Some(msg) = ws.next().await {
                    match msg.unwrap() {
                        Message::Binary(b) => match b[0] {
                            hearth_api::WS_STDOUT => stdout.extend_from_slice(&b[1..]),
                            hearth_api::WS_STDERR => stderr.extend_from_slice(&b[1..]),
                            other => panic!("unknown stream {other}"),
                        },
                        Message::Text(t) => return serde_json::from_str::<Value>(&t).unwrap(),
                        _ => {}
                    }
                }
                panic!("the WebSocket closed without an exit message");
            };
            let exit = tokio::time::timeout(Duration::from_secs(20), read)
                .await
                .unwrap();
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            (text(&stdout), text(&stderr), exit)
        })
    }
}

fn assert_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    // A zombie not reaped yet has an empty command line.
    while std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()) {
        assert!(Instant::now() < deadline, "agent {pid} still runs");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn serial_log(world: &World, id: &str) -> String {
    std::fs::read_to_string(world.data().join("vms").join(id).join("serial.log"))
        .unwrap_or_default()
}

#[test]
fn a_vm_of_the_double_lives_a_whole_life() {
    let world = World::new();
    let hearthd = world.hearthd();

    let (s, vm) = hearthd.call("POST", "/v1/vms", Some(json!({"name": "dbl"})));
    assert_eq!(s, 201, "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["vmm"], "double");
    let id = vm["id"].as_str().unwrap().to_owned();
    let run_dir = world.data().join("run").join(&id);
    let first = hearthd.agent_pid("dbl");

    // Exec: exit code and both streams.
    let out = hearthd.exec(
        "dbl",
        json!({"command": ["sh", "-c", "echo out; echo err >&2; exit 3"]}),
    );
    assert_eq!(
        (&out["exit_code"], &out["stdout"], &out["stderr"]),
        (&json!(3), &json!("out\n"), &json!("err\n"))
    );
    // Exec with stdin.
    let out = hearthd.exec(
        "dbl",
        json!({"command": ["sh", "-c", "tr a-z A-Z; echo done"], "stdin": "hello\nworld\n"}),
    );
    assert_eq!(out["stdout"], "HELLO\nWORLD\ndone\n", "{out}");

    // A PTY over the WebSocket: a terminal, stdin typed into it, the exit status.
    let (output, stderr, exit) = hearthd.ws_exec(
        "dbl",
        &[
            "sh",
            "-c",
            "tty; stty size; read line; echo got:$line >&2; exit 7",
        ],
        true,
        b"typed\n",
    );
    assert_eq!(stderr, "", "a PTY has one stream");
    assert!(output.contains("/dev/pts/"), "{output:?}");
    assert!(output.contains("30 100"), "{output:?}");
    assert!(output.contains("got:typed"), "{output:?}");
    assert_eq!(exit["type"], "exit", "{exit}");
    assert_eq!(exit["exit_code"], 7, "{exit}");

    // Streamed stdin without a PTY, ended by `eof`: the command sees its end of input.
    let (stdout, stderr, exit) = hearthd.ws_exec(
        "dbl",
        &["sh", "-c", "wc -c; echo oops >&2"],
        false,
        &[b'x'; 100_000],
    );
    assert_eq!((stdout.trim(), stderr.as_str()), ("100000", "oops\n"));
    assert_eq!(exit["exit_code"], 0, "{exit}");

    // Files: a round trip of bytes that are not text, through new parent directories.
    let file = world.guest_path("a/b/blob.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let url = format!("http://{}/v1/vms/dbl/files", hearthd.base);
    let path = file.display().to_string();
    let (put, got, mode) = hearthd.block_on(async {
        let put = hearthd
            .http
            .put(&url)
            .query(&[("path", path.as_str()), ("mode", "600")])
            .body(data.clone())
            .send()
            .await
            .unwrap()
            .status();
        let resp = hearthd
            .http
            .get(&url)
            .query(&[("path", path.as_str())])
            .send()
            .await
            .unwrap();
        let mode = resp.headers()["x-hearth-file-mode"]
            .to_str()
            .unwrap()
            .to_owned();
        (put, resp.bytes().await.unwrap(), mode)
    });
    assert!(put.is_success(), "{put}");
    assert_eq!(mode, "600");
    assert!(got[..] == data[..], "the download differs from the upload");
    assert!(std::fs::read(&file).unwrap() == data);

    // A graceful stop: the agent is asked to shut down and exits (no reboot(2) on this host).
    let (s, vm) = hearthd.call("POST", "/v1/vms/dbl/stop", None);
    assert_eq!((s, &vm["state"]), (200, &json!("stopped")), "{vm}");
    assert_gone(first);
    assert!(serial_log(&world, &id).contains("shutdown (Poweroff) requested"));
    let vm = hearthd.vm("dbl");
    let stop = vm["events"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["to_state"] == "stopped");
    assert_eq!(stop.unwrap()["message"], "guest powered off", "{vm}");
    assert!(!run_dir.exists());

    // Start again, then restart: a new agent each time, and it answers.
    let (s, vm) = hearthd.call("POST", "/v1/vms/dbl/start", None);
    assert_eq!((s, &vm["state"]), (200, &json!("running")), "{vm}");
    let second = hearthd.agent_pid("dbl");
    assert_ne!(second, first);
    assert_eq!(
        hearthd.exec("dbl", json!({"command": ["true"]}))["exit_code"],
        0
    );
    let (s, vm) = hearthd.call("POST", "/v1/vms/dbl/restart", None);
    assert_eq!((s, &vm["state"]), (200, &json!("running")), "{vm}");
    let third = hearthd.agent_pid("dbl");
    assert_ne!(third, second);
    assert_gone(second);
    assert_eq!(
        hearthd.exec("dbl", json!({"command": ["true"]}))["exit_code"],
        0
    );

    // The "VM" dies on its own: the monitor notices and cleans up.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(third).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let vm = hearthd.wait_state("dbl", "stopped");
    let exited = vm["events"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["to_state"] == "stopped");
    assert!(
        exited.unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("VMM process exited"),
        "{vm}"
    );
    assert!(vm["pid"].is_null(), "{vm}");
    assert!(!run_dir.exists());

    // Delete leaves nothing: no process, no run dir, no VM dir.
    let (s, vm) = hearthd.call("POST", "/v1/vms/dbl/start", None);
    assert_eq!((s, &vm["state"]), (200, &json!("running")), "{vm}");
    let fourth = hearthd.agent_pid("dbl");
    let (s, body) = hearthd.call("DELETE", "/v1/vms/dbl", None);
    assert_eq!(s, 204, "{body}");
    assert_eq!(hearthd.call("GET", "/v1/vms/dbl", None).0, 404);
    assert_gone(fourth);
    assert_eq!(process_with_arg(&world.data().display().to_string()), None);
    assert!(!run_dir.exists());
    assert!(!world.data().join("vms").join(&id).exists());
}

#[test]
fn a_new_hearthd_readopts_running_vms_and_settles_gone_ones() {
    let world = World::new();
    let first = world.hearthd();
    for name in ["keep", "gone"] {
        let (s, vm) = first.call("POST", "/v1/vms", Some(json!({"name": name})));
        assert_eq!((s, &vm["state"]), (201, &json!("running")), "{vm}");
    }
    let keep = first.agent_pid("keep");
    let gone = first.agent_pid("gone");
    let put = world.guest_path("state.txt");
    let out = first.exec(
        "keep",
        json!({"command": ["sh", "-c", format!("mkdir -p {0} && echo before > {0}/state.txt", put.parent().unwrap().display())]}),
    );
    assert_eq!(out["exit_code"], 0, "{out}");
    // hearthd dies; its VMs keep running. One of them dies too while no hearthd watches.
    drop(first);
    assert!(world.runs(keep), "the agent outlives hearthd");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(gone).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_gone(gone);
    // And its record lost the pid of the one that still runs: it is found by its run directory,
    // not started a second time on the same disk.
    world.forget_pid("keep");

    let second = world.hearthd();
    let vm = second.vm("keep");
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(
        second.agent_pid("keep"),
        keep,
        "the same agent is re-adopted"
    );
    assert!(
        vm["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "readopted"),
        "{vm}"
    );
    // The re-attached agent answers on a new connection.
    let out = second.exec(
        "keep",
        json!({"command": ["cat", put.display().to_string()]}),
    );
    assert_eq!(out["stdout"], "before\n", "{out}");
    let vm = second.vm("gone");
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert!(vm["pid"].is_null(), "{vm}");

    // The new hearthd's monitor watches the adopted agent.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(keep).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    second.wait_state("keep", "stopped");
    for name in ["keep", "gone"] {
        assert_eq!(
            second.call("DELETE", &format!("/v1/vms/{name}"), None).0,
            204
        );
    }
    assert_eq!(process_with_arg(&world.data().display().to_string()), None);
    let left: Vec<_> = std::fs::read_dir(world.data().join("run"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// An HTTP GET to `to` from source address `from` (both loopback): the status line and body.
async fn http_from(from: &str, to: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(to).await.unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    let read = stream.read_to_string(&mut text);
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

#[test]
fn a_networked_vm_gets_a_slot_its_own_metadata_and_gives_everything_back() {
    let world = World::new();
    let helper = Arc::new(RecordingHelper::default());
    // The guests' fixed inner address, played on loopback.
    let (cidr, guest) = ("127.77.0.0/16", "127.78.0.2");
    let d = world.hearthd_with(Some((helper.clone(), cidr, guest)));

    // A create naming a network that does not exist makes nothing.
    let (s, body) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "x", "networks": ["nope"]})),
    );
    assert_eq!(
        (s, body["error"].as_str()),
        (404, Some("network_not_found")),
        "{body}"
    );
    let (_, list) = d.call("GET", "/v1/vms", None);
    assert_eq!(list, json!([]));
    // Nor does a bad egress policy, and the message names the field.
    let (s, body) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "x", "egress": {"allow_cidrs": ["10.0.0.1/8"]}})),
    );
    assert_eq!(s, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("egress.allow_cidrs"),
        "{body}"
    );

    let (s, a) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "a", "user_data": "#cloud-config\n", "ssh_authorized_keys": ["ssh-ed25519 AAAA a@x"]})),
    );
    assert_eq!(s, 201, "{a}");
    assert_eq!(a["network"]["address"], "127.77.0.2");
    assert_eq!(a["network"]["host_address"], "127.77.0.1");
    assert_eq!(a["network"]["subnet"], "127.77.0.0/30");
    let (s, b) = d.call("POST", "/v1/vms", Some(json!({"name": "b"})));
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["network"]["address"], "127.77.0.6");
    assert_eq!(helper.slots.lock().unwrap().len(), 2);
    let ops = helper.ops();
    for op in [
        "hello",
        "setup",
        "create_slot",
        "apply_host_rules",
        "open_tap",
        "open_services",
    ] {
        assert!(ops.contains(&op), "{op} missing from {ops:?}");
    }

    // Each VM reads its own metadata on its own slot's socket, answered to the guest only.
    let a_id = a["id"].as_str().unwrap().to_owned();
    let a_md = helper.metadata_of(&a_id);
    let (status, name) = d.block_on(http_from(guest, a_md, "/v1/instance/name"));
    assert!(status.contains("200"), "{status}");
    assert_eq!(name.trim(), "a");
    let (_, keys) = d.block_on(http_from(guest, a_md, "/v1/ssh-keys"));
    assert_eq!(keys.trim(), "ssh-ed25519 AAAA a@x");
    let (_, user_data) = d.block_on(http_from(guest, a_md, "/v1/user-data"));
    assert_eq!(user_data, "#cloud-config\n");
    let b_md = helper.metadata_of(b["id"].as_str().unwrap());
    let (_, name) = d.block_on(http_from(guest, b_md, "/v1/instance/name"));
    assert_eq!(name.trim(), "b", "b's socket answers about b");
    let (status, _) = d.block_on(http_from("127.77.0.6", a_md, "/v1/instance/name"));
    assert!(
        status.contains("403"),
        "a peer that is not the guest: {status}"
    );

    // An egress change on a running VM reaches its slot, and is an event.
    let (s, detail) = d.call(
        "PUT",
        "/v1/vms/a/egress",
        Some(json!({"allow_cidrs": ["192.0.2.0/24"], "allow_ports": [443]})),
    );
    assert_eq!(s, 200, "{detail}");
    assert_eq!(detail["network"]["egress"]["mode"], "deny_all");
    assert!(
        detail["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "egress_changed"),
        "{detail}"
    );
    let sent = helper
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| matches!(r, Request::SetEgress { egress, .. } if egress.allow_ports == [443]));
    assert!(sent, "no set_egress reached the helper");
    // Its DNS forwarder, on its slot's socket, holds it to the new policy: no allowed domain,
    // so every name is NXDOMAIN (at once: no upstream is asked).
    let dns = helper.services.lock().unwrap()[&hearth_helper::proto::SlotId {
        instance: crate::net::instance_of(&world.data()),
        vm: a_id.clone(),
    }]
        .dns;
    let udp = std::net::UdpSocket::bind((guest, 0)).unwrap();
    udp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    query.extend(b"\x07example\x03com\x00\x00\x01\x00\x01");
    udp.send_to(&query, dns).unwrap();
    let mut answer = [0u8; 512];
    let n = udp.recv(&mut answer).unwrap();
    assert!(n >= 12 && answer[..2] == [0x12, 0x34], "{:?}", &answer[..n]);
    assert_eq!(answer[3] & 0x0f, 3, "NXDOMAIN under deny_all");

    // Private networks: membership is an event, and reaches the host rules.
    let (s, _) = d.call("POST", "/v1/networks", Some(json!({"name": "backend"})));
    assert_eq!(s, 201);
    let (s, net) = d.call("PUT", "/v1/networks/backend/members/a", None);
    assert_eq!((s, net["members"].clone()), (200, json!(["a"])), "{net}");
    let last_rules = helper
        .requests
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find_map(|r| match r {
            Request::ApplyHostRules { rules } => Some(rules.clone()),
            _ => None,
        });
    let rules = last_rules.expect("host rules were applied");
    assert_eq!(rules.networks.len(), 1);
    assert_eq!(
        rules.networks[0].members,
        ["127.77.0.2".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    let (s, body) = d.call("DELETE", "/v1/networks/backend", None);
    assert_eq!(
        (s, body["error"].as_str()),
        (409, Some("network_in_use")),
        "{body}"
    );

    // A stop gives the slot back but keeps the address; a start gets the same one.
    let (s, _) = d.call("POST", "/v1/vms/b/stop", None);
    assert_eq!(s, 200);
    assert_eq!(helper.slots.lock().unwrap().len(), 1);
    assert_eq!(d.vm("b")["network"]["address"], "127.77.0.6");

    // A slot the store knows no running VM for (a crash left it) goes at the next start.
    helper
        .slots
        .lock()
        .unwrap()
        .insert(hearth_helper::proto::SlotId {
            instance: crate::net::instance_of(&world.data()),
            vm: "00000000deadbeef".into(),
        });
    drop(d);
    let d = world.hearthd_with(Some((helper.clone(), cidr, guest)));
    let slots: Vec<String> = helper
        .slots
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.vm.clone())
        .collect();
    assert_eq!(
        slots,
        [a["id"].as_str().unwrap()],
        "only the running VM keeps a slot"
    );
    // The re-adopted VM serves its metadata again, on sockets the helper made anew.
    let a_md = helper.metadata_of(&a_id);
    let (_, name) = d.block_on(http_from(guest, a_md, "/v1/instance/name"));
    assert_eq!(name.trim(), "a");

    // Deleting gives everything back: the slot, the address (the next VM gets it).
    for vm in ["a", "b"] {
        let (s, _) = d.call("DELETE", &format!("/v1/vms/{vm}"), None);
        assert_eq!(s, 204);
    }
    assert!(helper.slots.lock().unwrap().is_empty());
    let (s, c) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "c", "start": false})),
    );
    assert_eq!(s, 201, "{c}");
    assert_eq!(c["network"]["address"], "127.77.0.2");
    let (s, _) = d.call("DELETE", "/v1/vms/c", None);
    assert_eq!(s, 204);
}

#[test]
fn a_stopped_vm_is_resized_and_starts_with_its_new_shape() {
    let world = World::new();
    let d = world.hearthd();
    let (s, vm) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "rs", "rootfs_size": "1G"})),
    );
    assert_eq!(s, 201, "{vm}");
    let id = vm["id"].as_str().unwrap().to_owned();
    let disk = world.data().join("vms").join(&id).join("rootfs.ext4");
    let resize = |body: serde_json::Value| d.call("POST", "/v1/vms/rs/resize", Some(body));

    // A running VM is not resized.
    let (s, body) = resize(json!({"cpus": 2}));
    assert_eq!(
        (s, body["error"].as_str()),
        (409, Some("invalid_state")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("stop"), "{body}");
    let (s, _) = d.call("POST", "/v1/vms/rs/stop", None);
    assert_eq!(s, 200);

    // Bad input names the field and the rule, and changes nothing.
    for (body, code, says) in [
        (json!({}), "invalid_request", "at least one"),
        (json!({"cpus": 3}), "invalid_cpus", "even"),
        (json!({"ram": "64M"}), "invalid_ram", "128"),
        (
            json!({"rootfs_size": "512M"}),
            "invalid_rootfs_size",
            "only grows",
        ),
        (json!({"disk": "2G"}), "invalid_request", "disk"),
    ] {
        let (s, answer) = resize(body.clone());
        assert_eq!(
            (s, answer["error"].as_str()),
            (400, Some(code)),
            "{body}: {answer}"
        );
        assert!(
            answer["message"].as_str().unwrap().contains(says),
            "{answer}"
        );
    }
    let (s, nope) = d.call("POST", "/v1/vms/nope/resize", Some(json!({"cpus": 2})));
    assert_eq!((s, nope["error"].as_str()), (404, Some("vm_not_found")));
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 30);

    // cpus and memory both ways, the disk up: the file and its filesystem grow.
    let (s, detail) = resize(json!({"cpus": 2, "ram": "512M", "rootfs_size": "2G"}));
    assert_eq!(s, 200, "{detail}");
    assert_eq!(
        (
            &detail["cpus"],
            &detail["memory_mib"],
            &detail["rootfs_mib"]
        ),
        (&json!(2), &json!(512), &json!(2048))
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 2 << 30);
    let blocks = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(&disk)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&blocks.stdout);
    let count: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no block count in {text}"));
    let size: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert_eq!(count * size, 2 << 30, "the filesystem fills the grown disk");
    let event = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "resized")
        .cloned()
        .expect("a resized event");
    assert_eq!(
        event["message"],
        "cpus 1 -> 2, ram 1024 -> 512 MiB, rootfs 1024 -> 2048 MiB"
    );
    let (s, smaller) = resize(json!({"cpus": 1, "ram": "256M"}));
    assert_eq!(s, 200, "{smaller}");
    assert_eq!(
        (&smaller["cpus"], &smaller["memory_mib"]),
        (&json!(1), &json!(256))
    );

    // It starts with its new shape.
    let (s, started) = d.call("POST", "/v1/vms/rs/start", None);
    assert_eq!(s, 200, "{started}");
    assert_eq!(started["rootfs_mib"], 2048);
    let (s, _) = d.call("DELETE", "/v1/vms/rs", None);
    assert_eq!(s, 204);
}

#[test]
fn backups_restore_only_into_their_vm_and_leave_nothing_half_made() {
    let world = World::new();
    let d = world.hearthd();
    for name in ["bk", "other"] {
        let (s, vm) = d.call(
            "POST",
            "/v1/vms",
            Some(json!({"name": name, "start": false, "rootfs_size": "1G"})),
        );
        assert_eq!(s, 201, "{vm}");
    }
    let (_, bk) = d.call("GET", "/v1/vms/bk", None);
    let id = bk["id"].as_str().unwrap().to_owned();
    let disk = world.data().join("vms").join(&id).join("rootfs.ext4");
    let backups = world.data().join("backups").join(&id);
    // A marker in the disk's bytes stands for the guest's files.
    let mark = |text: &[u8]| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(text, 600 << 20).unwrap();
    };
    let marked = || {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 6];
        std::fs::File::open(&disk)
            .unwrap()
            .read_exact_at(&mut buf, 600 << 20)
            .unwrap();
        buf
    };
    mark(b"first!");

    let (s, made) = d.call("POST", "/v1/vms/bk/backups", None);
    assert_eq!(s, 201, "{made}");
    let backup = made["id"].as_str().unwrap().to_owned();
    assert_eq!(made["vm"], "bk");
    assert_eq!(made["created_by"], "operator");
    assert_eq!(
        (&made["cpus"], &made["rootfs_mib"]),
        (&json!(1), &json!(1024))
    );
    assert!(made["size_bytes"].as_u64().unwrap() > 0, "{made}");
    let (s, list) = d.call("GET", "/v1/vms/bk/backups", None);
    assert_eq!((s, list.as_array().unwrap().len()), (200, 1), "{list}");
    assert_eq!(list[0], made);

    // The disk changes and grows; the restore brings back the backed-up bytes and size.
    mark(b"second");
    let (s, _) = d.call(
        "POST",
        "/v1/vms/bk/resize",
        Some(json!({"rootfs_size": "2G"})),
    );
    assert_eq!(s, 200);
    let restore = |vm: &str, backup: &str| {
        d.call(
            "POST",
            &format!("/v1/vms/{vm}/restore"),
            Some(json!({ "backup": backup })),
        )
    };
    // Only into its own VM, and only a backup that exists.
    let (s, body) = restore("other", &backup);
    assert_eq!(
        (s, body["error"].as_str()),
        (404, Some("backup_not_found")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("only into the VM"),
        "{body}"
    );
    let (s, body) = restore("bk", "0000000000000000");
    assert_eq!(
        (s, body["error"].as_str()),
        (404, Some("backup_not_found")),
        "{body}"
    );
    let (s, detail) = restore("bk", &backup);
    assert_eq!(s, 200, "{detail}");
    assert_eq!(detail["rootfs_mib"], 1024);
    assert_eq!(&marked(), b"first!");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 30);
    let kinds: Vec<&str> = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"backup_created") && kinds.contains(&"restored"),
        "{kinds:?}"
    );

    // A running VM is neither backed up nor restored.
    let (s, _) = d.call("POST", "/v1/vms/bk/start", None);
    assert_eq!(s, 200);
    let (s, body) = d.call("POST", "/v1/vms/bk/backups", None);
    assert_eq!(
        (s, body["error"].as_str()),
        (409, Some("invalid_state")),
        "{body}"
    );
    let (s, body) = restore("bk", &backup);
    assert_eq!(
        (s, body["error"].as_str()),
        (409, Some("invalid_state")),
        "{body}"
    );
    let (s, _) = d.call("POST", "/v1/vms/bk/stop", None);
    assert_eq!(s, 200);

    // What a crash leaves (an unfinished copy, a file no row names, a restore's new disk) is
    // gone after the next start; recorded backups stay.
    std::fs::write(backups.join("1111111111111111.partial"), b"half").unwrap();
    std::fs::write(backups.join("2222222222222222.ext4"), b"unrecorded").unwrap();
    std::fs::write(disk.with_file_name("rootfs.ext4.restore"), b"half").unwrap();
    // A restore of a bigger disk renamed in place, its size not yet recorded.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(3 << 30)
        .unwrap();
    drop(d);
    let d = world.hearthd();
    let (_, after) = d.call("GET", "/v1/vms/bk", None);
    assert_eq!(after["rootfs_mib"], 3072, "the disk in place is recorded");
    let mut left: Vec<String> = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [format!("{backup}.ext4")]);
    assert!(!disk.with_file_name("rootfs.ext4.restore").exists());

    // Deleting a backup, then the VM, leaves nothing of either.
    let (s, _) = d.call("DELETE", &format!("/v1/vms/bk/backups/{backup}"), None);
    assert_eq!(s, 204);
    let (s, body) = d.call("DELETE", &format!("/v1/vms/bk/backups/{backup}"), None);
    assert_eq!((s, body["error"].as_str()), (404, Some("backup_not_found")));
    let (s, _) = d.call("POST", "/v1/vms/bk/backups", None);
    assert_eq!(s, 201);
    let (s, _) = d.call("DELETE", "/v1/vms/bk", None);
    assert_eq!(s, 204);
    assert!(!backups.exists(), "the VM's backups went with it");
    let (s, _) = d.call("DELETE", "/v1/vms/other", None);
    assert_eq!(s, 204);
}

#[test]
fn an_export_imports_whole_under_its_name_and_a_damaged_one_leaves_nothing() {
    use sha2::Digest;
    let world = World::new();
    let helper = Arc::new(RecordingHelper::default());
    let d = world.hearthd_with(Some((helper, "127.77.0.0/16", "127.78.0.2")));
    let create = |name: &str, extra: Value| {
        let mut body = json!({"name": name, "start": false, "rootfs_size": "1G"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (s, vm) = d.call("POST", "/v1/vms", Some(body));
        assert_eq!(s, 201, "{vm}");
        vm
    };
    let mv = create(
        "mv",
        json!({"cpus": 2, "ram": "256M", "egress": {"allow_cidrs": ["10.1.0.0/16"]}, "user_data": "hello"}),
    );
    create("other", json!({}));
    let old_id = mv["id"].as_str().unwrap().to_owned();
    let old_dir = world.data().join("vms").join(&old_id);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(old_dir.join("rootfs.ext4"))
            .unwrap();
        f.write_all_at(b"moved!", 600 << 20).unwrap();
    }
    std::fs::write(old_dir.join("serial.log"), b"console line\n").unwrap();
    let sha =
        |path: &std::path::Path| hex_digest(&sha2::Sha256::digest(std::fs::read(path).unwrap()));
    let disk_sha = sha(&old_dir.join("rootfs.ext4"));

    let get = |path: &str| {
        d.block_on(async {
            let resp = d
                .http
                .get(format!("http://{}{path}", d.base))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let len = resp.content_length();
            (status, len, resp.bytes().await.unwrap().to_vec())
        })
    };
    let import = |bytes: Vec<u8>| {
        d.block_on(async {
            let resp = d
                .http
                .post(format!("http://{}/v1/imports", d.base))
                .header("content-type", "application/x-tar")
                .body(bytes)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        })
    };
    // A running VM is not exported.
    let (s, _) = d.call("POST", "/v1/vms/other/start", None);
    assert_eq!(s, 200);
    let (s, _, body) = get("/v1/vms/other/export");
    assert_eq!(s, 409, "{}", String::from_utf8_lossy(&body));
    let (s, _) = d.call("POST", "/v1/vms/other/stop", None);
    assert_eq!(s, 200);

    let (s, len, archive) = get("/v1/vms/mv/export");
    assert_eq!(s, 200);
    assert_eq!(len, Some(archive.len() as u64));
    assert!(
        archive.len() < 64 << 20,
        "the disk's holes do not travel: {}",
        archive.len()
    );
    let (s, taken) = import(archive.clone());
    assert_eq!(
        (s, taken["error"].as_str()),
        (409, Some("vm_name_taken")),
        "{taken}"
    );

    // Moved: deleted here, its /30 taken by another VM, then imported.
    let (s, _) = d.call("DELETE", "/v1/vms/mv", None);
    assert_eq!(s, 204);
    let third = create("third", json!({}));
    assert_eq!(third["network"]["subnet"], mv["network"]["subnet"]);
    let imports = world.data().join("imports");
    let no_leftovers = |what: &str| {
        let left = std::fs::read_dir(&imports).map_or(0, |d| d.count());
        assert_eq!(left, 0, "{what}: the import left files");
        let (_, list) = d.call("GET", "/v1/vms", None);
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["other", "third"], "{what}");
        assert_eq!(
            std::fs::read_dir(world.data().join("vms")).unwrap().count(),
            2,
            "{what}: a VM directory was left"
        );
    };
    // Damaged archives: cut short, a flipped byte in the disk, a newer manifest version.
    let refused = |bytes: Vec<u8>, what: &str, says: &str| {
        let (s, body) = import(bytes);
        assert_eq!(
            (s, body["error"].as_str()),
            (400, Some("invalid_archive")),
            "{what}: {body}"
        );
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(says), "{what}: {message}");
        no_leftovers(what);
    };
    refused(
        archive[..archive.len() / 2].to_vec(),
        "cut in half",
        "cut short",
    );
    let mut flipped = archive.clone();
    let at = flipped.windows(6).position(|w| w == b"moved!").unwrap();
    flipped[at] ^= 1;
    refused(flipped, "a flipped byte", "does not match its checksum");
    let text = String::from_utf8_lossy(&archive[512..1024]).into_owned();
    assert!(text.contains("\"version\": 1,"), "{text}");
    let mut newer = archive.clone();
    let v = 512 + text.find("\"version\": 1,").unwrap() + "\"version\": ".len();
    newer[v] = b'7';
    refused(newer, "a newer version", "version 7 is newer");

    let (s, got) = import(archive);
    assert_eq!(s, 201, "{got}");
    assert_eq!(
        (got["name"].as_str(), got["state"].as_str()),
        (Some("mv"), Some("stopped"))
    );
    assert_eq!(
        (&got["cpus"], &got["memory_mib"], &got["rootfs_mib"]),
        (&json!(2), &json!(256), &json!(1024))
    );
    assert_eq!(got["created_by"], "operator");
    assert_eq!(got["created_at"], mv["created_at"]);
    let new_id = got["id"].as_str().unwrap();
    assert_ne!(new_id, old_id, "fresh paths");
    assert_ne!(
        got["network"]["subnet"], mv["network"]["subnet"],
        "a fresh /30"
    );
    assert_eq!(
        got["network"]["egress"]["allow_cidrs"],
        json!(["10.1.0.0/16"])
    );
    let imported = got["events"].as_array().unwrap().iter().any(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("imported"))
    });
    assert!(imported, "{got}");
    let new_dir = world.data().join("vms").join(new_id);
    assert_eq!(sha(&new_dir.join("rootfs.ext4")), disk_sha, "the same disk");
    {
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(new_dir.join("rootfs.ext4"))
            .unwrap()
            .blocks();
        assert!(blocks * 512 < 64 << 20, "the imported disk is sparse");
    }
    assert_eq!(
        std::fs::read(new_dir.join("serial.log")).unwrap(),
        b"console line\n"
    );
    // It boots, with its metadata.
    let (s, _) = d.call("POST", "/v1/vms/mv/start", None);
    assert_eq!(s, 200);
    let (s, _) = d.call("POST", "/v1/vms/mv/stop", None);
    assert_eq!(s, 200);
    for name in ["mv", "other", "third"] {
        let (s, _) = d.call("DELETE", &format!("/v1/vms/{name}"), None);
        assert_eq!(s, 204);
    }
}

fn hex_digest(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn metrics_count_actions_and_promtool_accepts_the_scrape() {
    let world = World::new();
    let d = world.hearthd();
    let (s, vm) = d.call("POST", "/v1/vms", Some(json!({"name": "mx"})));
    assert_eq!(s, 201, "{vm}");
    d.exec("mx", json!({"command": ["true"]}));
    let (s, _) = d.call("POST", "/v1/vms/ghost/start", None);
    assert_eq!(s, 404);
    // What `hearth top` samples: the running VM's VMM process, by pid.
    let (s, stats) = d.call("GET", "/v1/stats", None);
    assert_eq!(s, 200, "{stats}");
    let mx = &stats.as_array().unwrap()[0];
    assert_eq!(
        (&mx["name"], &mx["state"]),
        (&json!("mx"), &json!("running")),
        "{stats}"
    );
    assert!(
        mx["cpu_seconds"].as_f64().is_some_and(|c| c >= 0.0),
        "{stats}"
    );
    assert!(mx["rss_bytes"].as_u64().is_some_and(|r| r > 0), "{stats}");
    assert!(
        mx["uptime_secs"].as_u64().is_some_and(|u| u < 600),
        "{stats}"
    );
    let scrape = |accept: &str| {
        d.block_on(async {
            let resp = d
                .http
                .get(format!("http://{}/metrics", d.base))
                .header("accept", accept)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
            (ct, resp.text().await.unwrap())
        })
    };
    // What Prometheus asks for, and the classic format promtool reads.
    let (content_type, open) =
        scrape("application/openmetrics-text;version=1.0.0,text/plain;q=0.5");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(open.ends_with("# EOF\n"), "{open}");
    let (content_type, text) = scrape("*/*");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    for line in [
        "hearth_action_duration_seconds_count{action=\"create_vm\"} 1",
        "hearth_action_duration_seconds_count{action=\"exec\"} 1",
        "hearth_action_errors_total{action=\"start_vm\",code=\"vm_not_found\"} 1",
        "hearth_vms{state=\"running\"} 1",
        "hearth_vms{state=\"stopped\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    let memory = text
        .lines()
        .find_map(|l| l.strip_prefix("hearth_vm_memory_bytes{vm=\"mx\"} "))
        .unwrap_or_else(|| panic!("no memory of mx in:\n{text}"));
    assert!(memory.parse::<u64>().unwrap() > 0);
    let promtool =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/promtool");
    assert!(
        promtool.exists(),
        "{} is missing: `make deps` (scripts/install-deps.sh) fetches it",
        promtool.display()
    );
    let mut check = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (s, _) = d.call("DELETE", "/v1/vms/mx", None);
    assert_eq!(s, 204);
}

/// The state letter of `/proc/<pid>/stat`: `T` while the double's "guest" is paused.
fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    after.trim_start().chars().next().unwrap()
}

fn last_event(vm: &Value) -> Value {
    vm["events"].as_array().unwrap().last().unwrap().clone()
}

fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[test]
fn a_vm_of_the_double_pauses_and_resumes_across_hearthds() {
    let world = World::new();
    let hearthd = world.hearthd();
    let (s, vm) = hearthd.call("POST", "/v1/vms", Some(json!({"name": "p"})));
    assert_eq!((s, &vm["state"]), (201, &json!("running")), "{vm}");
    let (s, vm) = hearthd.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "cold", "start": false})),
    );
    assert_eq!((s, &vm["state"]), (201, &json!("stopped")), "{vm}");
    let pid = hearthd.agent_pid("p");

    // Only a running VM pauses, and only a paused one resumes.
    let (s, err) = hearthd.call("POST", "/v1/vms/cold/pause", None);
    assert_eq!((s, &err["error"]), (409, &json!("invalid_state")), "{err}");
    assert_eq!(
        err["message"],
        "cannot pause VM \"cold\": it is stopped; only a running VM pauses"
    );
    let (s, err) = hearthd.call("POST", "/v1/vms/p/resume", None);
    assert_eq!((s, &err["error"]), (409, &json!("invalid_state")), "{err}");
    let (s, err) = hearthd.call("POST", "/v1/vms/nope/pause", None);
    assert_eq!(s, 404, "{err}");

    let (s, vm) = hearthd.call("POST", "/v1/vms/p/pause", None);
    assert_eq!((s, &vm["state"]), (200, &json!("paused")), "{vm}");
    assert_eq!(process_state(pid), 'T', "the guest is stopped");
    let paused = last_event(&hearthd.vm("p"));
    assert_eq!(
        (&paused["kind"], &paused["from_state"], &paused["to_state"]),
        (&json!("paused"), &json!("running"), &json!("paused")),
        "{paused}"
    );
    let (s, err) = hearthd.call("POST", "/v1/vms/p/pause", None);
    assert_eq!(
        (s, &err["message"]),
        (409, &json!("cannot pause VM \"p\": it is paused already"))
    );
    let (s, err) = hearthd.call("POST", "/v1/vms/p/start", None);
    assert_eq!(
        (s, &err["message"]),
        (
            409,
            &json!("cannot start VM \"p\": it is paused; resume it")
        )
    );
    // Exec and files need it running; the refusal names the state. Logs still work.
    let (s, err) = hearthd.call("POST", "/v1/vms/p/exec", Some(json!({"command": ["true"]})));
    assert_eq!((s, &err["error"]), (409, &json!("invalid_state")), "{err}");
    assert_eq!(err["message"], "VM \"p\" is paused: exec needs it running");
    let (s, err) = hearthd.call("GET", "/v1/vms/p/files?path=/etc/hostname", None);
    assert_eq!((s, &err["error"]), (409, &json!("invalid_state")), "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("is paused"),
        "{err}"
    );
    let (s, _) = hearthd.call("GET", "/v1/vms/p/logs", None);
    assert_eq!(s, 200, "logs of a paused VM");

    // A new hearthd finds it paused and leaves it so: the same process, still stopped.
    drop(hearthd);
    assert_eq!(process_state(pid), 'T');
    let hearthd = world.hearthd();
    let vm = hearthd.vm("p");
    assert_eq!(vm["state"], "paused", "{vm}");
    assert_eq!(hearthd.agent_pid("p"), pid);
    assert_eq!(
        process_state(pid),
        'T',
        "not resumed behind the user's back"
    );
    let (s, err) = hearthd.call("POST", "/v1/vms/p/exec", Some(json!({"command": ["true"]})));
    assert_eq!((s, &err["error"]), (409, &json!("invalid_state")), "{err}");

    // Resume: the same guest runs on and answers.
    let (s, vm) = hearthd.call("POST", "/v1/vms/p/resume", None);
    assert_eq!((s, &vm["state"]), (200, &json!("running")), "{vm}");
    assert_ne!(process_state(pid), 'T');
    assert_eq!(last_event(&hearthd.vm("p"))["kind"], "resumed");
    let out = hearthd.exec("p", json!({"command": ["echo", "awake"]}));
    assert_eq!(out["stdout"], "awake\n", "{out}");
    assert_eq!(hearthd.agent_pid("p"), pid);

    // Stop from paused: resumed first, then a clean power-off.
    let (s, vm) = hearthd.call("POST", "/v1/vms/p/pause", None);
    assert_eq!((s, &vm["state"]), (200, &json!("paused")), "{vm}");
    let (s, vm) = hearthd.call("POST", "/v1/vms/p/stop", None);
    assert_eq!((s, &vm["state"]), (200, &json!("stopped")), "{vm}");
    assert_gone(pid);
    assert_eq!(
        last_event(&hearthd.vm("p"))["message"],
        "resumed from pause, then guest powered off"
    );

    // Restart from paused runs a new guest.
    let (s, _) = hearthd.call("POST", "/v1/vms/p/start", None);
    assert_eq!(s, 200);
    let pid = hearthd.agent_pid("p");
    let (s, _) = hearthd.call("POST", "/v1/vms/p/pause", None);
    assert_eq!(s, 200);
    let (s, vm) = hearthd.call("POST", "/v1/vms/p/restart", None);
    assert_eq!((s, &vm["state"]), (200, &json!("running")), "{vm}");
    assert_gone(pid);
    let pid = hearthd.agent_pid("p");
    assert_eq!(
        hearthd.exec("p", json!({"command": ["true"]}))["exit_code"],
        0
    );

    // A paused VM whose VMM dies ends stopped, as a running one does.
    let (s, _) = hearthd.call("POST", "/v1/vms/p/pause", None);
    assert_eq!(s, 200);
    sigkill(pid);
    let vm = hearthd.wait_state("p", "stopped");
    assert!(
        last_event(&vm)["message"]
            .as_str()
            .unwrap()
            .contains("VMM process exited"),
        "{vm}"
    );

    // ... and so does one whose VMM died while no hearthd watched.
    let (s, _) = hearthd.call("POST", "/v1/vms/p/start", None);
    assert_eq!(s, 200);
    let pid = hearthd.agent_pid("p");
    let (s, _) = hearthd.call("POST", "/v1/vms/p/pause", None);
    assert_eq!(s, 200);
    drop(hearthd);
    sigkill(pid);
    assert_gone(pid);
    let hearthd = world.hearthd();
    let vm = hearthd.vm("p");
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert_eq!(
        last_event(&vm)["message"],
        "the VMM process was gone when hearthd started"
    );

    // Delete from paused: stopped first, nothing left.
    let (s, _) = hearthd.call("POST", "/v1/vms/p/start", None);
    assert_eq!(s, 200);
    let pid = hearthd.agent_pid("p");
    let (s, _) = hearthd.call("POST", "/v1/vms/p/pause", None);
    assert_eq!(s, 200);
    let (s, body) = hearthd.call("DELETE", "/v1/vms/p", None);
    assert_eq!(s, 204, "{body}");
    assert_gone(pid);
    assert_eq!(hearthd.call("GET", "/v1/vms/p", None).0, 404);
}
