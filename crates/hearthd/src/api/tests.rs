//! Router tests: the real router, store and VM service, with a VMM double that cannot boot.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::watch;
use tower::ServiceExt;

use super::{AppState, openapi_json, router};
use crate::store::Store;
use crate::testing;
use crate::vm::{ImageState, VmService};
use crate::vmm::double::NoBootVmm;

struct Ctx {
    dir: tempfile::TempDir,
    app: axum::Router,
    store: Store,
    service: VmService,
}

impl Ctx {
    async fn new() -> Ctx {
        Self::with(|_| {}).await
    }

    /// With the default configuration as `change` leaves it.
    async fn with(change: impl FnOnce(&mut crate::config::Config)) -> Ctx {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut config = testing::config(&data);
        change(&mut config);
        let image = testing::image(&data, 1024);
        let store = Store::open(&config.database_url).await.unwrap();
        let (_tx, rx) = watch::channel(ImageState::Ready(image));
        std::mem::forget(_tx);
        let request_timeout = config.request_timeout;
        let guard = Arc::new(super::guard::Guard::new(config.listen, &config.server));
        let service = VmService::new(
            Arc::new(config),
            store.clone(),
            Arc::new(NoBootVmm::default()),
            rx,
        );
        let app = router(AppState {
            service: service.clone(),
            request_timeout,
            guard,
        });
        Ctx {
            dir,
            app,
            store,
            service,
        }
    }

    fn vm_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path().join("data/vms"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let resp = self
            .app
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, json)
    }
}

#[tokio::test]
async fn health_and_empty_list() {
    let ctx = Ctx::new().await;
    let (s, body) = ctx.call("GET", "/v1/health", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["image"], "testimage");
    assert_eq!(body["image_status"], "ready");
    let (s, body) = ctx.call("GET", "/v1/vms", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, json!([]));
}

#[tokio::test]
async fn bad_creates_are_400s_that_name_the_field_and_leave_nothing() {
    let ctx = Ctx::new().await;
    let cases = [
        (
            json!({"name": "Bad_Name"}),
            "invalid_name",
            "starting with a letter",
        ),
        (
            json!({"name": "ok", "cpus": 3}),
            "invalid_cpus",
            "1 or an even number",
        ),
        (
            json!({"name": "ok", "ram": "64M"}),
            "invalid_ram",
            "at least 128 MiB",
        ),
        (
            json!({"name": "ok", "ram": "lots"}),
            "invalid_ram",
            "2G, 512M",
        ),
        (
            json!({"name": "ok", "rootfs_size": "512M"}),
            "invalid_rootfs_size",
            "at least 1024 MiB",
        ),
        (
            json!({"name": "ok", "memory": 5}),
            "invalid_request",
            "unknown field `memory`",
        ),
        (
            json!({"cpus": 2}),
            "invalid_request",
            "missing field `name`",
        ),
    ];
    for (body, code, words) in cases {
        let (s, resp) = ctx.call("POST", "/v1/vms", Some(body.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {resp}");
        assert_eq!(resp["error"], code, "{body}: {resp}");
        let msg = resp["message"].as_str().unwrap();
        assert!(msg.contains(words), "{body}: {msg}");
    }
    let (_, list) = ctx.call("GET", "/v1/vms", None).await;
    assert_eq!(list, json!([]));
    assert!(ctx.vm_dirs().is_empty());
}

#[tokio::test]
async fn a_create_whose_boot_fails_leaves_nothing() {
    let ctx = Ctx::new().await;
    let (s, resp) = ctx
        .call("POST", "/v1/vms", Some(json!({"name": "doomed"})))
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{resp}");
    assert_eq!(resp["error"], "vmm_failed");
    assert!(
        resp["message"]
            .as_str()
            .unwrap()
            .contains("cannot boot guests"),
        "{resp}"
    );
    let (_, list) = ctx.call("GET", "/v1/vms", None).await;
    assert_eq!(list, json!([]));
    assert!(ctx.vm_dirs().is_empty(), "{:?}", ctx.vm_dirs());
}

/// The files in the data directory's `volumes/`.
fn volume_files(ctx: &Ctx) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(ctx.dir.path().join("data/volumes"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn message(body: &Value) -> &str {
    body["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn bad_volumes_are_refused_naming_the_field_and_rule_and_leave_nothing() {
    let ctx = Ctx::new().await;
    for (body, code, says) in [
        (
            json!({"name": "data", "size": "51G"}),
            "invalid_size",
            "invalid size \"51G\": must be at most 51200 MiB (volumes.max_size)",
        ),
        (
            json!({"name": "data", "size": 1}),
            "invalid_size",
            "must be at least 16 MiB",
        ),
        (
            json!({"name": "data", "size": "lots"}),
            "invalid_size",
            "invalid size \"lots\"",
        ),
        (
            json!({"name": "Data", "size": "1G"}),
            "invalid_name",
            "volume invalid name",
        ),
        (json!({"name": "data"}), "invalid_request", "size"),
    ] {
        let (s, resp) = ctx.call("POST", "/v1/volumes", Some(body.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {resp}");
        assert_eq!(resp["error"], code, "{body}: {resp}");
        assert!(message(&resp).contains(says), "{body}: {resp}");
    }
    let (_, list) = ctx.call("GET", "/v1/volumes", None).await;
    assert_eq!(list, json!([]));
    assert!(volume_files(&ctx).is_empty(), "{:?}", volume_files(&ctx));

    // A volume that, filled, would leave the data filesystem under the floor.
    let ctx = Ctx::with(|c| c.volumes.min_free_disk_mib = 1 << 40).await;
    let (s, resp) = ctx
        .call(
            "POST",
            "/v1/volumes",
            Some(json!({"name": "data", "size": "1G"})),
        )
        .await;
    assert_eq!(s, StatusCode::INSUFFICIENT_STORAGE, "{resp}");
    assert_eq!(resp["error"], "resource_exhausted");
    assert!(message(&resp).contains("volumes.min_free_disk"), "{resp}");
    assert!(volume_files(&ctx).is_empty(), "{:?}", volume_files(&ctx));
    let (_, list) = ctx.call("GET", "/v1/volumes", None).await;
    assert_eq!(list, json!([]));
}

#[tokio::test]
async fn volumes_attach_to_one_stopped_vm_and_outlive_it() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let ctx = Ctx::new().await;
    let (s, data) = ctx
        .call(
            "POST",
            "/v1/volumes",
            Some(json!({"name": "data", "size": "64M"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{data}");
    assert_eq!(
        (data["size_mib"].as_u64(), data["formatted"].as_bool()),
        (Some(64), Some(false))
    );
    assert_eq!(data["vm"], Value::Null);
    let id = data["id"].as_str().unwrap().to_owned();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    let file = ctx.dir.path().join(format!("data/volumes/{id}.ext4"));
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(meta.blocks() * 512 < 1 << 20, "the new file is sparse");
    let (s, resp) = ctx
        .call(
            "POST",
            "/v1/volumes",
            Some(json!({"name": "data", "size": "64M"})),
        )
        .await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::CONFLICT, Some("volume_name_taken"))
    );
    let (s, _) = ctx
        .call(
            "POST",
            "/v1/volumes",
            Some(json!({"name": "spare", "size": 32})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);

    // A create's volumes are checked before anything is made.
    for (volumes, status, code, says) in [
        (
            json!([{"name": "data", "path": "/proc/x"}]),
            StatusCode::BAD_REQUEST,
            "invalid_path",
            "invalid path \"/proc/x\": it is under /proc",
        ),
        (
            json!([{"name": "data", "path": "data"}]),
            StatusCode::BAD_REQUEST,
            "invalid_path",
            "not absolute",
        ),
        (
            json!([{"name": "spare", "path": "/s"}, {"name": "nope", "path": "/n"}]),
            StatusCode::NOT_FOUND,
            "volume_not_found",
            "\"nope\"",
        ),
        (
            json!([{"name": "data", "path": "/d"}, {"name": "spare", "path": "/d/"}]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "mounted at \"/d\"",
        ),
        (
            json!([{"name": "data", "path": "/d"}, {"name": "data", "path": "/e"}]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "given twice",
        ),
    ] {
        let body = json!({"name": "a", "start": false, "volumes": volumes});
        let (s, resp) = ctx.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(
            (s, resp["error"].as_str()),
            (status, Some(code)),
            "{volumes}: {resp}"
        );
        assert!(message(&resp).contains(says), "{volumes}: {resp}");
        let (_, list) = ctx.call("GET", "/v1/vms", None).await;
        assert_eq!(list, json!([]), "{volumes}");
    }
    // A create that fails at boot leaves its volumes unattached (and formatted).
    let body = json!({"name": "doomed", "volumes": [{"name": "spare", "path": "/s"}]});
    let (s, resp) = ctx.call("POST", "/v1/vms", Some(body)).await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, Some("vmm_failed")),
        "{resp}"
    );
    let (_, list) = ctx.call("GET", "/v1/volumes", None).await;
    assert_eq!(list[1]["name"], "spare");
    assert_eq!(
        (&list[1]["vm"], &list[1]["path"]),
        (&Value::Null, &Value::Null),
        "{list}"
    );
    assert_eq!(list[1]["formatted"], true);

    // Attached at create: formatted ext4 first.
    let body =
        json!({"name": "a", "start": false, "volumes": [{"name": "data", "path": "/srv//data/"}]});
    let (s, a) = ctx.call("POST", "/v1/vms", Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    assert_eq!(
        a["volumes"],
        json!([{"name": "data", "path": "/srv/data", "size_mib": 64}])
    );
    let magic = std::fs::read(&file).unwrap()[1080..1082].to_vec();
    assert_eq!(magic, [0x53, 0xef], "an ext4 superblock");
    let (_, list) = ctx.call("GET", "/v1/volumes", None).await;
    assert_eq!(
        (&list[0]["vm"], &list[0]["path"], &list[0]["formatted"]),
        (&json!("a"), &json!("/srv/data"), &json!(true))
    );

    // Another VM cannot take it, at create or by attach; the error names the VM holding it.
    let body = json!({"name": "b", "start": false, "volumes": [{"name": "data", "path": "/d"}]});
    let (s, resp) = ctx.call("POST", "/v1/vms", Some(body)).await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::CONFLICT, Some("volume_in_use")),
        "{resp}"
    );
    assert!(message(&resp).contains("attached to VM \"a\""), "{resp}");
    let (s, _) = ctx.call("GET", "/v1/vms/b", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a refused create makes nothing");
    let (s, b) = ctx
        .call(
            "POST",
            "/v1/vms",
            Some(json!({"name": "b", "start": false})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, resp) = ctx
        .call(
            "PUT",
            "/v1/vms/b/volumes/data",
            Some(json!({"path": "/data"})),
        )
        .await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::CONFLICT, Some("volume_in_use")),
        "{resp}"
    );
    assert!(message(&resp).contains("attached to VM \"a\""), "{resp}");
    // Nor can it be deleted while attached.
    let (s, resp) = ctx.call("DELETE", "/v1/volumes/data", None).await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::CONFLICT, Some("volume_in_use")),
        "{resp}"
    );
    assert!(message(&resp).contains("VM \"a\""), "{resp}");
    assert!(file.exists());

    // Bad paths and names are refused naming the rule.
    for (uri, body, code, says) in [
        (
            "/v1/vms/b/volumes/spare",
            json!({"path": "/"}),
            "invalid_path",
            "it is the root directory",
        ),
        (
            "/v1/vms/b/volumes/spare",
            json!({"path": "/a/../etc"}),
            "invalid_path",
            ".. component",
        ),
        (
            "/v1/vms/b/volumes/spare",
            json!({"path": "/a b"}),
            "invalid_path",
            "' ' is not allowed",
        ),
        (
            "/v1/vms/b/volumes/spare",
            json!({"path": format!("/{}", "x".repeat(128))}),
            "invalid_path",
            "129 bytes",
        ),
        (
            "/v1/vms/b/volumes/Spare",
            json!({"path": "/s"}),
            "invalid_name",
            "volume invalid name",
        ),
        (
            "/v1/vms/b/volumes/spare",
            json!({"path": "/s", "mode": 1}),
            "invalid_request",
            "unknown field",
        ),
    ] {
        let (s, resp) = ctx.call("PUT", uri, Some(body.clone())).await;
        assert_eq!(
            (s, resp["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{body}: {resp}"
        );
        assert!(message(&resp).contains(says), "{body}: {resp}");
    }
    let (s, resp) = ctx
        .call("PUT", "/v1/vms/b/volumes/nope", Some(json!({"path": "/n"})))
        .await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("volume_not_found")),
        "{resp}"
    );
    let (s, resp) = ctx
        .call(
            "PUT",
            "/v1/vms/zz/volumes/spare",
            Some(json!({"path": "/n"})),
        )
        .await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("vm_not_found")),
        "{resp}"
    );

    // Not while the VM runs (its state set as a running VM's would be).
    let b_id = b["id"].as_str().unwrap();
    ctx.store
        .execute_for_test("UPDATE vms SET state = 'running' WHERE id = $1", b_id)
        .await;
    let (s, resp) = ctx
        .call(
            "PUT",
            "/v1/vms/b/volumes/spare",
            Some(json!({"path": "/s"})),
        )
        .await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_state")),
        "{resp}"
    );
    assert!(
        message(&resp).contains("it is running, and that needs it stopped"),
        "{resp}"
    );
    let (s, resp) = ctx.call("DELETE", "/v1/vms/a/volumes/data", None).await;
    assert_eq!(s, StatusCode::OK, "{resp}");
    assert_eq!(resp["volumes"], json!([]));
    let (s, resp) = ctx
        .call(
            "PUT",
            "/v1/vms/b/volumes/data",
            Some(json!({"path": "/data"})),
        )
        .await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_state")),
        "{resp}"
    );
    ctx.store
        .execute_for_test("UPDATE vms SET state = 'stopped' WHERE id = $1", b_id)
        .await;

    // Detached from a, it goes to b; a second one may not share its path.
    let (s, resp) = ctx
        .call(
            "PUT",
            "/v1/vms/b/volumes/data",
            Some(json!({"path": "/data"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{resp}");
    assert_eq!(
        resp["volumes"],
        json!([{"name": "data", "path": "/data", "size_mib": 64}])
    );
    let (s, resp) = ctx
        .call(
            "PUT",
            "/v1/vms/b/volumes/spare",
            Some(json!({"path": "/data/"})),
        )
        .await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_path")),
        "{resp}"
    );
    assert!(
        message(&resp).contains("already has a volume mounted there"),
        "{resp}"
    );
    let (s, resp) = ctx.call("DELETE", "/v1/vms/a/volumes/data", None).await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("volume_not_found")),
        "{resp}"
    );
    let (_, detail) = ctx.call("GET", "/v1/vms/b", None).await;
    let kinds: Vec<&str> = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"volume_attached"), "{kinds:?}");

    // Deleting the VM keeps the volume, detached; only a volume delete removes it.
    let (s, _) = ctx.call("DELETE", "/v1/vms/b", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, list) = ctx.call("GET", "/v1/volumes", None).await;
    assert_eq!(
        (&list[0]["name"], &list[0]["vm"]),
        (&json!("data"), &Value::Null),
        "{list}"
    );
    assert!(file.exists());
    let (s, _) = ctx.call("DELETE", "/v1/volumes/data", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(!file.exists());
    let (s, resp) = ctx.call("DELETE", "/v1/volumes/data", None).await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("volume_not_found")),
        "{resp}"
    );
    assert_eq!(volume_files(&ctx).len(), 1, "{:?}", volume_files(&ctx));
}

#[tokio::test]
async fn lifecycle_without_booting() {
    let ctx = Ctx::new().await;
    let (s, vm) = ctx
        .call(
            "POST",
            "/v1/vms",
            Some(json!({"name": "idle", "ram": "2G", "rootfs_size": 2048, "start": false})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["memory_mib"], 2048);
    assert_eq!(vm["rootfs_mib"], 2048);
    assert_eq!(vm["events"][0]["kind"], "created");
    // The disk exists and was grown.
    let id = vm["id"].as_str().unwrap();
    let disk = ctx.dir.path().join("data/vms").join(id).join("rootfs.ext4");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 2048 << 20);

    let (s, resp) = ctx
        .call(
            "POST",
            "/v1/vms",
            Some(json!({"name": "idle", "start": false})),
        )
        .await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::CONFLICT, Some("vm_name_taken"))
    );

    let (s, resp) = ctx.call("POST", "/v1/vms/idle/stop", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{resp}");
    assert_eq!(resp["error"], "invalid_state");
    assert_eq!(
        resp["message"],
        "cannot stop VM \"idle\": it is stopped already"
    );

    let (s, resp) = ctx
        .call(
            "POST",
            "/v1/vms/idle/exec",
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        resp["message"]
            .as_str()
            .unwrap()
            .contains("exec needs it running")
    );

    // A failed start records the error on the VM.
    let (s, resp) = ctx.call("POST", "/v1/vms/idle/start", None).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{resp}");
    let (_, detail) = ctx.call("GET", "/v1/vms/idle", None).await;
    assert_eq!(detail["state"], "error");
    assert!(
        detail["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot boot guests")
    );
    let kinds: Vec<_> = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        ["created", "created_disk", "start_requested", "start_failed"]
    );

    let (s, _) = ctx.call("DELETE", "/v1/vms/idle", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(ctx.vm_dirs().is_empty());
    let (s, resp) = ctx.call("GET", "/v1/vms/idle", None).await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("vm_not_found"))
    );
}

#[tokio::test]
async fn unknown_things_are_404s_and_bad_params_400s() {
    let ctx = Ctx::new().await;
    for (method, uri) in [
        ("GET", "/v1/vms/ghost"),
        ("POST", "/v1/vms/ghost/start"),
        ("POST", "/v1/vms/ghost/stop"),
        ("DELETE", "/v1/vms/ghost"),
        ("GET", "/v1/vms/ghost/logs"),
    ] {
        let (s, resp) = ctx.call(method, uri, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method} {uri}");
        assert_eq!(resp["error"], "vm_not_found");
        assert_eq!(resp["message"], "no VM named \"ghost\"");
    }
    let (s, resp) = ctx.call("PUT", "/v1/vms", None).await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    let (s, resp) = ctx.call("GET", "/v1/vms/ghost/exec/ws", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{resp}");
    assert!(resp["message"].as_str().unwrap().contains("WebSocket"));
    let (s, resp) = ctx.call("GET", "/v2/nothing", None).await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (s, resp) = ctx
        .call("POST", "/v1/vms/ghost/stop?timeout_secs=soon", None)
        .await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let (s, resp) = ctx
        .call("GET", "/v1/vms/ghost/files?path=relative", None)
        .await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_path"))
    );
    let (s, resp) = ctx
        .call("POST", "/v1/vms/ghost/exec", Some(json!({"command": []})))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{resp}");
}

/// The committed `openapi.json` is what the code generates. Set `UPDATE_EXPECT=1` to rewrite it.
#[test]
fn committed_openapi_document_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi.json");
    let fresh = openapi_json();
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    if committed != fresh {
        if std::env::var_os("UPDATE_EXPECT").is_some() {
            std::fs::write(path, &fresh).unwrap();
        } else {
            panic!(
                "openapi.json is stale; run `UPDATE_EXPECT=1 cargo test -p hearthd openapi` and commit it"
            );
        }
    }
    let doc: Value = serde_json::from_str(&fresh).unwrap();
    for path in [
        "/v1/vms",
        "/v1/vms/{name}/exec",
        "/v1/vms/{name}/files",
        "/v1/health",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
}

#[tokio::test]
async fn docs_page_lists_the_endpoints() {
    let ctx = Ctx::new().await;
    let resp = ctx
        .app
        .clone()
        .oneshot(Request::get("/docs").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let html = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(html.contains("/v1/vms/{name}/exec"));
    assert!(html.contains("Create a VM"));
}

#[tokio::test]
async fn a_vm_the_host_cannot_hold_is_refused_at_once_and_leaves_nothing() {
    let ctx = Ctx::new().await;
    let started = std::time::Instant::now();
    let (s, resp) = ctx
        .call(
            "POST",
            "/v1/vms",
            Some(json!({"name": "huge", "ram": "1T"})),
        )
        .await;
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::CONFLICT, Some("insufficient_capacity")),
        "{resp}"
    );
    let msg = resp["message"].as_str().unwrap();
    assert!(
        msg.starts_with("not enough memory on this host: the VM needs 1048576 MiB,"),
        "{msg}"
    );
    assert!(ctx.vm_dirs().is_empty());
    let (_, list) = ctx.call("GET", "/v1/vms", None).await;
    assert_eq!(list, json!([]));

    // A disk far beyond the data directory's filesystem: 507.
    let (s, resp) = ctx
        .call(
            "POST",
            "/v1/vms",
            Some(json!({"name": "wide", "rootfs_size": "10T", "start": false})),
        )
        .await;
    assert_eq!(
        (s, resp["error"].as_str()),
        (StatusCode::INSUFFICIENT_STORAGE, Some("resource_exhausted")),
        "{resp}"
    );
    assert!(ctx.vm_dirs().is_empty());

    // The health report shows the capacity it decided on.
    let (_, health) = ctx.call("GET", "/v1/health", None).await;
    let memory = &health["capacity"]["memory_mib"];
    assert_eq!(memory["committed"], 0);
    assert!(memory["total"].as_u64().unwrap() > 0, "{health}");
}

/// A VM row hearthd cannot read does not stop recovery: that VM is marked `error` with the
/// reason, and every other VM is still settled.
#[tokio::test]
async fn an_unreadable_vm_row_does_not_stop_recovery() {
    use crate::store::VmRecord;
    use hearth_api::VmState;
    let dir = tempfile::tempdir().unwrap();
    let config = testing::config(dir.path());
    let store = Store::open(&config.database_url).await.unwrap();
    for name in ["good", "bad"] {
        let now = crate::store::now();
        let vm = VmRecord {
            id: format!("id-{name}"),
            name: name.into(),
            state: VmState::Running,
            cpus: 1,
            memory_mib: 1024,
            rootfs_mib: 1024,
            image: "testimage".into(),
            vmm: "fake".into(),
            pid: Some(999_999),
            created_at: now.clone(),
            created_by: "operator".into(),
            org: "default".into(),
            updated_at: now,
            last_error: None,
            net_index: None,
            egress: Default::default(),
            metadata: Default::default(),
        };
        store.insert_vm(&vm).await.unwrap();
    }
    store
        .execute_for_test("UPDATE vms SET memory_mib = -5 WHERE id = $1", "id-bad")
        .await;
    let (_tx, rx) = watch::channel(ImageState::Building("test".into()));
    let service = VmService::new(
        Arc::new(config),
        store.clone(),
        Arc::new(NoBootVmm::default()),
        rx,
    );
    service.recover().await.unwrap();
    // The good VM's VMM is gone: it is stopped.
    assert_eq!(store.get_vm("good").await.unwrap().state, VmState::Stopped);
    let list = store.list_vms().await.unwrap();
    assert_eq!(list.unreadable.len(), 1);
    assert_eq!(list.unreadable[0].id, "id-bad");
    assert_eq!(list.unreadable[0].state, Some(VmState::Error));
    let events = store.events("id-bad").await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.kind, "unreadable");
    assert_eq!(
        last.message.as_deref(),
        Some(
            "the stored VM \"id-bad\" cannot be read: column memory_mib holds -5, out of range for u64"
        )
    );
    // A second start does not mark it again.
    service.recover().await.unwrap();
    assert_eq!(store.events("id-bad").await.unwrap().len(), events.len());
}

/// The guard in front of the real router: foreign Hosts and Origins are refused before any
/// handler runs, the CLI's requests and hearthd's own pages pass.
mod guard_tests {
    use super::*;

    async fn call_with(ctx: &Ctx, req: axum::http::request::Builder) -> (StatusCode, Value) {
        let resp = ctx
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn ws(uri: &str) -> axum::http::request::Builder {
        Request::get(uri)
            .header("host", "127.0.0.1:7070")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    #[tokio::test]
    async fn cross_origin_posts_foreign_hosts_and_foreign_websockets_get_403() {
        let ctx = Ctx::new().await;
        let (s, _) = ctx
            .call(
                "POST",
                "/v1/vms",
                Some(json!({"name": "target", "start": false})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);

        let cases = [
            (
                Request::post("/v1/vms/target/start")
                    .header("host", "127.0.0.1:7070")
                    .header("origin", "https://evil.example"),
                "forbidden_origin",
                "server.allowed_origins",
            ),
            (
                Request::post("/v1/vms/target/start").header("host", "evil.example:7070"),
                "forbidden_host",
                "\"evil.example:7070\"",
            ),
            (
                Request::get("/v1/vms").header("host", "evil.example"),
                "forbidden_host",
                "server.allowed_hosts",
            ),
            (
                ws("/v1/vms/target/exec/ws").header("origin", "https://evil.example"),
                "forbidden_origin",
                "\"https://evil.example\"",
            ),
            (
                ws("/v1/vms/target/exec/ws").header("origin", "null"),
                "forbidden_origin",
                "\"null\"",
            ),
        ];
        for (req, code, words) in cases {
            let (s, body) = call_with(&ctx, req).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
            assert_eq!(body["error"], code, "{body}");
            let message = body["message"].as_str().unwrap();
            assert!(message.contains(words), "{message}");
        }
        // None of them reached the VM.
        let (_, vm) = ctx.call("GET", "/v1/vms/target", None).await;
        let kinds: Vec<_> = vm["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect();
        assert!(!kinds.iter().any(|k| k == "start_requested"), "{kinds:?}");

        // The CLI (no Origin, Host = the listen address), hearthd's own pages and loopback
        // names pass; a same-origin WebSocket reaches its handler (which wants a real upgrade).
        let (s, _) = call_with(
            &ctx,
            Request::get("/v1/vms").header("host", "127.0.0.1:7070"),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = call_with(
            &ctx,
            Request::get("/v1/health")
                .header("host", "localhost:7070")
                .header("origin", "http://localhost:7070"),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (s, body) = call_with(
            &ctx,
            Request::post("/v1/vms/target/stop")
                .header("host", "127.0.0.1:7070")
                .header("origin", "http://127.0.0.1:7070"),
        )
        .await;
        assert_eq!(
            (s, body["error"].as_str()),
            (StatusCode::CONFLICT, Some("invalid_state"))
        );
        let (s, body) = call_with(
            &ctx,
            ws("/v1/vms/target/exec/ws").header("origin", "http://127.0.0.1:7070"),
        )
        .await;
        assert_ne!(s, StatusCode::FORBIDDEN, "{body}");
    }

    #[tokio::test]
    async fn oversized_json_bodies_get_413() {
        let ctx = Ctx::new().await;
        let stdin = "x".repeat(2 << 20);
        let (s, body) = ctx
            .call(
                "POST",
                "/v1/vms/ghost/exec",
                Some(json!({"command": ["cat"], "stdin": stdin})),
            )
            .await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert_eq!(body["error"], "request_too_large");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("server.max_json_body_bytes")
        );
    }
}

/// Requests as a key's holder (`None`: no Authorization header).
async fn call_as(
    ctx: &Ctx,
    key: Option<&str>,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value, axum::http::HeaderMap) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let resp = ctx
        .app
        .clone()
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        headers,
    )
}

#[tokio::test]
async fn users_see_only_their_organizations_things_and_every_attempt_is_audited() {
    use crate::store::VmRecord;
    let ctx = Ctx::with(|c| c.auth.localhost_admin = false).await;
    let access =
        crate::access::Access::new(ctx.store.clone(), testing::config(ctx.dir.path()).auth);
    assert_eq!(access.bootstrap().await.unwrap().as_deref(), Some("admin"));
    assert_eq!(
        access.bootstrap().await.unwrap(),
        None,
        "only the first start makes one"
    );
    let (id, admin) = crate::access::new_api_key();
    ctx.store
        .insert_api_key(&crate::store::access::ApiKeyRecord {
            id,
            user: "admin".into(),
            org: "default".into(),
            name: "test".into(),
            hash: crate::access::key_hash(&admin),
            created_at: crate::store::now(),
        })
        .await
        .unwrap();
    let admin = Some(admin.as_str());

    // Without a key (and localhost_admin off) nothing but the docs answers.
    let (s, body, headers) = call_as(&ctx, None, "GET", "/v1/vms", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "unauthenticated");
    assert_eq!(headers["www-authenticate"], "Bearer realm=\"hearth\"");
    let (s, _, _) = call_as(&ctx, None, "GET", "/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    let forged = format!("hk_{}_{}", "0".repeat(16), "0".repeat(64));
    let (s, body, _) = call_as(&ctx, Some(&forged), "GET", "/v1/vms", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");

    // alice (own org), bob (own org), carol (alice's org, member).
    for user in [
        json!({"name": "alice"}),
        json!({"name": "bob"}),
        json!({"name": "carol", "org": "alice"}),
    ] {
        let (s, body, _) = call_as(&ctx, admin, "POST", "/v1/users", Some(user)).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
    }
    let (s, body, _) = call_as(
        &ctx,
        admin,
        "POST",
        "/v1/users",
        Some(json!({"name": "Bad Name"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("1-32 characters"),
        "{body}"
    );
    let mut keys = std::collections::HashMap::new();
    for user in ["alice", "bob", "carol"] {
        let (s, body, _) = call_as(
            &ctx,
            admin,
            "POST",
            "/v1/api-keys",
            Some(json!({"user": user})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        keys.insert(user, body["key"].as_str().unwrap().to_owned());
    }
    let key = |u: &str| Some(keys[u].clone());

    let (_, who, _) = call_as(&ctx, key("carol").as_deref(), "GET", "/v1/whoami", None).await;
    assert_eq!(who["user"], "carol");
    assert_eq!(who["org"], "alice");
    assert_eq!(who["role"], "member");
    assert_eq!(who["admin"], false);

    // A VM of alice's organization.
    let now = crate::store::now();
    ctx.store
        .insert_vm(&VmRecord {
            id: "id-web".into(),
            name: "web".into(),
            state: hearth_api::VmState::Stopped,
            cpus: 1,
            memory_mib: 512,
            rootfs_mib: 1024,
            image: "img".into(),
            vmm: "fake".into(),
            pid: None,
            created_at: now.clone(),
            created_by: "alice".into(),
            org: "alice".into(),
            updated_at: now,
            last_error: None,
            net_index: None,
            egress: Default::default(),
            metadata: Default::default(),
        })
        .await
        .unwrap();
    let (s, missing, _) = call_as(&ctx, key("bob").as_deref(), "GET", "/v1/vms/ghost", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, hidden, _) = call_as(&ctx, key("bob").as_deref(), "GET", "/v1/vms/web", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{hidden}");
    assert_eq!(
        hidden["message"].as_str().unwrap().replace("web", "ghost"),
        missing["message"].as_str().unwrap(),
        "someone else's VM is answered as a missing one"
    );
    let (s, _, _) = call_as(
        &ctx,
        key("bob").as_deref(),
        "POST",
        "/v1/vms/web/start",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, list, _) = call_as(&ctx, key("bob").as_deref(), "GET", "/v1/vms", None).await;
    assert_eq!(list, json!([]));
    for who in ["alice", "carol"] {
        let (s, vm, _) = call_as(&ctx, key(who).as_deref(), "GET", "/v1/vms/web", None).await;
        assert_eq!(s, StatusCode::OK, "{who}: {vm}");
        assert_eq!(vm["org"], "alice");
        let (_, list, _) = call_as(&ctx, key(who).as_deref(), "GET", "/v1/vms", None).await;
        assert_eq!(list.as_array().unwrap().len(), 1, "{who}");
    }
    let (s, _, _) = call_as(&ctx, admin, "GET", "/v1/vms/web", None).await;
    assert_eq!(s, StatusCode::OK);

    // Volumes belong to the organization too.
    let (s, v, _) = call_as(
        &ctx,
        key("alice").as_deref(),
        "POST",
        "/v1/volumes",
        Some(json!({"name": "data", "size": "64M"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["org"], "alice");
    let (_, list, _) = call_as(&ctx, key("bob").as_deref(), "GET", "/v1/volumes", None).await;
    assert_eq!(list, json!([]));
    let (s, _, _) = call_as(
        &ctx,
        key("bob").as_deref(),
        "DELETE",
        "/v1/volumes/data",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Admin-only things.
    for uri in ["/v1/health", "/v1/users", "/v1/audit", "/metrics"] {
        let (s, body, _) = call_as(&ctx, key("alice").as_deref(), "GET", uri, None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{uri}: {body}");
        assert_eq!(body["error"], "permission_denied", "{uri}");
    }
    // Owners manage members; members do not.
    let (s, body, _) = call_as(
        &ctx,
        key("carol").as_deref(),
        "POST",
        "/v1/orgs/alice/members",
        Some(json!({"user": "bob"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let (s, body, _) = call_as(
        &ctx,
        key("bob").as_deref(),
        "POST",
        "/v1/orgs/alice/members",
        Some(json!({"user": "bob"})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");

    // A revoked key is refused at once.
    let (_, mine, _) = call_as(&ctx, key("alice").as_deref(), "GET", "/v1/api-keys", None).await;
    let id = mine[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(mine.as_array().unwrap().len(), 1, "{mine}");
    let (s, _, _) = call_as(
        &ctx,
        key("bob").as_deref(),
        "DELETE",
        &format!("/v1/api-keys/{id}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "bob cannot revoke alice's key");
    let (s, _, _) = call_as(
        &ctx,
        key("alice").as_deref(),
        "DELETE",
        &format!("/v1/api-keys/{id}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, _) = call_as(&ctx, key("alice").as_deref(), "GET", "/v1/vms", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // The audit log has each attempt: the refused logins, bob's denied look, carol's allowed one.
    let (s, rows, _) = call_as(&ctx, admin, "GET", "/v1/audit?limit=1000", None).await;
    assert_eq!(s, StatusCode::OK, "{rows}");
    let rows = rows.as_array().unwrap();
    let has =
        |principal: &str, action: &str, target: Option<&str>, decision: &str, result: &str| {
            rows.iter().any(|r| {
                r["principal"] == principal
                    && r["action"] == action
                    && target.is_none_or(|t| r["target"] == t)
                    && r["decision"] == decision
                    && r["result"] == result
            })
        };
    assert!(
        has(
            "anonymous",
            "login",
            Some("GET /v1/vms"),
            "deny",
            "unauthenticated"
        ),
        "{rows:#?}"
    );
    assert!(
        has("bob", "get_vm", Some("web"), "deny", "vm_not_found"),
        "{rows:#?}"
    );
    assert!(
        has("carol", "get_vm", Some("web"), "allow", "ok"),
        "{rows:#?}"
    );
    assert!(
        has("alice", "health", None, "deny", "permission_denied"),
        "{rows:#?}"
    );
    assert!(
        has("alice", "revoke_api_key", Some(id.as_str()), "allow", "ok"),
        "{rows:#?}"
    );
    let (_, denied, _) = call_as(
        &ctx,
        admin,
        "GET",
        "/v1/audit?decision=deny&principal=bob",
        None,
    )
    .await;
    assert!(
        denied
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["principal"] == "bob" && r["decision"] == "deny")
    );
    let (s, _, _) = call_as(&ctx, admin, "GET", "/v1/audit?since=yesterday", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

/// Whether the file at `path` holds `needle`, read in chunks and only where it has data (disk
/// images are large and sparse; a needle without NUL bytes cannot lie in a hole).
fn file_holds(path: &std::path::Path, needle: &[u8]) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    assert!(!needle.contains(&0));
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let len = file.metadata().unwrap().len();
    let seek = |fd: i32, at: u64, whence: libc::c_int| -> Option<u64> {
        let at = libc::off_t::try_from(at).ok()?;
        // SAFETY: lseek on an open descriptor of ours; it reads no memory.
        let found = unsafe { libc::lseek(fd, at, whence) };
        u64::try_from(found).ok()
    };
    let mut chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        // ENXIO: no data after `at`.
        let Some(start) = seek(file.as_raw_fd(), at, libc::SEEK_DATA) else {
            return false;
        };
        let end = seek(file.as_raw_fd(), start, libc::SEEK_HOLE).unwrap_or(len);
        file.seek(SeekFrom::Start(start)).unwrap();
        let mut window: Vec<u8> = Vec::new();
        let mut left = end - start;
        while left > 0 {
            let want = usize::try_from(left.min(chunk.len() as u64)).unwrap();
            let n = file.read(&mut chunk[..want]).unwrap();
            if n == 0 {
                break;
            }
            left -= n as u64;
            window.extend_from_slice(&chunk[..n]);
            if window.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            let keep = window.len().min(needle.len() - 1);
            window.drain(..window.len() - keep);
        }
        at = end;
    }
    false
}

/// Every regular file under `dir`.
fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out
}

#[tokio::test]
async fn secrets_stay_in_their_organization_and_their_values_appear_nowhere() {
    const VALUE: &str = "sk-live-7f3a9c2e-never-in-plaintext";
    const BOB_VALUE: &str = "bob-4d1e88b0-also-never-in-plaintext";
    let ctx = Ctx::with(|c| c.auth.localhost_admin = false).await;
    let access =
        crate::access::Access::new(ctx.store.clone(), testing::config(ctx.dir.path()).auth);
    access.bootstrap().await.unwrap();
    let (admin, _) = access.mint_key("admin", "test").await.unwrap();
    // alice owns her organization, carol is a member of it, bob has his own.
    let mut keys = std::collections::HashMap::new();
    keys.insert("admin", admin.clone());
    for user in [
        json!({"name": "alice"}),
        json!({"name": "bob"}),
        json!({"name": "carol", "org": "alice"}),
    ] {
        let (s, body, _) = call_as(&ctx, Some(&admin), "POST", "/v1/users", Some(user)).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
    }
    for user in ["alice", "bob", "carol"] {
        let (key, _) = access.mint_key(user, "test").await.unwrap();
        keys.insert(user, key);
    }
    // Every answer, to look for the values in.
    let seen = std::sync::Mutex::new(String::new());
    let call = async |who: &str, method: &str, uri: &str, body: Option<Value>| {
        let (s, answer, _) = call_as(&ctx, Some(&keys[who]), method, uri, body).await;
        seen.lock().unwrap().push_str(&answer.to_string());
        (s, answer)
    };

    let (s, made) = call(
        "alice",
        "PUT",
        "/v1/secrets/OPENAI_KEY",
        Some(json!({"value": VALUE})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    assert_eq!(made["name"], "OPENAI_KEY");
    assert_eq!(made["org"], "alice");
    assert_eq!(made["created_by"], "alice");
    let (s, again) = call(
        "alice",
        "PUT",
        "/v1/secrets/OPENAI_KEY",
        Some(json!({"value": VALUE})),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::OK,
        "a second set replaces the value: {again}"
    );
    assert_eq!(again["created_at"], made["created_at"]);

    // Bad names and values are refused naming the rule, never quoting the value.
    for (uri, body, code, says) in [
        (
            "/v1/secrets/lower_case",
            json!({"value": VALUE}),
            "invalid_name",
            "uppercase letters, digits and '_', starting with a letter",
        ),
        (
            "/v1/secrets/EMPTY",
            json!({"value": ""}),
            "invalid_request",
            "is empty",
        ),
        (
            "/v1/secrets/HUGE",
            json!({"value": "x".repeat(65537)}),
            "invalid_request",
            "is 65537 bytes: at most 65536 (64 KiB)",
        ),
        (
            "/v1/secrets/EXTRA",
            json!({"value": VALUE, "note": 1}),
            "invalid_request",
            "a JSON object holding one string and nothing else",
        ),
        (
            "/v1/secrets/NUMBER",
            json!({"value": 987_654_321}),
            "invalid_request",
            "a JSON object holding one string and nothing else",
        ),
    ] {
        let (s, e) = call("alice", "PUT", uri, Some(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {e}");
        assert_eq!(e["error"], code, "{uri}");
        assert!(message(&e).contains(says), "{uri}: {e}");
        assert!(
            !message(&e).contains("987654321"),
            "the message quotes the value: {e}"
        );
    }

    // A member lists the name, never the value; only owners change secrets.
    let (s, list) = call("carol", "GET", "/v1/secrets", None).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["name"], "OPENAI_KEY");
    assert_eq!(
        list[0].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["created_at", "created_by", "name", "org", "updated_at"]
    );
    for (method, body) in [("PUT", Some(json!({"value": "carols"}))), ("DELETE", None)] {
        let (s, e) = call("carol", method, "/v1/secrets/OPENAI_KEY", body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{method}: {e}");
        assert_eq!(e["error"], "permission_denied");
        assert!(message(&e).contains("needs one of its owners"), "{e}");
    }
    // Another organization sees nothing of it, and its delete finds nothing.
    let (_, list) = call("bob", "GET", "/v1/secrets", None).await;
    assert_eq!(list, json!([]));
    let (s, e) = call("bob", "DELETE", "/v1/secrets/OPENAI_KEY", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    assert_eq!(e["error"], "secret_not_found");
    let (s, _) = call(
        "bob",
        "PUT",
        "/v1/secrets/OPENAI_KEY",
        Some(json!({"value": BOB_VALUE})),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "the same name in another organization"
    );

    // Rotation: host admins only; the values stay readable, the old key opens nothing.
    let (s, e) = call("alice", "POST", "/v1/secrets/rotate-master-key", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    let key_file = ctx.service.secrets().key_path().to_owned();
    let old_key: [u8; crate::secrets::KEY_LEN] =
        std::fs::read(&key_file).unwrap().try_into().unwrap();
    let (s, rotated) = call("admin", "POST", "/v1/secrets/rotate-master-key", None).await;
    assert_eq!(s, StatusCode::OK, "{rotated}");
    assert_eq!(rotated["secrets"], 2);
    let secrets = ctx.service.secrets();
    for (org, value) in [("alice", VALUE), ("bob", BOB_VALUE)] {
        let got = secrets.resolve(org, "OPENAI_KEY").await.unwrap().unwrap();
        assert_eq!(got.expose(), value, "{org}");
        let row = ctx
            .store
            .get_secret(org, "OPENAI_KEY")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.sealed.key_id, rotated["key_id"].as_str().unwrap());
        let old = crate::secrets::MasterKey::from_bytes(old_key);
        assert!(
            old.open(org, "OPENAI_KEY", &row.sealed).is_err(),
            "the old key file's bytes still decrypt {org}'s row"
        );
    }
    assert_ne!(std::fs::read(&key_file).unwrap(), old_key);

    // Every attempt is audited, naming the secret, never its value.
    let (_, rows) = call("admin", "GET", "/v1/audit?limit=1000", None).await;
    let rows = rows.as_array().unwrap();
    let has = |principal: &str, action: &str, decision: &str, result: &str| {
        rows.iter().any(|r| {
            r["principal"] == principal
                && r["action"] == action
                && r["decision"] == decision
                && r["result"] == result
        })
    };
    assert!(has("alice", "set_secret", "allow", "ok"), "{rows:#?}");
    assert!(
        has("carol", "set_secret", "deny", "permission_denied"),
        "{rows:#?}"
    );
    assert!(has("carol", "list_secrets", "allow", "ok"), "{rows:#?}");
    assert!(
        has("bob", "delete_secret", "allow", "secret_not_found"),
        "{rows:#?}"
    );
    assert!(
        has("admin", "rotate_master_key", "allow", "ok"),
        "{rows:#?}"
    );
    assert!(
        rows.iter()
            .any(|r| r["action"] == "set_secret" && r["target"] == "OPENAI_KEY")
    );

    let (s, _) = call("alice", "DELETE", "/v1/secrets/OPENAI_KEY", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, list) = call("alice", "GET", "/v1/secrets", None).await;
    assert_eq!(list, json!([]));

    let seen = seen.into_inner().unwrap();
    for value in [VALUE, BOB_VALUE] {
        assert!(!seen.contains(value), "an API answer holds a value");
        for file in files_under(ctx.dir.path()) {
            assert!(
                !file_holds(&file, value.as_bytes()),
                "{} holds a secret's value in plaintext",
                file.display()
            );
        }
    }
    // The search itself finds plaintext where it is: a value written into the database (as a
    // careless audit row would) is found in its files.
    ctx.store
        .insert_audit(&crate::store::access::AuditRecord {
            at: crate::store::now(),
            principal: "probe".into(),
            org: None,
            source: "internal".into(),
            action: "probe".into(),
            target: Some(VALUE.into()),
            allowed: true,
            result: "ok".into(),
            duration_ms: 0,
            request_id: "probe".into(),
        })
        .await
        .unwrap();
    assert!(
        files_under(ctx.dir.path())
            .iter()
            .any(|f| file_holds(f, VALUE.as_bytes())),
        "the search does not see into the database"
    );
}
