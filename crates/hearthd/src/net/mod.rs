//! VM networking, hearthd's side: each running VM's network slot (made by `hearth-helper`),
//! the host rule set around the slots, and the per-VM services hearthd runs on sockets the
//! helper made inside the slot (the DNS forwarder on the guest's gateway, the metadata service
//! on 169.254.169.254): only that guest reaches them, and no process of the host can take their
//! addresses, even while hearthd is down.
//!
//! A VM holds its /30 (`VmRecord::net_index`, allocated by the store with the VM's row) for its
//! whole life, so its address is stable across restarts; its slot exists only while it runs
//! (`attach` before the VMM is launched, `detach` in `vm`'s teardown). At start `reconcile`
//! removes every slot of this hearthd that belongs to no running VM and gives running VMs
//! their slot and services back.

pub mod dns;
pub mod egress;
pub mod helper;
pub mod metadata;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use hearth_helper::proto::{
    self, HostRules, HostSlot, PrivateNetwork, Request, Response, SlotId, SlotSpec,
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use helper::{Helper, HelperError};

use crate::config::NetworkConfig;
use crate::store::{Store, StoreError, VmRecord};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Helper(#[from] HelperError),
    #[error("VM {0:?} has no address: it was made while networking was off")]
    NoSubnet(String),
    #[error("cannot serve {what} for VM {vm:?} on {addr}")]
    Serve {
        what: &'static str,
        vm: String,
        addr: std::net::SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the network helper speaks protocol {found}, this hearthd {wanted}: run the hearth-helper of this release"
    )]
    Version { found: u32, wanted: u32 },
    #[error("network state store failure")]
    Store(#[from] StoreError),
}

/// The first 8 hex digits of SHA-256 of the data directory: which hearthd a slot belongs to.
pub fn instance_of(data_dir: &Path) -> String {
    let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// The host and VM addresses of /30 number `index` of `cidr`.
pub fn addresses(cidr: proto::Cidr, index: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(cidr.addr()).wrapping_add(index.wrapping_mul(4));
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

/// What hearthd runs for one attached VM, on the sockets of its slot.
#[derive(Debug)]
struct Services {
    _dns: dns::Forwarder,
    resolved: Arc<ResolvedToSlot>,
    policy: watch::Sender<dns::DnsPolicy>,
    metadata: CancellationToken,
}

impl Drop for Services {
    fn drop(&mut self) {
        self.metadata.cancel();
    }
}

#[derive(Debug)]
struct Attached {
    host: HostSlot,
    services: Services,
}

#[derive(Debug)]
struct Inner {
    config: NetworkConfig,
    instance: String,
    helper: Arc<dyn Helper>,
    own: Option<helper::OwnHelper>,
    store: Store,
    upstreams: Vec<SocketAddr>,
    /// The only peer the metadata service answers: the guest's fixed address
    /// (`proto::GUEST_ADDR`; tests on loopback pass another).
    guest_addr: Ipv4Addr,
    attached: Mutex<HashMap<String, Attached>>,
    /// Host rule sets are applied one at a time, each from the state at that moment.
    rules: tokio::sync::Mutex<()>,
}

/// VM networking of one hearthd. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Network {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Network {
    /// Connects to the helper (`network.helper_socket`, or one hearthd starts itself when it is
    /// root), checks its protocol, and has it check `network.cidr` against the host's routes.
    pub async fn start(
        config: NetworkConfig,
        data_dir: &Path,
        store: Store,
    ) -> Result<Network, NetError> {
        let (helper, own): (Arc<dyn Helper>, _) = match &config.helper_socket {
            Some(socket) => (Arc::new(helper::SocketHelper::new(socket)), None),
            None => {
                if !nix::unistd::geteuid().is_root() {
                    return Err(HelperError::Start {
                        binary: "hearth-helper".into(),
                        reason: "hearthd is not root, and network.helper_socket is empty: run hearth-helper as root and set network.helper_socket to its socket, run hearthd as root, or set network.mode = \"off\"".into(),
                    }
                    .into());
                }
                let data_dir = data_dir.to_owned();
                let own = tokio::task::spawn_blocking(move || helper::OwnHelper::start(&data_dir))
                    .await
                    .map_err(|e| HelperError::Start {
                        binary: "hearth-helper".into(),
                        reason: e.to_string(),
                    })??;
                // (The helper's own thread, not this blocking one, is its parent.)
                let socket = own.socket.clone();
                (Arc::new(helper::SocketHelper::new(&socket)), Some(own))
            }
        };
        Self::with_helper(config, data_dir, store, helper, own).await
    }

    /// [`Network::start`] with a given helper.
    pub async fn with_helper(
        config: NetworkConfig,
        data_dir: &Path,
        store: Store,
        helper: Arc<dyn Helper>,
        own: Option<helper::OwnHelper>,
    ) -> Result<Network, NetError> {
        Self::with_helper_for(config, data_dir, store, helper, own, proto::GUEST_ADDR).await
    }

    /// [`Network::with_helper`] whose metadata service answers `guest_addr` (tests, where a
    /// recording helper's "slot" sockets are on loopback).
    pub async fn with_helper_for(
        config: NetworkConfig,
        data_dir: &Path,
        store: Store,
        helper: Arc<dyn Helper>,
        own: Option<helper::OwnHelper>,
        guest_addr: Ipv4Addr,
    ) -> Result<Network, NetError> {
        let instance = instance_of(data_dir);
        let hello = helper.call(Request::Hello).await?;
        if let Response::Hello { version, .. } = hello.response
            && version != proto::PROTOCOL_VERSION
        {
            return Err(NetError::Version {
                found: version,
                wanted: proto::PROTOCOL_VERSION,
            });
        }
        helper
            .call(Request::Setup {
                instance: instance.clone(),
                cidr: config.cidr,
            })
            .await?;
        let upstreams = if config.dns_upstream.is_empty() {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            dns::upstreams_from_resolv_conf(&text)
        } else {
            config.dns_upstream.clone()
        };
        if upstreams.is_empty() {
            tracing::warn!(
                "no DNS resolvers: /etc/resolv.conf names none and network.dns_upstream is empty, so names do not resolve in VMs"
            );
        }
        tracing::info!(cidr = %config.cidr, instance, ?upstreams, "VM networking ready");
        Ok(Network {
            inner: Arc::new(Inner {
                config,
                instance,
                helper,
                own,
                store,
                upstreams,
                guest_addr,
                attached: Mutex::default(),
                rules: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// How many /30s `network.cidr` holds.
    pub fn subnets(&self) -> u32 {
        u32::try_from(self.inner.config.cidr.size() / 4).unwrap_or(u32::MAX)
    }

    pub fn cidr(&self) -> proto::Cidr {
        self.inner.config.cidr
    }

    fn slot(&self, vm_id: &str) -> SlotId {
        SlotId {
            instance: self.inner.instance.clone(),
            vm: vm_id.to_owned(),
        }
    }

    /// The VM's host and routable addresses.
    pub fn addresses_of(&self, vm: &VmRecord) -> Option<(Ipv4Addr, Ipv4Addr)> {
        vm.net_index.map(|i| addresses(self.inner.config.cidr, i))
    }

    /// Gives `vm` its slot, services and host rules, and returns its TAP for the VMM. On failure
    /// nothing of it is left.
    pub async fn attach(&self, vm: &VmRecord) -> Result<OwnedFd, NetError> {
        let result = self.attach_inner(vm, true).await;
        if result.is_err() {
            self.detach(&vm.id).await;
        }
        result.map(|fd| fd.expect("a TAP was asked for"))
    }

    async fn attach_inner(&self, vm: &VmRecord, tap: bool) -> Result<Option<OwnedFd>, NetError> {
        let (host_addr, vm_addr) = self
            .addresses_of(vm)
            .ok_or_else(|| NetError::NoSubnet(vm.name.clone()))?;
        let slot = self.slot(&vm.id);
        let spec = SlotSpec {
            slot: slot.clone(),
            host_addr,
            vm_addr,
            peers: self.inner.config.cidr,
            egress: egress::to_rules(&vm.egress),
        };
        self.inner.helper.call(Request::CreateSlot { spec }).await?;
        let services = self.serve(vm, &slot).await?;
        lock(&self.inner.attached).insert(
            vm.id.clone(),
            Attached {
                host: HostSlot {
                    slot: slot.clone(),
                    host_addr,
                    vm_addr,
                },
                services,
            },
        );
        if !tap {
            self.apply_host_rules().await?;
            return Ok(None);
        }
        // The TAP and the host rules are independent: both at once. (Until the host rules
        // name the VM, its traffic is dropped there, so the order does not matter.)
        let (rules, reply) = tokio::join!(
            self.apply_host_rules(),
            self.inner.helper.call(Request::OpenTap { slot })
        );
        rules?;
        let reply = reply?;
        match (reply.response, reply.fds.into_iter().next()) {
            (Response::Tap { .. }, Some(fd)) => Ok(Some(fd)),
            (other, _) => Err(HelperError::Unexpected {
                op: "open_tap",
                answer: format!("{other:?} (no descriptor)"),
            }
            .into()),
        }
    }

    /// Has the helper make `vm`'s service sockets inside its slot and serves the DNS forwarder
    /// and the metadata service on them.
    async fn serve(&self, vm: &VmRecord, slot: &SlotId) -> Result<Services, NetError> {
        let reply = self
            .inner
            .helper
            .call(Request::OpenServices { slot: slot.clone() })
            .await?;
        let fds = match reply.response {
            Response::Services if reply.fds.len() == proto::SERVICE_SOCKETS.len() => reply.fds,
            other => {
                return Err(HelperError::Unexpected {
                    op: "open_services",
                    answer: format!("{other:?} with {} descriptors", reply.fds.len()),
                }
                .into());
            }
        };
        let [dns_udp, dns_tcp, md] =
            <[OwnedFd; 3]>::try_from(fds).map_err(|_| HelperError::Unexpected {
                op: "open_services",
                answer: "not three descriptors".into(),
            })?;
        let serve_error = |what, which: proto::ServiceSocket| {
            let vm = vm.name.clone();
            move |source| NetError::Serve {
                what,
                vm,
                addr: which.addr(),
                source,
            }
        };
        let (policy, policy_rx) = watch::channel(egress::dns_policy(&vm.egress));
        let resolved = Arc::new(ResolvedToSlot::new(self.inner.helper.clone(), slot.clone()));
        let dns = dns::Forwarder::serve_sockets(
            std::net::UdpSocket::from(dns_udp),
            std::net::TcpListener::from(dns_tcp),
            vm.name.clone(),
            self.inner.upstreams.clone(),
            policy_rx,
            resolved.clone(),
        )
        .map_err(serve_error("DNS", proto::ServiceSocket::DnsUdp))?;
        tracing::debug!(vm = %vm.name, dns = %dns.local_addr(), "DNS forwarder serving in the slot");
        let md = std::net::TcpListener::from(md);
        let listener = md
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(md))
            .map_err(serve_error("metadata", proto::ServiceSocket::Metadata))?;
        let stop = CancellationToken::new();
        let directory = Arc::new(StoreDirectory {
            store: self.inner.store.clone(),
            cidr: self.inner.config.cidr,
        });
        tokio::spawn(metadata::serve(
            listener,
            vm.id.clone(),
            self.inner.guest_addr,
            directory,
            stop.clone(),
        ));
        Ok(Services {
            _dns: dns,
            resolved,
            policy,
            metadata: stop,
        })
    }

    /// [`Network::detach`] for a VM that is attached; nothing for one that is not (a stopped
    /// VM, or one made without networking). `vm`'s teardown calls it on every path.
    pub async fn release(&self, vm_id: &str) {
        let attached = lock(&self.inner.attached).contains_key(vm_id);
        if attached {
            self.detach(vm_id).await;
        }
    }

    /// Ends `vm_id`'s services and removes its slot, then the host rules are made again
    /// without it. Never fails: what cannot be removed is logged, and the next start's
    /// reconcile removes it.
    pub async fn detach(&self, vm_id: &str) {
        let was = lock(&self.inner.attached).remove(vm_id);
        drop(was);
        let slot = self.slot(vm_id);
        if let Err(e) = self.inner.helper.call(Request::DeleteSlot { slot }).await {
            tracing::error!(vm = vm_id, error = %e, "cannot remove the VM's network slot");
        }
        if let Err(e) = self.apply_host_rules().await {
            tracing::error!(error = %e, "cannot update the host's network rules");
        }
    }

    /// Applies `vm`'s (stored) egress policy to its slot and DNS forwarder, when it runs.
    pub async fn refresh_egress(&self, vm: &VmRecord) -> Result<(), NetError> {
        let attached = {
            let map = lock(&self.inner.attached);
            map.get(&vm.id).map(|a| {
                let _ = a.services.policy.send(egress::dns_policy(&vm.egress));
                (a.host.slot.clone(), a.services.resolved.clone())
            })
        };
        if let Some((slot, resolved)) = attached {
            self.inner
                .helper
                .call(Request::SetEgress {
                    slot,
                    egress: egress::to_rules(&vm.egress),
                })
                .await?;
            // The new policy emptied the slot's resolved set.
            resolved.forget();
        }
        Ok(())
    }

    /// Makes the host rule set again from the attached VMs and the stored private networks.
    pub async fn apply_host_rules(&self) -> Result<(), NetError> {
        let _one_at_a_time = self.inner.rules.lock().await;
        let slots: Vec<HostSlot> = {
            let map = lock(&self.inner.attached);
            let mut slots: Vec<HostSlot> = map.values().map(|a| a.host.clone()).collect();
            slots.sort_by(|a, b| a.slot.cmp(&b.slot));
            slots
        };
        let addr_of: HashMap<&str, Ipv4Addr> = slots
            .iter()
            .map(|s| (s.slot.vm.as_str(), s.vm_addr))
            .collect();
        let networks = self
            .inner
            .store
            .list_networks()
            .await?
            .into_iter()
            .map(|n| PrivateNetwork {
                members: n
                    .members
                    .iter()
                    .filter_map(|id| addr_of.get(id.as_str()).copied())
                    .collect(),
                name: n.name,
            })
            .collect();
        let rules = HostRules {
            instance: self.inner.instance.clone(),
            cidr: self.inner.config.cidr,
            outbound: self.inner.config.outbound_interface.clone(),
            slots,
            networks,
        };
        self.inner
            .helper
            .call(Request::ApplyHostRules { rules })
            .await?;
        Ok(())
    }

    /// At start: removes this hearthd's slots that belong to no VM in `running`, and gives each
    /// VM in `running` its slot (the helper brings an existing one back to its spec, leaving
    /// the TAP the VMM holds) and services back.
    pub async fn reconcile(&self, running: &[VmRecord]) -> Result<(), NetError> {
        let reply = self
            .inner
            .helper
            .call(Request::ListSlots {
                instance: self.inner.instance.clone(),
            })
            .await?;
        let Response::Slots { slots } = reply.response else {
            return Err(HelperError::Unexpected {
                op: "list_slots",
                answer: format!("{:?}", reply.response),
            }
            .into());
        };
        for slot in slots {
            if !running.iter().any(|vm| vm.id == slot.vm) {
                tracing::info!(slot = %slot.netns(), "removing a network slot that belongs to no running VM");
                self.inner.helper.call(Request::DeleteSlot { slot }).await?;
            }
        }
        for vm in running.iter().filter(|vm| vm.net_index.is_some()) {
            if let Err(e) = self.attach_inner(vm, false).await {
                tracing::error!(vm = %vm.name, error = %e, "cannot give the running VM its network back");
                // Half an attachment (a slot without services) would pass for a whole one.
                lock(&self.inner.attached).remove(&vm.id);
            }
        }
        self.apply_host_rules().await
    }

    /// At a clean stop: the services end. Running VMs keep their slots and rules (they outlive
    /// hearthd and are re-adopted by the next one); with none left, the host rules go too.
    pub async fn shutdown(&self) {
        let attached: Vec<String> = {
            let mut map = lock(&self.inner.attached);
            let ids = map.keys().cloned().collect();
            map.clear();
            ids
        };
        if attached.is_empty() {
            let instance = self.inner.instance.clone();
            if let Err(e) = self
                .inner
                .helper
                .call(Request::RemoveHostRules { instance })
                .await
            {
                tracing::error!(error = %e, "cannot remove the host's network rules");
            }
        } else {
            tracing::info!(
                vms = attached.len(),
                "network slots and rules stay for the VMs that keep running"
            );
        }
        if let Some(own) = &self.inner.own {
            own.stop();
        }
    }

    /// What `GET /v1/health` says of networking.
    pub async fn health(&self) -> hearth_api::NetworkHealth {
        let (helper, helper_detail) = match self.inner.helper.call(Request::Hello).await {
            Ok(Reply {
                response:
                    Response::Hello {
                        pid,
                        helper,
                        nftables,
                        ..
                    },
                ..
            }) => (
                "ok".to_owned(),
                Some(format!("pid {pid}, hearth-helper {helper}, {nftables}")),
            ),
            Ok(other) => (format!("unexpected answer: {:?}", other.response), None),
            Err(e) => (e.to_string(), None),
        };
        let used = match self.inner.store.list_vms().await {
            Ok(list) => list.vms.iter().filter(|v| v.net_index.is_some()).count(),
            Err(_) => 0,
        };
        hearth_api::NetworkHealth {
            helper,
            helper_detail,
            cidr: self.inner.config.cidr.to_string(),
            subnets_total: u64::from(self.subnets()),
            subnets_used: used as u64,
            slots: lock(&self.inner.attached).len() as u64,
        }
    }
}

use helper::Reply;

/// How many resolved addresses a VM's [`ResolvedToSlot`] remembers (past it, it forgets the
/// expired ones, then all: that costs only repeated helper calls).
const RESOLVED_MEMORY: usize = 4096;
/// Helper calls one VM's DNS answers may have in flight at once, so a guest that floods its
/// forwarder with lookups of allowed names cannot take the helper from the other VMs.
const RESOLVED_CALLS: usize = 2;

/// Puts what the DNS forwarder resolved for an allowed name into the VM slot's allow set.
/// An address already allowed for at least half of the answer's TTL is not sent again, so
/// repeated lookups of one name cost no helper call.
#[derive(Debug)]
struct ResolvedToSlot {
    helper: Arc<dyn Helper>,
    slot: SlotId,
    /// Until when the slot allows each address, as far as this VM's answers went.
    allowed: Mutex<HashMap<Ipv4Addr, std::time::Instant>>,
    calls: tokio::sync::Semaphore,
}

impl ResolvedToSlot {
    fn new(helper: Arc<dyn Helper>, slot: SlotId) -> ResolvedToSlot {
        ResolvedToSlot {
            helper,
            slot,
            allowed: Mutex::default(),
            calls: tokio::sync::Semaphore::new(RESOLVED_CALLS),
        }
    }

    /// The addresses of `addrs` the slot must be told of for `ttl_secs`, remembered as sent.
    fn to_renew(&self, addrs: Vec<Ipv4Addr>, ttl_secs: u32) -> Vec<Ipv4Addr> {
        let now = std::time::Instant::now();
        let ttl = std::time::Duration::from_secs(u64::from(ttl_secs));
        let mut allowed = lock(&self.allowed);
        let mut renew: Vec<Ipv4Addr> = addrs
            .into_iter()
            .filter(|a| {
                allowed
                    .get(a)
                    .is_none_or(|until| until.saturating_duration_since(now) < ttl / 2)
            })
            .collect();
        renew.sort_unstable();
        renew.dedup();
        if allowed.len() + renew.len() > RESOLVED_MEMORY {
            allowed.retain(|_, until| *until > now);
            if allowed.len() + renew.len() > RESOLVED_MEMORY {
                allowed.clear();
            }
        }
        for a in &renew {
            allowed.insert(*a, now + ttl);
        }
        renew
    }

    /// Forgets what was sent: the slot's set was emptied (a new egress policy).
    fn forget(&self) {
        lock(&self.allowed).clear();
    }
}

#[async_trait]
impl dns::ResolvedSink for ResolvedToSlot {
    async fn allow(&self, addrs: Vec<Ipv4Addr>, ttl_secs: u32) {
        let addrs = self.to_renew(addrs, ttl_secs);
        if addrs.is_empty() {
            return;
        }
        let Ok(_permit) = self.calls.acquire().await else {
            return;
        };
        let request = Request::AllowResolved {
            slot: self.slot.clone(),
            addrs: addrs.clone(),
            ttl_secs,
        };
        if let Err(e) = self.helper.call(request).await {
            tracing::error!(slot = %self.slot.netns(), error = %e, "cannot allow resolved addresses");
            // Not allowed after all: the next answer tries again.
            let mut allowed = lock(&self.allowed);
            for a in addrs {
                allowed.remove(&a);
            }
        }
    }
}

/// The metadata service's view of the store.
#[derive(Debug)]
struct StoreDirectory {
    store: Store,
    cidr: proto::Cidr,
}

#[async_trait]
impl metadata::Directory for StoreDirectory {
    async fn instance(&self, vm_id: &str) -> Option<metadata::Instance> {
        let vm = self.store.get_vm(vm_id).await.ok()?;
        // `get_vm` also finds by name: only the VM with this very id answers.
        if vm.id != vm_id {
            return None;
        }
        let (_, vm_addr) = addresses(self.cidr, vm.net_index?);
        let private_networks = self.store.vm_networks(&vm.id).await.unwrap_or_default();
        Some(metadata::Instance {
            id: vm.id,
            hostname: vm.name.clone(),
            name: vm.name,
            network: metadata::NetworkInfo {
                guest_addr: proto::GUEST_ADDR,
                prefix: proto::INNER_PREFIX,
                gateway: proto::GATEWAY_ADDR,
                dns: proto::GATEWAY_ADDR,
                mac: proto::GUEST_MAC.into(),
                vm_addr,
                private_networks,
            },
            ssh_authorized_keys: vm.metadata.ssh_authorized_keys,
            user_data: vm.metadata.user_data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::helper::RecordingHelper;

    fn slot() -> SlotId {
        SlotId {
            instance: "0123abcd".into(),
            vm: "fedcba9876543210".into(),
        }
    }

    #[tokio::test]
    async fn resolved_addresses_are_sent_once_per_half_ttl_and_again_after_a_new_policy() {
        let helper = Arc::new(RecordingHelper::default());
        let sink = ResolvedToSlot::new(helper.clone(), slot());
        let (a, b) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2));
        use dns::ResolvedSink as _;
        sink.allow(vec![a, a], 300).await;
        // The same answer again, and a lookup flood of it: no more helper calls.
        for _ in 0..100 {
            sink.allow(vec![a], 300).await;
        }
        // A new address in an answer is sent alone.
        sink.allow(vec![a, b], 300).await;
        // A TTL longer than twice what is left renews.
        sink.allow(vec![a], 1000).await;
        let sent: Vec<(Vec<Ipv4Addr>, u32)> = helper
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| match r {
                Request::AllowResolved {
                    addrs, ttl_secs, ..
                } => Some((addrs.clone(), *ttl_secs)),
                _ => None,
            })
            .collect();
        assert_eq!(sent, [(vec![a], 300), (vec![b], 300), (vec![a], 1000)]);
        // The slot's set was emptied by a new policy: everything is sent again.
        sink.forget();
        sink.allow(vec![a, b], 300).await;
        assert_eq!(helper.ops().len(), 4);
    }

    #[tokio::test]
    async fn a_failed_allow_is_tried_again_and_the_memory_is_bounded() {
        let helper = Arc::new(RecordingHelper::default());
        let sink = ResolvedToSlot::new(helper.clone(), slot());
        use dns::ResolvedSink as _;
        *helper.fail_op.lock().unwrap() = Some("allow_resolved");
        sink.allow(vec![Ipv4Addr::new(192, 0, 2, 1)], 60).await;
        *helper.fail_op.lock().unwrap() = None;
        sink.allow(vec![Ipv4Addr::new(192, 0, 2, 1)], 60).await;
        assert_eq!(helper.ops(), ["allow_resolved", "allow_resolved"]);
        let many: Vec<Ipv4Addr> = (0..u32::try_from(RESOLVED_MEMORY).unwrap() + 10)
            .map(|i| Ipv4Addr::from(0x0a00_0000 + i))
            .collect();
        for chunk in many.chunks(256) {
            sink.allow(chunk.to_vec(), 60).await;
        }
        assert!(lock(&sink.allowed).len() <= RESOLVED_MEMORY);
    }
}
