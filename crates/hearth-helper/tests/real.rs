//! The real helper, as root, in a network namespace of the test's own that plays the host.
//!
//! The helper is started inside that namespace by entering only its network namespace
//! (`setns` before `exec`), not with `ip netns exec`: that one also gives the program a private
//! mount namespace, so the slot namespaces the helper mounts under `/run/netns` would be
//! invisible outside it.
//!
//! Everything the test makes (its namespaces, the slots' namespaces, the helper, a temporary
//! directory) is removed by a drop guard, also when an assertion fails; all traffic stays
//! inside the test's namespaces.

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hearth_helper::client::Client;
use hearth_helper::proto::{
    EgressMode, EgressRules, ErrorKind, HostRules, HostSlot, PROTOCOL_VERSION, PrivateNetwork,
    Request, Response, SlotId, SlotSpec,
};
use nix::sched::{CloneFlags, setns};

const NETNS_DIR: &str = "/run/netns";

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

    /// The namespaces under /run/netns that are this test's.
    fn leftovers(&self) -> Vec<String> {
        let slot_prefix = format!("hearth-{}-", self.instance);
        std::fs::read_dir(NETNS_DIR)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n == &self.host || n.starts_with(&slot_prefix))
                    .collect()
            })
            .unwrap_or_default()
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
    let cidr = "172.30.0.0/16".parse().unwrap();
    done(
        &mut c,
        Request::Setup {
            instance: w.instance.clone(),
            cidr,
        },
    );
    let forward = in_netns(&w.host, || {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap()
    });
    assert_eq!(forward.trim(), "1");

    // A slot, twice.
    let slot = SlotId {
        instance: w.instance.clone(),
        vm: format!("{:016x}", u64::from(std::process::id()) << 8 | 0xab),
    };
    let (netns, veth) = (slot.netns(), slot.host_veth());
    let host_addr = Ipv4Addr::new(172, 30, 0, 5);
    let vm_addr = Ipv4Addr::new(172, 30, 0, 6);
    let spec = SlotSpec {
        slot: slot.clone(),
        host_addr,
        vm_addr,
        peers: cidr,
        egress: EgressRules::default(),
    };
    for _ in 0..2 {
        done(&mut c, Request::CreateSlot { spec: spec.clone() });
    }
    let eth0 = ip(&["-n", &netns, "-4", "addr", "show", "dev", "eth0"]);
    assert!(eth0.contains("inet 172.30.0.6/30"), "{eth0}");
    assert!(eth0.contains("state UP") || eth0.contains(",UP"), "{eth0}");
    let host_end = ip(&["-n", &w.host, "-4", "addr", "show", "dev", &veth]);
    assert!(host_end.contains("inet 172.30.0.5/30"), "{host_end}");
    let route = ip(&["-n", &netns, "route", "show", "default"]);
    assert!(route.contains("via 172.30.0.5 dev eth0"), "{route}");
    let slot_rules = nft_in(&netns, &["list", "table", "ip", "hearth"]).unwrap();
    assert!(slot_rules.contains("dnat to 10.254.254.2"), "{slot_rules}");

    // The host rules, with their elements.
    let rules = HostRules {
        instance: w.instance.clone(),
        cidr,
        outbound: None,
        slots: vec![HostSlot {
            slot: slot.clone(),
            host_addr,
            vm_addr,
        }],
        networks: vec![PrivateNetwork {
            name: "db-tier".into(),
            members: vec![vm_addr],
        }],
    };
    done(&mut c, Request::ApplyHostRules { rules });
    let host_rules = nft_in(&w.host, &["list", "table", "ip", "hearth"]).unwrap();
    assert!(
        host_rules.contains(&format!("\"{veth}\" . 172.30.0.6")),
        "{host_rules}"
    );
    assert!(host_rules.contains("set net_db_tier"), "{host_rules}");

    // From the slot, the host answers nothing: the host rules drop it (a connect times out
    // rather than being refused).
    let listener = in_netns(&w.host, || TcpListener::bind(("0.0.0.0", 18169)).unwrap());
    let refused = in_netns(&netns, || {
        TcpStream::connect_timeout(
            &SocketAddr::from((host_addr, 18169)),
            Duration::from_millis(700),
        )
    })
    .unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::TimedOut, "{refused}");
    drop(listener);

    // The TAP lives as long as its descriptor.
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
    let tap0 = ip(&["-n", &netns, "-4", "addr", "show", "dev", "tap0"]);
    assert!(tap0.contains("inet 10.254.254.1/30"), "{tap0}");
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
        .expect("the guest's query reaches the DNS port");
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

    // Egress: resolved addresses survive a SetEgress.
    done(
        &mut c,
        Request::AllowResolved {
            slot: slot.clone(),
            addrs: vec![Ipv4Addr::new(198, 51, 100, 7)],
            ttl_secs: 600,
        },
    );
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
    assert!(egress.contains("198.51.100.7 timeout"), "{egress}");
    assert!(
        egress.contains("ip daddr @resolved tcp dport @ports accept"),
        "{egress}"
    );
    assert!(egress.contains("192.0.2.0/24"), "{egress}");

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
    assert!(
        recreated.contains("ip daddr @resolved tcp dport @ports accept"),
        "{recreated}"
    );

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
    wait_until("the host veth goes", Duration::from_secs(5), || {
        !ip_ok(&["-n", &w.host, "link", "show", "dev", &veth])
    });
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

    // A network the host routes elsewhere is refused.
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
    match call(
        &mut c,
        &Request::Setup {
            instance: w.instance.clone(),
            cidr: "192.168.0.0/16".parse().unwrap(),
        },
    ) {
        Response::Error {
            kind: ErrorKind::Invalid,
            message,
        } => assert!(
            message.contains("must not overlap the host's route to 192.168.77.0/24 on lo"),
            "{message}"
        ),
        other => panic!("an overlapping network: {other:?}"),
    }

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
