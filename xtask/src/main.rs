//! Project automation. `cargo run -p xtask -- bench` (or `make bench`) measures, in one run on
//! one guest image:
//!
//! - bare QEMU boot to guest agent ready, with QEMU started by the bench itself;
//! - hearthd create → first exec output, through the REST API;
//! - their ratio (target: at most 1.10);
//! - exec round trip through the API, p50/p99 over 200 calls (target p50: 2 ms), and, to show
//!   where time goes, the same exec straight over the agent protocol, and the protocol round
//!   trip alone (`ping`).
//!
//! Everything runs inside a network namespace the bench creates and removes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hearth_guest_proto::{self as proto, Decoder, Event, Request};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const URL: &str = "http://127.0.0.1:7070";
const BOOTS: usize = 5;
const EXECS: usize = 200;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench(),
        _ => bail!("usage: cargo run -p xtask -- bench"),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Netns(String);

impl Netns {
    fn enter() -> Result<Netns> {
        let name = format!("hearth-bench-{}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns(name);
        run(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]))?;
        let f = File::open(format!("/run/netns/{}", ns.0))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child process ended (by its PID) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nearest-rank percentile, `p` in whole percent.
fn percentile(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = (p * v.len()).div_ceil(100).max(1);
    v[rank.min(v.len()) - 1]
}

fn bench() -> Result<()> {
    let root = root();
    let bin = root.join("target/release");
    let agent = std::env::var_os("HEARTH_IMAGE_AGENT_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/x86_64-unknown-linux-gnu/release/hearth-guest"));
    let data = root.join("target/bench-data");
    let _ = std::fs::remove_dir_all(data.join("vms"));
    let _ = std::fs::remove_dir_all(data.join("run"));
    let _ = std::fs::remove_file(data.join("hearth.db"));
    eprintln!("bench: preparing the guest image");
    run(Command::new(bin.join("hearthd"))
        .arg("build-image")
        .env("HEARTH_DATA_DIR", &data)
        .env("HEARTH_IMAGE_AGENT_PATH", &agent))?;
    let image = std::fs::read_link(data.join("images/current"))?;
    let image = data.join("images").join(image);

    let ns = Netns::enter()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let work = root.join("target/bench-bare");
        let daemon = Hearthd::start(&bin, &data, &agent).await?;
        let (mut bare, mut api) = (Vec::new(), Vec::new());
        let (mut proto_exec, mut ping, mut exec) = (Vec::new(), Vec::new(), Vec::new());
        // Interleaved, with a pause between boots, so drift on the machine hits both alike.
        for round in 0..BOOTS {
            let first = round == 0;
            bare.push(bare_qemu(&image, &work, first, &mut proto_exec, &mut ping).await?);
            tokio::time::sleep(Duration::from_secs(2)).await;
            api.push(daemon.round(round, first, &mut exec).await?);
            tokio::time::sleep(Duration::from_secs(2)).await;
            eprintln!("bench: round {} of {BOOTS}", round + 1);
        }
        let _ = std::fs::remove_dir_all(&work);
        Ok::<_, anyhow::Error>((bare, proto_exec, ping, api, exec))
    });
    drop(ns);
    let (mut bare, mut proto_exec, mut ping, mut api, mut exec) = result?;
    let (b, a) = (median(&mut bare), median(&mut api));
    println!("guest boot, median of {BOOTS} (QEMU/TCG, 256 MiB, same image):");
    println!("  bare QEMU start -> agent ready        {:>8.1} ms", b);
    println!("  hearthd create -> first exec output   {:>8.1} ms", a);
    println!(
        "  ratio hearthd / bare                  {:>8.3}   (target <= 1.10)",
        a / b
    );
    println!("exec round trip, {EXECS} calls:");
    println!(
        "  API  POST /exec `true`   p50 {:>7.2} ms   p99 {:>7.2} ms   (target p50 <= 2 ms)",
        percentile(&mut exec, 50),
        percentile(&mut exec, 99)
    );
    println!(
        "  agent protocol exec      p50 {:>7.2} ms   p99 {:>7.2} ms",
        percentile(&mut proto_exec, 50),
        percentile(&mut proto_exec, 99)
    );
    println!(
        "  agent protocol ping      p50 {:>7.2} ms   p99 {:>7.2} ms",
        percentile(&mut ping, 50),
        percentile(&mut ping, 99)
    );
    println!(
        "  ratio API exec / protocol exec        {:>8.3}",
        percentile(&mut exec, 50) / percentile(&mut proto_exec, 50)
    );
    Ok(())
}

fn tsc_khz() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .to_owned();
    let (w, f) = mhz.split_once('.').unwrap_or((&mhz, ""));
    let f: String = f.chars().chain("000".chars()).take(3).collect();
    Some(format!(
        "{}",
        w.parse::<u64>().ok()? * 1000 + f.parse::<u64>().ok()?
    ))
}

/// Minimal agent client: send frames, read events.
struct Agent {
    stream: UnixStream,
    decoder: Decoder<Event>,
    buf: Vec<u8>,
}

impl Agent {
    async fn connect(path: &Path) -> Result<Agent> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(path).await {
                Ok(stream) => {
                    return Ok(Agent {
                        stream,
                        decoder: Decoder::new(),
                        buf: vec![0; 1 << 16],
                    });
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn send(&mut self, r: &Request, payload: &[u8]) -> Result<()> {
        self.stream.write_all(&proto::encode(r, payload)?).await?;
        Ok(())
    }

    async fn next(&mut self) -> Result<Event> {
        loop {
            if let Ok(Some(f)) = self.decoder.next_frame() {
                return Ok(f.message);
            }
            let n = self.stream.read(&mut self.buf).await?;
            if n == 0 {
                bail!("agent connection closed");
            }
            self.decoder.extend(&self.buf[..n]);
        }
    }
}

/// Boots the image with a plain QEMU command line; returns ms from start to agent hello. On the
/// first round also measures protocol round trips.
async fn bare_qemu(
    image: &Path,
    work: &Path,
    first: bool,
    execs: &mut Vec<f64>,
    pings: &mut Vec<f64>,
) -> Result<f64> {
    std::fs::create_dir_all(work)?;
    let disk = work.join("rootfs.ext4");
    let sock = work.join("agent.sock");
    let ram = PathBuf::from(format!("/dev/shm/hearth-bench-{}.ram", std::process::id()));
    let khz = tsc_khz().unwrap_or_default();
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&sock);
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(image.join("rootfs.ext4"))
        .arg(&disk))?;
    let lpj = khz.parse::<u64>().unwrap_or(0) * 4;
    let started = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        // The same guest RAM setup hearthd uses (a shared file on tmpfs), so the comparison
        // measures hearthd's own overhead, not a different memory backend.
        .args(["-M", "microvm,accel=tcg,memory-backend=mem0", "-cpu", "max", "-smp", "1"])
        .args(["-m", "256M", "-object"])
        .arg(format!(
            "memory-backend-file,id=mem0,size=256M,mem-path={},share=on",
            ram.display()
        ))
        .args(["-bios", "/usr/share/qemu/qboot.rom", "-nodefaults", "-no-user-config"])
        .args(["-nographic", "-no-reboot", "-serial", "null"])
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initrd.img"))
        .args([
            "-append",
            &format!("console=ttyS0 panic=1 no_timer_check tsc=reliable quiet tsc_early_khz={khz} lpj={lpj}"),
        ])
        .args(["-drive", &format!("id=root,file={},format=raw,if=none", disk.display())])
        .args(["-device", "virtio-blk-device,drive=root", "-device", "virtio-serial-device"])
        .args([
            "-chardev",
            &format!("socket,id=agent,path={},server=on,wait=off", sock.display()),
        ])
        .args([
            "-device",
            &format!("virtserialport,chardev=agent,name={}", proto::PORT_NAME),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let qemu = Proc(child);
    let result = bare_rounds(&sock, started, first, execs, pings).await;
    drop(qemu);
    let _ = std::fs::remove_file(&ram);
    result
}

async fn bare_rounds(
    sock: &Path,
    started: Instant,
    first: bool,
    execs: &mut Vec<f64>,
    pings: &mut Vec<f64>,
) -> Result<f64> {
    let mut agent = Agent::connect(sock).await?;
    agent.send(&Request::hello(), &[]).await?;
    while !matches!(agent.next().await?, Event::Hello { .. }) {}
    let boot = started.elapsed().as_secs_f64() * 1000.0;
    if first {
        for i in 0..EXECS as u64 {
            let t = Instant::now();
            agent.send(&Request::Ping { id: i }, &[]).await?;
            while !matches!(agent.next().await?, Event::Done { .. }) {}
            pings.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        for i in 0..EXECS as u64 {
            let t = Instant::now();
            let exec = Request::Exec {
                id: 10_000 + i,
                argv: vec!["true".into()],
                env: vec![],
                cwd: None,
                stdin: false,
                pty: None,
                timeout_ms: None,
            };
            agent.send(&exec, &[]).await?;
            while !matches!(agent.next().await?, Event::Exited { .. }) {}
            execs.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(boot)
}

/// A hearthd of the bench's own.
struct Hearthd {
    _proc: Proc,
    http: reqwest::Client,
}

impl Hearthd {
    async fn start(bin: &Path, data: &Path, agent: &Path) -> Result<Hearthd> {
        let log = File::create(data.join("hearthd-bench.log"))?;
        let child = Command::new(bin.join("hearthd"))
            .env("HEARTH_DATA_DIR", data)
            .env("HEARTH_LISTEN", "127.0.0.1:7070")
            .env("HEARTH_IMAGE_AGENT_PATH", agent)
            .env("HEARTH_GUEST_MEMORY", "256M")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let daemon = Hearthd {
            _proc: Proc(child),
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let healthy = match daemon.http.get(format!("{URL}/v1/health")).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|h| h["image"].is_string()),
                Err(_) => false,
            };
            if healthy {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                bail!(
                    "hearthd did not become ready; see {}",
                    data.join("hearthd-bench.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn exec(&self, name: &str, cmd: Value) -> Result<Value> {
        let r = self
            .http
            .post(format!("{URL}/v1/vms/{name}/exec"))
            .json(&json!({ "command": cmd }))
            .send()
            .await?;
        Ok(r.json().await?)
    }

    /// Create → first exec output, in ms; on the first round also exec round trips.
    async fn round(&self, round: usize, first: bool, execs: &mut Vec<f64>) -> Result<f64> {
        let name = format!("bench-{round}");
        let started = Instant::now();
        let r = self
            .http
            .post(format!("{URL}/v1/vms"))
            .json(&json!({ "name": name }))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("create failed: {}", r.text().await?);
        }
        let out = self.exec(&name, json!(["echo", "ready"])).await?;
        if out["stdout"] != "ready\n" {
            bail!("unexpected exec answer {out}");
        }
        let boot = started.elapsed().as_secs_f64() * 1000.0;
        if first {
            for _ in 0..EXECS {
                let t = Instant::now();
                let out = self.exec(&name, json!(["true"])).await?;
                if out["exit_code"] != 0 {
                    bail!("exec failed: {out}");
                }
                execs.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        let r = self
            .http
            .delete(format!("{URL}/v1/vms/{name}"))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("delete failed: {}", r.text().await?);
        }
        Ok(boot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut v: Vec<f64> = (1..=200).map(f64::from).collect();
        v.reverse();
        assert_eq!(percentile(&mut v, 50), 100.0);
        assert_eq!(percentile(&mut v, 99), 198.0);
        assert_eq!(percentile(&mut v, 100), 200.0);
        let mut one = vec![7.0];
        assert_eq!(percentile(&mut one, 99), 7.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    }
}
