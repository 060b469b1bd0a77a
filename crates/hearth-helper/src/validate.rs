//! Every field of every request is checked here before anything runs. Each error names the
//! field (its path in the request's JSON), the value and the rule, e.g.
//! `slot.vm "ABC": must be 16 lowercase hex digits`.
//!
//! Only [`setup_routes`] needs the host's state (its routes), and [`served`] what the helper
//! serves (the [`Binding`] its first Setup made); everything else is a pure check of the
//! request.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::net::Ipv4Addr;

use crate::net::Route;
use crate::proto::{
    Cidr, EgressRules, HOST_VETH_PREFIX, HostRules, HostSlot, INNER_PREFIX, PrivateNetwork,
    Request, SlotId, SlotSpec,
};

/// At most this many CIDRs or ports in one list, and private networks in one rule set.
pub const MAX_LIST: usize = 4096;
/// At most this many slots in one host rule set, and members in one private network.
pub const MAX_SLOTS: usize = 65536;
/// At most this many addresses in one [`Request::AllowResolved`].
pub const MAX_RESOLVED: usize = 256;
/// The longest TTL [`Request::AllowResolved`] accepts (a day).
pub const MAX_TTL_SECS: u32 = 86400;
/// The shortest and longest prefix of a network's CIDR: a /29 holds two slots, a /8 is plenty.
pub const CIDR_PREFIXES: std::ops::RangeInclusive<u8> = 8..=29;
/// The kernel's limit on an interface name (IFNAMSIZ less the terminating NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// Networks a VM network may not overlap, with what they are.
pub fn reserved() -> [(Cidr, &'static str); 6] {
    let net = |a, b, c, d, prefix| {
        Cidr::new(Ipv4Addr::new(a, b, c, d), prefix).expect("a reserved network has no host bits")
    };
    [
        (net(0, 0, 0, 0, 8), "\"this\" network"),
        (net(127, 0, 0, 0, 8), "loopback"),
        (
            net(169, 254, 0, 0, 16),
            "link-local, where the metadata address lives",
        ),
        (net(224, 0, 0, 0, 4), "multicast"),
        (net(240, 0, 0, 0, 4), "reserved, with the broadcast address"),
        (
            net(10, 254, 254, 0, INNER_PREFIX),
            "every slot's inner network",
        ),
    ]
}

/// A request that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{field} {value}: {rule}")]
    Field {
        field: String,
        value: String,
        rule: String,
    },
    #[error("{field}: {count} entries, at most {max} are allowed")]
    TooMany {
        field: String,
        count: usize,
        max: usize,
    },
    #[error("{op}: send setup first (a helper serves no hearthd until a setup names it)")]
    NotSetUp { op: &'static str },
    #[error(
        "setup of instance {instance:?} with cidr {cidr}: this helper serves instance {serving:?} with cidr {serving_cidr}; restart hearth-helper to serve another"
    )]
    Bound {
        instance: String,
        cidr: Cidr,
        serving: String,
        serving_cidr: Cidr,
    },
}

/// What a helper serves, fixed by its first Setup: one hearthd instance and its network. A
/// member of the socket's group cannot make it work for another instance or outside that
/// network (on other hearthds' slots, or on addresses the host uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub instance: String,
    pub cidr: Cidr,
}

/// The rule of a field that must name what the helper serves.
fn serving(what: &str, value: impl Display) -> String {
    format!(
        "must be the {what} this helper serves ({value}); restart hearth-helper to serve another"
    )
}

fn served_instance(name: &str, value: &str, binding: &Binding) -> Result<(), Invalid> {
    if value != binding.instance {
        return Err(field(
            name,
            quoted(value),
            serving("instance", quoted(&binding.instance)),
        ));
    }
    Ok(())
}

fn served_cidr(name: &str, value: Cidr, binding: &Binding) -> Result<(), Invalid> {
    if value != binding.cidr {
        return Err(field(name, value, serving("cidr", binding.cidr)));
    }
    Ok(())
}

/// Checks that `request` stays inside what the helper serves (`None`: no Setup has bound it
/// yet, and only Hello and Setup are taken). A Setup passes when it is the one that bound the
/// helper; every other request names that instance, and what it makes lies inside that cidr
/// (a slot's `peers` is the cidr, and its addresses are inside `peers` by [`request`]).
pub fn served(request: &Request, binding: Option<&Binding>) -> Result<(), Invalid> {
    let Some(b) = binding else {
        return match request {
            Request::Hello | Request::Setup { .. } => Ok(()),
            other => Err(Invalid::NotSetUp { op: other.op() }),
        };
    };
    match request {
        Request::Hello => Ok(()),
        Request::Setup { instance, cidr } => {
            if *instance == b.instance && *cidr == b.cidr {
                Ok(())
            } else {
                Err(Invalid::Bound {
                    instance: instance.clone(),
                    cidr: *cidr,
                    serving: b.instance.clone(),
                    serving_cidr: b.cidr,
                })
            }
        }
        Request::ApplyHostRules { rules } => {
            served_instance("rules.instance", &rules.instance, b)?;
            served_cidr("rules.cidr", rules.cidr, b)
        }
        Request::RemoveHostRules { instance } | Request::ListSlots { instance } => {
            served_instance("instance", instance, b)
        }
        Request::CreateSlot { spec } => {
            served_instance("spec.slot.instance", &spec.slot.instance, b)?;
            served_cidr("spec.peers", spec.peers, b)
        }
        Request::DeleteSlot { slot }
        | Request::OpenTap { slot }
        | Request::OpenServices { slot }
        | Request::SetEgress { slot, .. }
        | Request::AllowResolved { slot, .. } => {
            served_instance("slot.instance", &slot.instance, b)
        }
    }
}

fn field(field: impl Into<String>, value: impl Display, rule: impl Into<String>) -> Invalid {
    Invalid::Field {
        field: field.into(),
        value: value.to_string(),
        rule: rule.into(),
    }
}

/// A string value as the message shows it: quoted and escaped.
fn quoted(s: &str) -> String {
    format!("{s:?}")
}

fn at_most<T>(name: &str, list: &[T], max: usize) -> Result<(), Invalid> {
    if list.len() > max {
        return Err(Invalid::TooMany {
            field: name.to_owned(),
            count: list.len(),
            max,
        });
    }
    Ok(())
}

/// Checks every field of `request`.
pub fn request(request: &Request) -> Result<(), Invalid> {
    match request {
        Request::Hello => Ok(()),
        Request::Setup { instance: i, cidr } => {
            instance("instance", i)?;
            network_cidr("cidr", *cidr)
        }
        Request::ApplyHostRules { rules } => host_rules("rules", rules),
        Request::RemoveHostRules { instance: i } | Request::ListSlots { instance: i } => {
            instance("instance", i)
        }
        Request::CreateSlot { spec } => slot_spec("spec", spec),
        Request::DeleteSlot { slot }
        | Request::OpenTap { slot }
        | Request::OpenServices { slot } => slot_id("slot", slot),
        Request::SetEgress { slot, egress: e } => {
            slot_id("slot", slot)?;
            egress("egress", e)
        }
        Request::AllowResolved {
            slot,
            addrs,
            ttl_secs,
        } => {
            slot_id("slot", slot)?;
            at_most("addrs", addrs, MAX_RESOLVED)?;
            if !(1..=MAX_TTL_SECS).contains(ttl_secs) {
                return Err(field(
                    "ttl_secs",
                    ttl_secs,
                    format!("must be 1 to {MAX_TTL_SECS} seconds"),
                ));
            }
            Ok(())
        }
    }
}

fn lower_hex(name: &str, value: &str, digits: usize) -> Result<(), Invalid> {
    if value.len() != digits
        || !value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(field(
            name,
            quoted(value),
            format!("must be {digits} lowercase hex digits"),
        ));
    }
    Ok(())
}

/// A hearthd instance: exactly 8 lowercase hex digits.
pub fn instance(name: &str, value: &str) -> Result<(), Invalid> {
    lower_hex(name, value, 8)
}

/// A VM id: exactly 16 lowercase hex digits.
pub fn vm(name: &str, value: &str) -> Result<(), Invalid> {
    lower_hex(name, value, 16)
}

pub fn slot_id(name: &str, slot: &SlotId) -> Result<(), Invalid> {
    instance(&format!("{name}.instance"), &slot.instance)?;
    vm(&format!("{name}.vm"), &slot.vm)
}

/// A VM network (`network.cidr`): a /8 to a /29, clear of the reserved networks.
pub fn network_cidr(name: &str, value: Cidr) -> Result<(), Invalid> {
    if !CIDR_PREFIXES.contains(&value.prefix()) {
        return Err(field(
            name,
            value,
            format!(
                "the prefix length must be {} to {}",
                CIDR_PREFIXES.start(),
                CIDR_PREFIXES.end()
            ),
        ));
    }
    if let Some((reserved, what)) = reserved().into_iter().find(|(r, _)| r.overlaps(&value)) {
        return Err(field(
            name,
            value,
            format!("must not overlap {reserved} ({what})"),
        ));
    }
    Ok(())
}

/// Setup's check against the host: `cidr` must not overlap a route of the host namespace
/// (default routes and the slots' own routes, on `hv*` devices, aside).
pub fn setup_routes(name: &str, value: Cidr, routes: &[Route]) -> Result<(), Invalid> {
    let clash = routes.iter().find(|r| {
        r.dst.prefix() > 0
            && !r
                .dev
                .as_deref()
                .is_some_and(|d| d.starts_with(HOST_VETH_PREFIX))
            && r.dst.overlaps(&value)
    });
    match clash {
        None => Ok(()),
        Some(route) => Err(field(
            name,
            value,
            format!(
                "must not overlap the host's route to {}{} (pick a network the host does not use)",
                route.dst,
                route
                    .dev
                    .as_deref()
                    .map(|d| format!(" on {d}"))
                    .unwrap_or_default()
            ),
        )),
    }
}

/// A slot's two addresses: the first and second usable address of one /30, inside `cidr`.
fn slot_addrs(prefix: &str, host: Ipv4Addr, vm: Ipv4Addr, cidr: Cidr) -> Result<(), Invalid> {
    let host_field = format!("{prefix}.host_addr");
    if u32::from(host) & 3 != 1 {
        return Err(field(
            host_field,
            host,
            "must be the first usable address of a /30 (its last two bits 01)",
        ));
    }
    if !cidr.contains(host) {
        return Err(field(host_field, host, format!("must be inside {cidr}")));
    }
    if u32::from(vm) != u32::from(host) + 1 {
        return Err(field(
            format!("{prefix}.vm_addr"),
            vm,
            format!(
                "must be host_addr + 1 ({})",
                Ipv4Addr::from(u32::from(host) + 1)
            ),
        ));
    }
    Ok(())
}

pub fn egress(name: &str, rules: &EgressRules) -> Result<(), Invalid> {
    at_most(&format!("{name}.allow_cidrs"), &rules.allow_cidrs, MAX_LIST)?;
    at_most(&format!("{name}.deny_cidrs"), &rules.deny_cidrs, MAX_LIST)?;
    at_most(&format!("{name}.allow_ports"), &rules.allow_ports, MAX_LIST)?;
    if let Some(i) = rules.allow_ports.iter().position(|p| *p == 0) {
        return Err(field(
            format!("{name}.allow_ports[{i}]"),
            0,
            "must not be 0",
        ));
    }
    Ok(())
}

pub fn slot_spec(name: &str, spec: &SlotSpec) -> Result<(), Invalid> {
    slot_id(&format!("{name}.slot"), &spec.slot)?;
    network_cidr(&format!("{name}.peers"), spec.peers)?;
    slot_addrs(name, spec.host_addr, spec.vm_addr, spec.peers)?;
    egress(&format!("{name}.egress"), &spec.egress)
}

/// An interface name the kernel accepts that is also safe to quote in an nftables rule:
/// 1 to 15 bytes of letters, digits, `-`, `_` and `.`, not `.` or `..`.
pub fn interface(name: &str, value: &str) -> Result<(), Invalid> {
    let bad_chars = !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if value.is_empty()
        || value.len() > MAX_IFNAME_LEN
        || bad_chars
        || value == "."
        || value == ".."
    {
        return Err(field(
            name,
            quoted(value),
            format!(
                "must be an interface name: 1 to {MAX_IFNAME_LEN} letters, digits, '-', '_' or '.', not \".\" or \"..\""
            ),
        ));
    }
    if value.starts_with(HOST_VETH_PREFIX) {
        return Err(field(
            name,
            quoted(value),
            format!("must not be a slot's interface (those start with {HOST_VETH_PREFIX:?})"),
        ));
    }
    Ok(())
}

/// A private network's name: 1 to 63 of `[a-z0-9-]`, not starting with `-`.
pub fn network_name(name: &str, value: &str) -> Result<(), Invalid> {
    let ok = (1..=63).contains(&value.len())
        && !value.starts_with('-')
        && value
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'));
    if !ok {
        return Err(field(
            name,
            quoted(value),
            "must be 1 to 63 lowercase letters, digits or '-', not starting with '-'",
        ));
    }
    Ok(())
}

fn host_slot(name: &str, slot: &HostSlot, rules: &HostRules) -> Result<(), Invalid> {
    slot_id(&format!("{name}.slot"), &slot.slot)?;
    if slot.slot.instance != rules.instance {
        return Err(field(
            format!("{name}.slot.instance"),
            quoted(&slot.slot.instance),
            format!("must be the rule set's instance {:?}", rules.instance),
        ));
    }
    slot_addrs(name, slot.host_addr, slot.vm_addr, rules.cidr)
}

fn private_network(name: &str, network: &PrivateNetwork, cidr: Cidr) -> Result<(), Invalid> {
    network_name(&format!("{name}.name"), &network.name)?;
    at_most(&format!("{name}.members"), &network.members, MAX_SLOTS)?;
    for (i, member) in network.members.iter().enumerate() {
        if !cidr.contains(*member) || u32::from(*member) & 3 != 2 {
            return Err(field(
                format!("{name}.members[{i}]"),
                member,
                format!("must be a VM's address in {cidr} (the second usable address of a /30)"),
            ));
        }
    }
    Ok(())
}

pub fn host_rules(name: &str, rules: &HostRules) -> Result<(), Invalid> {
    instance(&format!("{name}.instance"), &rules.instance)?;
    network_cidr(&format!("{name}.cidr"), rules.cidr)?;
    if let Some(outbound) = &rules.outbound {
        interface(&format!("{name}.outbound"), outbound)?;
    }
    at_most(&format!("{name}.slots"), &rules.slots, MAX_SLOTS)?;
    let (mut ids, mut addrs) = (BTreeSet::new(), BTreeSet::new());
    for (i, slot) in rules.slots.iter().enumerate() {
        let at = format!("{name}.slots[{i}]");
        host_slot(&at, slot, rules)?;
        if !ids.insert(&slot.slot.vm) {
            return Err(field(
                format!("{at}.slot.vm"),
                quoted(&slot.slot.vm),
                "must appear once in the rule set",
            ));
        }
        if !addrs.insert(slot.host_addr) {
            return Err(field(
                format!("{at}.host_addr"),
                slot.host_addr,
                "must belong to one slot only",
            ));
        }
    }
    at_most(&format!("{name}.networks"), &rules.networks, MAX_LIST)?;
    let mut names = BTreeSet::new();
    for (i, network) in rules.networks.iter().enumerate() {
        let at = format!("{name}.networks[{i}]");
        private_network(&at, network, rules.cidr)?;
        if !names.insert(&network.name) {
            return Err(field(
                format!("{at}.name"),
                quoted(&network.name),
                "must appear once in the rule set",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{EgressMode, SlotSpec};

    fn id() -> SlotId {
        SlotId {
            instance: "0123abcd".into(),
            vm: "fedcba9876543210".into(),
        }
    }

    fn spec() -> SlotSpec {
        SlotSpec {
            slot: id(),
            host_addr: Ipv4Addr::new(172, 28, 0, 5),
            vm_addr: Ipv4Addr::new(172, 28, 0, 6),
            peers: "172.28.0.0/16".parse().unwrap(),
            egress: EgressRules::default(),
        }
    }

    fn rules() -> HostRules {
        HostRules {
            instance: "0123abcd".into(),
            cidr: "172.28.0.0/16".parse().unwrap(),
            outbound: None,
            slots: vec![HostSlot {
                slot: id(),
                host_addr: Ipv4Addr::new(172, 28, 0, 5),
                vm_addr: Ipv4Addr::new(172, 28, 0, 6),
            }],
            networks: vec![PrivateNetwork {
                name: "db-tier".into(),
                members: vec![Ipv4Addr::new(172, 28, 0, 6)],
            }],
        }
    }

    /// Asserts the request is refused with exactly this message.
    #[track_caller]
    fn refused(request: Request, message: &str) {
        let err = super::request(&request).expect_err(message);
        assert_eq!(err.to_string(), message);
    }

    fn create(change: impl FnOnce(&mut SlotSpec)) -> Request {
        let mut spec = spec();
        change(&mut spec);
        Request::CreateSlot { spec }
    }

    fn apply(change: impl FnOnce(&mut HostRules)) -> Request {
        let mut rules = rules();
        change(&mut rules);
        Request::ApplyHostRules { rules }
    }

    #[test]
    fn good_requests_pass() {
        let good = [
            Request::Hello,
            Request::Setup {
                instance: "0123abcd".into(),
                cidr: "100.0.0.0/8".parse().unwrap(),
            },
            Request::Setup {
                instance: "0123abcd".into(),
                cidr: "192.168.7.8/29".parse().unwrap(),
            },
            Request::ApplyHostRules { rules: rules() },
            apply(|r| {
                r.slots.clear();
                r.networks.clear();
                r.outbound = Some("enp3s0.100".into());
            }),
            Request::RemoveHostRules {
                instance: "0123abcd".into(),
            },
            Request::CreateSlot { spec: spec() },
            create(|s| {
                s.egress = EgressRules {
                    mode: EgressMode::DenyAll,
                    allow_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
                    deny_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                    allow_ports: vec![1, 443, 65535],
                    domains: true,
                }
            }),
            Request::DeleteSlot { slot: id() },
            Request::OpenTap { slot: id() },
            Request::SetEgress {
                slot: id(),
                egress: EgressRules::default(),
            },
            Request::AllowResolved {
                slot: id(),
                addrs: vec![Ipv4Addr::new(93, 184, 216, 34); MAX_RESOLVED],
                ttl_secs: 1,
            },
            Request::AllowResolved {
                slot: id(),
                addrs: vec![],
                ttl_secs: MAX_TTL_SECS,
            },
            Request::ListSlots {
                instance: "ffffffff".into(),
            },
        ];
        for request in good {
            assert_eq!(super::request(&request), Ok(()), "{request:?}");
        }
    }

    #[test]
    fn slot_ids_are_lowercase_hex_of_the_right_length() {
        for vm in [
            "ABC",
            "FEDCBA9876543210",
            "fedcba987654321",
            "fedcba98765432100",
            "",
        ] {
            let slot = SlotId {
                vm: vm.into(),
                ..id()
            };
            refused(
                Request::DeleteSlot { slot },
                &format!("slot.vm {vm:?}: must be 16 lowercase hex digits"),
            );
        }
        for instance in ["0123abcg", "0123abc", "0123abcd0", "0123ABCD", "../../x"] {
            let slot = SlotId {
                instance: instance.into(),
                ..id()
            };
            refused(
                Request::OpenTap { slot },
                &format!("slot.instance {instance:?}: must be 8 lowercase hex digits"),
            );
        }
        refused(
            Request::ListSlots {
                instance: "hearth".into(),
            },
            "instance \"hearth\": must be 8 lowercase hex digits",
        );
        refused(
            create(|s| s.slot.vm = "x".into()),
            "spec.slot.vm \"x\": must be 16 lowercase hex digits",
        );
        // Multi-byte characters are counted as bytes and refused, never sliced.
        refused(
            Request::RemoveHostRules {
                instance: "ééééé".into(),
            },
            "instance \"ééééé\": must be 8 lowercase hex digits",
        );
    }

    #[test]
    fn network_cidrs_are_sized_and_clear_of_reserved_networks() {
        let setup = |cidr: &str| Request::Setup {
            instance: "0123abcd".into(),
            cidr: cidr.parse().unwrap(),
        };
        refused(
            setup("10.0.0.0/7"),
            "cidr 10.0.0.0/7: the prefix length must be 8 to 29",
        );
        refused(
            setup("10.0.0.0/30"),
            "cidr 10.0.0.0/30: the prefix length must be 8 to 29",
        );
        refused(
            setup("127.0.0.0/16"),
            "cidr 127.0.0.0/16: must not overlap 127.0.0.0/8 (loopback)",
        );
        refused(
            setup("169.254.0.0/16"),
            "cidr 169.254.0.0/16: must not overlap 169.254.0.0/16 (link-local, where the metadata address lives)",
        );
        refused(
            setup("224.1.0.0/16"),
            "cidr 224.1.0.0/16: must not overlap 224.0.0.0/4 (multicast)",
        );
        refused(
            setup("10.254.0.0/16"),
            "cidr 10.254.0.0/16: must not overlap 10.254.254.0/30 (every slot's inner network)",
        );
        refused(
            setup("10.0.0.0/8"),
            "cidr 10.0.0.0/8: must not overlap 10.254.254.0/30 (every slot's inner network)",
        );
        refused(
            setup("0.0.0.0/8"),
            "cidr 0.0.0.0/8: must not overlap 0.0.0.0/8 (\"this\" network)",
        );
        refused(
            create(|s| s.peers = "127.0.0.0/8".parse().unwrap()),
            "spec.peers 127.0.0.0/8: must not overlap 127.0.0.0/8 (loopback)",
        );
        refused(
            apply(|r| r.cidr = "172.0.0.0/30".parse().unwrap()),
            "rules.cidr 172.0.0.0/30: the prefix length must be 8 to 29",
        );
    }

    #[test]
    fn slot_addresses_are_one_slash_30_inside_the_network() {
        refused(
            create(|s| s.host_addr = Ipv4Addr::new(172, 28, 0, 4)),
            "spec.host_addr 172.28.0.4: must be the first usable address of a /30 (its last two bits 01)",
        );
        refused(
            create(|s| s.host_addr = Ipv4Addr::new(172, 28, 0, 6)),
            "spec.host_addr 172.28.0.6: must be the first usable address of a /30 (its last two bits 01)",
        );
        refused(
            create(|s| s.vm_addr = Ipv4Addr::new(172, 28, 0, 7)),
            "spec.vm_addr 172.28.0.7: must be host_addr + 1 (172.28.0.6)",
        );
        refused(
            create(|s| {
                s.host_addr = Ipv4Addr::new(172, 29, 0, 1);
                s.vm_addr = Ipv4Addr::new(172, 29, 0, 2);
            }),
            "spec.host_addr 172.29.0.1: must be inside 172.28.0.0/16",
        );
        refused(
            apply(|r| r.slots[0].vm_addr = Ipv4Addr::new(172, 28, 0, 9)),
            "rules.slots[0].vm_addr 172.28.0.9: must be host_addr + 1 (172.28.0.6)",
        );
        // 255.255.255.253 + 1 does not overflow into a wrong message.
        refused(
            create(|s| {
                s.peers = "200.0.0.0/8".parse().unwrap();
                s.host_addr = Ipv4Addr::new(200, 255, 255, 253);
                s.vm_addr = Ipv4Addr::new(200, 255, 255, 253);
            }),
            "spec.vm_addr 200.255.255.253: must be host_addr + 1 (200.255.255.254)",
        );
    }

    #[test]
    fn allowed_ports_are_non_zero() {
        refused(
            create(|s| s.egress.allow_ports = vec![80, 0]),
            "spec.egress.allow_ports[1] 0: must not be 0",
        );
        refused(
            Request::SetEgress {
                slot: id(),
                egress: EgressRules {
                    allow_ports: vec![0],
                    ..EgressRules::default()
                },
            },
            "egress.allow_ports[0] 0: must not be 0",
        );
    }

    #[test]
    fn lists_are_bounded() {
        let many_cidrs = vec!["10.0.0.0/8".parse().unwrap(); MAX_LIST + 1];
        refused(
            create(|s| s.egress.allow_cidrs = many_cidrs.clone()),
            "spec.egress.allow_cidrs: 4097 entries, at most 4096 are allowed",
        );
        refused(
            create(|s| s.egress.deny_cidrs = many_cidrs),
            "spec.egress.deny_cidrs: 4097 entries, at most 4096 are allowed",
        );
        refused(
            create(|s| s.egress.allow_ports = vec![80; MAX_LIST + 1]),
            "spec.egress.allow_ports: 4097 entries, at most 4096 are allowed",
        );
        refused(
            Request::AllowResolved {
                slot: id(),
                addrs: vec![Ipv4Addr::new(1, 1, 1, 1); MAX_RESOLVED + 1],
                ttl_secs: 60,
            },
            "addrs: 257 entries, at most 256 are allowed",
        );
        let slot = rules().slots[0].clone();
        refused(
            apply(|r| r.slots = vec![slot; MAX_SLOTS + 1]),
            "rules.slots: 65537 entries, at most 65536 are allowed",
        );
        refused(
            apply(|r| r.networks[0].members = vec![Ipv4Addr::new(172, 28, 0, 6); MAX_SLOTS + 1]),
            "rules.networks[0].members: 65537 entries, at most 65536 are allowed",
        );
    }

    #[test]
    fn ttls_are_a_second_to_a_day() {
        for ttl_secs in [0, MAX_TTL_SECS + 1, u32::MAX] {
            refused(
                Request::AllowResolved {
                    slot: id(),
                    addrs: vec![],
                    ttl_secs,
                },
                &format!("ttl_secs {ttl_secs}: must be 1 to 86400 seconds"),
            );
        }
    }

    #[test]
    fn outbound_is_a_safe_interface_name_not_a_slots() {
        let rule = "must be an interface name: 1 to 15 letters, digits, '-', '_' or '.', not \".\" or \"..\"";
        for bad in [
            "",
            ".",
            "..",
            "eth0/1",
            "eth 0",
            "eth0\n",
            "a23456789012345x",
            "eth\"0",
            "eth*",
            "eth0:1",
            "é",
        ] {
            refused(
                apply(|r| r.outbound = Some(bad.into())),
                &format!("rules.outbound {bad:?}: {rule}"),
            );
        }
        refused(
            apply(|r| r.outbound = Some("hv0123".into())),
            "rules.outbound \"hv0123\": must not be a slot's interface (those start with \"hv\")",
        );
        for good in [
            "eth0",
            "a23456789012345",
            "br-1a2b",
            "wlp2s0",
            "bond0.100",
            "x_y",
        ] {
            assert_eq!(
                super::request(&apply(|r| r.outbound = Some(good.into()))),
                Ok(()),
                "{good}"
            );
        }
    }

    #[test]
    fn private_networks_have_safe_unique_names_and_vm_members() {
        let rule = "must be 1 to 63 lowercase letters, digits or '-', not starting with '-'";
        let long = "a".repeat(64);
        for bad in ["", "-db", "DB", "db_tier", "db tier", "db\"", long.as_str()] {
            refused(
                apply(|r| r.networks[0].name = bad.into()),
                &format!("rules.networks[0].name {bad:?}: {rule}"),
            );
        }
        assert_eq!(
            super::request(&apply(|r| r.networks[0].name = "a".repeat(63))),
            Ok(())
        );
        assert_eq!(
            super::request(&apply(|r| r.networks[0].name = "0-db-".into())),
            Ok(())
        );
        refused(
            apply(|r| {
                let again = r.networks[0].clone();
                r.networks.push(again);
            }),
            "rules.networks[1].name \"db-tier\": must appear once in the rule set",
        );
        refused(
            apply(|r| r.networks[0].members.push(Ipv4Addr::new(172, 28, 0, 5))),
            "rules.networks[0].members[1] 172.28.0.5: must be a VM's address in 172.28.0.0/16 (the second usable address of a /30)",
        );
        refused(
            apply(|r| r.networks[0].members = vec![Ipv4Addr::new(10, 0, 0, 2)]),
            "rules.networks[0].members[0] 10.0.0.2: must be a VM's address in 172.28.0.0/16 (the second usable address of a /30)",
        );
    }

    #[test]
    fn host_rule_slots_are_the_instances_and_unique() {
        refused(
            apply(|r| r.slots[0].slot.instance = "0123abce".into()),
            "rules.slots[0].slot.instance \"0123abce\": must be the rule set's instance \"0123abcd\"",
        );
        refused(
            apply(|r| r.instance = "nope".into()),
            "rules.instance \"nope\": must be 8 lowercase hex digits",
        );
        refused(
            apply(|r| {
                let mut again = r.slots[0].clone();
                again.host_addr = Ipv4Addr::new(172, 28, 0, 9);
                again.vm_addr = Ipv4Addr::new(172, 28, 0, 10);
                r.slots.push(again);
            }),
            "rules.slots[1].slot.vm \"fedcba9876543210\": must appear once in the rule set",
        );
        refused(
            apply(|r| {
                let mut again = r.slots[0].clone();
                again.slot.vm = "0000000000000001".into();
                r.slots.push(again);
            }),
            "rules.slots[1].host_addr 172.28.0.5: must belong to one slot only",
        );
    }

    #[test]
    fn a_bound_helper_takes_only_its_instance_and_cidr() {
        let binding = Binding {
            instance: "0123abcd".into(),
            cidr: "172.28.0.0/16".parse().unwrap(),
        };
        let served = |r: &Request| super::served(r, Some(&binding));
        let setup = |instance: &str, cidr: &str| Request::Setup {
            instance: instance.into(),
            cidr: cidr.parse().unwrap(),
        };
        // Before a setup, only Hello and Setup.
        for request in [Request::Hello, setup("0123abcd", "10.0.0.0/16")] {
            assert_eq!(super::served(&request, None), Ok(()));
        }
        assert_eq!(
            super::served(&Request::OpenTap { slot: id() }, None)
                .unwrap_err()
                .to_string(),
            "open_tap: send setup first (a helper serves no hearthd until a setup names it)"
        );
        // After it, everything of the instance inside the cidr.
        let good = [
            Request::Hello,
            setup("0123abcd", "172.28.0.0/16"),
            Request::CreateSlot { spec: spec() },
            Request::ApplyHostRules { rules: rules() },
            Request::RemoveHostRules {
                instance: "0123abcd".into(),
            },
            Request::ListSlots {
                instance: "0123abcd".into(),
            },
            Request::DeleteSlot { slot: id() },
            Request::OpenTap { slot: id() },
            Request::OpenServices { slot: id() },
            Request::SetEgress {
                slot: id(),
                egress: EgressRules::default(),
            },
            Request::AllowResolved {
                slot: id(),
                addrs: vec![],
                ttl_secs: 60,
            },
        ];
        for request in good {
            assert_eq!(served(&request), Ok(()), "{request:?}");
        }
        let restart = "restart hearth-helper to serve another";
        assert_eq!(
            served(&setup("0123abce", "172.28.0.0/16"))
                .unwrap_err()
                .to_string(),
            format!(
                "setup of instance \"0123abce\" with cidr 172.28.0.0/16: this helper serves instance \"0123abcd\" with cidr 172.28.0.0/16; {restart}"
            )
        );
        assert!(served(&setup("0123abcd", "172.29.0.0/16")).is_err());
        let other = SlotId {
            instance: "0123abce".into(),
            ..id()
        };
        let foreign = |field: &str| {
            format!(
                "{field} \"0123abce\": must be the instance this helper serves (\"0123abcd\"); {restart}"
            )
        };
        for (request, field) in [
            (
                Request::DeleteSlot {
                    slot: other.clone(),
                },
                "slot.instance",
            ),
            (
                Request::OpenServices {
                    slot: other.clone(),
                },
                "slot.instance",
            ),
            (
                Request::AllowResolved {
                    slot: other.clone(),
                    addrs: vec![],
                    ttl_secs: 1,
                },
                "slot.instance",
            ),
            (create(|s| s.slot = other.clone()), "spec.slot.instance"),
            (
                apply(|r| {
                    r.instance = "0123abce".into();
                    r.slots.clear();
                }),
                "rules.instance",
            ),
            (
                Request::ListSlots {
                    instance: "0123abce".into(),
                },
                "instance",
            ),
            (
                Request::RemoveHostRules {
                    instance: "0123abce".into(),
                },
                "instance",
            ),
        ] {
            assert_eq!(served(&request).unwrap_err().to_string(), foreign(field));
        }
        // A slot in another network (its addresses inside that one) and host rules for another
        // network are refused.
        let elsewhere = create(|s| {
            s.peers = "10.20.0.0/16".parse().unwrap();
            s.host_addr = Ipv4Addr::new(10, 20, 0, 1);
            s.vm_addr = Ipv4Addr::new(10, 20, 0, 2);
        });
        assert_eq!(super::request(&elsewhere), Ok(()));
        assert_eq!(
            served(&elsewhere).unwrap_err().to_string(),
            format!(
                "spec.peers 10.20.0.0/16: must be the cidr this helper serves (172.28.0.0/16); {restart}"
            )
        );
        let narrower = create(|s| s.peers = "172.28.0.0/24".parse().unwrap());
        assert!(served(&narrower).is_err(), "peers must be the whole cidr");
        assert_eq!(
            served(&apply(|r| {
                r.cidr = "172.28.0.0/15".parse().unwrap();
            }))
            .unwrap_err()
            .to_string(),
            format!(
                "rules.cidr 172.28.0.0/15: must be the cidr this helper serves (172.28.0.0/16); {restart}"
            )
        );
    }

    #[test]
    fn setup_refuses_networks_the_host_routes_elsewhere() {
        let route = |dst: &str, dev: Option<&str>| Route {
            dst: dst.parse().unwrap(),
            dev: dev.map(str::to_owned),
        };
        let routes = [
            route("0.0.0.0/0", Some("eth0")),
            route("192.0.2.0/24", Some("eth0")),
            route("192.0.2.2/32", Some("eth0")),
            route("172.28.0.4/30", Some("hv0123456789abc")),
            route("198.51.100.0/24", None),
        ];
        let cidr = |s: &str| s.parse::<Cidr>().unwrap();
        assert_eq!(setup_routes("cidr", cidr("172.28.0.0/16"), &routes), Ok(()));
        assert_eq!(setup_routes("cidr", cidr("10.0.0.0/8"), &routes), Ok(()));
        assert_eq!(
            setup_routes("cidr", cidr("192.0.0.0/16"), &routes)
                .unwrap_err()
                .to_string(),
            "cidr 192.0.0.0/16: must not overlap the host's route to 192.0.2.0/24 on eth0 (pick a network the host does not use)"
        );
        assert_eq!(
            setup_routes("cidr", cidr("198.51.100.128/25"), &routes)
                .unwrap_err()
                .to_string(),
            "cidr 198.51.100.128/25: must not overlap the host's route to 198.51.100.0/24 (pick a network the host does not use)"
        );
    }
}
