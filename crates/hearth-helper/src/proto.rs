//! The request/response protocol between `hearthd` and `hearth-helper`.
//!
//! Framing: each message is a 4-byte big-endian length followed by that many bytes of JSON
//! (at most [`MAX_MESSAGE_LEN`]). One request gets one response, in order, on one connection.
//! A [`Response::Tap`] carries the TAP's file descriptor, a [`Response::Services`] the three
//! service sockets ([`SERVICE_SOCKETS`], in that order), as `SCM_RIGHTS` ancillary data on
//! the answer's first byte.
//!
//! Every request is idempotent: creating what exists, or deleting what is gone, succeeds, so
//! `hearthd`'s reconcile can repeat any of them.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The protocol version [`Response::Hello`] reports; a mismatch is refused by `hearthd`.
pub const PROTOCOL_VERSION: u32 = 2;
/// The largest message either side accepts (a host rule set for thousands of VMs fits).
pub const MAX_MESSAGE_LEN: usize = 16 << 20;

/// The guest's address inside every slot: the same in all of them, so a snapshot or clone can be
/// restored into any slot.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 254, 254, 2);
/// The slot's end of the TAP, the guest's gateway and DNS server.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 254, 254, 1);
/// Prefix length of the guest's inner network (`GATEWAY_ADDR`/30).
pub const INNER_PREFIX: u8 = 30;
/// The guest NIC's MAC address, the same in every slot.
pub const GUEST_MAC: &str = "06:00:0a:fe:fe:02";
/// The metadata service's address as the guest sees it (port 80): an address of the slot's
/// loopback, where the socket [`Request::OpenServices`] hands over listens.
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The metadata service's port.
pub const METADATA_PORT: u16 = 80;
/// The DNS forwarder's port (UDP and TCP) on [`GATEWAY_ADDR`].
pub const DNS_PORT: u16 = 53;
/// The sockets a [`Response::Services`] carries, in order: made inside the slot, so only its
/// guest reaches them and no process of the host can take their addresses.
pub const SERVICE_SOCKETS: [ServiceSocket; 3] = [
    ServiceSocket::DnsUdp,
    ServiceSocket::DnsTcp,
    ServiceSocket::Metadata,
];

/// One of the sockets of [`SERVICE_SOCKETS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceSocket {
    /// UDP, bound to [`GATEWAY_ADDR`]:[`DNS_PORT`].
    DnsUdp,
    /// TCP, listening on [`GATEWAY_ADDR`]:[`DNS_PORT`].
    DnsTcp,
    /// TCP, listening on [`METADATA_ADDR`]:[`METADATA_PORT`].
    Metadata,
}

impl ServiceSocket {
    /// Where it is bound, inside the slot.
    pub fn addr(self) -> std::net::SocketAddrV4 {
        match self {
            ServiceSocket::DnsUdp | ServiceSocket::DnsTcp => {
                std::net::SocketAddrV4::new(GATEWAY_ADDR, DNS_PORT)
            }
            ServiceSocket::Metadata => std::net::SocketAddrV4::new(METADATA_ADDR, METADATA_PORT),
        }
    }
    /// True for the TCP listeners.
    pub fn is_tcp(self) -> bool {
        !matches!(self, ServiceSocket::DnsUdp)
    }
}
/// The TAP's name inside a slot.
pub const TAP_NAME: &str = "tap0";
/// The slot's end of the veth pair, inside the slot.
pub const SLOT_VETH: &str = "eth0";
/// The nftables table the helper owns, in the host namespace and in every slot.
pub const TABLE: &str = "hearth";

/// An IPv4 network, written `a.b.c.d/n`. Host bits must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    /// `addr/prefix`; `None` when the prefix is over 32 or `addr` has host bits set.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Cidr> {
        (prefix <= 32 && u32::from(addr) & !mask(prefix) == 0).then_some(Cidr { addr, prefix })
    }
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
    /// How many addresses the network holds.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }
    /// True when the two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let shorter = self.prefix.min(other.prefix);
        u32::from(self.addr) & mask(shorter) == u32::from(other.addr) & mask(shorter)
    }
}

/// The netmask of a prefix length (0..=32).
fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a string is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not an IPv4 network: {rule}")]
pub struct CidrError {
    pub value: String,
    pub rule: &'static str,
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let err = |rule| CidrError {
            value: s.to_owned(),
            rule,
        };
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| err("write it as a.b.c.d/n"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| err("the address must be four numbers 0-255, like 10.0.0.0"))?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 2 {
            return Err(err(
                "the prefix length after / must be a number from 0 to 32",
            ));
        }
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| err("the prefix length after / must be a number from 0 to 32"))?;
        if prefix > 32 {
            return Err(err(
                "the prefix length after / must be a number from 0 to 32",
            ));
        }
        Cidr::new(addr, prefix).ok_or_else(|| {
            err("the address has bits set past the prefix length (write the network's first address)")
        })
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Names one VM's slot: the hearthd instance (8 lowercase hex digits, from its data directory)
/// and the VM's id (16 lowercase hex digits). Every name the helper makes for the slot derives
/// from these two, so no request carries a free-form interface or namespace name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotId {
    pub instance: String,
    pub vm: String,
}

impl SlotId {
    /// The slot's network namespace (`/run/netns/<name>`).
    pub fn netns(&self) -> String {
        format!("hearth-{}-{}", self.instance, self.vm)
    }
    /// The host's end of the slot's veth pair: `hv` and 13 hex digits (15 bytes, the kernel's
    /// limit), the VM id's first 13 digits mixed with the instance so two hearthds' slots differ.
    pub fn host_veth(&self) -> String {
        let mut digits: Vec<u8> = self.vm.bytes().take(13).collect();
        for (d, i) in digits.iter_mut().zip(self.instance.bytes().cycle()) {
            let v = (hex_value(*d) + hex_value(i)) % 16;
            *d = b"0123456789abcdef"[usize::from(v)];
        }
        format!("hv{}", String::from_utf8_lossy(&digits))
    }
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => 0,
    }
}

/// Prefix of every host-side veth name; the host rules match VM traffic by it.
pub const HOST_VETH_PREFIX: &str = "hv";

/// `allow_all`: everything not denied goes out; `deny_all`: only what is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    #[default]
    AllowAll,
    DenyAll,
}

/// A VM's egress policy, enforced in its slot. VM-to-VM traffic inside `network.cidr` is not
/// egress: the host's isolation rules decide it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRules {
    pub mode: EgressMode,
    /// Allowed destinations (`deny_all`); with `allow_ports`, only to those TCP ports.
    #[serde(default)]
    pub allow_cidrs: Vec<Cidr>,
    /// Denied destinations; these win over everything allowed.
    #[serde(default)]
    pub deny_cidrs: Vec<Cidr>,
    /// TCP ports `allow_cidrs` (and resolved domains) are limited to; empty: all ports.
    #[serde(default)]
    pub allow_ports: Vec<u16>,
    /// True when the VM has allowed domains: addresses `hearthd`'s DNS forwarder resolved for
    /// them ([`Request::AllowResolved`]) are let through until their TTL ends.
    #[serde(default)]
    pub domains: bool,
}

/// Everything that makes one VM's slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotSpec {
    pub slot: SlotId,
    /// The host's end of the VM's /30 (its first usable address), on the host veth.
    pub host_addr: Ipv4Addr,
    /// The VM's routable address (the /30's second usable address), on the slot's veth; the
    /// slot translates it to and from `GUEST_ADDR`.
    pub vm_addr: Ipv4Addr,
    /// `network.cidr`: traffic to other VMs is let through the slot (the host's isolation rules
    /// decide it), not treated as egress.
    pub peers: Cidr,
    pub egress: EgressRules,
}

/// One VM as the host rules see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSlot {
    pub slot: SlotId,
    pub host_addr: Ipv4Addr,
    pub vm_addr: Ipv4Addr,
}

/// A private network: its members reach each other; nothing else reaches them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivateNetwork {
    /// The network's name (lowercase letters, digits and `-`, at most 63 bytes).
    pub name: String,
    /// The members' routable addresses (`vm_addr`).
    pub members: Vec<Ipv4Addr>,
}

/// The whole host rule set of one hearthd: it replaces what was there, in one nftables
/// transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRules {
    pub instance: String,
    /// `network.cidr`: what is masqueraded on the way out.
    pub cidr: Cidr,
    /// Limit masquerading to this interface (`network.outbound_interface`); `None`: any
    /// interface that is not a slot's.
    pub outbound: Option<String>,
    pub slots: Vec<HostSlot>,
    pub networks: Vec<PrivateNetwork>,
}

/// A request from `hearthd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Who is there: answered with [`Response::Hello`].
    Hello,
    /// Checks `cidr` against the host's routes (refused when it overlaps a route that is not a
    /// slot's) and enables IPv4 forwarding in the host namespace. The first Setup binds the
    /// helper to its `instance` and `cidr`: it repeats cheaply, a Setup with others is refused
    /// (`Invalid`), and every other request must name that instance and stay inside that cidr
    /// (a helper serves one hearthd; restart it to serve another).
    Setup { instance: String, cidr: Cidr },
    /// Replaces the host rule set of `rules.instance`.
    ApplyHostRules { rules: HostRules },
    /// Removes the host rule set (at a clean shutdown).
    RemoveHostRules { instance: String },
    /// Makes the slot (netns, veth pair, addresses, routes, forwarding, the slot's rules), or
    /// brings an existing one to `spec`.
    CreateSlot { spec: SlotSpec },
    /// Removes the slot and everything in it. Succeeds when it is already gone.
    DeleteSlot { slot: SlotId },
    /// Creates the slot's TAP (`TAP_NAME`, with `GATEWAY_ADDR`/30) and hands its descriptor
    /// over ([`Response::Tap`]). The TAP lives as long as a descriptor of it is open, so it goes
    /// when the VMM exits; while it is open (an earlier VMM still runs) a second OpenTap fails
    /// (`Failed`, "still open") rather than take the TAP from under that VMM.
    OpenTap { slot: SlotId },
    /// Makes the slot's service sockets ([`SERVICE_SOCKETS`]) inside it and hands them over
    /// ([`Response::Services`]). While an earlier set is still open (its hearthd still runs)
    /// this fails (`Failed`, "in use").
    OpenServices { slot: SlotId },
    /// Replaces the slot's egress policy. Open connections are held to the new policy too: a
    /// connection the new one does not allow stops passing, and the addresses resolved for
    /// domains so far are forgotten (the forwarder adds them again as it answers).
    SetEgress { slot: SlotId, egress: EgressRules },
    /// Lets the slot reach `addrs` (which the DNS forwarder resolved for an allowed domain) for
    /// `ttl_secs` seconds (1..=86400).
    AllowResolved {
        slot: SlotId,
        addrs: Vec<Ipv4Addr>,
        ttl_secs: u32,
    },
    /// The slots of `instance` that exist.
    ListSlots { instance: String },
}

impl Request {
    /// A short name for logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello => "hello",
            Request::Setup { .. } => "setup",
            Request::ApplyHostRules { .. } => "apply_host_rules",
            Request::RemoveHostRules { .. } => "remove_host_rules",
            Request::CreateSlot { .. } => "create_slot",
            Request::DeleteSlot { .. } => "delete_slot",
            Request::OpenTap { .. } => "open_tap",
            Request::OpenServices { .. } => "open_services",
            Request::SetEgress { .. } => "set_egress",
            Request::AllowResolved { .. } => "allow_resolved",
            Request::ListSlots { .. } => "list_slots",
        }
    }
}

/// What went wrong with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A field broke a rule; the message names the field and the rule. Repeating it fails again.
    Invalid,
    /// The work failed (a command, the kernel); the message says what.
    Failed,
}

/// The helper's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Hello {
        version: u32,
        pid: u32,
        /// The helper's own version (its crate version).
        helper: String,
        /// `nft --version`'s answer.
        nftables: String,
    },
    Done,
    /// The TAP's descriptor is attached.
    Tap {
        name: String,
    },
    /// The service sockets are attached, in the order of [`SERVICE_SOCKETS`].
    Services,
    Slots {
        slots: Vec<SlotId>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_say_why_not() {
        let c: Cidr = "172.28.0.0/16".parse().unwrap();
        assert_eq!(c.to_string(), "172.28.0.0/16");
        assert_eq!(c.size(), 65536);
        assert!(c.contains(Ipv4Addr::new(172, 28, 3, 2)));
        assert!(!c.contains(Ipv4Addr::new(172, 29, 0, 1)));
        assert!(c.overlaps(&"172.28.4.0/30".parse().unwrap()));
        assert!(c.overlaps(&"0.0.0.0/0".parse().unwrap()));
        assert!(!c.overlaps(&"10.0.0.0/8".parse().unwrap()));
        for bad in [
            "172.28.0.1/16",
            "172.28.0.0",
            "172.28.0.0/33",
            "1.2.3/8",
            "a/8",
            "1.2.3.4/+8",
        ] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().size(), 1 << 32);
    }

    #[test]
    fn slot_names_fit_the_kernel_limits() {
        let s = SlotId {
            instance: "0123abcd".into(),
            vm: "fedcba9876543210".into(),
        };
        assert_eq!(s.netns(), "hearth-0123abcd-fedcba9876543210");
        let veth = s.host_veth();
        assert_eq!(veth.len(), 15);
        assert!(veth.starts_with(HOST_VETH_PREFIX));
        let other = SlotId {
            instance: "0123abce".into(),
            ..s.clone()
        };
        assert_ne!(other.host_veth(), veth);
    }

    #[test]
    fn requests_are_tagged_json() {
        let r = Request::DeleteSlot {
            slot: SlotId {
                instance: "0123abcd".into(),
                vm: "fedcba9876543210".into(),
            },
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"op":"delete_slot","slot":{"instance":"0123abcd","vm":"fedcba9876543210"}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r);
        let extra = r#"{"op":"list_slots","instance":"0123abcd","x":1}"#;
        assert!(serde_json::from_str::<Request>(extra).is_err());
    }
}
