//! The guest's network, set up by PID 1 from the kernel command line.
//!
//! hearthd boots every VM with `hearth.ip=ADDR/PREFIX hearth.gw=GATEWAY hearth.dns=SERVER`. The
//! guest kernel has no IP autoconfiguration and nothing from the disk runs first, so PID 1 does it
//! here with the classic ioctls (`SIOCSIFADDR`, `SIOCSIFNETMASK`, `SIOCSIFFLAGS`, `SIOCADDRT`):
//! no fork+exec of `ip`, which costs tens of milliseconds under TCG. It then writes
//! `/etc/resolv.conf`.
//!
//! Without `hearth.ip` there is no network, as before. A malformed parameter is reported on the
//! console in one line and the guest boots without a network: a half-configured NIC is harder to
//! diagnose than none.

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::init::cmdline_param;

/// The guest NIC's MAC address, the same in every slot (`hearth_helper::proto::GUEST_MAC`; a
/// test keeps the two equal).
pub const GUEST_MAC: &str = "06:00:0a:fe:fe:02";

/// Where the kernel lists network interfaces.
const SYS_CLASS_NET: &str = "/sys/class/net";

/// How long PID 1 waits for a NIC to appear when `hearth.ip` asks for one. The initramfs loads
/// `virtio_net` before `switch_root` and its probe registers the device synchronously, so in
/// practice the NIC is there at once; this only bounds the wait if it is not.
const NIC_WAIT: Duration = Duration::from_millis(500);

/// What the kernel command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's address (`hearth.ip`, before the `/`).
    pub addr: Ipv4Addr,
    /// The prefix length of its network (`hearth.ip`, after the `/`).
    pub prefix: u8,
    /// The default gateway (`hearth.gw`).
    pub gateway: Ipv4Addr,
    /// The DNS server written to `/etc/resolv.conf` (`hearth.dns`).
    pub dns: Ipv4Addr,
}

impl NetConfig {
    /// The netmask of [`NetConfig::prefix`].
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(prefix_mask(self.prefix))
    }
}

/// Why the network parameters on the kernel command line cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("kernel parameter {key}={value:?} is invalid: {rule}")]
    Invalid {
        key: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error("kernel parameter {key} is missing: {rule}")]
    Missing {
        key: &'static str,
        rule: &'static str,
    },
}

/// Reads `hearth.ip`, `hearth.gw` and `hearth.dns`. `Ok(None)` when none of them is given (no
/// network); an error when some are missing or any is malformed.
pub fn parse_params(cmdline: &str) -> Result<Option<NetConfig>, ParamError> {
    let ip = cmdline_param(cmdline, "hearth.ip");
    let gw = cmdline_param(cmdline, "hearth.gw");
    let dns = cmdline_param(cmdline, "hearth.dns");
    if ip.is_none() && gw.is_none() && dns.is_none() {
        return Ok(None);
    }
    const ALL_THREE: &str = "hearth.ip, hearth.gw and hearth.dns go together";
    let missing = |key| ParamError::Missing {
        key,
        rule: ALL_THREE,
    };
    let ip = ip.ok_or_else(|| missing("hearth.ip"))?;
    let gw = gw.ok_or_else(|| missing("hearth.gw"))?;
    let dns = dns.ok_or_else(|| missing("hearth.dns"))?;

    let invalid = |key, value: &str, rule| ParamError::Invalid {
        key,
        value: value.to_owned(),
        rule,
    };
    let (addr, prefix) = ip
        .split_once('/')
        .ok_or_else(|| invalid("hearth.ip", ip, "write it as a.b.c.d/n"))?;
    let addr = parse_addr(addr).ok_or_else(|| {
        invalid(
            "hearth.ip",
            ip,
            "the address must be four numbers 0-255, like 10.254.254.2",
        )
    })?;
    let prefix = parse_prefix(prefix).ok_or_else(|| {
        invalid(
            "hearth.ip",
            ip,
            "the prefix length after / must be a number from 1 to 30",
        )
    })?;
    let mask = prefix_mask(prefix);
    let host = u32::from(addr) & !mask;
    if host == 0 || host == !mask {
        return Err(invalid(
            "hearth.ip",
            ip,
            "the address must be a host of its network, not its network or broadcast address",
        ));
    }
    let gateway = parse_addr(gw).ok_or_else(|| {
        invalid(
            "hearth.gw",
            gw,
            "the gateway must be four numbers 0-255, like 10.254.254.1",
        )
    })?;
    if u32::from(gateway) & mask != u32::from(addr) & mask || gateway == addr {
        return Err(invalid(
            "hearth.gw",
            gw,
            "the gateway must be another address inside hearth.ip's network",
        ));
    }
    let server = parse_addr(dns).ok_or_else(|| {
        invalid(
            "hearth.dns",
            dns,
            "the DNS server must be four numbers 0-255, like 10.254.254.1",
        )
    })?;
    if server.is_unspecified() || server.is_broadcast() || server.is_multicast() {
        return Err(invalid(
            "hearth.dns",
            dns,
            "the DNS server must be a unicast address",
        ));
    }
    Ok(Some(NetConfig {
        addr,
        prefix,
        gateway,
        dns: server,
    }))
}

/// A dotted quad, strictly: four decimal numbers 0-255 (Rust's parser already refuses octal-
/// looking leading zeros and short forms like `10.1`).
fn parse_addr(text: &str) -> Option<Ipv4Addr> {
    text.parse().ok()
}

/// A prefix length a guest with a gateway can have: 1 to 30 (a /31 or /32 has no room for both).
fn parse_prefix(text: &str) -> Option<u8> {
    if text.is_empty() || text.len() > 2 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|p| (1..=30).contains(p))
}

/// The netmask of a prefix length (0..=32) as a host-order integer.
fn prefix_mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// One entry of `/sys/class/net`: its name and its MAC address, if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub mac: Option<String>,
}

/// The guest NIC among `links`: the one with [`GUEST_MAC`], else the first (by name) that is not
/// `lo`.
pub fn pick_nic(links: &[Link]) -> Option<&str> {
    let mut candidates: Vec<&Link> = links.iter().filter(|l| l.name != "lo").collect();
    candidates.sort_by(|a, b| a.name.cmp(&b.name));
    candidates
        .iter()
        .find(|l| {
            l.mac
                .as_deref()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case(GUEST_MAC))
        })
        .or(candidates.first())
        .map(|l| l.name.as_str())
}

/// The interfaces the kernel lists now.
fn list_links() -> Vec<Link> {
    let Ok(entries) = std::fs::read_dir(SYS_CLASS_NET) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let mac = std::fs::read_to_string(entry.path().join("address")).ok();
            Some(Link { name, mac })
        })
        .collect()
}

/// Why the network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no network interface besides lo appeared within {waited:?}")]
    NoNic { waited: Duration },
    #[error("interface name {name:?} is invalid: it must be 1 to 15 bytes with no NUL")]
    BadName { name: String },
    #[error("cannot open a socket for the network ioctls")]
    Socket(#[source] io::Error),
    #[error("cannot {step} of {nic}")]
    Ioctl {
        step: &'static str,
        nic: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    ResolvConf {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Sets the network up from the kernel command line, logging one line about what it did (or
/// why it did nothing). Never fails: PID 1 boots on without a network.
pub fn configure_from_cmdline(cmdline: &str) {
    let config = match parse_params(cmdline) {
        Ok(Some(config)) => config,
        Ok(None) => return,
        Err(err) => {
            log!("no network: {err}");
            return;
        }
    };
    match configure(&config, Path::new("/etc")) {
        Ok(nic) => log!(
            "{nic} {}/{} via {}, dns {}",
            config.addr,
            config.prefix,
            config.gateway,
            config.dns
        ),
        Err(err) => log!("network setup failed: {}", chain(&err)),
    }
}

/// An error and its causes, `: `-separated, for the one console line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Finds the NIC, gives it its address, brings it up, adds the default route and writes
/// `resolv.conf` under `etc`. Returns the NIC's name.
fn configure(config: &NetConfig, etc: &Path) -> Result<String, NetError> {
    let started = Instant::now();
    let nic = loop {
        if let Some(name) = pick_nic(&list_links()) {
            break name.to_owned();
        }
        if started.elapsed() >= NIC_WAIT {
            return Err(NetError::NoNic { waited: NIC_WAIT });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let socket = inet_socket().map_err(NetError::Socket)?;
    let ioctl_err = |step| {
        let nic = nic.clone();
        move |source| NetError::Ioctl { step, nic, source }
    };
    let addr = ifreq_with_addr(&nic, config.addr)?;
    ioctl(&socket, libc::SIOCSIFADDR, &addr).map_err(ioctl_err("set the address"))?;
    let mask = ifreq_with_addr(&nic, config.netmask())?;
    ioctl(&socket, libc::SIOCSIFNETMASK, &mask).map_err(ioctl_err("set the netmask"))?;
    set_up(&socket, &nic).map_err(ioctl_err("set the up flag"))?;
    let route = default_route(config.gateway);
    match ioctl(&socket, libc::SIOCADDRT, &route) {
        // The route is there already: PID 1 ran before in this boot, or someone else added it.
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
        Err(source) => {
            return Err(NetError::Ioctl {
                step: "add the default route",
                nic,
                source,
            });
        }
    }
    write_resolv_conf(etc, config.dns).map_err(|source| NetError::ResolvConf {
        path: etc.join("resolv.conf").display().to_string(),
        source,
    })?;
    Ok(nic)
}

/// An `AF_INET` datagram socket, the handle the interface and route ioctls go through.
pub(crate) fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor socket(2) just returned; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Marker for the structs the setting ioctls here read: plain C structs the kernel only copies
/// in.
pub(crate) trait IoctlArg {}
impl IoctlArg for libc::ifreq {}
impl IoctlArg for libc::rtentry {}

/// Runs an ioctl that reads `*arg` and writes nothing back.
pub(crate) fn ioctl<T: IoctlArg>(
    socket: &OwnedFd,
    request: libc::Ioctl,
    arg: &T,
) -> io::Result<()> {
    // SAFETY: `arg` is a valid, initialised C struct (an `ifreq` or `rtentry`, see `IoctlArg`)
    // that lives across the call, of the type `request` expects; the kernel only reads it.
    if unsafe { libc::ioctl(socket.as_raw_fd(), request, std::ptr::from_ref(arg)) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An all-zero `ifreq` naming `name`.
pub(crate) fn ifreq(name: &str) -> Result<libc::ifreq, NetError> {
    let bad = || NetError::BadName {
        name: name.to_owned(),
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0) {
        return Err(bad());
    }
    // SAFETY: `ifreq` is plain old data for which all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = libc::c_char::from_ne_bytes([byte]);
    }
    Ok(request)
}

/// An `ifreq` naming `name` whose address member holds `addr` (for `SIOCSIFADDR` and
/// `SIOCSIFNETMASK`).
fn ifreq_with_addr(name: &str, addr: Ipv4Addr) -> Result<libc::ifreq, NetError> {
    let mut request = ifreq(name)?;
    request.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    Ok(request)
}

/// `addr` as the generic `sockaddr` of an `AF_INET` address, port 0: the layout of
/// `sockaddr_in` (family, then port and address in network order) written byte by byte, so no
/// cast between the two structs is needed.
pub fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    // sa_data[0..2] is the port (0), sa_data[2..6] the address, most significant byte first.
    for (slot, byte) in data[2..6].iter_mut().zip(addr.octets()) {
        *slot = libc::c_char::from_ne_bytes([byte]);
    }
    libc::sockaddr {
        sa_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
        sa_data: data,
    }
}

/// The `rtentry` of `default via gateway` (the kernel finds the device from the gateway).
pub fn default_route(gateway: Ipv4Addr) -> libc::rtentry {
    // SAFETY: `rtentry` is plain old data for which all-zero bytes are a valid value (a null
    // `rt_dev` means "any device").
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_v4(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    route
}

/// Sets `IFF_UP` on `name` unless it is set already.
pub(crate) fn set_up(socket: &OwnedFd, name: &str) -> io::Result<()> {
    let mut request = ifreq(name).map_err(io::Error::other)?;
    // SAFETY: SIOCGIFFLAGS fills the `ifreq` the pointer refers to, which lives across the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS just set the `ifru_flags` member of the union.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    let up = libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    if flags & up != 0 {
        return Ok(());
    }
    request.ifr_ifru.ifru_flags = flags | up;
    ioctl(socket, libc::SIOCSIFFLAGS, &request)
}

/// What `resolv.conf` holds for `dns`.
pub fn resolv_conf(dns: Ipv4Addr) -> String {
    format!("nameserver {dns}\n")
}

/// Makes `etc/resolv.conf` a regular file (mode 0644) naming `dns`, unless it is one already.
/// A symlink or another file is replaced atomically: written as `etc/.resolv.conf.hearth`, then
/// renamed over it. Returns whether it wrote. No fsync: after a crash the next boot writes it
/// again.
pub fn write_resolv_conf(etc: &Path, dns: Ipv4Addr) -> io::Result<bool> {
    let path = etc.join("resolv.conf");
    let want = resolv_conf(dns);
    let is_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
    if is_file && std::fs::read(&path).is_ok_and(|have| have == want.as_bytes()) {
        return Ok(false);
    }
    let temp = etc.join(".resolv.conf.hearth");
    match std::fs::remove_file(&temp) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temp)?;
    // The umask may have taken bits the mode asked for.
    file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    file.write_all(want.as_bytes())?;
    drop(file);
    std::fs::rename(&temp, &path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_helper::proto;

    /// The parameters exactly as hearthd writes them, from the helper's constants.
    fn hearthd_cmdline() -> String {
        format!(
            "console=ttyS0 panic=1 quiet hearth.hostname=web hearth.ip={}/{} hearth.gw={} hearth.dns={}",
            proto::GUEST_ADDR,
            proto::INNER_PREFIX,
            proto::GATEWAY_ADDR,
            proto::GATEWAY_ADDR
        )
    }

    #[test]
    fn the_constants_match_the_helper() {
        assert_eq!(GUEST_MAC, proto::GUEST_MAC);
    }

    #[test]
    fn hearthd_parameters_are_parsed() {
        let config = parse_params(&hearthd_cmdline()).unwrap().unwrap();
        assert_eq!(
            config,
            NetConfig {
                addr: Ipv4Addr::new(10, 254, 254, 2),
                prefix: 30,
                gateway: Ipv4Addr::new(10, 254, 254, 1),
                dns: Ipv4Addr::new(10, 254, 254, 1),
            }
        );
        assert_eq!(config.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        let wide =
            parse_params("hearth.ip=192.168.0.9/16 hearth.gw=192.168.1.1 hearth.dns=1.1.1.1")
                .unwrap()
                .unwrap();
        assert_eq!(wide.netmask(), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(wide.dns, Ipv4Addr::new(1, 1, 1, 1));
    }

    #[test]
    fn no_parameters_mean_no_network() {
        assert_eq!(
            parse_params("console=ttyS0 hearth.hostname=a quiet"),
            Ok(None)
        );
        assert_eq!(parse_params(""), Ok(None));
        // A longer key is another parameter.
        assert_eq!(parse_params("hearth.ipx=1.2.3.4/24"), Ok(None));
    }

    #[test]
    fn the_three_parameters_go_together() {
        let err = parse_params("hearth.ip=10.0.0.2/24 hearth.gw=10.0.0.1").unwrap_err();
        assert!(matches!(
            err,
            ParamError::Missing {
                key: "hearth.dns",
                ..
            }
        ));
        let err = parse_params("hearth.gw=10.0.0.1 hearth.dns=10.0.0.1").unwrap_err();
        assert!(matches!(
            err,
            ParamError::Missing {
                key: "hearth.ip",
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "kernel parameter hearth.ip is missing: hearth.ip, hearth.gw and hearth.dns go together"
        );
    }

    /// The key and rule of the error for `ip`, `gw`, `dns`.
    fn refusal(ip: &str, gw: &str, dns: &str) -> (&'static str, &'static str) {
        let cmdline = format!("hearth.ip={ip} hearth.gw={gw} hearth.dns={dns}");
        match parse_params(&cmdline) {
            Err(ParamError::Invalid { key, rule, value }) => {
                let given = match key {
                    "hearth.ip" => ip,
                    "hearth.gw" => gw,
                    _ => dns,
                };
                assert_eq!(value, given, "the error quotes the value");
                (key, rule)
            }
            other => panic!("{cmdline}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn malformed_parameters_are_refused_naming_key_and_rule() {
        let gw = "10.254.254.1";
        for ip in ["10.254.254.2", "10.254.254.2/", "/30"] {
            let (key, rule) = refusal(ip, gw, gw);
            assert_eq!(key, "hearth.ip");
            assert!(
                rule.contains("a.b.c.d/n")
                    || rule.contains("four numbers")
                    || rule.contains("prefix"),
                "{ip}: {rule}"
            );
        }
        for ip in [
            "10.254.254/30",
            "10.254.254.256/30",
            "010.254.254.2/30",
            "a.b.c.d/30",
        ] {
            assert_eq!(
                refusal(ip, gw, gw).1,
                "the address must be four numbers 0-255, like 10.254.254.2",
                "{ip}"
            );
        }
        for ip in [
            "10.254.254.2/0",
            "10.254.254.2/31",
            "10.254.254.2/32",
            "10.254.254.2/+8",
            "10.254.254.2/030",
            "10.254.254.2/x",
        ] {
            assert_eq!(
                refusal(ip, gw, gw).1,
                "the prefix length after / must be a number from 1 to 30",
                "{ip}"
            );
        }
        for ip in ["10.254.254.0/30", "10.254.254.3/30"] {
            assert!(
                refusal(ip, gw, gw)
                    .1
                    .contains("not its network or broadcast"),
                "{ip}"
            );
        }
        let ip = "10.254.254.2/30";
        assert_eq!(
            refusal(ip, "10.254.254.5", gw),
            (
                "hearth.gw",
                "the gateway must be another address inside hearth.ip's network"
            )
        );
        assert_eq!(refusal(ip, "10.254.254.2", gw).0, "hearth.gw");
        assert_eq!(refusal(ip, "gateway", gw).0, "hearth.gw");
        assert_eq!(refusal(ip, gw, "").0, "hearth.dns");
        assert_eq!(
            refusal(ip, gw, "255.255.255.255").1,
            "the DNS server must be a unicast address"
        );
        assert_eq!(refusal(ip, gw, "0.0.0.0").0, "hearth.dns");
        let err = parse_params(&format!(
            "hearth.ip=10.254.254.2/33 hearth.gw={gw} hearth.dns={gw}"
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel parameter hearth.ip=\"10.254.254.2/33\" is invalid: the prefix length after / must be a number from 1 to 30"
        );
    }

    fn link(name: &str, mac: Option<&str>) -> Link {
        Link {
            name: name.to_owned(),
            mac: mac.map(str::to_owned),
        }
    }

    #[test]
    fn the_nic_with_the_guest_mac_is_preferred() {
        let links = [
            link("lo", Some("00:00:00:00:00:00\n")),
            link("eth0", Some("52:54:00:12:34:56\n")),
            link("eth1", Some("06:00:0A:FE:FE:02\n")),
        ];
        assert_eq!(pick_nic(&links), Some("eth1"));
    }

    #[test]
    fn else_the_first_interface_but_lo() {
        let links = [
            link("lo", None),
            link("eth1", Some("52:54:00:12:34:57\n")),
            link("eth0", None),
        ];
        assert_eq!(pick_nic(&links), Some("eth0"));
        assert_eq!(pick_nic(&[link("lo", None)]), None);
        assert_eq!(pick_nic(&[]), None);
    }

    fn bytes_of<T>(value: &T) -> &[u8] {
        // SAFETY: any initialised value may be viewed as bytes for its size; the slice borrows it.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>())
        }
    }

    #[test]
    fn sockaddr_has_the_sockaddr_in_layout() {
        let addr = sockaddr_v4(Ipv4Addr::new(10, 254, 254, 2));
        let expected = libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap(),
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(Ipv4Addr::new(10, 254, 254, 2)).to_be(),
            },
            sin_zero: [0; 8],
        };
        assert_eq!(size_of::<libc::sockaddr>(), size_of::<libc::sockaddr_in>());
        assert_eq!(bytes_of(&addr), bytes_of(&expected));
    }

    #[test]
    fn ifreq_names_the_interface_and_holds_the_address() {
        let request = ifreq_with_addr("eth0", Ipv4Addr::new(255, 255, 255, 252)).unwrap();
        let name: Vec<u8> = request
            .ifr_name
            .iter()
            .map(|c| c.to_ne_bytes()[0])
            .collect();
        assert_eq!(&name[..5], b"eth0\0");
        assert!(name[4..].iter().all(|b| *b == 0));
        // SAFETY: `ifreq_with_addr` set the `ifru_addr` member.
        let addr = unsafe { request.ifr_ifru.ifru_addr };
        assert_eq!(
            bytes_of(&addr),
            bytes_of(&sockaddr_v4(Ipv4Addr::new(255, 255, 255, 252)))
        );
        assert!(ifreq("").is_err());
        assert!(ifreq("a-name-of-16-byt").is_err());
        assert!(ifreq("fifteen-bytes-x").is_ok());
        assert!(ifreq("nul\0").is_err());
    }

    #[test]
    fn the_default_route_goes_via_the_gateway() {
        let route = default_route(Ipv4Addr::new(10, 254, 254, 1));
        assert_eq!(route.rt_flags, libc::RTF_UP | libc::RTF_GATEWAY);
        assert_eq!(
            bytes_of(&route.rt_gateway),
            bytes_of(&sockaddr_v4(Ipv4Addr::new(10, 254, 254, 1)))
        );
        assert_eq!(
            bytes_of(&route.rt_dst),
            bytes_of(&sockaddr_v4(Ipv4Addr::UNSPECIFIED))
        );
        assert_eq!(
            bytes_of(&route.rt_genmask),
            bytes_of(&sockaddr_v4(Ipv4Addr::UNSPECIFIED))
        );
        assert!(route.rt_dev.is_null());
        assert_eq!(route.rt_metric, 0);
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn resolv_conf_is_written_once() {
        let etc = tempfile::tempdir().unwrap();
        let path = etc.path().join("resolv.conf");
        let dns = Ipv4Addr::new(10, 254, 254, 1);
        assert!(write_resolv_conf(etc.path(), dns).unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "nameserver 10.254.254.1\n"
        );
        assert_eq!(mode(&path), 0o644);
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        assert!(
            !write_resolv_conf(etc.path(), dns).unwrap(),
            "same content: not rewritten"
        );
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap()),
            inode
        );
        assert!(!etc.path().join(".resolv.conf.hearth").exists());
    }

    #[test]
    fn a_different_file_or_a_symlink_is_replaced() {
        let etc = tempfile::tempdir().unwrap();
        let path = etc.path().join("resolv.conf");
        let dns = Ipv4Addr::new(10, 254, 254, 1);
        std::fs::write(&path, "nameserver 8.8.8.8\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(write_resolv_conf(etc.path(), dns).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), resolv_conf(dns));
        assert_eq!(mode(&path), 0o644);

        // A symlink, even to a file with the right content, becomes a file of our own; its
        // target is left alone.
        let target = etc.path().join("stub-resolv.conf");
        std::fs::write(&target, resolv_conf(dns)).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(write_resolv_conf(etc.path(), dns).unwrap());
        assert!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_file()
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), resolv_conf(dns));

        // A dangling symlink too, and a stale temporary file (even a symlink) is not followed.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/nonexistent/resolv.conf", &path).unwrap();
        let decoy = etc.path().join("decoy");
        std::os::unix::fs::symlink(&decoy, etc.path().join(".resolv.conf.hearth")).unwrap();
        assert!(write_resolv_conf(etc.path(), dns).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), resolv_conf(dns));
        assert!(!decoy.exists());
    }

    #[test]
    fn errors_print_their_causes_once() {
        let err = NetError::Ioctl {
            step: "set the address",
            nic: "eth0".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(
            chain(&err),
            "cannot set the address of eth0: Operation not permitted (os error 1)"
        );
    }
}
