//! The API keeps its OpenAPI document: one real VM, every endpoint over raw HTTP with requests
//! that work and requests that fail, each answer (status, media type, body) checked against the
//! operation's documented responses and each request against its documented parameters and
//! body (harness in `common`, checker in `common::contract`).

mod common;

use common::contract::{self, Contract, Req};
use common::*;
use serde_json::json;

#[test]
fn every_endpoint_answers_as_its_document_says() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The namespace is entered before the runtime makes any socket on this thread.
    let w = World::new();
    let contract = Contract::new();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(pass(&w, &contract));
    contract.verify();
}

/// Sends `req`, asserts its status and error code (`""` for a success), and returns the answer.
async fn expect(c: &Contract, label: &str, req: Req, status: u16, code: &str) -> contract::Answer {
    let a = c.send(label, req).await;
    assert_eq!(a.status, status, "[{label}] {}", a.text());
    if !code.is_empty() {
        assert_eq!(a.code(), code, "[{label}] {}", a.text());
    }
    a
}

async fn pass(w: &World, c: &Contract) {
    expect(c, "health", Req::get("/v1/health"), 200, "").await;
    expect(c, "metrics", Req::get("/metrics"), 200, "").await;
    expect(c, "stats", Req::get("/v1/stats"), 200, "").await;
    expect(c, "list empty", Req::get("/v1/vms"), 200, "").await;

    // Creation refused for each rule, before anything is made.
    let create = |body: serde_json::Value| Req::post("/v1/vms").json(&body);
    let bad_create = [
        (
            create(json!({"name": "Not_Valid"})).bad(),
            400,
            "invalid_name",
        ),
        (
            create(json!({"name": "odd", "cpus": 3})),
            400,
            "invalid_cpus",
        ),
        (
            create(json!({"name": "tiny", "ram": "64M"})),
            400,
            "invalid_ram",
        ),
        (
            create(json!({"name": "flat", "rootfs_size": 1})),
            400,
            "invalid_rootfs_size",
        ),
        (
            create(json!({"name": "x", "memory": 1})).bad(),
            400,
            "invalid_request",
        ),
        (
            Req::post("/v1/vms")
                .bytes("application/json", b"{not json".to_vec())
                .bad(),
            400,
            "invalid_request",
        ),
        (
            // Not kept alive: hearthd answers before it has read the body and closes.
            create(json!({"name": "big", "pad": "x".repeat(2 << 20)}))
                .header("connection", "close")
                .bad(),
            413,
            "request_too_large",
        ),
        (
            create(json!({"name": "huge", "ram": "1T"})),
            409,
            "insufficient_capacity",
        ),
        (
            create(json!({"name": "wide", "rootfs_size": "10T"})),
            507,
            "resource_exhausted",
        ),
    ];
    for (i, (req, status, code)) in bad_create.into_iter().enumerate() {
        expect(c, &format!("create refused {i}"), req, status, code).await;
    }
    assert_eq!(std::fs::read_dir(w.data().join("vms")).unwrap().count(), 0);

    // A stopped VM, and a running one.
    let cold = json!({"name": "ct-cold", "start": false});
    expect(c, "create stopped", create(cold.clone()), 201, "").await;
    expect(c, "create taken", create(cold), 409, "vm_name_taken").await;
    let vm = expect(
        c,
        "create running",
        create(json!({"name": "ct", "cpus": 1})),
        201,
        "",
    )
    .await
    .json();
    assert_eq!(vm["state"], "running", "{vm}");
    expect(c, "inspect", Req::get("/v1/vms/ct"), 200, "").await;
    expect(
        c,
        "inspect ghost",
        Req::get("/v1/vms/ghost"),
        404,
        "vm_not_found",
    )
    .await;
    expect(c, "list", Req::get("/v1/vms"), 200, "").await;

    // Exec, collected and streamed.
    let exec =
        |vm: &str, body: serde_json::Value| Req::post(format!("/v1/vms/{vm}/exec")).json(&body);
    let out = expect(
        c,
        "exec",
        exec(
            "ct",
            json!({"command": ["sh", "-c", "echo out; echo err >&2; exit 3"], "env": {"A": "1"}, "cwd": "/tmp", "stdin": "in"}),
        ),
        200,
        "",
    )
    .await
    .json();
    assert_eq!(
        (&out["exit_code"], &out["stdout"], &out["stderr"]),
        (&json!(3), &json!("out\n"), &json!("err\n"))
    );
    let slow = expect(
        c,
        "exec timed out",
        exec("ct", json!({"command": ["sleep", "30"], "timeout_secs": 1})),
        200,
        "",
    )
    .await
    .json();
    assert_eq!(slow["timed_out"], true, "{slow}");
    let bad_exec = [
        (
            exec("ct", json!({"command": []})).bad(),
            400,
            "invalid_command",
        ),
        (
            exec("ct", json!({"command": ["no-such-program"]})),
            400,
            "command_not_found",
        ),
        (
            exec("ct", json!({"command": ["true"], "cwd": "tmp"})),
            400,
            "invalid_path",
        ),
        (
            exec("ct", json!({"command": ["true"], "timeout_secs": 0})).bad(),
            400,
            "invalid_request",
        ),
        (
            exec("ct", json!({"cmd": ["true"]})).bad(),
            400,
            "invalid_request",
        ),
        (
            exec("ct-cold", json!({"command": ["true"]})),
            409,
            "invalid_state",
        ),
        (
            exec("ghost", json!({"command": ["true"]})),
            404,
            "vm_not_found",
        ),
    ];
    for (i, (req, status, code)) in bad_exec.into_iter().enumerate() {
        expect(c, &format!("exec refused {i}"), req, status, code).await;
    }
    let stream = |vm: &str, body: serde_json::Value| {
        Req::post(format!("/v1/vms/{vm}/exec/stream")).json(&body)
    };
    let lines = expect(
        c,
        "exec stream",
        stream(
            "ct",
            json!({"command": ["sh", "-c", "echo a; echo b >&2; exit 5"]}),
        ),
        200,
        "",
    )
    .await
    .text();
    assert!(
        lines
            .ends_with("{\"type\":\"exit\",\"exit_code\":5,\"signal\":null,\"timed_out\":false}\n"),
        "{lines}"
    );
    expect(
        c,
        "exec stream stopped",
        stream("ct-cold", json!({"command": ["true"]})),
        409,
        "invalid_state",
    )
    .await;
    expect(
        c,
        "exec stream empty",
        stream("ct", json!({"command": []})).bad(),
        400,
        "invalid_command",
    )
    .await;

    // The exec WebSocket: a plain GET is refused, an upgrade switches protocols.
    expect(
        c,
        "ws without upgrade",
        Req::get("/v1/vms/ct/exec/ws"),
        400,
        "invalid_request",
    )
    .await;
    expect(c, "ws upgrade", ws_upgrade("ct"), 101, "").await;
    expect(c, "ws stopped", ws_upgrade("ct-cold"), 409, "invalid_state").await;
    expect(c, "ws ghost", ws_upgrade("ghost"), 404, "vm_not_found").await;

    // Files.
    let content = pseudo_random(100_000);
    expect(
        c,
        "upload",
        Req::new("PUT", "/v1/vms/ct/files?path=/tmp/contract/f.bin&mode=600")
            .bytes("application/octet-stream", content.clone()),
        204,
        "",
    )
    .await;
    let got = expect(
        c,
        "download",
        Req::get("/v1/vms/ct/files?path=/tmp/contract/f.bin"),
        200,
        "",
    )
    .await;
    assert!(got.body == content, "downloaded bytes differ");
    assert_eq!(got.headers["x-hearth-file-mode"], "600");
    let bad_files = [
        (Req::get("/v1/vms/ct/files").bad(), 400, "invalid_request"),
        (
            Req::get("/v1/vms/ct/files?path=/etc/hostname&offset=1").bad(),
            400,
            "invalid_request",
        ),
        (
            Req::get("/v1/vms/ct/files?path=/no/such/file"),
            404,
            "guest_file_not_found",
        ),
        (
            Req::get("/v1/vms/ct/files?path=etc/hostname"),
            400,
            "invalid_path",
        ),
        (
            Req::get("/v1/vms/ct-cold/files?path=/etc/hostname"),
            409,
            "invalid_state",
        ),
        (
            Req::get("/v1/vms/ghost/files?path=/etc/hostname"),
            404,
            "vm_not_found",
        ),
        (
            Req::new("PUT", "/v1/vms/ct/files?path=/tmp/m&mode=999")
                .bytes("application/octet-stream", b"x".to_vec()),
            400,
            "invalid_request",
        ),
        (
            Req::new("PUT", "/v1/vms/ct/files")
                .bytes("application/octet-stream", b"x".to_vec())
                .bad(),
            400,
            "invalid_request",
        ),
        (
            Req::new("PUT", "/v1/vms/ct-cold/files?path=/tmp/m")
                .bytes("application/octet-stream", b"x".to_vec()),
            409,
            "invalid_state",
        ),
    ];
    for (i, (req, status, code)) in bad_files.into_iter().enumerate() {
        expect(c, &format!("files refused {i}"), req, status, code).await;
    }

    // Logs.
    let serial = expect(
        c,
        "serial log",
        Req::get("/v1/vms/ct/logs?tail=20"),
        200,
        "",
    )
    .await
    .text();
    assert!(!serial.is_empty());
    expect(
        c,
        "vmm log",
        Req::get("/v1/vms/ct/logs?source=vmm&follow=false"),
        200,
        "",
    )
    .await;
    for (i, (req, status, code)) in [
        (
            Req::get("/v1/vms/ct/logs?source=bogus").bad(),
            400,
            "invalid_request",
        ),
        (
            Req::get("/v1/vms/ct/logs?tail=many").bad(),
            400,
            "invalid_request",
        ),
        (Req::get("/v1/vms/ghost/logs"), 404, "vm_not_found"),
    ]
    .into_iter()
    .enumerate()
    {
        expect(c, &format!("logs refused {i}"), req, status, code).await;
    }

    // The guard.
    expect(
        c,
        "foreign host",
        Req::get("/v1/vms").header("host", "evil.example:7070"),
        403,
        "forbidden_host",
    )
    .await;
    expect(
        c,
        "foreign origin",
        Req::post("/v1/vms/ct/stop").header("origin", "https://evil.example"),
        403,
        "forbidden_origin",
    )
    .await;

    // Lifecycle.
    expect(
        c,
        "stop bad timeout",
        Req::post("/v1/vms/ct/stop?timeout_secs=-1").bad(),
        400,
        "invalid_request",
    )
    .await;
    let stopped = expect(
        c,
        "stop",
        Req::post("/v1/vms/ct/stop?timeout_secs=60"),
        200,
        "",
    )
    .await
    .json();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    expect(
        c,
        "stop stopped",
        Req::post("/v1/vms/ct/stop"),
        409,
        "invalid_state",
    )
    .await;
    expect(c, "start", Req::post("/v1/vms/ct/start"), 200, "").await;
    expect(
        c,
        "start running",
        Req::post("/v1/vms/ct/start"),
        409,
        "invalid_state",
    )
    .await;
    expect(c, "restart", Req::post("/v1/vms/ct/restart"), 200, "").await;
    // Pause and resume: a paused VM refuses exec and files (409 naming its state) and serves
    // its logs; only a running VM pauses and only a paused one resumes.
    let paused = expect(c, "pause", Req::post("/v1/vms/ct/pause"), 200, "")
        .await
        .json();
    assert_eq!(paused["state"], "paused", "{paused}");
    expect(
        c,
        "pause paused",
        Req::post("/v1/vms/ct/pause"),
        409,
        "invalid_state",
    )
    .await;
    let refused = expect(
        c,
        "exec paused",
        Req::post("/v1/vms/ct/exec").json(&json!({"command": ["true"]})),
        409,
        "invalid_state",
    )
    .await
    .json();
    assert_eq!(
        refused["message"], "VM \"ct\" is paused: exec needs it running",
        "{refused}"
    );
    expect(
        c,
        "files paused",
        Req::get("/v1/vms/ct/files?path=/etc/hostname"),
        409,
        "invalid_state",
    )
    .await;
    expect(
        c,
        "logs paused",
        Req::get("/v1/vms/ct/logs?tail=5"),
        200,
        "",
    )
    .await;
    let resumed = expect(c, "resume", Req::post("/v1/vms/ct/resume"), 200, "")
        .await
        .json();
    assert_eq!(resumed["state"], "running", "{resumed}");
    expect(
        c,
        "resume running",
        Req::post("/v1/vms/ct/resume"),
        409,
        "invalid_state",
    )
    .await;
    expect(
        c,
        "pause stopped",
        Req::post("/v1/vms/ct-cold/pause"),
        409,
        "invalid_state",
    )
    .await;
    for op in ["start", "stop", "restart", "pause", "resume"] {
        expect(
            c,
            &format!("{op} ghost"),
            Req::post(format!("/v1/vms/ghost/{op}")),
            404,
            "vm_not_found",
        )
        .await;
    }
    // Resize: a stopped VM's shape, its disk grow-only; a running one is refused.
    let resize =
        |vm: &str, body: serde_json::Value| Req::post(format!("/v1/vms/{vm}/resize")).json(&body);
    expect(
        c,
        "resize running",
        resize("ct", json!({"cpus": 2})),
        409,
        "invalid_state",
    )
    .await;
    let grown = expect(
        c,
        "resize",
        resize("ct-cold", json!({"cpus": 2, "ram": "512M"})),
        200,
        "",
    )
    .await
    .json();
    assert_eq!(
        (&grown["cpus"], &grown["memory_mib"]),
        (&json!(2), &json!(512)),
        "{grown}"
    );
    expect(
        c,
        "resize shrink",
        resize("ct-cold", json!({"rootfs_size": "1M"})),
        400,
        "invalid_rootfs_size",
    )
    .await;
    expect(
        c,
        "resize nothing",
        resize("ct-cold", json!({})),
        400,
        "invalid_request",
    )
    .await;
    expect(
        c,
        "resize ghost",
        resize("ghost", json!({"cpus": 2})),
        404,
        "vm_not_found",
    )
    .await;
    // Backups of a stopped VM, restored only into it.
    expect(
        c,
        "backup running",
        Req::post("/v1/vms/ct/backups"),
        409,
        "invalid_state",
    )
    .await;
    let backup = expect(c, "backup", Req::post("/v1/vms/ct-cold/backups"), 201, "")
        .await
        .json();
    let id = backup["id"].as_str().unwrap().to_owned();
    expect(c, "backups", Req::get("/v1/vms/ct-cold/backups"), 200, "").await;
    let restore = |vm: &str, backup: &str| {
        Req::post(format!("/v1/vms/{vm}/restore")).json(&json!({ "backup": backup }))
    };
    expect(c, "restore", restore("ct-cold", &id), 200, "").await;
    expect(
        c,
        "restore running",
        restore("ct", &id),
        409,
        "invalid_state",
    )
    .await;
    expect(
        c,
        "restore unknown",
        restore("ct-cold", "0000000000000000"),
        404,
        "backup_not_found",
    )
    .await;
    expect(
        c,
        "restore bad body",
        Req::post("/v1/vms/ct-cold/restore")
            .json(&json!({"id": id}))
            .bad(),
        400,
        "invalid_request",
    )
    .await;
    let delete = Req::new("DELETE", format!("/v1/vms/ct-cold/backups/{id}"));
    expect(c, "backup delete", delete, 204, "").await;
    let again = Req::new("DELETE", format!("/v1/vms/ct-cold/backups/{id}"));
    expect(c, "backup delete again", again, 404, "backup_not_found").await;
    // Export and import: the archive out; back in it is refused under a taken name, and cut
    // short.
    let a = c
        .send_large("export running", Req::get("/v1/vms/ct/export"))
        .await;
    assert_eq!(
        (a.status, a.code()),
        (409, "invalid_state".into()),
        "{}",
        a.text()
    );
    let archive = c
        .send_large("export", Req::get("/v1/vms/ct-cold/export"))
        .await;
    assert_eq!(archive.status, 200);
    let import = |b: Vec<u8>| Req::post("/v1/imports").bytes("application/x-tar", b);
    let a = c
        .send_large("import taken", import(archive.body.clone()))
        .await;
    assert_eq!(
        (a.status, a.code()),
        (409, "vm_name_taken".into()),
        "{}",
        a.text()
    );
    // Cut inside the manifest (a cut later reads as the taken name first).
    let half = archive.body[..700].to_vec();
    let a = c.send_large("import cut short", import(half)).await;
    assert_eq!(
        (a.status, a.code()),
        (400, "invalid_archive".into()),
        "{}",
        a.text()
    );
    // Volumes: made, attached to a stopped VM only and to one VM at a time, detached, deleted.
    let volume = |body: serde_json::Value| Req::post("/v1/volumes").json(&body);
    let attach = |vm: &str, name: &str, body: serde_json::Value| {
        Req::new("PUT", format!("/v1/vms/{vm}/volumes/{name}")).json(&body)
    };
    let detach = |vm: &str, name: &str| Req::new("DELETE", format!("/v1/vms/{vm}/volumes/{name}"));
    let made = expect(
        c,
        "volume create",
        volume(json!({"name": "ct-vol", "size": "32M"})),
        201,
        "",
    )
    .await
    .json();
    assert_eq!(made["formatted"], false, "{made}");
    for (label, req, status, code) in [
        (
            "volume taken",
            volume(json!({"name": "ct-vol", "size": 32})),
            409,
            "volume_name_taken",
        ),
        (
            "volume too big",
            volume(json!({"name": "ct-big", "size": "51G"})),
            400,
            "invalid_size",
        ),
        (
            "volume bad name",
            volume(json!({"name": "Big", "size": "1G"})).bad(),
            400,
            "invalid_name",
        ),
        (
            "volume attach running",
            attach("ct", "ct-vol", json!({"path": "/data"})),
            409,
            "invalid_state",
        ),
        (
            "volume attach bad path",
            attach("ct-cold", "ct-vol", json!({"path": "/proc/x"})),
            400,
            "invalid_path",
        ),
        (
            "volume attach odd path",
            attach("ct-cold", "ct-vol", json!({"path": "/a b"})).bad(),
            400,
            "invalid_path",
        ),
        (
            "volume attach unknown",
            attach("ct-cold", "nope", json!({"path": "/data"})),
            404,
            "volume_not_found",
        ),
        (
            "volume attach no vm",
            attach("nope", "ct-vol", json!({"path": "/data"})),
            404,
            "vm_not_found",
        ),
    ] {
        expect(c, label, req, status, code).await;
    }
    let attached = expect(
        c,
        "volume attach",
        attach("ct-cold", "ct-vol", json!({"path": "/data"})),
        200,
        "",
    )
    .await
    .json();
    assert_eq!(attached["volumes"][0]["path"], "/data", "{attached}");
    expect(c, "volumes", Req::get("/v1/volumes"), 200, "").await;
    for (label, req, status, code) in [
        (
            "volume delete attached",
            Req::new("DELETE", "/v1/volumes/ct-vol"),
            409,
            "volume_in_use",
        ),
        (
            "create with a taken volume",
            create(
                json!({"name": "ct-vol-vm", "start": false, "volumes": [{"name": "ct-vol", "path": "/d"}]}),
            ),
            409,
            "volume_in_use",
        ),
        (
            "volume detach running",
            detach("ct", "ct-vol"),
            409,
            "invalid_state",
        ),
    ] {
        expect(c, label, req, status, code).await;
    }
    expect(c, "volume detach", detach("ct-cold", "ct-vol"), 200, "").await;
    expect(
        c,
        "volume detach again",
        detach("ct-cold", "ct-vol"),
        404,
        "volume_not_found",
    )
    .await;
    let delete = Req::new("DELETE", "/v1/volumes/ct-vol");
    expect(c, "volume delete", delete, 204, "").await;
    let again = Req::new("DELETE", "/v1/volumes/ct-vol");
    expect(c, "volume delete again", again, 404, "volume_not_found").await;
    // Networking: egress policies and private networks, working and failing.
    let egress = |vm: &str, body: serde_json::Value| {
        Req::new("PUT", format!("/v1/vms/{vm}/egress")).json(&body)
    };
    let policy = json!({"allow_cidrs": ["192.0.2.0/24"], "allow_ports": [443], "allow_domains": ["*.example.com"]});
    let set = expect(c, "egress", egress("ct", policy.clone()), 200, "")
        .await
        .json();
    assert_eq!(set["network"]["egress"]["mode"], "deny_all", "{set}");
    expect(
        c,
        "egress bad cidr",
        egress("ct", json!({"deny_cidrs": ["10.0.0.1/8"]})),
        400,
        "invalid_request",
    )
    .await;
    expect(
        c,
        "egress ports alone",
        egress("ct", json!({"allow_ports": [22]})),
        400,
        "invalid_request",
    )
    .await;
    expect(
        c,
        "egress unknown field",
        egress("ct", json!({"allow": []})).bad(),
        400,
        "invalid_request",
    )
    .await;
    expect(
        c,
        "egress ghost",
        egress("ghost", policy),
        404,
        "vm_not_found",
    )
    .await;
    expect(
        c,
        "egress reset",
        egress("ct", json!({"mode": "allow_all"})),
        200,
        "",
    )
    .await;
    let network = |body: serde_json::Value| Req::post("/v1/networks").json(&body);
    expect(c, "networks empty", Req::get("/v1/networks"), 200, "").await;
    expect(
        c,
        "network create",
        network(json!({"name": "ctnet"})),
        201,
        "",
    )
    .await;
    expect(
        c,
        "network taken",
        network(json!({"name": "ctnet"})),
        409,
        "network_name_taken",
    )
    .await;
    expect(
        c,
        "network bad name",
        network(json!({"name": "Bad_Net"})).bad(),
        400,
        "invalid_request",
    )
    .await;
    let joined = expect(
        c,
        "network connect",
        Req::new("PUT", "/v1/networks/ctnet/members/ct"),
        200,
        "",
    )
    .await
    .json();
    assert_eq!(joined["members"], json!(["ct"]), "{joined}");
    expect(
        c,
        "network connect ghost vm",
        Req::new("PUT", "/v1/networks/ctnet/members/ghost"),
        404,
        "vm_not_found",
    )
    .await;
    expect(
        c,
        "network connect ghost net",
        Req::new("PUT", "/v1/networks/nonet/members/ct"),
        404,
        "network_not_found",
    )
    .await;
    let listed = expect(c, "networks", Req::get("/v1/networks"), 200, "")
        .await
        .json();
    assert_eq!(listed[0]["members"], json!(["ct"]), "{listed}");
    expect(
        c,
        "network delete in use",
        Req::new("DELETE", "/v1/networks/ctnet"),
        409,
        "network_in_use",
    )
    .await;
    expect(
        c,
        "network disconnect",
        Req::new("DELETE", "/v1/networks/ctnet/members/ct"),
        200,
        "",
    )
    .await;
    expect(
        c,
        "network delete",
        Req::new("DELETE", "/v1/networks/ctnet"),
        204,
        "",
    )
    .await;
    expect(
        c,
        "network delete ghost",
        Req::new("DELETE", "/v1/networks/ctnet"),
        404,
        "network_not_found",
    )
    .await;
    expect(
        c,
        "create in ghost network",
        create(json!({"name": "ct-x", "networks": ["nonet"]})),
        404,
        "network_not_found",
    )
    .await;

    // Secrets: made, replaced, refused, listed (never a value), rotated, deleted.
    let set = |name: &str, body: serde_json::Value| {
        Req::new("PUT", format!("/v1/secrets/{name}")).json(&body)
    };
    expect(
        c,
        "secret set",
        set("CT_TOKEN", json!({"value": "ct-value-1"})),
        201,
        "",
    )
    .await;
    expect(
        c,
        "secret replace",
        set("CT_TOKEN", json!({"value": "ct-value-2"})),
        200,
        "",
    )
    .await;
    expect(
        c,
        "secret bad name",
        set("ct_token", json!({"value": "v"})),
        400,
        "invalid_name",
    )
    .await;
    expect(
        c,
        "secret empty",
        set("CT_EMPTY", json!({"value": ""})).bad(),
        400,
        "invalid_request",
    )
    .await;
    expect(
        c,
        "secret not a string",
        set("CT_NUMBER", json!({"value": 1234})).bad(),
        400,
        "invalid_request",
    )
    .await;
    let list = expect(c, "secret list", Req::get("/v1/secrets"), 200, "").await;
    assert_eq!(list.json()[0]["name"], "CT_TOKEN", "{}", list.text());
    assert!(!list.text().contains("ct-value"), "{}", list.text());
    let rotated = expect(
        c,
        "rotate master key",
        Req::post("/v1/secrets/rotate-master-key"),
        200,
        "",
    )
    .await;
    assert_eq!(rotated.json()["secrets"], 1, "{}", rotated.text());
    expect(
        c,
        "secret delete",
        Req::new("DELETE", "/v1/secrets/CT_TOKEN"),
        204,
        "",
    )
    .await;
    expect(
        c,
        "secret delete ghost",
        Req::new("DELETE", "/v1/secrets/CT_TOKEN"),
        404,
        "secret_not_found",
    )
    .await;

    expect(c, "delete", Req::new("DELETE", "/v1/vms/ct"), 204, "").await;
    expect(
        c,
        "delete stopped",
        Req::new("DELETE", "/v1/vms/ct-cold"),
        204,
        "",
    )
    .await;
    expect(
        c,
        "delete ghost",
        Req::new("DELETE", "/v1/vms/ct"),
        404,
        "vm_not_found",
    )
    .await;
    assert!(c.pending() > 60, "only {} exchanges", c.pending());
}

/// A WebSocket upgrade request of the exec endpoint.
fn ws_upgrade(vm: &str) -> Req {
    Req::get(format!("/v1/vms/{vm}/exec/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
}
