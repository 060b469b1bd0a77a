//! The SSH command surface's latency: `ssh hearth@host list` over a warm ControlMaster
//! connection against the same `list` over REST (the `hearth` CLI, and a bare HTTP request),
//! on a release `hearthd` with networking off, in a network namespace of the bench's own.
//! Rounds alternate between the three so drift hits all alike. Also `ssh -O check` on the same
//! master, which never reaches hearthd: what the OpenSSH client's own start costs.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{Netns, Proc, median, ms_since, run};

const LISTEN: &str = "127.0.0.1:7072";
const SSH_PORT: &str = "2232";
const ROUNDS: usize = 41;
const TARGET_RATIO: f64 = 2.0;

struct Figures {
    ssh: f64,
    cli: f64,
    http: f64,
    check: f64,
}

fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One `GET /v1/vms` on a new connection, read to its end.
fn http_list() -> Result<()> {
    let mut stream = TcpStream::connect(LISTEN)?;
    write!(
        stream,
        "GET /v1/vms HTTP/1.1\r\nHost: {LISTEN}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        bail!("GET /v1/vms: {}", String::from_utf8_lossy(&answer));
    }
    Ok(())
}

pub fn bench(bin: &Path, agent: &Path, images: &Path, root: &Path) -> Result<()> {
    let work = root.join("target/bench-ssh");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let data = work.join("data");
    std::fs::create_dir_all(&data)?;
    std::os::unix::fs::symlink(images, data.join("images"))?;
    let key = work.join("id");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key))?;
    let figures = {
        let _ns = Netns::enter()?;
        measure(bin, agent, &data, &key, &work)?
    };
    let _ = std::fs::remove_dir_all(&work);
    let ratio = figures.ssh / figures.cli;
    println!("\nSSH command surface, `list`, {ROUNDS} alternating rounds (medians):");
    println!(
        "  ssh hearth@host list (ControlMaster)   {:>8.1} ms",
        figures.ssh
    );
    println!(
        "  hearth vm list (REST, the CLI)         {:>8.1} ms",
        figures.cli
    );
    println!(
        "  GET /v1/vms (REST, one HTTP request)   {:>8.1} ms",
        figures.http
    );
    println!(
        "  ssh -O check (the ssh client alone)    {:>8.1} ms",
        figures.check
    );
    println!(
        "  SSH / REST (CLI)                       {:>8.2}   target <= {TARGET_RATIO}: {}",
        ratio,
        if ratio <= TARGET_RATIO {
            "met".to_owned()
        } else {
            format!("NOT met, by {:.0} %", (ratio / TARGET_RATIO - 1.0) * 100.0)
        }
    );
    println!(
        "  SSH / REST (one HTTP request)          {:>8.2}   (an SSH command runs the CLI: ssh's start plus the CLI's)",
        figures.ssh / figures.http
    );
    Ok(())
}

fn measure(bin: &Path, agent: &Path, data: &Path, key: &Path, work: &Path) -> Result<Figures> {
    let log = File::create(work.join("hearthd.log"))?;
    let daemon = Proc(
        Command::new(bin.join("hearthd"))
            .env("HEARTH_DATA_DIR", data)
            .env("HEARTH_LISTEN", LISTEN)
            .env("HEARTH_IMAGE_AGENT_PATH", agent)
            .env("HEARTH_NETWORK_MODE", "off")
            .env("HEARTH_SSH_LISTEN", format!("127.0.0.1:{SSH_PORT}"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(bin.join("hearth"));
        cmd.args(args)
            .env("HEARTH_URL", format!("http://{LISTEN}"))
            .env("HEARTH_CONFIG", work.join("no-profile.toml"))
            .env_remove("HEARTH_API_KEY");
        cmd
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while quiet(&mut cli(&["health"])).is_err() {
        if Instant::now() > deadline {
            bail!(
                "hearthd did not start; see {}",
                work.join("hearthd.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    quiet(cli(&["user", "ssh-key", "add", "admin"]).arg(key.with_extension("pub")))?;
    let control = work.join("mux");
    let ssh = |extra: &[&str]| {
        let mut cmd = Command::new("ssh");
        cmd.args(["-F", "/dev/null", "-p", SSH_PORT, "-i"])
            .arg(key)
            .args(["-o", "StrictHostKeyChecking=no", "-o"])
            .arg(format!(
                "UserKnownHostsFile={}",
                work.join("known_hosts").display()
            ))
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-S"])
            .arg(&control)
            .args(extra);
        cmd
    };
    let master = Proc(
        ssh(&["-M", "-N", "hearth@127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while quiet(&mut ssh(&["-O", "check", "hearth@127.0.0.1"])).is_err() {
        if Instant::now() > deadline {
            bail!("the ControlMaster connection did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // One of each, not counted: caches.
    quiet(&mut ssh(&["hearth@127.0.0.1", "list"]))?;
    quiet(&mut cli(&["vm", "list"]))?;
    http_list()?;
    let (mut s, mut c, mut h, mut k) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // The three take turns going first.
        for turn in 0..3 {
            match (round + turn) % 3 {
                0 => {
                    let t = Instant::now();
                    quiet(&mut ssh(&["hearth@127.0.0.1", "list"]))?;
                    s.push(ms_since(t));
                }
                1 => {
                    let t = Instant::now();
                    quiet(&mut cli(&["vm", "list"]))?;
                    c.push(ms_since(t));
                }
                _ => {
                    let t = Instant::now();
                    http_list()?;
                    h.push(ms_since(t));
                }
            }
        }
        let t = Instant::now();
        quiet(&mut ssh(&["-O", "check", "hearth@127.0.0.1"]))?;
        k.push(ms_since(t));
    }
    drop(master);
    drop(daemon);
    Ok(Figures {
        ssh: median(&mut s),
        cli: median(&mut c),
        http: median(&mut h),
        check: median(&mut k),
    })
}
