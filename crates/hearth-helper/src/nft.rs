//! nftables: the rule sets as pure functions returning the text fed to `nft -f -`, and an
//! [`Nft`] trait that applies them ([`RealNft`] runs `nft`, [`RecordingNft`] records).
//!
//! Each apply is one atomic transaction. A whole table is replaced by one file that declares it
//! (so it exists), deletes it, and declares it again with its content: a reader never sees it
//! half-made, and a failing file changes nothing.
//!
//! A transaction that deletes anything (a table, a rule, a set element) makes the kernel wait
//! before it returns (an RCU grace period: about 12 ms on a small VM, three times what the rest
//! of an `nft -f` takes). So the common paths only add: a new slot's table is only declared
//! ([`Install::New`], its namespace has none), and a host rule set that differs from the last
//! one only in its VMs is applied as the elements that come and go
//! ([`host_table_changes`]; a new VM is one element added).
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
//! answers to it. Whatever else a VM may do is still decided by the host table, which also
//! drops what a VM sends to a Docker bridge when `outbound` names the egress interface.)

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use crate::cmd::{self, CommandError};
use crate::net::{self, NetError, Ns};
use crate::proto::{
    Cidr, DNS_PORT, EgressMode, EgressRules, GATEWAY_ADDR, GUEST_ADDR, HOST_VETH_PREFIX, HostRules,
    METADATA_ADDR, METADATA_PORT, PrivateNetwork, SLOT_VETH, SlotSpec, TABLE, TAP_NAME,
};

/// How many addresses of allowed domains a slot's `resolved` set holds at most.
pub const RESOLVED_SIZE: u32 = 65536;
/// How many connections a guest may have open at once (counted when each is opened): a guest
/// cannot fill the slot's conntrack table, nor the host's through it.
pub const MAX_GUEST_CONNECTIONS: u32 = 16384;
/// The link-local network: the host's own provider's metadata service lives there
/// (169.254.169.254 on most clouds), so a VM must not reach it through the host.
const LINK_LOCAL: &str = "169.254.0.0/16";

/// The first lines of every file that replaces a table: make sure it exists, then delete it.
fn reset() -> String {
    format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n")
}

/// How a file that declares a whole table installs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// In a namespace that has no such table (one just made): the file only declares it, and
    /// deletes nothing (which is faster; see the module documentation). Where the table
    /// exists, the declaration would add to it: not for that.
    New,
    /// Whatever is there is replaced in the same transaction.
    Replace,
}

impl Install {
    fn header(self) -> String {
        match self {
            Install::New => String::new(),
            Install::Replace => reset(),
        }
    }
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

/// A set's declaration.
struct Set<'a> {
    name: &'a str,
    ty: &'a str,
    flags: Option<&'a str>,
    size: Option<u32>,
}

impl Set<'_> {
    /// Writes the declaration, one element a line.
    fn write(&self, out: &mut String, elements: &[String]) {
        let _ = writeln!(out, "\tset {} {{", self.name);
        let _ = writeln!(out, "\t\ttype {}", self.ty);
        if let Some(size) = self.size {
            let _ = writeln!(out, "\t\tsize {size}");
        }
        if let Some(flags) = self.flags {
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
}

/// A set of addresses or networks without a size or timeout.
fn plain_set<'a>(name: &'a str, ty: &'a str, flags: Option<&'a str>) -> Set<'a> {
    Set {
        name,
        ty,
        flags,
        size: None,
    }
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
/// - `net_<name>`: the members of each private network.
///
/// What it enforces:
///
/// - **Nothing of the host for a guest.** Its services live inside its slot
///   ([`crate::proto::Request::OpenServices`]), so from a slot's veth only the answers to the
///   host's own connections come in (`input`).
/// - **Nothing of the VMs for the LAN or local users.** The host addresses of the slots (inside
///   `cidr`) take nothing but from the slots (`input`); nothing from outside opens a connection
///   to a VM (`forward`); and no local user but root opens one (`output`, see
///   [`LOCAL_USERS_RULE`]).
/// - **VMs reach each other only inside a private network they share**, checked on every packet
///   (`between_vms` comes before the `established` shortcut), so a VM taken out of a network
///   loses its open connections to its members at once.
/// - **A VM's traffic leaves only to the world**: not to link-local addresses (the host's cloud
///   metadata), not to addresses of `cidr` that are no slot's (they would follow the host's
///   default route), and with `outbound`, through that interface only (a Docker bridge or a
///   VPN is not egress). These are checked on every packet too, so a changed `outbound` cuts
///   what went elsewhere. Leaving, it is masqueraded; its egress policy is its slot's.
///
/// See the module documentation for what an operator adds where Docker runs.
pub fn host_table(rules: &HostRules) -> String {
    let vm = format!("\"{HOST_VETH_PREFIX}*\"");
    let cidr = rules.cidr;
    let mut out = reset();
    let _ = writeln!(out, "table ip {TABLE} {{");
    let vm_src: Vec<String> = rules
        .slots
        .iter()
        .map(|s| format!("\"{}\" . {}", s.slot.host_veth(), s.vm_addr))
        .collect();
    plain_set("vm_src", "ifname . ipv4_addr", None).write(&mut out, &vm_src);
    for network in &rules.networks {
        let members: BTreeSet<Ipv4Addr> = network.members.iter().copied().collect();
        let members: Vec<String> = members.iter().map(Ipv4Addr::to_string).collect();
        plain_set(&network_set(&network.name), "ipv4_addr", None).write(&mut out, &members);
    }
    chain(
        &mut out,
        "input",
        Some("type filter hook input priority 0; policy accept;"),
        &[
            format!("iifname {vm} ct state established,related accept"),
            format!("iifname {vm} drop"),
            format!("iifname != {vm} ip daddr {cidr} drop"),
        ],
    );
    let mut forward = vec![
        format!("iifname {vm} iifname . ip saddr != @vm_src drop"),
        // Before `established`: a connection between VMs lasts as long as their network.
        format!("iifname {vm} oifname {vm} jump between_vms"),
        // From here on, a VM's packets leave the VMs (between_vms decided all the others).
        format!("iifname {vm} ip daddr {LINK_LOCAL} drop"),
        format!("iifname {vm} ip daddr {cidr} drop"),
    ];
    if let Some(outbound) = &rules.outbound {
        forward.push(format!("iifname {vm} oifname != \"{outbound}\" drop"));
    }
    forward.extend([
        "ct state established,related accept".to_owned(),
        format!("oifname {vm} drop"),
    ]);
    chain(
        &mut out,
        "forward",
        Some("type filter hook forward priority 0; policy accept;"),
        &forward,
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
    chain(
        &mut out,
        "output",
        Some("type filter hook output priority 0; policy accept;"),
        &[LOCAL_USERS_RULE.to_owned()],
    );
    let masquerade = match &rules.outbound {
        Some(outbound) => format!("ip saddr {cidr} oifname \"{outbound}\" masquerade"),
        None => format!("ip saddr {cidr} oifname != {vm} masquerade"),
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

/// What turns the host table of `old` (applied last) into that of `new` by set elements only:
/// the slots that go are deleted from `vm_src` and the members that go from their network's
/// set, and every element of `new` is added (adding one that is there changes nothing and
/// costs nothing, and puts back one that was deleted behind the helper's back). `None` when
/// more differs (the network, the outbound interface, the private networks themselves): then
/// the whole table is replaced ([`host_table`]). Empty when `new` has no element and nothing
/// goes.
///
/// A VM's coming is thus a file that only adds. The file fails when the table or a set is not
/// there (someone may have flushed the host's ruleset since); a failing file changes nothing,
/// and the caller replaces the whole table then.
pub fn host_table_changes(old: &HostRules, new: &HostRules) -> Option<String> {
    let names =
        |r: &HostRules| -> Vec<String> { r.networks.iter().map(|n| n.name.clone()).collect() };
    if old.cidr != new.cidr || old.outbound != new.outbound || names(old) != names(new) {
        return None;
    }
    let vm_src = |r: &HostRules| -> BTreeSet<String> {
        r.slots
            .iter()
            .map(|s| format!("\"{}\" . {}", s.slot.host_veth(), s.vm_addr))
            .collect()
    };
    let members = |n: &PrivateNetwork| -> BTreeSet<String> {
        n.members.iter().map(Ipv4Addr::to_string).collect()
    };
    let mut sets = vec![("vm_src".to_owned(), vm_src(old), vm_src(new))];
    for (before, after) in old.networks.iter().zip(&new.networks) {
        sets.push((network_set(&after.name), members(before), members(after)));
    }
    let mut out = String::new();
    for (set, before, after) in &sets {
        let gone: Vec<&str> = before.difference(after).map(String::as_str).collect();
        if !gone.is_empty() {
            let _ = writeln!(
                out,
                "delete element ip {TABLE} {set} {{ {} }}",
                gone.join(", ")
            );
        }
    }
    for (set, _, after) in &sets {
        if !after.is_empty() {
            let all: Vec<&str> = after.iter().map(String::as_str).collect();
            let _ = writeln!(out, "add element ip {TABLE} {set} {{ {} }}", all.join(", "));
        }
    }
    Some(out)
}

/// The host's `output` rule: what the host itself sends to a VM must come from a socket of
/// root's. A local user (and a web page in an operator's browser, which may be told to fetch
/// `http://<vm address>/`) opens nothing to a VM.
///
/// Packets without a socket pass: `meta skuid` does not match a packet that has none (the
/// expression breaks off the rule), and those are the kernel's own answers (an ICMP error, a
/// TCP reset, the last ACK of a connection in TIME_WAIT). The kernel answers only what reached
/// the host, and from a VM the host's `input` takes nothing but the answers to its own
/// connections, so these carry nothing a user made. A SYN-ACK carries its listener's uid.
pub const LOCAL_USERS_RULE: &str = "oifname \"hv*\" meta skuid != 0 drop";

/// The `ct mark` a slot's connections to resolved addresses carry: the generation of the egress
/// policy that let them through, written as nftables lists it.
fn mark(generation: u32) -> String {
    format!("0x{generation:08x}")
}

/// The egress chain's rules. `allow_all`: everything not denied; `deny_all`: only the allowed
/// networks and the resolved addresses of allowed domains, limited to `allow_ports` (TCP) when
/// there are any. Denied networks win. In `allow_all` mode ports are ignored: they restrict
/// what is allowed, and everything is.
///
/// The chain sees every packet the guest sends out, so a changed policy holds for open
/// connections too. A connection to a resolved address is marked with `generation` when it
/// opens, and its packets pass on that mark afterwards: it outlives the address's timeout in
/// the set, but not the policy (each [`set_egress`] and [`slot_table`] comes with a new
/// generation).
fn egress_rules(egress: &EgressRules, generation: u32) -> Vec<String> {
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
                let mark = mark(generation);
                rules.push(format!(
                    "ct state established,related ct mark {mark} accept"
                ));
                rules.push(format!(
                    "ip daddr @resolved{ports} ct mark set {mark} accept"
                ));
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

/// The slot's table: the guest's address translated to and from the VM's, its services (the
/// sockets of [`crate::proto::Request::OpenServices`], inside the slot) reachable from the
/// guest only, and its egress policy, of generation `generation` (nonzero, a new one for each
/// table), installed as `install` says.
///
/// - `egress` sees every packet the guest sends out, so a changed policy holds for open
///   connections too. A connection to a resolved address is marked with `generation` when it
///   opens, and its packets pass on that mark afterwards: it outlives the address's timeout
///   in the set, but not the policy ([`set_egress`] comes with a new generation too).
///
/// - `forward` drops what conntrack finds invalid (with `nf_conntrack_tcp_loose` off in the
///   slot, a TCP packet of a connection this slot never saw is invalid), and anything the guest
///   sends from another address. To the guest go the answers on its connections and new
///   connections from `peers` (other VMs and the host: the host's rules decide which of them
///   may); nothing else, so the stray answers to a previous VM of the same address (the host's
///   conntrack may still route them here) do not reach it. What the guest sends, every packet
///   of it, goes through the checks: answers to the host's own connections pass but nothing
///   else reaches its host address, the other VMs are let through (the host's rules decide), at
///   most [`MAX_GUEST_CONNECTIONS`] are open, and the rest is egress.
/// - `input` takes from the guest only DNS (UDP and TCP 53 on `GATEWAY_ADDR`) and metadata
///   (TCP 80 on `METADATA_ADDR`, an address of the slot's loopback), and nothing from the host
///   side.
///
/// Replacing it empties the `resolved` set (the addresses of allowed domains): a CreateSlot
/// on an existing slot forgets them until the DNS forwarder resolves them again.
pub fn slot_table(spec: &SlotSpec, generation: u32, install: Install) -> String {
    let (host, vm, peers) = (spec.host_addr, spec.vm_addr, spec.peers);
    let (tap, eth) = (TAP_NAME, SLOT_VETH);
    let mut out = install.header();
    let _ = writeln!(out, "table ip {TABLE} {{");
    let [allow, deny, ports] = egress_elements(&spec.egress);
    plain_set(allow.0, "ipv4_addr", Some("interval")).write(&mut out, &allow.1);
    plain_set(deny.0, "ipv4_addr", Some("interval")).write(&mut out, &deny.1);
    plain_set(ports.0, "inet_service", None).write(&mut out, &ports.1);
    Set {
        name: "resolved",
        ty: "ipv4_addr",
        flags: Some("timeout"),
        size: Some(RESOLVED_SIZE),
    }
    .write(&mut out, &[]);
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
            "ct state invalid drop".to_owned(),
            format!("iifname \"{tap}\" ip saddr != {GUEST_ADDR} drop"),
            format!("iifname \"{eth}\" oifname \"{tap}\" ct state established,related accept"),
            format!("iifname \"{eth}\" oifname \"{tap}\" ip saddr {peers} accept"),
            format!("iifname != \"{tap}\" drop"),
            // What follows is the guest's own traffic only, every packet of it.
            format!("ip daddr {host} ct direction reply accept"),
            format!("ip daddr {host} drop"),
            format!("ct state new ct count over {MAX_GUEST_CONNECTIONS} drop"),
            format!("ip daddr {peers} accept"),
            "jump egress".to_owned(),
        ],
    );
    chain(
        &mut out,
        "egress",
        None,
        &egress_rules(&spec.egress, generation),
    );
    chain(
        &mut out,
        "input",
        Some("type filter hook input priority 0; policy drop;"),
        &[
            "ct state invalid drop".to_owned(),
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

/// Replaces the slot's egress policy in one transaction, with generation `generation` (a new
/// one): the egress chain and the `allow`, `deny`, `ports` and `resolved` sets are flushed and
/// filled again. Open connections are held to the new policy from their next packet on; those
/// to resolved addresses stop, as the addresses are forgotten (a removed domain's must not stay
/// allowed) and their mark is the old generation's. The DNS forwarder adds the addresses again
/// as it answers.
pub fn set_egress(egress: &EgressRules, generation: u32) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "flush chain ip {TABLE} egress");
    let elements = egress_elements(egress);
    for name in elements.iter().map(|(name, _)| *name).chain(["resolved"]) {
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
    for rule in egress_rules(egress, generation) {
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
    #[error(transparent)]
    Netns(#[from] NetError),
    #[error("could not ask nft its version")]
    Version {
        #[source]
        source: CommandError,
    },
}

/// Applies nftables files.
pub trait Nft: Send + Sync {
    /// Feeds `script` to `nft -f -` in the namespace: one transaction.
    fn apply(&self, ns: Ns<'_>, script: &str) -> Result<(), NftError>;
    /// `nft --version`'s answer.
    fn version(&self) -> Result<String, NftError>;
}

/// `nft -f -`, in a slot started from a thread inside the slot's namespace
/// ([`net::in_netns`]; the child is born there).
#[derive(Debug, Default)]
pub struct RealNft;

impl Nft for RealNft {
    fn apply(&self, ns: Ns<'_>, script: &str) -> Result<(), NftError> {
        let nft = || {
            cmd::run("nft", &["-f", "-"], Some(script))
                .map(drop)
                .map_err(|source| NftError::Apply {
                    place: ns.to_string(),
                    source,
                })
        };
        match ns {
            Ns::Host => nft(),
            Ns::Slot(name) => net::in_netns(name, nft),
        }
    }

    fn version(&self) -> Result<String, NftError> {
        cmd::run("nft", &["--version"], None)
            .map(|v| v.trim().to_owned())
            .map_err(|source| NftError::Version { source })
    }
}

/// Records every file applied, as (namespace, text); `fail` makes applies fail with that error
/// output, `refuse` only those whose text contains a pattern (as the kernel refuses a file
/// that names what is not there).
#[derive(Debug, Default)]
pub struct RecordingNft {
    applied: Mutex<Vec<(Option<String>, String)>>,
    fail: Mutex<Option<String>>,
    refuse: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RecordingNft {
    /// What was applied so far, and forgets it.
    pub fn take_applied(&self) -> Vec<(Option<String>, String)> {
        std::mem::take(&mut lock(&self.applied))
    }
    /// Makes the following applies fail with `stderr` (or succeed again with `None`).
    pub fn set_fail(&self, stderr: Option<&str>) {
        *lock(&self.fail) = stderr.map(str::to_owned);
    }
    /// Makes the following applies of a text containing `pattern` fail (or none with `None`).
    pub fn set_refuse(&self, pattern: Option<&str>) {
        *lock(&self.refuse) = pattern.map(str::to_owned);
    }
}

impl Nft for RecordingNft {
    fn apply(&self, ns: Ns<'_>, script: &str) -> Result<(), NftError> {
        lock(&self.applied).push((ns.name(), script.to_owned()));
        let refused = lock(&self.refuse)
            .as_deref()
            .is_some_and(|pattern| script.contains(pattern))
            .then(|| "Error: Could not process rule: No such file or directory".to_owned());
        match refused.or_else(|| lock(&self.fail).clone()) {
            None => Ok(()),
            Some(stderr) => Err(NftError::Apply {
                place: ns.to_string(),
                source: CommandError::Failed {
                    command: "recorded nft -f -".into(),
                    status: std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
                    stderr,
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
        assert!(
            !text.contains("services"),
            "no services on the host: {text}"
        );
        // From a slot only the answers to the host's own connections; the slots' host
        // addresses for nobody else.
        assert_eq!(
            chain_rules(&text, "input"),
            [
                "iifname \"hv*\" ct state established,related accept",
                "iifname \"hv*\" drop",
                "iifname != \"hv*\" ip daddr 172.28.0.0/16 drop",
            ]
        );
        assert_eq!(
            chain_rules(&text, "forward"),
            [
                "iifname \"hv*\" iifname . ip saddr != @vm_src drop",
                "iifname \"hv*\" oifname \"hv*\" jump between_vms",
                "iifname \"hv*\" ip daddr 169.254.0.0/16 drop",
                "iifname \"hv*\" ip daddr 172.28.0.0/16 drop",
                "ct state established,related accept",
                "oifname \"hv*\" drop",
            ]
        );
        assert!(text.contains("type filter hook forward priority 0; policy accept;"));
        assert_eq!(chain_rules(&text, "between_vms"), ["drop"]);
        assert_eq!(
            chain_rules(&text, "output"),
            ["oifname \"hv*\" meta skuid != 0 drop"]
        );
        assert!(text.contains("type filter hook output priority 0; policy accept;"));
        assert_eq!(
            chain_rules(&text, "postrouting"),
            ["ip saddr 172.28.0.0/16 oifname != \"hv*\" masquerade"]
        );
        assert!(text.contains("type nat hook postrouting priority 100; policy accept;"));
    }

    #[test]
    fn between_vms_comes_before_the_established_shortcut() {
        let text = host_table(&rules());
        let forward = chain_rules(&text, "forward");
        let at = |rule: &str| forward.iter().position(|r| r == rule).unwrap();
        let established = at("ct state established,related accept");
        assert!(at("iifname \"hv*\" oifname \"hv*\" jump between_vms") < established);
        // And so do the drops of what a VM must not reach, so a changed rule set cuts the
        // connections it no longer allows.
        assert!(at("iifname \"hv*\" ip daddr 169.254.0.0/16 drop") < established);
        assert!(at("iifname \"hv*\" ip daddr 172.28.0.0/16 drop") < established);
    }

    #[test]
    fn an_outbound_interface_is_the_only_way_out() {
        let mut r = rules();
        r.outbound = Some("eth0".into());
        let text = host_table(&r);
        assert_eq!(
            chain_rules(&text, "forward"),
            [
                "iifname \"hv*\" iifname . ip saddr != @vm_src drop",
                "iifname \"hv*\" oifname \"hv*\" jump between_vms",
                "iifname \"hv*\" ip daddr 169.254.0.0/16 drop",
                "iifname \"hv*\" ip daddr 172.28.0.0/16 drop",
                "iifname \"hv*\" oifname != \"eth0\" drop",
                "ct state established,related accept",
                "oifname \"hv*\" drop",
            ]
        );
        assert_eq!(
            chain_rules(&text, "postrouting"),
            ["ip saddr 172.28.0.0/16 oifname \"eth0\" masquerade"]
        );
    }

    #[test]
    fn host_table_elements_carry_each_slot_and_network() {
        let mut r = rules();
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
    }

    #[test]
    fn the_host_tables_rules_do_not_grow_with_its_vms() {
        let rule_lines = |text: &str| {
            ["input", "forward", "between_vms", "output", "postrouting"]
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
        let text = slot_table(
            &spec(EgressRules {
                deny_cidrs: vec![
                    "10.0.0.0/8".parse().unwrap(),
                    "10.1.0.0/16".parse().unwrap(),
                ],
                allow_ports: vec![443],
                ..EgressRules::default()
            }),
            7,
            Install::Replace,
        );
        assert!(
            text.starts_with("table ip hearth {}\ndelete table ip hearth\ntable ip hearth {\n")
        );
        assert_eq!(
            chain_rules(&text, "prerouting"),
            ["iifname \"eth0\" ip daddr 172.28.0.6 dnat to 10.254.254.2"]
        );
        assert_eq!(
            chain_rules(&text, "postrouting"),
            ["oifname \"eth0\" ip saddr 10.254.254.2 snat to 172.28.0.6"]
        );
        assert_eq!(
            chain_rules(&text, "forward"),
            [
                "ct state invalid drop",
                "iifname \"tap0\" ip saddr != 10.254.254.2 drop",
                "iifname \"eth0\" oifname \"tap0\" ct state established,related accept",
                "iifname \"eth0\" oifname \"tap0\" ip saddr 172.28.0.0/16 accept",
                "iifname != \"tap0\" drop",
                "ip daddr 172.28.0.5 ct direction reply accept",
                "ip daddr 172.28.0.5 drop",
                "ct state new ct count over 16384 drop",
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
                "ct state invalid drop",
                "ct state established,related accept",
                "iifname \"lo\" accept",
                "iifname \"tap0\" ip daddr 10.254.254.1 udp dport 53 accept",
                "iifname \"tap0\" ip daddr 10.254.254.1 tcp dport 53 accept",
                "iifname \"tap0\" ip daddr 169.254.169.254 tcp dport 80 accept",
            ]
        );
        assert!(text.contains("type filter hook input priority 0; policy drop;"));
        assert!(text.contains(
            "\tset resolved {\n\t\ttype ipv4_addr\n\t\tsize 65536\n\t\tflags timeout\n\t}\n"
        ));
    }

    #[test]
    fn a_new_slots_table_is_only_declared() {
        let spec = spec(EgressRules::default());
        let new = slot_table(&spec, 7, Install::New);
        let replace = slot_table(&spec, 7, Install::Replace);
        assert!(new.starts_with("table ip hearth {\n"), "{new}");
        assert!(!new.contains("delete"), "{new}");
        assert_eq!(replace, format!("{}{new}", remove_table()));
    }

    #[test]
    fn host_rules_that_differ_in_their_vms_are_applied_as_elements() {
        let network = |members: &[[u8; 4]]| PrivateNetwork {
            name: "db-tier".into(),
            members: members.iter().map(|m| Ipv4Addr::from(*m)).collect(),
        };
        let (a, b) = (
            slot("fedcba9876543210", [172, 28, 0, 5]),
            slot("0000000000000001", [172, 28, 0, 9]),
        );
        let old = HostRules {
            slots: vec![a.clone()],
            networks: vec![network(&[[172, 28, 0, 6]])],
            ..rules()
        };
        let va = a.slot.host_veth();
        assert_eq!(
            host_table_changes(&old, &old).unwrap(),
            format!(
                "add element ip hearth vm_src {{ \"{va}\" . 172.28.0.6 }}\n\
                 add element ip hearth net_db_tier {{ 172.28.0.6 }}\n"
            )
        );
        // A VM comes: its element is added (with those there), nothing deleted.
        let one_more = HostRules {
            slots: vec![a.clone(), b.clone()],
            networks: vec![network(&[])],
            ..old.clone()
        };
        let vb = b.slot.host_veth();
        let mut both = [
            format!("\"{va}\" . 172.28.0.6"),
            format!("\"{vb}\" . 172.28.0.10"),
        ];
        both.sort();
        assert_eq!(
            host_table_changes(&one_more, &one_more).unwrap(),
            format!("add element ip hearth vm_src {{ {} }}\n", both.join(", "))
        );
        let came = host_table_changes(&old, &one_more).unwrap();
        assert!(!came.contains("delete element ip hearth vm_src"), "{came}");
        // One goes, and the network's members change.
        let changed = HostRules {
            slots: vec![b],
            networks: vec![network(&[[172, 28, 0, 10], [172, 28, 0, 10]])],
            ..old.clone()
        };
        assert_eq!(
            host_table_changes(&one_more, &changed).unwrap(),
            format!(
                "delete element ip hearth vm_src {{ \"{va}\" . 172.28.0.6 }}\n\
                 add element ip hearth vm_src {{ \"{vb}\" . 172.28.0.10 }}\n\
                 add element ip hearth net_db_tier {{ 172.28.0.10 }}\n"
            )
        );
        let empty = HostRules {
            slots: vec![],
            networks: vec![network(&[])],
            ..old.clone()
        };
        assert_eq!(host_table_changes(&empty, &empty).as_deref(), Some(""));
        // Anything else takes the whole table.
        for other in [
            HostRules {
                outbound: Some("eth0".into()),
                ..old.clone()
            },
            HostRules {
                cidr: "172.29.0.0/16".parse().unwrap(),
                slots: vec![],
                networks: vec![],
                ..old.clone()
            },
            HostRules {
                networks: vec![],
                ..old.clone()
            },
            HostRules {
                networks: vec![PrivateNetwork {
                    name: "web".into(),
                    members: vec![],
                }],
                ..old.clone()
            },
        ] {
            assert_eq!(host_table_changes(&old, &other), None, "{other:?}");
        }
    }

    #[test]
    fn the_guests_packets_all_go_through_egress() {
        // The only shortcut for established traffic is towards the guest (eth0 to tap0) and
        // for the answers to the host's own connections; everything the guest sends to the
        // world reaches `jump egress`.
        let text = slot_table(&spec(EgressRules::default()), 7, Install::Replace);
        let forward = chain_rules(&text, "forward");
        let shortcuts: Vec<&String> = forward
            .iter()
            .filter(|r| r.contains("established") || r.contains("direction"))
            .collect();
        assert_eq!(
            shortcuts,
            [
                "iifname \"eth0\" oifname \"tap0\" ct state established,related accept",
                "ip daddr 172.28.0.5 ct direction reply accept",
            ]
        );
        assert_eq!(forward.last().map(String::as_str), Some("jump egress"));
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
        let text = slot_table(&spec(egress.clone()), 0x2a, Install::Replace);
        assert_eq!(
            chain_rules(&text, "egress"),
            [
                "ip daddr @deny drop",
                "ip daddr @allow tcp dport @ports accept",
                "ct state established,related ct mark 0x0000002a accept",
                "ip daddr @resolved tcp dport @ports ct mark set 0x0000002a accept",
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
            chain_rules(&slot_table(&spec(no_ports), 1, Install::Replace), "egress"),
            ["ip daddr @deny drop", "ip daddr @allow accept", "drop"]
        );
        let domains_only = EgressRules {
            mode: EgressMode::DenyAll,
            domains: true,
            ..EgressRules::default()
        };
        assert_eq!(
            chain_rules(
                &slot_table(&spec(domains_only), 0xdead_beef, Install::Replace),
                "egress"
            ),
            [
                "ip daddr @deny drop",
                "ip daddr @allow accept",
                "ct state established,related ct mark 0xdeadbeef accept",
                "ip daddr @resolved ct mark set 0xdeadbeef accept",
                "drop"
            ]
        );
    }

    #[test]
    fn set_egress_replaces_the_policy_and_forgets_the_resolved_addresses() {
        let text = set_egress(
            &EgressRules {
                mode: EgressMode::DenyAll,
                allow_cidrs: vec!["198.51.100.0/24".parse().unwrap()],
                deny_cidrs: vec!["198.51.100.64/26".parse().unwrap()],
                allow_ports: vec![22],
                domains: true,
            },
            9,
        );
        assert_eq!(
            text,
            "flush chain ip hearth egress\n\
             flush set ip hearth allow\n\
             flush set ip hearth deny\n\
             flush set ip hearth ports\n\
             flush set ip hearth resolved\n\
             add element ip hearth allow { 198.51.100.0/24 }\n\
             add element ip hearth deny { 198.51.100.64/26 }\n\
             add element ip hearth ports { 22 }\n\
             add rule ip hearth egress ip daddr @deny drop\n\
             add rule ip hearth egress ip daddr @allow tcp dport @ports accept\n\
             add rule ip hearth egress ct state established,related ct mark 0x00000009 accept\n\
             add rule ip hearth egress ip daddr @resolved tcp dport @ports ct mark set 0x00000009 accept\n\
             add rule ip hearth egress drop\n"
        );
        let allow_all = set_egress(&EgressRules::default(), 10);
        assert!(!allow_all.contains("add element"), "{allow_all}");
        assert!(allow_all.contains("flush set ip hearth resolved\n"));
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
