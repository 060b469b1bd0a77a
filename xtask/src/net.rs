//! The bench's network figures that need more than hearthd's API:
//!
//! - slot setup straight through a `hearth-helper` of the bench's own (`CreateSlot` +
//!   `OpenServices` + `ApplyHostRules` + `OpenTap`), with 1 and with [`LOADED`] slots already
//!   there;
//! - TCP throughput to a sink in an "outside" namespace ([`Outside`]), linked to the bench's
//!   namespace (which plays the host) by a veth pair, from a guest through its slot and from the
//!   bench's namespace itself.
//!
//! Every namespace, slot and process made here is removed (processes ended by PID) before the
//! phase returns; no packet leaves the bench's namespaces.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hearth_helper::client::Client;
use hearth_helper::proto::{
    self, Cidr, EgressRules, HostRules, HostSlot, Request, Response, SlotId, SlotSpec,
};

use crate::{Proc, ms_since, run};

/// Measured slot setups with each number of slots already there, in [`BLOCKS`] blocks that
/// alternate between the two (each after one not counted), so drift hits both alike.
pub const SETUPS: usize = 10;
const BLOCKS: usize = 2;
/// Slots already there for the second series.
pub const LOADED: u32 = 50;
/// hearthd's default network for the VMs.
fn cidr() -> Cidr {
    Cidr::new(Ipv4Addr::new(172, 28, 0, 0), 16).expect("172.28.0.0/16 is a network")
}

/// The bench namespace's end of the link to the outside namespace, and the outside's address.
pub const HOST_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The host end of that link (not `hv…`: the host rules take those for VMs).
const HOST_LINK: &str = "hbout";
pub const SINK_PORT: u16 = 5201;
/// Bytes of one counted transfer, and of the warm-up one before each series.
pub const TRANSFER_BYTES: u64 = 64 << 20;
pub const WARM_UP_BYTES: u64 = 1 << 20;
/// Counted transfers of each kind (guest, plain namespace), alternating.
pub const TRANSFERS: usize = 3;

/// The helper bench's hearthd instance: 8 lowercase hex digits, from the bench's PID.
pub fn instance() -> String {
    format!("be{:06x}", std::process::id() & 0xff_ffff)
}

/// Slot number `index` of the helper bench: its own VM id and /30 of 172.28.0.0/16. The VM
/// id's first 13 digits (which name the host veth) hold the index.
pub fn bench_slot(instance: &str, index: u32) -> HostSlot {
    let base = u32::from(cidr().addr()) + index * 4;
    HostSlot {
        slot: SlotId {
            instance: instance.to_owned(),
            vm: format!("{index:04x}000000000bec"),
        },
        host_addr: Ipv4Addr::from(base + 1),
        vm_addr: Ipv4Addr::from(base + 2),
    }
}

/// What the helper bench measured, in ms per slot setup.
#[derive(Debug, Default)]
pub struct SetupFigures {
    /// With one slot there.
    pub one: Vec<f64>,
    /// With [`LOADED`] slots there.
    pub loaded: Vec<f64>,
}

/// Starts `binary` as a helper of the bench's own (in the calling thread's namespace, which
/// must live as long as the helper: `--die-with-parent` follows the thread), times one slot's
/// setup with 1 and with [`LOADED`] slots there, and removes every slot and rule it made.
/// Run it while no hearthd is running in the namespace: the host rule table is one per
/// namespace.
pub fn helper_setup(binary: &Path, log: &Path) -> Result<SetupFigures> {
    let socket =
        std::env::temp_dir().join(format!("hearth-bench-helper-{}.sock", std::process::id()));
    let child = Command::new(binary)
        .arg("--socket")
        .arg(&socket)
        .arg("--die-with-parent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut helper = Proc(child);
    let instance = instance();
    let result = connect(&socket, &mut helper).and_then(|client| {
        let mut bench = SlotBench {
            client,
            socket: socket.clone(),
            instance: instance.clone(),
            made: BTreeSet::new(),
        };
        let figures = bench.measure();
        let cleaned = bench.clean();
        let figures = figures?;
        cleaned?;
        Ok(figures)
    });
    drop(helper);
    // Should the helper have gone before it removed them: no slot of the bench's outlives it.
    sweep_slots(&instance);
    let _ = std::fs::remove_file(&socket);
    result.with_context(|| format!("the helper bench (helper log: {})", log.display()))
}

/// Waits (10 s at most) until the helper answers on `socket`, and checks its protocol.
fn connect(socket: &Path, helper: &mut Proc) -> Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        if let Some(status) = helper.0.try_wait()? {
            bail!("hearth-helper exited at once ({status})");
        }
        match Client::connect(socket) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e).context("hearth-helper's socket did not answer within 10 s"),
        }
    };
    match client.call_ok(&Request::Hello)?.0 {
        Response::Hello { version, .. } if version == proto::PROTOCOL_VERSION => Ok(client),
        other => bail!("hearth-helper answered hello with {other:?}"),
    }
}

/// Removes every slot namespace of `instance` still there.
fn sweep_slots(instance: &str) {
    let prefix = format!("hearth-{instance}-");
    let names: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    for name in names {
        eprintln!("bench: removing the helper bench's leftover namespace {name}");
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
    }
}

struct SlotBench {
    client: Client,
    socket: PathBuf,
    instance: String,
    /// Slots made and not yet deleted.
    made: BTreeSet<SlotId>,
}

impl SlotBench {
    fn call(&mut self, request: &Request) -> Result<Response> {
        let (response, _) = self.client.call_ok(request)?;
        Ok(response)
    }

    fn spec(&self, slot: &HostSlot) -> SlotSpec {
        SlotSpec {
            slot: slot.slot.clone(),
            host_addr: slot.host_addr,
            vm_addr: slot.vm_addr,
            peers: cidr(),
            egress: EgressRules::default(),
        }
    }

    /// The whole host rule set with `slots`, as hearthd applies it at each attach and detach.
    fn apply(&mut self, slots: &[HostSlot]) -> Result<()> {
        let rules = HostRules {
            instance: self.instance.clone(),
            cidr: cidr(),
            outbound: None,
            slots: slots.to_vec(),
            networks: vec![],
        };
        self.call(&Request::ApplyHostRules { rules })?;
        Ok(())
    }

    fn create(&mut self, slot: &HostSlot) -> Result<()> {
        let spec = self.spec(slot);
        self.made.insert(slot.slot.clone());
        self.call(&Request::CreateSlot { spec })?;
        Ok(())
    }

    fn delete(&mut self, slot: &SlotId) -> Result<()> {
        self.call(&Request::DeleteSlot { slot: slot.clone() })?;
        self.made.remove(slot);
        Ok(())
    }

    fn measure(&mut self) -> Result<SetupFigures> {
        self.call(&Request::Setup {
            instance: self.instance.clone(),
            cidr: cidr(),
        })?;
        let mut next = 0;
        let mut there: Vec<HostSlot> = Vec::new();
        let mut figures = SetupFigures::default();
        for block in 0..BLOCKS {
            for (count, series) in [(1, &mut figures.one), (LOADED, &mut figures.loaded)] {
                // Slots are added (or removed) one at a time, as VMs start and stop.
                while there.len() < count as usize {
                    let slot = bench_slot(&self.instance, next);
                    next += 1;
                    self.create(&slot)?;
                    there.push(slot);
                    self.apply(&there)?;
                }
                while there.len() > count as usize {
                    let slot = there.pop().expect("more than count slots");
                    self.delete(&slot.slot)?;
                    self.apply(&there)?;
                }
                eprintln!(
                    "bench: slot setup through hearth-helper with {count} slot(s) there (block {} of {BLOCKS})",
                    block + 1
                );
                // One not counted first.
                for i in 0..=SETUPS / BLOCKS {
                    let slot = bench_slot(&self.instance, next);
                    next += 1;
                    let ms = self.setup_one(&there, &slot)?;
                    if i > 0 {
                        series.push(ms);
                    }
                    self.delete(&slot.slot)?;
                    self.apply(&there)?;
                    // Let the kernel finish with the deleted namespace before the next setup.
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }
        Ok(figures)
    }

    /// ms for the helper's part of hearthd's attach of `slot`, with `there` already there:
    /// the slot, its service sockets, the whole host rule set, the TAP (the descriptors closed
    /// after).
    fn setup_one(&mut self, there: &[HostSlot], slot: &HostSlot) -> Result<f64> {
        let mut all = there.to_vec();
        all.push(slot.clone());
        let started = Instant::now();
        self.create(slot)?;
        let (services, sockets) = self.client.call_ok(&Request::OpenServices {
            slot: slot.slot.clone(),
        })?;
        self.apply(&all)?;
        let (tap, fds) = self.client.call_ok(&Request::OpenTap {
            slot: slot.slot.clone(),
        })?;
        let ms = ms_since(started);
        if services != Response::Services || sockets.len() != 3 {
            bail!("hearth-helper answered open_services with {services:?}");
        }
        match (tap, fds.len()) {
            (Response::Tap { .. }, 1) => drop(fds),
            (other, _) => bail!("hearth-helper answered open_tap with {other:?}"),
        }
        Ok(ms)
    }

    /// Deletes every slot made, and the host rules, on a new connection (the old one may be
    /// broken by what failed).
    fn clean(&mut self) -> Result<()> {
        let mut client = Client::connect(&self.socket)?;
        let mut first_error = None;
        for slot in std::mem::take(&mut self.made) {
            if let Err(e) = client.call_ok(&Request::DeleteSlot { slot }) {
                first_error.get_or_insert(e);
            }
        }
        let removed = client.call_ok(&Request::RemoveHostRules {
            instance: self.instance.clone(),
        });
        match (first_error, removed) {
            (Some(e), _) | (None, Err(e)) => Err(e.into()),
            (None, Ok(_)) => Ok(()),
        }
    }
}

/// The "outside world": a namespace behind a veth pair from the bench's namespace (which must
/// be the calling thread's), with a TCP sink in it. Removed, sink thread joined, when dropped.
pub struct Outside {
    ns: String,
    sink: Option<Sink>,
}

impl Outside {
    pub fn create() -> Result<Outside> {
        let ns = format!("hearth-bench-out-{}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &ns]))?;
        let mut out = Outside { ns, sink: None };
        let ns = out.ns.clone();
        let host = format!("{HOST_SIDE}/24");
        let outside = format!("{OUTSIDE}/24");
        for args in [
            &[
                "link", "add", HOST_LINK, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ][..],
            &["addr", "add", &host, "dev", HOST_LINK],
            &["link", "set", HOST_LINK, "up"],
            &["-n", &ns, "addr", "add", &outside, "dev", "eth0"],
            &["-n", &ns, "link", "set", "eth0", "up"],
            &["-n", &ns, "link", "set", "lo", "up"],
        ] {
            run(Command::new("ip").args(args))?;
        }
        out.sink = Some(Sink::start(&ns)?);
        Ok(out)
    }

    /// The next transfer the sink received, within `timeout`.
    pub fn received(&self, timeout: Duration) -> Result<Transfer> {
        let sink = self.sink.as_ref().context("the sink is not running")?;
        match sink.results.recv_timeout(timeout) {
            Ok(r) => r.map_err(anyhow::Error::msg),
            Err(_) => bail!("the sink received no transfer within {timeout:?}"),
        }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        // The sink's thread holds the namespace while it runs: it ends first.
        drop(self.sink.take());
        let _ = Command::new("ip")
            .args(["link", "del", HOST_LINK])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// One transfer as the sink saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transfer {
    pub bytes: u64,
    /// First byte to last byte.
    pub secs: f64,
}

impl Transfer {
    /// MB (10^6 bytes) per second.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs
    }
}

/// A thread in the outside namespace accepting on `OUTSIDE:SINK_PORT` and counting each
/// connection's bytes; stopped and joined when dropped.
struct Sink {
    stop: Arc<AtomicBool>,
    results: mpsc::Receiver<Result<Transfer, String>>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    fn start(ns: &str) -> Result<Sink> {
        let netns = File::open(format!("/run/netns/{ns}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (results_tx, results) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("sink".into())
                .spawn(move || {
                    let listener = nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| format!("setns into the outside namespace: {e}"))
                        .and_then(|()| {
                            TcpListener::bind((OUTSIDE, SINK_PORT))
                                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                                .map_err(|e| format!("listening on {OUTSIDE}:{SINK_PORT}: {e}"))
                        });
                    let listener = match listener {
                        Ok(l) => {
                            let _ = ready_tx.send(Ok(()));
                            l
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((stream, _)) => {
                                let _ = results_tx.send(receive(stream));
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(2));
                            }
                            Err(e) => {
                                let _ = results_tx.send(Err(format!("accept: {e}")));
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                })?
        };
        let sink = Sink {
            stop,
            results,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(sink),
            Ok(Err(e)) => bail!("the sink could not start: {e}"),
            Err(_) => bail!("the sink's thread ended at once"),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads a connection to its end; the bytes, first byte to last.
fn receive(mut stream: TcpStream) -> Result<Transfer, String> {
    let e = |e: std::io::Error| e.to_string();
    stream.set_nonblocking(false).map_err(e)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(e)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut first, mut last, mut bytes) = (None, None, 0u64);
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                bytes += n as u64;
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(format!("receiving: {err}")),
        }
    }
    match (first, last) {
        (Some(f), Some(l)) if l > f => Ok(Transfer {
            bytes,
            secs: (l - f).as_secs_f64(),
        }),
        _ => Err(format!(
            "a transfer of {bytes} bytes took no measurable time"
        )),
    }
}

/// Sends `bytes` zeros to the sink from the calling thread's namespace (the bench's).
pub fn plain_transfer(bytes: u64) -> Result<()> {
    let mut stream = TcpStream::connect((OUTSIDE, SINK_PORT))
        .with_context(|| format!("connecting to the sink at {OUTSIDE}:{SINK_PORT}"))?;
    let buf = vec![0u8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(())
}

/// The guest's side of a transfer: bash's /dev/tcp to the sink, `bytes` zeros from head.
pub fn guest_transfer_script(bytes: u64) -> String {
    format!("exec 3<>/dev/tcp/{OUTSIDE}/{SINK_PORT}; head -c {bytes} /dev/zero >&3")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_slots_have_distinct_slash_30s_and_host_veths() {
        let instance = "be00abcd";
        let slots: Vec<HostSlot> = (0..200).map(|i| bench_slot(instance, i)).collect();
        let veths: BTreeSet<String> = slots.iter().map(|s| s.slot.host_veth()).collect();
        assert_eq!(veths.len(), slots.len());
        for (i, s) in (0u32..).zip(&slots) {
            hearth_helper::validate::slot_id("slot", &s.slot).unwrap();
            assert!(cidr().contains(s.host_addr) && cidr().contains(s.vm_addr));
            assert_eq!(u32::from(s.host_addr) % 4, 1, "{s:?}");
            assert_eq!(u32::from(s.vm_addr), u32::from(s.host_addr) + 1);
            assert_eq!(u32::from(s.host_addr), u32::from(cidr().addr()) + 4 * i + 1);
        }
        assert_eq!(slots[64].host_addr, Ipv4Addr::new(172, 28, 1, 1));
        hearth_helper::validate::instance("instance", &super::instance()).unwrap();
    }

    #[test]
    fn transfers_are_in_mb_per_second() {
        let t = Transfer {
            bytes: 64 << 20,
            secs: 2.0,
        };
        assert!((t.mb_per_s() - 33.554_432).abs() < 1e-9);
        assert_eq!(
            guest_transfer_script(67_108_864),
            "exec 3<>/dev/tcp/198.51.100.2/5201; head -c 67108864 /dev/zero >&3"
        );
    }
}
