//! Project automation. `cargo run -p xtask -- bench [ROUNDS]` (or `make bench`) measures, in one
//! run on one guest image, with bare QEMU and hearthd boots interleaved over ROUNDS rounds
//! (default 9) after one warm-up round that is not counted:
//!
//! - bare QEMU boot to guest agent hello and to its first exec output over the agent protocol,
//!   with QEMU started by the bench itself;
//! - hearthd create → first exec output, through the REST API, with a breakdown (create
//!   answered, of which VMM launch → agent hello as hearthd reports it; then the first exec);
//! - per round the ratio hearthd / bare, both to the first exec output (target: median at most
//!   1.05) and, beside it, to the bare agent hello; min, median and max of every figure and ratio;
//! - exec round trip through the API, p50/p99 over 200 calls (target p50: 2 ms), the same exec
//!   straight over the agent protocol, the protocol round trip alone (`ping`), and a spawn of the
//!   same program from a shell loop inside the guest; the ratios API / protocol (target at most
//!   1.05) and protocol / in-guest spawn (target at most 1.3);
//! - hearthd's resident memory (VmRSS) idle with 0 and with 10 running VMs (target at most
//!   30 MB);
//! - networking: the network slot's setup inside each counted create, as hearthd records it in
//!   the `vmm_launched` event (target at most 50 ms); the same create against a second hearthd
//!   with `HEARTH_NETWORK_MODE=off`, interleaved with the networked one in every round, and the
//!   per-round ratio networked / off (target: median at most 1.05); one slot's setup straight
//!   through a `hearth-helper` of the bench's own with 1 and with 50 slots there (target: ratio
//!   of medians at most 1.2); TCP throughput from a guest through its slot to a sink in an
//!   "outside" namespace, beside the same transfer between two plain namespaces (report only).
//!
//! Everything runs inside a network namespace the bench creates and removes (the outside one
//! and the helper's slots too). Then the disk benchmarks (`disk`), also alone with
//! `bench disk`: reflink clone times and export/import throughput.

mod disk;
mod net;
mod ssh;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hearth_guest_proto::{self as proto, Decoder, Event, Request};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Where the networked hearthd and the one with networking off listen.
const LISTEN: &str = "127.0.0.1:7070";
const LISTEN_OFF: &str = "127.0.0.1:7071";
/// Target of the network setup inside a create, in ms.
const NET_SETUP_TARGET_MS: f64 = 50.0;
const ROUNDS: usize = 9;
const EXECS: usize = 200;
/// VMs running while the second RSS figure is taken.
const RSS_VMS: usize = 10;
/// `/bin/true` spawns per in-guest loop, and loops run.
const SPAWNS: u64 = 200;
const SPAWN_LOOPS: usize = 5;
const RSS_TARGET_MB: f64 = 30.0;
/// Root disk size of every VM, bare or hearthd's (hearthd's default).
const ROOTFS_SIZE: &str = "10G";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") if args.get(1).map(String::as_str) == Some("disk") => bench_disk(),
        Some("bench") if args.get(1).map(String::as_str) == Some("ssh") => {
            let (bin, agent, data) = prepare()?;
            ssh::bench(&bin, &agent, &data.join("images"), &root())
        }
        Some("bench") => {
            let rounds = match args.get(1) {
                Some(n) => n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .with_context(|| format!("ROUNDS must be a whole number >= 1, not {n:?}"))?,
                None => ROUNDS,
            };
            bench(rounds)
        }
        _ => bail!("usage: cargo run -p xtask -- bench [ROUNDS | disk | ssh]"),
    }
}

/// The binaries, agent and image the benchmarks use (the image built when missing).
fn prepare() -> Result<(PathBuf, PathBuf, PathBuf)> {
    let root = root();
    let bin = root.join("target/release");
    let agent = std::env::var_os("HEARTH_IMAGE_AGENT_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/x86_64-unknown-linux-gnu/release/hearth-guest"));
    let data = root.join("target/bench-data");
    std::fs::create_dir_all(&data)?;
    eprintln!("bench: preparing the guest image");
    run(Command::new(bin.join("hearthd"))
        .arg("build-image")
        .env("HEARTH_DATA_DIR", &data)
        .env("HEARTH_IMAGE_AGENT_PATH", &agent))?;
    Ok((bin, agent, data))
}

fn bench_disk() -> Result<()> {
    let (bin, agent, data) = prepare()?;
    disk::bench(&root(), &bin, &agent, &data.join("images"))
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
        // SIGTERM first, so a hearthd shuts down cleanly (and tidies its RAM directory); then
        // SIGKILL for what does not end within 10 s.
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// Min, median and max of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

impl Spread {
    fn of(v: &[f64]) -> Spread {
        let mut v = v.to_vec();
        let median = median(&mut v);
        Spread {
            min: v[0],
            median,
            max: v[v.len() - 1],
        }
    }
}

/// hearthd_i / bare_i for each round i.
fn ratios(hearthd: &[f64], bare: &[f64]) -> Vec<f64> {
    hearthd.iter().zip(bare).map(|(h, b)| h / b).collect()
}

/// `VmRSS` of /proc/<pid>/status, in MB (10^6 bytes).
fn rss_mb(status: &str) -> Option<f64> {
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024.0 / 1e6)
}

/// The agent-ready time hearthd records in the `running` event: "guest agent ready in N ms".
fn agent_ready_ms(detail: &Value) -> Option<f64> {
    detail["events"].as_array()?.iter().rev().find_map(|e| {
        let m = e["message"].as_str()?;
        let rest = m.split_once("guest agent ready in ")?.1;
        rest.split_once(" ms")?.0.parse().ok()
    })
}

/// The network setup hearthd records in the `vmm_launched` event: "network slot ready in N ms;
/// VMM pid P launched".
fn network_setup_ms(detail: &Value) -> Option<f64> {
    detail["events"].as_array()?.iter().rev().find_map(|e| {
        if e["kind"] != "vmm_launched" {
            return None;
        }
        let m = e["message"].as_str()?;
        let rest = m.split_once("network slot ready in ")?.1;
        rest.split_once(" ms")?.0.parse().ok()
    })
}

/// Nearest-rank percentile, `p` in whole percent.
fn percentile(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = (p * v.len()).div_ceil(100).max(1);
    v[rank.min(v.len()) - 1]
}

/// Everything one run measures, in ms unless named otherwise.
#[derive(Default)]
struct Samples {
    bare: Vec<f64>,
    hearthd: Vec<f64>,
    /// POST /v1/vms answered (the VM is running).
    create: Vec<f64>,
    /// VMM launch → agent hello, as hearthd records it.
    ready: Vec<f64>,
    /// The network slot's setup inside the create (slot, service sockets, host rules, TAP), as hearthd records it.
    net_setup: Vec<f64>,
    /// The hearthd with networking off: create → first exec output, and create answered.
    off: Vec<f64>,
    off_create: Vec<f64>,
    off_ready: Vec<f64>,
    /// Create answered → first exec output.
    first_exec: Vec<f64>,
    /// Bare: agent hello → first exec output (over the protocol).
    bare_first_exec: Vec<f64>,
    api_exec: Vec<f64>,
    proto_exec: Vec<f64>,
    ping: Vec<f64>,
    /// One `/bin/true` spawned by a shell loop in the guest, per loop.
    spawn: Vec<f64>,
    rss_idle: f64,
    rss_full: f64,
    /// MB/s of each transfer: guest → outside through the slot, and namespace → namespace.
    guest_mbps: Vec<f64>,
    plain_mbps: Vec<f64>,
    /// Slot setup straight through a helper of the bench's own.
    setup: net::SetupFigures,
}

/// One create → first exec output through hearthd's API, in ms.
#[derive(Debug, Clone, Copy)]
struct Boot {
    total: f64,
    create: f64,
    ready: f64,
    /// "network slot ready in N ms", when the VM has a network.
    network: Option<f64>,
}

impl Samples {
    fn record(&mut self, networked: bool, b: Boot) -> Result<()> {
        match (networked, b.network) {
            (true, Some(n)) => {
                self.hearthd.push(b.total);
                self.create.push(b.create);
                self.first_exec.push(b.total - b.create);
                self.ready.push(b.ready);
                self.net_setup.push(n);
            }
            (false, None) => {
                self.off.push(b.total);
                self.off_create.push(b.create);
                self.off_ready.push(b.ready);
            }
            (true, None) => bail!(
                "the networked hearthd's VM has no \"network slot ready in N ms\" event: is VM networking on?"
            ),
            (false, Some(_)) => bail!("the hearthd with networking off gave its VM a network slot"),
        }
        Ok(())
    }
}

fn bench(rounds: usize) -> Result<()> {
    let root = root();
    let (bin, agent, data) = prepare()?;
    let helper = bin.join("hearth-helper");
    if !helper.exists() {
        bail!(
            "{} is missing: cargo build --release -p hearth-helper (hearthd, as root, starts it for VM networking; the bench drives one too)",
            helper.display()
        );
    }
    // The hearthd with networking off: its own data directory, the same image cache.
    let data_off = root.join("target/bench-data-off");
    for d in [&data, &data_off] {
        let _ = std::fs::remove_dir_all(d.join("vms"));
        let _ = std::fs::remove_dir_all(d.join("run"));
        let _ = std::fs::remove_file(d.join("hearth.db"));
    }
    std::fs::create_dir_all(&data_off)?;
    if std::fs::symlink_metadata(data_off.join("images")).is_err() {
        std::os::unix::fs::symlink(data.join("images"), data_off.join("images"))?;
    }
    let image = std::fs::read_link(data.join("images/current"))?;
    let image = data.join("images").join(image);

    let ns = Netns::enter()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let work = root.join("target/bench-bare");
        let daemon = Hearthd::start(&bin, &data, &agent, LISTEN, &[]).await?;
        let off = Hearthd::start(
            &bin,
            &data_off,
            &agent,
            LISTEN_OFF,
            &[("HEARTH_NETWORK_MODE", "off")],
        )
        .await?;
        // A round not counted first: the first boot after the image was built pays for cold
        // caches (a third slower here), and would count for bare QEMU only.
        eprintln!("bench: warm-up round (not counted)");
        let (vm, _) = boot_bare(&image, &work).await?;
        drop(vm);
        for d in [&daemon, &off] {
            d.round("bench-warm-up").await?;
            d.spare_ready().await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let mut s = Samples::default();
        // Interleaved, with a pause between boots, so drift on the machine hits all alike; the
        // two hearthds take turns going first. Each deletes its VM before the next boot.
        for round in 0..rounds {
            let (mut vm, boot) = boot_bare(&image, &work).await?;
            s.bare.push(boot);
            let t = Instant::now();
            vm.exec(&["echo", "ready"]).await?;
            s.bare_first_exec.push(ms_since(t));
            drop(vm);
            tokio::time::sleep(Duration::from_secs(2)).await;
            let order = if round % 2 == 0 {
                [&daemon, &off]
            } else {
                [&off, &daemon]
            };
            for d in order {
                let b = d.round(&format!("bench-{round}")).await?;
                s.record(d.networked, b)?;
                d.spare_ready().await?;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            eprintln!(
                "bench: round {} of {rounds}: bare {:.0} ms, hearthd {:.0} ms (network slot {:.0} ms), network off {:.0} ms",
                round + 1,
                s.bare[round],
                s.hearthd[round],
                s.net_setup[round],
                s.off[round]
            );
        }
        drop(off);
        eprintln!("bench: TCP throughput, guest through its slot and namespace to namespace");
        throughput(&daemon, &mut s).await?;
        eprintln!("bench: exec round trips");
        exec_phase(&daemon, &image, &work, &mut s).await?;
        let _ = std::fs::remove_dir_all(&work);
        eprintln!("bench: hearthd's memory, idle and with {RSS_VMS} running VMs");
        tokio::time::sleep(Duration::from_secs(3)).await;
        s.rss_idle = daemon.rss()?;
        s.rss_full = daemon.fleet(RSS_VMS).await?;
        // The helper bench follows with no hearthd in the namespace (the host rule table is
        // one per namespace).
        drop(daemon);
        Ok::<_, anyhow::Error>(s)
    });
    // From this (the main) thread: the helper's --die-with-parent follows the thread that
    // started it.
    let result = result.and_then(|mut s| {
        eprintln!("bench: network slot setup straight through hearth-helper");
        s.setup = net::helper_setup(&helper, &data.join("hearth-helper-bench.log"))?;
        Ok(s)
    });
    drop(ns);
    report(rounds, &mut result?);
    disk::bench(&root, &bin, &agent, &data.join("images"))?;
    ssh::bench(&bin, &agent, &data.join("images"), &root)
}

/// TCP throughput: a guest of `daemon` sends to a sink in an outside namespace through its
/// slot (and hearthd's NAT), alternating with the same transfer from the bench's namespace
/// (two plain namespaces); one small transfer of each first, not counted.
async fn throughput(daemon: &Hearthd, s: &mut Samples) -> Result<()> {
    let outside = net::Outside::create()?;
    let name = "bench-net";
    daemon.create(name).await?;
    let result = async {
        let wait = Duration::from_secs(120);
        for (i, bytes) in std::iter::once(net::WARM_UP_BYTES)
            .chain(std::iter::repeat_n(net::TRANSFER_BYTES, net::TRANSFERS))
            .enumerate()
        {
            daemon.guest_transfer(name, bytes).await?;
            let guest = outside.received(wait)?;
            net::plain_transfer(bytes)?;
            let plain = outside.received(wait)?;
            for t in [guest, plain] {
                if t.bytes != bytes {
                    bail!("the sink received {} bytes of {bytes}", t.bytes);
                }
            }
            if i > 0 {
                s.guest_mbps.push(guest.mb_per_s());
                s.plain_mbps.push(plain.mb_per_s());
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let deleted = daemon.delete(name).await;
    drop(outside);
    result?;
    deleted
}

fn spread_line(label: &str, v: &[f64]) {
    let s = Spread::of(v);
    println!(
        "  {label:<42} min {:>8.1}  median {:>8.1}  max {:>8.1} ms",
        s.min, s.median, s.max
    );
}

/// A spread with its unit and a note (a target) after it.
fn target_line(label: &str, v: &[f64], unit: &str, note: &str) {
    let s = Spread::of(v);
    let line = format!(
        "  {label:<42} min {:>8.1}  median {:>8.1}  max {:>8.1} {unit}   {note}",
        s.min, s.median, s.max
    );
    println!("{}", line.trim_end());
}

fn ratio_line(label: &str, r: Spread, target: &str) {
    println!(
        "  {label:<42} min {:>8.3}  median {:>8.3}  max {:>8.3}   {target}",
        r.min, r.median, r.max
    );
}

fn report(rounds: usize, s: &mut Samples) {
    // Like for like: both end at the first exec's output.
    let bare_exec: Vec<f64> = s
        .bare
        .iter()
        .zip(&s.bare_first_exec)
        .map(|(b, e)| b + e)
        .collect();
    println!("guest boot, {rounds} interleaved rounds (QEMU/TCG, 256 MiB, same image):");
    spread_line("bare QEMU start -> agent hello", &s.bare);
    spread_line("  then: first exec output (protocol)", &s.bare_first_exec);
    spread_line("bare QEMU start -> first exec output", &bare_exec);
    spread_line("hearthd create -> first exec output", &s.hearthd);
    spread_line("  of which: create answered (running)", &s.create);
    target_line(
        "    of which: network slot + rules",
        &s.net_setup,
        "ms",
        &format!("(target <= {NET_SETUP_TARGET_MS} ms)"),
    );
    spread_line("    of which: VMM launch -> agent hello", &s.ready);
    spread_line("  then: first exec output (API)", &s.first_exec);
    ratio_line(
        "ratio hearthd / bare to 1st exec output",
        Spread::of(&ratios(&s.hearthd, &bare_exec)),
        "(per round; target median <= 1.05)",
    );
    ratio_line(
        "ratio hearthd / bare to agent hello",
        Spread::of(&ratios(&s.hearthd, &s.bare)),
        "(per round; bare without its first exec)",
    );
    println!(
        "network on / off, the same {rounds} rounds (a second hearthd, HEARTH_NETWORK_MODE=off):"
    );
    spread_line("network off: create -> 1st exec output", &s.off);
    spread_line("  of which: create answered (running)", &s.off_create);
    spread_line("    of which: VMM launch -> agent hello", &s.off_ready);
    ratio_line(
        "ratio on / off, create answered",
        Spread::of(&ratios(&s.create, &s.off_create)),
        "(per round; target median <= 1.05)",
    );
    ratio_line(
        "ratio on / off, to 1st exec output",
        Spread::of(&ratios(&s.hearthd, &s.off)),
        "(per round; target median <= 1.05)",
    );
    let one = Spread::of(&s.setup.one);
    let loaded = Spread::of(&s.setup.loaded);
    println!(
        "network slot setup through hearth-helper (CreateSlot + OpenServices + ApplyHostRules + OpenTap), {} each:",
        net::SETUPS
    );
    spread_line("with 1 slot there", &s.setup.one);
    spread_line(
        &format!("with {} slots there", net::LOADED),
        &s.setup.loaded,
    );
    println!(
        "  {:<42} {:>8.3}   (medians; target <= 1.2)",
        format!("ratio {} slots / 1 slot", net::LOADED),
        loaded.median / one.median
    );
    println!(
        "TCP throughput, {} MiB, {} transfers each, to a sink in an outside namespace:",
        net::TRANSFER_BYTES >> 20,
        net::TRANSFERS
    );
    target_line(
        "guest -> outside through its slot",
        &s.guest_mbps,
        "MB/s",
        "",
    );
    target_line(
        "namespace -> namespace (plain veth)",
        &s.plain_mbps,
        "MB/s",
        "",
    );
    ratio_line(
        "ratio guest / plain namespaces",
        Spread::of(&ratios(&s.guest_mbps, &s.plain_mbps)),
        "(per pair; report only: TCG limits the guest)",
    );
    let api = percentile(&mut s.api_exec, 50);
    let proto_exec = percentile(&mut s.proto_exec, 50);
    let spawn = median(&mut s.spawn);
    println!("exec round trip, {EXECS} calls alternating between a bare and a hearthd VM:");
    println!(
        "  API  POST /exec `true`   p50 {:>7.2} ms   p99 {:>7.2} ms   (target p50 <= 2 ms)",
        api,
        percentile(&mut s.api_exec, 99)
    );
    println!(
        "  agent protocol exec      p50 {:>7.2} ms   p99 {:>7.2} ms",
        proto_exec,
        percentile(&mut s.proto_exec, 99)
    );
    println!(
        "  agent protocol ping      p50 {:>7.2} ms   p99 {:>7.2} ms",
        percentile(&mut s.ping, 50),
        percentile(&mut s.ping, 99)
    );
    println!(
        "  in-guest shell loop      median {:>7.2} ms per `/bin/true` ({SPAWN_LOOPS} loops of {SPAWNS})",
        spawn
    );
    println!(
        "  ratio API exec / protocol exec        {:>8.3}   (target <= 1.05)",
        api / proto_exec
    );
    println!(
        "  ratio protocol exec / in-guest spawn  {:>8.3}   (target <= 1.3)",
        proto_exec / spawn
    );
    println!("hearthd resident memory (VmRSS):");
    println!(
        "  idle, 0 VMs (after the rounds)        {:>8.1} MB   (target <= {RSS_TARGET_MB} MB)",
        s.rss_idle
    );
    println!(
        "  idle, {RSS_VMS} running VMs                 {:>8.1} MB   (target <= {RSS_TARGET_MB} MB)",
        s.rss_full
    );
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
        Ok(self.frame().await?.message)
    }

    async fn frame(&mut self) -> Result<proto::Frame<Event>> {
        loop {
            if let Ok(Some(f)) = self.decoder.next_frame() {
                return Ok(f);
            }
            let n = self.stream.read(&mut self.buf).await?;
            if n == 0 {
                bail!("agent connection closed");
            }
            self.decoder.extend(&self.buf[..n]);
        }
    }
}

/// A guest booted by the bench's own QEMU command line, with its agent connection; its QEMU is
/// ended and its RAM file removed when dropped.
struct BareVm {
    agent: Agent,
    _qemu: Proc,
    ram: PathBuf,
    next_id: u64,
}

impl Drop for BareVm {
    fn drop(&mut self) {
        // `_qemu` is dropped (ended) after this; QEMU holds the file open, removal is fine.
        let _ = std::fs::remove_file(&self.ram);
    }
}

/// Boots the image with a plain QEMU command line; returns the VM and the ms from start to agent
/// hello.
async fn boot_bare(image: &Path, work: &Path) -> Result<(BareVm, f64)> {
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
    // The disk hearthd gives a VM: the image grown to the same size, written out before the
    // boot as hearthd's spare is.
    run(Command::new("truncate")
        .args(["-s", ROOTFS_SIZE])
        .arg(&disk))?;
    run(Command::new("resize2fs")
        .arg("-f")
        .arg(&disk)
        .stdout(Stdio::null())
        .stderr(Stdio::null()))?;
    run(Command::new("sync").arg(&disk))?;
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
    let ram_file = ram.clone();
    let ready = async {
        let mut agent = Agent::connect(&sock).await?;
        agent.send(&Request::hello(), &[]).await?;
        while !matches!(agent.next().await?, Event::Hello { .. }) {}
        Ok::<_, anyhow::Error>(agent)
    };
    let agent = match ready.await {
        Ok(agent) => agent,
        Err(e) => {
            drop(qemu);
            let _ = std::fs::remove_file(&ram_file);
            return Err(e);
        }
    };
    let boot = started.elapsed().as_secs_f64() * 1000.0;
    let vm = BareVm {
        agent,
        _qemu: qemu,
        ram,
        next_id: 1,
    };
    Ok((vm, boot))
}

fn exec_request(id: u64, argv: &[&str]) -> Request {
    Request::Exec {
        id,
        argv: argv.iter().map(|a| (*a).to_owned()).collect(),
        env: vec![],
        cwd: None,
        stdin: false,
        pty: None,
        timeout_ms: None,
    }
}

/// A shell loop in the guest spawning `/bin/true` `SPAWNS` times; prints µs per spawn.
fn spawn_loop() -> String {
    format!(
        "a=$(date +%s%N); i=0; while [ $i -lt {SPAWNS} ]; do /bin/true; i=$((i+1)); done; \
         b=$(date +%s%N); echo $(( (b-a)/{} ))",
        SPAWNS * 1000
    )
}

impl BareVm {
    /// Runs `argv` over the agent protocol; its stdout, after a clean exit.
    async fn exec(&mut self, argv: &[&str]) -> Result<Vec<u8>> {
        self.next_id += 1;
        self.agent
            .send(&exec_request(self.next_id, argv), &[])
            .await?;
        let mut out = Vec::new();
        loop {
            let f = self.agent.frame().await?;
            match f.message {
                Event::Output { .. } => out.extend_from_slice(&f.payload),
                Event::Exited { code: Some(0), .. } => return Ok(out),
                Event::Exited { code, signal, .. } => {
                    bail!("{argv:?} failed in the guest: code {code:?}, signal {signal:?}")
                }
                Event::Error { message, .. } => bail!("{argv:?} in the guest: {message}"),
                _ => {}
            }
        }
    }

    async fn ping(&mut self) -> Result<()> {
        self.next_id += 1;
        let id = self.next_id;
        self.agent.send(&Request::Ping { id }, &[]).await?;
        while !matches!(self.agent.next().await?, Event::Done { .. }) {}
        Ok(())
    }

    /// ms per `/bin/true` spawned by a shell loop in the guest.
    async fn spawn_loop(&mut self) -> Result<f64> {
        let out = self.exec(&["/bin/sh", "-c", &spawn_loop()]).await?;
        let text = String::from_utf8_lossy(&out);
        let us: f64 = text.trim().parse().with_context(|| {
            format!("the in-guest spawn loop printed {text:?}, not microseconds")
        })?;
        Ok(us / 1000.0)
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Exec round trips with a bare VM and a hearthd VM both booted and idle, calls alternating
/// between them so load on the machine hits both alike; then the in-guest spawn loops.
async fn exec_phase(daemon: &Hearthd, image: &Path, work: &Path, s: &mut Samples) -> Result<()> {
    let (mut bare, _) = boot_bare(image, work).await?;
    let name = "bench-exec";
    daemon.create(name).await?;
    let result = async {
        // Warm both guests' caches first.
        for _ in 0..20 {
            bare.exec(&["true"]).await?;
            daemon.exec_true(name).await?;
        }
        for _ in 0..EXECS {
            let t = Instant::now();
            daemon.exec_true(name).await?;
            s.api_exec.push(ms_since(t));
            let t = Instant::now();
            bare.exec(&["true"]).await?;
            s.proto_exec.push(ms_since(t));
            let t = Instant::now();
            bare.ping().await?;
            s.ping.push(ms_since(t));
        }
        for _ in 0..SPAWN_LOOPS {
            s.spawn.push(bare.spawn_loop().await?);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let deleted = daemon.delete(name).await;
    result?;
    deleted
}

/// A hearthd of the bench's own.
struct Hearthd {
    proc: Proc,
    data: PathBuf,
    http: reqwest::Client,
    /// `http://` and its listen address.
    url: String,
    /// False when started with `HEARTH_NETWORK_MODE=off`.
    networked: bool,
}

impl Hearthd {
    /// Starts hearthd on `data`, listening on `listen`, with `env` on top of the bench's
    /// settings.
    async fn start(
        bin: &Path,
        data: &Path,
        agent: &Path,
        listen: &str,
        env: &[(&str, &str)],
    ) -> Result<Hearthd> {
        let log = File::create(data.join("hearthd-bench.log"))?;
        let child = Command::new(bin.join("hearthd"))
            .env("HEARTH_DATA_DIR", data)
            .env("HEARTH_LISTEN", listen)
            .env("HEARTH_IMAGE_AGENT_PATH", agent)
            .env("HEARTH_GUEST_MEMORY", "256M")
            .env("HEARTH_GUEST_ROOTFS_SIZE", ROOTFS_SIZE)
            // 10 VMs of 1 vCPU on a 2-core host exceed the default 400 %.
            .env("HEARTH_CAPACITY_CPU_OVERCOMMIT_PERCENT", "1000")
            .envs(env.iter().copied())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let daemon = Hearthd {
            proc: Proc(child),
            data: data.to_owned(),
            http: reqwest::Client::new(),
            url: format!("http://{listen}"),
            networked: !env.contains(&("HEARTH_NETWORK_MODE", "off")),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let url = &daemon.url;
            let healthy = match daemon.http.get(format!("{url}/v1/health")).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|h| h["image"].is_string()),
                Err(_) => false,
            };
            if healthy {
                daemon.spare_ready().await?;
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
        self.exec_body(name, json!({ "command": cmd })).await
    }

    async fn exec_body(&self, name: &str, body: Value) -> Result<Value> {
        let url = &self.url;
        let r = self
            .http
            .post(format!("{url}/v1/vms/{name}/exec"))
            .json(&body)
            .send()
            .await?;
        Ok(r.json().await?)
    }

    /// `bytes` zeros from VM `name` to the outside namespace's sink, over bash's /dev/tcp.
    async fn guest_transfer(&self, name: &str, bytes: u64) -> Result<()> {
        let script = net::guest_transfer_script(bytes);
        let body = json!({ "command": ["bash", "-c", script], "timeout_secs": 300 });
        let out = self.exec_body(name, body).await?;
        if out["exit_code"] != 0 {
            bail!("the transfer from the guest failed: {out}");
        }
        Ok(())
    }

    /// `GET /v1/vms/{name}`.
    async fn detail(&self, name: &str) -> Result<Value> {
        let url = &self.url;
        let r = self.http.get(format!("{url}/v1/vms/{name}")).send().await?;
        if !r.status().is_success() {
            bail!("GET of VM {name} failed: {}", r.text().await?);
        }
        Ok(r.json().await?)
    }

    /// Waits until hearthd's spare root disk is ready, so its making competes with no boot
    /// (bare or hearthd's) and every create takes it, as on a machine that was idle.
    async fn spare_ready(&self) -> Result<()> {
        let dir = self.data.join("spare");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "ext4"));
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "hearthd made no spare disk in {} within 120 s",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn rss(&self) -> Result<f64> {
        let pid = self.proc.0.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        rss_mb(&status).with_context(|| format!("no VmRSS in /proc/{pid}/status"))
    }

    async fn create(&self, name: &str) -> Result<Value> {
        create(&self.http, &self.url, name).await
    }

    async fn delete(&self, name: &str) -> Result<()> {
        delete(&self.http, &self.url, name).await
    }

    async fn exec_true(&self, name: &str) -> Result<()> {
        let out = self.exec(name, json!(["true"])).await?;
        if out["exit_code"] != 0 {
            bail!("exec failed: {out}");
        }
        Ok(())
    }

    /// Create → first exec output, with its breakdown; the VM is deleted after.
    async fn round(&self, name: &str) -> Result<Boot> {
        let started = Instant::now();
        let result = async {
            let detail = self.create(name).await?;
            let created = ms_since(started);
            let out = self.exec(name, json!(["echo", "ready"])).await?;
            if out["stdout"] != "ready\n" {
                bail!("unexpected exec answer {out}");
            }
            let total = ms_since(started);
            let ready = agent_ready_ms(&detail).with_context(|| {
                format!("no \"guest agent ready in N ms\" event in the create answer {detail}")
            })?;
            // Not timed: the network setup from the VM's events.
            let detail = self.detail(name).await?;
            Ok(Boot {
                total,
                create: created,
                ready,
                network: network_setup_ms(&detail),
            })
        }
        .await;
        let deleted = self.delete(name).await;
        let boot = result?;
        deleted?;
        Ok(boot)
    }

    /// Starts `n` VMs at once, lets hearthd idle with them running, and returns its RSS in MB;
    /// the VMs are deleted before it returns.
    async fn fleet(&self, n: usize) -> Result<f64> {
        let names: Vec<String> = (0..n).map(|i| format!("rss-{i}")).collect();
        let created = self.each(&names, true).await;
        let rss = match created {
            Ok(()) => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                self.rss()
            }
            Err(e) => Err(e),
        };
        let deleted = self.each(&names, false).await;
        let rss = rss?;
        deleted?;
        Ok(rss)
    }

    /// Creates (or deletes) every VM of `names` concurrently; the first failure, after all ended.
    async fn each(&self, names: &[String], create_them: bool) -> Result<()> {
        let mut set = tokio::task::JoinSet::new();
        for name in names {
            let (http, url, name) = (self.http.clone(), self.url.clone(), name.clone());
            set.spawn(async move {
                if create_them {
                    create(&http, &url, &name).await.map(|_| ())
                } else {
                    delete(&http, &url, &name).await
                }
            });
        }
        let mut result = Ok(());
        while let Some(r) = set.join_next().await {
            let r = r.map_err(anyhow::Error::from).and_then(|r| r);
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

async fn create(http: &reqwest::Client, url: &str, name: &str) -> Result<Value> {
    let r = http
        .post(format!("{url}/v1/vms"))
        .json(&json!({ "name": name }))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("create of {name} failed: {}", r.text().await?);
    }
    Ok(r.json().await?)
}

/// Deletes VM `name`; one that does not exist (its create failed) is fine.
async fn delete(http: &reqwest::Client, url: &str, name: &str) -> Result<()> {
    let r = http.delete(format!("{url}/v1/vms/{name}")).send().await?;
    if !r.status().is_success() && r.status() != reqwest::StatusCode::NOT_FOUND {
        bail!("delete of {name} failed: {}", r.text().await?);
    }
    Ok(())
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

    #[test]
    fn spreads_and_ratios_are_per_round() {
        let s = Spread::of(&[5.0, 1.0, 9.0, 3.0, 7.0]);
        assert_eq!(
            s,
            Spread {
                min: 1.0,
                median: 5.0,
                max: 9.0
            }
        );
        // Round by round, not a ratio of medians: 1.0 and 3.0 pair with 2.0 and 1.0.
        assert_eq!(ratios(&[2.0, 3.0], &[2.0, 1.0]), vec![1.0, 3.0]);
    }

    #[test]
    fn rss_is_read_from_proc_status() {
        let status = "Name:\thearthd\nVmPeak:\t  99999 kB\nVmRSS:\t   20000 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(rss_mb(status), Some(20.48));
        assert_eq!(rss_mb("Name:\tx\n"), None);
    }

    #[test]
    fn the_agent_ready_time_comes_from_the_running_event() {
        let detail = json!({ "events": [
            { "kind": "created", "message": null },
            { "kind": "pid", "message": "VMM pid 7 launched" },
            { "kind": "running", "message": "guest agent ready in 2875 ms (pid 7, boot ab)" },
        ]});
        assert_eq!(agent_ready_ms(&detail), Some(2875.0));
        assert_eq!(agent_ready_ms(&json!({ "events": [] })), None);
    }

    #[test]
    fn the_network_setup_comes_from_the_vmm_launched_event() {
        let detail = json!({ "events": [
            { "kind": "created", "message": null },
            { "kind": "vmm_launched", "message": "network slot ready in 37 ms; VMM pid 7 launched" },
            { "kind": "running", "message": "guest agent ready in 2875 ms (pid 7, boot ab)" },
        ]});
        assert_eq!(network_setup_ms(&detail), Some(37.0));
        // Networking off: the event names the VMM only.
        let off = json!({ "events": [
            { "kind": "vmm_launched", "message": "VMM pid 7 launched" },
        ]});
        assert_eq!(network_setup_ms(&off), None);
        assert_eq!(network_setup_ms(&json!({ "events": [] })), None);
    }

    #[test]
    fn boots_are_recorded_by_which_hearthd_made_them() {
        let mut s = Samples::default();
        let b = Boot {
            total: 3000.0,
            create: 2500.0,
            ready: 2400.0,
            network: Some(30.0),
        };
        s.record(true, b).unwrap();
        s.record(
            false,
            Boot {
                network: None,
                total: 2900.0,
                ..b
            },
        )
        .unwrap();
        assert_eq!(
            (s.hearthd, s.create, s.first_exec, s.net_setup),
            (vec![3000.0], vec![2500.0], vec![500.0], vec![30.0])
        );
        assert_eq!(
            (s.off, s.off_create, s.off_ready),
            (vec![2900.0], vec![2500.0], vec![2400.0])
        );
        let mut s = Samples::default();
        assert!(s.record(true, Boot { network: None, ..b }).is_err());
        assert!(s.record(false, b).is_err());
    }

    #[test]
    fn the_spawn_loop_prints_microseconds_per_spawn() {
        let script = spawn_loop();
        assert!(script.contains(&format!("-lt {SPAWNS} ]")), "{script}");
        assert!(
            script.contains(&format!("/{} ))", SPAWNS * 1000)),
            "{script}"
        );
    }
}
