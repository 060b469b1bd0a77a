//! The network operations the helper needs, behind one trait (youki's `Syscall` pattern):
//! [`RealNet`] runs `ip` (iproute2) with argument vectors, a whole list of changes in one
//! `ip -batch -` ([`Net::apply`]); [`RecordingNet`] records every call as data and answers from
//! a model of the kernel the test programs, so the dispatch is tested without root.
//!
//! Work inside a slot runs on a short-lived thread of its own that entered the slot's namespace
//! ([`in_netns`]): the system calls made there (sysctls, the TAP and its address, the service
//! sockets) and the programs it starts (`ip`, and `nft` for [`crate::nft::RealNft`]: a child
//! is born in the namespace of the thread that forks it) act on the slot. That spares each run
//! the mount namespace and `/sys` remount of `ip -n` and `ip netns exec`, and no other thread of
//! the helper ever leaves the host namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::sched::{CloneFlags, setns};
use serde::Deserialize;

use crate::cmd::{self, CommandError};
use crate::proto::{Cidr, GATEWAY_ADDR, INNER_PREFIX, SERVICE_SOCKETS, ServiceSocket};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// The TUN/TAP clone device.
const TUN_DEVICE: &str = "/dev/net/tun";

/// `net.ipv4.ip_forward`, written in the host namespace at Setup and in every slot.
pub const IP_FORWARD: &str = "net/ipv4/ip_forward";
/// `net.ipv4.conf.all.rp_filter`: strict reverse-path filtering in every slot.
pub const RP_FILTER: &str = "net/ipv4/conf/all/rp_filter";
/// `net.ipv6.conf.all.disable_ipv6`: no IPv6 on a slot's links (the rules are IPv4's).
pub const DISABLE_IPV6_ALL: &str = "net/ipv6/conf/all/disable_ipv6";
/// `net.ipv6.conf.default.disable_ipv6`: nor on those made later (the TAP).
pub const DISABLE_IPV6_DEFAULT: &str = "net/ipv6/conf/default/disable_ipv6";
/// `net.netfilter.nf_conntrack_tcp_loose`: off in every slot, so conntrack does not pick up a
/// TCP connection in the middle (its packets are invalid, and dropped). Per namespace, and
/// there only once conntrack runs in it: written after the slot's table.
pub const TCP_LOOSE: &str = "net/netfilter/nf_conntrack_tcp_loose";

/// The namespace an operation works in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ns<'a> {
    /// The namespace the helper runs in, which plays the host.
    Host,
    /// A slot's namespace, by its name under [`NETNS_DIR`].
    Slot(&'a str),
}

impl Ns<'_> {
    /// The slot's name, `None` for the host: the form [`NetCall`]s record.
    pub fn name(&self) -> Option<String> {
        match self {
            Ns::Host => None,
            Ns::Slot(name) => Some((*name).to_owned()),
        }
    }
}

/// For messages: "the host namespace", "slot NAME".
impl fmt::Display for Ns<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ns::Host => f.write_str("the host namespace"),
            Ns::Slot(name) => write!(f, "slot {name}"),
        }
    }
}

/// One route of the host namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The destination (`0.0.0.0/0` for a default route).
    pub dst: Cidr,
    /// The device, when the route has one.
    pub dev: Option<String>,
}

/// A link as [`Net::link`] finds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkState {
    /// Set administratively up.
    pub up: bool,
    /// Its IPv4 addresses, with prefix lengths.
    pub addrs: Vec<(Ipv4Addr, u8)>,
}

/// One change [`Net::apply`] makes: a line of `ip -batch -`. Names and addresses come from
/// validated requests (no spaces, nothing `ip` would read as a keyword).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `netns add` (in the host namespace only): fails when the namespace exists.
    NetnsAdd { name: String },
    /// A veth pair, `link` in this namespace and `peer` in the namespace `peer_ns`: fails when
    /// either name is taken.
    VethAdd {
        link: String,
        peer: String,
        peer_ns: String,
    },
    /// Fails when the link is missing. A veth's peer goes with it.
    LinkDelete { link: String },
    /// Holds when the link is up already.
    LinkUp { link: String },
    /// `addr replace`: holds when the address is there already.
    AddrAdd {
        link: String,
        addr: Ipv4Addr,
        prefix: u8,
    },
    /// Fails when the address is not there.
    AddrDel {
        link: String,
        addr: Ipv4Addr,
        prefix: u8,
    },
    /// `route replace default`: holds when it is that route already.
    DefaultRoute { via: Ipv4Addr, link: String },
}

impl Change {
    /// Its line of `ip -batch -`.
    pub fn line(&self) -> String {
        match self {
            Change::NetnsAdd { name } => format!("netns add {name}"),
            Change::VethAdd {
                link,
                peer,
                peer_ns,
            } => format!("link add name {link} type veth peer name {peer} netns {peer_ns}"),
            Change::LinkDelete { link } => format!("link delete dev {link}"),
            Change::LinkUp { link } => format!("link set dev {link} up"),
            Change::AddrAdd { link, addr, prefix } => {
                format!("addr replace {addr}/{prefix} dev {link}")
            }
            Change::AddrDel { link, addr, prefix } => {
                format!("addr del {addr}/{prefix} dev {link}")
            }
            Change::DefaultRoute { via, link } => {
                format!("route replace default via {via} dev {link}")
            }
        }
    }

    /// The variant's name (what [`NetState::fail`] names).
    pub fn kind(&self) -> &'static str {
        match self {
            Change::NetnsAdd { .. } => "NetnsAdd",
            Change::VethAdd { .. } => "VethAdd",
            Change::LinkDelete { .. } => "LinkDelete",
            Change::LinkUp { .. } => "LinkUp",
            Change::AddrAdd { .. } => "AddrAdd",
            Change::AddrDel { .. } => "AddrDel",
            Change::DefaultRoute { .. } => "DefaultRoute",
        }
    }
}

/// A network operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("could not make the changes `{lines}` in {place}")]
    Batch {
        place: String,
        lines: String,
        #[source]
        source: CommandError,
    },
    #[error("could not understand the output of `{command}`: {detail}")]
    Output { command: String, detail: String },
    #[error("could not read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not enter the network namespace {netns}")]
    Enter {
        netns: String,
        #[source]
        source: nix::Error,
    },
    #[error("the thread working in the network namespace {netns} panicked")]
    Thread { netns: String },
    #[error("could not write {value} to /proc/sys/{key}")]
    Sysctl {
        key: &'static str,
        value: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("could not create the TAP {name} in {netns}")]
    Tap {
        name: String,
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not give the TAP {name} in {netns} its address and bring it up ({step})")]
    TapSetup {
        step: &'static str,
        name: String,
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the TAP {name} of {netns} is still open: a VMM of this slot still runs (stop it before booting again)"
    )]
    TapBusy { name: String, netns: String },
    #[error(
        "the service sockets of {netns} are in use: a hearthd still serves this slot (stop it first)"
    )]
    ServicesBusy { netns: String },
    #[error("could not make the service socket {addr} in {netns}")]
    Service {
        addr: std::net::SocketAddrV4,
        netns: String,
        #[source]
        source: nix::Error,
    },
}

impl NetError {
    /// True when a command ran and its error output contains `text`.
    pub fn stderr_contains(&self, text: &str) -> bool {
        match self {
            NetError::Command(e) | NetError::Batch { source: e, .. } => e.stderr_contains(text),
            _ => false,
        }
    }
}

/// What the helper does to the network.
pub trait Net: Send + Sync {
    /// The names under [`NETNS_DIR`].
    fn netns_list(&self) -> Result<Vec<String>, NetError>;
    /// Makes sure the namespace exists: an existing one is kept, a stale file without a
    /// namespace is replaced, a missing one made. (A namespace known to be missing is made
    /// faster by [`Change::NetnsAdd`] in a batch.)
    fn netns_add(&self, name: &str) -> Result<(), NetError>;
    /// Deletes the namespace; a missing one is fine.
    fn netns_delete(&self, name: &str) -> Result<(), NetError>;
    /// The link's state, `None` when there is no such link.
    fn link(&self, ns: Ns<'_>, link: &str) -> Result<Option<LinkState>, NetError>;
    /// Makes `changes` in order, all at once (one `ip -batch -`): the first that fails stops
    /// the rest, and those before it stay made. Each [`Change`] says whether it holds when
    /// already made; the caller asks first ([`Net::link`]) for those that do not, unless it
    /// knows (in a namespace it has just made). Nothing to change is no work.
    fn apply(&self, ns: Ns<'_>, changes: &[Change]) -> Result<(), NetError>;
    /// The IPv4 routes of the host namespace (tables main and local).
    fn routes(&self) -> Result<Vec<Route>, NetError>;
    /// Writes each `/proc/sys/<key>` in the namespace, in order, in one visit. A key under
    /// `net/ipv6/` that does not exist (a kernel without IPv6) is skipped.
    fn sysctls(&self, ns: Ns<'_>, values: &[(&'static str, &'static str)]) -> Result<(), NetError>;
    /// Creates the TAP `name` inside the slot (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, not
    /// persistent: it goes when the last descriptor closes), with `GATEWAY_ADDR`/30 and up,
    /// and returns its descriptor. A TAP of that name that is still open is
    /// [`NetError::TapBusy`].
    fn open_tap(&self, netns: &str, name: &str) -> Result<OwnedFd, NetError>;
    /// Makes the slot's service sockets ([`SERVICE_SOCKETS`], in that order) inside it and
    /// returns them. An address still taken (an earlier set is open) is
    /// [`NetError::ServicesBusy`].
    fn open_services(&self, netns: &str) -> Result<Vec<OwnedFd>, NetError>;
}

/// The real thing: `ip` with argument vectors, system calls in a thread inside the slot.
#[derive(Debug, Default)]
pub struct RealNet;

/// Runs `work` on a thread of its own that has entered the slot's network namespace; the
/// thread ends with it, so no other thread of the helper ever leaves the host namespace. A
/// program `work` starts runs in the slot too.
pub fn in_netns<T: Send, E: Send + From<NetError>>(
    netns: &str,
    work: impl FnOnce() -> Result<T, E> + Send,
) -> Result<T, E> {
    let path = Path::new(NETNS_DIR).join(netns);
    let file = File::open(&path).map_err(|source| NetError::Read { path, source })?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetError::Enter {
                    netns: netns.to_owned(),
                    source,
                })?;
                work()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetError::Thread {
                    netns: netns.to_owned(),
                }
                .into())
            })
    })
}

/// `ip args…` in the namespace (from a thread inside it for a slot), with `stdin` fed to it.
fn ip(ns: Ns<'_>, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    match ns {
        Ns::Host => Ok(cmd::run("ip", args, stdin)?),
        Ns::Slot(name) => in_netns(name, || Ok(cmd::run("ip", args, stdin)?)),
    }
}

/// `result`, with the failures whose error output says `benign` turned into success.
fn unless(result: Result<String, NetError>, benign: &[&str]) -> Result<(), NetError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if benign.iter().any(|text| e.stderr_contains(text)) => Ok(()),
        Err(e) => Err(e),
    }
}

fn write_sysctl(key: &'static str, value: &'static str) -> Result<(), NetError> {
    let result = OpenOptions::new()
        .write(true)
        .open(Path::new("/proc/sys").join(key))
        .and_then(|mut f| f.write_all(value.as_bytes()));
    match result {
        Ok(()) => Ok(()),
        // A kernel without IPv6 has nothing to disable.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && key.starts_with("net/ipv6/") => {
            Ok(())
        }
        Err(source) => Err(NetError::Sysctl { key, value, source }),
    }
}

/// A `struct ifreq` naming `name`, the rest zero.
fn ifreq_named(name: &str) -> std::io::Result<libc::ifreq> {
    // SAFETY: `ifreq` is plain old data (a name array and a union of integers and plain
    // structs), for which all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= ifr.ifr_name.len() {
        return Err(std::io::Error::other(
            "the name is longer than the kernel's 15 bytes",
        ));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    Ok(ifr)
}

/// One interface ioctl: `request` on `fd` with `ifr`.
fn ioctl_ifreq(
    fd: &impl AsRawFd,
    request: libc::Ioctl,
    ifr: &mut libc::ifreq,
) -> std::io::Result<()> {
    // SAFETY: the descriptor is open (borrowed for the call); every request passed here
    // (TUNSETIFF, SIOCSIFADDR, SIOCSIFNETMASK, SIOCGIFFLAGS, SIOCSIFFLAGS) reads or writes one
    // `struct ifreq`, and `ifr` is one, initialised and exclusively borrowed.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(ifr)) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `addr` as the `struct sockaddr` the address ioctls take (a `sockaddr_in` in it).
fn inet_sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or_default(),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sockaddr_in` and `sockaddr` are both 16 bytes of plain data (transmute checks
    // the sizes), and every bit pattern is a valid `sockaddr`; this is the reinterpretation
    // the socket API is built on.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Opens `/dev/net/tun` and makes it the TAP `name`, in the calling thread's namespace.
fn create_tap(netns: &str, name: &str) -> Result<OwnedFd, NetError> {
    let tap_error = |source| NetError::Tap {
        name: name.to_owned(),
        netns: netns.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_DEVICE)
        .map_err(tap_error)?;
    let mut ifr = ifreq_named(name).map_err(tap_error)?;
    ifr.ifr_ifru.ifru_flags =
        libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
            .map_err(|_| tap_error(std::io::Error::other("the TAP flags do not fit a short")))?;
    if let Err(err) = ioctl_ifreq(&file, libc::TUNSETIFF, &mut ifr) {
        if err.raw_os_error() == Some(libc::EBUSY) {
            return Err(NetError::TapBusy {
                name: name.to_owned(),
                netns: netns.to_owned(),
            });
        }
        return Err(tap_error(err));
    }
    Ok(OwnedFd::from(file))
}

/// Gives the new TAP `name` its address (`GATEWAY_ADDR`/`INNER_PREFIX`) and brings it up, with
/// ioctls in the calling thread's namespace: no program to run.
fn configure_tap(netns: &str, name: &str) -> Result<(), NetError> {
    let fail = |step: &'static str| {
        move |source: std::io::Error| NetError::TapSetup {
            step,
            name: name.to_owned(),
            netns: netns.to_owned(),
            source,
        }
    };
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| fail("socket")(e.into()))?;
    let mut ifr = ifreq_named(name).map_err(fail("ifreq"))?;
    // The address first: the kernel gives it a classful mask, which the netmask then replaces
    // (the link is down until the end, so no route of the wrong size is ever used).
    ifr.ifr_ifru.ifru_addr = inet_sockaddr(GATEWAY_ADDR);
    ioctl_ifreq(&socket, libc::SIOCSIFADDR, &mut ifr).map_err(fail("SIOCSIFADDR"))?;
    let mask = u32::MAX << (32 - u32::from(INNER_PREFIX));
    ifr.ifr_ifru.ifru_netmask = inet_sockaddr(Ipv4Addr::from(mask));
    ioctl_ifreq(&socket, libc::SIOCSIFNETMASK, &mut ifr).map_err(fail("SIOCSIFNETMASK"))?;
    ioctl_ifreq(&socket, libc::SIOCGIFFLAGS, &mut ifr).map_err(fail("SIOCGIFFLAGS"))?;
    // SAFETY: SIOCGIFFLAGS has just written the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let up = libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    ifr.ifr_ifru.ifru_flags = flags | up;
    ioctl_ifreq(&socket, libc::SIOCSIFFLAGS, &mut ifr).map_err(fail("SIOCSIFFLAGS"))?;
    Ok(())
}

/// Makes one service socket in the calling thread's namespace: bound with `IP_FREEBIND` (its
/// address need not be up yet: the TAP's comes with the VMM), listening when it is TCP.
fn service_socket(netns: &str, which: ServiceSocket) -> Result<OwnedFd, NetError> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt,
    };
    let addr = which.addr();
    let fail = |source: nix::Error| {
        if source == nix::errno::Errno::EADDRINUSE {
            NetError::ServicesBusy {
                netns: netns.to_owned(),
            }
        } else {
            NetError::Service {
                addr,
                netns: netns.to_owned(),
                source,
            }
        }
    };
    let ty = if which.is_tcp() {
        SockType::Stream
    } else {
        SockType::Datagram
    };
    let fd = socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None).map_err(fail)?;
    setsockopt(&fd, sockopt::IpFreebind, &true).map_err(fail)?;
    if which.is_tcp() {
        // A listener of an earlier hearthd leaves connections in TIME_WAIT; they must not
        // keep the next one from binding. (A listener still open does: that is ServicesBusy.)
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(fail)?;
    }
    bind(fd.as_raw_fd(), &SockaddrIn::from(addr)).map_err(fail)?;
    if which.is_tcp() {
        listen(&fd, Backlog::new(64).map_err(fail)?).map_err(fail)?;
    }
    Ok(fd)
}

#[derive(Deserialize)]
struct JsonRoute {
    dst: String,
    dev: Option<String>,
}

#[derive(Deserialize)]
struct JsonLink {
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    addr_info: Vec<JsonAddr>,
}

#[derive(Deserialize)]
struct JsonAddr {
    family: Option<String>,
    local: Option<String>,
    prefixlen: Option<u8>,
}

/// `ip -j` prints nothing at all for an empty list on some versions.
fn json_list<T: for<'de> Deserialize<'de>>(command: &str, text: &str) -> Result<Vec<T>, NetError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(text).map_err(|e| NetError::Output {
        command: command.to_owned(),
        detail: e.to_string(),
    })
}

/// Parses `ip -j addr show dev LINK`'s output (the command succeeded: the link exists).
pub fn parse_link(command: &str, text: &str) -> Result<LinkState, NetError> {
    let links = json_list::<JsonLink>(command, text)?;
    let Some(link) = links.into_iter().next() else {
        return Ok(LinkState::default());
    };
    let mut addrs = Vec::new();
    for a in link.addr_info {
        if a.family.as_deref() != Some("inet") {
            continue;
        }
        let (Some(local), Some(prefix)) = (a.local, a.prefixlen) else {
            continue;
        };
        let addr = local.parse().map_err(|_| NetError::Output {
            command: command.to_owned(),
            detail: format!("address {local:?} is not an IPv4 address"),
        })?;
        addrs.push((addr, prefix));
    }
    Ok(LinkState {
        up: link.flags.iter().any(|f| f == "UP"),
        addrs,
    })
}

/// Parses `ip -j -4 route show`'s output: `dst` is `default`, an address, or a network.
pub fn parse_routes(command: &str, text: &str) -> Result<Vec<Route>, NetError> {
    json_list::<JsonRoute>(command, text)?
        .into_iter()
        .map(|r| {
            let bad = || NetError::Output {
                command: command.to_owned(),
                detail: format!("route destination {:?} is not an IPv4 network", r.dst),
            };
            let dst = if r.dst == "default" {
                Cidr::new(Ipv4Addr::UNSPECIFIED, 0)
            } else {
                let (addr, prefix) = r.dst.split_once('/').unwrap_or((&r.dst, "32"));
                let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
                let prefix: u8 = prefix.parse().map_err(|_| bad())?;
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix.min(32)))
                    .unwrap_or(0);
                Cidr::new(Ipv4Addr::from(u32::from(addr) & mask), prefix)
            }
            .ok_or_else(bad)?;
            Ok(Route { dst, dev: r.dev })
        })
        .collect()
}

/// A batch of `changes` in `ns` that `ip` refused.
fn batch_error(ns: Ns<'_>, changes: &[Change], source: CommandError) -> NetError {
    NetError::Batch {
        place: ns.to_string(),
        lines: changes
            .iter()
            .map(Change::line)
            .collect::<Vec<_>>()
            .join("; "),
        source,
    }
}

impl Net for RealNet {
    fn netns_list(&self) -> Result<Vec<String>, NetError> {
        let entries = match std::fs::read_dir(NETNS_DIR) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(NetError::Read {
                    path: NETNS_DIR.into(),
                    source,
                });
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| NetError::Read {
                path: NETNS_DIR.into(),
                source,
            })?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn netns_add(&self, name: &str) -> Result<(), NetError> {
        if Path::new(NETNS_DIR).join(name).exists() {
            // One that can be entered is a namespace. A file left by a namespace that was not
            // cleaned up cannot be: replace it.
            if in_netns(name, || Ok::<(), NetError>(())).is_ok() {
                return Ok(());
            }
            self.netns_delete(name)?;
        }
        cmd::run("ip", &["netns", "add", name], None)?;
        Ok(())
    }

    fn netns_delete(&self, name: &str) -> Result<(), NetError> {
        unless(
            ip(Ns::Host, &["netns", "delete", name], None),
            &["No such file or directory"],
        )
    }

    fn link(&self, ns: Ns<'_>, link: &str) -> Result<Option<LinkState>, NetError> {
        let args = ["-j", "addr", "show", "dev", link];
        match ip(ns, &args, None) {
            Ok(out) => parse_link(&cmd::display("ip", &args), &out).map(Some),
            Err(e) if e.stderr_contains("does not exist") => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn apply(&self, ns: Ns<'_>, changes: &[Change]) -> Result<(), NetError> {
        if changes.is_empty() {
            return Ok(());
        }
        let script: String = changes.iter().map(|c| c.line() + "\n").collect();
        match ip(ns, &["-batch", "-"], Some(&script)) {
            Ok(_) => Ok(()),
            Err(NetError::Command(source)) => Err(batch_error(ns, changes, source)),
            Err(e) => Err(e),
        }
    }

    fn routes(&self) -> Result<Vec<Route>, NetError> {
        let mut routes = Vec::new();
        for table in ["main", "local"] {
            let args = ["-j", "-4", "route", "show", "table", table];
            let out = match ip(Ns::Host, &args, None) {
                Ok(out) => out,
                // A namespace without routes has no table yet.
                Err(e) if e.stderr_contains("FIB table does not exist") => continue,
                Err(e) => return Err(e),
            };
            routes.extend(parse_routes(&cmd::display("ip", &args), &out)?);
        }
        Ok(routes)
    }

    fn sysctls(&self, ns: Ns<'_>, values: &[(&'static str, &'static str)]) -> Result<(), NetError> {
        let write_all = || {
            values
                .iter()
                .try_for_each(|(key, value)| write_sysctl(key, value))
        };
        match ns {
            Ns::Host => write_all(),
            Ns::Slot(name) => in_netns(name, write_all),
        }
    }

    fn open_tap(&self, netns: &str, name: &str) -> Result<OwnedFd, NetError> {
        in_netns(netns, || {
            let fd = create_tap(netns, name)?;
            configure_tap(netns, name)?;
            Ok(fd)
        })
    }

    fn open_services(&self, netns: &str) -> Result<Vec<OwnedFd>, NetError> {
        in_netns(netns, || {
            SERVICE_SOCKETS
                .iter()
                .map(|which| service_socket(netns, *which))
                .collect()
        })
    }
}

/// One call to a [`Net`], as data. `ns` is `None` for the host namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetCall {
    NetnsList,
    NetnsAdd(String),
    NetnsDelete(String),
    Link {
        ns: Option<String>,
        link: String,
    },
    Apply {
        ns: Option<String>,
        changes: Vec<Change>,
    },
    Routes,
    Sysctls {
        ns: Option<String>,
        values: Vec<(&'static str, &'static str)>,
    },
    OpenTap {
        netns: String,
        name: String,
    },
    OpenServices {
        netns: String,
    },
}

impl NetCall {
    /// True for the calls that run a program (`ip`) in [`RealNet`]; the others are system
    /// calls (reading `/run/netns`, `/proc/sys`, the TAP, sockets). What the fast path counts.
    pub fn runs_a_program(&self) -> bool {
        match self {
            NetCall::NetnsAdd(_)
            | NetCall::NetnsDelete(_)
            | NetCall::Link { .. }
            | NetCall::Apply { .. }
            | NetCall::Routes => true,
            NetCall::NetnsList
            | NetCall::Sysctls { .. }
            | NetCall::OpenTap { .. }
            | NetCall::OpenServices { .. } => false,
        }
    }
}

/// A link in a [`RecordingNet`]'s model of the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub up: bool,
    pub addrs: Vec<(Ipv4Addr, u8)>,
    /// The other end of a veth pair: (namespace, name).
    pub peer: Option<(Option<String>, String)>,
}

/// What a [`RecordingNet`] believes exists; tests set it up and read it back.
#[derive(Debug, Clone, Default)]
pub struct NetState {
    pub namespaces: BTreeSet<String>,
    /// Links by (namespace, name). A namespace comes with its `lo`.
    pub links: BTreeMap<(Option<String>, String), Link>,
    /// The host's routes, as [`Net::routes`] answers them.
    pub routes: Vec<Route>,
    pub default_routes: BTreeMap<Option<String>, (Ipv4Addr, String)>,
    pub sysctls: BTreeMap<(Option<String>, &'static str), &'static str>,
    /// The slots whose service sockets are open (a test removes one to close them).
    pub services: BTreeSet<String>,
    /// Calls of this kind (the [`NetCall`] variant's name, e.g. `"Link"`, or a [`Change`]'s,
    /// e.g. `"VethAdd"`, which fails the batch at that change) fail with this error output.
    pub fail: Option<(&'static str, String)>,
}

/// A [`Net`] that records calls and answers from a [`NetState`], modelling the kernel
/// behaviours the dispatch relies on (a namespace takes its links, and their veth peers, with
/// it; a batch stops at its first failing change; a TAP and the service sockets are busy while
/// open; what `ip` refuses, such as an existing name or a missing link, is refused).
#[derive(Debug, Default)]
pub struct RecordingNet {
    state: Mutex<NetState>,
    calls: Mutex<Vec<NetCall>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A failure as the real command reports it.
fn failed(command: &str, stderr: impl Into<String>) -> CommandError {
    CommandError::Failed {
        command: format!("recorded {command}"),
        status: std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
        stderr: stderr.into(),
    }
}

impl RecordingNet {
    pub fn new(state: NetState) -> RecordingNet {
        RecordingNet {
            state: Mutex::new(state),
            calls: Mutex::default(),
        }
    }
    /// The state as it is now.
    pub fn state(&self) -> NetState {
        lock(&self.state).clone()
    }
    /// Changes the state (to stage what a test needs between calls).
    pub fn with_state(&self, change: impl FnOnce(&mut NetState)) {
        change(&mut lock(&self.state));
    }
    /// The calls so far, and forgets them.
    pub fn take_calls(&self) -> Vec<NetCall> {
        std::mem::take(&mut lock(&self.calls))
    }

    /// Records `call` and runs `then` on the state, unless the state says this kind fails.
    fn record<T>(
        &self,
        kind: &'static str,
        call: NetCall,
        then: impl FnOnce(&mut NetState) -> Result<T, NetError>,
    ) -> Result<T, NetError> {
        lock(&self.calls).push(call);
        let mut state = lock(&self.state);
        if let Some((failing, stderr)) = &state.fail
            && *failing == kind
        {
            return Err(NetError::Command(failed(kind, stderr.clone())));
        }
        then(&mut state)
    }
}

impl NetState {
    /// Fails like [`in_netns`] when the slot's namespace is missing.
    fn enter(&self, ns: Ns<'_>) -> Result<(), NetError> {
        match ns {
            Ns::Slot(name) if !self.namespaces.contains(name) => Err(NetError::Read {
                path: Path::new(NETNS_DIR).join(name),
                source: std::io::ErrorKind::NotFound.into(),
            }),
            _ => Ok(()),
        }
    }

    fn make_namespace(&mut self, name: &str) {
        self.namespaces.insert(name.to_owned());
        self.links
            .entry((Some(name.to_owned()), "lo".to_owned()))
            .or_default();
    }

    fn remove_link(&mut self, key: &(Option<String>, String)) {
        if let Some(link) = self.links.remove(key)
            && let Some(peer) = link.peer
        {
            self.links.remove(&peer);
        }
    }

    /// One change, or the error output `ip` would give for it.
    fn change(&mut self, ns: Ns<'_>, change: &Change) -> Result<(), String> {
        let key = |link: &str| (ns.name(), link.to_owned());
        let missing = |link: &str| format!("Cannot find device \"{link}\"");
        match change {
            Change::NetnsAdd { name } => {
                if self.namespaces.contains(name) {
                    return Err(format!(
                        "Cannot create namespace file \"{NETNS_DIR}/{name}\": File exists"
                    ));
                }
                self.make_namespace(name);
            }
            Change::VethAdd {
                link,
                peer,
                peer_ns,
            } => {
                if !self.namespaces.contains(peer_ns) {
                    return Err(format!("Invalid \"netns\" value \"{peer_ns}\""));
                }
                let here = key(link);
                let there = (Some(peer_ns.clone()), peer.clone());
                if self.links.contains_key(&here) || self.links.contains_key(&there) {
                    return Err("RTNETLINK answers: File exists".into());
                }
                self.links.insert(
                    here.clone(),
                    Link {
                        peer: Some(there.clone()),
                        ..Link::default()
                    },
                );
                self.links.insert(
                    there,
                    Link {
                        peer: Some(here),
                        ..Link::default()
                    },
                );
            }
            Change::LinkDelete { link } => {
                if !self.links.contains_key(&key(link)) {
                    return Err(missing(link));
                }
                self.remove_link(&key(link));
            }
            Change::LinkUp { link } => {
                self.links
                    .get_mut(&key(link))
                    .ok_or_else(|| missing(link))?
                    .up = true;
            }
            Change::AddrAdd { link, addr, prefix } => {
                let l = self
                    .links
                    .get_mut(&key(link))
                    .ok_or_else(|| missing(link))?;
                if !l.addrs.contains(&(*addr, *prefix)) {
                    l.addrs.push((*addr, *prefix));
                }
            }
            Change::AddrDel { link, addr, prefix } => {
                let l = self
                    .links
                    .get_mut(&key(link))
                    .ok_or_else(|| missing(link))?;
                if !l.addrs.contains(&(*addr, *prefix)) {
                    return Err("RTNETLINK answers: Cannot assign requested address".into());
                }
                l.addrs.retain(|a| *a != (*addr, *prefix));
            }
            Change::DefaultRoute { via, link } => {
                if !self.links.contains_key(&key(link)) {
                    return Err(missing(link));
                }
                self.default_routes
                    .insert(ns.name(), (*via, link.to_owned()));
            }
        }
        Ok(())
    }
}

/// Any open descriptor stands in for a TAP's or a socket's.
fn stand_in() -> Result<OwnedFd, NetError> {
    File::open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|source| NetError::Read {
            path: "/dev/null".into(),
            source,
        })
}

impl Net for RecordingNet {
    fn netns_list(&self) -> Result<Vec<String>, NetError> {
        self.record("NetnsList", NetCall::NetnsList, |s| {
            Ok(s.namespaces.iter().cloned().collect())
        })
    }

    fn netns_add(&self, name: &str) -> Result<(), NetError> {
        self.record("NetnsAdd", NetCall::NetnsAdd(name.to_owned()), |s| {
            s.make_namespace(name);
            Ok(())
        })
    }

    fn netns_delete(&self, name: &str) -> Result<(), NetError> {
        self.record("NetnsDelete", NetCall::NetnsDelete(name.to_owned()), |s| {
            s.namespaces.remove(name);
            let inside: Vec<_> = s
                .links
                .keys()
                .filter(|(ns, _)| ns.as_deref() == Some(name))
                .cloned()
                .collect();
            for key in inside {
                s.remove_link(&key);
            }
            s.default_routes.remove(&Some(name.to_owned()));
            s.sysctls.retain(|(ns, _), _| ns.as_deref() != Some(name));
            s.services.remove(name);
            Ok(())
        })
    }

    fn link(&self, ns: Ns<'_>, link: &str) -> Result<Option<LinkState>, NetError> {
        let call = NetCall::Link {
            ns: ns.name(),
            link: link.to_owned(),
        };
        self.record("Link", call, |s| {
            s.enter(ns)?;
            Ok(s.links
                .get(&(ns.name(), link.to_owned()))
                .map(|l| LinkState {
                    up: l.up,
                    addrs: l.addrs.clone(),
                }))
        })
    }

    fn apply(&self, ns: Ns<'_>, changes: &[Change]) -> Result<(), NetError> {
        if changes.is_empty() {
            return Ok(());
        }
        let call = NetCall::Apply {
            ns: ns.name(),
            changes: changes.to_vec(),
        };
        self.record("Apply", call, |s| {
            s.enter(ns)?;
            for change in changes {
                let refused = match &s.fail {
                    Some((kind, stderr)) if *kind == change.kind() => Err(stderr.clone()),
                    _ => s.change(ns, change),
                };
                if let Err(stderr) = refused {
                    return Err(batch_error(ns, changes, failed("ip -batch -", stderr)));
                }
            }
            Ok(())
        })
    }

    fn routes(&self) -> Result<Vec<Route>, NetError> {
        self.record("Routes", NetCall::Routes, |s| Ok(s.routes.clone()))
    }

    fn sysctls(&self, ns: Ns<'_>, values: &[(&'static str, &'static str)]) -> Result<(), NetError> {
        let call = NetCall::Sysctls {
            ns: ns.name(),
            values: values.to_vec(),
        };
        self.record("Sysctls", call, |s| {
            s.enter(ns)?;
            for (key, value) in values {
                s.sysctls.insert((ns.name(), key), value);
            }
            Ok(())
        })
    }

    fn open_tap(&self, netns: &str, name: &str) -> Result<OwnedFd, NetError> {
        let call = NetCall::OpenTap {
            netns: netns.to_owned(),
            name: name.to_owned(),
        };
        self.record("OpenTap", call, |s| {
            s.enter(Ns::Slot(netns))?;
            let key = (Some(netns.to_owned()), name.to_owned());
            if s.links.contains_key(&key) {
                return Err(NetError::TapBusy {
                    name: name.to_owned(),
                    netns: netns.to_owned(),
                });
            }
            s.links.insert(
                key,
                Link {
                    up: true,
                    addrs: vec![(GATEWAY_ADDR, INNER_PREFIX)],
                    peer: None,
                },
            );
            stand_in()
        })
    }

    fn open_services(&self, netns: &str) -> Result<Vec<OwnedFd>, NetError> {
        let call = NetCall::OpenServices {
            netns: netns.to_owned(),
        };
        self.record("OpenServices", call, |s| {
            s.enter(Ns::Slot(netns))?;
            if !s.services.insert(netns.to_owned()) {
                return Err(NetError::ServicesBusy {
                    netns: netns.to_owned(),
                });
            }
            SERVICE_SOCKETS.iter().map(|_| stand_in()).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_from_ip_json() {
        let text = r#"[{"dst":"default","gateway":"192.0.2.1","dev":"eth0","flags":[]},
            {"dst":"192.0.2.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"192.0.2.2","flags":[]},
            {"type":"local","dst":"127.0.0.1","dev":"lo","flags":[]},
            {"type":"blackhole","dst":"198.51.100.7/24","flags":[]}]"#;
        let routes = parse_routes("ip -j -4 route show", text).unwrap();
        let dsts: Vec<String> = routes.iter().map(|r| r.dst.to_string()).collect();
        assert_eq!(
            dsts,
            [
                "0.0.0.0/0",
                "192.0.2.0/24",
                "127.0.0.1/32",
                "198.51.100.0/24"
            ]
        );
        assert_eq!(routes[0].dev.as_deref(), Some("eth0"));
        assert_eq!(routes[3].dev, None);
        assert!(parse_routes("ip", "").unwrap().is_empty());
        let bad = parse_routes("ip -j route", r#"[{"dst":"fe80::/64"}]"#).unwrap_err();
        assert!(
            bad.to_string()
                .contains("route destination \"fe80::/64\" is not an IPv4 network"),
            "{bad}"
        );
        let garbage = parse_routes("ip -j route", "{").unwrap_err();
        assert!(garbage.to_string().contains("`ip -j route`"), "{garbage}");
    }

    #[test]
    fn links_parse_from_ip_json_with_their_ipv4_addresses() {
        let text = r#"[{"ifindex":3,"link":"vb","ifname":"va","flags":["NO-CARRIER","BROADCAST","MULTICAST","UP","M-DOWN"],"mtu":1500,
            "addr_info":[{"family":"inet","local":"172.28.0.6","prefixlen":30,"scope":"global"},
                         {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#;
        assert_eq!(
            parse_link("ip -j addr show dev va", text).unwrap(),
            LinkState {
                up: true,
                addrs: vec![(Ipv4Addr::new(172, 28, 0, 6), 30)]
            }
        );
        let down = r#"[{"ifname":"va","flags":["BROADCAST","MULTICAST"],"addr_info":[]}]"#;
        assert_eq!(parse_link("ip", down).unwrap(), LinkState::default());
        assert_eq!(parse_link("ip", "").unwrap(), LinkState::default());
        let bad = r#"[{"flags":[],"addr_info":[{"family":"inet","local":"x","prefixlen":3}]}]"#;
        assert!(parse_link("ip", bad).is_err());
    }

    #[test]
    fn changes_are_ip_batch_lines() {
        let lines: Vec<String> = [
            Change::NetnsAdd {
                name: "hearth-0123abcd-fedcba9876543210".into(),
            },
            Change::VethAdd {
                link: "hv0123456789abc".into(),
                peer: "eth0".into(),
                peer_ns: "hearth-0123abcd-fedcba9876543210".into(),
            },
            Change::LinkDelete {
                link: "eth0".into(),
            },
            Change::LinkUp { link: "lo".into() },
            Change::AddrAdd {
                link: "lo".into(),
                addr: Ipv4Addr::new(169, 254, 169, 254),
                prefix: 32,
            },
            Change::AddrDel {
                link: "eth0".into(),
                addr: Ipv4Addr::new(192, 0, 2, 1),
                prefix: 24,
            },
            Change::DefaultRoute {
                via: Ipv4Addr::new(172, 28, 0, 5),
                link: "eth0".into(),
            },
        ]
        .iter()
        .map(Change::line)
        .collect();
        assert_eq!(
            lines,
            [
                "netns add hearth-0123abcd-fedcba9876543210",
                "link add name hv0123456789abc type veth peer name eth0 netns hearth-0123abcd-fedcba9876543210",
                "link delete dev eth0",
                "link set dev lo up",
                "addr replace 169.254.169.254/32 dev lo",
                "addr del 192.0.2.1/24 dev eth0",
                "route replace default via 172.28.0.5 dev eth0",
            ]
        );
    }

    #[test]
    fn the_recording_model_refuses_what_ip_refuses_and_stops_a_batch_there() {
        let net = RecordingNet::default();
        let veth = Change::VethAdd {
            link: "hv1".into(),
            peer: "eth0".into(),
            peer_ns: "s".into(),
        };
        let refused = net
            .apply(Ns::Host, std::slice::from_ref(&veth))
            .unwrap_err();
        assert!(
            refused.to_string().contains("in the host namespace"),
            "{refused}"
        );
        net.apply(
            Ns::Host,
            &[Change::NetnsAdd { name: "s".into() }, veth.clone()],
        )
        .unwrap();
        assert!(
            net.state()
                .links
                .contains_key(&(Some("s".into()), "lo".into()))
        );
        // The second veth stops the batch: the address before it stays, the one after is not made.
        let up = Change::LinkUp { link: "hv1".into() };
        let err = net
            .apply(
                Ns::Host,
                &[
                    Change::AddrAdd {
                        link: "hv1".into(),
                        addr: Ipv4Addr::new(172, 28, 0, 5),
                        prefix: 30,
                    },
                    veth,
                    up.clone(),
                ],
            )
            .unwrap_err();
        assert!(err.stderr_contains("File exists"), "{err}");
        let hv1 = net.link(Ns::Host, "hv1").unwrap().unwrap();
        assert_eq!(hv1.addrs, [(Ipv4Addr::new(172, 28, 0, 5), 30)]);
        assert!(!hv1.up);
        assert!(
            net.apply(Ns::Slot("s"), &[Change::LinkDelete { link: "x".into() }])
                .unwrap_err()
                .stderr_contains("Cannot find device")
        );
        assert!(net.link(Ns::Slot("t"), "lo").is_err(), "no namespace t");
        net.netns_delete("s").unwrap();
        assert_eq!(net.link(Ns::Host, "hv1").unwrap(), None);
        assert!(net.state().links.is_empty());
        net.with_state(|s| s.fail = Some(("LinkUp", "boom".into())));
        net.netns_add("s").unwrap();
        let err = net.apply(Ns::Slot("s"), &[Change::LinkUp { link: "lo".into() }]);
        assert!(err.unwrap_err().to_string().contains("link set dev lo up"));
        assert_eq!(net.take_calls().len(), 10);
        assert!(net.apply(Ns::Host, &[]).is_ok());
        assert!(net.take_calls().is_empty(), "nothing to change is no call");
    }
}
