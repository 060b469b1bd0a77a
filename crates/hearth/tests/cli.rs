//! Runs the real `hearth` binary against a small fake hearthd (axum, in this process, on
//! 127.0.0.1) that serves canned answers for a few endpoints.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use hearth_api::{
    Capacity, CreateNetworkRequest, CreateVmRequest, EgressMode, EgressPolicy, EgressRequest,
    ErrorBody, ErrorCode, Health, Network, NetworkHealth, Resource, RotatedMasterKey, SecretInfo,
    SetSecretRequest, Size, TtySize, Vm, VmDetail, VmEvent, VmNetwork, VmState, WS_STDERR,
    WS_STDOUT, WsClientMessage, WsServerMessage,
};

/// Longest any one run of the binary may take.
const RUN_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The fake hearthd

type Files = Arc<Mutex<HashMap<String, (Vec<u8>, Option<String>)>>>;

fn canned_vm(name: &str, state: VmState, memory_mib: u64) -> Vm {
    Vm {
        id: format!("vm-{name}"),
        name: name.into(),
        state,
        cpus: 2,
        memory_mib,
        rootfs_mib: 10 * 1024,
        image: "sha256-0123".into(),
        vmm: "qemu".into(),
        pid: (state == VmState::Running).then_some(4242),
        created_at: "2024-05-01T12:00:00Z".into(),
        created_by: "operator".into(),
        org: "default".into(),
        updated_at: "2024-05-01T12:00:04Z".into(),
        last_error: None,
    }
}

fn canned_vms() -> Vec<Vm> {
    vec![
        canned_vm("demo", VmState::Running, 1024),
        canned_vm("build-server", VmState::Stopped, 512),
    ]
}

fn vm_not_found(name: &str) -> Response {
    error(ErrorCode::VmNotFound, &format!("no VM is named `{name}`"))
}

fn error(code: ErrorCode, message: &str) -> Response {
    let status = StatusCode::from_u16(code.http_status()).unwrap();
    let body = ErrorBody {
        error: code,
        message: message.into(),
    };
    (status, Json(body)).into_response()
}

async fn list() -> Json<Vec<Vm>> {
    Json(canned_vms())
}

/// Text a hostile guest could have put in a serial console, which the server quotes.
const HOSTILE: &str = "\x1b]0;owned\x07\x1b[2Jgone";

async fn inspect(Path(name): Path<String>) -> Response {
    if name == "evil" {
        return error(
            ErrorCode::VmmFailed,
            &format!("boot failed; serial console ends with: {HOSTILE}"),
        );
    }
    match canned_vms().into_iter().find(|vm| vm.name == name) {
        Some(vm) => Json(VmDetail {
            // The running VM has a network; the other was made while networking was off.
            network: (vm.name == "demo").then(|| canned_network(&["backend"], policy_of(None))),
            volumes: vec![],
            vm,
            events: vec![VmEvent {
                at: "2024-05-01T12:00:00.000Z".into(),
                kind: "created".into(),
                from_state: None,
                to_state: Some(VmState::Stopped),
                message: None,
            }],
        })
        .into_response(),
        None => vm_not_found(&name),
    }
}

fn canned_network(networks: &[&str], egress: EgressPolicy) -> VmNetwork {
    VmNetwork {
        address: "172.28.0.6".into(),
        host_address: "172.28.0.5".into(),
        subnet: "172.28.0.4/30".into(),
        guest_address: "10.0.2.2".into(),
        guest_gateway: "10.0.2.1".into(),
        mac: "02:00:0a:00:02:02".into(),
        networks: networks.iter().map(|&n| n.to_owned()).collect(),
        egress,
    }
}

/// The policy hearthd makes of a request: allow lists without a mode mean `deny_all`.
fn policy_of(request: Option<EgressRequest>) -> EgressPolicy {
    let request = request.unwrap_or_default();
    let allows = !request.allow_cidrs.is_empty() || !request.allow_domains.is_empty();
    let default = if allows {
        EgressMode::DenyAll
    } else {
        EgressMode::AllowAll
    };
    EgressPolicy {
        mode: request.mode.unwrap_or(default),
        allow_cidrs: request.allow_cidrs,
        deny_cidrs: request.deny_cidrs,
        allow_ports: request.allow_ports,
        allow_domains: request.allow_domains,
    }
}

/// `backend` (with `demo` in it) and `empty`.
fn canned_networks() -> Vec<Network> {
    vec![
        Network {
            name: "backend".into(),
            org: "default".into(),
            created_at: "2024-05-01T12:00:00Z".into(),
            members: vec!["demo".into()],
        },
        Network {
            name: "empty".into(),
            org: "default".into(),
            created_at: "2024-05-01T12:00:00Z".into(),
            members: vec![],
        },
    ]
}

fn network_not_found(name: &str) -> Response {
    error(
        ErrorCode::NetworkNotFound,
        &format!("no network is named `{name}`"),
    )
}

/// Echoes the request back as the VM it would make (sizes: a number is MiB, `NG` is GiB), with
/// the request's JSON as its one event's message, so tests see the body the CLI sent. The VM
/// has a network when the request names networks or egress (as if networking were off
/// otherwise).
async fn create(Json(request): Json<CreateVmRequest>) -> Response {
    if request.name == "demo" {
        return error(ErrorCode::VmNameTaken, "a VM named `demo` already exists");
    }
    let known: Vec<String> = canned_networks().into_iter().map(|n| n.name).collect();
    if let Some(missing) = request.networks.iter().find(|n| !known.contains(n)) {
        return network_not_found(missing);
    }
    let event = VmEvent {
        at: "2024-05-01T12:00:00.000Z".into(),
        kind: "request".into(),
        from_state: None,
        to_state: None,
        message: Some(serde_json::to_string(&request).unwrap()),
    };
    let networks: Vec<&str> = request.networks.iter().map(String::as_str).collect();
    let network = (!networks.is_empty() || request.egress.is_some())
        .then(|| canned_network(&networks, policy_of(request.egress.clone())));
    let mib = |size: Option<Size>, default: u64| match size {
        None => default,
        Some(Size::Mib(n)) => n,
        Some(Size::Text(t)) => t.trim_end_matches('G').parse::<u64>().unwrap() * 1024,
    };
    let state = if request.start == Some(false) {
        VmState::Stopped
    } else {
        VmState::Running
    };
    let mut vm = canned_vm(&request.name, state, mib(request.ram, 512));
    vm.rootfs_mib = mib(request.rootfs_size, 2048);
    vm.cpus = request.cpus.unwrap_or(1);
    let detail = VmDetail {
        vm,
        network,
        volumes: vec![],
        events: vec![event],
    };
    (StatusCode::CREATED, Json(detail)).into_response()
}

/// `demo` gets the policy asked for (an unknown field in the body fails the extractor).
async fn set_egress(Path(name): Path<String>, Json(request): Json<EgressRequest>) -> Response {
    if name != "demo" {
        return vm_not_found(&name);
    }
    Json(VmDetail {
        vm: canned_vm("demo", VmState::Running, 1024),
        network: Some(canned_network(&["backend"], policy_of(Some(request)))),
        volumes: vec![],
        events: vec![],
    })
    .into_response()
}

async fn list_networks() -> Json<Vec<Network>> {
    Json(canned_networks())
}

async fn create_network(Json(request): Json<CreateNetworkRequest>) -> Response {
    if canned_networks().iter().any(|n| n.name == request.name) {
        let message = format!("a network named `{}` already exists", request.name);
        return error(ErrorCode::NetworkNameTaken, &message);
    }
    let network = Network {
        name: request.name,
        org: "default".into(),
        created_at: "2024-05-01T12:00:00Z".into(),
        members: vec![],
    };
    (StatusCode::CREATED, Json(network)).into_response()
}

async fn delete_network(Path(name): Path<String>) -> Response {
    match canned_networks().into_iter().find(|n| n.name == name) {
        Some(n) if n.members.is_empty() => StatusCode::NO_CONTENT.into_response(),
        Some(n) => error(
            ErrorCode::NetworkInUse,
            &format!(
                "network `{name}` still has members: {}",
                n.members.join(", ")
            ),
        ),
        None => network_not_found(&name),
    }
}

/// PUT adds the VM to the network's members, DELETE takes it out.
async fn network_member(
    method: axum::http::Method,
    Path((network, vm)): Path<(String, String)>,
) -> Response {
    let Some(mut found) = canned_networks().into_iter().find(|n| n.name == network) else {
        return network_not_found(&network);
    };
    if !canned_vms().iter().any(|v| v.name == vm) {
        return vm_not_found(&vm);
    }
    found.members.retain(|m| *m != vm);
    if method == axum::http::Method::PUT {
        found.members.push(vm);
        found.members.sort();
    }
    Json(found).into_response()
}

async fn start(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "demo" => error(ErrorCode::InvalidState, "vm demo is already running"),
        "build-server" => Json(canned_vm(&name, VmState::Running, 512)).into_response(),
        _ => vm_not_found(&name),
    }
}

/// `demo` runs: it pauses, and resuming it is refused; `build-server` is paused.
async fn pause_or_resume(Path((name, op)): Path<(String, String)>) -> Response {
    match (name.as_str(), op.as_str()) {
        ("demo", "pause") => Json(canned_vm(&name, VmState::Paused, 1024)).into_response(),
        ("demo", "resume") => error(
            ErrorCode::InvalidState,
            "cannot resume VM \"demo\": it is running already",
        ),
        ("build-server", "resume") => Json(canned_vm(&name, VmState::Running, 512)).into_response(),
        _ => vm_not_found(&name),
    }
}

async fn delete(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "build-server" => StatusCode::NO_CONTENT.into_response(),
        _ => vm_not_found(&name),
    }
}

/// Says which log was asked for, then streams a few lines in separate chunks.
async fn logs(Path(name): Path<String>, Query(query): Query<HashMap<String, String>>) -> Response {
    if name == "evil" {
        return format!("boot\r\n{HOSTILE}\n").into_response();
    }
    if name != "demo" {
        return vm_not_found(&name);
    }
    let mut lines = vec![format!(
        "source={} follow={} tail={}\n",
        query.get("source").map_or("-", String::as_str),
        query.get("follow").map_or("-", String::as_str),
        query.get("tail").map_or("-", String::as_str),
    )];
    lines.extend((1..=3).map(|i| format!("line {i}\n")));
    let chunks = futures_util::stream::iter(lines).then(|line| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok::<_, std::io::Error>(line)
    });
    axum::body::Body::from_stream(chunks).into_response()
}

async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: "0.1.0".into(),
        vmm: "qemu".into(),
        accel: "tcg".into(),
        image: Some("sha256-0123".into()),
        image_status: "ready".into(),
        disk_copies: "reflink".into(),
        capacity: Capacity {
            vcpus: Resource {
                total: 8,
                committed: 0,
                available: 8,
            },
            memory_mib: Resource {
                total: 1024,
                committed: 0,
                available: 1024,
            },
            ram_files_mib: Resource {
                total: 1024,
                committed: 0,
                available: 1024,
            },
            disk_mib: Resource {
                total: 4096,
                committed: 0,
                available: 4096,
            },
            disk_free_mib: 4096,
        },
        network: Some(NetworkHealth {
            helper: "ok".into(),
            helper_detail: Some("pid 812, hearth-helper 0.1.0".into()),
            cidr: "172.28.0.0/16".into(),
            subnets_total: 16384,
            subnets_used: 1,
            slots: 1,
        }),
    })
}

async fn put_file(
    State(files): State<Files>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    if name != "demo" {
        return vm_not_found(&name);
    }
    let Some(path) = query.get("path") else {
        return error(ErrorCode::InvalidPath, "path is missing");
    };
    let mode = query.get("mode").cloned();
    files
        .lock()
        .unwrap()
        .insert(path.clone(), (body.to_vec(), mode));
    StatusCode::NO_CONTENT.into_response()
}

async fn get_file(
    State(files): State<Files>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if name != "demo" {
        return vm_not_found(&name);
    }
    let path = query.get("path").cloned().unwrap_or_default();
    if path == "/broken" {
        // Some bytes, then the connection breaks.
        let chunks = futures_util::stream::iter([
            Ok(Bytes::from_static(b"partial")),
            Err(std::io::Error::other("disk on fire")),
        ]);
        return axum::body::Body::from_stream(chunks).into_response();
    }
    match files.lock().unwrap().get(&path) {
        Some((bytes, mode)) => {
            let mut headers = HeaderMap::new();
            let mode = mode.clone().unwrap_or_else(|| "644".into());
            headers.insert("x-hearth-file-mode", HeaderValue::from_str(&mode).unwrap());
            (headers, bytes.clone()).into_response()
        }
        None => error(
            ErrorCode::GuestFileNotFound,
            &format!("{path} does not exist in the guest"),
        ),
    }
}

async fn exec_ws(Path(name): Path<String>, ws: WebSocketUpgrade) -> Response {
    if name != "demo" {
        return vm_not_found(&name);
    }
    ws.on_upgrade(exec_session)
}

fn exit_message(exit_code: Option<i32>, signal: Option<i32>, timed_out: bool) -> Message {
    let exit = WsServerMessage::Exit {
        exit_code,
        signal,
        timed_out,
    };
    Message::Text(serde_json::to_string(&exit).unwrap().into())
}

fn output(stream: u8, bytes: &[u8]) -> Message {
    let mut data = vec![stream];
    data.extend_from_slice(bytes);
    Message::Binary(data.into())
}

/// With stdin: echoes it to stdout, says `bye` on stderr, exits 3. Without: `kill` ends by
/// signal 9, a timeout times out, anything else prints its words and exits 0.
async fn exec_session(mut socket: WebSocket) {
    let Some(Ok(Message::Text(first))) = socket.recv().await else {
        return;
    };
    let Ok(WsClientMessage::Start {
        command,
        stdin,
        timeout_secs,
        tty,
        ..
    }) = serde_json::from_str(first.as_str())
    else {
        return;
    };
    let exit = if let Some(size) = tty {
        tty_session(&mut socket, size).await
    } else if stdin {
        while let Some(Ok(message)) = socket.recv().await {
            match message {
                Message::Binary(bytes) => {
                    let _ = socket.send(output(WS_STDOUT, &bytes)).await;
                }
                Message::Text(text) => {
                    if let Ok(WsClientMessage::Eof) = serde_json::from_str(text.as_str()) {
                        break;
                    }
                }
                _ => {}
            }
        }
        let _ = socket.send(output(WS_STDERR, b"bye\n")).await;
        exit_message(Some(3), None, false)
    } else if timeout_secs.is_some() {
        exit_message(None, Some(9), true)
    } else if command.first().map(String::as_str) == Some("kill") {
        exit_message(None, Some(9), false)
    } else {
        let line = format!("{}\n", command.join(" "));
        let _ = socket.send(output(WS_STDOUT, line.as_bytes())).await;
        exit_message(Some(0), None, false)
    };
    let _ = socket.send(exit).await;
    let _ = socket.send(Message::Close(None)).await;
}

/// With a terminal: reports its size and each resize, echoes input up to a Ctrl-D, exits 0.
async fn tty_session(socket: &mut WebSocket, size: TtySize) -> Message {
    let hello = format!("tty {}x{}\n", size.rows, size.cols);
    let _ = socket.send(output(WS_STDOUT, hello.as_bytes())).await;
    while let Some(Ok(message)) = socket.recv().await {
        match message {
            Message::Binary(bytes) => {
                let end = bytes.iter().position(|&b| b == 4);
                let echo = &bytes[..end.unwrap_or(bytes.len())];
                let _ = socket.send(output(WS_STDOUT, echo)).await;
                if end.is_some() {
                    break;
                }
            }
            Message::Text(text) => {
                if let Ok(WsClientMessage::Resize { size }) = serde_json::from_str(text.as_str()) {
                    let line = format!("resize {}x{}\n", size.rows, size.cols);
                    let _ = socket.send(output(WS_STDOUT, line.as_bytes())).await;
                }
            }
            _ => {}
        }
    }
    exit_message(Some(0), None, false)
}

/// The values the fake was sent for secrets, by name, so tests see what the CLI sent.
fn received_secrets() -> &'static Mutex<HashMap<String, String>> {
    static SECRETS: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    SECRETS.get_or_init(Mutex::default)
}

fn received(name: &str) -> Option<String> {
    received_secrets().lock().unwrap().get(name).cloned()
}

fn secret_info(name: &str) -> SecretInfo {
    SecretInfo {
        name: name.into(),
        org: "default".into(),
        created_at: "2024-05-01T12:00:00.000Z".into(),
        created_by: "operator".into(),
        updated_at: "2024-05-01T12:00:00.000Z".into(),
    }
}

async fn set_secret(Path(name): Path<String>, Json(req): Json<SetSecretRequest>) -> Response {
    received_secrets()
        .lock()
        .unwrap()
        .insert(name.clone(), req.value);
    (StatusCode::CREATED, Json(secret_info(&name))).into_response()
}

async fn list_secrets() -> Json<Vec<SecretInfo>> {
    Json(vec![
        secret_info("OPENAI_API_KEY"),
        secret_info("VENDOR_TOKEN"),
    ])
}

async fn delete_secret(Path(name): Path<String>) -> Response {
    if name == "GHOST" {
        return error(
            ErrorCode::SecretNotFound,
            "organization \"default\" has no secret \"GHOST\"",
        );
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn rotate_master_key() -> Json<RotatedMasterKey> {
    Json(RotatedMasterKey {
        key_id: "0123456789abcdef".into(),
        secrets: 2,
    })
}

fn fake_app() -> Router {
    let files: Files = Arc::default();
    Router::new()
        .route("/v1/secrets", get(list_secrets))
        .route("/v1/secrets/rotate-master-key", post(rotate_master_key))
        .route("/v1/secrets/{name}", put(set_secret).delete(delete_secret))
        .route("/v1/health", get(health))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(inspect).delete(delete))
        .route("/v1/vms/{name}/start", post(start))
        .route("/v1/vms/{name}/{op}", post(pause_or_resume))
        .route("/v1/vms/{name}/logs", get(logs))
        .route("/v1/vms/{name}/files", get(get_file).put(put_file))
        .route("/v1/vms/{name}/exec/ws", get(exec_ws))
        .route("/v1/vms/{name}/egress", put(set_egress))
        .route("/v1/networks", get(list_networks).post(create_network))
        .route(
            "/v1/networks/{network}",
            axum::routing::delete(delete_network),
        )
        .route(
            "/v1/networks/{network}/members/{name}",
            put(network_member).delete(network_member),
        )
        .with_state(files)
}

/// The fake's address; it runs on a thread of its own for the whole test binary.
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = fake_app();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        addr
    })
}

/// The same fake on a unix socket, as hearthd's `server.unix_socket`.
fn unix_server() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = scratch("unix");
        let path = dir.join("hearth.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                axum::serve(listener, fake_app()).await.unwrap();
            });
        });
        path
    })
    .clone()
}

// ---------------------------------------------------------------------------------------------
// Running the binary

/// Runs `hearth --url <fake> ARGS…` with `stdin` as its input, killing it after [`RUN_LIMIT`].
fn hearth(args: &[&str], stdin: &[u8]) -> Output {
    let url = format!("http://{}", server());
    hearth_at(&url, args, stdin)
}

fn hearth_at(url: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .arg("--url")
        .arg(url)
        .args(args)
        .env_remove("HEARTH_URL")
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hearth");
    let input = stdin.to_vec();
    let mut child_stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = child_stdin.write_all(&input);
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        out.read_to_end(&mut buf).map(|_| buf)
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        err.read_to_end(&mut buf).map(|_| buf)
    });
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hearth {args:?} ran longer than {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    writer.join().unwrap();
    Output {
        status,
        stdout: out_reader.join().unwrap().unwrap(),
        stderr: err_reader.join().unwrap().unwrap(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("hearth ended by a signal")
}

/// A fresh directory under the target dir for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hearth-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn list_prints_an_aligned_table() {
    let out = hearth(&["vm", "list"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with("NAME           STATE     CPUS   RAM    ROOTFS   CREATED"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("demo           running   2      1G     10G      "),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with("build-server   stopped   2      512M   10G      "),
        "{stdout}"
    );
    assert!(lines[1].ends_with(" ago"), "{stdout}");
}

#[test]
fn list_json_is_the_api_json() {
    let out = hearth(&["--json", "vm", "list"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let vms: Vec<Vm> = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(vms, canned_vms());
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn inspect_shows_the_vm_and_its_events() {
    let out = hearth(&["vm", "inspect", "demo"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("name:    demo\nid:      vm-demo\nstate:   running\n"),
        "{stdout}"
    );
    assert!(stdout.contains("pid:     4242\n"), "{stdout}");
    assert!(stdout.contains("EVENTS\nTIME"), "{stdout}");
    assert!(stdout.contains("created   -→stopped"), "{stdout}");
}

#[test]
fn not_found_exits_3_with_error_and_hint() {
    let out = hearth(&["vm", "inspect", "nope"], b"");
    assert_eq!(code(&out), 3);
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert_eq!(
        text(&out.stderr),
        "error: no VM is named `nope`\nhint: `hearth vm list` shows the VMs\n"
    );
}

#[test]
fn not_found_json_prints_the_error_body() {
    let out = hearth(&["vm", "inspect", "nope", "--json"], b"");
    assert_eq!(code(&out), 3);
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    let body: ErrorBody = serde_json::from_slice(&out.stdout).expect("stdout is an error body");
    assert_eq!(body.error, ErrorCode::VmNotFound);
    assert_eq!(body.message, "no VM is named `nope`");
}

#[test]
fn unreachable_hearthd_exits_5_naming_the_url() {
    // Nothing listens on port 1 of the loopback address.
    let out = hearth_at("http://127.0.0.1:1", &["vm", "list"], b"");
    assert_eq!(code(&out), i32::from(hearth_api::EXIT_UNREACHABLE));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: cannot reach hearthd: "),
        "{stderr}"
    );
    assert!(
        stderr
            .contains("\nhint: is hearthd running at http://127.0.0.1:1? Start it with `make run`"),
        "{stderr}"
    );
    assert!(stderr.contains("HEARTH_URL"), "{stderr}");
    let out = hearth_at("http://127.0.0.1:1", &["--json", "vm", "list"], b"");
    assert_eq!(code(&out), i32::from(hearth_api::EXIT_UNREACHABLE));
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["error"], "unreachable");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("http://127.0.0.1:1")
    );
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn cp_up_and_down_keeps_bytes_and_mode() {
    let dir = scratch("cp");
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i * 7 + i / 13).to_le_bytes()[0])
        .collect();
    let local = dir.join("payload.bin");
    std::fs::write(&local, &data).unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o640)).unwrap();

    let up = hearth(
        &[
            "vm",
            "cp",
            local.to_str().unwrap(),
            "demo:/root/payload.bin",
        ],
        b"",
    );
    assert_eq!(code(&up), 0, "stderr: {}", text(&up.stderr));

    let back = dir.join("back.bin");
    let down = hearth(
        &["cp", "demo:/root/payload.bin", back.to_str().unwrap()],
        b"",
    );
    assert_eq!(code(&down), 0, "stderr: {}", text(&down.stderr));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "downloaded bytes differ"
    );
    // The fake echoes the mode it was sent; the new local file gets it (less the umask).
    let mode = std::fs::metadata(&back).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode & !0o640,
        0,
        "mode {mode:o} has bits the upload did not send"
    );
    assert_eq!(mode & 0o600, 0o600, "mode {mode:o}");

    // Into a directory: the file keeps its guest name.
    let down = hearth(
        &["cp", "demo:/root/payload.bin", dir.to_str().unwrap()],
        b"",
    );
    assert_eq!(code(&down), 0, "stderr: {}", text(&down.stderr));
    assert!(std::fs::read(dir.join("payload.bin")).unwrap() == data);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cp_through_stdin_and_stdout() {
    let data = b"line one\nline two\n\x00\xffbinary tail".to_vec();
    let up = hearth(&["cp", "-", "demo:/tmp/from-stdin"], &data);
    assert_eq!(code(&up), 0, "stderr: {}", text(&up.stderr));
    let down = hearth(&["cp", "demo:/tmp/from-stdin", "-"], b"");
    assert_eq!(code(&down), 0, "stderr: {}", text(&down.stderr));
    assert_eq!(down.stdout, data);
}

#[test]
fn cp_errors() {
    let out = hearth(&["cp", "demo:/no/such/file", "-"], b"");
    assert_eq!(code(&out), 3);
    assert_eq!(
        text(&out.stderr),
        "error: /no/such/file does not exist in the guest\n"
    );
    let out = hearth(&["cp", "a", "b"], b"");
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).starts_with("error: one side of `cp` must be in a VM"));
    let out = hearth(&["--json", "cp", "x", "demo:relative"], b"");
    assert_eq!(code(&out), 2);
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["error"], "invalid_path");
}

#[test]
fn exec_interactive_echoes_stdin_and_propagates_the_exit_code() {
    let out = hearth(&["exec", "-i", "demo", "--", "cat"], b"hello\nworld\n");
    assert_eq!(code(&out), 3, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\nworld\n");
    assert_eq!(text(&out.stderr), "bye\n");
}

#[test]
fn exec_exit_codes_for_success_signal_and_timeout() {
    let out = hearth(&["vm", "exec", "demo", "echo", "hi", "there"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "echo hi there\n");
    let out = hearth(&["exec", "demo", "--", "kill"], b"");
    assert_eq!(code(&out), 128 + 9);
    let out = hearth(&["exec", "--timeout", "1", "demo", "--", "sleep", "9"], b"");
    assert_eq!(code(&out), 124);
}

#[test]
fn exec_failures_exit_125() {
    let out = hearth(&["exec", "nope", "--", "true"], b"");
    assert_eq!(code(&out), 125);
    assert_eq!(
        text(&out.stderr),
        "error: no VM is named `nope`\nhint: `hearth vm list` shows the VMs\n"
    );
    let out = hearth_at("http://127.0.0.1:1", &["exec", "demo", "--", "true"], b"");
    assert_eq!(code(&out), 125);
    assert!(text(&out.stderr).contains("cannot reach hearthd"));
}

nix::ioctl_write_ptr_bad!(set_window_size, libc::TIOCSWINSZ, libc::winsize);

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// `exec -it` on a real pseudo-terminal: the session gets the terminal's size, a SIGWINCH sends
/// the new size, keystrokes pass through raw (Ctrl-D is a byte, not end of input), and the
/// terminal is back in cooked mode afterwards.
#[test]
fn exec_tty_uses_raw_mode_sends_sizes_and_restores_the_terminal() {
    use std::os::fd::AsRawFd;
    use std::sync::mpsc;

    use nix::sys::termios::{LocalFlags, tcgetattr};

    let pty = nix::pty::openpty(Some(&winsize(30, 100)), None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    assert!(
        tcgetattr(&slave)
            .unwrap()
            .local_flags
            .contains(LocalFlags::ICANON)
    );

    let url = format!("http://{}", server());
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["--url", &url, "exec", "-it", "demo", "--", "sh"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap())
        .spawn()
        .unwrap();

    let (tx, rx) = mpsc::channel();
    let mut reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Ends with EIO once the test drops its end of the terminal.
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + RUN_LIMIT;
    let mut seen = Vec::new();
    let mut wait_for = |needle: &str| -> Result<(), String> {
        while !text(&seen).contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(bytes) => seen.extend(bytes),
                Err(_) => {
                    return Err(format!(
                        "no {needle:?} on the terminal; saw {:?}",
                        text(&seen)
                    ));
                }
            }
        }
        Ok(())
    };
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let mut check = |result: Result<(), String>| {
        if let Err(message) = result {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{message}");
        }
    };

    check(wait_for("tty 30x100\n"));
    // SAFETY: TIOCSWINSZ reads one `winsize` from a live local; the descriptor is open.
    unsafe { set_window_size(master.as_raw_fd(), &winsize(40, 120)) }.unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGWINCH).unwrap();
    check(wait_for("resize 40x120\n"));
    master.write_all(b"typed\x04").unwrap();
    check(wait_for("typed"));

    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("hearth exec -it did not end");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    let flags = tcgetattr(&slave).unwrap().local_flags;
    assert!(
        flags.contains(LocalFlags::ICANON) && flags.contains(LocalFlags::ECHO),
        "{flags:?}"
    );
}

#[test]
fn new_sends_sizes_as_numbers_or_text() {
    let out = hearth(
        &[
            "--json",
            "vm",
            "new",
            "web",
            "--cpus",
            "4",
            "--ram",
            "2G",
            "--rootfs-size",
            "4096",
        ],
        b"",
    );
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let detail: VmDetail = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            detail.vm.cpus,
            detail.vm.memory_mib,
            detail.vm.rootfs_mib,
            detail.vm.state
        ),
        (4, 2048, 4096, VmState::Running)
    );
    let out = hearth(&["vm", "new", "web", "--no-start"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "created vm web (stopped; 1 cpu, 512M RAM, 2G rootfs)\n"
    );
    // stderr is not a terminal here, so no progress line.
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    let out = hearth(&["vm", "new", "demo"], b"");
    assert_eq!(code(&out), 4);
    assert!(
        text(&out.stderr).contains("hint: choose another name"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn lifecycle_results_and_conflicts() {
    let out = hearth(&["vm", "start", "build-server"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "vm build-server is running\n");
    let out = hearth(&["vm", "start", "demo"], b"");
    assert_eq!(code(&out), 4);
    assert_eq!(
        text(&out.stderr),
        "error: vm demo is already running\n\
         hint: it may already be running; `hearth vm inspect demo` shows its state\n"
    );
    let out = hearth(&["vm", "delete", "build-server"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "deleted vm build-server\n");
    let out = hearth(&["--json", "vm", "rm", "build-server"], b"");
    assert_eq!((code(&out), out.stdout.len()), (0, 0));
}

#[test]
fn logs_stream_to_stdout_with_the_asked_source() {
    let out = hearth(&["vm", "logs", "demo"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "source=serial follow=false tail=-\nline 1\nline 2\nline 3\n"
    );
    let out = hearth(&["vm", "logs", "-f", "demo", "vmm", "--tail", "5"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("source=vmm follow=true tail=5\n"));
    let out = hearth(&["vm", "logs", "nope"], b"");
    assert_eq!(code(&out), 3);
}

#[test]
fn health_prints_its_fields() {
    let out = hearth(&["health"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "status:       ok\n\
         version:      0.1.0\n\
         vmm:          qemu\n\
         accel:        tcg\n\
         image:        sha256-0123\n\
         vcpus:        0 of 8 committed, 8 available\n\
         memory:       0M of 1G committed, 1G available\n\
         ram files:    0M of 1G committed, 1G available\n\
         disks:        0M of 4G committed, 4G available\n\
         disk copies:  reflink\n\
         disk free:    4G\n\
         networking:   ok\n\
         helper:       pid 812, hearth-helper 0.1.0\n\
         network cidr: 172.28.0.0/16\n\
         subnets:      1 of 16384 used\n\
         slots:        1\n"
    );
}

#[test]
fn the_cli_speaks_over_a_unix_socket() {
    let url = format!("unix://{}", unix_server().display());
    let out = hearth_at(&url, &["--json", "vm", "list"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let vms: Vec<Vm> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vms, canned_vms());
    // The exec WebSocket and streamed file bodies too.
    let out = hearth_at(&url, &["exec", "demo", "--", "echo", "over", "unix"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "echo over unix\n");
    let up = hearth_at(&url, &["cp", "-", "demo:/tmp/u"], b"via the socket");
    assert_eq!(code(&up), 0, "stderr: {}", text(&up.stderr));
    let down = hearth_at(&url, &["cp", "demo:/tmp/u", "-"], b"");
    assert_eq!(down.stdout, b"via the socket");
    // No socket there: unreachable (exit 5), naming the socket.
    let out = hearth_at("unix:///nonexistent/hearth.sock", &["vm", "list"], b"");
    assert_eq!(code(&out), i32::from(hearth_api::EXIT_UNREACHABLE));
    assert!(
        text(&out.stderr).contains("hearthd running at unix:///nonexistent/hearth.sock"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_failed_download_leaves_the_local_file_intact() {
    let dir = scratch("cp-broken");
    let local = dir.join("keep.txt");
    std::fs::write(&local, "precious\n").unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = hearth(&["cp", "demo:/broken", local.to_str().unwrap()], b"");
    assert_ne!(code(&out), 0, "the broken download succeeded");
    assert_eq!(std::fs::read_to_string(&local).unwrap(), "precious\n");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["keep.txt"], "temporary files left behind");
    // A download that works replaces it, and the file keeps its own mode.
    let up = hearth(&["cp", "-", "demo:/tmp/new"], b"new contents");
    assert_eq!(code(&up), 0, "stderr: {}", text(&up.stderr));
    let down = hearth(&["cp", "demo:/tmp/new", local.to_str().unwrap()], b"");
    assert_eq!(code(&down), 0, "stderr: {}", text(&down.stderr));
    assert_eq!(std::fs::read_to_string(&local).unwrap(), "new contents");
    let mode = std::fs::metadata(&local).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn guest_text_is_escaped_on_a_terminal_and_raw_in_a_pipe() {
    // Error messages quoting a guest: escaped on stderr, JSON-escaped with --json.
    let out = hearth(&["vm", "inspect", "evil"], b"");
    assert_eq!(code(&out), 1);
    assert!(!out.stderr.contains(&0x1b), "{:?}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("ends with: \\x1b]0;owned\\x07\\x1b[2Jgone"),
        "{}",
        text(&out.stderr)
    );
    let out = hearth(&["--json", "vm", "inspect", "evil"], b"");
    assert!(!out.stdout.contains(&0x1b));
    let body: ErrorBody = serde_json::from_slice(&out.stdout).unwrap();
    assert!(body.message.ends_with(HOSTILE));

    // Logs into a pipe are the log's own bytes.
    let out = hearth(&["vm", "logs", "evil"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("boot\r\n{HOSTILE}\n"));

    // On a terminal, escaped.
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let url = format!("http://{}", server());
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["--url", &url, "vm", "logs", "evil"])
        .stdin(Stdio::null())
        .stdout(slave.try_clone().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(slave);
    let status = child.wait().unwrap();
    assert!(status.success());
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // Ends with EIO once the terminal has no other end open.
    while let Ok(n @ 1..) = master.read(&mut buf) {
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(!seen.contains(&0x1b), "{:?}", text(&seen));
    assert!(
        text(&seen).contains("\\x1b]0;owned\\x07\\x1b[2Jgone"),
        "{:?}",
        text(&seen)
    );
}

#[test]
fn inspect_shows_the_network_section_when_there_is_one() {
    let out = hearth(&["vm", "inspect", "demo"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "\nNETWORK\n\
             address:       172.28.0.6\n\
             host address:  172.28.0.5\n\
             subnet:        172.28.0.4/30\n\
             guest address: 10.0.2.2\n\
             guest gateway: 10.0.2.1\n\
             mac:           02:00:0a:00:02:02\n\
             networks:      backend\n\
             egress:        allow_all\n\nEVENTS\n"
        ),
        "{stdout}"
    );
    let out = hearth(&["vm", "inspect", "build-server"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert!(
        !text(&out.stdout).contains("NETWORK"),
        "{}",
        text(&out.stdout)
    );
    let out = hearth(&["--json", "vm", "inspect", "build-server"], b"");
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(body["network"].is_null(), "{body}");
}

/// The body `vm new` sent, which the fake returns as its event's message.
fn sent_request(stdout: &[u8]) -> (VmDetail, CreateVmRequest) {
    let detail: VmDetail = serde_json::from_slice(stdout).expect("stdout is a VmDetail");
    let message = detail.events[0].message.clone().expect("the request");
    let request = serde_json::from_str(&message).unwrap();
    (detail, request)
}

#[test]
fn new_sends_networks_egress_user_data_and_keys() {
    let dir = scratch("new-inputs");
    let user_data = dir.join("user-data.yaml");
    std::fs::write(&user_data, "#cloud-config\npackages: [curl]\n").unwrap();
    let laptop = dir.join("laptop.pub");
    std::fs::write(&laptop, "ssh-ed25519 AAAAC3one me@laptop\n").unwrap();
    let team = dir.join("team_keys");
    std::fs::write(
        &team,
        "# the team\n\nssh-ed25519 AAAAC3two a@x\n  # gone: ssh-rsa AAAAold\nssh-rsa AAAAB3three b@y\n",
    )
    .unwrap();
    let out = hearth(
        &[
            "--json",
            "vm",
            "new",
            "web",
            "--network",
            "backend",
            "--network",
            "empty",
            "--user-data",
            user_data.to_str().unwrap(),
            "--ssh-key",
            laptop.to_str().unwrap(),
            "--ssh-key",
            team.to_str().unwrap(),
            "--egress-allow-cidr",
            "10.1.0.0/16",
            "--egress-deny-cidr",
            "10.1.9.0/24",
            "--egress-allow-port",
            "443",
            "--egress-allow-domain",
            "*.example.com",
        ],
        b"",
    );
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let (detail, request) = sent_request(&out.stdout);
    assert_eq!(
        request,
        CreateVmRequest {
            name: "web".into(),
            networks: vec!["backend".into(), "empty".into()],
            egress: Some(EgressRequest {
                mode: None,
                allow_cidrs: vec!["10.1.0.0/16".into()],
                deny_cidrs: vec!["10.1.9.0/24".into()],
                allow_ports: vec![443],
                allow_domains: vec!["*.example.com".into()],
            }),
            user_data: Some("#cloud-config\npackages: [curl]\n".into()),
            ssh_authorized_keys: vec![
                "ssh-ed25519 AAAAC3one me@laptop".into(),
                "ssh-ed25519 AAAAC3two a@x".into(),
                "ssh-rsa AAAAB3three b@y".into(),
            ],
            ..CreateVmRequest::default()
        }
    );
    assert_eq!(
        detail.network.unwrap().egress.mode,
        EgressMode::DenyAll,
        "allow lists alone mean deny_all"
    );

    // User data from stdin; no egress flag, no policy sent.
    let out = hearth(
        &["--json", "vm", "new", "web", "--user-data", "-"],
        b"#!/bin/sh\necho hello\n",
    );
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let (_, request) = sent_request(&out.stdout);
    assert_eq!(
        request.user_data.as_deref(),
        Some("#!/bin/sh\necho hello\n")
    );
    assert_eq!((request.egress, request.networks.len()), (None, 0));
    let raw: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        raw["network"].is_null(),
        "--json prints the API's JSON: {raw}"
    );

    // The human line gives the address.
    let out = hearth(&["vm", "new", "web", "--network", "backend"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "created vm web (running; 1 cpu, 512M RAM, 2G rootfs; address 172.28.0.6)\n"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn new_refuses_bad_local_inputs_before_asking_hearthd() {
    let dir = scratch("new-bad-inputs");
    let binary = dir.join("blob");
    std::fs::write(&binary, b"\x7fELF\x02\x01\xff\xfe").unwrap();
    let out = hearth(
        &["vm", "new", "web", "--user-data", binary.to_str().unwrap()],
        b"",
    );
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).starts_with(&format!(
            "error: --user-data {} is not UTF-8 text (byte 6 is not)",
            binary.display()
        )),
        "{}",
        text(&out.stderr)
    );
    let out = hearth(&["--json", "vm", "new", "web", "--user-data", "-"], b"\xff");
    assert_eq!(code(&out), 2);
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["error"], "invalid_request");

    let private = dir.join("id_ed25519");
    std::fs::write(
        &private,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbg==\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    let out = hearth(
        &["vm", "new", "web", "--ssh-key", private.to_str().unwrap()],
        b"",
    );
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("holds a private key"),
        "{}",
        text(&out.stderr)
    );
    let missing = dir.join("nope.pub");
    let out = hearth(
        &["vm", "new", "web", "--ssh-key", missing.to_str().unwrap()],
        b"",
    );
    assert_eq!(code(&out), 1);
    assert!(
        text(&out.stderr).starts_with(&format!(
            "error: cannot read --ssh-key {}: ",
            missing.display()
        )),
        "{}",
        text(&out.stderr)
    );
    // A network hearthd does not know: the hint says how to make it.
    let out = hearth(&["vm", "new", "web", "--network", "nope"], b"");
    assert_eq!(code(&out), 3);
    assert_eq!(
        text(&out.stderr),
        "error: no network is named `nope`\n\
         hint: list networks with `hearth network list`; create it with \
         `hearth network create nope`\n"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn egress_sets_the_policy_and_prints_it() {
    let out = hearth(
        &[
            "vm",
            "egress",
            "demo",
            "--egress-allow-domain",
            "pypi.org",
            "--egress-allow-domain",
            "*.pythonhosted.org",
            "--egress-allow-port",
            "443",
        ],
        b"",
    );
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "vm:            demo\n\
         egress:        deny_all\n\
         allow domains: pypi.org, *.pythonhosted.org\n\
         allow ports:   443\n"
    );
    let out = hearth(
        &[
            "--json",
            "vm",
            "egress",
            "demo",
            "--egress-mode",
            "allow_all",
        ],
        b"",
    );
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let detail: VmDetail = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(detail.network.unwrap().egress, EgressPolicy::default());

    let out = hearth(&["vm", "egress", "demo"], b"");
    assert_eq!(code(&out), 2);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("needs at least one of --egress-mode, --egress-allow-cidr"),
        "{stderr}"
    );
    assert!(
        stderr.contains("`--egress-mode allow_all` alone resets"),
        "{stderr}"
    );
    let out = hearth(
        &["vm", "egress", "demo", "--egress-allow-port", "70000"],
        b"",
    );
    assert_eq!(code(&out), 2);
    let out = hearth(&["vm", "egress", "nope", "--egress-mode", "deny_all"], b"");
    assert_eq!(code(&out), 3);
    assert_eq!(
        text(&out.stderr),
        "error: no VM is named `nope`\nhint: `hearth vm list` shows the VMs\n"
    );
}

#[test]
fn network_list_create_and_delete() {
    let out = hearth(&["network", "list"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert_eq!(lines[0], "NAME      MEMBERS   CREATED");
    assert!(lines[1].starts_with("backend   demo      "), "{stdout}");
    assert!(lines[2].starts_with("empty     -         "), "{stdout}");
    assert!(lines[2].ends_with(" ago"), "{stdout}");
    let out = hearth(&["--json", "network", "ls"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let networks: Vec<Network> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(networks, canned_networks());

    let out = hearth(&["network", "create", "frontend"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "created network frontend\n");
    let out = hearth(&["--json", "network", "create", "frontend"], b"");
    let network: Network = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (network.name.as_str(), network.members.len()),
        ("frontend", 0)
    );
    let out = hearth(&["network", "create", "backend"], b"");
    assert_eq!(code(&out), 4);
    assert!(
        text(&out.stderr).starts_with(
            "error: a network named `backend` already exists\nhint: choose another name"
        ),
        "{}",
        text(&out.stderr)
    );

    let out = hearth(&["network", "delete", "empty"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "deleted network empty\n");
    let out = hearth(&["--json", "network", "rm", "empty"], b"");
    assert_eq!((code(&out), out.stdout.len()), (0, 0));
    let out = hearth(&["network", "rm", "backend"], b"");
    assert_eq!(code(&out), 4);
    assert_eq!(
        text(&out.stderr),
        "error: network `backend` still has members: demo\n\
         hint: disconnect its members first (`hearth network disconnect backend VM`); \
         `hearth network list` shows them\n"
    );
    let out = hearth(&["--json", "network", "delete", "nope"], b"");
    assert_eq!(code(&out), 3);
    let body: ErrorBody = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body.error, ErrorCode::NetworkNotFound);
}

#[test]
fn network_connect_and_disconnect() {
    let out = hearth(&["network", "connect", "backend", "build-server"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "connected vm build-server to network backend (members: build-server, demo)\n"
    );
    let out = hearth(&["network", "disconnect", "backend", "demo"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "disconnected vm demo from network backend (no members)\n"
    );
    let out = hearth(&["--json", "network", "connect", "empty", "demo"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let network: Network = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(network.members, ["demo"]);

    let out = hearth(&["network", "connect", "nope", "demo"], b"");
    assert_eq!(code(&out), 3);
    assert!(
        text(&out.stderr).ends_with("create it with `hearth network create nope`\n"),
        "{}",
        text(&out.stderr)
    );
    let out = hearth(&["network", "disconnect", "backend", "ghost"], b"");
    assert_eq!(code(&out), 3);
    assert_eq!(
        text(&out.stderr),
        "error: no VM is named `ghost`\nhint: `hearth vm list` shows the VMs\n"
    );
}

#[test]
fn pause_and_resume_print_the_state_and_hint_on_refusal() {
    let out = hearth(&["vm", "pause", "demo"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "vm demo is paused\n");
    let out = hearth(&["--json", "vm", "pause", "demo"], b"");
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["state"], "paused");
    let out = hearth(&["vm", "resume", "build-server"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "vm build-server is running\n");
    let out = hearth(&["vm", "resume", "demo"], b"");
    assert_eq!(code(&out), 4);
    assert_eq!(
        text(&out.stderr),
        "error: cannot resume VM \"demo\": it is running already\n\
         hint: only a paused VM resumes; `hearth vm inspect demo` shows its state\n"
    );
    let out = hearth(&["vm", "pause", "ghost"], b"");
    assert_eq!(code(&out), 3);
}

#[test]
fn secret_set_reads_the_value_from_stdin_and_never_prints_it() {
    let out = hearth(&["secret", "set", "PIPED_TOKEN"], b"s3cr3t-from-a-pipe\n");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(
        received("PIPED_TOKEN").as_deref(),
        Some("s3cr3t-from-a-pipe")
    );
    assert_eq!(text(&out.stdout), "set secret PIPED_TOKEN of default\n");
    assert!(
        !text(&out.stderr).contains("s3cr3t"),
        "{}",
        text(&out.stderr)
    );

    // A pipe is read whole (a PEM file is one value), less one trailing newline.
    let pem = b"-----BEGIN KEY-----\nabc\n-----END KEY-----\r\n";
    let out = hearth(&["secret", "set", "PEM_KEY"], pem);
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(
        received("PEM_KEY").as_deref(),
        Some("-----BEGIN KEY-----\nabc\n-----END KEY-----")
    );
    let out = hearth(&["secret", "set", "NO_NEWLINE"], b"as-is  ");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(received("NO_NEWLINE").as_deref(), Some("as-is  "));

    // Refused before anything is sent: no value, too much, not text, or a value on argv.
    for (name, input, says) in [
        ("EMPTY_ONE", &b"\n"[..], "no value for secret EMPTY_ONE"),
        ("NOTHING_AT_ALL", b"", "no value for secret NOTHING_AT_ALL"),
        (
            "TOO_LARGE",
            &[b'x'; 65537][..],
            "is more than 65536 bytes (64 KiB)",
        ),
        ("NOT_TEXT", b"\xff\xfe\n", "is not UTF-8 text"),
    ] {
        let out = hearth(&["secret", "set", name], input);
        assert_eq!(code(&out), 2, "{name}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(says),
            "{name}: {}",
            text(&out.stderr)
        );
        assert_eq!(received(name), None, "{name} was sent");
    }
    let out = hearth(&["secret", "set", "ON_ARGV", "value-on-argv"], b"x\n");
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("unexpected argument"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(received("ON_ARGV"), None);
    let at_most = vec![b'y'; 65536];
    let out = hearth(&["secret", "set", "AT_MOST"], &at_most);
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(received("AT_MOST").map(|v| v.len()), Some(65536));
}

#[test]
fn secret_list_delete_and_rotate_master_key() {
    let out = hearth(&["secret", "list"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{stdout}");
    assert!(lines[0].contains("UPDATED"), "{stdout}");
    assert!(lines[1].starts_with("OPENAI_API_KEY"), "{stdout}");
    assert_eq!(lines.len(), 3, "{stdout}");
    let out = hearth(&["--json", "secret", "ls"], b"");
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body[1]["name"], "VENDOR_TOKEN");

    let out = hearth(&["secret", "delete", "OPENAI_API_KEY"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "deleted secret OPENAI_API_KEY\n");
    let out = hearth(&["secret", "rm", "GHOST"], b"");
    assert_eq!(code(&out), 3);
    assert_eq!(
        text(&out.stderr),
        "error: organization \"default\" has no secret \"GHOST\"\n\
         hint: `hearth secret list` shows the secrets of the organization you act in (`hearth whoami`)\n"
    );

    let out = hearth(&["secret", "rotate-master-key"], b"");
    assert_eq!(code(&out), 0, "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "re-encrypted 2 secrets under the new master key 0123456789abcdef; the old key decrypts none of them\n"
    );
}

/// On a terminal, `secret set` turns echo off while it reads the line, and back on after.
#[test]
fn secret_set_on_a_terminal_reads_one_line_without_echo() {
    use nix::sys::termios::{LocalFlags, tcgetattr};
    use std::sync::mpsc;

    let pty = nix::pty::openpty(Some(&winsize(24, 80)), None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let echo = |f: &std::fs::File| tcgetattr(f).unwrap().local_flags.contains(LocalFlags::ECHO);
    assert!(echo(&slave));
    let url = format!("http://{}", server());
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["--url", &url, "secret", "set", "TTY_TOKEN"])
        .env("NO_COLOR", "1")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let mut reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + RUN_LIMIT;
    let mut seen = Vec::new();
    let mut fail = |message: String| -> ! {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{message}");
    };
    while !text(&seen).contains("input is not shown") {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(bytes) => seen.extend(bytes),
            Err(_) => fail(format!("no prompt; saw {:?}", text(&seen))),
        }
    }
    // The prompt comes just before echo goes off.
    while echo(&slave) {
        if Instant::now() > deadline {
            fail("echo stayed on while the value was read".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    master.write_all(b"typed-on-a-tty\n").unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("hearth secret set did not end");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    while let Ok(bytes) = rx.recv_timeout(Duration::from_millis(200)) {
        seen.extend(bytes);
    }
    assert_eq!(status.code(), Some(0), "{}", text(&seen));
    assert_eq!(received("TTY_TOKEN").as_deref(), Some("typed-on-a-tty"));
    assert!(echo(&slave), "echo is back on");
    assert!(
        !text(&seen).contains("typed-on-a-tty"),
        "the value was echoed: {:?}",
        text(&seen)
    );
    assert!(
        text(&seen).contains("set secret TTY_TOKEN of default"),
        "{:?}",
        text(&seen)
    );
}
