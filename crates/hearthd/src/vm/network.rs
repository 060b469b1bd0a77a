//! The network operations of `vm`: checking a create's network fields, egress changes,
//! private networks and their members, and the network part of a VM's detail.

use hearth_api::{CreateNetworkRequest, CreateVmRequest, EgressRequest, VmDetail, VmNetwork};
use hearth_helper::proto;

use super::{Caller, VmError, VmService};
use crate::net::egress;
use crate::rules;
use crate::store::{EgressRecord, MetadataRecord, NetworkRecord, VmRecord};

/// The largest user data the metadata service hands a guest.
const MAX_USER_DATA: usize = 64 << 10;
const MAX_SSH_KEYS: usize = 64;
const MAX_SSH_KEY_LEN: usize = 16 << 10;
const MAX_NETWORKS_PER_VM: usize = 16;

impl VmService {
    /// Checks the network fields of a create: they need networking on; names of existing
    /// networks are checked by the store, in the VM's own transaction.
    pub(super) fn validate_net_request(
        &self,
        req: &CreateVmRequest,
    ) -> Result<(EgressRecord, MetadataRecord), VmError> {
        let asks_network = !req.networks.is_empty() || req.egress.is_some();
        if asks_network && self.inner.network.is_none() {
            let field = if req.networks.is_empty() {
                "egress"
            } else {
                "networks"
            };
            return Err(VmError::BadRequest(format!(
                "{field}: networking is off on this host (network.mode = \"off\")"
            )));
        }
        if req.networks.len() > MAX_NETWORKS_PER_VM {
            return Err(VmError::BadRequest(format!(
                "networks: at most {MAX_NETWORKS_PER_VM} per VM"
            )));
        }
        for net in &req.networks {
            validate_network_name("networks", net)?;
        }
        let egress = match &req.egress {
            Some(e) => egress::validate(e).map_err(|e| VmError::BadRequest(e.to_string()))?,
            None => EgressRecord::default(),
        };
        if req
            .user_data
            .as_ref()
            .is_some_and(|u| u.len() > MAX_USER_DATA)
        {
            return Err(VmError::BadRequest(format!(
                "user_data: at most {} KiB",
                MAX_USER_DATA >> 10
            )));
        }
        if req.ssh_authorized_keys.len() > MAX_SSH_KEYS {
            return Err(VmError::BadRequest(format!(
                "ssh_authorized_keys: at most {MAX_SSH_KEYS} keys"
            )));
        }
        for key in &req.ssh_authorized_keys {
            let key = key.trim();
            let ok = !key.is_empty()
                && key.len() <= MAX_SSH_KEY_LEN
                && !key.contains(['\n', '\r', '\0'])
                && key.split_whitespace().count() >= 2;
            if !ok {
                return Err(VmError::BadRequest(format!(
                    "ssh_authorized_keys: {:?} is not an OpenSSH public key line (type and key, one line, at most 16 KiB)",
                    key.chars().take(40).collect::<String>()
                )));
            }
        }
        Ok((
            egress,
            MetadataRecord {
                user_data: req.user_data.clone(),
                ssh_authorized_keys: req
                    .ssh_authorized_keys
                    .iter()
                    .map(|k| k.trim().to_owned())
                    .collect(),
            },
        ))
    }

    /// The network part of `vm`'s detail.
    pub(super) async fn vm_network(&self, vm: &VmRecord) -> Result<Option<VmNetwork>, VmError> {
        let (Some(net), Some(index)) = (&self.inner.network, vm.net_index) else {
            return Ok(None);
        };
        let (host, addr) = crate::net::addresses(net.cidr(), index);
        let subnet = proto::Cidr::new(std::net::Ipv4Addr::from(u32::from(host) - 1), 30)
            .map(|c| c.to_string())
            .unwrap_or_default();
        Ok(Some(VmNetwork {
            address: addr.to_string(),
            host_address: host.to_string(),
            subnet,
            guest_address: proto::GUEST_ADDR.to_string(),
            guest_gateway: proto::GATEWAY_ADDR.to_string(),
            mac: proto::GUEST_MAC.into(),
            networks: self.inner.store.vm_networks(&vm.id).await?,
            egress: egress::to_api(&vm.egress),
        }))
    }

    pub(super) async fn set_egress(
        &self,
        name: &str,
        req: EgressRequest,
    ) -> Result<VmDetail, VmError> {
        let net = self.network()?;
        let record = egress::validate(&req).map_err(|e| VmError::BadRequest(e.to_string()))?;
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let vm = self.record(&vm.id).await?;
        if vm.net_index.is_none() {
            return Err(VmError::BadRequest(format!(
                "egress: VM {name:?} was made while networking was off and has no network"
            )));
        }
        self.inner
            .store
            .set_egress(&vm.id, &record, &egress::describe(&record))
            .await?;
        let vm = self.record(&vm.id).await?;
        net.refresh_egress(&vm).await?;
        self.detail(&vm.id).await
    }

    fn network(&self) -> Result<&crate::net::Network, VmError> {
        self.inner.network.as_ref().ok_or_else(|| {
            VmError::BadRequest("networking is off on this host (network.mode = \"off\")".into())
        })
    }

    /// Stored networks as the API shows them: members by name (the VMs are read once).
    async fn networks_api(
        &self,
        nets: Vec<NetworkRecord>,
    ) -> Result<Vec<hearth_api::Network>, VmError> {
        let vms = self.inner.store.list_vms().await?.vms;
        Ok(nets
            .into_iter()
            .map(|n| {
                let mut members: Vec<String> = n
                    .members
                    .iter()
                    .filter_map(|id| vms.iter().find(|v| &v.id == id).map(|v| v.name.clone()))
                    .collect();
                members.sort();
                hearth_api::Network {
                    name: n.name,
                    org: n.org,
                    created_at: n.created_at,
                    members,
                }
            })
            .collect())
    }

    async fn network_api(&self, n: NetworkRecord) -> Result<hearth_api::Network, VmError> {
        let mut one = self.networks_api(vec![n]).await?;
        one.pop()
            .ok_or_else(|| VmError::Task("a network went missing while it was read".into()))
    }

    pub(super) async fn list_networks(&self) -> Result<Vec<hearth_api::Network>, VmError> {
        self.network()?;
        let nets = self.inner.store.list_networks().await?;
        self.networks_api(nets).await
    }

    pub(super) async fn create_network(
        &self,
        caller: &Caller,
        req: CreateNetworkRequest,
    ) -> Result<hearth_api::Network, VmError> {
        self.network()?;
        validate_network_name("name", &req.name)?;
        let org = caller.owning_org()?;
        let n = self.inner.store.create_network(&req.name, &org).await?;
        self.network_api(n).await
    }

    pub(super) async fn delete_network(&self, name: &str) -> Result<(), VmError> {
        self.network()?;
        self.inner.store.delete_network(name).await?;
        Ok(())
    }

    /// Puts VM `vm` in network `network` (or takes it out), and the host rules follow at once
    /// when the VM runs.
    pub(super) async fn set_membership(
        &self,
        network: &str,
        vm: &str,
        member: bool,
    ) -> Result<hearth_api::Network, VmError> {
        let net = self.network()?;
        let record = self.record(vm).await?;
        if record.net_index.is_none() {
            return Err(VmError::BadRequest(format!(
                "vm: VM {vm:?} was made while networking was off and has no network"
            )));
        }
        if member {
            self.inner.store.join_network(network, &record.id).await?;
        } else {
            self.inner.store.leave_network(network, &record.id).await?;
        }
        net.apply_host_rules().await?;
        let n = self.inner.store.get_network(network).await?;
        self.network_api(n).await
    }
}

/// Network names follow the VM name rule.
fn validate_network_name(field: &str, name: &str) -> Result<(), VmError> {
    rules::validate_name(name).map_err(|e| VmError::BadRequest(format!("{field}: {}", e.message)))
}
