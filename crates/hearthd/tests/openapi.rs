//! The committed OpenAPI document is a valid one, states what every operation shares (the guard's
//! refusals, internal errors, the body limit), and the contract checker the real-VM tests use
//! finds what it must. Needs python3 with openapi-spec-validator and openapi-schema-validator
//! (scripts/install-deps.sh); no VM, no root.

mod common;

use std::process::Command;

use common::contract::{check_exchanges, exchange, openapi_document};
use serde_json::{Value, json};

#[test]
fn the_committed_document_passes_an_openapi_validator() {
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(openapi_document())
        .output()
        .expect("run python3 (scripts/install-deps.sh installs openapi-spec-validator)");
    assert!(
        out.status.success(),
        "openapi-spec-validator rejects openapi.json ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn document() -> Value {
    serde_json::from_str(&std::fs::read_to_string(openapi_document()).unwrap()).unwrap()
}

#[test]
fn every_operation_documents_what_every_request_can_meet() {
    let doc = document();
    let mut missing = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            // The guard refuses any request on its Host or Origin; anything can fail inside.
            let mut need = vec!["401", "403", "429", "500", "503"];
            if op["requestBody"]["content"]
                .get("application/json")
                .is_some()
            {
                need.push("413");
                need.push("400");
            }
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            if params.iter().any(|p| p["in"] == "query") {
                need.push("400");
            }
            if path.contains("{name}") {
                need.push("404");
            }
            for status in need {
                if !responses.contains_key(status) {
                    missing.push(format!("{method} {path}: {status}"));
                }
            }
            for (status, r) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    let schema = &r["content"]["application/json"]["schema"]["$ref"];
                    if schema != "#/components/schemas/ErrorBody" {
                        missing.push(format!("{method} {path}: {status} has no ErrorBody"));
                    }
                }
            }
        }
    }
    assert!(missing.is_empty(), "undocumented responses: {missing:#?}");
}

#[test]
fn query_parameters_are_in_the_query_and_required_ones_say_so() {
    let doc = document();
    let params = |path: &str, method: &str| -> Vec<(String, String, bool)> {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["in"].as_str().unwrap().to_owned(),
                    p["required"].as_bool().unwrap_or(false),
                )
            })
            .collect()
    };
    let files = params("/v1/vms/{name}/files", "get");
    assert!(
        files.contains(&("path".into(), "query".into(), true)),
        "{files:?}"
    );
    assert!(
        files.contains(&("mode".into(), "query".into(), false)),
        "{files:?}"
    );
    let logs = params("/v1/vms/{name}/logs", "get");
    for name in ["source", "follow", "tail"] {
        assert!(
            logs.contains(&(name.into(), "query".into(), false)),
            "{logs:?}"
        );
    }
    let stop = params("/v1/vms/{name}/stop", "post");
    assert!(
        stop.contains(&("timeout_secs".into(), "query".into(), false)),
        "{stop:?}"
    );
}

fn error(code: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"error": code, "message": "m"})).unwrap()
}

const JSON: Option<&str> = Some("application/json");

#[test]
fn the_contract_checker_accepts_what_conforms() {
    let create = serde_json::to_vec(&json!({"name": "web-1", "cpus": 2, "ram": "512M"})).unwrap();
    let stream = b"{\"type\":\"stdout\",\"data\":\"a\\n\"}\n{\"type\":\"exit\",\"exit_code\":0,\"signal\":null,\"timed_out\":false}\n";
    let ok = [
        exchange("list", "GET", "/v1/vms", None, true, 200, JSON, b"[]"),
        exchange(
            "inspect",
            "GET",
            "/v1/vms/ghost",
            None,
            true,
            404,
            JSON,
            &error("vm_not_found"),
        ),
        exchange(
            "create",
            "POST",
            "/v1/vms",
            Some(("application/json", &create)),
            true,
            409,
            JSON,
            &error("insufficient_capacity"),
        ),
        exchange(
            "download",
            "GET",
            "/v1/vms/a/files?path=/etc/hostname",
            None,
            true,
            200,
            Some("application/octet-stream"),
            b"a\n",
        ),
        exchange(
            "logs",
            "GET",
            "/v1/vms/a/logs?tail=3&follow=false&source=vmm",
            None,
            true,
            200,
            Some("text/plain; charset=utf-8"),
            b"x\n",
        ),
        exchange(
            "stream",
            "POST",
            "/v1/vms/a/exec/stream",
            Some(("application/json", br#"{"command":["true"]}"#)),
            true,
            200,
            Some("application/x-ndjson"),
            stream,
        ),
        exchange("delete", "DELETE", "/v1/vms/a", None, true, 204, None, b""),
    ];
    check_exchanges(&ok).unwrap();
}

fn refused(ex: Value, finding: &str) {
    let problems = check_exchanges(&[ex]).expect_err("the checker passed a broken exchange");
    assert!(problems.contains(finding), "{problems}");
}

#[test]
fn the_contract_checker_refuses_what_breaks_the_document() {
    refused(
        exchange("teapot", "GET", "/v1/vms", None, true, 418, JSON, b"{}"),
        "status 418 is not documented",
    );
    refused(
        exchange(
            "no path",
            "GET",
            "/v1/vms/a/files",
            None,
            true,
            400,
            JSON,
            &error("invalid_request"),
        ),
        "required query parameter 'path' is missing",
    );
    refused(
        exchange(
            "unknown param",
            "GET",
            "/v1/vms/a/logs?lines=3",
            None,
            true,
            400,
            JSON,
            &error("invalid_request"),
        ),
        "query parameter 'lines' is not documented",
    );
    refused(
        exchange(
            "unknown source",
            "GET",
            "/v1/vms/a/logs?source=journal",
            None,
            true,
            400,
            JSON,
            &error("invalid_request"),
        ),
        "'journal' is not one of ['serial', 'vmm', 'qemu', 'firecracker']",
    );
    refused(
        exchange(
            "bad code",
            "GET",
            "/v1/vms/a",
            None,
            true,
            404,
            JSON,
            &error("no_such_code"),
        ),
        "'no_such_code' is not one of",
    );
    refused(
        exchange(
            "bad name",
            "POST",
            "/v1/vms",
            Some(("application/json", br#"{"name":"Web"}"#)),
            true,
            400,
            JSON,
            &error("invalid_name"),
        ),
        "does not match",
    );
    refused(
        exchange(
            "wrong media",
            "GET",
            "/v1/vms",
            None,
            true,
            200,
            Some("text/plain"),
            b"[]",
        ),
        "media type 'text/plain'",
    );
    refused(
        exchange(
            "no such op",
            "PATCH",
            "/v1/vms/a",
            None,
            true,
            200,
            JSON,
            b"{}",
        ),
        "no such operation",
    );
    // A request broken on purpose is not held against the client; its answer still is checked.
    check_exchanges(&[exchange(
        "bad name on purpose",
        "POST",
        "/v1/vms",
        Some(("application/json", br#"{"name":"Web"}"#)),
        false,
        400,
        JSON,
        &error("invalid_name"),
    )])
    .unwrap();
}
