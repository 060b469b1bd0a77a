//! Real tests of hearthd's defaults for a shared host (harness in `common`): private guest RAM
//! and state files, the unix socket, and an API that web pages cannot drive. One VM.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Stdio;

use common::*;
use serde_json::Value;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// One raw HTTP/1.1 request to the test's hearthd over TCP: status and body as JSON.
fn http(request: &str) -> (u16, Value) {
    let mut conn = std::net::TcpStream::connect("127.0.0.1:7070").expect("connect to hearthd");
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    conn.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn private_files_unix_socket_and_no_driving_from_web_pages() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = World::new();
    let data = w.data();
    let socket = data.join("hearth.sock");
    let over_unix = format!("unix://{}", socket.display());

    // The unix socket: 0660, and the CLI drives hearthd over it.
    let meta = std::fs::symlink_metadata(&socket).expect("hearthd's unix socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(mode(&socket), 0o660);
    let vm = json_of(
        &w.d()
            .hearth_ok(&["--url", &over_unix, "--json", "vm", "new", "sec-a"]),
    );
    let id = vm["id"].as_str().unwrap().to_owned();
    w.vm_ids.push(id.clone());
    assert_eq!(vm["state"], "running");

    // Guest RAM: a file hearthd made, 0600, in a 0700 directory of its own, not in /dev/shm.
    let ram_dir = ram_dir(&data);
    let ram = ram_file(&data, &id);
    assert_eq!(mode(&ram_dir), 0o700);
    assert_eq!(mode(&ram), 0o600);
    assert_eq!(
        std::fs::metadata(&ram_dir).unwrap().uid(),
        nix::unistd::geteuid().as_raw()
    );
    assert!(!Path::new(&format!("/dev/shm/hearth-{id}.ram")).exists());
    let qemu = processes_mentioning(&ram.display().to_string());
    assert_eq!(qemu.len(), 1, "one QEMU uses {}", ram.display());

    // State: the data directory (the harness made it 0755), the database, the VM's files.
    assert_eq!(mode(&data), 0o700);
    for dir in ["vms", "run"] {
        assert_eq!(mode(&data.join(dir)), 0o700, "{dir}");
    }
    assert_eq!(mode(&data.join("hearth.db")), 0o600);
    // The master key of secrets, made at the first start.
    assert_eq!(mode(&data.join("secrets")), 0o700);
    assert_eq!(mode(&data.join("secrets/master.key")), 0o600);
    let vm_dir = data.join("vms").join(&id);
    assert_eq!(mode(&vm_dir), 0o700);
    for file in ["rootfs.ext4", "serial.log", "vmm.log"] {
        assert_eq!(mode(&vm_dir.join(file)), 0o600, "{file}");
    }

    // Over TCP: a cross-origin POST, a foreign Host and a foreign-Origin WebSocket are refused
    // with a JSON 403 before they reach the VM; the CLI over TCP goes on working.
    let cases = [
        (
            "POST /v1/vms/sec-a/stop HTTP/1.1\r\nHost: 127.0.0.1:7070\r\nOrigin: https://evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            "forbidden_origin",
        ),
        (
            "GET /v1/vms HTTP/1.1\r\nHost: evil.example:7070\r\nConnection: close\r\n\r\n",
            "forbidden_host",
        ),
        (
            "GET /v1/vms/sec-a/exec/ws HTTP/1.1\r\nHost: 127.0.0.1:7070\r\nOrigin: https://evil.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            "forbidden_origin",
        ),
    ];
    for (request, code) in cases {
        let (status, body) = http(request);
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some(code)),
            "{body}"
        );
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, body) = http(
        "GET /v1/vms/sec-a HTTP/1.1\r\nHost: localhost:7070\r\nOrigin: http://localhost:7070\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("running")),
        "{body}"
    );
    let out = w
        .d()
        .hearth_ok(&["exec", "sec-a", "--", "echo", "still", "mine"]);
    assert_eq!(out, "still mine\n");
    let out = hearth_cmd(&["--url", &over_unix, "exec", "sec-a", "--", "id", "-u"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n");

    // Stopped: the RAM file is gone, the directory stays for the next start.
    w.d().hearth_ok(&["vm", "stop", "sec-a"]);
    w.assert_gone_runtime(&id);
    assert!(ram_dir.is_dir());
    w.d().hearth_ok(&["vm", "delete", "sec-a"]);
    w.assert_gone(&id);

    // A restarted hearthd tightens what an older, looser one left behind.
    w.daemon.as_mut().unwrap().kill9();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        data.join("hearth.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::set_permissions(data.join("secrets"), std::fs::Permissions::from_mode(0o755)).unwrap();
    w.daemon = Some(Daemon::start(&data));
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("hearth.db")), 0o600);
    assert_eq!(mode(&data.join("secrets")), 0o700);
}
