//! Users, organizations and the SSH command surface against a real hearthd and a real VM, with
//! the real OpenSSH client and keys `ssh-keygen` makes here: who sees and drives what, exit
//! codes over SSH, a PTY into the VM, export piped into import, refused logins, REST from a
//! non-local address, and the audit rows of it all. One VM serves every assertion.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{SERIAL, World, json_of};
use serde_json::Value;

const SSH_PORT: &str = "2222";
/// An address of the test's namespace that is not loopback: REST from it needs a key.
const OUTSIDE: &str = "10.77.0.1";

struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn make(dir: &Path, names: &[&str]) -> Keys {
        for name in names {
            let made = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(dir.join(name))
                .status()
                .unwrap();
            assert!(made.success());
        }
        Keys {
            dir: dir.to_owned(),
        }
    }

    fn public(&self, name: &str) -> String {
        self.dir.join(format!("{name}.pub")).display().to_string()
    }

    /// `ssh -p 2222 -i <key> [opts] user@127.0.0.1 <command>` with `stdin`.
    fn ssh(&self, key: &str, opts: &[&str], user: &str, command: &str, stdin: &[u8]) -> Output {
        let mut cmd = Command::new("ssh");
        cmd.args(["-F", "/dev/null", "-p", SSH_PORT, "-i"])
            .arg(self.dir.join(key))
            .args(["-o", "StrictHostKeyChecking=no", "-o"])
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.join("known_hosts").display()
            ))
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=ERROR",
            ])
            .args(opts)
            .arg(format!("{user}@127.0.0.1"));
        if !command.is_empty() {
            // `--`: a command that starts with `--json` is not one of ssh's options.
            cmd.args(["--", command]);
        }
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
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn expect(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: stdout {:?} stderr {:?}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// One HTTP/1.1 request from [`OUTSIDE`] to hearthd: (status, body).
fn rest(path: &str, key: Option<&str>) -> (u16, Value) {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect((OUTSIDE, 7070)).unwrap();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {OUTSIDE}:7070\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // A chunked body: the JSON is between the chunk sizes.
    let json = body
        .find(['{', '['])
        .and_then(|start| body.rfind(['}', ']']).map(|end| &body[start..=end]))
        .unwrap_or("null");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

#[test]
fn users_see_only_their_organization_over_ssh_and_rest() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let w = World::with_setup(
        &[
            ("HEARTH_SSH_LISTEN", "127.0.0.1:2222"),
            ("HEARTH_LISTEN", "0.0.0.0:7070"),
        ],
        || {
            for args in [
                // (No dummy driver on every kernel: a veth pair whose both ends stay here.)
                vec![
                    "link",
                    "add",
                    "outside",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "outside-peer",
                ],
                vec!["addr", "add", "10.77.0.1/24", "dev", "outside"],
                vec!["link", "set", "outside", "up"],
                vec!["link", "set", "outside-peer", "up"],
            ] {
                assert!(Command::new("ip").args(&args).status().unwrap().success());
            }
        },
    );
    let d = w.d();
    let keys = Keys::make(
        w.dir.path(),
        &["alice", "bob", "carol", "admin", "stranger"],
    );
    // The operator (local, no key) makes the users.
    d.hearth_ok(&[
        "user",
        "create",
        "alice",
        "--ssh-key",
        &keys.public("alice"),
    ]);
    d.hearth_ok(&["user", "create", "bob", "--ssh-key", &keys.public("bob")]);
    d.hearth_ok(&[
        "user",
        "create",
        "carol",
        "--org",
        "alice",
        "--ssh-key",
        &keys.public("carol"),
    ]);
    d.hearth_ok(&["user", "ssh-key", "add", "admin", &keys.public("admin")]);
    let ssh = |key: &str, command: &str| keys.ssh(key, &[], "hearth", command, b"");

    // alice makes a VM over SSH; --json list parses and shows it in her organization.
    let out = ssh("alice", "new web");
    expect(&out, 0, "alice: new web");
    let out = ssh("alice", "--json list");
    expect(&out, 0, "alice: --json list");
    let list = json_of(&text(&out.stdout));
    assert_eq!(list[0]["name"], "web", "{list}");
    assert_eq!(list[0]["org"], "alice");
    let who = json_of(&text(&ssh("carol", "--json whoami").stdout));
    assert_eq!(who["user"], "carol");
    assert_eq!(who["org"], "alice");
    assert_eq!(who["via"], "ssh_session");

    // bob (another organization) neither sees nor stops it, and is told what a missing VM gets.
    let out = ssh("bob", "inspect web");
    expect(&out, 3, "bob: inspect web");
    let missing = ssh("bob", "inspect ghost");
    expect(&missing, 3, "bob: inspect ghost");
    assert_eq!(
        text(&out.stderr).replace("web", "ghost"),
        text(&missing.stderr),
        "someone else's VM reads as a missing one"
    );
    expect(&ssh("bob", "stop web"), 3, "bob: stop web");
    assert_eq!(
        json_of(&text(&ssh("bob", "--json list").stdout)),
        Value::Array(vec![])
    );
    // carol (alice's organization) and the host admin do.
    expect(&ssh("carol", "inspect web"), 0, "carol: inspect web");
    expect(&ssh("admin", "inspect web"), 0, "admin: inspect web");
    expect(&ssh("admin", "status"), 0, "admin: status");
    expect(
        &ssh("carol", "status"),
        7,
        "carol: status needs a host admin",
    );

    // An owner adds bob to her organization over SSH; bob switches to it and sees the VM; a
    // member cannot add anyone.
    expect(
        &ssh("carol", "org add-member alice bob"),
        7,
        "a member adds no one",
    );
    expect(
        &ssh("alice", "org add-member alice bob"),
        0,
        "the owner adds bob",
    );
    expect(
        &ssh("bob", "inspect web"),
        3,
        "bob still acts in his own organization",
    );
    let who = json_of(&text(&ssh("bob", "--json org switch alice").stdout));
    assert_eq!(who["org"], "alice", "{who}");
    expect(
        &ssh("bob", "inspect web"),
        0,
        "bob, switched to alice's organization",
    );
    expect(&ssh("bob", "org switch bob"), 0, "bob switches back");
    expect(
        &ssh("alice", "org remove-member alice bob"),
        0,
        "the owner takes bob out",
    );

    // Exit codes follow the CLI's table; exec passes the command's own through.
    expect(&ssh("alice", "new Bad_Name"), 2, "bad input");
    expect(&ssh("alice", "start web"), 4, "wrong state");
    let out = ssh(
        "alice",
        "exec web -- sh -c 'echo out; echo err >&2; exit 7'",
    );
    expect(&out, 7, "exec exit 7");
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    let out = keys.ssh(
        "alice",
        &[],
        "hearth",
        "exec web -- cat",
        b"through stdin\n",
    );
    expect(&out, 0, "exec stdin");
    assert_eq!(text(&out.stdout), "through stdin\n");

    // Into the VM: a PTY shell, and one command.
    let out = keys.ssh("alice", &["-tt"], "web", "", b"echo $((6*7))\nexit 3\n");
    expect(&out, 3, "a shell exits with its code");
    assert!(text(&out.stdout).contains("42"), "{}", text(&out.stdout));
    let out = keys.ssh("carol", &[], "web", "echo hello from $(hostname)", b"");
    expect(&out, 0, "one command in the VM");
    assert_eq!(text(&out.stdout), "hello from web\n");
    expect(
        &keys.ssh("bob", &[], "web", "true", b""),
        3,
        "bob cannot enter alice's VM",
    );

    // A shell on the command account is refused; an unknown key is refused.
    let out = keys.ssh("alice", &["-tt"], "hearth", "", b"");
    expect(&out, 2, "shell on the command account");
    assert!(
        text(&out.stdout).contains("runs one command")
            || text(&out.stderr).contains("runs one command")
    );
    let out = ssh("stranger", "list");
    expect(&out, 255, "unknown key");
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );

    // export over SSH piped into import over SSH.
    expect(&ssh("alice", "stop web"), 0, "stop web");
    let archive = w.dir.path().join("web.tar");
    let exported = keys.ssh("alice", &[], "hearth", "export web", b"");
    expect(&exported, 0, "export");
    std::fs::write(&archive, &exported.stdout).unwrap();
    expect(&ssh("alice", "delete web"), 0, "delete web");
    let imported = keys.ssh(
        "alice",
        &[],
        "hearth",
        "import",
        &std::fs::read(&archive).unwrap(),
    );
    expect(&imported, 0, "import");
    let list = json_of(&text(&ssh("alice", "--json list").stdout));
    assert_eq!(list[0]["name"], "web", "{list}");
    assert_eq!(list[0]["state"], "stopped");
    assert_eq!(list[0]["org"], "alice");

    // REST from an address that is not loopback: no key 401, someone else's VM 404, admin 200,
    // a revoked key 401 at once.
    let (status, body) = rest("/v1/vms", None);
    assert_eq!(status, 401, "{body}");
    let bob_key = d
        .hearth_ok(&["key", "create", "--user", "bob"])
        .trim()
        .to_owned();
    let admin_key = d
        .hearth_ok(&["key", "create", "--user", "admin"])
        .trim()
        .to_owned();
    let (status, body) = rest("/v1/vms/web", Some(&bob_key));
    assert_eq!(status, 404, "{body}");
    let (status, body) = rest("/v1/vms/web", Some(&admin_key));
    assert_eq!(status, 200, "{body}");
    let keys_list = json_of(&d.hearth_ok(&["--json", "key", "list"]));
    let bob_id = keys_list
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["user"] == "bob")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    d.hearth_ok(&["key", "revoke", &bob_id]);
    let (status, body) = rest("/v1/vms", Some(&bob_key));
    assert_eq!(status, 401, "{body}");

    // The audit log has each of these attempts.
    let rows = json_of(&d.hearth_ok(&["--json", "audit", "--limit", "1000"]));
    let rows = rows.as_array().unwrap();
    let has = |principal: &str, action: &str, decision: &str, result: &str| {
        rows.iter().any(|r| {
            r["principal"] == principal
                && r["action"] == action
                && r["decision"] == decision
                && r["result"] == result
        })
    };
    assert!(
        rows.iter().any(|r| r["action"] == "ssh_login"
            && r["decision"] == "deny"
            && r["result"]
                .as_str()
                .unwrap()
                .starts_with("unknown key SHA256:")),
        "{rows:#?}"
    );
    assert!(has("alice", "ssh_command", "allow", "ok"), "{rows:#?}");
    assert!(has("alice", "ssh_command", "allow", "exit 7"), "{rows:#?}");
    assert!(has("alice", "create_vm", "allow", "ok"), "{rows:#?}");
    assert!(has("bob", "get_vm", "deny", "vm_not_found"), "{rows:#?}");
    assert!(has("bob", "stop_vm", "deny", "vm_not_found"), "{rows:#?}");
    assert!(has("admin", "get_vm", "allow", "ok"), "{rows:#?}");
    assert!(
        has("anonymous", "login", "deny", "unauthenticated"),
        "{rows:#?}"
    );
    let sources: Vec<&str> = rows
        .iter()
        .filter(|r| r["principal"] == "alice" && r["action"] == "create_vm")
        .map(|r| r["source"].as_str().unwrap())
        .collect();
    assert!(
        sources.iter().all(|s| s.starts_with("ssh:127.0.0.1:")),
        "{sources:?}"
    );
    expect(&ssh("alice", "delete web"), 0, "delete web");
}
