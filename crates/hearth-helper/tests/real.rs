//! The real helper, as root, in a network namespace of the test's own that plays the host.
//!
//! The helper is started inside that namespace by entering only its network namespace
//! (`setns` before `exec`), not with `ip netns exec`: that one also gives the program a private
//! mount namespace, so the slot namespaces the helper mounts under `/run/netns` would be
//! invisible outside it.
//!
//! A guest is played by a namespace of the test's joined to the slot by a veth pair whose slot
//! end is called `tap0` ([`attach_guest`]): the slot's rules know the TAP by its name, and the
//! stand-in carries real sockets, so connections are opened and followed through the slot and
//! the host. The world outside is one more namespace behind the host ([`attach_outside`]).
//!
//! Everything the test makes (its namespaces, the slots' namespaces, the helper, a temporary
//! directory) is removed by a drop guard, also when an assertion fails; all traffic stays
//! inside the test's namespaces. The threads a test starts end by themselves.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hearth_helper::client::Client;
use hearth_helper::proto::{
    EgressMode, EgressRules, ErrorKind, GATEWAY_ADDR, GUEST_ADDR, HostRules, HostSlot,
    METADATA_ADDR, PROTOCOL_VERSION, PrivateNetwork, Request, Response, SlotId, SlotSpec,
};
use nix::sched::{CloneFlags, setns};

const NETNS_DIR: &str = "/run/netns";
/// The VMs' network in every test.
const CIDR: &str = "172.30.0.0/16";
const CIDR_BASE: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 0);
/// A server out in the world ([`attach_outside`]).
const WORLD: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// An address of the world outside on another network the host routes ([`attach_outside`]).
const SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The host's address towards the world outside.
const HOST_WAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// How long a connection attempt that should fail is given.
const SHORT: Duration = Duration::from_millis(700);

/// Runs `ip args…` and returns its output; panics with its error output when it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True when `ip args…` succeeds.
fn ip_ok(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `nft args…` inside the namespace (nft needs nothing of the mount namespace).
fn nft_in(netns: &str, args: &[&str]) -> Option<String> {
    let mut all = vec!["netns", "exec", netns, "nft"];
    all.extend(args);
    let out = Command::new("ip").args(&all).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `work` on a thread that has entered the namespace.
fn in_netns<T: Send>(netns: &str, work: impl FnOnce() -> T + Send) -> T {
    let file = File::open(Path::new(NETNS_DIR).join(netns)).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
            work()
        })
        .join()
        .unwrap()
    })
}

fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a test made; dropping it removes all of it.
struct World {
    host: String,
    /// The host namespace, open for the helpers' `setns`.
    host_fd: OwnedFd,
    instance: String,
    dir: PathBuf,
    /// Every helper started, ended by its own pid at the end.
    helpers: Vec<Child>,
}

impl World {
    /// A host namespace `hearth-test-<pid>-<tag>` and a temporary directory.
    fn new(tag: &str, instance_digit: char) -> World {
        assert!(
            nix::unistd::geteuid().is_root(),
            "tests/real.rs runs the real helper and needs root (network namespaces, veth, TAP, nftables); run `cargo test -p hearth-helper` as root"
        );
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("hearth-helper-test-{pid}-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let host = format!("hearth-test-{pid}-{tag}");
        ip(&["netns", "add", &host]);
        let host_fd = File::open(Path::new(NETNS_DIR).join(&host)).unwrap().into();
        World {
            host,
            host_fd,
            instance: format!("{:07x}{instance_digit}", pid & 0xfff_ffff),
            dir,
            helpers: Vec::new(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("helper.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("helper.log")).unwrap_or_default()
    }

    /// The helper binary with `args`, to run inside the host namespace (entered alone, see the
    /// module documentation), as `uid` when given; its log goes to `log`.
    fn command(&self, args: &[&str], uid: Option<libc::uid_t>, log: &str) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hearth-helper"));
        command
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(self.dir.join(log)).unwrap());
        let netns = self.host_fd.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec. It makes only system
        // calls (setns, setgid, setuid: async-signal-safe, no allocation, no lock) on a
        // descriptor `self` keeps open until after the spawn, and builds an io::Error from
        // errno, which does not allocate.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(uid) = uid
                    && (libc::setgid(uid) != 0 || libc::setuid(uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }

    /// Starts the helper on [`World::socket`] and waits until it answers.
    fn start_helper(&mut self, extra: &[&str]) -> u32 {
        let socket = self.socket();
        let mut args = vec!["--socket", socket.to_str().unwrap()];
        args.extend(extra);
        let child = self
            .command(&args, None, "helper.log")
            .spawn()
            .expect("spawn the helper");
        let pid = child.id();
        self.helpers.push(child);
        wait_until("the helper listens", Duration::from_secs(10), || {
            Client::connect(&socket).is_ok()
        });
        pid
    }

    /// Runs the helper expecting it to refuse to start: its exit status and log.
    fn refused_start(&mut self, args: &[&str], uid: Option<libc::uid_t>) -> (i32, String) {
        let mut child = self.command(args, uid, "refused.log").spawn().unwrap();
        let mut status = None;
        wait_until("the helper gives up", Duration::from_secs(10), || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        let log = std::fs::read_to_string(self.dir.join("refused.log")).unwrap();
        (status.unwrap().code().unwrap_or(-1), log)
    }

    /// Sends SIGTERM to the helper `pid` started, and returns its exit status.
    fn stop_helper(&mut self, pid: u32) -> std::process::ExitStatus {
        let at = self.helpers.iter().position(|c| c.id() == pid).unwrap();
        let mut child = self.helpers.remove(at);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let mut status = None;
        wait_until("the helper exits", Duration::from_secs(10), || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }

    /// One more namespace of the test's, `<host>-<tag>` (a guest, the world outside).
    fn aux(&self, tag: &str) -> String {
        let name = format!("{}-{tag}", self.host);
        ip(&["netns", "add", &name]);
        name
    }

    /// The namespaces under /run/netns that are this test's.
    fn leftovers(&self) -> Vec<String> {
        let slot_prefix = format!("hearth-{}-", self.instance);
        let aux_prefix = format!("{}-", self.host);
        let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| {
                        n == &self.host || n.starts_with(&slot_prefix) || n.starts_with(&aux_prefix)
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The slot spec of the test's slot `index`: its own VM id, the `index`th /30 of [`CIDR`].
    fn spec(&self, index: u32, egress: EgressRules) -> SlotSpec {
        let host_addr = Ipv4Addr::from(u32::from(CIDR_BASE) + 4 * index + 1);
        SlotSpec {
            slot: SlotId {
                instance: self.instance.clone(),
                // The index first: the host veth's name is made of the first 13 digits.
                vm: format!("{index:06x}{:010x}", std::process::id()),
            },
            host_addr,
            vm_addr: Ipv4Addr::from(u32::from(host_addr) + 1),
            peers: CIDR.parse().unwrap(),
            egress,
        }
    }

    /// The host rules for `specs`, with `networks`.
    fn rules(&self, specs: &[&SlotSpec], networks: Vec<PrivateNetwork>) -> HostRules {
        HostRules {
            instance: self.instance.clone(),
            cidr: CIDR.parse().unwrap(),
            outbound: None,
            slots: specs
                .iter()
                .map(|s| HostSlot {
                    slot: s.slot.clone(),
                    host_addr: s.host_addr,
                    vm_addr: s.vm_addr,
                })
                .collect(),
            networks,
        }
    }

    /// Starts a helper, connects, and binds it to this test's instance and [`CIDR`].
    fn connect(&mut self) -> Client {
        self.start_helper(&[]);
        let mut c = Client::connect(self.socket()).unwrap();
        done(
            &mut c,
            Request::Setup {
                instance: self.instance.clone(),
                cidr: CIDR.parse().unwrap(),
            },
        );
        c
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for mut child in self.helpers.drain(..) {
            // Ended by its own pid, never by name.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
        }
        for netns in self.leftovers() {
            let _ = Command::new("ip")
                .args(["netns", "delete", &netns])
                .stderr(Stdio::null())
                .status();
        }
        if std::thread::panicking() {
            eprintln!("--- helper log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The MAC address of a link in a namespace.
fn mac_of(netns: &str, link: &str) -> [u8; 6] {
    let text = ip(&["-n", netns, "-j", "link", "show", "dev", link]);
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let address = json[0]["address"].as_str().unwrap();
    let mut mac = [0u8; 6];
    for (byte, hex) in mac.iter_mut().zip(address.split(':')) {
        *byte = u8::from_str_radix(hex, 16).unwrap();
    }
    mac
}

/// A UDP datagram from the guest (port 40000) as the VMM writes it to the TAP: an empty
/// virtio-net header (the TAP has IFF_VNET_HDR), Ethernet from the guest's MAC, IPv4, UDP
/// without a checksum.
fn guest_udp_frame(
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = vec![0u8; 10];
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&[0x06, 0x00, 0x0a, 0xfe, 0xfe, 0x02]);
    frame.extend_from_slice(&[0x08, 0x00]);
    let total = u16::try_from(20 + 8 + payload.len()).unwrap();
    let mut header = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    header[2..4].copy_from_slice(&total.to_be_bytes());
    header.extend_from_slice(&src.octets());
    header.extend_from_slice(&dst.octets());
    let sum = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !u16::try_from((folded & 0xffff) + (folded >> 16)).unwrap();
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&(total - 20).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

fn call(client: &mut Client, request: &Request) -> Response {
    client.call(request).unwrap().0
}

#[track_caller]
fn done(client: &mut Client, request: Request) {
    assert_eq!(call(client, &request), Response::Done, "{request:?}");
}

/// Makes a stand-in guest for the slot `slot` (see the module documentation): a namespace
/// `<host>-<tag>` with the guest's address behind the slot's `tap0`. Returns its name.
fn attach_guest(w: &World, slot: &str, tag: &str) -> String {
    let guest = w.aux(tag);
    ip(&[
        "-n", slot, "link", "add", "name", "tap0", "type", "veth", "peer", "name", "eth0", "netns",
        &guest,
    ]);
    ip(&["-n", slot, "addr", "add", "10.254.254.1/30", "dev", "tap0"]);
    ip(&["-n", slot, "link", "set", "dev", "tap0", "up"]);
    for args in [
        &["addr", "add", "10.254.254.2/30", "dev", "eth0"][..],
        &["link", "set", "dev", "eth0", "up"],
        &["link", "set", "dev", "lo", "up"],
        &["route", "add", "default", "via", "10.254.254.1"],
    ] {
        let mut all = vec!["-n", guest.as_str()];
        all.extend(args);
        ip(&all);
    }
    guest
}

/// Makes the world outside the host: a namespace `<host>-net` behind the host's `wan0`
/// ([`HOST_WAN`], the host's default route) and `side0` (another network the host routes, as
/// a Docker bridge would be), with a server's address ([`WORLD`]), a link-local one (a cloud's
/// metadata service) and one of [`CIDR`] that is no slot's on its loopback, and a route to the
/// VMs' network through the host. Returns its name.
fn attach_outside(w: &World) -> String {
    let net = w.aux("net");
    let host = w.host.as_str();
    for (ours, theirs, our_addr, their_addr) in [
        ("wan0", "up0", "198.51.100.1/24", "198.51.100.2/24"),
        ("side0", "side1", "198.18.0.1/24", "198.18.0.2/24"),
    ] {
        ip(&[
            "-n", host, "link", "add", "name", ours, "type", "veth", "peer", "name", theirs,
            "netns", &net,
        ]);
        ip(&["-n", host, "addr", "add", our_addr, "dev", ours]);
        ip(&["-n", host, "link", "set", "dev", ours, "up"]);
        ip(&["-n", &net, "addr", "add", their_addr, "dev", theirs]);
        ip(&["-n", &net, "link", "set", "dev", theirs, "up"]);
    }
    ip(&["-n", host, "route", "add", "default", "via", "198.51.100.2"]);
    ip(&["-n", &net, "link", "set", "dev", "lo", "up"]);
    for addr in ["203.0.113.7/32", "169.254.1.1/32", "172.30.9.9/32"] {
        ip(&["-n", &net, "addr", "add", addr, "dev", "lo"]);
    }
    ip(&["-n", &net, "route", "add", CIDR, "via", "198.51.100.1"]);
    net
}

/// A TCP echo server in a namespace (the listener is made there; the threads serving it need
/// not be), noting who connects. It stops, with its threads, when dropped.
struct Echo {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(netns: &str, port: u16) -> Echo {
        let listener = in_netns(netns, || TcpListener::bind(("0.0.0.0", port)).unwrap());
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, peers) = (Arc::clone(&stop), Arc::clone(&peers));
            std::thread::spawn(move || {
                let mut served = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            peers.lock().unwrap().push(peer);
                            let stop = Arc::clone(&stop);
                            served.push(std::thread::spawn(move || echo(stream, &stop)));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(_) => break,
                    }
                }
                for thread in served {
                    let _ = thread.join();
                }
            })
        };
        Echo {
            stop,
            peers,
            thread: Some(thread),
        }
    }

    /// Who has connected so far.
    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends back what comes, until the peer closes or `stop` is set.
fn echo(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// A TCP connection from inside `netns` (a guest, the host, the world outside) to `to`.
fn connect_from(netns: &str, to: (Ipv4Addr, u16), timeout: Duration) -> io::Result<TcpStream> {
    in_netns(netns, || {
        TcpStream::connect_timeout(&SocketAddr::from(to), timeout)
    })
}

/// A byte no earlier [`echoes`] sent.
fn next_byte() -> u8 {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// True when a byte sent on the stream comes back within `wait` (bytes sent earlier that come
/// back late, once a path opens again, are skipped).
fn echoes(stream: &mut TcpStream, wait: Duration) -> bool {
    let byte = next_byte();
    stream.write_all(&[byte]).unwrap();
    let end = Instant::now() + wait;
    let mut buf = [0u8; 256];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) if buf[..n].contains(&byte) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(e) => panic!("the connection failed: {e}"),
        }
    }
}

/// Asserts that the connection attempt was dropped on the way (it timed out: not refused, not
/// unreachable).
#[track_caller]
fn assert_dropped(what: &str, result: io::Result<TcpStream>) {
    match result {
        Ok(_) => panic!("{what}: it connected"),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{what}: {e}"),
    }
}

/// Runs `work` on a thread that has entered the namespace and then become uid and gid 65534
/// (nobody), as a local user's process would be.
fn as_nobody_in<T: Send>(netns: &str, work: impl FnOnce() -> T + Send) -> T {
    in_netns(netns, || {
        let nobody = libc::c_long::from(65534u16);
        for call in [libc::SYS_setresgid, libc::SYS_setresuid] {
            // SAFETY: setresgid and setresuid take three ids and touch no memory. Made as raw
            // system calls they change the calling thread's credentials only (libc's
            // wrappers would change every thread's); this thread ends after `work`.
            let rc = unsafe { libc::syscall(call, nobody, nobody, nobody) };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        }
        work()
    })
}

/// Reads `/proc/sys/<key>` inside the namespace.
fn sysctl_in(netns: &str, key: &str) -> String {
    in_netns(netns, || {
        std::fs::read_to_string(Path::new("/proc/sys").join(key))
            .unwrap()
            .trim()
            .to_owned()
    })
}

/// The middle value of `samples` (sorted in place).
fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[test]
fn the_real_helper_makes_and_removes_a_slot() {
    let mut w = World::new("host", '1');
    let child_pid = w.start_helper(&[]);
    let mut c = Client::connect(w.socket()).unwrap();

    // The socket is 0660.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(w.socket()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o660);

    match call(&mut c, &Request::Hello) {
        Response::Hello {
            version,
            pid,
            nftables,
            ..
        } => {
            assert_eq!(version, PROTOCOL_VERSION);
            assert_eq!(pid, child_pid);
            assert!(nftables.starts_with("nftables v"), "{nftables}");
        }
        other => panic!("{other:?}"),
    }

    // Setup: forwarding on in the (test's) host namespace.
    done(
        &mut c,
        Request::Setup {
            instance: w.instance.clone(),
            cidr: CIDR.parse().unwrap(),
        },
    );
    assert_eq!(sysctl_in(&w.host, "net/ipv4/ip_forward"), "1");

    // A slot, twice (made, then found as it should be).
    let spec = w.spec(0, EgressRules::default());
    let (slot, host_addr, vm_addr) = (spec.slot.clone(), spec.host_addr, spec.vm_addr);
    let (netns, veth) = (slot.netns(), slot.host_veth());
    for _ in 0..2 {
        done(&mut c, Request::CreateSlot { spec: spec.clone() });
    }
    let eth0 = ip(&["-n", &netns, "-4", "addr", "show", "dev", "eth0"]);
    assert!(eth0.contains("inet 172.30.0.2/30"), "{eth0}");
    assert!(eth0.contains("state UP") || eth0.contains(",UP"), "{eth0}");
    let lo = ip(&["-n", &netns, "-4", "addr", "show", "dev", "lo"]);
    assert!(lo.contains("inet 169.254.169.254/32"), "{lo}");
    assert!(lo.contains("inet 127.0.0.1/8"), "{lo}");
    let host_end = ip(&["-n", &w.host, "-4", "addr", "show", "dev", &veth]);
    assert!(host_end.contains("inet 172.30.0.1/30"), "{host_end}");
    let route = ip(&["-n", &netns, "route", "show", "default"]);
    assert!(route.contains("via 172.30.0.1 dev eth0"), "{route}");
    for (key, value) in [
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv4/conf/all/rp_filter", "1"),
        ("net/ipv6/conf/all/disable_ipv6", "1"),
        ("net/ipv6/conf/default/disable_ipv6", "1"),
        ("net/netfilter/nf_conntrack_tcp_loose", "0"),
    ] {
        assert_eq!(sysctl_in(&netns, key), value, "{key}");
    }
    let no_ipv6 = ip(&["-n", &netns, "-6", "addr", "show"]);
    assert!(no_ipv6.trim().is_empty(), "{no_ipv6}");
    let slot_rules = nft_in(&netns, &["list", "table", "ip", "hearth"]).unwrap();
    for part in [
        "dnat to 10.254.254.2",
        "size 65536",
        "ct state invalid drop",
        "ct count over 16384",
        "ip daddr 172.30.0.1 ct direction reply accept",
    ] {
        assert!(slot_rules.contains(part), "{part}: {slot_rules}");
    }

    // The host rules, with their elements.
    let mut rules = w.rules(
        &[&spec],
        vec![PrivateNetwork {
            name: "db-tier".into(),
            members: vec![vm_addr],
        }],
    );
    rules.outbound = Some("eth9".into());
    done(
        &mut c,
        Request::ApplyHostRules {
            rules: rules.clone(),
        },
    );
    // Removed behind the helper's back (an `nft flush ruleset`, say), it comes back with the
    // next rule set, though that one changes nothing.
    assert!(nft_in(&w.host, &["flush", "ruleset"]).is_some());
    done(&mut c, Request::ApplyHostRules { rules });
    let host_rules = nft_in(&w.host, &["list", "table", "ip", "hearth"]).unwrap();
    for part in [
        format!("\"{veth}\" . 172.30.0.2"),
        "set net_db_tier".to_owned(),
        "oifname \"hv*\" meta skuid != 0 drop".to_owned(),
        "iifname != \"hv*\" ip daddr 172.30.0.0/16 drop".to_owned(),
        "iifname \"hv*\" ip daddr 169.254.0.0/16 drop".to_owned(),
        "iifname \"hv*\" oifname != \"eth9\" drop".to_owned(),
    ] {
        assert!(host_rules.contains(&part), "{part}: {host_rules}");
    }

    // From the slot, the host answers nothing: the host rules drop it (a connect times out
    // rather than being refused).
    let listener = in_netns(&w.host, || TcpListener::bind(("0.0.0.0", 18169)).unwrap());
    assert_dropped(
        "the slot to the host",
        connect_from(&netns, (host_addr, 18169), SHORT),
    );
    drop(listener);

    // The TAP lives as long as its descriptor; it has its address and is up, by ioctls.
    let (tap, mut fds) = c.call(&Request::OpenTap { slot: slot.clone() }).unwrap();
    assert_eq!(
        tap,
        Response::Tap {
            name: "tap0".into()
        }
    );
    assert_eq!(fds.len(), 1, "the TAP's descriptor");
    let fd = fds.remove(0);
    let mut fdinfo = String::new();
    File::open(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))
        .unwrap()
        .read_to_string(&mut fdinfo)
        .unwrap();
    assert!(fdinfo.contains("iff:\ttap0"), "not a TAP: {fdinfo}");
    let tap0 = ip(&["-n", &netns, "addr", "show", "dev", "tap0"]);
    assert!(tap0.contains("inet 10.254.254.1/30"), "{tap0}");
    assert!(tap0.contains(",UP"), "{tap0}");
    assert!(!tap0.contains("inet6"), "no IPv6 on the TAP: {tap0}");
    let inner = ip(&["-n", &netns, "route", "show", "10.254.254.0/30"]);
    assert!(inner.contains("dev tap0"), "{inner}");
    match call(&mut c, &Request::OpenTap { slot: slot.clone() }) {
        Response::Error {
            kind: ErrorKind::Failed,
            message,
        } => assert!(message.contains("still open"), "{message}"),
        other => panic!("a second TAP while the first is open: {other:?}"),
    }
    // A guest's DNS query, written to the TAP as a frame, reaches the DNS socket made in the
    // slot; one with a spoofed source does not.
    let (services, fds) = c
        .call(&Request::OpenServices { slot: slot.clone() })
        .unwrap();
    assert_eq!(services, Response::Services);
    assert_eq!(fds.len(), 3);
    let dns = std::net::UdpSocket::from(fds.into_iter().next().unwrap());
    dns.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let tap_mac = mac_of(&netns, "tap0");
    for (src, payload) in [
        (Ipv4Addr::new(10, 254, 254, 3), &b"spoofed"[..]),
        (Ipv4Addr::new(10, 254, 254, 2), &b"hearth-probe"[..]),
    ] {
        let frame = guest_udp_frame(tap_mac, src, Ipv4Addr::new(10, 254, 254, 1), 53, payload);
        assert_eq!(nix::unistd::write(&fd, &frame).unwrap(), frame.len());
    }
    let mut buf = [0u8; 64];
    let (n, from) = dns
        .recv_from(&mut buf)
        .expect("the guest's query reaches the DNS socket");
    assert_eq!(&buf[..n], b"hearth-probe", "the spoofed one was dropped");
    assert_eq!(
        from,
        SocketAddr::from((Ipv4Addr::new(10, 254, 254, 2), 40000))
    );
    drop(dns);
    drop(fd);
    wait_until(
        "tap0 goes with its descriptor",
        Duration::from_secs(5),
        || !ip_ok(&["-n", &netns, "link", "show", "dev", "tap0"]),
    );

    // Egress: a SetEgress forgets the resolved addresses (a removed domain's must not stay).
    let allow = |ttl_secs| Request::AllowResolved {
        slot: slot.clone(),
        addrs: vec![Ipv4Addr::new(198, 51, 100, 7)],
        ttl_secs,
    };
    done(&mut c, allow(600));
    let resolved = nft_in(&netns, &["list", "set", "ip", "hearth", "resolved"]).unwrap();
    assert!(resolved.contains("198.51.100.7 timeout"), "{resolved}");
    done(
        &mut c,
        Request::SetEgress {
            slot: slot.clone(),
            egress: EgressRules {
                mode: EgressMode::DenyAll,
                allow_cidrs: vec![
                    "192.0.2.0/24".parse().unwrap(),
                    "192.0.2.128/25".parse().unwrap(),
                ],
                deny_cidrs: vec!["192.0.2.64/26".parse().unwrap()],
                allow_ports: vec![443],
                domains: true,
            },
        },
    );
    let egress = nft_in(&netns, &["list", "table", "ip", "hearth"]).unwrap();
    assert!(!egress.contains("198.51.100.7"), "{egress}");
    assert!(
        egress.contains("ip daddr @resolved tcp dport @ports ct mark set 0x"),
        "{egress}"
    );
    assert!(egress.contains("192.0.2.0/24"), "{egress}");
    done(&mut c, allow(600));

    // A CreateSlot with that policy writes the whole table again: same egress, and the
    // resolved addresses start over (as documented).
    let deny_all = EgressRules {
        mode: EgressMode::DenyAll,
        allow_cidrs: vec!["192.0.2.0/24".parse().unwrap()],
        deny_cidrs: vec![
            "192.0.2.64/26".parse().unwrap(),
            "192.0.2.64/27".parse().unwrap(),
        ],
        allow_ports: vec![443, 80],
        domains: true,
    };
    done(
        &mut c,
        Request::CreateSlot {
            spec: SlotSpec {
                egress: deny_all,
                ..spec.clone()
            },
        },
    );
    let recreated = nft_in(&netns, &["list", "table", "ip", "hearth"]).unwrap();
    assert!(!recreated.contains("198.51.100.7"), "{recreated}");
    assert!(recreated.contains("elements = { 80, 443 }"), "{recreated}");

    // Listed, deleted (twice), gone.
    assert_eq!(
        call(
            &mut c,
            &Request::ListSlots {
                instance: w.instance.clone()
            }
        ),
        Response::Slots {
            slots: vec![slot.clone()]
        }
    );
    for _ in 0..2 {
        done(&mut c, Request::DeleteSlot { slot: slot.clone() });
    }
    assert!(!Path::new(NETNS_DIR).join(&netns).exists());
    assert!(!ip_ok(&["-n", &w.host, "link", "show", "dev", &veth]));
    assert_eq!(
        call(
            &mut c,
            &Request::ListSlots {
                instance: w.instance.clone()
            }
        ),
        Response::Slots { slots: vec![] }
    );
    for _ in 0..2 {
        done(
            &mut c,
            Request::RemoveHostRules {
                instance: w.instance.clone(),
            },
        );
    }
    assert!(nft_in(&w.host, &["list", "table", "ip", "hearth"]).is_none());

    // SIGTERM: a clean exit that takes the socket with it.
    drop(c);
    let status = w.stop_helper(child_pid);
    assert!(status.success(), "{status:?}\n{}", w.log());
    assert!(!w.socket().exists(), "the socket is removed");
    let log = w.log();
    assert!(log.contains("op=\"create_slot\""), "{log}");
    assert!(log.contains("uid=0"), "{log}");
    assert_eq!(w.leftovers(), [w.host.clone()]);
}

#[test]
fn setup_binds_the_helper_to_one_hearthd() {
    let mut w = World::new("setup", '3');
    w.start_helper(&[]);
    let mut c = Client::connect(w.socket()).unwrap();
    let spec = w.spec(0, EgressRules::default());
    let invalid = |c: &mut Client, request: Request| match call(c, &request) {
        Response::Error {
            kind: ErrorKind::Invalid,
            message,
        } => message,
        other => panic!("{request:?} answered {other:?}"),
    };

    // Nothing before a Setup.
    let message = invalid(&mut c, Request::CreateSlot { spec: spec.clone() });
    assert!(message.contains("send setup first"), "{message}");
    assert!(!Path::new(NETNS_DIR).join(spec.slot.netns()).exists());

    // A network the host routes elsewhere is refused, and binds nothing.
    ip(&["-n", &w.host, "link", "set", "dev", "lo", "up"]);
    ip(&[
        "-n",
        &w.host,
        "route",
        "add",
        "192.168.77.0/24",
        "dev",
        "lo",
    ]);
    let setup = |instance: &str, cidr: &str| Request::Setup {
        instance: instance.into(),
        cidr: cidr.parse().unwrap(),
    };
    let message = invalid(&mut c, setup(&w.instance, "192.168.0.0/16"));
    assert!(
        message.contains("must not overlap the host's route to 192.168.77.0/24 on lo"),
        "{message}"
    );

    // The first Setup binds the helper; the same again (each connection sends it) is fine.
    done(&mut c, setup(&w.instance, CIDR));
    let mut second = Client::connect(w.socket()).unwrap();
    done(&mut second, setup(&w.instance, CIDR));

    // Another hearthd's instance or network is not served.
    let other_instance = format!("{}0", &w.instance[..7]);
    for (instance, cidr) in [
        (other_instance.as_str(), CIDR),
        (&w.instance, "10.20.0.0/16"),
    ] {
        let message = invalid(&mut second, setup(instance, cidr));
        assert!(
            message.ends_with(&format!(
                "this helper serves instance {:?} with cidr {CIDR}; restart hearth-helper to serve another",
                w.instance
            )),
            "{message}"
        );
    }
    let mut foreign = spec.clone();
    foreign.slot.instance = other_instance.clone();
    let message = invalid(
        &mut c,
        Request::CreateSlot {
            spec: foreign.clone(),
        },
    );
    assert!(
        message.starts_with(&format!(
            "spec.slot.instance {other_instance:?}: must be the instance this helper serves"
        )),
        "{message}"
    );
    assert!(!Path::new(NETNS_DIR).join(foreign.slot.netns()).exists());
    let mut narrower = w.rules(&[&spec], vec![]);
    narrower.cidr = "172.30.0.0/17".parse().unwrap();
    let message = invalid(&mut c, Request::ApplyHostRules { rules: narrower });
    assert!(
        message.starts_with(
            "rules.cidr 172.30.0.0/17: must be the cidr this helper serves (172.30.0.0/16)"
        ),
        "{message}"
    );
    let message = invalid(
        &mut c,
        Request::ListSlots {
            instance: other_instance,
        },
    );
    assert!(
        message.contains("restart hearth-helper to serve another"),
        "{message}"
    );

    // Its own requests are served.
    done(&mut c, Request::CreateSlot { spec: spec.clone() });
    assert_eq!(
        call(
            &mut second,
            &Request::ListSlots {
                instance: w.instance.clone()
            }
        ),
        Response::Slots {
            slots: vec![spec.slot.clone()]
        }
    );
    done(&mut c, Request::DeleteSlot { slot: spec.slot });
}

#[test]
fn the_services_are_reached_from_inside_the_slot_only() {
    let mut w = World::new("services", '4');
    let mut c = w.connect();
    let spec = w.spec(0, EgressRules::default());
    let netns = spec.slot.netns();
    done(&mut c, Request::CreateSlot { spec: spec.clone() });
    let (_, tap) = c
        .call(&Request::OpenTap {
            slot: spec.slot.clone(),
        })
        .unwrap();
    let open_services = |c: &mut Client| {
        let (answer, fds) = c
            .call(&Request::OpenServices {
                slot: spec.slot.clone(),
            })
            .unwrap();
        assert_eq!(answer, Response::Services);
        let [udp, tcp, metadata]: [OwnedFd; 3] = fds.try_into().unwrap();
        (
            UdpSocket::from(udp),
            TcpListener::from(tcp),
            TcpListener::from(metadata),
        )
    };
    let (udp, dns, metadata) = open_services(&mut c);

    // From inside the slot (a thread in its namespace), each address reaches its socket.
    let to_metadata = connect_from(&netns, (METADATA_ADDR, 80), Duration::from_secs(3))
        .expect("the slot reaches 169.254.169.254:80");
    let (accepted, _) = metadata.accept().unwrap();
    assert_eq!(
        accepted.local_addr().unwrap(),
        SocketAddr::from((METADATA_ADDR, 80))
    );
    let to_dns = connect_from(&netns, (GATEWAY_ADDR, 53), Duration::from_secs(3))
        .expect("the slot reaches 10.254.254.1:53 (TCP)");
    let (accepted_dns, _) = dns.accept().unwrap();
    assert_eq!(
        accepted_dns.local_addr().unwrap(),
        SocketAddr::from((GATEWAY_ADDR, 53))
    );
    in_netns(&netns, || {
        let query = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        query.send_to(b"query", (GATEWAY_ADDR, 53)).unwrap();
    });
    udp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = udp
        .recv_from(&mut buf)
        .expect("the slot reaches 10.254.254.1:53 (UDP)");
    assert_eq!(&buf[..n], b"query");

    // The host has no route to their addresses, and where it is given one (to the slot), the
    // slot drops what does not come from its guest.
    for to in [(METADATA_ADDR, 80), (GATEWAY_ADDR, 53)] {
        let err = connect_from(&w.host, to, SHORT).unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::NetworkUnreachable,
            "{to:?}: {err}"
        );
    }
    let via = spec.vm_addr.to_string();
    for dst in ["169.254.169.254/32", "10.254.254.0/30"] {
        ip(&["-n", &w.host, "route", "add", dst, "via", &via]);
    }
    for to in [(METADATA_ADDR, 80), (GATEWAY_ADDR, 53)] {
        assert_dropped(
            "the host, routed to the slot",
            connect_from(&w.host, to, SHORT),
        );
    }

    // A second set while the first is open is refused; once it is closed, made again.
    match call(
        &mut c,
        &Request::OpenServices {
            slot: spec.slot.clone(),
        },
    ) {
        Response::Error {
            kind: ErrorKind::Failed,
            message,
        } => assert!(message.contains("in use"), "{message}"),
        other => panic!("a second set of services: {other:?}"),
    }
    drop((
        udp,
        dns,
        metadata,
        accepted,
        accepted_dns,
        to_metadata,
        to_dns,
    ));
    let (udp, dns, metadata) = open_services(&mut c);

    // The guest's path: through tap0, to these addresses and ports only. (A stand-in guest
    // takes the TAP's place.)
    drop(tap);
    wait_until(
        "tap0 goes with its descriptor",
        Duration::from_secs(5),
        || !ip_ok(&["-n", &netns, "link", "show", "dev", "tap0"]),
    );
    let guest = attach_guest(&w, &netns, "guest");
    let _to_metadata = connect_from(&guest, (METADATA_ADDR, 80), Duration::from_secs(3))
        .expect("the guest reaches the metadata service");
    let (from_guest, peer) = metadata.accept().unwrap();
    assert_eq!(peer.ip(), GUEST_ADDR);
    let _to_dns = connect_from(&guest, (GATEWAY_ADDR, 53), Duration::from_secs(3))
        .expect("the guest reaches the DNS forwarder");
    let (dns_from_guest, _) = dns.accept().unwrap();
    in_netns(&guest, || {
        let query = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        query.send_to(b"guest", (GATEWAY_ADDR, 53)).unwrap();
    });
    let (n, peer) = udp.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], peer.ip()), (&b"guest"[..], GUEST_ADDR.into()));
    let other_port = in_netns(&netns, || TcpListener::bind((GATEWAY_ADDR, 22)).unwrap());
    assert_dropped(
        "the guest to another port of the gateway",
        connect_from(&guest, (GATEWAY_ADDR, 22), SHORT),
    );
    drop((other_port, from_guest, dns_from_guest));
    done(&mut c, Request::DeleteSlot { slot: spec.slot });
}

#[test]
fn vms_reach_each_other_only_inside_a_private_network_they_share() {
    let mut w = World::new("private", '5');
    let mut c = w.connect();
    let (a, b) = (
        w.spec(0, EgressRules::default()),
        w.spec(1, EgressRules::default()),
    );
    for s in [&a, &b] {
        done(&mut c, Request::CreateSlot { spec: s.clone() });
    }
    let guest_a = attach_guest(&w, &a.slot.netns(), "ga");
    let guest_b = attach_guest(&w, &b.slot.netns(), "gb");
    let network = PrivateNetwork {
        name: "db-tier".into(),
        members: vec![a.vm_addr, b.vm_addr],
    };
    let with = |networks| Request::ApplyHostRules {
        rules: w.rules(&[&a, &b], networks),
    };
    done(&mut c, with(vec![network.clone()]));
    let echo = Echo::start(&guest_b, 7001);
    let mut stream = connect_from(&guest_a, (b.vm_addr, 7001), Duration::from_secs(3))
        .expect("A reaches B inside their network");
    assert!(echoes(&mut stream, Duration::from_secs(3)));
    assert_eq!(echo.peers()[0].ip(), a.vm_addr, "B sees A's own address");

    // Out of the network, the open connection stops at once, and no new one opens.
    done(&mut c, with(vec![]));
    assert!(
        !echoes(&mut stream, SHORT),
        "the open connection still passes"
    );
    assert_dropped(
        "A to B with no network",
        connect_from(&guest_a, (b.vm_addr, 7001), SHORT),
    );
    // Back in, it passes again.
    done(&mut c, with(vec![network]));
    assert!(echoes(&mut stream, Duration::from_secs(10)));
    drop(echo);
    for s in [a, b] {
        done(&mut c, Request::DeleteSlot { slot: s.slot });
    }
}

#[test]
fn a_vm_reaches_the_world_through_its_egress_policy_on_every_packet() {
    let mut w = World::new("egress", '6');
    let outside = attach_outside(&w);
    let mut c = w.connect();
    let a = w.spec(0, EgressRules::default());
    done(&mut c, Request::CreateSlot { spec: a.clone() });
    let guest = attach_guest(&w, &a.slot.netns(), "ga");
    done(
        &mut c,
        Request::ApplyHostRules {
            rules: w.rules(&[&a], vec![]),
        },
    );
    let echo = Echo::start(&outside, 7000);
    let mut stream = connect_from(&guest, (WORLD, 7000), Duration::from_secs(3))
        .expect("the guest reaches the world");
    assert!(echoes(&mut stream, Duration::from_secs(3)));
    assert_eq!(echo.peers()[0].ip(), HOST_WAN, "masqueraded");

    // Each new policy holds for the open connection from its next packet on.
    let set = |c: &mut Client, egress| {
        done(
            c,
            Request::SetEgress {
                slot: a.slot.clone(),
                egress,
            },
        );
    };
    let deny_all = EgressRules {
        mode: EgressMode::DenyAll,
        ..EgressRules::default()
    };
    set(&mut c, deny_all.clone());
    assert!(
        !echoes(&mut stream, SHORT),
        "deny_all lets the open connection pass"
    );
    assert_dropped("deny_all", connect_from(&guest, (WORLD, 7000), SHORT));
    set(
        &mut c,
        EgressRules {
            allow_cidrs: vec!["203.0.113.0/24".parse().unwrap()],
            ..deny_all
        },
    );
    assert!(
        echoes(&mut stream, Duration::from_secs(10)),
        "allowed again"
    );
    set(
        &mut c,
        EgressRules {
            deny_cidrs: vec!["203.0.113.7/32".parse().unwrap()],
            ..EgressRules::default()
        },
    );
    assert!(!echoes(&mut stream, SHORT), "a denied network passes");
    set(&mut c, EgressRules::default());
    assert!(
        echoes(&mut stream, Duration::from_secs(10)),
        "allowed again"
    );

    // Whatever its policy, a VM does not reach link-local addresses (the host's cloud
    // metadata) or addresses of the VMs' network that are no slot's.
    for addr in [Ipv4Addr::new(169, 254, 1, 1), Ipv4Addr::new(172, 30, 9, 9)] {
        assert_dropped(
            &format!("the guest to {addr}"),
            connect_from(&guest, (addr, 7000), SHORT),
        );
    }

    // Another network the host routes (a Docker bridge, say) is reached until `outbound`
    // names the way out; then not, not even by an open connection.
    let mut side = connect_from(&guest, (SIDE, 7000), Duration::from_secs(3))
        .expect("without outbound, any way out");
    assert!(echoes(&mut side, Duration::from_secs(3)));
    let mut rules = w.rules(&[&a], vec![]);
    rules.outbound = Some("wan0".into());
    done(&mut c, Request::ApplyHostRules { rules });
    assert!(
        !echoes(&mut side, SHORT),
        "the open connection to the side network"
    );
    assert_dropped(
        "the side network",
        connect_from(&guest, (SIDE, 7000), SHORT),
    );
    assert!(echoes(&mut stream, Duration::from_secs(3)), "through wan0");
    drop(echo);
    done(&mut c, Request::DeleteSlot { slot: a.slot });
}

#[test]
fn nothing_but_root_on_the_host_opens_a_connection_to_a_vm() {
    let mut w = World::new("inbound", '7');
    let outside = attach_outside(&w);
    let mut c = w.connect();
    let a = w.spec(0, EgressRules::default());
    done(&mut c, Request::CreateSlot { spec: a.clone() });
    let guest = attach_guest(&w, &a.slot.netns(), "ga");
    done(
        &mut c,
        Request::ApplyHostRules {
            rules: w.rules(&[&a], vec![]),
        },
    );
    let in_guest = Echo::start(&guest, 7003);

    // Root on the host does (the answers come back through the slot).
    let mut root = connect_from(&w.host, (a.vm_addr, 7003), Duration::from_secs(3))
        .expect("root reaches the VM");
    assert!(echoes(&mut root, Duration::from_secs(3)));
    // No other local user (nor a web page in an operator's browser).
    let err = as_nobody_in(&w.host, || {
        TcpStream::connect_timeout(&SocketAddr::from((a.vm_addr, 7003)), SHORT)
    })
    .unwrap_err();
    // Its SYNs are dropped on the way out (TCP tries again until the connect times out).
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::PermissionDenied
        ),
        "{err}"
    );
    // A datagram is refused at once.
    let sent = as_nobody_in(&w.host, || {
        UdpSocket::bind(("0.0.0.0", 0))
            .unwrap()
            .send_to(b"x", (a.vm_addr, 7003))
    });
    assert_eq!(
        sent.unwrap_err().kind(),
        io::ErrorKind::PermissionDenied,
        "a local user's datagram to a VM"
    );
    // Nothing from outside, and the slots' host addresses take nothing from there (the host's
    // own address does).
    assert_dropped(
        "the world to the VM",
        connect_from(&outside, (a.vm_addr, 7003), SHORT),
    );
    let on_host = Echo::start(&w.host, 7002);
    assert_dropped(
        "the world to a slot's host address",
        connect_from(&outside, (a.host_addr, 7002), SHORT),
    );
    assert!(connect_from(&outside, (HOST_WAN, 7002), Duration::from_secs(3)).is_ok());
    // And the guest reaches nothing of the host.
    for addr in [a.host_addr, HOST_WAN] {
        assert_dropped(
            &format!("the guest to the host's {addr}"),
            connect_from(&guest, (addr, 7002), SHORT),
        );
    }
    drop((in_guest, on_host));
    done(&mut c, Request::DeleteSlot { slot: a.slot });
}

#[test]
fn a_resolved_connection_outlives_its_address_but_not_the_policy() {
    let mut w = World::new("resolved", '8');
    let outside = attach_outside(&w);
    let mut c = w.connect();
    let domains = EgressRules {
        mode: EgressMode::DenyAll,
        domains: true,
        ..EgressRules::default()
    };
    let a = w.spec(0, domains.clone());
    let netns = a.slot.netns();
    done(&mut c, Request::CreateSlot { spec: a.clone() });
    let guest = attach_guest(&w, &netns, "ga");
    done(
        &mut c,
        Request::ApplyHostRules {
            rules: w.rules(&[&a], vec![]),
        },
    );
    let echo = Echo::start(&outside, 7000);
    let resolve = |c: &mut Client, ttl_secs| {
        done(
            c,
            Request::AllowResolved {
                slot: a.slot.clone(),
                addrs: vec![WORLD],
                ttl_secs,
            },
        );
    };
    let resolved = || nft_in(&netns, &["list", "set", "ip", "hearth", "resolved"]).unwrap();
    assert_dropped(
        "not resolved yet",
        connect_from(&guest, (WORLD, 7000), SHORT),
    );
    resolve(&mut c, 2);
    let mut first = connect_from(&guest, (WORLD, 7000), Duration::from_secs(3))
        .expect("a resolved address is reached");
    assert!(echoes(&mut first, Duration::from_secs(3)));

    // The address times out of the set; the connection it let through lives on.
    wait_until("the address times out", Duration::from_secs(10), || {
        !resolved().contains("203.0.113.7")
    });
    assert!(echoes(&mut first, Duration::from_secs(3)));
    assert_dropped(
        "a new connection after the timeout",
        connect_from(&guest, (WORLD, 7000), SHORT),
    );

    // A new policy (the same one again) ends both connections: the addresses are forgotten
    // and the connections' mark is the old policy's.
    resolve(&mut c, 600);
    let mut second =
        connect_from(&guest, (WORLD, 7000), Duration::from_secs(3)).expect("resolved again");
    assert!(echoes(&mut second, Duration::from_secs(3)));
    done(
        &mut c,
        Request::SetEgress {
            slot: a.slot.clone(),
            egress: domains,
        },
    );
    assert!(!resolved().contains("203.0.113.7"), "{}", resolved());
    assert!(!echoes(&mut first, SHORT));
    assert!(!echoes(&mut second, SHORT));
    drop(echo);
    done(&mut c, Request::DeleteSlot { slot: a.slot });
}

#[test]
fn stray_answers_to_a_previous_vm_do_not_reach_the_next_one_of_its_address() {
    let mut w = World::new("stray", 'a');
    let outside = attach_outside(&w);
    let mut c = w.connect();
    let first = w.spec(0, EgressRules::default());
    done(
        &mut c,
        Request::CreateSlot {
            spec: first.clone(),
        },
    );
    let guest = attach_guest(&w, &first.slot.netns(), "g1");
    done(
        &mut c,
        Request::ApplyHostRules {
            rules: w.rules(&[&first], vec![]),
        },
    );
    // The first VM talks UDP to the world, which learns where to answer.
    // (Bound to its address, so its answers come from there.)
    let server = in_netns(&outside, || UdpSocket::bind((WORLD, 7000)).unwrap());
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    in_netns(&guest, || {
        let socket = UdpSocket::bind(("0.0.0.0", 40123)).unwrap();
        socket.send_to(b"hello", (WORLD, 7000)).unwrap();
    });
    let mut buf = [0u8; 16];
    let (_, answer_to) = server.recv_from(&mut buf).expect("the world hears the VM");
    // And a TCP connection.
    let world_listener = in_netns(&outside, || TcpListener::bind((WORLD, 7001)).unwrap());
    let _old_end = connect_from(&guest, (WORLD, 7001), Duration::from_secs(3))
        .expect("the first VM reaches the world");
    let (mut world_end, _) = world_listener.accept().unwrap();

    // The VM goes; the next one gets its addresses (another VM id, the same /30) while the
    // host's conntrack still maps the world's answers to that address.
    done(&mut c, Request::DeleteSlot { slot: first.slot });
    let mut next = w.spec(1, EgressRules::default());
    (next.host_addr, next.vm_addr) = (first.host_addr, first.vm_addr);
    done(&mut c, Request::CreateSlot { spec: next.clone() });
    let next_guest = attach_guest(&w, &next.slot.netns(), "g2");
    done(
        &mut c,
        Request::ApplyHostRules {
            rules: w.rules(&[&next], vec![]),
        },
    );
    let listener = in_netns(&next_guest, || UdpSocket::bind(("0.0.0.0", 40123)).unwrap());
    listener.set_read_timeout(Some(SHORT)).unwrap();
    server.send_to(b"stray", answer_to).unwrap();
    let got = listener.recv_from(&mut buf);
    assert!(
        got.is_err(),
        "the new guest got the old one's answer: {got:?}"
    );
    // The world's next segment on the old connection does not reach the new guest either (it
    // would answer with a reset): conntrack in the new slot finds it invalid.
    world_end.write_all(b"stray").unwrap();
    world_end.set_read_timeout(Some(SHORT)).unwrap();
    let read = world_end.read(&mut buf);
    assert!(
        matches!(&read, Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
        "the new guest answered the old one's connection: {read:?}"
    );
    done(&mut c, Request::DeleteSlot { slot: next.slot });
}

/// Not a check but a measurement: the medians of each request of a VM's network setup, with
/// no other slot and with 50 others. Printed (`--nocapture`), not asserted: times depend on
/// the machine.
#[test]
fn slot_setup_times_with_1_and_50_slots() {
    const ROUNDS: u32 = 20;
    const OTHERS: u32 = 50;
    let mut w = World::new("times", '9');
    let mut c = w.connect();
    let steps = [
        "CreateSlot",
        "OpenTap",
        "OpenServices",
        "ApplyHostRules",
        "all four",
    ];
    let measure = |c: &mut Client, w: &World, present: &[SlotSpec], first: u32| {
        let mut samples: [Vec<Duration>; 5] = Default::default();
        for round in 0..ROUNDS {
            let spec = w.spec(first + round, EgressRules::default());
            let mut all: Vec<&SlotSpec> = present.iter().collect();
            all.push(&spec);
            let rules = w.rules(&all, vec![]);
            let start = Instant::now();
            done(c, Request::CreateSlot { spec: spec.clone() });
            let created = Instant::now();
            let (_, tap) = c
                .call_ok(&Request::OpenTap {
                    slot: spec.slot.clone(),
                })
                .unwrap();
            let tapped = Instant::now();
            let (_, services) = c
                .call_ok(&Request::OpenServices {
                    slot: spec.slot.clone(),
                })
                .unwrap();
            let served = Instant::now();
            done(c, Request::ApplyHostRules { rules });
            let ruled = Instant::now();
            for (i, (from, to)) in [
                (start, created),
                (created, tapped),
                (tapped, served),
                (served, ruled),
                (start, ruled),
            ]
            .into_iter()
            .enumerate()
            {
                samples[i].push(to - from);
            }
            // The VM goes, as hearthd would remove it: its slot, then its element of the host
            // rules (a deletion, which costs the kernel's wait; see `hearth_helper::nft`).
            drop((tap, services));
            done(c, Request::DeleteSlot { slot: spec.slot });
            let rules = w.rules(&present.iter().collect::<Vec<_>>(), vec![]);
            done(c, Request::ApplyHostRules { rules });
        }
        samples.map(|mut s| median(&mut s))
    };
    let alone = measure(&mut c, &w, &[], 0);
    let others: Vec<SlotSpec> = (0..OTHERS)
        .map(|i| w.spec(ROUNDS + i, EgressRules::default()))
        .collect();
    for spec in &others {
        done(&mut c, Request::CreateSlot { spec: spec.clone() });
    }
    let rules = w.rules(&others.iter().collect::<Vec<_>>(), vec![]);
    done(&mut c, Request::ApplyHostRules { rules });
    let crowded = measure(&mut c, &w, &others, ROUNDS + OTHERS);
    eprintln!("median of {ROUNDS} VMs' network setup (ms):");
    eprintln!("{:<16} {:>8} {:>14}", "request", "alone", "with 50 slots");
    for (i, step) in steps.iter().enumerate() {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        eprintln!("{step:<16} {:>8.1} {:>14.1}", ms(alone[i]), ms(crowded[i]));
    }
    for spec in others {
        done(&mut c, Request::DeleteSlot { slot: spec.slot });
    }
}

#[test]
fn the_binary_refuses_bad_starts_and_replaces_a_stale_socket() {
    let mut w = World::new("start", '2');
    let socket = w.socket();
    let socket_arg = socket.to_str().unwrap().to_owned();

    let (code, log) = w.refused_start(&["--socket", &socket_arg], Some(65534));
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("hearth-helper must run as root (it runs as uid 65534)"),
        "{log}"
    );
    assert!(!socket.exists());

    std::fs::write(&socket, "not a socket").unwrap();
    let (code, log) = w.refused_start(&["--socket", &socket_arg], None);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("the file there is not a socket"), "{log}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not a socket");
    std::fs::remove_file(&socket).unwrap();

    let (code, log) = w.refused_start(
        &["--socket", &socket_arg, "--group", "hearth-no-such-group"],
        None,
    );
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("--group \"hearth-no-such-group\": no such group"),
        "{log}"
    );

    // A socket nobody serves is replaced; the new one is 0660 and in the group.
    drop(UnixListener::bind(&socket).unwrap());
    assert!(
        std::fs::symlink_metadata(&socket)
            .unwrap()
            .file_type()
            .is_socket()
    );
    let pid = w.start_helper(&["--group", "65534"]);
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.gid(), 65534);
    assert_eq!(meta.mode() & 0o777, 0o660);
    let mut c = Client::connect(&socket).unwrap();
    assert!(matches!(
        c.call(&Request::Hello).unwrap().0,
        Response::Hello { .. }
    ));

    // One that is served is not taken over.
    let (code, log) = w.refused_start(&["--socket", &socket_arg], None);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("another process serves it"), "{log}");
    assert!(
        c.call(&Request::Hello).is_ok(),
        "the first helper still serves"
    );

    drop(c);
    assert!(w.stop_helper(pid).success(), "{}", w.log());
    assert!(!socket.exists());
}
