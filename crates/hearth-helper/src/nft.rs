//! nftables: the rule sets as pure functions returning the text fed to `nft -f -`, and an
//! [`Nft`] trait that applies them ([`RealNft`] runs `nft`, [`RecordingNft`] records).
//!
//! Each apply is one atomic transaction. A whole table is replaced by one file that declares it
//! (so it exists), deletes it, and declares it again with its content: a reader never sees it
//! half-made, and a failing file changes nothing.
//!
//! Every name and address written here comes from a validated request ([`crate::validate`]):
//! interface names are `hv` + hex, `eth0`, `tap0` or an outbound name of letters, digits,
//! `-_.`; set names are `net_` + `[a-z0-9_]`. Nothing free-form reaches the text.
//!
//! # The host table and Docker
//!
//! A packet passes every base chain hooked where it goes, and an `accept` in one does not
//! override a `drop` in another. On a host where Docker runs, its iptables `FORWARD` policy is
//! `DROP`, so it drops the traffic of the VMs the host table lets through. An operator adds,
//! once:
//!
//! ```text
//! iptables -I DOCKER-USER -i hv+ -j ACCEPT
//! iptables -I DOCKER-USER -o hv+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
//! ```
//!
//! (Docker evaluates `DOCKER-USER` first in `FORWARD`; these accept what leaves a slot and the
//! answers to it. Whatever else a VM may do is still decided by the host table.)

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use crate::cmd::{self, CommandError};
use crate::net::Ns;
use crate::proto::{
    Cidr, DNS_PORT, EgressMode, EgressRules, GATEWAY_ADDR, GUEST_ADDR, HOST_VETH_PREFIX, HostRules,
    METADATA_ADDR, METADATA_PORT, SLOT_VETH, SlotSpec, TABLE, TAP_NAME,
};

/// The first lines of every file that replaces a table: make sure it exists, then delete it.
fn reset() -> String {
    format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n")
}

/// The file that removes the table (it need not exist).
pub fn remove_table() -> String {
    reset()
}

/// The set of a private network: `net_` and its name with `-` as `_`.
pub fn network_set(name: &str) -> String {
    format!("net_{}", name.replace('-', "_"))
}

/// The networks, sorted, without duplicates and without those inside another: an interval set
/// refuses overlapping elements. (Two CIDRs either nest or are disjoint.)
pub fn normalize(cidrs: &[Cidr]) -> Vec<Cidr> {
    let sorted: BTreeSet<Cidr> = cidrs.iter().copied().collect();
    let mut out: Vec<Cidr> = Vec::with_capacity(sorted.len());
    // Sorted by address then prefix, a network's container (same or lower address, shorter
    // prefix) comes first; the last kept one is the only candidate.
    for c in sorted {
        if out.last().is_some_and(|kept| kept.overlaps(&c)) {
            continue;
        }
        out.push(c);
    }
    out
}

/// A set declaration, one element a line.
fn set(out: &mut String, name: &str, ty: &str, flags: Option<&str>, elements: &[String]) {
    let _ = writeln!(out, "\tset {name} {{");
    let _ = writeln!(out, "\t\ttype {ty}");
    if let Some(flags) = flags {
        let _ = writeln!(out, "\t\tflags {flags}");
    }
    if !elements.is_empty() {
        let _ = writeln!(out, "\t\telements = {{");
        for e in elements {
            let _ = writeln!(out, "\t\t\t{e},");
        }
        let _ = writeln!(out, "\t\t}}");
    }
    let _ = writeln!(out, "\t}}");
}

/// A chain: its base-chain line (if any), then its rules.
fn chain(out: &mut String, name: &str, base: Option<&str>, rules: &[String]) {
    let _ = writeln!(out, "\tchain {name} {{");
    if let Some(base) = base {
        let _ = writeln!(out, "\t\t{base}");
    }
    for rule in rules {
        let _ = writeln!(out, "\t\t{rule}");
    }
    let _ = writeln!(out, "\t}}");
}

/// The host table of one hearthd: VM isolation and masquerading, with per-VM data in sets only
/// (so its size, not its rule count, grows with the VMs).
///
/// - `vm_src` (`ifname . ipv4_addr`): the one source address each host veth may send from.
/// - `services` (`ifname . ipv4_addr . inet_service`): the metadata and DNS ports each VM may
///   reach, on its own `host_addr`, through its own veth.
/// - `net_<name>`: the members of each private network.
///
/// A guest reaches nothing of the host but its services; nothing outside opens a connection
/// to a VM; VMs reach each other only inside a private network they share; their traffic to
/// the rest of the world is masqueraded (the egress policy is each slot's).
///
/// See the module documentation for what an operator adds where Docker runs.
pub fn host_table(rules: &HostRules) -> String {
    let vm = format!("\"{HOST_VETH_PREFIX}*\"");
    let mut out = reset();
    let _ = writeln!(out, "table ip {TABLE} {{");
    let vm_src: Vec<String> = rules
        .slots
        .iter()
        .map(|s| format!("\"{}\" . {}", s.slot.host_veth(), s.vm_addr))
        .collect();
    set(&mut out, "vm_src", "ifname . ipv4_addr", None, &vm_src);
    for network in &rules.networks {
        let members: BTreeSet<Ipv4Addr> = network.members.iter().copied().collect();
        let members: Vec<String> = members.iter().map(Ipv4Addr::to_string).collect();
        set(
            &mut out,
            &network_set(&network.name),
            "ipv4_addr",
            None,
            &members,
        );
    }
    chain(
        &mut out,
        "input",
        Some("type filter hook input priority 0; policy accept;"),
        &[
            format!("iifname {vm} ct state established,related accept"),
            format!("iifname {vm} drop"),
        ],
    );
    chain(
        &mut out,
        "forward",
        Some("type filter hook forward priority 0; policy accept;"),
        &[
            format!("iifname {vm} iifname . ip saddr != @vm_src drop"),
            "ct state established,related accept".to_owned(),
            format!("iifname {vm} oifname {vm} jump between_vms"),
            format!("oifname {vm} drop"),
        ],
    );
    let mut between: Vec<String> = rules
        .networks
        .iter()
        .map(|n| {
            let set = network_set(&n.name);
            format!("ip saddr @{set} ip daddr @{set} accept")
        })
        .collect();
    between.push("drop".to_owned());
    chain(&mut out, "between_vms", None, &between);
    let masquerade = match &rules.outbound {
        Some(outbound) => format!("ip saddr {} oifname \"{outbound}\" masquerade", rules.cidr),
        None => format!("ip saddr {} oifname != {vm} masquerade", rules.cidr),
    };
    chain(
        &mut out,
        "postrouting",
        Some("type nat hook postrouting priority 100; policy accept;"),
        &[masquerade],
    );
    let _ = writeln!(out, "}}");
    out
}

/// The egress chain's rules. `allow_all`: everything not denied; `deny_all`: only the allowed
/// networks and the resolved addresses of allowed domains, limited to `allow_ports` (TCP) when
/// there are any. Denied networks win. In `allow_all` mode ports are ignored: they restrict
/// what is allowed, and everything is.
fn egress_rules(egress: &EgressRules) -> Vec<String> {
    let mut rules = vec!["ip daddr @deny drop".to_owned()];
    match egress.mode {
        EgressMode::AllowAll => rules.push("accept".to_owned()),
        EgressMode::DenyAll => {
            let ports = if egress.allow_ports.is_empty() {
                ""
            } else {
                " tcp dport @ports"
            };
            rules.push(format!("ip daddr @allow{ports} accept"));
            if egress.domains {
                rules.push(format!("ip daddr @resolved{ports} accept"));
            }
            rules.push("drop".to_owned());
        }
    }
    rules
}

/// The elements of the egress sets `allow`, `deny` and `ports`.
fn egress_elements(egress: &EgressRules) -> [(&'static str, Vec<String>); 3] {
    let cidrs = |list: &[Cidr]| normalize(list).iter().map(Cidr::to_string).collect();
    let ports: BTreeSet<u16> = egress.allow_ports.iter().copied().collect();
    [
        ("allow", cidrs(&egress.allow_cidrs)),
        ("deny", cidrs(&egress.deny_cidrs)),
        ("ports", ports.iter().map(u16::to_string).collect()),
    ]
}

/// The slot's table: the guest's addresses translated to and from the VM's, its services
/// reached at their fixed addresses, and its egress policy.
///
/// Replacing it empties the `resolved` set (the addresses of allowed domains): a CreateSlot
/// on an existing slot forgets them until the DNS forwarder resolves them again.
/// [`set_egress`] keeps them.
pub fn slot_table(spec: &SlotSpec) -> String {
    let (host, vm, tap, eth) = (spec.host_addr, spec.vm_addr, TAP_NAME, SLOT_VETH);
    let mut out = reset();
    let _ = writeln!(out, "table ip {TABLE} {{");
    let [allow, deny, ports] = egress_elements(&spec.egress);
    set(&mut out, allow.0, "ipv4_addr", Some("interval"), &allow.1);
    set(&mut out, deny.0, "ipv4_addr", Some("interval"), &deny.1);
    set(&mut out, ports.0, "inet_service", None, &ports.1);
    set(&mut out, "resolved", "ipv4_addr", Some("timeout"), &[]);
    chain(
        &mut out,
        "prerouting",
        Some("type nat hook prerouting priority -100; policy accept;"),
        &[format!(
            "iifname \"{eth}\" ip daddr {vm} dnat to {GUEST_ADDR}"
        )],
    );
    chain(
        &mut out,
        "postrouting",
        Some("type nat hook postrouting priority 100; policy accept;"),
        &[format!(
            "oifname \"{eth}\" ip saddr {GUEST_ADDR} snat to {vm}"
        )],
    );
    chain(
        &mut out,
        "forward",
        Some("type filter hook forward priority 0; policy drop;"),
        &[
            format!("iifname \"{tap}\" ip saddr != {GUEST_ADDR} drop"),
            "ct state established,related accept".to_owned(),
            format!("iifname \"{eth}\" oifname \"{tap}\" accept"),
            // What follows is the guest's own traffic only.
            format!("iifname != \"{tap}\" drop"),
            format!("ip daddr {host} drop"),
            format!("ip daddr {} accept", spec.peers),
            "jump egress".to_owned(),
        ],
    );
    chain(&mut out, "egress", None, &egress_rules(&spec.egress));
    chain(
        &mut out,
        "input",
        Some("type filter hook input priority 0; policy drop;"),
        &[
            "ct state established,related accept".to_owned(),
            "iifname \"lo\" accept".to_owned(),
            format!("iifname \"{tap}\" ip daddr {GATEWAY_ADDR} udp dport {DNS_PORT} accept"),
            format!("iifname \"{tap}\" ip daddr {GATEWAY_ADDR} tcp dport {DNS_PORT} accept"),
            format!("iifname \"{tap}\" ip daddr {METADATA_ADDR} tcp dport {METADATA_PORT} accept"),
        ],
    );
    let _ = writeln!(out, "}}");
    out
}

/// Replaces the slot's egress policy in one transaction, keeping the `resolved` set: the
/// egress chain and the `allow`, `deny` and `ports` sets are flushed and filled again.
pub fn set_egress(egress: &EgressRules) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "flush chain ip {TABLE} egress");
    let elements = egress_elements(egress);
    for (name, _) in &elements {
        let _ = writeln!(out, "flush set ip {TABLE} {name}");
    }
    for (name, values) in &elements {
        if !values.is_empty() {
            let _ = writeln!(
                out,
                "add element ip {TABLE} {name} {{ {} }}",
                values.join(", ")
            );
        }
    }
    for rule in egress_rules(egress) {
        let _ = writeln!(out, "add rule ip {TABLE} egress {rule}");
    }
    out
}

/// Lets the slot reach `addrs` for `ttl_secs`: each address is (re)added with that timeout,
/// replacing what an earlier answer set. Empty for no addresses.
pub fn allow_resolved(addrs: &[Ipv4Addr], ttl_secs: u32) -> String {
    let addrs: BTreeSet<Ipv4Addr> = addrs.iter().copied().collect();
    if addrs.is_empty() {
        return String::new();
    }
    let plain: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
    let timed: Vec<String> = addrs
        .iter()
        .map(|a| format!("{a} timeout {ttl_secs}s"))
        .collect();
    // `add` leaves an existing element's timeout as it was: make sure each is there, delete
    // it, and add it with the new timeout, all in one transaction.
    format!(
        "add element ip {TABLE} resolved {{ {plain} }}\n\
         delete element ip {TABLE} resolved {{ {plain} }}\n\
         add element ip {TABLE} resolved {{ {timed} }}\n",
        plain = plain.join(", "),
        timed = timed.join(", "),
    )
}

/// A rule set that could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nftables refused the rule set for {place}")]
    Apply {
        place: String,
        #[source]
        source: CommandError,
    },
    #[error("could not ask nft its version")]
    Version {
        #[source]
        source: CommandError,
    },
}

fn place(ns: Ns<'_>) -> String {
    match ns {
        Ns::Host => "the host namespace".to_owned(),
        Ns::Slot(name) => format!("slot {name}"),
    }
}

/// Applies nftables files.
pub trait Nft: Send + Sync {
    /// Feeds `script` to `nft -f -` in the namespace: one transaction.
    fn apply(&self, ns: Ns<'_>, script: &str) -> Result<(), NftError>;
    /// `nft --version`'s answer.
    fn version(&self) -> Result<String, NftError>;
}

/// `nft -f -` in the host namespace, `ip netns exec NAME nft -f -` in a slot.
#[derive(Debug, Default)]
pub struct RealNft;

impl Nft for RealNft {
    fn apply(&self, ns: Ns<'_>, script: &str) -> Result<(), NftError> {
        let result = match ns {
            Ns::Host => cmd::run("nft", &["-f", "-"], Some(script)),
            Ns::Slot(name) => {
                let nft = cmd::program("nft");
                let nft = nft.to_string_lossy();
                cmd::run(
                    "ip",
                    &["netns", "exec", name, &nft, "-f", "-"],
                    Some(script),
                )
            }
        };
        result.map(drop).map_err(|source| NftError::Apply {
            place: place(ns),
            source,
        })
    }

    fn version(&self) -> Result<String, NftError> {
        cmd::run("nft", &["--version"], None)
            .map(|v| v.trim().to_owned())
            .map_err(|source| NftError::Version { source })
    }
}

/// Records every file applied, as (namespace, text); `fail` makes applies fail with that error
/// output.
#[derive(Debug, Default)]
pub struct RecordingNft {
    applied: Mutex<Vec<(Option<String>, String)>>,
    fail: Mutex<Option<String>>,
}

impl RecordingNft {
    /// What was applied so far, and forgets it.
    pub fn take_applied(&self) -> Vec<(Option<String>, String)> {
        std::mem::take(&mut self.applied.lock().unwrap_or_else(|e| e.into_inner()))
    }
    /// Makes the following applies fail with `stderr` (or succeed again with `None`).
    pub fn set_fail(&self, stderr: Option<&str>) {
        *self.fail.lock().unwrap_or_else(|e| e.into_inner()) = stderr.map(str::to_owned);
    }
}

impl Nft for RecordingNft {
    fn apply(&self, ns: Ns<'_>, script: &str) -> Result<(), NftError> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((ns.name(), script.to_owned()));
        match &*self.fail.lock().unwrap_or_else(|e| e.into_inner()) {
            None => Ok(()),
            Some(stderr) => Err(NftError::Apply {
                place: place(ns),
                source: CommandError::Failed {
                    command: "recorded nft -f -".into(),
                    status: std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
                    stderr: stderr.clone(),
                },
            }),
        }
    }

    fn version(&self) -> Result<String, NftError> {
        Ok("nftables v1.0.6 (recorded)".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{HostSlot, PrivateNetwork, SlotId};

    fn slot(vm: &str, host_addr: [u8; 4]) -> HostSlot {
        let host_addr = Ipv4Addr::from(host_addr);
        HostSlot {
            slot: SlotId {
                instance: "0123abcd".into(),
                vm: vm.into(),
            },
            host_addr,
            vm_addr: Ipv4Addr::from(u32::from(host_addr) + 1),
        }
    }

    fn rules() -> HostRules {
        HostRules {
            instance: "0123abcd".into(),
            cidr: "172.28.0.0/16".parse().unwrap(),
            outbound: None,
            slots: vec![],
            networks: vec![],
        }
    }

    fn spec(egress: EgressRules) -> SlotSpec {
        SlotSpec {
            slot: SlotId {
                instance: "0123abcd".into(),
                vm: "fedcba9876543210".into(),
            },
            host_addr: Ipv4Addr::new(172, 28, 0, 5),
            vm_addr: Ipv4Addr::new(172, 28, 0, 6),
            peers: "172.28.0.0/16".parse().unwrap(),
            egress,
        }
    }

    /// The lines of a chain's body (without the base-chain line), trimmed.
    fn chain_rules(text: &str, name: &str) -> Vec<String> {
        let start = text
            .find(&format!("\tchain {name} {{"))
            .unwrap_or_else(|| panic!("no chain {name} in\n{text}"));
        text[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.trim() != "}")
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.starts_with("type "))
            .collect()
    }

    /// The elements of a set (empty when it has none), trimmed and without commas.
    fn set_elements(text: &str, name: &str) -> Vec<String> {
        let start = text
            .find(&format!("\tset {name} {{"))
            .unwrap_or_else(|| panic!("no set {name} in\n{text}"));
        let body: Vec<&str> = text[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.trim() != "}")
            .collect();
        body.iter()
            .skip_while(|l| !l.contains("elements = {"))
            .skip(1)
            .map(|l| l.trim().trim_end_matches(',').to_owned())
            .collect()
    }

    #[test]
    fn an_empty_host_table_isolates_and_masquerades() {
        let text = host_table(&rules());
        assert!(
            text.starts_with("table ip hearth {}\ndelete table ip hearth\ntable ip hearth {\n")
        );
        assert!(text.ends_with("}\n"));
        assert!(set_elements(&text, "vm_src").is_empty());
        assert!(!text.contains("elements"), "{text}");
        assert_eq!(
            chain_rules(&text, "input"),
            [
                "iifname \"hv*\" ct state established,related accept",
                "iifname \"hv*\" drop",
            ]
        );
        assert_eq!(
            chain_rules(&text, "forward"),
            [
                "iifname \"hv*\" iifname . ip saddr != @vm_src drop",
                "ct state established,related accept",
                "iifname \"hv*\" oifname \"hv*\" jump between_vms",
                "oifname \"hv*\" drop",
            ]
        );
        assert_eq!(chain_rules(&text, "between_vms"), ["drop"]);
        assert_eq!(
            chain_rules(&text, "postrouting"),
            ["ip saddr 172.28.0.0/16 oifname != \"hv*\" masquerade"]
        );
        assert!(text.contains("type nat hook postrouting priority 100; policy accept;"));
    }

    #[test]
    fn host_table_elements_carry_each_slot_and_network() {
        let mut r = rules();
        r.outbound = Some("eth0".into());
        r.slots = vec![
            slot("fedcba9876543210", [172, 28, 0, 5]),
            slot("0000000000000001", [172, 28, 0, 9]),
        ];
        r.networks = vec![
            PrivateNetwork {
                name: "db-tier".into(),
                members: vec![
                    Ipv4Addr::new(172, 28, 0, 10),
                    Ipv4Addr::new(172, 28, 0, 6),
                    Ipv4Addr::new(172, 28, 0, 10),
                ],
            },
            PrivateNetwork {
                name: "empty".into(),
                members: vec![],
            },
        ];
        let text = host_table(&r);
        let (a, b) = (r.slots[0].slot.host_veth(), r.slots[1].slot.host_veth());
        assert_eq!(
            set_elements(&text, "vm_src"),
            [
                format!("\"{a}\" . 172.28.0.6"),
                format!("\"{b}\" . 172.28.0.10")
            ]
        );
        assert_eq!(
            set_elements(&text, "net_db_tier"),
            ["172.28.0.6", "172.28.0.10"]
        );
        assert!(set_elements(&text, "net_empty").is_empty());
        assert_eq!(
            chain_rules(&text, "between_vms"),
            [
                "ip saddr @net_db_tier ip daddr @net_db_tier accept",
                "ip saddr @net_empty ip daddr @net_empty accept",
                "drop",
            ]
        );
        assert_eq!(
            chain_rules(&text, "postrouting"),
            ["ip saddr 172.28.0.0/16 oifname \"eth0\" masquerade"]
        );
    }

    #[test]
    fn the_host_tables_rules_do_not_grow_with_its_vms() {
        let rule_lines = |text: &str| {
            ["input", "forward", "between_vms", "postrouting"]
                .map(|c| chain_rules(text, c))
                .concat()
        };
        let one = host_table(&HostRules {
            slots: vec![slot("0000000000000000", [172, 28, 0, 1])],
            ..rules()
        });
        let fifty = host_table(&HostRules {
            slots: (0..50u32)
                .map(|i| {
                    let addr = u32::from(Ipv4Addr::new(172, 28, 0, 1)) + 4 * i;
                    slot(&format!("{i:016x}"), Ipv4Addr::from(addr).octets())
                })
                .collect(),
            ..rules()
        });
        assert_eq!(rule_lines(&one), rule_lines(&fifty));
        assert_eq!(set_elements(&fifty, "vm_src").len(), 50);
    }

    #[test]
    fn an_allow_all_slot_translates_and_only_denies() {
        let text = slot_table(&spec(EgressRules {
            deny_cidrs: vec![
                "10.0.0.0/8".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
            allow_ports: vec![443],
            ..EgressRules::default()
        }));
        assert!(
            text.starts_with("table ip hearth {}\ndelete table ip hearth\ntable ip hearth {\n")
        );
        assert_eq!(
            chain_rules(&text, "prerouting"),
            ["iifname \"eth0\" ip daddr 172.28.0.6 dnat to 10.254.254.2",]
        );
        assert_eq!(
            chain_rules(&text, "postrouting"),
            ["oifname \"eth0\" ip saddr 10.254.254.2 snat to 172.28.0.6"]
        );
        assert_eq!(
            chain_rules(&text, "forward"),
            [
                "iifname \"tap0\" ip saddr != 10.254.254.2 drop",
                "ct state established,related accept",
                "iifname \"eth0\" oifname \"tap0\" accept",
                "iifname != \"tap0\" drop",
                "ip daddr 172.28.0.5 drop",
                "ip daddr 172.28.0.0/16 accept",
                "jump egress",
            ]
        );
        assert!(text.contains("type filter hook forward priority 0; policy drop;"));
        // Ports restrict what is allowed; in allow_all mode everything is.
        assert_eq!(
            chain_rules(&text, "egress"),
            ["ip daddr @deny drop", "accept"]
        );
        assert_eq!(set_elements(&text, "deny"), ["10.0.0.0/8"]);
        assert!(set_elements(&text, "allow").is_empty());
        assert_eq!(
            chain_rules(&text, "input"),
            [
                "ct state established,related accept",
                "iifname \"lo\" accept",
                "iifname \"tap0\" ip daddr 10.254.254.1 udp dport 53 accept",
                "iifname \"tap0\" ip daddr 10.254.254.1 tcp dport 53 accept",
                "iifname \"tap0\" ip daddr 169.254.169.254 tcp dport 80 accept",
            ]
        );
        assert!(text.contains("type filter hook input priority 0; policy drop;"));
        assert!(text.contains("\tset resolved {\n\t\ttype ipv4_addr\n\t\tflags timeout\n\t}\n"));
    }

    #[test]
    fn a_deny_all_slot_allows_networks_and_domains_on_the_given_ports() {
        let egress = EgressRules {
            mode: EgressMode::DenyAll,
            allow_cidrs: vec![
                "192.0.2.0/24".parse().unwrap(),
                "192.0.2.8/29".parse().unwrap(),
            ],
            deny_cidrs: vec![],
            allow_ports: vec![443, 80, 443],
            domains: true,
        };
        let text = slot_table(&spec(egress.clone()));
        assert_eq!(
            chain_rules(&text, "egress"),
            [
                "ip daddr @deny drop",
                "ip daddr @allow tcp dport @ports accept",
                "ip daddr @resolved tcp dport @ports accept",
                "drop",
            ]
        );
        assert_eq!(set_elements(&text, "allow"), ["192.0.2.0/24"]);
        assert_eq!(set_elements(&text, "ports"), ["80", "443"]);

        let no_ports = EgressRules {
            allow_ports: vec![],
            domains: false,
            ..egress.clone()
        };
        assert_eq!(
            chain_rules(&slot_table(&spec(no_ports)), "egress"),
            ["ip daddr @deny drop", "ip daddr @allow accept", "drop"]
        );
        let domains_only = EgressRules {
            mode: EgressMode::DenyAll,
            domains: true,
            ..EgressRules::default()
        };
        assert_eq!(
            chain_rules(&slot_table(&spec(domains_only)), "egress"),
            [
                "ip daddr @deny drop",
                "ip daddr @allow accept",
                "ip daddr @resolved accept",
                "drop"
            ]
        );
    }

    #[test]
    fn set_egress_keeps_the_resolved_addresses() {
        let text = set_egress(&EgressRules {
            mode: EgressMode::DenyAll,
            allow_cidrs: vec!["198.51.100.0/24".parse().unwrap()],
            deny_cidrs: vec!["198.51.100.64/26".parse().unwrap()],
            allow_ports: vec![22],
            domains: true,
        });
        assert_eq!(
            text,
            "flush chain ip hearth egress\n\
             flush set ip hearth allow\n\
             flush set ip hearth deny\n\
             flush set ip hearth ports\n\
             add element ip hearth allow { 198.51.100.0/24 }\n\
             add element ip hearth deny { 198.51.100.64/26 }\n\
             add element ip hearth ports { 22 }\n\
             add rule ip hearth egress ip daddr @deny drop\n\
             add rule ip hearth egress ip daddr @allow tcp dport @ports accept\n\
             add rule ip hearth egress ip daddr @resolved tcp dport @ports accept\n\
             add rule ip hearth egress drop\n"
        );
        assert!(!text.contains("resolved {"));
        let allow_all = set_egress(&EgressRules::default());
        assert!(!allow_all.contains("add element"), "{allow_all}");
    }

    #[test]
    fn resolved_addresses_get_the_new_timeout() {
        assert_eq!(allow_resolved(&[], 60), "");
        let a = Ipv4Addr::new(93, 184, 216, 34);
        let b = Ipv4Addr::new(93, 184, 216, 1);
        assert_eq!(
            allow_resolved(&[a, b, a], 300),
            "add element ip hearth resolved { 93.184.216.1, 93.184.216.34 }\n\
             delete element ip hearth resolved { 93.184.216.1, 93.184.216.34 }\n\
             add element ip hearth resolved { 93.184.216.1 timeout 300s, 93.184.216.34 timeout 300s }\n"
        );
    }

    #[test]
    fn normalize_keeps_the_outermost_networks() {
        let cidrs: Vec<Cidr> = [
            "10.1.0.0/16",
            "10.0.0.0/8",
            "192.0.2.0/24",
            "192.0.2.0/24",
            "192.0.2.128/25",
            "11.0.0.0/8",
            "0.0.0.0/32",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let kept: Vec<String> = normalize(&cidrs).iter().map(Cidr::to_string).collect();
        assert_eq!(
            kept,
            ["0.0.0.0/32", "10.0.0.0/8", "11.0.0.0/8", "192.0.2.0/24"]
        );
        let everything = normalize(&["0.0.0.0/0".parse().unwrap(), "10.0.0.0/8".parse().unwrap()]);
        assert_eq!(everything, ["0.0.0.0/0".parse::<Cidr>().unwrap()]);
        assert_eq!(network_set("a-b-c"), "net_a_b_c");
        assert_eq!(
            remove_table(),
            "table ip hearth {}\ndelete table ip hearth\n"
        );
    }
}
