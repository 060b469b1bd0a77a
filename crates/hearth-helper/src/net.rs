//! The network operations the helper needs, behind one trait (youki's `Syscall` pattern):
//! [`RealNet`] runs `ip` (iproute2) with argument vectors and enters slot namespaces from a
//! short-lived thread; [`RecordingNet`] records every call as data and answers from a state the
//! test programs, so the dispatch is tested without root.
//!
//! Idempotency lives here: adding what exists and deleting what is gone succeed.

use std::collections::{BTreeMap, BTreeSet};
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
use crate::proto::{Cidr, SERVICE_SOCKETS, ServiceSocket};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// The TUN/TAP clone device.
const TUN_DEVICE: &str = "/dev/net/tun";

/// `net.ipv4.ip_forward`, written in the host namespace at Setup and in every slot.
pub const IP_FORWARD: &str = "net/ipv4/ip_forward";
/// `net.ipv4.conf.all.rp_filter`: strict reverse-path filtering in every slot.
pub const RP_FILTER: &str = "net/ipv4/conf/all/rp_filter";

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

/// One route of the host namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The destination (`0.0.0.0/0` for a default route).
    pub dst: Cidr,
    /// The device, when the route has one.
    pub dev: Option<String>,
}

/// A network operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Command(#[from] CommandError),
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

/// What the helper does to the network. Every method is idempotent where the name says
/// add/delete/up.
pub trait Net: Send + Sync {
    /// The names under [`NETNS_DIR`].
    fn netns_list(&self) -> Result<Vec<String>, NetError>;
    /// Creates the namespace; an existing one is kept (a stale file without a namespace is
    /// replaced).
    fn netns_add(&self, name: &str) -> Result<(), NetError>;
    /// Deletes the namespace; a missing one is fine.
    fn netns_delete(&self, name: &str) -> Result<(), NetError>;
    fn link_exists(&self, ns: Ns<'_>, link: &str) -> Result<bool, NetError>;
    /// Creates a veth pair: `host` in the host namespace, `peer` inside `peer_ns`.
    fn veth_add(&self, host: &str, peer: &str, peer_ns: &str) -> Result<(), NetError>;
    /// Deletes the link; a missing one is fine.
    fn link_delete(&self, ns: Ns<'_>, link: &str) -> Result<(), NetError>;
    fn link_up(&self, ns: Ns<'_>, link: &str) -> Result<(), NetError>;
    /// The IPv4 addresses (with prefix lengths) on `link`.
    fn addrs(&self, ns: Ns<'_>, link: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetError>;
    /// Adds the address; one already there is fine.
    fn addr_add(&self, ns: Ns<'_>, link: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError>;
    /// Removes the address; one already gone is fine.
    fn addr_del(&self, ns: Ns<'_>, link: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError>;
    /// Sets (adds or replaces) the default route.
    fn default_route(&self, ns: Ns<'_>, via: Ipv4Addr, link: &str) -> Result<(), NetError>;
    /// The IPv4 routes of the host namespace (tables main and local).
    fn routes(&self) -> Result<Vec<Route>, NetError>;
    /// Writes `/proc/sys/<key>` in the namespace.
    fn sysctl(&self, ns: Ns<'_>, key: &'static str, value: &'static str) -> Result<(), NetError>;
    /// Creates the TAP `name` inside the slot (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, not
    /// persistent: it goes when the last descriptor closes) and returns its descriptor.
    /// A TAP of that name that is still open is [`NetError::TapBusy`].
    fn open_tap(&self, netns: &str, name: &str) -> Result<OwnedFd, NetError>;
    /// Makes the slot's service sockets ([`SERVICE_SOCKETS`], in that order) inside it and
    /// returns them. An address still taken (an earlier set is open) is
    /// [`NetError::ServicesBusy`].
    fn open_services(&self, netns: &str) -> Result<Vec<OwnedFd>, NetError>;
}

/// The real thing: `ip` with argument vectors, `setns` in a thread for `/proc/sys` and the TAP.
#[derive(Debug, Default)]
pub struct RealNet;

fn ip(ns: Ns<'_>, args: &[&str]) -> Result<String, CommandError> {
    let mut all: Vec<&str> = Vec::with_capacity(args.len() + 2);
    if let Ns::Slot(name) = ns {
        all.extend(["-n", name]);
    }
    all.extend(args);
    cmd::run("ip", &all, None)
}

/// `result`, with the failures whose error output says `benign` turned into success.
fn unless(result: Result<String, CommandError>, benign: &[&str]) -> Result<(), NetError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if benign.iter().any(|text| e.stderr_contains(text)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Runs `work` on a thread of its own that has entered the slot's network namespace; the
/// thread ends with it, so no other thread of the helper ever leaves the host namespace.
fn in_netns<T: Send>(
    netns: &str,
    work: impl FnOnce() -> Result<T, NetError> + Send,
) -> Result<T, NetError> {
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
                })
            })
    })
}

fn write_sysctl(key: &'static str, value: &'static str) -> Result<(), NetError> {
    OpenOptions::new()
        .write(true)
        .open(Path::new("/proc/sys").join(key))
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| NetError::Sysctl { key, value, source })
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
    // SAFETY: `ifreq` is plain old data (a name array and a union of integers and plain
    // structs), for which all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= ifr.ifr_name.len() {
        return Err(tap_error(std::io::Error::other(
            "the name is longer than the kernel's 15 bytes",
        )));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    ifr.ifr_ifru.ifru_flags =
        libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
            .map_err(|_| tap_error(std::io::Error::other("the TAP flags do not fit a short")))?;
    // SAFETY: the descriptor is open (owned by `file`, alive for the call), TUNSETIFF reads and
    // writes one `struct ifreq`, and `ifr` is one, initialised and exclusively borrowed.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
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
    addr_info: Vec<JsonAddr>,
}

#[derive(Deserialize)]
struct JsonAddr {
    local: Option<Ipv4Addr>,
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
        match cmd::run("ip", &["netns", "add", name], None) {
            Ok(_) => Ok(()),
            Err(e) if e.stderr_contains("File exists") => {
                // A file left by a namespace that was not cleaned up cannot be entered:
                // replace it.
                if ip(Ns::Slot(name), &["link", "show", "dev", "lo"]).is_ok() {
                    return Ok(());
                }
                self.netns_delete(name)?;
                cmd::run("ip", &["netns", "add", name], None)?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn netns_delete(&self, name: &str) -> Result<(), NetError> {
        unless(
            cmd::run("ip", &["netns", "delete", name], None),
            &["No such file or directory"],
        )
    }

    fn link_exists(&self, ns: Ns<'_>, link: &str) -> Result<bool, NetError> {
        match ip(ns, &["link", "show", "dev", link]) {
            Ok(_) => Ok(true),
            Err(e) if e.stderr_contains("does not exist") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn veth_add(&self, host: &str, peer: &str, peer_ns: &str) -> Result<(), NetError> {
        ip(
            Ns::Host,
            &[
                "link", "add", host, "type", "veth", "peer", "name", peer, "netns", peer_ns,
            ],
        )?;
        Ok(())
    }

    fn link_delete(&self, ns: Ns<'_>, link: &str) -> Result<(), NetError> {
        unless(
            ip(ns, &["link", "delete", "dev", link]),
            &["Cannot find device"],
        )
    }

    fn link_up(&self, ns: Ns<'_>, link: &str) -> Result<(), NetError> {
        ip(ns, &["link", "set", "dev", link, "up"])?;
        Ok(())
    }

    fn addrs(&self, ns: Ns<'_>, link: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
        let args = ["-j", "-4", "addr", "show", "dev", link];
        let out = ip(ns, &args)?;
        let links: Vec<JsonLink> = json_list(&cmd::display("ip", &args), &out)?;
        Ok(links
            .into_iter()
            .flat_map(|l| l.addr_info)
            .filter_map(|a| Some((a.local?, a.prefixlen?)))
            .collect())
    }

    fn addr_add(&self, ns: Ns<'_>, link: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let addr = format!("{addr}/{prefix}");
        unless(
            ip(ns, &["addr", "add", &addr, "dev", link]),
            &["File exists", "Address already assigned"],
        )
    }

    fn addr_del(&self, ns: Ns<'_>, link: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let addr = format!("{addr}/{prefix}");
        unless(
            ip(ns, &["addr", "del", &addr, "dev", link]),
            &["Address not found", "Cannot assign requested address"],
        )
    }

    fn default_route(&self, ns: Ns<'_>, via: Ipv4Addr, link: &str) -> Result<(), NetError> {
        let via = via.to_string();
        ip(
            ns,
            &["route", "replace", "default", "via", &via, "dev", link],
        )?;
        Ok(())
    }

    fn routes(&self) -> Result<Vec<Route>, NetError> {
        let mut routes = Vec::new();
        for table in ["main", "local"] {
            let args = ["-j", "-4", "route", "show", "table", table];
            let out = match ip(Ns::Host, &args) {
                Ok(out) => out,
                // A namespace without routes has no table yet.
                Err(e) if e.stderr_contains("FIB table does not exist") => continue,
                Err(e) => return Err(e.into()),
            };
            routes.extend(parse_routes(&cmd::display("ip", &args), &out)?);
        }
        Ok(routes)
    }

    fn sysctl(&self, ns: Ns<'_>, key: &'static str, value: &'static str) -> Result<(), NetError> {
        match ns {
            Ns::Host => write_sysctl(key, value),
            Ns::Slot(name) => in_netns(name, || write_sysctl(key, value)),
        }
    }

    fn open_tap(&self, netns: &str, name: &str) -> Result<OwnedFd, NetError> {
        let fd = in_netns(netns, || create_tap(netns, name))?;
        self.addr_add(
            Ns::Slot(netns),
            name,
            crate::proto::GATEWAY_ADDR,
            crate::proto::INNER_PREFIX,
        )?;
        self.link_up(Ns::Slot(netns), name)?;
        Ok(fd)
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
    LinkExists {
        ns: Option<String>,
        link: String,
    },
    VethAdd {
        host: String,
        peer: String,
        peer_ns: String,
    },
    LinkDelete {
        ns: Option<String>,
        link: String,
    },
    LinkUp {
        ns: Option<String>,
        link: String,
    },
    Addrs {
        ns: Option<String>,
        link: String,
    },
    AddrAdd {
        ns: Option<String>,
        link: String,
        addr: Ipv4Addr,
        prefix: u8,
    },
    AddrDel {
        ns: Option<String>,
        link: String,
        addr: Ipv4Addr,
        prefix: u8,
    },
    DefaultRoute {
        ns: Option<String>,
        via: Ipv4Addr,
        link: String,
    },
    Routes,
    Sysctl {
        ns: Option<String>,
        key: &'static str,
        value: &'static str,
    },
    OpenTap {
        netns: String,
        name: String,
    },
    OpenServices {
        netns: String,
    },
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
    /// Links by (namespace, name).
    pub links: BTreeMap<(Option<String>, String), Link>,
    /// The host's routes, as [`Net::routes`] answers them.
    pub routes: Vec<Route>,
    pub default_routes: BTreeMap<Option<String>, (Ipv4Addr, String)>,
    pub sysctls: BTreeMap<(Option<String>, &'static str), &'static str>,
    /// Calls of this kind (the [`NetCall`] variant's name, e.g. `"VethAdd"`) fail with this
    /// error output.
    pub fail: Option<(&'static str, String)>,
}

/// A [`Net`] that records calls and answers from a [`NetState`], modelling the few kernel
/// behaviours the dispatch relies on (a namespace takes its links, and their veth peers, with
/// it; a TAP is busy while it exists).
#[derive(Debug, Default)]
pub struct RecordingNet {
    state: Mutex<NetState>,
    calls: Mutex<Vec<NetCall>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
            return Err(NetError::Command(CommandError::Failed {
                command: format!("recorded {kind}"),
                status: std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
                stderr: stderr.clone(),
            }));
        }
        then(&mut state)
    }
}

/// The model's answer when a link is missing, worded like `ip`'s.
fn no_link(link: &str) -> NetError {
    NetError::Command(CommandError::Failed {
        command: format!("recorded ip link {link}"),
        status: std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
        stderr: format!("Cannot find device \"{link}\""),
    })
}

impl NetState {
    fn link_mut(&mut self, ns: Ns<'_>, link: &str) -> Result<&mut Link, NetError> {
        self.links
            .get_mut(&(ns.name(), link.to_owned()))
            .ok_or_else(|| no_link(link))
    }

    fn remove_link(&mut self, key: &(Option<String>, String)) {
        if let Some(link) = self.links.remove(key)
            && let Some(peer) = link.peer
        {
            self.links.remove(&peer);
        }
    }
}

impl Net for RecordingNet {
    fn netns_list(&self) -> Result<Vec<String>, NetError> {
        self.record("NetnsList", NetCall::NetnsList, |s| {
            Ok(s.namespaces.iter().cloned().collect())
        })
    }

    fn netns_add(&self, name: &str) -> Result<(), NetError> {
        self.record("NetnsAdd", NetCall::NetnsAdd(name.to_owned()), |s| {
            s.namespaces.insert(name.to_owned());
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
            Ok(())
        })
    }

    fn link_exists(&self, ns: Ns<'_>, link: &str) -> Result<bool, NetError> {
        let call = NetCall::LinkExists {
            ns: ns.name(),
            link: link.to_owned(),
        };
        self.record("LinkExists", call, |s| {
            Ok(s.links.contains_key(&(ns.name(), link.to_owned())))
        })
    }

    fn veth_add(&self, host: &str, peer: &str, peer_ns: &str) -> Result<(), NetError> {
        let call = NetCall::VethAdd {
            host: host.to_owned(),
            peer: peer.to_owned(),
            peer_ns: peer_ns.to_owned(),
        };
        self.record("VethAdd", call, |s| {
            let host_key = (None, host.to_owned());
            let peer_key = (Some(peer_ns.to_owned()), peer.to_owned());
            if s.links.contains_key(&host_key) || s.links.contains_key(&peer_key) {
                return Err(NetError::Command(CommandError::Failed {
                    command: "recorded ip link add".into(),
                    status: std::os::unix::process::ExitStatusExt::from_raw(2 << 8),
                    stderr: "RTNETLINK answers: File exists".into(),
                }));
            }
            s.links.insert(
                host_key.clone(),
                Link {
                    peer: Some(peer_key.clone()),
                    ..Link::default()
                },
            );
            s.links.insert(
                peer_key,
                Link {
                    peer: Some(host_key),
                    ..Link::default()
                },
            );
            Ok(())
        })
    }

    fn link_delete(&self, ns: Ns<'_>, link: &str) -> Result<(), NetError> {
        let call = NetCall::LinkDelete {
            ns: ns.name(),
            link: link.to_owned(),
        };
        self.record("LinkDelete", call, |s| {
            s.remove_link(&(ns.name(), link.to_owned()));
            Ok(())
        })
    }

    fn link_up(&self, ns: Ns<'_>, link: &str) -> Result<(), NetError> {
        let call = NetCall::LinkUp {
            ns: ns.name(),
            link: link.to_owned(),
        };
        self.record("LinkUp", call, |s| {
            if link == "lo" && ns != Ns::Host {
                s.links.entry((ns.name(), link.to_owned())).or_default();
            }
            s.link_mut(ns, link)?.up = true;
            Ok(())
        })
    }

    fn addrs(&self, ns: Ns<'_>, link: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
        let call = NetCall::Addrs {
            ns: ns.name(),
            link: link.to_owned(),
        };
        self.record("Addrs", call, |s| Ok(s.link_mut(ns, link)?.addrs.clone()))
    }

    fn addr_add(&self, ns: Ns<'_>, link: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let call = NetCall::AddrAdd {
            ns: ns.name(),
            link: link.to_owned(),
            addr,
            prefix,
        };
        self.record("AddrAdd", call, |s| {
            let l = s.link_mut(ns, link)?;
            if !l.addrs.contains(&(addr, prefix)) {
                l.addrs.push((addr, prefix));
            }
            Ok(())
        })
    }

    fn addr_del(&self, ns: Ns<'_>, link: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let call = NetCall::AddrDel {
            ns: ns.name(),
            link: link.to_owned(),
            addr,
            prefix,
        };
        self.record("AddrDel", call, |s| {
            s.link_mut(ns, link)?.addrs.retain(|a| *a != (addr, prefix));
            Ok(())
        })
    }

    fn default_route(&self, ns: Ns<'_>, via: Ipv4Addr, link: &str) -> Result<(), NetError> {
        let call = NetCall::DefaultRoute {
            ns: ns.name(),
            via,
            link: link.to_owned(),
        };
        self.record("DefaultRoute", call, |s| {
            s.link_mut(ns, link)?;
            s.default_routes.insert(ns.name(), (via, link.to_owned()));
            Ok(())
        })
    }

    fn routes(&self) -> Result<Vec<Route>, NetError> {
        self.record("Routes", NetCall::Routes, |s| Ok(s.routes.clone()))
    }

    fn sysctl(&self, ns: Ns<'_>, key: &'static str, value: &'static str) -> Result<(), NetError> {
        let call = NetCall::Sysctl {
            ns: ns.name(),
            key,
            value,
        };
        self.record("Sysctl", call, |s| {
            s.sysctls.insert((ns.name(), key), value);
            Ok(())
        })
    }

    fn open_tap(&self, netns: &str, name: &str) -> Result<OwnedFd, NetError> {
        let call = NetCall::OpenTap {
            netns: netns.to_owned(),
            name: name.to_owned(),
        };
        self.record("OpenTap", call, |s| {
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
                    addrs: vec![(crate::proto::GATEWAY_ADDR, crate::proto::INNER_PREFIX)],
                    peer: None,
                },
            );
            // Any open descriptor stands in for the TAP's.
            let null = File::open("/dev/null").map_err(|source| NetError::Read {
                path: "/dev/null".into(),
                source,
            })?;
            Ok(OwnedFd::from(null))
        })
    }

    fn open_services(&self, netns: &str) -> Result<Vec<OwnedFd>, NetError> {
        let call = NetCall::OpenServices {
            netns: netns.to_owned(),
        };
        self.record("OpenServices", call, |_| {
            // Any open descriptors stand in for the sockets.
            SERVICE_SOCKETS
                .iter()
                .map(|_| {
                    File::open("/dev/null")
                        .map(OwnedFd::from)
                        .map_err(|source| NetError::Read {
                            path: "/dev/null".into(),
                            source,
                        })
                })
                .collect()
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
    fn the_recording_model_deletes_veth_peers_with_their_namespace() {
        let net = RecordingNet::default();
        net.netns_add("s").unwrap();
        net.veth_add("hv1", "eth0", "s").unwrap();
        assert!(net.veth_add("hv1", "eth0", "s").is_err());
        net.link_up(Ns::Slot("s"), "lo").unwrap();
        assert!(net.link_exists(Ns::Host, "hv1").unwrap());
        net.netns_delete("s").unwrap();
        assert!(!net.link_exists(Ns::Host, "hv1").unwrap());
        assert!(net.state().links.is_empty());
        net.with_state(|s| s.fail = Some(("NetnsAdd", "boom".into())));
        assert!(net.netns_add("t").unwrap_err().to_string().contains("boom"));
        assert_eq!(net.take_calls().len(), 8);
    }
}
