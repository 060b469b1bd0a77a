//! Real-VM tests of flow control in the guest protocol (harness in `common`): stdin from an
//! endless source into a process that never reads it must not grow the agent.

mod common;

use std::fs::File;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// How large the agent's resident set may get while an exec's stdin is flooded. At rest it is
/// about 2 MiB (seen: 2088 KiB before, 2924 KiB at the peak of the flood); with credit windows it
/// holds one 256 KiB window of stdin more. Without them it takes in stdin as fast as the host
/// sends it, hundreds of MiB within seconds, until the guest's memory runs out.
const AGENT_RSS_BOUND_KIB: u64 = 8 * 1024;

/// How much the agent may grow over its size before the flood.
const AGENT_GROWTH_BOUND_KIB: u64 = 4 * 1024;

/// How long stdin is flooded.
const FLOOD: Duration = Duration::from_secs(20);

/// A CLI process this test started; killed (by its pid) if it is still running when dropped.
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Pids of the guest's processes whose `comm` is `name` and, if given, whose parent is `ppid`.
fn guest_pids(w: &World, vm: &str, name: &str, ppid: Option<u32>) -> Vec<u32> {
    let parent = ppid.map_or_else(String::new, |p| p.to_string());
    // The script's own shell is a child of the agent too, but its comm is `sh`.
    let script = r#"for d in /proc/[0-9]*; do
        [ "$(cat "$d/comm" 2>/dev/null)" = "$1" ] || continue
        if [ -z "$2" ] || grep -q "^PPid:[[:space:]]*$2\$" "$d/status" 2>/dev/null; then
            echo "${d#/proc/}"
        fi
    done"#;
    let out = w
        .d()
        .hearth_ok(&["exec", vm, "--", "sh", "-c", script, "sh", name, &parent]);
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// A `Vm…` figure (in KiB) of guest process `pid`.
fn guest_status_kib(w: &World, vm: &str, pid: u32, field: &str) -> u64 {
    let status = w
        .d()
        .hearth_ok(&["exec", vm, "--", "cat", &format!("/proc/{pid}/status")]);
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in the status of {pid}:\n{status}"))
}

#[test]
fn endless_stdin_into_a_sleeping_exec_keeps_the_agent_small() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = World::new();
    let vm = json_of(&w.d().hearth_ok(&["--json", "vm", "new", "flow-a"]));
    let id = vm["id"].as_str().unwrap().to_owned();
    w.vm_ids.push(id.clone());

    // The agent proper is PID 1's child (PID 1 is the same binary, staying behind as reaper).
    let agents = guest_pids(&w, "flow-a", "hearth-guest", Some(1));
    assert_eq!(agents.len(), 1, "agent processes: {agents:?}");
    let agent = agents[0];
    let rss_before = guest_status_kib(&w, "flow-a", agent, "VmRSS");

    let mut flood = Started(
        hearth_cmd(&["exec", "-i", "flow-a", "--", "sleep", "60"])
            .stdin(File::open("/dev/zero").unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run hearth exec -i"),
    );
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < FLOOD {
        samples.push(guest_status_kib(&w, "flow-a", agent, "VmRSS"));
        assert!(
            flood.0.try_wait().unwrap().is_none(),
            "the flooding exec ended early"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // The peak over the whole flood, between samples too.
    let peak = guest_status_kib(&w, "flow-a", agent, "VmHWM");
    let most = samples.iter().copied().max().unwrap_or(0);
    eprintln!(
        "agent VmRSS before {rss_before} KiB, during (max of {}) {most} KiB, VmHWM {peak} KiB",
        samples.len()
    );
    assert!(
        most < AGENT_RSS_BOUND_KIB && peak < AGENT_RSS_BOUND_KIB,
        "the agent grew to {most} KiB (peak {peak} KiB), over {AGENT_RSS_BOUND_KIB} KiB"
    );
    assert!(
        most.saturating_sub(rss_before) < AGENT_GROWTH_BOUND_KIB,
        "the agent grew from {rss_before} KiB to {most} KiB"
    );
    // Still the same agent: it was not killed and restarted.
    assert_eq!(
        guest_pids(&w, "flow-a", "hearth-guest", Some(1)),
        vec![agent]
    );

    // Stop the exec: end its process in the guest; the session, blocked on stdin credit, ends
    // with it and the CLI exits.
    let sleeps = guest_pids(&w, "flow-a", "sleep", Some(agent));
    assert_eq!(sleeps.len(), 1, "sleep processes: {sleeps:?}");
    let sleep = sleeps[0].to_string();
    w.d().hearth_ok(&[
        "exec",
        "flow-a",
        "--",
        "sh",
        "-c",
        r#"kill "$1""#,
        "sh",
        &sleep,
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while flood.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the CLI did not exit after its command was killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(flood);
    // The VM is fine afterwards.
    assert_eq!(
        w.d().hearth_ok(&["exec", "flow-a", "--", "echo", "ok"]),
        "ok\n"
    );
    w.d().hearth_ok(&["vm", "delete", "flow-a"]);
    w.assert_gone(&id);
}
