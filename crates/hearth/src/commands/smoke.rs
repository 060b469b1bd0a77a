//! `hearth smoke`: the end-to-end check of a live host (srv's smoke test, as a validation gate
//! after an install, a restore or an upgrade). It makes a VM, waits until it is ready, runs a
//! command in it, copies a file in and out, reaches the metadata service through the VM's
//! network, stops and starts it, and deletes it. A failure writes what explains it (the VM's
//! detail and logs, the host's health, the steps, hearthd's journal where there is one) to a
//! directory it names.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hearth_api::{CreateVmRequest, ExecRequest};
use serde_json::{Value, json};

use crate::cli::SmokeArgs;
use crate::client::{Client, Lifecycle};
use crate::error::{CliError, Result};
use crate::printer::Printer;
use crate::render::terminal_safe;

/// One step's outcome.
struct Step {
    name: &'static str,
    ms: u128,
    detail: String,
}

/// What the smoke test checks in the guest's copy of a file.
const PROBE_PATH: &str = "/root/hearth-smoke.txt";

pub async fn run(client: &Client, printer: &Printer, args: SmokeArgs) -> Result<u8> {
    let name = args.name.clone().unwrap_or_else(default_name);
    let mut steps: Vec<Step> = Vec::new();
    let result = steps_of(client, &name, &args, &mut steps, printer).await;
    let Some(error) = result.err() else {
        printer.result(
            &crate::client::Json::local(json!({
                "vm": name,
                "passed": true,
                "steps": steps_json(&steps),
            })),
            |_| format!("smoke test passed ({} steps)\n", steps.len()),
        );
        return Ok(0);
    };
    let dir = args
        .artifacts
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("hearth-smoke-{name}-{}", unix_now())));
    let written = write_artifacts(client, &name, &dir, &steps, &error).await;
    let kept = args.keep_failed;
    if !kept {
        // A VM a failed smoke test made is removed, unless asked to keep it for a look.
        let _ = client.delete_vm(&name).await;
    }
    printer.note(&format!(
        "smoke test failed; {}{}",
        match &written {
            Ok(()) => format!("artifacts in {}", dir.display()),
            Err(e) => format!("cannot write artifacts to {}: {e}", dir.display()),
        },
        if kept {
            format!("; vm {} is kept (--keep-failed)", terminal_safe(&name))
        } else {
            String::new()
        }
    ));
    Err(error)
}

fn default_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("smoke-{:06x}", (nanos ^ std::process::id()) & 0xff_ffff)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn steps_json(steps: &[Step]) -> Value {
    Value::Array(
        steps
            .iter()
            .map(|s| json!({"step": s.name, "ms": s.ms, "detail": s.detail}))
            .collect(),
    )
}

/// Runs `work` as step `name`, recording and showing it.
async fn step<T>(
    steps: &mut Vec<Step>,
    printer: &Printer,
    name: &'static str,
    work: impl std::future::Future<Output = Result<(T, String)>>,
) -> Result<T> {
    let started = Instant::now();
    let (value, detail) = work.await?;
    let ms = started.elapsed().as_millis();
    let shown = if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    };
    printer.note(&format!("ok  {name} ({ms} ms){shown}"));
    steps.push(Step { name, ms, detail });
    Ok(value)
}

fn failed(step: &str, why: String) -> CliError {
    CliError::Local {
        kind: "smoke_failed",
        message: format!("smoke test step {step:?} failed: {why}"),
        hint: None,
    }
}

async fn exec(client: &Client, vm: &str, command: &[&str]) -> Result<(i32, String)> {
    let request = ExecRequest {
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        timeout_secs: Some(30),
        ..ExecRequest::default()
    };
    let out = client.exec(vm, &request).await?.data;
    Ok((out.exit_code.unwrap_or(-1), out.stdout))
}

async fn steps_of(
    client: &Client,
    name: &str,
    args: &SmokeArgs,
    steps: &mut Vec<Step>,
    printer: &Printer,
) -> Result<()> {
    step(steps, printer, "host health", async {
        let health = client.health().await?.data;
        match health.image {
            Some(image) => Ok(((), format!("image {image}"))),
            None => Err(failed(
                "host health",
                format!("no guest image ({})", health.image_status),
            )),
        }
    })
    .await?;
    let ready = Duration::from_secs(args.ready_timeout);
    // Made stopped, then started: a boot that fails keeps the VM, its last error and its logs
    // for the artifacts.
    let detail = step(steps, printer, "create", async {
        let request = CreateVmRequest {
            name: name.to_owned(),
            start: Some(false),
            ..CreateVmRequest::default()
        };
        let detail = client.create_vm(&request).await?.data;
        Ok((detail, format!("vm {}", terminal_safe(name))))
    })
    .await?;
    step(steps, printer, "boot", async {
        match tokio::time::timeout(ready, client.lifecycle(name, Lifecycle::Start)).await {
            Ok(vm) => {
                vm?;
                Ok(((), String::new()))
            }
            Err(_) => Err(failed(
                "boot",
                format!("the VM was not ready within {} s", args.ready_timeout),
            )),
        }
    })
    .await?;
    step(steps, printer, "exec", async {
        let (code, out) = exec(client, name, &["uname", "-r"]).await?;
        if code != 0 {
            return Err(failed("exec", format!("uname -r exited {code}")));
        }
        Ok(((), format!("kernel {}", out.trim())))
    })
    .await?;
    step(steps, printer, "file round trip", async {
        let content = format!("hearth smoke {name} {}\n", unix_now());
        let body = reqwest::Body::from(content.clone());
        client.put_file(name, PROBE_PATH, Some(0o600), body).await?;
        let (_, resp) = client.get_file(name, PROBE_PATH).await?;
        let mut back = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            back.extend_from_slice(&chunk.map_err(|e| client.transport_error(&e))?);
        }
        if back != content.as_bytes() {
            return Err(failed(
                "file round trip",
                format!(
                    "{PROBE_PATH} came back as {} bytes, not the {} written",
                    back.len(),
                    content.len()
                ),
            ));
        }
        Ok(((), format!("{} bytes", back.len())))
    })
    .await?;
    if detail.network.is_some() {
        step(steps, printer, "network (metadata service)", async {
            let script = r#"exec 3<>/dev/tcp/169.254.169.254/80 || exit 7
                printf 'GET /v1/instance/name HTTP/1.0\r\nHost: 169.254.169.254\r\n\r\n' >&3
                cat <&3"#;
            let (code, out) = exec(client, name, &["timeout", "10", "bash", "-c", script]).await?;
            let body = out.split_once("\r\n\r\n").map(|(_, b)| b.trim());
            if code != 0 || body != Some(name) {
                return Err(failed(
                    "network (metadata service)",
                    format!("GET http://169.254.169.254/v1/instance/name from the guest: exit {code}, body {body:?}"),
                ));
            }
            Ok(((), "the guest reaches 169.254.169.254".to_owned()))
        })
        .await?;
    } else {
        printer.note("skip network (metadata service): networking is off on this host");
        steps.push(Step {
            name: "network (metadata service)",
            ms: 0,
            detail: "skipped: networking is off on this host".into(),
        });
    }
    step(steps, printer, "stop", async {
        client
            .lifecycle(name, Lifecycle::Stop { timeout_secs: None })
            .await?;
        Ok(((), String::new()))
    })
    .await?;
    step(steps, printer, "start", async {
        client.lifecycle(name, Lifecycle::Start).await?;
        let (code, _) = exec(client, name, &["cat", PROBE_PATH]).await?;
        if code != 0 {
            return Err(failed(
                "start",
                format!("{PROBE_PATH} is gone after the restart"),
            ));
        }
        Ok(((), "the file survived".to_owned()))
    })
    .await?;
    step(steps, printer, "delete", async {
        client.delete_vm(name).await?;
        Ok(((), String::new()))
    })
    .await?;
    Ok(())
}

/// Writes what explains a failure into `dir`.
async fn write_artifacts(
    client: &Client,
    name: &str,
    dir: &Path,
    steps: &[Step],
    error: &CliError,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut summary = String::new();
    for s in steps {
        summary.push_str(&format!("ok    {} ({} ms) {}\n", s.name, s.ms, s.detail));
    }
    summary.push_str(&format!("FAIL  {}\n", error.message()));
    std::fs::write(dir.join("steps.txt"), summary)?;
    let health = match client.health().await {
        Ok(h) => serde_json::to_string_pretty(&h.raw).unwrap_or_default(),
        Err(e) => format!("cannot read: {}", e.message()),
    };
    std::fs::write(dir.join("health.json"), health)?;
    let inspect = match client.get_vm(name).await {
        Ok(d) => serde_json::to_string_pretty(&d.raw).unwrap_or_default(),
        Err(e) => format!("cannot read: {}", e.message()),
    };
    std::fs::write(dir.join("inspect.json"), inspect)?;
    for source in ["serial", "vmm"] {
        let text = match client.logs(name, source, false, Some(2000)).await {
            Ok(resp) => resp
                .text()
                .await
                .unwrap_or_else(|e| format!("cannot read: {e}")),
            Err(e) => format!("cannot read: {}", e.message()),
        };
        std::fs::write(dir.join(format!("{source}.log")), text)?;
    }
    // hearthd's own log, where systemd keeps it; elsewhere it is wherever hearthd's stderr goes.
    let journal = std::process::Command::new("journalctl")
        .args(["--unit", "hearthd", "--lines", "500", "--no-pager"])
        .output();
    let text = match journal {
        Ok(out) if out.status.success() && !out.stdout.is_empty() => {
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
        _ => "no journal of hearthd here (it is not a systemd service on this host): see where its stderr goes".into(),
    };
    std::fs::write(dir.join("hearthd.log"), text)
}
